//! Defects of the session lifecycle found in issue #14, each proven here:
//! a same-node take-over keeps the order of undelivered messages, and a
//! background session write never lands after a newer claim.

use crate::common;
use crate::common::raw;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lodestream_broker::node::now_ms;
use lodestream_broker::session::record::SessionRecord;
use lodestream_broker::session::Session;
use lodestream_mqtt::{
    Ack, Connect, Packet, Properties, ProtocolVersion, Publish, QoS, Subscribe, SubscriptionOptions,
};
use raw::Raw;

fn connect(id: &str, clean: bool, receive_maximum: Option<u16>) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        clean_start: clean,
        keep_alive: 30,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties {
            session_expiry_interval: Some(300),
            receive_maximum,
            ..Properties::default()
        },
    }))
}

async fn open(addr: std::net::SocketAddr, p: Packet) -> Raw {
    let mut r = Raw::connect(addr).await;
    r.send(&p).await;
    match r.recv_within(Duration::from_secs(20)).await {
        Some(Packet::ConnAck(_)) => r,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Publishes with QoS 1 and waits for PUBACK.
async fn publish(r: &mut Raw, id: u16, topic: &str, payload: &str, retain: bool) {
    r.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain,
        topic: topic.into(),
        packet_id: Some(id),
        payload: Bytes::from(payload.to_string()),
        properties: Properties::default(),
    }))
    .await;
    loop {
        match r.recv_within(Duration::from_secs(20)).await {
            Some(Packet::PubAck(a)) if a.packet_id == id => return,
            Some(_) => {}
            None => panic!("no PUBACK for {topic}"),
        }
    }
}

/// Next PUBLISH as (topic, payload), acknowledged when `ack`.
async fn next_publish(r: &mut Raw, ack: bool) -> (String, String) {
    loop {
        match r.recv_within(Duration::from_secs(20)).await {
            Some(Packet::Publish(p)) => {
                if let (true, Some(id)) = (ack, p.packet_id) {
                    r.send(&Packet::PubAck(Ack::new(id))).await;
                }
                return (
                    p.topic.to_string(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                );
            }
            Some(_) => {}
            None => panic!("no PUBLISH within 20 s"),
        }
    }
}

/// [MQTT-4.6.0-6] order per topic survives a same-node take-over: the
/// closing connection's undelivered backlog (here a retained message
/// waiting for the client's Receive Maximum of 1) goes back in front of the
/// messages fan-out queued after it, not behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_node_take_over_keeps_backlog_in_front_of_newer_messages() {
    let b = common::start(&[]).await;
    let base = common::unique("order");
    let mut p = open(b.addr(), connect(&common::unique("pub"), true, None)).await;
    publish(&mut p, 1, &format!("{base}/a"), "retained-a", true).await;
    publish(&mut p, 2, &format!("{base}/b"), "retained-b", true).await;

    let id = common::unique("sub");
    let mut s = open(b.addr(), connect(&id, true, Some(1))).await;
    s.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            format!("{base}/+"),
            SubscriptionOptions::qos(QoS::AtLeastOnce),
        )],
        properties: Properties::default(),
    }))
    .await;
    // One retained message fills the window (not acknowledged); the other
    // waits in the connection's backlog.
    let (first, _) = next_publish(&mut s, false).await;
    let other = if first.ends_with("/a") {
        format!("{base}/b")
    } else {
        format!("{base}/a")
    };
    publish(&mut p, 3, &other, "live-1", false).await;
    publish(&mut p, 4, &other, "live-2", false).await;
    // Let fan-out queue both live messages in the session's mailbox.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut s2 = open(b.addr(), connect(&id, false, Some(1))).await;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < 4 && Instant::now() < deadline {
        got.push(next_publish(&mut s2, true).await);
    }
    let on_other: Vec<&str> = got
        .iter()
        .filter(|(t, _)| *t == other)
        .map(|(_, m)| m.as_str())
        .collect();
    assert_eq!(
        on_other,
        vec![
            if other.ends_with("/a") {
                "retained-a"
            } else {
                "retained-b"
            },
            "live-1",
            "live-2"
        ],
        "all deliveries after the take-over: {got:?}"
    );
    drop(s);
}

/// issue #14: `Node::persist_later` re-checks the epoch before each try,
/// like `tombstone`: a retried write of an older epoch never lands after a
/// newer claim (compaction would keep it as the session's record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_session_write_never_lands_after_a_newer_claim() {
    let b = common::start(&[]).await;
    let node = b.node();
    let id: Arc<str> = Arc::from(common::unique("late").as_str());
    let rec = |epoch| {
        SessionRecord::from_session(&Session::new(id.clone(), 1), "n", epoch, false, now_ms())
    };
    node.persist(rec(2)).await.expect("claim written");
    node.persist_later(rec(1));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let records = common::read_topic(&b.sessions_topic, 2, Duration::from_secs(5));
    let epochs: Vec<u64> = records
        .iter()
        .filter(|r| r.key.as_deref() == Some(&*id))
        .filter_map(|r| SessionRecord::decode(r.value.as_deref()?).ok())
        .map(|r| r.epoch)
        .collect();
    assert_eq!(epochs, vec![2], "records written for the client id");
}
