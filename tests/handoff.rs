//! The single-GPU handoff (DESIGN §10) with the real vfiod on a private
//! bus: what it says of a handoff that has nothing to take, and its crash
//! safety. Crash safety: vfiod is killed
//! (SIGKILL) right after each write of a handoff bind (the display
//! manager's stop, fbcon's and the EFI framebuffer's unbinds, the move)
//! and of its release (the move, the framebuffer's and fbcon's binds, the
//! display manager's start), then started again. Every time, the display
//! must be back on the host — display manager running, fbcon bound,
//! efifb bound — with the GPU and its audio on their host drivers.

use std::time::Duration;

use vfiod_tests::{Rig, assert_exit, wait_until};

const PAIR: [(&str, &str); 2] = [
    ("0000:09:00.0", "amdgpu"),
    ("0000:09:00.1", "snd_hda_intel"),
];

fn desktop() -> Rig {
    let text = |name: &str| std::fs::read_to_string(vfiod_tests::machine(name)).unwrap();
    Rig::with_text(
        &text("b450-single-rx580.toml"),
        &text("b450-single-rx580.vfiod.toml"),
    )
}

/// The simulated kernel's state file.
fn sim_state(rig: &Rig) -> serde_json::Value {
    let text = std::fs::read_to_string(rig.dir.path("state/sim-state.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The display as the simulated machine has it: what differs from its
/// boot, which is the whole display shown.
fn check_display_back(rig: &Rig, point: &str) {
    let state = sim_state(rig);
    let display = &state["display"];
    for (key, back) in [
        ("vtconsoles", "vtcon1"),
        ("framebuffers", "efi-framebuffer.0"),
    ] {
        let bound = display[key][back].as_bool().unwrap_or(true);
        assert!(bound, "{point}: {back} is not bound again: {display}");
    }
    let manager = display["manager"].as_str().unwrap_or("active");
    assert_eq!(manager, "active", "{point}: the display manager: {display}");
    for (address, host) in PAIR {
        let driver = state["devices"][address]["driver"].as_str();
        assert_eq!(driver, Some(host), "{point}: {address}");
        assert_eq!(rig.driver(address), host, "{point}: the bus on {address}");
    }
}

/// Kills vfiod after each write of `direction` in turn; returns how many
/// crash points there were.
fn crash_at_every_step(direction: &str) -> u32 {
    let mut points = 0;
    for writes in 1.. {
        let mut rig = desktop();
        if direction == "release" {
            assert_exit(&rig.vfioctl(&["bind", "rx580", "--vm", "win10"]), 0);
        }
        rig.simulate("CrashAfterWrites", "u", &[&writes.to_string()]);
        let out = rig.vfioctl(&[direction, "rx580"]);
        if out.status.success() {
            assert!(
                rig.vfiod_alive(),
                "the client saw success from a dead daemon"
            );
            break;
        }
        wait_until(
            "vfiod ending at its crash point",
            Duration::from_secs(10),
            || !rig.vfiod_alive(),
        );
        points += 1;
        let point = format!("{direction}, killed after write {writes}");
        rig.start_vfiod();
        check_display_back(&rig, &point);
        assert!(
            rig.log().contains("giving back a display"),
            "{point}: {}",
            rig.log()
        );
        // And the single GPU can go to its VM and come back again.
        assert_exit(&rig.vfioctl(&["bind", "rx580"]), 0);
        assert_exit(&rig.vfioctl(&["release", "rx580"]), 0);
        check_display_back(&rig, &format!("{point}, then bound and released"));
        eprintln!("{point}: the display is back");
    }
    points
}

#[test]
fn every_step_of_a_handoff_and_its_giving_back_survives_a_kill() {
    let bind_points = crash_at_every_step("bind");
    let release_points = crash_at_every_step("release");
    println!("handoff crash points covered: {bind_points} in bind, {release_points} in release");
    // The stop, fbcon, efifb, then override + unbind + probe for each of
    // the two functions; the release the other way round.
    assert_eq!(bind_points, 9);
    assert_eq!(release_points, 9);
}

/// `handoff = true` on a profile whose GPU shows nothing (the z77's RX 580:
/// the desktop is on the HD 4000) is a no-op, said once when the config is
/// loaded, and again at each reload; the single GPU's is not.
#[test]
fn a_handoff_that_takes_nothing_is_said_once_at_load() {
    let text = |name: &str| std::fs::read_to_string(vfiod_tests::machine(name)).unwrap();
    let config = text("z77-rx580.vfiod.toml")
        .replace("vms = [\"win10\"]\n", "vms = [\"win10\"]\nhandoff = true\n");
    assert!(config.contains("handoff = true"));
    let rig = Rig::with_text(&text("z77-rx580.toml"), &config);
    let said = "handoff = true does nothing for this profile";
    let count = |rig: &Rig| rig.log().matches(said).count();
    wait_until(
        "the load's word on the handoff",
        Duration::from_secs(10),
        || count(&rig) > 0,
    );
    assert_eq!(count(&rig), 2, "rx580 and usb3: {}", rig.log());
    assert!(rig.log().contains("profile=rx580"), "{}", rig.log());
    rig.hangup();
    wait_until(
        "the reload's word on the handoff",
        Duration::from_secs(10),
        || count(&rig) == 4,
    );

    let desktop = desktop();
    assert_exit(&desktop.vfioctl(&["status"]), 0);
    assert!(!desktop.log().contains(said), "{}", desktop.log());
}
