//! One MQTT connection, from the first byte to the close: reads CONNECT,
//! claims the session, then runs one event loop over the socket, the
//! session's mailbox, Kafka acknowledgements and control messages.
//!
//! Transport-agnostic: TCP, TLS and WebSocket all arrive as a byte stream.
//!
//! Here: `serve`, `Conn` and its event loop with the packet dispatch. The
//! flows live beside it: `io` (socket, buffers, codec), `accept` (CONNECT to
//! CONNACK), `publish` (client -> Kafka), `subscribe`, `delivery` (Kafka ->
//! client), `sync` (session writes and held packets), `close` (the end,
//! then `session::release`).
//!
//! Bounded behaviour:
//! - read buffer: one packet of at most `max_packet_size` (bigger ones are
//!   refused from their fixed header, reason 0x95);
//! - inbound QoS 1/2 awaiting Kafka: at most `receive_maximum`; the socket is
//!   not read past that (TCP back-pressure) and a v5 client exceeding it is
//!   disconnected with 0x93 [MQTT-3.3.4-9];
//! - inbound QoS 0 awaiting Kafka: at most `receive_maximum` too, then the
//!   socket waits (a publisher cannot queue more than that in the broker);
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
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use lodestream_mqtt::codec::{reason_allowed_in, DecodeError, Decoder};
use lodestream_mqtt::topic::SharedFilter;
use lodestream_mqtt::{
    encode, Ack, ConnAck, Connect, Disconnect, EncodeError, Packet, PerDelivery, Properties,
    ProtocolVersion, Publish, PublishRef, QoS, ReasonCode, RetainHandling, SubAck, Subscribe,
    UnsubAck, Unsubscribe,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use crate::acl::Action;
use crate::auth::Identity;
use crate::kafka::ProduceError;
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

mod accept;
mod acks;
mod close;
mod delivery;
mod io;
mod lagging;
mod publish;
mod replay;
mod shared;
mod subscribe;
mod sync;
mod timer;

use acks::{AckDone, Acks};
use io::*;

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

/// A QoS 0 PUBLISH's Kafka write: the message once written.
type Qos0Done = Result<Arc<Message>, ProduceError>;
type Qos0Future = Pin<Box<dyn Future<Output = Qos0Done> + Send>>;

/// What is left of a packet once it must wait (`Conn::on_slow`).
enum Slow {
    /// A QoS 2 first transmission: its de-duplication may read Kafka.
    Qos2(Publish),
    /// A write the producer has no room for yet.
    Write(publish::PendingWrite),
    Subscribe(Subscribe),
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
    // A future is as large as its largest state, for the connection's whole
    // life: the start (CONNECT, the Kafka claim) and the close are boxed, so
    // an idle connection keeps only the event loop's state.
    // `Conn` itself is boxed too (one pointer in the task, not ~1 KB twice).
    let conn = Box::pin(start(node, stream, peer, transport, cert_identity)).await;
    if let Some(conn) = conn {
        conn.run().await;
    }
}

/// Reads CONNECT and accepts it (`accept.rs`); `None` if the connection
/// ended before it was accepted.
async fn start<S>(
    node: Arc<Node>,
    stream: S,
    peer: SocketAddr,
    transport: Transport,
    cert_identity: Option<String>,
) -> Option<Box<Conn<S>>>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
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
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT within {timeout:?}");
            node.metrics()
                .connect_rejected
                .with_label_values(&["timeout"])
                .inc();
            return None;
        }
    };
    Conn::accept(io, *connect, peer, transport, cert_identity)
        .await
        .map(Box::new)
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

struct Conn<S> {
    io: Io<S>,
    identity: Identity,
    node: Arc<Node>,
    peer: SocketAddr,
    conn_id: u64,
    version: ProtocolVersion,
    session: Box<Session>,
    ctrl: crate::session::mailbox::Receiver<Control>,
    keep_alive: Option<Duration>,
    last_recv: Instant,
    acks: Acks,
    /// The client id for its messages' client-id header, made at the first
    /// PUBLISH and shared by every record after (`Message::publisher`).
    publisher: Option<bytes::Bytes>,
    /// The producer this connection's writes go through; changed only
    /// while none is in flight, so they reach Kafka in order
    /// (`kafka/lanes.rs`).
    lane: crate::kafka::Lane,
    /// When the last PUBACK/PUBREC was sent (a client that publishes right
    /// after it waits for each one).
    last_ack: Option<Instant>,
    /// When its last PUBLISH to Kafka came (a sparse publisher batches).
    last_publish: Option<Instant>,
    /// Most writes in flight when a PUBLISH came, since the last lane
    /// choice (`lane_for_next_write`).
    peak_in_flight: u16,
    /// QoS 0 writes in flight (for `lane`, the bound and their outcome),
    /// allocated at the first QoS 0 PUBLISH: one pointer while unused.
    qos0: Option<Box<FuturesUnordered<Qos0Future>>>,
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
    client_alias_max: u16,
    client_receive_max: usize,
    client_max_packet: usize,
    /// Deliveries taken from the mailbox (or retained) waiting for window.
    backlog: VecDeque<Delivery>,
    will_delay: u32,
    /// A resumed session's catch-up read; drained before the mailbox,
    /// which fan-out only fills once the catch-up has finished.
    catchup: Option<CatchUpRead>,
    /// Allocated at first use (`Conn::rare`).
    rare: Option<Box<Rare>>,
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
    bucket: Option<Box<TokenBucket>>,
    throttled_until: Option<Instant>,
    /// The loop's one timer, for the earliest of the three deadlines.
    timer: timer::LoopTimer,
    /// A token was taken for the PUBLISH at the head of the read buffer.
    prepaid: bool,
}

/// The parts of a connection most clients never use, allocated at first
/// use: inline they were 376 of `Conn`'s 944 bytes on every connection, idle
/// ones included (docs/benchmarks.md, memory per idle connection).
#[derive(Default)]
struct Rare {
    /// Inbound topic aliases [MQTT-3.3.2-7]: per connection.
    aliases_in: HashMap<u16, String>,
    aliases_out: HashMap<String, u16>,
    /// QoS 2 ids whose Kafka write is still in progress.
    pending_qos2: HashSet<u16>,
    /// Replays on subscribe (`replay.rs`): unlike a catch-up they do not
    /// hold back live deliveries of the other subscriptions.
    replays: replay::Replays,
    /// Members of cluster-wide shared subscriptions (`shared.rs`).
    shares: shared::Shares,
}

/// A resumed session's catch-up read in progress (`delivery.rs`).
struct CatchUpRead {
    rx: mpsc::Receiver<Delivery>,
    /// Filters unsubscribed meanwhile: the read must not hand them to
    /// fan-out when it finishes.
    removed: Arc<std::sync::Mutex<Vec<String>>>,
}

impl CatchUpRead {
    /// The client unsubscribed from `filter` (or a replay of it took over):
    /// the read must not hand it to fan-out.
    fn unsubscribed(&self, filter: &str) {
        self.removed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(filter.to_string());
    }
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    fn v5(&self) -> bool {
        self.version.is_v5()
    }

    /// The seldom-used state, allocated now if it was not yet.
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Packet `id` was a shared-subscription delivery: the group may hand
    /// its member another.
    fn share_finished(&mut self, id: u16) {
        if let Some(r) = &mut self.rare {
            r.shares.finished(id);
        }
    }

    fn qos2_pending(&self, id: u16) -> bool {
        self.rare
            .as_ref()
            .is_some_and(|r| r.pending_qos2.contains(&id))
    }

    fn replays_active(&mut self) -> usize {
        self.rare.as_mut().map_or(0, |r| r.replays.active())
    }

    async fn run(mut self: Box<Self>) {
        let shutdown = self.node.shutting_down();
        let recv_max = self.node.config().mqtt.receive_maximum as usize;
        // Due at once, like an interval's first tick.
        let mut next_persist = Instant::now();
        // Packets that arrived together with CONNECT are already buffered.
        let mut early_end = self.on_bytes().await.err();
        let end = loop {
            if let Some(end) = early_end.take() {
                break end;
            }
            if let Err(e) = self.io.flush().await {
                break End::Io(e);
            }
            // No waiter of its own on the shutdown signal at every turn (a
            // lock to enter and one to leave a list every connection shares):
            // `Node::shutdown` sends every registered connection a
            // `Control::Close`, which wakes it, and one registered later, or
            // whose control queue was full, finds the signal here.
            if shutdown.has_changed().unwrap_or(true) {
                break End::Server(
                    ReasonCode::ServerShuttingDown,
                    "server shutting down".into(),
                );
            }
            let (due, persist_at) = self.timer_due(next_persist);
            let timer_armed = self.timer.arm(due);
            let can_deliver =
                self.backlog.is_empty() && self.window_open() && self.held_len() < HELD_MAX;
            let live = can_deliver && self.catchup.is_none();
            let qos0_in_kafka = self.qos0_in_kafka();
            let skips_wait = self.skips_wait();
            // Borrowed apart from `self` for the select below.
            let (shares_rx, replays_rx) = match self.rare.as_deref_mut() {
                Some(r) => (r.shares.rx.as_mut(), r.replays.rx.as_mut()),
                None => (None, None),
            };
            let (has_shares, has_replays) = (shares_rx.is_some(), replays_rx.is_some());
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
                Some(done) = self.acks.next(), if !self.acks.is_empty() => self.on_kafka_acks(done),
                _ = sync_done(&mut self.syncing), if self.syncing.is_some() => {
                    self.on_synced();
                    Ok(())
                },
                Some(done) = next_qos0(&mut self.qos0), if qos0_in_kafka > 0 => {
                    self.on_qos0_written(done);
                    // Packets buffered while at the bound.
                    self.on_bytes().await
                },
                r = self.io.fill(), if self.acks.len() < recv_max && qos0_in_kafka < recv_max && self.throttled_until.is_none() => match r {
                    Ok(true) => self.on_bytes().await,
                    Ok(false) => Err(End::Io("closed by peer".into())),
                    Err(e) => Err(End::Io(e)),
                },
                d = recv_opt(self.catchup.as_mut().map(|c| &mut c.rx)), if can_deliver && self.catchup.is_some() => {
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
                d = recv_opt(shares_rx), if can_deliver && has_shares => {
                    // The connection keeps a sender: the channel stays open.
                    if let Some(d) = d {
                        self.backlog.push_back(d);
                    }
                    Ok(())
                },
                d = recv_opt(replays_rx), if can_deliver && has_replays => {
                    // The connection keeps a sender: the channel stays open.
                    if let Some(d) = d {
                        self.backlog.push_back(d);
                    }
                    Ok(())
                },
                // Fan-out skipped this session (its mailbox is full): decided
                // below (`on_skipped`).
                _ = std::future::poll_fn(|cx| self.session.mailbox.poll_skipped(cx)), if !skips_wait => Ok(()),
                _ = self.timer.fired(), if timer_armed => {
                    self.on_timer(persist_at.map(|t| (t, &mut next_persist))).await
                }
            };
            if let Err(end) = step {
                break end;
            }
            self.drain_backlog();
            self.start_sync();
            if self.session.take_overflow() {
                // Lost when an earlier connection of the session closed.
                break End::Server(
                    ReasonCode::QuotaExceeded,
                    "session queue overflowed: QoS 1/2 messages were dropped".into(),
                );
            }
            if let Err(end) = self.on_skipped() {
                break end;
            }
        };
        Box::pin((*self).finish(end)).await;
    }

    /// Keep alive, the periodic session write and the rate limit's pause
    /// share one timer (`timer.rs`): the earliest of them, and when the
    /// session write is due (none for a session that ends with the
    /// connection).
    fn timer_due(&self, next_persist: Instant) -> (Option<Instant>, Option<Instant>) {
        let ka_at = self.keep_alive.map(|ka| self.last_recv + ka);
        let persist_at = (self.session.expiry_s > 0).then_some(next_persist);
        let due = [ka_at, persist_at, self.throttled_until]
            .into_iter()
            .flatten()
            .min();
        (due, persist_at)
    }

    /// The loop's one timer fired: the rate limit's pause is over, the
    /// periodic session write is due (`persist`: when, and the next time to
    /// set) or keep alive has run out.
    async fn on_timer(&mut self, persist: Option<(Instant, &mut Instant)>) -> Result<(), End> {
        let now = Instant::now();
        if let Some((at, next)) = persist {
            if at <= now {
                *next = now + PERSIST_EVERY;
                // Bounds what a node crash can make a session re-read.
                if self.dirty {
                    self.persist_soon();
                }
            }
        }
        if self.throttled_until.is_some_and(|t| t <= now) {
            self.throttled_until = None;
            // Packets already buffered while paused (keep alive is checked
            // after them: they count as received).
            self.on_bytes().await?;
        }
        if self.keep_alive.is_some_and(|ka| self.last_recv + ka <= now) {
            // [MQTT-3.1.2-22/24] 1.5 x keep alive without a packet.
            return Err(End::Server(
                ReasonCode::KeepAliveTimeout,
                "keep alive timeout".into(),
            ));
        }
        Ok(())
    }

    /// Decodes and handles every complete packet in the read buffer.
    ///
    /// Most packets, a PUBLISH handed to Kafka included, are handled
    /// without waiting (`on_bytes_now`); only what must wait gets a boxed
    /// future. Boxing every call instead cost a 3.7 KB allocation and copy
    /// per PUBLISH, 8 % of a node's instructions (docs/benchmarks.md);
    /// not boxing at all would put that size in every connection.
    async fn on_bytes(&mut self) -> Result<(), End> {
        loop {
            // Built in a statement of its own: a `Slow` (the size of a
            // PUBLISH) held across the await would sit in every idle
            // connection's future.
            let rest = match self.on_bytes_now()? {
                Some(slow) => Box::pin(self.on_slow(slow)),
                None => return Ok(()),
            };
            rest.await?;
        }
    }

    /// What a packet left for an await, in order: the next packet is not
    /// decoded until it is done.
    async fn on_slow(&mut self, slow: Slow) -> Result<(), End> {
        match slow {
            Slow::Qos2(p) => self.on_qos2_publish(p).await,
            Slow::Write(w) => {
                self.write_when_room(w).await;
                Ok(())
            }
            Slow::Subscribe(s) => self.on_subscribe(s).await,
        }
    }

    /// Handles the buffered packets up to the first one that must wait,
    /// and returns what is left of that one.
    fn on_bytes_now(&mut self) -> Result<Option<Slow>, End> {
        let qos0_max = self.node.config().mqtt.receive_maximum as usize;
        loop {
            // Paused: by the rate limit, or at the bound of QoS 0 writes
            // awaiting Kafka (what is buffered waits for one to finish).
            if self.throttled_until.is_some() || self.qos0_in_kafka() >= qos0_max {
                return Ok(None);
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
                        return Ok(None);
                    }
                }
            }
            let p = match self.io.decoder.decode(&mut self.io.rbuf) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(None),
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
            if let Some(slow) = self.on_packet(p)? {
                return Ok(Some(slow));
            }
        }
    }

    fn on_packet(&mut self, p: Packet) -> Result<Option<Slow>, End> {
        if let Packet::Subscribe(s) = p {
            return Ok(Some(Slow::Subscribe(s)));
        }
        if let Packet::Publish(p) = p {
            return self.on_publish(p);
        }
        self.on_other(p).map(|()| None)
    }

    /// Every packet but PUBLISH and SUBSCRIBE: none waits.
    fn on_other(&mut self, p: Packet) -> Result<(), End> {
        match p {
            Packet::PubAck(a) => {
                self.share_finished(a.packet_id);
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
                    // The client refused it: done with, as far as the group goes.
                    Some(false) => self.share_finished(a.packet_id),
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
                self.share_finished(a.packet_id);
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
                } else if self.qos2_pending(id) {
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
}

async fn recv_opt(rx: Option<&mut mpsc::Receiver<Delivery>>) -> Option<Delivery> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_qos0(q: &mut Option<Box<FuturesUnordered<Qos0Future>>>) -> Option<Qos0Done> {
    match q {
        Some(q) => q.next().await,
        None => std::future::pending().await,
    }
}

async fn sync_done(s: &mut Option<Syncing>) {
    match s {
        Some(s) => s.write.as_mut().await,
        None => std::future::pending().await,
    }
}
