//! The lean MQTT client: one tokio task per connection, plain `TcpStream`,
//! the workspace codec, one timer, no per-client buffers while idle.
//!
//! Publishers send a PUBLISH every `interval` (random phase), or as fast as
//! the in-flight window allows when the interval is zero, and measure the
//! time to PUBACK (QoS 1) / PUBREC (QoS 2). Subscribers measure end-to-end
//! latency from the timestamp in each payload.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use bytes::BytesMut;
use lodestream_mqtt::{
    encode, Ack, Connect, Decoder, Disconnect, Packet, Properties, ProtocolVersion, Publish, QoS,
    ReasonCode, Subscribe, SubscriptionOptions,
};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::payload::{self, Header, PayloadGen};
use crate::stats::{Counters, Recorder};
use crate::verify::SeqRanges;

/// Everything the client tasks share.
pub struct Shared {
    pub brokers: Vec<SocketAddr>,
    pub sources: Vec<IpAddr>,
    pub version: ProtocolVersion,
    /// QoS of the PUBLISHes: (QoS, weight) pairs; a client's QoS is picked
    /// by its index in proportion to the weights.
    pub qos_mix: Vec<(QoS, u32)>,
    /// Mean lifetime of a publisher connection before it disconnects and
    /// reconnects (`--churn-per-sec`); `None`: connections stay.
    pub churn_lifetime: Option<Duration>,
    /// Zero: publish as fast as the in-flight window allows.
    pub interval: Duration,
    pub inflight: usize,
    pub keep_alive_s: u16,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    pub run_id: String,
    pub topic_prefix: String,
    pub payloads: PayloadGen,
    pub counters: Counters,
    pub recorder: Recorder,
    /// Connect errors printed so far (the first few are shown, not all).
    pub errors_shown: std::sync::atomic::AtomicU32,
    /// MQTT over WebSocket at this path (`--transport ws`); `None`: TCP.
    pub ws_path: Option<String>,
}

/// The connection's byte stream: TCP, or WebSocket over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What one publisher did, for the Kafka check.
#[derive(Debug, Default, Clone)]
pub struct ClientResult {
    /// Sequence numbers 0..published were sent.
    pub published: u32,
    /// Sequence numbers acknowledged with success.
    pub acked: SeqRanges,
    /// PUBLISHes (QoS > 0) that never got an acknowledgement.
    pub unacked: u32,
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

struct Conn {
    stream: Box<dyn Io>,
    rbuf: BytesMut,
    decoder: Decoder,
    version: ProtocolVersion,
    /// MQTT 5 Receive Maximum from the CONNACK.
    server_receive_max: usize,
}

impl Conn {
    fn push(&self, p: &Packet, out: &mut BytesMut) {
        // Our packets are well-formed; an error would be a loadsim bug.
        if let Err(e) = encode(p, self.version, out) {
            eprintln!("loadsim: cannot encode {}: {e}", p.kind());
        }
    }

    /// Reads more bytes; `false` when the peer closed or the read failed.
    async fn fill(&mut self, reserve: usize) -> bool {
        if self.rbuf.capacity() - self.rbuf.len() < reserve / 2 {
            self.rbuf.reserve(reserve);
        }
        matches!(self.stream.read_buf(&mut self.rbuf).await, Ok(n) if n > 0)
    }

    /// Writes `out` and flushes it (a no-op on TCP; a WebSocket frame is
    /// only sent on flush).
    async fn send(&mut self, out: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(out).await?;
        self.stream.flush().await
    }

    async fn disconnect(mut self) {
        let mut out = BytesMut::new();
        self.push(
            &Packet::Disconnect(Disconnect::new(ReasonCode::Success)),
            &mut out,
        );
        let _ = self.send(&out).await;
        let _ = self.stream.shutdown().await;
    }
}

impl Shared {
    /// The QoS client `index` publishes with (deterministic, spread evenly).
    pub fn qos_for(&self, index: u32) -> QoS {
        let total: u32 = self.qos_mix.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return QoS::AtLeastOnce;
        }
        // A multiplicative hash spreads neighbouring indexes over the mix.
        let mut x = index.wrapping_mul(2_654_435_761) % total;
        for (q, w) in &self.qos_mix {
            if x < *w {
                return *q;
            }
            x -= w;
        }
        QoS::AtLeastOnce
    }

    fn show_error(&self, what: &str, e: &anyhow::Error) {
        let n = self.errors_shown.fetch_add(1, Ordering::Relaxed);
        if n < 10 {
            eprintln!("loadsim: {what}: {e:#}");
        } else if n == 10 {
            eprintln!("loadsim: (further connection errors are only counted)");
        }
    }

    /// Destination and source address of client slot `slot`: brokers round
    /// robin, sources round robin over each broker's share, so every
    /// (source, broker) pair is used evenly.
    fn route(&self, slot: usize) -> (SocketAddr, Option<IpAddr>) {
        let nb = self.brokers.len();
        let dst = self.brokers[slot % nb];
        let src =
            (!self.sources.is_empty()).then(|| self.sources[(slot / nb) % self.sources.len()]);
        (dst, src)
    }

    async fn tcp_connect(&self, slot: usize) -> anyhow::Result<TcpStream> {
        let (dst, src) = self.route(slot);
        let sock = if dst.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(src) = src {
            bind_no_port(&sock);
            sock.bind(SocketAddr::new(src, 0))
                .with_context(|| format!("bind {src}"))?;
        }
        let stream = tokio::time::timeout(self.connect_timeout, sock.connect(dst))
            .await
            .map_err(|_| anyhow!("TCP connect to {dst} timed out"))?
            .with_context(|| format!("TCP connect to {dst} from {src:?}"))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// TCP connect, CONNECT, wait for a successful CONNACK.
    async fn mqtt_connect(&self, slot: usize, client_id: &str) -> anyhow::Result<Conn> {
        let tcp = self.tcp_connect(slot).await?;
        let stream: Box<dyn Io> = match &self.ws_path {
            Some(path) => Box::new(
                tokio::time::timeout(self.connect_timeout, crate::ws::connect(tcp, path))
                    .await
                    .map_err(|_| anyhow!("WebSocket handshake timed out"))??,
            ),
            None => Box::new(tcp),
        };
        let mut decoder = Decoder::new(16 * 1024 * 1024);
        decoder.set_version(self.version);
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(64),
            decoder,
            version: self.version,
            server_receive_max: 65_535,
        };
        let mut out = BytesMut::new();
        conn.push(
            &Packet::Connect(Box::new(Connect {
                protocol: self.version,
                clean_start: true,
                keep_alive: self.keep_alive_s,
                client_id: client_id.to_string(),
                will: None,
                username: None,
                password: None,
                properties: Properties::default(),
            })),
            &mut out,
        );
        let deadline = Instant::now() + self.connect_timeout;
        let handshake = async {
            conn.send(&out).await?;
            loop {
                match conn.decoder.decode(&mut conn.rbuf) {
                    Ok(Some(Packet::ConnAck(a))) => return Ok::<_, anyhow::Error>(a),
                    Ok(Some(p)) => bail!("expected CONNACK, got {}", p.kind()),
                    Ok(None) => {
                        if !conn.fill(64).await {
                            bail!("connection closed before CONNACK");
                        }
                    }
                    Err(e) => bail!("bad CONNACK: {e}"),
                }
            }
        };
        let ack = tokio::time::timeout_at(deadline, handshake)
            .await
            .map_err(|_| anyhow!("no CONNACK within {:?}", self.connect_timeout))??;
        if ack.reason != ReasonCode::Success {
            bail!("CONNACK refused: {:?}", ack.reason);
        }
        if let Some(m) = ack.properties.receive_maximum {
            conn.server_receive_max = m as usize;
        }
        Ok(conn)
    }
}

/// Linux `IP_BIND_ADDRESS_NO_PORT`: bind the source IP now but choose the
/// port at connect time, so a port is unique per (source, destination)
/// pair instead of per source address.
fn bind_no_port(sock: &TcpSocket) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let one: libc::c_int = 1;
        // SAFETY: valid socket fd, pointer/length describe a c_int.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = sock;
}

/// A QoS 1/2 PUBLISH waiting for its acknowledgement.
struct Pending {
    id: u16,
    seq: u32,
    sent: Instant,
    /// QoS 2: PUBREC received and PUBREL sent, waiting for PUBCOMP.
    released: bool,
}

enum End {
    Stopped,
    Lost,
    /// Closed on purpose after its lifetime (churn); reconnect at once.
    Churned,
}

async fn wait_stop(stop: &mut watch::Receiver<bool>) {
    // A dropped sender also means stop.
    let _ = stop.wait_for(|s| *s).await;
}

async fn backoff(stop: &mut watch::Receiver<bool>) {
    let ms = rand::thread_rng().gen_range(1000..5000);
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
        _ = wait_stop(stop) => {}
    }
}

/// One publishing client, reconnecting after failures, until `stop`.
pub async fn publisher(
    sh: Arc<Shared>,
    index: u32,
    slot: usize,
    mut stop: watch::Receiver<bool>,
) -> ClientResult {
    let mut res = ClientResult::default();
    let mut first = true;
    let topic = format!("{}/{}", sh.topic_prefix, index);
    let client_id = format!("ls-{}-{}", sh.run_id, index);
    while !*stop.borrow() {
        let attempt = tokio::select! {
            c = sh.mqtt_connect(slot, &client_id) => c,
            _ = wait_stop(&mut stop) => break,
        };
        match attempt {
            Ok(conn) => {
                sh.counters.on_connected();
                let end = run_publisher(&sh, conn, &topic, index, first, &mut res, &mut stop).await;
                first = false;
                sh.counters.connected.fetch_sub(1, Ordering::Relaxed);
                match end {
                    End::Stopped => break,
                    End::Churned => {
                        sh.counters.churned.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    End::Lost => {}
                }
                sh.counters
                    .connection_losses
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                sh.counters.connect_failures.fetch_add(1, Ordering::Relaxed);
                sh.show_error(&format!("client {index}"), &e);
            }
        }
        backoff(&mut stop).await;
    }
    res
}

async fn run_publisher(
    sh: &Shared,
    mut conn: Conn,
    topic: &str,
    index: u32,
    first: bool,
    res: &mut ClientResult,
    stop: &mut watch::Receiver<bool>,
) -> End {
    let qos = sh.qos_for(index);
    let window = sh.inflight.min(conn.server_receive_max).max(1);
    let fast = sh.interval.is_zero();
    let keep_alive = Duration::from_secs(sh.keep_alive_s as u64);
    let mut inflight: VecDeque<Pending> = VecDeque::new();
    let mut next_id: u16 = 0;
    let now = Instant::now();
    // Random phase: clients spread their publishes over the interval.
    let mut next_pub = if fast {
        now
    } else {
        now + sh.interval.mul_f64(rand::thread_rng().gen::<f64>())
    };
    let mut last_send = now;
    let mut draining: Option<Instant> = None;
    // Churn: this connection ends after a random lifetime (0.5–1.5 × mean;
    // the first one 0–1.5 × mean, so the churn rate holds from the start).
    let low = if first { 0.0 } else { 0.5 };
    let mut churn_at = sh
        .churn_lifetime
        .map(|m| now + m.mul_f64(rand::thread_rng().gen_range(low..1.5)));
    let mut churning = false;
    let mut wbuf = BytesMut::new();
    loop {
        if draining.is_some() && inflight.is_empty() {
            conn.disconnect().await;
            return if churning { End::Churned } else { End::Stopped };
        }
        let can_publish = draining.is_none() && (qos == QoS::AtMostOnce || inflight.len() < window);
        // One timer: the earliest of next publish, keep-alive ping, drain end.
        let mut wake = if keep_alive.is_zero() {
            None
        } else {
            Some(last_send + keep_alive)
        };
        if can_publish {
            wake = Some(wake.map_or(next_pub, |w| w.min(next_pub)));
        }
        if let Some(d) = draining {
            wake = Some(wake.map_or(d, |w| w.min(d)));
        }
        if let Some(c) = churn_at {
            wake = Some(wake.map_or(c, |w| w.min(c)));
        }
        let mut timer_fired = false;
        tokio::select! {
            biased;
            _ = wait_stop(stop), if draining.is_none() || churning => {
                churning = false;
                draining = Some(Instant::now() + sh.drain_timeout);
            }
            ok = conn.fill(64) => {
                if !ok {
                    res.unacked += inflight.len() as u32;
                    return End::Lost;
                }
                if !handle_publisher_input(sh, &mut conn, &mut inflight, res, &mut wbuf) {
                    res.unacked += inflight.len() as u32;
                    return End::Lost;
                }
            }
            _ = sleep_until(wake) => timer_fired = true,
        }
        if timer_fired {
            let now = Instant::now();
            if churn_at.is_some_and(|c| now >= c) && draining.is_none() {
                // Stop publishing, wait for the acknowledgements, then reconnect.
                churn_at = None;
                churning = true;
                draining = Some(now + sh.drain_timeout);
            }
            if let Some(d) = draining {
                if now >= d {
                    res.unacked += inflight.len() as u32;
                    conn.disconnect().await;
                    return if churning { End::Churned } else { End::Stopped };
                }
            }
            if can_publish && draining.is_none() && now >= next_pub {
                // Fast mode sends a small batch per wake-up to cut syscalls.
                let batch = if fast {
                    if qos == QoS::AtMostOnce {
                        16
                    } else {
                        (window - inflight.len()).min(16)
                    }
                } else {
                    1
                };
                for _ in 0..batch {
                    let seq = res.published;
                    let packet_id = if qos == QoS::AtMostOnce {
                        None
                    } else {
                        next_id = next_id.checked_add(1).unwrap_or(1);
                        Some(next_id)
                    };
                    let body = {
                        let mut rng = rand::thread_rng();
                        sh.payloads.make(
                            &mut rng,
                            &Header {
                                run_id: &sh.run_id,
                                index,
                                seq,
                                sent_us: now_us(),
                            },
                        )
                    };
                    conn.push(
                        &Packet::Publish(Publish {
                            dup: false,
                            qos,
                            retain: false,
                            topic: topic.to_string(),
                            packet_id,
                            payload: body,
                            properties: Properties::default(),
                        }),
                        &mut wbuf,
                    );
                    res.published += 1;
                    sh.counters.published.fetch_add(1, Ordering::Relaxed);
                    if qos == QoS::AtMostOnce {
                        sh.counters.published_qos0.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(id) = packet_id {
                        inflight.push_back(Pending {
                            id,
                            seq,
                            sent: now,
                            released: false,
                        });
                    }
                }
                next_pub = if fast {
                    now
                } else {
                    // Keep the schedule; after a stall, do not burst to catch up.
                    (next_pub + sh.interval).max(now)
                };
            }
            if !keep_alive.is_zero() && now >= last_send + keep_alive && wbuf.is_empty() {
                conn.push(&Packet::PingReq, &mut wbuf);
            }
        }
        if !wbuf.is_empty() {
            if conn.send(&wbuf).await.is_err() {
                res.unacked += inflight.len() as u32;
                return End::Lost;
            }
            last_send = Instant::now();
            if fast {
                wbuf.clear();
            } else {
                // Idle clients keep no write buffer.
                wbuf = BytesMut::new();
            }
        }
    }
}

/// Handles every complete packet read; `false` = close the connection.
fn handle_publisher_input(
    sh: &Shared,
    conn: &mut Conn,
    inflight: &mut VecDeque<Pending>,
    res: &mut ClientResult,
    out: &mut BytesMut,
) -> bool {
    loop {
        let p = match conn.decoder.decode(&mut conn.rbuf) {
            Ok(Some(p)) => p,
            Ok(None) => return true,
            Err(e) => {
                eprintln!("loadsim: protocol error from broker: {e}");
                return false;
            }
        };
        match p {
            Packet::PubAck(a) => {
                if let Some(pos) = inflight.iter().position(|p| p.id == a.packet_id) {
                    if let Some(p) = inflight.remove(pos) {
                        on_ack(sh, res, &p, a.reason);
                    }
                }
            }
            Packet::PubRec(a) => {
                if let Some(pos) = inflight
                    .iter()
                    .position(|p| p.id == a.packet_id && !p.released)
                {
                    on_ack(sh, res, &inflight[pos], a.reason);
                    if a.reason.is_error() {
                        inflight.remove(pos);
                    } else {
                        inflight[pos].released = true;
                        conn.push(&Packet::PubRel(Ack::new(a.packet_id)), out);
                    }
                }
            }
            Packet::PubComp(a) => {
                if let Some(pos) = inflight
                    .iter()
                    .position(|p| p.id == a.packet_id && p.released)
                {
                    inflight.remove(pos);
                    sh.counters.completed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Packet::Publish(p) => ack_incoming(conn, &p, out),
            Packet::PubRel(a) => conn.push(&Packet::PubComp(Ack::new(a.packet_id)), out),
            Packet::Disconnect(d) => {
                eprintln!("loadsim: broker sent DISCONNECT {:?}", d.reason);
                return false;
            }
            _ => {}
        }
    }
}

fn on_ack(sh: &Shared, res: &mut ClientResult, p: &Pending, reason: ReasonCode) {
    if reason.is_error() {
        sh.counters.ack_errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    sh.counters.acked.fetch_add(1, Ordering::Relaxed);
    sh.recorder.ack_us(p.sent.elapsed().as_micros() as u64);
    res.acked.push(p.seq);
}

fn ack_incoming(conn: &Conn, p: &Publish, out: &mut BytesMut) {
    match (p.qos, p.packet_id) {
        (QoS::AtLeastOnce, Some(id)) => conn.push(&Packet::PubAck(Ack::new(id)), out),
        (QoS::ExactlyOnce, Some(id)) => conn.push(&Packet::PubRec(Ack::new(id)), out),
        _ => {}
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) if t <= Instant::now() => {}
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// One subscriber: subscribes to `filter` and records end-to-end latency of
/// this run's messages until `stop`.
pub async fn subscriber(
    sh: Arc<Shared>,
    client_id: String,
    slot: usize,
    filter: String,
    qos: QoS,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let attempt = tokio::select! {
            c = sh.mqtt_connect(slot, &client_id) => c,
            _ = wait_stop(&mut stop) => break,
        };
        match attempt {
            Ok(conn) => match run_subscriber(&sh, conn, &filter, qos, &mut stop).await {
                End::Stopped => break,
                End::Lost | End::Churned => {
                    sh.counters
                        .connection_losses
                        .fetch_add(1, Ordering::Relaxed);
                }
            },
            Err(e) => {
                sh.counters.connect_failures.fetch_add(1, Ordering::Relaxed);
                sh.show_error(&format!("subscriber {client_id}"), &e);
            }
        }
        backoff(&mut stop).await;
    }
}

async fn run_subscriber(
    sh: &Shared,
    mut conn: Conn,
    filter: &str,
    qos: QoS,
    stop: &mut watch::Receiver<bool>,
) -> End {
    let mut out = BytesMut::new();
    conn.push(
        &Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(filter.to_string(), SubscriptionOptions::qos(qos))],
            properties: Properties::default(),
        }),
        &mut out,
    );
    if conn.send(&out).await.is_err() {
        return End::Lost;
    }
    out.clear();
    let keep_alive = Duration::from_secs(sh.keep_alive_s as u64);
    let mut last_send = Instant::now();
    let mut subscribed = false;
    let end = loop {
        let ping_at = (!keep_alive.is_zero()).then(|| last_send + keep_alive);
        tokio::select! {
            biased;
            _ = wait_stop(stop) => {
                conn.disconnect().await;
                break End::Stopped;
            }
            ok = conn.fill(64 * 1024) => {
                if !ok {
                    break End::Lost;
                }
            }
            _ = sleep_until(ping_at) => conn.push(&Packet::PingReq, &mut out),
        }
        let now = now_us();
        let mut lost = false;
        loop {
            let p = match conn.decoder.decode(&mut conn.rbuf) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    eprintln!("loadsim: subscriber protocol error: {e}");
                    lost = true;
                    break;
                }
            };
            match p {
                Packet::SubAck(a) => {
                    if a.reasons.iter().any(|r| r.is_error()) {
                        eprintln!("loadsim: SUBSCRIBE {filter} refused: {:?}", a.reasons);
                    } else if !subscribed {
                        subscribed = true;
                        sh.counters
                            .subscribers_connected
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Packet::Publish(p) => {
                    match payload::parse_header(&p.payload) {
                        Some(h) if h.run_id == sh.run_id => {
                            sh.counters.sub_received.fetch_add(1, Ordering::Relaxed);
                            sh.recorder.e2e_us(now.saturating_sub(h.sent_us));
                        }
                        _ => {
                            sh.counters.sub_foreign.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    ack_incoming(&conn, &p, &mut out);
                }
                Packet::PubRel(a) => conn.push(&Packet::PubComp(Ack::new(a.packet_id)), &mut out),
                Packet::Disconnect(d) => {
                    eprintln!("loadsim: broker disconnected subscriber: {:?}", d.reason);
                    lost = true;
                    break;
                }
                _ => {}
            }
        }
        if lost {
            break End::Lost;
        }
        if !out.is_empty() {
            if conn.send(&out).await.is_err() {
                break End::Lost;
            }
            out.clear();
            last_send = Instant::now();
        }
    };
    if subscribed {
        sh.counters
            .subscribers_connected
            .fetch_sub(1, Ordering::Relaxed);
    }
    end
}
