//! Kernel uevents for PCI devices, from either source, as one async stream:
//! a libudev monitor on the real host, the simulated kernel's own events on
//! a simulated machine.

use std::sync::mpsc;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tracing::{debug, warn};
use vfiod_pci::PciAddress;

use vfiod::kernel::{Uevent, UeventAction};

/// Events from the simulated kernel. A plain thread bridges its blocking
/// channel into the async world; it ends when either side goes away.
pub fn from_simulation(events: mpsc::Receiver<Uevent>) -> UnboundedReceiver<Uevent> {
    let (tx, rx) = unbounded_channel();
    std::thread::Builder::new()
        .name("vfiod-sim-uevents".into())
        .spawn(move || {
            while let Ok(event) = events.recv() {
                if tx.send(event).is_err() {
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
pub fn from_udev() -> std::io::Result<UnboundedReceiver<Uevent>> {
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

async fn watch_udev(mut fd: AsyncFd<udev::MonitorSocket>, tx: UnboundedSender<Uevent>) {
    loop {
        let mut ready = match fd.readable_mut().await {
            Ok(ready) => ready,
            Err(e) => {
                warn!(error = %e, "udev monitor failed; no more uevents");
                return;
            }
        };
        // Drain every queued event before re-arming readiness.
        for event in ready.get_inner_mut().iter() {
            let Some(uevent) = to_uevent(&event) else {
                continue;
            };
            debug!(device = %uevent.address, action = ?uevent.action, "uevent");
            if tx.send(uevent).is_err() {
                return;
            }
        }
        ready.clear_ready();
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
    let driver = event.driver().and_then(|d| d.to_str()).map(str::to_string);
    Some(Uevent {
        action,
        address,
        driver,
    })
}
