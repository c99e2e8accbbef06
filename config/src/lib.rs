//! The daemon's configuration, `/etc/vfiod/vfiod.toml` (DESIGN §6).
//!
//! The file is read into span-carrying raw types first, so that every
//! refusal — TOML syntax, unknown keys, bad values and the semantic rules
//! checked here — names the file, the line and the column of the offence.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::io;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use vfiod_pci::{PciAddress, PciId};

/// Where the daemon looks when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/vfiod/vfiod.toml";

pub const DEFAULT_UNBIND_TIMEOUT_MS: u64 = 10_000;

/// Below 100 ms a healthy driver cannot unbind; above ten minutes a hung
/// one would hold a transition forever.
pub const UNBIND_TIMEOUT_RANGE_MS: RangeInclusive<u64> = 100..=600_000;

/// Profile names and VM names share this limit (libvirt's domain names are
/// far shorter in practice; object paths grow up to 3x per byte).
pub const MAX_NAME_LEN: usize = 64;

/// A snippet line longer than this is not shown: the reason and the
/// position already say what is wrong.
const MAX_SNIPPET_CHARS: usize = 160;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub profiles: BTreeMap<String, Profile>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Bounds each kernel write (an `unbind` may block for as long as the
    /// driver wants).
    pub unbind_timeout_ms: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            unbind_timeout_ms: DEFAULT_UNBIND_TIMEOUT_MS,
        }
    }
}

impl DaemonConfig {
    pub fn unbind_timeout(&self) -> Duration {
        Duration::from_millis(self.unbind_timeout_ms)
    }
}

/// A named set of devices that moves as one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    pub devices: Vec<PciAddress>,
    pub ids: Vec<PciId>,
    /// libvirt domains that use it (the hook binds it for them).
    pub vms: Vec<String>,
    pub boot: BootState,
    /// What vfiod writes to each function's `reset_method` (kernel >= 5.15)
    /// at start, on reload and before each bind: the kernel's method names,
    /// one space apart (e.g. `device_specific` for vendor-reset, `bus`).
    pub reset_method: Option<String>,
    /// This profile may take the display (DESIGN §10): before a bind of a
    /// set that carries it, vfiod stops the display manager, unbinds fbcon
    /// and the boot framebuffer, and gives them back at release.
    pub handoff: bool,
}

/// Where a profile's devices go when vfiod starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootState {
    #[default]
    Host,
    Vfio,
}

impl BootState {
    pub fn as_str(self) -> &'static str {
        match self {
            BootState::Host => "host",
            BootState::Vfio => "vfio",
        }
    }
}

impl fmt::Display for BootState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Profile {
    /// True when the device is listed by address or by id.
    pub fn matches(&self, address: &PciAddress, id: &PciId) -> bool {
        self.devices.contains(address) || self.ids.contains(id)
    }
}

impl Config {
    /// Reads `path`; an absent file is the default config (no profiles).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses and validates `text`; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => ConfigError::at(path, text, span, e.message().to_string()),
            // Without a position toml's own rendering names the key path.
            None => ConfigError::Invalid {
                path: path.to_path_buf(),
                position: None,
                reason: e.to_string().trim_end().to_string(),
            },
        })?;
        raw.validate()
            .map_err(|(span, reason)| ConfigError::at(path, text, span, reason))
    }

    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.get(name)
    }
}

/// A refused config file. Display is the whole human message:
/// `FILE: line N, column C: reason`, then the offending line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "invalid config file {}{}: {reason}{}",
        path.display(),
        At(position.as_ref()),
        Snippet(position.as_ref())
    )]
    Invalid {
        path: PathBuf,
        position: Option<Position>,
        reason: String,
    },
}

/// Where in the file an error is, with the line itself for context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// The offending line with a caret underneath; empty when the line is
    /// too long to show.
    pub snippet: String,
}

/// `: line N, column C`, or nothing.
struct At<'a>(Option<&'a Position>);

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(p) => write!(f, ": line {}, column {}", p.line, p.column),
            None => Ok(()),
        }
    }
}

/// The snippet on the lines after the reason, so the first line reads alone.
struct Snippet<'a>(Option<&'a Position>);

impl fmt::Display for Snippet<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(p) if !p.snippet.is_empty() => write!(f, "\n{}", p.snippet),
            _ => Ok(()),
        }
    }
}

impl ConfigError {
    fn at(path: &Path, text: &str, span: Range<usize>, reason: String) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            position: Some(Position::locate(text, span)),
            reason,
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            ConfigError::Read { path, .. } | ConfigError::Invalid { path, .. } => path,
        }
    }

    /// The 1-based line of the error, when it has one.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid {
                position: Some(p), ..
            } => Some(p.line),
            _ => None,
        }
    }
}

impl Position {
    /// Turns a byte span into a line, a column and a snippet. Spans come
    /// from toml and are in bounds, but nothing here trusts that.
    fn locate(text: &str, span: Range<usize>) -> Position {
        let start = floor_char_boundary(text, span.start);
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line = text[..line_start].matches('\n').count() + 1;
        let content = text[line_start..line_end].trim_end_matches('\r');
        let before = &text[line_start..start];
        let column = before.chars().count() + 1;

        let snippet = if content.chars().count() > MAX_SNIPPET_CHARS {
            String::new()
        } else {
            let end = floor_char_boundary(text, span.end.clamp(start, line_end));
            let width = text[start..end].chars().count().max(1);
            // Keep tabs so the caret lines up; neutralise other control
            // characters so a hostile file cannot drive the terminal.
            let shown: String = content
                .chars()
                .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
                .collect();
            let pad: String = before
                .chars()
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            let gutter = " ".repeat(line.to_string().len());
            format!(
                "{gutter} |\n{line} | {shown}\n{gutter} | {pad}{}",
                "^".repeat(width)
            )
        };
        Position {
            line,
            column,
            snippet,
        }
    }
}

fn floor_char_boundary(text: &str, mut index: usize) -> usize {
    index = index.min(text.len());
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

// The file as written, with the spans the errors need.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    profiles: BTreeMap<Spanned<String>, RawProfile>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    unbind_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    // Strings, parsed in `validate`: an error inside a list would otherwise
    // point at the list, not at the bad element.
    #[serde(default)]
    devices: Vec<Spanned<String>>,
    #[serde(default)]
    ids: Vec<Spanned<String>>,
    #[serde(default)]
    vms: Vec<Spanned<String>>,
    #[serde(default)]
    boot: BootState,
    reset_method: Option<Spanned<String>>,
    handoff: Option<Spanned<bool>>,
}

type Problem = (Range<usize>, String);

/// What the profiles seen so far have claimed, to refuse a second claim.
#[derive(Default)]
struct Claims {
    addresses: HashMap<PciAddress, String>,
    ids: HashMap<PciId, String>,
    object_paths: HashMap<String, String>,
}

impl RawConfig {
    /// Checks the rules serde cannot express. Every problem is found; the
    /// first one in the file is reported, as a reader fixes them top-down.
    fn validate(self) -> Result<Config, Problem> {
        let mut problems: Vec<Problem> = Vec::new();

        let unbind_timeout_ms = match self.daemon.unbind_timeout_ms {
            Some(t) => {
                if !UNBIND_TIMEOUT_RANGE_MS.contains(t.get_ref()) {
                    problems.push((
                        t.span(),
                        format!(
                            "unbind_timeout_ms = {} is out of range: it must be between {} and {} (milliseconds)",
                            t.get_ref(),
                            UNBIND_TIMEOUT_RANGE_MS.start(),
                            UNBIND_TIMEOUT_RANGE_MS.end()
                        ),
                    ));
                }
                t.into_inner()
            }
            None => DEFAULT_UNBIND_TIMEOUT_MS,
        };

        // In file order, so "in profile X and in profile Y" names the
        // earlier one first and points at the later one.
        let mut raw_profiles: Vec<_> = self.profiles.into_iter().collect();
        raw_profiles.sort_by_key(|(name, _)| name.span().start);

        let mut claims = Claims::default();
        let mut profiles = BTreeMap::new();
        for (name, raw) in raw_profiles {
            let profile = raw.validate(&name, &mut claims, &mut problems);
            profiles.insert(name.into_inner(), profile);
        }

        match problems.into_iter().min_by_key(|(span, _)| span.start) {
            Some(problem) => Err(problem),
            None => Ok(Config {
                daemon: DaemonConfig { unbind_timeout_ms },
                profiles,
            }),
        }
    }
}

impl RawProfile {
    fn validate(
        self,
        name: &Spanned<String>,
        claims: &mut Claims,
        problems: &mut Vec<Problem>,
    ) -> Profile {
        let header = name.span();
        let name = name.get_ref();
        if let Err(reason) = check_name(name) {
            problems.push((header.clone(), format!("profile name {name:?} {reason}")));
        }
        // Distinct names must not share a D-Bus object path (`-` is
        // escaped as `_2d`, so "a-b" and "a_2db" would).
        let path = object_path_component(name);
        if let Some(other) = claim(&mut claims.object_paths, path.clone(), name) {
            problems.push((
                header.clone(),
                format!(
                    "profiles {other:?} and {name:?} would share the D-Bus object path /org/vfiod1/profile/{path}: rename one"
                ),
            ));
        }

        let devices: Vec<Spanned<PciAddress>> =
            parse_list(&self.devices, name, "devices", problems);
        let ids: Vec<Spanned<PciId>> = parse_list(&self.ids, name, "ids", problems);
        if self.devices.is_empty() && self.ids.is_empty() {
            problems.push((
                header.clone(),
                format!(
                    "profile {name:?} names no device: it needs a non-empty `devices` (PCI addresses) or `ids` (vendor:device ids)"
                ),
            ));
        }
        for (span, address) in duplicates(&devices) {
            problems.push((
                span,
                format!("profile {name:?}: `devices` lists {address} twice"),
            ));
        }
        for (span, id) in duplicates(&ids) {
            problems.push((span, format!("profile {name:?}: `ids` lists {id} twice")));
        }
        for (span, vm) in duplicates(&self.vms) {
            problems.push((span, format!("profile {name:?}: `vms` lists {vm:?} twice")));
        }
        for vm in &self.vms {
            if let Err(reason) = check_vm_name(vm.get_ref()) {
                problems.push((
                    vm.span(),
                    format!("profile {name:?}: vm name {:?} {reason}", vm.get_ref()),
                ));
            }
        }

        // A device in two profiles would have two owners and two states.
        for address in &devices {
            if let Some(other) = claim(&mut claims.addresses, *address.get_ref(), name) {
                problems.push((
                    address.span(),
                    format!(
                        "{} is in profile {other:?} and in profile {name:?}: a device belongs to one profile at most",
                        address.get_ref()
                    ),
                ));
            }
        }
        for id in &ids {
            if let Some(other) = claim(&mut claims.ids, *id.get_ref(), name) {
                problems.push((
                    id.span(),
                    format!(
                        "id {} is in profile {other:?} and in profile {name:?}: a device belongs to one profile at most",
                        id.get_ref()
                    ),
                ));
            }
        }

        let reset_method =
            self.reset_method
                .and_then(|value| match check_reset_method(value.get_ref()) {
                    Ok(methods) => Some(methods),
                    Err(reason) => {
                        problems.push((
                            value.span(),
                            format!(
                                "profile {name:?}: reset_method {:?} {reason}",
                                value.get_ref()
                            ),
                        ));
                        None
                    }
                });

        // At boot nothing has been handed over: taking the display then is
        // the early claim's job, which keeps every host driver off it.
        if let Some(handoff) = &self.handoff
            && *handoff.get_ref()
            && self.boot == BootState::Vfio
        {
            problems.push((
                handoff.span(),
                format!(
                    "profile {name:?}: handoff = true and boot = \"vfio\" exclude each other: a GPU claimed at boot never carries the display; drop one"
                ),
            ));
        }

        Profile {
            devices: devices.into_iter().map(Spanned::into_inner).collect(),
            ids: ids.into_iter().map(Spanned::into_inner).collect(),
            vms: self.vms.into_iter().map(Spanned::into_inner).collect(),
            boot: self.boot,
            reset_method,
            handoff: self.handoff.is_some_and(|h| h.into_inner()),
        }
    }
}

/// A `reset_method` value, normalized to single spaces. Which methods a
/// device has is the kernel's to say (it refuses the others when vfiod
/// writes them); only the shape is checked here.
fn check_reset_method(value: &str) -> Result<String, String> {
    let methods: Vec<&str> = value.split_whitespace().collect();
    if methods.is_empty() {
        return Err("names no method: e.g. \"device_specific\" (vendor-reset) or \"bus\"; leave the key out to keep the kernel's".into());
    }
    if let Some(bad) = methods
        .iter()
        .find(|m| !m.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    {
        return Err(format!(
            "has {bad:?}, which is not a method name: the kernel's are lowercase words such as flr, pm, bus, device_specific"
        ));
    }
    if methods.len() > 1 && methods.contains(&"default") {
        return Err("mixes \"default\" with other methods: \"default\" stands alone".into());
    }
    if let Some(twice) = methods
        .iter()
        .enumerate()
        .find(|(i, m)| methods[..*i].contains(m))
    {
        return Err(format!("lists {:?} twice", twice.1));
    }
    Ok(methods.join(" "))
}

/// Records `key` for `profile`; returns the other profile that already
/// holds it. A profile repeating its own key is not a conflict here.
fn claim<K: Hash + Eq>(owners: &mut HashMap<K, String>, key: K, profile: &str) -> Option<String> {
    match owners.entry(key) {
        Entry::Occupied(o) if o.get() != profile => Some(o.get().clone()),
        Entry::Occupied(_) => None,
        Entry::Vacant(v) => {
            v.insert(profile.to_string());
            None
        }
    }
}

/// DESIGN §4: any byte outside `[A-Za-z0-9_]` becomes `_` + two hex digits.
fn object_path_component(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' {
                char::from(b).to_string()
            } else {
                format!("_{b:02x}")
            }
        })
        .collect()
}

/// Parses each element; the ones that fail become problems at their own
/// position and are left out.
fn parse_list<T: FromStr<Err: fmt::Display>>(
    items: &[Spanned<String>],
    profile: &str,
    key: &str,
    problems: &mut Vec<Problem>,
) -> Vec<Spanned<T>> {
    items
        .iter()
        .filter_map(|item| match item.get_ref().parse() {
            Ok(value) => Some(Spanned::new(item.span(), value)),
            Err(e) => {
                problems.push((item.span(), format!("profile {profile:?}: `{key}`: {e}")));
                None
            }
        })
        .collect()
}

/// The second and later occurrences of each value, with their spans.
fn duplicates<T: Hash + Eq + Clone>(items: &[Spanned<T>]) -> Vec<(Range<usize>, T)> {
    let mut seen = HashSet::new();
    items
        .iter()
        .filter(|item| !seen.insert(item.get_ref()))
        .map(|item| (item.span(), item.get_ref().clone()))
        .collect()
}

/// Profile names become D-Bus object paths and CLI targets (DESIGN §4).
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Err(format!("is longer than {MAX_NAME_LEN} characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err("may only contain letters, digits, `_` and `-`".into());
    }
    Ok(())
}

/// VM names come back from libvirt and end up in `Owner` and in messages.
fn check_vm_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Err(format!("is longer than {MAX_NAME_LEN} characters"));
    }
    if name.chars().any(char::is_control) {
        return Err("contains a control character".into());
    }
    if name.contains('/') {
        return Err("contains `/`".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
