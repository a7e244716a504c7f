//! Exactly-once bookkeeping for QoS 2 PUBLISHes a client sends us
//! [MQTT-4.3.3], made to survive a node crash. Pure state, no I/O.
//!
//! Within one connection a retransmitted PUBLISH is recognised by its packet
//! id [MQTT-4.3.3-9/10]. Across a crash the new owner only has the session
//! state last written to Kafka, which may predate the crashed node's last
//! writes. So every QoS 2 record carries the publisher's client id, packet
//! id and a per-session sequence number (`mqtt.qos2_seq`), and:
//!
//! - a PUBCOMP is sent only after the state that marks the flow completed
//!   (`done`) is in Kafka, so a completed flow is never mistaken for an
//!   unfinished one;
//! - the stored state carries a *scan bound* (`floor`, `since_ms`): every
//!   record the owner may have written without recording it has a sequence
//!   number >= `floor` and was produced at or after `since_ms`.
//!
//! A retransmission (DUP) of an id the restored state does not know is then
//! checked against Kafka (`kafka/qos2_scan.rs`): a record for this client and
//! id with a sequence number >= `floor` and above the id's last completed
//! one means the first transmission was written, so it is acknowledged
//! without writing it again.

use std::collections::HashMap;

/// What the stored state promises about writes it may not know of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanBound {
    /// Unrecorded writes have `qos2_seq >= floor`.
    pub floor: u64,
    /// ... and were produced at or after this time (ms since the epoch).
    pub since_ms: i64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InboundQos2 {
    /// Written to Kafka and PUBREC sent, awaiting PUBREL: id -> sequence
    /// number (`None`: not written, e.g. refused by authorization in 3.1.1,
    /// or restored from a record older than sequence numbers).
    received: HashMap<u16, Option<u64>>,
    /// Handed to Kafka, outcome not (yet) known: id -> (seq, produced ms).
    unconfirmed: HashMap<u16, (u64, i64)>,
    /// Last completed flow per id whose seq is >= the current floor.
    done: HashMap<u16, u64>,
    next_seq: u64,
    /// The previous owner's bound, kept until the client starts a new flow
    /// (it resends its unfinished flows first on reconnect [MQTT-4.4.0-1]).
    inherited: Option<ScanBound>,
}

impl InboundQos2 {
    /// PUBREC sent and PUBREL not yet received for `id`.
    pub fn is_received(&self, id: u16) -> bool {
        self.received.contains_key(&id)
    }

    /// Number of flows waiting for PUBREL (they count against Receive Maximum).
    pub fn received_len(&self) -> usize {
        self.received.len()
    }

    /// A write of `id` starts now; returns its sequence number for the
    /// record's header. `retransmission`: the PUBLISH had DUP set.
    pub fn begin(&mut self, id: u16, retransmission: bool, now_ms: i64) -> u64 {
        if !retransmission {
            self.inherited = None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unconfirmed.insert(id, (seq, now_ms));
        self.prune();
        seq
    }

    /// Kafka acknowledged the write of `id`: PUBREC may go out.
    /// Also reached for a retransmission `found_written` already recorded
    /// (its acknowledgement settling when the connection closes): the
    /// sequence number found then is kept.
    pub fn written(&mut self, id: u16) {
        match self.unconfirmed.remove(&id) {
            Some((seq, _)) => {
                self.received.insert(id, Some(seq));
            }
            None => {
                self.received.entry(id).or_insert(None);
            }
        }
        self.prune();
    }

    /// PUBREC without a write (3.1.1 refusal: the flow must still complete).
    pub fn received_unwritten(&mut self, id: u16) {
        self.received.insert(id, None);
    }

    /// A retransmission found already written (by the Kafka scan) as `seq`.
    pub fn found_written(&mut self, id: u16, seq: u64) {
        self.unconfirmed.remove(&id);
        self.received.insert(id, Some(seq));
        self.next_seq = self.next_seq.max(seq + 1);
    }

    /// PUBREL for `id`: true if a flow was waiting for it. The caller must
    /// persist the state before sending PUBCOMP.
    pub fn release(&mut self, id: u16) -> bool {
        match self.received.remove(&id) {
            Some(seq) => {
                if let Some(seq) = seq {
                    self.done.insert(id, seq);
                }
                self.prune();
                true
            }
            None => false,
        }
    }

    /// The bound to store with this state.
    pub fn bound(&self, now_ms: i64) -> ScanBound {
        let mut b = ScanBound {
            floor: self.next_seq,
            since_ms: now_ms,
        };
        for &(seq, ms) in self.unconfirmed.values() {
            b.floor = b.floor.min(seq);
            b.since_ms = b.since_ms.min(ms);
        }
        if let Some(i) = self.inherited {
            b.floor = b.floor.min(i.floor);
            b.since_ms = b.since_ms.min(i.since_ms);
        }
        b
    }

    /// Whether a record for this client with packet id `id` and sequence
    /// number `seq` is an unfinished write of `id` that this state does not
    /// know was written: then a retransmission of `id` is a duplicate.
    pub fn is_unrecorded_write(&self, id: u16, seq: u64, now_ms: i64) -> bool {
        seq >= self.bound(now_ms).floor && self.done.get(&id).is_none_or(|d| seq > *d)
    }

    /// Done entries below the floor can never match (the floor excludes them).
    fn prune(&mut self) {
        let floor = self.bound(i64::MAX).floor;
        self.done.retain(|_, s| *s >= floor);
    }

    /// Stored form: (received, unconfirmed, done, next_seq, bound).
    pub fn to_parts(&self, now_ms: i64) -> Qos2Parts {
        let mut received: Vec<(u16, Option<u64>)> =
            self.received.iter().map(|(k, v)| (*k, *v)).collect();
        received.sort_unstable();
        let mut unconfirmed: Vec<(u16, u64, i64)> = self
            .unconfirmed
            .iter()
            .map(|(k, (s, t))| (*k, *s, *t))
            .collect();
        unconfirmed.sort_unstable();
        let mut done: Vec<(u16, u64)> = self.done.iter().map(|(k, v)| (*k, *v)).collect();
        done.sort_unstable();
        Qos2Parts {
            received,
            unconfirmed,
            done,
            next_seq: self.next_seq,
            bound: self.bound(now_ms),
        }
    }

    /// Restores a stored state. The stored bound becomes the inherited one:
    /// the previous owner may have written more than it recorded.
    pub fn from_parts(p: &Qos2Parts) -> InboundQos2 {
        InboundQos2 {
            received: p.received.iter().copied().collect(),
            unconfirmed: p
                .unconfirmed
                .iter()
                .map(|(k, s, t)| (*k, (*s, *t)))
                .collect(),
            done: p.done.iter().copied().collect(),
            next_seq: p.next_seq,
            inherited: Some(p.bound),
        }
    }
}

/// [`InboundQos2`] as stored in the session record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qos2Parts {
    pub received: Vec<(u16, Option<u64>)>,
    pub unconfirmed: Vec<(u16, u64, i64)>,
    pub done: Vec<(u16, u64)>,
    pub next_seq: u64,
    pub bound: ScanBound,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scenario the scan exists for: written, crash before the state
    /// that knows it reached Kafka, retransmitted to the new owner.
    #[test]
    fn unrecorded_write_after_last_persist_is_recognised() {
        let mut q = InboundQos2::default();
        let stored = q.to_parts(1_000); // last persist
        let seq = q.begin(7, false, 1_100);
        q.written(7); // PUBREC sent, then the node dies
        let restored = InboundQos2::from_parts(&stored);
        assert!(!restored.is_received(7));
        assert!(restored.is_unrecorded_write(7, seq, 2_000));
        assert!(stored.bound.since_ms <= 1_100);
    }

    /// [MQTT-4.3.3-9] a completed flow's record must not make a later flow
    /// with the same id look written: the PUBCOMP waits for `done` to be stored.
    #[test]
    fn completed_flow_is_not_mistaken_for_a_new_one() {
        let mut q = InboundQos2::default();
        let s1 = q.begin(7, false, 10);
        q.written(7);
        assert!(q.release(7));
        let stored = q.to_parts(20); // persisted before PUBCOMP
        let restored = InboundQos2::from_parts(&stored);
        assert!(!restored.is_unrecorded_write(7, s1, 30));
        // A new flow 7 written after that persist is recognised.
        let mut q2 = q.clone();
        let s2 = q2.begin(7, false, 25);
        assert!(restored.is_unrecorded_write(7, s2, 30));
    }

    /// A slow write of one id must not hide a completed flow of another id
    /// behind the floor: `done` keeps what the floor does not exclude.
    #[test]
    fn done_survives_while_an_older_write_is_unconfirmed() {
        let mut q = InboundQos2::default();
        let slow = q.begin(1, false, 10); // never acknowledged
        let fast = q.begin(2, false, 11);
        q.written(2);
        assert!(q.release(2));
        let restored = InboundQos2::from_parts(&q.to_parts(50));
        assert!(restored.is_unrecorded_write(1, slow, 60));
        assert!(!restored.is_unrecorded_write(2, fast, 60));
        assert_eq!(restored.to_parts(60).bound.since_ms, 10);
    }

    #[test]
    fn done_is_pruned_below_the_floor() {
        let mut q = InboundQos2::default();
        for i in 0..100u16 {
            q.begin(i % 10 + 1, false, i as i64);
            q.written(i % 10 + 1);
            assert!(q.release(i % 10 + 1));
        }
        assert!(q.to_parts(0).done.is_empty());
    }

    /// The inherited bound lasts until the client starts a new flow, since
    /// it resends its unfinished flows first [MQTT-4.4.0-1].
    #[test]
    fn inherited_bound_lasts_until_a_new_flow() {
        let mut old = InboundQos2::default();
        let stored = old.to_parts(100);
        let lost = old.begin(3, false, 150);
        let mut new = InboundQos2::from_parts(&stored);
        new.begin(4, true, 500); // retransmission of another id: bound kept
        assert!(new.is_unrecorded_write(3, lost, 600));
        assert_eq!(new.to_parts(600).bound.since_ms, 100);
        new.written(4);
        assert!(new.release(4));
        new.begin(5, false, 700); // a new flow: retransmissions are over
        new.written(5);
        let b = new.to_parts(800).bound;
        assert!(b.floor > lost && b.since_ms == 800);
    }

    #[test]
    fn unwritten_refusal_completes_without_a_done_entry() {
        let mut q = InboundQos2::default();
        q.received_unwritten(9);
        assert!(q.is_received(9));
        assert!(q.release(9));
        assert!(!q.release(9), "a second PUBREL finds nothing");
        assert!(q.to_parts(0).done.is_empty());
    }

    /// The recognised retransmission's seq survives its acknowledgement
    /// settling, so its completion is recorded in `done` and the old record
    /// cannot later pass for an unfinished write of a reused id.
    #[test]
    fn written_after_found_written_keeps_the_sequence() {
        let mut q = InboundQos2::from_parts(&InboundQos2::default().to_parts(0));
        q.found_written(5, 41);
        q.written(5);
        assert!(q.release(5));
        assert!(!q.is_unrecorded_write(5, 41, 0));
    }

    #[test]
    fn found_written_moves_the_sequence_past_it() {
        let mut q = InboundQos2::default();
        q.found_written(5, 41);
        assert!(q.is_received(5));
        assert_eq!(q.begin(6, false, 0), 42);
    }
}
