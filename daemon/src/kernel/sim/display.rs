//! The simulated machine's display (`[display]` of the machine file): its
//! vtconsoles, firmware framebuffers and display manager, with the real
//! kernel's refusals, made harsher where the kernel is lenient only by
//! luck: a GPU whose display is still up cannot be unbound (fbcon on a
//! vtconsole drawing on it, or a process holding one of its nodes: EBUSY),
//! and vfio-pci cannot take one a firmware framebuffer still scans out of
//! (its BAR stays reserved; the probe fails silently). fbcon binds again
//! only where it has something to draw on; a framebuffer with fbcon on it
//! is not unbound; one is not bound again under vfio-pci.

use std::time::{Duration, Instant};

use vfiod_pci::machine::{
    Display, DisplayManagerEntry, FramebufferEntry, JobFault, VtConsoleEntry, WriteFault,
};
use vfiod_pci::{BootFramebuffer, VtConsole};

use super::*;
use crate::units::{UnitError, UnitStatus, Units};

/// What changed since boot; absent from the state file while nothing has.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DisplayState {
    /// vtconsoles whose `bind` is not what it was at boot.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    vtconsoles: BTreeMap<String, bool>,
    /// Framebuffers whose binding is not what it was at boot.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    framebuffers: BTreeMap<String, bool>,
    /// The display manager, once it is not as at boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    manager: Option<ManagerState>,
}

impl DisplayState {
    pub(super) fn is_boot(&self) -> bool {
        *self == DisplayState::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ManagerState {
    Active,
    Inactive,
    /// A stop job that hangs (`stop = "hang"`): still running, holders kept.
    Stopping,
}

impl Board {
    fn display(&self) -> Option<&Display> {
        self.machine.display.as_ref()
    }

    fn vtconsole_entries(&self) -> &[VtConsoleEntry] {
        self.display().map_or(&[], |d| &d.vtconsoles)
    }

    fn framebuffer_entries(&self) -> &[FramebufferEntry] {
        self.display().map_or(&[], |d| &d.framebuffers)
    }

    fn manager_entry(&self) -> Option<&DisplayManagerEntry> {
        self.display().and_then(|d| d.manager.as_ref())
    }

    /// Whether `[display]` says anything about this function: only then
    /// does the simulator play its display (machine files without one
    /// keep their `console` flag and lenient DRM unbinds).
    pub(super) fn shows_display(&self, address: &PciAddress) -> bool {
        let named = self
            .vtconsole_entries()
            .iter()
            .map(|v| v.device)
            .chain(self.framebuffer_entries().iter().map(|f| f.device));
        named.flatten().any(|d| d == *address)
    }

    /// What the display manager holds at boot, when it runs then.
    pub(super) fn manager_holders_at_boot(&self) -> Vec<Holder> {
        self.manager_entry()
            .filter(|m| m.active)
            .map(|m| m.holders.clone())
            .unwrap_or_default()
    }
}

impl RunningState {
    fn vtconsole_bound(&self, entry: &VtConsoleEntry) -> bool {
        *self
            .display
            .vtconsoles
            .get(&entry.name)
            .unwrap_or(&entry.bound)
    }

    fn framebuffer_bound(&self, entry: &FramebufferEntry) -> bool {
        *self
            .display
            .framebuffers
            .get(&entry.name)
            .unwrap_or(&entry.bound)
    }

    fn manager_state(&self, entry: &DisplayManagerEntry) -> ManagerState {
        self.display.manager.unwrap_or(if entry.active {
            ManagerState::Active
        } else {
            ManagerState::Inactive
        })
    }

    /// A bound firmware framebuffer scans out of the function.
    pub(super) fn framebuffer_on(&self, board: &Board, address: &PciAddress) -> bool {
        board
            .framebuffer_entries()
            .iter()
            .any(|fb| fb.device == Some(*address) && self.framebuffer_bound(fb))
    }

    /// fbcon is bound on a vtconsole and draws on the function.
    fn fbcon_on(&self, board: &Board, address: &PciAddress) -> bool {
        board
            .vtconsole_entries()
            .iter()
            .any(|vt| vt.fbcon && vt.device == Some(*address) && self.vtconsole_bound(vt))
    }

    /// Why the host driver of a function showing the display cannot be
    /// unbound now, if it cannot.
    pub(super) fn display_keeps(
        &self,
        board: &Board,
        entry: &DeviceEntry,
        driver: &str,
    ) -> Option<&'static str> {
        if driver == VFIO_DRIVER || !board.shows_display(&entry.address) {
            return None;
        }
        if self.fbcon_on(board, &entry.address) {
            return Some("fbcon draws on it");
        }
        if self.holders.iter().any(|h| entry.nodes.contains(&h.node)) {
            return Some("a process holds its nodes");
        }
        None
    }

    /// Whether the console is on the function now: its machine-file flag,
    /// while fbcon or a firmware framebuffer still shows on it when
    /// `[display]` describes it.
    pub(super) fn console_now(&self, board: &Board, entry: &DeviceEntry) -> bool {
        entry.console
            && (!board.shows_display(&entry.address)
                || self.fbcon_on(board, &entry.address)
                || self.framebuffer_on(board, &entry.address))
    }

    /// Something for fbcon to draw on: a firmware framebuffer, or the
    /// GPU on its host driver (a DRM driver's fbdev).
    fn can_draw_on(&self, board: &Board, address: &PciAddress) -> bool {
        self.framebuffer_on(board, address)
            || self
                .present(address)
                .and_then(|d| d.driver.as_deref())
                .is_some_and(|d| d != VFIO_DRIVER)
    }
}

fn busy(path: String) -> KernelError {
    os_error("write", path, libc::EBUSY)
}

impl SimKernel {
    pub(super) fn read_vtconsoles(&self) -> Vec<VtConsole> {
        let inner = self.lock();
        self.board
            .vtconsole_entries()
            .iter()
            .map(|vt| VtConsole {
                name: vt.name.clone(),
                fbcon: vt.fbcon,
                bound: inner.state.vtconsole_bound(vt),
                device: vt.device,
            })
            .collect()
    }

    pub(super) fn read_boot_framebuffers(&self) -> Vec<BootFramebuffer> {
        let inner = self.lock();
        self.board
            .framebuffer_entries()
            .iter()
            .map(|fb| BootFramebuffer {
                name: fb.name.clone(),
                driver: inner.state.framebuffer_bound(fb).then(|| fb.driver.clone()),
                device: fb.device,
            })
            .collect()
    }

    pub(super) fn write_vtconsole_bind(&self, name: &str, bind: bool) -> KernelResult<()> {
        let path = format!("/sys/class/vtconsole/{name}/bind");
        let result = self.transact(|board, state, _| {
            let Some(vt) = board.vtconsole_entries().iter().find(|v| v.name == name) else {
                return Err(os_error("write", path.clone(), libc::ENOENT));
            };
            let fault = vt.fault.unwrap_or_default();
            let refused = if bind { fault.bind } else { fault.unbind };
            if refused == Some(WriteFault::Fail) {
                return Err(busy(path.clone()));
            }
            // fbcon binds only where there is a framebuffer to draw on;
            // the write itself succeeds either way.
            let takes =
                !bind || !vt.fbcon || vt.device.is_none_or(|d| state.can_draw_on(board, &d));
            if takes {
                state.display.vtconsoles.insert(vt.name.clone(), bind);
                if bind == vt.bound {
                    state.display.vtconsoles.remove(&vt.name);
                }
            }
            Ok(())
        });
        self.count_write();
        result
    }

    pub(super) fn write_platform_bind(
        &self,
        device: &str,
        driver: &str,
        bind: bool,
    ) -> KernelResult<()> {
        let op = if bind { "bind" } else { "unbind" };
        let path = format!("/sys/bus/platform/drivers/{driver}/{op}");
        let result = self.transact(|board, state, _| {
            let Some(fb) = board
                .framebuffer_entries()
                .iter()
                .find(|f| f.name == device && f.driver == driver)
            else {
                return Err(os_error("write", path.clone(), libc::ENOENT));
            };
            let fault = fb.fault.unwrap_or_default();
            if (if bind { fault.bind } else { fault.unbind }) == Some(WriteFault::Fail) {
                return Err(busy(path.clone()));
            }
            let bound = state.framebuffer_bound(fb);
            if bind == bound {
                // Binding a bound device: EBUSY; unbinding an unbound one: ENODEV.
                let errno = if bind { libc::EBUSY } else { libc::ENODEV };
                return Err(os_error("write", path.clone(), errno));
            }
            if let Some(gpu) = fb.device {
                if !bind && state.fbcon_on(board, &gpu) {
                    return Err(busy(path.clone()));
                }
                let on_vfio = state
                    .present(&gpu)
                    .is_some_and(|d| d.driver.as_deref() == Some(VFIO_DRIVER));
                if bind && on_vfio {
                    return Err(busy(path.clone()));
                }
            }
            state.display.framebuffers.insert(fb.name.clone(), bind);
            if bind == fb.bound {
                state.display.framebuffers.remove(&fb.name);
            }
            Ok(())
        });
        self.count_write();
        result
    }

    /// Runs a job of the display manager: what it does at once, and then,
    /// for a hung stop, the wait until a start cancels it or `within` ends.
    fn manager_job(&self, unit: &str, stop: bool, within: Duration) -> Result<(), UnitError> {
        let job = if stop { "stop" } else { "start" };
        let fail = |e: KernelError| UnitError::Bus(e.to_string());
        let outcome = self
            .transact(|board, state, _| {
                let Some(manager) = board.manager_entry().filter(|m| m.unit == unit) else {
                    return Ok(Err(UnitError::Bus(format!("Unit {unit} not loaded."))));
                };
                let fault = manager.fault.unwrap_or_default();
                let (fault, next) = if stop {
                    (fault.stop, ManagerState::Inactive)
                } else {
                    (fault.start, ManagerState::Active)
                };
                match fault {
                    Some(JobFault::Fail) => {
                        return Ok(Err(UnitError::Job {
                            unit: unit.to_string(),
                            job,
                            result: "failed".into(),
                        }));
                    }
                    Some(JobFault::Hang) if stop => {
                        if state.manager_state(manager) == ManagerState::Active {
                            state.display.manager = Some(ManagerState::Stopping);
                        }
                        return Ok(Ok(true));
                    }
                    _ => {}
                }
                // A start replaces a stop job still running: the unit never stopped.
                state.holders.retain(|h| !manager.holders.contains(h));
                if !stop {
                    state.holders.extend(manager.holders.iter().cloned());
                }
                state.display.manager = Some(next);
                Ok(Ok(false))
            })
            .map_err(fail);
        self.count_write();
        let hangs = outcome??;
        if !hangs {
            return Ok(());
        }
        let deadline = Instant::now() + within;
        let mut inner = self.lock();
        loop {
            let stopping = self
                .board
                .manager_entry()
                .is_some_and(|m| inner.state.manager_state(m) == ManagerState::Stopping);
            if !stopping {
                return Err(UnitError::Job {
                    unit: unit.to_string(),
                    job,
                    result: "canceled".into(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(UnitError::Timeout {
                    unit: unit.to_string(),
                    job,
                    within,
                });
            }
            inner = self
                .changed
                .wait_timeout(inner, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Units for SimKernel {
    fn display_manager(&self) -> Result<Option<UnitStatus>, UnitError> {
        let inner = self.lock();
        Ok(self.board.manager_entry().map(|m| UnitStatus {
            unit: m.unit.clone(),
            active: inner.state.manager_state(m) != ManagerState::Inactive,
        }))
    }

    fn stop(&self, unit: &str, within: Duration) -> Result<(), UnitError> {
        self.manager_job(unit, true, within)
    }

    fn start(&self, unit: &str, within: Duration) -> Result<(), UnitError> {
        self.manager_job(unit, false, within)
    }
}
