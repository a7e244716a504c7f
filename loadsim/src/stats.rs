//! Counters and latency histograms shared by all client tasks, and the
//! serialisable run summary (with merging, so several loadsim processes
//! can be added up).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency tracked, µs (larger values are clamped to it).
pub const MAX_LATENCY_US: u64 = 600_000_000;

pub fn new_histogram() -> Histogram<u64> {
    // 3 significant digits over 1 µs .. 10 min: exact enough, ~200 KB.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static histogram bounds")
}

/// Live counters, updated by the client tasks with relaxed atomics.
#[derive(Default)]
pub struct Counters {
    /// Currently connected publishers (CONNACK received, not yet closed).
    pub connected: AtomicI64,
    pub connected_peak: AtomicI64,
    pub subscribers_connected: AtomicI64,
    /// Successful CONNECTs (first connects and reconnects).
    pub connects: AtomicU64,
    /// Connect attempts that failed (TCP error, timeout, CONNACK refused).
    pub connect_failures: AtomicU64,
    /// Established connections that were lost before the end.
    pub connection_losses: AtomicU64,
    pub published: AtomicU64,
    /// Of `published`, the QoS 0 ones (never acknowledged).
    pub published_qos0: AtomicU64,
    /// Connections a publisher closed on purpose to reconnect (`--churn-per-sec`).
    pub churned: AtomicU64,
    /// PUBACK (QoS 1) or PUBREC (QoS 2) with a success reason code.
    pub acked: AtomicU64,
    /// PUBACK/PUBREC with an error reason code (MQTT 5).
    pub ack_errors: AtomicU64,
    /// QoS 2 flows completed by PUBCOMP.
    pub completed: AtomicU64,
    /// Messages of this run received by subscribers.
    pub sub_received: AtomicU64,
    /// Messages received by subscribers that are not from this run.
    pub sub_foreign: AtomicU64,
}

impl Counters {
    pub fn on_connected(&self) {
        self.connects.fetch_add(1, Ordering::Relaxed);
        let now = self.connected.fetch_add(1, Ordering::Relaxed) + 1;
        self.connected_peak.fetch_max(now, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            connected: self.connected.load(Ordering::Relaxed).max(0) as u64,
            connect_failures: l(&self.connect_failures),
            connection_losses: l(&self.connection_losses),
            published: l(&self.published),
            published_qos0: l(&self.published_qos0),
            churned: l(&self.churned),
            acked: l(&self.acked),
            ack_errors: l(&self.ack_errors),
            completed: l(&self.completed),
            sub_received: l(&self.sub_received),
        }
    }
}

/// A point-in-time copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub connected: u64,
    pub connect_failures: u64,
    pub connection_losses: u64,
    pub published: u64,
    pub published_qos0: u64,
    pub churned: u64,
    pub acked: u64,
    pub ack_errors: u64,
    pub completed: u64,
    pub sub_received: u64,
}

/// Latencies recorded since the reporter last took them. Recording takes a
/// short uncontended lock; the reporter swaps the histograms out.
pub struct Recorder {
    ack: Mutex<Histogram<u64>>,
    e2e: Mutex<Histogram<u64>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            ack: Mutex::new(new_histogram()),
            e2e: Mutex::new(new_histogram()),
        }
    }
}

impl Recorder {
    pub fn ack_us(&self, us: u64) {
        if let Ok(mut h) = self.ack.lock() {
            h.saturating_record(us.max(1));
        }
    }

    pub fn e2e_us(&self, us: u64) {
        if let Ok(mut h) = self.e2e.lock() {
            h.saturating_record(us.max(1));
        }
    }

    /// Takes (and resets) the PUBACK and end-to-end histograms.
    pub fn take(&self) -> (Histogram<u64>, Histogram<u64>) {
        let take = |m: &Mutex<Histogram<u64>>| match m.lock() {
            Ok(mut h) => {
                let out = h.clone();
                h.reset();
                out
            }
            Err(_) => new_histogram(),
        };
        (take(&self.ack), take(&self.e2e))
    }
}

/// Percentiles of a latency distribution, in milliseconds, plus the raw
/// non-empty histogram buckets (µs value, count) so summaries can be merged
/// exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub buckets_us: Vec<(u64, u64)>,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
            buckets_us: h
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
    }

    pub fn to_histogram(&self) -> Histogram<u64> {
        let mut h = new_histogram();
        for &(v, n) in &self.buckets_us {
            let _ = h.record_n(v.clamp(1, MAX_LATENCY_US), n);
        }
        h
    }

    /// Short human form: `p50 1.2 p90 3.4 p99 9.8 max 20.1 ms`.
    pub fn brief(&self) -> String {
        if self.count == 0 {
            return "-".into();
        }
        format!(
            "p50 {:.1} p90 {:.1} p99 {:.1} max {:.1} ms",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms
        )
    }
}

/// Result of reading the run's records back from Kafka.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KafkaCheck {
    pub topic: String,
    /// Records scanned (all producers) between the start and end offsets.
    pub records_scanned: u64,
    /// Records of this run for this process's clients (duplicates included).
    pub landed: u64,
    /// Distinct (client, seq) among `landed`.
    pub unique: u64,
    pub duplicates: u64,
    /// Acknowledged messages (PUBACK/PUBREC success) checked.
    pub acked: u64,
    /// Acknowledged messages not found in Kafka: must be 0.
    pub lost: u64,
    /// Published messages (any QoS) not found in Kafka; for QoS 0 this is
    /// the loss, for QoS 1/2 it includes unacknowledged in-flight messages.
    pub published_not_landed: u64,
    /// False when the scan timed out before reaching the end offsets.
    pub complete: bool,
    pub scan_secs: f64,
}

impl KafkaCheck {
    pub fn merge(&mut self, o: &KafkaCheck) {
        if self.topic.is_empty() {
            self.topic = o.topic.clone();
        }
        // Every process scans the same offset range.
        self.records_scanned = self.records_scanned.max(o.records_scanned);
        self.landed += o.landed;
        self.unique += o.unique;
        self.duplicates += o.duplicates;
        self.acked += o.acked;
        self.lost += o.lost;
        self.published_not_landed += o.published_not_landed;
        self.complete &= o.complete;
        self.scan_secs = self.scan_secs.max(o.scan_secs);
    }
}

/// One periodic report line, kept for the JSON time series.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub t_s: f64,
    pub connected: u64,
    pub connect_failures: u64,
    pub publish_rate: f64,
    pub ack_rate: f64,
    pub ack_p99_ms: f64,
    pub e2e_p99_ms: f64,
}

/// The machine-readable result of one loadsim process, or of several merged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub run_id: String,
    /// How many loadsim processes this summary adds up.
    pub processes: u32,
    pub brokers: Vec<String>,
    pub mqtt_version: String,
    pub qos: u8,
    pub clients: u64,
    pub subscribers: u64,
    pub interval_s: f64,
    pub inflight: u32,
    /// Publishers connected when the steady phase ended.
    pub connected: u64,
    pub connected_peak: u64,
    pub subscribers_connected: u64,
    pub connect_failures: u64,
    pub connection_losses: u64,
    /// Seconds from start until every client was connected (or gave up).
    pub ramp_secs: f64,
    /// Length of the steady phase (all clients connected), seconds.
    pub steady_secs: f64,
    pub steady_published: u64,
    pub steady_acked: u64,
    /// Steady-phase rates, messages per second.
    pub publish_rate: f64,
    pub ack_rate: f64,
    pub e2e_rate: f64,
    /// Whole-run totals.
    pub published: u64,
    pub acked: u64,
    pub ack_errors: u64,
    pub completed: u64,
    /// QoS 1/2 PUBLISHes never acknowledged (connection lost or drain timeout).
    pub unacked: u64,
    pub sub_received: u64,
    /// PUBACK (QoS 1) / PUBREC (QoS 2) latency in the steady phase.
    pub ack_latency: Latency,
    /// PUBACK latency over the whole run (ramp included).
    pub ack_latency_all: Latency,
    /// Publisher send -> subscriber receive, whole run.
    pub e2e_latency: Latency,
    pub kafka: Option<KafkaCheck>,
    pub intervals: Vec<Interval>,
}

impl Summary {
    /// Adds another process's summary. Processes run side by side over the
    /// same time window, so counts and rates add up, durations do not.
    pub fn merge(&mut self, o: &Summary) {
        if self.processes == 0 {
            // Merging into an empty summary: take the descriptive fields.
            self.run_id = o.run_id.clone();
            self.mqtt_version = o.mqtt_version.clone();
            self.qos = o.qos;
            self.interval_s = o.interval_s;
            self.inflight = o.inflight;
        } else if self.run_id != o.run_id && !self.run_id.split(',').any(|r| r == o.run_id) {
            self.run_id = format!("{},{}", self.run_id, o.run_id);
        }
        for b in &o.brokers {
            if !self.brokers.contains(b) {
                self.brokers.push(b.clone());
            }
        }
        let n = self.processes as f64;
        self.processes += o.processes.max(1);
        self.clients += o.clients;
        self.subscribers += o.subscribers;
        self.connected += o.connected;
        self.connected_peak += o.connected_peak;
        self.subscribers_connected += o.subscribers_connected;
        self.connect_failures += o.connect_failures;
        self.connection_losses += o.connection_losses;
        self.ramp_secs = self.ramp_secs.max(o.ramp_secs);
        // Mean steady length, weighted by process count.
        let m = o.processes.max(1) as f64;
        self.steady_secs = (self.steady_secs * n + o.steady_secs * m) / (n + m);
        self.steady_published += o.steady_published;
        self.steady_acked += o.steady_acked;
        self.publish_rate += o.publish_rate;
        self.ack_rate += o.ack_rate;
        self.e2e_rate += o.e2e_rate;
        self.published += o.published;
        self.acked += o.acked;
        self.ack_errors += o.ack_errors;
        self.completed += o.completed;
        self.unacked += o.unacked;
        self.sub_received += o.sub_received;
        let merge_lat = |a: &mut Latency, b: &Latency| {
            let mut h = a.to_histogram();
            let _ = h.add(b.to_histogram());
            *a = Latency::from_histogram(&h);
        };
        merge_lat(&mut self.ack_latency, &o.ack_latency);
        merge_lat(&mut self.ack_latency_all, &o.ack_latency_all);
        merge_lat(&mut self.e2e_latency, &o.e2e_latency);
        self.kafka = match (self.kafka.take(), &o.kafka) {
            (Some(mut a), Some(b)) => {
                a.merge(b);
                Some(a)
            }
            (None, Some(b)) if n == 0.0 => Some(b.clone()),
            (None, None) => None,
            // One side did not check Kafka: the merged check is incomplete.
            (a, b) => a.or_else(|| b.clone()).map(|mut k| {
                k.complete = false;
                k
            }),
        };
        // Interval series: add up the entries at the same position.
        for (i, iv) in o.intervals.iter().enumerate() {
            match self.intervals.get_mut(i) {
                Some(s) => {
                    s.connected += iv.connected;
                    s.connect_failures += iv.connect_failures;
                    s.publish_rate += iv.publish_rate;
                    s.ack_rate += iv.ack_rate;
                    s.ack_p99_ms = s.ack_p99_ms.max(iv.ack_p99_ms);
                    s.e2e_p99_ms = s.e2e_p99_ms.max(iv.e2e_p99_ms);
                }
                None => self.intervals.push(iv.clone()),
            }
        }
    }

    /// Human-readable final report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let line = |s: &mut String, t: String| {
            s.push_str(&t);
            s.push('\n');
        };
        line(
            &mut s,
            format!(
                "run {} | {} process(es) | {} clients, {} subscribers | MQTT {} QoS {} | interval {} s, inflight {}",
                self.run_id,
                self.processes,
                self.clients,
                self.subscribers,
                self.mqtt_version,
                self.qos,
                self.interval_s,
                self.inflight
            ),
        );
        line(
            &mut s,
            format!(
                "connections: {} connected at end (peak {}), {} connect failures, {} lost, ramp {:.1} s",
                self.connected,
                self.connected_peak,
                self.connect_failures,
                self.connection_losses,
                self.ramp_secs
            ),
        );
        line(
            &mut s,
            format!(
                "steady {:.1} s: {:.1} publishes/s, {:.1} acks/s, {:.1} e2e/s",
                self.steady_secs, self.publish_rate, self.ack_rate, self.e2e_rate
            ),
        );
        line(
            &mut s,
            format!(
                "totals: published {}, acked {}, ack errors {}, unacked {}, qos2 completed {}, received by subscribers {}",
                self.published, self.acked, self.ack_errors, self.unacked, self.completed, self.sub_received
            ),
        );
        line(
            &mut s,
            format!("PUBACK latency (steady): {}", self.ack_latency.brief()),
        );
        line(
            &mut s,
            format!("PUBACK latency (all):    {}", self.ack_latency_all.brief()),
        );
        line(
            &mut s,
            format!("end-to-end latency:      {}", self.e2e_latency.brief()),
        );
        match &self.kafka {
            Some(k) => {
                line(
                    &mut s,
                    format!(
                        "kafka {}: scanned {}, landed {} (unique {}, duplicates {}), published not landed {}{}",
                        k.topic,
                        k.records_scanned,
                        k.landed,
                        k.unique,
                        k.duplicates,
                        k.published_not_landed,
                        if k.complete { "" } else { " [INCOMPLETE SCAN]" }
                    ),
                );
                line(&mut s, format!("acknowledged {} lost: {}", k.acked, k.lost));
            }
            None => line(&mut s, "kafka: not checked".into()),
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lat(values: &[u64]) -> Latency {
        let mut h = new_histogram();
        for v in values {
            h.record(*v).unwrap();
        }
        Latency::from_histogram(&h)
    }

    #[test]
    fn latency_percentiles_and_round_trip() {
        let values: Vec<u64> = (1..=1000).map(|i| i * 100).collect(); // 0.1 .. 100 ms
        let l = lat(&values);
        assert_eq!(l.count, 1000);
        assert!((l.p50_ms - 50.0).abs() < 0.1, "{}", l.p50_ms);
        assert!((l.p99_ms - 99.0).abs() < 0.1, "{}", l.p99_ms);
        assert!((l.max_ms - 100.0).abs() < 0.1, "{}", l.max_ms);
        let back = Latency::from_histogram(&l.to_histogram());
        assert_eq!(back, l);
        assert_eq!(
            Latency::from_histogram(&new_histogram()),
            Latency::default()
        );
        assert_eq!(Latency::default().brief(), "-");
    }

    #[test]
    fn latency_serialises_through_json() {
        let l = lat(&[5, 500, 5000, 50_000, 5_000_000]);
        let j = serde_json::to_string(&l).unwrap();
        let back: Latency = serde_json::from_str(&j).unwrap();
        assert_eq!(back, l);
    }

    fn summary(clients: u64, acked: u64, rate: f64, lat_us: &[u64], lost: u64) -> Summary {
        Summary {
            run_id: "r1".into(),
            processes: 1,
            brokers: vec!["127.0.0.1:1883".into()],
            mqtt_version: "3.1.1".into(),
            qos: 1,
            clients,
            connected: clients,
            connected_peak: clients,
            steady_secs: 60.0,
            ack_rate: rate,
            publish_rate: rate,
            acked,
            published: acked,
            ack_latency: lat(lat_us),
            kafka: Some(KafkaCheck {
                topic: "t".into(),
                records_scanned: 1000,
                landed: acked,
                unique: acked,
                acked,
                lost,
                complete: true,
                ..KafkaCheck::default()
            }),
            intervals: vec![Interval {
                t_s: 5.0,
                connected: clients,
                ack_rate: rate,
                ack_p99_ms: lat(lat_us).p99_ms,
                ..Interval::default()
            }],
            ..Summary::default()
        }
    }

    #[test]
    fn merging_adds_counts_and_rates_and_merges_histograms() {
        let a = summary(100, 600, 10.0, &[1000; 99], 0);
        let mut b = summary(50, 300, 5.0, &[50_000; 99], 2);
        b.brokers = vec!["127.0.0.1:1884".into()];
        let mut m = Summary::default();
        m.merge(&a);
        m.merge(&b);
        assert_eq!(m.processes, 2);
        assert_eq!(m.run_id, "r1");
        assert_eq!(m.clients, 150);
        assert_eq!(m.connected, 150);
        assert_eq!(m.acked, 900);
        assert!((m.ack_rate - 15.0).abs() < 1e-9);
        assert!((m.steady_secs - 60.0).abs() < 1e-9);
        assert_eq!(m.brokers.len(), 2);
        assert_eq!(m.ack_latency.count, 198);
        // Half at 1 ms, half at 50 ms: p50 is low, p90 high.
        assert!(m.ack_latency.p50_ms < 1.1, "{}", m.ack_latency.p50_ms);
        assert!(m.ack_latency.p90_ms > 49.0, "{}", m.ack_latency.p90_ms);
        let k = m.kafka.as_ref().unwrap();
        assert_eq!((k.landed, k.acked, k.lost), (900, 900, 2));
        assert_eq!(k.records_scanned, 1000);
        assert!(k.complete);
        assert_eq!(m.intervals.len(), 1);
        assert_eq!(m.intervals[0].connected, 150);
        assert!((m.intervals[0].ack_rate - 15.0).abs() < 1e-9);
        // Merging is order independent for the numbers that matter.
        let mut m2 = Summary::default();
        m2.merge(&b);
        m2.merge(&a);
        assert_eq!(m2.ack_latency, m.ack_latency);
        assert_eq!(m2.acked, m.acked);
    }

    #[test]
    fn merging_with_a_process_that_did_not_check_kafka_is_incomplete() {
        let a = summary(10, 10, 1.0, &[1000], 0);
        let mut b = summary(10, 10, 1.0, &[1000], 0);
        b.kafka = None;
        let mut m = Summary::default();
        m.merge(&a);
        m.merge(&b);
        assert!(!m.kafka.unwrap().complete);
        let mut m = Summary::default();
        m.merge(&b);
        m.merge(&a);
        assert!(!m.kafka.unwrap().complete);
    }

    #[test]
    fn summary_json_round_trip_and_render() {
        let a = summary(10, 10, 1.0, &[1000, 2000], 0);
        let j = serde_json::to_string_pretty(&a).unwrap();
        let back: Summary = serde_json::from_str(&j).unwrap();
        assert_eq!(back, a);
        let r = a.render();
        assert!(r.contains("lost: 0"), "{r}");
        assert!(r.contains("p99"), "{r}");
    }

    #[test]
    fn counters_track_peak() {
        let c = Counters::default();
        c.on_connected();
        c.on_connected();
        c.connected.fetch_sub(1, Ordering::Relaxed);
        c.on_connected();
        assert_eq!(c.connected_peak.load(Ordering::Relaxed), 2);
        assert_eq!(c.snapshot().connected, 2);
        assert_eq!(c.connects.load(Ordering::Relaxed), 3);
    }
}
