//! Passive outlier detection, judged from live traffic (Envoy's outlier
//! detection): `consecutive_failures` connect errors, resets, 5xx or
//! timeouts in a row eject a backend for `ejection_time` × its ejection
//! count (capped at 5 minutes; the count decays by one per `ejection_time`
//! out of ejection, see `HealthRecord::eject`); a refused connection is a connect error like
//! any other, one of the `consecutive_failures` (SPEC's `[outlier]`); never
//! more than `max_ejection_percent` of a model's backends are ejected. An
//! upstream 429 takes the backend out of rotation for its `Retry-After`.
//!
//! The request path reports each attempt's outcome here: its headers (a
//! lock-free EMA update), then its body's clean end (one atomic load), or a
//! failure at either point; only a failure that ejects
//! takes the health record's lock and wakes the snapshot supervisor.

use std::{sync::atomic::Ordering, time::Duration};

use tokio::time::Instant;

use super::state::HealthState;
use crate::{
    gateway::Shared,
    snapshot::{BackendState, Snapshot},
};

/// What one attempt on a backend showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Response headers arrived (any status but 5xx and 429) after this
    /// long: feeds the latency average. The failure count waits for the
    /// body's end ([`Outcome::Completed`]).
    Answered(Duration),
    /// The answer's body ended cleanly: consecutive failures start over.
    /// Not at the headers, or a backend whose bodies always break after
    /// them (a cut stream, a broken chunk) would count 0, 1, 0, 1 and
    /// never be ejected.
    Completed,
    /// Connect error (refused too), reset, timeout or 5xx.
    Failure,
    /// An upstream 429: out of rotation for this long.
    RateLimited(Duration),
}

/// Records an attempt's outcome and ejects the backend when the rules say so.
pub(crate) fn report(
    shared: &Shared,
    snapshot: &Snapshot,
    backend: &BackendState,
    outcome: Outcome,
) {
    let live = &backend.live;
    match outcome {
        Outcome::Answered(latency) => live.observe_latency(latency),
        Outcome::Completed => {
            if live.consecutive_failures.load(Ordering::Relaxed) != 0 {
                live.consecutive_failures.store(0, Ordering::Relaxed);
            }
        }
        Outcome::Failure => {
            let failures = live
                .consecutive_failures
                .fetch_add(1, Ordering::AcqRel)
                .saturating_add(1);
            let threshold = snapshot.config.outlier.consecutive_failures.get();
            if failures >= threshold {
                try_eject(shared, snapshot, backend, failures);
            }
        }
        Outcome::RateLimited(wait) => {
            let until = Instant::now() + wait;
            // Drawn with a key a reload has replaced since (or before the
            // backend came back afresh): the old quota's, not this one's.
            // Read under the lock a reload bumps it under.
            let opened = live.with_health(|h| {
                let current = backend.sent_with_current_key();
                // A window already over is not recorded: the clock would
                // later announce it as ended.
                if current && !wait.is_zero() {
                    h.rate_limit_until(until);
                }
                current
            });
            if opened && wait.is_zero() {
                // `Retry-After: 0`, or a date already past: no window.
                tracing::info!(backend = %backend.config.name, "backend rate-limited weir with a Retry-After already over; it stays in rotation");
            } else if opened {
                tracing::info!(backend = %backend.config.name, retry_after = ?wait, "backend rate-limited weir; out of rotation until its Retry-After");
                shared.rebuild.notify_one();
            } else {
                tracing::debug!(backend = %backend.config.name, "a 429 drawn before the backend's key changed opens no window");
            }
        }
    }
}

/// Ejects `backend` unless it already is, or unless that would eject too
/// large a share of one of its models' backends (Envoy's rule: allowed
/// while the share already ejected is below `max_ejection_percent`).
fn try_eject(shared: &Shared, snapshot: &Snapshot, backend: &BackendState, failures: u32) {
    let _one_at_a_time = shared.ejections.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if backend.live.health().state(now) == HealthState::Ejected {
        return;
    }
    let max_percent = u64::from(snapshot.config.outlier.max_ejection_percent);
    for model in &backend.config.models {
        let Some(route) = snapshot.model(model) else {
            continue;
        };
        // The share is of the backends that serve: one of weight 0 never
        // takes a request, so counting it would let every serving one go.
        let serving = || route.members.iter().filter(|m| m.backend.config.weight > 0);
        let total = serving().count() as u64;
        let ejected = serving()
            .filter(|m| m.backend.live.health().state(now) == HealthState::Ejected)
            .count() as u64;
        if ejected * 100 >= max_percent * total {
            tracing::debug!(backend = %backend.config.name, model, "not ejected: max_ejection_percent reached");
            // Counting starts over (as after an ejection), so a failure storm
            // does not take the ejection lock on every failure.
            backend
                .live
                .consecutive_failures
                .store(0, Ordering::Relaxed);
            return;
        }
    }
    let ejection_time = snapshot.config.outlier.ejection_time;
    let until = backend.live.with_health(|h| h.eject(now, ejection_time));
    backend
        .live
        .consecutive_failures
        .store(0, Ordering::Relaxed);
    tracing::warn!(
        backend = %backend.config.name,
        failures,
        for_ms = until.saturating_duration_since(now).as_millis() as u64,
        "backend ejected by outlier detection"
    );
    shared.rebuild.notify_one();
}
