//! A small OSRM HTTP client (`/route/v1/driving`) plus the shared route service:
//! bounded concurrency, a cache and error classification.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::{oneshot, Semaphore};

use crate::places::LonLat;
use crate::route::{Annotations, Route};
use crate::stats::Stats;

/// Why no route was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// OSRM answered, but there is no route between these points (or one of
    /// them cannot be snapped to a road): pick another destination.
    NoRoute(String),
    /// Network error, timeout, 5xx, unparsable answer: try again later.
    Transient(String),
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoRoute(m) => write!(f, "no route: {m}"),
            Self::Transient(m) => write!(f, "OSRM error: {m}"),
        }
    }
}

impl std::error::Error for RouteError {}

#[derive(Debug, Deserialize)]
struct OsrmResponse {
    code: String,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    routes: Vec<OsrmRoute>,
}

#[derive(Debug, Deserialize)]
struct OsrmRoute {
    distance: f64,
    duration: f64,
    /// `geometries=polyline6`: an encoded polyline with 6 decimals, a third
    /// of the size of GeoJSON and far cheaper to parse (routes on real roads
    /// carry thousands of points).
    geometry: String,
    #[serde(default)]
    legs: Vec<OsrmLeg>,
}

#[derive(Debug, Deserialize)]
struct OsrmLeg {
    #[serde(default)]
    annotation: Option<OsrmAnnotation>,
}

#[derive(Debug, Default, Deserialize)]
struct OsrmAnnotation {
    #[serde(default)]
    speed: Vec<f64>,
    #[serde(default)]
    duration: Vec<f64>,
    #[serde(default)]
    distance: Vec<f64>,
}

/// OSRM codes meaning "these points cannot be routed": retrying will not help.
const NO_ROUTE_CODES: &[&str] = &["NoRoute", "NoSegment", "NoMatch", "NoTrips", "InvalidValue"];

/// Parses an OSRM `/route` answer (any HTTP status) into a [`Route`] whose
/// geometry is simplified within `simplify_m` metres (0 keeps every point).
pub fn parse_route_response(
    status: u16,
    body: &[u8],
    simplify_m: f64,
) -> Result<Route, RouteError> {
    let resp: OsrmResponse = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return Err(RouteError::Transient(format!(
                "HTTP {status}, unparsable body ({e})"
            )))
        }
    };
    if resp.code != "Ok" {
        let msg = format!(
            "{}: {}",
            resp.code,
            resp.message.as_deref().unwrap_or("(no message)")
        );
        return Err(if NO_ROUTE_CODES.contains(&resp.code.as_str()) {
            RouteError::NoRoute(msg)
        } else {
            RouteError::Transient(msg)
        });
    }
    let Some(r) = resp.routes.into_iter().next() else {
        return Err(RouteError::NoRoute("Ok without routes".into()));
    };
    // With two waypoints there is one leg; with more, annotations are concatenated.
    let mut ann = Annotations::default();
    for leg in r.legs {
        let a = leg.annotation.unwrap_or_default();
        ann.speed_mps.extend(a.speed);
        ann.duration_s.extend(a.duration);
        ann.distance_m.extend(a.distance);
    }
    let fallback = if r.duration > 0.0 {
        r.distance / r.duration
    } else {
        0.0
    };
    let line = polyline::decode_polyline(&r.geometry, 6)
        .map_err(|e| RouteError::Transient(format!("undecodable route geometry: {e}")))?;
    let coords: Vec<[f64; 2]> = line.0.iter().map(|c| [c.x, c.y]).collect();
    Route::simplified(&coords, &ann, fallback, simplify_m)
        .map_err(|e| RouteError::NoRoute(e.to_string()))
}

/// The HTTP part: one `GET /route/v1/driving/...` per call.
#[derive(Clone)]
pub struct OsrmClient {
    http: reqwest::Client,
    base: String,
    simplify_m: f64,
}

impl OsrmClient {
    /// A client whose routes are simplified within `simplify_m` metres.
    pub fn new(
        base_url: &str,
        timeout: Duration,
        pool: usize,
        simplify_m: f64,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(pool)
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            simplify_m,
        })
    }

    pub fn route_url(&self, from: LonLat, to: LonLat) -> String {
        format!(
            "{}/route/v1/driving/{:.6},{:.6};{:.6},{:.6}?overview=full&geometries=polyline6&annotations=speed&steps=false",
            self.base, from.lon, from.lat, to.lon, to.lat
        )
    }

    pub async fn route(&self, from: LonLat, to: LonLat) -> Result<Route, RouteError> {
        let url = self.route_url(from, to);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| RouteError::Transient(describe(&e)))?;
        let status = resp.status().as_u16();
        if status >= 500 {
            return Err(RouteError::Transient(format!("HTTP {status}")));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| RouteError::Transient(describe(&e)))?;
        parse_route_response(status, &body, self.simplify_m)
    }
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connection refused or unreachable".into()
    } else {
        e.to_string()
    }
}

/// Cache key: both ends rounded to 1e-4 degree (~10 m).
pub type CacheKey = [i32; 4];

pub fn cache_key(from: LonLat, to: LonLat) -> CacheKey {
    let r = |x: f64| (x * 1e4).round() as i32;
    [r(from.lon), r(from.lat), r(to.lon), r(to.lat)]
}

/// A bounded route cache with approximate LRU eviction: when over budget,
/// the least recently used eighth of the entries is dropped in one go.
pub struct RouteCache {
    map: HashMap<CacheKey, (Arc<Route>, u64)>,
    clock: u64,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl RouteCache {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            map: HashMap::new(),
            clock: 0,
            bytes: 0,
            max_entries,
            max_bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn get(&mut self, key: &CacheKey) -> Option<Arc<Route>> {
        self.clock += 1;
        let clock = self.clock;
        self.map.get_mut(key).map(|(r, used)| {
            *used = clock;
            Arc::clone(r)
        })
    }

    pub fn insert(&mut self, key: CacheKey, route: Arc<Route>) {
        if self.max_entries == 0 {
            return;
        }
        self.clock += 1;
        self.bytes += route.heap_bytes();
        if let Some((old, _)) = self.map.insert(key, (route, self.clock)) {
            self.bytes -= old.heap_bytes();
        }
        if self.map.len() > self.max_entries || self.bytes > self.max_bytes {
            self.evict();
        }
    }

    fn evict(&mut self) {
        let mut ages: Vec<u64> = self.map.values().map(|(_, used)| *used).collect();
        let target = (self.map.len() / 8).max(1);
        let (_, cutoff, _) = ages.select_nth_unstable(target - 1);
        let cutoff = *cutoff;
        let mut freed = 0;
        self.map.retain(|_, (r, used)| {
            let keep = *used > cutoff;
            if !keep {
                freed += r.heap_bytes();
            }
            keep
        });
        self.bytes -= freed;
        if self.bytes > self.max_bytes && !self.map.is_empty() {
            self.evict();
        }
    }
}

type RouteResult = Result<Arc<Route>, RouteError>;

/// Shared by all trucks: cache, then OSRM with at most `concurrency` requests
/// at once. Trucks asking for the same route while it is being fetched wait for
/// that one request and share its result, so a fleet leaving the same depots
/// holds one copy of each route (what bounds truck-sim's memory).
pub struct RouteService {
    client: OsrmClient,
    permits: Semaphore,
    cache: Mutex<RouteCache>,
    /// Requests in flight, with the trucks waiting for the same key.
    inflight: Mutex<HashMap<CacheKey, Vec<oneshot::Sender<RouteResult>>>>,
    stats: Arc<Stats>,
}

/// Removes an in-flight entry however its request ends; waiters whose sender
/// is dropped without a result (the fetching truck stopped) retry.
struct InflightGuard<'a> {
    service: &'a RouteService,
    key: CacheKey,
}

impl InflightGuard<'_> {
    fn take_waiters(&self) -> Vec<oneshot::Sender<RouteResult>> {
        let mut map = self
            .service
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.remove(&self.key).unwrap_or_default()
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        drop(self.take_waiters());
    }
}

impl RouteService {
    pub fn new(
        client: OsrmClient,
        concurrency: usize,
        cache: RouteCache,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            client,
            permits: Semaphore::new(concurrency.max(1)),
            cache: Mutex::new(cache),
            inflight: Mutex::new(HashMap::new()),
            stats,
        }
    }

    pub async fn route(&self, from: LonLat, to: LonLat) -> Result<Arc<Route>, RouteError> {
        let stats = &self.stats;
        stats.route_requests.fetch_add(1, Relaxed);
        let key = cache_key(from, to);
        if let Some(r) = self.cache_get(&key) {
            stats.route_cache_hits.fetch_add(1, Relaxed);
            stats.route_ok.fetch_add(1, Relaxed);
            return Ok(r);
        }
        let joined = {
            let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match map.get_mut(&key) {
                Some(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    map.insert(key, Vec::new());
                    None
                }
            }
        };
        if let Some(rx) = joined {
            let result = rx.await.unwrap_or_else(|_| {
                Err(RouteError::Transient(
                    "shared route request was cancelled".into(),
                ))
            });
            if result.is_ok() {
                stats.route_cache_hits.fetch_add(1, Relaxed);
                stats.route_ok.fetch_add(1, Relaxed);
            }
            return result;
        }
        let guard = InflightGuard { service: self, key };
        let result = self.fetch(from, to, key).await;
        for waiter in guard.take_waiters() {
            let _ = waiter.send(result.clone());
        }
        result
    }

    /// One OSRM request (after a concurrency slot); a route goes into the cache.
    async fn fetch(&self, from: LonLat, to: LonLat, key: CacheKey) -> RouteResult {
        let stats = &self.stats;
        stats.route_queued.fetch_add(1, Relaxed);
        let permit = self.permits.acquire().await;
        stats.route_queued.fetch_sub(1, Relaxed);
        let _permit = permit.map_err(|_| RouteError::Transient("route service closed".into()))?;
        stats.route_in_flight.fetch_add(1, Relaxed);
        let t0 = Instant::now();
        let result = self.client.route(from, to).await;
        stats
            .route_latency_us_sum
            .fetch_add(t0.elapsed().as_micros() as u64, Relaxed);
        stats.route_in_flight.fetch_sub(1, Relaxed);
        match result {
            Ok(route) => {
                stats
                    .route_points_received
                    .fetch_add(route.received_points() as u64, Relaxed);
                stats
                    .route_points_kept
                    .fetch_add(route.len_points() as u64, Relaxed);
                stats
                    .route_length_m
                    .fetch_add(route.total_len_m() as u64, Relaxed);
                let route = Arc::new(route);
                self.cache_put(key, Arc::clone(&route));
                stats.route_ok.fetch_add(1, Relaxed);
                Ok(route)
            }
            Err(e) => {
                match e {
                    RouteError::NoRoute(_) => stats.route_no_route.fetch_add(1, Relaxed),
                    RouteError::Transient(_) => stats.route_errors.fetch_add(1, Relaxed),
                };
                Err(e)
            }
        }
    }

    fn cache_get(&self, key: &CacheKey) -> Option<Arc<Route>> {
        self.cache.lock().ok()?.get(key)
    }

    fn cache_put(&self, key: CacheKey, route: Arc<Route>) {
        if let Ok(mut c) = self.cache.lock() {
            c.insert(key, route);
            self.stats
                .route_cache_entries
                .store(c.len() as i64, Relaxed);
            self.stats
                .route_cache_bytes
                .store(c.bytes() as i64, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"{"code":"Ok","waypoints":[],"routes":[{"distance":300.0,"duration":30.0,
        "weight":30.0,"weight_name":"routability",
        "geometry":"_dalrA_tgcM?o}@o}@o}@",
        "legs":[{"distance":300.0,"duration":30.0,"summary":"","steps":[],
          "annotation":{"speed":[8.1,0],"duration":[10,20],"distance":[80.5,0]}}]}]}"#;

    #[test]
    fn osrm_ok_response_becomes_a_route() {
        let r = parse_route_response(200, OK.as_bytes(), 0.0).unwrap();
        assert_eq!(r.len_points(), 3);
        assert_eq!(r.start(), LonLat::new(7.41, 43.73));
        crate::route::tests::assert_speed(&r, 0, 8.1);
        // speed 0 and distance 0: falls back to the route average 300/30 m/s.
        crate::route::tests::assert_speed(&r, 1, 10.0);
    }

    #[test]
    fn osrm_no_route_is_not_retryable() {
        let body = br#"{"code":"NoRoute","message":"Impossible route between points"}"#;
        assert!(matches!(
            parse_route_response(400, body, 0.0),
            Err(RouteError::NoRoute(_))
        ));
        let body = br#"{"code":"NoSegment","message":"Could not find a matching segment"}"#;
        assert!(matches!(
            parse_route_response(400, body, 0.0),
            Err(RouteError::NoRoute(_))
        ));
    }

    #[test]
    fn osrm_garbage_or_other_codes_are_transient() {
        assert!(matches!(
            parse_route_response(502, b"<html>bad gateway</html>", 0.0),
            Err(RouteError::Transient(_))
        ));
        assert!(matches!(
            parse_route_response(429, br#"{"code":"TooBig"}"#, 0.0),
            Err(RouteError::Transient(_))
        ));
    }

    #[test]
    fn osrm_polyline6_geometry_is_decoded_in_lon_lat_order() {
        let r = parse_route_response(200, OK.as_bytes(), 0.0).unwrap();
        assert_eq!(r.point(1), LonLat::new(7.411, 43.73));
        assert_eq!(r.end(), LonLat::new(7.412, 43.731));
    }

    #[test]
    fn osrm_undecodable_geometry_is_transient() {
        let body = br#"{"code":"Ok","routes":[{"distance":1,"duration":1,"geometry":"_dal\u00ff","legs":[]}]}"#;
        assert!(matches!(
            parse_route_response(200, body, 0.0),
            Err(RouteError::Transient(_))
        ));
    }

    #[test]
    fn osrm_single_point_geometry_is_no_route() {
        let body = br#"{"code":"Ok","routes":[{"distance":0,"duration":0,
            "geometry":"_dalrA_tgcM","legs":[]}]}"#;
        assert!(matches!(
            parse_route_response(200, body, 0.0),
            Err(RouteError::NoRoute(_))
        ));
    }

    #[test]
    fn route_url_has_lon_lat_order_and_annotations() {
        let c = OsrmClient::new("http://127.0.0.1:5000/", Duration::from_secs(1), 1, 0.0).unwrap();
        assert_eq!(
            c.route_url(
                LonLat::new(7.41337, 43.72956),
                LonLat::new(7.42197, 43.7386)
            ),
            "http://127.0.0.1:5000/route/v1/driving/7.413370,43.729560;7.421970,43.738600\
             ?overview=full&geometries=polyline6&annotations=speed&steps=false"
        );
    }

    #[test]
    fn cache_key_rounds_to_about_ten_metres() {
        let a = cache_key(
            LonLat::new(9.19001, 45.46421),
            LonLat::new(14.26811, 40.85181),
        );
        let b = cache_key(
            LonLat::new(9.19004, 45.46419),
            LonLat::new(14.26809, 40.85184),
        );
        assert_eq!(a, b);
        let c = cache_key(
            LonLat::new(9.1902, 45.46421),
            LonLat::new(14.26811, 40.85181),
        );
        assert_ne!(a, c);
    }

    fn small_route() -> Arc<Route> {
        Arc::new(parse_route_response(200, OK.as_bytes(), 0.0).unwrap())
    }

    #[test]
    fn cache_returns_what_was_inserted() {
        let mut c = RouteCache::new(10, usize::MAX);
        c.insert([1, 2, 3, 4], small_route());
        assert!(c.get(&[1, 2, 3, 4]).is_some());
        assert!(c.get(&[1, 2, 3, 5]).is_none());
    }

    #[test]
    fn cache_evicts_least_recently_used_over_capacity() {
        let mut c = RouteCache::new(16, usize::MAX);
        for i in 0..16 {
            c.insert([i, 0, 0, 0], small_route());
        }
        // Touch entry 0 so that it is the most recently used.
        assert!(c.get(&[0, 0, 0, 0]).is_some());
        c.insert([99, 0, 0, 0], small_route());
        assert!(c.len() <= 16);
        assert!(c.get(&[0, 0, 0, 0]).is_some());
        assert!(c.get(&[99, 0, 0, 0]).is_some());
        assert!(c.get(&[1, 0, 0, 0]).is_none());
    }

    #[test]
    fn cache_respects_its_byte_budget() {
        let one = small_route().heap_bytes();
        let mut c = RouteCache::new(1000, one * 10);
        for i in 0..100 {
            c.insert([i, 0, 0, 0], small_route());
            assert!(c.bytes() <= one * 10);
        }
        assert!(!c.is_empty());
    }
}
