//! The kernel changing under vfiod (behind its back, hung, after a kill) and reloads.

use std::time::{Duration, Instant};

use vfiod_tests::{Rig, assert_exit, stderr, stdout, value_of};

#[test]
fn a_driver_changed_behind_our_back_shows_up_within_100ms() {
    let rig = Rig::z77();
    let mut monitor = std::process::Command::new("busctl")
        .args(["--system", "monitor", "--json=short", "org.vfiod1"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &rig.address)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let changed_at = Instant::now();
    rig.simulate("SetDriver", "ss", &["0000:03:00.0", ""]);
    let mut seen = None;
    while changed_at.elapsed() < Duration::from_secs(2) {
        if rig.driver("03:00.0").is_empty() {
            seen = Some(changed_at.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let seen = seen.expect("Driver never became empty");
    assert!(seen < Duration::from_millis(100), "seen after {seen:?}");
    assert_eq!(rig.device_property("03:00.0", "State"), "unbound");
    std::thread::sleep(Duration::from_millis(100));
    let _ = monitor.kill();
    let output = monitor.wait_with_output().unwrap();
    let text = stdout(&output);
    let signal = text
        .lines()
        .find(|l| l.contains("PropertiesChanged") && l.contains("/org/vfiod1/device/0000_03_00_0"))
        .unwrap_or_else(|| panic!("no PropertiesChanged for 03:00.0 in:\n{text}"));
    assert!(
        signal.contains("Driver") && signal.contains("unbound"),
        "{signal}"
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
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            if exists(&rig) == want {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("object present = {want} never happened");
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
    std::thread::scope(|s| {
        let mover = s.spawn(|| rig.vfioctl(&["bind", "rx580"]));
        std::thread::sleep(Duration::from_millis(400));
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
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.device_property("01:00.1", "State") == "stuck" {
        assert!(Instant::now() < deadline, "still stuck: {}", rig.log());
        std::thread::sleep(Duration::from_millis(20));
    }
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

#[test]
fn sighup_reloads_the_config_and_a_bad_one_is_refused() {
    let dir = vfiod_tests::TempDir::new();
    let config = dir.write(
        "vfiod.toml",
        &std::fs::read_to_string(vfiod_tests::machine("z77-rx580.vfiod.toml")).unwrap(),
    );
    let rig = Rig::start(&vfiod_tests::machine("z77-rx580.toml"), &config);
    let profiles = |rig: &Rig| {
        stdout(&rig.busctl(&[
            "get-property",
            "org.vfiod1",
            "/org/vfiod1",
            "org.vfiod1.Manager",
            "Profiles",
        ]))
    };
    let hup = |rig: &Rig| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(rig.vfiod_pid().unwrap() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    let wait_for = |rig: &Rig, want: &dyn Fn(&str) -> bool| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            let now = profiles(rig);
            if want(&now) {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("profiles never changed: {}", profiles(rig));
    };
    assert!(profiles(&rig).contains("rx580"));

    // A new profile appears, a removed one disappears.
    std::fs::write(
        &config,
        "[profiles.gpu-2]\ndevices = [\"01:00.0\", \"01:00.1\"]\nvms = [\"win11\"]\n",
    )
    .unwrap();
    hup(&rig);
    let now = wait_for(&rig, &|p| p.contains("gpu_2d2"));
    assert!(!now.contains("rx580"), "{now}");
    let out = rig.busctl(&[
        "get-property",
        "org.vfiod1",
        "/org/vfiod1/profile/gpu_2d2",
        "org.vfiod1.Profile",
        "Name",
    ]);
    assert_eq!(value_of(&out), "gpu-2");
    assert!(
        !rig.busctl(&["introspect", "org.vfiod1", "/org/vfiod1/profile/rx580"])
            .status
            .success()
    );
    assert_exit(&rig.vfioctl(&["bind", "gpu-2"]), 0);

    // A bad file is refused with its line; the old config stays.
    std::fs::write(
        &config,
        "[profiles.usb3]\nids = [\"1033:0194\"]\ncolour = \"red\"\n",
    )
    .unwrap();
    hup(&rig);
    let start = Instant::now();
    while !rig.log().contains("new configuration refused")
        && start.elapsed() < Duration::from_secs(3)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = rig.log();
    assert!(
        log.contains("new configuration refused")
            && log.contains("line 3")
            && log.contains("colour"),
        "{log}"
    );
    assert!(profiles(&rig).contains("gpu_2d2"));
    assert_exit(&rig.vfioctl(&["release", "gpu-2"]), 0);
}
