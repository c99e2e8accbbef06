//! The kernel changing under vfiod (behind its back, hung, after a kill).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use vfiod_tests::{Rig, Signals, assert_exit, stderr, stdout, value_of, wait_until};
use zbus::{MatchRule, OwnedVariant};

/// The changed properties of a PropertiesChanged signal.
fn changed_in(signal: &zbus::Message) -> HashMap<String, OwnedVariant> {
    let (_, changed, _): (String, HashMap<String, OwnedVariant>, Vec<String>) = signal
        .body()
        .deserialize()
        .expect("a PropertiesChanged body");
    changed
}

#[test]
fn a_driver_changed_behind_our_back_shows_up_within_100ms() {
    let rig = Rig::z77();
    let path = "/org/vfiod1/device/0000_03_00_0";
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.freedesktop.DBus.Properties")
        .member("PropertiesChanged")
        .path(path)
        .build()
        .unwrap();
    let mut signals = Signals::subscribe(&rig, rule);
    rig.simulate("SetDriver", "ss", &["0000:03:00.0", ""]);
    let seen = wait_until(
        "Driver of 03:00.0 becoming empty",
        Duration::from_secs(2),
        || rig.driver("03:00.0").is_empty(),
    );
    assert!(seen < Duration::from_millis(100), "seen after {seen:?}");
    assert_eq!(rig.device_property("03:00.0", "State"), "unbound");
    signals.wait_for(
        "a PropertiesChanged for 03:00.0",
        Duration::from_secs(5),
        |received| !received.is_empty(),
    );
    let changed = changed_in(&signals.received[0]);
    assert!(
        changed.contains_key("Driver")
            && changed
                .get("State")
                .is_some_and(|s| String::try_from(s.try_clone().unwrap()).unwrap() == "unbound"),
        "{changed:?}"
    );
}

#[test]
fn devices_that_vanish_and_return_lose_and_gain_their_objects() {
    let rig = Rig::z77();
    let path = "/org/vfiod1/device/0000_03_00_0";
    let exists = |rig: &Rig| {
        rig.busctl(&["introspect", "org.vfiod1", path, "org.vfiod1.Device"])
            .status
            .success()
    };
    assert!(exists(&rig));
    rig.simulate("RemoveDevice", "s", &["0000:00:1c.4"]);
    let wait = |want: bool| {
        wait_until(
            &format!("object of 03:00.0 present = {want}"),
            Duration::from_secs(10),
            || exists(&rig) == want,
        )
    };
    wait(false);
    let devices = rig.busctl(&[
        "get-property",
        "org.vfiod1",
        "/org/vfiod1",
        "org.vfiod1.Manager",
        "Devices",
    ]);
    assert!(
        !stdout(&devices).contains("0000_03_00_0") && !stdout(&devices).contains("0000_00_1c_4")
    );
    rig.simulate("RestoreDevice", "s", &["0000:03:00.0"]);
    wait(true);
    assert_eq!(rig.driver("03:00.0"), "xhci_hcd");
}

#[test]
fn a_status_read_answers_while_a_move_hangs() {
    let rig = Rig::z77_hung_audio(1500);
    let progress = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.vfiod1.Manager")
        .member("TransitionProgress")
        .build()
        .unwrap();
    let mut signals = Signals::subscribe(&rig, progress);
    std::thread::scope(|s| {
        let mover = s.spawn(|| rig.vfioctl(&["bind", "rx580"]));
        // Steps are announced as they start: this one never returns.
        signals.wait_for(
            "the audio's unbind announced",
            Duration::from_secs(10),
            |received| {
                received.iter().any(|m| {
                    let (_, device, step): (String, String, String) =
                        m.body().deserialize().unwrap();
                    device == "0000:01:00.1" && step.starts_with("unbind ")
                })
            },
        );
        let start = Instant::now();
        let out = rig.busctl(&[
            "get-property",
            "org.vfiod1",
            "/org/vfiod1/device/0000_01_00_0",
            "org.vfiod1.Device",
            "State",
        ]);
        let took = start.elapsed();
        assert_exit(&out, 0);
        // busctl's own start-up is most of this; the bound is generous.
        assert!(
            took < Duration::from_millis(500),
            "a read took {took:?} during the hang"
        );
        assert_eq!(value_of(&out), "moving");
        // An unrelated group moves meanwhile.
        assert_exit(&rig.vfioctl(&["bind", "usb3"]), 0);
        let out = mover.join().unwrap();
        assert_exit(&out, 1);
        assert!(stderr(&out).contains("Timeout"), "{}", stderr(&out));
    });
    assert_eq!(rig.device_property("01:00.1", "State"), "stuck");
    assert_eq!(rig.driver("01:00.0"), "amdgpu");
    let last = rig.busctl(&[
        "get-property",
        "org.vfiod1",
        "/org/vfiod1/profile/rx580",
        "org.vfiod1.Profile",
        "LastError",
        "State",
    ]);
    assert!(
        stdout(&last).contains("org.vfiod1.Error.Timeout") && stdout(&last).contains("\"error\""),
        "{}",
        stdout(&last)
    );
}

#[test]
fn after_a_hang_ends_the_device_is_settled_and_the_bus_says_so() {
    let rig = Rig::z77_hung_audio(300);
    let out = rig.vfioctl(&["bind", "rx580"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("Timeout"), "{}", stderr(&out));
    assert_eq!(rig.device_property("01:00.1", "State"), "stuck");

    rig.simulate("EndHang", "s", &["0000:01:00.1"]);
    // Settled in the background once the unbind returns; published by
    // vfiod itself, with no other event to prompt it.
    wait_until(
        "the audio settled after the hang ended",
        Duration::from_secs(5),
        || rig.device_property("01:00.1", "State") != "stuck",
    );
    assert_eq!(rig.device_property("01:00.1", "State"), "host");
    assert_eq!(rig.driver("01:00.1"), "snd_hda_intel");
    assert!(
        rig.log()
            .contains("a kernel call that timed out has returned"),
        "{}",
        rig.log()
    );
}

#[test]
fn state_survives_a_kill_and_restart_of_vfiod() {
    let mut rig = Rig::z77();
    assert_exit(&rig.vfioctl(&["bind", "rx580", "--vm", "win10"]), 0);
    rig.kill_vfiod();
    rig.start_vfiod();
    assert_eq!(rig.driver("01:00.0"), "vfio-pci");
    assert_eq!(rig.device_property("01:00.0", "Owner"), "win10");
    assert_eq!(rig.device_property("01:00.0", "HostDriver"), "amdgpu");
    assert_exit(&rig.vfioctl(&["release", "rx580", "--vm", "win10"]), 0);
    assert_eq!(rig.driver("01:00.0"), "amdgpu");
}
