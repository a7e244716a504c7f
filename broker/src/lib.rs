//! Lodestream broker: an MQTT 3.1.1/5.0 broker whose message store is Kafka.
//! See ARCHITECTURE.md for the data path.

pub mod config;
pub mod connection;
pub mod kafka;
pub mod mapping;
pub mod message;
pub mod metrics;
pub mod node;
pub mod registry;
pub mod retained;
pub mod server;
pub mod session;
pub mod session_record;
pub mod session_store;
pub mod subscriptions;

use std::sync::Arc;

pub use config::Config;
pub use node::Node;

/// A started broker: its node and the addresses it listens on.
pub struct Running {
    pub node: Arc<Node>,
    pub tcp: Option<std::net::SocketAddr>,
    pub metrics: Option<std::net::SocketAddr>,
}

/// Starts a node and its listeners in the current tokio runtime.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let tcp_addr = config.listeners.tcp.clone();
    let metrics_addr = config.listeners.metrics.clone();
    let node = Node::start(config).await?;
    let mut running = Running {
        node: node.clone(),
        tcp: None,
        metrics: None,
    };
    if !tcp_addr.is_empty() {
        let l = server::bind_tcp(&tcp_addr).await?;
        running.tcp = server::local_addr(&l);
        tokio::spawn(server::run_tcp(node.clone(), l));
    }
    if !metrics_addr.is_empty() {
        let l = server::bind_tcp(&metrics_addr).await?;
        running.metrics = server::local_addr(&l);
        tokio::spawn(server::run_http(node.clone(), l));
    }
    tracing::info!(node_id = %node.config.node_id, tcp = ?running.tcp, metrics = ?running.metrics, "broker started");
    Ok(running)
}
pub mod acl;
pub mod auth;
pub mod transport;
