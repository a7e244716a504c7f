//! Issue #18 item 6 (docs/operations.md, "Upgrades"): a rolling restart of
//! the broker nodes under load loses nothing and every client is back in
//! under 30 s.
//!
//! Three broker processes (the real binary) share the test's Kafka topics;
//! an in-process node provides the topic names and stays up, but no client
//! uses it. Persistent QoS 1 publishers and subscribers (rumqttc) are spread
//! over the three; each node in turn gets SIGTERM (graceful: DISCONNECT
//! 0x8B, sessions written offline), and is started again under the same
//! node id. Clients that lose their node reconnect to the next one, as
//! behind a load balancer, and resume their sessions there.

use crate::common;
use crate::common::clients;

use std::process::Command;
use std::time::{Duration, Instant};

use clients::{duplicates, roaming_subscriber, PublisherSpec, Roaming};
use rumqttc::QoS;
use tokio::sync::mpsc;

const N: usize = 1000;
const BACK_WITHIN: Duration = Duration::from_secs(30);

/// SIGTERM, then wait for the process to exit (its graceful shutdown).
fn stop_gracefully(p: &mut common::Proc) -> Duration {
    let t0 = Instant::now();
    let pid = p.0.id().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(sent, "SIGTERM to broker {pid}");
    let _ = p.0.wait();
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_broker_nodes_loses_nothing_and_clients_are_back_within_30s() {
    let anchor = common::start(&[]).await;
    let ports: [u16; 3] = common::free_ports();
    let ids: Vec<String> = (0..3)
        .map(|i| common::unique(&format!("node{i}")))
        .collect();
    let mut nodes: Vec<common::Proc> = ports
        .iter()
        .zip(&ids)
        .map(|(p, id)| common::spawn_node(*p, &anchor, id))
        .collect();
    for p in ports {
        common::wait_port(p).await;
    }

    // Each client starts on a different node and moves on to the next one.
    let roam = |first: usize| Roaming::on(&[0, 1, 2].map(|k| ports[(first + k) % 3]));
    let (tx, mut rx_a) = mpsc::unbounded_channel();
    let sub_a = roam(1);
    roaming_subscriber(
        sub_a.clone(),
        &common::unique("sub-a"),
        "roll/#",
        tx,
        Duration::from_secs(300),
    )
    .await;
    let (tx, mut rx_b) = mpsc::unbounded_channel();
    let sub_b = roam(2);
    roaming_subscriber(
        sub_b.clone(),
        &common::unique("sub-b"),
        "roll/#",
        tx,
        Duration::from_secs(300),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (pub_a, pub_b) = (roam(0), roam(1));
    let spec = |roam: Roaming, topic| PublisherSpec {
        roam,
        id: common::unique("pub"),
        topic,
        qos: QoS::AtLeastOnce,
        n: N,
        per_s: 25,
        limit: Duration::from_secs(300),
    };
    let p1 = clients::publisher(spec(pub_a.clone(), "roll/a"));
    let p2 = clients::publisher(spec(pub_b.clone(), "roll/b"));
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let mut drain = |got_a: &mut Vec<String>, got_b: &mut Vec<String>| {
        while let Ok(m) = rx_a.try_recv() {
            got_a.push(m);
        }
        while let Ok(m) = rx_b.try_recv() {
            got_b.push(m);
        }
    };

    tokio::time::sleep(Duration::from_secs(5)).await;
    for (i, node) in nodes.iter_mut().enumerate() {
        let took = tokio::task::block_in_place(|| stop_gracefully(node));
        *node = common::spawn_node(ports[i], &anchor, &ids[i]);
        common::wait_port(ports[i]).await;
        eprintln!("node {i} stopped in {took:?} and started again");
        // Let the clients settle before the next node goes.
        tokio::time::sleep(Duration::from_secs(5)).await;
        drain(&mut got_a, &mut got_b);
    }

    let acked_a = p1.await.expect("publisher a");
    let acked_b = p2.await.expect("publisher b");
    let deadline = Instant::now() + Duration::from_secs(60);
    while (duplicates(&got_a).1.len() < 2 * N || duplicates(&got_b).1.len() < 2 * N)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        drain(&mut got_a, &mut got_b);
    }
    // QoS 1 allows a PUBLISH written twice (written, then its PUBACK lost
    // with the stopping node, so the client resends it elsewhere): such
    // copies reach the subscribers as repeats, and the first 2N records
    // would then hold fewer than 2N distinct messages. Read that many more.
    let copies = duplicates(&got_a).0.max(duplicates(&got_b).0);
    let recs = common::read_topic(
        &anchor.default_topic,
        2 * N + copies,
        Duration::from_secs(30),
    );
    let in_kafka: std::collections::HashSet<String> = recs
        .iter()
        .filter_map(|r| r.value.as_ref())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    let clients = [
        ("publisher a", &pub_a),
        ("publisher b", &pub_b),
        ("subscriber a", &sub_a),
        ("subscriber b", &sub_b),
    ];
    for (name, r) in clients {
        eprintln!("{name}: {} outages, longest {:?}", r.outages(), r.max_gap());
    }
    let (dup_a, distinct_a) = duplicates(&got_a);
    let (dup_b, distinct_b) = duplicates(&got_b);
    eprintln!(
        "acknowledged {acked_a} + {acked_b} of {}, in Kafka {} distinct; subscriber a {} distinct \
         ({dup_a} repeats), subscriber b {} distinct ({dup_b} repeats)",
        2 * N,
        in_kafka.len(),
        distinct_a.len(),
        distinct_b.len()
    );
    assert_eq!((acked_a, acked_b), (N, N), "every PUBLISH acknowledged");
    assert_eq!(in_kafka.len(), 2 * N, "acknowledged messages lost in Kafka");
    assert_eq!(distinct_a.len(), 2 * N, "subscriber a missed messages");
    assert_eq!(distinct_b.len(), 2 * N, "subscriber b missed messages");
    for (name, r) in clients {
        assert!(
            r.outages() >= 1,
            "{name} was on a restarted node: it must have moved"
        );
        assert!(
            r.max_gap() < BACK_WITHIN,
            "{name} back after {:?}",
            r.max_gap()
        );
    }
}
