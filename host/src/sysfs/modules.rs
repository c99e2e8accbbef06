//! Kernel modules: whether one is there or can be loaded.

use std::path::{Path, PathBuf};

use super::rooted::Rooted;

const KERNEL_RELEASE: &str = "proc/sys/kernel/osrelease";

/// Loaded or built in with a `sys/module` entry, or listed for the running
/// kernel in `modules.dep` (loadable) or `modules.builtin`. `-` and `_`
/// are the same in module names.
pub(super) fn module_available(tree: &Rooted, module: &str) -> bool {
    if !is_module_name(module) {
        return false;
    }
    let name = canonical(module);
    if tree.exists(&Path::new("sys/module").join(&name)) {
        return true;
    }
    let Some(release) = running_release(tree) else {
        return false;
    };
    let modules_dir = Path::new("lib/modules").join(release);
    ["modules.dep", "modules.builtin"]
        .iter()
        .any(|list| lists_module(tree, &modules_dir.join(list), &name))
}

/// `vfio-pci`, `vfio_pci`: no paths, options or spaces.
pub fn is_module_name(module: &str) -> bool {
    !module.is_empty()
        && !module.starts_with('-')
        && module
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn canonical(module: &str) -> String {
    module.replace('-', "_")
}

/// `uname -r` of the kernel whose proc is under the root.
fn running_release(tree: &Rooted) -> Option<PathBuf> {
    let text = tree
        .read_resolved_optional(Path::new(KERNEL_RELEASE))
        .ok()??;
    let release = text.trim();
    let plain = !release.is_empty() && release != ".." && release != "." && !release.contains('/');
    plain.then(|| PathBuf::from(release))
}

/// True when the list (`kernel/drivers/vfio/pci/vfio-pci.ko.zst: deps`
/// lines, or bare paths) names the module.
fn lists_module(tree: &Rooted, list: &Path, name: &str) -> bool {
    let Ok(Some(text)) = tree.read_resolved_optional(list) else {
        return false;
    };
    text.lines()
        .filter_map(|line| line.split(':').next())
        .filter_map(|path| Path::new(path.trim()).file_name()?.to_str())
        // vfio-pci.ko, vfio-pci.ko.xz, vfio-pci.ko.zst
        .filter_map(|file| file.split_once(".ko").map(|(stem, _)| stem))
        .any(|stem| canonical(stem) == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_are_plain() {
        assert!(is_module_name("vfio-pci"));
        assert!(is_module_name("vfio_pci"));
        for bad in ["", "-r", "../x", "a b", "vfio/pci", "x\n"] {
            assert!(!is_module_name(bad), "{bad:?}");
        }
    }
}
