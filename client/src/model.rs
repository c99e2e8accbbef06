//! vfiod's objects as the client sees them, read from one
//! `GetManagedObjects` answer (DESIGN §4).

use std::collections::HashMap;

use vfiod_dbus::names::{DEVICE_INTERFACE, PROFILE_INTERFACE};
use vfiod_pci::PciAddress;
use zbus::fdo::ManagedObjects;
use zbus::{OwnedObjectPath, OwnedVariant};

/// An `org.vfiod1.Device`. A property the daemon did not send keeps its
/// default, so an older or newer daemon still lists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceView {
    pub path: String,
    pub address: String,
    pub vendor_id: u16,
    pub device_id: u16,
    pub class: u32,
    pub name: String,
    pub driver: String,
    pub host_driver: String,
    /// -1: no IOMMU group.
    pub iommu_group: i32,
    pub state: String,
    pub owner: String,
    pub boot_vga: bool,
}

/// An `org.vfiod1.Profile`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileView {
    pub path: String,
    pub name: String,
    /// Object paths of its devices.
    pub devices: Vec<String>,
    pub state: String,
    pub owner: String,
    pub last_error: String,
}

/// Every device (by address) and profile (by name).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Objects {
    pub devices: Vec<DeviceView>,
    pub profiles: Vec<ProfileView>,
}

type Properties = HashMap<String, OwnedVariant>;

fn take<T>(props: &mut Properties, name: &str) -> Option<T>
where
    T: TryFrom<OwnedVariant>,
{
    props.remove(name).and_then(|v| T::try_from(v).ok())
}

fn paths(props: &mut Properties, name: &str) -> Vec<String> {
    take::<Vec<OwnedObjectPath>>(props, name)
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.as_str().to_owned())
        .collect()
}

impl DeviceView {
    fn from_properties(path: String, mut p: Properties) -> DeviceView {
        DeviceView {
            path,
            address: take(&mut p, "Address").unwrap_or_default(),
            vendor_id: take(&mut p, "VendorId").unwrap_or_default(),
            device_id: take(&mut p, "DeviceId").unwrap_or_default(),
            class: take(&mut p, "Class").unwrap_or_default(),
            name: take(&mut p, "Name").unwrap_or_default(),
            driver: take(&mut p, "Driver").unwrap_or_default(),
            host_driver: take(&mut p, "HostDriver").unwrap_or_default(),
            iommu_group: take(&mut p, "IommuGroup").unwrap_or(-1),
            state: take(&mut p, "State").unwrap_or_default(),
            owner: take(&mut p, "Owner").unwrap_or_default(),
            boot_vga: take(&mut p, "BootVga").unwrap_or_default(),
        }
    }

    pub fn pci_address(&self) -> Option<PciAddress> {
        self.address.parse().ok()
    }

    pub fn id(&self) -> String {
        format!("{:04x}:{:04x}", self.vendor_id, self.device_id)
    }
}

impl ProfileView {
    fn from_properties(path: String, mut p: Properties) -> ProfileView {
        ProfileView {
            path,
            name: take(&mut p, "Name").unwrap_or_default(),
            devices: paths(&mut p, "Devices"),
            state: take(&mut p, "State").unwrap_or_default(),
            owner: take(&mut p, "Owner").unwrap_or_default(),
            last_error: take(&mut p, "LastError").unwrap_or_default(),
        }
    }
}

impl Objects {
    pub fn from_managed(objects: ManagedObjects) -> Objects {
        let mut out = Objects::default();
        for (path, mut interfaces) in objects {
            let path = path.as_str().to_owned();
            // Intermediate nodes (/org/vfiod1/device) come with no interface.
            if let Some(props) = interfaces.remove(DEVICE_INTERFACE) {
                out.devices
                    .push(DeviceView::from_properties(path.clone(), props));
            }
            if let Some(props) = interfaces.remove(PROFILE_INTERFACE) {
                out.profiles.push(ProfileView::from_properties(path, props));
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
        self.profiles
            .iter()
            .find(|p| p.devices.contains(&device.path))
    }

    /// A profile's devices, in address order; paths vfiod did not list as
    /// devices are skipped.
    pub fn devices_of<'a>(
        &'a self,
        profile: &'a ProfileView,
    ) -> impl Iterator<Item = &'a DeviceView> {
        self.devices
            .iter()
            .filter(|d| profile.devices.contains(&d.path))
    }
}

/// The address in a device path (`/org/vfiod1/device/0000_01_00_0`), for
/// when the device itself could not be read.
pub fn address_from_path(path: &str) -> Option<String> {
    let last = path.rsplit('/').next()?;
    let parts: Vec<&str> = last.split('_').collect();
    let [domain, bus, device, function] = parts.as_slice() else {
        return None;
    };
    let address: PciAddress = format!("{domain}:{bus}:{device}.{function}").parse().ok()?;
    Some(address.to_string())
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use zbus::Variant;

    fn variant<'a>(v: impl Into<Variant<'a>>) -> OwnedVariant {
        OwnedVariant::try_from(v.into()).unwrap()
    }

    pub fn device_props(address: &str, driver: &str, state: &str, owner: &str) -> Properties {
        let mut p = Properties::new();
        p.insert("Address".into(), variant(address));
        p.insert("VendorId".into(), variant(0x1002u16));
        p.insert("DeviceId".into(), variant(0x67dfu16));
        p.insert("Class".into(), variant(0x030000u32));
        p.insert("Name".into(), variant("Ellesmere"));
        p.insert("Driver".into(), variant(driver));
        p.insert("HostDriver".into(), variant("amdgpu"));
        p.insert("IommuGroup".into(), variant(1i32));
        p.insert("State".into(), variant(state));
        p.insert("Owner".into(), variant(owner));
        p.insert("BootVga".into(), variant(false));
        p
    }

    pub fn profile_props(name: &str, devices: &[&str], state: &str) -> Properties {
        let mut p = Properties::new();
        p.insert("Name".into(), variant(name));
        let paths: Vec<zbus::ObjectPath<'_>> = devices
            .iter()
            .map(|d| zbus::ObjectPath::try_from(*d).unwrap())
            .collect();
        p.insert("Devices".into(), variant(paths));
        p.insert("State".into(), variant(state));
        p.insert("Owner".into(), variant(""));
        p.insert("LastError".into(), variant(""));
        p
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
            device_props("0000:01:00.1", "vfio-pci", "vfio", "win10"),
        );
        add(
            "/org/vfiod1/device/0000_01_00_0",
            DEVICE_INTERFACE,
            device_props("0000:01:00.0", "vfio-pci", "vfio", "win10"),
        );
        let mut usb = device_props("0000:04:00.0", "xhci_hcd", "host", "");
        usb.insert("IommuGroup".into(), variant(-1i32));
        usb.remove("BootVga");
        add("/org/vfiod1/device/0000_04_00_0", DEVICE_INTERFACE, usb);
        add(
            "/org/vfiod1/profile/rx580",
            PROFILE_INTERFACE,
            profile_props(
                "rx580",
                &[
                    "/org/vfiod1/device/0000_01_00_0",
                    "/org/vfiod1/device/0000_01_00_1",
                ],
                "vfio",
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
