//! The Transition* signals, emitted by one task in the order the engine
//! produced them. Moves of one group are serialized in the engine; with one
//! narrator, listeners also see their steps in that order, never one move's
//! steps mixed into another's.

use std::sync::Arc;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::oneshot;
use tracing::warn;
use vfiod_dbus::Direction;
use vfiod_dbus::names::MANAGER_PATH;
use vfiod_pci::PciAddress;
use zbus::Connection;
use zbus::object_server::SignalEmitter;

use super::{ManagerInterface, Service};

pub enum Narration {
    Started {
        target: String,
        direction: Direction,
    },
    Progress {
        target: String,
        device: PciAddress,
        step: String,
        /// The move's first step: its device now shows `moving`.
        first: bool,
    },
    Finished {
        target: String,
        direction: Direction,
        error: String,
        /// Answered once the signal is out.
        emitted: oneshot::Sender<()>,
    },
}

pub type Narrator = UnboundedSender<Narration>;

pub fn spawn(service: Arc<Service>, connection: Connection) -> Narrator {
    let (tx, rx) = unbounded_channel();
    tokio::spawn(narrate(service, connection, rx));
    tx
}

async fn narrate(
    service: Arc<Service>,
    connection: Connection,
    mut rx: UnboundedReceiver<Narration>,
) {
    let manager = match SignalEmitter::new(&connection, MANAGER_PATH) {
        Ok(emitter) => emitter,
        Err(e) => {
            warn!(error = %e, "cannot emit Transition signals");
            return;
        }
    };
    while let Some(narration) = rx.recv().await {
        let sent = match narration {
            Narration::Started { target, direction } => {
                ManagerInterface::transition_started(&manager, &target, direction.as_str()).await
            }
            Narration::Progress {
                target,
                device,
                step,
                first,
            } => {
                let sent = ManagerInterface::transition_progress(
                    &manager,
                    &target,
                    &device.to_string(),
                    &step,
                )
                .await;
                if first && let Err(e) = service.refresh_states(&connection, vec![device]).await {
                    warn!(error = %e, "refresh at the start of a move failed");
                }
                sent
            }
            Narration::Finished {
                target,
                direction,
                error,
                emitted,
            } => {
                let sent = ManagerInterface::transition_finished(
                    &manager,
                    &target,
                    direction.as_str(),
                    &error,
                )
                .await;
                let _ = emitted.send(());
                sent
            }
        };
        if let Err(e) = sent {
            warn!(error = %e, "a Transition signal was not sent");
        }
    }
}
