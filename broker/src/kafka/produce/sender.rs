//! The own producer's sending state: writes gather into per-partition
//! batches while a partition's batch is out; each round sends every
//! broker one request with a batch for each of its partitions that has
//! records; each answer completes, resends or fails its batch as
//! `sequence.rs` decides (docs/own-producer.md). The task that runs the
//! rounds is `own.rs`.

use std::collections::VecDeque;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_protocol::ResponseError;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::client::{Answer, Links, ProduceCallError};
use super::epoch::Sequences;
use super::request::{Encoded, OutRecord, PartitionBatch};
use super::route::partition_for_key;
use super::sequence::{Failure, Next};
use crate::kafka::{ProduceError, Produced};

type Key = (Arc<str>, i32);
/// A write's outcome: where it landed, or why it did not.
pub type Outcome = Result<Produced, ProduceError>;

/// One record to write, and where its outcome goes.
pub struct Write {
    pub topic: Arc<str>,
    pub record: OutRecord,
    /// Whether it may wait `SenderConfig::linger` for company.
    pub linger: bool,
    pub since: Instant,
    pub done: oneshot::Sender<Outcome>,
    /// Its share of the producer's bounded memory, given back with it.
    pub room: Option<OwnedSemaphorePermit>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("not written: {0:?}")]
    Failed(Failure),
    #[error("the producer stopped")]
    Stopped,
    #[error("could not encode: {0}")]
    Encode(String),
}

/// Kafka's INVALID_RECORD: how a batch we could not encode is settled.
const INVALID_RECORD: i16 = 87;
/// Bytes of records in one batch at most (librdkafka's `batch.size`):
/// under Kafka's default `message.max.bytes` (1 MiB), so a batch is
/// split only when one record alone is near it.
pub(super) const MAX_BATCH_BYTES: usize = 1_000_000;
/// The shortest wait for an answer a request is given.
const MIN_WAIT: Duration = Duration::from_millis(100);
/// How a partition without a known leader is answered, without a request.
const LEADER_NOT_AVAILABLE: i16 = 5;

#[derive(Debug, Clone, Copy)]
pub struct SenderConfig {
    /// From a write's arrival to its outcome at most (`kafka.delivery_timeout_ms`).
    pub delivery_timeout: Duration,
    /// Records in one partition's batch at most; a batch also stops at
    /// `MAX_BATCH_BYTES`.
    pub max_batch_records: usize,
    /// Pause before a resend, and between Metadata lookups.
    pub retry_backoff: Duration,
    /// How long a write that may linger waits for company, from its
    /// arrival (librdkafka's `linger.ms`); a write that may not, or a full
    /// batch, sends what waits at once.
    pub linger: Duration,
    /// Bytes of records waiting or in flight at most; a writer past it
    /// waits for room (`kafka.queue_max_kbytes` of librdkafka's queue).
    pub max_bytes: usize,
    /// How long Kafka may take to answer one request (it waits up to this
    /// for the in-sync replicas).
    pub request_timeout: Duration,
}

/// A sealed batch, encoded once, and the writes it carries, in order.
struct Flight {
    batch: PartitionBatch,
    encoded: Encoded,
    writes: Vec<Parked>,
}

/// A write's outcome channel and room, kept until it is settled.
struct Parked {
    done: oneshot::Sender<Outcome>,
    since: Instant,
    _room: Option<OwnedSemaphorePermit>,
}

impl Parked {
    fn settle(self, outcome: Outcome) {
        // The writer may have gone (connection closed): nothing to do.
        let _ = self.done.send(outcome);
    }
}

pub struct Sender {
    pub links: Option<Links>,
    cfg: SenderConfig,
    seqs: Sequences,
    /// Writes to topics whose partition count is not known yet.
    unplaced: Vec<Write>,
    open: HashMap<Key, VecDeque<(OutRecord, Parked)>>,
    flights: HashMap<Key, Flight>,
    resend: HashSet<Key>,
    /// Batch size after a split, per partition.
    limit: HashMap<Key, usize>,
    /// Ask Metadata again before the next round.
    pub refresh_due: bool,
}

impl Sender {
    pub fn new(cfg: SenderConfig) -> Sender {
        Sender {
            links: None,
            cfg,
            seqs: Sequences::default(),
            unplaced: Vec::new(),
            open: HashMap::default(),
            flights: HashMap::default(),
            resend: HashSet::default(),
            limit: HashMap::default(),
            refresh_due: false,
        }
    }

    pub fn request_timeout(&self) -> Duration {
        self.cfg.request_timeout
    }

    /// Nothing waits and nothing is out.
    pub fn idle(&self) -> bool {
        self.unplaced.is_empty()
            && self.flights.is_empty()
            && self.open.values().all(|q| q.is_empty())
    }

    /// Places a write on its key's partition, once the topic's partition
    /// count is known; until then it waits for Metadata.
    pub fn take(&mut self, w: Write) {
        let count = self
            .links
            .as_ref()
            .and_then(|l| l.routes.partitions(&w.topic));
        let Some(count) = count else {
            self.refresh_due = true;
            self.unplaced.push(w);
            return;
        };
        let key = w.record.key.as_deref().unwrap_or_default();
        let partition = partition_for_key(key, count);
        let parked = Parked {
            done: w.done,
            since: w.since,
            _room: w.room,
        };
        self.open
            .entry((w.topic, partition))
            .or_default()
            .push_back((w.record, parked));
    }

    /// Until the first waiting or unanswered write reaches the delivery
    /// timeout (at least `MIN_WAIT`): how long a lookup may hold the rounds.
    pub fn time_left(&self, now: Instant) -> Duration {
        let queued = self.open.values().flatten().map(|(_, p)| p.since);
        let out = self
            .flights
            .values()
            .flat_map(|f| f.writes.iter().map(|p| p.since));
        let unplaced = self.unplaced.iter().map(|w| w.since);
        let first = queued.chain(out).chain(unplaced).min();
        let left = first.map_or(self.cfg.request_timeout, |since| {
            (since + self.cfg.delivery_timeout).saturating_duration_since(now)
        });
        left.clamp(MIN_WAIT, self.cfg.request_timeout)
    }

    /// The topics Metadata is asked about: every one written to.
    pub fn topics(&self) -> Vec<String> {
        let mut t: HashSet<&str> = self.open.keys().map(|k| &*k.0).collect();
        t.extend(self.flights.keys().map(|k| &*k.0));
        t.extend(self.unplaced.iter().map(|w| &*w.topic));
        t.into_iter().map(str::to_string).collect()
    }

    /// After a Metadata answer: places what waited for it.
    pub fn place_unplaced(&mut self) {
        for w in std::mem::take(&mut self.unplaced) {
            self.take(w);
        }
    }

    /// Fails what waited past the delivery timeout without being sent: a
    /// topic Kafka does not know, or no Kafka at all.
    pub fn expire(&mut self, now: Instant) {
        let timeout = self.cfg.delivery_timeout;
        let late = |since: Instant| now.saturating_duration_since(since) >= timeout;
        let why = |e: ResponseError| ProduceError::Own(WriteError::Failed(Failure::Kafka(e)));
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unplaced)
            .into_iter()
            .partition(|w| late(w.since));
        self.unplaced = kept;
        for w in gone {
            let _ = w
                .done
                .send(Err(why(ResponseError::UnknownTopicOrPartition)));
        }
        for (key, queue) in &mut self.open {
            if self.flights.contains_key(key) {
                continue; // it waits behind a batch that times out itself
            }
            while queue.front().is_some_and(|(_, p)| late(p.since)) {
                if let Some((_, p)) = queue.pop_front() {
                    p.settle(Err(ProduceError::Own(WriteError::Failed(
                        Failure::TimedOut,
                    ))));
                }
            }
        }
    }

    /// Fails everything, when the producer stops.
    pub fn fail_all(&mut self) {
        let stopped = || Err(ProduceError::Own(WriteError::Stopped));
        for w in self.unplaced.drain(..) {
            let _ = w.done.send(stopped());
        }
        for (_, queue) in self.open.drain() {
            queue.into_iter().for_each(|(_, p)| p.settle(stopped()));
        }
        for (_, f) in self.flights.drain() {
            f.writes.into_iter().for_each(|p| p.settle(stopped()));
        }
    }

    /// The partitions to send now: resends, then new batches sealed from
    /// what is waiting.
    pub fn seal_ready(&mut self, now: Instant) -> Vec<Key> {
        let Some(who) = self.links.as_ref().map(Links::identity) else {
            return Vec::new();
        };
        let mut keys: Vec<Key> = self.resend.drain().collect();
        let waiting: Vec<Key> = self
            .open
            .iter()
            .filter(|(k, q)| !q.is_empty() && !self.flights.contains_key(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in waiting {
            let max = self
                .limit
                .get(&key)
                .copied()
                .unwrap_or(self.cfg.max_batch_records);
            let Some(queue) = self.open.get_mut(&key) else {
                continue;
            };
            let n = batch_len(queue, max);
            // The delivery timeout counts from the first write's arrival.
            let first = queue.iter().take(n).map(|(_, p)| p.since).min();
            let Ok(sealed) = self.seqs.seal(&key.0, key.1, n, first.unwrap_or(now)) else {
                continue; // an epoch bump is pending, or a batch is out
            };
            let (records, writes): (Vec<_>, Vec<_>) = queue.drain(..n).unzip();
            let batch = PartitionBatch {
                topic: key.0.to_string(),
                partition: key.1,
                base_sequence: sealed.base_sequence,
                records,
            };
            match Encoded::new(who, &batch) {
                Ok(encoded) => {
                    let flight = Flight {
                        batch,
                        encoded,
                        writes,
                    };
                    self.flights.insert(key.clone(), flight);
                    keys.push(key);
                }
                Err(e) => self.unencodable(&key, writes, e.to_string(), now),
            }
        }
        keys
    }

    /// A batch that would not encode was never sent: its sequence numbers
    /// go to the next batch, and its writes fail.
    fn unencodable(&mut self, key: &Key, writes: Vec<Parked>, why: String, now: Instant) {
        let timeout = self.cfg.delivery_timeout;
        let next = self
            .seqs
            .on_answer(&key.0, key.1, (INVALID_RECORD, -1), now, timeout);
        tracing::error!(error = %why, ?next, "could not encode a batch");
        for p in writes {
            p.settle(Err(ProduceError::Own(WriteError::Encode(why.clone()))));
        }
    }

    /// One round: each broker gets one request with its partitions'
    /// batches; a partition without a known leader is answered as Kafka
    /// answers it (LEADER_NOT_AVAILABLE). True when something is to be
    /// sent again, after a back-off.
    pub async fn exchange(&mut self, keys: Vec<Key>) -> bool {
        let Some(links) = self.links.as_mut() else {
            return false;
        };
        let mut by_broker: HashMap<i32, Vec<Key>> = HashMap::default();
        let mut leaderless = Vec::new();
        for key in keys {
            match links.routes.leader(&key.0, key.1) {
                Some(b) => by_broker.entry(b).or_default().push(key),
                None => leaderless.push(key),
            }
        }
        let now = Instant::now();
        let requests = by_broker
            .iter()
            .map(|(b, keys)| {
                let flights: Vec<&Flight> =
                    keys.iter().filter_map(|k| self.flights.get(k)).collect();
                let batches = flights.iter().map(|f| f.encoded.clone()).collect();
                (
                    *b,
                    batches,
                    wait_for(self.cfg.delivery_timeout, &flights, now),
                )
            })
            .collect();
        let results = links.produce_all(requests).await;
        let now = Instant::now();
        let mut again = false;
        for (broker, result) in results {
            let keys = by_broker.remove(&broker).unwrap_or_default();
            again |= self.answered(keys, result, now);
        }
        for key in leaderless {
            let answer = (LEADER_NOT_AVAILABLE, -1);
            let next = self
                .seqs
                .on_answer(&key.0, key.1, answer, now, self.cfg.delivery_timeout);
            again |= self.act(&key, next);
        }
        again
    }

    /// What one broker's answer means for each of its partitions.
    fn answered(
        &mut self,
        keys: Vec<Key>,
        result: Result<Vec<Answer>, ProduceCallError>,
        now: Instant,
    ) -> bool {
        let timeout = self.cfg.delivery_timeout;
        let mut again = false;
        let mut answered = HashSet::default();
        match &result {
            Ok(answers) => {
                for a in answers {
                    let key: Key = (Arc::from(a.topic.as_str()), a.partition);
                    let answer = (a.error_code, a.base_offset);
                    let next = self.seqs.on_answer(&key.0, key.1, answer, now, timeout);
                    again |= self.act(&key, next);
                    answered.insert(key);
                }
            }
            Err(e) => tracing::warn!(error = %e, "produce request unanswered; connecting again"),
        }
        // Unanswered: a dropped connection, or missing from the answer.
        for key in keys.into_iter().filter(|k| !answered.contains(k)) {
            let next = self.seqs.on_lost(&key.0, key.1, now, timeout);
            again |= self.act(&key, next);
        }
        again
    }

    /// Carries out `next` for the partition; true for a resend.
    fn act(&mut self, key: &Key, next: Next) -> bool {
        match next {
            Next::Written { base_offset } => {
                self.limit.remove(key);
                if let Some(f) = self.flights.remove(key) {
                    for (i, p) in f.writes.into_iter().enumerate() {
                        // A duplicate's answer may carry no offset (-1).
                        let offset = if base_offset >= 0 {
                            base_offset + i as i64
                        } else {
                            -1
                        };
                        let partition = key.1;
                        p.settle(Ok(Produced { partition, offset }));
                    }
                }
                false
            }
            Next::Resend { refresh_metadata } => {
                self.refresh_due |= refresh_metadata;
                self.resend.insert(key.clone());
                true
            }
            Next::Split => {
                self.split(key);
                false
            }
            Next::Failed { why, .. } => {
                if let Some(f) = self.flights.remove(key) {
                    tracing::warn!(topic = %key.0, partition = key.1, ?why, records = f.writes.len(), "Kafka write failed");
                    for p in f.writes {
                        p.settle(Err(ProduceError::Own(WriteError::Failed(why))));
                    }
                }
                false
            }
            Next::BumpEpochThenResend => true,
            Next::Stale => false,
        }
    }

    /// Puts a batch too large together back, to go again in halves.
    fn split(&mut self, key: &Key) {
        let Some(f) = self.flights.remove(key) else {
            return;
        };
        let n = f.writes.len();
        self.limit.insert(key.clone(), (n / 2).max(1));
        let queue = self.open.entry(key.clone()).or_default();
        for pair in f.batch.records.into_iter().zip(f.writes).rev() {
            queue.push_front(pair);
        }
    }

    /// Once only batches waiting for it are out: bump, and resend those.
    pub fn maybe_bump(&mut self) {
        let Some(links) = self.links.as_mut() else {
            return;
        };
        if !self.seqs.bump_ready() {
            return;
        }
        if !links.bump_epoch() {
            // Past the last epoch: the task asks for a new producer id, and
            // this bump then goes on under it.
            tracing::warn!("producer epoch exhausted; asking Kafka for a new producer id");
            self.links = None;
            return;
        }
        let who = links.identity();
        tracing::info!(
            producer_id = who.id,
            epoch = who.epoch,
            "producer epoch bumped"
        );
        for key in self.seqs.bumped() {
            if let Some(f) = self.flights.get_mut(&key) {
                f.batch.base_sequence = 0;
                match Encoded::new(who, &f.batch) {
                    Ok(e) => {
                        f.encoded = e;
                        self.resend.insert(key);
                    }
                    // It encoded before; it cannot fail now.
                    Err(e) => tracing::error!(error = %e, "could not encode a batch again"),
                }
            }
        }
    }
}

/// How long a request may stay unanswered: until the first of its
/// writes reaches the delivery timeout, so that an unanswered write
/// fails then, as librdkafka's do (a floor keeps a request possible).
fn wait_for(timeout: Duration, flights: &[&Flight], now: Instant) -> Duration {
    let first = flights
        .iter()
        .flat_map(|f| f.writes.iter().map(|p| p.since))
        .min();
    let left = first.map_or(timeout, |since| {
        (since + timeout).saturating_duration_since(now)
    });
    left.max(MIN_WAIT)
}

/// How many of the queue's first records go in the next batch: at most
/// `max`, and no more than `MAX_BATCH_BYTES` unless one record alone is.
fn batch_len(queue: &VecDeque<(OutRecord, Parked)>, max: usize) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for (r, _) in queue.iter().take(max.max(1)) {
        bytes += r.size();
        if n > 0 && bytes > MAX_BATCH_BYTES {
            break;
        }
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn queue(sizes: &[usize]) -> VecDeque<(OutRecord, Parked)> {
        sizes
            .iter()
            .map(|&n| {
                let record = OutRecord {
                    key: None,
                    value: Some(Bytes::from(vec![b'x'; n])),
                    headers: Vec::new(),
                    timestamp_ms: 0,
                };
                let parked = Parked {
                    done: oneshot::channel().0,
                    since: Instant::now(),
                    _room: None,
                };
                (record, parked)
            })
            .collect()
    }

    #[test]
    fn a_batch_stops_at_its_record_count_and_byte_bound() {
        assert_eq!(batch_len(&queue(&[10; 5]), 3), 3, "record bound");
        assert_eq!(batch_len(&queue(&[10; 5]), 0), 1, "at least one");
        let half = MAX_BATCH_BYTES / 2;
        assert_eq!(batch_len(&queue(&[half, half, 1]), 100), 2, "fits exactly");
        assert_eq!(batch_len(&queue(&[half, half, 2]), 100), 2);
        assert_eq!(batch_len(&queue(&[half + 1, half]), 100), 1, "byte bound");
        assert_eq!(
            batch_len(&queue(&[2 * MAX_BATCH_BYTES, 1]), 100),
            1,
            "a record larger than the bound goes alone (Kafka judges it)"
        );
    }
}
