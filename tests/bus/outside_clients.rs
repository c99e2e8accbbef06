//! busctl and gdbus as outside clients: methods, properties, signals, and hostile input.

use std::time::Duration;

use vfiod_tests::{Rig, Signals, assert_exit, stderr, stdout};

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
fn transition_signals_narrate_a_move() {
    let rig = Rig::z77();
    let manager_signals = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.vfiod1.Manager")
        .build()
        .unwrap();
    let mut signals = Signals::subscribe(&rig, manager_signals);
    assert_exit(&rig.vfioctl(&["bind", "rx580"]), 0);
    assert_exit(&rig.vfioctl(&["bind", "00:14.0"]), 1);
    // vfiod answers a move once its TransitionFinished is out; the flush
    // also takes in anything it sent after.
    signals.wait_for(
        "both TransitionFinished signals",
        Duration::from_secs(10),
        |received| {
            received
                .iter()
                .filter(|m| {
                    m.header()
                        .member()
                        .is_some_and(|m| m == "TransitionFinished")
                })
                .count()
                == 2
        },
    );
    signals.flush();
    // One line per signal: its member and its (all string) arguments.
    let text: String = signals
        .received
        .iter()
        .map(|m| {
            let member = m
                .header()
                .member()
                .map(|m| m.to_string())
                .unwrap_or_default();
            let args: Vec<String> = match member.as_str() {
                "TransitionStarted" => {
                    let (a, b): (String, String) = m.body().deserialize().unwrap();
                    vec![a, b]
                }
                _ => {
                    let (a, b, c): (String, String, String) = m.body().deserialize().unwrap();
                    vec![a, b, c]
                }
            };
            format!("{member}({})\n", args.join(", "))
        })
        .collect();
    let members: Vec<&str> = text
        .lines()
        .map(|l| l.split_once('(').map_or(l, |(member, _)| member))
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
