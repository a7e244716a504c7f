//! Hostile and broken clients (issue #9): slowloris, half-open and silent
//! connections, oversize and malformed input, packet-id abuse, subscription
//! storms, clients that never read, and connection churn. Each test checks
//! that the offender is cut off by a configured limit and that the node
//! stays bounded and keeps serving everyone else. Observed numbers are
//! printed (`cargo test -- --nocapture`) and recorded in docs/robustness.md.

use crate::common;
use crate::common::packets::{self, IntoPacket};
use crate::common::raw;
use crate::common::wait_metric;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use lodestream_mqtt::codec::MAX_PACKET_SIZE;
use lodestream_mqtt::{
    encode, Ack, Connect, Decoder, Disconnect, Packet, ProtocolVersion, QoS, ReasonCode,
};
use raw::Raw;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::RwLock;

/// The churn test measures the whole test process (fds, RSS), in which every
/// test's broker runs: it takes this lock exclusively, the others share it.
/// Tests that measure the process also re-run in a process of their own
/// (`common::in_own_process`): the one test binary holds every area's tests.
static PROCESS: LazyLock<RwLock<()>> = LazyLock::new(|| RwLock::new(()));

// ----- helpers ---------------------------------------------------------------

fn connect_packet(v: ProtocolVersion, id: &str, keep_alive: u16) -> Packet {
    Connect {
        keep_alive,
        ..packets::connect(v, id)
    }
    .packet()
}

fn wire(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode(p, v, &mut b).expect("encode");
    b.to_vec()
}

async fn connected(b: &common::Broker, v: ProtocolVersion, keep_alive: u16) -> Raw {
    let mut r = Raw::connect(b.addr()).await;
    r.send(&connect_packet(v, &common::unique("hostile"), keep_alive))
        .await;
    match r.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.reason, ReasonCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    r
}

async fn expect_disconnect(r: &mut Raw, reason: ReasonCode, what: &str) {
    match r.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, reason, "{what}"),
        other => panic!("{what}: expected DISCONNECT {reason:?}, got {other:?}"),
    }
    assert!(
        r.closed_within(Duration::from_secs(2)).await,
        "{what}: connection closed after DISCONNECT"
    );
}

async fn ping_ok(r: &mut Raw) {
    r.send(&Packet::PingReq).await;
    assert_eq!(r.recv().await, Some(Packet::PingResp), "PINGREQ answered");
}

/// Polls the node's metrics until `name` satisfies `ok` or `t` passed;
/// returns the last value.
fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n & 0x7F) as u8;
        n >>= 7;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

/// A packet from raw parts, so it can carry what the encoder refuses.
fn raw_packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

fn raw_str(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// QoS 0 PUBLISH with arbitrary topic bytes.
fn raw_publish(topic: &[u8], v5: bool) -> Vec<u8> {
    let mut body = Vec::new();
    raw_str(topic, &mut body);
    if v5 {
        body.push(0); // property length
    }
    body.extend_from_slice(b"x");
    raw_packet(0x30, &body)
}

/// SUBSCRIBE (id 1, QoS 0) with arbitrary filter bytes.
fn raw_subscribe(filter: &[u8], v5: bool) -> Vec<u8> {
    let mut body = vec![0, 1];
    if v5 {
        body.push(0);
    }
    raw_str(filter, &mut body);
    body.push(0);
    raw_packet(0x82, &body)
}

/// UNSUBSCRIBE (id 1) with arbitrary filter bytes.
fn raw_unsubscribe(filter: &[u8], v5: bool) -> Vec<u8> {
    let mut body = vec![0, 1];
    if v5 {
        body.push(0);
    }
    raw_str(filter, &mut body);
    raw_packet(0xA2, &body)
}

fn publish(topic: &str, qos: QoS, id: Option<u16>, payload: Bytes) -> Packet {
    packets::publish(topic, qos, id, payload).packet()
}

fn subscribe(id: u16, filter: &str, qos: QoS) -> Packet {
    packets::subscribe(id, filter, qos).packet()
}

/// Open file descriptors of this process (the in-process broker included).
/// SUBSCRIBE (packet id 1) and its SUBACK.
async fn subscribed(r: &mut Raw, filter: &str, qos: QoS) {
    r.send(&subscribe(1, filter, qos)).await;
    assert!(matches!(r.recv().await, Some(Packet::SubAck(_))));
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident set size of this process, KiB.
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

/// Reads until EOF/error or `t`; returns (bytes read, closed).
async fn read_until_closed(s: &mut (impl AsyncReadExt + Unpin), t: Duration) -> (usize, bool) {
    let deadline = tokio::time::Instant::now() + t;
    let mut total = 0;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (total, true),
            Ok(Ok(n)) => total += n,
            Err(_) => return (total, false),
        }
    }
}

// ----- tests ------------------------------------------------------------------

/// Slowloris: a CONNECT trickled one byte per 200 ms is cut when
/// `mqtt.connect_timeout_s` runs out, whatever the pace; the timeout bounds
/// the whole CONNECT, not the gap between bytes. A slow CONNECT that
/// completes in time is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connect_is_cut_by_connect_timeout() {
    let _g = PROCESS.read().await;
    let mut c = common::test_config(&[]);
    c.mqtt.connect_timeout_s = 2;
    let b = common::start_with(c).await;

    let connect = wire(
        &connect_packet(ProtocolVersion::V5, &common::unique("slowloris"), 30),
        ProtocolVersion::V5,
    );
    let stream = TcpStream::connect(b.addr()).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let sent = Arc::new(AtomicUsize::new(0));
    let sent2 = sent.clone();
    let bytes = connect.clone();
    let trickle = tokio::spawn(async move {
        for byte in bytes {
            if wr.write_all(&[byte]).await.is_err() {
                return;
            }
            sent2.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let t = Instant::now();
    let (got, closed) = read_until_closed(&mut rd, Duration::from_secs(8)).await;
    let elapsed = t.elapsed();
    trickle.abort();
    let sent = sent.load(Ordering::Relaxed);
    eprintln!(
        "slowloris: closed={closed} after {elapsed:?}, {sent}/{} CONNECT bytes sent",
        connect.len()
    );
    assert!(closed, "slowloris connection closed");
    assert_eq!(got, 0, "no CONNACK for an incomplete CONNECT");
    assert!(sent < connect.len(), "closed before the CONNECT completed");
    assert!(
        elapsed >= Duration::from_millis(1800) && elapsed < Duration::from_secs(4),
        "closed by the 2 s connect timeout, took {elapsed:?}"
    );
    let rejected = wait_metric(
        &b,
        "lodestream_connect_rejected_total{reason=\"timeout\"}",
        Duration::from_secs(2),
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(rejected, 1.0);

    // Slow but within the timeout: 25 ms per byte of a short 3.1.1 CONNECT
    // (well inside the 2 s limit even on a loaded machine).
    let connect = wire(
        &connect_packet(ProtocolVersion::V311, "slow-but-ok", 30),
        ProtocolVersion::V311,
    );
    let mut r = Raw::connect(b.addr()).await;
    r.set_version(ProtocolVersion::V311);
    for byte in &connect {
        r.send_bytes(&[*byte]).await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        matches!(r.recv().await, Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success),
        "a slow CONNECT completed within the timeout is accepted"
    );
    ping_ok(&mut r).await;
}

/// Half-open connection: a client that goes silent after CONNECT is closed
/// after 1.5 x its Keep Alive [MQTT-3.1.2-24]; v5 is told why (0x8D).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_client_closed_after_one_and_a_half_keep_alive() {
    let _g = PROCESS.read().await;
    let b = common::start(&[]).await;

    let mut r = connected(&b, ProtocolVersion::V5, 1).await;
    let t = Instant::now();
    match r.recv_within(Duration::from_secs(5)).await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::KeepAliveTimeout),
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
    let v5_elapsed = t.elapsed();
    assert!(r.closed_within(Duration::from_secs(2)).await);

    let mut r = connected(&b, ProtocolVersion::V311, 2).await;
    let t = Instant::now();
    assert!(
        r.closed_within(Duration::from_secs(6)).await,
        "3.1.1 closed"
    );
    let v3_elapsed = t.elapsed();
    eprintln!("half-open: keep-alive 1 s (v5) closed after {v5_elapsed:?}, 2 s (3.1.1) after {v3_elapsed:?}");
    assert!(
        v5_elapsed >= Duration::from_millis(1400) && v5_elapsed < Duration::from_millis(2500),
        "v5 keep alive 1 s: closed after {v5_elapsed:?}, expected ~1.5 s"
    );
    assert!(
        v3_elapsed >= Duration::from_millis(2900) && v3_elapsed < Duration::from_millis(4000),
        "3.1.1 keep alive 2 s: closed after {v3_elapsed:?}, expected ~3 s"
    );
    let ka = common::metric(
        &common::scrape(&b).await,
        "lodestream_disconnects_total{reason=\"keep_alive\"}",
    );
    assert_eq!(ka, 2.0, "both counted as keep-alive disconnects");

    // A client that keeps talking stays connected past 1.5 x keep alive.
    let mut r = connected(&b, ProtocolVersion::V5, 1).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        ping_ok(&mut r).await;
    }
}

/// TCP connections that never send CONNECT are all closed after
/// `mqtt.connect_timeout_s`, and leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_send_connect_are_closed() {
    let _g = PROCESS.read().await;
    let mut c = common::test_config(&[]);
    c.mqtt.connect_timeout_s = 1;
    let b = common::start_with(c).await;
    const N: usize = 50;
    let mut socks = Vec::new();
    for _ in 0..N {
        socks.push(TcpStream::connect(b.addr()).await.unwrap());
    }
    let open = wait_metric(&b, "lodestream_connections", Duration::from_secs(2), |v| {
        v == N as f64
    })
    .await;
    assert_eq!(open, N as f64, "all idle connections accepted");
    let t = Instant::now();
    let mut closed = 0;
    for s in &mut socks {
        let (got, c) = read_until_closed(s, Duration::from_secs(4)).await;
        assert_eq!(got, 0, "nothing is sent to a client without CONNECT");
        closed += usize::from(c);
    }
    let elapsed = t.elapsed();
    eprintln!("no CONNECT: {closed}/{N} closed within {elapsed:?} (connect timeout 1 s)");
    assert_eq!(closed, N);
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    let open = wait_metric(&b, "lodestream_connections", Duration::from_secs(2), |v| {
        v == 0.0
    })
    .await;
    assert_eq!(open, 0.0, "connection gauge back to 0");
    let rejected = common::metric(
        &common::scrape(&b).await,
        "lodestream_connect_rejected_total{reason=\"timeout\"}",
    );
    assert_eq!(rejected, N as f64);
}

/// Remaining lengths that are too large or malformed are refused from the
/// fixed header, before any body arrives: v5 gets 0x95 / 0x81, 3.1.1 and
/// pre-CONNECT connections are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_and_malformed_remaining_length() {
    if common::in_own_process(module_path!(), "oversize_and_malformed_remaining_length") {
        return;
    }
    let _g = PROCESS.read().await;
    let b = common::start(&[]).await; // default max_packet_size: 1 MiB
    let rss_before = rss_kib();

    // 268,435,455 bytes announced (the protocol maximum), nothing sent.
    let t = Instant::now();
    let mut r = connected(&b, ProtocolVersion::V5, 30).await;
    r.send_bytes(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    expect_disconnect(&mut r, ReasonCode::PacketTooLarge, "max remaining length").await;
    let too_large = t.elapsed();

    // Just above the configured maximum (1 MiB incl. header): 0x95.
    let mut r = connected(&b, ProtocolVersion::V5, 30).await;
    let mut hdr = vec![0x30];
    varint(1024 * 1024 - 3, &mut hdr); // 1 + 3 + (1 MiB - 3) = 1 MiB + 1
    r.send_bytes(&hdr).await;
    expect_disconnect(&mut r, ReasonCode::PacketTooLarge, "max_packet_size + 1").await;

    // Five length bytes, and a non-minimal encoding [MQTT-1.5.5-1]: 0x81.
    for (what, bytes) in [
        (
            "5-byte remaining length",
            &[0x30u8, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..],
        ),
        ("non-minimal remaining length", &[0xC0, 0x80, 0x00][..]),
    ] {
        let mut r = connected(&b, ProtocolVersion::V5, 30).await;
        r.send_bytes(bytes).await;
        expect_disconnect(&mut r, ReasonCode::MalformedPacket, what).await;
    }

    // 3.1.1: no DISCONNECT exists, the connection is closed.
    let mut r = connected(&b, ProtocolVersion::V311, 30).await;
    r.send_bytes(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    assert!(
        r.closed_within(Duration::from_secs(2)).await,
        "3.1.1 oversize closed"
    );

    // As the first packet: a CONNECT announcing 268 MB is closed at once.
    let t = Instant::now();
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(&[0x10, 0xFF, 0xFF, 0xFF, 0x7F, 0x00, 0x04])
        .await
        .unwrap();
    let (got, closed) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    let first = t.elapsed();
    assert!(
        closed && got == 0,
        "oversize CONNECT: closed without CONNACK"
    );

    let rss_after = rss_kib();
    eprintln!(
        "oversize: v5 0x95 after {too_large:?}, oversize CONNECT closed after {first:?}; \
         RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(first < Duration::from_secs(1));
    let mut ok = connected(&b, ProtocolVersion::V311, 30).await;
    ping_ok(&mut ok).await;
}

/// Invalid UTF-8, U+0000 and wildcard misuse in topic names and filters.
/// The codec rejects the whole packet, so v5 gets DISCONNECT with the
/// precise reason (0x90 topic name, 0x8F topic filter, 0x81 malformed) and
/// 3.1.1 is closed; other clients are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_topics_and_wildcard_misuse() {
    let _g = PROCESS.read().await;
    let b = common::start(&[]).await;
    let mut bystander = connected(&b, ProtocolVersion::V5, 30).await;

    let cases: Vec<(&str, Vec<u8>, ReasonCode)> = vec![
        (
            "PUBLISH a/+",
            raw_publish(b"a/+", true),
            ReasonCode::TopicNameInvalid,
        ),
        (
            "PUBLISH #",
            raw_publish(b"#", true),
            ReasonCode::TopicNameInvalid,
        ),
        (
            "PUBLISH empty topic without alias",
            raw_publish(b"", true),
            ReasonCode::TopicNameInvalid,
        ),
        (
            "PUBLISH invalid UTF-8",
            raw_publish(b"a/\xC3\x28", true),
            ReasonCode::MalformedPacket,
        ),
        (
            "PUBLISH encoded surrogate",
            raw_publish(b"a/\xED\xA0\x80", true),
            ReasonCode::MalformedPacket,
        ),
        (
            "PUBLISH overlong '/'",
            raw_publish(b"a\xC0\xAFb", true),
            ReasonCode::MalformedPacket,
        ),
        (
            "PUBLISH U+0000",
            raw_publish(b"a/\x00", true),
            ReasonCode::MalformedPacket,
        ),
        (
            "SUBSCRIBE a/#/b",
            raw_subscribe(b"a/#/b", true),
            ReasonCode::TopicFilterInvalid,
        ),
        (
            "SUBSCRIBE a+/b",
            raw_subscribe(b"a+/b", true),
            ReasonCode::TopicFilterInvalid,
        ),
        (
            "SUBSCRIBE a/b#",
            raw_subscribe(b"a/b#", true),
            ReasonCode::TopicFilterInvalid,
        ),
        (
            "SUBSCRIBE empty filter",
            raw_subscribe(b"", true),
            ReasonCode::TopicFilterInvalid,
        ),
        (
            "SUBSCRIBE $share/g (no filter)",
            raw_subscribe(b"$share/g", true),
            ReasonCode::TopicFilterInvalid,
        ),
        (
            "SUBSCRIBE $share/g+/x",
            raw_subscribe(b"$share/g+/x", true),
            ReasonCode::TopicFilterInvalid,
        ),
        (
            "SUBSCRIBE invalid UTF-8",
            raw_subscribe(b"\xFF/#", true),
            ReasonCode::MalformedPacket,
        ),
        (
            "UNSUBSCRIBE #/a",
            raw_unsubscribe(b"#/a", true),
            ReasonCode::TopicFilterInvalid,
        ),
    ];
    for (what, bytes, reason) in cases {
        let mut r = connected(&b, ProtocolVersion::V5, 30).await;
        r.send_bytes(&bytes).await;
        expect_disconnect(&mut r, reason, what).await;
    }
    for (what, bytes) in [
        ("3.1.1 PUBLISH a/+", raw_publish(b"a/+", false)),
        (
            "3.1.1 PUBLISH invalid UTF-8",
            raw_publish(b"\xC3\x28", false),
        ),
        ("3.1.1 SUBSCRIBE a/#/b", raw_subscribe(b"a/#/b", false)),
        ("3.1.1 UNSUBSCRIBE a/#/b", raw_unsubscribe(b"a/#/b", false)),
    ] {
        let mut r = connected(&b, ProtocolVersion::V311, 30).await;
        r.send_bytes(&bytes).await;
        assert!(
            r.closed_within(Duration::from_secs(2)).await,
            "{what}: closed"
        );
    }
    ping_ok(&mut bystander).await;
    let protocol = common::metric(
        &common::scrape(&b).await,
        "lodestream_disconnects_total{reason=\"protocol\"}",
    );
    assert_eq!(
        protocol, 19.0,
        "every offender counted as a protocol disconnect"
    );
}

/// Two QoS 2 PUBLISHes with the same packet id before PUBREL are one
/// message [MQTT-4.3.3-9]: written to Kafka once. After PUBCOMP the id is
/// free and names a new message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_packet_id_reuse_is_written_once() {
    let _g = PROCESS.read().await;
    let b = common::start(&[]).await;
    for v in [ProtocolVersion::V5, ProtocolVersion::V311] {
        let topic = common::unique("reuse");
        let mut r = connected(&b, v, 30).await;
        r.send(&publish(
            &topic,
            QoS::ExactlyOnce,
            Some(7),
            Bytes::from_static(b"first"),
        ))
        .await;
        r.send(&publish(
            &topic,
            QoS::ExactlyOnce,
            Some(7),
            Bytes::from_static(b"second"),
        ))
        .await;
        match r.recv().await {
            Some(Packet::PubRec(a)) => {
                assert_eq!((a.packet_id, a.reason), (7, ReasonCode::Success))
            }
            other => panic!("{v:?}: expected PUBREC 7, got {other:?}"),
        }
        // A second PUBREC may follow (retransmission answered after the
        // Kafka write); PUBREL then completes the single flow.
        r.send(&Packet::PubRel(Ack::new(7))).await;
        loop {
            match r.recv().await {
                Some(Packet::PubRec(a)) if a.packet_id == 7 => continue,
                Some(Packet::PubComp(a)) => {
                    assert_eq!((a.packet_id, a.reason), (7, ReasonCode::Success));
                    break;
                }
                other => panic!("{v:?}: expected PUBCOMP 7, got {other:?}"),
            }
        }
        // The id is free again: a new message.
        r.send(&publish(
            &topic,
            QoS::ExactlyOnce,
            Some(7),
            Bytes::from_static(b"third"),
        ))
        .await;
        assert!(matches!(r.recv().await, Some(Packet::PubRec(a)) if a.packet_id == 7));
        r.send(&Packet::PubRel(Ack::new(7))).await;
        assert!(matches!(r.recv().await, Some(Packet::PubComp(a)) if a.packet_id == 7));

        let records: Vec<Vec<u8>> =
            common::read_topic(&b.default_topic, 100, Duration::from_secs(5))
                .into_iter()
                .filter(|rec| rec.key.as_deref() == Some(topic.as_str()))
                .filter_map(|rec| rec.value)
                .collect();
        eprintln!(
            "packet-id reuse {v:?}: Kafka records {:?}",
            records
                .iter()
                .map(|r| String::from_utf8_lossy(r))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            records,
            vec![b"first".to_vec(), b"third".to_vec()],
            "{v:?}: the reused id was written once, the freed id anew"
        );
    }
}

/// PUBREL for a packet id the broker does not know: v5 PUBCOMP 0x92
/// (Packet Identifier not found), 3.1.1 PUBCOMP [MQTT-4.3.3-11]; the
/// connection stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubrel_for_unknown_packet_id() {
    let _g = PROCESS.read().await;
    let b = common::start(&[]).await;
    let mut r = connected(&b, ProtocolVersion::V5, 30).await;
    for id in [42u16, 1, u16::MAX] {
        r.send(&Packet::PubRel(Ack::new(id))).await;
        match r.recv().await {
            Some(Packet::PubComp(a)) => {
                assert_eq!(a.packet_id, id);
                assert_eq!(a.reason, ReasonCode::PacketIdentifierNotFound);
            }
            other => panic!("expected PUBCOMP 0x92, got {other:?}"),
        }
    }
    ping_ok(&mut r).await;
    let mut r = connected(&b, ProtocolVersion::V311, 30).await;
    r.send(&Packet::PubRel(Ack::new(42))).await;
    assert!(matches!(r.recv().await, Some(Packet::PubComp(a)) if a.packet_id == 42));
    ping_ok(&mut r).await;
    // Stray PUBACK / PUBREC / PUBCOMP for unknown ids are ignored or
    // answered, never fatal.
    r.send(&Packet::PubAck(Ack::new(9))).await;
    r.send(&Packet::PubComp(Ack::new(9))).await;
    r.send(&Packet::PubRec(Ack::new(9))).await;
    assert!(matches!(r.recv().await, Some(Packet::PubRel(a)) if a.packet_id == 9));
    ping_ok(&mut r).await;
}

/// One client sending 10,000 SUBSCRIBEs (each a new filter): the first
/// `mqtt.max_subscriptions_per_client` are granted, every other one gets
/// 0x97 (3.1.1: 0x80); the node holds no more than the limit, and the
/// client's SUBACKs keep coming in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_storm_is_bounded_per_client() {
    let _g = PROCESS.read().await;
    const LIMIT: usize = 100;
    const N: u16 = 10_000;
    let mut c = common::test_config(&[]);
    c.mqtt.max_subscriptions_per_client = LIMIT;
    let b = common::start_with(c).await;

    let v = ProtocolVersion::V5;
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(&wire(&connect_packet(v, &common::unique("storm"), 60), v))
        .await
        .unwrap();
    let (mut rd, mut wr) = s.into_split();
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        let mut batch = Vec::new();
        for id in 1..=N {
            batch.extend(wire(
                &subscribe(id, &format!("storm/{id}/+"), QoS::AtLeastOnce),
                v,
            ));
            if batch.len() > 16 * 1024 || id == N {
                wr.write_all(&batch).await.unwrap();
                batch.clear();
            }
        }
        wr
    });
    let mut dec = Decoder::new(MAX_PACKET_SIZE);
    dec.set_version(v);
    let mut buf = BytesMut::new();
    let (mut granted, mut quota, mut other, mut next_id) = (0usize, 0usize, 0usize, 1u16);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while usize::from(next_id) <= usize::from(N) {
        match dec.decode(&mut buf) {
            Ok(Some(Packet::ConnAck(_))) => {}
            Ok(Some(Packet::SubAck(a))) => {
                assert_eq!(a.packet_id, next_id, "SUBACKs in order");
                next_id = next_id.wrapping_add(1);
                match a.reasons[..] {
                    [ReasonCode::GrantedQoS1] => granted += 1,
                    [ReasonCode::QuotaExceeded] => quota += 1,
                    _ => other += 1,
                }
                if next_id == 0 {
                    break;
                }
            }
            Ok(Some(p)) => panic!("unexpected {p:?}"),
            Ok(None) => {
                let n = tokio::time::timeout_at(deadline, rd.read_buf(&mut buf))
                    .await
                    .expect("SUBACKs within 120 s")
                    .unwrap();
                assert!(n > 0, "connection closed during the storm");
            }
            Err(e) => panic!("decode: {e}"),
        }
    }
    let elapsed = t.elapsed();
    let mut wr = writer.await.unwrap();
    let subs = common::metric(&common::scrape(&b).await, "lodestream_subscriptions");
    eprintln!(
        "subscribe storm: {N} SUBSCRIBEs answered in {elapsed:?}: {granted} granted, \
         {quota} x 0x97, {other} other; node subscriptions gauge {subs}"
    );
    assert_eq!((granted, quota, other), (LIMIT, usize::from(N) - LIMIT, 0));
    assert_eq!(subs, LIMIT as f64);

    // Re-subscribing to a filter it already has is not a new subscription.
    wr.write_all(&wire(&subscribe(1, "storm/1/+", QoS::AtMostOnce), v))
        .await
        .unwrap();
    let mut r = Raw {
        stream: rd.reunite(wr).unwrap(),
        buf,
        dec,
        version: v,
    };
    match r.recv().await {
        Some(Packet::SubAck(a)) => assert_eq!(a.reasons, vec![ReasonCode::Success]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    ping_ok(&mut r).await;
    r.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)))
        .await;
    let subs = wait_metric(
        &b,
        "lodestream_subscriptions",
        Duration::from_secs(5),
        |v| v == 0.0,
    )
    .await;
    assert_eq!(subs, 0.0, "all subscriptions gone with the session");

    // 3.1.1 gets 0x80 (failure) beyond the limit.
    let mut r = connected(&b, ProtocolVersion::V311, 30).await;
    for id in 1..=(LIMIT as u16 + 3) {
        r.send(&subscribe(id, &format!("v3/{id}"), QoS::AtMostOnce))
            .await;
    }
    let mut failures = 0;
    for _ in 0..LIMIT + 3 {
        match r.recv().await {
            Some(Packet::SubAck(a)) if a.reasons == [ReasonCode::UnspecifiedError] => failures += 1,
            Some(Packet::SubAck(_)) => {}
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
    assert_eq!(failures, 3);
}

/// A subscriber that never reads its socket: the broker's writes block,
/// its bounded mailbox (`mqtt.session_queue`) overflows, so it reads Kafka
/// itself instead (`lodestream_lagging_total{result="read_kafka"}`, no
/// drop), and after `mqtt.write_timeout_s` it is disconnected. Memory stays
/// bounded and the node's other clients keep working throughout; one that
/// reads gets every message, also when fan-out outran it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_never_reads_is_disconnected() {
    if common::in_own_process(module_path!(), "client_that_never_reads_is_disconnected") {
        return;
    }
    let _g = PROCESS.read().await;
    const N: usize = 600;
    const PAYLOAD: usize = 32 * 1024;
    let mut c = common::test_config(&[]);
    c.mqtt.session_queue = 32;
    c.mqtt.write_timeout_s = 2;
    let b = common::start_with(c).await;
    let topic = common::unique("busy");
    let filter = format!("{topic}/#");

    // The one that never reads (after its SUBACK).
    let mut deaf = connected(&b, ProtocolVersion::V5, 0).await;
    subscribed(&mut deaf, &filter, QoS::AtMostOnce).await;

    // A well-behaved subscriber, reading everything in a task.
    let mut good = connected(&b, ProtocolVersion::V5, 0).await;
    subscribed(&mut good, &filter, QoS::AtMostOnce).await;
    let good_count = Arc::new(AtomicUsize::new(0));
    let gc = good_count.clone();
    let good_task = tokio::spawn(async move {
        loop {
            match good.recv_within(Duration::from_secs(30)).await {
                Some(Packet::Publish(p)) => {
                    gc.fetch_add(1, Ordering::Relaxed);
                    if p.payload.as_ref() == b"after" {
                        return (good, true);
                    }
                }
                Some(_) => {}
                None => return (good, false),
            }
        }
    });

    let rss_before = rss_kib();
    let t = Instant::now();
    let mut publ = connected(&b, ProtocolVersion::V5, 0).await;
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    for i in 0..N {
        publ.send(&publish(
            &format!("{topic}/{}", i % 8),
            QoS::AtMostOnce,
            None,
            payload.clone(),
        ))
        .await;
    }
    ping_ok(&mut publ).await;
    eprintln!(
        "never-reads: published {N} x {PAYLOAD} B in {:?}",
        t.elapsed()
    );

    // The deaf client goes: 3 -> 2 connections.
    let open = wait_metric(&b, "lodestream_connections", Duration::from_secs(30), |v| {
        v <= 2.0
    })
    .await;
    let cut_after = t.elapsed();
    let m = common::scrape(&b).await;
    let dropped = common::metric(
        &m,
        "lodestream_messages_dropped_total{reason=\"queue_full_qos0\"}",
    );
    let to_kafka = common::metric(&m, "lodestream_lagging_total{result=\"read_kafka\"}");
    let network = common::metric(&m, "lodestream_disconnects_total{reason=\"network\"}");
    let rss_peak = rss_kib();
    assert_eq!(open, 2.0, "the client that never reads was disconnected");
    assert!(to_kafka >= 1.0, "its full mailbox made it read Kafka");
    assert_eq!(
        dropped, 0.0,
        "nothing dropped while under max_lagging_sessions"
    );
    assert!(
        network >= 1.0,
        "counted as a network (write timeout) disconnect"
    );

    // Everyone else still works: the publisher, and the good subscriber
    // gets a message published after the deaf one is gone.
    ping_ok(&mut publ).await;
    publ.send(&publish(
        &format!("{topic}/end"),
        QoS::AtLeastOnce,
        Some(1),
        Bytes::from_static(b"after"),
    ))
    .await;
    assert!(matches!(publ.recv().await, Some(Packet::PubAck(_))));
    let (mut good, saw_after) = good_task.await.unwrap();
    assert!(saw_after, "the reading subscriber still receives");
    ping_ok(&mut good).await;
    let got = good_count.load(Ordering::Relaxed);
    // The deaf client's socket holds what the kernel buffered; it ends in EOF.
    let (buffered, closed) = read_until_closed(&mut deaf.stream, Duration::from_secs(10)).await;
    eprintln!(
        "never-reads: deaf client cut after {cut_after:?} (write timeout 2 s), {to_kafka} \
         full mailboxes turned to reading Kafka, {dropped} QoS 0 dropped, {buffered} B were \
         buffered in its socket; good subscriber got {got}/{} messages; RSS {rss_before} -> \
         {rss_peak} KiB",
        N + 1
    );
    assert!(closed, "deaf client's socket ends in EOF");
    assert_eq!(got, N + 1, "the reading subscriber got every QoS 0 message");
    assert!(
        rss_peak < rss_before + 256 * 1024,
        "RSS grew {} KiB",
        rss_peak.saturating_sub(rss_before)
    );
}

/// 10,000 connect/disconnect cycles (3.1.1 and 5.0, clean DISCONNECT and
/// abrupt close mixed): no file descriptor or memory growth in the process
/// beyond a small tolerance, and no leftover connection, session or
/// subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_disconnect_churn_does_not_leak() {
    if common::in_own_process(module_path!(), "connect_disconnect_churn_does_not_leak") {
        return;
    }
    let _g = PROCESS.write().await; // measures the whole process: run alone
    const CYCLES: usize = 10_000;
    const WARMUP: usize = 500;
    const TASKS: usize = 4;
    let b = common::start(&[]).await;
    let addr = b.addr();

    async fn cycle(addr: std::net::SocketAddr, i: usize) {
        let v = if i.is_multiple_of(2) {
            ProtocolVersion::V311
        } else {
            ProtocolVersion::V5
        };
        let mut r = Raw::connect(addr).await;
        r.send(&connect_packet(v, &format!("churn-{i}"), 30)).await;
        if i % 8 == 3 {
            // Abrupt: close right after CONNECT, before the CONNACK is read.
            return;
        }
        match r.recv().await {
            Some(Packet::ConnAck(a)) => assert_eq!(a.reason, ReasonCode::Success),
            other => panic!("cycle {i}: expected CONNACK, got {other:?}"),
        }
        if i % 4 == 1 {
            subscribed(&mut r, &format!("churn/{i}/#"), QoS::AtLeastOnce).await;
        }
        if i % 8 != 7 {
            r.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)))
                .await;
            assert!(
                r.closed_within(Duration::from_secs(5)).await,
                "cycle {i}: closed"
            );
        }
    }
    async fn run(addr: std::net::SocketAddr, from: usize, n: usize) {
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                tokio::spawn(async move {
                    for i in (from + t..from + n).step_by(TASKS) {
                        cycle(addr, i).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    async fn settle(b: &common::Broker) {
        for name in [
            "lodestream_connections",
            "lodestream_sessions",
            "lodestream_subscriptions",
        ] {
            let v = wait_metric(b, name, Duration::from_secs(15), |v| v == 0.0).await;
            assert_eq!(v, 0.0, "{name} back to 0");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    run(addr, 0, WARMUP).await;
    settle(&b).await;
    let (fd0, rss0) = (fd_count(), rss_kib());
    let t = Instant::now();
    run(addr, WARMUP, CYCLES).await;
    let elapsed = t.elapsed();
    settle(&b).await;
    let (fd1, rss1) = (fd_count(), rss_kib());
    let total = common::metric(&common::scrape(&b).await, "lodestream_connections_total");
    eprintln!(
        "churn: {CYCLES} cycles in {elapsed:?} ({:.0}/s); fds {fd0} -> {fd1}; RSS {rss0} -> {rss1} KiB \
         (+{} KiB); connections_total {total}",
        CYCLES as f64 / elapsed.as_secs_f64(),
        rss1.saturating_sub(rss0)
    );
    assert_eq!(total, (WARMUP + CYCLES) as f64);
    assert!(fd1 <= fd0 + 8, "fd count grew from {fd0} to {fd1}");
    assert!(
        rss1 <= rss0 + 8 * 1024,
        "RSS grew from {rss0} to {rss1} KiB"
    );
}

/// Broker bug (reported, issue #9): a 3.1.1 client subscribing to a filter
/// that starts with `$share/` (a plain literal filter in 3.1.1) leaves the
/// subscription in the node's index when its session ends, because
/// `Node::drop_subscriptions` strips the `$share/{group}/` prefix for every
/// version while `on_subscribe` only does for v5. Un-ignore once fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_share_prefixed_subscription_is_removed_with_the_session() {
    let _g = PROCESS.read().await;
    let b = common::start(&[]).await;
    for i in 0..3 {
        let mut r = connected(&b, ProtocolVersion::V311, 30).await;
        r.send(&subscribe(
            1,
            &format!("$share/g/leak/{i}"),
            QoS::AtMostOnce,
        ))
        .await;
        assert!(
            matches!(r.recv().await, Some(Packet::SubAck(a)) if a.reasons == [ReasonCode::Success])
        );
        r.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)))
            .await;
        assert!(r.closed_within(Duration::from_secs(5)).await);
    }
    let subs = wait_metric(
        &b,
        "lodestream_subscriptions",
        Duration::from_secs(5),
        |v| v == 0.0,
    )
    .await;
    assert_eq!(subs, 0.0, "subscriptions of ended 3.1.1 sessions are gone");
}

/// Reported finding (issue #9): after CONNECT, any received byte resets the
/// keep-alive timer (`Io::fill` success sets `last_recv` in `Conn::run`),
/// so a client trickling one byte of a never-finished PUBLISH every 500 ms
/// keeps a Keep Alive 1 s connection (and its growing read buffer) open
/// forever. MQTT 5 [MQTT-3.1.2-22] counts Control Packets, not bytes; this
/// test asserts that reading. Un-ignore if the broker adopts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_after_connect_is_bounded_by_keep_alive() {
    let _g = PROCESS.read().await;
    let b = common::start(&[]).await;
    let mut r = connected(&b, ProtocolVersion::V5, 1).await;
    // A PUBLISH announcing 1,000 bytes, sent one byte at a time.
    let mut bytes = vec![0x30];
    varint(1000, &mut bytes);
    bytes.extend(std::iter::repeat_n(b'a', 1000));
    let t = Instant::now();
    for byte in bytes.iter().take(12) {
        r.send_bytes(&[*byte]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        if r.closed_within(Duration::from_millis(1)).await {
            break;
        }
    }
    let elapsed = t.elapsed();
    eprintln!("slowloris after CONNECT: still open after {elapsed:?}? keep alive 1 s");
    assert!(
        elapsed < Duration::from_secs(3),
        "a connection sending no complete packet outlived 1.5 x keep alive: {elapsed:?}"
    );
}

/// A node whose sessions hold 8 deliveries in flight and 16 queued, with
/// `max_lagging_sessions` sessions allowed to read Kafka themselves.
async fn small_queue_node(max_lagging_sessions: usize) -> common::Broker {
    let mut c = common::test_config(&[]);
    c.mqtt.session_queue = 16;
    c.mqtt.max_inflight_out = 8;
    c.mqtt.max_lagging_sessions = max_lagging_sessions;
    common::start_with(c).await
}

/// Publishes QoS 1 `m1`..`mN` to `topic` and waits for every PUBACK.
async fn publish_numbered(publ: &mut Raw, topic: &str, n: u16) {
    for id in 1..=n {
        let body = Bytes::from(format!("m{id}"));
        publ.send(&publish(topic, QoS::AtLeastOnce, Some(id), body))
            .await;
    }
    for _ in 1..=n {
        assert!(matches!(publ.recv().await, Some(Packet::PubAck(_))));
    }
}

/// A v5 QoS 1 subscriber that acknowledges nothing for a while, then
/// everything: while its window (8) and queue (16) are full it is not
/// disconnected; its session leaves fan-out and reads Kafka itself
/// (`lodestream_lagging_sessions` 1), and once it acknowledges it gets all
/// 100 messages, in order, none dropped; then it is back on fan-out (gauge
/// 0). Bounded: never more than `max_inflight_out` unacknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_subscriber_that_falls_behind_reads_kafka_and_loses_nothing() {
    let _g = PROCESS.read().await;
    const N: u16 = 100;
    let b = small_queue_node(32).await;
    let topic = common::unique("behind");
    let mut slow = connected(&b, ProtocolVersion::V5, 0).await;
    subscribed(&mut slow, &format!("{topic}/#"), QoS::AtLeastOnce).await;
    let mut publ = connected(&b, ProtocolVersion::V5, 0).await;
    publish_numbered(&mut publ, &format!("{topic}/x"), N).await;
    // Nothing acknowledged yet: 8 in flight, and the session reads Kafka.
    let mut got = Vec::new();
    let mut unacked = Vec::new();
    while let Some(p) = slow.recv_within(Duration::from_secs(1)).await {
        match p {
            Packet::Publish(p) => {
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
                unacked.extend(p.packet_id);
            }
            other => panic!("while not acknowledging: unexpected {other:?}"),
        }
    }
    assert_eq!(got.len(), 8, "no more than max_inflight_out unacknowledged");
    let lagging = wait_metric(
        &b,
        "lodestream_lagging_sessions",
        Duration::from_secs(5),
        |v| v == 1.0,
    )
    .await;
    assert_eq!(lagging, 1.0, "the session reads Kafka while it is behind");
    // Now it acknowledges everything, as it comes.
    for id in unacked {
        slow.send(&Packet::PubAck(Ack::new(id))).await;
    }
    while got.len() < N as usize {
        match slow.recv_within(Duration::from_secs(10)).await {
            Some(Packet::Publish(p)) => {
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
                if let Some(id) = p.packet_id {
                    slow.send(&Packet::PubAck(Ack::new(id))).await;
                }
            }
            other => panic!(
                "after {} of {N}: expected PUBLISH, got {other:?}",
                got.len()
            ),
        }
    }
    let want: Vec<String> = (1..=N).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every message once, in order");
    let back = wait_metric(
        &b,
        "lodestream_lagging_sessions",
        Duration::from_secs(10),
        |v| v == 0.0,
    )
    .await;
    let m = common::scrape(&b).await;
    let dropped = common::metric(
        &m,
        "lodestream_messages_dropped_total{reason=\"queue_full\"}",
    );
    let to_kafka = common::metric(&m, "lodestream_lagging_total{result=\"read_kafka\"}");
    eprintln!("fell behind: {N}/{N} in order, read Kafka {to_kafka} time(s), {dropped} dropped");
    assert_eq!(back, 0.0, "back on fan-out once caught up");
    assert!(to_kafka >= 1.0);
    assert_eq!(dropped, 0.0);
    // Live again: a new message arrives through fan-out.
    publ.send(&publish(
        &format!("{topic}/x"),
        QoS::AtLeastOnce,
        Some(1),
        Bytes::from_static(b"live"),
    ))
    .await;
    assert!(matches!(publ.recv().await, Some(Packet::PubAck(_))));
    match slow.recv_within(Duration::from_secs(10)).await {
        Some(Packet::Publish(p)) => assert_eq!(p.payload.as_ref(), b"live"),
        other => panic!("expected the live message, got {other:?}"),
    }
}

/// A QoS 1 subscriber slower than 4 publishers' bursts falls behind,
/// catches up in the pauses and falls behind again, many times over: each time its session leaves
/// fan-out, reads Kafka from the first message it was not given, and
/// rejoins. It gets every message exactly once, each publisher's in order
/// [MQTT-4.6.0-2], with no reconnect. Fan-out may skip the session once
/// more between the connection taking the skips and leaving fan-out; those
/// skips are covered by the same read (before, they started another read
/// from there later: thousands of duplicates in a 10-publisher benchmark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_subscriber_that_falls_behind_again_and_again_gets_each_message_once() {
    let _g = PROCESS.read().await;
    const PUBLISHERS: usize = 4;
    const N: u16 = 1500;
    let b = small_queue_node(32).await;
    let topic = common::unique("again");
    let mut sub = connected(&b, ProtocolVersion::V5, 0).await;
    subscribed(&mut sub, &format!("{topic}/#"), QoS::AtLeastOnce).await;
    let mut publishers = Vec::new();
    for k in 0..PUBLISHERS {
        let mut publ = connected(&b, ProtocolVersion::V5, 0).await;
        let topic = format!("{topic}/p{k}");
        publishers.push(tokio::spawn(async move {
            // Bursts of 100 with pauses: the subscriber falls behind in
            // each burst and catches up in the pause.
            for burst in (1..=N).collect::<Vec<u16>>().chunks(100) {
                for &id in burst {
                    let body = Bytes::from(format!("{k}:{id}"));
                    publ.send(&publish(&topic, QoS::AtLeastOnce, Some(id), body))
                        .await;
                }
                for _ in burst {
                    assert!(matches!(publ.recv().await, Some(Packet::PubAck(_))));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    let total = PUBLISHERS * N as usize;
    let mut next = [1u16; PUBLISHERS];
    let mut got = 0;
    while got < total {
        match sub.recv_within(Duration::from_secs(10)).await {
            Some(Packet::Publish(p)) => {
                let body = String::from_utf8_lossy(&p.payload).into_owned();
                let (k, id) = body.split_once(':').expect("k:id");
                let (k, id): (usize, u16) = (k.parse().expect("k"), id.parse().expect("id"));
                assert_eq!(id, next[k], "publisher {k}: each message once, in order");
                next[k] += 1;
                got += 1;
                if let Some(id) = p.packet_id {
                    sub.send(&Packet::PubAck(Ack::new(id))).await;
                }
            }
            other => panic!("after {got} of {total}: expected PUBLISH, got {other:?}"),
        }
    }
    for p in publishers {
        p.await.expect("publisher");
    }
    // Nothing more: no duplicate arrives late either.
    if let Some(p) = sub.recv_within(Duration::from_secs(1)).await {
        panic!("after all {total}: unexpected {p:?}");
    }
    let m = common::scrape(&b).await;
    let episodes = common::metric(&m, "lodestream_lagging_total{result=\"read_kafka\"}");
    eprintln!("fell behind {episodes} time(s): {total}/{total} once, in order");
    assert!(episodes >= 2.0, "the subscriber fell behind more than once");
}

/// A persistent v3.1.1 QoS 1 session whose queue overflowed while it
/// acknowledged nothing, on a node where no session may read Kafka itself
/// (`max_lagging_sessions = 0`): its connection is closed with the
/// skipped messages never delivered, and the session resumed on the next
/// connection still gets every one of them (its stored offsets do not pass
/// what fan-out skipped) [MQTT-4.4.0-1].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_closed_after_its_queue_overflowed_resumes_with_everything() {
    let _g = PROCESS.read().await;
    const N: u16 = 100;
    let b = small_queue_node(0).await;
    // Unacknowledged: 8 in flight, 16 queued, the rest skipped; 3.1.1 has
    // no DISCONNECT to tell, the connection just ends.
    let (first, all) = skipped_then_resumed(&b, "resume-skipped", N, Duration::ZERO).await;
    eprintln!("skipped then resumed: {first} before the close, {all}/{N} distinct after resuming");
    assert_eq!(all, N as usize);
}

/// A persistent 3.1.1 QoS 1 subscriber that acknowledges nothing gets `n`
/// messages, is closed when fan-out skips it, reconnects after `pause` and
/// acknowledges from then on: how many distinct messages it had before the
/// close, and in all (panics if one is missing 10 s after the last).
async fn skipped_then_resumed(
    b: &common::Broker,
    name: &str,
    n: u16,
    pause: Duration,
) -> (usize, usize) {
    let topic = common::unique(name);
    let id = common::unique("skipped");
    let persistent = || {
        Connect {
            clean_start: false,
            ..packets::connect(ProtocolVersion::V311, &id)
        }
        .packet()
    };
    let mut sub = Raw::connect(b.addr()).await;
    sub.send(&persistent()).await;
    assert!(matches!(sub.recv().await, Some(Packet::ConnAck(_))));
    subscribed(&mut sub, &format!("{topic}/#"), QoS::AtLeastOnce).await;
    let mut publ = connected(b, ProtocolVersion::V311, 0).await;
    publish_numbered(&mut publ, &format!("{topic}/x"), n).await;
    let mut got = std::collections::BTreeSet::new();
    while let Some(Packet::Publish(p)) = sub.recv_within(Duration::from_secs(2)).await {
        got.insert(String::from_utf8_lossy(&p.payload).into_owned());
    }
    drop(sub);
    let first = got.len();
    tokio::time::sleep(pause).await;
    let mut sub = Raw::connect(b.addr()).await;
    sub.send(&persistent()).await;
    match sub.recv().await {
        Some(Packet::ConnAck(a)) => assert!(a.session_present, "session resumed"),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    while got.len() < n as usize {
        match sub.recv_within(Duration::from_secs(10)).await {
            Some(Packet::Publish(p)) => {
                got.insert(String::from_utf8_lossy(&p.payload).into_owned());
                if let Some(id) = p.packet_id {
                    sub.send(&Packet::PubAck(Ack::new(id))).await;
                }
            }
            other => panic!(
                "after {} of {n}: expected PUBLISH, got {other:?}",
                got.len()
            ),
        }
    }
    (first, got.len())
}

/// As above, but the subscriber's window (64) is larger than its queue
/// (16): its connection has delivered everything queued by the time the
/// skip closes it, so nothing is left in its mailbox. Its offsets must
/// still stay where the skips began (not advance to fan-out's position at
/// the close), and the resumed session gets every message
/// [MQTT-4.4.0-1].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_closed_with_an_empty_queue_after_skips_resumes_with_everything() {
    let _g = PROCESS.read().await;
    const N: u16 = 100;
    let mut c = common::test_config(&[]);
    c.mqtt.session_queue = 16;
    c.mqtt.max_inflight_out = 64;
    c.mqtt.max_lagging_sessions = 0;
    let b = common::start_with(c).await;
    // After the close has been dealt with (not the hand-off race).
    let pause = Duration::from_millis(500);
    let (first, all) = skipped_then_resumed(&b, "resume-empty-queue", N, pause).await;
    eprintln!(
        "skipped with an empty queue, then resumed: {first} before the close, {all}/{N} after"
    );
    assert_eq!(all, N as usize);
}

/// The same subscriber that never acknowledges, on a node with
/// `mqtt.max_lagging_sessions = 0`: the broker keeps at most
/// `max_inflight_out` deliveries in flight and `mqtt.session_queue`
/// queued, counts what it cannot queue
/// (`messages_dropped_total{reason="queue_full"}`) and ends the session
/// with 0x97 (quota exceeded), so the client learns that QoS 1 messages
/// were lost, also when the overflow happens while its connection is idle
/// (window full, nothing to read). Other clients keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_subscriber_that_never_acks_past_max_lagging_sessions_gets_0x97() {
    let _g = PROCESS.read().await;
    const N: u16 = 100;
    let b = small_queue_node(0).await;
    let topic = common::unique("noack");

    let mut lazy = connected(&b, ProtocolVersion::V5, 0).await;
    subscribed(&mut lazy, &format!("{topic}/#"), QoS::AtLeastOnce).await;

    // Two bursts: the first (20) fills the in-flight window (8) and most of
    // the mailbox (16) without overflow; the second overflows it while the
    // connection has nothing to do.
    let mut publ = connected(&b, ProtocolVersion::V5, 0).await;
    let mut publishes = 0;
    for (burst, ids) in [(1, 1..=20), (2, 21..=N)] {
        for id in ids.clone() {
            publ.send(&publish(
                &format!("{topic}/x"),
                QoS::AtLeastOnce,
                Some(id),
                Bytes::from_static(b"payload"),
            ))
            .await;
        }
        for _ in ids {
            match publ.recv().await {
                Some(Packet::PubAck(_)) => {}
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
        if burst == 1 {
            while publishes < 8 {
                match lazy.recv().await {
                    Some(Packet::Publish(_)) => publishes += 1,
                    other => panic!("burst 1: expected PUBLISH, got {other:?}"),
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    // Read (never acknowledge) what the broker sends for a while.
    let mut reason = None;
    let t = Instant::now();
    while let Some(p) = lazy.recv_within(Duration::from_secs(3)).await {
        match p {
            Packet::Publish(_) => publishes += 1,
            Packet::Disconnect(d) => {
                reason = Some(d.reason);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let spontaneous = reason.is_some();
    if reason.is_none() {
        // Not told yet: its next packet must get the answer.
        lazy.send(&Packet::PingReq).await;
        loop {
            match lazy.recv().await {
                Some(Packet::Disconnect(d)) => {
                    reason = Some(d.reason);
                    break;
                }
                Some(Packet::PingResp) | Some(Packet::Publish(_)) => continue,
                other => panic!("expected DISCONNECT 0x97, got {other:?}"),
            }
        }
    }
    let m = common::scrape(&b).await;
    let dropped = common::metric(
        &m,
        "lodestream_messages_dropped_total{reason=\"queue_full\"}",
    );
    eprintln!(
        "never-acks: {publishes} PUBLISH in flight (max_inflight_out 8), {dropped} QoS 1 dropped at \
         the 16-message mailbox; DISCONNECT {reason:?} {} after {:?}",
        if spontaneous {
            "by itself"
        } else {
            "only at its next packet"
        },
        t.elapsed()
    );
    assert_eq!(publishes, 8, "no more than max_inflight_out unacknowledged");
    assert!(dropped > 0.0);
    assert_eq!(reason, Some(ReasonCode::QuotaExceeded));
    ping_ok(&mut publ).await;
}
