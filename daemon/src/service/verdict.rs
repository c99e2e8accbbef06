//! The bouncer's verdict on a caller, handed to a move that plans while
//! the bouncer learns who calls (planning only reads and locks). The
//! engine knows nothing of callers: this decides whether the plan it made
//! is executed, made again after the verdict, or dropped.

use std::sync::{Mutex, mpsc};

use vfiod_dbus::{Direction, Error};
use vfiod_pci::PciAddress;

use crate::engine::{Engine, ProgressFn};
use crate::plan::MoveOptions;

/// What the bouncer decides, once; dropped unsent, it means no.
pub struct VerdictSender(mpsc::SyncSender<bool>);

/// The verdict as the move waits for it.
pub struct Verdict(Mutex<mpsc::Receiver<bool>>);

/// A verdict still to be given, and where it will arrive.
pub fn pending() -> (VerdictSender, Verdict) {
    let (sender, receiver) = mpsc::sync_channel(1);
    (VerdictSender(sender), Verdict(Mutex::new(receiver)))
}

impl VerdictSender {
    pub fn decide(self, allowed: bool) {
        // The move may be gone already (its caller left); nothing to tell.
        let _ = self.0.send(allowed);
    }
}

impl Verdict {
    /// The verdict if it is given already.
    fn now(&self) -> Option<bool> {
        match self.receiver().try_recv() {
            Ok(allowed) => Some(allowed),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some(false),
        }
    }

    fn wait(&self) -> bool {
        self.receiver().recv().unwrap_or(false)
    }

    fn receiver(&self) -> std::sync::MutexGuard<'_, mpsc::Receiver<bool>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Plans without waiting for another move's groups while the verdict is
/// awaited; writes nothing before it is yes. A plan made before a late
/// verdict is dropped (no group stays locked while polkit thinks) and made
/// again after it. Blocking: run it off the event loop.
pub fn run_when_allowed(
    engine: &Engine,
    target: &str,
    direction: Direction,
    options: &MoveOptions,
    progress: ProgressFn,
    verdict: &Verdict,
) -> Result<Vec<PciAddress>, Error> {
    let early = engine.prepare(target, direction, options, false);
    let prepared = match verdict.now() {
        Some(allowed) => {
            allowed_or_stop(allowed)?;
            match early? {
                Some(prepared) => prepared,
                None => engine
                    .prepare(target, direction, options, true)?
                    .expect("waited"),
            }
        }
        None => {
            drop(early);
            allowed_or_stop(verdict.wait())?;
            engine
                .prepare(target, direction, options, true)?
                .expect("waited")
        }
    };
    engine.execute(prepared, options, progress)
}

/// The bus answers the caller with the bouncer's own reason; this one only
/// stops the move.
fn allowed_or_stop(allowed: bool) -> Result<(), Error> {
    if allowed {
        Ok(())
    } else {
        Err(Error::AccessDenied("the caller was not authorized".into()))
    }
}
