//! The node's index of local subscriptions and the fan-out of one message
//! to the sessions whose filters match it.
//!
//! Bounded behaviour: fan-out never waits for a session. A full mailbox
//! skips the message and notes where; the session's connection then reads
//! Kafka from there instead of the mailbox until it has caught up
//! (`connection/lagging.rs`), so a slow client never stalls the others and,
//! within `mqtt.max_lagging_sessions`, loses nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use lodestream_mqtt::trie::TopicTrie;
use lodestream_mqtt::TopicError;
use lodestream_mqtt::{QoS, SubscriptionOptions};
use tokio::sync::mpsc::error::TrySendError;

use crate::message::Message;
use crate::metrics::Metrics;
use crate::session::mailbox::Wakes;
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
        if options.no_local && msg.publisher.as_deref() == Some(client_id) {
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

struct Pending {
    mailbox: Mailbox,
    grant: Option<Grant>,
}

impl SubscriptionIndex {
    pub fn new(metrics: Arc<Metrics>) -> SubscriptionIndex {
        SubscriptionIndex {
            trie: RwLock::new(TopicTrie::new()),
            positions: Mutex::new(Offsets::new()),
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

    /// Delivers `msg` to every matching local session, once per session with
    /// the highest matching QoS and every subscription identifier
    /// [MQTT-3.3.4-2..5]. The sessions' wake-ups are left to `wakes`.
    pub fn dispatch(&self, msg: &Arc<Message>, source: Option<Source>, wakes: &mut Wakes) {
        let mut direct: HashMap<Arc<str>, Pending> = HashMap::new();
        {
            let t = self.trie.read().unwrap_or_else(|e| e.into_inner());
            let seen_by_catch_up = |e: &SubEntry| match (&e.live_from, &source) {
                (Some(from), Some(s)) => from
                    .get(&(s.topic.clone(), s.partition))
                    .is_some_and(|start| s.offset < *start),
                _ => false,
            };
            t.for_each_match(&msg.topic, |key: &SubKey, e: &SubEntry| {
                if seen_by_catch_up(e) {
                    return;
                }
                // Shared subscriptions are Kafka consumer-group members
                // (`kafka/share_group.rs`), never indexed here.
                if key.share_group.is_some() {
                    return;
                }
                let p = direct
                    .entry(key.client_id.clone())
                    .or_insert_with(|| Pending {
                        mailbox: e.mailbox.clone(),
                        grant: None,
                    });
                Grant::add(&mut p.grant, msg, &key.client_id, &e.options, e.identifier);
            });
            if let Some(s) = &source {
                let mut pos = self.positions.lock().unwrap_or_else(|e| e.into_inner());
                pos.insert((s.topic.clone(), s.partition), s.offset + 1);
            }
            // Offers happen under the read lock too: once a writer (a session
            // leaving fan-out) holds the lock, every earlier dispatch is in
            // the mailboxes, so positions and mailboxes agree.
            for (_, p) in direct {
                self.offer(msg, &source, p, wakes);
            }
        }
    }

    fn offer(&self, msg: &Arc<Message>, source: &Option<Source>, p: Pending, wakes: &mut Wakes) {
        // No grant: every match was no-local for the publisher.
        let Some(g) = p.grant else {
            return;
        };
        let d = Delivery {
            msg: msg.clone(),
            source: source.clone(),
            qos: g.qos,
            retain: g.retain,
            subscription_ids: g.subscription_ids,
            share: None,
        };
        // Once one message is skipped every later one is too, until the
        // connection has acted: what it takes from the mailbox meanwhile is
        // all older than the first skip, so re-reading from there delivers
        // nothing twice.
        if p.mailbox.flags.skipping() {
            return p.mailbox.skip(d.qos, source);
        }
        match p.mailbox.tx.try_send_deferred(d, wakes) {
            Ok(()) => {}
            // The connection decides: read Kafka from the first skipped
            // offset instead, or drop (counted there) and, for QoS 1/2,
            // close with 0x97 (`connection/lagging.rs`).
            Err(TrySendError::Full(d)) => p.mailbox.skip(d.qos, source),
            // The session ended between lookup and send: nothing to deliver to.
            Err(TrySendError::Closed(_)) => {}
        }
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
