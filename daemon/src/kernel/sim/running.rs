use super::*;

/// How long udevd takes to handle one add event (its rules, its writes).
const UDEV_EVENT_MS: u64 = 50;

/// The machine as it runs; this is what the state file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RunningState {
    pub(super) format: u32,
    /// Changes with every fresh boot, like /proc/sys/kernel/random/boot_id.
    pub(super) boot_id: String,
    /// Fingerprint of the machine file this state belongs to.
    pub(super) machine: String,
    pub(super) devices: BTreeMap<PciAddress, DeviceState>,
    /// Loaded modules, as module keys (`vfio_pci`).
    pub(super) modules: BTreeSet<String>,
    /// Drivers bound by hand ([`SimKernel::set_driver`]) that no device had
    /// at boot.
    pub(super) extra_drivers: BTreeSet<String>,
    /// Processes holding device nodes open.
    pub(super) holders: Vec<Holder>,
    /// Dead functions a host driver was asked to probe: each one would
    /// have risked the host (amdgpu on a dead card can hang it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) dead_probed: Vec<PciAddress>,
    /// While udev's coldplug runs (`coldplug_ms`): when it ends, in
    /// milliseconds since the Unix epoch (the state outlives vfiod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) coldplug_until_ms: Option<u64>,
    /// Devices whose `late_driver` has not bound yet.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub(super) late: BTreeSet<PciAddress>,
    /// `driver_override` writes of udev rules for functions just added (a
    /// rescan), done when udev's queue empties: the kernel has probed the
    /// function by then, udevd comes after.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) udev_overrides: BTreeMap<PciAddress, String>,
    /// vtconsoles, framebuffers and the display manager, as changed
    /// since boot.
    #[serde(default, skip_serializing_if = "DisplayState::is_boot")]
    pub(super) display: DisplayState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeviceState {
    pub(super) present: bool,
    /// The `driver` link: `None` from the moment an unbind starts.
    pub(super) driver: Option<String>,
    pub(super) driver_override: Option<String>,
    /// A waiting unbind: the driver whose removal has started (its link is
    /// gone) and not ended, because a process still holds what it waits
    /// for. The device lock is taken meanwhile. Absent from the file when
    /// none is pending, so a state written before waiting unbinds existed
    /// still loads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) unbinding: Option<String>,
    /// The pending removal hangs (`unbind = "hang"`): it waits for nobody
    /// and ends only by [`SimKernel::end_hang`].
    #[serde(default, skip_serializing_if = "is_false")]
    pub(super) hung: bool,
    /// `reset_method` as written since boot; absent: the boot's (the
    /// machine file's `reset`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) reset_method: Option<Vec<String>>,
    /// Its config space reads `ffff` (a `dead` fault: its VM left it so).
    #[serde(default, skip_serializing_if = "is_false")]
    pub(super) dead: bool,
}

impl DeviceState {
    /// On the bus as at boot (or as found by a rescan).
    pub(super) fn fresh(driver: Option<String>) -> DeviceState {
        DeviceState {
            present: true,
            driver,
            driver_override: None,
            unbinding: None,
            hung: false,
            reset_method: None,
            dead: false,
        }
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl RunningState {
    pub(super) fn present(&self, address: &PciAddress) -> Option<&DeviceState> {
        self.devices.get(address).filter(|dev| dev.present)
    }

    pub(super) fn present_mut(&mut self, address: &PciAddress) -> Option<&mut DeviceState> {
        self.devices.get_mut(address).filter(|dev| dev.present)
    }

    pub(super) fn pci_device(&self, entry: &DeviceEntry) -> Option<PciDevice> {
        let dev = self.present(&entry.address)?;
        Some(PciDevice {
            address: entry.address,
            id: entry.id,
            subsystem: entry.subsystem,
            class: entry.class,
            name: entry.name.clone(),
            driver: dev.driver.clone(),
            iommu_group: entry.group,
            parent: entry.parent,
            boot_vga: entry.boot_vga,
            reset_methods: dev
                .reset_method
                .clone()
                .unwrap_or_else(|| entry.reset.clone()),
        })
    }

    /// Whether udev's coldplug still runs at `now_ms`.
    pub(super) fn coldplug_running(&self, now_ms: u64) -> bool {
        self.coldplug_until_ms.is_some_and(|end| now_ms < end)
    }

    /// A udev rule writes `driver_override` of a function just added: udev's
    /// queue is busy until udevd has handled the event.
    pub(super) fn udev_writes_override(
        &mut self,
        address: PciAddress,
        driver: String,
        now_ms: u64,
    ) {
        self.udev_overrides.insert(address, driver);
        let end = now_ms + UDEV_EVENT_MS;
        self.coldplug_until_ms = Some(self.coldplug_until_ms.map_or(end, |e| e.max(end)));
    }

    /// The coldplug reaches `address`: its late driver binds now, unless
    /// the device has a driver or an override naming another one.
    pub(super) fn coldplug_reaches(
        &mut self,
        board: &Board,
        address: &PciAddress,
        events: &mut Vec<Uevent>,
    ) {
        if !self.late.remove(address) {
            return;
        }
        let Some(driver) = board.entry(address).ok().and_then(|e| e.driver.clone()) else {
            return;
        };
        let free = self.present(address).is_some_and(|dev| {
            dev.driver.is_none()
                && dev.unbinding.is_none()
                && dev.driver_override.as_deref().is_none_or(|o| o == driver)
        });
        if free {
            self.bind_device(address, &driver, events);
        }
    }

    /// The coldplug is over: every late driver still to come binds.
    pub(super) fn end_coldplug(&mut self, board: &Board, events: &mut Vec<Uevent>) {
        self.coldplug_until_ms = None;
        for (address, driver) in std::mem::take(&mut self.udev_overrides) {
            if let Some(dev) = self.present_mut(&address) {
                dev.driver_override = Some(driver);
            }
        }
        let late: Vec<PciAddress> = self.late.iter().copied().collect();
        for address in late {
            self.coldplug_reaches(board, &address, events);
        }
    }

    pub(super) fn vfio_loaded(&self) -> bool {
        self.modules.contains(VFIO_MODULE)
    }

    pub(super) fn registered_drivers<'a>(
        &'a self,
        board: &'a Board,
    ) -> impl Iterator<Item = &'a str> {
        board
            .boot_drivers
            .iter()
            .chain(&self.extra_drivers)
            .map(String::as_str)
            .chain(self.vfio_loaded().then_some(VFIO_DRIVER))
    }

    /// Whether `/sys/bus/pci/drivers/DRIVER` exists (exact name).
    pub(super) fn registered(&self, board: &Board, driver: &str) -> bool {
        self.registered_drivers(board).any(|name| name == driver)
    }

    /// `/dev/vfio/N` lives while a member is on vfio-pci, its removal
    /// from vfio-pci still pending included.
    pub(super) fn group_node_exists(&self, board: &Board, group: u32) -> bool {
        board.group_members(group).any(|entry| {
            self.present(&entry.address).is_some_and(|dev| {
                dev.driver.as_deref() == Some(VFIO_DRIVER)
                    || dev.unbinding.as_deref() == Some(VFIO_DRIVER)
            })
        })
    }

    /// Whether the device lock is taken: a removal has started and not
    /// ended.
    pub(super) fn device_locked(&self, address: &PciAddress) -> bool {
        self.present(address)
            .is_some_and(|dev| dev.unbinding.is_some())
    }

    /// Whether removing `driver` from the device has to wait now for a
    /// process to let go (see the module documentation).
    pub(super) fn removal_waits(&self, entry: &DeviceEntry, driver: &str) -> bool {
        if driver == VFIO_DRIVER {
            // vfio-pci relays a device request to the group's user and
            // waits until it lets go (DESIGN §2: QEMU holding /dev/vfio/N).
            entry
                .group
                .is_some_and(|group| self.holders.iter().any(|h| h.node == group_node(group)))
        } else if is_sound_driver(driver) {
            // snd_card_free waits for every open file of the card.
            self.holders.iter().any(|h| entry.nodes.contains(&h.node))
        } else {
            false
        }
    }

    /// An unbind starts: the `driver` link goes at once, the removal ends
    /// in [`RunningState::finish_removals`] (a `hung` one not before
    /// [`SimKernel::end_hang`]).
    pub(super) fn start_removal(&mut self, address: &PciAddress, driver: &str, hung: bool) {
        if let Some(dev) = self.present_mut(address) {
            dev.driver = None;
            dev.unbinding = Some(driver.to_owned());
            dev.hung = hung;
        }
    }

    /// Ends every removal that no longer waits for anyone: announced with
    /// its `unbind` uevent; a device that vanishes once unbound goes.
    pub(super) fn finish_removals(&mut self, board: &Board, events: &mut Vec<Uevent>) {
        let done: Vec<(PciAddress, String)> = self
            .devices
            .iter()
            .filter(|(_, dev)| dev.present && !dev.hung)
            .filter_map(|(address, dev)| Some((*address, dev.unbinding.clone()?)))
            .filter(|(address, driver)| {
                board
                    .entry(address)
                    .is_ok_and(|entry| !self.removal_waits(entry, driver))
            })
            .collect();
        for (address, _) in done {
            if let Some(dev) = self.present_mut(&address) {
                dev.unbinding = None;
            }
            // As the kernel's: sent once the driver is gone, naming none.
            events.push(uevent(UeventAction::Unbind, &address, None));
            if board
                .entry(&address)
                .is_ok_and(|entry| faults(entry).vanish == Some(VanishFault::Unbind))
            {
                self.remove_subtree(board, &address, events);
            }
        }
    }

    pub(super) fn load_module(&mut self, board: &Board, module: &str) -> KernelResult<()> {
        let key = module_key(module);
        if self.modules.contains(&key) {
            return Ok(());
        }
        if !board.machine.machine.module_loading.is_allowed() {
            // What modprobe says when init_module fails with EPERM.
            return Err(KernelError::Module {
                module: module.to_owned(),
                reason: format!(
                    "modprobe: ERROR: could not insert '{key}': Operation not permitted"
                ),
            });
        }
        if board.missing_modules.contains(&key) {
            let kernel = match board.machine.machine.kernel.as_str() {
                "" => "(unknown kernel)",
                kernel => kernel,
            };
            return Err(KernelError::Module {
                module: module.to_owned(),
                reason: format!("Module {key} not found in directory /lib/modules/{kernel}"),
            });
        }
        if key == VFIO_MODULE {
            self.modules.extend(VFIO_DEPENDENCIES.map(String::from));
        }
        self.modules.insert(key);
        Ok(())
    }

    /// The driver `drivers_probe` would bind now, if any.
    pub(super) fn driver_that_binds(
        &self,
        board: &Board,
        entry: &DeviceEntry,
        driver_override: Option<&str>,
    ) -> Option<String> {
        let natural = board.natural_driver(entry);
        let candidate = driver_override.or(natural)?;
        let faults = faults(entry);
        // "The host driver will not come back", however it is asked to.
        let refused_again = faults.reprobe == Some(ProbeFault::Fail)
            && Some(candidate) == natural
            && (driver_override.is_none() || candidate != VFIO_DRIVER);
        let binds = if candidate == VFIO_DRIVER {
            // vfio-pci's probe: -ENODEV without its module, -EINVAL without an
            // IOMMU group or for a bridge (not a normal header).
            self.vfio_loaded()
                && board.iommu_enabled()
                && !is_pci_bridge(entry.class)
                && faults.probe != Some(ProbeFault::Fail)
                // A firmware framebuffer keeps its BAR reserved.
                && !self.framebuffer_on(board, &entry.address)
        } else {
            self.registered(board, candidate)
        };
        (binds && !refused_again).then(|| candidate.to_owned())
    }

    /// `drivers_probe` on a present device: silent when nothing binds.
    pub(super) fn probe_device(
        &mut self,
        board: &Board,
        address: &PciAddress,
        events: &mut Vec<Uevent>,
    ) {
        let Ok(entry) = board.entry(address) else {
            return;
        };
        let Some(dev) = self.present(address) else {
            return;
        };
        if dev.driver.is_some() {
            return;
        }
        let dead = dev.dead;
        let Some(driver) = self.driver_that_binds(board, entry, dev.driver_override.as_deref())
        else {
            return;
        };
        if dead && driver != VFIO_DRIVER {
            // The host driver's probe fails on a dead function, if it does
            // not hang the host first: recorded, for tests to find.
            self.dead_probed.push(*address);
            return;
        }
        self.bind_device(address, &driver, events);
        if driver == VFIO_DRIVER && faults(entry).dead.is_some() {
            self.killed_by_its_vm(address);
        }
    }

    pub(super) fn bind_device(
        &mut self,
        address: &PciAddress,
        driver: &str,
        events: &mut Vec<Uevent>,
    ) {
        if let Some(dev) = self.present_mut(address) {
            dev.driver = Some(driver.to_owned());
            events.push(uevent(UeventAction::Bind, address, Some(driver)));
        }
    }

    /// Unbinds at once; a pending removal ends with it (a hot-unplug).
    pub(super) fn unbind_device(&mut self, address: &PciAddress, events: &mut Vec<Uevent>) {
        if let Some(dev) = self.present_mut(address)
            && dev.driver.take().or_else(|| dev.unbinding.take()).is_some()
        {
            dev.hung = false;
            events.push(uevent(UeventAction::Unbind, address, None));
        }
    }

    /// The device and all behind it leave the bus, deepest first, each
    /// unbound before it goes; a device that comes back starts afresh.
    pub(super) fn remove_subtree(
        &mut self,
        board: &Board,
        address: &PciAddress,
        events: &mut Vec<Uevent>,
    ) {
        for at in board.subtree(address).iter().rev() {
            self.unbind_device(at, events);
            if let Some(dev) = self.present_mut(at) {
                dev.present = false;
                dev.driver_override = None;
                events.push(uevent(UeventAction::Remove, at, None));
            }
        }
    }

    /// A device (re)appears on the bus and is probed as at boot.
    pub(super) fn add_device(
        &mut self,
        board: &Board,
        address: &PciAddress,
        events: &mut Vec<Uevent>,
    ) {
        let Some(dev) = self.devices.get_mut(address) else {
            return;
        };
        if dev.present {
            return;
        }
        let Ok(entry) = board.entry(address) else {
            return;
        };
        if !found_by_rescan(entry, dev.dead) {
            return;
        }
        *dev = DeviceState::fresh(None);
        events.push(uevent(UeventAction::Add, address, None));
        self.probe_device(board, address, events);
    }

    /// Adopts a state read from disk for `board`: devices the machine file
    /// lists but the state lacks are as at boot; others are dropped.
    pub(super) fn reconciled(mut self, board: &Board) -> RunningState {
        let mut boot = board.boot_state();
        for (address, dev) in &mut boot.devices {
            if let Some(saved) = self.devices.remove(address) {
                *dev = saved;
            }
        }
        self.devices = boot.devices;
        // A removal whose holders let go while nothing ran ends now.
        self.finish_removals(board, &mut Vec::new());
        self
    }
}
