//! Every check on fixture trees (a host laid out as the real kernel, /etc
//! and /usr/share lay it out), ok, warn and fail each; then on machine
//! files, with and without a `[host]` section, and the Z77 stories.

use std::path::{Path, PathBuf};

use vfiod_dbus::Severity;

use super::*;
use crate::kernel::sim::SimKernel;
use vfiod_host::sysfs::fixture::Fixture;

const ROOT_PORT: &str = "0000:00:01.0";
const GPU: &str = "0000:01:00.0";
const AUDIO: &str = "0000:01:00.1";
const IGPU: &str = "0000:00:02.0";
const OTHER_PORT: &str = "0000:00:1c.0";
const USB_CARD: &str = "0000:03:00.0";

const CONFIG: &str = r#"
[profiles.gpu]
devices = ["0000:01:00.0", "0000:01:00.1"]
vms = ["win10"]

[profiles.usb]
devices = ["0000:03:00.0"]
vms = ["win10"]
"#;

const WIN10: &str = "<domain type='kvm'>
  <name>win10</name>
  <memory unit='KiB'>8388608</memory>
  <devices>
    <hostdev mode='subsystem' type='pci' managed='no'>
      <source><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='pci' managed='no'>
      <source><address domain='0x0000' bus='0x01' slot='0x00' function='0x1'/></source>
    </hostdev>
  </devices>
</domain>
";

fn firmware_descriptor() -> String {
    format!(
        r#"{{"interface-types": ["uefi"],
 "mapping": {{"device": "flash",
   "executable": {{"filename": "/usr/share/OVMF/OVMF_CODE_4M.fd", "format": "raw"}},
   "nvram-template": {{"filename": "/usr/share/OVMF/OVMF_VARS_4M.fd", "format": "raw"}}}},
 "targets": [{{"architecture": "{}", "machines": ["pc-q35-*"]}}]}}"#,
        std::env::consts::ARCH
    )
}

/// A host where every check passes: an Intel desktop with the IOMMU on,
/// vfio loaded, an NVIDIA card alone in its group behind the CPU's root
/// port (the iGPU is the boot VGA), a USB card with nothing plugged in,
/// libvirt set up with OVMF readable, vfiod's hook and a domain that uses
/// the card with managed='no'.
fn good_host() -> Fixture {
    let fx = Fixture::new();
    fx.cpu_flags("fpu vme de pse tsc msr pae vmx smx est");
    fx.cmdline("BOOT_IMAGE=/vmlinuz-6.1.0 root=/dev/sda2 ro intel_iommu=on iommu=pt");
    fx.kvm();
    fx.acpi_tables(&["APIC", "DMAR", "FACP", "MCFG"]);
    fx.write(
        "proc/interrupts",
        "           CPU0\n  0:  38  IR-IO-APIC    2-edge  timer\n 25:  7  IR-PCI-MSI-0000:00:14.0  0-edge  xhci_hcd\n",
    );
    fx.write("proc/meminfo", "MemTotal:       32768000 kB\n");
    fx.hugepages(2048, 0, 0);
    fx.hugepages(1048576, 0, 0);
    for module in ["vfio", "vfio_pci", "vfio_iommu_type1"] {
        fx.loaded_module(module);
    }
    fx.register_driver("vfio-pci");

    fx.pci(ROOT_PORT)
        .id("8086:1901")
        .class("0x060400")
        .driver("pcieport")
        .group(1)
        .add();
    for (address, id, class, driver) in [
        (GPU, "10de:1b80", "0x030000", "nouveau"),
        (AUDIO, "10de:10f0", "0x040300", "snd_hda_intel"),
    ] {
        let mut function = fx
            .pci(address)
            .behind(ROOT_PORT)
            .id(id)
            .class(class)
            .driver(driver)
            .group(1)
            .reset_methods("flr bus");
        if class == "0x030000" {
            function = function.boot_vga(false);
        }
        let dir = function.add();
        fx.write(dir.join("d3cold_allowed"), "1\n");
    }
    fx.pci(IGPU)
        .id("8086:3e92")
        .class("0x030000")
        .driver("i915")
        .group(0)
        .boot_vga(true)
        .reset_methods("flr")
        .add();
    fx.pci(OTHER_PORT)
        .id("8086:a340")
        .class("0x060400")
        .driver("pcieport")
        .group(7)
        .add();
    let card = fx
        .pci(USB_CARD)
        .behind(OTHER_PORT)
        .id("1b21:2142")
        .class("0x0c0330")
        .driver("xhci_hcd")
        .group(8)
        .reset_methods("flr")
        .add();
    fx.write(card.join("d3cold_allowed"), "0\n");

    fx.accounts(
        "root",
        "root",
        "libvirt-qemu:x:64055:108::/var/lib/libvirt:/usr/sbin/nologin\nnobody:x:65534:65534::/:/bin/false\n",
        "kvm:x:104:libvirt-qemu\nlibvirt-qemu:x:108:\nnobody:x:65534:\n",
    );
    fx.write(
        "etc/libvirt/qemu.conf",
        "#user = \"libvirt-qemu\"\n#group = \"libvirt-qemu\"\n",
    );
    fx.write(
        "usr/share/qemu/firmware/60-ovmf.json",
        &firmware_descriptor(),
    );
    fx.write_mode("usr/share/OVMF/OVMF_CODE_4M.fd", "code", 0o644);
    fx.write_mode("usr/share/OVMF/OVMF_VARS_4M.fd", "vars", 0o644);
    fx.write_mode(
        "etc/libvirt/hooks/qemu.d/vfiod",
        "#!/bin/sh\ncase \"$2 $3\" in\n\"prepare begin\" | \"release end\") exec /usr/bin/vfioctl libvirt-hook \"$@\" ;;\nesac\n",
        0o755,
    );
    fx.write("etc/libvirt/qemu/win10.xml", WIN10);
    fx
}

fn config() -> Config {
    Config::parse(CONFIG, Path::new("vfiod.toml")).unwrap()
}

fn run(fx: &Fixture, target: &str) -> Vec<Finding> {
    inspect(&fx.kernel(), &config(), target).unwrap()
}

fn with_id<'a>(findings: &'a [Finding], id: &str) -> Vec<&'a Finding> {
    findings.iter().filter(|f| f.id == id).collect()
}

/// The one finding `id`, asserted to have `severity`; its message.
#[track_caller]
fn expect(findings: &[Finding], id: &str, severity: Severity) -> String {
    let found = with_id(findings, id);
    assert_eq!(found.len(), 1, "one {id} in {findings:#?}");
    assert_eq!(found[0].severity, severity, "{id}: {}", found[0].message);
    found[0].message.clone()
}

#[track_caller]
fn expect_unknown(findings: &[Finding], id: &str) {
    let message = expect(findings, id, Severity::Ok);
    assert!(message.starts_with(UNKNOWN), "{id}: {message}");
}

fn is_unknown(f: &Finding) -> bool {
    f.message.starts_with(UNKNOWN)
}

#[test]
fn a_good_host_passes_every_check_and_knows_every_fact() {
    let fx = good_host();
    for target in ["", "gpu", "usb"] {
        let findings = run(&fx, target);
        for f in &findings {
            assert_eq!(f.severity, Severity::Ok, "{target:?}: {f:?}");
            assert!(!is_unknown(f), "{target:?}: {f:?}");
        }
        assert!(findings.len() >= 13, "{findings:#?}");
    }
    let gpu = run(&fx, "gpu");
    for id in [
        "group.members",
        "boot-gpu.boot-vga",
        "boot-gpu.framebuffer",
        "memory.pinned",
        "libvirt.managed",
    ] {
        assert!(!with_id(&gpu, id).is_empty(), "no {id} in {gpu:#?}");
    }
    assert_eq!(with_id(&gpu, "reset.method").len(), 2);
    let message = expect(&gpu, "memory.pinned", Severity::Ok);
    assert!(
        message.contains("win10 pins 8 GiB") && message.contains("31.2 GiB"),
        "{message}"
    );
    let message = expect(&gpu, "libvirt.ovmf", Severity::Ok);
    assert!(
        message.contains("libvirt-qemu:libvirt-qemu")
            && message.contains("commented-out")
            && message.contains("/usr/share/OVMF/OVMF_CODE_4M.fd (root:root 0644)"),
        "{message}"
    );
    assert!(expect(&gpu, "libvirt.managed", Severity::Ok).contains("managed='no' in win10"));
    // No target: no per-device checks.
    let host = run(&fx, "");
    for area in [
        "group.",
        "boot-gpu.",
        "reset.",
        "power.",
        "usb.",
        "memory.pinned",
    ] {
        assert!(
            !host.iter().any(|f| f.id.starts_with(area)),
            "{area} in {host:#?}"
        );
    }
}

#[test]
fn virtualization_off_in_the_cpu_the_firmware_or_kvm_fails() {
    let fx = good_host();
    fx.cpu_flags("fpu vme de pse tsc msr pae smx est");
    fx.remove("dev/kvm");
    fx.remove("sys/firmware/acpi/tables/DMAR");
    let findings = run(&fx, "");
    assert!(expect(&findings, "cpu.virtualization", Severity::Fail).contains("firmware setup"));
    assert!(expect(&findings, "kvm", Severity::Fail).contains("modprobe kvm_intel"));
    assert!(expect(&findings, "firmware.iommu-table", Severity::Fail).contains("VT-d"));

    fx.remove("proc/cpuinfo");
    fx.remove("sys/firmware/acpi/tables");
    let findings = run(&fx, "");
    expect_unknown(&findings, "cpu.virtualization");
    expect_unknown(&findings, "firmware.iommu-table");

    let fx = good_host();
    fx.cpu_flags("fpu svm");
    fx.acpi_tables(&["IVRS"]);
    fx.remove("sys/firmware/acpi/tables/DMAR");
    let findings = run(&fx, "");
    assert!(expect(&findings, "cpu.virtualization", Severity::Ok).contains("AMD-V"));
    assert!(expect(&findings, "firmware.iommu-table", Severity::Ok).contains("IVRS"));
}

#[test]
fn no_iommu_groups_fails_with_the_command_line_advice() {
    let fx = Fixture::new();
    fx.cpu_flags("vmx");
    fx.cmdline("root=/dev/sda2 quiet");
    fx.acpi_tables(&["DMAR"]);
    fx.pci(GPU)
        .id("10de:1b80")
        .class("0x030000")
        .driver("nouveau")
        .add();
    let findings = inspect(&fx.kernel(), &Config::default(), GPU).unwrap();
    let message = expect(&findings, "iommu.enabled", Severity::Fail);
    assert!(message.contains("intel_iommu=on iommu=pt"), "{message}");
    assert!(expect(&findings, "group.members", Severity::Fail).contains("no IOMMU group"));

    fx.cmdline("root=/dev/sda2 intel_iommu=off");
    let findings = inspect(&fx.kernel(), &Config::default(), "").unwrap();
    assert!(expect(&findings, "iommu.enabled", Severity::Fail).contains("remove intel_iommu=off"));

    let fx = good_host();
    fx.cmdline("root=/dev/sda2 intel_iommu=on");
    assert!(expect(&run(&fx, ""), "iommu.enabled", Severity::Ok).contains("iommu=pt"));
}

#[test]
fn interrupt_remapping_off_fails_and_allow_unsafe_interrupts_warns() {
    let fx = good_host();
    fx.write(
        "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts",
        "Y\n",
    );
    assert!(
        expect(&run(&fx, ""), "iommu.interrupt-remapping", Severity::Warn)
            .contains("allow_unsafe_interrupts")
    );
    fx.write(
        "proc/interrupts",
        "           CPU0\n  0:  38  IO-APIC    2-edge  timer\n 25:  7  PCI-MSI-0000:00:14.0  0-edge  xhci_hcd\n",
    );
    assert!(
        expect(&run(&fx, ""), "iommu.interrupt-remapping", Severity::Warn)
            .contains("forge interrupts")
    );
    fx.write(
        "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts",
        "N\n",
    );
    assert!(
        expect(&run(&fx, ""), "iommu.interrupt-remapping", Severity::Fail)
            .contains("No interrupt remapping support")
    );
    fx.remove("proc/interrupts");
    expect_unknown(&run(&fx, ""), "iommu.interrupt-remapping");
}

#[test]
fn pcie_acs_override_warns_that_isolation_is_given_up() {
    let fx = good_host();
    fx.cmdline("intel_iommu=on pcie_acs_override=downstream,multifunction");
    let message = expect(&run(&fx, ""), "iommu.acs-override", Severity::Warn);
    assert!(
        message.contains("pcie_acs_override=downstream,multifunction"),
        "{message}"
    );
    fx.remove("proc/cmdline");
    expect_unknown(&run(&fx, ""), "iommu.acs-override");
}

#[test]
fn vfio_modules_loaded_built_in_loadable_or_missing() {
    let fx = good_host();
    fx.remove("sys/module/vfio_pci");
    fx.remove("sys/bus/pci/drivers/vfio-pci");
    fx.remove("sys/module/vfio");
    fx.remove("sys/module/vfio_iommu_type1");
    let findings = run(&fx, "");
    for id in [
        "modules.vfio",
        "modules.vfio-pci",
        "modules.vfio-iommu-type1",
    ] {
        assert!(
            expect(&findings, id, Severity::Fail).contains("is missing"),
            "{id}"
        );
    }
    fx.module_list(
        "modules.dep",
        "kernel/drivers/vfio/pci/vfio-pci.ko.zst: kernel/drivers/vfio/vfio.ko.zst\nkernel/drivers/vfio/vfio.ko.zst:\n",
    );
    fx.module_list(
        "modules.builtin",
        "kernel/drivers/vfio/vfio_iommu_type1.ko\n",
    );
    let findings = run(&fx, "");
    assert!(expect(&findings, "modules.vfio-pci", Severity::Ok).contains("first bind"));
    assert!(expect(&findings, "modules.vfio", Severity::Ok).contains("not loaded yet"));
    assert!(expect(&findings, "modules.vfio-iommu-type1", Severity::Ok).contains("built into"));
    // On disk, but vfiod may not load it (ProtectKernelModules=yes).
    fx.write(
        "proc/self/status",
        "CapEff:\t000001fffffeffff\nCapBnd:\t000001fffffeffff\n",
    );
    let findings = run(&fx, "");
    let message = expect(&findings, "modules.vfio-pci", Severity::Fail);
    assert!(
        message.contains("CAP_SYS_MODULE") && message.contains("systemd/vfio-pci.conf"),
        "{message}"
    );
}

#[test]
fn a_kernel_without_driver_override_fails() {
    let fx = good_host();
    for address in [GPU, AUDIO] {
        fx.remove(fx.function_dir(address).join("driver_override"));
    }
    let message = expect(&run(&fx, "gpu"), "modules.driver-override", Severity::Fail);
    assert!(message.contains("3.16"), "{message}");
}

#[test]
fn a_target_claimed_through_vfio_pci_ids_warns() {
    let fx = good_host();
    fx.cmdline("intel_iommu=on iommu=pt vfio-pci.ids=10de:1b80,10de:10f0");
    let findings = run(&fx, "gpu");
    let claims = with_id(&findings, "modules.vfio-pci-ids");
    assert_eq!(claims.len(), 2, "{findings:#?}");
    assert!(claims.iter().all(|f| f.severity == Severity::Warn));
    assert!(claims[0].message.contains("instead of its host driver"));
    let host = run(&fx, "");
    assert!(expect(&host, "modules.vfio-pci-ids", Severity::Ok).contains("10de:1b80"));
}

#[test]
fn a_group_with_an_endpoint_on_a_host_driver_fails_and_names_it() {
    let fx = good_host();
    // An NVMe drive in another slot of the same group (no ACS on the port).
    fx.pci("0000:02:00.0")
        .id("144d:a808")
        .class("0x010802")
        .driver("nvme")
        .group(1)
        .add();
    let message = expect(&run(&fx, "gpu"), "group.members", Severity::Fail);
    assert!(
        message.contains("0000:02:00.0 on nvme")
            && message.contains("slot")
            && message.contains("0000:00:01.0 on pcieport (bridge, may stay)")
            && message.contains("0000:01:00.0 on nouveau (moves)"),
        "{message}"
    );
    // Once it has no driver it does not block.
    fx.unbind("0000:02:00.0");
    let message = expect(&run(&fx, "gpu"), "group.members", Severity::Ok);
    assert!(message.contains("not in use by the host"), "{message}");
}

#[test]
fn the_boot_gpu_with_a_firmware_framebuffer_fails_and_explains_both_ways_out() {
    let fx = good_host();
    let efi = fx.platform_device("efi-framebuffer.0");
    fx.framebuffer(0, &efi);
    fx.write("proc/fb", "0 EFI VGA\n");
    fx.write(
        "proc/iomem",
        "80000000-9fffffff : PCI Bus 0000:00\n  90000000-9fffffff : 0000:00:02.0\n    90000000-902fffff : efifb\n",
    );
    let findings = run(&fx, IGPU);
    let boot = expect(&findings, "boot-gpu.boot-vga", Severity::Fail);
    assert!(
        boot.contains("Primary Display")
            && boot.contains("video=efifb:off")
            && boot.contains("initcall_blacklist=sysfb_init")
            && boot.contains("with a single GPU, set handoff = true in its profile"),
        "{boot}"
    );
    let fb = expect(&findings, "boot-gpu.framebuffer", Severity::Fail);
    assert!(
        fb.contains("EFI VGA") && fb.contains("can't reserve") && fb.contains("boot-gpu.boot-vga"),
        "{fb}"
    );
    // The card meant for the guest is not affected.
    expect(&run(&fx, "gpu"), "boot-gpu.boot-vga", Severity::Ok);
    expect(&run(&fx, "gpu"), "boot-gpu.framebuffer", Severity::Ok);

    // The firmware may have set up the card in the slot rather than the
    // one boot_vga names: the framebuffer check finds it by its memory.
    fx.write(
        "proc/iomem",
        "c0000000-cfffffff : PCI Bus 0000:01\n  c0000000-cfffffff : 0000:01:00.0\n    c0000000-c02fffff : efifb\n",
    );
    let findings = run(&fx, "gpu");
    expect(&findings, "boot-gpu.boot-vga", Severity::Ok);
    let fb = expect(&findings, "boot-gpu.framebuffer", Severity::Fail);
    assert!(
        fb.contains("0000:01:00.0")
            && fb.contains("video=efifb:off")
            && fb.contains("Primary Display"),
        "{fb}"
    );
}

#[test]
fn the_kernel_console_on_the_target_fails() {
    let fx = good_host();
    fx.framebuffer(0, fx.function_dir(IGPU));
    fx.write("proc/fb", "0 i915drmfb\n");
    fx.vtconsole(1, "frame buffer device", true);
    let message = expect(&run(&fx, IGPU), "boot-gpu.framebuffer", Severity::Fail);
    assert!(
        message.contains("console draws on") && message.contains("i915drmfb"),
        "{message}"
    );
}

#[test]
fn the_boot_vga_kept_free_by_the_command_line_only_warns() {
    let fx = good_host();
    fx.cmdline("intel_iommu=on iommu=pt video=efifb:off");
    fx.write("proc/fb", "");
    let findings = run(&fx, IGPU);
    assert!(expect(&findings, "boot-gpu.boot-vga", Severity::Warn).contains("ROM"));
    expect(&findings, "boot-gpu.framebuffer", Severity::Ok);
}

#[test]
fn reset_methods_none_legacy_and_listed() {
    let fx = good_host();
    let gpu_dir = fx.function_dir(GPU);
    fx.remove(gpu_dir.join("reset_method"));
    let findings = run(&fx, "gpu");
    let resets = with_id(&findings, "reset.method");
    assert_eq!(resets[0].severity, Severity::Warn);
    assert!(
        resets[0].message.starts_with("0000:01:00.0")
            && resets[0].message.contains("no reset method")
    );
    assert_eq!(resets[1].severity, Severity::Ok);
    assert!(
        resets[1].message.contains("reset = flr bus"),
        "{}",
        resets[1].message
    );
    fx.write(gpu_dir.join("reset"), "");
    let findings = run(&fx, "gpu");
    assert!(
        with_id(&findings, "reset.method")[0]
            .message
            .contains("does not say how")
    );
}

/// good_host with an RX 580 instead of the NVIDIA card.
fn polaris_host(reset_method: &str) -> Fixture {
    let fx = good_host();
    fx.set_id(GPU, "1002:67df");
    let dir = fx.function_dir(GPU);
    fx.write(dir.join("reset_method"), &format!("{reset_method}\n"));
    fx
}

#[test]
fn an_amd_gpu_with_the_reset_bug_warns_until_vendor_reset_is_loaded_and_selected() {
    let fx = polaris_host("bus");
    let message = expect(&run(&fx, "gpu"), "reset.amd-bug", Severity::Warn);
    assert!(
        message.contains("Polaris 10")
            && message.contains("vendor-reset is not loaded")
            && message.contains("under [profiles.gpu]")
            && message.contains("reset_method = \"device_specific\""),
        "{message}"
    );
    fx.loaded_module("vendor_reset");
    assert!(expect(&run(&fx, "gpu"), "reset.amd-bug", Severity::Warn).contains("not selected"));
    fx.write(
        fx.function_dir(GPU).join("reset_method"),
        "device_specific bus\n",
    );
    expect(&run(&fx, "gpu"), "reset.amd-bug", Severity::Ok);
    // Only listed GPUs: the NVIDIA card of good_host has no such finding.
    assert!(with_id(&run(&good_host(), "gpu"), "reset.amd-bug").is_empty());
}

#[test]
fn d3cold_warns_only_where_the_platform_can_cut_power() {
    let fx = good_host();
    fx.write(
        fx.function_dir(GPU)
            .join("firmware_node/power_resources_D3hot/LNXPOWER:00"),
        "",
    );
    fx.write(fx.function_dir(AUDIO).join("d3cold_allowed"), "0\n");
    let findings = run(&fx, "gpu");
    let power = with_id(&findings, "power.d3cold");
    assert_eq!(power.len(), 2);
    assert_eq!(power[0].severity, Severity::Warn);
    assert!(
        power[0]
            .message
            .contains("echo 0 > /sys/bus/pci/devices/0000:01:00.0/d3cold_allowed")
    );
    assert_eq!(power[1].severity, Severity::Ok);
    assert!(power[1].message.contains("never enters D3cold"));
}

#[test]
fn hugepages_a_domain_asks_for_must_be_reserved() {
    let fx = good_host();
    fx.write(
        "etc/libvirt/qemu/win10.xml",
        &WIN10.replace(
            "<devices>",
            "<memoryBacking><hugepages/></memoryBacking>\n  <devices>",
        ),
    );
    let message = expect(&run(&fx, "gpu"), "memory.hugepages", Severity::Fail);
    assert!(
        message.contains("win10 asks for hugepages") && message.contains("hugepages=8"),
        "{message}"
    );
    fx.hugepages(1048576, 8, 4);
    let message = expect(&run(&fx, "gpu"), "memory.hugepages", Severity::Warn);
    assert!(
        message.contains("8 × 1 GiB (4 free)") && message.contains("want"),
        "{message}"
    );
    fx.hugepages(1048576, 8, 8);
    expect(&run(&fx, "gpu"), "memory.hugepages", Severity::Ok);
    fx.remove("sys/kernel/mm/hugepages");
    expect_unknown(&run(&fx, ""), "memory.hugepages");
}

#[test]
fn a_vm_pinning_most_of_the_hosts_memory_warns() {
    let fx = good_host();
    fx.write("proc/meminfo", "MemTotal:        8388608 kB\n");
    let message = expect(&run(&fx, "gpu"), "memory.pinned", Severity::Warn);
    assert!(message.contains("most of the host's 8 GiB"), "{message}");
}

#[test]
fn ovmf_that_qemus_user_cannot_read_fails() {
    let fx = good_host();
    fx.write_mode("usr/share/OVMF/OVMF_CODE_4M.fd", "code", 0o640);
    let message = expect(&run(&fx, ""), "libvirt.ovmf", Severity::Fail);
    assert!(
        message.starts_with("QEMU runs as libvirt-qemu:libvirt-qemu")
            && message.contains("cannot read /usr/share/OVMF/OVMF_CODE_4M.fd (root:root 0640)")
            && !message.contains("OVMF_VARS")
            && message.contains("/etc/libvirt/qemu.conf"),
        "{message}"
    );
    // Running QEMU as root reads anything.
    fx.write(
        "etc/libvirt/qemu.conf",
        "user = \"root\"\ngroup = \"root\"\n",
    );
    expect(&run(&fx, ""), "libvirt.ovmf", Severity::Ok);
    // Unset without a hint: libvirt's upstream default, root.
    fx.write("etc/libvirt/qemu.conf", "# nothing\n");
    assert!(expect(&run(&fx, ""), "libvirt.ovmf", Severity::Ok).contains("as root:root"));

    fx.remove("usr/share/OVMF/OVMF_VARS_4M.fd");
    let message = expect(&run(&fx, ""), "libvirt.ovmf", Severity::Fail);
    assert!(
        message.contains("OVMF_VARS_4M.fd (named by /usr/share/qemu/firmware/60-ovmf.json)"),
        "{message}"
    );

    fx.remove("usr/share/qemu/firmware/60-ovmf.json");
    let message = expect(&run(&fx, ""), "libvirt.ovmf", Severity::Warn);
    assert!(message.contains("Install OVMF"), "{message}");
    fx.remove("usr/share/qemu");
    expect_unknown(&run(&fx, ""), "libvirt.ovmf");
}

#[test]
fn the_hook_missing_or_not_executable_warns() {
    let fx = good_host();
    fx.write_mode(
        "etc/libvirt/hooks/qemu.d/vfiod",
        "#!/bin/sh\nexec /usr/bin/vfioctl libvirt-hook \"$@\"\n",
        0o644,
    );
    assert!(expect(&run(&fx, ""), "libvirt.hook", Severity::Warn).contains("chmod +x"));
    fx.remove("etc/libvirt/hooks");
    assert!(expect(&run(&fx, ""), "libvirt.hook", Severity::Warn).contains("not installed"));
    fx.remove("etc/libvirt");
    expect_unknown(&run(&fx, ""), "libvirt.hook");
}

#[test]
fn a_domain_taking_the_target_with_managed_yes_warns() {
    let fx = good_host();
    fx.write(
        "etc/libvirt/qemu/old.xml",
        "<domain><name>old-win10</name><devices><hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x01' slot='0x00' function='0x1'/></source></hostdev></devices></domain>",
    );
    let findings = run(&fx, "gpu");
    let message = expect(&findings, "libvirt.managed", Severity::Warn);
    assert!(
        message.contains("old-win10")
            && message.contains("0000:01:00.1")
            && message.contains("managed='no'")
            && message.contains("leaves it on vfio-pci when this one stops"),
        "{message}"
    );
    // Its memory counts too: it uses the card.
    assert!(expect(&findings, "memory.pinned", Severity::Ok).contains("old-win10"));
}

/// Someone who may not move devices is not told libvirt's domain names
/// nor their files, which only root can read.
#[test]
fn a_redacted_check_names_no_domain() {
    let fx = good_host();
    fx.write(
        "etc/libvirt/qemu/old.xml",
        "<domain><name>old-win10</name><memory unit='KiB'>4194304</memory><devices><hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x01' slot='0x00' function='0x1'/></source></hostdev></devices></domain>",
    );
    let findings = inspect_for(&fx.kernel(), &config(), "gpu", Disclosure::Redacted).unwrap();
    let message = expect(&findings, "libvirt.managed", Severity::Warn);
    assert!(
        message.contains("a libvirt domain") && message.contains("0000:01:00.1"),
        "{message}"
    );
    for finding in &findings {
        for secret in ["old-win10", "win10", "old.xml"] {
            assert!(
                !finding.message.contains(secret),
                "{} tells {secret}: {}",
                finding.id,
                finding.message
            );
        }
    }
}

#[test]
fn usb_devices_behind_the_controller_with_input_devices_called_out() {
    let fx = good_host();
    let card = fx.function_dir(USB_CARD);
    let hub = fx.usb_device(
        &card,
        "usb3",
        "1d6b:0003",
        "xHCI Host Controller",
        "09",
        &["09"],
    );
    fx.usb_device(&hub, "3-1", "0bc2:2322", "Expansion Desk", "00", &["08"]);
    let message = expect(&run(&fx, "usb"), "usb.devices", Severity::Ok);
    assert!(
        message.contains("Expansion Desk (0bc2:2322 at 3-1, mass storage)"),
        "{message}"
    );
    fx.usb_device(
        &hub,
        "3-2",
        "046d:c31c",
        "USB Keyboard",
        "00",
        &["03", "03"],
    );
    let message = expect(&run(&fx, "usb"), "usb.devices", Severity::Warn);
    assert!(
        message.contains("USB Keyboard (046d:c31c at 3-2, HID input)"),
        "{message}"
    );
}

#[test]
fn usb_controllers_with_reported_kernel_trouble_warn_on_affected_kernels() {
    let fx = good_host();
    fx.set_id(USB_CARD, "1022:149c");
    // The fixture runs 6.1: Matisse's FLR trouble was fixed in 5.8.
    let message = expect(&run(&fx, "usb"), "usb.kernel", Severity::Ok);
    assert!(
        message.contains("kernels before 5.8") && message.contains("outside"),
        "{message}"
    );
    fx.write("proc/sys/kernel/osrelease", "5.4.0-42-generic\n");
    let message = expect(&run(&fx, "usb"), "usb.kernel", Severity::Warn);
    assert!(
        message.contains("Matisse") && message.contains("lore.kernel.org"),
        "{message}"
    );
    // Renesas uPD720202: reported on every kernel.
    fx.set_id(USB_CARD, "1912:0015");
    let message = expect(&run(&fx, "usb"), "usb.kernel", Severity::Warn);
    assert!(message.contains("renesas_usb_fw.mem"), "{message}");
    fx.remove("proc/sys/kernel/osrelease");
    fx.set_id(USB_CARD, "1033:0194");
    expect_unknown(&run(&fx, "usb"), "usb.kernel");
}

// --- Machine files ---------------------------------------------------------

mod machines;
