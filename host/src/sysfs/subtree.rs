//! Walking what hangs below one PCI function in sysfs (DRM cards, sound
//! cards, USB buses, disks), without wandering into the functions behind
//! it when it is a bridge.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::Path;

use vfiod_pci::PciAddress;

use super::rooted::Rooted;
use crate::KernelResult;

/// Directories of attributes that every function has and that never hold
/// a device: skipping them saves a read_dir each.
const ATTRIBUTE_GROUPS: [&str; 2] = ["power", "msi_irqs"];

/// One directory of the walk.
pub(super) struct SubtreeDir<'a> {
    /// Root-relative.
    pub(super) path: &'a Path,
    /// Regular files (attributes) in it, unsorted.
    pub(super) files: &'a [OsString],
}

impl SubtreeDir<'_> {
    pub(super) fn has_file(&self, name: &str) -> bool {
        self.files.iter().any(|file| file == name)
    }
}

/// Calls `visit` for `function_dir` and each directory below it.
///
/// Links are not followed (sysfs links point back up and across the tree),
/// child PCI functions are left out (they are devices of their own), and so
/// are [`ATTRIBUTE_GROUPS`]. A directory that vanishes mid-walk, as a driver's
/// children do while it unbinds, is skipped.
pub(super) fn walk(
    tree: &Rooted,
    function_dir: &Path,
    mut visit: impl FnMut(SubtreeDir<'_>) -> KernelResult<()>,
) -> KernelResult<()> {
    let mut pending = vec![function_dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(dir) = pending.pop() {
        files.clear();
        let entries = match fs::read_dir(tree.host_path(&dir)) {
            Ok(entries) => entries,
            Err(err) if dir != function_dir && vanished(&err) => continue,
            Err(err) => return Err(tree.io_error("list", &dir, err)),
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) if vanished(&err) => continue,
                Err(err) => return Err(tree.io_error("list", &dir, err)),
            };
            // sysfs fills in d_type, so this costs no stat.
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            let name = entry.file_name();
            if file_type.is_dir() {
                if !ATTRIBUTE_GROUPS.iter().any(|group| name == *group) && !is_pci_function(&name) {
                    pending.push(dir.join(name));
                }
            } else if file_type.is_file() {
                files.push(name);
            }
        }
        visit(SubtreeDir {
            path: &dir,
            files: &files,
        })?;
    }
    Ok(())
}

fn is_pci_function(name: &OsString) -> bool {
    name.to_str()
        .is_some_and(|name| name.parse::<PciAddress>().is_ok())
}

/// What reading a file of a device that just went away fails with.
pub(super) fn vanished(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::NotFound || err.raw_os_error() == Some(nix::libc::ENODEV)
}
