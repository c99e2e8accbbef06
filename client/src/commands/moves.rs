//! `bind` and `release`: Manager.Bind/Release, one target after another,
//! with live progress on a terminal.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;

use serde_json::{Value, json};
use vfiod_dbus::Direction;
use vfiod_dbus::names::{DEVICE_INTERFACE, DEVICE_PATH_PREFIX};
use vfiod_dbus::proxy::{ManagerProxy, Options, TransitionProgress};
use vfiod_pci::PciAddress;
use zbus::message::Type;
use zbus::{Message, MessageStream, Variant};

use crate::bus::{self, Bus, Properties};
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
    /// Every message the connection receives: vfiod sends the caller of a
    /// move each moved device's properties just before the answer.
    inbox: MessageStream,
    /// Those properties by object path, the latest of each.
    told: HashMap<String, Properties>,
    out: Output,
}

impl<'b> Mover<'b> {
    /// Progress is shown when stderr is a terminal; the subscription is
    /// made here, before any call, so that no early step is missed.
    pub async fn new(bus: &'b Bus, out: &Output) -> Result<Mover<'b>, Failure> {
        let inbox = bus.inbox();
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
            inbox,
            told: HashMap::new(),
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
            manager
                .move_answered(direction, target, options.to_dbus(direction))
                .await
        };
        let watch = Watch {
            progress: self.progress.as_mut(),
            inbox: &mut self.inbox,
            target,
            out: &self.out,
        };
        let (result, received) = watch.during(call).await;
        let (paths, reply) = result.map_err(|e| self.bus.failure(e))?;
        let paths: Vec<String> = paths.iter().map(|p| p.as_str().to_owned()).collect();
        if let Some(daemon) = reply.header().sender() {
            self.told
                .extend(told_properties(&received, daemon.as_str(), &paths));
        }
        Ok(paths)
    }

    /// What vfiod sent with its answers: properties by object path. Ends
    /// the mover, and with it the inbox, which no one would read any more
    /// (a full one would hold up the connection's later answers).
    pub fn into_told(self) -> HashMap<String, Properties> {
        self.told
    }
}

/// The streams a move's call is awaited with.
struct Watch<'m> {
    progress: Option<&'m mut MessageStream>,
    inbox: &'m mut MessageStream,
    target: &'m str,
    out: &'m Output,
}

impl Watch<'_> {
    /// Awaits the call while printing the progress of the target and
    /// keeping what may be vfiod's word to the caller alone; the inbox is
    /// read all along, as an unread one would stall the connection.
    async fn during<T>(mut self, call: impl Future<Output = T>) -> (T, Vec<Message>) {
        let mut call = pin!(call);
        let mut received = Vec::new();
        let mut progress_open = self.progress.is_some();
        loop {
            tokio::select! {
                biased;
                signal = next_of(self.progress.as_deref_mut()), if progress_open => match signal {
                    Some(signal) => show_progress(&signal, self.target, self.out),
                    None => progress_open = false,
                },
                message = bus::next(self.inbox) => {
                    if let Some(Ok(message)) = message {
                        keep_if_told(&mut received, message);
                    }
                }
                result = &mut call => {
                    // What came before the reply is queued already.
                    if let Some(stream) = self.progress.as_deref_mut() {
                        while let Some(signal) = bus::next_queued(stream) {
                            show_progress(&signal, self.target, self.out);
                        }
                    }
                    while let Some(message) = bus::next_queued(self.inbox) {
                        if let Ok(message) = message {
                            keep_if_told(&mut received, message);
                        }
                    }
                    return (result, received);
                }
            }
        }
    }
}

/// The next item of an optional stream; none never comes.
async fn next_of(stream: Option<&mut MessageStream>) -> Option<zbus::Result<Message>> {
    match stream {
        Some(stream) => bus::next(stream).await,
        None => std::future::pending().await,
    }
}

/// Keeps a PropertiesChanged of a device object sent to this connection
/// alone; who sent it is checked against the answer's sender later.
fn keep_if_told(received: &mut Vec<Message>, message: Message) {
    let header = message.header();
    let addressed = header.destination().is_some();
    let is_device_change = header.message_type() == Type::Signal
        && header.member().is_some_and(|m| m == "PropertiesChanged")
        && header
            .path()
            .is_some_and(|p| p.as_str().starts_with(DEVICE_PATH_PREFIX));
    if addressed && is_device_change {
        received.push(message);
    }
}

/// The Device properties `daemon` sent for `paths`, by path.
fn told_properties(
    received: &[Message],
    daemon: &str,
    paths: &[String],
) -> HashMap<String, Properties> {
    let mut told = HashMap::new();
    for message in received {
        let header = message.header();
        let (Some(sender), Some(path)) = (header.sender(), header.path()) else {
            continue;
        };
        if sender.as_str() != daemon || !paths.iter().any(|p| p == path.as_str()) {
            continue;
        }
        let Ok((interface, properties, _)) = message
            .body()
            .deserialize::<(String, Properties, Vec<String>)>()
        else {
            continue;
        };
        if interface == DEVICE_INTERFACE {
            told.insert(path.as_str().to_owned(), properties);
        }
    }
    told
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
    let told = mover.into_told();
    let objects = read_moved(bus, &report, out, &told).await;
    show_report(&report, objects.as_ref(), out)?;
    Ok(report.exit())
}

/// Where the moved devices are now: what vfiod sent with its answers
/// (`told`), or else read after the moves: those devices alone (and for
/// JSON the profiles, as a device's JSON names its own), not every object.
/// If that fails the addresses still show.
pub async fn read_moved(
    bus: &Bus,
    report: &Report,
    out: &Output,
    told: &HashMap<String, Properties>,
) -> Option<Objects> {
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
    if !out.json && paths.iter().all(|p| told.contains_key(*p)) {
        let devices = paths.iter().map(|p| (p.to_string(), told[*p].clone()));
        return Some(bus::device_objects(devices));
    }
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
    use zbus::OwnedVariant;

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

    /// A PropertiesChanged of `path` from `sender`, to `destination` if any.
    fn device_change(path: &str, sender: &str, destination: Option<&str>, driver: &str) -> Message {
        let mut builder =
            Message::signal(path, "org.freedesktop.DBus.Properties", "PropertiesChanged")
                .sender(sender);
        if let Some(destination) = destination {
            builder = builder.destination(destination);
        }
        let properties: HashMap<&str, Variant> = HashMap::from([("Driver", Variant::from(driver))]);
        builder
            .build(&(DEVICE_INTERFACE, properties, Vec::<String>::new()))
            .unwrap()
    }

    #[test]
    fn only_what_vfiod_told_this_caller_of_its_devices_counts() {
        let gpu = "/org/vfiod1/device/0000_01_00_0";
        let audio = "/org/vfiod1/device/0000_01_00_1";
        let mut received = Vec::new();
        for message in [
            device_change(gpu, ":1.5", Some(":1.9"), "amdgpu"),
            // Later news of the same device wins.
            device_change(gpu, ":1.5", Some(":1.9"), "vfio-pci"),
            // Broadcast to every listener: not the caller's copy.
            device_change(audio, ":1.5", None, "vfio-pci"),
            // From someone else than the daemon that answered.
            device_change(audio, ":1.7", Some(":1.9"), "snd_hda_intel"),
            // A device the move did not return.
            device_change(
                "/org/vfiod1/device/0000_03_00_0",
                ":1.5",
                Some(":1.9"),
                "xhci_hcd",
            ),
        ] {
            keep_if_told(&mut received, message);
        }
        assert_eq!(received.len(), 4, "the broadcast is not kept");
        let told = told_properties(&received, ":1.5", &[gpu.to_owned(), audio.to_owned()]);
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(
            told[gpu]["Driver"],
            OwnedVariant::try_from(Variant::from("vfio-pci")).unwrap()
        );
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
