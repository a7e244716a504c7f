//! Reads every partition of one Kafka topic, outside any consumer group, and
//! hands each record to a callback. A node runs one reader per Kafka topic
//! that its subscriptions need (fan-out happens in the callback), and one
//! for the retained-message topic.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;

use crate::config::KafkaConfig;
use crate::mapping::Mapping;
use crate::message::{Message, NotAMessage};
use crate::metrics::Metrics;
use crate::retry::Retry;
use crate::session::mailbox::Wakes;

/// At most this many records already fetched are handed over before the
/// receivers they were sent to are woken (`Wakes`): a bound on how long a
/// subscriber waits for the first of them (a few hundred µs).
const READY_BATCH: usize = 256;

/// A record as the reader hands it over (owned: librdkafka's buffer is reused).
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub timestamp_ms: i64,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    /// The MQTT message this record carries (see `Message::try_from_record`).
    /// `mapping` turns a key made by a rule's key template back into its
    /// topic; without it (the retained topic) the key is the topic.
    pub fn message(&self, mapping: Option<&Mapping>) -> Result<Message, NotAMessage> {
        Message::try_from_record(
            self.key.as_deref(),
            self.value.clone().unwrap_or_default(),
            self.timestamp_ms,
            self.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())),
            |key| topic_of_key(mapping, &self.topic, key),
        )
    }
}

/// The MQTT message a fetched record carries, read from librdkafka's
/// buffer: only the payload is copied. Going through an owned `Record`
/// cost an allocation for the topic, the key and each header name and
/// value of every record on the delivery path.
pub fn message_of(
    m: &BorrowedMessage<'_>,
    mapping: Option<&Mapping>,
) -> Result<Message, NotAMessage> {
    let hs = m.headers();
    let headers = (0..hs.map_or(0, |h| h.count()))
        .filter_map(move |i| hs.and_then(|h| h.try_get(i)))
        .map(|h| (h.key, h.value));
    Message::try_from_record(
        m.key(),
        m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
        m.timestamp().to_millis().unwrap_or(0),
        headers,
        |key| topic_of_key(mapping, m.topic(), key),
    )
}

fn topic_of_key<'a>(mapping: Option<&Mapping>, kafka_topic: &str, key: &'a str) -> Cow<'a, str> {
    match mapping {
        Some(m) => m.topic_for_key(kafka_topic, key),
        None => Cow::Borrowed(key),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// Each partition's high watermark when the reader starts: records
    /// written after `start` returns are all seen.
    End,
    Beginning,
}

pub struct TopicReader {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TopicReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type StartOffsets = (TopicPartitionList, HashMap<i32, i64>, HashMap<i32, i64>);

/// `(partition, low, high)` watermarks of every partition of `topic`.
/// Blocking calls, each within `timeout`.
pub(super) fn watermarks(
    c: &impl Consumer,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let md = c.fetch_metadata(Some(topic), timeout)?;
    let t = md
        .topics()
        .first()
        .ok_or_else(|| anyhow::anyhow!("no metadata for Kafka topic {topic}"))?;
    if let Some(e) = t.error() {
        anyhow::bail!("Kafka topic {topic}: {e:?}");
    }
    t.partitions()
        .iter()
        .map(|p| {
            let (low, high) = c.fetch_watermarks(topic, p.id(), timeout)?;
            Ok((p.id(), low, high))
        })
        .collect()
}

/// The assignment for every partition of `topic`, the high watermarks to
/// reach for "caught up", and the start offsets. Blocking calls.
fn start_offsets(c: &StreamConsumer, topic: &str, from: StartAt) -> anyhow::Result<StartOffsets> {
    let mut tpl = TopicPartitionList::new();
    let mut targets = HashMap::new();
    let mut starts = HashMap::new();
    for (partition, low, high) in watermarks(c, topic, Duration::from_secs(15))? {
        let start = match from {
            StartAt::End => high,
            StartAt::Beginning => low,
        };
        tpl.add_partition_offset(topic, partition, Offset::Offset(start))?;
        starts.insert(partition, start);
        if high > start {
            targets.insert(partition, high);
        }
    }
    if tpl.count() == 0 {
        anyhow::bail!("Kafka topic {topic} has no partitions");
    }
    Ok((tpl, targets, starts))
}

/// A reader's start offsets are retried for up to 10 s: right after topic
/// creation a partition may have no leader yet.
fn start_retry(metrics: &Metrics) -> Retry {
    Retry::fixed(
        "reader_start",
        40,
        Duration::from_millis(250),
        &metrics.retry_give_ups,
    )
}

/// A consumer for `topic` and where `from` puts each partition
/// (`start_offsets`), retried as `start_retry` says.
async fn positions(
    cfg: &KafkaConfig,
    node_id: &str,
    topic: &str,
    from: StartAt,
    metrics: &Metrics,
) -> anyhow::Result<(
    Arc<StreamConsumer>,
    TopicPartitionList,
    HashMap<i32, i64>,
    HashMap<i32, i64>,
)> {
    let role = format!("reader-{topic}");
    let consumer = Arc::new(super::consumer::assigned(
        cfg,
        &role,
        node_id,
        cfg.fetch_wait_max_ms,
    )?);
    let (tpl, targets, starts) = start_retry(metrics)
        .run(topic, || {
            let (c, t) = (consumer.clone(), topic.to_string());
            // Metadata and watermark calls block; keep them off the runtime threads.
            async move {
                tokio::task::spawn_blocking(move || start_offsets(&c, &t, from))
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r)
            }
        })
        .await?;
    Ok((consumer, tpl, targets, starts))
}

/// The MQTT message a record read by the own fetch client carries. The
/// payload is copied: a slice would pin the whole fetch response (up to
/// 16 MiB) for as long as any subscriber's queue holds the message.
pub fn message_of_fetched(
    r: &super::fetch::Fetched,
    kafka_topic: &str,
    mapping: Option<&Mapping>,
) -> Result<Message, NotAMessage> {
    Message::try_from_record(
        r.key.as_deref(),
        r.value
            .as_deref()
            .map(Bytes::copy_from_slice)
            .unwrap_or_default(),
        r.timestamp,
        // A header name that is not UTF-8 is dropped, as librdkafka's
        // `Headers::try_get` does with a bad one.
        r.headers
            .iter()
            .filter_map(|(k, v)| Some((std::str::from_utf8(k).ok()?, v.as_deref()))),
        |key| topic_of_key(mapping, kafka_topic, key),
    )
}

/// What a fan-out reader hands over per record: the offset and the
/// message (or why the record carries none). One call gets one partition's
/// records in offset order: a record batch's, or one record from librdkafka.
pub type FanoutRecord = (i64, Result<Message, NotAMessage>);

impl TopicReader {
    /// Reads a data topic for fan-out from its end: with the own fetch
    /// client when it can reach Kafka (`kafka::fetch::usable`), else with
    /// librdkafka. Returns the reader and each partition's start offset.
    pub async fn start_fanout<F>(
        cfg: &KafkaConfig,
        node_id: &str,
        topic: &str,
        metrics: &Metrics,
        mapping: Mapping,
        mut on_records: F,
    ) -> anyhow::Result<(TopicReader, HashMap<i32, i64>)>
    where
        F: FnMut(i32, &mut dyn Iterator<Item = FanoutRecord>, &mut Wakes) + Send + 'static,
    {
        if !super::fetch::usable(cfg) {
            let (reader, _, starts) = Self::start(
                cfg,
                node_id,
                topic,
                StartAt::End,
                metrics,
                move |m, wakes| {
                    let msg = message_of(m, Some(&mapping));
                    on_records(
                        m.partition(),
                        &mut std::iter::once((m.offset(), msg)),
                        wakes,
                    );
                },
            )
            .await?;
            return Ok((reader, starts));
        }
        let starts = start_retry(metrics)
            .run(topic, || super::fetch::end_offsets(cfg, node_id, topic))
            .await?;
        let kafka_topic = topic.to_string();
        let task = super::fetch::spawn(cfg, node_id, topic, starts.clone(), move |p, rs, wakes| {
            let mut msgs = rs.iter().map(|r| {
                (
                    r.offset,
                    message_of_fetched(r, &kafka_topic, Some(&mapping)),
                )
            });
            on_records(p, &mut msgs, wakes);
        });
        Ok((TopicReader { task }, starts))
    }
}

impl TopicReader {
    /// Assigns all partitions of `topic` and starts reading. Returns after
    /// the start offsets are fixed, plus a signal fired once the reader has
    /// caught up with the high watermarks seen at start. `on_record` gets
    /// each record in librdkafka's buffer (`Record::copy_of` keeps one) and
    /// may leave the wake-ups of what it sends to `Wakes`, flushed once the
    /// records fetched so far (at most `READY_BATCH`) are handed over.
    pub async fn start<F>(
        cfg: &KafkaConfig,
        node_id: &str,
        topic: &str,
        from: StartAt,
        metrics: &Metrics,
        mut on_record: F,
    ) -> anyhow::Result<(TopicReader, oneshot::Receiver<()>, HashMap<i32, i64>)>
    where
        F: FnMut(&BorrowedMessage<'_>, &mut Wakes) + Send + 'static,
    {
        let (consumer, tpl, mut targets, starts) =
            positions(cfg, node_id, topic, from, metrics).await?;
        consumer.assign(&tpl)?;
        let (caught_up_tx, caught_up_rx) = oneshot::channel();
        let mut caught_up_tx = Some(caught_up_tx);
        if targets.is_empty() {
            if let Some(tx) = caught_up_tx.take() {
                let _ = tx.send(());
            }
        }
        let topic_name = topic.to_string();
        let task = tokio::spawn(async move {
            let mut stream = consumer.stream();
            let mut wakes = Wakes::default();
            let mut hand_over = |item: rdkafka::error::KafkaResult<BorrowedMessage<'_>>,
                                 wakes: &mut Wakes| {
                let m = match item {
                    Ok(m) => m,
                    Err(e) => {
                        // librdkafka keeps retrying on its own; log and go on.
                        tracing::warn!(topic = %topic_name, error = %e, "Kafka read error");
                        return;
                    }
                };
                let (p, o) = (m.partition(), m.offset());
                on_record(&m, wakes);
                if targets.get(&p).is_some_and(|t| o + 1 >= *t) {
                    targets.remove(&p);
                }
                if targets.is_empty() {
                    if let Some(tx) = caught_up_tx.take() {
                        let _ = tx.send(());
                    }
                }
            };
            while let Some(item) = stream.next().await {
                hand_over(item, &mut wakes);
                // What librdkafka has already fetched goes out before anyone
                // is woken. A pending poll leaves no waker behind that
                // matters: the next `next().await` looks at the queue first.
                for _ in 1..READY_BATCH {
                    match stream.next().now_or_never() {
                        Some(Some(item)) => hand_over(item, &mut wakes),
                        _ => break,
                    }
                }
                wakes.flush();
            }
        });
        Ok((TopicReader { task }, caught_up_rx, starts))
    }
}
