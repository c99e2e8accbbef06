//! `list` and `status`: read-only views of vfiod's objects.

use serde_json::{Value, json};
use vfiod_dbus::{DeviceHealth, DeviceState};
use vfiod_host::VFIO_DRIVER;
use vfiod_pci::PciAddress;

use crate::bus::Bus;
use crate::error::{Exit, Failure};
use crate::model::{DeviceView, Objects, ProfileView};
use crate::output::{self, Output, or_dash, table};

pub async fn list(bus: &Bus, out: &Output) -> Result<Exit, Failure> {
    let objects = bus.objects().await?;
    if out.json {
        out.print_json(&list_json(&objects))?;
    } else {
        out.print(&list_human(&objects))?;
    }
    Ok(Exit::Done)
}

pub async fn status(bus: &Bus, out: &Output, target: Option<&str>) -> Result<Exit, Failure> {
    let Some(target) = target else {
        // Both requests go out before either answer is awaited.
        let (version, objects) = tokio::try_join!(bus.version(), bus.objects())?;
        if out.json {
            let mut doc = list_json(&objects);
            doc["version"] = Value::from(version);
            out.print_json(&doc)?;
        } else {
            out.print(&summary_human(&version, &objects))?;
        }
        return Ok(Exit::Done);
    };
    let objects = bus.objects().await?;
    match resolve(&objects, target)? {
        Target::Profile(profile) => {
            if out.json {
                out.print_json(&json!({ "profile": profile_detail_json(profile, &objects) }))?;
            } else {
                out.print(&profile_detail_human(profile, &objects))?;
            }
        }
        Target::Device(device) => {
            if out.json {
                let mut doc = output::device_json(device, Some(&objects));
                doc["last_error"] = last_error(device, &objects).map_or(Value::Null, Value::from);
                out.print_json(&json!({ "device": doc }))?;
            } else {
                out.print(&device_detail_human(device, &objects))?;
            }
        }
    }
    Ok(Exit::Done)
}

enum Target<'a> {
    Profile(&'a ProfileView),
    Device(&'a DeviceView),
}

/// The daemon's rule (DESIGN §4): a profile if one has that name, else an
/// address in full or short form, else UnknownTarget.
fn resolve<'a>(objects: &'a Objects, target: &str) -> Result<Target<'a>, Failure> {
    if let Some(profile) = objects.profile(target) {
        return Ok(Target::Profile(profile));
    }
    let unknown = |why: String| Failure::new(Exit::Failed, "org.vfiod1.Error.UnknownTarget", why);
    match target.parse::<PciAddress>() {
        Ok(address) => objects.device(&address).map(Target::Device).ok_or_else(|| {
            unknown(format!(
                "no PCI device {address} and no profile named {target:?}"
            ))
        }),
        Err(_) => Err(unknown(format!(
            "no profile named {target:?}, and it is not a PCI address"
        ))),
    }
}

fn last_error<'a>(device: &DeviceView, objects: &'a Objects) -> Option<&'a str> {
    objects
        .profile_of(device)
        .map(|p| p.last_error.as_str())
        .filter(|e| !e.is_empty())
}

fn list_json(objects: &Objects) -> Value {
    json!({
        "devices": objects.devices.iter().map(|d| output::device_json(d, Some(objects))).collect::<Vec<_>>(),
        "profiles": objects.profiles.iter().map(output::profile_json).collect::<Vec<_>>(),
    })
}

fn device_header() -> Vec<String> {
    ["ADDRESS", "DRIVER", "STATE", "OWNER", "NAME"]
        .map(String::from)
        .to_vec()
}

fn profile_header() -> Vec<String> {
    ["PROFILE", "STATE", "OWNER", "DEVICES"]
        .map(String::from)
        .to_vec()
}

fn list_human(objects: &Objects) -> String {
    let mut rows = vec![device_header()];
    rows.extend(objects.devices.iter().map(output::device_row));
    let mut text = table(&rows, "");
    if !objects.profiles.is_empty() {
        let mut rows = vec![profile_header()];
        rows.extend(objects.profiles.iter().map(output::profile_row));
        text.push('\n');
        text.push_str(&table(&rows, ""));
    }
    text
}

fn summary_human(version: &str, objects: &Objects) -> String {
    let on_vfio = objects
        .devices
        .iter()
        .filter(|d| d.state == DeviceState::Vfio)
        .count();
    let mut text = format!(
        "vfiod {version}: {} devices ({on_vfio} on vfio-pci), {} profiles\n",
        objects.devices.len(),
        objects.profiles.len()
    );
    if !objects.profiles.is_empty() {
        let rows: Vec<_> = objects.profiles.iter().map(output::profile_row).collect();
        text.push_str("profiles:\n");
        text.push_str(&table(&rows, "  "));
    }
    let away: Vec<_> = objects
        .devices
        .iter()
        .filter(|d| away_from_host(d))
        .map(output::device_row)
        .collect();
    if away.is_empty() {
        text.push_str("every device is on its host driver\n");
    } else {
        text.push_str("away from the host driver:\n");
        text.push_str(&table(&away, "  "));
    }
    for p in objects.profiles.iter().filter(|p| !p.last_error.is_empty()) {
        text.push_str(&format!("{}: last error: {}\n", p.name, p.last_error));
    }
    text
}

/// On vfio-pci, moving, stuck, or without the driver it should have; a
/// device that never had a driver (a host bridge) is where it belongs.
fn away_from_host(d: &DeviceView) -> bool {
    match d.state {
        DeviceState::Host => false,
        DeviceState::Unbound => !d.host_driver.is_empty(),
        _ => true,
    }
}

fn profile_detail_json(profile: &ProfileView, objects: &Objects) -> Value {
    let mut doc = output::profile_json(profile);
    doc["devices"] = objects
        .devices_of(profile)
        .map(|d| output::device_json(d, Some(objects)))
        .collect::<Vec<_>>()
        .into();
    doc
}

fn profile_detail_human(profile: &ProfileView, objects: &Objects) -> String {
    let mut text = format!("profile {}: {}", profile.name, profile.state.as_str());
    if !profile.owner.is_empty() {
        text.push_str(&format!(", owner {}", profile.owner));
    }
    text.push('\n');
    let mut rows = vec![
        ["ADDRESS", "DRIVER", "STATE", "OWNER", "HOST DRIVER", "NAME"]
            .map(String::from)
            .to_vec(),
    ];
    rows.extend(objects.devices_of(profile).map(|d| {
        vec![
            d.address.clone(),
            or_dash(&d.driver).to_owned(),
            d.state_shown(),
            or_dash(&d.owner).to_owned(),
            or_dash(&d.host_driver).to_owned(),
            d.name.clone(),
        ]
    }));
    text.push_str(&table(&rows, "  "));
    if !profile.last_error.is_empty() {
        text.push_str(&format!("last error: {}\n", profile.last_error));
    }
    text
}

fn device_detail_human(d: &DeviceView, objects: &Objects) -> String {
    let mut lines = vec![format!("{}  {}", d.address, d.name)];
    let mut field =
        |name: &str, value: String| lines.push(format!("  {:<12} {value}", format!("{name}:")));
    field("id", format!("{}, class 0x{:06x}", d.id(), d.class));
    field(
        "iommu group",
        if d.iommu_group >= 0 {
            d.iommu_group.to_string()
        } else {
            "none".into()
        },
    );
    let host = if d.host_driver.is_empty() && d.driver == VFIO_DRIVER {
        // Taken at add (the early claim, an `ids=` option) or before vfiod
        // started: no host driver was seen, the kernel picks one at release.
        " (host driver unknown)".to_string()
    } else if d.host_driver.is_empty() || d.host_driver == d.driver {
        String::new()
    } else {
        format!(" (host driver {})", d.host_driver)
    };
    field(
        "driver",
        format!(
            "{}{host}",
            if d.driver.is_empty() {
                "none"
            } else {
                &d.driver
            }
        ),
    );
    field("state", d.state.to_string());
    if d.health != DeviceHealth::Ok {
        field("health", d.health.to_string());
    }
    field("owner", or_dash(&d.owner).to_owned());
    if let Some(p) = objects.profile_of(d) {
        field("profile", p.name.clone());
    }
    if d.boot_vga {
        field("boot vga", "yes".into());
    }
    if !d.reset_method.is_empty() {
        field("reset method", d.reset_method.clone());
    }
    if let Some(e) = last_error(d, objects) {
        field("last error", e.to_owned());
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::sample;

    #[test]
    fn list_shows_one_line_per_device_and_profile() {
        let text = list_human(&sample());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ADDRESS       DRIVER    STATE  OWNER  NAME");
        assert_eq!(lines[1], "0000:01:00.0  vfio-pci  vfio   win10  Ellesmere");
        assert_eq!(lines[3], "0000:04:00.0  xhci_hcd  host   -      Ellesmere");
        assert_eq!(lines[5], "PROFILE  STATE  OWNER  DEVICES");
        assert_eq!(lines[6], "rx580    vfio   -      0000:01:00.0 0000:01:00.1");
    }

    #[test]
    fn list_json_is_one_document() {
        let doc = list_json(&sample());
        assert_eq!(doc["devices"].as_array().unwrap().len(), 3);
        assert_eq!(doc["profiles"][0]["name"], "rx580");
        assert_eq!(doc["devices"][1]["address"], "0000:01:00.1");
    }

    #[test]
    fn targets_resolve_like_the_daemon() {
        let o = sample();
        assert!(matches!(resolve(&o, "rx580"), Ok(Target::Profile(_))));
        assert!(
            matches!(resolve(&o, "04:00.0"), Ok(Target::Device(d)) if d.address == "0000:04:00.0")
        );
        assert!(matches!(resolve(&o, "0000:01:00.1"), Ok(Target::Device(_))));
        let err = resolve(&o, "07:00.0").err().unwrap();
        assert_eq!(
            (err.exit, err.short_name()),
            (Exit::Failed, "UnknownTarget")
        );
        assert!(resolve(&o, "nope").is_err());
    }

    #[test]
    fn details_name_drivers_and_owner() {
        let o = sample();
        let text = profile_detail_human(o.profile("rx580").unwrap(), &o);
        assert!(text.starts_with("profile rx580: vfio\n"), "{text}");
        assert!(
            text.contains("0000:01:00.1  vfio-pci  vfio   win10  amdgpu"),
            "{text}"
        );
        let text = device_detail_human(&o.devices[0], &o);
        assert!(
            text.contains("driver:      vfio-pci (host driver amdgpu)"),
            "{text}"
        );
        assert!(text.contains("profile:     rx580"), "{text}");
        let doc = profile_detail_json(o.profile("rx580").unwrap(), &o);
        assert_eq!(doc["devices"][0]["host_driver"], "amdgpu");
        let summary = summary_human("0.1.0", &o);
        assert!(
            summary.starts_with("vfiod 0.1.0: 3 devices (2 on vfio-pci), 1 profiles\n"),
            "{summary}"
        );
        assert!(
            summary.contains("away from the host driver:\n  0000:01:00.0"),
            "{summary}"
        );
        // On its host driver: not listed.
        assert!(!summary.contains("0000:04:00.0"), "{summary}");
    }

    #[test]
    fn a_device_claimed_before_any_host_driver_says_its_host_driver_is_unknown() {
        let mut o = sample();
        o.devices[0].properties.host_driver = String::new();
        let text = device_detail_human(&o.devices[0], &o);
        assert!(
            text.contains("driver:      vfio-pci (host driver unknown)"),
            "{text}"
        );
    }

    #[test]
    fn a_device_that_never_had_a_driver_is_not_away() {
        let mut d = DeviceView::default();
        d.properties.state = DeviceState::Unbound;
        assert!(!away_from_host(&d), "a host bridge has no driver to miss");
        d.properties.host_driver = "amdgpu".into();
        assert!(away_from_host(&d), "a GPU left driverless is");
        d.properties.state = DeviceState::Stuck;
        assert!(away_from_host(&d));
    }
}
