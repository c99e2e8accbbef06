//! Framebuffers and the PCI function whose memory each scans out of.
//!
//! - `sys/class/graphics/fbN/device` of a GPU driver's framebuffer
//!   (`radeondrmfb`, `amdgpudrmfb`) is the PCI function itself;
//! - a firmware framebuffer (efifb, vesafb, simplefb, simpledrm) hangs off
//!   a platform device (`efi-framebuffer.0`); `proc/iomem` shows its range
//!   (`efifb`, `BOOTFB`, ...) nested under the BAR of the GPU it lives in,
//!   or inside one of the `resource` ranges of that GPU. Without either,
//!   it is the boot VGA's: the firmware set it up there.
//!
//! Names come from `proc/fb` (`0 EFI VGA`), else `fbN`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vfiod_pci::PciAddress;

use super::{list, text};
use crate::facts::FramebufferView;
use crate::sysfs::rooted::Rooted;

const GRAPHICS: &str = "sys/class/graphics";
const PROC_FB: &str = "proc/fb";
const IOMEM: &str = "proc/iomem";
const PLATFORM_DEVICES: &str = "sys/bus/platform/devices";

pub(super) fn read(
    tree: &Rooted,
    functions: &[(PciAddress, PathBuf)],
) -> Option<Vec<FramebufferView>> {
    let graphics = list(tree, GRAPHICS);
    let iomem = text(tree, IOMEM);
    let platform = list(tree, PLATFORM_DEVICES);
    if graphics.is_none() && iomem.is_none() && platform.is_none() {
        return None;
    }
    let names = proc_fb_names(tree);
    let regions = iomem
        .as_deref()
        .map(|text| firmware_regions(text, tree, functions))
        .unwrap_or_default();
    let boot_vga = functions
        .iter()
        .find(|(_, dir)| text(tree, dir.join("boot_vga")).is_some_and(|t| t.trim() == "1"))
        .map(|(address, _)| *address);
    // Where a firmware framebuffer is: its iomem region's GPU, else the boot VGA.
    let firmware_device = regions.iter().find_map(|(_, device)| *device).or(boot_vga);

    let mut found = Vec::new();
    for entry in graphics.unwrap_or_default() {
        let Some(number) = entry.strip_prefix("fb").and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let name = names.get(&number).cloned().unwrap_or_else(|| entry.clone());
        let link = Path::new(GRAPHICS).join(&entry).join("device");
        let device = match tree.resolve_optional(&link).ok().flatten() {
            Some(dir) => match pci_function(&dir) {
                Some(address) => Some(address),
                None if is_firmware_platform_device(&dir) => firmware_device,
                None => None,
            },
            None => None,
        };
        found.push(FramebufferView { name, device });
    }
    // simpledrm without fbdev emulation, or a firmware framebuffer seen only
    // in iomem: still scanning out of the GPU's memory.
    for (name, device) in regions {
        if !found
            .iter()
            .any(|fb| fb.device == device && fb_is_firmware(&fb.name))
        {
            found.push(FramebufferView { name, device });
        }
    }
    for entry in platform.unwrap_or_default() {
        let dir = Path::new(PLATFORM_DEVICES).join(&entry);
        if !is_firmware_platform_device(&dir) || found.iter().any(|fb| fb_is_firmware(&fb.name)) {
            continue;
        }
        // Only a live one: a framebuffer or a DRM card below it.
        let live = ["graphics", "drm"]
            .iter()
            .any(|sub| list(tree, dir.join(sub)).is_some_and(|names| !names.is_empty()));
        if live {
            found.push(FramebufferView {
                name: entry,
                device: firmware_device,
            });
        }
    }
    Some(found)
}

fn fb_is_firmware(name: &str) -> bool {
    FramebufferView {
        name: name.to_owned(),
        device: None,
    }
    .is_firmware()
}

/// `0 EFI VGA` → {0: "EFI VGA"}.
fn proc_fb_names(tree: &Rooted) -> BTreeMap<u32, String> {
    text(tree, PROC_FB)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (number, name) = line.trim().split_once(char::is_whitespace)?;
            Some((number.parse().ok()?, name.trim().to_owned()))
        })
        .collect()
}

/// The PCI function a sysfs directory is (its last component).
fn pci_function(dir: &Path) -> Option<PciAddress> {
    dir.file_name()?.to_str()?.parse().ok()
}

fn is_firmware_platform_device(dir: &Path) -> bool {
    dir.file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| {
            ["efi-framebuffer", "vesa-framebuffer", "simple-framebuffer"]
                .iter()
                .any(|prefix| name.starts_with(prefix))
        })
}

/// Firmware framebuffer regions of `proc/iomem` with the PCI function
/// they lie in: the nearest enclosing line named like a PCI address, else
/// the function whose `resource` ranges contain the region's start.
fn firmware_regions(
    iomem: &str,
    tree: &Rooted,
    functions: &[(PciAddress, PathBuf)],
) -> Vec<(String, Option<PciAddress>)> {
    let mut regions = Vec::new();
    // (indent, name) of the lines enclosing the current one.
    let mut stack: Vec<(usize, String)> = Vec::new();
    for line in iomem.lines() {
        let indent = line.len() - line.trim_start().len();
        let Some((range, name)) = line.trim().split_once(" : ") else {
            continue;
        };
        while stack.last().is_some_and(|(depth, _)| *depth >= indent) {
            stack.pop();
        }
        let name = name.trim().to_owned();
        if fb_is_firmware(&name) {
            let enclosing = stack
                .iter()
                .rev()
                .find_map(|(_, outer)| outer.parse::<PciAddress>().ok());
            let start = range
                .split_once('-')
                .and_then(|(start, _)| u64::from_str_radix(start, 16).ok())
                .filter(|start| *start != 0);
            let device = enclosing.or_else(|| start.and_then(|s| containing(tree, functions, s)));
            regions.push((name.clone(), device));
        }
        stack.push((indent, name));
    }
    regions
}

/// The function with a memory BAR (`resource`: `start end flags` lines)
/// that contains `address`.
fn containing(
    tree: &Rooted,
    functions: &[(PciAddress, PathBuf)],
    address: u64,
) -> Option<PciAddress> {
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    functions.iter().find_map(|(function, dir)| {
        let resource = text(tree, dir.join("resource"))?;
        // BARs 0-5 and the ROM; bridges list their windows after them,
        // which would claim everything behind them.
        resource.lines().take(7).find_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = (hex(fields.next()?)?, hex(fields.next()?)?);
            (start != 0 && start <= address && address <= end).then_some(*function)
        })
    })
}
