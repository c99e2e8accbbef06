//! Bus names, object paths and interface names.

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
}
