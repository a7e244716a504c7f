//! Issue #13 item 4: over WebSocket every server-initiated DISCONNECT
//! reaches the client before the connection closes, and the WebSocket close
//! frame follows the MQTT DISCONNECT instead of replacing it, under load
//! too: 0x93 (Receive Maximum exceeded by a flooding client), 0x95 (packet
//! too large), 0x8E (session taken over) and 0x8B (server shutting down).
//!
//! The client is Eclipse paho-mqtt 2.x with `transport="websockets"`
//! (`interop/paho_ws_disconnect.py`), which reports whether it saw the
//! broker's DISCONNECT packet; a raw WebSocket client checks the frame order.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use lodestream_mqtt::{encode, Connect, Packet, Properties, ProtocolVersion, Publish, QoS};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const RECEIVE_MAXIMUM: u16 = 8;
const MAX_PACKET_SIZE: u32 = 16 * 1024;

async fn broker() -> common::Broker {
    let mut c = common::test_config(&[]);
    c.mqtt.receive_maximum = RECEIVE_MAXIMUM;
    c.mqtt.max_packet_size = MAX_PACKET_SIZE;
    common::start_with(c).await
}

fn ws_port(b: &common::Broker) -> String {
    b.running.ws.expect("ws listener").port().to_string()
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/paho_ws_disconnect.py")
}

fn paho(port: &str, case: &str, client_id: &str) -> Child {
    Command::new("python3")
        .arg(script())
        .args([port, case, client_id])
        .kill_on_drop(true)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with paho-mqtt 2.x (pip install 'paho-mqtt==2.*')")
}

/// Waits for the script's "connected" line; returns the rest of its output
/// reader.
async fn connected(child: &mut Child) -> tokio::io::Lines<BufReader<tokio::process::ChildStdout>> {
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("paho connected within 20 s")
        .expect("stdout");
    assert_eq!(line.as_deref(), Some("connected"));
    lines
}

/// The script's verdict line (after `lines` or the whole output).
async fn verdict(child: Child) -> String {
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .expect("paho script finished within 90 s")
        .expect("paho script ran");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "paho script failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn rest(
    mut lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    child: Child,
) -> String {
    let mut out = String::new();
    while let Ok(Ok(Some(l))) =
        tokio::time::timeout(Duration::from_secs(90), lines.next_line()).await
    {
        out.push_str(&l);
        out.push('\n');
    }
    let status = tokio::time::timeout(Duration::from_secs(10), {
        let mut child = child;
        async move { child.wait().await }
    })
    .await
    .expect("paho script exited")
    .expect("paho script ran");
    assert!(status.success(), "paho script failed: {out}");
    out
}

fn expect_disconnect(out: &str, reason: u8, what: &str) {
    let want = format!("disconnect from_server=True reason={reason}");
    assert!(
        out.contains(&want),
        "{what}: paho did not get the DISCONNECT 0x{reason:02x} before the close: {out}"
    );
}

/// 0x93: paho (which does not apply the server's Receive Maximum) floods
/// QoS 1 PUBLISHes over WebSocket past it; staying within it is the
/// client's duty [MQTT-3.3.4-7] and the broker answers DISCONNECT 0x93 (MQTT
/// 5, 4.9 Flow Control), which paho must see. Five rounds: the flood races
/// the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_receive_maximum_exceeded_disconnect_0x93_arrives_before_the_close() {
    rounds_of("receive_max", 5, 0x93).await;
}

/// 0x95: a PUBLISH larger than the Maximum Packet Size, sent while the same
/// client floods QoS 0 messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_packet_too_large_disconnect_0x95_arrives_before_the_close() {
    rounds_of("too_large", 3, 0x95).await;
}

/// `rounds` runs of the paho script's `case`, each a new client on one
/// broker, each expecting DISCONNECT `reason`.
async fn rounds_of(case: &str, rounds: usize, reason: u8) {
    let b = broker().await;
    for round in 0..rounds {
        let id = common::unique(&format!("{case}-{round}"));
        let out = verdict(paho(&ws_port(&b), case, &id)).await;
        expect_disconnect(&out, reason, &format!("{case} round {round}"));
    }
}

/// 0x8E [MQTT-3.1.4-3]: a second connection with the same client id takes
/// the session over while the first one floods QoS 0 messages over WS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_takeover_disconnect_0x8e_arrives_before_the_close() {
    let b = broker().await;
    for round in 0..3 {
        let id = common::unique(&format!("taken-{round}"));
        let mut first = paho(&ws_port(&b), "wait", &id);
        let lines = connected(&mut first).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut second = common_raw_connect(b.addr(), &id).await;
        let out = rest(lines, first).await;
        expect_disconnect(&out, 0x8E, &format!("round {round}"));
        second.close().await;
    }
}

/// 0x8B: the node shuts down while a WS client floods QoS 0 messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_server_shutdown_disconnect_0x8b_arrives_before_the_close() {
    let b = broker().await;
    let id = common::unique("shutdown");
    let mut child = paho(&ws_port(&b), "wait", &id);
    let lines = connected(&mut child).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let node = b.node().clone();
    let stop = tokio::spawn(async move { node.shutdown(Duration::from_secs(5)).await });
    let out = rest(lines, child).await;
    expect_disconnect(&out, 0x8B, "shutdown");
    let _ = stop.await;
}

/// Frame order on the wire, seen by a raw WebSocket client that floods QoS
/// 1 PUBLISHes, one per WebSocket message, and reads only afterwards: the
/// flood is seen as over TCP (0x93, not only back-pressure), and the binary
/// messages end in the MQTT DISCONNECT 0x93 before the close frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_close_frame_follows_the_disconnect() {
    let b = broker().await;
    let url = format!("ws://127.0.0.1:{}/mqtt", ws_port(&b));
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("ws");
    ws.send(Message::Binary(
        packet(&Packet::Connect(Box::new(connect("frame-order")))).into(),
    ))
    .await
    .unwrap();
    // One PUBLISH per message, as browsers' and paho's clients send them,
    // far past Receive Maximum without waiting for a PUBACK.
    for id in 1..=200u16 {
        let p = packet(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "flood/frames".into(),
            packet_id: Some(id),
            payload: bytes::Bytes::from_static(b"x"),
            properties: Properties::default(),
        }));
        if ws.feed(Message::Binary(p.into())).await.is_err() {
            break;
        }
    }
    let _ = ws.flush().await;
    let mut bytes = Vec::new();
    let mut closed_by_frame = false;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
        match m {
            Ok(Message::Binary(b)) => bytes.extend_from_slice(&b),
            Ok(Message::Close(_)) => {
                closed_by_frame = true;
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("connection failed before a close frame: {e}; read {bytes:02x?}"),
        }
    }
    assert!(closed_by_frame, "no close frame; read {bytes:02x?}");
    let packets = decode_all(&bytes);
    match packets.last() {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason as u8, 0x93),
        other => panic!("last packet before the close frame: {other:?}"),
    }
}

fn connect(client_id: &str) -> Connect {
    Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 30,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

fn packet(p: &Packet) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode(p, ProtocolVersion::V5, &mut b).expect("encode");
    b.to_vec()
}

fn decode_all(bytes: &[u8]) -> Vec<Packet> {
    let mut dec = lodestream_mqtt::Decoder::new(lodestream_mqtt::codec::MAX_PACKET_SIZE);
    dec.set_version(ProtocolVersion::V5);
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Ok(Some(p)) = dec.decode(&mut buf) {
        out.push(p);
    }
    out
}

/// A second connection (raw MQTT 5 over TCP) with `client_id`.
async fn common_raw_connect(addr: std::net::SocketAddr, client_id: &str) -> RawConn {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(&packet(&Packet::Connect(Box::new(connect(client_id)))))
        .await
        .unwrap();
    let mut head = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    assert_eq!((head[0], head[3]), (0x20, 0x00), "take-over CONNACK");
    RawConn(s)
}

struct RawConn(tokio::net::TcpStream);

impl RawConn {
    async fn close(&mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.0.write_all(&[0xE0, 0x00]).await;
    }
}
