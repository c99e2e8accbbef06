//! Test harness: a private system bus per test (from `tests/private-bus`,
//! which includes the shipped policy), the real `vfiod --machine` and
//! `vfioctl` binaries, and `busctl` / `gdbus` as outside clients.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod signals;
pub use signals::{Signals, round_trip_to_vfiod, wait_until};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn machine(name: &str) -> PathBuf {
    repo().join("machines").join(name)
}

/// The Z77's shipped config with rx580 bound as vfiod starts (`boot = "vfio"`).
pub fn z77_config_rx580_at_boot() -> String {
    let config = std::fs::read_to_string(machine("z77-rx580.vfiod.toml"))
        .expect("z77 config")
        .replace(
            "vms = [\"win10\"]\n\n# The USB",
            "vms = [\"win10\"]\nboot = \"vfio\"\n\n# The USB",
        );
    assert!(config.contains("boot = \"vfio\""), "{config}");
    config
}

/// A binary of the workspace (`vfiod`, `vfioctl`, `xtask`), built on first
/// use in this test process: `cargo build -p vfiod -p vfioctl -p xtask` in
/// the profile and target directory of the running test executable, so
/// `cargo test` needs no build before it (and costs a no-op cargo call when
/// they are built already). Threads of one test binary share one build
/// (`OnceLock`); concurrent test binaries wait for each other on cargo's own
/// lock of the build directory. The path is the one cargo reports.
pub fn bin(name: &str) -> PathBuf {
    static BINS: OnceLock<Result<BTreeMap<String, PathBuf>, String>> = OnceLock::new();
    match BINS.get_or_init(build_bins) {
        Ok(bins) => bins.get(name).cloned().unwrap_or_else(|| {
            panic!(
                "{name} is not a binary cargo built for the tests ({})",
                bins.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        }),
        Err(why) => panic!("{why}"),
    }
}

/// `cargo build` of the binary packages the tests run, in the profile and
/// target directory the test executable (target/<profile>/deps/<test>)
/// comes from: the tests' own build, and CARGO_TARGET_DIR or --target-dir
/// as the test run was given them. CARGO is the cargo that runs the tests.
fn build_bins() -> Result<BTreeMap<String, PathBuf>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("test executable path: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} is not in target/<profile>/deps", exe.display()))?;
    let target_dir = profile_dir.parent().ok_or("no target directory")?;
    // cargo's "dev" profile builds into target/debug; the others into their name.
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_owned(),
        Some(name) => name.to_owned(),
        None => return Err(format!("no profile in {}", exe.display())),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .current_dir(repo())
        .arg("build")
        .arg("--manifest-path")
        .arg(repo().join("Cargo.toml"))
        .args(["-p", "vfiod", "-p", "vfioctl", "-p", "xtask", "--bins"])
        .args(["--profile", &profile])
        .arg("--target-dir")
        .arg(target_dir)
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null());
    let shown = format!("{command:?}");
    let out = command
        .output()
        .map_err(|e| format!("{shown}: cannot run {}: {e}", cargo.to_string_lossy()))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut bins = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        if let (Some(name), Some(path)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            bins.insert(name.to_owned(), PathBuf::from(path));
        }
    }
    for name in ["vfiod", "vfioctl", "xtask"] {
        if !bins.contains_key(name) {
            return Err(format!("{shown} reported no executable {name}"));
        }
    }
    Ok(bins)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The opt-out that lets the tests run as a normal user: what needs root is
/// then left out, and says so. Without it, a test that needs root fails
/// when not root, so a run that leaves something out never passes silently.
pub const UNPRIVILEGED_OPT_OUT: &str = "VFIOD_TESTS_UNPRIVILEGED";

/// Whether to run `what`, which needs root: yes as root; no, with a line
/// on stderr, when the caller said `VFIOD_TESTS_UNPRIVILEGED=1`; otherwise
/// the test fails here.
pub fn root_for(what: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var_os(UNPRIVILEGED_OPT_OUT).is_some_and(|v| v == "1") {
        eprintln!("NOT RUN ({UNPRIVILEGED_OPT_OUT}=1): {what} needs root");
        return false;
    }
    panic!(
        "{what} needs root: run the tests as root (CI does), or set \
         {UNPRIVILEGED_OPT_OUT}=1 to leave out what needs root"
    );
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let template = std::env::temp_dir().join("vfiod-bus-XXXXXX");
        let dir = nix::unistd::mkdtemp(&template).expect("mkdtemp");
        // Other users (a test's unprivileged client) must reach the socket.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn user_name() -> String {
    let uid = nix::unistd::getuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

/// A private bus with vfiod on a simulated machine.
pub struct Rig {
    pub dir: TempDir,
    pub address: String,
    bus: Child,
    vfiod: Option<Child>,
    pub machine: PathBuf,
    pub config: PathBuf,
}

impl Rig {
    /// A bus and vfiod on `machine` with `config`.
    pub fn start(machine: &Path, config: &Path) -> Rig {
        let mut rig = Rig::bus_only(machine, config);
        rig.start_vfiod();
        rig
    }

    pub fn z77() -> Rig {
        Rig::start(&machine("z77-rx580.toml"), &machine("z77-rx580.vfiod.toml"))
    }

    /// The Z77 machine whose RX 580 audio function hangs in an unbind
    /// (until Simulator.EndHang), with vfiod giving up on a write after `unbind_timeout_ms`.
    pub fn z77_hung_audio(unbind_timeout_ms: u32) -> Rig {
        let (machine_text, config) = Rig::z77_hung_audio_files(unbind_timeout_ms);
        Rig::with_text(&machine_text, &config)
    }

    /// The machine file and the config of [`Rig::z77_hung_audio`].
    pub fn z77_hung_audio_files(unbind_timeout_ms: u32) -> (String, String) {
        let machine_text = std::fs::read_to_string(machine("z77-rx580.toml"))
            .expect("z77 machine")
            .replace(
                "address = \"0000:01:00.1\"\n",
                "address = \"0000:01:00.1\"\nfault = { unbind = \"hang\" }\n",
            );
        let config = std::fs::read_to_string(machine("z77-rx580.vfiod.toml"))
            .expect("z77 config")
            .replace(
                "unbind_timeout_ms = 10000",
                &format!("unbind_timeout_ms = {unbind_timeout_ms}"),
            );
        (machine_text, config)
    }

    /// A machine given as text, with a config given as text.
    pub fn with_text(machine_text: &str, config_text: &str) -> Rig {
        let mut rig = Rig::bus_only_text(machine_text, config_text);
        rig.start_vfiod();
        rig
    }

    /// [`Rig::with_text`] without vfiod.
    pub fn bus_only_text(machine_text: &str, config_text: &str) -> Rig {
        let dir = TempDir::new();
        let machine = dir.write("machine.toml", machine_text);
        let config = dir.write("vfiod.toml", config_text);
        Rig::bus_in(dir, machine, config)
    }

    pub fn bus_only(machine: &Path, config: &Path) -> Rig {
        Rig::bus_in(TempDir::new(), machine.to_path_buf(), config.to_path_buf())
    }

    fn bus_in(dir: TempDir, machine: PathBuf, config: PathBuf) -> Rig {
        let socket = dir.path("bus");
        let conf = Command::new(repo().join("tests/private-bus"))
            .arg(&socket)
            .arg(user_name())
            .output()
            .expect("tests/private-bus runs");
        assert!(
            conf.status.success(),
            "{}",
            String::from_utf8_lossy(&conf.stderr)
        );
        let conf_path = dir.path("bus.conf");
        std::fs::write(&conf_path, conf.stdout).unwrap();
        let mut bus = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf_path.display()))
            .args(["--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon (Debian: apt-get install dbus)");
        let mut line = String::new();
        BufReader::new(bus.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("dbus-daemon prints its address");
        let address = line.trim().to_string();
        assert!(address.starts_with("unix:"), "bus address {address:?}");
        Rig {
            dir,
            address,
            bus,
            vfiod: None,
            machine,
            config,
        }
    }

    /// vfiod's command line on this rig's machine, config, state dir and bus.
    pub fn vfiod_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--machine".into(),
            self.machine.clone().into(),
            "--config".into(),
            self.config.clone().into(),
            "--state-dir".into(),
            self.dir.path("state").into(),
        ]
    }

    pub fn start_vfiod(&mut self) {
        let log = std::fs::File::create(self.dir.path("vfiod.log")).unwrap();
        let mut command = Command::new(bin("vfiod"));
        command
            .args(self.vfiod_args())
            .env("VFIOD_LOG", "debug")
            .stderr(log);
        self.start_vfiod_as(command);
    }

    /// Starts `command` (a vfiod, perhaps wrapped) on this rig's bus and
    /// waits until it has taken its name.
    pub fn start_vfiod_as(&mut self, mut command: Command) {
        let child = command
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .spawn()
            .expect("vfiod starts");
        self.vfiod = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.busctl(&["status", "org.vfiod1"]).status.success() {
                return;
            }
            if let Some(status) = self.vfiod.as_mut().unwrap().try_wait().unwrap() {
                panic!("vfiod exited with {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("vfiod did not take org.vfiod1 within 10 s: {}", self.log());
    }

    /// Kills vfiod (SIGKILL) and waits for it.
    pub fn kill_vfiod(&mut self) {
        if let Some(mut child) = self.vfiod.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn vfiod_alive(&mut self) -> bool {
        matches!(self.vfiod.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn vfiod_pid(&self) -> Option<u32> {
        self.vfiod.as_ref().map(Child::id)
    }

    /// SIGHUP to vfiod, as `kill -HUP` would: a reload.
    pub fn hangup(&self) {
        let pid = self.vfiod_pid().expect("vfiod runs");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("SIGHUP to vfiod");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path("vfiod.log")).unwrap_or_default()
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("DBUS_SYSTEM_BUS_ADDRESS", &self.address);
        c
    }

    /// Runs `future` on a one-thread runtime, as the client does.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(future)
    }

    /// A connection of its own to the rig's bus.
    pub async fn connect(&self) -> zbus::Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .build()
            .await
            .expect("the rig's bus answers")
    }

    pub fn run(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .expect("command runs")
    }

    pub fn vfioctl(&self, args: &[&str]) -> Output {
        self.run(bin("vfioctl"), args)
    }

    pub fn vfioctl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .command(bin("vfioctl"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A hook that exits at once may close stdin first: that is fine.
        let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        child.wait_with_output().unwrap()
    }

    pub fn busctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["--system"];
        all.extend_from_slice(args);
        self.run("busctl", &all)
    }

    pub fn gdbus(&self, args: &[&str]) -> Output {
        let mut all = vec!["call", "--system", "--dest", "org.vfiod1"];
        all.extend_from_slice(args);
        self.run("gdbus", &all)
    }

    /// A command run as the unprivileged user `nobody` (the test runs as root).
    pub fn as_nobody(&self, program: &str, args: &[&str]) -> Output {
        self.as_user("nobody", "nogroup", program, args)
    }

    /// `busctl call` of a Manager method taking (target, no options), as
    /// `nobody`.
    pub fn manager_call_as_nobody(&self, method: &str, target: &str) -> Output {
        self.as_nobody(
            "busctl",
            &[
                "--system",
                "call",
                "org.vfiod1",
                "/org/vfiod1",
                "org.vfiod1.Manager",
                method,
                "sa{sv}",
                target,
                "0",
            ],
        )
    }

    /// A command run as another user, with only that user's group.
    pub fn as_user(&self, user: &str, group: &str, program: &str, args: &[&str]) -> Output {
        let reuid = format!("--reuid={user}");
        let regid = format!("--regid={group}");
        let mut all = vec![
            reuid.as_str(),
            regid.as_str(),
            "--clear-groups",
            "--",
            program,
        ];
        all.extend_from_slice(args);
        self.run("setpriv", &all)
    }

    /// `busctl get-property` of one device, as the bare value.
    pub fn device_property(&self, address: &str, property: &str) -> String {
        let full = if address.matches(':').count() == 1 {
            format!("0000:{address}")
        } else {
            address.to_string()
        };
        let path = format!("/org/vfiod1/device/{}", full.replace([':', '.'], "_"));
        let out = self.busctl(&[
            "get-property",
            "org.vfiod1",
            &path,
            "org.vfiod1.Device",
            property,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        value_of(&out)
    }

    pub fn driver(&self, address: &str) -> String {
        self.device_property(address, "Driver")
    }

    /// Calls a method of the simulator's control surface.
    pub fn simulate(&self, method: &str, signature: &str, args: &[&str]) {
        let mut all = vec![
            "call",
            "org.vfiod1",
            "/org/vfiod1/simulator",
            "org.vfiod1.Simulator",
            method,
            signature,
        ];
        all.extend_from_slice(args);
        let out = self.busctl(&all);
        assert!(
            out.status.success(),
            "Simulator.{method}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.kill_vfiod();
        let _ = self.bus.kill();
        let _ = self.bus.wait();
    }
}

/// The value part of busctl's `s "vfio-pci"` / `b true` / `i 1` output.
pub fn value_of(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    let text = text.trim();
    let value = text.split_once(' ').map(|(_, v)| v).unwrap_or(text);
    value.trim_matches('"').to_string()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts an exit code, showing both streams when it is wrong.
pub fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit {code}\nstdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
}

/// polkitd on a rig's private bus, with only vfiod's action and the given
/// JavaScript rules, in a mount namespace of its own (root only).
pub struct Polkit {
    child: Child,
}

impl Polkit {
    pub fn start(rig: &Rig, rules: &str) -> Polkit {
        assert!(is_root(), "polkitd needs root");
        let actions = rig.dir.path("polkit-actions");
        let rules_dir = rig.dir.path("polkit-rules");
        std::fs::create_dir_all(&actions).unwrap();
        std::fs::create_dir_all(&rules_dir).unwrap();
        std::fs::copy(
            repo().join("systemd/org.vfiod1.policy"),
            actions.join("org.vfiod1.policy"),
        )
        .unwrap();
        std::fs::write(rules_dir.join("50-test.rules"), rules).unwrap();
        let script = format!(
            "set -e; mount --bind {a} /usr/share/polkit-1/actions; \
             mount --bind {r} /usr/share/polkit-1/rules.d; mount --bind {r} /etc/polkit-1/rules.d; \
             exec {polkitd} --no-debug",
            a = actions.display(),
            r = rules_dir.display(),
            polkitd = polkitd().display()
        );
        let log = std::fs::File::create(rig.dir.path("polkitd.log")).unwrap();
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &rig.address)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("unshare + polkitd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if rig
                .busctl(&["status", "org.freedesktop.PolicyKit1"])
                .status
                .success()
            {
                return Polkit { child };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "polkitd did not come up: {}",
            std::fs::read_to_string(rig.dir.path("polkitd.log")).unwrap_or_default()
        );
    }
}

impl Drop for Polkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn polkitd() -> PathBuf {
    [
        "/usr/lib/polkit-1/polkitd",
        "/usr/libexec/polkitd",
        "/usr/lib/policykit-1/polkitd",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("polkitd (Debian: apt-get install polkitd)")
}
