use std::path::{Path, PathBuf};

use vfiod_pci::{Holder, PciAddress, PciClass, PciDevice, UsbDevice};

use super::fixture::Fixture;
use super::fixture::desktop::*;
use super::*;

mod display;

#[test]
fn reads_every_attribute_of_a_function() {
    let fx = desktop();
    let kernel = fx.kernel();
    let gpu = kernel
        .device(&addr(GPU))
        .unwrap()
        .expect("the GPU is on the bus");
    assert_eq!(
        gpu,
        PciDevice {
            address: addr(GPU),
            id: id("1002:67df"),
            subsystem: Some(id("1da2:e366")),
            class: PciClass(0x030000),
            name: "Ellesmere [Radeon RX 470/480/570/570X/580/580X/590]".into(),
            driver: Some("amdgpu".into()),
            iommu_group: Some(1),
            parent: Some(addr(ROOT_PORT)),
            boot_vga: false,
            reset_methods: vec!["bus".into()],
        }
    );
    assert_eq!(
        kernel.nodes(&addr(GPU)).unwrap(),
        paths(&["/dev/dri/card1", "/dev/dri/renderD129", "/dev/fb1"])
    );
}

#[test]
fn lists_every_function_in_address_order() {
    let fx = desktop();
    let devices = fx.kernel().devices().unwrap();
    let addresses: Vec<String> = devices.iter().map(|d| d.address.to_string()).collect();
    assert_eq!(
        addresses,
        [
            "0000:00:00.0",
            ROOT_PORT,
            IGPU,
            XHCI,
            NVME_PORT,
            SATA,
            GPU,
            GPU_AUDIO,
            NVME,
            USB_CARD
        ]
    );
    let audio = devices
        .iter()
        .find(|d| d.address == addr(GPU_AUDIO))
        .unwrap();
    assert_eq!(
        audio.name,
        "Ellesmere HDMI Audio [Radeon RX 470/480 / 570/580/590]"
    );
    assert_eq!(audio.reset_methods, ["flr", "bus"]);
    assert_eq!(
        fx.kernel().nodes(&audio.address).unwrap(),
        paths(&["/dev/snd/controlC1", "/dev/snd/pcmC1D3p"])
    );
    assert!(!audio.boot_vga, "no boot_vga file");
}

#[test]
fn reads_absent_and_unset_attributes_as_none() {
    let fx = desktop();
    let kernel = fx.kernel();
    let host_bridge = kernel.device(&addr("0000:00:00.0")).unwrap().unwrap();
    assert_eq!(host_bridge.driver, None);
    assert_eq!(host_bridge.parent, None, "pci0000:00 is not a function");
    assert_eq!(host_bridge.subsystem, None);
    assert_eq!(host_bridge.reset_methods, Vec::<String>::new());
    assert_eq!(host_bridge.name, "", "8086:0150 is not in this pci.ids");
    assert!(host_bridge.is_bridge());

    let card = kernel.device(&addr(USB_CARD)).unwrap().unwrap();
    assert_eq!(card.driver, None);
    // Read on its own: the kernel takes the device lock to show it, so the
    // model never reads it while listing devices.
    assert_eq!(
        kernel.driver_override(&card.address).unwrap().as_deref(),
        Some("vfio-pci")
    );

    fx.remove(fx.function_dir(GPU).join("iommu_group"));
    fx.remove(fx.function_dir(GPU).join("driver_override"));
    let gpu = kernel.device(&addr(GPU)).unwrap().unwrap();
    assert_eq!(gpu.iommu_group, None);
    assert_eq!(kernel.driver_override(&gpu.address).unwrap(), None);

    let igpu = kernel.device(&addr(IGPU)).unwrap().unwrap();
    assert!(igpu.boot_vga);
    assert_eq!(igpu.reset_methods, [RESET_METHOD_UNKNOWN]);
    assert_eq!(
        kernel.nodes(&igpu.address).unwrap(),
        paths(&["/dev/dri/card0", "/dev/fb0"])
    );
}

#[test]
fn a_bridge_does_not_own_the_nodes_of_the_functions_behind_it() {
    let fx = desktop();
    let port = fx.kernel().device(&addr(ROOT_PORT)).unwrap().unwrap();
    assert_eq!(
        fx.kernel().nodes(&port.address).unwrap(),
        Vec::<PathBuf>::new()
    );
    assert_eq!(port.parent, None);
}

#[test]
fn finds_nodes_deep_below_a_controller() {
    let fx = desktop();
    let kernel = fx.kernel();
    let xhci = kernel.nodes(&addr(XHCI)).unwrap();
    assert!(
        xhci.contains(&PathBuf::from("/dev/input/event5")),
        "{xhci:?}"
    );
    assert!(
        xhci.iter().any(|node| node.starts_with("/dev/bus/usb/001")),
        "{xhci:?}"
    );
    assert_eq!(
        kernel.nodes(&addr(SATA)).unwrap(),
        paths(&[
            "/dev/sda",
            "/dev/sda1",
            "/dev/sda2",
            "/dev/sdb",
            "/dev/sdb1"
        ])
    );
}

#[test]
fn driver_and_override_are_read_again_each_time() {
    let fx = desktop();
    let kernel = fx.kernel();
    let gpu = addr(GPU);
    assert_eq!(kernel.driver(&gpu).unwrap().as_deref(), Some("amdgpu"));
    assert_eq!(kernel.driver_override(&gpu).unwrap(), None);
    fx.unbind(GPU);
    assert_eq!(kernel.driver(&gpu).unwrap(), None);
    fx.write(fx.function_dir(GPU).join("driver_override"), "vfio-pci\n");
    fx.bind(GPU, "vfio-pci");
    assert_eq!(kernel.driver(&gpu).unwrap().as_deref(), Some("vfio-pci"));
    assert_eq!(
        kernel.driver_override(&gpu).unwrap().as_deref(),
        Some("vfio-pci")
    );
    fx.write(fx.function_dir(GPU).join("driver_override"), "(null)\n");
    assert_eq!(kernel.driver_override(&gpu).unwrap(), None);
}

#[test]
fn a_function_that_is_not_on_the_bus() {
    let fx = desktop();
    let kernel = fx.kernel();
    let absent = addr("0000:09:00.0");
    assert_eq!(kernel.device(&absent).unwrap(), None);
    for err in [
        kernel.driver(&absent).unwrap_err(),
        kernel.driver_override(&absent).unwrap_err(),
        kernel.mounts_behind(&absent).unwrap_err(),
        kernel.usb_behind(&absent).unwrap_err(),
        kernel.console_on(&absent).unwrap_err(),
    ] {
        assert!(
            matches!(err, KernelError::NoDevice(a) if a == absent),
            "{err}"
        );
    }

    // Unplugged: the bus link dangles for a moment, then goes.
    fx.remove(fx.function_dir(USB_CARD));
    assert_eq!(kernel.device(&addr(USB_CARD)).unwrap(), None);
    assert!(
        !kernel
            .devices()
            .unwrap()
            .iter()
            .any(|d| d.address == addr(USB_CARD))
    );
}

#[test]
fn malformed_attributes_are_errors_naming_the_file() {
    let cases: [(&str, &str, &str); 9] = [
        ("uevent", "PCI_CLASS=30000\nPCI_ID=ZZZZ:67DF\n", "uevent"),
        ("uevent", "PCI_CLASS=30000\nPCI_ID=1002:67DF0\n", "uevent"),
        ("uevent", "PCI_CLASS=30000\n", "uevent"),
        (
            "uevent",
            "PCI_CLASS=30000\nPCI_ID=1002:67DF\nPCI_SUBSYS_ID=1DA2E:E366\n",
            "uevent",
        ),
        ("uevent", "PCI_CLASS=0x0300\nPCI_ID=1002:67DF\n", "uevent"),
        ("boot_vga", "2\n", "boot_vga"),
        (
            "drm/card1/uevent",
            "MAJOR=226\nDEVNAME=../etc/passwd\n",
            "uevent",
        ),
        ("drm/card1/uevent", "DEVNAME=\n", "uevent"),
        ("iommu_group", "", "iommu_group"),
    ];
    for (file, contents, named) in cases {
        let fx = desktop();
        let gpu_dir = fx.function_dir(GPU);
        if file == "iommu_group" {
            fx.link(gpu_dir.join("iommu_group"), "sys/kernel/iommu_groups/one");
        } else {
            fx.write(gpu_dir.join(file), contents);
        }
        let kernel = fx.kernel();
        // Device nodes are read apart from the rest of the device.
        let err = if file.ends_with("/uevent") {
            kernel.nodes(&addr(GPU)).unwrap_err()
        } else {
            kernel.device(&addr(GPU)).unwrap_err()
        };
        assert!(
            matches!(err, KernelError::Malformed { .. }),
            "{file}: {err}"
        );
        assert!(err.to_string().contains(named), "{file}: {err}");
        assert!(
            err.to_string().contains(&fx.root().display().to_string()),
            "{file}: {err}"
        );
        if !file.ends_with("/uevent") {
            assert!(kernel.devices().is_err(), "{file}");
        }
    }
}

#[test]
fn a_bus_entry_that_is_not_an_address_is_malformed() {
    let fx = desktop();
    fx.link("sys/bus/pci/devices/gpu", fx.function_dir(GPU));
    let err = fx.kernel().devices().unwrap_err();
    assert!(
        matches!(err, KernelError::Malformed { ref path, .. } if path.ends_with("devices/gpu")),
        "{err}"
    );
}

#[test]
fn without_pci_ids_names_are_empty() {
    let fx = desktop();
    fx.remove("usr/share/hwdata/pci.ids");
    let gpu = fx.kernel().device(&addr(GPU)).unwrap().unwrap();
    assert_eq!(gpu.name, "");
    // The other place distributions put it.
    fx.write("usr/share/misc/pci.ids", PCI_IDS);
    let gpu = fx.kernel().device(&addr(GPU)).unwrap().unwrap();
    assert!(gpu.name.starts_with("Ellesmere"), "{}", gpu.name);
}

#[test]
fn iommu_is_on_when_groups_exist() {
    let fx = Fixture::new();
    assert!(!fx.kernel().iommu_enabled().unwrap());
    let fx = desktop();
    assert!(fx.kernel().iommu_enabled().unwrap());
}

#[test]
fn drivers_and_modules() {
    let fx = desktop();
    let kernel = fx.kernel();
    assert!(kernel.driver_registered("amdgpu"));
    assert!(kernel.driver_registered("vfio-pci"));
    assert!(!kernel.driver_registered("nouveau"));
    assert!(!kernel.driver_registered("../drivers/amdgpu"));
    assert!(!kernel.driver_registered(""));

    assert!(!kernel.module_available("vfio-pci"));
    fx.loaded_module("vfio_pci");
    assert!(kernel.module_available("vfio-pci"), "- and _ are the same");
    assert!(kernel.module_available("vfio_pci"));

    fx.module_list(
        "modules.dep",
        "kernel/drivers/vfio/vfio.ko.zst: kernel/drivers/iommu/iommufd/iommufd.ko.zst\n\
         kernel/drivers/vfio/vfio_iommu_type1.ko.xz: kernel/drivers/vfio/vfio.ko.zst\n\
         kernel/drivers/gpu/drm/amd/amdgpu/amdgpu.ko:\n",
    );
    fx.module_list(
        "modules.builtin",
        "kernel/drivers/pci/pcie/portdrv.ko\nkernel/drivers/usb/host/xhci-pci.ko\n",
    );
    assert!(kernel.module_available("vfio"));
    assert!(kernel.module_available("vfio-iommu-type1"));
    assert!(kernel.module_available("amdgpu"));
    assert!(kernel.module_available("xhci_pci"), "built in");
    assert!(
        !kernel.module_available("vfio_iommu"),
        "a prefix is not a module"
    );
    assert!(
        !kernel.module_available("iommufd"),
        "a dependency's path is not a listed module"
    );
    assert!(!kernel.module_available("../vfio"));

    // Another kernel's lists say nothing about this one.
    fx.write("proc/sys/kernel/osrelease", "6.12.0-other\n");
    assert!(!kernel.module_available("amdgpu"));
    assert!(kernel.module_available("vfio_pci"), "loaded all the same");
}

#[test]
fn holders_are_the_processes_with_a_node_open() {
    let fx = desktop();
    let kernel = fx.kernel();
    let holder = |pid, comm: &str, node: &str| Holder {
        pid,
        comm: comm.into(),
        node: node.into(),
    };
    let igpu = kernel.nodes(&addr(IGPU)).unwrap();
    assert_eq!(
        kernel.holders(&igpu).unwrap(),
        [holder(1234, "Xorg", "/dev/dri/card0")]
    );

    let audio = kernel.nodes(&addr(GPU_AUDIO)).unwrap();
    assert_eq!(
        kernel.holders(&audio).unwrap(),
        [
            holder(2000, "pipewire", "/dev/snd/controlC1"),
            holder(2000, "pipewire", "/dev/snd/pcmC1D3p"),
        ]
    );
    let gpu = kernel.nodes(&addr(GPU)).unwrap();
    assert_eq!(kernel.holders(&gpu).unwrap(), []);
    assert_eq!(kernel.holders(&[]).unwrap(), []);

    // Gone between listing its fds and reading its name; not a process; no fds readable.
    fx.process(77, "vanishing", &["/dev/dri/card0"]);
    fx.remove("proc/77/comm");
    fx.write("proc/self/fd/0", "");
    fx.mkdir("proc/88");
    // No exe: a kernel thread, whose fd directory is not even listed.
    fx.process(99, "kworker/0:1", &["/dev/dri/card0"]);
    fx.remove("proc/99/exe");
    assert_eq!(
        kernel.holders(&igpu).unwrap(),
        [holder(1234, "Xorg", "/dev/dri/card0")]
    );
}

#[test]
fn holders_are_found_in_every_share_of_a_long_process_list() {
    let fx = desktop();
    let kernel = fx.kernel();
    // Enough processes that the scan is split between threads; holders
    // at the start, in the middle and at the end of the list.
    for pid in 3000..3150 {
        let held: &[&str] = match pid {
            3000 | 3077 | 3149 => &["/dev/snd/controlC1"],
            _ => &["/dev/null"],
        };
        fx.process(pid, "filler", held);
    }
    let audio = kernel.nodes(&addr(GPU_AUDIO)).unwrap();
    let pids: Vec<u32> = kernel
        .holders(&audio)
        .unwrap()
        .iter()
        .map(|h| h.pid)
        .collect();
    assert_eq!(pids, [2000, 2000, 3000, 3077, 3149]);
}

#[test]
fn vfio_group_nodes_are_dev_paths_whatever_the_root() {
    let fx = desktop();
    let kernel = fx.kernel();
    assert_eq!(kernel.vfio_group_node(8), None);
    fx.vfio_group(8);
    let node = kernel.vfio_group_node(8).unwrap();
    assert_eq!(node, Path::new("/dev/vfio/8"));
    assert_eq!(
        kernel.holders(&[node]).unwrap(),
        [Holder {
            pid: 4321,
            comm: "qemu-system-x86".into(),
            node: "/dev/vfio/8".into()
        }]
    );
}

#[test]
fn mounts_behind_a_controller_include_stacked_and_nvme_disks() {
    let fx = desktop();
    let kernel = fx.kernel();
    assert_eq!(
        kernel.mounts_behind(&addr(SATA)).unwrap(),
        ["/", "/boot/efi", "/mnt/my data", "/var/lib/bind"]
    );
    assert_eq!(kernel.mounts_behind(&addr(NVME)).unwrap(), ["/home"]);
    assert_eq!(
        kernel.mounts_behind(&addr(NVME_PORT)).unwrap(),
        ["/home"],
        "behind its bridge too"
    );
    assert_eq!(
        kernel.mounts_behind(&addr(GPU)).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        kernel.mounts_behind(&addr(XHCI)).unwrap(),
        Vec::<String>::new()
    );
}

#[test]
fn a_mount_on_a_usb_disk_is_behind_its_controller() {
    let fx = desktop();
    let usb_disk = fx
        .function_dir(XHCI)
        .join("usb1/1-2/1-2.1/1-2.1:1.0/host6/target6:0:0/6:0:0:0");
    let sdc = fx.disk(usb_disk.join("block/sdc"), "8:32");
    fx.partition(&sdc, "sdc1", "8:33");
    fx.mount("8:33", "/media/backup", "ext4", "/dev/sdc1");
    assert_eq!(
        fx.kernel().mounts_behind(&addr(XHCI)).unwrap(),
        ["/media/backup"]
    );
}

#[test]
fn unreadable_mountinfo_is_an_error_not_an_empty_list() {
    let fx = desktop();
    fx.append("proc/self/mountinfo", "garbage\n");
    let err = fx.kernel().mounts_behind(&addr(SATA)).unwrap_err();
    assert!(matches!(err, KernelError::Malformed { .. }), "{err}");
    assert!(
        err.to_string().contains("mountinfo") && err.to_string().contains("line 8"),
        "{err}"
    );
    fx.remove("proc/self/mountinfo");
    let err = fx.kernel().mounts_behind(&addr(SATA)).unwrap_err();
    assert!(matches!(err, KernelError::Io { .. }), "{err}");
}

/// btrfs mounts show an anonymous 0:N, and swap is no mount at all: both
/// are found through their device node. Needs mknod, so root.
#[test]
fn btrfs_and_swap_are_found_through_their_device_nodes() {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    let fx = desktop();
    let sda = fx
        .function_dir(SATA)
        .join("ata1/host0/target0:0:0/0:0:0:0/block/sda");
    fx.partition(&sda, "sda3", "8:3");
    let made = [("dev/sda1", 1), ("dev/sda3", 3)]
        .iter()
        .map(|(node, minor)| {
            mknod(
                &fx.path(node),
                SFlag::S_IFBLK,
                Mode::from_bits_truncate(0o600),
                makedev(8, *minor),
            )
        })
        .collect::<Result<Vec<_>, _>>();
    if let Err(err) = made {
        leave_out_only_if_told(
            "VFIOD_TESTS_UNPRIVILEGED",
            &format!("making device nodes ({err})"),
        );
        return;
    }
    fx.write("proc/self/mountinfo", "");
    fx.mount("0:35", "/data", "btrfs", "/dev/sda1");
    fx.write(
        "proc/swaps",
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
         /dev/sda3                               partition\t8388604\t\t0\t\t-2\n\
         /swapfile                               file\t\t1048572\t\t0\t\t-3\n",
    );
    assert_eq!(
        fx.kernel().mounts_behind(&addr(SATA)).unwrap(),
        ["/data", "[swap] /dev/sda3"]
    );
    assert_eq!(
        fx.kernel().mounts_behind(&addr(NVME)).unwrap(),
        Vec::<String>::new()
    );
}

#[test]
fn usb_devices_behind_a_controller() {
    let fx = desktop();
    let kernel = fx.kernel();
    let usb = |port: &str, id_text: &str, class: &str, name: &str| UsbDevice {
        port: port.into(),
        id: id(id_text),
        class: class.into(),
        name: name.into(),
    };
    let devices = kernel.usb_behind(&addr(XHCI)).unwrap();
    assert_eq!(
        devices,
        [
            usb("1-1", "046d:c31c", "03", "USB Keyboard"),
            usb("1-2", "05e3:0610", "09", "USB2.0 Hub"),
            usb("1-2.1", "0bc2:2322", "08", "Expansion"),
            usb("1-3", "1532:0084", "03", "Razer DeathAdder"),
        ]
    );
    assert!(devices[0].is_input() && devices[3].is_input() && !devices[2].is_input());
    assert_eq!(kernel.usb_behind(&addr(GPU)).unwrap(), []);
    assert_eq!(kernel.usb_behind(&addr(USB_CARD)).unwrap(), []);
}

#[test]
fn malformed_usb_attributes_are_errors() {
    for (file, contents) in [
        ("idVendor", "46d\n"),
        ("bDeviceClass", "3\n"),
        ("1-1:1.0/bInterfaceClass", "0x03\n"),
    ] {
        let fx = desktop();
        fx.write(fx.function_dir(XHCI).join("usb1/1-1").join(file), contents);
        let err = fx.kernel().usb_behind(&addr(XHCI)).unwrap_err();
        assert!(
            matches!(err, KernelError::Malformed { ref path, .. } if path.ends_with(file)),
            "{file}: {err}"
        );
    }
}

#[test]
fn fbcon_on_the_primary_framebuffer_holds_its_device() {
    let fx = desktop();
    let kernel = fx.kernel();
    assert!(kernel.console_on(&addr(IGPU)).unwrap());
    assert!(
        !kernel.console_on(&addr(GPU)).unwrap(),
        "fb1: fbcon draws on fb0"
    );
    assert!(!kernel.console_on(&addr(XHCI)).unwrap());
    assert!(!kernel.console_on(&addr(ROOT_PORT)).unwrap());

    // i915 gone: fbcon moves to what is left.
    fx.remove("sys/class/graphics/fb0");
    assert!(kernel.console_on(&addr(GPU)).unwrap());
    assert!(
        !kernel.console_on(&addr(IGPU)).unwrap(),
        "boot VGA, but no firmware framebuffer"
    );
}

#[test]
fn without_fbcon_no_framebuffer_holds_a_console() {
    let fx = desktop();
    fx.vtconsole(1, "(M) frame buffer device", false);
    let kernel = fx.kernel();
    assert!(!kernel.console_on(&addr(IGPU)).unwrap());
    assert!(!kernel.console_on(&addr(GPU)).unwrap());
}

#[test]
fn a_live_firmware_framebuffer_holds_the_boot_vga() {
    let fx = desktop();
    fx.vtconsole(1, "(M) frame buffer device", false);
    let efifb = fx.platform_device("efi-framebuffer.0");
    let kernel = fx.kernel();
    assert!(
        !kernel.console_on(&addr(IGPU)).unwrap(),
        "a leftover with no framebuffer"
    );
    fx.remove("sys/class/graphics/fb0");
    fx.framebuffer(0, &efifb);
    assert!(
        kernel.console_on(&addr(IGPU)).unwrap(),
        "efifb scans out of the boot VGA"
    );
    assert!(!kernel.console_on(&addr(GPU)).unwrap());

    let fx = desktop();
    let simpledrm = fx.platform_device("simple-framebuffer.0");
    fx.char_device(&simpledrm, "drm/card2", "dri/card2", "226:2");
    let kernel = fx.kernel();
    fx.vtconsole(1, "(M) frame buffer device", false);
    assert!(kernel.console_on(&addr(IGPU)).unwrap());
    assert!(!kernel.console_on(&addr(GPU)).unwrap());
}

#[test]
fn the_vga_text_console_holds_the_boot_vga() {
    let fx = desktop();
    fx.vtconsole(1, "(M) frame buffer device", false);
    fx.vtconsole(0, "(S) VGA+", true);
    let kernel = fx.kernel();
    assert!(kernel.console_on(&addr(IGPU)).unwrap());
    assert!(!kernel.console_on(&addr(GPU)).unwrap());
}

#[test]
fn links_never_lead_out_of_the_root() {
    let fx = desktop();
    let dir = linked_from_the_real_root(&fx);
    fx.raw_link(
        dir.join("iommu_group"),
        "../../../../../../../../../../../../sys/kernel/iommu_groups/9",
    );
    let kernel = fx.kernel();
    let device = kernel.device(&addr("00ff:05:00.0")).unwrap().unwrap();
    assert_eq!(device.id, id("1002:67df"));
    assert_eq!(device.iommu_group, Some(9));

    // A framebuffer whose device link climbs past the root still lands inside.
    fx.raw_link(
        "sys/class/graphics/fb0/device",
        format!(
            "../../../../../../../../../../{}",
            fx.function_dir(GPU).display()
        ),
    );
    assert!(kernel.console_on(&addr(GPU)).unwrap());

    // A loop is an error, not a hang.
    fx.raw_link("sys/bus/pci/devices/0000:0a:00.0", "0000:0a:00.0");
    let err = kernel.device(&addr("0000:0a:00.0")).unwrap_err();
    assert!(
        matches!(&err, KernelError::Io { source, .. } if source.raw_os_error() == Some(nix::libc::ELOOP)),
        "{err}"
    );
}

#[test]
fn reads_a_bus_of_thirty_functions_quickly() {
    let fx = desktop();
    for device in 0..20 {
        let address = format!("0000:10:{device:02x}.0");
        let dir = fx
            .pci(&address)
            .id("8086:0162")
            .class("0x030000")
            .driver("i915")
            .group(20 + device)
            .add();
        fx.char_device(&dir, "drm/card9", "dri/card9", "226:9");
    }
    let kernel = fx.kernel();
    kernel.devices().unwrap();
    let started = std::time::Instant::now();
    let devices = kernel.devices().unwrap();
    let took = started.elapsed();
    assert_eq!(devices.len(), 30);
    // Generous: a debug build on a busy machine. Well under 5 ms in release.
    assert!(took < std::time::Duration::from_millis(200), "{took:?}");
}

/// Reads this machine's own /sys and /proc (never writes). Run by hand:
/// `cargo test -p vfiod --lib kernel::sysfs -- --ignored --nocapture`.
#[test]
#[ignore]
fn reads_this_machine() {
    let kernel = Sysfs::this_machine();
    let started = std::time::Instant::now();
    let devices = kernel.devices().unwrap();
    let first = started.elapsed();
    let started = std::time::Instant::now();
    kernel.devices().unwrap();
    let again = started.elapsed();
    for device in &devices {
        let usb = kernel.usb_behind(&device.address).unwrap();
        let mounts = kernel.mounts_behind(&device.address).unwrap();
        let console = kernel.console_on(&device.address).unwrap();
        let nodes = kernel.nodes(&device.address).unwrap();
        let holders = kernel.holders(&nodes).unwrap();
        println!(
            "{} {} {} {:?} {:?} group {:?} reset {:?} nodes {:?} usb {} mounts {mounts:?} console {console} holders {holders:?}",
            device.address,
            device.id,
            device.class,
            device.name,
            device.driver,
            device.iommu_group,
            device.reset_methods,
            nodes,
            usb.len()
        );
    }
    println!(
        "{} functions in {first:?} (pci.ids read), then {again:?}; iommu {}; vfio-pci available {}",
        devices.len(),
        kernel.iommu_enabled().unwrap(),
        kernel.module_available(crate::VFIO_MODULE)
    );
}

/// This machine's own PCI functions: a bus entry's link, joined in one
/// call, leads where the kernel resolves it.
#[test]
fn bus_links_joined_lead_where_the_kernel_resolves_them() {
    let host = rooted::Rooted::new(PathBuf::from("/"));
    let bus = Path::new("sys/bus/pci/devices");
    let Ok(entries) = std::fs::read_dir(Path::new("/").join(bus)) else {
        leave_out_only_if_told(
            "VFIOD_TESTS_NO_PCI_BUS",
            "this machine's PCI bus (none here)",
        );
        return;
    };
    let mut seen = 0;
    for entry in entries.flatten() {
        let rel = bus.join(entry.file_name());
        let joined = super::bus_link_target(&rel)
            .unwrap()
            .expect("a plain relative link")
            .expect("present");
        assert_eq!(joined, host.resolve(&rel).unwrap(), "{}", rel.display());
        seen += 1;
    }
    assert_eq!(
        super::bus_link_target(&bus.join("0000:ff:1f.7")).unwrap(),
        Some(None),
        "an absent function"
    );
    eprintln!("{seen} functions agree");
}

/// The scan on this machine's own /proc: this test's process, holding a
/// file open, is found under its own name, and the same file closed is
/// held by nobody.
#[test]
fn this_process_is_found_holding_a_file_it_opened() {
    let dir = nix::unistd::mkdtemp("/tmp/vfiod-holders-XXXXXX").unwrap();
    let node = dir.join("node");
    std::fs::write(&node, "").unwrap();
    let kernel = Sysfs::this_machine();
    let open = std::fs::File::open(&node).unwrap();
    let found = kernel.holders(std::slice::from_ref(&node)).unwrap();
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    assert!(
        found.contains(&Holder {
            pid: std::process::id(),
            comm: comm.trim_end().to_string(),
            node: node.clone(),
        }),
        "{found:?}"
    );
    drop(open);
    assert_eq!(kernel.holders(std::slice::from_ref(&node)).unwrap(), []);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A group's own listing names the functions whose `iommu_group` link
/// leads to it, and nothing else.
#[test]
fn group_members_are_the_functions_linked_to_the_group() {
    let fx = desktop();
    let kernel = fx.kernel();
    let devices = kernel.devices().unwrap();
    let groups: std::collections::BTreeSet<u32> =
        devices.iter().filter_map(|d| d.iommu_group).collect();
    assert!(groups.len() > 2, "{groups:?}");
    for group in groups {
        let mut members = kernel.group_members(group).unwrap();
        members.sort();
        let linked: Vec<PciAddress> = devices
            .iter()
            .filter(|d| d.iommu_group == Some(group))
            .map(|d| d.address)
            .collect();
        assert_eq!(members, linked, "group {group}");
    }
    assert_eq!(kernel.group_members(999).unwrap(), []);
    let gpu = kernel.device(&addr(GPU)).unwrap().unwrap();
    let members = kernel.group_members(gpu.iommu_group.unwrap()).unwrap();
    assert!(members.contains(&addr(GPU_AUDIO)), "{members:?}");
}

/// The ids listing says what the whole listing says, for every function.
#[test]
fn ids_are_those_of_the_whole_listing() {
    let fx = desktop();
    let kernel = fx.kernel();
    let whole: Vec<(PciAddress, vfiod_pci::PciId)> = kernel
        .devices()
        .unwrap()
        .iter()
        .map(|d| (d.address, d.id))
        .collect();
    assert!(whole.len() > 5);
    assert_eq!(kernel.ids().unwrap(), whole);
}

/// A test that cannot do `what` here passes only when the caller set
/// `opt_out=1` (tests/README.md); otherwise it fails, so nothing is left
/// out silently.
fn leave_out_only_if_told(opt_out: &str, what: &str) {
    if std::env::var_os(opt_out).is_some_and(|v| v == "1") {
        eprintln!("NOT RUN ({opt_out}=1): {what}");
    } else {
        panic!(
            "this test needs {what}: run it as root on a machine with a PCI bus (CI does), or set {opt_out}=1 to leave it out"
        );
    }
}
