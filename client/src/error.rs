//! Why a command did not succeed, and the exit status that says so
//! (DESIGN §5: 0 done, 1 refused or failed, 2 usage, 3 unreachable, 4 denied).

use std::fmt;
use std::process::ExitCode;

/// The exit status of `vfioctl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exit {
    Done = 0,
    Failed = 1,
    Usage = 2,
    Unreachable = 3,
    Denied = 4,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// Bus errors that mean nobody answers for org.vfiod1.
const UNREACHABLE: &[&str] = &[
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoServer",
    "org.freedesktop.DBus.Error.Disconnected",
    // The daemon left the bus while our call was pending.
    "org.freedesktop.DBus.Error.NoReply",
];
const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
/// What vfiod_dbus::Error makes of a zbus error that came from no peer.
const FAILED: &str = "org.freedesktop.DBus.Error.Failed";

/// A failure as shown to the user: the error name (a D-Bus error name, or
/// `vfioctl.*` for what went wrong here), a message, and the exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub exit: Exit,
    pub name: String,
    pub message: String,
}

impl Failure {
    pub fn new(exit: Exit, name: impl Into<String>, message: impl Into<String>) -> Failure {
        Failure {
            exit,
            name: name.into(),
            message: message.into(),
        }
    }

    /// A failure of this process (a file it could not read, ...): exit 1.
    pub fn local(name: &str, message: impl Into<String>) -> Failure {
        Failure::new(Exit::Failed, format!("vfioctl.{name}"), message)
    }

    /// Bad input the user gave: exit 2.
    pub fn usage(name: &str, message: impl Into<String>) -> Failure {
        Failure::new(Exit::Usage, format!("vfioctl.{name}"), message)
    }

    /// The system bus itself could not be reached.
    pub fn no_bus(error: &zbus::Error) -> Failure {
        Failure::new(
            Exit::Unreachable,
            "vfioctl.Unreachable",
            format!("cannot connect to the system bus: {error}"),
        )
    }

    /// An error of a call to vfiod. `connection_closed` tells a transport
    /// failure (which vfiod_dbus folds into `Error.Failed`) from a daemon
    /// that answered `Failed`.
    pub fn from_dbus(error: &vfiod_dbus::Error, connection_closed: bool) -> Failure {
        let name = error.dbus_name();
        let message = error.message();
        let exit = if name == ACCESS_DENIED {
            Exit::Denied
        } else if UNREACHABLE.contains(&name)
            || name.starts_with("org.freedesktop.DBus.Error.Spawn.")
            || (name == FAILED && connection_closed)
        {
            Exit::Unreachable
        } else {
            Exit::Failed
        };
        let message = if exit == Exit::Unreachable {
            format!("vfiod is not reachable on the system bus: {message}")
        } else {
            message.to_owned()
        };
        Failure::new(exit, name, message)
    }

    /// The last component of the name, as shown on stderr
    /// (`org.vfiod1.Error.Protected` -> `Protected`).
    pub fn short_name(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or(&self.name)
    }

    /// `{"name": ..., "message": ...}`
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "name": self.name, "message": self.message })
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.short_name(), self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfiod_dbus::Error;

    fn exit_of(e: Error) -> Exit {
        Failure::from_dbus(&e, false).exit
    }

    #[test]
    fn daemon_refusals_exit_1() {
        for e in [
            Error::UnknownTarget("m".into()),
            Error::GroupNotViable("m".into()),
            Error::DeviceBusy("m".into()),
            Error::Protected("m".into()),
            Error::NoIommu("m".into()),
            Error::Timeout("m".into()),
            Error::Kernel("m".into()),
            Error::Conflict("m".into()),
            Error::InvalidConfig("m".into()),
            Error::InvalidArgs("m".into()),
        ] {
            assert_eq!(exit_of(e.clone()), Exit::Failed, "{e:?}");
        }
        // A daemon that answers Failed is still a daemon that answered.
        let failed = Error::from_dbus(FAILED, "boom");
        assert_eq!(Failure::from_dbus(&failed, false).exit, Exit::Failed);
        let unknown = Error::from_dbus("org.freedesktop.DBus.Error.UnknownMethod", "no Bind");
        assert_eq!(exit_of(unknown), Exit::Failed);
    }

    #[test]
    fn access_denied_exits_4() {
        assert_eq!(
            exit_of(Error::AccessDenied("polkit said no".into())),
            Exit::Denied
        );
        let from_bus = Error::from_dbus(ACCESS_DENIED, "Rejected send message");
        assert_eq!(exit_of(from_bus), Exit::Denied);
    }

    #[test]
    fn a_missing_daemon_or_bus_exits_3() {
        for name in [
            "org.freedesktop.DBus.Error.ServiceUnknown",
            "org.freedesktop.DBus.Error.NameHasNoOwner",
            "org.freedesktop.DBus.Error.NoReply",
            "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
        ] {
            let f = Failure::from_dbus(
                &Error::from_dbus(name, "The name org.vfiod1 was not provided"),
                false,
            );
            assert_eq!(f.exit, Exit::Unreachable, "{name}");
        }
        // A transport error during a call: vfiod_dbus folds it into Failed.
        let transport: Error =
            zbus::Error::InputOutput(std::io::Error::from(std::io::ErrorKind::BrokenPipe).into())
                .into();
        assert_eq!(Failure::from_dbus(&transport, true).exit, Exit::Unreachable);
        let io =
            zbus::Error::InputOutput(std::io::Error::from(std::io::ErrorKind::NotFound).into());
        assert_eq!(Failure::no_bus(&io).exit, Exit::Unreachable);
    }

    #[test]
    fn shows_the_last_component_of_the_name() {
        let f = Failure::from_dbus(
            &Error::Protected("cannot bind 00:14.0: keyboard".into()),
            false,
        );
        assert_eq!(f.to_string(), "Protected: cannot bind 00:14.0: keyboard");
        assert_eq!(f.name, "org.vfiod1.Error.Protected");
        assert_eq!(
            f.to_json(),
            serde_json::json!({"name": "org.vfiod1.Error.Protected", "message": "cannot bind 00:14.0: keyboard"})
        );
        assert_eq!(
            Failure::usage("InvalidXml", "x").to_string(),
            "InvalidXml: x"
        );
        assert_eq!(Failure::usage("InvalidXml", "x").exit, Exit::Usage);
    }
}
