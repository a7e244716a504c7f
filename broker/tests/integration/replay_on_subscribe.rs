//! Replay on subscribe (issue #15 item 2): a subscriber asks on SUBSCRIBE
//! for history from a time (`replay-from`) or the last N records per
//! partition (`replay-last`), MQTT 3.1.1 through `$replay/<spec>/<filter>`,
//! and gets the matching Kafka records in order, then live messages with no
//! gap and no duplicate at the switch; bounded by lookback, size, rate and
//! authorization rules. Real rumqttc clients (3.1.1 and 5) against a real Kafka.

use crate::common;
use crate::common::packets::{self, IntoPacket};
use crate::common::raw::Raw;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lodestream_mqtt::{Packet, ProtocolVersion, QoS as Q, ReasonCode};
use rumqttc::v5::mqttbytes::v5::{Packet as P5, SubAck, SubscribeProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::{AsyncClient as Client5, EventLoop as EventLoop5, MqttOptions as Opts5};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet as P4, QoS, SubscribeReasonCode as Rc4};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Publishes `(topic, payload)` at QoS 1 with a 3.1.1 client and waits for
/// every PUBACK (so every record is in Kafka).
async fn publish_all(b: &common::Broker, msgs: &[(String, String)]) {
    let mut o = MqttOptions::new(common::unique("pub"), "127.0.0.1", b.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut ev) = AsyncClient::new(o, msgs.len().max(1));
    let sender = {
        let c = c.clone();
        let msgs = msgs.to_vec();
        tokio::spawn(async move {
            for (t, p) in msgs {
                c.publish(t, QoS::AtLeastOnce, false, p)
                    .await
                    .expect("publish");
            }
        })
    };
    let mut acks = 0;
    while acks < msgs.len() {
        match tokio::time::timeout(Duration::from_secs(30), ev.poll()).await {
            Ok(Ok(Event::Incoming(P4::PubAck(_)))) => acks += 1,
            Ok(Ok(_)) => {}
            other => panic!("publisher: {other:?} after {acks} acks"),
        }
    }
    sender.await.expect("sender");
    let _ = c.disconnect().await;
}

fn msgs(topics: &[&str], from: usize, to: usize) -> Vec<(String, String)> {
    (from..to)
        .map(|i| {
            let t = topics[i % topics.len()];
            (t.to_string(), format!("{t}:{i}"))
        })
        .collect()
}

/// A clean MQTT 5 client subscribing `filter` with `props` user properties;
/// returns it after its SUBACK.
async fn subscribe5(
    b: &common::Broker,
    filter: &str,
    props: &[(&str, String)],
    receive_max: u16,
) -> (Client5, EventLoop5, SubAck) {
    let mut o = Opts5::new(common::unique("replayer"), "127.0.0.1", b.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_receive_maximum(Some(receive_max));
    let (c, mut ev) = Client5::new(o, 100);
    let properties = SubscribeProperties {
        id: None,
        user_properties: props
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    };
    c.subscribe_with_properties(filter, QoS5::AtLeastOnce, properties)
        .await
        .expect("subscribe");
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ev.poll()).await {
            Ok(Ok(rumqttc::v5::Event::Incoming(P5::SubAck(s)))) => return (c, ev, s),
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
}

/// PUBLISH payloads until `want` arrived or `t` passed; panics if the
/// connection fails (a disconnect would be a lost flow-control fight).
async fn collect5(ev: &mut EventLoop5, want: usize, t: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + t;
    while got.len() < want {
        match tokio::time::timeout_at(deadline, ev.poll()).await {
            Ok(Ok(rumqttc::v5::Event::Incoming(P5::Publish(p)))) => {
                got.push(String::from_utf8_lossy(&p.payload).into_owned())
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!(
                "subscriber connection failed after {} messages: {e}",
                got.len()
            ),
            Err(_) => break,
        }
    }
    got
}

/// Checks `got` holds exactly `want` (as multisets) and that each topic's
/// messages arrived in publish order (payload `topic:seq`).
fn assert_exact_and_ordered(got: &[String], want: &[(String, String)]) {
    let mut last: HashMap<&str, usize> = HashMap::new();
    for p in got {
        let (topic, seq) = p.rsplit_once(':').expect("payload topic:seq");
        let seq: usize = seq.parse().expect("seq");
        if let Some(prev) = last.insert(topic, seq) {
            assert!(
                seq > prev,
                "{topic}: {seq} after {prev} (out of order or duplicate)"
            );
        }
    }
    let mut g: Vec<&String> = got.iter().collect();
    let mut w: Vec<&String> = want.iter().map(|(_, p)| p).collect();
    g.sort();
    w.sort();
    assert_eq!(g.len(), w.len(), "count: got {} want {}", g.len(), w.len());
    assert_eq!(g, w, "same messages");
}

/// A raw client's SUBSCRIBE of `filter` with `props` as user properties
/// (rumqttc turns a refusal into an error without its reason string); the
/// connection is returned to show it lives on.
async fn suback_raw(
    b: &common::Broker,
    v: ProtocolVersion,
    filter: &str,
    props: &[(&str, String)],
) -> (Raw, lodestream_mqtt::SubAck) {
    let mut r = Raw::connect(b.addr()).await;
    r.set_version(v);
    r.send(&packets::connect(v, &common::unique("raw")).packet())
        .await;
    match r.recv_within(Duration::from_secs(20)).await {
        Some(Packet::ConnAck(c)) if !c.reason.is_error() => {}
        other => panic!("no CONNACK: {other:?}"),
    }
    let mut s = packets::subscribe(1, filter, Q::AtLeastOnce);
    s.properties.user_properties = props
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    r.send(&Packet::Subscribe(s)).await;
    match r.recv_within(Duration::from_secs(30)).await {
        Some(Packet::SubAck(a)) => (r, a),
        other => panic!("no SUBACK for {filter}: {other:?}"),
    }
}

/// The connection still serves: a plain SUBSCRIBE of `filter` is granted.
async fn still_serves(r: &mut Raw, filter: &str) {
    r.send(&Packet::Subscribe(packets::subscribe(
        2,
        filter,
        Q::AtMostOnce,
    )))
    .await;
    match r.recv_within(Duration::from_secs(20)).await {
        Some(Packet::SubAck(a)) => assert_eq!(a.reasons, vec![ReasonCode::Success]),
        other => panic!("connection did not live on: {other:?}"),
    }
}

fn raw_reason_string(a: &lodestream_mqtt::SubAck) -> String {
    a.properties.reason_string.clone().unwrap_or_default()
}

fn granted(s: &SubAck) -> bool {
    matches!(s.return_codes.as_slice(), [SubscribeReasonCode::Success(_)])
}

fn reason_string(s: &SubAck) -> String {
    s.properties
        .as_ref()
        .and_then(|p| p.reason_string.clone())
        .unwrap_or_default()
}

/// `replay-from` (epoch ms) replays every record written since that time
/// from all partitions of the topic (three here), each topic in publish
/// order, not the records before; then live messages follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_time_reads_all_partitions_in_order_then_live() {
    let mut c = common::test_config(&[]);
    c.kafka.topic_partitions = 3;
    let b = common::start_with(c).await;
    let topics: Vec<String> = (0..12).map(|i| format!("cars/{i}")).collect();
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    publish_all(&b, &msgs(&["cars/old"], 0, 5)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let since = now_ms();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let history = msgs(&topics, 0, 60);
    publish_all(&b, &history).await;
    let records = common::read_topic(&b.default_topic, 65, Duration::from_secs(20));
    let mut partitions: Vec<i32> = records.iter().map(|r| r.partition).collect();
    partitions.sort();
    partitions.dedup();
    assert_eq!(
        partitions,
        vec![0, 1, 2],
        "the history spans every partition"
    );

    let (_c, mut ev, ack) =
        subscribe5(&b, "cars/#", &[("replay-from", since.to_string())], 100).await;
    assert!(granted(&ack), "{ack:?}");
    assert!(reason_string(&ack).contains("replay of cars/#"), "{ack:?}");
    let got = collect5(&mut ev, 60, Duration::from_secs(30)).await;
    assert_exact_and_ordered(&got, &history);

    let live = msgs(&topics, 60, 72);
    publish_all(&b, &live).await;
    let more = collect5(&mut ev, 13, Duration::from_secs(5)).await;
    assert_exact_and_ordered(&more, &live);
}

/// The switch from history to live under concurrent publishing: a
/// subscriber replaying from before the first message while a publisher
/// keeps writing gets every message exactly once, each topic in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_switch_under_concurrent_publishing_has_no_gap_and_no_duplicate() {
    let b = common::start(&[]).await;
    let topics = ["sw/a", "sw/b", "sw/c", "sw/d"];
    let all = msgs(&topics, 0, 1500);
    let since = now_ms() - 1000;
    let progress = Arc::new(AtomicUsize::new(0));
    // The last third waits for the SUBACK, so the switch always happens
    // while the publisher writes, however fast it is.
    let subscribed = Arc::new(tokio::sync::Notify::new());
    let publisher = {
        let (port, all, progress) = (b.port(), all.clone(), progress.clone());
        let subscribed = subscribed.clone();
        tokio::spawn(async move {
            let mut o = MqttOptions::new(common::unique("pub"), "127.0.0.1", port);
            o.set_keep_alive(Duration::from_secs(30));
            o.set_inflight(20);
            let (c, mut ev) = AsyncClient::new(o, 10);
            tokio::spawn(async move {
                for (i, (t, p)) in all.into_iter().enumerate() {
                    if i == 1000 {
                        subscribed.notified().await;
                    }
                    c.publish(t, QoS::AtLeastOnce, false, p)
                        .await
                        .expect("publish");
                }
            });
            while progress.load(Ordering::Relaxed) < 1500 {
                match tokio::time::timeout(Duration::from_secs(30), ev.poll()).await {
                    Ok(Ok(Event::Incoming(P4::PubAck(_)))) => {
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(_)) => {}
                    other => panic!("publisher: {other:?}"),
                }
            }
        })
    };
    while progress.load(Ordering::Relaxed) < 300 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_c, mut ev, ack) = subscribe5(&b, "sw/+", &[("replay-from", since.to_string())], 50).await;
    assert!(granted(&ack), "{ack:?}");
    let at_subscribe = progress.load(Ordering::Relaxed);
    subscribed.notify_one();
    let got = collect5(&mut ev, 1500, Duration::from_secs(60)).await;
    publisher.await.expect("publisher");
    assert!(
        at_subscribe < 1500,
        "the publisher was still writing at SUBSCRIBE ({at_subscribe} acked)"
    );
    assert_exact_and_ordered(&got, &all);
    // Nothing more: a duplicate from the switch would come late.
    let extra = collect5(&mut ev, 1, Duration::from_secs(2)).await;
    assert!(extra.is_empty(), "after all 1500: {extra:?}");
}

/// A rules file, removed when dropped.
struct RulesFile(std::path::PathBuf);

impl RulesFile {
    fn new(rules: &str) -> RulesFile {
        let path = std::env::temp_dir().join(format!("{}.toml", common::unique("replay-acl")));
        std::fs::write(&path, rules).expect("write rules");
        RulesFile(path)
    }
}

impl Drop for RulesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Authorization rules can refuse a replay while allowing the plain
/// subscription: SUBACK 0x87 for the replay (MQTT 5) and 0x80 for a 3.1.1
/// `$replay/` filter [MQTT-3.9.3-1]; without a `replay` rule replay is denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_refused_by_rule_gets_not_authorized() {
    let mut c = common::test_config(&[]);
    let rules = RulesFile::new(
        r##"
        [[rule]]
        who = "*"
        action = "replay"
        topics = ["open/secret/#"]
        allow = false

        [[rule]]
        who = "*"
        action = "replay"
        topics = ["open/#"]
        allow = true

        [[rule]]
        who = "*"
        action = "subscribe"
        topics = ["open/#", "plain/#"]
        allow = true

        [[rule]]
        who = "*"
        action = "publish"
        topics = ["open/#"]
        allow = true
        "##,
    );
    c.acl.file = Some(rules.0.clone());
    let b = common::start_with(c).await;
    publish_all(&b, &msgs(&["open/a"], 0, 3)).await;
    let last = [("replay-last", "10".to_string())];
    let v5 = ProtocolVersion::V5;
    for (filter, props, want) in [
        ("open/secret/x", &last[..], ReasonCode::NotAuthorized),
        ("open/#", &last[..], ReasonCode::NotAuthorized),
        ("plain/#", &last[..], ReasonCode::NotAuthorized),
        ("open/secret/x", &[][..], ReasonCode::GrantedQoS1),
        ("plain/#", &[][..], ReasonCode::GrantedQoS1),
    ] {
        let (mut r, ack) = suback_raw(&b, v5, filter, props).await;
        assert_eq!(ack.reasons, vec![want], "{filter} {props:?}: {ack:?}");
        still_serves(&mut r, "plain/ok").await;
    }
    // An allowed replay still works under the same rules.
    let (_c, mut ev, ack) = subscribe5(&b, "open/a", &last, 10).await;
    assert!(granted(&ack), "{ack:?}");
    assert_eq!(collect5(&mut ev, 3, Duration::from_secs(20)).await.len(), 3);
    // 3.1.1: the refusal is 0x80, the only failure code it has.
    let v4 = ProtocolVersion::V311;
    let (_r, ack) = suback_raw(&b, v4, "$replay/last=5/open/secret/#", &[]).await;
    assert_eq!(ack.reasons.len(), 1);
    assert!(ack.reasons[0].is_error(), "{ack:?}");
}

/// A replay of more records than the session queue holds (600 vs 20, a
/// receive maximum of 5): the Kafka read waits for the client, nothing is
/// dropped, the client is not disconnected, every QoS 1 message arrives
/// once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_larger_than_session_queue_is_flow_controlled_and_loses_nothing_at_qos1() {
    let mut c = common::test_config(&[]);
    c.mqtt.session_queue = 20;
    c.mqtt.max_inflight_out = 5;
    let b = common::start_with(c).await;
    let history = msgs(&["bulk/a", "bulk/b", "bulk/c"], 0, 600);
    publish_all(&b, &history).await;
    let (_c, mut ev, ack) =
        subscribe5(&b, "bulk/#", &[("replay-last", "1000".to_string())], 5).await;
    assert!(granted(&ack), "{ack:?}");
    let got = collect5(&mut ev, 600, Duration::from_secs(60)).await;
    assert_exact_and_ordered(&got, &history);
    let m = common::scrape(&b).await;
    for reason in ["queue_full", "queue_full_qos0"] {
        let line = format!("lodestream_messages_dropped_total{{reason=\"{reason}\"}}");
        assert_eq!(common::metric(&m, &line), 0.0, "{reason}");
    }
    let quota = "lodestream_disconnects_total{reason=\"quota\"}";
    assert_eq!(common::metric(&m, quota), 0.0);
}

/// MQTT 3.1.1 reaches replay through the documented `$replay/<spec>/<filter>`
/// prefix: the last N records per partition, then live; UNSUBSCRIBE with
/// the same string ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_client_replays_through_the_filter_prefix() {
    let b = common::start(&[]).await;
    publish_all(&b, &msgs(&["pfx/a"], 0, 5)).await;
    let mut o = MqttOptions::new(common::unique("v311"), "127.0.0.1", b.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut ev) = AsyncClient::new(o, 10);
    let filter = "$replay/last=3/pfx/#";
    c.subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut published_live = false;
    while got.len() < 4 {
        match tokio::time::timeout_at(deadline, ev.poll()).await {
            Ok(Ok(Event::Incoming(P4::SubAck(s)))) => {
                assert_eq!(s.return_codes, vec![Rc4::Success(QoS::AtLeastOnce)]);
            }
            Ok(Ok(Event::Incoming(P4::Publish(p)))) => {
                assert_eq!(p.topic, "pfx/a", "the real topic, not the prefix");
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
                if got.len() == 3 && !published_live {
                    published_live = true;
                    let b_port = b.port();
                    tokio::spawn(async move {
                        let mut o = MqttOptions::new(common::unique("pub"), "127.0.0.1", b_port);
                        o.set_keep_alive(Duration::from_secs(30));
                        let (c, mut ev) = AsyncClient::new(o, 10);
                        c.publish("pfx/a", QoS::AtLeastOnce, false, "pfx/a:5")
                            .await
                            .expect("publish");
                        while let Ok(Ok(e)) =
                            tokio::time::timeout(Duration::from_secs(10), ev.poll()).await
                        {
                            if matches!(e, Event::Incoming(P4::PubAck(_))) {
                                break;
                            }
                        }
                    });
                }
            }
            Ok(Ok(_)) => {}
            other => panic!("after {got:?}: {other:?}"),
        }
    }
    assert_eq!(got, ["pfx/a:2", "pfx/a:3", "pfx/a:4", "pfx/a:5"]);
    c.unsubscribe(filter).await.expect("unsubscribe");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(Event::Incoming(P4::UnsubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("no UNSUBACK: {other:?}"),
        }
    }
    publish_all(&b, &msgs(&["pfx/a"], 6, 7)).await;
    let late = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if let Ok(Event::Incoming(P4::Publish(p))) = ev.poll().await {
                return p;
            }
        }
    })
    .await;
    assert!(late.is_err(), "delivered after UNSUBSCRIBE: {late:?}");
}

/// The bounds: a start older than `mqtt.replay_max_lookback_s` is clipped
/// to it (and the SUBACK reason string says so); a replay over
/// `mqtt.replay_max_records` is refused with 0x97 before anything is read;
/// `mqtt.replay_rate` paces the read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookback_clips_size_refuses_and_rate_paces() {
    let mut c = common::test_config(&[]);
    // Margins for a loaded machine: the old records are 4 s old, the fresh
    // ones have 3 s to be written and replayed before they would be clipped.
    c.mqtt.replay_max_lookback_s = 3;
    c.mqtt.replay_max_records = 40;
    c.mqtt.replay_rate = 20;
    let b = common::start_with(c).await;
    publish_all(&b, &msgs(&["lb/a"], 0, 3)).await;
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let fresh = msgs(&["lb/a"], 3, 33);
    publish_all(&b, &fresh).await;

    let started = Instant::now();
    let (_c, mut ev, ack) = subscribe5(&b, "lb/#", &[("replay-from", "0".into())], 10).await;
    assert!(granted(&ack), "{ack:?}");
    assert!(reason_string(&ack).contains("clipped"), "{ack:?}");
    let got = collect5(&mut ev, 30, Duration::from_secs(20)).await;
    let elapsed = started.elapsed();
    assert_exact_and_ordered(&got, &fresh);
    // 30 records at 20/s after a burst of 20: at least half a second.
    assert!(elapsed >= Duration::from_millis(450), "{elapsed:?}");

    publish_all(&b, &msgs(&["lb/a"], 33, 50)).await;
    let props = [("replay-last", "100".to_string())];
    let (mut r, ack) = suback_raw(&b, ProtocolVersion::V5, "lb/#", &props).await;
    assert_eq!(ack.reasons, vec![ReasonCode::QuotaExceeded], "{ack:?}");
    assert!(
        raw_reason_string(&ack).contains("replay_max_records"),
        "{ack:?}"
    );
    still_serves(&mut r, "still/ok").await;
}

/// Bad replay requests get a precise reason code and the connection lives
/// on: a malformed `replay-from` 0x83, a malformed `$replay/` spec 0x8F
/// (a topic filter it is), a shared subscription 0x9E.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replay_requests_get_precise_reason_codes() {
    let b = common::start(&[]).await;
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, ReasonCode);
    let cases: [Case; 4] = [
        (
            "x/#",
            vec![("replay-from", "yesterday".into())],
            ReasonCode::ImplementationSpecificError,
        ),
        (
            "x/#",
            vec![("replay-last", "1".into()), ("replay-from", "-1m".into())],
            ReasonCode::ImplementationSpecificError,
        ),
        ("$replay/soon/x/#", vec![], ReasonCode::TopicFilterInvalid),
        (
            "$share/g/x/#",
            vec![("replay-last", "1".into())],
            ReasonCode::SharedSubscriptionsNotSupported,
        ),
    ];
    for (filter, props, want) in cases {
        let (mut r, ack) = suback_raw(&b, ProtocolVersion::V5, filter, &props).await;
        assert_eq!(ack.reasons, vec![want], "{filter} {props:?}: {ack:?}");
        assert!(!raw_reason_string(&ack).is_empty(), "{ack:?}");
        still_serves(&mut r, "still/ok").await;
    }
    let m = common::scrape(&b).await;
    let count = |result: &str| {
        common::metric(
            &m,
            &format!("lodestream_replays_total{{result=\"{result}\"}}"),
        )
    };
    assert_eq!((count("bad_request"), count("shared")), (3.0, 1.0));
}

/// `mosquitto_sub` (another author's client) replays with the README's
/// commands: MQTT 5 `-D subscribe user-property replay-last N`, MQTT 3.1.1
/// the `$replay/last=N/<filter>` prefix; topics are the real ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_replays_with_user_property_and_prefix() {
    let b = common::start(&[]).await;
    let history = msgs(&["ms/a"], 0, 4);
    publish_all(&b, &history).await;
    let port = b.port().to_string();
    let run = |version: &str, filter: &str, count: &str, extra: &[&str]| {
        let mut c = tokio::process::Command::new("mosquitto_sub");
        c.kill_on_drop(true);
        c.args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", "1"]);
        c.args(["-t", filter, "-C", count, "-v", "-W", "20"]);
        c.args(extra);
        c.output()
    };
    let out = run(
        "5",
        "ms/#",
        "4",
        &["-D", "subscribe", "user-property", "replay-last", "10"],
    )
    .await
    .expect("mosquitto_sub installed (apt-get install mosquitto-clients)");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        ["ms/a ms/a:0", "ms/a ms/a:1", "ms/a ms/a:2", "ms/a ms/a:3"],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run("mqttv311", "$replay/last=2/ms/#", "2", &[])
        .await
        .expect("mosquitto_sub");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        ["ms/a ms/a:2", "ms/a ms/a:3"],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SUBSCRIBE with replay to a filter the client already holds replaces the
/// live subscription: the history comes again (asked for), and the live
/// messages after it come once, not once per path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_on_a_held_filter_replaces_the_live_subscription_without_duplicates() {
    let b = common::start(&[]).await;
    let (c, mut ev, ack) = subscribe5(&b, "rs/#", &[], 20).await;
    assert!(granted(&ack), "{ack:?}");
    let first = msgs(&["rs/a", "rs/b"], 0, 6);
    publish_all(&b, &first).await;
    assert_exact_and_ordered(&collect5(&mut ev, 6, Duration::from_secs(20)).await, &first);

    let properties = SubscribeProperties {
        id: None,
        user_properties: vec![("replay-last".into(), "100".into())],
    };
    c.subscribe_with_properties("rs/#", QoS5::AtLeastOnce, properties)
        .await
        .expect("subscribe");
    assert_exact_and_ordered(&collect5(&mut ev, 6, Duration::from_secs(20)).await, &first);
    let live = msgs(&["rs/a", "rs/b"], 6, 12);
    publish_all(&b, &live).await;
    let got = collect5(&mut ev, 7, Duration::from_secs(5)).await;
    assert_exact_and_ordered(&got, &live);
}

/// A client that leaves in the middle of a (paced) replay leaves no
/// subscription behind in the fan-out index: the stopped replay does not
/// register its filter after the session is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_replay_leaves_no_subscription_behind() {
    let mut c = common::test_config(&[]);
    c.mqtt.replay_rate = 10;
    let b = common::start_with(c).await;
    publish_all(&b, &msgs(&["mid/a"], 0, 60)).await;
    let (c, mut ev, ack) = subscribe5(&b, "mid/#", &[("replay-last", "100".to_string())], 10).await;
    assert!(granted(&ack), "{ack:?}");
    let got = collect5(&mut ev, 3, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 3, "the replay started");
    c.disconnect().await.expect("disconnect");
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), ev.poll()).await {}
    // Checked after the whole replay would have run (60 records at 10/s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let m = common::scrape(&b).await;
    assert_eq!(common::metric(&m, "lodestream_subscriptions"), 0.0);
    assert_eq!(b.node().known_sessions(), 0, "clean session ended");
}

/// `mqtt.replay_rate` paces the history only: a replay whose filter's
/// messages keep arriving faster than the rate (200/s vs 20/s) still
/// reaches live, instead of trailing the publisher for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_replay_reaches_live_under_faster_publishing() {
    let mut c = common::test_config(&[]);
    c.mqtt.replay_rate = 20;
    let b = common::start_with(c).await;
    let all = msgs(&["fast/a"], 0, 620);
    publish_all(&b, &all[..20]).await;
    let publisher = {
        let (port, rest) = (b.port(), all[20..].to_vec());
        tokio::spawn(async move {
            let mut o = MqttOptions::new(common::unique("pub"), "127.0.0.1", port);
            o.set_keep_alive(Duration::from_secs(30));
            let (c, mut ev) = AsyncClient::new(o, 10);
            tokio::spawn(async move { while ev.poll().await.is_ok() {} });
            for (t, p) in rest {
                c.publish(t, QoS::AtLeastOnce, false, p)
                    .await
                    .expect("publish");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            c
        })
    };
    let (_c, mut ev, ack) =
        subscribe5(&b, "fast/#", &[("replay-last", "1000".to_string())], 50).await;
    assert!(granted(&ack), "{ack:?}");
    let publisher_client = publisher.await.expect("publisher");
    let done = Instant::now();
    let got = collect5(&mut ev, 620, Duration::from_secs(15)).await;
    let _ = publisher_client.disconnect().await;
    assert_exact_and_ordered(&got, &all);
    // At 20/s the ~600 records would take 30 s; live is reached at once.
    assert!(
        done.elapsed() < Duration::from_secs(10),
        "{:?}",
        done.elapsed()
    );
}

/// A persistent session taken over on the same node in the middle of its
/// replay keeps the subscription: the stopped replay hands the filter to
/// fan-out live, so the new connection receives new messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_taken_over_mid_replay_keeps_its_subscription_live() {
    let mut c = common::test_config(&[]);
    c.mqtt.replay_rate = 10;
    let b = common::start_with(c).await;
    publish_all(&b, &msgs(&["tk/a"], 0, 100)).await;
    let id = common::unique("taken");
    let v5 = ProtocolVersion::V5;
    let (mut first, _) = common::clients::open(b.addr(), v5, &id, true).await;
    let mut s = packets::subscribe(1, "tk/#", Q::AtMostOnce);
    s.properties.user_properties = vec![("replay-last".into(), "1000".into())];
    first.send(&Packet::Subscribe(s)).await;
    let mut seen = 0;
    while seen < 3 {
        match first.recv_within(Duration::from_secs(10)).await {
            Some(Packet::SubAck(a)) => assert_eq!(a.reasons, vec![ReasonCode::Success]),
            Some(Packet::Publish(_)) => seen += 1,
            other => panic!("replay did not start: {other:?}"),
        }
    }
    let (mut second, present) = common::clients::open(b.addr(), v5, &id, false).await;
    assert!(present, "session taken over");
    publish_all(&b, &[("tk/a".into(), "tk/a:live".into())]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match second.recv_within(left).await {
            Some(Packet::Publish(p)) if &p.payload[..] == b"tk/a:live" => break,
            Some(_) => {}
            None => panic!("the taken-over session got no live message"),
        }
    }
}
