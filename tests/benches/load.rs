//! vfiod under load, on the simulated Z77 (issue 14):
//!   cargo bench -p vfiod-tests --bench load -- flood
//!   cargo bench -p vfiod-tests --bench load -- soak [CYCLES]
//!   cargo bench -p vfiod-tests --bench load -- hung
//!
//! flood: an unprivileged user (`nobody`, no polkitd) keeps 64 calls in
//! flight while root binds and releases rx580 with vfioctl, once with
//! denied Release and open Check calls mixed, once with as many cheap
//! property reads, the two interleaved in rounds. Prints root's bind and
//! release medians under each, their ratio, and vfiod's threads and RSS
//! sampled all along.
//!
//! soak: CYCLES (10,000) bind/release cycles of rx580 through the bus,
//! each verified; vfiod's RSS, open fds, threads and state files before
//! and after, each read after 12 s idle (idle threads end after 10 s).
//!
//! hung: the RX 580's audio unbind hangs for good; root's bind of rx580
//! times out, and while the unbind still hangs every other group moves and
//! property reads answer (p50/p99/max); then the simulator ends the hang
//! and the bench waits for the bus to show the device settled.
//!
//! The bench runs itself as the flood client (`--flood-client MODE`).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vfiod_dbus::proxy::{DeviceProxy, ManagerProxy};
use vfiod_tests::{Rig, bin};
use zbus::proxy::CacheProperties;

const IN_FLIGHT: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("--flood-client") => flood_client(&args[1]),
        Some("flood") | None => flood(),
        Some("soak") => soak(args.get(1).map_or(10_000, |n| n.parse().expect("cycles"))),
        Some("hung") => hung(),
        Some(other) => panic!("unknown mode {other}: flood or soak"),
    }
}

/// vfiod's `field` (kB or a count) from /proc/PID/status.
fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// The flood: keeps 64 calls in flight until stdin closes, then prints
/// how many it made. `denied`: Release of rx580 (refused: no polkitd)
/// and Check of rx580 in turn; `reads`: Properties.Get of a driver.
fn flood_client(mode: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1]);
            stop.store(true, Ordering::SeqCst);
        });
    }
    let started = Instant::now();
    runtime.block_on(async {
        let connection = zbus::Connection::system().await.unwrap();
        let mut tasks = Vec::new();
        for slot in 0..IN_FLIGHT {
            let connection = connection.clone();
            let (stop, made, mode) = (stop.clone(), made.clone(), mode.to_owned());
            tasks.push(tokio::spawn(async move {
                let manager = ManagerProxy::new(&connection).await.unwrap();
                let device = DeviceProxy::builder(&connection)
                    .path("/org/vfiod1/device/0000_01_00_0")
                    .cache_properties(CacheProperties::No)
                    .build()
                    .await
                    .unwrap();
                let mut n = slot;
                while !stop.load(Ordering::Relaxed) {
                    match mode.as_str() {
                        "denied" if n % 2 == 0 => {
                            let denied = manager.release("rx580", Default::default()).await;
                            assert!(matches!(denied, Err(vfiod_dbus::Error::AccessDenied(_))));
                        }
                        "denied" => {
                            manager.check("rx580").await.unwrap();
                        }
                        _ => {
                            device.driver().await.unwrap();
                        }
                    }
                    n += 1;
                    made.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
    let calls = made.load(Ordering::SeqCst);
    println!(
        "{calls} {:.0}",
        calls as f64 / started.elapsed().as_secs_f64()
    );
}

/// The flood client as `nobody`, until dropped.
struct Flood {
    child: Child,
}

impl Flood {
    fn start(rig: &Rig, mode: &str) -> Flood {
        let me = std::env::current_exe().unwrap();
        let child = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(me)
            .args(["--flood-client", mode])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &rig.address)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        Flood { child }
    }

    /// Stops it; returns its calls per second.
    fn stop(mut self) -> f64 {
        drop(self.child.stdin.take());
        let out = self.child.wait_with_output().unwrap();
        assert!(out.status.success(), "the flood client failed");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .nth(1)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0.0)
    }
}

/// Samples vfiod's threads and RSS every 20 ms until dropped; keeps the
/// highest of each.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, u64)>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut threads, mut rss) = (0, 0);
            while !flag.load(Ordering::SeqCst) {
                threads = threads.max(status_field(pid, "Threads:"));
                rss = rss.max(status_field(pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(20));
            }
            (threads, rss)
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    /// The most threads and the most RSS (KiB) seen.
    fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

fn vfioctl(rig: &Rig, args: &[&str]) -> Duration {
    let started = Instant::now();
    let out = Command::new(bin("vfioctl"))
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &rig.address)
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn flood() {
    assert!(
        vfiod_tests::is_root(),
        "the flood runs a client as nobody: run as root"
    );
    let rig = Rig::z77();
    let pid = rig.vfiod_pid().unwrap();
    println!("vfiod binary: {}", bin("vfiod").display());
    let mut binds = [Vec::new(), Vec::new()];
    let mut releases = [Vec::new(), Vec::new()];
    let mut rates = [Vec::new(), Vec::new()];
    let mut worst = [(0, 0), (0, 0)];
    let modes = ["reads", "denied"];
    for _round in 0..4 {
        for (m, mode) in modes.iter().enumerate() {
            let flood = Flood::start(&rig, mode);
            let sampler = Sampler::start(pid);
            // Let the flood reach its pace before timing root.
            std::thread::sleep(Duration::from_millis(500));
            for _ in 0..8 {
                binds[m].push(vfioctl(&rig, &["bind", "rx580"]));
                releases[m].push(vfioctl(&rig, &["release", "rx580"]));
            }
            let (threads, rss) = sampler.stop();
            rates[m].push(flood.stop());
            worst[m] = (worst[m].0.max(threads), worst[m].1.max(rss));
        }
    }
    for (m, mode) in modes.iter().enumerate() {
        let rate = rates[m].iter().sum::<f64>() / rates[m].len() as f64;
        println!(
            "under a flood of {mode} ({rate:.0} calls/s, {IN_FLIGHT} in flight): root's bind median {:.1?}, release median {:.1?}; vfiod at most {} threads, {:.2} MiB RSS",
            median(&mut binds[m]),
            median(&mut releases[m]),
            worst[m].0,
            worst[m].1 as f64 / 1024.0
        );
    }
    let ratio = |v: &mut [Vec<Duration>; 2]| {
        median(&mut v[1]).as_secs_f64() / median(&mut v[0]).as_secs_f64()
    };
    println!(
        "denied flood / read flood: bind {:.2}, release {:.2} (target <= 1.5); threads <= 16, RSS <= 8 MiB",
        ratio(&mut binds),
        ratio(&mut releases)
    );
}

/// What the soak compares before and after.
#[derive(Debug, PartialEq)]
struct Footprint {
    rss_kb: u64,
    fds: usize,
    threads: u64,
    state_files: Vec<(String, u64)>,
}

fn footprint(rig: &Rig, pid: u32) -> Footprint {
    // Idle worker and blocking-pool threads end after 10 s.
    std::thread::sleep(Duration::from_secs(12));
    let mut state_files: Vec<(String, u64)> = std::fs::read_dir(rig.dir.path("state"))
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().map_or(0, |m| m.len()),
            )
        })
        .collect();
    state_files.sort();
    Footprint {
        rss_kb: status_field(pid, "VmRSS:"),
        fds: fds(pid),
        threads: status_field(pid, "Threads:"),
        state_files,
    }
}

fn soak(cycles: u32) {
    let rig = Rig::z77();
    let pid = rig.vfiod_pid().unwrap();
    println!("vfiod binary: {}", bin("vfiod").display());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let connection = runtime.block_on(async {
        zbus::connection::Builder::address(rig.address.as_str())
            .build()
            .await
            .unwrap()
    });
    let cycle = |n: u32| {
        runtime.block_on(async {
            let manager = ManagerProxy::new(&connection).await.unwrap();
            let gpu = DeviceProxy::builder(&connection)
                .path("/org/vfiod1/device/0000_01_00_0")
                .cache_properties(CacheProperties::No)
                .build()
                .await
                .unwrap();
            for _ in 0..n {
                let moved = manager.bind("rx580", Default::default()).await.unwrap();
                assert_eq!(moved.len(), 2, "the pair moved");
                assert_eq!(gpu.driver().await.unwrap(), "vfio-pci");
                let moved = manager.release("rx580", Default::default()).await.unwrap();
                assert_eq!(moved.len(), 2, "the pair came back");
                assert_eq!(gpu.driver().await.unwrap(), "amdgpu");
            }
        })
    };
    // Warm up: the first moves load vfio-pci and fill the state files.
    cycle(10);
    let before = footprint(&rig, pid);
    let started = Instant::now();
    cycle(cycles);
    let took = started.elapsed();
    let after = footprint(&rig, pid);
    println!(
        "{cycles} verified bind/release cycles of rx580 in {:.1} s ({:.2} ms a cycle)",
        took.as_secs_f64(),
        took.as_secs_f64() * 1000.0 / f64::from(cycles)
    );
    println!("before: {before:?}");
    println!("after:  {after:?}");
    let grew = after.rss_kb as f64 / before.rss_kb as f64 - 1.0;
    println!(
        "RSS {:+.1} % (bound 10 %), fds {} -> {}, threads {} -> {}, state files {}",
        grew * 100.0,
        before.fds,
        after.fds,
        before.threads,
        after.threads,
        if before.state_files == after.state_files {
            "the same sizes"
        } else {
            "CHANGED"
        }
    );
}

fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort();
    samples[(samples.len() * p / 100).min(samples.len() - 1)]
}

fn hung() {
    let rig = Rig::z77_hung_audio(2000);
    println!("vfiod binary: {}", bin("vfiod").display());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let connection = zbus::connection::Builder::address(rig.address.as_str())
            .build()
            .await
            .unwrap();
        let manager = ManagerProxy::new(&connection).await.unwrap();
        let audio = DeviceProxy::builder(&connection)
            .path("/org/vfiod1/device/0000_01_00_1")
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .unwrap();
        let started = Instant::now();
        let bind = manager.bind("rx580", Default::default()).await;
        assert!(
            matches!(bind, Err(vfiod_dbus::Error::Timeout(_))),
            "{bind:?}"
        );
        println!(
            "bind rx580 with the audio's unbind hung: Timeout after {:.2?}; audio {} on {:?}",
            started.elapsed(),
            audio.state().await.unwrap(),
            audio.driver().await.unwrap()
        );
        // The unbind still hangs: other groups move, reads answer.
        let mut moves = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            manager.bind("usb3", Default::default()).await.unwrap();
            manager.release("usb3", Default::default()).await.unwrap();
            moves.push(t.elapsed());
        }
        let mut reads = Vec::new();
        for _ in 0..2000 {
            let t = Instant::now();
            assert_eq!(audio.state().await.unwrap(), "stuck");
            reads.push(t.elapsed());
        }
        println!(
            "while it hangs: usb3 bind+release median {:.1?} (10 of 10 done); Device.State read median {:.0?}, p99 {:.0?}, max {:.1?} (2000 reads)",
            median(&mut moves),
            percentile(&mut reads, 50),
            percentile(&mut reads, 99),
            percentile(&mut reads, 100)
        );
        let ended = Instant::now();
        rig.simulate("EndHang", "s", &["0000:01:00.1"]);
        loop {
            let state = audio.state().await.unwrap();
            let driver = audio.driver().await.unwrap();
            if state != "stuck" && state != "moving" && !driver.is_empty() {
                println!(
                    "the hang ended: the bus showed the audio settled on {driver} ({state}) {:.1?} later",
                    ended.elapsed()
                );
                break;
            }
            assert!(
                ended.elapsed() < Duration::from_secs(10),
                "never settled: {state} on {driver:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
}
