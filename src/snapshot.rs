//! The immutable routing state: models -> pools of backends with their
//! effective weights.
//!
//! A [`Snapshot`] is built from a validated [`Config`] (and, later, health
//! state) and published through one `ArcSwap`. Each request loads it once and
//! keeps it to the end, so a reload or a weight change never tears a request
//! in half, and the request path takes no lock to read routing state.
//!
//! Mutable per-backend counters (in-flight, the pooled client) live in
//! `Arc<BackendState>` that the snapshot points to; a rebuild carries them
//! over by identity (name + url), as pingora's `Backends::do_update` reuses
//! the health entry of every surviving backend.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use bytes::Bytes;
use http::HeaderValue;

use tokio::time::Instant;

use crate::{
    access_log::ModelTimings,
    admission::limiter::{GlobalLimits, ModelLimits, RetiredConcurrency},
    balancer::Pool,
    cluster::Cluster,
    config::{BackendConfig, Config, ModelConfig},
    headers,
    health::state::{median, scaled_weight, throughput_factor, unscaled_weight, HealthRecord},
    metrics::{Metrics, RequestCounters, RetryCounters, TokenCounters, UpstreamErrorCounters},
    slots::{BackendId, SlotSignal},
    upstream::{self, HttpClient, UpstreamError},
};

/// Routing state shared by every request that loaded it.
#[derive(Debug)]
pub struct Snapshot {
    /// The validated configuration this snapshot was built from.
    pub config: Arc<Config>,
    /// Client model name -> its route's index in `routes`. Hashed with
    /// foldhash, not SipHash: looked up on every request, and its keys come
    /// from the config file, so a client cannot choose colliding ones.
    models: HashMap<String, usize, foldhash::fast::RandomState>,
    /// Every model's route, in config order. A request's log line and
    /// response body name their route by its index ([`Place`]) and find it
    /// again through the snapshot they keep, instead of holding handles
    /// of their own (a reference count each, shared by every lane).
    routes: Vec<ModelRoute>,
    /// Every configured backend, in file order.
    backends: Vec<Arc<BackendState>>,
    /// The `[limits]` buckets; carried over reloads.
    pub(crate) global: Arc<GlobalLimits>,
    /// Wakes requests waiting for a saturated backend to free a slot.
    pub(crate) slots: Arc<SlotSignal>,
    /// The `GET /v1/models` body, rendered once per snapshot.
    models_list: Bytes,
    /// `[cluster]`: where shared limits come from; passed from snapshot to
    /// snapshot (it is fixed at start).
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// Models a reload removed while requests admitted there still hold
    /// concurrency permits, by name: a reload that restores one keeps
    /// counting them. Passed on until those requests have all finished.
    retired: HashMap<String, RetiredConcurrency>,
    /// Backends a reload removed (or gave a new identity), for
    /// `/admin/backends` to show until their requests have finished.
    /// Passed on while a request or an older snapshot still holds them.
    draining: Vec<Draining>,
}

/// A backend a reload removed, as `/admin/backends` lists it while it
/// drains: it is in no pool, but requests that began before still use it.
#[derive(Debug, Clone)]
pub(crate) struct Draining {
    /// Its name in the config it was removed from.
    pub name: String,
    /// Its URL there.
    pub url: http::Uri,
    /// Its live state; held by its requests' in-flight guards (and the
    /// snapshots they loaded), so it dies once they have all finished.
    live: std::sync::Weak<BackendLive>,
}

impl Draining {
    /// Requests still running on it; `None` once it has drained.
    pub(crate) fn in_flight(&self) -> Option<u32> {
        let live = self.live.upgrade()?;
        let n = live.in_flight.load(Ordering::Relaxed);
        (n > 0).then_some(n)
    }
}

/// One model's admission settings and its pool of backends.
#[derive(Debug)]
pub struct ModelRoute {
    /// The model's limits (declared, or `[defaults]` for undeclared ones).
    pub config: ModelConfig,
    /// Its buckets, semaphore and queue; carried over reloads by name.
    pub limits: Arc<ModelLimits>,
    /// `weir_tokens_total` handles.
    pub(crate) tokens: TokenCounters,
    /// Latency histogram handles.
    pub(crate) timings: ModelTimings,
    /// `weir_requests_total{model,backend=""}`: answers weir gave itself.
    pub(crate) own_answers: Arc<RequestCounters>,
    /// `weir_retries_total` handles.
    pub(crate) retries: RetryCounters,
    /// The backends that serve it, in the pool's order.
    pub members: Vec<Member>,
    /// Smooth-WRR selection over `members`' effective weights.
    pub pool: Pool,
}

impl ModelRoute {
    /// This route's member for the backend another snapshot's `backend`
    /// is (the same live state: same name and URL), if it has one.
    pub(crate) fn counterpart(&self, backend: &BackendState) -> Option<(usize, &Member)> {
        self.members
            .iter()
            .enumerate()
            .find(|(_, m)| Arc::ptr_eq(&m.backend.live, &backend.live))
    }
}

/// Where a request was routed in its snapshot: the model's route and,
/// once a backend's answer goes to the client, that backend's place in the
/// route's members. Indices into the snapshot the request loaded, which
/// alone can resolve them ([`Snapshot::route_at`], [`Snapshot::member_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Place {
    /// The route's index in the snapshot.
    pub route: usize,
    /// The answering member's index in the route's `members`.
    pub member: Option<usize>,
}

/// A backend's place in one model's pool.
#[derive(Debug)]
pub struct Member {
    /// The backend and its live counters.
    pub backend: Arc<BackendState>,
    /// The model name to send upstream when the backend renames it.
    pub upstream_model: Option<String>,
    /// Configured weight × health factor × slow-start ramp × throughput
    /// factor, computed when the snapshot was built; fractional (0.5 for a
    /// degraded weight-1 backend), to the thousandth the balancer uses.
    pub effective_weight: f64,
    /// `weir_requests_total{model,backend,*}` handles; carried over rebuilds.
    pub(crate) requests: Arc<RequestCounters>,
}

/// A backend as one snapshot sees it: its configuration (which a reload may
/// change) plus the live state that outlives snapshots.
pub struct BackendState {
    /// The backend as configured in this snapshot.
    pub config: BackendConfig,
    /// Pooled connections to it; carried over a reload that keeps its
    /// identity and `connect_timeout`.
    pub(crate) client: HttpClient,
    /// `Authorization` header value for its key, built once.
    pub(crate) authorization: Option<HeaderValue>,
    /// `x-weir-backend` value, built once.
    pub(crate) name_header: HeaderValue,
    /// Counters and health, shared by every snapshot that has this backend.
    pub(crate) live: Arc<BackendLive>,
    /// `weir_upstream_errors_total` handles (by name: carried over a
    /// rebuild, and over a reload that keeps the name).
    pub(crate) errors: UpstreamErrorCounters,
    /// [`BackendLive::generation`] when this state was built: what the
    /// requests sent with it were sent as.
    pub(crate) generation: u64,
}

/// What a backend carries from snapshot to snapshot (SPEC "Reload": health
/// state, outlier state, in-flight counts).
#[derive(Debug)]
pub(crate) struct BackendLive {
    /// Requests currently sent to it and not yet finished (body included).
    in_flight: AtomicU32,
    /// Told when a slot frees, for requests waiting on saturated backends.
    slots: Arc<SlotSignal>,
    /// Active and passive health; written by the checker and by outlier
    /// detection, read when a snapshot is built. A request reads it only
    /// off the fast path: a retry, and a first attempt that waits.
    pub health: Mutex<HealthRecord>,
    /// Passive: failed requests in a row (reset by any success). An atomic,
    /// so a successful request pays one load and no lock.
    pub consecutive_failures: AtomicU32,
    /// Latency EMA in microseconds (f64 bits), updated without a lock.
    pub latency_ema_us: AtomicU64,
    /// Readiness and deep probes limit their answer with
    /// `max_completion_tokens` instead of `max_tokens`: set once the backend
    /// refused `max_tokens` asking for it (OpenAI's reasoning models, Azure
    /// OpenAI). Probes only; client requests carry the client's own fields.
    pub(crate) probe_max_completion_tokens: AtomicBool,
    /// The backend's first model answers embeddings, not chat (an embedding
    /// model on OpenAI, vLLM `--task embed`, TEI): set by a readiness round
    /// that was refused chat and passed on an embedding, cleared by one
    /// that chat answered. While set, readiness sends the embedding first
    /// and the deep tier reads only engine metrics.
    pub(crate) probe_embeddings: AtomicBool,
    /// Streams to it go without the `stream_options` weir would add: set
    /// once the backend refused a request for it (a 400 or 422 naming
    /// `stream_options`, as some hosted APIs answer), which weir then sent
    /// again without it. Its streams are then charged their estimate.
    /// Cleared by a reload and when liveness brings the backend back (a
    /// restart may be an upgrade that takes the field).
    pub(crate) refuses_stream_options: AtomicBool,
    /// Bumped when a reload gives the backend a new key, or brings it back
    /// afresh while it drains: a 429 drawn by a request sent before (an
    /// older [`BackendState::generation`]) was the old quota's, and opens
    /// no window now.
    pub(crate) generation: AtomicU64,
}

impl BackendLive {
    /// Fresh state for a backend; `pending` keeps it out of rotation until
    /// its first passing liveness probe (backends added by a reload).
    pub(crate) fn new(slots: Arc<SlotSignal>, pending: bool) -> Self {
        let mut health = HealthRecord::default();
        health.pending = pending;
        Self {
            in_flight: AtomicU32::new(0),
            slots,
            health: Mutex::new(health),
            consecutive_failures: AtomicU32::new(0),
            latency_ema_us: AtomicU64::new(f64::NAN.to_bits()),
            probe_max_completion_tokens: AtomicBool::new(false),
            probe_embeddings: AtomicBool::new(false),
            refuses_stream_options: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        }
    }

    /// A removed backend added back while it drains: everything but its
    /// in-flight count starts as [`BackendLive::new`]'s would.
    fn start_afresh(&self, pending: bool) {
        self.with_health(|health| {
            *health = HealthRecord::default();
            health.pending = pending;
            // Under the health lock, as `report` reads it.
            self.generation.fetch_add(1, Ordering::AcqRel);
        });
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.latency_ema_us
            .store(f64::NAN.to_bits(), Ordering::Relaxed);
        self.probe_max_completion_tokens
            .store(false, Ordering::Relaxed);
        self.probe_embeddings.store(false, Ordering::Relaxed);
        self.refuses_stream_options.store(false, Ordering::Relaxed);
    }

    /// A reload gave the backend a new key, a new quota: the old key's 429
    /// windows and probe pauses go, and 429s that requests sent with it
    /// draw from now on open none (the generation, bumped under the same
    /// lock that `report` reads it under).
    fn rekeyed(&self) {
        self.with_health(|health| {
            health.forget_rate_limits();
            self.generation.fetch_add(1, Ordering::AcqRel);
        });
    }

    /// A copy of the health record (the lock is held for the copy only).
    pub(crate) fn health(&self) -> HealthRecord {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs `f` on the health record under its lock (never across an await).
    pub(crate) fn with_health<R>(&self, f: impl FnOnce(&mut HealthRecord) -> R) -> R {
        f(&mut self.health.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Until when passive outlier state holds the backend out of rotation
    /// (the later of an ejection's end and a 429's `Retry-After`), or
    /// `None` if it does not at `now`. Read by a request that retries, or
    /// whose first attempt waits for a slot: its snapshot's weights
    /// predate what its own failures, or the wait, brought.
    pub(crate) fn held_out_until(&self, now: Instant) -> Option<HeldOut> {
        self.with_health(|h| {
            let ejected = h.ejected_until.filter(|t| *t > now);
            let asked = h.rate_limited_until.filter(|t| *t > now);
            match (ejected, asked) {
                (None, None) => None,
                (Some(until), None) => Some(HeldOut {
                    until,
                    asked: false,
                }),
                (None, Some(until)) => Some(HeldOut { until, asked: true }),
                (Some(e), Some(a)) => Some(HeldOut {
                    until: e.max(a),
                    asked: a >= e,
                }),
            }
        })
    }

    /// The latency EMA in milliseconds, if any request was measured.
    pub(crate) fn latency_ema_ms(&self) -> Option<f64> {
        let us = f64::from_bits(self.latency_ema_us.load(Ordering::Relaxed));
        us.is_finite().then_some(us / 1000.0)
    }

    /// Folds one request's time to headers into the EMA.
    pub(crate) fn observe_latency(&self, latency: std::time::Duration) {
        const ALPHA: f64 = 0.2;
        let sample = latency.as_secs_f64() * 1e6;
        let _ = self
            .latency_ema_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let ema = f64::from_bits(bits);
                let next = if ema.is_finite() {
                    ema + ALPHA * (sample - ema)
                } else {
                    sample
                };
                Some(next.to_bits())
            });
    }
}

/// A backend out of rotation for a while: a retry waits out a pause the
/// backend asked for (its 429's `Retry-After`), but not an ejection longer
/// than `retry.max_delay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeldOut {
    /// When it is back.
    pub until: Instant,
    /// Whether the backend's own `Retry-After` ends last (not an ejection).
    pub asked: bool,
}

impl std::fmt::Debug for BackendState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendState")
            .field("name", &self.config.name)
            .field("url", &self.config.url)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl BackendState {
    /// Whether what was sent with this state (a request, a probe) went with
    /// the key in use: a reload that gives the backend a new key bumps the
    /// live generation under the health lock, so read it under that lock
    /// to act on the answer.
    pub(crate) fn sent_with_current_key(&self) -> bool {
        self.generation == self.live.generation.load(Ordering::Acquire)
    }

    /// Its metric handles are detached until [`Snapshot::build_with`]
    /// resolves them (once no backend of the snapshot can fail to build).
    fn new(
        config: BackendConfig,
        live: Arc<BackendLive>,
        previous: Option<&BackendState>,
    ) -> Result<Self, UpstreamError> {
        let client = match previous {
            Some(old)
                if old.config.connect_timeout == config.connect_timeout
                    && old.client.reusable() =>
            {
                old.client.clone()
            }
            _ => upstream::client(&config.url, config.connect_timeout)?,
        };
        let authorization = config
            .api_key
            .as_ref()
            .and_then(|k| headers::bearer(k.expose()));
        let name_header = HeaderValue::try_from(config.name.as_str())
            .unwrap_or(HeaderValue::from_static("invalid-name"));
        let generation = live.generation.load(Ordering::Acquire);
        Ok(Self {
            config,
            client,
            authorization,
            name_header,
            live,
            errors: UpstreamErrorCounters::default(),
            generation,
        })
    }

    /// Requests in flight to this backend right now.
    pub fn in_flight(&self) -> u32 {
        // SeqCst: a waiting pick's look must see a slot given back before
        // its release read the waiter count (see `InFlight`'s drop).
        self.live.in_flight.load(Ordering::SeqCst)
    }

    /// Whether the backend is at its `max_concurrent`.
    pub fn is_saturated(&self) -> bool {
        self.config
            .max_concurrent
            .is_some_and(|max| self.in_flight() >= max.get())
    }

    /// Takes an in-flight slot unless the backend is at `max_concurrent`.
    /// The slot is given back when the returned guard drops (response body
    /// finished, client gone, or attempt failed).
    pub(crate) fn try_begin(&self) -> Option<InFlight> {
        let max = self.config.max_concurrent.map_or(u32::MAX, |m| m.get());
        self.live
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(InFlight {
            live: self.live.clone(),
            _serving: crate::busy_poll::Serving::exchange(),
        })
    }

    /// Its place in the line for slots ([`crate::slots`]): the same
    /// across reloads that carry the backend over.
    pub(crate) fn slot_id(&self) -> BackendId {
        live_id(&self.live)
    }

    /// The identity a reload matches on: same name and same URL.
    fn same_identity(&self, other: &BackendConfig) -> bool {
        self.config.name == other.name && self.config.url == other.url
    }
}

/// A backend's id in the line for slots: the address of its live state.
fn live_id(live: &Arc<BackendLive>) -> BackendId {
    Arc::as_ptr(live) as BackendId
}

/// One request in flight to a backend; dropping it gives the slot back.
#[derive(Debug)]
pub(crate) struct InFlight {
    live: Arc<BackendLive>,
    /// Counted on the lane for the busy poller while the exchange lasts.
    _serving: crate::busy_poll::Serving,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // SeqCst on both, paired with the waiter count's increment: either
        // this load sees a waiter that counted itself, or that waiter's
        // next look sees the slot given back here.
        self.live.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.live.slots.released(live_id(&self.live));
    }
}

impl Snapshot {
    /// Builds a snapshot from a validated config. Backends of `previous`
    /// whose name and url are unchanged are carried over with their live
    /// state (in-flight counts, pooled connections).
    pub(crate) fn build(
        config: Arc<Config>,
        previous: Option<&Snapshot>,
        metrics: &Metrics,
    ) -> Result<Self, UpstreamError> {
        Self::build_adding(config, previous, metrics, &[])
    }

    /// As [`Snapshot::build`], taking backends that `previous` does not have
    /// from `added` (made by [`Snapshot::added_backends`] and probed by the
    /// reload) with their live state and connections.
    pub(crate) fn build_adding(
        config: Arc<Config>,
        previous: Option<&Snapshot>,
        metrics: &Metrics,
        added: &[Arc<BackendState>],
    ) -> Result<Self, UpstreamError> {
        let cluster = previous.and_then(|p| p.cluster.clone());
        Self::build_with(config, previous, added, metrics, cluster)
    }

    /// The backends of `config` that `self` does not have (by name + url),
    /// ready to serve but in no snapshot yet. With active checks on they are
    /// pending: a reload probes their liveness before it publishes the
    /// snapshot that adds them, so one that passes enters rotation in the
    /// same swap that removes the backend it replaces (SPEC "Start-up":
    /// a new backend enters rotation only after its first passing probe).
    pub(crate) fn added_backends(
        &self,
        config: &Config,
    ) -> Result<Vec<Arc<BackendState>>, UpstreamError> {
        config
            .backends
            .iter()
            .filter(|b| !self.backends.iter().any(|old| old.same_identity(b)))
            .map(|b| {
                // Removed by an earlier reload but still draining: the same
                // backend comes back with its in-flight count, so the
                // requests still running on it count towards its
                // `max_concurrent` (and it is not listed as draining beside
                // itself). Its health starts afresh, as any added backend's:
                // pending its first liveness probe, and none of the 429
                // windows or ejections it drew before (its key may be new).
                let pending = config.health.enabled;
                let live = self
                    .draining
                    .iter()
                    .filter(|d| d.name == b.name && d.url == b.url)
                    .find_map(|d| d.live.upgrade())
                    .inspect(|live| live.start_afresh(pending))
                    .unwrap_or_else(|| Arc::new(BackendLive::new(self.slots.clone(), pending)));
                BackendState::new(b.clone(), live, None).map(Arc::new)
            })
            .collect()
    }

    /// The first snapshot of a gateway, with its `[cluster]` handle (later
    /// builds take it from the snapshot they follow).
    pub(crate) fn build_first(
        config: Arc<Config>,
        metrics: &Metrics,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Self, UpstreamError> {
        Self::build_with(config, None, &[], metrics, cluster)
    }

    fn build_with(
        config: Arc<Config>,
        previous: Option<&Snapshot>,
        added: &[Arc<BackendState>],
        metrics: &Metrics,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Self, UpstreamError> {
        let now = tokio::time::Instant::now();
        let slots: Arc<SlotSignal> = previous.map_or_else(Arc::default, |p| p.slots.clone());
        let mut backends = Vec::with_capacity(config.backends.len());
        let mut rekeyed = Vec::new();
        for backend in &config.backends {
            let carried = previous
                .map_or(&[][..], |p| &p.backends[..])
                .iter()
                .chain(added)
                .find(|b| b.same_identity(backend));
            // Same identity (name + url): keep its live state (health,
            // in-flight, outlier) and, when the connect timeout and (https)
            // the trusted CAs are the same, its pooled connections; a backend the reload added and probed
            // comes from `added`. Any other new backend starts pending (out
            // of rotation until its first passing liveness probe) when there
            // is a previous snapshot and active checks are on.
            let live = match carried {
                Some(old) => {
                    // A new key is a new quota: the old key's 429s say
                    // nothing of it (forgotten once the build cannot fail).
                    if old.config.api_key != backend.api_key {
                        rekeyed.push(old.live.clone());
                    }
                    old.live.clone()
                }
                None => Arc::new(BackendLive::new(
                    slots.clone(),
                    previous.is_some() && config.health.enabled,
                )),
            };
            backends.push(BackendState::new(
                backend.clone(),
                live,
                carried.map(|b| &**b),
            )?);
        }
        // Every backend built, so nothing below fails: only now are new
        // keys' backends told (a build that failed after would leave the
        // snapshot still serving ignoring its backends' 429s), the limits
        // built (a limit a reload removed is lifted for good) and series
        // created (by name, so a new URL keeps counting in the same ones).
        for live in &rekeyed {
            live.rekeyed();
        }
        let global = Arc::new(GlobalLimits::with_cluster(
            &config.limits,
            previous.map(|p| &*p.global),
            now,
            cluster.as_deref(),
        ));
        let backends: Vec<Arc<BackendState>> = backends
            .into_iter()
            .map(|mut state| {
                // After `rekeyed`: what requests on this snapshot are sent as.
                state.generation = state.live.generation.load(Ordering::Acquire);
                state.errors = previous
                    .and_then(|p| {
                        p.backends
                            .iter()
                            .find(|b| b.config.name == state.config.name)
                    })
                    .map_or_else(
                        || metrics.upstream_errors(&state.config.name),
                        |b| b.errors.clone(),
                    );
                Arc::new(state)
            })
            .collect();
        let mut models = HashMap::with_capacity_and_hasher(config.models.len(), Default::default());
        let mut routes = Vec::with_capacity(config.models.len());
        for model in &config.models {
            let serving: Vec<(&Arc<BackendState>, HealthRecord)> = backends
                .iter()
                .filter(|b| b.config.models.contains(&model.name))
                .map(|b| {
                    let health = b.live.health();
                    // With active checks off, a stale probe verdict (from
                    // before a reload switched them off) must not keep a
                    // backend out.
                    let health = if config.health.enabled {
                        health
                    } else {
                        health.passive_only()
                    };
                    (b, health)
                })
                .collect();
            // The deep tier's throughput factor compares each backend with
            // the median of this model's pool, among the figures measured
            // on this model (a backend is sampled on its first model only;
            // one measured on another model keeps factor 1 here).
            let pool_median = median(
                serving
                    .iter()
                    .filter_map(|(_, h)| h.tokens_per_sec_on(&model.name))
                    .collect(),
            );
            let old = previous.and_then(|p| p.model(&model.name));
            let (members, weights): (Vec<Member>, Vec<u64>) = serving
                .iter()
                .map(|(b, h)| {
                    let factor = h.factor(now, config.health.slow_start)
                        * throughput_factor(h.tokens_per_sec_on(&model.name), pool_median);
                    let requests = old
                        .and_then(|o| {
                            o.members
                                .iter()
                                .find(|m| m.backend.config.name == b.config.name)
                        })
                        .map_or_else(
                            || metrics.request_counters(&model.name, &b.config.name),
                            |m| m.requests.clone(),
                        );
                    let weight = scaled_weight(b.config.weight, factor);
                    let member = Member {
                        backend: (*b).clone(),
                        upstream_model: b.config.rename.get(&model.name).cloned(),
                        effective_weight: unscaled_weight(weight),
                        requests,
                    };
                    (member, weight)
                })
                .unzip();
            // Same peers (by identity, in order) and weights as the old
            // pool: continue its sequence rather than restart it.
            let same_peers = old.is_some_and(|o| {
                o.members.len() == members.len()
                    && o.members
                        .iter()
                        .zip(&members)
                        .all(|(a, b)| Arc::ptr_eq(&a.backend.live, &b.backend.live))
            });
            let pool = match old {
                Some(o) if same_peers => Pool::following(weights, &o.pool),
                _ => Pool::new(weights),
            };
            let limits = match old {
                Some(old) if old.config == *model => old.limits.clone(),
                _ => Arc::new(ModelLimits::with_cluster(
                    model,
                    (
                        old.map(|o| &o.limits),
                        previous.and_then(|p| p.retired.get(&model.name)),
                    ),
                    metrics.model(&model.name),
                    now,
                    cluster.as_deref(),
                )),
            };
            let tokens = old.map_or_else(|| metrics.tokens(&model.name), |o| o.tokens.clone());
            let timings = old.map_or_else(|| metrics.timings(&model.name), |o| o.timings.clone());
            let own_answers = old.map_or_else(
                || metrics.request_counters(&model.name, ""),
                |o| o.own_answers.clone(),
            );
            let retries = old.map_or_else(|| metrics.retries(&model.name), |o| o.retries.clone());
            models.insert(model.name.clone(), routes.len());
            routes.push(ModelRoute {
                config: model.clone(),
                members,
                pool,
                limits,
                tokens,
                timings,
                own_answers,
                retries,
            });
        }
        let models_list = render_models_list(&config);
        let retired = previous.map(|p| p.retire(&config)).unwrap_or_default();
        let draining = previous.map(|p| p.draining(&backends)).unwrap_or_default();
        Ok(Self {
            config,
            models,
            routes,
            backends,
            global,
            slots,
            models_list,
            cluster,
            retired,
            draining,
        })
    }

    /// The backends of `self` that `next` does not keep (by their live
    /// state, so a new URL counts as removed) and those already draining,
    /// while anything still holds them.
    fn draining(&self, next: &[Arc<BackendState>]) -> Vec<Draining> {
        let dropped = self
            .backends
            .iter()
            .filter(|b| !next.iter().any(|n| Arc::ptr_eq(&n.live, &b.live)))
            .map(|b| Draining {
                name: b.config.name.clone(),
                url: b.config.url.clone(),
                live: Arc::downgrade(&b.live),
            });
        self.draining
            .iter()
            .cloned()
            .chain(dropped)
            .filter(|d| d.live.strong_count() > 0)
            // One a reload restored is serving again, not draining.
            .filter(|d| {
                !next
                    .iter()
                    .any(|n| std::ptr::eq(d.live.as_ptr(), Arc::as_ptr(&n.live)))
            })
            .collect()
    }

    /// Backends a reload removed that still have requests running.
    pub(crate) fn draining_backends(&self) -> impl Iterator<Item = (&Draining, u32)> {
        self.draining
            .iter()
            .filter_map(|d| Some((d, d.in_flight()?)))
    }

    /// The models of `self` that `next` does not have, and still in use:
    /// those it retired before and those it drops now.
    fn retire(&self, next: &Config) -> HashMap<String, RetiredConcurrency> {
        let dropped = self
            .models
            .iter()
            .filter_map(|(name, &i)| Some((name.clone(), self.routes.get(i)?.limits.retire()?)));
        self.retired
            .iter()
            .map(|(name, r)| (name.clone(), r.clone()))
            .chain(dropped)
            .filter(|(name, r)| next.model(name).is_none() && r.in_use())
            .collect()
    }

    /// The route for a client's model name.
    pub fn model(&self, name: &str) -> Option<&ModelRoute> {
        self.route(name).map(|(_, route)| route)
    }

    /// The route for a client's model name, with its [`Place`] (no member
    /// yet).
    pub(crate) fn route(&self, name: &str) -> Option<(Place, &ModelRoute)> {
        let &i = self.models.get(name)?;
        let place = Place {
            route: i,
            member: None,
        };
        Some((place, self.routes.get(i)?))
    }

    /// The route `place` names in this snapshot.
    pub(crate) fn route_at(&self, place: Place) -> Option<&ModelRoute> {
        self.routes.get(place.route)
    }

    /// The member `place` names in this snapshot, if it names one.
    pub(crate) fn member_at(&self, place: Place) -> Option<&Member> {
        self.route_at(place)?.members.get(place.member?)
    }

    /// Every backend, in configuration order.
    pub fn backends(&self) -> &[Arc<BackendState>] {
        &self.backends
    }

    /// The `GET /v1/models` response body.
    pub fn models_list(&self) -> Bytes {
        self.models_list.clone()
    }

    /// Configured models that have no backend in rotation (for `/readyz`).
    pub fn models_without_backend(&self) -> Vec<&str> {
        self.config
            .models
            .iter()
            .filter(|m| {
                self.model(&m.name)
                    .is_none_or(|r| !r.pool.has_peer_in_rotation())
            })
            .map(|m| m.name.as_str())
            .collect()
    }
}

/// OpenAI's list shape: `{"object":"list","data":[{"id","object":"model","created","owned_by"}]}`.
fn render_models_list(config: &Config) -> Bytes {
    let data: Vec<serde_json::Value> = config
        .models
        .iter()
        .map(|m| model_object(&m.name))
        .collect();
    let list = serde_json::json!({ "object": "list", "data": data });
    Bytes::from(list.to_string())
}

/// One model in OpenAI's shape (`GET /v1/models/{id}` answers with this).
pub(crate) fn model_object(name: &str) -> serde_json::Value {
    serde_json::json!({ "id": name, "object": "model", "created": 0, "owned_by": "weir" })
}
