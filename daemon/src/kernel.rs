//! The kernel vfiod drives: everything [`Inspect`] reads, plus the writes
//! that move devices. Two implementations: [`Sysfs`] on a real (or
//! fixture) sysfs tree (its reads in `vfiod-host`, its writes in
//! [`sysfs`]), and [`sim::SimKernel`], which keeps the real kernel's
//! semantics on a machine file. The transition engine only ever talks to
//! [`Kernel`].

use vfiod_pci::PciAddress;

pub use vfiod_host::sysfs::Sysfs;
pub use vfiod_host::{Inspect, KernelError, KernelResult, VFIO_DRIVER, VFIO_MODULE};

pub mod probe_ops;
pub mod sim;
pub mod sysfs;

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
    /// The driver the event names: the one bound, for `Bind`; the kernel
    /// names none for `Unbind` (the driver is gone when it is sent; the
    /// simulated kernel names the one that left).
    pub driver: Option<String>,
}

/// What the uevent monitor delivers: a uevent, or word that the kernel
/// dropped some (its socket buffer overflowed, ENOBUFS), so nothing but a
/// full read of the bus can tell what changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorEvent {
    Uevent(Uevent),
    Overflow,
}

/// The reads, and what vfiod does to the kernel. Writes may block for as
/// long as a driver wants (an unbind held by an open file): callers run
/// them on a worker thread with a timeout, never on the event loop.
pub trait Kernel: Inspect {
    /// Whether udev still has events to process (libudev's queue:
    /// `/run/udev/queue` exists): at boot, host drivers may still be
    /// binding as the coldplug reaches their devices.
    fn udev_busy(&self) -> bool;
    /// Whether a process (a VM) has `/dev/vfio/N` open; `None` when that
    /// can't be told without looking for the holders.
    fn vfio_group_open(&self, group: u32) -> Option<bool>;
    /// `modprobe MODULE`. May block.
    fn load_module(&self, module: &str) -> KernelResult<()>;
    /// Writes `driver_override`; `None` writes "\n", which clears it. May block.
    fn set_driver_override(&self, address: &PciAddress, driver: Option<&str>) -> KernelResult<()>;
    /// Writes the address to `drivers/DRIVER/unbind`. May block indefinitely.
    fn unbind(&self, address: &PciAddress, driver: &str) -> KernelResult<()>;
    /// Writes the address to `/sys/bus/pci/drivers_probe`. Succeeds even
    /// when no driver binds: re-read [`Inspect::driver`]. May block.
    fn probe(&self, address: &PciAddress) -> KernelResult<()>;
    /// Writes `reset_method` (kernel >= 5.15): method names one space apart,
    /// `default`, or nothing. The kernel refuses (EINVAL) a method the
    /// device does not support, and changes nothing then.
    fn set_reset_method(&self, address: &PciAddress, methods: &str) -> KernelResult<()>;
    /// Writes `1` to the function's `reset`: a reset by its methods, the
    /// device lock taken. May block.
    fn reset(&self, address: &PciAddress) -> KernelResult<()>;
    /// Writes `1` to the function's `remove`: it and all behind it leave
    /// the bus, each unbound first. May block.
    fn remove(&self, address: &PciAddress) -> KernelResult<()>;
    /// Writes `1` to `rescan` of the buses behind the bridge `parent`, or
    /// of every PCI bus (`None`). What is found is added and probed at
    /// once by the kernel (`pci_bus_add_device` attaches a driver whatever
    /// `drivers_autoprobe` says, as the real-kernel lane saw).
    fn rescan(&self, parent: Option<&PciAddress>) -> KernelResult<()>;
    /// Writes `1` (bind) or `0` to `/sys/class/vtconsole/NAME/bind`: its
    /// console driver (fbcon) takes the virtual terminals or leaves them.
    /// Re-read [`Inspect::vtconsoles`]: a bind with nothing to draw on
    /// changes nothing. May block.
    fn bind_vtconsole(&self, name: &str, bind: bool) -> KernelResult<()>;
    /// Writes the platform device `device` (`efi-framebuffer.0`) to
    /// `/sys/bus/platform/drivers/DRIVER/bind` or `unbind`. May block.
    fn bind_platform(&self, device: &str, driver: &str, bind: bool) -> KernelResult<()>;
}
