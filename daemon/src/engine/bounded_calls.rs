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
            StepFailure::Unexpected(what) => format!("{at}: {what}"),
        }
    }

    pub(super) fn into_error(self, context: &str, aftermath: &[String]) -> Error {
        let mut message = format!("{context}: {}", self.describe());
        if !aftermath.is_empty() {
            message.push_str("; ");
            message.push_str(&aftermath.join("; "));
        }
        match self.cause {
            StepFailure::Timeout { .. } => Error::Timeout(message),
            StepFailure::Kernel(e) if e.is_busy() => Error::DeviceBusy(message),
            _ => Error::Kernel(message),
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
    /// on a worker thread and waits at most `limit`. A call that does not
    /// come back leaves its device marked stuck until the kernel answers.
    pub(super) fn kernel_call<T: Send + 'static>(
        &self,
        device: Option<PciAddress>,
        step: &str,
        limit: Duration,
        write: impl FnOnce(&dyn Kernel) -> KernelResult<T> + Send + 'static,
    ) -> Result<T, StepFailure> {
        let slot = Arc::new((
            Mutex::new(WriteSlot {
                result: None,
                abandoned: false,
            }),
            Condvar::new(),
        ));
        let kernel = self.kernel.clone();
        let activity = self.activity.clone();
        let worker_slot = slot.clone();
        let step_name = step.to_string();
        self.workers
            .run(move || {
                let result = write(&*kernel);
                let (lock, ready) = &*worker_slot;
                let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
                if slot.abandoned {
                    if let Some(device) = device {
                        activity.lock().unwrap_or_else(|e| e.into_inner()).remove(&device);
                    }
                    warn!(device = device.map(|d| d.to_string()).as_deref(), step = %step_name, ok = result.is_ok(), "a kernel write that timed out has returned");
                } else {
                    slot.result = Some(result);
                    ready.notify_one();
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
                    "kernel write did not return; device marked stuck"
                );
                Err(StepFailure::Timeout { after: limit })
            }
        }
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
        let limit = self.write_limit(run).map_err(fail)?;
        self.kernel_call(Some(device), step, limit, write)
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

pub(super) fn expect_override(
    kernel: &dyn Kernel,
    address: &PciAddress,
    want: Option<&str>,
) -> Result<(), StepFailure> {
    let got = kernel
        .driver_override(address)
        .map_err(StepFailure::Kernel)?;
    if got.as_deref() == want {
        return Ok(());
    }
    Err(StepFailure::Unexpected(format!(
        "driver_override reads {} after writing {}",
        got.as_deref().unwrap_or("(null)"),
        want.unwrap_or("(null)")
    )))
}
