//! Which client ids this node knows: connected ones (with a control channel
//! to their connection task) and disconnected persistent sessions (with the
//! timers that end them). Client take-over goes through here
//! [MQTT-3.1.4-3]: the newcomer takes the slot first, then asks the old
//! connection to hand its session over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lodestream_mqtt::ReasonCode;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use crate::session::{mailbox, Session};

/// Messages to a connection task from the rest of the node.
pub enum Control {
    /// Another connection with the same client id arrived. Reply with the
    /// session (or `None` when it ends with the old connection).
    TakeOver {
        clean_start: bool,
        reply: oneshot::Sender<Option<Box<Session>>>,
    },
    /// Close with this DISCONNECT reason (v5), e.g. server shutting down.
    Close(ReasonCode),
    /// Another node claimed the client id with this epoch: close with 0x8E
    /// and write the session's final state as the hand-off for that claim.
    TakenOverRemote { epoch: u64 },
}

enum Slot {
    Online {
        conn_id: u64,
        ctrl: mailbox::Sender<Control>,
        epoch: u64,
    },
    /// A disconnected persistent session whose state is in Kafka; only its
    /// timers (expiry, delayed will) live here.
    Parked {
        generation: u64,
        timers: Vec<AbortHandle>,
    },
}

/// Outcome of `Registry::release`.
#[derive(Debug, PartialEq, Eq)]
pub enum Released {
    /// Parked with this generation (for its timers).
    Parked(u64),
    Removed,
    /// Another connection of this node holds the id now.
    NotOwner,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("session limit of {0} reached")]
    Full(usize),
}

pub struct Registry {
    slots: Mutex<HashMap<Arc<str>, Slot>>,
    max_sessions: usize,
    next_generation: std::sync::atomic::AtomicU64,
}

/// How long a newcomer waits for the old connection to hand over.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

impl Registry {
    pub fn new(max_sessions: usize) -> Registry {
        Registry {
            slots: Mutex::new(HashMap::new()),
            max_sessions,
            next_generation: std::sync::atomic::AtomicU64::new(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True while a connection or a parked session of this node holds the id.
    pub fn contains(&self, client_id: &str) -> bool {
        self.lock().contains_key(client_id)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Claims `client_id` for connection `conn_id` and returns the existing
    /// session, if any: taken from an offline slot, or handed over by the
    /// connection that held it.
    pub async fn claim(
        &self,
        client_id: &Arc<str>,
        conn_id: u64,
        ctrl: mailbox::Sender<Control>,
        clean_start: bool,
    ) -> Result<Option<Box<Session>>, RegistryError> {
        let prev = {
            let mut slots = self.lock();
            if !slots.contains_key(client_id) && slots.len() >= self.max_sessions {
                return Err(RegistryError::Full(self.max_sessions));
            }
            slots.insert(
                client_id.clone(),
                Slot::Online {
                    conn_id,
                    ctrl,
                    epoch: 0,
                },
            )
        };
        match prev {
            None => Ok(None),
            Some(Slot::Parked { timers, .. }) => {
                // [MQTT-3.1.3-9] reconnecting before the will delay cancels the will.
                for t in timers {
                    t.abort();
                }
                Ok(None)
            }
            Some(Slot::Online { ctrl: old, .. }) => {
                let (tx, rx) = oneshot::channel();
                let takeover = Control::TakeOver {
                    clean_start,
                    reply: tx,
                };
                if send_control(&old, takeover).await.is_err() {
                    return Ok(None);
                }
                match tokio::time::timeout(TAKEOVER_WAIT, rx).await {
                    Ok(Ok(s)) => Ok(s),
                    _ => {
                        tracing::warn!(client_id = %client_id, "previous connection did not hand its session over in time; starting a new session");
                        Ok(None)
                    }
                }
            }
        }
    }

    /// Records the epoch a connection claimed in the sessions topic.
    pub fn set_epoch(&self, client_id: &Arc<str>, conn_id: u64, new_epoch: u64) {
        if let Some(Slot::Online {
            conn_id: c, epoch, ..
        }) = self.lock().get_mut(client_id)
        {
            if *c == conn_id {
                *epoch = new_epoch;
            }
        }
    }

    /// Another node claimed `client_id` with `epoch`: tell a local connection
    /// holding an older epoch to go.
    pub fn kick_remote(&self, client_id: &str, epoch: u64) {
        if let Some(Slot::Online {
            ctrl, epoch: mine, ..
        }) = self.lock().get(client_id)
        {
            if *mine < epoch {
                let _ = ctrl.try_send(Control::TakenOverRemote { epoch });
            }
        }
    }

    /// Frees the slot of a connection that ended; a persistent session is
    /// parked (the caller then attaches its timers). `false` when another
    /// connection of this node already claimed the id: it is waiting for the
    /// session on the control channel.
    pub fn release(&self, client_id: &Arc<str>, conn_id: u64, park: bool) -> Released {
        let mut slots = self.lock();
        match slots.get(client_id) {
            Some(Slot::Online { conn_id: c, .. }) if *c == conn_id => {}
            _ => return Released::NotOwner,
        }
        if park {
            let generation = self
                .next_generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            slots.insert(
                client_id.clone(),
                Slot::Parked {
                    generation,
                    timers: Vec::new(),
                },
            );
            Released::Parked(generation)
        } else {
            slots.remove(client_id);
            Released::Removed
        }
    }

    /// Attaches a timer to an offline session (aborted if the client returns).
    pub fn add_timer(&self, client_id: &Arc<str>, generation: u64, timer: AbortHandle) {
        let mut slots = self.lock();
        match slots.get_mut(client_id) {
            Some(Slot::Parked {
                generation: g,
                timers,
            }) if *g == generation => timers.push(timer),
            _ => timer.abort(),
        }
    }

    /// Forgets a parked session whose expiry elapsed, if it is still the
    /// same one; true when it was.
    pub fn expire(&self, client_id: &Arc<str>, generation: u64) -> bool {
        let mut slots = self.lock();
        match slots.get(client_id) {
            Some(Slot::Parked { generation: g, .. }) if *g == generation => {
                slots.remove(client_id);
                true
            }
            _ => false,
        }
    }

    /// Control channels of all connected clients (for shutdown).
    pub fn connected(&self) -> Vec<mailbox::Sender<Control>> {
        self.lock()
            .values()
            .filter_map(|s| match s {
                Slot::Online { ctrl, .. } => Some(ctrl.clone()),
                Slot::Parked { .. } => None,
            })
            .collect()
    }
}

/// Queues `c` for a connection, waiting while its control queue is full
/// (it takes them first in its loop, so only for moments); `Err` once the
/// connection is gone.
async fn send_control(ctrl: &mailbox::Sender<Control>, mut c: Control) -> Result<(), ()> {
    loop {
        match ctrl.try_send(c) {
            Ok(()) => return Ok(()),
            Err(mailbox::TrySendError::Full(back)) => c = back,
            Err(mailbox::TrySendError::Closed(_)) => return Err(()),
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}
