//! Kernel modules: whether one is there or can be loaded, and `modprobe`.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::rooted::Rooted;
use crate::kernel::{KernelError, KernelResult};

const KERNEL_RELEASE: &str = "proc/sys/kernel/osrelease";
/// Tried in order: a service's PATH may lack the sbin directories.
const MODPROBE: [&str; 3] = ["modprobe", "/usr/sbin/modprobe", "/sbin/modprobe"];

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

/// Runs `modprobe MODULE`, only on this machine's own root.
pub(super) fn load_module(tree: &Rooted, module: &str) -> KernelResult<()> {
    let fail = |reason: String| KernelError::Module {
        module: module.to_owned(),
        reason,
    };
    if !is_module_name(module) {
        return Err(fail("not a module name".into()));
    }
    if tree.root() != Path::new("/") {
        return Err(fail(format!(
            "{} is a fixture tree, not this machine's root: modules can't be loaded into it",
            tree.root().display()
        )));
    }
    let mut last_error = io::Error::from(io::ErrorKind::NotFound);
    for program in MODPROBE {
        let output = Command::new(program)
            .arg(module)
            .stdin(Stdio::null())
            .output();
        match output {
            Ok(output) if output.status.success() => return Ok(()),
            Ok(output) => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                let reason = match stderr.trim() {
                    "" => format!("modprobe failed ({})", output.status),
                    message => message.to_owned(),
                };
                return Err(fail(reason));
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => last_error = err,
            Err(err) => return Err(fail(format!("cannot run {program}: {err}"))),
        }
    }
    Err(fail(format!("cannot run modprobe: {last_error}")))
}

/// `vfio-pci`, `vfio_pci`: no paths, options or spaces.
fn is_module_name(module: &str) -> bool {
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

    #[test]
    fn loading_into_a_fixture_is_refused_without_running_anything() {
        let tree = Rooted::new(PathBuf::from("/nonexistent/fixture"));
        let err = load_module(&tree, "vfio_pci").unwrap_err().to_string();
        assert!(
            err.contains("vfio_pci") && err.contains("fixture tree"),
            "{err}"
        );
        let err = load_module(&tree, "-r").unwrap_err().to_string();
        assert!(err.contains("not a module name"), "{err}");
    }
}
