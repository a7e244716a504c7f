//! Shared helpers for the broker's integration tests: a real Kafka (address
//! from `LODESTREAM_KAFKA`, default 127.0.0.1:9092, started by
//! `scripts/kafka-local start`), an in-process broker node per test with
//! topic names unique to the test, and a Kafka reader to check what landed.

pub mod clients;
pub mod kafka_instance;
pub mod packets;
pub mod raw;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lodestream_broker::{Config, Running};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

pub fn kafka() -> String {
    std::env::var("LODESTREAM_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Unique suffix so tests sharing one Kafka never see each other's records.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub struct Broker {
    pub running: Running,
    pub default_topic: String,
    pub retained_topic: String,
    pub sessions_topic: String,
}

impl Broker {
    pub fn addr(&self) -> SocketAddr {
        self.running.tcp.expect("tcp listener")
    }
    pub fn port(&self) -> u16 {
        self.addr().port()
    }
    pub fn node(&self) -> &Arc<lodestream_broker::Node> {
        &self.running.node
    }
}

/// 127.0.0.1, a port the OS picks (tests never collide on ports).
pub const LOOPBACK_ANY_PORT: Option<SocketAddr> = Some(SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0),
));

pub fn test_config(mappings: &[String]) -> Config {
    let mut c = Config::default();
    c.kafka.bootstrap_servers = kafka();
    c.kafka.default_topic = unique("default");
    c.kafka.retained_topic = unique("retained");
    c.kafka.sessions_topic = unique("sessions");
    c.kafka.nodes_topic = unique("nodes");
    c.kafka.node_timeout_ms = 3000;
    c.kafka.heartbeat_interval_ms = 300;
    c.kafka.topic_partitions = 2;
    c.kafka.mappings = mappings.to_vec();
    c.listeners.tcp = LOOPBACK_ANY_PORT;
    c.listeners.ws = LOOPBACK_ANY_PORT;
    c.listeners.metrics = LOOPBACK_ANY_PORT;
    // $SYS off: its retained records would add to the counts tests read
    // from the default and retained topics (sys_topics.rs turns it on).
    c.sys.interval_s = 0;
    c
}

/// `TEST_LOG=<filter>` (e.g. `lodestream_broker=debug`) logs the
/// in-process brokers to stderr; not `RUST_LOG`, which spawned broker
/// binaries read too.
pub fn init_test_log() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .try_init();
        }
    });
}

pub async fn start_with(c: Config) -> Broker {
    init_test_log();
    let default_topic = c.kafka.default_topic.clone();
    let retained_topic = c.kafka.retained_topic.clone();
    let sessions_topic = c.kafka.sessions_topic.clone();
    let valid = c.validate().expect("test configuration is valid");
    let running = lodestream_broker::start(valid).await.unwrap_or_else(|e| {
        panic!(
            "broker did not start against Kafka at {} (run scripts/kafka-local start): {e:#}",
            kafka()
        )
    });
    Broker {
        running,
        default_topic,
        retained_topic,
        sessions_topic,
    }
}

/// A second node sharing the first one's Kafka topics (a cluster of two).
pub async fn start_peer(first: &Broker) -> Broker {
    let mut c = test_config(&first.node().config().kafka.mappings);
    c.kafka.default_topic = first.default_topic.clone();
    c.kafka.retained_topic = first.retained_topic.clone();
    c.kafka.sessions_topic = first.sessions_topic.clone();
    c.kafka.nodes_topic = first.node().config().kafka.nodes_topic.clone();
    start_with(c).await
}

pub async fn start(mappings: &[String]) -> Broker {
    start_with(test_config(mappings)).await
}

#[derive(Debug, Clone)]
pub struct KRecord {
    pub partition: i32,
    pub key: Option<String>,
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, Vec<u8>>,
}

/// Reads every record of `topic` from the beginning until `want` records
/// arrived or `timeout` passed.
pub fn read_topic(topic: &str, want: usize, timeout: Duration) -> Vec<KRecord> {
    read_topic_at(&kafka(), topic, want, timeout)
}

/// `read_topic` from the Kafka at `bootstrap` (tests running their own Kafka).
pub fn read_topic_at(bootstrap: &str, topic: &str, want: usize, timeout: Duration) -> Vec<KRecord> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("test-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("tpl");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push(KRecord {
                partition: m.partition(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
    }
    out
}

/// Produces a record straight into Kafka, as a non-MQTT application would.
pub async fn produce(topic: &str, key: &str, value: &[u8], headers: &[(&str, &[u8])]) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .expect("producer");
    let mut hs = rdkafka::message::OwnedHeaders::new();
    for (k, v) in headers {
        hs = hs.insert(rdkafka::message::Header {
            key: k,
            value: Some(*v),
        });
    }
    p.send(
        FutureRecord::to(topic).key(key).payload(value).headers(hs),
        Duration::from_secs(10),
    )
    .await
    .expect("produce");
}

/// Scrapes the node's Prometheus endpoint.
pub async fn scrape(b: &Broker) -> String {
    scrape_at(b.running.metrics.expect("metrics listener")).await
}

/// Scrapes the Prometheus endpoint at `addr` (a node started by a test).
pub async fn scrape_at(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("read");
    body
}

/// Value of a metric line (exact name incl. labels) in a scrape.
pub fn metric(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Scrapes `name` from `b` until `ok` holds or `t` passed; its last value.
pub async fn wait_metric(b: &Broker, name: &str, t: Duration, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + t;
    loop {
        let v = metric(&scrape(b).await, name);
        if ok(v) || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A broker binary started by a test; killed when dropped.
pub struct Proc(pub std::process::Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the broker binary as another node of `first`'s cluster (same
/// Kafka topics), listening for MQTT on 127.0.0.1:`port`.
pub fn spawn_node(port: u16, first: &Broker, node_id: &str) -> Proc {
    spawn_node_env(port, first, node_id, &[])
}

/// `spawn_node` with extra environment (`LODESTREAM_*` settings) on top.
pub fn spawn_node_env(port: u16, first: &Broker, node_id: &str, env: &[(&str, String)]) -> Proc {
    spawn_node_metrics(port, "", first, node_id, env)
}

/// `spawn_node_env` with its Prometheus endpoint at `metrics` ("": none).
pub fn spawn_node_metrics(
    port: u16,
    metrics: &str,
    first: &Broker,
    node_id: &str,
    env: &[(&str, String)],
) -> Proc {
    let c = &first.node().config().kafka;
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_broker"))
        .args([
            "--tcp",
            &format!("127.0.0.1:{port}"),
            "--metrics",
            metrics,
            "--node-id",
            node_id,
        ])
        .env("LODESTREAM_KAFKA__BOOTSTRAP_SERVERS", kafka())
        .env("LODESTREAM_KAFKA__DEFAULT_TOPIC", &c.default_topic)
        .env("LODESTREAM_KAFKA__RETAINED_TOPIC", &c.retained_topic)
        .env("LODESTREAM_KAFKA__SESSIONS_TOPIC", &c.sessions_topic)
        .env("LODESTREAM_KAFKA__NODES_TOPIC", &c.nodes_topic)
        .env(
            "LODESTREAM_KAFKA__NODE_TIMEOUT_MS",
            c.node_timeout_ms.to_string(),
        )
        .env(
            "LODESTREAM_KAFKA__HEARTBEAT_INTERVAL_MS",
            c.heartbeat_interval_ms.to_string(),
        )
        .env("LODESTREAM_LISTENERS__WS", "")
        .env("LODESTREAM_SYS__INTERVAL_S", "0")
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .spawn()
        .expect("broker binary");
    Proc(child)
}

/// `N` consecutive ports for nodes a test spawns, each free when checked.
/// They lie below the kernel's ephemeral range (32768-60999 here): a port
/// in it can be taken by any outgoing connection between the check and the
/// node's bind (it was, in 28 runs of 121 beside the whole suite). A
/// process-wide counter keeps this binary's tests apart, the pid other
/// test processes; 19xxx is left to the tests' own Kafka instances.
pub fn free_ports<const N: usize>() -> [u16; N] {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let width = N as u32;
    let origin = std::process::id().wrapping_mul(7_919);
    for _ in 0..SPAN / width {
        let k = NEXT.fetch_add(width, Ordering::Relaxed);
        let start = LOW + origin.wrapping_add(k) % (SPAN - width);
        let ports: [u16; N] = std::array::from_fn(|i| (start + i as u32) as u16);
        let free = |p: &u16| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok();
        if ports.iter().all(free) {
            return ports;
        }
    }
    panic!("no {N} consecutive free ports in {LOW}..{}", LOW + SPAN);
}

/// Waits until something listens on 127.0.0.1:`port`.
pub async fn wait_port(port: u16) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("node on port {port} did not start");
}

/// For a test that measures the whole process (open fds, RSS), which the
/// other tests of this one binary would skew: re-runs it alone in a child
/// process of the test binary. Returns true in the parent once the child
/// passed (the parent has nothing left to do); false in the child, which
/// runs the test's body. `module` is the caller's `module_path!()`.
pub fn in_own_process(module: &str, test: &str) -> bool {
    const CHILD: &str = "LODESTREAM_TEST_IN_OWN_PROCESS";
    if std::env::var_os(CHILD).is_some() {
        return false;
    }
    // Test names leave out the crate: `hostile_clients::name`.
    let module = module.split_once("::").map_or(module, |(_, m)| m);
    let name = format!("{module}::{test}");
    let status = std::process::Command::new(std::env::current_exe().expect("test binary path"))
        .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .status()
        .expect("re-running the test in its own process");
    assert!(
        status.success(),
        "{name} failed in its own process (output above)"
    );
    true
}
