//! Configuration reload (SIGHUP, `POST /admin/reload`, `server.watch_config`).
//!
//! The new file is read and validated in full on a blocking thread before
//! anything changes; an invalid file changes nothing: its errors (each with
//! file, line and column) are logged once, counted in
//! `weir_config_reloads_total{result="error"}` and returned to the caller.
//! A valid one becomes a new [`Snapshot`] swapped in with one
//! `ArcSwap::store`: requests in flight keep the snapshot they loaded, and
//! `Snapshot::build` carries live state over (backends by name + url, model
//! limits by model name). Backends new to the file are probed for liveness
//! first, while the old snapshot serves, so one that is alive enters
//! rotation in the same swap that removes the one it replaces. Reloads are serialised by `Shared::reload_lock`, a
//! FIFO mutex, and each reads the file only once it holds the lock, so the
//! last reload asked for reads the newest file and wins. A shutdown calls
//! off every reload still waiting, reading or probing (`Shared::stopping`),
//! so stopping never waits for a probe.
//!
//! Settings that only take effect when a listener starts (`listen`,
//! `admin_listen`, `max_connections`, `max_buffered_body_bytes`, the
//! connection timeouts, `log_format`, `watch_config`) are reported as
//! needing a restart and keep their running values, so the snapshot always
//! says what is in effect.
//!
//! This module decides nothing about routing; it only builds, stores and
//! describes. The change list is a cheap field-by-field comparison of the
//! two validated configs (no serialisation, no generic diffing).

use std::{
    collections::HashMap,
    fmt::Display,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use crate::{
    config::{BackendConfig, Config, ConfigError, ConfigErrors, ModelConfig},
    gateway::{ReloadError, Shared},
    health::{
        checker,
        state::{HealthRecord, Tier},
    },
    snapshot::{BackendState, Snapshot},
    upstream,
};

/// Re-reads the config file and swaps it in. Returns what changed, one item
/// per entry, or why nothing did. Every outcome is logged once and counted.
///
/// The reload runs in a task of its own, which this awaits: probing new
/// backends can take up to the liveness timeout, and an admin client that
/// hangs up meanwhile (hyper then drops its handler, and this future) must
/// not call off a reload it asked for. The task is never left running
/// unobserved for longer than that reload takes, and a shutdown calls it
/// off (see [`reload_in_turn`]).
pub(crate) async fn reload(shared: &Arc<Shared>) -> Result<Vec<String>, ReloadError> {
    tokio::spawn(reload_in_turn(shared.clone()))
        .await
        .unwrap_or_else(|e| Err(ReloadError::Interrupted(e.to_string())))
}

/// Waits for earlier reloads, then reloads, logs and counts the outcome.
///
/// A shutdown that starts while this still waits (for its turn, the file or
/// the new backends' probes) calls it off, changing nothing: stopping must
/// not wait out a probe's timeout, and a config swapped in while weir
/// drains would serve nothing new.
///
/// Cancellation-safe (runtime shutdown drops it): the awaits come before
/// anything changes, and the build-and-store runs without one.
async fn reload_in_turn(shared: Arc<Shared>) -> Result<Vec<String>, ReloadError> {
    let shared = &shared;
    let in_turn = async {
        let _serialised = shared.reload_lock.lock().await;
        swap_in(shared).await
    };
    let result = tokio::select! {
        result = in_turn => result,
        () = shared.stopping.cancelled() => Err(ReloadError::ShuttingDown),
    };
    match &result {
        Ok(changes) => {
            shared.metrics.count_reload("ok");
            tracing::info!(changes = %changes.join("; "), "config reloaded");
        }
        Err(ReloadError::ShuttingDown) => {
            shared.metrics.count_reload("error");
            tracing::warn!("config reload called off: weir is shutting down; the old config stays");
        }
        Err(e) => {
            shared.metrics.count_reload("error");
            tracing::error!(error = %one_line(e), "config reload refused; the old config keeps serving");
        }
    }
    result
}

/// Loads, validates, builds and stores; the caller holds `reload_lock`.
/// Nothing is awaited from the build on, so a caller that drops this (a
/// shutdown) finds either nothing or everything changed.
async fn swap_in(shared: &Arc<Shared>) -> Result<Vec<String>, ReloadError> {
    let path = shared
        .config_path
        .clone()
        .ok_or(ReloadError::NoConfigFile)?;
    let env = shared.env.clone();
    let shown = path.display().to_string();
    // Reading and parsing is file I/O and CPU: keep it off the runtime.
    let mut config = tokio::task::spawn_blocking(move || Config::reload(&path, &*env))
        .await
        .map_err(|e| ReloadError::Invalid(ConfigErrors(vec![join_error(&shown, &e)])))?
        .map_err(ReloadError::Invalid)?;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    // A rotated CA bundle is trusted from this reload on (upstream::trust);
    // reading it is file I/O too. Without an https backend nothing reads it.
    let cas_changed = if upstream::trust::needed(&config) {
        tokio::task::spawn_blocking(upstream::trust::reread)
            .await
            .map_err(|e| ReloadError::Interrupted(e.to_string()))??
    } else {
        false
    };
    // New backends (a new name or url) are probed while the old snapshot
    // keeps serving, so one that is alive enters rotation in the same swap
    // that removes the one it replaces. Only reloads change the set of
    // backends, and they run one at a time, so the set is still new when
    // the snapshot is built below.
    let added = shared.snapshot.load().added_backends(&config)?;
    if config.health.enabled && !added.is_empty() {
        checker::probe_added(&added, &config.health).await;
    }
    let (mut changes, checks_turned_off) = {
        let _serialised = shared.build_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = shared.snapshot.load_full();
        let changes = describe_changes(&old.config, &config);
        keep_restart_only_settings(&old.config, &mut config);
        let checks_turned_off = old.config.health.enabled && !config.health.enabled;
        let snapshot =
            Snapshot::build_adding(Arc::new(config), Some(&old), &shared.metrics, &added)?;
        shared.metrics.publish_weights(&snapshot);
        let snapshot = Arc::new(snapshot);
        shared.snapshot.store(snapshot.clone());
        snapshot.slots.announce();
        // A reload asks every backend for the usage chunk again: one that
        // refused `stream_options` may have been upgraded since (weir's
        // only other sign of that is liveness bringing it back, see
        // `health::checker`).
        for backend in snapshot.backends() {
            backend
                .live
                .refuses_stream_options
                .store(false, Ordering::Relaxed);
        }
        // Removed models and backends leave /metrics with the swap (no
        // rebuild runs in between: this holds the build lock).
        shared.metrics.forget_removed(&old, &snapshot);
        (changes, checks_turned_off)
    };
    // Starts probes for new backends, cancels those of removed ones (which
    // then drain: only requests that loaded an older snapshot still use them).
    checker::sync_probes(shared, cas_changed);
    if checks_turned_off {
        forget_active_checks(shared);
    } else {
        forget_speed_judged_on_another_model(shared);
    }
    if cas_changed {
        if changes == ["no changes"] {
            changes.clear();
        }
        changes.push(
            "trusted CAs (SSL_CERT_FILE / SSL_CERT_DIR) changed; https backends reconnect"
                .to_owned(),
        );
    }
    changes.extend(added.iter().filter_map(|b| still_pending(b)));
    Ok(changes)
}

/// `backend NAME waits for its first passing liveness probe (ERROR)` for a
/// new backend whose probe before the swap failed, so the reload's answer
/// says why it is not in rotation yet.
fn still_pending(backend: &BackendState) -> Option<String> {
    let health = backend.live.health();
    health.pending.then(|| {
        let error = health
            .tier(Tier::Liveness)
            .last_error
            .as_deref()
            .unwrap_or("not probed");
        format!(
            "backend {} waits for its first passing liveness probe ({error})",
            backend.config.name
        )
    })
}

/// A backend whose first model a reload changed was judged far below its
/// peers on a model its deep tier no longer measures: that verdict would
/// keep it degraded until its next deep round (minutes by default), so it
/// goes now, and the snapshot is rebuilt if one did.
fn forget_speed_judged_on_another_model(shared: &Shared) {
    let snapshot = shared.snapshot.load_full();
    let mut forgot = false;
    for backend in snapshot.backends() {
        let measures = backend.config.models.first().map(String::as_str);
        backend.live.with_health(|health| {
            if health.far_below.is_some() && health.tokens_per_sec_model.as_deref() != measures {
                health.far_below = None;
                forgot = true;
            }
        });
    }
    if forgot {
        checker::rebuild(shared);
    }
}

/// With active checks switched off, nothing would ever clear what they last
/// said (a backend `pending` its first probe, or with liveness down, would
/// stay out of rotation for good). SPEC: without checks, backends stay in
/// rotation unless ejected, so forget the active tiers and keep the passive
/// state (ejection, 429 window, slow start). Runs after `sync_probes`
/// cancelled the probe tasks, then rebuilds.
fn forget_active_checks(shared: &Shared) {
    let snapshot = shared.snapshot.load_full();
    for backend in snapshot.backends() {
        backend.live.with_health(|health| {
            let mut fresh = HealthRecord::default();
            fresh.back_since = health.back_since;
            fresh.ejected_until = health.ejected_until;
            fresh.ejections = health.ejections;
            fresh.rate_limited_until = health.rate_limited_until;
            *health = fresh;
        });
    }
    checker::rebuild(shared);
}

/// Copies the settings read only when the gateway starts from the running
/// config into the new one, so they are "otherwise ignored" (SPEC "Reload")
/// and a later reload still reports them as needing a restart.
fn keep_restart_only_settings(old: &Config, new: &mut Config) {
    let (o, n) = (&old.server, &mut new.server);
    n.listen = o.listen;
    n.admin_listen = o.admin_listen;
    n.max_connections = o.max_connections;
    n.max_buffered_body_bytes = o.max_buffered_body_bytes;
    n.header_read_timeout = o.header_read_timeout;
    n.idle_timeout = o.idle_timeout;
    n.log_format = o.log_format;
    n.watch_config = o.watch_config;
    new.cluster.clone_from(&old.cluster);
}

/// What changed, one item each (`backend b2 weight 1 -> 3`, `model m
/// requests_per_minute 60 -> 120`, `backend b4 added`); `["no changes"]`
/// when nothing did. Cheap: a field-by-field comparison, formatting only
/// what differs.
fn describe_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Changes(Vec::new());
    restart_items(old, new, &mut out);
    let (os, ns) = (&old.server, &new.server);
    out.setting(
        "server",
        "max_body_bytes",
        &os.max_body_bytes,
        &ns.max_body_bytes,
    );
    out.setting(
        "server",
        "request_timeout",
        &Dur(os.request_timeout),
        &Dur(ns.request_timeout),
    );
    out.setting(
        "server",
        "first_byte_timeout",
        &Dur(os.first_byte_timeout),
        &Dur(ns.first_byte_timeout),
    );
    out.setting(
        "server",
        "shutdown_grace",
        &Dur(os.shutdown_grace),
        &Dur(ns.shutdown_grace),
    );
    // Secrets: say that they changed, never what they are.
    out.secret("server.api_keys_env", "keys", os.api_keys != ns.api_keys);
    out.secret(
        "server.admin_token_env",
        "token",
        os.admin_token != ns.admin_token,
    );
    let (ol, nl) = (&old.limits, &new.limits);
    out.setting(
        "limits",
        "requests_per_minute",
        &Opt(ol.requests_per_minute),
        &Opt(nl.requests_per_minute),
    );
    out.setting(
        "limits",
        "tokens_per_minute",
        &Opt(ol.tokens_per_minute),
        &Opt(nl.tokens_per_minute),
    );
    named_changes(
        "backend",
        "removed (draining)",
        (&old.backends, &new.backends),
        |b| &b.name,
        backend_changes,
        &mut out,
    );
    named_changes(
        "model",
        "removed",
        (&old.models, &new.models),
        |m| &m.name,
        model_changes,
        &mut out,
    );
    health_changes(&old.health, &new.health, &mut out);
    let (oo, no) = (&old.outlier, &new.outlier);
    out.setting(
        "outlier",
        "consecutive_failures",
        &oo.consecutive_failures,
        &no.consecutive_failures,
    );
    out.setting(
        "outlier",
        "ejection_time",
        &Dur(oo.ejection_time),
        &Dur(no.ejection_time),
    );
    out.setting(
        "outlier",
        "max_ejection_percent",
        &oo.max_ejection_percent,
        &no.max_ejection_percent,
    );
    let (or, nr) = (&old.retry, &new.retry);
    out.setting("retry", "max_attempts", &or.max_attempts, &nr.max_attempts);
    out.setting(
        "retry",
        "base_delay",
        &Dur(or.base_delay),
        &Dur(nr.base_delay),
    );
    out.setting("retry", "max_delay", &Dur(or.max_delay), &Dur(nr.max_delay));
    out.setting(
        "retry",
        "budget_percent",
        &or.budget_percent,
        &nr.budget_percent,
    );
    let cluster = |c: &Config| {
        c.cluster.as_ref().map(|c| {
            (
                c.redis_url_env.clone(),
                c.redis_url.clone(),
                c.key_prefix.clone(),
            )
        })
    };
    if cluster(old) != cluster(new) {
        // The Redis link and its leases are set up once, at start.
        out.push("[cluster] settings changed; needs a restart (still as started)".to_owned());
    }
    if out.0.is_empty() {
        out.push("no changes".to_owned());
    }
    out.0
}

/// `[health]`, key by key (`health.liveness.interval 1s -> 5s`); with the
/// checks switched on or off, only that.
fn health_changes(
    old: &crate::config::HealthConfig,
    new: &crate::config::HealthConfig,
    out: &mut Changes,
) {
    if old.enabled != new.enabled {
        out.setting("health", "enabled", &old.enabled, &new.enabled);
        return;
    }
    out.setting(
        "health",
        "unhealthy_threshold",
        &old.unhealthy_threshold,
        &new.unhealthy_threshold,
    );
    out.setting(
        "health",
        "healthy_threshold",
        &old.healthy_threshold,
        &new.healthy_threshold,
    );
    out.setting(
        "health",
        "slow_start",
        &Dur(old.slow_start),
        &Dur(new.slow_start),
    );
    let (ol, nl) = (&old.liveness, &new.liveness);
    out.setting(
        "health",
        "liveness.interval",
        &Dur(ol.interval),
        &Dur(nl.interval),
    );
    out.setting(
        "health",
        "liveness.timeout",
        &Dur(ol.timeout),
        &Dur(nl.timeout),
    );
    let (or, nr) = (&old.readiness, &new.readiness);
    out.setting(
        "health",
        "readiness.interval",
        &Dur(or.interval),
        &Dur(nr.interval),
    );
    out.setting(
        "health",
        "readiness.timeout",
        &Dur(or.timeout),
        &Dur(nr.timeout),
    );
    out.setting(
        "health",
        "readiness.degraded_latency",
        &Dur(or.degraded_latency),
        &Dur(nr.degraded_latency),
    );
    let (od, nd) = (&old.deep, &new.deep);
    out.setting(
        "health",
        "deep.interval",
        &Dur(od.interval),
        &Dur(nd.interval),
    );
    out.setting("health", "deep.timeout", &Dur(od.timeout), &Dur(nd.timeout));
    out.setting("health", "deep.samples", &od.samples, &nd.samples);
    out.setting("health", "deep.max_tokens", &od.max_tokens, &nd.max_tokens);
}

/// Settings that only take effect at start, where the file differs from
/// what runs: reported, then reset by [`keep_restart_only_settings`].
fn restart_items(old: &Config, new: &Config, out: &mut Changes) {
    let (o, n) = (&old.server, &new.server);
    let mut restart = |key: &str, old: String, new: String| {
        if old != new {
            out.push(format!(
                "server.{key} {old} -> {new} needs a restart (still {old})"
            ));
        }
    };
    restart("listen", o.listen.to_string(), n.listen.to_string());
    restart(
        "admin_listen",
        Opt(o.admin_listen).to_string(),
        Opt(n.admin_listen).to_string(),
    );
    restart(
        "max_connections",
        o.max_connections.to_string(),
        n.max_connections.to_string(),
    );
    restart(
        "max_buffered_body_bytes",
        o.max_buffered_body_bytes.to_string(),
        n.max_buffered_body_bytes.to_string(),
    );
    restart(
        "header_read_timeout",
        Dur(o.header_read_timeout).to_string(),
        Dur(n.header_read_timeout).to_string(),
    );
    restart(
        "idle_timeout",
        Dur(o.idle_timeout).to_string(),
        Dur(n.idle_timeout).to_string(),
    );
    restart(
        "log_format",
        format!("{:?}", o.log_format).to_lowercase(),
        format!("{:?}", n.log_format).to_lowercase(),
    );
    restart(
        "watch_config",
        o.watch_config.to_string(),
        n.watch_config.to_string(),
    );
}

/// Field-by-field changes of one backend present in both configs.
/// Items matched by name between the old and the new list: `WHAT NAME
/// added`, `WHAT NAME REMOVED`, and `changes` for the ones in both.
fn named_changes<T>(
    what: &str,
    removed: &str,
    (old, new): (&[T], &[T]),
    name: impl Fn(&T) -> &str,
    changes: impl Fn(&T, &T, &mut Changes),
    out: &mut Changes,
) {
    for n in new {
        match old.iter().find(|o| name(o) == name(n)) {
            None => out.push(format!("{what} {} added", name(n))),
            Some(o) => changes(o, n, out),
        }
    }
    for o in old {
        if !new.iter().any(|n| name(n) == name(o)) {
            out.push(format!("{what} {} {removed}", name(o)));
        }
    }
}

fn backend_changes(o: &BackendConfig, n: &BackendConfig, out: &mut Changes) {
    if o == n {
        return;
    }
    let who = format!("backend {}", n.name);
    if o.url != n.url {
        // A new identity: fresh health state, in-flight count and pool.
        out.push(format!(
            "{who} url {} -> {} (new identity: health and connections start afresh)",
            o.url, n.url
        ));
    }
    out.field(&who, "weight", &o.weight, &n.weight);
    out.field(&who, "models", &List(&o.models), &List(&n.models));
    out.field(&who, "rename", &Renames(&o.rename), &Renames(&n.rename));
    out.field(
        &who,
        "max_concurrent",
        &Opt(o.max_concurrent),
        &Opt(n.max_concurrent),
    );
    out.field(
        &who,
        "health_path",
        &Quoted(&o.health_path),
        &Quoted(&n.health_path),
    );
    out.field(
        &who,
        "metrics_path",
        &Opt(o.metrics_path.as_deref().map(Quoted)),
        &Opt(n.metrics_path.as_deref().map(Quoted)),
    );
    out.field(
        &who,
        "connect_timeout",
        &Dur(o.connect_timeout),
        &Dur(n.connect_timeout),
    );
    out.field(
        &who,
        "api_key_env",
        &Opt(o.api_key_env.as_deref().map(Quoted)),
        &Opt(n.api_key_env.as_deref().map(Quoted)),
    );
    out.secret(
        &who,
        "api key",
        o.api_key_env == n.api_key_env && o.api_key != n.api_key,
    );
}

/// Field-by-field changes of one model present in both configs.
fn model_changes(o: &ModelConfig, n: &ModelConfig, out: &mut Changes) {
    if o == n {
        return;
    }
    let who = format!("model {}", n.name);
    out.field(
        &who,
        "requests_per_minute",
        &Opt(o.requests_per_minute),
        &Opt(n.requests_per_minute),
    );
    out.field(
        &who,
        "tokens_per_minute",
        &Opt(o.tokens_per_minute),
        &Opt(n.tokens_per_minute),
    );
    out.field(&who, "burst", &Opt(o.burst), &Opt(n.burst));
    out.field(
        &who,
        "max_concurrent",
        &Opt(o.max_concurrent),
        &Opt(n.max_concurrent),
    );
    out.field(
        &who,
        "queue_timeout",
        &Dur(o.queue_timeout),
        &Dur(n.queue_timeout),
    );
    out.field(&who, "max_queue", &o.max_queue, &n.max_queue);
    out.field(&who, "max_tokens", &o.max_tokens, &n.max_tokens);
    out.field(&who, "declared", &o.declared, &n.declared);
}

/// The change list being built.
struct Changes(Vec<String>);

impl Changes {
    fn push(&mut self, item: String) {
        self.0.push(item);
    }

    /// `WHO KEY OLD -> NEW` when the two differ; formats nothing otherwise.
    fn field<T: PartialEq + Display>(&mut self, who: &str, key: &str, old: &T, new: &T) {
        if old != new {
            self.0.push(format!("{who} {key} {old} -> {new}"));
        }
    }

    /// `SECTION.KEY OLD -> NEW` (a section's setting, named as in the
    /// file) when the two differ.
    fn setting<T: PartialEq + Display>(&mut self, section: &str, key: &str, old: &T, new: &T) {
        if old != new {
            self.0.push(format!("{section}.{key} {old} -> {new}"));
        }
    }

    /// `WHO WHAT changed`, for values that must not be shown.
    fn secret(&mut self, who: &str, what: &str, changed: bool) {
        if changed {
            self.0.push(format!("{who} {what} changed"));
        }
    }
}

/// A duration as in the file (`250ms`, `5s`).
#[derive(PartialEq)]
struct Dur(Duration);

impl Display for Dur {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::config::duration_text(self.0))
    }
}

/// An optional value; `none` when unset.
#[derive(PartialEq)]
struct Opt<T>(Option<T>);

impl<T: Display> Display for Opt<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("none"),
        }
    }
}

/// A string value, quoted so an empty one is visible.
#[derive(PartialEq)]
struct Quoted<'a>(&'a str);

impl Display for Quoted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A list of names, `[a, b]`.
#[derive(PartialEq)]
struct List<'a>(&'a [String]);

impl Display for List<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}]", self.0.join(", "))
    }
}

/// A rename table, `{a = b, c = d}` in key order.
#[derive(PartialEq)]
struct Renames<'a>(&'a HashMap<String, String>);

impl Display for Renames<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut pairs: Vec<_> = self.0.iter().collect();
        pairs.sort();
        let pairs: Vec<String> = pairs.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        write!(f, "{{{}}}", pairs.join(", "))
    }
}

/// A refused reload's errors on one log line (each keeps its line:column).
fn one_line(e: &ReloadError) -> String {
    match e {
        ReloadError::Invalid(errors) => errors
            .0
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

/// The loader thread panicked or was cancelled: reported like a file error.
fn join_error(file: &str, e: &tokio::task::JoinError) -> ConfigError {
    ConfigError {
        file: file.to_owned(),
        line: 0,
        column: 0,
        key: "(file)".to_owned(),
        message: format!("config loader failed: {e}"),
    }
}
