//! QoS 2 end to end is exactly once across a node crash [MQTT-4.3.3]: a
//! retransmitted PUBLISH is never written to Kafka twice and a QoS 2
//! subscriber never gets a message twice, even when the node that held the
//! session dies with SIGKILL and the clients resume on another node.

use crate::common;
use crate::common::packets::{self, IntoPacket};
use crate::common::raw;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use lodestream_broker::session::record::{Qos2Record, SessionRecord};
use lodestream_mqtt::{
    Ack, Connect, Packet, Properties, ProtocolVersion, Publish, QoS, Subscribe, SubscriptionOptions,
};
use raw::Raw;

fn connect(id: &str, clean: bool) -> Packet {
    Connect {
        clean_start: clean,
        keep_alive: 60,
        properties: Properties {
            session_expiry_interval: Some(600),
            ..Properties::default()
        },
        ..packets::connect(ProtocolVersion::V5, id)
    }
    .packet()
}

async fn open(addr: std::net::SocketAddr, id: &str, clean: bool) -> (Raw, bool) {
    let mut r = Raw::connect(addr).await;
    r.send(&connect(id, clean)).await;
    match r.recv().await {
        Some(Packet::ConnAck(c)) => (r, c.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn publish(topic: &str, id: u16, payload: &str, dup: bool) -> Publish {
    Publish {
        dup,
        ..packets::publish(topic, QoS::ExactlyOnce, Some(id), payload.to_string())
    }
}

fn payloads(recs: &[common::KRecord]) -> Vec<String> {
    recs.iter()
        .filter_map(|r| r.value.as_ref())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// The case a crash leaves behind, set up exactly: the previous owner wrote
/// a QoS 2 PUBLISH to Kafka (with its flow headers) but died before the
/// session state that knows it reached the sessions topic. The client's DUP
/// retransmission to another node is acknowledged without a second write;
/// a retransmission of a flow that was never written is written; a record
/// of a flow the stored state shows completed does not hide a new flow that
/// reuses its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmission_after_crash_is_not_written_twice() {
    let b = common::start(&[]).await;
    let client = common::unique("eo-client");
    let now = lodestream_broker::node::now_ms();
    // Records the dead owner wrote: id 7 (seq 5) after its last persist, id 9
    // (seq 2) for a flow its stored state says completed.
    for (id, seq, payload) in [
        (7u16, 5u64, "written-by-dead-node"),
        (9, 2, "completed-earlier"),
    ] {
        common::produce(
            &b.default_topic,
            "eo/t",
            payload.as_bytes(),
            &[
                ("mqtt.qos", b"2"),
                ("mqtt.client_id", client.as_bytes()),
                ("mqtt.packet_id", id.to_string().as_bytes()),
                ("mqtt.qos2_seq", seq.to_string().as_bytes()),
            ],
        )
        .await;
    }
    let rec = SessionRecord {
        v: 1,
        client_id: client.clone(),
        epoch: 1,
        node: "ghost".into(),
        online: false,
        handoff: false,
        expiry_s: 600,
        // The ghost died long enough ago that its last writes have landed
        // (the scan would otherwise wait for them: qos2_scan::settled_at_ms).
        disconnected_ms: Some(now - 60_000),
        subscriptions: vec![],
        will: None,
        inbound_qos2: vec![],
        qos2: Some(Qos2Record {
            received: vec![],
            unconfirmed: vec![],
            done: vec![],
            next_seq: 3,
            floor: 3,
            since_ms: now - 2_000,
        }),
        outbound: vec![],
        offsets: vec![],
    };
    common::produce(&b.sessions_topic, &client, &rec.encode(), &[]).await;
    // Wait until the node has read the record.
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.node().stored_session(&client).is_none() {
        assert!(
            Instant::now() < deadline,
            "node never read the session record"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (mut c, present) = open(b.addr(), &client, false).await;
    assert!(present, "[MQTT-3.2.2-2] session resumed from Kafka");
    // The retransmission of 7 (written before the crash): PUBREC, no write.
    c.send(&Packet::Publish(publish(
        "eo/t",
        7,
        "written-by-dead-node",
        true,
    )))
    .await;
    assert!(
        matches!(c.recv().await, Some(Packet::PubRec(a)) if a.packet_id == 7 && !a.reason.is_error())
    );
    // A retransmission of 8, which never reached Kafka: written.
    c.send(&Packet::Publish(publish("eo/t", 8, "never-written", true)))
        .await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(a)) if a.packet_id == 8));
    // Id 9 was completed (its record is below the stored floor): a DUP with
    // id 9 now is a new flow the client never got an answer for, so it is written.
    c.send(&Packet::Publish(publish("eo/t", 9, "reused-id", true)))
        .await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(a)) if a.packet_id == 9));
    for id in [7, 8, 9] {
        c.send(&Packet::PubRel(Ack::new(id))).await;
        assert!(matches!(c.recv().await, Some(Packet::PubComp(a)) if a.packet_id == id));
    }
    let recs = common::read_topic(&b.default_topic, 10, Duration::from_secs(5));
    let mut got = payloads(&recs);
    got.sort();
    assert_eq!(
        got,
        vec![
            "completed-earlier",
            "never-written",
            "reused-id",
            "written-by-dead-node"
        ],
        "[MQTT-4.3.3-9] each QoS 2 message in Kafka once"
    );
    let m = common::scrape(&b).await;
    assert_eq!(
        common::metric(&m, "lodestream_qos2_duplicates_suppressed_total"),
        1.0
    );
    // The new flows carry their identification for the next crash.
    let r8 = recs
        .iter()
        .find(|r| r.value.as_deref() == Some(b"never-written".as_slice()))
        .expect("record of 8");
    assert_eq!(
        r8.headers.get("mqtt.packet_id").map(Vec::as_slice),
        Some(b"8".as_slice())
    );
    assert!(r8.headers.contains_key("mqtt.qos2_seq"));
}

/// A QoS 2 publisher as the spec describes the sender [MQTT-4.3.3]: a
/// window of flows, each PUBLISH until PUBREC, then PUBREL until PUBCOMP;
/// after a reconnect it resends both stages with the same ids (PUBLISH with
/// DUP) [MQTT-4.4.0-1].
struct Publisher {
    id: String,
    topic_of: fn(u32) -> String,
    next: u32,
    total: u32,
    /// packet id -> (message number, PUBREC received)
    flows: BTreeMap<u16, (u32, bool)>,
    completed: u32,
}

impl Publisher {
    fn fill(&mut self, out: &mut Vec<Packet>, window: usize) {
        while self.flows.len() < window && self.next < self.total {
            let n = self.next;
            let pid = (n % 60_000) as u16 + 1;
            out.push(Packet::Publish(publish(
                &(self.topic_of)(n),
                pid,
                &format!("{}-{n}", self.id),
                false,
            )));
            self.flows.insert(pid, (n, false));
            self.next += 1;
        }
    }

    fn resend(&self) -> Vec<Packet> {
        self.flows
            .iter()
            .map(|(pid, (n, released))| {
                if *released {
                    Packet::PubRel(Ack::new(*pid))
                } else {
                    Packet::Publish(publish(
                        &(self.topic_of)(*n),
                        *pid,
                        &format!("{}-{n}", self.id),
                        true,
                    ))
                }
            })
            .collect()
    }

    fn on_packet(&mut self, p: Packet, out: &mut Vec<Packet>) {
        match p {
            Packet::PubRec(a) => {
                assert!(!a.reason.is_error(), "PUBREC refused: {a:?}");
                if let Some(f) = self.flows.get_mut(&a.packet_id) {
                    f.1 = true;
                    out.push(Packet::PubRel(Ack::new(a.packet_id)));
                }
            }
            Packet::PubComp(a) if self.flows.get(&a.packet_id).is_some_and(|f| f.1) => {
                self.flows.remove(&a.packet_id);
                self.completed += 1;
            }
            Packet::Disconnect(d) => panic!("publisher {} disconnected: {d:?}", self.id),
            _ => {}
        }
    }
}

/// A QoS 2 receiver that stores each id until PUBREL and delivers a PUBLISH
/// only if its id is not stored (the spec's method B) — the same state it
/// keeps across reconnects, as a persistent session requires.
#[derive(Default)]
struct Subscriber {
    unreleased: HashSet<u16>,
    delivered: Vec<String>,
}

impl Subscriber {
    fn on_packet(&mut self, p: Packet, out: &mut Vec<Packet>) {
        match p {
            Packet::Publish(m) => {
                assert_eq!(m.qos, QoS::ExactlyOnce);
                let Some(id) = m.packet_id else { return };
                if self.unreleased.insert(id) {
                    self.delivered
                        .push(String::from_utf8_lossy(&m.payload).into_owned());
                } else {
                    assert!(
                        m.dup,
                        "[MQTT-4.3.3-9] id {id} reused before PUBREL without DUP"
                    );
                }
                out.push(Packet::PubRec(Ack::new(id)));
            }
            Packet::PubRel(a) => {
                self.unreleased.remove(&a.packet_id);
                out.push(Packet::PubComp(Ack::new(a.packet_id)));
            }
            Packet::Disconnect(d) => panic!("subscriber disconnected: {d:?}"),
            _ => {}
        }
    }
}

/// Drives every client until `done` holds or the connections fall silent.
async fn pump(
    pubs: &mut [(Publisher, Raw)],
    sub: &mut (Subscriber, Raw),
    window: usize,
    mut done: impl FnMut(&[(Publisher, Raw)], &Subscriber) -> bool,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    while !done(pubs, &sub.0) {
        assert!(Instant::now() < deadline, "timed out");
        for (p, r) in pubs.iter_mut() {
            let mut out = Vec::new();
            p.fill(&mut out, window);
            while let Some(pk) = r.recv_within(Duration::from_millis(5)).await {
                p.on_packet(pk, &mut out);
            }
            for pk in &out {
                r.send(pk).await;
            }
        }
        let mut out = Vec::new();
        while let Some(pk) = sub.1.recv_within(Duration::from_millis(5)).await {
            sub.0.on_packet(pk, &mut out);
        }
        for pk in &out {
            sub.1.send(pk).await;
        }
    }
}

/// SIGKILL the node holding two QoS 2 publishers and a QoS 2 subscriber in
/// the middle of their streams; they resume on the surviving node. Every
/// message is in Kafka exactly once and reaches the subscriber exactly once,
/// in order per topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_streams_survive_sigkill_exactly_once() {
    let survivor = common::start(&[]).await;
    let [port] = common::free_ports();
    let mut victim = common::spawn_node(port, &survivor, &common::unique("victim"));
    common::wait_port(port).await;
    let victim_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    const PER_PUBLISHER: u32 = 1500;
    const WINDOW: usize = 20;
    let sub_id = common::unique("eo-sub");
    let (mut s, _) = open(victim_addr, &sub_id, true).await;
    s.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![("eo/#".into(), SubscriptionOptions::qos(QoS::ExactlyOnce))],
        properties: Properties::default(),
    }))
    .await;
    assert!(matches!(s.recv().await, Some(Packet::SubAck(_))));
    let mut sub = (Subscriber::default(), s);
    let mut pubs = Vec::new();
    for (i, topic_of) in [(|n| format!("eo/a/{}", n % 3)) as fn(u32) -> String, |n| {
        format!("eo/b/{}", n % 2)
    }]
    .into_iter()
    .enumerate()
    {
        let id = common::unique(&format!("eo-pub{i}"));
        let (r, _) = open(victim_addr, &id, true).await;
        pubs.push((
            Publisher {
                id,
                topic_of,
                next: 0,
                total: PER_PUBLISHER,
                flows: BTreeMap::new(),
                completed: 0,
            },
            r,
        ));
    }

    // Run until half the messages completed, then kill the node mid-flow.
    pump(
        &mut pubs,
        &mut sub,
        WINDOW,
        |p, _| p.iter().map(|(p, _)| p.completed).sum::<u32>() >= PER_PUBLISHER,
        Duration::from_secs(120),
    )
    .await;
    // Open a full window on each publisher and give the node time to write
    // it to Kafka, but do not read its PUBRECs: the crash then leaves flows
    // that are in Kafka while the stored session state does not know them,
    // which only the Kafka scan can tell apart from unwritten ones.
    for (p, r) in pubs.iter_mut() {
        let mut out = Vec::new();
        p.fill(&mut out, WINDOW);
        for pk in &out {
            r.send(pk).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    victim.0.kill().expect("SIGKILL");
    let _ = victim.0.wait();
    let in_flight: usize = pubs.iter().map(|(p, _)| p.flows.len()).sum();
    let released: usize = pubs
        .iter()
        .map(|(p, _)| p.flows.values().filter(|f| f.1).count())
        .sum();
    eprintln!(
        "killed with {in_flight} publisher flows open ({released} past PUBREC), subscriber holding {} ids, {} delivered",
        sub.0.unreleased.len(),
        sub.0.delivered.len()
    );

    // Everyone resumes on the survivor, resending what was unfinished.
    let (mut s, present) = open(survivor.addr(), &sub_id, false).await;
    assert!(present, "subscriber session survives its node");
    std::mem::swap(&mut sub.1, &mut s);
    for (p, r) in pubs.iter_mut() {
        let (mut nr, present) = open(survivor.addr(), &p.id, false).await;
        assert!(present, "publisher session survives its node");
        for pk in p.resend() {
            nr.send(&pk).await;
        }
        *r = nr;
    }
    let total = PER_PUBLISHER as usize * pubs.len();
    pump(
        &mut pubs,
        &mut sub,
        WINDOW,
        |p, s| {
            p.iter()
                .all(|(p, _)| p.completed == p.total && p.flows.is_empty())
                && s.delivered.len() >= total
        },
        Duration::from_secs(180),
    )
    .await;
    // A little longer, to catch late duplicates.
    let until = Instant::now() + Duration::from_secs(2);
    pump(
        &mut pubs,
        &mut sub,
        WINDOW,
        |_, _| Instant::now() > until,
        Duration::from_secs(10),
    )
    .await;

    // Kafka: every message exactly once.
    let recs = common::read_topic(&survivor.default_topic, total + 50, Duration::from_secs(20));
    let mut count: HashMap<String, usize> = HashMap::new();
    for p in payloads(&recs) {
        *count.entry(p).or_default() += 1;
    }
    let dups: Vec<_> = count.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        dups.is_empty(),
        "[MQTT-4.3.3] {} messages written more than once, e.g. {:?}",
        dups.len(),
        dups.iter().take(3).collect::<Vec<_>>()
    );
    assert_eq!(count.len(), total, "every completed message is in Kafka");

    // Subscriber: every message exactly once, in order per topic.
    let mut seen = HashSet::new();
    let dup_deliveries: Vec<&String> = sub
        .0
        .delivered
        .iter()
        .filter(|m| !seen.insert(*m))
        .collect();
    assert!(
        dup_deliveries.is_empty(),
        "delivered twice: {dup_deliveries:?}"
    );
    assert_eq!(seen.len(), total, "every message delivered");
    let mut last: HashMap<String, u32> = HashMap::new();
    for m in &sub.0.delivered {
        let (who, n) = m.rsplit_once('-').unwrap();
        let n: u32 = n.parse().unwrap();
        let topic = if who.contains("pub0") {
            format!("a{}", n % 3)
        } else {
            format!("b{}", n % 2)
        };
        if let Some(prev) = last.insert(topic.clone(), n) {
            assert!(n > prev, "topic {topic}: {n} after {prev}");
        }
    }
    let m = common::scrape(&survivor).await;
    eprintln!(
        "{} messages in Kafka once each, {} delivered once each; duplicates suppressed by the Kafka scan: {}",
        count.len(),
        sub.0.delivered.len(),
        common::metric(&m, "lodestream_qos2_duplicates_suppressed_total")
    );
}
