//! Session state that outlives a network connection [MQTT-4.1.0-*]: the
//! subscriptions, the mailbox that Kafka fan-out fills, the QoS 1/2 flows in
//! both directions and the Last Will. Pure bookkeeping, no I/O: the
//! connection task drives it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lodestream_mqtt::{LastWill, Publish, QoS, SubscriptionOptions};

use crate::message::Message;
use crate::session::inbound_qos2::InboundQos2;
use crate::session::mailbox;

/// Where a message sits in Kafka: sessions remember how far they got per
/// partition, so a resumed session re-reads Kafka from there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

/// Per Kafka partition, the next offset a session has not yet seen.
/// Keyed by Kafka topic and partition, names this node reads (from the
/// mapping rules), never a client's input: a fast hash without flood
/// resistance will do. A delivery updates its session's offsets, so the
/// hash runs once per message.
pub type Offsets = hashbrown::HashMap<(Arc<str>, i32), i64, rustc_hash::FxBuildHasher>;

/// A borrowed `Offsets` key: looks an entry up without taking a reference
/// to the topic's `Arc`, whose count every connection that drops a
/// delivery of that topic touches too.
#[derive(Hash)]
pub struct PartitionRef<'a>(pub &'a str, pub i32);

impl hashbrown::Equivalent<(Arc<str>, i32)> for PartitionRef<'_> {
    fn equivalent(&self, key: &(Arc<str>, i32)) -> bool {
        *key.0 == *self.0 && key.1 == self.1
    }
}

/// What fan-out hands a session for one matching message.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// `None` for retained messages (served from the retained view).
    pub source: Option<Source>,
    /// Already downgraded to the subscription's maximum QoS.
    pub qos: QoS,
    /// RETAIN flag to put on the outgoing PUBLISH.
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// A cluster-wide shared subscription's delivery: finished once done
    /// with, so its Kafka consumer group may commit past it.
    pub share: Option<crate::shared_progress::ShareAck>,
}

/// Flags fan-out sets on a session without taking its lock.
#[derive(Debug, Default)]
pub struct SessionFlags {
    /// QoS 1/2 messages of this session were lost (its connection closed
    /// with more queued than the mailbox takes back): its next connection
    /// is closed with 0x97.
    pub overflowed: AtomicBool,
    /// Fan-out found the mailbox full (`skips` says what it skipped).
    skipped: AtomicBool,
    skips: std::sync::Mutex<Skips>,
}

/// What fan-out could not queue for a session since it was last asked.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Skips {
    pub qos0: u64,
    pub qos12: u64,
    /// The first skipped offset per partition: reading Kafka from there
    /// gets everything skipped back (`connection/lagging.rs`).
    pub first: Offsets,
}

impl Skips {
    /// A resume reads from `offsets`: on partitions nothing was delivered
    /// from yet, they must not pass what was skipped.
    pub fn keep_resume_point(self, offsets: &mut Offsets) {
        for (k, first) in self.first {
            offsets.entry(k).or_insert(first);
        }
    }
}

/// Lowers `offsets[k]` to `offset` (inserting it when absent).
pub fn lower_offset(offsets: &mut Offsets, k: (Arc<str>, i32), offset: i64) {
    let e = offsets.entry(k).or_insert(offset);
    *e = (*e).min(offset);
}

impl SessionFlags {
    /// Fan-out could not queue `qos` from `source` (the mailbox is full).
    pub fn note_skip(&self, qos: QoS, source: &Option<Source>) {
        let mut s = self.skips.lock().unwrap_or_else(|e| e.into_inner());
        if qos == QoS::AtMostOnce {
            s.qos0 += 1;
        } else {
            s.qos12 += 1;
        }
        if let Some(src) = source {
            lower_offset(&mut s.first, (src.topic.clone(), src.partition), src.offset);
        }
        self.skipped.store(true, Ordering::Release);
    }

    /// Fan-out skips this session (see `subscriptions.rs`).
    pub fn skipping(&self) -> bool {
        self.skipped.load(Ordering::Acquire)
    }

    /// What was skipped since the last call, if anything (one atomic load
    /// when nothing was).
    pub fn take_skips(&self) -> Option<Skips> {
        if !self.skipped.swap(false, Ordering::Acquire) {
            return None;
        }
        let mut s = self.skips.lock().unwrap_or_else(|e| e.into_inner());
        Some(std::mem::take(&mut *s))
    }
}

/// The sending side of a session's mailbox, stored in the subscription index.
#[derive(Debug, Clone)]
pub struct Mailbox {
    pub tx: mailbox::Sender<Delivery>,
    pub flags: Arc<SessionFlags>,
}

impl Mailbox {
    /// Fan-out could not queue `qos` from `source`: noted, and the
    /// connection woken to decide (`connection/lagging.rs`), which it must
    /// be even while it takes nothing from the mailbox (window full).
    pub fn skip(&self, qos: QoS, source: &Option<Source>) {
        self.flags.note_skip(qos, source);
        self.tx.wake_receiver();
    }

    /// Ready while fan-out is skipping this session; until then the
    /// task is woken by the first skip.
    pub fn poll_skipped(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.tx.register_receiver(cx.waker());
        if self.flags.skipping() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
}

/// One outbound QoS 1/2 flow (server -> client) [MQTT-4.3.2/4.3.3].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutFlow {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published(Box<Publish>),
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

/// Outbound QoS 1/2 flows in the order they started, so they can be resent
/// in order on reconnect [MQTT-4.4.0-1].
#[derive(Debug, Default)]
pub struct Outbound {
    flows: VecDeque<(u16, OutFlow)>,
    in_use: HashSet<u16>,
    next_id: u16,
}

impl Outbound {
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// A packet id not used by any flow in progress [MQTT-2.2.1-3]; `None`
    /// when all 65,535 are taken.
    pub fn next_packet_id(&mut self) -> Option<u16> {
        if self.flows.len() >= u16::MAX as usize {
            return None;
        }
        loop {
            self.next_id = self.next_id.wrapping_add(1);
            if self.next_id != 0 && !self.in_use.contains(&self.next_id) {
                return Some(self.next_id);
            }
        }
    }

    pub fn start(&mut self, id: u16, publish: Publish) {
        self.in_use.insert(id);
        self.flows
            .push_back((id, OutFlow::Published(Box::new(publish))));
    }

    /// A QoS 2 flow restored in its PUBREL stage.
    pub fn start_released(&mut self, id: u16) {
        self.in_use.insert(id);
        self.flows.push_back((id, OutFlow::Released));
    }

    fn remove(&mut self, p: usize) {
        if let Some((id, _)) = self.flows.remove(p) {
            self.in_use.remove(&id);
        }
    }

    fn position(&self, id: u16) -> Option<usize> {
        if !self.in_use.contains(&id) {
            return None;
        }
        self.flows.iter().position(|(i, _)| *i == id)
    }

    /// PUBACK for a QoS 1 flow: true if it ended one.
    pub fn puback(&mut self, id: u16) -> bool {
        match self.position(id) {
            Some(p) if matches!(&self.flows[p].1, OutFlow::Published(pb) if pb.qos == QoS::AtLeastOnce) =>
            {
                self.remove(p);
                true
            }
            _ => false,
        }
    }

    /// PUBREC for a QoS 2 flow. `Some(true)` = reply PUBREL; `Some(false)` =
    /// the client refused it (error reason), the flow ends; `None` = unknown id.
    pub fn pubrec(&mut self, id: u16, refused: bool) -> Option<bool> {
        let p = self.position(id)?;
        match &self.flows[p].1 {
            OutFlow::Published(pb) if pb.qos == QoS::ExactlyOnce => {
                if refused {
                    self.remove(p);
                    Some(false)
                } else {
                    self.flows[p].1 = OutFlow::Released;
                    Some(true)
                }
            }
            // A repeated PUBREC after a resend: answer PUBREL again.
            OutFlow::Released => Some(true),
            OutFlow::Published(_) => None,
        }
    }

    /// PUBCOMP: true if it ended a QoS 2 flow.
    pub fn pubcomp(&mut self, id: u16) -> bool {
        match self.position(id) {
            Some(p) if self.flows[p].1 == OutFlow::Released => {
                self.remove(p);
                true
            }
            _ => false,
        }
    }

    /// Flows to resend after a reconnect, in order, PUBLISHes with DUP set.
    pub fn resend(&self) -> Vec<(u16, OutFlow)> {
        self.flows
            .iter()
            .map(|(id, f)| {
                let f = match f {
                    OutFlow::Published(p) => OutFlow::Published(Box::new(Publish {
                        dup: true,
                        ..(**p).clone()
                    })),
                    OutFlow::Released => OutFlow::Released,
                };
                (*id, f)
            })
            .collect()
    }
}

pub struct Session {
    pub client_id: Arc<str>,
    /// Seconds the session outlives its connection; 0 = ends with it.
    pub expiry_s: u32,
    /// Keyed by the filter as the client sent it (incl. `$share/…`).
    pub subscriptions: HashMap<String, Subscription>,
    pub mailbox: Mailbox,
    pub inbox: mailbox::Receiver<Delivery>,
    pub outbound: Outbound,
    /// QoS 2 flows from the client: ids acknowledged with PUBREC and
    /// awaiting PUBREL (a PUBLISH with one of these ids is a duplicate
    /// [MQTT-4.3.3-9]), plus what recognises duplicates after a node crash.
    pub inbound_qos2: InboundQos2,
    /// Boxed: most sessions have none, and inline it is half the struct.
    pub will: Option<Box<LastWill>>,
    /// Next Kafka offset per partition this session has not been given.
    pub offsets: Offsets,
    /// Epoch of this node's claim in the sessions topic.
    pub epoch: u64,
    /// Out of fan-out with messages it was not given: skipped ones it could
    /// not read back (past `mqtt.max_lagging_sessions`), or those dispatched
    /// while it was handed on during a close (a local take-over raced with
    /// it). Its offsets are never advanced to fan-out's, and whoever
    /// continues it reads what it missed from Kafka, from `offsets`, as a
    /// session resumed from its record does. Never stored.
    pub left_fan_out: bool,
}

impl Session {
    pub fn new(client_id: Arc<str>, queue: usize) -> Session {
        let (tx, rx) = mailbox::channel(queue.max(1));
        Session {
            client_id,
            expiry_s: 0,
            subscriptions: HashMap::new(),
            mailbox: Mailbox {
                tx,
                flags: Arc::new(SessionFlags::default()),
            },
            inbox: rx,
            outbound: Outbound::default(),
            inbound_qos2: InboundQos2::default(),
            will: None,
            offsets: Offsets::default(),
            epoch: 0,
            left_fan_out: false,
        }
    }

    /// Empties the mailbox for a read of Kafka: each queued delivery that
    /// came from Kafka lowers `lowest` to its offset (the read delivers it
    /// again); the others (retained messages) are returned, in order.
    pub fn give_back_to_kafka(&mut self, lowest: &mut Offsets) -> Vec<Delivery> {
        let mut kept = Vec::new();
        while let Ok(d) = self.inbox.try_recv() {
            match &d.source {
                Some(src) => lower_offset(lowest, (src.topic.clone(), src.partition), src.offset),
                None => kept.push(d),
            }
        }
        kept
    }

    pub fn take_overflow(&self) -> bool {
        self.mailbox.flags.overflowed.swap(false, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use lodestream_mqtt::Properties;

    /// A delivery's offset update finds its partition's entry through the
    /// borrowed key: same hash and equality as the owned one.
    #[test]
    fn a_borrowed_partition_key_finds_the_owned_entry() {
        let mut offsets = Offsets::default();
        offsets.insert((Arc::from("orders"), 2), 5);
        offsets.insert((Arc::from("orders"), 3), 9);
        assert_eq!(offsets.get(&PartitionRef("orders", 2)), Some(&5));
        assert_eq!(offsets.get(&PartitionRef("orders", 3)), Some(&9));
        assert_eq!(offsets.get(&PartitionRef("orders", 4)), None);
        assert_eq!(offsets.get(&PartitionRef("order", 2)), None);
    }

    fn publish(qos: QoS) -> Publish {
        Publish {
            dup: false,
            qos,
            retain: false,
            topic: "t".into(),
            packet_id: None,
            payload: Bytes::new(),
            properties: Properties::default(),
        }
    }

    /// [MQTT-2.2.1-3] a new flow never reuses an id in use; 0 is never used.
    #[test]
    fn packet_ids_are_unique_and_non_zero() {
        let mut o = Outbound::default();
        let mut seen = HashSet::new();
        for _ in 0..70_000u32 {
            match o.next_packet_id() {
                Some(id) => {
                    assert_ne!(id, 0);
                    assert!(seen.insert(id));
                    o.start(id, publish(QoS::AtLeastOnce));
                }
                None => break,
            }
        }
        assert_eq!(o.len(), 65_535);
        assert!(o.puback(7));
        assert_eq!(o.next_packet_id(), Some(7));
    }

    /// [MQTT-4.3.3] QoS 2: PUBLISH -> PUBREC -> PUBREL -> PUBCOMP.
    #[test]
    fn qos2_flow_and_resend_order() {
        let mut o = Outbound::default();
        o.start(1, publish(QoS::ExactlyOnce));
        o.start(2, publish(QoS::AtLeastOnce));
        assert!(!o.puback(1), "PUBACK does not end a QoS 2 flow");
        assert_eq!(o.pubrec(1, false), Some(true));
        assert_eq!(o.pubrec(2, false), None);
        let r = o.resend();
        assert_eq!(r[0], (1, OutFlow::Released));
        assert!(
            matches!(&r[1], (2, OutFlow::Published(p)) if p.dup),
            "[MQTT-4.4.0-1] DUP set on resend"
        );
        assert!(o.pubcomp(1));
        assert!(!o.pubcomp(1));
        assert!(o.puback(2));
        assert!(o.is_empty());
    }

    #[test]
    fn refused_pubrec_ends_flow() {
        let mut o = Outbound::default();
        o.start(5, publish(QoS::ExactlyOnce));
        assert_eq!(o.pubrec(5, true), Some(false));
        assert!(o.is_empty());
    }
}
