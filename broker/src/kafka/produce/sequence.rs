//! One partition's idempotent-produce state: the sequence numbers of the
//! batch in flight, and what each answer to it means (pure; the design and
//! its table of answers are in docs/own-producer.md).
//!
//! At most one batch per partition is in flight, so a retry is always the
//! same batch with the same sequence numbers, and nothing with a higher
//! sequence can have landed meanwhile. A batch is written only on a
//! definite success (rule 1); an outcome that stays unknown fails the
//! writes and asks for an epoch bump, so that a late landing of the old
//! batch cannot collide with new sequence numbers.

use std::time::{Duration, Instant};

use kafka_protocol::ResponseError;

/// The batch in flight: its first sequence number and record count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    pub base_sequence: i32,
    pub records: i32,
    first_sent: Instant,
    /// An attempt's outcome was unknown (no answer): it may have landed.
    ambiguous: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("a batch of this partition is in flight")]
    Busy,
    #[error("a batch holds 1 to 2147483647 records, not {0}")]
    Size(usize),
    #[error("the producer's epoch is being bumped")]
    Bumping,
}

/// Why a batch's writes failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Kafka(ResponseError),
    /// Still unknown at the delivery timeout.
    TimedOut,
}

/// What the partition's sender does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Written: complete the writes (`base_offset` -1 when the broker
    /// answered with a duplicate and no offset).
    Written { base_offset: i64 },
    /// Send the same batch again, after a back-off; first ask Metadata
    /// where the partition's leader is when `refresh_metadata`.
    Resend { refresh_metadata: bool },
    /// Too large together: split it and seal the halves (Kafka recorded
    /// none of its sequence numbers).
    Split,
    /// Fail the writes (no acknowledgement). With `bump_epoch`, nothing of
    /// the producer may be sealed before its epoch is bumped.
    Failed { why: Failure, bump_epoch: bool },
    /// Bump the producer's epoch, then resend this batch from sequence 0.
    BumpEpochThenResend,
    /// An answer or loss with nothing in flight (a stale response): ignore.
    Stale,
}

#[derive(Debug, Default)]
pub struct PartitionSequence {
    /// The next batch's first sequence number.
    next: i32,
    in_flight: Option<Sealed>,
}

impl PartitionSequence {
    pub fn in_flight(&self) -> Option<Sealed> {
        self.in_flight
    }

    /// Sequence numbers for a batch of `records`, sent at `now`.
    pub fn seal(&mut self, records: usize, now: Instant) -> Result<Sealed, SealError> {
        if self.in_flight.is_some() {
            return Err(SealError::Busy);
        }
        let records = i32::try_from(records)
            .ok()
            .filter(|&n| n > 0)
            .ok_or(SealError::Size(records))?;
        let sealed = Sealed {
            base_sequence: self.next,
            records,
            first_sent: now,
            ambiguous: false,
        };
        self.in_flight = Some(sealed);
        Ok(sealed)
    }

    /// The partition's answer in a Produce response (`code` 0: success).
    pub fn on_answer(
        &mut self,
        code: i16,
        base_offset: i64,
        now: Instant,
        timeout: Duration,
    ) -> Next {
        let Some(batch) = self.in_flight else {
            return Next::Stale;
        };
        let Some(error) = ResponseError::try_from_code(code) else {
            return self.written(batch, base_offset);
        };
        match error {
            ResponseError::DuplicateSequenceNumber => self.written(batch, -1),
            ResponseError::UnknownProducerId => Next::BumpEpochThenResend,
            ResponseError::OutOfOrderSequenceNumber | ResponseError::InvalidProducerEpoch => {
                self.fail(Failure::Kafka(error), true)
            }
            ResponseError::MessageTooLarge | ResponseError::RecordListTooLarge
                if batch.records > 1 =>
            {
                // Never appended, whatever an earlier attempt did.
                self.in_flight = None;
                Next::Split
            }
            e if e.is_retriable() => self.retry(batch, now, timeout, leader_moved(e)),
            e => self.fail(Failure::Kafka(e), batch.ambiguous),
        }
    }

    /// No answer: the connection dropped or the request timed out.
    pub fn on_lost(&mut self, now: Instant, timeout: Duration) -> Next {
        let Some(batch) = self.in_flight.as_mut() else {
            return Next::Stale;
        };
        batch.ambiguous = true;
        let batch = *batch;
        self.retry(batch, now, timeout, true)
    }

    /// The producer's epoch was bumped: sequences start again at 0, and a
    /// batch still in flight is resent from there.
    pub fn epoch_bumped(&mut self) {
        self.next = 0;
        if let Some(b) = self.in_flight.as_mut() {
            b.base_sequence = 0;
            b.ambiguous = false;
        }
    }

    fn written(&mut self, batch: Sealed, base_offset: i64) -> Next {
        self.in_flight = None;
        self.next = increment(batch.base_sequence, batch.records);
        Next::Written { base_offset }
    }

    fn retry(&mut self, batch: Sealed, now: Instant, timeout: Duration, refresh: bool) -> Next {
        if now.saturating_duration_since(batch.first_sent) >= timeout {
            // Possibly written by an earlier attempt: a bump keeps a late
            // landing from colliding with the next batch's sequences.
            return self.fail(Failure::TimedOut, true);
        }
        Next::Resend {
            refresh_metadata: refresh,
        }
    }

    /// The batch's writes fail. Without a bump its sequence numbers go to
    /// the next batch: Kafka recorded none of them.
    fn fail(&mut self, why: Failure, bump_epoch: bool) -> Next {
        self.in_flight = None;
        Next::Failed { why, bump_epoch }
    }
}

/// Errors after which the partition's leader must be looked up again.
fn leader_moved(e: ResponseError) -> bool {
    matches!(
        e,
        ResponseError::NotLeaderOrFollower
            | ResponseError::LeaderNotAvailable
            | ResponseError::UnknownTopicOrPartition
    )
}

/// Kafka's sequence arithmetic (`DefaultRecordBatch.incrementSequence`):
/// past `i32::MAX` sequences wrap to 0.
pub fn increment(sequence: i32, by: i32) -> i32 {
    if sequence > i32::MAX - by {
        by - (i32::MAX - sequence) - 1
    } else {
        sequence + by
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    fn code(e: ResponseError) -> i16 {
        e.code()
    }

    /// A partition with one batch of `n` records in flight, sealed at `t0`.
    fn sealed(n: usize) -> (PartitionSequence, Instant) {
        let t0 = Instant::now();
        let mut p = PartitionSequence::default();
        p.seal(n, t0).expect("nothing in flight");
        (p, t0)
    }

    #[test]
    fn batches_take_consecutive_sequences_after_each_success() {
        let (mut p, t0) = sealed(3);
        assert_eq!(
            p.on_answer(0, 100, t0, TIMEOUT),
            Next::Written { base_offset: 100 }
        );
        let b = p.seal(2, t0).expect("free again");
        assert_eq!((b.base_sequence, b.records), (3, 2));
        assert_eq!(
            p.on_answer(0, 103, t0, TIMEOUT),
            Next::Written { base_offset: 103 }
        );
        assert_eq!(p.seal(1, t0).map(|b| b.base_sequence), Ok(5));
    }

    #[test]
    fn one_batch_in_flight_at_a_time() {
        let (mut p, t0) = sealed(1);
        assert_eq!(p.seal(1, t0), Err(SealError::Busy));
        assert_eq!(
            PartitionSequence::default().seal(0, t0),
            Err(SealError::Size(0))
        );
    }

    #[test]
    fn a_duplicate_answer_is_written() {
        let (mut p, t0) = sealed(4);
        let dup = code(ResponseError::DuplicateSequenceNumber);
        assert_eq!(
            p.on_answer(dup, -1, t0, TIMEOUT),
            Next::Written { base_offset: -1 }
        );
        assert_eq!(p.seal(1, t0).map(|b| b.base_sequence), Ok(4));
    }

    #[test]
    fn a_moved_leader_gets_the_same_batch_after_a_metadata_refresh() {
        for e in [
            ResponseError::NotLeaderOrFollower,
            ResponseError::LeaderNotAvailable,
            ResponseError::UnknownTopicOrPartition,
        ] {
            let (mut p, t0) = sealed(2);
            let before = p.in_flight();
            let next = p.on_answer(code(e), -1, t0, TIMEOUT);
            assert_eq!(
                next,
                Next::Resend {
                    refresh_metadata: true
                },
                "{e:?}"
            );
            assert_eq!(p.in_flight(), before, "same sequences for {e:?}");
        }
    }

    #[test]
    fn other_retriable_errors_resend_the_same_batch() {
        for e in [
            ResponseError::NotEnoughReplicas,
            ResponseError::NotEnoughReplicasAfterAppend,
            ResponseError::RequestTimedOut,
            ResponseError::KafkaStorageError,
            ResponseError::CorruptMessage,
        ] {
            let (mut p, t0) = sealed(2);
            let next = p.on_answer(code(e), -1, t0, TIMEOUT);
            assert_eq!(
                next,
                Next::Resend {
                    refresh_metadata: false
                },
                "{e:?}"
            );
            assert!(p.in_flight().is_some());
        }
    }

    #[test]
    fn a_lost_answer_resends_the_batch_unchanged() {
        let (mut p, t0) = sealed(2);
        let base = p.in_flight().map(|b| b.base_sequence);
        assert_eq!(
            p.on_lost(t0, TIMEOUT),
            Next::Resend {
                refresh_metadata: true
            }
        );
        assert_eq!(p.in_flight().map(|b| b.base_sequence), base);
        // The retry finds the first attempt written.
        let dup = code(ResponseError::DuplicateSequenceNumber);
        assert_eq!(
            p.on_answer(dup, -1, t0, TIMEOUT),
            Next::Written { base_offset: -1 }
        );
    }

    #[test]
    fn an_unknown_producer_id_bumps_the_epoch_and_resends_from_zero() {
        let (mut p, t0) = sealed(2);
        p.on_answer(0, 0, t0, TIMEOUT);
        p.seal(3, t0).expect("free");
        let unknown = code(ResponseError::UnknownProducerId);
        assert_eq!(
            p.on_answer(unknown, -1, t0, TIMEOUT),
            Next::BumpEpochThenResend
        );
        p.epoch_bumped();
        let b = p.in_flight().expect("still in flight");
        assert_eq!((b.base_sequence, b.records), (0, 3));
        assert_eq!(
            p.on_answer(0, 9, t0, TIMEOUT),
            Next::Written { base_offset: 9 }
        );
        assert_eq!(p.seal(1, t0).map(|b| b.base_sequence), Ok(3));
    }

    #[test]
    fn a_broken_sequence_fails_the_writes_and_asks_for_a_bump() {
        for e in [
            ResponseError::OutOfOrderSequenceNumber,
            ResponseError::InvalidProducerEpoch,
        ] {
            let (mut p, t0) = sealed(2);
            let next = p.on_answer(code(e), -1, t0, TIMEOUT);
            let why = Failure::Kafka(e);
            assert_eq!(
                next,
                Next::Failed {
                    why,
                    bump_epoch: true
                },
                "{e:?}"
            );
            assert_eq!(p.in_flight(), None);
        }
    }

    #[test]
    fn a_batch_too_large_together_is_split_and_keeps_its_sequences_free() {
        for e in [
            ResponseError::MessageTooLarge,
            ResponseError::RecordListTooLarge,
        ] {
            let (mut p, t0) = sealed(4);
            assert_eq!(p.on_answer(code(e), -1, t0, TIMEOUT), Next::Split, "{e:?}");
            assert_eq!(p.seal(2, t0).map(|b| b.base_sequence), Ok(0));
            p.on_answer(0, 0, t0, TIMEOUT);
            assert_eq!(p.seal(2, t0).map(|b| b.base_sequence), Ok(2));
        }
    }

    #[test]
    fn a_single_record_too_large_fails_and_frees_its_sequence() {
        let (mut p, t0) = sealed(1);
        let e = ResponseError::MessageTooLarge;
        let next = p.on_answer(code(e), -1, t0, TIMEOUT);
        assert_eq!(
            next,
            Next::Failed {
                why: Failure::Kafka(e),
                bump_epoch: false
            }
        );
        assert_eq!(p.seal(1, t0).map(|b| b.base_sequence), Ok(0));
    }

    #[test]
    fn a_rejected_batch_hands_its_sequences_to_the_next_one() {
        let (mut p, t0) = sealed(2);
        p.on_answer(0, 0, t0, TIMEOUT);
        p.seal(5, t0).expect("free");
        for e in [
            ResponseError::InvalidRecord,
            ResponseError::TopicAuthorizationFailed,
        ] {
            let next = p.on_answer(code(e), -1, t0, TIMEOUT);
            assert_eq!(
                next,
                Next::Failed {
                    why: Failure::Kafka(e),
                    bump_epoch: false
                }
            );
            assert_eq!(p.seal(5, t0).map(|b| b.base_sequence), Ok(2), "{e:?}");
        }
    }

    #[test]
    fn a_rejection_after_a_lost_answer_asks_for_a_bump() {
        // The lost attempt may have landed: its sequences may be taken.
        let (mut p, t0) = sealed(2);
        p.on_lost(t0, TIMEOUT);
        let e = ResponseError::InvalidRecord;
        let next = p.on_answer(code(e), -1, t0, TIMEOUT);
        assert_eq!(
            next,
            Next::Failed {
                why: Failure::Kafka(e),
                bump_epoch: true
            }
        );
    }

    #[test]
    fn still_unknown_at_the_delivery_timeout_fails_and_asks_for_a_bump() {
        let (mut p, t0) = sealed(2);
        let late = t0 + TIMEOUT;
        let expected = Next::Failed {
            why: Failure::TimedOut,
            bump_epoch: true,
        };
        assert_eq!(p.on_lost(late, TIMEOUT), expected);
        let (mut p, t0) = sealed(2);
        let busy = code(ResponseError::NotEnoughReplicas);
        assert_eq!(p.on_answer(busy, -1, t0 + TIMEOUT, TIMEOUT), expected);
        assert_eq!(p.in_flight(), None);
    }

    #[test]
    fn sequences_wrap_past_i32_max_as_kafka_counts_them() {
        assert_eq!(increment(0, 5), 5);
        assert_eq!(increment(i32::MAX - 1, 1), i32::MAX);
        assert_eq!(increment(i32::MAX, 1), 0);
        assert_eq!(increment(i32::MAX - 2, 5), 2);
    }

    #[test]
    fn an_answer_with_nothing_in_flight_changes_nothing() {
        let mut p = PartitionSequence::default();
        let t0 = Instant::now();
        assert_eq!(p.on_answer(0, 5, t0, TIMEOUT), Next::Stale);
        assert_eq!(p.on_lost(t0, TIMEOUT), Next::Stale);
        assert_eq!(p.seal(1, t0).map(|b| b.base_sequence), Ok(0));
    }
}
