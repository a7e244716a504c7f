//! Where in Kafka a replay on subscribe can start (`replay.rs` decides):
//! for every partition of the Kafka topics a filter reads, the log start,
//! the high watermark and the first offset at or after a time
//! (`offsets_for_times`). The read itself is the catch-up read
//! (`kafka/catchup.rs`), the one path from stored offsets to live fan-out.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;

/// One partition as a replay finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub topic: Arc<str>,
    pub partition: i32,
    pub low: i64,
    pub high: i64,
    /// First offset with a timestamp at or after the time asked (`None`:
    /// no such record yet).
    pub at_time: Option<i64>,
}

/// Looks up every partition of `topics` (metadata, watermarks, offsets for
/// `time_ms`). Blocking Kafka calls run off the runtime threads.
pub async fn partitions(
    cfg: &KafkaConfig,
    node_id: &str,
    topics: Vec<String>,
    time_ms: i64,
) -> anyhow::Result<Vec<Found>> {
    let consumer = super::consumer::per_session(cfg, "replay", node_id)?;
    tokio::task::spawn_blocking(move || lookup(&consumer, &topics, time_ms)).await?
}

fn lookup(c: &impl Consumer, topics: &[String], time_ms: i64) -> anyhow::Result<Vec<Found>> {
    let timeout = Duration::from_secs(10);
    let mut out = Vec::new();
    let mut at = TopicPartitionList::new();
    for topic in topics {
        let name: Arc<str> = Arc::from(topic.as_str());
        for (partition, low, high) in super::reader::watermarks(c, topic, timeout)? {
            at.add_partition_offset(topic, partition, Offset::Offset(time_ms))?;
            out.push(Found {
                topic: name.clone(),
                partition,
                low,
                high,
                at_time: None,
            });
        }
    }
    if out.is_empty() {
        return Ok(out);
    }
    let found = c.offsets_for_times(at, timeout)?;
    for e in found.elements() {
        // A partition Kafka could not answer for would silently lose its
        // history: refuse the replay instead (the client may ask again).
        if let Err(err) = e.error() {
            anyhow::bail!("offsets for time of {}/{}: {err}", e.topic(), e.partition());
        }
        // `End` for a partition: no record that new.
        if let Offset::Offset(o) = e.offset() {
            if let Some(f) = out
                .iter_mut()
                .find(|f| &*f.topic == e.topic() && f.partition == e.partition())
            {
                f.at_time = Some(o);
            }
        }
    }
    Ok(out)
}
