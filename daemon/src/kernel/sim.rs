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
//! [`SimKernel::restore_device`], [`SimKernel::end_hang`]. They are
//! persisted and announced with uevents like any other change.
//!
//! Where the real kernel blocks, so does the simulator, without holding its
//! lock: an unbind with `unbind = "hang"` (a driver whose remove() never
//! ends) and an unbind whose driver waits for the device's users (a
//! "waiting unbind") block, the first until [`SimKernel::end_hang`], the
//! second until the users let go. Both are removals in progress, below.
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
//! [`SimKernel::remove_holder`] takes the last hold away (a hung one: at
//! [`SimKernel::end_hang`]), whoever calls it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use nix::libc;
use serde::{Deserialize, Serialize};
use vfiod_pci::machine::{
    DeviceEntry, Faults, IommuKind, MachineError, MachineFile, ModuleLoading, ProbeFault,
    UnbindFault, VanishFault,
};
use vfiod_pci::{Holder, PciAddress, PciClass, PciDevice, PciId, UsbDevice};

use super::{
    Inspect, Kernel, KernelError, KernelResult, Uevent, UeventAction, VFIO_DRIVER, VFIO_MODULE,
};
use vfiod_host::facts::HostView;

mod board;
mod display;
mod facts;
mod health;
mod kernel;
mod persist;
mod resets;
mod running;

use self::board::Board;
use self::display::DisplayState;
use self::health::found_by_rescan;
use self::persist::{fingerprint, load_state, new_boot_id, write_state};
use self::running::{DeviceState, RunningState};

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
    /// vfiod's early-claim udev rule for this machine (its root in the
    /// state dir): the simulated udevd applies it to each function added.
    claim_rule: PathBuf,
    inner: Mutex<Inner>,
    /// Woken after every change, for writers and readers that wait on one
    /// (a waiting unbind, and whatever needs the device lock it holds).
    changed: Condvar,
    /// Crash-point testing: the process kills itself (SIGKILL) right after
    /// this many more kernel writes have taken effect.
    crash_after_writes: Mutex<Option<u32>>,
    /// Reads served since boot (every [`Inspect`] call): tests see from it
    /// that a call did no work.
    reads: AtomicU64,
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
            claim_rule: crate::early_claim::root_for(true, state_dir)
                .join(crate::early_claim::UDEV_RULE),
            inner: Mutex::new(Inner {
                state,
                subscribers: Vec::new(),
            }),
            changed: Condvar::new(),
            crash_after_writes: Mutex::new(None),
            reads: AtomicU64::new(0),
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

    /// Ends udev's coldplug on time even when nobody looks: a thread waits
    /// for its end, when the late drivers bind, announced by uevents as
    /// udevd's would be. Nothing to do when no coldplug runs.
    pub fn run_coldplug(self: &std::sync::Arc<Self>) {
        let Some(end) = self.lock().state.coldplug_until_ms else {
            return;
        };
        let sim = std::sync::Arc::downgrade(self);
        std::thread::spawn(move || {
            // The machine's own clock: waiting for its deadline is the event.
            std::thread::sleep(std::time::Duration::from_millis(
                end.saturating_sub(now_ms()) + 1,
            ));
            if let Some(sim) = sim.upgrade() {
                // Looking at the state ends the coldplug (see `lock`).
                drop(sim.lock());
            }
        });
    }

    /// What `VFIO_GROUP_GET_STATUS` reports: `/dev/vfio/N` exists and every
    /// endpoint of the group is on vfio-pci or has no driver (PCI-to-PCI
    /// and CardBus bridges may stay on theirs; host and ISA bridges may not).
    pub fn group_viable(&self, group: u32) -> bool {
        let inner = self.lock();
        let state = &inner.state;
        state.group_node_exists(&self.board, group)
            && self
                .board
                .group_members(group)
                .filter(|entry| !entry.class.has_bridge_header())
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
            state.coldplug_reaches(board, address, events);
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

    /// The hung removal of `address` (`unbind = "hang"`) ends, as a stuck
    /// driver's remove() finally would: the device is left without a
    /// driver, its unbind uevent sent, its writer released, its device
    /// lock free. Whether a hang was pending. The next unbind hangs again.
    pub fn end_hang(&self, address: &PciAddress) -> KernelResult<bool> {
        self.transact(|board, state, _| {
            board.entry(address)?;
            let dev = state
                .present_mut(address)
                .ok_or(KernelError::NoDevice(*address))?;
            Ok(std::mem::take(&mut dev.hung))
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
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner
            .state
            .coldplug_until_ms
            .is_some_and(|_| !inner.state.coldplug_running(now_ms()))
        {
            // The coldplug ended since the last look: its late drivers bind,
            // persisted and announced like any change. A state file that
            // cannot be written leaves it for the next look.
            let _ = self.commit(&mut inner, |board, state, events| {
                state.end_coldplug(board, events);
                Ok(())
            });
        }
        inner
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

    /// How many reads vfiod has made of this kernel since it started.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    fn count_read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
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

/// The wall clock in milliseconds since the Unix epoch: the coldplug's
/// end is kept in the state, which outlives vfiod.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
mod tests;
