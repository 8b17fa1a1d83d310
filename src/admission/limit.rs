//! One rate limit as admission sees it: a [`Bucket`] of this process, or a
//! [`SharedBucket`] whose level lives in Redis and is shared with the other
//! replicas (`[cluster]`, see `crate::cluster`).
//!
//! The local variant only forwards to the bucket (the enum match is all it
//! adds to the admission fast path). The shared variant decides most
//! requests as fast, from its lease; when it cannot, [`Limit::reserve`]
//! returns `None` and the limiter awaits [`Limit::reserve_slow`], the one
//! round trip to Redis.

use std::{sync::Arc, time::Duration};

use super::bucket::{Bucket, ReserveError, Tick};
use crate::cluster::SharedBucket;

/// `(rate per minute, remaining, reset)`, as `Bucket::report` returns it.
type Report = (u64, u64, Duration);

/// A requests or tokens limit: local or shared.
#[derive(Debug, Clone)]
pub enum Limit {
    /// Enforced by this process alone.
    Local(Arc<Bucket>),
    /// Enforced with the other replicas through Redis.
    Shared(Arc<SharedBucket>),
}

impl Limit {
    /// `Bucket::reserve_and_report` without a round trip; `None` when a
    /// shared limit must ask Redis ([`reserve_slow`](Self::reserve_slow)).
    #[inline]
    pub fn reserve_and_report(
        &self,
        n: u64,
        now: Tick,
        max_wait: Duration,
    ) -> Option<Result<(Duration, Report), ReserveError>> {
        match self {
            Limit::Local(bucket) => Some(bucket.reserve_and_report(n, now, max_wait)),
            Limit::Shared(shared) => shared.try_reserve(n, now, max_wait),
        }
    }

    /// `Bucket::reserve` without a round trip; `None` as above.
    #[inline]
    pub fn reserve(
        &self,
        n: u64,
        now: Tick,
        max_wait: Duration,
    ) -> Option<Result<Duration, ReserveError>> {
        match self {
            Limit::Local(bucket) => Some(bucket.reserve(n, now, max_wait)),
            Limit::Shared(shared) => shared
                .try_reserve(n, now, max_wait)
                .map(|r| r.map(|(wait, _)| wait)),
        }
    }

    /// The reservation [`reserve`](Self::reserve) could not make alone: a
    /// round trip to Redis for a shared limit (bounded; the fallback decides
    /// when Redis does not answer in time).
    pub async fn reserve_slow(
        &self,
        n: u64,
        now: Tick,
        max_wait: Duration,
    ) -> Result<(Duration, Report), ReserveError> {
        match self {
            Limit::Local(bucket) => bucket.reserve_and_report(n, now, max_wait),
            Limit::Shared(shared) => shared.reserve_slow(n, now, max_wait).await,
        }
    }

    /// `Bucket::wait_for` (for a shared limit, from its last known level).
    pub fn wait_for(&self, n: u64, now: Tick) -> Result<Duration, ReserveError> {
        match self {
            Limit::Local(bucket) => bucket.wait_for(n, now),
            Limit::Shared(shared) => shared.wait_for(n, now),
        }
    }

    /// `Bucket::refund`.
    pub fn refund(&self, n: u64, now: impl Into<Tick>) {
        match self {
            Limit::Local(bucket) => bucket.refund(n, now),
            Limit::Shared(shared) => shared.refund(n, now.into()),
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
