//! The simulated kernel with someone else acting on it between two of
//! vfiod's calls: what the simulator alone cannot time.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vfiod::kernel::sim::SimKernel;
use vfiod::kernel::{Inspect, Kernel, KernelResult};
use vfiod_host::facts::HostView;
use vfiod_pci::{Holder, PciAddress, PciDevice, PciId, UsbDevice};

/// The first time vfiod writes `driver_override` of `victim`, someone
/// else's unbind of it (`driver`) starts right after the write, before
/// vfiod reads the value back. With `unbind = "hang"` on the victim, that
/// read waits behind the device lock forever, as on a real kernel.
pub struct UnbindAfterOverride {
    pub sim: Arc<SimKernel>,
    pub victim: PciAddress,
    pub driver: &'static str,
    pub fired: AtomicBool,
}

impl Inspect for UnbindAfterOverride {
    fn devices(&self) -> KernelResult<Vec<PciDevice>> {
        self.sim.devices()
    }
    fn ids(&self) -> KernelResult<Vec<(PciAddress, PciId)>> {
        self.sim.ids()
    }
    fn device(&self, address: &PciAddress) -> KernelResult<Option<PciDevice>> {
        self.sim.device(address)
    }
    fn group_members(&self, group: u32) -> KernelResult<Vec<PciAddress>> {
        self.sim.group_members(group)
    }
    fn driver(&self, address: &PciAddress) -> KernelResult<Option<String>> {
        self.sim.driver(address)
    }
    fn driver_override(&self, address: &PciAddress) -> KernelResult<Option<String>> {
        self.sim.driver_override(address)
    }
    fn iommu_enabled(&self) -> KernelResult<bool> {
        self.sim.iommu_enabled()
    }
    fn driver_registered(&self, driver: &str) -> bool {
        self.sim.driver_registered(driver)
    }
    fn module_available(&self, module: &str) -> bool {
        self.sim.module_available(module)
    }
    fn module_loading(&self) -> vfiod_pci::machine::ModuleLoading {
        self.sim.module_loading()
    }
    fn nodes(&self, address: &PciAddress) -> KernelResult<Vec<PathBuf>> {
        self.sim.nodes(address)
    }
    fn holders(&self, nodes: &[PathBuf]) -> KernelResult<Vec<Holder>> {
        self.sim.holders(nodes)
    }
    fn mounts_behind(&self, address: &PciAddress) -> KernelResult<Vec<String>> {
        self.sim.mounts_behind(address)
    }
    fn usb_behind(&self, address: &PciAddress) -> KernelResult<Vec<UsbDevice>> {
        self.sim.usb_behind(address)
    }
    fn console_on(&self, address: &PciAddress) -> KernelResult<bool> {
        self.sim.console_on(address)
    }
    fn vfio_group_node(&self, group: u32) -> Option<PathBuf> {
        self.sim.vfio_group_node(group)
    }
    fn vfio_device_nodes(&self, address: &PciAddress) -> KernelResult<Vec<PathBuf>> {
        self.sim.vfio_device_nodes(address)
    }
    fn host(&self) -> KernelResult<HostView> {
        self.sim.host()
    }
    fn boot_id(&self) -> KernelResult<String> {
        self.sim.boot_id()
    }
    fn live_id(&self, address: &PciAddress) -> KernelResult<Option<PciId>> {
        self.sim.live_id(address)
    }
    fn vtconsoles(&self) -> KernelResult<Vec<vfiod_pci::VtConsole>> {
        self.sim.vtconsoles()
    }
    fn boot_framebuffers(&self) -> KernelResult<Vec<vfiod_pci::BootFramebuffer>> {
        self.sim.boot_framebuffers()
    }
}

impl Kernel for UnbindAfterOverride {
    fn udev_busy(&self) -> bool {
        self.sim.udev_busy()
    }
    fn vfio_group_open(&self, group: u32) -> Option<bool> {
        self.sim.vfio_group_open(group)
    }
    fn load_module(&self, module: &str) -> KernelResult<()> {
        self.sim.load_module(module)
    }
    fn set_driver_override(&self, address: &PciAddress, driver: Option<&str>) -> KernelResult<()> {
        self.sim.set_driver_override(address, driver)?;
        if *address == self.victim && !self.fired.swap(true, Ordering::SeqCst) {
            let (sim, victim, driver) = (self.sim.clone(), self.victim, self.driver);
            std::thread::spawn(move || sim.unbind(&victim, driver));
            // Started: its device lock is taken once the link is gone.
            super::wait_until("the other unbind starts", Duration::from_secs(5), || {
                self.sim.driver(address).is_ok_and(|d| d.is_none())
            });
        }
        Ok(())
    }
    fn unbind(&self, address: &PciAddress, driver: &str) -> KernelResult<()> {
        self.sim.unbind(address, driver)
    }
    fn probe(&self, address: &PciAddress) -> KernelResult<()> {
        self.sim.probe(address)
    }
    fn set_reset_method(&self, address: &PciAddress, methods: &str) -> KernelResult<()> {
        self.sim.set_reset_method(address, methods)
    }
    fn reset(&self, address: &PciAddress) -> KernelResult<()> {
        self.sim.reset(address)
    }
    fn remove(&self, address: &PciAddress) -> KernelResult<()> {
        self.sim.remove(address)
    }
    fn rescan(&self, parent: Option<&PciAddress>) -> KernelResult<()> {
        self.sim.rescan(parent)
    }
    fn bind_vtconsole(&self, name: &str, bind: bool) -> KernelResult<()> {
        self.sim.bind_vtconsole(name, bind)
    }
    fn bind_platform(&self, device: &str, driver: &str, bind: bool) -> KernelResult<()> {
        self.sim.bind_platform(device, driver, bind)
    }
}
