//! `org.vfiod1.Device` and `org.vfiod1.Profile`, each described once
//! (DESIGN §4): [`bus_object!`] turns one list of properties — field, type,
//! bus name, whether it ever changes — into the value the daemon publishes
//! and vfioctl reads ([`DeviceProperties`], [`ProfileProperties`]), the
//! server interface the daemon registers ([`DeviceObject`],
//! [`ProfileObject`]) and the client proxies ([`DeviceProxy`],
//! [`ProfileProxy`]). A property added, renamed or retyped here changes all
//! of them at once; none can drift from another.

use std::collections::HashMap;
use std::future::Future;

use vfiod_pci::PciAddress;
use zbus::message::Header;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant};

use crate::names::{address_from_device_path, device_object_path};
use crate::{DeviceHealth, DeviceState, Direction, Error, ProfileState};

/// How a property's value travels: its D-Bus type, and back.
pub trait Wire: Sized {
    type Repr: Into<Variant<'static>> + TryFrom<OwnedVariant>;
    fn to_wire(&self) -> Self::Repr;
    /// `None` for a value this side cannot understand (a newer daemon's).
    fn from_wire(repr: Self::Repr) -> Option<Self>;
}

macro_rules! wire_as_itself {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            type Repr = $t;
            fn to_wire(&self) -> $t {
                self.clone()
            }
            fn from_wire(repr: $t) -> Option<$t> {
                Some(repr)
            }
        }
    )*};
}

wire_as_itself!(String, u16, u32, i32, bool);

macro_rules! wire_as_name {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            type Repr = String;
            fn to_wire(&self) -> String {
                self.as_str().to_owned()
            }
            fn from_wire(repr: String) -> Option<$t> {
                repr.parse().ok()
            }
        }
    )*};
}

wire_as_name!(DeviceState, DeviceHealth, ProfileState);

/// A profile's devices travel as their object paths.
impl Wire for Vec<PciAddress> {
    type Repr = Vec<OwnedObjectPath>;
    fn to_wire(&self) -> Vec<OwnedObjectPath> {
        self.iter().map(device_object_path).collect()
    }
    fn from_wire(paths: Vec<OwnedObjectPath>) -> Option<Vec<PciAddress>> {
        paths
            .iter()
            .map(|p| address_from_device_path(p.as_str()))
            .collect()
    }
}

/// One object's description: see the module documentation. Each property
/// is `field: Type = default => "BusName" (emits_changed_signal)`, with
/// `"const"` for what never changes while the object lives.
macro_rules! bus_object {
    (
        $(#[$doc:meta])*
        properties $props:ident of $iface:literal,
        served by $server:ident<S: $bound:ident> reading $source:ident,
        proxy $proxy:ident $(with $moves:ident)?;
        $(
            $(#[$fdoc:meta])*
            $field:ident: $ty:ty = $default:expr => $name:tt ($emits:tt);
        )*
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $props {
            $( $(#[$fdoc])* pub $field: $ty, )*
        }

        impl Default for $props {
            fn default() -> Self {
                $props { $( $field: $default, )* }
            }
        }

        impl $props {
            /// The bus names of the properties, in order.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            /// Name -> value of every property, as GetAll answers.
            pub fn all(&self) -> HashMap<&'static str, Variant<'static>> {
                let mut all = HashMap::new();
                $( all.insert($name, Wire::to_wire(&self.$field).into()); )*
                all
            }

            /// Name -> value of every property that differs from `old`.
            pub fn changes(&self, old: &Self) -> HashMap<&'static str, Variant<'static>> {
                let mut changed = HashMap::new();
                $(
                    if self.$field != old.$field {
                        changed.insert($name, Wire::to_wire(&self.$field).into());
                    }
                )*
                changed
            }

            /// From a GetAll or GetManagedObjects answer. A property that is
            /// missing or cannot be understood keeps its default, so an
            /// older or newer daemon still lists.
            pub fn from_properties(mut properties: HashMap<String, OwnedVariant>) -> Self {
                let mut props = Self::default();
                $(
                    if let Some(value) = properties
                        .remove($name)
                        .and_then(|v| <$ty as Wire>::Repr::try_from(v).ok())
                        .and_then(<$ty as Wire>::from_wire)
                    {
                        props.$field = value;
                    }
                )*
                props
            }
        }

        /// Where a served object reads its properties: the daemon's
        /// published view. `None` once the object is gone from it.
        pub trait $source: Send + Sync + 'static {
            fn read<T>(&self, f: impl FnOnce(&$props) -> T) -> Option<T>;
        }

        /// The object as the daemon registers it.
        pub struct $server<S>(pub S);

        impl<S: $source> $server<S> {
            /// A property's value on the wire; an object that outlived its
            /// entry (between a removal and its unregistering) reads as
            /// the defaults.
            fn wire<R>(&self, f: impl Fn(&$props) -> R) -> R {
                self.0.read(&f).unwrap_or_else(|| f(&$props::default()))
            }
        }

        #[zbus::interface(name = $iface)]
        impl<S: $bound> $server<S> {
            // With `moves`: Bind and Release, which move the object's profile.
            $(
                #[doc = concat!("Binds this profile (", stringify!($moves), " it to vfio-pci).")]
                async fn bind(
                    &self,
                    options: HashMap<String, OwnedVariant>,
                    #[zbus(header)] header: Header<'_>,
                    #[zbus(connection)] connection: &Connection,
                ) -> Result<Vec<OwnedObjectPath>, Error> {
                    self.0.move_profile(Direction::Bind, options, &header, connection).await
                }

                /// Releases this profile (moves it back to its host drivers).
                async fn release(
                    &self,
                    options: HashMap<String, OwnedVariant>,
                    #[zbus(header)] header: Header<'_>,
                    #[zbus(connection)] connection: &Connection,
                ) -> Result<Vec<OwnedObjectPath>, Error> {
                    self.0.move_profile(Direction::Release, options, &header, connection).await
                }
            )?
            $(
                #[zbus(property(emits_changed_signal = $emits), name = $name)]
                fn $field(&self) -> <$ty as Wire>::Repr {
                    self.wire(|p| Wire::to_wire(&p.$field))
                }
            )*
        }

        #[zbus::proxy(interface = $iface, default_service = "org.vfiod1")]
        pub trait $proxy {
            $(
                #[doc = concat!("Binds this profile (", stringify!($moves), " it to vfio-pci).")]
                fn bind(&self, options: crate::proxy::Options<'_>)
                    -> Result<Vec<OwnedObjectPath>, Error>;
                /// Releases this profile (moves it back to its host drivers).
                fn release(&self, options: crate::proxy::Options<'_>)
                    -> Result<Vec<OwnedObjectPath>, Error>;
            )?
            $(
                #[zbus(property, name = $name)]
                fn $field(&self) -> zbus::Result<<$ty as Wire>::Repr>;
            )*
        }
    };
}

bus_object! {
    /// An `org.vfiod1.Device`: one PCI function.
    properties DeviceProperties of "org.vfiod1.Device",
    served by DeviceObject<S: DeviceSource> reading DeviceSource,
    proxy Device;
    address: String = String::new() => "Address" ("const");
    vendor_id: u16 = 0 => "VendorId" ("const");
    device_id: u16 = 0 => "DeviceId" ("const");
    class: u32 = 0 => "Class" ("const");
    name: String = String::new() => "Name" ("const");
    driver: String = String::new() => "Driver" ("true");
    host_driver: String = String::new() => "HostDriver" ("true");
    /// -1: no IOMMU group.
    iommu_group: i32 = -1 => "IommuGroup" ("true");
    state: DeviceState = DeviceState::Unbound => "State" ("true");
    /// The `vm` given at bind; empty otherwise.
    owner: String = String::new() => "Owner" ("true");
    boot_vga: bool = false => "BootVga" ("const");
    /// The kernel's `reset_method` (e.g. `flr bus`); empty when it has none
    /// or shows none (kernels before 5.15).
    reset_method: String = String::new() => "ResetMethod" ("true");
    /// What vfiod's last health check found (DESIGN §10).
    health: DeviceHealth = DeviceHealth::Unknown => "Health" ("true");
}

bus_object! {
    /// An `org.vfiod1.Profile`: a named set of devices from the config.
    properties ProfileProperties of "org.vfiod1.Profile",
    served by ProfileObject<S: ProfileMoves> reading ProfileSource,
    proxy Profile with moves;
    name: String = String::new() => "Name" ("const");
    devices: Vec<PciAddress> = Vec::new() => "Devices" ("true");
    state: ProfileState = ProfileState::Error => "State" ("true");
    owner: String = String::new() => "Owner" ("true");
    last_error: String = String::new() => "LastError" ("true");
}

impl DeviceProperties {
    /// `vvvv:dddd`.
    pub fn id(&self) -> String {
        format!("{:04x}:{:04x}", self.vendor_id, self.device_id)
    }

    pub fn pci_address(&self) -> Option<PciAddress> {
        self.address.parse().ok()
    }
}

/// What a profile object's Bind and Release do: move that profile.
pub trait ProfileMoves: ProfileSource {
    fn move_profile(
        &self,
        direction: Direction,
        options: HashMap<String, OwnedVariant>,
        header: &Header<'_>,
        connection: &Connection,
    ) -> impl Future<Output = Result<Vec<OwnedObjectPath>, Error>> + Send;
}

#[cfg(test)]
mod tests {
    use zbus::object_server::Interface;

    use super::*;

    struct Fixed(DeviceProperties);

    impl DeviceSource for Fixed {
        fn read<T>(&self, f: impl FnOnce(&DeviceProperties) -> T) -> Option<T> {
            Some(f(&self.0))
        }
    }

    fn gpu() -> DeviceProperties {
        DeviceProperties {
            address: "0000:01:00.0".into(),
            vendor_id: 0x1002,
            device_id: 0x67df,
            class: 0x030000,
            name: "Ellesmere".into(),
            driver: "vfio-pci".into(),
            host_driver: "amdgpu".into(),
            iommu_group: 1,
            state: DeviceState::Vfio,
            owner: "win10".into(),
            boot_vga: false,
            reset_method: "device_specific".into(),
            health: DeviceHealth::Unknown,
        }
    }

    fn wire(all: HashMap<&'static str, Variant<'static>>) -> HashMap<String, OwnedVariant> {
        all.into_iter()
            .map(|(k, v)| (k.to_owned(), OwnedVariant::try_from(v).unwrap()))
            .collect()
    }

    #[test]
    fn what_the_daemon_publishes_is_what_the_client_reads() {
        let published = gpu();
        assert_eq!(
            DeviceProperties::from_properties(wire(published.all())),
            published
        );
        let profile = ProfileProperties {
            name: "rx-580".into(),
            devices: vec!["0000:01:00.0".parse().unwrap()],
            state: ProfileState::Mixed,
            owner: String::new(),
            last_error: "boom".into(),
        };
        assert_eq!(
            ProfileProperties::from_properties(wire(profile.all())),
            profile
        );
    }

    #[test]
    fn state_travels_as_its_contract_name_and_devices_as_paths() {
        let all = gpu().all();
        assert_eq!(all["State"], Variant::from("vfio"));
        let profile = ProfileProperties {
            devices: vec!["0000:01:00.1".parse().unwrap()],
            ..ProfileProperties::default()
        };
        let paths = Vec::<OwnedObjectPath>::try_from(
            OwnedVariant::try_from(profile.all().remove("Devices").unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!(paths[0].as_str(), "/org/vfiod1/device/0000_01_00_1");
    }

    #[test]
    fn a_missing_or_unknown_value_keeps_its_default() {
        let mut properties = wire(gpu().all());
        properties.remove("IommuGroup");
        properties.insert("State".into(), OwnedVariant::from(7u32));
        properties.insert("Novel".into(), OwnedVariant::from(true));
        let read = DeviceProperties::from_properties(properties);
        assert_eq!(read.iommu_group, -1);
        assert_eq!(read.state, DeviceState::Unbound);
        assert_eq!(read.driver, "vfio-pci");
    }

    #[test]
    fn changes_name_only_what_changed() {
        let before = gpu();
        let mut after = gpu();
        after.state = DeviceState::Moving;
        after.owner.clear();
        let changed = after.changes(&before);
        let mut names: Vec<&str> = changed.keys().copied().collect();
        names.sort();
        assert_eq!(names, ["Owner", "State"]);
        assert!(before.changes(&before).is_empty());
    }

    /// The served interface has exactly the described properties, with
    /// the wire types and change signals the description gives.
    #[test]
    fn the_served_interface_is_the_description() {
        let mut xml = String::new();
        DeviceObject(Fixed(gpu())).introspect_to_writer(&mut xml, 0);
        let properties: Vec<&str> = xml
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("<property "))
            .collect();
        assert_eq!(properties.len(), DeviceProperties::NAMES.len(), "{xml}");
        for (name, signature) in [
            ("Address", "s"),
            ("VendorId", "q"),
            ("DeviceId", "q"),
            ("Class", "u"),
            ("IommuGroup", "i"),
            ("State", "s"),
            ("BootVga", "b"),
            ("ResetMethod", "s"),
            ("Health", "s"),
        ] {
            let line = properties
                .iter()
                .find(|l| l.contains(&format!("name=\"{name}\"")))
                .unwrap_or_else(|| panic!("{name} missing: {xml}"));
            assert!(line.contains(&format!("type=\"{signature}\"")), "{line}");
        }
        assert!(
            xml.contains("org.freedesktop.DBus.Property.EmitsChangedSignal\" value=\"const\""),
            "{xml}"
        );
    }
}
