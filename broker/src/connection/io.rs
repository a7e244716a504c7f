//! The socket side of a connection: its halves, the read and write buffers
//! and the codec; CONNECT refusals.

use futures::FutureExt;

use super::*;

/// Read buffer between packets: one read takes CONNECT, acks, PINGREQ or a
/// typical PUBLISH (a few hundred bytes) whole. An idle connection holds
/// none (`Io::fill`).
pub(super) const RBUF_IDLE: usize = 1024;

thread_local! {
    /// Where `read_idle` reads: held only during a poll, never while a
    /// connection waits.
    static SCRATCH: std::cell::RefCell<[u8; RBUF_IDLE]> = const { std::cell::RefCell::new([0; RBUF_IDLE]) };
}

/// Reads what arrives on an idle connection into this thread's scratch
/// buffer and appends it to `into`: one system call, and no buffer held
/// while waiting. (A zero-length read to wait, then a read into a new
/// buffer, cost a second `recvfrom` per message.)
async fn read_idle<R: AsyncRead + Unpin>(
    rd: &mut R,
    into: &mut BytesMut,
) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut buf = tokio::io::ReadBuf::new(&mut scratch[..]);
            std::task::ready!(std::pin::Pin::new(&mut *rd).poll_read(cx, &mut buf))?;
            let got = buf.filled();
            into.reserve(RBUF_IDLE.max(got.len()));
            into.extend_from_slice(got);
            std::task::Poll::Ready(Ok(got.len()))
        })
    })
    .await
}

/// Write buffer capacity kept once everything is written.
pub(super) const WBUF_KEEP: usize = 4096;

/// Socket halves, buffers and codec.
pub(super) struct Io<S> {
    pub(super) rd: ReadHalf<S>,
    pub(super) wr: WriteHalf<S>,
    pub(super) rbuf: BytesMut,
    pub(super) wbuf: BytesMut,
    pub(super) decoder: Decoder,
    pub(super) node: Arc<Node>,
}

impl<S: AsyncRead + AsyncWrite> Io<S> {
    pub(super) fn version(&self) -> ProtocolVersion {
        self.decoder.version().unwrap_or(ProtocolVersion::V311)
    }

    pub(super) fn send(&mut self, p: &Packet) {
        let v = self.version();
        let before = self.wbuf.len();
        let written = encode(p, v, &mut self.wbuf);
        self.count_sent(p.kind(), before, written);
    }

    /// `send` of a delivery encoded from the parts its message holds,
    /// unless it is longer than `max` bytes (`Ok(false)`: nothing written).
    pub(super) fn send_publish_within(
        &mut self,
        p: &PublishRef<'_>,
        max: usize,
    ) -> Result<bool, EncodeError> {
        let before = self.wbuf.len();
        let v = self.version();
        match lodestream_mqtt::encode_publish_within(p, v, max, &mut self.wbuf)? {
            Some(_) => {
                self.count_sent("publish", before, Ok(()));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn count_sent(&self, kind: &str, before: usize, written: Result<(), EncodeError>) {
        match written {
            Ok(()) => {
                let m = self.node.metrics();
                m.packets_out.with_label_values(&[kind]).inc();
                m.bytes_out.inc_by((self.wbuf.len() - before) as u64);
            }
            // Our own packets are built to be valid; an error here is a bug,
            // logged rather than sent malformed.
            Err(e) => tracing::error!(packet = kind, error = %e, "could not encode packet"),
        }
    }

    /// Refuses the CONNECT with `reason` (counted under `label`).
    pub(super) async fn refuse(&mut self, reason: ReasonCode, label: &str) {
        self.node
            .metrics()
            .connect_rejected
            .with_label_values(&[label])
            .inc();
        self.send(&connack(false, reason));
        let _ = self.flush().await;
    }

    pub(super) async fn flush(&mut self) -> Result<(), String> {
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
    pub(super) async fn fill(&mut self) -> Result<bool, String> {
        if self.rbuf.is_empty() {
            // Between packets the buffer goes back to `RBUF_IDLE`: a large
            // packet (or the tail left after a PUBLISH was split off, which
            // shares its allocation with the payload on its way to Kafka)
            // must not stay allocated for the rest of the connection.
            let spare = self.rbuf.capacity();
            if !(RBUF_IDLE / 2..=RBUF_IDLE).contains(&spare) {
                self.rbuf = BytesMut::with_capacity(RBUF_IDLE);
            }
            if let Some(read) = self.rd.read_buf(&mut self.rbuf).now_or_never() {
                return self.count_read(read);
            }
            // Nothing to read: an idle connection waits without a buffer.
            self.rbuf = BytesMut::new();
            let read = read_idle(&mut self.rd, &mut self.rbuf).await;
            return self.count_read(read);
        } else if self.rbuf.capacity() - self.rbuf.len() < 512 {
            self.rbuf.reserve(4096);
        }
        let read = self.rd.read_buf(&mut self.rbuf).await;
        self.count_read(read)
    }

    fn count_read(&self, read: std::io::Result<usize>) -> Result<bool, String> {
        match read {
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
    pub(super) async fn read_connect(&mut self) -> Result<Box<Connect>, String> {
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
pub(super) fn refusal_version(e: &DecodeError) -> ProtocolVersion {
    match e {
        DecodeError::UnsupportedProtocolVersion(level) if *level > 5 => ProtocolVersion::V5,
        _ => ProtocolVersion::V311,
    }
}

pub(super) fn connack(session_present: bool, reason: ReasonCode) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present,
        reason,
        properties: Properties::default(),
    })
}
