//! Benchmark: how long a node takes to start with N persistent sessions in
//! the sessions topic, and how much memory holding them costs.
//!
//!   cargo run --release -p lodestream-broker --example session_startup -- produce 1000000 TOPIC
//!   cargo run --release -p lodestream-broker --example session_startup -- load TOPIC
//!
//! `produce` writes N offline session records shaped like a fleet device's
//! (one subscription to its own command topic, read positions in three
//! partitions, exactly-once state) into a compacted topic. `load` starts a
//! node on that topic (a separate process, so the figures are the node's
//! alone) and prints the load time and the resident memory it added.
//! `scripts/bench-sessions` runs both and cleans up. Needs Kafka
//! (LODESTREAM_KAFKA, default 127.0.0.1:9092).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lodestream_broker::session::record::SessionRecord;
use lodestream_broker::session::{Session, Subscription};
use lodestream_broker::{Config, Node};
use lodestream_mqtt::{QoS, SubscriptionOptions};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

fn kafka() -> String {
    std::env::var("LODESTREAM_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn record(i: u64, now_ms: i64) -> SessionRecord {
    let id: Arc<str> = Arc::from(format!("truck-{i:07}"));
    let mut s = Session::new(id.clone(), 1);
    s.expiry_s = 86_400;
    s.subscriptions.insert(
        format!("fleet/cmd/{id}"),
        Subscription {
            options: SubscriptionOptions::qos(QoS::AtLeastOnce),
            identifier: None,
        },
    );
    let topic: Arc<str> = Arc::from("mqtt_messages");
    for p in 0..3 {
        s.offsets.insert(
            (topic.clone(), p),
            1_000_000 + (i as i64 * 7 + p as i64) % 50_000,
        );
    }
    SessionRecord::from_session(&s, "bench-node", 1, false, now_ms)
}

async fn produce(n: u64, topic: &str) -> anyhow::Result<()> {
    // A node creates the topics with the settings it expects (compacted).
    Node::start(config(topic).validate()?)
        .await
        .context("creating the topics")?
        .shutdown(Duration::from_secs(1))
        .await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("linger.ms", "50")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let now = lodestream_broker::node::now_ms();
    let started = Instant::now();
    let mut bytes = 0usize;
    let mut pending = Vec::with_capacity(10_000);
    for i in 0..n {
        let rec = record(i, now);
        let value = rec.encode();
        bytes += value.len() + rec.client_id.len();
        loop {
            match producer.send_result(
                FutureRecord::to(topic)
                    .key(rec.client_id.as_bytes())
                    .payload(&value),
            ) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((e, _)) => {
                    if pending.is_empty() {
                        bail!("produce: {e}");
                    }
                    for f in pending.drain(..) {
                        f.await?.map_err(|(e, _)| e)?;
                    }
                }
            }
        }
        if pending.len() >= 10_000 {
            for f in pending.drain(..) {
                f.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for f in pending.drain(..) {
        f.await?.map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(30))?;
    println!(
        "produced {n} session records ({:.1} MB, {} B/record) in {:.1} s",
        bytes as f64 / 1e6,
        bytes / n.max(1) as usize,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn config(topic: &str) -> Config {
    let mut c = Config::default();
    c.kafka.bootstrap_servers = kafka();
    c.kafka.sessions_topic = topic.into();
    let suffix = topic.trim_start_matches("lodestream_bench_sessions");
    c.kafka.default_topic = format!("lodestream_bench_default{suffix}");
    c.kafka.retained_topic = format!("lodestream_bench_retained{suffix}");
    c.kafka.nodes_topic = format!("lodestream_bench_nodes{suffix}");
    c.listeners.tcp = None;
    c.listeners.ws = None;
    c.listeners.metrics = None;
    c.mqtt.max_sessions = 2_000_000;
    c
}

async fn load(topic: &str) -> anyhow::Result<()> {
    let c = config(topic).validate()?;
    let before = rss_kib();
    let started = Instant::now();
    let node = Node::start(c).await.context("starting the node")?;
    let elapsed = started.elapsed();
    let n = node.known_sessions();
    // Let allocator and reader threads settle before reading RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib();
    let added = after.saturating_sub(before);
    println!(
        "loaded {n} sessions in {:.1} s ({:.0} sessions/s); RSS {} MiB -> {} MiB (+{} MiB, {} B/session)",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64().max(1e-9),
        before / 1024,
        after / 1024,
        added / 1024,
        added * 1024 / n.max(1) as u64
    );
    node.shutdown(Duration::from_secs(2)).await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["produce", n, topic] => produce(n.parse().context("N")?, topic).await,
        ["load", topic] => load(topic).await,
        _ => bail!("usage: session_startup produce N TOPIC | load TOPIC"),
    }
}
