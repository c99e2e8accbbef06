//! A caller who may not move devices gets no work done: vfiod asks who
//! calls before it plans, so a denied Bind or Release reads nothing of
//! the kernel, takes no lock and opens no `/dev/vfio/N`.

use vfiod_tests::{Rig, assert_exit, root_for, stderr, value_of};

fn kernel_reads(rig: &Rig) -> u64 {
    let out = rig.busctl(&[
        "get-property",
        "org.vfiod1",
        "/org/vfiod1/simulator",
        "org.vfiod1.Simulator",
        "KernelReads",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    value_of(&out).parse().expect("a count")
}

#[test]
fn a_denied_bind_or_release_reads_nothing_of_the_kernel() {
    if !root_for("running a client as another user") {
        return;
    }
    let rig = Rig::z77();
    // The audio is on vfio-pci, so a Release would look for the group's
    // holders and open /dev/vfio/1 when it plans.
    assert_eq!(
        rig.vfioctl(&["bind", "rx580"]).status.code(),
        Some(0),
        "root binds"
    );
    let before = kernel_reads(&rig);
    for method in ["Bind", "Release", "Release", "Bind"] {
        let out = rig.manager_call_as_nobody(method, "rx580");
        assert!(!out.status.success(), "{method} was allowed");
        assert!(
            stderr(&out).contains("Access denied")
                || stderr(&out).contains("polkitd is not running"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(
        kernel_reads(&rig),
        before,
        "denied calls read the kernel (they were planned)"
    );
}

/// The shipped example rule lets a group move one profile and nothing
/// else, from the details vfiod passes polkit (DESIGN §10).
#[test]
fn the_one_profile_rule_lets_the_group_move_that_profile_alone() {
    if !root_for("running a client as another user") {
        return;
    }
    let rule = std::fs::read_to_string(
        vfiod_tests::repo().join("systemd/50-vfiod-one-profile.rules.example"),
    )
    .unwrap();
    // `nobody`'s own group stands for `gpu-vm`, which this machine lacks.
    assert!(rule.contains("subject.isInGroup(\"gpu-vm\")"), "{rule}");
    let rule = rule.replace("isInGroup(\"gpu-vm\")", "isInGroup(\"nogroup\")");
    let rig = Rig::z77();
    let _polkit = vfiod_tests::Polkit::start(&rig, &rule);
    let vfioctl = vfiod_tests::bin("vfioctl");
    let vfioctl = vfioctl.to_str().unwrap();
    assert_exit(&rig.as_nobody(vfioctl, &["bind", "rx580"]), 0);
    assert_eq!(rig.driver("01:00.1"), "vfio-pci");
    // Another profile, or the same card by address: the action's default.
    assert_exit(&rig.as_nobody(vfioctl, &["bind", "usb3"]), 4);
    assert_exit(&rig.as_nobody(vfioctl, &["release", "01:00.0"]), 4);
    assert_eq!(rig.driver("03:00.0"), "xhci_hcd");
    assert_eq!(rig.driver("01:00.0"), "vfio-pci");
    // Not in the group.
    assert_exit(
        &rig.as_user("daemon", "daemon", vfioctl, &["release", "rx580"]),
        4,
    );
    assert_exit(&rig.as_nobody(vfioctl, &["release", "rx580"]), 0);
    assert_eq!(rig.driver("01:00.0"), "amdgpu");
}

/// polkit hears the profile, the completed set, the VM and the direction.
#[test]
fn polkit_is_told_what_the_move_is() {
    if !root_for("running a client as another user") {
        return;
    }
    let rig = Rig::z77();
    let _polkit = vfiod_tests::Polkit::start(
        &rig,
        r#"polkit.addRule(function(action, subject) {
    if (action.id != "org.vfiod1.manage") return polkit.Result.NOT_HANDLED;
    var seen = [action.lookup("profile"), action.lookup("devices"),
                action.lookup("vm"), action.lookup("direction")].join("|");
    if (seen == "|0000:01:00.0,0000:01:00.1|win10|bind") return polkit.Result.YES;
    if (seen == "rx580|0000:01:00.0,0000:01:00.1||release") return polkit.Result.YES;
    polkit.log("vfiod details: " + seen);
    return polkit.Result.NO;
});"#,
    );
    let vfioctl = vfiod_tests::bin("vfioctl");
    let vfioctl = vfioctl.to_str().unwrap();
    // An address completes to the GPU's audio function too.
    let out = rig.as_nobody(vfioctl, &["bind", "01:00.0", "--vm", "win10"]);
    assert_exit(&out, 0);
    assert_eq!(rig.driver("01:00.1"), "vfio-pci");
    assert_exit(&rig.as_nobody(vfioctl, &["bind", "usb3"]), 4);
    assert_exit(&rig.as_nobody(vfioctl, &["release", "rx580"]), 0);
    assert_eq!(rig.driver("01:00.1"), "snd_hda_intel");
}

/// Check is open to everyone, but tells only those who may move devices
/// which processes hold them.
#[test]
fn a_check_by_someone_who_may_not_move_names_no_process() {
    if !root_for("running a client as another user") {
        return;
    }
    let rig = Rig::z77();
    rig.simulate(
        "AddHolder",
        "uss",
        &["4242", "firefox", "/dev/dri/renderD129"],
    );
    let vfioctl = vfiod_tests::bin("vfioctl");
    let vfioctl = vfioctl.to_str().unwrap();
    let theirs = rig.as_nobody(vfioctl, &["check", "rx580"]);
    let told = vfiod_tests::stdout(&theirs);
    assert!(
        told.contains("a process holds /dev/dri/renderD129"),
        "{told}"
    );
    assert!(
        !told.contains("firefox") && !told.contains("4242"),
        "{told}"
    );
    let root = vfiod_tests::stdout(&rig.vfioctl(&["check", "rx580"]));
    assert!(root.contains("firefox (pid 4242)"), "{root}");
}
