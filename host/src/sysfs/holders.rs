//! Processes holding device nodes open, from `proc/PID/fd/*`.

use std::fs;
use std::path::{Path, PathBuf};

use vfiod_pci::Holder;

use super::rooted::Rooted;
use crate::KernelResult;

/// Each (pid, node) once, sorted. `nodes` are compared with the fd links
/// as the kernel writes them (`/dev/dri/card0`), whatever the root.
/// Processes that can't be read (another user's without privilege, or
/// gone since the listing) are skipped, and so are kernel threads.
pub(super) fn holders(tree: &Rooted, nodes: &[PathBuf]) -> KernelResult<Vec<Holder>> {
    if nodes.is_empty() {
        return Ok(Vec::new());
    }
    let proc_dir = Path::new("proc");
    // An unreadable /proc is an error: "no holders" would be a guess.
    let pids: Vec<u32> = fs::read_dir(tree.host_path(proc_dir))
        .map_err(|err| tree.io_error("list", proc_dir, err))?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    // Every process's every fd is a syscall or two: the scan is most of
    // a move's planning, so the CPUs share it.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_THREADS);
    let per_thread = pids.len().div_ceil(threads).max(MIN_PIDS_PER_THREAD);
    let mut holders: Vec<Holder> = std::thread::scope(|scope| {
        let mut found = Vec::new();
        let mut helpers = Vec::new();
        for (i, share) in pids.chunks(per_thread).enumerate() {
            let helper = (i > 0)
                .then(|| {
                    std::thread::Builder::new()
                        .name("vfiod-holders".into())
                        .spawn_scoped(scope, move || scan(tree, nodes, share))
                        .ok()
                })
                .flatten();
            match helper {
                Some(helper) => helpers.push(helper),
                // The first share, or no thread to be had: scan it here.
                None => found.extend(scan(tree, nodes, share)),
            }
        }
        for helper in helpers {
            // A share that was not scanned could hide a holder: no answer
            // is better than a wrong "nobody".
            let share = helper.join().map_err(|_| {
                tree.io_error(
                    "scan",
                    Path::new("proc"),
                    std::io::Error::other("a scanning thread failed"),
                )
            })?;
            found.extend(share);
        }
        Ok::<_, crate::KernelError>(found)
    })?;
    holders.sort();
    holders.dedup_by(|a, b| a.pid == b.pid && a.node == b.node);
    Ok(holders)
}

const MAX_THREADS: usize = 4;
/// Below this a thread costs more than it saves.
const MIN_PIDS_PER_THREAD: usize = 32;

fn scan(tree: &Rooted, nodes: &[PathBuf], pids: &[u32]) -> Vec<Holder> {
    let mut holders = Vec::new();
    for &pid in pids {
        let process_dir = Path::new("proc").join(pid.to_string());
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
    holders
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
