//! HAProxy's PROXY protocol (v1 text, v2 binary) in front of any listener,
//! so that behind a load balancer the broker sees each client's own
//! address (failed-login limits, logs) instead of the balancer's.
//!
//! Reads exactly the header and nothing after it, so the stream can go on
//! to TLS, WebSocket or MQTT untouched. Parsing is `ppp`'s; this file only
//! frames the header on the socket and bounds it.

use std::net::SocketAddr;

use ppp::v2;
use ppp::HeaderResult;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

const V1_PREFIX: &[u8] = b"PROXY";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// The v1 specification's maximum line length.
const V1_MAX: usize = 107;
/// Address block plus TLVs accepted in a v2 header (HAProxy sends < 300).
const V2_MAX_PAYLOAD: usize = 2048;

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("PROXY header too long")]
    TooLong,
    #[error("invalid PROXY header: {0}")]
    Invalid(String),
    #[error("reading PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads a PROXY header from `s` and returns the client address it names:
/// `Some(addr)` for a proxied TCP connection, `None` for a v1 `UNKNOWN` or
/// v2 `LOCAL` connection (the balancer's own health check).
pub async fn read_header<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<Option<SocketAddr>, ProxyError> {
    let mut buf = vec![0u8; 5];
    s.read_exact(&mut buf).await?;
    if buf == V1_PREFIX {
        // One byte at a time up to CRLF: never reads past the header.
        loop {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            buf.push(b[0]);
            if buf.ends_with(b"\r\n") {
                break;
            }
            if buf.len() >= V1_MAX {
                return Err(ProxyError::TooLong);
            }
        }
    } else if V2_SIGNATURE.starts_with(&buf) {
        buf.resize(16, 0);
        s.read_exact(&mut buf[5..]).await?;
        if &buf[..12] != V2_SIGNATURE {
            return Err(ProxyError::Missing);
        }
        let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        if len > V2_MAX_PAYLOAD {
            return Err(ProxyError::TooLong);
        }
        buf.resize(16 + len, 0);
        s.read_exact(&mut buf[16..]).await?;
    } else {
        return Err(ProxyError::Missing);
    }
    source_of(&buf)
}

/// The client address in a complete header.
pub fn source_of(header: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            ppp::v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
            ppp::v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
            ppp::v1::Addresses::Unknown => None,
        }),
        HeaderResult::V2(Ok(h)) => Ok(match (h.command, h.addresses) {
            (v2::Command::Local, _) => None,
            (_, v2::Addresses::IPv4(a)) => Some((a.source_address, a.source_port).into()),
            (_, v2::Addresses::IPv6(a)) => Some((a.source_address, a.source_port).into()),
            (_, v2::Addresses::Unix(_) | v2::Addresses::Unspecified) => None,
        }),
        HeaderResult::V1(Err(e)) => Err(ProxyError::Invalid(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(ProxyError::Invalid(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
        let mut s = bytes;
        let r = read_header(&mut s).await;
        (r, s.to_vec())
    }

    #[tokio::test]
    async fn v1_tcp4_names_the_client_and_leaves_the_rest() {
        let (r, rest) = read(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 1883\r\n\x10\x0c").await;
        assert_eq!(r.unwrap(), Some("203.0.113.7:51000".parse().unwrap()));
        assert_eq!(rest, b"\x10\x0c", "MQTT bytes after the header untouched");
    }

    #[tokio::test]
    async fn v1_tcp6_and_unknown() {
        let (r, _) = read(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 1883\r\n").await;
        assert_eq!(r.unwrap(), Some("[2001:db8::1]:4000".parse().unwrap()));
        let (r, _) = read(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(r.unwrap(), None);
    }

    fn v2(command: u8, addr: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(0x11); // TCP over IPv4
        h.extend((addr.len() as u16).to_be_bytes());
        h.extend(addr);
        h
    }

    #[tokio::test]
    async fn v2_proxy_and_local() {
        let addr = [198, 51, 100, 9, 10, 0, 0, 1, 0x1f, 0x90, 0x07, 0x5b];
        let mut bytes = v2(1, &addr);
        bytes.push(0x10);
        let (r, rest) = read(&bytes).await;
        assert_eq!(r.unwrap(), Some("198.51.100.9:8080".parse().unwrap()));
        assert_eq!(rest, [0x10]);
        let (r, _) = read(&v2(0, &addr)).await;
        assert_eq!(r.unwrap(), None, "LOCAL: the balancer's own connection");
    }

    #[tokio::test]
    async fn missing_oversize_and_garbage_are_refused() {
        assert!(matches!(
            read(b"\x10\x0c\x00\x04MQTT").await.0,
            Err(ProxyError::Missing)
        ));
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(read(&long).await.0, Err(ProxyError::TooLong)));
        assert!(matches!(
            read(b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n").await.0,
            Err(ProxyError::Invalid(_))
        ));
        assert!(read(b"PROX").await.0.is_err(), "closed before a header");
    }
}
