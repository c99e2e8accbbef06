//! `timeout_ms` bounds the whole move (DESIGN §4): the wait for another
//! move's IOMMU group counts against it.

mod common;

use std::time::{Duration, Instant};

use common::{Rig, addr, udev_worker_holds_the_audio, with_fault};
use vfiod::engine::Activity;
use vfiod::plan::MoveOptions;
use vfiod_dbus::Error;

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
