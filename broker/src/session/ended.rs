//! The epochs of sessions that ended (their record was deleted by a
//! tombstone), remembered for a while after the record is gone.
//!
//! Why: a session's epoch fences records of older owners. Once the record
//! is deleted, nothing would fence a record of that session that was still
//! in flight (written by another node's producer before the end, landing
//! after it), and the next claim of the client id would start again at
//! epoch 1, below the late record's epoch, which then wins: the discarded
//! session comes back [MQTT-3.1.2-6]. Remembering the ended epoch fences the
//! late record, and the next claim continues above it.
//!
//! Bounds: an entry lives `ttl` (a late record is a producer's retry, so it
//! lands within the producer's delivery timeout; the default ttl is ten
//! times that) and at most `cap` entries are kept, oldest dropped first.
//! Past either bound a session's epochs may restart at 1, which is what
//! every record written before the end would see anyway.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

pub struct EndedEpochs {
    cap: usize,
    ttl: Duration,
    by_id: HashMap<Box<str>, (u64, Instant)>,
    /// Insertion order for expiry; an id appears again when it ends again,
    /// and an entry is dropped from `by_id` only by its newest mention.
    order: VecDeque<(Box<str>, Instant)>,
}

impl EndedEpochs {
    pub fn new(cap: usize, ttl: Duration) -> EndedEpochs {
        EndedEpochs {
            cap,
            ttl,
            by_id: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The session of `id` ended at `epoch` (a later end never lowers it).
    pub fn record(&mut self, id: &str, epoch: u64, now: Instant) {
        if self.cap == 0 {
            return;
        }
        let e = self.by_id.entry(Box::from(id)).or_insert((epoch, now));
        *e = (e.0.max(epoch), now);
        self.order.push_back((Box::from(id), now));
        self.expire(now);
    }

    /// The epoch at which the session of `id` ended, if remembered.
    pub fn get(&mut self, id: &str, now: Instant) -> Option<u64> {
        self.expire(now);
        self.by_id.get(id).map(|e| e.0)
    }

    /// A newer record for `id` fences on its own epoch from now on.
    pub fn forget(&mut self, id: &str) {
        self.by_id.remove(id);
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((id, at)) = self.order.front() {
            let old = now.saturating_duration_since(*at) > self.ttl;
            if !old && self.order.len() <= self.cap {
                break;
            }
            if self.by_id.get(id).is_some_and(|e| e.1 == *at) {
                self.by_id.remove(id);
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_highest_ended_epoch() {
        let mut e = EndedEpochs::new(10, Duration::from_secs(60));
        let t = Instant::now();
        e.record("c", 5, t);
        e.record("c", 3, t);
        assert_eq!(e.get("c", t), Some(5));
        assert_eq!(e.get("other", t), None);
        e.forget("c");
        assert_eq!(e.get("c", t), None);
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let mut e = EndedEpochs::new(10, Duration::from_secs(60));
        let t = Instant::now();
        e.record("c", 5, t);
        assert_eq!(e.get("c", t + Duration::from_secs(59)), Some(5));
        assert_eq!(e.get("c", t + Duration::from_secs(61)), None);
        assert!(e.is_empty());
    }

    /// Bounded: past `cap` ends, the oldest is dropped first; an id that
    /// ended again is kept by its newest end.
    #[test]
    fn at_most_cap_entries_oldest_dropped_first() {
        let mut e = EndedEpochs::new(2, Duration::from_secs(60));
        let t = Instant::now();
        e.record("a", 1, t);
        e.record("b", 1, t + Duration::from_millis(1));
        e.record("a", 2, t + Duration::from_millis(2));
        assert_eq!(e.get("a", t), Some(2), "a's newest end is kept");
        e.record("c", 1, t + Duration::from_millis(3));
        assert_eq!(e.get("b", t), None, "b was the oldest");
        assert_eq!(e.get("c", t), Some(1));
        assert!(e.len() <= 2);
    }
}
