//! A function's health before its host driver gets it back (DESIGN §10):
//! its config space must answer with its own ids. One that did not survive
//! its VM (`ffff`) is never handed to a host driver: a reset by the kernel,
//! then a PCI remove and a rescan of its bus, each verified; when the reset
//! cannot bring it back and the rescan does not find it, it is off the bus
//! and the host needs a reboot for it.

use vfiod_pci::PciId;

use super::*;

/// What a function's config space says of it.
enum Life {
    Alive,
    Dead(PciId),
    /// Its config space can't be read (a fixture, a kernel without it).
    Unknown,
}

pub use vfiod_dbus::DeviceHealth as Health;

/// How long after a hand-back a host driver letting go is taken as the
/// function failing it (snd_hda_intel's probe, for one, runs late).
const HAND_BACK_WATCH: Duration = Duration::from_secs(10);

impl Engine {
    /// The verdict on `address`: the last one vfiod reached, else `ok` on
    /// a host driver and `unknown` elsewhere (vfio-pci: a VM may have had it).
    pub fn health(&self, address: &PciAddress, driver: Option<&str>) -> Health {
        if let Some(verdict) = self.verdicts().get(address) {
            return *verdict;
        }
        match driver {
            Some(d) if d != VFIO_DRIVER => Health::Ok,
            _ => Health::Unknown,
        }
    }

    /// Whether `address` went back to its host driver moments ago (an
    /// unbind now is for [`Self::host_driver_let_go`] to judge).
    pub fn watching_hand_back(&self, address: &PciAddress) -> bool {
        self.released_at()
            .get(address)
            .is_some_and(|at| at.elapsed() <= HAND_BACK_WATCH)
    }

    /// A driver left `address` outside any move: when it is the host
    /// driver vfiod gave the function back to moments ago, the function
    /// did not come back healthy (a probe that failed late, a driver that
    /// gave up on it), and that is said, not left as done.
    ///
    /// The kernel's unbind uevent names no driver (it is sent once the
    /// driver is gone) and comes late under load: vfio-pci's unbind of the
    /// release itself may arrive after the host driver has bound. So the
    /// function is judged as it is now, not by the event. Reads sysfs: call
    /// it off the event loop.
    pub fn host_driver_let_go(&self, address: &PciAddress) {
        let released = self.released_at().get(address).copied();
        let Some(released) = released else {
            return;
        };
        if released.elapsed() > HAND_BACK_WATCH {
            self.released_at().remove(address);
            return;
        }
        match self.current_driver(*address) {
            // Still on its host driver: the release's own unbind, late.
            Ok(Some(driver)) if self.host_driver(address).is_none_or(|h| h == driver) => return,
            // Someone else's driver now, or gone from the bus.
            Ok(Some(_)) | Err(_) => {
                self.released_at().remove(address);
                return;
            }
            Ok(None) => {}
        }
        self.released_at().remove(address);
        // A tool moving it on purpose (libvirt's managed='yes', driverctl)
        // writes driver_override before it unbinds: not the driver failing.
        let options = MoveOptions::default();
        match self.read_override(*address, &Run::unnarrated(&options, None)) {
            Ok(Some(to)) => {
                info!(device = %address, driver_override = %to, "another tool is moving the function vfiod just gave back");
                return;
            }
            Ok(None) => {}
            Err(failure) => {
                warn!(device = %address, error = %failure.describe(), "cannot tell whether another tool is moving the function")
            }
        }
        self.set_verdict(*address, Some(Health::ResetFailed));
        error!(
            device = %address,
            driver = self.host_driver(address).unwrap_or_else(|| "its host driver".into()),
            after_ms = released.elapsed().as_millis() as u64,
            "the host driver let go of the function right after vfiod gave it back: it did not come back healthy from its VM"
        );
    }

    /// The function went to vfio-pci: a VM may use it, nothing is known.
    pub(super) fn taken_again(&self, address: PciAddress) {
        self.released_at().remove(&address);
        self.set_verdict(address, None);
    }

    /// The function went back to its host driver just now.
    pub(super) fn handed_back(&self, address: PciAddress) {
        self.released_at().insert(address, Instant::now());
    }

    fn released_at(&self) -> MutexGuard<'_, BTreeMap<PciAddress, Instant>> {
        self.handed_back.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn set_verdict(&self, address: PciAddress, verdict: Option<Health>) {
        let mut verdicts = self.verdicts();
        match verdict {
            Some(v) => verdicts.insert(address, v),
            None => verdicts.remove(&address),
        };
    }

    fn verdicts(&self) -> MutexGuard<'_, BTreeMap<PciAddress, Health>> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before a function goes from vfio-pci to its host driver: alive, or
    /// brought back (then it may be on no driver: a rescan adds it
    /// unprobed). Fails with [`StepFailure::Dead`] when nothing worked; it
    /// is then on vfio-pci again, or off the bus.
    pub(super) fn ensure_alive(&self, address: PciAddress, run: &Run) -> Result<(), Failure> {
        let Some(device) = self.read_device(address, run)? else {
            return Ok(());
        };
        let dead = match self.life(&device, run)? {
            Life::Alive => {
                self.set_verdict(address, Some(Health::Ok));
                return Ok(());
            }
            Life::Unknown => return Ok(()),
            Life::Dead(id) => id,
        };
        error!(device = %address, reads = %dead, "the function did not survive its VM: its config space reads {dead}");
        let mut tried = Vec::new();
        if self.revived_by_reset(&device, run, &mut tried)?
            || self.revived_by_rescan(&device, run, &mut tried)?
        {
            info!(device = %address, tried = %tried.join("; "), "the function is back");
            self.set_verdict(address, Some(Health::Ok));
            return Ok(());
        }
        self.set_verdict(address, Some(Health::Dead));
        Err(Failure {
            device: Some(address),
            step: "check health".into(),
            cause: StepFailure::Dead(format!(
                "it did not survive its VM (its config space reads {dead}, not {}); tried: {}; it needs a reboot of the host",
                device.id,
                tried.join("; ")
            )),
        })
    }

    fn life(&self, device: &PciDevice, run: &Run) -> Result<Life, Failure> {
        let address = device.address;
        let step = "read config space";
        let live = self
            .kernel_call(Some(address), step, run, move |k| k.live_id(&address))
            .map_err(|cause| Failure {
                device: Some(address),
                step: step.into(),
                cause,
            })?;
        Ok(match live {
            None => Life::Unknown,
            Some(id) if id == device.id => Life::Alive,
            Some(id) => Life::Dead(id),
        })
    }

    /// `reset`, on vfio-pci still, then the config space read again.
    fn revived_by_reset(
        &self,
        device: &PciDevice,
        run: &Run,
        tried: &mut Vec<String>,
    ) -> Result<bool, Failure> {
        let address = device.address;
        if device.reset_methods.is_empty() {
            tried.push("no reset (the kernel has no reset method for it)".into());
            return Ok(false);
        }
        match self.step(
            address,
            "reset",
            run,
            move |k| k.reset(&address),
            |_| Ok(()),
        ) {
            Ok(()) => {}
            Err(failure) if matches!(failure.cause, StepFailure::Timeout { .. }) => {
                return Err(failure);
            }
            Err(failure) => {
                tried.push(format!("a reset, which failed ({})", failure.describe()));
                return Ok(false);
            }
        }
        if matches!(self.life(device, run)?, Life::Alive) {
            tried.push("a reset, which brought it back".into());
            return Ok(true);
        }
        tried.push("a reset, after which it still read dead".into());
        Ok(false)
    }

    /// `remove`, then `rescan` of its bus. A rescan finds only a function
    /// whose config space answers, and the kernel then gives it its driver
    /// at once, as at boot (whatever `drivers_autoprobe` says: the
    /// real-kernel lane saw it): found again with its ids and alive, it is
    /// back; not found, it is off the bus until a reboot.
    fn revived_by_rescan(
        &self,
        device: &PciDevice,
        run: &Run,
        tried: &mut Vec<String>,
    ) -> Result<bool, Failure> {
        let bus = match device.parent {
            Some(bridge) => format!("the bus behind {bridge}"),
            None => "every PCI bus".into(),
        };
        let done = format!("a remove and a rescan of {bus}");
        match self.remove_and_rescan(device, run)? {
            None => {
                tried.push(format!("{done}, which did not find it again"));
                Ok(false)
            }
            Some(again) if again.id != device.id => {
                tried.push(format!(
                    "{done}, which found {} at its address instead",
                    again.id
                ));
                Ok(false)
            }
            Some(again) => {
                if matches!(self.life(&again, run)?, Life::Alive) {
                    tried.push(format!("{done}, which brought it back"));
                    return Ok(true);
                }
                tried.push(format!("{done}, which found it again, still dead"));
                Ok(false)
            }
        }
    }

    fn remove_and_rescan(
        &self,
        device: &PciDevice,
        run: &Run,
    ) -> Result<Option<PciDevice>, Failure> {
        let address = device.address;
        let parent = device.parent;
        self.step(
            address,
            "remove",
            run,
            move |k| k.remove(&address),
            |_| Ok(()),
        )?;
        let step = match parent {
            Some(bridge) => format!("rescan {bridge}"),
            None => "rescan every bus".into(),
        };
        self.step(
            address,
            &step,
            run,
            move |k| k.rescan(parent.as_ref()),
            |_| Ok(()),
        )?;
        self.wait_for_udev_after_rescan(address, run)?;
        self.read_device(address, run)
    }

    /// The rescan added the function again, and udevd handles that add
    /// after the kernel has probed it: a `boot = "vfio"` profile's early
    /// claim rule writes `driver_override` then. This is a release, which
    /// the user asked for: the rule must not claim the function again
    /// behind it, so the release waits for udev (bounded as a write is)
    /// and clears what the rule wrote before giving the function back.
    fn wait_for_udev_after_rescan(&self, address: PciAddress, run: &Run) -> Result<(), Failure> {
        let limit = self.write_limit(run).map_err(|cause| Failure {
            device: Some(address),
            step: "wait for udev".into(),
            cause,
        })?;
        if !crate::boot::wait_for_udev(&*self.kernel, limit) {
            warn!(device = %address, step = "wait for udev", waited_ms = limit.as_millis() as u64, "udev's queue is still busy after the rescan: a udev rule may still write the function's driver_override");
        }
        Ok(())
    }
}
