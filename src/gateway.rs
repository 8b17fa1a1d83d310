//! Starting and stopping a gateway: the shared state, the listeners, and
//! the handle that `main.rs` and the tests hold.
//!
//! The library never installs signal handlers: `main.rs` turns signals into
//! calls on [`Handle`] (as mini-redis' `run(listener, shutdown)`), so tests
//! drive shutdown the same way a signal does.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use arc_swap::ArcSwap;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    cluster::{Cluster, ClusterError},
    config::{Config, ConfigErrors},
    health::checker,
    metrics::Metrics,
    server::{self, Role},
    snapshot::Snapshot,
    socket,
    upstream::UpstreamError,
};

/// The environment lookup used for `*_env` keys on reload; injected so tests
/// never touch the process environment.
pub type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// State every connection and request shares.
pub(crate) struct Shared {
    /// The current routing state; requests `load_full` it once.
    pub snapshot: ArcSwap<Snapshot>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Caps concurrent client connections (`server.max_connections`)
    /// across every listener.
    pub connections: Arc<Semaphore>,
    /// Caps the request-body bytes held at once
    /// (`server.max_buffered_body_bytes`) across every connection.
    pub body_budget: crate::body_budget::BodyBudget,
    /// The file to re-read on reload (`None` for `weir demo` and tests that
    /// build their config in memory).
    pub config_path: Option<PathBuf>,
    /// Resolves `*_env` keys on reload.
    pub env: EnvLookup,
    /// Serialises reloads; never touched by the request path.
    pub reload_lock: tokio::sync::Mutex<()>,
    /// Cancelled when a shutdown starts: a reload still reading the file or
    /// probing new backends is called off then, so stopping never waits
    /// out a probe's timeout (whoever asked, a signal, the watcher or
    /// `POST /admin/reload`).
    pub stopping: CancellationToken,
    /// Serialises "load snapshot, build the next, store it" between reloads
    /// and health rebuilds (held for a synchronous build, never across an
    /// await), so neither publishes a stale view over the other.
    pub build_lock: std::sync::Mutex<()>,
    /// Serialises outlier ejections, so that "not ejected yet, and under
    /// `max_ejection_percent`" and the ejection are one step: concurrent
    /// failures neither eject one backend twice (doubling its time) nor two
    /// backends past the share. Taken only by a failure that reached
    /// `consecutive_failures`.
    pub ejections: std::sync::Mutex<()>,
    /// Wakes the health supervisor to rebuild the snapshot.
    pub rebuild: tokio::sync::Notify,
    /// The probe tasks, one per backend and tier.
    pub probes: std::sync::Mutex<ProbeTasks>,
    /// Requests between admission and their answer (the retry budget's
    /// base). Per lane (a gauge's slots, never exported): every request
    /// counts itself in and out, and only a retry reads the sum.
    pub active_requests: crate::metrics::LaneGauge,
    /// Retries in progress (capped by `retry.budget_percent` of the above).
    pub active_retries: std::sync::atomic::AtomicU64,
    /// `[cluster]`: the Redis link and the shared buckets; fixed at start
    /// (changing `[cluster]` needs a restart), so leases outlive reloads.
    pub cluster: Option<Arc<Cluster>>,
    /// Set when `shutdown_grace` ran out: a request dropped from then on
    /// was cut by weir, not left by its client (its log says `shutdown`).
    pub cut: std::sync::atomic::AtomicBool,
    /// Cancelled when `shutdown_grace` ends: by a second signal, or by the
    /// accept loop when the grace runs out. Connections still open then
    /// answer their waiting requests 503 and end their SSE streams with an
    /// `error` event (`server::GraceEnd`), and are dropped shortly after.
    /// Waited on only once a shutdown has started.
    pub grace_over: CancellationToken,
}

impl Shared {
    /// How a request that ends before its answer is whole ended: its client
    /// left, or weir cut it at the end of `shutdown_grace`.
    pub(crate) fn gone(&self) -> crate::access_log::Ending {
        if self.cut.load(std::sync::atomic::Ordering::Relaxed) {
            crate::access_log::Ending::Shutdown
        } else {
            crate::access_log::Ending::ClientGone
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

/// The active checker's tasks and their cancellation tokens.
pub(crate) struct ProbeTasks {
    /// Every probe task.
    pub set: JoinSet<()>,
    /// One token per backend identity, cancelling it stops its three tiers,
    /// with the key they were started under (a new key restarts them).
    pub running: std::collections::HashMap<
        crate::health::checker::BackendKey,
        (CancellationToken, Option<crate::Secret>),
    >,
    /// Parent of every backend token; cancelled at shutdown.
    pub root: CancellationToken,
    /// The tier intervals the running tasks were started with.
    pub intervals: Option<[std::time::Duration; 3]>,
}

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address could not be bound.
    /// (The OS error is the source, not part of this message: error chains,
    /// as `weir`'s `{:#}` prints them, would say it twice.)
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address from the config.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The upstream clients could not be built.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// A listener's address could not be read.
    #[error("listener: {0}")]
    Listener(std::io::Error),
    /// `[cluster]` could not be set up.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The gateway was started without a config file.
    #[error("this gateway was started without a config file; nothing to reload")]
    NoConfigFile,
    /// The new file is invalid; the old config keeps serving.
    #[error("{0}")]
    Invalid(ConfigErrors),
    /// The new snapshot could not be built.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The reload's task ended before the reload did (weir is stopping).
    #[error("the reload did not finish: {0}")]
    Interrupted(String),
    /// A shutdown started before the reload changed anything; nothing did.
    #[error("weir is shutting down; the reload was called off")]
    ShuttingDown,
}

/// A gateway to start: a validated config plus where it came from.
pub struct Gateway {
    config: Config,
    config_path: Option<PathBuf>,
    env: EnvLookup,
}

/// A running gateway.
pub struct Handle {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    /// The health supervisor, apart from `tasks`: it runs on through a
    /// shutdown's grace (a waiting request may yet get a backend whose
    /// 429 window or ejection ends then) and stops once they have ended.
    supervisor: JoinSet<()>,
    supervisor_stop: CancellationToken,
}

impl Gateway {
    /// A gateway for this config; `*_env` keys resolve from the process
    /// environment on reload unless [`Gateway::env`] says otherwise.
    pub fn new(config: Config) -> Self {
        let config_path = config.source.clone();
        Self {
            config,
            config_path,
            env: Arc::new(crate::config::process_env),
        }
    }

    /// Where reloads read the config from (defaults to the config's source).
    pub fn config_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_path = Some(path.into());
        self
    }

    /// The environment lookup reloads use.
    pub fn env(mut self, env: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        self.env = Arc::new(env);
        self
    }

    /// Binds `server.listen` (and `admin_listen`) and starts serving.
    pub async fn start(self) -> Result<Handle, StartError> {
        let listen = self.config.server.listen;
        let listener = socket::listen(listen).map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;
        let admin = match self.config.server.admin_listen {
            Some(addr) => {
                Some(socket::listen(addr).map_err(|source| StartError::Bind { addr, source })?)
            }
            None => None,
        };
        self.start_on(listener, admin)
    }

    /// Starts serving on listeners the caller bound (tests bind port 0).
    /// With `admin = None`, `/metrics` and `/admin/*` are served on `listener`.
    pub fn start_on(
        self,
        listener: TcpListener,
        admin: Option<TcpListener>,
    ) -> Result<Handle, StartError> {
        let config = Arc::new(self.config);
        let shutdown = CancellationToken::new();
        let metrics = Metrics::new();
        let cluster = match &config.cluster {
            Some(cluster) => Some(Cluster::new(
                cluster,
                (self.env)("HOSTNAME"),
                metrics.cluster_up.clone(),
                metrics.cluster_replicas.clone(),
            )?),
            None => None,
        };
        let snapshot = Snapshot::build_first(config.clone(), &metrics, cluster.clone())?;
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            connections: Arc::new(Semaphore::new(config.server.max_connections.max(1))),
            body_budget: crate::body_budget::BodyBudget::new(config.server.max_buffered_body_bytes),
            config_path: self.config_path,
            env: self.env,
            reload_lock: tokio::sync::Mutex::new(()),
            stopping: shutdown.child_token(),
            build_lock: std::sync::Mutex::new(()),
            ejections: std::sync::Mutex::new(()),
            rebuild: tokio::sync::Notify::new(),
            probes: std::sync::Mutex::new(ProbeTasks {
                set: JoinSet::new(),
                running: std::collections::HashMap::new(),
                root: shutdown.child_token(),
                intervals: None,
            }),
            active_requests: crate::metrics::LaneGauge::default(),
            active_retries: std::sync::atomic::AtomicU64::new(0),
            cluster: cluster.clone(),
            cut: std::sync::atomic::AtomicBool::new(false),
            grace_over: CancellationToken::new(),
        });
        let addr = listener.local_addr().map_err(StartError::Listener)?;
        let admin_addr = match &admin {
            Some(l) => Some(l.local_addr().map_err(StartError::Listener)?),
            None => None,
        };
        let mut tasks = JoinSet::new();
        let main_role = if admin.is_some() {
            Role::Public
        } else {
            Role::Both
        };
        tasks.spawn(server::serve(
            listener,
            main_role,
            shared.clone(),
            shutdown.child_token(),
        ));
        if let Some(admin) = admin {
            tasks.spawn(server::serve(
                admin,
                Role::Admin,
                shared.clone(),
                shutdown.child_token(),
            ));
        }
        shared.metrics.publish_weights(&shared.snapshot.load());
        let supervisor_stop = CancellationToken::new();
        let mut supervisor = JoinSet::new();
        supervisor.spawn(checker::supervise(shared.clone(), supervisor_stop.clone()));
        if let Some(cluster) = cluster {
            tasks.spawn(cluster.run(shutdown.child_token()));
        }
        // `server.watch_config` is read at start only (a reload that flips it
        // reports that it needs a restart).
        if config.server.watch_config {
            match shared.config_path.clone() {
                Some(path) => {
                    tasks.spawn(crate::watch::watch(
                        shared.clone(),
                        path,
                        shutdown.child_token(),
                    ));
                }
                None => tracing::warn!("watch_config is set but there is no config file to watch"),
            }
        }
        checker::sync_probes(&shared, false);
        Ok(Handle {
            addr,
            admin_addr,
            shared,
            shutdown,
            tasks,
            supervisor,
            supervisor_stop,
        })
    }
}

impl Handle {
    /// The address clients send `/v1/...` to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of `/metrics` and `/admin/*` (the main one when no
    /// `admin_listen` is configured).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr.unwrap_or(self.addr)
    }

    /// The routing state requests load right now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// Re-reads the config file and swaps it in if valid (SIGHUP).
    pub async fn reload(&self) -> Result<Vec<String>, ReloadError> {
        server::reload(&self.shared).await
    }

    /// Starts a graceful shutdown: stop accepting, let in-flight requests
    /// finish within `shutdown_grace`.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Cancelling this ends the `shutdown_grace` of a shutdown under way at
    /// once (an operator's second signal), as if it ran out: requests still
    /// waiting are answered 503 `shutting_down`, SSE streams still running
    /// end with an `error` event, connections still open are closed
    /// shortly after, and what they were serving is logged as cut by weir
    /// (`ending="shutdown"`); [`Handle::wait`] then returns. A token, since
    /// `wait` takes the handle.
    pub fn grace_ender(&self) -> CancellationToken {
        self.shared.grace_over.clone()
    }

    /// Waits until every listener has shut down and its connections closed
    /// (or `shutdown_grace` ran out).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
        self.supervisor_stop.cancel();
        while self.supervisor.join_next().await.is_some() {}
    }
}
