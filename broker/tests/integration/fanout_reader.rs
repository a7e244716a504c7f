//! The fan-out reader delivers what a Kafka consumer in `read_committed`
//! would see, whichever client reads (the own fetch client, `kafka/fetch/`,
//! or librdkafka with `kafka.native_fetch = false`): records of every
//! compression codec librdkafka can write, and of transactions only once committed.

use crate::common;
use crate::common::packets::{self, IntoPacket};
use crate::common::raw::Raw;

use std::time::Duration;

use lodestream_mqtt::{Packet, ProtocolVersion, QoS};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

async fn start(native_fetch: bool, topic: &str) -> common::Broker {
    let mut c = common::test_config(&[format!("{topic}:fleet/#")]);
    c.kafka.native_fetch = native_fetch;
    common::start_with(c).await
}

async fn subscriber(b: &common::Broker) -> Raw {
    let mut r = Raw::connect(b.addr()).await;
    let id = common::unique("fanout-sub");
    r.send(&packets::connect(ProtocolVersion::V5, &id).packet())
        .await;
    assert!(matches!(r.recv().await, Some(Packet::ConnAck(_))));
    r.send(&Packet::Subscribe(packets::subscribe(
        1,
        "fleet/#",
        QoS::AtMostOnce,
    )))
    .await;
    assert!(matches!(r.recv().await, Some(Packet::SubAck(_))));
    r
}

/// Payloads of the PUBLISHes that arrive until `quiet` passes without one.
async fn received(r: &mut Raw, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while let Some(p) = r.recv_within(quiet).await {
        if let Packet::Publish(p) = p {
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    got
}

fn producer(extra: &[(&str, &str)]) -> FutureProducer {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", common::kafka());
    for (k, v) in extra {
        c.set(*k, *v);
    }
    c.create().expect("producer")
}

async fn send(p: &FutureProducer, topic: &str, payload: &str) {
    p.send(
        FutureRecord::to(topic)
            .key("fleet/truck/1")
            .payload(payload),
        Duration::from_secs(10),
    )
    .await
    .expect("produce");
}

async fn every_codec_is_delivered(native_fetch: bool) {
    let topic = common::unique("fanoutCodecs");
    let b = start(native_fetch, &topic).await;
    let mut s = subscriber(&b).await;
    let mut want = Vec::new();
    // zstd: this librdkafka build has none; `kafka/fetch/batches.rs`'s
    // unit tests decode it.
    for codec in ["none", "gzip", "snappy", "lz4"] {
        // A linger so that several records share one (compressed) batch.
        let p = producer(&[("compression.type", codec), ("linger.ms", "50")]);
        let sends: Vec<String> = (0..5).map(|i| format!("{codec}-{i}")).collect();
        futures::future::join_all(sends.iter().map(|m| send(&p, &topic, m))).await;
        want.extend(sends);
    }
    assert_eq!(received(&mut s, Duration::from_secs(2)).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compression_codec_reaches_subscribers_own_fetch_client() {
    every_codec_is_delivered(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compression_codec_reaches_subscribers_librdkafka() {
    every_codec_is_delivered(false).await;
}

/// Records arriving at 4 MiB/s or more make the next fetch wait for more
/// records (`kafka/fetch/pace.rs`): a burst still arrives whole and in
/// order, and the lone record after it is not held back for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_arrives_whole_and_in_order_and_the_record_after_it_too() {
    let topic = common::unique("fanoutBusy");
    let mut c = common::test_config(&[format!("{topic}:fleet/#")]);
    // Empty fetches end every 20 ms, so a 400 KB burst lands in a fetch
    // measured over at most 20 ms: far above the busy rate (4 MiB/s).
    c.kafka.fetch_wait_max_ms = 20;
    c.kafka.fetch_busy_wait_ms = 10;
    let b = common::start_with(c).await;
    let mut s = subscriber(&b).await;
    let p = producer(&[("linger.ms", "50")]);
    let pad = "x".repeat(1000);
    let burst: Vec<String> = (0..400).map(|i| format!("{i:03}-{pad}")).collect();
    // One key, so one partition: Kafka keeps the order.
    futures::future::join_all(burst.iter().map(|m| send(&p, &topic, m))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    send(&p, &topic, "tail").await;
    let mut want = burst;
    want.push("tail".into());
    assert_eq!(received(&mut s, Duration::from_secs(2)).await, want);
}

async fn only_committed_transactions_are_delivered(native_fetch: bool) {
    let topic = common::unique("fanoutTxn");
    let b = start(native_fetch, &topic).await;
    let mut s = subscriber(&b).await;
    let txn = producer(&[("transactional.id", &common::unique("fanout-txn"))]);
    let plain = producer(&[]);
    let t = Duration::from_secs(10);
    txn.init_transactions(t).expect("init transactions");
    txn.begin_transaction().expect("begin");
    send(&txn, &topic, "aborted-1").await;
    send(&plain, &topic, "plain-1").await;
    send(&txn, &topic, "aborted-2").await;
    txn.abort_transaction(t).expect("abort");
    txn.begin_transaction().expect("begin");
    send(&txn, &topic, "committed-1").await;
    txn.commit_transaction(t).expect("commit");
    send(&plain, &topic, "plain-2").await;
    assert_eq!(
        received(&mut s, Duration::from_secs(2)).await,
        ["plain-1", "committed-1", "plain-2"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_never_reach_subscribers_own_fetch_client() {
    only_committed_transactions_are_delivered(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_never_reach_subscribers_librdkafka() {
    only_committed_transactions_are_delivered(false).await;
}

/// The offsets the own fetch client hands over, read from `start`.
fn read_from(topic: &str, start: i64) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<i64>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let cfg = common::test_config(&[]).kafka;
    let task = lodestream_broker::kafka::fetch::spawn(
        &cfg,
        "fanout-test",
        topic,
        HashMap::from([(0, start)]),
        move |_, rs, _| g.lock().expect("lock").extend(rs.iter().map(|r| r.offset)),
    );
    (task, got)
}

async fn offsets_seen(got: &Mutex<Vec<i64>>, want: &[i64]) -> Vec<i64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        if got.lock().expect("lock").len() >= want.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    got.lock().expect("lock").clone()
}

/// A fetch offset behind the log start (records deleted, as retention
/// does) resumes at the log start; one past the log end (a truncated log)
/// resumes at the end. Neither re-reads the partition from 0 nor spins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_out_of_range_resumes_at_the_log_start_or_end() {
    let topic = common::unique("fanoutRange");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", common::kafka())
        .create()
        .expect("admin");
    let opts = AdminOptions::new();
    admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &opts,
        )
        .await
        .expect("create topic");
    let p = producer(&[]);
    for i in 0..5 {
        send(&p, &topic, &format!("m{i}")).await;
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(3))
        .expect("partition");
    admin
        .delete_records(&tpl, &opts)
        .await
        .expect("delete records");

    let (behind, got_behind) = read_from(&topic, 0);
    let (ahead, got_ahead) = read_from(&topic, 100);
    assert_eq!(offsets_seen(&got_behind, &[3, 4]).await, [3, 4]);
    // Let the reader that was ahead find the end before the next record.
    tokio::time::sleep(Duration::from_secs(2)).await;
    send(&p, &topic, "m5").await;
    assert_eq!(offsets_seen(&got_ahead, &[5]).await, [5]);
    assert_eq!(offsets_seen(&got_behind, &[3, 4, 5]).await, [3, 4, 5]);
    behind.abort();
    ahead.abort();
}

/// A reader starts at each partition's last stable offset, not its high
/// watermark: a transaction still open when the node starts is delivered
/// whole once committed, its records from before the start included, as
/// a `read_committed` Kafka consumer reset to "latest" would see it.
async fn a_transaction_open_at_start_is_delivered_whole(native_fetch: bool) {
    let topic = common::unique("fanoutOpenTxn");
    let plain = producer(&[]);
    send(&plain, &topic, "before-start").await;
    let txn = producer(&[("transactional.id", &common::unique("fanout-open"))]);
    let t = Duration::from_secs(10);
    txn.init_transactions(t).expect("init transactions");
    txn.begin_transaction().expect("begin");
    send(&txn, &topic, "open-1").await;
    let b = start(native_fetch, &topic).await;
    let mut s = subscriber(&b).await;
    send(&txn, &topic, "open-2").await;
    txn.commit_transaction(t).expect("commit");
    send(&plain, &topic, "after-commit").await;
    assert_eq!(
        received(&mut s, Duration::from_secs(2)).await,
        ["open-1", "open-2", "after-commit"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_at_start_is_delivered_whole_own_fetch_client() {
    a_transaction_open_at_start_is_delivered_whole(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_at_start_is_delivered_whole_librdkafka() {
    a_transaction_open_at_start_is_delivered_whole(false).await;
}

/// The own client's start offsets are the ends librdkafka reports for
/// every partition, once no transaction is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_offsets_match_the_high_watermarks_of_every_partition() {
    let topic = common::unique("fanoutEnds");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", common::kafka())
        .create()
        .expect("admin");
    admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
    let p = producer(&[]);
    for i in 0..7 {
        p.send(
            FutureRecord::to(&topic)
                .partition(i % 3)
                .key("k")
                .payload("v"),
            Duration::from_secs(10),
        )
        .await
        .expect("produce");
    }
    let cfg = common::test_config(&[]).kafka;
    let ends = lodestream_broker::kafka::fetch::end_offsets(&cfg, "ends-test", &topic)
        .await
        .expect("end offsets");
    assert_eq!(ends, HashMap::from([(0, 3), (1, 2), (2, 2)]));
}
