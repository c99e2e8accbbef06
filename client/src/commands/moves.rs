//! `bind` and `release`: Manager.Bind/Release, one target after another,
//! with live progress on a terminal.

use std::future::Future;
use std::pin::pin;

use serde_json::{Value, json};
use vfiod_dbus::Direction;
use vfiod_dbus::proxy::{ManagerProxy, Options, TransitionProgress};
use vfiod_pci::PciAddress;
use zbus::{MessageStream, Variant};

use crate::bus::{self, Bus};
use crate::error::{Exit, Failure};
use crate::model::{Objects, address_from_path};
use crate::output::{self, Output, or_dash};

/// What the user asked for besides the targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveOptions {
    pub force: bool,
    pub vm: Option<String>,
    pub timeout_ms: Option<u32>,
}

impl MoveOptions {
    /// The a{sv} for the daemon: only options it knows, only when set
    /// (an unknown option is InvalidArgs; `force` means nothing to Release).
    pub fn to_dbus(&self, direction: Direction) -> Options<'_> {
        let mut options = Options::new();
        if self.force && direction == Direction::Bind {
            options.insert("force", Variant::from(true));
        }
        if let Some(vm) = &self.vm {
            options.insert("vm", Variant::from(vm.as_str()));
        }
        if let Some(ms) = self.timeout_ms {
            options.insert("timeout_ms", Variant::from(ms));
        }
        options
    }
}

/// Moves targets one at a time, showing the daemon's progress signals for
/// the target being moved.
pub struct Mover<'b> {
    bus: &'b Bus,
    manager: ManagerProxy<'static>,
    progress: Option<MessageStream>,
    out: Output,
}

impl<'b> Mover<'b> {
    /// Progress is shown when stderr is a terminal; the subscription is
    /// made here, before any call, so that no early step is missed.
    pub async fn new(bus: &'b Bus, out: &Output) -> Result<Mover<'b>, Failure> {
        let manager = bus.manager().await?;
        let progress = if out.stderr_tty {
            Some(bus.progress_signals().await?)
        } else {
            None
        };
        Ok(Mover {
            bus,
            manager,
            progress,
            out: *out,
        })
    }

    /// One Bind or Release; the object paths of the devices moved.
    pub async fn move_one(
        &mut self,
        direction: Direction,
        target: &str,
        options: &MoveOptions,
    ) -> Result<Vec<String>, Failure> {
        if self.progress.is_some() {
            // Heads the progress lines of this target.
            self.out.note(&format!("{direction} {target}"));
        }
        let manager = &self.manager;
        let call = async move {
            let options = options.to_dbus(direction);
            match direction {
                Direction::Bind => manager.bind(target, options).await,
                Direction::Release => manager.release(target, options).await,
            }
        };
        let result = with_progress(call, self.progress.as_mut(), target, &self.out).await;
        result
            .map(|paths| paths.iter().map(|p| p.as_str().to_owned()).collect())
            .map_err(|e| self.bus.failure(e))
    }
}

/// Awaits the call while printing the progress of `target`.
async fn with_progress<T>(
    call: impl Future<Output = T>,
    stream: Option<&mut MessageStream>,
    target: &str,
    out: &Output,
) -> T {
    let Some(stream) = stream else {
        return call.await;
    };
    let mut call = pin!(call);
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            signal = bus::next(stream), if open => match signal {
                Some(signal) => show_progress(&signal, target, out),
                None => open = false,
            },
            result = &mut call => {
                // Signals sent before the reply are queued already: show them.
                while let Some(signal) = bus::next_queued(stream) {
                    show_progress(&signal, target, out);
                }
                return result;
            }
        }
    }
}

fn show_progress(message: &zbus::Result<zbus::Message>, target: &str, out: &Output) {
    let Some(signal) = message
        .as_ref()
        .ok()
        .and_then(|m| TransitionProgress::from_message(m.clone()))
    else {
        return;
    };
    let Ok(args) = signal.args() else { return };
    if same_target(args.target(), target) {
        out.note(&format!("  {}  {}", args.device(), args.step()));
    }
}

/// The daemon may echo an address in its full form (`0000:01:00.0` for
/// `01:00.0`, any hex case); profile names never look like addresses.
pub fn same_target(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (a.parse::<PciAddress>(), b.parse::<PciAddress>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// One target that moved, with the object paths of its devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub target: String,
    pub devices: Vec<String>,
}

/// The error of a release for a VM that does not own the target.
pub const CONFLICT: &str = "org.vfiod1.Error.Conflict";

/// What a bind or release command did.
#[derive(Debug)]
pub struct Report {
    pub direction: Direction,
    pub done: Vec<Moved>,
    /// The target that failed and stopped the command, and why.
    pub failed: Option<(String, Failure)>,
    pub not_attempted: Vec<String>,
    /// Bound by this call, then released again after a failure (the hook).
    pub rolled_back: Vec<String>,
    /// Not moved, for a reason that stopped nothing else (the hook's
    /// release: Conflict means another VM owns it).
    pub skipped: Vec<(String, Failure)>,
}

impl Report {
    pub fn new(direction: Direction) -> Report {
        Report {
            direction,
            done: Vec::new(),
            failed: None,
            not_attempted: Vec::new(),
            rolled_back: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// The worst exit status; leaving another VM's device alone is right.
    pub fn exit(&self) -> Exit {
        let failed = self.failed.iter().map(|(_, f)| f.exit);
        let skipped = self
            .skipped
            .iter()
            .filter(|(_, f)| f.name != CONFLICT)
            .map(|(_, f)| f.exit);
        failed.chain(skipped).max().unwrap_or(Exit::Done)
    }
}

pub async fn run(
    bus: &Bus,
    out: &Output,
    direction: Direction,
    targets: &[String],
    options: &MoveOptions,
) -> Result<Exit, Failure> {
    let mut mover = Mover::new(bus, out).await?;
    let mut report = Report::new(direction);
    for (i, target) in targets.iter().enumerate() {
        match mover.move_one(direction, target, options).await {
            Ok(devices) => report.done.push(Moved {
                target: target.clone(),
                devices,
            }),
            Err(failure) => {
                report.failed = Some((target.clone(), failure));
                report.not_attempted = targets[i + 1..].to_vec();
                break;
            }
        }
    }
    let objects = read_moved(bus, &report, out).await;
    show_report(&report, objects.as_ref(), out)?;
    Ok(report.exit())
}

/// Where the moved devices are now, read after the moves: those devices
/// alone (and for JSON the profiles, as a device's JSON names its own), not
/// every object. If that fails the addresses still show.
pub async fn read_moved(bus: &Bus, report: &Report, out: &Output) -> Option<Objects> {
    if report.done.is_empty() {
        return None;
    }
    let mut paths: Vec<&str> = report
        .done
        .iter()
        .flat_map(|m| m.devices.iter().map(String::as_str))
        .collect();
    paths.sort_unstable();
    paths.dedup();
    bus.devices(&paths, out.json).await.ok()
}

/// Prints the report: results on stdout, the failure on stderr (and in
/// the JSON document, which stays one document).
pub fn show_report(
    report: &Report,
    objects: Option<&Objects>,
    out: &Output,
) -> Result<(), Failure> {
    if let Some((_, failure)) = &report.failed {
        out.note(&format!("vfioctl: {failure}"));
        if let Some(note) = partial_note(report) {
            out.note(&format!("vfioctl: {note}"));
        }
    }
    if out.json {
        out.print_json(&report_json(report, objects))
    } else {
        out.print(&report_human(report, objects))
    }
}

fn past_tense(direction: Direction) -> &'static str {
    match direction {
        Direction::Bind => "bound",
        Direction::Release => "released",
    }
}

/// After a failure: which target failed, what was done before it (and
/// undone again), and what was not tried.
fn partial_note(report: &Report) -> Option<String> {
    let (target, _) = report.failed.as_ref()?;
    if report.done.is_empty() && report.not_attempted.is_empty() && report.rolled_back.is_empty() {
        return None;
    }
    let mut note = format!("{} {target} failed", report.direction);
    if !report.done.is_empty() {
        let done: Vec<&str> = report.done.iter().map(|m| m.target.as_str()).collect();
        note.push_str(&format!(
            "; already {}: {}",
            past_tense(report.direction),
            done.join(", ")
        ));
    }
    if !report.rolled_back.is_empty() {
        note.push_str(&format!(
            "; bound, then released again: {}",
            report.rolled_back.join(", ")
        ));
    }
    if !report.not_attempted.is_empty() {
        note.push_str(&format!(
            "; not attempted: {}",
            report.not_attempted.join(", ")
        ));
    }
    Some(note)
}

fn report_human(report: &Report, objects: Option<&Objects>) -> String {
    let mut text = String::new();
    for moved in &report.done {
        text.push_str(&format!(
            "{} {}:\n",
            past_tense(report.direction),
            moved.target
        ));
        let rows: Vec<Vec<String>> = moved
            .devices
            .iter()
            .map(|path| match objects.and_then(|o| o.device_at(path)) {
                Some(d) => vec![
                    d.address.clone(),
                    or_dash(&d.driver).to_owned(),
                    d.name.clone(),
                ],
                None => vec![address_from_path(path).unwrap_or_else(|| path.clone())],
            })
            .collect();
        text.push_str(&output::table(&rows, "  "));
    }
    text
}

fn report_json(report: &Report, objects: Option<&Objects>) -> Value {
    let done: Vec<Value> = report
        .done
        .iter()
        .map(|moved| {
            let devices: Vec<Value> = moved
                .devices
                .iter()
                .map(|path| match objects.and_then(|o| o.device_at(path)) {
                    Some(d) => output::device_json(d, objects),
                    None => json!({ "address": address_from_path(path).unwrap_or_else(|| path.clone()) }),
                })
                .collect();
            json!({ "target": moved.target, "devices": devices })
        })
        .collect();
    let mut doc = json!({ "action": report.direction.as_str(), "done": done });
    if let Some((target, failure)) = &report.failed {
        let mut error = failure.to_json();
        error["target"] = Value::from(target.as_str());
        doc["error"] = error;
        doc["not_attempted"] = Value::from(report.not_attempted.clone());
    }
    if !report.rolled_back.is_empty() {
        doc["rolled_back"] = Value::from(report.rolled_back.clone());
    }
    if !report.skipped.is_empty() {
        let skipped: Vec<Value> = report
            .skipped
            .iter()
            .map(|(target, failure)| {
                let mut error = failure.to_json();
                error["target"] = Value::from(target.as_str());
                error
            })
            .collect();
        doc["skipped"] = Value::from(skipped);
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::sample;

    #[test]
    fn sends_only_known_options_and_only_when_set() {
        let none = MoveOptions::default();
        assert!(none.to_dbus(Direction::Bind).is_empty());
        let all = MoveOptions {
            force: true,
            vm: Some("win10".into()),
            timeout_ms: Some(5000),
        };
        let bind = all.to_dbus(Direction::Bind);
        let mut keys: Vec<&str> = bind.keys().copied().collect();
        keys.sort_unstable();
        assert_eq!(keys, ["force", "timeout_ms", "vm"]);
        assert_eq!(bind["force"], Variant::Bool(true));
        assert_eq!(bind["vm"], Variant::from("win10"));
        assert_eq!(bind["timeout_ms"], Variant::U32(5000));
        assert!(!all.to_dbus(Direction::Release).contains_key("force"));
    }

    #[test]
    fn targets_match_in_any_address_form() {
        assert!(same_target("rx580", "rx580"));
        assert!(same_target("0000:01:00.0", "01:00.0"));
        assert!(same_target("0000:0A:00.0", "0a:00.0"));
        assert!(!same_target("0000:01:00.0", "01:00.1"));
        assert!(!same_target("rx580", "usb3"));
    }

    fn report(failed: bool) -> Report {
        let mut report = Report::new(Direction::Bind);
        report.done.push(Moved {
            target: "rx580".into(),
            devices: vec![
                "/org/vfiod1/device/0000_01_00_0".into(),
                "/org/vfiod1/device/0000_01_00_1".into(),
            ],
        });
        if failed {
            report.failed = Some((
                "usb3".into(),
                Failure::from_dbus(
                    &vfiod_dbus::Error::Protected("keyboard behind 0000:04:00.0".into()),
                    false,
                ),
            ));
            report.not_attempted = vec!["nic".into()];
        }
        report
    }

    #[test]
    fn conflicts_do_not_fail_a_release() {
        let mut r = Report::new(Direction::Release);
        let conflict =
            Failure::from_dbus(&vfiod_dbus::Error::Conflict("owned by linux".into()), false);
        r.skipped.push(("rx580".into(), conflict));
        assert_eq!(r.exit(), Exit::Done);
        let kernel = Failure::from_dbus(
            &vfiod_dbus::Error::Kernel("amdgpu did not come back".into()),
            false,
        );
        r.skipped.push(("usb3".into(), kernel));
        assert_eq!(r.exit(), Exit::Failed);
        let doc = report_json(&r, None);
        assert_eq!(doc["skipped"][0]["target"], "rx580");
        assert_eq!(doc["skipped"][1]["name"], "org.vfiod1.Error.Kernel");
        assert_eq!(report(true).exit(), Exit::Failed);
        assert_eq!(report(false).exit(), Exit::Done);
    }

    #[test]
    fn a_rolled_back_bind_says_so() {
        let mut r = report(true);
        r.rolled_back = std::mem::take(&mut r.done)
            .into_iter()
            .map(|m| m.target)
            .collect();
        assert_eq!(
            partial_note(&r).unwrap(),
            "bind usb3 failed; bound, then released again: rx580; not attempted: nic"
        );
        assert_eq!(report_json(&r, None)["rolled_back"], json!(["rx580"]));
    }

    #[test]
    fn human_report_names_devices_and_drivers() {
        let o = sample();
        let text = report_human(&report(false), Some(&o));
        assert_eq!(
            text,
            "bound rx580:\n  0000:01:00.0  vfio-pci  Ellesmere\n  0000:01:00.1  vfio-pci  Ellesmere\n"
        );
        // Without the objects the addresses still show.
        let text = report_human(&report(false), None);
        assert_eq!(text, "bound rx580:\n  0000:01:00.0\n  0000:01:00.1\n");
    }

    #[test]
    fn a_failure_says_what_was_done_and_what_was_not() {
        let r = report(true);
        assert_eq!(
            partial_note(&r).unwrap(),
            "bind usb3 failed; already bound: rx580; not attempted: nic"
        );
        let doc = report_json(&r, Some(&sample()));
        assert_eq!(doc["action"], "bind");
        assert_eq!(doc["done"][0]["target"], "rx580");
        assert_eq!(doc["done"][0]["devices"][1]["driver"], "vfio-pci");
        assert_eq!(doc["error"]["name"], "org.vfiod1.Error.Protected");
        assert_eq!(doc["error"]["target"], "usb3");
        assert_eq!(doc["not_attempted"], json!(["nic"]));
        let ok = report_json(&report(false), None);
        assert!(ok.get("error").is_none());
        assert_eq!(
            ok["done"][0]["devices"][0],
            json!({"address": "0000:01:00.0"})
        );
    }
}
