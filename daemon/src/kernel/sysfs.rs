//! The real kernel's writes: [`Kernel`] for [`Sysfs`], whose reads live in
//! `vfiod-host`. Every write is one write(2) to a file resolved under the
//! root, so a fixture tree can't lead one out into the machine's own /sys.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Command, Stdio};

use vfiod_host::sysfs::modules::is_module_name;
use vfiod_host::sysfs::rooted::Rooted;
use vfiod_host::sysfs::{
    BUS_RESCAN, DRIVERS_PROBE, PCI_DRIVERS, VFIO_GROUPS, invalid_driver, is_driver_name,
};
use vfiod_pci::PciAddress;

use super::{Kernel, KernelError, KernelResult, Sysfs};

/// Tried in order: a service's PATH may lack the sbin directories.
const MODPROBE: [&str; 3] = ["modprobe", "/usr/sbin/modprobe", "/sbin/modprobe"];

/// Exists while udevd has events queued or running (libudev's
/// `udev_queue_get_queue_is_empty`).
const UDEV_QUEUE: &str = "/run/udev/queue";

impl Kernel for Sysfs {
    fn udev_busy(&self) -> bool {
        self.tree().host_path(Path::new(UDEV_QUEUE)).exists()
    }

    fn vfio_group_open(&self, group: u32) -> Option<bool> {
        // A group opens once at a time: EBUSY means a VM has it. Ours is
        // closed again at once and sets nothing up.
        let node = self
            .tree()
            .host_path(&Path::new(VFIO_GROUPS).join(group.to_string()));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&node)
        {
            Ok(file)
                if file
                    .metadata()
                    .is_ok_and(|m| m.file_type().is_char_device()) =>
            {
                Some(false)
            }
            Err(err) if err.raw_os_error() == Some(nix::libc::EBUSY) => Some(true),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Some(false),
            // Not a device node (a fixture), or not ours to open (a device
            // cgroup): only the holders can say.
            _ => None,
        }
    }

    fn load_module(&self, module: &str) -> KernelResult<()> {
        load_module(self.tree(), module)
    }

    fn set_driver_override(&self, address: &PciAddress, driver: Option<&str>) -> KernelResult<()> {
        const OP: &str = "write driver_override";
        let contents = match driver {
            Some(driver) if !is_driver_name(driver) => return Err(invalid_driver(OP, driver)),
            Some(driver) => driver,
            // A lone newline clears it; the kernel then shows "(null)".
            None => "\n",
        };
        write_device_file(self, address, OP, "driver_override", contents)
    }

    fn unbind(&self, address: &PciAddress, driver: &str) -> KernelResult<()> {
        const OP: &str = "unbind";
        if !is_driver_name(driver) {
            return Err(invalid_driver(OP, driver));
        }
        let unbind = Path::new(PCI_DRIVERS).join(driver).join("unbind");
        write_once(self.tree(), OP, &unbind, &address.to_string())
    }

    fn probe(&self, address: &PciAddress) -> KernelResult<()> {
        write_once(
            self.tree(),
            "probe",
            Path::new(DRIVERS_PROBE),
            &address.to_string(),
        )
    }

    fn set_reset_method(&self, address: &PciAddress, methods: &str) -> KernelResult<()> {
        write_device_file(self, address, "write reset_method", "reset_method", methods)
    }

    fn reset(&self, address: &PciAddress) -> KernelResult<()> {
        write_device_file(self, address, "reset", "reset", "1")
    }

    fn remove(&self, address: &PciAddress) -> KernelResult<()> {
        write_device_file(self, address, "remove", "remove", "1")
    }

    fn rescan(&self, parent: Option<&PciAddress>) -> KernelResult<()> {
        // A device's own `rescan` rescans the bus it sits on; the buses
        // behind a bridge are its `pci_bus/DDDD:BB`, each with a `rescan`.
        let Some(bridge) = parent else {
            return write_once(self.tree(), "rescan", Path::new(BUS_RESCAN), "1");
        };
        let dir = Sysfs::bus_entry(bridge).join("pci_bus");
        let buses = self.tree().list_optional(&dir)?;
        if buses.is_empty() {
            return Err(KernelError::Malformed {
                path: dir.display().to_string(),
                reason: format!("{bridge} has no bus behind it to rescan"),
            });
        }
        for bus in buses {
            write_once(self.tree(), "rescan", &dir.join(bus).join("rescan"), "1")?;
        }
        Ok(())
    }

    fn bind_vtconsole(&self, name: &str, bind: bool) -> KernelResult<()> {
        const OP: &str = "write vtconsole bind";
        if !is_vtconsole_name(name) {
            return Err(invalid_driver(OP, name));
        }
        let file = Path::new(VTCONSOLES).join(name).join("bind");
        write_once(self.tree(), OP, &file, if bind { "1" } else { "0" })
    }

    fn bind_platform(&self, device: &str, driver: &str, bind: bool) -> KernelResult<()> {
        let op = if bind { "bind" } else { "unbind" };
        // Both are single path components: no `/`, no `..`.
        for name in [device, driver] {
            if name.is_empty() || name.starts_with('.') || !is_platform_name(name) {
                return Err(invalid_driver(op, name));
            }
        }
        let file = Path::new(PLATFORM_DRIVERS).join(driver).join(op);
        write_once(self.tree(), op, &file, device)
    }
}

const VTCONSOLES: &str = "sys/class/vtconsole";
const PLATFORM_DRIVERS: &str = "sys/bus/platform/drivers";

fn is_vtconsole_name(name: &str) -> bool {
    name.strip_prefix("vtcon")
        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// Platform device and driver names: `efi-framebuffer.0`, `simple-framebuffer`.
fn is_platform_name(name: &str) -> bool {
    name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))
}

/// Writes one of the device's own files; NoDevice rather than an I/O
/// error for a function that is gone.
fn write_device_file(
    sysfs: &Sysfs,
    address: &PciAddress,
    op: &'static str,
    file: &str,
    contents: &str,
) -> KernelResult<()> {
    let entry = Sysfs::bus_entry(address);
    if !sysfs.tree().exists(&entry) {
        return Err(KernelError::NoDevice(*address));
    }
    write_once(sysfs.tree(), op, &entry.join(file), contents)
}

/// Writes `contents` with a single write(2) to an existing file.
///
/// One call, not `write_all`: a sysfs store sees each write(2) as one
/// command, so a retried remainder would be a second, garbled command.
fn write_once(tree: &Rooted, op: &'static str, rel: &Path, contents: &str) -> KernelResult<()> {
    let target = tree.write_target(op, rel)?;
    // O_TRUNC as a shell's `>` does: sysfs ignores it, a fixture needs it.
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(target)
        .map_err(|err| tree.io_error(op, rel, err))?;
    let written = file
        .write(contents.as_bytes())
        .map_err(|err| tree.io_error(op, rel, err))?;
    if written != contents.len() {
        let short = io::Error::new(
            io::ErrorKind::WriteZero,
            format!("the kernel took {written} of {} bytes", contents.len()),
        );
        return Err(tree.io_error(op, rel, short));
    }
    Ok(())
}

/// Runs `modprobe MODULE`, only on this machine's own root.
fn load_module(tree: &Rooted, module: &str) -> KernelResult<()> {
    let fail = |reason: String| KernelError::Module {
        module: module.to_owned(),
        reason,
    };
    if !is_module_name(module) {
        return Err(fail("not a module name".into()));
    }
    if tree.root() != Path::new("/") {
        return Err(fail(format!(
            "{} is a fixture tree, not this machine's root: modules can't be loaded into it",
            tree.root().display()
        )));
    }
    let mut last_error = io::Error::from(io::ErrorKind::NotFound);
    for program in MODPROBE {
        let output = Command::new(program)
            .arg(module)
            .stdin(Stdio::null())
            .output();
        match output {
            Ok(output) if output.status.success() => return Ok(()),
            Ok(output) => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                let reason = match stderr.trim() {
                    "" => format!("modprobe failed ({})", output.status),
                    message => message.to_owned(),
                };
                return Err(fail(reason));
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => last_error = err,
            Err(err) => return Err(fail(format!("cannot run {program}: {err}"))),
        }
    }
    Err(fail(format!("cannot run modprobe: {last_error}")))
}

#[cfg(test)]
mod tests;
