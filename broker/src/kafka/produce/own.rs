//! The own producer's handle and its task (docs/own-producer.md). A write
//! joins a shared list and wakes the task only if it sleeps: while a
//! round is out, writes just gather, and the next round takes them all.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use super::client::{Links, ProduceCallError};
use super::request::OutRecord;
use super::sender::{Sender, SenderConfig, Write};
use crate::kafka::{DeliveryFuture, ProduceError};

/// Writes handed over and not yet taken by the task.
#[derive(Default)]
struct Waiting {
    writes: Vec<Write>,
    /// Their records' bytes.
    bytes: usize,
    /// The task waits out a linger: a write that may linger too need not
    /// wake it (it wakes at the deadline); any other write does.
    lingering: bool,
}

impl Waiting {
    /// Adds a write; true when the task must look now: it is not waiting
    /// out a linger, or this write may not linger, or a batch's worth waits.
    fn push(&mut self, w: Write, max_records: usize) -> bool {
        let linger = w.linger;
        self.bytes += w.record.size();
        self.writes.push(w);
        !(linger && self.lingering) || self.full(max_records)
    }

    fn full(&self, max_records: usize) -> bool {
        self.writes.len() >= max_records || self.bytes >= super::sender::MAX_BATCH_BYTES
    }
}

struct Shared {
    waiting: Mutex<Waiting>,
    /// `SenderConfig::max_batch_records`.
    max_records: usize,
    wake: Notify,
    room: Arc<Semaphore>,
    /// Permits in `room` when nothing is held.
    room_total: u32,
    closed: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        // A panic while holding it leaves a plain vector: still usable.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Stops the task once the last handle is gone.
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.wake.notify_one();
    }
}

/// The node's own idempotent producer: one task per node, one request in
/// flight per Kafka broker, all of a broker's partitions in it.
#[derive(Clone)]
pub struct OwnProducer {
    shared: Arc<Shared>,
    _close: Arc<CloseOnDrop>,
}

impl OwnProducer {
    /// Starts the producer's task; it asks Kafka for a producer id, and
    /// keeps asking while Kafka cannot be reached (writes wait meanwhile,
    /// up to the delivery timeout).
    pub fn spawn(bootstrap: &str, client_id: &str, cfg: SenderConfig) -> OwnProducer {
        let room_total = u32::try_from(cfg.max_bytes).unwrap_or(u32::MAX).max(1);
        let shared = Arc::new(Shared {
            waiting: Mutex::new(Waiting::default()),
            max_records: cfg.max_batch_records,
            wake: Notify::new(),
            room: Arc::new(Semaphore::new(room_total as usize)),
            room_total,
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let task = run(
            shared.clone(),
            bootstrap.to_string(),
            client_id.to_string(),
            cfg,
        );
        tokio::spawn(task);
        OwnProducer {
            _close: Arc::new(CloseOnDrop(shared.clone())),
            shared,
        }
    }

    /// Hands a record over and returns its outcome's future. Waits while
    /// the producer holds its bound of bytes (back-pressure on the writer,
    /// as librdkafka's full queue does).
    pub async fn send(
        &self,
        topic: impl Into<Arc<str>>,
        record: OutRecord,
        linger: bool,
    ) -> Result<DeliveryFuture, ProduceError> {
        let size = self.room_for(&record);
        let room = self.shared.room.clone().acquire_many_owned(size).await;
        let room = room.map_err(|_| ProduceError::Canceled)?;
        Ok(self.hand_over(topic, record, linger, room))
    }

    /// `send` without waiting: `None` while the producer holds its bound of
    /// bytes (the caller then waits in `send`). A PUBLISH's usual path, so
    /// a connection needs no future of its own for it.
    pub fn try_send(
        &self,
        topic: impl Into<Arc<str>>,
        record: OutRecord,
        linger: bool,
    ) -> Option<Result<DeliveryFuture, ProduceError>> {
        let size = self.room_for(&record);
        match self.shared.room.clone().try_acquire_many_owned(size) {
            Ok(room) => Some(Ok(self.hand_over(topic, record, linger, room))),
            Err(TryAcquireError::NoPermits) => None,
            Err(TryAcquireError::Closed) => Some(Err(ProduceError::Canceled)),
        }
    }

    /// The bytes of the bound a record holds until it is settled.
    fn room_for(&self, record: &OutRecord) -> u32 {
        let size = u32::try_from(record.size()).unwrap_or(u32::MAX);
        size.clamp(1, self.shared.room_total)
    }

    fn hand_over(
        &self,
        topic: impl Into<Arc<str>>,
        record: OutRecord,
        linger: bool,
        room: OwnedSemaphorePermit,
    ) -> DeliveryFuture {
        let (done, outcome) = oneshot::channel();
        let w = Write {
            topic: topic.into(),
            record,
            linger,
            since: Instant::now(),
            done,
            room: Some(room),
        };
        let wake = self.shared.lock().push(w, self.shared.max_records);
        // Stores a permit when the task is busy: no wake-up until it looks.
        if wake {
            self.shared.wake.notify_one();
        }
        outcome
    }

    /// Waits until every write handed over is settled, or `within`.
    pub async fn flush(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        let total = self.shared.room_total as usize;
        while self.shared.room.available_permits() < total && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn run(shared: Arc<Shared>, bootstrap: String, client_id: String, cfg: SenderConfig) {
    let mut s = Sender::new(cfg);
    loop {
        let closed = shared.closed.load(std::sync::atomic::Ordering::SeqCst);
        if s.idle() && shared.lock().writes.is_empty() {
            if closed {
                return;
            }
            shared.wake.notified().await;
        }
        if s.idle() {
            gather(&shared, &cfg).await;
        }
        let new = std::mem::take(&mut *shared.lock());
        for w in new.writes {
            s.take(w);
        }
        if s.links.is_none() {
            connect(&mut s, &bootstrap, &client_id).await;
        }
        if s.refresh_due {
            refresh(&mut s).await;
        }
        let now = Instant::now();
        s.expire(now);
        s.maybe_bump();
        let keys = s.seal_ready(now);
        if keys.is_empty() {
            if !s.idle() {
                // Waiting for Metadata, a leader, or an epoch bump.
                tokio::time::sleep(cfg.retry_backoff).await;
            }
            continue;
        }
        if s.exchange(keys).await {
            tokio::time::sleep(cfg.retry_backoff).await;
        }
    }
}

/// Waits while every waiting write may linger and the oldest has waited
/// less than the linger, as librdkafka's `linger.ms` counts: a request
/// then carries all that arrived in one linger, where sending whenever the
/// last round was answered sent a few records a request at a steady
/// trickle (0.23 requests a message at 1,400 msg/s, docs/benchmarks.md).
/// A write that may not linger, or a full batch's worth, ends the wait.
async fn gather(shared: &Shared, cfg: &SenderConfig) {
    loop {
        let deadline = {
            let mut waiting = shared.lock();
            let deadline = linger_deadline(&waiting, cfg);
            waiting.lingering = deadline.is_some();
            deadline
        };
        let Some(deadline) = deadline else {
            return;
        };
        let sleep = tokio::time::sleep_until(deadline.into());
        tokio::select! {
            _ = sleep => {}
            _ = shared.wake.notified() => {}
        }
    }
}

/// Until when the task may wait for company for what is waiting; `None`:
/// send now.
fn linger_deadline(waiting: &Waiting, cfg: &SenderConfig) -> Option<Instant> {
    let all_linger = waiting.writes.iter().all(|w| w.linger);
    if cfg.linger.is_zero() || !all_linger || waiting.full(cfg.max_batch_records) {
        return None;
    }
    let oldest = waiting.writes.iter().map(|w| w.since).min()?;
    let deadline = oldest + cfg.linger;
    (deadline > Instant::now()).then_some(deadline)
}

/// A producer id, or a pause before the next try.
async fn connect(s: &mut Sender, bootstrap: &str, client_id: &str) {
    let within = s.time_left(Instant::now());
    let links = tokio::time::timeout(
        within,
        Links::connect(bootstrap, client_id, s.request_timeout()),
    );
    match links
        .await
        .unwrap_or(Err(ProduceCallError::Unanswered(within)))
    {
        Ok(links) => {
            tracing::info!(
                producer_id = links.identity().id,
                "own Kafka producer ready"
            );
            s.links = Some(links);
            s.refresh_due = true;
        }
        Err(e) => tracing::warn!(error = %e, "no producer id from Kafka yet; retrying"),
    }
}

/// Looks up partitions and leaders; places writes that waited for them.
async fn refresh(s: &mut Sender) {
    let topics = s.topics();
    // A lookup that hangs must not hold writes past their timeout.
    let within = s.time_left(Instant::now());
    let Some(links) = s.links.as_mut() else {
        return;
    };
    match tokio::time::timeout(within, links.refresh(&topics)).await {
        Ok(Ok(())) => {
            s.refresh_due = false;
            s.place_unplaced();
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "Kafka metadata lookup failed; retrying"),
        Err(_) => tracing::warn!(?within, "Kafka metadata lookup unanswered; retrying"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SenderConfig {
        SenderConfig {
            delivery_timeout: Duration::from_secs(30),
            max_batch_records: 3,
            retry_backoff: Duration::from_millis(100),
            linger: Duration::from_millis(5),
            max_bytes: 1 << 20,
            request_timeout: Duration::from_secs(30),
        }
    }

    fn write(linger: bool, since: Instant, bytes: usize) -> Write {
        Write {
            topic: Arc::from("t"),
            record: OutRecord {
                key: None,
                value: Some(vec![0u8; bytes].into()),
                headers: vec![],
                timestamp_ms: 0,
            },
            linger,
            since,
            done: oneshot::channel().0,
            room: None,
        }
    }

    fn waiting(writes: Vec<Write>) -> Waiting {
        let bytes = writes.iter().map(|w| w.record.size()).sum();
        Waiting {
            writes,
            bytes,
            lingering: false,
        }
    }

    #[test]
    fn lingering_writes_wait_one_linger_from_the_oldest_arrival() {
        let now = Instant::now();
        let oldest = now - Duration::from_millis(2);
        let w = waiting(vec![write(true, oldest, 10), write(true, now, 10)]);
        assert_eq!(linger_deadline(&w, &cfg()), Some(oldest + cfg().linger));
        let old = waiting(vec![write(true, now - Duration::from_millis(6), 10)]);
        assert_eq!(linger_deadline(&old, &cfg()), None, "its linger is over");
    }

    #[test]
    fn a_write_that_may_not_linger_sends_all_at_once() {
        let now = Instant::now();
        let w = waiting(vec![write(true, now, 10), write(false, now, 10)]);
        assert_eq!(linger_deadline(&w, &cfg()), None);
    }

    #[test]
    fn a_full_batch_does_not_wait() {
        let now = Instant::now();
        let by_count = waiting((0..3).map(|_| write(true, now, 1)).collect());
        assert_eq!(linger_deadline(&by_count, &cfg()), None);
        let by_bytes = waiting(vec![write(
            true,
            now,
            super::super::sender::MAX_BATCH_BYTES,
        )]);
        assert_eq!(linger_deadline(&by_bytes, &cfg()), None);
    }

    #[test]
    fn while_the_task_lingers_only_a_hurried_write_or_a_full_batch_wakes_it() {
        let now = Instant::now();
        let mut w = waiting(vec![]);
        assert!(w.push(write(true, now, 1), 3), "the task is not lingering");
        w.lingering = true;
        assert!(!w.push(write(true, now, 1), 3), "it wakes at its deadline");
        assert!(
            w.push(write(true, now, 1), 3),
            "three records: a full batch"
        );
        let mut w = waiting(vec![]);
        w.lingering = true;
        assert!(w.push(write(false, now, 1), 3), "a fast-lane write");
    }

    #[test]
    fn nothing_waits_without_a_linger() {
        let now = Instant::now();
        let c = SenderConfig {
            linger: Duration::ZERO,
            ..cfg()
        };
        assert_eq!(
            linger_deadline(&waiting(vec![write(true, now, 1)]), &c),
            None
        );
    }
}
