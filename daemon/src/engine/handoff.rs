//! The single-GPU handoff (DESIGN §10): a profile with `handoff = true`
//! whose set carries the host's display takes it before the bind — the
//! display manager stopped through systemd, fbcon unbound from its
//! vtconsoles, the firmware framebuffer unbound, the GPU's nodes let go —
//! and gives it back, in reverse, once a release has the devices on their
//! host drivers again. Every part is in the journal before its write: a
//! failure before the move, or a restart after a crash, gives back what
//! was taken. Only what draws on the set is touched: another GPU's
//! console stays.

use crate::journal::{Handoff, HandoffPhase};
use crate::units::{DISPLAY_MANAGER, UnitError, Units};

use super::*;

/// How often the holders of the GPU's nodes are looked for while the
/// display manager's session ends.
const HOLDERS_POLL: Duration = Duration::from_millis(50);
/// A unit job's own wait ends this much before the worker's bound, so
/// its answer (and its name for the job) is what the caller hears.
const JOB_MARGIN: Duration = Duration::from_millis(200);

/// No service manager was given to the engine: a handoff cannot stop
/// the display manager, and says so.
pub(super) struct NoUnits;

impl Units for NoUnits {
    fn display_manager(&self) -> Result<Option<crate::units::UnitStatus>, UnitError> {
        Err(UnitError::Bus("vfiod was given no service manager".into()))
    }
    fn stop(&self, _: &str, _: Duration) -> Result<(), UnitError> {
        self.display_manager().map(drop)
    }
    fn start(&self, _: &str, _: Duration) -> Result<(), UnitError> {
        self.display_manager().map(drop)
    }
}

impl Engine {
    /// The service manager the display manager runs under (systemd, or
    /// the simulated machine's).
    pub fn set_units(&self, units: Arc<dyn Units>) {
        *self.units.write().unwrap_or_else(|e| e.into_inner()) = units;
    }

    fn units(&self) -> Arc<dyn Units> {
        self.units.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Logs, once per config load, each `handoff = true` profile whose
    /// devices do not carry the display: its handoff does nothing.
    pub fn say_idle_handoffs(&self) {
        let config = self.config();
        for (name, profile) in config.profiles.iter().filter(|(_, p)| p.handoff) {
            let devices: Vec<PciAddress> = match self.kernel.ids() {
                Ok(ids) => ids
                    .into_iter()
                    .filter(|(address, id)| profile.matches(address, id))
                    .map(|(address, _)| address)
                    .collect(),
                Err(_) => profile.devices.clone(),
            };
            match plan::carries_display(&*self.kernel, &devices) {
                Ok(true) => {}
                Ok(false) => info!(
                    profile = %name,
                    "handoff = true does nothing for this profile: its devices do not carry the display"
                ),
                Err(e) => {
                    warn!(profile = %name, error = %e, "cannot tell whether this profile's devices carry the display")
                }
            }
        }
    }

    /// Whether the bind of `plan` takes the display first.
    pub(super) fn handoff_wanted(&self, plan: &Plan) -> Result<bool, Error> {
        let wanted = self
            .config()
            .profile(&plan.target)
            .is_some_and(|p| p.handoff);
        if !wanted {
            return Ok(false);
        }
        plan::carries_display(&*self.kernel, &plan.addresses()).map_err(plan::kernel_error)
    }

    /// The handoff recorded for a set that shares a device with `devices`.
    pub(super) fn handoff_of(&self, devices: &[PciAddress]) -> Option<Handoff> {
        self.journal
            .handoffs()
            .into_iter()
            .find(|h| h.devices.iter().any(|d| devices.contains(d)))
    }

    /// Takes the display from the host before the bind of `plan`. On a
    /// failure, what was taken is given back and the error says so.
    pub(super) fn take_display(&self, plan: &Plan, run: &Run) -> Result<(), Error> {
        let devices = plan.addresses();
        let context = format!("{} {}", plan.direction, plan.target);
        let gpu = display_function(plan);
        self.journal
            .record_handoff(Handoff {
                devices: devices.clone(),
                phase: HandoffPhase::Taking,
                manager: None,
                vtconsoles: Vec::new(),
                framebuffers: Vec::new(),
            })
            .map_err(|e| Error::Kernel(format!("{context}: nothing was moved: {e}")))?;
        let Err(failure) = self.take_display_parts(&devices, gpu, run) else {
            info!(device = %gpu, step = "display handed over", "the display is off the host until the release");
            return Ok(());
        };
        warn!(device = %gpu, error = %failure.describe(), "the handoff failed; giving the display back");
        let back = self.give_back_recorded(&devices, run);
        let aftermath = ["nothing was moved".to_string(), display_note(&back)];
        Err(failure.into_error(&context, &aftermath))
    }

    fn take_display_parts(
        &self,
        devices: &[PciAddress],
        gpu: PciAddress,
        run: &Run,
    ) -> Result<(), Failure> {
        self.stop_display_manager(devices, gpu, run)?;
        let on_set = |device: Option<PciAddress>| device.is_some_and(|d| devices.contains(&d));
        let consoles = self.kernel.vtconsoles().map_err(|e| Failure {
            device: Some(gpu),
            step: "read vtconsoles".into(),
            cause: StepFailure::Kernel(e),
        })?;
        for vt in consoles
            .into_iter()
            .filter(|vt| vt.fbcon && vt.bound && on_set(vt.device))
        {
            self.journal_handoff(devices, gpu, |h| h.vtconsoles.push(vt.name.clone()))?;
            self.vtconsole_step(gpu, &vt.name, false, run)?;
        }
        let framebuffers = self.kernel.boot_framebuffers().map_err(|e| Failure {
            device: Some(gpu),
            step: "read framebuffers".into(),
            cause: StepFailure::Kernel(e),
        })?;
        for fb in framebuffers.into_iter().filter(|fb| on_set(fb.device)) {
            let Some(driver) = fb.driver else { continue };
            let part = (fb.name.clone(), driver.clone());
            self.journal_handoff(devices, gpu, |h| h.framebuffers.push(part))?;
            self.framebuffer_step(gpu, &fb.name, &driver, false, run)?;
        }
        self.wait_for_holders(devices, gpu, run)
    }

    /// Records a part of the handoff before it is taken.
    fn journal_handoff(
        &self,
        devices: &[PciAddress],
        gpu: PciAddress,
        change: impl FnOnce(&mut Handoff),
    ) -> Result<(), Failure> {
        self.journal
            .update_handoff(devices, change)
            .map_err(|e| Failure {
                device: Some(gpu),
                step: "record the handoff".into(),
                cause: StepFailure::Unexpected(format!("not written: {e}")),
            })
    }

    fn stop_display_manager(
        &self,
        devices: &[PciAddress],
        gpu: PciAddress,
        run: &Run,
    ) -> Result<(), Failure> {
        let Some(status) = self.unit_call(gpu, "find the display manager", run, |units, _| {
            units.display_manager()
        })?
        else {
            info!(device = %gpu, step = "stop display manager", "no display manager ({DISPLAY_MANAGER} names no unit): nothing to stop");
            return Ok(());
        };
        if !status.active {
            info!(device = %gpu, step = "stop display manager", unit = %status.unit, "the display manager is not running: nothing to stop");
            return Ok(());
        }
        let unit = status.unit;
        self.journal_handoff(devices, gpu, |h| h.manager = Some(unit.clone()))?;
        let step = format!("stop display manager {unit}");
        self.announce(gpu, &step, run)?;
        let stopping = unit.clone();
        self.unit_call(gpu, &step, run, move |units, within| {
            units.stop(&stopping, within)
        })?;
        let now = self.unit_call(gpu, &step, run, |units, _| units.display_manager())?;
        if now.is_some_and(|s| s.active) {
            return Err(Failure {
                device: Some(gpu),
                step,
                cause: StepFailure::Unexpected(format!(
                    "{unit} is still active after its stop job"
                )),
            });
        }
        Ok(())
    }

    /// A call to the service manager on a worker, bounded as a kernel
    /// write is; the call gets the time it may wait for its job.
    fn unit_call<T: Send + 'static>(
        &self,
        gpu: PciAddress,
        step: &str,
        run: &Run,
        call: impl FnOnce(&dyn Units, Duration) -> Result<T, UnitError> + Send + 'static,
    ) -> Result<T, Failure> {
        let fail = |cause| Failure {
            device: Some(gpu),
            step: step.to_string(),
            cause,
        };
        let within = self
            .write_limit(run)
            .map_err(fail)?
            .saturating_sub(JOB_MARGIN)
            .max(JOB_MARGIN);
        let units = self.units();
        let answer = self
            .kernel_call(None, step, run, move |_| Ok(call(&*units, within)))
            .map_err(fail)?;
        answer.map_err(|e| {
            fail(match e {
                UnitError::Timeout { .. } => StepFailure::NotInTime(e.to_string()),
                other => StepFailure::Unexpected(other.to_string()),
            })
        })
    }

    /// Announces a step: the caller's progress, the log, the journal.
    fn announce(&self, gpu: PciAddress, step: &str, run: &Run) -> Result<(), Failure> {
        (run.progress)(&gpu, step);
        info!(device = %gpu, step, "step");
        if let Some(id) = run.journal {
            self.journal.step(id, gpu, step).map_err(|e| Failure {
                device: Some(gpu),
                step: step.to_string(),
                cause: StepFailure::Unexpected(format!("not written: {e}")),
            })?;
        }
        Ok(())
    }

    /// Writes a vtconsole's `bind` and reads it back. A write that does
    /// not return marks the GPU stuck: its display is.
    fn vtconsole_step(
        &self,
        gpu: PciAddress,
        name: &str,
        bind: bool,
        run: &Run,
    ) -> Result<(), Failure> {
        let step = match bind {
            true => format!("bind fbcon to {name}"),
            false => format!("unbind fbcon from {name}"),
        };
        let vt = name.to_string();
        self.step(
            gpu,
            &step,
            run,
            move |k| k.bind_vtconsole(&vt, bind),
            |k| {
                let now = k.vtconsoles().map_err(StepFailure::Kernel)?;
                match now.iter().find(|vt| vt.name == name) {
                    Some(vt) if vt.bound == bind => Ok(()),
                    Some(_) => Err(StepFailure::Unexpected(format!(
                        "{name} reads bind = {} after the write",
                        u8::from(!bind)
                    ))),
                    None => Err(StepFailure::Unexpected(format!("{name} is gone"))),
                }
            },
        )
    }

    /// Unbinds or binds a framebuffer's platform device and reads it back.
    fn framebuffer_step(
        &self,
        gpu: PciAddress,
        name: &str,
        driver: &str,
        bind: bool,
        run: &Run,
    ) -> Result<(), Failure> {
        let step = match bind {
            true => format!("bind {name} to {driver}"),
            false => format!("unbind {name} from {driver}"),
        };
        let (device, platform_driver) = (name.to_string(), driver.to_string());
        self.step(
            gpu,
            &step,
            run,
            move |k| k.bind_platform(&device, &platform_driver, bind),
            |k| {
                let now = k.boot_framebuffers().map_err(StepFailure::Kernel)?;
                let bound = now
                    .iter()
                    .find(|fb| fb.name == name)
                    .and_then(|fb| fb.driver.as_deref());
                match (bound, bind) {
                    (Some(d), true) if d == driver => Ok(()),
                    (None, false) => Ok(()),
                    (other, _) => Err(StepFailure::Unexpected(format!(
                        "{name} is on {} after the write",
                        other.unwrap_or("no driver")
                    ))),
                }
            },
        )
    }

    /// Waits, bounded, until no process holds a node of the set; names
    /// the ones that stay.
    fn wait_for_holders(
        &self,
        devices: &[PciAddress],
        gpu: PciAddress,
        run: &Run,
    ) -> Result<(), Failure> {
        let step = "wait for the display's processes to let go";
        self.announce(gpu, step, run)?;
        let fail = |cause| Failure {
            device: Some(gpu),
            step: step.into(),
            cause,
        };
        let mut nodes = Vec::new();
        for address in devices {
            nodes.extend(
                self.kernel
                    .nodes(address)
                    .map_err(|e| fail(StepFailure::Kernel(e)))?,
            );
        }
        let limit = self.write_limit(run).map_err(fail)?;
        let deadline = Instant::now() + limit;
        loop {
            let holders = self
                .kernel
                .holders(&nodes)
                .map_err(|e| fail(StepFailure::Kernel(e)))?;
            if holders.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let named: Vec<String> = holders
                    .iter()
                    .map(|h| format!("{} (pid {}) holds {}", h.comm, h.pid, h.node.display()))
                    .collect();
                return Err(fail(StepFailure::Held(format!(
                    "still held after {} ms: {}",
                    limit.as_millis(),
                    named.join(", ")
                ))));
            }
            std::thread::sleep(HOLDERS_POLL);
        }
    }

    /// Gives back what the handoff of `devices` took and ends its record.
    /// What did not come back, in words (empty: all of it).
    /// Told to `run`'s listener, each write bounded afresh: the move's
    /// own time may be spent.
    pub(super) fn give_back_recorded(&self, devices: &[PciAddress], run: &Run) -> Vec<String> {
        let Some(handoff) = self
            .journal
            .handoffs()
            .into_iter()
            .find(|h| h.devices == devices)
        else {
            return Vec::new();
        };
        let options = MoveOptions::default();
        let run = Run {
            options: &options,
            started: Instant::now(),
            progress: run.progress,
            journal: run.journal,
        };
        let problems = self.give_back(&handoff, &run);
        if let Err(e) = self.journal.end_handoff(devices) {
            error!(error = %e, "cannot end the handoff's record; the next start gives the display back again");
        }
        problems
    }

    /// In reverse of the taking: framebuffers (where the kernel allows
    /// it: the GPU's own driver may keep the memory), vtconsoles, the
    /// display manager.
    fn give_back(&self, handoff: &Handoff, run: &Run) -> Vec<String> {
        let gpu = handoff.devices[0];
        let mut problems = Vec::new();
        let framebuffers = self.kernel.boot_framebuffers().unwrap_or_default();
        for (name, driver) in handoff.framebuffers.iter().rev() {
            let bound = framebuffers
                .iter()
                .any(|fb| &fb.name == name && fb.driver.as_deref() == Some(driver));
            if bound {
                continue;
            }
            if let Err(failure) = self.framebuffer_step(gpu, name, driver, true, run) {
                warn!(device = %gpu, step = %failure.step, why = %failure.describe(), "the framebuffer stays unbound: the kernel did not take it back; the GPU's own driver shows the display");
            }
        }
        let consoles = self.kernel.vtconsoles().unwrap_or_default();
        for name in handoff.vtconsoles.iter().rev() {
            if consoles.iter().any(|vt| &vt.name == name && vt.bound) {
                // fbcon takes a framebuffer that registers (the GPU's
                // driver back): the kernel rebound it already.
                info!(device = %gpu, step = %format!("bind fbcon to {name}"), "fbcon is back on {name} already");
                continue;
            }
            if let Err(failure) = self.vtconsole_step(gpu, name, true, run) {
                error!(device = %gpu, step = %failure.step, why = %failure.describe(), "fbcon did not come back");
                problems.push(failure.describe());
            }
        }
        if let Some(unit) = &handoff.manager {
            // Always asked: a start also cancels a stop job still running.
            let step = format!("start display manager {unit}");
            let starting = unit.clone();
            let started = self.announce(gpu, &step, run).and_then(|()| {
                self.unit_call(gpu, &step, run, move |units, within| {
                    units.start(&starting, within)
                })
            });
            if let Err(failure) = started {
                error!(device = %gpu, step = %failure.step, why = %failure.describe(), "the display manager did not come back");
                problems.push(failure.describe());
            }
        }
        if problems.is_empty() {
            info!(device = %gpu, step = "display given back", "the display is back on the host");
        }
        problems
    }

    /// After a restart: every handoff not standing for a bound set (being
    /// taken, being given back, or whose devices all left vfio-pci) gives
    /// the display back. Run after the interrupted moves are settled.
    pub(super) fn recover_handoffs(&self) -> Vec<String> {
        let mut report = Vec::new();
        for handoff in self.journal.handoffs() {
            let bound = handoff.devices.iter().any(
                |d| matches!(self.kernel.driver(d), Ok(Some(driver)) if driver == VFIO_DRIVER),
            );
            if handoff.phase == HandoffPhase::Given && bound {
                info!(devices = ?handoff.devices, "the display stays handed over until the release");
                continue;
            }
            warn!(devices = ?handoff.devices, phase = ?handoff.phase, "giving back a display that a handoff vfiod did not finish took");
            let options = MoveOptions::default();
            let run = Run::unnarrated(&options, None);
            let problems = self.give_back_recorded(&handoff.devices, &run);
            report.push(match problems.is_empty() {
                true => format!("the display of {} is back", handoff.devices[0]),
                false => format!(
                    "the display of {} DID NOT ALL COME BACK: {}",
                    handoff.devices[0],
                    problems.join("; ")
                ),
            });
        }
        report
    }

    /// The display after the move: a bind that took it keeps it away
    /// (done) or gives it back (failed); a release that brought the set
    /// back to its host drivers gives it back, one that failed leaves it
    /// away with the set on vfio-pci.
    pub(super) fn after_handoff(
        &self,
        plan: &Plan,
        taking: bool,
        returning: Option<Handoff>,
        outcome: Result<(), Error>,
        run: &Run,
    ) -> Result<(), Error> {
        let devices = plan.addresses();
        if taking {
            let Err(e) = outcome else {
                self.handoff_phase(&devices, HandoffPhase::Given);
                return Ok(());
            };
            let back = self.give_back_recorded(&devices, run);
            return Err(with_note(&e, &display_note(&back)));
        }
        let Some(handoff) = returning else {
            return outcome;
        };
        if let Err(e) = outcome {
            self.handoff_phase(&handoff.devices, HandoffPhase::Given);
            return Err(with_note(
                &e,
                "the display stays handed over with the devices",
            ));
        }
        let back = self.give_back_recorded(&handoff.devices, run);
        if back.is_empty() {
            return Ok(());
        }
        Err(Error::Kernel(format!(
            "{} {}: the devices are back on their host drivers; {}",
            plan.direction,
            plan.target,
            display_note(&back)
        )))
    }

    /// [`Self::after_handoff`] for a failed move still being undone: a
    /// display its bind took stays away until the undoing ends
    /// ([`Self::give_back_after_undo`]).
    pub(super) fn after_late_undo(
        &self,
        plan: &Plan,
        taking: bool,
        returning: Option<Handoff>,
        e: Error,
        run: &Run,
    ) -> Result<(), Error> {
        if taking {
            return Err(with_note(
                &e,
                "the display comes back once the undoing ends",
            ));
        }
        self.after_handoff(plan, false, returning, Err(e), run)
    }

    /// The end of a failed bind's undoing that ran past the move's
    /// deadline: the display that bind took comes back now, the devices
    /// home (or as home as they will get).
    pub(super) fn give_back_after_undo(&self, devices: &[PciAddress]) {
        let taken = self
            .journal
            .handoffs()
            .into_iter()
            .any(|h| h.devices == devices && h.phase == HandoffPhase::Taking);
        if !taken {
            return;
        }
        let options = MoveOptions::default();
        let problems = self.give_back_recorded(devices, &Run::unnarrated(&options, None));
        match problems.is_empty() {
            true => info!(device = %devices[0], "the display is back after the undoing"),
            false => {
                error!(device = %devices[0], problems = %problems.join("; "), "the display did not all come back after the undoing")
            }
        }
    }

    /// Whether a start must give a display back (see [`Engine::recover_handoffs`]).
    pub fn handoffs_recorded(&self) -> bool {
        !self.journal.handoffs().is_empty()
    }

    /// Moves a recorded handoff to `phase`.
    pub(super) fn handoff_phase(&self, devices: &[PciAddress], phase: HandoffPhase) {
        if let Err(e) = self.journal.update_handoff(devices, |h| h.phase = phase) {
            error!(error = %e, "cannot record the handoff's phase");
        }
    }
}

fn display_note(problems: &[String]) -> String {
    match problems.is_empty() {
        true => "the display was given back".into(),
        false => format!("THE DISPLAY DID NOT ALL COME BACK: {}", problems.join("; ")),
    }
}

/// The same error, its message longer.
fn with_note(e: &Error, note: &str) -> Error {
    Error::from_dbus(e.dbus_name(), &format!("{}; {note}", e.message()))
}

/// The function of the set that shows the display, for the steps' device
/// field: its display controller (class 0x03), else its first function.
fn display_function(plan: &Plan) -> PciAddress {
    plan.devices
        .iter()
        .find(|d| d.class.0 >> 16 == 0x03)
        .unwrap_or(&plan.devices[0])
        .address
}
