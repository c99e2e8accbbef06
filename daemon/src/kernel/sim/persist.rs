//! The running state in `STATE_DIR/sim-state.json`, and what tells boots
//! and machine files apart.

use super::*;

/// Reads the running state, or boots fresh when there is none that fits.
pub(super) fn load_state(path: &Path, board: &Board) -> Result<RunningState, SimError> {
    let bytes = match crate::state_file::read(path) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Ok(board.boot_state()),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            crate::state_file::set_aside(path, "simulated kernel state", &e);
            return Ok(board.boot_state());
        }
        Err(source) => {
            return Err(SimError::State {
                op: "read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let problem = match serde_json::from_slice::<RunningState>(&bytes) {
        Ok(state) if state.format == STATE_FORMAT && state.machine == board.fingerprint => {
            return Ok(state.reconciled(board));
        }
        Ok(state) if state.format == STATE_FORMAT => {
            tracing::info!(
                state = %path.display(),
                "the machine file changed since this state was written; booting the machine afresh"
            );
            return Ok(board.boot_state());
        }
        Ok(state) => format!(
            "state format {} (this vfiod writes {STATE_FORMAT})",
            state.format
        ),
        Err(e) => e.to_string(),
    };
    crate::state_file::set_aside(
        path,
        "simulated kernel state (the machine boots afresh)",
        &problem,
    );
    Ok(board.boot_state())
}

/// Writes the state beside its final name and renames it into place, so a
/// reader (or a restart after `kill -9`) sees the old state or the new one,
/// never half of one. No fsync: the file must outlive the process, not a
/// power cut (a real kernel's state would not survive one either).
pub(super) fn write_state(path: &Path, state: &RunningState) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    crate::state_file::write_atomically(path, &bytes)
}

/// A fresh boot id: random when the kernel offers one, else from the clock.
pub(super) fn new_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|u| u.trim().to_owned())
        .unwrap_or_else(|_| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            format!("{:032x}", now.as_nanos() ^ u128::from(std::process::id()))
        })
}

/// FNV-1a over the machine file's bytes: stable across builds and Rust
/// versions, which `DefaultHasher` does not promise.
pub(super) fn fingerprint(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("fnv1a64:{hash:016x}:{}", bytes.len())
}
