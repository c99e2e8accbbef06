//! Waiting on conditions instead of sleeping: a poll with a deadline, and
//! vfiod's signals received in-process, subscribed before anything is done.

use std::future::Future;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use zbus::export::futures_core::Stream;
use zbus::{MatchRule, Message, MessageStream};

use crate::Rig;

/// Checks `condition` until it holds and returns how long that took; panics
/// naming `what` if it does not within `deadline`. The 5 ms between checks
/// is a poll interval, not a guess at how long anything takes.
pub fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if condition() {
            return start.elapsed();
        }
        if start.elapsed() >= deadline {
            panic!("{what}: not within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Returns once vfiod has answered a Ping on `connection`. The bus keeps
/// one sender's messages in order, so by then every message vfiod sent this
/// connection earlier has arrived.
pub async fn round_trip_to_vfiod(connection: &zbus::Connection) {
    connection
        .call_method(
            Some("org.vfiod1"),
            "/org/vfiod1",
            Some("org.freedesktop.DBus.Peer"),
            "Ping",
            &(),
        )
        .await
        .expect("vfiod answers a Ping");
}

/// Messages matching a rule on the rig's bus, received by a connection of
/// the test's own. The subscription is in place once `subscribe` returns
/// (the bus has answered the AddMatch), so nothing sent later is missed.
pub struct Signals {
    /// Taken in `drop`, inside the runtime: dropping a stream removes its
    /// match rule with a task of the runtime.
    inner: Option<(zbus::Connection, MessageStream)>,
    /// Every matching message received so far, in order.
    pub received: Vec<Message>,
    /// The connection's tasks run while a method here waits; meanwhile what
    /// arrives waits in the socket.
    runtime: tokio::runtime::Runtime,
}

impl Signals {
    pub fn subscribe(rig: &Rig, rule: MatchRule<'static>) -> Signals {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let inner = runtime.block_on(async {
            let connection = rig.connect().await;
            let stream = MessageStream::for_match_rule(rule, &connection, None)
                .await
                .expect("the bus takes the match rule");
            (connection, stream)
        });
        Signals {
            inner: Some(inner),
            received: Vec::new(),
            runtime,
        }
    }

    /// Receives until `done` holds of everything received; panics naming
    /// `what` if it does not within `deadline`.
    pub fn wait_for(&mut self, what: &str, deadline: Duration, done: impl Fn(&[Message]) -> bool) {
        let (_, stream) = self.inner.as_mut().expect("subscribed");
        let received = &mut self.received;
        self.runtime.block_on(async {
            let until = tokio::time::Instant::now() + deadline;
            while !done(received) {
                let next = std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx));
                match tokio::time::timeout_at(until, next).await {
                    Ok(Some(Ok(message))) => received.push(message),
                    Ok(Some(Err(e))) => panic!("{what}: {e}"),
                    Ok(None) => panic!("{what}: the connection closed"),
                    Err(_) => panic!("{what}: not within {deadline:?}; received {received:#?}"),
                }
            }
        });
    }

    /// Receives everything vfiod sent this connection before now (see
    /// [`round_trip_to_vfiod`]).
    pub fn flush(&mut self) {
        let (connection, stream) = self.inner.as_mut().expect("subscribed");
        let received = &mut self.received;
        self.runtime.block_on(async {
            let mut ping = pin!(round_trip_to_vfiod(connection));
            // Received while the Ping waits: a full queue would hold back
            // the answer behind it.
            std::future::poll_fn(|cx: &mut Context<'_>| {
                while let Poll::Ready(Some(Ok(message))) = Pin::new(&mut *stream).poll_next(cx) {
                    received.push(message);
                }
                ping.as_mut().poll(cx)
            })
            .await;
            let waker = std::task::Waker::noop();
            while let Poll::Ready(Some(Ok(message))) =
                Pin::new(&mut *stream).poll_next(&mut Context::from_waker(waker))
            {
                received.push(message);
            }
        });
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        let _inside = self.runtime.enter();
        drop(self.inner.take());
    }
}
