//! `$SYS` topics, read by a real MQTT client (rumqttc) through Kafka:
//! every figure equals what `/metrics` says; with two nodes the cluster
//! totals add up the nodes' figures; [MQTT-4.7.2-1] `#` and `+/...` do not
//! match `$SYS` topics; the authorization rules apply to `$SYS` filters.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Publish, QoS, SubscribeReasonCode};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);

/// A connected rumqttc client whose received PUBLISHes and SUBACK codes
/// arrive on channels.
struct Client {
    client: AsyncClient,
    publishes: mpsc::UnboundedReceiver<Publish>,
    subacks: mpsc::UnboundedReceiver<Vec<SubscribeReasonCode>>,
}

async fn connect(port: u16) -> Client {
    let mut o = MqttOptions::new(common::unique("sys"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(120));
    let (client, mut el) = AsyncClient::new(o, 100);
    let (ptx, publishes) = mpsc::unbounded_channel();
    let (stx, subacks) = mpsc::unbounded_channel();
    let (ctx, mut connected) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            match ev {
                Event::Incoming(Incoming::ConnAck(_)) => {
                    let _ = ctx.send(());
                }
                Event::Incoming(Incoming::Publish(p)) => {
                    let _ = ptx.send(p);
                }
                Event::Incoming(Incoming::SubAck(s)) => {
                    let _ = stx.send(s.return_codes);
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(WAIT, connected.recv())
        .await
        .expect("CONNACK");
    Client {
        client,
        publishes,
        subacks,
    }
}

impl Client {
    async fn subscribe(&mut self, filter: &str) -> Vec<SubscribeReasonCode> {
        self.client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .unwrap();
        tokio::time::timeout(WAIT, self.subacks.recv())
            .await
            .expect("SUBACK")
            .expect("open")
    }
}

/// Bytes of a QoS 0 MQTT 3.1.1 PUBLISH on the wire.
fn wire_size(p: &Publish) -> u64 {
    let remaining = 2 + p.topic.len() + p.payload.len();
    let len_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        _ => 3,
    };
    (1 + len_bytes + remaining) as u64
}

/// One publication round, live (not retained-on-subscribe): the payload of
/// every topic in `want`, and the count and bytes of the `$SYS` PUBLISHes
/// this client received during it. Starts at the round after the next
/// `first` topic, so the round is whole.
async fn one_round(
    c: &mut Client,
    first: &str,
    want: &[String],
) -> (HashMap<String, String>, u64, u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let p = tokio::time::timeout_at(deadline, c.publishes.recv())
            .await
            .expect("a $SYS round")
            .expect("open");
        if !p.retain && p.topic == first {
            break;
        }
    }
    // The rest of that round arrives; the next one starts an interval later.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    while c.publishes.try_recv().is_ok() {}
    let (mut got, mut count, mut bytes) = (HashMap::new(), 0, 0);
    while !want.iter().all(|t| got.contains_key(t)) {
        let p = tokio::time::timeout_at(deadline, c.publishes.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "missing: {:?}",
                    want.iter()
                        .filter(|t| !got.contains_key(*t))
                        .collect::<Vec<_>>()
                )
            })
            .expect("open");
        assert!(!p.retain, "live round");
        count += 1;
        bytes += wire_size(&p);
        got.insert(
            p.topic.clone(),
            String::from_utf8_lossy(&p.payload).to_string(),
        );
    }
    (got, count, bytes)
}

/// `/metrics` series each figure is read from, as (figure, value from a scrape).
fn from_scrape(s: &str) -> Vec<(&'static str, f64)> {
    let m = |n: &str| common::metric(s, n);
    let lag: f64 = s
        .lines()
        .filter(|l| l.starts_with("lodestream_kafka_consumer_lag{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let count = m("lodestream_publish_to_kafka_seconds_count");
    let avg = if count > 0.0 {
        1000.0 * m("lodestream_publish_to_kafka_seconds_sum") / count
    } else {
        0.0
    };
    vec![
        ("clients/connected", m("lodestream_connections")),
        (
            "clients/disconnected",
            (m("lodestream_sessions") - m("lodestream_connections")).max(0.0),
        ),
        ("clients/maximum", m("lodestream_connections_max")),
        ("clients/total", m("lodestream_sessions")),
        (
            "messages/received",
            m("lodestream_packets_received_total{type=\"publish\"}"),
        ),
        (
            "messages/sent",
            m("lodestream_packets_sent_total{type=\"publish\"}"),
        ),
        ("bytes/received", m("lodestream_bytes_received_total")),
        ("bytes/sent", m("lodestream_bytes_sent_total")),
        ("subscriptions/count", m("lodestream_subscriptions")),
        ("retained messages/count", m("lodestream_retained_messages")),
        ("kafka/produce/count", count),
        ("kafka/produce/latency/avg_ms", avg),
        ("kafka/consumer/lag", lag),
    ]
}

fn node_topics(node: &str) -> Vec<String> {
    lodestream_broker::sys::FIGURES
        .iter()
        .map(|(n, _)| format!("$SYS/broker/nodes/{node}/{n}"))
        .collect()
}

/// Every `$SYS` figure, per node and cluster, equals the `/metrics` value
/// at the same moment; the only difference allowed is what the `$SYS`
/// round itself sent to the reading client (counted exactly). Meanwhile a
/// `#` and a `+/broker/#` subscriber receive no `$SYS` topic [MQTT-4.7.2-1].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sys_figure_matches_the_metrics_endpoint() {
    let t = common::unique("cars");
    let mut c = common::test_config(&[format!("{t}:cars/#")]);
    c.sys.interval_s = 3;
    let b = common::start_with(c).await;
    let node = lodestream_broker::sys::node_level(&b.node().config().node_id);

    let mut everything = connect(b.port()).await;
    everything.subscribe("#").await;
    everything.subscribe("+/broker/#").await;
    let mut cars = connect(b.port()).await;
    cars.subscribe("cars/#").await;
    let publisher = connect(b.port()).await;
    for i in 0..5 {
        publisher
            .client
            .publish(
                format!("cars/{i}"),
                QoS::AtLeastOnce,
                i == 0,
                vec![b'x'; 100],
            )
            .await
            .unwrap();
    }
    for _ in 0..5 {
        tokio::time::timeout(WAIT, cars.publishes.recv())
            .await
            .expect("car message");
    }
    let mut monitor = connect(b.port()).await;
    let codes = monitor.subscribe("$SYS/#").await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtMostOnce)]);

    let mine = node_topics(&node);
    let cluster: Vec<String> = lodestream_broker::sys::FIGURES
        .iter()
        .map(|(n, _)| format!("$SYS/broker/{n}"))
        .collect();
    // The whole round, so that everything it sent the monitor is counted
    // before the scrape: its topics reach Kafka's partitions by key, so
    // they arrive in no fixed order.
    let rest = [
        format!("$SYS/broker/nodes/{node}/uptime"),
        format!("$SYS/broker/nodes/{node}/version"),
        "$SYS/broker/nodes/count".to_string(),
        "$SYS/broker/version".to_string(),
    ];
    let want: Vec<String> = mine.iter().chain(&cluster).chain(&rest).cloned().collect();
    let (got, count, bytes) = one_round(
        &mut monitor,
        &format!("$SYS/broker/nodes/{node}/uptime"),
        &want,
    )
    .await;
    let scrape = common::scrape(&b).await;

    for (name, metric) in from_scrape(&scrape) {
        let expect = match name {
            // What this round delivered to the monitor, after the figures were read.
            "messages/sent" => metric - count as f64,
            "bytes/sent" => metric - bytes as f64,
            _ => metric,
        };
        for topic in [
            format!("$SYS/broker/nodes/{node}/{name}"),
            format!("$SYS/broker/{name}"),
        ] {
            let v: f64 = got[&topic]
                .parse()
                .unwrap_or_else(|_| panic!("{topic}: {}", got[&topic]));
            assert!(
                (v - expect).abs() < 0.001,
                "{topic} = {v}, /metrics says {expect}"
            );
        }
    }
    assert_eq!(got["$SYS/broker/clients/connected"], "4");
    // The car's retained message and the $SYS topics themselves (retained):
    // the node's and the cluster's figures, uptime, version, nodes/count.
    let sys_retained = 2 * (lodestream_broker::sys::FIGURES.len() + 2);
    assert_eq!(
        got["$SYS/broker/retained messages/count"],
        (1 + sys_retained).to_string()
    );
    assert!(got["$SYS/broker/messages/received"].parse::<u64>().unwrap() >= 5);

    // [MQTT-4.7.2-1] the wildcard subscriber got the cars but no $SYS topic.
    let mut seen = Vec::new();
    while let Ok(p) = everything.publishes.try_recv() {
        seen.push(p.topic);
    }
    assert!(seen.iter().any(|t| t.starts_with("cars/")), "{seen:?}");
    assert!(!seen.iter().any(|t| t.starts_with('$')), "{seen:?}");
}

/// Two nodes: each publishes its own figures; the cluster figures are their
/// sum (connected clients) or shared value (retained), and `nodes/count`
/// is 2, whichever node the reader is connected to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_totals_add_up_the_nodes() {
    let t = common::unique("cars");
    let mut c = common::test_config(&[format!("{t}:cars/#")]);
    c.sys.interval_s = 1;
    let a = common::start_with(c.clone()).await;
    let mut c2 = common::test_config(&c.kafka.mappings);
    c2.kafka = c.kafka.clone();
    c2.sys.interval_s = 1;
    let b = common::start_with(c2).await;
    let (ida, idb) = (
        lodestream_broker::sys::node_level(&a.node().config().node_id),
        lodestream_broker::sys::node_level(&b.node().config().node_id),
    );
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(connect(a.port()).await);
    }
    for _ in 0..3 {
        held.push(connect(b.port()).await);
    }
    let mut monitor = connect(b.port()).await;
    monitor.subscribe("$SYS/broker/#").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last: HashMap<String, String> = HashMap::new();
    let want = [
        (format!("$SYS/broker/nodes/{ida}/clients/connected"), "2"),
        (format!("$SYS/broker/nodes/{idb}/clients/connected"), "4"),
        ("$SYS/broker/clients/connected".to_string(), "6"),
        ("$SYS/broker/nodes/count".to_string(), "2"),
    ];
    while !want
        .iter()
        .all(|(t, v)| last.get(t).map(String::as_str) == Some(*v))
    {
        let p = tokio::time::timeout_at(deadline, monitor.publishes.recv())
            .await
            .unwrap_or_else(|_| panic!("cluster figures never added up: {last:?}"))
            .expect("open");
        last.insert(p.topic, String::from_utf8_lossy(&p.payload).to_string());
    }
    for (node, broker, connected) in [(&ida, &a, 2.0), (&idb, &b, 4.0)] {
        let s = common::scrape(broker).await;
        assert_eq!(
            common::metric(&s, "lodestream_connections"),
            connected,
            "{node}"
        );
    }
}

/// `$SYS` is read under the authorization rules like any other topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_follow_the_authorization_rules() {
    let dir = std::env::temp_dir().join(common::unique("sys-acl"));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = dir.join("acl.toml");
    std::fs::write(
        &rules,
        r#"
[[rule]]
who = "anonymous"
action = "subscribe"
topics = ["$SYS/broker/clients/#"]
allow = true
"#,
    )
    .unwrap();
    let mut c = common::test_config(&[]);
    c.sys.interval_s = 1;
    c.acl.file = Some(rules.clone());
    let b = common::start_with(c).await;
    let mut m = connect(b.port()).await;
    assert_eq!(m.subscribe("$SYS/#").await, [SubscribeReasonCode::Failure]);
    assert_eq!(
        m.subscribe("$SYS/broker/clients/#").await,
        [SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    for _ in 0..10 {
        let p = tokio::time::timeout(WAIT, m.publishes.recv())
            .await
            .expect("$SYS clients figure")
            .expect("open");
        assert!(p.topic.starts_with("$SYS/broker/clients/"), "{}", p.topic);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Waits for a PUBLISH with payload `want`.
async fn wait_payload(c: &mut Client, want: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let p = tokio::time::timeout_at(deadline, c.publishes.recv())
            .await
            .unwrap_or_else(|_| panic!("no payload {want}"))
            .expect("open");
        if p.payload == want.as_bytes() {
            return;
        }
    }
}

/// A node that leaves stops counting once its figures expire (three
/// intervals), and the publishing node then deletes them: the retained
/// topic ends with a tombstone for each, so departed node ids do not pile up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_nodes_figures_expire_and_are_deleted() {
    let mut c = common::test_config(&[]);
    c.sys.interval_s = 1;
    c.node_id = common::unique("aa");
    let a = common::start_with(c.clone()).await;
    let mut c2 = common::test_config(&[]);
    c2.kafka = c.kafka.clone();
    c2.sys.interval_s = 1;
    c2.node_id = common::unique("zz");
    let b = common::start_with(c2.clone()).await;
    let gone = lodestream_broker::sys::node_level(&c2.node_id);
    let mut monitor = connect(a.port()).await;
    monitor.subscribe("$SYS/broker/nodes/count").await;
    wait_payload(&mut monitor, "2").await;
    b.node().shutdown(Duration::from_secs(1)).await;
    wait_payload(&mut monitor, "1").await;
    // The deletions follow in the same round; give them a round to land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let prefix = format!("$SYS/broker/nodes/{gone}/");
    assert!(a
        .node()
        .retained()
        .matching(&format!("{prefix}#"), i64::MAX)
        .is_empty());
    let recs = common::read_topic(&a.retained_topic, 10_000, Duration::from_secs(5));
    let mut last: HashMap<String, bool> = HashMap::new();
    for r in &recs {
        if let Some(k) = r.key.as_ref().filter(|k| k.starts_with(&prefix)) {
            last.insert(k.clone(), r.value.is_none());
        }
    }
    assert!(!last.is_empty(), "the departed node published figures");
    assert!(last.values().all(|tombstone| *tombstone), "{last:?}");
}
