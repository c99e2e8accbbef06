//! vfiod on the bus: `org.vfiod1` (DESIGN §4). The published view is a
//! snapshot refreshed after every move and every uevent; property reads
//! only look at it, so they answer at once even while a move hangs.

mod interfaces;
mod narrator;
mod objects;
mod options;
pub mod simulator;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use vfiod_dbus::names::{
    BUS_NAME, DEVICE_INTERFACE, MANAGER_INTERFACE, MANAGER_PATH, PROFILE_INTERFACE,
};
use vfiod_dbus::{Direction, Error};
use vfiod_pci::{PciAddress, PciDevice};
use zbus::message::Header;
use zbus::names::{InterfaceName, UniqueName};
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant};

use crate::bouncer::Bouncer;
use crate::bouncer::MoveDetails;
use crate::doctor;
use crate::engine::{Activity, Engine};
use crate::kernel::{MonitorEvent, UeventAction};
use crate::plan::validate_target;
pub use interfaces::{DeviceAt, ManagerInterface, ProfileNamed};
use narrator::{Narration, Narrator};
pub use objects::{Reread, Snapshot};
pub use options::parse_move_options;
pub use vfiod_dbus::names::{device_object_path, profile_object_path};
use vfiod_dbus::objects::{DeviceObject, DeviceProperties, ProfileObject, ProfileProperties};

/// A snapshot that takes longer than this is given up (a sysfs read stuck
/// behind a hung driver); the published view stays as it was.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);

/// What a batch of uevents calls for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UeventRereads {
    /// A function came or went: the whole bus.
    WholeBus,
    /// These devices, each as much as its events need (none: nothing).
    Devices(BTreeMap<PciAddress, Reread>),
}

impl std::fmt::Display for UeventRereads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UeventRereads::WholeBus => f.write_str("the whole bus"),
            UeventRereads::Devices(devices) if devices.is_empty() => f.write_str("nothing"),
            UeventRereads::Devices(devices) => {
                let mut first = true;
                for (address, what) in devices {
                    let what = match what {
                        Reread::Whole => "whole",
                        Reread::Driver => "driver",
                    };
                    write!(f, "{}{address} ({what})", if first { "" } else { ", " })?;
                    first = false;
                }
                Ok(())
            }
        }
    }
}

/// What to read again after `events`, given the `published` view:
/// - uevents lost (the monitor overflowed): the whole bus;
/// - a function added or removed: the whole bus;
/// - a device in a move of ours (`moving`): nothing, its move reads it as
///   it ends, and reading it at every step would only compete with it;
/// - a bind or unbind: the driver (all they change);
/// - a bind of the driver already published: nothing. That is the echo of
///   a move of ours, which udevd passes on after the move has answered,
///   while its caller is still exiting.
/// - anything else (`change`): the whole device.
pub fn rereads_after(
    events: &[MonitorEvent],
    published: &Snapshot,
    moving: impl Fn(&PciAddress) -> bool,
) -> UeventRereads {
    let mut devices: BTreeMap<PciAddress, Reread> = BTreeMap::new();
    for event in events {
        let event = match event {
            MonitorEvent::Uevent(event) => event,
            MonitorEvent::Overflow => return UeventRereads::WholeBus,
        };
        let what = match event.action {
            UeventAction::Add | UeventAction::Remove => return UeventRereads::WholeBus,
            _ if moving(&event.address) => continue,
            UeventAction::Bind => {
                let published_driver = published.devices.get(&event.address).map(|d| &d.driver);
                if event.driver.is_some() && published_driver == event.driver.as_ref() {
                    continue;
                }
                Reread::Driver
            }
            UeventAction::Unbind => Reread::Driver,
            UeventAction::Change => Reread::Whole,
        };
        let entry = devices.entry(event.address).or_insert(what);
        if what == Reread::Whole {
            *entry = Reread::Whole;
        }
    }
    UeventRereads::Devices(devices)
}

/// What a refresh reads again.
enum Scope {
    WholeBus,
    Devices(Vec<PciAddress>, Reread),
    States(Vec<PciAddress>),
}

pub struct Service {
    engine: Arc<Engine>,
    bouncer: Arc<Bouncer>,
    published: RwLock<Snapshot>,
    /// The last failure of each profile's moves (LastError).
    last_errors: Mutex<BTreeMap<String, String>>,
    /// One refresh at a time, so object additions and removals never race.
    refreshing: tokio::sync::Mutex<()>,
    /// Emits the Transition* signals in the engine's order.
    narrator: OnceLock<Narrator>,
    /// Moves that may plan and run at once; more wait their turn (each
    /// holds a blocking thread while it runs).
    move_slots: Semaphore,
    /// Checks that may inspect the host at once: Check is open to
    /// everyone, and a full inspection reads every process's files.
    check_slots: Semaphore,
}

/// See [`Service::move_slots`].
const CONCURRENT_MOVES: usize = 4;
/// See [`Service::check_slots`].
const CONCURRENT_CHECKS: usize = 2;

impl Service {
    pub fn new(engine: Arc<Engine>, bouncer: Arc<Bouncer>) -> Arc<Service> {
        Arc::new(Service {
            engine,
            bouncer,
            published: RwLock::default(),
            last_errors: Mutex::default(),
            refreshing: tokio::sync::Mutex::new(()),
            narrator: OnceLock::new(),
            move_slots: Semaphore::new(CONCURRENT_MOVES),
            check_slots: Semaphore::new(CONCURRENT_CHECKS),
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Serves the objects on `connection` and publishes the first snapshot.
    /// The well-known name comes after ([`Service::take_name`]): with
    /// `Type=dbus`, systemd counts vfiod as started once it owns the name.
    pub async fn start(self: &Arc<Self>, connection: &Connection) -> Result<(), Error> {
        let server = connection.object_server();
        server.at(MANAGER_PATH, zbus::fdo::ObjectManager).await?;
        server
            .at(
                MANAGER_PATH,
                ManagerInterface {
                    service: self.clone(),
                },
            )
            .await?;
        self.refresh(connection).await
    }

    /// Takes `org.vfiod1`: from now on clients (and systemd) see vfiod.
    pub async fn take_name(&self, connection: &Connection) -> Result<(), Error> {
        connection.request_name(BUS_NAME).await?;
        info!(name = BUS_NAME, "serving on the bus");
        Ok(())
    }

    fn narrator(self: &Arc<Self>, connection: &Connection) -> Narrator {
        self.narrator
            .get_or_init(|| narrator::spawn(self.clone(), connection.clone()))
            .clone()
    }

    fn snapshot(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        self.published.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn with_device<T>(
        &self,
        address: &PciAddress,
        f: impl FnOnce(&DeviceProperties) -> T,
    ) -> Option<T> {
        self.snapshot().devices.get(address).map(f)
    }

    pub(crate) fn with_profile<T>(
        &self,
        name: &str,
        f: impl FnOnce(&ProfileProperties) -> T,
    ) -> Option<T> {
        self.snapshot().profiles.get(name).map(f)
    }

    pub(crate) fn device_paths(&self) -> Vec<OwnedObjectPath> {
        self.snapshot()
            .devices
            .keys()
            .map(device_object_path)
            .collect()
    }

    pub(crate) fn profile_paths(&self) -> Vec<OwnedObjectPath> {
        self.snapshot()
            .profiles
            .keys()
            .map(|n| profile_object_path(n))
            .collect()
    }

    /// Re-reads the kernel and publishes what changed: objects added and
    /// removed, one PropertiesChanged per changed object.
    pub async fn refresh(self: &Arc<Self>, connection: &Connection) -> Result<(), Error> {
        self.refresh_with(connection, Scope::WholeBus).await
    }

    /// Reads again what a batch of uevents may have changed and publishes
    /// it ([`rereads_after`] says what).
    pub async fn follow_uevents(
        self: &Arc<Self>,
        connection: &Connection,
        events: &[MonitorEvent],
    ) -> Result<(), Error> {
        for event in events {
            if let MonitorEvent::Uevent(event) = event
                && event.action == UeventAction::Unbind
                && self.engine.activity(&event.address).is_none()
                && self.engine.watching_hand_back(&event.address)
            {
                let engine = self.engine.clone();
                let address = event.address;
                let judged =
                    tokio::task::spawn_blocking(move || engine.host_driver_let_go(&address));
                if let Err(e) = judged.await {
                    tracing::error!(device = %address, error = %e, "judging a host driver's unbind failed");
                }
            }
        }
        let rereads = {
            let published = self.snapshot();
            rereads_after(events, &published, |address| {
                self.engine.activity(address) == Some(Activity::Moving)
            })
        };
        tracing::debug!(events = events.len(), rereads = %rereads, "uevents");
        match rereads {
            UeventRereads::WholeBus => self.refresh(connection).await,
            UeventRereads::Devices(devices) => {
                for what in [Reread::Whole, Reread::Driver] {
                    let addresses: Vec<PciAddress> = devices
                        .iter()
                        .filter(|(_, w)| **w == what)
                        .map(|(a, _)| *a)
                        .collect();
                    if !addresses.is_empty() {
                        self.refresh_with(connection, Scope::Devices(addresses, what))
                            .await?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Reads these devices' drivers again and publishes them with their
    /// states: for changes the engine made outside a move (a device settled
    /// after a late kernel answer), which uevents alone may show too early.
    pub async fn reread_devices(
        self: &Arc<Self>,
        connection: &Connection,
        addresses: Vec<PciAddress>,
    ) -> Result<(), Error> {
        self.refresh_with(connection, Scope::Devices(addresses, Reread::Driver))
            .await
    }

    /// Publishes what the engine says of these devices (moving, stuck,
    /// owner) without reading the kernel.
    pub async fn refresh_states(
        self: &Arc<Self>,
        connection: &Connection,
        addresses: Vec<PciAddress>,
    ) -> Result<(), Error> {
        self.refresh_with(connection, Scope::States(addresses))
            .await
    }

    async fn refresh_with(
        self: &Arc<Self>,
        connection: &Connection,
        scope: Scope,
    ) -> Result<(), Error> {
        let _one_at_a_time = self.refreshing.lock().await;
        let engine = self.engine.clone();
        let errors = self
            .last_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let current = self.snapshot().clone();
        // The engine's states are bookkeeping, not kernel reads: no thread
        // for them (a move's first step waits on nothing else).
        let kernel_scope = match scope {
            Scope::States(addresses) => {
                let fresh = current.with_states(&engine, &addresses, &errors);
                return self.publish(connection, fresh).await;
            }
            Scope::WholeBus => None,
            Scope::Devices(addresses, what) => Some((addresses, what)),
        };
        let taking = tokio::task::spawn_blocking(move || match kernel_scope {
            None => Snapshot::take(&engine, &errors),
            Some((addresses, what)) => current.reread(&engine, &addresses, what, &errors),
        });
        let fresh = match tokio::time::timeout(SNAPSHOT_TIMEOUT, taking).await {
            Ok(joined) => {
                joined.map_err(|e| Error::Kernel(format!("snapshot task failed: {e}")))??
            }
            Err(_) => {
                warn!(
                    "reading the devices took over {SNAPSHOT_TIMEOUT:?}; keeping the last published state"
                );
                return Ok(());
            }
        };
        self.publish(connection, fresh).await
    }

    /// Makes `fresh` the published view and announces what changed.
    async fn publish(
        self: &Arc<Self>,
        connection: &Connection,
        fresh: Snapshot,
    ) -> Result<(), Error> {
        let old = std::mem::replace(
            &mut *self.published.write().unwrap_or_else(|e| e.into_inner()),
            fresh.clone(),
        );
        self.publish_changes(connection, &old, &fresh).await
    }

    async fn publish_changes(
        self: &Arc<Self>,
        connection: &Connection,
        old: &Snapshot,
        fresh: &Snapshot,
    ) -> Result<(), Error> {
        let server = connection.object_server();
        for (address, props) in &fresh.devices {
            let path = device_object_path(address);
            match old.devices.get(address) {
                Some(before) if before == props => {}
                Some(before) => {
                    emit_changes(connection, &path, DEVICE_INTERFACE, props.changes(before)).await?
                }
                None => {
                    server
                        .at(
                            &path,
                            DeviceObject(DeviceAt {
                                service: self.clone(),
                                address: *address,
                            }),
                        )
                        .await?;
                }
            }
        }
        for address in old
            .devices
            .keys()
            .filter(|a| !fresh.devices.contains_key(a))
        {
            server
                .remove::<DeviceObject<DeviceAt>, _>(&device_object_path(address))
                .await?;
        }
        for (name, props) in &fresh.profiles {
            let path = profile_object_path(name);
            match old.profiles.get(name) {
                Some(before) if before == props => {}
                Some(before) => {
                    emit_changes(connection, &path, PROFILE_INTERFACE, props.changes(before))
                        .await?;
                }
                None => {
                    server
                        .at(
                            &path,
                            ProfileObject(ProfileNamed {
                                service: self.clone(),
                                name: name.clone(),
                            }),
                        )
                        .await?;
                }
            }
        }
        for name in old
            .profiles
            .keys()
            .filter(|n| !fresh.profiles.contains_key(*n))
        {
            server
                .remove::<ProfileObject<ProfileNamed>, _>(&profile_object_path(name))
                .await?;
        }
        let mut manager_changes = HashMap::new();
        if !old.devices.keys().eq(fresh.devices.keys()) {
            let paths: Vec<OwnedObjectPath> =
                fresh.devices.keys().map(device_object_path).collect();
            manager_changes.insert("Devices", Variant::from(paths));
        }
        if !old.profiles.keys().eq(fresh.profiles.keys()) {
            let paths: Vec<OwnedObjectPath> = fresh
                .profiles
                .keys()
                .map(|n| profile_object_path(n))
                .collect();
            manager_changes.insert("Profiles", Variant::from(paths));
        }
        let manager = OwnedObjectPath::try_from(MANAGER_PATH).expect("valid path");
        emit_changes(connection, &manager, MANAGER_INTERFACE, manager_changes).await
    }

    /// Bind or Release from the bus: check the arguments, then the caller
    /// (the bouncer asks polkit about anyone but root), and only then plan
    /// and move: a caller it turns away gets no work done and hears only
    /// that.
    pub(crate) async fn move_request(
        self: &Arc<Self>,
        connection: &Connection,
        header: &Header<'_>,
        target: &str,
        direction: Direction,
        options: &HashMap<String, OwnedVariant>,
    ) -> Result<Vec<OwnedObjectPath>, Error> {
        tracing::debug!(target, %direction, "move requested");
        validate_target(target)?;
        let options = parse_move_options(options)?;
        let details = self.move_details(target, direction, &options);
        self.bouncer
            .authorize_move(connection, header, &details)
            .await?;
        let _slot = self.move_slots.acquire().await;
        self.announce_start(connection, target, direction);
        let job = self.start_move(connection, target, direction, options);
        let caller = header.sender().map(|s| s.to_owned());
        self.finish_move(connection, target, direction, job, caller.as_ref())
            .await
    }

    /// What polkit is told about a move: the profile, and the set the
    /// planner would complete, from the published view (no kernel read:
    /// the caller is not authorized yet).
    fn move_details(
        &self,
        target: &str,
        direction: Direction,
        options: &crate::plan::MoveOptions,
    ) -> MoveDetails {
        let config = self.engine.config();
        let devices: Vec<PciDevice> = self
            .snapshot()
            .devices
            .values()
            .filter_map(objects::as_pci_device)
            .collect();
        let set = crate::plan::resolve_target(&config, &devices, target)
            .map(|targets| crate::plan::complete_set(&devices, &targets).0)
            .unwrap_or_default();
        MoveDetails {
            profile: config
                .profile(target)
                .map(|_| target.to_owned())
                .unwrap_or_default(),
            devices: set,
            vm: options.vm.clone().unwrap_or_default(),
            direction: Some(direction),
        }
    }

    /// Runs one move off the event loop and narrates it on the bus.
    pub async fn transition(
        self: &Arc<Self>,
        connection: &Connection,
        target: &str,
        direction: Direction,
        options: crate::plan::MoveOptions,
    ) -> Result<Vec<OwnedObjectPath>, Error> {
        self.announce_start(connection, target, direction);
        let job = self.start_move(connection, target, direction, options);
        self.finish_move(connection, target, direction, job, None)
            .await
    }

    fn announce_start(
        self: &Arc<Self>,
        connection: &Connection,
        target: &str,
        direction: Direction,
    ) {
        let _ = self.narrator(connection).send(Narration::Started {
            target: target.to_string(),
            direction,
        });
    }

    /// The move on a blocking thread, its steps narrated as they start.
    fn start_move(
        self: &Arc<Self>,
        connection: &Connection,
        target: &str,
        direction: Direction,
        options: crate::plan::MoveOptions,
    ) -> JoinHandle<Result<Vec<PciAddress>, Error>> {
        let narrator = self.narrator(connection);
        let engine = self.engine.clone();
        let target = target.to_string();
        tokio::task::spawn_blocking(move || {
            let first = std::sync::atomic::AtomicBool::new(true);
            let progress = |device: &PciAddress, step: &str| {
                let _ = narrator.send(Narration::Progress {
                    target: target.clone(),
                    device: *device,
                    step: step.to_string(),
                    first: first.swap(false, std::sync::atomic::Ordering::Relaxed),
                });
            };
            engine.run(&target, direction, &options, &progress)
        })
    }

    /// Waits for the move, shows its outcome on the bus, then answers. The
    /// caller is first sent every property of each moved device, so that it
    /// needs no second round trip to show where they are.
    async fn finish_move(
        self: &Arc<Self>,
        connection: &Connection,
        target: &str,
        direction: Direction,
        job: JoinHandle<Result<Vec<PciAddress>, Error>>,
        caller: Option<&UniqueName<'static>>,
    ) -> Result<Vec<OwnedObjectPath>, Error> {
        let outcome = job.await.unwrap_or_else(|e| {
            Err(Error::Kernel(format!(
                "the move of {target} failed inside vfiod: {e}"
            )))
        });

        if self.engine.config().profile(target).is_some() {
            let mut errors = self.last_errors.lock().unwrap_or_else(|e| e.into_inner());
            match &outcome {
                Ok(_) => errors.remove(target),
                Err(e) => errors.insert(target.to_string(), e.to_signal_field()),
            };
        }
        // The moved devices' uevents refresh them too; reading their drivers
        // here means the reply never goes out before the bus shows the move.
        // A bind may have set a profile's reset_method too.
        let reread = if direction == Direction::Bind
            && self
                .engine
                .config()
                .profiles
                .values()
                .any(|p| p.reset_method.is_some())
        {
            Reread::Whole
        } else {
            Reread::Driver
        };
        let refreshed = match &outcome {
            Ok(devices) => {
                self.refresh_with(connection, Scope::Devices(devices.clone(), reread))
                    .await
            }
            Err(_) => self.refresh(connection).await,
        };
        if let Err(e) = refreshed {
            warn!(error = %e, "refresh after a move failed");
        }
        if let (Ok(devices), Some(caller)) = (&outcome, caller)
            && let Err(e) = self.tell_caller(connection, caller, devices).await
        {
            warn!(error = %e, caller = %caller, "the moved devices were not sent to the caller");
        }
        let error_field = outcome
            .as_ref()
            .err()
            .map(Error::to_signal_field)
            .unwrap_or_default();
        let (emitted, sent) = tokio::sync::oneshot::channel();
        let _ = self.narrator(connection).send(Narration::Finished {
            target: target.to_string(),
            direction,
            error: error_field,
            emitted,
        });
        let _ = sent.await;
        tracing::debug!(target, %direction, "move answered");
        outcome.map(|devices| devices.iter().map(device_object_path).collect())
    }

    /// A PropertiesChanged with every property of each device, sent to
    /// `caller` alone: what a GetAll would answer, without the round trip.
    async fn tell_caller(
        &self,
        connection: &Connection,
        caller: &UniqueName<'static>,
        devices: &[PciAddress],
    ) -> Result<(), Error> {
        let told: Vec<_> = {
            let snapshot = self.snapshot();
            devices
                .iter()
                .filter_map(|a| Some((device_object_path(a), snapshot.devices.get(a)?.all())))
                .collect()
        };
        for (path, properties) in told {
            emit_properties(
                connection,
                &path,
                DEVICE_INTERFACE,
                properties,
                Some(caller),
            )
            .await?;
        }
        Ok(())
    }

    /// The doctor's findings; a caller who may not move devices is not
    /// told other users' processes nor libvirt's root-only domain names.
    pub async fn check(
        &self,
        connection: &Connection,
        header: &Header<'_>,
        target: &str,
    ) -> Result<Vec<(String, String, String)>, Error> {
        if !target.is_empty() {
            validate_target(target)?;
        }
        let told = match self.bouncer.may_move(connection, header).await {
            true => doctor::Disclosure::Full,
            false => doctor::Disclosure::Redacted,
        };
        let _slot = self.check_slots.acquire().await;
        let engine = self.engine.clone();
        let target = target.to_string();
        let findings = tokio::task::spawn_blocking(move || doctor::check(&engine, &target, told))
            .await
            .map_err(|e| Error::Kernel(format!("the check failed inside vfiod: {e}")))??;
        Ok(findings
            .into_iter()
            .map(|f| (f.id, f.severity.to_string(), f.message))
            .collect())
    }
}

async fn emit_changes(
    connection: &Connection,
    path: &OwnedObjectPath,
    interface: &'static str,
    changed: HashMap<&'static str, Variant<'static>>,
) -> Result<(), Error> {
    if changed.is_empty() {
        return Ok(());
    }
    emit_properties(connection, path, interface, changed, None).await
}

/// PropertiesChanged to every listener, or to `destination` alone.
async fn emit_properties(
    connection: &Connection,
    path: &OwnedObjectPath,
    interface: &'static str,
    changed: HashMap<&'static str, Variant<'static>>,
    destination: Option<&UniqueName<'static>>,
) -> Result<(), Error> {
    let mut emitter = SignalEmitter::new(connection, path.clone())?;
    if let Some(destination) = destination {
        emitter = emitter.set_destination(destination.clone().into());
    }
    let interface = InterfaceName::from_static_str_unchecked(interface);
    zbus::fdo::Properties::properties_changed(&emitter, interface, changed, Cow::Borrowed(&[]))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests;
