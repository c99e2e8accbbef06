//! A set the early claim's udev rule gave to vfio-pci at add (DESIGN §10):
//! no host driver ever had it, so vfiod knows none; a release gives each
//! function to the driver the kernel picks, and when the kernel picks none
//! the function stays on vfio-pci, never driverless.

mod common;

use common::{Rig, addr, z77_config};
use vfiod::kernel::Kernel;

const GPU: &str = "0000:01:00.0";
const AUDIO: &str = "0000:01:00.1";

/// The z77 machine booted with the RX 580 pair claimed at add: on vfio-pci
/// with the rule's `driver_override`; `gpu_host` is what its modalias
/// matches among the drivers loaded (none: no host driver takes it, only
/// vfio-pci, as with an `ids=` option).
fn claimed_at_add(gpu_host: Option<&str>) -> Rig {
    let gpu_host = gpu_host.map_or(String::new(), |d| format!("host_driver = \"{d}\"\n"));
    let text = std::fs::read_to_string(common::machines_dir().join("z77-rx580.toml"))
        .unwrap()
        .replacen(
            "driver = \"amdgpu\"\n",
            &format!("driver = \"vfio-pci\"\n{gpu_host}"),
            1,
        )
        .replacen(
            "driver = \"snd_hda_intel\"\n",
            "driver = \"vfio-pci\"\nhost_driver = \"snd_hda_intel\"\n",
            1,
        );
    let rig = Rig::from_text(&text, z77_config());
    for a in [GPU, AUDIO] {
        rig.sim
            .set_driver_override(&addr(a), Some("vfio-pci"))
            .unwrap();
    }
    rig
}

#[test]
fn a_pair_claimed_at_add_has_no_known_host_driver_and_goes_to_the_kernels_pick() {
    let rig = claimed_at_add(Some("amdgpu"));
    assert_eq!(rig.driver(GPU).as_deref(), Some("vfio-pci"));
    assert_eq!(rig.engine.host_driver(&addr(GPU)), None);
    rig.release("rx580").unwrap();
    assert_eq!(rig.driver(GPU).as_deref(), Some("amdgpu"));
    assert_eq!(rig.driver(AUDIO).as_deref(), Some("snd_hda_intel"));
    assert_eq!(rig.overrides(GPU), None);
    assert_eq!(rig.overrides(AUDIO), None);
}

#[test]
fn when_the_kernel_picks_no_host_driver_the_release_fails_and_leaves_it_on_vfio_pci() {
    let rig = claimed_at_add(None);
    let err = rig.release("rx580").unwrap_err();
    assert!(
        err.message().contains(GPU) && err.message().contains("rolled back to vfio-pci"),
        "{err:?}"
    );
    assert_eq!(rig.driver(GPU).as_deref(), Some("vfio-pci"));
    assert_eq!(rig.driver(AUDIO).as_deref(), Some("vfio-pci"));
}
