//! Listeners: accept loops that hand each stream to `connection::serve`,
//! and the HTTP endpoint for metrics and health.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::connection;
use crate::node::Node;
use crate::transport::{ws, PeerCert, Transport};

/// Binds an MQTT listener (TCP, TLS, WebSocket); port 0 allowed.
pub async fn bind_tcp(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for MQTT on {addr}"))
}

/// Binds the metrics/health HTTP listener; port 0 allowed. Its own error
/// message: a taken metrics port must not read as an MQTT port problem.
pub async fn bind_http(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics/health HTTP on {addr}"))
}

/// Accepts connections on one listener and serves each with the
/// listener's transport. TLS and WebSocket handshakes run in the
/// connection's own task, bounded by the CONNECT timeout, so a slow
/// handshake never blocks the accept loop.
pub async fn run_listener(node: Arc<Node>, listener: TcpListener, transport: Transport) {
    let mut shutdown = node.shutting_down();
    // Accept errors are logged at most every 10 s (with how many there were),
    // not at the 10 per second the back-off allows; the counter has them all.
    let mut failures_unlogged = 0u64;
    let mut last_log: Option<std::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handshake(node.clone(), stream, peer, transport));
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning; existing
                // connections keep working.
                failures_unlogged += 1;
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(error = %e, failures = failures_unlogged, "accept failed (new connections wait; existing ones are served)");
                    failures_unlogged = 0;
                    last_log = Some(std::time::Instant::now());
                }
                node.metrics()
                    .connect_rejected
                    .with_label_values(&["accept_error"])
                    .inc();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Runs a connection from its first byte. A task's future is as large as
/// its largest state, for the connection's whole life: each transport's
/// path is boxed, so a connection holds its own transport's state only,
/// and handshakes (PROXY header, TLS, WebSocket upgrade) are boxed within
/// them, so it does not hold theirs once they are done.
async fn handshake(node: Arc<Node>, mut stream: TcpStream, peer: SocketAddr, transport: Transport) {
    let peer = if node.config().listeners.proxy_protocol {
        match Box::pin(proxied_peer(&node, &mut stream, peer)).await {
            Some(p) => p,
            None => return,
        }
    } else {
        peer
    };
    match transport {
        Transport::Tcp => Box::pin(connection::serve(node, stream, peer, transport, None)).await,
        Transport::Ws => Box::pin(serve_ws(node, stream, peer, transport, None)).await,
        Transport::Tls | Transport::Wss => Box::pin(serve_tls(node, stream, peer, transport)).await,
    }
}

/// The client's address from a PROXY protocol header; `None` (counted) if
/// there is none in time.
async fn proxied_peer(node: &Node, stream: &mut TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
    let e = match tokio::time::timeout(
        handshake_limit(node),
        crate::transport::proxy::read_header(stream),
    )
    .await
    {
        // `None`: the balancer's own connection (health check) keeps its address.
        Ok(Ok(client)) => return Some(client.unwrap_or(peer)),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timeout".to_string(),
    };
    handshake_failed(node, peer, "proxy_header", e);
    None
}

async fn serve_tls(node: Arc<Node>, stream: TcpStream, peer: SocketAddr, transport: Transport) {
    let Some(tls) = node.tls() else { return };
    // Boxed: the handshake's state is not kept beside the connection's.
    let (s, pc) = match Box::pin(tokio::time::timeout(
        handshake_limit(&node),
        tls.accept(stream),
    ))
    .await
    {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return handshake_failed(&node, peer, "tls_handshake", e.to_string()),
        Err(_) => return handshake_failed(&node, peer, "tls_handshake", "timeout".into()),
    };
    let id = pc.and_then(|c: PeerCert| c.identity(node.config().auth.cert_identity));
    if transport == Transport::Tls {
        connection::serve(node, s, peer, transport, id).await
    } else {
        serve_ws(node, s, peer, transport, id).await
    }
}

async fn serve_ws<S>(
    node: Arc<Node>,
    stream: S,
    peer: SocketAddr,
    transport: Transport,
    id: Option<String>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Boxed: the upgrade's state is not kept beside the connection's.
    match Box::pin(tokio::time::timeout(
        handshake_limit(&node),
        ws::accept(stream, &node.config().ws),
    ))
    .await
    {
        Ok(Ok(s)) => connection::serve(node, s, peer, transport, id).await,
        Ok(Err(e)) => handshake_failed(&node, peer, "ws_upgrade", e.to_string()),
        Err(_) => handshake_failed(&node, peer, "ws_upgrade", "timeout".into()),
    }
}

/// Each handshake step (PROXY header, TLS, WebSocket upgrade) is bounded by
/// the CONNECT timeout.
fn handshake_limit(node: &Node) -> Duration {
    Duration::from_secs(node.config().mqtt.connect_timeout_s)
}

fn handshake_failed(node: &Node, peer: SocketAddr, what: &str, e: String) {
    tracing::debug!(%peer, error = %e, "{what} failed");
    node.metrics()
        .connect_rejected
        .with_label_values(&[what])
        .inc();
}

/// A deliberately tiny HTTP/1.1 responder for `/metrics`, `/health` and
/// `/ready`: three fixed GET routes do not justify a web framework here.
pub async fn run_http(node: Arc<Node>, listener: TcpListener) {
    let mut shutdown = node.shutting_down();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), http_one(node, stream)).await;
        });
    }
}

async fn http_one(node: Arc<Node>, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        let r = stream.read(&mut buf[n..]).await?;
        if r == 0 {
            break;
        }
        n += r;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let path = head
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("GET "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("");
    let (status, ctype, body) = match path {
        "/metrics" => {
            node.metrics().refresh(node.retained().len());
            (
                "200 OK",
                "text/plain; version=0.0.4",
                node.metrics().render(),
            )
        }
        "/health" => ("200 OK", "text/plain", "ok\n".to_string()),
        "/ready" => {
            if kafka_reachable(&node).await {
                ("200 OK", "text/plain", "ready\n".to_string())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "kafka unreachable\n".to_string(),
                )
            }
        }
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

async fn kafka_reachable(node: &Arc<Node>) -> bool {
    node.kafka_reachable().await
}

/// Local address helper for tests and logs.
pub fn local_addr(l: &TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}
