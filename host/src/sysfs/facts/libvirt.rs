//! libvirt and QEMU as installed: qemu.conf's `user` and `group`, the
//! UEFI firmware QEMU's descriptors name, the QEMU hooks and the
//! persistent domains.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use roxmltree::{Document, Node, ParsingOptions};
use vfiod_pci::PciAddress;

use super::{files_by_name, list, owner_names, text};
use crate::facts::{
    Accounts, Domain, DomainHostdev, FileStat, FirmwareImage, HookScript, QemuConf, QemuConfValue,
};
use crate::sysfs::rooted::Rooted;

const QEMU_CONF: &str = "etc/libvirt/qemu.conf";
const LIBVIRT_ETC: &str = "etc/libvirt";
const HOOK: &str = "etc/libvirt/hooks/qemu";
const HOOK_DIR: &str = "etc/libvirt/hooks/qemu.d";
const DOMAINS: &str = "etc/libvirt/qemu";
/// QEMU's firmware descriptors (docs/interop/firmware.json): a file in
/// `etc` overrides (an empty one masks) the one of the same name in `usr`.
const DESCRIPTORS_SYSTEM: &str = "usr/share/qemu/firmware";
const DESCRIPTORS_LOCAL: &str = "etc/qemu/firmware";
/// A domain XML or a descriptor is kilobytes; bigger files are not read.
const MAX_FILE_BYTES: usize = 4 << 20;

/// `user = "qemu"` and `group = "kvm"`; `None` when there is no qemu.conf.
pub(super) fn qemu_conf(tree: &Rooted) -> Option<QemuConf> {
    Some(parse_qemu_conf(&text(tree, QEMU_CONF)?))
}

/// The last uncommented `user` / `group` wins, as in libvirt. When unset,
/// the commented-out `#user = "..."` line that libvirt's template fills
/// with the build's default (not the indented examples, `#       user =
/// "qemu"`) is kept as the hint.
pub(super) fn parse_qemu_conf(conf: &str) -> QemuConf {
    let mut user = None;
    let mut group = None;
    let mut user_hint = None;
    let mut group_hint = None;
    for line in conf.lines() {
        let (commented, assignment) = match line.strip_prefix('#') {
            Some(rest) if rest.starts_with(char::is_whitespace) => continue,
            Some(rest) => (true, rest),
            None => (false, line.trim_start()),
        };
        let Some((key, value)) = assignment.split_once('=') else {
            continue;
        };
        let Some(value) = quoted(value) else {
            continue;
        };
        match (key.trim(), commented) {
            ("user", false) => user = Some(value),
            ("group", false) => group = Some(value),
            ("user", true) => user_hint = Some(value),
            ("group", true) => group_hint = Some(value),
            _ => {}
        }
    }
    let value = |set: Option<String>, hint: Option<String>| match set {
        Some(value) => QemuConfValue::Set(value),
        None => QemuConfValue::Unset { hint },
    };
    QemuConf {
        path: Path::new("/").join(QEMU_CONF),
        user: value(user, user_hint),
        group: value(group, group_hint),
    }
}

/// `"qemu"   # comment` → `qemu`.
fn quoted(value: &str) -> Option<String> {
    let rest = value.trim_start().strip_prefix('"')?;
    let (inner, _) = rest.split_once('"')?;
    Some(inner.to_owned())
}

/// The UEFI images of every descriptor for this machine's architecture,
/// each with its owner and mode. `None` when neither descriptor directory
/// exists (no QEMU firmware package).
pub(super) fn firmware(tree: &Rooted, accounts: Option<&Accounts>) -> Option<Vec<FirmwareImage>> {
    let system = files_by_name(tree, DESCRIPTORS_SYSTEM);
    let local = files_by_name(tree, DESCRIPTORS_LOCAL);
    if list(tree, DESCRIPTORS_SYSTEM).is_none() && list(tree, DESCRIPTORS_LOCAL).is_none() {
        return None;
    }
    let mut merged = system;
    merged.extend(local);
    let mut images: Vec<FirmwareImage> = Vec::new();
    for (name, rel) in merged {
        if !name.ends_with(".json") {
            continue;
        }
        let Some(json) = text(tree, &rel).filter(|json| json.len() <= MAX_FILE_BYTES) else {
            continue;
        };
        // An empty file in etc masks the descriptor of that name.
        if json.trim().is_empty() {
            continue;
        }
        let descriptor = Path::new("/").join(&rel);
        for path in descriptor_images(&json, std::env::consts::ARCH) {
            if images.iter().any(|image| image.path == path) {
                continue;
            }
            let stat = stat(tree, &path, accounts);
            images.push(FirmwareImage {
                path,
                descriptor: Some(descriptor.clone()),
                stat,
            });
        }
    }
    Some(images)
}

/// The executable and NVRAM template (flash), or the image (memory), of a
/// UEFI descriptor whose targets include `arch`.
pub(super) fn descriptor_images(json: &str, arch: &str) -> Vec<PathBuf> {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let uefi = doc["interface-types"]
        .as_array()
        .is_some_and(|types| types.iter().any(|t| t == "uefi"));
    let targets = doc["targets"].as_array();
    let for_arch = targets.is_none_or(|targets| {
        targets
            .iter()
            .any(|t| t["architecture"].as_str() == Some(arch))
    });
    if !uefi || !for_arch {
        return Vec::new();
    }
    let mapping = &doc["mapping"];
    [
        &mapping["executable"]["filename"],
        &mapping["nvram-template"]["filename"],
        &mapping["filename"],
    ]
    .into_iter()
    .filter_map(|value| value.as_str())
    .filter(|path| path.starts_with('/'))
    .map(PathBuf::from)
    .collect()
}

/// Owner, group and mode of `path` (a host path, read under the root).
fn stat(tree: &Rooted, path: &Path, accounts: Option<&Accounts>) -> Option<FileStat> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let resolved = tree.resolve_optional(rel).ok().flatten()?;
    let metadata = fs::metadata(tree.root().join(resolved)).ok()?;
    let (owner, group) = owner_names(accounts, metadata.uid(), metadata.gid());
    Some(FileStat {
        owner,
        group,
        mode: metadata.mode() & 0o7777,
    })
}

/// `hooks/qemu` and every file in `hooks/qemu.d`; `None` when there is
/// no libvirt configuration at all.
pub(super) fn hooks(tree: &Rooted) -> Option<Vec<HookScript>> {
    list(tree, LIBVIRT_ETC)?;
    let mut scripts = Vec::new();
    let mut candidates = vec![PathBuf::from(HOOK)];
    candidates.extend(
        list(tree, HOOK_DIR)
            .unwrap_or_default()
            .into_iter()
            .map(|name| Path::new(HOOK_DIR).join(name)),
    );
    for rel in candidates {
        let Some(resolved) = tree.resolve_optional(&rel).ok().flatten() else {
            continue;
        };
        let Ok(metadata) = fs::metadata(tree.root().join(&resolved)) else {
            continue;
        };
        if !metadata.is_file() {
            continue;
        }
        let contents = if metadata.len() as usize <= MAX_FILE_BYTES {
            text(tree, &rel).unwrap_or_default()
        } else {
            String::new()
        };
        scripts.push(HookScript {
            path: Path::new("/").join(&rel),
            executable: metadata.permissions().mode() & 0o111 != 0,
            calls_vfioctl: contents.contains("vfioctl") && contents.contains("libvirt-hook"),
        });
    }
    Some(scripts)
}

/// The persistent domains; `None` when there is no libvirt configuration.
pub(super) fn domains(tree: &Rooted) -> Option<Vec<Domain>> {
    list(tree, LIBVIRT_ETC)?;
    let mut domains = Vec::new();
    for name in list(tree, DOMAINS).unwrap_or_default() {
        if !name.ends_with(".xml") {
            continue;
        }
        let rel = Path::new(DOMAINS).join(&name);
        let Some(xml) = text(tree, &rel).filter(|xml| xml.len() <= MAX_FILE_BYTES) else {
            continue;
        };
        match parse_domain(&xml, Path::new("/").join(&rel)) {
            Some(domain) => domains.push(domain),
            None => tracing::debug!("doctor: {} is not a domain XML", rel.display()),
        }
    }
    Some(domains)
}

/// Name, memory, hugepages and PCI hostdevs of a domain XML.
pub(super) fn parse_domain(xml: &str, path: PathBuf) -> Option<Domain> {
    let options = ParsingOptions {
        // A DTD is how entity bombs come in; libvirt never writes one.
        allow_dtd: false,
        nodes_limit: 1_000_000,
        ..ParsingOptions::default()
    };
    let doc = Document::parse_with_options(xml, options).ok()?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return None;
    }
    let name = child(root, "name")?.text()?.trim().to_owned();
    let memory_kb = child(root, "memory").and_then(|memory| {
        let amount: u64 = memory.text()?.trim().parse().ok()?;
        memory_kib(amount, memory.attribute("unit").unwrap_or("KiB"))
    });
    let hugepages = child(root, "memoryBacking").is_some_and(|b| child(b, "hugepages").is_some());
    let mut hostdevs = Vec::new();
    if let Some(devices) = child(root, "devices") {
        for hostdev in devices
            .children()
            .filter(|c| c.is_element() && c.has_tag_name("hostdev"))
        {
            if hostdev.attribute("type") != Some("pci")
                || hostdev.attribute("mode").is_some_and(|m| m != "subsystem")
            {
                continue;
            }
            let Some(address) = child(hostdev, "source").and_then(|s| child(s, "address")) else {
                continue;
            };
            let Some(address) = hostdev_address(address) else {
                continue;
            };
            hostdevs.push(DomainHostdev {
                address,
                managed: hostdev.attribute("managed") == Some("yes"),
            });
        }
    }
    Some(Domain {
        name,
        path,
        memory_kb,
        hugepages,
        hostdevs,
    })
}

/// The first child element named `tag`.
fn child<'a, 'input>(node: Node<'a, 'input>, tag: &str) -> Option<Node<'a, 'input>> {
    node.children()
        .find(|c| c.is_element() && c.has_tag_name(tag))
}

/// `<address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>`
/// (hex with 0x, or decimal).
fn hostdev_address(node: Node<'_, '_>) -> Option<PciAddress> {
    let number = |name: &str, default: Option<u32>| -> Option<u32> {
        match node.attribute(name) {
            Some(text) => match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => text.parse().ok(),
            },
            None => default,
        }
    };
    let domain = u16::try_from(number("domain", Some(0))?).ok()?;
    let bus = u8::try_from(number("bus", None)?).ok()?;
    let slot = u8::try_from(number("slot", None)?).ok()?;
    let function = u8::try_from(number("function", Some(0))?).ok()?;
    (slot < 32 && function < 8).then(|| PciAddress::new(domain, bus, slot, function))
}

/// libvirt's memory units (formatdomain.html#memory-allocation).
fn memory_kib(amount: u64, unit: &str) -> Option<u64> {
    let bytes_per_unit: u64 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    };
    Some(amount.checked_mul(bytes_per_unit)? / 1024)
}
