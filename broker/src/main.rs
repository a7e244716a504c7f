//! `broker` binary: parses flags, loads configuration, runs a node until
//! SIGINT/SIGTERM, then shuts down gracefully.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use figment::providers::Serialized;
use lodestream_broker::{Config, Node};
use serde::Serialize;

/// Why not glibc's malloc: fan-out allocates a fetch's messages in a burst
/// (a few hundred at a time) and the subscribers' connections free them in
/// a burst; glibc's per-thread cache holds 7 chunks of a size, so nearly
/// every one went through its locked arena bins: 13 % of the read path's
/// profile at 16,000 msg/s, 4.5 % with mimalloc. Idle memory per connection
/// is the same (docs/benchmarks.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Flags serialize under the configuration's own key names and form its
/// last layer (after file and environment); a flag not given is skipped.
#[derive(Parser, Debug, Serialize)]
#[command(
    name = "broker",
    version,
    about = "Lodestream: a Kafka-native MQTT broker"
)]
struct Cli {
    #[command(subcommand)]
    #[serde(skip)]
    command: Option<Command>,
    /// TOML configuration file (see broker/broker.example.toml).
    #[arg(short, long, env = "LODESTREAM_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    #[command(flatten)]
    listeners: ListenerFlags,
    #[command(flatten)]
    kafka: KafkaFlags,
    /// Node id (overrides node_id).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    node_id: Option<String>,
    /// Seconds to wait for clients and Kafka on shutdown.
    #[arg(long, default_value_t = 10)]
    #[serde(skip)]
    shutdown_grace_s: u64,
}

#[derive(clap::Args, Debug, Serialize)]
struct ListenerFlags {
    /// MQTT/TCP listen address (overrides listeners.tcp; "" disables it).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp: Option<String>,
    /// Metrics/health listen address (overrides listeners.metrics; "" disables it).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<String>,
}

#[derive(clap::Args, Debug, Serialize)]
struct KafkaFlags {
    /// Kafka bootstrap servers (overrides kafka.bootstrap_servers).
    #[arg(long = "kafka")]
    #[serde(skip_serializing_if = "Option::is_none")]
    bootstrap_servers: Option<String>,
    /// Default Kafka topic (overrides kafka.default_topic).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    default_topic: Option<String>,
    /// Mapping rule `kafkaTopic:mqttPattern`; repeat for several, in order
    /// (replaces kafka.mappings).
    #[arg(long = "map")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    mappings: Vec<String>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Adds or replaces a user in a password file (argon2id). The password
    /// is read from standard input (first line) unless --password is given.
    Passwd {
        file: PathBuf,
        user: String,
        #[arg(long)]
        password: Option<String>,
    },
}

fn passwd(file: &std::path::Path, user: &str, password: Option<String>) -> anyhow::Result<()> {
    let password = match password {
        Some(p) => p,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from stdin")?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    anyhow::ensure!(!password.is_empty(), "empty password");
    lodestream_broker::auth::set_password(file, user, &password)?;
    eprintln!("user {user} set in {}", file.display());
    Ok(())
}

fn init_logs(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    if cfg.log.json {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> anyhow::Result<()> {
    // Set once the node runs: a worker about to sleep asks it whether to
    // pause first (wake-up coalescing, `kafka/wake_pause.rs`). Weak: the
    // node is dropped at the end of `run`, inside the runtime, as before.
    let node: Arc<OnceLock<Weak<Node>>> = Arc::default();
    let parked = node.clone();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(move || {
            if let Some(n) = parked.get().and_then(Weak::upgrade) {
                n.before_worker_sleeps();
            }
        })
        .build()
        .context("starting the runtime")?
        .block_on(run(node))
}

async fn run(node: Arc<OnceLock<Weak<Node>>>) -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Passwd {
        file,
        user,
        password,
    }) = cli.command
    {
        return passwd(&file, &user, password);
    }
    let cfg = Config::load(cli.config.as_deref(), Serialized::defaults(&cli))?;
    init_logs(&cfg);
    let running = lodestream_broker::start(cfg.validate()?)
        .await
        .context("broker failed to start")?;
    // Only ever set here.
    let _ = node.set(Arc::downgrade(&running.node));
    spawn_reload_on_sighup(running.node.clone());
    wait_for_signal().await;
    tracing::info!("shutting down");
    running
        .node
        .shutdown(Duration::from_secs(cli.shutdown_grace_s))
        .await;
    Ok(())
}

/// SIGHUP re-reads the password file, the rules file and the certificate.
fn spawn_reload_on_sighup(node: std::sync::Arc<lodestream_broker::Node>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let n = node.clone();
            match tokio::task::spawn_blocking(move || n.reload_security()).await {
                Ok(Ok(())) => tracing::info!("security settings reloaded"),
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "reload failed; keeping the previous settings")
                }
                Err(e) => tracing::error!(error = %e, "reload task failed"),
            }
        }
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
