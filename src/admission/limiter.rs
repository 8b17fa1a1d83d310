//! The admission path: reserve from every bucket that applies, wait out the
//! debt, then take a concurrency permit — all before `queue_timeout`.
//!
//! SPEC "Admission": a request reserves one request token and its estimated
//! tokens from the global and the model bucket, then a concurrency permit.
//! If the buckets cannot cover it before `queue_timeout` it is refused at
//! once with the exact `Retry-After`, never after a pointless wait. Waiting
//! requests are served first come, first served: bucket reservations queue by
//! construction (each later one waits longer), a refund moves the waiters of
//! a local bucket forward rather than letting a later request pass them
//! (`bucket`, "Refunds and waiters"; [`wait_turn`] follows the moves), and
//! tokio's semaphore is fair.
//!
//! Everything a request holds is a guard: a reservation refunds on drop
//! until admission settles it, a queue slot and a permit give themselves
//! back, so a client that disconnects while waiting returns everything.

use std::{
    future::Future,
    num::{NonZeroU32, NonZeroU64},
    pin::pin,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Weak,
    },
    task::Poll,
    time::Duration,
};

use tokio::{
    sync::{Semaphore, TryAcquireError},
    time::Instant,
};

use super::{
    bucket::{Bucket, Report, ReserveError, Tick, Ticket},
    limit::{Limit, Reading},
};
use crate::{
    cluster::Cluster,
    config::{GlobalLimits as GlobalLimitsConfig, ModelConfig},
    metrics::{LaneCounter, LaneGauge},
};

/// Which limit refused or bound a request; the `limit` label of
/// `weir_rate_limited_total` and the 429 `type` (SPEC "Which 429").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// A requests-per-minute bucket.
    Requests,
    /// A tokens-per-minute bucket.
    Tokens,
    /// The model's `max_concurrent` semaphore (or every backend saturated).
    Concurrency,
    /// The model's `max_queue`.
    Queue,
}

impl LimitKind {
    /// Every kind, in the order of [`ModelMetrics::limited`].
    pub const ALL: [Self; 4] = [
        LimitKind::Requests,
        LimitKind::Tokens,
        LimitKind::Concurrency,
        LimitKind::Queue,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
            LimitKind::Concurrency => "max_concurrent",
            LimitKind::Queue => "max_queue",
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq)]
pub enum AdmitError {
    /// More tokens than a bucket can ever hold: it could never pass (413).
    TooLarge {
        /// The model.
        model: String,
        /// The request's estimate.
        estimate: u64,
        /// The bucket's capacity.
        capacity: u64,
        /// The bucket is the global one (`[limits]`), not the model's.
        global: bool,
    },
    /// A bucket would not cover the request before `queue_timeout` (429).
    RateLimited {
        /// The model.
        model: String,
        /// Requests or tokens.
        kind: LimitKind,
        /// The bucket is the global one (`[limits]`), not the model's.
        global: bool,
        /// The bucket's rate per minute.
        limit: u64,
        /// Exactly how long until the request would pass.
        wait: Duration,
        /// The rate-limit headers to send with the 429.
        headers: RateHeaders,
    },
    /// Too many requests already waiting, or the concurrency wait passed
    /// `queue_timeout` (429 type `requests`).
    Saturated {
        /// The model.
        model: String,
        /// `Concurrency` or `Queue`.
        kind: LimitKind,
        /// The configured `max_concurrent` / `max_queue`.
        limit: u64,
        /// A queue refusal of a request that would have waited for a
        /// bucket: how long until the buckets would cover it, and their
        /// headers, so `Retry-After` says when it would pass (1 s
        /// otherwise: a slot's or a queue place's freeing is not known).
        bucket_wait: Option<(Duration, RateHeaders)>,
    },
}

/// `x-ratelimit-*` values computed at admission (OpenAI's headers): per
/// kind, the bucket with fewer left of the global and the model's (the
/// model's on a tie); on a 429, the refused kind's from the bucket that
/// refused.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateHeaders {
    /// `limit`, `remaining`, `reset` for requests, when a request limit applies.
    pub requests: Option<RateState>,
    /// The same for tokens.
    pub tokens: Option<RateState>,
}

/// One bucket's state as the headers report it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateState {
    /// The bucket's capacity: the most it permits before it is exhausted
    /// (OpenAI's meaning), which `remaining` never exceeds; the rate per
    /// minute unless a `burst` sets another capacity.
    pub limit: u64,
    /// Whole tokens left in the bucket.
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset: Duration,
}

/// The global buckets (`[limits]`), shared by every model.
#[derive(Debug, Default)]
pub struct GlobalLimits {
    requests: Option<Limit>,
    tokens: Option<Limit>,
}

/// One model's buckets, semaphore, queue and counters; carried over reloads
/// by model name so bucket levels survive.
#[derive(Debug)]
pub struct ModelLimits {
    requests: Option<Limit>,
    tokens: Option<Limit>,
    concurrency: Option<Concurrency>,
    max_queue: u32,
    queue_timeout: Duration,
    /// Requests currently waiting for a bucket, a permit or a backend;
    /// shared with the limits a reload replaces, like the semaphore, so
    /// the requests still waiting there count against `max_queue` here.
    waiting: Arc<AtomicU32>,
    metrics: ModelMetrics,
}

/// A model's concurrency semaphore and how many permits it stands for.
///
/// Kept when a reload removes `max_concurrent`: it then stands for
/// [`UNLIMITED_PERMITS`], so no request waits, yet every request admitted
/// meanwhile holds a permit; a later reload that restores a limit shrinks
/// the same semaphore and so counts every request still running (a fresh
/// one would let `max_concurrent` more in beside them). A model that never
/// had a limit has none, and its requests take no permit.
#[derive(Debug, Clone)]
struct Concurrency {
    semaphore: Arc<Gate>,
    /// `max_concurrent`, or [`UNLIMITED_PERMITS`] once a reload removed it.
    total: u32,
}

/// A model's semaphore, and the permits a reload that lowered
/// `max_concurrent` still has to take away. Those are taken as requests
/// end, before any waiter gets them: requests queued before the reload
/// are admitted under the new limit, not the old one, and a reload that
/// raises the limit again first cancels what is still owed.
#[derive(Debug)]
struct Gate {
    semaphore: Semaphore,
    owed: AtomicU32,
}

impl Gate {
    fn new(permits: u32) -> Self {
        Self {
            semaphore: Semaphore::new(permits as usize),
            owed: AtomicU32::new(0),
        }
    }

    /// `by` more permits: first what a lowering still owes is forgiven.
    fn grow(&self, by: u32) {
        let owed = self
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| {
                Some(o.saturating_sub(by))
            })
            .unwrap_or(0);
        self.semaphore.add_permits((by - owed.min(by)) as usize);
    }

    /// `by` fewer permits: the free ones at once, the others as the
    /// requests holding them end ([`Permit`]'s drop). The debt is owed
    /// before the free ones are taken, so a request ending meanwhile pays
    /// it rather than hand its permit on; what both took beyond the debt
    /// is given back.
    fn shrink(&self, by: u32) {
        self.owed.fetch_add(by, Ordering::AcqRel);
        let owed = self.owed.load(Ordering::Acquire);
        let taken = self.semaphore.forget_permits(owed as usize) as u32;
        let before = self
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| {
                Some(o.saturating_sub(taken))
            })
            .unwrap_or(0);
        if taken > before {
            self.semaphore.add_permits((taken - before) as usize);
        }
    }

    /// A permit free right now.
    fn try_permit(self: &Arc<Self>) -> Result<Permit, TryAcquireError> {
        self.semaphore.try_acquire()?.forget();
        Ok(Permit(self.clone()))
    }

    /// The next permit, first come, first served.
    async fn permit(self: Arc<Self>) -> Option<Permit> {
        self.semaphore.acquire().await.ok()?.forget();
        Some(Permit(self))
    }
}

/// A request's concurrency permit: given back when the request ends, or
/// taken away if a reload lowered the limit meanwhile ([`Gate::shrink`]).
/// (A waiter whose permit came just as its wait was dropped gives it back
/// through tokio, past the debt: at worst one request more than the new
/// limit for as long as the debt lasts.)
#[derive(Debug)]
pub(crate) struct Permit(Arc<Gate>);

impl Drop for Permit {
    fn drop(&mut self) {
        let gate = &self.0;
        let retired = gate.owed.load(Ordering::Acquire) > 0
            && gate
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |o| o.checked_sub(1))
                .is_ok();
        if !retired {
            gate.semaphore.add_permits(1);
        }
    }
}

/// Permits of a model whose `max_concurrent` a reload removed: more than
/// can ever run at once, and within what tokio's semaphore and
/// `acquire_many` (a `u32`) accept.
const UNLIMITED_PERMITS: u32 = if Semaphore::MAX_PERMITS < u32::MAX as usize {
    Semaphore::MAX_PERMITS as u32
} else {
    u32::MAX
};

/// The concurrency state of a model a reload removed, for a later reload
/// that restores it. Alive while a request admitted there still holds a
/// permit (each permit holds the semaphore), so the restored model counts
/// those requests; once they have all finished it starts afresh.
#[derive(Debug, Clone)]
pub(crate) struct RetiredConcurrency {
    semaphore: Weak<Gate>,
    total: u32,
}

impl RetiredConcurrency {
    /// Whether a request admitted before the model was removed still runs.
    pub(crate) fn in_use(&self) -> bool {
        self.semaphore.strong_count() > 0
    }

    fn revive(&self) -> Option<Concurrency> {
        Some(Concurrency {
            semaphore: self.semaphore.upgrade()?,
            total: self.total,
        })
    }
}

/// Metric handles resolved once per model (no label formatting per request).
/// Per lane (`metrics::lane`): every admission writes them.
#[derive(Debug, Clone, Default)]
pub struct ModelMetrics {
    /// `weir_queue_depth{model}`.
    pub queue_depth: LaneGauge,
    /// `weir_in_flight{model}`.
    pub in_flight: LaneGauge,
    /// `weir_admitted_total{model}`.
    pub admitted: LaneCounter,
    /// `weir_rate_limited_total{model,limit}` per [`LimitKind`].
    pub limited: [LaneCounter; 4],
}

impl GlobalLimits {
    /// Builds the global buckets, keeping the levels of `previous` ones.
    pub fn new(config: &GlobalLimitsConfig, previous: Option<&GlobalLimits>, now: Instant) -> Self {
        Self::with_cluster(config, previous, now, None)
    }

    /// As [`new`](Self::new); with a `cluster`, the limits are shared with
    /// the other replicas (keys `{key_prefix}:requests`, `…:tokens`).
    pub fn with_cluster(
        config: &GlobalLimitsConfig,
        previous: Option<&GlobalLimits>,
        now: Instant,
        cluster: Option<&Cluster>,
    ) -> Self {
        let shared = |kind: LimitKind| cluster.map(|c| (c, kind.label(), None));
        Self {
            requests: bucket(
                config.requests_per_minute.map(|r| u64::from(r.get())),
                config.requests_per_minute.map(|r| u64::from(r.get())),
                previous.and_then(|p| p.requests.as_ref()),
                now,
                shared(LimitKind::Requests),
            ),
            tokens: bucket(
                config.tokens_per_minute.map(NonZeroU64::get),
                config.tokens_per_minute.map(NonZeroU64::get),
                previous.and_then(|p| p.tokens.as_ref()),
                now,
                shared(LimitKind::Tokens),
            ),
        }
    }
}

impl ModelLimits {
    /// Builds a model's limits, keeping bucket levels and the semaphore of
    /// `previous` (a changed limit keeps the level, clamped to the new
    /// capacity; a changed `max_concurrent` resizes the semaphore).
    pub fn new(
        config: &ModelConfig,
        previous: Option<&Arc<ModelLimits>>,
        metrics: ModelMetrics,
        now: Instant,
    ) -> Self {
        Self::with_cluster(config, (previous, None), metrics, now, None)
    }

    /// As [`new`](Self::new); with a `cluster`, the rate limits are shared
    /// with the other replicas (keys `{key_prefix}:{limit}:{model}`; the
    /// semaphore and queue stay per replica, SPEC `[cluster]`). Without
    /// `previous` limits, a `retired` semaphore (the model was removed by an
    /// earlier reload while requests ran) is resized and kept.
    pub(crate) fn with_cluster(
        config: &ModelConfig,
        (previous, retired): (Option<&Arc<ModelLimits>>, Option<&RetiredConcurrency>),
        metrics: ModelMetrics,
        now: Instant,
        cluster: Option<&Cluster>,
    ) -> Self {
        let limit = |kind: LimitKind, rate, capacity, previous| {
            let shared = cluster.map(|c| (c, kind.label(), Some(&*config.name)));
            bucket(rate, capacity, previous, now, shared)
        };
        let rpm = config.requests_per_minute.map(|r| u64::from(r.get()));
        let burst = config.burst_capacity().map(|b| u64::from(b.get()));
        let tpm = config.tokens_per_minute.map(NonZeroU64::get);
        let before = match previous {
            Some(p) => p.concurrency.clone(),
            None => retired.and_then(RetiredConcurrency::revive),
        };
        let concurrency = resize(before, config.max_concurrent.map(NonZeroU32::get));
        Self {
            requests: limit(
                LimitKind::Requests,
                rpm,
                burst,
                previous.and_then(|p| p.requests.as_ref()),
            ),
            tokens: limit(
                LimitKind::Tokens,
                tpm,
                tpm,
                previous.and_then(|p| p.tokens.as_ref()),
            ),
            concurrency,
            max_queue: config.max_queue,
            queue_timeout: config.queue_timeout,
            waiting: previous.map_or_else(|| Arc::new(AtomicU32::new(0)), |p| p.waiting.clone()),
            metrics,
        }
    }

    /// What a reload that removes this model leaves for one that restores
    /// it: its semaphore, if it has one.
    pub(crate) fn retire(&self) -> Option<RetiredConcurrency> {
        self.concurrency.as_ref().map(|c| RetiredConcurrency {
            semaphore: Arc::downgrade(&c.semaphore),
            total: c.total,
        })
    }

    /// Requests waiting right now.
    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The metric handles of this model.
    pub fn metrics(&self) -> &ModelMetrics {
        &self.metrics
    }

    /// The longest a request of this model may wait for admission.
    pub fn queue_timeout(&self) -> Duration {
        self.queue_timeout
    }

    /// Takes a place in the queue unless `max_queue` requests already wait.
    pub(crate) fn enter_queue(self: &Arc<Self>) -> Option<QueueSlot> {
        let max = self.max_queue;
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.metrics.queue_depth.inc();
        Some(QueueSlot(self.clone()))
    }

    /// Counts a refusal in `weir_rate_limited_total{model,limit}`.
    pub(crate) fn count_limited(&self, kind: LimitKind) {
        let i = match kind {
            LimitKind::Requests => 0,
            LimitKind::Tokens => 1,
            LimitKind::Concurrency => 2,
            LimitKind::Queue => 3,
        };
        if let Some(c) = self.metrics.limited.get(i) {
            c.inc();
        }
    }
}

/// The semaphore for `max` permits (`None`: no limit), made from the one
/// `before` when there is one, so the permits its requests hold still count:
/// grown at once, or shrunk as permits free up. A model that had a limit
/// keeps its semaphore without one ([`Concurrency`]).
fn resize(before: Option<Concurrency>, max: Option<u32>) -> Option<Concurrency> {
    let Some(Concurrency { semaphore, total }) = before else {
        return max.map(|max| Concurrency {
            semaphore: Arc::new(Gate::new(max)),
            total: max,
        });
    };
    let new_total = max.unwrap_or(UNLIMITED_PERMITS);
    if new_total > total {
        semaphore.grow(new_total - total);
    } else if new_total < total {
        // The surplus goes as permits free up, ahead of the requests
        // waiting for them, without waiting here (reload must not block).
        semaphore.shrink(total - new_total);
    }
    Some(Concurrency {
        semaphore,
        total: new_total,
    })
}

/// A place in a model's queue; dropping it leaves the queue.
#[derive(Debug)]
pub(crate) struct QueueSlot(Arc<ModelLimits>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.queue_depth.dec();
    }
}

/// One bucket a request reserves from: the bucket (if that limit is set),
/// how much it takes, and which limit it is.
type Step<'a> = (Option<&'a Limit>, u64, LimitKind);

/// The reservations of a request that has to wait: given back on drop (a
/// client that disconnects while queued) unless admission settles them.
struct Held<'a> {
    steps: [Step<'a>; 4],
    /// The waiter's place in each local bucket it waits in: it leaves
    /// them, not just refunds (only the waiters behind it move forward).
    tickets: [Option<Ticket>; 4],
    settled: bool,
    /// See [`Admitted::cluster_epoch`].
    cluster_epoch: Option<u64>,
}

impl Held<'_> {
    /// The wait is over in every bucket: the places in line go (the tokens
    /// stay taken until `settled` or the drop).
    fn done(&mut self) {
        for ((bucket, ..), ticket) in self.steps.iter().zip(&mut self.tickets) {
            if let (Some(bucket), Some(ticket)) = (bucket, ticket.take()) {
                bucket.done(ticket);
            }
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if !self.settled {
            let now = Instant::now();
            for ((bucket, n, _), ticket) in self.steps.iter().zip(self.tickets) {
                match (bucket, ticket) {
                    (Some(bucket), Some(ticket)) => bucket.leave(ticket, *n, now),
                    (Some(bucket), None) => bucket.refund_taken(*n, now, self.cluster_epoch),
                    (None, _) => {}
                }
            }
        }
    }
}

/// An admitted request: what it holds until its response ends.
#[derive(Debug)]
pub struct Admitted {
    /// The token buckets charged with `estimate` (global, model).
    token_buckets: [Option<Limit>; 2],
    /// Tokens reserved for this request (prompt estimate + max_tokens).
    estimate: u64,
    /// The model's concurrency permit, returned on drop.
    _permit: Option<Permit>,
    /// Decrements `weir_in_flight{model}` on drop.
    _in_flight: InFlightGauge,
    /// The `x-ratelimit-*` values at admission.
    pub headers: RateHeaders,
    /// How long the request waited for admission.
    pub queued: Duration,
    /// The cluster link's epoch before the first reservation (`None`
    /// without a shared limit): a refund made after the link changed is
    /// dropped, not given to a bucket that never lent the tokens
    /// (`SharedBucket::refund_taken`).
    cluster_epoch: Option<u64>,
}

#[derive(Debug)]
struct InFlightGauge(LaneGauge);

impl Drop for InFlightGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Admitted {
    /// Tokens reserved for this request.
    pub fn estimate(&self) -> u64 {
        self.estimate
    }

    /// Token reconciliation: the response reported `actual` tokens; refund
    /// or charge the difference from the estimate to every token bucket.
    ///
    /// A charge is capped at the bucket's capacity: the usage is the
    /// backend's word, and a buggy or hostile backend reporting billions of
    /// tokens would otherwise put the model's (and the global) bucket into
    /// debt for years, a debt a reload keeps. Capped, one response can cost
    /// at most one more full bucket, which any honest response that large
    /// costs anyway to within that bucket.
    pub fn reconcile(&self, actual: u64) {
        let now = Instant::now();
        for bucket in self.token_buckets.iter().flatten() {
            if actual < self.estimate {
                bucket.refund_taken(self.estimate - actual, now, self.cluster_epoch);
            } else if actual > self.estimate {
                let extra = (actual - self.estimate).min(bucket.capacity());
                bucket.charge(extra, now);
            }
        }
    }
}

/// Admits one request of `model` with a token `estimate` at `now` (the
/// caller's clock reading, injected so tests and the request path share
/// one), waiting at most until `deadline` (the earlier of `queue_timeout`
/// and `request_timeout`).
///
/// The common case, where every bucket covers the request at once and a
/// permit is free, is decided synchronously without a guard or a second
/// clock read (`benches/admission.rs` holds it under 200 ns); only a request
/// that must wait builds the state it keeps across the wait.
pub async fn admit(
    global: &GlobalLimits,
    model: &Arc<ModelLimits>,
    model_name: &str,
    estimate: u64,
    now: Instant,
    deadline: Instant,
) -> Result<Admitted, AdmitError> {
    // SPEC order: global requests, global tokens, model requests, model tokens.
    let steps = [
        (global.requests.as_ref(), 1, LimitKind::Requests),
        (global.tokens.as_ref(), estimate, LimitKind::Tokens),
        (model.requests.as_ref(), 1, LimitKind::Requests),
        (model.tokens.as_ref(), estimate, LimitKind::Tokens),
    ];
    // Read before anything is taken: tokens taken after a change of the
    // link then carry an older epoch, and their refund is dropped (never
    // over-admits).
    let cluster_epoch = steps
        .iter()
        .find_map(|(limit, ..)| limit.and_then(Limit::cluster_epoch));
    let max_wait = deadline.saturating_duration_since(now);
    let request = Request {
        steps: &steps,
        global,
        model,
        model_name,
        now: now.into(),
        max_wait,
        cluster_epoch,
    };
    let mut progress = Progress::default();
    match reserve_all(&request, &mut progress) {
        Ok(true) => {}
        // A shared limit's lease could not cover it: ask Redis. Boxed: the
        // Redis call's future is large, and inline it would grow (and make
        // every caller move) the future of every admission, local ones too;
        // the allocation happens only on this path, next to a round trip.
        Ok(false) => Box::pin(reserve_slowly(request, &mut progress)).await?,
        // Boxed too: a refusal may ask Redis the other shared limits' waits.
        Err(error) => return Err(Box::pin(refuse(&request, error, &progress)).await),
    }
    let Progress {
        wait,
        fixed_wait,
        reports,
        tickets,
        ..
    } = progress;
    if wait.is_zero() {
        if let Ok(permit) = try_permit(model) {
            // As the reservations just left the buckets.
            let headers = RateHeaders::tighter(reports);
            return Ok(settle(
                model,
                &steps,
                (estimate, cluster_epoch),
                permit,
                headers,
                Duration::ZERO,
            ));
        }
    }
    // From here on the request waits: its reservations go back if it is
    // dropped, and it counts in the queue.
    let mut held = Held {
        steps,
        tickets,
        settled: false,
        cluster_epoch,
    };
    let queue_slot = match queue_or_refuse(model, model_name) {
        Ok(slot) => slot,
        Err(AdmitError::Saturated {
            model: name,
            kind,
            limit,
            ..
        }) if !wait.is_zero() => {
            // Refused: its reservations go back first, so the headers show
            // the state it leaves behind, as a bucket 429's do.
            drop(held);
            return Err(AdmitError::Saturated {
                model: name,
                kind,
                limit,
                bucket_wait: Some((wait, rate_headers(global, model, Instant::now()))),
            });
        }
        Err(other) => return Err(other),
    };
    if !wait.is_zero() {
        wait_turn(&held, now + fixed_wait).await;
        held.done();
    }
    let permit = match (&model.concurrency, try_permit(model)) {
        (_, Ok(permit)) => permit,
        (None, Err(_)) => None,
        (Some(Concurrency { semaphore, total }), Err(_)) => {
            match tokio::time::timeout_at(deadline, semaphore.clone().permit()).await {
                Ok(Some(p)) => Some(p),
                // Timed out, or the semaphore was closed (never happens:
                // weir never closes it): refused, reservations refunded.
                _ => {
                    model.count_limited(LimitKind::Concurrency);
                    return Err(AdmitError::Saturated {
                        model: model_name.to_owned(),
                        kind: LimitKind::Concurrency,
                        limit: u64::from(*total),
                        bucket_wait: None,
                    });
                }
            }
        }
    };
    drop(queue_slot);
    held.settled = true;
    // After a wait the buckets have moved on: report them as they are now.
    let admitted_at = Instant::now();
    let headers = rate_headers(global, model, admitted_at);
    let queued = admitted_at.saturating_duration_since(now);
    Ok(settle(
        model,
        &steps,
        (estimate, cluster_epoch),
        permit,
        headers,
        queued,
    ))
}

/// Sleeps until the request's wait is over in every bucket: until `fixed`
/// (the waits of shared limits, which stay as given) and until every local
/// bucket it holds a ticket in says its turn has come.
///
/// A refund moves a ticket's turn earlier; the bucket then wakes the task
/// (or the waiter ahead of it hands the turn on), and the timer is set
/// again. The timer runs to the earliest turn not yet come, not to the
/// latest: a waiter whose turn came in one bucket hands that bucket's turn
/// on at once, even while it still waits in another.
async fn wait_turn(held: &Held<'_>, fixed: Instant) {
    let mut timer = pin!(tokio::time::sleep_until(fixed));
    std::future::poll_fn(|cx| loop {
        let now = Instant::now();
        let tick = Tick::from(now);
        let mut next: Option<Duration> = None;
        for ((limit, ..), ticket) in held.steps.iter().zip(&held.tickets) {
            if let (Some(limit), Some(ticket)) = (limit, ticket) {
                if let Some(wait) = limit.turn(*ticket, tick, cx.waker()) {
                    next = Some(next.map_or(wait, |n| n.min(wait)));
                }
            }
        }
        let at = match next {
            // `wait` is at least 1 ns: the timer set for it is not yet due.
            Some(wait) => now + wait,
            None if now >= fixed => return Poll::Ready(()),
            None => fixed,
        };
        if timer.deadline() != at {
            timer.as_mut().reset(at);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
    })
    .await;
}

/// One request's reservations: what [`reserve_all`], [`reserve_slowly`]
/// and [`refuse`] need of it.
#[derive(Clone, Copy)]
struct Request<'s, 'a> {
    steps: &'s [Step<'a>; 4],
    global: &'s GlobalLimits,
    model: &'s ModelLimits,
    model_name: &'s str,
    now: Tick,
    max_wait: Duration,
    cluster_epoch: Option<u64>,
}

/// How far [`reserve_all`] got: the next step to reserve, the longest wait
/// so far, the states the headers report, and the tickets of the local
/// buckets it waits in.
#[derive(Default)]
struct Progress {
    next: usize,
    wait: Duration,
    /// The longest wait of the steps without a ticket (shared limits): it
    /// stays as given, while a ticket's wait can shrink.
    fixed_wait: Duration,
    /// Each bucket's state right after its reservation, read under its
    /// lock; only the ones the headers show are turned into numbers.
    reports: [Option<Reading>; 4],
    tickets: [Option<Ticket>; 4],
    /// The latest the request waits for Redis: `SLOW_PATH_MAX` after its
    /// first round trip began, for all its shared limits and a refusal's
    /// looks together (each waiting its own slow-path wait would add them
    /// up: four shared limits, a second).
    redis_deadline: Option<Instant>,
}

/// Reserves from every bucket in `steps` at `now`, from `progress.next` on.
/// On the first bucket that cannot cover the request within `max_wait`,
/// gives back what was taken and refuses with the longest wait of all the
/// buckets: the request passes only when every one covers it, so that is the
/// exact `Retry-After`. Records the wait before the request may proceed and
/// each bucket's state after the reservation (read under the same lock).
/// Returns `false`, stopped at `progress.next`,
/// when a shared limit must ask Redis ([`reserve_slowly`]), and the error of
/// the step at `progress.next` when it refused (see [`refuse`]).
fn reserve_all(request: &Request<'_, '_>, progress: &mut Progress) -> Result<bool, ReserveError> {
    let &Request {
        steps,
        now,
        max_wait,
        ..
    } = request;
    while let Some(&(limit, n, _)) = steps.get(progress.next) {
        let Some(limit) = limit else {
            progress.next += 1;
            continue;
        };
        match limit.reserve_in_line(n, now, max_wait) {
            Some(Ok((w, ticket, state))) => progress.record(w, ticket, state),
            Some(Err(error)) => return Err(error),
            None => return Ok(false),
        }
    }
    Ok(true)
}

/// The rest of [`reserve_all`] once a shared limit needs Redis: that step's
/// round trip, then the others as before (each may need its own).
async fn reserve_slowly(
    request: Request<'_, '_>,
    progress: &mut Progress,
) -> Result<(), AdmitError> {
    let Request {
        steps,
        now,
        max_wait,
        ..
    } = request;
    loop {
        let Some(&(Some(limit), n, _)) = steps.get(progress.next) else {
            return Ok(());
        };
        // What is taken so far goes back if the client leaves meanwhile.
        let mut taken = *steps;
        for step in taken.iter_mut().skip(progress.next) {
            step.0 = None;
        }
        let mut held = Held {
            steps: taken,
            tickets: progress.tickets,
            settled: false,
            cluster_epoch: request.cluster_epoch,
        };
        let until = progress.redis_until(limit.redis_wait().unwrap_or_default());
        let reserved = limit.reserve_slow(n, now, max_wait, until).await;
        held.settled = true;
        match reserved {
            Ok((w, report)) => progress.record(w, None, Reading::Shared(report)),
            Err(error) => return Err(refuse(&request, error, progress).await),
        }
        match reserve_all(&request, progress) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => return Err(refuse(&request, error, progress).await),
        }
    }
}

impl Progress {
    /// Until when a round trip starting now waits for Redis: its slow-path
    /// `wait`, within the request's deadline for Redis (set by its first).
    fn redis_until(&mut self, wait: Duration) -> Instant {
        let now = Instant::now();
        self.redis_deadline
            .get_or_insert(now + crate::cluster::lease::SLOW_PATH_MAX);
        self.redis_by(now, wait)
    }

    /// `now + wait`, within the request's deadline for Redis if it has one.
    fn redis_by(&self, now: Instant, wait: Duration) -> Instant {
        let until = now + wait;
        self.redis_deadline
            .map_or(until, |deadline| deadline.min(until))
    }

    /// Step `next` reserved, to proceed after `wait` (or its `ticket`'s
    /// turn), leaving `state`.
    #[inline]
    fn record(&mut self, wait: Duration, ticket: Option<Ticket>, state: Reading) {
        self.wait = self.wait.max(wait);
        if ticket.is_none() {
            self.fixed_wait = self.fixed_wait.max(wait);
        } else if let Some(slot) = self.tickets.get_mut(self.next) {
            *slot = ticket;
        }
        if let Some(report) = self.reports.get_mut(self.next) {
            *report = Some(state);
        }
        self.next += 1;
    }
}

/// Step `progress.next` refused the request: gives back the steps before it
/// and returns the request's error.
async fn refuse(request: &Request<'_, '_>, error: ReserveError, progress: &Progress) -> AdmitError {
    let &Request {
        steps,
        global,
        model,
        model_name,
        now,
        ..
    } = request;
    let taken = progress.next;
    let (limit, n, kind) = steps
        .get(taken)
        .copied()
        .unwrap_or((None, 0, LimitKind::Requests));
    // Refused: the request proceeds with nothing, so nothing stays taken,
    // and the places it took in line go too.
    for (&(limit, n, _), ticket) in steps.iter().zip(progress.tickets).take(taken) {
        match (limit, ticket) {
            (Some(limit), Some(ticket)) => limit.leave(ticket, n, now),
            (Some(limit), None) => limit.refund(n, now),
            (None, _) => {}
        }
    }
    // Steps 0 and 1 are the global buckets.
    let is_global = |step: usize| step < 2;
    match error {
        ReserveError::TooLarge { capacity } => AdmitError::TooLarge {
            model: model_name.to_owned(),
            estimate: n,
            capacity,
            global: is_global(taken),
        },
        ReserveError::WouldWait { wait } => {
            // One look at every bucket not reached: the longest wait names
            // the 429, and one that can never hold the request makes it a
            // 413 instead (SPEC: it could never pass), not a 429 whose
            // Retry-After would send the client back for nothing. The
            // refusing bucket is not asked again: its `wait` is exact (a
            // shared limit's comes from Redis). Nor is one before it: it
            // held the request within `max_wait`, less than `wait`, and a
            // shared one's level in Redis may still hold this request's
            // reservation, given back above but sent back only with the
            // next top-up (a stress run saw `Retry-After: 52` naming the
            // global bucket that had admitted the request, for a 10 s
            // wait). A shared limit is asked for Redis' level now: its last
            // report does not count what other replicas took since. The
            // looks run at once, bounded by one slow-path wait and the
            // request's deadline for Redis.
            let redis_wait = steps
                .iter()
                .skip(taken + 1)
                .filter_map(|&(other, _, _)| other?.redis_wait())
                .max()
                .unwrap_or_default();
            let until = progress.redis_by(Instant::now(), redis_wait);
            let look = |step: usize| {
                let other = steps
                    .get(step)
                    .and_then(|&(other, n, other_kind)| Some((other?, n, other_kind)))
                    .filter(|_| step > taken);
                async move {
                    let (other, n, other_kind) = other?;
                    Some((other, n, other_kind, other.wait_for(n, now, until).await))
                }
            };
            let looked = tokio::join!(look(0), look(1), look(2), look(3));
            let (mut kind, mut refusing, mut wait) = ((kind, taken), limit, wait);
            let looked = [looked.0, looked.1, looked.2, looked.3];
            for (step, looked) in looked.into_iter().enumerate() {
                let Some((other, n, other_kind, looked)) = looked else {
                    continue;
                };
                match looked {
                    Ok(w) if w > wait => {
                        (kind, refusing, wait) = ((other_kind, step), Some(other), w);
                    }
                    Err(ReserveError::TooLarge { capacity }) => {
                        return AdmitError::TooLarge {
                            model: model_name.to_owned(),
                            estimate: n,
                            capacity,
                            global: is_global(step),
                        };
                    }
                    Ok(_) | Err(ReserveError::WouldWait { .. }) => {}
                }
            }
            let (kind, step) = kind;
            model.count_limited(kind);
            // The headers show the state this request leaves behind
            // (untouched); the refused kind's, that of the bucket that
            // refused.
            let mut headers = rate_headers(global, model, now);
            let refused = refusing.map(|limit| RateState::from(limit.report(now)));
            match kind {
                LimitKind::Tokens => headers.tokens = refused,
                _ => headers.requests = refused,
            }
            AdmitError::RateLimited {
                model: model_name.to_owned(),
                kind,
                global: is_global(step),
                limit: refusing.map_or(0, Limit::rate_per_minute),
                wait,
                headers,
            }
        }
    }
}

/// The model's permit if one is free right now; `Ok(None)` when the model
/// has no `max_concurrent`.
fn try_permit(model: &ModelLimits) -> Result<Option<Permit>, TryAcquireError> {
    match &model.concurrency {
        None => Ok(None),
        Some(c) => c.semaphore.try_permit().map(Some),
    }
}

/// The admitted request: it keeps the token buckets it reserved from for
/// reconciliation, its permit, and its place in `weir_in_flight`. Inlined:
/// it is most of the common path's last step (`benches/admission.rs`).
#[inline]
fn settle(
    model: &ModelLimits,
    steps: &[Step<'_>; 4],
    (estimate, cluster_epoch): (u64, Option<u64>),
    permit: Option<Permit>,
    headers: RateHeaders,
    queued: Duration,
) -> Admitted {
    let [_, (global_tokens, ..), _, (model_tokens, ..)] = steps;
    model.metrics.admitted.inc();
    model.metrics.in_flight.inc();
    Admitted {
        token_buckets: [global_tokens.cloned(), model_tokens.cloned()],
        estimate,
        _permit: permit,
        _in_flight: InFlightGauge(model.metrics.in_flight.clone()),
        headers,
        queued,
        cluster_epoch,
    }
}

pub(crate) fn queue_or_refuse(
    model: &Arc<ModelLimits>,
    model_name: &str,
) -> Result<QueueSlot, AdmitError> {
    model.enter_queue().ok_or_else(|| {
        model.count_limited(LimitKind::Queue);
        AdmitError::Saturated {
            model: model_name.to_owned(),
            kind: LimitKind::Queue,
            limit: u64::from(model.max_queue),
            bucket_wait: None,
        }
    })
}

/// The headers a response reports at `now`: per kind, the tighter of the
/// global and the model's bucket ([`RateHeaders::tighter`]).
fn rate_headers(global: &GlobalLimits, model: &ModelLimits, now: impl Into<Tick>) -> RateHeaders {
    let now = now.into();
    let read = |limit: &Option<Limit>| limit.as_ref().map(|l| l.reading(now));
    RateHeaders::tighter([
        read(&global.requests),
        read(&global.tokens),
        read(&model.requests),
        read(&model.tokens),
    ])
}

impl RateHeaders {
    /// From the states of the four buckets in step order: per kind, the one
    /// with fewer left (the model's on a tie). Only the two shown are turned
    /// into numbers (a division each), as only two were before.
    #[inline]
    fn tighter(readings: [Option<Reading>; 4]) -> RateHeaders {
        let [global_requests, global_tokens, model_requests, model_tokens] = readings;
        let pick = |global: Option<Reading>, model: Option<Reading>| {
            let reading = match (global, model) {
                (Some(g), Some(m)) if g.remaining() < m.remaining() => g,
                (_, Some(m)) => m,
                (g, None) => g?,
            };
            Some(RateState::from(reading.report()))
        };
        RateHeaders {
            requests: pick(global_requests, model_requests),
            tokens: pick(global_tokens, model_tokens),
        }
    }
}

impl From<Report> for RateState {
    fn from((limit, remaining, reset): Report) -> RateState {
        RateState {
            limit,
            remaining,
            reset,
        }
    }
}

/// A bucket for `rate` per minute with `capacity`, reusing `previous`
/// (its level kept, clamped to the new capacity) when there is one. With
/// `shared` = (cluster, limit, model), the limit is the cluster's shared
/// bucket for it (which keeps its own lease across reloads), unless Redis
/// cannot hold it exactly (`cluster::scripts::Params`): then it stays local.
fn bucket(
    rate: Option<u64>,
    capacity: Option<u64>,
    previous: Option<&Limit>,
    now: Instant,
    shared: Option<(&Cluster, &str, Option<&str>)>,
) -> Option<Limit> {
    let Some(rate) = rate.and_then(NonZeroU64::new) else {
        // The limit is gone: whoever waits in the old bucket waits for
        // nothing now, and goes.
        if let Some(Limit::Local(old)) = previous {
            if let Some(waker) = old.lift() {
                waker.wake();
            }
        }
        return None;
    };
    let capacity = NonZeroU64::new(capacity.unwrap_or(rate.get())).unwrap_or(rate);
    if let Some((cluster, limit, model)) = shared {
        if let Some(bucket) = cluster.bucket(limit, model, rate.get(), capacity.get(), now) {
            return Some(Limit::Shared(bucket));
        }
        tracing::warn!(
            limit,
            model,
            "too large to share exactly through Redis; enforced per replica"
        );
    }
    match previous {
        Some(Limit::Local(old)) => {
            if old.rate_per_minute() != rate.get() || old.capacity() != capacity.get() {
                // Its waiters' turns may have come closer.
                if let Some(waker) = old.set_limits(rate, capacity, now) {
                    waker.wake();
                }
            }
            Some(Limit::Local(old.clone()))
        }
        _ => Some(Limit::Local(Arc::new(Bucket::new(rate, capacity, now)))),
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::admission::bucket::TOKEN_COST;

    fn model(
        rpm: Option<u32>,
        burst: Option<u32>,
        tpm: Option<u64>,
        max_concurrent: Option<u32>,
    ) -> ModelConfig {
        ModelConfig {
            name: "m".into(),
            requests_per_minute: rpm.and_then(NonZeroU32::new),
            tokens_per_minute: tpm.and_then(NonZeroU64::new),
            burst: burst.and_then(NonZeroU32::new),
            max_concurrent: max_concurrent.and_then(NonZeroU32::new),
            queue_timeout: Duration::from_secs(10),
            max_queue: 1000,
            max_tokens: 256,
            declared: true,
        }
    }

    fn limits(cfg: &ModelConfig) -> (GlobalLimits, Arc<ModelLimits>) {
        let now = Instant::now();
        (
            GlobalLimits::default(),
            Arc::new(ModelLimits::new(cfg, None, ModelMetrics::default(), now)),
        )
    }

    /// A request's shared limits wait for Redis each their slow-path wait,
    /// but all of them together no longer than `SLOW_PATH_MAX` from the
    /// first round trip (a review saw a second with four shared limits and
    /// a Redis 300 ms away).
    #[tokio::test(start_paused = true)]
    async fn a_requests_round_trips_share_one_deadline_for_redis() {
        let ms = Duration::from_millis;
        let mut progress = Progress::default();
        let start = Instant::now();
        assert_eq!(progress.redis_until(ms(165)), start + ms(165));
        tokio::time::advance(ms(160)).await;
        assert_eq!(progress.redis_until(ms(165)), start + ms(250));
        tokio::time::advance(ms(20)).await;
        assert_eq!(progress.redis_until(ms(20)), start + ms(200));
        tokio::time::advance(ms(200)).await;
        // Past it: the next step's fallback decides at once.
        assert_eq!(progress.redis_until(ms(20)), start + ms(250));
    }

    #[tokio::test(start_paused = true)]
    async fn sixty_seconds_at_600_rpm_burst_10_admit_exactly_610() {
        let (global, m) = limits(&model(Some(600), Some(10), None, None));
        let start = Instant::now();
        let mut admitted = 0;
        // A greedy client trying every millisecond, never willing to wait.
        while start.elapsed() < Duration::from_secs(60) {
            if admit(&global, &m, "m", 1, Instant::now(), Instant::now())
                .await
                .is_ok()
            {
                admitted += 1;
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!((609..=611).contains(&admitted), "admitted {admitted}");
    }

    #[tokio::test(start_paused = true)]
    async fn burst_one_paces_admissions_100ms_apart_in_fifo_order() {
        let (global, m) = limits(&model(Some(600), Some(1), None, None));
        let global = Arc::new(global);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..5u32 {
            let (global, m) = (global.clone(), m.clone());
            tasks.push(tokio::spawn(async move {
                let a = admit(
                    &global,
                    &m,
                    "m",
                    1,
                    Instant::now(),
                    start + Duration::from_secs(10),
                )
                .await;
                (i, a.is_ok(), start.elapsed())
            }));
            // Let each task reserve before the next one starts.
            tokio::task::yield_now().await;
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        for (i, ok, at) in results {
            assert!(ok);
            assert_eq!(at, Duration::from_millis(100) * i, "request {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refused_at_once_with_the_exact_wait() {
        let (global, m) = limits(&model(Some(60), Some(1), None, None));
        let deadline = Instant::now() + Duration::from_millis(500);
        assert!(admit(&global, &m, "m", 1, Instant::now(), deadline)
            .await
            .is_ok());
        let before = Instant::now();
        match admit(&global, &m, "m", 1, Instant::now(), deadline).await {
            Err(AdmitError::RateLimited {
                kind,
                wait,
                limit,
                headers,
                ..
            }) => {
                assert_eq!(kind, LimitKind::Requests);
                assert_eq!(wait, Duration::from_secs(1));
                assert_eq!(limit, 60);
                // Burst 1: one request is the most permitted at once.
                let r = headers.requests.unwrap();
                assert_eq!((r.limit, r.remaining), (1, 0));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(Instant::now(), before, "no pointless wait before a 429");
    }

    #[tokio::test(start_paused = true)]
    async fn tpm_under_200_concurrent_requests_never_overshoots() {
        // 6000 tokens/min, estimate 100 per request: over 30 s at most
        // 6000 (capacity) + 3000 (refill) tokens = 90 requests may pass.
        let (global, m) = limits(&model(None, None, Some(6000), None));
        let global = Arc::new(global);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let (global, m) = (global.clone(), m.clone());
            tasks.push(tokio::spawn(async move {
                admit(
                    &global,
                    &m,
                    "m",
                    100,
                    Instant::now(),
                    start + Duration::from_secs(30),
                )
                .await
                .is_ok()
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            if t.await.unwrap() {
                admitted += 1;
            }
        }
        assert!(admitted <= 90, "admitted {admitted} > 90");
        assert!(
            admitted >= 89,
            "admitted only {admitted}: refused what it could admit"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reconciliation_refunds_and_charges() {
        let (global, m) = limits(&model(None, None, Some(1000), None));
        let now = Instant::now();
        let tokens = m.tokens.clone().unwrap();
        let a = admit(&global, &m, "m", 300, Instant::now(), now)
            .await
            .unwrap();
        assert_eq!(tokens.remaining(now), 700);
        a.reconcile(100);
        assert_eq!(tokens.remaining(now), 900, "200 refunded");
        let b = admit(&global, &m, "m", 100, Instant::now(), now)
            .await
            .unwrap();
        b.reconcile(400);
        assert_eq!(tokens.remaining(now), 500, "300 more charged");
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_a_queued_request_gives_its_reservation_back() {
        let (global, m) = limits(&model(Some(60), Some(1), None, None));
        let global = Arc::new(global);
        let deadline = Instant::now() + Duration::from_secs(10);
        admit(&global, &m, "m", 1, Instant::now(), deadline)
            .await
            .unwrap();
        let (g2, m2) = (global.clone(), m.clone());
        let queued = tokio::spawn(async move {
            admit(&g2, &m2, "m", 1, Instant::now(), deadline)
                .await
                .is_ok()
        });
        tokio::task::yield_now().await;
        assert_eq!(m.waiting(), 1);
        queued.abort();
        let _ = queued.await;
        assert_eq!(m.waiting(), 0, "the queue slot was given back");
        // Had the cancelled reservation stayed, this one would wait 2 s.
        let start = Instant::now();
        admit(&global, &m, "m", 1, Instant::now(), deadline)
            .await
            .unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// Spawns a request of `estimate` tokens that waits up to 10 s; it
    /// answers with when it was admitted (since `start`) and what it holds.
    /// The spawned task has reserved once the caller yields.
    fn spawn_admit(
        global: &Arc<GlobalLimits>,
        m: &Arc<ModelLimits>,
        estimate: u64,
        start: Instant,
    ) -> tokio::task::JoinHandle<Result<(Duration, Admitted), AdmitError>> {
        let (global, m) = (global.clone(), m.clone());
        tokio::spawn(async move {
            let now = Instant::now();
            let deadline = now + Duration::from_secs(10);
            let admitted = admit(&global, &m, "m", estimate, now, deadline).await?;
            Ok((start.elapsed(), admitted))
        })
    }

    /// The review's case: a request arriving after a refund must not pass
    /// one that waits since before it; the waiter is admitted as soon as
    /// the refund covers it.
    #[tokio::test(start_paused = true)]
    async fn a_refund_moves_the_waiters_forward() {
        // 6000 tokens/min: 100 per second, capacity 6000.
        let (global, m) = limits(&model(None, None, Some(6000), None));
        let global = Arc::new(global);
        let start = Instant::now();
        let big = admit(&global, &m, "m", 6000, start, start).await.unwrap();
        tokio::time::advance(ms(100)).await;
        // 10 tokens refilled, 240 missing: told to wait 2.4 s.
        let waiter = spawn_admit(&global, &m, 250, start);
        tokio::task::yield_now().await;
        tokio::time::advance(ms(900)).await;
        // The big request used 10 tokens: 5990 come back at 1 s.
        big.reconcile(10);
        let (at, _) = waiter.await.unwrap().unwrap();
        assert_eq!(at, Duration::from_secs(1), "admitted at the refund");
        tokio::time::advance(ms(500)).await;
        let late = spawn_admit(&global, &m, 10, start).await.unwrap().unwrap();
        assert_eq!(late.0, ms(1500));
    }

    /// A refund that covers several waiters admits each at once, and moves
    /// the others to their exact new turns, in order.
    #[tokio::test(start_paused = true)]
    async fn a_refund_moves_every_waiter_to_its_exact_new_turn() {
        let (global, m) = limits(&model(None, None, Some(6000), None));
        let global = Arc::new(global);
        let start = Instant::now();
        let big = admit(&global, &m, "m", 6000, start, start).await.unwrap();
        // Five waiters of 100 tokens: turns at 1, 2, 3, 4 and 5 s.
        let mut waiters = Vec::new();
        for _ in 0..5 {
            waiters.push(spawn_admit(&global, &m, 100, start));
            tokio::task::yield_now().await;
        }
        tokio::time::advance(ms(500)).await;
        // 200 tokens back: every turn moves 2 s earlier.
        big.reconcile(5800);
        let mut at = Vec::new();
        for w in waiters {
            at.push(w.await.unwrap().unwrap().0);
        }
        let expected = [500, 500, 1000, 2000, 3000].map(ms);
        assert_eq!(at, expected);
    }

    /// A waiter that leaves moves the waiters behind it forward, and only
    /// them: those ahead never counted its tokens.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_leaving_moves_only_the_waiters_behind_it() {
        // 60 requests/min, burst 1: one request per second.
        let (global, m) = limits(&model(Some(60), Some(1), None, None));
        let global = Arc::new(global);
        let start = Instant::now();
        let _first = admit(&global, &m, "m", 1, start, start).await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..3 {
            waiters.push(spawn_admit(&global, &m, 1, start));
            tokio::task::yield_now().await;
        }
        tokio::time::advance(ms(500)).await;
        let [ahead, leaving, behind] = <[_; 3]>::try_from(waiters).unwrap();
        leaving.abort();
        let _ = leaving.await;
        // A newcomer queues behind every waiter still there.
        let newcomer = spawn_admit(&global, &m, 1, start);
        assert_eq!(ahead.await.unwrap().unwrap().0, ms(1000), "not moved");
        assert_eq!(behind.await.unwrap().unwrap().0, ms(2000), "moved 1 s");
        assert_eq!(newcomer.await.unwrap().unwrap().0, ms(3000));
    }

    /// A request waiting in two buckets proceeds when both cover it: a
    /// refund in one moves it only as far as the other allows.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_in_two_buckets_moves_as_far_as_both_allow() {
        let global_cfg = GlobalLimitsConfig {
            requests_per_minute: None,
            tokens_per_minute: NonZeroU64::new(12_000),
        };
        let global = Arc::new(GlobalLimits::new(&global_cfg, None, Instant::now()));
        let (_, m) = limits(&model(None, None, Some(6000), None));
        let start = Instant::now();
        // Global: 12000 of 12000 taken (200/s); model: 6000 of 6000 (100/s).
        let big = admit(&global, &m, "m", 6000, start, start).await.unwrap();
        let other = Arc::new(ModelLimits::new(
            &model(None, None, None, None),
            None,
            ModelMetrics::default(),
            start,
        ));
        let _other = admit(&global, &other, "o", 6000, start, start)
            .await
            .unwrap();
        // 400 tokens: global turn at 2 s, model turn at 4 s.
        let waiter = spawn_admit(&global, &m, 400, start);
        tokio::task::yield_now().await;
        tokio::time::advance(ms(500)).await;
        // 100 come back to both: the model turn moves to 3 s, the global
        // one to 1.5 s.
        big.reconcile(5900);
        assert_eq!(waiter.await.unwrap().unwrap().0, ms(3000));
    }

    /// One simulated client: arrives at `at_ms`, asks for `estimate` tokens,
    /// uses `actual` of them over `hold_ms`, and gives up waiting after
    /// `patience_ms` if set.
    #[derive(Debug, Clone)]
    struct Client {
        at_ms: u64,
        estimate: u64,
        actual: u64,
        hold_ms: u64,
        patience_ms: Option<u64>,
    }

    fn client() -> impl proptest::strategy::Strategy<Value = Client> {
        use proptest::prelude::*;
        (
            0..60_000u64,
            1..=400u64,
            0..=100u64,
            0..5_000u64,
            prop::option::of(0..5_000u64),
        )
            .prop_map(|(at_ms, estimate, used, hold_ms, patience_ms)| Client {
                at_ms,
                estimate,
                actual: estimate * used / 100,
                hold_ms,
                patience_ms,
            })
    }

    /// What the simulated clients saw.
    #[derive(Default)]
    struct Ledger {
        /// Each admitted client's tokens as the buckets count them now:
        /// its estimate, then its usage once reconciled.
        charges: Vec<u64>,
        /// When each client was admitted, by arrival.
        admitted_at: Vec<Option<Duration>>,
        violations: Vec<String>,
    }

    /// Runs `clients` against a global tokens limit and a model's requests
    /// and tokens limits, in paused time.
    fn simulate(
        (global_tpm, model_tpm, rpm, burst): (u64, u64, u32, u32),
        mut clients: Vec<Client>,
    ) -> Ledger {
        // Distinct arrival instants: arrival order is reservation order.
        clients.sort_by_key(|c| c.at_ms);
        for i in 1..clients.len() {
            clients[i].at_ms = clients[i].at_ms.max(clients[i - 1].at_ms + 1);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async move {
            let start = Instant::now();
            let global_cfg = GlobalLimitsConfig {
                requests_per_minute: None,
                tokens_per_minute: NonZeroU64::new(global_tpm),
            };
            let global = Arc::new(GlobalLimits::new(&global_cfg, None, start));
            let (_, m) = limits(&model(Some(rpm), Some(burst), Some(model_tpm), None));
            let ledger = Arc::new(std::sync::Mutex::new(Ledger {
                admitted_at: vec![None; clients.len()],
                ..Ledger::default()
            }));
            // Each bound as tokens × 60e9 <= capacity × 60e9 + rate × ns.
            let bounds = [(global_tpm, global_tpm), (model_tpm, model_tpm)];
            let mut tasks = Vec::new();
            for (i, c) in clients.into_iter().enumerate() {
                let (global, m, ledger) = (global.clone(), m.clone(), ledger.clone());
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep_until(start + ms(c.at_ms)).await;
                    let now = Instant::now();
                    let patience = ms(c.patience_ms.unwrap_or(3_600_000));
                    let admitting = admit(&global, &m, "m", c.estimate, now, now + ms(10_000));
                    let Ok(Ok(admitted)) = tokio::time::timeout(patience, admitting).await else {
                        return;
                    };
                    let t = u128::from(u64::try_from(start.elapsed().as_nanos()).unwrap());
                    let slot = {
                        let mut l = ledger.lock().unwrap();
                        l.charges.push(c.estimate);
                        l.admitted_at[i] = Some(start.elapsed());
                        let tokens: u128 = l.charges.iter().map(|&n| u128::from(n)).sum();
                        for (capacity, rate) in bounds {
                            if tokens * TOKEN_COST
                                > u128::from(capacity) * TOKEN_COST + u128::from(rate) * t
                            {
                                l.violations.push(format!("{tokens} tokens at {t} ns"));
                            }
                        }
                        let requests = l.charges.len() as u128;
                        if requests * TOKEN_COST
                            > u128::from(burst) * TOKEN_COST + u128::from(rpm) * t
                        {
                            l.violations.push(format!("{requests} requests at {t} ns"));
                        }
                        l.charges.len() - 1
                    };
                    tokio::time::sleep(ms(c.hold_ms)).await;
                    ledger.lock().unwrap().charges[slot] = c.actual;
                    admitted.reconcile(c.actual);
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            Arc::try_unwrap(ledger).ok().unwrap().into_inner().unwrap()
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// SPEC: never more than rate × t + burst, however refunds and
        /// waiters that leave move the queue; and first come, first served
        /// (admission times never fall in arrival order).
        #[test]
        fn refunds_and_cancels_never_over_admit_and_keep_fifo(
            limits in (1_000..6_000u64, 500..3_000u64, 10..120u32, 1..10u32),
            clients in proptest::collection::vec(client(), 1..150),
        ) {
            let ledger = simulate(limits, clients);
            proptest::prop_assert!(ledger.violations.is_empty(), "{:?}", ledger.violations);
            let admitted: Vec<Duration> = ledger.admitted_at.iter().flatten().copied().collect();
            proptest::prop_assert!(
                admitted.windows(2).all(|w| w[0] <= w[1]),
                "admitted out of arrival order: {admitted:?}"
            );
        }
    }

    fn global_limits(rpm: Option<u32>, tpm: Option<u64>) -> GlobalLimits {
        let config = GlobalLimitsConfig {
            requests_per_minute: rpm.and_then(NonZeroU32::new),
            tokens_per_minute: tpm.and_then(NonZeroU64::new),
        };
        GlobalLimits::new(&config, None, Instant::now())
    }

    /// Per kind, the headers show the bucket with fewer left, global or
    /// the model's (they showed the model's whenever it had one).
    #[tokio::test(start_paused = true)]
    async fn the_headers_show_the_tighter_bucket_of_each_kind() {
        let global = global_limits(Some(100), Some(1000));
        let (_, m) = limits(&model(Some(10), Some(10), Some(6000), None));
        let now = Instant::now();
        let admitted = admit(&global, &m, "m", 300, now, now).await.unwrap();
        let (requests, tokens) = (
            admitted.headers.requests.unwrap(),
            admitted.headers.tokens.unwrap(),
        );
        assert_eq!((requests.limit, requests.remaining), (10, 9), "the model's");
        assert_eq!(
            (tokens.limit, tokens.remaining),
            (1000, 700),
            "the global one"
        );
        assert_eq!(tokens.reset, Duration::from_secs(18));
    }

    /// The limit header is the bucket's capacity (the burst), which the
    /// remaining count is measured against: never limit 60, remaining 499.
    #[tokio::test(start_paused = true)]
    async fn the_limit_reported_is_the_capacity_remaining_counts_against() {
        let (global, m) = limits(&model(Some(60), Some(500), None, None));
        let now = Instant::now();
        let admitted = admit(&global, &m, "m", 1, now, now).await.unwrap();
        let requests = admitted.headers.requests.unwrap();
        assert_eq!((requests.limit, requests.remaining), (500, 499));
        assert_eq!(requests.reset, Duration::from_secs(1));
    }

    /// A 429 from the global bucket reports that bucket for the refused
    /// kind, and says it is the global limit.
    #[tokio::test(start_paused = true)]
    async fn a_429_reports_the_bucket_that_refused() {
        let global = global_limits(None, Some(1000));
        let (_, m) = limits(&model(None, None, Some(6000), None));
        let now = Instant::now();
        let _held = admit(&global, &m, "m", 900, now, now).await.unwrap();
        match admit(&global, &m, "m", 500, now, now).await {
            Err(AdmitError::RateLimited {
                kind,
                global,
                limit,
                wait,
                headers,
                ..
            }) => {
                assert_eq!((kind, global, limit), (LimitKind::Tokens, true, 1000));
                assert_eq!(wait, Duration::from_secs(24));
                let tokens = headers.tokens.unwrap();
                assert_eq!((tokens.limit, tokens.remaining), (1000, 100));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A 413 says whether the bucket that can never hold the request is the
    /// global one or the model's.
    #[tokio::test(start_paused = true)]
    async fn too_large_says_which_bucket() {
        let global = global_limits(None, Some(1000));
        let now = Instant::now();
        let (_, unlimited) = limits(&model(None, None, None, None));
        let (_, small) = limits(&model(None, None, Some(500), None));
        for (m, estimate, expected) in [
            (&unlimited, 2000, (1000, true)),
            (&small, 800, (500, false)),
        ] {
            match admit(&global, m, "m", estimate, now, now).await {
                Err(AdmitError::TooLarge {
                    capacity, global, ..
                }) => assert_eq!((capacity, global), expected),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn impossible_requests_are_too_large_not_rate_limited() {
        let (global, m) = limits(&model(None, None, Some(1000), None));
        match admit(&global, &m, "m", 1001, Instant::now(), Instant::now()).await {
            Err(AdmitError::TooLarge { capacity, .. }) => assert_eq!(capacity, 1000),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            m.tokens.as_ref().unwrap().remaining(Instant::now()),
            1000,
            "nothing taken"
        );
    }

    /// A request the tokens bucket could never hold is a 413 even when an
    /// earlier bucket (requests) would have refused it first with a 429.
    #[tokio::test(start_paused = true)]
    async fn too_large_wins_over_an_earlier_bucket_that_would_wait() {
        let (global, m) = limits(&model(Some(60), Some(1), Some(1000), None));
        let _first = admit(&global, &m, "m", 10, Instant::now(), Instant::now())
            .await
            .unwrap();
        match admit(&global, &m, "m", 5000, Instant::now(), Instant::now()).await {
            Err(AdmitError::TooLarge { capacity, .. }) => assert_eq!(capacity, 1000),
            other => panic!("{other:?}"),
        }
        // A request that fits is still a 429 from the requests bucket.
        match admit(&global, &m, "m", 10, Instant::now(), Instant::now()).await {
            Err(AdmitError::RateLimited { kind, .. }) => assert_eq!(kind, LimitKind::Requests),
            other => panic!("{other:?}"),
        }
    }

    /// A backend's absurd usage costs at most one more full bucket.
    #[tokio::test(start_paused = true)]
    async fn a_charge_is_capped_at_the_bucket_capacity() {
        let (global, m) = limits(&model(None, None, Some(1000), None));
        let admitted = admit(&global, &m, "m", 10, Instant::now(), Instant::now())
            .await
            .unwrap();
        admitted.reconcile(u64::MAX / 2);
        drop(admitted);
        let tokens = m.tokens.as_ref().unwrap();
        // 10 reserved + 1000 charged: 1010 below full, refilled at 1000/min,
        // so a full bucket's worth is 60.6 s away (uncapped: millennia).
        let wait = tokens
            .wait_for(1000, Instant::now().into(), Instant::now())
            .await
            .unwrap();
        assert_eq!(wait, Duration::from_millis(60_600));
    }

    /// A reload that changes the model keeps counting the requests already
    /// waiting against `max_queue`.
    #[tokio::test(start_paused = true)]
    async fn the_queue_count_survives_a_reload() {
        let mut cfg = model(None, None, None, Some(1));
        cfg.max_queue = 1;
        let (global, m) = limits(&cfg);
        let global = Arc::new(global);
        let _held = admit(&global, &m, "m", 1, Instant::now(), Instant::now())
            .await
            .unwrap();
        let (g2, m2) = (global.clone(), m.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        let queued =
            tokio::spawn(async move { admit(&g2, &m2, "m", 1, Instant::now(), deadline).await });
        tokio::task::yield_now().await;
        assert_eq!(m.waiting(), 1);
        cfg.queue_timeout = Duration::from_secs(29);
        let reloaded = Arc::new(ModelLimits::new(
            &cfg,
            Some(&m),
            m.metrics().clone(),
            Instant::now(),
        ));
        assert_eq!(reloaded.waiting(), 1);
        match admit(&global, &reloaded, "m", 1, Instant::now(), deadline).await {
            Err(AdmitError::Saturated { kind, .. }) => assert_eq!(kind, LimitKind::Queue),
            other => panic!("{other:?}"),
        }
        queued.abort();
        let _ = queued.await;
        assert_eq!(reloaded.waiting(), 0);
    }

    /// `max_concurrent` removed by one reload and restored by the next:
    /// the requests admitted before and in between still count.
    #[tokio::test(start_paused = true)]
    async fn a_limit_removed_and_restored_counts_the_requests_still_running() {
        let limited = model(None, None, None, Some(2));
        let unlimited = model(None, None, None, None);
        let (global, m) = limits(&limited);
        let now = Instant::now;
        let admit_now = |m: &Arc<ModelLimits>| {
            let m = m.clone();
            async move { admit(&GlobalLimits::default(), &m, "m", 1, now(), now()).await }
        };
        let mut running = vec![admit_now(&m).await.unwrap(), admit_now(&m).await.unwrap()];
        let reload = |cfg: &ModelConfig, m: &Arc<ModelLimits>| {
            Arc::new(ModelLimits::new(cfg, Some(m), m.metrics().clone(), now()))
        };
        let m = reload(&unlimited, &m);
        for _ in 0..3 {
            running.push(admit_now(&m).await.expect("no limit"));
        }
        let m = reload(&limited, &m);
        tokio::task::yield_now().await;
        match admit(&global, &m, "m", 1, now(), now()).await {
            Err(AdmitError::Saturated {
                kind: LimitKind::Concurrency,
                limit: 2,
                ..
            }) => {}
            other => panic!("5 run under a limit of 2: {other:?}"),
        }
        // Only once all but one have finished is there room for one more.
        running.truncate(2);
        tokio::task::yield_now().await;
        assert!(admit_now(&m).await.is_err(), "2 still run");
        running.truncate(1);
        tokio::task::yield_now().await;
        running.push(admit_now(&m).await.expect("1 runs: room for one"));
        assert!(admit_now(&m).await.is_err());
    }

    /// A model removed by one reload and restored by the next, while its
    /// requests still run, gets its semaphore back; once they have
    /// finished, nothing is kept.
    #[tokio::test(start_paused = true)]
    async fn a_retired_semaphore_lives_as_long_as_its_permits() {
        let (global, m) = limits(&model(None, None, None, Some(1)));
        let held = admit(&global, &m, "m", 1, Instant::now(), Instant::now())
            .await
            .unwrap();
        let retired = m.retire().expect("a semaphore");
        drop(m);
        assert!(retired.in_use());
        let restored = ModelLimits::with_cluster(
            &model(None, None, None, Some(1)),
            (None, Some(&retired)),
            ModelMetrics::default(),
            Instant::now(),
            None,
        );
        let restored = Arc::new(restored);
        assert!(
            admit(&global, &restored, "m", 1, Instant::now(), Instant::now())
                .await
                .is_err(),
            "the request from before holds the only permit"
        );
        drop(held);
        drop(restored);
        assert!(!retired.in_use());
    }

    /// A reload that lowers `max_concurrent` holds the requests already
    /// waiting to the new limit, and one that raises it again first
    /// cancels what the lowering still owed (an audit saw 6 requests
    /// running under a limit of 2 after four lower-and-raise pairs, and
    /// waiters admitted three at a time under a limit lowered to 1).
    #[tokio::test(start_paused = true)]
    async fn a_lowered_max_concurrent_holds_the_requests_already_waiting() {
        let (global, m) = limits(&model(None, None, None, Some(3)));
        let global = Arc::new(global);
        let now = Instant::now();
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(admit(&global, &m, "m", 1, now, now).await.unwrap());
        }
        let far = now + Duration::from_secs(100);
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let (g, m) = (global.clone(), m.clone());
                tokio::spawn(async move { admit(&g, &m, "m", 1, Instant::now(), far).await })
            })
            .collect();
        let admitted = || async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            waiters.iter().filter(|w| w.is_finished()).count()
        };
        assert_eq!(admitted().await, 0);
        // Reloads, each from the one before: 3 -> 1 -> 2 -> 1.
        let resized = |before: &Arc<ModelLimits>, n: u32| {
            let cfg = model(None, None, None, Some(n));
            Arc::new(ModelLimits::new(
                &cfg,
                Some(before),
                ModelMetrics::default(),
                Instant::now(),
            ))
        };
        let one = resized(&m, 1);
        let two = resized(&one, 2);
        let one = resized(&two, 1);
        assert_eq!(admitted().await, 0, "three run; the limit is 2, then 1");
        held.pop();
        held.pop();
        assert_eq!(admitted().await, 0, "one runs; the limit is 1");
        held.pop();
        assert_eq!(admitted().await, 1, "none runs: one waiter in");
        // Raised again: the free permits go to the waiters at once.
        let _three = resized(&one, 3);
        assert_eq!(admitted().await, 3);
        for waiter in waiters {
            assert!(waiter.await.unwrap().is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn max_concurrent_queues_fifo_and_times_out() {
        let mut cfg = model(None, None, None, Some(1));
        cfg.max_queue = 1;
        let (global, m) = limits(&cfg);
        let global = Arc::new(global);
        let held = admit(&global, &m, "m", 1, Instant::now(), Instant::now())
            .await
            .unwrap();
        let (g2, m2) = (global.clone(), m.clone());
        let deadline = Instant::now() + Duration::from_secs(1);
        let waiter = tokio::spawn(async move {
            admit(&g2, &m2, "m", 1, Instant::now(), deadline)
                .await
                .map(|_| ())
        });
        tokio::task::yield_now().await;
        // The queue holds one: a third request is refused at once.
        match admit(&global, &m, "m", 1, Instant::now(), deadline).await {
            Err(AdmitError::Saturated {
                kind: LimitKind::Queue,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        drop(held);
        assert!(
            waiter.await.unwrap().is_ok(),
            "the waiter got the freed permit"
        );
        let held = admit(&global, &m, "m", 1, Instant::now(), Instant::now())
            .await
            .unwrap();
        match admit(
            &global,
            &m,
            "m",
            1,
            Instant::now(),
            Instant::now() + Duration::from_millis(50),
        )
        .await
        {
            Err(AdmitError::Saturated {
                kind: LimitKind::Concurrency,
                limit: 1,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        drop(held);
    }
}
