//! PCI addresses, ids and classes: never a panic, and what parses prints
//! back to a string that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfiod_pci::{PciAddress, PciClass, PciId};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(address) = text.parse::<PciAddress>() {
        let printed = address.to_string();
        assert_eq!(printed.parse::<PciAddress>().unwrap(), address);
        assert!(PciAddress::looks_like_address(&printed));
    }
    if let Ok(id) = text.parse::<PciId>() {
        assert_eq!(id.to_string().parse::<PciId>().unwrap(), id);
    }
    if let Ok(class) = text.parse::<PciClass>() {
        assert_eq!(class.to_string().parse::<PciClass>().unwrap(), class);
    }
});
