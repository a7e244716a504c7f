//! Subscribers receive what reaches Kafka: from MQTT publishers on any node
//! and from plain Kafka producers (record key = MQTT topic).

use crate::common;
use crate::common::packets::{self, IntoPacket};
use crate::common::raw;

use std::time::Duration;

use bytes::Bytes;
use lodestream_mqtt::{
    Connect, Packet, Properties, ProtocolVersion, Publish, QoS as Q, ReasonCode, RetainHandling,
    Subscribe, SubscriptionOptions,
};
use raw::Raw;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet as P4, QoS};

fn connect5(id: &str, props: Properties) -> Packet {
    Connect {
        properties: props,
        ..packets::connect(ProtocolVersion::V5, id)
    }
    .packet()
}

fn subscribe(id: u16, filters: &[(&str, SubscriptionOptions)], sub_id: Option<u32>) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: id,
        filters: filters
            .iter()
            .map(|(f, o)| (f.to_string(), o.clone()))
            .collect(),
        properties: Properties {
            subscription_identifiers: sub_id.into_iter().collect(),
            ..Properties::default()
        },
    })
}

fn publish(topic: &str, qos: Q, id: Option<u16>, payload: &'static [u8], retain: bool) -> Packet {
    Publish {
        retain,
        ..packets::publish(topic, qos, id, payload)
    }
    .packet()
}

async fn raw5(b: &common::Broker, id: &str) -> Raw {
    let mut r = Raw::connect(b.addr()).await;
    r.send(&connect5(id, Properties::default())).await;
    match r.recv().await {
        Some(Packet::ConnAck(c)) => assert_eq!(c.reason, ReasonCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    r
}

/// Next PUBLISH, skipping acks.
async fn next_publish(r: &mut Raw) -> Option<Publish> {
    loop {
        match r.recv().await? {
            Packet::Publish(p) => return Some(p),
            _ => continue,
        }
    }
}

/// MQTT -> Kafka -> MQTT with rumqttc (3.1.1), QoS downgraded to the
/// subscription's maximum [MQTT-3.8.4-8].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_pubsub_roundtrip_with_qos_downgrade() {
    let b = common::start(&[]).await;
    let (sub, mut sel) = AsyncClient::new(
        MqttOptions::new(common::unique("s"), "127.0.0.1", b.port()),
        100,
    );
    sub.subscribe("room/+/temp", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(P4::SubAck(a)) = sel.poll().await.unwrap() {
            assert_eq!(
                a.return_codes,
                vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
            );
            break;
        }
    }
    let (publ, mut pel) = AsyncClient::new(
        MqttOptions::new(common::unique("p"), "127.0.0.1", b.port()),
        100,
    );
    tokio::spawn(async move { while pel.poll().await.is_ok() {} });
    publ.publish("room/1/temp", QoS::ExactlyOnce, false, "21.5")
        .await
        .unwrap();
    publ.publish("room/2/humidity", QoS::AtLeastOnce, false, "no")
        .await
        .unwrap();
    publ.publish("room/3/temp", QoS::AtMostOnce, false, "19")
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Event::Incoming(P4::Publish(p)) =
            tokio::time::timeout(Duration::from_secs(20), sel.poll())
                .await
                .unwrap()
                .unwrap()
        {
            got.push((p.topic.clone(), p.qos, p.payload.clone(), p.retain))
        }
    }
    // Different topics may sit in different Kafka partitions: MQTT orders
    // messages per topic only, so compare in topic order.
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got[0],
        (
            "room/1/temp".into(),
            QoS::AtLeastOnce,
            Bytes::from("21.5"),
            false
        )
    );
    assert_eq!(
        got[1],
        (
            "room/3/temp".into(),
            QoS::AtMostOnce,
            Bytes::from("19"),
            false
        )
    );
}

/// A record produced straight into Kafka by a non-MQTT application reaches
/// MQTT subscribers; its key is the topic and its plain headers become user
/// properties. The read side follows the mapping: a subscription to
/// `cars/speed/+` reads only kafkaTopic1 (the article's rule).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_record_from_plain_producer_reaches_subscriber() {
    let t1 = common::unique("kafkaTopic1");
    let t2 = common::unique("kafkaTopic2");
    let b = common::start(&[format!("{t1}:cars/speed/+"), format!("{t2}:cars/#")]).await;
    let mut s = raw5(&b, &common::unique("sub")).await;
    s.send(&subscribe(
        1,
        &[("cars/speed/+", SubscriptionOptions::qos(Q::AtLeastOnce))],
        Some(9),
    ))
    .await;
    assert!(matches!(s.recv().await, Some(Packet::SubAck(_))));
    // Written to the wrong topic for its key: this node never reads it.
    common::produce(&t2, "cars/speed/9", b"ignored", &[]).await;
    common::produce(
        &t1,
        "cars/speed/1",
        b"88",
        &[("source", b"ksql"), ("mqtt.qos", b"1")],
    )
    .await;
    let p = next_publish(&mut s).await.expect("record delivered");
    assert_eq!(p.topic, "cars/speed/1");
    assert_eq!(&p.payload[..], b"88");
    assert_eq!(p.qos, Q::AtLeastOnce);
    assert_eq!(
        p.properties.user_properties,
        vec![("source".to_string(), "ksql".to_string())]
    );
    assert_eq!(p.properties.subscription_identifiers, vec![9]);
    assert!(s
        .recv_within(Duration::from_millis(1500))
        .await
        .is_none_or(|p| !matches!(p, Packet::Publish(_))));
    let m = common::scrape(&b).await;
    assert!(m.contains(&format!(
        "lodestream_kafka_records_read_total{{topic=\"{t1}\"}}"
    )));
    assert!(
        !m.contains(&format!(
            "lodestream_kafka_records_read_total{{topic=\"{t2}\"}}"
        )),
        "kafkaTopic2 must not be read"
    );
}

/// A QoS 0 delivery to an MQTT 5 subscriber (encoded from the shared
/// message, its per-delivery properties set over the message's own) carries
/// the message's properties [MQTT-3.3.2-*], the expiry left [MQTT-3.3.2-6]
/// and the subscription identifier [MQTT-3.3.4-3].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_qos0_delivery_carries_message_and_delivery_properties() {
    let b = common::start(&[]).await;
    let mut s = raw5(&b, &common::unique("sub")).await;
    let topic = common::unique("props/t");
    s.send(&subscribe(
        1,
        &[(topic.as_str(), SubscriptionOptions::qos(Q::AtMostOnce))],
        Some(7),
    ))
    .await;
    assert!(matches!(s.recv().await, Some(Packet::SubAck(_))));
    common::produce(
        &b.default_topic,
        &topic,
        b"v",
        &[
            ("source", b"ksql"),
            ("mqtt.message_expiry", b"3600"),
            ("mqtt.content_type", b"text/plain"),
        ],
    )
    .await;
    let p = next_publish(&mut s).await.expect("record delivered");
    assert_eq!((p.topic.as_str(), p.qos), (topic.as_str(), Q::AtMostOnce));
    let props = &p.properties;
    assert_eq!(
        props.user_properties,
        vec![("source".into(), "ksql".into())]
    );
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert!(matches!(props.message_expiry_interval, Some(3595..=3600)));
    assert_eq!(props.subscription_identifiers, vec![7]);
    assert_eq!(props.topic_alias, None, "the client allows no aliases");
}

/// Retained messages: served on SUBSCRIBE with RETAIN=1 [MQTT-3.3.1-9],
/// replaced, deleted by an empty payload [MQTT-3.3.1-6/7], and retain
/// handling 2 sends none [MQTT-3.3.1-11].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_and_retain_handling() {
    let b = common::start(&[]).await;
    let mut p = raw5(&b, &common::unique("rp")).await;
    p.send(&publish("status/a", Q::AtLeastOnce, Some(1), b"old", true))
        .await;
    p.send(&publish("status/a", Q::AtLeastOnce, Some(2), b"on", true))
        .await;
    p.send(&publish("status/b", Q::AtLeastOnce, Some(3), b"off", true))
        .await;
    p.send(&publish("status/c", Q::AtLeastOnce, Some(4), b"x", true))
        .await;
    p.send(&publish("status/c", Q::AtLeastOnce, Some(5), b"", true))
        .await;
    for _ in 0..5 {
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    let mut s = raw5(&b, &common::unique("rs")).await;
    s.send(&subscribe(
        1,
        &[("status/+", SubscriptionOptions::qos(Q::AtMostOnce))],
        None,
    ))
    .await;
    assert!(matches!(s.recv().await, Some(Packet::SubAck(_))));
    let a = next_publish(&mut s).await.unwrap();
    let bb = next_publish(&mut s).await.unwrap();
    assert_eq!(
        (a.topic.as_str(), &a.payload[..], a.retain),
        ("status/a", &b"on"[..], true)
    );
    assert_eq!(
        (bb.topic.as_str(), &bb.payload[..], bb.retain),
        ("status/b", &b"off"[..], true)
    );
    assert!(
        s.recv_within(Duration::from_millis(800)).await.is_none(),
        "deleted retained message not sent"
    );

    let mut s2 = raw5(&b, &common::unique("rs2")).await;
    let opts = SubscriptionOptions {
        retain_handling: RetainHandling::DoNotSend,
        ..SubscriptionOptions::qos(Q::AtMostOnce)
    };
    s2.send(&subscribe(1, &[("status/+", opts)], None)).await;
    assert!(matches!(s2.recv().await, Some(Packet::SubAck(_))));
    assert!(s2.recv_within(Duration::from_millis(800)).await.is_none());

    // A new node loads retained messages from the compacted topic.
    let mut c = common::test_config(&[]);
    c.kafka.default_topic = b.default_topic.clone();
    c.kafka.retained_topic = b.retained_topic.clone();
    let b2 = common::start_with(c).await;
    let mut s3 = raw5(&b2, &common::unique("rs3")).await;
    s3.send(&subscribe(
        1,
        &[("status/#", SubscriptionOptions::qos(Q::AtMostOnce))],
        None,
    ))
    .await;
    assert!(matches!(s3.recv().await, Some(Packet::SubAck(_))));
    let first = next_publish(&mut s3).await.unwrap();
    assert_eq!(&first.payload[..], b"on");
}

/// No Local [MQTT-3.8.3-3], Retain As Published [MQTT-3.3.1-12/13] and one
/// copy per client with all subscription identifiers [MQTT-3.3.4-3..5].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_options_no_local_rap_and_overlaps() {
    let b = common::start(&[]).await;
    let id = common::unique("nl");
    let mut c = raw5(&b, &id).await;
    let nl = SubscriptionOptions {
        no_local: true,
        ..SubscriptionOptions::qos(Q::AtMostOnce)
    };
    let rap = SubscriptionOptions {
        retain_as_published: true,
        ..SubscriptionOptions::qos(Q::AtLeastOnce)
    };
    c.send(&subscribe(1, &[("nl/own", nl)], Some(1))).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    c.send(&subscribe(2, &[("rap/#", rap)], Some(2))).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    c.send(&subscribe(
        3,
        &[("rap/+", SubscriptionOptions::qos(Q::AtMostOnce))],
        Some(3),
    ))
    .await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    c.send(&publish("nl/own", Q::AtMostOnce, None, b"mine", false))
        .await;
    let mut other = raw5(&b, &common::unique("o")).await;
    other
        .send(&publish("rap/x", Q::AtLeastOnce, Some(1), b"r", true))
        .await;
    let p = next_publish(&mut c).await.unwrap();
    assert_eq!(p.topic, "rap/x", "no-local message must not come back");
    assert!(p.retain, "retain as published");
    assert_eq!(
        p.qos,
        Q::AtLeastOnce,
        "highest QoS of the overlapping subscriptions"
    );
    let mut ids = p.properties.subscription_identifiers.clone();
    ids.sort();
    assert_eq!(ids, vec![2, 3]);
    assert!(c
        .recv_within(Duration::from_millis(800))
        .await
        .is_none_or(|p| !matches!(p, Packet::Publish(_))));
}

/// `$share/group/filter`: each message goes to one member of the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_delivers_each_message_once() {
    let b = common::start(&[]).await;
    let mut m1 = raw5(&b, &common::unique("m1")).await;
    let mut m2 = raw5(&b, &common::unique("m2")).await;
    for m in [&mut m1, &mut m2] {
        m.send(&subscribe(
            1,
            &[("$share/g/jobs/#", SubscriptionOptions::qos(Q::AtLeastOnce))],
            None,
        ))
        .await;
        assert!(matches!(m.recv().await, Some(Packet::SubAck(_))));
    }
    let mut p = raw5(&b, &common::unique("p")).await;
    for i in 0..20u16 {
        p.send(&publish("jobs/a", Q::AtLeastOnce, Some(i + 1), b"j", false))
            .await;
    }
    let mut n1 = 0;
    let mut n2 = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while n1 + n2 < 20 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            Some(Packet::Publish(x)) = m1.recv_within(Duration::from_millis(200)) => {
                n1 += 1;
                m1.send(&Packet::PubAck(lodestream_mqtt::Ack::new(x.packet_id.unwrap()))).await;
            }
            Some(Packet::Publish(x)) = m2.recv_within(Duration::from_millis(200)) => {
                n2 += 1;
                m2.send(&Packet::PubAck(lodestream_mqtt::Ack::new(x.packet_id.unwrap()))).await;
            }
        }
    }
    assert_eq!(n1 + n2, 20);
    assert!(n1 > 0 && n2 > 0, "both members get work: {n1}/{n2}");
    assert!(m1.recv_within(Duration::from_millis(500)).await.is_none());
    // Two members, each a consumer of the group: the topic's partitions
    // are all held, once; when both leave, none is counted any more.
    let partitions = b.node().config().kafka.topic_partitions as f64;
    let held = common::wait_metric(
        &b,
        "lodestream_shared_partitions",
        Duration::from_secs(10),
        |v| v == partitions,
    )
    .await;
    assert_eq!(held, partitions, "every partition held by one member");
    assert_eq!(
        common::metric(&common::scrape(&b).await, "lodestream_shared_members"),
        2.0
    );
    drop((m1, m2));
    for gauge in ["lodestream_shared_members", "lodestream_shared_partitions"] {
        let v = common::wait_metric(&b, gauge, Duration::from_secs(10), |v| v == 0.0).await;
        assert_eq!(v, 0.0, "{gauge} back to 0 after the members left");
    }
}

/// `$`-topics are not matched by a leading wildcard [MQTT-4.7.2-1].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_not_matched_by_leading_wildcards() {
    let b = common::start(&[]).await;
    let mut s = raw5(&b, &common::unique("s")).await;
    s.send(&subscribe(
        1,
        &[("#", SubscriptionOptions::qos(Q::AtMostOnce))],
        None,
    ))
    .await;
    assert!(matches!(s.recv().await, Some(Packet::SubAck(_))));
    let mut p = raw5(&b, &common::unique("p")).await;
    p.send(&publish(
        "$internal/x",
        Q::AtLeastOnce,
        Some(1),
        b"hidden",
        false,
    ))
    .await;
    p.send(&publish("visible", Q::AtLeastOnce, Some(2), b"v", false))
        .await;
    let got = next_publish(&mut s).await.unwrap();
    assert_eq!(got.topic, "visible");
}

/// Topic aliases from the client [MQTT-3.3.2-12] and to the client.
/// [MQTT-3.1.2-25] a PUBLISH is never larger than the client's Maximum
/// Packet Size, counting the topic alias property the first PUBLISH of a
/// topic carries: one that fits only without it is discarded, and the alias
/// it would have set is not spent (the client never learned it).
async fn max_packet_size_counts_the_alias_a_publish_sets(qos: Q) {
    const MAX: usize = 100;
    let b = common::start(&[]).await;
    let mut s = Raw::connect(b.addr()).await;
    s.send(&connect5(
        &common::unique("mps"),
        Properties {
            topic_alias_maximum: Some(5),
            maximum_packet_size: Some(MAX as u32),
            ..Properties::default()
        },
    ))
    .await;
    assert!(matches!(s.recv().await, Some(Packet::ConnAck(_))));
    let topic = common::unique("mps/t");
    s.send(&subscribe(
        1,
        &[(topic.as_str(), SubscriptionOptions::qos(qos))],
        None,
    ))
    .await;
    assert!(matches!(s.recv().await, Some(Packet::SubAck(_))));
    // Fixed header 2, topic 2 + len, packet id 2 (QoS 1), properties 1 (+ 3
    // for an alias): one byte under the maximum without the alias.
    let id_len = if qos == Q::AtMostOnce { 0 } else { 2 };
    let fits_without_alias = MAX - 1 - (5 + topic.len() + id_len);
    let mut p = raw5(&b, &common::unique("mps-pub")).await;
    for (id, len) in [(1, fits_without_alias), (2, 1)] {
        p.send(&Packet::Publish(Publish {
            dup: false,
            qos: Q::AtLeastOnce,
            retain: false,
            topic: topic.clone(),
            packet_id: Some(id),
            payload: Bytes::from(vec![b'x'; len]),
            properties: Properties::default(),
        }))
        .await;
    }
    let got = next_publish(&mut s).await.expect("the small PUBLISH");
    assert_eq!(
        got.payload.len(),
        1,
        "the PUBLISH over the maximum was discarded"
    );
    assert_eq!(
        got.topic, topic,
        "the first PUBLISH received sets the alias"
    );
    assert_eq!(got.properties.topic_alias, Some(1));
    let size = lodestream_mqtt::encoded_len(&Packet::Publish(got), ProtocolVersion::V5).unwrap();
    assert!(size <= MAX);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_packet_size_counts_the_alias_qos0() {
    max_packet_size_counts_the_alias_a_publish_sets(Q::AtMostOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_packet_size_counts_the_alias_qos1() {
    max_packet_size_counts_the_alias_a_publish_sets(Q::AtLeastOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_both_directions() {
    let b = common::start(&[]).await;
    let mut s = Raw::connect(b.addr()).await;
    s.send(&connect5(
        &common::unique("as"),
        Properties {
            topic_alias_maximum: Some(5),
            ..Properties::default()
        },
    ))
    .await;
    assert!(matches!(s.recv().await, Some(Packet::ConnAck(_))));
    s.send(&subscribe(
        1,
        &[("alias/#", SubscriptionOptions::qos(Q::AtMostOnce))],
        None,
    ))
    .await;
    assert!(matches!(s.recv().await, Some(Packet::SubAck(_))));
    let mut p = raw5(&b, &common::unique("ap")).await;
    let with_alias = |topic: &str, id: u16| {
        Packet::Publish(Publish {
            dup: false,
            qos: Q::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: Some(id),
            payload: Bytes::from_static(b"x"),
            properties: Properties {
                topic_alias: Some(1),
                ..Properties::default()
            },
        })
    };
    p.send(&with_alias("alias/long/topic/name", 1)).await;
    p.send(&with_alias("", 2)).await;
    let first = next_publish(&mut s).await.unwrap();
    assert_eq!(first.topic, "alias/long/topic/name");
    assert_eq!(first.properties.topic_alias, Some(1));
    let second = next_publish(&mut s).await.unwrap();
    assert_eq!(second.topic, "", "server reuses its alias");
    assert_eq!(second.properties.topic_alias, Some(1));
    // An alias never set, with an empty topic, is a protocol error [MQTT-3.3.2-8].
    let bad = Packet::Publish(Publish {
        dup: false,
        qos: Q::AtMostOnce,
        retain: false,
        topic: String::new(),
        packet_id: None,
        payload: Bytes::new(),
        properties: Properties {
            topic_alias: Some(4),
            ..Properties::default()
        },
    });
    p.send(&bad).await;
    let d = loop {
        match p.recv().await {
            Some(Packet::Disconnect(d)) => break d,
            Some(_) => continue,
            None => panic!("expected DISCONNECT"),
        }
    };
    assert_eq!(d.reason, ReasonCode::ProtocolError);
}
