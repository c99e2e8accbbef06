//! systemd's units, as far as the single-GPU handoff needs them: the
//! display manager behind the `display-manager.service` alias, stopped and
//! started through systemd's D-Bus API (`org.freedesktop.systemd1`), each
//! job waited for until its `JobRemoved`. [`Units`] is the interface; the
//! engine calls it on a worker thread with a bound, like a kernel write.
//! [`SystemdUnits`] talks to the real systemd; the simulated kernel plays
//! its machine file's display manager.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::time::Duration;

use zbus::export::futures_core::Stream;
use zbus::proxy::CacheProperties;
use zbus::{Connection, OwnedObjectPath};

/// The alias a distribution's display manager installs itself as.
pub const DISPLAY_MANAGER: &str = "display-manager.service";

/// The display manager as systemd shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitStatus {
    /// The real unit behind the alias, e.g. `sddm.service`.
    pub unit: String,
    /// `ActiveState` is `active`, `activating` or `reloading`.
    pub active: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// systemd could not be asked (no bus, no systemd, a call refused).
    #[error("systemd: {0}")]
    Bus(String),
    /// The job ended, but not with `done`.
    #[error("the {job} job of {unit} ended with result {result:?}")]
    Job {
        unit: String,
        job: &'static str,
        result: String,
    },
    /// The job did not end in time; it may still.
    #[error("the {job} job of {unit} did not end within {} ms", within.as_millis())]
    Timeout {
        unit: String,
        job: &'static str,
        within: Duration,
    },
}

/// Blocking calls: the engine makes them on its workers.
pub trait Units: Send + Sync + 'static {
    /// The unit [`DISPLAY_MANAGER`] names; `None` when it names none.
    fn display_manager(&self) -> Result<Option<UnitStatus>, UnitError>;
    /// `StopUnit(unit, "replace")`, then its job's `JobRemoved`, waited
    /// for at most `within`.
    fn stop(&self, unit: &str, within: Duration) -> Result<(), UnitError>;
    /// `StartUnit(unit, "replace")` (which also cancels a stop job still
    /// running), then its job's `JobRemoved`, at most `within`.
    fn start(&self, unit: &str, within: Duration) -> Result<(), UnitError>;
}

/// systemd's manager, as far as the handoff uses it.
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait SystemdManager {
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn subscribe(&self) -> zbus::Result<()>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

/// A unit's state, read from the path `LoadUnit` answers.
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait SystemdUnit {
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
}

/// The real systemd, on the system bus. zbus is asynchronous only: each
/// call runs on the daemon's runtime, from the worker thread that waits
/// for it (never from the event loop).
pub struct SystemdUnits {
    runtime: tokio::runtime::Handle,
}

impl SystemdUnits {
    pub fn new(runtime: tokio::runtime::Handle) -> SystemdUnits {
        SystemdUnits { runtime }
    }

    fn block_on<T>(
        &self,
        work: impl Future<Output = Result<T, UnitError>>,
    ) -> Result<T, UnitError> {
        self.runtime.block_on(work)
    }
}

fn bus_error(e: zbus::Error) -> UnitError {
    UnitError::Bus(e.to_string())
}

/// Property caching is off: a one-shot reader needs no subscription.
async fn manager(connection: &Connection) -> Result<SystemdManagerProxy<'static>, UnitError> {
    SystemdManagerProxy::builder(connection)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(bus_error)
}

/// The bus has no systemd on it (a private bus, a host without systemd):
/// then no unit is a display manager.
fn no_systemd(e: &zbus::Error) -> bool {
    const NO_ONE: [&str; 2] = [
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
    ];
    match e {
        zbus::Error::MethodError(name, _, _) => NO_ONE.contains(&name.as_str()),
        zbus::Error::FDO(e) => matches!(
            **e,
            zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_)
        ),
        _ => false,
    }
}

async fn status(connection: &Connection) -> Result<Option<UnitStatus>, UnitError> {
    let manager = manager(connection).await?;
    // LoadUnit answers for an alias with the unit it names; a name that
    // names nothing loads as `not-found`.
    let path = match manager.load_unit(DISPLAY_MANAGER).await {
        Ok(path) => path,
        Err(e) if no_systemd(&e) => {
            tracing::info!(error = %e, "systemd is not on the system bus: no display manager to stop");
            return Ok(None);
        }
        Err(e) => return Err(bus_error(e)),
    };
    let unit = SystemdUnitProxy::builder(connection)
        .path(path)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(bus_error)?;
    if unit.load_state().await.map_err(bus_error)? != "loaded" {
        return Ok(None);
    }
    let id = unit.id().await.map_err(bus_error)?;
    let active = unit.active_state().await.map_err(bus_error)?;
    Ok(Some(UnitStatus {
        unit: id,
        active: matches!(active.as_str(), "active" | "activating" | "reloading"),
    }))
}

/// Which job [`run_job`] asks for.
#[derive(Clone, Copy)]
enum Job {
    Start,
    Stop,
}

impl Job {
    fn name(self) -> &'static str {
        match self {
            Job::Start => "start",
            Job::Stop => "stop",
        }
    }
}

/// Starts or stops `unit` and waits for its job's `JobRemoved`.
async fn run_job(
    connection: &Connection,
    job: Job,
    unit: &str,
    within: Duration,
) -> Result<(), UnitError> {
    let manager = manager(connection).await?;
    // systemd sends JobRemoved only while a client has subscribed; the
    // stream exists before the job, so its end cannot be missed.
    manager.subscribe().await.map_err(bus_error)?;
    let mut removed = manager.receive_job_removed().await.map_err(bus_error)?;
    let path = match job {
        Job::Start => manager.start_unit(unit, "replace").await,
        Job::Stop => manager.stop_unit(unit, "replace").await,
    }
    .map_err(bus_error)?;
    let wait = async {
        while let Some(signal) = next(&mut removed).await {
            let Ok(args) = signal.args() else { continue };
            if args.job == path {
                return Ok(args.result);
            }
        }
        Err(UnitError::Bus("the JobRemoved stream ended".into()))
    };
    let result = match tokio::time::timeout(within, wait).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(UnitError::Timeout {
                unit: unit.to_string(),
                job: job.name(),
                within,
            });
        }
    };
    if result == "done" {
        Ok(())
    } else {
        Err(UnitError::Job {
            unit: unit.to_string(),
            job: job.name(),
            result,
        })
    }
}

/// The next item of a stream (futures-util's `next`, for one use).
async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

async fn system_bus() -> Result<Connection, UnitError> {
    Connection::system().await.map_err(bus_error)
}

impl Units for SystemdUnits {
    fn display_manager(&self) -> Result<Option<UnitStatus>, UnitError> {
        self.block_on(async { status(&system_bus().await?).await })
    }

    fn stop(&self, unit: &str, within: Duration) -> Result<(), UnitError> {
        self.block_on(async { run_job(&system_bus().await?, Job::Stop, unit, within).await })
    }

    fn start(&self, unit: &str, within: Duration) -> Result<(), UnitError> {
        self.block_on(async { run_job(&system_bus().await?, Job::Start, unit, within).await })
    }
}
