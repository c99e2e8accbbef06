//! vfiod's logs: natively to journald when stderr is the journal, so an
//! error is stored as one (`journalctl -p err` shows it) with the device,
//! step and move target as fields; plain text on stderr otherwise. Both
//! show a line as `message name=value ...` (fields.rs).

use std::ffi::OsStr;

use fields::TextFields;
use journald::JournaldLayer;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub mod fields;
pub mod journald;

/// The prefix of vfiod's own journal fields (`VFIOD_DEVICE`, `VFIOD_STEP`,
/// `VFIOD_TARGET`, ...): the tracing target (the module) is the journal's
/// `TARGET`, and a move's target must not be taken for it.
pub const JOURNAL_FIELD_PREFIX: &str = "VFIOD";

/// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM`
/// to `DEVICE:INODE` of the socket it connects stderr to, and a process
/// that inherited the variable but not the stream (a child whose stderr was
/// redirected) must not take it for the journal. `stderr` is fstat of fd 2.
pub fn stderr_is_the_journal(journal_stream: Option<&OsStr>, stderr: (u64, u64)) -> bool {
    let Some((dev, ino)) = journal_stream
        .and_then(OsStr::to_str)
        .and_then(|s| s.split_once(':'))
    else {
        return false;
    };
    matches!((dev.parse::<u64>(), ino.parse::<u64>()), (Ok(dev), Ok(ino)) if (dev, ino) == stderr)
}

/// fstat of fd 2: its device and inode.
fn stderr_identity() -> Option<(u64, u64)> {
    let stat = nix::sys::stat::fstat(std::io::stderr()).ok()?;
    Some((stat.st_dev, stat.st_ino))
}

/// Installs the global subscriber. `VFIOD_LOG` filters (default `info`).
pub fn init() {
    let filter = || EnvFilter::try_from_env("VFIOD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let stream = std::env::var_os("JOURNAL_STREAM");
    let to_journal =
        stderr_identity().is_some_and(|fd2| stderr_is_the_journal(stream.as_deref(), fd2));
    let journald = to_journal.then(JournaldLayer::new);
    match journald {
        Some(Ok(layer)) => {
            tracing_subscriber::registry()
                .with(filter())
                .with(layer)
                .init();
        }
        unavailable => {
            // On the journal's stream (its socket out of reach) the journal
            // stamps each line itself.
            let under_systemd = to_journal;
            let text = tracing_subscriber::fmt::layer()
                .fmt_fields(TextFields)
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(
                    !under_systemd && nix::unistd::isatty(std::io::stderr()).unwrap_or(false),
                );
            let registry = tracing_subscriber::registry().with(filter());
            if under_systemd {
                registry.with(text.without_time()).init();
            } else {
                registry.with(text).init();
            }
            if let Some(Err(e)) = unavailable {
                tracing::warn!(error = %e, "stderr is the journal but journald's socket cannot be reached; logging text");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_stream_stderr_is_connected_to_is_the_journal() {
        let fd2 = (64769, 123456);
        assert!(stderr_is_the_journal(Some(OsStr::new("64769:123456")), fd2));
        for other in [
            "64769:123457",
            "1:123456",
            "64769",
            "",
            "x:y",
            "64769:123456:1",
        ] {
            assert!(
                !stderr_is_the_journal(Some(OsStr::new(other)), fd2),
                "{other}"
            );
        }
        assert!(!stderr_is_the_journal(None, fd2));
    }
}
