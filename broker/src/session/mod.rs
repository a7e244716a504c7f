//! The session lifecycle: what a session holds (`state`), its record in
//! the sessions topic (`record`), every node's view of that topic
//! (`store`), which client ids this node holds (`registry`), and the nodes'
//! liveness (`liveness`) with the adoption of a dead node's sessions
//! (`cluster`), the claim at CONNECT (`lifecycle`) and the release when
//! a connection ends (`release`).

pub mod cluster;
pub mod ended;
pub mod high_watermarks;
pub mod inbound_qos2;
pub mod lifecycle;
pub mod liveness;
pub mod mailbox;
pub mod record;
pub mod registry;
pub mod release;
pub mod state;
pub mod store;

pub use state::*;
