//! The real kernel as read: sysfs, procfs and /dev under a root directory
//! — `/` on a host, a fixture tree in tests. Nothing here writes; the
//! daemon adds its writes on top ([`Sysfs::tree`], [`Sysfs::bus_entry`]).
//!
//! The root only says where to read and write. Paths this hands out
//! (device nodes, holders' nodes, `/dev/vfio/N`) are spelled as the kernel
//! and the host's processes spell them, `/dev/...`, whatever the root, so
//! [`Inspect::holders`] compares them with `proc/PID/fd` links as they are.
//! Links inside the tree are followed as if chrooted into the root, so a
//! fixture can't lead a read or a write out into the machine's own /sys.

mod console;
mod device;
mod facts;
#[cfg(any(test, feature = "fixture"))]
pub mod fixture;
mod holders;
pub mod modules;
mod pci_ids;
pub mod rooted;
mod storage;
mod subtree;
mod usb;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vfiod_pci::{BootFramebuffer, Holder, PciAddress, PciDevice, PciId, UsbDevice, VtConsole};

pub use self::device::{RESET_METHOD_UNKNOWN, reset_method_file};
use self::pci_ids::{PCI_IDS_PATHS, PciIds};
use self::rooted::Rooted;
use crate::facts::HostView;
use crate::{Inspect, KernelError, KernelResult};

pub const PCI_DEVICES: &str = "sys/bus/pci/devices";
pub const PCI_DRIVERS: &str = "sys/bus/pci/drivers";
pub const DRIVERS_PROBE: &str = "sys/bus/pci/drivers_probe";
/// Rescans every PCI bus; a bridge's own `rescan` does its buses only.
pub const BUS_RESCAN: &str = "sys/bus/pci/rescan";
const IOMMU_GROUPS: &str = "sys/kernel/iommu_groups";
pub const VFIO_GROUPS: &str = "dev/vfio";
const VFIO_DEVICE_FILES: &str = "/dev/vfio/devices";

/// [`Inspect`] on sysfs and procfs.
pub struct Sysfs {
    tree: Rooted,
    /// pci.ids, read on first use.
    pci_ids: OnceLock<PciIds>,
}

impl Sysfs {
    /// The kernel whose `sys/`, `proc/`, `dev/`, `usr/share/` and
    /// `lib/modules/` are under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs {
            tree: Rooted::new(root.into()),
            pci_ids: OnceLock::new(),
        }
    }

    /// This machine's own kernel.
    pub fn this_machine() -> Self {
        Self::new("/")
    }

    pub fn root(&self) -> &Path {
        self.tree.root()
    }

    /// The tree under the root, links resolved as if chrooted into it.
    pub fn tree(&self) -> &Rooted {
        &self.tree
    }

    fn pci_ids(&self) -> &PciIds {
        self.pci_ids.get_or_init(|| {
            for path in PCI_IDS_PATHS {
                match self.tree.read_resolved_optional(Path::new(path)) {
                    Ok(Some(text)) => return PciIds::parse(text),
                    Ok(None) => {}
                    Err(err) => tracing::warn!("device names unavailable: {err}"),
                }
            }
            PciIds::default()
        })
    }

    /// `sys/bus/pci/devices/ADDR`, root-relative.
    pub fn bus_entry(address: &PciAddress) -> PathBuf {
        Path::new(PCI_DEVICES).join(address.to_string())
    }

    /// The function's real sysfs directory; `None` when it is not on the bus.
    fn function_dir(&self, address: &PciAddress) -> KernelResult<Option<PathBuf>> {
        if self.tree.is_host_root()
            && let Some(dir) = bus_link_target(&Self::bus_entry(address))?
        {
            return Ok(dir);
        }
        self.tree.resolve_optional(&Self::bus_entry(address))
    }

    fn existing_function_dir(&self, address: &PciAddress) -> KernelResult<PathBuf> {
        self.function_dir(address)?
            .ok_or(KernelError::NoDevice(*address))
    }

    /// Each function on the bus and its directory, sorted by address.
    fn function_dirs(&self) -> KernelResult<Vec<(PciAddress, PathBuf)>> {
        // No PCI bus (some VMs and boards): no functions.
        let Some(bus) = self.tree.resolve_optional(Path::new(PCI_DEVICES))? else {
            return Ok(Vec::new());
        };
        let mut dirs = Vec::new();
        for name in self.tree.list_optional(&bus)? {
            let address: PciAddress = name
                .to_str()
                .and_then(|name| name.parse().ok())
                .ok_or_else(|| self.tree.malformed(&bus.join(&name), "not a PCI address"))?;
            // Under `/` one call per function; a fixture's walk starts
            // from the bus directory, resolved once.
            let dir = if self.tree.is_host_root() {
                self.function_dir(&address)?
            } else {
                self.tree.resolve_optional_in(&bus, Path::new(&name))?
            };
            dirs.extend(dir.map(|dir| (address, dir)));
        }
        dirs.sort_by_key(|(address, _)| *address);
        Ok(dirs)
    }

    /// The function whose `boot_vga` reads 1, if any.
    fn boot_vga_function(&self) -> KernelResult<Option<PciAddress>> {
        for (address, dir) in self.function_dirs()? {
            if device::boot_vga(&self.tree, &dir)? {
                return Ok(Some(address));
            }
        }
        Ok(None)
    }

    fn read_function(&self, address: PciAddress, dir: &Path) -> KernelResult<Option<PciDevice>> {
        self.unless_gone(
            &address,
            device::read(&self.tree, self.pci_ids(), address, dir),
        )
    }

    /// `None` for a read that failed because the function went away while
    /// it was being read (hot unplug, or a device that vanishes on unbind).
    fn unless_gone<T>(
        &self,
        address: &PciAddress,
        read: KernelResult<T>,
    ) -> KernelResult<Option<T>> {
        match read {
            Ok(value) => Ok(Some(value)),
            Err(_) if !self.tree.exists(&Self::bus_entry(address)) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

impl fmt::Debug for Sysfs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sysfs")
            .field("root", &self.root())
            .finish_non_exhaustive()
    }
}

/// A driver name is one path component: it is joined onto `drivers/`.
pub fn is_driver_name(driver: &str) -> bool {
    !driver.is_empty()
        && driver != "."
        && driver != ".."
        && !driver.contains('/')
        && !driver.chars().any(|c| c.is_whitespace() || c.is_control())
}

pub fn invalid_driver(op: &'static str, driver: &str) -> KernelError {
    KernelError::io(
        op,
        format!("{PCI_DRIVERS}/{driver:?}"),
        io::Error::new(io::ErrorKind::InvalidInput, "not a driver name"),
    )
}

impl Inspect for Sysfs {
    fn devices(&self) -> KernelResult<Vec<PciDevice>> {
        let mut devices = Vec::new();
        for (address, dir) in self.function_dirs()? {
            devices.extend(self.read_function(address, &dir)?);
        }
        Ok(devices)
    }

    fn ids(&self) -> KernelResult<Vec<(PciAddress, PciId)>> {
        let mut ids = Vec::new();
        for (address, dir) in self.function_dirs()? {
            let uevent = self.unless_gone(&address, device::read_uevent(&self.tree, &dir))?;
            ids.extend(uevent.map(|uevent| (address, uevent.id)));
        }
        Ok(ids)
    }

    fn device(&self, address: &PciAddress) -> KernelResult<Option<PciDevice>> {
        match self.function_dir(address)? {
            Some(dir) => self.read_function(*address, &dir),
            None => Ok(None),
        }
    }

    fn group_members(&self, group: u32) -> KernelResult<Vec<PciAddress>> {
        let dir = Path::new(IOMMU_GROUPS)
            .join(group.to_string())
            .join("devices");
        // A group may hold functions of other buses (platform devices on
        // some boards): only PCI addresses are members here.
        Ok(self
            .tree
            .list_optional(&dir)?
            .iter()
            .filter_map(|name| name.to_str()?.parse().ok())
            .collect())
    }

    fn driver(&self, address: &PciAddress) -> KernelResult<Option<String>> {
        device::driver(&self.tree, &self.existing_function_dir(address)?)
    }

    fn driver_override(&self, address: &PciAddress) -> KernelResult<Option<String>> {
        device::driver_override(&self.tree, &self.existing_function_dir(address)?)
    }

    fn live_id(&self, address: &PciAddress) -> KernelResult<Option<PciId>> {
        device::live_id(&self.tree, &self.existing_function_dir(address)?)
    }

    fn iommu_enabled(&self) -> KernelResult<bool> {
        Ok(!self.tree.list_optional(Path::new(IOMMU_GROUPS))?.is_empty())
    }

    fn driver_registered(&self, driver: &str) -> bool {
        is_driver_name(driver) && self.tree.exists(&Path::new(PCI_DRIVERS).join(driver))
    }

    fn module_available(&self, module: &str) -> bool {
        modules::module_available(&self.tree, module)
    }

    fn module_loading(&self) -> vfiod_pci::machine::ModuleLoading {
        modules::module_loading(&self.tree)
    }

    fn nodes(&self, address: &PciAddress) -> KernelResult<Vec<PathBuf>> {
        device::nodes(&self.tree, &self.existing_function_dir(address)?)
    }

    fn holders(&self, nodes: &[PathBuf]) -> KernelResult<Vec<Holder>> {
        holders::holders(&self.tree, nodes)
    }

    fn mounts_behind(&self, address: &PciAddress) -> KernelResult<Vec<String>> {
        storage::mounts_behind(&self.tree, &self.existing_function_dir(address)?)
    }

    fn usb_behind(&self, address: &PciAddress) -> KernelResult<Vec<UsbDevice>> {
        usb::devices_behind(&self.tree, &self.existing_function_dir(address)?)
    }

    fn console_on(&self, address: &PciAddress) -> KernelResult<bool> {
        let dir = self.existing_function_dir(address)?;
        let boot_vga = device::boot_vga(&self.tree, &dir)?;
        console::console_on(&self.tree, &dir, boot_vga)
    }

    fn vtconsoles(&self) -> KernelResult<Vec<VtConsole>> {
        console::vtconsoles(&self.tree, self.boot_vga_function()?)
    }

    fn boot_framebuffers(&self) -> KernelResult<Vec<BootFramebuffer>> {
        console::boot_framebuffers(&self.tree, self.boot_vga_function()?)
    }

    fn vfio_group_node(&self, group: u32) -> Option<PathBuf> {
        let node = Path::new(VFIO_GROUPS).join(group.to_string());
        self.tree.exists(&node).then(|| Path::new("/").join(node))
    }

    fn vfio_device_nodes(&self, address: &PciAddress) -> KernelResult<Vec<PathBuf>> {
        let Some(dir) = self.function_dir(address)? else {
            return Ok(Vec::new());
        };
        let mut nodes = Vec::new();
        for name in self.tree.list_optional(&dir.join("vfio-dev"))? {
            // 6.1 to 6.5 have the sysfs entry but no device file.
            let node = Path::new(VFIO_DEVICE_FILES).join(name);
            if self.tree.exists(&node) {
                nodes.push(node);
            }
        }
        Ok(nodes)
    }

    fn host(&self) -> KernelResult<HostView> {
        facts::read(&self.tree)
    }

    fn boot_id(&self) -> KernelResult<String> {
        Ok(self
            .tree
            .read(Path::new("proc/sys/kernel/random/boot_id"))?
            .trim()
            .to_string())
    }
}

/// Under `/`, where a bus entry's link leads, read in one call: the entry
/// is a relative link from a real directory to a real one below
/// `sys/devices`, so joining the two is the kernel's own resolution (which
/// costs three calls). `Some(None)`: no such entry. `None`: not such a
/// link, resolve it the long way.
fn bus_link_target(entry: &Path) -> KernelResult<Option<Option<PathBuf>>> {
    let target = match std::fs::read_link(Path::new("/").join(entry)) {
        Ok(target) => target,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Some(None)),
        Err(_) => return Ok(None),
    };
    let mut dir = entry.parent().map(Path::to_path_buf).unwrap_or_default();
    for component in target.components() {
        match component {
            std::path::Component::ParentDir if dir.pop() => {}
            std::path::Component::Normal(name) => dir.push(name),
            _ => return Ok(None),
        }
    }
    Ok(dir.starts_with("sys/devices").then_some(Some(dir)))
}

#[cfg(test)]
mod tests;
