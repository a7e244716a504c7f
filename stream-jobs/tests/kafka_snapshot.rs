//! Integration test of the `fleet-snapshot` job against a real Kafka.
//!
//! Needs `LODESTREAM_KAFKA=host:port` (e.g. from `scripts/kafka-local start`);
//! without it the test prints a notice and passes without doing anything.
//!
//! Scenario: positions already in Kafka before the job starts (replayed from
//! its window), a late record that must not win, a route record that is not a
//! position, then a truck that appears while the job runs. Every truck must
//! be in the binary snapshot at its latest position, under its plate.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use stream_jobs::snapshot::{HEADER_LEN, RECORD_LEN};
use stream_jobs::snapshot_job::{run, Args};
use tokio::sync::watch;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn position(plate: &str, lat: f64, lon: f64, ts_ms: i64) -> String {
    serde_json::json!({
        "v": 1, "plate": plate, "lat": lat, "lon": lon, "next": {"lat": lat + 0.01, "lon": lon},
        "speed_kmh": 80.0, "heading_deg": 0.0, "ts_ms": ts_ms, "state": "driving"
    })
    .to_string()
}

fn expected_pos(i: usize) -> (f64, f64) {
    (40.0 + i as f64 * 0.2, 9.0 + i as f64 * 0.3)
}

/// Decoded snapshot: epoch and `(lon, lat)` per slot.
fn decode_snapshot(b: &[u8]) -> (u32, Vec<(f64, f64)>) {
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let f64_at = |o: usize| f64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let count = u32_at(8) as usize;
    assert_eq!(b.len(), HEADER_LEN + count * RECORD_LEN, "snapshot length");
    let (lon0, lat0, lon1, lat1) = (f64_at(20), f64_at(28), f64_at(36), f64_at(44));
    let pts = (0..count)
        .map(|i| {
            let o = HEADER_LEN + i * RECORD_LEN;
            let x = f64::from(u16::from_le_bytes([b[o], b[o + 1]]));
            let y = f64::from(u16::from_le_bytes([b[o + 2], b[o + 3]]));
            (
                lon0 + (lon1 - lon0) * x / 65535.0,
                lat0 + (lat1 - lat0) * y / 65535.0,
            )
        })
        .collect();
    (u32_at(4), pts)
}

fn decode_plates(b: &[u8]) -> (u32, Vec<String>) {
    let epoch = u32::from_le_bytes(b[4..8].try_into().unwrap());
    let text = std::str::from_utf8(&b[12..]).unwrap();
    (epoch, text.split('\n').map(str::to_owned).collect())
}

/// Waits until a snapshot holds `n` trucks whose plates are known; returns plate -> (lon, lat).
fn wait_for_fleet(c: &BaseConsumer, n: usize, limit: Duration) -> HashMap<String, (f64, f64)> {
    let start = Instant::now();
    let mut plates: HashMap<u32, Vec<String>> = HashMap::new();
    let mut last = 0;
    while start.elapsed() < limit {
        let Some(m) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.expect("consume");
        let payload = m.payload().expect("payload");
        match m.key() {
            Some(b"fleet/stats/plates") => {
                let (e, p) = decode_plates(payload);
                plates.insert(e, p);
            }
            Some(b"fleet/stats/snapshot") => {
                let (e, pts) = decode_snapshot(payload);
                last = pts.len();
                if let Some(names) = plates.get(&e).filter(|p| p.len() == n && pts.len() == n) {
                    return names.iter().cloned().zip(pts).collect();
                }
            }
            k => panic!("unexpected key {k:?}"),
        }
    }
    panic!("no snapshot with {n} named trucks within {limit:?} (last had {last})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_snapshot_against_real_kafka() {
    let Ok(bootstrap) = std::env::var("LODESTREAM_KAFKA") else {
        println!("LODESTREAM_KAFKA not set: skipping the Kafka integration test");
        return;
    };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (pos_topic, stats_topic) = (format!("it-snap-pos-{id}"), format!("it-snap-stats-{id}"));
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("admin");
    let topics = [
        NewTopic::new(&pos_topic, 3, TopicReplication::Fixed(1)),
        NewTopic::new(&stats_topic, 1, TopicReplication::Fixed(1)),
    ];
    for r in admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .expect("create topics")
    {
        r.expect("topic created");
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("producer");
    let send = |key: String, value: String| {
        let producer = producer.clone();
        let topic = pos_topic.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .expect("produce");
        }
    };
    let t0 = now_ms();
    for i in 0..30 {
        let (lat, lon) = expected_pos(i);
        send(
            format!("trucks/P{i:02}"),
            position(&format!("P{i:02}"), lat, lon, t0),
        )
        .await;
    }
    // Late: an older event for P01 arrives after the newer one; it must not win.
    send("trucks/P01".into(), position("P01", 10.0, 10.0, t0 - 5_000)).await;
    // A route message under the same prefix is no position.
    send(
        "trucks/P02/route".into(),
        r#"{"v":1,"coords":[[9,45],[9.1,45.1]],"ts_ms":1}"#.into(),
    )
    .await;

    let args = Args::parse_from([
        "fleet-snapshot",
        "--bootstrap",
        &bootstrap,
        "--positions-topic",
        &pos_topic,
        "--stats-topic",
        &stats_topic,
        "--interval-ms",
        "250",
        "--plates-every",
        "1",
    ]);
    let (stop, rx) = watch::channel(false);
    let job = tokio::spawn(run(args, rx));

    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "unused")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&stats_topic, 0, Offset::Beginning)
        .expect("tpl");
    reader.assign(&tpl).expect("assign");

    // Replayed from the window: all 30 trucks, each at its latest position.
    let fleet =
        tokio::task::block_in_place(|| wait_for_fleet(&reader, 30, Duration::from_secs(60)));
    for i in 0..30 {
        let (lat, lon) = expected_pos(i);
        let (glon, glat) = fleet[&format!("P{i:02}")];
        // The box spans about 6 x 9 degrees: 16 bits resolve it to 0.0002 degree.
        assert!(
            (glon - lon).abs() < 2e-4 && (glat - lat).abs() < 2e-4,
            "P{i:02}: {glon},{glat}"
        );
    }

    // A truck that appears while the job runs joins the next snapshots.
    send("trucks/P30".into(), position("P30", 41.0, 12.0, now_ms())).await;
    let fleet =
        tokio::task::block_in_place(|| wait_for_fleet(&reader, 31, Duration::from_secs(30)));
    assert!(fleet.contains_key("P30"));

    stop.send(true).expect("stop");
    job.await.expect("join").expect("job result");
}
