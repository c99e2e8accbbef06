//! `Check`: what would break a passthrough, found before it breaks.
//!
//! Each finding is (id, `ok` | `warn` | `fail`, message), and every `warn`
//! and `fail` says what to do about it. Ids are `AREA.CHECK`
//! (`iommu.enabled`, `group.members`, `boot-gpu.framebuffer`); clients
//! group findings by AREA. A check about several devices of a target
//! gives one finding per device, its message starting with the address.
//!
//! Without a target the checks are about the whole host: virtualization
//! and IOMMU (`cpu`, `kvm`, `firmware`, `iommu`), `modules`, `memory`,
//! `libvirt`. With a target (a profile or an address) they are also about
//! its completed set (the functions a bind would move): `group`,
//! `boot-gpu`, `reset`, `power`, `usb`, the domains that use it
//! (`libvirt.managed`, `memory.pinned`) and a dry run of the bind itself
//! (`bind.plan`), which applies exactly the rules `Bind` does.
//!
//! **Unknown is not a failure.** Every fact comes through one rooted
//! access, [`Kernel::host`] and the device model: a real host's procfs,
//! sysfs and /etc, a fixture tree, or a machine file whose `[host]`
//! section may leave facts out. A fact nobody could read is reported with
//! severity `ok` and a message that starts with `unknown: ` and says where
//! the fact would come from, so a reader (or `vfioctl`, which marks such
//! findings `?`) can tell "checked and fine" from "not checked".
//!
//! Known trouble (AMD GPUs with the reset bug, USB controllers with
//! passthrough trouble) is data, not code: `daemon/data/doctor.toml`.

mod boot_gpu;
mod data;
mod groups;
mod libvirt;
mod memory;
mod modules;
mod power;
mod reset;
mod usb;
mod virt;

#[cfg(test)]
mod tests;

use vfiod_dbus::{Direction, Error, Finding, Severity};
use vfiod_pci::PciDevice;

use crate::engine::Engine;
use crate::kernel::Kernel;
use crate::plan::{Described, MoveOptions, complete_set, kernel_error, resolve_target};
use vfiod_config::Config;
use vfiod_host::facts::{Domain, HostView};

/// What an unknown finding's message starts with.
pub const UNKNOWN: &str = "unknown: ";

/// Runs the checks for `target` (a profile or an address), or for the
/// whole host when it is empty, then the dry run of a bind of the target.
/// Blocking: reads the kernel.
pub fn check(engine: &Engine, target: &str, told: Disclosure) -> Result<Vec<Finding>, Error> {
    let mut findings = inspect_for(engine.kernel().as_ref(), &engine.config(), target, told)?;
    if !target.is_empty() {
        findings.push(dry_run(engine, target, told)?);
    }
    Ok(findings)
}

/// How much a Check may tell its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disclosure {
    /// Everything: the caller may move devices.
    Full,
    /// Not other users' processes (pids, commands) nor libvirt's domain
    /// names and files, which only root can read.
    Redacted,
}

/// Every check but the dry run, on any kernel: what the tests run on
/// fixture trees and machine files.
pub fn inspect(kernel: &dyn Kernel, config: &Config, target: &str) -> Result<Vec<Finding>, Error> {
    inspect_for(kernel, config, target, Disclosure::Full)
}

/// [`inspect`], telling only what `told` allows.
pub fn inspect_for(
    kernel: &dyn Kernel,
    config: &Config,
    target: &str,
    told: Disclosure,
) -> Result<Vec<Finding>, Error> {
    let host = kernel.host().map_err(kernel_error)?;
    let devices = kernel.devices().map_err(kernel_error)?;
    let scope = if target.is_empty() {
        None
    } else {
        Some(Scope::resolve(config, &devices, target)?)
    };
    let context = Context {
        kernel,
        host,
        devices,
        scope,
        told,
    };
    let mut findings = Findings::default();
    virt::check(&context, &mut findings).map_err(kernel_error)?;
    modules::check(&context, &mut findings);
    if let Some(scope) = &context.scope {
        groups::check(&context, scope, &mut findings);
        boot_gpu::check(&context, scope, &mut findings).map_err(kernel_error)?;
        reset::check(&context, scope, &mut findings);
        power::check(&context, scope, &mut findings);
        usb::check(&context, scope, &mut findings).map_err(kernel_error)?;
    }
    memory::check(&context, &mut findings);
    libvirt::check(&context, &mut findings);
    Ok(findings.0)
}

/// The bind `Bind` would do, planned and not done.
fn dry_run(engine: &Engine, target: &str, told: Disclosure) -> Result<Finding, Error> {
    let options = MoveOptions {
        redacted: told == Disclosure::Redacted,
        ..MoveOptions::default()
    };
    Ok(match engine.plan(target, Direction::Bind, &options) {
        Ok(plan) => {
            let moving: Vec<String> = plan.devices.iter().map(|d| d.address.to_string()).collect();
            finding(
                "bind.plan",
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
            "bind.plan",
            Severity::Fail,
            format!(
                "{}. Fix each reason (the findings above say how), or choose another slot for the card",
                refusal.message()
            ),
        ),
        Err(other) => return Err(other),
    })
}

fn finding(id: &str, severity: Severity, message: impl Into<String>) -> Finding {
    Finding {
        id: id.to_owned(),
        severity,
        message: message.into(),
    }
}

/// The findings so far, in the order they are made.
#[derive(Debug, Default)]
pub(crate) struct Findings(Vec<Finding>);

impl Findings {
    fn push(&mut self, id: &str, severity: Severity, message: impl Into<String>) {
        self.0.push(finding(id, severity, message));
    }

    fn ok(&mut self, id: &str, message: impl Into<String>) {
        self.push(id, Severity::Ok, message);
    }

    fn warn(&mut self, id: &str, message: impl Into<String>) {
        self.push(id, Severity::Warn, message);
    }

    fn fail(&mut self, id: &str, message: impl Into<String>) {
        self.push(id, Severity::Fail, message);
    }

    /// A fact nobody could read: severity ok, message `unknown: ...`.
    fn unknown(&mut self, id: &str, what: impl AsRef<str>) {
        self.push(id, Severity::Ok, format!("{UNKNOWN}{}", what.as_ref()));
    }
}

/// What a target names: the completed set of functions a bind would move,
/// and the VMs of its profile.
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    pub(crate) target: String,
    /// The libvirt domains the profile names (empty for an address).
    pub(crate) vms: Vec<String>,
    /// The profile's name and `reset_method`, when the target is a profile.
    pub(crate) profile: Option<(String, Option<String>)>,
    /// The completed set, in address order.
    pub(crate) set: Vec<PciDevice>,
}

impl Scope {
    fn resolve(config: &Config, devices: &[PciDevice], target: &str) -> Result<Scope, Error> {
        let targets = resolve_target(config, devices, target)?;
        let (set, _) = complete_set(devices, &targets);
        Ok(Scope {
            target: target.to_owned(),
            vms: config
                .profile(target)
                .map(|profile| profile.vms.clone())
                .unwrap_or_default(),
            profile: config
                .profile(target)
                .map(|profile| (target.to_owned(), profile.reset_method.clone())),
            set: set
                .iter()
                .filter_map(|address| devices.iter().find(|d| &d.address == address))
                .cloned()
                .collect(),
        })
    }

    /// The functions that move, bridges left out (a bind refuses them).
    fn endpoints(&self) -> impl Iterator<Item = &PciDevice> {
        self.set.iter().filter(|d| !d.is_bridge())
    }
}

/// What every check reads.
pub(crate) struct Context<'a> {
    kernel: &'a dyn Kernel,
    host: HostView,
    devices: Vec<PciDevice>,
    scope: Option<Scope>,
    told: Disclosure,
}

impl Context<'_> {
    /// A libvirt domain as the caller may see it named.
    fn domain_name<'d>(&self, domain: &'d Domain) -> &'d str {
        match self.told {
            Disclosure::Full => &domain.name,
            Disclosure::Redacted => "a libvirt domain",
        }
    }

    /// Where a domain's XML is, as the caller may see it.
    fn domain_file(&self, domain: &Domain) -> String {
        match self.told {
            Disclosure::Full => domain.path.display().to_string(),
            Disclosure::Redacted => "/etc/libvirt/qemu/, readable by root alone".into(),
        }
    }

    /// The command line's words, when known.
    fn cmdline_words(&self) -> Option<Vec<&str>> {
        self.host
            .cmdline
            .as_deref()
            .map(|cmdline| cmdline.split_whitespace().collect())
    }

    /// Intel (VT-x or a DMAR table) rather than AMD, when it can be told.
    fn vendor(&self) -> Option<CpuVendor> {
        let flags = self.host.cpu_flags.as_ref();
        let tables = self.host.acpi_tables.as_ref();
        let has_flag = |flag: &str| flags.is_some_and(|f| f.iter().any(|x| x == flag));
        let has_table = |table: &str| tables.is_some_and(|t| t.iter().any(|x| x == table));
        if has_flag("vmx") || has_table("DMAR") {
            Some(CpuVendor::Intel)
        } else if has_flag("svm") || has_table("IVRS") {
            Some(CpuVendor::Amd)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CpuVendor {
    Intel,
    Amd,
}

/// `0000:01:00.0 (Ellesmere [Radeon RX 470/480/570/570X/580/580X/590])`.
fn describe(device: &PciDevice) -> String {
    Described::from(device).to_string()
}

/// `8 GiB`, `1.5 GiB`, `512 MiB`, from KiB.
fn size_kb(kb: u64) -> String {
    const MIB: u64 = 1024;
    const GIB: u64 = 1024 * 1024;
    if kb >= GIB {
        format_unit(kb, GIB, "GiB")
    } else if kb >= MIB {
        format_unit(kb, MIB, "MiB")
    } else {
        format!("{kb} KiB")
    }
}

fn format_unit(kb: u64, unit: u64, name: &str) -> String {
    let tenths = kb * 10 / unit;
    if tenths.is_multiple_of(10) {
        format!("{} {name}", tenths / 10)
    } else {
        format!("{}.{} {name}", tenths / 10, tenths % 10)
    }
}

/// `a, b and c`.
fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}
