//! `[cluster]`: replicas share their rate limits through Redis (or Valkey),
//! exactly, without a round trip per request (SPEC `[cluster]`, issue #10).
//!
//! * [`scripts`]: the bucket arithmetic as atomic Lua scripts in Redis, and
//!   the replica registry;
//! * [`lease`]: one shared limit as a replica sees it: a lease of tokens
//!   spent locally, a slow path that reserves in Redis, a local fallback;
//! * this file: the [`Cluster`] handle (the connection, this replica's id,
//!   the heartbeat, up/down) and the background task that keeps leases
//!   topped up.
//!
//! # Up, down, and back
//!
//! The task heartbeats every [`HEARTBEAT_PERIOD`] into a sorted set of
//! replica ids scored by Redis time; replicas not seen for
//! [`REPLICA_WINDOW`] drop out, and the count is `weir_cluster_replicas`.
//! A heartbeat that fails (or an error on the request path, which makes the
//! task heartbeat at once) takes the cluster *down*: every shared limit
//! switches to its local fallback at this replica's share (SPEC: `rate /
//! replicas last seen`), `weir_cluster_up` goes to 0 and one warning is
//! logged. From then on no request touches Redis; the task retries with
//! jittered exponential back-off and rejoins on the first heartbeat that
//! succeeds, without a restart.
//!
//! The Redis URL is a [`crate::Secret`]: it is handed to the client and
//! never logged or shown. `rediss://` speaks TLS (rustls with `ring`, the
//! system's trust store or `SSL_CERT_FILE`); see docs/CLUSTER.md.

pub mod lease;
pub(crate) mod scripts;
#[cfg(test)]
mod test_redis;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use prometheus_client::metrics::gauge::Gauge;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::{sync::Notify, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
pub use lease::SharedBucket;
use lease::{LeaseStatus, SYNC_PERIOD};
use scripts::Scripts;

/// How often a replica says it is alive.
pub(crate) const HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);

/// A replica not heard from for this long no longer counts.
pub(crate) const REPLICA_WINDOW: Duration = Duration::from_secs(5);

/// How long the task waits for a heartbeat before calling Redis down.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long one lease top-up may take before it counts as failed.
const SYNC_TIMEOUT: Duration = Duration::from_millis(500);

/// Connecting to Redis gives up after this long (then the back-off retries).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The client's own limit on any answer (the request path has a tighter one).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Reconnect back-off while down: from the first to the last, doubling.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_LAST: Duration = Duration::from_secs(2);

/// Wake-ups from the request path are coalesced to at most one top-up per
/// this interval.
const MIN_SYNC_GAP: Duration = Duration::from_millis(5);

/// At shutdown, leases go back to Redis within this time or are abandoned
/// (they then come back by refill).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why `[cluster]` could not be set up (the gateway does not start).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The URL is not one the client accepts; the URL itself is a secret
    /// and is not repeated.
    #[error("cluster: the Redis URL in ${env} is not usable ({kind}); only redis:// and redis+unix:// are supported")]
    Url {
        /// The environment variable that holds the URL.
        env: String,
        /// The client's error category, without the URL.
        kind: String,
    },
}

/// What every shared bucket needs from the cluster: the connection, the
/// scripts and the cluster's state. Owned by the [`Cluster`] and by each
/// [`SharedBucket`] (no cycle: the cluster owns the buckets, the buckets
/// only this).
pub(crate) struct Link {
    /// Multiplexed, reconnecting connection; cloned per call (cheap).
    conn: ConnectionManager,
    /// The compiled scripts.
    scripts: Scripts,
    /// Whether Redis answered the last heartbeat (odd: up), read on every
    /// request to a shared limit; each change adds one, so the value is
    /// also the epoch tokens were taken in (`SharedBucket::refund_taken`).
    state: AtomicU64,
    /// Replicas seen alive at the last heartbeat (at least 1: this one).
    replicas: AtomicU64,
    /// Wakes the task: a lease ran low, or a request saw an error.
    wake: Notify,
    /// Errors the request path saw since the task last looked.
    errors: AtomicU64,
    /// Redis' recent round trip in nanoseconds, from heartbeats, top-ups
    /// and slow-path calls: it rises at once to a slower answer and falls
    /// an eighth of the way to a faster one, so the slow path's wait
    /// ([`Link::slow_path_wait`]) covers a Redis that is slow but live.
    round_trip: AtomicU64,
    /// The last Redis error, for `/admin/cluster`; never holds the URL.
    /// While down, the latest failed heartbeat's; cleared when the link
    /// comes back up, so an outage that ended is not shown as current.
    last_error: Mutex<Option<String>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("up", &self.is_up())
            .field("replicas", &self.replicas())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// A link over `conn`, down until the task's first heartbeat succeeds.
    fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            scripts: Scripts::new(),
            state: AtomicU64::new(0),
            replicas: AtomicU64::new(1),
            wake: Notify::new(),
            errors: AtomicU64::new(0),
            round_trip: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// Records how long a call Redis answered took. An answer slower than
    /// the slow path ever waits counts as that long: a call held through a
    /// pause (seconds) would otherwise keep the wait at its longest long
    /// after Redis is quick again.
    pub(crate) fn observe_round_trip(&self, took: Duration) {
        let _ = self
            .round_trip
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |was| {
                Some(next_round_trip(was, took))
            });
    }

    /// Redis' recent round trip (the estimate, which errs long).
    pub(crate) fn round_trip(&self) -> Duration {
        Duration::from_nanos(self.round_trip.load(Ordering::Acquire))
    }

    /// How long a slow-path request waits for Redis before the fallback
    /// decides: twice the recent round trip and a little, at least
    /// [`lease::SLOW_PATH_TIMEOUT`] and at most [`lease::SLOW_PATH_MAX`].
    /// A Redis slower than 20 ms but live still decides (exactly) instead
    /// of the fallback, whose level follows Redis' a round trip late
    /// (docs/CLUSTER.md "A slow Redis").
    pub(crate) fn slow_path_wait(&self) -> Duration {
        slow_path_wait(self.round_trip())
    }

    /// Whether shared limits are decided with Redis right now.
    pub(crate) fn is_up(&self) -> bool {
        self.state.load(Ordering::Acquire) & 1 == 1
    }

    /// The link's epoch: changes each time it goes down or comes back.
    pub(crate) fn epoch(&self) -> u64 {
        self.state.load(Ordering::Acquire)
    }

    /// Marks the link up or down; a new epoch when that is a change.
    fn set_up(&self, up: bool) {
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                ((state & 1 == 1) != up).then_some(state + 1)
            });
    }

    /// Replicas last seen alive, this one included.
    pub(crate) fn replicas(&self) -> u64 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// Asks the task for a top-up (or a health check) now.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// The request path met an error: remember it and let the task check.
    pub(crate) fn failed(&self, error: &str) {
        self.note_error(error);
        self.errors.fetch_add(1, Ordering::AcqRel);
        self.wake();
    }

    fn note_error(&self, error: &str) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(error.to_owned());
    }

    /// Redis answers again: the errors of the outage are over.
    fn clear_error(&self) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// The round-trip estimate (ns) after an answer that `took` this long,
/// from `was` (`Link::observe_round_trip`).
fn next_round_trip(was: u64, took: Duration) -> u64 {
    let took = u64::try_from(took.min(lease::SLOW_PATH_MAX).as_nanos()).unwrap_or(u64::MAX);
    if took >= was {
        took
    } else {
        was - (was - took) / 8
    }
}

/// The slow path's wait for a Redis `round_trip` away (`Link::slow_path_wait`).
fn slow_path_wait(round_trip: Duration) -> Duration {
    (round_trip * 2 + lease::SLOW_PATH_MARGIN).clamp(lease::SLOW_PATH_TIMEOUT, lease::SLOW_PATH_MAX)
}

/// The cluster handle: one per gateway, kept across reloads (`[cluster]`
/// changes need a restart).
#[derive(Debug)]
pub struct Cluster {
    /// Shared with every bucket.
    link: Arc<Link>,
    /// This replica's member name in the registry: host, pid and a random
    /// suffix, so a restarted process is a new replica.
    replica_id: String,
    /// `cluster.key_prefix`.
    key_prefix: String,
    /// Every shared bucket by Redis key, so a reload that keeps a limit keeps
    /// its lease; the task drops those no snapshot uses any more.
    buckets: Mutex<HashMap<String, Arc<SharedBucket>>>,
    /// `weir_cluster_up`.
    up_gauge: Gauge,
    /// `weir_cluster_replicas`.
    replicas_gauge: Gauge,
    /// When the link last came up (only the cluster task writes it).
    up_since: Mutex<Option<Instant>>,
}

impl Cluster {
    /// Sets up the client (no connection yet: the task connects, and until
    /// it does, limits are enforced locally). `host` names the replica.
    pub(crate) fn new(
        config: &ClusterConfig,
        host: Option<String>,
        up_gauge: Gauge,
        replicas_gauge: Gauge,
    ) -> Result<Arc<Self>, ClusterError> {
        let url_error = |e: redis::RedisError| ClusterError::Url {
            env: config.redis_url_env.clone(),
            kind: format!("{:?}", e.kind()),
        };
        let client = redis::Client::open(config.redis_url.expose()).map_err(url_error)?;
        let manager = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let conn = ConnectionManager::new_lazy_with_config(client, manager).map_err(url_error)?;
        let host = host.filter(|h| !h.is_empty() && h.len() <= 64);
        let replica_id = format!(
            "{}-{}-{:04x}",
            host.as_deref().unwrap_or("weir"),
            std::process::id(),
            rand::random::<u16>()
        );
        up_gauge.set(0);
        replicas_gauge.set(1);
        Ok(Arc::new(Self {
            link: Arc::new(Link::new(conn)),
            replica_id,
            key_prefix: config.key_prefix.clone(),
            buckets: Mutex::new(HashMap::new()),
            up_gauge,
            replicas_gauge,
            up_since: Mutex::new(None),
        }))
    }

    /// The shared bucket for `limit` (`requests` or `tokens`) of `model`
    /// (`None`: the global `[limits]`), at these limits; the same one a
    /// previous snapshot used when there is one (its lease kept, its limits
    /// updated). `None` when the limits cannot be kept exact in Redis: the
    /// caller enforces that limit per process.
    pub fn bucket(
        &self,
        limit: &str,
        model: Option<&str>,
        rate_per_minute: u64,
        capacity: u64,
        now: Instant,
    ) -> Option<Arc<SharedBucket>> {
        // SPEC: `{key_prefix}:{limit}:{model}`; the global limits have no
        // model part, so no model name can collide with them.
        let key = match model {
            Some(model) => format!("{}:{limit}:{model}", self.key_prefix),
            None => format!("{}:{limit}", self.key_prefix),
        };
        let mut buckets = self.lock_buckets();
        if let Some(bucket) = buckets.get(&key) {
            let same = bucket.rate_per_minute() == rate_per_minute && bucket.capacity() == capacity;
            return (same || bucket.set_limits(rate_per_minute, capacity, now))
                .then(|| bucket.clone());
        }
        let bucket = Arc::new(SharedBucket::new(
            key.clone(),
            self.link.clone(),
            rate_per_minute,
            capacity,
            now,
        )?);
        buckets.insert(key, bucket.clone());
        Some(bucket)
    }

    /// Whether shared limits are decided with Redis right now.
    pub fn is_up(&self) -> bool {
        self.link.is_up()
    }

    /// `/admin/cluster`: this replica, the cluster's state, every lease.
    pub(crate) fn status(&self) -> serde_json::Value {
        let mut limits: Vec<LeaseStatus> =
            self.lock_buckets().values().map(|b| b.status()).collect();
        limits.sort_by(|a, b| a.key.cmp(&b.key));
        let last_error = self
            .link
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        serde_json::json!({
            "enabled": true,
            "replica_id": self.replica_id,
            "state": if self.is_up() { "up" } else { "down" },
            "replicas": self.link.replicas(),
            "key_prefix": self.key_prefix,
            "last_error": last_error,
            // How long a request the lease cannot cover waits for Redis now.
            "slow_path_wait_ms": self.link.slow_path_wait().as_secs_f64() * 1000.0,
            "limits": limits,
        })
    }

    /// The background task: heartbeat, top-ups, down and back up; at
    /// shutdown, gives the leases back and leaves the registry.
    pub(crate) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut next_heartbeat = Instant::now();
        let mut next_sync = next_heartbeat;
        let mut last_sync = next_heartbeat;
        let mut backoff = RETRY_FIRST;
        // Log once per outage, and once at start if Redis is not there.
        let mut announced_down = false;
        loop {
            let up = self.link.is_up();
            let deadline = if up {
                next_heartbeat.min(next_sync)
            } else {
                next_heartbeat
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(deadline) => {}
                () = self.link.wake.notified(), if up => {}
            }
            let now = Instant::now();
            if !up {
                if now < next_heartbeat {
                    continue;
                }
                match self.heartbeat(false).await {
                    Ok(()) => {
                        self.come_up(announced_down);
                        announced_down = false;
                        backoff = RETRY_FIRST;
                        next_heartbeat = now + HEARTBEAT_PERIOD;
                        next_sync = now;
                    }
                    Err(error) => {
                        // Logged once per outage; `/admin/cluster` shows
                        // the latest reason (refused, then timing out).
                        if announced_down {
                            self.link.note_error(&error);
                        } else {
                            self.announce_down(&error);
                            announced_down = true;
                        }
                        next_heartbeat = now + RETRY_FIRST.max(crate::jitter::up_to(backoff));
                        backoff = (backoff * 2).min(RETRY_LAST);
                    }
                }
                continue;
            }
            let request_errors = self.link.errors.swap(0, Ordering::AcqRel);
            if now >= next_heartbeat || request_errors > 0 {
                next_heartbeat = now + HEARTBEAT_PERIOD;
                if let Err(error) = self.heartbeat(false).await {
                    self.go_down(&error, now);
                    announced_down = true;
                    next_heartbeat = now + RETRY_FIRST;
                    continue;
                }
            }
            // Coalesce wake-ups: at most one top-up per MIN_SYNC_GAP.
            let earliest = last_sync + MIN_SYNC_GAP;
            if now < earliest {
                tokio::time::sleep_until(earliest).await;
            }
            let now = Instant::now();
            self.sync_all(now, false).await;
            last_sync = now;
            next_sync = now + SYNC_PERIOD;
        }
        self.leave().await;
    }

    /// One heartbeat: registers (or, with `leave`, removes) this replica and
    /// learns how many are alive.
    async fn heartbeat(&self, leave: bool) -> Result<(), String> {
        let key = format!("{}:replicas", self.key_prefix);
        let mut conn = self.link.conn.clone();
        let call =
            self.link
                .scripts
                .heartbeat(&mut conn, &key, &self.replica_id, REPLICA_WINDOW, leave);
        let sent = Instant::now();
        let replicas = match tokio::time::timeout(HEARTBEAT_TIMEOUT, call).await {
            Ok(Ok(n)) => {
                self.link.observe_round_trip(sent.elapsed());
                n.max(1)
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("heartbeat timed out".to_owned()),
        };
        if leave {
            return Ok(());
        }
        if !self.link.is_up() {
            // Joining (or back after an outage): the scripts go in first.
            let load = self.link.scripts.load(&mut conn);
            match tokio::time::timeout(HEARTBEAT_TIMEOUT, load).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("loading the scripts timed out".to_owned()),
            }
        }
        // Every replica's heartbeats failed during an outage, so the
        // registry has aged them all out: the first ones back would count
        // too few (and each take a larger fallback share). Until a whole
        // window of heartbeats has run again, the count does not drop.
        let settling = !self.link.is_up()
            || self
                .up_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_none_or(|since| since.elapsed() < REPLICA_WINDOW);
        let replicas = if settling {
            replicas.max(self.link.replicas())
        } else {
            replicas
        };
        self.link.replicas.store(replicas, Ordering::Relaxed);
        self.replicas_gauge
            .set(i64::try_from(replicas).unwrap_or(i64::MAX));
        let now = Instant::now();
        for bucket in self.lock_buckets().values() {
            bucket.reshare(replicas, now);
        }
        Ok(())
    }

    /// Tops every lease up at once (the connection pipelines the calls);
    /// buckets no snapshot holds any more give their lease back and go.
    async fn sync_all(&self, now: Instant, force_return: bool) {
        let (live, gone) = {
            let mut buckets = self.lock_buckets();
            // Only the registry holds a bucket no snapshot uses.
            let gone: Vec<String> = buckets
                .iter()
                .filter(|(_, b)| Arc::strong_count(b) == 1)
                .map(|(k, _)| k.clone())
                .collect();
            let gone: Vec<Arc<SharedBucket>> =
                gone.iter().filter_map(|k| buckets.remove(k)).collect();
            let live: Vec<Arc<SharedBucket>> = buckets.values().cloned().collect();
            (live, gone)
        };
        let mut calls = JoinSet::new();
        for (bucket, force) in live
            .into_iter()
            .map(|b| (b, force_return))
            .chain(gone.into_iter().map(|b| (b, true)))
        {
            calls.spawn(async move {
                match tokio::time::timeout(SYNC_TIMEOUT, bucket.sync(now, force)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("lease top-up timed out".to_owned()),
                }
            });
        }
        while let Some(done) = calls.join_next().await {
            if let Ok(Err(error)) = done {
                self.link.failed(&error);
            }
        }
    }

    /// Redis stopped answering: every shared limit falls back to this
    /// replica's share (logged once per outage).
    fn go_down(&self, error: &str, now: Instant) {
        self.link.set_up(false);
        for bucket in self.lock_buckets().values() {
            bucket.enter_fallback(now);
        }
        self.announce_down(error);
    }

    fn announce_down(&self, error: &str) {
        self.link.note_error(error);
        self.up_gauge.set(0);
        tracing::warn!(
            error = %error,
            replicas = self.link.replicas(),
            "cluster: Redis is unreachable; each shared limit is enforced locally at this replica's share until it is back"
        );
    }

    fn come_up(&self, after_outage: bool) {
        self.link.errors.store(0, Ordering::Release);
        self.link.clear_error();
        self.link.set_up(true);
        *self.up_since.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        self.up_gauge.set(1);
        let replicas = self.link.replicas();
        if after_outage {
            tracing::info!(replica = %self.replica_id, replicas, "cluster: Redis is back; limits are shared again");
        } else {
            tracing::info!(replica = %self.replica_id, replicas, "cluster: joined; limits are shared through Redis");
        }
    }

    /// Graceful shutdown: the leases go back to Redis and the replica leaves
    /// the registry, within [`LEAVE_TIMEOUT`].
    async fn leave(&self) {
        if !self.link.is_up() {
            return;
        }
        let leave = async {
            self.sync_all(Instant::now(), true).await;
            let _ = self.heartbeat(true).await;
        };
        if tokio::time::timeout(LEAVE_TIMEOUT, leave).await.is_err() {
            tracing::warn!(
                "cluster: leases not returned within {LEAVE_TIMEOUT:?}; they return by refill"
            );
        }
        self.link.set_up(false);
        self.up_gauge.set(0);
    }

    fn lock_buckets(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<SharedBucket>>> {
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cluster::test_redis::TestRedis, config::Secret};

    #[test]
    fn the_slow_path_waits_twice_the_round_trip_it_has_seen() {
        let ms = Duration::from_millis;
        // Up at once to a slower answer, down an eighth of the way.
        let rtt = next_round_trip(0, ms(80));
        assert_eq!(rtt, 80_000_000);
        assert_eq!(next_round_trip(rtt, ms(40)), 75_000_000);
        // An answer held through a pause counts as the longest wait.
        assert_eq!(next_round_trip(rtt, Duration::from_secs(5)), 250_000_000);
        // A quick Redis again: back to the floor within a few dozen answers.
        let mut rtt = 250_000_000;
        for _ in 0..30 {
            rtt = next_round_trip(rtt, Duration::from_micros(200));
        }
        assert_eq!(slow_path_wait(Duration::from_nanos(rtt)), ms(20));
        assert_eq!(slow_path_wait(ms(80)), ms(165));
        assert_eq!(slow_path_wait(ms(200)), ms(250));
    }

    /// `/admin/cluster`'s `last_error` once `done` says it is settled, or
    /// after 15 s (generous: the task retries at most every 2 s).
    async fn settled(
        cluster: &Cluster,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let status = cluster.status();
            if done(&status) || Instant::now() > deadline {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `last_error` is the current outage's latest reason and goes away
    /// when Redis is back: a review saw `"state":"up"` beside the error of
    /// an outage long over. Nothing listens on the port at first
    /// (refused), then something that never answers (a timeout), then
    /// Redis.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn last_error_follows_the_outage_and_clears_when_redis_is_back() {
        let Some(port) = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()
            .map(|a| a.port())
        else {
            return;
        };
        let config = ClusterConfig {
            redis_url_env: "WEIR_REDIS_URL".to_owned(),
            redis_url: Secret::new(format!("redis://127.0.0.1:{port}/")),
            key_prefix: "last-error".to_owned(),
        };
        let cluster =
            Cluster::new(&config, None, Gauge::default(), Gauge::default()).expect("URL parses");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(cluster.clone().run(shutdown.clone()));

        let status = settled(&cluster, |s| s["last_error"].is_string()).await;
        assert_eq!(status["state"], "down", "{status}");
        let refused = status["last_error"].clone();
        assert!(refused.is_string(), "{status}");

        let silent = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("the port is free again");
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
            }
        });
        let status = settled(&cluster, |s| s["last_error"] != refused).await;
        assert_eq!(status["state"], "down", "{status}");
        assert!(status["last_error"].is_string(), "{status}");
        assert_ne!(status["last_error"], refused, "a later reason replaces it");
        hold.abort();
        let _ = hold.await;

        let Some(_redis) = TestRedis::start_on(port) else {
            shutdown.cancel();
            return;
        };
        let status = settled(&cluster, |s| s["state"] == "up").await;
        assert_eq!(status["state"], "up", "{status}");
        assert!(status["last_error"].is_null(), "{status}");
        shutdown.cancel();
        task.await.expect("the task ends");
    }
}
