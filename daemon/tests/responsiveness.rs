//! What the event loop reads from the engine (owners, host drivers,
//! states) answers at once whatever a move is doing: nothing it touches is
//! held across a kernel read. The plan here waits a second on the kernel;
//! a read that waited for it would take about that long (the bound is
//! wide for loaded machines).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Rig, addr, udev_worker_holds_the_audio};
use vfiod::plan::MoveOptions;
use vfiod_dbus::Direction;

/// The slowest of `read`'s answers while `busy` runs.
fn slowest_answer_while(busy: impl FnOnce() + Send, read: impl Fn()) -> Duration {
    let done = AtomicBool::new(false);
    let mut slowest = Duration::ZERO;
    std::thread::scope(|s| {
        s.spawn(|| {
            busy();
            done.store(true, Ordering::SeqCst);
        });
        while !done.load(Ordering::SeqCst) {
            let asked = Instant::now();
            read();
            slowest = slowest.max(asked.elapsed());
        }
    });
    slowest
}

#[test]
fn owners_answer_at_once_while_a_plan_waits_on_the_kernel() {
    let rig = Rig::shipped("z77-rx580");
    udev_worker_holds_the_audio(&rig);
    let gpu = addr("01:00.0");
    let planning = Instant::now();
    let slowest = slowest_answer_while(
        || {
            let plan = rig
                .engine
                .plan("rx580", Direction::Bind, &MoveOptions::default());
            assert!(plan.is_err(), "the worker holds the node: {plan:?}");
        },
        || {
            rig.engine.owner(&gpu);
            rig.engine.host_driver(&gpu);
        },
    );
    assert!(
        planning.elapsed() >= Duration::from_millis(500),
        "the plan did wait on the kernel ({:?})",
        planning.elapsed()
    );
    assert!(
        slowest < Duration::from_millis(500),
        "a read of the ledger waited {slowest:?} for the plan"
    );
}

#[test]
fn owners_answer_at_once_while_a_move_plans_under_its_locks() {
    let rig = Rig::shipped("z77-rx580");
    udev_worker_holds_the_audio(&rig);
    let gpu = addr("01:00.0");
    let slowest = slowest_answer_while(
        || assert!(rig.bind("rx580").is_err()),
        || {
            rig.engine.owner(&gpu);
        },
    );
    assert!(
        slowest < Duration::from_millis(500),
        "a read of the ledger waited {slowest:?} for the move's plan"
    );
}
