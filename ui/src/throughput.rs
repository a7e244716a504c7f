//! Live throughput of the brokers for the page's panel, from their Prometheus
//! `/metrics` (pure: parsing and rates; the scraping loop is in `scrape`).

use serde::Serialize;

/// The counters and gauges of one scrape of one broker node.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// MQTT PUBLISH packets received from clients.
    pub mqtt_in: f64,
    /// MQTT PUBLISHes sent to subscribers.
    pub mqtt_out: f64,
    /// Records written to Kafka (all topics).
    pub kafka_written: f64,
    /// Records read from Kafka for fan-out (all topics).
    pub kafka_read: f64,
    /// Records in Kafka not yet read for fan-out (gauge, sum over topics).
    pub consumer_lag: f64,
}

/// Parses the Prometheus text format, keeping the samples the panel needs.
/// Unknown lines, comments and unparsable values are ignored.
pub fn parse_metrics(text: &str) -> Sample {
    let mut s = Sample::default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        if !v.is_finite() {
            continue;
        }
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        match name {
            "lodestream_packets_received_total" if labels.contains("type=\"publish\"") => {
                s.mqtt_in += v
            }
            "lodestream_messages_delivered_total" => s.mqtt_out += v,
            "lodestream_published_to_kafka_total" => s.kafka_written += v,
            "lodestream_kafka_records_read_total" => s.kafka_read += v,
            "lodestream_kafka_consumer_lag" => s.consumer_lag += v,
            _ => {}
        }
    }
    s
}

/// What the page shows: rates per second summed over the nodes that answered.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Throughput {
    pub ts_ms: i64,
    pub mqtt_in_per_s: f64,
    pub mqtt_out_per_s: f64,
    pub kafka_written_per_s: f64,
    pub kafka_read_per_s: f64,
    pub consumer_lag: f64,
    pub nodes_up: usize,
    pub nodes: usize,
}

/// Per-second rates between two samples of one node. A counter that went
/// down (the node restarted) counts from zero.
pub fn rates(prev: &Sample, cur: &Sample, secs: f64) -> Sample {
    let r = |a: f64, b: f64| {
        if secs <= 0.0 {
            0.0
        } else if b >= a {
            (b - a) / secs
        } else {
            b / secs
        }
    };
    Sample {
        mqtt_in: r(prev.mqtt_in, cur.mqtt_in),
        mqtt_out: r(prev.mqtt_out, cur.mqtt_out),
        kafka_written: r(prev.kafka_written, cur.kafka_written),
        kafka_read: r(prev.kafka_read, cur.kafka_read),
        consumer_lag: cur.consumer_lag,
    }
}

/// Sums the per-node rates (`None`: the node did not answer this round).
pub fn total(ts_ms: i64, per_node: &[Option<Sample>]) -> Throughput {
    let mut t = Throughput {
        ts_ms,
        nodes: per_node.len(),
        ..Throughput::default()
    };
    for s in per_node.iter().flatten() {
        t.nodes_up += 1;
        t.mqtt_in_per_s += s.mqtt_in;
        t.mqtt_out_per_s += s.mqtt_out;
        t.kafka_written_per_s += s.kafka_written;
        t.kafka_read_per_s += s.kafka_read;
        t.consumer_lag += s.consumer_lag;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP lodestream_packets_received_total MQTT packets received
# TYPE lodestream_packets_received_total counter
lodestream_packets_received_total{type="connect"} 7
lodestream_packets_received_total{type="publish"} 1500
lodestream_messages_delivered_total 300
lodestream_published_to_kafka_total{topic="trucks"} 1490
lodestream_published_to_kafka_total{topic="sessions"} 10
lodestream_kafka_records_read_total{topic="trucks"} 1000
lodestream_kafka_records_read_total{topic="fleet-stats"} 20
lodestream_kafka_consumer_lag{topic="trucks"} 12
lodestream_kafka_consumer_lag{topic="fleet-stats"} 0
lodestream_connections 5
garbage line
lodestream_messages_delivered_total NaN
"#;

    #[test]
    fn parses_the_broker_metrics_the_panel_needs() {
        let s = parse_metrics(TEXT);
        assert_eq!(
            s,
            Sample {
                mqtt_in: 1500.0,
                mqtt_out: 300.0,
                kafka_written: 1500.0,
                kafka_read: 1020.0,
                consumer_lag: 12.0
            }
        );
    }

    #[test]
    fn rates_are_per_second_and_a_restarted_node_counts_from_zero() {
        let a = parse_metrics(TEXT);
        let mut b = a;
        b.mqtt_in += 3000.0;
        b.mqtt_out = 100.0; // went down: restarted
        let r = rates(&a, &b, 2.0);
        assert_eq!(r.mqtt_in, 1500.0);
        assert_eq!(r.mqtt_out, 50.0);
        assert_eq!(r.consumer_lag, 12.0);
        assert_eq!(rates(&a, &b, 0.0).mqtt_in, 0.0);
    }

    #[test]
    fn total_sums_the_nodes_that_answered() {
        let one = Sample {
            mqtt_in: 10.0,
            mqtt_out: 1.0,
            kafka_written: 10.0,
            kafka_read: 5.0,
            consumer_lag: 2.0,
        };
        let t = total(42, &[Some(one), None, Some(one)]);
        assert_eq!((t.nodes, t.nodes_up), (3, 2));
        assert_eq!(t.mqtt_in_per_s, 20.0);
        assert_eq!(t.consumer_lag, 4.0);
        assert_eq!(t.ts_ms, 42);
    }
}
