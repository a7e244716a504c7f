//! `loadsim`: MQTT load generator for Lodestream (and any MQTT broker).
//!
//! Many lean clients (one tokio task each, the workspace codec, no MQTT
//! client library) connect at a given ramp rate and publish 400–600 byte
//! text payloads every few seconds or as fast as a window of in-flight
//! QoS 1/2 messages allows. It reports every few seconds and at the end:
//! connections, connect failures, publish/ack rates, PUBACK and end-to-end
//! latency percentiles, and — reading the records back from Kafka — how
//! many acknowledged messages are missing (`lost: N`).
//!
//! One process holds fewer sockets than its open-file limit (raised to the
//! hard limit at start), so big runs use several processes with disjoint
//! `--first-index` ranges and add their `--json-out` files up with
//! `loadsim merge`. See docs/benchmarks.md.

mod client;
mod payload;
mod stats;
mod verify;
mod ws;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use lodestream_mqtt::{ProtocolVersion, QoS};
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::{ClientResult, Shared};
use crate::stats::{new_histogram, Interval, Latency, Snapshot, Summary};

#[derive(Parser, Debug)]
#[command(
    name = "loadsim",
    version,
    about = "MQTT load generator with PUBACK/end-to-end latency and a Kafka loss check"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Add up the JSON summaries of several loadsim processes of one run.
    Merge {
        /// `--json-out` files to merge.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Write the merged summary here (JSON).
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Broker addresses host:port, comma separated; clients use them round robin.
    #[arg(long, default_value = "127.0.0.1:1883", value_delimiter = ',')]
    brokers: Vec<String>,
    /// `tcp`, or `ws`: MQTT over WebSocket (subprotocol `mqtt`) at
    /// `--ws-path` on the same addresses.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "ws"])]
    transport: String,
    #[arg(long, default_value = "/mqtt")]
    ws_path: String,
    /// Number of publishing clients.
    #[arg(long, default_value_t = 100)]
    clients: u32,
    /// Index of this process's first client (client ids and topics use
    /// `first-index + i`); give each process of a run a disjoint range.
    #[arg(long, default_value_t = 0)]
    first_index: u32,
    /// New connections per second.
    #[arg(long, default_value_t = 1000.0)]
    ramp_per_sec: f64,
    /// Seconds between two PUBLISHes of one client (random phase);
    /// 0 = as fast as the in-flight window allows.
    #[arg(long, default_value_t = 10.0)]
    interval_s: f64,
    /// QoS 1/2 PUBLISHes a client may have unacknowledged (capped by the
    /// broker's MQTT 5 Receive Maximum).
    #[arg(long, default_value_t = 32)]
    inflight: u32,
    /// QoS of the PUBLISHes: 0, 1 or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Mixed QoS: `QOS:WEIGHT,...`, e.g. `0:20,1:50,2:30`; each publisher
    /// gets one QoS, in proportion to the weights (overrides --qos).
    #[arg(long)]
    qos_mix: Option<String>,
    /// Publisher connections closed and reopened per second (clean
    /// DISCONNECT after the in-flight acknowledgements, then a new CONNECT);
    /// 0 = clients stay connected.
    #[arg(long, default_value_t = 0.0)]
    churn_per_sec: f64,
    /// MQTT version: 3.1.1 (also 4, 311) or 5.
    #[arg(long, default_value = "3.1.1")]
    mqtt_version: String,
    /// Topics are `<prefix>/<client-index>`.
    #[arg(long, default_value = "load")]
    topic_prefix: String,
    #[arg(long, default_value_t = 400)]
    payload_min: usize,
    #[arg(long, default_value_t = 600)]
    payload_max: usize,
    /// Subscribers measuring end-to-end latency.
    #[arg(long, default_value_t = 0)]
    subscribers: u32,
    /// Subscription filter of the subscribers (default `<prefix>/#`).
    #[arg(long)]
    sub_filter: Option<String>,
    /// Subscription QoS of the subscribers.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    sub_qos: u8,
    /// Local addresses to connect from, comma separated, round robin (bind
    /// before connect): each adds its own ephemeral port range.
    #[arg(long, value_delimiter = ',')]
    source_addrs: Vec<IpAddr>,
    /// Seconds of steady load once every client is connected.
    #[arg(long, default_value_t = 60.0)]
    duration_s: f64,
    /// How long to wait for all clients to be connected after the ramp
    /// before the steady phase starts anyway.
    #[arg(long, default_value_t = 30.0)]
    settle_timeout_s: f64,
    #[arg(long, default_value_t = 60)]
    keep_alive_s: u16,
    #[arg(long, default_value_t = 10.0)]
    connect_timeout_s: f64,
    /// At the end, how long to wait for outstanding acknowledgements.
    #[arg(long, default_value_t = 10.0)]
    drain_timeout_s: f64,
    /// After publishers stopped, how long subscribers keep reading.
    #[arg(long, default_value_t = 3.0)]
    sub_grace_s: f64,
    /// Run id put in every payload (default: random). Processes of one run
    /// share it.
    #[arg(long)]
    run_id: Option<String>,
    /// Kafka bootstrap servers: enables the loss check at the end.
    #[arg(long)]
    kafka: Option<String>,
    /// Kafka topic the broker writes these messages to.
    #[arg(long, default_value = "mqtt_messages")]
    kafka_topic: String,
    /// Longest time the Kafka check may read, seconds.
    #[arg(long, default_value_t = 300.0)]
    kafka_timeout_s: f64,
    /// Write the summary as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    #[arg(long, default_value_t = 5.0)]
    report_every_s: f64,
    /// Runtime worker threads; 1 = single-threaded runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn parse_version(s: &str) -> anyhow::Result<ProtocolVersion> {
    Ok(match s {
        "3.1.1" | "311" | "4" | "3" => ProtocolVersion::V311,
        "5" | "5.0" => ProtocolVersion::V5,
        _ => bail!("--mqtt-version {s:?}: use 3.1.1 or 5"),
    })
}

/// Parses `--qos-mix` (`0:20,1:50,2:30`).
fn parse_qos_mix(s: &str) -> anyhow::Result<Vec<(QoS, u32)>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (q, w) = part
            .split_once(':')
            .with_context(|| format!("--qos-mix {part:?}: use QOS:WEIGHT"))?;
        let q = q
            .trim()
            .parse::<u8>()
            .ok()
            .and_then(QoS::from_u8)
            .with_context(|| format!("--qos-mix {part:?}: QoS must be 0, 1 or 2"))?;
        let w: u32 = w
            .trim()
            .parse()
            .with_context(|| format!("--qos-mix {part:?}: weight must be a number"))?;
        out.push((q, w));
    }
    if out.iter().map(|(_, w)| *w as u64).sum::<u64>() == 0 {
        bail!("--qos-mix {s:?}: weights add up to 0");
    }
    Ok(out)
}

fn version_name(v: ProtocolVersion) -> &'static str {
    if v.is_v5() {
        "5"
    } else {
        "3.1.1"
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Merge { files, json_out }) => merge(&files, json_out.as_deref()),
        None => run(cli.run),
    }
}

fn merge(files: &[PathBuf], out: Option<&std::path::Path>) -> anyhow::Result<()> {
    let mut m = Summary::default();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let s: Summary =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", f.display()))?;
        m.merge(&s);
    }
    print!("{}", m.render());
    if let Some(p) = out {
        std::fs::write(p, serde_json::to_string_pretty(&m)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // Raise the soft open-file limit to the hard limit.
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let need = u64::from(args.clients) + u64::from(args.subscribers) + 64;
    if nofile > 0 && nofile < need {
        eprintln!(
            "loadsim: warning: open-file limit {nofile} < {need} needed for {} clients; run several processes",
            args.clients
        );
    }
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    let summary = rt.block_on(run_async(args.clone(), nofile))?;
    print!("{}", summary.render());
    if let Some(p) = &args.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    // Dropping the runtime would wait for nothing useful; exit now.
    rt.shutdown_timeout(Duration::from_secs(1));
    if summary.kafka.as_ref().is_some_and(|k| k.lost > 0) {
        // Acknowledged messages missing from Kafka: fail loudly (exit 3).
        std::process::exit(3);
    }
    Ok(())
}

/// Histograms accumulated from the recorder: whole run, steady phase only,
/// and end-to-end.
struct Accum {
    ack_all: Histogram<u64>,
    ack_steady: Histogram<u64>,
    e2e: Histogram<u64>,
    steady: bool,
    intervals: Vec<Interval>,
}

impl Accum {
    fn absorb(&mut self, sh: &Shared) -> (Histogram<u64>, Histogram<u64>) {
        let (ack, e2e) = sh.recorder.take();
        let _ = self.ack_all.add(&ack);
        if self.steady {
            let _ = self.ack_steady.add(&ack);
        }
        let _ = self.e2e.add(&e2e);
        (ack, e2e)
    }
}

async fn resolve(brokers: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    let mut out = Vec::new();
    for b in brokers.iter().map(|b| b.trim()).filter(|b| !b.is_empty()) {
        let a = tokio::net::lookup_host(b)
            .await
            .with_context(|| format!("resolving broker {b}"))?
            .next()
            .with_context(|| format!("broker {b} has no address"))?;
        out.push(a);
    }
    if out.is_empty() {
        bail!("no --brokers given");
    }
    Ok(out)
}

/// Resolves on SIGINT/SIGTERM; a second signal exits at once.
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("loadsim: interrupted, stopping (again to exit now)");
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        std::process::exit(130);
    });
}

async fn run_async(args: RunArgs, nofile: u64) -> anyhow::Result<Summary> {
    let version = parse_version(&args.mqtt_version)?;
    let qos = QoS::from_u8(args.qos).unwrap_or(QoS::AtLeastOnce);
    let qos_mix = match &args.qos_mix {
        Some(m) => parse_qos_mix(m)?,
        None => vec![(qos, 1)],
    };
    if args.churn_per_sec < 0.0 {
        bail!("--churn-per-sec must be >= 0");
    }
    // Each of N clients reconnecting every N/rate seconds on average gives `rate` per second.
    let churn_lifetime = (args.churn_per_sec > 0.0)
        .then(|| Duration::from_secs_f64(f64::from(args.clients.max(1)) / args.churn_per_sec));
    let brokers = resolve(&args.brokers).await?;
    if args.ramp_per_sec <= 0.0 || args.interval_s < 0.0 || args.duration_s < 0.0 {
        bail!("--ramp-per-sec must be > 0, --interval-s and --duration-s >= 0");
    }
    let run_id = args
        .run_id
        .clone()
        .unwrap_or_else(|| format!("{:08x}", rand::thread_rng().gen::<u32>()));
    if run_id.is_empty() || run_id.contains(char::is_whitespace) {
        bail!("--run-id must be non-empty without spaces");
    }
    println!(
        "loadsim run {run_id}: {} clients (index {}..{}), {} subscribers -> {} broker(s), {} source addr(s), MQTT {} QoS {}, interval {} s, ramp {}/s, churn {}/s, nofile {nofile}",
        args.clients,
        args.first_index,
        u64::from(args.first_index) + u64::from(args.clients),
        args.subscribers,
        brokers.len(),
        args.source_addrs.len(),
        version_name(version),
        args.qos_mix.as_deref().unwrap_or(&args.qos.to_string()),
        args.interval_s,
        args.ramp_per_sec,
        args.churn_per_sec
    );

    // Kafka offsets before anything is published.
    let kafka_start: Option<BTreeMap<i32, i64>> = match &args.kafka {
        Some(bootstrap) => {
            let (b, t) = (bootstrap.clone(), args.kafka_topic.clone());
            match tokio::task::spawn_blocking(move || verify::high_watermarks(&b, &t)).await? {
                Ok(w) => Some(w),
                Err(e) => {
                    eprintln!("loadsim: Kafka check disabled: {e:#}");
                    None
                }
            }
        }
        None => None,
    };

    let mut rng = rand::thread_rng();
    let sh = Arc::new(Shared {
        brokers: brokers.clone(),
        sources: args.source_addrs.clone(),
        version,
        qos_mix,
        churn_lifetime,
        interval: Duration::from_secs_f64(args.interval_s),
        inflight: args.inflight.max(1) as usize,
        keep_alive_s: args.keep_alive_s,
        connect_timeout: Duration::from_secs_f64(args.connect_timeout_s),
        drain_timeout: Duration::from_secs_f64(args.drain_timeout_s),
        run_id: run_id.clone(),
        topic_prefix: args.topic_prefix.clone(),
        payloads: payload::PayloadGen::new(&mut rng, 256, args.payload_min, args.payload_max),
        counters: Default::default(),
        recorder: Default::default(),
        errors_shown: Default::default(),
        ws_path: (args.transport == "ws").then(|| args.ws_path.clone()),
    });
    let accum = Arc::new(Mutex::new(Accum {
        ack_all: new_histogram(),
        ack_steady: new_histogram(),
        e2e: new_histogram(),
        steady: false,
        intervals: Vec::new(),
    }));
    let t0 = Instant::now();
    let (pub_stop_tx, pub_stop) = watch::channel(false);
    let (sub_stop_tx, sub_stop) = watch::channel(false);
    let interrupt = {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            interrupted().await;
            let _ = tx.send(true);
        });
        rx
    };
    let stopped = |rx: &watch::Receiver<bool>| *rx.borrow();

    // Periodic report.
    let reporter = {
        let sh = sh.clone();
        let accum = accum.clone();
        let every = Duration::from_secs_f64(args.report_every_s.max(0.5));
        let clients = args.clients;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            let mut prev = sh.counters.snapshot();
            let mut prev_t = Instant::now();
            loop {
                tick.tick().await;
                let now = Instant::now();
                let s = sh.counters.snapshot();
                let dt = now.duration_since(prev_t).as_secs_f64().max(1e-9);
                let (ack, e2e) = {
                    let mut a = accum.lock().unwrap_or_else(|e| e.into_inner());
                    a.absorb(&sh)
                };
                let (ack, e2e) = (Latency::from_histogram(&ack), Latency::from_histogram(&e2e));
                let iv = Interval {
                    t_s: now.duration_since(t0).as_secs_f64(),
                    connected: s.connected,
                    connect_failures: s.connect_failures,
                    publish_rate: (s.published - prev.published) as f64 / dt,
                    ack_rate: (s.acked - prev.acked) as f64 / dt,
                    ack_p99_ms: ack.p99_ms,
                    e2e_p99_ms: e2e.p99_ms,
                };
                println!(
                    "[{:6.1}s] conn {}/{} fail {} lost {} churned {} | pub {:.1}/s ack {:.1}/s | ack {} | e2e {} ({:.1}/s) | ack errors {}",
                    iv.t_s,
                    s.connected,
                    clients,
                    s.connect_failures,
                    s.connection_losses,
                    s.churned,
                    iv.publish_rate,
                    iv.ack_rate,
                    ack.brief(),
                    e2e.brief(),
                    (s.sub_received - prev.sub_received) as f64 / dt,
                    s.ack_errors,
                );
                accum
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .intervals
                    .push(iv);
                prev = s;
                prev_t = now;
            }
        })
    };

    // Subscribers first, so they see the first messages.
    let filter = args
        .sub_filter
        .clone()
        .unwrap_or_else(|| format!("{}/#", args.topic_prefix));
    let sub_qos = QoS::from_u8(args.sub_qos).unwrap_or(QoS::AtMostOnce);
    let mut sub_handles = Vec::new();
    for j in 0..args.subscribers {
        sub_handles.push(tokio::spawn(client::subscriber(
            sh.clone(),
            format!("ls-{run_id}-sub-{}-{j}", args.first_index),
            j as usize,
            filter.clone(),
            sub_qos,
            sub_stop.clone(),
        )));
    }
    if args.subscribers > 0 {
        let deadline = Instant::now() + Duration::from_secs(15);
        while (sh.counters.subscribers_connected.load(Ordering::Relaxed) as u32) < args.subscribers
            && Instant::now() < deadline
            && !stopped(&interrupt)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "{} of {} subscribers subscribed to {filter}",
            sh.counters.subscribers_connected.load(Ordering::Relaxed),
            args.subscribers
        );
    }

    // Ramp.
    let ramp_start = Instant::now();
    let mut handles = Vec::with_capacity(args.clients as usize);
    for i in 0..args.clients {
        let due = ramp_start + Duration::from_secs_f64(f64::from(i) / args.ramp_per_sec);
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        if stopped(&interrupt) {
            break;
        }
        let index = args.first_index + i;
        handles.push(tokio::spawn(client::publisher(
            sh.clone(),
            index,
            index as usize,
            pub_stop.clone(),
        )));
    }
    // Settle: everyone connected (or the timeout).
    let settle_deadline = Instant::now() + Duration::from_secs_f64(args.settle_timeout_s);
    while (sh.counters.connected.load(Ordering::Relaxed) as u64) < u64::from(args.clients)
        && Instant::now() < settle_deadline
        && !stopped(&interrupt)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ramp_secs = t0.elapsed().as_secs_f64();

    // Steady phase.
    accum.lock().unwrap_or_else(|e| e.into_inner()).absorb(&sh);
    accum.lock().unwrap_or_else(|e| e.into_inner()).steady = true;
    let s0 = sh.counters.snapshot();
    let steady_start = Instant::now();
    println!(
        "STEADY after {ramp_secs:.1} s: {} of {} clients connected, {} connect failures; measuring for {} s (unix time {:.1})",
        s0.connected,
        args.clients,
        s0.connect_failures,
        args.duration_s,
        client::now_us() as f64 / 1e6
    );
    let mut intr = interrupt.clone();
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs_f64(args.duration_s)) => {}
        _ = intr.wait_for(|s| *s) => {}
    }
    let s1 = sh.counters.snapshot();
    let subs_at_end = sh
        .counters
        .subscribers_connected
        .load(Ordering::Relaxed)
        .max(0) as u64;
    let steady_secs = steady_start.elapsed().as_secs_f64();
    {
        let mut a = accum.lock().unwrap_or_else(|e| e.into_inner());
        a.absorb(&sh);
        a.steady = false;
    }
    println!(
        "stopping: draining acknowledgements and disconnecting (unix time {:.1})",
        client::now_us() as f64 / 1e6
    );

    // Stop publishers, then subscribers after a grace period.
    let _ = pub_stop_tx.send(true);
    let mut results: Vec<ClientResult> = Vec::with_capacity(handles.len());
    for h in handles {
        results.push(h.await.unwrap_or_default());
    }
    let mut intr = interrupt.clone();
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs_f64(args.sub_grace_s)) => {}
        _ = intr.wait_for(|s| *s) => {}
    }
    let _ = sub_stop_tx.send(true);
    for h in sub_handles {
        let _ = h.await;
    }
    reporter.abort();
    let fin = sh.counters.snapshot();
    let (ack_steady, ack_all, e2e, intervals) = {
        let mut a = accum.lock().unwrap_or_else(|e| e.into_inner());
        a.absorb(&sh);
        (
            Latency::from_histogram(&a.ack_steady),
            Latency::from_histogram(&a.ack_all),
            Latency::from_histogram(&a.e2e),
            std::mem::take(&mut a.intervals),
        )
    };

    // Kafka check.
    let kafka = match (&args.kafka, kafka_start) {
        (Some(bootstrap), Some(start)) => {
            println!("checking Kafka topic {} ...", args.kafka_topic);
            let (b, t, r) = (bootstrap.clone(), args.kafka_topic.clone(), run_id.clone());
            let first = args.first_index;
            let timeout = Duration::from_secs_f64(args.kafka_timeout_s);
            let res = tokio::task::spawn_blocking(move || {
                verify::check(&b, &t, &start, &r, first, &results, timeout)
            })
            .await?;
            match res {
                Ok(k) => Some(k),
                Err(e) => {
                    eprintln!("loadsim: Kafka check failed: {e:#}");
                    None
                }
            }
        }
        _ => None,
    };

    let d = |a: u64, b: u64| a.saturating_sub(b);
    let steady = |s1: &Snapshot, s0: &Snapshot| {
        (
            d(s1.published, s0.published),
            d(s1.acked, s0.acked),
            d(s1.sub_received, s0.sub_received),
        )
    };
    let (sp, sa, se) = steady(&s1, &s0);
    let secs = steady_secs.max(1e-9);
    // QoS 0 PUBLISHes are never acknowledged.
    let unacked = fin
        .published
        .saturating_sub(fin.published_qos0 + fin.acked + fin.ack_errors);
    Ok(Summary {
        run_id,
        processes: 1,
        brokers: args.brokers.clone(),
        mqtt_version: version_name(version).into(),
        qos: args.qos,
        clients: u64::from(args.clients),
        subscribers: u64::from(args.subscribers),
        interval_s: args.interval_s,
        inflight: args.inflight,
        connected: s1.connected,
        connected_peak: sh.counters.connected_peak.load(Ordering::Relaxed).max(0) as u64,
        subscribers_connected: subs_at_end,
        connect_failures: fin.connect_failures,
        connection_losses: fin.connection_losses,
        ramp_secs,
        steady_secs,
        steady_published: sp,
        steady_acked: sa,
        publish_rate: sp as f64 / secs,
        ack_rate: sa as f64 / secs,
        e2e_rate: se as f64 / secs,
        published: fin.published,
        acked: fin.acked,
        ack_errors: fin.ack_errors,
        completed: fin.completed,
        unacked,
        sub_received: fin.sub_received,
        ack_latency: ack_steady,
        ack_latency_all: ack_all,
        e2e_latency: e2e,
        kafka,
        intervals,
    })
}
