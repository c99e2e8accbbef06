//! A private dbus-daemon and a stand-in for vfiod on it, so that the
//! vfioctl binary can be driven end to end before (and apart from) the
//! real daemon. The stand-in keeps to DESIGN §4: names, paths, property
//! types, option rules and error names.

#![allow(dead_code)]

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vfiod_dbus::Error;
use vfiod_dbus::names::{BUS_NAME, MANAGER_PATH};
use vfiod_pci::PciAddress;
use zbus::names::InterfaceName;
use zbus::object_server::SignalEmitter;
use zbus::{OwnedObjectPath, OwnedVariant, Variant, interface};

pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        let template = std::env::temp_dir().join("vfioctl-bus-XXXXXX");
        Scratch(nix::unistd::mkdtemp(&template).expect("mkdtemp"))
    }

    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, contents).expect("write scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A dbus-daemon of our own, gone with the value.
pub struct PrivateBus {
    child: Child,
    pub address: String,
    pub dir: Scratch,
}

impl PrivateBus {
    /// `None` when there is no dbus-daemon to run (the test then says so and passes).
    pub fn start() -> Option<PrivateBus> {
        let dir = Scratch::new();
        let config = dir.file(
            "bus.conf",
            &format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:path={}/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                dir.0.display()
            ),
        );
        let mut child = match Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address"])
            .stdout(Stdio::piped())
            // It complains it cannot raise its fd limit as a normal user.
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                eprintln!("skipped: cannot run dbus-daemon: {e}");
                return None;
            }
        };
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("dbus-daemon prints its address");
        Some(PrivateBus {
            child,
            address: line.trim().to_owned(),
            dir,
        })
    }

    /// Runs vfioctl against this bus.
    pub fn vfioctl(&self, args: &[&str]) -> Output {
        self.vfioctl_with_stdin(args, "")
    }

    pub fn vfioctl_with_stdin(&self, args: &[&str], stdin: &str) -> Output {
        vfioctl_at(&self.address, args, stdin)
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn vfioctl_at(address: &str, args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfioctl"))
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", address)
        .env("VFIOD_CONFIG", "/nonexistent/vfiod.toml")
        .env_remove("NO_COLOR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vfioctl");
    // The hook may exit before reading: a closed pipe is fine.
    let _ = child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes());
    child.wait_with_output().expect("vfioctl output")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

#[derive(Debug, Clone)]
pub struct Dev {
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub name: &'static str,
    pub driver: String,
    pub host_driver: String,
    pub group: i32,
    pub state: String,
    pub owner: String,
}

/// A call the stand-in received: method, target, options as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: String,
    pub target: String,
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
pub struct World {
    pub devices: BTreeMap<String, Dev>,
    pub profiles: BTreeMap<String, Vec<String>>,
    pub calls: Vec<Call>,
}

fn dev(vendor: u16, device: u16, class: u32, name: &'static str, driver: &str, group: i32) -> Dev {
    Dev {
        vendor,
        device,
        class,
        name,
        driver: driver.into(),
        host_driver: driver.into(),
        group,
        state: "host".into(),
        owner: String::new(),
    }
}

impl World {
    /// The z77 machine in short: a GPU with its audio (rx580), a USB
    /// card (usb3), a chipset USB controller with the keyboard (protected).
    pub fn z77() -> World {
        let mut w = World::default();
        w.devices.insert(
            "0000:00:14.0".into(),
            dev(0x8086, 0x1e31, 0x0c0330, "7 Series USB xHCI", "xhci_hcd", 4),
        );
        w.devices.insert(
            "0000:01:00.0".into(),
            dev(
                0x1002,
                0x67df,
                0x030000,
                "Ellesmere [Radeon RX 580]",
                "amdgpu",
                1,
            ),
        );
        w.devices.insert(
            "0000:01:00.1".into(),
            dev(
                0x1002,
                0xaaf0,
                0x040300,
                "Ellesmere HDMI Audio",
                "snd_hda_intel",
                1,
            ),
        );
        w.devices.insert(
            "0000:04:00.0".into(),
            dev(
                0x1033,
                0x0194,
                0x0c0330,
                "uPD720200 USB 3.0",
                "xhci_hcd",
                12,
            ),
        );
        w.profiles.insert(
            "rx580".into(),
            vec!["0000:01:00.0".into(), "0000:01:00.1".into()],
        );
        w.profiles
            .insert("usb3".into(), vec!["0000:04:00.0".into()]);
        w
    }

    fn resolve(&self, target: &str) -> Result<Vec<String>, Error> {
        if let Some(devices) = self.profiles.get(target) {
            return Ok(devices.clone());
        }
        match target.parse::<PciAddress>() {
            Ok(a) if self.devices.contains_key(&a.to_string()) => Ok(vec![a.to_string()]),
            Ok(a) => Err(Error::UnknownTarget(format!("no PCI device {a}"))),
            Err(_) => Err(Error::UnknownTarget(format!("no profile named {target:?}"))),
        }
    }

    fn profile_state(&self, name: &str) -> (String, String) {
        let devices = &self.profiles[name];
        let states: Vec<&str> = devices
            .iter()
            .map(|d| self.devices[d].state.as_str())
            .collect();
        let state = if states.iter().all(|s| *s == states[0]) {
            states[0]
        } else {
            "mixed"
        };
        (state.to_owned(), self.devices[&devices[0]].owner.clone())
    }
}

fn device_path(address: &str) -> String {
    let a: PciAddress = address.parse().expect("address");
    vfiod_dbus::names::device_path(&a.path_component())
}

fn path(s: String) -> OwnedObjectPath {
    OwnedObjectPath::try_from(s).expect("object path")
}

type Shared = Arc<Mutex<World>>;

struct Manager(Shared);

fn option_text(v: &OwnedVariant) -> String {
    if let Ok(b) = bool::try_from(v) {
        return b.to_string();
    }
    if let Ok(n) = u32::try_from(v) {
        return n.to_string();
    }
    <&str>::try_from(v)
        .map(str::to_owned)
        .unwrap_or_else(|_| "?".into())
}

impl Manager {
    fn record(
        &self,
        method: &str,
        target: &str,
        options: &HashMap<String, OwnedVariant>,
    ) -> Result<(), Error> {
        let allowed: &[&str] = if method == "Bind" {
            &["force", "vm", "timeout_ms"]
        } else {
            &["vm", "timeout_ms"]
        };
        let call = Call {
            method: method.into(),
            target: target.into(),
            options: options
                .iter()
                .map(|(k, v)| (k.clone(), option_text(v)))
                .collect(),
        };
        self.0.lock().unwrap().calls.push(call);
        if let Some(bad) = options.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(Error::InvalidArgs(format!("unknown option {bad:?}")));
        }
        if target == "denied" {
            return Err(Error::AccessDenied(
                "not authorized for org.vfiod1.manage".into(),
            ));
        }
        Ok(())
    }

    /// Signals a move as vfiod does: started, each step, each device's
    /// new properties, finished.
    async fn moved(
        &self,
        emitter: &SignalEmitter<'_>,
        target: &str,
        direction: &str,
        steps: Vec<(String, String)>,
        changed: Vec<String>,
        error: &str,
    ) {
        Manager::transition_started(emitter, target, direction)
            .await
            .expect("emit");
        for (device, step) in &steps {
            Manager::transition_progress(emitter, target, device, step)
                .await
                .expect("emit");
        }
        for address in changed {
            let (driver, state, owner) = {
                let w = self.0.lock().unwrap();
                let d = &w.devices[&address];
                (d.driver.clone(), d.state.clone(), d.owner.clone())
            };
            let mut props: HashMap<&str, Variant<'_>> = HashMap::new();
            props.insert("Driver", Variant::from(driver.as_str()));
            props.insert("State", Variant::from(state.as_str()));
            props.insert("Owner", Variant::from(owner.as_str()));
            let device_emitter =
                SignalEmitter::new(emitter.connection(), device_path(&address)).expect("path");
            zbus::fdo::Properties::properties_changed(
                &device_emitter,
                InterfaceName::from_static_str_unchecked("org.vfiod1.Device"),
                props,
                Cow::Borrowed(&[]),
            )
            .await
            .expect("emit");
        }
        Manager::transition_finished(emitter, target, direction, error)
            .await
            .expect("emit");
    }
}

#[interface(interface = "org.vfiod1.Manager")]
impl Manager {
    async fn bind(
        &self,
        target: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<Vec<OwnedObjectPath>, Error> {
        self.record("Bind", &target, &options)?;
        let vm = options
            .get("vm")
            .and_then(|v| <&str>::try_from(v).ok())
            .unwrap_or("")
            .to_owned();
        let result = {
            let mut w = self.0.lock().unwrap();
            (|| {
                let devices = w.resolve(&target)?;
                if devices.contains(&"0000:00:14.0".to_owned()) {
                    return Err(Error::Protected(
                        "cannot bind 0000:00:14.0: the keyboard (046d:c52b) is behind it".into(),
                    ));
                }
                for d in &devices {
                    let dev = &w.devices[d];
                    if dev.state == "vfio" && dev.owner != vm {
                        return Err(Error::Conflict(format!("{d} is taken by {:?}", dev.owner)));
                    }
                }
                let mut steps = Vec::new();
                for d in &devices {
                    let dev = w.devices.get_mut(d).expect("device");
                    if dev.state != "vfio" {
                        steps.push((d.clone(), format!("unbind {}", dev.driver)));
                        steps.push((d.clone(), "bind vfio-pci".to_owned()));
                    }
                    dev.driver = "vfio-pci".into();
                    dev.state = "vfio".into();
                    dev.owner = vm.clone();
                }
                Ok((devices, steps))
            })()
        };
        match result {
            Ok((devices, steps)) => {
                self.moved(&emitter, &target, "bind", steps, devices.clone(), "")
                    .await;
                Ok(devices.iter().map(|d| path(device_path(d))).collect())
            }
            Err(e) => {
                self.moved(
                    &emitter,
                    &target,
                    "bind",
                    vec![],
                    vec![],
                    &e.to_signal_field(),
                )
                .await;
                Err(e)
            }
        }
    }

    async fn release(
        &self,
        target: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<Vec<OwnedObjectPath>, Error> {
        self.record("Release", &target, &options)?;
        let vm = options
            .get("vm")
            .and_then(|v| <&str>::try_from(v).ok())
            .map(str::to_owned);
        let result = {
            let mut w = self.0.lock().unwrap();
            (|| {
                let devices = w.resolve(&target)?;
                if let Some(vm) = &vm {
                    for d in &devices {
                        let dev = &w.devices[d];
                        if dev.state == "vfio" && &dev.owner != vm {
                            return Err(Error::Conflict(format!(
                                "{d} belongs to {:?}, not {vm:?}",
                                dev.owner
                            )));
                        }
                    }
                }
                let mut steps = Vec::new();
                for d in &devices {
                    let dev = w.devices.get_mut(d).expect("device");
                    if dev.state == "vfio" {
                        steps.push((d.clone(), "unbind vfio-pci".to_owned()));
                        steps.push((d.clone(), format!("probe {}", dev.host_driver)));
                    }
                    dev.driver = dev.host_driver.clone();
                    dev.state = "host".into();
                    dev.owner.clear();
                }
                Ok((devices, steps))
            })()
        };
        match result {
            Ok((devices, steps)) => {
                self.moved(&emitter, &target, "release", steps, devices.clone(), "")
                    .await;
                Ok(devices.iter().map(|d| path(device_path(d))).collect())
            }
            Err(e) => Err(e),
        }
    }

    async fn check(&self, target: String) -> Result<Vec<(String, String, String)>, Error> {
        let f = |id: &str, s: &str, m: &str| (id.to_owned(), s.to_owned(), m.to_owned());
        match target.as_str() {
            "" => Ok(vec![
                f("iommu", "ok", "IOMMU groups: 14 (intel_iommu=on)"),
                f(
                    "qemu.user",
                    "warn",
                    "qemu runs as nobody: it cannot read OVMF",
                ),
            ]),
            "rx580" => Ok(vec![
                f(
                    "group.1",
                    "fail",
                    "group 1 also holds 0000:00:01.0 on pcieport",
                ),
                f("reset.0000:01:00.0", "ok", "bus reset"),
            ]),
            other => Err(Error::UnknownTarget(format!("no profile named {other:?}"))),
        }
    }

    #[zbus(property)]
    fn version(&self) -> String {
        "0.1.0-mock".into()
    }

    #[zbus(property)]
    fn devices(&self) -> Vec<OwnedObjectPath> {
        self.0
            .lock()
            .unwrap()
            .devices
            .keys()
            .map(|a| path(device_path(a)))
            .collect()
    }

    #[zbus(property)]
    fn profiles(&self) -> Vec<OwnedObjectPath> {
        self.0
            .lock()
            .unwrap()
            .profiles
            .keys()
            .map(|n| path(vfiod_dbus::names::profile_path(n)))
            .collect()
    }

    #[zbus(signal)]
    async fn transition_started(
        emitter: &SignalEmitter<'_>,
        target: &str,
        direction: &str,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    async fn transition_progress(
        emitter: &SignalEmitter<'_>,
        target: &str,
        device: &str,
        step: &str,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    async fn transition_finished(
        emitter: &SignalEmitter<'_>,
        target: &str,
        direction: &str,
        error: &str,
    ) -> zbus::Result<()>;
}

struct DeviceObject(Shared, String);

impl DeviceObject {
    fn get<T>(&self, f: impl FnOnce(&Dev) -> T) -> T {
        f(&self.0.lock().unwrap().devices[&self.1])
    }
}

#[interface(interface = "org.vfiod1.Device")]
impl DeviceObject {
    #[zbus(property)]
    fn address(&self) -> String {
        self.1.clone()
    }
    #[zbus(property)]
    fn vendor_id(&self) -> u16 {
        self.get(|d| d.vendor)
    }
    #[zbus(property)]
    fn device_id(&self) -> u16 {
        self.get(|d| d.device)
    }
    #[zbus(property)]
    fn class(&self) -> u32 {
        self.get(|d| d.class)
    }
    #[zbus(property)]
    fn name(&self) -> String {
        self.get(|d| d.name.to_owned())
    }
    #[zbus(property)]
    fn driver(&self) -> String {
        self.get(|d| d.driver.clone())
    }
    #[zbus(property)]
    fn host_driver(&self) -> String {
        self.get(|d| d.host_driver.clone())
    }
    #[zbus(property)]
    fn iommu_group(&self) -> i32 {
        self.get(|d| d.group)
    }
    #[zbus(property)]
    fn state(&self) -> String {
        self.get(|d| d.state.clone())
    }
    #[zbus(property)]
    fn owner(&self) -> String {
        self.get(|d| d.owner.clone())
    }
    #[zbus(property, name = "BootVga")]
    fn boot_vga(&self) -> bool {
        false
    }
}

struct ProfileObject(Shared, String);

#[interface(interface = "org.vfiod1.Profile")]
impl ProfileObject {
    #[zbus(property)]
    fn name(&self) -> String {
        self.1.clone()
    }
    #[zbus(property)]
    fn devices(&self) -> Vec<OwnedObjectPath> {
        self.0.lock().unwrap().profiles[&self.1]
            .iter()
            .map(|a| path(device_path(a)))
            .collect()
    }
    #[zbus(property)]
    fn state(&self) -> String {
        self.0.lock().unwrap().profile_state(&self.1).0
    }
    #[zbus(property)]
    fn owner(&self) -> String {
        self.0.lock().unwrap().profile_state(&self.1).1
    }
    #[zbus(property)]
    fn last_error(&self) -> String {
        String::new()
    }
}

/// The stand-in vfiod, serving until dropped.
pub struct MockVfiod {
    pub world: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MockVfiod {
    pub fn start(address: &str, world: World) -> MockVfiod {
        let world = Arc::new(Mutex::new(world));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
        let address = address.to_owned();
        let shared = world.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let conn = zbus::connection::Builder::address(address.as_str())
                    .build()
                    .await
                    .expect("connect");
                let server = conn.object_server();
                let (devices, profiles): (Vec<String>, Vec<String>) = {
                    let w = shared.lock().unwrap();
                    (
                        w.devices.keys().cloned().collect(),
                        w.profiles.keys().cloned().collect(),
                    )
                };
                for a in devices {
                    server
                        .at(device_path(&a), DeviceObject(shared.clone(), a))
                        .await
                        .expect("serve device");
                }
                for n in profiles {
                    server
                        .at(
                            vfiod_dbus::names::profile_path(&n),
                            ProfileObject(shared.clone(), n),
                        )
                        .await
                        .expect("serve profile");
                }
                server
                    .at(MANAGER_PATH, Manager(shared.clone()))
                    .await
                    .expect("serve manager");
                server
                    .at(MANAGER_PATH, zbus::fdo::ObjectManager)
                    .await
                    .expect("serve object manager");
                conn.request_name(BUS_NAME).await.expect("own org.vfiod1");
                let _ = ready_tx.send(());
                let _ = stopped.await;
            });
        });
        ready.recv().expect("the stand-in started");
        MockVfiod {
            world,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.world.lock().unwrap().calls.clone()
    }
}

impl Drop for MockVfiod {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub fn call(method: &str, target: &str, options: &[(&str, &str)]) -> Call {
    Call {
        method: method.into(),
        target: target.into(),
        options: options
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("vfiod.toml");
    fs::write(&path, text).expect("write config");
    path
}
