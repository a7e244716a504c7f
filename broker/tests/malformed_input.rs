//! Bad input gets the precise reason code (v5) or a close (3.1.1), and the
//! node keeps serving everyone else.

mod common;
mod raw {
    include!("common/raw.rs");
}

use std::time::Duration;

use lodestream_mqtt::{Connect, Packet, Properties, ProtocolVersion, ReasonCode};
use raw::Raw;

async fn connected(b: &common::Broker, v: ProtocolVersion) -> Raw {
    let mut r = Raw::connect(b.addr()).await;
    r.send(&Packet::Connect(Box::new(Connect {
        protocol: v,
        clean_start: true,
        keep_alive: 30,
        client_id: common::unique("bad"),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    })))
    .await;
    assert!(matches!(r.recv().await, Some(Packet::ConnAck(_))));
    r
}

async fn expect_disconnect(r: &mut Raw, reason: ReasonCode) {
    match r.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, reason),
        other => panic!("expected DISCONNECT {reason:?}, got {other:?}"),
    }
    assert!(
        r.closed_within(Duration::from_secs(2)).await,
        "connection closed"
    );
}

/// [MQTT-3.1.0-1] the first packet must be CONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_packet_not_connect_closes() {
    let b = common::start(&[]).await;
    let mut r = Raw::connect(b.addr()).await;
    r.send_bytes(&[0xC0, 0x00]).await; // PINGREQ
    assert!(r.closed_within(Duration::from_secs(2)).await);
}

/// [MQTT-3.8.1-1] SUBSCRIBE with wrong fixed-header flags is malformed (0x81).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_flags_violation_is_malformed() {
    let b = common::start(&[]).await;
    let mut r = connected(&b, ProtocolVersion::V5).await;
    r.send_bytes(&[0x80, 0x08, 0x00, 0x01, 0x00, 0x00, 0x02, b'a', b'/', 0x00])
        .await;
    expect_disconnect(&mut r, ReasonCode::MalformedPacket).await;
}

/// A packet above the maximum size is refused from its header (0x95).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_packet_refused_from_header() {
    let mut c = common::test_config(&[]);
    c.mqtt.max_packet_size = 1024;
    let b = common::start_with(c).await;
    let mut r = connected(&b, ProtocolVersion::V5).await;
    // PUBLISH announcing 100 000 bytes; only the header is sent.
    r.send_bytes(&[0x30, 0xA0, 0x8D, 0x06]).await;
    expect_disconnect(&mut r, ReasonCode::PacketTooLarge).await;
}

/// [MQTT-1.5.4-1] invalid UTF-8 in a topic name is a malformed packet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_topic_is_malformed() {
    let b = common::start(&[]).await;
    let mut r = connected(&b, ProtocolVersion::V5).await;
    r.send_bytes(&[0x30, 0x06, 0x00, 0x03, b'a', 0xC3, 0x28, 0x00])
        .await;
    expect_disconnect(&mut r, ReasonCode::MalformedPacket).await;
    // 3.1.1: just closed.
    let mut r = connected(&b, ProtocolVersion::V311).await;
    r.send_bytes(&[0x30, 0x05, 0x00, 0x03, b'a', 0xC3, 0x28])
        .await;
    assert!(r.closed_within(Duration::from_secs(2)).await);
}

/// [MQTT-3.3.2-2] wildcards in a PUBLISH topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_in_publish_topic_rejected() {
    let b = common::start(&[]).await;
    let mut r = connected(&b, ProtocolVersion::V5).await;
    r.send_bytes(&[0x30, 0x06, 0x00, 0x03, b'a', b'/', b'#', 0x00])
        .await;
    expect_disconnect(&mut r, ReasonCode::TopicNameInvalid).await;
}

/// Unsupported protocol level below 5: CONNACK 0x01 in 3.1.1 format
/// [MQTT-3.1.2-2] (levels above 5: `unknown_protocol_level.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_level() {
    let b = common::start(&[]).await;
    let mut r = Raw::connect(b.addr()).await;
    r.set_version(ProtocolVersion::V311);
    r.send_bytes(&[
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 2, 0x02, 0, 30, 0, 1, b'x',
    ])
    .await;
    match r.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.reason, ReasonCode::UnsupportedProtocolVersion),
        other => panic!("expected CONNACK 1, got {other:?}"),
    }
    assert!(r.closed_within(Duration::from_secs(2)).await);
}

/// A server-to-client packet from a client is a protocol error; so is a
/// client PUBLISH with a subscription identifier [MQTT-3.3.4-6].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_may_not_send_server_packets() {
    let b = common::start(&[]).await;
    let mut r = connected(&b, ProtocolVersion::V5).await;
    r.send(&Packet::PingResp).await;
    expect_disconnect(&mut r, ReasonCode::ProtocolError).await;
    let mut r = connected(&b, ProtocolVersion::V5).await;
    r.send(&Packet::Publish(lodestream_mqtt::Publish {
        dup: false,
        qos: lodestream_mqtt::QoS::AtMostOnce,
        retain: false,
        topic: "t".into(),
        packet_id: None,
        payload: bytes::Bytes::new(),
        properties: Properties {
            subscription_identifiers: vec![3],
            ..Properties::default()
        },
    }))
    .await;
    expect_disconnect(&mut r, ReasonCode::ProtocolError).await;
}

/// A connection that never sends CONNECT is closed after the CONNECT timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_closed_after_connect_timeout() {
    let mut c = common::test_config(&[]);
    c.mqtt.connect_timeout_s = 1;
    let b = common::start_with(c).await;
    let mut r = Raw::connect(b.addr()).await;
    r.send_bytes(&[0x10]).await; // half a fixed header, then silence
    let t = std::time::Instant::now();
    assert!(r.closed_within(Duration::from_secs(3)).await);
    assert!(t.elapsed() >= Duration::from_millis(900));
}

/// Garbage of every shape never takes the node down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_survives_random_garbage() {
    use rand::{Rng, SeedableRng};
    let b = common::start(&[]).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..200 {
        let mut r = if i % 2 == 0 {
            Raw::connect(b.addr()).await
        } else {
            connected(&b, ProtocolVersion::V5).await
        };
        let n = rng.gen_range(1..300);
        let junk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        r.send_bytes(&junk).await;
        drop(r);
    }
    let mut ok = connected(&b, ProtocolVersion::V311).await;
    ok.send(&Packet::PingReq).await;
    assert_eq!(ok.recv().await, Some(Packet::PingResp));
}
