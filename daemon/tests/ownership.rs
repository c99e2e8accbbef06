//! Ownership (DESIGN §8): a VM's bind takes only what it moves, and its
//! release gives back only what it owns. Devices already on vfio-pci
//! (bound at boot by `boot = "vfio"`, or by an administrator) are used by
//! the VM but stay on vfio-pci when it lets go.

mod common;

use common::{Rig, addr, addrs, vm};
use vfiod_dbus::Error;

#[test]
fn a_bind_that_moves_nothing_takes_nothing() {
    let rig = Rig::shipped("z77-rx580");
    // Bound at boot (boot = "vfio" binds with no vm).
    rig.bind("rx580").unwrap();
    let before = rig.kernel_view();
    let set = rig.bind_with("rx580", vm("win10")).unwrap();
    assert_eq!(
        set,
        addrs(&["0000:01:00.0", "0000:01:00.1"]),
        "the whole set"
    );
    assert_eq!(rig.kernel_view(), before, "nothing moved");
    for address in ["01:00.0", "01:00.1"] {
        assert_eq!(
            rig.engine.owner(&addr(address)),
            None,
            "{address}: win10 moved nothing and owns nothing"
        );
    }
}

#[test]
fn a_vms_release_leaves_what_it_did_not_take_on_vfio() {
    let rig = Rig::shipped("z77-rx580");
    rig.bind("rx580").unwrap();
    rig.bind_with("rx580", vm("win10")).unwrap();
    rig.bind_with("usb3", vm("win10")).unwrap();
    assert_eq!(rig.engine.owner(&addr("03:00.0")).as_deref(), Some("win10"));

    let set = rig.release_with("rx580", vm("win10")).unwrap();
    assert_eq!(set, addrs(&["0000:01:00.0", "0000:01:00.1"]));
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("vfio-pci"));
    assert_eq!(rig.overrides("01:00.0").as_deref(), Some("vfio-pci"));
    // What win10 took goes back.
    rig.release_with("usb3", vm("win10")).unwrap();
    assert_eq!(rig.driver("03:00.0").as_deref(), Some("xhci_hcd"));
    assert_eq!(rig.engine.owner(&addr("03:00.0")), None);

    // The administrator's release (no vm) still gives rx580 back.
    rig.release("rx580").unwrap();
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("amdgpu"));
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("snd_hda_intel"));
}

#[test]
fn a_device_left_alone_does_not_make_the_release_wait_for_its_group() {
    let rig = Rig::shipped("z77-rx580");
    rig.bind("rx580").unwrap();
    // A VM of the administrator's still holds group 1: win10's release
    // moves nothing there, so it has nothing to wait for.
    rig.sim
        .add_holder(vfiod_pci::Holder {
            pid: 4242,
            comm: "qemu-system-x86".into(),
            node: "/dev/vfio/1".into(),
        })
        .unwrap();
    let before = rig.kernel_view();
    rig.release_with("rx580", vm("win10")).unwrap();
    assert_eq!(rig.kernel_view(), before);
    // Without a vm the release is the administrator's, and it must wait.
    assert!(matches!(rig.release("rx580"), Err(Error::DeviceBusy(_))));
}

#[test]
fn another_vms_devices_are_still_a_conflict() {
    let rig = Rig::shipped("z77-rx580");
    rig.bind_with("rx580", vm("win10")).unwrap();
    let before = rig.kernel_view();
    let err = rig.release_with("rx580", vm("linux")).unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert_eq!(rig.kernel_view(), before);
    // And win10's bind again over what it owns keeps it owned.
    rig.bind_with("rx580", vm("win10")).unwrap();
    assert_eq!(rig.engine.owner(&addr("01:00.1")).as_deref(), Some("win10"));
}
