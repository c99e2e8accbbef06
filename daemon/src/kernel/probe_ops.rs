//! One kernel call by name, for the real-kernel lane to make the same call
//! on the real kernel (`vfio-probe kernel`, on [`super::Sysfs`]) and on the
//! simulated one (`org.vfiod1.Simulator.KernelCall`), and compare the
//! answers word for word. Not used by vfiod's own moves.

use vfiod_pci::PciAddress;

use vfiod_host::sysfs::reset_method_file;

use super::{Kernel, KernelError};

/// The calls, with their arguments.
pub const USAGE: &str = "reset-method ADDR | set-reset-method ADDR VALUE | live-id ADDR | reset ADDR | remove ADDR | rescan [BRIDGE] | present ADDR";

/// Runs `op` with `args`; the answer in words: a value, `ok`, or `errno N`
/// / `no device` when the kernel refused. `Err` for a usage error.
pub fn call(kernel: &dyn Kernel, op: &str, args: &[String]) -> Result<String, String> {
    let address = |i: usize| -> Result<PciAddress, String> {
        args.get(i)
            .ok_or_else(|| format!("{op}: an address is missing"))?
            .parse()
            .map_err(|e| format!("{op}: {e}"))
    };
    let answer = match (op, args.len()) {
        ("reset-method", 1) => kernel.device(&address(0)?).map(|device| match device {
            None => "no device".to_owned(),
            Some(d) => {
                reset_method_file(&d.reset_methods).unwrap_or_else(|| "no reset_method".to_owned())
            }
        }),
        ("set-reset-method", 2) => kernel
            .set_reset_method(&address(0)?, &args[1])
            .map(|()| "ok".to_owned()),
        ("live-id", 1) => kernel.live_id(&address(0)?).map(|id| match id {
            Some(id) => id.to_string(),
            None => "unreadable".to_owned(),
        }),
        ("reset", 1) => kernel.reset(&address(0)?).map(|()| "ok".to_owned()),
        ("remove", 1) => kernel.remove(&address(0)?).map(|()| "ok".to_owned()),
        ("rescan", 0) => kernel.rescan(None).map(|()| "ok".to_owned()),
        ("rescan", 1) => kernel.rescan(Some(&address(0)?)).map(|()| "ok".to_owned()),
        // Another tool's move (libvirt's managed='yes'): override, unbind, probe.
        ("set-override", 2) => kernel
            .set_driver_override(
                &address(0)?,
                Some(args[1].as_str()).filter(|d| !d.is_empty()),
            )
            .map(|()| "ok".to_owned()),
        ("unbind", 2) => kernel
            .unbind(&address(0)?, &args[1])
            .map(|()| "ok".to_owned()),
        ("probe", 1) => kernel.probe(&address(0)?).map(|()| "ok".to_owned()),
        ("present", 1) => kernel
            .device(&address(0)?)
            .map(|d| if d.is_some() { "yes" } else { "no" }.to_owned()),
        _ => return Err(format!("unknown call {op} with {} arguments", args.len())),
    };
    Ok(answer.unwrap_or_else(|e| refusal(&e)))
}

/// A refusal as both kernels can say it alike.
fn refusal(error: &KernelError) -> String {
    match error {
        KernelError::Io { source, .. } => match source.raw_os_error() {
            Some(errno) => format!("errno {errno}"),
            None => format!("error: {source}"),
        },
        KernelError::NoDevice(_) => "no device".to_owned(),
        other => format!("error: {other}"),
    }
}
