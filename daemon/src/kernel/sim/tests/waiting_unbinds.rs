//! Unbinds that wait in the kernel, as the real-kernel lane sees them.

use super::*;

#[test]
fn unbinding_vfio_pci_waits_while_a_process_holds_the_group() {
    let dir = TempDir::new();
    let kernel = Arc::new(z77(&dir));
    let events = kernel.subscribe();
    let gpu = addr(GPU);
    bind_vfio(&kernel, &gpu).unwrap();
    let qemu = holder(4242, "qemu-system-x86", "/dev/vfio/1");
    kernel.add_holder(qemu.clone()).unwrap();
    assert_eq!(
        kernel.holders(&[PathBuf::from("/dev/vfio/1")]).unwrap(),
        [qemu]
    );
    while events.try_recv().is_ok() {}

    let writer = {
        let kernel = Arc::clone(&kernel);
        thread::spawn(move || kernel.unbind(&gpu, VFIO_DRIVER))
    };
    thread::sleep(BLOCKED);
    assert!(
        !writer.is_finished(),
        "the unbind must wait for QEMU to let go"
    );
    // The link is gone before vfio-pci's remove runs; the group (and
    // its node) stay until the removal ends, and no uevent yet.
    assert_eq!(driver_of(&kernel, GPU), None);
    assert_eq!(
        kernel.vfio_group_node(1),
        Some(PathBuf::from("/dev/vfio/1"))
    );
    assert!(events.try_recv().is_err());

    assert_eq!(kernel.remove_holder(4242).unwrap(), 1);
    writer.join().unwrap().unwrap();
    assert_eq!(driver_of(&kernel, GPU), None);
    assert_eq!(
        events.try_recv().unwrap(),
        event(UeventAction::Unbind, GPU, None)
    );
}

/// The lane's machine: 01:00.1 is an HDA function on snd_hda_intel with
/// ALSA nodes, 01:00.0 a display on bochs-drm with /dev/dri/card1.
fn lane_machine() -> MachineFile {
    MachineFile::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../machines/qemu-q35.toml"
    )))
    .unwrap()
}

const LANE_GPU: &str = "0000:01:00.0";
const LANE_AUDIO: &str = "0000:01:00.1";

#[test]
fn a_sound_driver_unbind_waits_for_the_cards_open_files_with_the_link_gone_at_once() {
    let dir = TempDir::new();
    let kernel = Arc::new(sim(&dir, lane_machine()));
    let events = kernel.subscribe();
    let audio = addr(LANE_AUDIO);
    kernel
        .add_holder(holder(700, "pipewire", "/dev/snd/controlC0"))
        .unwrap();
    kernel
        .add_holder(holder(701, "aplay", "/dev/snd/pcmC0D0p"))
        .unwrap();
    kernel.load_module(VFIO_MODULE).unwrap();
    kernel
        .set_driver_override(&audio, Some(VFIO_DRIVER))
        .unwrap();

    let writer = {
        let kernel = Arc::clone(&kernel);
        thread::spawn(move || kernel.unbind(&audio, "snd_hda_intel"))
    };
    thread::sleep(BLOCKED);
    assert!(!writer.is_finished(), "snd_card_free waits for the holders");
    assert_eq!(
        driver_of(&kernel, LANE_AUDIO),
        None,
        "the link goes at once"
    );
    assert!(events.try_recv().is_err(), "the uevent comes at the end");
    // The device lock is taken: driver_override reads block, and so do
    // drivers_probe and another unbind of the same device.
    let reader = {
        let kernel = Arc::clone(&kernel);
        thread::spawn(move || kernel.driver_override(&audio))
    };
    let prober = {
        let kernel = Arc::clone(&kernel);
        thread::spawn(move || kernel.probe(&audio))
    };
    thread::sleep(BLOCKED);
    assert!(
        !reader.is_finished(),
        "reading driver_override takes the device lock"
    );
    assert!(!prober.is_finished(), "drivers_probe takes the device lock");
    // Everything else answers.
    assert_eq!(driver_of(&kernel, LANE_GPU).as_deref(), Some("bochs-drm"));
    assert_eq!(
        kernel.devices().unwrap().len(),
        lane_machine().devices.len()
    );

    // One holder leaves: still waiting. The last one: done.
    assert_eq!(kernel.remove_holder(700).unwrap(), 1);
    thread::sleep(BLOCKED);
    assert!(!writer.is_finished());
    assert_eq!(kernel.remove_holder(701).unwrap(), 1);
    writer.join().unwrap().unwrap();
    assert_eq!(
        reader.join().unwrap().unwrap().as_deref(),
        Some(VFIO_DRIVER)
    );
    prober.join().unwrap().unwrap();
    assert_eq!(driver_of(&kernel, LANE_AUDIO).as_deref(), Some(VFIO_DRIVER));
    assert_eq!(
        events.try_recv().unwrap(),
        event(UeventAction::Unbind, LANE_AUDIO, None)
    );
}

#[test]
fn a_drm_driver_unbinds_at_once_with_its_card_held() {
    // bochs-drm on 6.1 (the lane's DeviceBusy/--force scenario).
    let dir = TempDir::new();
    let kernel = sim(&dir, lane_machine());
    let gpu = addr(LANE_GPU);
    kernel
        .add_holder(holder(700, "vfio-probe", "/dev/dri/card1"))
        .unwrap();
    bind_vfio(&kernel, &gpu).unwrap();
    assert_eq!(driver_of(&kernel, LANE_GPU).as_deref(), Some(VFIO_DRIVER));
}

/// The lane machine with the audio's control node held by pid 700 and,
/// after `before`, an unbind of snd_hda_intel waiting on its own thread.
fn audio_unbind_left_waiting(
    dir: &TempDir,
    before: impl FnOnce(&SimKernel),
) -> (Arc<SimKernel>, thread::JoinHandle<KernelResult<()>>) {
    let kernel = Arc::new(sim(dir, lane_machine()));
    kernel
        .add_holder(holder(700, "vfio-probe", "/dev/snd/controlC0"))
        .unwrap();
    before(&kernel);
    let writer = {
        let kernel = Arc::clone(&kernel);
        let audio = addr(LANE_AUDIO);
        thread::spawn(move || kernel.unbind(&audio, "snd_hda_intel"))
    };
    thread::sleep(BLOCKED);
    (kernel, writer)
}

#[test]
fn a_waiting_unbind_outlives_its_killed_writer_and_ends_when_the_holder_goes() {
    let dir = TempDir::new();
    let audio = addr(LANE_AUDIO);
    {
        // The writer is "killed": its thread stays parked, the kernel
        // object is left behind and a new one reads the state file.
        let (kernel, _writer) = audio_unbind_left_waiting(&dir, |kernel| {
            kernel.load_module(VFIO_MODULE).unwrap();
            kernel
                .set_driver_override(&audio, Some(VFIO_DRIVER))
                .unwrap();
        });
        assert_eq!(driver_of(&kernel, LANE_AUDIO), None);
    }
    let kernel = Arc::new(sim(&dir, lane_machine()));
    assert_eq!(driver_of(&kernel, LANE_AUDIO), None, "still pending");
    let reader = {
        let kernel = Arc::clone(&kernel);
        thread::spawn(move || kernel.driver_override(&audio))
    };
    thread::sleep(BLOCKED);
    assert!(!reader.is_finished(), "the device lock is still taken");
    // A second unbind of the same driver waits too, then succeeds.
    let second = {
        let kernel = Arc::clone(&kernel);
        thread::spawn(move || kernel.unbind(&audio, "snd_hda_intel"))
    };
    thread::sleep(BLOCKED);
    assert!(!second.is_finished());

    let events = kernel.subscribe();
    assert_eq!(kernel.remove_holder(700).unwrap(), 1);
    second.join().unwrap().unwrap();
    assert_eq!(
        reader.join().unwrap().unwrap().as_deref(),
        Some(VFIO_DRIVER)
    );
    assert_eq!(
        events.try_recv().unwrap(),
        event(UeventAction::Unbind, LANE_AUDIO, None)
    );
    // Nobody probed: the device is left without a driver, as the real
    // kernel leaves it when the writer was killed.
    assert_eq!(driver_of(&kernel, LANE_AUDIO), None);
    kernel.probe(&audio).unwrap();
    assert_eq!(driver_of(&kernel, LANE_AUDIO).as_deref(), Some(VFIO_DRIVER));
}

#[test]
fn a_removal_whose_holder_left_while_nothing_ran_ends_at_the_next_start() {
    let dir = TempDir::new();
    let audio = addr(LANE_AUDIO);
    audio_unbind_left_waiting(&dir, |_| {});
    // Another process (a tool run while vfiod is down) lets go.
    {
        let kernel = sim(&dir, lane_machine());
        assert_eq!(kernel.remove_holder(700).unwrap(), 1);
        assert_eq!(kernel.driver_override(&audio).unwrap(), None);
    }
    let kernel = sim(&dir, lane_machine());
    assert_eq!(kernel.driver_override(&audio).unwrap(), None);
    assert_eq!(driver_of(&kernel, LANE_AUDIO), None);
    let text = std::fs::read_to_string(kernel.state_file()).unwrap();
    assert!(!text.contains("unbinding"), "{text}");
}

#[test]
fn hot_unplug_ends_a_waiting_unbind() {
    let dir = TempDir::new();
    let audio = addr(LANE_AUDIO);
    let (kernel, writer) = audio_unbind_left_waiting(&dir, |_| {});
    assert!(!writer.is_finished());
    kernel.remove_device(&audio).unwrap();
    writer.join().unwrap().unwrap();
    assert!(kernel.device(&audio).unwrap().is_none());
    kernel.restore_device(&audio).unwrap();
    assert_eq!(
        driver_of(&kernel, LANE_AUDIO).as_deref(),
        Some("snd_hda_intel")
    );
}
