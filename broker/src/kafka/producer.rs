//! The node's single Kafka producer. Idempotent with `acks=all`, so a record
//! reported as delivered is durable and written once even when librdkafka
//! retries internally: that report is what allows a PUBACK/PUBREC.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use thiserror::Error;

use crate::config::KafkaConfig;

#[derive(Debug, Error)]
pub enum ProduceError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("kafka: delivery report lost (producer shut down)")]
    Canceled,
    #[error("{0}")]
    Unsafe(String),
}

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
}

impl Producer {
    pub fn new(cfg: &KafkaConfig, node_id: &str) -> Result<Producer, ProduceError> {
        let mut c = super::client_config(cfg, &format!("lodestream-{node_id}"));
        c.set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", cfg.linger_ms.to_string())
            .set("delivery.timeout.ms", cfg.delivery_timeout_ms.to_string())
            .set("compression.type", "lz4")
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
        Ok(Producer { inner: c.create()? })
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
        let mut hs = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            hs = hs.insert(Header {
                key: k.as_str(),
                value: Some(v.as_slice()),
            });
        }
        let mut record = FutureRecord::to(topic).key(key).headers(hs);
        if let Some(v) = value {
            record = record.payload(v);
        }
        let mut backoff = Duration::from_millis(1);
        loop {
            match self.inner.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Awaits a delivery report.
    pub async fn delivered(f: DeliveryFuture) -> Result<Produced, ProduceError> {
        match f.await {
            Ok(Ok(d)) => Ok(Produced {
                partition: d.partition,
                offset: d.offset,
            }),
            Ok(Err((e, _))) => Err(e.into()),
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
        self.inner.flush(Timeout::After(timeout))
    }

    /// Number of records waiting in librdkafka for acknowledgement.
    pub fn in_flight(&self) -> i32 {
        self.inner.in_flight_count()
    }
}

impl Producer {
    /// Low and high watermarks of a partition (blocking).
    pub fn watermarks(&self, topic: &str, partition: i32) -> Option<(i64, i64)> {
        use rdkafka::producer::Producer as _;
        self.inner
            .client()
            .fetch_watermarks(topic, partition, Duration::from_secs(3))
            .ok()
    }

    /// True when Kafka answers a metadata request for `topic` (readiness).
    pub fn metadata_ok(&self, topic: &str) -> bool {
        use rdkafka::producer::Producer as _;
        self.inner
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(3))
            .is_ok()
    }
}
