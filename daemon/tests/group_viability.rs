//! Which group members may stay on their drivers, as the kernel's
//! `vfio_dev_driver_allowed` says (6.1): only functions whose header type
//! is not "normal" (PCI-to-PCI and CardBus bridges). An ISA bridge is a
//! normal function: the lane's ICH9 LPC bridge on lpc_ich leaves group 6
//! not viable whatever happens to its SATA and SMBus functions (seen in
//! the libvirt lane: QEMU's "vfio 0000:00:1f.3: group 6 is not viable").

mod common;

use common::{Rig, addr};
use vfiod::kernel::{Kernel, VFIO_DRIVER, VFIO_MODULE};
use vfiod_dbus::Error;

const LPC: &str = "0000:00:1f.0";
const SATA: &str = "0000:00:1f.2";
const SMBUS: &str = "0000:00:1f.3";

#[test]
fn an_isa_bridge_on_its_driver_leaves_the_group_not_viable() {
    let rig = Rig::shipped("qemu-q35");
    rig.sim.load_module(VFIO_MODULE).unwrap();
    for a in [SATA, SMBUS] {
        rig.sim.set_driver(&addr(a), Some(VFIO_DRIVER)).unwrap();
    }
    assert_eq!(rig.driver(LPC).as_deref(), Some("lpc_ich"));
    assert!(
        !rig.sim.group_viable(6),
        "lpc_ich is not a driver vfio allows"
    );
}

#[test]
fn binding_a_function_beside_an_isa_bridge_is_refused_and_nothing_moves() {
    let rig = Rig::shipped("qemu-q35");
    match rig.bind(SMBUS) {
        Err(Error::GroupNotViable(message)) => {
            assert!(
                message.contains("00:1f.0"),
                "names the LPC bridge: {message}"
            );
        }
        other => panic!("expected GroupNotViable, got {other:?}"),
    }
    assert_eq!(rig.driver(LPC).as_deref(), Some("lpc_ich"));
    assert_eq!(rig.driver(SATA).as_deref(), Some("ahci"));
    assert_eq!(rig.driver(SMBUS).as_deref(), Some("i801_smbus"));
}
