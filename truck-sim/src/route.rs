//! A driveable route: the OSRM geometry with a length and a speed per segment.
//!
//! Segment lengths are computed from the geometry (haversine), so that the
//! interpolated position always lies on the polyline OSRM returned. Speeds
//! come from OSRM's per-segment annotations and are capped by [`SpeedCap`].

use geo::{Distance, Haversine};

use crate::places::LonLat;

/// Segment speeds are never below this (OSRM annotates some segments with 0).
pub const MIN_SPEED_MPS: f64 = 5.0 / 3.6;

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// `points.len() >= 2`.
    points: Vec<LonLat>,
    /// Length of segment `i` (from `points[i]` to `points[i+1]`), metres.
    seg_len_m: Vec<f32>,
    /// Speed on segment `i` from the annotations, m/s (not yet capped).
    seg_speed_mps: Vec<f32>,
    total_len_m: f64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteBuildError {
    TooFewPoints(usize),
    NonFiniteCoordinate,
}

impl std::fmt::Display for RouteBuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooFewPoints(n) => write!(f, "route geometry has {n} point(s), need 2"),
            Self::NonFiniteCoordinate => write!(f, "route geometry has a non-finite coordinate"),
        }
    }
}

impl std::error::Error for RouteBuildError {}

/// Per-segment annotation arrays as OSRM returns them (`annotations=speed,duration,distance`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Annotations {
    pub speed_mps: Vec<f64>,
    pub duration_s: Vec<f64>,
    pub distance_m: Vec<f64>,
}

impl Route {
    /// Builds a route from a `[lon, lat]` geometry and per-segment annotations.
    ///
    /// `fallback_speed_mps` (typically total distance / total duration) is used
    /// for segments whose annotation is missing or unusable, and for all of them
    /// if the annotation arrays do not match the geometry.
    pub fn new(
        coords: &[[f64; 2]],
        ann: &Annotations,
        fallback_speed_mps: f64,
    ) -> Result<Self, RouteBuildError> {
        if coords.len() < 2 {
            return Err(RouteBuildError::TooFewPoints(coords.len()));
        }
        if coords.iter().flatten().any(|c| !c.is_finite()) {
            return Err(RouteBuildError::NonFiniteCoordinate);
        }
        let points: Vec<LonLat> = coords.iter().map(|c| LonLat::new(c[0], c[1])).collect();
        let n = points.len() - 1;
        let fallback = if fallback_speed_mps.is_finite() && fallback_speed_mps > 0.0 {
            fallback_speed_mps.max(MIN_SPEED_MPS)
        } else {
            50.0 / 3.6
        };
        let mut seg_len_m = Vec::with_capacity(n);
        let mut seg_speed_mps = Vec::with_capacity(n);
        let mut total = 0.0;
        for i in 0..n {
            let len = Haversine.distance(points[i].point(), points[i + 1].point()) as f32;
            total += f64::from(len);
            seg_len_m.push(len);
            seg_speed_mps.push(segment_speed(ann, i, n, fallback) as f32);
        }
        Ok(Self {
            points,
            seg_len_m,
            seg_speed_mps,
            total_len_m: total,
        })
    }

    pub fn points(&self) -> &[LonLat] {
        &self.points
    }

    pub fn segments(&self) -> usize {
        self.seg_len_m.len()
    }

    pub fn segment_len_m(&self, i: usize) -> f64 {
        f64::from(self.seg_len_m[i])
    }

    pub fn segment_speed_mps(&self, i: usize) -> f64 {
        f64::from(self.seg_speed_mps[i])
    }

    pub fn total_len_m(&self) -> f64 {
        self.total_len_m
    }

    pub fn start(&self) -> LonLat {
        self.points[0]
    }

    pub fn end(&self) -> LonLat {
        self.points[self.points.len() - 1]
    }

    /// Approximate heap size, for the route cache budget.
    pub fn heap_bytes(&self) -> usize {
        self.points.capacity() * std::mem::size_of::<LonLat>()
            + (self.seg_len_m.capacity() + self.seg_speed_mps.capacity()) * 4
    }
}

/// Speed of segment `i` from the annotations: `speed`, else `distance/duration`,
/// else the fallback; never below [`MIN_SPEED_MPS`].
fn segment_speed(ann: &Annotations, i: usize, n: usize, fallback: f64) -> f64 {
    let usable = |v: f64| v.is_finite() && v > 0.0;
    let from_speed = (ann.speed_mps.len() == n)
        .then(|| ann.speed_mps[i])
        .filter(|&v| usable(v));
    let from_ratio = (ann.duration_s.len() == n && ann.distance_m.len() == n)
        .then(|| (ann.distance_m[i], ann.duration_s[i]))
        .filter(|&(d, t)| usable(d) && usable(t))
        .map(|(d, t)| d / t);
    from_speed
        .or(from_ratio)
        .unwrap_or(fallback)
        .max(MIN_SPEED_MPS)
}

/// Truck speed limits applied on top of the route's annotated speeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpeedCap {
    /// Hard upper bound (the `--max-speed-kmh` option), m/s.
    pub max_mps: f64,
    /// This driver's factor on the annotated speed (e.g. 0.9..=1.0).
    pub driver_factor: f64,
}

impl SpeedCap {
    pub fn from_kmh(max_kmh: f64, driver_factor: f64) -> Self {
        Self {
            max_mps: max_kmh / 3.6,
            driver_factor,
        }
    }

    /// The speed the truck drives at on a segment annotated with `annotated_mps`.
    pub fn apply(&self, annotated_mps: f64) -> f64 {
        (annotated_mps * self.driver_factor)
            .min(self.max_mps)
            .max(MIN_SPEED_MPS.min(self.max_mps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(speed: &[f64]) -> Annotations {
        Annotations {
            speed_mps: speed.to_vec(),
            duration_s: vec![],
            distance_m: vec![],
        }
    }

    #[test]
    fn route_needs_at_least_two_points() {
        assert_eq!(
            Route::new(&[[7.4, 43.7]], &Annotations::default(), 10.0),
            Err(RouteBuildError::TooFewPoints(1))
        );
        assert!(matches!(
            Route::new(
                &[[7.4, 43.7], [f64::NAN, 43.7]],
                &Annotations::default(),
                10.0
            ),
            Err(RouteBuildError::NonFiniteCoordinate)
        ));
    }

    #[test]
    fn segment_lengths_follow_the_geometry() {
        // 0.01 degree of latitude is ~1112 m.
        let r = Route::new(
            &[[12.0, 42.0], [12.0, 42.01], [12.0, 42.02]],
            &ann(&[10.0, 20.0]),
            1.0,
        )
        .unwrap();
        assert_eq!(r.segments(), 2);
        assert!((r.segment_len_m(0) - 1112.0).abs() < 2.0);
        assert!((r.total_len_m() - 2224.0).abs() < 4.0);
    }

    #[test]
    fn segment_speed_comes_from_speed_annotation() {
        let r = Route::new(
            &[[12.0, 42.0], [12.0, 42.01], [12.0, 42.02]],
            &ann(&[10.0, 20.0]),
            1.0,
        )
        .unwrap();
        assert_eq!(r.segment_speed_mps(0), 10.0);
        assert_eq!(r.segment_speed_mps(1), 20.0);
    }

    #[test]
    fn zero_speed_falls_back_to_distance_over_duration_then_route_average() {
        let a = Annotations {
            speed_mps: vec![0.0, 0.0],
            duration_s: vec![10.0, 0.0],
            distance_m: vec![150.0, 0.0],
        };
        let r = Route::new(&[[12.0, 42.0], [12.0, 42.01], [12.0, 42.02]], &a, 12.0).unwrap();
        assert_eq!(r.segment_speed_mps(0), 15.0);
        assert_eq!(r.segment_speed_mps(1), 12.0);
    }

    #[test]
    fn mismatched_annotations_use_the_fallback_speed() {
        let r = Route::new(
            &[[12.0, 42.0], [12.0, 42.01], [12.0, 42.02]],
            &ann(&[10.0]),
            8.0,
        )
        .unwrap();
        assert_eq!(r.segment_speed_mps(0), 8.0);
        assert_eq!(r.segment_speed_mps(1), 8.0);
    }

    #[test]
    fn speeds_never_drop_below_walking_pace() {
        let r = Route::new(&[[12.0, 42.0], [12.0, 42.01]], &ann(&[0.1]), 8.0).unwrap();
        assert!((r.segment_speed_mps(0) - MIN_SPEED_MPS).abs() < 1e-6);
    }

    #[test]
    fn speed_cap_limits_to_max_speed() {
        let cap = SpeedCap::from_kmh(90.0, 1.0);
        assert!((cap.apply(130.0 / 3.6) - 25.0).abs() < 1e-9);
        assert!((cap.apply(50.0 / 3.6) - 50.0 / 3.6).abs() < 1e-9);
    }

    #[test]
    fn speed_cap_applies_driver_factor_below_the_limit() {
        let cap = SpeedCap::from_kmh(90.0, 0.9);
        assert!((cap.apply(20.0) - 18.0).abs() < 1e-9);
        assert!((cap.apply(40.0) - 25.0).abs() < 1e-9);
    }
}
