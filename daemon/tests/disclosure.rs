//! What a Check tells someone who may not move devices: that a device is
//! in use, not by which processes of which users, nor which VM owns it.

mod common;

use common::Rig;
use vfiod::doctor::{self, Disclosure};
use vfiod::plan::MoveOptions;
use vfiod_pci::Holder;

fn dry_run(rig: &Rig, told: Disclosure) -> String {
    doctor::check(&rig.engine, "rx580", told)
        .unwrap()
        .into_iter()
        .find(|f| f.id == "bind.plan")
        .expect("a dry run")
        .message
}

#[test]
fn a_redacted_dry_run_says_a_device_is_held_not_by_whom() {
    let rig = Rig::shipped("z77-rx580");
    rig.sim
        .add_holder(Holder {
            pid: 4242,
            comm: "firefox".into(),
            node: "/dev/dri/renderD129".into(),
        })
        .unwrap();
    let full = dry_run(&rig, Disclosure::Full);
    assert!(
        full.contains("firefox (pid 4242) holds /dev/dri/renderD129"),
        "{full}"
    );
    let redacted = dry_run(&rig, Disclosure::Redacted);
    assert!(
        redacted.contains("a process holds /dev/dri/renderD129"),
        "{redacted}"
    );
    assert!(
        !redacted.contains("firefox") && !redacted.contains("4242"),
        "{redacted}"
    );
}

#[test]
fn a_redacted_dry_run_does_not_name_the_vm_that_owns_a_device() {
    let rig = Rig::shipped("z77-rx580");
    let win10 = MoveOptions {
        vm: Some("win10".into()),
        ..MoveOptions::default()
    };
    rig.bind_with("rx580", win10).unwrap();
    let other = MoveOptions {
        vm: Some("linux".into()),
        redacted: true,
        ..MoveOptions::default()
    };
    let err = rig
        .engine
        .plan("rx580", vfiod_dbus::Direction::Release, &other)
        .unwrap_err();
    assert!(err.message().contains("belongs to another VM"), "{err:?}");
    assert!(!err.message().contains("win10"), "{err:?}");
}
