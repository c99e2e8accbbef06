//! A caller who may not move devices gets no work done: vfiod asks who
//! calls before it plans, so a denied Bind or Release reads nothing of
//! the kernel, takes no lock and opens no `/dev/vfio/N`.

use vfiod_tests::{Rig, is_root, stderr, value_of};

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
    assert!(
        is_root(),
        "needs root to run a client as another user (CI runs as root)"
    );
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
        let out = rig.as_nobody(
            "busctl",
            &[
                "--system",
                "call",
                "org.vfiod1",
                "/org/vfiod1",
                "org.vfiod1.Manager",
                method,
                "sa{sv}",
                "rx580",
                "0",
            ],
        );
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
