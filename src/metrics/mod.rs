//! The Prometheus registry and its exposition at `/metrics`.
//!
//! Metric names and labels are SPEC's ("Metrics"). Uses `prometheus-client`,
//! the Prometheus project's own Rust client, rather than hand-written text.
//! This module only counts; it never decides anything. The metrics every
//! proxied request updates are per lane ([`lane`]), so that the lanes do not
//! write one shared cache line each request; the rest are
//! prometheus-client's own types.

mod lane;

use std::sync::atomic::AtomicU64;

use crate::admission::limiter::{LimitKind, ModelMetrics};
pub(crate) use lane::{LaneCounter, LaneGauge, LaneHistogram};
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

/// `weir_requests_total` handles of one (model, backend) pair, resolved
/// lazily per status and then reused, so a request increments a counter
/// without formatting or hashing labels.
#[derive(Debug)]
pub(crate) struct RequestCounters {
    model: String,
    backend: String,
    requests: std::sync::Arc<Requests>,
    /// The routing of the pair these handles were made for: a reload that
    /// drops the pair retires it, and one that restores the pair routes it
    /// anew, so a request still running from before the drop can tell the
    /// restored series is not its own.
    routing: std::sync::Arc<Routing>,
    /// The statuses weir answers most, each resolved on first use.
    common: [(u16, std::sync::OnceLock<LaneCounter>); 12],
}

impl RequestCounters {
    /// Handles for a pair a snapshot routes; the pair is routed (its series
    /// may be created) until [`Metrics::forget_removed`] drops it.
    fn new(
        requests: &std::sync::Arc<Requests>,
        model: &str,
        backend: &str,
    ) -> std::sync::Arc<Self> {
        const COMMON: [u16; 12] = [200, 400, 401, 403, 404, 408, 413, 429, 500, 502, 503, 504];
        let routing = requests
            .routed()
            .entry((model.to_owned(), backend.to_owned()))
            .or_default()
            .clone();
        std::sync::Arc::new(Self {
            model: model.to_owned(),
            backend: backend.to_owned(),
            requests: requests.clone(),
            routing,
            common: COMMON.map(|s| (s, std::sync::OnceLock::new())),
        })
    }

    /// Counts one answered request with this status.
    pub(crate) fn inc(&self, status: u16) {
        match self.common.iter().find(|(s, _)| *s == status) {
            Some((_, cell)) => cell.get_or_init(|| self.resolve(status)).inc(),
            None => {
                // The family's read lock is let go at the end of this
                // statement, before `resolve` may take its write lock. A
                // retired pair's series, if a reload restored it, belongs
                // to the restored routing, not to this request.
                let counted = !self.routing.retired()
                    && self
                        .requests
                        .family
                        .get(&self.labels(status))
                        .map(|c| c.inc())
                        .is_some();
                if !counted {
                    self.resolve(status).inc();
                }
            }
        }
    }

    fn labels(&self, status: u16) -> RequestLabels {
        RequestLabels {
            model: self.model.clone(),
            backend: self.backend.clone(),
            status,
        }
    }

    /// The series for `status`, created (and listed, so a reload can drop
    /// it) while the pair is routed. Once a reload has dropped the pair, a
    /// request still running there counts into a counter no scrape shows,
    /// so the dropped series never comes back, not even when a later reload
    /// restores the pair (its series then start from 0; the model's latency
    /// and token series do too when the reload had dropped the model).
    fn resolve(&self, status: u16) -> LaneCounter {
        let mut routed = self.requests.routed();
        match routed.get_mut(&(self.model.clone(), self.backend.clone())) {
            Some(routing) if std::sync::Arc::ptr_eq(routing, &self.routing) => {
                let mut statuses = routing.statuses.lock().unwrap_or_else(|e| e.into_inner());
                if !statuses.contains(&status) {
                    statuses.push(status);
                }
                self.requests
                    .family
                    .get_or_create_owned(&self.labels(status))
            }
            _ => LaneCounter::default(),
        }
    }
}

/// One routing of a (model, backend) pair: from the snapshot that first
/// routes it to the reload that drops it.
#[derive(Debug, Default)]
struct Routing {
    /// The statuses whose series exist, for the reload that drops them.
    /// Locked only under [`Requests::routed`], never to count.
    statuses: std::sync::Mutex<Vec<u16>>,
    /// Set when a reload drops the pair.
    retired: std::sync::atomic::AtomicBool,
}

impl Routing {
    fn retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// `weir_requests_total` and the statuses counted so far per (model,
/// backend) pair a snapshot routes. Unlike every other label of weir's,
/// `status` is an open set (whatever a backend answers), so the series are
/// listed as they are created, for a reload to find and drop.
#[derive(Debug, Default)]
struct Requests {
    family: Family<RequestLabels, LaneCounter>,
    /// Taken only when a series is created or dropped, never to count.
    routed: std::sync::Mutex<std::collections::HashMap<(String, String), std::sync::Arc<Routing>>>,
}

impl Requests {
    /// Drops the series of every pair `routed` says no, but the one of
    /// models no route serves (`("", "")`), which is always kept.
    fn retain(&self, routed: impl Fn(&str, &str) -> bool) {
        self.routed().retain(|(model, backend), routing| {
            let keep = model.is_empty() || routed(model, backend);
            if !keep {
                routing
                    .retired
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let statuses = routing.statuses.lock().unwrap_or_else(|e| e.into_inner());
                for &status in statuses.iter() {
                    self.family.remove(&RequestLabels {
                        model: model.clone(),
                        backend: backend.clone(),
                        status,
                    });
                }
            }
            keep
        });
    }

    fn routed(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<(String, String), std::sync::Arc<Routing>>,
    > {
        self.routed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why an upstream attempt failed: the `kind` of
/// `weir_upstream_errors_total` and the `reason` of `weir_retries_total`.
/// A closed set, so every series exists (at 0) before the first failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The connection could not be made (refused, unreachable, TLS).
    Connect,
    /// No response headers, or no stream event, in time.
    Timeout,
    /// The connection broke or the answer was not HTTP.
    Protocol,
    /// A retryable 5xx answer.
    Status5xx,
    /// A 429 answer.
    Status429,
    /// A kept-alive connection closed unanswered: retried, but never held
    /// against the backend, so a retry reason and not an error kind.
    IdleClosed,
}

impl FailureKind {
    /// The `kind` values of `weir_upstream_errors_total`, in index order.
    const ERRORS: [Self; 5] = [
        Self::Connect,
        Self::Timeout,
        Self::Protocol,
        Self::Status5xx,
        Self::Status429,
    ];

    /// The `reason` values of `weir_retries_total`, in index order.
    const ALL: [Self; 6] = [
        Self::Connect,
        Self::Timeout,
        Self::Protocol,
        Self::Status5xx,
        Self::Status429,
        Self::IdleClosed,
    ];

    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Protocol => "protocol",
            Self::Status5xx => "status_5xx",
            Self::Status429 => "status_429",
            Self::IdleClosed => "idle_closed",
        }
    }
}

/// `weir_retries_total{model,reason}` handles of one model, one per
/// [`FailureKind`] (index = discriminant), resolved with the model so a
/// retry formats no label and every reason reads 0 until it happens.
#[derive(Debug, Clone, Default)]
pub(crate) struct RetryCounters([Counter; FailureKind::ALL.len()]);

impl RetryCounters {
    /// Counts one retry after a failure of this kind.
    pub(crate) fn inc(&self, reason: FailureKind) {
        if let Some(c) = self.0.get(reason as usize) {
            c.inc();
        }
    }
}

/// `weir_upstream_errors_total{backend,kind}` handles of one backend, one
/// per kind of [`FailureKind::ERRORS`] (index = discriminant), resolved
/// with the backend so a failure formats no label and every kind reads 0
/// until it happens.
#[derive(Debug, Clone, Default)]
pub(crate) struct UpstreamErrorCounters([Counter; FailureKind::ERRORS.len()]);

impl UpstreamErrorCounters {
    /// Counts one failed attempt. `IdleClosed` is not an upstream error
    /// (not held against the backend) and has no slot: it counts nowhere.
    pub(crate) fn inc(&self, kind: FailureKind) {
        if let Some(c) = self.0.get(kind as usize) {
            c.inc();
        }
    }
}

/// Labels of `weir_upstream_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    /// The backend's name.
    backend: String,
    /// One of [`FailureKind::ERRORS`].
    kind: &'static str,
}

/// A `{model}` label set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ModelLabel {
    /// The client's model name.
    pub model: String,
}

/// Labels of `weir_rate_limited_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LimitLabels {
    /// The client's model name.
    pub model: String,
    /// `requests`, `tokens`, `max_concurrent`, `max_queue`.
    pub limit: &'static str,
}

/// Labels of `weir_tokens_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TokenLabels {
    /// The client's model name.
    pub model: String,
    /// `prompt` or `completion`.
    pub kind: &'static str,
}

/// Labels of `weir_backend_up`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TierLabels {
    /// The backend's name.
    pub backend: String,
    /// `liveness`, `readiness`, `deep`.
    pub tier: &'static str,
}

/// Labels of `weir_backend_effective_weight`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WeightLabels {
    /// The backend's name.
    pub backend: String,
    /// The client's model name.
    pub model: String,
}

/// Labels of `weir_retries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    /// The client's model name.
    model: String,
    /// Why the attempt before it failed: one of [`FailureKind::ALL`].
    reason: &'static str,
}

/// Labels of `weir_config_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReloadLabels {
    /// `ok` or `error`.
    pub result: &'static str,
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
    requests: std::sync::Arc<Requests>,
    /// `weir_requests_total{model="",backend=""}`: requests naming a model
    /// no route serves (the client's string never becomes a label).
    pub unknown_model_requests: std::sync::Arc<RequestCounters>,
    /// `weir_upstream_errors_total{backend,kind}`.
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    rate_limited: Family<LimitLabels, LaneCounter>,
    queue_depth: Family<ModelLabel, LaneGauge>,
    in_flight: Family<ModelLabel, LaneGauge>,
    admitted: Family<ModelLabel, LaneCounter>,
    tokens: Family<TokenLabels, LaneCounter>,
    backend_up: Family<TierLabels, Gauge>,
    /// Fractional (0.5 for a degraded weight-1 backend), so an `f64` gauge.
    effective_weight: Family<WeightLabels, Gauge<f64, AtomicU64>>,
    /// The `weir_backend_effective_weight` label sets published so far.
    weight_labels: std::sync::Mutex<Vec<WeightLabels>>,
    /// `weir_retries_total{model,reason}`.
    retries: Family<RetryLabels, Counter>,
    /// `weir_config_reloads_total{result}`: every reload's outcome.
    config_reloads: Family<ReloadLabels, Counter>,
    duration: Family<ModelLabel, LatencyHistogram, fn() -> LatencyHistogram>,
    ttfb: Family<ModelLabel, LatencyHistogram, fn() -> LatencyHistogram>,
    /// `weir_cluster_up`: set by the cluster task (`0` without `[cluster]`).
    pub cluster_up: Gauge,
    /// `weir_cluster_replicas`: set by the cluster task (`1` without
    /// `[cluster]`: this replica alone).
    pub cluster_replicas: Gauge,
    /// `weir_buffered_body_bytes` (beyond SPEC): set from the body budget
    /// when `/metrics` is read, so the request path never touches it.
    pub buffered_body_bytes: Gauge,
}

/// Histogram buckets fit for LLM latencies: 5 ms to 120 s.
const LATENCY_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// `weir_request_duration_seconds` and `weir_time_to_first_byte_seconds`:
/// one observation each per request.
pub(crate) type LatencyHistogram = LaneHistogram<{ LATENCY_BUCKETS.len() }>;

fn latency_histogram() -> LatencyHistogram {
    LaneHistogram::new(&LATENCY_BUCKETS)
}

/// The `kind` values of `weir_tokens_total`, in [`TokenCounters`] order.
const TOKEN_KINDS: [&str; 2] = ["prompt", "completion"];

/// `weir_tokens_total{model,kind}` handles of one model.
#[derive(Debug, Clone, Default)]
pub(crate) struct TokenCounters {
    /// `kind="prompt"`.
    pub prompt: LaneCounter,
    /// `kind="completion"`.
    pub completion: LaneCounter,
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
        let requests = std::sync::Arc::new(Requests::default());
        registry.register(
            "weir_requests",
            "Requests answered, by model, backend and status",
            requests.family.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "weir_upstream_errors",
            "Failed upstream attempts, by backend and kind",
            upstream_errors.clone(),
        );
        let rate_limited = Family::<LimitLabels, LaneCounter>::default();
        registry.register(
            "weir_rate_limited",
            "Requests refused by a limit, by model and limit",
            rate_limited.clone(),
        );
        let queue_depth = Family::<ModelLabel, LaneGauge>::default();
        registry.register(
            "weir_queue_depth",
            "Requests waiting for admission",
            queue_depth.clone(),
        );
        let in_flight = Family::<ModelLabel, LaneGauge>::default();
        registry.register(
            "weir_in_flight",
            "Admitted requests not yet finished",
            in_flight.clone(),
        );
        let admitted = Family::<ModelLabel, LaneCounter>::default();
        registry.register(
            "weir_admitted",
            "Requests admitted by the limits",
            admitted.clone(),
        );
        let tokens = Family::<TokenLabels, LaneCounter>::default();
        registry.register(
            "weir_tokens",
            "Tokens used, as the responses reported them",
            tokens.clone(),
        );
        let backend_up = Family::<TierLabels, Gauge>::default();
        registry.register(
            "weir_backend_up",
            "1 while the backend passes the tier's probes",
            backend_up.clone(),
        );
        let effective_weight = Family::<WeightLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "weir_backend_effective_weight",
            "The weight smooth WRR uses now, per backend and model",
            effective_weight.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "weir_retries",
            "Attempts retried on another backend, by reason",
            retries.clone(),
        );
        let duration =
            Family::<ModelLabel, LatencyHistogram, fn() -> LatencyHistogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "weir_request_duration_seconds",
            "Whole request time, until the last body byte",
            duration.clone(),
        );
        let ttfb =
            Family::<ModelLabel, LatencyHistogram, fn() -> LatencyHistogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "weir_time_to_first_byte_seconds",
            "Time until the first response body byte (the first token of a stream)",
            ttfb.clone(),
        );
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        // Both series exist from the start, so `increase(...)` alerts see 0.
        for result in ["ok", "error"] {
            let _ = config_reloads.get_or_create(&ReloadLabels { result });
        }
        registry.register(
            "weir_config_reloads",
            "Config reloads, by result (ok or error)",
            config_reloads.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("weir_build_info", "weir's version", build);
        // Standalone until a `[cluster]` task says otherwise: limits are not
        // shared through Redis, and this is the only replica.
        let cluster_up = Gauge::<i64>::default();
        registry.register(
            "weir_cluster_up",
            "1 while rate limits are shared with other replicas through Redis",
            cluster_up.clone(),
        );
        let cluster_replicas = Gauge::<i64>::default();
        cluster_replicas.set(1);
        registry.register(
            "weir_cluster_replicas",
            "Replicas sharing the rate limits, this one included",
            cluster_replicas.clone(),
        );
        let buffered_body_bytes = Gauge::<i64>::default();
        registry.register(
            "weir_buffered_body_bytes",
            "Request-body bytes held in server.max_buffered_body_bytes (HTTP/1.1 bodies up to 64 KiB are not counted)",
            buffered_body_bytes.clone(),
        );
        Self {
            registry,
            unknown_model_requests: RequestCounters::new(&requests, "", ""),
            requests,
            upstream_errors,
            rate_limited,
            queue_depth,
            in_flight,
            admitted,
            tokens,
            backend_up,
            weight_labels: std::sync::Mutex::new(Vec::new()),
            effective_weight,
            retries,
            config_reloads,
            duration,
            ttfb,
            cluster_up,
            cluster_replicas,
            buffered_body_bytes,
        }
    }

    /// `weir_requests_total` handles for a model and a backend (`""` for
    /// answers no backend gave).
    pub(crate) fn request_counters(
        &self,
        model: &str,
        backend: &str,
    ) -> std::sync::Arc<RequestCounters> {
        RequestCounters::new(&self.requests, model, backend)
    }

    /// A model's latency histogram handles, resolved once per model.
    pub(crate) fn timings(&self, model: &str) -> crate::access_log::ModelTimings {
        let label = ModelLabel {
            model: model.to_owned(),
        };
        crate::access_log::ModelTimings {
            duration: self.duration.get_or_create_owned(&label),
            ttfb: self.ttfb.get_or_create_owned(&label),
        }
    }

    /// Counts one reload in `weir_config_reloads_total`; `result` is `ok`
    /// or `error`.
    pub(crate) fn count_reload(&self, result: &'static str) {
        self.config_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    /// `weir_retries_total` handles of one model: every reason's series
    /// exists from here on, at 0 until that retry happens.
    pub(crate) fn retries(&self, model: &str) -> RetryCounters {
        RetryCounters(FailureKind::ALL.map(|reason| {
            self.retries.get_or_create_owned(&RetryLabels {
                model: model.to_owned(),
                reason: reason.label(),
            })
        }))
    }

    /// `weir_upstream_errors_total` handles of one backend: every kind's
    /// series exists from here on, at 0 until that failure happens.
    pub(crate) fn upstream_errors(&self, backend: &str) -> UpstreamErrorCounters {
        UpstreamErrorCounters(FailureKind::ERRORS.map(|kind| {
            self.upstream_errors
                .get_or_create_owned(&UpstreamErrorLabels {
                    backend: backend.to_owned(),
                    kind: kind.label(),
                })
        }))
    }

    /// After a reload swapped `new` in for `old`: drops every series of a
    /// model or backend `old` has and `new` does not, and the
    /// `weir_requests_total` series of (model, backend) pairs `new` does
    /// not route. Requests still running there keep their handles, which
    /// count on unseen and never bring a series back; a model or backend
    /// restored later starts again from 0. (`weir_backend_up` goes with
    /// its probes, [`Metrics::forget_backend`]; the weights with
    /// [`Metrics::publish_weights`].)
    pub(crate) fn forget_removed(
        &self,
        old: &crate::snapshot::Snapshot,
        new: &crate::snapshot::Snapshot,
    ) {
        for model in &old.config.models {
            if new.model(&model.name).is_none() {
                self.forget_model(&model.name);
            }
        }
        for backend in old.backends() {
            let name = &backend.config.name;
            if !new.backends().iter().any(|b| b.config.name == *name) {
                for kind in FailureKind::ERRORS {
                    self.upstream_errors.remove(&UpstreamErrorLabels {
                        backend: name.clone(),
                        kind: kind.label(),
                    });
                }
            }
        }
        self.requests.retain(|model, backend| {
            new.model(model).is_some_and(|r| {
                backend.is_empty() || r.members.iter().any(|m| m.backend.config.name == backend)
            })
        });
    }

    /// Drops a removed model's series of every per-model family but
    /// `weir_requests_total` (by pair, in [`Metrics::forget_removed`]) and
    /// `weir_backend_effective_weight` ([`Metrics::publish_weights`]).
    fn forget_model(&self, model: &str) {
        let label = ModelLabel {
            model: model.to_owned(),
        };
        self.queue_depth.remove(&label);
        self.in_flight.remove(&label);
        self.admitted.remove(&label);
        self.duration.remove(&label);
        self.ttfb.remove(&label);
        for limit in LimitKind::ALL {
            self.rate_limited.remove(&LimitLabels {
                model: model.to_owned(),
                limit: limit.label(),
            });
        }
        for kind in TOKEN_KINDS {
            self.tokens.remove(&TokenLabels {
                model: model.to_owned(),
                kind,
            });
        }
        for reason in FailureKind::ALL {
            self.retries.remove(&RetryLabels {
                model: model.to_owned(),
                reason: reason.label(),
            });
        }
    }

    /// Removes a backend's `weir_backend_up` series (it left the config).
    pub(crate) fn forget_backend(&self, backend: &str) {
        for tier in ["liveness", "readiness", "deep"] {
            self.backend_up.remove(&TierLabels {
                backend: backend.to_owned(),
                tier,
            });
        }
    }

    /// The `weir_backend_up{backend,tier}` handle.
    pub(crate) fn backend_up(&self, backend: &str, tier: &'static str) -> Gauge {
        self.backend_up.get_or_create_owned(&TierLabels {
            backend: backend.to_owned(),
            tier,
        })
    }

    /// Sets `weir_backend_effective_weight` from a snapshot (on every
    /// rebuild, never per request).
    pub(crate) fn publish_weights(&self, snapshot: &crate::snapshot::Snapshot) {
        // Drop the series of backends and models a reload removed (a scrape
        // racing this sees the set being rebuilt, never a stale backend).
        let current = |l: &WeightLabels| {
            snapshot
                .model(&l.model)
                .is_some_and(|r| r.members.iter().any(|m| m.backend.config.name == l.backend))
        };
        let stale: Vec<WeightLabels> = self
            .weight_labels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| !current(l))
            .cloned()
            .collect();
        for l in &stale {
            self.effective_weight.remove(l);
        }
        let mut published = self.weight_labels.lock().unwrap_or_else(|e| e.into_inner());
        published.retain(|l| current(l));
        for model in &snapshot.config.models {
            let Some(route) = snapshot.model(&model.name) else {
                continue;
            };
            for member in &route.members {
                let labels = WeightLabels {
                    backend: member.backend.config.name.clone(),
                    model: model.name.clone(),
                };
                self.effective_weight
                    .get_or_create(&labels)
                    .set(member.effective_weight);
                if !published.contains(&labels) {
                    published.push(labels);
                }
            }
        }
    }

    /// The admission metric handles of one model, resolved once (when a
    /// snapshot first meets the model), never per request.
    pub(crate) fn model(&self, model: &str) -> ModelMetrics {
        let label = ModelLabel {
            model: model.to_owned(),
        };
        let limited = |limit: &'static str| {
            self.rate_limited.get_or_create_owned(&LimitLabels {
                model: model.to_owned(),
                limit,
            })
        };
        ModelMetrics {
            queue_depth: self.queue_depth.get_or_create_owned(&label),
            in_flight: self.in_flight.get_or_create_owned(&label),
            admitted: self.admitted.get_or_create_owned(&label),
            limited: LimitKind::ALL.map(|kind| limited(kind.label())),
        }
    }

    /// `weir_tokens_total` handles of one model.
    pub(crate) fn tokens(&self, model: &str) -> TokenCounters {
        let counter = |kind: &'static str| {
            self.tokens.get_or_create_owned(&TokenLabels {
                model: model.to_owned(),
                kind,
            })
        };
        let [prompt, completion] = TOKEN_KINDS.map(counter);
        TokenCounters { prompt, completion }
    }

    /// The exposition text in Prometheus text format 0.0.4, which SPEC
    /// promises and every Prometheus-compatible scraper and parser reads.
    pub(crate) fn render(&self) -> String {
        let mut openmetrics = String::with_capacity(4096);
        // Writing into a String cannot fail; an encoder error would mean a
        // bug in a label type, and an empty answer is then the honest one.
        if encode(&mut openmetrics, &self.registry).is_err() {
            return String::new();
        }
        prometheus_text(&openmetrics)
    }
}

/// The Content-Type of [`Metrics::render`]'s text.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text, the only format `prometheus-client` writes, as
/// Prometheus text 0.0.4. The samples are the same; only the metadata
/// differs: a counter family is named without `_total` in OpenMetrics but
/// with it in Prometheus text (else parsers see its samples as untyped),
/// and OpenMetrics' `# UNIT` and `# EOF` lines do not exist there.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 8 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(&name) && !name.ends_with("_total") {
                    out.push_str("_total");
                }
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counter metadata gains `_total` to match its samples, and nothing
    /// OpenMetrics-only is left; gauges and histograms are unchanged.
    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let om = "# HELP weir_requests Requests answered.\n\
                  # TYPE weir_requests counter\n\
                  weir_requests_total{model=\"m\"} 3\n\
                  # HELP weir_in_flight In flight.\n\
                  # TYPE weir_in_flight gauge\n\
                  weir_in_flight{model=\"m\"} 1\n\
                  # HELP weir_d_seconds D.\n\
                  # TYPE weir_d_seconds histogram\n\
                  # UNIT weir_d_seconds seconds\n\
                  weir_d_seconds_sum 0.5\n\
                  weir_d_seconds_count 1\n\
                  weir_d_seconds_bucket{le=\"+Inf\"} 1\n\
                  # EOF\n";
        assert_eq!(
            prometheus_text(om),
            "# HELP weir_requests_total Requests answered.\n\
             # TYPE weir_requests_total counter\n\
             weir_requests_total{model=\"m\"} 3\n\
             # HELP weir_in_flight In flight.\n\
             # TYPE weir_in_flight gauge\n\
             weir_in_flight{model=\"m\"} 1\n\
             # HELP weir_d_seconds D.\n\
             # TYPE weir_d_seconds histogram\n\
             weir_d_seconds_sum 0.5\n\
             weir_d_seconds_count 1\n\
             weir_d_seconds_bucket{le=\"+Inf\"} 1\n"
        );
    }

    /// Each kind's handle sits at its discriminant: the error kinds first,
    /// in both sets, and `idle_closed` only among the retry reasons.
    #[test]
    fn failure_kinds_index_their_handles() {
        for (i, kind) in FailureKind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, i);
        }
        assert_eq!(FailureKind::ERRORS[..], FailureKind::ALL[..5]);
        let metrics = Metrics::new();
        metrics.upstream_errors("b").inc(FailureKind::IdleClosed);
        metrics.upstream_errors("b").inc(FailureKind::Status429);
        metrics.retries("m").inc(FailureKind::IdleClosed);
        let text = metrics.render();
        assert!(text.contains("weir_upstream_errors_total{backend=\"b\",kind=\"status_429\"} 1\n"));
        assert!(text.contains("weir_retries_total{model=\"m\",reason=\"idle_closed\"} 1\n"));
        assert!(!text.contains("kind=\"idle_closed\""), "{text}");
    }

    /// Once a reload dropped a (model, backend) pair, a request still
    /// running there counts nowhere visible, whether its status's series
    /// was resolved before (200), is a common one not yet resolved (404)
    /// or an uncommon one (201): none comes back. The pair made routed
    /// again (a reload restored it) counts again, from 0.
    #[test]
    fn a_dropped_pair_never_comes_back() {
        let metrics = Metrics::new();
        let running = metrics.request_counters("m", "b");
        let kept = metrics.request_counters("k", "b");
        running.inc(200);
        running.inc(201);
        kept.inc(200);
        assert!(metrics.render().contains("model=\"m\""));
        metrics.requests.retain(|model, _| model == "k");
        assert!(!metrics.render().contains("model=\"m\""));
        for status in [200, 404, 201] {
            running.inc(status);
        }
        metrics.unknown_model_requests.inc(404);
        kept.inc(200);
        let text = metrics.render();
        assert!(!text.contains("model=\"m\""), "{text}");
        assert!(text.contains("weir_requests_total{model=\"\",backend=\"\",status=\"404\"} 1\n"));
        assert!(text.contains("weir_requests_total{model=\"k\",backend=\"b\",status=\"200\"} 2\n"));
        let restored = metrics.request_counters("m", "b");
        restored.inc(201);
        // The request from before the drop still counts nowhere visible,
        // though its pair is routed again (an uncommon status found by
        // name, a common one resolved now).
        running.inc(201);
        running.inc(404);
        let text = metrics.render();
        assert!(text.contains("weir_requests_total{model=\"m\",backend=\"b\",status=\"201\"} 1\n"));
        assert!(
            !text.contains("model=\"m\",backend=\"b\",status=\"404\""),
            "{text}"
        );
    }

    /// The registry as served parses as Prometheus text with every counter
    /// typed as one.
    #[test]
    fn rendered_counters_are_typed_counters() {
        let metrics = Metrics::new();
        metrics.request_counters("m", "b").inc(200);
        let text = metrics.render();
        assert!(!text.contains("# EOF"), "{text}");
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("parses as Prometheus text");
        let requests = scrape
            .samples
            .iter()
            .find(|s| s.metric == "weir_requests_total")
            .expect("weir_requests_total is exported");
        assert!(
            matches!(requests.value, prometheus_parse::Value::Counter(v) if v == 1.0),
            "{:?}",
            requests.value
        );
    }
}
