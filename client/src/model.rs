//! vfiod's objects as the client sees them, read from one
//! `GetManagedObjects` answer (DESIGN §4).

use std::ops::Deref;

use vfiod_dbus::DeviceHealth;
use vfiod_dbus::names::{DEVICE_INTERFACE, PROFILE_INTERFACE, address_from_device_path};
use vfiod_dbus::objects::{DeviceProperties, ProfileProperties};
use vfiod_pci::PciAddress;
use zbus::fdo::ManagedObjects;

/// An `org.vfiod1.Device` at its path. A property the daemon did not send
/// keeps its default, so an older or newer daemon still lists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceView {
    pub path: String,
    pub properties: DeviceProperties,
}

/// An `org.vfiod1.Profile` at its path.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileView {
    pub path: String,
    pub properties: ProfileProperties,
}

impl Deref for DeviceView {
    type Target = DeviceProperties;
    fn deref(&self) -> &DeviceProperties {
        &self.properties
    }
}

impl DeviceView {
    /// Its state, and its health when a check found it bad: a card that
    /// did not survive its VM must not look like any other on vfio-pci.
    pub fn state_shown(&self) -> String {
        match self.health {
            DeviceHealth::ResetFailed | DeviceHealth::Dead => {
                format!("{} ({})", self.state, self.health)
            }
            DeviceHealth::Ok | DeviceHealth::Unknown => self.state.to_string(),
        }
    }
}

impl Deref for ProfileView {
    type Target = ProfileProperties;
    fn deref(&self) -> &ProfileProperties {
        &self.properties
    }
}

/// Every device (by address) and profile (by name).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Objects {
    pub devices: Vec<DeviceView>,
    pub profiles: Vec<ProfileView>,
}

impl Objects {
    pub fn from_managed(objects: ManagedObjects) -> Objects {
        let mut out = Objects::default();
        for (path, mut interfaces) in objects {
            let path = path.as_str().to_owned();
            // Intermediate nodes (/org/vfiod1/device) come with no interface.
            if let Some(props) = interfaces.remove(DEVICE_INTERFACE) {
                out.devices.push(DeviceView {
                    path: path.clone(),
                    properties: DeviceProperties::from_properties(props),
                });
            }
            if let Some(props) = interfaces.remove(PROFILE_INTERFACE) {
                out.profiles.push(ProfileView {
                    path,
                    properties: ProfileProperties::from_properties(props),
                });
            }
        }
        // Fixed-width lowercase addresses sort in bus order as strings.
        out.devices.sort_by(|a, b| a.address.cmp(&b.address));
        out.profiles.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn device_at(&self, path: &str) -> Option<&DeviceView> {
        self.devices.iter().find(|d| d.path == path)
    }

    pub fn device(&self, address: &PciAddress) -> Option<&DeviceView> {
        self.devices
            .iter()
            .find(|d| d.pci_address().as_ref() == Some(address))
    }

    pub fn profile(&self, name: &str) -> Option<&ProfileView> {
        self.profiles.iter().find(|p| p.name == name)
    }

    /// The profile a device belongs to (at most one, DESIGN §6).
    pub fn profile_of(&self, device: &DeviceView) -> Option<&ProfileView> {
        let address = device.pci_address()?;
        self.profiles.iter().find(|p| p.devices.contains(&address))
    }

    /// A profile's devices, in address order; devices vfiod did not list
    /// are skipped.
    pub fn devices_of<'a>(
        &'a self,
        profile: &'a ProfileView,
    ) -> impl Iterator<Item = &'a DeviceView> {
        self.devices.iter().filter(|d| {
            d.pci_address()
                .is_some_and(|a| profile.devices.contains(&a))
        })
    }
}

/// The address in a device path (`/org/vfiod1/device/0000_01_00_0`), for
/// when the device itself could not be read.
pub fn address_from_path(path: &str) -> Option<String> {
    address_from_device_path(path).map(|a| a.to_string())
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use vfiod_dbus::{DeviceState, ProfileState};
    use zbus::{OwnedObjectPath, OwnedVariant, Variant};

    type Properties = std::collections::HashMap<String, OwnedVariant>;

    /// Properties as GetAll answers them.
    fn wire(all: std::collections::HashMap<&'static str, Variant<'static>>) -> Properties {
        all.into_iter()
            .map(|(name, value)| (name.to_owned(), OwnedVariant::try_from(value).unwrap()))
            .collect()
    }

    pub fn device_props(
        address: &str,
        driver: &str,
        state: DeviceState,
        owner: &str,
    ) -> Properties {
        wire(
            DeviceProperties {
                address: address.into(),
                vendor_id: 0x1002,
                device_id: 0x67df,
                class: 0x030000,
                name: "Ellesmere".into(),
                driver: driver.into(),
                host_driver: "amdgpu".into(),
                iommu_group: 1,
                state,
                owner: owner.into(),
                boot_vga: false,
                reset_method: "bus".into(),
                health: vfiod_dbus::DeviceHealth::Ok,
            }
            .all(),
        )
    }

    pub fn profile_props(name: &str, devices: &[&str], state: ProfileState) -> Properties {
        wire(
            ProfileProperties {
                name: name.into(),
                devices: devices.iter().map(|d| d.parse().unwrap()).collect(),
                state,
                owner: String::new(),
                last_error: String::new(),
            }
            .all(),
        )
    }

    /// Two GPU functions in profile rx580, a USB controller outside any profile.
    pub fn sample() -> Objects {
        let mut m = ManagedObjects::new();
        let mut add = |path: &str, iface: &str, props: Properties| {
            m.entry(OwnedObjectPath::try_from(path).unwrap())
                .or_default()
                .insert(iface.try_into().unwrap(), props);
        };
        add(
            "/org/vfiod1/device/0000_01_00_1",
            DEVICE_INTERFACE,
            device_props("0000:01:00.1", "vfio-pci", DeviceState::Vfio, "win10"),
        );
        add(
            "/org/vfiod1/device/0000_01_00_0",
            DEVICE_INTERFACE,
            device_props("0000:01:00.0", "vfio-pci", DeviceState::Vfio, "win10"),
        );
        let mut usb = device_props("0000:04:00.0", "xhci_hcd", DeviceState::Host, "");
        usb.insert("IommuGroup".into(), OwnedVariant::from(-1i32));
        usb.remove("BootVga");
        add("/org/vfiod1/device/0000_04_00_0", DEVICE_INTERFACE, usb);
        add(
            "/org/vfiod1/profile/rx580",
            PROFILE_INTERFACE,
            profile_props(
                "rx580",
                &["0000:01:00.0", "0000:01:00.1"],
                ProfileState::Vfio,
            ),
        );
        m.entry(OwnedObjectPath::try_from("/org/vfiod1/device").unwrap())
            .or_default();
        Objects::from_managed(m)
    }

    #[test]
    fn reads_devices_and_profiles_in_order() {
        let o = sample();
        let addresses: Vec<&str> = o.devices.iter().map(|d| d.address.as_str()).collect();
        assert_eq!(addresses, ["0000:01:00.0", "0000:01:00.1", "0000:04:00.0"]);
        assert_eq!(o.profiles.len(), 1);
        let gpu = &o.devices[0];
        assert_eq!(
            (gpu.vendor_id, gpu.device_id, gpu.class),
            (0x1002, 0x67df, 0x030000)
        );
        assert_eq!(gpu.id(), "1002:67df");
        assert_eq!(o.profile_of(gpu).map(|p| p.name.as_str()), Some("rx580"));
        let usb = o.device(&"04:00.0".parse().unwrap()).unwrap();
        assert_eq!(usb.iommu_group, -1);
        assert!(!usb.boot_vga, "a missing property keeps its default");
        assert!(o.profile_of(usb).is_none());
        let rx = o.profile("rx580").unwrap();
        assert_eq!(o.devices_of(rx).count(), 2);
    }

    #[test]
    fn addresses_from_paths() {
        assert_eq!(
            address_from_path("/org/vfiod1/device/0000_01_00_1").as_deref(),
            Some("0000:01:00.1")
        );
        assert_eq!(address_from_path("/org/vfiod1/device/bogus"), None);
        assert_eq!(address_from_path("/org/vfiod1/device/0000_01_00_9"), None);
    }
}
