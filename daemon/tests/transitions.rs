//! The transition rules of DESIGN §3 on the simulated kernel: the sample
//! machine's stories, every refusal, every fault kind, and what survives a
//! restart.

mod common;

use std::time::{Duration, Instant};

use common::{Rig, addr, addrs, vm, with_fault, z77_config};
use vfiod::kernel::Inspect;
use vfiod::plan::MoveOptions;
use vfiod_dbus::{DeviceState, Direction, Error};
use vfiod_pci::Holder;

fn force() -> MoveOptions {
    MoveOptions {
        force: true,
        ..MoveOptions::default()
    }
}

#[test]
fn rx580_moves_both_functions_and_group_1_becomes_viable() {
    let rig = Rig::shipped("z77-rx580");
    assert!(!rig.sim.group_viable(1));
    let moved = rig.bind("rx580").unwrap();
    assert_eq!(moved, addrs(&["0000:01:00.0", "0000:01:00.1"]));
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("vfio-pci"));
    assert_eq!(
        rig.driver("00:01.0").as_deref(),
        Some("pcieport"),
        "the root port stays"
    );
    assert!(rig.sim.group_viable(1));
    assert_eq!(
        rig.engine.host_driver(&addr("01:00.0")).as_deref(),
        Some("amdgpu")
    );

    let back = rig.release("rx580").unwrap();
    assert_eq!(back, moved);
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("amdgpu"));
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("snd_hda_intel"));
    assert_eq!(rig.overrides("01:00.0"), None, "driver_override cleared");
    assert_eq!(rig.overrides("01:00.1"), None);
    assert_eq!(rig.sim.vfio_group_node(1), None, "/dev/vfio/1 is gone");
}

#[test]
fn usb3_by_id_moves_the_card_alone() {
    let rig = Rig::shipped("z77-rx580");
    let moved = rig.bind("usb3").unwrap();
    assert_eq!(moved, addrs(&["0000:03:00.0"]));
    assert_eq!(rig.driver("03:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(
        rig.driver("00:14.0").as_deref(),
        Some("xhci_hcd"),
        "the chipset controller stays"
    );
    assert!(rig.sim.group_viable(14));
    rig.release("usb3").unwrap();
    assert_eq!(rig.driver("03:00.0").as_deref(), Some("xhci_hcd"));
}

fn refused(rig: &Rig, target: &str, options: MoveOptions) -> Error {
    let before = rig.kernel_view();
    let err = rig.bind_with(target, options).unwrap_err();
    assert_eq!(
        rig.kernel_view(),
        before,
        "a refusal of {target} changed the machine"
    );
    err
}

#[test]
fn chipset_xhci_is_refused_for_the_keyboard_and_mouse() {
    let rig = Rig::shipped("z77-rx580");
    let err = refused(&rig, "00:14.0", MoveOptions::default());
    assert!(matches!(err, Error::Protected(_)), "{err:?}");
    let m = err.message();
    assert!(
        m.contains("0000:00:14.0") && m.contains("USB keyboard") && m.contains("USB optical mouse"),
        "{m}"
    );
}

#[test]
fn sata_controller_is_refused_for_the_root_filesystem_even_with_force() {
    let rig = Rig::shipped("z77-rx580");
    for options in [MoveOptions::default(), force()] {
        let err = refused(&rig, "00:1f.2", options);
        assert!(matches!(err, Error::Protected(_)), "{err:?}");
        assert!(
            err.message().contains("/home") && err.message().contains("0000:00:1f.2"),
            "{}",
            err.message()
        );
    }
}

#[test]
fn boot_gpu_is_refused_for_the_console_and_force_takes_it() {
    let rig = Rig::shipped("z77-rx580");
    let err = refused(&rig, "06:00.0", MoveOptions::default());
    assert!(matches!(err, Error::Protected(_)), "{err:?}");
    assert!(err.message().contains("console"), "{}", err.message());
    // force: the user chose a single-GPU setup. The slot's audio comes along.
    let moved = rig.bind_with("06:00.0", force()).unwrap();
    assert_eq!(moved, addrs(&["0000:06:00.0", "0000:06:00.1"]));
    assert!(
        rig.sim.group_viable(15),
        "the two bridges of group 15 may stay"
    );
    rig.release("06:00.0").unwrap();
    assert_eq!(rig.driver("06:00.0").as_deref(), Some("radeon"));
}

#[test]
fn one_function_of_a_slot_brings_the_others_of_its_group() {
    let rig = Rig::shipped("z77-rx580");
    let plan = rig
        .engine
        .plan("01:00.0", Direction::Bind, &MoveOptions::default())
        .unwrap();
    assert_eq!(plan.addresses(), addrs(&["0000:01:00.0", "0000:01:00.1"]));
    assert_eq!(plan.completed_with, addrs(&["0000:01:00.1"]));
    rig.bind("0000:01:00.0").unwrap();
    assert!(rig.sim.group_viable(1));
    // Releasing by the other function brings both back, too.
    assert_eq!(rig.release("01:00.1").unwrap().len(), 2);
}

/// Two cards behind one conventional PCI bridge share a group: each one
/// alone is not viable, and the refusal names the other card.
const SHARED_GROUP: &str = include_str!("../../tests/fixtures/shared-group.toml");

#[test]
fn a_group_shared_with_other_cards_is_not_viable_and_names_them() {
    let rig = Rig::from_text(SHARED_GROUP, Default::default());
    let err = refused(&rig, "05:00.0", force());
    assert!(matches!(err, Error::GroupNotViable(_)), "{err:?}");
    let m = err.message();
    assert!(
        m.contains("0000:05:01.0") && m.contains("snd_emu10k1"),
        "{m}"
    );
    assert!(
        !m.contains("0000:05:02.0"),
        "a driverless endpoint does not block: {m}"
    );
    assert!(!m.contains("0000:00:1e.0"), "the bridge may stay: {m}");
}

#[test]
fn every_reason_is_given_and_the_name_follows_the_priority() {
    // 00:1f.2: mounted filesystems (Protected) and a process holding a node
    // (DeviceBusy): one error, Protected, naming both.
    let rig = Rig::z77_with(|t| {
        t.replace(
            "mounts = [\"/\", \"/home\"]",
            "mounts = [\"/\", \"/home\"]\nnodes = [\"/dev/sda\"]\nholders = [{ pid = 4321, comm = \"smartd\", node = \"/dev/sda\" }]",
        )
    });
    let err = refused(&rig, "00:1f.2", MoveOptions::default());
    assert!(matches!(err, Error::Protected(_)), "{err:?}");
    assert!(
        err.message().contains("/home") && err.message().contains("smartd (pid 4321)"),
        "{}",
        err.message()
    );
}

#[test]
fn processes_holding_the_device_make_it_busy_until_forced() {
    let rig = Rig::shipped("z77-rx580");
    let err = refused(&rig, "00:02.0", MoveOptions::default());
    assert!(matches!(err, Error::DeviceBusy(_)), "{err:?}");
    assert!(
        err.message()
            .contains("Xorg (pid 912) holds /dev/dri/card0"),
        "{}",
        err.message()
    );
    rig.bind_with("00:02.0", force()).unwrap();
    assert_eq!(rig.driver("00:02.0").as_deref(), Some("vfio-pci"));
}

#[test]
fn a_holder_that_appears_later_is_seen() {
    let rig = Rig::shipped("z77-rx580");
    rig.sim
        .add_holder(Holder {
            pid: 2000,
            comm: "pipewire".into(),
            node: "/dev/snd/controlC1".into(),
        })
        .unwrap();
    let err = refused(&rig, "rx580", MoveOptions::default());
    assert!(
        matches!(err, Error::DeviceBusy(_)) && err.message().contains("pipewire (pid 2000)"),
        "{err:?}"
    );
    rig.sim.remove_holder(2000).unwrap();
    rig.bind("rx580").unwrap();
}

#[test]
fn no_iommu_is_refused_and_nothing_moves() {
    let rig = Rig::shipped("no-iommu-laptop");
    let target = rig
        .devices()
        .into_iter()
        .find(|d| d.class.is_display() && !d.boot_vga)
        .expect("the laptop has a dGPU")
        .address
        .to_string();
    for options in [MoveOptions::default(), force()] {
        let err = refused(&rig, &target, options);
        assert!(matches!(err, Error::NoIommu(_)), "{err:?}");
        assert!(
            err.message().contains("intel_iommu=on"),
            "{}",
            err.message()
        );
    }
}

#[test]
fn missing_vfio_module_is_refused() {
    let rig = Rig::z77_with(|t| {
        t.replace("\"vfio\", \"vfio_iommu_type1\", \"vfio_pci\", ", "")
            .replace(
                "iommu = \"intel\"",
                "iommu = \"intel\"\nmissing = [\"vfio_pci\"]",
            )
    });
    let err = refused(&rig, "rx580", MoveOptions::default());
    assert!(matches!(err, Error::NoIommu(_)), "{err:?}");
    assert!(err.message().contains("vfio_pci"), "{}", err.message());
}

#[test]
fn vfio_pci_is_loaded_on_demand() {
    let rig = Rig::z77_with(|t| t.replace("\"vfio\", \"vfio_iommu_type1\", \"vfio_pci\", ", ""));
    assert!(!rig.sim.driver_registered("vfio-pci"));
    rig.bind("rx580").unwrap();
    assert!(rig.sim.group_viable(1));
}

/// Under the shipped unit's ProtectKernelModules=yes vfio-pci is on disk
/// but cannot be loaded: refused before any write, naming the way out.
#[test]
fn vfio_pci_that_cannot_be_loaded_is_refused_before_any_write() {
    for (loading, why) in [
        ("no-cap-sys-module", "CAP_SYS_MODULE"),
        ("disabled", "modules_disabled"),
    ] {
        let rig = Rig::z77_with(|t| {
            t.replace("\"vfio\", \"vfio_iommu_type1\", \"vfio_pci\", ", "")
                .replace(
                    "iommu = \"intel\"",
                    &format!("iommu = \"intel\"\nmodule_loading = \"{loading}\""),
                )
        });
        assert!(!rig.sim.driver_registered("vfio-pci"));
        let err = refused(&rig, "rx580", MoveOptions::default());
        assert!(matches!(err, Error::NoIommu(_)), "{loading}: {err:?}");
        let m = err.message();
        for part in [why, "systemd/vfio-pci.conf", "modules-load.d"] {
            assert!(m.contains(part), "{loading}: no {part:?} in {m}");
        }
        assert_eq!(rig.overrides("01:00.0"), None, "nothing written");
    }
}

#[test]
fn bridges_are_never_moved() {
    let rig = Rig::shipped("z77-rx580");
    for options in [MoveOptions::default(), force()] {
        let err = refused(&rig, "00:01.0", options);
        assert!(
            matches!(err, Error::Protected(_)) && err.message().contains("bridge"),
            "{err:?}"
        );
    }
}

#[test]
fn bad_targets_are_clear_errors_and_change_nothing() {
    let rig = Rig::shipped("z77-rx580");
    type Expect = fn(&Error) -> bool;
    let cases: &[(&str, Expect)] = &[
        ("", |e| matches!(e, Error::InvalidArgs(_))),
        ("nosuchprofile", |e| matches!(e, Error::UnknownTarget(_))),
        ("09:00.0", |e| matches!(e, Error::UnknownTarget(_))),
        ("01:00.9", |e| matches!(e, Error::InvalidArgs(_))),
        ("0000:01:20.0", |e| matches!(e, Error::InvalidArgs(_))),
        ("../../etc", |e| matches!(e, Error::InvalidArgs(_))),
        ("rx580/x", |e| matches!(e, Error::InvalidArgs(_))),
        ("rx 580", |e| matches!(e, Error::InvalidArgs(_))),
    ];
    let long = "a".repeat(4096);
    for (target, expected) in cases.iter().copied().chain([(
        long.as_str(),
        (|e: &Error| matches!(e, Error::InvalidArgs(_))) as Expect,
    )]) {
        let err = refused(&rig, target, MoveOptions::default());
        assert!(expected(&err), "{target:?}: {err:?}");
        assert!(!err.message().is_empty());
        let before = rig.kernel_view();
        assert!(rig.release(target).is_err());
        assert_eq!(rig.kernel_view(), before);
    }
}

#[test]
fn hex_case_and_short_forms_name_the_same_device() {
    let rig = Rig::from_text(&SHARED_GROUP.replace("05:0", "0a:0"), Default::default());
    let lower = rig
        .engine
        .plan("0a:00.0", Direction::Bind, &force())
        .unwrap_err();
    let upper = rig
        .engine
        .plan("0000:0A:00.0", Direction::Bind, &force())
        .unwrap_err();
    let reasons = |e: &Error| e.message().split_once(": ").unwrap().1.to_string();
    assert_eq!(reasons(&lower), reasons(&upper));
    assert!(reasons(&lower).contains("0000:0a:01.0"));
}

// ---- faults ----

#[test]
fn a_hung_unbind_times_out_marks_the_device_stuck_and_blocks_nothing_else() {
    let rig =
        Rig::z77_with(|t| with_fault(t, "0000:01:00.1", "unbind = \"hang\"")).with_timeout_ms(300);
    std::thread::scope(|s| {
        let mover = s.spawn(|| {
            let started = Instant::now();
            (rig.bind("rx580"), started.elapsed())
        });
        // While the unbind hangs, reads answer and an unrelated group moves.
        let since = Instant::now();
        while rig.engine.activity(&addr("01:00.1")) != Some(vfiod::engine::Activity::Moving) {
            assert!(
                since.elapsed() < Duration::from_secs(10),
                "the bind never started"
            );
            std::thread::yield_now();
        }
        let read = Instant::now();
        let devices = rig.devices();
        let _ = rig.engine.device_state(&devices[0]);
        assert!(
            read.elapsed() < Duration::from_millis(50),
            "a read took {:?}",
            read.elapsed()
        );
        rig.bind("usb3")
            .expect("an unrelated group moves during the hang");

        let (result, took) = mover.join().unwrap();
        let err = result.unwrap_err();
        assert!(matches!(err, Error::Timeout(_)), "{err:?}");
        assert!(took < Duration::from_secs(3), "took {took:?}");
        assert!(
            err.message().contains("0000:01:00.1")
                && err.message().contains("unbind snd_hda_intel"),
            "{}",
            err.message()
        );
    });
    let stuck = rig
        .devices()
        .into_iter()
        .find(|d| d.address == addr("01:00.1"))
        .unwrap();
    assert_eq!(rig.engine.device_state(&stuck), DeviceState::Stuck);
    // The GPU went back to amdgpu. The audio's link went as the unbind
    // began (the real kernel's order): driverless, and said to be stuck.
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("amdgpu"));
    assert_eq!(rig.driver("01:00.1"), None);
    // A stuck device refuses further moves rather than piling on.
    assert!(matches!(rig.bind("rx580"), Err(Error::DeviceBusy(_))));
    // Once the kernel answers, it is settled back on its host driver.
    assert!(rig.sim.end_hang(&addr("01:00.1")).unwrap());
    common::wait_until("the audio is settled", Duration::from_secs(5), || {
        rig.engine.activity(&addr("01:00.1")).is_none()
    });
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("snd_hda_intel"));
}

#[test]
fn a_busy_unbind_rolls_the_whole_set_back() {
    let rig = Rig::z77_with(|t| with_fault(t, "0000:01:00.1", "unbind = \"busy\""));
    let err = rig.bind("rx580").unwrap_err();
    assert!(matches!(err, Error::DeviceBusy(_)), "{err:?}");
    assert!(err.message().contains("rolled back"), "{}", err.message());
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("amdgpu"));
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("snd_hda_intel"));
    assert_eq!(rig.overrides("01:00.0"), None);
    assert_eq!(rig.overrides("01:00.1"), None);
}

#[test]
fn a_failed_vfio_probe_is_caught_and_rolled_back() {
    let rig = Rig::z77_with(|t| with_fault(t, "0000:01:00.1", "probe = \"fail\""));
    let err = rig.bind("rx580").unwrap_err();
    assert!(matches!(err, Error::Kernel(_)), "{err:?}");
    assert!(
        err.message().contains("vfio-pci did not bind"),
        "{}",
        err.message()
    );
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("amdgpu"));
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("snd_hda_intel"));
    assert_eq!(rig.overrides("01:00.1"), None);
}

#[test]
fn a_host_driver_that_will_not_come_back_leaves_the_set_on_vfio_not_driverless() {
    let rig = Rig::z77_with(|t| with_fault(t, "0000:01:00.0", "reprobe = \"fail\""));
    rig.bind("rx580").unwrap();
    let err = rig.release("rx580").unwrap_err();
    assert!(matches!(err, Error::Kernel(_)), "{err:?}");
    assert!(
        err.message().contains("did not come back"),
        "{}",
        err.message()
    );
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("vfio-pci"));
    assert!(rig.sim.group_viable(1));
}

#[test]
fn a_device_that_vanishes_on_unbind_is_reported() {
    let rig = Rig::z77_with(|t| with_fault(t, "0000:03:00.0", "vanish = \"unbind\""));
    let err = rig.bind("usb3").unwrap_err();
    assert!(matches!(err, Error::Kernel(_)), "{err:?}");
    assert!(
        err.message().contains("0000:03:00.0") && err.message().contains("gone"),
        "{}",
        err.message()
    );
    assert!(rig.devices().iter().all(|d| d.address != addr("03:00.0")));
}

#[test]
fn timeout_ms_bounds_the_whole_move() {
    let rig = Rig::z77_with(|t| with_fault(t, "0000:01:00.1", "unbind = \"hang\""));
    let started = Instant::now();
    let options = MoveOptions {
        timeout: Some(Duration::from_millis(200)),
        ..MoveOptions::default()
    };
    let err = rig.bind_with("rx580", options).unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

// ---- ownership, memory, restarts ----

#[test]
fn a_vm_cannot_take_or_release_what_another_vm_owns() {
    let rig = Rig::shipped("z77-rx580");
    rig.bind_with("rx580", vm("win10")).unwrap();
    assert_eq!(rig.engine.owner(&addr("01:00.0")).as_deref(), Some("win10"));
    let before = rig.kernel_view();
    assert!(matches!(
        rig.bind_with("rx580", vm("linux")),
        Err(Error::Conflict(_))
    ));
    let err = rig.release_with("rx580", vm("linux")).unwrap_err();
    assert!(
        matches!(err, Error::Conflict(_)) && err.message().contains("win10"),
        "{err:?}"
    );
    assert_eq!(rig.kernel_view(), before);
    rig.release_with("rx580", vm("win10")).unwrap();
    assert_eq!(rig.engine.owner(&addr("01:00.0")), None);
}

#[test]
fn release_refuses_while_a_vm_holds_the_group_even_with_force() {
    let rig = Rig::shipped("z77-rx580");
    rig.bind("rx580").unwrap();
    rig.sim
        .add_holder(Holder {
            pid: 7777,
            comm: "qemu-system-x86".into(),
            node: "/dev/vfio/1".into(),
        })
        .unwrap();
    let before = rig.kernel_view();
    for options in [MoveOptions::default(), force()] {
        let err = rig.release_with("rx580", options).unwrap_err();
        assert!(matches!(err, Error::DeviceBusy(_)), "{err:?}");
        assert!(
            err.message()
                .contains("qemu-system-x86 (pid 7777) holds /dev/vfio/1"),
            "{}",
            err.message()
        );
    }
    assert_eq!(rig.kernel_view(), before);
}

#[test]
fn a_device_that_booted_on_vfio_goes_to_its_natural_driver() {
    let rig = Rig::z77_with(|t| {
        t.replace(
            "driver = \"xhci_hcd\"\ngroup = 14",
            "driver = \"vfio-pci\"\nhost_driver = \"xhci_hcd\"\ngroup = 14",
        )
    });
    assert_eq!(
        rig.engine.host_driver(&addr("03:00.0")),
        None,
        "nothing remembered"
    );
    rig.release("usb3").unwrap();
    assert_eq!(rig.driver("03:00.0").as_deref(), Some("xhci_hcd"));
}

#[test]
fn state_and_memory_survive_a_restart() {
    let rig = Rig::shipped("z77-rx580");
    rig.bind_with("rx580", vm("win10")).unwrap();
    let rig = rig.restart();
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(rig.engine.owner(&addr("01:00.1")).as_deref(), Some("win10"));
    assert_eq!(
        rig.engine.host_driver(&addr("01:00.1")).as_deref(),
        Some("snd_hda_intel")
    );
    rig.release("rx580").unwrap();
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("snd_hda_intel"));
}

#[test]
fn a_driver_changed_behind_our_back_is_what_the_engine_sees() {
    let rig = Rig::shipped("z77-rx580");
    rig.sim.set_driver(&addr("03:00.0"), None).unwrap();
    let dev = rig
        .devices()
        .into_iter()
        .find(|d| d.address == addr("03:00.0"))
        .unwrap();
    assert_eq!(rig.engine.device_state(&dev), DeviceState::Unbound);
    // Binding a driverless device works and remembers no host driver.
    rig.bind("usb3").unwrap();
    rig.release("usb3").unwrap();
    assert_eq!(
        rig.driver("03:00.0").as_deref(),
        Some("xhci_hcd"),
        "the natural choice"
    );
}

#[test]
fn progress_names_each_step() {
    let rig = Rig::shipped("z77-rx580");
    let steps = std::sync::Mutex::new(Vec::new());
    rig.engine
        .bind("rx580", &MoveOptions::default(), &|d, s| {
            steps.lock().unwrap().push(format!("{d} {s}"))
        })
        .unwrap();
    let steps = steps.into_inner().unwrap();
    assert_eq!(
        steps,
        [
            "0000:01:00.0 set driver_override vfio-pci",
            "0000:01:00.0 unbind amdgpu",
            "0000:01:00.0 probe vfio-pci",
            "0000:01:00.1 set driver_override vfio-pci",
            "0000:01:00.1 unbind snd_hda_intel",
            "0000:01:00.1 probe vfio-pci",
        ]
    );
}

#[test]
fn the_shipped_x570_profiles_move() {
    let rig = Rig::shipped("x570-navi");
    let config = rig.config.clone();
    for name in config.profiles.keys() {
        let moved = rig.bind(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!moved.is_empty());
        rig.release(name).unwrap();
    }
    let _ = z77_config();
}

#[test]
fn release_brings_back_a_device_left_driverless_behind_our_back() {
    let rig = Rig::shipped("z77-rx580");
    rig.bind("rx580").unwrap();
    // Someone unbinds the audio function by hand: it has no driver now.
    rig.sim.set_driver(&addr("01:00.1"), None).unwrap();
    assert_eq!(rig.driver("01:00.1"), None);
    rig.release("rx580").unwrap();
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("amdgpu"));
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("snd_hda_intel"));
    assert_eq!(rig.overrides("01:00.1"), None);
}

#[test]
fn a_udev_worker_probing_a_node_is_waited_for_not_refused() {
    let rig = Rig::shipped("z77-rx580");
    let worker = Holder {
        pid: 330,
        comm: "(udev-worker)".into(),
        node: "/dev/snd/controlC1".into(),
    };
    rig.sim.add_holder(worker.clone()).unwrap();
    std::thread::scope(|s| {
        // The worker lets go after 200 ms, as udevd's probe would.
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            rig.sim.remove_holder(330).unwrap();
        });
        rig.bind("rx580").expect("the bind waits for udev's probe");
    });
    rig.release("rx580").unwrap();
    // A worker that never lets go is named like any other holder.
    rig.sim.add_holder(worker).unwrap();
    let err = rig.bind("rx580").unwrap_err();
    assert!(
        matches!(err, Error::DeviceBusy(_)) && err.message().contains("(udev-worker) (pid 330)"),
        "{err:?}"
    );
}

/// The steps of one release of `target`, in words.
fn release_steps(rig: &Rig, target: &str) -> Vec<String> {
    let steps = std::sync::Mutex::new(Vec::new());
    rig.engine
        .release(target, &MoveOptions::default(), &|d, s| {
            steps.lock().unwrap().push(format!("{d} {s}"))
        })
        .unwrap();
    steps.into_inner().unwrap()
}

#[test]
fn a_release_moves_each_device_as_the_kernel_would_in_three_writes() {
    let rig = Rig::shipped("z77-rx580");
    rig.bind("rx580").unwrap();
    assert_eq!(
        release_steps(&rig, "rx580"),
        [
            "0000:01:00.0 clear driver_override",
            "0000:01:00.0 unbind vfio-pci",
            "0000:01:00.0 probe amdgpu",
            "0000:01:00.1 clear driver_override",
            "0000:01:00.1 unbind vfio-pci",
            "0000:01:00.1 probe snd_hda_intel",
        ]
    );
    assert_eq!(rig.overrides("01:00.0"), None);
}

#[test]
fn a_release_the_kernel_sends_elsewhere_names_the_remembered_driver() {
    let rig = Rig::shipped("z77-rx580");
    // On radeon before the bind, by hand: the kernel's own pick is amdgpu.
    rig.sim
        .set_driver(&addr("01:00.0"), Some("radeon"))
        .unwrap();
    rig.bind("rx580").unwrap();
    assert_eq!(
        rig.engine.host_driver(&addr("01:00.0")).as_deref(),
        Some("radeon")
    );
    let steps = release_steps(&rig, "rx580");
    assert_eq!(
        steps[..7],
        [
            "0000:01:00.0 clear driver_override",
            "0000:01:00.0 unbind vfio-pci",
            "0000:01:00.0 probe radeon",
            // amdgpu came: the override names radeon, and it moves again.
            "0000:01:00.0 set driver_override radeon",
            "0000:01:00.0 unbind amdgpu",
            "0000:01:00.0 probe radeon",
            "0000:01:00.0 clear driver_override",
        ]
    );
    assert_eq!(rig.driver("01:00.0").as_deref(), Some("radeon"));
    assert_eq!(rig.overrides("01:00.0"), None);
    assert_eq!(rig.driver("01:00.1").as_deref(), Some("snd_hda_intel"));
}

/// A plan reads only the functions its target names and their IOMMU
/// groups; on every shipped machine, for every device and profile, both
/// ways, with and without force, it decides exactly as it would with the
/// whole bus in hand.
#[test]
fn a_plan_reads_only_its_groups_and_decides_as_with_the_whole_bus() {
    let mut machines: Vec<String> = std::fs::read_dir(common::machines_dir())
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".toml") && !n.ends_with(".vfiod.toml"))
        .map(|n| n.trim_end_matches(".toml").to_string())
        .collect();
    machines.sort();
    assert!(machines.len() >= 4, "{machines:?}");
    let mut compared = 0;
    for name in &machines {
        let rig = Rig::shipped(name);
        let whole = rig.sim.devices().unwrap();
        let ledger = vfiod::ledger::Ledger::in_memory();
        let mut targets: Vec<String> = whole.iter().map(|d| d.address.to_string()).collect();
        targets.extend(rig.config.profiles.keys().cloned());
        targets.extend(["0000:7f:00.0".to_string(), "no-such-profile".to_string()]);
        for target in &targets {
            for direction in [Direction::Bind, Direction::Release] {
                for options in [MoveOptions::default(), force()] {
                    let planned = vfiod::plan::plan(
                        &*rig.sim,
                        &rig.config,
                        &ledger,
                        target,
                        direction,
                        &options,
                    );
                    let on_whole = vfiod::plan::plan_on(
                        &*rig.sim,
                        &whole,
                        &rig.config,
                        &ledger,
                        target,
                        direction,
                        &options,
                    );
                    assert_eq!(
                        format!("{planned:?}"),
                        format!("{on_whole:?}"),
                        "{name}: {direction} {target}"
                    );
                    compared += 1;
                }
            }
        }
    }
    assert!(compared > 100, "{compared}");

    // What the RX 580's plan read: its group, not the Z77's whole bus.
    let rig = Rig::shipped("z77-rx580");
    let read = vfiod::plan::listing_for(&*rig.sim, &rig.config, "rx580").unwrap();
    let group = read[0].iommu_group.unwrap();
    let mut members = rig.sim.group_members(group).unwrap();
    members.sort();
    assert_eq!(read.iter().map(|d| d.address).collect::<Vec<_>>(), members);
    assert!(
        read.len() < rig.sim.devices().unwrap().len() / 4,
        "{read:?}"
    );
    // A profile by id: the matching card and its group, from the ids alone.
    let read = vfiod::plan::listing_for(&*rig.sim, &rig.config, "usb3").unwrap();
    let ids = &rig.config.profile("usb3").unwrap().ids;
    assert!(!read.is_empty() && read.len() <= 2, "{read:?}");
    assert!(read.iter().any(|d| ids.contains(&d.id)), "{read:?}");
}
