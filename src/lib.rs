//! weir: a reverse-proxy gateway for OpenAI-style LLM APIs.
//!
//! # Layout
//!
//! A request travels through one module per phase, each a plain async
//! function call with owned, typed values in between:
//!
//! * [`server`] accepts connections, enforces header/body limits and routes;
//! * [`api`] reads the request facts (`model`, `stream`, token estimate) and
//!   is the one place errors become OpenAI-shaped HTTP responses;
//! * [`snapshot`] is the immutable routing state (models -> pools of
//!   backends) that the request loads once from an `ArcSwap`;
//! * [`balancer`] picks a backend by smooth weighted round-robin;
//! * [`proxy`] runs the attempts, header hygiene and response streaming;
//! * [`upstream`] owns the pooled HTTP clients that talk to backends;
//! * [`config`] parses and validates the TOML file;
//! * [`cluster`] shares the rate limits with other replicas through Redis
//!   (`[cluster]`), leasing tokens so requests rarely wait on it;
//! * [`mock`] is an OpenAI-compatible mock backend for demos, tests, benches;
//! * [`healthcheck`] is `weir healthcheck`, the container's own probe.
//!
//! [`Gateway`] ties them together and is what `main.rs` and the tests start.
#![forbid(unsafe_code)]
#![deny(clippy::await_holding_lock)]

mod access_log;
mod admin;
pub mod admission;
pub mod api;
pub mod balancer;
mod body;
mod body_budget;
mod busy_poll;
pub mod cluster;
pub mod config;
pub mod demo;
mod gateway;
mod headers;
pub mod health;
pub mod healthcheck;
mod jitter;
mod lanes;
pub mod log_writer;
mod metrics;
pub mod mock;
mod proxy;
mod redact;
mod reload;
mod server;
mod slots;
pub mod snapshot;
mod socket;
mod spare;
mod upstream;
mod watch;

pub use config::{Config, Secret};
pub use gateway::{Gateway, Handle};
pub use upstream::{trust::check as check_trusted_cas, UpstreamError};
