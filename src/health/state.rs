//! A backend's health record and the effective-weight arithmetic.
//!
//! The record is the one source of truth the active checker and passive
//! outlier detection write and every snapshot rebuild reads; requests never
//! touch it (they read the effective weights baked into their snapshot).
//! Everything here is pure: it takes `now` as an argument, so thresholds,
//! slow start and ejection are tested with made-up instants.
//!
//! Effective weight (SPEC "Balancing") = configured weight × health factor
//! (healthy 1, degraded 0.5, out/ejected/rate-limited 0) × slow-start ramp
//! (HAProxy's linear ramp, from 10% to 100% over `slow_start` after coming
//! back) × the deep tier's throughput factor (tokens/s ÷ the pool's median,
//! clamped to [0.1, 1]), kept in thousandths so the factors count for small
//! weights too.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// The health state reported by `/admin/backends` and used for weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    /// In rotation at full weight.
    Healthy,
    /// In rotation at half weight: slow readiness, saturated engine, or a
    /// failing deep tier.
    Degraded,
    /// Out of rotation: liveness or readiness failed `unhealthy_threshold`
    /// times in a row.
    Out,
    /// Out of rotation by passive outlier detection until a deadline.
    Ejected,
}

impl HealthState {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Degraded => "degraded",
            HealthState::Out => "out",
            HealthState::Ejected => "ejected",
        }
    }
}

/// The three active tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// `GET health_path`.
    Liveness,
    /// A one-token completion.
    Readiness,
    /// Throughput samples and engine metrics.
    Deep,
}

impl Tier {
    /// Every tier, in probe order.
    pub const ALL: [Tier; 3] = [Tier::Liveness, Tier::Readiness, Tier::Deep];

    /// The JSON and metric spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Liveness => "liveness",
            Tier::Readiness => "readiness",
            Tier::Deep => "deep",
        }
    }

    fn index(self) -> usize {
        match self {
            Tier::Liveness => 0,
            Tier::Readiness => 1,
            Tier::Deep => 2,
        }
    }
}

/// One tier's rise/fall counters and last result.
#[derive(Debug, Clone, Default)]
pub struct TierRecord {
    /// False once `unhealthy_threshold` probes failed in a row; true again
    /// after `healthy_threshold` passes (HAProxy's fall/rise).
    pub down: bool,
    /// Passing probes in a row.
    pub passes: u32,
    /// Failing probes in a row.
    pub failures: u32,
    /// Latency of the last probe.
    pub last_latency: Option<Duration>,
    /// Why the last probe failed (`None` when it passed).
    pub last_error: Option<String>,
    /// Wall-clock time of the last probe, for `/admin/backends`.
    pub checked_at: Option<SystemTime>,
    /// Readiness only: the last answer was slower than `degraded_latency`.
    pub slow: bool,
    /// The end of the pause this tier's own last probe was asked for (its
    /// 429's Retry-After): the tier sends nothing to the backend before.
    /// A window a client's 429 opened does not stop the probes, or steady
    /// traffic that keeps drawing 429s would keep every tier quiet forever.
    pub paused_until: Option<Instant>,
}

/// Everything known about a backend's health.
#[derive(Debug, Clone, Default)]
pub struct HealthRecord {
    tiers: [TierRecord; 3],
    /// When the backend last came back into rotation (slow start runs from
    /// here); `None` = never left, full weight.
    pub back_since: Option<Instant>,
    /// Not yet seen alive: a backend added by a reload waits for its first
    /// passing liveness probe (SPEC "Precise points").
    pub pending: bool,
    /// Deep tier: median decode speed, for the throughput factor.
    pub tokens_per_sec: Option<f64>,
    /// The (client) model `tokens_per_sec` was measured on: the deep tier
    /// samples a backend's first model only, and a figure only compares
    /// with figures measured on the same model ([`Self::tokens_per_sec_on`]).
    pub tokens_per_sec_model: Option<String>,
    /// Deep tier: the engine reports a waiting queue and a full KV cache.
    pub saturated: bool,
    /// Deep tier: the pool median this backend's last round measured it
    /// far below ([`is_far_below`]); `Some` degrades it (SPEC "Health
    /// tiers": "a backend far below its peers … is degraded").
    pub far_below: Option<f64>,
    /// Deep tier: why the last round could not read `metrics_path` (a
    /// 404, a 500, a refused connection); saturation is not judged then.
    pub metrics_error: Option<String>,
    /// Passive: out of rotation until then.
    pub ejected_until: Option<Instant>,
    /// Passive: how many times it was ejected (multiplies the ejection time).
    pub ejections: u32,
    /// Upstream 429: out of rotation until its `Retry-After` passes.
    pub rate_limited_until: Option<Instant>,
}

/// Whether a probe result flipped a tier (for "log transitions, not samples").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flip {
    /// Nothing changed that affects rotation.
    None,
    /// The tier went down.
    Down,
    /// The tier came back up.
    Up,
}

impl HealthRecord {
    /// A tier's record.
    pub fn tier(&self, tier: Tier) -> &TierRecord {
        &self.tiers[tier.index()]
    }

    /// `weir_backend_up{tier}`: 1 while the tier passes (or has not failed
    /// yet); liveness also needs the backend to have been seen alive. Only
    /// liveness decides that, so the other tiers' gauges, refreshed by
    /// their own (rarer) probes, do not wait for it.
    pub fn tier_up(&self, tier: Tier) -> i64 {
        let unseen = self.pending && tier == Tier::Liveness;
        i64::from(!unseen && !self.tier(tier).down)
    }

    /// Records a probe result with rise/fall thresholds. Returns the flip.
    pub fn observe(
        &mut self,
        tier: Tier,
        passed: bool,
        latency: Duration,
        error: Option<String>,
        thresholds: (u32, u32),
        now: Instant,
    ) -> Flip {
        let (unhealthy_threshold, healthy_threshold) = thresholds;
        let was_out = self.is_out();
        let record = &mut self.tiers[tier.index()];
        record.last_latency = Some(latency);
        record.last_error = error;
        record.checked_at = Some(SystemTime::now());
        let mut flip = if passed {
            record.failures = 0;
            record.passes = record.passes.saturating_add(1);
            if record.down && record.passes >= healthy_threshold {
                record.down = false;
                Flip::Up
            } else {
                Flip::None
            }
        } else {
            record.passes = 0;
            record.failures = record.failures.saturating_add(1);
            if !record.down && record.failures >= unhealthy_threshold {
                record.down = true;
                Flip::Down
            } else {
                Flip::None
            }
        };
        if tier == Tier::Liveness && passed && self.pending {
            // SPEC "Start-up": a new backend enters rotation on its first
            // passing liveness probe, whatever failed while it was not yet
            // up. It starts as every backend does at start-up: each tier in
            // and its failure count at 0 (a readiness or deep probe that
            // failed while the engine was still loading does not hold it out
            // for that tier's interval), so only failures from now on count
            // towards `unhealthy_threshold`. What those probes said
            // (`last_error`, latency, slowness) is still shown.
            self.pending = false;
            for record in &mut self.tiers {
                record.down = false;
                record.failures = 0;
            }
            flip = Flip::Up;
        }
        if was_out && !self.is_out() {
            self.back_since = Some(self.returns_at(now));
        }
        flip
    }

    /// Records a probe the backend answered 429 (it can answer; it is busy)
    /// at `now`: neither a pass nor a failure, so no tier's counts move and
    /// a tier that is down stays down; the backend is out of rotation, and
    /// its probes wait, until `now + retry_after` (as after a proxied 429).
    pub fn observe_rate_limited(
        &mut self,
        tier: Tier,
        latency: Duration,
        error: String,
        retry_after: Duration,
        now: Instant,
    ) {
        let record = &mut self.tiers[tier.index()];
        record.last_latency = Some(latency);
        // A liveness or readiness tier that is down keeps its failure: the
        // 429 is no failure, and that failure is what holds the backend
        // out. A deep tier holds nothing out: the 429 is the news there.
        if !(record.down && tier != Tier::Deep) {
            record.last_error = Some(error);
        }
        record.checked_at = Some(SystemTime::now());
        self.probe_rate_limited(tier, now + retry_after);
    }

    /// A probe of `tier` was answered 429 with a Retry-After ending at
    /// `until`: the backend is out of rotation and that tier sends nothing
    /// more until then, whatever the rest of its round said (a deep round
    /// whose first samples measured and whose next one drew the 429).
    pub fn probe_rate_limited(&mut self, tier: Tier, until: Instant) {
        self.tiers[tier.index()].paused_until = Some(until);
        self.rate_limit_until(until);
    }

    /// Forgets every 429 window and probe pause: they were asked for by the
    /// backend's old key, and a new key is a new quota (a reload that swaps
    /// the key is the usual fix for one that ran out).
    pub fn forget_rate_limits(&mut self) {
        self.rate_limited_until = None;
        for record in &mut self.tiers {
            record.paused_until = None;
        }
    }

    /// Out of rotation until `until` for an upstream 429, or until a later
    /// 429 window already running ends.
    pub fn rate_limit_until(&mut self, until: Instant) {
        self.rate_limited_until = Some(self.rate_limited_until.map_or(until, |t| t.max(until)));
    }

    /// The end of the 429 window the backend is in at `now`, if any.
    pub fn rate_limited_at(&self, now: Instant) -> Option<Instant> {
        self.rate_limited_until.filter(|&t| t > now)
    }

    /// When a backend that passes its probes again at `now` is back in
    /// rotation: now, or when its ejection ends if it is still ejected (the
    /// ejection holds "whatever its probes say", SPEC "Ejection"), so its
    /// slow start runs from then and it does not return at full weight.
    fn returns_at(&self, now: Instant) -> Instant {
        self.ejected_until.map_or(now, |until| until.max(now))
    }

    /// Readiness: whether the last answer was slower than `degraded_latency`.
    pub fn set_slow(&mut self, slow: bool) {
        self.tiers[Tier::Readiness.index()].slow = slow;
    }

    /// The record as it stands with active checks switched off: what the
    /// probes last said is ignored, passive state (ejection, 429 window,
    /// slow start) is kept.
    pub fn passive_only(&self) -> HealthRecord {
        HealthRecord {
            tiers: Default::default(),
            pending: false,
            tokens_per_sec: None,
            tokens_per_sec_model: None,
            saturated: false,
            far_below: None,
            metrics_error: None,
            ..self.clone()
        }
    }

    /// The deep tier's tokens/s if it was measured on `model`: a pool
    /// compares only figures measured on its own model (a backend serving
    /// a small and a big model, measured on the small one, is not "faster"
    /// on the big one than a peer measured there); `None` otherwise, so the
    /// backend's throughput factor in that pool is 1.
    pub fn tokens_per_sec_on(&self, model: &str) -> Option<f64> {
        self.tokens_per_sec
            .filter(|_| self.tokens_per_sec_model.as_deref() == Some(model))
    }

    /// Out of rotation by the active tiers (liveness or readiness down).
    pub fn is_out(&self) -> bool {
        self.pending || self.tiers[0].down || self.tiers[1].down
    }

    /// When the clock alone brings it back into rotation: the end of its
    /// ejection or 429 window (the later), if one holds it out at `now`
    /// and the active tiers do not (their next probe decides, whenever
    /// that is).
    pub fn back_at(&self, now: Instant) -> Option<Instant> {
        if self.is_out() {
            return None;
        }
        self.clock_hold_until(now)
    }

    /// The end of the clock's holds on the backend still running at `now`
    /// (the later of its ejection and its 429 window), whatever the active
    /// tiers say.
    fn clock_hold_until(&self, now: Instant) -> Option<Instant> {
        [self.ejected_until, self.rate_limited_until]
            .into_iter()
            .flatten()
            .filter(|&t| t > now)
            .max()
    }

    /// What the clock ended in `(since, now]`, the last of the clock's
    /// holds on the backend: its ejection, its 429 window, or both. `None`
    /// when nothing ended then, or when another still runs at `now`. The
    /// active tiers may still hold it out ([`Self::out_because`]).
    pub fn hold_ended(&self, since: Instant, now: Instant) -> Option<&'static str> {
        if self.clock_hold_until(now).is_some() {
            return None;
        }
        let ended = |t: Option<Instant>| t.is_some_and(|t| since < t && t <= now);
        match (ended(self.ejected_until), ended(self.rate_limited_until)) {
            (true, true) => Some("its ejection and its Retry-After window ended"),
            (true, false) => Some("its ejection ended"),
            (false, true) => Some("its Retry-After window ended"),
            (false, false) => None,
        }
    }

    /// Why the active tiers hold the backend out, if they do: not yet seen
    /// alive, or the failing tier with its last error.
    pub fn out_because(&self) -> Option<String> {
        if self.pending {
            return Some("not yet seen alive by its liveness probe".to_owned());
        }
        [Tier::Liveness, Tier::Readiness]
            .into_iter()
            .find(|&tier| self.tier(tier).down)
            .map(|tier| {
                let error = self.tier(tier).last_error.as_deref().unwrap_or("failing");
                format!("{} failing: {error}", tier.as_str())
            })
    }

    /// Degraded by readiness slowness, engine saturation, throughput far
    /// below its peers', or a failing deep tier.
    pub fn is_degraded(&self) -> bool {
        self.tiers[1].slow || self.saturated || self.far_below.is_some() || self.tiers[2].down
    }

    /// The state at `now`.
    pub fn state(&self, now: Instant) -> HealthState {
        if self.ejected_until.is_some_and(|t| t > now) {
            HealthState::Ejected
        } else if self.is_out() || self.rate_limited_until.is_some_and(|t| t > now) {
            HealthState::Out
        } else if self.is_degraded() {
            HealthState::Degraded
        } else {
            HealthState::Healthy
        }
    }

    /// Health factor × slow-start ramp at `now` (the throughput factor is
    /// applied per pool, where the median is known).
    pub fn factor(&self, now: Instant, slow_start: Duration) -> f64 {
        let health = match self.state(now) {
            HealthState::Healthy => 1.0,
            HealthState::Degraded => 0.5,
            HealthState::Out | HealthState::Ejected => return 0.0,
        };
        health * ramp(self.back_since, now, slow_start)
    }

    /// Whether the weight is still changing with time (slow start running,
    /// an ejection or a 429 window about to end): the supervisor rebuilds
    /// the snapshot until it is not.
    pub fn next_change(&self, now: Instant, slow_start: Duration) -> Option<Instant> {
        let ramp_end = self.back_since.map(|t| t + slow_start).filter(|&t| t > now);
        [
            ramp_end,
            self.ejected_until.filter(|&t| t > now),
            self.rate_limited_until.filter(|&t| t > now),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Ejects until `now + ejection_time × ejections`, capped at 5 minutes
    /// (Envoy's rule). The count first decays by one for every
    /// `ejection_time` since the previous ejection ended (Envoy lowers its
    /// multiplier for each interval a host stays un-ejected), so a backend
    /// that failed once an hour ago is not ejected for minutes. Returns the
    /// deadline.
    pub fn eject(&mut self, now: Instant, ejection_time: Duration) -> Instant {
        if let Some(ended) = self.ejected_until {
            let back = now.saturating_duration_since(ended);
            let periods = back
                .as_nanos()
                .checked_div(ejection_time.as_nanos())
                .unwrap_or(0);
            let decay = u32::try_from(periods).unwrap_or(u32::MAX);
            self.ejections = self.ejections.saturating_sub(decay);
        }
        self.ejections = self.ejections.saturating_add(1);
        let time = ejection_time
            .saturating_mul(self.ejections)
            .min(MAX_EJECTION);
        let until = now + time;
        self.ejected_until = Some(until);
        // When the ejection ends the backend returns through slow start.
        self.back_since = Some(until);
        until
    }
}

/// The longest an ejection lasts, however often it repeats (SPEC).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// HAProxy's slow start: 10% at `back_since`, rising linearly to 100% at
/// `back_since + slow_start`.
pub fn ramp(back_since: Option<Instant>, now: Instant, slow_start: Duration) -> f64 {
    match back_since {
        Some(since) if !slow_start.is_zero() => {
            if now < since {
                return 0.1;
            }
            let progress = now.duration_since(since).as_secs_f64() / slow_start.as_secs_f64();
            (0.1 + 0.9 * progress).min(1.0)
        }
        _ => 1.0,
    }
}

/// The deep tier's throughput factor: this backend's tokens/s over the
/// pool's median, clamped to [0.1, 1]; 1 when either is unknown.
pub fn throughput_factor(tokens_per_sec: Option<f64>, pool_median: Option<f64>) -> f64 {
    match (tokens_per_sec, pool_median) {
        (Some(tps), Some(median)) if median > 0.0 && tps.is_finite() => {
            (tps / median).clamp(FAR_BELOW, 1.0)
        }
        _ => 1.0,
    }
}

/// How far below its pool's median a backend's deep-tier tokens/s must be
/// to degrade it: the throughput factor's floor, so a backend is called
/// far below its peers exactly when the factor can shrink it no further.
pub const FAR_BELOW: f64 = 0.1;

/// Whether `tokens_per_sec` is far below `pool_median` (the median of the
/// figures measured on the same model, its own included, as the throughput
/// factor's): at most [`FAR_BELOW`] of it. A pool median of nothing
/// measured, or of 0, puts nobody below it.
pub fn is_far_below(tokens_per_sec: f64, pool_median: Option<f64>) -> bool {
    pool_median.is_some_and(|m| m > 0.0 && tokens_per_sec <= FAR_BELOW * m)
}

/// The median of some values (mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// Effective weights are counted in thousandths of a configured weight
/// unit: fine enough that every factor counts for a weight of 1 (degraded
/// 0.5, slow start from 0.1, throughput down to 0.1), and small enough that
/// `u32::MAX` × 1000 (4.3e12) is exact in an `f64` and far from `u64::MAX`,
/// so no configured weight needs a bound.
pub const WEIGHT_SCALE: u32 = 1000;

/// Configured weight × factor in thousandths ([`WEIGHT_SCALE`]): the
/// integer weight the balancer shares picks by. Rounded, but never down to
/// 0 while the factor is positive (a slow-starting backend must get some
/// traffic).
pub fn scaled_weight(configured: u32, factor: f64) -> u64 {
    if configured == 0 || factor.is_nan() || factor <= 0.0 {
        return 0;
    }
    let w = (f64::from(configured) * f64::from(WEIGHT_SCALE) * factor.min(1.0)).round();
    // At most u32::MAX × 1000; the cast saturates anyway.
    (w as u64).max(1)
}

/// A scaled weight as configured-weight units, as `/admin/backends` and
/// `weir_backend_effective_weight` report it (0.5 for a degraded weight-1
/// backend).
pub fn unscaled_weight(scaled: u64) -> f64 {
    scaled as f64 / f64::from(WEIGHT_SCALE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: (u32, u32) = (3, 2);

    #[test]
    fn the_clock_ending_a_hold_is_reported_once_and_only_when_back() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut h = HealthRecord::default();
        assert_eq!(h.hold_ended(t0, t0 + 9 * s), None, "never held out");
        h.eject(t0, 2 * s);
        assert_eq!(h.hold_ended(t0, t0 + s), None, "still ejected");
        assert_eq!(h.hold_ended(t0 + s, t0 + 3 * s), Some("its ejection ended"));
        // The next look's interval starts where this one stopped: no repeat.
        assert_eq!(h.hold_ended(t0 + 3 * s, t0 + 4 * s), None);
        // A 429 window that outlasts the ejection: back only when it ends.
        h.rate_limit_until(t0 + 5 * s);
        assert_eq!(h.hold_ended(t0 + s, t0 + 3 * s), None, "the window holds");
        assert_eq!(
            h.hold_ended(t0 + 3 * s, t0 + 6 * s),
            Some("its Retry-After window ended")
        );
        assert_eq!(
            h.hold_ended(t0, t0 + 6 * s),
            Some("its ejection and its Retry-After window ended")
        );
        // Held out by the probes when the clock ends the window: the end
        // is reported with why it is still out (with health checks off,
        // passive state alone counts: nothing holds it).
        assert_eq!(h.out_because(), None);
        for _ in 0..T.0 {
            h.observe(
                Tier::Liveness,
                false,
                s,
                Some("status 503".into()),
                T,
                t0 + 4 * s,
            );
        }
        assert_eq!(
            h.hold_ended(t0 + 3 * s, t0 + 6 * s),
            Some("its Retry-After window ended")
        );
        assert_eq!(
            h.out_because().as_deref(),
            Some("liveness failing: status 503")
        );
        assert_eq!(h.passive_only().out_because(), None);
        // A probe answered 429 meanwhile is no failure: the reason stays
        // the failure that took the tier down.
        h.observe_rate_limited(Tier::Liveness, s, "status 429".into(), s, t0 + 5 * s);
        assert_eq!(
            h.out_because().as_deref(),
            Some("liveness failing: status 503")
        );
        // A deep tier that is down (the backend degraded, not out) shows
        // the 429, which now holds the backend out.
        h.observe(Tier::Deep, false, s, Some("status 500".into()), T, t0);
        h.observe(Tier::Deep, false, s, Some("status 500".into()), T, t0);
        h.observe(Tier::Deep, false, s, Some("status 500".into()), T, t0);
        assert!(h.tier(Tier::Deep).down);
        h.observe_rate_limited(Tier::Deep, s, "status 429".into(), s, t0 + 5 * s);
        assert_eq!(h.tier(Tier::Deep).last_error.as_deref(), Some("status 429"));
    }

    #[test]
    fn rise_and_fall_thresholds() {
        let now = Instant::now();
        let mut h = HealthRecord::default();
        let ms = Duration::from_millis(1);
        assert_eq!(
            h.observe(Tier::Liveness, false, ms, Some("x".into()), T, now),
            Flip::None
        );
        assert_eq!(
            h.observe(Tier::Liveness, false, ms, Some("x".into()), T, now),
            Flip::None
        );
        assert_eq!(h.state(now), HealthState::Healthy);
        assert_eq!(
            h.observe(Tier::Liveness, false, ms, Some("x".into()), T, now),
            Flip::Down
        );
        assert_eq!(h.state(now), HealthState::Out);
        assert_eq!(
            h.observe(Tier::Liveness, true, ms, None, T, now),
            Flip::None
        );
        assert_eq!(h.state(now), HealthState::Out);
        let back = now + Duration::from_secs(5);
        assert_eq!(h.observe(Tier::Liveness, true, ms, None, T, back), Flip::Up);
        assert_eq!(h.state(back), HealthState::Healthy);
        assert_eq!(h.back_since, Some(back));
    }

    /// SPEC "Start-up": a backend a reload added enters rotation on its
    /// first passing liveness probe, even when enough liveness and
    /// readiness probes failed meanwhile to take a running backend out
    /// (which would then need `healthy_threshold` passes), and enters
    /// through slow start.
    #[test]
    fn a_pending_backend_enters_on_its_first_liveness_pass_whatever_failed_before() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let slow_start = Duration::from_secs(10);
        let thresholds = (1, 3);
        let mut h = HealthRecord {
            pending: true,
            ..HealthRecord::default()
        };
        for tier in Tier::ALL {
            for _ in 0..4 {
                h.observe(tier, false, ms, Some("loading".into()), thresholds, t0);
            }
        }
        assert!(h.tier(Tier::Readiness).down && h.tier(Tier::Deep).down);
        assert_eq!(h.state(t0), HealthState::Out);
        let up = t0 + Duration::from_secs(1);
        let flip = h.observe(Tier::Liveness, true, ms, None, thresholds, up);
        assert_eq!(h.state(up), HealthState::Healthy);
        assert_eq!(flip, Flip::Up);
        assert_eq!(h.back_since, Some(up), "enters through slow start");
        assert!((h.factor(up, slow_start) - 0.1).abs() < 1e-9);
        for tier in Tier::ALL {
            assert_eq!(h.tier_up(tier), 1, "{tier:?}");
            assert_eq!(h.tier(tier).failures, 0, "{tier:?}");
        }
        // What the failed probes said is still shown.
        assert_eq!(
            h.tier(Tier::Readiness).last_error.as_deref(),
            Some("loading")
        );
        // From now on failures count as for any backend.
        h.observe(Tier::Readiness, false, ms, Some("x".into()), thresholds, up);
        assert_eq!(h.state(up), HealthState::Out);
    }

    #[test]
    fn slow_start_ramps_linearly_from_ten_percent() {
        let t0 = Instant::now();
        let s = Duration::from_secs(30);
        assert_eq!(ramp(None, t0, s), 1.0);
        assert!((ramp(Some(t0), t0, s) - 0.1).abs() < 1e-9);
        assert!((ramp(Some(t0), t0 + Duration::from_secs(15), s) - 0.55).abs() < 1e-9);
        assert_eq!(ramp(Some(t0), t0 + Duration::from_secs(30), s), 1.0);
        assert_eq!(ramp(Some(t0), t0 + Duration::from_secs(90), s), 1.0);
        assert_eq!(ramp(Some(t0), t0, Duration::ZERO), 1.0);
    }

    #[test]
    fn degraded_halves_and_out_zeroes() {
        let now = Instant::now();
        let mut h = HealthRecord::default();
        assert_eq!(h.factor(now, Duration::ZERO), 1.0);
        h.saturated = true;
        assert_eq!(h.state(now), HealthState::Degraded);
        assert_eq!(h.factor(now, Duration::ZERO), 0.5);
        h.rate_limited_until = Some(now + Duration::from_secs(1));
        assert_eq!(h.factor(now, Duration::ZERO), 0.0);
        assert_eq!(h.factor(now + Duration::from_secs(2), Duration::ZERO), 0.5);
    }

    #[test]
    fn ejection_time_multiplies_and_caps() {
        let now = Instant::now();
        let mut h = HealthRecord::default();
        let base = Duration::from_secs(30);
        assert_eq!(h.eject(now, base), now + base);
        assert_eq!(h.state(now), HealthState::Ejected);
        assert_eq!(h.eject(now, base), now + 2 * base);
        for _ in 0..20 {
            h.eject(now, base);
        }
        assert_eq!(h.ejected_until, Some(now + MAX_EJECTION));
        assert_eq!(h.state(now + MAX_EJECTION), HealthState::Healthy);
    }

    /// A backend that crashed (so was ejected and then failed liveness)
    /// and recovers while still ejected returns through the full slow start
    /// when the ejection ends, not at the weight the ramp would have
    /// reached since the probes passed again.
    #[test]
    fn recovering_during_an_ejection_slow_starts_when_it_ends() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let slow_start = Duration::from_secs(10);
        let mut h = HealthRecord::default();
        let until = h.eject(t0, Duration::from_secs(30));
        for _ in 0..3 {
            h.observe(Tier::Liveness, false, ms, Some("refused".into()), T, t0);
        }
        assert!(h.is_out());
        let recovered = t0 + Duration::from_secs(5);
        for _ in 0..2 {
            h.observe(Tier::Liveness, true, ms, None, T, recovered);
        }
        assert!(!h.is_out());
        assert_eq!(h.back_since, Some(until));
        assert_eq!(h.state(until - ms), HealthState::Ejected);
        assert!((h.factor(until, slow_start) - 0.1).abs() < 1e-9);
        assert!((h.factor(until + slow_start / 2, slow_start) - 0.55).abs() < 1e-9);
        // Recovering after the ejection ended ramps from then.
        let later = until + Duration::from_secs(60);
        for _ in 0..3 {
            h.observe(Tier::Liveness, false, ms, Some("refused".into()), T, later);
        }
        for _ in 0..2 {
            h.observe(Tier::Liveness, true, ms, None, T, later);
        }
        assert_eq!(h.back_since, Some(later));
    }

    /// Envoy lowers the ejection multiplier while a host stays healthy:
    /// each `ejection_time` back in rotation takes one off the count before
    /// the next ejection adds one.
    #[test]
    fn the_ejection_count_decays_while_not_ejected() {
        let t0 = Instant::now();
        let base = Duration::from_secs(30);
        let mut h = HealthRecord::default();
        let mut until = t0;
        for _ in 0..4 {
            until = h.eject(until, base);
        }
        assert_eq!(h.ejections, 4);
        // Back for 2.5 × ejection_time: two off, then this ejection's one.
        let now = until + base * 5 / 2;
        assert_eq!(h.eject(now, base), now + 3 * base);
        assert_eq!(h.ejections, 3);
        // Straight after the ejection ends: no decay.
        let now = now + 3 * base;
        assert_eq!(h.eject(now, base), now + 4 * base);
        // Long enough back in rotation: starts over at 1, not below.
        let now = now + 4 * base + Duration::from_secs(3600);
        assert_eq!(h.eject(now, base), now + base);
        assert_eq!(h.ejections, 1);
    }

    #[test]
    fn throughput_factor_is_clamped() {
        assert_eq!(throughput_factor(Some(50.0), Some(100.0)), 0.5);
        assert_eq!(throughput_factor(Some(1.0), Some(100.0)), 0.1);
        assert_eq!(throughput_factor(Some(300.0), Some(100.0)), 1.0);
        assert_eq!(throughput_factor(None, Some(100.0)), 1.0);
        assert!(is_far_below(10.0, Some(100.0)));
        assert!(is_far_below(0.0, Some(100.0)));
        assert!(!is_far_below(10.5, Some(100.0)));
        assert!(!is_far_below(1.0, None), "nothing measured");
        assert!(!is_far_below(0.0, Some(0.0)), "a pool measured at nothing");
        // Far below exactly where the throughput factor reaches its floor.
        for (tps, median) in [(10.0, 100.0), (10.5, 100.0), (0.5, 5.0), (40.0, 400.0)] {
            assert_eq!(
                is_far_below(tps, Some(median)),
                throughput_factor(Some(tps), Some(median)) == FAR_BELOW
            );
        }
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn throughput_compares_only_on_the_model_it_was_measured_on() {
        let h = HealthRecord {
            tokens_per_sec: Some(282.0),
            tokens_per_sec_model: Some("small".into()),
            ..HealthRecord::default()
        };
        assert_eq!(h.tokens_per_sec_on("small"), Some(282.0));
        assert_eq!(h.tokens_per_sec_on("big"), None);
        assert_eq!(HealthRecord::default().tokens_per_sec_on("small"), None);
    }

    #[test]
    fn scaled_weights_keep_small_weights_apart() {
        assert_eq!(scaled_weight(100, 0.1), 10_000);
        assert_eq!(scaled_weight(1, 0.5), 500);
        assert_eq!(scaled_weight(1, 0.1), 100);
        assert_eq!(scaled_weight(1, 0.05), 50);
        assert_eq!(scaled_weight(1, 1e-9), 1, "a live backend keeps a turn");
        assert_eq!(scaled_weight(3, 0.0), 0);
        assert_eq!(scaled_weight(0, 1.0), 0);
        assert_eq!(scaled_weight(u32::MAX, 1.0), u64::from(u32::MAX) * 1000);
        assert_eq!(unscaled_weight(scaled_weight(1, 0.5)), 0.5);
        assert_eq!(unscaled_weight(scaled_weight(100, 0.55)), 55.0);
        assert_eq!(
            unscaled_weight(scaled_weight(u32::MAX, 1.0)),
            f64::from(u32::MAX)
        );
    }

    /// A probe's 429 is neither a pass nor a failure: no count moves, a
    /// tier that is up stays up however many come, one that is down stays
    /// down; each holds the backend out until its Retry-After, and a
    /// shorter one does not cut a running window short.
    #[test]
    fn only_a_tiers_own_429_pauses_its_probes() {
        let now = Instant::now();
        let secs = Duration::from_secs;
        let mut h = HealthRecord::default();
        // A client's 429: out of rotation, but every tier keeps probing.
        h.rate_limit_until(now + secs(30));
        assert!(h.rate_limited_at(now).is_some());
        for tier in [Tier::Liveness, Tier::Readiness, Tier::Deep] {
            assert_eq!(h.tier(tier).paused_until, None);
        }
        // A readiness probe's own 429 pauses readiness only.
        let ms = Duration::from_millis(1);
        h.observe_rate_limited(Tier::Readiness, ms, "429".into(), secs(5), now);
        assert_eq!(h.tier(Tier::Readiness).paused_until, Some(now + secs(5)));
        assert_eq!(h.tier(Tier::Liveness).paused_until, None);
        assert_eq!(
            h.rate_limited_at(now),
            Some(now + secs(30)),
            "the later end"
        );
    }

    #[test]
    fn a_rate_limited_probe_neither_fails_nor_passes() {
        let now = Instant::now();
        let ms = Duration::from_millis(1);
        let secs = Duration::from_secs;
        let mut h = HealthRecord::default();
        for _ in 0..10 {
            h.observe_rate_limited(Tier::Readiness, ms, "429".into(), secs(30), now);
        }
        let r = h.tier(Tier::Readiness);
        assert!(!r.down);
        assert_eq!((r.passes, r.failures), (0, 0));
        assert_eq!(r.last_error.as_deref(), Some("429"));
        assert_eq!(h.state(now), HealthState::Out, "rate-limited");
        assert_eq!(h.rate_limited_at(now), Some(now + secs(30)));
        h.observe_rate_limited(Tier::Readiness, ms, "429".into(), secs(1), now);
        assert_eq!(
            h.rate_limited_until,
            Some(now + secs(30)),
            "the later end holds"
        );
        assert_eq!(
            h.state(now + secs(30)),
            HealthState::Healthy,
            "back when it ends"
        );
        assert_eq!(h.rate_limited_at(now + secs(30)), None);

        // One failure short of the threshold, then 429s: the next failure
        // still takes it out (the streak was not reset) ...
        let mut h = HealthRecord::default();
        h.observe(Tier::Readiness, false, ms, Some("x".into()), T, now);
        h.observe(Tier::Readiness, false, ms, Some("x".into()), T, now);
        h.observe_rate_limited(Tier::Readiness, ms, "429".into(), secs(1), now);
        assert_eq!(h.tier(Tier::Readiness).failures, 2);
        assert_eq!(
            h.observe(Tier::Readiness, false, ms, Some("x".into()), T, now),
            Flip::Down
        );
        // ... and a tier that is down is not brought back by 429s.
        let later = now + secs(5);
        h.observe(Tier::Readiness, true, ms, None, T, later);
        h.observe_rate_limited(Tier::Readiness, ms, "429".into(), secs(1), later);
        let r = h.tier(Tier::Readiness);
        assert!(r.down, "one pass of the two healthy_threshold asks for");
        assert_eq!(r.passes, 1);
        assert_eq!(h.state(later + secs(2)), HealthState::Out);
    }
}
