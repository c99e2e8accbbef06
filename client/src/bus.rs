//! The connection to vfiod: the system bus, uncached proxies and the one
//! call that reads every object.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use vfiod_dbus::names::{BUS_NAME, MANAGER_PATH};
use vfiod_dbus::proxy::ManagerProxy;
use zbus::Connection;
use zbus::export::futures_core::Stream;
use zbus::fdo::ObjectManagerProxy;
use zbus::proxy::CacheProperties;

use crate::error::Failure;
use crate::model::Objects;

const READ_TIMEOUT: Duration = Duration::from_secs(25);

/// `VFIOCTL_READ_TIMEOUT_MS` shortens (or lengthens) the wait for reads.
fn read_timeout() -> Duration {
    std::env::var("VFIOCTL_READ_TIMEOUT_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(READ_TIMEOUT)
}
const MOVE_TIMEOUT: Duration = Duration::from_secs(600);

pub struct Bus {
    conn: Connection,
}

impl Bus {
    /// Connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS` if set) for
    /// reads: vfiod answers them at once, even while a move hangs, so one
    /// that does not answer in 25 s is not coming (a dead vfiod still
    /// holding its name).
    pub async fn connect() -> Result<Bus, Failure> {
        Bus::connect_within(read_timeout()).await
    }

    /// Connects for moves, which vfiod bounds itself (each kernel write by
    /// `unbind_timeout_ms`, the move by `timeout_ms`).
    pub async fn connect_for_moves() -> Result<Bus, Failure> {
        Bus::connect_within(MOVE_TIMEOUT).await
    }

    async fn connect_within(timeout: Duration) -> Result<Bus, Failure> {
        let conn = zbus::connection::Builder::system()
            .method_timeout(timeout)
            .build()
            .await
            .map_err(|e| Failure::no_bus(&e))?;
        Ok(Bus { conn })
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Turns any error of a call into a failure with the right exit status.
    pub fn failure(&self, error: impl Into<vfiod_dbus::Error>) -> Failure {
        Failure::from_dbus(&error.into(), self.conn.is_closed())
    }

    /// The manager. Property caching is off: by default a proxy would ask
    /// for every property and subscribe to their changes before the first
    /// read, two round trips a one-shot client does not need.
    pub async fn manager(&self) -> Result<ManagerProxy<'static>, Failure> {
        ManagerProxy::builder(&self.conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|e| self.failure(e))
    }

    /// Every device and profile with all their properties, in one call.
    pub async fn objects(&self) -> Result<Objects, Failure> {
        let manager = ObjectManagerProxy::builder(&self.conn)
            .destination(BUS_NAME)
            .path(MANAGER_PATH)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|e| self.failure(e))?;
        let objects = manager
            .get_managed_objects()
            .await
            .map_err(|e| self.failure(e))?;
        Ok(Objects::from_managed(objects))
    }

    /// The daemon's `Version`.
    pub async fn version(&self) -> Result<String, Failure> {
        let manager = self.manager().await?;
        manager.version().await.map_err(|e| self.failure(e))
    }
}

/// The next item of a signal stream (zbus streams are futures-core
/// streams; this saves a dependency on futures-util for one method).
pub async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

/// An item the stream already holds, without waiting for one.
pub fn next_queued<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    match Pin::new(stream).poll_next(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(item) => item,
        Poll::Pending => None,
    }
}
