//! One limit shared through Redis, as one replica sees it: a *lease* of
//! tokens already taken from the Redis bucket and spent locally without a
//! round trip, a slow path that reserves in Redis when the lease cannot
//! cover a request, and a local fallback bucket for when Redis is gone.
//!
//! # The lease
//!
//! The cluster task tops the lease up every [`SYNC_PERIOD`] (sooner when it
//! runs low) with one script call that also returns what the lease holds
//! beyond its target and charges what the replica owes. The target is the
//! replica's recent demand (an EWMA of tokens asked for per second) over
//! [`HORIZON`], capped at [`LEASE_PERCENT`] % of the bucket's capacity
//! divided by the replicas alive, so all the leases held together never
//! exceed that share of the bucket. Leases are taken only from tokens the
//! bucket holds (never into debt), so they cannot make the cluster admit
//! more than the global bucket allows; what they can do is hold tokens
//! unused, which is the under-admission docs/CLUSTER.md bounds.
//!
//! A request spends from the lease with one compare-exchange ([`try_reserve`]:
//! no lock, no await, no allocation). When the lease is short it goes to
//! [`reserve_slow`]: a real reservation in Redis (GCRA with debt, so it may
//! wait, first come first served across replicas) bounded by
//! [`SLOW_PATH_TIMEOUT`] (longer, up to [`SLOW_PATH_MAX`], for a Redis whose
//! round trip is longer). Token reconciliation refunds to and charges from
//! the lease; what the lease cannot cover is owed and charged at the next
//! top-up.
//!
//! # The fallback
//!
//! While Redis is unreachable, every decision goes to a local [`Bucket`] at
//! this replica's share: rate and capacity divided by the replicas last
//! seen. It starts full and refills at that share of the rate; every
//! top-up and every slow-path answer read in time lowers its level to this
//! replica's share of the level Redis reports when it is above it, debt
//! included (an answer never raises it); and it spends what it admits. On the way down
//! it also receives the lease. So a replica continues from
//! where the cluster was instead of from a fresh burst, and what the
//! fallback admits while Redis is merely slow is not handed out again. A
//! request the limit admits but the share is too small for waits until the
//! share is full and takes it into debt (`Bucket::reserve_and_report_up_to`;
//! docs/CLUSTER.md bounds the burst it adds): it is not a 413.
//!
//! A request the fallback admits while Redis is still up (its reservation
//! timed out) is charged in Redis: the reservation that timed out stands if
//! Redis made it, and is owed (charged at the next top-up) if Redis
//! refused it or failed. Only a reservation whose request the fallback
//! refused, or whose client left, is given back.
//!
//! [`try_reserve`]: SharedBucket::try_reserve
//! [`reserve_slow`]: SharedBucket::reserve_slow

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{
    scripts::{Params, Report, Reserved},
    Link,
};
use crate::admission::bucket::{Bucket, ReserveError, Tick};

/// How often the cluster task tops leases up (and returns surplus).
pub(crate) const SYNC_PERIOD: Duration = Duration::from_millis(50);

/// How far ahead a lease covers the replica's recent demand: four sync
/// periods, so one late top-up on a busy machine does not empty it (plus
/// two of Redis' round trips, `SharedBucket::plan`).
pub(crate) const HORIZON: Duration = Duration::from_millis(200);

/// All leases together hold at most this share (%) of a bucket's capacity:
/// the most the cluster can under-admit because of them (docs/CLUSTER.md).
pub(crate) const LEASE_PERCENT: u64 = 1;

/// The shortest a request waits for Redis on the slow path before the
/// fallback bucket decides for it (SPEC: never wait on a dead Redis): the
/// wait while Redis answers quickly (`Link::slow_path_wait`).
pub(crate) const SLOW_PATH_TIMEOUT: Duration = Duration::from_millis(20);

/// The longest: a Redis whose round trip is over half of this is treated
/// as one that does not answer in time, and the fallback decides.
pub(crate) const SLOW_PATH_MAX: Duration = Duration::from_millis(250);

/// Added to twice the round trip for the slow path's wait: a call queued
/// behind a top-up on the multiplexed connection, a busy scheduler.
pub(crate) const SLOW_PATH_MARGIN: Duration = Duration::from_millis(5);

/// How long a slow-path call may still run after its waiter stopped
/// listening (it timed out, or its client left), to learn whether Redis
/// took the tokens and give them back if it did.
const ORPHAN_CALL_LIMIT: Duration = Duration::from_secs(10);

/// How quickly the demand estimate follows a change (EWMA time constant).
const DEMAND_TAU: Duration = Duration::from_secs(1);

/// Even with nothing to move, look at the Redis level this often, so the
/// headers and the fallback's level stay current.
const REFRESH: Duration = Duration::from_secs(1);

/// `(capacity, remaining, reset)`: what `Bucket::report` returns and the
/// `x-ratelimit-*` headers show.
pub type ReportTriple = (u64, u64, Duration);

/// A limit shared with the other replicas through Redis.
#[derive(Debug)]
pub struct SharedBucket {
    /// The Redis key, `{key_prefix}:{limit}:{model}` (SPEC).
    key: String,
    /// The connection and cluster state, shared by every shared bucket.
    link: Arc<Link>,
    /// Tokens per minute, for the headers and the 429 message.
    rate_per_minute: AtomicU64,
    /// Tokens the bucket holds when full: larger requests are refused
    /// locally (413) without asking Redis.
    capacity: AtomicU64,
    /// The script's units; replaced when a reload changes the limits.
    params: Mutex<Params>,
    /// Tokens taken from Redis and not yet spent: the lease.
    lease: AtomicU64,
    /// The lease size the cluster task aims at. Below half of it the request
    /// path wakes the task to top up before the next period; above it (a
    /// refund) to return the surplus, so refunds parked here do not stay
    /// hidden from the other replicas.
    target: AtomicU64,
    /// Tokens spent beyond the lease by charges (an under-estimate), to be
    /// charged in Redis at the next top-up.
    owed: AtomicU64,
    /// Tokens asked for since the last top-up, on every path: the demand
    /// sample.
    demand: AtomicU64,
    /// The Redis level at the last contact: whole tokens left...
    remaining: AtomicU64,
    /// ...and when it will be full again ([`Tick`] nanoseconds).
    full_at: AtomicU64,
    /// The latest instant ([`Tick`] nanoseconds) a Redis reservation of
    /// this replica was scheduled for. Until then a refund may be a waiter's
    /// place in line (a slot Redis put the bucket into debt for), which the
    /// lease must not make spendable at once: it goes back to Redis.
    scheduled_until: AtomicU64,
    /// Refunded tokens that go back to Redis at the next top-up (not into
    /// the lease): Redis moves its `tat` back, so the freed slot stays where
    /// it was in the line, as a local bucket's refund does.
    returning: AtomicU64,
    /// The share this replica enforces while Redis is unreachable.
    fallback: Bucket,
    /// Top-up bookkeeping, touched by the cluster task only.
    sync: Mutex<SyncState>,
}

/// The cluster task's view of one lease.
#[derive(Debug)]
struct SyncState {
    /// Tokens per second this replica asked for, smoothed.
    demand_per_sec: f64,
    /// When the demand was last sampled.
    sampled_at: Instant,
    /// When Redis was last asked about this bucket.
    refreshed_at: Option<Instant>,
    /// The replicas the fallback's share is computed for.
    share_of: u64,
}

/// A lease's figures for `/admin/cluster`.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct LeaseStatus {
    /// The Redis key.
    pub key: String,
    /// Tokens per minute across the cluster.
    pub rate_per_minute: u64,
    /// Tokens held in the lease right now.
    pub lease: u64,
    /// The lease size the cluster task aims at.
    pub target: u64,
    /// The most the lease may hold.
    pub max_lease: u64,
    /// Tokens owed to Redis (charged at the next top-up).
    pub owed: u64,
    /// Tokens per second this replica asked for, smoothed.
    pub demand_per_sec: f64,
    /// Whole tokens left in Redis at the last contact.
    pub remaining: u64,
    /// The fallback's rate (this replica's share), per minute.
    pub fallback_rate_per_minute: u64,
}

impl SharedBucket {
    /// A shared bucket with an empty lease. `None` when the limits cannot be
    /// kept exact in Redis ([`Params::new`]): the caller keeps them local.
    pub(crate) fn new(
        key: String,
        link: Arc<Link>,
        rate_per_minute: u64,
        capacity: u64,
        now: Instant,
    ) -> Option<Self> {
        let params = Params::new(rate_per_minute, capacity)?;
        let share_of = link.replicas();
        let (rate_share, capacity_share) = share(rate_per_minute, capacity, share_of)?;
        Some(Self {
            key,
            link,
            rate_per_minute: AtomicU64::new(rate_per_minute),
            capacity: AtomicU64::new(capacity),
            params: Mutex::new(params),
            lease: AtomicU64::new(0),
            target: AtomicU64::new(0),
            owed: AtomicU64::new(0),
            demand: AtomicU64::new(0),
            remaining: AtomicU64::new(capacity),
            full_at: AtomicU64::new(0),
            scheduled_until: AtomicU64::new(0),
            returning: AtomicU64::new(0),
            fallback: Bucket::new(rate_share, capacity_share, now),
            sync: Mutex::new(SyncState {
                demand_per_sec: 0.0,
                sampled_at: now,
                refreshed_at: None,
                share_of,
            }),
        })
    }

    /// The fast path: decides at once when it can, without a round trip.
    /// `None` means the lease cannot cover `n` and Redis is up: call
    /// [`reserve_slow`](Self::reserve_slow). The result is that of
    /// `Bucket::reserve_and_report`.
    pub fn try_reserve(
        &self,
        n: u64,
        now: Tick,
        max_wait: Duration,
    ) -> Option<Result<(Duration, ReportTriple), ReserveError>> {
        if let Err(too_large) = self.fits(n) {
            return Some(Err(too_large));
        }
        self.demand.fetch_add(n, Ordering::Relaxed);
        if !self.link.is_up() {
            return Some(self.reserve_fallback(n, now, max_wait));
        }
        let before = self
            .lease
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_sub(n)
            })
            .ok()?;
        let after = before - n;
        let low = self.target.load(Ordering::Relaxed) / 2;
        if after < low && before >= low {
            self.link.wake();
        }
        Some(Ok((Duration::ZERO, self.cached_report(after, now))))
    }

    /// The slow path: a reservation in Redis, exactly as `Bucket::reserve`
    /// (the wait is Redis', the `Retry-After` of a refusal exact). If Redis
    /// does not answer within `Link::slow_path_wait` (20 ms, longer for a
    /// Redis whose round trip is longer), or is down, the
    /// fallback bucket decides. Callers that give up after a wait refund
    /// `n` with [`refund`](Self::refund), as with a local bucket.
    ///
    /// The call runs in a task of its own, to its end: Redis may take the
    /// tokens after the waiter stopped listening (it timed out and the
    /// fallback decided, or its client left), and then nobody else would
    /// ever give them back.
    pub async fn reserve_slow(
        self: &Arc<Self>,
        n: u64,
        now: Tick,
        max_wait: Duration,
    ) -> Result<(Duration, ReportTriple), ReserveError> {
        let until = Instant::now() + self.slow_path_wait();
        self.reserve_slow_until(n, now, max_wait, until).await
    }

    /// [`reserve_slow`](Self::reserve_slow), waiting for Redis until
    /// `until` (a request's one slow-path wait, shared by all its shared
    /// limits: `admission::limiter`). Redis is asked for a wait that still
    /// fits `max_wait` once the time since `now` and the round trip back
    /// are added, so a slow Redis does not make a request queue past its
    /// `queue_timeout`.
    pub async fn reserve_slow_until(
        self: &Arc<Self>,
        n: u64,
        now: Tick,
        max_wait: Duration,
        until: Instant,
    ) -> Result<(Duration, ReportTriple), ReserveError> {
        self.fits(n)?;
        if !self.link.is_up() {
            return self.reserve_fallback(n, now, max_wait);
        }
        // Demand outran the lease: top it up now rather than at the period.
        self.link.wake();
        let epoch = self.link.epoch();
        // What the lease holds pays its part and Redis is asked for the rest
        // only: a replica whose lease and Redis' level together cover a
        // request does not refuse it.
        let from_lease = self
            .lease
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held - held.min(n))
            })
            .map_or(0, |held| held.min(n));
        let ask = n - from_lease;
        if ask == 0 {
            // A refund came in meanwhile: the lease covers it after all.
            let lease = self.lease.load(Ordering::Relaxed);
            return Ok((Duration::ZERO, self.cached_report(lease, now)));
        }
        let pending = Arc::new(Pending::default());
        let bucket = Arc::clone(self);
        let handed = Arc::clone(&pending);
        let spent = Tick::from(Instant::now()).since(now);
        let redis_max_wait = max_wait.saturating_sub(spent + self.link.round_trip());
        tokio::spawn(async move {
            let sent = Instant::now();
            let params = bucket.params();
            let mut conn = bucket.link.conn.clone();
            let call = bucket.link.scripts.reserve(
                &mut conn,
                &bucket.key,
                params,
                ask,
                redis_max_wait,
                None,
            );
            let outcome = match tokio::time::timeout(ORPHAN_CALL_LIMIT, call).await {
                Ok(Ok(reserved)) => {
                    bucket.link.observe_round_trip(sent.elapsed());
                    Ok(reserved)
                }
                Ok(Err(error)) => Err(error.to_string()),
                Err(_elapsed) => Err("no answer from Redis".to_owned()),
            };
            // Handed to the waiter if it still waits; else settled here by
            // what it decided without it.
            let decided = {
                let mut state = handed.lock();
                match std::mem::take(&mut *state) {
                    Handoff::Decided(admitted) => Some(admitted),
                    Handoff::Waiting | Handoff::Answered(_) => {
                        *state = Handoff::Answered(outcome.clone());
                        None
                    }
                }
            };
            match decided {
                Some(admitted) => bucket.settle_unread(ask, epoch, &outcome, admitted),
                None => handed.answered.notify_one(),
            }
        });
        let mut slot = AnswerSlot {
            pending,
            bucket: self.clone(),
            ask,
            epoch,
            open: true,
            from_lease,
        };
        let outcome = match tokio::time::timeout_at(until, slot.answer()).await {
            Ok(outcome) => outcome,
            Err(_elapsed) => match slot.decide(|| self.reserve_fallback(n, now, max_wait)) {
                Ok(decided) => {
                    self.link.failed("slow path timed out");
                    return decided;
                }
                // It came just as the wait ran out.
                Err(outcome) => outcome,
            },
        };
        let answered = Tick::from(Instant::now());
        let capacity = self.capacity();
        match outcome {
            Ok(Reserved::Taken { wait, report }) => {
                slot.from_lease = 0;
                self.store_report(report, answered);
                self.follow_level(report, answered);
                // Redis counted the wait from its own "now", which is after
                // ours: waiting from `now` would end early by the round trip.
                let wait = if wait.is_zero() {
                    wait
                } else {
                    self.scheduled(answered, wait);
                    wait + answered.since(now)
                };
                Ok((wait, (capacity, report.remaining, report.reset)))
            }
            Ok(Reserved::WouldWait { wait, report }) => {
                // Refused: the slot gives the lease's part back as it goes.
                self.store_report(report, answered);
                self.follow_level(report, answered);
                Err(ReserveError::WouldWait { wait })
            }
            Ok(Reserved::TooLarge) => Err(ReserveError::TooLarge {
                capacity: self.capacity(),
            }),
            Err(error) => {
                self.link.failed(&error);
                let decided = self.reserve_fallback(n, now, max_wait);
                if decided.is_ok() {
                    // Served: Redis counts the lease's part already and is
                    // owed the rest (the call may or may not have run:
                    // charging twice can only under-admit).
                    slot.from_lease = 0;
                    self.owe(ask, epoch);
                }
                decided
            }
        }
    }

    /// Settles a slow-path answer its waiter did not read (it came after the
    /// waiter timed out or left). If the fallback admitted the request,
    /// Redis must count it, or the tokens would be spent twice, once
    /// locally and once again from Redis: a reservation Redis made stands as
    /// the request's charge, and one it refused or failed is owed (unless
    /// the link changed since: then the fallback's share accounted for it,
    /// as during an outage). Otherwise what Redis took goes back to the
    /// lease.
    fn settle_unread(
        &self,
        n: u64,
        epoch: u64,
        answer: &Result<Reserved, String>,
        admitted_locally: bool,
    ) {
        match answer {
            Ok(Reserved::Taken { wait, .. }) if !admitted_locally => {
                let now = Tick::from(Instant::now());
                // A slot in the line: back to Redis, not to the lease.
                self.scheduled(now, *wait);
                self.refund_taken(n, now, epoch);
            }
            Ok(Reserved::WouldWait { .. } | Reserved::TooLarge) | Err(_) if admitted_locally => {
                self.owe(n, epoch);
            }
            _ => {}
        }
    }

    /// Owes Redis `n` tokens the fallback admitted while the link was at
    /// `epoch`, unless it has changed since (see `settle_unread`).
    fn owe(&self, n: u64, epoch: u64) {
        if epoch == self.link.epoch() {
            self.owed.fetch_add(n, Ordering::AcqRel);
        }
    }

    /// How long `n` tokens would wait at `now`, without taking anything:
    /// from the lease and the level Redis last reported (no round trip; used
    /// only to find the longest wait of a request another bucket refused).
    ///
    /// Redis' report says when the bucket is full again (`full_at`); its
    /// level rises by one token every `60 / rate` s until then, so it holds
    /// what the lease does not cover `(capacity - that)` tokens' refill time
    /// before `full_at`. That counts the part of a token already refilled,
    /// which the whole tokens of `remaining` drop (a review saw a
    /// `Retry-After: 10` for a wait of 3 s at 6 a minute). It is exact as of
    /// the last report, give or take the trip that report came back in;
    /// what other replicas took since can only make the real wait longer.
    pub fn wait_for(&self, n: u64, now: Tick) -> Result<Duration, ReserveError> {
        self.fits(n)?;
        if !self.link.is_up() {
            return self.fallback.wait_for_up_to(n, now, Some(self.capacity()));
        }
        let from_redis = n.saturating_sub(self.lease.load(Ordering::Relaxed));
        if from_redis == 0 {
            return Ok(Duration::ZERO);
        }
        let until_full = self
            .full_at
            .load(Ordering::Relaxed)
            .saturating_sub(now.nanos());
        let spare = self.capacity().saturating_sub(from_redis);
        let rate = self.rate_per_minute().max(1);
        // Rounded down, so the wait is rounded up.
        let spare_nanos = u128::from(spare) * 60_000_000_000 / u128::from(rate);
        let wait = u128::from(until_full).saturating_sub(spare_nanos);
        Ok(Duration::from_nanos(
            u64::try_from(wait).unwrap_or(u64::MAX),
        ))
    }

    /// How long a request may wait for Redis' answer (`Link::slow_path_wait`).
    pub fn slow_path_wait(&self) -> Duration {
        self.link.slow_path_wait()
    }

    /// [`wait_for`](Self::wait_for) from the level Redis reports now (one
    /// look, taking nothing), for the `Retry-After` of a request another
    /// bucket refused: the last report does not count what other replicas
    /// took since, and a wait read from it could be half the real one (a
    /// review saw `Retry-After: 5` where the bucket held the request 10 s).
    /// Without an answer by `until` (the refusal's looks share one
    /// [`slow_path_wait`](Self::slow_path_wait)) it is the estimate.
    pub async fn wait_exact(
        &self,
        n: u64,
        now: Tick,
        until: Instant,
    ) -> Result<Duration, ReserveError> {
        self.fits(n)?;
        if !self.link.is_up() {
            return self.wait_for(n, now);
        }
        let params = self.params();
        let mut conn = self.link.conn.clone();
        let look = self
            .link
            .scripts
            .lease(&mut conn, &self.key, params, (0, 0, 0), None);
        match tokio::time::timeout_at(until, look).await {
            Ok(Ok(leased)) => {
                let answered = Tick::from(Instant::now());
                self.store_report(leased.report, answered);
                self.wait_for(n, answered)
            }
            Ok(Err(_)) | Err(_) => self.wait_for(n, now),
        }
    }

    /// Gives back `n` unused tokens (a cancelled waiter, an over-estimate):
    /// to the lease, whose surplus the cluster task, woken at once, returns
    /// to Redis. While a reservation this replica made in Redis is still
    /// scheduled for later, the tokens may be such a waiter's place in line
    /// (a future slot Redis put the bucket into debt for): they go back to
    /// Redis at the next top-up instead (the task woken at once), which
    /// moves the shared `tat` back as a local bucket's refund does, so
    /// nobody spends that slot before its instant (a review saw 27-29
    /// admitted against 22 when the lease handed such tokens to the next
    /// request at once).
    pub fn refund(&self, n: u64, now: Tick) {
        if self.link.is_up() {
            if now.nanos() < self.scheduled_until.load(Ordering::Acquire) {
                self.returning.fetch_add(n, Ordering::AcqRel);
                if !self.link.is_up() {
                    // The link went down since the check above, and going
                    // down may have cleared `returning` before this add:
                    // taken back, so it is not given to Redis after the
                    // outage (a refund across epochs is dropped).
                    let _ = self
                        .returning
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                            Some(r.saturating_sub(n))
                        });
                    return;
                }
                self.link.wake();
                return;
            }
            let held = self.lease.fetch_add(n, Ordering::AcqRel).saturating_add(n);
            if held > self.target.load(Ordering::Relaxed) {
                self.link.wake();
            }
        } else {
            // The fallback registers no waiters: nobody to wake.
            let _ = self.fallback.refund(n, now);
        }
    }

    /// The link's epoch (see `Link::epoch`), read before tokens are taken.
    pub fn epoch(&self) -> u64 {
        self.link.epoch()
    }

    /// [`refund`](Self::refund) of tokens taken while the link was at
    /// `epoch`. If it has gone down or come back since, the bucket that
    /// lent them (the lease, or the fallback) no longer decides, and giving
    /// them to the one that does would admit tokens Redis never lent: a
    /// request admitted by the fallback during an outage and refunded
    /// after the rejoin would top the shared bucket up. Such a refund is
    /// dropped instead, which can only under-admit, by what the requests
    /// in flight across the change did not use.
    pub fn refund_taken(&self, n: u64, now: Tick, epoch: u64) {
        if epoch == self.link.epoch() {
            self.refund(n, now);
        }
    }

    /// Takes `n` more tokens without waiting (an under-estimate): from the
    /// lease, and what it cannot cover is charged in Redis at the next
    /// top-up.
    pub fn charge(&self, n: u64, now: Tick) {
        if !self.link.is_up() {
            self.fallback.charge(n, now);
            return;
        }
        let mut uncovered = n;
        let _ = self
            .lease
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                uncovered = n.saturating_sub(held);
                Some(held.saturating_sub(n))
            });
        if uncovered > 0 {
            self.owed.fetch_add(uncovered, Ordering::AcqRel);
        }
    }

    /// `(capacity, remaining, reset_after)` at `now`: the level Redis last
    /// reported plus the lease (or the fallback's, while down).
    pub fn report(&self, now: Tick) -> ReportTriple {
        if self.link.is_up() {
            self.cached_report(self.lease.load(Ordering::Relaxed), now)
        } else {
            let (_, remaining, reset) = self.fallback.report(now);
            (self.capacity(), remaining, reset)
        }
    }

    /// Tokens the bucket holds when full.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Tokens added per minute, across the cluster.
    pub fn rate_per_minute(&self) -> u64 {
        self.rate_per_minute.load(Ordering::Relaxed)
    }

    /// Changes the limits on reload. Redis converts the stored level at the
    /// next call ([`super::scripts`]); the fallback keeps its level as
    /// `Bucket::set_limits` does. Returns `false` (nothing changed) when the
    /// new limits cannot be kept exact in Redis: the caller makes the limit
    /// local instead.
    pub fn set_limits(&self, rate_per_minute: u64, capacity: u64, now: Instant) -> bool {
        let Some(params) = Params::new(rate_per_minute, capacity) else {
            return false;
        };
        let share_of = self.sync_state().share_of;
        let Some((rate_share, capacity_share)) = share(rate_per_minute, capacity, share_of) else {
            return false;
        };
        *self.params.lock().unwrap_or_else(PoisonError::into_inner) = params;
        self.rate_per_minute
            .store(rate_per_minute, Ordering::Relaxed);
        self.capacity.store(capacity, Ordering::Relaxed);
        // The fallback registers no waiters: nobody to wake.
        let _ = self.fallback.set_limits(rate_share, capacity_share, now);
        true
    }

    /// One top-up: sample the demand, then in one script call return the
    /// surplus, charge what is owed and take what the lease lacks. `force`
    /// returns the whole lease (shutdown, or a bucket a reload removed).
    pub(crate) async fn sync(&self, now: Instant, force_return: bool) -> redis::RedisResult<()> {
        let replicas = self.link.replicas();
        let (target, refresh_due) = self.plan(now, replicas, force_return);
        let held = self.lease.load(Ordering::Acquire);
        let (mut give_back, mut want) = (0, 0);
        if held > target {
            let excess = held - target;
            if let Ok(before) = self
                .lease
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                    Some(l.saturating_sub(excess))
                })
            {
                give_back = before.min(excess);
            }
        } else {
            want = target - held;
        }
        // Refunds of slots in the line go back to Redis too (see `refund`).
        give_back = give_back.saturating_add(self.returning.swap(0, Ordering::AcqRel));
        let owed = self.owed.swap(0, Ordering::AcqRel);
        if give_back == 0 && want == 0 && owed == 0 && !refresh_due {
            return Ok(());
        }
        let params = self.params();
        let mut conn = self.link.conn.clone();
        let sent = Instant::now();
        let result = self
            .link
            .scripts
            .lease(&mut conn, &self.key, params, (give_back, owed, want), None)
            .await;
        match result {
            Ok(leased) => {
                self.lease.fetch_add(leased.granted, Ordering::AcqRel);
                let answered = Instant::now();
                self.link.observe_round_trip(answered - sent);
                self.store_report(leased.report, answered.into());
                self.follow_level(leased.report, answered);
                self.sync_state().refreshed_at = Some(answered);
                Ok(())
            }
            Err(error) => {
                // The call may or may not have run: owing again can only
                // charge twice (under-admission), and the surplus counts as
                // returned; neither lets the cluster admit too much.
                self.owed.fetch_add(owed, Ordering::AcqRel);
                Err(error)
            }
        }
    }

    /// Redis is gone: the fallback continues from where it is (at most this
    /// replica's share of the last level Redis reported, less what it
    /// admitted since, while Redis was too slow to answer) plus the lease
    /// it held, so decisions go on from where the cluster was, not from a
    /// fresh burst, and nothing the fallback already admitted is handed out
    /// again.
    pub(crate) fn enter_fallback(&self, now: Instant) {
        let lease = self.lease.swap(0, Ordering::AcqRel);
        // Slots in Redis' line given up just before: the fallback carries
        // only its share of that line, so they are dropped (under-admitting
        // by what a few milliseconds of refunds held).
        self.returning.store(0, Ordering::Release);
        // The fallback registers no waiters: nobody to wake.
        let _ = self.fallback.refund(lease, now);
    }

    /// The replicas alive changed: the fallback's share follows.
    pub(crate) fn reshare(&self, replicas: u64, now: Instant) {
        let replicas = replicas.max(1);
        let mut sync = self.sync_state();
        if sync.share_of == replicas {
            return;
        }
        sync.share_of = replicas;
        drop(sync);
        let (rate, capacity) = (self.rate_per_minute(), self.capacity());
        if let Some((rate_share, capacity_share)) = share(rate, capacity, replicas) {
            // The fallback registers no waiters: nobody to wake.
            let _ = self.fallback.set_limits(rate_share, capacity_share, now);
        }
    }

    /// `/admin/cluster`'s view of this lease.
    pub(crate) fn status(&self) -> LeaseStatus {
        let sync = self.sync_state();
        LeaseStatus {
            key: self.key.clone(),
            rate_per_minute: self.rate_per_minute(),
            lease: self.lease.load(Ordering::Relaxed),
            target: self.target.load(Ordering::Relaxed),
            max_lease: max_lease(self.capacity(), self.link.replicas()),
            owed: self.owed.load(Ordering::Relaxed),
            demand_per_sec: sync.demand_per_sec,
            remaining: self.remaining.load(Ordering::Relaxed),
            fallback_rate_per_minute: self.fallback.rate_per_minute(),
        }
    }

    /// Samples the demand and returns the lease target and whether the Redis
    /// level is due for a look.
    fn plan(&self, now: Instant, replicas: u64, force_return: bool) -> (u64, bool) {
        let asked = self.demand.swap(0, Ordering::AcqRel);
        let mut sync = self.sync_state();
        let dt = now.saturating_duration_since(sync.sampled_at).as_secs_f64();
        if dt > 0.0 {
            #[allow(clippy::cast_precision_loss)] // a demand estimate
            let sample = asked as f64 / dt;
            let alpha = 1.0 - (-dt / DEMAND_TAU.as_secs_f64()).exp();
            sync.demand_per_sec += alpha * (sample - sync.demand_per_sec);
            sync.sampled_at = now;
        }
        // Rounded down, so a demand that fades returns the whole lease (an
        // EWMA only approaches zero). A top-up lands a round trip after it
        // is sent, and the next one is sent a period later: against a slow
        // Redis the lease covers those round trips too, or the limits it
        // would cover send requests on the slow path (each a round trip,
        // and a request has 250 ms for all of them).
        let horizon = HORIZON + self.link.round_trip() * 2;
        let wanted = (sync.demand_per_sec * horizon.as_secs_f64()).floor();
        // Saturating float-to-int: NaN is 0, beyond u64 is u64::MAX.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let wanted = wanted as u64;
        let target = if force_return {
            0
        } else {
            wanted.min(max_lease(self.capacity(), replicas))
        };
        self.target.store(target, Ordering::Relaxed);
        let refresh_due = sync
            .refreshed_at
            .is_none_or(|at| now.saturating_duration_since(at) >= REFRESH);
        (target, refresh_due)
    }

    /// `TooLarge` for more tokens than the bucket can ever hold (413, decided
    /// without Redis).
    fn fits(&self, n: u64) -> Result<(), ReserveError> {
        let capacity = self.capacity();
        if n > capacity {
            return Err(ReserveError::TooLarge { capacity });
        }
        Ok(())
    }

    /// The fallback bucket decides (Redis down or too slow).
    fn reserve_fallback(
        &self,
        n: u64,
        now: Tick,
        max_wait: Duration,
    ) -> Result<(Duration, ReportTriple), ReserveError> {
        // The cluster's capacity, not the fallback's share of it: a request
        // the limit admits is never refused as too large because Redis is
        // gone (a review saw a 413 for 301 tokens against a limit of 600,
        // the share of two replicas being 300). One larger than the share
        // waits until the share is full and takes it into debt.
        let capacity = self.capacity();
        self.fallback
            .reserve_and_report_up_to(n, now, max_wait, capacity)
            .map(|(wait, (_, remaining, reset))| (wait, (capacity, remaining, reset)))
    }

    /// The fallback's level comes down to this replica's share of the Redis
    /// level when it is above it, debt included. It is never raised: a
    /// report may predate requests the fallback admitted while Redis was
    /// slow (their charges still on the way), and raising it would hand
    /// those tokens out again. The fallback refills at its own share of the
    /// rate meanwhile.
    ///
    /// Compared by the time until full, not by `remaining` (which stops at
    /// 0): the share (`capacity / N` refilling at `rate / N`) of a level is
    /// full exactly when the bucket is, so a bucket in debt, whose tokens
    /// are already promised to waiters scheduled for later, puts the
    /// fallback in debt by its share too, and an outage does not admit its
    /// share again beside those waiters (a review saw 15 admitted in 7 s
    /// against 9 when the fallback started from 0 instead).
    ///
    /// The shares are whole tokens, so the two comparisons can disagree: a
    /// rate share rounded down (5 a minute over 2 replicas: 2) refills more
    /// slowly, so the same time until full leaves more tokens than the
    /// level's share. The larger of the two corrections is charged, so the
    /// fallback is left at neither more than `remaining / N` nor a shorter
    /// time until full than Redis'.
    fn follow_level(&self, report: Report, now: impl Into<Tick> + Copy) {
        let behind = report.reset.saturating_sub(self.fallback.reset_after(now));
        // Rounded up: the fallback is never left above Redis' share.
        let rate = u128::from(self.fallback.rate_per_minute());
        let by_time = (behind.as_nanos() * rate).div_ceil(60_000_000_000);
        let by_time = u64::try_from(by_time).unwrap_or(u64::MAX);
        let share_of = self.sync_state().share_of.max(1);
        let by_level = self
            .fallback
            .remaining(now)
            .saturating_sub(report.remaining / share_of);
        let tokens = by_time.max(by_level);
        if tokens > 0 {
            self.fallback.charge(tokens, now);
        }
    }

    /// A reservation Redis answered at `answered` waits `wait`: refunds
    /// before then go back to Redis (see [`refund`](Self::refund)).
    fn scheduled(&self, answered: Tick, wait: Duration) {
        let wait = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        self.scheduled_until
            .fetch_max(answered.nanos().saturating_add(wait), Ordering::AcqRel);
    }

    /// Keeps the level Redis just reported, for the headers.
    fn store_report(&self, report: Report, at: Tick) {
        self.remaining.store(report.remaining, Ordering::Relaxed);
        let reset = u64::try_from(report.reset.as_nanos()).unwrap_or(u64::MAX);
        self.full_at
            .store(at.nanos().saturating_add(reset), Ordering::Relaxed);
    }

    /// The headers' view: the level Redis last reported plus the lease.
    fn cached_report(&self, lease: u64, now: Tick) -> ReportTriple {
        let capacity = self.capacity();
        let remaining = self
            .remaining
            .load(Ordering::Relaxed)
            .saturating_add(lease)
            .min(capacity);
        let full_at = self.full_at.load(Ordering::Relaxed);
        let reset = Duration::from_nanos(full_at.saturating_sub(now.nanos()));
        (capacity, remaining, reset)
    }

    fn params(&self) -> Params {
        *self.params.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sync_state(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.sync.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where a slow-path call's answer meets its waiter. Whichever of the two
/// comes second settles, under the lock: the call's task hands the answer
/// over while the waiter still waits, or settles it by what the waiter
/// decided without it (`SharedBucket::settle_unread`).
#[derive(Debug, Default)]
struct Pending {
    state: Mutex<Handoff>,
    /// Notified when an answer is handed over.
    answered: tokio::sync::Notify,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, Handoff> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a slow-path call's waiter and its task know of each other.
#[derive(Debug, Default)]
enum Handoff {
    /// Neither has come yet.
    #[default]
    Waiting,
    /// Redis answered (or failed) before the waiter decided.
    Answered(Result<Reserved, String>),
    /// The waiter decided without the answer: whether the fallback
    /// admitted the request (`false` too when its client left).
    Decided(bool),
}

/// The waiter's end of a slow-path call. Dropped while still open (its
/// client left), it settles an answer that came meanwhile or records that
/// nothing was admitted; and it gives back the lease's part of the request
/// unless the request was admitted.
struct AnswerSlot {
    pending: Arc<Pending>,
    bucket: Arc<SharedBucket>,
    /// The tokens asked of Redis, and the link's epoch then.
    ask: u64,
    epoch: u64,
    /// Until the waiter has read the answer or decided without it.
    open: bool,
    /// The tokens the lease paid towards the request; zeroed once spent.
    from_lease: u64,
}

impl AnswerSlot {
    /// Waits for the answer.
    async fn answer(&mut self) -> Result<Reserved, String> {
        loop {
            if let Handoff::Answered(outcome) = std::mem::take(&mut *self.pending.lock()) {
                self.open = false;
                return outcome;
            }
            // A notification sent since the look is kept for this wait.
            self.pending.answered.notified().await;
        }
    }

    /// The wait ran out: `fallback` decides, unless the answer has come
    /// after all (returned as `Err`, to be read as any answer).
    fn decide(
        &mut self,
        fallback: impl FnOnce() -> Result<(Duration, ReportTriple), ReserveError>,
    ) -> Result<Result<(Duration, ReportTriple), ReserveError>, Result<Reserved, String>> {
        let mut state = self.pending.lock();
        if let Handoff::Answered(outcome) = std::mem::take(&mut *state) {
            self.open = false;
            return Err(outcome);
        }
        let decided = fallback();
        *state = Handoff::Decided(decided.is_ok());
        self.open = false;
        if decided.is_ok() {
            // Spent: with what Redis is charged for the rest, Redis counts
            // the whole request.
            self.from_lease = 0;
        }
        Ok(decided)
    }
}

impl Drop for AnswerSlot {
    fn drop(&mut self) {
        if self.open {
            let unread = {
                let mut state = self.pending.lock();
                match std::mem::take(&mut *state) {
                    Handoff::Answered(outcome) => Some(outcome),
                    Handoff::Waiting | Handoff::Decided(_) => {
                        *state = Handoff::Decided(false);
                        None
                    }
                }
            };
            if let Some(outcome) = unread {
                self.bucket
                    .settle_unread(self.ask, self.epoch, &outcome, false);
            }
        }
        if self.from_lease > 0 {
            self.bucket
                .refund_taken(self.from_lease, Tick::from(Instant::now()), self.epoch);
        }
    }
}

/// The most one replica's lease may hold: [`LEASE_PERCENT`] % of the
/// capacity, split over the replicas alive (rounded down: a bucket too small
/// to split gets no lease, and every request asks Redis).
pub(crate) fn max_lease(capacity: u64, replicas: u64) -> u64 {
    let all = u128::from(capacity) * u128::from(LEASE_PERCENT) / 100;
    u64::try_from(all / u128::from(replicas.max(1))).unwrap_or(u64::MAX)
}

/// This replica's share of a limit (SPEC: `rate / replicas last seen`), at
/// least one token per minute and one token of capacity.
fn share(
    rate_per_minute: u64,
    capacity: u64,
    replicas: u64,
) -> Option<(std::num::NonZeroU64, std::num::NonZeroU64)> {
    let replicas = replicas.max(1);
    let rate = std::num::NonZeroU64::new((rate_per_minute / replicas).max(1))?;
    let capacity = std::num::NonZeroU64::new((capacity / replicas).max(1))?;
    Some((rate, capacity))
}

#[cfg(test)]
mod tests {
    use redis::aio::{ConnectionManager, ConnectionManagerConfig};

    use super::*;
    use crate::cluster::test_redis::TestRedis;

    /// A link marked up that never connects, and a 6000/min bucket of 6000
    /// on it.
    fn bucket_on_an_up_link(now: Instant) -> (Arc<Link>, SharedBucket) {
        let link = link();
        link.set_up(true);
        let bucket = SharedBucket::new("k".to_owned(), link.clone(), 6000, 6000, now)
            .expect("exact in Redis");
        (link, bucket)
    }

    /// A shared bucket on a link to `redis` that is up, with weir's own
    /// response timeout (1 s).
    async fn bucket_on(
        redis: &TestRedis,
        rate_per_minute: u64,
        capacity: u64,
    ) -> Arc<SharedBucket> {
        let client = redis::Client::open(redis.url.as_str()).expect("test URL parses");
        let config =
            ConnectionManagerConfig::new().set_response_timeout(Some(Duration::from_secs(1)));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .expect("test redis answers");
        let link = Arc::new(Link::new(conn));
        link.set_up(true);
        let bucket = SharedBucket::new(
            "k".to_owned(),
            link,
            rate_per_minute,
            capacity,
            Instant::now(),
        );
        Arc::new(bucket.expect("exact in Redis"))
    }

    /// [`SharedBucket::reserve_slow`], waiting for Redis' answer for up to
    /// 10 s: for the tests of what Redis decides. The slow path's own wait
    /// is 20 ms, and a loaded machine that runs the test again only after
    /// that would have the fallback decide instead.
    async fn redis_decides(
        bucket: &Arc<SharedBucket>,
        n: u64,
        now: Tick,
        max_wait: Duration,
    ) -> Result<(Duration, ReportTriple), ReserveError> {
        let until = Instant::now() + Duration::from_secs(10);
        bucket.reserve_slow_until(n, now, max_wait, until).await
    }

    /// A link that never connects (the connection is lazy and unused).
    fn link() -> Arc<Link> {
        let client = redis::Client::open("redis://127.0.0.1:1/").expect("URL parses");
        let conn = ConnectionManager::new_lazy_with_config(client, ConnectionManagerConfig::new())
            .expect("lazy connection");
        Arc::new(Link::new(conn))
    }

    /// A lease covers the demand over `HORIZON` and two of Redis' round
    /// trips, within the cap (1 % of the capacity over the replicas).
    #[tokio::test(start_paused = true)]
    async fn a_slow_redis_gets_leases_that_cover_its_round_trips() {
        let link = link();
        let bucket =
            SharedBucket::new("k".to_owned(), link.clone(), 60_000, 60_000, Instant::now())
                .expect("exact in Redis");
        // 100 tokens asked in 1 s: a demand of 63.2/s (the EWMA's first step).
        bucket.demand.store(100, Ordering::Release);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            bucket.plan(Instant::now(), 1, false).0,
            12,
            "63.2/s × 200 ms"
        );
        link.observe_round_trip(Duration::from_millis(150));
        assert_eq!(
            bucket.plan(Instant::now(), 1, false).0,
            31,
            "63.2/s × 500 ms"
        );
        // Within the cap: 1 % of 60,000 over 20 replicas.
        assert_eq!(bucket.plan(Instant::now(), 20, false).0, 30);
    }

    /// Tokens the fallback lent during an outage, refunded after Redis is
    /// back, must not top up the shared bucket (which never lent them);
    /// tokens taken while Redis is up still come back to the lease.
    #[tokio::test]
    async fn a_refund_across_a_change_of_the_link_is_dropped() {
        let link = link();
        let now = Instant::now();
        let bucket = SharedBucket::new("k".to_owned(), link.clone(), 6000, 6000, now)
            .expect("exact in Redis");
        let down = bucket.epoch();
        let taken = bucket.try_reserve(3000, now.into(), Duration::ZERO);
        assert!(matches!(taken, Some(Ok(_))), "the fallback decides");
        assert_eq!(bucket.fallback.remaining(now), 3000);
        link.set_up(true);
        assert_ne!(bucket.epoch(), down);
        bucket.refund_taken(2990, now.into(), down);
        assert_eq!(
            bucket.lease.load(Ordering::Acquire),
            0,
            "nothing lent, nothing back"
        );
        assert_eq!(bucket.fallback.remaining(now), 3000);
        bucket.refund_taken(10, now.into(), bucket.epoch());
        assert_eq!(
            bucket.lease.load(Ordering::Acquire),
            10,
            "taken while up: back"
        );
        // Down and up again is a new epoch too.
        let up = bucket.epoch();
        link.set_up(false);
        link.set_up(true);
        bucket.refund_taken(10, now.into(), up);
        assert_eq!(bucket.lease.load(Ordering::Acquire), 10);
    }

    /// A slow-path call Redis runs after its waiter stopped listening still
    /// took tokens in Redis. If the waiter's client left, they come back to
    /// the lease, so Redis being slow for a moment does not leave the
    /// cluster under-admitting. If the fallback admitted the request, they
    /// stay taken: they are that request's charge, and giving them back
    /// would let the cluster spend them twice (a review saw two replicas
    /// admit 610 and 619 against a burst of 300 behind a 30 ms Redis).
    #[tokio::test]
    async fn tokens_redis_takes_after_the_waiter_left_come_back_unless_the_fallback_admitted() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let now = Instant::now();
        // A bucket of 6000 that refills 1 token/s, so its level reads the
        // same for a while after the calls ran.
        let bucket = bucket_on(&redis, 60, 6000).await;
        // Redis holds every client's commands for a while (under the
        // connection's 1 s response timeout).
        let mut admin = redis.connect().await;
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(800)
            .query_async::<()>(&mut admin)
            .await
            .expect("CLIENT PAUSE");
        // One waiter times out: the fallback admits it.
        let timed_out = bucket.reserve_slow(1000, now.into(), Duration::ZERO).await;
        assert!(timed_out.is_ok(), "the fallback decides: {timed_out:?}");
        // Another one's client leaves while Redis holds the call. Its own
        // wait for Redis is long (10 s), so the client leaving is what ends
        // it however late this thread runs again: with the slow path's
        // 20 ms, a loaded machine that ran it only past 20 ms found both
        // deadlines gone, and `timeout` polls the call first, whose wait
        // had run out: the fallback admitted the request ("still waiting
        // when it left", 8 of 190 loaded runs).
        let left = tokio::time::timeout(
            Duration::from_millis(5),
            bucket.reserve_slow_until(
                500,
                now.into(),
                Duration::ZERO,
                Instant::now() + Duration::from_secs(10),
            ),
        )
        .await;
        assert!(left.is_err(), "still waiting when it left");
        assert_eq!(bucket.lease.load(Ordering::Acquire), 0);
        // Once Redis runs the held calls, what the left client's took comes
        // back; the admitted one's stays taken.
        let deadline = Instant::now() + Duration::from_secs(5);
        while bucket.lease.load(Ordering::Acquire) != 500 {
            assert!(
                Instant::now() < deadline,
                "lease {} after the pause",
                bucket.lease.load(Ordering::Acquire)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Returning the lease leaves Redis charged for the admitted request
        // alone.
        bucket
            .sync(Instant::now(), true)
            .await
            .expect("Redis answers");
        assert_eq!(bucket.lease.load(Ordering::Acquire), 0);
        assert_eq!(bucket.owed.load(Ordering::Acquire), 0);
        let (_, remaining, _) = bucket.report(Instant::now().into());
        // Plus what refilled since the calls ran (1/s).
        assert!(
            (5000..5010).contains(&remaining),
            "1000 of 6000 spent, once: {remaining}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(bucket.lease.load(Ordering::Acquire), 0, "nothing more back");
    }

    /// A request the lease cannot cover alone takes what the lease holds and
    /// asks Redis for the rest only: tokens parked in this replica's lease
    /// (a refund) do not make it refuse what they and Redis' level cover
    /// together (a review saw a 429 with `Retry-After: 4` beside a lease of
    /// 93 and a level of 44, for 117 tokens). A refusal gives the lease's
    /// part back.
    #[tokio::test]
    async fn the_slow_path_spends_the_lease_before_asking_redis() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let now = Instant::now();
        // Refilling 1 token a minute: the levels below hold still.
        let bucket = bucket_on(&redis, 1, 1000).await;
        let drained = redis_decides(&bucket, 956, now.into(), Duration::ZERO).await;
        assert!(drained.is_ok(), "{drained:?}");
        bucket.lease.store(93, Ordering::Release);
        let covered = redis_decides(&bucket, 117, now.into(), Duration::ZERO).await;
        let (wait, (_, remaining, _)) = covered.expect("93 held and 44 in Redis cover 117");
        assert_eq!(wait, Duration::ZERO);
        assert_eq!(remaining, 20, "Redis gave the other 24");
        assert_eq!(bucket.lease.load(Ordering::Acquire), 0);
        bucket.lease.store(10, Ordering::Release);
        let refused = redis_decides(&bucket, 50, now.into(), Duration::ZERO).await;
        assert!(
            matches!(refused, Err(ReserveError::WouldWait { .. })),
            "{refused:?}"
        );
        assert_eq!(bucket.lease.load(Ordering::Acquire), 10, "given back");
    }

    /// A waiter Redis scheduled for later (the bucket in debt) that gives
    /// up returns its slot to Redis, which moves the shared `tat` back: the
    /// next request gets that slot, never the tokens at once (a review saw
    /// 27-29 admitted against 22 when the refund went to the lease and the
    /// next request spent it with queue_ms=0).
    #[tokio::test]
    async fn a_cancelled_waiters_slot_is_not_spent_before_its_instant() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let bucket = bucket_on(&redis, 60, 2).await;
        let max_wait = Duration::from_secs(60);
        let mut slots = Vec::new();
        for _ in 0..4 {
            let now = Instant::now();
            let (wait, _) = redis_decides(&bucket, 1, now.into(), max_wait)
                .await
                .expect("queued in Redis");
            slots.push(now + wait);
        }
        // Slots 0, 0, 1 s, 2 s: the last waiter gives up (its client left)
        // while the bucket is in debt.
        let last = *slots.last().expect("four slots");
        assert!(last > Instant::now() + Duration::from_secs(1), "{slots:?}");
        bucket.refund_taken(1, Instant::now().into(), bucket.epoch());
        assert_eq!(bucket.lease.load(Ordering::Acquire), 0, "not spendable");
        let now = Instant::now();
        assert!(
            bucket.try_reserve(1, now.into(), max_wait).is_none(),
            "the lease does not admit it at once"
        );
        // The top-up returns it to Redis, and the next request is scheduled
        // in the freed slot, not before it (give or take the round trips
        // the instants were read across).
        bucket
            .sync(Instant::now(), false)
            .await
            .expect("Redis answers");
        let now = Instant::now();
        let (wait, _) = redis_decides(&bucket, 1, now.into(), max_wait)
            .await
            .expect("queued in Redis");
        let trips = Duration::from_millis(200);
        assert!(now + wait + trips >= last, "{wait:?} for {slots:?}");
        assert_eq!(bucket.lease.load(Ordering::Acquire), 0);
    }

    /// A slow Redis does not make a request queue past its `max_wait`: it
    /// is asked for a wait that still fits once the round trip back is
    /// added (a review saw `queue_ms` 1162 with `queue_timeout = "1s"` and
    /// Redis 120 ms away, as Redis allowed the whole second from its own
    /// "now"). Redis is local here; the link is told it is 300 ms away.
    #[tokio::test]
    async fn a_slow_redis_is_asked_for_a_wait_that_leaves_room_for_the_trip_back() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        // 60 a minute, burst 1: after the first, one a second.
        let bucket = bucket_on(&redis, 60, 1).await;
        let max_wait = Duration::from_millis(1500);
        let (first, _) = redis_decides(&bucket, 1, Instant::now().into(), max_wait)
            .await
            .expect("the burst");
        assert_eq!(first, Duration::ZERO);
        bucket.link.observe_round_trip(Duration::from_millis(300));
        // The next token is due in 1 s: 1.3 s with the trip back.
        let second = redis_decides(&bucket, 1, Instant::now().into(), max_wait).await;
        assert!(second.is_ok(), "{second:?}");
        // The one after is due in 2 s: 2.3 s with the trip back, past a
        // max_wait of 2.1 s, so refused with its wait (Redis asked for all
        // 2.1 s would have queued it).
        let third = redis_decides(
            &bucket,
            1,
            Instant::now().into(),
            Duration::from_millis(2100),
        )
        .await;
        assert!(
            matches!(third, Err(ReserveError::WouldWait { wait }) if wait > Duration::from_millis(1800)),
            "{third:?}"
        );
        // With room for the trip back it is queued.
        let fourth = redis_decides(
            &bucket,
            1,
            Instant::now().into(),
            Duration::from_millis(2500),
        )
        .await;
        assert!(fourth.is_ok(), "{fourth:?}");
    }

    /// Another bucket's refusal asks this one how long it would make the
    /// request wait, from Redis' last report: the part of a token refilled
    /// since counts (a review saw 10 s, a whole token at 6 a minute, for a
    /// wait of 3 s), and the lease covers its share.
    #[tokio::test]
    async fn wait_for_counts_the_part_of_a_token_already_refilled() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        // 6 a minute, burst 1: one token every 10 s.
        let bucket = bucket_on(&redis, 6, 1).await;
        let taken = redis_decides(&bucket, 1, Instant::now().into(), Duration::ZERO).await;
        assert!(matches!(taken, Ok((Duration::ZERO, _))), "{taken:?}");
        // Redis reported the bucket full 10 s after it answered, which came
        // before this reading.
        let later = Instant::now() + Duration::from_secs(7);
        let wait = bucket.wait_for(1, later.into()).expect("fits");
        assert!(wait <= Duration::from_secs(3), "{wait:?}");
        assert!(wait > Duration::ZERO, "not refilled yet");
        let full = later + Duration::from_secs(3);
        assert_eq!(bucket.wait_for(1, full.into()), Ok(Duration::ZERO));
        bucket.lease.store(1, Ordering::Release);
        assert_eq!(bucket.wait_for(1, later.into()), Ok(Duration::ZERO));
    }

    /// With Redis down, a request the limit admits is not refused as too
    /// large for this replica's share of it: at 600 a minute shared by two,
    /// 301 tokens wait for the share (300) to be full and take it into
    /// debt (a review saw a permanent 413 while Redis was down).
    #[tokio::test]
    async fn the_fallback_admits_what_the_limit_admits_beyond_its_share() {
        let now = Instant::now();
        let bucket =
            SharedBucket::new("k".to_owned(), link(), 600, 600, now).expect("exact in Redis");
        bucket.reshare(2, now);
        let tick = Tick::from(now);
        assert_eq!(bucket.wait_for(301, tick), Ok(Duration::ZERO));
        let admitted = bucket.try_reserve(301, tick, Duration::ZERO);
        assert!(
            matches!(admitted, Some(Ok((Duration::ZERO, (600, 0, _))))),
            "{admitted:?}"
        );
        // In debt by one token: the next one waits 2 tokens at 300/min.
        assert_eq!(
            bucket.try_reserve(1, tick, Duration::ZERO),
            Some(Err(ReserveError::WouldWait {
                wait: Duration::from_millis(400)
            }))
        );
        assert_eq!(
            bucket.try_reserve(601, tick, Duration::ZERO),
            Some(Err(ReserveError::TooLarge { capacity: 600 }))
        );
    }

    /// The fallback's level follows Redis' share down, never up: a report
    /// may predate what the fallback admitted while Redis was slow. Going
    /// down, it keeps that level and adds the lease.
    #[tokio::test]
    async fn redis_answers_lower_the_fallback_and_never_raise_it() {
        let now = Instant::now();
        let (link, bucket) = bucket_on_an_up_link(now);
        // Redis was too slow: the fallback admitted 1000.
        assert!(bucket
            .reserve_fallback(1000, now.into(), Duration::ZERO)
            .is_ok());
        assert_eq!(bucket.fallback.remaining(now), 5000);
        // A report from before that admission reached Redis (at 6000 a
        // minute, 3000 tokens refill in 30 s).
        let level = |remaining: u64| Report {
            remaining,
            reset: Duration::from_millis(10 * (6000 - remaining)),
        };
        bucket.follow_level(level(6000), now);
        assert_eq!(bucket.fallback.remaining(now), 5000, "not raised");
        bucket.follow_level(level(3000), now);
        assert_eq!(bucket.fallback.remaining(now), 3000, "lowered");
        bucket.lease.store(40, Ordering::Release);
        link.set_up(false);
        bucket.enter_fallback(now);
        assert_eq!(
            bucket.fallback.remaining(now),
            3040,
            "its level and the lease"
        );
        assert_eq!(bucket.lease.load(Ordering::Acquire), 0);
    }

    /// A rate the replicas do not divide (5 a minute over 2: a share of 2 a
    /// minute, burst 10 of 20) leaves the fallback at the level's share
    /// when Redis is empty, not at what the same time until full would hold
    /// at the slower share (a review worked out 2 tokens each, 4 admitted at
    /// once by an outage that should admit none).
    #[tokio::test]
    async fn the_fallback_follows_the_level_when_the_rate_share_rounds_down() {
        let now = Instant::now();
        let link = link();
        link.set_up(true);
        let bucket = SharedBucket::new("k".to_owned(), link, 5, 20, now).expect("exact in Redis");
        bucket.reshare(2, now);
        assert_eq!(bucket.fallback.remaining(now), 10);
        // Redis empty: 20 tokens at 5 a minute are full in 240 s.
        let empty = Report {
            remaining: 0,
            reset: Duration::from_secs(240),
        };
        bucket.follow_level(empty, now);
        assert_eq!(bucket.fallback.remaining(now), 0, "the level's share");
        assert!(bucket.fallback.reset_after(now) >= Duration::from_secs(240));
    }

    /// A bucket in debt (its tokens promised to waiters Redis scheduled
    /// for later) seeds the fallback in debt too: with Redis gone, the
    /// fallback admits nothing before the waiters' slots are paid for (a
    /// review saw 15 admitted in 7 s against 2 + 7 when it started from the
    /// `remaining` of 0 Redis reports for any debt).
    #[tokio::test]
    async fn the_fallback_seeded_from_a_bucket_in_debt_waits_for_the_debt() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        // 60 a minute, burst 2: ten queued take slots 0, 0, 1 s, ... 8 s.
        // Two replicas: the fallback's share is 30 a minute, burst 1.
        let bucket = bucket_on(&redis, 60, 2).await;
        bucket.reshare(2, Instant::now());
        let max_wait = Duration::from_secs(60);
        let mut last = Instant::now();
        for _ in 0..10 {
            let now = Instant::now();
            let (wait, _) = redis_decides(&bucket, 1, now.into(), max_wait)
                .await
                .expect("queued in Redis");
            last = now + wait;
        }
        assert!(last > Instant::now() + Duration::from_secs(7), "in debt");
        // Redis goes away: the fallback decides.
        bucket.link.set_up(false);
        bucket.enter_fallback(Instant::now());
        let now = Instant::now();
        let (wait, _) = bucket
            .try_reserve(1, now.into(), max_wait)
            .expect("the fallback decides")
            .expect("within the queue timeout");
        assert!(
            now + wait > last,
            "admitted before the debt is paid: {wait:?}"
        );
        // Within the queue timeout it is refused, saying when.
        let refused = bucket.try_reserve(1, Instant::now().into(), Duration::from_secs(1));
        assert!(
            matches!(refused, Some(Err(ReserveError::WouldWait { wait })) if wait > Duration::from_secs(7)),
            "{refused:?}"
        );
    }

    /// An answer nobody read: kept as the charge of a request the fallback
    /// admitted (owed if Redis refused it), given back otherwise, and never
    /// owed across a change of the link.
    #[tokio::test]
    async fn an_unread_answer_is_settled_by_what_the_fallback_decided() {
        let (link, bucket) = bucket_on_an_up_link(Instant::now());
        let report = Report {
            remaining: 10,
            reset: Duration::ZERO,
        };
        let taken = Ok(Reserved::Taken {
            wait: Duration::ZERO,
            report,
        });
        let refused = Ok(Reserved::WouldWait {
            wait: Duration::from_secs(1),
            report,
        });
        let epoch = bucket.epoch();
        bucket.settle_unread(7, epoch, &taken, true);
        assert_eq!(bucket.lease.load(Ordering::Acquire), 0, "the charge stands");
        assert_eq!(bucket.owed.load(Ordering::Acquire), 0);
        bucket.settle_unread(7, epoch, &refused, true);
        assert_eq!(bucket.owed.load(Ordering::Acquire), 7, "owed to Redis");
        bucket.settle_unread(5, epoch, &taken, false);
        assert_eq!(bucket.lease.load(Ordering::Acquire), 5, "given back");
        bucket.settle_unread(3, epoch, &refused, false);
        assert_eq!(bucket.owed.load(Ordering::Acquire), 7, "nothing to settle");
        // A call that failed may or may not have run: owed, as charging
        // twice can only under-admit.
        bucket.settle_unread(2, epoch, &Err("reset".to_owned()), true);
        assert_eq!(bucket.owed.load(Ordering::Acquire), 9);
        bucket.settle_unread(2, epoch, &Err("reset".to_owned()), false);
        assert_eq!(bucket.owed.load(Ordering::Acquire), 9);
        link.set_up(false);
        bucket.settle_unread(7, epoch, &refused, true);
        assert_eq!(
            bucket.owed.load(Ordering::Acquire),
            9,
            "the fallback's share counted it"
        );
    }
}
