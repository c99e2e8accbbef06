//! Kernel calls that do not return in time (a hung driver, or a device
//! lock someone else holds): the move ends within its time all the same,
//! and when the kernel answers at last the device is settled, never left
//! without a driver, and its journal entry closed.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use common::interposed::UnbindAfterOverride;
use common::{Rig, addr, wait_until, with_fault};
use vfiod::kernel::Inspect;
use vfiod::plan::MoveOptions;
use vfiod_dbus::{DeviceState, Error};
use vfiod_pci::PciAddress;

const AUDIO: &str = "0000:01:00.1";

fn state(rig: &Rig, address: &str) -> DeviceState {
    let address = addr(address);
    let driver = rig.sim.driver(&address).unwrap();
    rig.engine.state_of(&address, driver.as_deref())
}

/// Tells the test of each device the engine settles after a late answer.
fn settled(rig: &Rig) -> std::sync::mpsc::Receiver<PciAddress> {
    let (tx, rx) = channel();
    rig.engine.on_settled(move |address| {
        let _ = tx.send(address);
    });
    rx
}

#[test]
fn an_unbind_that_returns_after_its_timeout_leaves_the_device_settled() {
    let rig = Rig::z77_with(|t| with_fault(t, AUDIO, "unbind = \"hang\"")).with_timeout_ms(300);
    let settled = settled(&rig);
    let err = rig.bind("rx580").unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    assert_eq!(state(&rig, AUDIO), DeviceState::Stuck);
    // As on a real kernel: the link went before remove() ran.
    assert_eq!(rig.driver(AUDIO), None);
    assert_eq!(
        rig.open_moves(),
        1,
        "the journal entry stays open while the unbind has not returned"
    );

    assert!(rig.sim.end_hang(&addr(AUDIO)).unwrap());
    let device = settled
        .recv_timeout(Duration::from_secs(5))
        .expect("the device is settled once the unbind returns");
    assert_eq!(device, addr(AUDIO));
    let driver = rig.driver(AUDIO);
    assert!(
        matches!(driver.as_deref(), Some("snd_hda_intel" | "vfio-pci")),
        "settled on {driver:?}"
    );
    assert_eq!(
        driver.as_deref(),
        Some("snd_hda_intel"),
        "its host driver came back"
    );
    assert_eq!(rig.overrides(AUDIO), None);
    assert_ne!(state(&rig, AUDIO), DeviceState::Stuck);
    assert_eq!(rig.open_moves(), 0, "the journal entry is closed");
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("amdgpu"));
}

#[test]
fn a_read_back_behind_another_unbind_still_ends_the_move_in_time() {
    let rig = Rig::z77_interposed(
        |t| with_fault(t, AUDIO, "unbind = \"hang\""),
        |sim| {
            Arc::new(UnbindAfterOverride {
                sim,
                victim: addr(AUDIO),
                driver: "snd_hda_intel",
                fired: AtomicBool::new(false),
            })
        },
    );
    let settled = settled(&rig);
    let timeout = Duration::from_millis(500);
    let (done, outcome) = channel();
    let engine = rig.engine.clone();
    let started = Instant::now();
    std::thread::spawn(move || {
        let options = MoveOptions {
            timeout: Some(timeout),
            ..MoveOptions::default()
        };
        let _ = done.send(engine.bind("rx580", &options, &|_, _| {}));
    });
    let result = outcome
        .recv_timeout(Duration::from_secs(5))
        .expect("the move ends although reading driver_override back waits forever");
    let took = started.elapsed();
    let err = result.unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    assert!(
        err.message().contains("read driver_override"),
        "{}",
        err.message()
    );
    // Answered at the timeout; the GPU is undone after the answer.
    assert!(took < timeout + Duration::from_millis(500), "took {took:?}");
    wait_until("the GPU is undone", Duration::from_secs(5), || {
        rig.driver("01:00.0").as_deref() == Some("amdgpu")
            && rig.engine.activity(&addr("01:00.0")).is_none()
    });
    assert_eq!(state(&rig, AUDIO), DeviceState::Stuck);

    // The other unbind ends; the read returns and the device is settled.
    assert!(rig.sim.end_hang(&addr(AUDIO)).unwrap());
    wait_until("the audio is settled", Duration::from_secs(5), || {
        rig.driver(AUDIO).as_deref() == Some("snd_hda_intel")
            && state(&rig, AUDIO) != DeviceState::Stuck
            && rig.open_moves() == 0
    });
    assert_eq!(rig.overrides(AUDIO), None);
    let told_of_audio = std::iter::from_fn(|| settled.recv_timeout(Duration::from_secs(5)).ok())
        .any(|told| told == addr(AUDIO));
    assert!(told_of_audio, "the bus was not told of the audio");
}
