//! IOMMU groups: every member of each group the target's set is in, which
//! ones block a bind (endpoints that stay on host drivers), which may stay
//! (bridges), and a hint when another slot might isolate the card.

use std::collections::BTreeSet;

use vfiod_pci::PciDevice;

use super::{Context, Findings, Scope, and_list, describe};
use crate::kernel::VFIO_DRIVER;

const ID: &str = "group.members";

pub(super) fn check(cx: &Context<'_>, scope: &Scope, out: &mut Findings) {
    let in_set: BTreeSet<_> = scope.set.iter().map(|d| d.address).collect();
    let mut groups = BTreeSet::new();
    for device in scope.endpoints() {
        match device.iommu_group {
            Some(group) => {
                groups.insert(group);
            }
            None => out.fail(
                ID,
                format!(
                    "{} has no IOMMU group: the IOMMU is off (see iommu.enabled), and without it nothing can be passed through",
                    describe(device)
                ),
            ),
        }
    }
    for group in groups {
        let members: Vec<&PciDevice> = cx
            .devices
            .iter()
            .filter(|d| d.iommu_group == Some(group))
            .collect();
        let mut parts = Vec::new();
        let mut blocking = Vec::new();
        for member in &members {
            let driver = member.driver.as_deref().unwrap_or("no driver");
            let role = if in_set.contains(&member.address) && !member.is_bridge() {
                "moves"
            } else if member.has_bridge_header() {
                "bridge, may stay"
            } else if member.driver.is_none() || member.is_bound_to(VFIO_DRIVER) {
                "not in use by the host, fine"
            } else {
                blocking.push(format!("{} on {driver}", describe(member)));
                "blocks"
            };
            parts.push(format!("{} on {driver} ({role})", describe(member)));
        }
        if blocking.is_empty() {
            out.ok(
                ID,
                format!(
                    "IOMMU group {group} is viable for {}: {}",
                    scope.target,
                    parts.join("; ")
                ),
            );
        } else {
            out.fail(
                ID,
                format!(
                    "IOMMU group {group} also holds {}, which stay{} on host drivers: a VM can only take a whole group. Move the card to a slot whose group it has to itself (CPU-attached slots often are; compare the groups of the other slots with `vfioctl list`), or give the VM the whole group. Members: {}",
                    and_list(&blocking),
                    if blocking.len() == 1 { "s" } else { "" },
                    parts.join("; ")
                ),
            );
        }
    }
}
