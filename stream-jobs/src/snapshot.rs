//! The fleet snapshot: every truck's latest position in one compact binary
//! message per second, so a map viewer draws the whole fleet from about
//! 6 bytes per truck per second instead of a ~250-byte JSON message per
//! truck per second (pure logic; the Kafka loop is in `snapshot_job`).
//!
//! Wire format v1 of `fleet/stats/snapshot` (little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 1 | version = 1 |
//! | 1 | reserved (0) |
//! | 2 | reserved (0) |
//! | 4 | `epoch` (u32): the plate directory this snapshot's slots refer to |
//! | 4 | `count` (u32): records that follow |
//! | 8 | `ts_ms` (i64): when the snapshot was taken |
//! | 4 x 8 | `lon_min`, `lat_min`, `lon_max`, `lat_max` (f64): the box the coordinates are scaled to |
//! | 6 x count | per truck: `x` u16, `y` u16 (0..=65535 across the box), `age_s` u8 (seconds since its last record, saturated at 255), `flags` u8 |
//!
//! `flags`: bit 0 = stopped; bits 1..=3 = heading sector (0 = N .. 7 = NW) of a moving truck.
//! Record `i` is the truck in slot `i` of the plate directory of the same `epoch`.
//!
//! `fleet/stats/plates` v1: version byte 1, reserved u8 x 3, `epoch` u32, `count` u32,
//! then `count` plates as UTF-8 separated by `\n`, in slot order.
//!
//! Slots are stable while trucks keep reporting: a new truck takes the next
//! slot (the directory of the same epoch just grows), and the epoch changes
//! only when trucks are dropped and the slots are compacted.

use std::collections::HashMap;

use crate::agg::{Direction, Observation};

pub const SNAPSHOT_VERSION: u8 = 1;
/// Header bytes before the records.
pub const HEADER_LEN: usize = 1 + 1 + 2 + 4 + 4 + 8 + 4 * 8;
pub const RECORD_LEN: usize = 6;
const PLATES_HEADER_LEN: usize = 1 + 3 + 4 + 4;

/// What happened to an observation offered to [`FleetState::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Inserted,
    Updated,
    /// Older event time than what the slot holds: ignored.
    Late,
    /// No position in the message: ignored.
    NoPosition,
    /// The state holds `max_trucks` already: a new truck is not added.
    Full,
}

#[derive(Debug, Clone)]
struct Slot {
    plate: String,
    lat: f64,
    lon: f64,
    direction: Direction,
    ts_ms: i64,
    seen_ms: i64,
}

/// Latest position of every truck heard from in the last `drop_after_ms`.
#[derive(Debug)]
pub struct FleetState {
    slots: Vec<Slot>,
    index: HashMap<String, usize>,
    epoch: u32,
    max_trucks: usize,
    drop_after_ms: i64,
}

impl FleetState {
    /// `max_trucks` bounds memory and message size (6 bytes a truck);
    /// `drop_after_ms`: a truck silent that long leaves the snapshot.
    pub fn new(max_trucks: usize, drop_after_ms: i64) -> Self {
        FleetState {
            slots: Vec::new(),
            index: HashMap::new(),
            epoch: 1,
            max_trucks,
            drop_after_ms,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Takes an observation of truck `plate`; an older event time never
    /// overwrites a newer one (same rule as the direction statistics).
    pub fn apply(&mut self, plate: &str, obs: &Observation) -> Applied {
        let Some((lat, lon)) = obs.lat_lon.filter(|(a, o)| a.is_finite() && o.is_finite()) else {
            return Applied::NoPosition;
        };
        if let Some(&i) = self.index.get(plate) {
            let s = &mut self.slots[i];
            if obs.ts_ms < s.ts_ms {
                return Applied::Late;
            }
            (s.lat, s.lon, s.direction, s.ts_ms) = (lat, lon, obs.direction, obs.ts_ms);
            s.seen_ms = s.seen_ms.max(obs.seen_ms);
            return Applied::Updated;
        }
        if self.slots.len() >= self.max_trucks {
            return Applied::Full;
        }
        self.index.insert(plate.to_owned(), self.slots.len());
        self.slots.push(Slot {
            plate: plate.to_owned(),
            lat,
            lon,
            direction: obs.direction,
            ts_ms: obs.ts_ms,
            seen_ms: obs.seen_ms,
        });
        Applied::Inserted
    }

    /// Drops trucks whose last record reached Kafka `drop_after_ms` or more
    /// before `now_ms`; compacts the slots and starts a new epoch if any went.
    pub fn expire(&mut self, now_ms: i64) -> usize {
        let before = self.slots.len();
        let limit = self.drop_after_ms;
        self.slots.retain(|s| now_ms - s.seen_ms < limit);
        let dropped = before - self.slots.len();
        if dropped > 0 {
            self.index = self
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| (s.plate.clone(), i))
                .collect();
            self.epoch = self.epoch.wrapping_add(1);
        }
        dropped
    }

    /// The binary snapshot (format in the module docs).
    pub fn encode_snapshot(&self, now_ms: i64) -> Vec<u8> {
        let (lon_min, lat_min, lon_max, lat_max) = self.bounds();
        let mut out = Vec::with_capacity(HEADER_LEN + RECORD_LEN * self.slots.len());
        out.extend_from_slice(&[SNAPSHOT_VERSION, 0, 0, 0]);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&(self.slots.len() as u32).to_le_bytes());
        out.extend_from_slice(&now_ms.to_le_bytes());
        for v in [lon_min, lat_min, lon_max, lat_max] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for s in &self.slots {
            out.extend_from_slice(&scale(s.lon, lon_min, lon_max).to_le_bytes());
            out.extend_from_slice(&scale(s.lat, lat_min, lat_max).to_le_bytes());
            let age_s = ((now_ms - s.seen_ms).max(0) / 1000).min(255) as u8;
            out.push(age_s);
            out.push(flags(s.direction));
        }
        out
    }

    /// The plate directory of the current epoch (format in the module docs).
    pub fn encode_plates(&self) -> Vec<u8> {
        let names: usize = self.slots.iter().map(|s| s.plate.len() + 1).sum();
        let mut out = Vec::with_capacity(PLATES_HEADER_LEN + names);
        out.extend_from_slice(&[SNAPSHOT_VERSION, 0, 0, 0]);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&(self.slots.len() as u32).to_le_bytes());
        for (i, s) in self.slots.iter().enumerate() {
            if i > 0 {
                out.push(b'\n');
            }
            out.extend_from_slice(s.plate.as_bytes());
        }
        out
    }

    /// Box around all positions; never empty, so scaling cannot divide by 0.
    fn bounds(&self) -> (f64, f64, f64, f64) {
        let mut b = (f64::MAX, f64::MAX, f64::MIN, f64::MIN);
        for s in &self.slots {
            b = (
                b.0.min(s.lon),
                b.1.min(s.lat),
                b.2.max(s.lon),
                b.3.max(s.lat),
            );
        }
        if self.slots.is_empty() {
            return (0.0, 0.0, 1e-6, 1e-6);
        }
        (b.0, b.1, b.2.max(b.0 + 1e-6), b.3.max(b.1 + 1e-6))
    }
}

fn scale(v: f64, min: f64, max: f64) -> u16 {
    (((v - min) / (max - min)) * 65535.0)
        .round()
        .clamp(0.0, 65535.0) as u16
}

fn flags(d: Direction) -> u8 {
    match d {
        Direction::Stopped => 1,
        Direction::Moving(s) => {
            let i = crate::agg::Sector::ALL
                .iter()
                .position(|x| *x == s)
                .unwrap_or(0);
            (i as u8) << 1
        }
    }
}

/// The plate of a position record key `trucks/<plate>`, or of a bare
/// `<plate>` key; `None` for deeper topics under the same prefix (e.g.
/// `trucks/<plate>/route`), which carry no position.
pub fn plate_of_key<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    // A bare key is a plate: positions keyed by a key template (issue #15).
    let rest = key.strip_prefix(prefix).unwrap_or(key);
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agg::Sector;

    fn at(lat: f64, lon: f64, ts: i64, direction: Direction) -> Observation {
        Observation {
            ts_ms: ts,
            seen_ms: ts,
            direction,
            lat_lon: Some((lat, lon)),
        }
    }

    fn decode_xy(buf: &[u8], i: usize) -> (u16, u16, u8, u8) {
        let r = &buf[HEADER_LEN + i * RECORD_LEN..];
        (
            u16::from_le_bytes([r[0], r[1]]),
            u16::from_le_bytes([r[2], r[3]]),
            r[4],
            r[5],
        )
    }

    #[test]
    fn snapshot_is_six_bytes_a_truck_plus_header() {
        let mut f = FleetState::new(100, 120_000);
        for i in 0..10 {
            f.apply(
                &format!("P{i}"),
                &at(40.0 + i as f64, 9.0, 1_000, Direction::Stopped),
            );
        }
        let buf = f.encode_snapshot(2_000);
        assert_eq!(buf.len(), HEADER_LEN + 10 * RECORD_LEN);
        assert_eq!(buf[0], SNAPSHOT_VERSION);
        assert_eq!(u32::from_le_bytes(buf[8..12].try_into().unwrap()), 10);
        assert_eq!(i64::from_le_bytes(buf[12..20].try_into().unwrap()), 2_000);
    }

    #[test]
    fn coordinates_scale_to_the_box_corners_and_back_within_a_few_metres() {
        let mut f = FleetState::new(100, 120_000);
        f.apply("A", &at(36.6, 6.6, 1, Direction::Stopped));
        f.apply("B", &at(47.1, 18.5, 1, Direction::Stopped));
        f.apply("C", &at(41.9028, 12.4964, 1, Direction::Stopped));
        let buf = f.encode_snapshot(1);
        assert_eq!(decode_xy(&buf, 0).0, 0);
        assert_eq!(decode_xy(&buf, 1).1, 65535);
        let (x, y, _, _) = decode_xy(&buf, 2);
        let lon = 6.6 + (18.5 - 6.6) * f64::from(x) / 65535.0;
        let lat = 36.6 + (47.1 - 36.6) * f64::from(y) / 65535.0;
        // Italy's box over 16 bits: better than 0.0001 degree (about 10 m).
        assert!((lon - 12.4964).abs() < 1e-4 && (lat - 41.9028).abs() < 1e-4);
    }

    #[test]
    fn age_and_flags_carry_silence_stopped_and_heading_sector() {
        let mut f = FleetState::new(100, 120_000);
        f.apply("S", &at(45.0, 9.0, 10_000, Direction::Stopped));
        f.apply("E", &at(45.1, 9.1, 40_000, Direction::Moving(Sector::E)));
        let buf = f.encode_snapshot(45_500);
        assert_eq!(decode_xy(&buf, 0).2, 35, "S silent for 35.5 s");
        assert_eq!(decode_xy(&buf, 0).3, 1, "stopped bit");
        assert_eq!(decode_xy(&buf, 1).2, 5);
        assert_eq!(decode_xy(&buf, 1).3, 2 << 1, "sector E = 2");
    }

    #[test]
    fn an_older_event_never_overwrites_a_newer_one() {
        let mut f = FleetState::new(100, 120_000);
        assert_eq!(
            f.apply("A", &at(45.0, 9.0, 2_000, Direction::Stopped)),
            Applied::Inserted
        );
        assert_eq!(
            f.apply("A", &at(46.0, 9.0, 1_000, Direction::Stopped)),
            Applied::Late
        );
        assert_eq!(
            f.apply("A", &at(46.0, 9.0, 3_000, Direction::Stopped)),
            Applied::Updated
        );
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn at_max_trucks_new_trucks_are_refused_and_known_ones_still_update() {
        let mut f = FleetState::new(2, 120_000);
        f.apply("A", &at(45.0, 9.0, 1, Direction::Stopped));
        f.apply("B", &at(45.0, 9.0, 1, Direction::Stopped));
        assert_eq!(
            f.apply("C", &at(45.0, 9.0, 1, Direction::Stopped)),
            Applied::Full
        );
        assert_eq!(
            f.apply("A", &at(45.0, 9.0, 2, Direction::Stopped)),
            Applied::Updated
        );
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn trucks_silent_for_the_drop_time_leave_and_the_epoch_changes() {
        let mut f = FleetState::new(100, 120_000);
        f.apply("OLD", &at(45.0, 9.0, 0, Direction::Stopped));
        f.apply("NEW", &at(45.0, 9.0, 100_000, Direction::Stopped));
        let e0 = f.epoch();
        assert_eq!(f.expire(119_999), 0);
        assert_eq!(f.epoch(), e0, "nothing dropped: same epoch");
        assert_eq!(f.expire(120_000), 1);
        assert_ne!(f.epoch(), e0);
        assert_eq!(f.encode_plates()[12..], *b"NEW");
        // The compacted index still finds the survivor.
        assert_eq!(
            f.apply("NEW", &at(45.0, 9.0, 100_001, Direction::Stopped)),
            Applied::Updated
        );
    }

    #[test]
    fn plate_directory_lists_slots_in_order_with_the_epoch() {
        let mut f = FleetState::new(100, 120_000);
        for p in ["AB123CD", "EF456GH"] {
            f.apply(p, &at(45.0, 9.0, 1, Direction::Stopped));
        }
        let d = f.encode_plates();
        assert_eq!(u32::from_le_bytes(d[4..8].try_into().unwrap()), f.epoch());
        assert_eq!(u32::from_le_bytes(d[8..12].try_into().unwrap()), 2);
        assert_eq!(&d[12..], b"AB123CD\nEF456GH");
    }

    #[test]
    fn no_position_is_ignored() {
        let mut f = FleetState::new(100, 120_000);
        let mut o = at(45.0, 9.0, 1, Direction::Stopped);
        o.lat_lon = None;
        assert_eq!(f.apply("A", &o), Applied::NoPosition);
        o.lat_lon = Some((f64::NAN, 9.0));
        assert_eq!(f.apply("A", &o), Applied::NoPosition);
        assert!(f.is_empty());
        assert_eq!(f.encode_snapshot(1).len(), HEADER_LEN);
    }

    #[test]
    fn only_single_level_truck_topics_are_positions() {
        assert_eq!(plate_of_key("trucks/AB123CD", "trucks/"), Some("AB123CD"));
        assert_eq!(plate_of_key("trucks/AB123CD/route", "trucks/"), None);
        assert_eq!(plate_of_key("trucks/", "trucks/"), None);
        assert_eq!(plate_of_key("fleet/x", "trucks/"), None);
        // Keyed by plate through a key template (issue #15).
        assert_eq!(plate_of_key("AB123CD", "trucks/"), Some("AB123CD"));
    }
}
