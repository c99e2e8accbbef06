//! A reload's verdict, where the one who asked for it can wait for it.
//!
//! `systemctl reload vfiod` runs the unit's `ExecReload=`: with a plain
//! `kill -HUP` it exits 0 whatever vfiod then thinks of the new config.
//! `vfiod --reload PID` sends the SIGHUP itself and waits (bounded) for the
//! verdict of that very vfiod, which it writes to its state dir at the end of
//! every reload (`reload.json`: its pid, when the reload began on the
//! monotonic clock, and the reason when it was refused). A verdict counts
//! when its reload began after the signal was sent: it read the config as it
//! was when the admin asked, or later. `kill -HUP` by hand still works; its
//! verdict is only logged.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::state_file;

/// The verdict's file in the state dir.
pub const VERDICT_FILE: &str = "reload.json";

/// How long `vfiod --reload` waits for a verdict: well within systemd's
/// default 90 s for a reload job.
pub const VERDICT_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the waiting helper looks at the verdict file.
const POLL: Duration = Duration::from_millis(10);

/// The outcome of one reload, as the daemon that did it records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The vfiod that reloaded.
    pub pid: u32,
    /// When that reload began (after its SIGHUP arrived), CLOCK_MONOTONIC µs.
    pub began_usec: u64,
    /// Why the new configuration was refused; `None` when it is in force.
    pub refused: Option<String>,
}

/// Why `vfiod --reload` fails.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the new configuration was refused; vfiod keeps the old one: {0}")]
    Refused(String),
    #[error("cannot signal vfiod (pid {pid}): {errno}")]
    Signal { pid: u32, errno: nix::errno::Errno },
    #[error("vfiod (pid {pid}) exited before it gave its verdict on the reload")]
    Exited { pid: u32 },
    #[error(
        "vfiod (pid {pid}) gave no verdict on the reload within {} s (looked for it in {})",
        waited.as_secs(),
        file.display()
    )]
    NoVerdict {
        pid: u32,
        waited: Duration,
        file: PathBuf,
    },
}

/// CLOCK_MONOTONIC in microseconds: the clock systemd's `MONOTONIC_USEC=`
/// speaks, the same for every process of the machine.
pub fn monotonic_usec() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC exists");
    now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1_000
}

/// Records a reload's verdict in `state_dir` (the daemon's side).
pub fn record(state_dir: &Path, verdict: &Verdict) -> io::Result<()> {
    let json = serde_json::to_vec(verdict).map_err(io::Error::other)?;
    state_file::write_atomically(&state_dir.join(VERDICT_FILE), &json)
}

/// Asks the vfiod of `pid` (whose state dir is `state_dir`) to reload and
/// waits up to `timeout` for its verdict (the helper's side). `Ok` means
/// the new configuration is in force.
pub fn request(pid: u32, state_dir: &Path, timeout: Duration) -> Result<(), ReloadError> {
    let file = state_dir.join(VERDICT_FILE);
    let raw_pid = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
    let sent_usec = monotonic_usec();
    kill(raw_pid, Signal::SIGHUP).map_err(|errno| ReloadError::Signal { pid, errno })?;
    let deadline = Instant::now() + timeout;
    loop {
        // A verdict file that cannot be read yet (absent, being replaced) is
        // looked at again; only a verdict of this pid, begun after the
        // signal, answers.
        if let Ok(Some(verdict)) = state_file::read_json::<Verdict>(&file)
            && verdict.pid == pid
            && verdict.began_usec >= sent_usec
        {
            return match verdict.refused {
                None => Ok(()),
                Some(reason) => Err(ReloadError::Refused(reason)),
            };
        }
        if kill(raw_pid, None).is_err() {
            return Err(ReloadError::Exited { pid });
        }
        if Instant::now() >= deadline {
            return Err(ReloadError::NoVerdict {
                pid,
                waited: timeout,
                file,
            });
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_dir() -> PathBuf {
        let template = std::env::temp_dir().join("vfiod-reload-XXXXXX");
        nix::unistd::mkdtemp(&template).unwrap()
    }

    /// A process that ignores SIGHUP, standing for a vfiod that never answers.
    fn deaf_process() -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new("sleep");
        command.arg("30");
        // SAFETY: only sets a signal disposition between fork and exec,
        // which survives the exec.
        unsafe {
            command.pre_exec(|| {
                nix::sys::signal::signal(Signal::SIGHUP, nix::sys::signal::SigHandler::SigIgn)
                    .map(|_| ())
                    .map_err(io::Error::from)
            });
        }
        command.spawn().unwrap()
    }

    #[test]
    fn a_verdict_from_before_the_signal_or_another_pid_is_not_the_answer() {
        let dir = state_dir();
        let mut deaf = deaf_process();
        let pid = deaf.id();
        let stale = Verdict {
            pid,
            began_usec: monotonic_usec(),
            refused: None,
        };
        record(&dir, &stale).unwrap();
        let err = request(pid, &dir, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, ReloadError::NoVerdict { .. }), "{err}");
        let other = Verdict {
            pid: pid + 1,
            began_usec: u64::MAX,
            refused: None,
        };
        record(&dir, &other).unwrap();
        let err = request(pid, &dir, Duration::from_millis(100)).unwrap_err();
        assert!(err.to_string().contains("no verdict"), "{err}");
        // The verdict of this pid, begun after the signal, answers.
        let refused = Verdict {
            pid,
            began_usec: u64::MAX,
            refused: Some("f.toml: line 3, column 1: unknown field".into()),
        };
        record(&dir, &refused).unwrap();
        let err = request(pid, &dir, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, ReloadError::Refused(_)), "{err}");
        assert!(err.to_string().contains("line 3"), "{err}");
        deaf.kill().unwrap();
        deaf.wait().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_process_that_is_gone_is_no_verdict_to_wait_for() {
        let dir = state_dir();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let err = request(pid, &dir, Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(err, ReloadError::Signal { .. } | ReloadError::Exited { .. }),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
