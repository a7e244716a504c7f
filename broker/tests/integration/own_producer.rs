//! The own producer's idempotence against a real Kafka
//! (docs/own-producer.md, work in progress on the own-producer branch):
//! the design rests on Kafka writing a resent batch once, and on refusing
//! a sequence gap.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use lodestream_broker::kafka::produce::client::IdempotentConn;
use lodestream_broker::kafka::produce::request::{OutRecord, PartitionBatch};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

const T: Duration = Duration::from_secs(30);

async fn topic_with_partitions(n: i32) -> String {
    let topic = common::unique("own-producer");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", common::kafka())
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

async fn producer() -> IdempotentConn {
    IdempotentConn::connect(&common::kafka(), "own-producer-test", T)
        .await
        .expect("producer id")
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

#[tokio::test]
async fn concurrent_writes_through_one_sender_land_once_each_with_their_offsets() {
    use lodestream_broker::kafka::produce::sender::{self, SenderConfig, Write};
    use std::collections::HashSet;
    use std::sync::Arc;
    use tokio::sync::{mpsc, oneshot};

    let topic = topic_with_partitions(3).await;
    let (tx, rx) = mpsc::channel::<Write>(1024);
    let cfg = SenderConfig {
        delivery_timeout: T,
        max_batch_records: 500,
        retry_backoff: Duration::from_millis(50),
        linger: Duration::ZERO,
    };
    let sender = tokio::spawn(sender::run(producer().await, rx, cfg));
    let name: Arc<str> = Arc::from(topic.as_str());
    let mut clients = Vec::new();
    for c in 0..50i32 {
        let (tx, name) = (tx.clone(), name.clone());
        clients.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            for i in 0..100 {
                let (done, outcome) = oneshot::channel();
                let record = OutRecord {
                    key: Some(Bytes::from(format!("c{c}/{i}"))),
                    value: Some(Bytes::from_static(b"x")),
                    headers: Vec::new(),
                    timestamp_ms: 1_700_000_000_000,
                };
                let partition = c % 3;
                let w = Write {
                    topic: name.clone(),
                    partition,
                    record,
                    done,
                };
                tx.send(w).await.expect("sender runs");
                let offset = outcome.await.expect("answered").expect("written");
                offsets.push((partition, offset));
            }
            offsets
        }));
    }
    drop(tx);
    let mut seen = HashSet::new();
    for c in clients {
        for po in c.await.expect("client") {
            assert!(po.1 >= 0 && seen.insert(po), "offset given twice: {po:?}");
        }
    }
    sender.await.expect("sender ends once its writers are gone");
    let records = common::read_topic(&topic, 5001, Duration::from_secs(10));
    let keys: HashSet<_> = records.iter().map(|r| r.key.clone()).collect();
    assert_eq!((records.len(), keys.len()), (5000, 5000), "each write once");
}

#[tokio::test]
async fn concurrent_writes_that_take_turns_sending_land_once_each() {
    use lodestream_broker::kafka::produce::sender::{Combined, SenderConfig};
    use std::collections::HashSet;
    use std::sync::Arc;

    let topic = topic_with_partitions(3).await;
    let cfg = SenderConfig {
        delivery_timeout: T,
        max_batch_records: 500,
        retry_backoff: Duration::from_millis(50),
        linger: Duration::ZERO,
    };
    let combined = Arc::new(Combined::new(producer().await, cfg));
    let name: Arc<str> = Arc::from(topic.as_str());
    let mut clients = Vec::new();
    for c in 0..50i32 {
        let (combined, name) = (combined.clone(), name.clone());
        clients.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            for i in 0..100 {
                let record = OutRecord {
                    key: Some(Bytes::from(format!("c{c}/{i}"))),
                    value: Some(Bytes::from_static(b"x")),
                    headers: Vec::new(),
                    timestamp_ms: 1_700_000_000_000,
                };
                let offset = combined
                    .write(name.clone(), c % 3, record)
                    .await
                    .expect("written");
                offsets.push((c % 3, offset));
            }
            offsets
        }));
    }
    let mut seen = HashSet::new();
    for c in clients {
        for po in c.await.expect("client") {
            assert!(po.1 >= 0 && seen.insert(po), "offset given twice: {po:?}");
        }
    }
    let records = common::read_topic(&topic, 5001, Duration::from_secs(10));
    let keys: HashSet<_> = records.iter().map(|r| r.key.clone()).collect();
    assert_eq!((records.len(), keys.len()), (5000, 5000), "each write once");
}
