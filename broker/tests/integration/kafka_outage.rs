//! Kafka is the truth: while Kafka is down a QoS 1 PUBLISH is not
//! acknowledged; once Kafka is back the write completes, the PUBACK follows
//! and the record is there, for one client and for hundreds under load.
//! Each test runs its own Kafka instance (ports 19592 and 19594, below the
//! ephemeral range) so it can stop and start it without disturbing others.

use crate::common;
use crate::common::packets::{self, IntoPacket};
use crate::common::raw;

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use lodestream_mqtt::{Ack, Connect, Packet, Properties, ProtocolVersion, Publish, QoS};
use tokio::io::AsyncWriteExt;

const PORT: &str = "19592";
const LOAD_PORT: &str = "19594";

fn kafka_local(cmd: &str) {
    kafka_local_at(PORT, cmd)
}

fn kafka_local_at(port: &str, cmd: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka-local");
    let run_dir = format!(
        "{}/../.run/kafka-outage-test-{port}",
        env!("CARGO_MANIFEST_DIR")
    );
    let st = Command::new("bash")
        .args([script, cmd])
        .env("KAFKA_PORT", port)
        .env("KAFKA_RUN_DIR", run_dir)
        .env("KAFKA_HEAP", "-Xmx512m")
        .status()
        .expect("scripts/kafka-local");
    assert!(st.success(), "kafka-local {cmd} failed");
}

struct StopOnDrop(&'static str);
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        kafka_local_at(self.0, "stop");
    }
}

fn publish(id: u16, payload: &'static [u8]) -> Packet {
    packets::publish("outage/t", QoS::AtLeastOnce, Some(id), payload).packet()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_not_acknowledged_while_kafka_is_down() {
    kafka_local("reset");
    kafka_local("start");
    let _stop = StopOnDrop(PORT);
    let bootstrap = format!("127.0.0.1:{PORT}");
    let mut c = common::test_config(&[]);
    c.kafka.bootstrap_servers = bootstrap.clone();
    c.kafka.delivery_timeout_ms = 180_000;
    let b = common::start_with(c).await;
    let mut r = raw::Raw::connect(b.addr()).await;
    r.send(
        &Connect {
            keep_alive: 0,
            ..packets::connect(ProtocolVersion::V5, &common::unique("outage"))
        }
        .packet(),
    )
    .await;
    assert!(matches!(r.recv().await, Some(Packet::ConnAck(_))));
    r.send(&publish(1, b"before")).await;
    assert_eq!(r.recv().await, Some(Packet::PubAck(Ack::new(1))));

    kafka_local("stop");
    r.send(&publish(2, b"during")).await;
    assert_eq!(
        r.recv_within(Duration::from_secs(5)).await,
        None,
        "no PUBACK while Kafka is down"
    );
    let down_at = Instant::now();
    kafka_local("start");
    let ack = r.recv_within(Duration::from_secs(120)).await;
    assert_eq!(
        ack,
        Some(Packet::PubAck(Ack::new(2))),
        "PUBACK once Kafka is back"
    );
    eprintln!(
        "write completed {:?} after Kafka restart began",
        down_at.elapsed()
    );

    let recs = common::read_topic_at(&bootstrap, &b.default_topic, 2, Duration::from_secs(20));
    let values: Vec<_> = recs.iter().filter_map(|r| r.value.clone()).collect();
    assert!(values.contains(&b"before".to_vec()));
    assert!(values.contains(&b"during".to_vec()));
    assert_eq!(values.len(), 2, "each message written once");
}

/// One load client: QoS 1 at a steady pace with a window of 5, 3.1.1 or 5.
/// If its connection drops it reconnects to its session and resends what
/// was unacknowledged (DUP) [MQTT-4.4.0-1]. Returns the acknowledged payloads.
async fn load_client(
    addr: std::net::SocketAddr,
    id: String,
    version: ProtocolVersion,
    stop: Arc<AtomicBool>,
    reconnects: Arc<AtomicUsize>,
    max_ack_wait: Arc<AtomicUsize>,
) -> Vec<String> {
    let connect = |clean: bool| {
        Connect {
            clean_start: clean,
            keep_alive: 60,
            properties: Properties {
                session_expiry_interval: version.is_v5().then_some(600),
                ..Properties::default()
            },
            ..packets::connect(version, &id)
        }
        .packet()
    };
    let publish = |pid: u16, n: u32, dup: bool| {
        Packet::Publish(Publish {
            dup,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: format!("load/{}", n % 4),
            packet_id: Some(pid),
            payload: Bytes::from(format!("{id}-{n}")),
            properties: Properties::default(),
        })
    };
    async fn write(r: &mut raw::Raw, p: &Packet) -> bool {
        let mut b = BytesMut::new();
        lodestream_mqtt::encode(p, r.version, &mut b).expect("encode");
        r.stream.write_all(&b).await.is_ok()
    }
    let mut r = raw::Raw::connect(addr).await;
    r.set_version(version);
    assert!(write(&mut r, &connect(true)).await);
    let ack = r.recv_within(Duration::from_secs(30)).await;
    assert!(matches!(ack, Some(Packet::ConnAck(_))), "{id}: {ack:?}");
    let mut acked = Vec::new();
    let mut inflight: BTreeMap<u16, (u32, Instant)> = BTreeMap::new();
    let mut next = 0u32;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && inflight.is_empty() {
            return acked;
        }
        tokio::select! {
            _ = tick.tick() => {
                if !stopping && inflight.len() < 5 {
                    let pid = (next % 60_000) as u16 + 1;
                    inflight.insert(pid, (next, Instant::now()));
                    let ok = write(&mut r, &publish(pid, next, false)).await;
                    next += 1;
                    if !ok {
                        continue;
                    }
                }
            }
            p = r.recv_within(Duration::from_secs(1)) => match p {
                Some(Packet::PubAck(a)) => {
                    assert!(!a.reason.is_error(), "PUBACK with error {a:?}");
                    if let Some((n, at)) = inflight.remove(&a.packet_id) {
                        acked.push(format!("{id}-{n}"));
                        max_ack_wait.fetch_max(at.elapsed().as_millis() as usize, Ordering::Relaxed);
                    }
                }
                Some(Packet::Disconnect(_)) | None if r.closed_within(Duration::ZERO).await => {
                    // Reconnect to the session and resend the unacknowledged.
                    reconnects.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    r = raw::Raw::connect(addr).await;
                    r.set_version(version);
                    assert!(write(&mut r, &connect(false)).await);
                    let ack = r.recv_within(Duration::from_secs(30)).await;
                    assert!(matches!(ack, Some(Packet::ConnAck(_))), "{id}: {ack:?}");
                    for (pid, (n, _)) in &inflight {
                        write(&mut r, &publish(*pid, *n, true)).await;
                    }
                }
                _ => {}
            }
        }
    }
}

/// Kafka restarted under load: 200 clients (half 3.1.1, half 5) publish
/// QoS 1 while Kafka is stopped for 8 s and started again. Clients stay
/// connected (writes wait for Kafka within the delivery timeout) or
/// reconnect; every acknowledged message is in Kafka afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_restart_under_load_loses_nothing_acknowledged() {
    kafka_local_at(LOAD_PORT, "reset");
    kafka_local_at(LOAD_PORT, "start");
    let _stop = StopOnDrop(LOAD_PORT);
    let bootstrap = format!("127.0.0.1:{LOAD_PORT}");
    let mut c = common::test_config(&[]);
    c.kafka.bootstrap_servers = bootstrap.clone();
    c.kafka.delivery_timeout_ms = 180_000;
    let b = common::start_with(c).await;

    let stop = Arc::new(AtomicBool::new(false));
    let reconnects = Arc::new(AtomicUsize::new(0));
    let max_wait = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let version = if i % 2 == 0 {
            ProtocolVersion::V311
        } else {
            ProtocolVersion::V5
        };
        tasks.push(tokio::spawn(load_client(
            b.addr(),
            common::unique(&format!("load{i}")),
            version,
            stop.clone(),
            reconnects.clone(),
            max_wait.clone(),
        )));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    kafka_local_at(LOAD_PORT, "stop");
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    kafka_local_at(LOAD_PORT, "start");
    eprintln!("Kafka back {:?} after it was stopped", down_at.elapsed());
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked: Vec<String> = Vec::new();
    for t in tasks {
        acked.extend(
            tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .expect("client finished its in-flight messages")
                .expect("client task"),
        );
    }
    let recs = common::read_topic_at(
        &bootstrap,
        &b.default_topic,
        acked.len(),
        Duration::from_secs(30),
    );
    let in_kafka: HashSet<String> = recs
        .iter()
        .filter_map(|r| r.value.as_ref())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|a| !in_kafka.contains(*a)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages not in Kafka, e.g. {:?}",
        lost.len(),
        lost.iter().take(3).collect::<Vec<_>>()
    );
    let m = common::scrape(&b).await;
    eprintln!(
        "{} acknowledged, all in Kafka ({} records); reconnects {}; longest PUBACK wait {} ms; produce errors {}",
        acked.len(),
        recs.len(),
        reconnects.load(Ordering::Relaxed),
        max_wait.load(Ordering::Relaxed),
        common::metric(&m, "lodestream_kafka_produce_errors_total")
    );
    assert!(
        max_wait.load(Ordering::Relaxed) >= 5_000,
        "the outage was felt"
    );
}
