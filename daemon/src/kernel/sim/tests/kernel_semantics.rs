//! The kernel's semantics of DESIGN §2, fault by fault: overrides, unbind, probe, modules.

use super::*;

#[test]
fn z77_devices_are_the_machine_file_at_boot() {
    let dir = TempDir::new();
    let kernel = z77(&dir);
    let devices = kernel.devices().unwrap();
    assert_eq!(devices.len(), 23);
    assert!(devices.windows(2).all(|w| w[0].address < w[1].address));

    let gpu = kernel.device(&addr(GPU)).unwrap().unwrap();
    assert_eq!(gpu.id.to_string(), "1002:67df");
    assert_eq!(gpu.class.to_string(), "0x030000");
    assert_eq!(
        gpu.name,
        "Ellesmere [Radeon RX 470/480/570/570X/580/580X/590]"
    );
    assert_eq!(gpu.driver.as_deref(), Some("amdgpu"));
    assert_eq!(kernel.driver_override(&gpu.address).unwrap(), None);
    assert_eq!(gpu.iommu_group, Some(1));
    assert_eq!(gpu.parent, Some(addr(ROOT_PORT)));
    assert_eq!(gpu.reset_methods, ["bus"]);
    assert_eq!(
        kernel.nodes(&gpu.address).unwrap(),
        [
            PathBuf::from("/dev/dri/card1"),
            PathBuf::from("/dev/dri/renderD129")
        ]
    );
    assert!(!gpu.boot_vga);

    let boot_vga = kernel.device(&addr("06:00.0")).unwrap().unwrap();
    assert!(boot_vga.boot_vga);
    assert!(kernel.console_on(&addr("06:00.0")).unwrap());
    assert!(!kernel.console_on(&addr(GPU)).unwrap());
    let host_bridge = kernel.device(&addr("00:00.0")).unwrap().unwrap();
    assert_eq!(host_bridge.driver, None);
    assert!(host_bridge.is_bridge());

    assert!(kernel.iommu_enabled().unwrap());
    assert_eq!(kernel.device(&addr("09:00.0")).unwrap(), None);
    assert!(matches!(
        kernel.driver(&addr("09:00.0")),
        Err(KernelError::NoDevice(_))
    ));
    assert_eq!(kernel.machine().devices.len(), 23);
}

#[test]
fn unset_override_reads_null_and_clearing_writes_newline() {
    let dir = TempDir::new();
    let kernel = z77(&dir);
    let gpu = addr(GPU);
    assert_eq!(kernel.driver_override(&gpu).unwrap(), None);

    kernel.set_driver_override(&gpu, Some(VFIO_DRIVER)).unwrap();
    assert_eq!(
        kernel.driver_override(&gpu).unwrap().as_deref(),
        Some(VFIO_DRIVER)
    );
    // Setting the override alone moves nothing.
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));

    kernel.set_driver_override(&gpu, None).unwrap();
    assert_eq!(kernel.driver_override(&gpu).unwrap(), None);

    // The kernel stops at the first newline; an empty value clears.
    kernel
        .set_driver_override(&gpu, Some("vfio-pci\n"))
        .unwrap();
    assert_eq!(
        kernel.driver_override(&gpu).unwrap().as_deref(),
        Some(VFIO_DRIVER)
    );
    kernel.set_driver_override(&gpu, Some("")).unwrap();
    assert_eq!(kernel.driver_override(&gpu).unwrap(), None);

    let too_long = "x".repeat(OVERRIDE_MAX_LEN + 1);
    let err = kernel
        .set_driver_override(&gpu, Some(&too_long))
        .unwrap_err();
    assert_eq!(errno(&err), Some(libc::EINVAL), "{err}");
    let err = kernel
        .set_driver_override(&addr("09:00.0"), Some(VFIO_DRIVER))
        .unwrap_err();
    assert!(matches!(err, KernelError::NoDevice(_)), "{err}");
}

#[test]
fn z77_gpu_moves_to_vfio_and_back_and_the_group_becomes_viable_only_whole() {
    let dir = TempDir::new();
    let kernel = z77(&dir);
    let (gpu, audio) = (addr(GPU), addr(AUDIO));
    assert_eq!(kernel.vfio_group_node(1), None);
    assert!(!kernel.group_viable(1));

    bind_vfio(&kernel, &gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some(VFIO_DRIVER));
    // The node appears with the first device; the audio still on its host
    // driver keeps the group from being viable; the root port may stay.
    assert_eq!(
        kernel.vfio_group_node(1),
        Some(PathBuf::from("/dev/vfio/1"))
    );
    assert!(!kernel.group_viable(1));
    assert_eq!(driver_of(&kernel, ROOT_PORT).as_deref(), Some("pcieport"));

    bind_vfio(&kernel, &audio).unwrap();
    assert!(kernel.group_viable(1));
    assert_eq!(kernel.vfio_group_node(14), None);

    // A driverless endpoint does not spoil viability.
    kernel.set_driver(&audio, None).unwrap();
    assert!(kernel.group_viable(1));

    release(&kernel, &gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
    assert_eq!(kernel.driver_override(&gpu).unwrap(), None);
    assert_eq!(
        kernel.vfio_group_node(1),
        None,
        "no device of group 1 is on vfio-pci any more"
    );
    assert!(!kernel.group_viable(1));
    release(&kernel, &audio).unwrap();
    assert_eq!(driver_of(&kernel, AUDIO).as_deref(), Some("snd_hda_intel"));
}

#[test]
fn unbind_from_a_driver_the_device_is_not_on_fails_like_sysfs() {
    let dir = TempDir::new();
    let kernel = z77(&dir);
    let gpu = addr(GPU);
    let err = kernel.unbind(&gpu, "radeon").unwrap_err();
    assert_eq!(errno(&err), Some(libc::ENODEV), "{err}");
    assert!(
        err.to_string()
            .contains("/sys/bus/pci/drivers/radeon/unbind"),
        "{err}"
    );
    let err = kernel.unbind(&gpu, "nouveau").unwrap_err();
    assert_eq!(
        errno(&err),
        Some(libc::ENOENT),
        "no such driver directory: {err}"
    );
    let err = kernel.unbind(&addr("09:00.0"), "amdgpu").unwrap_err();
    assert_eq!(errno(&err), Some(libc::ENODEV), "{err}");
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));

    kernel.unbind(&gpu, "amdgpu").unwrap();
    assert_eq!(driver_of(&kernel, GPU), None);
    let err = kernel.unbind(&gpu, "amdgpu").unwrap_err();
    assert_eq!(errno(&err), Some(libc::ENODEV), "{err}");
}

#[test]
fn probe_binds_the_natural_driver_or_the_override_and_leaves_bound_devices_alone() {
    let dir = TempDir::new();
    let kernel = z77(&dir);
    let gpu = addr(GPU);
    let events = kernel.subscribe();

    // Already bound: nothing happens, whatever the override says.
    kernel.set_driver_override(&gpu, Some(VFIO_DRIVER)).unwrap();
    kernel.probe(&gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
    assert!(events.try_recv().is_err());

    // Any registered driver named by the override binds, and only it.
    kernel.unbind(&gpu, "amdgpu").unwrap();
    kernel.set_driver_override(&gpu, Some("radeon")).unwrap();
    kernel.probe(&gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("radeon"));
    kernel.unbind(&gpu, "radeon").unwrap();
    kernel.set_driver_override(&gpu, Some("nouveau")).unwrap();
    kernel.probe(&gpu).unwrap();
    assert_eq!(
        driver_of(&kernel, GPU),
        None,
        "nouveau is not registered: nothing binds"
    );

    kernel.set_driver_override(&gpu, None).unwrap();
    kernel.probe(&gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));

    let err = kernel.probe(&addr("09:00.0")).unwrap_err();
    assert_eq!(errno(&err), Some(libc::ENODEV), "{err}");
    assert!(
        err.to_string().contains("/sys/bus/pci/drivers_probe"),
        "{err}"
    );
}

#[test]
fn vfio_pci_does_not_bind_without_an_iommu_and_probe_still_succeeds() {
    let dir = TempDir::new();
    let kernel = sim(
        &dir,
        gpu_machine("iommu = \"none\"\nmodules = [\"vfio_pci\"]", ""),
    );
    let gpu = addr(GPU);
    assert!(!kernel.iommu_enabled().unwrap());
    assert!(kernel.driver_registered(VFIO_DRIVER));
    assert_eq!(kernel.device(&gpu).unwrap().unwrap().iommu_group, None);

    bind_vfio(&kernel, &gpu).expect("drivers_probe succeeds even when nothing binds");
    assert_eq!(driver_of(&kernel, GPU), None);

    release(&kernel, &gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
}

#[test]
fn probe_fail_keeps_vfio_pci_off_and_the_host_driver_returns() {
    let dir = TempDir::new();
    let kernel = sim(&dir, gpu_machine(WITH_VFIO, "fault = { probe = \"fail\" }"));
    let gpu = addr(GPU);
    bind_vfio(&kernel, &gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU), None);
    assert_eq!(kernel.vfio_group_node(1), None);
    // Every time, not once.
    kernel.probe(&gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU), None);

    release(&kernel, &gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
}

#[test]
fn reprobe_fail_lets_vfio_pci_in_but_the_host_driver_never_back() {
    let dir = TempDir::new();
    let kernel = sim(
        &dir,
        gpu_machine(WITH_VFIO, "fault = { reprobe = \"fail\" }"),
    );
    let gpu = addr(GPU);
    bind_vfio(&kernel, &gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some(VFIO_DRIVER));

    release(&kernel, &gpu).unwrap();
    assert_eq!(
        driver_of(&kernel, GPU),
        None,
        "a failed release is a driverless device"
    );
    // Not by name either.
    kernel.set_driver_override(&gpu, Some("amdgpu")).unwrap();
    kernel.probe(&gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU), None);
    // vfio-pci still takes it.
    bind_vfio(&kernel, &gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some(VFIO_DRIVER));
}

#[test]
fn a_hanging_unbind_takes_the_link_and_holds_the_device_lock_until_it_ends() {
    let dir = TempDir::new();
    let kernel = Arc::new(sim(
        &dir,
        gpu_machine(WITH_VFIO, "fault = { unbind = \"hang\" }"),
    ));
    let events = kernel.subscribe();
    let gpu = addr(GPU);
    kernel.set_driver_override(&gpu, Some(VFIO_DRIVER)).unwrap();
    let writer = {
        let kernel = Arc::clone(&kernel);
        thread::spawn(move || kernel.unbind(&gpu, "amdgpu"))
    };
    // As on the real kernel: the link goes at once, before remove() runs.
    wait_until("the driver link goes", || driver_of(&kernel, GPU).is_none());
    let blocked: Vec<thread::JoinHandle<String>> = vec![
        {
            let kernel = Arc::clone(&kernel);
            thread::spawn(move || format!("{:?}", kernel.driver_override(&gpu)))
        },
        {
            let kernel = Arc::clone(&kernel);
            thread::spawn(move || {
                format!("{:?}", kernel.set_driver_override(&gpu, Some(VFIO_DRIVER)))
            })
        },
        {
            let kernel = Arc::clone(&kernel);
            thread::spawn(move || format!("{:?}", kernel.probe(&gpu)))
        },
        {
            let kernel = Arc::clone(&kernel);
            thread::spawn(move || format!("{:?}", kernel.unbind(&gpu, "amdgpu")))
        },
    ];
    thread::sleep(BLOCKED);
    assert!(
        !writer.is_finished(),
        "unbind returned despite unbind = \"hang\""
    );
    for (what, thread) in [
        "read driver_override",
        "write driver_override",
        "drivers_probe",
        "another unbind",
    ]
    .iter()
    .zip(&blocked)
    {
        assert!(
            !thread.is_finished(),
            "{what} did not wait for the device lock"
        );
    }
    // Reads without the device lock, and other devices, still answer.
    assert_eq!(kernel.devices().unwrap().len(), 3);
    bind_vfio(&kernel, &addr(AUDIO)).unwrap();
    assert_eq!(driver_of(&kernel, AUDIO).as_deref(), Some(VFIO_DRIVER));
    while let Ok(event) = events.try_recv() {
        assert_ne!(
            event,
            self::event(UeventAction::Unbind, GPU, None),
            "the unbind uevent comes when the removal ends"
        );
    }
    assert!(!writer.is_finished());

    // The hang ends: the writer and everything behind the lock return, the
    // device is left without a driver, its override still set.
    assert!(kernel.end_hang(&gpu).unwrap());
    writer.join().unwrap().unwrap();
    let answers: Vec<String> = blocked.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(answers[0], "Ok(Some(\"vfio-pci\"))", "{answers:?}");
    // The second unbind finds the device unbound once it has the lock.
    assert!(answers[1..].iter().all(|a| a == "Ok(())"), "{answers:?}");
    assert_eq!(
        events.recv().unwrap(),
        event(UeventAction::Unbind, GPU, None)
    );
    assert!(!kernel.end_hang(&gpu).unwrap(), "nothing hangs any more");
}

#[test]
fn a_hang_outlives_its_writer_and_ends_after_a_restart() {
    let dir = TempDir::new();
    let machine = gpu_machine(WITH_VFIO, "fault = { unbind = \"hang\" }");
    let gpu = addr(GPU);
    {
        let kernel = Arc::new(sim(&dir, machine.clone()));
        let writer = Arc::clone(&kernel);
        thread::spawn(move || writer.unbind(&gpu, "amdgpu"));
        wait_until("the driver link goes", || driver_of(&kernel, GPU).is_none());
    }
    // vfiod killed mid-hang: the removal is still pending on the machine.
    let kernel = Arc::new(sim(&dir, machine));
    let reader = {
        let kernel = Arc::clone(&kernel);
        thread::spawn(move || kernel.driver_override(&gpu))
    };
    thread::sleep(BLOCKED);
    assert!(!reader.is_finished(), "the device lock is still held");
    assert!(kernel.end_hang(&gpu).unwrap());
    assert_eq!(reader.join().unwrap().unwrap(), None);
    assert_eq!(driver_of(&kernel, GPU), None);
}

#[test]
fn a_busy_unbind_fails_with_ebusy_every_time() {
    let dir = TempDir::new();
    let kernel = sim(
        &dir,
        gpu_machine(WITH_VFIO, "fault = { unbind = \"busy\" }"),
    );
    let gpu = addr(GPU);
    for _ in 0..2 {
        let err = kernel.unbind(&gpu, "amdgpu").unwrap_err();
        assert!(err.is_busy(), "{err}");
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
    }
    let err = bind_vfio(&kernel, &gpu).unwrap_err();
    assert!(err.is_busy(), "{err}");
}

#[test]
fn a_vanishing_device_leaves_the_bus_once_unbound_and_a_rescan_brings_it_back() {
    let dir = TempDir::new();
    let kernel = sim(
        &dir,
        gpu_machine(WITH_VFIO, "fault = { vanish = \"unbind\" }"),
    );
    let gpu = addr(GPU);
    let events = kernel.subscribe();
    kernel.set_driver_override(&gpu, Some(VFIO_DRIVER)).unwrap();
    kernel.unbind(&gpu, "amdgpu").unwrap();
    assert_eq!(
        events.try_iter().collect::<Vec<_>>(),
        [
            event(UeventAction::Unbind, GPU, None),
            event(UeventAction::Remove, GPU, None)
        ]
    );
    assert_eq!(kernel.device(&gpu).unwrap(), None);
    assert_eq!(kernel.devices().unwrap().len(), 2);
    assert!(matches!(kernel.driver(&gpu), Err(KernelError::NoDevice(_))));
    assert!(matches!(
        kernel.driver_override(&gpu),
        Err(KernelError::NoDevice(_))
    ));
    assert!(matches!(
        kernel.mounts_behind(&gpu),
        Err(KernelError::NoDevice(_))
    ));
    let err = kernel.probe(&gpu).unwrap_err();
    assert_eq!(errno(&err), Some(libc::ENODEV), "{err}");
    assert!(matches!(
        kernel.remove_device(&gpu),
        Err(KernelError::NoDevice(_))
    ));

    kernel.restore_device(&gpu).unwrap();
    assert_eq!(
        events.try_iter().collect::<Vec<_>>(),
        [
            event(UeventAction::Add, GPU, None),
            event(UeventAction::Bind, GPU, Some("amdgpu"))
        ]
    );
    assert_eq!(
        kernel.driver_override(&gpu).unwrap(),
        None,
        "a new device has no override"
    );
}

#[test]
fn a_missing_vfio_module_cannot_be_loaded_and_nothing_binds() {
    let dir = TempDir::new();
    let kernel = sim(
        &dir,
        gpu_machine("iommu = \"intel\"\nmissing = [\"vfio-pci\"]", ""),
    );
    let gpu = addr(GPU);
    assert!(!kernel.driver_registered(VFIO_DRIVER));
    assert!(!kernel.module_available("vfio_pci"));
    assert!(!kernel.module_available("vfio-pci"));
    assert!(
        kernel.module_available("kvm"),
        "other modules load on demand"
    );

    let err = kernel.load_module("vfio-pci").unwrap_err();
    assert!(matches!(err, KernelError::Module { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("Module vfio_pci not found in directory /lib/modules/6.1.0-sim"),
        "{err}"
    );

    // Asked anyway: drivers_probe succeeds and the device stays driverless.
    kernel.set_driver_override(&gpu, Some(VFIO_DRIVER)).unwrap();
    kernel.unbind(&gpu, "amdgpu").unwrap();
    kernel.probe(&gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU), None);
}

#[test]
fn no_module_loads_when_module_loading_is_forbidden() {
    for loading in ["no-cap-sys-module", "disabled"] {
        let dir = TempDir::new();
        let machine = format!("iommu = \"intel\"\nmodule_loading = \"{loading}\"");
        let kernel = sim(&dir, gpu_machine(&machine, ""));
        assert!(kernel.module_available(VFIO_MODULE), "on disk");
        assert!(!kernel.module_loading().is_allowed());
        let err = kernel.load_module("vfio-pci").unwrap_err();
        assert!(
            err.to_string().contains("Operation not permitted"),
            "{loading}: {err}"
        );
        assert!(!kernel.driver_registered(VFIO_DRIVER));
    }
    // A value the simulator does not know is refused, like any unknown key.
    let text = std::fs::read_to_string(Z77).unwrap().replace(
        "iommu = \"intel\"",
        "iommu = \"intel\"\nmodule_loading = \"maybe\"",
    );
    assert!(MachineFile::parse(&text, Path::new("inline.toml")).is_err());
}

#[test]
fn vfio_pci_loads_on_demand_with_its_dependencies() {
    let dir = TempDir::new();
    let kernel = sim(&dir, gpu_machine("iommu = \"amd\"", ""));
    let gpu = addr(GPU);
    assert!(!kernel.driver_registered(VFIO_DRIVER));
    assert!(kernel.module_available(VFIO_MODULE));
    assert!(kernel.driver_registered("amdgpu") && kernel.driver_registered("snd-hda-intel"));

    // Before the module is in, the override finds no driver.
    kernel.set_driver_override(&gpu, Some(VFIO_DRIVER)).unwrap();
    kernel.unbind(&gpu, "amdgpu").unwrap();
    kernel.probe(&gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU), None);

    kernel.load_module("vfio-pci").unwrap();
    assert!(kernel.driver_registered(VFIO_DRIVER));
    assert!(
        kernel.driver_registered("vfio_pci"),
        "- and _ compare alike"
    );
    assert!(kernel.module_available("vfio_iommu_type1") && kernel.module_available("vfio"));
    kernel
        .load_module(VFIO_MODULE)
        .expect("loading twice is fine");
    kernel.probe(&gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some(VFIO_DRIVER));
}

#[test]
fn a_device_that_boots_on_vfio_pci_returns_to_its_host_driver() {
    let dir = TempDir::new();
    let kernel = sim(
        &dir,
        gpu_machine_booting_on(VFIO_DRIVER, "iommu = \"intel\"", "host_driver = \"amdgpu\""),
    );
    let gpu = addr(GPU);
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some(VFIO_DRIVER));
    assert!(
        kernel.driver_registered(VFIO_DRIVER),
        "bound at boot, so loaded"
    );
    assert_eq!(
        kernel.vfio_group_node(1),
        Some(PathBuf::from("/dev/vfio/1"))
    );
    release(&kernel, &gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
    bind_vfio(&kernel, &gpu).unwrap();
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some(VFIO_DRIVER));
}

#[test]
fn vfio_pci_never_binds_a_pci_bridge() {
    let dir = TempDir::new();
    let kernel = z77(&dir);
    let port = addr(ROOT_PORT);
    bind_vfio(&kernel, &port).unwrap();
    assert_eq!(driver_of(&kernel, ROOT_PORT), None);
    let err = kernel.set_driver(&port, Some(VFIO_DRIVER)).unwrap_err();
    assert_eq!(errno(&err), Some(libc::EINVAL), "{err}");
}
