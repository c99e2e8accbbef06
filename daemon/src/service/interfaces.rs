//! The three bus interfaces. They hold no logic of their own: every call
//! goes through the bouncer, then to [`Service`].

use std::collections::HashMap;
use std::sync::Arc;

use vfiod_dbus::{Direction, Error};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, interface};

use vfiod_pci::PciAddress;

use super::objects::{DeviceProps, ProfileProps};
use super::{Service, device_object_path};

pub struct ManagerInterface {
    pub(super) service: Arc<Service>,
}

#[interface(name = "org.vfiod1.Manager")]
impl ManagerInterface {
    async fn bind(
        &self,
        target: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<Vec<OwnedObjectPath>, Error> {
        self.service
            .move_request(connection, &header, &target, Direction::Bind, &options)
            .await
    }

    async fn release(
        &self,
        target: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<Vec<OwnedObjectPath>, Error> {
        self.service
            .move_request(connection, &header, &target, Direction::Release, &options)
            .await
    }

    async fn check(&self, target: String) -> Result<Vec<(String, String, String)>, Error> {
        self.service.check(&target).await
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    #[zbus(property)]
    fn profiles(&self) -> Vec<OwnedObjectPath> {
        self.service.profile_paths()
    }

    #[zbus(property)]
    fn devices(&self) -> Vec<OwnedObjectPath> {
        self.service.device_paths()
    }

    #[zbus(signal)]
    pub async fn transition_started(
        emitter: &SignalEmitter<'_>,
        target: &str,
        direction: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn transition_progress(
        emitter: &SignalEmitter<'_>,
        target: &str,
        device: &str,
        step: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn transition_finished(
        emitter: &SignalEmitter<'_>,
        target: &str,
        direction: &str,
        error: &str,
    ) -> zbus::Result<()>;
}

pub struct DeviceInterface {
    pub(super) service: Arc<Service>,
    pub(super) address: PciAddress,
}

impl DeviceInterface {
    /// A device object outlives its entry only between a removal and the
    /// object's unregistering; it then reads as empty.
    fn read<T: Default>(&self, f: impl FnOnce(&DeviceProps) -> T) -> T {
        self.service
            .with_device(&self.address, f)
            .unwrap_or_default()
    }
}

#[interface(name = "org.vfiod1.Device")]
impl DeviceInterface {
    #[zbus(property(emits_changed_signal = "const"))]
    fn address(&self) -> String {
        self.address.to_string()
    }
    #[zbus(property(emits_changed_signal = "const"))]
    fn vendor_id(&self) -> u16 {
        self.read(|d| d.vendor_id)
    }
    #[zbus(property(emits_changed_signal = "const"))]
    fn device_id(&self) -> u16 {
        self.read(|d| d.device_id)
    }
    #[zbus(property(emits_changed_signal = "const"))]
    fn class(&self) -> u32 {
        self.read(|d| d.class)
    }
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.read(|d| d.name.clone())
    }
    #[zbus(property)]
    fn driver(&self) -> String {
        self.read(|d| d.driver.clone())
    }
    #[zbus(property)]
    fn host_driver(&self) -> String {
        self.read(|d| d.host_driver.clone())
    }
    #[zbus(property)]
    fn iommu_group(&self) -> i32 {
        self.service
            .with_device(&self.address, |d| d.iommu_group)
            .unwrap_or(-1)
    }
    #[zbus(property)]
    fn state(&self) -> String {
        self.read(|d| d.state.clone())
    }
    #[zbus(property)]
    fn owner(&self) -> String {
        self.read(|d| d.owner.clone())
    }
    #[zbus(property(emits_changed_signal = "const"), name = "BootVga")]
    fn boot_vga(&self) -> bool {
        self.read(|d| d.boot_vga)
    }
}

pub struct ProfileInterface {
    pub(super) service: Arc<Service>,
    pub(super) name: String,
}

impl ProfileInterface {
    fn read<T: Default>(&self, f: impl FnOnce(&ProfileProps) -> T) -> T {
        self.service.with_profile(&self.name, f).unwrap_or_default()
    }
}

#[interface(name = "org.vfiod1.Profile")]
impl ProfileInterface {
    async fn bind(
        &self,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<Vec<OwnedObjectPath>, Error> {
        self.service
            .move_request(connection, &header, &self.name, Direction::Bind, &options)
            .await
    }

    async fn release(
        &self,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<Vec<OwnedObjectPath>, Error> {
        self.service
            .move_request(
                connection,
                &header,
                &self.name,
                Direction::Release,
                &options,
            )
            .await
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.name.clone()
    }
    #[zbus(property)]
    fn devices(&self) -> Vec<OwnedObjectPath> {
        self.read(|p| p.devices.iter().map(device_object_path).collect())
    }
    #[zbus(property)]
    fn state(&self) -> String {
        self.read(|p| p.state.clone())
    }
    #[zbus(property)]
    fn owner(&self) -> String {
        self.read(|p| p.owner.clone())
    }
    #[zbus(property)]
    fn last_error(&self) -> String {
        self.read(|p| p.last_error.clone())
    }
}
