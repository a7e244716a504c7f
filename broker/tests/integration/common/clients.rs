// Real MQTT clients for the node- and Kafka-failure tests (include! this
// file in a module next to `mod raw`): a rumqttc QoS 1 subscriber, a QoS 2
// receiver keeping its own state as MQTT requires, a rumqttc publisher that
// counts acknowledgements.
use std::collections::HashSet;
use std::time::Duration;

use lodestream_mqtt::{
    Ack, Connect, Packet, Properties, ProtocolVersion, QoS as Q, Subscribe, SubscriptionOptions,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet as P4, QoS};
use tokio::sync::mpsc;

use super::raw::Raw;

/// A persistent (or clean) rumqttc QoS 1 subscriber to `filter`; payloads go
/// to `tx` as they arrive. Ends when its node goes away: resume the session
/// by calling this again with another port.
pub async fn qos1_subscriber(
    port: u16,
    id: &str,
    filter: &str,
    clean: bool,
    tx: mpsc::UnboundedSender<String>,
) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(clean);
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut ev) = AsyncClient::new(o, 1000);
    c.subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    tokio::spawn(async move {
        let _keep = c;
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(P4::Publish(p))) => {
                    if tx
                        .send(String::from_utf8_lossy(&p.payload).into_owned())
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
}

/// A raw client connection; `clean` false resumes the session (MQTT 5
/// sessions last 600 s after a disconnect); returns it and CONNACK's
/// session present flag. Like a real client it retries for up to 60 s while
/// the node is unreachable or refuses (e.g. 0x88 while Kafka elects a leader).
pub async fn open(
    addr: std::net::SocketAddr,
    protocol: ProtocolVersion,
    id: &str,
    clean: bool,
) -> (Raw, bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(ok) = try_open(addr, protocol, id, clean).await {
            return ok;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id}: no successful CONNACK from {addr} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn try_open(
    addr: std::net::SocketAddr,
    protocol: ProtocolVersion,
    id: &str,
    clean: bool,
) -> Option<(Raw, bool)> {
    tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut r = Raw::connect(addr).await;
    let expiry = (protocol == ProtocolVersion::V5).then_some(600);
    r.send(&Packet::Connect(Box::new(Connect {
        protocol,
        clean_start: clean,
        keep_alive: 60,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties {
            session_expiry_interval: expiry,
            ..Properties::default()
        },
    })))
    .await;
    match r.recv_within(Duration::from_secs(30)).await {
        Some(Packet::ConnAck(c)) if !c.reason.is_error() => Some((r, c.session_present)),
        _ => None,
    }
}

/// A QoS 2 receiver: a message counts when its PUBLISH first arrives; a
/// retransmission (DUP) of an id awaiting PUBREL is not a new message
/// [MQTT-4.3.3]. Its state outlives connections, as a real client's does.
#[derive(Default)]
pub struct Qos2Receiver {
    pub awaiting_rel: HashSet<u16>,
    pub got: Vec<String>,
}

impl Qos2Receiver {
    /// MQTT 3.1.1 connection; `clean` false keeps the session.
    pub async fn connect(addr: std::net::SocketAddr, id: &str, clean: bool) -> Raw {
        open(addr, ProtocolVersion::V311, id, clean).await.0
    }

    pub fn subscribe(filter: &str) -> Packet {
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(filter.into(), SubscriptionOptions::qos(Q::ExactlyOnce))],
            properties: Properties::default(),
        })
    }

    /// Handles what arrives within `t`; false when nothing came (or the
    /// connection ended).
    pub async fn pump(&mut self, r: &mut Raw, t: Duration) -> bool {
        match r.recv_within(t).await {
            Some(Packet::Publish(p)) => {
                let id = p.packet_id.unwrap_or(0);
                if self.awaiting_rel.insert(id) {
                    self.got
                        .push(String::from_utf8_lossy(&p.payload).into_owned());
                }
                send_quietly(r, &Packet::PubRec(Ack::new(id))).await;
                true
            }
            Some(Packet::PubRel(a)) => {
                self.awaiting_rel.remove(&a.packet_id);
                send_quietly(r, &Packet::PubComp(Ack::new(a.packet_id))).await;
                true
            }
            Some(_) => true,
            None => false,
        }
    }
}

/// Sends without failing the test when the node has just died (the
/// session state the reply belonged to is the new node's concern).
async fn send_quietly(r: &mut Raw, p: &Packet) {
    let mut b = bytes::BytesMut::new();
    if lodestream_mqtt::encode(p, r.version, &mut b).is_ok() {
        r.send_bytes(&b).await;
    }
}

/// Deliveries beyond the first of each payload, and the distinct payloads.
pub fn duplicates(got: &[String]) -> (usize, HashSet<&String>) {
    let distinct: HashSet<&String> = got.iter().collect();
    (got.len() - distinct.len(), distinct)
}

/// Reconnection bookkeeping of a client that moves between nodes: the
/// ports it cycles through, and how long each outage lasted (connection
/// lost -> CONNACK again).
#[derive(Clone, Default)]
pub struct Roaming {
    pub ports: Vec<u16>,
    pub gaps: std::sync::Arc<std::sync::Mutex<Vec<Duration>>>,
}

impl Roaming {
    pub fn on(ports: &[u16]) -> Roaming {
        Roaming {
            ports: ports.to_vec(),
            gaps: Default::default(),
        }
    }

    pub fn max_gap(&self) -> Duration {
        self.gaps
            .lock()
            .map(|g| g.iter().copied().max().unwrap_or_default())
            .unwrap_or_default()
    }

    pub fn outages(&self) -> usize {
        self.gaps.lock().map(|g| g.len()).unwrap_or_default()
    }
}

/// Drives a rumqttc event loop: lost connections move to the next port of
/// `roam` (a load balancer's job) and are timed; `on` sees every event.
/// Returns when `on` says stop (true) or after `limit`.
async fn drive(
    ev: &mut rumqttc::EventLoop,
    roam: &Roaming,
    options: impl Fn(u16) -> MqttOptions,
    limit: Duration,
    mut on: impl FnMut(&Event) -> bool,
) {
    // CONNACK may take a while when the node first waits for a dead
    // owner's hand-off and Kafka elects a new leader (rumqttc's default: 5 s).
    ev.network_options.set_connection_timeout(30);
    let deadline = tokio::time::Instant::now() + limit;
    let mut next = 0usize;
    let mut lost: Option<tokio::time::Instant> = None;
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, ev.poll()).await {
            Ok(Ok(e)) => {
                if let (Event::Incoming(P4::ConnAck(_)), Some(at)) = (&e, lost) {
                    if let Ok(mut g) = roam.gaps.lock() {
                        g.push(at.elapsed());
                    }
                    lost = None;
                }
                if on(&e) {
                    return;
                }
            }
            // Its node went away (or a 3.1.1 client after a failed Kafka
            // write): reconnect, to the next node, and retransmit.
            Ok(Err(_)) => {
                lost.get_or_insert_with(tokio::time::Instant::now);
                if roam.ports.len() > 1 {
                    next = (next + 1) % roam.ports.len();
                    ev.mqtt_options = options(roam.ports[next]);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(_) => return,
        }
    }
}

fn options(id: String, clean: bool) -> impl Fn(u16) -> MqttOptions {
    move |port: u16| {
        let mut o = MqttOptions::new(id.clone(), "127.0.0.1", port);
        o.set_inflight(100);
        o.set_clean_session(clean);
        o.set_keep_alive(Duration::from_secs(30));
        o
    }
}

/// A persistent rumqttc QoS 1 subscriber that follows its session from
/// node to node (`roam`); payloads go to `tx`.
pub async fn roaming_subscriber(
    roam: Roaming,
    id: &str,
    filter: &'static str,
    tx: mpsc::UnboundedSender<String>,
    limit: Duration,
) {
    let options = options(id.to_string(), false);
    let (c, mut ev) = AsyncClient::new(options(roam.ports[0]), 1000);
    c.subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    tokio::spawn(async move {
        let _keep = c;
        drive(&mut ev, &roam, options, limit, |e| match e {
            Event::Incoming(P4::Publish(p)) => tx
                .send(String::from_utf8_lossy(&p.payload).into_owned())
                .is_err(),
            _ => false,
        })
        .await;
    });
}

/// Publishes "`topic`/0".."`topic`/n-1" to `topic` at `qos` through rumqttc
/// (it retransmits unacknowledged messages after a reconnect; rumqttc does
/// not set DUP, so use it for QoS 2 only where its node survives), about
/// `per_s` a second, and returns how many were acknowledged (PUBACK /
/// PUBCOMP). Gives up after `limit`.
pub struct PublisherSpec {
    pub roam: Roaming,
    pub id: String,
    pub topic: &'static str,
    pub qos: QoS,
    pub n: usize,
    pub per_s: u64,
    pub limit: Duration,
}

pub fn publisher(spec: PublisherSpec) -> tokio::task::JoinHandle<usize> {
    // A clean session: rumqttc retransmits what is unacknowledged after a
    // reconnect anyway, and a persistent publisher session would cost a
    // session write per QoS 2 message.
    let options = options(spec.id.clone(), true);
    let (pc, mut ev) = AsyncClient::new(options(spec.roam.ports[0]), 200);
    let (topic, qos, n, per_s) = (spec.topic, spec.qos, spec.n, spec.per_s);
    tokio::spawn(async move {
        let feed = tokio::spawn(async move {
            // Paced against a schedule, not by fixed pauses: a sleep ends
            // on the next timer tick, which made 2,500 msg/s into 2,000.
            let start = tokio::time::Instant::now();
            let per_s = per_s.max(1) as f64;
            for i in 0..n {
                if pc
                    .publish(topic, qos, false, format!("{topic}/{i}"))
                    .await
                    .is_err()
                {
                    return;
                }
                if i % 10 == 9 {
                    let due = Duration::from_secs_f64((i + 1) as f64 / per_s);
                    tokio::time::sleep_until(start + due).await;
                }
            }
            // Keep the client (and its connection) until the counting ends.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let mut acked = 0usize;
        drive(&mut ev, &spec.roam, options, spec.limit, |e| {
            match e {
                Event::Incoming(P4::PubAck(_)) if qos == QoS::AtLeastOnce => acked += 1,
                Event::Incoming(P4::PubComp(_)) if qos == QoS::ExactlyOnce => acked += 1,
                _ => {}
            }
            acked >= n
        })
        .await;
        feed.abort();
        acked
    })
}
