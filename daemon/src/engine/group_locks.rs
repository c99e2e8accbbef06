//! Group locks: one move per IOMMU group at a time, all of a move's
//! groups taken at once, and the plan made under them.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum LockKey {
    Group(u32),
    Device(PciAddress),
}

impl Engine {
    /// Locks the groups the target touches, then plans under the locks so
    /// nothing moves between the checks and the writes. One listing of the
    /// bus serves both when nobody else is moving these groups; after a
    /// wait, what the other move did is read again. Without `wait`, `None`
    /// when another move holds one of the groups.
    pub(super) fn plan_locked(
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
                let ledger = self.ledger_copy();
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

    pub(super) fn lock_keys_for(
        &self,
        devices: &[PciDevice],
        target: &str,
    ) -> Result<Vec<LockKey>, Error> {
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
    pub(super) fn lock_groups(&self, keys: &[LockKey], wait: bool) -> Option<(GroupGuard, bool)> {
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
}

/// The groups one move holds; dropping it lets waiting moves in.
pub(super) struct GroupGuard {
    pub(super) table: Arc<(Mutex<BTreeSet<LockKey>>, Condvar)>,
    pub(super) keys: Vec<LockKey>,
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
