//! Moving a truck along a [`Route`] in time.
//!
//! The position is interpolated on the straight Web-Mercator line between two
//! consecutive route points, so it always lies on the polyline as a map (and
//! OSRM's snapping) draws it. The
//! heading is the great-circle bearing from the current segment's start to its
//! end, i.e. from the previous route point towards the next one.

use std::sync::Arc;

use geo::{Bearing, Haversine};

use crate::places::LonLat;
use crate::route::{Route, SpeedCap};

/// A follower that alone holds its route drops the driven part once it has
/// passed at least this many segments and a quarter of what it holds.
const TRIM_MIN_SEGMENTS: usize = 32;

/// Where a truck is on its route.
#[derive(Debug, Clone)]
pub struct Follower {
    route: Arc<Route>,
    /// Index of the current segment; `== route.segments()` once arrived.
    seg: usize,
    /// Metres travelled into the current segment.
    along_m: f64,
    /// Distance travelled from the route start, metres.
    travelled_m: f64,
    last_heading: f64,
}

/// The outcome of one [`Follower::advance`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// Metres moved during this step.
    pub moved_m: f64,
    /// The (capped) speed on the segment the truck is on at the end of the
    /// step, m/s; 0 once arrived.
    pub speed_mps: f64,
    pub arrived: bool,
}

impl Follower {
    pub fn new(route: Arc<Route>) -> Self {
        let mut f = Self {
            route,
            seg: 0,
            along_m: 0.0,
            travelled_m: 0.0,
            last_heading: 0.0,
        };
        f.skip_empty_segments();
        f.last_heading = f.segment_bearing().unwrap_or(0.0);
        f
    }

    pub fn route(&self) -> &Arc<Route> {
        &self.route
    }

    /// Index of the segment the truck is on (`== route().segments()` once arrived).
    pub fn segment(&self) -> usize {
        self.seg
    }

    pub fn arrived(&self) -> bool {
        self.seg >= self.route.segments()
    }

    pub fn travelled_m(&self) -> f64 {
        self.travelled_m
    }

    pub fn remaining_m(&self) -> f64 {
        let behind: f64 = (0..self.seg.min(self.route.segments()))
            .map(|i| self.route.segment_len_m(i))
            .sum::<f64>()
            + self.along_m;
        (self.route.total_len_m() - behind).max(0.0)
    }

    /// Drops the route's driven part when this follower is its only holder
    /// (no cache entry, no other truck): what lies behind is never needed again.
    fn trim_behind(&mut self) {
        let seg = self.seg;
        if seg < TRIM_MIN_SEGMENTS || seg * 4 < self.route.segments() {
            return;
        }
        if let Some(route) = Arc::get_mut(&mut self.route) {
            let before = route.segments();
            route.drop_front(seg);
            self.seg -= before - route.segments();
        }
    }

    /// Jumps `distance_m` ahead along the route without simulating time (used
    /// to spread a fleet along its first routes at start-up).
    pub fn skip(&mut self, distance_m: f64) {
        let mut left = distance_m.max(0.0);
        while !self.arrived() && left > 0.0 {
            let rest = self.route.segment_len_m(self.seg) - self.along_m;
            if left < rest {
                self.along_m += left;
                self.travelled_m += left;
                left = 0.0;
            } else {
                left -= rest;
                self.travelled_m += rest;
                self.next_segment();
            }
        }
        if let Some(h) = self.segment_bearing() {
            self.last_heading = h;
        }
        self.trim_behind();
    }

    /// Drives for `dt_s` seconds at each segment's capped speed, crossing as
    /// many route points as the time allows.
    pub fn advance(&mut self, dt_s: f64, cap: &SpeedCap) -> Step {
        let mut time_left = dt_s.max(0.0);
        let mut moved = 0.0;
        while !self.arrived() && time_left > 0.0 {
            let v = cap.apply(self.route.segment_speed_mps(self.seg));
            let rest = self.route.segment_len_m(self.seg) - self.along_m;
            let t_end = rest / v;
            if t_end > time_left {
                let d = v * time_left;
                self.along_m += d;
                moved += d;
                time_left = 0.0;
            } else {
                moved += rest;
                time_left -= t_end;
                self.next_segment();
            }
        }
        self.travelled_m += moved;
        if let Some(h) = self.segment_bearing() {
            self.last_heading = h;
        }
        self.trim_behind();
        Step {
            moved_m: moved,
            speed_mps: self.current_speed_mps(cap),
            arrived: self.arrived(),
        }
    }

    /// The (capped) speed on the current segment, m/s; 0 once arrived.
    pub fn current_speed_mps(&self, cap: &SpeedCap) -> f64 {
        if self.arrived() {
            0.0
        } else {
            cap.apply(self.route.segment_speed_mps(self.seg))
        }
    }

    /// Current position on the polyline.
    pub fn position(&self) -> LonLat {
        if self.arrived() {
            return self.route.end();
        }
        let (a, b) = (self.route.point(self.seg), self.route.point(self.seg + 1));
        let len = self.route.segment_len_m(self.seg);
        let t = if len > 0.0 {
            (self.along_m / len).clamp(0.0, 1.0)
        } else {
            0.0
        };
        interpolate_mercator(a, b, t)
    }

    /// The next route point ahead of the truck (the end of the current segment).
    pub fn next_point(&self) -> LonLat {
        if self.arrived() {
            return self.route.end();
        }
        self.route.point(self.seg + 1)
    }

    /// Heading in degrees clockwise from north, `[0, 360)`: the bearing from
    /// the previous to the next route point. Kept from the last non-empty
    /// segment once arrived.
    pub fn heading_deg(&self) -> f64 {
        self.last_heading
    }

    fn next_segment(&mut self) {
        // Keep the bearing of the segment being left, for when it is the last.
        if let Some(h) = self.segment_bearing() {
            self.last_heading = h;
        }
        self.seg += 1;
        self.along_m = 0.0;
        self.skip_empty_segments();
    }

    fn skip_empty_segments(&mut self) {
        while !self.arrived() && self.route.segment_len_m(self.seg) <= 0.0 {
            self.seg += 1;
        }
    }

    fn segment_bearing(&self) -> Option<f64> {
        if self.arrived() {
            return None;
        }
        Some(heading_deg(
            self.route.point(self.seg),
            self.route.point(self.seg + 1),
        ))
    }
}

/// The point at fraction `t` of the straight line from `a` to `b` in Web
/// Mercator, which is how OSRM measures snapping and how web maps draw a
/// route's segments (on long segments, as in the synthetic Italian graph, a
/// lon/lat-linear point would lie tens of metres beside the drawn line).
pub fn interpolate_mercator(a: LonLat, b: LonLat, t: f64) -> LonLat {
    fn y(lat: f64) -> f64 {
        (std::f64::consts::FRAC_PI_4 + lat.to_radians() / 2.0)
            .tan()
            .ln()
    }
    fn lat(y: f64) -> f64 {
        (2.0 * y.exp().atan() - std::f64::consts::FRAC_PI_2).to_degrees()
    }
    let lon = a.lon + (b.lon - a.lon) * t;
    if (b.lat - a.lat).abs() < 1e-12 {
        return LonLat::new(lon, a.lat);
    }
    let (ya, yb) = (y(a.lat), y(b.lat));
    LonLat::new(lon, lat(ya + (yb - ya) * t))
}

/// Great-circle initial bearing from `from` to `to`, degrees in `[0, 360)`.
pub fn heading_deg(from: LonLat, to: LonLat) -> f64 {
    let b = Haversine.bearing(from.point(), to.point());
    if b.is_finite() {
        b.rem_euclid(360.0)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Annotations;
    use geo::{Distance, Haversine};

    /// North along 12°E: 0.01° lat ≈ 1112 m per segment, then east.
    fn route(speeds: &[f64]) -> Arc<Route> {
        let ann = Annotations {
            speed_mps: speeds.to_vec(),
            ..Default::default()
        };
        Arc::new(
            Route::new(
                &[[12.0, 42.0], [12.0, 42.01], [12.0, 42.01], [12.02, 42.01]],
                &ann,
                10.0,
            )
            .unwrap(),
        )
    }

    fn no_cap() -> SpeedCap {
        SpeedCap::from_kmh(500.0, 1.0)
    }

    /// Distance of `p` from the segment a-b, metres (flat approximation, fine at this scale).
    fn off_segment_m(p: LonLat, a: LonLat, b: LonLat) -> f64 {
        let kx = 111_320.0 * a.lat.to_radians().cos();
        let ky = 110_574.0;
        let (px, py) = ((p.lon - a.lon) * kx, (p.lat - a.lat) * ky);
        let (bx, by) = ((b.lon - a.lon) * kx, (b.lat - a.lat) * ky);
        let t = ((px * bx + py * by) / (bx * bx + by * by)).clamp(0.0, 1.0);
        ((px - t * bx).powi(2) + (py - t * by).powi(2)).sqrt()
    }

    #[test]
    fn advancing_moves_speed_times_time_along_the_segment() {
        let mut f = Follower::new(route(&[10.0, 10.0, 20.0]));
        let step = f.advance(30.0, &no_cap());
        assert!((step.moved_m - 300.0).abs() < 1e-6);
        assert_eq!(step.speed_mps, 10.0);
        let p = f.position();
        let d = Haversine.distance(LonLat::new(12.0, 42.0).point(), p.point());
        assert!((d - 300.0).abs() < 1.0, "{d}");
        assert!((p.lon - 12.0).abs() < 1e-12);
    }

    #[test]
    fn advancing_crosses_route_points_and_uses_each_segment_speed() {
        let mut f = Follower::new(route(&[10.0, 10.0, 20.0]));
        let first = f.route().segment_len_m(0);
        // Time to the corner at 10 m/s, plus 10 s at 20 m/s on the eastbound segment.
        let step = f.advance(first / 10.0 + 10.0, &no_cap());
        assert!((step.moved_m - (first + 200.0)).abs() < 1e-6);
        assert_eq!(step.speed_mps, 20.0);
        assert!((f.position().lat - 42.01).abs() < 1e-9);
        assert!(f.position().lon > 12.0);
    }

    #[test]
    fn truck_arrives_at_the_route_end_and_stops() {
        let mut f = Follower::new(route(&[10.0, 10.0, 20.0]));
        let step = f.advance(1e6, &no_cap());
        assert!(step.arrived);
        assert_eq!(step.speed_mps, 0.0);
        assert_eq!(f.position(), LonLat::new(12.02, 42.01));
        assert!((f.travelled_m() - f.route().total_len_m()).abs() < 1e-6);
        assert_eq!(f.remaining_m(), 0.0);
        let again = f.advance(10.0, &no_cap());
        assert_eq!(again.moved_m, 0.0);
    }

    #[test]
    fn positions_always_lie_on_the_route_polyline() {
        let mut f = Follower::new(route(&[7.0, 3.0, 13.0]));
        let pts = f.route().to_points();
        while !f.advance(3.7, &no_cap()).arrived {
            let p = f.position();
            let off = pts
                .windows(2)
                .map(|w| off_segment_m(p, w[0], w[1]))
                .fold(f64::INFINITY, f64::min);
            assert!(off < 0.5, "{p:?} is {off} m off the route");
        }
    }

    #[test]
    fn positions_on_a_simplified_route_stay_within_its_tolerance_of_the_road() {
        use crate::route::tests::{off_polyline_m, winding_road};
        let road = winding_road();
        for tolerance in [1.0, 3.0, 5.0] {
            let r = Route::simplified(&road, &Annotations::default(), 20.0, tolerance).unwrap();
            let mut f = Follower::new(Arc::new(r));
            let mut worst: f64 = 0.0;
            while !f.advance(1.0, &no_cap()).arrived {
                worst = worst.max(off_polyline_m(f.position(), &road));
            }
            // + fixed-point rounding (0.1 m) and the flat distance approximation.
            assert!(
                worst <= tolerance + 0.3,
                "tolerance {tolerance} m: {worst} m off"
            );
        }
    }

    #[test]
    fn a_sole_holder_drops_the_driven_route_and_drives_the_same_path() {
        use crate::route::tests::winding_road;
        let r = Route::new(&winding_road(), &Annotations::default(), 20.0).unwrap();
        let shared = Arc::new(r.clone());
        let mut alone = Follower::new(Arc::new(r));
        // A second holder (like the route cache) keeps this one whole.
        let mut with_cache = Follower::new(Arc::clone(&shared));
        let full = shared.heap_bytes();
        for _ in 0..1200 {
            alone.advance(1.0, &no_cap());
            with_cache.advance(1.0, &no_cap());
            let (a, b) = (alone.position(), with_cache.position());
            assert!((a.lon - b.lon).abs() < 1e-9 && (a.lat - b.lat).abs() < 1e-9);
            assert_eq!(alone.next_point(), with_cache.next_point());
            assert!((alone.remaining_m() - with_cache.remaining_m()).abs() < 1e-3);
        }
        assert_eq!(with_cache.route().heap_bytes(), full);
        assert!(alone.route().heap_bytes() < full / 2);
        assert!((alone.travelled_m() - with_cache.travelled_m()).abs() < 1e-6);
    }

    #[test]
    fn speed_cap_slows_the_truck() {
        let mut f = Follower::new(route(&[30.0, 30.0, 30.0]));
        let cap = SpeedCap::from_kmh(72.0, 1.0); // 20 m/s
        let step = f.advance(10.0, &cap);
        assert!((step.moved_m - 200.0).abs() < 1e-6);
        assert!((step.speed_mps - 20.0).abs() < 1e-9);
    }

    #[test]
    fn heading_points_from_previous_to_next_route_point() {
        let mut f = Follower::new(route(&[10.0, 10.0, 10.0]));
        assert!(f.heading_deg().abs() < 1e-6 || (f.heading_deg() - 360.0).abs() < 1e-6);
        assert_eq!(f.next_point(), LonLat::new(12.0, 42.01));
        let first = f.route().segment_len_m(0);
        f.advance(first / 10.0 + 1.0, &no_cap());
        // Eastbound after the (zero-length) duplicate corner point.
        assert!((f.heading_deg() - 90.0).abs() < 0.01, "{}", f.heading_deg());
        assert_eq!(f.next_point(), LonLat::new(12.02, 42.01));
    }

    #[test]
    fn heading_is_kept_after_arrival() {
        let mut f = Follower::new(route(&[10.0, 10.0, 10.0]));
        f.advance(1e6, &no_cap());
        assert!((f.heading_deg() - 90.0).abs() < 0.01);
    }

    #[test]
    fn interpolation_is_straight_in_web_mercator() {
        let (a, b) = (LonLat::new(8.0, 40.0), LonLat::new(12.0, 46.0));
        let start = interpolate_mercator(a, b, 0.0);
        assert!((start.lat - a.lat).abs() < 1e-9 && start.lon == a.lon);
        let end = interpolate_mercator(a, b, 1.0);
        assert!((end.lat - b.lat).abs() < 1e-9 && (end.lon - b.lon).abs() < 1e-12);
        // Midpoint: halfway in longitude, and halfway in Mercator y, which is
        // north of the lon/lat midpoint (43°) at these latitudes.
        let m = interpolate_mercator(a, b, 0.5);
        assert!((m.lon - 10.0).abs() < 1e-12);
        assert!(m.lat > 43.0 && m.lat < 43.2, "{m:?}");
        // Same latitude: a parallel is straight in Mercator.
        let p = interpolate_mercator(LonLat::new(8.0, 44.0), LonLat::new(9.0, 44.0), 0.3);
        assert_eq!(p, LonLat::new(8.3, 44.0));
    }

    #[test]
    fn heading_covers_all_quadrants() {
        let o = LonLat::new(12.0, 42.0);
        assert!((heading_deg(o, LonLat::new(12.0, 42.1)) - 0.0).abs() < 1e-6);
        assert!((heading_deg(o, LonLat::new(12.1, 42.0)) - 90.0).abs() < 0.1);
        assert!((heading_deg(o, LonLat::new(12.0, 41.9)) - 180.0).abs() < 1e-6);
        assert!((heading_deg(o, LonLat::new(11.9, 42.0)) - 270.0).abs() < 0.1);
        assert_eq!(heading_deg(o, o), 0.0);
    }

    #[test]
    fn skip_jumps_ahead_without_time() {
        let mut f = Follower::new(route(&[10.0, 10.0, 10.0]));
        let first = f.route().segment_len_m(0);
        f.skip(first + 100.0);
        assert!((f.travelled_m() - (first + 100.0)).abs() < 1e-6);
        assert!((f.heading_deg() - 90.0).abs() < 0.01);
        f.skip(1e9);
        assert!(f.arrived());
    }
}
