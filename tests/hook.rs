//! `vfioctl libvirt-hook` (DESIGN §8) with libvirt's argument conventions
//! and real domain XML on stdin, against vfiod on a private bus.

use vfiod_tests::{Rig, assert_exit, machine, stderr};

fn domain(name: &str, hostdevs: &[(&str, &str)]) -> String {
    let mut devices = String::new();
    for (address, managed) in hostdevs {
        let (bus, rest) = address.split_once(':').unwrap();
        let (slot, function) = rest.split_once('.').unwrap();
        devices.push_str(&format!(
            "    <hostdev mode='subsystem' type='pci' managed='{managed}'>\n      <driver name='vfio'/>\n      <source>\n        <address domain='0x0000' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/>\n      </source>\n    </hostdev>\n"
        ));
    }
    format!(
        r#"<domain type='kvm' id='3'>
  <name>{name}</name>
  <uuid>5e3c7b2a-2f7e-4a8c-9c59-0f8d2d7c1a11</uuid>
  <memory unit='KiB'>8388608</memory>
  <vcpu placement='static'>4</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-8.2'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <hostdev mode='subsystem' type='usb' managed='yes'>
      <source>
        <vendor id='0x046d'/>
        <product id='0xc52b'/>
      </source>
    </hostdev>
{devices}  </devices>
</domain>
"#
    )
}

fn hook(rig: &Rig, name: &str, op: &str, sub: &str, xml: &str) -> std::process::Output {
    let config = rig.config.to_str().unwrap().to_string();
    rig.vfioctl_stdin(
        &["libvirt-hook", name, op, sub, "-", "--config", &config],
        xml,
    )
}

#[test]
fn prepare_binds_the_domains_profiles_and_release_gives_them_back() {
    let rig = Rig::z77();
    let xml = domain("win10", &[]);
    let out = hook(&rig, "win10", "prepare", "begin", &xml);
    assert_exit(&out, 0);
    for address in ["01:00.0", "01:00.1", "03:00.0"] {
        assert_eq!(rig.driver(address), "vfio-pci", "{address}");
        assert_eq!(rig.device_property(address, "Owner"), "win10");
    }
    // libvirt's later calls are ignored at once.
    for (op, sub) in [("start", "begin"), ("started", "begin"), ("stopped", "end")] {
        assert_exit(&hook(&rig, "win10", op, sub, &xml), 0);
    }
    assert_eq!(rig.driver("01:00.0"), "vfio-pci");
    let out = hook(&rig, "win10", "release", "end", &xml);
    assert_exit(&out, 0);
    assert_eq!(rig.driver("01:00.0"), "amdgpu");
    assert_eq!(rig.driver("01:00.1"), "snd_hda_intel");
    assert_eq!(rig.driver("03:00.0"), "xhci_hcd");
}

#[test]
fn managed_no_hostdevs_are_bound_and_managed_yes_ones_are_left_to_libvirt() {
    let rig = Rig::z77();
    let xml = domain("linux", &[("03:00.0", "no")]);
    assert_exit(&hook(&rig, "linux", "prepare", "begin", &xml), 0);
    assert_eq!(rig.driver("03:00.0"), "vfio-pci");
    assert_eq!(rig.device_property("03:00.0", "Owner"), "linux");
    assert_exit(&hook(&rig, "linux", "release", "end", &xml), 0);
    assert_eq!(rig.driver("03:00.0"), "xhci_hcd");

    let xml = domain("linux", &[("01:00.0", "yes")]);
    assert_exit(&hook(&rig, "linux", "prepare", "begin", &xml), 0);
    assert_eq!(
        rig.driver("01:00.0"),
        "amdgpu",
        "managed='yes' is libvirt's to move"
    );
}

#[test]
fn a_domain_with_nothing_for_vfiod_passes_even_when_vfiod_is_down() {
    let mut rig = Rig::z77();
    rig.kill_vfiod();
    let xml = domain("fedora", &[]);
    for (op, sub) in [
        ("prepare", "begin"),
        ("release", "end"),
        ("started", "begin"),
    ] {
        let out = hook(&rig, "fedora", op, sub, &xml);
        assert_exit(&out, 0);
    }
    // A domain that does need vfiod fails the start when vfiod is down.
    let out = hook(&rig, "win10", "prepare", "begin", &domain("win10", &[]));
    assert_ne!(out.status.code(), Some(0));
    assert!(!stderr(&out).is_empty());
}

const SHARED_GROUP: &str = include_str!("fixtures/shared-group.toml");

#[test]
fn a_non_viable_group_fails_the_start_and_moves_nothing() {
    let rig = Rig::with_text(SHARED_GROUP, "");
    let xml = domain("win10", &[("06:00.0", "no"), ("05:00.0", "no")]);
    let out = hook(&rig, "win10", "prepare", "begin", &xml);
    assert_ne!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(
        err.contains("GroupNotViable") && err.contains("0000:05:01.0"),
        "{err}"
    );
    // The xHCI it bound first was released again.
    assert_eq!(rig.driver("06:00.0"), "xhci_hcd");
    assert_eq!(rig.driver("05:00.0"), "nouveau");
    // libvirt still runs release/end after a failed prepare: nothing to undo.
    assert_exit(&hook(&rig, "win10", "release", "end", &xml), 0);
    assert_eq!(rig.driver("06:00.0"), "xhci_hcd");
}

#[test]
fn release_never_takes_what_another_domain_owns() {
    let rig = Rig::z77();
    assert_exit(
        &hook(&rig, "win10", "prepare", "begin", &domain("win10", &[])),
        0,
    );
    let other = domain("other", &[("01:00.0", "no")]);
    let out = hook(&rig, "other", "prepare", "begin", &other);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("Conflict") || stderr(&out).contains("win10"),
        "{}",
        stderr(&out)
    );
    let _ = hook(&rig, "other", "release", "end", &other);
    assert_eq!(rig.driver("01:00.0"), "vfio-pci");
    assert_eq!(rig.device_property("01:00.0", "Owner"), "win10");
}

/// DESIGN §8, ownership: rx580 goes to vfio-pci as vfiod starts, win10
/// uses it, and it stays there when win10 is done.
#[test]
fn a_boot_vfio_profile_stays_on_vfio_after_the_domain_releases() {
    let machine_text = std::fs::read_to_string(machine("z77-rx580.toml")).unwrap();
    let rig = Rig::with_text(&machine_text, &vfiod_tests::z77_config_rx580_at_boot());
    assert_eq!(rig.driver("01:00.0"), "vfio-pci", "bound at start");
    let xml = domain("win10", &[]);
    assert_exit(&hook(&rig, "win10", "prepare", "begin", &xml), 0);
    assert_eq!(rig.device_property("01:00.0", "Owner"), "");
    assert_eq!(rig.device_property("03:00.0", "Owner"), "win10");
    assert_exit(&hook(&rig, "win10", "release", "end", &xml), 0);
    assert_eq!(rig.driver("01:00.0"), "vfio-pci");
    assert_eq!(rig.driver("01:00.1"), "vfio-pci");
    assert_eq!(
        rig.driver("03:00.0"),
        "xhci_hcd",
        "what win10 took goes back"
    );
}

/// An administrator binds the xHCI; a domain using it and a card of a
/// non-viable group fails to start and must not take the xHCI from the
/// administrator, neither then nor at `release end`.
#[test]
fn a_failed_prepare_releases_nothing_it_did_not_take() {
    let rig = Rig::with_text(SHARED_GROUP, "");
    assert_exit(&rig.vfioctl(&["bind", "06:00.0"]), 0);
    let xml = domain("win10", &[("06:00.0", "no"), ("05:00.0", "no")]);
    let out = hook(&rig, "win10", "prepare", "begin", &xml);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("GroupNotViable"), "{}", stderr(&out));
    assert_eq!(rig.driver("06:00.0"), "vfio-pci", "the administrator's");
    assert_exit(&hook(&rig, "win10", "release", "end", &xml), 0);
    assert_eq!(rig.driver("06:00.0"), "vfio-pci", "the administrator's");
    assert_eq!(rig.driver("05:00.0"), "nouveau");
}

#[test]
fn xml_that_is_not_xml_is_a_usage_error_and_moves_nothing() {
    let rig = Rig::z77();
    for garbage in [
        "",
        "not xml at all",
        "<domain><name>win10</name>",
        "<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaa'>]><domain>&a;</domain>",
    ] {
        let out = hook(&rig, "win10", "prepare", "begin", garbage);
        assert_exit(&out, 2);
    }
    assert_eq!(rig.driver("01:00.0"), "amdgpu");
    let _ = machine("z77-rx580.toml");
}

/// libvirt names each function of the GPU as its own hostdev; the hook
/// moves the completed set once, not once per function (the second call
/// was a no-op that cost a VM start 0.08-0.52 s on the real kernel).
#[test]
fn the_functions_of_one_set_are_moved_in_one_call() {
    let rig = Rig::with_text(
        &std::fs::read_to_string(machine("z77-rx580.toml")).unwrap(),
        "",
    );
    let xml = domain("linux", &[("01:00.0", "no"), ("01:00.1", "no")]);
    let moves = |direction: &str| {
        rig.log()
            .lines()
            .filter(|l| l.contains("move planned") && l.contains(&format!("direction={direction}")))
            .count()
    };
    assert_exit(&hook(&rig, "linux", "prepare", "begin", &xml), 0);
    assert_eq!(rig.driver("01:00.0"), "vfio-pci");
    assert_eq!(rig.driver("01:00.1"), "vfio-pci");
    assert_eq!(moves("bind"), 1, "{}", rig.log());
    assert_exit(&hook(&rig, "linux", "release", "end", &xml), 0);
    assert_eq!(rig.driver("01:00.0"), "amdgpu");
    assert_eq!(rig.driver("01:00.1"), "snd_hda_intel");
    assert_eq!(moves("release"), 1, "{}", rig.log());
}
