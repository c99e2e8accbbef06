//! Kernel modules: whether one is there or can be loaded.

use std::path::{Path, PathBuf};

use super::rooted::Rooted;

use vfiod_pci::machine::ModuleLoading;

const KERNEL_RELEASE: &str = "proc/sys/kernel/osrelease";
/// `1`: no module may be loaded until the next boot.
pub const MODULES_DISABLED: &str = "proc/sys/kernel/modules_disabled";
const OWN_STATUS: &str = "proc/self/status";
/// `CAP_SYS_MODULE`, bit 16 of the `Cap*` masks in `/proc/PID/status`.
const CAP_SYS_MODULE: u32 = 16;

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

/// Whether this process may load modules: not when the kernel forbids it
/// to everyone, nor without `CAP_SYS_MODULE` in the effective set (the
/// insmod syscall checks it) or the bounding set (`modprobe`, run as root,
/// gets no more than that). A file that cannot be read says nothing.
pub(super) fn module_loading(tree: &Rooted) -> ModuleLoading {
    let read = |path: &str| tree.read_resolved_optional(Path::new(path)).ok().flatten();
    if read(MODULES_DISABLED).is_some_and(|v| v.trim() == "1") {
        return ModuleLoading::Disabled;
    }
    let Some(status) = read(OWN_STATUS) else {
        return ModuleLoading::Allowed;
    };
    let lacks = |field: &str| {
        capability_mask(&status, field).is_some_and(|mask| mask & (1 << CAP_SYS_MODULE) == 0)
    };
    if lacks("CapEff") || lacks("CapBnd") {
        ModuleLoading::NoCapSysModule
    } else {
        ModuleLoading::Allowed
    }
}

/// `CapEff:\t000001ffffffffff` as a number.
fn capability_mask(status: &str, field: &str) -> Option<u64> {
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?;
    u64::from_str_radix(value.trim(), 16).ok()
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

    const STATUS: &str = "Name:\tvfiod\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n";

    /// A fixture with `files`, read through the Inspect trait.
    fn loading_with(files: &[(&str, &str)]) -> ModuleLoading {
        use crate::Inspect;
        let fixture = crate::sysfs::fixture::Fixture::new();
        for (path, text) in files {
            fixture.write(path, text);
        }
        fixture.kernel().module_loading()
    }

    #[test]
    fn module_loading_needs_cap_sys_module_and_modules_enabled() {
        assert_eq!(
            loading_with(&[(OWN_STATUS, STATUS)]),
            ModuleLoading::Allowed
        );
        // ProtectKernelModules=yes: bit 16 gone from both sets.
        let protected = STATUS.replace("000001ffffffffff", "000001fffffeffff");
        assert_eq!(
            loading_with(&[(OWN_STATUS, &protected)]),
            ModuleLoading::NoCapSysModule
        );
        // Bounding set alone (modprobe would get no more).
        let bounded = STATUS.replace("CapBnd:\t000001ffffffffff", "CapBnd:\t0000000000080004");
        assert_eq!(
            loading_with(&[(OWN_STATUS, &bounded)]),
            ModuleLoading::NoCapSysModule
        );
        assert_eq!(
            loading_with(&[(OWN_STATUS, STATUS), (MODULES_DISABLED, "1\n")]),
            ModuleLoading::Disabled
        );
        assert_eq!(
            loading_with(&[(OWN_STATUS, STATUS), (MODULES_DISABLED, "0\n")]),
            ModuleLoading::Allowed
        );
        // Nothing readable: the load itself will say.
        assert_eq!(loading_with(&[]), ModuleLoading::Allowed);
    }

    #[test]
    fn module_names_are_plain() {
        assert!(is_module_name("vfio-pci"));
        assert!(is_module_name("vfio_pci"));
        for bad in ["", "-r", "../x", "a b", "vfio/pci", "x\n"] {
            assert!(!is_module_name(bad), "{bad:?}");
        }
    }
}
