//! The PCI vocabulary shared by the daemon and the client: addresses, ids,
//! classes, the device model, and the machine-file format of the simulated
//! kernel (DESIGN §7).

mod address;
mod device;
mod id;
pub mod machine;

pub use address::{AddressError, PciAddress, Slot};
pub use device::{BootFramebuffer, Holder, PciDevice, UsbDevice, VtConsole};
pub use id::{IdError, PciClass, PciId};
