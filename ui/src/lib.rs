//! Router of the `ui` binary, in a library so tests can drive it in-process.

pub mod scrape;
pub mod throughput;

use std::path::{Path, PathBuf};

use askama::Template;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tower_http::compression::CompressionLayer;
use tower_http::services::{ServeDir, ServeFile};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

/// static/ next to this crate, so `cargo run -p ui` works from the checkout.
pub const DEFAULT_STATIC_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../static");

/// Runtime configuration handed to the page. Everything here is public: it is
/// embedded in HTML that any visitor can read, which is why the MQTT identity
/// must be one the broker only allows to subscribe.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub mqtt_url: String,
    pub mqtt_username: String,
    pub mqtt_password: String,
    pub topic_prefix: String,
    pub stats_topic: String,
    /// Binary all-trucks snapshot, once a second (`fleet-snapshot` job).
    pub snapshot_topic: String,
    /// Plate directory of the snapshot's slots.
    pub plates_topic: String,
    pub follow: u32,
    pub tiles: Option<String>,
}

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage<'a> {
    config: &'a Config,
}

async fn index(config: Config) -> Response {
    match (IndexPage { config: &config }).render() {
        Ok(html) => (
            // The page carries the configuration: never serve a stale one.
            [(header::CACHE_CONTROL, "no-cache")],
            Html(html),
        )
            .into_response(),
        Err(err) => {
            tracing::error!(%err, "rendering index");
            (StatusCode::INTERNAL_SERVER_ERROR, "template error").into_response()
        }
    }
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

/// What the server adds to the static page, beyond its configuration.
#[derive(Clone, Debug, Default)]
pub struct Extras {
    /// Roads GeoJSON drawn under the trucks (made at data-prepare time from
    /// the road data OSRM routes on), served at `/data/roads.geojson`.
    pub roads: Option<PathBuf>,
    /// Latest broker throughput, served at `/throughput.json`.
    pub throughput: scrape::Shared,
}

pub fn router(config: Config, static_dir: &Path) -> Router {
    router_with(config, static_dir, Extras::default())
}

pub fn router_with(config: Config, static_dir: &Path, extras: Extras) -> Router {
    let cfg_index = config.clone();
    let tp = extras.throughput.clone();
    let mut r = Router::new()
        .route("/", get(move || index(cfg_index.clone())))
        .route("/healthz", get(|| async { Json(Health { status: "ok" }) }))
        .route(
            "/config.json",
            get(move || async move { Json(config.clone()) }),
        )
        .route(
            "/throughput.json",
            get(move || async move {
                let t = tp.read().map(|t| t.clone()).unwrap_or_default();
                Json(t)
            }),
        )
        .nest_service("/static", ServeDir::new(static_dir));
    r = match extras.roads {
        Some(path) => r.route_service("/data/roads.geojson", ServeFile::new(path)),
        // 404 with a reason: the page then draws no roads and says why.
        None => r.route(
            "/data/roads.geojson",
            get(|| async { (StatusCode::NOT_FOUND, "no roads file configured (--roads)") }),
        ),
    };
    r
        // The roads GeoJSON is several MB of text: gzip shrinks it ~5x.
        .layer(CompressionLayer::new())
        // Revalidate every asset (cheap 304s): app.js and the generated data
        // change between builds and have no hashed file names.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(TraceLayer::new_for_http())
}
