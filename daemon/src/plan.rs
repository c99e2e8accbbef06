//! Planning a move: which devices a target means, the completed set, and
//! every reason to refuse, decided before anything is written.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use vfiod_dbus::Direction;
use vfiod_dbus::Error;
use vfiod_dbus::names::MAX_TARGET_LEN;
use vfiod_pci::machine::ModuleLoading;
use vfiod_pci::{Holder, PciAddress, PciDevice, UsbDevice};

use crate::kernel::{Kernel, KernelError, VFIO_DRIVER, VFIO_MODULE};
use crate::ledger::Ledger;
use vfiod_config::Config;

/// Where `make install` puts systemd/vfio-pci.conf.
const MODULES_LOAD_FILE: &str = "/usr/lib/modules-load.d/vfio-pci.conf";

/// What the caller asked for besides the target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveOptions {
    /// Take the device even though processes hold it, the console is on it,
    /// or USB input devices sit behind it.
    pub force: bool,
    /// The VM that takes (bind) or gives back (release) the devices.
    pub vm: Option<String>,
    /// Bound on the whole move.
    pub timeout: Option<Duration>,
    /// The refusal is for someone who may not move devices (a Check's dry
    /// run): it says that processes hold a device, not which ones, nor the
    /// VM that owns it.
    pub redacted: bool,
}

/// A checked move: the whole set, in the order it will be moved.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: String,
    pub direction: Direction,
    pub devices: Vec<PciDevice>,
    /// Functions the set gained from the target's slot and group.
    pub completed_with: Vec<PciAddress>,
    /// vfio-pci must be loaded first.
    pub load_vfio: bool,
    /// Devices of the set a release with `vm` leaves on vfio-pci: no VM
    /// owns them (bound at boot or by an administrator), so the VM only
    /// used them (DESIGN §8).
    pub kept: Vec<PciAddress>,
}

impl Plan {
    pub fn addresses(&self) -> Vec<PciAddress> {
        self.devices.iter().map(|d| d.address).collect()
    }

    /// Whether the move leaves `address` where it is, whatever its driver.
    pub fn keeps(&self, address: &PciAddress) -> bool {
        self.kept.contains(address)
    }
}

/// One reason not to move. Several may apply at once; all are reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    NoIommu,
    VfioUnavailable,
    /// vfio-pci is on disk, but this vfiod may not load modules.
    VfioNotLoadable {
        why: ModuleLoading,
    },
    Bridge {
        device: Described,
    },
    Mounted {
        device: Described,
        mounts: Vec<String>,
    },
    Console {
        device: Described,
    },
    UsbInput {
        device: Described,
        inputs: Vec<UsbDevice>,
    },
    GroupMember {
        group: u32,
        member: Described,
        driver: String,
    },
    Holders {
        device: Described,
        holders: Vec<Holder>,
    },
    VfioGroupHeld {
        group: u32,
        holders: Vec<Holder>,
    },
    OwnedByOtherVm {
        device: Described,
        owner: String,
        vm: String,
    },
}

/// The error classes a refusal can carry, in the contract's priority order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum RefusalKind {
    NoIommu,
    Protected,
    GroupNotViable,
    DeviceBusy,
    Conflict,
}

impl Reason {
    fn kind(&self) -> RefusalKind {
        match self {
            Reason::NoIommu | Reason::VfioUnavailable | Reason::VfioNotLoadable { .. } => {
                RefusalKind::NoIommu
            }
            Reason::Bridge { .. }
            | Reason::Mounted { .. }
            | Reason::Console { .. }
            | Reason::UsbInput { .. } => RefusalKind::Protected,
            Reason::GroupMember { .. } => RefusalKind::GroupNotViable,
            Reason::Holders { .. } | Reason::VfioGroupHeld { .. } => RefusalKind::DeviceBusy,
            Reason::OwnedByOtherVm { .. } => RefusalKind::Conflict,
        }
    }
}

/// An address with the device's name, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub address: PciAddress,
    pub name: String,
}

impl From<&PciDevice> for Described {
    fn from(d: &PciDevice) -> Self {
        Described {
            address: d.address,
            name: d.name.clone(),
        }
    }
}

impl fmt::Display for Described {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            write!(f, "{}", self.address)
        } else {
            write!(f, "{} ({})", self.address, self.name)
        }
    }
}

fn list_holders(holders: &[Holder]) -> String {
    holders
        .iter()
        .map(|h| match h.pid {
            REDACTED_PID => format!("a process holds {}", h.node.display()),
            pid => format!("{} (pid {pid}) holds {}", h.comm, h.node.display()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The pid a redacted holder carries: no process has it.
const REDACTED_PID: u32 = 0;

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NoIommu => write!(
                f,
                "no IOMMU is enabled (no IOMMU groups): turn on VT-d / AMD-Vi in the firmware and boot with intel_iommu=on or amd_iommu=on"
            ),
            Reason::VfioUnavailable => {
                write!(
                    f,
                    "vfio-pci is not loaded and module {VFIO_MODULE} cannot be loaded"
                )
            }
            Reason::VfioNotLoadable { why } => write!(
                f,
                "{VFIO_DRIVER} is not loaded and {why}: have it loaded at boot by the shipped modules-load.d file (systemd/vfio-pci.conf, installed as {MODULES_LOAD_FILE}), then reboot or run `modprobe {VFIO_MODULE}` as root"
            ),
            Reason::Bridge { device } => write!(f, "{device} is a bridge; bridges are never moved"),
            Reason::Mounted { device, mounts } => write!(
                f,
                "{device} holds mounted filesystems ({}); the host needs it",
                mounts.join(", ")
            ),
            Reason::Console { device } => write!(
                f,
                "{device} carries the kernel console / boot framebuffer: set handoff = true in its profile to hand the display over (the display manager stopped, fbcon and the framebuffer unbound) and get it back at release (force takes it anyway, leaving the screen dead)"
            ),
            Reason::UsbInput { device, inputs } => {
                let list: Vec<String> = inputs
                    .iter()
                    .map(|u| format!("{} ({} at {})", u.name, u.id, u.port))
                    .collect();
                write!(
                    f,
                    "{device} has USB input devices behind it: {} (force takes it anyway)",
                    list.join(", ")
                )
            }
            Reason::GroupMember {
                group,
                member,
                driver,
            } => write!(
                f,
                "IOMMU group {group} is not viable: {member} stays on host driver {driver}"
            ),
            Reason::Holders { device, holders } => write!(
                f,
                "{device} is in use: {} (force takes it anyway)",
                list_holders(holders)
            ),
            // The kernel said it is open, but no process we can see has it.
            Reason::VfioGroupHeld { group, holders } if holders.is_empty() => write!(
                f,
                "IOMMU group {group} is open in a process vfiod cannot see; stop the VM first"
            ),
            Reason::VfioGroupHeld { group, holders } => write!(
                f,
                "IOMMU group {group} is open: {}; stop the VM first",
                list_holders(holders)
            ),
            Reason::OwnedByOtherVm { device, owner, vm } => {
                if owner.is_empty() {
                    write!(f, "{device} belongs to another VM, not {vm}")
                } else {
                    write!(f, "{device} belongs to VM {owner}, not {vm}")
                }
            }
        }
    }
}

/// Every reason not to move `target`, as one typed error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub target: String,
    pub direction: Direction,
    pub reasons: Vec<Reason>,
}

impl Refusal {
    /// The same refusal with what another user's processes and VMs are
    /// left out: which processes hold a device, which VM owns it.
    pub fn redacted(mut self) -> Refusal {
        let hide = |holders: &mut Vec<Holder>| {
            for h in holders.iter_mut() {
                h.pid = REDACTED_PID;
                h.comm.clear();
            }
            holders.dedup_by(|a, b| a.node == b.node);
        };
        for reason in &mut self.reasons {
            match reason {
                Reason::Holders { holders, .. } | Reason::VfioGroupHeld { holders, .. } => {
                    hide(holders)
                }
                Reason::OwnedByOtherVm { owner, .. } => owner.clear(),
                _ => {}
            }
        }
        self
    }
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Error {
        let message = format!(
            "cannot {} {}: {}",
            r.direction,
            r.target,
            r.reasons
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        );
        match r.reasons.iter().map(Reason::kind).min() {
            Some(RefusalKind::NoIommu) => Error::NoIommu(message),
            Some(RefusalKind::Protected) => Error::Protected(message),
            Some(RefusalKind::GroupNotViable) => Error::GroupNotViable(message),
            Some(RefusalKind::DeviceBusy) => Error::DeviceBusy(message),
            Some(RefusalKind::Conflict) | None => Error::Conflict(message),
        }
    }
}

pub(crate) fn kernel_error(e: KernelError) -> Error {
    Error::Kernel(e.to_string())
}

/// Checks a target string's shape before anything looks it up.
pub fn validate_target(target: &str) -> Result<(), Error> {
    if target.is_empty() {
        return Err(Error::InvalidArgs(
            "the target is empty: give a profile name or a PCI address".into(),
        ));
    }
    if target.len() > MAX_TARGET_LEN {
        return Err(Error::InvalidArgs(format!(
            "the target is {} bytes long; at most {MAX_TARGET_LEN} are accepted",
            target.len()
        )));
    }
    let is_name = target
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !is_name && !PciAddress::looks_like_address(target) {
        return Err(Error::InvalidArgs(format!(
            "{:?} is neither a profile name ([A-Za-z0-9_-]) nor a PCI address (0000:01:00.0 or 01:00.0)",
            target.escape_debug().to_string()
        )));
    }
    Ok(())
}

/// The devices a target names: a profile if one has that name, else a PCI
/// address on the bus (DESIGN §4).
pub fn resolve_target(
    config: &Config,
    devices: &[PciDevice],
    target: &str,
) -> Result<Vec<PciAddress>, Error> {
    validate_target(target)?;
    if let Some(profile) = config.profile(target) {
        let mut found = BTreeSet::new();
        let mut missing = Vec::new();
        for address in &profile.devices {
            if devices.iter().any(|d| &d.address == address) {
                found.insert(*address);
            } else {
                missing.push(address.to_string());
            }
        }
        for d in devices {
            if profile.ids.contains(&d.id) {
                found.insert(d.address);
            }
        }
        if !missing.is_empty() {
            return Err(Error::UnknownTarget(format!(
                "profile {target} names {}, not on the PCI bus",
                missing.join(", ")
            )));
        }
        if found.is_empty() {
            return Err(Error::UnknownTarget(format!(
                "profile {target} matches no device on the PCI bus (ids {})",
                profile
                    .ids
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        return Ok(found.into_iter().collect());
    }
    if PciAddress::looks_like_address(target) {
        let address: PciAddress = target
            .parse()
            .map_err(|e: vfiod_pci::AddressError| Error::InvalidArgs(e.to_string()))?;
        return if devices.iter().any(|d| d.address == address) {
            Ok(vec![address])
        } else {
            Err(Error::UnknownTarget(format!(
                "no PCI device {address} on this machine"
            )))
        };
    }
    Err(Error::UnknownTarget(format!(
        "no profile named {target:?} and it is not a PCI address"
    )))
}

/// The target's devices plus the other functions of each slot that share
/// its IOMMU group. Bridges are never added.
pub fn complete_set(
    devices: &[PciDevice],
    targets: &[PciAddress],
) -> (Vec<PciAddress>, Vec<PciAddress>) {
    let mut set: BTreeSet<PciAddress> = targets.iter().copied().collect();
    let mut added = Vec::new();
    for t in targets {
        let Some(target) = devices.iter().find(|d| &d.address == t) else {
            continue;
        };
        for d in devices {
            if d.address.slot() == t.slot()
                && d.iommu_group == target.iommu_group
                && !d.is_bridge()
                && set.insert(d.address)
            {
                added.push(d.address);
            }
        }
    }
    (set.into_iter().collect(), added)
}

/// Plans a bind or release of `target` against the kernel as it is now.
pub fn plan(
    kernel: &dyn Kernel,
    config: &Config,
    ledger: &Ledger,
    target: &str,
    direction: Direction,
    options: &MoveOptions,
) -> Result<Plan, Error> {
    let devices = listing_for(kernel, config, target)?;
    plan_on(kernel, &devices, config, ledger, target, direction, options)
}

/// What a plan of `target` reads of the bus: the functions it names and
/// every function in their IOMMU groups, which is all the checks look at.
/// A profile's ids are matched on the bus's ids alone. The whole bus only
/// when the functions have no group (no IOMMU).
pub fn listing_for(
    kernel: &dyn Kernel,
    config: &Config,
    target: &str,
) -> Result<Vec<PciDevice>, Error> {
    let whole_bus = || kernel.devices().map_err(kernel_error);
    let named: Vec<PciAddress> = match config.profile(target) {
        Some(profile) => {
            let mut named = profile.devices.clone();
            if !profile.ids.is_empty() {
                let ids = kernel.ids().map_err(kernel_error)?;
                named.extend(
                    ids.into_iter()
                        .filter(|(_, id)| profile.ids.contains(id))
                        .map(|(address, _)| address),
                );
            }
            named
        }
        None => match target.parse() {
            Ok(address) if PciAddress::looks_like_address(target) => vec![address],
            // Not a target at all: resolving it says why.
            _ => return whole_bus(),
        },
    };
    let mut listing: BTreeMap<PciAddress, PciDevice> = BTreeMap::new();
    for address in named {
        if let Some(device) = kernel.device(&address).map_err(kernel_error)? {
            listing.insert(address, device);
        }
    }
    let mut groups = BTreeSet::new();
    for device in listing.values() {
        match device.iommu_group {
            Some(group) => groups.insert(group),
            None => return whole_bus(),
        };
    }
    for group in groups {
        for address in kernel.group_members(group).map_err(kernel_error)? {
            if listing.contains_key(&address) {
                continue;
            }
            // Gone since the group was listed: not a member any more.
            if let Some(device) = kernel.device(&address).map_err(kernel_error)? {
                listing.insert(address, device);
            }
        }
    }
    Ok(listing.into_values().collect())
}

/// [`plan`] on a listing of the bus already read.
pub fn plan_on(
    kernel: &dyn Kernel,
    devices: &[PciDevice],
    config: &Config,
    ledger: &Ledger,
    target: &str,
    direction: Direction,
    options: &MoveOptions,
) -> Result<Plan, Error> {
    let targets = resolve_target(config, devices, target)?;
    let (set, completed_with) = complete_set(devices, &targets);
    let by_address: BTreeMap<PciAddress, &PciDevice> =
        devices.iter().map(|d| (d.address, d)).collect();
    let members: Vec<PciDevice> = set
        .iter()
        .filter_map(|a| by_address.get(a).map(|d| (*d).clone()))
        .collect();

    let kept = match direction {
        Direction::Bind => Vec::new(),
        Direction::Release => not_owned_by_the_vm(&members, ledger, options),
    };
    // A handoff profile hands the display over first (engine/handoff.rs):
    // the console and the display's holders are not reasons then.
    let handoff = direction == Direction::Bind
        && config.profile(target).is_some_and(|p| p.handoff)
        && carries_display(kernel, &set).map_err(kernel_error)?;
    let reasons = match direction {
        Direction::Bind => bind_reasons(kernel, devices, &members, ledger, options, handoff)?,
        Direction::Release => release_reasons(kernel, &members, &kept, ledger, options)?,
    };
    if !reasons.is_empty() {
        let refusal = Refusal {
            target: target.to_string(),
            direction,
            reasons,
        };
        return Err(match options.redacted {
            true => refusal.redacted(),
            false => refusal,
        }
        .into());
    }
    let load_vfio = direction == Direction::Bind && !kernel.driver_registered(VFIO_DRIVER);
    Ok(Plan {
        target: target.to_string(),
        direction,
        devices: members,
        completed_with,
        load_vfio,
        kept,
    })
}

/// The devices on vfio-pci that no VM owns, when a VM releases: they were
/// there before it took anything. Another VM's are a conflict instead.
fn not_owned_by_the_vm(
    members: &[PciDevice],
    ledger: &Ledger,
    options: &MoveOptions,
) -> Vec<PciAddress> {
    if options.vm.is_none() {
        return Vec::new();
    }
    members
        .iter()
        .filter(|d| d.is_bound_to(VFIO_DRIVER) && ledger.owner(&d.address).is_none())
        .map(|d| d.address)
        .collect()
}

fn ownership_reasons(members: &[PciDevice], ledger: &Ledger, options: &MoveOptions) -> Vec<Reason> {
    let Some(vm) = &options.vm else {
        return Vec::new();
    };
    members
        .iter()
        .filter_map(|d| match ledger.owner(&d.address) {
            Some(owner) if owner != vm && d.is_bound_to(VFIO_DRIVER) => {
                Some(Reason::OwnedByOtherVm {
                    device: d.into(),
                    owner: owner.to_string(),
                    vm: vm.clone(),
                })
            }
            _ => None,
        })
        .collect()
}

fn bind_reasons(
    kernel: &dyn Kernel,
    all: &[PciDevice],
    members: &[PciDevice],
    ledger: &Ledger,
    options: &MoveOptions,
    handoff: bool,
) -> Result<Vec<Reason>, Error> {
    // The holders scan reads every process's fds: it runs beside the
    // other checks, which read a few files each.
    std::thread::scope(|scope| {
        let holders =
            (!options.force && !handoff).then(|| scope.spawn(|| holder_reasons(kernel, members)));
        let mut reasons = host_reasons(kernel, all, members, options, handoff)?;
        if let Some(holders) = holders {
            let holders = holders.join().unwrap_or_else(|_| {
                Err(Error::Kernel(
                    "the scan for processes holding the devices failed".into(),
                ))
            })?;
            reasons.extend(holders);
        }
        reasons.extend(ownership_reasons(members, ledger, options));
        Ok(reasons)
    })
}

/// Everything but holders and ownership: the IOMMU, vfio-pci, what the
/// host needs (mounts, the console, USB input) and the group.
fn host_reasons(
    kernel: &dyn Kernel,
    all: &[PciDevice],
    members: &[PciDevice],
    options: &MoveOptions,
    handoff: bool,
) -> Result<Vec<Reason>, Error> {
    let mut reasons = Vec::new();
    if !kernel.iommu_enabled().map_err(kernel_error)? {
        reasons.push(Reason::NoIommu);
    }
    if !kernel.driver_registered(VFIO_DRIVER) {
        // On disk is not enough: under the unit's ProtectKernelModules=yes
        // the load would fail at the move's first write.
        if !kernel.module_available(VFIO_MODULE) {
            reasons.push(Reason::VfioUnavailable);
        } else {
            let loading = kernel.module_loading();
            if !loading.is_allowed() {
                reasons.push(Reason::VfioNotLoadable { why: loading });
            }
        }
    }
    for d in members {
        if d.is_bridge() {
            reasons.push(Reason::Bridge { device: d.into() });
            continue;
        }
        let mounts = kernel.mounts_behind(&d.address).map_err(kernel_error)?;
        if !mounts.is_empty() {
            reasons.push(Reason::Mounted {
                device: d.into(),
                mounts,
            });
        }
        if !options.force && !handoff && kernel.console_on(&d.address).map_err(kernel_error)? {
            reasons.push(Reason::Console { device: d.into() });
        }
        if !options.force {
            let inputs: Vec<UsbDevice> = kernel
                .usb_behind(&d.address)
                .map_err(kernel_error)?
                .into_iter()
                .filter(UsbDevice::is_input)
                .collect();
            if !inputs.is_empty() {
                reasons.push(Reason::UsbInput {
                    device: d.into(),
                    inputs,
                });
            }
        }
    }
    // Every endpoint of each group must end up on vfio-pci or driverless.
    let in_set: BTreeSet<PciAddress> = members.iter().map(|d| d.address).collect();
    let groups: BTreeSet<u32> = members.iter().filter_map(|d| d.iommu_group).collect();
    for group in groups {
        for other in all
            .iter()
            .filter(|o| o.iommu_group == Some(group) && !in_set.contains(&o.address))
        {
            // The kernel lets only bridge headers stay on their drivers: an
            // ISA bridge on lpc_ich stops the group (vfio_dev_driver_allowed).
            if other.has_bridge_header() {
                continue;
            }
            if let Some(driver) = &other.driver
                && driver != VFIO_DRIVER
            {
                reasons.push(Reason::GroupMember {
                    group,
                    member: other.into(),
                    driver: driver.clone(),
                });
            }
        }
    }
    Ok(reasons)
}

/// Whether the host's display is on one of `devices`: the console (fbcon
/// or a firmware framebuffer on the boot VGA), a vtconsole fbcon is bound
/// to drawing on one, or a bound firmware framebuffer scanning out of one.
pub fn carries_display(kernel: &dyn Kernel, devices: &[PciAddress]) -> Result<bool, KernelError> {
    for address in devices {
        if kernel.console_on(address)? {
            return Ok(true);
        }
    }
    let on_set = |device: Option<PciAddress>| device.is_some_and(|d| devices.contains(&d));
    if kernel
        .vtconsoles()?
        .iter()
        .any(|vt| vt.fbcon && vt.bound && on_set(vt.device))
    {
        return Ok(true);
    }
    Ok(kernel
        .boot_framebuffers()?
        .iter()
        .any(|fb| fb.driver.is_some() && on_set(fb.device)))
}

/// Processes holding the nodes of the devices that would leave their
/// drivers.
fn holder_reasons(kernel: &dyn Kernel, members: &[PciDevice]) -> Result<Vec<Reason>, Error> {
    let mut reasons = Vec::new();
    let mut to_move: Vec<(&PciDevice, Vec<PathBuf>)> = Vec::new();
    for d in members.iter().filter(|d| !d.is_bound_to(VFIO_DRIVER)) {
        to_move.push((d, kernel.nodes(&d.address).map_err(kernel_error)?));
    }
    let nodes: Vec<PathBuf> = to_move
        .iter()
        .flat_map(|(_, nodes)| nodes.iter().cloned())
        .collect();
    if nodes.is_empty() {
        return Ok(reasons);
    }
    let holders = settled_holders(kernel, &nodes)?;
    for (d, own) in to_move {
        let mine: Vec<Holder> = holders
            .iter()
            .filter(|h| own.contains(&h.node))
            .cloned()
            .collect();
        if !mine.is_empty() {
            reasons.push(Reason::Holders {
                device: d.into(),
                holders: mine,
            });
        }
    }
    Ok(reasons)
}

/// udevd's workers open a device's nodes for a moment to probe them (a USB
/// disk that just came back): wait for them to let go rather than refuse.
const UDEV_WORKERS: [&str; 2] = ["(udev-worker)", "systemd-udevd"];
const UDEV_PATIENCE: Duration = Duration::from_millis(1000);

/// The holders of `nodes`, once no udev worker is among them (or after
/// [`UDEV_PATIENCE`], whoever holds them then).
fn settled_holders(kernel: &dyn Kernel, nodes: &[PathBuf]) -> Result<Vec<Holder>, Error> {
    let started = std::time::Instant::now();
    loop {
        let holders = kernel.holders(nodes).map_err(kernel_error)?;
        let probing = holders
            .iter()
            .any(|h| UDEV_WORKERS.contains(&h.comm.as_str()));
        if !probing || started.elapsed() >= UDEV_PATIENCE {
            return Ok(holders);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn release_reasons(
    kernel: &dyn Kernel,
    members: &[PciDevice],
    kept: &[PciAddress],
    ledger: &Ledger,
    options: &MoveOptions,
) -> Result<Vec<Reason>, Error> {
    let mut reasons = Vec::new();
    // Unbinding vfio-pci while a VM holds the group (or, with iommufd, the
    // function's device file) blocks in the kernel until the VM lets go:
    // refuse instead, whatever `force` says. Devices left where they are
    // are not unbound.
    let on_vfio: Vec<&PciDevice> = members
        .iter()
        .filter(|d| d.is_bound_to(VFIO_DRIVER) && !kept.contains(&d.address))
        .collect();
    let groups: BTreeSet<u32> = on_vfio.iter().filter_map(|d| d.iommu_group).collect();
    for group in groups {
        let mut device_files = Vec::new();
        for d in on_vfio.iter().filter(|d| d.iommu_group == Some(group)) {
            device_files.extend(kernel.vfio_device_nodes(&d.address).map_err(kernel_error)?);
        }
        let group_node = kernel.vfio_group_node(group);
        // Asking the group is one open; looking for holders reads every
        // process's every fd, so it is done only for a group that may be
        // held, or for device files, which can be opened by many at once.
        let held = match group_node {
            Some(_) => kernel.vfio_group_open(group),
            None => Some(false),
        };
        if held == Some(false) && device_files.is_empty() {
            continue;
        }
        let nodes: Vec<PathBuf> = group_node.into_iter().chain(device_files).collect();
        let holders = kernel.holders(&nodes).map_err(kernel_error)?;
        if held == Some(true) || !holders.is_empty() {
            reasons.push(Reason::VfioGroupHeld { group, holders });
        }
    }
    reasons.extend(ownership_reasons(members, ledger, options));
    Ok(reasons)
}
