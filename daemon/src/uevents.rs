//! Kernel uevents for PCI devices, from either source, as one async stream:
//! a libudev monitor on the real host, the simulated kernel's own events on
//! a simulated machine.

use std::io;
use std::sync::mpsc;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tracing::{debug, warn};
use vfiod_pci::PciAddress;

use vfiod::kernel::{MonitorEvent, Uevent, UeventAction};

/// Events from the simulated kernel. A plain thread bridges its blocking
/// channel into the async world; it ends when either side goes away.
pub fn from_simulation(events: mpsc::Receiver<Uevent>) -> UnboundedReceiver<MonitorEvent> {
    let (tx, rx) = unbounded_channel();
    std::thread::Builder::new()
        .name("vfiod-sim-uevents".into())
        .spawn(move || {
            while let Ok(event) = events.recv() {
                if tx.send(MonitorEvent::Uevent(event)).is_err() {
                    break;
                }
            }
        })
        .expect("spawning the uevent bridge thread");
    rx
}

/// A libudev monitor on the `pci` subsystem, read without blocking the
/// event loop. Create it before enumerating devices, so nothing that
/// happens in between is missed.
pub fn from_udev() -> std::io::Result<UnboundedReceiver<MonitorEvent>> {
    let socket = udev::MonitorBuilder::new()?
        .match_subsystem("pci")?
        .listen()?;
    let (tx, rx) = unbounded_channel();
    // SAFETY: the monitor socket owns its fd, keeps it open for as long as
    // it lives, and the AsyncFd owns the socket.
    let fd = unsafe { AsyncFd::register(socket) }.map_err(|e| e.into_parts().1)?;
    tokio::spawn(watch_udev(fd, tx));
    Ok(rx)
}

async fn watch_udev(mut fd: AsyncFd<udev::MonitorSocket>, tx: UnboundedSender<MonitorEvent>) {
    loop {
        let mut ready = match fd.readable_mut().await {
            Ok(ready) => ready,
            Err(e) => {
                warn!(error = %e, "udev monitor failed; no more uevents");
                return;
            }
        };
        // Drain every queued event before re-arming readiness.
        let socket = ready.get_inner_mut();
        let receive = || received(socket.iter().next(), io::Error::last_os_error());
        if !drain(receive, to_uevent, &tx) {
            return;
        }
        ready.clear_ready();
    }
}

/// What one receive from the monitor socket gave.
#[derive(Debug)]
enum Received<E> {
    Event(E),
    /// Nothing more is queued.
    Drained,
    Failed(io::Error),
}

/// libudev answers a receive with an event, or with none and the reason in
/// errno (`errno` read right after): EAGAIN when nothing more is queued,
/// ENOBUFS when the kernel dropped events because the socket's buffer was
/// full, another error for a message it could not take.
fn received<E>(event: Option<E>, errno: io::Error) -> Received<E> {
    match event {
        Some(event) => Received::Event(event),
        None if errno.kind() == io::ErrorKind::WouldBlock => Received::Drained,
        None => Received::Failed(errno),
    }
}

/// Failures in a row after which a drain stops until the socket is
/// readable again (an error that does not go away would spin).
const FAILURES_IN_A_ROW: u32 = 3;

/// Passes on everything queued: each PCI uevent, and an overflow (ENOBUFS:
/// the kernel dropped uevents) as [`MonitorEvent::Overflow`], which makes
/// the service read the whole bus again. False when nobody listens any more.
fn drain<E>(
    mut receive: impl FnMut() -> Received<E>,
    to_uevent: impl Fn(&E) -> Option<Uevent>,
    tx: &UnboundedSender<MonitorEvent>,
) -> bool {
    let mut failures = 0;
    loop {
        let event = match receive() {
            Received::Drained => return true,
            Received::Event(event) => {
                failures = 0;
                let Some(uevent) = to_uevent(&event) else {
                    continue;
                };
                debug!(device = %uevent.address, action = ?uevent.action, "uevent");
                MonitorEvent::Uevent(uevent)
            }
            Received::Failed(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => {
                warn!(
                    error = %e,
                    "the kernel dropped uevents (udev monitor overflow); reading the whole bus again"
                );
                MonitorEvent::Overflow
            }
            Received::Failed(e) => {
                warn!(error = %e, "udev monitor: a message could not be received");
                failures += 1;
                if failures >= FAILURES_IN_A_ROW {
                    return true;
                }
                continue;
            }
        };
        if tx.send(event).is_err() {
            return false;
        }
    }
}

fn to_uevent(event: &udev::Event) -> Option<Uevent> {
    let action = match event.event_type() {
        udev::EventType::Add => UeventAction::Add,
        udev::EventType::Remove => UeventAction::Remove,
        udev::EventType::Bind => UeventAction::Bind,
        udev::EventType::Unbind => UeventAction::Unbind,
        udev::EventType::Change => UeventAction::Change,
        _ => return None,
    };
    let address: PciAddress = event.sysname().to_str()?.parse().ok()?;
    // The event's own DRIVER (what the kernel sent); not libudev's
    // `driver()`, which reads the `driver` link when the event has none
    // (an unbind never has): that is the driver bound when vfiod reads.
    let driver = event
        .property_value("DRIVER")
        .and_then(|d| d.to_str())
        .map(str::to_string);
    Some(Uevent {
        action,
        address,
        driver,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uevent(address: &str) -> Uevent {
        Uevent {
            action: UeventAction::Unbind,
            address: address.parse().unwrap(),
            driver: None,
        }
    }

    fn errno(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn an_overflow_between_events_is_passed_on_in_its_place() {
        use nix::libc::{EAGAIN, EINVAL, ENOBUFS};
        // What libudev gives: an event, then NULL with errno ENOBUFS (the
        // kernel dropped events), then the next one, a bad message, and
        // NULL with EAGAIN.
        let mut script = vec![
            received(Some(uevent("0000:01:00.0")), errno(0)),
            received(None, errno(ENOBUFS)),
            received(Some(uevent("0000:01:00.1")), errno(0)),
            received(None, errno(EINVAL)),
            received(None, errno(EAGAIN)),
        ]
        .into_iter();
        let (tx, mut rx) = unbounded_channel();
        assert!(drain(|| script.next().unwrap(), |e| Some(e.clone()), &tx));
        assert_eq!(script.len(), 0, "drained to EAGAIN");
        let mut got = Vec::new();
        while let Ok(event) = rx.try_recv() {
            got.push(event);
        }
        assert_eq!(
            got,
            [
                MonitorEvent::Uevent(uevent("0000:01:00.0")),
                MonitorEvent::Overflow,
                MonitorEvent::Uevent(uevent("0000:01:00.1")),
            ]
        );
    }

    #[test]
    fn a_failure_that_stays_ends_the_drain() {
        let (tx, _rx) = unbounded_channel();
        let mut receives = 0;
        let receive = || {
            receives += 1;
            received::<Uevent>(None, errno(nix::libc::EBADF))
        };
        assert!(drain(receive, |e| Some(e.clone()), &tx));
        assert_eq!(receives, FAILURES_IN_A_ROW);
    }

    #[test]
    fn a_drain_ends_when_nobody_listens() {
        let (tx, rx) = unbounded_channel();
        drop(rx);
        let mut script = vec![received(Some(uevent("0000:01:00.0")), errno(0))].into_iter();
        assert!(!drain(|| script.next().unwrap(), |e| Some(e.clone()), &tx));
    }
}
