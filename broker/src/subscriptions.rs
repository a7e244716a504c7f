//! The node's index of local subscriptions and the fan-out of one message
//! to the sessions whose filters match it.
//!
//! Bounded behaviour: fan-out never waits for a session. A full mailbox
//! skips the message and notes where; the session's connection then reads
//! Kafka from there instead of the mailbox until it has caught up
//! (`connection/lagging.rs`), so a slow client never stalls the others and,
//! within `mqtt.max_lagging_sessions`, loses nothing.

use std::sync::{Arc, Mutex, RwLock};

use lodestream_mqtt::trie::TopicTrie;
use lodestream_mqtt::TopicError;
use lodestream_mqtt::{QoS, SubscriptionOptions};
use tokio::sync::mpsc::error::TrySendError;

use crate::message::Message;
use crate::metrics::Metrics;
use crate::session::mailbox::Wakes;
use crate::session::state::PartitionRef;
use crate::session::{Delivery, Mailbox, Offsets, Source};

/// Trie key: one client can hold a plain and a shared subscription with the
/// same inner filter, so the share group is part of the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubKey {
    pub client_id: Arc<str>,
    pub share_group: Option<Arc<str>>,
}

#[derive(Debug, Clone)]
pub struct SubEntry {
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
    pub mailbox: Mailbox,
    /// Set for a session that resumed from Kafka offsets: records below
    /// these offsets were delivered by its catch-up read, not by fan-out.
    pub live_from: Option<Arc<Offsets>>,
}

impl SubEntry {
    /// An entry delivering to `mailbox`, live from now on.
    pub fn new(
        options: SubscriptionOptions,
        identifier: Option<u32>,
        mailbox: Mailbox,
    ) -> SubEntry {
        SubEntry {
            options,
            identifier,
            mailbox,
            live_from: None,
        }
    }
}

pub struct SubscriptionIndex {
    trie: RwLock<TopicTrie<SubKey, SubEntry>>,
    /// Next offset fan-out will dispatch, per Kafka partition read by this
    /// node. Updated under the trie's read lock, so a writer holding the
    /// write lock sees positions consistent with what was dispatched.
    positions: Mutex<Offsets>,
    metrics: Arc<Metrics>,
}

/// What one session is granted for one message, over all its matching
/// subscriptions: the highest QoS, RETAIN and every subscription identifier
/// [MQTT-3.3.4-2..5]. Fan-out (`dispatch`) and the catch-up read of a
/// resumed session both build it with `Grant::add`, so they agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
}

impl Grant {
    /// Adds one matching subscription of `client_id` to `grant`; a no-local
    /// subscription does not get the client's own messages [MQTT-3.8.3-3].
    pub fn add(
        grant: &mut Option<Grant>,
        msg: &Message,
        client_id: &str,
        options: &SubscriptionOptions,
        identifier: Option<u32>,
    ) {
        if options.no_local && msg.publisher.as_deref() == Some(client_id.as_bytes()) {
            return;
        }
        let qos = msg.qos.min(options.qos);
        // [MQTT-3.3.1-12/13] RETAIN is cleared unless retain-as-published.
        let retain = options.retain_as_published && msg.retain;
        let g = grant.get_or_insert(Grant {
            qos,
            retain,
            subscription_ids: Vec::new(),
        });
        g.qos = g.qos.max(qos);
        g.retain |= retain;
        g.subscription_ids.extend(identifier);
    }
}

impl SubscriptionIndex {
    pub fn new(metrics: Arc<Metrics>) -> SubscriptionIndex {
        SubscriptionIndex {
            trie: RwLock::new(TopicTrie::new()),
            positions: Mutex::new(Offsets::default()),
            metrics,
        }
    }

    pub fn insert(&self, filter: &str, key: SubKey, entry: SubEntry) -> Result<(), TopicError> {
        let mut t = self.trie.write().unwrap_or_else(|e| e.into_inner());
        t.insert(filter, key, entry).map(|_| ())
    }

    pub fn remove(&self, filter: &str, key: &SubKey) -> bool {
        let mut t = self.trie.write().unwrap_or_else(|e| e.into_inner());
        t.remove(filter, key).is_some()
    }

    pub fn len(&self) -> usize {
        self.trie.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records where a reader starts (its first dispatched offset per partition).
    pub fn init_positions(&self, start: Offsets) {
        let mut p = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in start {
            p.entry(k).or_insert(v);
        }
    }

    /// Current fan-out positions for the partitions of `topics`.
    pub fn positions_of(&self, topics: &[&str]) -> Offsets {
        let p = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        p.iter()
            .filter(|((t, _), _)| topics.contains(&&**t))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Registers a resumed session's subscriptions once its catch-up read
    /// has reached fan-out: `Err(positions)` when fan-out is still ahead of
    /// `caught_up` on some partition (read further, then retry). `entries`
    /// is called under the index's write lock, so a filter the client
    /// unsubscribed from before the lock is left out, and one it
    /// unsubscribes from after is removed by its UNSUBSCRIBE.
    pub fn register_if_caught_up(
        &self,
        caught_up: &Offsets,
        entries: impl FnOnce() -> Vec<(String, SubKey, SubEntry)>,
    ) -> Result<(), Offsets> {
        let mut t = self.trie.write().unwrap_or_else(|e| e.into_inner());
        let pos = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        let behind: Offsets = pos
            .iter()
            .filter(|(k, live)| caught_up.get(*k).is_some_and(|c| c < *live))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        if !behind.is_empty() {
            return Err(behind);
        }
        drop(pos);
        for (filter, key, entry) in entries() {
            // Filters were validated when first subscribed.
            if t.insert(&filter, key, entry)
                .is_ok_and(|prev| prev.is_none())
            {
                self.metrics.subscriptions.inc();
            }
        }
        Ok(())
    }

    /// Delivers each of one partition's `records` (offset order) to every
    /// matching local session, once per session with the highest matching
    /// QoS and every subscription identifier [MQTT-3.3.4-2..5], and moves
    /// the partition's fan-out position past the last. The sessions'
    /// wake-ups are left to `wakes`.
    pub fn dispatch(
        &self,
        topic: &Arc<str>,
        partition: i32,
        records: impl Iterator<Item = (i64, Arc<Message>)>,
        wakes: &mut Wakes,
    ) {
        // One read lock for the batch: a writer (a session leaving or
        // joining fan-out) sees positions and mailboxes that agree, as every
        // offer happens under it and the position moves before it is let go.
        let t = self.trie.read().unwrap_or_else(|e| e.into_inner());
        let mut matched = Vec::new();
        let mut next = None;
        for (offset, msg) in records {
            let source = Source {
                topic: topic.clone(),
                partition,
                offset,
            };
            fan_out(&t, &msg, source, &mut matched, wakes);
            next = Some(offset + 1);
        }
        if let Some(next) = next {
            let mut pos = self.positions.lock().unwrap_or_else(|e| e.into_inner());
            pos.insert((topic.clone(), partition), next);
        }
    }
}

type Matched<'t> = Vec<(&'t SubKey, &'t SubEntry)>;

/// Offers `msg` to each session with a matching plain subscription.
/// `matched` is scratch space, kept across a batch's records.
fn fan_out<'t>(
    trie: &'t TopicTrie<SubKey, SubEntry>,
    msg: &Arc<Message>,
    source: Source,
    matched: &mut Matched<'t>,
    wakes: &mut Wakes,
) {
    matched.clear();
    trie.for_each_match(&msg.topic, |key, e| {
        // Shared subscriptions are Kafka consumer-group members
        // (`kafka/share_group.rs`), never indexed here.
        if key.share_group.is_none() && !seen_by_catch_up(e, &source) {
            matched.push((key, e));
        }
    });
    // One offer per session: a client's overlapping subscriptions sort
    // next to each other (a stable sort, so the first match's mailbox is
    // used, as a map keyed by client would).
    if matched.len() > 1 {
        matched.sort_by(|a, b| a.0.client_id.cmp(&b.0.client_id));
    }
    // The last session gets `source` itself: its topic's reference count,
    // shared with every connection that drops a delivery, is touched once
    // per session, not once more per record.
    let mut source = Some(source);
    let mut sessions = matched
        .chunk_by(|a, b| a.0.client_id == b.0.client_id)
        .peekable();
    while let Some(session) = sessions.next() {
        let mut grant = None;
        for (key, e) in session {
            Grant::add(&mut grant, msg, &key.client_id, &e.options, e.identifier);
        }
        // No grant: every match was no-local for the publisher.
        if let (Some(g), Some((_, e))) = (grant, session.first()) {
            let src = match sessions.peek() {
                Some(_) => source.clone(),
                None => source.take(),
            };
            offer(msg, src, &e.mailbox, g, wakes);
        }
    }
}

/// True when a resumed session's catch-up read already delivered `source`.
fn seen_by_catch_up(e: &SubEntry, source: &Source) -> bool {
    e.live_from.as_ref().is_some_and(|from| {
        from.get(&PartitionRef(&source.topic, source.partition))
            .is_some_and(|start| source.offset < *start)
    })
}

fn offer(
    msg: &Arc<Message>,
    source: Option<Source>,
    mailbox: &Mailbox,
    g: Grant,
    wakes: &mut Wakes,
) {
    let d = Delivery {
        msg: msg.clone(),
        source,
        qos: g.qos,
        retain: g.retain,
        subscription_ids: g.subscription_ids,
        share: None,
    };
    // Once one message is skipped every later one is too, until the
    // connection has acted: what it takes from the mailbox meanwhile is
    // all older than the first skip, so re-reading from there delivers
    // nothing twice.
    if mailbox.flags.skipping() {
        return mailbox.skip(d.qos, &d.source);
    }
    match mailbox.tx.try_send_deferred(d, wakes) {
        Ok(()) => {}
        // The connection decides: read Kafka from the first skipped
        // offset instead, or drop (counted there) and, for QoS 1/2,
        // close with 0x97 (`connection/lagging.rs`).
        Err(TrySendError::Full(d)) => mailbox.skip(d.qos, &d.source),
        // The session ended between lookup and send: nothing to deliver to.
        Err(TrySendError::Closed(_)) => {}
    }
}

/// What one session is granted for a message from its own (non-shared)
/// subscriptions, or `None` when nothing matches. The catch-up read of a
/// resumed session uses it; fan-out applies the same `Grant::add` through
/// the trie.
pub fn delivery_for(
    subscriptions: &[(String, SubscriptionOptions, Option<u32>)],
    client_id: &str,
    msg: &Message,
) -> Option<Grant> {
    let mut grant = None;
    for (filter, options, id) in subscriptions {
        if lodestream_mqtt::topic::matches(filter, &msg.topic) {
            Grant::add(&mut grant, msg, client_id, options, *id);
        }
    }
    grant
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Session;
    use bytes::Bytes;

    fn msg(topic: &str, qos: QoS, publisher: &str) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"p"),
            qos,
            retain: false,
            properties: Default::default(),
            publisher: Some(bytes::Bytes::copy_from_slice(publisher.as_bytes())),
            timestamp_ms: 0,
        })
    }

    fn subscribe(idx: &SubscriptionIndex, s: &Session, filter: &str, qos: QoS, id: u32) {
        let key = SubKey {
            client_id: s.client_id.clone(),
            share_group: None,
        };
        let entry = SubEntry::new(SubscriptionOptions::qos(qos), Some(id), s.mailbox.clone());
        idx.insert(filter, key, entry).expect("valid filter");
    }

    fn received(s: &mut Session) -> Vec<Delivery> {
        std::iter::from_fn(|| s.inbox.try_recv().ok()).collect()
    }

    fn dispatch(idx: &SubscriptionIndex, records: Vec<(i64, Arc<Message>)>) {
        let topic: Arc<str> = Arc::from("t");
        idx.dispatch(&topic, 0, records.into_iter(), &mut Wakes::default());
    }

    /// [MQTT-3.3.4-2..5] Overlapping subscriptions of one session get one
    /// copy with the highest QoS and every identifier; each session gets
    /// its own, and a batch's records arrive in order.
    #[test]
    fn overlapping_subscriptions_deliver_once_per_session_with_every_identifier() {
        let idx = SubscriptionIndex::new(Arc::new(Metrics::new()));
        let mut a = Session::new(Arc::from("a"), 16);
        let mut b = Session::new(Arc::from("b"), 16);
        subscribe(&idx, &a, "x/#", QoS::AtMostOnce, 1);
        subscribe(&idx, &b, "x/y", QoS::AtLeastOnce, 3);
        subscribe(&idx, &a, "x/+", QoS::AtLeastOnce, 2);
        let m1 = msg("x/y", QoS::ExactlyOnce, "p");
        let m2 = msg("x/z", QoS::ExactlyOnce, "p");
        dispatch(&idx, vec![(7, m1), (8, m2)]);
        let got = received(&mut a);
        let seen: Vec<_> = got
            .iter()
            .map(|d| {
                (
                    d.msg.topic.as_str(),
                    d.qos,
                    d.source.as_ref().map(|s| s.offset),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("x/y", QoS::AtLeastOnce, Some(7)),
                ("x/z", QoS::AtLeastOnce, Some(8))
            ]
        );
        let mut ids = got[0].subscription_ids.clone();
        ids.sort_unstable();
        assert_eq!(ids, [1, 2]);
        let got = received(&mut b);
        assert_eq!(got.len(), 1, "b matches x/y only");
        assert_eq!(
            (got[0].qos, got[0].subscription_ids.as_slice()),
            (QoS::AtLeastOnce, &[3][..])
        );
        let pos = idx.positions_of(&["t"]);
        assert_eq!(
            pos.get(&(Arc::from("t"), 0)),
            Some(&9),
            "position past the batch"
        );
    }

    /// [MQTT-3.8.3-3] A no-local subscription does not get its own client's
    /// messages; another of the client's subscriptions that matches still
    /// does.
    #[test]
    fn no_local_leaves_out_only_the_publishers_own_no_local_subscriptions() {
        let idx = SubscriptionIndex::new(Arc::new(Metrics::new()));
        let mut a = Session::new(Arc::from("a"), 16);
        let key = SubKey {
            client_id: a.client_id.clone(),
            share_group: None,
        };
        let mut opts = SubscriptionOptions::qos(QoS::AtLeastOnce);
        opts.no_local = true;
        let entry = SubEntry::new(opts, Some(1), a.mailbox.clone());
        idx.insert("n/#", key, entry).expect("valid filter");
        dispatch(&idx, vec![(0, msg("n/1", QoS::AtLeastOnce, "a"))]);
        assert!(
            received(&mut a).is_empty(),
            "own message on a no-local subscription"
        );
        subscribe(&idx, &a, "n/1", QoS::AtMostOnce, 2);
        dispatch(&idx, vec![(1, msg("n/1", QoS::AtLeastOnce, "a"))]);
        let got = received(&mut a);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].qos, got[0].subscription_ids.as_slice()),
            (QoS::AtMostOnce, &[2][..])
        );
    }
}
