//! `boot = "vfio"` while udev's coldplug is still binding host drivers
//! (the simulated machine's `coldplug_ms` and `late_driver`): vfiod waits
//! for udev's queue before it binds, then takes its name.

use std::time::{Duration, Instant};

use vfiod_tests::{Rig, bin, machine, wait_until, z77_config_rx580_at_boot};

const COLDPLUG_MS: u64 = 1500;

/// The Z77 whose coldplug runs for `COLDPLUG_MS` after boot, the devices
/// at `late` getting their host drivers only then.
fn z77_coldplug(late: &[&str]) -> String {
    let mut text = std::fs::read_to_string(machine("z77-rx580.toml"))
        .unwrap()
        .replacen(
            "[machine]\n",
            &format!("[machine]\ncoldplug_ms = {COLDPLUG_MS}\n"),
            1,
        );
    for address in late {
        let line = format!("address = \"{address}\"\n");
        assert!(text.contains(&line), "{address}");
        text = text.replace(&line, &format!("{line}late_driver = true\n"));
    }
    text
}

#[test]
fn a_boot_bind_waits_for_the_coldplug_and_remembers_the_drivers_it_brought() {
    let mut rig = Rig::bus_only_text(
        &z77_coldplug(&["0000:01:00.0", "0000:01:00.1"]),
        &z77_config_rx580_at_boot(),
    );
    bin("vfiod");
    let started = Instant::now();
    rig.start_vfiod();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(COLDPLUG_MS),
        "vfiod took its name {took:?} after it started, before the coldplug ended:\n{}",
        rig.log()
    );
    for (address, host) in [("01:00.0", "amdgpu"), ("01:00.1", "snd_hda_intel")] {
        assert_eq!(rig.driver(address), "vfio-pci", "{}", rig.log());
        assert_eq!(rig.device_property(address, "HostDriver"), host);
    }
    assert!(rig.log().contains("udev's queue is empty"), "{}", rig.log());
}

#[test]
fn a_late_driver_binds_when_the_coldplug_ends_and_the_bus_follows() {
    // No boot profile: nothing waits for udev, nothing reads the device;
    // the simulated coldplug still ends on time and vfiod hears of it.
    let rig = Rig::with_text(
        &z77_coldplug(&["0000:03:00.0"]),
        &std::fs::read_to_string(machine("z77-rx580.vfiod.toml")).unwrap(),
    );
    wait_until(
        "xhci_hcd bound to 03:00.0 on the bus",
        Duration::from_secs(10),
        || rig.driver("03:00.0") == "xhci_hcd",
    );
    assert_eq!(rig.device_property("03:00.0", "State"), "host");
}

#[test]
fn a_group_member_whose_driver_is_still_coming_does_not_pass_for_viable() {
    // The NIC shares the GPU's group (a board without ACS); its r8169
    // binds only as the coldplug reaches it. Bound before that, the GPU
    // would sit in a group that is not viable once r8169 is there.
    let machine_text = z77_coldplug(&["0000:02:00.0"]).replace(
        "driver = \"r8169\"\ngroup = 13\n",
        "driver = \"r8169\"\ngroup = 1\n",
    );
    let rig = Rig::with_text(&machine_text, &z77_config_rx580_at_boot());
    assert_eq!(rig.driver("01:00.0"), "amdgpu", "{}", rig.log());
    assert_eq!(rig.driver("01:00.1"), "snd_hda_intel");
    assert_eq!(rig.driver("02:00.0"), "r8169");
    let log = rig.log();
    let refusal = log
        .lines()
        .find(|l| l.contains("could not bind at start"))
        .unwrap_or_else(|| panic!("no refusal at start in:\n{log}"));
    assert!(
        refusal.contains("GroupNotViable") || refusal.contains("not viable"),
        "{refusal}"
    );
    assert!(refusal.contains("0000:02:00.0"), "{refusal}");
}
