//! vfioctl end to end on a private bus, against a stand-in vfiod.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{MockVfiod, PrivateBus, World, call, json, stderr, stdout, vfioctl_at, write_config};

/// A bus with the stand-in on it; `None` (test skipped) without dbus-daemon.
fn setup() -> Option<(PrivateBus, MockVfiod)> {
    let bus = PrivateBus::start()?;
    let mock = MockVfiod::start(&bus.address, World::z77());
    Some((bus, mock))
}

fn code(o: &std::process::Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

#[test]
fn list_and_status_read_every_object() {
    let Some((bus, _mock)) = setup() else { return };
    let o = bus.vfioctl(&["list"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("0000:01:00.0  amdgpu         host   -      Ellesmere [Radeon RX 580]"),
        "{text}"
    );
    assert!(
        text.contains("rx580    host   -      0000:01:00.0 0000:01:00.1"),
        "{text}"
    );

    let doc = json(&bus.vfioctl(&["--json", "list"]));
    assert_eq!(doc["devices"].as_array().unwrap().len(), 4);
    assert_eq!(
        doc["devices"][1],
        json!({
            "address": "0000:01:00.0", "vendor_id": "1002", "device_id": "67df", "class": "0x030000",
            "name": "Ellesmere [Radeon RX 580]", "driver": "amdgpu", "host_driver": "amdgpu",
            "iommu_group": 1, "state": "host", "owner": null, "boot_vga": false, "profile": "rx580",
        })
    );
    assert_eq!(
        doc["profiles"][1],
        json!({"name": "usb3", "state": "host", "owner": null, "last_error": null, "devices": ["0000:04:00.0"]})
    );

    let o = bus.vfioctl(&["status"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("vfiod 0.1.0-mock: 4 devices (0 on vfio-pci), 2 profiles\n"),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        json(&bus.vfioctl(&["status", "--json"]))["version"],
        "0.1.0-mock"
    );

    let o = bus.vfioctl(&["status", "rx580"]);
    assert!(
        stdout(&o).starts_with("profile rx580: host\n"),
        "{}",
        stdout(&o)
    );
    let doc = json(&bus.vfioctl(&["--json", "status", "04:00.0"]));
    assert_eq!(doc["device"]["address"], "0000:04:00.0");
    assert_eq!(doc["device"]["profile"], "usb3");

    let o = bus.vfioctl(&["status", "nosuch"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).starts_with("vfioctl: UnknownTarget: "),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bind_and_release_move_targets_in_order() {
    let Some((bus, mock)) = setup() else { return };
    let o = bus.vfioctl(&["bind", "rx580", "04:00.0", "--vm", "win10"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "bound rx580:\n  0000:01:00.0  vfio-pci  Ellesmere [Radeon RX 580]\n  0000:01:00.1  vfio-pci  Ellesmere HDMI Audio\n\
         bound 04:00.0:\n  0000:04:00.0  vfio-pci  uPD720200 USB 3.0\n"
    );
    // Piped stderr: no progress, no subscription noise.
    assert_eq!(stderr(&o), "");
    assert_eq!(
        mock.calls(),
        [
            call("Bind", "rx580", &[("vm", "win10")]),
            call("Bind", "04:00.0", &[("vm", "win10")])
        ]
    );

    let doc = json(&bus.vfioctl(&[
        "--json",
        "release",
        "rx580",
        "--vm",
        "win10",
        "--timeout-ms",
        "3000",
    ]));
    assert_eq!(doc["action"], "release");
    assert_eq!(doc["done"][0]["devices"][0]["driver"], "amdgpu");
    assert!(doc.get("error").is_none());
    assert_eq!(
        mock.calls()[2],
        call(
            "Release",
            "rx580",
            &[("vm", "win10"), ("timeout_ms", "3000")]
        )
    );

    let o = bus.vfioctl(&["bind", "--force", "usb3"]);
    assert_eq!(code(&o), 1, "the card is win10's: {}", stdout(&o));
    assert!(
        stderr(&o).starts_with("vfioctl: Conflict: 0000:04:00.0 is taken by \"win10\""),
        "{}",
        stderr(&o)
    );
    assert_eq!(mock.calls()[3], call("Bind", "usb3", &[("force", "true")]));
}

#[test]
fn the_first_failure_stops_and_says_what_was_done() {
    let Some((bus, mock)) = setup() else { return };
    let o = bus.vfioctl(&["bind", "rx580", "00:14.0", "usb3"]);
    assert_eq!(code(&o), 1);
    let err = stderr(&o);
    assert!(
        err.contains("vfioctl: Protected: cannot bind 0000:00:14.0: the keyboard"),
        "{err}"
    );
    assert!(
        err.contains("vfioctl: bind 00:14.0 failed; already bound: rx580; not attempted: usb3"),
        "{err}"
    );
    assert!(stdout(&o).starts_with("bound rx580:\n"), "{}", stdout(&o));
    assert_eq!(mock.calls().len(), 2);

    let o = bus.vfioctl(&["--json", "bind", "00:14.0"]);
    assert_eq!(code(&o), 1);
    let doc = json(&o);
    assert_eq!(doc["error"]["name"], "org.vfiod1.Error.Protected");
    assert_eq!(doc["done"], json!([]));

    let o = bus.vfioctl(&["bind", "denied"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("vfioctl: AccessDenied: "),
        "{}",
        stderr(&o)
    );
}

#[test]
fn check_exit_status_follows_failures() {
    let Some((bus, _mock)) = setup() else { return };
    let o = bus.vfioctl(&["check"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "ok    iommu      IOMMU groups: 14 (intel_iommu=on)\nwarn  qemu.user  qemu runs as nobody: it cannot read OVMF\n"
    );
    let o = bus.vfioctl(&["check", "rx580", "--json"]);
    assert_eq!(code(&o), 1);
    assert_eq!(
        json(&o)[0],
        json!({"id": "group.1", "severity": "fail", "message": "group 1 also holds 0000:00:01.0 on pcieport"})
    );
    let o = bus.vfioctl(&["check", "nosuch"]);
    assert_eq!(code(&o), 1);
}

#[test]
fn an_absent_daemon_or_bus_exits_3() {
    let Some(bus) = PrivateBus::start() else {
        return;
    };
    for args in [
        &["list"][..],
        &["status"],
        &["bind", "rx580"],
        &["check"],
        &["status", "rx580"],
    ] {
        let o = bus.vfioctl(args);
        assert_eq!(code(&o), 3, "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("vfiod is not reachable"),
            "{}",
            stderr(&o)
        );
    }
    let o = bus.vfioctl(&["--json", "list"]);
    assert_eq!(
        json(&o)["error"]["name"],
        "org.freedesktop.DBus.Error.ServiceUnknown"
    );

    let o = vfioctl_at("unix:path=/nonexistent/bus", &["list"], "");
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("vfioctl: Unreachable: cannot connect to the system bus"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn usage_errors_exit_2_with_json_too() {
    let o = vfioctl_at("unix:path=/nonexistent/bus", &["--json", "bind"], "");
    assert_eq!(code(&o), 2);
    assert_eq!(json(&o)["error"]["name"], "vfioctl.Usage");
    let o = vfioctl_at("unix:path=/nonexistent/bus", &["frob"], "");
    assert_eq!(code(&o), 2);
    assert_eq!(stdout(&o), "");
}

const WIN10: &str = "<domain type='kvm'><name>win10</name><devices>\
  <hostdev mode='subsystem' type='pci' managed='no'><source><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source></hostdev>\
  <hostdev mode='subsystem' type='pci' managed='no'><source><address domain='0x0000' bus='0x04' slot='0x00' function='0x0'/></source></hostdev>\
  </devices></domain>";

const CONFIG: &str =
    "[profiles.rx580]\ndevices = [\"0000:01:00.0\", \"0000:01:00.1\"]\nvms = [\"win10\"]\n";

#[test]
fn the_hook_binds_for_prepare_and_releases_at_the_end() {
    let Some((bus, mock)) = setup() else { return };
    let config = write_config(&bus.dir.0, CONFIG);
    let config = config.to_str().unwrap();
    let hook = |op: &str, sub: &str| {
        bus.vfioctl_with_stdin(
            &["libvirt-hook", "--config", config, "win10", op, sub, "-"],
            WIN10,
        )
    };

    for (op, sub) in [("start", "begin"), ("started", "begin"), ("stopped", "end")] {
        assert_eq!(code(&hook(op, sub)), 0);
    }
    assert!(mock.calls().is_empty());

    let o = hook("prepare", "begin");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        mock.calls(),
        [
            call("Bind", "rx580", &[("vm", "win10")]),
            call("Bind", "0000:04:00.0", &[("vm", "win10")])
        ]
    );
    let o = hook("release", "end");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        mock.calls()[2..],
        [
            call("Release", "0000:04:00.0", &[("vm", "win10")]),
            call("Release", "rx580", &[("vm", "win10")])
        ]
    );
    assert!(
        mock.world
            .lock()
            .unwrap()
            .devices
            .values()
            .all(|d| d.state == "host")
    );
}

#[test]
fn a_failed_prepare_releases_what_it_bound() {
    let Some((bus, mock)) = setup() else { return };
    let config = write_config(&bus.dir.0, CONFIG);
    let xml = WIN10.replace("bus='0x04' slot='0x00'", "bus='0x00' slot='0x14'");
    let o = bus.vfioctl_with_stdin(
        &[
            "libvirt-hook",
            "--config",
            config.to_str().unwrap(),
            "win10",
            "prepare",
            "begin",
            "-",
        ],
        &xml,
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("vfioctl: Protected: cannot bind 0000:00:14.0"),
        "{err}"
    );
    assert!(err.contains("bound, then released again: rx580"), "{err}");
    assert_eq!(
        mock.calls(),
        [
            call("Bind", "rx580", &[("vm", "win10")]),
            call("Bind", "0000:00:14.0", &[("vm", "win10")]),
            call("Release", "rx580", &[("vm", "win10")]),
        ]
    );
}

#[test]
fn release_leaves_another_vms_devices_alone() {
    let Some((bus, mock)) = setup() else { return };
    let config = write_config(&bus.dir.0, CONFIG);
    let o = bus.vfioctl(&["bind", "usb3", "--vm", "linux"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = bus.vfioctl_with_stdin(
        &[
            "libvirt-hook",
            "--config",
            config.to_str().unwrap(),
            "win10",
            "release",
            "end",
            "-",
        ],
        WIN10,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("vfioctl: 0000:04:00.0 left alone: Conflict:"),
        "{}",
        stderr(&o)
    );
    let world = mock.world.lock().unwrap();
    assert_eq!(world.devices["0000:04:00.0"].owner, "linux");
}

#[test]
fn the_hook_passes_at_once_when_nothing_is_for_vfiod() {
    // No bus at all: a domain with nothing for vfiod must not need one.
    let plain = "<domain><name>plain</name><devices><disk type='file'/></devices></domain>";
    for (op, sub) in [("prepare", "begin"), ("release", "end"), ("start", "begin")] {
        let o = vfioctl_at(
            "unix:path=/nonexistent/bus",
            &["libvirt-hook", "plain", op, sub, "-"],
            plain,
        );
        assert_eq!(code(&o), 0, "{op} {sub}: {}", stderr(&o));
    }
    // Other operations do not even read the XML.
    let o = vfioctl_at(
        "unix:path=/nonexistent/bus",
        &["libvirt-hook", "x", "started", "begin", "-"],
        "garbage",
    );
    assert_eq!(code(&o), 0);
    // prepare with garbage: usage, nothing moved, no bus needed to say so.
    let o = vfioctl_at(
        "unix:path=/nonexistent/bus",
        &["libvirt-hook", "x", "prepare", "begin", "-"],
        "<domain>",
    );
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).starts_with("vfioctl: InvalidXml: invalid domain XML on stdin"),
        "{}",
        stderr(&o)
    );
    // With work to do and no daemon: the VM must not start.
    let o = vfioctl_at(
        "unix:path=/nonexistent/bus",
        &["libvirt-hook", "win10", "prepare", "begin", "-"],
        WIN10,
    );
    assert_eq!(code(&o), 3, "{}", stderr(&o));
}

#[test]
fn watch_prints_one_line_per_change() {
    let Some((bus, mock)) = setup() else { return };
    let mut watch = Command::new(env!("CARGO_BIN_EXE_vfioctl"))
        .args(["watch", "--json"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vfioctl watch");
    // A reader thread, so that waiting for a line can time out.
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Nothing says when watch has subscribed: move usb3 back and forth
    // until it reports (the stand-in signals before it replies).
    let start = Instant::now();
    let first = loop {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "watch printed nothing"
        );
        for action in ["bind", "release"] {
            let o = bus.vfioctl(&[action, "usb3"]);
            assert_eq!(code(&o), 0, "{}", stderr(&o));
        }
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            break line;
        }
    };
    let event: serde_json::Value = serde_json::from_str(&first).expect("JSON line");
    assert!(event["time"].as_str().unwrap().ends_with('Z'));
    let mut events = vec![event];
    // One bind or release makes at least five: started, progress, changed, finished.
    while events.len() < 5 {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("more lines");
        events.push(serde_json::from_str(&line).expect("JSON line"));
    }
    assert!(mock.calls().len() >= 2);
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"transition-progress"), "{kinds:?}");
    let changed = events
        .iter()
        .find(|e| e["event"] == "changed")
        .expect("a property change");
    assert_eq!(changed["object"], "/org/vfiod1/device/0000_04_00_0");
    assert_eq!(changed["interface"], "org.vfiod1.Device");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watch.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = watch.wait().expect("watch ends");
    assert_eq!(status.code(), Some(0), "SIGTERM ends watch cleanly");
}
