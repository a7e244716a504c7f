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

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::node::{now_ms, Node};
use crate::session::liveness::Heartbeat;
use crate::session::record::SessionRecord;
use crate::session::store::Summary;

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
pub async fn run(node: Arc<Node>) {
    let k = &node.config.kafka;
    let every = Duration::from_millis(k.heartbeat_interval_ms.max(100));
    let timeout = Duration::from_millis(k.node_timeout_ms.max(k.heartbeat_interval_ms * 2));
    let started = Instant::now();
    let mut own_checked = false;
    let mut shutdown = node.shutdown.subscribe();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => {
                heartbeat(&node, false).await;
                return;
            }
        }
        heartbeat(&node, true).await;
        // Before a full timeout has passed we cannot tell dead from not-yet-heard.
        if started.elapsed() < timeout {
            continue;
        }
        let mut live = node.liveness.live(timeout);
        if !live.contains(&node.config.node_id) {
            live.push(node.config.node_id.clone());
        }
        if !responsible(&node.config.node_id, &live) {
            continue;
        }
        let now = now_ms();
        let me = node.config.node_id.as_str();
        if !own_checked {
            own_checked = true;
            let left = node
                .store
                .select(|id, s| left_by_previous_run(s, me, node.registry.contains(id)));
            for r in left {
                adopt(&node, r).await;
            }
        }
        for r in node.store.select(|_, s| is_orphan(s, me, &live)) {
            adopt(&node, r).await;
        }
        // Offline sessions whose owner died before expiring them.
        let expired = node
            .store
            .select(|_, s| s.expired(now) && !is_live(s, &live));
        for r in expired {
            node.tombstone(&r.client_id, r.epoch).await;
        }
    }
}

async fn heartbeat(node: &Node, alive: bool) {
    let hb = Heartbeat {
        v: 1,
        node: node.config.node_id.clone(),
        ts_ms: now_ms(),
        alive,
    };
    let value = serde_json::to_vec(&hb).unwrap_or_default();
    if let Err(e) = node
        .control_producer
        .send_and_wait(
            &node.config.kafka.nodes_topic,
            hb.node.as_bytes(),
            Some(&value),
            &[],
        )
        .await
    {
        tracing::warn!(error = %e, "heartbeat not written");
    }
}

/// Takes over a dead node's session: offline under a new epoch (the will
/// stays in the record until published), will when due, expiry timer.
async fn adopt(node: &Arc<Node>, r: SessionRecord) {
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
    adopted.node = node.config.node_id.clone();
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
        let still_parked = |node: &Node| node.store.is_parked(&client_id, epoch);
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
