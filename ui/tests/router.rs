//! In-process HTTP tests of the ui router (no sockets, no browser).

use std::path::PathBuf;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use ui::Config;

fn config() -> Config {
    Config {
        mqtt_url: "ws://example.test:8083/mqtt".into(),
        mqtt_username: "viewer".into(),
        // Hostile value: must not be able to close the <script> element.
        mqtt_password: "</script><script>alert(1)</script>".into(),
        topic_prefix: "trucks/".into(),
        stats_topic: "fleet/stats/directions".into(),
        snapshot_topic: "fleet/stats/snapshot".into(),
        plates_topic: "fleet/stats/plates".into(),
        follow: 15,
        tiles: None,
    }
}

fn static_dir() -> PathBuf {
    PathBuf::from(ui::DEFAULT_STATIC_DIR)
}

async fn get(path: &str) -> (StatusCode, Option<String>, String) {
    get_with(ui::Extras::default(), path).await
}

async fn get_with(extras: ui::Extras, path: &str) -> (StatusCode, Option<String>, String) {
    let resp = ui::router_with(config(), &static_dir(), extras)
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ctype, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn index_injects_config_safely() {
    let (status, ctype, body) = get("/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(ctype.unwrap().starts_with("text/html"));
    assert!(body.contains(r#"<script id="lodestream-config" type="application/json">"#));
    assert!(body.contains("ws://example.test:8083/mqtt"));
    assert!(body.contains(r#""follow":15"#));
    assert!(
        !body.contains("</script><script>alert(1)"),
        "config must be escaped"
    );
    assert_eq!(
        body.matches("</script>").count(),
        2,
        "only the two real script elements"
    );
    assert!(body.contains(r#"src="/static/app.js""#));
}

#[tokio::test]
async fn healthz() {
    let (status, _, body) = get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, r#"{"status":"ok"}"#);
}

#[tokio::test]
async fn serves_static_modules_as_javascript() {
    let (status, ctype, body) = get("/static/app.js").await;
    assert_eq!(status, StatusCode::OK);
    // Browsers refuse ES modules served with a non-JavaScript MIME type.
    assert!(ctype.unwrap().contains("javascript"));
    assert!(body.contains("__lodestream"));
    let (status, _, _) = get("/static/nope.js").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = get("/static/../Cargo.toml").await;
    assert_ne!(status, StatusCode::OK, "no path traversal out of static/");
    if static_dir()
        .join("vendor/maplibre-gl/maplibre-gl-worker.mjs")
        .is_file()
    {
        let (status, ctype, _) = get("/static/vendor/maplibre-gl/maplibre-gl-worker.mjs").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            ctype.unwrap().contains("javascript"),
            ".mjs must be JavaScript"
        );
    } else {
        println!("static/vendor not built (npm run build): skipping the .mjs check");
    }
}

#[tokio::test]
async fn throughput_json_serves_the_latest_scrape() {
    let extras = ui::Extras::default();
    if let Ok(mut t) = extras.throughput.write() {
        t.mqtt_in_per_s = 15_000.0;
        t.nodes = 2;
        t.nodes_up = 2;
    }
    let (status, _, body) = get_with(extras, "/throughput.json").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["mqtt_in_per_s"], 15_000.0);
    assert_eq!(v["nodes_up"], 2);
    for k in [
        "mqtt_out_per_s",
        "kafka_written_per_s",
        "kafka_read_per_s",
        "consumer_lag",
    ] {
        assert!(v.get(k).is_some(), "{k} missing");
    }
}

#[tokio::test]
async fn roads_are_served_from_the_configured_file_and_404_without_one() {
    let (status, _, body) = get("/data/roads.geojson").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("--roads"));
    let dir = std::env::temp_dir().join(format!("ui-roads-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("roads.geojson");
    std::fs::write(&file, r#"{"type":"FeatureCollection","features":[]}"#).unwrap();
    let extras = ui::Extras {
        roads: Some(file),
        ..Default::default()
    };
    let (status, _, body) = get_with(extras, "/data/roads.geojson").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("FeatureCollection"));
    std::fs::remove_dir_all(&dir).ok();
}
