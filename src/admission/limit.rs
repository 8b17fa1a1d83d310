//! One rate limit as admission sees it: a [`Bucket`] of this process, or a
//! [`SharedBucket`] whose level lives in Redis and is shared with the other
//! replicas (`[cluster]`, see `crate::cluster`).
//!
//! The local variant only forwards to the bucket (the enum match is all it
//! adds to the admission fast path). The shared variant decides most
//! requests as fast, from its lease; when it cannot,
//! [`Limit::reserve_in_line`] returns `None` and the limiter awaits
//! [`Limit::reserve_slow`], the one round trip to Redis.
//!
//! A local bucket also keeps its waiters in line (`bucket`, "Refunds and
//! waiters"): this is where the waiter a bucket hands back is woken, after
//! the bucket's lock is released. A shared limit's waits stay as given.

use std::{sync::Arc, task::Waker, time::Duration};

use super::bucket::{Bucket, Level, Report, ReserveError, Tick, Ticket};
use crate::cluster::SharedBucket;

/// A reservation made: the wait, the waiter's ticket when it must wait in
/// a local bucket, and the limit's state right after.
pub type Reserved = (Duration, Option<Ticket>, Reading);

/// A limit's state at one instant, for the `x-ratelimit-*` headers: a local
/// bucket's [`Level`] (its report, a division, is computed only for the
/// bucket the headers show) or a shared limit's report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reading {
    /// Read under a local bucket's lock.
    Local(Level),
    /// A shared limit's cached report.
    Shared(Report),
}

/// A requests or tokens limit: local or shared.
#[derive(Debug, Clone)]
pub enum Limit {
    /// Enforced by this process alone.
    Local(Arc<Bucket>),
    /// Enforced with the other replicas through Redis.
    Shared(Arc<SharedBucket>),
}

impl Limit {
    /// `Bucket::reserve_in_line` without a round trip; `None` when a shared
    /// limit must ask Redis ([`reserve_slow`](Self::reserve_slow)). A shared
    /// limit hands out no [`Ticket`]: its wait stays as given (it lives in
    /// Redis, where refunds cannot reach the other replicas' waiters).
    #[inline]
    pub fn reserve_in_line(
        &self,
        n: u64,
        now: Tick,
        max_wait: Duration,
    ) -> Option<Result<Reserved, ReserveError>> {
        match self {
            Limit::Local(bucket) => Some(
                bucket
                    .reserve_in_line(n, now, max_wait)
                    .map(|(wait, ticket, level)| (wait, ticket, Reading::Local(level))),
            ),
            Limit::Shared(shared) => shared
                .try_reserve(n, now, max_wait)
                .map(|r| r.map(|(wait, report)| (wait, None, Reading::Shared(report)))),
        }
    }

    /// The reservation [`reserve_in_line`](Self::reserve_in_line) could not make alone: a
    /// round trip to Redis for a shared limit (waiting for it until
    /// `until`; the fallback decides when Redis does not answer in time).
    pub async fn reserve_slow(
        &self,
        n: u64,
        now: Tick,
        max_wait: Duration,
        until: tokio::time::Instant,
    ) -> Result<(Duration, Report), ReserveError> {
        match self {
            Limit::Local(bucket) => bucket.reserve_and_report(n, now, max_wait),
            Limit::Shared(shared) => shared.reserve_slow_until(n, now, max_wait, until).await,
        }
    }

    /// `Bucket::wait_for`; for a shared limit, from the level Redis
    /// reports now, or by `until` (a round trip: for refusals only, boxed
    /// so a local limit's future stays small).
    pub async fn wait_for(
        &self,
        n: u64,
        now: Tick,
        until: tokio::time::Instant,
    ) -> Result<Duration, ReserveError> {
        match self {
            Limit::Local(bucket) => bucket.wait_for(n, now),
            Limit::Shared(shared) => Box::pin(shared.wait_exact(n, now, until)).await,
        }
    }

    /// How long a look at Redis may take (`SharedBucket::slow_path_wait`);
    /// `None` for a local limit, which never waits to be read.
    pub fn redis_wait(&self) -> Option<Duration> {
        match self {
            Limit::Local(_) => None,
            Limit::Shared(shared) => Some(shared.slow_path_wait()),
        }
    }

    /// `Bucket::refund`, waking the waiter it moved.
    pub fn refund(&self, n: u64, now: impl Into<Tick>) {
        match self {
            Limit::Local(bucket) => wake(bucket.refund(n, now)),
            Limit::Shared(shared) => shared.refund(n, now.into()),
        }
    }

    /// `Bucket::leave`: a waiter gives its tokens and its place back.
    pub fn leave(&self, ticket: Ticket, n: u64, now: impl Into<Tick>) {
        if let Limit::Local(bucket) = self {
            wake(bucket.leave(ticket, n, now));
        }
    }

    /// `Bucket::done`: a waiter's wait is over everywhere.
    pub fn done(&self, ticket: Ticket) {
        if let Limit::Local(bucket) = self {
            wake(bucket.done(ticket));
        }
    }

    /// `Bucket::turn`: how long the waiter with `ticket` still waits
    /// (`None`: not any more), keeping `waker` to wake it if that changes.
    pub fn turn(&self, ticket: Ticket, now: Tick, waker: &Waker) -> Option<Duration> {
        match self {
            Limit::Local(bucket) => {
                let (wait, next) = bucket.turn(ticket, now, waker);
                wake(next);
                wait
            }
            Limit::Shared(_) => None,
        }
    }

    /// The cluster link's epoch, for a shared limit (see
    /// [`SharedBucket::refund_taken`]).
    pub fn cluster_epoch(&self) -> Option<u64> {
        match self {
            Limit::Local(_) => None,
            Limit::Shared(shared) => Some(shared.epoch()),
        }
    }

    /// [`Limit::refund`] of tokens taken when the cluster link was at
    /// `epoch` (read before they were taken).
    pub fn refund_taken(&self, n: u64, now: impl Into<Tick>, epoch: Option<u64>) {
        match (self, epoch) {
            (Limit::Shared(shared), Some(epoch)) => shared.refund_taken(n, now.into(), epoch),
            _ => self.refund(n, now),
        }
    }

    /// `Bucket::charge`.
    pub fn charge(&self, n: u64, now: impl Into<Tick>) {
        match self {
            Limit::Local(bucket) => bucket.charge(n, now),
            Limit::Shared(shared) => shared.charge(n, now.into()),
        }
    }

    /// The limit's [`Reading`] at `now`.
    pub fn reading(&self, now: impl Into<Tick>) -> Reading {
        match self {
            Limit::Local(bucket) => Reading::Local(bucket.level(now)),
            Limit::Shared(shared) => Reading::Shared(shared.report(now.into())),
        }
    }

    /// `Bucket::report`.
    pub fn report(&self, now: impl Into<Tick>) -> Report {
        match self {
            Limit::Local(bucket) => bucket.report(now),
            Limit::Shared(shared) => shared.report(now.into()),
        }
    }

    /// Whole tokens available at `now` (`Bucket::remaining`).
    pub fn remaining(&self, now: impl Into<Tick>) -> u64 {
        self.report(now).1
    }

    /// Tokens added per minute.
    pub fn rate_per_minute(&self) -> u64 {
        match self {
            Limit::Local(bucket) => bucket.rate_per_minute(),
            Limit::Shared(shared) => shared.rate_per_minute(),
        }
    }

    /// Tokens the bucket holds when full.
    pub fn capacity(&self) -> u64 {
        match self {
            Limit::Local(bucket) => bucket.capacity(),
            Limit::Shared(shared) => shared.capacity(),
        }
    }
}

impl Reading {
    /// Whole tokens left: which of two limits of a kind is the tighter.
    pub fn remaining(&self) -> u64 {
        match self {
            Reading::Local(level) => level.remaining(),
            Reading::Shared((_, remaining, _)) => *remaining,
        }
    }

    /// `(capacity, remaining, reset)`, as `Bucket::report`.
    pub fn report(&self) -> Report {
        match self {
            Reading::Local(level) => level.report(),
            Reading::Shared(report) => *report,
        }
    }
}

/// Wakes the waiter a bucket handed back, now that its lock is released.
fn wake(waker: Option<Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}
