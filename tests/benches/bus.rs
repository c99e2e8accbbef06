//! vfiod on the bus, measured: idle memory and wakeups, the round trip of
//! a read, and one `vfioctl status` process against `busctl call` for the
//! same answer. The release binaries are built by the bench itself
//! (`bin`, in the profile it runs in):
//!   cargo bench -p vfiod-tests --bench bus

use std::process::Command;
use std::time::{Duration, Instant};

use vfiod_tests::{Rig, bin};
use zbus::proxy::CacheProperties;

fn status_field(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Context switches of each thread, by thread id: each one is a wakeup.
fn switches(pid: u32) -> std::collections::BTreeMap<String, u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| {
            let text = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let n = text
                .lines()
                .filter(|l| {
                    l.starts_with("voluntary_ctxt_switches")
                        || l.starts_with("nonvoluntary_ctxt_switches")
                })
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
            (t.file_name().to_string_lossy().into_owned(), n)
        })
        .collect()
}

/// Wakeups between two samples; a thread that came or went counts too.
fn wakeups(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> u64 {
    let mut total = 0;
    for (tid, n) in after {
        total += n - before.get(tid).copied().unwrap_or(0);
    }
    total + before.keys().filter(|t| !after.contains_key(*t)).count() as u64
}

fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort();
    samples[(samples.len() * p / 100).min(samples.len() - 1)]
}

fn main() {
    let rig = Rig::z77();
    let pid = rig.vfiod_pid().unwrap();
    println!("vfiod binary: {}", bin("vfiod").display());

    // Idle: after start-up settles (tokio lets idle blocking-pool threads
    // go after 10 s), nothing should wake it.
    std::thread::sleep(Duration::from_secs(12));
    let rss = status_field(pid, "VmRSS:");
    let before = switches(pid);
    std::thread::sleep(Duration::from_secs(10));
    let idle_wakeups = wakeups(&before, &switches(pid));
    println!("threads while idle: {}", before.len());
    println!(
        "idle RSS on the Z77 machine: {:.2} MiB (target <= 6 MiB)",
        rss as f64 / 1024.0
    );
    println!("wakeups in 10 s idle: {idle_wakeups} (target 0)");

    // Round trip of a Bind-free method: Properties.Get of a Device's Driver.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut gets, mut checks) = runtime.block_on(async {
        let connection = zbus::connection::Builder::address(rig.address.as_str())
            .build()
            .await
            .unwrap();
        let device = vfiod_dbus::proxy::DeviceProxy::builder(&connection)
            .path("/org/vfiod1/device/0000_01_00_0")
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .unwrap();
        let manager = vfiod_dbus::proxy::ManagerProxy::new(&connection)
            .await
            .unwrap();
        let mut gets = Vec::new();
        let mut checks = Vec::new();
        for i in 0..5200 {
            let t = Instant::now();
            assert_eq!(device.driver().await.unwrap(), "amdgpu");
            if i >= 200 {
                gets.push(t.elapsed());
            }
        }
        for i in 0..1100 {
            let t = Instant::now();
            manager.check("").await.unwrap();
            if i >= 100 {
                checks.push(t.elapsed());
            }
        }
        (gets, checks)
    });
    println!(
        "Properties.Get(Driver) round trip, 5000 calls: median {:.1?}, p99 {:.1?} (targets <= 150 us, <= 500 us)",
        percentile(&mut gets, 50),
        percentile(&mut gets, 99)
    );
    println!(
        "Manager.Check(\"\") round trip, 1000 calls: median {:.1?}, p99 {:.1?}",
        percentile(&mut checks, 50),
        percentile(&mut checks, 99)
    );

    // Reads while a move hangs: the unbind of the RX 580's audio never
    // returns (until its 5 s timeout); reads must not wait for it.
    let hung = Rig::z77_hung_audio(5000);
    let mut during = runtime.block_on(async {
        let connection = zbus::connection::Builder::address(hung.address.as_str())
            .build()
            .await
            .unwrap();
        let manager = vfiod_dbus::proxy::ManagerProxy::new(&connection)
            .await
            .unwrap();
        let device = vfiod_dbus::proxy::DeviceProxy::builder(&connection)
            .path("/org/vfiod1/device/0000_01_00_0")
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .unwrap();
        let bind = tokio::spawn(async move { manager.bind("rx580", Default::default()).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut during = Vec::new();
        for _ in 0..1000 {
            let t = Instant::now();
            assert_eq!(device.state().await.unwrap(), "moving");
            during.push(t.elapsed());
        }
        assert!(!bind.is_finished(), "the hung bind ended early");
        assert!(matches!(
            bind.await.unwrap(),
            Err(vfiod_dbus::Error::Timeout(_))
        ));
        during
    });
    println!(
        "Properties.Get(State) while an unbind hangs, 1000 calls: median {:.1?}, p99 {:.1?}, max {:.1?} (bound 50 ms)",
        percentile(&mut during, 50),
        percentile(&mut during, 99),
        percentile(&mut during, 100)
    );

    // One process for the same answer, interleaved.
    let vfioctl = bin("vfioctl");
    let mut ours = Vec::new();
    let mut busctl = Vec::new();
    for round in 0..110 {
        let t = Instant::now();
        let out = Command::new(&vfioctl)
            .args(["--json", "status"])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &rig.address)
            .output()
            .unwrap();
        let a = t.elapsed();
        assert!(out.status.success());
        let t = Instant::now();
        let out = Command::new("busctl")
            .args([
                "--system",
                "--json=short",
                "call",
                "org.vfiod1",
                "/org/vfiod1",
                "org.freedesktop.DBus.ObjectManager",
                "GetManagedObjects",
            ])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &rig.address)
            .output()
            .unwrap();
        let b = t.elapsed();
        assert!(out.status.success());
        if round >= 10 {
            ours.push(a);
            busctl.push(b);
        }
    }
    let (a, b) = (percentile(&mut ours, 50), percentile(&mut busctl, 50));
    println!(
        "one process, every device and profile: vfioctl --json status median {a:.2?}, busctl call GetManagedObjects median {b:.2?}, ratio {:.2} (target < 1)",
        a.as_secs_f64() / b.as_secs_f64()
    );
}
