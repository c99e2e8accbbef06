//! What the bus shows about each device and profile: plain values taken
//! from the kernel and the engine in one blocking snapshot.

use std::collections::BTreeMap;

use vfiod_dbus::objects::{DeviceProperties, ProfileProperties};
use vfiod_dbus::{DeviceHealth, DeviceState, ProfileState};
use vfiod_pci::{PciAddress, PciDevice, PciId};

use crate::engine::Engine;
use crate::kernel::{KernelError, VFIO_DRIVER};
use vfiod_config::Config;
use vfiod_host::sysfs::reset_method_file;

/// How much of a device a refresh reads again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reread {
    /// Everything (a `change` uevent; a device the view doesn't know yet).
    Whole,
    /// The driver and what follows from it: all a bind or unbind changes,
    /// a move of ours or anyone's.
    Driver,
}

/// The whole published view at one moment.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    pub devices: BTreeMap<PciAddress, DeviceProperties>,
    pub profiles: BTreeMap<String, ProfileProperties>,
}

/// A device as the bus shows it, from the kernel and the engine.
trait FromEngine {
    fn of(engine: &Engine, device: &PciDevice) -> Self;
    fn set_driver(&mut self, engine: &Engine, address: &PciAddress, driver: Option<String>);
}

impl FromEngine for DeviceProperties {
    fn of(engine: &Engine, device: &PciDevice) -> DeviceProperties {
        let mut props = DeviceProperties {
            address: device.address.to_string(),
            vendor_id: device.id.vendor,
            device_id: device.id.device,
            class: device.class.0,
            name: device.name.clone(),
            driver: String::new(),
            host_driver: String::new(),
            iommu_group: device.iommu_group.map(|g| g as i32).unwrap_or(-1),
            state: DeviceState::Unbound,
            owner: String::new(),
            boot_vga: device.boot_vga,
            reset_method: reset_method_shown(device),
            health: DeviceHealth::Unknown,
        };
        props.set_driver(engine, &device.address, device.driver.clone());
        props
    }

    /// The driver, and what follows from it and the engine: the host
    /// driver, the state, the owner.
    fn set_driver(&mut self, engine: &Engine, address: &PciAddress, driver: Option<String>) {
        self.host_driver = match driver.as_deref() {
            Some(d) if d != VFIO_DRIVER => d.to_string(),
            _ => engine.host_driver(address).unwrap_or_default(),
        };
        self.state = engine.state_of(address, driver.as_deref());
        self.health = engine.health(address, driver.as_deref());
        self.owner = engine.owner(address).unwrap_or_default();
        self.driver = driver.unwrap_or_default();
    }
}

/// `reset_method` as the bus shows it: empty when the kernel shows none.
fn reset_method_shown(device: &PciDevice) -> String {
    reset_method_file(&device.reset_methods).unwrap_or_default()
}

/// One device read whole into `devices`, or dropped when it is gone.
fn read_whole(
    devices: &mut BTreeMap<PciAddress, DeviceProperties>,
    engine: &Engine,
    address: &PciAddress,
) -> Result<(), vfiod_dbus::Error> {
    match engine
        .kernel()
        .device(address)
        .map_err(crate::plan::kernel_error)?
    {
        Some(device) => devices.insert(*address, DeviceProperties::of(engine, &device)),
        None => devices.remove(address),
    };
    Ok(())
}

fn profile_state(members: &[&DeviceProperties]) -> ProfileState {
    let states: Vec<DeviceState> = members.iter().map(|d| d.state).collect();
    let all = |s: DeviceState| !states.is_empty() && states.iter().all(|x| *x == s);
    if states.contains(&DeviceState::Moving) {
        ProfileState::Moving
    } else if states.contains(&DeviceState::Stuck) || states.contains(&DeviceState::Unbound) {
        ProfileState::Error
    } else if all(DeviceState::Vfio) {
        ProfileState::Vfio
    } else if all(DeviceState::Host) {
        ProfileState::Host
    } else {
        ProfileState::Mixed
    }
}

impl Snapshot {
    /// Reads every device from the kernel, and the engine. Blocking: run it
    /// off the event loop.
    pub fn take(
        engine: &Engine,
        last_errors: &BTreeMap<String, String>,
    ) -> Result<Snapshot, vfiod_dbus::Error> {
        let devices = engine
            .kernel()
            .devices()
            .map_err(crate::plan::kernel_error)?;
        let device_props = devices
            .iter()
            .map(|d| (d.address, DeviceProperties::of(engine, d)))
            .collect();
        Ok(Snapshot::with_profiles(
            device_props,
            &engine.config(),
            last_errors,
        ))
    }

    /// This view with some devices read again: far cheaper than
    /// [`Snapshot::take`]. A device not in the view yet is read whole, one
    /// gone from the bus is dropped. Blocking.
    pub fn reread(
        &self,
        engine: &Engine,
        addresses: &[PciAddress],
        what: Reread,
        last_errors: &BTreeMap<String, String>,
    ) -> Result<Snapshot, vfiod_dbus::Error> {
        let mut devices = self.devices.clone();
        for address in addresses {
            let known = devices.get_mut(address);
            match (what, known) {
                (Reread::Driver, Some(props)) => match engine.kernel().driver(address) {
                    Ok(driver) => props.set_driver(engine, address, driver),
                    Err(KernelError::NoDevice(_)) => {
                        devices.remove(address);
                    }
                    Err(e) => return Err(crate::plan::kernel_error(e)),
                },
                _ => read_whole(&mut devices, engine, address)?,
            }
        }
        Ok(Snapshot::with_profiles(
            devices,
            &engine.config(),
            last_errors,
        ))
    }

    /// This view with what the engine says of some devices (their state and
    /// owner) brought up to date, reading nothing from the kernel.
    pub fn with_states(
        &self,
        engine: &Engine,
        addresses: &[PciAddress],
        last_errors: &BTreeMap<String, String>,
    ) -> Snapshot {
        let mut devices = self.devices.clone();
        for address in addresses {
            if let Some(props) = devices.get_mut(address) {
                let driver = (!props.driver.is_empty()).then_some(props.driver.as_str());
                props.state = engine.state_of(address, driver);
                props.owner = engine.owner(address).unwrap_or_default();
            }
        }
        Snapshot::with_profiles(devices, &engine.config(), last_errors)
    }

    fn with_profiles(
        devices: BTreeMap<PciAddress, DeviceProperties>,
        config: &Config,
        last_errors: &BTreeMap<String, String>,
    ) -> Snapshot {
        let mut profiles = BTreeMap::new();
        for (name, profile) in &config.profiles {
            let members: Vec<PciAddress> = devices
                .iter()
                .filter(|(address, d)| {
                    let id = PciId {
                        vendor: d.vendor_id,
                        device: d.device_id,
                    };
                    profile.matches(address, &id)
                })
                .map(|(address, _)| *address)
                .collect();
            let props: Vec<&DeviceProperties> =
                members.iter().filter_map(|a| devices.get(a)).collect();
            let mut owners: Vec<&str> = props
                .iter()
                .map(|d| d.owner.as_str())
                .filter(|o| !o.is_empty())
                .collect();
            owners.dedup();
            let state = if props.is_empty() {
                ProfileState::Error
            } else {
                profile_state(&props)
            };
            profiles.insert(
                name.clone(),
                ProfileProperties {
                    name: name.clone(),
                    devices: members,
                    state,
                    owner: owners.join(","),
                    last_error: last_errors.get(name).cloned().unwrap_or_default(),
                },
            );
        }
        Snapshot { devices, profiles }
    }
}

/// A published device as the planner's functions take it: what the bus
/// shows (address, ids, class, driver, group), nothing more.
pub fn as_pci_device(p: &DeviceProperties) -> Option<PciDevice> {
    Some(PciDevice {
        address: p.pci_address()?,
        id: PciId {
            vendor: p.vendor_id,
            device: p.device_id,
        },
        subsystem: None,
        class: vfiod_pci::PciClass(p.class),
        name: p.name.clone(),
        driver: (!p.driver.is_empty()).then(|| p.driver.clone()),
        iommu_group: u32::try_from(p.iommu_group).ok(),
        parent: None,
        boot_vga: p.boot_vga,
        reset_methods: Vec::new(),
    })
}
