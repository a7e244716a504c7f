//! Issue #18 item 1: exactly once on a replicated Kafka. A 3-node KRaft
//! cluster (`scripts/kafka-local --nodes 3`, client ports
//! `KAFKA3_TEST_PORT` (19610), +2, +4; started by the first test and
//! stopped by the last) with the broker's topics at replication factor 3 and
//! `min.insync.replicas` 2, under QoS 1 and QoS 2 load:
//! - one Kafka node SIGKILLed: the leader of the QoS 2 subscriber's session
//!   partition, so its session writes (which its QoS 2 deliveries wait for)
//!   stall through the election while messages keep coming;
//! - a broker node SIGKILLed together with that partition's leader;
//! - a rolling restart of all three Kafka nodes.
//!
//! Each counts messages acknowledged (PUBACK / PUBCOMP) vs in Kafka vs
//! delivered, with the bar: nothing acknowledged is lost, QoS 2 is in Kafka
//! once and delivered once.

use crate::common;
use crate::common::clients;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clients::{duplicates, roaming_subscriber, PublisherSpec, Qos2Receiver, Roaming};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use rumqttc::QoS;
use tokio::sync::mpsc;

/// The tests share one cluster and run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const TESTS: usize = 3;
static FINISHED: AtomicUsize = AtomicUsize::new(0);

const N: usize = 1500;

/// Not `LODESTREAM_*`: the spawned broker binary reads those as settings.
fn base_port() -> u16 {
    std::env::var("KAFKA3_TEST_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(19610)
}

fn bootstrap() -> String {
    let p = base_port();
    format!("127.0.0.1:{p},127.0.0.1:{},127.0.0.1:{}", p + 2, p + 4)
}

/// `scripts/kafka-local --nodes 3 ARGS` for this file's cluster.
fn kafka3(args: &[&str]) -> bool {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka-local");
    let run_dir = format!("{}/../.run/kafka3-test", env!("CARGO_MANIFEST_DIR"));
    Command::new("bash")
        .arg(script)
        .args(["--nodes", "3"])
        .args(args)
        .env("KAFKA_PORT", base_port().to_string())
        .env("KAFKA_RUN_DIR", run_dir)
        .env("KAFKA_HEAP", "-Xmx512m")
        .env("KAFKA_STOP_TIMEOUT", "20")
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

async fn kafka3_async(args: &'static [&'static str]) -> bool {
    tokio::task::spawn_blocking(move || kafka3(args))
        .await
        .unwrap_or(false)
}

/// Starts the nodes that are not running (all, the first time); the last
/// test of the file stops the cluster, pass or fail.
struct Cluster;
impl Cluster {
    async fn up() -> Cluster {
        assert!(
            kafka3_async(&["start"]).await,
            "3-node Kafka did not start (ports {}..{})",
            base_port(),
            base_port() + 5
        );
        Cluster
    }
}
impl Drop for Cluster {
    fn drop(&mut self) {
        if FINISHED.fetch_add(1, Ordering::SeqCst) + 1 == TESTS {
            kafka3(&["stop"]);
        }
    }
}

/// Leader and replicas of each partition of `topic`.
fn partitions(topic: &str) -> Vec<(i32, i32, usize)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("consumer");
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(20))
        .expect("metadata");
    md.topics()
        .iter()
        .flat_map(|t| t.partitions())
        .map(|p| (p.id(), p.leader(), p.replicas().len()))
        .collect()
}

/// The leader of the partition holding `key`'s records in `topic`.
fn leader_of_key(topic: &str, key: &str) -> i32 {
    let recs = common::read_topic_at(&bootstrap(), topic, usize::MAX, Duration::from_secs(3));
    let partition = recs
        .iter()
        .find(|r| r.key.as_deref() == Some(key))
        .map(|r| r.partition)
        .unwrap_or_else(|| panic!("no record of {key} in {topic}"));
    partitions(topic)
        .iter()
        .find(|p| p.0 == partition)
        .map(|p| p.1)
        .expect("the partition's leader")
}

async fn broker() -> common::Broker {
    let mut c = common::test_config(&[]);
    c.kafka.bootstrap_servers = bootstrap();
    // Auto: 3 replicas, 2 in sync, decided from the cluster.
    c.kafka.replication_factor = 0;
    // The scan's settle time after a node death (see qos2_scan.rs).
    c.kafka.delivery_timeout_ms = 30_000;
    // Less than what arrives while Kafka elects a leader (300/s for several
    // seconds): fan-out outruns a subscriber whose writes wait for Kafka.
    c.mqtt.session_queue = 200;
    common::start_with(c).await
}

/// What a run saw: acknowledged per stream, and the subscribers' deliveries.
struct Outcome {
    acked_q1: usize,
    acked_q2: usize,
    q1_sub: Vec<String>,
    q2_sub: Vec<String>,
}

/// Checks the bar against what is in Kafka and prints the counts.
fn check(name: &str, topic: &str, o: &Outcome) {
    let recs = common::read_topic_at(&bootstrap(), topic, 4 * N, Duration::from_secs(30));
    let mut in_kafka: HashMap<String, usize> = HashMap::new();
    for r in &recs {
        if let Some(v) = &r.value {
            *in_kafka
                .entry(String::from_utf8_lossy(v).into_owned())
                .or_default() += 1;
        }
    }
    let stream = |p: &str| in_kafka.keys().filter(|k| k.starts_with(p)).count();
    let q2_twice = in_kafka
        .iter()
        .filter(|(k, n)| k.starts_with("rf3/q2/") && **n > 1)
        .count();
    let (d1, s1) = duplicates(&o.q1_sub);
    let (d2, s2) = duplicates(&o.q2_sub);
    eprintln!(
        "{name}: acknowledged QoS 1 {}/{N}, QoS 2 {}/{N}; in Kafka QoS 1 {}, QoS 2 {} \
         ({q2_twice} twice); delivered QoS 1 subscriber {} distinct ({d1} repeats), \
         QoS 2 subscriber {} distinct ({d2} repeats)",
        o.acked_q1,
        o.acked_q2,
        stream("rf3/q1/"),
        stream("rf3/q2/"),
        s1.len(),
        s2.len()
    );
    assert_eq!(
        (o.acked_q1, o.acked_q2),
        (N, N),
        "every PUBLISH acknowledged"
    );
    assert_eq!(
        stream("rf3/q1/"),
        N,
        "acknowledged QoS 1 messages lost in Kafka"
    );
    assert_eq!(
        stream("rf3/q2/"),
        N,
        "acknowledged QoS 2 messages lost in Kafka"
    );
    assert_eq!(q2_twice, 0, "[MQTT-4.3.3] QoS 2 written to Kafka once");
    assert_eq!(s1.len(), 2 * N, "QoS 1 subscriber missed messages");
    assert_eq!(s2.len(), N, "QoS 2 subscriber missed messages");
    assert_eq!(d2, 0, "[MQTT-4.3.3] QoS 2 delivered exactly once");
}

/// Subscribers on `sub_port` (QoS 1 to everything, QoS 2 to the QoS 2
/// stream), publishers of N QoS 1 and N QoS 2 messages on `pub_port` (the
/// QoS 1 one on `q1_port`), and `fault` run when the QoS 1 subscriber has
/// `fault_at`; subscribers move to `resume_port` if it is given.
struct Load {
    sub_port: u16,
    q1_pub_port: u16,
    q2_pub_port: u16,
    failover: Option<u16>,
    per_s: u64,
    fault_at: usize,
}

async fn run_load<F, Fut>(load: Load, fault: F) -> Outcome
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let sub_addr: std::net::SocketAddr = format!("127.0.0.1:{}", load.sub_port).parse().unwrap();
    // The QoS 1 subscriber moves to the failover node by itself.
    let ports: Vec<u16> = [Some(load.sub_port), load.failover]
        .into_iter()
        .flatten()
        .collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let limit = Duration::from_secs(900);
    roaming_subscriber(
        Roaming::on(&ports),
        &common::unique("q1sub"),
        "rf3/#",
        tx,
        limit,
    )
    .await;
    let q2_id = common::unique("q2sub");
    let mut q2 = Qos2Receiver::default();
    let mut q2c = Qos2Receiver::connect(sub_addr, &q2_id, false).await;
    q2c.send(&Qos2Receiver::subscribe("rf3/q2")).await;
    assert!(matches!(
        q2c.recv().await,
        Some(lodestream_mqtt::Packet::SubAck(_))
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spec = |port: u16, topic, qos| PublisherSpec {
        roam: clients::Roaming::on(
            &[Some(port), load.failover]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>(),
        ),
        id: common::unique("pub"),
        topic,
        qos,
        n: N,
        per_s: load.per_s,
        limit: Duration::from_secs(400),
    };
    let p1 = clients::publisher(spec(load.q1_pub_port, "rf3/q1", QoS::AtLeastOnce));
    let p2 = clients::publisher(spec(load.q2_pub_port, "rf3/q2", QoS::ExactlyOnce));

    let mut q1 = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while q1.len() < load.fault_at {
        assert!(
            Instant::now() < deadline,
            "only {} delivered before the fault",
            q1.len()
        );
        while let Ok(m) = rx.try_recv() {
            q1.push(m);
        }
        q2.pump(&mut q2c, Duration::from_millis(5)).await;
    }
    // The fault runs while the subscribers keep reading (a subscriber that
    // stops reading is disconnected once its queue is full).
    let fault = tokio::spawn(fault(q2_id.clone()));
    while !fault.is_finished() {
        while let Ok(m) = rx.try_recv() {
            q1.push(m);
        }
        if !q2.pump(&mut q2c, Duration::from_millis(20)).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    fault.await.expect("fault");
    if let Some(port) = load.failover {
        q2c = Qos2Receiver::connect(format!("127.0.0.1:{port}").parse().unwrap(), &q2_id, false)
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(420);
    let mut quiet_since = Instant::now();
    loop {
        while let Ok(m) = rx.try_recv() {
            q1.push(m);
            quiet_since = Instant::now();
        }
        if q2.pump(&mut q2c, Duration::from_millis(20)).await {
            quiet_since = Instant::now();
        }
        let done = duplicates(&q1).1.len() >= 2 * N && duplicates(&q2.got).1.len() >= N;
        if (done && quiet_since.elapsed() > Duration::from_secs(2)) || Instant::now() > deadline {
            break;
        }
        if p1.is_finished() && p2.is_finished() && quiet_since.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    Outcome {
        acked_q1: p1.await.expect("QoS 1 publisher"),
        acked_q2: p2.await.expect("QoS 2 publisher"),
        q1_sub: q1,
        q2_sub: q2.got,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_node_sigkill_under_qos1_and_qos2_load_loses_nothing_acknowledged() {
    let _serial = SERIAL.lock().await;
    let _cluster = Cluster::up().await;
    let b = broker().await;
    let parts = partitions(&b.default_topic);
    assert!(
        parts.iter().all(|(_, _, replicas)| *replicas == 3),
        "broker topics get 3 replicas on a 3-node Kafka: {parts:?}"
    );
    let load = Load {
        sub_port: b.port(),
        q1_pub_port: b.port(),
        q2_pub_port: b.port(),
        failover: None,
        per_s: 300,
        fault_at: N / 2,
    };
    let sessions = b.sessions_topic.clone();
    let o = run_load(load, |q2_id| async move {
        // The leader of the QoS 2 subscriber's session partition: its
        // session writes, which its QoS 2 deliveries wait for, stall until
        // Kafka elects another leader, and fan-out outruns it meanwhile.
        let leader = tokio::task::spawn_blocking(move || leader_of_key(&sessions, &q2_id))
            .await
            .expect("session partition leader");
        let led: Vec<i32> = parts
            .iter()
            .filter(|p| p.1 == leader)
            .map(|p| p.0)
            .collect();
        let node = leader.to_string();
        let t0 = Instant::now();
        let ok = tokio::task::spawn_blocking(move || kafka3(&["kill", &node]))
            .await
            .unwrap_or(false);
        assert!(ok, "kill Kafka node {leader}");
        eprintln!(
            "Kafka node {leader} (leader of the QoS 2 subscriber's session partition and of \
             partitions {led:?} of the messages) SIGKILLed in {:?}",
            t0.elapsed()
        );
    })
    .await;
    check("Kafka node SIGKILL", &b.default_topic, &o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_node_and_partition_leader_sigkilled_together_lose_nothing_acknowledged() {
    let _serial = SERIAL.lock().await;
    let _cluster = Cluster::up().await;
    let survivor = broker().await;
    let [port] = common::free_ports();
    let mut victim = common::spawn_node_env(
        port,
        &survivor,
        &common::unique("victim"),
        &[("LODESTREAM_KAFKA__BOOTSTRAP_SERVERS", bootstrap())],
    );
    common::wait_port(port).await;
    let leader = partitions(&survivor.default_topic)
        .first()
        .map(|p| p.1)
        .expect("a partition");
    // Subscribers and the QoS 1 publisher on the victim; the QoS 2
    // publisher on the survivor (rumqttc does not set DUP on a
    // retransmission, which QoS 2 across a node change needs).
    let load = Load {
        sub_port: port,
        q1_pub_port: port,
        q2_pub_port: survivor.port(),
        failover: Some(survivor.port()),
        per_s: 300,
        fault_at: N / 2,
    };
    let o = run_load(load, |_| async move {
        let node = leader.to_string();
        victim.0.kill().expect("SIGKILL broker node");
        let ok = tokio::task::spawn_blocking(move || kafka3(&["kill", &node]))
            .await
            .unwrap_or(false);
        assert!(ok, "kill Kafka node {leader}");
        let _ = victim.0.wait();
        eprintln!("broker node and Kafka node {leader} (leader of partition 0) SIGKILLed");
    })
    .await;
    check(
        "broker node + partition leader SIGKILL",
        &survivor.default_topic,
        &o,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_all_kafka_nodes_under_load_loses_nothing_acknowledged() {
    let _serial = SERIAL.lock().await;
    let _cluster = Cluster::up().await;
    let b = broker().await;
    // Slow enough that the stream outlasts the three restarts.
    let load = Load {
        sub_port: b.port(),
        q1_pub_port: b.port(),
        q2_pub_port: b.port(),
        failover: None,
        per_s: 15,
        fault_at: 20,
    };
    let o = run_load(load, |_| async move {
        for node in ["1", "2", "3"] {
            let t0 = Instant::now();
            let stopped = tokio::task::spawn_blocking(move || kafka3(&["stop-node", node]))
                .await
                .unwrap_or(false);
            let started = tokio::task::spawn_blocking(move || kafka3(&["start-node", node]))
                .await
                .unwrap_or(false);
            assert!(stopped && started, "restart of Kafka node {node}");
            eprintln!("Kafka node {node} restarted in {:?}", t0.elapsed());
        }
    })
    .await;
    check("rolling restart of Kafka", &b.default_topic, &o);
}
