//! One simulated truck: drives OSRM routes and publishes its position every tick.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::rngs::SmallRng;
use rand::Rng;
use rumqttc::{AsyncClient, QoS};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::follow::Follower;
use crate::message::{PositionMessage, TruckState};
use crate::osrm::{RouteError, RouteService};
use crate::places::{LonLat, Places};
use crate::route::{Route, SpeedCap};
use crate::route_message::{
    route_topic, RouteAheadMessage, OUTLINE_MAX_POINTS, OUTLINE_TOLERANCE_M,
};
use crate::stats::Stats;

/// How long a new truck waits for its first route before it starts
/// publishing its depot position anyway.
const FIRST_ROUTE_GRACE: Duration = Duration::from_secs(10);

/// Settings shared by every truck.
pub struct FleetConfig {
    pub places: Places,
    pub routes: Arc<RouteService>,
    pub stats: Arc<Stats>,
    pub interval: Duration,
    pub max_speed_kmh: f64,
    pub rest_min: Duration,
    pub rest_max: Duration,
    pub route_retry_min: Duration,
    pub route_retry_max: Duration,
    pub qos: QoS,
    pub prefix: String,
    /// Start each truck at a random point of its first route, so that the
    /// fleet is spread over the roads at once instead of leaving the depots.
    pub spread_start: bool,
    /// Publish each truck's route ahead, retained, on `<prefix>/<plate>/route`.
    pub publish_routes: bool,
}

/// A change of route that the retained route topic has yet to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteNews {
    /// Set off on a new route: publish it.
    Started,
    /// Arrived: clear the retained route (empty payload).
    Ended,
}

/// What the truck is doing between two ticks.
enum Activity {
    /// Waiting for a route to `dest`.
    Routing {
        dest: LonLat,
        task: JoinHandle<Result<Arc<Route>, RouteError>>,
    },
    /// Route request failed; try again at `at` (to `dest`, or elsewhere if `None`).
    RetryAt {
        at: Instant,
        dest: Option<LonLat>,
    },
    Driving(Follower),
    Resting {
        until: Instant,
    },
}

pub struct Truck {
    pub plate: Arc<str>,
    pub client: AsyncClient,
    pub connected: Arc<AtomicBool>,
    pub rng: SmallRng,
    pub start: LonLat,
    /// Route change not yet published (kept until the client accepts it).
    pub route_news: Option<RouteNews>,
}

impl Truck {
    pub async fn run(mut self, fleet: Arc<FleetConfig>, mut shutdown: watch::Receiver<bool>) {
        let stats = Arc::clone(&fleet.stats);
        let topic = format!("{}/{}", fleet.prefix, self.plate);
        let route_topic = route_topic(&fleet.prefix, &self.plate);
        let cap = SpeedCap::from_kmh(fleet.max_speed_kmh, self.rng.gen_range(0.88..=1.0));
        let mut pos = self.start;
        let mut heading = 0.0;
        let mut first_route = true;
        // Until the first route arrives (or FIRST_ROUTE_GRACE passes) the truck
        // stays silent, so that a spread start does not show a jump from the depot.
        let mut published_any = false;
        let silent_until = Instant::now() + FIRST_ROUTE_GRACE;
        let mut route_failures: u32 = 0;
        let mut gauge = StateGauge::new(&stats);

        let dest = fleet.places.destination(pos, &mut self.rng);
        let mut activity = Activity::Routing {
            dest,
            task: spawn_route(&fleet.routes, pos, dest),
        };

        // Spread the ticks of the fleet evenly over the interval.
        let phase = self
            .rng
            .gen_range(Duration::ZERO..fleet.interval.max(Duration::from_millis(1)));
        let mut ticker = tokio::time::interval_at(Instant::now() + phase, fleet.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last = Instant::now();

        loop {
            tokio::select! {
                now = ticker.tick() => {
                    let dt = now.saturating_duration_since(last).as_secs_f64();
                    last = now;
                    let spread = fleet.spread_start && !published_any;
                    activity = self.step(activity, now, dt, &fleet, &cap, &mut pos,
                        &mut first_route, spread, &mut route_failures).await;
                    if first_route && now < silent_until {
                        continue;
                    }
                    let (state, speed, next) = match &activity {
                        Activity::Driving(f) => {
                            heading = f.heading_deg();
                            (TruckState::Driving, f.current_speed_mps(&cap), f.next_point())
                        }
                        _ => (TruckState::Resting, 0.0, pos),
                    };
                    gauge.set(state);
                    if fleet.publish_routes {
                        self.publish_route_news(&fleet, &route_topic, &activity);
                    }
                    self.publish(&fleet, &topic, pos, next, speed, heading, state);
                    published_any = true;
                }
                _ = shutdown.changed() => break,
            }
        }
        if let Activity::Routing { task, .. } = activity {
            task.abort();
        }
        gauge.clear();
        let _ = self.client.try_disconnect();
    }

    #[allow(clippy::too_many_arguments)]
    async fn step(
        &mut self,
        activity: Activity,
        now: Instant,
        dt: f64,
        fleet: &FleetConfig,
        cap: &SpeedCap,
        pos: &mut LonLat,
        first_route: &mut bool,
        spread: bool,
        route_failures: &mut u32,
    ) -> Activity {
        match activity {
            Activity::Routing { dest, task } => {
                if !task.is_finished() {
                    return Activity::Routing { dest, task };
                }
                // Finished: awaiting returns at once. A panicked task counts as transient.
                let result = task
                    .await
                    .unwrap_or_else(|e| Err(RouteError::Transient(format!("route task: {e}"))));
                match result {
                    Ok(route) => {
                        *route_failures = 0;
                        let mut f = Follower::new(route);
                        if *first_route && spread {
                            let total = f.route().total_len_m();
                            f.skip(self.rng.gen_range(0.0..=total * 0.9));
                        }
                        *first_route = false;
                        *pos = f.position();
                        self.route_news = Some(RouteNews::Started);
                        Activity::Driving(f)
                    }
                    Err(RouteError::NoRoute(msg)) => {
                        tracing::debug!(plate = %self.plate, %msg, "no route, choosing another destination");
                        *route_failures = route_failures.saturating_add(1);
                        // Small pause so that an unroutable start point does not spin.
                        let wait = fleet.route_retry_min.mul_f64(self.rng.gen_range(1.0..=2.0));
                        Activity::RetryAt {
                            at: now + wait,
                            dest: None,
                        }
                    }
                    Err(RouteError::Transient(msg)) => {
                        let wait = crate::mqtt::backoff_delay(
                            *route_failures,
                            fleet.route_retry_min,
                            fleet.route_retry_max,
                            &mut self.rng,
                        );
                        *route_failures = route_failures.saturating_add(1);
                        // The first few failures are worth seeing; after that, metrics tell.
                        if fleet.stats.route_errors.load(Relaxed) <= 10 {
                            tracing::warn!(plate = %self.plate, %msg, ?wait, "route request failed, retrying");
                        } else {
                            tracing::debug!(plate = %self.plate, %msg, ?wait, "route request failed, retrying");
                        }
                        Activity::RetryAt {
                            at: now + wait,
                            dest: Some(dest),
                        }
                    }
                }
            }
            Activity::RetryAt { at, dest } => {
                if now < at {
                    return Activity::RetryAt { at, dest };
                }
                let dest = dest.unwrap_or_else(|| fleet.places.destination(*pos, &mut self.rng));
                Activity::Routing {
                    dest,
                    task: spawn_route(&fleet.routes, *pos, dest),
                }
            }
            Activity::Driving(mut f) => {
                let step = f.advance(dt, cap);
                *pos = f.position();
                if step.arrived {
                    fleet.stats.arrivals.fetch_add(1, Relaxed);
                    self.route_news = Some(RouteNews::Ended);
                    let rest = self
                        .rng
                        .gen_range(fleet.rest_min..=fleet.rest_max.max(fleet.rest_min));
                    Activity::Resting { until: now + rest }
                } else {
                    Activity::Driving(f)
                }
            }
            Activity::Resting { until } => {
                if now < until {
                    return Activity::Resting { until };
                }
                let dest = fleet.places.destination(*pos, &mut self.rng);
                Activity::Routing {
                    dest,
                    task: spawn_route(&fleet.routes, *pos, dest),
                }
            }
        }
    }

    /// Publishes (retained) the route ahead of a truck that set off, or clears
    /// it on arrival; left pending while the client cannot take it.
    fn publish_route_news(&mut self, fleet: &FleetConfig, topic: &str, activity: &Activity) {
        let Some(news) = self.route_news else {
            return;
        };
        if !self.connected.load(Relaxed) {
            return;
        }
        let payload = match (news, activity) {
            (RouteNews::Started, Activity::Driving(f)) => {
                let outline = f.route().outline(
                    f.segment(),
                    f.position(),
                    OUTLINE_TOLERANCE_M,
                    OUTLINE_MAX_POINTS,
                );
                RouteAheadMessage::new(&self.plate, &outline, f.remaining_m(), SystemTime::now())
                    .to_json()
            }
            // Arrived, or the route is already over: clear it.
            _ => Vec::new(),
        };
        if self
            .client
            .try_publish(topic, fleet.qos, true, payload)
            .is_ok()
        {
            self.route_news = None;
            fleet.stats.routes_published.fetch_add(1, Relaxed);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        fleet: &FleetConfig,
        topic: &str,
        pos: LonLat,
        next: LonLat,
        speed_mps: f64,
        heading: f64,
        state: TruckState,
    ) {
        if !self.connected.load(Relaxed) {
            fleet.stats.msgs_dropped.fetch_add(1, Relaxed);
            return;
        }
        let payload = PositionMessage::new(
            &self.plate,
            pos,
            next,
            speed_mps,
            heading,
            state,
            SystemTime::now(),
        )
        .to_json();
        if self
            .client
            .try_publish(topic, fleet.qos, false, payload)
            .is_err()
        {
            fleet.stats.msgs_dropped.fetch_add(1, Relaxed);
        }
    }
}

fn spawn_route(
    routes: &Arc<RouteService>,
    from: LonLat,
    to: LonLat,
) -> JoinHandle<Result<Arc<Route>, RouteError>> {
    let routes = Arc::clone(routes);
    tokio::spawn(async move { routes.route(from, to).await })
}

/// Keeps the fleet's driving/resting gauges in step with one truck's state.
struct StateGauge<'a> {
    stats: &'a Stats,
    current: Option<TruckState>,
}

impl<'a> StateGauge<'a> {
    fn new(stats: &'a Stats) -> Self {
        Self {
            stats,
            current: None,
        }
    }

    fn counter(&self, s: TruckState) -> &'a AtomicI64 {
        match s {
            TruckState::Driving => &self.stats.trucks_driving,
            TruckState::Resting => &self.stats.trucks_resting,
        }
    }

    fn set(&mut self, s: TruckState) {
        if self.current == Some(s) {
            return;
        }
        if let Some(old) = self.current {
            self.counter(old).fetch_sub(1, Relaxed);
        }
        self.counter(s).fetch_add(1, Relaxed);
        self.current = Some(s);
    }

    fn clear(&mut self) {
        if let Some(old) = self.current.take() {
            self.counter(old).fetch_sub(1, Relaxed);
        }
    }
}
