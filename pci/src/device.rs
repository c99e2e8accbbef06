use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{PciAddress, PciClass, PciId};

/// One PCI function as the kernel shows it at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDevice {
    pub address: PciAddress,
    pub id: PciId,
    pub subsystem: Option<PciId>,
    pub class: PciClass,
    /// Human name (pci.ids or the machine file); empty when unknown.
    pub name: String,
    /// The bound driver, from the `driver` link.
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    /// The upstream bridge, when the device sits behind one.
    pub parent: Option<PciAddress>,
    pub boot_vga: bool,
    /// `reset_method` (kernel >= 5.15), or `["unknown"]`-free empty list when no reset.
    pub reset_methods: Vec<String>,
}

impl PciDevice {
    pub fn is_bridge(&self) -> bool {
        self.class.is_bridge()
    }
    /// May stay on its driver in a viable IOMMU group (PciClass::has_bridge_header).
    pub fn has_bridge_header(&self) -> bool {
        self.class.has_bridge_header()
    }
    pub fn is_bound_to(&self, driver: &str) -> bool {
        self.driver.as_deref() == Some(driver)
    }
}

/// A process holding a device node open.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
    pub node: PathBuf,
}

/// A USB device behind a controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsbDevice {
    pub port: String,
    pub id: PciId,
    /// Interface class, two hex digits; "03" is HID.
    pub class: String,
    pub name: String,
}

impl UsbDevice {
    pub fn is_input(&self) -> bool {
        self.class.eq_ignore_ascii_case("03")
    }
}

/// A console driver slot of the virtual terminals
/// (`/sys/class/vtconsole/vtconN`): the dummy console, vgacon or fbcon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtConsole {
    /// `vtconN`.
    pub name: String,
    /// fbcon's slot (its `name` file says "frame buffer device").
    pub fbcon: bool,
    /// Its `bind` reads 1.
    pub bound: bool,
    /// The PCI function it draws on, when it is fbcon and that is known.
    pub device: Option<PciAddress>,
}

/// A framebuffer the firmware set up, as the kernel's platform device
/// (`efi-framebuffer.0`, `simple-framebuffer.0`, `vesa-framebuffer.0`):
/// efifb, simplefb, vesafb or simpledrm drive it, out of the boot GPU's
/// memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFramebuffer {
    /// The platform device, e.g. `simple-framebuffer.0`.
    pub name: String,
    /// The platform driver bound to it now (`efi-framebuffer`,
    /// `simple-framebuffer` for simplefb and simpledrm alike), if any.
    pub driver: Option<String>,
    /// The PCI function whose memory it scans out of, when known.
    pub device: Option<PciAddress>,
}
