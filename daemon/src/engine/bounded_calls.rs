//! Kernel calls with a bound: each write on a worker thread, waited for no
//! longer than the move allows, then verified by reading back.

use super::*;

/// Why one step failed.
#[derive(Debug)]
pub(super) enum StepFailure {
    Timeout {
        after: Duration,
    },
    Kernel(KernelError),
    /// The write succeeded but the kernel did not do what it should have.
    Unexpected(String),
    /// The function did not survive its VM and nothing brought it back:
    /// what was tried, in words. It is on vfio-pci (or off the bus).
    Dead(String),
    /// Something outside the kernel did not finish in time (a systemd
    /// job), in words.
    NotInTime(String),
    /// Processes kept what the step waited for, named.
    Held(String),
}

/// A failed step with where it happened.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) device: Option<PciAddress>,
    pub(super) step: String,
    pub(super) cause: StepFailure,
}

impl Failure {
    pub(super) fn describe(&self) -> String {
        let at = match self.device {
            Some(d) => format!("{d}: {}", self.step),
            None => self.step.clone(),
        };
        match &self.cause {
            StepFailure::Timeout { after } => {
                format!(
                    "{at}: no answer from the kernel after {} ms; the device is stuck",
                    after.as_millis()
                )
            }
            StepFailure::Kernel(e) => format!("{at}: {e}"),
            StepFailure::Unexpected(what)
            | StepFailure::Dead(what)
            | StepFailure::NotInTime(what)
            | StepFailure::Held(what) => format!("{at}: {what}"),
        }
    }

    pub(super) fn into_error(self, context: &str, aftermath: &[String]) -> Error {
        let mut message = format!("{context}: {}", self.describe());
        if !aftermath.is_empty() {
            message.push_str("; ");
            message.push_str(&aftermath.join("; "));
        }
        match self.cause {
            StepFailure::Timeout { .. } | StepFailure::NotInTime(_) => Error::Timeout(message),
            StepFailure::Kernel(e) if e.is_busy() => Error::DeviceBusy(message),
            StepFailure::Held(_) => Error::DeviceBusy(message),
            _ => Error::Kernel(message),
        }
    }
}

/// Kernel calls that timed out and have not returned, by device and by
/// move (journal entry).
#[derive(Default)]
pub(super) struct LateCalls {
    devices: BTreeMap<PciAddress, usize>,
    moves: BTreeMap<MoveId, LateMove>,
}

#[derive(Default)]
struct LateMove {
    unanswered: usize,
    /// The move itself has ended; the last late call closes its entry.
    over: bool,
}

impl LateCalls {
    fn unanswered(&mut self, device: Option<PciAddress>, journal: Option<MoveId>) {
        if let Some(device) = device {
            *self.devices.entry(device).or_default() += 1;
        }
        if let Some(id) = journal {
            self.moves.entry(id).or_default().unanswered += 1;
        }
    }

    /// One came back: whether its device still waits on another, and the
    /// journal entry to close now, if any.
    fn answered(
        &mut self,
        device: Option<PciAddress>,
        journal: Option<MoveId>,
    ) -> (bool, Option<MoveId>) {
        let still_stuck = device.is_some_and(|device| {
            let left = self.devices.get_mut(&device).map(|n| {
                *n = n.saturating_sub(1);
                *n
            });
            if left == Some(0) {
                self.devices.remove(&device);
            }
            left.unwrap_or(0) > 0
        });
        let close = journal.and_then(|id| {
            let entry = self.moves.get_mut(&id)?;
            entry.unanswered = entry.unanswered.saturating_sub(1);
            if entry.unanswered > 0 {
                return None;
            }
            let over = entry.over;
            self.moves.remove(&id);
            over.then_some(id)
        });
        (still_stuck, close)
    }

    /// The move ended: whether its entry can close now.
    fn move_over(&mut self, id: MoveId) -> bool {
        match self.moves.get_mut(&id) {
            Some(entry) => {
                entry.over = true;
                false
            }
            None => true,
        }
    }
}

/// The result slot a kernel-write worker shares with its waiter.
pub(super) struct WriteSlot<T> {
    pub(super) result: Option<KernelResult<T>>,
    pub(super) abandoned: bool,
}

impl Engine {
    pub(super) fn write_limit(&self, run: &Run) -> Result<Duration, StepFailure> {
        let per_write = Duration::from_millis(self.config().daemon.unbind_timeout_ms);
        match run.options.timeout {
            None => Ok(per_write),
            Some(total) => match total.checked_sub(run.started.elapsed()) {
                Some(left) if !left.is_zero() => Ok(per_write.min(left)),
                _ => Err(StepFailure::Timeout { after: total }),
            },
        }
    }

    /// Runs one kernel call (a write, or a read that takes the device lock)
    /// on a worker thread and waits at most what the move allows. A call
    /// that does not come back leaves its device marked stuck and its
    /// move's journal entry open until the kernel answers; then the device
    /// is settled ([`Engine::settle_late_return`]).
    pub(super) fn kernel_call<T: Send + 'static>(
        &self,
        device: Option<PciAddress>,
        step: &str,
        run: &Run,
        call: impl FnOnce(&dyn Kernel) -> KernelResult<T> + Send + 'static,
    ) -> Result<T, StepFailure> {
        let limit = self.write_limit(run)?;
        let slot = Arc::new((
            Mutex::new(WriteSlot {
                result: None,
                abandoned: false,
            }),
            Condvar::new(),
        ));
        let kernel = self.kernel.clone();
        let engine = self.me.clone();
        let journal = run.journal;
        let worker_slot = slot.clone();
        let step_name = step.to_string();
        self.workers
            .run(move || {
                let result = call(&*kernel);
                let answer = match &result {
                    Ok(_) => "ok".to_string(),
                    Err(e) => e.to_string(),
                };
                let (lock, ready) = &*worker_slot;
                let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
                if !slot.abandoned {
                    slot.result = Some(result);
                    ready.notify_one();
                    return;
                }
                drop(slot);
                match engine.upgrade() {
                    Some(engine) => {
                        engine.settle_late_return(device, &step_name, &answer, journal)
                    }
                    None => {
                        error!(device = device.map(|d| d.to_string()).as_deref(), step = %step_name, answer = %answer, "a kernel call that timed out has returned after the engine ended; nothing settles the device")
                    }
                }
            })
            .map_err(|e| StepFailure::Kernel(KernelError::io("spawn worker for", step, e)))?;

        let (lock, ready) = &*slot;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (mut guard, _) = ready
            .wait_timeout_while(guard, limit, |s| s.result.is_none())
            .unwrap_or_else(|e| e.into_inner());
        match guard.result.take() {
            Some(result) => result.map_err(StepFailure::Kernel),
            None => {
                guard.abandoned = true;
                // Under the slot's lock: the worker, when it returns, finds
                // the call counted.
                self.late_calls().unanswered(device, journal);
                if let Some(device) = device {
                    self.activities().insert(
                        device,
                        Activity::Stuck(format!(
                            "{step} did not return within {} ms",
                            limit.as_millis()
                        )),
                    );
                }
                error!(
                    device = device.map(|d| d.to_string()).as_deref(),
                    step,
                    timeout_ms = limit.as_millis() as u64,
                    "kernel call did not return; device marked stuck"
                );
                Err(StepFailure::Timeout { after: limit })
            }
        }
    }

    /// A kernel call that timed out has returned at last: the move it was
    /// part of is over, and on a real kernel the device may be half-moved
    /// (an unbind drops the `driver` link before remove() runs, so it can
    /// end without a driver, `driver_override` naming vfio-pci). It is
    /// settled as recovery settles an interrupted move: to its host
    /// driver, or vfio-pci when that will not come back; then the move's
    /// journal entry closes and listeners hear of it.
    pub(super) fn settle_late_return(
        &self,
        device: Option<PciAddress>,
        step: &str,
        answer: &str,
        journal: Option<MoveId>,
    ) {
        let settled = device.map(|address| {
            let options = MoveOptions::default();
            let run = Run::unnarrated(&options, journal);
            let outcome = self.settle(address, &run);
            let on_vfio = matches!(self.kernel.driver(&address), Ok(Some(d)) if d == VFIO_DRIVER);
            if !on_vfio && let Err(e) = self.ledger().set_owner(address, None) {
                error!(device = %address, error = %e, "cannot clear the owner");
            }
            (address, outcome)
        });
        let outcome = settled.as_ref().map(|(_, o)| o.as_str()).unwrap_or("");
        error!(
            device = device.map(tracing::field::display),
            step, answer, outcome, "a kernel call that timed out has returned; device settled"
        );
        let (still_stuck, close) = self.late_calls().answered(device, journal);
        if let Some(address) = device
            && !still_stuck
        {
            let mut activities = self.activities();
            if matches!(activities.get(&address), Some(Activity::Stuck(_))) {
                activities.remove(&address);
            }
        }
        if let Some(id) = close
            && let Err(e) = self.journal.end(id)
        {
            error!(error = %e, "cannot close the journal entry; the next start will re-check these devices");
        }
        if let Some((address, _)) = settled {
            self.tell_settled(address);
        }
    }

    /// Closes a move's journal entry, unless a kernel call of it has not
    /// returned yet: then the last one to return closes it.
    pub(super) fn close_move(&self, id: MoveId) {
        if !self.late_calls().move_over(id) {
            warn!(
                journal_id = id,
                "a kernel call of this move has not returned; its journal entry stays open until it does"
            );
            return;
        }
        if let Err(e) = self.journal.end(id) {
            error!(error = %e, "cannot close the journal entry; the next start will re-check these devices");
        }
    }

    fn late_calls(&self) -> MutexGuard<'_, LateCalls> {
        self.late.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn tell_settled(&self, address: PciAddress) {
        let listener = self.on_settled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(listener) = listener.as_ref() {
            listener(address);
        }
    }

    /// The device as the kernel shows it now, read with the move's time
    /// limit: a sysfs read can wait behind a hung driver.
    pub(super) fn read_device(
        &self,
        address: PciAddress,
        run: &Run,
    ) -> Result<Option<PciDevice>, Failure> {
        let step = "read device";
        self.kernel_call(Some(address), step, run, move |k| k.device(&address))
            .map_err(|cause| Failure {
                device: Some(address),
                step: step.into(),
                cause,
            })
    }

    /// One verified step: announce, write, re-read.
    pub(super) fn step(
        &self,
        device: PciAddress,
        step: &str,
        run: &Run,
        write: impl FnOnce(&dyn Kernel) -> KernelResult<()> + Send + 'static,
        verify: impl FnOnce(&dyn Kernel) -> Result<(), StepFailure>,
    ) -> Result<(), Failure> {
        let fail = |cause| Failure {
            device: Some(device),
            step: step.to_string(),
            cause,
        };
        (run.progress)(&device, step);
        info!(device = %device, step, "step");
        if let Some(id) = run.journal {
            self.journal
                .step(id, device, step)
                .map_err(|e| fail(StepFailure::Unexpected(format!("not written: {e}"))))?;
        }
        self.kernel_call(Some(device), step, run, write)
            .map_err(fail)?;
        verify(&*self.kernel).map_err(fail)
    }
}

pub(super) fn read_driver(
    kernel: &dyn Kernel,
    address: &PciAddress,
) -> Result<Option<String>, StepFailure> {
    // Only the link: a full read of the device would walk its subtree.
    match kernel.driver(address) {
        Err(KernelError::NoDevice(_)) => Err(StepFailure::Unexpected(
            "the device vanished from the bus".into(),
        )),
        other => other.map_err(StepFailure::Kernel),
    }
}

pub(super) fn expect_driver(
    kernel: &dyn Kernel,
    address: &PciAddress,
    want: Option<&str>,
) -> Result<(), StepFailure> {
    let got = read_driver(kernel, address)?;
    if got.as_deref() == want {
        return Ok(());
    }
    Err(StepFailure::Unexpected(match want {
        Some(w) => format!(
            "the write succeeded but {w} did not bind (driver: {}); the kernel refused it silently",
            got.as_deref().unwrap_or("none")
        ),
        None => format!(
            "still bound to {} after unbind",
            got.as_deref().unwrap_or("?")
        ),
    }))
}

/// The device back on a host driver: `wanted`, or without one remembered,
/// any driver but vfio-pci.
pub(super) fn expect_host_driver(
    kernel: &dyn Kernel,
    address: &PciAddress,
    wanted: Option<&str>,
) -> Result<(), StepFailure> {
    let got = read_driver(kernel, address)?;
    let back = match (got.as_deref(), wanted) {
        (Some(got), Some(want)) => got == want,
        (Some(got), None) => got != VFIO_DRIVER,
        (None, _) => false,
    };
    if back {
        return Ok(());
    }
    Err(StepFailure::Unexpected(format!(
        "the host driver did not come back: expected {}, found {}",
        wanted.unwrap_or("a host driver"),
        got.as_deref().unwrap_or("no driver")
    )))
}

/// `driver_override` as read back after writing `want`.
pub(super) fn expect_override(got: Option<&str>, want: Option<&str>) -> Result<(), StepFailure> {
    if got == want {
        return Ok(());
    }
    Err(StepFailure::Unexpected(format!(
        "driver_override reads {} after writing {}",
        got.unwrap_or("(null)"),
        want.unwrap_or("(null)")
    )))
}
