//! `boot = "vfio"` profiles, bound as vfiod starts, before it takes its
//! name (a display manager ordered after vfiod.service finds them gone).
//!
//! At boot, udev's coldplug may still be loading host drivers as vfiod
//! starts (seen: bochs-drm bound the GPU 2.2 s after vfiod started). A plan
//! made then sees such a device without a driver: its host driver is not
//! remembered, and a group member whose driver is still to come looks
//! viable. So the boot binds wait, bounded, until udev's queue is empty
//! (the unit is ordered after systemd-udev-trigger.service, which queues
//! the coldplug); a driver that binds in the middle of a move anyway is
//! the engine's to handle (`to_vfio` reads the driver again after the
//! override).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use vfiod_config::BootState;
use vfiod_dbus::Direction;

use crate::kernel::Kernel;
use crate::plan::MoveOptions;
use crate::service::Service;

/// How long boot binds wait for udev's queue to empty: a coldplug takes
/// seconds; the unit's start (and the display manager after it) waits for
/// this, within systemd's 90 s.
pub const UDEV_SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the queue is looked at meanwhile.
const UDEV_POLL: Duration = Duration::from_millis(20);

/// Waits until udev has no event queued or running, at most `timeout`;
/// whether it got there.
pub fn wait_for_udev(kernel: &dyn Kernel, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !kernel.udev_busy() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(UDEV_POLL);
    }
}

/// Binds every profile with `boot = "vfio"`, once udev has settled.
pub async fn bind_boot_profiles(service: &Arc<Service>, connection: &zbus::Connection) {
    let config = service.engine().config();
    let profiles: Vec<&String> = config
        .profiles
        .iter()
        .filter(|(_, profile)| profile.boot == BootState::Vfio)
        .map(|(name, _)| name)
        .collect();
    if profiles.is_empty() {
        return;
    }
    let engine = service.engine().clone();
    let started = Instant::now();
    let settled =
        tokio::task::spawn_blocking(move || wait_for_udev(&**engine.kernel(), UDEV_SETTLE_TIMEOUT))
            .await
            .unwrap_or(false);
    let waited_ms = started.elapsed().as_millis() as u64;
    if settled {
        info!(
            waited_ms,
            "udev's queue is empty: binding the boot profiles"
        );
    } else {
        warn!(
            waited_ms,
            "udev's queue is still busy: binding the boot profiles anyway"
        );
    }
    for name in profiles {
        match service
            .transition(connection, name, Direction::Bind, MoveOptions::default())
            .await
        {
            Ok(devices) => info!(profile = %name, devices = devices.len(), "bound at start"),
            Err(e) => error!(profile = %name, error = %e, "could not bind at start"),
        }
    }
}
