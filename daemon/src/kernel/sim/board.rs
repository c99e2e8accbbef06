//! What never changes while the simulated machine runs: the machine file
//! and what follows from it.

use super::*;

pub(super) struct Board {
    pub(super) machine: MachineFile,
    pub(super) fingerprint: String,
    /// Position in `machine.devices`, in address order.
    pub(super) index: BTreeMap<PciAddress, usize>,
    pub(super) children: BTreeMap<PciAddress, Vec<PciAddress>>,
    /// Host drivers registered from boot on: each boot driver and each
    /// `host_driver`. vfio-pci comes with its module instead.
    pub(super) boot_drivers: BTreeSet<String>,
    /// `[machine] missing`, as module keys.
    pub(super) missing_modules: BTreeSet<String>,
}

impl Board {
    pub(super) fn new(machine: MachineFile, fingerprint: String) -> Board {
        let index = machine
            .devices
            .iter()
            .enumerate()
            .map(|(i, entry)| (entry.address, i))
            .collect();
        let mut children: BTreeMap<PciAddress, Vec<PciAddress>> = BTreeMap::new();
        for entry in &machine.devices {
            if let Some(parent) = entry.parent {
                children.entry(parent).or_default().push(entry.address);
            }
        }
        for list in children.values_mut() {
            list.sort();
        }
        let boot_drivers = machine
            .devices
            .iter()
            .flat_map(|entry| [&entry.driver, &entry.host_driver])
            .flatten()
            .filter(|driver| *driver != VFIO_DRIVER)
            .cloned()
            .collect();
        let missing_modules = machine
            .machine
            .missing
            .iter()
            .map(|m| module_key(m))
            .collect();
        Board {
            machine,
            fingerprint,
            index,
            children,
            boot_drivers,
            missing_modules,
        }
    }

    pub(super) fn entries(&self) -> impl Iterator<Item = &DeviceEntry> {
        self.index.values().map(|&i| &self.machine.devices[i])
    }

    pub(super) fn entry(&self, address: &PciAddress) -> KernelResult<&DeviceEntry> {
        self.index
            .get(address)
            .map(|&i| &self.machine.devices[i])
            .ok_or(KernelError::NoDevice(*address))
    }

    pub(super) fn group_members(&self, group: u32) -> impl Iterator<Item = &DeviceEntry> {
        self.entries()
            .filter(move |entry| entry.group == Some(group))
    }

    pub(super) fn iommu_enabled(&self) -> bool {
        self.machine.machine.iommu != IommuKind::None
    }

    /// The upstream bridges, nearest first.
    pub(super) fn ancestors(&self, address: &PciAddress) -> Vec<PciAddress> {
        let mut chain = Vec::new();
        let mut at = *address;
        // The machine file is checked for loops; the bound is belt and braces.
        while let Some(parent) = self.entry(&at).ok().and_then(|entry| entry.parent) {
            if chain.len() > self.index.len() {
                break;
            }
            chain.push(parent);
            at = parent;
        }
        chain
    }

    /// The device and everything behind it, each bridge before its children.
    pub(super) fn subtree(&self, address: &PciAddress) -> Vec<PciAddress> {
        let mut order = vec![*address];
        let mut next = 0;
        while let Some(at) = order.get(next).copied() {
            next += 1;
            if let Some(kids) = self.children.get(&at) {
                // One parent per device and no loops (the machine file is
                // checked), so nothing is visited twice.
                order.extend_from_slice(kids);
            }
        }
        order
    }

    /// The driver `drivers_probe` picks without an override.
    pub(super) fn natural_driver<'a>(&self, entry: &'a DeviceEntry) -> Option<&'a str> {
        entry.host_driver.as_deref().or(entry.driver.as_deref())
    }

    /// The running state of a machine just booted.
    pub(super) fn boot_state(&self) -> RunningState {
        // Late drivers wait for a coldplug that is still running.
        let coldplug_ms = self.machine.machine.coldplug_ms.unwrap_or(0);
        let late: BTreeSet<PciAddress> = self
            .entries()
            .filter(|entry| entry.late_driver && coldplug_ms > 0)
            .map(|entry| entry.address)
            .collect();
        let devices = self
            .entries()
            .map(|entry| {
                let state = DeviceState::fresh(
                    entry
                        .driver
                        .clone()
                        .filter(|_| !late.contains(&entry.address)),
                );
                (entry.address, state)
            })
            .collect();
        let mut modules: BTreeSet<String> = self
            .machine
            .machine
            .modules
            .iter()
            .map(|m| module_key(m))
            .collect();
        // A device bound to vfio-pci at boot means the module is in.
        if self
            .entries()
            .any(|entry| entry.driver.as_deref() == Some(VFIO_DRIVER))
        {
            modules.insert(VFIO_MODULE.to_owned());
        }
        if modules.contains(VFIO_MODULE) {
            modules.extend(VFIO_DEPENDENCIES.map(String::from));
        }
        RunningState {
            format: STATE_FORMAT,
            boot_id: new_boot_id(),
            machine: self.fingerprint.clone(),
            devices,
            modules,
            extra_drivers: BTreeSet::new(),
            holders: self
                .entries()
                .flat_map(|entry| entry.holders.iter().cloned())
                .chain(self.manager_holders_at_boot())
                .collect(),
            dead_probed: Vec::new(),
            coldplug_until_ms: (coldplug_ms > 0).then(|| now_ms() + coldplug_ms),
            late,
            udev_overrides: BTreeMap::new(),
            display: DisplayState::default(),
        }
    }
}
