//! `directions`: publishes live fleet direction statistics to Kafka.
//! See stream-jobs/README.md for the semantics.

use clap::Parser;
use stream_jobs::directions::{run, Args};
use stream_jobs::signal::wait_for_signal;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        // Receivers gone means the job already ended; nothing to notify.
        let _ = tx.send(true);
    });
    run(args, rx).await
}
