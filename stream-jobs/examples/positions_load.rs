//! Load generator: writes truck positions straight into Kafka (bypassing MQTT)
//! so the `directions` job can be measured without the broker or simulator.
//!
//! cargo run -p stream-jobs --example positions_load -- \
//!     --bootstrap 127.0.0.1:9092 --topic trucks --trucks 15000 --hz 2 --seconds 60
//!
//! Headings are deterministic per plate (plate index × 7.3°) and 8% of trucks
//! rest, so the expected counts are known; they are printed at the end.

use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use stream_jobs::agg::{Counts, Direction, Sector};

#[derive(Parser)]
struct Args {
    #[arg(long, env = "LODESTREAM_KAFKA", default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[arg(long, default_value = "trucks")]
    topic: String,
    #[arg(long, default_value_t = 15_000)]
    trucks: u32,
    /// Updates per truck per second.
    #[arg(long, default_value_t = 2.0)]
    hz: f64,
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let plates: Vec<String> = (0..args.trucks)
        .map(|i| {
            let l = |n: u32| char::from(b'A' + (n % 6) as u8);
            let z = |n: u32| char::from(b'A' + (n % 26) as u8);
            format!(
                "{}{}{:03}{}{}",
                l(i / 6),
                l(i),
                i % 1000,
                z(i / 1000),
                z(i / 26000)
            )
        })
        .collect();
    let heading = |i: u32| f64::from(i) * 7.3 % 360.0;
    let resting = |i: u32| i % 100 < 8;
    let total_per_s = f64::from(args.trucks) * args.hz;
    let start = Instant::now();
    let mut sent: u64 = 0;
    let end = Duration::from_secs(args.seconds);
    while start.elapsed() < end {
        // Pace to the target rate in 10 ms steps.
        let due = (start.elapsed().as_secs_f64() * total_per_s) as u64;
        while sent < due {
            let i = (sent % u64::from(args.trucks)) as u32;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as i64;
            let plate = &plates[i as usize];
            // Spread over Italy's box so a map draws a fleet, not one point.
            let (lat, lon) = (
                37.0 + f64::from(i) * 0.371 % 9.0,
                7.5 + f64::from(i) * 0.533 % 11.0,
            );
            let value = format!(
                r#"{{"v":1,"plate":"{plate}","lat":{lat:.5},"lon":{lon:.5},"next":{{"lat":42.01,"lon":12.51}},"speed_kmh":{},"heading_deg":{:.1},"ts":"","ts_ms":{now_ms},"state":"{}"}}"#,
                if resting(i) { 0.0 } else { 72.5 },
                heading(i),
                if resting(i) { "resting" } else { "driving" }
            );
            let key = format!("trucks/{plate}");
            let mut rec = BaseRecord::to(&args.topic).key(&key).payload(&value);
            loop {
                match producer.send(rec) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        // Queue full: let librdkafka drain, then retry.
                        rec = r;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    producer.flush(Duration::from_secs(30))?;
    let secs = start.elapsed().as_secs_f64();
    let mut want = Counts::default();
    for i in 0..args.trucks {
        want.add(if resting(i) {
            Direction::Stopped
        } else {
            match Sector::from_heading((heading(i) * 10.0).round() / 10.0) {
                Some(s) => Direction::Moving(s),
                None => continue,
            }
        });
    }
    println!(
        "sent {sent} records in {secs:.1} s ({:.0}/s); expected counts: {}",
        sent as f64 / secs,
        serde_json::to_string(&want)?
    );
    Ok(())
}
