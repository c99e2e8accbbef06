//! Reset: how each function of the target can be reset between VMs
//! (`reset_method` on kernels >= 5.15, else the `reset` file), and AMD
//! GPUs with the reset bug, with vendor-reset loaded and selected or not.

use vfiod_pci::PciDevice;

use super::data::tables;
use super::{Context, Findings, Scope};
use vfiod_host::sysfs::RESET_METHOD_UNKNOWN;

const VENDOR_RESET: &str = "vendor_reset";
const DEVICE_SPECIFIC: &str = "device_specific";

pub(super) fn check(cx: &Context<'_>, scope: &Scope, out: &mut Findings) {
    for device in scope.endpoints() {
        method(device, out);
    }
    for device in scope.endpoints() {
        amd_reset_bug(cx, scope, device, out);
    }
    profile_method(scope, out);
}

/// The profile's `reset_method` against what its functions have now.
fn profile_method(scope: &Scope, out: &mut Findings) {
    const ID: &str = "reset.profile";
    let Some((name, Some(methods))) = &scope.profile else {
        return;
    };
    let (have, keep): (Vec<&PciDevice>, Vec<&PciDevice>) = scope
        .endpoints()
        .partition(|d| d.reset_methods.join(" ") == *methods);
    let kept: Vec<String> = keep
        .iter()
        .map(|d| format!("{} keeps {}", d.address, shown(d)))
        .collect();
    if have.is_empty() {
        out.warn(
            ID,
            format!(
                "profile {name} sets reset_method = \"{methods}\", but no function of it has that method now ({}): vfiod sets it at start and before each bind, and refuses the bind when the kernel takes it for none of them",
                kept.join(", ")
            ),
        );
        return;
    }
    let set: Vec<String> = have.iter().map(|d| d.address.to_string()).collect();
    let mut message = format!(
        "profile {name}: reset_method = \"{methods}\" on {}",
        set.join(", ")
    );
    if !kept.is_empty() {
        message.push_str(&format!(
            "; {} (the kernel has no such method for it)",
            kept.join(", ")
        ));
    }
    out.ok(ID, message);
}

fn shown(device: &PciDevice) -> String {
    match device.reset_methods.join(" ") {
        methods if methods.is_empty() => "no reset method".into(),
        methods => methods,
    }
}

fn method(device: &PciDevice, out: &mut Findings) {
    const ID: &str = "reset.method";
    let name = device.address;
    let methods = &device.reset_methods;
    if methods.is_empty() {
        out.warn(
            ID,
            format!(
                "{name} has no reset method: a VM leaves it in whatever state the guest left, so the host driver or the next VM may not get it working again. Shut the guest down cleanly (the guest driver resets it), or use a card or slot that supports FLR"
            ),
        );
    } else if methods.len() == 1 && methods[0] == RESET_METHOD_UNKNOWN {
        out.ok(
            ID,
            format!("{name} can be reset (this kernel, before 5.15, does not say how)"),
        );
    } else {
        let mut message = format!("{name} reset = {}", methods.join(" "));
        if methods[0] == "bus" {
            match device.parent {
                Some(parent) => message.push_str(&format!(
                    ": a secondary bus reset through {parent}, which resets every function behind that bridge together"
                )),
                None => message.push_str(": a secondary bus reset of its bus, which resets every function on it together"),
            }
        }
        out.ok(ID, message);
    }
}

fn amd_reset_bug(cx: &Context<'_>, scope: &Scope, device: &PciDevice, out: &mut Findings) {
    const ID: &str = "reset.amd-bug";
    let Some(entry) = tables().reset_bug(device.id) else {
        return;
    };
    let what = format!(
        "{} ({}) is an AMD {} GPU ({}): it does not come back from a bus reset or FLR after a VM used it (the AMD reset bug), so the second VM start hangs or shows nothing and the host may not get it back",
        device.address, device.id, entry.family, entry.cards
    );
    let source = format!("[ids: {}]", entry.source);
    // vfiod selects it for a profile that says so; by hand otherwise.
    let select = match &scope.profile {
        Some((name, _)) => format!(
            "add this line under [profiles.{name}] in /etc/vfiod/vfiod.toml: reset_method = \"{DEVICE_SPECIFIC}\" (vfiod then sets it as it starts, while the card is clean, and before each bind)"
        ),
        None => format!(
            "echo {DEVICE_SPECIFIC} > /sys/bus/pci/devices/{}/reset_method, or put it in a profile with reset_method = \"{DEVICE_SPECIFIC}\"",
            device.address
        ),
    };
    let profile_selects = scope.profile.as_ref().and_then(|(name, methods)| {
        methods
            .as_deref()
            .is_some_and(|m| m.split(' ').any(|m| m == DEVICE_SPECIFIC))
            .then_some(name.as_str())
    });
    let loaded = cx
        .host
        .loaded_modules
        .as_ref()
        .map(|modules| modules.contains(VENDOR_RESET));
    // Before 5.15 there is no reset_method: a loaded vendor-reset hooks the
    // kernel's device-specific reset by itself.
    let selectable = device
        .reset_methods
        .first()
        .is_some_and(|m| m != RESET_METHOD_UNKNOWN);
    let selected = device.reset_methods.first().map(String::as_str) == Some(DEVICE_SPECIFIC);
    match loaded {
        Some(true) if !selectable || selected || profile_selects.is_some() => out.ok(
            ID,
            format!(
                "{} ({}) is an AMD {} GPU with the reset bug, and vendor-reset is loaded to reset it{}",
                device.address,
                device.id,
                entry.family,
                profile_selects
                    .map(|name| format!(" (profile {name} selects it)"))
                    .unwrap_or_default()
            ),
        ),
        Some(true) => out.warn(
            ID,
            format!(
                "{what}. vendor-reset is loaded but not selected (reset_method is \"{}\"): {select} {source}",
                device.reset_methods.join(" ")
            ),
        ),
        Some(false) => out.warn(
            ID,
            format!(
                "{what}. vendor-reset is not loaded: install it ({}), load it early at boot (before amdgpu touches the card){} {source}",
                "https://github.com/gnif/vendor-reset",
                if selectable {
                    format!(", and select it: {select}")
                } else {
                    String::new()
                }
            ),
        ),
        None => out.warn(
            ID,
            format!(
                "{what}. Whether vendor-reset (https://github.com/gnif/vendor-reset) is loaded is unknown: load it early at boot and select it with {select} (kernel 5.15 and newer) {source}"
            ),
        ),
    }
}
