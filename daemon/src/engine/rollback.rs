//! Undoing a failed move within the move's time: `timeout_ms` bounds the
//! whole move, its undoing included (DESIGN §4). What is not undone by the
//! deadline goes on after the answer, still holding the move's groups, its
//! journal entry and its devices' `moving`; when it ends, the bus is told.

use std::collections::VecDeque;

use super::*;

/// Why a move stopped before it was done.
pub(super) enum Halt {
    /// Nothing of this move is to be undone.
    Refused(Error),
    /// A step failed; the devices touched so far (in order) are undone.
    Failed {
        touched: Vec<PciAddress>,
        failure: Failure,
    },
}

/// A failed move to undo.
pub(super) struct Undo<'a> {
    pub(super) touched: Vec<PciAddress>,
    pub(super) failure: Failure,
    pub(super) plan: &'a Plan,
    pub(super) held: GroupGuard,
}

pub(super) enum Undone {
    /// Undone within the move's time: the error says how each device ended,
    /// and the move's groups are handed back to end the move.
    InTime(Error, GroupGuard),
    /// The deadline came first: the error names what is still being undone.
    Later(Error),
}

/// What the undoing thread shares with the move waiting for it.
struct UndoSlot {
    steps: VecDeque<(PciAddress, String)>,
    /// How each device ended, newest first.
    lines: Vec<String>,
    done: bool,
    /// The move was answered: the undoing thread ends it.
    abandoned: bool,
    held: Option<GroupGuard>,
}

type SharedSlot = Arc<(Mutex<UndoSlot>, Condvar)>;

fn lock(slot: &Mutex<UndoSlot>) -> MutexGuard<'_, UndoSlot> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    /// Undoes a failed move, waiting for it no later than the move's
    /// deadline (without `timeout_ms`, as long as it takes: each write has
    /// its own bound).
    pub(super) fn undo_within(&self, undo: Undo, run: &Run) -> Undone {
        let Undo {
            touched,
            failure,
            plan,
            held,
        } = undo;
        let context = format!("{} {}", plan.direction, plan.target);
        let deadline = run.options.timeout.map(|t| (t, run.started + t));
        let (Some((timeout, deadline)), Some(me)) = (deadline, self.me.upgrade()) else {
            return self.undo_here(touched, failure, plan, held, run, &context);
        };
        let slot: SharedSlot = Arc::new((
            Mutex::new(UndoSlot {
                steps: VecDeque::new(),
                lines: Vec::new(),
                done: false,
                abandoned: false,
                held: Some(held),
            }),
            Condvar::new(),
        ));
        let job = {
            let slot = slot.clone();
            let touched = touched.clone();
            let cause = failure.describe();
            let (direction, devices, journal) = (plan.direction, plan.addresses(), run.journal);
            move || me.undo_on_worker(&slot, &touched, &cause, direction, &devices, journal)
        };
        if let Err(e) = self.workers.run(job) {
            warn!(error = %e, "no thread to undo on; undoing as long as it takes");
            let held = lock(&slot.0).held.take();
            let held = held.expect("the undoing never started");
            return self.undo_here(touched, failure, plan, held, run, &context);
        }
        let (state, ready) = &*slot;
        let mut state = lock(state);
        loop {
            if !state.steps.is_empty() {
                let steps: Vec<_> = state.steps.drain(..).collect();
                drop(state);
                for (device, step) in steps {
                    (run.progress)(&device, &step);
                }
                state = lock(&slot.0);
                continue;
            }
            if state.done {
                let held = state.held.take().expect("the move's groups wait for it");
                let lines = std::mem::take(&mut state.lines);
                return Undone::InTime(failure.into_error(&context, &lines), held);
            }
            let now = Instant::now();
            if now >= deadline {
                state.abandoned = true;
                let mut aftermath = state.lines.clone();
                aftermath.push(format!(
                    "the move's {} ms ran out while undoing it",
                    timeout.as_millis()
                ));
                for address in touched.iter().rev().skip(state.lines.len()) {
                    aftermath.push(format!(
                        "{address} is still being undone; it shows as moving until it is"
                    ));
                }
                let message = format!(
                    "{context}: {}; {}",
                    failure.describe(),
                    aftermath.join("; ")
                );
                return Undone::Later(Error::Timeout(message));
            }
            state = ready
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn undo_here(
        &self,
        touched: Vec<PciAddress>,
        failure: Failure,
        plan: &Plan,
        held: GroupGuard,
        run: &Run,
        context: &str,
    ) -> Undone {
        let mut lines = Vec::new();
        self.roll_back(
            &touched,
            &failure.describe(),
            plan.direction,
            run.progress,
            run.journal,
            &mut |line| lines.push(line),
        );
        Undone::InTime(failure.into_error(context, &lines), held)
    }

    /// The undoing, on a worker: it reports each step and each device to the
    /// waiting move, and once that has answered, ends the move itself.
    fn undo_on_worker(
        &self,
        slot: &SharedSlot,
        touched: &[PciAddress],
        cause: &str,
        direction: Direction,
        devices: &[PciAddress],
        journal: Option<MoveId>,
    ) {
        let (state, ready) = &**slot;
        let progress = |device: &PciAddress, step: &str| {
            lock(state).steps.push_back((*device, step.to_owned()));
            ready.notify_all();
        };
        self.roll_back(touched, cause, direction, &progress, journal, &mut |line| {
            lock(state).lines.push(line);
            ready.notify_all();
        });
        let (abandoned, lines, held) = {
            let mut state = lock(state);
            state.done = true;
            ready.notify_all();
            let held = if state.abandoned {
                state.held.take()
            } else {
                None
            };
            (state.abandoned, state.lines.clone(), held)
        };
        if abandoned {
            warn!(devices = %lines.join("; "), "a failed move, answered at its deadline, is undone");
            if direction == Direction::Bind {
                self.give_back_after_undo(devices);
            }
            if let Some(id) = journal {
                self.close_move(id);
            }
            self.clear_moving(devices);
            drop(held);
            for address in devices {
                self.tell_settled(*address);
            }
        }
    }

    /// Undoes a failed move, newest device first. A device whose write hung
    /// is left alone (touching it would hang too). What happened to each
    /// device, in words, goes to `record` as soon as it is known.
    fn roll_back(
        &self,
        touched: &[PciAddress],
        cause: &str,
        direction: Direction,
        progress: ProgressFn,
        journal_id: Option<MoveId>,
        record: &mut dyn FnMut(String),
    ) {
        // Each write is bounded on its own: the move's deadline may be what
        // failed, and a device half undone is worse than a late answer.
        let options = MoveOptions::default();
        let run = Run {
            options: &options,
            started: Instant::now(),
            progress,
            journal: journal_id,
        };
        for &address in touched.iter().rev() {
            if matches!(self.activity(&address), Some(Activity::Stuck(_))) {
                record(format!("{address} left as it is (stuck in the kernel)"));
                continue;
            }
            match self.read_device(address, &run) {
                Ok(None) => {
                    error!(device = %address, "device vanished from the bus during the move");
                    record(format!("{address} is gone from the bus"));
                    continue;
                }
                // Stuck now: settled when the read returns.
                Err(f) if matches!(f.cause, StepFailure::Timeout { .. }) => {
                    record(format!("{address} left as it is ({})", f.describe()));
                    continue;
                }
                // Any other answer: undoing is still the way back.
                _ => {}
            }
            let undo = match direction {
                Direction::Bind => self.to_host(address, self.return_driver(&address), &run),
                Direction::Release => self.to_vfio(address, &run, false),
            };
            let now = self.kernel.driver(&address).ok().flatten();
            match (undo, now) {
                (Ok(()), Some(driver)) => {
                    info!(device = %address, driver = %driver, "rolled back");
                    record(format!("{address} rolled back to {driver}"));
                }
                (result, now) => {
                    let why = result.err().map(|f| f.describe()).unwrap_or_default();
                    match now {
                        Some(driver) => {
                            warn!(device = %address, driver = %driver, why = %why, "rollback incomplete");
                            record(format!(
                                "{address} could not be rolled back ({why}); it is on {driver}"
                            ));
                        }
                        None => {
                            error!(device = %address, why = %why, cause = %cause, "DEVICE LEFT WITHOUT A DRIVER");
                            record(format!("{address} IS LEFT WITHOUT A DRIVER ({why})"));
                        }
                    }
                }
            }
        }
    }
}
