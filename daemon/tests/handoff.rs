//! The single-GPU handoff (DESIGN §10) on the simulated B450 desktop whose
//! only GPU, an RX 580, shows everything: the display manager stopped,
//! fbcon and the EFI framebuffer unbound and the GPU's nodes let go before
//! the bind; all of it back after the release; and back too when any step
//! fails.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;
use vfiod::kernel::Inspect;
use vfiod::units::Units;
use vfiod_config::Config;
use vfiod_dbus::Error;
use vfiod_pci::Holder;

const MACHINE: &str = "b450-single-rx580";
const GPU: &str = "0000:09:00.0";
const AUDIO: &str = "0000:09:00.1";

fn machine_text() -> String {
    std::fs::read_to_string(machines_dir().join(format!("{MACHINE}.toml"))).unwrap()
}

fn handoff_config() -> Config {
    Config::load(&machines_dir().join(format!("{MACHINE}.vfiod.toml"))).unwrap()
}

/// The machine with `edit` made to its text, and the shipped config.
fn desktop_with(edit: impl FnOnce(String) -> String) -> Rig {
    Rig::from_text(&edit(machine_text()), handoff_config())
}

/// Where the display is: (display manager running, fbcon bound on
/// vtcon1, efifb bound, holders of the GPU's and audio's nodes).
#[derive(Debug, PartialEq, Eq)]
struct Screen {
    manager: bool,
    fbcon: bool,
    efifb: bool,
    holders: usize,
}

fn screen(rig: &Rig) -> Screen {
    let manager = rig.sim.display_manager().unwrap().is_some_and(|m| m.active);
    let fbcon = rig
        .sim
        .vtconsoles()
        .unwrap()
        .iter()
        .any(|vt| vt.name == "vtcon1" && vt.bound);
    let efifb = rig
        .sim
        .boot_framebuffers()
        .unwrap()
        .iter()
        .any(|fb| fb.name == "efi-framebuffer.0" && fb.driver.is_some());
    let mut nodes = rig.sim.nodes(&addr(GPU)).unwrap();
    nodes.extend(rig.sim.nodes(&addr(AUDIO)).unwrap());
    let holders = rig.sim.holders(&nodes).unwrap().len();
    Screen {
        manager,
        fbcon,
        efifb,
        holders,
    }
}

const SHOWN: Screen = Screen {
    manager: true,
    fbcon: true,
    efifb: true,
    holders: 4,
};

const HANDED_OVER: Screen = Screen {
    manager: false,
    fbcon: false,
    efifb: false,
    holders: 0,
};

/// The steps a move announced, in order.
fn steps_of(run: impl FnOnce(&(dyn Fn(&vfiod_pci::PciAddress, &str) + Sync))) -> Vec<String> {
    let steps = Mutex::new(Vec::new());
    run(&|device, step| steps.lock().unwrap().push(format!("{device} {step}")));
    steps.into_inner().unwrap()
}

#[track_caller]
fn assert_shown_on_host(rig: &Rig, when: &str) {
    assert_eq!(screen(rig), SHOWN, "{when}: the display is not back");
    assert_eq!(rig.driver(GPU).as_deref(), Some("amdgpu"), "{when}");
    assert_eq!(
        rig.driver(AUDIO).as_deref(),
        Some("snd_hda_intel"),
        "{when}"
    );
    assert_eq!(rig.open_moves(), 0, "{when}");
}

#[test]
fn the_display_is_handed_over_for_the_bind_and_given_back_at_release() {
    let rig = Rig::shipped(MACHINE);
    assert_eq!(screen(&rig), SHOWN);
    let engine = rig.engine.clone();
    let steps = steps_of(|progress| {
        engine
            .bind("rx580", &vm("win10"), progress)
            .expect("the bind hands the display over");
    });
    assert_eq!(screen(&rig), HANDED_OVER);
    assert_eq!(rig.driver(GPU).as_deref(), Some("vfio-pci"));
    assert_eq!(rig.driver(AUDIO).as_deref(), Some("vfio-pci"));
    let first: Vec<&str> = steps.iter().take(4).map(String::as_str).collect();
    assert_eq!(
        first,
        [
            "0000:09:00.0 stop display manager sddm.service",
            "0000:09:00.0 unbind fbcon from vtcon1",
            "0000:09:00.0 unbind efi-framebuffer.0 from efi-framebuffer",
            "0000:09:00.0 wait for the display's processes to let go",
        ],
        "{steps:#?}"
    );
    // vtcon0 (the dummy console) is never touched.
    assert!(!rig.sim.vtconsoles().unwrap()[0].bound);

    let engine = rig.engine.clone();
    let steps = steps_of(|progress| {
        engine
            .release("rx580", &vm("win10"), progress)
            .expect("the release gives the display back");
    });
    assert_shown_on_host(&rig, "after the release");
    let last: Vec<&str> = steps
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(String::as_str)
        .collect();
    assert_eq!(
        last,
        [
            "0000:09:00.0 bind efi-framebuffer.0 to efi-framebuffer",
            "0000:09:00.0 bind fbcon to vtcon1",
            "0000:09:00.0 start display manager sddm.service",
        ],
        "{steps:#?}"
    );
    // And again: nothing is left over from the first round.
    rig.bind("rx580").unwrap();
    rig.release("rx580").unwrap();
    assert_shown_on_host(&rig, "after a second round");
}

#[test]
fn without_handoff_the_display_gpu_is_protected_and_the_refusal_names_handoff() {
    let mut config = handoff_config();
    config.profiles.get_mut("rx580").unwrap().handoff = false;
    let rig = Rig::from_text(&machine_text(), config);
    let before = rig.kernel_view();
    let err = rig.bind("rx580").unwrap_err();
    assert!(matches!(err, Error::Protected(_)), "{err:?}");
    assert!(err.message().contains("handoff = true"), "{err}");
    assert_eq!(rig.kernel_view(), before);
    assert_eq!(screen(&rig), SHOWN);
}

/// A bind that fails at `what` leaves the display as it was and nothing
/// moved; the error names the step.
#[track_caller]
fn fails_and_gives_back(rig: &Rig, what: &str, names: &str) -> Error {
    let err = rig.bind("rx580").unwrap_err();
    assert!(err.message().contains(names), "{what}: {err}");
    assert!(
        err.message().contains("the display was given back"),
        "{what}: {err}"
    );
    assert_shown_on_host(rig, what);
    assert!(!rig.engine.handoffs_recorded(), "{what}");
    err
}

#[test]
fn a_display_manager_that_fails_to_stop_is_started_again() {
    let rig = desktop_with(|t| {
        t.replace(
            "unit = \"sddm.service\"\n",
            "unit = \"sddm.service\"\nfault = { stop = \"fail\" }\n",
        )
    });
    let err = fails_and_gives_back(&rig, "stop fails", "stop display manager sddm.service");
    assert!(err.message().contains("failed"), "{err}");
}

#[test]
fn a_display_manager_that_will_not_stop_in_time_is_refused_within_the_bound() {
    let rig = desktop_with(|t| {
        t.replace(
            "unit = \"sddm.service\"\n",
            "unit = \"sddm.service\"\nfault = { stop = \"hang\" }\n",
        )
    })
    .with_timeout_ms(600);
    let started = std::time::Instant::now();
    let err = fails_and_gives_back(
        &rig,
        "stop hangs",
        "the stop job of sddm.service did not end within",
    );
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn fbcon_that_will_not_unbind_brings_the_display_manager_back() {
    let rig = desktop_with(|t| {
        t.replace(
            "{ name = \"vtcon1\", fbcon = true, bound = true, device = \"0000:09:00.0\" }",
            "{ name = \"vtcon1\", fbcon = true, bound = true, device = \"0000:09:00.0\", fault = { unbind = \"fail\" } }",
        )
    });
    fails_and_gives_back(&rig, "vtcon unbind fails", "unbind fbcon from vtcon1");
}

#[test]
fn a_framebuffer_that_will_not_unbind_brings_fbcon_and_the_display_manager_back() {
    let rig = desktop_with(|t| {
        t.replace(
            "driver = \"efi-framebuffer\", device = \"0000:09:00.0\" }",
            "driver = \"efi-framebuffer\", device = \"0000:09:00.0\", fault = { unbind = \"fail\" } }",
        )
    });
    fails_and_gives_back(
        &rig,
        "efifb unbind fails",
        "unbind efi-framebuffer.0 from efi-framebuffer",
    );
}

#[test]
fn a_process_outside_the_display_manager_that_keeps_the_gpu_is_named() {
    let rig = Rig::shipped(MACHINE).with_timeout_ms(500);
    rig.sim
        .add_holder(Holder {
            pid: 2207,
            comm: "obs".into(),
            node: "/dev/dri/renderD128".into(),
        })
        .unwrap();
    let err = rig.bind("rx580").unwrap_err();
    assert!(matches!(err, Error::DeviceBusy(_)), "{err:?}");
    assert!(
        err.message()
            .contains("still held after 500 ms: obs (pid 2207) holds /dev/dri/renderD128"),
        "{err}"
    );
    assert!(
        err.message().contains("the display was given back"),
        "{err}"
    );
    rig.sim.remove_holder(2207).unwrap();
    assert_shown_on_host(&rig, "a holder stayed");
}

#[test]
fn a_move_that_fails_after_the_handoff_gives_the_display_back() {
    let rig = desktop_with(|t| with_fault(t, GPU, "probe = \"fail\""));
    let err = rig.bind("rx580").unwrap_err();
    assert!(
        err.message().contains("the display was given back"),
        "{err}"
    );
    assert_shown_on_host(&rig, "vfio-pci would not bind");
}

/// A failed bind whose undoing outlasts the move's deadline (a QEMU that
/// opened the group holds the GPU's unbind from vfio-pci) is answered at
/// the deadline; the display comes back only once the GPU is home: a
/// display manager started on a GPU still on vfio-pci shows nothing.
#[test]
fn a_bind_undone_after_its_deadline_gives_the_display_back_once_the_gpu_is_home() {
    let rig = desktop_with(|t| with_fault(t, AUDIO, "probe = \"fail\"")).with_timeout_ms(5000);
    let qemu_opens_the_group = |device: &vfiod_pci::PciAddress, step: &str| {
        if *device == addr(AUDIO) && step == "probe vfio-pci" {
            rig.sim
                .add_holder(Holder {
                    pid: 4242,
                    comm: "qemu-system-x86".into(),
                    node: "/dev/vfio/14".into(),
                })
                .unwrap();
        }
    };
    let options = vfiod::plan::MoveOptions {
        timeout: Some(Duration::from_millis(600)),
        ..Default::default()
    };
    let err = rig
        .engine
        .bind("rx580", &options, &qemu_opens_the_group)
        .unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    assert!(err.message().contains("once the undoing ends"), "{err}");
    // vfio-pci's unbind waits for QEMU (the link already gone, as on a
    // real kernel): the GPU is not home.
    assert_ne!(rig.driver(GPU).as_deref(), Some("amdgpu"));
    assert_eq!(
        screen(&rig),
        HANDED_OVER,
        "the display came back with the GPU still on vfio-pci"
    );
    rig.sim.remove_holder(4242).unwrap();
    wait_until("the undoing ends", Duration::from_secs(10), || {
        rig.open_moves() == 0
    });
    assert_shown_on_host(&rig, "the undoing ended");
}

#[test]
fn a_display_manager_that_fails_to_start_again_is_reported_by_the_release() {
    let rig = desktop_with(|t| {
        t.replace(
            "unit = \"sddm.service\"\n",
            "unit = \"sddm.service\"\nfault = { start = \"fail\" }\n",
        )
    });
    rig.bind("rx580").unwrap();
    let err = rig.release("rx580").unwrap_err();
    assert!(
        err.message().contains("start display manager sddm.service"),
        "{err}"
    );
    assert!(err.message().contains("DID NOT ALL COME BACK"), "{err}");
    // The devices are back and the console with them; only the desktop is not.
    assert_eq!(rig.driver(GPU).as_deref(), Some("amdgpu"));
    assert!(screen(&rig).fbcon);
    assert!(!rig.engine.handoffs_recorded());
}

#[test]
fn without_a_display_manager_the_rest_is_still_handed_over() {
    let rig = desktop_with(|t| {
        let start = t.find("[display.manager]").unwrap();
        let end = t.find("[[device]]").unwrap();
        format!("{}{}", &t[..start], &t[end..])
    });
    rig.bind("rx580").unwrap();
    let now = screen(&rig);
    assert!(!now.fbcon && !now.efifb, "{now:?}");
    rig.release("rx580").unwrap();
    let now = screen(&rig);
    assert!(now.fbcon && now.efifb, "{now:?}");
}

/// The z77's RX 580 does not show the display (the HD 4000 does, with
/// fbcon and a display manager on it): its handoff does nothing, and
/// the other GPU's console is never touched.
#[test]
fn a_handoff_profile_whose_gpu_shows_nothing_leaves_the_other_gpus_console_alone() {
    let display = "[display]\nvtconsoles = [{ name = \"vtcon1\", fbcon = true, bound = true, device = \"0000:00:02.0\" }]\n\n[display.manager]\nunit = \"gdm.service\"\nholders = [{ pid = 912, comm = \"Xorg\", node = \"/dev/dri/card0\" }]\n\n[[device]]\n";
    let text = std::fs::read_to_string(machines_dir().join("z77-rx580.toml"))
        .unwrap()
        .replacen("[[device]]\n", display, 1);
    let mut config = z77_config();
    config.profiles.get_mut("rx580").unwrap().handoff = true;
    let rig = Rig::from_text(&text, config);
    rig.bind("rx580").unwrap();
    assert_eq!(rig.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
    assert!(rig.sim.vtconsoles().unwrap()[0].bound, "fbcon left alone");
    assert!(rig.sim.display_manager().unwrap().unwrap().active);
    assert!(!rig.engine.handoffs_recorded());
    rig.release("rx580").unwrap();
    assert!(rig.sim.display_manager().unwrap().unwrap().active);
}

/// The simulator is at least as harsh as the kernel: the GPU cannot be
/// taken while its display is up, even with `force`.
#[test]
fn forcing_the_bind_without_a_handoff_fails_on_the_busy_gpu() {
    let mut config = handoff_config();
    config.profiles.get_mut("rx580").unwrap().handoff = false;
    let rig = Rig::from_text(&machine_text(), config);
    let forced = vfiod::plan::MoveOptions {
        force: true,
        ..Default::default()
    };
    let err = rig.bind_with("rx580", forced).unwrap_err();
    assert!(err.message().contains("unbind amdgpu"), "{err}");
    assert_eq!(rig.driver(GPU).as_deref(), Some("amdgpu"));
    assert_eq!(screen(&rig), SHOWN);
}
