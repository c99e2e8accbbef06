//! `Check`: what would break a passthrough, found before it breaks. Each
//! finding says what to do about it.

use vfiod_dbus::{Direction, Error, Finding, Severity};

use crate::engine::Engine;
use crate::kernel::{VFIO_DRIVER, VFIO_MODULE};
use crate::plan::{MoveOptions, kernel_error};

fn finding(id: &str, severity: Severity, message: impl Into<String>) -> Finding {
    Finding {
        id: id.to_string(),
        severity,
        message: message.into(),
    }
}

/// Runs the checks for `target` (a profile or an address), or for the
/// whole host when it is empty. Blocking: reads the kernel.
pub fn check(engine: &Engine, target: &str) -> Result<Vec<Finding>, Error> {
    let kernel = engine.kernel();
    let mut findings = Vec::new();
    findings.push(if kernel.iommu_enabled().map_err(kernel_error)? {
        finding("iommu", Severity::Ok, "an IOMMU is on: IOMMU groups exist")
    } else {
        finding(
            "iommu",
            Severity::Fail,
            "no IOMMU groups: turn on VT-d / AMD-Vi in the firmware and boot with intel_iommu=on (Intel) or amd_iommu=on (AMD), plus iommu=pt",
        )
    });
    findings.push(if kernel.driver_registered(VFIO_DRIVER) {
        finding("vfio-pci", Severity::Ok, "vfio-pci is loaded")
    } else if kernel.module_available(VFIO_MODULE) {
        finding("vfio-pci", Severity::Ok, "vfio-pci is not loaded yet; vfiod loads it on the first bind")
    } else {
        finding(
            "vfio-pci",
            Severity::Fail,
            "the vfio_pci module is missing: install your distribution's kernel modules package or build the kernel with CONFIG_VFIO_PCI",
        )
    });
    if target.is_empty() {
        return Ok(findings);
    }
    // The group's members, then the dry run of a bind: the same rules a
    // real bind applies, so what Check says and what Bind does agree.
    let devices = kernel.devices().map_err(kernel_error)?;
    let targets = crate::plan::resolve_target(&engine.config(), &devices, target)?;
    let (set, _) = crate::plan::complete_set(&devices, &targets);
    for address in &set {
        let Some(device) = devices.iter().find(|d| &d.address == address) else {
            continue;
        };
        let Some(group) = device.iommu_group else {
            continue;
        };
        let members: Vec<String> = devices
            .iter()
            .filter(|d| d.iommu_group == Some(group))
            .map(|d| {
                let role = if d.is_bridge() {
                    "bridge, may stay"
                } else {
                    "endpoint"
                };
                format!(
                    "{} {} on {} ({role})",
                    d.address,
                    d.name,
                    d.driver.as_deref().unwrap_or("no driver")
                )
            })
            .collect();
        findings.push(finding(
            "group",
            Severity::Ok,
            format!(
                "{address} is in IOMMU group {group}: {}",
                members.join("; ")
            ),
        ));
    }
    findings.push(
        match engine.plan(target, Direction::Bind, &MoveOptions::default()) {
            Ok(plan) => {
                let moving: Vec<String> =
                    plan.devices.iter().map(|d| d.address.to_string()).collect();
                finding(
                    "bind",
                    Severity::Ok,
                    format!("a bind of {target} would move {}", moving.join(", ")),
                )
            }
            Err(
                refusal @ (Error::Protected(_)
                | Error::GroupNotViable(_)
                | Error::DeviceBusy(_)
                | Error::NoIommu(_)
                | Error::Conflict(_)),
            ) => finding(
                "bind",
                Severity::Fail,
                format!(
                    "{} — fix each reason above, or choose another slot for the card",
                    refusal.message()
                ),
            ),
            Err(other) => return Err(other),
        },
    );
    Ok(findings)
}
