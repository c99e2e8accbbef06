//! `reset_method` as pci-sysfs keeps it (kernel >= 5.15).

use super::*;

fn methods(kernel: &SimKernel) -> Vec<String> {
    kernel.device(&addr(GPU)).unwrap().unwrap().reset_methods
}

#[test]
fn a_method_the_function_supports_is_kept_and_default_restores_them_all() {
    let dir = TempDir::new();
    let kernel = sim(&dir, gpu_machine(WITH_VFIO, "reset = [\"flr\", \"bus\"]"));
    assert_eq!(methods(&kernel), ["flr", "bus"]);
    kernel.set_reset_method(&addr(GPU), "bus").unwrap();
    assert_eq!(methods(&kernel), ["bus"]);
    kernel.set_reset_method(&addr(GPU), "default").unwrap();
    assert_eq!(methods(&kernel), ["flr", "bus"]);
    kernel.set_reset_method(&addr(GPU), "bus flr").unwrap();
    assert_eq!(methods(&kernel), ["bus", "flr"]);
}

#[test]
fn a_method_the_function_lacks_is_refused_and_changes_nothing() {
    let dir = TempDir::new();
    let kernel = sim(&dir, gpu_machine(WITH_VFIO, "reset = [\"bus\"]"));
    for value in ["flr", "bus flr", "no_such_method"] {
        let err = kernel.set_reset_method(&addr(GPU), value).unwrap_err();
        assert_eq!(errno(&err), Some(libc::EINVAL), "{value}: {err}");
        assert_eq!(methods(&kernel), ["bus"], "{value}");
    }
}

#[test]
fn device_specific_exists_only_with_vendor_reset_loaded_for_a_device_it_lists() {
    let gpu = "reset = [\"bus\"]\nvendor_reset = true";
    let dir = TempDir::new();
    let without = sim(&dir, gpu_machine(WITH_VFIO, gpu));
    let err = without
        .set_reset_method(&addr(GPU), "device_specific")
        .unwrap_err();
    assert_eq!(errno(&err), Some(libc::EINVAL), "{err}");

    let dir = TempDir::new();
    let loaded = "iommu = \"intel\"\nmodules = [\"vfio_pci\", \"vendor_reset\"]";
    let with = sim(&dir, gpu_machine(loaded, gpu));
    // Loaded after the device was found: not in the boot's list.
    assert_eq!(methods(&with), ["bus"]);
    with.set_reset_method(&addr(GPU), "device_specific")
        .unwrap();
    assert_eq!(methods(&with), ["device_specific"]);
    with.set_reset_method(&addr(GPU), "default").unwrap();
    assert_eq!(methods(&with), ["device_specific", "bus"]);

    let dir = TempDir::new();
    let unlisted = sim(&dir, gpu_machine(loaded, "reset = [\"bus\"]"));
    let err = unlisted
        .set_reset_method(&addr(GPU), "device_specific")
        .unwrap_err();
    assert_eq!(errno(&err), Some(libc::EINVAL), "{err}");
}

#[test]
fn before_5_15_or_without_any_reset_there_is_no_file_to_write() {
    for gpu in ["reset = [\"unknown\"]", ""] {
        let dir = TempDir::new();
        let kernel = sim(&dir, gpu_machine(WITH_VFIO, gpu));
        let err = kernel.set_reset_method(&addr(GPU), "bus").unwrap_err();
        assert_eq!(errno(&err), Some(libc::ENOENT), "{gpu}: {err}");
    }
}

#[test]
fn the_written_method_survives_a_restart_of_vfiod() {
    let dir = TempDir::new();
    let machine = gpu_machine(WITH_VFIO, "reset = [\"flr\", \"bus\"]");
    sim(&dir, machine.clone())
        .set_reset_method(&addr(GPU), "bus")
        .unwrap();
    assert_eq!(methods(&sim(&dir, machine)), ["bus"]);
}
