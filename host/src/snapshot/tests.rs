use std::os::unix::fs::symlink;

use super::*;

/// A scratch directory that goes away with the test.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let template = std::env::temp_dir().join("vfioctl-test-XXXXXX");
        Scratch(nix::unistd::mkdtemp(&template).expect("mkdtemp"))
    }

    fn write(&self, rel: &str, contents: &str) {
        let path = self.0.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    fn mkdir(&self, rel: &str) {
        fs::create_dir_all(self.0.join(rel)).unwrap();
    }

    /// A relative link at `rel` to root-relative `target`, as sysfs has them.
    fn link(&self, rel: &str, target: &str) {
        let depth = Path::new(rel)
            .parent()
            .map_or(0, |p| p.components().count());
        let relative = "../".repeat(depth) + target;
        let path = self.0.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        symlink(relative, path).unwrap();
    }

    /// A PCI function in `dir` (below sys/devices).
    fn function(&self, dir: &str, id: (&str, &str), class: &str, driver: Option<&str>, group: u32) {
        let address = dir.rsplit('/').next().unwrap();
        // What vfiod reads the ids and the class from.
        let class_hex = u32::from_str_radix(class.trim_start_matches("0x"), 16).unwrap();
        self.write(
            &format!("{dir}/uevent"),
            &format!(
                "PCI_CLASS={class_hex:04X}\nPCI_ID={}:{}\nPCI_SLOT_NAME={address}\n",
                id.0.to_uppercase(),
                id.1.to_uppercase()
            ),
        );
        self.write(&format!("{dir}/driver_override"), "(null)\n");
        self.link(&format!("sys/bus/pci/devices/{address}"), dir);
        self.link(
            &format!("{dir}/iommu_group"),
            &format!("sys/kernel/iommu_groups/{group}"),
        );
        self.link(
            &format!("sys/kernel/iommu_groups/{group}/devices/{address}"),
            dir,
        );
        if let Some(driver) = driver {
            self.write(&format!("sys/bus/pci/drivers/{driver}/unbind"), "");
            self.link(
                &format!("{dir}/driver"),
                &format!("sys/bus/pci/drivers/{driver}"),
            );
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A bridge with a two-function GPU behind it, an Intel IOMMU, and
/// a console on the GPU.
fn gpu_host() -> Scratch {
    let s = Scratch::new();
    let bridge = "sys/devices/pci0000:00/0000:00:01.0";
    let gpu = format!("{bridge}/0000:01:00.0");
    let audio = format!("{bridge}/0000:01:00.1");
    s.function(bridge, ("8086", "0151"), "0x060400", Some("pcieport"), 1);
    s.function(&gpu, ("1002", "67df"), "0x030000", Some("amdgpu"), 1);
    s.write(&format!("{gpu}/boot_vga"), "1\n");
    s.write(&format!("{gpu}/reset_method"), "bus\n");
    s.write(&format!("{gpu}/drm/card0/dev"), "226:0\n");
    s.write(
        &format!("{gpu}/drm/card0/uevent"),
        "MAJOR=226\nMINOR=0\nDEVNAME=dri/card0\n",
    );
    s.function(
        &audio,
        ("1002", "aaf0"),
        "0x040300",
        Some("snd_hda_intel"),
        1,
    );
    s.link("sys/bus/pci/drivers/amdgpu/module", "sys/module/amdgpu");
    s.link(
        "sys/bus/pci/drivers/snd_hda_intel/module",
        "sys/module/snd_hda_intel",
    );
    for module in ["amdgpu", "snd_hda_intel", "vfio"] {
        s.write(&format!("sys/module/{module}/refcnt"), "0\n");
    }
    // fbcon draws on fb0, which amdgpu registered on the GPU.
    s.write(
        "sys/devices/virtual/vtconsole/vtcon1/name",
        "(M) frame buffer device\n",
    );
    s.write("sys/devices/virtual/vtconsole/vtcon1/bind", "1\n");
    s.link(
        "sys/class/vtconsole/vtcon1",
        "sys/devices/virtual/vtconsole/vtcon1",
    );
    s.write(&format!("{gpu}/graphics/fb0/dev"), "29:0\n");
    s.link(&format!("{gpu}/graphics/fb0/device"), &gpu);
    s.link("sys/class/graphics/fb0", &format!("{gpu}/graphics/fb0"));
    s.mkdir("sys/class/iommu/dmar0");
    s.mkdir("sys/bus/platform/devices");
    s.mkdir("sys/dev/block");
    s.write("proc/self/mountinfo", "");
    s.write("proc/sys/kernel/osrelease", "6.1.0-test\n");
    s.write("proc/sys/kernel/hostname", "z77\n");
    s.write("proc/cmdline", "root=/dev/sda2 intel_iommu=on\n");
    s
}

#[test]
fn snapshots_a_sysfs_tree_that_loads_back() {
    let s = gpu_host();
    let kernel = Sysfs::new(&s.0);
    let (machine, warnings) = snapshot(&kernel, &HostFiles::new(&s.0)).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let info = &machine.machine;
    assert_eq!(
        (info.kernel.as_str(), info.iommu),
        ("6.1.0-test", IommuKind::Intel)
    );
    assert_eq!(info.cmdline, "root=/dev/sda2 intel_iommu=on");
    assert_eq!(info.description, "z77, snapshot by vfioctl");
    // vfio is loaded; the other two are neither loaded nor known to the fixture's kernel.
    assert_eq!(info.modules, ["vfio", "amdgpu", "snd_hda_intel"]);
    assert_eq!(info.missing, ["vfio_iommu_type1", "vfio_pci"]);

    let addresses: Vec<String> = machine
        .devices
        .iter()
        .map(|d| d.address.to_string())
        .collect();
    assert_eq!(addresses, ["0000:00:01.0", "0000:01:00.0", "0000:01:00.1"]);
    let bridge = &machine.devices[0];
    assert!(
        !bridge.console,
        "the console is the GPU's, not its bridge's"
    );
    let gpu = &machine.devices[1];
    assert_eq!(gpu.parent, Some("0000:00:01.0".parse().unwrap()));
    assert_eq!(gpu.id.to_string(), "1002:67df");
    assert_eq!(gpu.driver.as_deref(), Some("amdgpu"));
    assert_eq!(gpu.group, Some(1));
    assert!(gpu.boot_vga && gpu.console);
    assert_eq!(gpu.reset, ["bus"]);
    assert_eq!(gpu.nodes, [PathBuf::from("/dev/dri/card0")]);

    let text = render(&machine).unwrap();
    assert!(text.starts_with("# This host"));
    let again = MachineFile::parse(&text, Path::new("again")).unwrap();
    assert_eq!(again, machine);
}

#[test]
fn no_iommu_means_no_groups() {
    let s = gpu_host();
    fs::remove_dir_all(s.0.join("sys/kernel/iommu_groups")).unwrap();
    let kernel = Sysfs::new(&s.0);
    let (machine, _) = snapshot(&kernel, &HostFiles::new(&s.0)).unwrap();
    assert_eq!(machine.machine.iommu, IommuKind::None);
    assert!(machine.devices.iter().all(|d| d.group.is_none()));
    render(&machine).unwrap();
}

#[test]
fn disabled_module_loading_is_snapshotted_and_loads_back() {
    let s = gpu_host();
    let kernel = Sysfs::new(&s.0);
    let (machine, _) = snapshot(&kernel, &HostFiles::new(&s.0)).unwrap();
    assert!(machine.machine.module_loading.is_allowed());
    assert!(!render(&machine).unwrap().contains("module_loading"));
    s.write("proc/sys/kernel/modules_disabled", "1\n");
    let (machine, _) = snapshot(&kernel, &HostFiles::new(&s.0)).unwrap();
    assert_eq!(machine.machine.module_loading, ModuleLoading::Disabled);
    let text = render(&machine).unwrap();
    assert!(text.contains("module_loading = \"disabled\""), "{text}");
    let back = MachineFile::parse(&text, Path::new("snapshot.toml")).unwrap();
    assert_eq!(back.machine.module_loading, ModuleLoading::Disabled);
}

/// The simulated kernel of the project's example machine, snapshotted,
/// gives back that machine's devices (less what a snapshot leaves out).
#[test]
fn host_facts_are_written_only_when_known() {
    use crate::facts::{
        FileStat, FirmwareImage, FramebufferView, HugepagePool, QemuConf as QemuConfView,
        QemuConfValue,
    };
    let mut warnings = Vec::new();
    assert_eq!(host_facts(&HostView::default(), &mut warnings), None);

    let image = |path: &str, stat: Option<FileStat>| FirmwareImage {
        path: path.into(),
        descriptor: Some("/usr/share/qemu/firmware/60-edk2.json".into()),
        stat,
    };
    let stat = FileStat {
        owner: "root".into(),
        group: "kvm".into(),
        mode: 0o640,
    };
    let pool = |size_kb, total, free| HugepagePool {
        size_kb,
        total,
        free,
    };
    let mut view = HostView {
        cpu_flags: Some(vec!["fpu".into(), "vmx".into()]),
        kvm: Some(false),
        acpi_tables: Some(vec!["DMAR".into(), "FACP".into()]),
        interrupt_remapping: Some(true),
        framebuffers: Some(vec![FramebufferView {
            name: "bochsdrmfb".into(),
            device: Some("0000:00:02.0".parse().unwrap()),
        }]),
        hugepages: Some(vec![
            pool(2048, 0, 0),
            pool(1_048_576, 4, 2),
            pool(2048, 0, 0),
        ]),
        qemu_conf: Some(QemuConfView {
            path: "/etc/libvirt/qemu.conf".into(),
            user: QemuConfValue::Unset {
                hint: Some("libvirt-qemu".into()),
            },
            group: QemuConfValue::Set("kvm".into()),
        }),
        firmware: Some(vec![image("/usr/share/OVMF/OVMF_CODE_4M.fd", Some(stat))]),
        ..HostView::default()
    };
    let facts = host_facts(&view, &mut warnings).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(facts.cpu_flags.as_deref().unwrap(), ["fpu", "vmx"]);
    assert_eq!(
        (facts.kvm, facts.interrupt_remapping),
        (Some(false), Some(true))
    );
    assert_eq!(facts.acpi_tables.as_deref().unwrap(), ["DMAR", "FACP"]);
    assert_eq!(facts.framebuffers.as_ref().unwrap()[0].name, "bochsdrmfb");
    let pages = facts.hugepages.as_ref().unwrap();
    assert_eq!((pages.size_kb, pages.total, pages.free), (1_048_576, 4, 2));
    let conf = facts.qemu_conf.as_ref().unwrap();
    assert_eq!(
        (conf.user.as_str(), conf.group.as_str()),
        ("libvirt-qemu", "kvm")
    );
    let firmware = facts.firmware.as_ref().unwrap();
    assert_eq!(
        (firmware[0].group.as_str(), firmware[0].mode.as_str()),
        ("kvm", "0640")
    );
    // It loads back.
    let machine = MachineFile {
        machine: MachineInfo {
            description: String::new(),
            kernel: String::new(),
            cmdline: String::new(),
            iommu: IommuKind::Intel,
            modules: Vec::new(),
            missing: Vec::new(),
            module_loading: Default::default(),
            coldplug_ms: None,
            uevent_delay_ms: None,
        },
        host: Some(facts),
        display: None,
        devices: Vec::new(),
    };
    let again = MachineFile::parse(&render(&machine).unwrap(), Path::new("again")).unwrap();
    assert_eq!(again, machine);

    // No pool reserved: the first. A missing firmware file cannot be
    // said: the fact stays unknown, with a warning.
    view.hugepages = Some(vec![pool(2048, 0, 0), pool(1_048_576, 0, 0)]);
    view.firmware = Some(vec![image("/usr/share/OVMF/OVMF_VARS_4M.fd", None)]);
    let facts = host_facts(&view, &mut warnings).unwrap();
    assert_eq!(facts.hugepages.unwrap().size_kb, 2048);
    assert_eq!(facts.firmware, None);
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("OVMF_VARS_4M.fd"), "{warnings:?}");
}
