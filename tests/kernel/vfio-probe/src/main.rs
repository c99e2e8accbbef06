//! vfio-probe: the real-kernel lane's eyes (tests/kernel/run).
//!
//! ```text
//! vfio-probe group GROUP BDF
//!     Opens /dev/vfio/GROUP as a VMM does: VFIO_GROUP_GET_STATUS, then a
//!     type1v2 container, a device fd for BDF and a 1 MiB DMA map/unmap.
//!     Exit 0 when all of it works, 3 when the kernel says the group is not
//!     viable, 1 on any other failure.
//! vfio-probe hold PATH...
//!     Opens every PATH and keeps them open until killed (a desktop holding
//!     a DRM node, PipeWire holding a sound card). Prints "holding" once
//!     they are all open.
//! vfio-probe follow [--sim] [--within-ms MS] BDF DRIVER...
//!     Moves BDF to each DRIVER in turn (empty: unbound) behind vfiod's
//!     back - raw sysfs unbind/bind writes, or with --sim the simulator's
//!     SetDriver - and times how long vfiod's Device.Driver property takes
//!     to say so, with the kernel's and udevd's uevents for comparison.
//!     Exit 0 when, for each DRIVER, the median is within MS (default 100).
//! vfio-probe sim-unhold MACHINE STATE_DIR PID
//!     The simulated kernel of `vfiod --machine MACHINE --state-dir
//!     STATE_DIR`, while no vfiod runs on it (killed): process PID lets go
//!     of the nodes it held, as a real holder exiting would - a waiting
//!     unbind it held up ends. Prints how many holds it let go.
//! vfio-probe kernel [--sim] CALL ARG...
//!     One kernel call by name (vfiod's `kernel::probe_ops`: reset_method,
//!     live config-space ids, reset, remove, rescan, drivers_autoprobe) on
//!     this machine's real kernel, or with --sim on the simulated kernel of
//!     the vfiod on the system bus (Simulator.KernelCall). Prints the
//!     answer in words (a value, "ok", "errno N"), the same for both.
//! vfio-probe time-live-id BDF ROUNDS
//!     Times vfiod's health read (the config space's ids) ROUNDS times on
//!     the real kernel; prints the median and the 90th percentile in µs.
//! ```
//! Exit 2 for a usage error. Kept out of the daemon: it is a test tool.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vfiod_dbus::proxy::DeviceProxy;
use zbus::proxy::CacheProperties;

const USAGE: &str = "usage: vfio-probe group GROUP BDF | hold PATH... | follow [--sim] [--within-ms MS] BDF DRIVER | sim-unhold MACHINE STATE_DIR PID | kernel [--sim] CALL ARG... | time-live-id BDF ROUNDS";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("group") if args.len() == 3 => group(&args[1], &args[2]),
        Some("hold") if args.len() > 1 => hold(&args[1..]),
        Some("follow") => follow_command(&args[1..]),
        Some("sim-unhold") if args.len() == 4 => sim_unhold(&args[1], &args[2], &args[3]),
        Some("kernel") if args.len() > 1 => kernel_call(&args[1..]),
        Some("time-live-id") if args.len() == 3 => time_live_id(&args[1], &args[2]),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!("vfio-probe: {message}");
            ExitCode::from(1)
        }
    }
}

/// A holder of the simulated kernel lets go while vfiod is down: the
/// simulator's own control surface, on its persisted running state.
fn sim_unhold(machine: &str, state_dir: &str, pid: &str) -> Result<u8, String> {
    let pid: u32 = pid.parse().map_err(|e| format!("pid {pid}: {e}"))?;
    let kernel = vfiod::kernel::sim::SimKernel::open(Path::new(machine), Path::new(state_dir))
        .map_err(|e| e.to_string())?;
    let released = kernel.remove_holder(pid).map_err(|e| e.to_string())?;
    println!("{released}");
    Ok(0)
}

/// `kernel [--sim] CALL ARG...`: see the module documentation.
fn kernel_call(args: &[String]) -> Result<u8, String> {
    let (sim, args) = match args.first().map(String::as_str) {
        Some("--sim") => (true, &args[1..]),
        _ => (false, args),
    };
    let Some((op, rest)) = args.split_first() else {
        return Err(USAGE.into());
    };
    let answer = if sim {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio: {e}"))?
            .block_on(async {
                let bus = |e: zbus::Error| format!("D-Bus: {e}");
                let conn = zbus::Connection::system().await.map_err(bus)?;
                let reply = conn
                    .call_method(
                        Some("org.vfiod1"),
                        "/org/vfiod1/simulator",
                        Some("org.vfiod1.Simulator"),
                        "KernelCall",
                        &(op.as_str(), rest),
                    )
                    .await
                    .map_err(bus)?;
                reply.body().deserialize::<String>().map_err(bus)
            })?
    } else {
        let kernel = vfiod::kernel::Sysfs::this_machine();
        vfiod::kernel::probe_ops::call(&kernel, op, rest)
            .map_err(|e| format!("{e} ({})", vfiod::kernel::probe_ops::USAGE))?
    };
    println!("{answer}");
    Ok(0)
}

/// `time-live-id BDF ROUNDS`: what the health check costs per function.
fn time_live_id(bdf: &str, rounds: &str) -> Result<u8, String> {
    use vfiod::kernel::Inspect;
    let address = bdf.parse().map_err(|e| format!("{bdf}: {e}"))?;
    let rounds: usize = rounds.parse().map_err(|e| format!("{rounds}: {e}"))?;
    let kernel = vfiod::kernel::Sysfs::this_machine();
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        let t0 = Instant::now();
        kernel
            .live_id(&address)
            .map_err(|e| e.to_string())?
            .ok_or("the config space is unreadable")?;
        times.push(t0.elapsed());
    }
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    println!(
        "live id of {bdf}: median {:.1} us, p90 {:.1} us over {} reads",
        at(0.5),
        at(0.9),
        times.len()
    );
    Ok(0)
}

/// The VFIO ioctls (linux/vfio.h): `_IO(';', 100 + n)`, each taking an
/// integer or a pointer although the encoding says neither.
mod vfio {
    use nix::libc::{c_char, c_int};
    use nix::{ioctl_none_bad, ioctl_readwrite_bad, ioctl_write_int_bad, ioctl_write_ptr_bad};

    const fn code(nr: u32) -> nix::sys::ioctl::ioctl_num_type {
        nix::request_code_none!(b';', 100 + nr) as nix::sys::ioctl::ioctl_num_type
    }

    pub const API_VERSION: i32 = 0;
    pub const TYPE1V2_IOMMU: i32 = 3;
    pub const GROUP_FLAGS_VIABLE: u32 = 1;
    pub const DMA_MAP_FLAG_READ: u32 = 1;
    pub const DMA_MAP_FLAG_WRITE: u32 = 2;

    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct GroupStatus {
        pub argsz: u32,
        pub flags: u32,
    }

    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct DeviceInfo {
        pub argsz: u32,
        pub flags: u32,
        pub num_regions: u32,
        pub num_irqs: u32,
    }

    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct DmaMap {
        pub argsz: u32,
        pub flags: u32,
        pub vaddr: u64,
        pub iova: u64,
        pub size: u64,
    }

    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct DmaUnmap {
        pub argsz: u32,
        pub flags: u32,
        pub iova: u64,
        pub size: u64,
    }

    ioctl_none_bad!(get_api_version, code(0));
    ioctl_write_int_bad!(check_extension, code(1));
    ioctl_write_int_bad!(set_iommu, code(2));
    ioctl_readwrite_bad!(group_get_status, code(3), GroupStatus);
    ioctl_write_ptr_bad!(group_set_container, code(4), c_int);
    ioctl_write_ptr_bad!(group_get_device_fd, code(6), c_char);
    ioctl_readwrite_bad!(device_get_info, code(7), DeviceInfo);
    ioctl_readwrite_bad!(iommu_map_dma, code(13), DmaMap);
    ioctl_readwrite_bad!(iommu_unmap_dma, code(14), DmaUnmap);
}

fn open_rw(path: &str) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("open {path}: {e}"))
}

fn ioctl_failed(what: &str) -> impl Fn(nix::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// What QEMU does with a group before it starts a VM.
fn group(group: &str, bdf: &str) -> Result<u8, String> {
    let container = open_rw("/dev/vfio/vfio")?;
    let c = container.as_raw_fd();
    // SAFETY: plain ioctls on an fd we own, with no or integer arguments.
    let version =
        unsafe { vfio::get_api_version(c) }.map_err(ioctl_failed("VFIO_GET_API_VERSION"))?;
    if version != vfio::API_VERSION {
        return Err(format!(
            "VFIO API version {version}, expected {}",
            vfio::API_VERSION
        ));
    }
    // SAFETY: as above.
    let type1v2 = unsafe { vfio::check_extension(c, vfio::TYPE1V2_IOMMU) }
        .map_err(ioctl_failed("VFIO_CHECK_EXTENSION"))?;
    if type1v2 != 1 {
        return Err("the container offers no type1v2 IOMMU".into());
    }
    let group_file = open_rw(&format!("/dev/vfio/{group}"))?;
    let g = group_file.as_raw_fd();
    let mut status = vfio::GroupStatus {
        argsz: size_of::<vfio::GroupStatus>() as u32,
        flags: 0,
    };
    // SAFETY: the kernel writes a vfio_group_status, which `status` is.
    unsafe { vfio::group_get_status(g, &mut status) }
        .map_err(ioctl_failed("VFIO_GROUP_GET_STATUS"))?;
    if status.flags & vfio::GROUP_FLAGS_VIABLE == 0 {
        println!("group {group}: flags {:#x}, NOT viable", status.flags);
        return Ok(3);
    }
    // SAFETY: the kernel reads one int, the container fd.
    unsafe { vfio::group_set_container(g, &c) }
        .map_err(ioctl_failed("VFIO_GROUP_SET_CONTAINER"))?;
    // SAFETY: integer argument.
    unsafe { vfio::set_iommu(c, vfio::TYPE1V2_IOMMU) }.map_err(ioctl_failed("VFIO_SET_IOMMU"))?;
    let name = std::ffi::CString::new(bdf).map_err(|_| "BDF contains a NUL".to_owned())?;
    // SAFETY: the kernel reads a NUL-terminated string and returns a new fd.
    let raw = unsafe { vfio::group_get_device_fd(g, name.as_ptr()) }
        .map_err(ioctl_failed("VFIO_GROUP_GET_DEVICE_FD"))?;
    // SAFETY: a fresh fd the kernel just gave us, owned by nobody else.
    let device: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
    let mut info = vfio::DeviceInfo {
        argsz: size_of::<vfio::DeviceInfo>() as u32,
        ..Default::default()
    };
    // SAFETY: the kernel writes a vfio_device_info prefix of argsz bytes.
    unsafe { vfio::device_get_info(device.as_raw_fd(), &mut info) }
        .map_err(ioctl_failed("VFIO_DEVICE_GET_INFO"))?;
    dma_round_trip(c)?;
    println!(
        "group {group}: viable; type1v2 container; device fd for {bdf} ({} regions, {} irqs); 1 MiB DMA map/unmap ok",
        info.num_regions, info.num_irqs
    );
    Ok(0)
}

/// Maps 1 MiB of anonymous memory at IOVA 1 MiB through the IOMMU, and unmaps it.
fn dma_round_trip(container: i32) -> Result<(), String> {
    use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, munmap};
    const SIZE: usize = 1 << 20;
    const IOVA: u64 = 1 << 20;
    let length = std::num::NonZeroUsize::new(SIZE).expect("non-zero");
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let memory = unsafe {
        mmap_anonymous(
            None,
            length,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_PRIVATE,
        )
    }
    .map_err(|e| format!("mmap: {e}"))?;
    let mut map = vfio::DmaMap {
        argsz: size_of::<vfio::DmaMap>() as u32,
        flags: vfio::DMA_MAP_FLAG_READ | vfio::DMA_MAP_FLAG_WRITE,
        vaddr: memory.as_ptr() as u64,
        iova: IOVA,
        size: SIZE as u64,
    };
    // SAFETY: the kernel reads a vfio_iommu_type1_dma_map naming memory we own.
    let mapped = unsafe { vfio::iommu_map_dma(container, &mut map) }
        .map_err(ioctl_failed("VFIO_IOMMU_MAP_DMA"));
    let unmapped = mapped.and_then(|_| {
        let mut unmap = vfio::DmaUnmap {
            argsz: size_of::<vfio::DmaUnmap>() as u32,
            flags: 0,
            iova: IOVA,
            size: SIZE as u64,
        };
        // SAFETY: the kernel reads (and updates) a vfio_iommu_type1_dma_unmap.
        unsafe { vfio::iommu_unmap_dma(container, &mut unmap) }
            .map_err(ioctl_failed("VFIO_IOMMU_UNMAP_DMA"))
    });
    // SAFETY: the mapping made above, no longer used by the IOMMU.
    let _ = unsafe { munmap(memory, SIZE) };
    unmapped.map(|_| ())
}

fn hold(paths: &[String]) -> Result<u8, String> {
    let mut held = Vec::new();
    for path in paths {
        let file =
            open_rw(path).or_else(|_| File::open(path).map_err(|e| format!("open {path}: {e}")))?;
        held.push(file);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "holding {}", paths.join(" "));
    let _ = out.flush();
    drop(out);
    loop {
        nix::unistd::pause();
    }
}

fn follow_command(args: &[String]) -> Result<u8, String> {
    let mut sim = false;
    let mut within = Duration::from_millis(100);
    let mut rest = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--sim" => sim = true,
            "--within-ms" => {
                let ms = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--within-ms needs a number")?;
                within = Duration::from_millis(ms);
            }
            _ => rest.push(arg.as_str()),
        }
    }
    let [bdf, drivers @ ..] = &rest[..] else {
        return Err(USAGE.into());
    };
    if drivers.is_empty() {
        return Err(USAGE.into());
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio: {e}"))?
        .block_on(follow(bdf, drivers, sim, within))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Makes each change in turn; for each target driver, the median of how
/// long vfiod took to show it must be within `within`.
async fn follow(bdf: &str, drivers: &[&str], sim: bool, within: Duration) -> Result<u8, String> {
    let bus = |e: zbus::Error| format!("D-Bus: {e}");
    let conn = zbus::Connection::system().await.map_err(bus)?;
    let path = format!("/org/vfiod1/device/{}", bdf.replace([':', '.'], "_"));
    let device = DeviceProxy::builder(&conn)
        .path(path)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(bus)?;
    let mut seen: Vec<(&str, Option<Duration>)> = Vec::new();
    for (i, driver) in drivers.iter().enumerate() {
        if i > 0 {
            // Let the last change settle (udevd, a sound card registering).
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        seen.push((driver, change_once(&conn, &device, bdf, driver, sim).await?));
    }
    let mut ok = true;
    let mut verdicts = Vec::new();
    let mut targets: Vec<&str> = drivers.to_vec();
    targets.dedup();
    targets.sort_unstable();
    targets.dedup();
    for target in targets {
        let mut times: Vec<Duration> = Vec::new();
        let mut missed = 0;
        for (_, t) in seen.iter().filter(|(d, _)| *d == target) {
            match t {
                Some(t) => times.push(*t),
                None => missed += 1,
            }
        }
        times.sort();
        let name = if target.is_empty() { "unbound" } else { target };
        if missed > 0 || times.is_empty() {
            ok = false;
            verdicts.push(format!("{name}: not shown {missed} time(s)"));
            continue;
        }
        let median = times[times.len() / 2];
        ok &= median <= within;
        let all: Vec<String> = times.iter().map(|t| format!("{:.0}", ms(*t))).collect();
        verdicts.push(format!(
            "{name}: median {:.0} ms of {} ms",
            ms(median),
            all.join("/")
        ));
    }
    println!(
        "{bdf}: vfiod's Device.Driver followed {} ({} {} ms)",
        verdicts.join(", "),
        if ok { "within" } else { "NOT within" },
        within.as_millis()
    );
    Ok(if ok { 0 } else { 1 })
}

/// One change behind vfiod's back; how long after the writes vfiod said
/// so (`None`: not within 5 s). vfiod announces every change with
/// PropertiesChanged: the probe waits for that signal rather than asking
/// again and again, which would load the (TCG-slow) guest it measures. A
/// Get every 50 ms catches a change that comes without its signal.
async fn change_once(
    conn: &zbus::Connection,
    device: &DeviceProxy<'_>,
    bdf: &str,
    driver: &str,
    sim: bool,
) -> Result<Option<Duration>, String> {
    use std::future::poll_fn;
    use std::pin::Pin;
    use zbus::export::futures_core::Stream;

    let bus = |e: zbus::Error| format!("D-Bus: {e}");
    let before = device.driver().await.map_err(bus)?;
    let properties = zbus::fdo::PropertiesProxy::builder(conn)
        .destination("org.vfiod1")
        .path(device.inner().path().to_owned())
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(bus)?;
    let mut changes = properties.receive_properties_changed().await.map_err(bus)?;
    let action = if driver.is_empty() { "unbind" } else { "bind" };
    // Where the time goes: the kernel's uevent, udevd's re-broadcast (what
    // vfiod listens to), vfiod's signal.
    let uevents = if sim {
        None
    } else {
        Some(UeventTimes::listen(bdf, action)?)
    };
    let start = Instant::now();
    if sim {
        conn.call_method(
            Some("org.vfiod1"),
            "/org/vfiod1/simulator",
            Some("org.vfiod1.Simulator"),
            "SetDriver",
            &(bdf, driver),
        )
        .await
        .map_err(bus)?;
    } else {
        sysfs_set_driver(bdf, driver)?;
    }
    let written = Instant::now();
    // Wall clock, to line the probe up with vfiod's log.
    let written_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut how = "never";
    let mut last = before.clone();
    while written.elapsed() < Duration::from_secs(5) {
        let next = poll_fn(|cx| Pin::new(&mut changes).poll_next(cx));
        tokio::select! {
            signal = next => {
                let Some(signal) = signal else { break };
                let Ok(args) = signal.args() else { continue };
                if args.interface_name.as_str() != "org.vfiod1.Device" {
                    continue;
                }
                if let Some(zbus::Variant::Str(now)) = args.changed_properties.get("Driver") {
                    last = now.as_str().to_owned();
                    if last == driver {
                        how = "PropertiesChanged";
                        break;
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                last = device.driver().await.map_err(bus)?;
                if last == driver {
                    how = "Get (no signal came)";
                    break;
                }
            }
        }
    }
    let waited = written.elapsed();
    // Seen by Get: did the signal come at all (later)?
    let mut signal_note = String::new();
    if how.starts_with("Get") {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        let mut late = None;
        while late.is_none() {
            let next = poll_fn(|cx| Pin::new(&mut changes).poll_next(cx));
            let Ok(Some(signal)) = tokio::time::timeout_at(deadline, next).await else {
                break;
            };
            let Ok(args) = signal.args() else { continue };
            if args.interface_name.as_str() == "org.vfiod1.Device"
                && matches!(args.changed_properties.get("Driver"), Some(zbus::Variant::Str(d)) if d.as_str() == driver)
            {
                late = Some(written.elapsed());
            }
        }
        signal_note = match late {
            Some(t) => format!(", its PropertiesChanged at {:+.1} ms", ms(t)),
            None => ", and no PropertiesChanged for it within 1 s".to_owned(),
        };
    }
    let trail = match uevents.map(UeventTimes::finish) {
        Some((kernel, udev)) => {
            let at = |t: Option<Instant>| {
                t.map_or("never".to_owned(), |t| {
                    let late = ms(t.saturating_duration_since(written));
                    let early = ms(written.saturating_duration_since(t));
                    format!("{:+.1} ms", late - early)
                })
            };
            format!(
                "; kernel uevent {}, udevd's re-broadcast {}",
                at(kernel),
                at(udev)
            )
        }
        None => String::new(),
    };
    let seen = last == driver;
    println!(
        "{action} {bdf} {before:?} -> {driver:?}: writes {:.1} ms, done at {}.{:06}; after them vfiod said Driver {last:?} at {:+.1} ms ({how}{signal_note}){trail}",
        ms(written - start),
        written_wall.as_secs(),
        written_wall.subsec_micros(),
        ms(waited),
    );
    Ok(seen.then_some(waited))
}

/// When the kernel's and udevd's uevents for one PCI device's bind or
/// unbind arrived, from a thread reading the uevent netlink groups (1:
/// the kernel, 2: udevd's re-broadcast).
struct UeventTimes {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(Option<Instant>, Option<Instant>)>,
}

impl UeventTimes {
    fn listen(bdf: &str, action: &str) -> Result<UeventTimes, String> {
        use nix::sys::socket::{
            AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .map_err(|e| format!("uevent socket: {e}"))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1 | 2))
            .map_err(|e| format!("bind uevent socket: {e}"))?;
        let devpath_end = format!("/{bdf}");
        let action = format!("ACTION={action}");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut kernel, mut udev) = (None, None);
            let mut buf = vec![0u8; 16384];
            while !stopped.load(std::sync::atomic::Ordering::Relaxed)
                && (kernel.is_none() || udev.is_none())
            {
                let n = match recv(
                    fd.as_raw_fd(),
                    &mut buf,
                    nix::sys::socket::MsgFlags::empty(),
                ) {
                    Ok(n) => n,
                    Err(nix::errno::Errno::EAGAIN) => {
                        std::thread::sleep(Duration::from_micros(200));
                        continue;
                    }
                    Err(_) => break,
                };
                let fields: Vec<&[u8]> = buf[..n].split(|&b| b == 0).collect();
                let has = |want: &[u8]| fields.contains(&want);
                let pci_device = fields
                    .iter()
                    .any(|f| f.starts_with(b"DEVPATH=") && f.ends_with(devpath_end.as_bytes()));
                if pci_device && has(action.as_bytes()) && has(b"SUBSYSTEM=pci") {
                    let slot = if buf.starts_with(b"libudev\0") {
                        &mut udev
                    } else {
                        &mut kernel
                    };
                    slot.get_or_insert_with(Instant::now);
                }
            }
            (kernel, udev)
        });
        Ok(UeventTimes { stop, thread })
    }

    /// The arrival times; waits at most a moment for stragglers.
    fn finish(self) -> (Option<Instant>, Option<Instant>) {
        let deadline = Instant::now() + Duration::from_millis(500);
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// What an admin's shell does: unbind from the current driver, then bind
/// the new one through its `bind` file.
fn sysfs_set_driver(bdf: &str, driver: &str) -> Result<(), String> {
    let dev = Path::new("/sys/bus/pci/devices").join(bdf);
    let current = std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|link| Some(link.file_name()?.to_string_lossy().into_owned()));
    let write = |path: &Path| {
        std::fs::write(path, bdf).map_err(|e| format!("write {bdf} to {}: {e}", path.display()))
    };
    if let Some(current) = current.filter(|c| c != driver) {
        write(
            &Path::new("/sys/bus/pci/drivers")
                .join(current)
                .join("unbind"),
        )?;
    }
    if !driver.is_empty() {
        write(&Path::new("/sys/bus/pci/drivers").join(driver).join("bind"))?;
    }
    Ok(())
}
