//! Lodestream broker: an MQTT 3.1.1/5.0 broker whose message store is Kafka.
//! See ARCHITECTURE.md for the data path.

pub mod clock;
pub mod config;
pub mod connection;
pub mod kafka;
pub mod key_template;
pub mod mapping;
pub mod message;
pub mod metrics;
pub mod node;
pub mod rate_limit;
pub mod replay;
pub mod retained;
pub mod retry;
pub mod server;
pub mod session;
pub mod shared_groups;
pub mod shared_progress;
pub mod subscriptions;
pub mod sys;

use std::sync::Arc;

pub use config::Config;
pub use node::Node;

/// A started broker: its node and the addresses it listens on.
pub struct Running {
    pub node: Arc<Node>,
    pub tcp: Option<std::net::SocketAddr>,
    pub tls: Option<std::net::SocketAddr>,
    pub ws: Option<std::net::SocketAddr>,
    pub wss: Option<std::net::SocketAddr>,
    pub metrics: Option<std::net::SocketAddr>,
}

/// Starts a node and its listeners in the current tokio runtime.
pub async fn start(config: config::Validated) -> anyhow::Result<Running> {
    let listeners = config.config.listeners.clone();
    let node = Node::start(config).await?;
    tokio::spawn(session::cluster::run(node.clone()));
    tokio::spawn(node::report_consumer_lag(node.clone()));
    tokio::spawn(sys::run(node.clone()));
    let mut running = Running {
        node: node.clone(),
        tcp: None,
        tls: None,
        ws: None,
        wss: None,
        metrics: None,
    };
    use transport::Transport;
    for (addr, transport) in [
        (&listeners.tcp, Transport::Tcp),
        (&listeners.tls, Transport::Tls),
        (&listeners.ws, Transport::Ws),
        (&listeners.wss, Transport::Wss),
    ] {
        let Some(addr) = addr else {
            continue;
        };
        let l = server::bind_tcp(*addr).await?;
        let bound = server::local_addr(&l);
        match transport {
            Transport::Tcp => running.tcp = bound,
            Transport::Tls => running.tls = bound,
            Transport::Ws => running.ws = bound,
            Transport::Wss => running.wss = bound,
        }
        tokio::spawn(server::run_listener(node.clone(), l, transport));
    }
    if let Some(addr) = listeners.metrics {
        let l = server::bind_http(addr).await?;
        running.metrics = server::local_addr(&l);
        tokio::spawn(server::run_http(node.clone(), l));
    }
    tracing::info!(node_id = %node.config().node_id, tcp = ?running.tcp, tls = ?running.tls, ws = ?running.ws, wss = ?running.wss, metrics = ?running.metrics, "broker started");
    Ok(running)
}
pub mod acl;
pub mod auth;
pub mod transport;
