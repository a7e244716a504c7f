//! Benchmark: the client-side CPU a QoS 1 write costs,
//! through the broker's librdkafka `Producer` and through the own producer
//! (`kafka/produce/own.rs`), alternately in one process.
//!
//!   cargo run --release -p lodestream-broker --example produce_cpu -- \
//!       [--writers 200] [--records 50] [--interval-ms 0] [--rounds 3]
//!       [--rdkafka-linger-ms 0,5] [--own-linger-ms 0,5]
//!
//! Each of `--writers` tasks writes `--records` 500-byte records, waiting for
//! each acknowledgement before the next (stop-and-wait, as MQTT clients
//! with one message in flight do), and then `--interval-ms` more (the
//! writers start spread over one interval), into a fresh 3-partition
//! topic. 1,430 writers at 1,000 ms is a node of item 4's 100,000-client
//! run. The
//! process's CPU (all threads, from the scheduler's count) over the run,
//! divided by the records, is the figure. librdkafka runs as the broker
//! configures it, once per linger given (0 with one request in flight is
//! the fast lane, 5 with five the batch lane). Needs Kafka
//! (LODESTREAM_KAFKA, default 127.0.0.1:9092).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use lodestream_broker::config::KafkaConfig;
use lodestream_broker::kafka::produce::own::OwnProducer;
use lodestream_broker::kafka::produce::request::OutRecord;
use lodestream_broker::kafka::produce::sender::SenderConfig;
use lodestream_broker::kafka::Producer;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

const PAYLOAD: [u8; 500] = [b'x'; 500];

fn kafka() -> String {
    std::env::var("LODESTREAM_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// CPU seconds of all of this process's threads.
fn cpu_s() -> f64 {
    let mut ns = 0u64;
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for t in dir.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
            }
        }
    }
    ns as f64 / 1e9
}

async fn fresh_topic(run: &str) -> anyhow::Result<String> {
    let topic = format!("lodestream_produce_cpu_{}_{run}", std::process::id());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()?;
    let made = admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?;
    if let Some(Err(e)) = made.into_iter().next() {
        bail!("creating {topic}: {e:?}");
    }
    Ok(topic)
}

async fn delete_topics(prefix: &str, topics: &[String]) {
    let Ok(admin) = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    if let Err(e) = admin.delete_topics(&names, &AdminOptions::new()).await {
        eprintln!("deleting the {prefix} topics: {e}");
    }
}

/// Writer `w`'s pause before its first write and after each one.
#[derive(Clone, Copy)]
struct Pace {
    interval: Duration,
    writers: usize,
}

impl Pace {
    async fn start(&self, w: usize) {
        if !self.interval.is_zero() {
            tokio::time::sleep(self.interval.mul_f64(w as f64 / self.writers.max(1) as f64)).await;
        }
    }

    async fn between(&self) {
        if !self.interval.is_zero() {
            tokio::time::sleep(self.interval).await;
        }
    }
}

fn record(w: usize, i: usize) -> OutRecord {
    OutRecord {
        key: Some(Bytes::from(format!("load/{w}/{i}"))),
        value: Some(Bytes::from_static(&PAYLOAD)),
        headers: vec![("mqtt.qos".into(), Bytes::from_static(b"1"))],
        timestamp_ms: 0,
    }
}

async fn run_rdkafka(
    topic: &str,
    linger_ms: u32,
    pace: Pace,
    records: usize,
) -> anyhow::Result<()> {
    let writers = pace.writers;
    let cfg = KafkaConfig {
        bootstrap_servers: kafka(),
        linger_ms,
        max_in_flight: if linger_ms == 0 { 1 } else { 5 },
        ..KafkaConfig::default()
    };
    let p = Arc::new(Producer::new(&cfg, "produce-cpu")?);
    let headers = vec![("mqtt.qos".to_string(), b"1".to_vec())];
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (p, topic, headers) = (p.clone(), topic.to_string(), headers.clone());
        tasks.push(tokio::spawn(async move {
            pace.start(w).await;
            for i in 0..records {
                let key = format!("load/{w}/{i}");
                p.send_and_wait(&topic, key.as_bytes(), Some(&PAYLOAD), &headers)
                    .await?;
                pace.between().await;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn run_own(topic: &str, linger: Duration, pace: Pace, records: usize) -> anyhow::Result<()> {
    let cfg = SenderConfig {
        delivery_timeout: Duration::from_secs(30),
        max_batch_records: 1000,
        retry_backoff: Duration::from_millis(50),
        linger,
        max_bytes: 128 << 20,
        request_timeout: Duration::from_secs(30),
    };
    let producer = OwnProducer::spawn(&kafka(), "produce-cpu", cfg);
    let mut tasks = Vec::new();
    for w in 0..pace.writers {
        let (producer, topic) = (producer.clone(), topic.to_string());
        tasks.push(tokio::spawn(async move {
            pace.start(w).await;
            for i in 0..records {
                let report = producer.send(topic.as_str(), record(w, i), true).await?;
                Producer::delivered(report).await?;
                pace.between().await;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let writers: usize = arg(&args, "--writers", "200").parse()?;
    let records: usize = arg(&args, "--records", "50").parse()?;
    let rounds: usize = arg(&args, "--rounds", "3").parse()?;
    let interval = Duration::from_millis(arg(&args, "--interval-ms", "0").parse()?);
    let pace = Pace { interval, writers };
    let lingers: Vec<u32> = arg(&args, "--rdkafka-linger-ms", "0,5")
        .split(',')
        .filter(|v| !v.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let mut kinds: Vec<String> = lingers
        .iter()
        .map(|l| format!("rdkafka-linger-{l}"))
        .collect();
    let own_lingers: Vec<u64> = arg(&args, "--own-linger-ms", "0,5")
        .split(',')
        .filter(|v| !v.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    kinds.extend(own_lingers.iter().map(|l| format!("own-linger-{l}")));
    let mut topics = Vec::new();
    let mut results: Vec<(String, Vec<f64>)> =
        kinds.iter().map(|k| (k.clone(), Vec::new())).collect();
    let total = (writers * records) as f64;
    for round in 0..rounds {
        for (k, kind) in kinds.iter().enumerate() {
            let topic = fresh_topic(&format!("{round}_{k}")).await?;
            topics.push(topic.clone());
            let (c0, t0) = (cpu_s(), Instant::now());
            match lingers.get(k) {
                Some(&l) => run_rdkafka(&topic, l, pace, records).await?,
                None => {
                    let l = own_lingers.get(k - lingers.len()).copied().unwrap_or(0);
                    run_own(&topic, Duration::from_millis(l), pace, records).await?
                }
            }
            let (cpu, wall) = (cpu_s() - c0, t0.elapsed().as_secs_f64());
            let us = cpu / total * 1e6;
            results[k].1.push(us);
            println!(
                "round {} {kind}: {us:.1} us CPU a record, {:.0} records/s",
                round + 1,
                total / wall
            );
        }
    }
    println!(
        "\nmedian CPU per record ({writers} writers x {records} records, stop-and-wait, {} ms apart):",
        interval.as_millis()
    );
    for (kind, mut v) in results {
        v.sort_by(f64::total_cmp);
        println!("  {kind}: {:.1} us", v[v.len() / 2]);
    }
    delete_topics("benchmark", &topics).await;
    Ok(())
}
