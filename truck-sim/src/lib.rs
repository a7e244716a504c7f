//! truck-sim library: the pure simulation logic (plates, places, routes,
//! route following, messages) and the I/O around it (OSRM client, MQTT).
//! The `truck-sim` binary in `main.rs` wires them together.

pub mod follow;
pub mod message;
pub mod mqtt;
pub mod osrm;
pub mod packed_points;
pub mod places;
pub mod plates;
pub mod route;
pub mod route_message;
pub mod stats;
pub mod truck;
