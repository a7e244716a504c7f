//! The `directions` metrics endpoint serves real counts after the job
//! processed records from a real Kafka (`LODESTREAM_KAFKA=host:port`, e.g.
//! from `scripts/kafka-local start`; without it the test fails loudly).

mod common;

use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use stream_jobs::directions::{run_with_metrics, Args};
use stream_jobs::metrics::{serve, JobMetrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("read");
    body
}

fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_endpoint_counts_real_records() {
    let bootstrap = std::env::var("LODESTREAM_KAFKA")
        .expect("LODESTREAM_KAFKA=host:port of a running Kafka (scripts/kafka-local start)");
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let positions = format!("it-metrics-pos-{suffix}");
    common::create_topic(&bootstrap, &positions, 2).await;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("producer");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    const TRUCKS: usize = 20;
    const INVALID: usize = 3;
    for i in 0..TRUCKS + INVALID {
        let key = format!("trucks/M{i:04}");
        let value = if i < TRUCKS {
            serde_json::json!({"v": 1, "plate": format!("M{i:04}"), "lat": 45.0, "lon": 9.0,
                "speed_kmh": 50.0, "heading_deg": (i * 18) as f64, "ts_ms": now, "state": "driving"})
            .to_string()
        } else {
            "not a position".to_string()
        };
        producer
            .send(
                FutureRecord::to(&positions).key(&key).payload(&value),
                Duration::from_secs(10),
            )
            .await
            .expect("produce");
    }

    let metrics = JobMetrics::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, metrics.clone()));
    let args = Args::parse_from([
        "directions",
        "--bootstrap",
        &bootstrap,
        "--positions-topic",
        &positions,
        "--stats-topic",
        &format!("it-metrics-stats-{suffix}"),
        "--partials-topic",
        &format!("it-metrics-partials-{suffix}"),
        "--group",
        &format!("it-metrics-{suffix}"),
        "--interval-ms",
        "250",
        "--replication",
        "1",
    ]);
    let (stop, rx) = watch::channel(false);
    let job = tokio::spawn(run_with_metrics(args, rx, metrics));

    let want = [
        (
            "directions_records_in_total{stage=\"aggregate\"}",
            (TRUCKS + INVALID) as f64,
        ),
        ("directions_records_invalid_total", INVALID as f64),
        ("directions_trucks", TRUCKS as f64),
        ("directions_merge_active", 1.0),
        ("directions_consumer_lag{stage=\"aggregate\"}", 0.0),
        ("directions_consumer_lag{stage=\"merge\"}", 0.0),
    ];
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut s = String::new();
    while Instant::now() < deadline {
        s = scrape(addr).await;
        let exact = want.iter().all(|(k, v)| value(&s, k) == Some(*v));
        let flowing = value(&s, "directions_records_out_total{topic=\"stats\"}") >= Some(1.0)
            && value(&s, "directions_records_out_total{topic=\"partials\"}") >= Some(1.0)
            && value(&s, "directions_records_in_total{stage=\"merge\"}") >= Some(1.0);
        if exact && flowing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (k, v) in want {
        assert_eq!(value(&s, k), Some(v), "{k}\n{s}");
    }
    let age = value(&s, "directions_snapshot_age_seconds").expect("snapshot age");
    assert!((0.0..5.0).contains(&age), "snapshot age {age}\n{s}");
    assert_eq!(
        value(&s, "directions_publish_errors_total"),
        Some(0.0),
        "{s}"
    );

    // The age grows while nothing is published (job stopped).
    stop.send(true).unwrap();
    job.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = value(&scrape(addr).await, "directions_snapshot_age_seconds").unwrap();
    assert!(later >= age + 1.0, "age {age} -> {later}");
}
