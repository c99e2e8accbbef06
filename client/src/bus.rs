//! The connection to vfiod: the system bus, uncached proxies, the one
//! call that reads every object and the reads of a few.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use vfiod_dbus::names::{
    BUS_NAME, DEVICE_INTERFACE, MANAGER_INTERFACE, MANAGER_PATH, PROFILE_INTERFACE,
};
use vfiod_dbus::proxy::ManagerProxy;
use zbus::export::futures_core::Stream;
use zbus::fdo::{ManagedObjects, ObjectManagerProxy};
use zbus::message::Type;
use zbus::names::OwnedInterfaceName;
use zbus::proxy::CacheProperties;
use zbus::{Connection, MatchRule, MessageStream, OwnedObjectPath, OwnedVariant};

use crate::error::Failure;
use crate::model::Objects;

const PROPERTIES_INTERFACE: &str = "org.freedesktop.DBus.Properties";

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

    /// The devices at `paths` alone, read together (one GetAll each, all
    /// sent before the first answer). A device that cannot be read is left
    /// out, as GetManagedObjects would leave out one that is gone.
    /// `with_profiles` adds every profile (a device's JSON names its own),
    /// in a second round: their paths come with the first; if they cannot
    /// be read, nothing is returned, as when GetManagedObjects fails.
    pub async fn devices(&self, paths: &[&str], with_profiles: bool) -> Result<Objects, Failure> {
        let devices = join_all(paths.iter().map(|p| self.get_all(p, DEVICE_INTERFACE)));
        let (devices, profile_paths) = if with_profiles {
            let profiles = self.get(MANAGER_PATH, MANAGER_INTERFACE, "Profiles");
            let (devices, profiles) = tokio::join!(devices, profiles);
            (devices, Some(profiles?))
        } else {
            (devices.await, None)
        };
        let mut objects = ManagedObjects::new();
        insert(
            &mut objects,
            DEVICE_INTERFACE,
            devices.into_iter().flatten(),
        );
        if let Some(profile_paths) = profile_paths {
            let paths: Vec<OwnedObjectPath> = profile_paths
                .try_into()
                .map_err(|e: zbus::Error| self.failure(e))?;
            let profiles = join_all(
                paths
                    .iter()
                    .map(|p| self.get_all(p.as_str(), PROFILE_INTERFACE)),
            )
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
            insert(&mut objects, PROFILE_INTERFACE, profiles);
        }
        Ok(Objects::from_managed(objects))
    }

    async fn get_all(&self, path: &str, interface: &str) -> Result<(String, Properties), Failure> {
        let properties = self.properties_call(path, "GetAll", &interface).await?;
        Ok((path.to_owned(), properties))
    }

    async fn get(&self, path: &str, interface: &str, name: &str) -> Result<OwnedVariant, Failure> {
        self.properties_call(path, "Get", &(interface, name)).await
    }

    /// One call of org.freedesktop.DBus.Properties on vfiod's object at `path`.
    async fn properties_call<B, R>(&self, path: &str, method: &str, body: &B) -> Result<R, Failure>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
        R: for<'d> zbus::zvariant::DynamicDeserialize<'d>,
    {
        let reply = self
            .conn
            .call_method(
                Some(BUS_NAME),
                path,
                Some(PROPERTIES_INTERFACE),
                method,
                body,
            )
            .await
            .map_err(|e| self.failure(e))?;
        reply.body().deserialize().map_err(|e| self.failure(e))
    }

    /// The manager's TransitionProgress signals. A proxy's signal stream
    /// would first ask the bus who owns org.vfiod1 (two more round trips);
    /// the bus itself only lets through what that owner sends.
    pub async fn progress_signals(&self) -> Result<MessageStream, Failure> {
        let rule = MatchRule::builder()
            .msg_type(Type::Signal)
            .sender(BUS_NAME)
            .path(MANAGER_PATH)
            .interface(MANAGER_INTERFACE)
            .member("TransitionProgress")
            .build()
            .map_err(|e| self.failure(e))?;
        MessageStream::for_match_rule(rule, &self.conn, None)
            .await
            .map_err(|e| self.failure(e))
    }

    /// Every message this connection receives from now on, unfiltered and
    /// without asking the bus for anything: it must be read all along.
    pub fn inbox(&self) -> MessageStream {
        MessageStream::from(&self.conn)
    }

    /// The daemon's `Version`.
    pub async fn version(&self) -> Result<String, Failure> {
        let manager = self.manager().await?;
        manager.version().await.map_err(|e| self.failure(e))
    }
}

pub type Properties = HashMap<String, OwnedVariant>;

/// Devices as GetManagedObjects would give them, from `(path, properties)`.
pub fn device_objects(devices: impl IntoIterator<Item = (String, Properties)>) -> Objects {
    let mut objects = ManagedObjects::new();
    insert(&mut objects, DEVICE_INTERFACE, devices);
    Objects::from_managed(objects)
}

/// Files `(path, properties)` of one interface as GetManagedObjects would.
fn insert(
    objects: &mut ManagedObjects,
    interface: &str,
    entries: impl IntoIterator<Item = (String, Properties)>,
) {
    for (path, properties) in entries {
        let (Ok(path), Ok(interface)) = (
            OwnedObjectPath::try_from(path),
            OwnedInterfaceName::try_from(interface),
        ) else {
            continue;
        };
        objects
            .entry(path)
            .or_default()
            .insert(interface, properties);
    }
}

/// Awaits all the futures together, their outputs in order (futures-util's
/// join_all, which this saves a dependency for).
pub async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Ready after `n` polls: later futures finish first.
    async fn after_polls(n: usize, value: usize) -> usize {
        let mut left = n;
        poll_fn(|cx| {
            if left == 0 {
                return Poll::Ready(value);
            }
            left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn join_all_keeps_the_order_of_the_futures() {
        let outputs = join_all((0..5).map(|i| after_polls(5 - i, i))).await;
        assert_eq!(outputs, [0, 1, 2, 3, 4]);
        assert!(
            join_all(Vec::<std::future::Ready<()>>::new())
                .await
                .is_empty()
        );
    }
}
