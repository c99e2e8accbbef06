//! The one place that decides who may move devices (DESIGN §4): reads are
//! open to everyone; Bind and Release need polkit action
//! `org.vfiod1.manage`. Root always passes. Without polkitd only root may
//! move devices, and on a simulated machine also the user running vfiod.
//! polkit is told what the move is (DESIGN §10: `profile`, `devices`, `vm`,
//! `direction`), so a rule can allow one group one profile.

use std::collections::HashMap;

use tracing::{debug, warn};
use vfiod_dbus::names::MANAGE_ACTION;
use vfiod_dbus::{Direction, Error};
use vfiod_pci::PciAddress;
use zbus::Connection;
use zbus::message::Header;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

/// What a caller asks to do, as polkit's rules see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveDetails {
    /// The profile named by the target; empty for a PCI address.
    pub profile: String,
    /// The completed set, as far as the published view tells.
    pub devices: Vec<PciAddress>,
    /// The `vm` option; empty when not given.
    pub vm: String,
    /// `bind` or `release`; empty for the simulator's controls.
    pub direction: Option<Direction>,
}

impl MoveDetails {
    /// The details polkit passes to rules (`action.lookup("profile")`).
    pub fn polkit_details(&self) -> HashMap<&'static str, String> {
        let devices: Vec<String> = self.devices.iter().map(ToString::to_string).collect();
        HashMap::from([
            ("profile", self.profile.clone()),
            ("devices", devices.join(",")),
            ("vm", self.vm.clone()),
            (
                "direction",
                self.direction.map(|d| d.to_string()).unwrap_or_default(),
            ),
        ])
    }
}

pub struct Bouncer {
    /// The user running a simulated vfiod: it owns the simulated machine.
    machine_owner: Option<u32>,
}

impl Bouncer {
    /// On the real host: root and polkit.
    pub fn for_host() -> Bouncer {
        Bouncer {
            machine_owner: None,
        }
    }

    /// On a simulated machine: also the user who runs vfiod.
    pub fn for_simulation(owner_uid: u32) -> Bouncer {
        Bouncer {
            machine_owner: Some(owner_uid),
        }
    }

    /// Lets the caller of a moving method in, or says why not.
    pub async fn authorize_move(
        &self,
        connection: &Connection,
        header: &Header<'_>,
        details: &MoveDetails,
    ) -> Result<(), Error> {
        let uid = self.caller_uid(connection, header).await?;
        if self.trusts(uid) {
            return Ok(());
        }
        self.ask_polkit(connection, header, uid, details).await
    }

    /// Whether the caller may move devices at all, asked without any
    /// password prompt: what a Check may tell it depends on it.
    pub async fn may_move(&self, connection: &Connection, header: &Header<'_>) -> bool {
        match self.caller_uid(connection, header).await {
            Ok(uid) if self.trusts(uid) => true,
            Ok(uid) => self
                .polkit_verdict(
                    connection,
                    header,
                    uid,
                    &MoveDetails::default(),
                    CheckAuthorizationFlags::empty(),
                )
                .await
                .is_ok(),
            Err(_) => false,
        }
    }

    /// Who called, from the bus (one round trip).
    pub async fn caller_uid(
        &self,
        connection: &Connection,
        header: &Header<'_>,
    ) -> Result<u32, Error> {
        let sender = header
            .sender()
            .ok_or_else(|| Error::AccessDenied("the call carries no sender".into()))?;
        let dbus = zbus::fdo::DBusProxy::new(connection).await?;
        dbus.get_connection_unix_user(sender.clone().into())
            .await
            .map_err(|e| Error::AccessDenied(format!("cannot tell who {sender} is: {e}")))
    }

    /// Root, and on a simulated machine the user running it, may move
    /// devices without asking polkit.
    pub fn trusts(&self, uid: u32) -> bool {
        let trusted = uid == 0 || Some(uid) == self.machine_owner;
        if trusted {
            debug!(uid, "authorized without polkit");
        }
        trusted
    }

    /// polkit's answer for a caller the bouncer does not trust itself.
    pub async fn ask_polkit(
        &self,
        connection: &Connection,
        header: &Header<'_>,
        uid: u32,
        details: &MoveDetails,
    ) -> Result<(), Error> {
        let flags = CheckAuthorizationFlags::ALLOW_USER_INTERACTION;
        self.polkit_verdict(connection, header, uid, details, flags)
            .await
    }

    async fn polkit_verdict(
        &self,
        connection: &Connection,
        header: &Header<'_>,
        uid: u32,
        details: &MoveDetails,
        flags: CheckAuthorizationFlags,
    ) -> Result<(), Error> {
        let sender = header
            .sender()
            .ok_or_else(|| Error::AccessDenied("the call carries no sender".into()))?;
        let subject = Subject::new_for_message_header(header).map_err(|e| {
            Error::AccessDenied(format!("cannot build a polkit subject for {sender}: {e}"))
        })?;
        let authority = AuthorityProxy::builder(connection)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let details = details.polkit_details();
        let details: HashMap<&str, &str> = details.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match authority
            .check_authorization(&subject, MANAGE_ACTION, &details, flags, "")
            .await
        {
            Ok(result) if result.is_authorized => Ok(()),
            Ok(_) => Err(Error::AccessDenied(format!(
                "uid {uid} is not authorized for {MANAGE_ACTION} (polkit said no)"
            ))),
            Err(e) if polkit_absent(&e) => Err(Error::AccessDenied(format!(
                "only root may move devices: polkitd is not running to authorize uid {uid}"
            ))),
            Err(e) => {
                warn!(uid, error = %e, "polkit check failed");
                Err(Error::AccessDenied(format!(
                    "polkit could not authorize uid {uid}: {e}"
                )))
            }
        }
    }
}

fn polkit_absent(e: &zbus::Error) -> bool {
    match e {
        zbus::Error::MethodError(name, _, _) => matches!(
            name.as_str(),
            "org.freedesktop.DBus.Error.ServiceUnknown"
                | "org.freedesktop.DBus.Error.NameHasNoOwner"
                | "org.freedesktop.DBus.Error.Spawn.ServiceNotFound"
        ),
        zbus::Error::FDO(e) => matches!(
            **e,
            zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_)
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_trusted_everywhere_and_the_machine_owner_only_on_its_simulation() {
        let host = Bouncer::for_host();
        assert!(host.trusts(0));
        assert!(!host.trusts(1000));
        let simulation = Bouncer::for_simulation(1000);
        assert!(simulation.trusts(0));
        assert!(simulation.trusts(1000));
        assert!(!simulation.trusts(1001));
    }

    #[test]
    fn polkit_hears_each_detail_by_its_contract_name() {
        let details = MoveDetails {
            profile: "rx580".into(),
            devices: vec![
                "0000:01:00.0".parse().unwrap(),
                "0000:01:00.1".parse().unwrap(),
            ],
            vm: "win10".into(),
            direction: Some(Direction::Release),
        };
        let map = details.polkit_details();
        assert_eq!(map.len(), 4);
        assert_eq!(map["profile"], "rx580");
        assert_eq!(map["devices"], "0000:01:00.0,0000:01:00.1");
        assert_eq!(map["vm"], "win10");
        assert_eq!(map["direction"], "release");
        let simulator = MoveDetails::default().polkit_details();
        assert!(simulator.values().all(String::is_empty), "{simulator:?}");
    }

    #[test]
    fn only_a_missing_polkitd_counts_as_absent() {
        let absent = zbus::Error::FDO(Box::new(zbus::fdo::Error::ServiceUnknown(
            "org.freedesktop.PolicyKit1".into(),
        )));
        assert!(polkit_absent(&absent));
        let refused = zbus::Error::FDO(Box::new(zbus::fdo::Error::AccessDenied("no".into())));
        assert!(!polkit_absent(&refused));
        assert!(!polkit_absent(&zbus::Error::InvalidReply));
    }
}
