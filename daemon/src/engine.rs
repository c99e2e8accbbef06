//! The transition engine: plans a move, then executes it one verified step
//! at a time, every kernel write on a worker thread with a timeout, and
//! rolls back what it did when a step fails.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use vfiod_dbus::{DeviceState, Direction, Error};
use vfiod_pci::{PciAddress, PciDevice};

use crate::journal::HandoffPhase;
use crate::journal::{Journal, MoveEntry, MoveId};
use crate::kernel::{Kernel, KernelError, KernelResult, VFIO_DRIVER, VFIO_MODULE};
use crate::ledger::Ledger;
use crate::plan::{self, MoveOptions, Plan};
use crate::units::Units;
use crate::workers::Workers;
use vfiod_config::Config;

mod bounded_calls;
mod group_locks;
mod handoff;
mod health;
mod recovery;
mod reset_methods;
mod rollback;

use self::bounded_calls::*;
use self::group_locks::*;
pub use self::health::Health;
use self::rollback::*;

/// Called before each step of a move: (device, step) with the step in
/// plain words, e.g. "unbind amdgpu".
pub type ProgressFn<'a> = &'a (dyn Fn(&PciAddress, &str) + Sync);

/// One move in progress: what was asked, since when, and who listens.
struct Run<'a> {
    options: &'a MoveOptions,
    started: Instant,
    progress: ProgressFn<'a>,
    /// Where each step is recorded before it is written.
    journal: Option<MoveId>,
}

impl<'a> Run<'a> {
    /// Work outside a caller's move (recovery, settling, start-up): no one
    /// listens to its steps, and it starts its clock now.
    fn unnarrated(options: &'a MoveOptions, journal: Option<MoveId>) -> Run<'a> {
        Run {
            options,
            started: Instant::now(),
            progress: &|_, _| {},
            journal,
        }
    }
}

/// What a device is doing besides sitting on its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activity {
    Moving,
    /// A kernel write on it did not return in time; it still may.
    Stuck(String),
}

type ActivityMap = Arc<Mutex<BTreeMap<PciAddress, Activity>>>;

/// Told of a device that a late kernel answer changed (see
/// [`Engine::on_settled`]).
type SettledListener = Box<dyn Fn(PciAddress) + Send + Sync>;

pub struct Engine {
    kernel: Arc<dyn Kernel>,
    config: RwLock<Arc<Config>>,
    ledger: Arc<Mutex<Ledger>>,
    journal: Journal,
    activity: ActivityMap,
    /// One lock per IOMMU group (or per device without one): moves within a
    /// group are serialized, moves on different groups run side by side.
    busy_groups: Arc<GroupTable>,
    /// The threads kernel calls run on.
    workers: Workers,
    /// Kernel calls that timed out and have not returned yet.
    late: Mutex<LateCalls>,
    on_settled: Mutex<Option<SettledListener>>,
    /// What the last health check found of each function it looked at.
    health: Mutex<BTreeMap<PciAddress, Health>>,
    /// When each function was last given back to its host driver.
    handed_back: Mutex<BTreeMap<PciAddress, Instant>>,
    /// This engine, for the worker of a late call to settle its device
    /// (set by [`Engine::shared`]).
    me: Weak<Engine>,
    /// The service manager of the display manager (single-GPU handoff).
    units: RwLock<Arc<dyn Units>>,
}

impl Engine {
    /// The engine, shared: a kernel call that times out keeps a weak
    /// handle on it, to settle its device when it returns at last.
    pub fn new(
        kernel: Arc<dyn Kernel>,
        config: Config,
        ledger: Ledger,
        journal: Journal,
    ) -> Arc<Engine> {
        Arc::new_cyclic(|me| Engine {
            kernel,
            config: RwLock::new(Arc::new(config)),
            ledger: Arc::new(Mutex::new(ledger)),
            journal,
            activity: Arc::default(),
            busy_groups: Arc::default(),
            workers: Workers::default(),
            late: Mutex::default(),
            on_settled: Mutex::default(),
            health: Mutex::default(),
            handed_back: Mutex::default(),
            me: me.clone(),
            units: RwLock::new(Arc::new(handoff::NoUnits)),
        })
    }

    /// Calls `listener` (from a worker thread) with each device settled
    /// after a kernel call that had timed out returned: its driver and
    /// state changed outside any move, so whoever shows them re-reads it.
    pub fn on_settled(&self, listener: impl Fn(PciAddress) + Send + Sync + 'static) {
        *self.on_settled.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(listener));
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

    /// What a plan reads of the ledger, copied out: a plan reads the kernel
    /// for as long as it must, and the event loop reads owners meanwhile.
    fn ledger_copy(&self) -> Ledger {
        ledger_copy(&self.ledger)
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
        let ledger = self.ledger_copy();
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

    /// Plans the move with its groups locked, then executes it; the wait
    /// for the groups counts against the move's `timeout_ms`.
    pub fn run(
        &self,
        target: &str,
        direction: Direction,
        options: &MoveOptions,
        progress: ProgressFn,
    ) -> Result<Vec<PciAddress>, Error> {
        let started = Instant::now();
        // Every line of the move, the worker's error included, names it
        // (a journal field under systemd).
        let _move = tracing::error_span!("move", target, %direction).entered();
        let (plan, held) = self.plan_bounded(target, direction, options, started)?;
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
        for address in &plan.kept {
            let vm = options.vm.as_deref().unwrap_or_default();
            info!(device = %address, vm, "left on vfio-pci: it was there before the VM took anything");
        }
        let changing: Vec<PciAddress> = plan
            .devices
            .iter()
            .filter(|d| self.needs_move(&plan, d))
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
        // A single GPU's display is handed over before it moves, and
        // comes back after its release (engine/handoff.rs).
        let taking = match direction {
            Direction::Bind => self.handoff_wanted(&plan),
            Direction::Release => Ok(false),
        };
        let taking = match taking.and_then(|t| match t {
            true => self.take_display(&plan, &run).map(|()| true),
            false => Ok(false),
        }) {
            Ok(taking) => taking,
            Err(e) => {
                self.close_move(journal);
                self.clear_moving(&plan.addresses());
                warn!(target, %direction, error = %e, "move refused");
                return Err(e);
            }
        };
        let returning = match direction {
            Direction::Release => self.handoff_of(&plan.addresses()),
            Direction::Bind => None,
        };
        if let Some(handoff) = &returning {
            self.handoff_phase(&handoff.devices, HandoffPhase::Returning);
        }
        let mut held = Some(held);
        let outcome = match self.execute_plan(&plan, &run) {
            Ok(()) => Ok(()),
            Err(Halt::Refused(e)) => Err(e),
            Err(Halt::Failed { touched, failure }) => {
                let undo = Undo {
                    touched,
                    failure,
                    plan: &plan,
                    held: held
                        .take()
                        .expect("the groups are held until the move ends"),
                };
                match self.undo_within(undo, &run) {
                    Undone::InTime(e, groups) => {
                        held = Some(groups);
                        Err(e)
                    }
                    // The undoing goes on with the groups, the journal
                    // entry and the devices' `moving`; it ends them.
                    // A display it took comes back when the undoing ends
                    // (a display manager started on a GPU still on
                    // vfio-pci shows nothing).
                    Undone::Later(e) => {
                        warn!(target, %direction, error = %e, "move failed; still undoing it");
                        let outcome = self.after_late_undo(&plan, taking, returning, e, &run);
                        return outcome.map(|()| plan.addresses());
                    }
                }
            }
        };
        let outcome = self.after_handoff(&plan, taking, returning, outcome, &run);
        self.close_move(journal);
        self.clear_moving(&plan.addresses());
        // Only now may a move waiting for these groups plan.
        drop(held);
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

    fn ensure_vfio_loaded(&self, run: &Run) -> Result<(), Failure> {
        let step = format!("load {VFIO_MODULE}");
        let fail = |cause| Failure {
            device: None,
            step: step.clone(),
            cause,
        };
        info!(step = %step, "step");
        self.kernel_call(None, &step, run, |k| k.load_module(VFIO_MODULE))
            .map_err(fail)?;
        if !self.kernel.driver_registered(VFIO_DRIVER) {
            return Err(fail(StepFailure::Unexpected(format!(
                "{VFIO_MODULE} loaded but no {VFIO_DRIVER} driver is registered"
            ))));
        }
        Ok(())
    }

    /// Whether `device` is not yet where the plan takes it.
    fn needs_move(&self, plan: &Plan, device: &PciDevice) -> bool {
        if plan.keeps(&device.address) {
            return false;
        }
        match plan.direction {
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
    /// goes; stops at the first failure, for what this move did to be
    /// undone.
    fn execute_plan(&self, plan: &Plan, run: &Run) -> Result<(), Halt> {
        let context = format!("{} {}", plan.direction, plan.target);
        let binding = plan.direction == Direction::Bind;
        if binding {
            self.set_reset_methods(plan, run).map_err(|f| {
                Halt::Refused(f.into_error(&context, &["nothing was moved".into()]))
            })?;
        }
        if plan.load_vfio {
            self.ensure_vfio_loaded(run).map_err(|f| {
                Halt::Refused(f.into_error(&context, &["nothing was moved".into()]))
            })?;
        }
        let mut touched: Vec<PciAddress> = Vec::new();
        let mut dead: Vec<Failure> = Vec::new();
        for device in &plan.devices {
            if !self.needs_move(plan, device) {
                continue;
            }
            touched.push(device.address);
            let moved = if binding {
                self.bind_one(device.address, run)
            } else {
                self.to_host(device.address, self.return_driver(&device.address), run)
            };
            match moved {
                Ok(()) if binding => self.taken_again(device.address),
                Ok(()) => self.handed_back(device.address),
                // The rest of the set still goes back (DESIGN §10).
                Err(failure) if matches!(failure.cause, StepFailure::Dead(_)) => {
                    dead.push(failure);
                }
                Err(failure) => {
                    // A host driver that would not take it back: the
                    // function did not come back healthy.
                    if !binding && failure.step.starts_with("probe") {
                        self.set_verdict(device.address, Some(Health::ResetFailed));
                    }
                    return Err(Halt::Failed { touched, failure });
                }
            }
        }
        // A bind owns only what it moved (DESIGN §8): a device already on
        // vfio-pci (bound at boot or by an administrator) keeps its owner,
        // so the VM's release leaves it there.
        let (owned, owner) = if binding {
            (touched, run.options.vm.as_deref())
        } else {
            let released = plan.addresses().into_iter();
            (released.filter(|a| !plan.keeps(a)).collect(), None)
        };
        let mut ledger = self.ledger();
        for address in owned {
            ledger
                .set_owner(address, owner)
                .map_err(|e| Halt::Refused(Error::Kernel(format!("{context}: done, but {e}"))))?;
        }
        if dead.is_empty() {
            return Ok(());
        }
        let released: Vec<String> = plan
            .devices
            .iter()
            .filter(|d| !plan.keeps(&d.address) && dead.iter().all(|f| f.device != Some(d.address)))
            .filter_map(|d| {
                let driver = self.kernel.driver(&d.address).ok().flatten()?;
                Some(format!("{} is back on {driver}", d.address))
            })
            .collect();
        let mut message: Vec<String> = dead
            .iter()
            .map(|f| {
                let now = f.device.and_then(|a| self.kernel.driver(&a).ok());
                let place = match now {
                    Some(Some(driver)) => format!("it stays on {driver}"),
                    Some(None) => "IT IS LEFT WITHOUT A DRIVER".into(),
                    None => "it is off the bus".into(),
                };
                format!("{}; {place}", f.describe())
            })
            .collect();
        message.extend(released);
        Err(Halt::Refused(Error::Kernel(format!(
            "{context}: {}",
            message.join("; ")
        ))))
    }

    /// Moves the device to vfio-pci, remembering its host driver for the
    /// way back.
    fn bind_one(&self, address: PciAddress, run: &Run) -> Result<(), Failure> {
        self.to_vfio(address, run, true)
    }

    /// Remembers `driver` as the device's host driver (vfio-pci is none).
    fn remember_host_driver(&self, address: PciAddress, driver: &str) -> Result<(), Failure> {
        if driver == VFIO_DRIVER {
            return Ok(());
        }
        self.ledger()
            .set_host_driver(address, driver)
            .map_err(|e| Failure {
                device: Some(address),
                step: "remember host driver".into(),
                cause: StepFailure::Unexpected(e.to_string()),
            })
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
        // Never a dead function to a host driver (DESIGN §10).
        match self.current_driver(address)?.as_deref() {
            Some(driver) if driver != VFIO_DRIVER => {}
            _ => self.ensure_alive(address, run)?,
        }
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

    /// Writes `driver_override` (`None` clears it) and reads it back, the
    /// read bounded as the write is (the device lock may have been taken
    /// in between).
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
            |_| Ok(()),
        )?;
        let got = self.read_override(address, run)?;
        expect_override(got.as_deref(), driver).map_err(|cause| Failure {
            device: Some(address),
            step,
            cause,
        })
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
        self.kernel_call(Some(address), step, run, move |k| {
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

    /// host driver (or nothing) -> vfio-pci: a bind (which remembers the
    /// host driver), or the undoing of a failed release.
    fn to_vfio(&self, address: PciAddress, run: &Run, remember: bool) -> Result<(), Failure> {
        let before = self.current_driver(address)?;
        if before.as_deref() == Some(VFIO_DRIVER) {
            return Ok(());
        }
        if let Some(host) = before.as_deref().filter(|_| remember) {
            self.remember_host_driver(address, host)?;
        }
        self.override_step(address, Some(VFIO_DRIVER), run)?;
        // From the override on no other driver can bind; one may have bound
        // since the read above (at boot, udev's coldplug loading the host
        // driver: its probe holds the device lock, and the override write
        // waits for it). Read again: that driver is unbound like any other.
        let current = self.current_driver(address)?;
        if current != before
            && let Some(late) = current.as_deref()
        {
            warn!(device = %address, driver = late, step = "set driver_override vfio-pci", "a host driver bound while the device was being taken; unbinding it too");
            if late == VFIO_DRIVER {
                return Ok(());
            }
            if remember {
                self.remember_host_driver(address, late)?;
            }
        }
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
}

/// See [`Engine::ledger_copy`]; planners on worker threads take it too.
fn ledger_copy(ledger: &Mutex<Ledger>) -> Ledger {
    ledger
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .copy_in_memory()
}
