//! truck-sim: a fleet of simulated trucks driving OSRM routes through Italy,
//! each publishing its position over its own MQTT connection.
//!
//! See `truck-sim/README.md` for usage and the message schema.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;
use rand::rngs::{SmallRng, StdRng};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use truck_sim::mqtt::{self, MqttSettings, TransportKind};
use truck_sim::osrm::{OsrmClient, RouteCache, RouteService};
use truck_sim::places::{Area, Places, ITALIAN_CITIES};
use truck_sim::plates::{PlateIssuer, DEFAULT_FLEET_SEED};
use truck_sim::stats::Stats;
use truck_sim::truck::{FleetConfig, Truck};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Simulated truck fleet: OSRM routes in, MQTT positions out"
)]
struct Args {
    /// Number of trucks (one MQTT connection each).
    #[arg(long, env = "TRUCK_SIM_TRUCKS", default_value_t = 15_000)]
    trucks: usize,
    /// Trucks started (and connected) per second during ramp-up.
    #[arg(long, env = "TRUCK_SIM_RAMP_PER_SEC", default_value_t = 500.0)]
    ramp_per_sec: f64,
    /// Seed for plates, start points and destinations. Fixed by default, so
    /// that a restart brings back the same trucks (plates, client ids).
    #[arg(long, env = "TRUCK_SIM_SEED", default_value_t = DEFAULT_FLEET_SEED)]
    seed: u64,
    /// Print the fleet's plates (one a line, in start order) and exit.
    #[arg(long)]
    list_plates: bool,

    /// MQTT broker host.
    #[arg(long, env = "TRUCK_SIM_MQTT_HOST", default_value = "127.0.0.1")]
    mqtt_host: String,
    /// MQTT broker port.
    #[arg(long, env = "TRUCK_SIM_MQTT_PORT", default_value_t = 1883)]
    mqtt_port: u16,
    /// Transport to the broker.
    #[arg(long, env = "TRUCK_SIM_TRANSPORT", value_enum, default_value_t = TransportKind::Tcp)]
    transport: TransportKind,
    /// HTTP path of the broker's WebSocket endpoint (ws/wss).
    #[arg(long, env = "TRUCK_SIM_WS_PATH", default_value = "/mqtt")]
    ws_path: String,
    /// MQTT username.
    #[arg(long, env = "TRUCK_SIM_USERNAME")]
    username: Option<String>,
    /// MQTT password.
    #[arg(long, env = "TRUCK_SIM_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// PEM CA bundle to verify the broker (tls/wss); default: system roots.
    #[arg(long, env = "TRUCK_SIM_TLS_CA_FILE")]
    tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (needs --tls-ca-file).
    #[arg(long, env = "TRUCK_SIM_TLS_CLIENT_CERT")]
    tls_client_cert: Option<PathBuf>,
    /// PEM client key for mutual TLS.
    #[arg(long, env = "TRUCK_SIM_TLS_CLIENT_KEY")]
    tls_client_key: Option<PathBuf>,
    /// QoS of position messages.
    #[arg(long, env = "TRUCK_SIM_QOS", default_value_t = 0)]
    qos: u8,
    /// Topic prefix: messages go to `<prefix>/<plate>`.
    #[arg(long, env = "TRUCK_SIM_PREFIX", default_value = "trucks")]
    prefix: String,
    /// MQTT client id prefix: client ids are `<client-id-prefix><plate>`.
    #[arg(long, env = "TRUCK_SIM_CLIENT_ID_PREFIX", default_value = "truck-")]
    client_id_prefix: String,
    /// Publish interval per truck, milliseconds.
    #[arg(long, env = "TRUCK_SIM_INTERVAL_MS", default_value_t = 1000)]
    interval_ms: u64,
    /// MQTT keep-alive, seconds.
    #[arg(long, env = "TRUCK_SIM_KEEP_ALIVE_SECS", default_value_t = 60)]
    keep_alive_secs: u64,
    /// MQTT connect timeout, seconds.
    #[arg(long, env = "TRUCK_SIM_CONNECT_TIMEOUT_SECS", default_value_t = 10)]
    connect_timeout_secs: u64,
    /// First reconnect delay (doubles on each failure), milliseconds.
    #[arg(long, env = "TRUCK_SIM_RECONNECT_MIN_MS", default_value_t = 500)]
    reconnect_min_ms: u64,
    /// Longest reconnect delay, milliseconds.
    #[arg(long, env = "TRUCK_SIM_RECONNECT_MAX_MS", default_value_t = 30_000)]
    reconnect_max_ms: u64,

    /// OSRM base URL.
    #[arg(
        long,
        env = "TRUCK_SIM_OSRM_URL",
        default_value = "http://127.0.0.1:5000"
    )]
    osrm_url: String,
    /// Concurrent OSRM requests at most.
    #[arg(long, env = "TRUCK_SIM_ROUTE_CONCURRENCY", default_value_t = 32)]
    route_concurrency: usize,
    /// Timeout of one OSRM request, milliseconds.
    #[arg(long, env = "TRUCK_SIM_ROUTE_TIMEOUT_MS", default_value_t = 10_000)]
    route_timeout_ms: u64,
    /// Routes kept in the cache (0 disables it).
    #[arg(long, env = "TRUCK_SIM_ROUTE_CACHE_ENTRIES", default_value_t = 20_000)]
    route_cache_entries: usize,
    /// Memory budget of the route cache, MiB. A cached route is held whole
    /// (trucks drop the driven part only of routes they alone hold); it must
    /// hold every city pair's route for trucks to share them.
    #[arg(long, env = "TRUCK_SIM_ROUTE_CACHE_MB", default_value_t = 256)]
    route_cache_mb: usize,
    /// Route geometry is simplified within this many metres (0 keeps every point).
    #[arg(long, env = "TRUCK_SIM_SIMPLIFY_M", default_value_t = 3.0)]
    simplify_m: f64,
    /// Publish each truck's route ahead, retained, on `<prefix>/<plate>/route`.
    #[arg(long, env = "TRUCK_SIM_PUBLISH_ROUTES", default_value_t = true, action = clap::ArgAction::Set)]
    publish_routes: bool,
    /// First wait after a failed route request (doubles on each failure), milliseconds.
    #[arg(long, env = "TRUCK_SIM_ROUTE_RETRY_MIN_MS", default_value_t = 1000)]
    route_retry_min_ms: u64,
    /// Longest wait between route retries, milliseconds.
    #[arg(long, env = "TRUCK_SIM_ROUTE_RETRY_MAX_MS", default_value_t = 60_000)]
    route_retry_max_ms: u64,

    /// Random points in this box instead of Italian cities: lon_min,lat_min,lon_max,lat_max
    /// (e.g. 7.409,43.725,7.439,43.752 for Monaco).
    #[arg(long, env = "TRUCK_SIM_AREA")]
    area: Option<Area>,
    /// Start points and destinations are moved up to this far from the city
    /// centre, km. 0 (the default) makes trucks share one route per city pair
    /// (at most 49 x 48 routes whatever the fleet size); each km of jitter
    /// makes nearly every route unique: tens of KB a truck on OSM-dense roads.
    #[arg(long, env = "TRUCK_SIM_JITTER_KM", default_value_t = 0.0)]
    jitter_km: f64,
    /// Speed limit of every truck, km/h (OSRM's annotated speeds are capped to it;
    /// routes store them in 0.5 km/h steps up to 127.5 km/h).
    #[arg(long, env = "TRUCK_SIM_MAX_SPEED_KMH", default_value_t = 90.0)]
    max_speed_kmh: f64,
    /// Shortest rest at a destination, seconds.
    #[arg(long, env = "TRUCK_SIM_REST_MIN_SECS", default_value_t = 5.0)]
    rest_min_secs: f64,
    /// Longest rest at a destination, seconds.
    #[arg(long, env = "TRUCK_SIM_REST_MAX_SECS", default_value_t = 60.0)]
    rest_max_secs: f64,
    /// Put each truck at a random point of its first route (true) or at its depot (false).
    #[arg(long, env = "TRUCK_SIM_SPREAD_START", default_value_t = true, action = clap::ArgAction::Set)]
    spread_start: bool,

    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464), path /metrics.
    #[arg(long, env = "TRUCK_SIM_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Console progress line every this many seconds (0 = off).
    #[arg(long, env = "TRUCK_SIM_PROGRESS_SECS", default_value_t = 5)]
    progress_secs: u64,
    /// Stop after this many seconds (0 = run until Ctrl-C / SIGTERM).
    #[arg(long, env = "TRUCK_SIM_DURATION_SECS", default_value_t = 0)]
    duration_secs: u64,
}

impl Args {
    fn validate(&self) -> anyhow::Result<()> {
        if self.interval_ms == 0 {
            bail!("--interval-ms must be > 0");
        }
        if !(self.ramp_per_sec.is_finite() && self.ramp_per_sec > 0.0) {
            bail!("--ramp-per-sec must be > 0");
        }
        if !(self.max_speed_kmh.is_finite() && self.max_speed_kmh > 0.0) {
            bail!("--max-speed-kmh must be > 0");
        }
        let rest_ok = self.rest_min_secs >= 0.0
            && self.rest_max_secs >= self.rest_min_secs
            && self.rest_max_secs <= 86_400.0;
        if !rest_ok {
            bail!("need 0 <= --rest-min-secs <= --rest-max-secs <= 86400");
        }
        if !(self.jitter_km.is_finite() && self.jitter_km >= 0.0) {
            bail!("--jitter-km must be >= 0");
        }
        if self.prefix.is_empty() || self.prefix.contains(['+', '#']) {
            bail!("--prefix must be a non-empty topic without wildcards");
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            bail!("need 0 < --reconnect-min-ms <= --reconnect-max-ms");
        }
        if self.route_retry_min_ms == 0 || self.route_retry_max_ms < self.route_retry_min_ms {
            bail!("need 0 < --route-retry-min-ms <= --route-retry-max-ms");
        }
        if !(self.simplify_m.is_finite() && (0.0..=100.0).contains(&self.simplify_m)) {
            bail!("--simplify-m must be within 0..=100");
        }
        if self.username.is_none() && self.password.is_some() {
            bail!("--password needs --username");
        }
        let websocket = matches!(self.transport, TransportKind::Ws | TransportKind::Wss);
        if websocket && !cfg!(feature = "websocket") {
            bail!(
                "--transport ws and wss need a truck-sim built with WebSocket support \
                 (cargo build --release -p truck-sim --features websocket)"
            );
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    args.validate()?;
    fix_mmap_threshold();
    if args.list_plates {
        return list_plates(args.seed, args.trucks);
    }
    raise_fd_limit(args.trucks);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run(args))
}

/// Pins glibc's mmap threshold at its initial 128 KiB. By default glibc raises
/// it to the size of each large block freed (OSRM answers are hundreds of KB),
/// after which every connection's 256 KiB rumqttc QoS 2 table (`calloc`ed,
/// mostly never touched) can come from a thread arena and be zeroed page by
/// page. Mapped blocks stay untouched until used and go back to the OS when
/// freed. It lowered, but did not stop, the RSS growth of the 15,000-truck
/// runs in docs/benchmarks.md.
fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator parameter; called once at
        // start-up, before any other thread exists.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
        if ok != 1 {
            tracing::warn!("could not pin the malloc mmap threshold");
        }
    }
}

/// Prints the plates of a fleet of `n` trucks, in start order.
fn list_plates(seed: u64, n: usize) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut issuer = PlateIssuer::for_fleet(seed);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for _ in 0..n {
        let plate = issuer.issue().context("ran out of unique plates")?;
        writeln!(out, "{plate}")?;
    }
    out.flush()?;
    Ok(())
}

/// Raises the soft open-files limit to the hard limit: every truck holds a socket.
fn raise_fd_limit(trucks: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            let need = trucks as u64 + 256;
            if limit < need {
                tracing::warn!(
                    limit,
                    need,
                    "open-files limit is below the number of trucks; some connections will fail"
                );
            } else {
                tracing::debug!(limit, "open-files limit");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let seed = args.seed;
    let stats = Arc::new(Stats::default());
    stats.trucks_target.store(args.trucks as u64, Relaxed);

    let (tls_ca, tls_client) = MqttSettings::load_tls(
        args.tls_ca_file.as_deref(),
        args.tls_client_cert.as_deref(),
        args.tls_client_key.as_deref(),
    )?;
    if tls_client.is_some() && tls_ca.is_none() {
        bail!("mutual TLS (--tls-client-cert) needs --tls-ca-file");
    }
    let settings = Arc::new(MqttSettings {
        host: args.mqtt_host.clone(),
        port: args.mqtt_port,
        transport: args.transport,
        ws_path: args.ws_path.clone(),
        credentials: args
            .username
            .clone()
            .map(|u| (u, args.password.clone().unwrap_or_default())),
        tls_ca,
        tls_client,
        keep_alive: Duration::from_secs(args.keep_alive_secs.max(5)),
        connect_timeout: Duration::from_secs(args.connect_timeout_secs.max(1)),
        backoff_min: Duration::from_millis(args.reconnect_min_ms),
        backoff_max: Duration::from_millis(args.reconnect_max_ms),
    });
    let qos = mqtt::qos_from_level(args.qos)?;

    let client = OsrmClient::new(
        &args.osrm_url,
        Duration::from_millis(args.route_timeout_ms.max(100)),
        args.route_concurrency,
        args.simplify_m,
    )?;
    let cache = RouteCache::new(args.route_cache_entries, args.route_cache_mb << 20);
    let routes = Arc::new(RouteService::new(
        client,
        args.route_concurrency,
        cache,
        Arc::clone(&stats),
    ));
    let places = match args.area {
        Some(a) => Places::Area(a),
        None => Places::Cities {
            cities: ITALIAN_CITIES,
            jitter_km: args.jitter_km,
        },
    };
    let fleet = Arc::new(FleetConfig {
        places,
        routes,
        stats: Arc::clone(&stats),
        interval: Duration::from_millis(args.interval_ms),
        max_speed_kmh: args.max_speed_kmh,
        rest_min: Duration::from_secs_f64(args.rest_min_secs),
        rest_max: Duration::from_secs_f64(args.rest_max_secs),
        route_retry_min: Duration::from_millis(args.route_retry_min_ms),
        route_retry_max: Duration::from_millis(args.route_retry_max_ms),
        qos,
        prefix: args.prefix.trim_end_matches('/').to_string(),
        spread_start: args.spread_start,
        publish_routes: args.publish_routes,
    });

    tracing::info!(
        trucks = args.trucks,
        seed,
        broker = %format!("{:?} {}:{}", args.transport, args.mqtt_host, args.mqtt_port),
        osrm = %args.osrm_url,
        prefix = %fleet.prefix,
        area = ?args.area,
        "starting truck fleet"
    );

    if let Some(addr) = args.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr}"))?;
        tracing::info!(%addr, "Prometheus metrics on http://{addr}/metrics");
        tokio::spawn(serve_metrics(listener, Arc::clone(&stats)));
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let progress = (args.progress_secs > 0).then(|| {
        tokio::spawn(progress_loop(
            Arc::clone(&stats),
            Duration::from_secs(args.progress_secs),
        ))
    });

    let spawner = tokio::spawn(spawn_fleet(
        args.trucks,
        args.ramp_per_sec,
        seed,
        args.client_id_prefix.clone(),
        Arc::clone(&settings),
        Arc::clone(&fleet),
        shutdown_rx.clone(),
    ));

    wait_for_stop(args.duration_secs).await;
    tracing::info!("stopping: disconnecting trucks");
    let _ = shutdown_tx.send(true);
    spawner.abort();
    // Give trucks a moment to send DISCONNECT.
    let deadline = Instant::now() + Duration::from_secs(3);
    while stats.mqtt_connected.load(Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(p) = progress {
        p.abort();
    }
    let s = stats.snapshot();
    tracing::info!(
        published = s.msgs_published,
        routes = s.route_ok,
        route_cache_hits = s.route_cache_hits,
        route_errors = stats.route_errors.load(Relaxed),
        no_route = stats.route_no_route.load(Relaxed),
        connect_failures = stats.mqtt_connect_failures.load(Relaxed),
        disconnects = stats.mqtt_disconnects.load(Relaxed),
        "stopped"
    );
    Ok(())
}

async fn wait_for_stop(duration_secs: u64) {
    let timer = async {
        if duration_secs > 0 {
            tokio::time::sleep(Duration::from_secs(duration_secs)).await
        } else {
            std::future::pending::<()>().await
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = timer => {}
        _ = term => {}
        r = tokio::signal::ctrl_c() => {
            if r.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Starts `n` trucks at `per_sec`, each with its own MQTT connection.
async fn spawn_fleet(
    n: usize,
    per_sec: f64,
    seed: u64,
    client_id_prefix: String,
    settings: Arc<MqttSettings>,
    fleet: Arc<FleetConfig>,
    shutdown: watch::Receiver<bool>,
) {
    let mut master = StdRng::seed_from_u64(seed);
    let mut plates = PlateIssuer::for_fleet(seed);
    let t0 = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut spawned = 0usize;
    while spawned < n {
        ticker.tick().await;
        let due = ((t0.elapsed().as_secs_f64() * per_sec) as usize + 1).min(n);
        while spawned < due {
            let Some(plate) = plates.issue() else {
                tracing::error!(spawned, "ran out of unique plates");
                return;
            };
            let plate: Arc<str> = plate.into();
            let client_id = format!("{client_id_prefix}{plate}");
            let (client, eventloop) = settings.connect(&client_id, 4);
            let connected = Arc::new(AtomicBool::new(false));
            tokio::spawn(mqtt::drive_connection(
                eventloop,
                Arc::clone(&settings),
                Arc::clone(&connected),
                Arc::clone(&fleet.stats),
                shutdown.clone(),
                Arc::clone(&plate),
            ));
            let truck = Truck {
                start: fleet.places.start(&mut master),
                rng: SmallRng::seed_from_u64(master.gen()),
                plate,
                client,
                connected,
                route_news: None,
            };
            tokio::spawn(truck.run(Arc::clone(&fleet), shutdown.clone()));
            spawned += 1;
            fleet.stats.trucks_spawned.store(spawned as u64, Relaxed);
        }
    }
    tracing::info!(
        trucks = n,
        secs = t0.elapsed().as_secs_f64(),
        "all trucks started"
    );
}

async fn progress_loop(stats: Arc<Stats>, every: Duration) {
    let mut prev = stats.snapshot();
    let mut last = Instant::now();
    let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        ticker.tick().await;
        let line = stats.progress_line(&prev, last.elapsed());
        prev = stats.snapshot();
        last = Instant::now();
        tracing::info!("{line}");
    }
}

/// A minimal HTTP/1.1 server for `GET /metrics`.
async fn serve_metrics(listener: tokio::net::TcpListener, stats: Arc<Stats>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let mut len = 0;
            let read = async {
                while len < buf.len() {
                    let n = sock.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            };
            if tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .is_err()
            {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, ctype, body) = if path == "/metrics" || path.starts_with("/metrics?") {
                (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    stats.prometheus(),
                )
            } else {
                (
                    "404 Not Found",
                    "text/plain",
                    "not found; try /metrics\n".to_string(),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
