//! 64 clients at once on one vfiod: moves within an IOMMU group are
//! serialized, the final state is consistent, nothing deadlocks, and a VM
//! cannot take what another VM owns.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vfiod_dbus::Error;
use vfiod_dbus::proxy::ManagerProxy;
use vfiod_tests::Rig;
use zbus::Variant;

const CLIENTS: usize = 64;
const MOVES_PER_CLIENT: usize = 4;

/// A small deterministic generator: each client gets its own sequence.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn options(vm: Option<&str>) -> HashMap<&str, Variant<'_>> {
    let mut o = HashMap::new();
    if let Some(vm) = vm {
        o.insert("vm", Variant::from(vm));
    }
    o
}

/// The steps one device goes through in one move, in order.
fn valid_device_steps(steps: &[String], host: &str) -> bool {
    let bind = [
        "set driver_override vfio-pci".to_string(),
        format!("unbind {host}"),
        "probe vfio-pci".to_string(),
    ];
    let release = [
        "clear driver_override".to_string(),
        "unbind vfio-pci".to_string(),
        format!("probe {host}"),
    ];
    let mut rest = steps;
    while !rest.is_empty() {
        if rest.starts_with(&bind) {
            rest = &rest[bind.len()..];
        } else if rest.starts_with(&release) {
            rest = &rest[release.len()..];
        } else {
            return false;
        }
    }
    true
}

#[test]
fn sixty_four_clients_bind_and_release_at_once() {
    let rig = Rig::z77();
    let progress: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let outcomes: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();

    rig.block_on(async {
        // zbus keeps 64 unread messages and drops older ones silently: a
        // collector that falls behind 64 movers (a loaded machine) would
        // see steps missing and call it interleaving.
        let watcher = zbus::connection::Builder::address(rig.address.as_str())
            .max_queued(std::num::NonZeroUsize::new(1 << 16).unwrap())
            .build()
            .await
            .unwrap();
        let manager = ManagerProxy::new(&watcher).await.unwrap();
        let mut stream = manager.receive_transition_progress().await.unwrap();
        let seen = progress.clone();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        // Collects until told to stop, then takes what is queued and ends.
        let collector = tokio::spawn(async move {
            use std::future::Future;
            use std::pin::Pin;
            use std::task::Poll;
            use zbus::export::futures_core::Stream;
            while let Some(signal) =
                std::future::poll_fn(|cx| match Pin::new(&mut stream).poll_next(cx) {
                    Poll::Pending => match Pin::new(&mut stopped).poll(cx) {
                        Poll::Ready(_) => Poll::Ready(None),
                        Poll::Pending => Poll::Pending,
                    },
                    ready => ready,
                })
                .await
            {
                let args = signal.args().unwrap();
                seen.lock()
                    .unwrap()
                    .push((args.device().to_string(), args.step().to_string()));
            }
        });

        let started = Instant::now();
        let mut clients = Vec::new();
        for client in 0..CLIENTS {
            let address = rig.address.clone();
            let outcomes = outcomes.clone();
            clients.push(tokio::spawn(async move {
                let connection = zbus::connection::Builder::address(address.as_str())
                    .build()
                    .await
                    .unwrap();
                let manager = ManagerProxy::new(&connection).await.unwrap();
                let mut rng = Lcg(client as u64 + 1);
                for _ in 0..MOVES_PER_CLIENT {
                    let target = ["rx580", "usb3", "01:00.1", "03:00.0"][rng.next(4) as usize];
                    let vm = [None, Some("win10"), Some("linux")][rng.next(3) as usize];
                    let result = if rng.next(2) == 0 {
                        manager.bind(target, options(vm)).await
                    } else {
                        manager.release(target, options(vm)).await
                    };
                    let outcome = match result {
                        Ok(_) => "ok".to_string(),
                        Err(Error::Conflict(_)) => "Conflict".to_string(),
                        Err(other) => {
                            panic!("client {client}: {target} {vm:?}: unexpected {other:?}")
                        }
                    };
                    *outcomes.lock().unwrap().entry(outcome).or_default() += 1;
                }
            }));
        }
        let all = async {
            for c in clients {
                c.await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .expect("a deadlock: the clients did not finish");
        println!(
            "{} moves by {CLIENTS} clients in {:?}",
            CLIENTS * MOVES_PER_CLIENT,
            started.elapsed()
        );
        // Every move's steps were announced before its answer, and the bus
        // keeps vfiod's messages in order: once vfiod has answered the
        // watcher's Ping, every step is in the watcher's queue.
        vfiod_tests::round_trip_to_vfiod(&watcher).await;
        let _ = stop.send(());
        collector.await.unwrap();
    });

    let outcomes = outcomes.lock().unwrap().clone();
    println!("outcomes: {outcomes:?}");
    assert_eq!(outcomes.values().sum::<usize>(), CLIENTS * MOVES_PER_CLIENT);
    assert!(outcomes.get("ok").copied().unwrap_or(0) > 0);

    // Serialized per group: each group's steps, in the order they were
    // announced, are whole moves one after another, never interleaved.
    let progress = progress.lock().unwrap().clone();
    assert!(!progress.is_empty());
    for (device, host) in [
        ("0000:01:00.0", "amdgpu"),
        ("0000:01:00.1", "snd_hda_intel"),
        ("0000:03:00.0", "xhci_hcd"),
    ] {
        let steps: Vec<String> = progress
            .iter()
            .filter(|(d, _)| d == device)
            .map(|(_, s)| s.clone())
            .collect();
        assert!(
            valid_device_steps(&steps, host),
            "{device}: interleaved steps {steps:?}"
        );
    }
    let group_1: Vec<&str> = progress
        .iter()
        .filter(|(d, _)| d.starts_with("0000:01:00"))
        .map(|(d, _)| d.as_str())
        .collect();
    // A move of group 1 takes the GPU's steps, then the audio's.
    let mut i = 0;
    while i < group_1.len() {
        let first = group_1[i];
        let run = group_1[i..].iter().take_while(|d| **d == first).count();
        assert_eq!(
            first, "0000:01:00.0",
            "group 1 moves must start with the GPU: {group_1:?}"
        );
        let audio = group_1[i + run..]
            .iter()
            .take_while(|d| **d == "0000:01:00.1")
            .count();
        assert!(
            run == 3 || run == 4,
            "group 1: a GPU move of {run} steps at {i}: {group_1:?}"
        );
        assert_eq!(run, audio, "group 1 interleaved at {i}: {group_1:?}");
        i += run + audio;
    }

    // Consistent: every device on vfio-pci or its host driver, owners only
    // on vfio-pci devices, the bus agreeing with each other.
    for (address, host) in [
        ("01:00.0", "amdgpu"),
        ("01:00.1", "snd_hda_intel"),
        ("03:00.0", "xhci_hcd"),
    ] {
        let driver = rig.driver(address);
        let owner = rig.device_property(address, "Owner");
        assert!(
            driver == host || driver == "vfio-pci",
            "{address} on {driver:?}"
        );
        if driver == host {
            assert_eq!(
                owner, "",
                "{address} on its host driver still owned by {owner}"
            );
        }
    }
    let on_vfio = |address: &str| rig.driver(address) == "vfio-pci";
    assert_eq!(on_vfio("01:00.0"), on_vfio("01:00.1"), "group 1 split");
}

#[test]
fn a_vm_cannot_take_another_vms_devices_even_in_a_crowd() {
    let rig = Rig::z77();
    rig.block_on(async {
        let connection = rig.connect().await;
        let manager = ManagerProxy::new(&connection).await.unwrap();
        manager.bind("rx580", options(Some("win10"))).await.unwrap();
        let mut calls = Vec::new();
        for i in 0..32 {
            let address = rig.address.clone();
            calls.push(tokio::spawn(async move {
                let connection = zbus::connection::Builder::address(address.as_str())
                    .build()
                    .await
                    .unwrap();
                let manager = ManagerProxy::new(&connection).await.unwrap();
                let result = if i % 2 == 0 {
                    manager.bind("rx580", options(Some("linux"))).await
                } else {
                    manager.release("01:00.1", options(Some("linux"))).await
                };
                assert!(matches!(result, Err(Error::Conflict(_))), "{result:?}");
            }));
        }
        for c in calls {
            c.await.unwrap();
        }
    });
    assert_eq!(rig.driver("01:00.0"), "vfio-pci");
    assert_eq!(rig.device_property("01:00.1", "Owner"), "win10");
}
