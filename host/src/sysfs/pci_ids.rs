//! Device names from the pci.ids database (the file `lspci` reads).
//!
//! The file is about 1.3 MB with some 40 000 devices, and a host has a few
//! dozen of them: the text is kept with an index of where each vendor's
//! block starts and ends, and every name looked up is remembered.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use vfiod_pci::PciId;

/// Where distributions install it, in the order `lspci` tries them.
pub(super) const PCI_IDS_PATHS: [&str; 2] = ["usr/share/hwdata/pci.ids", "usr/share/misc/pci.ids"];

#[derive(Debug, Default)]
pub(super) struct PciIds {
    text: String,
    /// Byte range of each vendor's device and subsystem lines.
    vendors: HashMap<u16, Range<usize>>,
    known: Mutex<HashMap<PciId, String>>,
}

impl PciIds {
    pub(super) fn parse(text: String) -> Self {
        let mut vendors = HashMap::new();
        let mut current: Option<(u16, usize)> = None;
        let mut offset = 0;
        for line in text.split_inclusive('\n') {
            let line_start = offset;
            offset += line.len();
            if line.starts_with('\t') || line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some((vendor, start)) = current.take() {
                vendors.entry(vendor).or_insert(start..line_start);
            }
            // The class list ("C 03  Display controller") follows the vendors.
            if line.starts_with("C ") {
                break;
            }
            current = id_and_name(line).map(|(vendor, _)| (vendor, offset));
        }
        if let Some((vendor, start)) = current {
            vendors.entry(vendor).or_insert(start..offset);
        }
        PciIds {
            text,
            vendors,
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The device's name (`Ellesmere [Radeon RX 470/480/570/570X/580/580X/590]`),
    /// empty when the database does not know it.
    pub(super) fn device_name(&self, id: PciId) -> String {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        known
            .entry(id)
            .or_insert_with(|| self.find_device(id))
            .clone()
    }

    fn find_device(&self, id: PciId) -> String {
        let Some(range) = self.vendors.get(&id.vendor) else {
            return String::new();
        };
        self.text[range.clone()]
            .lines()
            .filter_map(|line| line.strip_prefix('\t'))
            // Two tabs: a subsystem line.
            .filter(|line| !line.starts_with('\t'))
            .filter_map(id_and_name)
            .find(|(device, _)| *device == id.device)
            .map(|(_, name)| name.to_owned())
            .unwrap_or_default()
    }
}

/// `1002  Advanced Micro Devices` → (0x1002, "Advanced Micro Devices").
fn id_and_name(line: &str) -> Option<(u16, &str)> {
    let hex = line.get(..4)?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = u16::from_str_radix(hex, 16).ok()?;
    Some((id, line[4..].trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNIPPET: &str = "\
# pci.ids snippet
#\tSyntax: vendor  vendor_name
1002  Advanced Micro Devices, Inc. [AMD/ATI]
\t67df  Ellesmere [Radeon RX 470/480/570/570X/580/580X/590]
\t\t1043 04fb  Radeon RX 480
\taaf0  Ellesmere HDMI Audio [Radeon RX 470/480 / 570/580/590]

8086  Intel Corporation
\t0162  Xeon E3-1200 v2/3rd Gen Core processor Graphics Controller
\t1e31  7 Series/C210 Series Chipset Family USB xHCI Host Controller
C 03  Display controller
\t00  VGA compatible controller
";

    fn id(text: &str) -> PciId {
        text.parse().unwrap()
    }

    #[test]
    fn names_devices_of_every_vendor() {
        let db = PciIds::parse(SNIPPET.to_owned());
        assert_eq!(
            db.device_name(id("1002:67df")),
            "Ellesmere [Radeon RX 470/480/570/570X/580/580X/590]"
        );
        assert_eq!(
            db.device_name(id("1002:aaf0")),
            "Ellesmere HDMI Audio [Radeon RX 470/480 / 570/580/590]"
        );
        assert_eq!(
            db.device_name(id("8086:1e31")),
            "7 Series/C210 Series Chipset Family USB xHCI Host Controller"
        );
        // Asked twice: answered from memory, the same.
        assert_eq!(
            db.device_name(id("8086:1e31")),
            db.device_name(id("8086:1e31"))
        );
    }

    #[test]
    fn unknown_devices_subsystems_and_classes_have_no_name() {
        let db = PciIds::parse(SNIPPET.to_owned());
        assert_eq!(
            db.device_name(id("1002:1043")),
            "",
            "a subsystem line is not a device"
        );
        assert_eq!(db.device_name(id("8086:ffff")), "");
        assert_eq!(db.device_name(id("1234:0000")), "");
        assert_eq!(PciIds::default().device_name(id("1002:67df")), "");
        // Garbage does not panic.
        let db = PciIds::parse("10\n\tzz\n\u{e9}\u{e9}\u{e9}\u{e9}  x\n1002\n\t67df".to_owned());
        assert_eq!(db.device_name(id("1002:67df")), "");
    }
}
