//! `vfioctl snapshot`'s reader, run on the simulated kernel: what it
//! writes is the machine file the simulator was booted from.

use vfiod_host::snapshot::{HostFiles, render, snapshot};
use vfiod_pci::machine::IommuKind;

use super::*;

#[test]
fn the_example_machine_round_trips_through_the_simulated_kernel() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../machines/z77-rx580.toml"
    ));
    let original = MachineFile::load(path).unwrap();
    let state = TempDir::new();
    let kernel = SimKernel::from_machine(original.clone(), &state.0.join("state")).unwrap();
    let empty = TempDir::new();
    let (machine, warnings) = snapshot(&kernel, &HostFiles::new(&empty.0)).unwrap();
    // An empty root shows no dmar: the kind is a guess, and says so.
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(machine.machine.iommu, IommuKind::Intel);
    assert_eq!(machine.devices.len(), original.devices.len());
    for got in &machine.devices {
        let mut want = original.device(&got.address).unwrap().clone();
        want.holders.clear();
        want.fault = None;
        want.host_driver = None;
        assert_eq!(got, &want);
    }
    // The doctor's facts come back as the machine file gave them.
    assert!(original.host.is_some());
    assert_eq!(machine.host, original.host);
    render(&machine).unwrap();
}
