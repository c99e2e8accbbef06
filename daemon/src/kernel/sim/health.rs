//! Functions a VM leaves dead (a `dead` fault), and the ways back the real
//! kernel offers: `reset`, `remove` and `rescan`. A rescan finds only a
//! function whose config space answers, and probes it at once.

use vfiod_pci::machine::{DeadFault, ResetFault};

use super::*;

/// What a dead function's config space answers with.
const DEAD_ID: PciId = PciId {
    vendor: 0xffff,
    device: 0xffff,
};

/// Whether a rescan finds a function again (alive): a dead one answers
/// `ffff` to the scan and is not found, unless the remove itself is what
/// brings it back (`until-rescan`: a power cycle of its slot).
pub(super) fn found_by_rescan(entry: &DeviceEntry, was_dead: bool) -> bool {
    !was_dead || faults(entry).dead == Some(DeadFault::UntilRescan)
}

impl RunningState {
    /// A `dead` function handed to vfio-pci: its VM will leave it dead.
    pub(super) fn killed_by_its_vm(&mut self, address: &PciAddress) {
        if let Some(dev) = self.present_mut(address) {
            dev.dead = true;
        }
    }

    pub(super) fn live_id(&self, entry: &DeviceEntry) -> KernelResult<PciId> {
        let dev = self
            .present(&entry.address)
            .ok_or(KernelError::NoDevice(entry.address))?;
        Ok(if dev.dead { DEAD_ID } else { entry.id })
    }

    /// `echo 1 > reset`: brings back a function dead until a reset.
    pub(super) fn reset(&mut self, board: &Board, address: &PciAddress) -> KernelResult<()> {
        let entry = board.entry(address)?;
        let path = format!("/sys/bus/pci/devices/{address}/reset");
        if self.present(address).is_none() {
            return Err(KernelError::NoDevice(*address));
        }
        if entry.reset.is_empty() {
            // No method: no `reset` file at all.
            return Err(os_error("write", path, libc::ENOENT));
        }
        let faults = faults(entry);
        if faults.reset == Some(ResetFault::Fail) {
            return Err(os_error("write", path, libc::EIO));
        }
        if faults.dead == Some(DeadFault::UntilReset)
            && let Some(dev) = self.present_mut(address)
        {
            dev.dead = false;
        }
        Ok(())
    }

    /// `echo 1 > rescan` of a bridge (its subtree) or of every bus.
    pub(super) fn rescan(
        &mut self,
        board: &Board,
        parent: Option<&PciAddress>,
        events: &mut Vec<Uevent>,
    ) -> KernelResult<()> {
        let found: Vec<PciAddress> = match parent {
            Some(bridge) => {
                board.entry(bridge)?;
                if self.present(bridge).is_none() {
                    return Err(KernelError::NoDevice(*bridge));
                }
                board.subtree(bridge)
            }
            None => board.entries().map(|entry| entry.address).collect(),
        };
        for address in found {
            self.add_device(board, &address, events);
        }
        Ok(())
    }
}

impl SimKernel {
    /// Host drivers that were asked to probe a dead function (a vfiod bug
    /// each: on real hardware that can hang the host).
    pub fn dead_probed(&self) -> Vec<PciAddress> {
        self.lock().state.dead_probed.clone()
    }
}
