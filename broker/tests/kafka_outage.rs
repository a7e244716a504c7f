//! Kafka is the truth: while Kafka is down a QoS 1 PUBLISH is not
//! acknowledged; once Kafka is back the write completes, the PUBACK follows
//! and the record is there. Runs its own Kafka instance (port 19592, below the ephemeral range) so it
//! can stop and start it without disturbing other tests.

mod common;
mod raw {
    include!("common/raw.rs");
}

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lodestream_mqtt::{Ack, Connect, Packet, Properties, ProtocolVersion, Publish, QoS};

const PORT: &str = "19592";

fn kafka_local(cmd: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka-local");
    let run_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../.run/kafka-outage-test");
    let st = Command::new("bash")
        .args([script, cmd])
        .env("KAFKA_PORT", PORT)
        .env("KAFKA_RUN_DIR", run_dir)
        .env("KAFKA_HEAP", "-Xmx512m")
        .status()
        .expect("scripts/kafka-local");
    assert!(st.success(), "kafka-local {cmd} failed");
}

struct StopOnDrop;
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        kafka_local("stop");
    }
}

fn publish(id: u16, payload: &'static [u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "outage/t".into(),
        packet_id: Some(id),
        payload: Bytes::from_static(payload),
        properties: Properties::default(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_not_acknowledged_while_kafka_is_down() {
    kafka_local("reset");
    kafka_local("start");
    let _stop = StopOnDrop;
    let bootstrap = format!("127.0.0.1:{PORT}");
    let mut c = common::test_config(&[]);
    c.kafka.bootstrap_servers = bootstrap.clone();
    c.kafka.delivery_timeout_ms = 180_000;
    let b = common::start_with(c).await;
    let mut r = raw::Raw::connect(b.addr()).await;
    r.send(&Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 0,
        client_id: common::unique("outage"),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    })))
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

    std::env::set_var("LODESTREAM_KAFKA", &bootstrap);
    let recs = common::read_topic(&b.default_topic, 2, Duration::from_secs(20));
    let values: Vec<_> = recs.iter().filter_map(|r| r.value.clone()).collect();
    assert!(values.contains(&b"before".to_vec()));
    assert!(values.contains(&b"during".to_vec()));
    assert_eq!(values.len(), 2, "each message written once");
}
