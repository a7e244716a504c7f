//! MQTT side: one rumqttc connection per truck, driven with reconnects and
//! exponential backoff.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rand::{Rng, SeedableRng as _};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::watch;

use crate::stats::Stats;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportKind {
    /// Plain MQTT over TCP.
    Tcp,
    /// MQTT over WebSocket (ws://host:port/path).
    Ws,
    /// MQTT over TLS.
    Tls,
    /// MQTT over WebSocket over TLS (wss://host:port/path).
    Wss,
}

/// PEM client certificate and private key.
pub type ClientCertKey = (Vec<u8>, Vec<u8>);

/// Everything needed to open a truck's connection.
#[derive(Clone)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub transport: TransportKind,
    pub ws_path: String,
    pub credentials: Option<(String, String)>,
    /// PEM CA bundle for TLS; `None` = the system's root certificates.
    pub tls_ca: Option<Vec<u8>>,
    /// PEM client certificate and key for mutual TLS.
    pub tls_client: Option<ClientCertKey>,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl MqttSettings {
    pub fn load_tls(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> anyhow::Result<(Option<Vec<u8>>, Option<ClientCertKey>)> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))
        };
        let ca = ca.map(read).transpose()?;
        let client = match (cert, key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => anyhow::bail!("--tls-client-cert and --tls-client-key go together"),
        };
        Ok((ca, client))
    }

    fn tls_config(&self) -> Option<TlsConfiguration> {
        self.tls_ca.as_ref().map(|ca| TlsConfiguration::Simple {
            ca: ca.clone(),
            alpn: None,
            client_auth: self.tls_client.clone(),
        })
    }

    /// rumqttc options for one client.
    pub fn options(&self, client_id: &str) -> MqttOptions {
        #[cfg(feature = "websocket")]
        let ws_url = |scheme: &str| {
            let path = if self.ws_path.starts_with('/') {
                self.ws_path.clone()
            } else {
                format!("/{}", self.ws_path)
            };
            format!("{scheme}://{}:{}{path}", self.host, self.port)
        };
        let (broker, transport) = match self.transport {
            TransportKind::Tcp => (self.host.clone(), Transport::Tcp),
            TransportKind::Tls => (
                self.host.clone(),
                self.tls_config()
                    .map(Transport::tls_with_config)
                    .unwrap_or_else(Transport::tls_with_default_config),
            ),
            #[cfg(feature = "websocket")]
            TransportKind::Ws => (ws_url("ws"), Transport::Ws),
            #[cfg(feature = "websocket")]
            TransportKind::Wss => (
                ws_url("wss"),
                self.tls_config()
                    .map(Transport::wss_with_config)
                    .unwrap_or_else(Transport::wss_with_default_config),
            ),
            // Refused by `Args::validate` before any connection is made.
            #[cfg(not(feature = "websocket"))]
            TransportKind::Ws | TransportKind::Wss => (self.host.clone(), Transport::Tcp),
        };
        let mut o = MqttOptions::new(client_id, broker, self.port);
        o.set_transport(transport)
            .set_keep_alive(self.keep_alive)
            .set_clean_session(true)
            // Position updates are small; the broker sends us nothing but acks.
            .set_max_packet_size(16 * 1024, 16 * 1024)
            .set_inflight(16);
        if let Some((u, p)) = &self.credentials {
            o.set_credentials(u.clone(), p.clone());
        }
        o
    }

    /// Creates the client (request queue of `queue` packets) and its event loop.
    pub fn connect(&self, client_id: &str, queue: usize) -> (AsyncClient, EventLoop) {
        let (client, mut eventloop) = AsyncClient::new(self.options(client_id), queue);
        let mut net = eventloop.network_options();
        net.set_connection_timeout(self.connect_timeout.as_secs().max(1));
        eventloop.set_network_options(net);
        // rumqttc reserves a 100-event queue and a 10 KiB write buffer per
        // connection; a truck sends one small packet a second and receives
        // only acks, so let them grow on demand instead.
        eventloop.state.events = Default::default();
        eventloop.state.write = Default::default();
        (client, eventloop)
    }
}

/// Above this, an emptied write buffer is given back (see below).
const WRITE_BUFFER_KEEP: usize = 1024;

/// rumqttc keeps its write buffer at the largest packet it ever encoded: a
/// route-ahead message (up to 16 KiB) left ~9 KiB per truck, 131 MiB at 15,000
/// trucks, for packets of ~300 bytes a second. Each `poll` flushes what it
/// encoded, so between polls the buffer is empty and can be dropped.
fn release_write_buffer(eventloop: &mut EventLoop) {
    let write = &mut eventloop.state.write;
    if write.is_empty() && write.capacity() > WRITE_BUFFER_KEEP {
        *write = Default::default();
    }
}

/// Exponential backoff with ±25 % jitter: `min`, `2·min`, ... up to `max`.
pub fn backoff_delay<R: Rng>(attempt: u32, min: Duration, max: Duration, rng: &mut R) -> Duration {
    let base = min.as_secs_f64() * 2f64.powi(attempt.min(30) as i32);
    let capped = base.min(max.as_secs_f64());
    Duration::from_secs_f64(capped * rng.gen_range(0.75..=1.25))
}

/// Drives one connection until the truck disconnects: counts published packets,
/// reconnects with exponential backoff, and keeps `connected` up to date.
pub async fn drive_connection(
    mut eventloop: EventLoop,
    settings: Arc<MqttSettings>,
    connected: Arc<AtomicBool>,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
    plate: Arc<str>,
) {
    let mut rng = rand::rngs::SmallRng::from_entropy();
    let mut failures: u32 = 0;
    let set_connected = |up: bool| {
        if connected.swap(up, Relaxed) != up {
            stats
                .mqtt_connected
                .fetch_add(if up { 1 } else { -1 }, Relaxed);
        }
    };
    loop {
        // Not cancelled by `shutdown`: the truck sends DISCONNECT (or drops its
        // client) when it stops, and that ends this loop cleanly.
        let event = eventloop.poll().await;
        release_write_buffer(&mut eventloop);
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code == ConnectReturnCode::Success {
                    failures = 0;
                    stats.mqtt_connects.fetch_add(1, Relaxed);
                    set_connected(true);
                } else {
                    // The event loop reports refused CONNACKs as errors as well.
                    tracing::debug!(%plate, code = ?ack.code, "connection refused");
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                stats.msgs_published.fetch_add(1, Relaxed);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                set_connected(false);
                break;
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => break,
            Err(e) => {
                if *shutdown.borrow() {
                    break;
                }
                if connected.load(Relaxed) {
                    stats.mqtt_disconnects.fetch_add(1, Relaxed);
                    tracing::debug!(%plate, error = %e, "connection lost");
                } else {
                    let total = stats.mqtt_connect_failures.fetch_add(1, Relaxed) + 1;
                    // The first few failures of the fleet are worth seeing (wrong
                    // port, credentials, TLS); after that, metrics tell.
                    if total <= 5 {
                        tracing::warn!(%plate, error = %e, "MQTT connect failed");
                    } else if failures == 0 {
                        tracing::debug!(%plate, error = %e, "MQTT connect failed");
                    }
                }
                set_connected(false);
                let delay = backoff_delay(
                    failures,
                    settings.backoff_min,
                    settings.backoff_max,
                    &mut rng,
                );
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => break,
                }
            }
        }
    }
    set_connected(false);
}

pub fn qos_from_level(level: u8) -> anyhow::Result<QoS> {
    match level {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        _ => anyhow::bail!("--qos must be 0, 1 or 2"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;

    fn settings(transport: TransportKind) -> MqttSettings {
        MqttSettings {
            host: "broker.local".into(),
            port: 8883,
            transport,
            ws_path: "mqtt".into(),
            credentials: Some(("fleet".into(), "secret".into())),
            tls_ca: None,
            tls_client: None,
            keep_alive: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let mut rng = StdRng::seed_from_u64(1);
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        let d0 = backoff_delay(0, min, max, &mut rng).as_secs_f64();
        let d3 = backoff_delay(3, min, max, &mut rng).as_secs_f64();
        let d20 = backoff_delay(20, min, max, &mut rng).as_secs_f64();
        assert!((0.375..=0.625).contains(&d0), "{d0}");
        assert!((3.0..=5.0).contains(&d3), "{d3}");
        assert!((22.5..=37.5).contains(&d20), "{d20}");
        assert!(backoff_delay(u32::MAX, min, max, &mut rng) <= Duration::from_secs_f64(37.5));
    }

    #[test]
    fn tcp_options_carry_client_id_and_credentials() {
        let o = settings(TransportKind::Tcp).options("truck-AB123CD");
        assert_eq!(o.client_id(), "truck-AB123CD");
        assert_eq!(o.broker_address(), ("broker.local".to_string(), 8883));
        assert_eq!(o.credentials(), Some(("fleet".into(), "secret".into())));
        assert!(o.clean_session());
    }

    #[cfg(feature = "websocket")]
    #[test]
    fn websocket_options_use_a_url_with_path() {
        let o = settings(TransportKind::Ws).options("truck-AB123CD");
        assert_eq!(o.broker_address().0, "ws://broker.local:8883/mqtt");
        assert!(matches!(o.transport(), Transport::Ws));
        let o = settings(TransportKind::Wss).options("truck-AB123CD");
        assert_eq!(o.broker_address().0, "wss://broker.local:8883/mqtt");
        assert!(matches!(o.transport(), Transport::Wss(_)));
    }

    #[test]
    fn tls_options_use_the_given_ca() {
        let mut s = settings(TransportKind::Tls);
        s.tls_ca = Some(b"-----BEGIN CERTIFICATE-----".to_vec());
        let o = s.options("truck-AB123CD");
        assert!(matches!(
            o.transport(),
            Transport::Tls(TlsConfiguration::Simple { .. })
        ));
    }

    #[test]
    fn qos_levels_map_and_reject_invalid() {
        assert_eq!(qos_from_level(0).unwrap(), QoS::AtMostOnce);
        assert_eq!(qos_from_level(1).unwrap(), QoS::AtLeastOnce);
        assert!(qos_from_level(3).is_err());
    }
}
