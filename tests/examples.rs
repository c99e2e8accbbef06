//! The desktop scripts of examples/ against vfiod on a private bus:
//! `vfiod-busctl` (busctl alone) and `vfiod-dbus.py` (python3-dbus with the
//! GLib main loop).

use std::process::{Command, Output};

use vfiod_tests::{Rig, assert_exit, repo, root_for, stderr, stdout};

fn example(name: &str) -> String {
    repo().join("examples").join(name).display().to_string()
}

/// The Python the script's `#!/usr/bin/python3` names, with python3-dbus.
fn system_python_has_dbus() {
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import dbus, dbus.mainloop.glib; from gi.repository import GLib",
        ])
        .output()
        .expect("/usr/bin/python3 (Debian: apt-get install python3)");
    assert!(
        out.status.success(),
        "python3-dbus and python3-gi are missing (Debian: apt-get install python3-dbus python3-gi): {}",
        stderr(&out)
    );
}

/// The lines both scripts print for a move of `target` with the z77's
/// `devices`, in order: started, one progress line or more per device,
/// finished.
fn assert_signals(text: &str, target: &str, direction: &str, devices: &[&str]) {
    let started = format!("started {target} {direction}");
    let finished = format!("finished {target} {direction}: ok");
    let lines: Vec<&str> = text.lines().collect();
    let first = lines
        .iter()
        .position(|l| *l == started)
        .unwrap_or_else(|| panic!("no {started:?} in:\n{text}"));
    let last = lines
        .iter()
        .position(|l| *l == finished)
        .unwrap_or_else(|| panic!("no {finished:?} in:\n{text}"));
    assert!(first < last, "{text}");
    for device in devices {
        let progress = format!("progress {target} 0000:{device}: ");
        assert!(
            lines[first..last].iter().any(|l| l.starts_with(&progress)),
            "no {progress:?} between start and finish:\n{text}"
        );
    }
}

fn assert_bound_lines(text: &str, devices: &[&str], owner: &str) {
    assert!(
        text.contains(&format!("bound: {} device(s)\n", devices.len())),
        "{text}"
    );
    for device in devices {
        let line = format!("  0000:{device}  driver=vfio-pci  state=vfio  owner={owner}\n");
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
    }
}

fn run(rig: &Rig, program: &str, args: &[&str]) -> Output {
    rig.run(program, args)
}

#[test]
fn the_busctl_script_binds_shows_and_releases_a_profile() {
    let rig = Rig::z77();
    let out = run(&rig, &example("vfiod-busctl"), &["rx580", "win10"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert_bound_lines(&text, &["01:00.0", "01:00.1"], "win10");
    assert!(text.ends_with("released: rx580\n"), "{text}");
    if root_for("busctl monitor on a system bus") {
        // busctl monitor (root only on a system bus) follows the signals.
        assert_signals(&text, "rx580", "bind", &["01:00.0", "01:00.1"]);
        assert_signals(&text, "rx580", "release", &["01:00.0", "01:00.1"]);
        // The bind's signals come before its status.
        assert!(text.find("finished rx580 bind").unwrap() < text.find("bound:").unwrap());
    }
    assert_eq!(rig.driver("01:00.0"), "amdgpu");
    assert_eq!(rig.driver("01:00.1"), "snd_hda_intel");

    // A PCI address, no VM.
    let out = run(&rig, &example("vfiod-busctl"), &["03:00.0"]);
    assert_exit(&out, 0);
    assert_bound_lines(&stdout(&out), &["03:00.0"], "-");
    assert_eq!(rig.driver("03:00.0"), "xhci_hcd");
}

#[test]
fn the_busctl_script_reports_a_refusal_and_a_bad_command_line() {
    let rig = Rig::z77();
    let out = run(&rig, &example("vfiod-busctl"), &["nosuch"]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("no profile named"),
        "{}",
        stderr(&out)
    );
    if root_for("busctl monitor on a system bus") {
        assert!(
            stdout(&out).contains(
                "finished nosuch bind: org.vfiod1.Error.UnknownTarget: no profile named \"nosuch\""
            ),
            "{}",
            stdout(&out)
        );
    }
    assert_exit(&run(&rig, &example("vfiod-busctl"), &[]), 2);
    assert_exit(&run(&rig, &example("vfiod-busctl"), &["a", "b", "c"]), 2);
}

#[test]
fn the_python_script_binds_releases_and_prints_the_signals_as_they_arrive() {
    system_python_has_dbus();
    let rig = Rig::z77();
    let out = run(&rig, &example("vfiod-dbus.py"), &["usb3", "--vm", "win10"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert_signals(&text, "usb3", "bind", &["03:00.0"]);
    assert_signals(&text, "usb3", "release", &["03:00.0"]);
    assert_bound_lines(&text, &["03:00.0"], "win10");
    // Signals of the bind, the status, then the release's signals.
    let bound = text.find("bound:").unwrap();
    assert!(text.find("finished usb3 bind").unwrap() < bound, "{text}");
    assert!(bound < text.find("started usb3 release").unwrap(), "{text}");
    assert!(text.ends_with("released: usb3\n"), "{text}");
    assert_eq!(rig.driver("03:00.0"), "xhci_hcd");

    let out = run(&rig, &example("vfiod-dbus.py"), &["01:00.0"]);
    assert_exit(&out, 0);
    assert_bound_lines(&stdout(&out), &["01:00.0", "01:00.1"], "-");
    assert_eq!(rig.driver("01:00.0"), "amdgpu");
}

#[test]
fn the_python_script_reports_a_refusal_and_a_bad_command_line() {
    system_python_has_dbus();
    let rig = Rig::z77();
    let out = run(&rig, &example("vfiod-dbus.py"), &["nosuch"]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("org.vfiod1.Error.UnknownTarget: no profile named"),
        "{}",
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("finished nosuch bind: org.vfiod1.Error.UnknownTarget"),
        "{}",
        stdout(&out)
    );
    // Not root, no polkitd: AccessDenied, exit 1, nothing moved.
    if root_for("a client as another user") {
        let out = rig.as_nobody(&example("vfiod-dbus.py"), &["usb3"]);
        assert_exit(&out, 1);
        assert!(stderr(&out).contains("AccessDenied"), "{}", stderr(&out));
        assert_eq!(rig.driver("03:00.0"), "xhci_hcd");
    }
    assert_exit(&run(&rig, &example("vfiod-dbus.py"), &[]), 2);
}
