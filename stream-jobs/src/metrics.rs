//! Prometheus metrics of the `directions` job, served on `GET /metrics`
//! (`--metrics-addr`, off when empty). Names start with `directions_`.
//!
//! - `directions_records_in_total{stage}`: records consumed (aggregate:
//!   positions, merge: partials), `directions_records_invalid_total`:
//!   positions that could not be parsed;
//! - `directions_records_out_total{topic}`: records Kafka acknowledged
//!   (`partials`, `stats`), `directions_publish_errors_total`;
//! - `directions_consumer_lag{stage}`: records behind the end of the
//!   assigned partitions (librdkafka statistics, every 5 s);
//! - `directions_trucks`: trucks in this instance's window;
//! - `directions_snapshot_age_seconds`: time since the last fleet stats
//!   snapshot was acknowledged by Kafka (-1 before the first one; only the
//!   active merge instance publishes, standbys keep growing);
//! - `directions_merge_active`: 1 on the instance whose merge stage publishes.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::window::now_ms;

pub struct JobMetrics {
    registry: Registry,
    pub records_in: IntCounterVec,
    pub records_invalid: IntCounter,
    pub records_out: IntCounterVec,
    pub publish_errors: IntCounter,
    pub consumer_lag: IntGaugeVec,
    pub trucks: IntGauge,
    pub merge_active: IntGauge,
    snapshot_age: prometheus::Gauge,
    /// Wall-clock ms of the last acknowledged stats snapshot; 0 = none yet.
    last_snapshot_ms: AtomicI64,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    // Names are fixed at compile time: a failure here is a programming error
    // that every test run hits.
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric registration: {e}"));
    c
}

impl JobMetrics {
    pub fn new() -> Arc<JobMetrics> {
        let r = Registry::new();
        let opts = |n: &str, h: &str| Opts::new(n, h);
        let fail = |e: prometheus::Error| -> ! { panic!("metric definition: {e}") };
        let m = JobMetrics {
            records_in: register(
                &r,
                IntCounterVec::new(
                    opts("directions_records_in_total", "Records consumed, by stage"),
                    &["stage"],
                )
                .unwrap_or_else(|e| fail(e)),
            ),
            records_invalid: register(
                &r,
                IntCounter::new(
                    "directions_records_invalid_total",
                    "Position records that could not be parsed",
                )
                .unwrap_or_else(|e| fail(e)),
            ),
            records_out: register(
                &r,
                IntCounterVec::new(
                    opts(
                        "directions_records_out_total",
                        "Records acknowledged by Kafka, by kind (partials, stats)",
                    ),
                    &["topic"],
                )
                .unwrap_or_else(|e| fail(e)),
            ),
            publish_errors: register(
                &r,
                IntCounter::new(
                    "directions_publish_errors_total",
                    "Records Kafka did not acknowledge",
                )
                .unwrap_or_else(|e| fail(e)),
            ),
            consumer_lag: register(
                &r,
                IntGaugeVec::new(
                    opts(
                        "directions_consumer_lag",
                        "Records behind the end of the assigned partitions, by stage",
                    ),
                    &["stage"],
                )
                .unwrap_or_else(|e| fail(e)),
            ),
            trucks: register(
                &r,
                IntGauge::new("directions_trucks", "Trucks in this instance's window")
                    .unwrap_or_else(|e| fail(e)),
            ),
            merge_active: register(
                &r,
                IntGauge::new(
                    "directions_merge_active",
                    "1 when this instance's merge stage publishes the stats",
                )
                .unwrap_or_else(|e| fail(e)),
            ),
            snapshot_age: register(
                &r,
                prometheus::Gauge::new(
                    "directions_snapshot_age_seconds",
                    "Seconds since the last stats snapshot Kafka acknowledged (-1: none yet)",
                )
                .unwrap_or_else(|e| fail(e)),
            ),
            last_snapshot_ms: AtomicI64::new(0),
            registry: r,
        };
        Arc::new(m)
    }

    pub fn snapshot_acked(&self) {
        self.last_snapshot_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Text exposition, with the snapshot age computed now.
    pub fn render(&self) -> String {
        let last = self.last_snapshot_ms.load(Ordering::Relaxed);
        self.snapshot_age.set(if last == 0 {
            -1.0
        } else {
            (now_ms() - last).max(0) as f64 / 1000.0
        });
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Sets `directions_consumer_lag{stage}` from librdkafka's statistics
    /// (emitted every `statistics.interval.ms` on the consumer).
    pub fn observe_lag(&self, stage: &str, stats: &rdkafka::Statistics) {
        self.consumer_lag
            .with_label_values(&[stage])
            .set(lag_of(stats));
    }
}

/// Sum of the consumer lag of the partitions this consumer fetches;
/// librdkafka reports -1 for partitions it does not (yet) know a lag of.
pub fn lag_of(stats: &rdkafka::Statistics) -> i64 {
    stats
        .topics
        .values()
        .flat_map(|t| t.partitions.values())
        .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
        .map(|p| p.consumer_lag)
        .sum()
}

/// Serves `/metrics` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<JobMetrics>) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    m.render(),
                )
            }
        }),
    );
    if let Err(err) = axum::serve(listener, app).await {
        tracing::warn!(%err, "metrics endpoint stopped");
    }
}
