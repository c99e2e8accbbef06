//! One PCI function read from its sysfs directory.

use std::path::{Path, PathBuf};

use vfiod_pci::{PciAddress, PciClass, PciDevice, PciId};

use super::pci_ids::PciIds;
use super::rooted::Rooted;
use super::subtree;
use crate::KernelResult;

/// The ids the function's config space answers with now: its first four
/// bytes, little-endian (`ffff` from a dead function). `None` without a
/// readable `config` (a fixture without one).
pub(super) fn live_id(tree: &Rooted, dir: &Path) -> KernelResult<Option<PciId>> {
    use std::io::Read;
    let rel = dir.join("config");
    let mut head = [0u8; 4];
    let read = std::fs::File::open(tree.host_path(&rel)).and_then(|mut f| f.read_exact(&mut head));
    match read {
        Ok(()) => Ok(Some(PciId {
            vendor: u16::from_le_bytes([head[0], head[1]]),
            device: u16::from_le_bytes([head[2], head[3]]),
        })),
        Err(err)
            if matches!(
                err.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            Ok(None)
        }
        Err(err) => Err(tree.io_error("read", &rel, err)),
    }
}

/// `reset_method` as the kernel shows it, from [`PciDevice::reset_methods`]:
/// `None` when there is no such file (before 5.15, or no method at all).
pub fn reset_method_file(methods: &[String]) -> Option<String> {
    if methods.is_empty() || methods.iter().any(|m| m == RESET_METHOD_UNKNOWN) {
        return None;
    }
    Some(methods.join(" "))
}

/// What [`PciDevice::reset_methods`] holds on kernels before 5.15, which
/// have no `reset_method` file: a `reset` file says the function can be
/// reset, not how.
pub const RESET_METHOD_UNKNOWN: &str = "unknown";

/// Reads everything about the function in `dir` (root-relative, links
/// resolved, e.g. `sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0`).
pub(super) fn read(
    tree: &Rooted,
    ids: &PciIds,
    address: PciAddress,
    dir: &Path,
) -> KernelResult<PciDevice> {
    let Uevent {
        id,
        subsystem,
        class,
    } = read_uevent(tree, dir)?;
    Ok(PciDevice {
        address,
        id,
        subsystem,
        class,
        name: ids.device_name(id),
        driver: driver(tree, dir)?,
        iommu_group: iommu_group(tree, dir)?,
        parent: parent(dir),
        boot_vga: boot_vga(tree, dir)?,
        reset_methods: reset_methods(tree, dir)?,
    })
}

/// What a function's `uevent` says of it.
pub(super) struct Uevent {
    pub id: PciId,
    pub subsystem: Option<PciId>,
    pub class: PciClass,
}

/// `uevent` holds the ids and the class in one read, where `vendor`,
/// `device`, `subsystem_*` and `class` take five.
pub(super) fn read_uevent(tree: &Rooted, dir: &Path) -> KernelResult<Uevent> {
    let uevent_path = dir.join("uevent");
    let uevent = tree.read(&uevent_path)?;
    let malformed = |reason: String| tree.malformed(&uevent_path, reason);
    let field = |key: &str| {
        uevent
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
    };
    let id = field("PCI_ID")
        .ok_or_else(|| malformed("no PCI_ID".into()))
        .and_then(|text| parse_id(text).ok_or_else(|| malformed(format!("PCI_ID {text:?}"))))?;
    let subsystem = field("PCI_SUBSYS_ID")
        .map(|text| parse_id(text).ok_or_else(|| malformed(format!("PCI_SUBSYS_ID {text:?}"))))
        .transpose()?;
    let class = field("PCI_CLASS")
        .ok_or_else(|| malformed("no PCI_CLASS".into()))
        .and_then(|text| {
            u32::from_str_radix(text, 16)
                .ok()
                .filter(|class| *class <= 0xff_ffff)
                .map(PciClass)
                .ok_or_else(|| malformed(format!("PCI_CLASS {text:?}")))
        })?;
    Ok(Uevent {
        id,
        subsystem,
        class,
    })
}

pub(super) fn driver(tree: &Rooted, dir: &Path) -> KernelResult<Option<String>> {
    tree.link_name(&dir.join("driver"))
}

/// `(null)` is how the kernel shows an unset override; an empty file or
/// none at all (very old kernels) means the same.
pub(super) fn driver_override(tree: &Rooted, dir: &Path) -> KernelResult<Option<String>> {
    let text = tree.read_optional(&dir.join("driver_override"))?;
    Ok(text
        .map(|text| text.trim().to_owned())
        .filter(|text| !text.is_empty() && text != "(null)"))
}

fn iommu_group(tree: &Rooted, dir: &Path) -> KernelResult<Option<u32>> {
    let link = dir.join("iommu_group");
    let Some(name) = tree.link_name(&link)? else {
        return Ok(None);
    };
    name.parse()
        .map(Some)
        .map_err(|_| tree.malformed(&link, format!("group {name:?} is not a number")))
}

/// The upstream bridge: in sysfs a function's directory sits inside its
/// bridge's; a root port's sits in the host bridge's `pci0000:00`.
fn parent(dir: &Path) -> Option<PciAddress> {
    dir.parent()?.file_name()?.to_str()?.parse().ok()
}

/// Only VGA-class functions have the file.
pub(super) fn boot_vga(tree: &Rooted, dir: &Path) -> KernelResult<bool> {
    let path = dir.join("boot_vga");
    match tree.read_optional(&path)?.as_deref().map(str::trim) {
        None | Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(tree.malformed(&path, format!("expected 0 or 1, found {other:?}"))),
    }
}

/// `reset_method` (kernel >= 5.15, e.g. `flr bus`); else
/// [`RESET_METHOD_UNKNOWN`] when a `reset` file exists; else none.
fn reset_methods(tree: &Rooted, dir: &Path) -> KernelResult<Vec<String>> {
    if let Some(methods) = tree.read_optional(&dir.join("reset_method"))? {
        return Ok(methods.split_whitespace().map(str::to_owned).collect());
    }
    // `reset` is write-only: opening it to read fails even for root, so
    // only its presence says anything.
    if tree.exists(&dir.join("reset")) {
        return Ok(vec![RESET_METHOD_UNKNOWN.to_owned()]);
    }
    Ok(Vec::new())
}

/// `/dev/DEVNAME` of every device below the function. Only directories
/// with a `dev` attribute (a major:minor) can have a node, so only their
/// `uevent` is read.
pub(super) fn nodes(tree: &Rooted, dir: &Path) -> KernelResult<Vec<PathBuf>> {
    let mut nodes = Vec::new();
    subtree::walk(tree, dir, |sub| {
        if sub.has_file("dev")
            && let Some(node) = uevent_node(tree, sub.path)?
        {
            nodes.push(node);
        }
        Ok(())
    })?;
    nodes.sort();
    nodes.dedup();
    Ok(nodes)
}

fn uevent_node(tree: &Rooted, dir: &Path) -> KernelResult<Option<PathBuf>> {
    let path = dir.join("uevent");
    let uevent = match tree.read_optional(&path) {
        Ok(Some(uevent)) => uevent,
        Ok(None) => return Ok(None),
        Err(crate::KernelError::Io { source, .. }) if subtree::vanished(&source) => {
            return Ok(None);
        }
        Err(err) => return Err(err),
    };
    let Some(devname) = uevent
        .lines()
        .find_map(|line| line.strip_prefix("DEVNAME="))
    else {
        return Ok(None);
    };
    let devname = Path::new(devname.trim());
    let plain = devname
        .components()
        .all(|component| matches!(component, std::path::Component::Normal(_)));
    if !plain || devname.as_os_str().is_empty() {
        return Err(tree.malformed(
            &path,
            format!("DEVNAME {} is not a path below /dev", devname.display()),
        ));
    }
    Ok(Some(Path::new("/dev").join(devname)))
}

/// `1002:67DF`, as the kernel writes ids in `uevent`.
fn parse_id(text: &str) -> Option<PciId> {
    let (vendor, device) = text.split_once(':')?;
    let hex = |part: &str| {
        (part.len() == 4 && part.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u16::from_str_radix(part, 16).ok())
            .flatten()
    };
    Some(PciId {
        vendor: hex(vendor)?,
        device: hex(device)?,
    })
}
