//! PUBLISH from real MQTT clients lands in Kafka: key = MQTT topic, value =
//! payload, metadata in headers, Kafka topic chosen by the mapping rules.

use crate::common;
use crate::common::packets::{self, IntoPacket};

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Opts5};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet as P4, QoS};

/// The source article's mapping example, end to end through Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn article_mapping_example_routes_records_to_kafka_topics() {
    let t1 = common::unique("kafkaTopic1");
    let t2 = common::unique("kafkaTopic2");
    let b = common::start(&[format!("{t1}:cars/speed/+"), format!("{t2}:cars/#")]).await;

    let mut o = MqttOptions::new(common::unique("pub"), "127.0.0.1", b.port());
    o.set_keep_alive(Duration::from_secs(10));
    let (c, mut el) = AsyncClient::new(o, 10);
    for (topic, payload) in [
        ("cars/speed/1", "a"),
        ("cars/location/1", "b"),
        ("cars/speed/1/2", "c"),
        ("trains/speed/1", "d"),
    ] {
        c.publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    let mut acks = 0;
    while acks < 4 {
        if let Event::Incoming(P4::PubAck(_)) =
            tokio::time::timeout(Duration::from_secs(20), el.poll())
                .await
                .unwrap()
                .unwrap()
        {
            acks += 1;
        }
    }
    let r1 = common::read_topic(&t1, 1, Duration::from_secs(10));
    let r2 = common::read_topic(&t2, 2, Duration::from_secs(10));
    let rd = common::read_topic(&b.default_topic, 1, Duration::from_secs(10));
    let keys = |r: &[common::KRecord]| {
        let mut k: Vec<String> = r.iter().filter_map(|r| r.key.clone()).collect();
        k.sort();
        k
    };
    assert_eq!(keys(&r1), vec!["cars/speed/1"]);
    assert_eq!(keys(&r2), vec!["cars/location/1", "cars/speed/1/2"]);
    assert_eq!(keys(&rd), vec!["trains/speed/1"]);
    assert_eq!(r1[0].value.as_deref(), Some(&b"a"[..]));
    assert_eq!(
        r1[0].headers.get("mqtt.qos").map(Vec::as_slice),
        Some(&b"1"[..])
    );
}

/// MQTT 5 properties travel as Kafka headers; PUBACK comes after the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_properties_become_record_headers() {
    let b = common::start(&[]).await;
    let id = common::unique("v5pub");
    let (c, mut el) = Client5::new(Opts5::new(&id, "127.0.0.1", b.port()), 10);
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        content_type: Some("application/json".into()),
        response_topic: Some("replies/1".into()),
        correlation_data: Some(Bytes::from_static(b"\x01\x02")),
        user_properties: vec![("trace".into(), "abc".into())],
        ..Default::default()
    };
    c.publish_with_properties("sensors/t", QoS5::ExactlyOnce, true, "{\"t\":21}", props)
        .await
        .unwrap();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .unwrap()
            .unwrap();
        if let Event5::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubComp(_)) = ev {
            break;
        }
    }
    let r = common::read_topic(&b.default_topic, 1, Duration::from_secs(10));
    assert_eq!(r.len(), 1);
    let h = &r[0].headers;
    assert_eq!(r[0].key.as_deref(), Some("sensors/t"));
    assert_eq!(r[0].value.as_deref(), Some(&b"{\"t\":21}"[..]));
    assert_eq!(h["mqtt.qos"], b"2");
    assert_eq!(h["mqtt.retain"], b"1");
    assert_eq!(h["mqtt.client_id"], id.as_bytes());
    assert_eq!(h["mqtt.payload_format"], b"1");
    assert_eq!(h["mqtt.message_expiry"], b"3600");
    assert_eq!(h["mqtt.content_type"], b"application/json");
    assert_eq!(h["mqtt.response_topic"], b"replies/1");
    assert_eq!(h["mqtt.correlation_data"], b"\x01\x02");
    assert_eq!(h["trace"], b"abc");
    // Retained copy in the compacted topic.
    let ret = common::read_topic(&b.retained_topic, 1, Duration::from_secs(10));
    assert_eq!(ret[0].key.as_deref(), Some("sensors/t"));
}

/// QoS 2 retransmission with the same packet id is written to Kafka once
/// [MQTT-4.3.3-9/10].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_duplicate_publish_written_once() {
    use lodestream_mqtt::{Ack, Packet, Properties, ProtocolVersion, Publish, QoS as Q};
    let b = common::start(&[]).await;
    let mut s = raw::Raw::connect(b.addr()).await;
    s.send(&packets::connect(ProtocolVersion::V5, &common::unique("dup")).packet())
        .await;
    assert!(matches!(s.recv().await, Some(Packet::ConnAck(_))));
    let p = Publish {
        dup: false,
        qos: Q::ExactlyOnce,
        retain: false,
        topic: "dup/t".into(),
        packet_id: Some(7),
        payload: Bytes::from_static(b"once"),
        properties: Properties::default(),
    };
    s.send(&Packet::Publish(p.clone())).await;
    assert_eq!(s.recv().await, Some(Packet::PubRec(Ack::new(7))));
    s.send(&Packet::Publish(Publish { dup: true, ..p })).await;
    assert_eq!(s.recv().await, Some(Packet::PubRec(Ack::new(7))));
    s.send(&Packet::PubRel(Ack::new(7))).await;
    assert_eq!(s.recv().await, Some(Packet::PubComp(Ack::new(7))));
    let r = common::read_topic(&b.default_topic, 2, Duration::from_secs(5));
    assert_eq!(
        r.len(),
        1,
        "duplicate QoS 2 PUBLISH must not reach Kafka twice"
    );
}

use crate::common::raw;
