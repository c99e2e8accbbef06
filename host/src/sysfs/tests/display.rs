//! What the single-GPU handoff reads of a host's display.

use super::*;

/// What the single-GPU handoff reads: each vtconsole, whether it is fbcon
/// and bound, and the function fbcon draws on (the primary framebuffer's,
/// the boot VGA for a firmware framebuffer); the firmware framebuffers'
/// platform devices and their drivers.
#[test]
fn vtconsoles_and_firmware_framebuffers_as_the_handoff_reads_them() {
    use vfiod_pci::{BootFramebuffer, VtConsole};
    let fx = desktop();
    let kernel = fx.kernel();
    let vt = |name: &str, fbcon, bound, device: Option<&str>| VtConsole {
        name: name.into(),
        fbcon,
        bound,
        device: device.map(addr),
    };
    assert_eq!(
        kernel.vtconsoles().unwrap(),
        [
            vt("vtcon0", false, false, None),
            vt("vtcon1", true, true, Some(IGPU))
        ]
    );
    assert_eq!(kernel.boot_framebuffers().unwrap(), []);

    // efifb on fb0, bound to its platform driver: it scans out of the boot VGA.
    let efifb = fx.platform_device("efi-framebuffer.0");
    fx.mkdir("sys/bus/platform/drivers/efi-framebuffer");
    fx.link(
        efifb.join("driver"),
        "sys/bus/platform/drivers/efi-framebuffer",
    );
    fx.remove("sys/class/graphics/fb0");
    fx.framebuffer(0, &efifb);
    fx.remove("sys/class/graphics/fb1");
    assert_eq!(
        kernel.vtconsoles().unwrap()[1],
        vt("vtcon1", true, true, Some(IGPU))
    );
    let efi = |driver: Option<&str>| BootFramebuffer {
        name: "efi-framebuffer.0".into(),
        driver: driver.map(str::to_string),
        device: Some(addr(IGPU)),
    };
    assert_eq!(
        kernel.boot_framebuffers().unwrap(),
        [efi(Some("efi-framebuffer"))]
    );
    fx.remove(efifb.join("driver"));
    assert_eq!(kernel.boot_framebuffers().unwrap(), [efi(None)]);
}
