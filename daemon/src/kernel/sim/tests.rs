use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::*;

const Z77: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../machines/z77-rx580.toml");
/// Long enough for a write that was going to return to have returned.
const BLOCKED: Duration = Duration::from_millis(200);

/// A directory under $TMPDIR, removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let template = std::env::temp_dir().join("vfiod-sim-test-XXXXXX");
        TempDir(nix::unistd::mkdtemp(&template).expect("mkdtemp"))
    }

    fn state(&self) -> PathBuf {
        self.0.join("state")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn z77(dir: &TempDir) -> SimKernel {
    SimKernel::open(Path::new(Z77), &dir.state()).unwrap()
}

fn z77_machine() -> MachineFile {
    MachineFile::load(Path::new(Z77)).unwrap()
}

const GPU: &str = "0000:01:00.0";
const AUDIO: &str = "0000:01:00.1";
const ROOT_PORT: &str = "0000:00:01.0";
/// An IOMMU and vfio-pci loaded at boot.
const WITH_VFIO: &str = "iommu = \"intel\"\nmodules = [\"vfio_pci\"]";

/// A root port with a GPU and its HDMI audio behind it. `machine` holds
/// the `[machine]` keys besides `kernel`; `gpu` extra keys for the GPU
/// (a `fault = {...}` line). Groups are left out when there is no IOMMU.
fn gpu_machine(machine: &str, gpu: &str) -> MachineFile {
    gpu_machine_booting_on("amdgpu", machine, gpu)
}

/// [`gpu_machine`] with the GPU bound to `boot_driver` at boot.
fn gpu_machine_booting_on(boot_driver: &str, machine: &str, gpu: &str) -> MachineFile {
    let group = if machine.contains("iommu = \"none\"") {
        ""
    } else {
        "group = 1"
    };
    let text = format!(
        r#"
[machine]
kernel = "6.1.0-sim"
{machine}

[[device]]
address = "{ROOT_PORT}"
id = "8086:0151"
class = "0x060400"
driver = "pcieport"
{group}

# Listed before the GPU: devices() must still come out sorted.
[[device]]
address = "{AUDIO}"
parent = "{ROOT_PORT}"
id = "1002:aaf0"
class = "0x040300"
driver = "snd_hda_intel"
{group}

[[device]]
address = "{GPU}"
parent = "{ROOT_PORT}"
id = "1002:67df"
class = "0x030000"
driver = "{boot_driver}"
nodes = ["/dev/dri/card1"]
{group}
{gpu}
"#
    );
    MachineFile::parse(&text, Path::new("inline.toml")).unwrap()
}

fn sim(dir: &TempDir, machine: MachineFile) -> SimKernel {
    SimKernel::from_machine(machine, &dir.state()).unwrap()
}

/// The engine's bind, step by step (DESIGN §2).
fn bind_vfio(kernel: &SimKernel, address: &PciAddress) -> KernelResult<()> {
    if !kernel.driver_registered(VFIO_DRIVER) {
        kernel.load_module(VFIO_MODULE)?;
    }
    kernel.set_driver_override(address, Some(VFIO_DRIVER))?;
    if let Some(driver) = kernel.driver(address)? {
        kernel.unbind(address, &driver)?;
    }
    kernel.probe(address)
}

/// The engine's release, step by step.
fn release(kernel: &SimKernel, address: &PciAddress) -> KernelResult<()> {
    kernel.set_driver_override(address, None)?;
    if let Some(driver) = kernel.driver(address)? {
        kernel.unbind(address, &driver)?;
    }
    kernel.probe(address)
}

fn driver_of(kernel: &SimKernel, address: &str) -> Option<String> {
    kernel.driver(&addr(address)).unwrap()
}

fn errno(err: &KernelError) -> Option<i32> {
    match err {
        KernelError::Io { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

/// Waits for `condition`, polling; fails after 5 s, which is long enough
/// for anything that is going to happen to have happened.
fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

fn event(action: UeventAction, address: &str, driver: Option<&str>) -> Uevent {
    uevent(action, &addr(address), driver)
}

fn holder(pid: u32, comm: &str, node: &str) -> Holder {
    Holder {
        pid,
        comm: comm.into(),
        node: node.into(),
    }
}

mod health;
mod kernel_semantics;
mod resets;
mod running_state;
mod snapshot;
mod waiting_unbinds;
