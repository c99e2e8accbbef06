//! The machine-file format (DESIGN §7): a TOML description of a PCI machine
//! at boot, read by the simulated kernel and written by `vfioctl snapshot`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Holder, PciAddress, PciClass, PciId, UsbDevice};

mod display;

pub use self::display::{
    BindFaults, Display, DisplayManagerEntry, FramebufferEntry, JobFault, ManagerFaults,
    VtConsoleEntry, WriteFault,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineFile {
    pub machine: MachineInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostFacts>,
    /// What shows the host's screen (see [`Display`]); absent: nothing
    /// said, and the handoff finds nothing to hand over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<Display>,
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IommuKind {
    Intel,
    Amd,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineInfo {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub kernel: String,
    #[serde(default)]
    pub cmdline: String,
    pub iommu: IommuKind,
    /// Modules loaded at boot (names like `vfio_pci`).
    #[serde(default)]
    pub modules: Vec<String>,
    /// Modules that cannot be loaded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// Whether vfiod may load any module at all.
    #[serde(default, skip_serializing_if = "ModuleLoading::is_allowed")]
    pub module_loading: ModuleLoading,
    /// udev's coldplug is still running for this long after the machine
    /// boots (`/run/udev/queue` exists meanwhile); absent: over at boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coldplug_ms: Option<u64>,
    /// udev delivers each uevent this long after the kernel sent it, as on
    /// a busy host (the lane's TCG guest: 1.2-1.8 s); absent: at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uevent_delay_ms: Option<u64>,
}

/// Whether the process (and the `modprobe` it runs) may load kernel
/// modules: a module that is on disk is of no use otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModuleLoading {
    #[default]
    Allowed,
    /// No `CAP_SYS_MODULE` in the effective or bounding set, as under
    /// systemd's `ProtectKernelModules=yes`.
    NoCapSysModule,
    /// `/proc/sys/kernel/modules_disabled` is 1: no one may, until reboot.
    Disabled,
}

impl ModuleLoading {
    pub fn is_allowed(&self) -> bool {
        *self == ModuleLoading::Allowed
    }
}

impl std::fmt::Display for ModuleLoading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModuleLoading::Allowed => "modules can be loaded",
            ModuleLoading::NoCapSysModule => {
                "vfiod has no CAP_SYS_MODULE (its unit sets ProtectKernelModules=yes), so it cannot load modules"
            }
            ModuleLoading::Disabled => {
                "module loading is disabled (/proc/sys/kernel/modules_disabled is 1) until the next boot"
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    pub address: PciAddress,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<PciAddress>,
    pub id: PciId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsystem: Option<PciId>,
    pub class: PciClass,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_driver: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub boot_vga: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub console: bool,
    /// `reset_method` as the kernel shows it at boot (kernel >= 5.15), or
    /// `["unknown"]` before 5.15 (a `reset` file, no `reset_method`); empty:
    /// no reset at all (neither file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reset: Vec<String>,
    /// vendor-reset's device table lists it: with the `vendor_reset`
    /// module loaded, the kernel accepts `device_specific` for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vendor_reset: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<Holder>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usb: Vec<UsbDevice>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Faults>,
    /// Its `driver` binds late, as udev's coldplug reaches it (a module
    /// loaded by a udev rule, a slow probe): no driver at boot; bound when
    /// the coldplug ends (`coldplug_ms`) or, if someone writes to the
    /// device before that, just before that write takes effect, as a probe
    /// holding the device lock finishes first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub late_driver: bool,
}

/// Injected faults; each applies every time its operation runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unbind: Option<UnbindFault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeFault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprobe: Option<ProbeFault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vanish: Option<VanishFault>,
    /// Left dead by its VM: from the moment vfio-pci has it, its config
    /// space reads `ffff` until what this says brings it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead: Option<DeadFault>,
    /// A write to its `reset` fails (EIO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<ResetFault>,
}

/// What brings a dead function back (see [`Faults::dead`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeadFault {
    /// A reset (`echo 1 > reset`).
    UntilReset,
    /// A PCI `remove` and a `rescan`: it comes back alive.
    UntilRescan,
    /// Nothing: a reset leaves it dead, a rescan does not find it.
    Forever,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResetFault {
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnbindFault {
    /// The driver's remove() hangs: the `driver` link goes at once, the
    /// device lock stays held and the write to `unbind` does not return
    /// (in the simulator, until `SimKernel::end_hang`).
    Hang,
    /// The write to `unbind` fails with EBUSY.
    Busy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeFault {
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VanishFault {
    /// The device disappears from the bus once it is unbound.
    Unbind,
}

/// Facts about the host beyond PCI, read by the doctor. Absent = unknown.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFacts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_flags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acpi_tables: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupt_remapping: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub framebuffers: Option<Vec<Framebuffer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<Hugepages>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_conf: Option<QemuConf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Vec<FirmwareFile>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Framebuffer {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<PciAddress>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hugepages {
    pub size_kb: u64,
    pub total: u64,
    pub free: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuConf {
    pub user: String,
    pub group: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirmwareFile {
    pub path: PathBuf,
    pub owner: String,
    pub group: String,
    /// Octal permission bits, e.g. "0640".
    pub mode: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("cannot read machine file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax, unknown keys and bad values: toml's message carries the
    /// line, the column and the offending key.
    #[error("invalid machine file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid machine file {path}: device {address}: {field} = {value:?}: {reason}")]
    Device {
        path: PathBuf,
        address: String,
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid machine file {path}: [display] {field} = {value:?}: {reason}")]
    Display {
        path: PathBuf,
        field: &'static str,
        value: String,
        reason: String,
    },
}

impl MachineFile {
    pub fn load(path: &Path) -> Result<MachineFile, MachineError> {
        let text = std::fs::read_to_string(path).map_err(|source| MachineError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<MachineFile, MachineError> {
        let machine: MachineFile = toml::from_str(text).map_err(|e| MachineError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        machine.validate(path)?;
        Ok(machine)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a machine file always serializes")
    }

    pub fn device(&self, address: &PciAddress) -> Option<&DeviceEntry> {
        self.devices.iter().find(|d| &d.address == address)
    }

    fn validate(&self, path: &Path) -> Result<(), MachineError> {
        let fail = |d: &DeviceEntry, field, value: String, reason: String| MachineError::Device {
            path: path.to_path_buf(),
            address: d.address.to_string(),
            field,
            value,
            reason,
        };
        let mut seen = BTreeSet::new();
        for d in &self.devices {
            if !seen.insert(d.address) {
                return Err(fail(
                    d,
                    "address",
                    d.address.to_string(),
                    "listed twice".into(),
                ));
            }
        }
        for d in &self.devices {
            match (self.machine.iommu, d.group) {
                (IommuKind::None, Some(g)) => {
                    return Err(fail(
                        d,
                        "group",
                        g.to_string(),
                        "iommu = \"none\" has no groups".into(),
                    ));
                }
                (IommuKind::Intel | IommuKind::Amd, None) => {
                    return Err(fail(
                        d,
                        "group",
                        String::new(),
                        "every device needs a group when there is an IOMMU".into(),
                    ));
                }
                _ => {}
            }
            if let Some(p) = d.parent {
                match self.device(&p) {
                    None => {
                        return Err(fail(
                            d,
                            "parent",
                            p.to_string(),
                            "no such device in this file".into(),
                        ));
                    }
                    Some(b) if !b.class.is_bridge() => {
                        return Err(fail(
                            d,
                            "parent",
                            p.to_string(),
                            format!("{p} is not a bridge (class {})", b.class),
                        ));
                    }
                    _ => {}
                }
                if p == d.address {
                    return Err(fail(
                        d,
                        "parent",
                        p.to_string(),
                        "a device cannot be its own parent".into(),
                    ));
                }
            }
            for (field, value) in [("driver", &d.driver), ("host_driver", &d.host_driver)] {
                if let Some(v) = value
                    && (v.is_empty()
                        || v.len() > 64
                        || !v
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)))
                {
                    return Err(fail(
                        d,
                        field,
                        v.clone(),
                        "a driver name is 1-64 characters of [A-Za-z0-9_-]".into(),
                    ));
                }
            }
            if d.late_driver
                && d.driver
                    .as_deref()
                    .is_none_or(|driver| driver == "vfio-pci")
            {
                return Err(fail(
                    d,
                    "late_driver",
                    "true".into(),
                    "only a device with a host driver (driver = ...) can have it bind late".into(),
                ));
            }
            if d.host_driver.is_some() && d.driver.as_deref() != Some("vfio-pci") {
                return Err(fail(
                    d,
                    "host_driver",
                    d.host_driver.clone().unwrap_or_default(),
                    "only a device that boots on vfio-pci has a separate host_driver".into(),
                ));
            }
            for node in &d.nodes {
                if !node.is_absolute() {
                    return Err(fail(
                        d,
                        "nodes",
                        node.display().to_string(),
                        "device nodes are absolute paths".into(),
                    ));
                }
            }
            for h in &d.holders {
                if !d.nodes.contains(&h.node) && !h.node.starts_with("/dev/vfio") {
                    return Err(fail(
                        d,
                        "holders",
                        h.node.display().to_string(),
                        "a holder's node must be one of the device's nodes".into(),
                    ));
                }
            }
            for u in &d.usb {
                if u.class.len() != 2 || !u.class.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(fail(
                        d,
                        "usb.class",
                        u.class.clone(),
                        "two hex digits, e.g. \"03\" for HID".into(),
                    ));
                }
            }
        }
        if let Some(display) = &self.display {
            let addresses: BTreeSet<PciAddress> = self.devices.iter().map(|d| d.address).collect();
            let nodes: BTreeSet<&Path> = self
                .devices
                .iter()
                .flat_map(|d| d.nodes.iter().map(PathBuf::as_path))
                .collect();
            display
                .check(&addresses, &nodes)
                .map_err(|(field, value, reason)| MachineError::Display {
                    path: path.to_path_buf(),
                    field,
                    value,
                    reason,
                })?;
        }
        // A group with no members is impossible; parents must form no cycle.
        let parents: BTreeMap<PciAddress, PciAddress> = self
            .devices
            .iter()
            .filter_map(|d| d.parent.map(|p| (d.address, p)))
            .collect();
        for d in &self.devices {
            let mut at = d.address;
            for _ in 0..=self.devices.len() {
                match parents.get(&at) {
                    Some(p) => at = *p,
                    None => break,
                }
                if at == d.address {
                    return Err(fail(
                        d,
                        "parent",
                        at.to_string(),
                        "the parent chain loops".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn z77() -> String {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../machines/z77-rx580.toml"
        ))
        .unwrap()
    }

    #[test]
    fn loads_the_z77_machine_and_round_trips() {
        let m = MachineFile::parse(&z77(), Path::new("z77-rx580.toml")).unwrap();
        assert_eq!(m.machine.iommu, IommuKind::Intel);
        assert_eq!(m.devices.len(), 23);
        let again = MachineFile::parse(&m.to_toml(), Path::new("again")).unwrap();
        assert_eq!(m, again);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_line() {
        let bad = z77().replace("boot_vga = true", "boot_vga = true\ncolour = \"red\"");
        let err = MachineFile::parse(&bad, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.toml") && err.contains("colour") && err.contains("line"),
            "{err}"
        );

        let bad = z77().replace("address = \"0000:03:00.0\"", "address = \"0000:03:00.9\"");
        let err = MachineFile::parse(&bad, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("0000:03:00.9") && err.contains("line"),
            "{err}"
        );

        let bad = z77().replace("iommu = \"intel\"", "iommu = \"arm\"");
        let err = MachineFile::parse(&bad, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("iommu") && err.contains("arm"), "{err}");
    }

    #[test]
    fn semantic_errors_name_device_field_and_value() {
        let bad = z77().replace("parent = \"0000:00:1c.4\"", "parent = \"0000:09:00.0\"");
        let err = MachineFile::parse(&bad, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("0000:03:00.0") && err.contains("parent") && err.contains("0000:09:00.0"),
            "{err}"
        );

        let bad = z77().replace("group = 14\n", "");
        let err = MachineFile::parse(&bad, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("0000:03:00.0") && err.contains("group"),
            "{err}"
        );

        let bad = z77().replace("address = \"0000:00:1f.3\"", "address = \"0000:00:1f.2\"");
        let err = MachineFile::parse(&bad, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listed twice"), "{err}");

        // A late driver needs a driver to come; the bridge 00:00.0 has none.
        let bad = z77().replace(
            "address = \"0000:00:00.0\"\n",
            "address = \"0000:00:00.0\"\nlate_driver = true\n",
        );
        let err = MachineFile::parse(&bad, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("0000:00:00.0") && err.contains("late_driver"),
            "{err}"
        );
    }

    #[test]
    fn the_coldplug_keys_round_trip() {
        let text = z77()
            .replacen("[machine]\n", "[machine]\ncoldplug_ms = 1500\n", 1)
            .replace(
                "address = \"0000:01:00.0\"\n",
                "address = \"0000:01:00.0\"\nlate_driver = true\n",
            );
        let machine = MachineFile::parse(&text, Path::new("m.toml")).unwrap();
        assert_eq!(machine.machine.coldplug_ms, Some(1500));
        let gpu = machine.device(&"0000:01:00.0".parse().unwrap()).unwrap();
        assert!(gpu.late_driver);
        let again = MachineFile::parse(&machine.to_toml(), Path::new("again")).unwrap();
        assert_eq!(again, machine);
    }
}
