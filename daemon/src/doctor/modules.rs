//! Drivers and modules: vfio, vfio_pci and vfio_iommu_type1 (loaded,
//! built in or loadable), driver_override, and devices vfio-pci claims at
//! boot through `vfio-pci.ids`.

use vfiod_pci::PciId;

use super::{Context, Findings, describe};
use crate::kernel::VFIO_DRIVER;
use vfiod_host::facts::parse_vfio_ids;

/// (finding id, module, what it is for)
const VFIO_MODULES: [(&str, &str, &str); 3] = [
    ("modules.vfio", "vfio", "the VFIO core"),
    ("modules.vfio-pci", "vfio_pci", "the driver devices move to"),
    (
        "modules.vfio-iommu-type1",
        "vfio_iommu_type1",
        "the IOMMU backend QEMU maps guest memory with",
    ),
];

pub(super) fn check(cx: &Context<'_>, out: &mut Findings) {
    for (id, module, role) in VFIO_MODULES {
        vfio_module(cx, id, module, role, out);
    }
    driver_override(cx, out);
    boot_claims(cx, out);
}

fn vfio_module(cx: &Context<'_>, id: &str, module: &str, role: &str, out: &mut Findings) {
    let loaded = cx
        .host
        .loaded_modules
        .as_ref()
        .is_some_and(|m| m.contains(module))
        || (module == "vfio_pci" && cx.kernel.driver_registered(VFIO_DRIVER));
    let builtin = cx
        .host
        .builtin_modules
        .as_ref()
        .is_some_and(|m| m.contains(module));
    if loaded {
        out.ok(id, format!("{module} ({role}) is loaded"));
    } else if builtin {
        out.ok(id, format!("{module} ({role}) is built into the kernel"));
    } else if cx.kernel.module_available(module) && !cx.kernel.module_loading().is_allowed() {
        out.fail(
            id,
            format!(
                "{module} ({role}) is not loaded and {}: have it loaded at boot by the shipped modules-load.d file (systemd/vfio-pci.conf, installed as /usr/lib/modules-load.d/vfio-pci.conf)",
                cx.kernel.module_loading()
            ),
        );
    } else if cx.kernel.module_available(module) {
        out.ok(
            id,
            format!(
                "{module} ({role}) is not loaded yet; it loads with vfio-pci on the first bind"
            ),
        );
    } else if module == "vfio_iommu_type1" && cx.kernel.module_available("iommufd") {
        out.ok(
            id,
            "vfio_iommu_type1 is missing, but iommufd is there and provides VFIO's container",
        );
    } else {
        out.fail(
            id,
            format!(
                "module {module} ({role}) is missing: install the kernel's full module package (Ubuntu: linux-modules-extra) or build the kernel with CONFIG_VFIO and CONFIG_VFIO_PCI"
            ),
        );
    }
}

fn driver_override(cx: &Context<'_>, out: &mut Findings) {
    const ID: &str = "modules.driver-override";
    let relevant: Vec<_> = match &cx.scope {
        Some(scope) => scope.endpoints().map(|d| d.address).collect(),
        None => cx.devices.iter().map(|d| d.address).collect(),
    };
    let known: Vec<bool> = relevant
        .iter()
        .filter_map(|a| cx.host.devices.get(a)?.driver_override)
        .collect();
    if known.is_empty() {
        out.unknown(ID, "whether the kernel has driver_override (sysfs)");
    } else if known.iter().all(|has| *has) {
        out.ok(
            ID,
            "the kernel has driver_override, which vfiod moves devices with",
        );
    } else {
        out.fail(
            ID,
            "this kernel has no driver_override attribute (it came in Linux 3.16): vfiod cannot move devices; run a newer kernel",
        );
    }
}

/// `vfio-pci.ids=` on the command line and `options vfio-pci ids=` in
/// modprobe.d: vfio-pci takes those devices at boot, and on every probe.
fn boot_claims(cx: &Context<'_>, out: &mut Findings) {
    const ID: &str = "modules.vfio-pci-ids";
    let mut claims: Vec<(PciId, &str)> = Vec::new();
    if let Some(words) = cx.cmdline_words() {
        for word in words {
            for key in ["vfio-pci.ids=", "vfio_pci.ids="] {
                if let Some(list) = word.strip_prefix(key) {
                    claims.extend(
                        parse_vfio_ids(list)
                            .into_iter()
                            .map(|id| (id, "the kernel command line")),
                    );
                }
            }
        }
    }
    if let Some(ids) = &cx.host.modprobe_vfio_ids {
        claims.extend(ids.iter().map(|id| (*id, "/etc/modprobe.d")));
    }
    match &cx.scope {
        None if claims.is_empty() => {}
        None => {
            let list: Vec<String> = claims
                .iter()
                .map(|(id, source)| format!("{id} ({source})"))
                .collect();
            out.ok(
                ID,
                format!(
                    "vfio-pci claims {} at boot: those devices start on vfio-pci",
                    list.join(", ")
                ),
            );
        }
        Some(scope) => {
            for device in scope.endpoints() {
                if let Some((id, source)) = claims.iter().find(|(id, _)| *id == device.id) {
                    out.warn(
                        ID,
                        format!(
                            "{} ({id}) is claimed by vfio-pci at boot through vfio-pci.ids ({source}): vfio-pci also matches it on every probe, so a release may hand it back to vfio-pci instead of its host driver. Drop the id there and let vfiod bind it (a profile with boot = \"vfio\" binds it when vfiod starts)",
                            describe(device)
                        ),
                    );
                }
            }
        }
    }
}
