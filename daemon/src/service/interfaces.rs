//! The bus interfaces. The manager is served here; a device or a profile
//! is described once in `vfiod_dbus::objects` and served from the
//! published view through [`DeviceAt`] and [`ProfileNamed`]. They hold no
//! logic of their own: every call goes through the bouncer, then to
//! [`Service`].

use std::collections::HashMap;
use std::sync::Arc;

use vfiod_dbus::{Direction, Error};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, interface};

use vfiod_pci::PciAddress;

use vfiod_dbus::objects::{
    DeviceProperties, DeviceSource, ProfileMoves, ProfileProperties, ProfileSource,
};

use super::Service;

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

    async fn check(
        &self,
        target: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<Vec<(String, String, String)>, Error> {
        self.service.check(connection, &header, &target).await
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

/// The device object at `address`: reads the published view.
pub struct DeviceAt {
    pub(super) service: Arc<Service>,
    pub(super) address: PciAddress,
}

impl DeviceSource for DeviceAt {
    fn read<T>(&self, f: impl FnOnce(&DeviceProperties) -> T) -> Option<T> {
        self.service.with_device(&self.address, f)
    }
}

/// The profile object named `name`: reads the published view; its Bind
/// and Release go through the bouncer like the manager's.
pub struct ProfileNamed {
    pub(super) service: Arc<Service>,
    pub(super) name: String,
}

impl ProfileSource for ProfileNamed {
    fn read<T>(&self, f: impl FnOnce(&ProfileProperties) -> T) -> Option<T> {
        self.service.with_profile(&self.name, f)
    }
}

impl ProfileMoves for ProfileNamed {
    async fn move_profile(
        &self,
        direction: Direction,
        options: HashMap<String, OwnedVariant>,
        header: &Header<'_>,
        connection: &Connection,
    ) -> Result<Vec<OwnedObjectPath>, Error> {
        self.service
            .move_request(connection, header, &self.name, direction, &options)
            .await
    }
}
