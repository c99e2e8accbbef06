//! The bouncer's verdict and the move planned while it is awaited: the
//! engine knows no callers, the service decides what runs.

mod common;

use std::time::{Duration, Instant};

use vfiod::plan::MoveOptions;
use vfiod::service::verdict;
use vfiod_dbus::{Direction, Error};
use vfiod_pci::PciAddress;

use common::{Rig, addrs, with_fault};

/// A bind of `target` whose caller's verdict is `allowed` (`None`: never
/// given); no step may start unless it is yes.
fn bind_gated(rig: &Rig, target: &str, allowed: Option<bool>) -> Result<Vec<PciAddress>, Error> {
    let (sender, verdict) = verdict::pending();
    match allowed {
        Some(allowed) => sender.decide(allowed),
        None => drop(sender),
    }
    let no_step = |_: &PciAddress, _: &str| assert_eq!(allowed, Some(true), "a step started");
    verdict::run_when_allowed(
        &rig.engine,
        target,
        Direction::Bind,
        &MoveOptions::default(),
        &no_step,
        &verdict,
    )
}

#[test]
fn a_denied_caller_moves_nothing_even_when_the_plan_would_pass() {
    let rig = Rig::shipped("z77-rx580");
    let refused = bind_gated(&rig, "rx580", Some(false));
    assert!(
        matches!(refused, Err(Error::AccessDenied(_))),
        "{refused:?}"
    );
    // A refusal the plan would give (the boot VGA) is not what a denied
    // caller learns.
    let refused = bind_gated(&rig, "0000:06:00.0", None);
    assert!(
        matches!(refused, Err(Error::AccessDenied(_))),
        "{refused:?}"
    );
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("amdgpu"));
    assert_eq!(rig.overrides("01:00.0"), None);
    let refused = bind_gated(&rig, "0000:06:00.0", Some(true));
    assert!(matches!(refused, Err(Error::Protected(_))), "{refused:?}");
}

#[test]
fn a_yes_given_after_planning_lets_the_move_run() {
    let rig = Rig::shipped("z77-rx580");
    let (sender, verdict) = verdict::pending();
    // The verdict comes while (or after) the move plans, as from the bus.
    let decider = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        sender.decide(true);
    });
    let moved = verdict::run_when_allowed(
        &rig.engine,
        "rx580",
        Direction::Bind,
        &MoveOptions::default(),
        &|_, _| {},
        &verdict,
    )
    .unwrap();
    decider.join().unwrap();
    assert_eq!(moved, addrs(&["0000:01:00.0", "0000:01:00.1"]));
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("vfio-pci"));
}

#[test]
fn a_caller_turned_away_never_waits_for_another_moves_lock() {
    // The audio's unbind hangs for 2 s, with group 1 locked all along.
    let rig =
        Rig::z77_with(|t| with_fault(t, "0000:01:00.1", "unbind = \"hang\"")).with_timeout_ms(2000);
    std::thread::scope(|s| {
        let mover = s.spawn(|| rig.bind("rx580"));
        std::thread::sleep(Duration::from_millis(200));
        let asked = Instant::now();
        let refused = bind_gated(&rig, "rx580", Some(false));
        assert!(
            matches!(refused, Err(Error::AccessDenied(_))),
            "{refused:?}"
        );
        assert!(
            asked.elapsed() < Duration::from_millis(500),
            "the denial waited {:?} for the other move",
            asked.elapsed()
        );
        assert!(mover.join().unwrap().is_err(), "the hung bind times out");
    });
}
