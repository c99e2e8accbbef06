//! `[display]` of a machine file: what shows the host's screen (the
//! vtconsoles, the firmware's framebuffers, the display manager and what
//! it holds open), for the single-GPU handoff (DESIGN §10).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::{Holder, PciAddress};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Display {
    /// `/sys/class/vtconsole/vtconN`, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vtconsoles: Vec<VtConsoleEntry>,
    /// The firmware framebuffers' platform devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub framebuffers: Vec<FramebufferEntry>,
    /// The unit behind systemd's `display-manager.service` alias; absent:
    /// the alias names nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager: Option<DisplayManagerEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VtConsoleEntry {
    /// `vtconN`.
    pub name: String,
    /// fbcon's slot ("(M) frame buffer device"); else the dummy console
    /// or vgacon, which the handoff leaves alone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fbcon: bool,
    /// `bind` reads 1 at boot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bound: bool,
    /// The PCI function fbcon draws on (the one whose framebuffer is fb0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<PciAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<BindFaults>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FramebufferEntry {
    /// The platform device: `efi-framebuffer.0`, `simple-framebuffer.0`
    /// (simplefb or simpledrm) or `vesa-framebuffer.0`.
    pub name: String,
    /// Its platform driver: `efi-framebuffer`, `simple-framebuffer`,
    /// `vesa-framebuffer`.
    pub driver: String,
    /// Bound to `driver` at boot (default true).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub bound: bool,
    /// The PCI function it scans out of: the boot VGA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<PciAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<BindFaults>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisplayManagerEntry {
    /// The real unit, e.g. `sddm.service`.
    pub unit: String,
    /// Running at boot (default true).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub active: bool,
    /// What it and its session (X, the compositor) hold open while it
    /// runs: let go when it stops, taken again when it starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<Holder>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<ManagerFaults>,
}

/// Faults of a vtconsole's or a framebuffer's `bind`/`unbind` write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindFaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unbind: Option<WriteFault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<WriteFault>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteFault {
    /// The write fails (EBUSY) and nothing changes.
    Fail,
}

/// Faults of the display manager's systemd jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerFaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<JobFault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<JobFault>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobFault {
    /// The job never ends (a unit that ignores SIGTERM and has a long
    /// stop timeout); a start job cancels a hung stop job, as systemd's
    /// `replace` mode does.
    Hang,
    /// The job ends with result `failed`; the unit stays as it was.
    Fail,
}

fn yes() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

impl Display {
    /// Every rule serde cannot express, as (field, value, reason).
    pub(super) fn check(
        &self,
        devices: &BTreeSet<PciAddress>,
        nodes: &BTreeSet<&std::path::Path>,
    ) -> Result<(), (&'static str, String, String)> {
        let mut names = BTreeSet::new();
        for vt in &self.vtconsoles {
            let number = vt.name.strip_prefix("vtcon").unwrap_or("");
            if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit()) {
                return Err(("vtconsoles.name", vt.name.clone(), "vtconN".into()));
            }
            if !names.insert(vt.name.as_str()) {
                return Err(("vtconsoles.name", vt.name.clone(), "listed twice".into()));
            }
        }
        let mut names = BTreeSet::new();
        for fb in &self.framebuffers {
            if fb.name.is_empty() || fb.driver.is_empty() {
                return Err((
                    "framebuffers",
                    fb.name.clone(),
                    "a framebuffer has a name and a driver".into(),
                ));
            }
            if !names.insert(fb.name.as_str()) {
                return Err(("framebuffers.name", fb.name.clone(), "listed twice".into()));
            }
        }
        let named = self
            .vtconsoles
            .iter()
            .map(|vt| ("vtconsoles.device", vt.device))
            .chain(
                self.framebuffers
                    .iter()
                    .map(|fb| ("framebuffers.device", fb.device)),
            );
        for (field, device) in named {
            if let Some(device) = device
                && !devices.contains(&device)
            {
                return Err((
                    field,
                    device.to_string(),
                    "no such device in this file".into(),
                ));
            }
        }
        if let Some(manager) = &self.manager {
            if !manager.unit.ends_with(".service") || manager.unit.contains('/') {
                return Err((
                    "manager.unit",
                    manager.unit.clone(),
                    "a unit name like sddm.service".into(),
                ));
            }
            for h in &manager.holders {
                if !nodes.contains(h.node.as_path()) {
                    return Err((
                        "manager.holders",
                        h.node.display().to_string(),
                        "a holder's node must be one of a device's nodes".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}
