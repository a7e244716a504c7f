//! Connections and sessions: take-over, persistent sessions, redelivery,
//! wills, keep-alive and client identifiers.

use crate::common;
use crate::common::packets::{self, IntoPacket};
use crate::common::raw;

use std::time::{Duration, Instant};

use bytes::Bytes;
use lodestream_mqtt::{
    Ack, Connect, Disconnect, LastWill, Packet, Properties, ProtocolVersion, Publish, QoS as Q,
    ReasonCode,
};
use raw::Raw;

fn connect(
    v: ProtocolVersion,
    id: &str,
    clean: bool,
    expiry: Option<u32>,
    will: Option<LastWill>,
) -> Packet {
    Connect {
        clean_start: clean,
        will,
        properties: Properties {
            session_expiry_interval: expiry,
            ..Properties::default()
        },
        ..packets::connect(v, id)
    }
    .packet()
}

async fn open(b: &common::Broker, p: Packet) -> (Raw, lodestream_mqtt::ConnAck) {
    let mut r = Raw::connect(b.addr()).await;
    r.send(&p).await;
    match r.recv().await {
        Some(Packet::ConnAck(c)) => (r, c),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn sub(filter: &str, qos: Q) -> Packet {
    packets::subscribe(1, filter, qos).packet()
}

fn publish(topic: &str, qos: Q, id: Option<u16>, payload: Vec<u8>) -> Packet {
    packets::publish(topic, qos, id, payload).packet()
}

async fn next_publish(r: &mut Raw, t: Duration) -> Option<Publish> {
    let deadline = Instant::now() + t;
    while Instant::now() < deadline {
        match r.recv_within(deadline - Instant::now()).await? {
            Packet::Publish(p) => return Some(p),
            _ => continue,
        }
    }
    None
}

/// [MQTT-3.1.4-3] a second CONNECT with the same client id takes over:
/// the first gets DISCONNECT 0x8E and is closed; the session carries over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_disconnects_previous_connection() {
    let b = common::start(&[]).await;
    let id = common::unique("dup-id");
    let (mut a, _) = open(&b, connect(ProtocolVersion::V5, &id, true, Some(60), None)).await;
    a.send(&sub("to/#", Q::AtLeastOnce)).await;
    assert!(matches!(a.recv().await, Some(Packet::SubAck(_))));
    let started = Instant::now();
    let (mut bb, ack) = open(&b, connect(ProtocolVersion::V5, &id, false, Some(60), None)).await;
    assert!(
        ack.session_present,
        "[MQTT-3.2.2-3] session present after take-over"
    );
    match a.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::SessionTakenOver),
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    assert!(a.closed_within(Duration::from_secs(2)).await);
    assert!(started.elapsed() < Duration::from_secs(2));
    // The subscription moved with the session.
    let (mut p, _) = open(
        &b,
        connect(ProtocolVersion::V5, &common::unique("p"), true, None, None),
    )
    .await;
    p.send(&publish("to/x", Q::AtLeastOnce, Some(1), b"hi".to_vec()))
        .await;
    let got = next_publish(&mut bb, Duration::from_secs(10))
        .await
        .expect("delivery after take-over");
    assert_eq!(&got.payload[..], b"hi");
}

/// 3.1.1 clean session = 0: messages published while offline are queued
/// and delivered in order on reconnect, session present = 1
/// [MQTT-3.1.2-4/5], [MQTT-3.2.2-2].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_receives_messages_sent_while_offline() {
    let b = common::start(&[]).await;
    let id = common::unique("persist");
    let (mut s, ack) = open(&b, connect(ProtocolVersion::V311, &id, false, None, None)).await;
    assert!(!ack.session_present);
    s.send(&sub("queue/#", Q::AtLeastOnce)).await;
    assert!(matches!(s.recv().await, Some(Packet::SubAck(_))));
    s.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)))
        .await;
    assert!(s.closed_within(Duration::from_secs(2)).await);

    let (mut p, _) = open(
        &b,
        connect(
            ProtocolVersion::V311,
            &common::unique("p"),
            true,
            None,
            None,
        ),
    )
    .await;
    for i in 0..20u16 {
        p.send(&publish(
            "queue/a",
            Q::AtLeastOnce,
            Some(i + 1),
            i.to_string().into_bytes(),
        ))
        .await;
    }
    for _ in 0..20 {
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    // Give the fan-out a moment to queue the records for the offline session.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut s, ack) = open(&b, connect(ProtocolVersion::V311, &id, false, None, None)).await;
    assert!(ack.session_present);
    for i in 0..20u16 {
        let got = next_publish(&mut s, Duration::from_secs(10))
            .await
            .expect("queued message");
        assert_eq!(got.payload, Bytes::from(i.to_string()), "order kept");
        s.send(&Packet::PubAck(Ack::new(got.packet_id.unwrap_or(0))))
            .await;
    }
}

/// [MQTT-4.4.0-1] unacknowledged QoS 1 deliveries are resent with DUP=1
/// and the same packet id when the session resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_delivery_resent_with_dup_on_reconnect() {
    let b = common::start(&[]).await;
    let id = common::unique("redeliver");
    let (mut s, _) = open(&b, connect(ProtocolVersion::V5, &id, true, Some(300), None)).await;
    s.send(&sub("r/#", Q::AtLeastOnce)).await;
    assert!(matches!(s.recv().await, Some(Packet::SubAck(_))));
    let (mut p, _) = open(
        &b,
        connect(ProtocolVersion::V5, &common::unique("p"), true, None, None),
    )
    .await;
    p.send(&publish("r/1", Q::AtLeastOnce, Some(1), b"m".to_vec()))
        .await;
    let first = next_publish(&mut s, Duration::from_secs(10)).await.unwrap();
    assert!(!first.dup);
    drop(s); // no PUBACK, connection lost
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut s, ack) = open(
        &b,
        connect(ProtocolVersion::V5, &id, false, Some(300), None),
    )
    .await;
    assert!(ack.session_present);
    let again = next_publish(&mut s, Duration::from_secs(10)).await.unwrap();
    assert!(again.dup);
    assert_eq!(again.packet_id, first.packet_id);
    assert_eq!(again.payload, first.payload);
}

fn will(topic: &str, delay: Option<u32>) -> LastWill {
    LastWill {
        topic: topic.into(),
        payload: Bytes::from_static(b"gone"),
        qos: Q::AtLeastOnce,
        retain: false,
        properties: Properties {
            will_delay_interval: delay,
            ..Properties::default()
        },
    }
}

/// [MQTT-3.1.2-8] will published on abnormal close; [MQTT-3.14.4-3] not on
/// a normal DISCONNECT; [MQTT-3.1.3-9] not when the client returns within
/// the will delay; published after the delay otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_will_rules() {
    let b = common::start(&[]).await;
    let (mut w, _) = open(
        &b,
        connect(ProtocolVersion::V5, &common::unique("w"), true, None, None),
    )
    .await;
    w.send(&sub("wills/#", Q::AtLeastOnce)).await;
    assert!(matches!(w.recv().await, Some(Packet::SubAck(_))));

    // Normal disconnect: no will.
    let (mut c1, _) = open(
        &b,
        connect(
            ProtocolVersion::V5,
            &common::unique("c1"),
            true,
            None,
            Some(will("wills/normal", None)),
        ),
    )
    .await;
    c1.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)))
        .await;
    // Abnormal close: will.
    let (c2, _) = open(
        &b,
        connect(
            ProtocolVersion::V311,
            &common::unique("c2"),
            true,
            None,
            Some(will("wills/abnormal", None)),
        ),
    )
    .await;
    drop(c2);
    let got = next_publish(&mut w, Duration::from_secs(10))
        .await
        .expect("will");
    assert_eq!(got.topic, "wills/abnormal");
    w.send(&Packet::PubAck(Ack::new(got.packet_id.unwrap())))
        .await;

    // Delayed will, client returns in time: no will.
    let id3 = common::unique("c3");
    let (c3, _) = open(
        &b,
        connect(
            ProtocolVersion::V5,
            &id3,
            true,
            Some(30),
            Some(will("wills/returned", Some(2))),
        ),
    )
    .await;
    drop(c3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_c3b, _) = open(
        &b,
        connect(ProtocolVersion::V5, &id3, false, Some(30), None),
    )
    .await;
    // Delayed will, client stays away: will after the delay.
    let (c4, _) = open(
        &b,
        connect(
            ProtocolVersion::V5,
            &common::unique("c4"),
            true,
            Some(30),
            Some(will("wills/delayed", Some(1))),
        ),
    )
    .await;
    let dropped_at = Instant::now();
    drop(c4);
    let got = next_publish(&mut w, Duration::from_secs(10))
        .await
        .expect("delayed will");
    assert_eq!(got.topic, "wills/delayed");
    assert!(
        dropped_at.elapsed() >= Duration::from_millis(900),
        "will delay honoured"
    );
    assert!(
        next_publish(&mut w, Duration::from_secs(2)).await.is_none(),
        "no other will"
    );
}

fn with_keep_alive(v: ProtocolVersion, id: &str, keep_alive: u16) -> Packet {
    Connect {
        keep_alive,
        ..packets::connect(v, id)
    }
    .packet()
}

/// [MQTT-3.1.2-24] no packet within 1.5 x keep alive closes the connection;
/// a v5 client is told 0x8D.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_timeout_closes_connection() {
    let b = common::start(&[]).await;
    let (mut r, _) = open(
        &b,
        with_keep_alive(ProtocolVersion::V5, &common::unique("ka"), 1),
    )
    .await;
    let t = Instant::now();
    match r.recv_within(Duration::from_secs(5)).await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::KeepAliveTimeout),
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
    let e = t.elapsed();
    assert!(
        e >= Duration::from_millis(1300) && e < Duration::from_millis(2500),
        "{e:?}"
    );
    // PINGREQ keeps a connection alive.
    let (mut r, _) = open(
        &b,
        with_keep_alive(ProtocolVersion::V311, &common::unique("ka2"), 1),
    )
    .await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        r.send(&Packet::PingReq).await;
        assert_eq!(r.recv().await, Some(Packet::PingResp));
    }
}

/// Zero-length client id: v5 gets an assigned id [MQTT-3.2.2-16]; 3.1.1
/// with clean session 0 is rejected with code 2 [MQTT-3.1.3-8].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_length_client_ids() {
    let b = common::start(&[]).await;
    let (_r, ack) = open(&b, connect(ProtocolVersion::V5, "", true, None, None)).await;
    let assigned = ack
        .properties
        .assigned_client_identifier
        .expect("assigned id");
    assert!(!assigned.is_empty());
    let (_r, ack) = open(&b, connect(ProtocolVersion::V311, "", true, None, None)).await;
    assert_eq!(ack.reason, ReasonCode::Success);
    let mut r = Raw::connect(b.addr()).await;
    r.set_version(ProtocolVersion::V311);
    r.send_bytes(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x00, 0, 30, 0, 0])
        .await;
    match r.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.reason, ReasonCode::ClientIdentifierNotValid),
        other => panic!("expected CONNACK 2, got {other:?}"),
    }
    assert!(r.closed_within(Duration::from_secs(2)).await);
}

/// [MQTT-3.1.2-4] clean start discards the previous session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_start_discards_session() {
    let b = common::start(&[]).await;
    let id = common::unique("clean");
    let (mut s, _) = open(&b, connect(ProtocolVersion::V5, &id, true, Some(60), None)).await;
    s.send(&sub("c/#", Q::AtLeastOnce)).await;
    assert!(matches!(s.recv().await, Some(Packet::SubAck(_))));
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut s, ack) = open(&b, connect(ProtocolVersion::V5, &id, true, Some(60), None)).await;
    assert!(!ack.session_present);
    let (mut p, _) = open(
        &b,
        connect(ProtocolVersion::V5, &common::unique("p"), true, None, None),
    )
    .await;
    p.send(&publish("c/1", Q::AtLeastOnce, Some(1), b"x".to_vec()))
        .await;
    assert!(next_publish(&mut s, Duration::from_secs(2)).await.is_none());
}

/// A PUBLISH sent in the same segment as CONNECT is handled at once (not
/// left in the read buffer until more bytes arrive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_pipelined_with_connect_is_handled() {
    let b = common::start(&[]).await;
    let mut r = Raw::connect(b.addr()).await;
    let mut bytes = bytes::BytesMut::new();
    lodestream_mqtt::encode(
        &connect(
            ProtocolVersion::V311,
            &common::unique("pipe"),
            true,
            None,
            None,
        ),
        ProtocolVersion::V311,
        &mut bytes,
    )
    .unwrap();
    lodestream_mqtt::encode(
        &publish("pipe/t", Q::AtLeastOnce, Some(1), b"x".to_vec()),
        ProtocolVersion::V311,
        &mut bytes,
    )
    .unwrap();
    r.set_version(ProtocolVersion::V311);
    r.send_bytes(&bytes).await;
    assert!(matches!(r.recv().await, Some(Packet::ConnAck(_))));
    assert_eq!(
        r.recv_within(Duration::from_secs(5)).await,
        Some(Packet::PubAck(Ack::new(1)))
    );
}
