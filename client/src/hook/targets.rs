//! Which targets the hook moves for a domain: the profiles whose `vms`
//! name it, then its `managed='no'` PCI hostdevs no such profile covers.

use std::fmt;

use vfiod_config::Config;
use vfiod_pci::{PciAddress, PciId};

use super::domain::{Domain, Managed};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Profile(String),
    Device(PciAddress),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Profile(name) => f.write_str(name),
            Target::Device(address) => write!(f, "{address}"),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// In bind order.
    pub targets: Vec<Target>,
    pub warnings: Vec<String>,
}

/// `id_of` gives a device's vendor:device id when it is known, so that
/// profiles listing `ids` cover devices too.
pub fn plan(
    domain: &str,
    xml: &Domain,
    config: &Config,
    id_of: impl Fn(&PciAddress) -> Option<PciId>,
) -> Plan {
    let mut plan = Plan::default();
    let mine: Vec<(&String, &vfiod_config::Profile)> = config
        .profiles
        .iter()
        .filter(|(_, p)| p.vms.iter().any(|vm| vm == domain))
        .collect();
    plan.targets.extend(
        mine.iter()
            .map(|(name, _)| Target::Profile((*name).clone())),
    );

    let covers = |profile: &vfiod_config::Profile, address: &PciAddress| {
        profile.devices.contains(address)
            || id_of(address).is_some_and(|id| profile.ids.contains(&id))
    };
    for hostdev in &xml.hostdevs {
        let address = hostdev.address;
        match hostdev.managed {
            Managed::No => {
                let covered = mine.iter().any(|(_, p)| covers(p, &address));
                let target = Target::Device(address);
                if !covered && !plan.targets.contains(&target) {
                    plan.targets.push(target);
                }
            }
            Managed::Yes | Managed::Absent => {
                // libvirt would reset such a device under its host driver.
                if let Some((name, _)) = config.profiles.iter().find(|(_, p)| covers(p, &address)) {
                    let how = match hostdev.managed {
                        Managed::Yes => "managed='yes'",
                        _ => "no managed attribute",
                    };
                    plan.warnings.push(format!(
                        "domain {domain}: hostdev {address} (profile {name}) has {how}, so libvirt manages it and vfiod leaves it alone; say managed='no' to have vfiod move it"
                    ));
                }
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::hook::domain;

    const WIN10: &str = include_str!("../../testdata/win10.xml");

    const CONFIG: &str = r#"
[profiles.rx580]
devices = ["0000:01:00.0", "0000:01:00.1"]
vms = ["win10"]
[profiles.usb3]
ids = ["1033:0194"]
vms = ["win10", "linux"]
[profiles.nic]
devices = ["0000:05:00.0"]
"#;

    fn config() -> Config {
        Config::parse(CONFIG, Path::new("vfiod.toml")).unwrap()
    }

    fn no_ids(_: &PciAddress) -> Option<PciId> {
        None
    }

    fn usb_card_at_04(address: &PciAddress) -> Option<PciId> {
        (address.to_string() == "0000:04:00.0").then(|| "1033:0194".parse().unwrap())
    }

    #[test]
    fn profiles_first_then_uncovered_hostdevs() {
        let xml = domain::parse(WIN10).unwrap();
        let plan = plan("win10", &xml, &config(), no_ids);
        // Both GPU functions are rx580's; the managed='yes' one is libvirt's.
        assert_eq!(
            plan.targets,
            [
                Target::Profile("rx580".into()),
                Target::Profile("usb3".into())
            ]
        );
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    }

    #[test]
    fn a_managed_yes_profile_device_is_skipped_with_a_warning() {
        let xml = domain::parse(WIN10).unwrap();
        let plan = plan("win10", &xml, &config(), usb_card_at_04);
        assert_eq!(plan.targets.len(), 2);
        assert_eq!(plan.warnings.len(), 1);
        assert!(
            plan.warnings[0].contains("0000:04:00.0") && plan.warnings[0].contains("usb3"),
            "{:?}",
            plan.warnings
        );
    }

    #[test]
    fn hostdevs_without_a_profile_are_bound_by_address() {
        let xml =
            domain::parse(&WIN10.replace("<name>win10</name>", "<name>other</name>")).unwrap();
        let plan = plan("other", &xml, &config(), no_ids);
        assert_eq!(
            plan.targets,
            [
                Target::Device("01:00.0".parse().unwrap()),
                Target::Device("01:00.1".parse().unwrap())
            ]
        );
        assert_eq!(plan.targets[0].to_string(), "0000:01:00.0");
    }

    #[test]
    fn nothing_for_vfiod() {
        let xml = domain::parse("<domain><name>plain</name><devices/></domain>").unwrap();
        assert_eq!(plan("plain", &xml, &config(), no_ids), Plan::default());
        // No config at all: only the XML counts.
        let xml = domain::parse(WIN10).unwrap();
        let plan = plan("win10", &xml, &Config::default(), no_ids);
        assert_eq!(plan.targets.len(), 2);
    }
}
