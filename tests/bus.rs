//! vfiod on a private bus: the real `vfiod --machine` and `vfioctl`
//! binaries, with busctl and gdbus as outside clients (DESIGN §4, §5).

use std::time::{Duration, Instant};

use vfiod_tests::{Rig, assert_exit, is_root, stderr, stdout, value_of};

#[test]
fn busctl_binds_and_releases_and_reads_properties() {
    let rig = Rig::z77();
    let out = rig.busctl(&[
        "call",
        "org.vfiod1",
        "/org/vfiod1",
        "org.vfiod1.Manager",
        "Bind",
        "sa{sv}",
        "rx580",
        "1",
        "vm",
        "s",
        "win10",
    ]);
    assert_exit(&out, 0);
    assert_eq!(
        stdout(&out).trim(),
        r#"ao 2 "/org/vfiod1/device/0000_01_00_0" "/org/vfiod1/device/0000_01_00_1""#
    );
    assert_eq!(rig.driver("0000:01:00.0"), "vfio-pci");
    assert_eq!(rig.driver("0000:01:00.1"), "vfio-pci");
    assert_eq!(rig.device_property("0000:01:00.0", "State"), "vfio");
    assert_eq!(rig.device_property("0000:01:00.0", "Owner"), "win10");
    assert_eq!(rig.device_property("0000:01:00.0", "HostDriver"), "amdgpu");
    assert_eq!(rig.device_property("0000:01:00.0", "IommuGroup"), "1");
    assert_eq!(rig.device_property("0000:01:00.0", "VendorId"), "4098");
    assert_eq!(rig.device_property("0000:06:00.0", "BootVga"), "true");
    let profile = rig.busctl(&[
        "get-property",
        "org.vfiod1",
        "/org/vfiod1/profile/rx580",
        "org.vfiod1.Profile",
        "State",
        "Owner",
        "LastError",
    ]);
    assert_eq!(stdout(&profile), "s \"vfio\"\ns \"win10\"\ns \"\"\n");

    let out = rig.busctl(&[
        "call",
        "org.vfiod1",
        "/org/vfiod1/profile/rx580",
        "org.vfiod1.Profile",
        "Release",
        "a{sv}",
        "0",
    ]);
    assert_exit(&out, 0);
    assert_eq!(rig.driver("0000:01:00.0"), "amdgpu");
    assert_eq!(rig.driver("0000:01:00.1"), "snd_hda_intel");
    assert_eq!(rig.device_property("0000:01:00.1", "Owner"), "");
}

#[test]
fn gdbus_calls_and_managed_objects() {
    let rig = Rig::z77();
    let out = rig.gdbus(&[
        "--object-path",
        "/org/vfiod1",
        "--method",
        "org.vfiod1.Manager.Bind",
        "usb3",
        "{}",
    ]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("/org/vfiod1/device/0000_03_00_0"),
        "{}",
        stdout(&out)
    );
    assert_eq!(rig.driver("03:00.0"), "vfio-pci");

    let out = rig.gdbus(&[
        "--object-path",
        "/org/vfiod1",
        "--method",
        "org.freedesktop.DBus.ObjectManager.GetManagedObjects",
    ]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert_eq!(text.matches("'org.vfiod1.Device'").count(), 23, "{text}");
    assert!(
        text.contains("objectpath '/org/vfiod1/profile/usb3'")
            || text.contains("'/org/vfiod1/profile/usb3'"),
        "{text}"
    );
    assert!(text.contains("'Driver': <'vfio-pci'>"), "{text}");
    assert!(text.contains("'State': <'vfio'>"), "{text}");

    let out = rig.gdbus(&[
        "--object-path",
        "/org/vfiod1",
        "--method",
        "org.vfiod1.Manager.Release",
        "03:00.0",
        "{'timeout_ms': <uint32 5000>}",
    ]);
    assert_exit(&out, 0);
    assert_eq!(rig.driver("03:00.0"), "xhci_hcd");

    // Errors keep their names on the wire.
    let out = rig.gdbus(&[
        "--object-path",
        "/org/vfiod1",
        "--method",
        "org.vfiod1.Manager.Bind",
        "00:14.0",
        "{}",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("org.vfiod1.Error.Protected"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn manager_properties_and_check() {
    let rig = Rig::z77();
    let out = rig.busctl(&[
        "get-property",
        "org.vfiod1",
        "/org/vfiod1",
        "org.vfiod1.Manager",
        "Version",
        "Profiles",
    ]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(
        text.starts_with("s \"0.")
            && text.contains(r#"ao 2 "/org/vfiod1/profile/rx580" "/org/vfiod1/profile/usb3""#),
        "{text}"
    );
    let out = rig.busctl(&[
        "call",
        "org.vfiod1",
        "/org/vfiod1",
        "org.vfiod1.Manager",
        "Check",
        "s",
        "00:1f.2",
    ]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("\"fail\"") && stdout(&out).contains("mounted"),
        "{}",
        stdout(&out)
    );
}

fn error_name(out: &std::process::Output) -> String {
    // busctl: "Call failed: <message>"; the name comes with --verbose? No:
    // gdbus prints "GDBus.Error:NAME: message".
    stderr(out)
}

#[test]
fn hostile_input_gets_clear_errors_and_the_daemon_lives() {
    let mut rig = Rig::z77();
    let long = "x".repeat(100_000);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["org.vfiod1.Manager.Bind", "nosuch", "{}"],
            "org.vfiod1.Error.UnknownTarget",
        ),
        (
            vec!["org.vfiod1.Manager.Bind", "09:00.0", "{}"],
            "org.vfiod1.Error.UnknownTarget",
        ),
        (
            vec!["org.vfiod1.Manager.Bind", "01:00.9", "{}"],
            "org.freedesktop.DBus.Error.InvalidArgs",
        ),
        (
            vec!["org.vfiod1.Manager.Bind", "", "{}"],
            "org.freedesktop.DBus.Error.InvalidArgs",
        ),
        (
            vec!["org.vfiod1.Manager.Bind", "../../sys", "{}"],
            "org.freedesktop.DBus.Error.InvalidArgs",
        ),
        (
            vec!["org.vfiod1.Manager.Bind", "rx580/..", "{}"],
            "org.freedesktop.DBus.Error.InvalidArgs",
        ),
        (
            vec!["org.vfiod1.Manager.Bind", &long, "{}"],
            "org.freedesktop.DBus.Error.InvalidArgs",
        ),
        (
            vec!["org.vfiod1.Manager.Bind", "rx580", "{'frobnicate': <true>}"],
            "org.freedesktop.DBus.Error.InvalidArgs",
        ),
        (
            vec!["org.vfiod1.Manager.Bind", "rx580", "{'force': <'yes'>}"],
            "org.freedesktop.DBus.Error.InvalidArgs",
        ),
        (
            vec!["org.vfiod1.Manager.Bind", "rx580", "{'vm': <uint32 3>}"],
            "org.freedesktop.DBus.Error.InvalidArgs",
        ),
        (
            vec!["org.vfiod1.Manager.Bind", "rx580", "{'vm': <'a/b'>}"],
            "org.freedesktop.DBus.Error.InvalidArgs",
        ),
        (
            vec![
                "org.vfiod1.Manager.Bind",
                "rx580",
                "{'timeout_ms': <int64 5>}",
            ],
            "org.freedesktop.DBus.Error.InvalidArgs",
        ),
        (
            vec!["org.vfiod1.Manager.Bind", "rx580"],
            "org.freedesktop.DBus.Error.InvalidArgs",
        ),
        (
            vec!["org.vfiod1.Manager.Bind", "7", "{}"],
            "org.vfiod1.Error.UnknownTarget",
        ),
        (
            vec!["org.vfiod1.Manager.Check", "../x"],
            "org.freedesktop.DBus.Error.InvalidArgs",
        ),
        (
            vec!["org.vfiod1.Manager.Release", "rx580", "{'force': <1>}"],
            "org.freedesktop.DBus.Error.InvalidArgs",
        ),
    ];
    for (call, expected) in cases {
        let mut args = vec!["--object-path", "/org/vfiod1", "--method"];
        args.extend(call.iter().copied());
        let out = rig.gdbus(&args);
        assert!(!out.status.success(), "{call:?} succeeded");
        let err = error_name(&out);
        assert!(
            err.contains(expected),
            "{:?}: expected {expected}, got {err}",
            &call[..call.len().min(2)]
        );
        assert!(rig.vfiod_alive(), "vfiod died on {call:?}");
    }
    // Wrong signature entirely, through busctl.
    let out = rig.busctl(&[
        "call",
        "org.vfiod1",
        "/org/vfiod1",
        "org.vfiod1.Manager",
        "Bind",
        "su",
        "rx580",
        "3",
    ]);
    assert!(!out.status.success());
    // Nothing moved.
    for address in ["0000:01:00.0", "0000:01:00.1", "0000:03:00.0"] {
        assert_ne!(rig.driver(address), "vfio-pci", "{address} moved");
    }
    assert!(rig.vfiod_alive());
    assert_exit(
        &rig.busctl(&[
            "get-property",
            "org.vfiod1",
            "/org/vfiod1",
            "org.vfiod1.Manager",
            "Version",
        ]),
        0,
    );
}

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
fn transition_signals_narrate_a_move() {
    let rig = Rig::z77();
    let mut monitor = std::process::Command::new("busctl")
        .args(["--system", "monitor", "--json=short", "org.vfiod1"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &rig.address)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_exit(&rig.vfioctl(&["bind", "rx580"]), 0);
    assert_exit(&rig.vfioctl(&["bind", "00:14.0"]), 1);
    std::thread::sleep(Duration::from_millis(200));
    let _ = monitor.kill();
    let text = stdout(&monitor.wait_with_output().unwrap());
    let members: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            [
                "TransitionStarted",
                "TransitionProgress",
                "TransitionFinished",
            ]
            .into_iter()
            .find(|m| l.contains(&format!("\"member\":\"{m}\"")))
        })
        .collect();
    assert_eq!(
        members,
        [
            "TransitionStarted",
            "TransitionProgress",
            "TransitionProgress",
            "TransitionProgress",
            "TransitionProgress",
            "TransitionProgress",
            "TransitionProgress",
            "TransitionFinished",
            "TransitionStarted",
            "TransitionFinished"
        ],
        "{text}"
    );
    assert!(text.contains("unbind amdgpu"), "{text}");
    assert!(
        text.contains("org.vfiod1.Error.Protected: cannot bind 00:14.0"),
        "{text}"
    );
}

#[test]
fn vfioctl_exit_codes() {
    let rig = Rig::z77();
    assert_exit(&rig.vfioctl(&["bind", "rx580"]), 0);
    let out = rig.vfioctl(&["bind", "00:1f.2"]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("Protected") && stderr(&out).contains("/home"),
        "{}",
        stderr(&out)
    );
    assert_exit(&rig.vfioctl(&["bind"]), 2);
    assert_exit(&rig.vfioctl(&["frobnicate"]), 2);
    assert_exit(&rig.vfioctl(&["bind", "rx580", "--frobnicate"]), 2);
    assert_exit(&rig.vfioctl(&["--json", "status", "rx580"]), 0);
    let json: serde_json::Value =
        serde_json::from_slice(&rig.vfioctl(&["--json", "status", "rx580"]).stdout).unwrap();
    assert!(json.to_string().contains("vfio-pci"), "{json}");
    // Several targets: the first failure stops the command and says what was done.
    let out = rig.vfioctl(&["bind", "usb3", "00:14.0", "06:00.0"]);
    assert_exit(&out, 1);
    assert_eq!(rig.driver("03:00.0"), "vfio-pci");
    assert_ne!(rig.driver("06:00.0"), "vfio-pci");
    // No vfiod on the bus: unreachable.
    let mut rig = rig;
    rig.kill_vfiod();
    assert_exit(&rig.vfioctl(&["status"]), 3);
    let out = std::process::Command::new(vfiod_tests::bin("vfioctl"))
        .arg("status")
        .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .output()
        .unwrap();
    assert_exit(&out, 3);
}

#[test]
fn an_unprivileged_caller_reads_but_may_not_move() {
    if !is_root() {
        eprintln!("skipped: needs root to run a client as another user (CI runs as root)");
        return;
    }
    let rig = Rig::z77();
    let out = rig.as_nobody(
        "busctl",
        &[
            "--system",
            "get-property",
            "org.vfiod1",
            "/org/vfiod1/device/0000_01_00_0",
            "org.vfiod1.Device",
            "Driver",
        ],
    );
    assert_exit(&out, 0);
    assert_eq!(value_of(&out), "amdgpu");
    let out = rig.as_nobody(
        "busctl",
        &[
            "--system",
            "call",
            "org.vfiod1",
            "/org/vfiod1",
            "org.vfiod1.Manager",
            "Bind",
            "sa{sv}",
            "rx580",
            "0",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Access denied") || stderr(&out).contains("polkitd is not running"),
        "{}",
        stderr(&out)
    );
    let vfioctl = vfiod_tests::bin("vfioctl");
    let out = rig.as_nobody(vfioctl.to_str().unwrap(), &["bind", "rx580"]);
    assert_exit(&out, 4);
    let out = rig.as_nobody(vfioctl.to_str().unwrap(), &["status", "rx580"]);
    assert_exit(&out, 0);
    assert_eq!(rig.driver("01:00.0"), "amdgpu", "nothing moved");
    // vfiod plans while it asks, but a caller it turns away hears only
    // that, not why the move would be refused (the boot VGA's console).
    let out = rig.as_nobody(vfioctl.to_str().unwrap(), &["bind", "06:00.0"]);
    assert_exit(&out, 4);
    assert!(!stderr(&out).contains("console"), "{}", stderr(&out));
    // The denied calls left no group locked.
    assert_exit(&rig.vfioctl(&["bind", "rx580"]), 0);
    assert_eq!(rig.driver("01:00.1"), "vfio-pci");
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
fn polkit_decides_for_unprivileged_callers() {
    if !is_root() {
        eprintln!("skipped: polkitd on a private bus needs root (CI runs as root)");
        return;
    }
    let rig = Rig::z77();
    let _polkit = vfiod_tests::Polkit::start(
        &rig,
        r#"polkit.addRule(function(action, subject) {
    if (action.id == "org.vfiod1.manage") {
        if (subject.user == "nobody") return polkit.Result.YES;
        if (subject.user == "daemon") return polkit.Result.NO;
    }
});"#,
    );
    let vfioctl = vfiod_tests::bin("vfioctl");
    let vfioctl = vfioctl.to_str().unwrap();
    // Allowed by the rule.
    let out = rig.as_nobody(vfioctl, &["bind", "usb3"]);
    assert_exit(&out, 0);
    assert_eq!(rig.driver("03:00.0"), "vfio-pci");
    // Denied by the rule: AccessDenied, exit 4, nothing moved.
    let out = rig.as_user("daemon", "daemon", vfioctl, &["release", "usb3"]);
    assert_exit(&out, 4);
    assert!(stderr(&out).contains("not authorized"), "{}", stderr(&out));
    assert_eq!(rig.driver("03:00.0"), "vfio-pci");
    let out = rig.as_nobody(vfioctl, &["release", "usb3"]);
    assert_exit(&out, 0);
    assert_eq!(rig.driver("03:00.0"), "xhci_hcd");
}

#[test]
fn vfioctl_watch_prints_changes_as_they_happen() {
    use std::io::{BufRead, BufReader};
    let rig = Rig::z77();
    let mut watch = std::process::Command::new(vfiod_tests::bin("vfioctl"))
        .args(["--json", "watch"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &rig.address)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Nothing says when watch has subscribed: change a driver behind
    // vfiod's back until it reports.
    let start = Instant::now();
    let first = loop {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "watch printed nothing"
        );
        rig.simulate("SetDriver", "ss", &["0000:03:00.0", ""]);
        rig.simulate("SetDriver", "ss", &["0000:03:00.0", "xhci_hcd"]);
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            break line;
        }
    };
    let mut events: Vec<serde_json::Value> = vec![serde_json::from_str(&first).unwrap()];
    assert_exit(&rig.vfioctl(&["bind", "rx580"]), 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(300)) {
            Ok(line) => events.push(serde_json::from_str(&line).expect("one JSON object per line")),
            Err(_) if events.iter().any(|e| e["event"] == "transition-finished") => break,
            Err(_) => {}
        }
    }
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    for kind in [
        "changed",
        "transition-started",
        "transition-progress",
        "transition-finished",
    ] {
        assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
    }
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "changed" && e["object"] == "/org/vfiod1/device/0000_01_00_0"),
        "{events:?}"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watch.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert_eq!(watch.wait().unwrap().code(), Some(0));
}

#[test]
fn vfioctl_list_status_and_check() {
    let rig = Rig::z77();
    let out = rig.vfioctl(&["list"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(
        text.contains("0000:01:00.0")
            && text.contains("amdgpu")
            && text.contains("rx580")
            && text.contains("usb3"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&rig.vfioctl(&["--json", "list"]).stdout).unwrap();
    assert!(
        json.to_string().contains("\"address\":\"0000:06:00.0\""),
        "{json}"
    );
    // The Z77's [host] facts fail the OVMF check (tests/doctor.rs).
    let out = rig.vfioctl(&["check", "rx580"]);
    assert_exit(&out, 1);
    assert!(stdout(&out).contains("reset.amd-bug"), "{}", stdout(&out));
    let out = rig.vfioctl(&["--json", "check", "00:14.0"]);
    assert_exit(&out, 1);
    let findings: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(findings.to_string().contains("USB keyboard"), "{findings}");
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

#[test]
fn a_vfiod_that_holds_its_name_but_never_answers_is_unreachable() {
    let rig = Rig::z77();
    let pid = nix::unistd::Pid::from_raw(rig.vfiod_pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let start = Instant::now();
    let out = std::process::Command::new(vfiod_tests::bin("vfioctl"))
        .arg("status")
        .env("DBUS_SYSTEM_BUS_ADDRESS", &rig.address)
        .env("VFIOCTL_READ_TIMEOUT_MS", "500")
        .output()
        .unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_exit(&out, 3);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(stderr(&out).contains("no answer"), "{}", stderr(&out));
}

#[test]
fn vfioctl_shows_where_each_moved_device_is() {
    let rig = Rig::z77();
    let out = rig.vfioctl(&["bind", "rx580"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.starts_with("bound rx580:\n"), "{text}");
    assert!(
        text.contains(
            "0000:01:00.0  vfio-pci  Ellesmere [Radeon RX 470/480/570/570X/580/580X/590]"
        ),
        "{text}"
    );
    assert!(
        text.contains("0000:01:00.1  vfio-pci  Ellesmere HDMI Audio"),
        "{text}"
    );
    let out = rig.vfioctl(&["release", "rx580"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("0000:01:00.0  amdgpu  "), "{text}");
    assert!(text.contains("0000:01:00.1  snd_hda_intel  "), "{text}");
}

/// vfiod sends the caller of a move, and no one else, each moved device's
/// properties just before the answer: what GetAll would say, without the
/// round trip.
#[test]
fn a_mover_alone_is_told_every_property_of_its_devices_before_the_answer() {
    use std::collections::HashMap;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};
    use vfiod_dbus::Direction;
    use vfiod_dbus::proxy::{ManagerProxy, Options};
    use zbus::export::futures_core::Stream;
    use zbus::message::Type;
    use zbus::{MatchRule, MessageStream, OwnedVariant};

    type Properties = HashMap<String, OwnedVariant>;
    fn queued(stream: &mut MessageStream) -> Vec<zbus::Message> {
        let mut messages = Vec::new();
        while let Poll::Ready(Some(Ok(m))) =
            Pin::new(&mut *stream).poll_next(&mut Context::from_waker(Waker::noop()))
        {
            messages.push(m);
        }
        messages
    }
    fn told_in(messages: &[zbus::Message]) -> Vec<(String, Option<String>, String, Properties)> {
        messages
            .iter()
            .filter(|m| {
                let h = m.header();
                h.message_type() == Type::Signal
                    && h.member().is_some_and(|m| m == "PropertiesChanged")
            })
            .map(|m| {
                let h = m.header();
                let (_, properties, _): (String, Properties, Vec<String>) =
                    m.body().deserialize().unwrap();
                (
                    h.path().unwrap().to_string(),
                    h.destination().map(|d| d.to_string()),
                    h.sender().unwrap().to_string(),
                    properties,
                )
            })
            .collect()
    }

    let rig = Rig::z77();
    rig.block_on(async {
        let (caller, bystander) = (rig.connect().await, rig.connect().await);
        let every_change = MatchRule::builder()
            .msg_type(Type::Signal)
            .member("PropertiesChanged")
            .build()
            .unwrap();
        let mut seen = MessageStream::for_match_rule(every_change, &bystander, None)
            .await
            .unwrap();
        let mut inbox = MessageStream::from(&caller);
        let manager = ManagerProxy::new(&caller).await.unwrap();
        let (paths, reply) = manager
            .move_answered(Direction::Bind, "rx580", Options::new())
            .await
            .unwrap();
        let daemon = reply.header().sender().unwrap().to_string();
        let me = caller.unique_name().unwrap().to_string();
        let told = told_in(&queued(&mut inbox));
        assert_eq!(paths.len(), 2);
        for path in &paths {
            let (_, _, _, properties) = told
                .iter()
                .find(|(p, to, from, _)| {
                    p == path.as_str() && to.as_deref() == Some(&me) && *from == daemon
                })
                .unwrap_or_else(|| panic!("nothing told of {path}: {told:?}"));
            let all: Properties = caller
                .call_method(
                    Some("org.vfiod1"),
                    path.as_str(),
                    Some("org.freedesktop.DBus.Properties"),
                    "GetAll",
                    &("org.vfiod1.Device"),
                )
                .await
                .unwrap()
                .body()
                .deserialize()
                .unwrap();
            assert_eq!(properties.len(), 11, "{properties:?}");
            assert_eq!(*properties, all);
            let text = |name: &str| String::try_from(all[name].try_clone().unwrap()).unwrap();
            assert_eq!(text("Driver"), "vfio-pci");
            assert_eq!(text("State"), "vfio");
        }
        // The bystander sees the changes, never the caller's copy.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seen = told_in(&queued(&mut seen));
        assert!(!seen.is_empty(), "the bystander saw no change at all");
        assert!(seen.iter().all(|(_, to, _, _)| to.is_none()), "{seen:?}");
    });
}
