//! `/metrics` counters move with traffic; `/health` and `/ready` answer.

use crate::common;

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_under_traffic() {
    let b = common::start(&[]).await;
    let before = common::scrape(&b).await;
    let (c, mut el) = AsyncClient::new(
        MqttOptions::new(common::unique("m"), "127.0.0.1", b.port()),
        100,
    );
    c.subscribe("metrics/#", QoS::AtLeastOnce).await.unwrap();
    for i in 0..10 {
        c.publish("metrics/x", QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    let (mut acks, mut msgs) = (0, 0);
    while acks < 10 || msgs < 10 {
        match tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Incoming(Packet::PubAck(_)) => acks += 1,
            Event::Incoming(Packet::Publish(_)) => msgs += 1,
            _ => {}
        }
    }
    let after = common::scrape(&b).await;
    let delta = |name: &str| common::metric(&after, name) - common::metric(&before, name);
    assert_eq!(
        delta("lodestream_packets_received_total{type=\"publish\"}"),
        10.0
    );
    assert_eq!(
        delta("lodestream_packets_received_total{type=\"connect\"}"),
        1.0
    );
    assert_eq!(
        delta("lodestream_packets_sent_total{type=\"puback\"}"),
        10.0
    );
    assert_eq!(delta("lodestream_messages_delivered_total"), 10.0);
    assert_eq!(
        delta(&format!(
            "lodestream_published_to_kafka_total{{topic=\"{}\"}}",
            b.default_topic
        )),
        10.0
    );
    assert_eq!(delta("lodestream_publish_to_kafka_seconds_count"), 10.0);
    assert_eq!(common::metric(&after, "lodestream_connections"), 1.0);
    assert_eq!(common::metric(&after, "lodestream_subscriptions"), 1.0);
    assert!(delta("lodestream_bytes_received_total") > 0.0);

    let addr = b.running.metrics.unwrap();
    assert!(get(addr, "/health").await.starts_with("HTTP/1.1 200"));
    assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 200"));
    assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
}
