//! Health: which backends are in rotation, and at what weight.
//!
//! * [`probes`] runs one liveness, readiness or deep probe against a backend
//!   and returns a typed result;
//! * [`engine`] reads an inference engine's Prometheus text (queue depth,
//!   KV-cache use) for the deep tier;
//! * [`state`] is a backend's health record and the effective-weight math;
//! * [`checker`] schedules the probes (one task per backend and tier,
//!   jittered), applies rise/fall thresholds, and rebuilds the snapshot when
//!   something changed;
//! * [`outlier`] judges backends from live traffic (consecutive failures,
//!   upstream 429s) and ejects them.
//!
//! Requests never read this state: they read the effective weights baked
//! into the snapshot they loaded.

pub(crate) mod checker;
pub mod engine;
pub(crate) mod outlier;
pub mod probes;
pub mod state;
