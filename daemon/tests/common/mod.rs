//! A simulated machine with an engine on it, in a temporary state dir.

#![allow(dead_code)]

pub mod interposed;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfiod::engine::Engine;
use vfiod::journal::{JOURNAL_FILE, Journal};
use vfiod::kernel::sim::SimKernel;
use vfiod::kernel::{Inspect, Kernel};
use vfiod::ledger::Ledger;
use vfiod::plan::MoveOptions;
use vfiod_config::Config;
use vfiod_dbus::Error;
use vfiod_pci::machine::MachineFile;
use vfiod_pci::{PciAddress, PciDevice};

pub fn machines_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../machines")
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let template = std::env::temp_dir().join("vfiod-test-XXXXXX");
        TempDir(nix::unistd::mkdtemp(&template).expect("mkdtemp"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Rig {
    pub sim: Arc<SimKernel>,
    pub engine: Arc<Engine>,
    pub dir: TempDir,
    pub machine_path: PathBuf,
    pub config: Config,
}

pub fn z77_config() -> Config {
    Config::load(&machines_dir().join("z77-rx580.vfiod.toml")).expect("shipped config loads")
}

impl Rig {
    /// A machine from `machines/NAME.toml` and its shipped config.
    pub fn shipped(name: &str) -> Rig {
        let config =
            Config::load(&machines_dir().join(format!("{name}.vfiod.toml"))).unwrap_or_default();
        Rig::at(
            machines_dir().join(format!("{name}.toml")),
            config,
            TempDir::new(),
        )
    }

    /// The z77 machine edited by `edit`, e.g. to add a fault.
    pub fn z77_with(edit: impl FnOnce(String) -> String) -> Rig {
        let text = std::fs::read_to_string(machines_dir().join("z77-rx580.toml")).unwrap();
        Rig::from_text(&edit(text), z77_config())
    }

    pub fn from_text(machine: &str, config: Config) -> Rig {
        let dir = TempDir::new();
        let path = dir.0.join("machine.toml");
        std::fs::write(&path, machine).unwrap();
        Rig::at(path, config, dir)
    }

    pub fn at(machine_path: PathBuf, config: Config, dir: TempDir) -> Rig {
        Rig::interposed(machine_path, config, dir, |sim| sim)
    }

    /// The z77 machine edited by `edit`, its engine driving the kernel
    /// that `wrap` makes of the simulated one.
    pub fn z77_interposed(
        edit: impl FnOnce(String) -> String,
        wrap: impl FnOnce(Arc<SimKernel>) -> Arc<dyn Kernel>,
    ) -> Rig {
        let text = std::fs::read_to_string(machines_dir().join("z77-rx580.toml")).unwrap();
        let dir = TempDir::new();
        let path = dir.0.join("machine.toml");
        std::fs::write(&path, edit(text)).unwrap();
        Rig::interposed(path, z77_config(), dir, wrap)
    }

    fn interposed(
        machine_path: PathBuf,
        config: Config,
        dir: TempDir,
        wrap: impl FnOnce(Arc<SimKernel>) -> Arc<dyn Kernel>,
    ) -> Rig {
        let state = dir.0.join("state");
        let sim = Arc::new(SimKernel::open(&machine_path, &state).expect("machine loads"));
        let boot_id = sim.boot_id().unwrap();
        let (journal, _) = Journal::open(&state, &boot_id).unwrap();
        let engine = Engine::new(
            wrap(sim.clone()),
            config.clone(),
            Ledger::open(&state).unwrap(),
            journal,
        );
        engine.set_units(sim.clone());
        Rig {
            sim,
            engine,
            dir,
            machine_path,
            config,
        }
    }

    /// Drops the engine and the simulated kernel and opens both again from
    /// the state dir, as a restarted vfiod would.
    pub fn restart(self) -> Rig {
        let Rig {
            dir,
            machine_path,
            config,
            ..
        } = self;
        Rig::at(machine_path, config, dir)
    }

    pub fn with_timeout_ms(self, ms: u64) -> Rig {
        let mut config = self.config.clone();
        config.daemon.unbind_timeout_ms = ms;
        self.engine.set_config(config.clone());
        Rig { config, ..self }
    }

    pub fn bind(&self, target: &str) -> Result<Vec<PciAddress>, Error> {
        self.engine
            .bind(target, &MoveOptions::default(), &|_, _| {})
    }

    pub fn bind_with(&self, target: &str, options: MoveOptions) -> Result<Vec<PciAddress>, Error> {
        self.engine.bind(target, &options, &|_, _| {})
    }

    pub fn release(&self, target: &str) -> Result<Vec<PciAddress>, Error> {
        self.engine
            .release(target, &MoveOptions::default(), &|_, _| {})
    }

    pub fn release_with(
        &self,
        target: &str,
        options: MoveOptions,
    ) -> Result<Vec<PciAddress>, Error> {
        self.engine.release(target, &options, &|_, _| {})
    }

    pub fn driver(&self, address: &str) -> Option<String> {
        self.sim.driver(&addr(address)).unwrap()
    }

    pub fn overrides(&self, address: &str) -> Option<String> {
        self.sim.driver_override(&addr(address)).unwrap()
    }

    pub fn devices(&self) -> Vec<PciDevice> {
        self.sim.devices().unwrap()
    }

    /// Everything a refusal must leave as it was.
    pub fn kernel_view(&self) -> (Vec<PciDevice>, Vec<Option<String>>) {
        let devices = self.devices();
        let overrides = devices
            .iter()
            .map(|d| self.sim.driver_override(&d.address).unwrap())
            .collect();
        (devices, overrides)
    }

    pub fn machine(&self) -> MachineFile {
        self.sim.machine().clone()
    }

    /// How many moves the journal holds open.
    pub fn open_moves(&self) -> usize {
        let text = std::fs::read(self.dir.0.join("state").join(JOURNAL_FILE)).unwrap();
        let file: serde_json::Value = serde_json::from_slice(&text).unwrap();
        file["moves"].as_object().expect("a moves map").len()
    }
}

/// Waits for `condition`, polling; fails after `within`.
pub fn wait_until(what: &str, within: Duration, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Options of a move for (bind) or by (release) VM `name`.
pub fn vm(name: &str) -> MoveOptions {
    MoveOptions {
        vm: Some(name.into()),
        ..MoveOptions::default()
    }
}

pub fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

pub fn addrs(list: &[&str]) -> Vec<PciAddress> {
    list.iter().map(|s| addr(s)).collect()
}

/// Adds `fault = {..}` to one device of a machine file's text.
pub fn with_fault(text: String, address: &str, fault: &str) -> String {
    let line = format!("address = \"{address}\"\n");
    assert!(text.contains(&line), "no device {address}");
    text.replace(&line, &format!("{line}fault = {{ {fault} }}\n"))
}

/// A udev worker that never lets go of the audio's node: a plan waits a
/// second for it to, reading the holders again and again.
pub fn udev_worker_holds_the_audio(rig: &Rig) {
    rig.sim
        .add_holder(vfiod_pci::Holder {
            pid: 330,
            comm: "(udev-worker)".into(),
            node: "/dev/snd/controlC1".into(),
        })
        .unwrap();
}
