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
use ui::{router_with, Config, Extras};

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
    /// MQTT topic of the binary all-trucks snapshot.
    #[arg(
        long,
        env = "LODESTREAM_UI_SNAPSHOT_TOPIC",
        default_value = "fleet/stats/snapshot"
    )]
    snapshot_topic: String,
    /// MQTT topic of the snapshot's plate directory.
    #[arg(
        long,
        env = "LODESTREAM_UI_PLATES_TOPIC",
        default_value = "fleet/stats/plates"
    )]
    plates_topic: String,
    /// Roads GeoJSON to draw under the trucks (routing/make_roads_geojson.py).
    #[arg(long, env = "LODESTREAM_UI_ROADS")]
    roads: Option<PathBuf>,
    /// Brokers' Prometheus endpoints for the throughput panel (comma-separated).
    #[arg(long, env = "LODESTREAM_UI_METRICS_URLS", value_delimiter = ',')]
    metrics_url: Vec<String>,
    /// How often the brokers' metrics are scraped.
    #[arg(long, env = "LODESTREAM_UI_SCRAPE_SECS", default_value_t = 2)]
    scrape_secs: u64,
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
        snapshot_topic: args.snapshot_topic,
        plates_topic: args.plates_topic,
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
    if let Some(r) = args.roads.as_ref().filter(|r| !r.is_file()) {
        tracing::warn!(roads = %r.display(), "roads file missing: the map shows no roads");
    }
    let extras = Extras {
        roads: args.roads,
        ..Extras::default()
    };
    let urls: Vec<String> = args
        .metrics_url
        .into_iter()
        .filter(|u| !u.is_empty())
        .collect();
    if !urls.is_empty() {
        let every = std::time::Duration::from_secs(args.scrape_secs.max(1));
        tokio::spawn(ui::scrape::run(urls, every, extras.throughput.clone()));
    }
    let app = router_with(config, &args.static_dir, extras);
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
