//! Scrapes the brokers' `/metrics` every few seconds and keeps the latest
//! [`Throughput`] for `/throughput.json`. One loop per ui process, whatever
//! the number of viewers: the page's panel costs the brokers one scrape each
//! per interval.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::throughput::{parse_metrics, rates, total, Sample, Throughput};

/// The latest totals, shared with the HTTP handler.
pub type Shared = Arc<RwLock<Throughput>>;

/// Runs for ever: scrapes `urls` every `every`, stores the summed rates.
pub async fn run(urls: Vec<String>, every: Duration, out: Shared) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    {
        Ok(c) => c,
        Err(err) => {
            tracing::error!(%err, "cannot build the HTTP client; no throughput figures");
            return;
        }
    };
    let mut prev: Vec<Option<(Instant, Sample)>> = vec![None; urls.len()];
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut per_node = Vec::with_capacity(urls.len());
        for (i, url) in urls.iter().enumerate() {
            let now = Instant::now();
            let cur = match fetch(&client, url).await {
                Ok(s) => s,
                Err(err) => {
                    tracing::debug!(%err, url, "scrape failed");
                    prev[i] = None;
                    per_node.push(None);
                    continue;
                }
            };
            // The first scrape of a node only sets the baseline.
            per_node
                .push(prev[i].map(|(t, p)| rates(&p, &cur, now.duration_since(t).as_secs_f64())));
            prev[i] = Some((now, cur));
        }
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let t = total(ts_ms, &per_node);
        if let Ok(mut w) = out.write() {
            *w = t;
        }
    }
}

async fn fetch(client: &reqwest::Client, url: &str) -> reqwest::Result<Sample> {
    let text = client
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(parse_metrics(&text))
}
