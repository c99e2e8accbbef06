//! Made-up machines for tests: sysfs, procfs and /dev laid out as the
//! kernel lays them out (directories under `sys/devices`, relative links
//! from `sys/bus`, `sys/class` and `sys/dev`) in a temporary directory,
//! which goes away with the fixture.
//!
//! Paths given to and returned by these helpers are relative to the
//! fixture's root (`sys/devices/pci0000:00/0000:00:02.0`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

pub mod desktop;

use super::Sysfs;

/// What `proc/sys/kernel/osrelease` says in a fresh fixture.
pub const KERNEL_RELEASE: &str = "6.1.0-test-amd64";

pub struct Fixture {
    root: PathBuf,
}

impl Fixture {
    /// An empty machine: a PCI bus without devices, no IOMMU, no modules,
    /// nothing mounted, no processes.
    // Not a Default: each one makes a directory on disk.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let template = scratch_dir().join("vfiod-sysfs-XXXXXX");
        let root = nix::unistd::mkdtemp(&template).expect("mkdtemp");
        let fixture = Fixture { root };
        for dir in [
            "sys/bus/pci/devices",
            "sys/bus/pci/drivers",
            "sys/bus/platform/devices",
            "sys/class/graphics",
            "sys/class/vtconsole",
            "sys/dev/block",
            "sys/dev/char",
            "sys/devices/platform",
            "sys/devices/virtual",
            "sys/kernel/iommu_groups",
            "sys/module",
            "dev",
        ] {
            fixture.mkdir(dir);
        }
        fixture.write("sys/bus/pci/drivers_probe", "");
        fixture.write("proc/self/mountinfo", "");
        fixture.write("proc/sys/kernel/osrelease", &format!("{KERNEL_RELEASE}\n"));
        fixture
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn kernel(&self) -> Sysfs {
        Sysfs::new(&self.root)
    }

    /// Where `rel` is on this machine.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.join(rel)
    }

    pub fn mkdir(&self, rel: impl AsRef<Path>) {
        fs::create_dir_all(self.path(rel)).expect("mkdir in fixture");
    }

    /// Writes a file, creating its directory.
    pub fn write(&self, rel: impl AsRef<Path>, contents: &str) {
        let path = self.path(rel);
        fs::create_dir_all(path.parent().expect("a file has a directory"))
            .expect("mkdir in fixture");
        fs::write(&path, contents).expect("write in fixture");
    }

    pub fn append(&self, rel: impl AsRef<Path>, contents: &str) {
        let mut file = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.path(rel))
            .expect("open in fixture");
        file.write_all(contents.as_bytes())
            .expect("append in fixture");
    }

    pub fn read(&self, rel: impl AsRef<Path>) -> String {
        fs::read_to_string(self.path(rel)).expect("read in fixture")
    }

    /// Removes a file, a link or a whole directory.
    pub fn remove(&self, rel: impl AsRef<Path>) {
        let path = self.path(rel);
        let metadata = fs::symlink_metadata(&path).expect("remove: no such path in fixture");
        if metadata.is_dir() {
            fs::remove_dir_all(&path).expect("remove dir in fixture");
        } else {
            fs::remove_file(&path).expect("remove in fixture");
        }
    }

    /// A link at `rel` to `target`, both root-relative, written relative
    /// (`../../../devices/...`) as sysfs writes its own.
    pub fn link(&self, rel: impl AsRef<Path>, target: impl AsRef<Path>) {
        let rel = rel.as_ref();
        let depth = rel.parent().map_or(0, |dir| dir.components().count());
        let relative: PathBuf = std::iter::repeat_n(Path::new(".."), depth)
            .collect::<PathBuf>()
            .join(target);
        self.raw_link(rel, relative);
    }

    /// A link whose target is exactly `target` (absolute ones included).
    pub fn raw_link(&self, rel: impl AsRef<Path>, target: impl AsRef<Path>) {
        let path = self.path(rel);
        fs::create_dir_all(path.parent().expect("a link has a directory"))
            .expect("mkdir in fixture");
        if fs::symlink_metadata(&path).is_ok() {
            fs::remove_file(&path).expect("replace link in fixture");
        }
        symlink(target, &path).expect("symlink in fixture");
    }

    /// Starts describing a PCI function; [`PciFunction::add`] creates it.
    pub fn pci(&self, address: &str) -> PciFunction<'_> {
        PciFunction {
            fixture: self,
            address: address.to_owned(),
            parent: None,
            id: "8086:0000".to_owned(),
            subsystem: None,
            class: "0x000000".to_owned(),
            driver: None,
            driver_override: None,
            group: None,
            boot_vga: None,
            reset: Reset::None,
        }
    }

    /// Gives an existing function other ids (`vvvv:dddd`), in `uevent` and
    /// in `vendor` and `device`.
    pub fn set_id(&self, address: &str, id: &str) {
        let dir = self.function_dir(address);
        let (vendor, device) = id.split_once(':').expect("vvvv:dddd");
        self.write(dir.join("vendor"), &format!("0x{vendor}\n"));
        self.write(dir.join("device"), &format!("0x{device}\n"));
        let uevent = fs::read_to_string(self.path(dir.join("uevent"))).expect("uevent");
        let uevent: String = uevent
            .lines()
            .map(|line| match line.strip_prefix("PCI_ID=") {
                Some(_) => format!("PCI_ID={}\n", id.to_uppercase()),
                None => format!("{line}\n"),
            })
            .collect();
        self.write(dir.join("uevent"), &uevent);
    }

    /// The real directory of an added function.
    pub fn function_dir(&self, address: &str) -> PathBuf {
        let entry = self.path(format!("sys/bus/pci/devices/{address}"));
        let real = fs::canonicalize(&entry).expect("no such PCI function in fixture");
        let root = fs::canonicalize(&self.root).expect("fixture root");
        real.strip_prefix(root)
            .expect("function inside fixture")
            .to_path_buf()
    }

    /// `sys/bus/pci/drivers/DRIVER` with its `bind` and `unbind` files.
    pub fn register_driver(&self, driver: &str) {
        for file in ["bind", "unbind", "new_id", "remove_id"] {
            self.write(format!("sys/bus/pci/drivers/{driver}/{file}"), "");
        }
    }

    /// Binds the function to `driver` (registered if needed): its `driver` link.
    pub fn bind(&self, address: &str, driver: &str) {
        self.register_driver(driver);
        let driver_dir = format!("sys/bus/pci/drivers/{driver}");
        let function_dir = self.function_dir(address);
        self.link(function_dir.join("driver"), &driver_dir);
        self.link(format!("{driver_dir}/{address}"), &function_dir);
    }

    /// Leaves the function without a driver.
    pub fn unbind(&self, address: &str) {
        let driver_link = self.function_dir(address).join("driver");
        let driver = fs::read_link(self.path(&driver_link)).expect("function has a driver");
        let driver = driver
            .file_name()
            .expect("driver link has a name")
            .to_owned();
        self.remove(&driver_link);
        self.remove(Path::new("sys/bus/pci/drivers").join(driver).join(address));
    }

    /// A device with a node below `parent_dir` (`drm/card0` named
    /// `dri/card0`, number `226:0`): its `dev`, its `uevent` with DEVNAME,
    /// and its `sys/dev/char` link. Returns its directory.
    pub fn char_device(
        &self,
        parent_dir: impl AsRef<Path>,
        sub_dir: &str,
        devname: &str,
        number: &str,
    ) -> PathBuf {
        let dir = parent_dir.as_ref().join(sub_dir);
        self.device_files(&dir, devname, number);
        self.link(format!("sys/dev/char/{number}"), &dir);
        dir
    }

    /// A disk whose directory is `dir` (`.../0:0:0:0/block/sda`, or
    /// `.../nvme-subsys0/nvme0n1` where the parent is a class device),
    /// with its `sys/dev/block` link. Returns `dir`.
    pub fn disk(&self, dir: impl AsRef<Path>, number: &str) -> PathBuf {
        let dir = dir.as_ref().to_path_buf();
        let name = dir
            .file_name()
            .expect("a disk has a name")
            .to_string_lossy()
            .into_owned();
        self.device_files(&dir, &name, number);
        self.mkdir(dir.join("slaves"));
        self.mkdir(dir.join("holders"));
        self.link(format!("sys/dev/block/{number}"), &dir);
        dir
    }

    /// A partition (`sda2`) of the disk in `disk_dir`. Returns its directory.
    pub fn partition(&self, disk_dir: impl AsRef<Path>, name: &str, number: &str) -> PathBuf {
        let dir = disk_dir.as_ref().join(name);
        self.device_files(&dir, name, number);
        self.write(dir.join("partition"), "2\n");
        self.link(format!("sys/dev/block/{number}"), &dir);
        dir
    }

    /// A device-mapper disk (`dm-0`) built on the devices in `lower_dirs`.
    pub fn dm_disk(&self, name: &str, number: &str, lower_dirs: &[&Path]) -> PathBuf {
        let dir = self.disk(Path::new("sys/devices/virtual/block").join(name), number);
        for lower in lower_dirs {
            let lower_name = lower.file_name().expect("a device has a name");
            self.link(dir.join("slaves").join(lower_name), lower);
        }
        dir
    }

    /// The first minor number of `major` without a link in `numbers_dir`.
    fn next_minor(&self, numbers_dir: &str, major: u32) -> u32 {
        (0..)
            .find(|minor| {
                fs::symlink_metadata(self.path(format!("{numbers_dir}/{major}:{minor}"))).is_err()
            })
            .expect("a free minor")
    }

    fn device_files(&self, dir: &Path, devname: &str, number: &str) {
        let (major, minor) = number.split_once(':').expect("major:minor");
        self.write(dir.join("dev"), &format!("{number}\n"));
        self.write(
            dir.join("uevent"),
            &format!("MAJOR={major}\nMINOR={minor}\nDEVNAME={devname}\n"),
        );
        self.write(dir.join("power/runtime_status"), "unsupported\n");
    }

    /// A USB device (or, with `port` like `usb1`, a root hub) below
    /// `parent_dir`, with one interface per class in `interface_classes`.
    /// Returns its directory.
    pub fn usb_device(
        &self,
        parent_dir: impl AsRef<Path>,
        port: &str,
        id: &str,
        product: &str,
        device_class: &str,
        interface_classes: &[&str],
    ) -> PathBuf {
        let dir = parent_dir.as_ref().join(port);
        let (vendor, device) = id.split_once(':').expect("vvvv:dddd");
        self.write(dir.join("idVendor"), &format!("{vendor}\n"));
        self.write(dir.join("idProduct"), &format!("{device}\n"));
        self.write(dir.join("bDeviceClass"), &format!("{device_class}\n"));
        self.write(dir.join("product"), &format!("{product}\n"));
        let bus = port
            .trim_start_matches("usb")
            .split('-')
            .next()
            .unwrap_or("1");
        let minor = self.next_minor("sys/dev/char", 189);
        self.char_device(
            parent_dir.as_ref(),
            port,
            &format!("bus/usb/{bus:0>3}/{:03}", minor + 1),
            &format!("189:{minor}"),
        );
        for (number, class) in interface_classes.iter().enumerate() {
            let interface = dir.join(format!("{port}:1.{number}"));
            self.write(interface.join("bInterfaceClass"), &format!("{class}\n"));
            self.write(
                interface.join("bInterfaceNumber"),
                &format!("{number:02x}\n"),
            );
        }
        dir
    }

    /// Appends a mount of `number` (`8:2`) at `mount_point` (escaped as in
    /// mountinfo, `/mnt/my\040data`) to `proc/self/mountinfo`.
    pub fn mount(&self, number: &str, mount_point: &str, fstype: &str, source: &str) {
        let id = self.read("proc/self/mountinfo").lines().count() + 20;
        self.append(
            "proc/self/mountinfo",
            &format!(
                "{id} 1 {number} / {mount_point} rw,relatime shared:{id} - {fstype} {source} rw\n"
            ),
        );
    }

    /// A process with fds open on `targets` (fd 3, 4, ...).
    pub fn process(&self, pid: u32, comm: &str, targets: &[&str]) {
        self.write(format!("proc/{pid}/comm"), &format!("{comm}\n"));
        self.raw_link(format!("proc/{pid}/exe"), format!("/usr/bin/{comm}"));
        self.mkdir(format!("proc/{pid}/fd"));
        for (offset, target) in targets.iter().enumerate() {
            self.raw_link(format!("proc/{pid}/fd/{}", offset + 3), target);
        }
    }

    /// `sys/class/vtconsole/vtconN`.
    pub fn vtconsole(&self, number: u32, name: &str, bound: bool) {
        let dir = format!("sys/devices/virtual/vtconsole/vtcon{number}");
        self.write(format!("{dir}/name"), &format!("{name}\n"));
        self.write(format!("{dir}/bind"), if bound { "1\n" } else { "0\n" });
        self.link(format!("sys/class/vtconsole/vtcon{number}"), &dir);
    }

    /// Framebuffer `fbN` of the device in `device_dir` (a PCI function or
    /// a platform device), as `sys/class/graphics/fbN`.
    pub fn framebuffer(&self, number: u32, device_dir: impl AsRef<Path>) {
        let device_dir = device_dir.as_ref();
        let name = format!("fb{number}");
        let dir = self.char_device(
            device_dir,
            &format!("graphics/{name}"),
            &name,
            &format!("29:{number}"),
        );
        self.link(dir.join("device"), device_dir);
        self.link(format!("sys/class/graphics/{name}"), &dir);
    }

    /// A platform device (`efi-framebuffer.0`). Returns its directory.
    pub fn platform_device(&self, name: &str) -> PathBuf {
        let dir = PathBuf::from(format!("sys/devices/platform/{name}"));
        self.write(
            dir.join("uevent"),
            &format!("DRIVER={}\n", name.split('.').next().unwrap_or(name)),
        );
        self.link(format!("sys/bus/platform/devices/{name}"), &dir);
        dir
    }

    /// `dev/vfio/N`, as it appears once group N has a device on vfio-pci.
    pub fn vfio_group(&self, group: u32) {
        self.write(format!("dev/vfio/{group}"), "");
    }

    pub fn pci_ids(&self, text: &str) {
        self.write("usr/share/hwdata/pci.ids", text);
    }

    /// `sys/module/MODULE`, as for a loaded module.
    pub fn loaded_module(&self, module: &str) {
        self.write(format!("sys/module/{module}/refcnt"), "0\n");
    }

    /// `lib/modules/RELEASE/FILE` (`modules.dep`, `modules.builtin`).
    pub fn module_list(&self, file: &str, contents: &str) {
        self.write(format!("lib/modules/{KERNEL_RELEASE}/{file}"), contents);
    }

    // What the doctor reads beyond PCI (`kernel/sysfs/host.rs`).

    /// `proc/cpuinfo` of one CPU with these `flags`.
    pub fn cpu_flags(&self, flags: &str) {
        self.write(
            "proc/cpuinfo",
            &format!("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n\n"),
        );
    }

    /// `proc/cmdline`.
    pub fn cmdline(&self, cmdline: &str) {
        self.write("proc/cmdline", &format!("{cmdline}\n"));
    }

    /// `dev/kvm`.
    pub fn kvm(&self) {
        self.write("dev/kvm", "");
    }

    /// `sys/firmware/acpi/tables/NAME` for each name (the directory even
    /// when there are none).
    pub fn acpi_tables(&self, names: &[&str]) {
        self.mkdir("sys/firmware/acpi/tables");
        for name in names {
            self.write(format!("sys/firmware/acpi/tables/{name}"), "");
        }
    }

    /// A hugepage pool of `size_kb` pages.
    pub fn hugepages(&self, size_kb: u64, total: u64, free: u64) {
        let dir = format!("sys/kernel/mm/hugepages/hugepages-{size_kb}kB");
        self.write(format!("{dir}/nr_hugepages"), &format!("{total}\n"));
        self.write(format!("{dir}/free_hugepages"), &format!("{free}\n"));
    }

    /// A file with permission bits `mode`.
    pub fn write_mode(&self, rel: impl AsRef<Path>, contents: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let rel = rel.as_ref();
        self.write(rel, contents);
        fs::set_permissions(self.path(rel), fs::Permissions::from_mode(mode))
            .expect("chmod in fixture");
    }

    /// `etc/passwd` and `etc/group` in which the user and group that own
    /// the fixture's files (whoever runs the test) are `owner` and
    /// `group`; `passwd` and `groups` are further lines.
    pub fn accounts(&self, owner: &str, group: &str, passwd: &str, groups: &str) {
        let uid = nix::unistd::geteuid();
        let gid = nix::unistd::getegid();
        self.write(
            "etc/passwd",
            &format!("{owner}:x:{uid}:{gid}:owner:/:/bin/sh\n{passwd}"),
        );
        self.write("etc/group", &format!("{group}:x:{gid}:\n{groups}"));
    }
}

/// `$TMPDIR` when set, else tmpfs at /dev/shm when there is one, else the
/// usual temp dir. A fixture is a thousand tiny files: on a busy ext4 disk
/// making one took 0.3 s, on tmpfs 5 ms.
fn scratch_dir() -> PathBuf {
    if std::env::var_os("TMPDIR").is_none() {
        let shm = Path::new("/dev/shm");
        if nix::unistd::access(
            shm,
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        )
        .is_ok()
        {
            return shm.to_path_buf();
        }
    }
    std::env::temp_dir()
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Best effort: a leftover temp dir is no reason to fail a test.
        let _ = fs::remove_dir_all(&self.root);
    }
}

enum Reset {
    None,
    /// `reset_method` (kernel >= 5.15).
    Methods(String),
    /// Only a `reset` file (older kernels).
    Legacy,
}

/// A PCI function being described; see [`Fixture::pci`].
pub struct PciFunction<'f> {
    fixture: &'f Fixture,
    address: String,
    parent: Option<String>,
    id: String,
    subsystem: Option<String>,
    class: String,
    driver: Option<String>,
    driver_override: Option<String>,
    group: Option<u32>,
    boot_vga: Option<bool>,
    reset: Reset,
}

impl PciFunction<'_> {
    /// Behind the bridge at `parent` (added already).
    pub fn behind(mut self, parent: &str) -> Self {
        self.parent = Some(parent.to_owned());
        self
    }

    /// `1002:67df`.
    pub fn id(mut self, id: &str) -> Self {
        self.id = id.to_owned();
        self
    }

    pub fn subsystem(mut self, id: &str) -> Self {
        self.subsystem = Some(id.to_owned());
        self
    }

    /// `0x030000`.
    pub fn class(mut self, class: &str) -> Self {
        self.class = class.to_owned();
        self
    }

    pub fn driver(mut self, driver: &str) -> Self {
        self.driver = Some(driver.to_owned());
        self
    }

    /// What `driver_override` reads; `(null)` when not given.
    pub fn driver_override(mut self, driver: &str) -> Self {
        self.driver_override = Some(driver.to_owned());
        self
    }

    pub fn group(mut self, group: u32) -> Self {
        self.group = Some(group);
        self
    }

    /// Writes `boot_vga` (only VGA functions have the file).
    pub fn boot_vga(mut self, boot_vga: bool) -> Self {
        self.boot_vga = Some(boot_vga);
        self
    }

    /// `reset_method`, e.g. `flr bus`.
    pub fn reset_methods(mut self, methods: &str) -> Self {
        self.reset = Reset::Methods(methods.to_owned());
        self
    }

    /// Only a `reset` file, as before kernel 5.15.
    pub fn legacy_reset(mut self) -> Self {
        self.reset = Reset::Legacy;
        self
    }

    /// Creates the function. Returns its directory.
    pub fn add(self) -> PathBuf {
        let fx = self.fixture;
        let address = &self.address;
        let dir = match &self.parent {
            Some(parent) => fx.function_dir(parent).join(address),
            None => {
                let (domain_bus, _) = address.rsplit_once(':').expect("DDDD:BB:DD.F");
                PathBuf::from(format!("sys/devices/pci{domain_bus}/{address}"))
            }
        };
        let (vendor, device) = self.id.split_once(':').expect("vvvv:dddd");
        fx.write(dir.join("vendor"), &format!("0x{vendor}\n"));
        fx.write(dir.join("device"), &format!("0x{device}\n"));
        if let Some((vendor, device)) = self.subsystem.as_deref().and_then(|id| id.split_once(':'))
        {
            fx.write(dir.join("subsystem_vendor"), &format!("0x{vendor}\n"));
            fx.write(dir.join("subsystem_device"), &format!("0x{device}\n"));
        }
        fx.write(dir.join("class"), &format!("{}\n", self.class));
        let driver_override = self.driver_override.as_deref().unwrap_or("(null)");
        fx.write(dir.join("driver_override"), &format!("{driver_override}\n"));
        fx.write(
            dir.join("uevent"),
            &pci_uevent(address, &self.class, &self.id, self.subsystem.as_deref()),
        );
        fx.write(dir.join("power/control"), "on\n");
        if let Some(boot_vga) = self.boot_vga {
            fx.write(dir.join("boot_vga"), if boot_vga { "1\n" } else { "0\n" });
        }
        match &self.reset {
            Reset::None => {}
            Reset::Methods(methods) => fx.write(dir.join("reset_method"), &format!("{methods}\n")),
            Reset::Legacy => fx.write(dir.join("reset"), ""),
        }
        fx.link(dir.join("subsystem"), "sys/bus/pci");
        fx.link(format!("sys/bus/pci/devices/{address}"), &dir);
        if let Some(group) = self.group {
            let group_dir = format!("sys/kernel/iommu_groups/{group}");
            fx.link(dir.join("iommu_group"), &group_dir);
            fx.link(format!("{group_dir}/devices/{address}"), &dir);
        }
        if let Some(driver) = &self.driver {
            fx.bind(address, driver);
        }
        dir
    }
}

/// A PCI function's `uevent` as the kernel writes it (`pci_uevent`):
/// class and ids in upper-case hex without `0x`.
fn pci_uevent(address: &str, class: &str, id: &str, subsystem: Option<&str>) -> String {
    let class = u32::from_str_radix(class.trim_start_matches("0x"), 16).expect("hex class");
    let mut text = format!("PCI_CLASS={class:04X}\nPCI_ID={}\n", id.to_uppercase());
    if let Some(subsystem) = subsystem {
        text.push_str(&format!("PCI_SUBSYS_ID={}\n", subsystem.to_uppercase()));
    }
    text.push_str(&format!("PCI_SLOT_NAME={address}\n"));
    text
}
