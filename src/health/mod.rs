//! Active health checking: the three probe tiers of SPEC "Health tiers".
//!
//! * [`probes`] runs one liveness, readiness or deep probe against a backend
//!   and returns a typed result;
//! * [`engine`] reads an inference engine's Prometheus text (queue depth,
//!   KV-cache use) for the deep tier.
//!
//! Scheduling, thresholds and health states are the checker's, not theirs.

pub mod engine;
pub mod probes;
