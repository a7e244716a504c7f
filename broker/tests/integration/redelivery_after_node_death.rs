//! Issue #18 item 2: how much a persistent QoS 1 subscriber sees twice when
//! its node dies. Two nodes; a persistent QoS 1 subscriber (rumqttc, MQTT
//! 3.1.1) and a persistent QoS 2 subscriber (raw client keeping its own QoS 2
//! receiver state, as MQTT requires) on node 1; a publisher (rumqttc, QoS 2)
//! on node 2; 3,000 messages; node 1 SIGKILLed when the QoS 1 subscriber has
//! 1,500. Both subscribers then resume on node 2.
//!
//! Bar: nothing lost; QoS 1 at most 1 % duplicates (30); QoS 2 none. Before
//! offsets were written when a window of PUBACKs completed, the whole 5 s
//! persist interval was re-read (1,498 duplicates in the paho run).

use crate::common;
use crate::common::clients;

use std::time::{Duration, Instant};

use clients::{duplicates, qos1_subscriber, Qos2Receiver};
use lodestream_mqtt::Packet;
use rumqttc::QoS;
use tokio::sync::mpsc;

const N: usize = 3000;
const KILL_AT: usize = 1500;
const MAX_QOS1_DUPLICATES: usize = 30;
const FILTER: &str = "redeliver/#";
/// `mqtt.max_unsaved_deliveries`: at most this many deliveries per session
/// not yet covered by a session write (a write starts at half of it).
const UNSAVED: usize = 24;

/// Session queues that hold the whole stream: deliveries paused by the
/// bound must not overflow them (which disconnects the client) when
/// session writes are slow on a busy machine.
const QUEUE: usize = 2 * N;

/// A node whose sessions re-deliver at most about `UNSAVED` after a crash.
async fn bounded_node() -> common::Broker {
    let mut c = common::test_config(&[]);
    c.mqtt.max_unsaved_deliveries = UNSAVED;
    c.mqtt.session_queue = QUEUE;
    common::start_with(c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_subscriber_sees_at_most_one_percent_again_after_its_node_is_killed() {
    let survivor = bounded_node().await;
    let [port] = common::free_ports();
    let mut victim = common::spawn_node_env(
        port,
        &survivor,
        &common::unique("victim"),
        &[
            (
                "LODESTREAM_MQTT__MAX_UNSAVED_DELIVERIES",
                UNSAVED.to_string(),
            ),
            ("LODESTREAM_MQTT__SESSION_QUEUE", QUEUE.to_string()),
        ],
    );
    common::wait_port(port).await;
    let victim_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let q1_id = common::unique("q1sub");
    let (tx, mut rx) = mpsc::unbounded_channel();
    qos1_subscriber(port, &q1_id, FILTER, false, tx.clone()).await;
    let q2_id = common::unique("q2sub");
    let mut q2 = Qos2Receiver::default();
    let mut q2c = Qos2Receiver::connect(victim_addr, &q2_id, false).await;
    q2c.send(&Qos2Receiver::subscribe(FILTER)).await;
    assert!(matches!(q2c.recv().await, Some(Packet::SubAck(_))));
    // Let the rumqttc SUBSCRIBE land before the stream starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let publisher = clients::publisher(clients::PublisherSpec {
        roam: clients::Roaming::on(&[survivor.port()]),
        id: common::unique("pub"),
        topic: "redeliver/x",
        qos: QoS::ExactlyOnce,
        n: N,
        per_s: 1000,
        limit: Duration::from_secs(180),
    });

    // Collect on node 1 until the QoS 1 subscriber has KILL_AT, then SIGKILL.
    let started = Instant::now();
    let mut q1: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while q1.len() < KILL_AT {
        assert!(Instant::now() < deadline, "only {} delivered", q1.len());
        // Not a select!: a cancelled pump could leave a PUBREC half sent.
        while let Ok(m) = rx.try_recv() {
            q1.push(m);
        }
        q2.pump(&mut q2c, Duration::from_millis(5)).await;
    }
    let rate = q1.len() as f64 / started.elapsed().as_secs_f64();
    victim.0.kill().expect("SIGKILL");
    let _ = victim.0.wait();
    let killed_at = Instant::now();
    // What was already on its way from node 1 counts as received.
    while let Ok(m) = rx.try_recv() {
        q1.push(m);
    }
    while q2.pump(&mut q2c, Duration::from_millis(50)).await {}
    let before_kill = (q1.len(), q2.got.len());

    // Both sessions resume on node 2.
    qos1_subscriber(survivor.port(), &q1_id, FILTER, false, tx).await;
    let mut q2c = Qos2Receiver::connect(survivor.addr(), &q2_id, false).await;
    // QoS 2 to a persistent session waits for a session write per step:
    // that stream is slower.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        while let Ok(m) = rx.try_recv() {
            q1.push(m);
        }
        let done1 = duplicates(&q1).1.len() >= N;
        let done2 = duplicates(&q2.got).1.len() >= N;
        if (done1 && done2) || Instant::now() > deadline {
            break;
        }
        q2.pump(&mut q2c, Duration::from_millis(50)).await;
    }
    // Late repeats would still count: give them a moment.
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle {
        q2.pump(&mut q2c, Duration::from_millis(100)).await;
    }
    while let Ok(m) = rx.try_recv() {
        q1.push(m);
    }
    let acked = publisher.await.expect("publisher task");

    let (dup1, distinct1) = duplicates(&q1);
    let (dup2, distinct2) = duplicates(&q2.got);
    let in_kafka = common::read_topic(&survivor.default_topic, N, Duration::from_secs(30)).len();
    eprintln!(
        "acknowledged {acked}, in Kafka {in_kafka}; before SIGKILL ({rate:.0} msg/s) QoS 1 had {}, QoS 2 {}; \
         after: QoS 1 {} delivered ({} distinct, {dup1} duplicates), \
         QoS 2 {} delivered ({} distinct, {dup2} duplicates); resumed in {:?}",
        before_kill.0,
        before_kill.1,
        q1.len(),
        distinct1.len(),
        q2.got.len(),
        distinct2.len(),
        killed_at.elapsed()
    );
    assert_eq!(
        acked, N,
        "every PUBLISH acknowledged (publisher is on node 2)"
    );
    assert_eq!(in_kafka, N, "every acknowledged message is in Kafka");
    assert_eq!(distinct1.len(), N, "QoS 1 subscriber lost messages");
    assert_eq!(distinct2.len(), N, "QoS 2 subscriber lost messages");
    assert_eq!(
        dup2, 0,
        "QoS 2 delivered exactly once across the node's death"
    );
    assert!(
        dup1 <= MAX_QOS1_DUPLICATES,
        "QoS 1: {dup1} duplicates after SIGKILL (at most {MAX_QOS1_DUPLICATES})"
    );
}

/// The cost of the above: session records written per acknowledged QoS 1
/// delivery to a persistent subscriber under a steady stream (target of
/// issue #18: at most 10 % extra Kafka writes; before, one write per 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_writes_stay_under_ten_percent_of_acknowledged_deliveries() {
    const M: usize = 30_000;
    const PUBLISHERS: usize = 4;
    // Defaults: no `max_unsaved_deliveries` (the bound costs at most one
    // write per UNSAVED / 2 deliveries, and throughput).
    let b = common::start(&[]).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    qos1_subscriber(b.port(), &common::unique("cost-sub"), "cost/#", false, tx).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = common::read_topic(&b.sessions_topic, usize::MAX, Duration::from_secs(3)).len();
    let t0 = Instant::now();
    // Four publishers of 2,500 msg/s each: one rumqttc publisher tops out
    // near 5,000 msg/s here, below the 10,000 the target names.
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|i| {
            clients::publisher(clients::PublisherSpec {
                roam: clients::Roaming::on(&[b.port()]),
                id: common::unique(&format!("cost-pub{i}")),
                topic: "cost/x",
                qos: QoS::AtLeastOnce,
                n: M / PUBLISHERS,
                per_s: 10_000 / PUBLISHERS as u64,
                limit: Duration::from_secs(180),
            })
        })
        .collect();
    let mut got = 0usize;
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(200);
    while got < M && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(_)) => {
                got += 1;
                first.get_or_insert_with(Instant::now);
            }
            _ => break,
        }
    }
    // The rate between the first and the last delivery: connecting the
    // publishers is not part of the stream.
    let secs = first.unwrap_or(t0).elapsed().as_secs_f64();
    let mut acked = 0;
    for p in publishers {
        acked += p.await.expect("publisher");
    }
    let writes =
        common::read_topic(&b.sessions_topic, usize::MAX, Duration::from_secs(5)).len() - before;
    let ratio = writes as f64 / got as f64;
    eprintln!(
        "{acked} published, {got} delivered and acknowledged in {secs:.1} s ({:.0} msg/s): \
         {writes} session records = {:.2} % of deliveries",
        got as f64 / secs,
        ratio * 100.0
    );
    assert_eq!(got, M, "every message delivered");
    assert!(
        ratio <= 0.10,
        "session writes are {:.1} % of deliveries",
        ratio * 100.0
    );
}
