//! One MQTT connection, from the first byte to the close: reads CONNECT,
//! claims the session, then runs one event loop over the socket, the
//! session's mailbox, Kafka acknowledgements and control messages.
//!
//! Transport-agnostic: TCP, TLS and WebSocket all arrive as a byte stream.
//!
//! Bounded behaviour:
//! - read buffer: one packet of at most `max_packet_size` (bigger ones are
//!   refused from their fixed header, reason 0x95);
//! - inbound QoS 1/2 awaiting Kafka: at most `receive_maximum`; the socket is
//!   not read past that (TCP back-pressure) and a v5 client exceeding it is
//!   disconnected with 0x93 [MQTT-3.3.4-9];
//! - outbound QoS 1/2 in flight: the client's Receive Maximum (v5) or
//!   `max_inflight_out`; the rest waits in the session's bounded mailbox;
//! - a write blocked for `write_timeout_s` closes the connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use lodestream_mqtt::codec::{reason_allowed_in, DecodeError, Decoder};
use lodestream_mqtt::topic::SharedFilter;
use lodestream_mqtt::{
    encode, Ack, ConnAck, Connect, Disconnect, Packet, Properties, ProtocolVersion, Publish, QoS,
    ReasonCode, RetainHandling, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use crate::acl::Action;
use crate::auth::Identity;
use crate::kafka::{ProduceError, Producer};
use crate::message::{Message, Qos2Flow};
use crate::node::{index_entries, now_ms, sub_key, Node};
use crate::rate_limit::TokenBucket;
use crate::session::lifecycle::Claimed;
use crate::session::record::SessionRecord;
use crate::session::registry::Control;
use crate::session::release::{release, Leaving, SessionEnd};
use crate::session::{Delivery, OutFlow, Session, Subscription};
use crate::subscriptions::SubEntry;
use crate::transport::Transport;

/// Why a connection ends.
enum End {
    /// Client sent DISCONNECT; `keep_will` for v5 reason 0x04.
    Client { keep_will: bool },
    /// Network closed or failed.
    Io(String),
    /// We close it, telling a v5 client why.
    Server(ReasonCode, String),
    TakenOver {
        clean_start: bool,
        reply: tokio::sync::oneshot::Sender<Option<Box<Session>>>,
    },
    /// Another node claimed the session with this epoch.
    TakenOverRemote(u64),
}

impl End {
    /// What the session's release needs to know of this end.
    fn into_session_end(self) -> SessionEnd {
        match self {
            End::Client { keep_will: false } => SessionEnd::Disconnect,
            End::Client { keep_will: true } => SessionEnd::DisconnectWithWill,
            End::Io(_) => SessionEnd::NetworkLoss,
            End::Server(ReasonCode::ServerShuttingDown, _) => SessionEnd::Shutdown,
            End::Server(_, _) => SessionEnd::Closed,
            End::TakenOver { clean_start, reply } => SessionEnd::TakenOver { clean_start, reply },
            End::TakenOverRemote(epoch) => SessionEnd::TakenOverRemote { epoch },
        }
    }

    fn label(&self) -> &'static str {
        match self {
            End::Client { .. } => "client",
            End::Io(_) => "network",
            End::Server(ReasonCode::KeepAliveTimeout, _) => "keep_alive",
            End::Server(ReasonCode::ServerShuttingDown, _) => "shutdown",
            End::Server(ReasonCode::QuotaExceeded, _) => "quota",
            End::Server(_, _) => "protocol",
            End::TakenOver { .. } | End::TakenOverRemote(_) => "taken_over",
        }
    }
}

/// How often a connected persistent session's progress is written to Kafka.
const PERSIST_EVERY: Duration = Duration::from_secs(5);

/// A persistent session's progress is also written once this many of its
/// deliveries were acknowledged (PUBACK/PUBCOMP) since the last write, so a
/// node's death re-delivers about this many plus what was in flight, not 5 s
/// worth. At most one extra session record per 16 acknowledged deliveries
/// (6 %); fewer when Kafka is slower than the client, as writes never
/// overlap (numbers in docs/benchmarks.md).
const PERSIST_AFTER_ACKS: usize = 16;

type AckFuture = Pin<Box<dyn Future<Output = AckDone> + Send>>;

/// A QoS 1/2 PUBLISH whose Kafka write finished.
struct AckDone {
    packet_id: u16,
    qos: QoS,
    result: Result<(), ProduceError>,
    msg: Arc<Message>,
    started: Instant,
    /// A retransmission found already written in Kafka: acknowledge only.
    duplicate: bool,
}

/// At most this many packets wait for a session write (QoS 0 deliveries
/// pause meanwhile; QoS 1/2 are bounded by the window anyway).
const HELD_MAX: usize = 256;

/// A session write in flight and the packets that may go out once it is
/// acknowledged by Kafka.
struct Syncing {
    write: Pin<Box<dyn Future<Output = ()> + Send>>,
    packets: Vec<Packet>,
    /// Deliveries this write covers once it lands.
    covers: usize,
    /// Unacknowledged deliveries it records (resent after a crash).
    outbound: usize,
}

/// Serves one client connection until it closes. Never panics on input.
pub async fn serve<S>(
    node: Arc<Node>,
    stream: S,
    peer: SocketAddr,
    transport: Transport,
    cert_identity: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let _open = node.open_connection();
    let (rd, wr) = tokio::io::split(stream);
    let mut io = Io {
        rd,
        wr,
        rbuf: BytesMut::with_capacity(RBUF_IDLE),
        wbuf: BytesMut::new(),
        decoder: Decoder::new(node.config().mqtt.max_packet_size),
        node: node.clone(),
    };
    let timeout = Duration::from_secs(node.config().mqtt.connect_timeout_s);
    let connect = match tokio::time::timeout(timeout, io.read_connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection closed before CONNECT completed");
            node.metrics()
                .connect_rejected
                .with_label_values(&["invalid"])
                .inc();
            let _ = io.flush().await;
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT within {timeout:?}");
            node.metrics()
                .connect_rejected
                .with_label_values(&["timeout"])
                .inc();
            return;
        }
    };
    // Rare, deep paths (CONNECT with its Kafka claim, the close, SUBSCRIBE
    // starting Kafka readers) are boxed: inline they set the size of every
    // connection's task for its whole life.
    let accept = Box::pin(Conn::accept(io, *connect, peer, transport, cert_identity));
    if let Some(conn) = accept.await {
        conn.run().await;
    }
}

/// Read buffer between packets: one read takes CONNECT, acks, PINGREQ or a
/// typical PUBLISH (a few hundred bytes) whole.
const RBUF_IDLE: usize = 1024;
/// Write buffer capacity kept once everything is written.
const WBUF_KEEP: usize = 4096;

/// Socket halves, buffers and codec.
struct Io<S> {
    rd: ReadHalf<S>,
    wr: WriteHalf<S>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    decoder: Decoder,
    node: Arc<Node>,
}

impl<S: AsyncRead + AsyncWrite> Io<S> {
    fn version(&self) -> ProtocolVersion {
        self.decoder.version().unwrap_or(ProtocolVersion::V311)
    }

    fn send(&mut self, p: &Packet) {
        let v = self.version();
        let before = self.wbuf.len();
        match encode(p, v, &mut self.wbuf) {
            Ok(()) => {
                self.node
                    .metrics()
                    .packets_out
                    .with_label_values(&[p.kind()])
                    .inc();
                self.node
                    .metrics()
                    .bytes_out
                    .inc_by((self.wbuf.len() - before) as u64);
            }
            // Our own packets are built to be valid; an error here is a bug,
            // logged rather than sent malformed.
            Err(e) => tracing::error!(packet = p.kind(), error = %e, "could not encode packet"),
        }
    }

    /// Refuses the CONNECT with `reason` (counted under `label`).
    async fn refuse(&mut self, reason: ReasonCode, label: &str) {
        self.node
            .metrics()
            .connect_rejected
            .with_label_values(&[label])
            .inc();
        self.send(&connack(false, reason));
        let _ = self.flush().await;
    }

    async fn flush(&mut self) -> Result<(), String> {
        if self.wbuf.is_empty() {
            // Written out: a buffer grown by a burst of deliveries is freed
            // rather than kept for the life of the connection.
            if self.wbuf.capacity() > WBUF_KEEP {
                self.wbuf = BytesMut::new();
            }
            return Ok(());
        }
        let t = Duration::from_secs(self.node.config().mqtt.write_timeout_s);
        match tokio::time::timeout(t, async {
            self.wr.write_all_buf(&mut self.wbuf).await?;
            self.wr.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("write blocked for {t:?}")),
        }
    }

    /// Reads more bytes; `Ok(false)` on end of stream.
    async fn fill(&mut self) -> Result<bool, String> {
        let spare = self.rbuf.capacity() - self.rbuf.len();
        if self.rbuf.is_empty() {
            // Between packets the buffer goes back to `RBUF_IDLE`: a large
            // packet (or the tail left after a PUBLISH was split off, which
            // shares its allocation with the payload on its way to Kafka)
            // must not stay allocated for the rest of the connection.
            if !(RBUF_IDLE / 2..=RBUF_IDLE).contains(&spare) {
                self.rbuf = BytesMut::with_capacity(RBUF_IDLE);
            }
        } else if spare < 512 {
            self.rbuf.reserve(4096);
        }
        match self.rd.read_buf(&mut self.rbuf).await {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.node.metrics().bytes_in.inc_by(n as u64);
                Ok(true)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Reads the first packet, which must be CONNECT [MQTT-3.1.0-1]. On a
    /// bad CONNECT, queues the CONNACK refusal the client's version allows.
    async fn read_connect(&mut self) -> Result<Box<Connect>, String> {
        loop {
            match self.decoder.decode(&mut self.rbuf) {
                Ok(Some(Packet::Connect(c))) => {
                    self.node
                        .metrics()
                        .packets_in
                        .with_label_values(&["connect"])
                        .inc();
                    return Ok(c);
                }
                Ok(Some(p)) => return Err(format!("first packet is {}, not CONNECT", p.kind())),
                Ok(None) => {
                    if !self.fill().await? {
                        return Err("closed".into());
                    }
                }
                Err(e) => {
                    let reason = e.reason_code();
                    match self.decoder.version() {
                        // [MQTT-3.1.2-2] unknown level: see `refusal_version`.
                        None if reason == ReasonCode::UnsupportedProtocolVersion => {
                            self.decoder.set_version(refusal_version(&e));
                            self.send(&connack(false, reason));
                        }
                        Some(ProtocolVersion::V5) => {
                            let r = if reason_allowed_in("connack", reason) {
                                reason
                            } else {
                                ReasonCode::UnspecifiedError
                            };
                            self.send(&connack(false, r));
                        }
                        // [MQTT-3.1.3-9] (3.1.1) identifier rejected.
                        Some(_) if reason == ReasonCode::ClientIdentifierNotValid => {
                            self.send(&connack(false, reason));
                        }
                        _ => {}
                    }
                    return Err(e.to_string());
                }
            }
        }
    }
}

/// The CONNACK format for a CONNECT whose protocol level we do not speak
/// [MQTT-3.1.2-2]: a level above 5 is a client newer than MQTT 5, which
/// understands the MQTT 5 CONNACK (0x84 Unsupported Protocol Version, as the
/// MQTT 5 spec's non-normative comment suggests); any other unknown level (or
/// name) gets the 3.1.1 CONNACK with return code 1, which every MQTT version
/// can read. docs/conformance.md ("Choices") says why.
fn refusal_version(e: &DecodeError) -> ProtocolVersion {
    match e {
        DecodeError::UnsupportedProtocolVersion(level) if *level > 5 => ProtocolVersion::V5,
        _ => ProtocolVersion::V311,
    }
}

fn connack(session_present: bool, reason: ReasonCode) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present,
        reason,
        properties: Properties::default(),
    })
}

fn ack_with(packet_id: u16, reason: ReasonCode, why: Option<String>) -> Ack {
    Ack {
        packet_id,
        reason,
        properties: Properties {
            reason_string: why,
            ..Properties::default()
        },
    }
}

/// A CONNECT that passed the checks before its session is claimed.
struct Admitted {
    identity: Identity,
    client_id: Arc<str>,
    /// The server chose the client id.
    assigned: bool,
    expiry_s: u32,
}

/// What `Conn::new` takes over from the CONNECT handshake.
struct Opening {
    identity: Identity,
    peer: SocketAddr,
    conn_id: u64,
    session: Box<Session>,
    ctrl: mpsc::Receiver<Control>,
    present: bool,
    /// Keep alive in force (the server's when it overrode the client's).
    keep_alive: u16,
    will_delay: u32,
    /// When a QoS 2 retransmission scan may decide (see `session::lifecycle`).
    scan_settled_ms: Option<i64>,
}

/// A resumed session may be used by a different identity than the one that
/// subscribed: keep only what this identity may subscribe to.
fn drop_unauthorized_subscriptions(
    node: &Node,
    identity: &Identity,
    session: &mut Session,
    from_record: bool,
) {
    let acl = node.acl();
    let denied: Vec<String> = session
        .subscriptions
        .keys()
        .filter(|f| !acl.check(identity, Action::Subscribe, f))
        .cloned()
        .collect();
    for f in denied {
        tracing::info!(client_id = %session.client_id, filter = %f, "resumed subscription not authorized for this identity; dropped");
        session.subscriptions.remove(&f);
        if !from_record {
            let (key, inner) = sub_key(&session.client_id, &f);
            node.unindex_subscription(inner, &key);
        }
    }
}

/// CONNACK properties for a v5 client (none for 3.1.1) and the keep alive
/// in force; `assigned` is the client id the server chose, if it did.
fn connack_properties(
    c: &Connect,
    limits: &crate::config::MqttLimits,
    assigned: Option<&str>,
    expiry_s: u32,
) -> (Properties, u16) {
    let mut keep_alive = c.keep_alive;
    let mut props = Properties::default();
    if !c.protocol.is_v5() {
        return (props, keep_alive);
    }
    if limits.max_keep_alive_s > 0 && (keep_alive == 0 || keep_alive > limits.max_keep_alive_s) {
        keep_alive = limits.max_keep_alive_s;
        props.server_keep_alive = Some(keep_alive);
    }
    props.assigned_client_identifier = assigned.map(str::to_string);
    if c.properties.session_expiry_interval.unwrap_or(0) != expiry_s {
        props.session_expiry_interval = Some(expiry_s);
    }
    props.receive_maximum = Some(limits.receive_maximum);
    props.maximum_packet_size = Some(limits.max_packet_size);
    props.topic_alias_maximum = Some(limits.topic_alias_maximum);
    props.retain_available = Some(1);
    props.wildcard_subscription_available = Some(1);
    props.subscription_identifier_available = Some(1);
    props.shared_subscription_available = Some(1);
    (props, keep_alive)
}

struct Conn<S> {
    io: Io<S>,
    identity: Identity,
    node: Arc<Node>,
    peer: SocketAddr,
    conn_id: u64,
    version: ProtocolVersion,
    session: Box<Session>,
    ctrl: mpsc::Receiver<Control>,
    keep_alive: Option<Duration>,
    last_recv: Instant,
    acks: FuturesOrdered<AckFuture>,
    /// QoS 2 ids whose Kafka write is still in progress.
    pending_qos2: HashSet<u16>,
    /// Retransmitted QoS 2 ids the restored state does not know that may
    /// still be checked against Kafka (`kafka/qos2_scan.rs`): a resumed
    /// session's client resends at most Receive Maximum of them.
    scans_left: usize,
    /// Until when the previous owner's last writes may still land in Kafka
    /// (ms): no QoS 2 scan decides before (`qos2_scan::settled_at_ms`).
    scan_settled_ms: Option<i64>,
    /// Packets that may go out only after the session state that promises
    /// them is in Kafka (QoS 2 exactly-once across a node crash), and
    /// anything emitted after them, in order.
    held: Vec<Packet>,
    held_needs_sync: bool,
    /// A session write is wanted (periodic progress, subscriptions).
    sync_wanted: bool,
    syncing: Option<Syncing>,
    /// Inbound topic aliases [MQTT-3.3.2-7]: per connection.
    aliases_in: HashMap<u16, String>,
    aliases_out: HashMap<String, u16>,
    client_alias_max: u16,
    client_receive_max: usize,
    client_max_packet: usize,
    /// Deliveries taken from the mailbox (or retained) waiting for window.
    backlog: VecDeque<Delivery>,
    will_delay: u32,
    /// Deliveries of a resumed session's catch-up read; drained before the
    /// mailbox, which fan-out only fills once the catch-up has finished.
    catchup: Option<mpsc::Receiver<Delivery>>,
    catchup_removed: Arc<std::sync::Mutex<Vec<String>>>,
    /// Session state changed since it was last written to Kafka.
    dirty: bool,
    /// Deliveries acknowledged by the client since the last session write.
    acked_since_sync: usize,
    /// Deliveries no landed session write covers, and their bound
    /// (`mqtt.max_unsaved_deliveries`, 0 = none).
    unsaved: usize,
    unsaved_max: usize,
    /// Unacknowledged deliveries in the last landed write: a node taking
    /// the session over resends them, so they count against the bound.
    landed_outbound: usize,
    /// `mqtt.max_publish_rate`, and until when reading is paused by it.
    bucket: Option<TokenBucket>,
    throttled_until: Option<Instant>,
    /// A token was taken for the PUBLISH at the head of the read buffer.
    prepaid: bool,
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    /// The checks before a session is touched: enhanced authentication,
    /// the connection limit, the client id and session expiry, the login and
    /// the will's topic. `None`: refused (CONNACK sent).
    async fn admit(
        io: &mut Io<S>,
        c: &Connect,
        peer: SocketAddr,
        transport: Transport,
        cert_identity: Option<String>,
    ) -> Option<Admitted> {
        let node = io.node.clone();
        let limits = &node.config().mqtt;
        let v5 = c.protocol.is_v5();
        if v5 && c.properties.authentication_method.is_some() {
            // Enhanced authentication is not offered [MQTT-4.12.0-1].
            io.refuse(ReasonCode::BadAuthenticationMethod, "auth_method")
                .await;
            return None;
        }
        if node.over_connection_limit() {
            io.refuse(ReasonCode::ServerBusy, "max_connections").await;
            return None;
        }
        let assigned = c.client_id.is_empty();
        let client_id: Arc<str> = if assigned {
            Arc::from(format!("auto-{}", uuid::Uuid::new_v4().simple()))
        } else {
            Arc::from(c.client_id.as_str())
        };
        let expiry_s = if v5 {
            c.properties
                .session_expiry_interval
                .unwrap_or(0)
                .min(limits.max_session_expiry_s)
        } else if c.clean_start {
            0
        } else {
            limits.max_session_expiry_s
        };
        // Authenticate before touching the registry: a failed login must not
        // take over an existing session.
        let identity = match node
            .authenticate(
                &client_id,
                c.username.as_deref(),
                c.password.as_deref(),
                cert_identity.as_deref(),
                peer.ip(),
            )
            .await
        {
            Ok(id) => id,
            Err(reason) => {
                node.metrics().auth_failures.inc();
                tracing::info!(%peer, client_id = %client_id, ?transport, ?reason, "authentication failed");
                io.refuse(reason, "auth").await;
                return None;
            }
        };
        if let Some(w) = &c.will {
            if !node.acl().check(&identity, Action::Publish, &w.topic) {
                io.refuse(ReasonCode::NotAuthorized, "will_not_authorized")
                    .await;
                return None;
            }
        }
        Some(Admitted {
            identity,
            client_id,
            assigned,
            expiry_s,
        })
    }

    /// Validates CONNECT, claims the session and sends CONNACK.
    async fn accept(
        mut io: Io<S>,
        c: Connect,
        peer: SocketAddr,
        transport: Transport,
        cert_identity: Option<String>,
    ) -> Option<Conn<S>> {
        let node = io.node.clone();
        let limits = &node.config().mqtt;
        let Admitted {
            identity,
            client_id,
            assigned,
            expiry_s,
        } = Self::admit(&mut io, &c, peer, transport, cert_identity).await?;
        let conn_id = node.next_conn_id();
        let Claimed {
            mut session,
            present,
            from_record,
            ctrl,
            scan_settled_ms,
        } = match crate::session::lifecycle::claim(&node, &client_id, conn_id, c.clean_start).await
        {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(%peer, client_id = %client_id, error = %e, "CONNECT refused");
                let (reason, label) = e.reason();
                io.refuse(reason, label).await;
                return None;
            }
        };
        if present {
            drop_unauthorized_subscriptions(&node, &identity, &mut session, from_record);
        }
        node.count_sessions();
        if session.mailbox.flags.overflowed.load(Ordering::Relaxed) {
            // Left set: the event loop closes this connection with 0x97, as
            // for any overflow of the session queue.
            tracing::warn!(client_id = %client_id, "session queue overflowed before this connection: QoS 1/2 messages were dropped");
        }
        session.expiry_s = expiry_s;
        session.will = c.will.clone();
        let will_delay = c
            .will
            .as_ref()
            .and_then(|w| w.properties.will_delay_interval)
            .unwrap_or(0);
        let (props, keep_alive) =
            connack_properties(&c, limits, assigned.then_some(&*client_id), expiry_s);
        // The claim in the sessions topic is the fencing point: only after
        // Kafka holds it does the client get CONNACK.
        if let Err(e) = crate::session::lifecycle::record_claim(&node, &session).await {
            tracing::warn!(client_id = %client_id, error = %e, "cannot record session in Kafka; refusing CONNECT");
            node.metrics()
                .connect_rejected
                .with_label_values(&["kafka"])
                .inc();
            io.send(&connack(false, ReasonCode::ServerUnavailable));
            let _ = io.flush().await;
            crate::session::lifecycle::unclaim(&node, &client_id, conn_id);
            return None;
        }
        io.send(&Packet::ConnAck(ConnAck {
            session_present: present,
            reason: ReasonCode::Success,
            properties: props,
        }));
        tracing::debug!(%peer, client_id = %client_id, version = ?c.protocol, present, "client connected");
        let mut conn = Conn::new(
            io,
            &c,
            Opening {
                identity,
                peer,
                conn_id,
                session,
                ctrl,
                present,
                keep_alive,
                will_delay,
                scan_settled_ms,
            },
        );
        // [MQTT-4.4.0-1] resend unacknowledged PUBLISH (DUP) and PUBREL in order.
        for (id, flow) in conn.session.outbound.resend() {
            match flow {
                OutFlow::Published(p) => conn.io.send(&Packet::Publish(*p)),
                OutFlow::Released => conn.io.send(&Packet::PubRel(Ack::new(id))),
            }
        }
        if from_record {
            conn.start_catch_up().await;
        }
        Some(conn)
    }

    /// The connection's state once CONNACK is queued.
    fn new(io: Io<S>, c: &Connect, o: Opening) -> Conn<S> {
        let node = io.node.clone();
        let limits = &node.config().mqtt;
        let v5 = c.protocol.is_v5();
        let client_receive_max = if v5 {
            c.properties
                .receive_maximum
                .unwrap_or(u16::MAX)
                .min(limits.max_inflight_out)
        } else {
            limits.max_inflight_out
        } as usize;
        Conn {
            identity: o.identity,
            node: node.clone(),
            peer: o.peer,
            conn_id: o.conn_id,
            version: c.protocol,
            session: o.session,
            ctrl: o.ctrl,
            keep_alive: (o.keep_alive > 0)
                .then(|| Duration::from_millis(o.keep_alive as u64 * 1500)),
            last_recv: Instant::now(),
            acks: FuturesOrdered::new(),
            pending_qos2: HashSet::new(),
            scans_left: if o.present {
                limits.receive_maximum as usize
            } else {
                0
            },
            scan_settled_ms: o.scan_settled_ms,
            held: Vec::new(),
            held_needs_sync: false,
            sync_wanted: false,
            syncing: None,
            aliases_in: HashMap::new(),
            aliases_out: HashMap::new(),
            client_alias_max: if v5 {
                c.properties.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            },
            client_receive_max,
            client_max_packet: c
                .properties
                .maximum_packet_size
                .map(|m| m as usize)
                .unwrap_or(usize::MAX),
            backlog: VecDeque::new(),
            catchup: None,
            catchup_removed: Arc::new(std::sync::Mutex::new(Vec::new())),
            dirty: false,
            acked_since_sync: 0,
            unsaved: 0,
            unsaved_max: limits.max_unsaved_deliveries,
            landed_outbound: 0,
            bucket: (limits.max_publish_rate > 0).then(|| {
                TokenBucket::new(
                    limits.max_publish_rate,
                    limits.max_publish_rate,
                    Instant::now(),
                )
            }),
            throttled_until: None,
            prepaid: false,
            will_delay: o.will_delay,
            io,
        }
    }

    fn v5(&self) -> bool {
        self.version.is_v5()
    }

    fn record(&self, online: bool) -> SessionRecord {
        SessionRecord::from_session(
            &self.session,
            &self.node.config().node_id,
            self.session.epoch,
            online,
            now_ms(),
        )
    }

    /// Asks for the session to be written to Kafka (when persistent). All
    /// writes of a connected session go through `start_sync`, one at a time,
    /// so an older snapshot can never land after a newer one.
    fn persist_soon(&mut self) {
        self.sync_wanted = self.session.expiry_s > 0;
        self.dirty = false;
    }

    /// Sends `p`, or holds it until the session state is in Kafka when
    /// `needs_sync` (a QoS 2 step that must survive a crash of this node) or
    /// when earlier packets are held (order [MQTT-4.6.0]).
    fn emit(&mut self, p: Packet, needs_sync: bool) {
        let needs_sync = needs_sync && self.session.expiry_s > 0;
        let waiting =
            !self.held.is_empty() || self.syncing.as_ref().is_some_and(|s| !s.packets.is_empty());
        if !needs_sync && !waiting {
            self.io.send(&p);
            return;
        }
        self.held.push(p);
        self.held_needs_sync |= needs_sync;
    }

    fn held_len(&self) -> usize {
        self.held.len() + self.syncing.as_ref().map_or(0, |s| s.packets.len())
    }

    /// Starts the next session write if one is needed and none is running;
    /// releases held packets that need none.
    fn start_sync(&mut self) {
        if self.syncing.is_some() {
            return;
        }
        let exposed = self.unsaved + self.landed_outbound;
        if self.acked_since_sync >= PERSIST_AFTER_ACKS
            || (self.unsaved_max > 0
                && exposed >= self.unsaved_max.div_ceil(2)
                && (self.acked_since_sync > 0 || self.unsaved > 0))
        {
            self.sync_wanted |= self.session.expiry_s > 0;
        }
        if !self.held_needs_sync && !self.sync_wanted {
            for p in std::mem::take(&mut self.held) {
                self.io.send(&p);
            }
            return;
        }
        let rec = self.record(true);
        let node = self.node.clone();
        let write = Box::pin(async move {
            // Kafka is the truth: until the state is written, the packets
            // that depend on it wait (the client sees a slow broker).
            let mut wait = Duration::from_millis(500);
            while let Err(e) = node.persist(rec.clone()).await {
                tracing::warn!(client_id = %rec.client_id, error = %e, "session write failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        });
        self.syncing = Some(Syncing {
            write,
            packets: std::mem::take(&mut self.held),
            covers: self.unsaved,
            outbound: self.session.outbound.len(),
        });
        self.held_needs_sync = false;
        self.sync_wanted = false;
        self.dirty = false;
        self.acked_since_sync = 0;
    }

    fn on_synced(&mut self) {
        if let Some(s) = self.syncing.take() {
            self.unsaved = self.unsaved.saturating_sub(s.covers);
            self.landed_outbound = s.outbound;
            for p in s.packets {
                self.io.send(&p);
            }
        }
    }

    /// Re-reads what a resumed session missed from Kafka, from its stored
    /// offsets, then hands it to fan-out (see `kafka/catchup.rs`).
    async fn start_catch_up(&mut self) {
        let node = self.node.clone();
        let entries = index_entries(&self.session);
        let mut plain = Vec::new();
        for (inner, key, entry) in &entries {
            if let Err(e) = node.ensure_readers(inner).await {
                tracing::warn!(filter = %inner, error = %e, "cannot read Kafka for resumed subscription");
            }
            if key.share_group.is_none() {
                plain.push((inner.clone(), entry.options.clone(), entry.identifier));
            }
        }
        let job = crate::kafka::catchup::CatchUp {
            client_id: self.session.client_id.clone(),
            from: self.session.offsets.clone(),
            subscriptions: plain,
            entries: entries.clone(),
            removed: self.catchup_removed.clone(),
        };
        let (tx, rx) = mpsc::channel(node.config().mqtt.session_queue.max(1));
        self.catchup = Some(rx);
        tokio::spawn(async move {
            let started = Instant::now();
            match node.catch_up(job, tx).await {
                Ok(_) => tracing::debug!(elapsed = ?started.elapsed(), "session caught up"),
                Err(e) => {
                    // Without a catch-up the session still gets live messages.
                    tracing::warn!(error = %e, "catch-up failed; subscribing live only");
                    for (f, k, e) in entries {
                        let _ = node.index_subscription(&f, k, e);
                    }
                }
            }
        });
    }

    fn window_open(&self) -> bool {
        self.session.outbound.len() < self.client_receive_max && self.unsaved_ok()
    }

    /// Under `mqtt.max_unsaved_deliveries` (or it does not apply).
    fn unsaved_ok(&self) -> bool {
        self.unsaved_max == 0
            || self.session.expiry_s == 0
            || self.unsaved + self.landed_outbound < self.unsaved_max
    }

    async fn run(mut self) {
        let mut shutdown = self.node.shutting_down();
        let recv_max = self.node.config().mqtt.receive_maximum as usize;
        let mut persist_tick = tokio::time::interval(PERSIST_EVERY);
        persist_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Packets that arrived together with CONNECT are already buffered.
        let mut early_end = self.on_bytes().await.err();
        let end = loop {
            if let Some(end) = early_end.take() {
                break end;
            }
            if let Err(e) = self.io.flush().await {
                break End::Io(e);
            }
            let ka_deadline = self
                .keep_alive
                .map(|ka| tokio::time::Instant::from_std(self.last_recv + ka));
            let can_deliver =
                self.backlog.is_empty() && self.window_open() && self.held_len() < HELD_MAX;
            let live = can_deliver && self.catchup.is_none();
            let step = tokio::select! {
                biased;
                c = self.ctrl.recv() => match c {
                    Some(Control::TakeOver { clean_start, reply }) => Err(End::TakenOver { clean_start, reply }),
                    Some(Control::Close(r)) => Err(End::Server(r, "server closing".into())),
                    // A claim not newer than ours is a stale record read late.
                    Some(Control::TakenOverRemote { epoch }) if epoch <= self.session.epoch => Ok(()),
                    Some(Control::TakenOverRemote { epoch }) => Err(End::TakenOverRemote(epoch)),
                    None => Ok(()),
                },
                _ = shutdown.changed() => Err(End::Server(ReasonCode::ServerShuttingDown, "server shutting down".into())),
                Some(done) = self.acks.next(), if !self.acks.is_empty() => self.on_kafka_ack(done),
                _ = sync_done(&mut self.syncing), if self.syncing.is_some() => {
                    self.on_synced();
                    Ok(())
                },
                _ = sleep_until(self.throttled_until.map(tokio::time::Instant::from_std)), if self.throttled_until.is_some() => {
                    self.throttled_until = None;
                    // Packets already buffered while paused.
                    self.on_bytes().await
                },
                r = self.io.fill(), if self.acks.len() < recv_max && self.throttled_until.is_none() => match r {
                    Ok(true) => self.on_bytes().await,
                    Ok(false) => Err(End::Io("closed by peer".into())),
                    Err(e) => Err(End::Io(e)),
                },
                d = recv_opt(&mut self.catchup), if can_deliver && self.catchup.is_some() => {
                    match d {
                        Some(d) => self.backlog.push_back(d),
                        None => self.catchup = None,
                    }
                    Ok(())
                },
                d = self.session.inbox.recv(), if live => {
                    if let Some(d) = d {
                        self.backlog.push_back(d);
                    }
                    Ok(())
                },
                _ = persist_tick.tick(), if self.session.expiry_s > 0 => {
                    // Bounds what a node crash can make a session re-read.
                    if self.dirty {
                        self.persist_soon();
                    }
                    Ok(())
                },
                _ = sleep_until(ka_deadline), if ka_deadline.is_some() => {
                    // [MQTT-3.1.2-22/24] 1.5 x keep alive without a packet.
                    Err(End::Server(ReasonCode::KeepAliveTimeout, "keep alive timeout".into()))
                }
            };
            if let Err(end) = step {
                break end;
            }
            self.drain_backlog();
            self.start_sync();
            if self.session.take_overflow() {
                break End::Server(
                    ReasonCode::QuotaExceeded,
                    "session queue full: client is not reading fast enough".into(),
                );
            }
        };
        Box::pin(self.finish(end)).await;
    }

    /// Sends queued deliveries while the outbound window has room; also pulls
    /// whatever is already waiting in the mailbox, to batch writes.
    fn drain_backlog(&mut self) {
        loop {
            if !self.window_open() || self.held_len() >= HELD_MAX {
                return;
            }
            let d = match self.backlog.pop_front() {
                Some(d) => d,
                None if self.catchup.is_some() => return,
                None => match self.session.inbox.try_recv() {
                    Ok(d) => d,
                    Err(_) => return,
                },
            };
            self.deliver(d);
            if self.io.wbuf.len() > 64 * 1024 {
                return;
            }
        }
    }

    /// Sends one message to the client.
    fn deliver(&mut self, d: Delivery) {
        if let Some(src) = &d.source {
            let next = self
                .session
                .offsets
                .entry((src.topic.clone(), src.partition))
                .or_insert(0);
            *next = (*next).max(src.offset + 1);
            self.dirty = true;
            self.unsaved += 1;
        }
        let now = now_ms();
        let msg = &d.msg;
        if msg.is_expired(now) {
            self.node
                .metrics()
                .dropped_messages
                .with_label_values(&["expired"])
                .inc();
            return;
        }
        // A deny rule with `overlap = "filter"` granted an overlapping
        // filter: its topics are withheld here, where live, catch-up and
        // retained deliveries all pass (offsets above still advance).
        if !self.node.acl().may_deliver(&self.identity, &msg.topic) {
            self.node
                .metrics()
                .dropped_messages
                .with_label_values(&["acl_filtered"])
                .inc();
            return;
        }
        let mut properties = if self.v5() {
            Properties {
                message_expiry_interval: msg.remaining_expiry(now),
                subscription_identifiers: d.subscription_ids.clone(),
                ..msg.properties.clone()
            }
        } else {
            Properties::default()
        };
        let packet_id = if d.qos > QoS::AtMostOnce {
            match self.session.outbound.next_packet_id() {
                Some(id) => Some(id),
                None => {
                    self.backlog.push_front(d);
                    return;
                }
            }
        } else {
            None
        };
        let full = Publish {
            dup: false,
            qos: d.qos,
            retain: d.retain,
            topic: msg.topic.clone(),
            packet_id,
            payload: msg.payload.clone(),
            properties: properties.clone(),
        };
        // Checked before the flow starts, so a discarded message never holds a packet id.
        let dropped = match lodestream_mqtt::encoded_len(
            &Packet::Publish(full.clone()),
            self.version,
        ) {
            // [MQTT-3.1.2-25] never send more than the client accepts: discard.
            Ok(size) if size > self.client_max_packet => Some("too_large_for_client"),
            Ok(_) => None,
            // Readers only pass on records that make a valid PUBLISH
            // (`Message::try_from_record`); this is the last guard.
            Err(e) => {
                tracing::error!(topic = %msg.topic, error = %e, "delivery cannot be encoded; discarded");
                Some("unencodable")
            }
        };
        if let Some(reason) = dropped {
            self.node
                .metrics()
                .dropped_messages
                .with_label_values(&[reason])
                .inc();
            return;
        }
        let mut wire = full.clone();
        if self.client_alias_max > 0 {
            if let Some(a) = self.aliases_out.get(&msg.topic) {
                properties.topic_alias = Some(*a);
                wire.topic = String::new();
            } else if self.aliases_out.len() < self.client_alias_max as usize {
                let a = self.aliases_out.len() as u16 + 1;
                self.aliases_out.insert(msg.topic.clone(), a);
                properties.topic_alias = Some(a);
            }
            wire.properties = properties;
        }
        if let Some(id) = packet_id {
            // Stored without alias: aliases do not survive a reconnect.
            self.session.outbound.start(id, full);
        }
        // [MQTT-4.3.3] exactly once to a QoS 2 subscriber: the flow (and the
        // offsets past it) must be in Kafka before the client can see it, so
        // a node that takes the session over resends it with the same id.
        self.emit(Packet::Publish(wire), d.qos == QoS::ExactlyOnce);
        self.node.metrics().delivered.inc();
    }

    /// Decodes and handles every complete packet in the read buffer.
    async fn on_bytes(&mut self) -> Result<(), End> {
        loop {
            if self.throttled_until.is_some() {
                return Ok(());
            }
            // The rate limit is checked before a PUBLISH is decoded (its type
            // is the first byte's high nibble), so an over-rate PUBLISH stays
            // in the buffer until a token is free.
            const PUBLISH: u8 = 3;
            if let (Some(b), Some(first), false) =
                (&mut self.bucket, self.io.rbuf.first(), self.prepaid)
            {
                if first >> 4 == PUBLISH {
                    // Paid once even if the packet is still incomplete.
                    self.prepaid = true;
                    if let Err(wait) = b.take(Instant::now()) {
                        self.prepaid = false;
                        self.throttled_until = Some(Instant::now() + wait);
                        self.node.metrics().publish_throttled.inc();
                        return Ok(());
                    }
                }
            }
            let p = match self.io.decoder.decode(&mut self.io.rbuf) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(e) => {
                    let r = e.reason_code();
                    let r = if reason_allowed_in("disconnect", r) {
                        r
                    } else {
                        ReasonCode::ProtocolError
                    };
                    return Err(End::Server(r, e.to_string()));
                }
            };
            self.prepaid = false;
            self.node
                .metrics()
                .packets_in
                .with_label_values(&[p.kind()])
                .inc();
            // Keep alive counts complete packets, not bytes: a client
            // trickling a never-ending packet is not alive [MQTT-3.1.2-22].
            self.last_recv = Instant::now();
            self.on_packet(p).await?;
        }
    }

    async fn on_packet(&mut self, p: Packet) -> Result<(), End> {
        match p {
            Packet::Publish(p) => self.on_publish(p).await,
            Packet::PubAck(a) => {
                if self.session.outbound.puback(a.packet_id) {
                    self.acked_since_sync += 1;
                } else {
                    tracing::debug!(client_id = %self.session.client_id, id = a.packet_id, "PUBACK for unknown packet id");
                }
                Ok(())
            }
            Packet::PubRec(a) => {
                match self
                    .session
                    .outbound
                    .pubrec(a.packet_id, a.reason.is_error())
                {
                    // Stored before PUBREL: a new owner must resend PUBREL,
                    // not the PUBLISH the client has already released.
                    Some(true) => self.emit(Packet::PubRel(Ack::new(a.packet_id)), true),
                    Some(false) => {}
                    None if self.v5() => self.emit(
                        Packet::PubRel(ack_with(
                            a.packet_id,
                            ReasonCode::PacketIdentifierNotFound,
                            None,
                        )),
                        false,
                    ),
                    None => self.emit(Packet::PubRel(Ack::new(a.packet_id)), false),
                }
                Ok(())
            }
            Packet::PubComp(a) => {
                if self.session.outbound.pubcomp(a.packet_id) {
                    self.acked_since_sync += 1;
                }
                Ok(())
            }
            Packet::PubRel(a) => {
                let id = a.packet_id;
                if self.session.inbound_qos2.release(id) {
                    // The completed flow is stored before PUBCOMP frees the id
                    // for reuse: see `inbound_qos2.rs`.
                    self.dirty = true;
                    self.emit(Packet::PubComp(Ack::new(id)), true);
                } else if self.pending_qos2.contains(&id) {
                    // PUBREL before our PUBREC: the PUBCOMP follows the Kafka ack.
                    return Err(End::Server(
                        ReasonCode::ProtocolError,
                        "PUBREL before PUBREC".into(),
                    ));
                } else if self.v5() {
                    self.emit(
                        Packet::PubComp(ack_with(id, ReasonCode::PacketIdentifierNotFound, None)),
                        false,
                    );
                } else {
                    // [MQTT-4.3.3-11] (3.1.1) answer PUBCOMP even if already completed.
                    self.emit(Packet::PubComp(Ack::new(id)), false);
                }
                Ok(())
            }
            Packet::Subscribe(s) => Box::pin(self.on_subscribe(s)).await,
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(u);
                Ok(())
            }
            Packet::PingReq => {
                self.io.send(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => {
                if let Some(e) = d.properties.session_expiry_interval {
                    // [MQTT-3.14.2-2] 0 at CONNECT cannot become non-zero.
                    if self.session.expiry_s == 0 && e != 0 {
                        return Err(End::Server(
                            ReasonCode::ProtocolError,
                            "session expiry set on DISCONNECT after 0 at CONNECT".into(),
                        ));
                    }
                    self.session.expiry_s = e.min(self.node.config().mqtt.max_session_expiry_s);
                }
                Err(End::Client {
                    keep_will: d.reason == ReasonCode::DisconnectWithWillMessage,
                })
            }
            Packet::Auth(_) => Err(End::Server(
                ReasonCode::ProtocolError,
                "AUTH without enhanced authentication".into(),
            )),
            other => Err(End::Server(
                ReasonCode::ProtocolError,
                format!("a client may not send {}", other.kind()),
            )),
        }
    }

    async fn on_publish(&mut self, mut p: Publish) -> Result<(), End> {
        self.resolve_topic(&mut p)?;
        if !self.authorize_publish(&p) {
            return Ok(());
        }
        let v5 = self.v5();
        if p.qos > QoS::AtMostOnce {
            let in_flight = self.acks.len() + self.session.inbound_qos2.received_len();
            if v5 && in_flight >= self.node.config().mqtt.receive_maximum as usize {
                return Err(End::Server(
                    ReasonCode::ReceiveMaximumExceeded,
                    "more unacknowledged QoS 1/2 PUBLISHes than Receive Maximum".into(),
                ));
            }
        }
        let flow = if p.qos == QoS::ExactlyOnce {
            match self.qos2_first_transmission(&p).await? {
                Some(flow) => Some(flow),
                None => return Ok(()),
            }
        } else {
            None
        };
        self.write_to_kafka(p, flow).await;
        Ok(())
    }

    /// Topic alias resolution [MQTT-3.3.2-7..10] and topic checks.
    fn resolve_topic(&mut self, p: &mut Publish) -> Result<(), End> {
        if !p.properties.subscription_identifiers.is_empty() {
            // [MQTT-3.3.4-6]
            return Err(End::Server(
                ReasonCode::ProtocolError,
                "PUBLISH from a client carries a subscription identifier".into(),
            ));
        }
        if let Some(alias) = p.properties.topic_alias {
            if alias == 0 || alias > self.node.config().mqtt.topic_alias_maximum {
                // [MQTT-3.3.2-9/10]
                return Err(End::Server(
                    ReasonCode::TopicAliasInvalid,
                    format!("topic alias {alias}"),
                ));
            }
            if p.topic.is_empty() {
                match self.aliases_in.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        return Err(End::Server(
                            ReasonCode::ProtocolError,
                            format!("unknown topic alias {alias}"),
                        ))
                    }
                }
            } else {
                self.aliases_in.insert(alias, p.topic.clone());
            }
        } else if p.topic.is_empty() {
            return Err(End::Server(
                ReasonCode::TopicNameInvalid,
                "empty topic".into(),
            ));
        }
        if p.topic.split('/').count() > self.node.config().mqtt.max_topic_levels {
            return Err(End::Server(
                ReasonCode::TopicNameInvalid,
                format!(
                    "more than {} topic levels",
                    self.node.config().mqtt.max_topic_levels
                ),
            ));
        }
        Ok(())
    }

    /// Authorization: false when the PUBLISH is refused (acknowledged as
    /// the protocol version allows, never written to Kafka).
    fn authorize_publish(&mut self, p: &Publish) -> bool {
        let v5 = self.v5();
        let packet_id = p.packet_id.unwrap_or(0);
        if !self
            .node
            .acl()
            .check(&self.identity, Action::Publish, &p.topic)
        {
            // Never written to Kafka. MQTT 5 says why; 3.1.1 cannot, so the
            // client gets the normal acknowledgement [MQTT-3.3.5-2].
            self.node
                .metrics()
                .dropped_messages
                .with_label_values(&["not_authorized"])
                .inc();
            let reason = if v5 {
                ReasonCode::NotAuthorized
            } else {
                ReasonCode::Success
            };
            match p.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => {
                    self.emit(Packet::PubAck(ack_with(packet_id, reason, None)), false)
                }
                QoS::ExactlyOnce => {
                    if !v5 {
                        // Completes with PUBREL/PUBCOMP like any QoS 2 flow.
                        self.session.inbound_qos2.received_unwritten(packet_id);
                    }
                    self.emit(Packet::PubRec(ack_with(packet_id, reason, None)), false);
                }
            }
            return false;
        }
        true
    }

    /// QoS 2 de-duplication: the flow to write for a first transmission;
    /// `None` for a retransmission, acknowledged without a second write.
    async fn qos2_first_transmission(&mut self, p: &Publish) -> Result<Option<Qos2Flow>, End> {
        let packet_id = p.packet_id.unwrap_or(0);
        // [MQTT-4.3.3-9/10] a known id is a retransmission: never written twice.
        if self.pending_qos2.contains(&packet_id) {
            return Ok(None);
        }
        if self.session.inbound_qos2.is_received(packet_id) {
            self.emit(Packet::PubRec(Ack::new(packet_id)), false);
            return Ok(None);
        }
        if p.dup && self.scans_left > 0 && self.session.expiry_s > 0 {
            self.scans_left -= 1;
            if let Some(seq) = Box::pin(self.written_before(&p.topic, packet_id)).await? {
                self.session.inbound_qos2.found_written(packet_id, seq);
                self.node.metrics().qos2_duplicates_suppressed.inc();
                let msg = Arc::new(Message {
                    properties: Properties::default(),
                    topic: p.topic.clone(),
                    payload: p.payload.clone(),
                    qos: p.qos,
                    retain: false,
                    publisher: None,
                    timestamp_ms: now_ms(),
                });
                // Queued behind earlier acknowledgements [MQTT-4.6.0-2].
                self.acks.push_back(Box::pin(std::future::ready(AckDone {
                    packet_id,
                    qos: QoS::ExactlyOnce,
                    result: Ok(()),
                    msg,
                    started: Instant::now(),
                    duplicate: true,
                })));
                return Ok(None);
            }
        }
        let seq = self.session.inbound_qos2.begin(packet_id, p.dup, now_ms());
        self.dirty = true;
        Ok(Some(Qos2Flow { packet_id, seq }))
    }

    /// The Kafka write; QoS 1/2 acknowledgements wait for Kafka in order.
    async fn write_to_kafka(&mut self, p: Publish, flow: Option<Qos2Flow>) {
        let packet_id = p.packet_id.unwrap_or(0);
        let msg = Arc::new(Message {
            properties: Message::forwardable_properties(&p.properties),
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            publisher: Some(self.session.client_id.to_string()),
            timestamp_ms: now_ms(),
        });
        let started = Instant::now();
        let sent = self.node.send(&msg, flow).await;
        let qos = p.qos;
        if qos == QoS::AtMostOnce {
            match sent {
                Ok(futs) => {
                    let node = self.node.clone();
                    // Nobody waits for a QoS 0 write, but its outcome is still counted.
                    tokio::spawn(async move {
                        for f in futs {
                            if Producer::delivered(f).await.is_err() {
                                node.metrics().kafka_produce_errors.inc();
                                return;
                            }
                        }
                        if msg.retain {
                            node.retained().apply(msg);
                        }
                    });
                }
                Err(e) => {
                    self.node.metrics().kafka_produce_errors.inc();
                    tracing::warn!(error = %e, "QoS 0 message not written to Kafka");
                }
            }
            return;
        }
        if qos == QoS::ExactlyOnce {
            self.pending_qos2.insert(packet_id);
        }
        self.acks.push_back(Box::pin(async move {
            let result = match sent {
                Ok(futs) => {
                    let mut r = Ok(());
                    for f in futs {
                        if let Err(e) = Producer::delivered(f).await {
                            r = Err(e);
                            break;
                        }
                    }
                    r
                }
                Err(e) => Err(e),
            };
            AckDone {
                packet_id,
                qos,
                result,
                msg,
                started,
                duplicate: false,
            }
        }));
    }

    /// For a retransmitted QoS 2 PUBLISH of an id the restored session does
    /// not know: the sequence number of its first transmission if the
    /// previous owner wrote it to Kafka without recording that.
    async fn written_before(&mut self, topic: &str, packet_id: u16) -> Result<Option<u64>, End> {
        if let Some(wait) = self
            .scan_settled_ms
            .map(|at| at - now_ms())
            .filter(|w| *w > 0)
        {
            tracing::debug!(client_id = %self.session.client_id, wait_ms = wait, "QoS 2 scan waits for the previous owner's last writes");
            tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())).await;
        }
        let now = now_ms();
        let bound = self.session.inbound_qos2.bound(now);
        let req = crate::kafka::qos2_scan::ScanRequest {
            topic: self.node.mapping().kafka_topic_for(topic),
            client_id: &self.session.client_id,
            packet_id,
            since_ms: bound.since_ms,
        };
        match crate::kafka::qos2_scan::find_writes(
            &self.node.config().kafka,
            &self.node.config().node_id,
            self.node.metrics(),
            req,
        )
        .await
        {
            Ok(seqs) => Ok(seqs
                .into_iter()
                .filter(|s| {
                    self.session
                        .inbound_qos2
                        .is_unrecorded_write(packet_id, *s, now)
                })
                .max()),
            Err(e) => {
                // Unverifiable: writing could duplicate, acknowledging could
                // lose. The client retransmits after reconnecting.
                tracing::warn!(client_id = %self.session.client_id, error = %e, "cannot check a QoS 2 retransmission against Kafka");
                Err(End::Server(
                    ReasonCode::UnspecifiedError,
                    "cannot check a QoS 2 retransmission against Kafka".into(),
                ))
            }
        }
    }

    /// Kafka answered for a QoS 1/2 PUBLISH: acknowledge it now, in the order
    /// received [MQTT-4.6.0-2] (FuturesOrdered keeps that order).
    fn on_kafka_ack(&mut self, done: AckDone) -> Result<(), End> {
        let id = done.packet_id;
        if done.qos == QoS::ExactlyOnce {
            self.pending_qos2.remove(&id);
        }
        match done.result {
            Ok(()) if done.duplicate => {
                self.emit(Packet::PubRec(Ack::new(id)), false);
                Ok(())
            }
            Ok(()) => {
                self.node
                    .metrics()
                    .publish_to_kafka_seconds
                    .observe(done.started.elapsed().as_secs_f64());
                if done.msg.retain {
                    self.node.retained().apply(done.msg);
                }
                if done.qos == QoS::AtLeastOnce {
                    self.emit(Packet::PubAck(Ack::new(id)), false);
                } else {
                    self.session.inbound_qos2.written(id);
                    self.emit(Packet::PubRec(Ack::new(id)), false);
                }
                Ok(())
            }
            Err(e) => {
                // A failed QoS 2 write stays unconfirmed in `inbound_qos2`:
                // it may still have landed (a delivery timeout is ambiguous).
                self.node.metrics().kafka_produce_errors.inc();
                tracing::warn!(client_id = %self.session.client_id, error = %e, "Kafka write failed; PUBLISH not acknowledged as success");
                if done.qos == QoS::ExactlyOnce && self.session.expiry_s > 0 {
                    // A failed write may still land (a timed-out request can
                    // reach Kafka late). An error PUBREC would end the flow and
                    // a resend would be a new message; closing makes the
                    // client retransmit with DUP after reconnecting, and the
                    // Kafka scan then tells whether the first one landed.
                    return Err(End::Server(
                        ReasonCode::UnspecifiedError,
                        format!("Kafka write failed: {e}"),
                    ));
                }
                if self.v5() {
                    let a = ack_with(
                        id,
                        ReasonCode::UnspecifiedError,
                        Some(format!("Kafka write failed: {e}")),
                    );
                    self.emit(
                        if done.qos == QoS::AtLeastOnce {
                            Packet::PubAck(a)
                        } else {
                            Packet::PubRec(a)
                        },
                        false,
                    );
                    Ok(())
                } else {
                    // 3.1.1 has no negative ack: close so the client retransmits.
                    Err(End::Io(format!("Kafka write failed: {e}")))
                }
            }
        }
    }

    async fn on_subscribe(&mut self, s: Subscribe) -> Result<(), End> {
        let identifier = s.properties.subscription_identifiers.first().copied();
        let limits = &self.node.config().mqtt;
        let mut reasons = Vec::with_capacity(s.filters.len());
        let now = now_ms();
        for (filter, opts) in s.filters {
            // Shared subscriptions are honoured for 3.1.1 clients too (as
            // other brokers do), so `$share/...` means the same in both
            // versions and is stored, matched and removed one way.
            let shared = SharedFilter::parse(&filter);
            if filter.starts_with(lodestream_mqtt::topic::SHARE_PREFIX) && shared.is_none() {
                reasons.push(ReasonCode::TopicFilterInvalid);
                continue;
            }
            let (key, inner) = sub_key(&self.session.client_id, &filter);
            if !self
                .node
                .acl()
                .check(&self.identity, Action::Subscribe, &filter)
            {
                reasons.push(ReasonCode::NotAuthorized);
                continue;
            }
            if inner.split('/').count() > limits.max_topic_levels {
                reasons.push(ReasonCode::TopicFilterInvalid);
                continue;
            }
            let existed = self.session.subscriptions.contains_key(&filter);
            if !existed && self.session.subscriptions.len() >= limits.max_subscriptions_per_client {
                reasons.push(ReasonCode::QuotaExceeded);
                continue;
            }
            if let Err(e) = self.node.ensure_readers(inner).await {
                tracing::warn!(filter = %filter, error = %e, "cannot read Kafka for subscription");
                reasons.push(ReasonCode::UnspecifiedError);
                continue;
            }
            let entry = SubEntry::new(
                opts.clone(),
                identifier,
                inner,
                self.session.mailbox.clone(),
            );
            if let Err(e) = self.node.index_subscription(inner, key, entry) {
                tracing::debug!(filter = %filter, error = %e, "invalid filter");
                reasons.push(ReasonCode::TopicFilterInvalid);
                continue;
            }
            if !existed {
                self.node.metrics().subscriptions.inc();
            }
            // Remember from where this subscription reads, so a resumed
            // session re-reads Kafka from here.
            let topics = self.node.mapping().kafka_topics_for_filter(inner);
            for (k, v) in self.node.fan_out_positions(&topics) {
                self.session.offsets.entry(k).or_insert(v);
            }
            self.session.subscriptions.insert(
                filter.clone(),
                Subscription {
                    options: opts.clone(),
                    identifier,
                },
            );
            reasons.push(match opts.qos {
                QoS::AtMostOnce => ReasonCode::Success,
                QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
            });
            // [MQTT-3.3.1-9..11] retained messages, per Retain Handling; none
            // for shared subscriptions [MQTT-4.8.2-*].
            let send_retained = shared.is_none()
                && match opts.retain_handling {
                    RetainHandling::SendAtSubscribe => true,
                    RetainHandling::SendIfNew => !existed,
                    RetainHandling::DoNotSend => false,
                };
            if send_retained {
                for m in self.node.retained().matching(inner, now) {
                    self.backlog.push_back(Delivery {
                        source: None,
                        qos: m.qos.min(opts.qos),
                        msg: m,
                        retain: true,
                        subscription_ids: identifier.into_iter().collect(),
                    });
                }
            }
        }
        self.persist_soon();
        self.io.send(&Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            reasons,
            properties: Properties::default(),
        }));
        Ok(())
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut reasons = Vec::with_capacity(u.filters.len());
        for filter in u.filters {
            if self.session.subscriptions.remove(&filter).is_some() {
                if self.catchup.is_some() {
                    self.catchup_removed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(filter.clone());
                }
                let (key, inner) = sub_key(&self.session.client_id, &filter);
                self.node.unindex_subscription(inner, &key);
                reasons.push(ReasonCode::Success);
            } else {
                reasons.push(ReasonCode::NoSubscriptionExisted);
            }
        }
        self.persist_soon();
        self.io.send(&Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            reasons: if self.v5() { reasons } else { Vec::new() },
            properties: Properties::default(),
        }));
    }

    /// Undelivered work goes back in front of the session's queue, in order,
    /// for whoever resumes the session (QoS 1/2 in the backlog were never
    /// started). What does not fit is dropped and counted; dropping QoS 1/2
    /// flags the session like a fan-out overflow, so its next connection is
    /// closed with 0x97 instead of silently missing them.
    fn requeue_backlog(&mut self) {
        let backlog = std::mem::take(&mut self.backlog);
        for d in self.session.inbox.requeue_front(backlog) {
            let reason = if d.qos == QoS::AtMostOnce {
                "connection_closed_qos0"
            } else {
                self.session
                    .mailbox
                    .flags
                    .overflowed
                    .store(true, Ordering::Relaxed);
                "connection_closed"
            };
            self.node
                .metrics()
                .dropped_messages
                .with_label_values(&[reason])
                .inc();
        }
    }

    /// Tells the client why it is closed (v5 DISCONNECT), flushes and
    /// closes the socket.
    async fn close_socket(&mut self, end: &End) {
        match end {
            End::Server(r, why) => {
                tracing::debug!(client_id = %self.session.client_id, peer = %self.peer, reason = ?r, why, "closing connection");
                if self.v5() {
                    let r = if reason_allowed_in("disconnect", *r) {
                        *r
                    } else {
                        ReasonCode::UnspecifiedError
                    };
                    self.io.send(&Packet::Disconnect(Disconnect {
                        reason: r,
                        properties: Properties {
                            reason_string: Some(why.clone()),
                            ..Properties::default()
                        },
                    }));
                }
            }
            End::TakenOver { .. } | End::TakenOverRemote(_) if self.v5() => {
                // [MQTT-3.1.4-3]
                self.io.send(&Packet::Disconnect(Disconnect::new(
                    ReasonCode::SessionTakenOver,
                )));
            }
            End::Io(e) => {
                tracing::debug!(client_id = %self.session.client_id, peer = %self.peer, error = %e, "connection lost")
            }
            _ => {}
        }
        // After a write failure or timeout, another flush would only block
        // for the write timeout again.
        if !matches!(end, End::Io(_)) {
            let _ = self.io.flush().await;
        }
        let _ = self.io.wr.shutdown().await;
    }

    /// Lets in-flight Kafka writes settle before the session is handed on.
    async fn settle_acks(&mut self, end: &End) {
        // Let in-flight Kafka writes settle so QoS 2 ids that reached Kafka
        // stay known: a retransmission after reconnect is then not written twice.
        let settle = if matches!(end, End::TakenOver { .. } | End::TakenOverRemote(_)) {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(10)
        };
        let deadline = tokio::time::Instant::now() + settle;
        while !self.acks.is_empty() {
            match tokio::time::timeout_at(deadline, self.acks.next()).await {
                Ok(Some(done)) => {
                    if done.result.is_ok() && done.qos == QoS::ExactlyOnce {
                        self.session.inbound_qos2.written(done.packet_id);
                    }
                    if done.result.is_ok() && !done.duplicate && done.msg.retain {
                        self.node.retained().apply(done.msg);
                    }
                }
                _ => break,
            }
        }
    }

    /// Closes the connection, then releases the session (hand-off, park,
    /// will, tombstone: `session::release`).
    async fn finish(mut self, end: End) {
        let node = self.node.clone();
        node.metrics()
            .disconnects
            .with_label_values(&[end.label()])
            .inc();
        self.close_socket(&end).await;
        self.settle_acks(&end).await;
        self.requeue_backlog();
        let leaving = Leaving {
            session: self.session,
            conn_id: self.conn_id,
            will_delay: self.will_delay,
            catching_up: self.catchup.is_some(),
            ctrl: self.ctrl,
        };
        release(&node, leaving, end.into_session_end()).await;
    }
}

async fn recv_opt(rx: &mut Option<mpsc::Receiver<Delivery>>) -> Option<Delivery> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sync_done(s: &mut Option<Syncing>) {
    match s {
        Some(s) => s.write.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
