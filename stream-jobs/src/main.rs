//! `directions`: publishes live fleet direction statistics to Kafka.
//! See stream-jobs/README.md for the semantics.

use clap::Parser;
use stream_jobs::directions::{run, Args};
use stream_jobs::signal::{init_logging, shutdown_on_signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    run(args, shutdown_on_signal()).await
}
