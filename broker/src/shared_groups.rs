//! Cluster-wide shared subscriptions on one node. Every member of a shared
//! subscription (`$share/<g>/<f>`) brings one Kafka consumer to the group's
//! Kafka consumer group (`kafka/share_group.rs`), so a node's share of the
//! partitions grows with its members; the records of all of a group's
//! consumers on the node go to its members here round-robin, skipping
//! members whose queue is full.
//!
//! So across nodes Kafka balances by partition, and within a node every
//! record goes to the next member. A member that leaves hands its
//! unfinished deliveries back; they go to the node's other members, or,
//! when it was the last one, stay unfinished so the partitions' next
//! owners in the group read them again.
//!
//! Bounded: at most `mqtt.max_shared_members` members per node (each a
//! librdkafka consumer with its own threads); past it SUBACK 0x97.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lodestream_mqtt::SubscriptionOptions;
use tokio::sync::{mpsc, oneshot};

use crate::session::Delivery;
use crate::subscriptions::Grant;

/// One shared subscription: (share name, inner filter).
pub type GroupKey = Arc<(String, String)>;

/// A member: one connection's subscription to the group.
pub struct Slot {
    pub conn_id: u64,
    pub client_id: Arc<str>,
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
    pub tx: mpsc::Sender<Delivery>,
}

/// The node's members of one group, in round-robin order.
#[derive(Default)]
pub struct Members {
    slots: Vec<Slot>,
    next: usize,
}

/// A record for the group, not yet given to a member.
pub struct Offer {
    pub msg: Arc<crate::message::Message>,
    pub ack: crate::shared_progress::ShareAck,
}

impl Members {
    /// The member for the next record: the next one in turn with room in
    /// its queue, else the next one in turn (the hand-out then waits on it).
    fn pick(&mut self) -> Option<usize> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        let start = self.next % n;
        self.next = self.next.wrapping_add(1);
        let with_room = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.slots[i].tx.capacity() > 0);
        Some(with_room.unwrap_or(start))
    }

    fn delivery_for(&self, i: usize, offer: &Offer) -> Delivery {
        let s = &self.slots[i];
        let mut grant = None;
        Grant::add(
            &mut grant,
            &offer.msg,
            &s.client_id,
            &s.options,
            s.identifier,
        );
        // No-local is refused on shared subscriptions [MQTT-3.8.3-4], so
        // every member gets a grant; the fallback is the message's own QoS.
        let (qos, retain, subscription_ids) = match grant {
            Some(g) => (g.qos, g.retain, g.subscription_ids),
            None => (offer.msg.qos.min(s.options.qos), false, Vec::new()),
        };
        Delivery {
            msg: offer.msg.clone(),
            source: None,
            qos,
            retain,
            subscription_ids,
            share: Some(offer.ack.clone()),
        }
    }
}

/// Gives `offer` to one member, waiting while every queue is full. `false`
/// when the group has no member left (the offer stays unfinished).
pub async fn hand_out(members: &Mutex<Members>, offer: Offer) -> bool {
    loop {
        let (tx, d) = {
            let mut m = members.lock().unwrap_or_else(|e| e.into_inner());
            let Some(i) = m.pick() else {
                return false;
            };
            let d = m.delivery_for(i, &offer);
            match m.slots[i].tx.try_send(d) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Full(d)) => (m.slots[i].tx.clone(), d),
                // Its connection ended: drop it and pick again.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    m.slots.remove(i);
                    continue;
                }
            }
        };
        if tx.send(d).await.is_ok() {
            return true;
        }
    }
}

/// A group on this node: its members and one Kafka consumer per member.
struct Group {
    members: Arc<Mutex<Members>>,
    /// Each member's Kafka consumer, stopped when the member leaves.
    consumers: HashMap<u64, oneshot::Sender<()>>,
    /// Joins of this group on this node take turns: the first one gives a
    /// new Kafka group its position, the next ones find it.
    turn: Arc<tokio::sync::Mutex<()>>,
}

/// What `kafka/share_group.rs` needs to run one member's consumer.
pub struct GroupRun {
    pub key: GroupKey,
    pub members: Arc<Mutex<Members>>,
    pub stop: oneshot::Receiver<()>,
    /// Told once the consumer's group has a position, or why not.
    pub ready: oneshot::Sender<Result<(), String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("at most {0} shared subscription members per node")]
    Quota(usize),
    #[error("cannot join the Kafka consumer group: {0}")]
    Kafka(String),
}

/// The node's groups.
#[derive(Default)]
pub struct SharedGroups {
    groups: Mutex<HashMap<GroupKey, Group>>,
}

impl SharedGroups {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Group>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `slot` to the group of `key` with a Kafka consumer of its own,
    /// started by `start` (so the node's share of partitions grows with
    /// its members); returns once that consumer's group has a position, so
    /// a SUBACK after it covers what is published next.
    pub async fn join(
        &self,
        key: GroupKey,
        slot: Slot,
        max_members: usize,
        start: impl FnOnce(GroupRun),
    ) -> Result<(), JoinError> {
        let turn = {
            let mut groups = self.lock();
            let g = groups.entry(key.clone()).or_insert_with(new_group);
            g.turn.clone()
        };
        let _turn = turn.lock().await;
        let conn_id = slot.conn_id;
        let ready = {
            let mut groups = self.lock();
            let members: usize = groups.values().map(|g| g.consumers.len()).sum();
            if members >= max_members {
                if groups.get(&key).is_some_and(|g| g.consumers.is_empty()) {
                    groups.remove(&key);
                }
                return Err(JoinError::Quota(max_members));
            }
            let g = groups.entry(key.clone()).or_insert_with(new_group);
            lock(&g.members).slots.push(slot);
            let (stop_tx, stop) = oneshot::channel();
            let (ready_tx, ready) = oneshot::channel();
            g.consumers.insert(conn_id, stop_tx);
            start(GroupRun {
                key: key.clone(),
                members: g.members.clone(),
                stop,
                ready: ready_tx,
            });
            ready
        };
        let started = match ready.await {
            Ok(r) => r.map_err(JoinError::Kafka),
            Err(_) => Err(JoinError::Kafka("consumer stopped while starting".into())),
        };
        // A member whose consumer could not start is not kept.
        if started.is_err() {
            self.leave(&key, conn_id, Vec::new());
        }
        started
    }

    /// Connection `conn_id` leaves the group of `key`, its consumer stops
    /// (committing what was finished), and `returned`, its unfinished
    /// deliveries of that group, go to the node's other members; with none
    /// left they stay unfinished for the partitions' next owners.
    pub fn leave(&self, key: &GroupKey, conn_id: u64, returned: Vec<Delivery>) {
        let mut groups = self.lock();
        let Some(g) = groups.get_mut(key) else {
            return;
        };
        if let Some(stop) = g.consumers.remove(&conn_id) {
            let _ = stop.send(());
        }
        let members = g.members.clone();
        let left = {
            let mut m = lock(&members);
            m.slots.retain(|s| s.conn_id != conn_id);
            m.slots.len()
        };
        if left == 0 {
            groups.remove(key);
            return;
        }
        let offers: Vec<Offer> = returned
            .into_iter()
            .filter_map(|d| d.share.map(|ack| Offer { msg: d.msg, ack }))
            .collect();
        if !offers.is_empty() {
            tokio::spawn(async move {
                for o in offers {
                    hand_out(&members, o).await;
                }
            });
        }
    }
}

fn lock(m: &Mutex<Members>) -> std::sync::MutexGuard<'_, Members> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn new_group() -> Group {
    Group {
        members: Arc::new(Mutex::new(Members::default())),
        consumers: HashMap::new(),
        turn: Arc::new(tokio::sync::Mutex::new(())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lodestream_mqtt::QoS;

    fn slot(conn_id: u64, cap: usize) -> (Slot, mpsc::Receiver<Delivery>) {
        let (tx, rx) = mpsc::channel(cap);
        let s = Slot {
            conn_id,
            client_id: Arc::from(format!("c{conn_id}")),
            options: SubscriptionOptions::qos(QoS::AtLeastOnce),
            identifier: None,
            tx,
        };
        (s, rx)
    }

    fn message() -> Arc<crate::message::Message> {
        Arc::new(crate::message::Message {
            topic: "t".into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            publisher: None,
            timestamp_ms: 0,
        })
    }

    fn members(slots: Vec<Slot>) -> Members {
        Members { slots, next: 0 }
    }

    #[test]
    fn records_go_round_robin() {
        let (a, _ra) = slot(1, 10);
        let (b, _rb) = slot(2, 10);
        let mut m = members(vec![a, b]);
        let picks: Vec<usize> = (0..4).filter_map(|_| m.pick()).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
    }

    #[test]
    fn a_full_member_is_skipped() {
        let (a, _ra) = slot(1, 1);
        let (b, _rb) = slot(2, 10);
        let mut m = members(vec![a, b]);
        let msg = message();
        let d = m.delivery_for(0, &offer(&msg));
        m.slots[0].tx.try_send(d).unwrap();
        assert_eq!(m.pick(), Some(1));
        assert_eq!(m.pick(), Some(1), "member 0 is full");
    }

    #[test]
    fn no_member_no_pick() {
        assert_eq!(members(Vec::new()).pick(), None);
    }

    fn offer(msg: &Arc<crate::message::Message>) -> Offer {
        let progress = Arc::new(Mutex::new(crate::shared_progress::SharedProgress::default()));
        let p: crate::shared_progress::Partition = (Arc::from("t"), 0);
        let ticket = {
            let mut g = progress.lock().unwrap();
            g.assigned(p.clone());
            g.handed_out(&p, 0).unwrap()
        };
        Offer {
            msg: msg.clone(),
            ack: crate::shared_progress::ShareAck::new(
                progress,
                ticket,
                Arc::new(("g".into(), "t".into())),
            ),
        }
    }

    #[tokio::test]
    async fn a_member_whose_connection_ended_is_dropped() {
        let (a, ra) = slot(1, 10);
        let (b, mut rb) = slot(2, 10);
        drop(ra);
        let m = Mutex::new(members(vec![a, b]));
        let msg = message();
        assert!(hand_out(&m, offer(&msg)).await);
        assert!(rb.try_recv().is_ok());
        assert_eq!(lock(&m).slots.len(), 1);
    }
}
