//! MQTT over WebSocket (MQTT 5 spec 6.0): the HTTP upgrade, then a plain
//! byte stream carried in binary messages.
//!
//! - Reading: binary messages are concatenated; MQTT packets may be split
//!   across messages or packed several to one [MQTT-6.0.0-2]. A text message
//!   is a protocol error [MQTT-6.0.0-1]: the connection is closed (1003).
//!   Pings are answered by tungstenite, pongs ignored, a close message or
//!   the end of the TCP stream reads as end of stream.
//! - Writing: each `poll_write` becomes one binary message of at most
//!   [`MAX_OUT_MESSAGE`] bytes (the connection writes its buffered packets in
//!   one call, so this packs packets into few messages); `poll_flush` pushes
//!   them to the socket.
//! - Memory per connection: a 1 KiB read buffer, incoming messages bounded by
//!   `max_message_size`, outgoing frames bounded by [`MAX_WRITE_BUFFER`]
//!   (a full buffer makes `poll_write` wait: back-pressure).
//! - A read returns every binary message already received that fits, as a
//!   TCP read returns every byte: a client flooding PUBLISHes past Receive
//!   Maximum is seen (and answered 0x93) as it is over TCP.
//! - Closing: the connection's last packets (a server DISCONNECT) go out
//!   first, then the close frame; on drop a task finishes the close without
//!   resetting the connection: TCP write side shut (FIN), then whatever the
//!   client still sends is read and discarded until it closes, for at most
//!   [`LINGER`]. Closing a socket with unread bytes would send a TCP RST,
//!   and a client that is still writing (a flood, a take-over under load)
//!   then fails with a broken pipe before it reads the DISCONNECT.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WsConfig {
    /// HTTP path of the WebSocket endpoint.
    pub path: String,
    /// Allowed `Origin` header values (e.g. `https://fleet.example.com`);
    /// empty = any. Requests without an `Origin` (non-browser clients, which
    /// could forge it anyway) are always accepted: the check protects
    /// browsers against cross-site pages.
    pub allowed_origins: Vec<String>,
    /// Largest WebSocket message (and frame) accepted, bytes; keep it at
    /// least `mqtt.max_packet_size` since most clients send one packet per
    /// message.
    pub max_message_size: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            path: "/mqtt".into(),
            allowed_origins: Vec::new(),
            max_message_size: 1024 * 1024,
        }
    }
}

/// Largest binary message the broker sends; bigger writes are split.
pub const MAX_OUT_MESSAGE: usize = 64 * 1024;
/// Outgoing bytes buffered before `poll_write` waits for the socket.
pub const MAX_WRITE_BUFFER: usize = 4 * MAX_OUT_MESSAGE;
/// Longest a closed connection keeps reading (and discarding) what the
/// client still sends, waiting for its close.
pub const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

fn refuse(status: StatusCode, message: &str) -> ErrorResponse {
    let body = format!("{message}\n");
    let mut r = ErrorResponse::new(Some(body.clone()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn same_origin(allowed: &str, origin: &str) -> bool {
    allowed
        .trim_end_matches('/')
        .eq_ignore_ascii_case(origin.trim_end_matches('/'))
}

/// Checks the upgrade request; on success returns the subprotocol to answer.
fn check_request(
    req: &Request,
    cfg: &WsConfig,
) -> Result<&'static str, (StatusCode, &'static str)> {
    if req.uri().path() != cfg.path {
        return Err((StatusCode::NOT_FOUND, "not found"));
    }
    if !cfg.allowed_origins.is_empty() {
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let ok = origin
                .to_str()
                .is_ok_and(|o| cfg.allowed_origins.iter().any(|a| same_origin(a, o)));
            if !ok {
                return Err((StatusCode::FORBIDDEN, "origin not allowed"));
            }
        }
    }
    let offered: Vec<&str> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    // Answer with a protocol the client offered: browsers fail the
    // connection when the server picks one they did not offer.
    if offered.iter().any(|p| p.eq_ignore_ascii_case("mqtt")) {
        Ok("mqtt")
    } else if offered.iter().any(|p| p.eq_ignore_ascii_case("mqttv3.1")) {
        Ok("mqttv3.1")
    } else {
        Err((
            StatusCode::BAD_REQUEST,
            "MQTT over WebSocket: the Sec-WebSocket-Protocol header must offer \"mqtt\"",
        ))
    }
}

/// Performs the HTTP upgrade and returns the MQTT byte stream. The caller
/// bounds it in time (e.g. with the CONNECT timeout). Refused upgrades get
/// an HTTP error: 404 for another path, 403 for an origin not allowed, 400
/// when `Sec-WebSocket-Protocol` does not offer `mqtt` (or `mqttv3.1`).
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    s: S,
    cfg: &WsConfig,
) -> io::Result<WsStream<S>> {
    let check_cfg = cfg.clone();
    // The error type is fixed by tungstenite's `Callback`.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &Request, mut resp: Response| {
        let protocol =
            check_request(req, &check_cfg).map_err(|(status, message)| refuse(status, message))?;
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol),
        );
        Ok(resp)
    };
    let ws_cfg = WebSocketConfig::default()
        // Allocated (and zeroed) for the connection's life: 1 KiB takes a
        // typical MQTT message in one read and keeps idle connections small
        // (docs/benchmarks.md, memory per idle connection); a larger frame
        // reserves its own length.
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(Some(cfg.max_message_size))
        .max_frame_size(Some(cfg.max_message_size));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(s, callback, Some(ws_cfg))
        .await
        .map_err(to_io)?;
    Ok(WsStream {
        ws: Some(ws),
        pending: Bytes::new(),
        read_done: false,
        read_error: None,
    })
}

fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
        }
        WsError::WriteBufferFull(_) => {
            io::Error::new(io::ErrorKind::WouldBlock, "write buffer full")
        }
        e => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    }
}

/// MQTT bytes over an established WebSocket.
pub struct WsStream<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    /// `None` only once dropped (handed to the lingering close).
    ws: Option<WebSocketStream<S>>,
    /// Unread rest of the last binary message.
    pending: Bytes,
    /// A close message, text message or end of stream was seen.
    read_done: bool,
    /// An error met after bytes were already returned by the same read;
    /// the next read returns it.
    read_error: Option<io::Error>,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "websocket dropped")
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Drop for WsStream<S> {
    fn drop(&mut self) {
        let (Some(ws), Ok(rt)) = (self.ws.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        rt.spawn(linger(ws));
    }
}

/// Finishes a close without a TCP reset (see the module documentation).
async fn linger<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(mut ws: WebSocketStream<S>) {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(LINGER, async {
        // Our close frame, if the connection did not send it already.
        let _ = ws.close(None).await;
        let _ = ws.get_mut().shutdown().await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> std::fmt::Debug for WsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsStream")
            .field("pending", &self.pending.len())
            .field("read_done", &self.read_done)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> WsStream<S> {
    /// The transport under the WebSocket (`None` once dropped).
    pub fn get_ref(&self) -> Option<&S> {
        self.ws.as_ref().map(|ws| ws.get_ref())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.read_error.take() {
            return Poll::Ready(Err(e));
        }
        let start = buf.filled().len();
        loop {
            if !this.pending.is_empty() {
                let n = buf.remaining().min(this.pending.len());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
            }
            let copied = buf.filled().len() > start;
            // A zero-length read waits for a message (the connection waits
            // so without a read buffer while idle).
            let full = buf.remaining() == 0 && (copied || !this.pending.is_empty());
            if this.read_done || full {
                return Poll::Ready(Ok(()));
            }
            let ws = this.ws.as_mut().ok_or_else(gone)?;
            let item = match Pin::new(&mut *ws).poll_next(cx) {
                Poll::Ready(item) => item,
                // More messages may come later; return what is here now.
                Poll::Pending if copied => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            };
            match item {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Text(_))) => {
                    this.read_done = true;
                    // Best effort: the error below ends the connection anyway.
                    let close = CloseFrame {
                        code: CloseCode::Unsupported,
                        reason: "MQTT needs binary frames".into(),
                    };
                    if Pin::new(&mut *ws)
                        .start_send(Message::Close(Some(close)))
                        .is_ok()
                    {
                        let _ = Pin::new(&mut *ws).poll_flush(cx);
                    }
                    let e = io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message: MQTT needs binary frames [MQTT-6.0.0-1]",
                    );
                    return Poll::Ready(this.error_after(copied, e));
                }
                // Pongs to pings are queued and sent by tungstenite.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => {
                    this.read_done = true;
                    // Push the queued close reply if the socket takes it now.
                    let _ = Pin::new(&mut *ws).poll_flush(cx);
                }
                Some(Err(e)) => {
                    this.read_done = true;
                    return Poll::Ready(this.error_after(copied, to_io(e)));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> WsStream<S> {
    /// The bytes already copied go out first; the error with the next read.
    fn error_after(&mut self, copied: bool, e: io::Error) -> io::Result<()> {
        if copied {
            self.read_error = Some(e);
            Ok(())
        } else {
            Err(e)
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let ws = self.get_mut().ws.as_mut().ok_or_else(gone)?;
        ready!(Pin::new(&mut *ws).poll_ready(cx)).map_err(to_io)?;
        let n = buf.len().min(MAX_OUT_MESSAGE);
        Pin::new(ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let ws = self.get_mut().ws.as_mut().ok_or_else(gone)?;
        Pin::new(ws).poll_flush(cx).map_err(to_io)
    }

    /// Sends the close frame after everything written before; the TCP
    /// close follows when the stream is dropped (see [`linger`]).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let ws = self.get_mut().ws.as_mut().ok_or_else(gone)?;
        Pin::new(ws).poll_close(cx).map_err(to_io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    type Client = WebSocketStream<DuplexStream>;

    fn request(path: &str, protocol: Option<&str>, origin: Option<&str>) -> Request {
        let mut r = format!("ws://localhost{path}")
            .into_client_request()
            .unwrap();
        if let Some(p) = protocol {
            r.headers_mut()
                .insert(header::SEC_WEBSOCKET_PROTOCOL, p.parse().unwrap());
        }
        if let Some(o) = origin {
            r.headers_mut().insert(header::ORIGIN, o.parse().unwrap());
        }
        r
    }

    /// Connects a tungstenite client to `accept` over an in-memory pipe.
    async fn connect(
        cfg: &WsConfig,
        req: Request,
    ) -> (
        io::Result<WsStream<DuplexStream>>,
        Result<
            (
                Client,
                tokio_tungstenite::tungstenite::handshake::client::Response,
            ),
            WsError,
        >,
    ) {
        let (c, s) = tokio::io::duplex(256 * 1024);
        let server = accept(s, cfg);
        let client = tokio_tungstenite::client_async(req, c);
        tokio::join!(server, client)
    }

    async fn pair() -> (WsStream<DuplexStream>, Client) {
        let (server, client) =
            connect(&WsConfig::default(), request("/mqtt", Some("mqtt"), None)).await;
        let (client, resp) = client.unwrap();
        assert_eq!(
            resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL).unwrap(),
            "mqtt"
        );
        (server.unwrap(), client)
    }

    // CONNECT for MQTT 3.1.1, client id "c" (15 bytes).
    const CONNECT: &[u8] = &[
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'c',
    ];
    const PINGREQ: &[u8] = &[0xC0, 0];

    #[tokio::test]
    async fn packets_split_across_messages_are_reassembled() {
        let (mut server, mut client) = pair().await;
        for chunk in CONNECT.chunks(4) {
            client
                .send(Message::Binary(Bytes::copy_from_slice(chunk)))
                .await
                .unwrap();
        }
        let mut got = vec![0u8; CONNECT.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, CONNECT);
    }

    #[tokio::test]
    async fn packets_packed_in_one_message_are_all_read() {
        let (mut server, mut client) = pair().await;
        let packed = [CONNECT, PINGREQ, PINGREQ].concat();
        client
            .send(Message::Binary(packed.clone().into()))
            .await
            .unwrap();
        let mut got = vec![0u8; packed.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, packed);
    }

    /// The connection waits for an idle client without a read buffer: a
    /// zero-length read returns only once a message is there, and the
    /// message is then read whole.
    #[tokio::test]
    async fn zero_length_read_waits_for_a_message_and_keeps_it() {
        let (mut server, mut client) = pair().await;
        let mut none = [0u8; 0];
        let early = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            server.read(&mut none),
        )
        .await;
        assert!(early.is_err(), "returned before any message: {early:?}");
        client.send(Message::Ping(Bytes::new())).await.unwrap();
        client
            .send(Message::Binary(Bytes::from_static(PINGREQ)))
            .await
            .unwrap();
        assert_eq!(server.read(&mut none).await.unwrap(), 0);
        let mut got = [0u8; 2];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, PINGREQ);
    }

    #[tokio::test]
    async fn writes_arrive_as_binary_messages() {
        let (mut server, mut client) = pair().await;
        server.write_all(&[0x20, 2, 0, 0]).await.unwrap();
        server.flush().await.unwrap();
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Binary(Bytes::from_static(&[0x20, 2, 0, 0]))
        );
        // A large write is split into bounded messages, in order.
        let big: Vec<u8> = (0..MAX_OUT_MESSAGE * 2 + 10).map(|i| i as u8).collect();
        let writer = async {
            server.write_all(&big).await.unwrap();
            server.flush().await.unwrap();
        };
        let reader = async {
            let mut got = Vec::new();
            while got.len() < big.len() {
                match client.next().await.unwrap().unwrap() {
                    Message::Binary(b) => {
                        assert!(b.len() <= MAX_OUT_MESSAGE);
                        got.extend_from_slice(&b);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            got
        };
        let ((), got) = tokio::join!(writer, reader);
        assert_eq!(got, big);
    }

    #[tokio::test]
    async fn text_message_is_a_protocol_error_and_closes() {
        let (mut server, mut client) = pair().await;
        client.send(Message::text("hello")).await.unwrap();
        let mut buf = [0u8; 8];
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        match client.next().await {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Unsupported),
            other => panic!("expected close, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn ping_is_answered_and_close_ends_the_stream() {
        let (mut server, mut client) = pair().await;
        client
            .send(Message::Ping(Bytes::from_static(b"hi")))
            .await
            .unwrap();
        client
            .send(Message::Binary(Bytes::from_static(PINGREQ)))
            .await
            .unwrap();
        let mut got = [0u8; 2];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, PINGREQ);
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Pong(Bytes::from_static(b"hi"))
        );
        client.close(None).await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(server.read(&mut buf).await.unwrap(), 0, "end of stream");
    }

    #[tokio::test]
    async fn wrong_path_is_404() {
        let (server, client) =
            connect(&WsConfig::default(), request("/other", Some("mqtt"), None)).await;
        assert!(server.is_err());
        match client {
            Err(WsError::Http(resp)) => assert_eq!(resp.status(), StatusCode::NOT_FOUND),
            other => panic!("expected HTTP error, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn missing_mqtt_subprotocol_is_400() {
        for protocol in [None, Some("chat, superchat")] {
            let (server, client) =
                connect(&WsConfig::default(), request("/mqtt", protocol, None)).await;
            assert!(server.is_err());
            match client {
                Err(WsError::Http(resp)) => {
                    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
                    let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
                        .into_owned();
                    assert!(body.contains("mqtt"), "{body}");
                }
                other => panic!("expected HTTP error, got {:?}", other.map(|_| ())),
            }
        }
    }

    #[tokio::test]
    async fn legacy_mqttv31_subprotocol_is_accepted() {
        let (server, client) = connect(
            &WsConfig::default(),
            request("/mqtt", Some("mqttv3.1"), None),
        )
        .await;
        assert!(server.is_ok());
        let (_, resp) = client.unwrap();
        assert_eq!(
            resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL).unwrap(),
            "mqttv3.1"
        );
    }

    #[tokio::test]
    async fn origin_outside_the_allow_list_is_403() {
        let cfg = WsConfig {
            allowed_origins: vec!["https://fleet.example.com".into()],
            ..WsConfig::default()
        };
        let (server, client) = connect(
            &cfg,
            request("/mqtt", Some("mqtt"), Some("https://evil.example")),
        )
        .await;
        assert!(server.is_err());
        match client {
            Err(WsError::Http(resp)) => assert_eq!(resp.status(), StatusCode::FORBIDDEN),
            other => panic!("expected HTTP error, got {:?}", other.map(|_| ())),
        }
        for origin in [Some("https://FLEET.example.com/"), None] {
            let (server, client) = connect(&cfg, request("/mqtt", Some("mqtt"), origin)).await;
            assert!(server.is_ok() && client.is_ok(), "{origin:?}");
        }
    }

    #[tokio::test]
    async fn oversized_message_is_refused() {
        let cfg = WsConfig {
            max_message_size: 1024,
            ..WsConfig::default()
        };
        let (server, client) = connect(&cfg, request("/mqtt", Some("mqtt"), None)).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap().0);
        client
            .send(Message::Binary(vec![0u8; 4096].into()))
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        assert!(server.read(&mut buf).await.is_err());
    }

    #[test]
    fn ws_config_defaults() {
        let c: WsConfig = toml::from_str("allowed_origins = [\"https://a\"]").unwrap();
        assert_eq!(c.path, "/mqtt");
        assert_eq!(c.max_message_size, 1024 * 1024);
        assert!(toml::from_str::<WsConfig>("pth = \"/x\"").is_err());
    }
}
