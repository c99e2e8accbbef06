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
use zbus::{Connection, OwnedObjectPath, Proxy};

/// The alias a distribution's display manager installs itself as.
pub const DISPLAY_MANAGER: &str = "display-manager.service";

const SYSTEMD: &str = "org.freedesktop.systemd1";
const SYSTEMD_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const UNIT: &str = "org.freedesktop.systemd1.Unit";

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

async fn proxy<'a>(
    connection: &Connection,
    path: OwnedObjectPath,
    interface: &'static str,
) -> Result<Proxy<'a>, UnitError> {
    zbus::proxy::Builder::new(connection)
        .destination(SYSTEMD)
        .path(path)
        .interface(interface)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(bus_error)
}

async fn manager<'a>(connection: &Connection) -> Result<Proxy<'a>, UnitError> {
    let path = OwnedObjectPath::try_from(SYSTEMD_PATH).map_err(bus_error)?;
    proxy(connection, path, MANAGER).await
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
    let path: OwnedObjectPath = match manager.call("LoadUnit", &(DISPLAY_MANAGER,)).await {
        Ok(path) => path,
        Err(e) if no_systemd(&e) => {
            tracing::info!(error = %e, "systemd is not on the system bus: no display manager to stop");
            return Ok(None);
        }
        Err(e) => return Err(bus_error(e)),
    };
    let unit = proxy(connection, path, UNIT).await?;
    let load_state: String = unit.get_property("LoadState").await.map_err(bus_error)?;
    if load_state != "loaded" {
        return Ok(None);
    }
    let id: String = unit.get_property("Id").await.map_err(bus_error)?;
    let active: String = unit.get_property("ActiveState").await.map_err(bus_error)?;
    Ok(Some(UnitStatus {
        unit: id,
        active: matches!(active.as_str(), "active" | "activating" | "reloading"),
    }))
}

/// Starts or stops `unit` and waits for its job's `JobRemoved`.
async fn run_job(
    connection: &Connection,
    method: &'static str,
    job: &'static str,
    unit: &str,
    within: Duration,
) -> Result<(), UnitError> {
    let manager = manager(connection).await?;
    // systemd sends JobRemoved only while a client has subscribed; the
    // stream exists before the job, so its end cannot be missed.
    manager
        .call::<_, _, ()>("Subscribe", &())
        .await
        .map_err(bus_error)?;
    let mut removed = manager
        .receive_signal("JobRemoved")
        .await
        .map_err(bus_error)?;
    let path: OwnedObjectPath = manager
        .call(method, &(unit, "replace"))
        .await
        .map_err(bus_error)?;
    let wait = async {
        while let Some(message) = next(&mut removed).await {
            let (_, job_path, _, result): (u32, OwnedObjectPath, String, String) =
                match message.body().deserialize() {
                    Ok(body) => body,
                    Err(_) => continue,
                };
            if job_path == path {
                return Ok(result);
            }
        }
        Err(UnitError::Bus("the JobRemoved stream ended".into()))
    };
    let result = match tokio::time::timeout(within, wait).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(UnitError::Timeout {
                unit: unit.to_string(),
                job,
                within,
            });
        }
    };
    if result == "done" {
        Ok(())
    } else {
        Err(UnitError::Job {
            unit: unit.to_string(),
            job,
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
        self.block_on(async {
            run_job(&system_bus().await?, "StopUnit", "stop", unit, within).await
        })
    }

    fn start(&self, unit: &str, within: Duration) -> Result<(), UnitError> {
        self.block_on(async {
            run_job(&system_bus().await?, "StartUnit", "start", unit, within).await
        })
    }
}
