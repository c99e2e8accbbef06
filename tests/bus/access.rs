//! Who may move devices: unprivileged callers, with and without polkitd.

use vfiod_tests::{Rig, assert_exit, root_for, stderr, value_of};

#[test]
fn an_unprivileged_caller_reads_but_may_not_move() {
    if !root_for("running a client as another user") {
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
    let out = rig.manager_call_as_nobody("Bind", "rx580");
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
    // A caller vfiod turns away hears only that, not why the move would
    // be refused (the boot VGA's console): it is never planned.
    let out = rig.as_nobody(vfioctl.to_str().unwrap(), &["bind", "06:00.0"]);
    assert_exit(&out, 4);
    assert!(!stderr(&out).contains("console"), "{}", stderr(&out));
    // The denied calls left no group locked.
    assert_exit(&rig.vfioctl(&["bind", "rx580"]), 0);
    assert_eq!(rig.driver("01:00.1"), "vfio-pci");
}

#[test]
fn polkit_decides_for_unprivileged_callers() {
    if !root_for("polkitd on a private bus") {
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
