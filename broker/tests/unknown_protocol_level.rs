//! Issue #13 item 3: a CONNECT with a protocol level the broker does not
//! speak [MQTT-3.1.2-2]. Levels above 5 get the MQTT 5 CONNACK with 0x84
//! (Unsupported Protocol Version); other unknown levels get the 3.1.1
//! CONNACK with return code 1. Either way the server then closes the
//! connection. docs/conformance.md ("Choices") gives the reasons.
//!
//! Exact bytes on the wire: a real client cannot be made to send level 6.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A CONNECT with protocol `name` and `level`, clean start, keep alive 30,
/// client id "x"; an MQTT 5 style property length byte when `v5_props`.
fn connect_bytes(name: &[u8], level: u8, v5_props: bool) -> Vec<u8> {
    let mut body = vec![0, name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(&[level, 0x02, 0, 30]);
    if v5_props {
        body.push(0);
    }
    body.extend_from_slice(&[0, 1, b'x']);
    let mut p = vec![0x10, body.len() as u8];
    p.extend_from_slice(&body);
    p
}

/// Everything the server sends after `connect` until it closes the
/// connection (panics if it does not close within 10 s).
async fn answer_to(addr: std::net::SocketAddr, connect: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(connect).await.expect("write CONNECT");
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    match read {
        Ok(Ok(_)) => got,
        // A reset after the CONNACK still counts as a close; keep what came.
        Ok(Err(_)) => got,
        Err(_) => panic!("server did not close after the refusal; sent {got:02x?}"),
    }
}

/// [MQTT-3.1.2-2] levels 6, 7 and 255 ("MQTT"): CONNACK in MQTT 5 format,
/// reason 0x84, no properties; then the server closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn level_above_5_gets_v5_connack_0x84_then_close() {
    let b = common::start(&[]).await;
    for level in [6u8, 7, 255] {
        for v5_props in [true, false] {
            let got = answer_to(b.addr(), &connect_bytes(b"MQTT", level, v5_props)).await;
            assert_eq!(
                got,
                [0x20, 0x03, 0x00, 0x84, 0x00],
                "level {level} (property length byte: {v5_props})"
            );
        }
    }
}

/// [MQTT-3.1.2-2] (3.1.1 [MQTT-3.1.2-2] too) unknown levels below 5, and
/// the 3.1 name with another level: the 3.1.1 CONNACK with return code 1,
/// then close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn level_below_5_unknown_gets_v311_connack_code_1_then_close() {
    let b = common::start(&[]).await;
    for (name, level) in [
        (&b"MQTT"[..], 0u8),
        (&b"MQTT"[..], 1),
        (&b"MQTT"[..], 2),
        (&b"MQTT"[..], 3),
        (&b"MQIsdp"[..], 4),
    ] {
        let got = answer_to(b.addr(), &connect_bytes(name, level, false)).await;
        assert_eq!(
            got,
            [0x20, 0x02, 0x00, 0x01],
            "{} level {level}",
            String::from_utf8_lossy(name)
        );
    }
}

/// The supported levels still connect (3.1, 3.1.1, 5), so the refusal
/// above is about the level alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supported_levels_still_connect() {
    let b = common::start(&[]).await;
    for (name, level, v5) in [
        (&b"MQIsdp"[..], 3u8, false),
        (&b"MQTT"[..], 4, false),
        (&b"MQTT"[..], 5, true),
    ] {
        let mut s = TcpStream::connect(b.addr()).await.expect("connect");
        s.write_all(&connect_bytes(name, level, v5)).await.unwrap();
        let mut head = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
            .await
            .expect("CONNACK in time")
            .expect("CONNACK");
        assert_eq!(head[0], 0x20, "level {level}: CONNACK");
        assert_eq!(head[3], 0x00, "level {level}: accepted");
    }
}
