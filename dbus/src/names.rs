//! Bus names, object paths and interface names.

use vfiod_pci::PciAddress;
use zbus::OwnedObjectPath;

pub const BUS_NAME: &str = "org.vfiod1";
pub const MANAGER_PATH: &str = "/org/vfiod1";
pub const MANAGER_INTERFACE: &str = "org.vfiod1.Manager";
pub const DEVICE_INTERFACE: &str = "org.vfiod1.Device";
pub const PROFILE_INTERFACE: &str = "org.vfiod1.Profile";
pub const DEVICE_PATH_PREFIX: &str = "/org/vfiod1/device/";
pub const PROFILE_PATH_PREFIX: &str = "/org/vfiod1/profile/";
pub const MANAGE_ACTION: &str = "org.vfiod1.manage";
/// Longest target string accepted over the bus.
pub const MAX_TARGET_LEN: usize = 128;

/// Escapes one object-path element: bytes outside `[A-Za-z0-9_]` become
/// `_` and two lowercase hex digits (`rx-580` -> `rx_2d580`).
pub fn escape_path_element(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

pub fn profile_path(name: &str) -> String {
    format!("{PROFILE_PATH_PREFIX}{}", escape_path_element(name))
}

/// `/org/vfiod1/device/0000_01_00_0` from the address's path component.
pub fn device_path(path_component: &str) -> String {
    format!("{DEVICE_PATH_PREFIX}{path_component}")
}

/// `/org/vfiod1/device/0000_01_00_0`.
pub fn device_object_path(address: &PciAddress) -> OwnedObjectPath {
    OwnedObjectPath::try_from(device_path(&address.path_component()))
        .expect("device paths are valid object paths")
}

/// `/org/vfiod1/profile/NAME`, escaped.
pub fn profile_object_path(name: &str) -> OwnedObjectPath {
    OwnedObjectPath::try_from(profile_path(name))
        .expect("escaped profile paths are valid object paths")
}

/// The address in a device path, for when the device itself could not be
/// read; `None` for any other path.
pub fn address_from_device_path(path: &str) -> Option<PciAddress> {
    let last = path.strip_prefix(DEVICE_PATH_PREFIX)?;
    let [domain, bus, device, function] = last.split('_').collect::<Vec<_>>()[..] else {
        return None;
    };
    format!("{domain}:{bus}:{device}.{function}").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_the_contract_says() {
        assert_eq!(escape_path_element("rx580"), "rx580");
        assert_eq!(escape_path_element("usb-3"), "usb_2d3");
        assert_eq!(escape_path_element("a_b"), "a_b");
        assert_eq!(profile_path("win-10"), "/org/vfiod1/profile/win_2d10");
    }

    #[test]
    fn device_paths_and_addresses_round_trip() {
        let address: PciAddress = "0000:01:00.1".parse().unwrap();
        let path = device_object_path(&address);
        assert_eq!(path.as_str(), "/org/vfiod1/device/0000_01_00_1");
        assert_eq!(address_from_device_path(path.as_str()), Some(address));
        assert_eq!(
            address_from_device_path("/org/vfiod1/profile/a_b_c_d"),
            None
        );
        assert_eq!(address_from_device_path("/org/vfiod1/device/zz"), None);
    }
}
