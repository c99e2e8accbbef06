//! USB controller targets: the USB devices behind each controller by
//! class, keyboards and mice called out, and the known-trouble table of
//! controllers that kernels had trouble passing through.

use vfiod_pci::{PciDevice, UsbDevice};

use super::data::{KernelVersion, tables};
use super::{Context, Findings, Scope, and_list, describe};
use crate::kernel::KernelResult;

pub(super) fn check(cx: &Context<'_>, scope: &Scope, out: &mut Findings) -> KernelResult<()> {
    for controller in scope.endpoints().filter(|d| d.class.is_usb_controller()) {
        let behind = cx.kernel.usb_behind(&controller.address)?;
        devices(controller, &behind, out);
        kernel(cx, controller, out);
    }
    Ok(())
}

/// USB class codes (usb.org "Defined Class Codes") a reader knows by name.
fn class_name(class: &str) -> &'static str {
    match class.to_ascii_lowercase().as_str() {
        "01" => "audio",
        "02" => "communications",
        "03" => "HID input",
        "06" => "camera (still image)",
        "07" => "printer",
        "08" => "mass storage",
        "09" => "hub",
        "0a" => "communications data",
        "0b" => "smart card",
        "0e" => "video",
        "e0" => "wireless (Bluetooth)",
        "ef" => "miscellaneous",
        "ff" => "vendor specific",
        _ => "other",
    }
}

fn devices(controller: &PciDevice, behind: &[UsbDevice], out: &mut Findings) {
    const ID: &str = "usb.devices";
    let name = describe(controller);
    if behind.is_empty() {
        out.ok(ID, format!("nothing is plugged into {name}"));
        return;
    }
    let describe_usb = |usb: &UsbDevice| {
        let label = if usb.name.is_empty() {
            "USB device"
        } else {
            usb.name.as_str()
        };
        format!(
            "{label} ({} at {}, {})",
            usb.id,
            usb.port,
            class_name(&usb.class)
        )
    };
    let all: Vec<String> = behind.iter().map(describe_usb).collect();
    let inputs: Vec<String> = behind
        .iter()
        .filter(|u| u.is_input())
        .map(describe_usb)
        .collect();
    if inputs.is_empty() {
        out.ok(
            ID,
            format!(
                "behind {name}: {}. They go to the VM with the controller",
                and_list(&all)
            ),
        );
    } else {
        out.warn(
            ID,
            format!(
                "behind {name} are input devices (keyboard, mouse): {}; the host loses them while the VM has the controller (a bind refuses without --force). Plug them into another controller, or pass a different one. Everything behind it: {}",
                and_list(&inputs),
                and_list(&all)
            ),
        );
    }
}

fn kernel(cx: &Context<'_>, controller: &PciDevice, out: &mut Findings) {
    const ID: &str = "usb.kernel";
    let Some(entry) = tables().xhci(controller.id) else {
        out.ok(
            ID,
            format!(
                "no known kernel trouble passing {} ({}) through (vfiod's table of reported trouble)",
                controller.address, controller.id
            ),
        );
        return;
    };
    let release = cx.host.kernel_release.as_deref();
    let version = release.and_then(KernelVersion::parse);
    let reported = format!(
        "{} ({}, {}): {} [source: {}]",
        entry.name, controller.id, controller.address, entry.note, entry.source
    );
    match (entry.has_range(), version) {
        (false, _) => out.warn(
            ID,
            format!("{reported}. Test the VM with this controller before relying on it, or pass another controller"),
        ),
        (true, Some(version)) if entry.affects(&version) => out.warn(
            ID,
            format!(
                "{reported}. Affected: {}, and this kernel is {}: run a kernel outside that range for this VM, or pass another controller",
                entry.range(),
                release.unwrap_or_default()
            ),
        ),
        (true, Some(_)) => out.ok(
            ID,
            format!(
                "trouble with {} ({}) is reported for {}; this kernel, {}, is outside that range (keep it in mind before upgrading): {}",
                entry.name,
                controller.id,
                entry.range(),
                release.unwrap_or_default(),
                entry.note
            ),
        ),
        (true, None) => out.unknown(
            ID,
            format!(
                "whether this kernel is affected: trouble with {} ({}) is reported for {} ({}), and the running kernel's version is not known",
                entry.name,
                controller.id,
                entry.range(),
                entry.note
            ),
        ),
    }
}
