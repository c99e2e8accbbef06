//! Plan + bind + release round trip of the RX 580 pair on the simulated
//! Z77 machine, against the same kernel writes made directly (the floor):
//! the difference is vfiod's own overhead (planning, verification reads,
//! worker threads, the ledger). Run: `cargo bench -p vfiod --bench transitions`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfiod::engine::Engine;
use vfiod::kernel::sim::SimKernel;
use vfiod::kernel::{Inspect, Kernel};
use vfiod::ledger::Ledger;
use vfiod::plan::MoveOptions;
use vfiod_config::Config;
use vfiod_dbus::Direction;
use vfiod_pci::PciAddress;

const ROUNDS: usize = 300;

fn machines() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../machines")
}

fn temp_state(base: &Path) -> PathBuf {
    nix::unistd::mkdtemp(&base.join("vfiod-bench-XXXXXX")).expect("mkdtemp")
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn p99(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() * 99 / 100]
}

/// The writes and reads a bare script would make: no checks, no threads.
fn raw_round_trip(kernel: &SimKernel, pair: &[(PciAddress, &str)]) {
    for (address, host) in pair {
        kernel
            .set_driver_override(address, Some("vfio-pci"))
            .unwrap();
        kernel.unbind(address, host).unwrap();
        kernel.probe(address).unwrap();
    }
    for (address, _) in pair {
        kernel.set_driver_override(address, None).unwrap();
        kernel.unbind(address, "vfio-pci").unwrap();
        kernel.probe(address).unwrap();
    }
}

fn main() {
    // The state dir is tmpfs in production ($XDG_RUNTIME_DIR or /run).
    let base = ["/dev/shm", "/run/user"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let machine = machines().join("z77-rx580.toml");
    let config = Config::load(&machines().join("z77-rx580.vfiod.toml")).unwrap();
    let pair: Vec<(PciAddress, &str)> = vec![
        ("0000:01:00.0".parse().unwrap(), "amdgpu"),
        ("0000:01:00.1".parse().unwrap(), "snd_hda_intel"),
    ];

    let engine_dir = temp_state(&base);
    let sim = Arc::new(SimKernel::open(&machine, &engine_dir).unwrap());
    let engine = Engine::new(
        sim.clone(),
        config,
        Ledger::open(&engine_dir).unwrap(),
        vfiod::journal::Journal::disabled(),
    );
    let raw_dir = temp_state(&base);
    let raw = SimKernel::open(&machine, &raw_dir).unwrap();

    let options = MoveOptions::default();
    let mut plan_only = Vec::with_capacity(ROUNDS);
    let mut engine_rounds = Vec::with_capacity(ROUNDS);
    let mut raw_rounds = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS + 20 {
        // Interleaved, so both see the same machine noise.
        let t = Instant::now();
        engine.plan("rx580", Direction::Bind, &options).unwrap();
        let planned = t.elapsed();

        let t = Instant::now();
        engine.plan("rx580", Direction::Bind, &options).unwrap();
        engine.bind("rx580", &options, &|_, _| {}).unwrap();
        engine.release("rx580", &options, &|_, _| {}).unwrap();
        let full = t.elapsed();

        let t = Instant::now();
        raw_round_trip(&raw, &pair);
        let floor = t.elapsed();
        if round >= 20 {
            plan_only.push(planned);
            engine_rounds.push(full);
            raw_rounds.push(floor);
        }
    }
    assert_eq!(sim.driver(&pair[0].0).unwrap().as_deref(), Some("amdgpu"));

    let engine_median = median(&mut engine_rounds);
    let raw_median = median(&mut raw_rounds);
    let overhead = engine_median.saturating_sub(raw_median);
    println!("state dir base: {}", base.display());
    println!(
        "rounds: {ROUNDS} (after 20 warm-up), rx580 pair = 2 devices, 1 plan + bind + release each"
    );
    println!(
        "plan alone:                    median {:>9.1?}",
        median(&mut plan_only)
    );
    println!(
        "vfiod round trip:              median {:>9.1?}  p99 {:>9.1?}",
        engine_median,
        p99(&mut engine_rounds)
    );
    println!(
        "raw kernel writes (floor):     median {:>9.1?}  p99 {:>9.1?}",
        raw_median,
        p99(&mut raw_rounds)
    );
    println!(
        "vfiod overhead per device:     {:>9.1?}  (target < 1 ms)",
        overhead / 2
    );
    let _ = std::fs::remove_dir_all(engine_dir);
    let _ = std::fs::remove_dir_all(raw_dir);
}
