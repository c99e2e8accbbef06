//! USB devices behind a controller, as its sysfs subtree shows them:
//! `0000:00:14.0/usb1/1-2/1-2:1.0`, a device (`idVendor`, `idProduct`,
//! `bDeviceClass`) holding its interfaces (`bInterfaceClass`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vfiod_pci::{PciId, UsbDevice};

use super::rooted::Rooted;
use super::subtree;
use crate::KernelResult;

/// The HID interface class: keyboards and mice.
const HID_CLASS: &str = "03";
/// Device classes that say "look at the interfaces": per-interface (00)
/// and miscellaneous / interface association (ef).
const PER_INTERFACE_CLASSES: [&str; 2] = ["00", "ef"];

/// Every USB device below `controller_dir` except the root hubs (`usb1`,
/// which stand for the controller itself), sorted by port.
///
/// Its class is HID ("03") when any interface is HID, so one keyboard
/// with a vendor-specific first interface still counts as input; else the
/// device class, unless that defers to the interfaces, then the first
/// interface's class.
pub(super) fn devices_behind(tree: &Rooted, controller_dir: &Path) -> KernelResult<Vec<UsbDevice>> {
    let mut devices: BTreeMap<PathBuf, UsbDevice> = BTreeMap::new();
    // Interface classes by the directory of their device, by interface name.
    let mut interfaces: BTreeMap<PathBuf, BTreeMap<String, String>> = BTreeMap::new();
    subtree::walk(tree, controller_dir, |dir| {
        let Some(name) = dir.path.file_name().and_then(|name| name.to_str()) else {
            return Ok(());
        };
        if dir.has_file("bInterfaceClass") {
            let class = read_class(tree, &dir.path.join("bInterfaceClass"))?;
            if let Some(device_dir) = dir.path.parent() {
                interfaces
                    .entry(device_dir.to_path_buf())
                    .or_default()
                    .insert(name.to_owned(), class);
            }
        } else if dir.has_file("idVendor") && dir.has_file("idProduct") && !name.starts_with("usb")
        {
            devices.insert(dir.path.to_path_buf(), read_device(tree, dir.path, name)?);
        }
        Ok(())
    })?;
    let mut devices: Vec<UsbDevice> = devices
        .into_iter()
        .map(|(dir, mut device)| {
            let classes = interfaces.remove(&dir).unwrap_or_default();
            if classes.values().any(|class| class == HID_CLASS) {
                device.class = HID_CLASS.to_owned();
            } else if PER_INTERFACE_CLASSES.contains(&device.class.as_str())
                && let Some(first) = classes.into_values().next()
            {
                device.class = first;
            }
            device
        })
        .collect();
    devices.sort_by(|a, b| a.port.cmp(&b.port));
    Ok(devices)
}

/// The device with its own class; the interfaces may override it.
fn read_device(tree: &Rooted, dir: &Path, port: &str) -> KernelResult<UsbDevice> {
    let id = PciId {
        vendor: read_id(tree, &dir.join("idVendor"))?,
        device: read_id(tree, &dir.join("idProduct"))?,
    };
    let class_path = dir.join("bDeviceClass");
    let class = match tree.read_optional(&class_path)? {
        Some(text) => parse_class(tree, &class_path, &text)?,
        // Unknown: let the interfaces say.
        None => "00".to_owned(),
    };
    let name = tree
        .read_optional(&dir.join("product"))?
        .map(|product| product.trim().to_owned())
        .unwrap_or_default();
    Ok(UsbDevice {
        port: port.to_owned(),
        id,
        class,
        name,
    })
}

/// `046d`: four hex digits, no `0x`.
fn read_id(tree: &Rooted, path: &Path) -> KernelResult<u16> {
    let text = tree.read(path)?;
    let text = text.trim();
    (text.len() == 4 && text.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u16::from_str_radix(text, 16).ok())
        .flatten()
        .ok_or_else(|| tree.malformed(path, format!("expected 4 hex digits, found {text:?}")))
}

fn read_class(tree: &Rooted, path: &Path) -> KernelResult<String> {
    parse_class(tree, path, &tree.read(path)?)
}

/// `03`: two hex digits, returned in lower case.
fn parse_class(tree: &Rooted, path: &Path, text: &str) -> KernelResult<String> {
    let text = text.trim();
    if text.len() == 2 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(tree.malformed(path, format!("expected 2 hex digits, found {text:?}")))
    }
}
