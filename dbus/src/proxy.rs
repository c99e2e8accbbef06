//! Client proxies for the three interfaces. The daemon's bus tests call
//! every method and property through these, so a proxy that drifted from
//! the server fails a test.

use std::collections::HashMap;

use zbus::{Message, OwnedObjectPath, Variant, proxy};

use crate::{Direction, Error};

/// `a{sv}` options of Bind and Release: `force` (b), `vm` (s), `timeout_ms` (u).
pub type Options<'a> = HashMap<&'a str, Variant<'a>>;

#[proxy(
    interface = "org.vfiod1.Manager",
    default_service = "org.vfiod1",
    default_path = "/org/vfiod1"
)]
pub trait Manager {
    fn bind(&self, target: &str, options: Options<'_>) -> Result<Vec<OwnedObjectPath>, Error>;
    fn release(&self, target: &str, options: Options<'_>) -> Result<Vec<OwnedObjectPath>, Error>;
    fn check(&self, target: &str) -> Result<Vec<(String, String, String)>, Error>;

    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn profiles(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    #[zbus(property)]
    fn devices(&self) -> zbus::Result<Vec<OwnedObjectPath>>;

    #[zbus(signal)]
    fn transition_started(&self, target: String, direction: String) -> zbus::Result<()>;
    #[zbus(signal)]
    fn transition_progress(&self, target: String, device: String, step: String)
    -> zbus::Result<()>;
    #[zbus(signal)]
    fn transition_finished(
        &self,
        target: String,
        direction: String,
        error: String,
    ) -> zbus::Result<()>;
}

impl ManagerProxy<'_> {
    /// Bind or Release, with the reply itself: its sender is vfiod's
    /// unique name, which vouches for what vfiod sent the caller alone
    /// just before answering (every property of each moved device).
    pub async fn move_answered(
        &self,
        direction: Direction,
        target: &str,
        options: Options<'_>,
    ) -> Result<(Vec<OwnedObjectPath>, Message), Error> {
        let method = match direction {
            Direction::Bind => "Bind",
            Direction::Release => "Release",
        };
        let reply = self.inner().call_method(method, &(target, options)).await?;
        let devices = reply.body().deserialize()?;
        Ok((devices, reply))
    }
}

pub use crate::objects::{DeviceProxy, ProfileProxy};
