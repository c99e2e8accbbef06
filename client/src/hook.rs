//! `libvirt-hook DOMAIN OPERATION SUBOPERATION EXTRA` (DESIGN §8).
//!
//! The plan (what to move) is made from stdin and the config alone, so a
//! domain with nothing for vfiod passes without touching the bus. It never
//! calls back into libvirt: libvirt holds its lock while hooks run.

pub use vfioctl::domain;
pub mod targets;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::PathBuf;

use vfiod_config::{self as config, Config, ConfigError};
use vfiod_dbus::Direction;
use vfiod_dbus::names::address_from_device_path;
use vfiod_pci::{PciAddress, PciId};

use crate::bus::Bus;
use crate::commands::moves::{self, CONFLICT, MoveOptions, Moved, Mover, Report};
use crate::error::{Exit, Failure};
use crate::output::Output;

use self::targets::{Plan, Target};

/// What the hook was asked to do, once it knows it has work.
#[derive(Debug)]
pub struct Work {
    pub domain: String,
    pub direction: Direction,
    pub plan: Plan,
}

/// The operations the hook acts on; every other one passes at once.
pub fn direction(operation: &str, suboperation: &str) -> Option<Direction> {
    match (operation, suboperation) {
        ("prepare", "begin") => Some(Direction::Bind),
        ("release", "end") => Some(Direction::Release),
        _ => None,
    }
}

/// Reads the domain XML and the config; `None` when there is nothing for
/// vfiod to do.
pub fn prepare_work(
    domain: &str,
    direction: Direction,
    config_path: Option<PathBuf>,
    out: &Output,
) -> Result<Option<Work>, Failure> {
    let xml = read_stdin()?;
    let parsed = domain::parse(&xml)
        .map_err(|e| Failure::usage("InvalidXml", format!("invalid domain XML on stdin: {e}")))?;
    if let Some(name) = parsed.name.as_deref().filter(|n| *n != domain) {
        let message =
            format!("the domain XML is for {name:?}, but the hook was called for {domain:?}");
        // Binding for the wrong domain would be worse than not starting;
        // releasing only ever gives back what `domain` owns.
        match direction {
            Direction::Bind => return Err(Failure::usage("InvalidXml", message)),
            Direction::Release => out.warn(&message),
        }
    }
    let config = load_config(config_path, out);
    let plan = targets::plan(domain, &parsed, &config, sysfs_id);
    for warning in &plan.warnings {
        out.warn(warning);
    }
    Ok((!plan.targets.is_empty()).then(|| Work {
        domain: domain.to_owned(),
        direction,
        plan,
    }))
}

fn read_stdin() -> Result<String, Failure> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .take(domain::MAX_XML_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| {
            Failure::local(
                "Input",
                format!("cannot read the domain XML from stdin: {e}"),
            )
        })?;
    if bytes.len() > domain::MAX_XML_BYTES {
        return Err(Failure::usage(
            "InvalidXml",
            format!(
                "the domain XML on stdin is larger than {} bytes",
                domain::MAX_XML_BYTES
            ),
        ));
    }
    String::from_utf8(bytes)
        .map_err(|_| Failure::usage("InvalidXml", "the domain XML on stdin is not UTF-8"))
}

/// `--config`, else `$VFIOD_CONFIG`, else the default; absent = no
/// profiles. A bad config is reported, and the domain's own `managed='no'`
/// hostdevs are still moved: they are what the VM needs to start.
fn load_config(path: Option<PathBuf>, out: &Output) -> Config {
    let path = path
        .or_else(|| {
            std::env::var_os("VFIOD_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
    Config::load(&path).unwrap_or_else(|e: ConfigError| {
        out.warn(&format!(
            "{e}; using the domain XML's managed='no' hostdevs only"
        ));
        Config::default()
    })
}

/// The device's id from the host's sysfs, for profiles that list `ids`.
fn sysfs_id(address: &PciAddress) -> Option<PciId> {
    let dir = PathBuf::from("/sys/bus/pci/devices").join(address.to_string());
    let read = |name: &str| {
        let text = std::fs::read_to_string(dir.join(name)).ok()?;
        let hex = text.trim().strip_prefix("0x")?;
        u16::from_str_radix(hex, 16).ok()
    };
    Some(PciId {
        vendor: read("vendor")?,
        device: read("device")?,
    })
}

/// Moves the plan's targets for the domain.
pub async fn execute(work: &Work, out: &Output) -> Result<Exit, Failure> {
    let bus = Bus::connect_for_moves().await?;
    let mut mover = Mover::new(&bus, out).await?;
    let options = MoveOptions {
        vm: Some(work.domain.clone()),
        ..MoveOptions::default()
    };
    let report = match work.direction {
        Direction::Bind => bind_all(&mut mover, &work.plan.targets, &options, out).await,
        Direction::Release => release_all(&mut mover, &work.plan.targets, &options, out).await,
    };
    let told = mover.into_told();
    let objects = moves::read_moved(&bus, &report, out, &told).await;
    moves::show_report(&report, objects.as_ref(), out)?;
    Ok(report.exit())
}

/// Binds every target; on the first failure releases what this call bound,
/// so that a VM that cannot start holds nothing.
async fn bind_all(
    mover: &mut Mover<'_>,
    targets: &[Target],
    options: &MoveOptions,
    out: &Output,
) -> Report {
    let mut report = Report::new(Direction::Bind);
    let mut moved = MovedSets::default();
    for (i, target) in targets.iter().enumerate() {
        if moved.covers(target) {
            continue;
        }
        let name = target.to_string();
        match mover.move_one(Direction::Bind, &name, options).await {
            Ok(devices) => {
                moved.add(&devices);
                report.done.push(Moved {
                    target: name,
                    devices,
                })
            }
            Err(failure) => {
                report.failed = Some((name, failure));
                report.not_attempted = targets[i + 1..].iter().map(Target::to_string).collect();
                break;
            }
        }
    }
    if report.failed.is_some() {
        for moved in std::mem::take(&mut report.done).into_iter().rev() {
            match mover
                .move_one(Direction::Release, &moved.target, options)
                .await
            {
                Ok(_) => report.rolled_back.push(moved.target),
                Err(failure) => {
                    out.note(&format!(
                        "vfioctl: could not release {} again: {failure}",
                        moved.target
                    ));
                    // Still bound: the report must say so.
                    report.done.insert(0, moved);
                }
            }
        }
    }
    report
}

/// Releases every target the domain owns. One that another VM owns
/// (Conflict) is left alone and reported; other failures are reported
/// and the rest still released: the VM is gone, the host wants its
/// devices back.
async fn release_all(
    mover: &mut Mover<'_>,
    targets: &[Target],
    options: &MoveOptions,
    out: &Output,
) -> Report {
    let mut report = Report::new(Direction::Release);
    let mut moved = MovedSets::default();
    for target in targets.iter().rev() {
        if moved.covers(target) {
            continue;
        }
        let name = target.to_string();
        match mover.move_one(Direction::Release, &name, options).await {
            Ok(devices) => {
                moved.add(&devices);
                report.done.push(Moved {
                    target: name,
                    devices,
                })
            }
            Err(failure) if failure.exit == Exit::Unreachable => {
                // Every other target would fail the same way.
                report.failed = Some((name, failure));
                break;
            }
            Err(failure) => {
                if failure.name == CONFLICT {
                    out.note(&format!("vfioctl: {name} left alone: {failure}"));
                } else {
                    out.note(&format!("vfioctl: cannot release {name}: {failure}"));
                }
                report.skipped.push((name, failure));
            }
        }
    }
    report
}

/// The devices of the sets moved so far in this call: vfiod moves a
/// target's whole set (its slot's functions, its IOMMU group), so a later
/// hostdev in one of them is already where it goes.
#[derive(Default)]
struct MovedSets(BTreeSet<PciAddress>);

impl MovedSets {
    fn add(&mut self, device_paths: &[String]) {
        self.0.extend(
            device_paths
                .iter()
                .filter_map(|path| address_from_device_path(path)),
        );
    }

    fn covers(&self, target: &Target) -> bool {
        matches!(target, Target::Device(address) if self.0.contains(address))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_prepare_begin_and_release_end_act() {
        assert_eq!(direction("prepare", "begin"), Some(Direction::Bind));
        assert_eq!(direction("release", "end"), Some(Direction::Release));
        for (op, sub) in [
            ("start", "begin"),
            ("started", "begin"),
            ("stopped", "end"),
            ("prepare", "end"),
            ("release", "begin"),
            ("migrate", "begin"),
            ("reconnect", "begin"),
            ("attach", "begin"),
        ] {
            assert_eq!(direction(op, sub), None, "{op} {sub}");
        }
    }
}
