//! Power: functions of the target that may enter D3cold (`d3cold_allowed`
//! with platform power resources to cut), from which some cards do not
//! wake for the VM.

use super::{Context, Findings, Scope};

const ID: &str = "power.d3cold";

pub(super) fn check(cx: &Context<'_>, scope: &Scope, out: &mut Findings) {
    let mut unknown = Vec::new();
    for device in scope.endpoints() {
        let facts = cx.host.devices.get(&device.address);
        let allowed = facts.and_then(|f| f.d3cold_allowed);
        let capable = facts.and_then(|f| f.d3cold_capable);
        let name = device.address;
        match (allowed, capable) {
            (None, _) => unknown.push(device.address.to_string()),
            (Some(false), _) => out.ok(ID, format!("{name} never enters D3cold (d3cold_allowed = 0)")),
            (Some(true), Some(true)) => out.warn(
                ID,
                format!(
                    "{name} may enter D3cold (d3cold_allowed = 1, and the platform can cut its power): vfio-pci powers idle devices down, and some cards do not wake up for the VM. Keep it out: echo 0 > /sys/bus/pci/devices/{}/d3cold_allowed (a udev rule makes it stick), or load vfio-pci with disable_idle_d3=1",
                    device.address
                ),
            ),
            (Some(true), _) => out.ok(
                ID,
                format!(
                    "{name} allows D3cold, but the platform has no power resources to cut its power (no ACPI _PR3): it goes to D3hot at most"
                ),
            ),
        }
    }
    if !unknown.is_empty() {
        out.unknown(
            ID,
            format!(
                "whether {} can enter D3cold (d3cold_allowed in sysfs; a machine file does not describe power states)",
                unknown.join(", ")
            ),
        );
    }
}
