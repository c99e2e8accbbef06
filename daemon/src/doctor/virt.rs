//! Virtualization and the IOMMU: the CPU's VT-x / AMD-V, /dev/kvm, the
//! firmware's DMAR / IVRS table, the IOMMU in the kernel, interrupt
//! remapping, and pcie_acs_override.

use super::{Context, CpuVendor, Findings};
use crate::kernel::KernelResult;

pub(super) fn check(cx: &Context<'_>, out: &mut Findings) -> KernelResult<()> {
    cpu(cx, out);
    kvm(cx, out);
    firmware_table(cx, out);
    let iommu_on = iommu(cx, cx.kernel.iommu_enabled()?, out);
    interrupt_remapping(cx, iommu_on, out);
    acs_override(cx, out);
    Ok(())
}

fn cpu(cx: &Context<'_>, out: &mut Findings) {
    const ID: &str = "cpu.virtualization";
    let Some(flags) = &cx.host.cpu_flags else {
        out.unknown(
            ID,
            "the CPU's flags (/proc/cpuinfo; cpu_flags in a machine file's [host]) say nothing about VT-x or AMD-V",
        );
        return;
    };
    if flags.iter().any(|f| f == "vmx") {
        out.ok(ID, "the CPU has Intel VT-x (vmx) turned on");
    } else if flags.iter().any(|f| f == "svm") {
        out.ok(ID, "the CPU has AMD-V (svm) turned on");
    } else {
        out.fail(
            ID,
            "the CPU shows neither vmx (Intel VT-x) nor svm (AMD-V): turn virtualization on in the firmware setup (\"Intel Virtualization Technology\", \"SVM Mode\")",
        );
    }
}

fn kvm(cx: &Context<'_>, out: &mut Findings) {
    const ID: &str = "kvm";
    match cx.host.kvm {
        None => out.unknown(
            ID,
            "whether /dev/kvm exists (kvm in a machine file's [host])",
        ),
        Some(true) => out.ok(ID, "/dev/kvm exists: KVM is available"),
        Some(false) => {
            let module = match cx.vendor() {
                Some(CpuVendor::Amd) => "kvm_amd",
                _ => "kvm_intel",
            };
            out.fail(
                ID,
                format!(
                    "/dev/kvm is missing: load KVM (modprobe {module}); if that fails, virtualization is off in the firmware setup"
                ),
            );
        }
    }
}

fn firmware_table(cx: &Context<'_>, out: &mut Findings) {
    const ID: &str = "firmware.iommu-table";
    let Some(tables) = &cx.host.acpi_tables else {
        out.unknown(
            ID,
            "the firmware's ACPI tables (/sys/firmware/acpi/tables; acpi_tables in a machine file's [host]), which tell whether it offers an IOMMU",
        );
        return;
    };
    let has = |name: &str| tables.iter().any(|t| t == name);
    if has("DMAR") {
        out.ok(
            ID,
            "the firmware describes an Intel IOMMU (ACPI DMAR table: VT-d is on)",
        );
    } else if has("IVRS") {
        out.ok(
            ID,
            "the firmware describes an AMD IOMMU (ACPI IVRS table: AMD-Vi is on)",
        );
    } else {
        out.fail(
            ID,
            "the firmware describes no IOMMU (no ACPI DMAR or IVRS table): turn on VT-d (Intel) or IOMMU / AMD-Vi (AMD) in the firmware setup; some boards only offer it with a CPU that supports it",
        );
    }
}

/// `on`: IOMMU groups exist. Returns it.
fn iommu(cx: &Context<'_>, on: bool, out: &mut Findings) -> bool {
    const ID: &str = "iommu.enabled";
    let words = cx.cmdline_words();
    let has_word = |word: &str| words.as_ref().is_some_and(|w| w.contains(&word));
    if on {
        let groups: std::collections::BTreeSet<u32> =
            cx.devices.iter().filter_map(|d| d.iommu_group).collect();
        let mut message = format!(
            "the IOMMU is on: the kernel made {} IOMMU group{}",
            groups.len(),
            if groups.len() == 1 { "" } else { "s" }
        );
        if words.is_some() && !has_word("iommu=pt") {
            message.push_str(
                " (iommu=pt on the kernel command line keeps the host's own devices out of DMA translation, which costs less)",
            );
        }
        out.ok(ID, message);
        return true;
    }
    let mut advice = Vec::new();
    if cx
        .host
        .acpi_tables
        .as_ref()
        .is_some_and(|t| !t.iter().any(|x| x == "DMAR" || x == "IVRS"))
    {
        advice.push("turn on VT-d / AMD-Vi in the firmware setup first".to_owned());
    }
    for off in ["intel_iommu=off", "amd_iommu=off", "iommu=off"] {
        if has_word(off) {
            advice.push(format!("remove {off} from the kernel command line"));
        }
    }
    match cx.vendor() {
        Some(CpuVendor::Amd) => advice.push(
            "AMD-Vi comes on by itself once the firmware has it; boot with amd_iommu=on iommu=pt if it does not".to_owned(),
        ),
        _ if !has_word("intel_iommu=on") => {
            advice.push("boot with intel_iommu=on iommu=pt (add them to the kernel command line in the boot loader)".to_owned())
        }
        _ => advice.push(
            "intel_iommu=on is on the command line, so the firmware is not giving the kernel an IOMMU".to_owned(),
        ),
    }
    out.fail(
        ID,
        format!(
            "the IOMMU is off (no IOMMU groups), so nothing can be passed through: {}",
            advice.join("; ")
        ),
    );
    false
}

fn interrupt_remapping(cx: &Context<'_>, iommu_on: bool, out: &mut Findings) {
    const ID: &str = "iommu.interrupt-remapping";
    const UNSAFE: &str = "allow_unsafe_interrupts=1 (vfio_iommu_type1)";
    let unsafe_on = cx.host.allow_unsafe_interrupts == Some(true);
    match cx.host.interrupt_remapping {
        Some(true) if unsafe_on => out.warn(
            ID,
            format!(
                "interrupts are remapped, yet {UNSAFE} is set: it only weakens the isolation of guests; remove it from /etc/modprobe.d and the kernel command line"
            ),
        ),
        Some(true) => out.ok(ID, "the IOMMU remaps interrupts: a guest cannot forge interrupts to the host"),
        Some(false) if !iommu_on => out.warn(
            ID,
            "no interrupt remapping, as the IOMMU is off: turn the IOMMU on (see iommu.enabled) and check again",
        ),
        Some(false) if unsafe_on => out.warn(
            ID,
            format!(
                "no interrupt remapping, and {UNSAFE} lets VFIO assign devices anyway: a guest can then forge interrupts (MSI writes) to the host. Acceptable only for a trusted guest; turn on x2APIC / interrupt remapping in the firmware if it offers it"
            ),
        ),
        Some(false) => out.fail(
            ID,
            format!(
                "the IOMMU does not remap interrupts: VFIO refuses to assign devices (\"No interrupt remapping support\"). Turn on interrupt remapping (x2APIC) in the firmware and do not boot with intremap=off; as a last resort, {UNSAFE} lets a guest forge interrupts to the host"
            ),
        ),
        None if unsafe_on => out.warn(
            ID,
            format!("{UNSAFE} is set: a guest can forge interrupts to the host unless the IOMMU remaps them"),
        ),
        None => out.unknown(
            ID,
            "whether the IOMMU remaps interrupts (IR- chips in /proc/interrupts; interrupt_remapping in a machine file's [host])",
        ),
    }
}

fn acs_override(cx: &Context<'_>, out: &mut Findings) {
    const ID: &str = "iommu.acs-override";
    let Some(words) = cx.cmdline_words() else {
        out.unknown(
            ID,
            "the kernel command line (/proc/cmdline; cmdline in a machine file)",
        );
        return;
    };
    match words.iter().find(|w| w.starts_with("pcie_acs_override")) {
        Some(word) => out.warn(
            ID,
            format!(
                "{word} is on the kernel command line: it splits IOMMU groups the hardware does not isolate, so a passed-through device can still reach the others of its real group by DMA (peer to peer), the host's included. Prefer a slot with an isolated group and drop it; keep it only if you accept that"
            ),
        ),
        None => out.ok(
            ID,
            "no pcie_acs_override: the IOMMU groups are as isolated as the hardware says",
        ),
    }
}
