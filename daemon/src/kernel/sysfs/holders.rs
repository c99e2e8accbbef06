//! Processes holding device nodes open, from `proc/PID/fd/*`.

use std::fs;
use std::path::{Path, PathBuf};

use vfiod_pci::Holder;

use super::rooted::Rooted;
use crate::kernel::KernelResult;

/// Each (pid, node) once, sorted. `nodes` are compared with the fd links
/// as the kernel writes them (`/dev/dri/card0`), whatever the root.
/// Processes that can't be read (another user's without privilege, or
/// gone since the listing) are skipped, and so are kernel threads.
pub(super) fn holders(tree: &Rooted, nodes: &[PathBuf]) -> KernelResult<Vec<Holder>> {
    let mut holders = Vec::new();
    if nodes.is_empty() {
        return Ok(holders);
    }
    let proc_dir = Path::new("proc");
    // An unreadable /proc is an error: "no holders" would be a guess.
    let entries = fs::read_dir(tree.host_path(proc_dir))
        .map_err(|err| tree.io_error("list", proc_dir, err))?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let process_dir = proc_dir.join(pid.to_string());
        if is_kernel_thread(tree, &process_dir) {
            continue;
        }
        let Ok(fds) = fs::read_dir(tree.host_path(&process_dir.join("fd"))) else {
            continue;
        };
        let held: Vec<&PathBuf> = fds
            .flatten()
            .filter_map(|fd| fs::read_link(fd.path()).ok())
            .filter_map(|target| nodes.iter().find(|node| **node == target))
            .collect();
        if held.is_empty() {
            continue;
        }
        let Ok(comm) = fs::read_to_string(tree.host_path(&process_dir.join("comm"))) else {
            continue;
        };
        let comm = comm.trim_end_matches('\n').to_owned();
        holders.extend(held.into_iter().map(|node| Holder {
            pid,
            comm: comm.clone(),
            node: node.clone(),
        }));
    }
    holders.sort();
    holders.dedup_by(|a, b| a.pid == b.pid && a.node == b.node);
    Ok(holders)
}

/// Kernel threads (half the processes on a desktop) have no `exe` and no
/// files: one readlink spares listing their empty `fd` directory. Only
/// "no such link" says so; a process we may not inspect is still scanned.
fn is_kernel_thread(tree: &Rooted, process_dir: &Path) -> bool {
    matches!(
        fs::read_link(tree.host_path(&process_dir.join("exe"))),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound
    )
}
