use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A vendor:device (or subsystem vendor:device) pair, `1002:67df`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciId {
    pub vendor: u16,
    pub device: u16,
}

/// The 24-bit class code as sysfs shows it (`0x030000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciClass(pub u32);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: expected {expected}")]
pub struct IdError {
    pub what: &'static str,
    pub input: String,
    pub expected: &'static str,
}

fn hex4(s: &str) -> Option<u16> {
    (s.len() == 4 && s.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| u16::from_str_radix(s, 16).ok())
        .flatten()
}

impl FromStr for PciId {
    type Err = IdError;
    fn from_str(input: &str) -> Result<Self, IdError> {
        let fail = || IdError {
            what: "PCI id",
            input: input.chars().take(64).collect(),
            expected: "vvvv:dddd in hex, e.g. 1002:67df",
        };
        let (v, d) = input.split_once(':').ok_or_else(fail)?;
        Ok(PciId {
            vendor: hex4(v).ok_or_else(fail)?,
            device: hex4(d).ok_or_else(fail)?,
        })
    }
}

impl fmt::Display for PciId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor, self.device)
    }
}

impl PciClass {
    /// PCI-to-PCI bridges, host bridges, ISA bridges: base class 0x06.
    pub fn is_bridge(self) -> bool {
        self.0 >> 16 == 0x06
    }
    /// PCI-to-PCI (0x0604, 0x0609) and CardBus (0x0607) bridges: the
    /// functions with a bridge header, which vfio lets stay on their
    /// drivers in a viable group (`vfio_dev_driver_allowed`). A host or
    /// ISA bridge is a normal function: on its driver it stops the group.
    pub fn has_bridge_header(self) -> bool {
        matches!(self.0 >> 8, 0x0604 | 0x0607 | 0x0609)
    }
    pub fn is_display(self) -> bool {
        self.0 >> 16 == 0x03
    }
    /// Serial bus controller, USB (0x0c03xx).
    pub fn is_usb_controller(self) -> bool {
        self.0 >> 8 == 0x0c03
    }
    /// Mass storage controllers (0x01xxxx).
    pub fn is_storage(self) -> bool {
        self.0 >> 16 == 0x01
    }
}

impl FromStr for PciClass {
    type Err = IdError;
    fn from_str(input: &str) -> Result<Self, IdError> {
        let fail = || IdError {
            what: "PCI class",
            input: input.chars().take(64).collect(),
            expected: "0x followed by 6 hex digits, e.g. 0x030000",
        };
        let hex = input.strip_prefix("0x").ok_or_else(fail)?;
        if hex.len() != 6 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(fail());
        }
        u32::from_str_radix(hex, 16)
            .map(PciClass)
            .map_err(|_| fail())
    }
}

impl fmt::Display for PciClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:06x}", self.0)
    }
}

macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
string_serde!(PciId);
string_serde!(PciClass);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_classes() {
        let id: PciId = "1002:67DF".parse().unwrap();
        assert_eq!(id.to_string(), "1002:67df");
        for bad in ["1002", "1002:67d", "x002:67df", "1002:67df:0", ""] {
            assert!(bad.parse::<PciId>().is_err(), "{bad}");
        }
        let c: PciClass = "0x060400".parse().unwrap();
        assert!(c.is_bridge() && !c.is_display());
        assert!("0x0c0330".parse::<PciClass>().unwrap().is_usb_controller());
        for bad in ["060400", "0x6040", "0x0604000", "0xgg0000"] {
            assert!(bad.parse::<PciClass>().is_err(), "{bad}");
        }
    }
}
