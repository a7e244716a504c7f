//! A driveable route: the OSRM geometry with a length and a speed per segment,
//! stored compactly because 15,000 trucks each hold one.
//!
//! * Geometry is simplified (Ramer-Douglas-Peucker, `geo`'s `SimplifyIdx`) in
//!   Web Mercator, the projection in which a truck interpolates between two
//!   points, so every position lies within the tolerance of OSRM's polyline.
//! * Coordinates are fixed-point in 1e-6 degree (0.11 m at most), packed as
//!   16-bit steps ([`PackedPoints`]), speeds one byte in 0.5 km/h: about 5 bytes a
//!   point, against 24 for `f64` coordinates and a length. Segment lengths are
//!   computed when asked (one haversine), not stored. The 2,352 shared routes
//!   of a fleet on OSM-dense roads were 146 MiB with `i32` points and stored
//!   `f32` lengths (14 bytes a point).
//! * A driver that owns its route alone drops the part behind it
//!   ([`Route::drop_front`]), so on average half of a route is held.
//!
//! Segment lengths are computed from the stored fixed-point geometry
//! (haversine), so that the interpolated position lies on the polyline and
//! every reader gets the same length. Speeds come from OSRM's
//! per-segment annotations (merged so that travel time is kept) and are capped
//! by [`SpeedCap`].

use geo::{Distance, Haversine, LineString, SimplifyIdx};

use crate::packed_points::PackedPoints;
use crate::places::LonLat;

/// Segment speeds are never below this (OSRM annotates some segments with 0).
pub const MIN_SPEED_MPS: f64 = 5.0 / 3.6;

/// Fixed-point scale of stored coordinates: 1e-6 degree.
const FIXED_PER_DEG: f64 = 1e6;
/// Stored speeds are in 0.5 km/h, one byte: up to 127.5 km/h, above any
/// truck's limit. The rounding changes a 70 km/h truck's time on a segment
/// by 0.36 % at most, and saves a sixth of the fleet's route memory.
const SPEED_UNITS_PER_MPS: f64 = 7.2;
/// Half a stored speed step, m/s: how far a stored speed is from the one computed.
pub const SPEED_ROUNDING_MPS: f64 = 0.5 / SPEED_UNITS_PER_MPS;

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// `[lon, lat]` in 1e-6 degree; `points.len() >= 2`.
    points: PackedPoints,
    /// Speed on segment `i` from the annotations, 0.5 km/h (not yet capped).
    seg_speed: Vec<u8>,
    total_len_m: f64,
    /// Points OSRM sent, before simplification (for the metrics).
    received_points: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteBuildError {
    #[error("route geometry has {0} point(s), need 2")]
    TooFewPoints(usize),
    #[error("route geometry has a non-finite or out-of-range coordinate")]
    NonFiniteCoordinate,
}

/// Per-segment annotation arrays as OSRM returns them (`annotations=speed,duration,distance`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Annotations {
    pub speed_mps: Vec<f64>,
    pub duration_s: Vec<f64>,
    pub distance_m: Vec<f64>,
}

impl Route {
    /// Builds a route from a `[lon, lat]` geometry and per-segment annotations,
    /// keeping every point (see [`Route::simplified`]).
    ///
    /// `fallback_speed_mps` (typically total distance / total duration) is used
    /// for segments whose annotation is missing or unusable, and for all of them
    /// if the annotation arrays do not match the geometry.
    pub fn new(
        coords: &[[f64; 2]],
        ann: &Annotations,
        fallback_speed_mps: f64,
    ) -> Result<Self, RouteBuildError> {
        Self::simplified(coords, ann, fallback_speed_mps, 0.0)
    }

    /// Like [`Route::new`], but drops the points that lie within `tolerance_m`
    /// metres of the line through their neighbours. A merged segment gets the
    /// speed that keeps the travel time OSRM gave its parts.
    pub fn simplified(
        coords: &[[f64; 2]],
        ann: &Annotations,
        fallback_speed_mps: f64,
        tolerance_m: f64,
    ) -> Result<Self, RouteBuildError> {
        if coords.len() < 2 {
            return Err(RouteBuildError::TooFewPoints(coords.len()));
        }
        let valid = |c: &[f64; 2]| c[0].abs() <= 180.0 && c[1].abs() < 85.0;
        if !coords.iter().all(valid) {
            return Err(RouteBuildError::NonFiniteCoordinate);
        }
        let n = coords.len() - 1;
        let fallback = if fallback_speed_mps.is_finite() && fallback_speed_mps > 0.0 {
            fallback_speed_mps.max(MIN_SPEED_MPS)
        } else {
            50.0 / 3.6
        };
        let keep = kept_indices(coords, tolerance_m);
        let at = |i: usize| LonLat::new(coords[i][0], coords[i][1]);
        let mut points = PackedPoints::default();
        let mut seg_speed = Vec::with_capacity(keep.len() - 1);
        let mut total = 0.0;
        points.push(to_fixed(coords[keep[0]]));
        for w in keep.windows(2) {
            let (i0, i1) = (w[0], w[1]);
            let from = points.len() - 1;
            let parts = points.push(to_fixed(coords[i1]));
            let chord: f64 = (from..from + parts).map(|i| chord_m(&points, i)).sum();
            // Travel time of the original segments this one replaces.
            let time_s: f64 = (i0..i1)
                .map(|i| {
                    let len = Haversine.distance(at(i).point(), at(i + 1).point());
                    len / segment_speed(ann, i, n, fallback)
                })
                .sum();
            let speed = if time_s > 0.0 {
                chord / time_s
            } else {
                segment_speed(ann, i0, n, fallback)
            };
            // The total is the sum of the segment lengths, so that it matches them exactly.
            total += chord;
            let speed = to_speed_units(speed.max(MIN_SPEED_MPS));
            seg_speed.extend(std::iter::repeat_n(speed, parts));
        }
        // Split steps may have grown both past their first guess.
        points.shrink_to_fit();
        seg_speed.shrink_to_fit();
        Ok(Self {
            points,
            seg_speed,
            total_len_m: total,
            received_points: coords.len(),
        })
    }

    /// Points of the geometry this route was built from, before simplification.
    pub fn received_points(&self) -> usize {
        self.received_points
    }

    /// Number of points (segments + 1).
    pub fn len_points(&self) -> usize {
        self.points.len()
    }

    /// Point `i`; `i < len_points()`.
    pub fn point(&self, i: usize) -> LonLat {
        from_fixed(self.points.get(i))
    }

    /// All points, decoded (for publishing and tests; the driver uses [`Route::point`]).
    pub fn to_points(&self) -> Vec<LonLat> {
        self.points.iter_from(0).map(from_fixed).collect()
    }

    pub fn segments(&self) -> usize {
        self.seg_speed.len()
    }

    /// Length of segment `i` (from point `i` to point `i + 1`), metres.
    pub fn segment_len_m(&self, i: usize) -> f64 {
        chord_m(&self.points, i)
    }

    pub fn segment_speed_mps(&self, i: usize) -> f64 {
        f64::from(self.seg_speed[i]) / SPEED_UNITS_PER_MPS
    }

    pub fn total_len_m(&self) -> f64 {
        self.total_len_m
    }

    pub fn start(&self) -> LonLat {
        self.point(0)
    }

    pub fn end(&self) -> LonLat {
        self.point(self.points.len() - 1)
    }

    /// Forgets the first `segments` segments (the part a truck has driven),
    /// keeping at least the last one, and gives back the memory. Returns the
    /// metres dropped.
    pub fn drop_front(&mut self, segments: usize) -> f64 {
        let k = segments.min(self.segments().saturating_sub(1));
        let dropped: f64 = (0..k).map(|i| self.segment_len_m(i)).sum();
        self.points.drop_front(k);
        self.seg_speed.drain(..k);
        self.points.shrink_to_fit();
        self.seg_speed.shrink_to_fit();
        self.total_len_m = (self.total_len_m - dropped).max(0.0);
        dropped
    }

    /// The route ahead of a truck at `pos` on segment `seg`, for drawing: `pos`
    /// then the points after it, simplified from `tolerance_m` metres on
    /// (doubling the tolerance) until at most `max_points` (>= 2) remain.
    pub fn outline(
        &self,
        seg: usize,
        pos: LonLat,
        tolerance_m: f64,
        max_points: usize,
    ) -> Vec<LonLat> {
        let first = (seg + 1).min(self.points.len() - 1);
        let coords: Vec<[f64; 2]> = std::iter::once([pos.lon, pos.lat])
            .chain(self.points.iter_from(first).map(|p| {
                let p = from_fixed(p);
                [p.lon, p.lat]
            }))
            .collect();
        let max_points = max_points.max(2);
        let mut tolerance = tolerance_m.max(0.1);
        let mut keep = kept_indices(&coords, tolerance);
        while keep.len() > max_points {
            tolerance *= 2.0;
            keep = kept_indices(&coords, tolerance);
        }
        keep.into_iter()
            .map(|i| LonLat::new(coords[i][0], coords[i][1]))
            .collect()
    }

    /// Approximate heap size, for the route cache budget.
    pub fn heap_bytes(&self) -> usize {
        self.points.heap_bytes() + self.seg_speed.capacity()
    }
}

/// Indices of the points kept by simplifying within `tolerance_m` metres, in
/// Web Mercator metres at the equator scaled for the route's lowest latitude
/// (where a Mercator metre is longest), so the bound holds everywhere.
fn kept_indices(coords: &[[f64; 2]], tolerance_m: f64) -> Vec<usize> {
    if tolerance_m.is_nan() || tolerance_m <= 0.0 || coords.len() <= 2 {
        return (0..coords.len()).collect();
    }
    const R: f64 = 6_378_137.0;
    let min_abs_lat = coords.iter().map(|c| c[1].abs()).fold(90.0, f64::min);
    let eps = tolerance_m / min_abs_lat.to_radians().cos();
    let line: LineString<f64> = coords
        .iter()
        .map(|c| {
            let y = (std::f64::consts::FRAC_PI_4 + c[1].to_radians() / 2.0)
                .tan()
                .ln();
            (c[0].to_radians() * R, y * R)
        })
        .collect();
    let keep = line.simplify_idx(eps);
    if keep.len() >= 2 {
        keep
    } else {
        vec![0, coords.len() - 1]
    }
}

fn to_fixed(c: [f64; 2]) -> [i32; 2] {
    // Coordinates were checked to lie within +-180 degrees: no overflow.
    [
        (c[0] * FIXED_PER_DEG).round() as i32,
        (c[1] * FIXED_PER_DEG).round() as i32,
    ]
}

/// Haversine length of the segment between two stored points, rounded to
/// `f32` as lengths were when they were stored (the tests' tolerances).
fn chord_m(points: &PackedPoints, i: usize) -> f64 {
    let (a, b) = (from_fixed(points.get(i)), from_fixed(points.get(i + 1)));
    f64::from(Haversine.distance(a.point(), b.point()) as f32)
}

fn from_fixed(p: [i32; 2]) -> LonLat {
    LonLat::new(
        f64::from(p[0]) / FIXED_PER_DEG,
        f64::from(p[1]) / FIXED_PER_DEG,
    )
}

fn to_speed_units(mps: f64) -> u8 {
    (mps * SPEED_UNITS_PER_MPS)
        .round()
        .clamp(1.0, f64::from(u8::MAX)) as u8
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
pub(crate) mod tests {
    use super::*;

    /// A stored speed is the computed one rounded to a 0.5 km/h step.
    pub(crate) fn assert_speed(r: &Route, i: usize, want_mps: f64) {
        let got = r.segment_speed_mps(i);
        assert!(
            (got - want_mps).abs() <= SPEED_ROUNDING_MPS + 1e-9,
            "segment {i}: {got} m/s, want {want_mps}"
        );
    }

    fn ann(speed: &[f64]) -> Annotations {
        Annotations {
            speed_mps: speed.to_vec(),
            duration_s: vec![],
            distance_m: vec![],
        }
    }

    /// A winding road like `routing/make_synth_italy.py --points-per-km 20`
    /// builds: 30 km north-east from Bologna, a point every 50 m, a slow
    /// meander plus 10 m curves every 400 m.
    pub(crate) fn winding_road() -> Vec<[f64; 2]> {
        let (kx, ky) = (111_320.0 * 44.5f64.to_radians().cos(), 110_574.0);
        (0..=600)
            .map(|i| {
                let s = f64::from(i) * 50.0;
                let off =
                    400.0 * (s / 4_000.0).sin() + 10.0 * (s / 400.0 * std::f64::consts::TAU).sin();
                let (x, y) = (s * 0.8 - off * 0.6, s * 0.6 + off * 0.8);
                [11.34 + x / kx, 44.5 + y / ky]
            })
            .collect()
    }

    /// Distance from `p` to the polyline `line`, metres (flat approximation).
    pub(crate) fn off_polyline_m(p: LonLat, line: &[[f64; 2]]) -> f64 {
        let kx = 111_320.0 * p.lat.to_radians().cos();
        let ky = 110_574.0;
        line.windows(2)
            .map(|w| {
                let (ax, ay) = ((w[0][0] - p.lon) * kx, (w[0][1] - p.lat) * ky);
                let (bx, by) = ((w[1][0] - p.lon) * kx, (w[1][1] - p.lat) * ky);
                let (dx, dy) = (bx - ax, by - ay);
                let len2 = dx * dx + dy * dy;
                let t = if len2 > 0.0 {
                    (-(ax * dx + ay * dy) / len2).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                (ax + t * dx).hypot(ay + t * dy)
            })
            .fold(f64::INFINITY, f64::min)
    }

    #[test]
    fn simplification_drops_points_and_keeps_every_kept_point_on_the_road() {
        let road = winding_road();
        let full = Route::new(&road, &Annotations::default(), 20.0).unwrap();
        let r = Route::simplified(&road, &Annotations::default(), 20.0, 3.0).unwrap();
        assert_eq!(full.len_points(), road.len());
        assert!(
            r.len_points() * 2 < road.len(),
            "kept {} of {}",
            r.len_points(),
            road.len()
        );
        assert_eq!(r.start(), full.start());
        assert_eq!(r.end(), full.end());
        for p in r.to_points() {
            assert!(off_polyline_m(p, &road) < 0.2, "{p:?}");
        }
        // Chords are a little shorter than the winding road, never longer.
        assert!(r.total_len_m() <= full.total_len_m());
        assert!(r.total_len_m() > full.total_len_m() * 0.99);
    }

    #[test]
    fn fixed_point_coordinates_are_within_a_tenth_of_a_metre() {
        let road = winding_road();
        let r = Route::new(&road, &Annotations::default(), 20.0).unwrap();
        for (i, c) in road.iter().enumerate() {
            let p = r.point(i);
            let d = Haversine.distance(p.point(), LonLat::new(c[0], c[1]).point());
            assert!(d < 0.1, "point {i} moved {d} m");
        }
    }

    #[test]
    fn merged_segments_keep_osrms_travel_time() {
        let road = winding_road();
        let n = road.len() - 1;
        // Alternating 10 and 25 m/s: a merged segment must not average them naively.
        let speeds: Vec<f64> = (0..n)
            .map(|i| if i % 2 == 0 { 10.0 } else { 25.0 })
            .collect();
        let a = ann(&speeds);
        let full = Route::new(&road, &a, 1.0).unwrap();
        let r = Route::simplified(&road, &a, 1.0, 3.0).unwrap();
        let time = |r: &Route| -> f64 {
            (0..r.segments())
                .map(|i| r.segment_len_m(i) / r.segment_speed_mps(i))
                .sum()
        };
        let (t_full, t_simple) = (time(&full), time(&r));
        // Within the rounding of stored speeds (0.25 km/h on ~50 km/h: 0.5 %).
        assert!(
            (t_full - t_simple).abs() < t_full * 0.005,
            "{t_full} s vs {t_simple} s"
        );
    }

    #[test]
    fn compact_route_takes_at_most_14_bytes_a_point() {
        let road = winding_road();
        let r = Route::new(&road, &Annotations::default(), 20.0).unwrap();
        assert!(r.heap_bytes() <= road.len() * 14, "{}", r.heap_bytes());
    }

    #[test]
    fn drop_front_keeps_the_route_ahead() {
        let road = winding_road();
        let mut r = Route::new(&road, &Annotations::default(), 20.0).unwrap();
        let before = r.clone();
        let dropped = r.drop_front(100);
        assert_eq!(r.len_points(), before.len_points() - 100);
        assert_eq!(r.start(), before.point(100));
        assert_eq!(r.end(), before.end());
        let behind: f64 = (0..100).map(|i| before.segment_len_m(i)).sum();
        assert!((dropped - behind).abs() < 1e-6);
        assert!((r.total_len_m() - (before.total_len_m() - behind)).abs() < 1e-6);
        // Never below one segment.
        r.drop_front(usize::MAX);
        assert_eq!(r.segments(), 1);
        assert_eq!(r.end(), before.end());
    }

    #[test]
    fn outline_starts_at_the_truck_and_respects_the_point_cap() {
        let road = winding_road();
        let r = Route::new(&road, &Annotations::default(), 20.0).unwrap();
        let pos = LonLat::new(road[10][0], road[10][1]);
        let o = r.outline(10, pos, 1.0, 40);
        assert!(o.len() <= 40 && o.len() >= 2, "{}", o.len());
        assert_eq!(o[0], pos);
        assert_eq!(*o.last().unwrap(), r.end());
        // The route's own points beyond the cap's tolerance stay near the outline.
        let outline: Vec<[f64; 2]> = o.iter().map(|p| [p.lon, p.lat]).collect();
        let worst = r.to_points()[11..]
            .iter()
            .map(|&p| off_polyline_m(p, &outline))
            .fold(0.0, f64::max);
        assert!(worst < 300.0, "{worst} m");
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
        assert_speed(&r, 0, 10.0);
        assert_speed(&r, 1, 20.0);
    }

    #[test]
    fn zero_speed_falls_back_to_distance_over_duration_then_route_average() {
        let a = Annotations {
            speed_mps: vec![0.0, 0.0],
            duration_s: vec![10.0, 0.0],
            distance_m: vec![150.0, 0.0],
        };
        let r = Route::new(&[[12.0, 42.0], [12.0, 42.01], [12.0, 42.02]], &a, 12.0).unwrap();
        assert_speed(&r, 0, 15.0);
        assert_speed(&r, 1, 12.0);
    }

    #[test]
    fn mismatched_annotations_use_the_fallback_speed() {
        let r = Route::new(
            &[[12.0, 42.0], [12.0, 42.01], [12.0, 42.02]],
            &ann(&[10.0]),
            8.0,
        )
        .unwrap();
        assert_speed(&r, 0, 8.0);
        assert_speed(&r, 1, 8.0);
    }

    #[test]
    fn speeds_never_drop_below_walking_pace() {
        let r = Route::new(&[[12.0, 42.0], [12.0, 42.01]], &ann(&[0.1]), 8.0).unwrap();
        // Stored in cm/s.
        assert_speed(&r, 0, MIN_SPEED_MPS);
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
