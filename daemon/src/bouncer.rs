//! The one place that decides who may move devices (DESIGN §4): reads are
//! open to everyone; Bind and Release need polkit action
//! `org.vfiod1.manage`. Root always passes. Without polkitd only root may
//! move devices, and on a simulated machine also the user running vfiod.

use std::collections::HashMap;

use tracing::{debug, warn};
use vfiod_dbus::Error;
use vfiod_dbus::names::MANAGE_ACTION;
use zbus::Connection;
use zbus::message::Header;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

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
    ) -> Result<(), Error> {
        let uid = self.caller_uid(connection, header).await?;
        if self.trusts(uid) {
            return Ok(());
        }
        self.ask_polkit(connection, header, uid).await
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
        let details: HashMap<&str, &str> = HashMap::new();
        match authority
            .check_authorization(
                &subject,
                MANAGE_ACTION,
                &details,
                CheckAuthorizationFlags::ALLOW_USER_INTERACTION,
                "",
            )
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
