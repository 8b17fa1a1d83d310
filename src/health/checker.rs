//! The active checker: one task per backend and tier, jittered, with
//! HAProxy/Envoy rise/fall thresholds, and the supervisor that rebuilds the
//! snapshot whenever a backend's weight changed.
//!
//! Probe results go into the backend's [`HealthRecord`]; a change that
//! affects rotation wakes the supervisor, which builds a new `Snapshot` from
//! the current config and every backend's record and stores it with
//! `ArcSwap` (serialised with reloads by `Shared::build_lock`). While a slow
//! start ramps, or until an ejection or a 429 window ends, the supervisor
//! also rebuilds on a timer. Only transitions are logged, never samples.
//!
//! Tasks are owned: spawned into the gateway's probe `JoinSet`, each with a
//! cancellation token (a reload that removes a backend cancels it), and each
//! `select!`s on cancellation and its next deadline, so a five-minute deep
//! interval never delays shutdown.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    probes,
    state::{is_far_below, median, HealthRecord, HealthState, Tier},
};
use crate::{
    config::HealthConfig,
    gateway::Shared,
    jitter,
    snapshot::{BackendState, Snapshot},
};

/// How often the supervisor rebuilds while a slow start ramps.
const RAMP_STEP: Duration = Duration::from_millis(500);

/// Rebuilds the snapshot from the current config and every backend's health
/// and publishes it. Serialised with reloads, so neither overwrites the
/// other with a stale view.
pub(crate) fn rebuild(shared: &Shared) {
    let _serialised = shared.build_lock.lock().unwrap_or_else(|e| e.into_inner());
    let current = shared.snapshot.load_full();
    match Snapshot::build(current.config.clone(), Some(&current), &shared.metrics) {
        Ok(next) => {
            shared.metrics.publish_weights(&next);
            let slots = next.slots.clone();
            shared.snapshot.store(Arc::new(next));
            // Requests waiting for a slot look for a backend back.
            slots.announce();
        }
        // Building reuses every client, or (https, after a reload read
        // other CAs) builds one from CAs already read, so this cannot fail
        // in practice; if it did, the old snapshot keeps serving.
        Err(e) => tracing::error!(error = %e, "snapshot rebuild failed"),
    }
}

/// Rebuilds the snapshot when told to (a health change) and on the ramp and
/// ejection timers, until `stop` (cancelled once the listeners have ended,
/// so a request waiting through a shutdown's grace still sees a backend
/// come back). Logs each backend the clock brought
/// back (an ejection or a 429 window over), as Envoy's outlier log records
/// an uneject: the lines that took it out have their counterpart.
pub(crate) async fn supervise(shared: Arc<Shared>, stop: CancellationToken) {
    // A time no later than the current snapshot's own reading of the clock
    // (read before each build; a reload's build reads it later still): a
    // hold ending after it may have been in force when that snapshot was
    // built, so its end is still a change to wait for. Taking the time
    // after the build instead lost a hold that ended during the build: the
    // snapshot kept the backend at weight 0 with no timer left to bring it
    // back.
    let mut built = Instant::now();
    loop {
        let snapshot = shared.snapshot.load_full();
        let slow_start = snapshot.config.health.slow_start;
        let next_change = snapshot
            .backends()
            .iter()
            .filter_map(|b| b.live.health().next_change(built, slow_start))
            .min()
            .map(|t| t.min(Instant::now() + RAMP_STEP));
        drop(snapshot);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.rebuild.notified() => {}
            _ = sleep_until(next_change) => {}
        }
        let since = built;
        built = Instant::now();
        rebuild(&shared);
        log_returns(&shared.snapshot.load(), since, built);
    }
}

/// Logs the backends whose ejection or 429 window ended in `(since, now]`,
/// the last hold the clock had on them: back in rotation at `now`, or
/// still out by the active tiers, and why (their going down may not have
/// been logged: the backend was out already). Judged as the build judges
/// them (with health checks off, by passive state alone).
fn log_returns(snapshot: &Snapshot, since: Instant, now: Instant) {
    let checks = snapshot.config.health.enabled;
    for backend in snapshot.backends() {
        let ended = backend.live.with_health(|h| {
            let ended = h.hold_ended(since, now)?;
            Some((ended, checks.then(|| h.out_because()).flatten()))
        });
        match ended {
            Some((ended, None)) => {
                tracing::info!(backend = %backend.config.name, "backend back in rotation: {ended}");
            }
            Some((ended, Some(reason))) => {
                tracing::info!(backend = %backend.config.name, reason, "backend still out of rotation after {ended}");
            }
            None => {}
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Probes the liveness of backends a reload is about to add, all at once,
/// each within the liveness timeout, and records the results. Runs before
/// the reload publishes its snapshot (the old one keeps serving meanwhile):
/// a backend that passes enters rotation in the same swap that removes the
/// one it replaces, so changing a backend's URL or name leaves no gap
/// without a backend; one that fails stays pending, and its regular probes
/// (which start at once for a pending backend) let it in later.
///
/// Cancellation-safe: dropping it aborts the probes; their backends are in
/// no snapshot yet.
pub(crate) async fn probe_added(added: &[Arc<BackendState>], health: &HealthConfig) {
    let thresholds = (
        health.unhealthy_threshold.get(),
        health.healthy_threshold.get(),
    );
    let timeout = health.liveness.timeout;
    let mut probes = tokio::task::JoinSet::new();
    for backend in added {
        let backend = backend.clone();
        probes.spawn(async move {
            let before = backend.live.health();
            let at = Instant::now();
            let outcome = probes::liveness(&backend, timeout).await;
            observe(&backend, Tier::Liveness, &outcome, thresholds, |_| {});
            log_transition(
                &backend,
                Tier::Liveness,
                &before,
                &backend.live.health(),
                at,
            );
        });
    }
    while probes.join_next().await.is_some() {}
}

/// A backend's identity across snapshots (SPEC "Reload": name + url).
pub(crate) type BackendKey = (String, http::Uri);

fn key(backend: &BackendState) -> BackendKey {
    (backend.config.name.clone(), backend.config.url.clone())
}

/// Starts probe tasks for backends that have none and cancels those of
/// backends that are gone (or of all, when active checks are disabled).
/// `cas_changed` (a reload read other CAs) restarts the https backends'
/// probes, whose verdicts were drawn under the old CAs.
pub(crate) fn sync_probes(shared: &Arc<Shared>, cas_changed: bool) {
    let snapshot = shared.snapshot.load_full();
    let enabled = snapshot.config.health.enabled;
    let mut probes = shared.probes.lock().unwrap_or_else(|e| e.into_inner());
    // Reap tasks that finished (cancelled ones), so the set does not grow.
    while probes.set.try_join_next().is_some() {}
    probes.running.retain(|k, (token, _)| {
        let keep = enabled && snapshot.backends().iter().any(|b| key(b) == *k);
        if !keep {
            token.cancel();
            shared.metrics.forget_backend(&k.0);
        }
        keep
    });
    if !enabled {
        return;
    }
    // New intervals (a reload): restart every backend's probes, which then
    // probe within a tenth of the new interval instead of first sleeping
    // out the old one. Health records live in the backends, not the tasks.
    let intervals = Tier::ALL.map(|tier| interval(tier, &snapshot.config.health));
    if probes
        .intervals
        .replace(intervals)
        .is_some_and(|before| before != intervals)
    {
        for (token, _) in probes.running.values() {
            token.cancel();
        }
        probes.running.clear();
    }
    for backend in snapshot.backends() {
        let k = key(backend);
        let new_cas = cas_changed && crate::upstream::is_https(&backend.config.url);
        match probes.running.get(&k) {
            Some((_, started_with)) if *started_with == backend.config.api_key && !new_cas => {
                continue
            }
            // A new key (a reload): its probes start again as a new
            // backend's do, not after a pause the old key's 429 asked for
            // (`Snapshot::build` forgot those pauses). New CAs likewise:
            // what the probes found under the old ones is stale.
            Some((token, _)) => token.cancel(),
            None => {}
        }
        let token = probes.root.child_token();
        for tier in Tier::ALL {
            let up = shared
                .metrics
                .backend_up(&backend.config.name, tier.as_str());
            // What the health record says, which a reload keeps: not 1 for
            // a tier that is down, nor for a backend never seen alive.
            backend.live.with_health(|h| up.set(h.tier_up(tier)));
            probes
                .set
                .spawn(run_tier(shared.clone(), k.clone(), tier, token.clone(), up));
        }
        probes
            .running
            .insert(k, (token, backend.config.api_key.clone()));
    }
}

/// One backend's probes of one tier, until cancelled or the backend is gone.
async fn run_tier(
    shared: Arc<Shared>,
    key: BackendKey,
    tier: Tier,
    token: CancellationToken,
    up: Gauge,
) {
    // SPEC "Start-up": each tier probes once at start, jittered by up to 10%
    // of its interval, so replicas do not probe in lock-step. A backend
    // still waiting to be seen alive (its probe before the reload failed, or
    // the probes restarted meanwhile) is probed at once: the jitter would
    // only keep it out of rotation longer.
    let snapshot = shared.snapshot.load_full();
    let first = interval(tier, &snapshot.config.health);
    let pending = tier == Tier::Liveness
        && find(&snapshot, &key).is_some_and(|b| b.live.with_health(|h| h.pending));
    drop(snapshot);
    let mut next = Instant::now();
    if !pending {
        next += jitter::up_to(first / 10);
    }
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let snapshot = shared.snapshot.load_full();
        let Some(backend) = find(&snapshot, &key) else {
            return;
        };
        let health = &snapshot.config.health;
        // A backend that answered this tier's probe 429 asked for a pause:
        // the tier sends nothing before its Retry-After, and probes no
        // earlier than its end (jittered by a tenth of the interval, as
        // replicas given the same wait would probe at once). A client's
        // 429 keeps the backend out of rotation but does not pause the
        // probes: steady traffic drawing 429s would otherwise keep them
        // quiet for good.
        let every = interval(tier, health);
        let now = Instant::now();
        if let Some(until) = backend
            .live
            .with_health(|h| h.tier(tier).paused_until.filter(|&t| t > now))
        {
            next = until + jitter::up_to(every / 10);
            continue;
        }
        let changed = tokio::select! {
            _ = token.cancelled() => return,
            changed = probe_once(&shared, backend, tier, health, &up) => changed,
        };
        if changed {
            shared.rebuild.notify_one();
        }
        // ±10% jitter around the interval.
        next = Instant::now() + every - every / 10 + jitter::up_to(every / 5);
    }
}

/// Runs one probe and records it. Returns whether anything that affects the
/// backend's weight changed.
async fn probe_once(
    shared: &Shared,
    backend: &BackendState,
    tier: Tier,
    health: &HealthConfig,
    up: &Gauge,
) -> bool {
    let thresholds = (
        health.unhealthy_threshold.get(),
        health.healthy_threshold.get(),
    );
    let now_before = Instant::now();
    let (changed, before, after) = match tier {
        Tier::Liveness => {
            let outcome = probes::liveness(backend, health.liveness.timeout).await;
            observe(backend, tier, &outcome, thresholds, |_| {})
        }
        Tier::Readiness => {
            let outcome = probes::readiness(backend, health.readiness.timeout).await;
            // SPEC "Health states": one slow answer degrades, the next fast
            // one restores; slowness does not count towards rise/fall. A
            // failure is no answer, so it leaves slowness as it was (it
            // counts towards `unhealthy_threshold` instead).
            let slow = outcome
                .is_pass()
                .then(|| outcome.latency() > health.readiness.degraded_latency);
            observe(backend, tier, &outcome, thresholds, |h| {
                if let Some(slow) = slow {
                    h.set_slow(slow);
                }
            })
        }
        Tier::Deep => {
            let result = probes::deep(
                backend,
                health.deep.timeout,
                health.deep.samples,
                health.deep.max_tokens,
            )
            .await;
            let passed = !result.samples.is_empty() || result.embeddings_only;
            let outcome = if passed {
                probes::ProbeOutcome::Pass {
                    // The samples' median time to first token; a round with
                    // none (an embedding model's) took the metrics read.
                    latency: result.median_ttft.unwrap_or_else(|| now_before.elapsed()),
                }
            } else if let Some(retry_after) = result.rate_limited.filter(|_| result.failures == 0) {
                probes::ProbeOutcome::RateLimited {
                    latency: now_before.elapsed(),
                    retry_after,
                    error: result.last_error.clone().unwrap_or_default(),
                }
            } else {
                probes::ProbeOutcome::Fail {
                    // The round's real length: a refused connection fails
                    // at once, only a hang takes the whole timeout.
                    latency: now_before.elapsed(),
                    error: result
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "no sample completed".to_owned()),
                }
            };
            let saturated = result.engine.as_ref().is_some_and(|e| e.is_saturated());
            let tps = result.median_tokens_per_sec;
            // The samples ran on the backend's first model: it is far below
            // its peers when its throughput factor in that model's pool
            // is at its floor, the pool as it stands now with this figure.
            let model = backend.config.models.first();
            let far_below = tps.zip(model).and_then(|(tps, model)| {
                let median = pool_median(shared, backend, model, tps);
                median.filter(|_| is_far_below(tps, median))
            });
            let metrics_error = result.metrics_error;
            // A round that passed or failed before its 429 (samples that
            // measured, or failed) is judged on those; the 429 still holds.
            let rate_limited = result
                .rate_limited
                .filter(|_| !matches!(outcome, probes::ProbeOutcome::RateLimited { .. }));
            let (_, before, after) = observe(backend, tier, &outcome, thresholds, |h| {
                if let Some(wait) = rate_limited.filter(|_| backend.sent_with_current_key()) {
                    h.probe_rate_limited(tier, Instant::now() + wait);
                }
                h.saturated = saturated;
                h.metrics_error = metrics_error;
                if tps.is_some() {
                    h.tokens_per_sec = tps;
                    h.tokens_per_sec_model = model.cloned();
                }
                // A round that measured nothing (an embedding model's, a
                // failed one) judges no speed: a failing deep tier degrades
                // the backend by itself.
                h.far_below = far_below;
            });
            // Throughput moves weights even when no state flips.
            (true, before, after)
        }
    };
    // Seen alive at last: every tier is in (`HealthRecord::observe`), and
    // their gauges say so now, not at their own next probe (minutes away
    // for the deep tier). Set from the record, under its lock, as each
    // tier's own is: a tier's probe that lands meanwhile is not
    // overwritten with what was before it.
    let others: Vec<_> = if before.pending && !after.pending {
        let gauge = |t: Tier| (shared.metrics).backend_up(&backend.config.name, t.as_str());
        Tier::ALL
            .into_iter()
            .filter(|&other| other != tier)
            .map(|other| (other, gauge(other)))
            .collect()
    } else {
        Vec::new()
    };
    backend.live.with_health(|h| {
        up.set(h.tier_up(tier));
        for (other, gauge) in &others {
            gauge.set(h.tier_up(*other));
        }
    });
    // Back from down: a restart, perhaps an upgrade, so streams ask for
    // the usage chunk again even if the backend refused it before.
    if tier == Tier::Liveness && before.tier(tier).down && !after.tier(tier).down {
        backend
            .live
            .refuses_stream_options
            .store(false, Ordering::Relaxed);
    }
    // Both read at one instant, under the lock that applied this probe: the
    // change logged is this tier's, not another tier's that landed while
    // this probe ran (a deep round takes seconds), nor the clock's.
    let now = Instant::now();
    log_transition(backend, tier, &before, &after, now);
    log_metrics_path(backend, &before, &after);
    changed || before.state(now_before) != after.state(now)
}

/// Records an outcome with rise/fall thresholds plus `extra` changes, under
/// the record's lock. Returns whether a tier flipped, and the record just
/// before and just after. A 429 flips none: it
/// starts a 429 window, which changes the state (the caller compares it).
fn observe(
    backend: &BackendState,
    tier: Tier,
    outcome: &probes::ProbeOutcome,
    thresholds: (u32, u32),
    extra: impl FnOnce(&mut HealthRecord),
) -> (bool, HealthRecord, HealthRecord) {
    let (passed, error) = match outcome {
        probes::ProbeOutcome::Pass { .. } => (true, None),
        probes::ProbeOutcome::Fail { error, .. } => (false, Some(error.clone())),
        probes::ProbeOutcome::RateLimited {
            latency,
            retry_after,
            error,
        } => {
            return backend.live.with_health(|h| {
                let before = h.clone();
                // Sent with a key a reload has replaced since: the old
                // quota's 429, which says nothing now.
                if backend.sent_with_current_key() {
                    h.observe_rate_limited(
                        tier,
                        *latency,
                        error.clone(),
                        *retry_after,
                        Instant::now(),
                    );
                    extra(h);
                }
                (false, before, h.clone())
            });
        }
    };
    backend.live.with_health(|h| {
        let before = h.clone();
        let flip = h.observe(
            tier,
            passed,
            outcome.latency(),
            error,
            thresholds,
            Instant::now(),
        );
        extra(h);
        (flip != super::state::Flip::None, before, h.clone())
    })
}

/// The median deep-tier tokens/s of `model`'s pool in the current
/// snapshot, `backend`'s own figure taken as `tps`: the median its
/// throughput factor is reckoned against (`Snapshot::build`), among the
/// backends serving `model` that were measured on it.
fn pool_median(shared: &Shared, backend: &BackendState, model: &str, tps: f64) -> Option<f64> {
    let snapshot = shared.snapshot.load();
    let peers = snapshot
        .backends()
        .iter()
        .filter(|b| b.slot_id() != backend.slot_id() && b.config.models.iter().any(|m| m == model))
        .filter_map(|b| b.live.with_health(|h| h.tokens_per_sec_on(model)));
    median(peers.chain([tps]).collect())
}

/// The backend with this identity in `snapshot`, if it is still there.
fn find<'a>(snapshot: &'a Snapshot, key: &BackendKey) -> Option<&'a Arc<BackendState>> {
    snapshot
        .backends()
        .iter()
        .find(|b| (b.config.name.as_str(), &b.config.url) == (key.0.as_str(), &key.1))
}

fn log_transition(
    backend: &BackendState,
    tier: Tier,
    before: &HealthRecord,
    after: &HealthRecord,
    at: Instant,
) {
    let (from, to) = (before.state(at), after.state(at));
    if from != to {
        let level_warn = matches!(to, HealthState::Out | HealthState::Degraded);
        let error = why(tier, after);
        if level_warn {
            tracing::warn!(backend = %backend.config.name, tier = tier.as_str(), from = from.as_str(), to = to.as_str(), error, "backend health changed");
        } else {
            tracing::info!(backend = %backend.config.name, tier = tier.as_str(), from = from.as_str(), to = to.as_str(), "backend health changed");
        }
    }
}

/// What a transition's line says made it: the error of the tier whose
/// probe made it, else (degraded with that tier passing) what degrades the
/// backend: a saturated engine, throughput far below its pool's, a slow
/// readiness answer, or a failing deep tier (which may have failed while
/// the backend was out, unlogged, so the readiness probe that brings it
/// back as "degraded" names it).
fn why(tier: Tier, after: &HealthRecord) -> String {
    if let Some(error) = &after.tier(tier).last_error {
        return error.clone();
    }
    let deep = after.tier(Tier::Deep);
    if after.saturated {
        "engine saturated (waiting requests, KV cache at 95 % or more)".to_owned()
    } else if let Some(median) = after.far_below {
        format!(
            "deep tier measured {:.1} tokens/s, a tenth or less of its pool's median {median:.1}",
            after.tokens_per_sec.unwrap_or_default()
        )
    } else if after.tier(Tier::Readiness).slow {
        format!(
            "readiness answered in {:?}, slower than degraded_latency",
            after.tier(Tier::Readiness).last_latency.unwrap_or_default()
        )
    } else if deep.down {
        format!(
            "the deep tier is failing: {}",
            deep.last_error.as_deref().unwrap_or("no error recorded")
        )
    } else {
        String::new()
    }
}

/// A `metrics_path` that starts or stops failing, logged once each way (not
/// every round): while it fails, the engine's saturation goes unjudged.
fn log_metrics_path(backend: &BackendState, before: &HealthRecord, after: &HealthRecord) {
    let name = &backend.config.name;
    let path = backend.config.metrics_path.as_deref().unwrap_or("");
    match (&before.metrics_error, &after.metrics_error) {
        (None, Some(error)) => {
            tracing::warn!(backend = %name, metrics_path = path, error = %error, "engine metrics unreadable; saturation is not judged until they are")
        }
        (Some(_), None) => {
            tracing::info!(backend = %name, metrics_path = path, "engine metrics no longer failing")
        }
        _ => {}
    }
}

fn interval(tier: Tier, health: &HealthConfig) -> Duration {
    match tier {
        Tier::Liveness => health.liveness.interval,
        Tier::Readiness => health.readiness.interval,
        Tier::Deep => health.deep.interval,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transition_names_what_degrades_the_backend() {
        let now = Instant::now();
        let ms = Duration::from_millis(1);
        let mut h = HealthRecord::default();
        assert_eq!(why(Tier::Readiness, &h), "");
        h.tokens_per_sec = Some(8.0);
        h.far_below = Some(250.0);
        assert_eq!(h.state(now), HealthState::Degraded);
        assert_eq!(
            why(Tier::Deep, &h),
            "deep tier measured 8.0 tokens/s, a tenth or less of its pool's median 250.0"
        );
        h.far_below = None;
        // The deep tier failed (while the backend was out, say): the
        // readiness pass that brings it back degraded names it.
        h.observe(
            Tier::Deep,
            false,
            ms,
            Some("tls: UnknownIssuer".into()),
            (1, 1),
            now,
        );
        assert_eq!(h.state(now), HealthState::Degraded);
        assert_eq!(
            why(Tier::Readiness, &h),
            "the deep tier is failing: tls: UnknownIssuer"
        );
        // The probing tier's own error comes first.
        h.observe(
            Tier::Readiness,
            false,
            ms,
            Some("refused".into()),
            (1, 1),
            now,
        );
        assert_eq!(why(Tier::Readiness, &h), "refused");
        assert_eq!(why(Tier::Deep, &h), "tls: UnknownIssuer");
    }
}
