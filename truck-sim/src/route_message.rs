//! The retained "route ahead" message of a truck (schema version 1), which a
//! map draws for a followed truck.
//!
//! Topic: `<prefix>/<plate>/route`, retained. Published when the truck sets off
//! on a new route; an empty retained payload clears it when the truck arrives.
//! See `truck-sim/README.md` for the schema.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::message::{rfc3339_millis, round_to, LatLon, SCHEMA_VERSION};
use crate::places::LonLat;

/// Drawing tolerance of the published outline: at zoom 12 a pixel is ~38 m.
pub const OUTLINE_TOLERANCE_M: f64 = 20.0;
/// Points at most in one route message (about 8 KB of JSON).
pub const OUTLINE_MAX_POINTS: usize = 400;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteAheadMessage<'a> {
    pub v: u8,
    pub plate: &'a str,
    /// The last point of the route.
    pub dest: LatLon,
    /// Metres from the truck to `dest` along the route, when published.
    pub remaining_m: f64,
    pub ts: String,
    pub ts_ms: u64,
    /// `[lon, lat]` pairs (GeoJSON order), 5 decimals (~1 m): the truck's
    /// position when published, then the route ahead, simplified for drawing.
    pub coords: Vec<[f64; 2]>,
}

impl<'a> RouteAheadMessage<'a> {
    /// `outline` must hold at least one point (its last is the destination).
    pub fn new(plate: &'a str, outline: &[LonLat], remaining_m: f64, now: SystemTime) -> Self {
        let ts_ms = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let dest = outline.last().copied().unwrap_or(LonLat::new(0.0, 0.0));
        Self {
            v: SCHEMA_VERSION,
            plate,
            dest: LatLon {
                lat: round_to(dest.lat, 6),
                lon: round_to(dest.lon, 6),
            },
            remaining_m: round_to(remaining_m.max(0.0), 0),
            ts: rfc3339_millis(ts_ms),
            ts_ms,
            coords: outline
                .iter()
                .map(|p| [round_to(p.lon, 5), round_to(p.lat, 5)])
                .collect(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // A plain struct of numbers and strings always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Topic of a truck's route-ahead message.
pub fn route_topic(prefix: &str, plate: &str) -> String {
    format!("{prefix}/{plate}/route")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::time::Duration;

    #[test]
    fn route_message_has_schema_v1_fields_in_geojson_order() {
        let outline = [
            LonLat::new(9.190_012_3, 45.464_212_3),
            LonLat::new(9.5, 45.3),
            LonLat::new(14.268_11, 40.851_81),
        ];
        let json = RouteAheadMessage::new(
            "AB123CD",
            &outline,
            730_123.4,
            UNIX_EPOCH + Duration::from_millis(1_764_068_820_123),
        )
        .to_json();
        let v: Value = serde_json::from_slice(&json).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["coords", "dest", "plate", "remaining_m", "ts", "ts_ms", "v"]
        );
        assert_eq!(v["v"], 1);
        assert_eq!(v["coords"][0][0], 9.19001);
        assert_eq!(v["coords"][0][1], 45.46421);
        assert_eq!(v["coords"].as_array().unwrap().len(), 3);
        assert_eq!(v["dest"]["lat"], 40.85181);
        assert_eq!(v["dest"]["lon"], 14.26811);
        assert_eq!(v["remaining_m"], 730_123.0);
        assert_eq!(v["ts"], "2025-11-25T11:07:00.123Z");
    }

    #[test]
    fn route_topic_is_a_sub_level_of_the_position_topic() {
        // `trucks/+` (all positions) does not match it; `trucks/AB123CD/#` does.
        assert_eq!(route_topic("trucks", "AB123CD"), "trucks/AB123CD/route");
    }
}
