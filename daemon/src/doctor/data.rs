//! The known-trouble tables of `daemon/data/doctor.toml`, built into the
//! binary and parsed on first use (a unit test parses them at build time
//! of the tests, so a broken table never ships).

use std::cmp::Ordering;
use std::fmt;
use std::sync::LazyLock;

use serde::{Deserialize, Deserializer};
use vfiod_pci::PciId;

const TABLES_TOML: &str = include_str!("../../data/doctor.toml");

static TABLES: LazyLock<Tables> =
    LazyLock::new(|| Tables::parse(TABLES_TOML).expect("daemon/data/doctor.toml is valid"));

pub(super) fn tables() -> &'static Tables {
    &TABLES
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Tables {
    pub(super) reset_bug: Vec<ResetBug>,
    pub(super) xhci: Vec<XhciTrouble>,
}

/// A GPU family that does not come back from a reset.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResetBug {
    pub(super) family: String,
    pub(super) cards: String,
    pub(super) ids: Vec<PciId>,
    pub(super) source: String,
}

/// A USB controller with reported passthrough trouble, on some kernels.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct XhciTrouble {
    pub(super) ids: Vec<PciId>,
    pub(super) name: String,
    /// Fixed in this kernel: earlier ones are affected.
    #[serde(default)]
    pub(super) before: Option<KernelVersion>,
    /// Affected from this kernel on.
    #[serde(default)]
    pub(super) from: Option<KernelVersion>,
    /// Affected after this kernel.
    #[serde(default)]
    pub(super) after: Option<KernelVersion>,
    pub(super) note: String,
    pub(super) source: String,
}

impl Tables {
    fn parse(text: &str) -> Result<Tables, toml::de::Error> {
        toml::from_str(text)
    }

    pub(super) fn reset_bug(&self, id: PciId) -> Option<&ResetBug> {
        self.reset_bug.iter().find(|entry| entry.ids.contains(&id))
    }

    pub(super) fn xhci(&self, id: PciId) -> Option<&XhciTrouble> {
        self.xhci.iter().find(|entry| entry.ids.contains(&id))
    }
}

impl XhciTrouble {
    /// Whether `release` is in the affected range (every kernel when the
    /// entry gives none).
    pub(super) fn affects(&self, release: &KernelVersion) -> bool {
        self.before.as_ref().is_none_or(|before| release < before)
            && self.from.as_ref().is_none_or(|from| release >= from)
            && self.after.as_ref().is_none_or(|after| release > after)
    }

    pub(super) fn has_range(&self) -> bool {
        self.before.is_some() || self.from.is_some() || self.after.is_some()
    }

    /// `kernels before 5.8`, `kernels after 4.15.10`, `every kernel`.
    pub(super) fn range(&self) -> String {
        let mut parts = Vec::new();
        if let Some(from) = &self.from {
            parts.push(format!("from {from}"));
        }
        if let Some(after) = &self.after {
            parts.push(format!("after {after}"));
        }
        if let Some(before) = &self.before {
            parts.push(format!("before {before}"));
        }
        if parts.is_empty() {
            "every kernel".to_owned()
        } else {
            format!("kernels {}", parts.join(" and "))
        }
    }
}

/// The numeric part of a kernel release: `4.15.10-1-ARCH` → 4.15.10.
/// Missing parts compare as 0 (5.8 = 5.8.0).
#[derive(Debug, Clone, Eq)]
pub(super) struct KernelVersion(Vec<u32>);

impl KernelVersion {
    pub(super) fn parse(release: &str) -> Option<KernelVersion> {
        let numeric = release
            .split(|c: char| !c.is_ascii_digit() && c != '.')
            .next()
            .unwrap_or_default();
        let parts: Vec<u32> = numeric
            .split('.')
            .map_while(|part| part.parse().ok())
            .collect();
        (!parts.is_empty()).then_some(KernelVersion(parts))
    }

    fn part(&self, i: usize) -> u32 {
        self.0.get(i).copied().unwrap_or(0)
    }
}

impl PartialEq for KernelVersion {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Ord for KernelVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        let len = self.0.len().max(other.0.len());
        (0..len)
            .map(|i| self.part(i).cmp(&other.part(i)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }
}

impl PartialOrd for KernelVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u32::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

impl<'de> Deserialize<'de> for KernelVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        KernelVersion::parse(&text)
            .filter(|v| v.to_string() == text)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{text:?} is not a kernel version like 5.8 or 4.15.10"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> PciId {
        s.parse().unwrap()
    }

    fn v(s: &str) -> KernelVersion {
        KernelVersion::parse(s).unwrap()
    }

    #[test]
    fn the_shipped_tables_parse_and_hold_the_z77_story() {
        let tables = Tables::parse(TABLES_TOML).unwrap();
        let polaris = tables.reset_bug(id("1002:67df")).unwrap();
        assert_eq!(polaris.family, "Polaris 10");
        assert!(polaris.cards.contains("580"));
        assert_eq!(tables.reset_bug(id("1002:731f")).unwrap().family, "Navi 10");
        assert_eq!(tables.reset_bug(id("1002:687f")).unwrap().family, "Vega 10");
        // Navi 21 resets fine; the HD audio function is not a GPU.
        assert!(tables.reset_bug(id("1002:73bf")).is_none());
        assert!(tables.reset_bug(id("1002:aaf0")).is_none());
        for entry in &tables.reset_bug {
            assert!(entry.source.starts_with("https://"), "{entry:?}");
        }
        let nec = tables.xhci(id("1033:0194")).unwrap();
        assert!(!nec.affects(&v("4.15.10-1-ARCH")));
        assert!(nec.affects(&v("4.16.0")));
        assert!(nec.affects(&v("6.1.0-18-amd64")));
        let matisse = tables.xhci(id("1022:149c")).unwrap();
        assert!(matisse.affects(&v("5.7.19")));
        assert!(!matisse.affects(&v("5.8")));
        assert!(!matisse.affects(&v("6.6.8-arch1-1")));
        assert_eq!(matisse.range(), "kernels before 5.8");
        let renesas = tables.xhci(id("1912:0015")).unwrap();
        assert!(!renesas.has_range() && renesas.affects(&v("6.1")));
        assert_eq!(renesas.range(), "every kernel");
        // An id in two entries would make the second one dead.
        let mut seen = std::collections::BTreeSet::new();
        for id in tables
            .reset_bug
            .iter()
            .flat_map(|e| &e.ids)
            .chain(tables.xhci.iter().flat_map(|e| &e.ids))
        {
            assert!(seen.insert(*id), "{id} is listed twice");
        }
    }

    #[test]
    fn kernel_versions_compare_numerically() {
        assert!(v("4.15.10-1-ARCH") < v("4.16"));
        assert!(v("5.10") > v("5.8"));
        assert_eq!(v("5.8"), v("5.8.0"));
        assert_eq!(v("6.6.8-arch1-1").to_string(), "6.6.8");
        assert_eq!(v("6.1.0-18-amd64").to_string(), "6.1.0");
        assert!(KernelVersion::parse("arch").is_none());
    }

    #[test]
    fn bad_tables_are_refused() {
        let bad = "reset_bug = []\n[[xhci]]\nids = [\"1033:0194\"]\nname = \"x\"\nbefore = \"five\"\nnote = \"\"\nsource = \"\"\n";
        assert!(Tables::parse(bad).unwrap_err().to_string().contains("five"));
        let bad = "reset_bug = []\nxhci = []\ncolour = 1\n";
        assert!(Tables::parse(bad).is_err());
    }
}
