//! Issue #15 item 3: cluster-wide shared subscriptions. Three broker
//! processes (the broker binary) over one Kafka (this test's in-process node
//! only creates the topics), members of one `$share/<g>/<filter>` on each
//! (rumqttc, QoS 1): two on node 1, one each on nodes 2 and 3. Each member is a consumer of the
//! Kafka consumer group `lodestream-share/<g>/<filter>` (12 partitions:
//! three each).
//!
//! 1. While all are healthy, 10,000 QoS 1 messages (each on its own topic,
//!    so its own Kafka key) reach the group exactly once, each member
//!    within ±20 % of a quarter.
//! 2. Under load (1,000 msg/s, 6,000 messages) a member joins on node 2, a
//!    member on node 1 leaves, and node 3 is SIGKILLed: every message still
//!    reaches some member (at least once).

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet as P4, QoS};
use tokio::sync::mpsc;

const N: usize = 10_000;
const CHURN: usize = 6_000;
const PARTITIONS: i32 = 12;

/// One member (rumqttc, clean session, QoS 1) and its receipts.
struct Member {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<String>,
    got: Vec<String>,
}

impl Member {
    async fn join(port: u16, filter: &str) -> Member {
        let mut o = MqttOptions::new(common::unique("member"), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut ev) = AsyncClient::new(o, 1000);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let (tx, rx) = mpsc::unbounded_channel();
        // Every PUBLISH rumqttc acknowledges is recorded, until the
        // connection ends (DISCONNECT, or its node killed).
        tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(P4::Publish(p))) => {
                        let _ = tx.send(String::from_utf8_lossy(&p.payload).into_owned());
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        Member {
            client,
            rx,
            got: Vec::new(),
        }
    }

    fn take(&mut self) -> usize {
        while let Ok(m) = self.rx.try_recv() {
            self.got.push(m);
        }
        self.got.len()
    }
}

/// Waits until Kafka reports the consumer group Stable with `members`
/// members, three times in a row (a cooperative rebalance has two rounds).
fn wait_stable(group: &str, members: usize) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", common::kafka())
        .create()
        .expect("consumer");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut in_a_row = 0;
    while in_a_row < 3 {
        assert!(
            Instant::now() < deadline,
            "group {group} never settled with {members} members"
        );
        let stable = c
            .fetch_group_list(Some(group), Duration::from_secs(5))
            .ok()
            .and_then(|l| {
                l.groups()
                    .first()
                    .map(|g| g.state() == "Stable" && g.members().len() == members)
            })
            .unwrap_or(false);
        in_a_row = if stable { in_a_row + 1 } else { 0 };
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Publishes `<prefix>/<i>` with payload `i` for every `i` in `from..to`
/// at QoS 1, about `per_s` a second; returns how many were acknowledged.
async fn publish(port: u16, prefix: String, from: usize, to: usize, per_s: f64) -> usize {
    let mut o = MqttOptions::new(common::unique("pub"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut ev) = AsyncClient::new(o, 1000);
    let feed = tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        for i in from..to {
            let topic = format!("{prefix}/{i}");
            if c.publish(topic, QoS::AtLeastOnce, false, i.to_string())
                .await
                .is_err()
            {
                return;
            }
            let due = Duration::from_secs_f64((i - from + 1) as f64 / per_s);
            if (i - from) % 10 == 9 {
                tokio::time::sleep_until(start + due).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked < to - from && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), ev.poll()).await {
            Ok(Ok(Event::Incoming(P4::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => panic!("publisher failed: {e}"),
        }
    }
    feed.abort();
    acked
}

/// How many times each id in `from..to` was received, over all members.
fn counts(members: &[&Member], from: usize, to: usize) -> HashMap<usize, usize> {
    let mut seen: HashMap<usize, usize> = (from..to).map(|i| (i, 0)).collect();
    for m in members {
        for g in &m.got {
            if let Some(c) = g.parse().ok().and_then(|i: usize| seen.get_mut(&i)) {
                *c += 1;
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_on_three_nodes_share_each_message_once_and_lose_nothing_to_a_killed_node() {
    let mut c = common::test_config(&[]);
    c.kafka.topic_partitions = PARTITIONS;
    let topics = common::start_with(c).await;
    let [p1, p2, p3] = common::free_ports();
    let _n1 = common::spawn_node(p1, &topics, &common::unique("n1"));
    let _n2 = common::spawn_node(p2, &topics, &common::unique("n2"));
    let mut n3 = common::spawn_node(p3, &topics, &common::unique("n3"));
    for p in [p1, p2, p3] {
        common::wait_port(p).await;
    }

    let run = common::unique("sh");
    let (share, inner) = ("workers", format!("{run}/+"));
    let filter = format!("$share/{share}/{inner}");
    let group = format!("lodestream-share/{share}/{inner}");
    let mut members = vec![
        Member::join(p1, &filter).await,
        Member::join(p1, &filter).await,
        Member::join(p2, &filter).await,
        Member::join(p3, &filter).await,
    ];
    let g = group.clone();
    tokio::task::spawn_blocking(move || wait_stable(&g, 4))
        .await
        .unwrap();

    // 1. Healthy: exactly once, balanced.
    let started = Instant::now();
    let acked = publish(p1, run.clone(), 0, N, 5000.0).await;
    assert_eq!(acked, N, "every message acknowledged");
    let deadline = Instant::now() + Duration::from_secs(60);
    while members.iter_mut().map(Member::take).sum::<usize>() < N && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Late duplicates would still count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per: Vec<usize> = members.iter_mut().map(Member::take).collect();
    let seen = counts(&members.iter().collect::<Vec<_>>(), 0, N);
    let missing = seen.values().filter(|&&c| c == 0).count();
    let twice = seen.values().filter(|&&c| c > 1).count();
    eprintln!(
        "healthy: {N} messages in {:?}; per member {per:?}; missing {missing}, more than once {twice}",
        started.elapsed()
    );
    assert_eq!((missing, twice), (0, 0), "each message exactly once");
    assert_eq!(per.iter().sum::<usize>(), N);
    let fair = N as f64 / per.len() as f64;
    for (i, &n) in per.iter().enumerate() {
        let off = (n as f64 - fair).abs() / fair;
        assert!(
            off <= 0.20,
            "member {i} got {n}, {:.0} % off a fair {fair:.0}",
            off * 100.0
        );
    }

    // 2. Under load: a join, a leave, a node killed.
    for m in &mut members {
        m.got.clear();
    }
    let publisher = tokio::spawn(publish(p1, run.clone(), N, N + CHURN, 1000.0));
    let mut gone: Vec<Member> = Vec::new();
    let mut joined = false;
    let mut killed_at = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got: usize = members.iter_mut().map(Member::take).sum::<usize>()
            + gone.iter_mut().map(Member::take).sum::<usize>();
        if !joined && got >= CHURN / 4 {
            members.push(Member::join(p2, &filter).await);
            joined = true;
        }
        if gone.is_empty() && got >= CHURN / 2 {
            // A clean leave: DISCONNECT; what arrived before it counts.
            let leaving = members.remove(0);
            leaving.client.disconnect().await.expect("disconnect");
            gone.push(leaving);
        }
        if killed_at.is_none() && got >= 2 * CHURN / 3 {
            n3.0.kill().expect("SIGKILL node 3");
            let _ = n3.0.wait();
            killed_at = Some(Instant::now());
        }
        let all: Vec<&Member> = members.iter().chain(gone.iter()).collect();
        let seen = counts(&all, N, N + CHURN);
        let missing = seen.values().filter(|&&c| c == 0).count();
        if (killed_at.is_some() && missing == 0) || Instant::now() > deadline {
            let twice = seen.values().filter(|&&c| c > 1).count();
            eprintln!(
                "churn: {CHURN} messages; join at {}, leave at {}, node 3 killed at {}; \
                 missing {missing}, more than once {twice}; all in {:?} after the kill",
                CHURN / 4,
                CHURN / 2,
                2 * CHURN / 3,
                killed_at.map(|k| k.elapsed())
            );
            assert_eq!(
                missing, 0,
                "nothing lost to the join, the leave or the killed node"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acked = publisher.await.expect("publisher");
    assert_eq!(acked, CHURN, "every message of the churn acknowledged");
}
