//! How a function can be reset, as the kernel (>= 5.15) keeps it in
//! `reset_method`: the methods it supports, in its default order, with
//! vendor-reset's `device_specific` once that module is loaded.

use super::*;

/// What a function without a `reset_method` file (before 5.15) shows.
const UNKNOWN: &str = vfiod_host::sysfs::RESET_METHOD_UNKNOWN;
const DEVICE_SPECIFIC: &str = "device_specific";
const VENDOR_RESET_MODULE: &str = "vendor_reset";

/// Whether the kernel shows `reset_method` for the function: from 5.15 on,
/// and only when it has a method at all.
pub(super) fn has_reset_method_file(entry: &DeviceEntry) -> bool {
    !entry.reset.is_empty() && entry.reset.iter().all(|m| m != UNKNOWN)
}

impl RunningState {
    /// Every method the kernel would accept for the function now.
    fn supported_resets(&self, entry: &DeviceEntry) -> Vec<String> {
        let mut methods = Vec::new();
        if entry.vendor_reset && self.modules.contains(VENDOR_RESET_MODULE) {
            methods.push(DEVICE_SPECIFIC.to_owned());
        }
        for method in &entry.reset {
            if !methods.contains(method) {
                methods.push(method.clone());
            }
        }
        methods
    }

    /// A write to `reset_method`, as pci-sysfs takes it: nothing disables
    /// resets, `default` enables every supported method, otherwise each
    /// name must be one the function supports, or nothing changes (EINVAL).
    pub(super) fn set_reset_method(
        &mut self,
        board: &Board,
        address: &PciAddress,
        value: &str,
    ) -> KernelResult<()> {
        let entry = board.entry(address)?;
        let path = format!("/sys/bus/pci/devices/{address}/reset_method");
        if self.present(address).is_none() {
            return Err(KernelError::NoDevice(*address));
        }
        if !has_reset_method_file(entry) {
            return Err(os_error("write", path, libc::ENOENT));
        }
        let value = value.trim();
        let supported = self.supported_resets(entry);
        let methods = if value.is_empty() {
            Vec::new()
        } else if value == "default" {
            supported
        } else {
            let mut chosen: Vec<String> = Vec::new();
            for name in value.split(' ').map(str::trim).filter(|n| !n.is_empty()) {
                if !supported.iter().any(|m| m == name) {
                    return Err(os_error("write", path, libc::EINVAL));
                }
                if !chosen.iter().any(|m| m == name) {
                    chosen.push(name.to_owned());
                }
            }
            chosen
        };
        if let Some(dev) = self.present_mut(address) {
            dev.reset_method = Some(methods);
        }
        Ok(())
    }
}
