//! The doctor on the shipped simulated machines.

use super::*;

fn machines() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../machines")
}

/// A machine booted from `text` in a state dir removed afterwards.
struct Sim {
    kernel: SimKernel,
    dir: PathBuf,
}

impl Sim {
    fn from_text(text: &str) -> Sim {
        let dir = nix::unistd::mkdtemp(&std::env::temp_dir().join("vfiod-doctor-XXXXXX")).unwrap();
        let machine =
            vfiod_pci::machine::MachineFile::parse(text, Path::new("machine.toml")).unwrap();
        let kernel = SimKernel::from_machine(machine, &dir).unwrap();
        Sim { kernel, dir }
    }

    fn named(name: &str) -> Sim {
        Sim::from_text(&std::fs::read_to_string(machines().join(name)).unwrap())
    }

    fn run(&self, config: &str, target: &str) -> Vec<Finding> {
        let config = Config::load(&machines().join(config)).unwrap();
        inspect(&self.kernel, &config, target).unwrap()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const Z77: &str = "z77-rx580.toml";
const Z77_CONFIG: &str = "z77-rx580.vfiod.toml";

#[test]
fn z77_rx580_is_fine_on_groups_warns_on_the_polaris_reset_bug_and_resets_by_bus() {
    let findings = Sim::named(Z77).run(Z77_CONFIG, "rx580");
    let group = expect(&findings, "group.members", Severity::Ok);
    assert!(
        group.contains("IOMMU group 1")
            && group.contains("0000:00:01.0 (Xeon E3-1200 v2/3rd Gen Core processor PCI Express Root Port) on pcieport (bridge, may stay)")
            && group.contains("0000:01:00.1"),
        "{group}"
    );
    let bug = expect(&findings, "reset.amd-bug", Severity::Warn);
    assert!(
        bug.contains("Polaris 10") && bug.contains("vendor-reset is not loaded"),
        "{bug}"
    );
    // The fix names the profile's key, as a line to paste.
    assert!(
        bug.contains("reset_method = \"device_specific\"") && bug.contains("[profiles.rx580]"),
        "{bug}"
    );
    let resets = with_id(&findings, "reset.method");
    assert_eq!(resets.len(), 2);
    for reset in resets {
        assert_eq!(reset.severity, Severity::Ok);
        assert!(reset.message.contains("reset = bus"), "{}", reset.message);
    }
    expect(&findings, "boot-gpu.boot-vga", Severity::Ok);
    expect(&findings, "boot-gpu.framebuffer", Severity::Ok);
    // The one failure is the host's: OVMF.
    let fails: Vec<&str> = findings
        .iter()
        .filter(|f| f.severity == Severity::Fail)
        .map(|f| f.id.as_str())
        .collect();
    assert_eq!(fails, ["libvirt.ovmf"]);
}

#[test]
fn z77_ovmf_unreadable_by_nobody_fails() {
    let findings = Sim::named(Z77).run(Z77_CONFIG, "");
    let message = expect(&findings, "libvirt.ovmf", Severity::Fail);
    assert!(
        message.starts_with(
            "QEMU runs as nobody:nobody (set in /etc/libvirt/qemu.conf) and cannot read /usr/share/ovmf/x64/OVMF_CODE.fd (root:kvm 0640)"
        ) && message.contains("Set user and group in /etc/libvirt/qemu.conf")
            && message.contains("chmod"),
        "{message}"
    );
}

#[test]
fn z77_boot_gpu_fails_and_explains_the_firmware_setting_and_the_kernel_options() {
    let findings = Sim::named(Z77).run(Z77_CONFIG, "06:00.0");
    let boot = expect(&findings, "boot-gpu.boot-vga", Severity::Fail);
    assert!(
        boot.contains("0000:06:00.0")
            && boot.contains("boot VGA")
            && boot.contains("IGFX")
            && boot.contains("video=efifb:off")
            && boot.contains("initcall_blacklist=sysfb_init"),
        "{boot}"
    );
    let fb = expect(&findings, "boot-gpu.framebuffer", Severity::Fail);
    assert!(fb.contains("console") && fb.contains("radeondrmfb"), "{fb}");
    // Both functions of the slot, in their group of bridges.
    expect(&findings, "group.members", Severity::Ok);
}

#[test]
fn z77_usb_card_and_chipset_controller() {
    let sim = Sim::named(Z77);
    let findings = sim.run(Z77_CONFIG, "usb3");
    let message = expect(&findings, "usb.kernel", Severity::Ok);
    assert!(
        message.contains("after 4.15.10") && message.contains("4.15.10-1-ARCH"),
        "{message}"
    );
    expect(&findings, "usb.devices", Severity::Ok);
    let findings = sim.run(Z77_CONFIG, "00:14.0");
    assert!(expect(&findings, "usb.devices", Severity::Warn).contains("USB keyboard"));
}

#[test]
fn a_machine_without_host_facts_reports_them_unknown_never_failed() {
    let text = std::fs::read_to_string(machines().join(Z77)).unwrap();
    let start = text.find("[host]").unwrap();
    let end = text[start..].find("[[device]]").unwrap() + start;
    let without = format!("{}{}", &text[..start], &text[end..]);
    let sim = Sim::from_text(&without);
    for target in ["", "rx580"] {
        let findings = sim.run(Z77_CONFIG, target);
        let fails: Vec<&Finding> = findings
            .iter()
            .filter(|f| f.severity == Severity::Fail)
            .collect();
        assert!(fails.is_empty(), "{fails:#?}");
        for id in [
            "cpu.virtualization",
            "kvm",
            "firmware.iommu-table",
            "iommu.interrupt-remapping",
            "memory.hugepages",
            "libvirt.ovmf",
            "libvirt.hook",
        ] {
            expect_unknown(&findings, id);
        }
        // What the PCI model says is still checked.
        expect(&findings, "iommu.enabled", Severity::Ok);
        assert!(!is_unknown(with_id(&findings, "iommu.acs-override")[0]));
    }
    let findings = sim.run(Z77_CONFIG, "rx580");
    expect_unknown(&findings, "power.d3cold");
    expect_unknown(&findings, "boot-gpu.framebuffer");
    expect(&findings, "reset.amd-bug", Severity::Warn);
}

#[test]
fn the_no_iommu_laptop_fails_on_the_firmware_and_the_iommu() {
    let sim = Sim::named("no-iommu-laptop.toml");
    let config = Config::default();
    let findings = inspect(&sim.kernel, &config, "").unwrap();
    expect(&findings, "cpu.virtualization", Severity::Ok);
    expect(&findings, "kvm", Severity::Ok);
    expect(&findings, "firmware.iommu-table", Severity::Fail);
    let message = expect(&findings, "iommu.enabled", Severity::Fail);
    assert!(
        message.contains("firmware setup") && message.contains("intel_iommu=on"),
        "{message}"
    );
    expect(&findings, "iommu.interrupt-remapping", Severity::Warn);
    expect(&findings, "libvirt.ovmf", Severity::Ok);
}

#[test]
fn x570_navi_warns_on_the_navi_reset_bug_and_its_xhci_is_fine_on_6_6() {
    let sim = Sim::named("x570-navi.toml");
    let findings = sim.run("x570-navi.vfiod.toml", "navi");
    assert!(expect(&findings, "reset.amd-bug", Severity::Warn).contains("Navi 10"));
    expect(&findings, "group.members", Severity::Ok);
    let message = expect(&findings, "memory.hugepages", Severity::Ok);
    assert!(message.contains("16 × 1 GiB (16 free)"), "{message}");
    assert!(expect(&findings, "libvirt.ovmf", Severity::Ok).contains("qemu:qemu"));
    let findings = sim.run("x570-navi.vfiod.toml", "usb");
    let message = expect(&findings, "usb.kernel", Severity::Ok);
    assert!(
        message.contains("Matisse") && message.contains("6.6.8"),
        "{message}"
    );
}

#[test]
fn a_profile_reset_method_is_reported_against_the_reset_table() {
    let text = std::fs::read_to_string(machines().join(Z77))
        .unwrap()
        .replacen(
            "address = \"0000:01:00.0\"\n",
            "address = \"0000:01:00.0\"\nvendor_reset = true\n",
            1,
        )
        .replacen("modules = [", "modules = [\"vendor_reset\", ", 1);
    let sim = Sim::from_text(&text);
    let mut config = Config::load(&machines().join(Z77_CONFIG)).unwrap();
    config.profiles.get_mut("rx580").unwrap().reset_method = Some("device_specific".into());
    // Not set yet (vfiod sets it at start): the profile's key is what counts.
    let findings = inspect(&sim.kernel, &config, "rx580").unwrap();
    let bug = expect(&findings, "reset.amd-bug", Severity::Ok);
    assert!(bug.contains("profile rx580"), "{bug}");
    let profile = expect(&findings, "reset.profile", Severity::Warn);
    assert!(profile.contains("no function of it has"), "{profile}");
    // Set, as vfiod does at start: the GPU has it, the audio keeps its own.
    sim.kernel
        .set_reset_method(&"0000:01:00.0".parse().unwrap(), "device_specific")
        .unwrap();
    let findings = inspect(&sim.kernel, &config, "rx580").unwrap();
    let profile = expect(&findings, "reset.profile", Severity::Ok);
    assert!(
        profile.contains("0000:01:00.0") && profile.contains("0000:01:00.1 keeps bus"),
        "{profile}"
    );
}
