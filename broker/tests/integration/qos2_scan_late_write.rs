//! Issue #18: the QoS 2 retransmission scan is exact when the dead owner's
//! last write lands in Kafka *after* the survivor resumed the session.
//!
//! On a replicated Kafka a write a node sent just before it died can sit on
//! the partition leader above the high watermark until the in-sync replicas
//! have it (or arrive late over a stalled connection), so it becomes
//! visible after a scan up to the high watermark that ran too early. Here
//! that is made deterministic: node A (a real broker process) completes one
//! QoS 2 flow, is SIGKILLed, the client resumes on node B and retransmits a
//! PUBLISH (DUP) that A "had sent"; A's write of it lands one second later
//! (produced by the test with exactly the record A writes). Without waiting
//! for A's writes to settle, B writes the message a second time.

use crate::common;
use crate::common::{clients, raw};

use std::time::Duration;

use bytes::Bytes;
use lodestream_mqtt::{Ack, Packet, Properties, ProtocolVersion, Publish, QoS};
use raw::Raw;

const TOPIC: &str = "scan/late";

async fn open(addr: std::net::SocketAddr, id: &str, clean: bool) -> (Raw, bool) {
    clients::open(addr, ProtocolVersion::V5, id, clean).await
}

fn publish(id: u16, payload: &str, dup: bool) -> Packet {
    Packet::Publish(Publish {
        dup,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: TOPIC.into(),
        packet_id: Some(id),
        payload: Bytes::from(payload.to_string()),
        properties: Properties::default(),
    })
}

fn count(recs: &[common::KRecord], payload: &str) -> usize {
    recs.iter()
        .filter(|r| r.value.as_deref() == Some(payload.as_bytes()))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owners_write_landing_after_the_resume_is_not_duplicated() {
    let mut cfg = common::test_config(&[]);
    // The bound the scan waits out: short, to keep the test quick.
    cfg.kafka.delivery_timeout_ms = 6_000;
    let b = common::start_with(cfg).await;
    let [port] = common::free_ports();
    let mut a = common::spawn_node(port, &b, &common::unique("owner"));
    common::wait_port(port).await;
    let a_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = common::unique("late-client");

    // One complete flow on A: its state (next sequence number) is in Kafka.
    let (mut c, _) = open(a_addr, &client, true).await;
    c.send(&publish(1, "first", false)).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.packet_id == 1));
    c.send(&Packet::PubRel(Ack::new(1))).await;
    assert!(matches!(c.recv().await, Some(Packet::PubComp(r)) if r.packet_id == 1));
    let first = common::read_topic(&b.default_topic, 1, Duration::from_secs(10));
    let seq: u64 = first
        .iter()
        .find(|r| r.value.as_deref() == Some(b"first".as_slice()))
        .and_then(|r| r.headers.get("mqtt.qos2_seq"))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        .expect("first flow's record carries mqtt.qos2_seq");

    // A dies while (as far as the client knows) PUBLISH 2 is on its way.
    a.0.kill().expect("SIGKILL");
    let _ = a.0.wait();
    drop(c);

    let (mut c, present) = open(b.addr(), &client, false).await;
    assert!(present, "[MQTT-3.2.2-2] session resumed on B");
    // [MQTT-4.4.0-1] the client resends its unacknowledged PUBLISH (DUP).
    c.send(&publish(2, "second", true)).await;
    // A's write of it arrives late: the record A would have written.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let next = (seq + 1).to_string();
    common::produce(
        &b.default_topic,
        TOPIC,
        b"second",
        &[
            ("mqtt.qos", b"2"),
            ("mqtt.client_id", client.as_bytes()),
            ("mqtt.packet_id", b"2"),
            ("mqtt.qos2_seq", next.as_bytes()),
        ],
    )
    .await;
    match c.recv_within(Duration::from_secs(40)).await {
        Some(Packet::PubRec(r)) if r.packet_id == 2 && !r.reason.is_error() => {}
        other => panic!("expected PUBREC for 2, got {other:?}"),
    }
    c.send(&Packet::PubRel(Ack::new(2))).await;
    assert!(matches!(c.recv().await, Some(Packet::PubComp(r)) if r.packet_id == 2));

    let recs = common::read_topic(&b.default_topic, 3, Duration::from_secs(8));
    assert_eq!(count(&recs, "first"), 1);
    assert_eq!(
        count(&recs, "second"),
        1,
        "[MQTT-4.3.3] a QoS 2 message is in Kafka once, even when the dead owner's write lands late"
    );
    let m = common::scrape(&b).await;
    assert_eq!(
        common::metric(&m, "lodestream_qos2_duplicates_suppressed_total"),
        1.0
    );
}
