//! Boot, with udev's coldplug still running: host drivers that bind late
//! (`coldplug_ms`, `late_driver`), in the simulated kernel and under the
//! engine that moves such a device.

mod common;

use std::time::Duration;

use common::{Rig, addr, wait_until};
use vfiod::kernel::{Kernel, UeventAction};

/// The Z77 with the RX 580's two functions still waiting for their host
/// drivers, for `coldplug_ms` after boot.
fn z77_coldplug(coldplug_ms: u64) -> Rig {
    Rig::z77_with(|text| {
        text.replacen(
            "[machine]\n",
            &format!("[machine]\ncoldplug_ms = {coldplug_ms}\n"),
            1,
        )
        .replace(
            "address = \"0000:01:00.0\"\n",
            "address = \"0000:01:00.0\"\nlate_driver = true\n",
        )
        .replace(
            "address = \"0000:01:00.1\"\n",
            "address = \"0000:01:00.1\"\nlate_driver = true\n",
        )
    })
}

#[test]
fn late_drivers_bind_when_the_coldplug_ends_and_say_so() {
    let rig = z77_coldplug(300);
    let events = rig.sim.subscribe();
    assert!(rig.sim.udev_busy());
    assert_eq!(rig.driver("01:00.0"), None);
    assert_eq!(rig.driver("01:00.1"), None);
    assert_eq!(rig.driver("03:00.0").as_deref(), Some("xhci_hcd"));
    wait_until("the coldplug ends", Duration::from_secs(10), || {
        !rig.sim.udev_busy()
    });
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("amdgpu"));
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("snd_hda_intel"));
    let bound: Vec<_> = events
        .try_iter()
        .filter(|e| e.action == UeventAction::Bind)
        .map(|e| (e.address, e.driver.unwrap()))
        .collect();
    assert_eq!(
        bound,
        vec![
            (addr("01:00.0"), "amdgpu".to_owned()),
            (addr("01:00.1"), "snd_hda_intel".to_owned())
        ]
    );
    // The machine's running state keeps it: a restarted vfiod sees it bound.
    let rig = rig.restart();
    assert!(!rig.sim.udev_busy());
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("amdgpu"));
}

#[test]
fn a_write_during_the_coldplug_finds_the_late_driver_bound_first() {
    let rig = z77_coldplug(600_000);
    assert_eq!(rig.driver("01:00.0"), None);
    // As the real kernel's override write waits for a probe in progress.
    rig.sim
        .set_driver_override(&addr("01:00.0"), Some("vfio-pci"))
        .unwrap();
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("amdgpu"));
    assert_eq!(rig.overrides("01:00.0").as_deref(), Some("vfio-pci"));
    // The other function is not reached by it.
    assert_eq!(rig.driver("01:00.1"), None);
    assert!(rig.sim.udev_busy());
}

#[test]
fn a_bind_that_races_the_host_driver_takes_the_device_and_remembers_that_driver() {
    // The host drivers arrive between vfiod's read ("no driver") and its
    // override write, at boot, as bochs-drm did on a real second boot.
    let rig = z77_coldplug(600_000);
    let moved = rig.bind("rx580").unwrap();
    assert_eq!(moved.len(), 2);
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("vfio-pci"));
    assert!(rig.sim.group_viable(1));
    assert_eq!(
        rig.engine.host_driver(&addr("01:00.0")).as_deref(),
        Some("amdgpu")
    );
    assert_eq!(
        rig.engine.host_driver(&addr("01:00.1")).as_deref(),
        Some("snd_hda_intel")
    );
    rig.release("rx580").unwrap();
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("amdgpu"));
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("snd_hda_intel"));
    assert_eq!(rig.overrides("01:00.0"), None);
}
