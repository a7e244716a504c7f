//! Issue #15: mapping rules with key templates. `K:trucks/{plate}:{plate}`
//! keys a PUBLISH to `trucks/AB123CD` by the bare plate (its MQTT topic in
//! the `mqtt.topic` header, so it round-trips unchanged), and a record any
//! other producer writes to K with key `XY` reaches MQTT as `trucks/XY`.
//! Real broker, real Kafka, rumqttc clients.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

/// A broker whose `trucks/{plate}` positions go to their own Kafka topic,
/// keyed by plate; deeper topics (`trucks/<plate>/route`) keep key = topic.
async fn plate_keyed() -> (common::Broker, String) {
    let kafka_topic = common::unique("trucks");
    let rules = [
        format!("{kafka_topic}:trucks/{{plate}}:{{plate}}"),
        format!("{kafka_topic}:trucks/#"),
    ];
    (common::start(&rules).await, kafka_topic)
}

/// A rumqttc client subscribed to `filter` at QoS 1; (topic, payload) of
/// every PUBLISH go to the channel.
async fn subscriber(port: u16, filter: &str) -> mpsc::UnboundedReceiver<(String, String)> {
    let mut o = MqttOptions::new(common::unique("sub"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut ev) = AsyncClient::new(o, 100);
    c.subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (tx, rx) = mpsc::unbounded_channel();
    let (subacked, ready) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _keep = c;
        let mut subacked = Some(subacked);
        while let Ok(e) = ev.poll().await {
            match e {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(s) = subacked.take() {
                        let _ = s.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let m = (
                        p.topic.clone(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    );
                    if tx.send(m).is_err() {
                        return;
                    }
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), ready)
        .await
        .expect("SUBACK within 20 s")
        .expect("subscriber running");
    rx
}

/// A rumqttc publisher; returns once every QoS 1 PUBLISH was acknowledged.
async fn publish_all(port: u16, msgs: &[(String, String)]) {
    let mut o = MqttOptions::new(common::unique("pub"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut ev) = AsyncClient::new(o, msgs.len() + 10);
    for (t, p) in msgs {
        c.publish(t, QoS::AtLeastOnce, false, p.clone().into_bytes())
            .await
            .expect("publish");
    }
    let mut acked = 0;
    while acked < msgs.len() {
        let e = tokio::time::timeout(Duration::from_secs(20), ev.poll())
            .await
            .expect("PUBACKs within 20 s")
            .expect("connection up");
        if let Event::Incoming(Packet::PubAck(_)) = e {
            acked += 1;
        }
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(String, String)>) -> (String, String) {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("a message within 20 s")
        .expect("subscriber running")
}

/// MQTT -> Kafka -> MQTT: the record is keyed by plate, carries its topic,
/// and subscribers see the topic unchanged; a deeper topic on the same
/// Kafka topic keeps key = topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_is_keyed_by_plate_and_round_trips() {
    let (b, kafka_topic) = plate_keyed().await;
    let mut rx = subscriber(b.port(), "trucks/#").await;
    let msgs = [
        ("trucks/AB123CD".to_string(), "p1".to_string()),
        ("trucks/AB123CD/route".to_string(), "r1".to_string()),
    ];
    publish_all(b.port(), &msgs).await;
    let mut got = vec![next(&mut rx).await, next(&mut rx).await];
    got.sort();
    assert_eq!(got, vec![msgs[0].clone(), msgs[1].clone()]);
    let recs = common::read_topic(&kafka_topic, 2, Duration::from_secs(20));
    let by_value: HashMap<_, _> = recs
        .iter()
        .map(|r| (r.value.clone().unwrap_or_default(), r))
        .collect();
    let pos = by_value.get(&b"p1"[..]).expect("position record");
    assert_eq!(
        pos.key.as_deref(),
        Some("AB123CD"),
        "keyed by the bare plate"
    );
    assert_eq!(
        pos.headers.get("mqtt.topic").map(Vec::as_slice),
        Some(&b"trucks/AB123CD"[..])
    );
    let route = by_value.get(&b"r1"[..]).expect("route record");
    assert_eq!(route.key.as_deref(), Some("trucks/AB123CD/route"));
    assert!(
        !route.headers.contains_key("mqtt.topic"),
        "key = topic: no header"
    );
}

/// Kafka -> MQTT: a record from another producer, key `XY999ZZ` and no
/// topic header, reaches `trucks/+` subscribers as `trucks/XY999ZZ`; a key
/// the template cannot give a topic for (`a/+`) is skipped, not delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_record_keyed_by_plate_reaches_mqtt_as_its_topic() {
    let (b, kafka_topic) = plate_keyed().await;
    let mut rx = subscriber(b.port(), "trucks/+").await;
    common::produce(&kafka_topic, "a/+", b"bad", &[]).await;
    common::produce(&kafka_topic, "XY999ZZ", b"{\"plate\":\"XY999ZZ\"}", &[]).await;
    assert_eq!(
        next(&mut rx).await,
        ("trucks/XY999ZZ".into(), "{\"plate\":\"XY999ZZ\"}".into())
    );
}

/// Per-key ordering: every record of one truck lands on one partition, in
/// publish order, whatever the partition count (2 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_one_truck_share_a_partition_in_order() {
    let (b, kafka_topic) = plate_keyed().await;
    let plates = [
        "AA000AA", "BB111BB", "CC222CC", "DD333DD", "EE444EE", "FF555FF",
    ];
    let n = 20;
    let msgs: Vec<(String, String)> = (0..n)
        .flat_map(|i| {
            plates
                .iter()
                .map(move |p| (format!("trucks/{p}"), format!("{p} {i}")))
        })
        .collect();
    publish_all(b.port(), &msgs).await;
    let recs = common::read_topic(&kafka_topic, msgs.len(), Duration::from_secs(30));
    assert_eq!(recs.len(), msgs.len());
    let mut seen: HashMap<String, (i32, Vec<usize>)> = HashMap::new();
    for r in &recs {
        let key = r.key.clone().expect("key");
        let value = String::from_utf8(r.value.clone().unwrap_or_default()).expect("utf-8");
        let (plate, seq) = value.split_once(' ').expect("plate and sequence");
        assert_eq!(plate, key);
        let e = seen.entry(key).or_insert((r.partition, Vec::new()));
        assert_eq!(e.0, r.partition, "one partition per truck");
        e.1.push(seq.parse().expect("sequence"));
    }
    let partitions: std::collections::HashSet<i32> = seen.values().map(|(p, _)| *p).collect();
    assert!(partitions.len() > 1, "six plates spread over partitions");
    for (plate, (_, seqs)) in seen {
        assert_eq!(seqs, (0..n).collect::<Vec<_>>(), "{plate} in publish order");
    }
}

/// A resumed session's catch-up turns a bare key into its topic too: a
/// persistent subscriber away while another producer wrote `OFF1INE`
/// receives `trucks/OFF1INE` when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_gives_a_plate_keyed_record_its_topic() {
    let (b, kafka_topic) = plate_keyed().await;
    let id = common::unique("away");
    let connect = |clean: bool| {
        let mut o = MqttOptions::new(id.clone(), "127.0.0.1", b.port());
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(clean);
        AsyncClient::new(o, 100)
    };
    let (c, mut ev) = connect(false);
    c.subscribe("trucks/+", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        let e = tokio::time::timeout(Duration::from_secs(20), ev.poll())
            .await
            .expect("SUBACK within 20 s")
            .expect("connection up");
        if let Event::Incoming(Packet::SubAck(_)) = e {
            break;
        }
    }
    c.disconnect().await.expect("disconnect");
    while ev.poll().await.is_ok() {}
    common::produce(&kafka_topic, "OFF1INE", b"while away", &[]).await;
    let (_c, mut ev) = connect(false);
    let got = loop {
        let e = tokio::time::timeout(Duration::from_secs(20), ev.poll())
            .await
            .expect("the missed record within 20 s")
            .expect("connection up");
        if let Event::Incoming(Packet::Publish(p)) = e {
            break (p.topic.clone(), p.payload.to_vec());
        }
    };
    assert_eq!(got, ("trucks/OFF1INE".to_string(), b"while away".to_vec()));
}
