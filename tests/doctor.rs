//! The doctor through the real binaries on a private bus: `vfioctl check`
//! against `vfiod --machine machines/z77-rx580.toml`, the machine this
//! project began with (issue 7's Z77 story), and a Z77 whose qemu.conf was
//! fixed.

use std::process::{Command, Output};

use serde_json::Value;
use vfiod_tests::{Rig, assert_exit, bin, machine, stdout};

/// `vfioctl --json check TARGET...` as (id, severity, message) triples.
fn findings(rig: &Rig, args: &[&str]) -> (Output, Vec<(String, String, String)>) {
    let mut all = vec!["--json", "check"];
    all.extend_from_slice(args);
    let out = rig.vfioctl(&all);
    let doc: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    let list = doc
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {doc}"))
        .iter()
        .map(|f| {
            let field = |k: &str| {
                f[k].as_str()
                    .unwrap_or_else(|| panic!("{k} in {f}"))
                    .to_owned()
            };
            (field("id"), field("severity"), field("message"))
        })
        .collect();
    (out, list)
}

/// The findings with `id`, as (severity, message).
fn with_id(list: &[(String, String, String)], id: &str) -> Vec<(String, String)> {
    list.iter()
        .filter(|(i, ..)| i == id)
        .map(|(_, s, m)| (s.clone(), m.clone()))
        .collect()
}

/// The one finding `id`, asserted to have `severity`; its message.
#[track_caller]
fn expect(list: &[(String, String, String)], id: &str, severity: &str) -> String {
    let found = with_id(list, id);
    assert_eq!(found.len(), 1, "one {id} in {list:#?}");
    assert_eq!(found[0].0, severity, "{id}: {}", found[0].1);
    found[0].1.clone()
}

#[test]
fn check_rx580_groups_fine_polaris_reset_bug_bus_reset_and_ovmf_fails() {
    let rig = Rig::z77();
    let (out, list) = findings(&rig, &["rx580"]);
    // The host's OVMF finding fails, so the whole check does.
    assert_exit(&out, 1);
    let group = expect(&list, "group.members", "ok");
    assert!(
        group.contains("IOMMU group 1") && group.contains("(bridge, may stay)"),
        "{group}"
    );
    let bug = expect(&list, "reset.amd-bug", "warn");
    assert!(
        bug.contains("Polaris 10") && bug.contains("vendor-reset is not loaded"),
        "{bug}"
    );
    let resets = with_id(&list, "reset.method");
    assert_eq!(resets.len(), 2, "{list:#?}");
    assert!(
        resets
            .iter()
            .all(|(s, m)| s == "ok" && m.contains("reset = bus")),
        "{resets:?}"
    );
    expect(&list, "boot-gpu.boot-vga", "ok");
    let ovmf = expect(&list, "libvirt.ovmf", "fail");
    assert!(
        ovmf.starts_with("QEMU runs as nobody:nobody")
            && ovmf.contains("cannot read /usr/share/ovmf/x64/OVMF_CODE.fd (root:kvm 0640)")
            && ovmf.contains("/etc/libvirt/qemu.conf"),
        "{ovmf}"
    );
    // The dry run of the bind comes last and agrees with Bind.
    assert_eq!(list.last().unwrap().0, "bind.plan");
    let plan = expect(&list, "bind.plan", "ok");
    assert!(plan.contains("0000:01:00.0, 0000:01:00.1"), "{plan}");
    // Nothing moved.
    assert_eq!(rig.driver("01:00.0"), "amdgpu");
}

#[test]
fn check_the_boot_gpu_fails_with_the_firmware_setting_and_the_kernel_options() {
    let rig = Rig::z77();
    let (out, list) = findings(&rig, &["06:00.0"]);
    assert_exit(&out, 1);
    let boot = expect(&list, "boot-gpu.boot-vga", "fail");
    assert!(
        boot.contains("boot VGA")
            && boot.contains("Primary Display")
            && boot.contains("video=efifb:off")
            && boot.contains("initcall_blacklist=sysfb_init"),
        "{boot}"
    );
    let fb = expect(&list, "boot-gpu.framebuffer", "fail");
    assert!(fb.contains("radeondrmfb") && fb.contains("console"), "{fb}");
    let plan = expect(&list, "bind.plan", "fail");
    assert!(plan.contains("console"), "{plan}");
}

#[test]
fn check_the_whole_host_as_json() {
    let rig = Rig::z77();
    let (out, list) = findings(&rig, &[]);
    assert_exit(&out, 1);
    for (id, severity) in [
        ("cpu.virtualization", "ok"),
        ("kvm", "ok"),
        ("firmware.iommu-table", "ok"),
        ("iommu.enabled", "ok"),
        ("iommu.interrupt-remapping", "ok"),
        ("iommu.acs-override", "ok"),
        ("modules.vfio-pci", "ok"),
        ("memory.hugepages", "ok"),
        ("libvirt.ovmf", "fail"),
    ] {
        expect(&list, id, severity);
    }
    // What the machine file does not say is unknown, not failed.
    assert!(expect(&list, "libvirt.hook", "ok").starts_with("unknown: "));
    // No target: nothing about devices, no dry run.
    for area in ["group.", "boot-gpu.", "reset.", "usb.", "bind."] {
        assert!(
            !list.iter().any(|(id, ..)| id.starts_with(area)),
            "{area} in {list:#?}"
        );
    }
}

/// The Z77 once qemu.conf said `group = "kvm"`.
fn fixed_z77() -> Rig {
    let text = std::fs::read_to_string(machine("z77-rx580.toml")).unwrap();
    let fixed = text.replace(
        r#"qemu_conf = { user = "nobody", group = "nobody" }"#,
        r#"qemu_conf = { user = "nobody", group = "kvm" }"#,
    );
    assert_ne!(fixed, text, "the Z77 machine file's qemu_conf line changed");
    let config = std::fs::read_to_string(machine("z77-rx580.vfiod.toml")).unwrap();
    Rig::with_text(&fixed, &config)
}

#[test]
fn exit_status_is_0_when_nothing_fails_and_1_when_something_does() {
    let rig = fixed_z77();
    let out = rig.vfioctl(&["check", "rx580"]);
    assert_exit(&out, 0);
    // Piped: one finding per line, `severity  id  message`.
    let text = stdout(&out);
    assert!(
        text.lines().any(|l| l.starts_with("warn  reset.amd-bug")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok    libvirt.ovmf") && l.contains("nobody:kvm")),
        "{text}"
    );
    assert!(!text.contains('\x1b'), "{text}");
    assert_exit(&rig.vfioctl(&["check"]), 0);
    assert_exit(&rig.vfioctl(&["check", "06:00.0"]), 1);
    assert_exit(&rig.vfioctl(&["check", "usb3"]), 0);
    // A target that does not exist is an error, not a finding.
    let out = rig.vfioctl(&["check", "09:00.0"]);
    assert_exit(&out, 1);
    assert!(stdout(&out).is_empty());
}

#[test]
fn on_a_terminal_findings_are_grouped_by_area_and_colored() {
    let rig = fixed_z77();
    // script(1) gives vfioctl a terminal; COLUMNS sets where it wraps.
    let command = format!("{} check 06:00.0", bin("vfioctl").display());
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &rig.address)
        .env("COLUMNS", "100")
        .env_remove("NO_COLOR")
        .output()
        .expect("script (util-linux)");
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out).replace("\r\n", "\n");
    let plain = strip_ansi(&text);
    let titles = [
        "Virtualization and IOMMU\n",
        "Drivers and modules\n",
        "IOMMU groups\n",
        "Boot GPU\n",
        "Reset\n",
        "Power and memory\n",
        "libvirt and firmware\n",
        "Bind (dry run)\n",
    ];
    let mut at = 0;
    for title in titles {
        let found = plain[at..]
            .find(title)
            .unwrap_or_else(|| panic!("no {title:?} after byte {at} in\n{plain}"));
        at += found + title.len();
    }
    assert!(text.contains("\x1b[1;31mfail"), "{text}");
    assert!(plain.contains("  fail  boot-gpu.boot-vga "), "{plain}");
    // Unknown facts are marked, not passed.
    assert!(plain.contains("  ?     libvirt.hook "), "{plain}");
    for line in plain.lines() {
        assert!(line.chars().count() <= 100, "{line:?}");
    }
    let last = plain.trim_end().lines().last().unwrap();
    assert!(
        last.starts_with("3 fail, ") && last.contains("not checked"),
        "{last}"
    );
}

/// Drops ANSI color sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
