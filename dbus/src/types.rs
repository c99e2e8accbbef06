use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The way a move goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Host driver -> vfio-pci.
    Bind,
    /// vfio-pci -> host driver.
    Release,
}

/// `State` of an `org.vfiod1.Device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    Host,
    Vfio,
    Unbound,
    Moving,
    Stuck,
}

/// `Health` of an `org.vfiod1.Device` (DESIGN §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceHealth {
    /// On its host driver, or found alive by the last check.
    Ok,
    /// Not checked since a VM may have had it (on vfio-pci).
    Unknown,
    /// Its host driver let go of it, or failed, right after vfiod gave it
    /// back: it did not come back healthy from its VM.
    ResetFailed,
    /// Its config space is dead and nothing brought it back.
    Dead,
}

/// `State` of an `org.vfiod1.Profile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileState {
    Host,
    Vfio,
    Mixed,
    Moving,
    Error,
}

/// Severity of a doctor finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Warn,
    Fail,
}

/// One finding of `Check`: `(id, severity, message)` on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub id: String,
    pub severity: Severity,
    pub message: String,
}

macro_rules! wire_names {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),* }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok(Self::$v),)*
                    other => Err(format!("unknown {} {other:?}", stringify!($t))),
                }
            }
        }
    };
}

wire_names!(Direction { Bind => "bind", Release => "release" });
wire_names!(DeviceState { Host => "host", Vfio => "vfio", Unbound => "unbound", Moving => "moving", Stuck => "stuck" });
wire_names!(DeviceHealth { Ok => "ok", Unknown => "unknown", ResetFailed => "reset-failed", Dead => "dead" });
wire_names!(ProfileState { Host => "host", Vfio => "vfio", Mixed => "mixed", Moving => "moving", Error => "error" });
wire_names!(Severity { Ok => "ok", Warn => "warn", Fail => "fail" });
