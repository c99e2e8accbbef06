//! Early claim (DESIGN §10): what makes the kernel give a `boot = "vfio"`
//! profile's functions to vfio-pci as they are found, before any host
//! driver, in the initramfs too. As driverctl does, a udev rule sets
//! `driver_override` at `add` (udev writes it before it loads the modules
//! the device's modalias asks for), loads vfio-pci and probes the
//! function; the initramfs generators present on the host (mkinitcpio,
//! dracut, initramfs-tools) get the rule and the vfio modules. vfiod writes these files from its
//! config when it starts and on reload, and removes them when no profile
//! asks for it; the initramfs must then be regenerated, which vfiod says
//! and leaves to the administrator.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{error, info, warn};
use vfiod_config::{BootState, Config};
use vfiod_pci::{PciAddress, PciDevice, PciId};

use crate::engine::Engine;
use crate::plan::complete_set;

/// The udev rule, under the root.
pub const UDEV_RULE: &str = "etc/udev/rules.d/61-vfiod-early-claim.rules";
const MKINITCPIO: &str = "etc/mkinitcpio.conf.d/vfiod.conf";
const DRACUT: &str = "etc/dracut.conf.d/vfiod.conf";
const INITRAMFS_TOOLS_HOOK: &str = "etc/initramfs-tools/hooks/vfiod";

/// The modules a VM needs from vfio, loaded with vfio-pci.
const VFIO_MODULES: [&str; 3] = ["vfio_pci", "vfio", "vfio_iommu_type1"];

/// One file of the early claim: where, what, and its mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimFile {
    pub path: &'static str,
    pub text: String,
    pub mode: u32,
}

/// What changed on disk, and the command that makes an initramfs see it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Synced {
    pub written: Vec<&'static str>,
    pub removed: Vec<&'static str>,
    pub regenerate: Vec<&'static str>,
}

/// The files for `config` on a host whose devices are `devices`: none when
/// no profile boots on vfio-pci. An initramfs generator's file only where
/// that generator is installed (its configuration directory exists).
pub fn render(config: &Config, devices: &[PciDevice], root: &Path) -> Vec<ClaimFile> {
    let rules = rules(config, devices);
    if rules.is_empty() {
        return Vec::new();
    }
    let header = "# Written by vfiod from /etc/vfiod/vfiod.toml (profiles with boot = \"vfio\"),\n# on every start and reload; removed when none is left. Do not edit.\n";
    let mut files = vec![ClaimFile {
        path: UDEV_RULE,
        text: format!("{header}{}", rules.join("")),
        mode: 0o644,
    }];
    let rule = format!("/{UDEV_RULE}");
    let modules = VFIO_MODULES.join(" ");
    // mkinitcpio 36 and newer read (and ship) the drop-in directory; an
    // older one would ignore a piece there.
    if root.join("etc/mkinitcpio.conf.d").is_dir() {
        files.push(ClaimFile {
            path: MKINITCPIO,
            text: format!("{header}MODULES+=({modules})\nFILES+=({rule})\n"),
            mode: 0o644,
        });
    }
    if root.join("etc/dracut.conf.d").is_dir() {
        files.push(ClaimFile {
            path: DRACUT,
            text: format!("{header}force_drivers+=\" {modules} \"\ninstall_items+=\" {rule} \"\n"),
            mode: 0o644,
        });
    }
    if root.join("etc/initramfs-tools").is_dir() {
        files.push(ClaimFile {
            path: INITRAMFS_TOOLS_HOOK,
            text: format!(
                "#!/bin/sh\n{header}case \"$1\" in prereqs) exit 0 ;; esac\n. /usr/share/initramfs-tools/hook-functions\nmanual_add_modules {modules}\nmkdir -p \"$DESTDIR/etc/udev/rules.d\"\ncp {rule} \"$DESTDIR/etc/udev/rules.d/\"\n"
            ),
            mode: 0o755,
        });
    }
    files
}

/// One rule per function of each `boot = "vfio"` profile's completed set
/// (as a bind would move it), and per id of its `ids` for a card plugged
/// in later.
fn rules(config: &Config, devices: &[PciDevice]) -> Vec<String> {
    let mut rules = Vec::new();
    // The override is written while udev handles the `add`, before any RUN
    // (80-drivers.rules's module load among them). Loading vfio-pci probes
    // the function; when it is loaded already nothing does, so the rule asks
    // for the probe (a no-op for a function with a driver).
    let claim = "ATTR{driver_override}=\"vfio-pci\", RUN{builtin}+=\"kmod load vfio_pci\", RUN+=\"/bin/sh -c 'echo %k > /sys/bus/pci/drivers_probe'\"";
    for (name, profile) in &config.profiles {
        if profile.boot != BootState::Vfio {
            continue;
        }
        let named: Vec<PciAddress> = devices
            .iter()
            .filter(|d| profile.matches(&d.address, &d.id))
            .map(|d| d.address)
            .chain(profile.devices.iter().copied())
            .collect();
        let (set, _) = complete_set(devices, &named);
        rules.push(format!("# profile {name}\n"));
        for address in set {
            rules.push(format!(
                "ACTION==\"add\", SUBSYSTEM==\"pci\", KERNEL==\"{address}\", {claim}\n"
            ));
        }
        for id in &profile.ids {
            rules.push(format!(
                "ACTION==\"add\", SUBSYSTEM==\"pci\", ATTR{{vendor}}==\"0x{:04x}\", ATTR{{device}}==\"0x{:04x}\", {claim}\n",
                id.vendor, id.device
            ));
        }
    }
    rules
}

/// What udev writes to `driver_override` at the `add` of the function
/// `address` with ids `id`, by rules as [`render`] writes them: the
/// simulated kernel's udev reads the rule file with this.
pub fn override_at_add(rules: &str, address: &PciAddress, id: &PciId) -> Option<String> {
    let matches = |key: &str, value: &str| match key {
        "ACTION" => value == "add",
        "SUBSYSTEM" => value == "pci",
        "KERNEL" => value == address.to_string(),
        "ATTR{vendor}" => value == format!("0x{:04x}", id.vendor),
        "ATTR{device}" => value == format!("0x{:04x}", id.device),
        _ => false,
    };
    rules
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let mut written = None;
            for part in line.split(", ") {
                if let Some((key, value)) = part.split_once("==") {
                    if !matches(key, value.trim_matches('"')) {
                        return None;
                    }
                } else if let Some(value) = part.strip_prefix("ATTR{driver_override}=") {
                    written = Some(value.trim_matches('"').to_string());
                }
            }
            written
        })
}

/// Writes `files` under `root`, each only when it differs, and removes the
/// early claim's files that `files` no longer has.
pub fn sync(root: &Path, files: &[ClaimFile]) -> io::Result<Synced> {
    let mut synced = Synced::default();
    for file in files {
        let path = root.join(file.path);
        if std::fs::read_to_string(&path).is_ok_and(|now| now == file.text) {
            continue;
        }
        write(&path, &file.text, file.mode)?;
        synced.written.push(file.path);
    }
    for path in [UDEV_RULE, MKINITCPIO, DRACUT, INITRAMFS_TOOLS_HOOK] {
        if files.iter().any(|f| f.path == path) {
            continue;
        }
        match std::fs::remove_file(root.join(path)) {
            Ok(()) => synced.removed.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let changed = |path: &str| synced.written.contains(&path) || synced.removed.contains(&path);
    let rule_changed = changed(UDEV_RULE);
    for (path, command) in [
        (MKINITCPIO, "mkinitcpio -P"),
        (DRACUT, "dracut --regenerate-all --force"),
        (INITRAMFS_TOOLS_HOOK, "update-initramfs -u -k all"),
    ] {
        if changed(path) || (rule_changed && root.join(path).exists()) {
            synced.regenerate.push(command);
        }
    }
    Ok(synced)
}

/// A new file beside the old one, renamed over it.
fn write(path: &Path, text: &str, mode: u32) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let fresh: PathBuf = dir.join(format!(
        ".{}.vfiod-new",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let _ = std::fs::remove_file(&fresh);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&fresh)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&fresh, path)
}

/// Where the files go: the host's `/`, or for a simulated machine a
/// `root` directory in its state dir (a simulation never writes `/etc`).
pub fn root_for(simulated: bool, state_dir: &Path) -> PathBuf {
    if simulated {
        state_dir.join("root")
    } else {
        PathBuf::from("/")
    }
}

/// Puts the files in step with the engine's config (off the event loop),
/// and says what changed and what to regenerate.
pub async fn keep_in_step(engine: &Arc<Engine>, root: PathBuf) {
    let engine = engine.clone();
    let shown = root.clone();
    let synced = tokio::task::spawn_blocking(move || {
        let devices = engine.kernel().devices().map_err(|e| e.to_string())?;
        let files = render(&engine.config(), &devices, &root);
        sync(&root, &files).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|synced| synced);
    match synced {
        Ok(synced) => {
            for path in &synced.written {
                info!(file = %shown.join(path).display(), "early claim written");
            }
            for path in &synced.removed {
                info!(file = %shown.join(path).display(), "early claim removed");
            }
            if !synced.regenerate.is_empty() {
                warn!(
                    commands = %synced.regenerate.join("; "),
                    "the early claim changed: regenerate the initramfs for it to take effect at the next boot"
                );
            }
        }
        Err(e) => error!(
            error = %e,
            "the early claim could not be written: a host driver may take boot = \"vfio\" devices first at the next boot"
        ),
    }
}

#[cfg(test)]
mod tests;
