//! Operations: per-client publish rate, graceful shutdown of the binary.

use crate::common;
use crate::common::packets::{self, IntoPacket};
use crate::common::raw;

use std::time::{Duration, Instant};

use lodestream_mqtt::{Ack, Connect, Packet, ProtocolVersion, QoS, ReasonCode};
use raw::Raw;

fn connect(id: &str) -> Packet {
    Connect {
        keep_alive: 60,
        ..packets::connect(ProtocolVersion::V5, id)
    }
    .packet()
}

/// Over `mqtt.max_publish_rate` the client is slowed (its socket is not
/// read), nothing is dropped and it stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rate_limit_slows_without_dropping() {
    let mut c = common::test_config(&[]);
    c.mqtt.max_publish_rate = 20;
    let b = common::start_with(c).await;
    let mut r = Raw::connect(b.addr()).await;
    r.send(&connect(&common::unique("rate"))).await;
    assert!(matches!(r.recv().await, Some(Packet::ConnAck(_))));
    let t = Instant::now();
    for i in 1..=60u16 {
        r.send(&packets::publish("rate/t", QoS::AtLeastOnce, Some(i), &b"x"[..]).packet())
            .await;
    }
    for i in 1..=60u16 {
        assert_eq!(
            r.recv_within(Duration::from_secs(10)).await,
            Some(Packet::PubAck(Ack::new(i)))
        );
    }
    let e = t.elapsed();
    // 20 at once (burst), then 40 at 20/s: about 2 s.
    assert!(e >= Duration::from_millis(1700), "rate not enforced: {e:?}");
    assert_eq!(
        common::read_topic(&b.default_topic, 60, Duration::from_secs(10)).len(),
        60
    );
    let m = common::scrape(&b).await;
    assert!(common::metric(&m, "lodestream_publish_throttled_total") > 0.0);
}

/// SIGTERM: MQTT 5 clients get DISCONNECT 0x8B (server shutting down), the
/// process exits 0 within the grace period, acknowledged messages are in Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_disconnects_clients_with_0x8b_and_exits() {
    let first = common::start(&[]).await;
    let c = &first.node().config().kafka;
    let [port] = common::free_ports();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_broker"))
        // $SYS off: its retained figures would land in the topic read below.
        .env("LODESTREAM_SYS__INTERVAL_S", "0")
        .args([
            "--tcp",
            &format!("127.0.0.1:{port}"),
            "--metrics",
            "",
            "--shutdown-grace-s",
            "5",
        ])
        .env("LODESTREAM_LISTENERS__WS", "")
        .env("LODESTREAM_KAFKA__BOOTSTRAP_SERVERS", common::kafka())
        .env("LODESTREAM_KAFKA__DEFAULT_TOPIC", &c.default_topic)
        .env("LODESTREAM_KAFKA__RETAINED_TOPIC", &c.retained_topic)
        .env("LODESTREAM_KAFKA__SESSIONS_TOPIC", &c.sessions_topic)
        .env("LODESTREAM_KAFKA__NODES_TOPIC", &c.nodes_topic)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("broker binary");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut r = None;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            r = Some(Raw::connect(addr).await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut r = r.expect("broker listening");
    r.send(&connect(&common::unique("bye"))).await;
    assert!(matches!(r.recv().await, Some(Packet::ConnAck(_))));
    r.send(&packets::publish("bye/t", QoS::AtLeastOnce, Some(1), &b"last"[..]).packet())
        .await;
    assert_eq!(r.recv().await, Some(Packet::PubAck(Ack::new(1))));
    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    match r.recv_within(Duration::from_secs(5)).await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::ServerShuttingDown),
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "broker did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    let recs = common::read_topic(&first.default_topic, 1, Duration::from_secs(10));
    assert_eq!(recs[0].value.as_deref(), Some(&b"last"[..]));
}

fn publish(id: u16) -> Packet {
    packets::publish("coalesce/t", QoS::AtLeastOnce, Some(id), &b"x"[..]).packet()
}

/// Wake-up coalescing in the binary (`kafka/wake_pause.rs`): while every
/// PUBLISH takes the batch lane at 200 msg/s or more (here 400 clients'
/// first PUBLISHes, sparse by definition), workers pause before sleeping;
/// a client that waits for each PUBACK takes the fast lane and is never
/// paused for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_publishers_coalesce_wake_ups_and_a_waiting_client_is_not_paused_for() {
    let first = common::start(&[]).await;
    let [port, metrics_port] = common::free_ports();
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let node_id = common::unique("coalesce");
    let _node = common::spawn_node_metrics(port, &metrics.to_string(), &first, &node_id, &[]);
    common::wait_port(port).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let pauses = |m: String| common::metric(&m, "lodestream_wake_pauses_total");
    let mut clients = Vec::new();
    for i in 0..400 {
        let mut r = Raw::connect(addr).await;
        r.send(&connect(&format!("{node_id}-{i}"))).await;
        assert!(matches!(r.recv().await, Some(Packet::ConnAck(_))));
        clients.push(r);
    }
    // 40 every 100 ms (the lane policy's window): 400 msg/s for a second.
    for chunk in clients.chunks_mut(40) {
        for r in chunk.iter_mut() {
            r.send(&publish(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for r in &mut clients {
        assert_eq!(r.recv().await, Some(Packet::PubAck(Ack::new(1))));
    }
    assert!(pauses(common::scrape_at(metrics).await) > 0.0, "no pause");
    // The decision lapses once no window closes (the node went quiet).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = pauses(common::scrape_at(metrics).await);
    let w = &mut clients[0];
    for id in 2..=201u16 {
        w.send(&publish(id)).await;
        assert_eq!(w.recv().await, Some(Packet::PubAck(Ack::new(id))));
    }
    assert_eq!(pauses(common::scrape_at(metrics).await), before);
}
