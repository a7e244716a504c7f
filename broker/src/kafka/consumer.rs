//! The one way the broker builds a Kafka consumer: every reader (fan-out,
//! retained, sessions, nodes, catch-up, QoS 2 scan) assigns partitions and
//! offsets itself, outside consumer groups, and commits nothing.

use bytes::Bytes;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::ClientConfig;

use super::reader::Record;
use crate::config::KafkaConfig;

/// A consumer for explicitly assigned partitions. `role` names the reader
/// in Kafka's client and group ids (`lodestream-<role>-<node>`); a group id
/// is required by librdkafka, though nothing joins or commits to it.
/// Offsets below a partition's log start (retention) resume at its start.
pub(crate) fn assigned(
    cfg: &KafkaConfig,
    role: &str,
    node_id: &str,
    fetch_wait_max_ms: u32,
) -> KafkaResult<StreamConsumer> {
    assigned_config(cfg, role, node_id, fetch_wait_max_ms).create()
}

/// `assigned` for one session's read (a catch-up or a replay): it never
/// runs ahead of its client by more than a bounded channel, so it keeps a
/// small prefetch (librdkafka's default is up to 64 MB per consumer).
pub(crate) fn per_session(
    cfg: &KafkaConfig,
    role: &str,
    node_id: &str,
) -> KafkaResult<StreamConsumer> {
    let mut c = assigned_config(cfg, role, node_id, cfg.fetch_wait_max_ms);
    c.set("queued.max.messages.kbytes", "2048")
        .set("queued.min.messages", "1000")
        // librdkafka waits this long to fetch again once that small queue
        // is full (default 1 s): it capped a catch-up at ~2 MB/s.
        .set("fetch.queue.backoff.ms", "5");
    // User properties still win.
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c.create()
}

fn assigned_config(
    cfg: &KafkaConfig,
    role: &str,
    node_id: &str,
    fetch_wait_max_ms: u32,
) -> ClientConfig {
    let name = format!("lodestream-{role}-{node_id}");
    let mut c = super::client_config(cfg, &name);
    c.set("group.id", &name)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", fetch_wait_max_ms.to_string())
        .set("auto.offset.reset", "earliest");
    c
}

impl Record {
    /// An owned copy of a record (librdkafka's buffer is reused).
    pub(crate) fn copy_of(m: &BorrowedMessage<'_>) -> Record {
        Record {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(Bytes::copy_from_slice),
            value: m.payload().map(Bytes::copy_from_slice),
            timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
            headers: m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}
