//! A profile's `reset_method` (DESIGN §10): set before each bind, read
//! back, and a bind whose method the kernel will not take moves nothing.

mod common;

use common::{Rig, addr, z77_config};
use vfiod::kernel::Inspect;
use vfiod_dbus::Error;

/// The Z77 machine, its RX 580 in vendor-reset's table, with vendor-reset
/// loaded at boot or not, and its profile asking for `methods`.
fn z77(vendor_reset_loaded: bool, methods: &str) -> Rig {
    let mut config = z77_config();
    config.profiles.get_mut("rx580").unwrap().reset_method = Some(methods.into());
    let text = std::fs::read_to_string(common::machines_dir().join("z77-rx580.toml")).unwrap();
    let gpu = "address = \"0000:01:00.0\"\n";
    assert!(text.contains(gpu));
    let mut text = text.replacen(gpu, &format!("{gpu}vendor_reset = true\n"), 1);
    if vendor_reset_loaded {
        text = text.replacen("modules = [", "modules = [\"vendor_reset\", ", 1);
    }
    Rig::from_text(&text, config)
}

fn methods(rig: &Rig, address: &str) -> Vec<String> {
    rig.sim
        .device(&addr(address))
        .unwrap()
        .unwrap()
        .reset_methods
}

#[test]
fn the_gpu_gets_device_specific_before_the_bind_and_its_audio_keeps_its_own() {
    let rig = z77(true, "device_specific");
    rig.bind("rx580").unwrap();
    assert_eq!(methods(&rig, "01:00.0"), ["device_specific"]);
    assert_eq!(
        methods(&rig, "01:00.1"),
        ["bus"],
        "the audio has no device_specific"
    );
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("vfio-pci"));
}

#[test]
fn at_start_every_profile_gets_its_reset_method() {
    let rig = z77(true, "device_specific");
    assert!(rig.engine.set_configured_reset_methods().is_empty());
    assert_eq!(methods(&rig, "01:00.0"), ["device_specific"]);
    assert_eq!(
        rig.driver("01:00.0").as_deref(),
        Some("amdgpu"),
        "nothing moved"
    );
}

#[test]
fn device_specific_without_vendor_reset_refuses_the_bind_and_says_why() {
    let rig = z77(false, "device_specific");
    let before = rig.kernel_view();
    let err = rig.bind("rx580").unwrap_err();
    assert!(matches!(err, Error::Kernel(_)), "{err:?}");
    let message = err.message();
    for needle in [
        "profile rx580",
        "reset_method = \"device_specific\"",
        "0000:01:00.0",
        "vendor-reset, which is not loaded",
        "nothing was moved",
    ] {
        assert!(message.contains(needle), "{needle:?} missing: {message}");
    }
    assert_eq!(rig.kernel_view(), before, "nothing moved");
    let failures = rig.engine.set_configured_reset_methods();
    assert_eq!(failures.len(), 1, "{failures:?}");
}

#[test]
fn a_kernel_without_reset_method_refuses_the_bind() {
    let mut config = z77_config();
    config.profiles.get_mut("rx580").unwrap().reset_method = Some("bus".into());
    let text = std::fs::read_to_string(common::machines_dir().join("z77-rx580.toml"))
        .unwrap()
        .replace("reset = [\"bus\"]", "reset = [\"unknown\"]");
    let rig = Rig::from_text(&text, config);
    let before = rig.kernel_view();
    let err = rig.bind("rx580").unwrap_err();
    let message = err.message();
    assert!(message.contains("kernels before 5.15"), "{message}");
    assert!(message.contains("nothing was moved"), "{message}");
    assert_eq!(rig.kernel_view(), before);
}

#[test]
fn a_method_no_function_has_refuses_the_bind() {
    let rig = z77(true, "flr");
    let err = rig.bind("rx580").unwrap_err();
    let message = err.message();
    assert!(
        message.contains("refused it for every function"),
        "{message}"
    );
    assert!(message.contains("0000:01:00.1"), "{message}");
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("amdgpu"));
}
