//! Stream jobs of the Lodestream fleet demo.
//!
//! * [`agg`]: pure aggregation logic (sectors, latest-wins, stale eviction,
//!   per-partition state, merge of partials), unit-tested without Kafka.
//! * [`window`]: consumer-group plumbing that rebuilds state from a time window
//!   on every partition assignment.
//! * [`directions`]: the `directions` job wiring both together.
//! * [`snapshot`]: pure state and binary encoding of the per-second fleet
//!   snapshot for map viewers; [`snapshot_job`]: the `fleet-snapshot` job.

pub mod agg;
pub mod directions;
pub mod metrics;
pub mod signal;
pub mod snapshot;
pub mod snapshot_job;
pub mod window;
