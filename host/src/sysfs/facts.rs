//! The doctor's facts ([`HostView`]) read under the root: procfs and sysfs
//! for the CPU, firmware tables, IOMMU, modules, framebuffers and memory;
//! `etc/` and `usr/share/` for libvirt and QEMU's firmware.
//!
//! A fact that cannot be read is unknown (`None`): the doctor says so
//! rather than fail. Nothing here writes.

mod accounts;
mod framebuffers;
mod libvirt;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use vfiod_pci::{PciAddress, PciId};

use super::rooted::Rooted;
use crate::KernelResult;
use crate::facts::{DeviceHostView, HostView, HugepagePool, parse_vfio_ids};

const OSRELEASE: &str = "proc/sys/kernel/osrelease";
const CMDLINE: &str = "proc/cmdline";
const CPUINFO: &str = "proc/cpuinfo";
const INTERRUPTS: &str = "proc/interrupts";
const MEMINFO: &str = "proc/meminfo";
const ACPI_TABLES: &str = "sys/firmware/acpi/tables";
const IOMMU_CLASS: &str = "sys/class/iommu";
const MODULES: &str = "sys/module";
const UNSAFE_INTERRUPTS: &str = "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts";
const HUGEPAGES: &str = "sys/kernel/mm/hugepages";
const MODPROBE_D: &str = "etc/modprobe.d";
/// Bit 3 of an Intel IOMMU's extended capabilities: interrupt remapping.
const ECAP_IR: u64 = 1 << 3;

/// Everything the doctor reads.
pub(super) fn read(tree: &Rooted) -> KernelResult<HostView> {
    Ok(read_with(tree, &functions(tree)?))
}

/// Every PCI function with its resolved sysfs directory.
fn functions(tree: &Rooted) -> KernelResult<Vec<(PciAddress, PathBuf)>> {
    let mut functions = Vec::new();
    let Some(bus) = tree.resolve_optional(Path::new(super::PCI_DEVICES))? else {
        return Ok(functions);
    };
    for name in tree.list_optional(&bus)? {
        let Some(address) = name.to_str().and_then(|name| name.parse().ok()) else {
            continue;
        };
        if let Some(dir) = tree.resolve_optional_in(&bus, Path::new(&name))? {
            functions.push((address, dir));
        }
    }
    Ok(functions)
}

fn read_with(tree: &Rooted, functions: &[(PciAddress, PathBuf)]) -> HostView {
    let kernel_release = text(tree, OSRELEASE).map(|t| t.trim().to_owned());
    let accounts = accounts::read(tree);
    HostView {
        builtin_modules: kernel_release
            .as_deref()
            .and_then(|release| builtin_modules(tree, release)),
        kernel_release,
        cmdline: text(tree, CMDLINE).map(|t| t.trim().to_owned()),
        cpu_flags: text(tree, CPUINFO).and_then(|t| cpu_flags(&t)),
        kvm: tree
            .exists(Path::new("dev"))
            .then(|| tree.exists(Path::new("dev/kvm"))),
        acpi_tables: acpi_tables(tree),
        interrupt_remapping: interrupt_remapping(tree),
        allow_unsafe_interrupts: text(tree, UNSAFE_INTERRUPTS).and_then(|t| parse_bool(&t)),
        loaded_modules: loaded_modules(tree),
        modprobe_vfio_ids: modprobe_vfio_ids(tree),
        framebuffers: framebuffers::read(tree, functions),
        hugepages: hugepages(tree),
        mem_total_kb: text(tree, MEMINFO).and_then(|t| meminfo_kb(&t, "MemTotal")),
        qemu_conf: libvirt::qemu_conf(tree),
        firmware: libvirt::firmware(tree, accounts.as_ref()),
        hooks: libvirt::hooks(tree),
        domains: libvirt::domains(tree),
        accounts,
        devices: functions
            .iter()
            .map(|(address, dir)| (*address, device(tree, dir)))
            .collect(),
    }
}

/// A fact's `Option`, logging why it is unknown when reading failed.
fn lenient<T>(what: &Path, read: KernelResult<Option<T>>) -> Option<T> {
    match read {
        Ok(value) => value,
        Err(err) => {
            tracing::debug!("doctor: {} unknown: {err}", what.display());
            None
        }
    }
}

/// A whole file (links followed); `None` when absent or unreadable.
fn text(tree: &Rooted, rel: impl AsRef<Path>) -> Option<String> {
    let rel = rel.as_ref();
    lenient(rel, tree.read_resolved_optional(rel))
}

/// Names in a directory (links followed); `None` when it is not there.
fn list(tree: &Rooted, rel: impl AsRef<Path>) -> Option<Vec<String>> {
    let rel = rel.as_ref();
    let dir = lenient(rel, tree.resolve_optional(rel))?;
    let names = lenient(rel, tree.list_optional(&dir).map(Some))?;
    Some(
        names
            .into_iter()
            .filter_map(|name| name.into_string().ok())
            .collect(),
    )
}

/// `Y`/`N`, `1`/`0`.
fn parse_bool(text: &str) -> Option<bool> {
    match text.trim() {
        "Y" | "y" | "1" => Some(true),
        "N" | "n" | "0" => Some(false),
        _ => None,
    }
}

/// The first `flags` line (x86). Other architectures say nothing about
/// VT-x / AMD-V: unknown.
fn cpu_flags(cpuinfo: &str) -> Option<Vec<String>> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "flags").then(|| value.split_whitespace().map(str::to_owned).collect())
    })
}

/// The tables' signatures (`DMAR`, `IVRS`, `SSDT1`...). The directory also
/// holds the subdirectories `data` and `dynamic`: signatures are upper case.
fn acpi_tables(tree: &Rooted) -> Option<Vec<String>> {
    let mut tables: Vec<String> = list(tree, ACPI_TABLES)?
        .into_iter()
        .filter(|name| {
            name.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        })
        .collect();
    tables.sort();
    Some(tables)
}

/// `IR-` chips (`IR-PCI-MSI`, `IR-IO-APIC`) in `proc/interrupts` say the
/// IOMMU remaps interrupts, Intel and AMD alike. Without the file, an
/// Intel IOMMU's `ecap` says whether the hardware can.
fn interrupt_remapping(tree: &Rooted) -> Option<bool> {
    if let Some(interrupts) = text(tree, INTERRUPTS) {
        let tokens = || interrupts.split_whitespace();
        if tokens().any(|token| token.starts_with("IR-")) {
            return Some(true);
        }
        if tokens().any(|token| token.contains("PCI-MSI") || token == "IO-APIC") {
            return Some(false);
        }
    }
    let units = list(tree, IOMMU_CLASS)?;
    let mut seen = false;
    for unit in units {
        let Some(ecap) = text(
            tree,
            Path::new(IOMMU_CLASS).join(unit).join("intel-iommu/ecap"),
        ) else {
            continue;
        };
        let Ok(bits) = u64::from_str_radix(ecap.trim().trim_start_matches("0x"), 16) else {
            continue;
        };
        if bits & ECAP_IR != 0 {
            return Some(true);
        }
        seen = true;
    }
    seen.then_some(false)
}

/// Loadable modules that are loaded: their `sys/module` entry has
/// `initstate` (or `refcnt`); built-in ones have neither.
fn loaded_modules(tree: &Rooted) -> Option<BTreeSet<String>> {
    let names = list(tree, MODULES)?;
    Some(
        names
            .into_iter()
            .filter(|name| {
                let dir = Path::new(MODULES).join(name);
                tree.exists(&dir.join("initstate")) || tree.exists(&dir.join("refcnt"))
            })
            .collect(),
    )
}

/// `modules.builtin` of the running kernel, as module keys.
fn builtin_modules(tree: &Rooted, release: &str) -> Option<BTreeSet<String>> {
    if release.is_empty() || release.contains('/') || release == ".." {
        return None;
    }
    let list = text(
        tree,
        Path::new("lib/modules")
            .join(release)
            .join("modules.builtin"),
    )?;
    Some(
        list.lines()
            .filter_map(|line| Path::new(line.trim()).file_name()?.to_str())
            .filter_map(|file| {
                file.split_once(".ko")
                    .map(|(stem, _)| stem.replace('-', "_"))
            })
            .collect(),
    )
}

/// `options vfio-pci ids=1002:67df,1002:aaf0` in `etc/modprobe.d/*.conf`.
fn modprobe_vfio_ids(tree: &Rooted) -> Option<Vec<PciId>> {
    let mut ids = Vec::new();
    for name in list(tree, MODPROBE_D)? {
        if !name.ends_with(".conf") {
            continue;
        }
        let Some(conf) = text(tree, Path::new(MODPROBE_D).join(&name)) else {
            continue;
        };
        for line in conf.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("options")
                || words.next().map(|m| m.replace('-', "_")).as_deref() != Some("vfio_pci")
            {
                continue;
            }
            for word in words {
                if let Some(list) = word.strip_prefix("ids=") {
                    ids.extend(parse_vfio_ids(list));
                }
            }
        }
    }
    Some(ids)
}

fn hugepages(tree: &Rooted) -> Option<Vec<HugepagePool>> {
    let mut pools = Vec::new();
    for name in list(tree, HUGEPAGES)? {
        let Some(size_kb) = name
            .strip_prefix("hugepages-")
            .and_then(|rest| rest.strip_suffix("kB"))
            .and_then(|size| size.parse().ok())
        else {
            continue;
        };
        let dir = Path::new(HUGEPAGES).join(&name);
        let number = |file: &str| text(tree, dir.join(file))?.trim().parse().ok();
        if let (Some(total), Some(free)) = (number("nr_hugepages"), number("free_hugepages")) {
            pools.push(HugepagePool {
                size_kb,
                total,
                free,
            });
        }
    }
    pools.sort_by_key(|pool| pool.size_kb);
    Some(pools)
}

/// `MemTotal:       16318412 kB`.
fn meminfo_kb(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name.trim() == key).then(|| value.split_whitespace().next()?.parse().ok())?
    })
}

fn device(tree: &Rooted, dir: &Path) -> DeviceHostView {
    let attr = |name: &str| lenient(&dir.join(name), tree.read_optional(&dir.join(name)));
    DeviceHostView {
        d3cold_allowed: attr("d3cold_allowed").and_then(|t| parse_bool(&t)),
        d3cold_capable: Some(tree.exists(&dir.join("firmware_node/power_resources_D3hot"))),
        driver_override: Some(tree.exists(&dir.join("driver_override"))),
    }
}

/// Maps user and group ids to names for [`crate::facts::FileStat`].
fn owner_names(accounts: Option<&crate::facts::Accounts>, uid: u32, gid: u32) -> (String, String) {
    let user = accounts
        .and_then(|a| a.user_name(uid))
        .map_or_else(|| uid.to_string(), str::to_owned);
    let group = accounts
        .and_then(|a| a.group_name(gid))
        .map_or_else(|| gid.to_string(), str::to_owned);
    (user, group)
}

/// Files of a directory by name, for descriptors that override each other.
fn files_by_name(tree: &Rooted, dir: &str) -> BTreeMap<String, PathBuf> {
    list(tree, dir)
        .unwrap_or_default()
        .into_iter()
        .map(|name| (name.clone(), Path::new(dir).join(name)))
        .collect()
}

#[cfg(test)]
mod tests;
