//! The files of systemd/: the unit (systemd-analyze verify, the security
//! bound), the D-Bus activation file, the libvirt hook script with
//! libvirt's argument conventions, and the example polkit rule.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vfiod_tests::{Rig, TempDir, assert_exit, bin, repo, root_for, stderr, stdout};

/// The highest `systemd-analyze security` exposure the unit may have.
const MAX_EXPOSURE: f64 = 2.5;

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap()
}

/// The values of `key=` in an INI-like unit file, in order.
fn values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
        .collect()
}

fn value(text: &str, key: &str) -> String {
    let all = values(text, key);
    assert_eq!(all.len(), 1, "{key}= is set {} times", all.len());
    all.into_iter().next().unwrap()
}

// The unit.

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    // ExecStart must name an executable that exists: point it at the built
    // vfiod; Documentation= is checked against the man pages as installed
    // (MANPATH is the tree's man/ plus the generated pages).
    let tmp = TempDir::new();
    let unit = read("systemd/vfiod.service")
        .replace("=/usr/bin/vfiod", &format!("={}", bin("vfiod").display()));
    assert!(!unit.contains("/usr/bin/vfiod"));
    let unit_path = tmp.write("vfiod.service", &unit);

    let man = tmp.path("man");
    let dist = tmp.path("dist");
    let out = Command::new(bin("xtask"))
        .arg("dist")
        .arg(&dist)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for (section, pages) in [
        ("man8", vec![dist.join("man/vfiod.8")]),
        ("man1", vec![dist.join("man/vfioctl.1")]),
        ("man5", vec![repo().join("man/vfiod.toml.5")]),
    ] {
        std::fs::create_dir_all(man.join(section)).unwrap();
        for page in pages {
            std::fs::copy(&page, man.join(section).join(page.file_name().unwrap())).unwrap();
        }
    }

    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .env("MANPATH", &man)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("systemd-analyze (Debian: apt-get install systemd)");
    assert!(
        out.status.success() && stderr(&out).trim().is_empty(),
        "systemd-analyze verify: {}\n{}{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );

    // And it does complain about what it should: a unit with an error.
    let broken = tmp.write(
        "vfiod.service",
        &unit.replace("Type=dbus\n", "Type=dbus\nExecStartPre=relative/path\n"),
    );
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&broken)
        .env("MANPATH", &man)
        .output()
        .unwrap();
    assert!(!out.status.success() || !stderr(&out).trim().is_empty());
}

/// `→ Overall exposure level for vfiod.service: 1.8 OK 🙂`
fn exposure(unit: &Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .output()
        .expect("systemd-analyze");
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}{}", stderr(&out)));
    let number = line.rsplit_once(": ").unwrap().1;
    number
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[test]
fn the_unit_is_hardened_to_the_security_bound() {
    let level = exposure(&repo().join("systemd/vfiod.service"));
    eprintln!("systemd-analyze security: exposure {level}");
    assert!(
        level <= MAX_EXPOSURE,
        "exposure {level} is above {MAX_EXPOSURE}"
    );
    // The measure measures: without its sandbox the same unit is unsafe.
    let tmp = TempDir::new();
    let bare: String = read("systemd/vfiod.service")
        .split("# The file system:")
        .next()
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("CapabilityBoundingSet=") && !l.starts_with("NoNewPrivileges="))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(exposure(&tmp.write("vfiod.service", &bare)) > 8.0);
}

#[test]
fn the_unit_keeps_only_the_capabilities_the_readme_explains() {
    let unit = read("systemd/vfiod.service");
    let kept: BTreeSet<String> = value(&unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        kept,
        BTreeSet::from([
            "CAP_DAC_READ_SEARCH".to_owned(),
            "CAP_SYS_PTRACE".to_owned()
        ])
    );
    let readme = read("README.md");
    let security = readme
        .split("\n## Security")
        .nth(1)
        .expect("a Security section in the README");
    for cap in &kept {
        assert!(
            security.contains(cap.as_str()),
            "the README does not explain {cap}"
        );
    }
    assert!(security.contains("CAP_SYS_MODULE"));
}

#[test]
fn the_unit_the_activation_file_and_the_policy_agree() {
    let unit = read("systemd/vfiod.service");
    let activation = read("systemd/org.vfiod1.service");
    let policy = read("systemd/org.vfiod1.conf");
    assert_eq!(value(&unit, "Type"), "dbus");
    assert_eq!(value(&unit, "BusName"), vfiod_dbus::names::BUS_NAME);
    assert_eq!(value(&unit, "ExecStart"), "/usr/bin/vfiod");
    // A reload waits for vfiod's verdict (vfiod --reload) and fails with it;
    // vfiod's RELOADING=1 / READY=1 / STATUS= are heard from the main pid.
    assert_eq!(
        value(&unit, "ExecReload"),
        "/usr/bin/vfiod --reload $MAINPID"
    );
    assert_eq!(value(&unit, "NotifyAccess"), "main");
    let help = vfiod::cli::command().render_long_help().to_string();
    assert!(help.contains("--reload <PID>"), "{help}");
    assert_eq!(value(&unit, "Restart"), "on-failure");
    assert_eq!(value(&unit, "WantedBy"), "multi-user.target");
    // The daemon's default state dir as root is the unit's RuntimeDirectory,
    // which outlives a restart (the devices' host drivers are remembered).
    assert_eq!(value(&unit, "RuntimeDirectory"), "vfiod");
    assert!(help.contains("/run/vfiod as root"), "{help}");
    assert_eq!(value(&unit, "RuntimeDirectoryPreserve"), "yes");
    let before = value(&unit, "Before");
    assert!(
        before
            .split_whitespace()
            .any(|u| u == "display-manager.service")
    );
    // vfio-pci loaded; udev's coldplug queued (boot binds wait for it to
    // be processed: an empty queue before the trigger would mean nothing).
    let after = value(&unit, "After");
    for unit in [
        "systemd-modules-load.service",
        "systemd-udev-trigger.service",
    ] {
        assert!(after.split_whitespace().any(|u| u == unit), "{after}");
    }
    // It may write the PCI sysfs (devices are links into /sys/devices),
    // the platform bus (a handoff unbinds the firmware framebuffer) and
    // the early claim's files in /etc, nothing else.
    assert_eq!(
        values(&unit, "ReadWritePaths"),
        [
            "/sys/bus/pci /sys/bus/platform /sys/devices",
            "-/etc/udev/rules.d -/etc/mkinitcpio.conf.d -/etc/dracut.conf.d -/etc/initramfs-tools/hooks"
        ]
    );
    assert_eq!(value(&unit, "ProtectKernelModules"), "yes");
    assert_eq!(
        read("systemd/vfio-pci.conf").lines().last(),
        Some("vfio-pci")
    );

    assert!(activation.starts_with("#") && activation.contains("\n[D-BUS Service]\n"));
    assert_eq!(value(&activation, "Name"), vfiod_dbus::names::BUS_NAME);
    assert_eq!(value(&activation, "SystemdService"), "vfiod.service");
    assert_eq!(value(&activation, "User"), "root");
    assert!(policy.contains(&format!("<allow own=\"{}\"/>", vfiod_dbus::names::BUS_NAME)));
}

// The libvirt hook script.

/// The shipped script with its vfioctl replaced by `vfioctl`.
fn hook_script(dir: &TempDir, vfioctl: &Path) -> PathBuf {
    let text = read("systemd/vfiod-libvirt-hook");
    assert!(text.contains("exec /usr/bin/vfioctl libvirt-hook \"$@\""));
    let path = dir.write(
        "vfiod",
        &text.replace("/usr/bin/vfioctl", &vfioctl.display().to_string()),
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Runs the hook as libvirt does: `DOMAIN OPERATION SUBOPERATION -`, the
/// domain XML on stdin, in the given environment.
fn run_hook(script: &Path, args: [&str; 4], xml: &str, env: &[(&str, &str)]) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = Command::new(script)
        .args(args)
        .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // libvirt ignores EPIPE from a hook that does not read its stdin.
    let _ = child.stdin.take().unwrap().write_all(xml.as_bytes());
    let out = child.wait_with_output().unwrap();
    (out, start.elapsed())
}

/// The README's domain: the RX 580 pair and the USB card, managed='no'.
fn readme_domain() -> String {
    let readme = read("README.md");
    let xml = readme
        .split("```xml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("a domain XML in the README");
    assert!(xml.contains("<name>win10</name>"));
    xml.to_owned()
}

#[test]
fn the_hook_passes_ignored_operations_at_once_without_running_anything() {
    let tmp = TempDir::new();
    // A vfioctl that does not exist, no bus, no vfiod: what libvirt sends
    // for every other event must still pass, and fast.
    let script = hook_script(&tmp, Path::new("/nonexistent/vfioctl"));
    let xml = readme_domain();
    let mut slowest = Duration::ZERO;
    for (op, sub) in [
        ("start", "begin"),
        ("started", "begin"),
        ("stopped", "end"),
        ("prepare", "end"),
        ("release", "begin"),
        ("migrate", "begin"),
        ("restore", "begin"),
        ("reconnect", "begin"),
        ("attach", "begin"),
    ] {
        let (out, took) = run_hook(
            &script,
            ["win10", op, sub, "-"],
            &xml,
            &[("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")],
        );
        assert_exit(&out, 0);
        assert!(stdout(&out).is_empty() && stderr(&out).is_empty());
        slowest = slowest.max(took);
    }
    eprintln!("slowest ignored operation: {slowest:?}");
    assert!(slowest < Duration::from_millis(100), "{slowest:?}");

    // The operations it acts on do run vfioctl (here: fail to).
    let (out, _) = run_hook(&script, ["win10", "prepare", "begin", "-"], &xml, &[]);
    assert_ne!(out.status.code(), Some(0));
}

#[test]
fn the_hook_binds_the_readme_domain_at_prepare_and_releases_it_at_release() {
    let rig = Rig::z77();
    let tmp = TempDir::new();
    let script = hook_script(&tmp, &bin("vfioctl"));
    // No profiles: what moves is the domain's managed='no' hostdevs.
    let empty = tmp.write("vfiod.toml", "");
    let env = [
        ("DBUS_SYSTEM_BUS_ADDRESS", rig.address.as_str()),
        ("VFIOD_CONFIG", empty.to_str().unwrap()),
    ];
    let xml = readme_domain();

    let (out, _) = run_hook(&script, ["win10", "prepare", "begin", "-"], &xml, &env);
    assert_exit(&out, 0);
    for address in ["01:00.0", "01:00.1", "03:00.0"] {
        assert_eq!(rig.driver(address), "vfio-pci", "{address}");
        assert_eq!(rig.device_property(address, "Owner"), "win10");
    }
    // libvirt's later events in between touch nothing.
    for (op, sub) in [("start", "begin"), ("started", "begin"), ("stopped", "end")] {
        let (out, _) = run_hook(&script, ["win10", op, sub, "-"], &xml, &env);
        assert_exit(&out, 0);
    }
    assert_eq!(rig.driver("01:00.0"), "vfio-pci");

    let (out, _) = run_hook(&script, ["win10", "release", "end", "-"], &xml, &env);
    assert_exit(&out, 0);
    assert_eq!(rig.driver("01:00.0"), "amdgpu");
    assert_eq!(rig.driver("01:00.1"), "snd_hda_intel");
    assert_eq!(rig.driver("03:00.0"), "xhci_hcd");
}

#[test]
fn the_hook_fails_the_start_when_vfiod_cannot_bind() {
    let mut rig = Rig::z77();
    rig.kill_vfiod();
    let tmp = TempDir::new();
    let script = hook_script(&tmp, &bin("vfioctl"));
    let empty = tmp.write("vfiod.toml", "");
    let (out, _) = run_hook(
        &script,
        ["win10", "prepare", "begin", "-"],
        &readme_domain(),
        &[
            ("DBUS_SYSTEM_BUS_ADDRESS", rig.address.as_str()),
            ("VFIOD_CONFIG", empty.to_str().unwrap()),
        ],
    );
    // vfioctl's exit status comes through the script (3: unreachable).
    assert_exit(&out, 3);
    assert!(!stderr(&out).is_empty());
}

// The example polkit rule.

#[test]
fn the_vfio_group_rule_lets_the_group_in_and_no_one_else() {
    if !root_for("polkitd on a private bus") {
        return;
    }
    // `nobody`'s own group stands for `vfio`, which this machine lacks.
    let rule = read("systemd/50-vfiod-vfio-group.rules.example");
    assert!(rule.contains("subject.isInGroup(\"vfio\")"));
    let rule = rule.replace("isInGroup(\"vfio\")", "isInGroup(\"nogroup\")");
    let rig = Rig::z77();
    let _polkit = vfiod_tests::Polkit::start(&rig, &rule);
    let vfioctl = bin("vfioctl");
    let vfioctl = vfioctl.to_str().unwrap();
    let out = rig.as_nobody(vfioctl, &["bind", "usb3"]);
    assert_exit(&out, 0);
    assert_eq!(rig.driver("03:00.0"), "vfio-pci");
    // Not in the group: the action's default (an admin's password, which
    // no agent gives here) applies.
    let out = rig.as_user("daemon", "daemon", vfioctl, &["release", "usb3"]);
    assert_exit(&out, 4);
    assert_eq!(rig.driver("03:00.0"), "vfio-pci");
    assert_exit(&rig.as_nobody(vfioctl, &["release", "usb3"]), 0);
    assert_eq!(rig.driver("03:00.0"), "xhci_hcd");
}

// The journal: vfiod's errors are stored as errors, with their fields.

/// The fields of one datagram of journald's native protocol: `NAME=value`
/// lines, or `NAME`, a little-endian u64 length and that many bytes.
fn journal_fields(mut datagram: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while let Some(end) = datagram.iter().position(|&b| b == b'\n') {
        let line = &datagram[..end];
        let (name, value, rest) = match line.iter().position(|&b| b == b'=') {
            Some(eq) => (&line[..eq], &line[eq + 1..], &datagram[end + 1..]),
            None => {
                let len = u64::from_le_bytes(datagram[end + 1..end + 9].try_into().unwrap());
                let start = end + 9;
                let stop = start + usize::try_from(len).unwrap();
                assert_eq!(datagram[stop], b'\n', "a field ends with a newline");
                (line, &datagram[start..stop], &datagram[stop + 1..])
            }
        };
        fields.push((
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
        datagram = rest;
    }
    assert!(datagram.is_empty(), "a datagram ends with a field");
    fields
}

/// vfiod on the Z77 whose audio unbind hangs (vfiod gives up after 200 ms),
/// in a mount namespace where journald's socket is one listened on here;
/// `stream` is the JOURNAL_STREAM it is given, `stderr` its stderr. Returns
/// the datagrams sent to that socket, read as they come (as journald does:
/// a sender blocks while the socket's queue is full).
fn vfiod_beside_a_journal(
    stream: &nix::sys::stat::FileStat,
    stderr: Stdio,
) -> (Rig, std::sync::mpsc::Receiver<Vec<(String, String)>>) {
    let (machine, config) = Rig::z77_hung_audio_files(200);
    let mut rig = Rig::bus_only_text(&machine, &config);
    let journal_dir = rig.dir.path("journal");
    std::fs::create_dir(&journal_dir).unwrap();
    let journal = std::os::unix::net::UnixDatagram::bind(journal_dir.join("socket")).unwrap();
    let (tx, datagrams) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0; 1 << 16];
        while let Ok(len) = journal.recv(&mut buf) {
            // vfiod checks the socket with an empty datagram.
            if len > 0 && tx.send(journal_fields(&buf[..len])).is_err() {
                break;
            }
        }
    });
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && \
             mount --bind \"$0\" /run/systemd/journal && exec \"$@\"",
        )
        .arg(&journal_dir)
        .arg(bin("vfiod"))
        .args(rig.vfiod_args())
        .env(
            "JOURNAL_STREAM",
            format!("{}:{}", stream.st_dev, stream.st_ino),
        )
        .stderr(stderr);
    rig.start_vfiod_as(command);
    (rig, datagrams)
}

/// Binds rx580, which fails when the audio function's unbind times out.
fn bind_into_the_hang(rig: &Rig) {
    let out = rig.vfioctl(&["bind", "rx580"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("Timeout"), "{}", stderr(&out));
}

const THE_ERROR: &str = "kernel call did not return";

#[test]
fn on_the_journal_stream_an_error_is_a_journal_error_with_its_device_step_and_target() {
    if !root_for("a private mount namespace with a stand-in for journald's socket") {
        return;
    }
    // stderr is a stream socket, as systemd connects it to the journal.
    let (stderr_end, mut our_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let stream = nix::sys::stat::fstat(&stderr_end).unwrap();
    let (rig, journal) =
        vfiod_beside_a_journal(&stream, Stdio::from(std::os::fd::OwnedFd::from(stderr_end)));
    bind_into_the_hang(&rig);
    let deadline = Instant::now() + Duration::from_secs(10);
    let error = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let fields = journal
            .recv_timeout(left)
            .expect("vfiod's error within 10 s");
        let message = fields.iter().find(|(n, _)| n == "MESSAGE");
        if message.is_some_and(|(_, m)| m.contains(THE_ERROR)) {
            break fields;
        }
    };
    let field = |name: &str| {
        error
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} in {error:?}"))
    };
    assert_eq!(field("PRIORITY"), "3", "{error:?}");
    assert_eq!(field("SYSLOG_IDENTIFIER"), "vfiod");
    assert_eq!(field("VFIOD_DEVICE"), "0000:01:00.1", "{error:?}");
    assert!(field("VFIOD_STEP").starts_with("unbind"), "{error:?}");
    assert_eq!(field("VFIOD_TARGET"), "rx580", "{error:?}");
    assert_eq!(field("VFIOD_DIRECTION"), "bind", "{error:?}");
    assert_eq!(field("VFIOD_TIMEOUT_MS"), "200", "{error:?}");
    assert!(field("TARGET").starts_with("vfiod::"), "{error:?}");
    assert!(field("CODE_FILE").ends_with(".rs"), "{error:?}");
    assert!(field("CODE_LINE").parse::<u32>().is_ok(), "{error:?}");
    assert_eq!(field("SPAN_NAME"), "move", "{error:?}");
    // `journalctl -u vfiod` shows MESSAGE alone: it names the device, the
    // step and the move as the text log does, the event's fields first.
    let step = field("VFIOD_STEP");
    assert_eq!(
        field("MESSAGE"),
        format!(
            "{THE_ERROR}; device marked stuck device=0000:01:00.1 step=\"{step}\" \
             timeout_ms=200 target=rx580 direction=bind"
        ),
        "{error:?}"
    );
    // Nothing went to stderr as text.
    our_end.set_nonblocking(true).unwrap();
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut our_end, &mut text);
    assert_eq!(text, "");
}

#[test]
fn with_another_stream_than_stderr_in_journal_stream_the_log_is_text_on_stderr() {
    if !root_for("a private mount namespace with a stand-in for journald's socket") {
        return;
    }
    // JOURNAL_STREAM inherited from a parent whose stderr was the journal:
    // names a socket that is not vfiod's stderr (a file here).
    let (elsewhere, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let stream = nix::sys::stat::fstat(&elsewhere).unwrap();
    let log = TempDir::new();
    let log_path = log.path("vfiod.log");
    let (rig, journal) = vfiod_beside_a_journal(
        &stream,
        Stdio::from(std::fs::File::create(&log_path).unwrap()),
    );
    bind_into_the_hang(&rig);
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&log_path).unwrap();
        if text.contains(THE_ERROR) || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let line = text
        .lines()
        .find(|l| l.contains(THE_ERROR))
        .unwrap_or_else(|| panic!("no error line in {text}"));
    assert!(line.contains("ERROR"), "{line}");
    // As the journal's MESSAGE shows it: one-word values bare.
    assert!(
        line.contains(&format!(
            "move{{target=rx580 direction=bind}}: {THE_ERROR}; device marked stuck \
             device=0000:01:00.1 step=\"unbind "
        )),
        "{line}"
    );
    // And nothing was sent to the journal's socket.
    let sent = journal.try_recv();
    assert!(sent.is_err(), "{sent:?}");
}
