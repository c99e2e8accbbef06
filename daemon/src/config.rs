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

impl From<ConfigError> for vfiod_dbus::Error {
    fn from(e: ConfigError) -> Self {
        vfiod_dbus::Error::InvalidConfig(e.to_string())
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

        Profile {
            devices: devices.into_iter().map(Spanned::into_inner).collect(),
            ids: ids.into_iter().map(Spanned::into_inner).collect(),
            vms: self.vms.into_iter().map(Spanned::into_inner).collect(),
            boot: self.boot,
        }
    }
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
mod tests {
    use super::*;

    use vfiod_pci::machine::MachineFile;

    fn machines_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../machines")
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            let template = std::env::temp_dir().join("vfiod-config-XXXXXX");
            TempDir(nix::unistd::mkdtemp(&template).expect("mkdtemp"))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    fn id(s: &str) -> PciId {
        s.parse().unwrap()
    }

    #[track_caller]
    fn refused(text: &str, line: usize, needles: &[&str]) {
        let err = Config::parse(text, Path::new("/etc/vfiod/bad.toml")).expect_err(text);
        let message = err.to_string();
        assert_eq!(err.line(), Some(line), "{message}");
        assert!(
            message.starts_with("invalid config file /etc/vfiod/bad.toml: "),
            "{message}"
        );
        assert!(
            message.contains(&format!("line {line}, column ")),
            "{message}"
        );
        for needle in needles {
            assert!(message.contains(needle), "{needle:?} not in:\n{message}");
        }
    }

    #[test]
    fn shipped_z77_config_loads() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../machines/z77-rx580.vfiod.toml"
        );
        let config = Config::load(Path::new(path)).unwrap();
        assert_eq!(config.daemon.unbind_timeout_ms, 10_000);
        assert_eq!(config.profiles.len(), 2);
        let rx580 = config.profile("rx580").unwrap();
        assert_eq!(rx580.devices, [addr("0000:01:00.0"), addr("0000:01:00.1")]);
        assert!(rx580.ids.is_empty());
        assert_eq!(rx580.vms, ["win10"]);
        assert_eq!(rx580.boot, BootState::Host);
        let usb3 = config.profile("usb3").unwrap();
        assert_eq!(usb3.ids, [id("1033:0194")]);
        assert!(usb3.devices.is_empty());
        assert!(config.profile("nope").is_none());
    }

    #[test]
    fn shipped_x570_config_loads() {
        let config = Config::load(&machines_dir().join("x570-navi.vfiod.toml")).unwrap();
        let navi = config.profile("navi").unwrap();
        assert_eq!(navi.devices, [addr("0a:00.0"), addr("0a:00.1")]);
        assert_eq!(navi.vms, ["win11"]);
        let usb = config.profile("usb").unwrap();
        assert_eq!(usb.devices, [addr("0b:00.3")]);
        // By address, so the keyboard's controller (same id) is not caught.
        assert!(usb.ids.is_empty());
        assert!(!usb.matches(&addr("06:00.1"), &id("1022:149c")));
    }

    /// Every profile of a shipped config names devices its machine has.
    #[test]
    fn shipped_configs_match_their_machines() {
        for (config, machine) in [
            ("z77-rx580.vfiod.toml", "z77-rx580.toml"),
            ("x570-navi.vfiod.toml", "x570-navi.toml"),
        ] {
            let config = Config::load(&machines_dir().join(config)).unwrap();
            let machine = MachineFile::load(&machines_dir().join(machine)).unwrap();
            for (name, profile) in &config.profiles {
                for a in &profile.devices {
                    assert!(machine.device(a).is_some(), "{name}: {a}");
                }
                for i in &profile.ids {
                    assert!(machine.devices.iter().any(|d| d.id == *i), "{name}: {i}");
                }
            }
        }
    }

    #[test]
    fn shipped_machine_files_load() {
        let mut loaded = Vec::new();
        for entry in std::fs::read_dir(machines_dir()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with(".toml") || name.ends_with(".vfiod.toml") {
                continue;
            }
            if let Err(e) = MachineFile::load(&path) {
                panic!("{e}");
            }
            loaded.push(name);
        }
        loaded.sort();
        assert_eq!(
            loaded,
            [
                "no-iommu-laptop.toml",
                "qemu-q35.toml",
                "x570-navi.toml",
                "z77-rx580.toml"
            ]
        );
    }

    /// The properties the tests rely on are really in the new machines.
    #[test]
    fn x570_and_laptop_machines_have_what_tests_need() {
        use vfiod_pci::machine::IommuKind;

        let m = MachineFile::load(&machines_dir().join("x570-navi.toml")).unwrap();
        assert_eq!(m.machine.iommu, IommuKind::Amd);
        let group = |a: &str| m.device(&addr(a)).unwrap().group.unwrap();
        // One chipset slot, four functions, four groups.
        let slot = ["0b:00.0", "0b:00.1", "0b:00.3", "0b:00.4"].map(group);
        let distinct: std::collections::BTreeSet<u32> = slot.into_iter().collect();
        assert_eq!(distinct.len(), 4, "{slot:?}");
        // The Navi switch bridges share the GPU's group.
        for a in ["08:00.0", "09:00.0", "0a:00.1"] {
            assert_eq!(group(a), group("0a:00.0"), "{a}");
        }
        assert!(
            m.devices
                .iter()
                .any(|d| d.boot_vga && d.console && d.id == id("10de:128b"))
        );
        let keyboard_xhci = m.device(&addr("06:00.1")).unwrap();
        assert!(keyboard_xhci.usb.iter().any(|u| u.is_input()));
        assert!(
            m.device(&addr("0b:00.3"))
                .unwrap()
                .usb
                .iter()
                .all(|u| !u.is_input())
        );

        let m = MachineFile::load(&machines_dir().join("no-iommu-laptop.toml")).unwrap();
        assert_eq!(m.machine.iommu, IommuKind::None);
        assert!(!m.machine.cmdline.contains("intel_iommu"));
        assert!(m.devices.iter().all(|d| d.group.is_none()));
    }

    #[test]
    fn absent_file_is_no_profiles_and_unreadable_is_an_error() {
        let dir = TempDir::new();
        let config = Config::load(&dir.0.join("vfiod.toml")).unwrap();
        assert_eq!(config, Config::default());
        assert!(config.profiles.is_empty());
        assert_eq!(config.daemon.unbind_timeout(), Duration::from_secs(10));

        // A directory is there but cannot be read as a file.
        let err = Config::load(&dir.0).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(
            err.to_string().contains(&dir.0.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn load_names_the_real_path() {
        let dir = TempDir::new();
        let path = dir.0.join("vfiod.toml");
        std::fs::write(&path, "[daemon]\nunbind_timeout_ms = 10000\n\n[profiles.gpu]\ndevices = [\"01:00.0\"]\nfoo = 1\n").unwrap();
        let err = Config::load(&path).unwrap_err();
        assert_eq!(err.path(), path);
        assert_eq!(err.line(), Some(6));
        let message = err.to_string();
        assert!(
            message.contains(&path.display().to_string()) && message.contains("foo"),
            "{message}"
        );
        // The snippet shows the line and points at the key.
        assert!(message.contains("6 | foo = 1\n  | ^^^"), "{message}");
    }

    #[test]
    fn short_forms_boot_and_defaults() {
        let text = "[profiles.gpu-1]\ndevices = [\"0A:00.0\", \"0000:0a:00.1\"]\nids = [\"1002:731F\"]\nboot = \"vfio\"\n\n[profiles.b_2]\nids = [\"1033:0194\"]\n";
        let config = Config::parse(text, Path::new("c.toml")).unwrap();
        assert_eq!(config.daemon, DaemonConfig::default());
        let gpu = config.profile("gpu-1").unwrap();
        assert_eq!(gpu.devices, [addr("0000:0a:00.0"), addr("0000:0a:00.1")]);
        assert_eq!(gpu.boot, BootState::Vfio);
        assert!(gpu.vms.is_empty());
        assert!(gpu.matches(&addr("0a:00.1"), &id("1002:ab38")));
        assert!(gpu.matches(&addr("0c:00.0"), &id("1002:731f")));
        assert!(!gpu.matches(&addr("0c:00.0"), &id("1002:ab38")));
        assert_eq!(config.profile("b_2").unwrap().boot, BootState::Host);
        assert_eq!(BootState::Vfio.to_string(), "vfio");

        // Limits are inclusive; an empty file is a valid, empty config.
        for ms in [100, 600_000] {
            let c = Config::parse(
                &format!("[daemon]\nunbind_timeout_ms = {ms}\n"),
                Path::new("c"),
            )
            .unwrap();
            assert_eq!(c.daemon.unbind_timeout_ms, ms);
        }
        assert_eq!(
            Config::parse("", Path::new("c")).unwrap(),
            Config::default()
        );
        let long = "a".repeat(MAX_NAME_LEN);
        let text = format!(
            "[profiles.{long}]\nids = [\"1033:0194\"]\nvms = [\"{long}\", \"win 11 (gaming)\"]\n"
        );
        assert!(Config::parse(&text, Path::new("c")).is_ok());
    }

    #[test]
    fn unknown_keys_and_sections() {
        refused(
            "[profiles.rx580]\ndevices = [\"01:00.0\"]\ncolour = 1\n",
            3,
            &["colour", "unknown field"],
        );
        refused("[deamon]\nunbind_timeout_ms = 1000\n", 1, &["deamon"]);
        refused("[daemon]\nunbind_timeout = 1000\n", 2, &["unbind_timeout"]);
        refused("verbose = true\n", 1, &["verbose"]);
        refused("[profiles.a.devices]\nx = 1\n", 1, &["devices"]);
    }

    #[test]
    fn bad_values() {
        // The caret is on the bad element, not on the whole list.
        refused(
            "[profiles.rx580]\ndevices = [\"01:00.0\", \"01:00.9\"]\n",
            2,
            &[
                "column 23:",
                "`devices`",
                "01:00.9",
                "function",
                "\n  |                       ^^^^^^^^^",
            ],
        );
        refused(
            "\n[profiles.usb]\nids = [\"1033:019g\"]\n",
            3,
            &["1033:019g"],
        );
        refused(
            "[profiles.usb]\nids = [\"1033:0194\"]\nboot = \"vm\"\n",
            3,
            &["`vm`", "boot", "host", "vfio"],
        );
        refused(
            "[profiles.usb]\nids = [\"1033:0194\"]\nboot = true\n",
            3,
            &["boot"],
        );
        refused(
            "[profiles.usb]\nids = [\"1033:0194\"]\nboot = \"Vfio\"\n",
            3,
            &["Vfio"],
        );
    }

    #[test]
    fn wrong_types() {
        refused(
            "[profiles.rx580]\ndevices = \"01:00.0\"\n",
            2,
            &["devices", "\"01:00.0\"", "sequence"],
        );
        refused(
            "[profiles.rx580]\ndevices = [1]\n",
            2,
            &["devices", "integer"],
        );
        refused(
            "[daemon]\nunbind_timeout_ms = \"10s\"\n",
            2,
            &["unbind_timeout_ms", "10s"],
        );
        refused(
            "[daemon]\nunbind_timeout_ms = -1\n",
            2,
            &["unbind_timeout_ms", "-1"],
        );
        refused(
            "[profiles.a]\nids = [\"1033:0194\"]\nvms = \"win10\"\n",
            3,
            &["vms", "win10"],
        );
        refused("profiles = 3\n", 1, &["profiles"]);
        refused("daemon = []\n", 1, &["daemon"]);
    }

    #[test]
    fn invalid_toml() {
        refused(
            "[daemon]\nunbind_timeout_ms = 1000\n[profiles.rx580\ndevices = []\n",
            3,
            &["[profiles.rx580"],
        );
        refused("[profiles.a]\nids = [\"1033:0194\"\n", 2, &["ids"]);
        refused(
            "[profiles.a]\nids = [\"1033:0194\"]\n[profiles.a]\nids = [\"1033:0194\"]\n",
            3,
            &["profiles.a"],
        );
        refused(
            "[profiles.a]\nids = [\"1033:0194\"]\nids = []\n",
            3,
            &["ids"],
        );
        refused("a = \"unterminated\n", 1, &["a = "]);
    }

    #[test]
    fn bad_profile_names() {
        refused(
            "[daemon]\n\n[profiles.\"rx 580\"]\ndevices = [\"01:00.0\"]\n",
            3,
            &["\"rx 580\"", "letters, digits"],
        );
        refused(
            "[profiles.\"\"]\ndevices = [\"01:00.0\"]\n",
            1,
            &["profile name \"\" is empty"],
        );
        refused("[profiles.\"ü\"]\ndevices = [\"01:00.0\"]\n", 1, &["\"ü\""]);
        refused(
            "[profiles.\"a/b\"]\ndevices = [\"01:00.0\"]\n",
            1,
            &["\"a/b\""],
        );
        let long = "a".repeat(MAX_NAME_LEN + 1);
        refused(
            &format!("[profiles.{long}]\ndevices = [\"01:00.0\"]\n"),
            1,
            &[&long, "longer than 64"],
        );
    }

    #[test]
    fn empty_profiles() {
        refused(
            "[daemon]\n[profiles.a]\nvms = [\"win10\"]\n",
            2,
            &["profile \"a\" names no device", "devices", "ids"],
        );
        refused(
            "[profiles.gpu]\ndevices = []\nids = []\n",
            1,
            &["\"gpu\"", "no device"],
        );
        refused(
            "[profiles.x]\ndevices = [\"01:00.0\"]\n[profiles.empty]\n",
            3,
            &["\"empty\""],
        );
        refused("profiles = { gpu = {} }\n", 1, &["\"gpu\""]);
    }

    #[test]
    fn timeout_out_of_range() {
        refused(
            "[daemon]\nunbind_timeout_ms = 99\n",
            2,
            &["unbind_timeout_ms = 99", "between 100 and 600000"],
        );
        refused(
            "[daemon]\n\nunbind_timeout_ms = 600001\n",
            3,
            &["unbind_timeout_ms = 600001"],
        );
        refused(
            "[daemon]\nunbind_timeout_ms = 0\n",
            2,
            &["unbind_timeout_ms = 0"],
        );
    }

    #[test]
    fn duplicates() {
        refused(
            "[profiles.a]\ndevices = [\"0000:01:00.0\",\n  \"01:00.0\"]\n",
            3,
            &["0000:01:00.0 twice", "devices"],
        );
        refused(
            "[profiles.a]\nids = [\"1033:0194\", \"1033:0194\"]\n",
            2,
            &["1033:0194 twice"],
        );
        refused(
            "[profiles.a]\nids = [\"1033:0194\"]\nvms = [\"w\", \"w\"]\n",
            3,
            &["\"w\" twice"],
        );
        let text = "[profiles.gpu]\ndevices = [\"01:00.0\", \"01:00.1\"]\n\n[profiles.audio]\ndevices = [\"0000:01:00.1\"]\n";
        refused(
            text,
            5,
            &["0000:01:00.1", "profile \"gpu\"", "profile \"audio\""],
        );
        let text = "[profiles.b]\nids = [\"1033:0194\"]\n[profiles.a]\nids = [\"1033:0194\"]\n";
        refused(text, 4, &["1033:0194", "profile \"b\"", "profile \"a\""]);
    }

    #[test]
    fn names_that_share_an_object_path() {
        let text =
            "[profiles.a-b]\nids = [\"1033:0194\"]\n[profiles.a_2db]\ndevices = [\"01:00.0\"]\n";
        refused(
            text,
            3,
            &["\"a-b\"", "\"a_2db\"", "/org/vfiod1/profile/a_2db"],
        );
        assert_eq!(object_path_component("gpu-1_x"), "gpu_2d1_x");
    }

    #[test]
    fn bad_vm_names() {
        let head = "[profiles.a]\nids = [\"1033:0194\"]\n";
        refused(
            &format!("{head}vms = [\"\"]\n"),
            3,
            &["vm name \"\" is empty"],
        );
        refused(&format!("{head}vms = [\"a/b\"]\n"), 3, &["\"a/b\"", "`/`"]);
        refused(
            &format!("{head}vms = [\"ok\",\n\"a\\u001b[2Jb\"]\n"),
            4,
            &["control character", "\\u{1b}"],
        );
        refused(
            &format!("{head}vms = [\"a\\tb\"]\n"),
            3,
            &["control character"],
        );
        let long = "w".repeat(MAX_NAME_LEN + 1);
        refused(
            &format!("{head}vms = [\"{long}\"]\n"),
            3,
            &["longer than 64"],
        );
    }

    #[test]
    fn the_first_problem_in_the_file_is_reported() {
        // `zz` sorts after `aa` but comes first in the file.
        let text =
            "[profiles.zz]\nvms = [\"w\"]\n[profiles.aa]\nvms = [\"\"]\nids = [\"1033:0194\"]\n";
        refused(text, 1, &["\"zz\""]);
    }

    #[test]
    fn snippets_survive_odd_text() {
        // CRLF, tabs and multi-byte characters before the offence.
        let err = Config::parse(
            "[profiles.\"é\"]\r\n\tdevices = [\"01:00.0\"]\r\n",
            Path::new("c"),
        )
        .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("column 11") && !message.contains('\r'),
            "{message:?}"
        );
        let err = Config::parse("[daemon]\n\tfoo = 1\n", Path::new("c")).unwrap_err();
        assert!(
            err.to_string().ends_with("2 | \tfoo = 1\n  | \t^^^"),
            "{err:?}"
        );
        // A very long line is not echoed.
        let text = format!("[profiles.a]\nids = [\"1033:0194\"] {}\n", "#".repeat(500));
        let text = text.replace("ids", "idz");
        let err = Config::parse(&text, Path::new("c")).unwrap_err();
        assert!(
            err.to_string().lines().count() == 1 && err.line() == Some(2),
            "{err}"
        );
        // Out-of-range spans are clamped, never sliced blindly.
        let p = Position::locate("a\u{e9}b", 2..100);
        assert_eq!((p.line, p.column), (1, 2));
        #[allow(clippy::reversed_empty_ranges)]
        let p = Position::locate("", 5..1);
        assert_eq!((p.line, p.column), (1, 1));
    }

    /// Every prefix of a valid file, and every one-byte corruption of it,
    /// is parsed or refused with a line, never a panic.
    #[test]
    fn never_panics() {
        let text = std::fs::read_to_string(machines_dir().join("z77-rx580.vfiod.toml")).unwrap();
        for end in (0..=text.len()).filter(|i| text.is_char_boundary(*i)) {
            let _ = Config::parse(&text[..end], Path::new("c"));
        }
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            for b in [b'"', b'[', b']', b'\n', b'=', b'x', b'\0', b'\\', b'.'] {
                let mut mutated = bytes.to_vec();
                mutated[i] = b;
                if let Ok(s) = std::str::from_utf8(&mutated)
                    && let Err(e) = Config::parse(s, Path::new("c"))
                {
                    assert!(!e.to_string().is_empty());
                }
            }
        }
    }

    #[test]
    fn becomes_an_invalid_config_dbus_error() {
        let err = Config::parse("[nope]\n", Path::new("/etc/vfiod/vfiod.toml")).unwrap_err();
        let text = err.to_string();
        let dbus: vfiod_dbus::Error = err.into();
        assert_eq!(dbus.dbus_name(), "org.vfiod1.Error.InvalidConfig");
        assert_eq!(dbus.message(), text);
        assert!(
            text.contains("/etc/vfiod/vfiod.toml: line 1, column 2: "),
            "{text}"
        );
    }
}
