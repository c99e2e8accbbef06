//! The transition engine: plans a move, then executes it one verified step
//! at a time, every kernel write on a worker thread with a timeout, and
//! rolls back what it did when a step fails.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use vfiod_dbus::{DeviceState, Direction, Error};
use vfiod_pci::{PciAddress, PciDevice};

use crate::journal::{Journal, MoveEntry, MoveId};
use crate::kernel::{Kernel, KernelError, KernelResult, VFIO_DRIVER, VFIO_MODULE};
use crate::ledger::Ledger;
use crate::plan::{self, MoveOptions, Plan};
use crate::workers::Workers;
use vfiod_config::Config;

/// Called before each step of a move: (device, step) with the step in
/// plain words, e.g. "unbind amdgpu".
pub type ProgressFn<'a> = &'a (dyn Fn(&PciAddress, &str) + Sync);

/// A move planned with its groups locked, not yet executed.
pub struct Prepared {
    plan: Plan,
    /// Released when the move ends or is dropped.
    _held: GroupGuard,
    started: Instant,
    target: String,
    direction: Direction,
}

/// One move in progress: what was asked, since when, and who listens.
struct Run<'a> {
    options: &'a MoveOptions,
    started: Instant,
    progress: ProgressFn<'a>,
    /// Where each step is recorded before it is written.
    journal: Option<MoveId>,
}

/// What a device is doing besides sitting on its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activity {
    Moving,
    /// A kernel write on it did not return in time; it still may.
    Stuck(String),
}

type ActivityMap = Arc<Mutex<BTreeMap<PciAddress, Activity>>>;

pub struct Engine {
    kernel: Arc<dyn Kernel>,
    config: RwLock<Arc<Config>>,
    ledger: Mutex<Ledger>,
    journal: Journal,
    activity: ActivityMap,
    /// One lock per IOMMU group (or per device without one): moves within a
    /// group are serialized, moves on different groups run side by side.
    busy_groups: Arc<(Mutex<BTreeSet<LockKey>>, Condvar)>,
    /// The threads kernel calls run on.
    workers: Workers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum LockKey {
    Group(u32),
    Device(PciAddress),
}

/// Why one step failed.
#[derive(Debug)]
enum StepFailure {
    Timeout {
        after: Duration,
    },
    Kernel(KernelError),
    /// The write succeeded but the kernel did not do what it should have.
    Unexpected(String),
}

/// A failed step with where it happened.
#[derive(Debug)]
struct Failure {
    device: Option<PciAddress>,
    step: String,
    cause: StepFailure,
}

impl Failure {
    fn describe(&self) -> String {
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

    fn into_error(self, context: &str, aftermath: &[String]) -> Error {
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
struct WriteSlot<T> {
    result: Option<KernelResult<T>>,
    abandoned: bool,
}

impl Engine {
    pub fn new(kernel: Arc<dyn Kernel>, config: Config, ledger: Ledger) -> Engine {
        Engine {
            kernel,
            config: RwLock::new(Arc::new(config)),
            ledger: Mutex::new(ledger),
            journal: Journal::disabled(),
            activity: Arc::default(),
            busy_groups: Arc::default(),
            workers: Workers::default(),
        }
    }

    /// Records every move in `journal` from now on (see [`Engine::recover`]).
    pub fn with_journal(mut self, journal: Journal) -> Engine {
        self.journal = journal;
        self
    }

    pub fn kernel(&self) -> &Arc<dyn Kernel> {
        &self.kernel
    }

    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_config(&self, config: Config) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn activities(&self) -> MutexGuard<'_, BTreeMap<PciAddress, Activity>> {
        self.activity.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn owner(&self, address: &PciAddress) -> Option<String> {
        self.ledger().owner(address).map(str::to_string)
    }

    pub fn host_driver(&self, address: &PciAddress) -> Option<String> {
        self.ledger().host_driver(address).map(str::to_string)
    }

    pub fn activity(&self, address: &PciAddress) -> Option<Activity> {
        self.activities().get(address).cloned()
    }

    /// The `State` property of a device as the engine sees it now.
    pub fn device_state(&self, device: &PciDevice) -> DeviceState {
        self.state_of(&device.address, device.driver.as_deref())
    }

    /// The same for a device whose driver is already known.
    pub fn state_of(&self, address: &PciAddress, driver: Option<&str>) -> DeviceState {
        match self.activity(address) {
            Some(Activity::Stuck(_)) => DeviceState::Stuck,
            Some(Activity::Moving) => DeviceState::Moving,
            None => match driver {
                Some(VFIO_DRIVER) => DeviceState::Vfio,
                Some(_) => DeviceState::Host,
                None => DeviceState::Unbound,
            },
        }
    }

    /// Plans without moving anything: the set and every reason to refuse.
    pub fn plan(
        &self,
        target: &str,
        direction: Direction,
        options: &MoveOptions,
    ) -> Result<Plan, Error> {
        let config = self.config();
        let ledger = self.ledger();
        plan::plan(&*self.kernel, &config, &ledger, target, direction, options)
    }

    pub fn bind(
        &self,
        target: &str,
        options: &MoveOptions,
        progress: ProgressFn,
    ) -> Result<Vec<PciAddress>, Error> {
        self.run(target, Direction::Bind, options, progress)
    }

    pub fn release(
        &self,
        target: &str,
        options: &MoveOptions,
        progress: ProgressFn,
    ) -> Result<Vec<PciAddress>, Error> {
        self.run(target, Direction::Release, options, progress)
    }

    /// Plans the move with its groups locked, then executes it.
    pub fn run(
        &self,
        target: &str,
        direction: Direction,
        options: &MoveOptions,
        progress: ProgressFn,
    ) -> Result<Vec<PciAddress>, Error> {
        let prepared = self
            .prepare(target, direction, options, true)?
            .expect("waited");
        self.execute(prepared, options, progress)
    }

    /// Plans a move and locks its groups, writing nothing: until the
    /// [`Prepared`] move is executed or dropped, no other move touches
    /// them. Without `wait`, `None` when another move holds one of them.
    pub fn prepare(
        &self,
        target: &str,
        direction: Direction,
        options: &MoveOptions,
        wait: bool,
    ) -> Result<Option<Prepared>, Error> {
        let started = Instant::now();
        Ok(self
            .plan_locked(target, direction, options, wait)?
            .map(|(plan, held)| Prepared {
                plan,
                _held: held,
                started,
                target: target.to_owned(),
                direction,
            }))
    }

    /// Executes a prepared move one verified step at a time.
    pub fn execute(
        &self,
        prepared: Prepared,
        options: &MoveOptions,
        progress: ProgressFn,
    ) -> Result<Vec<PciAddress>, Error> {
        let Prepared {
            plan,
            _held,
            started,
            target,
            direction,
        } = prepared;
        let target = target.as_str();
        if let Some(busy) = plan
            .devices
            .iter()
            .find(|d| self.activity(&d.address).is_some())
        {
            return Err(Error::DeviceBusy(format!(
                "cannot {direction} {target}: {} is stuck in an earlier move that has not finished",
                busy.address
            )));
        }
        let devices: Vec<String> = plan.addresses().iter().map(ToString::to_string).collect();
        info!(target, %direction, devices = %devices.join(" "), "move planned");
        let changing: Vec<PciAddress> = plan
            .devices
            .iter()
            .filter(|d| self.needs_move(d, direction))
            .map(|d| d.address)
            .collect();
        let journal = self
            .journal
            .begin(target, direction, changing)
            .map_err(|e| {
                Error::Kernel(format!(
                    "cannot {direction} {target}: nothing was moved: {e}"
                ))
            })?;
        self.set_activity(&plan.addresses(), Some(Activity::Moving));
        let run = Run {
            options,
            started,
            progress,
            journal: Some(journal),
        };
        let outcome = self.execute_plan(&plan, &run);
        if let Err(e) = self.journal.end(journal) {
            error!(error = %e, "cannot close the journal entry; the next start will re-check these devices");
        }
        self.clear_moving(&plan.addresses());
        match &outcome {
            Ok(()) => info!(
                target,
                %direction,
                elapsed_us = started.elapsed().as_micros() as u64,
                "move done"
            ),
            Err(e) => warn!(target, %direction, error = %e, "move failed"),
        }
        outcome.map(|()| plan.addresses())
    }

    /// Locks the groups the target touches, then plans under the locks so
    /// nothing moves between the checks and the writes. One listing of the
    /// bus serves both when nobody else is moving these groups; after a
    /// wait, what the other move did is read again. Without `wait`, `None`
    /// when another move holds one of the groups.
    fn plan_locked(
        &self,
        target: &str,
        direction: Direction,
        options: &MoveOptions,
        wait: bool,
    ) -> Result<Option<(Plan, GroupGuard)>, Error> {
        let mut devices = plan::listing_for(&*self.kernel, &self.config(), target)?;
        let mut keys = self.lock_keys_for(&devices, target)?;
        loop {
            let Some((held, waited)) = self.lock_groups(&keys, wait) else {
                return Ok(None);
            };
            if waited {
                devices = plan::listing_for(&*self.kernel, &self.config(), target)?;
            }
            let plan = {
                let config = self.config();
                let ledger = self.ledger();
                plan::plan_on(
                    &*self.kernel,
                    &devices,
                    &config,
                    &ledger,
                    target,
                    direction,
                    options,
                )?
            };
            let planned = lock_keys(&plan.devices);
            if planned.iter().all(|k| keys.contains(k)) {
                return Ok(Some((plan, held)));
            }
            // The set changed while we waited (a device appeared): relock.
            drop(held);
            devices = plan::listing_for(&*self.kernel, &self.config(), target)?;
            keys = planned;
        }
    }

    fn lock_keys_for(&self, devices: &[PciDevice], target: &str) -> Result<Vec<LockKey>, Error> {
        let targets = plan::resolve_target(&self.config(), devices, target)?;
        let (set, _) = plan::complete_set(devices, &targets);
        let members: Vec<PciDevice> = devices
            .iter()
            .filter(|d| set.contains(&d.address))
            .cloned()
            .collect();
        Ok(lock_keys(&members))
    }

    /// Takes all the keys at once (or waits until it can, unless not to
    /// `wait`), so two movers can never each hold part of what the other
    /// needs. Also says whether it had to wait for another move.
    fn lock_groups(&self, keys: &[LockKey], wait: bool) -> Option<(GroupGuard, bool)> {
        let (lock, freed) = &*self.busy_groups;
        let busy = lock.lock().unwrap_or_else(|e| e.into_inner());
        let waited = keys.iter().any(|k| busy.contains(k));
        if waited && !wait {
            return None;
        }
        let mut busy = freed
            .wait_while(busy, |busy| keys.iter().any(|k| busy.contains(k)))
            .unwrap_or_else(|e| e.into_inner());
        busy.extend(keys.iter().copied());
        let guard = GroupGuard {
            table: self.busy_groups.clone(),
            keys: keys.to_vec(),
        };
        Some((guard, waited))
    }

    fn set_activity(&self, devices: &[PciAddress], activity: Option<Activity>) {
        let mut map = self.activities();
        for d in devices {
            match &activity {
                Some(a) => map.insert(*d, a.clone()),
                None => map.remove(d),
            };
        }
    }

    fn clear_moving(&self, devices: &[PciAddress]) {
        let mut map = self.activities();
        for d in devices {
            if map.get(d) == Some(&Activity::Moving) {
                map.remove(d);
            }
        }
    }

    fn write_limit(&self, run: &Run) -> Result<Duration, StepFailure> {
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
    fn kernel_call<T: Send + 'static>(
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
                    warn!(device = ?device, step = %step_name, ok = result.is_ok(), "a kernel write that timed out has returned");
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
                error!(device = ?device, step, timeout_ms = limit.as_millis() as u64, "kernel write did not return; device marked stuck");
                Err(StepFailure::Timeout { after: limit })
            }
        }
    }

    /// One verified step: announce, write, re-read.
    fn step(
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

    fn ensure_vfio_loaded(&self, run: &Run) -> Result<(), Failure> {
        let step = format!("load {VFIO_MODULE}");
        let fail = |cause| Failure {
            device: None,
            step: step.clone(),
            cause,
        };
        info!(step = %step, "step");
        let limit = self.write_limit(run).map_err(fail)?;
        self.kernel_call(None, &step, limit, |k| k.load_module(VFIO_MODULE))
            .map_err(fail)?;
        if !self.kernel.driver_registered(VFIO_DRIVER) {
            return Err(fail(StepFailure::Unexpected(format!(
                "{VFIO_MODULE} loaded but no {VFIO_DRIVER} driver is registered"
            ))));
        }
        Ok(())
    }

    /// Whether `device` is not yet where a move in `direction` takes it.
    fn needs_move(&self, device: &PciDevice, direction: Direction) -> bool {
        match direction {
            Direction::Bind => !device.is_bound_to(VFIO_DRIVER),
            // A release also brings back a device left without a driver (an
            // unbind behind vfiod's back, a crash) that has a host driver.
            Direction::Release => match device.driver.as_deref() {
                Some(driver) => driver == VFIO_DRIVER,
                None => self.host_driver(&device.address).is_some(),
            },
        }
    }

    /// Moves each device of the plan that is not already where the move
    /// goes; on the first failure, rolls back what this move did.
    fn execute_plan(&self, plan: &Plan, run: &Run) -> Result<(), Error> {
        let context = format!("{} {}", plan.direction, plan.target);
        if plan.load_vfio {
            self.ensure_vfio_loaded(run)
                .map_err(|f| f.into_error(&context, &["nothing was moved".into()]))?;
        }
        let binding = plan.direction == Direction::Bind;
        let mut touched: Vec<PciAddress> = Vec::new();
        for device in &plan.devices {
            if !self.needs_move(device, plan.direction) {
                continue;
            }
            touched.push(device.address);
            let moved = if binding {
                self.bind_one(device.address, run)
            } else {
                self.to_host(device.address, self.return_driver(&device.address), run)
            };
            if let Err(failure) = moved {
                let aftermath = self.roll_back(
                    &touched,
                    &failure,
                    plan.direction,
                    run.progress,
                    run.journal,
                );
                return Err(failure.into_error(&context, &aftermath));
            }
        }
        let owner = if binding {
            run.options.vm.as_deref()
        } else {
            None
        };
        let mut ledger = self.ledger();
        for device in &plan.devices {
            ledger
                .set_owner(device.address, owner)
                .map_err(|e| Error::Kernel(format!("{context}: done, but {e}")))?;
        }
        Ok(())
    }

    /// Remembers the device's host driver for the way back, then moves it
    /// to vfio-pci.
    fn bind_one(&self, address: PciAddress, run: &Run) -> Result<(), Failure> {
        let current = self.current_driver(address)?;
        if let Some(host) = current.as_deref().filter(|d| *d != VFIO_DRIVER) {
            self.ledger()
                .set_host_driver(address, host)
                .map_err(|e| Failure {
                    device: Some(address),
                    step: "remember host driver".into(),
                    cause: StepFailure::Unexpected(e.to_string()),
                })?;
        }
        self.to_vfio(address, run)
    }

    /// The host driver to return a device to: the remembered one when the
    /// kernel still has it, else whatever the kernel picks.
    fn return_driver(&self, address: &PciAddress) -> Option<String> {
        self.host_driver(address)
            .filter(|d| self.kernel.driver_registered(d))
    }

    /// vfio-pci (or nothing) -> host driver, the way the kernel itself
    /// does it (and driverctl, and libvirt): override cleared, unbound,
    /// probed. The driver the kernel picks must be the remembered one; when
    /// it is not (vfio-pci by `ids=`, another driver of the same device),
    /// the override names the host driver and the device moves again.
    fn to_host(&self, address: PciAddress, host: Option<String>, run: &Run) -> Result<(), Failure> {
        if self.read_override(address, run)?.is_some() {
            self.clear_override(address, run)?;
        }
        if let Some(driver) = self.current_driver(address)? {
            if Some(&driver) == host.as_ref() {
                return Ok(());
            }
            self.unbind_step(address, driver, run)?;
        }
        let Some(host) = host else {
            // Whatever the kernel picks, as long as it is a host driver.
            return self.step(
                address,
                "probe host driver",
                run,
                move |k| k.probe(&address),
                |k| expect_host_driver(k, &address, None),
            );
        };
        // What bound is read right after, to choose the way on.
        self.step(
            address,
            &format!("probe {host}"),
            run,
            move |k| k.probe(&address),
            |_| Ok(()),
        )?;
        let picked = self.current_driver(address)?;
        if picked.as_deref() == Some(host.as_str()) {
            return Ok(());
        }
        warn!(device = %address, picked = picked.as_deref().unwrap_or("no driver"), host = %host, "the kernel picked another driver; naming the host driver");
        self.to_named_host(address, host, picked, run)
    }

    /// `current` (or nothing) -> `host`, named by the override so that
    /// nothing else can grab the device on the way; the override is
    /// cleared once it is there.
    fn to_named_host(
        &self,
        address: PciAddress,
        host: String,
        current: Option<String>,
        run: &Run,
    ) -> Result<(), Failure> {
        self.override_step(address, Some(&host), run)?;
        if let Some(driver) = current {
            self.unbind_step(address, driver, run)?;
        }
        self.step(
            address,
            &format!("probe {host}"),
            run,
            move |k| k.probe(&address),
            |k| expect_host_driver(k, &address, Some(&host)),
        )?;
        self.clear_override(address, run)
    }

    fn clear_override(&self, address: PciAddress, run: &Run) -> Result<(), Failure> {
        self.override_step(address, None, run)
    }

    /// Writes `driver_override` (`None` clears it) and reads it back.
    fn override_step(
        &self,
        address: PciAddress,
        driver: Option<&str>,
        run: &Run,
    ) -> Result<(), Failure> {
        let step = match driver {
            Some(driver) => format!("set driver_override {driver}"),
            None => "clear driver_override".to_string(),
        };
        let written = driver.map(str::to_string);
        self.step(
            address,
            &step,
            run,
            move |k| k.set_driver_override(&address, written.as_deref()),
            |k| expect_override(k, &address, driver),
        )
    }

    /// The driver bound now; a device gone from the bus is a failure.
    fn current_driver(&self, address: PciAddress) -> Result<Option<String>, Failure> {
        read_driver(&*self.kernel, &address).map_err(|cause| Failure {
            device: Some(address),
            step: "read driver".into(),
            cause,
        })
    }

    /// `driver_override` as it is now. Reading it takes the device lock: an
    /// unbind still waiting in the kernel (someone else's) would hold the
    /// read, and this move with its groups, forever; so it is a kernel
    /// call with the write's time limit.
    fn read_override(&self, address: PciAddress, run: &Run) -> Result<Option<String>, Failure> {
        let step = "read driver_override";
        let fail = |cause| Failure {
            device: Some(address),
            step: step.into(),
            cause,
        };
        let limit = self.write_limit(run).map_err(fail)?;
        self.kernel_call(Some(address), step, limit, move |k| {
            k.driver_override(&address)
        })
        .map_err(fail)
    }

    /// Unbinds `driver` and checks that the device has no driver left.
    fn unbind_step(&self, address: PciAddress, driver: String, run: &Run) -> Result<(), Failure> {
        let step = format!("unbind {driver}");
        self.step(
            address,
            &step,
            run,
            move |k| k.unbind(&address, &driver),
            |k| expect_driver(k, &address, None),
        )
    }

    /// host driver (or nothing) -> vfio-pci: a bind, or the undoing of a
    /// failed release.
    fn to_vfio(&self, address: PciAddress, run: &Run) -> Result<(), Failure> {
        let current = self.current_driver(address)?;
        if current.as_deref() == Some(VFIO_DRIVER) {
            return Ok(());
        }
        self.override_step(address, Some(VFIO_DRIVER), run)?;
        if let Some(driver) = current {
            self.unbind_step(address, driver, run)?;
        }
        self.step(
            address,
            &format!("probe {VFIO_DRIVER}"),
            run,
            move |k| k.probe(&address),
            |k| expect_driver(k, &address, Some(VFIO_DRIVER)),
        )
    }

    /// Undoes a failed move, newest device first. A device whose write hung
    /// is left alone (touching it would hang too). Returns what happened,
    /// in words, for the error message.
    fn roll_back(
        &self,
        touched: &[PciAddress],
        failure: &Failure,
        direction: Direction,
        progress: ProgressFn,
        journal_id: Option<MoveId>,
    ) -> Vec<String> {
        // Undoing gets its own clock: the move's deadline may be what failed.
        let options = MoveOptions::default();
        let run = Run {
            options: &options,
            started: Instant::now(),
            progress,
            journal: journal_id,
        };
        let mut aftermath = Vec::new();
        for &address in touched.iter().rev() {
            if matches!(self.activity(&address), Some(Activity::Stuck(_))) {
                aftermath.push(format!("{address} left as it is (stuck in the kernel)"));
                continue;
            }
            if self.kernel.device(&address).ok().flatten().is_none() {
                error!(device = %address, "device vanished from the bus during the move");
                aftermath.push(format!("{address} is gone from the bus"));
                continue;
            }
            let undo = match direction {
                Direction::Bind => self.to_host(address, self.return_driver(&address), &run),
                Direction::Release => self.to_vfio(address, &run),
            };
            let now = self.kernel.driver(&address).ok().flatten();
            match (undo, now) {
                (Ok(()), Some(driver)) => {
                    info!(device = %address, driver = %driver, "rolled back");
                    aftermath.push(format!("{address} rolled back to {driver}"));
                }
                (result, now) => {
                    let why = result.err().map(|f| f.describe()).unwrap_or_default();
                    match now {
                        Some(driver) => {
                            warn!(device = %address, driver = %driver, why = %why, "rollback incomplete");
                            aftermath.push(format!(
                                "{address} could not be rolled back ({why}); it is on {driver}"
                            ));
                        }
                        None => {
                            error!(device = %address, why = %why, cause = %failure.describe(), "DEVICE LEFT WITHOUT A DRIVER");
                            aftermath.push(format!("{address} IS LEFT WITHOUT A DRIVER ({why})"));
                        }
                    }
                }
            }
        }
        if aftermath.is_empty() {
            aftermath.push("nothing was moved".into());
        }
        aftermath
    }
}

impl Engine {
    /// Settles the moves a crash interrupted (from [`Journal::open`]): every
    /// device they were changing goes to its host driver (an interrupted
    /// bind is undone, an interrupted release finished); one whose host
    /// driver will not come back goes to vfio-pci, never driverless.
    /// Returns what was done, in words, one line per device. Blocking.
    pub fn recover(&self, interrupted: Vec<(MoveId, MoveEntry)>) -> Vec<String> {
        let mut report = Vec::new();
        for (id, entry) in interrupted {
            warn!(
                target = %entry.target,
                direction = %entry.direction,
                last_step = ?entry.step,
                "settling a move that vfiod did not finish"
            );
            let options = MoveOptions::default();
            let run = Run {
                options: &options,
                started: Instant::now(),
                progress: &|_, _| {},
                journal: Some(id),
            };
            for address in entry.devices.iter().rev().copied() {
                report.push(self.settle(address, &run));
                if let Err(e) = self.ledger().set_owner(address, None) {
                    error!(device = %address, error = %e, "cannot clear the owner");
                }
            }
            if let Err(e) = self.journal.end(id) {
                error!(error = %e, "cannot close a recovered journal entry");
            }
        }
        report
    }

    fn settle(&self, address: PciAddress, run: &Run) -> String {
        let outcome = match self.kernel.device(&address) {
            Ok(Some(_)) => self.settle_present(address, run),
            Ok(None) => return format!("{address} is gone from the bus"),
            Err(e) => Err(Failure {
                device: Some(address),
                step: "read device".into(),
                cause: StepFailure::Kernel(e),
            }),
        };
        let now = self.kernel.driver(&address).ok().flatten();
        match (outcome, now) {
            (Ok(()), Some(driver)) => {
                info!(device = %address, driver = %driver, "recovered");
                format!("{address} on {driver}")
            }
            (result, Some(driver)) => {
                let why = result.err().map(|f| f.describe()).unwrap_or_default();
                warn!(device = %address, driver = %driver, why = %why, "recovered to vfio-pci: the host driver did not come back");
                format!("{address} on {driver} ({why})")
            }
            (result, None) => {
                let why = result.err().map(|f| f.describe()).unwrap_or_default();
                error!(device = %address, why = %why, "DEVICE LEFT WITHOUT A DRIVER after recovery");
                format!("{address} IS LEFT WITHOUT A DRIVER ({why})")
            }
        }
    }

    fn settle_present(&self, address: PciAddress, run: &Run) -> Result<(), Failure> {
        let driver = self.current_driver(address)?;
        let overridden = self.read_override(address, run)?;
        match driver.as_deref() {
            // Already on a host driver: only a leftover override to clear.
            Some(d) if d != VFIO_DRIVER => {
                if overridden.is_some() {
                    self.clear_override(address, run)?;
                }
                Ok(())
            }
            _ => self
                .to_host(address, self.return_driver(&address), run)
                .or_else(|failure| {
                    warn!(device = %address, why = %failure.describe(), "host driver did not come back; back to vfio-pci");
                    self.to_vfio(address, run).and(Err(failure))
                }),
        }
    }
}

/// The groups one move holds; dropping it lets waiting moves in.
struct GroupGuard {
    table: Arc<(Mutex<BTreeSet<LockKey>>, Condvar)>,
    keys: Vec<LockKey>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let (lock, freed) = &*self.table;
        let mut busy = lock.lock().unwrap_or_else(|e| e.into_inner());
        for k in &self.keys {
            busy.remove(k);
        }
        freed.notify_all();
    }
}

fn lock_keys(devices: &[PciDevice]) -> Vec<LockKey> {
    let mut keys: Vec<LockKey> = devices
        .iter()
        .map(|d| match d.iommu_group {
            Some(g) => LockKey::Group(g),
            None => LockKey::Device(d.address),
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn read_driver(kernel: &dyn Kernel, address: &PciAddress) -> Result<Option<String>, StepFailure> {
    // Only the link: a full read of the device would walk its subtree.
    match kernel.driver(address) {
        Err(KernelError::NoDevice(_)) => Err(StepFailure::Unexpected(
            "the device vanished from the bus".into(),
        )),
        other => other.map_err(StepFailure::Kernel),
    }
}

fn expect_driver(
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
fn expect_host_driver(
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

fn expect_override(
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
