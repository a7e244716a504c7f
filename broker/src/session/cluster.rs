//! Node liveness through Kafka, and adopting the sessions of dead nodes.
//!
//! Every node writes a heartbeat to the compacted nodes topic (key = node
//! id) and reads everyone's. When a node stops heartbeating for
//! `kafka.node_timeout_ms` (kill -9, lost network), one survivor (the live
//! node with the smallest id, so normally exactly one) adopts the sessions
//! that were online there, and the offline ones whose delayed will was
//! still pending: it writes them as offline with a new epoch (fencing out
//! the dead node should it come back), publishes their Last Wills when due
//! (the will delay counts from the disconnect, and nothing goes if the
//! client reconnected first) and expires them in time. A node that restarts
//! under the same id does the same once for the sessions its previous run
//! left (their timers died with it). No store other than Kafka is involved.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lodestream_mqtt::LastWill;
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::config::KafkaConfig;
use crate::kafka::ProduceError;
use crate::session::liveness::Heartbeat;
use crate::session::record::SessionRecord;
use crate::session::store::{SessionStore, Summary};

/// What the cluster duties need of a node (`Node` implements it; this
/// module does not know `Node`, so the dependency runs one way).
pub trait Member: Send + Sync + 'static {
    fn node_id(&self) -> &str;
    fn kafka(&self) -> &KafkaConfig;
    /// Changes to true when the node shuts down.
    fn shutting_down(&self) -> watch::Receiver<bool>;
    /// Ids of the nodes heard from within `timeout`.
    fn live_nodes(&self, timeout: Duration) -> Vec<String>;
    /// This node's view of the sessions topic.
    fn sessions(&self) -> &SessionStore;
    /// A connection or a parked session of this node holds `client_id`.
    fn holds(&self, client_id: &str) -> bool;
    /// Writes this node's heartbeat record to the nodes topic.
    fn write_heartbeat(
        &self,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<(), ProduceError>> + Send;
    /// Writes a session record and waits for Kafka.
    fn persist(&self, rec: SessionRecord) -> impl Future<Output = Result<(), ProduceError>> + Send;
    /// Deletes a session record, unless a newer claim exists.
    fn tombstone(&self, client_id: &str, epoch: u64) -> impl Future<Output = ()> + Send;
    /// Publishes a Last Will, retrying while Kafka is unavailable.
    fn publish_will(&self, client_id: &str, will: LastWill) -> impl Future<Output = ()> + Send;
    /// Removes a published delayed will from the offline record.
    fn will_published(&self, client_id: &str, epoch: u64) -> impl Future<Output = ()> + Send;
}

/// True when `me` is the node that adopts orphans: the smallest live id.
pub fn responsible(me: &str, live: &[String]) -> bool {
    live.iter().all(|n| n.as_str() >= me)
}

/// A session to adopt: online, or offline with a will pending, on a node
/// that is not live.
pub fn is_orphan(s: &Summary, me: &str, live: &[String]) -> bool {
    (s.online || s.has_will) && &*s.node != me && !is_live(s, live)
}

/// The session's owner is among the live nodes.
fn is_live(s: &Summary, live: &[String]) -> bool {
    live.iter().any(|n| **n == *s.node)
}

/// After a restart: a session the previous run of this node owned (online,
/// or offline with a will pending) that no connection has claimed since.
pub fn left_by_previous_run(s: &Summary, me: &str, claimed: bool) -> bool {
    (s.online || s.has_will) && &*s.node == me && !claimed
}

/// Heartbeats and sweeps until the node shuts down.
pub async fn run<N: Member>(node: Arc<N>) {
    let k = node.kafka();
    let every = Duration::from_millis(k.heartbeat_interval_ms.max(100));
    let timeout = Duration::from_millis(k.node_timeout_ms.max(k.heartbeat_interval_ms * 2));
    let started = Instant::now();
    let mut own_checked = false;
    let mut shutdown = node.shutting_down();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => {
                heartbeat(&*node, false).await;
                return;
            }
        }
        heartbeat(&*node, true).await;
        // Before a full timeout has passed we cannot tell dead from not-yet-heard.
        if started.elapsed() < timeout {
            continue;
        }
        let me = node.node_id();
        let mut live = node.live_nodes(timeout);
        if !live.iter().any(|n| n == me) {
            live.push(me.to_string());
        }
        if !responsible(me, &live) {
            continue;
        }
        let now = now_ms();
        if !own_checked {
            own_checked = true;
            let left = node
                .sessions()
                .select(|id, s| left_by_previous_run(s, me, node.holds(id)));
            for r in left {
                adopt(&node, r).await;
            }
        }
        // Both sweeps below look only for sessions of nodes that are not
        // live: while every owner is, they would pass over every session of
        // the cluster each heartbeat for nothing (100,000 at 100,000
        // clients).
        let owners = node.sessions().owners();
        if owners.iter().all(|o| live.iter().any(|n| **n == **o)) {
            continue;
        }
        for r in node.sessions().select(|_, s| is_orphan(s, me, &live)) {
            adopt(&node, r).await;
        }
        // Offline sessions whose owner died before expiring them.
        let expired = node
            .sessions()
            .select(|_, s| s.expired(now) && !is_live(s, &live));
        for r in expired {
            node.tombstone(&r.client_id, r.epoch).await;
        }
    }
}

async fn heartbeat<N: Member>(node: &N, alive: bool) {
    let hb = Heartbeat {
        v: 1,
        node: node.node_id().to_string(),
        ts_ms: now_ms(),
        alive,
    };
    let value = serde_json::to_vec(&hb).unwrap_or_default();
    if let Err(e) = node.write_heartbeat(value).await {
        tracing::warn!(error = %e, "heartbeat not written");
    }
}

/// Takes over a dead node's session: offline under a new epoch (the will
/// stays in the record until published), will when due, expiry timer.
async fn adopt<N: Member>(node: &Arc<N>, r: SessionRecord) {
    let client_id = r.client_id.clone();
    let epoch = r.epoch + 1;
    let will = r.will.clone();
    let expiry_s = r.expiry_s;
    let now = now_ms();
    // An online session was disconnected by the death; an offline one
    // keeps its disconnect time, which its will delay and expiry count from.
    let since = match (r.online, r.disconnected_ms) {
        (false, Some(at)) => at,
        _ => now,
    };
    let mut adopted = r;
    adopted.epoch = epoch;
    adopted.node = node.node_id().to_string();
    adopted.online = false;
    adopted.handoff = false;
    adopted.disconnected_ms = Some(since);
    if let Err(e) = node.persist(adopted).await {
        tracing::warn!(client_id, error = %e, "could not adopt orphaned session; will retry");
        return;
    }
    tracing::info!(client_id, "adopted session of a dead node");
    let will = will.map(|w| {
        let delay = w.props.will_delay.unwrap_or(0);
        (crate::session::record::will_from_record(&w), delay)
    });
    let node = node.clone();
    tokio::spawn(async move {
        let still_parked = |node: &N| node.sessions().is_parked(&client_id, epoch);
        let until = |s: u32| {
            let due = since + s as i64 * 1000;
            Duration::from_millis((due - now_ms()).max(0) as u64)
        };
        if let Some((w, delay)) = will {
            // The will goes after its delay, or when the session ends first.
            tokio::time::sleep(until(delay.min(expiry_s))).await;
            if still_parked(&node) {
                node.publish_will(&client_id, w).await;
                node.will_published(&client_id, epoch).await;
            }
        }
        tokio::time::sleep(until(expiry_s)).await;
        if still_parked(&node) {
            node.tombstone(&client_id, epoch).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smallest_live_node_is_responsible() {
        let live = vec!["b".to_string(), "a".to_string(), "c".to_string()];
        assert!(responsible("a", &live));
        assert!(!responsible("b", &live));
    }

    #[test]
    fn orphans_are_online_sessions_of_dead_nodes() {
        let sum = |node: &str, online: bool, has_will: bool| Summary {
            epoch: 1,
            node: std::sync::Arc::from(node),
            online,
            handoff: false,
            has_will,
            expiry_s: 10,
            disconnected_ms: None,
        };
        let live = vec!["live".to_string(), "me".to_string()];
        assert!(is_orphan(&sum("dead", true, false), "me", &live));
        assert!(!is_orphan(&sum("live", true, false), "me", &live));
        assert!(!is_orphan(&sum("dead", false, false), "me", &live));
        assert!(!is_orphan(&sum("me", true, false), "me", &live));
        assert!(
            is_orphan(&sum("dead", false, true), "me", &live),
            "offline with a delayed will pending"
        );
        assert!(left_by_previous_run(&sum("me", true, false), "me", false));
        assert!(!left_by_previous_run(&sum("me", true, false), "me", true));
        assert!(!left_by_previous_run(&sum("me", false, false), "me", false));
    }
}
