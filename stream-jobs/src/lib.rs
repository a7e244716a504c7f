//! Stream jobs of the Lodestream fleet demo.
//!
//! * [`agg`]: pure aggregation logic (sectors, latest-wins, stale eviction,
//!   per-partition state, merge of partials), unit-tested without Kafka.
//! * [`window`]: consumer-group plumbing that rebuilds state from a time window
//!   on every partition assignment.
//! * [`directions`]: the `directions` job wiring both together.

pub mod agg;
pub mod directions;
pub mod metrics;
pub mod window;
