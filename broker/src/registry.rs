//! Which client ids this node knows: connected ones (with a control channel
//! to their connection task) and disconnected persistent sessions (with the
//! timers that end them). Client take-over goes through here
//! [MQTT-3.1.4-3]: the newcomer takes the slot first, then asks the old
//! connection to hand its session over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lodestream_mqtt::ReasonCode;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::session::Session;

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
}

enum Slot {
    Online {
        conn_id: u64,
        ctrl: mpsc::Sender<Control>,
    },
    Offline {
        session: Box<Session>,
        generation: u64,
        timers: Vec<AbortHandle>,
    },
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
        ctrl: mpsc::Sender<Control>,
        clean_start: bool,
    ) -> Result<Option<Box<Session>>, RegistryError> {
        let prev = {
            let mut slots = self.lock();
            if !slots.contains_key(client_id) && slots.len() >= self.max_sessions {
                return Err(RegistryError::Full(self.max_sessions));
            }
            slots.insert(client_id.clone(), Slot::Online { conn_id, ctrl })
        };
        match prev {
            None => Ok(None),
            Some(Slot::Offline {
                session, timers, ..
            }) => {
                // [MQTT-3.1.3-9] reconnecting before the will delay cancels the will.
                for t in timers {
                    t.abort();
                }
                Ok(Some(session))
            }
            Some(Slot::Online { ctrl: old, .. }) => {
                let (tx, rx) = oneshot::channel();
                if old
                    .send(Control::TakeOver {
                        clean_start,
                        reply: tx,
                    })
                    .await
                    .is_err()
                {
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

    /// Returns the slot of a connection that ended. A persistent session is
    /// parked offline; the caller then installs its timers. `Err(session)`
    /// when another connection already claimed the id: the session must go
    /// to it through the take-over request on the control channel.
    pub fn release(
        &self,
        client_id: &Arc<str>,
        conn_id: u64,
        session: Option<Box<Session>>,
    ) -> Result<Option<u64>, Option<Box<Session>>> {
        let mut slots = self.lock();
        match slots.get(client_id) {
            Some(Slot::Online { conn_id: c, .. }) if *c == conn_id => {}
            _ => return Err(session),
        }
        match session {
            Some(session) => {
                let generation = self
                    .next_generation
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                slots.insert(
                    client_id.clone(),
                    Slot::Offline {
                        session,
                        generation,
                        timers: Vec::new(),
                    },
                );
                Ok(Some(generation))
            }
            None => {
                slots.remove(client_id);
                Ok(None)
            }
        }
    }

    /// Attaches a timer to an offline session (aborted if the client returns).
    pub fn add_timer(&self, client_id: &Arc<str>, generation: u64, timer: AbortHandle) {
        let mut slots = self.lock();
        match slots.get_mut(client_id) {
            Some(Slot::Offline {
                generation: g,
                timers,
                ..
            }) if *g == generation => timers.push(timer),
            _ => timer.abort(),
        }
    }

    /// Removes an offline session whose expiry elapsed, if it is still the
    /// same one.
    pub fn expire(&self, client_id: &Arc<str>, generation: u64) -> Option<Box<Session>> {
        let mut slots = self.lock();
        match slots.get(client_id) {
            Some(Slot::Offline { generation: g, .. }) if *g == generation => {}
            _ => return None,
        }
        match slots.remove(client_id) {
            Some(Slot::Offline { session, .. }) => Some(session),
            _ => None,
        }
    }

    /// Control channels of all connected clients (for shutdown).
    pub fn connected(&self) -> Vec<mpsc::Sender<Control>> {
        self.lock()
            .values()
            .filter_map(|s| match s {
                Slot::Online { ctrl, .. } => Some(ctrl.clone()),
                Slot::Offline { .. } => None,
            })
            .collect()
    }
}
