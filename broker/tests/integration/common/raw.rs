//! A raw MQTT client over TCP for tests that need exact bytes: it speaks
//! through the project's codec, so it can send what real clients won't.
use std::time::Duration;

use bytes::BytesMut;
use lodestream_mqtt::{encode, Decoder, Packet, ProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    pub stream: TcpStream,
    pub buf: BytesMut,
    pub dec: Decoder,
    pub version: ProtocolVersion,
}

impl Raw {
    pub async fn connect(addr: std::net::SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut dec = Decoder::new(lodestream_mqtt::codec::MAX_PACKET_SIZE);
        dec.set_version(ProtocolVersion::V5);
        Raw {
            stream,
            buf: BytesMut::new(),
            dec,
            version: ProtocolVersion::V5,
        }
    }

    pub fn set_version(&mut self, v: ProtocolVersion) {
        self.version = v;
        self.dec.set_version(v);
    }

    pub async fn send(&mut self, p: &Packet) {
        if let Packet::Connect(c) = p {
            self.set_version(c.protocol);
        }
        let mut b = BytesMut::new();
        encode(p, self.version, &mut b).expect("encode");
        self.stream.write_all(&b).await.expect("write");
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        let _ = self.stream.write_all(b).await;
    }

    /// Next packet, or None when the server closed the connection
    /// (or nothing came within 10 s).
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(Duration::from_secs(10)).await
    }

    pub async fn recv_within(&mut self, t: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            if let Ok(Some(p)) = self.dec.decode(&mut self.buf) {
                return Some(p);
            }
            let r = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await;
            match r {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    /// True when the server closed the connection within `t`.
    pub async fn closed_within(&mut self, t: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let mut b = [0u8; 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}
