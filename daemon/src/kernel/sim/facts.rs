//! The doctor's view of a simulated host: the machine file's `[host]`
//! section (DESIGN §7) and `[machine]` keys. What the file does not say
//! is unknown, never guessed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use vfiod_pci::machine::{HostFacts, MachineFile};

use vfiod_host::facts::{
    DeviceHostView, FileStat, FirmwareImage, FramebufferView, HostView, HugepagePool, QemuConf,
    QemuConfValue,
};

/// Where qemu.conf would be on a real host; messages name it.
const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";

/// The host of `machine`, with the modules loaded now (module keys).
pub(super) fn view(machine: &MachineFile, loaded_modules: BTreeSet<String>) -> HostView {
    let info = &machine.machine;
    let known = |text: &str| (!text.trim().is_empty()).then(|| text.trim().to_owned());
    let facts = machine.host.clone().unwrap_or_default();
    let HostFacts {
        cpu_flags,
        acpi_tables,
        interrupt_remapping,
        kvm,
        framebuffers,
        hugepages,
        qemu_conf,
        firmware,
    } = facts;
    HostView {
        kernel_release: known(&info.kernel),
        cmdline: known(&info.cmdline),
        cpu_flags,
        kvm,
        acpi_tables,
        interrupt_remapping,
        allow_unsafe_interrupts: None,
        loaded_modules: Some(loaded_modules),
        // The machine file has no notion of built-in modules: what it
        // lists in `modules` is loaded, everything else loads on demand.
        builtin_modules: Some(BTreeSet::new()),
        modprobe_vfio_ids: None,
        framebuffers: framebuffers.map(|list| {
            list.into_iter()
                .map(|fb| FramebufferView {
                    name: fb.name,
                    device: fb.device,
                })
                .collect()
        }),
        hugepages: hugepages.map(|pool| {
            vec![HugepagePool {
                size_kb: pool.size_kb,
                total: pool.total,
                free: pool.free,
            }]
        }),
        mem_total_kb: None,
        qemu_conf: qemu_conf.map(|conf| QemuConf {
            path: PathBuf::from(QEMU_CONF),
            user: QemuConfValue::Set(conf.user),
            group: QemuConfValue::Set(conf.group),
        }),
        accounts: None,
        firmware: firmware.map(|files| {
            files
                .into_iter()
                .map(|file| FirmwareImage {
                    path: file.path,
                    descriptor: None,
                    stat: Some(FileStat {
                        owner: file.owner,
                        group: file.group,
                        // Validated nowhere else: a mode that is not octal
                        // reads as no permissions at all.
                        mode: u32::from_str_radix(file.mode.trim_start_matches("0o"), 8)
                            .unwrap_or(0),
                    }),
                })
                .collect()
        }),
        hooks: None,
        domains: None,
        // The simulated kernel has driver_override; d3cold is not described.
        devices: machine
            .devices
            .iter()
            .map(|entry| {
                let view = DeviceHostView {
                    driver_override: Some(true),
                    ..DeviceHostView::default()
                };
                (entry.address, view)
            })
            .collect::<BTreeMap<_, _>>(),
    }
}
