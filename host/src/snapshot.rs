//! `snapshot`: this host as a machine file (DESIGN §7), read through the
//! daemon's own kernel interface so that the file describes what vfiod
//! would see. Holders are left out: they come and go. The `[host]` section
//! holds what the doctor reads ([`Inspect::host`]), each fact only when it
//! is known.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::facts::{HostView, HugepagePool};
use crate::sysfs::Sysfs;
use crate::sysfs::modules::MODULES_DISABLED;
use crate::{Inspect, KernelError, VFIO_MODULE};
use vfiod_pci::PciAddress;
use vfiod_pci::machine::{
    DeviceEntry, Display, FirmwareFile, Framebuffer, FramebufferEntry, HostFacts, Hugepages,
    IommuKind, MachineFile, MachineInfo, ModuleLoading, QemuConf, VtConsoleEntry,
};

/// Modules vfio-pci needs, in load order.
const VFIO_MODULES: [&str; 3] = ["vfio", "vfio_iommu_type1", VFIO_MODULE];

/// Why a snapshot could not be taken or written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// What was read does not load back as a machine file.
    #[error("this host does not fit the machine-file format: {0}")]
    Format(String),
}

/// This host under `root` as a machine file, and what had to be guessed.
pub fn take(root: &Path) -> Result<(MachineFile, Vec<String>), SnapshotError> {
    Ok(snapshot(&Sysfs::new(root), &HostFiles::new(root))?)
}

/// The machine file as TOML, checked to load back as vfiod would load it.
pub fn render(machine: &MachineFile) -> Result<String, SnapshotError> {
    let body = machine.to_toml();
    MachineFile::parse(&body, Path::new("snapshot"))
        .map_err(|e| SnapshotError::Format(e.to_string()))?;
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

/// Reads the machine; also says what it had to guess.
pub fn snapshot(
    kernel: &dyn Inspect,
    host: &HostFiles,
) -> Result<(MachineFile, Vec<String>), KernelError> {
    let mut warnings = Vec::new();
    let iommu = if kernel.iommu_enabled()? {
        host.iommu_kind().unwrap_or_else(|| {
            warnings.push(
                "IOMMU groups exist but neither an Intel (dmar) nor an AMD (ivhd) IOMMU is registered: written as iommu = \"intel\"".into(),
            );
            IommuKind::Intel
        })
    } else {
        IommuKind::None
    };

    let devices = kernel.devices()?;
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
            Err(e) => return Err(e),
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
            // A device-specific reset the kernel has shows in `reset`
            // already; whether vendor-reset would add one is not on the host.
            vendor_reset: false,
            nodes: extras.nodes,
            holders: Vec::new(),
            usb: extras.usb,
            mounts: extras.mounts,
            fault: None,
            // A snapshot is of the host as it runs, its coldplug long over.
            late_driver: false,
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
            // Host-wide; whether vfiod lacks CAP_SYS_MODULE is its unit's.
            module_loading: if host.line(MODULES_DISABLED) == "1" {
                ModuleLoading::Disabled
            } else {
                ModuleLoading::Allowed
            },
            coldplug_ms: None,
            uevent_delay_ms: None,
        },
        host: host_facts,
        display: display(kernel, &devices)?,
        devices,
    };
    Ok((machine, warnings))
}

/// The `[display]` section: the vtconsoles and the firmware
/// framebuffers, naming only functions the file lists. The display
/// manager is systemd's to say, not the kernel's: left out.
fn display(kernel: &dyn Inspect, devices: &[DeviceEntry]) -> Result<Option<Display>, KernelError> {
    let listed =
        |device: Option<PciAddress>| device.filter(|d| devices.iter().any(|e| e.address == *d));
    let vtconsoles: Vec<VtConsoleEntry> = kernel
        .vtconsoles()?
        .into_iter()
        .map(|vt| VtConsoleEntry {
            name: vt.name,
            fbcon: vt.fbcon,
            bound: vt.bound,
            device: listed(vt.device),
            fault: None,
        })
        .collect();
    let framebuffers: Vec<FramebufferEntry> = kernel
        .boot_framebuffers()?
        .into_iter()
        .map(|fb| FramebufferEntry {
            // An unbound one is named by its platform driver all the same
            // (efi-framebuffer.0 is efi-framebuffer's).
            driver: fb.driver.clone().unwrap_or_else(|| {
                fb.name
                    .rsplit_once('.')
                    .map_or(fb.name.as_str(), |(d, _)| d)
                    .to_string()
            }),
            bound: fb.driver.is_some(),
            name: fb.name,
            device: listed(fb.device),
            fault: None,
        })
        .collect();
    if vtconsoles.is_empty() && framebuffers.is_empty() {
        return Ok(None);
    }
    Ok(Some(Display {
        vtconsoles,
        framebuffers,
        manager: None,
    }))
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
        let reserved = |p: &&HugepagePool| p.total * p.size_kb;
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
    fn read(kernel: &dyn Inspect, address: &PciAddress) -> Result<Extras, KernelError> {
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
    kernel: &dyn Inspect,
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
mod tests;
