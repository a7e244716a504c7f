//! Claiming a session at CONNECT, and what Session Present says: the
//! session comes from, in order of freshness, a connection of this node
//! handing it over (same-node take-over), the previous owner on another
//! node handing it over after our claim (cross-node take-over), or the
//! sessions topic. The connection only asks `claim` and sends CONNACK.

use std::sync::Arc;
use std::time::Duration;

use lodestream_mqtt::ReasonCode;

use crate::kafka::ProduceError;
use crate::node::{now_ms, Node};
use crate::session::high_watermarks::ViewError;
use crate::session::record::SessionRecord;
use crate::session::registry::{Control, RegistryError};
use crate::session::{mailbox, Session};

/// How long a claiming node waits for the previous owner's final state.
const HANDOFF_WAIT: Duration = Duration::from_secs(2);

/// A claimed session, ready for CONNACK.
pub struct Claimed {
    /// Its `epoch` is the claim's.
    pub session: Box<Session>,
    /// Session Present.
    pub present: bool,
    /// Resumed from the sessions topic: what it missed is read from Kafka.
    pub from_record: bool,
    /// Control messages for the connection that holds the session now.
    pub ctrl: mailbox::Receiver<Control>,
    /// When a QoS 2 retransmission scan may decide: the previous owner's
    /// writes may still land until then (`qos2_scan::settled_at_ms`).
    pub scan_settled_ms: Option<i64>,
}

/// Why a session could not be claimed; the CONNECT is refused.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("sessions view not current: {0}")]
    View(#[from] ViewError),
    #[error(transparent)]
    Full(#[from] RegistryError),
    #[error("cannot claim the session in Kafka: {0}")]
    Kafka(#[from] ProduceError),
}

impl ClaimError {
    /// CONNACK reason and the `connect_rejected` label.
    pub fn reason(&self) -> (ReasonCode, &'static str) {
        match self {
            ClaimError::View(_) | ClaimError::Kafka(_) => (ReasonCode::ServerUnavailable, "kafka"),
            ClaimError::Full(_) => (ReasonCode::ServerBusy, "max_sessions"),
        }
    }
}

/// Takes `client_id` for connection `conn_id` and decides which session it
/// continues [MQTT-3.1.2-4/5]. The claim record itself is written by the
/// caller, with the session's settings from CONNECT, before CONNACK.
pub async fn claim(
    node: &Node,
    client_id: &Arc<str>,
    conn_id: u64,
    clean_start: bool,
) -> Result<Claimed, ClaimError> {
    // Read-your-writes across nodes [MQTT-3.1.2-6]: whatever any node wrote
    // for this client id before this CONNECT (a claim, a session end) is in
    // this node's view before Session Present is decided. Before the
    // registry slot is taken: records applied meanwhile cannot kick us.
    node.sessions_current().await?;
    let (ctrl_tx, ctrl) = mailbox::channel(4);
    let existing = node
        .registry()
        .claim(client_id, conn_id, ctrl_tx, clean_start)
        .await?;
    let prev = node.sessions().get(client_id);
    // Above every epoch seen for the client id, including an ended
    // session's, so none of its records still in flight can win.
    let epoch = node
        .sessions()
        .last_epoch(client_id)
        .max(prev.as_ref().map_or(0, |r| r.epoch))
        .max(existing.as_ref().map_or(0, |s| s.epoch))
        + 1;
    // Known before anything is written, so records of older epochs still
    // in flight in the sessions topic cannot kick this connection.
    node.registry().set_epoch(client_id, conn_id, epoch);
    // A session out of fan-out reads what it missed from Kafka too.
    let from_record = existing.as_ref().is_none_or(|s| s.left_fan_out) && !clean_start;
    let source = match (&existing, prev.filter(|r| !r.expired(now_ms()))) {
        (None, Some(r)) => Some(take_over_remote(node, client_id, conn_id, epoch, r).await?),
        _ => None,
    };
    let scan_settled_ms = source.as_ref().and_then(|r| scan_settled_at(node, r));
    let queue = node.config().mqtt.session_queue;
    // A session with expiry 0 (3.1.1 clean session) ended with its
    // connection and is never resumed [MQTT-3.1.2-6].
    let (mut session, present) = match existing {
        Some(s) if !clean_start && s.expiry_s > 0 => (s, true),
        Some(s) => {
            node.discard_session(s);
            (Box::new(Session::new(client_id.clone(), queue)), false)
        }
        None => {
            let mut s = Box::new(Session::new(client_id.clone(), queue));
            match source {
                Some(r) if !clean_start && r.expiry_s > 0 => {
                    r.restore_into(&mut s);
                    (s, true)
                }
                _ => (s, false),
            }
        }
    };
    session.epoch = epoch;
    session.left_fan_out = false;
    Ok(Claimed {
        session,
        present,
        from_record: from_record && present,
        ctrl,
        scan_settled_ms,
    })
}

/// Writes the claim of `session` (online, its epoch, the settings from
/// CONNECT) and waits for Kafka, at most 10 s: the fencing point, only
/// after which the client gets CONNACK.
pub async fn record_claim(node: &Node, session: &Session) -> Result<(), String> {
    let claim = SessionRecord::from_session(session, node.node_id(), session.epoch, true, now_ms());
    match tokio::time::timeout(Duration::from_secs(10), node.persist(claim)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer from Kafka within 10 s".to_string()),
    }
}

/// Gives the client id back after a claim that was not completed.
pub fn unclaim(node: &Node, client_id: &Arc<str>, conn_id: u64) {
    let _ = node.registry().release(client_id, conn_id, false);
}

/// Until when the previous owner of restored record `r` may still have
/// writes landing in Kafka (none after a hand-off).
fn scan_settled_at(node: &Node, r: &SessionRecord) -> Option<i64> {
    let from = crate::kafka::qos2_scan::RestoredFrom {
        handoff: r.handoff,
        online: r.online,
        disconnected_ms: r.disconnected_ms,
        own_run: r.node == node.config().node_id
            && !r.online
            && r.disconnected_ms.is_some_and(|at| at >= node.started_ms()),
    };
    let k = &node.config().kafka;
    crate::kafka::qos2_scan::settled_at_ms(from, now_ms(), k.delivery_timeout_ms, k.node_timeout_ms)
}

/// The latest record `r`, or, when another node owns the session online,
/// that node's final state: claim first (the owner sees the claim in the
/// sessions topic and closes its connection), then wait briefly for its
/// hand-off. A session with expiry 0 ends with its connection: its owner
/// writes no hand-off, and the caller's claim is what closes it.
async fn take_over_remote(
    node: &Node,
    client_id: &Arc<str>,
    conn_id: u64,
    epoch: u64,
    r: SessionRecord,
) -> Result<SessionRecord, ClaimError> {
    let me = &node.config().node_id;
    if !r.online || r.node == *me || r.expiry_s == 0 {
        return Ok(r);
    }
    let handoff = node.sessions().wait_handoff(client_id, epoch);
    let mut claim = SessionRecord::from_session(
        &Session::new(client_id.clone(), 1),
        me,
        epoch,
        true,
        now_ms(),
    );
    claim.expiry_s = r.expiry_s;
    if let Err(e) = node.persist(claim).await {
        node.sessions().cancel_handoff(client_id, epoch);
        let _ = node.registry().release(client_id, conn_id, false);
        return Err(e.into());
    }
    match tokio::time::timeout(HANDOFF_WAIT, handoff).await {
        Ok(Ok(h)) => {
            let _ = node.sessions().take_late(client_id);
            Ok(h)
        }
        _ => {
            node.sessions().cancel_handoff(client_id, epoch);
            tracing::info!(client_id = %client_id, owner = %r.node, "no hand-off from previous owner; resuming from its last persisted state");
            // Its last writes may have reached this view only after the
            // claim: they are newer than `r`.
            Ok(node.sessions().take_late(client_id).unwrap_or(r))
        }
    }
}
