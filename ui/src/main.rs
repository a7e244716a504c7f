//! `ui`: serves the fleet demo web page.
//!
//! The page itself is static (static/app.js); this server injects the
//! runtime configuration (broker WebSocket URL, read-only MQTT identity,
//! topics) through an askama template so one build of the assets works in
//! every deployment, and serves static/ (including the vendored MapLibre and
//! MQTT.js builds and the offline basemap GeoJSON).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use ui::{router, Config};

#[derive(Parser, Debug)]
#[command(name = "ui", version, about = "Lodestream fleet demo web UI")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "LODESTREAM_UI_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory with the front-end (app.js, vendor/, data/).
    #[arg(long, env = "LODESTREAM_UI_STATIC", default_value = ui::DEFAULT_STATIC_DIR)]
    static_dir: PathBuf,
    /// MQTT-over-WebSocket URL of the broker, as the browser must reach it.
    #[arg(
        long,
        env = "LODESTREAM_UI_MQTT_URL",
        default_value = "ws://localhost:8083/mqtt"
    )]
    mqtt_url: String,
    /// Read-only MQTT identity handed to every browser (it is public).
    #[arg(long, env = "LODESTREAM_UI_MQTT_USERNAME", default_value = "viewer")]
    mqtt_username: String,
    #[arg(long, env = "LODESTREAM_UI_MQTT_PASSWORD", default_value = "viewer")]
    mqtt_password: String,
    /// Prefix of the per-truck topics (the page subscribes `<prefix>+`).
    #[arg(long, env = "LODESTREAM_UI_TOPIC_PREFIX", default_value = "trucks/")]
    topic_prefix: String,
    /// MQTT topic with the direction statistics.
    #[arg(
        long,
        env = "LODESTREAM_UI_STATS_TOPIC",
        default_value = "fleet/stats/directions"
    )]
    stats_topic: String,
    /// How many trucks are followed with labelled markers.
    #[arg(long, env = "LODESTREAM_UI_FOLLOW", default_value_t = 15)]
    follow: u32,
    /// Optional raster tile URL template (online only), e.g.
    /// https://tile.openstreetmap.org/{z}/{x}/{y}.png; `?tiles=` overrides it.
    #[arg(long, env = "LODESTREAM_UI_TILES")]
    tiles: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,tower_http=info")),
        )
        .init();
    let args = Args::parse();
    let config = Config {
        mqtt_url: args.mqtt_url,
        mqtt_username: args.mqtt_username,
        mqtt_password: args.mqtt_password,
        topic_prefix: args.topic_prefix,
        stats_topic: args.stats_topic,
        follow: args.follow,
        tiles: args.tiles,
    };
    if !args
        .static_dir
        .join("vendor/maplibre-gl/maplibre-gl.mjs")
        .is_file()
    {
        // The server still starts (healthz works) but the map would be blank.
        tracing::warn!(
            dir = %args.static_dir.display(),
            "front-end not built: run `npm ci && npm run build && npm run regions` in static/"
        );
    }
    let app = router(config, &args.static_dir);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, static_dir = %args.static_dir.display(), "ui listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
