//! Crash safety: vfiod is killed (SIGKILL) right after each kernel write of
//! a GPU + audio bind and of its release, then started again. Every device
//! must end on vfio-pci or on its host driver, never driverless, and what
//! vfiod shows on the bus must match the (simulated) sysfs.

use std::time::{Duration, Instant};

use vfiod_tests::{Rig, assert_exit, stdout};

const PAIR: [(&str, &str); 2] = [
    ("0000:01:00.0", "amdgpu"),
    ("0000:01:00.1", "snd_hda_intel"),
];

/// The simulated sysfs as its state file has it: driver and override.
fn sysfs(rig: &Rig, address: &str) -> (Option<String>, Option<String>) {
    let text = std::fs::read_to_string(rig.dir.path("state/sim-state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dev = &state["devices"][address];
    (
        dev["driver"].as_str().map(str::to_string),
        dev["driver_override"].as_str().map(str::to_string),
    )
}

fn wait_dead(rig: &mut Rig) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !rig.vfiod_alive() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn check_settled(rig: &Rig, point: &str) {
    for (address, host) in PAIR {
        let (driver, overridden) = sysfs(rig, address);
        let driver = driver.unwrap_or_else(|| panic!("{point}: {address} LEFT WITHOUT A DRIVER"));
        assert!(
            driver == host || driver == "vfio-pci",
            "{point}: {address} on {driver}"
        );
        assert_eq!(
            overridden, None,
            "{point}: {address} kept a driver_override"
        );
        assert_eq!(
            rig.driver(address),
            driver,
            "{point}: the bus disagrees with sysfs on {address}"
        );
        let state = if driver == "vfio-pci" { "vfio" } else { "host" };
        assert_eq!(
            rig.device_property(address, "State"),
            state,
            "{point}: {address}"
        );
    }
}

/// Kills vfiod after each write of `direction` in turn; returns how many
/// crash points there were.
fn crash_at_every_step(direction: &str) -> u32 {
    let mut points = 0;
    for writes in 1.. {
        let mut rig = Rig::z77();
        if direction == "release" {
            assert_exit(&rig.vfioctl(&["bind", "rx580", "--vm", "win10"]), 0);
        }
        rig.simulate("CrashAfterWrites", "u", &[&writes.to_string()]);
        let out = rig.vfioctl(&[direction, "rx580"]);
        if !wait_dead(&mut rig) {
            // The move needed fewer writes than this: every point is covered.
            assert_exit(&out, 0);
            break;
        }
        assert_ne!(
            out.status.code(),
            Some(0),
            "the client saw success from a dead daemon"
        );
        points += 1;
        let point = format!("{direction}, killed after write {writes}");
        rig.start_vfiod();
        check_settled(&rig, &point);
        assert!(
            rig.log()
                .contains("settling a move that vfiod did not finish"),
            "{point}: {}",
            rig.log()
        );
        // And the machine is usable again.
        assert_exit(&rig.vfioctl(&["bind", "rx580"]), 0);
        assert_exit(&rig.vfioctl(&["release", "rx580"]), 0);
        check_settled(&rig, &format!("{point}, then bound and released"));
        eprintln!(
            "{point}: recovered ({})",
            stdout(&rig.vfioctl(&["status", "rx580"]))
                .lines()
                .next()
                .unwrap_or("")
        );
    }
    points
}

#[test]
fn every_step_of_a_bind_and_a_release_survives_a_kill() {
    let bind_points = crash_at_every_step("bind");
    let release_points = crash_at_every_step("release");
    println!(
        "crash points covered: {} ({bind_points} in bind, {release_points} in release)",
        bind_points + release_points
    );
    // override (set, or cleared) + unbind + probe per device, both ways.
    assert_eq!(bind_points, 6);
    assert_eq!(release_points, 6);
}

#[test]
fn journal_entries_of_an_earlier_boot_are_not_replayed() {
    let mut rig = Rig::z77();
    rig.simulate("CrashAfterWrites", "u", &["2"]);
    let _ = rig.vfioctl(&["bind", "rx580"]);
    assert!(wait_dead(&mut rig));
    // A reboot: the simulated kernel starts fresh (a new boot id), as a
    // real machine's devices are back at their boot drivers.
    std::fs::remove_file(rig.dir.path("state/sim-state.json")).unwrap();
    rig.start_vfiod();
    assert!(rig.log().contains("earlier boot"), "{}", rig.log());
    assert!(!rig.log().contains("settling a move"), "{}", rig.log());
    assert_eq!(rig.driver("01:00.0"), "amdgpu");
}

#[test]
fn a_kill_during_a_hung_unbind_is_settled_after_restart_once_the_hang_ends() {
    let mut rig = Rig::z77_hung_audio(300);
    let out = rig.vfioctl(&["bind", "rx580"]);
    assert_exit(&out, 1);
    // The unbind has not returned: its move is still in the journal.
    rig.kill_vfiod();
    rig.start_vfiod();
    // Recovery could not settle the audio (its device lock is held).
    assert_eq!(rig.device_property("01:00.1", "State"), "stuck");
    assert!(
        rig.log()
            .contains("settling a move that vfiod did not finish")
    );

    rig.simulate("EndHang", "s", &["0000:01:00.1"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.device_property("01:00.1", "State") == "stuck" {
        assert!(Instant::now() < deadline, "still stuck: {}", rig.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    check_settled(&rig, "after the hang ended");
}
