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
        ("b450-single-rx580.vfiod.toml", "b450-single-rx580.toml"),
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
            "b450-single-rx580.toml",
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
    std::fs::write(
        &path,
        "[daemon]\nunbind_timeout_ms = 10000\n\n[profiles.gpu]\ndevices = [\"01:00.0\"]\nfoo = 1\n",
    )
    .unwrap();
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
    let text = "[profiles.a-b]\nids = [\"1033:0194\"]\n[profiles.a_2db]\ndevices = [\"01:00.0\"]\n";
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
    let text = "[profiles.zz]\nvms = [\"w\"]\n[profiles.aa]\nvms = [\"\"]\nids = [\"1033:0194\"]\n";
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
fn an_error_names_the_file_line_and_column() {
    let err = Config::parse("[nope]\n", Path::new("/etc/vfiod/vfiod.toml")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("/etc/vfiod/vfiod.toml: line 1, column 2: "),
        "{text}"
    );
}

#[test]
fn reset_method_is_kept_normalized() {
    let text = "[profiles.rx580]\ndevices = [\"01:00.0\"]\nreset_method = \"device_specific\"\n\n[profiles.usb]\nids = [\"1033:0194\"]\nreset_method = \"  flr   bus \"\n\n[profiles.nic]\nids = [\"8086:10d3\"]\n";
    let config = Config::parse(text, Path::new("/etc/vfiod/vfiod.toml")).unwrap();
    let method = |name: &str| config.profile(name).unwrap().reset_method.clone();
    assert_eq!(method("rx580").as_deref(), Some("device_specific"));
    assert_eq!(method("usb").as_deref(), Some("flr bus"));
    assert_eq!(method("nic"), None);
}

#[test]
fn a_reset_method_of_the_wrong_shape_is_refused_with_its_line() {
    let head = "[profiles.rx580]\ndevices = [\"01:00.0\"]\n";
    refused(
        &format!("{head}reset_method = \"\"\n"),
        3,
        &["profile \"rx580\"", "reset_method", "names no method"],
    );
    refused(
        &format!("{head}reset_method = \"Device-Specific\"\n"),
        3,
        &["\"Device-Specific\"", "not a method name"],
    );
    refused(
        &format!("{head}reset_method = \"default bus\"\n"),
        3,
        &["\"default\" stands alone"],
    );
    refused(
        &format!("{head}reset_method = \"bus flr bus\"\n"),
        3,
        &["lists \"bus\" twice"],
    );
    refused(&format!("{head}reset_method = 1\n"), 3, &["reset_method"]);
}

#[test]
fn handoff_is_a_profile_flag_refused_with_boot_vfio() {
    let text = "[profiles.desktop]\ndevices = [\"0000:01:00.0\"]\nhandoff = true\n\n[profiles.usb]\nids = [\"1033:0194\"]\n";
    let config = Config::parse(text, Path::new("c.toml")).unwrap();
    assert!(config.profile("desktop").unwrap().handoff);
    assert!(!config.profile("usb").unwrap().handoff, "off by default");
    refused(
        "[profiles.desktop]\ndevices = [\"0000:01:00.0\"]\nboot = \"vfio\"\nhandoff = true\n",
        4,
        &["handoff = true and boot = \"vfio\"", "desktop"],
    );
    refused(
        "[profiles.desktop]\ndevices = [\"0000:01:00.0\"]\nhandoff = \"yes\"\n",
        3,
        &["handoff"],
    );
}
