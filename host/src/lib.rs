//! What vfiod and vfioctl read about a host, and nothing they could
//! write: [`Inspect`] is every read, from the PCI bus to libvirt's
//! configuration; [`sysfs::Sysfs`] reads a real (or fixture) sysfs tree;
//! [`facts`] holds what the doctor reads beyond PCI moves;
//! [`snapshot`] writes a host as a machine file. The daemon's write
//! interface extends [`Inspect`] in its own crate, out of the client's
//! reach.

use std::io;
use std::path::PathBuf;

use vfiod_pci::machine::ModuleLoading;
use vfiod_pci::{BootFramebuffer, Holder, PciAddress, PciDevice, PciId, UsbDevice, VtConsole};

use self::facts::HostView;

pub mod facts;
pub mod snapshot;
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

    /// EINVAL from a write: the kernel does not take that value.
    pub fn is_invalid_value(&self) -> bool {
        matches!(self, KernelError::Io { source, .. } if source.raw_os_error() == Some(nix::libc::EINVAL))
    }
}

pub type KernelResult<T> = Result<T, KernelError>;

/// Everything vfiod reads about the host: the PCI bus, the nodes and
/// holders of its devices, and the facts the doctor reads.
///
/// Reads are quick, but for `driver_override`, which takes the device lock
/// and so waits behind an unbind that is waiting in the kernel.
pub trait Inspect: Send + Sync + 'static {
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
    /// True when the module is loaded, built in, or on disk to be loaded.
    fn module_available(&self, module: &str) -> bool;
    /// Whether this process may load modules at all (a module on disk is
    /// no use otherwise). Unknown is [`ModuleLoading::Allowed`]: the load
    /// itself says.
    fn module_loading(&self) -> ModuleLoading;
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
    /// The vtconsoles (`sys/class/vtconsole/vtconN`) in order: which is
    /// fbcon, whether it is bound, and the function fbcon draws on.
    fn vtconsoles(&self) -> KernelResult<Vec<VtConsole>>;
    /// The firmware framebuffers' platform devices (efi-, simple- and
    /// vesa-framebuffer.N), the driver on each and the function whose
    /// memory each scans out of (the boot VGA).
    fn boot_framebuffers(&self) -> KernelResult<Vec<BootFramebuffer>>;
    /// `/dev/vfio/N` when it exists.
    fn vfio_group_node(&self, group: u32) -> Option<PathBuf>;
    /// The vendor and device id the function's config space answers with
    /// now (its `config` file, not the ids cached at enumeration): `ffff`
    /// from a function that did not survive its VM. `None` when it can't
    /// be read.
    fn live_id(&self, address: &PciAddress) -> KernelResult<Option<PciId>>;
    /// The function's own vfio device files (`/dev/vfio/devices/vfioX`,
    /// named by its `vfio-dev/vfioX` in sysfs): kernels with iommufd's
    /// device interface (6.6+) make one for each function on vfio-pci, and
    /// a VM using iommufd holds it instead of the group's node.
    fn vfio_device_nodes(&self, address: &PciAddress) -> KernelResult<Vec<PathBuf>>;
    /// What the doctor reads beyond PCI moves: CPU, firmware, command
    /// line, modules, framebuffers, memory, libvirt. A fact that cannot be
    /// read is unknown (`None`), not an error.
    fn host(&self) -> KernelResult<HostView>;
    /// Changes with every boot: journal entries of an earlier boot are
    /// never replayed.
    fn boot_id(&self) -> KernelResult<String>;
}
