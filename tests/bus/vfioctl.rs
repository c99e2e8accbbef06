//! vfioctl against the daemon: exit codes, output, watch.

use std::time::{Duration, Instant};

use vfiod_tests::{Rig, assert_exit, stderr, stdout};

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
            assert_eq!(properties.len(), 13, "{properties:?}");
            assert_eq!(*properties, all);
            let text = |name: &str| String::try_from(all[name].try_clone().unwrap()).unwrap();
            assert_eq!(text("Driver"), "vfio-pci");
            assert_eq!(text("State"), "vfio");
        }
        // The bystander sees the changes, never the caller's copy. vfiod
        // sends the changes before its answer to the move, and the bus keeps
        // one sender's messages in order: once vfiod has answered the
        // bystander's Ping, every change is in the bystander's queue.
        vfiod_tests::round_trip_to_vfiod(&bystander).await;
        let seen = told_in(&queued(&mut seen));
        assert!(!seen.is_empty(), "the bystander saw no change at all");
        assert!(seen.iter().all(|(_, to, _, _)| to.is_none()), "{seen:?}");
    });
}
