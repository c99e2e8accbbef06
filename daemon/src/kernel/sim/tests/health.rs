//! Functions left dead by their VM, and the kernel's ways back.

use super::*;

fn dead(how: &str) -> (TempDir, SimKernel) {
    let dir = TempDir::new();
    let gpu = format!("reset = [\"bus\"]\nfault = {{ dead = \"{how}\" }}");
    let kernel = sim(&dir, gpu_machine(WITH_VFIO, &gpu));
    (dir, kernel)
}

fn live(kernel: &SimKernel) -> Option<PciId> {
    kernel.live_id(&addr(GPU)).unwrap()
}

const DEAD: Option<PciId> = Some(PciId {
    vendor: 0xffff,
    device: 0xffff,
});

fn alive() -> Option<PciId> {
    Some("1002:67df".parse().unwrap())
}

#[test]
fn a_function_is_dead_once_vfio_pci_has_had_it_until_a_reset() {
    let (_dir, kernel) = dead("until-reset");
    assert_eq!(live(&kernel), alive());
    bind_vfio(&kernel, &addr(GPU)).unwrap();
    assert_eq!(live(&kernel), DEAD);
    kernel.reset(&addr(GPU)).unwrap();
    assert_eq!(live(&kernel), alive());
}

#[test]
fn a_host_driver_asked_to_probe_a_dead_function_is_recorded_and_does_not_bind() {
    let (_dir, kernel) = dead("forever");
    bind_vfio(&kernel, &addr(GPU)).unwrap();
    release(&kernel, &addr(GPU)).unwrap();
    assert_eq!(driver_of(&kernel, GPU), None);
    assert_eq!(kernel.dead_probed(), vec![addr(GPU)]);
}

#[test]
fn a_reset_that_fails_says_eio_and_one_without_a_method_has_no_file() {
    let dir = TempDir::new();
    let kernel = sim(
        &dir,
        gpu_machine(WITH_VFIO, "reset = [\"bus\"]\nfault = { reset = \"fail\" }"),
    );
    let err = kernel.reset(&addr(GPU)).unwrap_err();
    assert_eq!(errno(&err), Some(libc::EIO), "{err}");
    let dir = TempDir::new();
    let kernel = sim(&dir, gpu_machine(WITH_VFIO, ""));
    let err = kernel.reset(&addr(GPU)).unwrap_err();
    assert_eq!(errno(&err), Some(libc::ENOENT), "{err}");
}

#[test]
fn remove_and_rescan_bring_back_a_function_dead_until_rescan_probed_at_once() {
    let (_dir, kernel) = dead("until-rescan");
    bind_vfio(&kernel, &addr(GPU)).unwrap();
    kernel.reset(&addr(GPU)).unwrap();
    assert_eq!(live(&kernel), DEAD, "a reset is not enough");
    kernel.remove(&addr(GPU)).unwrap();
    assert!(kernel.device(&addr(GPU)).unwrap().is_none());
    kernel.rescan(Some(&addr(ROOT_PORT))).unwrap();
    assert_eq!(live(&kernel), alive());
    // As the kernel's pci_bus_add_device does, drivers_autoprobe or not.
    assert_eq!(driver_of(&kernel, GPU).as_deref(), Some("amdgpu"));
    assert_eq!(kernel.driver_override(&addr(GPU)).unwrap(), None);
    assert!(kernel.dead_probed().is_empty());
}

#[test]
fn a_rescan_does_not_find_a_function_dead_for_good() {
    for how in ["forever", "until-reset"] {
        let (_dir, kernel) = dead(how);
        bind_vfio(&kernel, &addr(GPU)).unwrap();
        kernel.remove(&addr(GPU)).unwrap();
        kernel.rescan(None).unwrap();
        assert!(kernel.device(&addr(GPU)).unwrap().is_none(), "{how}");
        assert!(kernel.dead_probed().is_empty(), "{how}");
    }
}
