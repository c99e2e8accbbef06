//! Sending entries to journald without ever making a logging thread wait.
//!
//! An event is logged on whichever thread has it, the bus's event loop
//! too, so the entry is sent with a send that does not wait (the socket is
//! non-blocking: EAGAIN where a blocking send would wait for journald to
//! make room in its queue). An entry that finds the queue full waits in
//! memory instead, and later ones behind it, in order, and a thread of its
//! own (the flusher) sends them as journald takes them: a burst larger than
//! journald's queue (`net.unix.max_dgram_qlen`, 10 without systemd's
//! sysctl) is not lost. Past [`MAX_WAITING`] entries, or when journald does
//! not take one in [`FLUSH_TIMEOUT`] or is not there, entries are dropped
//! and counted, and the next entry sent is a warning with the count.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::dropped_report;

/// Entries that may wait for room in journald's queue; more are dropped.
pub const MAX_WAITING: usize = 1024;
/// How long the flusher waits for journald to take one entry.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The sending end: the logging threads' socket and the flusher's queue.
pub struct JournalSocket {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    /// Non-blocking: the logging threads'.
    socket: UnixDatagram,
    queue: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Vec<u8>>,
    /// The flusher is sending an entry it took from `waiting`.
    sending: bool,
    /// Dropped and not yet reported.
    dropped: u64,
    /// The report of `dropped` did not go: the flusher tries again when a
    /// new entry comes, not in a loop.
    stalled: bool,
    closed: bool,
}

impl Queue {
    /// Nothing sent or to be sent before a new entry.
    fn idle(&self) -> bool {
        self.waiting.is_empty() && !self.sending && self.dropped == 0
    }
}

impl JournalSocket {
    /// A socket for journald's at `path`; an error when nothing listens
    /// there.
    pub fn open(path: &Path) -> io::Result<Self> {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        // journald discards an empty datagram: this asks only whether it
        // listens (a full queue means it does).
        if let Err(e) = socket.send_to(&[], path)
            && e.kind() != io::ErrorKind::WouldBlock
        {
            return Err(e);
        }
        let flusher = UnixDatagram::unbound()?;
        flusher.set_write_timeout(Some(FLUSH_TIMEOUT))?;
        let shared = Arc::new(Shared {
            path: path.to_owned(),
            socket,
            queue: Mutex::default(),
            wake: Condvar::new(),
        });
        let theirs = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("journald".into())
            .spawn(move || theirs.flush(&flusher))?;
        Ok(JournalSocket { shared })
    }

    /// Sends `entry` now, or leaves it to the flusher; never waits.
    pub fn send(&self, entry: Vec<u8>) {
        let shared = &self.shared;
        let mut queue = shared.lock();
        if queue.idle() {
            match send_entry(&shared.socket, &shared.path, &entry) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // journald is not there (restarting): nothing to wait for.
                Err(_) => {
                    queue.dropped += 1;
                    queue.stalled = true;
                    return;
                }
            }
        }
        if queue.waiting.len() < MAX_WAITING {
            queue.waiting.push_back(entry);
            queue.stalled = false;
        } else {
            queue.dropped += 1;
        }
        shared.wake.notify_one();
    }
}

impl Drop for JournalSocket {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic elsewhere while holding it leaves a queue still whole.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The flusher: sends what waits, oldest first, the count of dropped
    /// entries before them; `socket` waits up to FLUSH_TIMEOUT a send.
    fn flush(&self, socket: &UnixDatagram) {
        let mut queue = self.lock();
        loop {
            while queue.waiting.is_empty() && (queue.dropped == 0 || queue.stalled) {
                if queue.closed {
                    return;
                }
                queue = self.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
            }
            let report = queue.dropped;
            let entry = if report > 0 {
                dropped_report(report)
            } else {
                queue.waiting.pop_front().expect("an entry waits")
            };
            queue.sending = true;
            drop(queue);
            let sent = send_entry(socket, &self.path, &entry);
            queue = self.lock();
            queue.sending = false;
            match sent {
                Ok(()) => queue.dropped -= report,
                Err(_) if report > 0 => {
                    // Not there, or not taking anything: what waits is
                    // dropped too, counted.
                    queue.dropped += queue.waiting.len() as u64;
                    queue.waiting.clear();
                    queue.stalled = true;
                }
                Err(_) => queue.dropped += 1,
            }
        }
    }
}

/// One entry to journald: a datagram, or, when it is larger than a
/// datagram may be (the socket's send buffer, about 200 KiB, EMSGSIZE),
/// as journald's protocol says: written to a memfd, sealed so journald may
/// map it, and the descriptor sent in an empty datagram (SCM_RIGHTS). Not
/// truncated: a long error stays whole.
pub fn send_entry(socket: &UnixDatagram, path: &Path, entry: &[u8]) -> io::Result<()> {
    match socket.send_to(entry, path) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EMSGSIZE as i32) => {
            send_in_memfd(socket, path, entry)
        }
        Err(e) => Err(e),
    }
}

fn send_in_memfd(socket: &UnixDatagram, path: &Path, entry: &[u8]) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    let fd = memfd_create(
        "vfiod-journal-entry",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = File::from(fd);
    file.write_all(entry)?;
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    let fds = [file.as_raw_fd()];
    sendmsg(
        socket.as_raw_fd(),
        &[],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        Some(&UnixAddr::new(path)?),
    )?;
    Ok(())
}
