//! Integration test of the `directions` job against a real Kafka.
//!
//! Needs `LODESTREAM_KAFKA=host:port` (e.g. from `scripts/kafka-local start`);
//! without it the test prints a notice and passes without doing anything.
//!
//! Scenario: produce a known fleet (including out-of-order, duplicate and
//! stale records) into a 3-partition topic, run one instance, then scale to
//! two instances, then stop the first one. Every snapshot published after the
//! first complete one must carry exactly the expected counts: rebalances may
//! delay numbers but must never publish wrong ones.

mod common;

use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use stream_jobs::agg::{Counts, DirectionStats};
use stream_jobs::directions::{run, Args};
use tokio::sync::watch;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn position(plate: &str, heading: f64, speed: f64, state: &str, ts_ms: i64) -> String {
    serde_json::json!({
        "v": 1, "plate": plate, "lat": 45.0, "lon": 9.0,
        "next": {"lat": 45.1, "lon": 9.1}, "speed_kmh": speed, "heading_deg": heading,
        "ts": "2025-11-24T10:00:00Z", "ts_ms": ts_ms, "state": state
    })
    .to_string()
}

struct Instance {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn start_instance(bootstrap: &str, suffix: &str) -> Instance {
    let args = Args::parse_from([
        "directions",
        "--bootstrap",
        bootstrap,
        "--positions-topic",
        &format!("it-pos-{suffix}"),
        "--stats-topic",
        &format!("it-stats-{suffix}"),
        "--partials-topic",
        &format!("it-partials-{suffix}"),
        "--group",
        &format!("it-group-{suffix}"),
        "--interval-ms",
        "250",
        "--stale-after-s",
        "90",
        "--replication",
        "1",
    ]);
    let (stop, rx) = watch::channel(false);
    let handle = tokio::spawn(run(args, rx));
    Instance { stop, handle }
}

/// Reads every stats snapshot published so far (and until `until`).
struct StatsReader {
    consumer: BaseConsumer,
}

impl StatsReader {
    fn new(bootstrap: &str, topic: &str) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "unused")
            .set("enable.auto.commit", "false")
            .create()
            .expect("stats consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .expect("tpl");
        consumer.assign(&tpl).expect("assign");
        StatsReader { consumer }
    }

    fn next(&self, timeout: Duration) -> Option<DirectionStats> {
        match self.consumer.poll(timeout)? {
            Ok(m) => {
                assert_eq!(m.key(), Some(&b"fleet/stats/directions"[..]));
                let v = serde_json::from_slice(m.payload().expect("payload")).expect("stats JSON");
                Some(v)
            }
            Err(e) => panic!("stats consume error: {e}"),
        }
    }

    /// Waits for the first snapshot equal to `want`; returns how long it took.
    fn wait_for(&self, want: &Counts, limit: Duration) -> Duration {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < limit {
            if let Some(s) = self.next(Duration::from_millis(200)) {
                if &s.counts == want {
                    return start.elapsed();
                }
                last = Some(s);
            }
        }
        panic!("no snapshot with {want:?} within {limit:?}; last seen {last:?}");
    }

    /// Every snapshot during `period` must equal `want`; returns how many.
    fn all_equal(&self, want: &Counts, period: Duration) -> usize {
        let start = Instant::now();
        let mut n = 0;
        while start.elapsed() < period {
            if let Some(s) = self.next(Duration::from_millis(200)) {
                assert_eq!(&s.counts, want, "snapshot {n} after {:?}", start.elapsed());
                assert_eq!(s.trucks, want.total());
                n += 1;
            }
        }
        n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn directions_against_real_kafka() {
    let Ok(bootstrap) = std::env::var("LODESTREAM_KAFKA") else {
        println!("LODESTREAM_KAFKA not set: skipping the Kafka integration test");
        return;
    };
    // RUST_LOG=stream_jobs=info shows the rebalances while the test runs.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let suffix = format!("{}", uuid::Uuid::new_v4().simple());
    let pos_topic = format!("it-pos-{suffix}");
    common::create_topic(&bootstrap, &pos_topic, 3).await;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let now = now_ms();
    let mut recs: Vec<(String, String, Option<i64>)> = Vec::new();
    // A truck last heard of long before the window: must not count, whether
    // it is skipped by the offsets_for_times seek (first) or on ingest (later).
    recs.push((
        "trucks/OLD0001".into(),
        position("OLD0001", 0.0, 50.0, "driving", now - 200_000),
        Some(now - 200_000),
    ));
    let mut want = Counts::default();
    // 3 trucks per sector, headings at the sector centre and both edges.
    for (i, centre) in [0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0]
        .iter()
        .enumerate()
    {
        for (j, off) in [-22.5, 0.0, 22.4].iter().enumerate() {
            let plate = format!("S{i}{j}");
            recs.push((
                format!("trucks/{plate}"),
                position(&plate, centre + off, 60.0, "driving", now),
                None,
            ));
        }
    }
    want.n = 3;
    want.ne = 3;
    want.e = 3;
    want.se = 3;
    want.s = 3;
    want.sw = 3;
    want.w = 3;
    want.nw = 3;
    // Stopped: resting (even with speed), and driving below 1 km/h.
    for i in 0..4 {
        let plate = format!("R{i}");
        recs.push((
            format!("trucks/{plate}"),
            position(&plate, 90.0, 80.0, "resting", now),
            None,
        ));
    }
    recs.push((
        "trucks/SLOW1".into(),
        position("SLOW1", 90.0, 0.5, "driving", now),
        None,
    ));
    want.stopped = 5;
    // Out of order: the newer record (heading E) arrives first, an older one
    // (heading W) later, plus a duplicate of the newer one. E must win.
    recs.push((
        "trucks/OOO1".into(),
        position("OOO1", 90.0, 70.0, "driving", now + 1),
        None,
    ));
    recs.push((
        "trucks/OOO1".into(),
        position("OOO1", 270.0, 70.0, "driving", now - 5_000),
        None,
    ));
    recs.push((
        "trucks/OOO1".into(),
        position("OOO1", 90.0, 70.0, "driving", now + 1),
        None,
    ));
    want.e += 1;
    // A stale record after fresh ones in the same partitions.
    recs.push((
        "trucks/OLD0002".into(),
        position("OLD0002", 0.0, 50.0, "driving", now - 200_000),
        Some(now - 200_000),
    ));

    for (key, value, ts) in &recs {
        let mut r = FutureRecord::to(&pos_topic).key(key).payload(value);
        if let Some(ts) = ts {
            r = r.timestamp(*ts);
        }
        producer
            .send(r, Duration::from_secs(10))
            .await
            .expect("produce position");
    }
    println!("produced {} records; expecting {want:?}", recs.len());

    let a = start_instance(&bootstrap, &suffix);
    // The job creates the stats topic; give it a moment before assigning.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reader = StatsReader::new(&bootstrap, &format!("it-stats-{suffix}"));
    let (first, steady) = tokio::task::block_in_place(|| {
        let first = reader.wait_for(&want, Duration::from_secs(60));
        (first, reader.all_equal(&want, Duration::from_secs(3)))
    });
    println!(
        "one instance: first correct snapshot after {first:?}; {steady} correct snapshots in 3 s"
    );

    // Scale out: the second instance takes some partitions (cooperative
    // rebalance); the totals must stay exact throughout.
    let b = start_instance(&bootstrap, &suffix);
    let during = tokio::task::block_in_place(|| reader.all_equal(&want, Duration::from_secs(15)));
    println!("two instances: {during} snapshots in 15 s, all correct");

    // Stop the first instance (it also owns the merge stage): B takes over
    // every partition and the merge stage.
    let _ = a.stop.send(true);
    a.handle.await.expect("join a").expect("instance a");
    let after = tokio::task::block_in_place(|| {
        // The merge fail-over may pause publishing briefly; every snapshot
        // that is published must still be exact.
        reader.all_equal(&want, Duration::from_secs(20))
    });
    assert!(after > 0, "instance b never took over publishing");
    println!("after stopping instance a: {after} snapshots in 20 s, all correct");

    let _ = b.stop.send(true);
    b.handle.await.expect("join b").expect("instance b");
}
