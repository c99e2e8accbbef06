//! `org.vfiod1.Simulator` at `/org/vfiod1/simulator`: the control surface of
//! a simulated machine, served only with `--machine`. Tests use it to change
//! the machine behind vfiod's back, as an admin's shell script, a desktop
//! opening a device or a hot-unplug would on a real host.

use std::path::PathBuf;
use std::sync::Arc;

use vfiod_dbus::Error;
use vfiod_pci::{Holder, PciAddress};
use zbus::message::Header;
use zbus::{Connection, interface};

use crate::bouncer::{Bouncer, MoveDetails};
use crate::kernel::sim::SimKernel;

pub const SIMULATOR_PATH: &str = "/org/vfiod1/simulator";

pub struct SimulatorInterface {
    pub kernel: Arc<SimKernel>,
    pub bouncer: Arc<Bouncer>,
}

fn parse_address(address: &str) -> Result<PciAddress, Error> {
    address
        .parse()
        .map_err(|e: vfiod_pci::AddressError| Error::InvalidArgs(e.to_string()))
}

impl SimulatorInterface {
    async fn run<T: Send + 'static>(
        &self,
        connection: &Connection,
        header: &Header<'_>,
        change: impl FnOnce(&SimKernel) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        self.bouncer
            .authorize_move(connection, header, &MoveDetails::default())
            .await?;
        let kernel = self.kernel.clone();
        tokio::task::spawn_blocking(move || change(&kernel))
            .await
            .map_err(|e| Error::Kernel(format!("simulator task failed: {e}")))?
    }
}

#[interface(name = "org.vfiod1.Simulator")]
impl SimulatorInterface {
    /// Binds `driver` to the device, or unbinds it when `driver` is empty.
    async fn set_driver(
        &self,
        address: String,
        driver: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), Error> {
        let address = parse_address(&address)?;
        self.run(connection, &header, move |k| {
            let driver = (!driver.is_empty()).then_some(driver.as_str());
            k.set_driver(&address, driver)
                .map_err(|e| Error::Kernel(e.to_string()))
        })
        .await
    }

    /// A process opens a device node (a desktop, or a QEMU on /dev/vfio/N).
    async fn add_holder(
        &self,
        pid: u32,
        comm: String,
        node: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), Error> {
        self.run(connection, &header, move |k| {
            k.add_holder(Holder {
                pid,
                comm,
                node: PathBuf::from(node),
            })
            .map_err(|e| Error::InvalidArgs(e.to_string()))
        })
        .await
    }

    /// The process lets go of everything it held; returns how many nodes.
    async fn remove_holder(
        &self,
        pid: u32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<u32, Error> {
        self.run(connection, &header, move |k| {
            k.remove_holder(pid)
                .map(|n| n as u32)
                .map_err(|e| Error::Kernel(e.to_string()))
        })
        .await
    }

    /// Hot-unplug.
    async fn remove_device(
        &self,
        address: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), Error> {
        let address = parse_address(&address)?;
        self.run(connection, &header, move |k| {
            k.remove_device(&address)
                .map_err(|e| Error::Kernel(e.to_string()))
        })
        .await
    }

    /// Rescan: the device comes back as it was at boot.
    async fn restore_device(
        &self,
        address: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), Error> {
        let address = parse_address(&address)?;
        self.run(connection, &header, move |k| {
            k.restore_device(&address)
                .map_err(|e| Error::Kernel(e.to_string()))
        })
        .await
    }

    /// How many reads vfiod has made of the simulated kernel since it
    /// started: a call that did no work leaves it as it was.
    #[zbus(property(emits_changed_signal = "false"))]
    fn kernel_reads(&self) -> u64 {
        self.kernel.reads()
    }

    /// The hung unbind of the device (`unbind = "hang"`) ends, as a stuck
    /// driver's remove() finally would; false when none was pending.
    async fn end_hang(
        &self,
        address: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<bool, Error> {
        let address = parse_address(&address)?;
        self.run(connection, &header, move |k| {
            k.end_hang(&address)
                .map_err(|e| Error::Kernel(e.to_string()))
        })
        .await
    }

    /// Crash-point testing: vfiod dies by SIGKILL right after `writes` more
    /// kernel writes have taken effect (0 disarms).
    async fn crash_after_writes(
        &self,
        writes: u32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), Error> {
        self.run(connection, &header, move |k| {
            k.crash_after_writes((writes > 0).then_some(writes));
            Ok(())
        })
        .await
    }

    /// One kernel call by name (`kernel::probe_ops`), as the real-kernel
    /// lane makes it on the real kernel, answered in the same words.
    async fn kernel_call(
        &self,
        op: String,
        args: Vec<String>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<String, Error> {
        self.run(connection, &header, move |k| {
            crate::kernel::probe_ops::call(k, &op, &args).map_err(Error::InvalidArgs)
        })
        .await
    }

    /// What VFIO_GROUP_GET_STATUS would say about group N.
    fn group_viable(&self, group: u32) -> bool {
        self.kernel.group_viable(group)
    }
}
