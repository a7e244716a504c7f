//! A session fan-out outran: its queue (`mqtt.session_queue`) was full, so
//! fan-out skipped messages for it. Everything fan-out delivers is in Kafka
//! already, so instead of dropping them the session leaves fan-out and reads
//! Kafka itself from the first message it did not get (the catch-up read of
//! a resumed session, `kafka/catchup.rs`), at the pace its client takes
//! them, and rejoins fan-out once it has caught up. A client that falls
//! behind, or a connection held back by the broker's own session writes
//! while Kafka elects a leader, then loses nothing and is not disconnected.
//!
//! Bounded by `mqtt.max_lagging_sessions` (each one Kafka consumer): past
//! it, what was skipped is dropped (counted) and a QoS 1/2 loss closes the
//! connection with 0x97, so the client knows.

use super::*;
use crate::session::{lower_offset, Offsets, Skips};

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    /// Skips are decided only once no catch-up is still handing over (its
    /// last deliveries are in its channel) and no replay will register its
    /// filter. Fan-out keeps skipping meanwhile, and the first skipped
    /// offsets stay.
    pub(super) fn skips_wait(&mut self) -> bool {
        self.catchup.is_some() || self.replays_active() > 0
    }

    /// Deals with what fan-out skipped since the last loop step, if anything.
    pub(super) fn on_skipped(&mut self) -> Result<(), End> {
        let flags = self.session.mailbox.flags.clone();
        if !flags.skipping() || self.skips_wait() {
            return Ok(());
        }
        let Some(skips) = flags.take_skips() else {
            return Ok(());
        };
        let node = self.node.clone();
        let metrics = node.metrics();
        if let Some(permit) = node.lagging_permit() {
            self.read_kafka_instead(&skips, permit);
            metrics
                .lagging_total
                .with_label_values(&["read_kafka"])
                .inc();
            return Ok(());
        }
        metrics.lagging_total.with_label_values(&["refused"]).inc();
        tracing::warn!(client_id = %self.session.client_id, qos0 = skips.qos0, qos12 = skips.qos12, "session queue full and mqtt.max_lagging_sessions reached: messages dropped");
        let dropped = &metrics.dropped_messages;
        dropped
            .with_label_values(&["queue_full_qos0"])
            .inc_by(skips.qos0);
        dropped
            .with_label_values(&["queue_full"])
            .inc_by(skips.qos12);
        if skips.qos12 == 0 {
            return Ok(());
        }
        // A resume re-reads what was dropped: the offsets stay where the
        // skips began, even once nothing else is queued.
        skips.keep_resume_point(&mut self.session.offsets);
        self.session.left_fan_out = true;
        Err(End::Server(
            ReasonCode::QuotaExceeded,
            "session queue full and mqtt.max_lagging_sessions reached: QoS 1/2 messages dropped"
                .into(),
        ))
    }

    /// Leaves fan-out, gives back what is queued in the mailbox and reads
    /// Kafka from the earliest message skipped or given back.
    fn read_kafka_instead(&mut self, skips: &Skips, permit: crate::node::LaggingPermit) {
        let node = self.node.clone();
        let entries = index_entries(&self.session);
        // Removed under the index's write lock: every earlier dispatch is in
        // the mailbox, and no later one reaches it.
        for (inner, key, _) in &entries {
            node.unindex_subscription(inner, key);
        }
        // Fan-out may have skipped the session again between `take_skips`
        // and its removal (the mailbox was still full). This read covers
        // those too: left in the flags, they would start another read from
        // there once this one ends, re-delivering what it delivered.
        let late = self.session.mailbox.flags.take_skips();
        let topics: Vec<&str> = entries
            .iter()
            .flat_map(|(inner, _, _)| node.mapping().kafka_topics_for_filter(inner))
            .collect();
        // Partitions nothing was skipped on are read from where fan-out is,
        // so what it dispatches from now on is not missed either.
        let mut from = node.fan_out_positions(&topics);
        let mut given_back = skips.first.clone();
        for (k, offset) in late.into_iter().flat_map(|l| l.first) {
            lower_offset(&mut given_back, k, offset);
        }
        // Not from Kafka (a retained message requeued): kept.
        let kept = self.session.give_back_to_kafka(&mut given_back);
        self.backlog.extend(kept);
        for (k, offset) in given_back {
            lower_offset(&mut from, k, offset);
        }
        self.keep_resume_point(&from);
        tracing::debug!(client_id = %self.session.client_id, qos0 = skips.qos0, qos12 = skips.qos12, "session queue full: reading Kafka until caught up");
        self.spawn_catch_up(from, entries, Some(permit));
    }

    /// The session's stored offsets must not pass what it has not been
    /// given (a resume reads from them): partitions it has no offset for get
    /// the earliest of `from` and its backlog.
    fn keep_resume_point(&mut self, from: &Offsets) {
        for (k, offset) in from {
            let queued = self
                .backlog
                .iter()
                .filter_map(|d| d.source.as_ref())
                .filter(|s| s.partition == k.1 && s.topic == k.0)
                .map(|s| s.offset)
                .min();
            let start = queued.map_or(*offset, |q| q.min(*offset));
            self.session.offsets.entry(k.clone()).or_insert(start);
        }
    }
}
