use std::path::PathBuf;

use vfiod_host::sysfs::fixture::Fixture;
use vfiod_host::sysfs::fixture::desktop::*;

use super::*;
use crate::kernel::{Inspect, KernelError};

#[test]
fn loading_a_module_into_a_fixture_is_refused() {
    let fx = Fixture::new();
    let err = fx
        .kernel()
        .load_module(crate::kernel::VFIO_MODULE)
        .unwrap_err();
    assert!(matches!(err, KernelError::Module { .. }), "{err}");
    assert!(err.to_string().contains("fixture"), "{err}");
}

#[test]
fn writes_land_in_the_right_files() {
    let fx = desktop();
    let kernel = fx.kernel();
    let gpu = addr(GPU);
    let override_file = fx.function_dir(GPU).join("driver_override");

    kernel.set_driver_override(&gpu, Some("vfio-pci")).unwrap();
    assert_eq!(fx.read(&override_file), "vfio-pci");
    kernel.set_driver_override(&gpu, None).unwrap();
    assert_eq!(fx.read(&override_file), "\n");

    kernel.unbind(&gpu, "amdgpu").unwrap();
    assert_eq!(fx.read("sys/bus/pci/drivers/amdgpu/unbind"), GPU);
    kernel.probe(&gpu).unwrap();
    assert_eq!(fx.read("sys/bus/pci/drivers_probe"), GPU);
}

#[test]
fn failed_writes_keep_the_os_error() {
    let fx = desktop();
    let kernel = fx.kernel();
    let err = kernel.unbind(&addr(GPU), "nouveau").unwrap_err();
    match &err {
        KernelError::Io { op, path, source } => {
            assert_eq!(*op, "unbind");
            assert!(
                path.ends_with("sys/bus/pci/drivers/nouveau/unbind"),
                "{path}"
            );
            assert_eq!(source.raw_os_error(), Some(nix::libc::ENOENT));
        }
        other => panic!("{other}"),
    }
    assert!(!err.is_busy());

    // A directory where the attribute should be: the open fails, EISDIR.
    fx.remove("sys/bus/pci/drivers_probe");
    fx.mkdir("sys/bus/pci/drivers_probe");
    let err = kernel.probe(&addr(GPU)).unwrap_err();
    assert!(
        matches!(&err, KernelError::Io { source, .. } if source.raw_os_error() == Some(nix::libc::EISDIR)),
        "{err}"
    );

    for bad in ["", "../amdgpu", "vfio-pci\nnouveau", "a b"] {
        assert!(kernel.unbind(&addr(GPU), bad).is_err(), "{bad:?}");
        assert!(
            kernel.set_driver_override(&addr(GPU), Some(bad)).is_err(),
            "{bad:?}"
        );
    }
    assert_eq!(
        fx.read(fx.function_dir(GPU).join("driver_override")),
        "(null)\n",
        "nothing written"
    );
}

/// Kernels with iommufd's device files (6.6+): a VM may hold the
/// function's `/dev/vfio/devices/vfioX` and not the group's node; a
/// release would then wait in vfio-pci's remove until it lets go.
#[test]
fn a_release_is_refused_while_a_vm_holds_the_functions_vfio_device_file() {
    use crate::ledger::Ledger;
    use crate::plan::{self, MoveOptions};
    use vfiod_config::Config;
    use vfiod_dbus::{Direction, Error};

    let fx = desktop();
    let kernel = fx.kernel();
    let gpu = addr(GPU);
    fx.unbind(GPU);
    fx.bind(GPU, "vfio-pci");
    fx.vfio_group(1);
    // 6.1 to 6.5: the sysfs entry, no device file.
    fx.mkdir(fx.function_dir(GPU).join("vfio-dev/vfio0"));
    assert_eq!(
        kernel.vfio_device_nodes(&gpu).unwrap(),
        Vec::<PathBuf>::new()
    );
    fx.write("dev/vfio/devices/vfio0", "");
    assert_eq!(
        kernel.vfio_device_nodes(&gpu).unwrap(),
        [PathBuf::from("/dev/vfio/devices/vfio0")]
    );
    assert_eq!(
        kernel.vfio_device_nodes(&addr(GPU_AUDIO)).unwrap(),
        Vec::<PathBuf>::new()
    );

    let release = || {
        plan::plan(
            &kernel,
            &Config::default(),
            &Ledger::in_memory(),
            GPU,
            Direction::Release,
            &MoveOptions::default(),
        )
    };
    assert!(release().is_ok(), "{:?}", release());
    fx.process(5150, "qemu-system-x86", &["/dev/vfio/devices/vfio0"]);
    let err = release().unwrap_err();
    assert!(matches!(err, Error::DeviceBusy(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("qemu-system-x86 (pid 5150) holds /dev/vfio/devices/vfio0"),
        "{message}"
    );
}

#[test]
fn a_write_to_a_function_that_is_not_on_the_bus_names_it() {
    let fx = desktop();
    let absent = addr("0000:09:00.0");
    let err = fx
        .kernel()
        .set_driver_override(&absent, Some("vfio-pci"))
        .unwrap_err();
    assert!(
        matches!(err, KernelError::NoDevice(a) if a == absent),
        "{err}"
    );
}

#[test]
fn a_write_through_a_link_out_of_the_root_lands_inside() {
    let fx = desktop();
    let dir = linked_from_the_real_root(&fx);
    fx.kernel()
        .set_driver_override(&addr("00ff:05:00.0"), Some("vfio-pci"))
        .unwrap();
    assert_eq!(fx.read(dir.join("driver_override")), "vfio-pci");
}

#[test]
fn loading_into_a_fixture_is_refused_without_running_anything() {
    let tree = vfiod_host::sysfs::rooted::Rooted::new(PathBuf::from("/nonexistent/fixture"));
    let err = load_module(&tree, "vfio_pci").unwrap_err().to_string();
    assert!(
        err.contains("vfio_pci") && err.contains("fixture tree"),
        "{err}"
    );
    let err = load_module(&tree, "-r").unwrap_err().to_string();
    assert!(err.contains("not a module name"), "{err}");
}

#[test]
fn udev_is_busy_while_its_queue_file_exists() {
    let fx = desktop();
    let kernel = fx.kernel();
    assert!(!kernel.udev_busy());
    let queue = fx.root().join("run/udev/queue");
    std::fs::create_dir_all(queue.parent().unwrap()).unwrap();
    std::fs::write(&queue, "").unwrap();
    assert!(kernel.udev_busy());
    std::fs::remove_file(&queue).unwrap();
    assert!(!kernel.udev_busy());
}
