//! The sender for one Kafka broker: writes gather into per-partition
//! batches while its one request is out, the next request carries a batch
//! for every partition that has records, and each answer completes,
//! resends or fails its batch as `sequence.rs` decides
//! (docs/own-producer.md). Leader routing is not here yet: every partition
//! written through a sender must be led by its broker.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::client::IdempotentConn;
use super::epoch::Sequences;
use super::request::{Encoded, OutRecord, PartitionBatch};
use super::sequence::{Failure, Next};

type Key = (Arc<str>, i32);
/// Where one write's outcome goes.
type Done = oneshot::Sender<Result<i64, WriteError>>;

/// One record to write, and where its outcome goes: the record's offset,
/// or why it was not written.
pub struct Write {
    pub topic: Arc<str>,
    pub partition: i32,
    pub record: OutRecord,
    pub done: Done,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("not written: {0:?}")]
    Failed(Failure),
    #[error("the sender stopped")]
    Stopped,
    #[error("could not encode: {0}")]
    Encode(String),
}

/// Kafka's INVALID_RECORD: how a batch we could not encode is settled.
const INVALID_RECORD: i16 = 87;

#[derive(Debug, Clone, Copy)]
pub struct SenderConfig {
    pub delivery_timeout: Duration,
    /// Records in one partition's batch at most.
    pub max_batch_records: usize,
    /// Pause before a resend.
    pub retry_backoff: Duration,
    /// How long the first write after an idle spell waits for company
    /// (0: sent at once; batches still form while a request is out).
    pub linger: Duration,
}

/// A sealed batch, encoded once, and the writes it carries, in order.
struct Flight {
    batch: PartitionBatch,
    encoded: Encoded,
    writes: Vec<Done>,
}

struct Sender {
    conn: IdempotentConn,
    cfg: SenderConfig,
    seqs: Sequences,
    open: HashMap<Key, VecDeque<(OutRecord, Done)>>,
    flights: HashMap<Key, Flight>,
    resend: HashSet<Key>,
    /// Batch size after a split, per partition.
    limit: HashMap<Key, usize>,
}

/// Runs until every `Write` sender is gone and everything is answered.
pub async fn run(conn: IdempotentConn, mut rx: mpsc::Receiver<Write>, cfg: SenderConfig) {
    let mut s = Sender::new(conn, cfg);
    let mut closed = false;
    loop {
        if s.open.values().all(VecDeque::is_empty) && s.flights.is_empty() {
            if closed {
                return;
            }
            match rx.recv().await {
                Some(w) => s.take(w),
                None => return,
            }
            if !s.cfg.linger.is_zero() {
                tokio::time::sleep(s.cfg.linger).await;
            }
        }
        while let Ok(w) = rx.try_recv() {
            s.take(w);
        }
        closed = closed || rx.is_closed();
        s.maybe_bump();
        let now = Instant::now();
        let keys = s.seal_ready(now);
        if keys.is_empty() {
            tokio::time::sleep(s.cfg.retry_backoff).await;
            continue;
        }
        s.exchange(keys).await;
    }
}

/// The sender without a task of its own: a write joins the waiting
/// records, and whichever writer finds no request out sends, for everyone,
/// until nothing is left. No hop to a sender task, and no wake-up of one.
pub struct Combined {
    waiting: std::sync::Mutex<Vec<Write>>,
    sender: tokio::sync::Mutex<Sender>,
}

impl Combined {
    pub fn new(conn: IdempotentConn, cfg: SenderConfig) -> Combined {
        Combined {
            waiting: std::sync::Mutex::new(Vec::new()),
            sender: tokio::sync::Mutex::new(Sender::new(conn, cfg)),
        }
    }

    /// Writes one record; its offset once Kafka has it.
    pub async fn write(
        &self,
        topic: Arc<str>,
        partition: i32,
        record: OutRecord,
    ) -> Result<i64, WriteError> {
        let (done, outcome) = oneshot::channel();
        let w = Write {
            topic,
            partition,
            record,
            done,
        };
        self.lock_waiting().push(w);
        // A writer that finds the sender busy leaves its record to it: the
        // busy one looks at `waiting` again after letting go.
        while let Ok(mut s) = self.sender.try_lock() {
            s.drive(|| std::mem::take(&mut *self.lock_waiting())).await;
            drop(s);
            if self.lock_waiting().is_empty() {
                break;
            }
        }
        outcome.await.unwrap_or(Err(WriteError::Stopped))
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Vec<Write>> {
        // A panic while holding it leaves a plain vector: still usable.
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Sender {
    fn new(conn: IdempotentConn, cfg: SenderConfig) -> Sender {
        Sender {
            conn,
            cfg,
            seqs: Sequences::default(),
            open: HashMap::new(),
            flights: HashMap::new(),
            resend: HashSet::new(),
            limit: HashMap::new(),
        }
    }

    /// Sends until nothing waits: what `more` hands over joins first.
    async fn drive(&mut self, mut more: impl FnMut() -> Vec<Write>) {
        loop {
            for w in more() {
                self.take(w);
            }
            self.maybe_bump();
            let keys = self.seal_ready(Instant::now());
            if keys.is_empty() {
                if self.open.values().all(VecDeque::is_empty) && self.flights.is_empty() {
                    return;
                }
                tokio::time::sleep(self.cfg.retry_backoff).await;
                continue;
            }
            self.exchange(keys).await;
        }
    }

    fn take(&mut self, w: Write) {
        self.open
            .entry((w.topic, w.partition))
            .or_default()
            .push_back((w.record, w.done));
    }

    /// The partitions to send now: resends, then new batches sealed from
    /// what is waiting.
    fn seal_ready(&mut self, now: Instant) -> Vec<Key> {
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
            let n = queue.len().min(max.max(1));
            let Ok(sealed) = self.seqs.seal(&key.0, key.1, n, now) else {
                continue; // an epoch bump is pending, or a batch is out
            };
            let (records, writes): (Vec<_>, Vec<_>) = queue.drain(..n).unzip();
            let batch = PartitionBatch {
                topic: key.0.to_string(),
                partition: key.1,
                base_sequence: sealed.base_sequence,
                records,
            };
            match Encoded::new(self.conn.identity(), &batch) {
                Ok(encoded) => {
                    let flight = Flight {
                        batch,
                        encoded,
                        writes,
                    };
                    self.flights.insert(key.clone(), flight);
                    keys.push(key);
                }
                Err(e) => {
                    // Never sent: its sequences go to the next batch.
                    let why = e.to_string();
                    let next = self.seqs.on_answer(
                        &key.0,
                        key.1,
                        (INVALID_RECORD, -1),
                        now,
                        self.cfg.delivery_timeout,
                    );
                    tracing::error!(error = %why, ?next, "could not encode a batch");
                    for tx in writes {
                        let _ = tx.send(Err(WriteError::Encode(why.clone())));
                    }
                }
            }
        }
        keys
    }

    /// One request with the batches of `keys`, and what its answer means.
    async fn exchange(&mut self, keys: Vec<Key>) {
        let batches: Vec<Encoded> = keys
            .iter()
            .filter_map(|k| self.flights.get(k).map(|f| f.encoded.clone()))
            .collect();
        let result = self.conn.produce_encoded(&batches).await;
        let now = Instant::now();
        let timeout = self.cfg.delivery_timeout;
        let mut answered = HashSet::new();
        if let Ok(answers) = &result {
            for a in answers {
                let key: Key = (Arc::from(a.topic.as_str()), a.partition);
                let next =
                    self.seqs
                        .on_answer(&key.0, key.1, (a.error_code, a.base_offset), now, timeout);
                self.act(&key, next);
                answered.insert(key);
            }
        }
        // Unanswered (a dropped connection, or missing from the answer).
        for key in keys.into_iter().filter(|k| !answered.contains(k)) {
            let next = self.seqs.on_lost(&key.0, key.1, now, timeout);
            self.act(&key, next);
        }
        if let Err(e) = result {
            // A late answer may still be on its way on this connection:
            // the next request goes on a new one.
            tracing::warn!(error = %e, "produce request unanswered; reconnecting");
            tokio::time::sleep(self.cfg.retry_backoff).await;
            if let Err(e) = self.conn.reconnect().await {
                tracing::warn!(error = %e, "reconnecting to Kafka failed");
            }
        }
    }

    fn act(&mut self, key: &Key, next: Next) {
        match next {
            Next::Written { base_offset } => {
                self.limit.remove(key);
                if let Some(f) = self.flights.remove(key) {
                    // A duplicate's answer may carry no offset (-1).
                    for (i, tx) in f.writes.into_iter().enumerate() {
                        let offset = if base_offset >= 0 {
                            base_offset + i as i64
                        } else {
                            -1
                        };
                        let _ = tx.send(Ok(offset));
                    }
                }
            }
            Next::Resend { .. } => {
                self.resend.insert(key.clone());
            }
            Next::Split => self.split(key),
            Next::Failed { why, .. } => {
                if let Some(f) = self.flights.remove(key) {
                    for tx in f.writes {
                        let _ = tx.send(Err(WriteError::Failed(why)));
                    }
                }
            }
            Next::BumpEpochThenResend | Next::Stale => {}
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
    fn maybe_bump(&mut self) {
        if !self.seqs.bump_ready() {
            return;
        }
        if !self.conn.bump_epoch() {
            // Past the last epoch; a new producer id is not wired yet.
            tracing::error!("producer epoch exhausted");
            return;
        }
        let who = self.conn.identity();
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
