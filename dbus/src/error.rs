use zbus::DBusError;
use zbus::message::{Header, Message};
use zbus::names::ErrorName;

/// The one error domain of vfiod. Each variant is exactly one D-Bus error
/// name (DESIGN §4); the message names the devices and every reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    UnknownTarget(String),
    #[error("{0}")]
    GroupNotViable(String),
    #[error("{0}")]
    DeviceBusy(String),
    #[error("{0}")]
    Protected(String),
    #[error("{0}")]
    NoIommu(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Kernel(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InvalidConfig(String),
    /// Malformed arguments: `org.freedesktop.DBus.Error.InvalidArgs`.
    #[error("{0}")]
    InvalidArgs(String),
    /// `org.freedesktop.DBus.Error.AccessDenied`.
    #[error("{0}")]
    AccessDenied(String),
    /// Any other D-Bus failure (the bus or the daemon unreachable, ...).
    #[error("{name}: {message}")]
    Bus { name: String, message: String },
}

impl Error {
    /// The D-Bus error name of this variant.
    pub fn dbus_name(&self) -> &str {
        match self {
            Error::UnknownTarget(_) => "org.vfiod1.Error.UnknownTarget",
            Error::GroupNotViable(_) => "org.vfiod1.Error.GroupNotViable",
            Error::DeviceBusy(_) => "org.vfiod1.Error.DeviceBusy",
            Error::Protected(_) => "org.vfiod1.Error.Protected",
            Error::NoIommu(_) => "org.vfiod1.Error.NoIommu",
            Error::Timeout(_) => "org.vfiod1.Error.Timeout",
            Error::Kernel(_) => "org.vfiod1.Error.Kernel",
            Error::Conflict(_) => "org.vfiod1.Error.Conflict",
            Error::InvalidConfig(_) => "org.vfiod1.Error.InvalidConfig",
            Error::InvalidArgs(_) => "org.freedesktop.DBus.Error.InvalidArgs",
            Error::AccessDenied(_) => "org.freedesktop.DBus.Error.AccessDenied",
            Error::Bus { name, .. } => name,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Error::UnknownTarget(m)
            | Error::GroupNotViable(m)
            | Error::DeviceBusy(m)
            | Error::Protected(m)
            | Error::NoIommu(m)
            | Error::Timeout(m)
            | Error::Kernel(m)
            | Error::Conflict(m)
            | Error::InvalidConfig(m)
            | Error::InvalidArgs(m)
            | Error::AccessDenied(m) => m,
            Error::Bus { message, .. } => message,
        }
    }

    /// Rebuilds the typed error from a D-Bus error name and message.
    pub fn from_dbus(name: &str, message: &str) -> Error {
        let m = message.to_string();
        match name {
            "org.vfiod1.Error.UnknownTarget" => Error::UnknownTarget(m),
            "org.vfiod1.Error.GroupNotViable" => Error::GroupNotViable(m),
            "org.vfiod1.Error.DeviceBusy" => Error::DeviceBusy(m),
            "org.vfiod1.Error.Protected" => Error::Protected(m),
            "org.vfiod1.Error.NoIommu" => Error::NoIommu(m),
            "org.vfiod1.Error.Timeout" => Error::Timeout(m),
            "org.vfiod1.Error.Kernel" => Error::Kernel(m),
            "org.vfiod1.Error.Conflict" => Error::Conflict(m),
            "org.vfiod1.Error.InvalidConfig" => Error::InvalidConfig(m),
            "org.freedesktop.DBus.Error.InvalidArgs" => Error::InvalidArgs(m),
            "org.freedesktop.DBus.Error.AccessDenied" => Error::AccessDenied(m),
            other => Error::Bus {
                name: other.to_string(),
                message: m,
            },
        }
    }

    /// `name: message`, the form of the `error` field of TransitionFinished.
    pub fn to_signal_field(&self) -> String {
        format!("{}: {}", self.dbus_name(), self.message())
    }
}

impl DBusError for Error {
    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<Message> {
        Message::error(call, self.name()).build(&(self.message(),))
    }

    fn name(&self) -> ErrorName<'_> {
        ErrorName::try_from(self.dbus_name()).unwrap_or_else(|_| {
            ErrorName::from_static_str_unchecked("org.freedesktop.DBus.Error.Failed")
        })
    }

    fn description(&self) -> Option<&str> {
        Some(self.message())
    }
}

impl From<zbus::Error> for Error {
    fn from(e: zbus::Error) -> Error {
        match e {
            zbus::Error::MethodError(name, message, _) => {
                Error::from_dbus(name.as_str(), message.as_deref().unwrap_or(""))
            }
            // A method timeout: nobody answered (e.g. a dead daemon that
            // still owns its name).
            zbus::Error::InputOutput(e) if e.kind() == std::io::ErrorKind::TimedOut => Error::Bus {
                name: "org.freedesktop.DBus.Error.NoReply".into(),
                message: format!("no answer: {e}"),
            },
            zbus::Error::FDO(e) => {
                Error::from_dbus(e.name().as_str(), e.description().unwrap_or(""))
            }
            other => Error::Bus {
                name: "org.freedesktop.DBus.Error.Failed".into(),
                message: other.to_string(),
            },
        }
    }
}

impl From<zbus::fdo::Error> for Error {
    fn from(e: zbus::fdo::Error) -> Error {
        match e {
            // A local failure (a timeout, a lost connection), not an answer.
            zbus::fdo::Error::ZBus(inner) => inner.into(),
            other => Error::from_dbus(other.name().as_str(), other.description().unwrap_or("")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let all = [
            Error::UnknownTarget("a".into()),
            Error::GroupNotViable("a".into()),
            Error::DeviceBusy("a".into()),
            Error::Protected("a".into()),
            Error::NoIommu("a".into()),
            Error::Timeout("a".into()),
            Error::Kernel("a".into()),
            Error::Conflict("a".into()),
            Error::InvalidConfig("a".into()),
            Error::InvalidArgs("a".into()),
            Error::AccessDenied("a".into()),
        ];
        let mut names = std::collections::BTreeSet::new();
        for e in all {
            assert!(names.insert(e.dbus_name().to_string()));
            assert_eq!(Error::from_dbus(e.dbus_name(), e.message()), e);
            assert_eq!(DBusError::name(&e).as_str(), e.dbus_name());
        }
    }
}
