//! Whether the kernel console or the firmware's boot framebuffer is on a
//! PCI function: taking such a device from the host leaves it blind.
//!
//! The rule; a function holds the console when
//! (a) fbcon is bound (a `sys/class/vtconsole/vtcon*` whose `name` says
//!     "frame buffer device" reads `bind` 1) and the primary framebuffer
//!     has its `device` at or below the function. fbcon draws every
//!     console on fb0 unless `fbcon=map:` says otherwise; the primary is
//!     the lowest-numbered `sys/class/graphics/fbN`, which is fb0 except
//!     while fb0 is being replaced. DRM drivers (amdgpu, i915, bochs-drm)
//!     register their framebuffer on the PCI function itself;
//! (b) the function is the boot VGA (`boot_vga` 1) and a firmware
//!     framebuffer is live: a platform device `efi-framebuffer.N`,
//!     `vesa-framebuffer.N` or `simple-framebuffer.N` with a framebuffer
//!     (`graphics/fbN`) or a DRM device (`drm/cardN`, simpledrm) below it.
//!     It scans out of the boot GPU's memory whether or not fbcon draws on
//!     it (binding vfio-pci under it fails to reserve the BAR). Such a
//!     platform device with nothing below it is what older kernels leave
//!     behind once the native driver took over, and does not count; one
//!     fbcon draws on always has its fbN below it;
//! (c) the function is the boot VGA and the VGA text console is bound (a
//!     vtcon named "VGA+" reads `bind` 1): vgacon drives the legacy VGA
//!     ranges, which the boot VGA decodes.

use std::path::{Path, PathBuf};

use vfiod_pci::{BootFramebuffer, PciAddress, VtConsole};

use super::rooted::Rooted;
use crate::KernelResult;

const VTCONSOLES: &str = "sys/class/vtconsole";
const FRAMEBUFFERS: &str = "sys/class/graphics";
const PLATFORM_DEVICES: &str = "sys/bus/platform/devices";
/// Platform devices the kernel creates for the framebuffer the firmware set up.
const FIRMWARE_FRAMEBUFFERS: [&str; 3] =
    ["efi-framebuffer", "vesa-framebuffer", "simple-framebuffer"];

pub(super) fn console_on(tree: &Rooted, function_dir: &Path, boot_vga: bool) -> KernelResult<bool> {
    let consoles = bound_consoles(tree)?;
    if consoles.framebuffer
        && let Some(framebuffer_device) = primary_framebuffer_device(tree)?
        && framebuffer_device.starts_with(function_dir)
    {
        return Ok(true);
    }
    if !boot_vga {
        return Ok(false);
    }
    Ok(consoles.vga_text || live_firmware_framebuffer(tree)?)
}

#[derive(Debug, Default)]
struct BoundConsoles {
    framebuffer: bool,
    vga_text: bool,
}

fn bound_consoles(tree: &Rooted) -> KernelResult<BoundConsoles> {
    let mut bound = BoundConsoles::default();
    for entry in tree.list_optional(Path::new(VTCONSOLES))? {
        let Some(dir) = tree.resolve_optional(&Path::new(VTCONSOLES).join(entry))? else {
            continue;
        };
        let is_bound = tree
            .read_optional(&dir.join("bind"))?
            .is_some_and(|bind| bind.trim() == "1");
        let name = tree.read_optional(&dir.join("name"))?.unwrap_or_default();
        if is_bound && name.contains("frame buffer device") {
            bound.framebuffer = true;
        }
        if is_bound && name.contains("VGA+") {
            bound.vga_text = true;
        }
    }
    Ok(bound)
}

/// The sysfs directory of the lowest-numbered framebuffer's device.
fn primary_framebuffer_device(tree: &Rooted) -> KernelResult<Option<PathBuf>> {
    let primary = tree
        .list_optional(Path::new(FRAMEBUFFERS))?
        .into_iter()
        .filter_map(|name| name.to_str()?.strip_prefix("fb")?.parse::<u32>().ok())
        .min();
    let Some(number) = primary else {
        return Ok(None);
    };
    tree.resolve_optional(&Path::new(FRAMEBUFFERS).join(format!("fb{number}/device")))
}

fn live_firmware_framebuffer(tree: &Rooted) -> KernelResult<bool> {
    for entry in tree.list_optional(Path::new(PLATFORM_DEVICES))? {
        let name = entry.to_string_lossy();
        if !FIRMWARE_FRAMEBUFFERS
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            continue;
        }
        let Some(dir) = tree.resolve_optional(&Path::new(PLATFORM_DEVICES).join(&entry))? else {
            continue;
        };
        let has_framebuffer = |subdir: &str, prefix: &str| -> KernelResult<bool> {
            Ok(tree
                .list_optional(&dir.join(subdir))?
                .iter()
                .any(|name| name.to_string_lossy().starts_with(prefix)))
        };
        if has_framebuffer("graphics", "fb")? || has_framebuffer("drm", "card")? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The vtconsoles in number order. fbcon draws on the primary
/// framebuffer: its device is a PCI function (a DRM driver's fbdev) or a
/// firmware framebuffer's platform device, which scans out of the boot VGA.
pub(super) fn vtconsoles(
    tree: &Rooted,
    boot_vga: Option<PciAddress>,
) -> KernelResult<Vec<VtConsole>> {
    let mut numbered = Vec::new();
    for entry in tree.list_optional(Path::new(VTCONSOLES))? {
        let name = entry.to_string_lossy().into_owned();
        if let Some(number) = name
            .strip_prefix("vtcon")
            .and_then(|n| n.parse::<u32>().ok())
        {
            numbered.push((number, name));
        }
    }
    numbered.sort();
    let fb_device = primary_framebuffer_device(tree)?.and_then(|path| function_of(&path, boot_vga));
    let mut consoles = Vec::new();
    for (_, name) in numbered {
        let dir = Path::new(VTCONSOLES).join(&name);
        let bound = tree
            .read_resolved_optional(&dir.join("bind"))?
            .is_some_and(|bind| bind.trim() == "1");
        let fbcon = tree
            .read_resolved_optional(&dir.join("name"))?
            .is_some_and(|n| n.contains("frame buffer device"));
        consoles.push(VtConsole {
            name,
            fbcon,
            bound,
            device: if fbcon { fb_device } else { None },
        });
    }
    Ok(consoles)
}

/// The firmware framebuffers' platform devices, bound or not.
pub(super) fn boot_framebuffers(
    tree: &Rooted,
    boot_vga: Option<PciAddress>,
) -> KernelResult<Vec<BootFramebuffer>> {
    let mut found = Vec::new();
    for entry in tree.list_optional(Path::new(PLATFORM_DEVICES))? {
        let name = entry.to_string_lossy().into_owned();
        if !FIRMWARE_FRAMEBUFFERS
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            continue;
        }
        let driver = tree.link_name(&Path::new(PLATFORM_DEVICES).join(&entry).join("driver"))?;
        found.push(BootFramebuffer {
            name,
            driver,
            device: boot_vga,
        });
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// The PCI function a device directory is, or is below; a firmware
/// framebuffer's platform device stands for the boot VGA.
fn function_of(path: &Path, boot_vga: Option<PciAddress>) -> Option<PciAddress> {
    let mut components: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    components.reverse();
    for name in &components {
        if PciAddress::looks_like_address(name)
            && let Ok(address) = name.parse()
        {
            return Some(address);
        }
        if FIRMWARE_FRAMEBUFFERS.iter().any(|p| name.starts_with(p)) {
            return boot_vga;
        }
    }
    None
}
