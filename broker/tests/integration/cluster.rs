//! Several nodes sharing one Kafka: sessions resume on any node, take-over
//! across nodes, and a node killed with SIGKILL loses no acknowledged message.

use crate::common;
use crate::common::packets::{self, IntoPacket};
use crate::common::raw;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lodestream_mqtt::{Ack, Connect, Packet, Properties, ProtocolVersion, QoS as Q, ReasonCode};
use raw::Raw;

fn connect(id: &str, clean: bool, expiry: u32) -> Packet {
    Connect {
        clean_start: clean,
        properties: Properties {
            session_expiry_interval: Some(expiry),
            ..Properties::default()
        },
        ..packets::connect(ProtocolVersion::V5, id)
    }
    .packet()
}

async fn open(addr: std::net::SocketAddr, p: Packet) -> (Raw, lodestream_mqtt::ConnAck) {
    let mut r = Raw::connect(addr).await;
    r.send(&p).await;
    match r.recv().await {
        Some(Packet::ConnAck(c)) => (r, c),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn publish(topic: &str, id: u16, payload: String) -> Packet {
    packets::publish(topic, Q::AtLeastOnce, Some(id), payload).packet()
}

fn subscribe(filter: &str) -> Packet {
    packets::subscribe(1, filter, Q::AtLeastOnce).packet()
}

/// Receives QoS 1 PUBLISHes (acknowledging them) until `n` distinct payloads
/// arrived or `t` passed; returns payloads in arrival order.
async fn collect(r: &mut Raw, n: usize, t: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + t;
    let mut distinct = std::collections::HashSet::new();
    while distinct.len() < n && Instant::now() < deadline {
        match r
            .recv_within(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Some(Packet::Publish(p)) => {
                if let Some(id) = p.packet_id {
                    r.send(&Packet::PubAck(Ack::new(id))).await;
                }
                let s = String::from_utf8_lossy(&p.payload).into_owned();
                distinct.insert(s.clone());
                got.push(s);
            }
            Some(Packet::Disconnect(d)) => panic!("disconnected while collecting: {d:?}"),
            Some(_) => {}
            None => break,
        }
    }
    got
}

/// A persistent session created on node A resumes on node B with session
/// present, and receives in order every message published while offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_resumes_on_another_node() {
    let a = common::start(&[]).await;
    let b = common::start_peer(&a).await;
    let id = common::unique("roamer");
    let (mut s, ack) = open(a.addr(), connect(&id, true, 300)).await;
    assert!(!ack.session_present);
    s.send(&subscribe("roam/#")).await;
    assert!(matches!(s.recv().await, Some(Packet::SubAck(_))));
    s.send(&Packet::Disconnect(lodestream_mqtt::Disconnect::new(
        ReasonCode::Success,
    )))
    .await;
    assert!(s.closed_within(Duration::from_secs(3)).await);

    let (mut p, _) = open(b.addr(), connect(&common::unique("p"), true, 0)).await;
    for i in 0..50u16 {
        p.send(&publish("roam/x", i + 1, format!("{i}"))).await;
    }
    for _ in 0..50 {
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    let (mut s, ack) = open(b.addr(), connect(&id, false, 300)).await;
    assert!(
        ack.session_present,
        "[MQTT-3.2.2-2] session present on another node"
    );
    let got = collect(&mut s, 50, Duration::from_secs(20)).await;
    let want: Vec<String> = (0..50).map(|i| i.to_string()).collect();
    assert_eq!(got, want, "every offline message, in order, once");
    // And live delivery continues on B.
    p.send(&publish("roam/x", 100, "live".into())).await;
    let live = collect(&mut s, 1, Duration::from_secs(10)).await;
    assert_eq!(live, vec!["live".to_string()]);
}

/// A client connected on node A that connects on node B: A sends
/// DISCONNECT 0x8E within 2 s; the session moves to B, coordinated only
/// through Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_across_nodes() {
    let a = common::start(&[]).await;
    let b = common::start_peer(&a).await;
    let id = common::unique("mover");
    let (mut on_a, _) = open(a.addr(), connect(&id, true, 300)).await;
    on_a.send(&subscribe("move/#")).await;
    assert!(matches!(on_a.recv().await, Some(Packet::SubAck(_))));
    let t = Instant::now();
    let (mut on_b, ack) = open(b.addr(), connect(&id, false, 300)).await;
    assert!(ack.session_present);
    match on_a.recv_within(Duration::from_secs(2)).await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::SessionTakenOver),
        other => panic!("expected DISCONNECT 0x8E on node A, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2) + Duration::from_millis(500));
    let (mut p, _) = open(a.addr(), connect(&common::unique("p"), true, 0)).await;
    p.send(&publish("move/1", 1, "after".into())).await;
    let got = collect(&mut on_b, 1, Duration::from_secs(10)).await;
    assert_eq!(got, vec!["after".to_string()]);
    assert!(on_a.closed_within(Duration::from_secs(2)).await);
}

/// SIGKILL a node in the middle of QoS 1 streams: every acknowledged
/// PUBLISH is in Kafka, and a persistent subscriber that moves to a
/// surviving node gets every message, in order per topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_mid_stream_loses_nothing_acknowledged() {
    let survivor = common::start(&[]).await;
    let [port] = common::free_ports();
    let mut victim = common::spawn_node(port, &survivor, &common::unique("victim"));
    common::wait_port(port).await;
    let victim_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // Subscriber and publisher both on the node that will die.
    let sub_id = common::unique("sub");
    let (mut s, _) = open(victim_addr, connect(&sub_id, true, 600)).await;
    s.send(&subscribe("kill/#")).await;
    assert!(matches!(s.recv().await, Some(Packet::SubAck(_))));
    let (mut p, _) = open(victim_addr, connect(&common::unique("pub"), true, 0)).await;
    // A client with a Last Will on the node that dies, and a watcher on the survivor.
    let (mut watcher, _) = open(survivor.addr(), connect(&common::unique("watch"), true, 0)).await;
    watcher.send(&subscribe("wills/#")).await;
    assert!(matches!(watcher.recv().await, Some(Packet::SubAck(_))));
    let mut with_will = Raw::connect(victim_addr).await;
    with_will
        .send(&Packet::Connect(Box::new(Connect {
            protocol: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 60,
            client_id: common::unique("willer"),
            will: Some(lodestream_mqtt::LastWill {
                topic: "wills/victim".into(),
                payload: Bytes::from_static(b"node died"),
                qos: Q::AtLeastOnce,
                retain: false,
                properties: Properties::default(),
            }),
            username: None,
            password: None,
            properties: Properties::default(),
        })))
        .await;
    assert!(matches!(with_will.recv().await, Some(Packet::ConnAck(_))));

    const N: u32 = 2000;
    let mut acked: Vec<u32> = Vec::new();
    let mut next = 0u32;
    let mut inflight: BTreeMap<u16, u32> = BTreeMap::new();
    let mut received: Vec<String> = Vec::new();
    let kill_after = N / 2;
    let mut killed = false;
    // Publish with a window of 20 in flight; read subscriber deliveries too.
    while next < N || !inflight.is_empty() {
        if !killed && acked.len() as u32 >= kill_after {
            victim.0.kill().expect("SIGKILL");
            let _ = victim.0.wait();
            killed = true;
            break;
        }
        while inflight.len() < 20 && next < N {
            let pid = (next % 60000) as u16 + 1;
            p.send(&publish(
                &format!("kill/{}", next % 4),
                pid,
                next.to_string(),
            ))
            .await;
            inflight.insert(pid, next);
            next += 1;
        }
        tokio::select! {
            r = p.recv_within(Duration::from_secs(10)) => match r {
                Some(Packet::PubAck(a)) => {
                    if let Some(n) = inflight.remove(&a.packet_id) {
                        acked.push(n);
                    }
                }
                Some(_) => {}
                None => panic!("publisher lost before the kill"),
            },
            r = s.recv_within(Duration::from_millis(50)) => {
                if let Some(Packet::Publish(m)) = r {
                    if let Some(id) = m.packet_id {
                        s.send(&Packet::PubAck(Ack::new(id))).await;
                    }
                    received.push(String::from_utf8_lossy(&m.payload).into_owned());
                }
            }
        }
    }
    assert!(killed);
    let killed_at = Instant::now();
    // The survivor sees the node's heartbeats stop and publishes the will.
    let will = collect(&mut watcher, 1, Duration::from_secs(30)).await;
    assert_eq!(
        will,
        vec!["node died".to_string()],
        "[MQTT-3.1.2-8] will of a client on a dead node"
    );
    eprintln!("will published {:?} after SIGKILL", killed_at.elapsed());
    drop(p);
    drop(s);
    drop(with_will);
    // Every acknowledged message is in Kafka.
    // Unacknowledged in-flight messages may have landed too: read all that
    // were sent (or until the topic is drained).
    let recs = common::read_topic(
        &survivor.default_topic,
        next as usize,
        Duration::from_secs(15),
    );
    let in_kafka: std::collections::HashSet<String> = recs
        .iter()
        .filter_map(|r| {
            r.value
                .as_ref()
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
        .collect();
    let lost: Vec<&u32> = acked
        .iter()
        .filter(|n| !in_kafka.contains(&n.to_string()))
        .collect();
    assert!(lost.is_empty(), "acknowledged but not in Kafka: {lost:?}");

    // The subscriber resumes on the survivor and gets everything that was
    // acknowledged, in order per topic (QoS 1: repeats allowed).
    let (mut s, ack) = open(survivor.addr(), connect(&sub_id, false, 600)).await;
    assert!(ack.session_present, "session survives its node");
    let want: std::collections::HashSet<String> = acked.iter().map(|n| n.to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut have: std::collections::HashSet<String> = received.iter().cloned().collect();
    while !want.is_subset(&have) && Instant::now() < deadline {
        let more = collect(&mut s, 1, Duration::from_secs(5)).await;
        if more.is_empty() {
            break;
        }
        for m in more {
            received.push(m.clone());
            have.insert(m);
        }
    }
    let missing: Vec<&String> = want.difference(&have).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages never delivered, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    // Order per topic: for each topic, first deliveries are increasing.
    let mut last: BTreeMap<u32, u32> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for m in &received {
        let n: u32 = m.parse().unwrap();
        if !seen.insert(n) {
            continue;
        }
        let t = n % 4;
        if let Some(prev) = last.get(&t) {
            assert!(n > *prev, "topic kill/{t}: {n} after {prev}");
        }
        last.insert(t, n);
    }
    eprintln!(
        "acked {} before SIGKILL, delivered {} ({} distinct)",
        acked.len(),
        received.len(),
        seen.len()
    );
}

/// A client with a delayed will drops off a node, and the node is killed
/// before the delay ends: a survivor still publishes the will, when it is
/// due (counted from the disconnect, not from the adoption), and once
/// [MQTT-3.1.3-9].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_will_survives_its_node() {
    let survivor = common::start(&[]).await;
    let [port] = common::free_ports();
    let mut victim = common::spawn_node(port, &survivor, &common::unique("victim"));
    common::wait_port(port).await;
    let victim_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (mut watcher, _) = open(survivor.addr(), connect(&common::unique("watch"), true, 0)).await;
    watcher.send(&subscribe("dwills/#")).await;
    assert!(matches!(watcher.recv().await, Some(Packet::SubAck(_))));

    let mut c = Raw::connect(victim_addr).await;
    c.send(&Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 60,
        client_id: common::unique("delayed"),
        will: Some(lodestream_mqtt::LastWill {
            topic: "dwills/one".into(),
            payload: Bytes::from_static(b"gone"),
            qos: Q::AtLeastOnce,
            retain: false,
            properties: Properties {
                will_delay_interval: Some(6),
                ..Properties::default()
            },
        }),
        username: None,
        password: None,
        properties: Properties {
            session_expiry_interval: Some(300),
            ..Properties::default()
        },
    })))
    .await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));
    // Network drop (no DISCONNECT): the will is kept, delayed 6 s.
    drop(c);
    let dropped_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    victim.0.kill().expect("SIGKILL");
    let _ = victim.0.wait();
    // Nothing before the delay, even though the node is detected dead at ~3 s.
    let early = collect(&mut watcher, 1, Duration::from_secs(4)).await;
    assert!(
        early.is_empty(),
        "will published before its delay: {early:?}"
    );
    let will = collect(&mut watcher, 1, Duration::from_secs(20)).await;
    let after = dropped_at.elapsed();
    assert_eq!(
        will,
        vec!["gone".to_string()],
        "[MQTT-3.1.2-8] delayed will of a client on a dead node"
    );
    assert!(
        after >= Duration::from_secs(6),
        "published {after:?} after the disconnect"
    );
    eprintln!(
        "delayed will published {after:?} after the disconnect (delay 6 s, node killed at 0.5 s)"
    );
    let again = collect(&mut watcher, 1, Duration::from_secs(4)).await;
    assert!(again.is_empty(), "will published twice");
}
