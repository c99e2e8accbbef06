//! The control surface, uevents, and the running state across restarts.

use super::*;

#[test]
fn holders_mounts_usb_and_console_come_from_the_machine_file_and_the_control_surface() {
    let dir = TempDir::new();
    let mut machine = z77_machine();
    // Storage behind a root port: its mounts count for the port too.
    let nic = machine
        .devices
        .iter_mut()
        .find(|d| d.address == addr("02:00.0"))
        .unwrap();
    nic.mounts = vec!["/srv".into()];
    let kernel = sim(&dir, machine);

    let card0 = PathBuf::from("/dev/dri/card0");
    let xorg = holder(912, "Xorg", "/dev/dri/card0");
    assert_eq!(
        kernel.holders(std::slice::from_ref(&card0)).unwrap(),
        [xorg]
    );
    assert_eq!(
        kernel.holders(&[PathBuf::from("/dev/dri/card1")]).unwrap(),
        []
    );

    let pipewire = holder(1300, "pipewire", "/dev/snd/controlC1");
    kernel.add_holder(pipewire.clone()).unwrap();
    kernel.add_holder(pipewire.clone()).unwrap();
    let audio_nodes = kernel.nodes(&addr(AUDIO)).unwrap();
    assert_eq!(kernel.holders(&audio_nodes).unwrap(), [pipewire]);
    assert_eq!(kernel.remove_holder(1300).unwrap(), 1);
    assert_eq!(kernel.holders(&audio_nodes).unwrap(), []);
    assert_eq!(
        kernel.remove_holder(912).unwrap(),
        1,
        "machine-file holders can leave too"
    );
    assert_eq!(kernel.holders(&[card0]).unwrap(), []);
    assert!(matches!(
        kernel.add_holder(holder(1, "x", "dev/null")),
        Err(KernelError::Malformed { .. })
    ));

    assert_eq!(
        kernel.mounts_behind(&addr("00:1f.2")).unwrap(),
        ["/", "/home"]
    );
    assert_eq!(kernel.mounts_behind(&addr("00:1c.2")).unwrap(), ["/srv"]);
    assert_eq!(
        kernel.mounts_behind(&addr("00:1c.4")).unwrap(),
        Vec::<String>::new()
    );

    let usb = kernel.usb_behind(&addr("00:14.0")).unwrap();
    assert_eq!(usb.len(), 2);
    assert!(usb.iter().all(UsbDevice::is_input));
    assert_eq!(
        kernel.usb_behind(&addr("03:00.0")).unwrap()[0].name,
        "USB hard disk"
    );
    assert_eq!(kernel.usb_behind(&addr(GPU)).unwrap(), []);
}

#[test]
fn changes_behind_vfiods_back_are_announced() {
    let dir = TempDir::new();
    let kernel = z77(&dir);
    let events = kernel.subscribe();
    let audio = addr(AUDIO);

    kernel.set_driver(&audio, Some(VFIO_DRIVER)).unwrap();
    kernel.set_driver(&audio, Some(VFIO_DRIVER)).unwrap();
    kernel.set_driver(&audio, Some("pci-stub")).unwrap();
    assert!(kernel.driver_registered("pci-stub"));
    kernel.set_driver(&audio, None).unwrap();
    assert_eq!(
        events.try_iter().collect::<Vec<_>>(),
        [
            event(UeventAction::Unbind, AUDIO, None),
            event(UeventAction::Bind, AUDIO, Some(VFIO_DRIVER)),
            event(UeventAction::Unbind, AUDIO, None),
            event(UeventAction::Bind, AUDIO, Some("pci-stub")),
            event(UeventAction::Unbind, AUDIO, None),
        ]
    );

    // Unplugging a bridge takes everything behind it, deepest first.
    kernel.remove_device(&addr("00:1c.6")).unwrap();
    assert_eq!(
        events.try_iter().collect::<Vec<_>>(),
        [
            event(UeventAction::Unbind, "06:00.1", None),
            event(UeventAction::Remove, "06:00.1", None),
            event(UeventAction::Unbind, "06:00.0", None),
            event(UeventAction::Remove, "06:00.0", None),
            event(UeventAction::Remove, "05:00.0", None),
            event(UeventAction::Remove, "04:00.0", None),
            event(UeventAction::Unbind, "00:1c.6", None),
            event(UeventAction::Remove, "00:1c.6", None),
        ]
    );
    assert_eq!(kernel.devices().unwrap().len(), 18);

    // A rescan for the GPU brings back the bridges above it first.
    kernel.restore_device(&addr("06:00.0")).unwrap();
    assert_eq!(
        events.try_iter().collect::<Vec<_>>(),
        [
            event(UeventAction::Add, "00:1c.6", None),
            event(UeventAction::Bind, "00:1c.6", Some("pcieport")),
            event(UeventAction::Add, "04:00.0", None),
            event(UeventAction::Add, "05:00.0", None),
            event(UeventAction::Add, "06:00.0", None),
            event(UeventAction::Bind, "06:00.0", Some("radeon")),
        ]
    );
    kernel.restore_device(&addr("06:00.0")).unwrap();
    assert!(
        events.try_recv().is_err(),
        "restoring a present device changes nothing"
    );
    assert!(matches!(
        kernel.restore_device(&addr("09:00.0")),
        Err(KernelError::NoDevice(_))
    ));
}

#[test]
fn uevents_reach_every_live_subscriber() {
    let dir = TempDir::new();
    let kernel = z77(&dir);
    let first = kernel.subscribe();
    let dropped = kernel.subscribe();
    drop(dropped);
    let second = kernel.subscribe();

    bind_vfio(&kernel, &addr(GPU)).unwrap();
    let expected = [
        event(UeventAction::Unbind, GPU, None),
        event(UeventAction::Bind, GPU, Some(VFIO_DRIVER)),
    ];
    assert_eq!(first.try_iter().collect::<Vec<_>>(), expected);
    assert_eq!(second.try_iter().collect::<Vec<_>>(), expected);
    assert_eq!(
        kernel.lock().subscribers.len(),
        2,
        "the dropped receiver is forgotten"
    );
}

#[test]
fn the_running_state_survives_a_restart_even_without_drop() {
    let dir = TempDir::new();
    let kernel = z77(&dir);
    bind_vfio(&kernel, &addr(GPU)).unwrap();
    kernel
        .set_driver_override(&addr("03:00.0"), Some(VFIO_DRIVER))
        .unwrap();
    kernel
        .add_holder(holder(4242, "qemu-system-x86", "/dev/vfio/1"))
        .unwrap();
    kernel.remove_device(&addr("02:00.0")).unwrap();
    kernel
        .set_driver(&addr("00:1a.0"), Some("pci-stub"))
        .unwrap();
    let devices = kernel.devices().unwrap();
    // As after kill -9: no destructor runs.
    std::mem::forget(kernel);

    let kernel = z77(&dir);
    assert_eq!(kernel.devices().unwrap(), devices);
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some(VFIO_DRIVER));
    assert_eq!(
        kernel.vfio_group_node(1),
        Some(PathBuf::from("/dev/vfio/1"))
    );
    assert_eq!(
        kernel
            .holders(&[PathBuf::from("/dev/vfio/1")])
            .unwrap()
            .len(),
        1
    );
    assert_eq!(kernel.device(&addr("02:00.0")).unwrap(), None);
    assert!(kernel.driver_registered("pci-stub"));
    let leftovers: Vec<_> = std::fs::read_dir(dir.state())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, [STATE_FILE]);
}

#[test]
fn a_changed_machine_file_boots_afresh() {
    let dir = TempDir::new();
    let machine_file = dir.0.join("machine.toml");
    let text = std::fs::read_to_string(Z77).unwrap();
    std::fs::write(&machine_file, &text).unwrap();
    let kernel = SimKernel::open(&machine_file, &dir.state()).unwrap();
    bind_vfio(&kernel, &addr(GPU)).unwrap();
    drop(kernel);

    let kernel = SimKernel::open(&machine_file, &dir.state()).unwrap();
    assert_eq!(
        driver_of(&kernel, GPU).as_deref(),
        Some(VFIO_DRIVER),
        "same file: resumed"
    );
    drop(kernel);

    std::fs::write(&machine_file, format!("{text}\n# edited\n")).unwrap();
    let kernel = SimKernel::open(&machine_file, &dir.state()).unwrap();
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
    assert_eq!(kernel.vfio_group_node(1), None);
}

#[test]
fn a_corrupt_state_file_is_set_aside_and_the_machine_boots_afresh() {
    let dir = TempDir::new();
    drop(z77(&dir));
    let state_file = dir.state().join(STATE_FILE);
    let garbage = "{\"format\": 1, \"machine\": tru";
    std::fs::write(&state_file, garbage).unwrap();

    let kernel = z77(&dir);
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
    let aside = dir.state().join("sim-state.json.corrupt");
    assert_eq!(std::fs::read_to_string(aside).unwrap(), garbage);
    let rewritten = std::fs::read(&state_file).unwrap();
    serde_json::from_slice::<RunningState>(&rewritten).expect("a fresh, valid state");

    // Another format version is treated alike, not misread.
    let other = String::from_utf8(rewritten)
        .unwrap()
        .replace("\"format\": 1", "\"format\": 99");
    std::fs::write(&state_file, other).unwrap();
    drop(kernel);
    let kernel = z77(&dir);
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
}

#[test]
fn open_errors_name_the_file() {
    let dir = TempDir::new();
    let missing = dir.0.join("no-such-machine.toml");
    let err = SimKernel::open(&missing, &dir.state()).unwrap_err();
    assert!(matches!(err, SimError::Machine(_)));
    assert!(err.to_string().contains("no-such-machine.toml"), "{err}");

    let bad = dir.0.join("bad.toml");
    std::fs::write(&bad, "[machine]\niommu = \"arm\"\n").unwrap();
    let err = SimKernel::open(&bad, &dir.state()).unwrap_err().to_string();
    assert!(err.contains("bad.toml") && err.contains("arm"), "{err}");

    let not_a_dir = dir.0.join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let err = SimKernel::open(Path::new(Z77), &not_a_dir.join("state")).unwrap_err();
    assert!(matches!(err, SimError::State { .. }));
    assert!(
        err.to_string().contains(&not_a_dir.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_failed_state_write_changes_nothing() {
    let dir = TempDir::new();
    let kernel = z77(&dir);
    let events = kernel.subscribe();
    std::fs::remove_dir_all(dir.state()).unwrap();
    let err = kernel.unbind(&addr(GPU), "amdgpu").unwrap_err();
    assert!(err.to_string().contains(STATE_FILE), "{err}");
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
    assert!(events.try_recv().is_err());
}

#[test]
fn fingerprints_tell_files_apart() {
    assert_eq!(fingerprint(b"abc"), fingerprint(b"abc"));
    assert_ne!(fingerprint(b"abc"), fingerprint(b"abd"));
    assert_eq!(fingerprint(b""), "fnv1a64:cbf29ce484222325:0");
}

#[test]
fn sim_kernel_is_send_and_sync() {
    fn assert_kernel<K: Kernel>() {}
    assert_kernel::<SimKernel>();
}
