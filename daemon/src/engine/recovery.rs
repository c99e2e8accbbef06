//! Settling the moves a crash interrupted, from the journal.

use super::*;

impl Engine {
    /// Settles the moves a crash interrupted (from [`Journal::open`]): every
    /// device they were changing goes to its host driver (an interrupted
    /// bind is undone, an interrupted release finished); one whose host
    /// driver will not come back goes to vfio-pci, never driverless.
    /// Returns what was done, in words, one line per device. Blocking.
    pub fn recover(&self, interrupted: Vec<(MoveId, MoveEntry)>) -> Vec<String> {
        let mut report = Vec::new();
        // A health check stopped between its remove and rescan (DESIGN §10).
        if !interrupted.is_empty() {
            report.extend(self.finish_rescans(&interrupted));
        }
        for (id, entry) in interrupted {
            warn!(
                target = %entry.target,
                direction = %entry.direction,
                last_step = ?entry.step,
                "settling a move that vfiod did not finish"
            );
            let options = MoveOptions::default();
            let run = Run::unnarrated(&options, Some(id));
            for address in entry.devices.iter().rev().copied() {
                report.push(self.settle(address, &run));
                if let Err(e) = self.ledger().set_owner(address, None) {
                    error!(device = %address, error = %e, "cannot clear the owner");
                }
            }
            self.close_move(id);
        }
        // The devices are settled: a display a handoff took comes back.
        report.extend(self.recover_handoffs());
        report
    }

    /// Functions of interrupted moves that are off the bus (a health
    /// check killed between its remove and its rescan) are looked for
    /// again; one found is settled like the others.
    fn finish_rescans(&self, interrupted: &[(MoveId, MoveEntry)]) -> Vec<String> {
        let gone: Vec<PciAddress> = interrupted
            .iter()
            .flat_map(|(_, entry)| entry.devices.iter().copied())
            .filter(|address| matches!(self.kernel.device(address), Ok(None)))
            .collect();
        if gone.is_empty() {
            return Vec::new();
        }
        warn!(devices = ?gone, "functions of an interrupted move are off the bus; rescanning");
        match self.kernel.rescan(None) {
            Ok(()) => Vec::new(),
            Err(e) => {
                error!(error = %e, "the rescan failed");
                vec![format!("the rescan for {gone:?} failed: {e}")]
            }
        }
    }

    pub(super) fn settle(&self, address: PciAddress, run: &Run) -> String {
        let outcome = match self.read_device(address, run) {
            Ok(Some(_)) => self.settle_present(address, run),
            Ok(None) => return format!("{address} is gone from the bus"),
            Err(failure) => Err(failure),
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

    pub(super) fn settle_present(&self, address: PciAddress, run: &Run) -> Result<(), Failure> {
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
                    self.to_vfio(address, run, false).and(Err(failure))
                }),
        }
    }
}
