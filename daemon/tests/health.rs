//! A card's health before its host driver gets it back (DESIGN §10): a
//! function its VM left dead is revived by a reset or a remove and rescan,
//! or stays on vfio-pci; no host driver ever probes a dead function.

mod common;

use std::time::Duration;

use common::{Rig, addr, wait_until, with_fault};
use vfiod::early_claim;
use vfiod::engine::Health;
use vfiod::kernel::{Inspect, Kernel};
use vfiod_config::Config;
use vfiod_dbus::Error;

const GPU: &str = "0000:01:00.0";

fn dead_gpu(fault: &str) -> Rig {
    let rig = Rig::z77_with(|t| with_fault(t, GPU, fault));
    rig.bind("rx580").unwrap();
    rig
}

fn nothing_probed_dead(rig: &Rig) {
    assert!(
        rig.sim.dead_probed().is_empty(),
        "a host driver probed a dead function: {:?}",
        rig.sim.dead_probed()
    );
}

#[test]
fn the_rx580_comes_back_after_a_reset() {
    let rig = dead_gpu("dead = \"until-reset\"");
    rig.release("rx580").unwrap();
    assert_eq!(rig.driver(GPU).as_deref(), Some("amdgpu"));
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("snd_hda_intel"));
    assert_eq!(rig.engine.health(&addr(GPU), Some("amdgpu")), Health::Ok);
    nothing_probed_dead(&rig);
}

#[test]
fn the_rx580_comes_back_after_a_remove_and_rescan() {
    let rig = dead_gpu("dead = \"until-rescan\"");
    rig.release("rx580").unwrap();
    assert_eq!(rig.driver(GPU).as_deref(), Some("amdgpu"));
    assert_eq!(rig.overrides(GPU), None);
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("snd_hda_intel"));
    nothing_probed_dead(&rig);
    // And it moves again.
    rig.bind("rx580").unwrap();
    assert_eq!(rig.driver(GPU).as_deref(), Some("vfio-pci"));
}

/// A release is the user's word: the function revived by a remove and a
/// rescan is added again, and the early claim's udev rule (rx580 with
/// `boot = "vfio"`) writes `driver_override` at that add, after the
/// kernel gave it its host driver; the release must not leave that
/// override behind for the next probe to send it back to vfio-pci.
#[test]
fn a_function_revived_by_a_rescan_is_not_claimed_again_by_the_early_claim_rule() {
    let rig = dead_gpu("dead = \"until-rescan\"");
    let config = Config::parse(
        "[profiles.rx580]\ndevices = [\"01:00.0\"]\nboot = \"vfio\"\n",
        std::path::Path::new("vfiod.toml"),
    )
    .unwrap();
    let root = early_claim::root_for(true, &rig.dir.0.join("state"));
    let files = early_claim::render(&config, &rig.devices(), &root);
    early_claim::sync(&root, &files).unwrap();
    rig.release("rx580").unwrap();
    wait_until("udev's queue is empty", Duration::from_secs(5), || {
        !rig.sim.udev_busy()
    });
    assert_eq!(rig.driver(GPU).as_deref(), Some("amdgpu"));
    assert_eq!(rig.overrides(GPU), None, "the rule claimed it again");
    nothing_probed_dead(&rig);
}

#[test]
fn a_reset_that_fails_is_followed_by_a_rescan() {
    let rig = dead_gpu("dead = \"until-rescan\", reset = \"fail\"");
    rig.release("rx580").unwrap();
    assert_eq!(rig.driver(GPU).as_deref(), Some("amdgpu"));
    nothing_probed_dead(&rig);
}

#[test]
fn dead_for_good_it_goes_off_the_bus_never_to_a_host_driver_while_its_audio_returns() {
    let rig = dead_gpu("dead = \"forever\"");
    let err = rig.release("rx580").unwrap_err();
    assert!(matches!(err, Error::Kernel(_)), "{err:?}");
    let message = err.message();
    for needle in [
        GPU,
        "ffff:ffff",
        "tried: a reset, after which it still read dead",
        "a remove and a rescan of the bus behind 0000:00:01.0, which did not find it again",
        "needs a reboot",
        "it is off the bus",
        "0000:01:00.1 is back on snd_hda_intel",
    ] {
        assert!(message.contains(needle), "{needle:?} missing: {message}");
    }
    assert!(rig.sim.device(&addr(GPU)).unwrap().is_none());
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("snd_hda_intel"));
    assert_eq!(rig.engine.health(&addr(GPU), None), Health::Dead);
    nothing_probed_dead(&rig);
}

#[test]
fn dead_without_a_reset_method_it_goes_straight_to_the_rescan() {
    let rig = Rig::z77_with(|t| {
        with_fault(t, GPU, "dead = \"forever\"").replacen("reset = [\"bus\"]\n", "", 1)
    });
    rig.bind("rx580").unwrap();
    let err = rig.release("rx580").unwrap_err();
    let message = err.message();
    assert!(
        message.contains("no reset (the kernel has no reset method")
            && message.contains("a remove and a rescan"),
        "{message}"
    );
    assert!(!rig.sim.dead_probed().contains(&addr(GPU)));
}

/// The kernel's unbind uevent names no driver (`dev->driver` is gone when
/// it is sent), and libudev then reads the `driver` link as it is when the
/// event is read: after a release, vfio-pci's unbind comes with the host
/// driver vfiod gave the function back to. Neither says who let go; the
/// function's driver now does.
#[test]
fn an_unbind_uevent_is_judged_by_the_driver_the_function_has_now() {
    let rig = Rig::z77_with(|t| t);
    rig.bind("rx580").unwrap();
    rig.release("rx580").unwrap();
    // vfio-pci's unbind, read by libudev once amdgpu had the card.
    rig.engine.host_driver_let_go(&addr(GPU));
    assert_eq!(rig.engine.health(&addr(GPU), Some("amdgpu")), Health::Ok);
    // amdgpu gives up on it: the uevent names no driver.
    rig.sim.set_driver(&addr(GPU), None).unwrap();
    rig.engine.host_driver_let_go(&addr(GPU));
    assert_eq!(rig.engine.health(&addr(GPU), None), Health::ResetFailed);
}
