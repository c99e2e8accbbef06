//! The host facts as read from fixture trees laid out like a real host.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::accounts;
use super::libvirt::{descriptor_images, parse_domain, parse_qemu_conf};
use super::*;
use crate::Inspect;
use crate::facts::{FramebufferView, QemuConfValue};
use crate::sysfs::fixture::{Fixture, KERNEL_RELEASE};

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

#[test]
fn an_empty_tree_knows_almost_nothing() {
    let fx = Fixture::new();
    let host = fx.kernel().host().unwrap();
    assert_eq!(host.kernel_release.as_deref(), Some(KERNEL_RELEASE));
    assert_eq!(host.cmdline, None);
    assert_eq!(host.cpu_flags, None);
    assert_eq!(host.acpi_tables, None);
    assert_eq!(host.interrupt_remapping, None);
    assert_eq!(host.hugepages, None);
    assert_eq!(host.qemu_conf, None);
    assert_eq!(host.accounts, None);
    assert_eq!(host.firmware, None);
    assert_eq!(host.hooks, None);
    assert_eq!(host.domains, None);
    // The fixture has a dev/ without kvm, and an empty sys/module.
    assert_eq!(host.kvm, Some(false));
    assert_eq!(host.loaded_modules, Some(BTreeSet::new()));
}

#[test]
fn cpu_firmware_command_line_and_memory() {
    let fx = Fixture::new();
    fx.cpu_flags("fpu vme de pse vmx smx est");
    fx.cmdline("BOOT_IMAGE=/vmlinuz root=/dev/sda2 intel_iommu=on iommu=pt");
    fx.kvm();
    fx.acpi_tables(&["APIC", "DMAR", "FACP"]);
    fx.hugepages(2048, 0, 0);
    fx.hugepages(1048576, 8, 6);
    fx.write(
        "proc/meminfo",
        "MemTotal:       16318412 kB\nMemFree: 1 kB\n",
    );
    let host = fx.kernel().host().unwrap();
    assert!(host.cpu_flags.unwrap().contains(&"vmx".to_owned()));
    assert_eq!(host.kvm, Some(true));
    assert_eq!(
        host.acpi_tables.unwrap(),
        ["APIC", "DMAR", "FACP"].map(String::from)
    );
    assert!(host.cmdline.unwrap().ends_with("iommu=pt"));
    assert_eq!(
        host.hugepages.unwrap(),
        vec![
            HugepagePool {
                size_kb: 2048,
                total: 0,
                free: 0
            },
            HugepagePool {
                size_kb: 1048576,
                total: 8,
                free: 6
            }
        ]
    );
    assert_eq!(host.mem_total_kb, Some(16318412));
}

#[test]
fn interrupt_remapping_from_proc_interrupts_else_the_iommu_ecap() {
    let fx = Fixture::new();
    fx.write(
        "proc/interrupts",
        "           CPU0\n  0:  38  IR-IO-APIC    2-edge      timer\n 24:  0  IR-PCI-MSI-0000:00:14.0  0-edge  xhci_hcd\n",
    );
    assert_eq!(fx.kernel().host().unwrap().interrupt_remapping, Some(true));
    fx.write(
        "proc/interrupts",
        "           CPU0\n  0:  38  IO-APIC    2-edge      timer\n 24:  0  PCI-MSI-0000:00:14.0  0-edge  xhci_hcd\n",
    );
    assert_eq!(fx.kernel().host().unwrap().interrupt_remapping, Some(false));
    // Without /proc/interrupts: the IR bit (3) of an Intel IOMMU's ecap.
    fx.remove("proc/interrupts");
    fx.write(
        "sys/devices/virtual/iommu/dmar0/intel-iommu/ecap",
        "f02052\n",
    );
    fx.link("sys/class/iommu/dmar0", "sys/devices/virtual/iommu/dmar0");
    assert_eq!(fx.kernel().host().unwrap().interrupt_remapping, Some(false));
    fx.write(
        "sys/devices/virtual/iommu/dmar0/intel-iommu/ecap",
        "f0205a\n",
    );
    assert_eq!(fx.kernel().host().unwrap().interrupt_remapping, Some(true));

    fx.write(
        "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts",
        "Y\n",
    );
    assert_eq!(
        fx.kernel().host().unwrap().allow_unsafe_interrupts,
        Some(true)
    );
}

#[test]
fn loaded_and_built_in_modules_and_vfio_ids_in_modprobe_d() {
    let fx = Fixture::new();
    fx.loaded_module("vfio_pci");
    fx.write("sys/module/vfio/initstate", "live\n");
    // A built-in module with parameters has a sys/module entry too.
    fx.write("sys/module/kvm/parameters/halt_poll_ns", "0\n");
    fx.module_list(
        "modules.builtin",
        "kernel/drivers/vfio/vfio_iommu_type1.ko\nkernel/drivers/pci/pci-stub.ko\n",
    );
    fx.write(
        "etc/modprobe.d/vfio.conf",
        "# rx580\noptions vfio-pci ids=1002:67df,1002:aaf0 disable_vga=1\nsoftdep amdgpu pre: vfio-pci\n",
    );
    fx.write(
        "etc/modprobe.d/other.conf.bak",
        "options vfio-pci ids=10de:1b80\n",
    );
    let host = fx.kernel().host().unwrap();
    assert_eq!(
        host.loaded_modules.unwrap(),
        BTreeSet::from(["vfio".to_owned(), "vfio_pci".to_owned()])
    );
    assert_eq!(
        host.builtin_modules.unwrap(),
        BTreeSet::from(["pci_stub".to_owned(), "vfio_iommu_type1".to_owned()])
    );
    assert_eq!(
        host.modprobe_vfio_ids.unwrap(),
        vec!["1002:67df".parse().unwrap(), "1002:aaf0".parse().unwrap()]
    );
}

#[test]
fn per_function_power_and_driver_override() {
    let fx = Fixture::new();
    let dir = fx
        .pci("0000:01:00.0")
        .id("1002:67df")
        .class("0x030000")
        .add();
    fx.write(dir.join("d3cold_allowed"), "1\n");
    fx.write(
        dir.join("firmware_node/power_resources_D3hot/LNXPOWER:0a"),
        "",
    );
    let other = fx.pci("0000:02:00.0").class("0x020000").add();
    fx.write(other.join("d3cold_allowed"), "0\n");
    fx.remove(other.join("driver_override"));
    let host = fx.kernel().host().unwrap();
    let gpu = &host.devices[&addr("0000:01:00.0")];
    assert_eq!(
        (gpu.d3cold_allowed, gpu.d3cold_capable, gpu.driver_override),
        (Some(true), Some(true), Some(true))
    );
    let nic = &host.devices[&addr("0000:02:00.0")];
    assert_eq!(
        (nic.d3cold_allowed, nic.d3cold_capable, nic.driver_override),
        (Some(false), Some(false), Some(false))
    );
}

#[test]
fn a_drivers_framebuffer_is_on_its_pci_function() {
    let fx = Fixture::new();
    let gpu = fx
        .pci("0000:06:00.0")
        .id("1002:6779")
        .class("0x030000")
        .boot_vga(true)
        .add();
    fx.framebuffer(0, &gpu);
    fx.write("proc/fb", "0 radeondrmfb\n");
    let fbs = fx.kernel().host().unwrap().framebuffers.unwrap();
    assert_eq!(
        fbs,
        vec![FramebufferView {
            name: "radeondrmfb".into(),
            device: Some(addr("0000:06:00.0"))
        }]
    );
    assert!(!fbs[0].is_firmware());
}

#[test]
fn a_firmware_framebuffer_is_found_in_iomem_under_its_gpus_bar() {
    let fx = Fixture::new();
    fx.pci("0000:00:02.0")
        .id("8086:0162")
        .class("0x030000")
        .boot_vga(true)
        .add();
    fx.pci("0000:01:00.0")
        .id("1002:67df")
        .class("0x030000")
        .boot_vga(false)
        .add();
    let efi = fx.platform_device("efi-framebuffer.0");
    fx.framebuffer(0, &efi);
    fx.write("proc/fb", "0 EFI VGA\n");
    // The firmware set the card in slot 01:00.0 up, not the boot VGA flag's.
    fx.write(
        "proc/iomem",
        "c0000000-dfffffff : PCI Bus 0000:00\n  c0000000-cfffffff : PCI Bus 0000:01\n    c0000000-cfffffff : 0000:01:00.0\n      c0000000-c02fffff : efifb\n",
    );
    let fbs = fx.kernel().host().unwrap().framebuffers.unwrap();
    assert!(
        fbs.iter()
            .any(|fb| fb.name == "EFI VGA" && fb.device == Some(addr("0000:01:00.0"))),
        "{fbs:?}"
    );
    assert!(fbs.iter().all(FramebufferView::is_firmware), "{fbs:?}");
}

#[test]
fn a_firmware_framebuffer_region_is_matched_to_a_bar_by_address() {
    let fx = Fixture::new();
    let gpu = fx
        .pci("0000:01:00.0")
        .id("1002:67df")
        .class("0x030000")
        .add();
    fx.write(
        gpu.join("resource"),
        "0x00000000e0000000 0x00000000efffffff 0x000000000014220c\n0x0000000000000000 0x0000000000000000 0x0000000000000000\n",
    );
    // simpledrm without fbdev: only iomem shows it, not nested.
    fx.write("proc/iomem", "e0000000-e07fffff : BOOTFB\n");
    let fbs = fx.kernel().host().unwrap().framebuffers.unwrap();
    assert_eq!(
        fbs,
        vec![FramebufferView {
            name: "BOOTFB".into(),
            device: Some(addr("0000:01:00.0"))
        }]
    );
}

#[test]
fn a_live_firmware_framebuffer_without_iomem_is_the_boot_vgas() {
    let fx = Fixture::new();
    fx.pci("0000:00:02.0")
        .id("8086:0162")
        .class("0x030000")
        .boot_vga(true)
        .add();
    let simple = fx.platform_device("simple-framebuffer.0");
    fx.mkdir(simple.join("drm/card0"));
    // Left behind by an older kernel after the native driver took over: not live.
    fx.platform_device("efi-framebuffer.0");
    let fbs = fx.kernel().host().unwrap().framebuffers.unwrap();
    assert_eq!(
        fbs,
        vec![FramebufferView {
            name: "simple-framebuffer.0".into(),
            device: Some(addr("0000:00:02.0"))
        }]
    );
}

#[test]
fn qemu_conf_set_unset_and_the_build_default_hint() {
    let conf = parse_qemu_conf(
        "# Some examples of valid values are:\n#\n#       user = \"qemu\"   # A user named \"qemu\"\n#user = \"libvirt-qemu\"\n\n#group = \"libvirt-qemu\"\n",
    );
    assert_eq!(
        conf.user,
        QemuConfValue::Unset {
            hint: Some("libvirt-qemu".into())
        }
    );
    assert_eq!(conf.user.effective(), "libvirt-qemu");
    let conf = parse_qemu_conf("user = \"nobody\"\ngroup = \"kvm\" # for OVMF\nuser=\"qemu\"\n");
    assert_eq!(conf.user, QemuConfValue::Set("qemu".into()));
    assert_eq!(conf.group, QemuConfValue::Set("kvm".into()));
    let conf = parse_qemu_conf("# nothing about users\n");
    assert_eq!(conf.user, QemuConfValue::Unset { hint: None });
    assert_eq!(conf.group.effective(), "root");
    assert_eq!(conf.path, PathBuf::from("/etc/libvirt/qemu.conf"));
}

#[test]
fn accounts_give_a_users_groups() {
    let accounts = accounts::parse(
        "root:x:0:0::/root:/bin/sh\nlibvirt-qemu:x:64055:108:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\n",
        "root:x:0:\nkvm:x:104:libvirt-qemu,alice\nlibvirt-qemu:x:108:\n",
    );
    assert_eq!(
        accounts.groups_of("libvirt-qemu"),
        BTreeSet::from(["kvm".to_owned(), "libvirt-qemu".to_owned()])
    );
    assert_eq!(accounts.user_name(64055), Some("libvirt-qemu"));
    assert_eq!(accounts.group_name(104), Some("kvm"));
}

const EDK2_JSON: &str = r#"{
    "description": "OVMF with SB+SMM, empty varstore",
    "interface-types": ["uefi"],
    "mapping": {
        "device": "flash",
        "executable": {"filename": "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "format": "raw"},
        "nvram-template": {"filename": "/usr/share/OVMF/OVMF_VARS_4M.fd", "format": "raw"}
    },
    "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
    "features": ["secure-boot"],
    "tags": []
}"#;

#[test]
fn firmware_descriptors_name_their_images() {
    assert_eq!(
        descriptor_images(EDK2_JSON, "x86_64"),
        vec![
            PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"),
            PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.fd")
        ]
    );
    assert!(descriptor_images(EDK2_JSON, "aarch64").is_empty());
    let memory = r#"{"interface-types": ["uefi"], "mapping": {"device": "memory", "filename": "/usr/share/OVMF/OVMF.amdsev.fd"}, "targets": [{"architecture": "x86_64"}]}"#;
    assert_eq!(
        descriptor_images(memory, "x86_64"),
        vec![PathBuf::from("/usr/share/OVMF/OVMF.amdsev.fd")]
    );
    let bios = r#"{"interface-types": ["bios"], "mapping": {"device": "memory", "filename": "/usr/share/seabios/bios.bin"}}"#;
    assert!(descriptor_images(bios, "x86_64").is_empty());
    assert!(descriptor_images("not json", "x86_64").is_empty());
}

#[test]
fn firmware_images_with_owner_and_mode_and_masking_in_etc() {
    let fx = Fixture::new();
    fx.accounts(
        "root",
        "kvm",
        "nobody:x:65534:65534::/:/bin/false\n",
        "nobody:x:65534:\n",
    );
    let json = EDK2_JSON.replace("\"x86_64\"", &format!("\"{}\"", std::env::consts::ARCH));
    fx.write("usr/share/qemu/firmware/40-edk2-secboot.json", &json);
    fx.write(
        "usr/share/qemu/firmware/50-masked.json",
        &json.replace("OVMF_CODE_4M.secboot", "OTHER"),
    );
    fx.write("etc/qemu/firmware/50-masked.json", "");
    fx.write_mode("usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "code", 0o640);
    let firmware = fx.kernel().host().unwrap().firmware.unwrap();
    assert_eq!(firmware.len(), 2, "{firmware:?}");
    let code = &firmware[0];
    assert_eq!(
        code.path,
        PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
    );
    assert_eq!(
        code.descriptor.as_deref(),
        Some(std::path::Path::new(
            "/usr/share/qemu/firmware/40-edk2-secboot.json"
        ))
    );
    let stat = code.stat.as_ref().unwrap();
    assert_eq!(stat.describe(), "root:kvm 0640");
    let nobody = BTreeSet::from(["nobody".to_owned()]);
    assert!(!stat.readable_by("nobody", &nobody));
    assert!(stat.readable_by("nobody", &BTreeSet::from(["kvm".to_owned()])));
    assert!(stat.readable_by("root", &nobody));
    // The NVRAM template is not installed.
    assert_eq!(firmware[1].stat, None);
}

#[test]
fn hooks_and_domains_under_etc_libvirt() {
    let fx = Fixture::new();
    fx.write_mode(
        "etc/libvirt/hooks/qemu.d/vfiod",
        "#!/bin/sh\nexec /usr/bin/vfioctl libvirt-hook \"$@\"\n",
        0o755,
    );
    fx.write_mode("etc/libvirt/hooks/qemu", "#!/bin/sh\nexit 0\n", 0o644);
    fx.write(
        "etc/libvirt/qemu/win10.xml",
        "<domain type='kvm'><name>win10</name><memory unit='GiB'>8</memory><memoryBacking><hugepages/></memoryBacking><devices><hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source></hostdev></devices></domain>",
    );
    fx.write("etc/libvirt/qemu/broken.xml", "<domain><name>");
    let host = fx.kernel().host().unwrap();
    let hooks = host.hooks.unwrap();
    assert_eq!(hooks.len(), 2, "{hooks:?}");
    assert!(!hooks[0].executable && !hooks[0].calls_vfioctl);
    assert!(hooks[1].executable && hooks[1].calls_vfioctl);
    assert_eq!(
        hooks[1].path,
        PathBuf::from("/etc/libvirt/hooks/qemu.d/vfiod")
    );
    let domains = host.domains.unwrap();
    assert_eq!(domains.len(), 1);
    assert_eq!(domains[0].name, "win10");
    assert_eq!(domains[0].memory_kb, Some(8 * 1024 * 1024));
    assert!(domains[0].hugepages);
    assert_eq!(domains[0].hostdevs[0].address, addr("0000:01:00.0"));
    assert!(domains[0].hostdevs[0].managed);
}

#[test]
fn domain_xml_units_managed_and_addresses() {
    let xml = "<domain type='kvm'>\n  <name>win11</name>\n  <memory>16777216</memory>\n  <devices>\n    <hostdev mode='subsystem' type='pci' managed='no'>\n      <source><address bus='10' slot='0' function='1'/></source>\n    </hostdev>\n    <hostdev mode='subsystem' type='pci'>\n      <source><address domain='0x0000' bus='0x0b' slot='0x00' function='0x3'/></source>\n    </hostdev>\n    <hostdev mode='subsystem' type='usb'><source><vendor id='0x046d'/></source></hostdev>\n  </devices>\n</domain>\n";
    let domain = parse_domain(xml, PathBuf::from("/etc/libvirt/qemu/win11.xml")).unwrap();
    assert_eq!(domain.memory_kb, Some(16 * 1024 * 1024));
    assert!(!domain.hugepages);
    let hostdevs: Vec<(String, bool)> = domain
        .hostdevs
        .iter()
        .map(|h| (h.address.to_string(), h.managed))
        .collect();
    assert_eq!(
        hostdevs,
        vec![
            ("0000:0a:00.1".to_owned(), false),
            ("0000:0b:00.3".to_owned(), false)
        ]
    );
    let mib = "<domain><name>x</name><memory unit='MiB'>2048</memory></domain>";
    assert_eq!(
        parse_domain(mib, PathBuf::new()).unwrap().memory_kb,
        Some(2 * 1024 * 1024)
    );
    assert!(parse_domain("<network><name>default</name></network>", PathBuf::new()).is_none());
    assert!(
        parse_domain(
            "<!DOCTYPE d [<!ENTITY a 'aaaa'>]><domain><name>&a;</name></domain>",
            PathBuf::new()
        )
        .is_none()
    );
}
