//! Byte-stream transports for MQTT besides plain TCP: TLS (optionally with
//! client certificates) and WebSocket. Each yields an `AsyncRead +
//! AsyncWrite` stream for `connection::serve`.

pub mod proxy;
pub mod tls;
pub mod ws;

pub use tls::{PeerCert, TlsAcceptor, TlsConfig, TlsError};
pub use ws::{WsConfig, WsStream};

/// How a client reached the broker; used as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    Tls,
    Ws,
    Wss,
}

impl Transport {
    /// Stable lowercase label (`tcp`, `tls`, `ws`, `wss`).
    pub fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }

    /// Whether the bytes are encrypted on the wire.
    pub fn is_encrypted(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_stable() {
        let all = [
            Transport::Tcp,
            Transport::Tls,
            Transport::Ws,
            Transport::Wss,
        ];
        let labels: Vec<_> = all.iter().map(|t| t.to_string()).collect();
        assert_eq!(labels, ["tcp", "tls", "ws", "wss"]);
        assert_eq!(all.map(Transport::is_encrypted), [false, true, false, true]);
    }
}
