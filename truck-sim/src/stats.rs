//! Fleet-wide counters, the console progress line and the Prometheus text exposition.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Stats {
    pub trucks_target: AtomicU64,
    pub trucks_spawned: AtomicU64,
    pub trucks_driving: AtomicI64,
    pub trucks_resting: AtomicI64,
    pub arrivals: AtomicU64,
    /// Route-ahead messages (and clears) handed to the MQTT client.
    pub routes_published: AtomicU64,

    pub mqtt_connected: AtomicI64,
    pub mqtt_connects: AtomicU64,
    pub mqtt_connect_failures: AtomicU64,
    pub mqtt_disconnects: AtomicU64,
    pub msgs_published: AtomicU64,
    pub msgs_dropped: AtomicU64,

    pub route_requests: AtomicU64,
    pub route_ok: AtomicU64,
    pub route_errors: AtomicU64,
    pub route_no_route: AtomicU64,
    pub route_cache_hits: AtomicU64,
    pub route_in_flight: AtomicI64,
    pub route_queued: AtomicI64,
    pub route_latency_us_sum: AtomicU64,
    pub route_cache_entries: AtomicI64,
    pub route_cache_bytes: AtomicI64,
    /// Route points received from OSRM, and kept after simplification.
    pub route_points_received: AtomicU64,
    pub route_points_kept: AtomicU64,
    /// Length of the routes received, metres.
    pub route_length_m: AtomicU64,
}

/// A snapshot of the counters, for rates between two progress lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub msgs_published: u64,
    pub route_requests: u64,
    pub route_ok: u64,
    pub route_cache_hits: u64,
}

impl Stats {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            msgs_published: self.msgs_published.load(Relaxed),
            route_requests: self.route_requests.load(Relaxed),
            route_ok: self.route_ok.load(Relaxed),
            route_cache_hits: self.route_cache_hits.load(Relaxed),
        }
    }

    /// One console line with rates since `prev`, `elapsed` ago.
    pub fn progress_line(&self, prev: &Snapshot, elapsed: Duration) -> String {
        let now = self.snapshot();
        let secs = elapsed.as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        let lookups = now.route_requests.saturating_sub(prev.route_requests);
        let hits = now.route_cache_hits.saturating_sub(prev.route_cache_hits);
        format!(
            "trucks {}/{} (driving {}, resting {}) | mqtt connected {} | msgs/s {:.0} | \
             routes/s {:.1} (cache hit {:.0}%) in flight {} queued {} | route errors {} no-route {} | dropped {}",
            self.trucks_spawned.load(Relaxed),
            self.trucks_target.load(Relaxed),
            self.trucks_driving.load(Relaxed),
            self.trucks_resting.load(Relaxed),
            self.mqtt_connected.load(Relaxed),
            rate(now.msgs_published, prev.msgs_published),
            rate(now.route_ok, prev.route_ok),
            if lookups == 0 { 0.0 } else { 100.0 * hits as f64 / lookups as f64 },
            self.route_in_flight.load(Relaxed),
            self.route_queued.load(Relaxed),
            self.route_errors.load(Relaxed),
            self.route_no_route.load(Relaxed),
            self.msgs_dropped.load(Relaxed),
        )
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
            let _ = writeln!(out, "# HELP truck_sim_{name} {help}");
            let _ = writeln!(out, "# TYPE truck_sim_{name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "truck_sim_{name}{labels} {v}");
            }
        };
        let u = |a: &AtomicU64| a.load(Relaxed) as f64;
        let i = |a: &AtomicI64| a.load(Relaxed) as f64;
        metric(
            "trucks_target",
            "gauge",
            "Trucks requested (--trucks).",
            &[("", u(&self.trucks_target))],
        );
        metric(
            "trucks_spawned",
            "gauge",
            "Trucks started so far (ramp-up).",
            &[("", u(&self.trucks_spawned))],
        );
        metric(
            "trucks",
            "gauge",
            "Trucks by state.",
            &[
                ("{state=\"driving\"}", i(&self.trucks_driving)),
                ("{state=\"resting\"}", i(&self.trucks_resting)),
            ],
        );
        metric(
            "arrivals_total",
            "counter",
            "Trucks that reached their destination.",
            &[("", u(&self.arrivals))],
        );
        metric(
            "route_points_total",
            "counter",
            "Route points received from OSRM and kept after simplification.",
            &[
                ("{stage=\"received\"}", u(&self.route_points_received)),
                ("{stage=\"kept\"}", u(&self.route_points_kept)),
            ],
        );
        metric(
            "route_length_meters_total",
            "counter",
            "Length of the routes received from OSRM.",
            &[("", u(&self.route_length_m))],
        );
        metric(
            "routes_published_total",
            "counter",
            "Retained route-ahead messages and clears handed to the MQTT client.",
            &[("", u(&self.routes_published))],
        );
        metric(
            "mqtt_connected",
            "gauge",
            "MQTT connections currently up.",
            &[("", i(&self.mqtt_connected))],
        );
        metric(
            "mqtt_connects_total",
            "counter",
            "Successful MQTT connects (CONNACK).",
            &[("", u(&self.mqtt_connects))],
        );
        metric(
            "mqtt_connect_failures_total",
            "counter",
            "Failed MQTT connection attempts.",
            &[("", u(&self.mqtt_connect_failures))],
        );
        metric(
            "mqtt_disconnects_total",
            "counter",
            "Established MQTT connections that were lost.",
            &[("", u(&self.mqtt_disconnects))],
        );
        metric(
            "messages_published_total",
            "counter",
            "PUBLISH packets written to the broker.",
            &[("", u(&self.msgs_published))],
        );
        metric(
            "messages_dropped_total",
            "counter",
            "Position updates not sent (disconnected or client queue full).",
            &[("", u(&self.msgs_dropped))],
        );
        metric(
            "route_requests_total",
            "counter",
            "Route lookups (cache hits included).",
            &[("", u(&self.route_requests))],
        );
        metric(
            "route_cache_hits_total",
            "counter",
            "Route lookups served from the cache.",
            &[("", u(&self.route_cache_hits))],
        );
        metric(
            "routes_ok_total",
            "counter",
            "Routes obtained (OSRM or cache).",
            &[("", u(&self.route_ok))],
        );
        metric(
            "route_errors_total",
            "counter",
            "Failed OSRM requests by kind.",
            &[
                ("{kind=\"transient\"}", u(&self.route_errors)),
                ("{kind=\"no_route\"}", u(&self.route_no_route)),
            ],
        );
        metric(
            "routes_in_flight",
            "gauge",
            "OSRM requests being executed.",
            &[("", i(&self.route_in_flight))],
        );
        metric(
            "routes_queued",
            "gauge",
            "OSRM requests waiting for a concurrency slot.",
            &[("", i(&self.route_queued))],
        );
        metric(
            "route_latency_seconds_sum",
            "counter",
            "Total time spent in OSRM HTTP requests.",
            &[("", self.route_latency_us_sum.load(Relaxed) as f64 / 1e6)],
        );
        metric(
            "route_cache_entries",
            "gauge",
            "Routes in the cache.",
            &[("", i(&self.route_cache_entries))],
        );
        metric(
            "route_cache_bytes",
            "gauge",
            "Approximate heap size of cached routes.",
            &[("", i(&self.route_cache_bytes))],
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_exposition_has_help_type_and_samples() {
        let s = Stats::default();
        s.msgs_published.store(42, Relaxed);
        s.trucks_driving.store(3, Relaxed);
        let text = s.prometheus();
        assert!(text.contains("# TYPE truck_sim_messages_published_total counter\n"));
        assert!(text.contains("\ntruck_sim_messages_published_total 42\n"));
        assert!(text.contains("\ntruck_sim_trucks{state=\"driving\"} 3\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("truck_sim_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn progress_line_reports_rates_since_previous_snapshot() {
        let s = Stats::default();
        let prev = s.snapshot();
        s.msgs_published.store(5000, Relaxed);
        s.route_requests.store(10, Relaxed);
        s.route_cache_hits.store(5, Relaxed);
        s.route_ok.store(10, Relaxed);
        let line = s.progress_line(&prev, Duration::from_secs(5));
        assert!(line.contains("msgs/s 1000"), "{line}");
        assert!(line.contains("routes/s 2.0 (cache hit 50%)"), "{line}");
    }
}
