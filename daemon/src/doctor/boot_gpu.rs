//! The boot GPU: a target the firmware initialized (`boot_vga`), a
//! firmware framebuffer on its memory (efifb, vesafb, simplefb,
//! simpledrm), or the kernel console drawing on it.

use vfiod_pci::PciDevice;

use super::{Context, Findings, Scope, and_list};
use crate::kernel::KernelResult;

/// How to keep the host off a GPU, for every message of this area.
const WAYS_OUT: &str = "In the firmware setup, make another GPU the primary display (\"Primary Display\" / \"Init Display First\": IGFX for the CPU's graphics, or another PCIe slot); or keep the host's boot framebuffer off it with video=efifb:off (efifb) or initcall_blacklist=sysfb_init (simpledrm, kernel 5.15 and newer) on the kernel command line; or, with a single GPU, set handoff = true in its profile: each bind then stops the display manager and unbinds fbcon and the boot framebuffer, and the release gives them back";

pub(super) fn check(cx: &Context<'_>, scope: &Scope, out: &mut Findings) -> KernelResult<()> {
    for device in scope.endpoints() {
        if !device.class.is_display() && !device.boot_vga {
            continue;
        }
        let console = cx.kernel.console_on(&device.address)?;
        let framebuffers: Vec<(String, bool)> = cx
            .host
            .framebuffers
            .iter()
            .flatten()
            .filter(|fb| fb.device == Some(device.address))
            .map(|fb| (fb.name.clone(), fb.is_firmware()))
            .collect();
        let firmware_fb = framebuffers.iter().any(|(_, firmware)| *firmware);
        boot_vga(cx, device, console, firmware_fb, out);
        framebuffer(cx, device, console, &framebuffers, out);
    }
    Ok(())
}

fn boot_vga(
    cx: &Context<'_>,
    device: &PciDevice,
    console: bool,
    firmware_fb: bool,
    out: &mut Findings,
) {
    const ID: &str = "boot-gpu.boot-vga";
    let name = device.address;
    if !device.boot_vga {
        out.ok(
            ID,
            format!("{name} is not the boot VGA: the firmware started another GPU"),
        );
        return;
    }
    let words = cx.cmdline_words();
    let kept_off = words.as_ref().is_some_and(|w| {
        w.iter()
            .any(|w| w.starts_with("video=efifb:off") || *w == "initcall_blacklist=sysfb_init")
    });
    if !console && !firmware_fb && kept_off {
        out.warn(
            ID,
            format!(
                "{name} is the boot VGA, though the command line keeps the boot framebuffer off it: the firmware still ran its video BIOS, and some cards then need a clean ROM image in the guest (<rom file='...'/> in the hostdev). {WAYS_OUT}"
            ),
        );
    } else {
        out.fail(
            ID,
            format!(
                "{name} is the boot VGA: the firmware started it and the host's console came up on it, so the host uses the card meant for the guest. {WAYS_OUT}"
            ),
        );
    }
}

fn framebuffer(
    cx: &Context<'_>,
    device: &PciDevice,
    console: bool,
    framebuffers: &[(String, bool)],
    out: &mut Findings,
) {
    const ID: &str = "boot-gpu.framebuffer";
    let name = device.address;
    // The boot VGA's finding says how to get the host off the card already.
    let ways_out = if device.boot_vga {
        "The ways out are those of boot-gpu.boot-vga".to_owned()
    } else {
        WAYS_OUT.to_owned()
    };
    let names: Vec<String> = framebuffers.iter().map(|(fb, _)| fb.clone()).collect();
    let firmware: Vec<String> = framebuffers
        .iter()
        .filter(|(_, firmware)| *firmware)
        .map(|(fb, _)| fb.clone())
        .collect();
    if !firmware.is_empty() {
        out.fail(
            ID,
            format!(
                "the firmware's framebuffer ({}) sits on {name}'s memory: it keeps the BAR reserved (vfio-pci: \"BAR 0: can't reserve\") and the guest gets a black screen. {ways_out}",
                and_list(&firmware)
            ),
        );
    } else if console {
        let through = if names.is_empty() {
            String::new()
        } else {
            format!(" through {}", and_list(&names))
        };
        out.fail(
            ID,
            format!(
                "the kernel console draws on {name}{through}: taking it leaves the host without a console and the driver may hang on unbind. Move the console to the other GPU (fbcon=map: or the primary display in the firmware setup). {ways_out}"
            ),
        );
    } else if !names.is_empty() {
        out.ok(
            ID,
            format!(
                "{name} has its driver's own framebuffer ({}) and no console on it: it goes away with the driver",
                and_list(&names)
            ),
        );
    } else if cx.host.framebuffers.is_none() {
        out.unknown(
            ID,
            format!(
                "which framebuffers sit on {name} (/proc/fb, /proc/iomem; framebuffers in a machine file's [host]); the kernel console is not on it"
            ),
        );
    } else {
        out.ok(ID, format!("no framebuffer and no console on {name}"));
    }
}
