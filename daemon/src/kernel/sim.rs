//! The simulated kernel: the real kernel's PCI semantics (DESIGN §2) played
//! on a machine file (DESIGN §7), for `vfiod --machine` and for tests.
//!
//! The machine file is the machine at boot. What changes afterwards (bound
//! drivers, `driver_override`, devices that left the bus, loaded modules,
//! processes holding device nodes) is the running state: kept in memory and
//! written atomically to `STATE_DIR/sim-state.json` after every change, so
//! it outlives vfiod (even `kill -9`) as a real kernel would. The state
//! carries a fingerprint of the machine file; another file boots a fresh
//! machine. A state file that cannot be understood (damaged, or written by
//! another version) is set aside as `sim-state.json.corrupt` and the machine
//! boots fresh, with a warning.
//!
//! Beyond [`Kernel`], [`SimKernel`] has a control surface for changes made
//! behind vfiod's back (an admin's shell script, a desktop opening a node, a
//! hot-unplug): [`SimKernel::set_driver`], [`SimKernel::add_holder`],
//! [`SimKernel::remove_holder`], [`SimKernel::remove_device`],
//! [`SimKernel::restore_device`]. They are persisted and announced with
//! uevents like any other change.
//!
//! Where the real kernel blocks, so does the simulator, without holding its
//! lock: `unbind = "hang"` never returns, and an unbind whose driver waits
//! for the device's users (a "waiting unbind") blocks until they let go.
//! Which drivers wait follows the real 6.1 kernel, as the real-kernel lane
//! sees it: vfio-pci while a process holds the group's `/dev/vfio/N` (it
//! relays a device request and waits), a sound driver (`snd_*`) while a
//! process holds one of the card's nodes (`snd_card_free` waits for every
//! open file). DRM drivers do not wait (bochs-drm unbinds at once with
//! `/dev/dri/card1` held: `drm_dev_unplug`). As on the real kernel, the
//! `driver` link goes at once, before the driver's remove runs; the device
//! lock stays taken, so reading or writing `driver_override`,
//! `drivers_probe` and another unbind of that device block meanwhile; the
//! `unbind` uevent comes when the removal ends. The pending removal is part
//! of the running state: it survives the writer being killed, and ends when
//! [`SimKernel::remove_holder`] takes the last hold away, whoever calls it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use nix::libc;
use serde::{Deserialize, Serialize};
use vfiod_pci::machine::{
    DeviceEntry, Faults, IommuKind, MachineError, MachineFile, ProbeFault, UnbindFault, VanishFault,
};
use vfiod_pci::{Holder, PciAddress, PciClass, PciDevice, PciId, UsbDevice};

use super::host::HostView;
use super::{Kernel, KernelError, KernelResult, Uevent, UeventAction, VFIO_DRIVER, VFIO_MODULE};

mod host;

/// The running state's file name inside the state dir.
pub const STATE_FILE: &str = "sim-state.json";
/// Bumped whenever [`RunningState`] changes shape; an older file boots fresh.
const STATE_FORMAT: u32 = 2;
/// Loading vfio_pci pulls these in (module dependencies).
const VFIO_DEPENDENCIES: [&str; 2] = ["vfio", "vfio_iommu_type1"];
/// The kernel refuses a `driver_override` of PAGE_SIZE - 1 bytes or more.
const OVERRIDE_MAX_LEN: usize = 4094;

/// Why [`SimKernel::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The machine file is unreadable or invalid (names file, field, value).
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The state dir or the state file cannot be created, read or written.
    #[error("simulated kernel state {path}: cannot {op}: {source}")]
    State {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A PCI machine from a machine file, with the real kernel's semantics.
pub struct SimKernel {
    board: Board,
    state_file: PathBuf,
    inner: Mutex<Inner>,
    /// Woken after every change, for writers and readers that wait on one
    /// (a waiting unbind, and whatever needs the device lock it holds).
    changed: Condvar,
    /// Crash-point testing: the process kills itself (SIGKILL) right after
    /// this many more kernel writes have taken effect.
    crash_after_writes: Mutex<Option<u32>>,
}

struct Inner {
    state: RunningState,
    subscribers: Vec<Sender<Uevent>>,
}

impl fmt::Debug for SimKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimKernel")
            .field("machine", &self.board.machine.machine.description)
            .field("state_file", &self.state_file)
            .finish_non_exhaustive()
    }
}

impl SimKernel {
    /// Boots the machine in `machine_file`, or resumes it from the running
    /// state in `state_dir` (created if missing) when that state was left by
    /// the same machine file.
    pub fn open(machine_file: &Path, state_dir: &Path) -> Result<SimKernel, SimError> {
        // Read once and hash what was parsed, so an edit between two reads
        // cannot pair one file's state with another's devices.
        let text = std::fs::read_to_string(machine_file).map_err(|source| MachineError::Read {
            path: machine_file.to_path_buf(),
            source,
        })?;
        let machine = MachineFile::parse(&text, machine_file)?;
        Self::boot(machine, fingerprint(text.as_bytes()), state_dir)
    }

    /// Like [`SimKernel::open`] for a machine built in memory (tests); the
    /// fingerprint is taken over its TOML form.
    pub fn from_machine(machine: MachineFile, state_dir: &Path) -> Result<SimKernel, SimError> {
        let print = fingerprint(machine.to_toml().as_bytes());
        Self::boot(machine, print, state_dir)
    }

    fn boot(machine: MachineFile, print: String, state_dir: &Path) -> Result<SimKernel, SimError> {
        std::fs::create_dir_all(state_dir).map_err(|source| SimError::State {
            op: "create the directory",
            path: state_dir.to_path_buf(),
            source,
        })?;
        let board = Board::new(machine, print);
        let state_file = state_dir.join(STATE_FILE);
        let state = load_state(&state_file, &board)?;
        // Written at once: a fresh boot replaces a stale or damaged file, and
        // an unwritable state dir fails here rather than at the first bind.
        write_state(&state_file, &state).map_err(|source| SimError::State {
            op: "write",
            path: state_file.clone(),
            source,
        })?;
        Ok(SimKernel {
            board,
            state_file,
            inner: Mutex::new(Inner {
                state,
                subscribers: Vec::new(),
            }),
            changed: Condvar::new(),
            crash_after_writes: Mutex::new(None),
        })
    }

    /// The machine file as loaded (the machine at boot).
    pub fn machine(&self) -> &MachineFile {
        &self.board.machine
    }

    /// Where the running state is persisted.
    pub fn state_file(&self) -> &Path {
        &self.state_file
    }

    /// A channel that receives every later bind, unbind, add and remove.
    pub fn subscribe(&self) -> Receiver<Uevent> {
        let (tx, rx) = mpsc::channel();
        self.lock().subscribers.push(tx);
        rx
    }

    /// What `VFIO_GROUP_GET_STATUS` reports: `/dev/vfio/N` exists and every
    /// endpoint of the group is on vfio-pci or has no driver (bridges may
    /// stay on theirs).
    pub fn group_viable(&self, group: u32) -> bool {
        let inner = self.lock();
        let state = &inner.state;
        state.group_node_exists(&self.board, group)
            && self
                .board
                .group_members(group)
                .filter(|entry| !entry.class.is_bridge())
                .all(|entry| match state.present(&entry.address) {
                    Some(dev) => dev.driver.as_deref().is_none_or(|d| d == VFIO_DRIVER),
                    None => true,
                })
    }

    /// Binds `driver` (unbinding the current one first) or, with `None`,
    /// unbinds: what someone writing to sysfs by hand would do. Faults do not
    /// apply, nor does a driver's wait for its users (the unbind is at once); a driver vfiod has not seen is registered as if its module had
    /// been loaded. vfio-pci still needs an IOMMU, its module and an endpoint.
    pub fn set_driver(&self, address: &PciAddress, driver: Option<&str>) -> KernelResult<()> {
        // Writing `bind` or `unbind` takes the device lock: it waits for a
        // pending removal to end.
        let inner = self.lock();
        let mut inner = self.wait_for_device(inner, address);
        self.commit(&mut inner, |board, state, events| {
            let entry = board.entry(address)?;
            let current = state
                .present(address)
                .ok_or(KernelError::NoDevice(*address))?;
            if current.driver.as_deref() == driver {
                return Ok(());
            }
            if let Some(driver) = driver {
                if driver == VFIO_DRIVER {
                    state.load_module(board, VFIO_MODULE)?;
                    if !board.iommu_enabled() || is_pci_bridge(entry.class) {
                        return Err(os_error("write", bind_path(driver), libc::EINVAL));
                    }
                } else if !state.registered(board, driver) {
                    state.extra_drivers.insert(driver.to_owned());
                }
            }
            state.unbind_device(address, events);
            if let Some(driver) = driver {
                state.bind_device(address, driver, events);
            }
            Ok(())
        })
    }

    /// A process opens a device node (any node, `/dev/vfio/N` included).
    pub fn add_holder(&self, holder: Holder) -> KernelResult<()> {
        if !holder.node.is_absolute() {
            return Err(KernelError::Malformed {
                path: holder.node.display().to_string(),
                reason: "a device node is an absolute path".into(),
            });
        }
        self.transact(|_, state, _| {
            if !state.holders.contains(&holder) {
                state.holders.push(holder);
            }
            Ok(())
        })
    }

    /// The process `pid` closes every node it held (whether the machine
    /// file or [`SimKernel::add_holder`] put it there). Returns how many
    /// holds it let go. A waiting unbind that no longer waits for anyone
    /// ends here (its `unbind` uevent, its writer released), also when that
    /// writer is gone: a `SimKernel` opened on the state file of a killed
    /// vfiod ends it just the same.
    pub fn remove_holder(&self, pid: u32) -> KernelResult<usize> {
        self.transact(|_, state, _| {
            let before = state.holders.len();
            state.holders.retain(|h| h.pid != pid);
            Ok(before - state.holders.len())
        })
    }

    /// Hot-unplug (`echo 1 > remove`): the device and everything behind it
    /// leave the bus, each unbound first.
    pub fn remove_device(&self, address: &PciAddress) -> KernelResult<()> {
        self.transact(|board, state, events| {
            board.entry(address)?;
            if state.present(address).is_none() {
                return Err(KernelError::NoDevice(*address));
            }
            state.remove_subtree(board, address, events);
            Ok(())
        })
    }

    /// Rescan: the device comes back with its upstream bridges and whatever
    /// sits behind it; each new device is announced and probed as at boot
    /// (no override). A device already present stays as it is.
    pub fn restore_device(&self, address: &PciAddress) -> KernelResult<()> {
        self.transact(|board, state, events| {
            board.entry(address)?;
            let mut ancestors = board.ancestors(address);
            ancestors.reverse();
            for at in ancestors.into_iter().chain(board.subtree(address)) {
                state.add_device(board, &at, events);
            }
            Ok(())
        })
    }

    /// Waits, without holding the lock, until nothing holds the device
    /// lock of `address` (a waiting unbind); returns with the lock.
    fn wait_for_device<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
        address: &PciAddress,
    ) -> MutexGuard<'a, Inner> {
        while inner.state.device_locked(address) {
            inner = self
                .changed
                .wait(inner)
                .unwrap_or_else(PoisonError::into_inner);
        }
        inner
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change is committed whole (see `commit`), so a panic in
        // another thread cannot have left the state half-written.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn transact<R>(
        &self,
        change: impl FnOnce(&Board, &mut RunningState, &mut Vec<Uevent>) -> KernelResult<R>,
    ) -> KernelResult<R> {
        let mut inner = self.lock();
        self.commit(&mut inner, change)
    }

    /// Applies `change` to a copy of the state; persists and adopts the copy
    /// only if that succeeds, then announces the uevents. A failed change,
    /// or a failed write of the state file, changes nothing.
    fn commit<R>(
        &self,
        inner: &mut Inner,
        change: impl FnOnce(&Board, &mut RunningState, &mut Vec<Uevent>) -> KernelResult<R>,
    ) -> KernelResult<R> {
        let mut next = inner.state.clone();
        let mut events = Vec::new();
        let outcome = change(&self.board, &mut next, &mut events)?;
        // A change of holders can end a waiting unbind, whoever made it.
        next.finish_removals(&self.board, &mut events);
        if next != inner.state {
            write_state(&self.state_file, &next).map_err(|source| {
                KernelError::io("write", self.state_file.display().to_string(), source)
            })?;
            inner.state = next;
            self.changed.notify_all();
        }
        inner.announce(&events);
        Ok(outcome)
    }
}

impl Inner {
    fn announce(&mut self, events: &[Uevent]) {
        if events.is_empty() {
            return;
        }
        // A receiver that was dropped is gone for good: forget its sender.
        self.subscribers
            .retain(|tx| events.iter().all(|event| tx.send(event.clone()).is_ok()));
    }
}

impl Kernel for SimKernel {
    fn devices(&self) -> KernelResult<Vec<PciDevice>> {
        let inner = self.lock();
        Ok(self
            .board
            .entries()
            .filter_map(|entry| inner.state.pci_device(entry))
            .collect())
    }

    fn ids(&self) -> KernelResult<Vec<(PciAddress, PciId)>> {
        Ok(self
            .devices()?
            .into_iter()
            .map(|d| (d.address, d.id))
            .collect())
    }

    fn device(&self, address: &PciAddress) -> KernelResult<Option<PciDevice>> {
        let inner = self.lock();
        Ok(self
            .board
            .entry(address)
            .ok()
            .and_then(|entry| inner.state.pci_device(entry)))
    }

    fn group_members(&self, group: u32) -> KernelResult<Vec<PciAddress>> {
        Ok(self
            .devices()?
            .into_iter()
            .filter(|d| d.iommu_group == Some(group))
            .map(|d| d.address)
            .collect())
    }

    fn driver(&self, address: &PciAddress) -> KernelResult<Option<String>> {
        let inner = self.lock();
        let dev = inner
            .state
            .present(address)
            .ok_or(KernelError::NoDevice(*address))?;
        Ok(dev.driver.clone())
    }

    fn driver_override(&self, address: &PciAddress) -> KernelResult<Option<String>> {
        // Reading it takes the device lock: it waits for a pending removal.
        let inner = self.lock();
        let inner = self.wait_for_device(inner, address);
        let dev = inner
            .state
            .present(address)
            .ok_or(KernelError::NoDevice(*address))?;
        Ok(dev.driver_override.clone())
    }

    fn iommu_enabled(&self) -> KernelResult<bool> {
        Ok(self.board.iommu_enabled())
    }

    fn driver_registered(&self, driver: &str) -> bool {
        let inner = self.lock();
        let wanted = module_key(driver);
        inner
            .state
            .registered_drivers(&self.board)
            .any(|name| module_key(name) == wanted)
    }

    fn module_available(&self, module: &str) -> bool {
        let module = module_key(module);
        self.lock().state.modules.contains(&module) || !self.board.missing_modules.contains(&module)
    }

    fn nodes(&self, address: &PciAddress) -> KernelResult<Vec<PathBuf>> {
        let inner = self.lock();
        if inner.state.present(address).is_none() {
            return Err(KernelError::NoDevice(*address));
        }
        Ok(self.board.entry(address)?.nodes.clone())
    }

    fn holders(&self, nodes: &[PathBuf]) -> KernelResult<Vec<Holder>> {
        let inner = self.lock();
        let mut holders: Vec<Holder> = inner
            .state
            .holders
            .iter()
            .filter(|h| nodes.contains(&h.node))
            .cloned()
            .collect();
        holders.sort();
        Ok(holders)
    }

    fn mounts_behind(&self, address: &PciAddress) -> KernelResult<Vec<String>> {
        let inner = self.lock();
        if inner.state.present(address).is_none() {
            return Err(KernelError::NoDevice(*address));
        }
        let mut mounts = Vec::new();
        for at in self.board.subtree(address) {
            if inner.state.present(&at).is_some() {
                mounts.extend(self.board.entry(&at)?.mounts.iter().cloned());
            }
        }
        Ok(mounts)
    }

    fn usb_behind(&self, address: &PciAddress) -> KernelResult<Vec<UsbDevice>> {
        Ok(self.present_entry(address)?.usb.clone())
    }

    fn console_on(&self, address: &PciAddress) -> KernelResult<bool> {
        Ok(self.present_entry(address)?.console)
    }

    fn vfio_group_node(&self, group: u32) -> Option<PathBuf> {
        self.lock()
            .state
            .group_node_exists(&self.board, group)
            .then(|| group_node(group))
    }

    fn vfio_device_nodes(&self, _address: &PciAddress) -> KernelResult<Vec<PathBuf>> {
        // Machine files (DESIGN §7) describe group nodes only.
        Ok(Vec::new())
    }

    fn vfio_group_open(&self, group: u32) -> Option<bool> {
        let node = group_node(group);
        Some(self.lock().state.holders.iter().any(|h| h.node == node))
    }

    fn boot_id(&self) -> KernelResult<String> {
        Ok(self.lock().state.boot_id.clone())
    }

    fn host(&self) -> KernelResult<HostView> {
        let loaded = self.lock().state.modules.clone();
        Ok(host::view(&self.board.machine, loaded))
    }

    fn load_module(&self, module: &str) -> KernelResult<()> {
        let result = self.transact(|board, state, _| state.load_module(board, module));
        self.count_write();
        result
    }

    fn set_driver_override(&self, address: &PciAddress, driver: Option<&str>) -> KernelResult<()> {
        // The kernel keeps what comes before the first newline; nothing
        // ("\n", which `None` stands for) clears the override.
        let value = driver
            .and_then(|d| d.split('\n').next())
            .filter(|d| !d.is_empty());
        if value.is_some_and(|d| d.len() > OVERRIDE_MAX_LEN) {
            return Err(os_error("write", override_path(address), libc::EINVAL));
        }
        let inner = self.lock();
        let mut inner = self.wait_for_device(inner, address);
        let result = self.commit(&mut inner, |_, state, _| {
            let dev = state
                .present_mut(address)
                .ok_or(KernelError::NoDevice(*address))?;
            dev.driver_override = value.map(str::to_owned);
            Ok(())
        });
        drop(inner);
        self.count_write();
        result
    }

    fn unbind(&self, address: &PciAddress, driver: &str) -> KernelResult<()> {
        let mut inner = self.lock();
        let state = &inner.state;
        let dev = state.present(address);
        if dev.is_some_and(|dev| dev.unbinding.as_deref() == Some(driver)) {
            // The driver still has the device, its removal pending: this
            // write waits for the device lock, then finds it unbound.
            let inner = self.wait_for_device(inner, address);
            drop(inner);
            self.count_write();
            return Ok(());
        }
        if dev.is_none_or(|dev| dev.driver.as_deref() != Some(driver)) {
            // No such driver directory, or the device is not bound to it.
            let errno = if state.registered(&self.board, driver) {
                libc::ENODEV
            } else {
                libc::ENOENT
            };
            return Err(os_error("write", unbind_path(driver), errno));
        }
        match faults(self.board.entry(address)?).unbind {
            Some(UnbindFault::Hang) => {
                drop(inner);
                hang_forever();
            }
            Some(UnbindFault::Busy) => {
                return Err(os_error("write", unbind_path(driver), libc::EBUSY));
            }
            None => {}
        }
        // The link goes at once; the removal ends in this same change when
        // the driver waits for nobody, else when the last holder lets go
        // (DESIGN §2), and this writer waits for it.
        let result = self.commit(&mut inner, |_, state, _| {
            state.start_removal(address, driver);
            Ok(())
        });
        if result.is_ok() {
            inner = self.wait_for_device(inner, address);
        }
        drop(inner);
        self.count_write();
        result
    }

    fn probe(&self, address: &PciAddress) -> KernelResult<()> {
        let inner = self.lock();
        let mut inner = self.wait_for_device(inner, address);
        let result = self.commit(&mut inner, |board, state, events| {
            if state.present(address).is_none() {
                return Err(os_error("write", probe_path(), libc::ENODEV));
            }
            state.probe_device(board, address, events);
            Ok(())
        });
        drop(inner);
        self.count_write();
        result
    }
}

impl SimKernel {
    /// Arms crash-point testing: after `writes` more kernel writes (each
    /// persisted first), the process dies by SIGKILL, as `kill -9` would
    /// kill it right after that step. `None` disarms.
    pub fn crash_after_writes(&self, writes: Option<u32>) {
        *self
            .crash_after_writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = writes;
    }

    fn count_write(&self) {
        let mut armed = self
            .crash_after_writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(left) = armed.as_mut() {
            *left = left.saturating_sub(1);
            if *left == 0 {
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    fn present_entry(&self, address: &PciAddress) -> KernelResult<&DeviceEntry> {
        if self.lock().state.present(address).is_none() {
            return Err(KernelError::NoDevice(*address));
        }
        self.board.entry(address)
    }
}

/// What never changes while the machine runs: the machine file and what
/// follows from it.
struct Board {
    machine: MachineFile,
    fingerprint: String,
    /// Position in `machine.devices`, in address order.
    index: BTreeMap<PciAddress, usize>,
    children: BTreeMap<PciAddress, Vec<PciAddress>>,
    /// Host drivers registered from boot on: each boot driver and each
    /// `host_driver`. vfio-pci comes with its module instead.
    boot_drivers: BTreeSet<String>,
    /// `[machine] missing`, as module keys.
    missing_modules: BTreeSet<String>,
}

impl Board {
    fn new(machine: MachineFile, fingerprint: String) -> Board {
        let index = machine
            .devices
            .iter()
            .enumerate()
            .map(|(i, entry)| (entry.address, i))
            .collect();
        let mut children: BTreeMap<PciAddress, Vec<PciAddress>> = BTreeMap::new();
        for entry in &machine.devices {
            if let Some(parent) = entry.parent {
                children.entry(parent).or_default().push(entry.address);
            }
        }
        for list in children.values_mut() {
            list.sort();
        }
        let boot_drivers = machine
            .devices
            .iter()
            .flat_map(|entry| [&entry.driver, &entry.host_driver])
            .flatten()
            .filter(|driver| *driver != VFIO_DRIVER)
            .cloned()
            .collect();
        let missing_modules = machine
            .machine
            .missing
            .iter()
            .map(|m| module_key(m))
            .collect();
        Board {
            machine,
            fingerprint,
            index,
            children,
            boot_drivers,
            missing_modules,
        }
    }

    fn entries(&self) -> impl Iterator<Item = &DeviceEntry> {
        self.index.values().map(|&i| &self.machine.devices[i])
    }

    fn entry(&self, address: &PciAddress) -> KernelResult<&DeviceEntry> {
        self.index
            .get(address)
            .map(|&i| &self.machine.devices[i])
            .ok_or(KernelError::NoDevice(*address))
    }

    fn group_members(&self, group: u32) -> impl Iterator<Item = &DeviceEntry> {
        self.entries()
            .filter(move |entry| entry.group == Some(group))
    }

    fn iommu_enabled(&self) -> bool {
        self.machine.machine.iommu != IommuKind::None
    }

    /// The upstream bridges, nearest first.
    fn ancestors(&self, address: &PciAddress) -> Vec<PciAddress> {
        let mut chain = Vec::new();
        let mut at = *address;
        // The machine file is checked for loops; the bound is belt and braces.
        while let Some(parent) = self.entry(&at).ok().and_then(|entry| entry.parent) {
            if chain.len() > self.index.len() {
                break;
            }
            chain.push(parent);
            at = parent;
        }
        chain
    }

    /// The device and everything behind it, each bridge before its children.
    fn subtree(&self, address: &PciAddress) -> Vec<PciAddress> {
        let mut order = vec![*address];
        let mut next = 0;
        while let Some(at) = order.get(next).copied() {
            next += 1;
            if let Some(kids) = self.children.get(&at) {
                // One parent per device and no loops (the machine file is
                // checked), so nothing is visited twice.
                order.extend_from_slice(kids);
            }
        }
        order
    }

    /// The driver `drivers_probe` picks without an override.
    fn natural_driver<'a>(&self, entry: &'a DeviceEntry) -> Option<&'a str> {
        entry.host_driver.as_deref().or(entry.driver.as_deref())
    }

    /// The running state of a machine just booted.
    fn boot_state(&self) -> RunningState {
        let devices = self
            .entries()
            .map(|entry| {
                let state = DeviceState {
                    present: true,
                    driver: entry.driver.clone(),
                    driver_override: None,
                    unbinding: None,
                };
                (entry.address, state)
            })
            .collect();
        let mut modules: BTreeSet<String> = self
            .machine
            .machine
            .modules
            .iter()
            .map(|m| module_key(m))
            .collect();
        // A device bound to vfio-pci at boot means the module is in.
        if self
            .entries()
            .any(|entry| entry.driver.as_deref() == Some(VFIO_DRIVER))
        {
            modules.insert(VFIO_MODULE.to_owned());
        }
        if modules.contains(VFIO_MODULE) {
            modules.extend(VFIO_DEPENDENCIES.map(String::from));
        }
        RunningState {
            format: STATE_FORMAT,
            boot_id: new_boot_id(),
            machine: self.fingerprint.clone(),
            devices,
            modules,
            extra_drivers: BTreeSet::new(),
            holders: self
                .entries()
                .flat_map(|entry| entry.holders.iter().cloned())
                .collect(),
        }
    }
}

/// The machine as it runs; this is what the state file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunningState {
    format: u32,
    /// Changes with every fresh boot, like /proc/sys/kernel/random/boot_id.
    boot_id: String,
    /// Fingerprint of the machine file this state belongs to.
    machine: String,
    devices: BTreeMap<PciAddress, DeviceState>,
    /// Loaded modules, as module keys (`vfio_pci`).
    modules: BTreeSet<String>,
    /// Drivers bound by hand ([`SimKernel::set_driver`]) that no device had
    /// at boot.
    extra_drivers: BTreeSet<String>,
    /// Processes holding device nodes open.
    holders: Vec<Holder>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceState {
    present: bool,
    /// The `driver` link: `None` from the moment an unbind starts.
    driver: Option<String>,
    driver_override: Option<String>,
    /// A waiting unbind: the driver whose removal has started (its link is
    /// gone) and not ended, because a process still holds what it waits
    /// for. The device lock is taken meanwhile. Absent from the file when
    /// none is pending, so a state written before waiting unbinds existed
    /// still loads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unbinding: Option<String>,
}

impl RunningState {
    fn present(&self, address: &PciAddress) -> Option<&DeviceState> {
        self.devices.get(address).filter(|dev| dev.present)
    }

    fn present_mut(&mut self, address: &PciAddress) -> Option<&mut DeviceState> {
        self.devices.get_mut(address).filter(|dev| dev.present)
    }

    fn pci_device(&self, entry: &DeviceEntry) -> Option<PciDevice> {
        let dev = self.present(&entry.address)?;
        Some(PciDevice {
            address: entry.address,
            id: entry.id,
            subsystem: entry.subsystem,
            class: entry.class,
            name: entry.name.clone(),
            driver: dev.driver.clone(),
            iommu_group: entry.group,
            parent: entry.parent,
            boot_vga: entry.boot_vga,
            reset_methods: entry.reset.clone(),
        })
    }

    fn vfio_loaded(&self) -> bool {
        self.modules.contains(VFIO_MODULE)
    }

    fn registered_drivers<'a>(&'a self, board: &'a Board) -> impl Iterator<Item = &'a str> {
        board
            .boot_drivers
            .iter()
            .chain(&self.extra_drivers)
            .map(String::as_str)
            .chain(self.vfio_loaded().then_some(VFIO_DRIVER))
    }

    /// Whether `/sys/bus/pci/drivers/DRIVER` exists (exact name).
    fn registered(&self, board: &Board, driver: &str) -> bool {
        self.registered_drivers(board).any(|name| name == driver)
    }

    /// `/dev/vfio/N` lives while a member is on vfio-pci, its removal
    /// from vfio-pci still pending included.
    fn group_node_exists(&self, board: &Board, group: u32) -> bool {
        board.group_members(group).any(|entry| {
            self.present(&entry.address).is_some_and(|dev| {
                dev.driver.as_deref() == Some(VFIO_DRIVER)
                    || dev.unbinding.as_deref() == Some(VFIO_DRIVER)
            })
        })
    }

    /// Whether the device lock is taken: a removal has started and not
    /// ended.
    fn device_locked(&self, address: &PciAddress) -> bool {
        self.present(address)
            .is_some_and(|dev| dev.unbinding.is_some())
    }

    /// Whether removing `driver` from the device has to wait now for a
    /// process to let go (see the module documentation).
    fn removal_waits(&self, entry: &DeviceEntry, driver: &str) -> bool {
        if driver == VFIO_DRIVER {
            // vfio-pci relays a device request to the group's user and
            // waits until it lets go (DESIGN §2: QEMU holding /dev/vfio/N).
            entry
                .group
                .is_some_and(|group| self.holders.iter().any(|h| h.node == group_node(group)))
        } else if is_sound_driver(driver) {
            // snd_card_free waits for every open file of the card.
            self.holders.iter().any(|h| entry.nodes.contains(&h.node))
        } else {
            false
        }
    }

    /// An unbind starts: the `driver` link goes at once, the removal ends
    /// in [`RunningState::finish_removals`].
    fn start_removal(&mut self, address: &PciAddress, driver: &str) {
        if let Some(dev) = self.present_mut(address) {
            dev.driver = None;
            dev.unbinding = Some(driver.to_owned());
        }
    }

    /// Ends every removal that no longer waits for anyone: announced with
    /// its `unbind` uevent; a device that vanishes once unbound goes.
    fn finish_removals(&mut self, board: &Board, events: &mut Vec<Uevent>) {
        let done: Vec<(PciAddress, String)> = self
            .devices
            .iter()
            .filter(|(_, dev)| dev.present)
            .filter_map(|(address, dev)| Some((*address, dev.unbinding.clone()?)))
            .filter(|(address, driver)| {
                board
                    .entry(address)
                    .is_ok_and(|entry| !self.removal_waits(entry, driver))
            })
            .collect();
        for (address, driver) in done {
            if let Some(dev) = self.present_mut(&address) {
                dev.unbinding = None;
            }
            events.push(uevent(UeventAction::Unbind, &address, Some(&driver)));
            if board
                .entry(&address)
                .is_ok_and(|entry| faults(entry).vanish == Some(VanishFault::Unbind))
            {
                self.remove_subtree(board, &address, events);
            }
        }
    }

    fn load_module(&mut self, board: &Board, module: &str) -> KernelResult<()> {
        let key = module_key(module);
        if self.modules.contains(&key) {
            return Ok(());
        }
        if board.missing_modules.contains(&key) {
            let kernel = match board.machine.machine.kernel.as_str() {
                "" => "(unknown kernel)",
                kernel => kernel,
            };
            return Err(KernelError::Module {
                module: module.to_owned(),
                reason: format!("Module {key} not found in directory /lib/modules/{kernel}"),
            });
        }
        if key == VFIO_MODULE {
            self.modules.extend(VFIO_DEPENDENCIES.map(String::from));
        }
        self.modules.insert(key);
        Ok(())
    }

    /// The driver `drivers_probe` would bind now, if any.
    fn driver_that_binds(
        &self,
        board: &Board,
        entry: &DeviceEntry,
        driver_override: Option<&str>,
    ) -> Option<String> {
        let natural = board.natural_driver(entry);
        let candidate = driver_override.or(natural)?;
        let faults = faults(entry);
        // "The host driver will not come back", however it is asked to.
        let refused_again = faults.reprobe == Some(ProbeFault::Fail)
            && Some(candidate) == natural
            && (driver_override.is_none() || candidate != VFIO_DRIVER);
        let binds = if candidate == VFIO_DRIVER {
            // vfio-pci's probe: -ENODEV without its module, -EINVAL without an
            // IOMMU group or for a bridge (not a normal header).
            self.vfio_loaded()
                && board.iommu_enabled()
                && !is_pci_bridge(entry.class)
                && faults.probe != Some(ProbeFault::Fail)
        } else {
            self.registered(board, candidate)
        };
        (binds && !refused_again).then(|| candidate.to_owned())
    }

    /// `drivers_probe` on a present device: silent when nothing binds.
    fn probe_device(&mut self, board: &Board, address: &PciAddress, events: &mut Vec<Uevent>) {
        let Ok(entry) = board.entry(address) else {
            return;
        };
        let Some(dev) = self.present(address) else {
            return;
        };
        if dev.driver.is_some() {
            return;
        }
        if let Some(driver) = self.driver_that_binds(board, entry, dev.driver_override.as_deref()) {
            self.bind_device(address, &driver, events);
        }
    }

    fn bind_device(&mut self, address: &PciAddress, driver: &str, events: &mut Vec<Uevent>) {
        if let Some(dev) = self.present_mut(address) {
            dev.driver = Some(driver.to_owned());
            events.push(uevent(UeventAction::Bind, address, Some(driver)));
        }
    }

    /// Unbinds at once; a pending removal ends with it (a hot-unplug).
    fn unbind_device(&mut self, address: &PciAddress, events: &mut Vec<Uevent>) {
        if let Some(dev) = self.present_mut(address)
            && let Some(old) = dev.driver.take().or_else(|| dev.unbinding.take())
        {
            events.push(uevent(UeventAction::Unbind, address, Some(&old)));
        }
    }

    /// The device and all behind it leave the bus, deepest first, each
    /// unbound before it goes; a device that comes back starts afresh.
    fn remove_subtree(&mut self, board: &Board, address: &PciAddress, events: &mut Vec<Uevent>) {
        for at in board.subtree(address).iter().rev() {
            self.unbind_device(at, events);
            if let Some(dev) = self.present_mut(at) {
                dev.present = false;
                dev.driver_override = None;
                events.push(uevent(UeventAction::Remove, at, None));
            }
        }
    }

    /// A device (re)appears on the bus and is probed as at boot.
    fn add_device(&mut self, board: &Board, address: &PciAddress, events: &mut Vec<Uevent>) {
        let Some(dev) = self.devices.get_mut(address) else {
            return;
        };
        if dev.present {
            return;
        }
        *dev = DeviceState {
            present: true,
            driver: None,
            driver_override: None,
            unbinding: None,
        };
        events.push(uevent(UeventAction::Add, address, None));
        self.probe_device(board, address, events);
    }

    /// Adopts a state read from disk for `board`: devices the machine file
    /// lists but the state lacks are as at boot; others are dropped.
    fn reconciled(mut self, board: &Board) -> RunningState {
        let mut boot = board.boot_state();
        for (address, dev) in &mut boot.devices {
            if let Some(saved) = self.devices.remove(address) {
                *dev = saved;
            }
        }
        self.devices = boot.devices;
        // A removal whose holders let go while nothing ran ends now.
        self.finish_removals(board, &mut Vec::new());
        self
    }
}

/// Reads the running state, or boots fresh when there is none that fits.
fn load_state(path: &Path, board: &Board) -> Result<RunningState, SimError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(board.boot_state()),
        Err(source) => {
            return Err(SimError::State {
                op: "read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let problem = match serde_json::from_slice::<RunningState>(&bytes) {
        Ok(state) if state.format == STATE_FORMAT && state.machine == board.fingerprint => {
            return Ok(state.reconciled(board));
        }
        Ok(state) if state.format == STATE_FORMAT => {
            tracing::info!(
                state = %path.display(),
                "the machine file changed since this state was written; booting the machine afresh"
            );
            return Ok(board.boot_state());
        }
        Ok(state) => format!(
            "state format {} (this vfiod writes {STATE_FORMAT})",
            state.format
        ),
        Err(e) => e.to_string(),
    };
    let aside = path.with_extension("json.corrupt");
    let kept = match std::fs::rename(path, &aside) {
        Ok(()) => format!("kept as {}", aside.display()),
        Err(e) => format!("could not keep it as {}: {e}", aside.display()),
    };
    tracing::warn!(
        state = %path.display(),
        "unreadable simulated kernel state ({problem}); booting the machine afresh, {kept}"
    );
    Ok(board.boot_state())
}

/// Writes the state beside its final name and renames it into place, so a
/// reader (or a restart after `kill -9`) sees the old state or the new one,
/// never half of one. No fsync: the file must outlive the process, not a
/// power cut (a real kernel's state would not survive one either).
fn write_state(path: &Path, state: &RunningState) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path)
}

/// A fresh boot id: random when the kernel offers one, else from the clock.
fn new_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|u| u.trim().to_owned())
        .unwrap_or_else(|_| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            format!("{:032x}", now.as_nanos() ^ u128::from(std::process::id()))
        })
}

/// FNV-1a over the machine file's bytes: stable across builds and Rust
/// versions, which `DefaultHasher` does not promise.
fn fingerprint(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("fnv1a64:{hash:016x}:{}", bytes.len())
}

/// Module names compare with `-` and `_` alike, as modprobe does.
fn module_key(name: &str) -> String {
    name.replace('-', "_")
}

fn faults(entry: &DeviceEntry) -> Faults {
    entry.fault.clone().unwrap_or_default()
}

/// ALSA's PCI drivers (`snd_hda_intel`, `snd_emu10k1`, ...): their remove
/// frees the card, which waits until every open file of it is closed.
fn is_sound_driver(driver: &str) -> bool {
    driver.starts_with("snd_") || driver.starts_with("snd-")
}

/// PCI-to-PCI and CardBus bridges: no normal header, so vfio-pci refuses them.
fn is_pci_bridge(class: PciClass) -> bool {
    matches!(class.0 >> 8, 0x0604 | 0x0607)
}

fn hang_forever() -> ! {
    loop {
        std::thread::park();
    }
}

fn uevent(action: UeventAction, address: &PciAddress, driver: Option<&str>) -> Uevent {
    Uevent {
        action,
        address: *address,
        driver: driver.map(str::to_owned),
    }
}

fn os_error(op: &'static str, path: String, errno: i32) -> KernelError {
    KernelError::io(op, path, io::Error::from_raw_os_error(errno))
}

fn group_node(group: u32) -> PathBuf {
    PathBuf::from(format!("/dev/vfio/{group}"))
}

fn unbind_path(driver: &str) -> String {
    format!("/sys/bus/pci/drivers/{driver}/unbind")
}

fn bind_path(driver: &str) -> String {
    format!("/sys/bus/pci/drivers/{driver}/bind")
}

fn probe_path() -> String {
    "/sys/bus/pci/drivers_probe".to_owned()
}

fn override_path(address: &PciAddress) -> String {
    format!("/sys/bus/pci/devices/{address}/driver_override")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    use super::*;

    const Z77: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../machines/z77-rx580.toml");
    /// Long enough for a write that was going to return to have returned.
    const BLOCKED: Duration = Duration::from_millis(200);

    /// A directory under $TMPDIR, removed when the test ends.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            let template = std::env::temp_dir().join("vfiod-sim-test-XXXXXX");
            TempDir(nix::unistd::mkdtemp(&template).expect("mkdtemp"))
        }

        fn state(&self) -> PathBuf {
            self.0.join("state")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    fn z77(dir: &TempDir) -> SimKernel {
        SimKernel::open(Path::new(Z77), &dir.state()).unwrap()
    }

    fn z77_machine() -> MachineFile {
        MachineFile::load(Path::new(Z77)).unwrap()
    }

    const GPU: &str = "0000:01:00.0";
    const AUDIO: &str = "0000:01:00.1";
    const ROOT_PORT: &str = "0000:00:01.0";
    /// An IOMMU and vfio-pci loaded at boot.
    const WITH_VFIO: &str = "iommu = \"intel\"\nmodules = [\"vfio_pci\"]";

    /// A root port with a GPU and its HDMI audio behind it. `machine` holds
    /// the `[machine]` keys besides `kernel`; `gpu` extra keys for the GPU
    /// (a `fault = {...}` line). Groups are left out when there is no IOMMU.
    fn gpu_machine(machine: &str, gpu: &str) -> MachineFile {
        gpu_machine_booting_on("amdgpu", machine, gpu)
    }

    /// [`gpu_machine`] with the GPU bound to `boot_driver` at boot.
    fn gpu_machine_booting_on(boot_driver: &str, machine: &str, gpu: &str) -> MachineFile {
        let group = if machine.contains("iommu = \"none\"") {
            ""
        } else {
            "group = 1"
        };
        let text = format!(
            r#"
[machine]
kernel = "6.1.0-sim"
{machine}

[[device]]
address = "{ROOT_PORT}"
id = "8086:0151"
class = "0x060400"
driver = "pcieport"
{group}

# Listed before the GPU: devices() must still come out sorted.
[[device]]
address = "{AUDIO}"
parent = "{ROOT_PORT}"
id = "1002:aaf0"
class = "0x040300"
driver = "snd_hda_intel"
{group}

[[device]]
address = "{GPU}"
parent = "{ROOT_PORT}"
id = "1002:67df"
class = "0x030000"
driver = "{boot_driver}"
nodes = ["/dev/dri/card1"]
{group}
{gpu}
"#
        );
        MachineFile::parse(&text, Path::new("inline.toml")).unwrap()
    }

    fn sim(dir: &TempDir, machine: MachineFile) -> SimKernel {
        SimKernel::from_machine(machine, &dir.state()).unwrap()
    }

    /// The engine's bind, step by step (DESIGN §2).
    fn bind_vfio(kernel: &SimKernel, address: &PciAddress) -> KernelResult<()> {
        if !kernel.driver_registered(VFIO_DRIVER) {
            kernel.load_module(VFIO_MODULE)?;
        }
        kernel.set_driver_override(address, Some(VFIO_DRIVER))?;
        if let Some(driver) = kernel.driver(address)? {
            kernel.unbind(address, &driver)?;
        }
        kernel.probe(address)
    }

    /// The engine's release, step by step.
    fn release(kernel: &SimKernel, address: &PciAddress) -> KernelResult<()> {
        kernel.set_driver_override(address, None)?;
        if let Some(driver) = kernel.driver(address)? {
            kernel.unbind(address, &driver)?;
        }
        kernel.probe(address)
    }

    fn driver_of(kernel: &SimKernel, address: &str) -> Option<String> {
        kernel.driver(&addr(address)).unwrap()
    }

    fn errno(err: &KernelError) -> Option<i32> {
        match err {
            KernelError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    fn event(action: UeventAction, address: &str, driver: Option<&str>) -> Uevent {
        uevent(action, &addr(address), driver)
    }

    fn holder(pid: u32, comm: &str, node: &str) -> Holder {
        Holder {
            pid,
            comm: comm.into(),
            node: node.into(),
        }
    }

    #[test]
    fn z77_devices_are_the_machine_file_at_boot() {
        let dir = TempDir::new();
        let kernel = z77(&dir);
        let devices = kernel.devices().unwrap();
        assert_eq!(devices.len(), 23);
        assert!(devices.windows(2).all(|w| w[0].address < w[1].address));

        let gpu = kernel.device(&addr(GPU)).unwrap().unwrap();
        assert_eq!(gpu.id.to_string(), "1002:67df");
        assert_eq!(gpu.class.to_string(), "0x030000");
        assert_eq!(
            gpu.name,
            "Ellesmere [Radeon RX 470/480/570/570X/580/580X/590]"
        );
        assert_eq!(gpu.driver.as_deref(), Some("amdgpu"));
        assert_eq!(kernel.driver_override(&gpu.address).unwrap(), None);
        assert_eq!(gpu.iommu_group, Some(1));
        assert_eq!(gpu.parent, Some(addr(ROOT_PORT)));
        assert_eq!(gpu.reset_methods, ["bus"]);
        assert_eq!(
            kernel.nodes(&gpu.address).unwrap(),
            [
                PathBuf::from("/dev/dri/card1"),
                PathBuf::from("/dev/dri/renderD129")
            ]
        );
        assert!(!gpu.boot_vga);

        let boot_vga = kernel.device(&addr("06:00.0")).unwrap().unwrap();
        assert!(boot_vga.boot_vga);
        assert!(kernel.console_on(&addr("06:00.0")).unwrap());
        assert!(!kernel.console_on(&addr(GPU)).unwrap());
        let host_bridge = kernel.device(&addr("00:00.0")).unwrap().unwrap();
        assert_eq!(host_bridge.driver, None);
        assert!(host_bridge.is_bridge());

        assert!(kernel.iommu_enabled().unwrap());
        assert_eq!(kernel.device(&addr("09:00.0")).unwrap(), None);
        assert!(matches!(
            kernel.driver(&addr("09:00.0")),
            Err(KernelError::NoDevice(_))
        ));
        assert_eq!(kernel.machine().devices.len(), 23);
    }

    #[test]
    fn unset_override_reads_null_and_clearing_writes_newline() {
        let dir = TempDir::new();
        let kernel = z77(&dir);
        let gpu = addr(GPU);
        assert_eq!(kernel.driver_override(&gpu).unwrap(), None);

        kernel.set_driver_override(&gpu, Some(VFIO_DRIVER)).unwrap();
        assert_eq!(
            kernel.driver_override(&gpu).unwrap().as_deref(),
            Some(VFIO_DRIVER)
        );
        // Setting the override alone moves nothing.
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));

        kernel.set_driver_override(&gpu, None).unwrap();
        assert_eq!(kernel.driver_override(&gpu).unwrap(), None);

        // The kernel stops at the first newline; an empty value clears.
        kernel
            .set_driver_override(&gpu, Some("vfio-pci\n"))
            .unwrap();
        assert_eq!(
            kernel.driver_override(&gpu).unwrap().as_deref(),
            Some(VFIO_DRIVER)
        );
        kernel.set_driver_override(&gpu, Some("")).unwrap();
        assert_eq!(kernel.driver_override(&gpu).unwrap(), None);

        let too_long = "x".repeat(OVERRIDE_MAX_LEN + 1);
        let err = kernel
            .set_driver_override(&gpu, Some(&too_long))
            .unwrap_err();
        assert_eq!(errno(&err), Some(libc::EINVAL), "{err}");
        let err = kernel
            .set_driver_override(&addr("09:00.0"), Some(VFIO_DRIVER))
            .unwrap_err();
        assert!(matches!(err, KernelError::NoDevice(_)), "{err}");
    }

    #[test]
    fn z77_gpu_moves_to_vfio_and_back_and_the_group_becomes_viable_only_whole() {
        let dir = TempDir::new();
        let kernel = z77(&dir);
        let (gpu, audio) = (addr(GPU), addr(AUDIO));
        assert_eq!(kernel.vfio_group_node(1), None);
        assert!(!kernel.group_viable(1));

        bind_vfio(&kernel, &gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some(VFIO_DRIVER));
        // The node appears with the first device; the audio still on its host
        // driver keeps the group from being viable; the root port may stay.
        assert_eq!(
            kernel.vfio_group_node(1),
            Some(PathBuf::from("/dev/vfio/1"))
        );
        assert!(!kernel.group_viable(1));
        assert_eq!(driver_of(&kernel, ROOT_PORT).as_deref(), Some("pcieport"));

        bind_vfio(&kernel, &audio).unwrap();
        assert!(kernel.group_viable(1));
        assert_eq!(kernel.vfio_group_node(14), None);

        // A driverless endpoint does not spoil viability.
        kernel.set_driver(&audio, None).unwrap();
        assert!(kernel.group_viable(1));

        release(&kernel, &gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
        assert_eq!(kernel.driver_override(&gpu).unwrap(), None);
        assert_eq!(
            kernel.vfio_group_node(1),
            None,
            "no device of group 1 is on vfio-pci any more"
        );
        assert!(!kernel.group_viable(1));
        release(&kernel, &audio).unwrap();
        assert_eq!(driver_of(&kernel, AUDIO).as_deref(), Some("snd_hda_intel"));
    }

    #[test]
    fn unbind_from_a_driver_the_device_is_not_on_fails_like_sysfs() {
        let dir = TempDir::new();
        let kernel = z77(&dir);
        let gpu = addr(GPU);
        let err = kernel.unbind(&gpu, "radeon").unwrap_err();
        assert_eq!(errno(&err), Some(libc::ENODEV), "{err}");
        assert!(
            err.to_string()
                .contains("/sys/bus/pci/drivers/radeon/unbind"),
            "{err}"
        );
        let err = kernel.unbind(&gpu, "nouveau").unwrap_err();
        assert_eq!(
            errno(&err),
            Some(libc::ENOENT),
            "no such driver directory: {err}"
        );
        let err = kernel.unbind(&addr("09:00.0"), "amdgpu").unwrap_err();
        assert_eq!(errno(&err), Some(libc::ENODEV), "{err}");
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));

        kernel.unbind(&gpu, "amdgpu").unwrap();
        assert_eq!(driver_of(&kernel, GPU), None);
        let err = kernel.unbind(&gpu, "amdgpu").unwrap_err();
        assert_eq!(errno(&err), Some(libc::ENODEV), "{err}");
    }

    #[test]
    fn probe_binds_the_natural_driver_or_the_override_and_leaves_bound_devices_alone() {
        let dir = TempDir::new();
        let kernel = z77(&dir);
        let gpu = addr(GPU);
        let events = kernel.subscribe();

        // Already bound: nothing happens, whatever the override says.
        kernel.set_driver_override(&gpu, Some(VFIO_DRIVER)).unwrap();
        kernel.probe(&gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
        assert!(events.try_recv().is_err());

        // Any registered driver named by the override binds, and only it.
        kernel.unbind(&gpu, "amdgpu").unwrap();
        kernel.set_driver_override(&gpu, Some("radeon")).unwrap();
        kernel.probe(&gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("radeon"));
        kernel.unbind(&gpu, "radeon").unwrap();
        kernel.set_driver_override(&gpu, Some("nouveau")).unwrap();
        kernel.probe(&gpu).unwrap();
        assert_eq!(
            driver_of(&kernel, GPU),
            None,
            "nouveau is not registered: nothing binds"
        );

        kernel.set_driver_override(&gpu, None).unwrap();
        kernel.probe(&gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));

        let err = kernel.probe(&addr("09:00.0")).unwrap_err();
        assert_eq!(errno(&err), Some(libc::ENODEV), "{err}");
        assert!(
            err.to_string().contains("/sys/bus/pci/drivers_probe"),
            "{err}"
        );
    }

    #[test]
    fn vfio_pci_does_not_bind_without_an_iommu_and_probe_still_succeeds() {
        let dir = TempDir::new();
        let kernel = sim(
            &dir,
            gpu_machine("iommu = \"none\"\nmodules = [\"vfio_pci\"]", ""),
        );
        let gpu = addr(GPU);
        assert!(!kernel.iommu_enabled().unwrap());
        assert!(kernel.driver_registered(VFIO_DRIVER));
        assert_eq!(kernel.device(&gpu).unwrap().unwrap().iommu_group, None);

        bind_vfio(&kernel, &gpu).expect("drivers_probe succeeds even when nothing binds");
        assert_eq!(driver_of(&kernel, GPU), None);

        release(&kernel, &gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
    }

    #[test]
    fn probe_fail_keeps_vfio_pci_off_and_the_host_driver_returns() {
        let dir = TempDir::new();
        let kernel = sim(&dir, gpu_machine(WITH_VFIO, "fault = { probe = \"fail\" }"));
        let gpu = addr(GPU);
        bind_vfio(&kernel, &gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU), None);
        assert_eq!(kernel.vfio_group_node(1), None);
        // Every time, not once.
        kernel.probe(&gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU), None);

        release(&kernel, &gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
    }

    #[test]
    fn reprobe_fail_lets_vfio_pci_in_but_the_host_driver_never_back() {
        let dir = TempDir::new();
        let kernel = sim(
            &dir,
            gpu_machine(WITH_VFIO, "fault = { reprobe = \"fail\" }"),
        );
        let gpu = addr(GPU);
        bind_vfio(&kernel, &gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some(VFIO_DRIVER));

        release(&kernel, &gpu).unwrap();
        assert_eq!(
            driver_of(&kernel, GPU),
            None,
            "a failed release is a driverless device"
        );
        // Not by name either.
        kernel.set_driver_override(&gpu, Some("amdgpu")).unwrap();
        kernel.probe(&gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU), None);
        // vfio-pci still takes it.
        bind_vfio(&kernel, &gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some(VFIO_DRIVER));
    }

    #[test]
    fn a_hanging_unbind_never_returns_and_blocks_nothing_else() {
        let dir = TempDir::new();
        let kernel = Arc::new(sim(
            &dir,
            gpu_machine(WITH_VFIO, "fault = { unbind = \"hang\" }"),
        ));
        let gpu = addr(GPU);
        let writer = {
            let kernel = Arc::clone(&kernel);
            thread::spawn(move || kernel.unbind(&gpu, "amdgpu"))
        };
        thread::sleep(BLOCKED);
        assert!(
            !writer.is_finished(),
            "unbind returned despite unbind = \"hang\""
        );

        // Reads and other writes still answer meanwhile.
        assert_eq!(kernel.devices().unwrap().len(), 3);
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
        kernel.set_driver_override(&gpu, Some(VFIO_DRIVER)).unwrap();
        bind_vfio(&kernel, &addr(AUDIO)).unwrap();
        assert_eq!(driver_of(&kernel, AUDIO).as_deref(), Some(VFIO_DRIVER));
        assert!(!writer.is_finished());
        // The writer thread stays parked; the test binary exits past it.
    }

    #[test]
    fn a_busy_unbind_fails_with_ebusy_every_time() {
        let dir = TempDir::new();
        let kernel = sim(
            &dir,
            gpu_machine(WITH_VFIO, "fault = { unbind = \"busy\" }"),
        );
        let gpu = addr(GPU);
        for _ in 0..2 {
            let err = kernel.unbind(&gpu, "amdgpu").unwrap_err();
            assert!(err.is_busy(), "{err}");
            assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
        }
        let err = bind_vfio(&kernel, &gpu).unwrap_err();
        assert!(err.is_busy(), "{err}");
    }

    #[test]
    fn a_vanishing_device_leaves_the_bus_once_unbound_and_a_rescan_brings_it_back() {
        let dir = TempDir::new();
        let kernel = sim(
            &dir,
            gpu_machine(WITH_VFIO, "fault = { vanish = \"unbind\" }"),
        );
        let gpu = addr(GPU);
        let events = kernel.subscribe();
        kernel.set_driver_override(&gpu, Some(VFIO_DRIVER)).unwrap();
        kernel.unbind(&gpu, "amdgpu").unwrap();
        assert_eq!(
            events.try_iter().collect::<Vec<_>>(),
            [
                event(UeventAction::Unbind, GPU, Some("amdgpu")),
                event(UeventAction::Remove, GPU, None)
            ]
        );
        assert_eq!(kernel.device(&gpu).unwrap(), None);
        assert_eq!(kernel.devices().unwrap().len(), 2);
        assert!(matches!(kernel.driver(&gpu), Err(KernelError::NoDevice(_))));
        assert!(matches!(
            kernel.driver_override(&gpu),
            Err(KernelError::NoDevice(_))
        ));
        assert!(matches!(
            kernel.mounts_behind(&gpu),
            Err(KernelError::NoDevice(_))
        ));
        let err = kernel.probe(&gpu).unwrap_err();
        assert_eq!(errno(&err), Some(libc::ENODEV), "{err}");
        assert!(matches!(
            kernel.remove_device(&gpu),
            Err(KernelError::NoDevice(_))
        ));

        kernel.restore_device(&gpu).unwrap();
        assert_eq!(
            events.try_iter().collect::<Vec<_>>(),
            [
                event(UeventAction::Add, GPU, None),
                event(UeventAction::Bind, GPU, Some("amdgpu"))
            ]
        );
        assert_eq!(
            kernel.driver_override(&gpu).unwrap(),
            None,
            "a new device has no override"
        );
    }

    #[test]
    fn a_missing_vfio_module_cannot_be_loaded_and_nothing_binds() {
        let dir = TempDir::new();
        let kernel = sim(
            &dir,
            gpu_machine("iommu = \"intel\"\nmissing = [\"vfio-pci\"]", ""),
        );
        let gpu = addr(GPU);
        assert!(!kernel.driver_registered(VFIO_DRIVER));
        assert!(!kernel.module_available("vfio_pci"));
        assert!(!kernel.module_available("vfio-pci"));
        assert!(
            kernel.module_available("kvm"),
            "other modules load on demand"
        );

        let err = kernel.load_module("vfio-pci").unwrap_err();
        assert!(matches!(err, KernelError::Module { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("Module vfio_pci not found in directory /lib/modules/6.1.0-sim"),
            "{err}"
        );

        // Asked anyway: drivers_probe succeeds and the device stays driverless.
        kernel.set_driver_override(&gpu, Some(VFIO_DRIVER)).unwrap();
        kernel.unbind(&gpu, "amdgpu").unwrap();
        kernel.probe(&gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU), None);
    }

    #[test]
    fn vfio_pci_loads_on_demand_with_its_dependencies() {
        let dir = TempDir::new();
        let kernel = sim(&dir, gpu_machine("iommu = \"amd\"", ""));
        let gpu = addr(GPU);
        assert!(!kernel.driver_registered(VFIO_DRIVER));
        assert!(kernel.module_available(VFIO_MODULE));
        assert!(kernel.driver_registered("amdgpu") && kernel.driver_registered("snd-hda-intel"));

        // Before the module is in, the override finds no driver.
        kernel.set_driver_override(&gpu, Some(VFIO_DRIVER)).unwrap();
        kernel.unbind(&gpu, "amdgpu").unwrap();
        kernel.probe(&gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU), None);

        kernel.load_module("vfio-pci").unwrap();
        assert!(kernel.driver_registered(VFIO_DRIVER));
        assert!(
            kernel.driver_registered("vfio_pci"),
            "- and _ compare alike"
        );
        assert!(kernel.module_available("vfio_iommu_type1") && kernel.module_available("vfio"));
        kernel
            .load_module(VFIO_MODULE)
            .expect("loading twice is fine");
        kernel.probe(&gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some(VFIO_DRIVER));
    }

    #[test]
    fn a_device_that_boots_on_vfio_pci_returns_to_its_host_driver() {
        let dir = TempDir::new();
        let kernel = sim(
            &dir,
            gpu_machine_booting_on(VFIO_DRIVER, "iommu = \"intel\"", "host_driver = \"amdgpu\""),
        );
        let gpu = addr(GPU);
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some(VFIO_DRIVER));
        assert!(
            kernel.driver_registered(VFIO_DRIVER),
            "bound at boot, so loaded"
        );
        assert_eq!(
            kernel.vfio_group_node(1),
            Some(PathBuf::from("/dev/vfio/1"))
        );
        release(&kernel, &gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
        bind_vfio(&kernel, &gpu).unwrap();
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some(VFIO_DRIVER));
    }

    #[test]
    fn vfio_pci_never_binds_a_pci_bridge() {
        let dir = TempDir::new();
        let kernel = z77(&dir);
        let port = addr(ROOT_PORT);
        bind_vfio(&kernel, &port).unwrap();
        assert_eq!(driver_of(&kernel, ROOT_PORT), None);
        let err = kernel.set_driver(&port, Some(VFIO_DRIVER)).unwrap_err();
        assert_eq!(errno(&err), Some(libc::EINVAL), "{err}");
    }

    #[test]
    fn unbinding_vfio_pci_waits_while_a_process_holds_the_group() {
        let dir = TempDir::new();
        let kernel = Arc::new(z77(&dir));
        let events = kernel.subscribe();
        let gpu = addr(GPU);
        bind_vfio(&kernel, &gpu).unwrap();
        let qemu = holder(4242, "qemu-system-x86", "/dev/vfio/1");
        kernel.add_holder(qemu.clone()).unwrap();
        assert_eq!(
            kernel.holders(&[PathBuf::from("/dev/vfio/1")]).unwrap(),
            [qemu]
        );
        while events.try_recv().is_ok() {}

        let writer = {
            let kernel = Arc::clone(&kernel);
            thread::spawn(move || kernel.unbind(&gpu, VFIO_DRIVER))
        };
        thread::sleep(BLOCKED);
        assert!(
            !writer.is_finished(),
            "the unbind must wait for QEMU to let go"
        );
        // The link is gone before vfio-pci's remove runs; the group (and
        // its node) stay until the removal ends, and no uevent yet.
        assert_eq!(driver_of(&kernel, GPU), None);
        assert_eq!(
            kernel.vfio_group_node(1),
            Some(PathBuf::from("/dev/vfio/1"))
        );
        assert!(events.try_recv().is_err());

        assert_eq!(kernel.remove_holder(4242).unwrap(), 1);
        writer.join().unwrap().unwrap();
        assert_eq!(driver_of(&kernel, GPU), None);
        assert_eq!(
            events.try_recv().unwrap(),
            event(UeventAction::Unbind, GPU, Some(VFIO_DRIVER))
        );
    }

    /// The lane's machine: 01:00.1 is an HDA function on snd_hda_intel with
    /// ALSA nodes, 01:00.0 a display on bochs-drm with /dev/dri/card1.
    fn lane_machine() -> MachineFile {
        MachineFile::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../machines/qemu-q35.toml"
        )))
        .unwrap()
    }

    const LANE_GPU: &str = "0000:01:00.0";
    const LANE_AUDIO: &str = "0000:01:00.1";

    #[test]
    fn a_sound_driver_unbind_waits_for_the_cards_open_files_with_the_link_gone_at_once() {
        let dir = TempDir::new();
        let kernel = Arc::new(sim(&dir, lane_machine()));
        let events = kernel.subscribe();
        let audio = addr(LANE_AUDIO);
        kernel
            .add_holder(holder(700, "pipewire", "/dev/snd/controlC0"))
            .unwrap();
        kernel
            .add_holder(holder(701, "aplay", "/dev/snd/pcmC0D0p"))
            .unwrap();
        kernel.load_module(VFIO_MODULE).unwrap();
        kernel
            .set_driver_override(&audio, Some(VFIO_DRIVER))
            .unwrap();

        let writer = {
            let kernel = Arc::clone(&kernel);
            thread::spawn(move || kernel.unbind(&audio, "snd_hda_intel"))
        };
        thread::sleep(BLOCKED);
        assert!(!writer.is_finished(), "snd_card_free waits for the holders");
        assert_eq!(
            driver_of(&kernel, LANE_AUDIO),
            None,
            "the link goes at once"
        );
        assert!(events.try_recv().is_err(), "the uevent comes at the end");
        // The device lock is taken: driver_override reads block, and so do
        // drivers_probe and another unbind of the same device.
        let reader = {
            let kernel = Arc::clone(&kernel);
            thread::spawn(move || kernel.driver_override(&audio))
        };
        let prober = {
            let kernel = Arc::clone(&kernel);
            thread::spawn(move || kernel.probe(&audio))
        };
        thread::sleep(BLOCKED);
        assert!(
            !reader.is_finished(),
            "reading driver_override takes the device lock"
        );
        assert!(!prober.is_finished(), "drivers_probe takes the device lock");
        // Everything else answers.
        assert_eq!(driver_of(&kernel, LANE_GPU).as_deref(), Some("bochs-drm"));
        assert_eq!(
            kernel.devices().unwrap().len(),
            lane_machine().devices.len()
        );

        // One holder leaves: still waiting. The last one: done.
        assert_eq!(kernel.remove_holder(700).unwrap(), 1);
        thread::sleep(BLOCKED);
        assert!(!writer.is_finished());
        assert_eq!(kernel.remove_holder(701).unwrap(), 1);
        writer.join().unwrap().unwrap();
        assert_eq!(
            reader.join().unwrap().unwrap().as_deref(),
            Some(VFIO_DRIVER)
        );
        prober.join().unwrap().unwrap();
        assert_eq!(driver_of(&kernel, LANE_AUDIO).as_deref(), Some(VFIO_DRIVER));
        assert_eq!(
            events.try_recv().unwrap(),
            event(UeventAction::Unbind, LANE_AUDIO, Some("snd_hda_intel"))
        );
    }

    #[test]
    fn a_drm_driver_unbinds_at_once_with_its_card_held() {
        // bochs-drm on 6.1 (the lane's DeviceBusy/--force scenario).
        let dir = TempDir::new();
        let kernel = sim(&dir, lane_machine());
        let gpu = addr(LANE_GPU);
        kernel
            .add_holder(holder(700, "vfio-probe", "/dev/dri/card1"))
            .unwrap();
        bind_vfio(&kernel, &gpu).unwrap();
        assert_eq!(driver_of(&kernel, LANE_GPU).as_deref(), Some(VFIO_DRIVER));
    }

    /// The lane machine with the audio's control node held by pid 700 and,
    /// after `before`, an unbind of snd_hda_intel waiting on its own thread.
    fn audio_unbind_left_waiting(
        dir: &TempDir,
        before: impl FnOnce(&SimKernel),
    ) -> (Arc<SimKernel>, thread::JoinHandle<KernelResult<()>>) {
        let kernel = Arc::new(sim(dir, lane_machine()));
        kernel
            .add_holder(holder(700, "vfio-probe", "/dev/snd/controlC0"))
            .unwrap();
        before(&kernel);
        let writer = {
            let kernel = Arc::clone(&kernel);
            let audio = addr(LANE_AUDIO);
            thread::spawn(move || kernel.unbind(&audio, "snd_hda_intel"))
        };
        thread::sleep(BLOCKED);
        (kernel, writer)
    }

    #[test]
    fn a_waiting_unbind_outlives_its_killed_writer_and_ends_when_the_holder_goes() {
        let dir = TempDir::new();
        let audio = addr(LANE_AUDIO);
        {
            // The writer is "killed": its thread stays parked, the kernel
            // object is left behind and a new one reads the state file.
            let (kernel, _writer) = audio_unbind_left_waiting(&dir, |kernel| {
                kernel.load_module(VFIO_MODULE).unwrap();
                kernel
                    .set_driver_override(&audio, Some(VFIO_DRIVER))
                    .unwrap();
            });
            assert_eq!(driver_of(&kernel, LANE_AUDIO), None);
        }
        let kernel = Arc::new(sim(&dir, lane_machine()));
        assert_eq!(driver_of(&kernel, LANE_AUDIO), None, "still pending");
        let reader = {
            let kernel = Arc::clone(&kernel);
            thread::spawn(move || kernel.driver_override(&audio))
        };
        thread::sleep(BLOCKED);
        assert!(!reader.is_finished(), "the device lock is still taken");
        // A second unbind of the same driver waits too, then succeeds.
        let second = {
            let kernel = Arc::clone(&kernel);
            thread::spawn(move || kernel.unbind(&audio, "snd_hda_intel"))
        };
        thread::sleep(BLOCKED);
        assert!(!second.is_finished());

        let events = kernel.subscribe();
        assert_eq!(kernel.remove_holder(700).unwrap(), 1);
        second.join().unwrap().unwrap();
        assert_eq!(
            reader.join().unwrap().unwrap().as_deref(),
            Some(VFIO_DRIVER)
        );
        assert_eq!(
            events.try_recv().unwrap(),
            event(UeventAction::Unbind, LANE_AUDIO, Some("snd_hda_intel"))
        );
        // Nobody probed: the device is left without a driver, as the real
        // kernel leaves it when the writer was killed.
        assert_eq!(driver_of(&kernel, LANE_AUDIO), None);
        kernel.probe(&audio).unwrap();
        assert_eq!(driver_of(&kernel, LANE_AUDIO).as_deref(), Some(VFIO_DRIVER));
    }

    #[test]
    fn a_removal_whose_holder_left_while_nothing_ran_ends_at_the_next_start() {
        let dir = TempDir::new();
        let audio = addr(LANE_AUDIO);
        audio_unbind_left_waiting(&dir, |_| {});
        // Another process (a tool run while vfiod is down) lets go.
        {
            let kernel = sim(&dir, lane_machine());
            assert_eq!(kernel.remove_holder(700).unwrap(), 1);
            assert_eq!(kernel.driver_override(&audio).unwrap(), None);
        }
        let kernel = sim(&dir, lane_machine());
        assert_eq!(kernel.driver_override(&audio).unwrap(), None);
        assert_eq!(driver_of(&kernel, LANE_AUDIO), None);
        let text = std::fs::read_to_string(kernel.state_file()).unwrap();
        assert!(!text.contains("unbinding"), "{text}");
    }

    #[test]
    fn hot_unplug_ends_a_waiting_unbind() {
        let dir = TempDir::new();
        let audio = addr(LANE_AUDIO);
        let (kernel, writer) = audio_unbind_left_waiting(&dir, |_| {});
        assert!(!writer.is_finished());
        kernel.remove_device(&audio).unwrap();
        writer.join().unwrap().unwrap();
        assert!(kernel.device(&audio).unwrap().is_none());
        kernel.restore_device(&audio).unwrap();
        assert_eq!(
            driver_of(&kernel, LANE_AUDIO).as_deref(),
            Some("snd_hda_intel")
        );
    }

    #[test]
    fn holders_mounts_usb_and_console_come_from_the_machine_file_and_the_control_surface() {
        let dir = TempDir::new();
        let mut machine = z77_machine();
        // Storage behind a root port: its mounts count for the port too.
        let nic = machine
            .devices
            .iter_mut()
            .find(|d| d.address == addr("02:00.0"))
            .unwrap();
        nic.mounts = vec!["/srv".into()];
        let kernel = sim(&dir, machine);

        let card0 = PathBuf::from("/dev/dri/card0");
        let xorg = holder(912, "Xorg", "/dev/dri/card0");
        assert_eq!(
            kernel.holders(std::slice::from_ref(&card0)).unwrap(),
            [xorg]
        );
        assert_eq!(
            kernel.holders(&[PathBuf::from("/dev/dri/card1")]).unwrap(),
            []
        );

        let pipewire = holder(1300, "pipewire", "/dev/snd/controlC1");
        kernel.add_holder(pipewire.clone()).unwrap();
        kernel.add_holder(pipewire.clone()).unwrap();
        let audio_nodes = kernel.nodes(&addr(AUDIO)).unwrap();
        assert_eq!(kernel.holders(&audio_nodes).unwrap(), [pipewire]);
        assert_eq!(kernel.remove_holder(1300).unwrap(), 1);
        assert_eq!(kernel.holders(&audio_nodes).unwrap(), []);
        assert_eq!(
            kernel.remove_holder(912).unwrap(),
            1,
            "machine-file holders can leave too"
        );
        assert_eq!(kernel.holders(&[card0]).unwrap(), []);
        assert!(matches!(
            kernel.add_holder(holder(1, "x", "dev/null")),
            Err(KernelError::Malformed { .. })
        ));

        assert_eq!(
            kernel.mounts_behind(&addr("00:1f.2")).unwrap(),
            ["/", "/home"]
        );
        assert_eq!(kernel.mounts_behind(&addr("00:1c.2")).unwrap(), ["/srv"]);
        assert_eq!(
            kernel.mounts_behind(&addr("00:1c.4")).unwrap(),
            Vec::<String>::new()
        );

        let usb = kernel.usb_behind(&addr("00:14.0")).unwrap();
        assert_eq!(usb.len(), 2);
        assert!(usb.iter().all(UsbDevice::is_input));
        assert_eq!(
            kernel.usb_behind(&addr("03:00.0")).unwrap()[0].name,
            "USB hard disk"
        );
        assert_eq!(kernel.usb_behind(&addr(GPU)).unwrap(), []);
    }

    #[test]
    fn changes_behind_vfiods_back_are_announced() {
        let dir = TempDir::new();
        let kernel = z77(&dir);
        let events = kernel.subscribe();
        let audio = addr(AUDIO);

        kernel.set_driver(&audio, Some(VFIO_DRIVER)).unwrap();
        kernel.set_driver(&audio, Some(VFIO_DRIVER)).unwrap();
        kernel.set_driver(&audio, Some("pci-stub")).unwrap();
        assert!(kernel.driver_registered("pci-stub"));
        kernel.set_driver(&audio, None).unwrap();
        assert_eq!(
            events.try_iter().collect::<Vec<_>>(),
            [
                event(UeventAction::Unbind, AUDIO, Some("snd_hda_intel")),
                event(UeventAction::Bind, AUDIO, Some(VFIO_DRIVER)),
                event(UeventAction::Unbind, AUDIO, Some(VFIO_DRIVER)),
                event(UeventAction::Bind, AUDIO, Some("pci-stub")),
                event(UeventAction::Unbind, AUDIO, Some("pci-stub")),
            ]
        );

        // Unplugging a bridge takes everything behind it, deepest first.
        kernel.remove_device(&addr("00:1c.6")).unwrap();
        assert_eq!(
            events.try_iter().collect::<Vec<_>>(),
            [
                event(UeventAction::Unbind, "06:00.1", Some("snd_hda_intel")),
                event(UeventAction::Remove, "06:00.1", None),
                event(UeventAction::Unbind, "06:00.0", Some("radeon")),
                event(UeventAction::Remove, "06:00.0", None),
                event(UeventAction::Remove, "05:00.0", None),
                event(UeventAction::Remove, "04:00.0", None),
                event(UeventAction::Unbind, "00:1c.6", Some("pcieport")),
                event(UeventAction::Remove, "00:1c.6", None),
            ]
        );
        assert_eq!(kernel.devices().unwrap().len(), 18);

        // A rescan for the GPU brings back the bridges above it first.
        kernel.restore_device(&addr("06:00.0")).unwrap();
        assert_eq!(
            events.try_iter().collect::<Vec<_>>(),
            [
                event(UeventAction::Add, "00:1c.6", None),
                event(UeventAction::Bind, "00:1c.6", Some("pcieport")),
                event(UeventAction::Add, "04:00.0", None),
                event(UeventAction::Add, "05:00.0", None),
                event(UeventAction::Add, "06:00.0", None),
                event(UeventAction::Bind, "06:00.0", Some("radeon")),
            ]
        );
        kernel.restore_device(&addr("06:00.0")).unwrap();
        assert!(
            events.try_recv().is_err(),
            "restoring a present device changes nothing"
        );
        assert!(matches!(
            kernel.restore_device(&addr("09:00.0")),
            Err(KernelError::NoDevice(_))
        ));
    }

    #[test]
    fn uevents_reach_every_live_subscriber() {
        let dir = TempDir::new();
        let kernel = z77(&dir);
        let first = kernel.subscribe();
        let dropped = kernel.subscribe();
        drop(dropped);
        let second = kernel.subscribe();

        bind_vfio(&kernel, &addr(GPU)).unwrap();
        let expected = [
            event(UeventAction::Unbind, GPU, Some("amdgpu")),
            event(UeventAction::Bind, GPU, Some(VFIO_DRIVER)),
        ];
        assert_eq!(first.try_iter().collect::<Vec<_>>(), expected);
        assert_eq!(second.try_iter().collect::<Vec<_>>(), expected);
        assert_eq!(
            kernel.lock().subscribers.len(),
            2,
            "the dropped receiver is forgotten"
        );
    }

    #[test]
    fn the_running_state_survives_a_restart_even_without_drop() {
        let dir = TempDir::new();
        let kernel = z77(&dir);
        bind_vfio(&kernel, &addr(GPU)).unwrap();
        kernel
            .set_driver_override(&addr("03:00.0"), Some(VFIO_DRIVER))
            .unwrap();
        kernel
            .add_holder(holder(4242, "qemu-system-x86", "/dev/vfio/1"))
            .unwrap();
        kernel.remove_device(&addr("02:00.0")).unwrap();
        kernel
            .set_driver(&addr("00:1a.0"), Some("pci-stub"))
            .unwrap();
        let devices = kernel.devices().unwrap();
        // As after kill -9: no destructor runs.
        std::mem::forget(kernel);

        let kernel = z77(&dir);
        assert_eq!(kernel.devices().unwrap(), devices);
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some(VFIO_DRIVER));
        assert_eq!(
            kernel.vfio_group_node(1),
            Some(PathBuf::from("/dev/vfio/1"))
        );
        assert_eq!(
            kernel
                .holders(&[PathBuf::from("/dev/vfio/1")])
                .unwrap()
                .len(),
            1
        );
        assert_eq!(kernel.device(&addr("02:00.0")).unwrap(), None);
        assert!(kernel.driver_registered("pci-stub"));
        let leftovers: Vec<_> = std::fs::read_dir(dir.state())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, [STATE_FILE]);
    }

    #[test]
    fn a_changed_machine_file_boots_afresh() {
        let dir = TempDir::new();
        let machine_file = dir.0.join("machine.toml");
        let text = std::fs::read_to_string(Z77).unwrap();
        std::fs::write(&machine_file, &text).unwrap();
        let kernel = SimKernel::open(&machine_file, &dir.state()).unwrap();
        bind_vfio(&kernel, &addr(GPU)).unwrap();
        drop(kernel);

        let kernel = SimKernel::open(&machine_file, &dir.state()).unwrap();
        assert_eq!(
            driver_of(&kernel, GPU).as_deref(),
            Some(VFIO_DRIVER),
            "same file: resumed"
        );
        drop(kernel);

        std::fs::write(&machine_file, format!("{text}\n# edited\n")).unwrap();
        let kernel = SimKernel::open(&machine_file, &dir.state()).unwrap();
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
        assert_eq!(kernel.vfio_group_node(1), None);
    }

    #[test]
    fn a_corrupt_state_file_is_set_aside_and_the_machine_boots_afresh() {
        let dir = TempDir::new();
        drop(z77(&dir));
        let state_file = dir.state().join(STATE_FILE);
        let garbage = "{\"format\": 1, \"machine\": tru";
        std::fs::write(&state_file, garbage).unwrap();

        let kernel = z77(&dir);
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
        let aside = dir.state().join("sim-state.json.corrupt");
        assert_eq!(std::fs::read_to_string(aside).unwrap(), garbage);
        let rewritten = std::fs::read(&state_file).unwrap();
        serde_json::from_slice::<RunningState>(&rewritten).expect("a fresh, valid state");

        // Another format version is treated alike, not misread.
        let other = String::from_utf8(rewritten)
            .unwrap()
            .replace("\"format\": 1", "\"format\": 99");
        std::fs::write(&state_file, other).unwrap();
        drop(kernel);
        let kernel = z77(&dir);
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
    }

    #[test]
    fn open_errors_name_the_file() {
        let dir = TempDir::new();
        let missing = dir.0.join("no-such-machine.toml");
        let err = SimKernel::open(&missing, &dir.state()).unwrap_err();
        assert!(matches!(err, SimError::Machine(_)));
        assert!(err.to_string().contains("no-such-machine.toml"), "{err}");

        let bad = dir.0.join("bad.toml");
        std::fs::write(&bad, "[machine]\niommu = \"arm\"\n").unwrap();
        let err = SimKernel::open(&bad, &dir.state()).unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("arm"), "{err}");

        let not_a_dir = dir.0.join("file");
        std::fs::write(&not_a_dir, "").unwrap();
        let err = SimKernel::open(Path::new(Z77), &not_a_dir.join("state")).unwrap_err();
        assert!(matches!(err, SimError::State { .. }));
        assert!(
            err.to_string().contains(&not_a_dir.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_failed_state_write_changes_nothing() {
        let dir = TempDir::new();
        let kernel = z77(&dir);
        let events = kernel.subscribe();
        std::fs::remove_dir_all(dir.state()).unwrap();
        let err = kernel.unbind(&addr(GPU), "amdgpu").unwrap_err();
        assert!(err.to_string().contains(STATE_FILE), "{err}");
        assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
        assert!(events.try_recv().is_err());
    }

    #[test]
    fn fingerprints_tell_files_apart() {
        assert_eq!(fingerprint(b"abc"), fingerprint(b"abc"));
        assert_ne!(fingerprint(b"abc"), fingerprint(b"abd"));
        assert_eq!(fingerprint(b""), "fnv1a64:cbf29ce484222325:0");
    }

    #[test]
    fn sim_kernel_is_send_and_sync() {
        fn assert_kernel<K: Kernel>() {}
        assert_kernel::<SimKernel>();
    }
}
