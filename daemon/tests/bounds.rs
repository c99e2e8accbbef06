//! `timeout_ms` bounds the whole move (DESIGN §4): the wait for another
//! move's IOMMU group counts against it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Rig, addr, udev_worker_holds_the_audio, wait_until, with_fault};
use vfiod::engine::Activity;
use vfiod::plan::MoveOptions;
use vfiod_dbus::Error;
use vfiod_pci::{Holder, PciAddress};

#[test]
fn the_wait_for_a_group_another_move_holds_ends_at_the_moves_timeout() {
    // The audio's unbind hangs for the whole per-write timeout, 3 s, with
    // group 1 locked all along.
    let rig =
        Rig::z77_with(|t| with_fault(t, "0000:01:00.1", "unbind = \"hang\"")).with_timeout_ms(3000);
    std::thread::scope(|s| {
        let holder = s.spawn(|| rig.bind("rx580"));
        let since = Instant::now();
        while rig.engine.activity(&addr("01:00.1")) != Some(Activity::Moving) {
            assert!(
                since.elapsed() < Duration::from_secs(10),
                "the bind never started"
            );
            std::thread::yield_now();
        }
        let asked = Instant::now();
        let waited = rig.bind_with(
            "0000:01:00.0",
            MoveOptions {
                timeout: Some(Duration::from_millis(300)),
                ..MoveOptions::default()
            },
        );
        let took = asked.elapsed();
        assert!(matches!(waited, Err(Error::Timeout(_))), "{waited:?}");
        assert!(
            waited.unwrap_err().message().contains("nothing was moved"),
            "says nothing moved"
        );
        assert!(
            took < Duration::from_millis(1500),
            "the move waited {took:?} for the other one"
        );
        assert!(holder.join().unwrap().is_err(), "the hung bind times out");
    });
}

#[test]
fn planning_that_waits_on_the_kernel_ends_at_the_moves_timeout() {
    let rig = Rig::shipped("z77-rx580");
    udev_worker_holds_the_audio(&rig);
    let asked = Instant::now();
    let planned = rig.bind_with(
        "rx580",
        MoveOptions {
            timeout: Some(Duration::from_millis(300)),
            ..MoveOptions::default()
        },
    );
    let took = asked.elapsed();
    assert!(matches!(planned, Err(Error::Timeout(_))), "{planned:?}");
    assert!(took < Duration::from_millis(800), "planning took {took:?}");
    assert_eq!(
        rig.driver("01:00.0").as_deref(),
        Some("amdgpu"),
        "nothing moved"
    );
    // The late plan let its group go: the next move is not refused for it.
    rig.sim.remove_holder(330).unwrap();
    rig.bind("rx580").expect("the group is free again");
}

#[test]
fn a_rollback_that_outlasts_the_moves_timeout_is_answered_at_the_timeout_and_finished_after() {
    // The audio refuses vfio-pci, so the bind undoes the GPU; a QEMU that
    // opened /dev/vfio/1 meanwhile makes the GPU's unbind from vfio-pci
    // wait for it (up to the per-write bound, 5 s).
    let rig =
        Rig::z77_with(|t| with_fault(t, "0000:01:00.1", "probe = \"fail\"")).with_timeout_ms(5000);
    let qemu_opens_the_group = |device: &PciAddress, step: &str| {
        if *device == addr("01:00.1") && step == "probe vfio-pci" {
            rig.sim
                .add_holder(Holder {
                    pid: 4242,
                    comm: "qemu-system-x86".into(),
                    node: "/dev/vfio/1".into(),
                })
                .unwrap();
        }
    };
    let options = MoveOptions {
        timeout: Some(Duration::from_millis(600)),
        ..MoveOptions::default()
    };
    let asked = Instant::now();
    let bound = rig.engine.bind("rx580", &options, &qemu_opens_the_group);
    let took = asked.elapsed();
    let err = bound.unwrap_err();
    assert!(
        took < Duration::from_millis(2000),
        "answered after {took:?}, past the move's 600 ms"
    );
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    let message = err.message();
    assert!(message.contains("vfio-pci did not bind"), "{message}");
    assert!(
        message.contains("0000:01:00.0 is still being undone"),
        "{message}"
    );
    // Until the undoing ends, the GPU is shown moving, its group stays
    // locked and its journal entry open.
    assert_eq!(
        rig.engine.activity(&addr("01:00.0")),
        Some(Activity::Moving)
    );
    assert_eq!(rig.open_moves(), 1);
    let second = rig.bind_with(
        "rx580",
        MoveOptions {
            timeout: Some(Duration::from_millis(100)),
            ..MoveOptions::default()
        },
    );
    assert!(matches!(second, Err(Error::Timeout(_))), "{second:?}");

    let settled = Arc::new(AtomicUsize::new(0));
    let told = settled.clone();
    rig.engine.on_settled(move |_| {
        told.fetch_add(1, Ordering::SeqCst);
    });
    rig.sim.remove_holder(4242).unwrap();
    wait_until("the undoing finishes", Duration::from_secs(10), || {
        rig.engine.activity(&addr("01:00.0")).is_none() && rig.open_moves() == 0
    });
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("amdgpu"));
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("snd_hda_intel"));
    assert_eq!(rig.overrides("01:00.0"), None);
    assert_eq!(rig.overrides("01:00.1"), None);
    assert!(
        settled.load(Ordering::SeqCst) >= 1,
        "the bus was not told the undoing ended"
    );
}
