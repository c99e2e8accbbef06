//! Filesystems (and swap) that live on disks behind a PCI function.
//!
//! A mount names its block device by major:minor; `sys/dev/block/MAJ:MIN`
//! leads to the device's sysfs directory, which lies below the controller
//! when the disk hangs off it. Stacked devices lead further down: dm
//! (LVM, LUKS) and md list what they are built on in `slaves/`, and an
//! NVMe multipath disk lives under `virtual/nvme-subsystem/nvme-subsysN`,
//! which links to its controllers (`nvme0`).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::rooted::Rooted;
use crate::KernelResult;

const MOUNTINFO: &str = "proc/self/mountinfo";
const SWAPS: &str = "proc/swaps";
/// `MAJ:MIN` links to every block device.
const BLOCK_NUMBERS: &str = "sys/dev/block";
/// How deep block devices may stack (dm on md on a partition...).
const MAX_STACK_DEPTH: usize = 16;

/// One line of mountinfo, the fields vfiod needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mount {
    /// `8:2`.
    pub(super) device_number: String,
    pub(super) mount_point: String,
    /// What was mounted (`/dev/sda2`), after the ` - fstype` separator.
    pub(super) source: String,
}

/// Mount points (and `[swap] /dev/...` for swap partitions, which the
/// host needs as much as its root) whose block device is behind the
/// function in `function_dir`, in mountinfo order.
pub(super) fn mounts_behind(tree: &Rooted, function_dir: &Path) -> KernelResult<Vec<String>> {
    let mountinfo_path = Path::new(MOUNTINFO);
    let text = tree.read_resolved(mountinfo_path)?;
    let mounts = parse_mountinfo(&text).map_err(|reason| tree.malformed(mountinfo_path, reason))?;
    let Some(block_numbers) = tree.resolve_optional(Path::new(BLOCK_NUMBERS))? else {
        // No block devices at all.
        return Ok(Vec::new());
    };
    let mut behind = Vec::new();
    for mount in mounts {
        let block_dir =
            match tree.resolve_optional_in(&block_numbers, Path::new(&mount.device_number))? {
                Some(dir) => Some(dir),
                // btrfs shows an anonymous 0:N; its source names the real disk.
                None => block_dir_by_node(tree, &mount.source)?,
            };
        if let Some(block_dir) = block_dir
            && stacked_on(tree, &block_dir, function_dir)?
            && !behind.contains(&mount.mount_point)
        {
            behind.push(mount.mount_point);
        }
    }
    for partition in swap_partitions(tree)? {
        if let Some(block_dir) = block_dir_by_node(tree, &partition)?
            && stacked_on(tree, &block_dir, function_dir)?
        {
            behind.push(format!("[swap] {partition}"));
        }
    }
    Ok(behind)
}

/// Fields 3 (major:minor) and 5 (mount point), and the source after ` - `.
pub(super) fn parse_mountinfo(text: &str) -> Result<Vec<Mount>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            let fields: Vec<&str> = line.split(' ').collect();
            let bad = |what: &str| format!("line {}: {what}: {line:?}", index + 1);
            let device_number = *fields.get(2).ok_or_else(|| bad("no major:minor"))?;
            let mount_point = *fields.get(4).ok_or_else(|| bad("no mount point"))?;
            if !is_device_number(device_number) {
                return Err(bad("the third field is not major:minor"));
            }
            let separator = fields
                .iter()
                .skip(6)
                .position(|field| *field == "-")
                .ok_or_else(|| bad("no ' - ' separator"))?;
            let source = fields.get(6 + separator + 2).copied().unwrap_or_default();
            Ok(Mount {
                device_number: device_number.to_owned(),
                mount_point: unescape(mount_point),
                source: unescape(source),
            })
        })
        .collect()
}

fn is_device_number(text: &str) -> bool {
    text.split_once(':').is_some_and(|(major, minor)| {
        [major, minor]
            .iter()
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// The kernel writes space, tab, newline and backslash in paths as `\040`,
/// `\011`, `\012`, `\134`.
pub(super) fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let octal = bytes
            .get(at + 1..at + 4)
            .filter(|digits| bytes[at] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            .map(|digits| {
                digits
                    .iter()
                    .fold(0u32, |value, d| value * 8 + u32::from(d - b'0'))
            })
            .and_then(|value| u8::try_from(value).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                at += 4;
            }
            None => {
                out.push(bytes[at]);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `sys/dev/block/MAJ:MIN` resolved; `None` when it is not a block device.
fn block_dir_by_number(tree: &Rooted, device_number: &str) -> KernelResult<Option<PathBuf>> {
    tree.resolve_optional(&Path::new(BLOCK_NUMBERS).join(device_number))
}

/// The sysfs directory of a block device node such as `/dev/sda2` or
/// `/dev/mapper/root`; `None` when it is not one (`rpool/ROOT`, `tmpfs`).
fn block_dir_by_node(tree: &Rooted, node: &str) -> KernelResult<Option<PathBuf>> {
    if !node.starts_with("/dev/") {
        return Ok(None);
    }
    let node = Path::new(node);
    let metadata = match tree
        .resolve(node)
        .and_then(|resolved| fs::metadata(tree.host_path(&resolved)))
    {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(tree.io_error("stat", node, err)),
    };
    if !metadata.file_type().is_block_device() {
        return Ok(None);
    }
    let rdev = metadata.rdev();
    let number = format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    block_dir_by_number(tree, &number)
}

/// Block devices (`/dev/sda3`) that are active swap partitions. Swap files
/// live on a mounted filesystem, which is reported already.
fn swap_partitions(tree: &Rooted) -> KernelResult<Vec<String>> {
    let Some(text) = tree.read_resolved_optional(Path::new(SWAPS))? else {
        return Ok(Vec::new());
    };
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?;
            (fields.next()? == "partition").then(|| unescape(name))
        })
        .collect())
}

/// True when the block device in `block_dir`, or anything it is built
/// on, lies below `function_dir`.
fn stacked_on(tree: &Rooted, block_dir: &Path, function_dir: &Path) -> KernelResult<bool> {
    let mut seen = HashSet::new();
    let mut pending = vec![(block_dir.to_path_buf(), 0)];
    while let Some((dir, depth)) = pending.pop() {
        if dir.starts_with(function_dir) {
            return Ok(true);
        }
        if depth >= MAX_STACK_DEPTH || !seen.insert(dir.clone()) {
            continue;
        }
        for lower in lower_devices(tree, &dir)? {
            pending.push((lower, depth + 1));
        }
    }
    Ok(false)
}

/// What the block device in `dir` is built on, resolved.
fn lower_devices(tree: &Rooted, dir: &Path) -> KernelResult<Vec<PathBuf>> {
    // A partition (sda2, md0p1, dm-0p1) is built on its whole disk.
    let whole_disk = match dir.parent() {
        Some(parent) if tree.exists(&dir.join("partition")) => parent,
        _ => dir,
    };
    let mut links: Vec<PathBuf> = Vec::new();
    let slaves = whole_disk.join("slaves");
    links.extend(
        tree.list_optional(&slaves)?
            .into_iter()
            .map(|name| slaves.join(name)),
    );
    if let Some(subsystem) = whole_disk.parent()
        && subsystem
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("nvme-subsys"))
    {
        links.extend(
            tree.list_optional(subsystem)?
                .into_iter()
                .filter(|name| is_nvme_controller(&name.to_string_lossy()))
                .map(|name| subsystem.join(name)),
        );
    }
    let mut lower = Vec::new();
    for link in links {
        // None: gone while we looked, a device being torn down.
        lower.extend(tree.resolve_optional(&link)?);
    }
    Ok(lower)
}

/// `nvme0`, not `nvme0n1` or `nvme-subsys0`.
fn is_nvme_controller(name: &str) -> bool {
    name.strip_prefix("nvme")
        .is_some_and(|number| !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_fields_and_escapes() {
        let text = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
29 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw
30 29 253:0 / /mnt/my\\040data rw,relatime shared:2 master:1 - xfs /dev/mapper/vg-data rw
31 29 0:35 /@home /home rw - btrfs /dev/nvme0n1p2 rw,ssd
";
        let mounts = parse_mountinfo(text).unwrap();
        assert_eq!(mounts.len(), 4);
        assert_eq!(
            mounts[1],
            Mount {
                device_number: "8:2".into(),
                mount_point: "/".into(),
                source: "/dev/sda2".into()
            }
        );
        assert_eq!(mounts[2].mount_point, "/mnt/my data");
        assert_eq!(mounts[2].source, "/dev/mapper/vg-data");
        assert_eq!(mounts[3].source, "/dev/nvme0n1p2");
    }

    #[test]
    fn refuses_malformed_mountinfo_with_the_line() {
        for bad in [
            "29 1 8:2",
            "29 1 sda / / rw - ext4 /dev/sda2 rw",
            "29 1 8:2 / / rw ext4 /dev/sda2",
        ] {
            let err = parse_mountinfo(&format!("22 27 0:21 / /proc rw - proc proc rw\n{bad}\n"))
                .unwrap_err();
            assert!(err.starts_with("line 2:"), "{bad}: {err}");
        }
    }

    #[test]
    fn unescapes_octal_and_leaves_the_rest() {
        assert_eq!(unescape(r"/a\040b\011c\012d\134e"), "/a b\tc\nd\\e");
        assert_eq!(unescape(r"\04"), r"\04");
        assert_eq!(unescape(r"\999\"), r"\999\");
        assert_eq!(unescape(r"\777"), r"\777", "not a byte");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn recognises_nvme_controllers() {
        assert!(is_nvme_controller("nvme0"));
        assert!(is_nvme_controller("nvme12"));
        assert!(!is_nvme_controller("nvme0n1"));
        assert!(!is_nvme_controller("nvme-subsys0"));
        assert!(!is_nvme_controller("nvme"));
    }
}
