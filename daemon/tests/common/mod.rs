//! A simulated machine with an engine on it, in a temporary state dir.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfiod::engine::Engine;
use vfiod::kernel::Inspect;
use vfiod::kernel::sim::SimKernel;
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
    pub engine: Engine,
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
        let state = dir.0.join("state");
        let sim = Arc::new(SimKernel::open(&machine_path, &state).expect("machine loads"));
        let engine = Engine::new(sim.clone(), config.clone(), Ledger::open(&state).unwrap());
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
