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
