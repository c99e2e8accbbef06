use super::*;

fn address(text: &str) -> PciAddress {
    text.parse().unwrap()
}

fn event(action: UeventAction, device: &str, driver: Option<&str>) -> MonitorEvent {
    MonitorEvent::Uevent(crate::kernel::Uevent {
        action,
        address: address(device),
        driver: driver.map(str::to_string),
    })
}

/// A view with the GPU on amdgpu and its audio on vfio-pci.
fn published() -> Snapshot {
    let mut snapshot = Snapshot::default();
    for (device, driver) in [("0000:01:00.0", "amdgpu"), ("0000:01:00.1", "vfio-pci")] {
        snapshot.devices.insert(
            address(device),
            DeviceProperties {
                address: device.into(),
                driver: driver.into(),
                ..DeviceProperties::default()
            },
        );
    }
    snapshot
}

fn devices(entries: &[(&str, Reread)]) -> UeventRereads {
    UeventRereads::Devices(entries.iter().map(|(a, w)| (address(a), *w)).collect())
}

const GPU: &str = "0000:01:00.0";
const AUDIO: &str = "0000:01:00.1";

#[test]
fn a_bind_of_the_published_driver_is_an_echo_and_reads_nothing() {
    let view = published();
    let nobody_moving = |_: &PciAddress| false;
    use UeventAction::*;
    // The echo of a move of ours that ended on amdgpu.
    let echo = [event(Bind, GPU, Some("amdgpu"))];
    assert_eq!(rereads_after(&echo, &view, nobody_moving), devices(&[]));
    // Its unbind before it is read: it may be someone's, not ours.
    let both = [event(Unbind, GPU, None), event(Bind, GPU, Some("amdgpu"))];
    assert_eq!(
        rereads_after(&both, &view, nobody_moving),
        devices(&[(GPU, Reread::Driver)])
    );
    // Another driver than the view's, or a bind that doesn't say which.
    for unknown in [Some("radeon"), None] {
        let bind = [event(Bind, GPU, unknown)];
        assert_eq!(
            rereads_after(&bind, &view, nobody_moving),
            devices(&[(GPU, Reread::Driver)]),
            "{unknown:?}"
        );
    }
    // A device the view doesn't have yet is read.
    let new = [event(Bind, "0000:02:00.0", Some("xhci_hcd"))];
    assert_eq!(
        rereads_after(&new, &view, nobody_moving),
        devices(&[("0000:02:00.0", Reread::Driver)])
    );
}

#[test]
fn each_device_is_read_as_much_as_its_events_need() {
    let view = published();
    use UeventAction::*;
    let events = [
        event(Unbind, AUDIO, None),
        event(Change, GPU, None),
        event(Unbind, GPU, None),
    ];
    assert_eq!(
        rereads_after(&events, &view, |_| false),
        devices(&[(GPU, Reread::Whole), (AUDIO, Reread::Driver)])
    );
    // A device in a move of ours is read when the move ends.
    assert_eq!(
        rereads_after(&events, &view, |a| *a == address(GPU)),
        devices(&[(AUDIO, Reread::Driver)])
    );
    // A function added or removed: the whole bus, moving or not.
    for action in [Add, Remove] {
        let events = [event(Unbind, AUDIO, None), event(action, GPU, None)];
        assert_eq!(
            rereads_after(&events, &view, |_| true),
            UeventRereads::WholeBus
        );
    }
}

#[test]
fn lost_uevents_read_the_whole_bus() {
    let view = published();
    use UeventAction::*;
    // Alone, or among events that would read nothing or one device: the
    // kernel dropped others, which may have added or removed functions.
    for events in [
        vec![MonitorEvent::Overflow],
        vec![
            event(Bind, GPU, Some("amdgpu")),
            MonitorEvent::Overflow,
            event(Unbind, AUDIO, None),
        ],
    ] {
        assert_eq!(
            rereads_after(&events, &view, |_| true),
            UeventRereads::WholeBus,
            "{events:?}"
        );
    }
}

#[test]
fn the_log_names_each_device_and_how_much_is_read() {
    assert_eq!(UeventRereads::WholeBus.to_string(), "the whole bus");
    assert_eq!(devices(&[]).to_string(), "nothing");
    assert_eq!(
        devices(&[(GPU, Reread::Whole), (AUDIO, Reread::Driver)]).to_string(),
        "0000:01:00.0 (whole), 0000:01:00.1 (driver)"
    );
}
