//! Reloads: SIGHUP by hand, and `vfiod --reload PID` (the unit's
//! ExecReload), whose exit status is the running vfiod's verdict.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use vfiod_tests::{Rig, TempDir, assert_exit, bin, machine, stderr, stdout, value_of, wait_until};

/// The Manager's `Profiles`, as busctl prints them.
fn profiles(rig: &Rig) -> String {
    stdout(&rig.busctl(&[
        "get-property",
        "org.vfiod1",
        "/org/vfiod1",
        "org.vfiod1.Manager",
        "Profiles",
    ]))
}

/// A config file of its own, beginning as the Z77's.
fn z77_config(dir: &TempDir) -> std::path::PathBuf {
    dir.write(
        "vfiod.toml",
        &std::fs::read_to_string(machine("z77-rx580.vfiod.toml")).unwrap(),
    )
}

const NEW_PROFILE: &str =
    "[profiles.gpu-2]\ndevices = [\"01:00.0\", \"01:00.1\"]\nvms = [\"win11\"]\n";
/// Refused at line 3 for `colour`.
const BAD_CONFIG: &str = "[profiles.usb3]\nids = [\"1033:0194\"]\ncolour = \"red\"\n";

#[test]
fn sighup_reloads_the_config_and_a_bad_one_is_refused() {
    let dir = TempDir::new();
    let config = z77_config(&dir);
    let rig = Rig::start(&machine("z77-rx580.toml"), &config);
    let wait_for = |rig: &Rig, what: &str, want: &dyn Fn(&str) -> bool| {
        let mut now = String::new();
        wait_until(what, Duration::from_secs(10), || {
            now = profiles(rig);
            want(&now)
        });
        now
    };
    assert!(profiles(&rig).contains("rx580"));

    // A new profile appears, a removed one disappears.
    std::fs::write(&config, NEW_PROFILE).unwrap();
    rig.hangup();
    let now = wait_for(&rig, "profile gpu-2 on the bus", &|p| p.contains("gpu_2d2"));
    assert!(!now.contains("rx580"), "{now}");
    let out = rig.busctl(&[
        "get-property",
        "org.vfiod1",
        "/org/vfiod1/profile/gpu_2d2",
        "org.vfiod1.Profile",
        "Name",
    ]);
    assert_eq!(value_of(&out), "gpu-2");
    assert!(
        !rig.busctl(&["introspect", "org.vfiod1", "/org/vfiod1/profile/rx580"])
            .status
            .success()
    );
    assert_exit(&rig.vfioctl(&["bind", "gpu-2"]), 0);

    // A bad file is refused with its line; the old config stays.
    std::fs::write(&config, BAD_CONFIG).unwrap();
    rig.hangup();
    wait_until(
        "vfiod logging the refused configuration",
        Duration::from_secs(10),
        || rig.log().contains("new configuration refused"),
    );
    let log = rig.log();
    assert!(
        log.contains("new configuration refused")
            && log.contains("line 3")
            && log.contains("colour"),
        "{log}"
    );
    assert!(profiles(&rig).contains("gpu_2d2"));
    assert_exit(&rig.vfioctl(&["release", "gpu-2"]), 0);
}

/// `vfiod --reload PID --state-dir DIR`, as ExecReload= runs it.
fn reload_helper(pid: u32, state_dir: &Path) -> Output {
    Command::new(bin("vfiod"))
        .arg("--reload")
        .arg(pid.to_string())
        .arg("--state-dir")
        .arg(state_dir)
        .output()
        .expect("vfiod --reload runs")
}

/// The next datagram sent to systemd's stand-in, as text.
fn next_notification(socket: &UnixDatagram) -> String {
    let mut buf = [0; 4096];
    let len = socket.recv(&mut buf).expect("a notification within 10 s");
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

#[test]
fn the_reload_helper_exits_with_the_running_vfiods_verdict_and_systemd_hears_of_it() {
    let dir = TempDir::new();
    let config = z77_config(&dir);
    let mut rig = Rig::bus_only(&machine("z77-rx580.toml"), &config);
    // systemd's notify socket, stood in for.
    let socket_path = rig.dir.path("notify");
    let systemd = UnixDatagram::bind(&socket_path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut command = Command::new(bin("vfiod"));
    command
        .args(rig.vfiod_args())
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(std::fs::File::create(rig.dir.path("vfiod.log")).unwrap());
    rig.start_vfiod_as(command);
    let pid = rig.vfiod_pid().unwrap();
    let state_dir = rig.dir.path("state");
    assert!(profiles(&rig).contains("rx580"));

    // A good config: in force on the bus by the time the helper exits 0.
    std::fs::write(&config, NEW_PROFILE).unwrap();
    let before = vfiod::reload::monotonic_usec();
    let out = reload_helper(pid, &state_dir);
    assert_exit(&out, 0);
    assert_eq!(stdout(&out), "");
    assert_eq!(stderr(&out), "");
    let now = profiles(&rig);
    assert!(now.contains("gpu_2d2") && !now.contains("rx580"), "{now}");
    let reloading = next_notification(&systemd);
    let began: u64 = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|rest| rest.split('\n').next())
        .unwrap_or_else(|| panic!("{reloading:?}"))
        .parse()
        .unwrap();
    assert!(began >= before && began <= vfiod::reload::monotonic_usec());
    assert_eq!(
        next_notification(&systemd),
        "READY=1\nSTATUS=configuration reloaded"
    );

    // A bad one: the helper fails with the file, the line and the reason;
    // vfiod keeps the profiles it had.
    std::fs::write(&config, BAD_CONFIG).unwrap();
    let out = reload_helper(pid, &state_dir);
    assert_exit(&out, 1);
    let why = stderr(&out);
    for part in [
        config.to_str().unwrap(),
        "line 3",
        "colour",
        "keeps the old one",
    ] {
        assert!(why.contains(part), "{part:?} is not in {why}");
    }
    assert!(profiles(&rig).contains("gpu_2d2"));
    assert!(next_notification(&systemd).starts_with("RELOADING=1\nMONOTONIC_USEC="));
    let ready = next_notification(&systemd);
    assert!(
        ready.starts_with("READY=1\nSTATUS=new configuration refused")
            && ready.contains("line 3")
            && !ready["READY=1\n".len()..].contains('\n'),
        "{ready:?}"
    );
    assert!(rig.vfiod_alive());

    // The bad file fixed: the next reload is in force again.
    std::fs::write(&config, NEW_PROFILE.replace("gpu-2", "gpu-3")).unwrap();
    assert_exit(&reload_helper(pid, &state_dir), 0);
    assert!(profiles(&rig).contains("gpu_2d3"));

    // No vfiod to answer: the helper fails at once, saying so.
    rig.kill_vfiod();
    let out = reload_helper(pid, &state_dir);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(&format!("pid {pid}")),
        "{}",
        stderr(&out)
    );
}
