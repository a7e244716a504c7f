//! Releasing a session when its connection ends: hand it to the connection
//! that took it over (same node), hand its final state off to the node that
//! claimed it (cross-node take-over), park it (persistent: written offline,
//! expiry and delayed-will timers started) or end it (tombstone), and
//! publish or keep its Last Will, as the reason for the end requires.
//!
//! The connection closes its socket and settles its Kafka writes first,
//! then gives up the session here: `release(node, leaving, end)`.

use std::sync::Arc;
use std::time::Duration;

use lodestream_mqtt::LastWill;
use tokio::sync::oneshot;

use crate::node::{now_ms, sub_key, Node};
use crate::session::record::SessionRecord;
use crate::session::registry::{Control, Released};
use crate::session::Session;

/// Why a session's connection ended, as far as the session cares.
pub enum SessionEnd {
    /// Normal DISCONNECT: the will is deleted [MQTT-3.14.4-3].
    Disconnect,
    /// v5 DISCONNECT with reason 0x04: the will is kept.
    DisconnectWithWill,
    /// The network closed or failed.
    NetworkLoss,
    /// This node closed the connection (protocol error, keep alive, quota).
    Closed,
    /// This node shuts down.
    Shutdown,
    /// Another connection of this node takes the session: it is sent
    /// there through `reply`.
    TakenOver {
        clean_start: bool,
        reply: oneshot::Sender<Option<Box<Session>>>,
    },
    /// Another node claimed the session with `epoch`.
    TakenOverRemote { epoch: u64 },
}

/// What a closing connection gives up.
pub struct Leaving {
    pub session: Box<Session>,
    /// The connection that held it (its registry slot).
    pub conn_id: u64,
    /// The will delay of the CONNECT (s).
    pub will_delay: u32,
    /// Its catch-up read had not finished: fan-out's positions are then not
    /// the session's.
    pub catching_up: bool,
    /// The connection's control channel: a same-node take-over racing with
    /// the close asks for the session there.
    pub ctrl: crate::session::mailbox::Receiver<Control>,
}

/// Settles the session and its will after its connection ended.
pub async fn release(node: &Arc<Node>, mut leaving: Leaving, end: SessionEnd) {
    let client_id = leaving.session.client_id.clone();
    let will_delay = leaving.will_delay;
    let mut will: Option<LastWill> = leaving.session.will.take().map(|w| *w);
    match end {
        SessionEnd::Disconnect => will = None,
        SessionEnd::TakenOver { clean_start, reply } => {
            // The new connection opened before any will delay ran out; the
            // will goes only if it has no delay or the session ends.
            if let Some(w) = will.take() {
                if will_delay == 0 || clean_start {
                    node.publish_will(&client_id, w).await;
                }
            }
            if reply.send(Some(leaving.session)).is_err() {
                tracing::debug!(client_id = %client_id, "take-over requester gone");
            }
            return;
        }
        SessionEnd::TakenOverRemote { epoch } => {
            hand_off_remote(node, leaving, epoch, will).await;
            return;
        }
        SessionEnd::DisconnectWithWill
        | SessionEnd::NetworkLoss
        | SessionEnd::Closed
        | SessionEnd::Shutdown => {}
    }
    // No more fan-out into the mailbox from here on.
    node.drop_subscriptions(&leaving.session);
    advance_offsets_if_drained(node, &mut leaving);
    let session = leaving.session;
    let persistent = session.expiry_s > 0;
    let epoch = session.epoch;
    if persistent {
        let mut rec = offline_record(node, &session);
        // A delayed will stays in the record until it is published, so
        // a survivor publishes it if this node dies during the delay.
        rec.will = will
            .as_ref()
            .filter(|_| will_delay > 0)
            .map(crate::session::record::will_to_record);
        match tokio::time::timeout(Duration::from_secs(10), node.persist(rec.clone())).await {
            Ok(Ok(())) => {}
            _ => node.persist_later(rec),
        }
    }
    match node
        .registry()
        .release(&client_id, leaving.conn_id, persistent)
    {
        Released::Parked(generation) => {
            let delayed = match will {
                Some(w) if will_delay > 0 => Some((w, will_delay)),
                Some(w) => {
                    node.publish_will(&client_id, w).await;
                    None
                }
                None => None,
            };
            park(
                node,
                generation,
                client_id.clone(),
                epoch,
                session.expiry_s,
                delayed,
            );
        }
        Released::Removed => {
            node.tombstone(&client_id, epoch).await;
            if let Some(w) = will {
                node.publish_will(&client_id, w).await;
            }
        }
        Released::NotOwner => {
            // Another connection of this node claimed the id while we
            // were closing; it waits for our session on the control channel.
            if let Some(w) = will {
                node.publish_will(&client_id, w).await;
            }
            // Not put back into fan-out: what it dispatched since the
            // session left, and what it skipped before, would be missed.
            // The new connection reads them from `offsets` (catch-up).
            let mut session = session;
            session.left_fan_out = true;
            // What is queued is read again with the rest, once.
            let mut offsets = std::mem::take(&mut session.offsets);
            let kept = session.give_back_to_kafka(&mut offsets);
            session.offsets = offsets;
            session.inbox.requeue_front(kept.into());
            let mut ctrl = leaving.ctrl;
            let wait = tokio::time::timeout(Duration::from_secs(5), ctrl.recv()).await;
            if let Ok(Some(Control::TakeOver { reply, .. })) = wait {
                let _ = reply.send(Some(session));
            }
        }
    }
    node.count_sessions();
}

/// Starts the timers of a parked persistent session: its expiry, and a
/// delayed will [MQTT-3.1.2-8..10]. When they fire they act only if the
/// session was not resumed meanwhile (here or on another node: the
/// sessions topic then holds a newer epoch or an online record).
fn park(
    node: &Arc<Node>,
    generation: u64,
    client_id: Arc<str>,
    epoch: u64,
    expiry_s: u32,
    will: Option<(LastWill, u32)>,
) {
    let still_parked = move |node: &Node, id: &str| node.sessions().is_parked(id, epoch);
    let n = node.clone();
    let id = client_id.clone();
    let will_on_expiry = will.clone().map(|(w, _)| w);
    let expiry = tokio::spawn(async move {
        let node = n;
        tokio::time::sleep(Duration::from_secs(expiry_s as u64)).await;
        let mine = node.registry().expire(&id, generation);
        if mine && still_parked(&node, &id) {
            node.tombstone(&id, epoch).await;
            node.count_sessions();
            // The session ended before the will delay: the will goes now.
            if let Some(w) = will_on_expiry {
                node.publish_will(&id, w).await;
            }
        }
    });
    node.registry()
        .add_timer(&client_id, generation, expiry.abort_handle());
    if let Some((w, delay)) = will {
        if delay < expiry_s {
            let n = node.clone();
            let id = client_id.clone();
            let t = tokio::spawn(async move {
                let node = n;
                tokio::time::sleep(Duration::from_secs(delay as u64)).await;
                if still_parked(&node, &id) {
                    node.publish_will(&id, w).await;
                    node.will_published(&id, epoch).await;
                }
            });
            node.registry()
                .add_timer(&client_id, generation, t.abort_handle());
        }
    }
}

/// Another node claimed the session with `epoch`: write the session's
/// final state as the hand-off for that claim. A session with expiry 0
/// ends here instead: no hand-off (the claimer does not resume it) and
/// no tombstone over its claim.
async fn hand_off_remote(
    node: &Arc<Node>,
    mut leaving: Leaving,
    epoch: u64,
    will: Option<LastWill>,
) {
    let client_id = leaving.session.client_id.clone();
    node.drop_subscriptions(&leaving.session);
    let ends = leaving.session.expiry_s == 0;
    if !ends {
        advance_offsets_if_drained(node, &mut leaving);
        let mut handoff = offline_record(node, &leaving.session);
        handoff.epoch = epoch;
        handoff.handoff = true;
        if let Err(e) = node.persist(handoff).await {
            tracing::warn!(client_id = %client_id, error = %e, "hand-off not written; the new owner resumes from the last persisted state");
        }
    }
    if let Some(w) = will {
        if leaving.will_delay == 0 || ends {
            node.publish_will(&client_id, w).await;
        }
    }
    let _ = node.registry().release(&client_id, leaving.conn_id, false);
    node.count_sessions();
}

/// The session's record as it leaves this node (offline, its own epoch).
fn offline_record(node: &Node, session: &Session) -> SessionRecord {
    SessionRecord::from_session(session, node.node_id(), session.epoch, false, now_ms())
}

/// After the session left fan-out: if nothing is waiting undelivered and
/// nothing was skipped, everything fan-out dispatched up to now was
/// handled, so the session can resume from fan-out's positions rather than
/// re-scan from its last delivery.
fn advance_offsets_if_drained(node: &Node, leaving: &mut Leaving) {
    let session = &mut leaving.session;
    // Fan-out skipped it (a full mailbox) and its connection ended before
    // reading Kafka instead: whoever resumes the session reads from there.
    if let Some(skips) = session.mailbox.flags.take_skips() {
        skips.keep_resume_point(&mut session.offsets);
        return;
    }
    if leaving.catching_up || session.left_fan_out || !session.inbox.is_empty() {
        return;
    }
    let topics: Vec<&str> = session
        .subscriptions
        .keys()
        .flat_map(|f| {
            node.mapping()
                .kafka_topics_for_filter(sub_key(&session.client_id, f).1)
        })
        .collect();
    for (k, v) in node.fan_out_positions(&topics) {
        let e = session.offsets.entry(k).or_insert(v);
        *e = (*e).max(v);
    }
}
