//! Kernel access: one interface, two implementations. [`sysfs::SysfsKernel`]
//! reads and writes a real (or fixture) sysfs tree; [`sim::SimKernel`] keeps
//! the real kernel's semantics on a machine file. The transition engine only
//! ever talks to [`Kernel`].

use std::io;
use std::path::PathBuf;

use vfiod_pci::{Holder, PciAddress, PciDevice, PciId, UsbDevice};

use self::host::HostView;

pub mod host;
pub mod sim;
pub mod sysfs;

/// The driver name vfio-pci registers on the PCI bus.
pub const VFIO_DRIVER: &str = "vfio-pci";
/// The module that provides it.
pub const VFIO_MODULE: &str = "vfio_pci";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A read or write of a kernel file failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("no PCI device {0}")]
    NoDevice(PciAddress),
    #[error("cannot load module {module}: {reason}")]
    Module { module: String, reason: String },
    /// What the kernel showed does not make sense (a malformed attribute).
    #[error("{path}: {reason}")]
    Malformed { path: String, reason: String },
}

impl KernelError {
    pub fn io(op: &'static str, path: impl Into<String>, source: io::Error) -> Self {
        KernelError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// EBUSY from a write: the driver refused to let go.
    pub fn is_busy(&self) -> bool {
        matches!(self, KernelError::Io { source, .. } if source.raw_os_error() == Some(nix::libc::EBUSY))
    }
}

pub type KernelResult<T> = Result<T, KernelError>;

/// What a uevent says happened to a PCI device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UeventAction {
    Add,
    Remove,
    Bind,
    Unbind,
    Change,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    pub action: UeventAction,
    pub address: PciAddress,
    /// The driver bound (for `Bind`) or left (for `Unbind`), when known.
    pub driver: Option<String>,
}

/// Everything vfiod reads from and writes to the kernel.
///
/// Reads are quick, but for `driver_override`, which takes the device lock
/// and so waits behind an unbind that is waiting in the kernel. Writes may
/// block for as long as a driver wants (an unbind held by an open file):
/// callers run them on a worker thread with a timeout, never on the event
/// loop.
pub trait Kernel: Send + Sync + 'static {
    /// Every PCI function, sorted by address.
    fn devices(&self) -> KernelResult<Vec<PciDevice>>;
    /// Every function's vendor:device id, sorted by address: one read
    /// each, for matching profiles by id without reading everything.
    fn ids(&self) -> KernelResult<Vec<(PciAddress, PciId)>>;
    /// One function; `None` when it is not on the bus.
    fn device(&self, address: &PciAddress) -> KernelResult<Option<PciDevice>>;
    /// The functions in IOMMU group `group`, from the group's own listing:
    /// a plan reads these, not the whole bus.
    fn group_members(&self, group: u32) -> KernelResult<Vec<PciAddress>>;
    /// The driver bound now, read from the `driver` link.
    fn driver(&self, address: &PciAddress) -> KernelResult<Option<String>>;
    /// `driver_override`; `None` when it reads `(null)`.
    fn driver_override(&self, address: &PciAddress) -> KernelResult<Option<String>>;
    /// True when an IOMMU is on (IOMMU groups exist).
    fn iommu_enabled(&self) -> KernelResult<bool>;
    /// True when a PCI driver of that name is registered.
    fn driver_registered(&self, driver: &str) -> bool;
    /// True when the module is loaded, built in, or can be loaded.
    fn module_available(&self, module: &str) -> bool;
    /// Device nodes under /dev that belong to the function (DRM, sound,
    /// fb, disks and input behind a controller). Read apart from
    /// [`Kernel::devices`]: only the functions a move takes need them.
    fn nodes(&self, address: &PciAddress) -> KernelResult<Vec<PathBuf>>;
    /// Processes that hold any of `nodes` open.
    fn holders(&self, nodes: &[PathBuf]) -> KernelResult<Vec<Holder>>;
    /// Mount points of filesystems that live on block devices behind the device.
    fn mounts_behind(&self, address: &PciAddress) -> KernelResult<Vec<String>>;
    /// USB devices behind a USB controller (empty for anything else).
    fn usb_behind(&self, address: &PciAddress) -> KernelResult<Vec<UsbDevice>>;
    /// True when the kernel console or the boot framebuffer is on the device.
    fn console_on(&self, address: &PciAddress) -> KernelResult<bool>;
    /// `/dev/vfio/N` when it exists.
    fn vfio_group_node(&self, group: u32) -> Option<PathBuf>;
    /// The function's own vfio device files (`/dev/vfio/devices/vfioX`,
    /// named by its `vfio-dev/vfioX` in sysfs): kernels with iommufd's
    /// device interface (6.6+) make one for each function on vfio-pci, and
    /// a VM using iommufd holds it instead of the group's node.
    fn vfio_device_nodes(&self, address: &PciAddress) -> KernelResult<Vec<PathBuf>>;
    /// Whether a process (a VM) has `/dev/vfio/N` open; `None` when that
    /// can't be told without looking for the holders.
    fn vfio_group_open(&self, group: u32) -> Option<bool>;
    /// What the doctor reads beyond PCI moves: CPU, firmware, command
    /// line, modules, framebuffers, memory, libvirt. A fact that cannot be
    /// read is unknown (`None`), not an error.
    fn host(&self) -> KernelResult<HostView>;
    /// Changes with every boot: journal entries of an earlier boot are
    /// never replayed.
    fn boot_id(&self) -> KernelResult<String>;

    /// `modprobe MODULE`. May block.
    fn load_module(&self, module: &str) -> KernelResult<()>;
    /// Writes `driver_override`; `None` writes "\n", which clears it. May block.
    fn set_driver_override(&self, address: &PciAddress, driver: Option<&str>) -> KernelResult<()>;
    /// Writes the address to `drivers/DRIVER/unbind`. May block indefinitely.
    fn unbind(&self, address: &PciAddress, driver: &str) -> KernelResult<()>;
    /// Writes the address to `/sys/bus/pci/drivers_probe`. Succeeds even
    /// when no driver binds: re-read [`Kernel::driver`]. May block.
    fn probe(&self, address: &PciAddress) -> KernelResult<()>;
}
