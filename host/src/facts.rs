//! What the doctor reads about the host beyond moving PCI devices: CPU,
//! firmware tables, kernel command line and modules, framebuffers, memory,
//! and libvirt's configuration. [`Kernel::host`](super::Kernel::host)
//! returns it; `Sysfs` reads it under its root (procfs, sysfs, /etc,
//! /usr/share), `SimKernel` takes it from the machine file's `[host]`
//! section and `[machine]` keys.
//!
//! Every fact is an `Option`: `None` means unknown (a file that could not
//! be read, a machine file that does not say). The doctor reports an
//! unknown fact as unknown, never as a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use vfiod_pci::{PciAddress, PciId};

/// Facts about the whole host. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostView {
    /// `uname -r` (`proc/sys/kernel/osrelease`).
    pub kernel_release: Option<String>,
    /// `proc/cmdline`.
    pub cmdline: Option<String>,
    /// The first CPU's `flags` in `proc/cpuinfo`.
    pub cpu_flags: Option<Vec<String>>,
    /// `dev/kvm` exists.
    pub kvm: Option<bool>,
    /// ACPI tables the firmware gave (`sys/firmware/acpi/tables`): `DMAR`
    /// (Intel VT-d), `IVRS` (AMD-Vi).
    pub acpi_tables: Option<Vec<String>>,
    /// Interrupts are remapped by the IOMMU (`IR-` chips in
    /// `proc/interrupts`, else the IR bit of an Intel IOMMU's `ecap`).
    pub interrupt_remapping: Option<bool>,
    /// `vfio_iommu_type1`'s `allow_unsafe_interrupts` parameter.
    pub allow_unsafe_interrupts: Option<bool>,
    /// Modules with a `sys/module` entry of a loaded module, as module
    /// keys (`vfio_pci`).
    pub loaded_modules: Option<BTreeSet<String>>,
    /// Modules built into the kernel (`modules.builtin`), as module keys.
    pub builtin_modules: Option<BTreeSet<String>>,
    /// `vfio-pci ids=` in `etc/modprobe.d/*.conf` (the command line's
    /// `vfio-pci.ids=` is read from [`HostView::cmdline`]).
    pub modprobe_vfio_ids: Option<Vec<PciId>>,
    /// Framebuffers and the PCI function each scans out of, when known.
    pub framebuffers: Option<Vec<FramebufferView>>,
    /// Hugepage pools, one per size.
    pub hugepages: Option<Vec<HugepagePool>>,
    /// `MemTotal` of `proc/meminfo`, in KiB.
    pub mem_total_kb: Option<u64>,
    /// `etc/libvirt/qemu.conf`; `None` when there is none (or the machine
    /// file does not say).
    pub qemu_conf: Option<QemuConf>,
    /// `etc/passwd` and `etc/group`.
    pub accounts: Option<Accounts>,
    /// The firmware images QEMU would boot a UEFI guest with.
    pub firmware: Option<Vec<FirmwareImage>>,
    /// Scripts libvirt runs as QEMU hooks (`etc/libvirt/hooks/qemu` and
    /// `etc/libvirt/hooks/qemu.d/*`).
    pub hooks: Option<Vec<HookScript>>,
    /// libvirt's persistent domains (`etc/libvirt/qemu/*.xml`).
    pub domains: Option<Vec<Domain>>,
    /// Per-function facts; a function missing here is unknown throughout.
    pub devices: BTreeMap<PciAddress, DeviceHostView>,
}

/// One framebuffer (`proc/fb`, `sys/class/graphics/fbN`) or firmware
/// framebuffer region (`proc/iomem`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramebufferView {
    /// `radeondrmfb`, `EFI VGA`, `efifb`, `simple-framebuffer.0`, ...
    pub name: String,
    /// The PCI function whose memory it is in, when known.
    pub device: Option<PciAddress>,
}

impl FramebufferView {
    /// Set up by the firmware (EFI GOP, VESA, a simple framebuffer) rather
    /// than by a GPU driver: it scans out of the boot GPU's memory until a
    /// driver takes the GPU over, and keeps its BAR reserved.
    pub fn is_firmware(&self) -> bool {
        let name = self.name.to_ascii_lowercase();
        [
            "efifb",
            "efi vga",
            "vesafb",
            "vesa vga",
            "simplefb",
            "simpledrm",
            "bootfb",
        ]
        .iter()
        .any(|known| name.contains(known))
            || name.starts_with("efi-framebuffer")
            || name.starts_with("vesa-framebuffer")
            || name.starts_with("simple-framebuffer")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugepagePool {
    pub size_kb: u64,
    pub total: u64,
    pub free: u64,
}

/// `user` and `group` of libvirt's qemu.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConf {
    /// Where it was read (`/etc/libvirt/qemu.conf`), for messages.
    pub path: PathBuf,
    pub user: QemuConfValue,
    pub group: QemuConfValue,
}

/// A `user` or `group` setting of qemu.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuConfValue {
    /// Set on an uncommented line.
    Set(String),
    /// Unset. libvirt then uses the default it was built with; the
    /// shipped qemu.conf names it on a commented-out line (`#user =
    /// "libvirt-qemu"`) when it was generated from the template, which is
    /// `hint`. Without a hint the upstream default is root.
    Unset { hint: Option<String> },
}

impl QemuConfValue {
    /// The value libvirt uses: the setting, else the build default the
    /// file hints at, else root.
    pub fn effective(&self) -> &str {
        match self {
            QemuConfValue::Set(value) => value,
            QemuConfValue::Unset { hint: Some(hint) } => hint,
            QemuConfValue::Unset { hint: None } => "root",
        }
    }

    pub fn is_set(&self) -> bool {
        matches!(self, QemuConfValue::Set(_))
    }
}

/// Users and groups, for "can QEMU's user read this file".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounts {
    /// name → (uid, primary gid)
    pub users: BTreeMap<String, (u32, u32)>,
    /// name → (gid, members)
    pub groups: BTreeMap<String, (u32, Vec<String>)>,
}

impl Accounts {
    pub fn user_name(&self, uid: u32) -> Option<&str> {
        self.users
            .iter()
            .find(|(_, (id, _))| *id == uid)
            .map(|(name, _)| name.as_str())
    }

    pub fn group_name(&self, gid: u32) -> Option<&str> {
        self.groups
            .iter()
            .find(|(_, (id, _))| *id == gid)
            .map(|(name, _)| name.as_str())
    }

    /// Every group `user` is in: its primary group and the groups that
    /// list it as a member (QEMU gets them all: libvirt calls initgroups).
    pub fn groups_of(&self, user: &str) -> BTreeSet<String> {
        let mut groups: BTreeSet<String> = self
            .groups
            .iter()
            .filter(|(_, (_, members))| members.iter().any(|m| m == user))
            .map(|(name, _)| name.clone())
            .collect();
        if let Some((_, gid)) = self.users.get(user)
            && let Some(name) = self.group_name(*gid)
        {
            groups.insert(name.to_owned());
        }
        groups
    }
}

/// A firmware image: an executable (`OVMF_CODE.fd`) or an NVRAM template
/// (`OVMF_VARS.fd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareImage {
    pub path: PathBuf,
    /// The descriptor (`/usr/share/qemu/firmware/60-edk2.json`) that
    /// names it, when it came from one.
    pub descriptor: Option<PathBuf>,
    /// `None` when the file does not exist.
    pub stat: Option<FileStat>,
}

/// Owner, group and permission bits of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStat {
    /// A name, or the number when no account has it.
    pub owner: String,
    pub group: String,
    /// Permission bits (`0o640`).
    pub mode: u32,
}

impl FileStat {
    /// Whether `user` in `groups` may read it (root always may).
    pub fn readable_by(&self, user: &str, groups: &BTreeSet<String>) -> bool {
        if user == "root" || user == "+0" || user == "0" {
            return true;
        }
        let bits = if self.owner == user {
            self.mode >> 6
        } else if groups.contains(&self.group) {
            self.mode >> 3
        } else {
            self.mode
        };
        bits & 0o4 != 0
    }

    /// `root:kvm 0640`.
    pub fn describe(&self) -> String {
        format!("{}:{} {:04o}", self.owner, self.group, self.mode)
    }
}

/// A script libvirt runs on QEMU domain events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookScript {
    pub path: PathBuf,
    pub executable: bool,
    /// It runs `vfioctl libvirt-hook`.
    pub calls_vfioctl: bool,
}

/// What the doctor needs from a libvirt domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    /// The domain's XML file.
    pub path: PathBuf,
    /// `<memory>`, in KiB.
    pub memory_kb: Option<u64>,
    /// `<memoryBacking><hugepages/>`.
    pub hugepages: bool,
    /// `<hostdev mode='subsystem' type='pci'>`.
    pub hostdevs: Vec<DomainHostdev>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainHostdev {
    pub address: PciAddress,
    /// `managed='yes'`: libvirt detaches and reattaches it itself.
    pub managed: bool,
}

/// Facts about one PCI function beyond the device model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceHostView {
    /// `d3cold_allowed`.
    pub d3cold_allowed: Option<bool>,
    /// The platform can cut the function's power: ACPI power resources
    /// for D3hot (`firmware_node/power_resources_D3hot`, from `_PR3`).
    pub d3cold_capable: Option<bool>,
    /// The `driver_override` attribute exists (kernel >= 3.16).
    pub driver_override: Option<bool>,
}

/// vfio-pci's `ids` parameter, `1002:67df,1002:aaf0` (it also takes
/// `vvvv:dddd:svvv:sddd:class:mask`; the first two fields are the id).
pub fn parse_vfio_ids(list: &str) -> Vec<PciId> {
    list.split(',')
        .filter_map(|entry| {
            let mut fields = entry.trim().split(':');
            format!("{}:{}", fields.next()?, fields.next()?)
                .parse()
                .ok()
        })
        .collect()
}
