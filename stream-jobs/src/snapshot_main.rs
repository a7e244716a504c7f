//! `fleet-snapshot`: publishes a per-second binary snapshot of the whole fleet
//! for map viewers. See stream-jobs/README.md.

use clap::Parser;
use stream_jobs::signal::{init_logging, shutdown_on_signal};
use stream_jobs::snapshot_job::{run, Args};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    run(args, shutdown_on_signal()).await
}
