//! The node's single Kafka producer. Idempotent with `acks=all`, so a record
//! reported as delivered is durable and written once even when librdkafka
//! retries internally: that report is what allows a PUBACK/PUBREC.
//!
//! Delivery reports are served by a tokio task, not by a thread of their
//! own (rdkafka's `FutureProducer` polls from a dedicated thread): librdkafka
//! calls back when its report queue gets an event, which wakes the task, and
//! the task completes each record's future. A report then costs one wake-up
//! of a tokio worker instead of a hop through a third thread, and nothing
//! spins: the `FutureProducer` thread polls with a 100 ms timeout that it
//! rounds down to whole milliseconds, so it busy-polled for up to 1 ms per
//! 100 ms (about 1 % of a core per producer, two producers per node).

use std::ffi::c_void;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Message as _};
use thiserror::Error;
use tokio::sync::{oneshot, Notify};

use crate::config::KafkaConfig;

#[derive(Debug, Error)]
pub enum ProduceError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("kafka: delivery report lost (producer shut down)")]
    Canceled,
    #[error("{0}")]
    Unsafe(String),
    #[error("kafka (own producer): {0}")]
    Own(#[from] crate::kafka::produce::sender::WriteError),
}

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    pub partition: i32,
    pub offset: i64,
}

/// Resolves with the record's delivery report (see `Producer::delivered`).
pub type DeliveryFuture = oneshot::Receiver<Result<Produced, ProduceError>>;

/// The delivery reports of a message's writes: its record, and its
/// retained record when RETAIN is set (no `Vec`: one allocation less per
/// PUBLISH).
pub struct Sent {
    pub record: DeliveryFuture,
    pub retained: Option<DeliveryFuture>,
}

impl Sent {
    /// Waits for every write; a failure is the outcome.
    pub async fn delivered(mut self) -> Result<(), ProduceError> {
        std::future::poll_fn(|cx| self.poll_delivered(cx)).await
    }

    /// `delivered` as a poll, for a queue of writes without a future each
    /// (`connection/acks.rs`). Not to be polled again once ready.
    pub fn poll_delivered(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ProduceError>> {
        use std::task::{ready, Poll};
        if let Some(r) = self.retained.as_mut() {
            let report = ready!(std::pin::Pin::new(r).poll(cx));
            self.retained = None;
            if let Err(e) = Producer::report(report) {
                return Poll::Ready(Err(e));
            }
        }
        let report = ready!(std::pin::Pin::new(&mut self.record).poll(cx));
        Poll::Ready(Producer::report(report).map(drop))
    }
}

/// A record as handed to librdkafka, with the sender of its report.
type Record<'a> = BaseRecord<'a, [u8], [u8], Box<oneshot::Sender<Result<Produced, ProduceError>>>>;

/// Completes each record's `DeliveryFuture` from its delivery report.
struct Reports;

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<oneshot::Sender<Result<Produced, ProduceError>>>;

    fn delivery(&self, r: &DeliveryResult<'_>, tx: Self::DeliveryOpaque) {
        let report = match r {
            Ok(m) => Ok(Produced {
                partition: m.partition(),
                offset: m.offset(),
            }),
            Err((e, _)) => Err(ProduceError::Kafka(e.clone())),
        };
        // The publisher may have gone (connection closed): nothing to do.
        let _ = tx.send(report);
    }
}

/// librdkafka's report queue of one producer (a reference we own).
struct Queue(*mut rdsys::rd_kafka_queue_t);

// SAFETY: librdkafka queue handles may be used from any thread.
unsafe impl Send for Queue {}
unsafe impl Sync for Queue {}

/// Called by a librdkafka thread, under the queue's lock, for every event
/// put on the report queue.
unsafe extern "C" fn on_report(_rk: *mut rdsys::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Notify` of `Inner`, which disables this
    // callback before the `Notify` can be dropped.
    let wake = unsafe { &*(opaque as *const Notify) };
    wake.notify_one();
}

struct Inner {
    base: Arc<BaseProducer<Reports>>,
    queue: Arc<Queue>,
    // Pointed to by the callback registration; outlives it.
    _wake: Arc<Notify>,
    poller: tokio::task::AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: the queue reference is ours; once the callback is disabled
        // (under the queue lock) no librdkafka thread can reach `wake`.
        unsafe {
            rdsys::rd_kafka_queue_cb_event_enable(self.queue.0, None, std::ptr::null_mut());
        }
        self.poller.abort();
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // SAFETY: destroys our reference only; the producer keeps its own.
        unsafe { rdsys::rd_kafka_queue_destroy(self.0) }
    }
}

#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

impl Producer {
    pub fn new(cfg: &KafkaConfig, node_id: &str) -> Result<Producer, ProduceError> {
        let mut c = super::client_config(cfg, &format!("lodestream-{node_id}"));
        c.set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", cfg.linger_ms.to_string())
            .set(
                "max.in.flight.requests.per.connection",
                cfg.max_in_flight.to_string(),
            )
            .set("delivery.timeout.ms", cfg.delivery_timeout_ms.to_string())
            // No compression by default: librdkafka compresses per batch, and
            // LZ4 zeroes a 64 KB frame context for every batch; at a few
            // messages per batch (5 ms linger, keys spread over partitions)
            // that was a third of the broker's instructions per message.
            // `kafka.properties."compression.type"` turns it back on.
            .set("compression.type", "none")
            // Bounds the memory of records waiting for Kafka (librdkafka's
            // default is 1 GB); when full, publishers wait (back-pressure).
            .set("queue.buffering.max.kbytes", "131072");
        // User properties may still override the queue size.
        for (k, v) in &cfg.properties {
            c.set(k, v);
        }
        // Idempotence and acks=all are the durability contract: refuse to
        // let extra properties weaken them.
        for k in ["acks", "enable.idempotence"] {
            if let Some(v) = cfg.properties.get(k) {
                if (k == "acks" && v != "all" && v != "-1")
                    || (k == "enable.idempotence" && v != "true")
                {
                    return Err(ProduceError::Unsafe(format!(
                        "kafka.properties {k}={v} would allow acknowledging unwritten messages"
                    )));
                }
            }
        }
        let base: Arc<BaseProducer<Reports>> = Arc::new(c.create_with_context(Reports)?);
        let wake = Arc::new(Notify::new());
        // SAFETY: a new reference to the producer's report queue (the main
        // queue, where the event API puts delivery reports); `Inner` owns it.
        let queue = Arc::new(Queue(unsafe {
            rdsys::rd_kafka_queue_get_main(base.client().native_ptr())
        }));
        // SAFETY: `wake` outlives the registration (see `Inner::drop`).
        unsafe {
            rdsys::rd_kafka_queue_cb_event_enable(
                queue.0,
                Some(on_report),
                Arc::as_ptr(&wake) as *mut c_void,
            );
        }
        let (b, q, w) = (base.clone(), queue.clone(), wake.clone());
        let poller = tokio::spawn(async move {
            loop {
                // A report queued while the loop below runs leaves a permit,
                // so no wake-up is lost between the last poll and this wait.
                w.notified().await;
                // SAFETY: `q` is a live queue reference (held by this task).
                while unsafe { rdsys::rd_kafka_queue_length(q.0) } > 0 {
                    // Serves one event without blocking; delivery reports
                    // run `Reports::delivery`.
                    b.poll(Duration::ZERO);
                }
            }
        })
        .abort_handle();
        Ok(Producer {
            inner: Arc::new(Inner {
                base,
                queue,
                _wake: wake,
                poller,
            }),
        })
    }

    /// Hands the record to librdkafka and returns the delivery report future.
    /// When librdkafka's queue is full this waits (back-pressure on the
    /// publishing connection) instead of dropping.
    pub async fn send(
        &self,
        topic: &str,
        key: &[u8],
        value: Option<&[u8]>,
        headers: &[(String, Vec<u8>)],
    ) -> Result<DeliveryFuture, ProduceError> {
        self.send_with(topic, key, value, headers).await
    }

    /// `send` of a record built for either producer; librdkafka stamps
    /// its own time, as it always did here.
    pub async fn send_record(
        &self,
        topic: &str,
        r: &crate::kafka::produce::request::OutRecord,
    ) -> Result<DeliveryFuture, ProduceError> {
        let key = r.key.as_deref().unwrap_or_default();
        self.send_with(topic, key, r.value.as_deref(), &r.headers)
            .await
    }

    async fn send_with<K: AsRef<str>, V: AsRef<[u8]>>(
        &self,
        topic: &str,
        key: &[u8],
        value: Option<&[u8]>,
        headers: &[(K, V)],
    ) -> Result<DeliveryFuture, ProduceError> {
        let mut hs = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            hs = hs.insert(Header {
                key: k.as_ref(),
                value: Some(v.as_ref()),
            });
        }
        let (tx, rx) = oneshot::channel();
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(tx))
            .key(key)
            .headers(hs);
        if let Some(v) = value {
            record = record.payload(v);
        }
        match self.inner.base.send(record) {
            Ok(()) => Ok(rx),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                // Boxed: the waiting state would otherwise sit in every
                // publishing connection's future.
                Box::pin(self.send_when_room(r)).await?;
                Ok(rx)
            }
            Err((e, _)) => Err(e.into()),
        }
    }

    /// Retries a record while librdkafka's queue is full.
    async fn send_when_room<'a>(&self, mut record: Record<'a>) -> Result<(), ProduceError> {
        let mut backoff = Duration::from_millis(1);
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(100));
            match self.inner.base.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => record = r,
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Awaits a delivery report.
    pub async fn delivered(f: DeliveryFuture) -> Result<Produced, ProduceError> {
        Producer::report(f.await)
    }

    /// A `DeliveryFuture`'s outcome.
    fn report(
        r: Result<Result<Produced, ProduceError>, oneshot::error::RecvError>,
    ) -> Result<Produced, ProduceError> {
        match r {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ProduceError::Canceled),
        }
    }

    /// Sends and waits for the write to be acknowledged.
    pub async fn send_and_wait(
        &self,
        topic: &str,
        key: &[u8],
        value: Option<&[u8]>,
        headers: &[(String, Vec<u8>)],
    ) -> Result<Produced, ProduceError> {
        let f = self.send(topic, key, value, headers).await?;
        Self::delivered(f).await
    }

    /// Waits until every queued record is acknowledged (graceful shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.base.flush(Timeout::After(timeout))
    }

    /// Number of records waiting in librdkafka for acknowledgement.
    pub fn in_flight(&self) -> i32 {
        self.inner.base.in_flight_count()
    }
}

impl Producer {
    /// Low and high watermarks of a partition (blocking).
    pub fn watermarks(&self, topic: &str, partition: i32) -> Option<(i64, i64)> {
        self.inner
            .base
            .client()
            .fetch_watermarks(topic, partition, Duration::from_secs(3))
            .ok()
    }

    /// True when Kafka answers a metadata request for `topic` (readiness).
    pub fn metadata_ok(&self, topic: &str) -> bool {
        self.inner
            .base
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(3))
            .is_ok()
    }
}
