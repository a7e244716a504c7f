//! The own producer's idempotence against a real Kafka
//! (docs/own-producer.md; it writes the messages by default):
//! the design rests on Kafka writing a resent batch once, and on refusing
//! a sequence gap.

use crate::common;
use crate::common::kafka_instance::{kafka_local_async, StopKafka};

use std::time::Duration;

use bytes::Bytes;
use std::collections::{HashMap, HashSet};

use lodestream_broker::kafka::produce::client::{IdempotentConn, ProduceCallError};
use lodestream_broker::kafka::produce::own::OwnProducer;
use lodestream_broker::kafka::produce::request::{OutRecord, PartitionBatch};
use lodestream_broker::kafka::produce::sender::SenderConfig;
use lodestream_broker::kafka::Producer;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

const T: Duration = Duration::from_secs(30);

async fn topic_with_partitions(n: i32) -> String {
    topic_at(&common::kafka(), n).await
}

async fn topic_at(bootstrap: &str, n: i32) -> String {
    let topic = common::unique("own-producer");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin");
    let made = admin
        .create_topics(
            &[NewTopic::new(&topic, n, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create_topics");
    assert!(made.iter().all(|r| r.is_ok()), "{made:?}");
    topic
}

/// A producer id, asked again while a Kafka that just started loads its
/// transaction coordinator (COORDINATOR_LOAD_IN_PROGRESS, 14), as the own
/// producer's task does.
async fn producer() -> IdempotentConn {
    let deadline = std::time::Instant::now() + T;
    loop {
        match IdempotentConn::connect(&common::kafka(), "own-producer-test", T).await {
            Err(ProduceCallError::InitProducerId(14)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            r => return r.expect("producer id"),
        }
    }
}

fn batch(topic: &str, partition: i32, base_sequence: i32, n: usize) -> PartitionBatch {
    PartitionBatch {
        topic: topic.to_string(),
        partition,
        base_sequence,
        records: (0..n)
            .map(|i| OutRecord {
                key: Some(Bytes::from(format!("load/{partition}/{base_sequence}/{i}"))),
                value: Some(Bytes::from_static(b"x")),
                headers: vec![("mqtt.qos".into(), Bytes::from_static(b"1"))],
                timestamp_ms: 1_700_000_000_000,
            })
            .collect(),
    }
}

#[tokio::test]
async fn a_request_sent_again_after_a_lost_answer_is_written_once() {
    let topic = topic_with_partitions(3).await;
    let mut c = producer().await;
    let batches = [
        batch(&topic, 0, 0, 3),
        batch(&topic, 1, 0, 2),
        batch(&topic, 2, 0, 1),
    ];
    let mut first = c.produce(&batches).await.expect("first answer");
    first.sort_by_key(|a| a.partition);
    assert_eq!(first.len(), 3, "one answer a partition: {first:?}");
    assert!(first.iter().all(|a| a.error_code == 0), "{first:?}");
    // As after an answer lost on the way: the same request, unchanged.
    let mut again = c.produce(&batches).await.expect("second answer");
    again.sort_by_key(|a| a.partition);
    for (a, b) in first.iter().zip(&again) {
        // Kafka 4.3 answers a duplicate of one of the producer's last five
        // batches with success and the first write's offset (seen here);
        // older brokers said DUPLICATE_SEQUENCE_NUMBER (46).
        assert!(b.error_code == 0 || b.error_code == 46, "{b:?}");
        if b.error_code == 0 {
            assert_eq!(b.base_offset, a.base_offset, "{b:?}");
        }
    }
    let records = common::read_topic(&topic, 7, Duration::from_secs(8));
    assert_eq!(records.len(), 6, "each record once");
}

#[tokio::test]
async fn sequences_continue_after_a_write_and_a_gap_is_refused() {
    let topic = topic_with_partitions(1).await;
    let mut c = producer().await;
    let ok = c.produce(&[batch(&topic, 0, 0, 3)]).await.expect("answer");
    assert_eq!(ok[0].error_code, 0);
    let next = c.produce(&[batch(&topic, 0, 3, 2)]).await.expect("answer");
    assert_eq!((next[0].error_code, next[0].base_offset), (0, 3));
    // Sequence 10 where 5 is due: OUT_OF_ORDER_SEQUENCE_NUMBER (45).
    let gap = c.produce(&[batch(&topic, 0, 10, 1)]).await.expect("answer");
    assert_eq!(gap[0].error_code, 45, "{gap:?}");
    let records = common::read_topic(&topic, 6, Duration::from_secs(8));
    assert_eq!(records.len(), 5, "the refused batch is not written");
}

#[tokio::test]
async fn a_bumped_epoch_starts_again_at_sequence_zero() {
    let topic = topic_with_partitions(1).await;
    let mut c = producer().await;
    let ok = c.produce(&[batch(&topic, 0, 0, 2)]).await.expect("answer");
    assert_eq!(ok[0].error_code, 0);
    assert!(c.bump_epoch());
    // A new epoch that does not start at 0: OUT_OF_ORDER_SEQUENCE_NUMBER.
    let wrong = c.produce(&[batch(&topic, 0, 2, 1)]).await.expect("answer");
    assert_eq!(wrong[0].error_code, 45, "{wrong:?}");
    let fresh = c.produce(&[batch(&topic, 0, 0, 1)]).await.expect("answer");
    assert_eq!(
        (fresh[0].error_code, fresh[0].base_offset),
        (0, 2),
        "{fresh:?}"
    );
    let records = common::read_topic(&topic, 4, Duration::from_secs(8));
    assert_eq!(records.len(), 3);
}

fn own(delivery_timeout: Duration) -> OwnProducer {
    own_at(&common::kafka(), delivery_timeout)
}

/// The own producer, unlingering, writing to the Kafka at `bootstrap`.
fn own_at(bootstrap: &str, delivery_timeout: Duration) -> OwnProducer {
    OwnProducer::spawn(bootstrap, "own-producer-test", config(delivery_timeout))
}

fn config(delivery_timeout: Duration) -> SenderConfig {
    SenderConfig {
        delivery_timeout,
        max_batch_records: 500,
        retry_backoff: Duration::from_millis(50),
        linger: Duration::ZERO,
        max_bytes: 1 << 20,
        request_timeout: T,
    }
}

/// A connection hands a PUBLISH over without waiting while the producer
/// has room (`try_send`). At its bound of bytes it is told to wait, and
/// `send` then waits until a write is settled and frees the room: the
/// bound holds on both paths, and nothing is dropped at it.
#[tokio::test]
async fn try_send_refuses_at_the_bound_of_bytes_and_send_waits_for_room() {
    let topic = topic_with_partitions(1).await;
    // Every record takes the whole room (a record's share is clamped to it).
    let cfg = SenderConfig {
        max_bytes: 1,
        ..config(T)
    };
    let producer = OwnProducer::spawn(&common::kafka(), "own-producer-test", cfg);
    let first = producer
        .try_send(topic.as_str(), record("a".into()), false)
        .expect("room for the first write")
        .expect("handed over");
    assert!(
        producer
            .try_send(topic.as_str(), record("b".into()), false)
            .is_none(),
        "no room while the first write is unsettled"
    );
    let second = tokio::time::timeout(T, producer.send(topic.as_str(), record("b".into()), false))
        .await
        .expect("room freed once the first write settled")
        .expect("handed over");
    let a = Producer::delivered(first).await.expect("first written");
    let b = Producer::delivered(second).await.expect("second written");
    assert!(b.offset > a.offset, "in order: {a:?} then {b:?}");
    let records = common::read_topic(&topic, 3, Duration::from_secs(10));
    let keys: Vec<_> = records.iter().filter_map(|r| r.key.clone()).collect();
    assert_eq!(keys, ["a", "b"], "each write once, in order");
}

fn record(key: String) -> OutRecord {
    OutRecord {
        key: Some(Bytes::from(key)),
        value: Some(Bytes::from_static(b"x")),
        headers: Vec::new(),
        timestamp_ms: 1_700_000_000_000,
    }
}

#[tokio::test]
async fn concurrent_writes_through_the_own_producer_land_once_each_with_their_offsets() {
    let topic = topic_with_partitions(3).await;
    let producer = own(T);
    let mut clients = Vec::new();
    for c in 0..50 {
        let (producer, topic) = (producer.clone(), topic.clone());
        clients.push(tokio::spawn(async move {
            let mut landed = Vec::new();
            for i in 0..100 {
                let key = format!("c{c}/{i}");
                let report = producer
                    .send(topic.as_str(), record(key.clone()), false)
                    .await
                    .expect("handed over");
                landed.push((key, Producer::delivered(report).await.expect("written")));
            }
            landed
        }));
    }
    let mut seen = HashSet::new();
    let mut partition_of = HashMap::new();
    for c in clients {
        for (key, p) in c.await.expect("client") {
            assert!(
                p.offset >= 0 && seen.insert((p.partition, p.offset)),
                "offset given twice: {p:?}"
            );
            partition_of.insert(key, p.partition);
        }
    }
    let records = common::read_topic(&topic, 5001, Duration::from_secs(10));
    let keys: HashSet<_> = records.iter().map(|r| r.key.clone()).collect();
    assert_eq!((records.len(), keys.len()), (5000, 5000), "each write once");
    for r in &records {
        let key = r.key.clone().unwrap_or_default();
        assert_eq!(
            partition_of.get(&key),
            Some(&r.partition),
            "{key}: reported partition"
        );
    }
}

/// Nodes writing with either producer must put a key on the same
/// partition, or its records would lose their order.
#[tokio::test]
async fn keys_land_on_the_partitions_librdkafka_picks() {
    let topic = topic_with_partitions(7).await;
    let mut cfg = common::test_config(&[]).kafka;
    cfg.bootstrap_servers = common::kafka();
    let librdkafka = Producer::new(&cfg, "partitioner-test").expect("librdkafka producer");
    let ours = own(T);
    for i in 0..40 {
        let key = format!("trucks/{i:03}XY");
        let theirs = librdkafka
            .send(&topic, key.as_bytes(), Some(b"x"), &[])
            .await
            .expect("handed over");
        let theirs = Producer::delivered(theirs).await.expect("written");
        let mine = ours
            .send(topic.as_str(), record(key.clone()), false)
            .await
            .expect("handed over");
        let mine = Producer::delivered(mine).await.expect("written");
        assert_eq!(mine.partition, theirs.partition, "{key}");
    }
}

#[tokio::test]
async fn a_write_to_a_topic_kafka_refuses_fails_at_the_delivery_timeout() {
    let producer = own(Duration::from_secs(2));
    let started = std::time::Instant::now();
    // Not a legal topic name: Kafka neither has nor creates it.
    let report = producer
        .send("no such topic!", record("k".into()), false)
        .await
        .expect("handed over");
    let outcome = tokio::time::timeout(Duration::from_secs(20), Producer::delivered(report))
        .await
        .expect("an outcome, not a hang");
    assert!(outcome.is_err(), "{outcome:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "not before the timeout"
    );
}

/// Kafka forgets an idle producer after `producer.id.expiration.ms`. The
/// next write carries the sequence numbers where they left off: Kafka
/// 4.3.1 takes them from a producer it no longer knows (KIP-360), and a
/// Kafka that answered `UNKNOWN_PRODUCER_ID` would make the producer bump
/// its epoch (`sequence.rs`). Either way every write lands, once. A Kafka
/// of its own (port 19596) forgets producers after 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_kafka_forgot_the_producer_land_once() {
    const PORT: u16 = 19596;
    const DIR: &str = "kafka-forget-test";
    common::init_test_log();
    let forget = vec![(
        "KAFKA_EXTRA_CONFIG",
        "producer.id.expiration.ms=1000\nproducer.id.expiration.check.interval.ms=200".to_string(),
    )];
    assert!(kafka_local_async(PORT, DIR, "reset", vec![]).await);
    assert!(kafka_local_async(PORT, DIR, "start", forget).await);
    let _stop = StopKafka(PORT, DIR);
    let bootstrap = format!("127.0.0.1:{PORT}");
    let topic = topic_at(&bootstrap, 1).await;
    let producer = own_at(&bootstrap, T);
    let mut offsets = HashSet::new();
    for round in 0..3 {
        for i in 0..5 {
            let key = format!("r{round}/{i}");
            let report = producer
                .send(topic.as_str(), record(key), false)
                .await
                .expect("handed over");
            let p = Producer::delivered(report).await.expect("written");
            assert!(offsets.insert(p.offset), "offset {} twice", p.offset);
        }
        // Past the expiration and two of its checks: Kafka forgets us.
        tokio::time::sleep(Duration::from_millis(1800)).await;
    }
    let records = common::read_topic_at(&bootstrap, &topic, 16, Duration::from_secs(10));
    let keys: HashSet<_> = records.iter().map(|r| r.key.clone()).collect();
    assert_eq!((records.len(), keys.len()), (15, 15), "each write once");
}
