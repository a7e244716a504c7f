//! The producer-wide part of idempotence (pure): every partition's
//! sequence state, and when the epoch may be bumped. One epoch covers all
//! partitions, and Kafka takes a new epoch only at sequence 0, so a bump
//! waits until no batch is in flight but those waiting for it, and nothing
//! is sealed meanwhile (docs/own-producer.md, "The epoch bump").

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::sequence::{Next, PartitionSequence, SealError, Sealed};

type Key = (Arc<str>, i32);

#[derive(Debug, Default)]
struct Part {
    seq: PartitionSequence,
    /// Its batch waits for the bump, then goes again from sequence 0.
    parked: bool,
}

#[derive(Debug, Default)]
pub struct Sequences {
    parts: HashMap<Key, Part>,
    bump_wanted: bool,
}

impl Sequences {
    /// Sequence numbers for a batch of `records` to `topic`/`partition`.
    pub fn seal(
        &mut self,
        topic: &Arc<str>,
        partition: i32,
        records: usize,
        now: Instant,
    ) -> Result<Sealed, SealError> {
        if self.bump_wanted {
            return Err(SealError::Bumping);
        }
        let part = self.parts.entry((topic.clone(), partition)).or_default();
        part.seq.seal(records, now)
    }

    /// The partition's answer; what its sender does next (see `Next`).
    pub fn on_answer(
        &mut self,
        topic: &Arc<str>,
        partition: i32,
        answer: (i16, i64),
        now: Instant,
        timeout: Duration,
    ) -> Next {
        let Some(part) = self.parts.get_mut(&(topic.clone(), partition)) else {
            return Next::Stale;
        };
        let next = part.seq.on_answer(answer.0, answer.1, now, timeout);
        self.note(topic, partition, next)
    }

    /// The partition's request went unanswered.
    pub fn on_lost(
        &mut self,
        topic: &Arc<str>,
        partition: i32,
        now: Instant,
        timeout: Duration,
    ) -> Next {
        let Some(part) = self.parts.get_mut(&(topic.clone(), partition)) else {
            return Next::Stale;
        };
        let next = part.seq.on_lost(now, timeout);
        self.note(topic, partition, next)
    }

    fn note(&mut self, topic: &Arc<str>, partition: i32, next: Next) -> Next {
        match next {
            Next::Failed {
                bump_epoch: true, ..
            } => self.bump_wanted = true,
            Next::BumpEpochThenResend => {
                self.bump_wanted = true;
                if let Some(p) = self.parts.get_mut(&(topic.clone(), partition)) {
                    p.parked = true;
                }
            }
            _ => {}
        }
        next
    }

    /// A bump is wanted and nothing is in flight but batches waiting for it.
    pub fn bump_ready(&self) -> bool {
        self.bump_wanted
            && self
                .parts
                .values()
                .all(|p| p.parked || p.seq.in_flight().is_none())
    }

    /// The epoch was bumped: every partition starts again at sequence 0.
    /// The partitions whose batches waited for it, to send again.
    pub fn bumped(&mut self) -> Vec<Key> {
        self.bump_wanted = false;
        let mut resend = Vec::new();
        for (key, part) in &mut self.parts {
            part.seq.epoch_bumped();
            if std::mem::take(&mut part.parked) {
                resend.push(key.clone());
            }
        }
        resend
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::produce::sequence::Failure;
    use kafka_protocol::ResponseError;

    const T: Duration = Duration::from_secs(30);

    fn topic() -> Arc<str> {
        Arc::from("t")
    }

    #[test]
    fn a_failure_that_wants_a_bump_stops_sealing_on_every_partition() {
        let (mut s, t0, t) = (Sequences::default(), Instant::now(), topic());
        s.seal(&t, 0, 1, t0).expect("free");
        let broken = (ResponseError::OutOfOrderSequenceNumber.code(), -1);
        let next = s.on_answer(&t, 0, broken, t0, T);
        assert!(matches!(
            next,
            Next::Failed {
                why: Failure::Kafka(_),
                bump_epoch: true
            }
        ));
        assert_eq!(s.seal(&t, 1, 1, t0), Err(SealError::Bumping));
        assert!(s.bump_ready());
        assert!(s.bumped().is_empty());
        assert_eq!(s.seal(&t, 1, 1, t0).map(|b| b.base_sequence), Ok(0));
    }

    #[test]
    fn a_bump_waits_for_other_partitions_batches_in_flight() {
        let (mut s, t0, t) = (Sequences::default(), Instant::now(), topic());
        s.seal(&t, 0, 1, t0).expect("free");
        s.seal(&t, 1, 1, t0).expect("free");
        let late = t0 + T;
        let next = s.on_lost(&t, 0, late, T);
        assert!(matches!(
            next,
            Next::Failed {
                bump_epoch: true,
                ..
            }
        ));
        assert!(!s.bump_ready(), "partition 1 still has a batch out");
        assert_eq!(
            s.on_answer(&t, 1, (0, 7), t0, T),
            Next::Written { base_offset: 7 }
        );
        assert!(s.bump_ready());
    }

    #[test]
    fn an_unknown_producer_id_parks_its_batch_until_the_bump_then_resends_from_zero() {
        let (mut s, t0, t) = (Sequences::default(), Instant::now(), topic());
        s.seal(&t, 0, 2, t0).expect("free");
        s.on_answer(&t, 0, (0, 0), t0, T);
        s.seal(&t, 0, 3, t0).expect("free");
        s.seal(&t, 1, 1, t0).expect("free");
        s.on_answer(&t, 1, (0, 0), t0, T);
        let unknown = (ResponseError::UnknownProducerId.code(), -1);
        assert_eq!(
            s.on_answer(&t, 0, unknown, t0, T),
            Next::BumpEpochThenResend
        );
        assert!(s.bump_ready(), "only the parked batch is out");
        assert_eq!(s.bumped(), vec![(t.clone(), 0)]);
        assert_eq!(
            s.parts[&(t.clone(), 0)]
                .seq
                .in_flight()
                .map(|b| b.base_sequence),
            Some(0)
        );
        assert_eq!(
            s.seal(&t, 1, 1, t0).map(|b| b.base_sequence),
            Ok(0),
            "every partition from 0"
        );
    }

    #[test]
    fn answers_for_unknown_partitions_are_stale() {
        let (mut s, t0, t) = (Sequences::default(), Instant::now(), topic());
        assert_eq!(s.on_answer(&t, 3, (0, 0), t0, T), Next::Stale);
        assert_eq!(s.on_lost(&t, 3, t0, T), Next::Stale);
        assert!(!s.bump_ready());
    }
}
