use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A PCI function address, `DDDD:BB:DD.F`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

/// The slot of a function: every function of one card shares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PCI address {input:?}: {reason} (expected 0000:01:00.0 or 01:00.0)")]
pub struct AddressError {
    pub input: String,
    pub reason: &'static str,
}

impl PciAddress {
    pub fn new(domain: u16, bus: u8, device: u8, function: u8) -> Self {
        PciAddress {
            domain,
            bus,
            device,
            function,
        }
    }

    pub fn slot(&self) -> Slot {
        Slot {
            domain: self.domain,
            bus: self.bus,
            device: self.device,
        }
    }

    /// The last element of the device's D-Bus object path: `0000_01_00_0`.
    pub fn path_component(&self) -> String {
        format!(
            "{:04x}_{:02x}_{:02x}_{}",
            self.domain, self.bus, self.device, self.function
        )
    }

    /// True when `s` has the shape of an address (hex digits, colons, one
    /// dot), valid or not: such a string is never taken for a profile name.
    pub fn looks_like_address(s: &str) -> bool {
        s.contains(':')
            && s.contains('.')
            && s.chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
    }
}

fn hex_field(field: &str, digits: usize, what: &'static str) -> Result<u32, &'static str> {
    if field.len() != digits || !field.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(what);
    }
    u32::from_str_radix(field, 16).map_err(|_| what)
}

impl FromStr for PciAddress {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason| AddressError {
            input: input.chars().take(64).collect(),
            reason,
        };
        let (rest, function) = input
            .rsplit_once('.')
            .ok_or_else(|| fail("no '.' before the function"))?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, s] => (
                hex_field(d, 4, "the domain must be 4 hex digits").map_err(fail)?,
                *b,
                *s,
            ),
            [b, s] => (0, *b, *s),
            _ => return Err(fail("expected [domain:]bus:device.function")),
        };
        let bus = hex_field(bus, 2, "the bus must be 2 hex digits").map_err(fail)?;
        let device = hex_field(device, 2, "the device must be 2 hex digits").map_err(fail)?;
        if device > 0x1f {
            return Err(fail("the device number must be at most 1f"));
        }
        if function.len() != 1 {
            return Err(fail("the function must be one digit 0-7"));
        }
        let function = function
            .parse::<u8>()
            .ok()
            .filter(|f| *f <= 7)
            .ok_or_else(|| fail("the function must be one digit 0-7"))?;
        Ok(PciAddress {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function,
        })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}",
            self.domain, self.bus, self.device
        )
    }
}

impl Serialize for PciAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_short_forms() {
        let full: PciAddress = "0000:01:00.1".parse().unwrap();
        let short: PciAddress = "01:00.1".parse().unwrap();
        assert_eq!(full, short);
        assert_eq!(full.to_string(), "0000:01:00.1");
        assert_eq!(full.path_component(), "0000_01_00_1");
        let upper: PciAddress = "000A:0B:1F.7".parse().unwrap();
        assert_eq!(upper.to_string(), "000a:0b:1f.7");
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            "1:00.0",
            "01:0.0",
            "01:00",
            "01:00.8",
            "01:20.0",
            "0000:01:00.00",
            "00000:01:00.0",
            "zz:00.0",
            "01:00.0 ",
            " 01:00.0",
            "0000:01:00.-1",
            "01:00:00.0:0",
            "01.00.0",
            "+1:00.0",
            "0000:01:00.٣",
        ] {
            let err = bad.parse::<PciAddress>().unwrap_err();
            assert!(
                err.to_string().contains("invalid PCI address"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn slot_groups_functions() {
        let a: PciAddress = "01:00.0".parse().unwrap();
        let b: PciAddress = "01:00.1".parse().unwrap();
        let c: PciAddress = "01:01.0".parse().unwrap();
        assert_eq!(a.slot(), b.slot());
        assert_ne!(a.slot(), c.slot());
    }
}
