//! Group locks: one move per IOMMU group at a time, all of a move's
//! groups taken at once, and the plan made under them.

use std::collections::VecDeque;

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum LockKey {
    Group(u32),
    Device(PciAddress),
}

/// What planning under the group locks needs, owned, so that it can run on
/// a worker thread the move waits for no longer than it may.
struct Planner {
    kernel: Arc<dyn Kernel>,
    config: Arc<Config>,
    ledger: Arc<Mutex<Ledger>>,
    groups: Arc<GroupTable>,
}

impl Engine {
    /// [`Planner::plan_locked`] on a worker thread: waiting for the groups
    /// and the planning reads (which can block behind a device's lock on a
    /// real kernel) end together at the move's `timeout_ms`, or at the
    /// per-call bound when none is given, with Timeout. A plan that comes
    /// back later is dropped, and its groups with it.
    pub(super) fn plan_bounded(
        &self,
        target: &str,
        direction: Direction,
        options: &MoveOptions,
        started: Instant,
    ) -> Result<(Plan, GroupGuard), Error> {
        let limit = options.timeout.unwrap_or(Duration::from_millis(
            self.config().daemon.unbind_timeout_ms,
        ));
        let deadline = started + limit;
        let planner = Planner {
            kernel: self.kernel.clone(),
            config: self.config(),
            ledger: self.ledger.clone(),
            groups: self.busy_groups.clone(),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (job_target, job_options) = (target.to_owned(), options.clone());
        self.workers
            .run(move || {
                let planned = planner.plan_locked(&job_target, direction, &job_options, deadline);
                // Nobody waits any more: the plan and its locks go.
                let _ = tx.send(planned);
            })
            .map_err(|e| {
                Error::Kernel(format!(
                    "cannot {direction} {target}: no thread to plan on: {e}"
                ))
            })?;
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(planned) => planned,
            Err(_) => Err(Error::Timeout(format!(
                "cannot {direction} {target}: nothing was moved: planning did not end within {} ms (a kernel read blocked)",
                limit.as_millis()
            ))),
        }
    }
}

impl Planner {
    /// Locks the groups the target touches, then plans under the locks so
    /// nothing moves between the checks and the writes. One listing of the
    /// bus serves both when nobody else is moving these groups; after a
    /// wait, what the other move did is read again. The wait for the locks
    /// ends at `deadline` (the move's `timeout_ms`), with Timeout.
    fn plan_locked(
        &self,
        target: &str,
        direction: Direction,
        options: &MoveOptions,
        deadline: Instant,
    ) -> Result<(Plan, GroupGuard), Error> {
        let mut devices = plan::listing_for(&*self.kernel, &self.config, target)?;
        let mut keys = self.lock_keys_for(&devices, target)?;
        loop {
            let (held, waited) = self.groups.lock(&keys, Some(deadline)).map_err(|t| {
                Error::Timeout(format!(
                    "cannot {direction} {target}: nothing was moved: another move held its IOMMU group for all of the {} ms allowed",
                    t.waited.as_millis()
                ))
            })?;
            if waited {
                devices = plan::listing_for(&*self.kernel, &self.config, target)?;
            }
            let plan = {
                let ledger = ledger_copy(&self.ledger);
                plan::plan_on(
                    &*self.kernel,
                    &devices,
                    &self.config,
                    &ledger,
                    target,
                    direction,
                    options,
                )?
            };
            let planned = lock_keys(&plan.devices);
            if planned.iter().all(|k| keys.contains(k)) {
                return Ok((plan, held));
            }
            // The set changed while we waited (a device appeared): relock.
            drop(held);
            devices = plan::listing_for(&*self.kernel, &self.config, target)?;
            keys = planned;
        }
    }

    fn lock_keys_for(&self, devices: &[PciDevice], target: &str) -> Result<Vec<LockKey>, Error> {
        let targets = plan::resolve_target(&self.config, devices, target)?;
        let (set, _) = plan::complete_set(devices, &targets);
        let members: Vec<PciDevice> = devices
            .iter()
            .filter(|d| set.contains(&d.address))
            .cloned()
            .collect();
        Ok(lock_keys(&members))
    }
}

/// Who holds which groups, and who waits for them, first come first
/// served: a move may take its keys only when they are free and no move
/// that asked earlier wants any of them, so a move that needs two groups
/// is never starved by a stream of moves that need one.
#[derive(Default)]
pub(super) struct GroupTable {
    state: Mutex<TableState>,
    changed: Condvar,
}

#[derive(Default)]
struct TableState {
    busy: BTreeSet<LockKey>,
    /// Waiting moves in the order they asked: (ticket, keys).
    queue: VecDeque<(u64, Vec<LockKey>)>,
    next_ticket: u64,
}

/// The wait for a group ended at the move's deadline.
#[derive(Debug)]
pub(super) struct LockTimeout {
    pub(super) waited: Duration,
}

impl TableState {
    fn may_take(&self, ticket: u64, keys: &[LockKey]) -> bool {
        keys.iter().all(|k| !self.busy.contains(k))
            && self
                .queue
                .iter()
                .take_while(|(t, _)| *t != ticket)
                .all(|(_, earlier)| !earlier.iter().any(|k| keys.contains(k)))
    }
}

impl GroupTable {
    /// Takes all `keys` at once, waiting (until `deadline`, if any) for
    /// moves that hold them or asked for them first. Also says whether it
    /// had to wait.
    pub(super) fn lock(
        self: &Arc<Self>,
        keys: &[LockKey],
        deadline: Option<Instant>,
    ) -> Result<(GroupGuard, bool), LockTimeout> {
        let asked = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.queue.push_back((ticket, keys.to_vec()));
        let mut waited = false;
        while !state.may_take(ticket, keys) {
            waited = true;
            let timed_out = match deadline {
                None => {
                    state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
                    false
                }
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let (next, result) = self
                        .changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner());
                    state = next;
                    result.timed_out() && !state.may_take(ticket, keys)
                }
            };
            if timed_out {
                state.queue.retain(|(t, _)| *t != ticket);
                // Those queued behind this move may go now.
                self.changed.notify_all();
                return Err(LockTimeout {
                    waited: asked.elapsed(),
                });
            }
        }
        state.queue.retain(|(t, _)| *t != ticket);
        state.busy.extend(keys.iter().copied());
        // A later move that wants none of these keys may be free to go.
        self.changed.notify_all();
        let guard = GroupGuard {
            table: self.clone(),
            keys: keys.to_vec(),
        };
        Ok((guard, waited))
    }

    /// Moves waiting for a group now.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue
            .len()
    }
}
/// The groups one move holds; dropping it lets waiting moves in.
pub(super) struct GroupGuard {
    pub(super) table: Arc<GroupTable>,
    pub(super) keys: Vec<LockKey>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let mut state = self.table.state.lock().unwrap_or_else(|e| e.into_inner());
        for k in &self.keys {
            state.busy.remove(k);
        }
        self.table.changed.notify_all();
    }
}

pub(super) fn lock_keys(devices: &[PciDevice]) -> Vec<LockKey> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn until(condition: impl Fn() -> bool) {
        let since = Instant::now();
        while !condition() {
            assert!(since.elapsed() < Duration::from_secs(10), "never happened");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_move_that_asked_first_goes_first_even_when_a_later_one_could_slip_in() {
        let table = Arc::new(GroupTable::default());
        let (one, two) = (LockKey::Group(1), LockKey::Group(2));
        let (holding_one, _) = table.lock(&[one], None).unwrap();
        std::thread::scope(|s| {
            // Wants groups 1 and 2; 1 is taken, so it waits.
            let both = s.spawn(|| table.lock(&[one, two], None).map(|_| ()));
            until(|| table.waiting() == 1);
            // Group 2 is free, but the move queued before wants it too.
            let slipped = table.lock(&[two], Some(Instant::now() + Duration::from_millis(100)));
            assert!(slipped.is_err(), "a later move took group 2 first");
            drop(holding_one);
            both.join()
                .unwrap()
                .expect("the first move got both groups");
        });
        assert_eq!(table.waiting(), 0);
        table.lock(&[one, two], None).expect("all free again");
    }

    #[test]
    fn a_wait_ends_at_the_deadline_and_lets_those_behind_it_go() {
        let table = Arc::new(GroupTable::default());
        let (one, two) = (LockKey::Group(1), LockKey::Group(2));
        let _holding_one = table.lock(&[one], None).unwrap();
        std::thread::scope(|s| {
            let asked = Instant::now();
            let both = s.spawn(|| {
                table
                    .lock(
                        &[one, two],
                        Some(Instant::now() + Duration::from_millis(200)),
                    )
                    .map(|_| ())
            });
            until(|| table.waiting() == 1);
            // Queued behind the move that wants 1 and 2, until it gives up.
            let (_two, waited) = table.lock(&[two], None).unwrap();
            assert!(waited);
            let timeout = both.join().unwrap().unwrap_err();
            assert!(timeout.waited >= Duration::from_millis(200), "{timeout:?}");
            assert!(asked.elapsed() < Duration::from_secs(5));
        });
    }
}
