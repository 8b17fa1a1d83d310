//! Randomised delays, so that retries and probes do not synchronise: full
//! jitter for retry back-off (AWS's "Exponential Backoff and Jitter") and the
//! spread of probe schedules across replicas (SPEC "Health tiers").

use std::time::Duration;

/// A uniformly random duration in `[0, max]`.
pub(crate) fn up_to(max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::random_range(0..=nanos))
}
