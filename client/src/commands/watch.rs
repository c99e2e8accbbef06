//! `watch`: every change of vfiod's objects, one line each, as it happens.
//!
//! One match rule, `type='signal',sender='org.vfiod1',path_namespace='/org/vfiod1'`,
//! takes PropertiesChanged of every object, InterfacesAdded/Removed and the
//! Transition* signals; a second one follows the daemon coming and going.

use std::collections::BTreeMap;
use std::io;
use std::num::NonZeroUsize;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};
use vfiod_dbus::names::{
    BUS_NAME, DEVICE_PATH_PREFIX, MANAGER_INTERFACE, MANAGER_PATH, PROFILE_PATH_PREFIX,
};
use zbus::fdo::DBusProxy;
use zbus::message::{Message, Type};
use zbus::names::BusName;
use zbus::{MatchRule, MessageStream, ObjectPath, Variant};

use crate::bus::{self, Bus};
use crate::error::{Exit, Failure};
use crate::model::address_from_path;
use crate::output::Output;

/// Signals a burst of moves may queue before we print them.
const QUEUE: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Properties {
        interface: String,
        changed: BTreeMap<String, Value>,
        invalidated: Vec<String>,
    },
    Added {
        interfaces: BTreeMap<String, BTreeMap<String, Value>>,
    },
    Removed {
        interfaces: Vec<String>,
    },
    TransitionStarted {
        target: String,
        direction: String,
    },
    TransitionProgress {
        target: String,
        device: String,
        step: String,
    },
    TransitionFinished {
        target: String,
        direction: String,
        error: String,
    },
    /// vfiod took or left its bus name.
    Daemon {
        owner: Option<String>,
    },
    /// A signal this client does not know.
    Other {
        interface: String,
        member: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub time: SystemTime,
    /// The object path; `None` for the daemon itself.
    pub object: Option<String>,
    pub change: Change,
}

pub async fn run(bus: &Bus, out: &Output) -> Result<Exit, Failure> {
    let conn = bus.connection();
    let rule = MatchRule::builder()
        .msg_type(Type::Signal)
        .sender(BUS_NAME)
        .path_namespace(MANAGER_PATH)
        .build()
        .map_err(|e| bus.failure(e))?;
    let mut signals = MessageStream::for_match_rule(rule, conn, NonZeroUsize::new(QUEUE))
        .await
        .map_err(|e| bus.failure(e))?;
    let dbus = DBusProxy::new(conn).await.map_err(|e| bus.failure(e))?;
    let mut owners = dbus
        .receive_name_owner_changed_with_args(&[(0, BUS_NAME)])
        .await
        .map_err(|e| bus.failure(e))?;
    // Subscribed first, so a daemon that starts now is not missed.
    let name = BusName::try_from(BUS_NAME).map_err(|e| bus.failure(e))?;
    if !dbus
        .name_has_owner(name)
        .await
        .map_err(|e| bus.failure(e))?
    {
        out.warn("vfiod is not running (org.vfiod1 is not on the system bus); waiting for it");
    }
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_failure)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(signal_failure)?;

    loop {
        let event = tokio::select! {
            message = bus::next(&mut signals) => match message {
                Some(Ok(message)) => decode(&message),
                Some(Err(_)) => None,
                None => return Err(lost(bus)),
            },
            owner = bus::next(&mut owners) => match owner {
                Some(signal) => signal.args().ok().map(|args| Event {
                    time: SystemTime::now(),
                    object: None,
                    change: Change::Daemon {
                        owner: args.new_owner().as_ref().map(|o| o.to_string()),
                    },
                }),
                None => return Err(lost(bus)),
            },
            _ = interrupt.recv() => return Ok(Exit::Done),
            _ = terminate.recv() => return Ok(Exit::Done),
        };
        let Some(event) = event else { continue };
        let line = if out.json {
            event_json(&event).to_string()
        } else {
            event_human(&event)
        };
        match out.write_stdout(&format!("{line}\n")) {
            Ok(()) => {}
            // Whoever read our output is gone: so is the point of watching.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(Exit::Done),
            Err(e) => {
                return Err(Failure::local(
                    "Output",
                    format!("cannot write to stdout: {e}"),
                ));
            }
        }
    }
}

fn signal_failure(e: io::Error) -> Failure {
    Failure::local("Signal", format!("cannot handle signals: {e}"))
}

fn lost(bus: &Bus) -> Failure {
    bus.failure(zbus::Error::InputOutput(
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the connection to the system bus was lost",
        )
        .into(),
    ))
}

/// The event a signal announces; `None` for one that cannot be read.
pub fn decode(message: &Message) -> Option<Event> {
    let header = message.header();
    let object = header.path()?.as_str().to_owned();
    let interface = header.interface()?.as_str().to_owned();
    let member = header.member()?.as_str().to_owned();
    let body = message.body();
    let change = match (interface.as_str(), member.as_str()) {
        ("org.freedesktop.DBus.Properties", "PropertiesChanged") => {
            let (interface, changed, invalidated): (
                String,
                BTreeMap<String, Variant<'_>>,
                Vec<String>,
            ) = body.deserialize().ok()?;
            Change::Properties {
                interface,
                changed: changed
                    .iter()
                    .map(|(k, v)| (k.clone(), to_json(v)))
                    .collect(),
                invalidated,
            }
        }
        ("org.freedesktop.DBus.ObjectManager", "InterfacesAdded") => {
            let (path, interfaces): (
                ObjectPath<'_>,
                BTreeMap<String, BTreeMap<String, Variant<'_>>>,
            ) = body.deserialize().ok()?;
            return Some(Event {
                time: SystemTime::now(),
                object: Some(path.as_str().to_owned()),
                change: Change::Added {
                    interfaces: interfaces
                        .iter()
                        .map(|(i, props)| {
                            (
                                i.clone(),
                                props.iter().map(|(k, v)| (k.clone(), to_json(v))).collect(),
                            )
                        })
                        .collect(),
                },
            });
        }
        ("org.freedesktop.DBus.ObjectManager", "InterfacesRemoved") => {
            let (path, interfaces): (ObjectPath<'_>, Vec<String>) = body.deserialize().ok()?;
            return Some(Event {
                time: SystemTime::now(),
                object: Some(path.as_str().to_owned()),
                change: Change::Removed { interfaces },
            });
        }
        (MANAGER_INTERFACE, "TransitionStarted") => {
            let (target, direction): (String, String) = body.deserialize().ok()?;
            Change::TransitionStarted { target, direction }
        }
        (MANAGER_INTERFACE, "TransitionProgress") => {
            let (target, device, step): (String, String, String) = body.deserialize().ok()?;
            Change::TransitionProgress {
                target,
                device,
                step,
            }
        }
        (MANAGER_INTERFACE, "TransitionFinished") => {
            let (target, direction, error): (String, String, String) = body.deserialize().ok()?;
            Change::TransitionFinished {
                target,
                direction,
                error,
            }
        }
        _ => Change::Other { interface, member },
    };
    Some(Event {
        time: SystemTime::now(),
        object: Some(object),
        change,
    })
}

/// A property value as JSON: numbers, strings and lists as themselves,
/// anything more exotic as its D-Bus text form.
pub fn to_json(value: &Variant<'_>) -> Value {
    match value {
        Variant::U8(n) => json!(n),
        Variant::Bool(b) => json!(b),
        Variant::I16(n) => json!(n),
        Variant::U16(n) => json!(n),
        Variant::I32(n) => json!(n),
        Variant::U32(n) => json!(n),
        Variant::I64(n) => json!(n),
        Variant::U64(n) => json!(n),
        Variant::F64(n) => json!(n),
        Variant::Str(s) => json!(s.as_str()),
        Variant::ObjectPath(p) => json!(p.as_str()),
        Variant::Variant(inner) => to_json(inner),
        Variant::Array(a) => Value::Array(a.inner().iter().map(to_json).collect()),
        other => json!(other.to_string()),
    }
}

/// `device 0000:01:00.0`, `profile rx-580`, `manager`: what a reader
/// recognizes, from the object path.
pub fn object_name(path: &str) -> String {
    if path == MANAGER_PATH {
        return "manager".into();
    }
    if path.starts_with(DEVICE_PATH_PREFIX)
        && let Some(address) = address_from_path(path)
    {
        return format!("device {address}");
    }
    if let Some(escaped) = path.strip_prefix(PROFILE_PATH_PREFIX) {
        return format!("profile {}", unescape(escaped));
    }
    path.to_owned()
}

/// Reverses the object-path escape: `_2d` -> `-`.
fn unescape(element: &str) -> String {
    let bytes = element.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_'
            && let Some(byte) = element
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A value for a human: plain words bare, anything with spaces quoted.
fn show_value(value: &Value) -> String {
    match value {
        Value::String(s) if s.is_empty() || s.contains(char::is_whitespace) => format!("{s:?}"),
        Value::String(s) => s.clone(),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(show_value).collect::<Vec<_>>().join(", ")
        ),
        other => other.to_string(),
    }
}

fn show_properties(props: &BTreeMap<String, Value>) -> String {
    props
        .iter()
        .map(|(k, v)| format!("{k}={}", show_value(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn event_human(event: &Event) -> String {
    let object = event
        .object
        .as_deref()
        .map_or_else(|| "vfiod".to_owned(), object_name);
    let what = match &event.change {
        Change::Properties {
            changed,
            invalidated,
            ..
        } => {
            let mut parts = show_properties(changed);
            for name in invalidated {
                parts.push_str(&format!(" {name} changed"));
            }
            parts.trim_start().to_owned()
        }
        Change::Added { interfaces } => {
            let mut parts = vec![format!(
                "added {}",
                interfaces.keys().cloned().collect::<Vec<_>>().join(", ")
            )];
            parts.extend(
                interfaces
                    .values()
                    .filter(|p| !p.is_empty())
                    .map(show_properties),
            );
            parts.join(" ")
        }
        Change::Removed { interfaces } => format!("removed {}", interfaces.join(", ")),
        Change::TransitionStarted { target, direction } => format!("{direction} {target}: started"),
        Change::TransitionProgress {
            target,
            device,
            step,
        } => format!("{target}: {device}: {step}"),
        Change::TransitionFinished {
            target,
            direction,
            error,
        } if error.is_empty() => format!("{direction} {target}: done"),
        Change::TransitionFinished {
            target,
            direction,
            error,
        } => format!("{direction} {target}: failed: {error}"),
        Change::Daemon { owner: Some(owner) } => format!("started ({owner})"),
        Change::Daemon { owner: None } => "stopped".into(),
        Change::Other { interface, member } => format!("signal {interface}.{member}"),
    };
    format!("{}  {object}  {what}", rfc3339(event.time))
}

pub fn event_json(event: &Event) -> Value {
    let mut doc = match &event.change {
        Change::Properties {
            interface,
            changed,
            invalidated,
        } => {
            json!({ "event": "changed", "interface": interface, "changed": changed, "invalidated": invalidated })
        }
        Change::Added { interfaces } => json!({ "event": "added", "interfaces": interfaces }),
        Change::Removed { interfaces } => json!({ "event": "removed", "interfaces": interfaces }),
        Change::TransitionStarted { target, direction } => {
            json!({ "event": "transition-started", "target": target, "direction": direction })
        }
        Change::TransitionProgress {
            target,
            device,
            step,
        } => {
            json!({ "event": "transition-progress", "target": target, "device": device, "step": step })
        }
        Change::TransitionFinished {
            target,
            direction,
            error,
        } => json!({
            "event": "transition-finished", "target": target, "direction": direction,
            "error": if error.is_empty() { Value::Null } else { Value::from(error.as_str()) },
        }),
        Change::Daemon { owner } => {
            json!({ "event": "daemon", "running": owner.is_some(), "owner": owner })
        }
        Change::Other { interface, member } => {
            json!({ "event": "signal", "interface": interface, "member": member })
        }
    };
    doc["time"] = Value::from(rfc3339(event.time));
    doc["object"] = event.object.as_deref().map_or(Value::Null, Value::from);
    doc
}

/// `2026-11-25T21:30:00.123Z`: UTC, so that it needs no time zone data.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(at(1_795_638_600, 123)), "2026-11-25T20:30:00.123Z");
    }

    #[test]
    fn objects_get_readable_names() {
        assert_eq!(object_name("/org/vfiod1"), "manager");
        assert_eq!(
            object_name("/org/vfiod1/device/0000_01_00_0"),
            "device 0000:01:00.0"
        );
        assert_eq!(
            object_name("/org/vfiod1/profile/rx_2d580"),
            "profile rx-580"
        );
        assert_eq!(object_name("/org/vfiod1/profile/a_b"), "profile a_b");
        assert_eq!(object_name("/org/vfiod1/other"), "/org/vfiod1/other");
    }

    fn signal(path: &str, interface: &str, member: &str) -> zbus::message::Builder<'static> {
        Message::signal(path.to_owned(), interface.to_owned(), member.to_owned())
    }

    #[test]
    fn decodes_property_changes() {
        let mut changed: HashMap<&str, Variant<'_>> = HashMap::new();
        changed.insert("Driver", Variant::from("vfio-pci"));
        changed.insert("State", Variant::from("vfio"));
        changed.insert("IommuGroup", Variant::from(1i32));
        let message = signal(
            "/org/vfiod1/device/0000_01_00_0",
            "org.freedesktop.DBus.Properties",
            "PropertiesChanged",
        )
        .build(&("org.vfiod1.Device", changed, vec!["Owner"]))
        .unwrap();
        let mut event = decode(&message).unwrap();
        event.time = at(0, 0);
        assert_eq!(
            event_human(&event),
            "1970-01-01T00:00:00.000Z  device 0000:01:00.0  Driver=vfio-pci IommuGroup=1 State=vfio Owner changed"
        );
        assert_eq!(
            event_json(&event),
            json!({
                "time": "1970-01-01T00:00:00.000Z", "object": "/org/vfiod1/device/0000_01_00_0",
                "event": "changed", "interface": "org.vfiod1.Device",
                "changed": {"Driver": "vfio-pci", "State": "vfio", "IommuGroup": 1},
                "invalidated": ["Owner"],
            })
        );
    }

    #[test]
    fn decodes_transitions_and_objects() {
        let message = signal(MANAGER_PATH, MANAGER_INTERFACE, "TransitionProgress")
            .build(&("rx580", "0000:01:00.0", "unbind amdgpu"))
            .unwrap();
        let event = decode(&message).unwrap();
        assert!(event_human(&event).ends_with("  manager  rx580: 0000:01:00.0: unbind amdgpu"));
        assert_eq!(event_json(&event)["event"], "transition-progress");

        let message = signal(MANAGER_PATH, MANAGER_INTERFACE, "TransitionFinished")
            .build(&(
                "rx580",
                "bind",
                "org.vfiod1.Error.DeviceBusy: pipewire holds /dev/snd/pcmC1D3p",
            ))
            .unwrap();
        let event = decode(&message).unwrap();
        assert!(event_human(&event).ends_with(
            "bind rx580: failed: org.vfiod1.Error.DeviceBusy: pipewire holds /dev/snd/pcmC1D3p"
        ));
        let message = signal(MANAGER_PATH, MANAGER_INTERFACE, "TransitionFinished")
            .build(&("rx580", "bind", ""))
            .unwrap();
        assert_eq!(event_json(&decode(&message).unwrap())["error"], Value::Null);

        let path = ObjectPath::try_from("/org/vfiod1/profile/usb3").unwrap();
        let message = signal(
            MANAGER_PATH,
            "org.freedesktop.DBus.ObjectManager",
            "InterfacesRemoved",
        )
        .build(&(path, vec!["org.vfiod1.Profile"]))
        .unwrap();
        let event = decode(&message).unwrap();
        assert_eq!(event.object.as_deref(), Some("/org/vfiod1/profile/usb3"));
        assert!(event_human(&event).ends_with("  profile usb3  removed org.vfiod1.Profile"));

        // A malformed body is skipped, not fatal.
        let message = signal(MANAGER_PATH, MANAGER_INTERFACE, "TransitionStarted")
            .build(&(1u32,))
            .unwrap();
        assert!(decode(&message).is_none());
    }

    #[test]
    fn daemon_presence_events() {
        let started = Event {
            time: at(0, 0),
            object: None,
            change: Change::Daemon {
                owner: Some(":1.42".into()),
            },
        };
        assert_eq!(
            event_human(&started),
            "1970-01-01T00:00:00.000Z  vfiod  started (:1.42)"
        );
        assert_eq!(event_json(&started)["running"], true);
        assert_eq!(event_json(&started)["object"], Value::Null);
    }
}
