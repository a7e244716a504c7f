//! The JSON position message a truck publishes (schema version 1).
//!
//! Topic: `<prefix>/<plate>`. See `truck-sim/README.md` for the schema.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::places::LonLat;

pub const SCHEMA_VERSION: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TruckState {
    Driving,
    Resting,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatLon {
    pub lat: f64,
    pub lon: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PositionMessage<'a> {
    pub v: u8,
    pub plate: &'a str,
    pub lat: f64,
    pub lon: f64,
    pub next: LatLon,
    pub speed_kmh: f64,
    pub heading_deg: f64,
    pub ts: String,
    pub ts_ms: u64,
    pub state: TruckState,
}

impl<'a> PositionMessage<'a> {
    /// Builds a message, rounding coordinates to 6 decimals (~0.1 m) and
    /// speed and heading to one decimal.
    pub fn new(
        plate: &'a str,
        at: LonLat,
        next: LonLat,
        speed_mps: f64,
        heading_deg: f64,
        state: TruckState,
        now: SystemTime,
    ) -> Self {
        let ts_ms = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let heading = round_to(heading_deg.rem_euclid(360.0), 1);
        Self {
            v: SCHEMA_VERSION,
            plate,
            lat: round_to(at.lat, 6),
            lon: round_to(at.lon, 6),
            next: LatLon {
                lat: round_to(next.lat, 6),
                lon: round_to(next.lon, 6),
            },
            speed_kmh: round_to((speed_mps * 3.6).max(0.0), 1),
            heading_deg: if heading >= 360.0 { 0.0 } else { heading },
            ts: rfc3339_millis(ts_ms),
            ts_ms,
            state,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising this plain struct cannot fail (no maps, no custom
        // serialisers); fall back to an empty payload rather than panic.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `2026-11-25T11:07:00.123Z` for an epoch time in milliseconds.
pub fn rfc3339_millis(ts_ms: u64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_millis(ts_ms);
    humantime::format_rfc3339_millis(t).to_string()
}

pub(crate) fn round_to(x: f64, decimals: i32) -> f64 {
    if !x.is_finite() {
        return 0.0;
    }
    let k = 10f64.powi(decimals);
    (x * k).round() / k
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::time::Duration;

    fn sample(state: TruckState) -> Vec<u8> {
        PositionMessage::new(
            "AB123CD",
            LonLat::new(9.190_012_345, 45.464_212_345),
            LonLat::new(9.2, 45.47),
            20.0,
            359.97,
            state,
            UNIX_EPOCH + Duration::from_millis(1_764_068_820_123),
        )
        .to_json()
    }

    #[test]
    fn message_has_all_schema_v1_fields() {
        let v: Value = serde_json::from_slice(&sample(TruckState::Driving)).unwrap();
        let obj = v.as_object().unwrap();
        let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "heading_deg",
                "lat",
                "lon",
                "next",
                "plate",
                "speed_kmh",
                "state",
                "ts",
                "ts_ms",
                "v"
            ]
        );
        assert_eq!(v["v"], 1);
        assert_eq!(v["plate"], "AB123CD");
        assert_eq!(v["next"]["lat"], 45.47);
        assert_eq!(v["next"]["lon"], 9.2);
        assert_eq!(v["state"], "driving");
    }

    #[test]
    fn message_rounds_coordinates_speed_and_heading() {
        let v: Value = serde_json::from_slice(&sample(TruckState::Driving)).unwrap();
        assert_eq!(v["lat"], 45.464212);
        assert_eq!(v["lon"], 9.190012);
        assert_eq!(v["speed_kmh"], 72.0);
        // 359.97 rounds to 360.0, which wraps to 0.
        assert_eq!(v["heading_deg"], 0.0);
    }

    #[test]
    fn message_timestamps_agree() {
        let v: Value = serde_json::from_slice(&sample(TruckState::Resting)).unwrap();
        assert_eq!(v["ts_ms"], 1_764_068_820_123u64);
        assert_eq!(v["ts"], "2025-11-25T11:07:00.123Z");
        assert_eq!(v["state"], "resting");
    }

    #[test]
    fn non_finite_values_become_zero() {
        let m = PositionMessage::new(
            "AB123CD",
            LonLat::new(f64::NAN, 45.0),
            LonLat::new(9.0, 45.0),
            f64::INFINITY,
            f64::NAN,
            TruckState::Driving,
            UNIX_EPOCH,
        );
        assert_eq!(m.lon, 0.0);
        assert_eq!(m.speed_kmh, 0.0);
        assert_eq!(m.heading_deg, 0.0);
        assert_eq!(m.ts, "1970-01-01T00:00:00.000Z");
    }
}
