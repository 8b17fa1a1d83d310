//! The Prometheus registry and its exposition at `/metrics`.
//!
//! Metric names and labels are SPEC's ("Metrics"). Uses `prometheus-client`,
//! the Prometheus project's own Rust client, rather than hand-written text.
//! This module only counts; it never decides anything.

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Labels of `weir_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    /// The client's model ("" when the request never named one).
    pub model: String,
    /// The backend that answered ("" when none did).
    pub backend: String,
    /// The HTTP status sent to the client.
    pub status: u16,
}

/// Labels of `weir_upstream_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct UpstreamErrorLabels {
    /// The backend's name.
    pub backend: String,
    /// `connect`, `timeout`, `protocol`, `status_5xx`, `status_429`.
    pub kind: &'static str,
}

/// Labels of `weir_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Every metric weir exports, registered once at start-up.
pub(crate) struct Metrics {
    registry: Registry,
    /// `weir_requests_total{model,backend,status}`.
    pub requests: Family<RequestLabels, Counter>,
    /// `weir_upstream_errors_total{backend,kind}`.
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric.
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "weir_requests",
            "Requests answered, by model, backend and status",
            requests.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "weir_upstream_errors",
            "Failed upstream attempts, by backend and kind",
            upstream_errors.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("weir_build_info", "weir's version", build);
        Self {
            registry,
            requests,
            upstream_errors,
        }
    }

    /// The exposition text (OpenMetrics text, which Prometheus reads).
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail; an encoder error would mean a
        // bug in a label type, and an empty answer is then the honest one.
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
