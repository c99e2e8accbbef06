//! `snapshot`: this host as a machine file (DESIGN §7), read through the
//! daemon's own kernel interface so that the file describes what vfiod
//! would see. Holders are left out: they come and go. The `[host]` section
//! holds what the doctor reads ([`Kernel::host`]), each fact only when it
//! is known.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use vfiod::kernel::host::HostView;
use vfiod::kernel::sysfs::SysfsKernel;
use vfiod::kernel::{Kernel, KernelError, VFIO_MODULE};
use vfiod_pci::PciAddress;
use vfiod_pci::machine::{
    DeviceEntry, FirmwareFile, Framebuffer, HostFacts, Hugepages, IommuKind, MachineFile,
    MachineInfo, QemuConf,
};

use crate::error::{Exit, Failure};
use crate::output::Output;

/// Modules vfio-pci needs, in load order.
const VFIO_MODULES: [&str; 3] = ["vfio", "vfio_iommu_type1", VFIO_MODULE];

pub fn run(root: &Path, out: &Output) -> Result<Exit, Failure> {
    let kernel = SysfsKernel::new(root);
    let host = HostFiles::new(root);
    let (machine, warnings) = snapshot(&kernel, &host)?;
    for warning in &warnings {
        out.warn(warning);
    }
    let text = render(&machine)?;
    if out.json {
        // Every field of a machine file is a plain value.
        out.print_json(&serde_json::to_value(&machine).unwrap_or_default())?;
    } else {
        out.print(&text)?;
    }
    Ok(Exit::Done)
}

/// The machine file as TOML, checked to load back as vfiod would load it.
pub fn render(machine: &MachineFile) -> Result<String, Failure> {
    let body = machine.to_toml();
    MachineFile::parse(&body, Path::new("snapshot")).map_err(|e| {
        Failure::local(
            "Snapshot",
            format!("this host does not fit the machine-file format: {e}"),
        )
    })?;
    Ok(format!(
        "# This host as `vfioctl snapshot` saw it; load it with `vfiod --machine FILE`.\n\
         # Format: DESIGN.md, \"Machine files\". Holders of device nodes are left out:\n\
         # they come and go. host_driver is unknown for devices that were on vfio-pci.\n\n\
         {body}"
    ))
}

/// Files outside the kernel interface: /proc and a few /sys directories.
pub struct HostFiles {
    root: PathBuf,
}

impl HostFiles {
    pub fn new(root: &Path) -> HostFiles {
        HostFiles {
            root: root.to_path_buf(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// A one-line file, trimmed; empty when it cannot be read (a snapshot
    /// of a host without /proc still describes its devices).
    fn line(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    }

    fn names_in(&self, rel: &str) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.path(rel)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }

    /// Intel's IOMMUs register as `dmarN`, AMD's as `ivhdN`.
    fn iommu_kind(&self) -> Option<IommuKind> {
        let names = self.names_in("sys/class/iommu");
        if names.iter().any(|n| n.starts_with("dmar")) {
            Some(IommuKind::Intel)
        } else if names.iter().any(|n| n.starts_with("ivhd")) {
            Some(IommuKind::Amd)
        } else {
            None
        }
    }

    /// Loaded modules have a `sys/module` entry (built-in ones with
    /// parameters too, which is as good as loaded).
    fn module_loaded(&self, module: &str) -> bool {
        self.path("sys/module").join(module).is_dir()
    }

    /// The module a PCI driver comes from; `None` for a built-in driver.
    fn driver_module(&self, driver: &str) -> Option<String> {
        let link =
            fs::read_link(self.path("sys/bus/pci/drivers").join(driver).join("module")).ok()?;
        link.file_name()?.to_str().map(str::to_owned)
    }
}

fn kernel_failure(e: KernelError) -> Failure {
    Failure::local("Kernel", e.to_string())
}

/// Reads the machine; also says what it had to guess.
pub fn snapshot(
    kernel: &dyn Kernel,
    host: &HostFiles,
) -> Result<(MachineFile, Vec<String>), Failure> {
    let mut warnings = Vec::new();
    let iommu = if kernel.iommu_enabled().map_err(kernel_failure)? {
        host.iommu_kind().unwrap_or_else(|| {
            warnings.push(
                "IOMMU groups exist but neither an Intel (dmar) nor an AMD (ivhd) IOMMU is registered: written as iommu = \"intel\"".into(),
            );
            IommuKind::Intel
        })
    } else {
        IommuKind::None
    };

    let devices = kernel.devices().map_err(kernel_failure)?;
    let bridges: BTreeSet<PciAddress> = devices
        .iter()
        .filter(|d| d.is_bridge())
        .map(|d| d.address)
        .collect();
    let mut entries = Vec::new();
    for device in &devices {
        let extras = match Extras::read(kernel, &device.address) {
            Ok(extras) => extras,
            // Gone since the listing (hot unplug): it is no longer part of the host.
            Err(KernelError::NoDevice(_)) => continue,
            Err(e) => return Err(kernel_failure(e)),
        };
        entries.push(DeviceEntry {
            address: device.address,
            // The format wants a bridge listed in the file.
            parent: device.parent.filter(|p| bridges.contains(p)),
            id: device.id,
            subsystem: device.subsystem,
            class: device.class,
            name: device.name.clone(),
            driver: device.driver.clone(),
            host_driver: None,
            group: if iommu == IommuKind::None {
                None
            } else {
                device.iommu_group
            },
            boot_vga: device.boot_vga,
            console: extras.console,
            reset: device.reset_methods.clone(),
            nodes: extras.nodes,
            holders: Vec::new(),
            usb: extras.usb,
            mounts: extras.mounts,
            fault: None,
        });
    }
    own_mounts_and_console(&mut entries);
    let devices = entries;

    let (modules, missing) = modules(kernel, host, &devices);
    let host_facts = match kernel.host() {
        Ok(view) => host_facts(&view, &mut warnings),
        Err(e) => {
            warnings.push(format!("no [host] section: {e}"));
            None
        }
    };
    let hostname = host.line("proc/sys/kernel/hostname");
    let machine = MachineFile {
        machine: MachineInfo {
            description: if hostname.is_empty() {
                "snapshot by vfioctl".into()
            } else {
                format!("{hostname}, snapshot by vfioctl")
            },
            kernel: host.line("proc/sys/kernel/osrelease"),
            cmdline: host.line("proc/cmdline"),
            iommu,
            modules,
            missing,
        },
        host: host_facts,
        devices,
    };
    Ok((machine, warnings))
}

/// The `[host]` section: the facts of `view` a machine file can hold,
/// those that are known; `None` when none is.
fn host_facts(view: &HostView, warnings: &mut Vec<String>) -> Option<HostFacts> {
    let firmware = view.firmware.as_ref().and_then(|images| {
        // A machine file lists files that exist; one a descriptor names
        // but that is missing cannot be said, so the whole fact stays
        // unknown rather than look fine.
        let missing: Vec<String> = images
            .iter()
            .filter(|image| image.stat.is_none())
            .map(|image| image.path.display().to_string())
            .collect();
        if !missing.is_empty() {
            warnings.push(format!(
                "[host] firmware left out: a machine file cannot say that {} is missing",
                missing.join(", ")
            ));
            return None;
        }
        Some(
            images
                .iter()
                .filter_map(|image| {
                    let stat = image.stat.as_ref()?;
                    Some(FirmwareFile {
                        path: image.path.clone(),
                        owner: stat.owner.clone(),
                        group: stat.group.clone(),
                        mode: format!("{:04o}", stat.mode),
                    })
                })
                .collect(),
        )
    });
    // A machine file has one pool: the one with the most memory reserved,
    // else the first (the smallest size).
    let hugepages = view.hugepages.as_ref().and_then(|pools| {
        let reserved = |p: &&vfiod::kernel::host::HugepagePool| p.total * p.size_kb;
        let pool = pools
            .iter()
            .filter(|p| p.total > 0)
            .max_by_key(reserved)
            .or_else(|| pools.first())?;
        Some(Hugepages {
            size_kb: pool.size_kb,
            total: pool.total,
            free: pool.free,
        })
    });
    let facts = HostFacts {
        cpu_flags: view.cpu_flags.clone(),
        acpi_tables: view.acpi_tables.clone(),
        interrupt_remapping: view.interrupt_remapping,
        kvm: view.kvm,
        framebuffers: view.framebuffers.as_ref().map(|list| {
            list.iter()
                .map(|fb| Framebuffer {
                    name: fb.name.clone(),
                    device: fb.device,
                })
                .collect()
        }),
        hugepages,
        // What libvirt uses: the setting, else its build default.
        qemu_conf: view.qemu_conf.as_ref().map(|conf| QemuConf {
            user: conf.user.effective().to_owned(),
            group: conf.group.effective().to_owned(),
        }),
        firmware,
    };
    (facts != HostFacts::default()).then_some(facts)
}

/// What the kernel interface tells per device beyond `PciDevice`.
struct Extras {
    console: bool,
    usb: Vec<vfiod_pci::UsbDevice>,
    mounts: Vec<String>,
    nodes: Vec<std::path::PathBuf>,
}

impl Extras {
    fn read(kernel: &dyn Kernel, address: &PciAddress) -> Result<Extras, KernelError> {
        Ok(Extras {
            console: kernel.console_on(address)?,
            usb: kernel.usb_behind(address)?,
            mounts: kernel.mounts_behind(address)?,
            nodes: kernel.nodes(address)?,
        })
    }
}

/// The kernel answers for a device's whole subtree (a bridge "has" the
/// mounts and the console of what sits behind it); a machine file lists
/// each device's own, and the simulated kernel adds the subtree up again.
fn own_mounts_and_console(entries: &mut [DeviceEntry]) {
    // The subtree values, taken before any is trimmed.
    let children: Vec<(PciAddress, Vec<String>, bool)> = entries
        .iter()
        .filter_map(|e| e.parent.map(|p| (p, e.mounts.clone(), e.console)))
        .collect();
    for entry in entries.iter_mut() {
        let mut child_console = false;
        for (parent, mounts, console) in &children {
            if *parent == entry.address {
                entry.mounts.retain(|m| !mounts.contains(m));
                child_console |= console;
            }
        }
        entry.console &= !child_console;
    }
}

/// vfio's modules when loaded (or listed as missing when they cannot be),
/// then the modules of the drivers bound, in device order.
fn modules(
    kernel: &dyn Kernel,
    host: &HostFiles,
    devices: &[DeviceEntry],
) -> (Vec<String>, Vec<String>) {
    let mut modules: Vec<String> = Vec::new();
    let mut missing = Vec::new();
    for module in VFIO_MODULES {
        if host.module_loaded(module) {
            modules.push(module.to_owned());
        } else if !kernel.module_available(module) {
            missing.push(module.to_owned());
        }
    }
    for driver in devices.iter().filter_map(|d| d.driver.as_deref()) {
        if let Some(module) = host.driver_module(driver)
            && !modules.contains(&module)
        {
            modules.push(module);
        }
    }
    (modules, missing)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use vfiod::kernel::sim::SimKernel;

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
        fn function(
            &self,
            dir: &str,
            id: (&str, &str),
            class: &str,
            driver: Option<&str>,
            group: u32,
        ) {
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
        let kernel = SysfsKernel::new(&s.0);
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
        let kernel = SysfsKernel::new(&s.0);
        let (machine, _) = snapshot(&kernel, &HostFiles::new(&s.0)).unwrap();
        assert_eq!(machine.machine.iommu, IommuKind::None);
        assert!(machine.devices.iter().all(|d| d.group.is_none()));
        render(&machine).unwrap();
    }

    /// The simulated kernel of the project's example machine, snapshotted,
    /// gives back that machine's devices (less what a snapshot leaves out).
    #[test]
    fn the_example_machine_round_trips_through_the_simulated_kernel() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../machines/z77-rx580.toml"
        ));
        let original = MachineFile::load(path).unwrap();
        let state = Scratch::new();
        let kernel = SimKernel::from_machine(original.clone(), &state.0.join("state")).unwrap();
        let empty = Scratch::new();
        let (machine, warnings) = snapshot(&kernel, &HostFiles::new(&empty.0)).unwrap();
        // An empty root shows no dmar: the kind is a guess, and says so.
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(machine.machine.iommu, IommuKind::Intel);
        assert_eq!(machine.devices.len(), original.devices.len());
        for got in &machine.devices {
            let mut want = original.device(&got.address).unwrap().clone();
            want.holders.clear();
            want.fault = None;
            want.host_driver = None;
            assert_eq!(got, &want);
        }
        // The doctor's facts come back as the machine file gave them.
        assert!(original.host.is_some());
        assert_eq!(machine.host, original.host);
        render(&machine).unwrap();
    }

    #[test]
    fn host_facts_are_written_only_when_known() {
        use vfiod::kernel::host::{
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
            },
            host: Some(facts),
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
}
