//! [`Inspect`] and [`Kernel`] for the simulated kernel: reads under its
//! lock, writes as the real kernel makes them.

use super::*;

impl Inspect for SimKernel {
    fn devices(&self) -> KernelResult<Vec<PciDevice>> {
        self.count_read();
        let inner = self.lock();
        Ok(self
            .board
            .entries()
            .filter_map(|entry| inner.state.pci_device(entry))
            .collect())
    }

    fn ids(&self) -> KernelResult<Vec<(PciAddress, PciId)>> {
        self.count_read();
        Ok(self
            .devices()?
            .into_iter()
            .map(|d| (d.address, d.id))
            .collect())
    }

    fn device(&self, address: &PciAddress) -> KernelResult<Option<PciDevice>> {
        self.count_read();
        let inner = self.lock();
        Ok(self
            .board
            .entry(address)
            .ok()
            .and_then(|entry| inner.state.pci_device(entry)))
    }

    fn group_members(&self, group: u32) -> KernelResult<Vec<PciAddress>> {
        self.count_read();
        Ok(self
            .devices()?
            .into_iter()
            .filter(|d| d.iommu_group == Some(group))
            .map(|d| d.address)
            .collect())
    }

    fn driver(&self, address: &PciAddress) -> KernelResult<Option<String>> {
        self.count_read();
        let inner = self.lock();
        let dev = inner
            .state
            .present(address)
            .ok_or(KernelError::NoDevice(*address))?;
        Ok(dev.driver.clone())
    }

    fn driver_override(&self, address: &PciAddress) -> KernelResult<Option<String>> {
        self.count_read();
        // Reading it takes the device lock: it waits for a pending removal.
        let inner = self.lock();
        let inner = self.wait_for_device(inner, address);
        let dev = inner
            .state
            .present(address)
            .ok_or(KernelError::NoDevice(*address))?;
        Ok(dev.driver_override.clone())
    }

    fn iommu_enabled(&self) -> KernelResult<bool> {
        self.count_read();
        Ok(self.board.iommu_enabled())
    }

    fn driver_registered(&self, driver: &str) -> bool {
        self.count_read();
        let inner = self.lock();
        let wanted = module_key(driver);
        inner
            .state
            .registered_drivers(&self.board)
            .any(|name| module_key(name) == wanted)
    }

    fn module_available(&self, module: &str) -> bool {
        self.count_read();
        let module = module_key(module);
        self.lock().state.modules.contains(&module) || !self.board.missing_modules.contains(&module)
    }

    fn module_loading(&self) -> ModuleLoading {
        self.board.machine.machine.module_loading
    }

    fn nodes(&self, address: &PciAddress) -> KernelResult<Vec<PathBuf>> {
        self.count_read();
        let inner = self.lock();
        if inner.state.present(address).is_none() {
            return Err(KernelError::NoDevice(*address));
        }
        Ok(self.board.entry(address)?.nodes.clone())
    }

    fn holders(&self, nodes: &[PathBuf]) -> KernelResult<Vec<Holder>> {
        self.count_read();
        let inner = self.lock();
        let mut holders: Vec<Holder> = inner
            .state
            .holders
            .iter()
            .filter(|h| nodes.contains(&h.node))
            .cloned()
            .collect();
        holders.sort();
        Ok(holders)
    }

    fn mounts_behind(&self, address: &PciAddress) -> KernelResult<Vec<String>> {
        self.count_read();
        let inner = self.lock();
        if inner.state.present(address).is_none() {
            return Err(KernelError::NoDevice(*address));
        }
        let mut mounts = Vec::new();
        for at in self.board.subtree(address) {
            if inner.state.present(&at).is_some() {
                mounts.extend(self.board.entry(&at)?.mounts.iter().cloned());
            }
        }
        Ok(mounts)
    }

    fn usb_behind(&self, address: &PciAddress) -> KernelResult<Vec<UsbDevice>> {
        self.count_read();
        Ok(self.present_entry(address)?.usb.clone())
    }

    fn console_on(&self, address: &PciAddress) -> KernelResult<bool> {
        self.count_read();
        let entry = self.present_entry(address)?;
        Ok(self.lock().state.console_now(&self.board, entry))
    }

    fn vtconsoles(&self) -> KernelResult<Vec<vfiod_pci::VtConsole>> {
        self.count_read();
        Ok(self.read_vtconsoles())
    }

    fn boot_framebuffers(&self) -> KernelResult<Vec<vfiod_pci::BootFramebuffer>> {
        self.count_read();
        Ok(self.read_boot_framebuffers())
    }

    fn vfio_group_node(&self, group: u32) -> Option<PathBuf> {
        self.count_read();
        self.lock()
            .state
            .group_node_exists(&self.board, group)
            .then(|| group_node(group))
    }

    fn vfio_device_nodes(&self, _address: &PciAddress) -> KernelResult<Vec<PathBuf>> {
        self.count_read();
        // Machine files (DESIGN §7) describe group nodes only.
        Ok(Vec::new())
    }

    fn live_id(&self, address: &PciAddress) -> KernelResult<Option<PciId>> {
        self.count_read();
        let inner = self.lock();
        let entry = self.board.entry(address)?;
        inner.state.live_id(entry).map(Some)
    }

    fn boot_id(&self) -> KernelResult<String> {
        self.count_read();
        Ok(self.lock().state.boot_id.clone())
    }

    fn host(&self) -> KernelResult<HostView> {
        self.count_read();
        let loaded = self.lock().state.modules.clone();
        Ok(super::facts::view(&self.board.machine, loaded))
    }
}

impl Kernel for SimKernel {
    fn udev_busy(&self) -> bool {
        self.count_read();
        self.lock().state.coldplug_running(now_ms())
    }

    fn vfio_group_open(&self, group: u32) -> Option<bool> {
        let node = group_node(group);
        Some(self.lock().state.holders.iter().any(|h| h.node == node))
    }

    fn load_module(&self, module: &str) -> KernelResult<()> {
        let result = self.transact(|board, state, _| state.load_module(board, module));
        self.count_write();
        result
    }

    fn set_driver_override(&self, address: &PciAddress, driver: Option<&str>) -> KernelResult<()> {
        // The kernel keeps what comes before the first newline; nothing
        // ("\n", which `None` stands for) clears the override.
        let value = driver
            .and_then(|d| d.split('\n').next())
            .filter(|d| !d.is_empty());
        if value.is_some_and(|d| d.len() > OVERRIDE_MAX_LEN) {
            return Err(os_error("write", override_path(address), libc::EINVAL));
        }
        let inner = self.lock();
        let mut inner = self.wait_for_device(inner, address);
        let result = self.commit(&mut inner, |board, state, events| {
            // A late driver's probe holds the device lock: it ends first.
            state.coldplug_reaches(board, address, events);
            let dev = state
                .present_mut(address)
                .ok_or(KernelError::NoDevice(*address))?;
            dev.driver_override = value.map(str::to_owned);
            Ok(())
        });
        drop(inner);
        self.count_write();
        result
    }

    fn unbind(&self, address: &PciAddress, driver: &str) -> KernelResult<()> {
        let mut inner = self.lock();
        let state = &inner.state;
        let dev = state.present(address);
        if dev.is_some_and(|dev| dev.unbinding.as_deref() == Some(driver)) {
            // The driver still has the device, its removal pending: this
            // write waits for the device lock, then finds it unbound.
            let inner = self.wait_for_device(inner, address);
            drop(inner);
            self.count_write();
            return Ok(());
        }
        if dev.is_none_or(|dev| dev.driver.as_deref() != Some(driver)) {
            // No such driver directory, or the device is not bound to it.
            let errno = if state.registered(&self.board, driver) {
                libc::ENODEV
            } else {
                libc::ENOENT
            };
            return Err(os_error("write", unbind_path(driver), errno));
        }
        let entry = self.board.entry(address)?;
        if let Some(why) = state.display_keeps(&self.board, entry, driver) {
            tracing::debug!(device = %address, driver, why, "simulated unbind refused: the display is up on it");
            return Err(os_error("write", unbind_path(driver), libc::EBUSY));
        }
        let hangs = match faults(entry).unbind {
            Some(UnbindFault::Hang) => true,
            Some(UnbindFault::Busy) => {
                return Err(os_error("write", unbind_path(driver), libc::EBUSY));
            }
            None => false,
        };
        // The link goes at once; the removal ends in this same change when
        // the driver waits for nobody, else when the last holder lets go
        // (DESIGN §2) or the hang ends, and this writer waits for it.
        let result = self.commit(&mut inner, |_, state, _| {
            state.start_removal(address, driver, hangs);
            Ok(())
        });
        if result.is_ok() {
            inner = self.wait_for_device(inner, address);
        }
        drop(inner);
        self.count_write();
        result
    }

    fn probe(&self, address: &PciAddress) -> KernelResult<()> {
        let inner = self.lock();
        let mut inner = self.wait_for_device(inner, address);
        let result = self.commit(&mut inner, |board, state, events| {
            if state.present(address).is_none() {
                return Err(os_error("write", probe_path(), libc::ENODEV));
            }
            state.coldplug_reaches(board, address, events);
            state.probe_device(board, address, events);
            Ok(())
        });
        drop(inner);
        self.count_write();
        result
    }

    fn set_reset_method(&self, address: &PciAddress, methods: &str) -> KernelResult<()> {
        let result =
            self.transact(|board, state, _| state.set_reset_method(board, address, methods));
        self.count_write();
        result
    }

    fn reset(&self, address: &PciAddress) -> KernelResult<()> {
        // A reset takes the device lock.
        let inner = self.lock();
        let mut inner = self.wait_for_device(inner, address);
        let result = self.commit(&mut inner, |board, state, _| state.reset(board, address));
        drop(inner);
        self.count_write();
        result
    }

    fn remove(&self, address: &PciAddress) -> KernelResult<()> {
        let result = self.remove_device(address);
        self.count_write();
        result
    }

    fn rescan(&self, parent: Option<&PciAddress>) -> KernelResult<()> {
        // udevd reads its rules when the events come.
        let rules = std::fs::read_to_string(&self.claim_rule).unwrap_or_default();
        let result = self.transact(|board, state, events| {
            let before = events.len();
            state.rescan(board, parent, events)?;
            let added: Vec<PciAddress> = events[before..]
                .iter()
                .filter(|e| e.action == UeventAction::Add)
                .map(|e| e.address)
                .collect();
            for address in added {
                let id = board.entry(&address)?.id;
                if let Some(driver) = crate::early_claim::override_at_add(&rules, &address, &id) {
                    state.udev_writes_override(address, driver, now_ms());
                }
            }
            Ok(())
        });
        self.count_write();
        result
    }

    fn bind_vtconsole(&self, name: &str, bind: bool) -> KernelResult<()> {
        self.write_vtconsole_bind(name, bind)
    }

    fn bind_platform(&self, device: &str, driver: &str, bind: bool) -> KernelResult<()> {
        self.write_platform_bind(device, driver, bind)
    }
}
