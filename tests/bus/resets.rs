//! A profile's `reset_method` on the bus (DESIGN §10): set when vfiod
//! starts and on reload, shown as `Device.ResetMethod`.

use std::time::Duration;

use vfiod_tests::{Rig, TempDir, assert_exit, machine, stderr, stdout, wait_until};

/// The Z77 machine with vendor-reset loaded and its RX 580 in
/// vendor-reset's table; its config with `reset_method` for rx580.
fn z77_with_vendor_reset(dir: &TempDir, methods: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let text = std::fs::read_to_string(machine("z77-rx580.toml")).unwrap();
    let gpu = "address = \"0000:01:00.0\"\n";
    let text = text
        .replacen(gpu, &format!("{gpu}vendor_reset = true\n"), 1)
        .replacen("modules = [", "modules = [\"vendor_reset\", ", 1);
    let machine_file = dir.write("machine.toml", &text);
    let config = dir.write("vfiod.toml", &config_text(methods));
    (machine_file, config)
}

fn config_text(methods: &str) -> String {
    std::fs::read_to_string(machine("z77-rx580.vfiod.toml"))
        .unwrap()
        .replacen(
            "[profiles.rx580]\n",
            &format!("[profiles.rx580]\nreset_method = \"{methods}\"\n"),
            1,
        )
}

#[test]
fn reset_method_is_set_at_start_and_on_reload_and_shown_on_the_bus() {
    let dir = TempDir::new();
    let (machine_file, config) = z77_with_vendor_reset(&dir, "device_specific");
    let rig = Rig::start(&machine_file, &config);
    assert_eq!(
        rig.device_property("01:00.0", "ResetMethod"),
        "device_specific"
    );
    assert_eq!(
        rig.device_property("01:00.1", "ResetMethod"),
        "bus",
        "the audio function keeps its own"
    );

    std::fs::write(&config, config_text("bus")).unwrap();
    rig.hangup();
    wait_until(
        "ResetMethod bus after the reload",
        Duration::from_secs(10),
        || rig.device_property("01:00.0", "ResetMethod") == "bus",
    );
}

#[test]
fn a_gpu_dead_for_good_is_never_given_to_amdgpu_and_the_release_says_why() {
    let text = std::fs::read_to_string(machine("z77-rx580.toml"))
        .unwrap()
        .replacen(
            "address = \"0000:01:00.0\"\n",
            "address = \"0000:01:00.0\"\nfault = { dead = \"forever\" }\n",
            1,
        );
    let config = std::fs::read_to_string(machine("z77-rx580.vfiod.toml")).unwrap();
    let rig = Rig::with_text(&text, &config);
    assert_eq!(rig.device_property("01:00.0", "Health"), "ok");
    assert_exit(&rig.vfioctl(&["bind", "rx580"]), 0);
    assert_eq!(rig.device_property("01:00.0", "Health"), "unknown");
    let out = rig.vfioctl(&["release", "rx580"]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains("Kernel: release rx580: 0000:01:00.0"), "{err}");
    assert!(
        err.contains("needs a reboot") && err.contains("off the bus"),
        "{err}"
    );
    assert_eq!(rig.driver("01:00.1"), "snd_hda_intel");
    let status = stdout(&rig.vfioctl(&["status", "rx580"]));
    assert!(
        status.contains("needs a reboot"),
        "the profile's last error: {status}"
    );
}

#[test]
fn a_host_driver_that_lets_go_right_after_the_hand_back_is_reported() {
    let rig = Rig::z77();
    assert_exit(&rig.vfioctl(&["bind", "rx580"]), 0);
    assert_exit(&rig.vfioctl(&["release", "rx580"]), 0);
    assert_eq!(rig.device_property("01:00.0", "Health"), "ok");
    // amdgpu gives up on the card a moment later (its late init failing).
    rig.simulate("SetDriver", "ss", &["0000:01:00.0", ""]);
    wait_until("Health reset-failed", Duration::from_secs(10), || {
        rig.device_property("01:00.0", "Health") == "reset-failed"
    });
    assert!(
        rig.log().contains("did not come back healthy"),
        "{}",
        rig.log()
    );
}

/// On a busy host udev delivers vfio-pci's unbind of the release after the
/// host driver has bound (the lane's guest: 1.2-1.8 s late), and the
/// kernel's unbind uevent names no driver: that is not the host driver
/// letting go.
#[test]
fn a_late_unbind_uevent_of_the_release_is_not_the_host_driver_letting_go() {
    let machine = std::fs::read_to_string(vfiod_tests::machine("z77-rx580.toml"))
        .unwrap()
        .replacen("[machine]\n", "[machine]\nuevent_delay_ms = 1500\n", 1);
    let config = std::fs::read_to_string(vfiod_tests::machine("z77-rx580.vfiod.toml")).unwrap();
    let rig = Rig::with_text(&machine, &config);
    assert_exit(&rig.vfioctl(&["bind", "rx580"]), 0);
    assert_exit(&rig.vfioctl(&["release", "rx580"]), 0);
    // Events arrive in order: once a later one is seen, the release's are.
    rig.simulate("SetDriver", "ss", &["0000:00:1b.0", ""]);
    wait_until(
        "00:1b.0 without a driver on the bus",
        Duration::from_secs(10),
        || rig.device_property("00:1b.0", "Driver").is_empty(),
    );
    assert_eq!(rig.device_property("01:00.0", "Health"), "ok");
    assert_eq!(rig.device_property("01:00.1", "Health"), "ok");
    assert!(
        !rig.log().contains("did not come back healthy"),
        "{}",
        rig.log()
    );
}

/// Another tool moving the function right after the hand-back (libvirt's
/// `managed='yes'` for a domain started at once: driver_override, unbind,
/// probe) is not the host driver failing it.
#[test]
fn another_tool_taking_the_function_right_after_the_hand_back_is_not_a_failure() {
    let rig = Rig::z77();
    assert_exit(&rig.vfioctl(&["bind", "rx580"]), 0);
    assert_exit(&rig.vfioctl(&["release", "rx580"]), 0);
    assert_eq!(rig.device_property("01:00.0", "Health"), "ok");
    for call in [
        ["set-override", "2", "0000:01:00.0", "vfio-pci"].as_slice(),
        &["unbind", "2", "0000:01:00.0", "amdgpu"],
        &["probe", "1", "0000:01:00.0"],
    ] {
        rig.simulate("KernelCall", "sas", call);
    }
    wait_until("Driver vfio-pci", Duration::from_secs(10), || {
        rig.device_property("01:00.0", "Driver") == "vfio-pci"
    });
    assert_ne!(rig.device_property("01:00.0", "Health"), "reset-failed");
    assert!(
        !rig.log().contains("did not come back healthy"),
        "{}",
        rig.log()
    );
}

/// Early claim (DESIGN §10): a `boot = "vfio"` profile's udev rule is
/// written as vfiod starts (for a simulated machine, under its state dir's
/// `root`) and removed by a reload that drops the profile's boot.
#[test]
fn the_early_claim_follows_the_config() {
    let dir = TempDir::new();
    let config = dir.write(
        "vfiod.toml",
        "[profiles.rx580]\ndevices = [\"01:00.0\"]\nboot = \"vfio\"\n",
    );
    let rig = Rig::start(&machine("z77-rx580.toml"), &config);
    let rule = rig
        .dir
        .path("state/root/etc/udev/rules.d/61-vfiod-early-claim.rules");
    let text = std::fs::read_to_string(&rule).expect("the early claim's udev rule");
    assert!(
        text.contains("KERNEL==\"0000:01:00.0\"") && text.contains("KERNEL==\"0000:01:00.1\""),
        "{text}"
    );
    std::fs::write(&config, "[profiles.rx580]\ndevices = [\"01:00.0\"]\n").unwrap();
    rig.hangup();
    wait_until("the rule removed", Duration::from_secs(10), || {
        !rule.exists()
    });
}
