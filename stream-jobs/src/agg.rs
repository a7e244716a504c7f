//! Pure aggregation logic for the `directions` job: no Kafka, no clocks.
//!
//! Everything here takes the current time as an argument so the semantics
//! (sector boundaries, latest-wins, stale eviction, partition revoke) are
//! unit-testable and identical whether records arrive live or during a
//! rebuild after a rebalance.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Below this speed a "driving" truck is reported as stopped (GPS jitter at a
/// standstill produces a few hundred metres per hour and a random heading).
pub const STOP_SPEED_KMH: f64 = 1.0;

/// One of the 8 compass sectors, each 45° wide and centred on its direction:
/// N = [337.5°, 22.5°), NE = [22.5°, 67.5°), ... NW = [292.5°, 337.5°).
/// The lower edge is inclusive, so exactly 22.5° is NE and exactly 337.5° is N.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sector {
    N,
    NE,
    E,
    SE,
    S,
    SW,
    W,
    NW,
}

impl Sector {
    pub const ALL: [Sector; 8] = [
        Sector::N,
        Sector::NE,
        Sector::E,
        Sector::SE,
        Sector::S,
        Sector::SW,
        Sector::W,
        Sector::NW,
    ];

    /// Sector of a heading in degrees clockwise from north. Any finite value
    /// is accepted (e.g. -90 or 450); NaN/infinite headings have no sector.
    pub fn from_heading(deg: f64) -> Option<Sector> {
        if !deg.is_finite() {
            return None;
        }
        let h = deg.rem_euclid(360.0);
        // Shift by half a sector so that N's range [337.5, 22.5) becomes
        // [0, 45); `% 8` folds 360 - epsilon rounding back onto N.
        let idx = ((h + 22.5) / 45.0).floor() as usize % 8;
        Some(Self::ALL[idx])
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Sector::N => "N",
            Sector::NE => "NE",
            Sector::E => "E",
            Sector::SE => "SE",
            Sector::S => "S",
            Sector::SW => "SW",
            Sector::W => "W",
            Sector::NW => "NW",
        }
    }
}

/// What a truck contributes to the statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Moving(Sector),
    Stopped,
}

/// Initial great-circle bearing from `a` to `b` in degrees [0, 360).
/// Used only when a moving truck's message lacks `heading_deg`.
pub fn bearing_deg(a_lat: f64, a_lon: f64, b_lat: f64, b_lon: f64) -> f64 {
    let (p1, p2) = (a_lat.to_radians(), b_lat.to_radians());
    let dl = (b_lon - a_lon).to_radians();
    let y = dl.sin() * p2.cos();
    let x = p1.cos() * p2.sin() - p1.sin() * p2.cos() * dl.cos();
    y.atan2(x).to_degrees().rem_euclid(360.0)
}

#[derive(Debug, Deserialize)]
struct LatLon {
    lat: f64,
    lon: f64,
}

/// The fields of a truck position message that the job needs. Unknown fields
/// are ignored so the producer can add fields without breaking the job.
#[derive(Debug, Deserialize)]
struct PositionMsg<'a> {
    v: Option<u32>,
    #[serde(borrow)]
    plate: Option<Cow<'a, str>>,
    lat: Option<f64>,
    lon: Option<f64>,
    next: Option<LatLon>,
    speed_kmh: Option<f64>,
    heading_deg: Option<f64>,
    ts_ms: i64,
    #[serde(borrow)]
    state: Option<Cow<'a, str>>,
}

/// Why a record was not turned into an observation.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("unsupported schema version {0}")]
    Version(u32),
    #[error("moving truck without heading_deg or next waypoint")]
    NoHeading,
    #[error("record has neither a key nor a plate")]
    NoIdentity,
}

/// One truck position reduced to what the aggregation needs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observation {
    /// Event time from the truck (`ts_ms`): decides which record is latest.
    pub ts_ms: i64,
    /// When the record reached Kafka (record timestamp); decides staleness.
    pub seen_ms: i64,
    pub direction: Direction,
    /// `(lat, lon)` when the message has both (the fleet snapshot needs it).
    pub lat_lon: Option<(f64, f64)>,
}

/// Turns a record into `(truck id, observation)`. The id is the Kafka key
/// (`trucks/<plate>`) when present, because that is what partitioning is based
/// on; otherwise the JSON `plate`. `kafka_ts_ms` falls back to `ts_ms` for
/// records without a broker timestamp.
pub fn parse_position(
    key: Option<&[u8]>,
    payload: &[u8],
    kafka_ts_ms: Option<i64>,
) -> Result<(String, Observation), ParseError> {
    let msg: PositionMsg<'_> =
        serde_json::from_slice(payload).map_err(|e| ParseError::Json(e.to_string()))?;
    if let Some(v) = msg.v {
        if v != 1 {
            return Err(ParseError::Version(v));
        }
    }
    // The payload's plate first: a truck is one truck whether its records
    // are keyed by MQTT topic (`trucks/AB123CD`) or by plate (`AB123CD`,
    // a key template, issue #15), also while both kinds are in the window.
    let id = match (
        msg.plate.as_deref(),
        key.and_then(|k| std::str::from_utf8(k).ok()),
    ) {
        (Some(p), _) if !p.is_empty() => p.to_owned(),
        (_, Some(k)) if !k.is_empty() => k.to_owned(),
        _ => return Err(ParseError::NoIdentity),
    };
    let resting = msg.state.as_deref() == Some("resting");
    let slow = msg.speed_kmh.is_some_and(|s| s < STOP_SPEED_KMH);
    let direction = if resting || slow {
        Direction::Stopped
    } else {
        let heading = msg.heading_deg.filter(|h| h.is_finite()).or_else(|| {
            // Older/other producers may omit heading; derive it from the
            // vector to the next waypoint like the original ksqlDB query did.
            match (msg.lat, msg.lon, &msg.next) {
                (Some(lat), Some(lon), Some(n)) if (n.lat, n.lon) != (lat, lon) => {
                    Some(bearing_deg(lat, lon, n.lat, n.lon))
                }
                _ => None,
            }
        });
        match heading.and_then(Sector::from_heading) {
            Some(s) => Direction::Moving(s),
            None => return Err(ParseError::NoHeading),
        }
    };
    Ok((
        id,
        Observation {
            ts_ms: msg.ts_ms,
            seen_ms: kafka_ts_ms.unwrap_or(msg.ts_ms),
            direction,
            lat_lon: msg.lat.zip(msg.lon),
        },
    ))
}

/// Counts per direction. Field names are the JSON names on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    #[serde(rename = "N")]
    pub n: u64,
    #[serde(rename = "NE")]
    pub ne: u64,
    #[serde(rename = "E")]
    pub e: u64,
    #[serde(rename = "SE")]
    pub se: u64,
    #[serde(rename = "S")]
    pub s: u64,
    #[serde(rename = "SW")]
    pub sw: u64,
    #[serde(rename = "W")]
    pub w: u64,
    #[serde(rename = "NW")]
    pub nw: u64,
    pub stopped: u64,
}

impl Counts {
    pub fn add(&mut self, d: Direction) {
        let slot = match d {
            Direction::Stopped => &mut self.stopped,
            Direction::Moving(s) => match s {
                Sector::N => &mut self.n,
                Sector::NE => &mut self.ne,
                Sector::E => &mut self.e,
                Sector::SE => &mut self.se,
                Sector::S => &mut self.s,
                Sector::SW => &mut self.sw,
                Sector::W => &mut self.w,
                Sector::NW => &mut self.nw,
            },
        };
        *slot += 1;
    }

    pub fn merge(&mut self, o: &Counts) {
        self.n += o.n;
        self.ne += o.ne;
        self.e += o.e;
        self.se += o.se;
        self.s += o.s;
        self.sw += o.sw;
        self.w += o.w;
        self.nw += o.nw;
        self.stopped += o.stopped;
    }

    pub fn total(&self) -> u64 {
        self.n + self.ne + self.e + self.se + self.s + self.sw + self.w + self.nw + self.stopped
    }
}

/// The record published to the stats topic (key `fleet/stats/directions`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DirectionStats {
    pub v: u32,
    pub ts_ms: i64,
    pub counts: Counts,
    pub trucks: u64,
}

impl DirectionStats {
    pub fn new(ts_ms: i64, counts: Counts) -> Self {
        DirectionStats {
            v: 1,
            ts_ms,
            trucks: counts.total(),
            counts,
        }
    }
}

/// Internal record: the counts of one source partition, published by whichever
/// instance owns that partition and summed by the merge stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartialStats {
    pub v: u32,
    pub ts_ms: i64,
    pub partition: i32,
    /// Partitions of the source topic as seen by the publisher, so the merge
    /// stage can tell whether every partition is reporting.
    pub partitions: i32,
    pub counts: Counts,
}

/// What happened to an observation offered to the aggregator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// First record for this truck (in this partition's window).
    Inserted,
    /// Newer than the stored record: replaced it.
    Updated,
    /// Event time not newer than the stored one (out of order or duplicate).
    Late,
    /// Already older than the stale window when it arrived.
    Expired,
    /// The partition is not assigned to us (record from a revoked partition).
    Unassigned,
}

#[derive(Clone, Copy, Debug)]
struct TruckState {
    ts_ms: i64,
    seen_ms: i64,
    direction: Direction,
}

/// Latest state per truck, kept separately for every assigned partition so a
/// revoke drops exactly the trucks another instance now owns.
#[derive(Debug)]
pub struct Aggregator {
    stale_after_ms: i64,
    partitions: HashMap<i32, HashMap<String, TruckState>>,
}

impl Aggregator {
    pub fn new(stale_after_ms: i64) -> Self {
        Aggregator {
            stale_after_ms,
            partitions: HashMap::new(),
        }
    }

    /// Starts (or restarts) a partition with empty state; the caller replays
    /// the stale window of that partition to rebuild it.
    pub fn assign(&mut self, partition: i32) {
        self.partitions.insert(partition, HashMap::new());
    }

    /// Forgets a partition's trucks: another instance is now responsible.
    pub fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    pub fn revoke_all(&mut self) {
        self.partitions.clear();
    }

    pub fn is_assigned(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    pub fn assigned(&self) -> impl Iterator<Item = i32> + '_ {
        self.partitions.keys().copied()
    }

    fn is_stale(&self, seen_ms: i64, now_ms: i64) -> bool {
        now_ms.saturating_sub(seen_ms) > self.stale_after_ms
    }

    /// Latest-wins by event time: a record replaces the stored one only if its
    /// `ts_ms` is strictly greater, so replays and out-of-order deliveries
    /// cannot move a truck back in time.
    pub fn apply(&mut self, partition: i32, id: &str, obs: Observation, now_ms: i64) -> Applied {
        if self.is_stale(obs.seen_ms, now_ms) {
            return Applied::Expired;
        }
        let Some(trucks) = self.partitions.get_mut(&partition) else {
            return Applied::Unassigned;
        };
        let new = TruckState {
            ts_ms: obs.ts_ms,
            seen_ms: obs.seen_ms,
            direction: obs.direction,
        };
        match trucks.get_mut(id) {
            Some(cur) if cur.ts_ms >= obs.ts_ms => Applied::Late,
            Some(cur) => {
                *cur = new;
                Applied::Updated
            }
            None => {
                trucks.insert(id.to_owned(), new);
                Applied::Inserted
            }
        }
    }

    /// Drops trucks not heard from within the window; returns how many.
    pub fn evict_stale(&mut self, now_ms: i64) -> usize {
        let limit = self.stale_after_ms;
        let mut evicted = 0;
        for trucks in self.partitions.values_mut() {
            let before = trucks.len();
            trucks.retain(|_, t| now_ms.saturating_sub(t.seen_ms) <= limit);
            evicted += before - trucks.len();
        }
        evicted
    }

    /// Counts of one partition (None if not assigned). Call `evict_stale`
    /// first so the counts reflect the window at `now`.
    pub fn partition_counts(&self, partition: i32) -> Option<Counts> {
        self.partitions.get(&partition).map(|trucks| {
            let mut c = Counts::default();
            for t in trucks.values() {
                c.add(t.direction);
            }
            c
        })
    }

    /// Counts over all assigned partitions.
    pub fn counts(&self) -> Counts {
        let mut total = Counts::default();
        for p in self.partitions.keys() {
            if let Some(c) = self.partition_counts(*p) {
                total.merge(&c);
            }
        }
        total
    }

    pub fn trucks(&self) -> usize {
        self.partitions.values().map(HashMap::len).sum()
    }
}

/// Merge stage: keeps the latest partial per source partition and sums them.
#[derive(Debug)]
pub struct Merger {
    keep_ms: i64,
    partials: HashMap<i32, PartialStats>,
}

/// Result of a merge: the stats plus how complete they are.
#[derive(Clone, Debug, PartialEq)]
pub struct Merged {
    pub stats: DirectionStats,
    pub reporting: usize,
    pub expected: Option<i32>,
}

impl Merger {
    /// `keep_ms`: how long a partition's last partial keeps counting after its
    /// owner stopped reporting (e.g. while a rebalance moves it elsewhere).
    pub fn new(keep_ms: i64) -> Self {
        Merger {
            keep_ms,
            partials: HashMap::new(),
        }
    }

    /// Latest-wins per partition by `ts_ms`; returns whether it was kept.
    pub fn apply(&mut self, p: PartialStats) -> bool {
        match self.partials.get(&p.partition) {
            Some(cur) if cur.ts_ms >= p.ts_ms => false,
            _ => {
                self.partials.insert(p.partition, p);
                true
            }
        }
    }

    pub fn clear(&mut self) {
        self.partials.clear();
    }

    pub fn merge(&mut self, now_ms: i64) -> Merged {
        let keep = self.keep_ms;
        self.partials
            .retain(|_, p| now_ms.saturating_sub(p.ts_ms) <= keep);
        let mut counts = Counts::default();
        let mut expected = None;
        for p in self.partials.values() {
            counts.merge(&p.counts);
            expected = expected.max(Some(p.partitions));
        }
        Merged {
            stats: DirectionStats::new(now_ms, counts),
            reporting: self.partials.len(),
            expected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moving(deg: f64, ts: i64) -> Observation {
        Observation {
            ts_ms: ts,
            seen_ms: ts,
            direction: Direction::Moving(Sector::from_heading(deg).unwrap()),
            lat_lon: None,
        }
    }

    #[test]
    fn sector_boundaries() {
        let cases = [
            (0.0, Sector::N),
            (22.499, Sector::N),
            (22.5, Sector::NE),
            (45.0, Sector::NE),
            (67.499, Sector::NE),
            (67.5, Sector::E),
            (90.0, Sector::E),
            (112.5, Sector::SE),
            (135.0, Sector::SE),
            (157.5, Sector::S),
            (180.0, Sector::S),
            (202.5, Sector::SW),
            (247.5, Sector::W),
            (270.0, Sector::W),
            (292.5, Sector::NW),
            (337.499, Sector::NW),
            (337.5, Sector::N),
            (359.999, Sector::N),
            (360.0, Sector::N),
            (-0.0, Sector::N),
            (-22.5, Sector::N),
            (-22.6, Sector::NW),
            (-90.0, Sector::W),
            (450.0, Sector::E),
            (-1e-12, Sector::N),
        ];
        for (deg, want) in cases {
            assert_eq!(Sector::from_heading(deg), Some(want), "heading {deg}");
        }
        assert_eq!(Sector::from_heading(f64::NAN), None);
        assert_eq!(Sector::from_heading(f64::INFINITY), None);
    }

    #[test]
    fn every_sector_has_45_degrees() {
        let mut counts = Counts::default();
        for tenth in 0..3600 {
            let s = Sector::from_heading(f64::from(tenth) / 10.0).unwrap();
            counts.add(Direction::Moving(s));
        }
        for c in [
            counts.n, counts.ne, counts.e, counts.se, counts.s, counts.sw, counts.w, counts.nw,
        ] {
            assert_eq!(c, 450);
        }
    }

    #[test]
    fn parse_full_message() {
        let json = br#"{"v":1,"plate":"AB123CD","lat":45.1,"lon":9.2,"next":{"lat":45.2,"lon":9.2},
            "speed_kmh":62.5,"heading_deg":135.0,"ts":"2025-11-24T10:00:00Z","ts_ms":1764000000000,"state":"driving"}"#;
        let (id, obs) = parse_position(Some(b"trucks/AB123CD"), json, Some(1764000000100)).unwrap();
        assert_eq!(
            id, "AB123CD",
            "the payload's plate, however the record is keyed"
        );
        let (by_plate, _) = parse_position(Some(b"AB123CD"), json, None).unwrap();
        assert_eq!(by_plate, id);
        assert_eq!(obs.ts_ms, 1764000000000);
        assert_eq!(obs.seen_ms, 1764000000100);
        assert_eq!(obs.direction, Direction::Moving(Sector::SE));
    }

    #[test]
    fn parse_stopped_and_fallbacks() {
        let resting =
            br#"{"v":1,"plate":"X","speed_kmh":70,"heading_deg":10,"ts_ms":5,"state":"resting"}"#;
        let (id, obs) = parse_position(None, resting, None).unwrap();
        assert_eq!(id, "X");
        assert_eq!(obs.direction, Direction::Stopped);
        assert_eq!(
            obs.seen_ms, 5,
            "falls back to ts_ms without a Kafka timestamp"
        );

        let slow =
            br#"{"plate":"X","speed_kmh":0.99,"heading_deg":10,"ts_ms":5,"state":"driving"}"#;
        assert_eq!(
            parse_position(None, slow, None).unwrap().1.direction,
            Direction::Stopped
        );
        let one = br#"{"plate":"X","speed_kmh":1.0,"heading_deg":10,"ts_ms":5,"state":"driving"}"#;
        assert_eq!(
            parse_position(None, one, None).unwrap().1.direction,
            Direction::Moving(Sector::N)
        );

        // No heading: derived from the vector to the next waypoint (due west).
        let no_heading =
            br#"{"plate":"X","lat":45,"lon":9,"next":{"lat":45,"lon":8},"speed_kmh":50,"ts_ms":5}"#;
        assert_eq!(
            parse_position(None, no_heading, None).unwrap().1.direction,
            Direction::Moving(Sector::W)
        );
        let nothing = br#"{"plate":"X","speed_kmh":50,"ts_ms":5}"#;
        assert_eq!(
            parse_position(None, nothing, None),
            Err(ParseError::NoHeading)
        );
    }

    #[test]
    fn parse_rejects_bad_input() {
        assert!(matches!(
            parse_position(None, b"not json", None),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            parse_position(None, br#"{"plate":"X"}"#, None),
            Err(ParseError::Json(_))
        ));
        assert_eq!(
            parse_position(
                None,
                br#"{"v":2,"plate":"X","ts_ms":1,"heading_deg":0}"#,
                None
            ),
            Err(ParseError::Version(2))
        );
        assert_eq!(
            parse_position(Some(b""), br#"{"ts_ms":1,"heading_deg":0}"#, None),
            Err(ParseError::NoIdentity)
        );
    }

    #[test]
    fn latest_wins_by_event_time() {
        let mut a = Aggregator::new(30_000);
        a.assign(0);
        let now = 100_000;
        assert_eq!(a.apply(0, "t", moving(0.0, 90_000), now), Applied::Inserted);
        assert_eq!(a.apply(0, "t", moving(90.0, 95_000), now), Applied::Updated);
        // Out of order: older event time arrives later and must not win.
        assert_eq!(a.apply(0, "t", moving(180.0, 92_000), now), Applied::Late);
        // Duplicate (replay after rebalance) is ignored too.
        assert_eq!(a.apply(0, "t", moving(180.0, 95_000), now), Applied::Late);
        let c = a.counts();
        assert_eq!(c.e, 1);
        assert_eq!(c.total(), 1);
    }

    #[test]
    fn stale_eviction() {
        let mut a = Aggregator::new(30_000);
        a.assign(0);
        a.apply(0, "old", moving(0.0, 10_000), 10_000);
        a.apply(0, "new", moving(0.0, 35_000), 35_000);
        assert_eq!(a.evict_stale(40_000), 0, "exactly at the limit stays");
        assert_eq!(a.evict_stale(40_001), 1);
        assert_eq!(a.trucks(), 1);
        // Records already outside the window when they arrive are not added.
        assert_eq!(
            a.apply(0, "late", moving(0.0, 1_000), 40_001),
            Applied::Expired
        );
        assert_eq!(a.trucks(), 1);
    }

    #[test]
    fn staleness_uses_kafka_time_not_event_time() {
        let mut a = Aggregator::new(30_000);
        a.assign(0);
        // Truck clock 10 minutes behind, but the record reached Kafka just now.
        let obs = Observation {
            ts_ms: 0,
            seen_ms: 600_000,
            direction: Direction::Stopped,
            lat_lon: None,
        };
        assert_eq!(a.apply(0, "t", obs, 600_000), Applied::Inserted);
        assert_eq!(a.evict_stale(600_500), 0);
        assert_eq!(a.counts().stopped, 1);
    }

    #[test]
    fn partition_revoke_and_reassign() {
        let mut a = Aggregator::new(30_000);
        a.assign(0);
        a.assign(1);
        a.apply(0, "a", moving(0.0, 1), 1);
        a.apply(1, "b", moving(90.0, 1), 1);
        a.apply(
            1,
            "c",
            Observation {
                ts_ms: 1,
                seen_ms: 1,
                direction: Direction::Stopped,
                lat_lon: None,
            },
            1,
        );
        assert_eq!(a.counts().total(), 3);
        a.revoke(1);
        assert_eq!(
            a.counts(),
            Counts {
                n: 1,
                ..Counts::default()
            }
        );
        // Records of a revoked partition still in flight are ignored.
        assert_eq!(a.apply(1, "b", moving(90.0, 2), 2), Applied::Unassigned);
        // Reassignment starts empty; replaying the window rebuilds it.
        a.assign(1);
        assert_eq!(a.partition_counts(1), Some(Counts::default()));
        a.apply(1, "b", moving(90.0, 1), 2);
        assert_eq!(a.counts().total(), 2);
        a.revoke_all();
        assert_eq!(a.counts().total(), 0);
    }

    #[test]
    fn stats_json_shape() {
        let mut c = Counts::default();
        c.add(Direction::Moving(Sector::NW));
        c.add(Direction::Stopped);
        let s = DirectionStats::new(42, c);
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"v":1,"ts_ms":42,"trucks":2,"counts":{
                "N":0,"NE":0,"E":0,"SE":0,"S":0,"SW":0,"W":0,"NW":1,"stopped":1}})
        );
    }

    #[test]
    fn merger_sums_latest_partials() {
        let mut m = Merger::new(30_000);
        let part = |p: i32, ts: i64, n: u64| PartialStats {
            v: 1,
            ts_ms: ts,
            partition: p,
            partitions: 2,
            counts: Counts {
                n,
                ..Counts::default()
            },
        };
        assert!(m.apply(part(0, 1_000, 5)));
        assert!(m.apply(part(1, 1_000, 7)));
        assert!(m.apply(part(1, 2_000, 3)));
        assert!(!m.apply(part(1, 1_500, 100)), "older partial ignored");
        let r = m.merge(2_000);
        assert_eq!(r.stats.counts.n, 8);
        assert_eq!(r.stats.trucks, 8);
        assert_eq!((r.reporting, r.expected), (2, Some(2)));
        // Partition 0's owner went silent for longer than keep_ms.
        let r = m.merge(31_001);
        assert_eq!(r.stats.counts.n, 3);
        assert_eq!(r.reporting, 1);
    }
}
