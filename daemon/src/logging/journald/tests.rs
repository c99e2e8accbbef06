use std::fs::File;
use std::io::{IoSliceMut, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use tracing_subscriber::layer::SubscriberExt;

use super::*;

/// A directory with a stand-in for journald's socket.
struct StandIn {
    dir: PathBuf,
    socket: UnixDatagram,
}

impl StandIn {
    fn new() -> StandIn {
        let template = std::env::temp_dir().join("vfiod-journald-XXXXXX");
        let dir = nix::unistd::mkdtemp(&template).unwrap();
        let socket = UnixDatagram::bind(dir.join("socket")).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        StandIn { dir, socket }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("socket")
    }

    /// The next entry with a payload (vfiod's check is an empty one).
    fn entry(&self) -> Vec<(String, Vec<u8>)> {
        let mut buf = vec![0; 1 << 18];
        loop {
            let len = self.socket.recv(&mut buf).expect("an entry within 10 s");
            if len > 0 {
                return parse(&buf[..len]);
            }
        }
    }

    /// Logs what `log` logs through a layer on this socket.
    fn log(&self, log: impl FnOnce()) {
        let layer = JournaldLayer::at(&self.path()).unwrap();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), log);
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The fields of one entry, as journald reads them.
fn parse(mut entry: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut fields = Vec::new();
    while let Some(end) = entry.iter().position(|&b| b == b'\n') {
        let line = &entry[..end];
        let (name, value, rest) = match line.iter().position(|&b| b == b'=') {
            Some(eq) => (&line[..eq], &line[eq + 1..], &entry[end + 1..]),
            None => {
                let len = u64::from_le_bytes(entry[end + 1..end + 9].try_into().unwrap());
                let stop = end + 9 + len as usize;
                assert_eq!(entry[stop], b'\n');
                (line, &entry[end + 9..stop], &entry[stop + 1..])
            }
        };
        fields.push((String::from_utf8(name.to_vec()).unwrap(), value.to_vec()));
        entry = rest;
    }
    assert!(entry.is_empty(), "the entry ends with a field");
    fields
}

fn field<'a>(entry: &'a [(String, Vec<u8>)], name: &str) -> &'a str {
    let (_, value) = entry
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} in {entry:?}"));
    std::str::from_utf8(value).unwrap()
}

#[test]
fn a_value_with_a_newline_is_sent_in_the_binary_safe_form() {
    let mut entry = Vec::new();
    put_field(&mut entry, b"PRIORITY", b"5");
    put_field(&mut entry, b"VFIOD_ERROR", b"two\nlines");
    let mut expected = b"PRIORITY=5\nVFIOD_ERROR\n".to_vec();
    expected.extend_from_slice(&9u64.to_le_bytes());
    expected.extend_from_slice(b"two\nlines\n");
    assert_eq!(entry, expected);
}

#[test]
fn field_names_are_what_journald_accepts() {
    let name = |n: &str| String::from_utf8(field_name(n)).unwrap();
    assert_eq!(name("device"), "VFIOD_DEVICE");
    assert_eq!(name("elapsed_us"), "VFIOD_ELAPSED_US");
    assert_eq!(name("error.sources"), "VFIOD_ERROR_SOURCES");
    assert_eq!(name("_hidden"), "VFIOD_HIDDEN");
    assert_eq!(name("a-b c/é"), "VFIOD_ABC");
    let long = name(&"x".repeat(100));
    assert_eq!(long.len(), 64);
    assert!(long.starts_with("VFIOD_XXX"));
}

#[test]
fn an_event_in_a_move_is_one_entry_whose_message_tells_the_story() {
    let journal = StandIn::new();
    journal.log(|| {
        let _move = tracing::error_span!("move", target = "rx580", direction = %"bind").entered();
        tracing::info!(device = %"0000:01:00.0", step = "unbind amdgpu", "step");
        tracing::error!(error = "not\nbound", "bind failed");
    });
    let step = journal.entry();
    assert_eq!(
        field(&step, "MESSAGE"),
        "step device=0000:01:00.0 step=\"unbind amdgpu\" target=rx580 direction=bind"
    );
    for (name, value) in [
        ("PRIORITY", "5"),
        ("SYSLOG_IDENTIFIER", "vfiod"),
        ("TARGET", module_path!()),
        ("SPAN_NAME", "move"),
        ("VFIOD_DEVICE", "0000:01:00.0"),
        ("VFIOD_STEP", "unbind amdgpu"),
        ("VFIOD_TARGET", "rx580"),
        ("VFIOD_DIRECTION", "bind"),
    ] {
        assert_eq!(field(&step, name), value, "{name} in {step:?}");
    }
    assert_eq!(field(&step, "CODE_FILE"), file!());
    assert!(field(&step, "CODE_LINE").parse::<u32>().unwrap() > 0);
    let error = journal.entry();
    assert_eq!(field(&error, "PRIORITY"), "3");
    // MESSAGE stays one line; the field keeps the value as it is.
    assert_eq!(
        field(&error, "MESSAGE"),
        "bind failed error=\"not\\nbound\" target=rx580 direction=bind"
    );
    assert_eq!(field(&error, "VFIOD_ERROR"), "not\nbound");
}

/// The next datagram with a descriptor: its payload's length and the file.
fn receive_with_fd(socket: &UnixDatagram) -> (usize, File) {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    loop {
        let mut buf = [0u8; 64];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let message = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .expect("a datagram within 10 s");
        let fd = message.cmsgs().unwrap().find_map(|c| match c {
            ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
            _ => None,
        });
        if let Some(fd) = fd {
            // SAFETY: the kernel just gave us this descriptor, ours alone.
            return (message.bytes, unsafe { File::from_raw_fd(fd) });
        }
    }
}

#[test]
fn an_entry_too_large_for_a_datagram_goes_whole_in_a_sealed_memfd() {
    let journal = StandIn::new();
    let long = "x".repeat(1 << 20);
    journal.log(|| tracing::warn!(error = %long, "a long error"));
    let (payload, mut memfd) = receive_with_fd(&journal.socket);
    assert_eq!(payload, 0, "the datagram with a descriptor is empty");
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    let seals = SealFlag::from_bits_truncate(fcntl(&memfd, FcntlArg::F_GET_SEALS).unwrap());
    assert!(
        seals.contains(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
        "{seals:?}"
    );
    // journald maps it from the start; the offset is where vfiod wrote.
    let mut entry = Vec::new();
    memfd.seek(SeekFrom::Start(0)).unwrap();
    memfd.read_to_end(&mut entry).unwrap();
    let entry = parse(&entry);
    assert_eq!(field(&entry, "VFIOD_ERROR"), long);
    assert!(field(&entry, "MESSAGE").starts_with("a long error error=xxx"));
}

#[test]
fn a_full_journal_queue_never_makes_the_logging_thread_wait_and_loses_nothing_that_fits() {
    let journal = StandIn::new();
    // Another sender fills the stand-in's queue (the kernel's limit on
    // datagrams waiting for one reader).
    let filler = UnixDatagram::unbound().unwrap();
    filler.set_nonblocking(true).unwrap();
    let mut queued = 0;
    while filler.send_to(b"FILLER=1\n", journal.path()).is_ok() {
        queued += 1;
    }
    assert!(queued > 0);
    let (done, logged) = mpsc::channel();
    let (keep, kept) = mpsc::channel::<()>();
    let path = journal.path();
    std::thread::spawn(move || {
        let layer = JournaldLayer::at(&path).unwrap();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            for n in 0..5 {
                tracing::info!(n, "behind a full queue");
            }
            done.send(()).unwrap();
            // The layer (and its flusher) lives until the entries are read.
            let _ = kept.recv();
        });
    });
    logged
        .recv_timeout(Duration::from_secs(5))
        .expect("logging returned while journald's queue was full");
    let mut messages = Vec::new();
    while messages.len() < 5 {
        let entry = journal.entry();
        if entry.iter().any(|(n, _)| n == "MESSAGE") {
            messages.push(field(&entry, "MESSAGE").to_owned());
        }
    }
    let expected: Vec<String> = (0..5)
        .map(|n| format!("behind a full queue n={n}"))
        .collect();
    assert_eq!(messages, expected);
    drop(keep);
}

#[test]
fn an_entry_journald_does_not_take_is_counted_and_the_count_is_logged() {
    let journal = StandIn::new();
    let layer = JournaldLayer::at(&journal.path()).unwrap();
    let path = journal.path();
    let (keep, kept) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            // journald away (restarting): its socket is not there.
            std::fs::rename(&path, path.with_extension("away")).unwrap();
            tracing::info!("lost");
            std::fs::rename(path.with_extension("away"), &path).unwrap();
            tracing::info!("back");
            let _ = kept.recv();
        });
    });
    let report = journal.entry();
    assert_eq!(field(&report, "PRIORITY"), "4");
    assert_eq!(field(&report, "VFIOD_DROPPED"), "1", "{report:?}");
    assert_eq!(
        field(&report, "MESSAGE"),
        "log entries dropped: journald did not take them in time dropped=1"
    );
    assert_eq!(field(&journal.entry(), "MESSAGE"), "back");
    drop(keep);
}
