//! The own producer's handle and its task (docs/own-producer.md). A write
//! joins a shared list and wakes the task only if it sleeps: while a
//! round is out, writes just gather, and the next round takes them all.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify, Semaphore};

use super::client::{Links, ProduceCallError};
use super::request::OutRecord;
use super::sender::{Sender, SenderConfig, Write};
use crate::kafka::{DeliveryFuture, ProduceError};

struct Shared {
    waiting: Mutex<Vec<Write>>,
    wake: Notify,
    room: Arc<Semaphore>,
    /// Permits in `room` when nothing is held.
    room_total: u32,
    closed: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<Write>> {
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
            waiting: Mutex::new(Vec::new()),
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
        topic: &str,
        record: OutRecord,
        linger: bool,
    ) -> Result<DeliveryFuture, ProduceError> {
        let size = u32::try_from(record.size()).unwrap_or(u32::MAX);
        let size = size.clamp(1, self.shared.room_total);
        let room = self.shared.room.clone().acquire_many_owned(size).await;
        let room = room.map_err(|_| ProduceError::Canceled)?;
        let (done, outcome) = oneshot::channel();
        let w = Write {
            topic: Arc::from(topic),
            record,
            linger,
            since: Instant::now(),
            done,
            room: Some(room),
        };
        self.shared.lock().push(w);
        // Stores a permit when the task is busy: no wake-up until it looks.
        self.shared.wake.notify_one();
        Ok(outcome)
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
        if s.idle() && shared.lock().is_empty() {
            if closed {
                return;
            }
            shared.wake.notified().await;
            if cfg.linger > Duration::ZERO && shared.lock().iter().any(|w| w.linger) {
                tokio::time::sleep(cfg.linger).await;
            }
        }
        let new = std::mem::take(&mut *shared.lock());
        for w in new {
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
