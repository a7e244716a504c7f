//! The catch-up read of a resumed session applies the same record checks as
//! live fan-out: a Kafka record whose key is not a valid MQTT topic name is
//! skipped, not delivered (issue 14, defect 1).

use crate::common;

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet as P4, QoS};

fn persistent(b: &common::Broker, id: &str) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", b.port());
    o.set_clean_session(false);
    o.set_keep_alive(Duration::from_secs(30));
    AsyncClient::new(o, 16)
}

/// Polls until `want` PUBLISHes arrived or `t` passed; returns their topics and payloads.
async fn publishes(ev: &mut EventLoop, want: usize, t: Duration) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + t;
    while got.len() < want {
        match tokio::time::timeout_at(deadline, ev.poll()).await {
            Ok(Ok(Event::Incoming(P4::Publish(p)))) => got.push((p.topic, p.payload.to_vec())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connection failed: {e}"),
            Err(_) => break,
        }
    }
    got
}

/// Writes QoS 1 records to partition 0, in this order, as an outside producer.
async fn produce_in_order(topic: &str, records: &[(&str, &[u8])]) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", common::kafka())
        .create()
        .expect("producer");
    for (key, value) in records {
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "mqtt.qos",
            value: Some(b"1"),
        });
        let rec = FutureRecord::to(topic)
            .key(*key)
            .payload(*value)
            .partition(0)
            .headers(headers);
        p.send(rec, Duration::from_secs(10)).await.expect("produce");
    }
}

/// A record keyed `cars/+` (a filter, not a topic name [MQTT-3.3.2-2]) that
/// was written while a persistent `cars/#` subscriber was away is not
/// delivered by its catch-up read, and does not take a packet id: with one
/// outbound flow allowed, the valid records behind it still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_skips_record_whose_key_is_not_a_topic_name() {
    let mut c = common::test_config(&[]);
    c.mqtt.max_inflight_out = 1;
    let b = common::start_with(c).await;
    let id = common::unique("resumer");
    {
        let (client, mut ev) = persistent(&b, &id);
        client
            .subscribe("cars/#", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        loop {
            match tokio::time::timeout(Duration::from_secs(15), ev.poll()).await {
                Ok(Ok(Event::Incoming(P4::SubAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => panic!("no SUBACK: {other:?}"),
            }
        }
        client.disconnect().await.expect("disconnect");
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), ev.poll()).await {}
    }
    // Give the node time to write the offline session record.
    tokio::time::sleep(Duration::from_millis(500)).await;
    produce_in_order(
        &b.default_topic,
        &[
            ("cars/+", b"bad"),
            ("cars/1", b"one"),
            ("cars/2", b"two"),
            ("cars/3", b"three"),
        ],
    )
    .await;

    let (_client, mut ev) = persistent(&b, &id);
    let got = publishes(&mut ev, 4, Duration::from_secs(8)).await;
    let want: Vec<(String, Vec<u8>)> = [("cars/1", "one"), ("cars/2", "two"), ("cars/3", "three")]
        .iter()
        .map(|(t, p)| (t.to_string(), p.as_bytes().to_vec()))
        .collect();
    assert_eq!(got, want, "the valid records, in order, and nothing else");

    let m = common::scrape(&b).await;
    for reason in ["unencodable", "too_large_for_client"] {
        let line = format!("lodestream_messages_dropped_total{{reason=\"{reason}\"}}");
        assert_eq!(common::metric(&m, &line), 0.0, "{reason}");
    }
}
