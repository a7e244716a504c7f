//! The catch-up read of a resumed session: reads the Kafka partitions its
//! subscriptions need from the session's stored offsets, hands matching
//! messages to the connection in Kafka order, and, once it has reached what
//! fan-out already dispatched, registers the session with fan-out (records
//! it has already delivered are then filtered out by offset). This is how a
//! client that reconnects to any node receives what it missed, and how a
//! replay on subscribe (`replay.rs`) reads history and switches to live.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use lodestream_mqtt::SubscriptionOptions;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::KafkaConfig;
use crate::rate_limit::TokenBucket;
use crate::session::{Delivery, Offsets, Source};
use crate::subscriptions::{delivery_for, SubEntry, SubKey, SubscriptionIndex};

/// How fast a replay reads its history.
pub struct Pace {
    /// Records per second, shared by the connection's replays.
    pub bucket: Arc<Mutex<TokenBucket>>,
    /// The high watermarks when the replay was planned: records below are
    /// the history and take a token; past them the read chases live
    /// messages, unpaced as fan-out is, so a replay always reaches live.
    pub until: Offsets,
}

pub struct CatchUp {
    pub client_id: Arc<str>,
    /// Where to start, per partition (the session's stored offsets).
    pub from: Offsets,
    /// The session's plain subscriptions (shared ones are not replayed: the
    /// group's other members got those messages).
    pub subscriptions: Vec<(String, SubscriptionOptions, Option<u32>)>,
    /// Trie entries to register once caught up (`live_from` is filled in here).
    pub entries: Vec<(String, SubKey, SubEntry)>,
    /// Filters the client unsubscribed from meanwhile: not registered.
    pub removed: Arc<Mutex<Vec<String>>>,
    /// A replay's `mqtt.replay_rate`; `None`: unpaced.
    pub pace: Option<Pace>,
    /// Register only once the connection has taken every delivery sent so
    /// far (a replay: the connection keeps delivering live messages of its
    /// other subscriptions meanwhile, so what this read sent must be in its
    /// backlog before fan-out can add live messages of this filter behind).
    pub wait_drained: bool,
}

/// Runs the catch-up; returns the offsets reached. The deliveries channel
/// is bounded: a slow client slows the read, never grows memory.
pub async fn run(
    cfg: &KafkaConfig,
    node_id: &str,
    mapping: &crate::mapping::Mapping,
    index: &SubscriptionIndex,
    job: CatchUp,
    tx: mpsc::Sender<Delivery>,
) -> anyhow::Result<Offsets> {
    let mut pos = job.from.clone();
    let consumer: Option<StreamConsumer> = if pos.is_empty() {
        None
    } else {
        let consumer = super::consumer::per_session(cfg, "catchup", node_id)?;
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &pos {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
        }
        consumer.assign(&tpl)?;
        Some(consumer)
    };
    let mut stream = consumer.as_ref().map(|c| c.stream());
    let mut last_topic: Option<Arc<str>> = None;
    let mut room = Room::new(&tx);
    loop {
        // Room held but not used would look like deliveries not taken yet.
        room.release();
        if job.wait_drained {
            drained(&tx).await?;
        }
        // Try to hand over to fan-out.
        let from = Arc::new(pos.clone());
        let entries = || live_entries(&job, &from);
        let behind = match index.register_if_caught_up(&pos, entries) {
            Ok(()) => return Ok(pos),
            Err(behind) => behind,
        };
        let Some(stream) = stream.as_mut() else {
            // Nothing to read but fan-out ahead: cannot happen without stored
            // offsets (positions only cover partitions we asked about).
            return Ok(pos);
        };
        // Read until every partition fan-out is ahead on has been passed.
        while behind
            .iter()
            .any(|(k, live)| pos.get(k).is_some_and(|p| p < live))
        {
            // A record already fetched is taken without arming a timer (a
            // timer per record was a good part of a lagging session's cost).
            let next = match stream.next().now_or_never() {
                Some(item) => Ok(item),
                None => tokio::time::timeout(Duration::from_secs(5), stream.next()).await,
            };
            let item = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "catch-up read error");
                    continue;
                }
                Ok(None) => anyhow::bail!("catch-up consumer closed"),
                Err(_) => break, // re-check positions (records may have been compacted away)
            };
            let (partition, offset) = (item.partition(), item.offset());
            // One allocation per topic, not per record.
            let topic = match last_topic.take() {
                Some(t) if *t == *item.topic() => t,
                _ => Arc::<str>::from(item.topic()),
            };
            last_topic = Some(topic.clone());
            // The same conversion as fan-out: a record fan-out would skip
            // (e.g. key `cars/+`) is skipped here too.
            let msg = super::message_of(&item, Some(mapping));
            // librdkafka's buffer is not held while the pace waits.
            drop(item);
            if let Some(pace) = &job.pace {
                let history = pace
                    .until
                    .get(&(topic.clone(), partition))
                    .is_some_and(|high| offset < *high);
                if history {
                    paced(&pace.bucket).await;
                }
            }
            pos.insert((topic.clone(), partition), offset + 1);
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(topic = %topic, offset, error = %e, "record skipped");
                    continue;
                }
            };
            if let Some(g) = delivery_for(&job.subscriptions, &job.client_id, &msg) {
                let d = Delivery {
                    msg: Arc::new(msg),
                    source: Some(Source {
                        topic,
                        partition,
                        offset,
                    }),
                    qos: g.qos,
                    retain: g.retain,
                    subscription_ids: g.subscription_ids,
                    share: None,
                };
                room.send(d).await?;
            }
        }
    }
}

/// Slots of the deliveries channel are reserved this many at a time.
const ROOM_BATCH: usize = 64;

/// Room in the deliveries channel, reserved a batch at a time. Sending one
/// at a time, the read was woken for every slot the connection freed, and
/// the two tasks took turns for every message of a lagging session: the
/// read then kept up with about 96k msg/s where fan-out delivered 125k
/// (docs/benchmarks.md).
struct Room<'a> {
    tx: &'a mpsc::Sender<Delivery>,
    permits: Option<mpsc::PermitIterator<'a, Delivery>>,
}

impl<'a> Room<'a> {
    fn new(tx: &'a mpsc::Sender<Delivery>) -> Room<'a> {
        Room { tx, permits: None }
    }

    /// Sends `d`, waiting for a batch of free slots when none is reserved.
    async fn send(&mut self, d: Delivery) -> anyhow::Result<()> {
        loop {
            if let Some(slot) = self.permits.as_mut().and_then(|p| p.next()) {
                slot.send(d);
                return Ok(());
            }
            self.permits = None;
            let n = ROOM_BATCH.min(self.tx.max_capacity());
            match self.tx.reserve_many(n).await {
                Ok(p) => self.permits = Some(p),
                Err(_) => anyhow::bail!("connection closed during catch-up"),
            }
        }
    }

    /// Gives the reserved slots back.
    fn release(&mut self) {
        self.permits = None;
    }
}

/// The entries to register, live from `from`, without the filters the
/// client unsubscribed from meanwhile.
fn live_entries(job: &CatchUp, from: &Arc<Offsets>) -> Vec<(String, SubKey, SubEntry)> {
    let removed = job.removed.lock().unwrap_or_else(|e| e.into_inner());
    job.entries
        .iter()
        .filter(|(f, k, _)| !removed.contains(&full_filter(f, k)))
        .map(|(f, k, e)| {
            let mut e = e.clone();
            e.live_from = Some(from.clone());
            (f.clone(), k.clone(), e)
        })
        .collect()
}

/// Waits until the connection has taken every delivery queued in `tx`.
async fn drained(tx: &mpsc::Sender<Delivery>) -> anyhow::Result<()> {
    while tx.capacity() < tx.max_capacity() {
        if tx.is_closed() {
            anyhow::bail!("connection closed during replay");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Takes one token, sleeping until one is free.
async fn paced(bucket: &Mutex<TokenBucket>) {
    loop {
        let wait = bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(Instant::now());
        match wait {
            Ok(()) => return,
            Err(wait) => tokio::time::sleep(wait).await,
        }
    }
}

fn full_filter(inner: &str, key: &SubKey) -> String {
    match &key.share_group {
        Some(g) => format!("{}{g}/{inner}", lodestream_mqtt::topic::SHARE_PREFIX),
        None => inner.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use lodestream_mqtt::QoS;

    fn delivery(n: u8) -> Delivery {
        Delivery {
            msg: Arc::new(Message {
                topic: "t".into(),
                payload: bytes::Bytes::from(vec![n]),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Default::default(),
                publisher: None,
                timestamp_ms: 0,
            }),
            source: None,
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: Vec::new(),
            share: None,
        }
    }

    /// A channel smaller than the batch still takes every delivery, in order.
    #[tokio::test]
    async fn room_hands_over_everything_in_order_through_a_small_channel() {
        let (tx, mut rx) = mpsc::channel::<Delivery>(3);
        let taker = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(d) = rx.recv().await {
                got.push(d.msg.payload[0]);
            }
            got
        });
        let mut room = Room::new(&tx);
        for n in 0..100 {
            room.send(delivery(n)).await.unwrap();
        }
        drop(room);
        drop(tx);
        assert_eq!(taker.await.unwrap(), (0..100).collect::<Vec<u8>>());
    }

    /// Reserved but unused slots go back on release: a replay waits for the
    /// channel to be empty (`drained`), which held slots would prevent.
    #[tokio::test]
    async fn room_gives_back_the_slots_it_did_not_use() {
        let (tx, _rx) = mpsc::channel::<Delivery>(100);
        let mut room = Room::new(&tx);
        room.send(delivery(1)).await.unwrap();
        assert_eq!(tx.capacity(), 100 - ROOM_BATCH);
        room.release();
        assert_eq!(tx.capacity(), 99);
    }

    /// Sending to a connection that has gone fails instead of waiting.
    #[tokio::test]
    async fn room_fails_once_the_connection_is_gone() {
        let (tx, rx) = mpsc::channel::<Delivery>(4);
        drop(rx);
        assert!(Room::new(&tx).send(delivery(1)).await.is_err());
    }
}
