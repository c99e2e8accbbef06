//! What vfiod's reads of the real kernel cost: the median wall time of each
//! `Kernel` read a move's planning makes, and of the plan itself, on this
//! machine's own sysfs and procfs. Read-only.
//!   cargo run --release -p vfiod --example kernel_costs -- [CONFIG] [TARGET] [ROUNDS]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vfiod::kernel::Inspect;
use vfiod::kernel::Sysfs;
use vfiod::ledger::Ledger;
use vfiod::plan::{self, MoveOptions};
use vfiod_config::Config;
use vfiod_dbus::Direction;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time<T>(rounds: usize, label: &str, mut f: impl FnMut() -> T) -> T {
    let mut samples = Vec::with_capacity(rounds);
    let mut last = None;
    for _ in 0..rounds {
        let started = Instant::now();
        last = Some(f());
        samples.push(started.elapsed());
    }
    println!("{:>10.3} ms  {label}", median(samples).as_secs_f64() * 1e3);
    last.expect("at least one round")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match args.first() {
        Some(path) => Config::load(&PathBuf::from(path)).expect("config"),
        None => Config::default(),
    };
    let target = args.get(1).cloned();
    let rounds: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(20);
    let kernel = Sysfs::this_machine();
    let ledger = Ledger::in_memory();

    let devices = time(rounds, "devices()", || kernel.devices().expect("devices"));
    println!("            ({} functions)", devices.len());
    let nodes: Vec<PathBuf> = devices
        .iter()
        .flat_map(|d| kernel.nodes(&d.address).unwrap_or_default())
        .collect();
    time(rounds, "holders(every node)", || {
        kernel.holders(&nodes).expect("holders")
    });
    for d in &devices {
        let a = d.address;
        time(rounds, &format!("device({a})"), || kernel.device(&a).ok());
        time(rounds, &format!("driver({a})"), || kernel.driver(&a).ok());
        time(rounds, &format!("nodes({a})"), || kernel.nodes(&a).ok());
        time(rounds, &format!("mounts_behind({a})"), || {
            kernel.mounts_behind(&a).ok()
        });
        time(rounds, &format!("console_on({a})"), || {
            kernel.console_on(&a).ok()
        });
        time(rounds, &format!("usb_behind({a})"), || {
            kernel.usb_behind(&a).ok()
        });
    }
    time(rounds, "iommu_enabled()", || kernel.iommu_enabled().ok());
    if let Some(target) = target {
        for direction in [Direction::Bind, Direction::Release] {
            let result = time(rounds, &format!("plan({target}, {direction})"), || {
                plan::plan(
                    &kernel,
                    &config,
                    &ledger,
                    &target,
                    direction,
                    &MoveOptions::default(),
                )
            });
            if let Err(e) = result {
                println!("            ({e})");
            }
        }
    }
}
