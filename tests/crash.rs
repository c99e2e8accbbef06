//! Crash safety: vfiod is killed (SIGKILL) right after each kernel write of
//! a GPU + audio bind and of its release, then started again. Every device
//! must end on vfio-pci or on its host driver, never driverless, and what
//! vfiod shows on the bus must match the (simulated) sysfs.

use std::time::{Duration, Instant};

use vfiod_tests::{Rig, assert_exit, stdout, wait_until};

const PAIR: [(&str, &str); 2] = [
    ("0000:01:00.0", "amdgpu"),
    ("0000:01:00.1", "snd_hda_intel"),
];

/// The simulated sysfs as its state file has it: driver and override.
fn sysfs(rig: &Rig, address: &str) -> (Option<String>, Option<String>) {
    let text = std::fs::read_to_string(rig.dir.path("state/sim-state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dev = &state["devices"][address];
    (
        dev["driver"].as_str().map(str::to_string),
        dev["driver_override"].as_str().map(str::to_string),
    )
}

/// Waits for vfiod to end at its crash point.
fn wait_dead(rig: &mut Rig) {
    wait_until(
        "vfiod ending at its crash point",
        Duration::from_secs(10),
        || !rig.vfiod_alive(),
    );
}

fn check_settled(rig: &Rig, point: &str) {
    for (address, host) in PAIR {
        let (driver, overridden) = sysfs(rig, address);
        let driver = driver.unwrap_or_else(|| panic!("{point}: {address} LEFT WITHOUT A DRIVER"));
        assert!(
            driver == host || driver == "vfio-pci",
            "{point}: {address} on {driver}"
        );
        assert_eq!(
            overridden, None,
            "{point}: {address} kept a driver_override"
        );
        assert_eq!(
            rig.driver(address),
            driver,
            "{point}: the bus disagrees with sysfs on {address}"
        );
        let state = if driver == "vfio-pci" { "vfio" } else { "host" };
        assert_eq!(
            rig.device_property(address, "State"),
            state,
            "{point}: {address}"
        );
    }
}

/// Kills vfiod after each write of `direction` in turn; returns how many
/// crash points there were.
fn crash_at_every_step(direction: &str) -> u32 {
    crash_at_every_step_on(None, direction)
}

/// [`crash_at_every_step`] on the Z77 machine, or on `machine` (its text).
fn crash_at_every_step_on(machine: Option<&str>, direction: &str) -> u32 {
    let mut points = 0;
    for writes in 1.. {
        let mut rig = match machine {
            Some(text) => Rig::with_text(
                text,
                &std::fs::read_to_string(vfiod_tests::machine("z77-rx580.vfiod.toml")).unwrap(),
            ),
            None => Rig::z77(),
        };
        if direction == "release" {
            assert_exit(&rig.vfioctl(&["bind", "rx580", "--vm", "win10"]), 0);
        }
        rig.simulate("CrashAfterWrites", "u", &[&writes.to_string()]);
        let out = rig.vfioctl(&[direction, "rx580"]);
        if out.status.success() {
            // The move needed fewer writes than this: every point is
            // covered. vfiod, which answered, still answers.
            let ping = [
                "call",
                "org.vfiod1",
                "/org/vfiod1",
                "org.freedesktop.DBus.Peer",
                "Ping",
            ];
            assert_exit(&rig.busctl(&ping), 0);
            assert!(
                rig.vfiod_alive(),
                "the client saw success from a dead daemon"
            );
            break;
        }
        // A move that failed here failed because vfiod ended.
        wait_dead(&mut rig);
        points += 1;
        let point = format!("{direction}, killed after write {writes}");
        rig.start_vfiod();
        check_settled(&rig, &point);
        assert!(
            rig.log()
                .contains("settling a move that vfiod did not finish"),
            "{point}: {}",
            rig.log()
        );
        // And the machine is usable again.
        assert_exit(&rig.vfioctl(&["bind", "rx580"]), 0);
        assert_exit(&rig.vfioctl(&["release", "rx580"]), 0);
        check_settled(&rig, &format!("{point}, then bound and released"));
        eprintln!(
            "{point}: recovered ({})",
            stdout(&rig.vfioctl(&["status", "rx580"]))
                .lines()
                .next()
                .unwrap_or("")
        );
    }
    points
}

#[test]
fn every_step_of_a_bind_and_a_release_survives_a_kill() {
    let bind_points = crash_at_every_step("bind");
    let release_points = crash_at_every_step("release");
    println!(
        "crash points covered: {} ({bind_points} in bind, {release_points} in release)",
        bind_points + release_points
    );
    // override (set, or cleared) + unbind + probe per device, both ways.
    assert_eq!(bind_points, 6);
    assert_eq!(release_points, 6);
}

/// The health check's own steps (DESIGN §10): a GPU its VM left dead until
/// a remove and rescan, killed after each write of its release, a failed
/// reset and the rescan included.
#[test]
fn every_step_of_reviving_a_dead_gpu_survives_a_kill() {
    let text = std::fs::read_to_string(vfiod_tests::machine("z77-rx580.toml"))
        .unwrap()
        .replacen(
            "address = \"0000:01:00.0\"\n",
            "address = \"0000:01:00.0\"\nfault = { dead = \"until-rescan\" }\n",
            1,
        );
    let points = crash_at_every_step_on(Some(&text), "release");
    println!("crash points covered while reviving: {points}");
    // The GPU: reset, remove, rescan (the kernel gives it amdgpu as it
    // finds it); the audio's three.
    assert_eq!(points, 6);
}

#[test]
fn journal_entries_of_an_earlier_boot_are_not_replayed() {
    let mut rig = Rig::z77();
    rig.simulate("CrashAfterWrites", "u", &["2"]);
    let _ = rig.vfioctl(&["bind", "rx580"]);
    wait_dead(&mut rig);
    // A reboot: the simulated kernel starts fresh (a new boot id), as a
    // real machine's devices are back at their boot drivers.
    std::fs::remove_file(rig.dir.path("state/sim-state.json")).unwrap();
    rig.start_vfiod();
    assert!(rig.log().contains("earlier boot"), "{}", rig.log());
    assert!(!rig.log().contains("settling a move"), "{}", rig.log());
    assert_eq!(rig.driver("01:00.0"), "amdgpu");
}

// The state dir: what vfiod does after a restart is decided by what is in
// it, so only vfiod's own user may have written it.

/// Starts vfiod on the Z77 with `state_dir` and waits for it to exit
/// (refusing) or to take its name (accepting).
fn start_with_state_dir(rig: &Rig, state_dir: &std::path::Path) -> Result<String, String> {
    let mut vfiod = std::process::Command::new(vfiod_tests::bin("vfiod"))
        .arg("--machine")
        .arg(&rig.machine)
        .arg("--config")
        .arg(&rig.config)
        .arg("--state-dir")
        .arg(state_dir)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &rig.address)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = vfiod.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut vfiod.stderr.take().unwrap(), &mut err).unwrap();
            assert!(!status.success(), "{err}");
            return Err(err);
        }
        if rig.busctl(&["status", "org.vfiod1"]).status.success() {
            let _ = vfiod.kill();
            let _ = vfiod.wait();
            return Ok("took org.vfiod1".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = vfiod.kill();
    let _ = vfiod.wait();
    panic!("vfiod neither refused nor took its name within 10 s");
}

#[test]
fn a_state_dir_through_a_link_or_of_another_user_is_refused_at_start() {
    let rig = Rig::bus_only(
        &vfiod_tests::machine("z77-rx580.toml"),
        &vfiod_tests::machine("z77-rx580.vfiod.toml"),
    );
    let real = rig.dir.path("real");
    std::fs::create_dir(&real).unwrap();
    let link = rig.dir.path("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let refused = start_with_state_dir(&rig, &link).expect_err("a link as the state dir");
    assert!(
        refused.contains(&format!("state dir {} is a symbolic link", link.display())),
        "{refused}"
    );
    assert_eq!(
        std::fs::read_dir(&real).unwrap().count(),
        0,
        "nothing written"
    );

    // Another user's directory: as root one given to nobody, else root's /.
    let theirs = if vfiod_tests::is_root() {
        let dir = rig.dir.path("theirs");
        std::fs::create_dir(&dir).unwrap();
        nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        dir
    } else {
        std::path::PathBuf::from("/")
    };
    let refused = start_with_state_dir(&rig, &theirs).expect_err("another user's state dir");
    assert!(
        refused.contains(&format!("state dir {} belongs to", theirs.display())),
        "{refused}"
    );
}

#[test]
fn a_damaged_ledger_is_set_aside_loudly_and_vfiod_starts() {
    let mut rig = Rig::bus_only(
        &vfiod_tests::machine("z77-rx580.toml"),
        &vfiod_tests::machine("z77-rx580.vfiod.toml"),
    );
    let state = rig.dir.path("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("ledger.json"), "{\"host_drivers\": {\"0000:01:0").unwrap();
    rig.start_vfiod();
    assert_eq!(
        std::fs::read_to_string(state.join("ledger.json.corrupt")).unwrap(),
        "{\"host_drivers\": {\"0000:01:0"
    );
    let log = rig.log();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("unreadable ledger")),
        "{log}"
    );
    // And it works: a bind and a release.
    assert_exit(&rig.vfioctl(&["bind", "rx580"]), 0);
    assert_exit(&rig.vfioctl(&["release", "rx580"]), 0);
    assert_eq!(rig.driver("01:00.0"), "amdgpu");
}

#[test]
fn a_kill_during_a_hung_unbind_is_settled_after_restart_once_the_hang_ends() {
    let mut rig = Rig::z77_hung_audio(300);
    let out = rig.vfioctl(&["bind", "rx580"]);
    assert_exit(&out, 1);
    // The unbind has not returned: its move is still in the journal.
    rig.kill_vfiod();
    rig.start_vfiod();
    // Recovery could not settle the audio (its device lock is held).
    assert_eq!(rig.device_property("01:00.1", "State"), "stuck");
    assert!(
        rig.log()
            .contains("settling a move that vfiod did not finish")
    );

    rig.simulate("EndHang", "s", &["0000:01:00.1"]);
    wait_until(
        "the audio settled after the hang ended",
        Duration::from_secs(5),
        || rig.device_property("01:00.1", "State") != "stuck",
    );
    check_settled(&rig, "after the hang ended");
}
