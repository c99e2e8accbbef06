use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::kernel::Inspect;
use crate::kernel::sim::SimKernel;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let template = std::env::temp_dir().join("vfiod-early-claim-XXXXXX");
        TempDir(nix::unistd::mkdtemp(&template).unwrap())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn machines() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../machines")
}

/// The Z77 machine's devices, and its config with `extra` appended.
fn z77(config: &str) -> (Vec<PciDevice>, Config) {
    let state = TempDir::new();
    let kernel = SimKernel::open(&machines().join("z77-rx580.toml"), &state.0).unwrap();
    let config = Config::parse(config, Path::new("vfiod.toml")).unwrap();
    (kernel.devices().unwrap(), config)
}

const GPU_AT_BOOT: &str = "[profiles.rx580]\ndevices = [\"01:00.0\"]\nboot = \"vfio\"\n[profiles.usb3]\nids = [\"1033:0194\"]\n";

#[test]
fn a_boot_profile_claims_its_completed_set_and_a_host_profile_nothing() {
    let (devices, config) = z77(GPU_AT_BOOT);
    let root = TempDir::new();
    let files = render(&config, &devices, &root.0);
    assert_eq!(files.len(), 1, "no initramfs generator here: {files:?}");
    let rule = &files[0].text;
    for address in ["0000:01:00.0", "0000:01:00.1"] {
        assert!(
            rule.contains(&format!(
                "ACTION==\"add\", SUBSYSTEM==\"pci\", KERNEL==\"{address}\", ATTR{{driver_override}}=\"vfio-pci\""
            )),
            "{rule}"
        );
    }
    assert!(
        !rule.contains("1033"),
        "usb3 boots on its host driver: {rule}"
    );
}

#[test]
fn an_ids_profile_is_claimed_by_id_for_a_card_plugged_in_later() {
    let (devices, config) = z77("[profiles.usb3]\nids = [\"1033:0194\"]\nboot = \"vfio\"\n");
    let files = render(&config, &devices, Path::new("/nonexistent"));
    assert!(
        files[0]
            .text
            .contains("ATTR{vendor}==\"0x1033\", ATTR{device}==\"0x0194\""),
        "{}",
        files[0].text
    );
}

#[test]
fn each_installed_initramfs_generator_gets_the_rule_and_the_vfio_modules() {
    let (devices, config) = z77(GPU_AT_BOOT);
    let root = TempDir::new();
    for dir in [
        "etc/mkinitcpio.conf.d",
        "etc/dracut.conf.d",
        "etc/initramfs-tools",
    ] {
        std::fs::create_dir_all(root.0.join(dir)).unwrap();
    }
    let files = render(&config, &devices, &root.0);
    let paths: Vec<&str> = files.iter().map(|f| f.path).collect();
    assert_eq!(paths, [UDEV_RULE, MKINITCPIO, DRACUT, INITRAMFS_TOOLS_HOOK]);
    for file in &files[1..] {
        assert!(file.text.contains("vfio_pci"), "{}", file.text);
        assert!(
            file.text.contains(&format!("/{UDEV_RULE}")),
            "{}",
            file.text
        );
    }
    let synced = sync(&root.0, &files).unwrap();
    assert_eq!(synced.written.len(), 4);
    assert_eq!(
        synced.regenerate,
        [
            "mkinitcpio -P",
            "dracut --regenerate-all --force",
            "update-initramfs -u -k all"
        ]
    );
    let hook = std::fs::metadata(root.0.join(INITRAMFS_TOOLS_HOOK)).unwrap();
    assert_eq!(hook.permissions().mode() & 0o777, 0o755);
    // In step already: nothing to write, nothing to regenerate.
    assert_eq!(sync(&root.0, &files).unwrap(), Synced::default());
}

#[test]
fn the_files_go_when_no_profile_boots_on_vfio_any_more() {
    let (devices, config) = z77(GPU_AT_BOOT);
    let root = TempDir::new();
    std::fs::create_dir_all(root.0.join("etc/dracut.conf.d")).unwrap();
    sync(&root.0, &render(&config, &devices, &root.0)).unwrap();
    assert!(root.0.join(UDEV_RULE).exists());

    let (devices, config) = z77("[profiles.rx580]\ndevices = [\"01:00.0\"]\n");
    let files = render(&config, &devices, &root.0);
    assert!(files.is_empty());
    let synced = sync(&root.0, &files).unwrap();
    assert_eq!(synced.removed, [UDEV_RULE, DRACUT]);
    assert_eq!(synced.regenerate, ["dracut --regenerate-all --force"]);
    assert!(!root.0.join(UDEV_RULE).exists());
}

#[test]
fn udev_reads_back_the_override_each_rule_writes() {
    let (devices, config) = z77(
        "[profiles.rx580]\ndevices = [\"01:00.0\"]\nboot = \"vfio\"\n[profiles.usb3]\nids = [\"1033:0194\"]\nboot = \"vfio\"\n",
    );
    let rule = &render(&config, &devices, Path::new("/nonexistent"))[0].text;
    let id_of = |address: &str| {
        let address: PciAddress = address.parse().unwrap();
        let device = devices.iter().find(|d| d.address == address).unwrap();
        (address, device.id)
    };
    for claimed in ["0000:01:00.0", "0000:01:00.1"] {
        let (address, id) = id_of(claimed);
        assert_eq!(
            override_at_add(rule, &address, &id).as_deref(),
            Some("vfio-pci"),
            "{claimed}: {rule}"
        );
    }
    // Another address with the GPU's ids: the rule names addresses.
    let (_, gpu_id) = id_of("0000:01:00.0");
    let elsewhere: PciAddress = "0000:05:00.0".parse().unwrap();
    assert_eq!(override_at_add(rule, &elsewhere, &gpu_id), None);
    // A card by id, wherever it is plugged in.
    let usb = PciId {
        vendor: 0x1033,
        device: 0x0194,
    };
    assert_eq!(
        override_at_add(rule, &elsewhere, &usb).as_deref(),
        Some("vfio-pci")
    );
}

/// The kernel probed the function when it found it, long before udev's
/// coldplug replays its `add`; vfio-pci may be loaded already (modules-load.d)
/// and then its registration probes nothing: the rule must ask for the probe
/// itself, or the function stays driverless until vfiod binds it (the
/// systemd lane's boot 2 saw vfiod write the override and probe vfio-pci).
#[test]
fn each_claim_probes_the_function_once_its_override_is_written() {
    let (devices, config) = z77(GPU_AT_BOOT);
    let rule = &render(&config, &devices, Path::new("/nonexistent"))[0].text;
    for line in rule.lines().filter(|l| l.starts_with("ACTION")) {
        assert!(
            line.ends_with(
                ", ATTR{driver_override}=\"vfio-pci\", RUN{builtin}+=\"kmod load vfio_pci\", RUN+=\"/bin/sh -c 'echo %k > /sys/bus/pci/drivers_probe'\""
            ),
            "{line}"
        );
    }
}

/// mkinitcpio reads drop-ins from /etc/mkinitcpio.conf.d since version 36,
/// which ships the directory; an older one (only /etc/mkinitcpio.conf)
/// would never read the piece, and under the unit the directory could not
/// be made anyway (ReadWritePaths= skips what is absent, /etc is read-only).
#[test]
fn mkinitcpio_gets_its_piece_only_where_it_reads_drop_ins() {
    let (devices, config) = z77(GPU_AT_BOOT);
    let root = TempDir::new();
    std::fs::create_dir_all(root.0.join("etc")).unwrap();
    std::fs::write(root.0.join("etc/mkinitcpio.conf"), "HOOKS=(base udev)\n").unwrap();
    let files = render(&config, &devices, &root.0);
    let paths: Vec<&str> = files.iter().map(|f| f.path).collect();
    assert_eq!(paths, [UDEV_RULE]);
}

/// mkinitcpio and dracut source their drop-ins with bash, after the main
/// file: what the pieces add is what bash reads from them.
#[test]
fn mkinitcpio_and_dracut_read_the_modules_and_the_rule_from_their_pieces() {
    let (devices, config) = z77(GPU_AT_BOOT);
    let root = TempDir::new();
    for dir in ["etc/mkinitcpio.conf.d", "etc/dracut.conf.d"] {
        std::fs::create_dir_all(root.0.join(dir)).unwrap();
    }
    sync(&root.0, &render(&config, &devices, &root.0)).unwrap();
    let read = |setup: &str, piece: &str, show: &str| {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("set -e; {setup}; . \"$1\"; {show}"))
            .arg("bash")
            .arg(root.0.join(piece))
            .output()
            .expect("bash runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let rule = format!("/{UDEV_RULE}");
    assert_eq!(
        read(
            "MODULES=(ext4) FILES=()",
            MKINITCPIO,
            "echo \"${MODULES[*]}|${FILES[*]}\""
        ),
        format!("ext4 vfio_pci vfio vfio_iommu_type1|{rule}\n")
    );
    let dracut = read(
        "force_drivers=' nvme ' install_items=''",
        DRACUT,
        "echo $force_drivers; echo $install_items",
    );
    assert_eq!(
        dracut,
        format!("nvme vfio_pci vfio vfio_iommu_type1\n{rule}\n")
    );
}
