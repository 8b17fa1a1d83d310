//! The configuration file: parsing, validation and the resolved view `weir check` prints.
//!
//! Two layers, as STYLE.md §6 asks. Private `Raw*` structs mirror the TOML exactly
//! (`deny_unknown_fields`, every value a validation message must point at wrapped in
//! [`toml::Spanned`]); [`Config::parse`] turns them into the public, typed [`Config`]
//! (`Duration`, `NonZero*`, parsed URIs, [`Secret`]s) and collects *every* problem on the way
//! instead of stopping at the first, the way linkerd2-proxy's `app/src/env.rs` parses every
//! variable and fails only afterwards. Nothing downstream re-checks or re-parses a value.
//!
//! Durations and integers are deserialized loosely (strings and `i64`) on purpose: a bad
//! `"5 parsecs"` or a negative count is then a validation error with its line, column and key
//! path, reported together with all the others, rather than a serde abort that hides the rest.
//! Only TOML syntax errors and wrong types/unknown keys stop early, because serde cannot go on.
//!
//! This module does no I/O besides reading the file in [`Config::load`]; the environment is
//! injected (`&dyn Fn(&str) -> Option<String>`) so tests never touch the process environment.
//! Defaults live in [`defaults`] only; `config/weir.toml` mirrors them and a test checks that.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::SocketAddr,
    num::{NonZeroU32, NonZeroU64},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

/// A secret value (API key, token, Redis URL).
///
/// Why a newtype: `Debug` and `Display` print `[redacted]`, so a secret cannot reach a log
/// line, an error message or `weir check` output by accident (SPEC "Secrets"). The value is
/// only reachable through the explicit [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value read from the environment.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The raw value, for the one place that must send or compare it (an `Authorization`
    /// header, a constant-time comparison, the Redis client).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The validated configuration: everything the gateway needs, typed, defaults filled in.
///
/// Why one value: a reload builds a whole new `Config` and swaps it in atomically, so the
/// request path never sees half of an old file and half of a new one.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (`None` when parsed from a string), so reload knows what to read.
    pub source: Option<PathBuf>,
    /// A hash of that file's bytes as read ([`fingerprint`]), so `watch_config` can tell
    /// whether the file still holds what is served, including a change made before its
    /// watch began.
    pub source_fingerprint: Option<u64>,
    /// `[server]`: listeners, client-facing limits and timeouts, client/admin credentials.
    pub server: ServerConfig,
    /// `[limits]`: the global token buckets shared by all models.
    pub limits: GlobalLimits,
    /// `[defaults]`: what every model inherits unless its `[[models]]` entry overrides it.
    pub defaults: Defaults,
    /// Declared `[[models]]` first, in file order, then one entry per model that only
    /// backends name (`declared = false`, `[defaults]` limits), in order of first mention.
    pub models: Vec<ModelConfig>,
    /// `[[backends]]`, in file order.
    pub backends: Vec<BackendConfig>,
    /// `[health]`: the three-tier active checker.
    pub health: HealthConfig,
    /// `[outlier]`: passive ejection from live traffic.
    pub outlier: OutlierConfig,
    /// `[retry]`: attempts, back-off and the retry budget.
    pub retry: RetryConfig,
    /// `[cluster]`: shared rate limits through Redis; `None` = limits per process.
    pub cluster: Option<ClusterConfig>,
    /// Non-fatal notes in the `FILE:LINE:COL: KEY: message` form, e.g. a backend serving an
    /// undeclared model. `weir check` prints them; the gateway logs them once per load.
    pub warnings: Vec<String>,
}

/// How log lines are written.
///
/// Why an enum: the only two formats `tracing-subscriber` is set up for here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `[server]`: what clients connect to and the limits that protect weir from them.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where clients send `/v1/...`. Changing it on reload needs a restart.
    pub listen: SocketAddr,
    /// Separate listener for `/metrics` and `/admin/*`; `None` = serve them on `listen`.
    pub admin_listen: Option<SocketAddr>,
    /// Request bodies larger than this get 413 and are read no further.
    pub max_body_bytes: usize,
    /// Request-body bytes held in memory at once, across every connection
    /// (beyond SPEC); an HTTP/1.1 body that finds no room waits, an
    /// HTTP/2 one is refused (503). At least
    /// `max_body_bytes`. Changing it on reload needs a restart.
    pub max_buffered_body_bytes: usize,
    /// The whole request: queueing plus every attempt.
    pub request_timeout: Duration,
    /// An upstream must send response headers within this, or the attempt fails.
    pub first_byte_timeout: Duration,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Log line format.
    pub log_format: LogFormat,
    /// Keys clients must send as Bearer, read from the env var named by `api_keys_env`
    /// (comma-separated, trimmed, empties dropped, never empty). `None` = no client auth.
    pub api_keys: Option<Vec<Secret>>,
    /// The env var the client keys came from, for `weir check` and log messages.
    pub api_keys_env: Option<String>,
    /// Bearer token `/admin/*` requires; `None` = admin answers loopback clients only.
    pub admin_token: Option<Secret>,
    /// The env var the admin token came from.
    pub admin_token_env: Option<String>,
    /// Client connections beyond this wait in the kernel backlog. Always > 0.
    pub max_connections: usize,
    /// A client must finish sending request headers within this (slowloris).
    pub header_read_timeout: Duration,
    /// An idle keep-alive client connection is closed after this.
    pub idle_timeout: Duration,
    /// Reload when the file changes on disk (in addition to SIGHUP).
    pub watch_config: bool,
}

/// `[limits]`: global buckets across all models; `None` = no limit of that kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GlobalLimits {
    /// Global request rate.
    pub requests_per_minute: Option<NonZeroU32>,
    /// Global token rate (prompt estimate + `max_tokens`, reconciled with real usage).
    pub tokens_per_minute: Option<NonZeroU64>,
}

/// `[defaults]`: per-model admission settings inherited by every model that does not override.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    /// Longest a request may wait for limits before 429.
    pub queue_timeout: Duration,
    /// Requests waiting per model beyond which new ones get 429 at once.
    pub max_queue: u32,
    /// Completion tokens assumed when a request sets no `max_tokens`.
    pub max_tokens: u32,
}

/// One model clients may ask for, with its admission limits already resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The `model` value clients send; listed by `GET /v1/models`.
    pub name: String,
    /// Request bucket refill rate; `None` = no request limit for this model.
    pub requests_per_minute: Option<NonZeroU32>,
    /// Token bucket refill rate; `None` = no token limit for this model.
    pub tokens_per_minute: Option<NonZeroU64>,
    /// Request bucket capacity; `None` = `requests_per_minute` (see [`ModelConfig::burst_capacity`]).
    pub burst: Option<NonZeroU32>,
    /// Concurrency semaphore size; `None` = unbounded.
    pub max_concurrent: Option<NonZeroU32>,
    /// `queue_timeout` from the entry, else `[defaults]`.
    pub queue_timeout: Duration,
    /// `max_queue` from the entry, else `[defaults]`.
    pub max_queue: u32,
    /// `max_tokens` from the entry, else `[defaults]`.
    pub max_tokens: u32,
    /// `false` when only a backend names this model (it then has `[defaults]` limits only).
    pub declared: bool,
}

/// One upstream server and the models it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    /// Unique, non-empty; the `x-weir-backend` header and metric label.
    pub name: String,
    /// OpenAI-style base URL, kept exactly as parsed: absolute, `http`/`https`, with a host,
    /// no user-info, query or fragment. Its path may end in `/` (`"http://h/"`, `".../v1/"`);
    /// joiners must trim trailing slashes. Reload identity is `name` + `url`.
    pub url: http::Uri,
    /// The env var holding the upstream key, when one is configured.
    pub api_key_env: Option<String>,
    /// Sent upstream as `Authorization: Bearer`; resolved from `api_key_env` (non-empty).
    pub api_key: Option<Secret>,
    /// Models this backend serves, non-empty, no duplicates, file order.
    pub models: Vec<String>,
    /// Client model name -> name sent upstream; every key is in `models`.
    pub rename: HashMap<String, String>,
    /// Relative share among the backends serving the same model; 0 = never picked.
    pub weight: u32,
    /// In-flight cap; a saturated backend is skipped. `None` = unbounded.
    pub max_concurrent: Option<NonZeroU32>,
    /// Liveness probe path against the URL's origin; `""` = `GET {url}/models`; else starts
    /// with `/`.
    pub health_path: String,
    /// Engine metrics path (starts with `/`) against the URL's origin, read by the deep tier.
    pub metrics_path: Option<String>,
    /// TCP (+TLS) connect timeout for this backend.
    pub connect_timeout: Duration,
}

/// `[health]`: the active three-tier checker.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// `false` switches active probes off (backends then stay in rotation unless ejected).
    pub enabled: bool,
    /// Consecutive failing probes before a backend is taken out.
    pub unhealthy_threshold: NonZeroU32,
    /// Consecutive passing probes before it comes back.
    pub healthy_threshold: NonZeroU32,
    /// Weight ramps from 10% to 100% over this after coming back; zero = no ramp.
    pub slow_start: Duration,
    /// `GET health_path`.
    pub liveness: ProbeTier,
    /// A one-token completion; slower than `degraded_latency` = degraded.
    pub readiness: ReadinessTier,
    /// Throughput/TTFT samples and engine metrics.
    pub deep: DeepTier,
}

/// Schedule of a probe tier. Both durations are > 0.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeTier {
    /// Time between probes (each jittered).
    pub interval: Duration,
    /// A probe not answered within this fails.
    pub timeout: Duration,
}

/// Schedule of the readiness tier. All durations are > 0.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadinessTier {
    /// Time between probes.
    pub interval: Duration,
    /// A probe not answered within this fails.
    pub timeout: Duration,
    /// An answer slower than this marks the backend degraded.
    pub degraded_latency: Duration,
}

/// Schedule and size of the deep tier. Durations and counts are > 0.
#[derive(Debug, Clone, PartialEq)]
pub struct DeepTier {
    /// Time between rounds.
    pub interval: Duration,
    /// A round not finished within this fails.
    pub timeout: Duration,
    /// Short completions per round.
    pub samples: u32,
    /// `max_tokens` of each sample completion.
    pub max_tokens: u32,
}

/// `[outlier]`: passive ejection judged from live traffic (Envoy's rules).
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// Failures in a row that eject a backend.
    pub consecutive_failures: NonZeroU32,
    /// Base ejection time (> 0), multiplied by the ejection count, capped at 5 minutes.
    pub ejection_time: Duration,
    /// A new ejection is allowed while fewer than this share of a model's backends are out;
    /// 0..=100.
    pub max_ejection_percent: u8,
}

/// `[retry]`: attempts per request and their back-off.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Attempts per request, the first included.
    pub max_attempts: NonZeroU32,
    /// Back-off base (full jitter); may be zero.
    pub base_delay: Duration,
    /// Back-off cap; always >= `base_delay`.
    pub max_delay: Duration,
    /// Retries never exceed this share of in-flight requests; 0..=100.
    pub budget_percent: u8,
}

/// `[cluster]`: replicas share the rate limits through Redis.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The env var holding the Redis URL.
    pub redis_url_env: String,
    /// `redis://`, `rediss://` (TLS) or `redis+unix://` URL; a secret because
    /// it may carry a password.
    pub redis_url: Secret,
    /// Redis keys are `{key_prefix}:{limit}:{model}`; non-empty.
    pub key_prefix: String,
}

/// One problem in the file: renders as `FILE:LINE:COLUMN: KEY.PATH: message` (SPEC "`weir
/// check` errors"), with 1-based line and column (in characters).
///
/// `key` is a path such as `server.listen`, `models[1].burst`; `(syntax)` for TOML syntax
/// errors and `(file)` when the file cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{file}:{line}:{column}: {key}: {message}")]
pub struct ConfigError {
    /// The file name as given to [`Config::load`] / [`Config::parse`].
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    /// Dotted key path with array indices.
    pub key: String,
    /// Lower-case, no final period; never contains a secret value.
    pub message: String,
}

/// Every error found in a file (never just the first), in file order where known.
///
/// Display: one error per line, ready for `weir check` and the `/admin/reload` answer.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// What `weir check` reports about a file: the configuration or every
/// error, and the warnings in both cases, since a file with errors can
/// deserve warnings too and the errors alone would hide them.
#[derive(Debug)]
pub struct Checked {
    /// The configuration (which keeps its warnings), or every error.
    pub result: Result<Config, ConfigErrors>,
    /// Every warning, `FILE:LINE:COLUMN: KEY.PATH: message`.
    pub warnings: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// The default of every key, in one place (STYLE.md §6); `config/weir.toml` mirrors these
/// and `tests::example_file_mirrors_defaults` checks that the two agree.
pub mod defaults {
    use std::{
        net::{Ipv4Addr, SocketAddr, SocketAddrV4},
        num::NonZeroU32,
        time::Duration,
    };

    /// `server.listen`.
    pub const LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8080));
    /// `server.max_body_bytes` (10 MiB).
    pub const MAX_BODY_BYTES: usize = 10_485_760;
    /// `server.max_buffered_body_bytes` (1 GiB, or `max_body_bytes` when
    /// that is larger).
    pub const MAX_BUFFERED_BODY_BYTES: usize = 1 << 30;
    /// `server.request_timeout`.
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
    /// `server.first_byte_timeout`.
    pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(60);
    /// `server.shutdown_grace`.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    /// `server.max_connections`.
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// `server.header_read_timeout`.
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// `server.idle_timeout`.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    /// `server.watch_config`.
    pub const WATCH_CONFIG: bool = false;

    /// `defaults.queue_timeout`.
    pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
    /// `defaults.max_queue`.
    pub const MAX_QUEUE: u32 = 1000;
    /// `defaults.max_tokens`.
    pub const MAX_TOKENS: u32 = 256;

    /// `backends[].weight`.
    pub const WEIGHT: u32 = 100;
    /// `backends[].health_path` (`""` = `GET {url}/models`).
    pub const HEALTH_PATH: &str = "";
    /// `backends[].connect_timeout`.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// `health.enabled`.
    pub const HEALTH_ENABLED: bool = true;
    /// `health.unhealthy_threshold`.
    pub const UNHEALTHY_THRESHOLD: NonZeroU32 = NonZeroU32::MIN.saturating_add(2);
    /// `health.healthy_threshold`.
    pub const HEALTHY_THRESHOLD: NonZeroU32 = NonZeroU32::MIN.saturating_add(1);
    /// `health.slow_start`.
    pub const SLOW_START: Duration = Duration::from_secs(30);
    /// `health.liveness.interval`.
    pub const LIVENESS_INTERVAL: Duration = Duration::from_secs(5);
    /// `health.liveness.timeout`.
    pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(2);
    /// `health.readiness.interval`.
    pub const READINESS_INTERVAL: Duration = Duration::from_secs(30);
    /// `health.readiness.timeout`.
    pub const READINESS_TIMEOUT: Duration = Duration::from_secs(10);
    /// `health.readiness.degraded_latency`.
    pub const DEGRADED_LATENCY: Duration = Duration::from_secs(5);
    /// `health.deep.interval`.
    pub const DEEP_INTERVAL: Duration = Duration::from_secs(300);
    /// `health.deep.timeout`.
    pub const DEEP_TIMEOUT: Duration = Duration::from_secs(60);
    /// `health.deep.samples`.
    pub const DEEP_SAMPLES: u32 = 5;
    /// `health.deep.max_tokens`.
    pub const DEEP_MAX_TOKENS: u32 = 16;

    /// `outlier.consecutive_failures`.
    pub const CONSECUTIVE_FAILURES: NonZeroU32 = NonZeroU32::MIN.saturating_add(4);
    /// `outlier.ejection_time`.
    pub const EJECTION_TIME: Duration = Duration::from_secs(30);
    /// `outlier.max_ejection_percent`.
    pub const MAX_EJECTION_PERCENT: u8 = 50;

    /// `retry.max_attempts`.
    pub const MAX_ATTEMPTS: NonZeroU32 = NonZeroU32::MIN.saturating_add(2);
    /// `retry.base_delay`.
    pub const BASE_DELAY: Duration = Duration::from_millis(50);
    /// `retry.max_delay`.
    pub const MAX_DELAY: Duration = Duration::from_secs(2);
    /// `retry.budget_percent`.
    pub const BUDGET_PERCENT: u8 = 20;

    /// `cluster.redis_url_env`.
    pub const REDIS_URL_ENV: &str = "WEIR_REDIS_URL";
    /// `cluster.key_prefix`.
    pub const KEY_PREFIX: &str = "weir";
}

/// Whether `name` is an environment variable name as shells write them
/// (`[A-Za-z_][A-Za-z0-9_]*`).
fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether a secret can be sent as `Authorization: Bearer SECRET`: no tab
/// (a valid header byte, but no token's) and nothing a header value refuses.
fn is_header_safe(secret: &str) -> bool {
    !secret.contains('\t') && http::HeaderValue::from_str(&format!("Bearer {secret}")).is_ok()
}

/// The one error of a file that could not be read as TOML at all, at
/// `(line, column)`, under the key `(file)`.
fn file_refused(file: String, (line, column): (usize, usize), message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        file,
        line,
        column,
        key: "(file)".to_owned(),
        message,
    }])
}

/// The bytes of `path` (symlinks followed) if it is a file weir may read
/// again while it serves: not a FIFO, socket or device, whose read would
/// block until something writes to it, and with it every reload after
/// (they run one at a time). At start any file is read once (`--config
/// /dev/stdin`, a shell's `<(...)`): that is what the user asked for. A
/// directory passes, for the read to name it.
///
/// The kind is taken from the file opened, not from the path before it is
/// opened, and the open does not wait for a FIFO's writer: a path swapped
/// to a FIFO between a check and the read cannot block.
pub(crate) fn read_again(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(nix::libc::O_NONBLOCK);
    }
    let mut file = options.open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() && !metadata.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO, socket or device), which weir reads only at start",
        ));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A hash of a config file's bytes. Config files are small, so hashing a whole one is
/// cheap and, unlike (mtime, size, inode), sees every content change and ignores every
/// non-change.
pub(crate) fn fingerprint(bytes: &[u8]) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

impl Config {
    /// Reads and validates a file; `source` is set to `path`. The environment is injected
    /// (pass [`process_env`] in production, a closure in tests).
    pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        Self::check(path, env).result
    }

    /// As [`Config::load`], for a reload: only from a file that can be read
    /// again ([`read_again`]).
    pub fn reload(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        Self::check_read(path, read_again(path), env).result
    }

    /// As [`Config::load`], keeping the warnings also when there are errors
    /// (for `weir check`).
    pub fn check(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Checked {
        Self::check_read(path, std::fs::read(path), env)
    }

    /// [`Config::check`] of what reading `path` gave.
    fn check_read(
        path: &Path,
        read: std::io::Result<Vec<u8>>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Checked {
        let file = path.display().to_string();
        let refused = |file, at, message| Checked {
            result: Err(file_refused(file, at, message)),
            warnings: Vec::new(),
        };
        let bytes = match read {
            Ok(bytes) => bytes,
            Err(e) => return refused(file, (1, 1), format!("cannot read the file: {e}")),
        };
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            // Named where the first byte that is not UTF-8 stands.
            Err(e) => {
                let good = e.utf8_error().valid_up_to();
                let bytes = e.into_bytes();
                let before = String::from_utf8_lossy(&bytes[..good]);
                let byte = bytes
                    .get(good)
                    .map_or(String::new(), |b| format!(" 0x{b:02X}"));
                let message =
                    format!("cannot read the file: byte{byte} is not UTF-8 (TOML files are UTF-8)");
                return refused(file, line_col(&before, good), message);
            }
        };
        let mut checked = Self::parse_checked(&text, &file, env);
        if let Ok(config) = &mut checked.result {
            config.source = Some(path.to_path_buf());
            config.source_fingerprint = Some(fingerprint(text.as_bytes()));
        }
        checked
    }

    /// Validates TOML text; `file` is the name used in error messages. Returns every error
    /// found, or the resolved configuration with its warnings.
    pub fn parse(
        text: &str,
        file: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        Self::parse_checked(text, file, env).result
    }

    /// [`Config::parse`] with the warnings kept beside the errors.
    fn parse_checked(text: &str, file: &str, env: &dyn Fn(&str) -> Option<String>) -> Checked {
        let (result, warnings) = Self::validate(text, file, env);
        Checked { result, warnings }
    }

    /// Every error, or the configuration; the warnings either way.
    fn validate(
        text: &str,
        file: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> (Result<Config, ConfigErrors>, Vec<String>) {
        let mut check = Checker {
            file,
            text,
            errors: Vec::new(),
            warnings: Vec::new(),
            line_starts: std::iter::once(0)
                .chain(text.match_indices('\n').map(|(i, _)| i + 1))
                .collect(),
            taken_out: HashSet::new(),
            items_taken_out: HashMap::new(),
        };
        // Syntax first, with recovery, so every syntax error is reported at once.
        let (_, syntax) = toml::de::DeTable::parse_recoverable(text);
        if !syntax.is_empty() {
            for e in syntax {
                let span = e.span().unwrap_or(0..0);
                // A duplicate key is named like any other key (SPEC: every
                // error names its key); other syntax errors have none.
                let key = (e.message() == "duplicate key")
                    .then(|| duplicate_key_path(text, span.clone()))
                    .flatten()
                    .unwrap_or_else(|| "(syntax)".to_owned());
                check.error(span, key, e.message().to_owned());
            }
            // The parser's recovery may report a later line first.
            check.errors.sort_by_key(|e| (e.line, e.column));
            return (Err(ConfigErrors(check.errors)), Vec::new());
        }
        let (raw, mut schema_errors) = schema(text);
        // Listed in file order; past the cap, counted on a last line.
        schema_errors.sort_by_key(|(span, _, _)| span.start);
        let left_out = schema_errors.split_off(schema_errors.len().min(MAX_SCHEMA_ERRORS));
        let mut schema_keys: HashSet<String> = HashSet::new();
        for (span, message, path) in schema_errors {
            let key = path
                .or_else(|| key_path_at(text, span.start))
                .unwrap_or_else(|| "(toml)".to_owned());
            schema_keys.insert(key.clone());
            let message = datetime_named(message, text.get(span.clone()));
            check.error(span, key, message);
        }
        schema_keys.extend(left_out.iter().filter_map(|(_, _, path)| path.clone()));
        check.taken_out = schema_keys;
        let more = left_out.first().map(|(span, _, _)| {
            check.located(
                span,
                "(more)".to_owned(),
                format!(
                    "and {} more unknown keys or wrong types from here on, not listed",
                    left_out.len()
                ),
            )
        });
        check.items_taken_out = items_taken_out(&check.taken_out);
        // The rest of the file is still checked when only whole entries
        // had to be left out, so one run lists every error.
        let Some(raw) = raw else {
            check.errors.extend(more);
            return (Err(ConfigErrors(check.errors)), Vec::new());
        };
        let schema_errors = check.errors.len();
        let config = check.config(raw, env);
        // A key taken out is then missing, or at its default: not news.
        // Nor is what that says of the entry around it or inside it.
        let mut validation = check.errors.split_off(schema_errors);
        validation.retain(|v| !check.near_taken_out(&v.key));
        let mut seen: HashSet<ConfigError> = HashSet::new();
        check.errors.extend(
            validation
                .into_iter()
                // Each distinct error once (a model declared twice reaches
                // some checks twice).
                .filter(|v| seen.insert(v.clone())),
        );
        let warnings = check.warnings;
        if check.errors.is_empty() && more.is_none() {
            let config = Config {
                warnings: warnings.clone(),
                ..config
            };
            (Ok(config), warnings)
        } else {
            check.errors.sort_by_key(|e| (e.line, e.column));
            check.errors.extend(more);
            (Err(ConfigErrors(check.errors)), warnings)
        }
    }

    /// The resolved configuration as TOML text for `weir check`: every key with its effective
    /// value (defaults filled in), secrets as `[redacted]` next to the env var they come from,
    /// warnings and undeclared models as `#` comments. The text parses back to the same
    /// configuration (given the same environment).
    pub fn render(&self) -> String {
        render(self)
    }

    /// The model entry by name (declared or only named by a backend).
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The backend entry by name.
    pub fn backend(&self, name: &str) -> Option<&BackendConfig> {
        self.backends.iter().find(|b| b.name == name)
    }
}

impl ModelConfig {
    /// The request bucket's capacity: `burst`, else `requests_per_minute`; `None` when the
    /// model has no request limit. Why here: so admission and `x-ratelimit-limit-requests`
    /// cannot disagree on the fallback.
    pub fn burst_capacity(&self) -> Option<NonZeroU32> {
        self.requests_per_minute
            .map(|rpm| self.burst.unwrap_or(rpm))
    }
}

/// The real process environment, for production callers of [`Config::load`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

// ---------------------------------------------------------------------------------------------
// Raw layer: the file exactly as written.

type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<S<RawServer>>,
    limits: Option<S<RawLimits>>,
    defaults: Option<S<RawDefaults>>,
    #[serde(default)]
    models: Vec<S<RawModel>>,
    #[serde(default)]
    backends: Vec<S<RawBackend>>,
    health: Option<S<RawHealth>>,
    outlier: Option<S<RawOutlier>>,
    retry: Option<S<RawRetry>>,
    cluster: Option<S<RawCluster>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<S<String>>,
    admin_listen: Option<S<String>>,
    max_body_bytes: Option<S<i64>>,
    max_buffered_body_bytes: Option<S<i64>>,
    request_timeout: Option<S<String>>,
    first_byte_timeout: Option<S<String>>,
    shutdown_grace: Option<S<String>>,
    log_format: Option<S<String>>,
    api_keys_env: Option<S<String>>,
    admin_token_env: Option<S<String>>,
    max_connections: Option<S<i64>>,
    header_read_timeout: Option<S<String>>,
    idle_timeout: Option<S<String>>,
    watch_config: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    requests_per_minute: Option<S<i64>>,
    tokens_per_minute: Option<S<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    queue_timeout: Option<S<String>>,
    max_queue: Option<S<i64>>,
    max_tokens: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Option<S<String>>,
    requests_per_minute: Option<S<i64>>,
    tokens_per_minute: Option<S<i64>>,
    burst: Option<S<i64>>,
    max_concurrent: Option<S<i64>>,
    queue_timeout: Option<S<String>>,
    max_queue: Option<S<i64>>,
    max_tokens: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Option<S<String>>,
    url: Option<S<String>>,
    api_key_env: Option<S<String>>,
    models: Option<S<Vec<S<String>>>>,
    rename: Option<BTreeMap<S<String>, S<String>>>,
    weight: Option<S<i64>>,
    max_concurrent: Option<S<i64>>,
    health_path: Option<S<String>>,
    metrics_path: Option<S<String>>,
    connect_timeout: Option<S<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    enabled: Option<bool>,
    unhealthy_threshold: Option<S<i64>>,
    healthy_threshold: Option<S<i64>>,
    slow_start: Option<S<String>>,
    liveness: Option<RawProbe>,
    readiness: Option<RawReadiness>,
    deep: Option<RawDeep>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    interval: Option<S<String>>,
    timeout: Option<S<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReadiness {
    interval: Option<S<String>>,
    timeout: Option<S<String>>,
    degraded_latency: Option<S<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDeep {
    interval: Option<S<String>>,
    timeout: Option<S<String>>,
    samples: Option<S<i64>>,
    max_tokens: Option<S<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOutlier {
    consecutive_failures: Option<S<i64>>,
    ejection_time: Option<S<String>>,
    max_ejection_percent: Option<S<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<S<i64>>,
    base_delay: Option<S<String>>,
    max_delay: Option<S<String>>,
    budget_percent: Option<S<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    redis_url_env: Option<S<String>>,
    key_prefix: Option<S<String>>,
}

// ---------------------------------------------------------------------------------------------
// Validation: raw -> typed, collecting every error.

/// Whether a zero duration is acceptable for a key.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Zero {
    Allowed,
    Refused,
}

/// Message for a zero rate or cap, where "omit the key" is the way to say "no limit".
const ZERO_RATE: &str = "must be at least 1: a zero rate or cap would refuse every request \
                         (omit the key for no limit)";
/// Message for a zero count where the key has a default.
const ZERO_COUNT: &str = "must be at least 1";

/// The longest duration any key takes. Far beyond any sane timeout or
/// window, yet small enough that adding it to a clock reading can never
/// overflow (`Instant + Duration` panics past about 2^63 s) and the wall
/// times `/admin/backends` prints stay within RFC 3339's years.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Collects errors and warnings while turning the raw layer into [`Config`].
struct Checker<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<ConfigError>,
    warnings: Vec<String>,
    /// Byte offset of each line's start.
    line_starts: Vec<usize>,
    /// Key paths of the entries the schema pass took out (unknown keys,
    /// wrong types): what is checked after them sees those keys missing or
    /// at their defaults, which is not news.
    taken_out: HashSet<String>,
    /// The array items among them, by array (`backends[0].models` → the
    /// indices taken out, ascending): what is checked after them counts the
    /// items left, so its key paths are put back into the file's indices.
    items_taken_out: HashMap<String, Vec<usize>>,
}

impl Checker<'_> {
    fn located(&self, span: &Range<usize>, key: String, message: String) -> ConfigError {
        let key = match self.items_taken_out.is_empty() {
            true => key,
            false => key_in_file(&key, &self.items_taken_out),
        };
        // Where the line starts, then the characters before the offset on
        // it: a file with thousands of errors is not read once per error.
        let index = self
            .line_starts
            .partition_point(|&start| start <= span.start);
        let start = self.line_starts[index.saturating_sub(1)];
        let (_, column) = line_col(&self.text[start..], span.start - start);
        let line = index.max(1);
        ConfigError {
            file: self.file.to_owned(),
            line,
            column,
            key,
            message,
        }
    }

    /// Whether the schema pass took out `key`, an entry inside it, or the
    /// entry it is in.
    fn near_taken_out(&self, key: &str) -> bool {
        let within = |inner: &str, outer: &str| {
            inner
                .strip_prefix(outer)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        };
        (self.taken_out.iter()).any(|taken| within(taken, key) || within(key, taken))
    }

    /// Whether two values a warning compares are both the file's: neither
    /// was refused since `errors_before` (a refused one stands in as its
    /// default) nor taken out by the schema pass.
    fn both_taken(&self, errors_before: usize, keys: [&str; 2]) -> bool {
        self.errors.len() == errors_before && !keys.iter().any(|key| self.near_taken_out(key))
    }

    /// Whether the schema pass took out, in some entry of the array
    /// section `section`, its `key` or part of it, or the entry, or the
    /// whole section: what `key` says over all the entries (which models
    /// backends serve, which are declared) is then not known in full.
    fn lost_in_some_entry(&self, section: &str, key: &str) -> bool {
        (self.taken_out.iter()).any(|taken| {
            let Some(rest) = taken.strip_prefix(section) else {
                return false;
            };
            let Some((index, inside)) = rest.strip_prefix('[').and_then(|r| r.split_once(']'))
            else {
                return rest.is_empty();
            };
            index.parse::<usize>().is_ok()
                && (inside.is_empty()
                    || (inside.strip_prefix('.').and_then(|i| i.strip_prefix(key)))
                        .is_some_and(|r| r.is_empty() || r.starts_with(['.', '['])))
        })
    }

    fn error(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let e = self.located(&span, key.into(), message.into());
        self.errors.push(e);
    }

    fn warn(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let e = self.located(&span, key.into(), message.into());
        self.warnings.push(e.to_string());
    }

    /// Warns that a duration meant to end before another (`early`, with
    /// its value) does not: located at the key the file sets, `early` when
    /// written (`early_says`), else `late`, which is then what undercuts
    /// `early`'s default (`late_says`, given that default).
    fn warn_misordered(
        &mut self,
        (early, early_key, early_value): (&Option<S<String>>, &str, Duration),
        (late, late_key): (&Option<S<String>>, &str),
        early_says: &str,
        late_says: impl FnOnce(String) -> String,
    ) {
        match (early, late) {
            (None, Some(late)) => {
                self.warn(late.span(), late_key, late_says(duration_text(early_value)))
            }
            (early, _) => self.warn(
                early.as_ref().map_or(0..0, Spanned::span),
                early_key,
                early_says,
            ),
        }
    }

    fn duration(
        &mut self,
        v: &Option<S<String>>,
        key: &str,
        default: Duration,
        zero: Zero,
    ) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.get_ref().trim()) {
            Ok(d) if d.is_zero() && zero == Zero::Refused => {
                self.error(v.span(), key, "must be longer than 0");
                default
            }
            // tokio's timers tick in milliseconds: "1ns" would act as 1 ms
            // while the file says otherwise.
            Ok(d) if !d.is_zero() && d < Duration::from_millis(1) => {
                self.error(
                    v.span(),
                    key,
                    format!(
                        "must be {}at least 1ms, the timers' resolution (got {:?})",
                        if zero == Zero::Allowed { "0 or " } else { "" },
                        v.get_ref()
                    ),
                );
                default
            }
            Ok(d) if d > MAX_DURATION => {
                self.error(
                    v.span(),
                    key,
                    format!("must be at most 365d (got {:?})", v.get_ref()),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.error(
                    v.span(),
                    key,
                    format!(
                        "{:?} is not a duration ({e}); write e.g. \"250ms\", \"5s\", \"5m\"",
                        v.get_ref()
                    ),
                );
                default
            }
        }
    }

    /// A non-negative integer that fits `T`; `None` (after recording the error) otherwise.
    fn uint<T: TryFrom<i64> + fmt::Display>(&mut self, v: &S<i64>, key: &str, max: T) -> Option<T> {
        let n = *v.get_ref();
        if n < 0 {
            self.error(v.span(), key, format!("must not be negative (got {n})"));
            return None;
        }
        match T::try_from(n) {
            Ok(t) => Some(t),
            Err(_) => {
                self.error(
                    v.span(),
                    key,
                    format!("is too large (got {n}, at most {max})"),
                );
                None
            }
        }
    }

    fn u32_or(&mut self, v: &Option<S<i64>>, key: &str, default: u32) -> u32 {
        v.as_ref()
            .and_then(|v| self.uint(v, key, u32::MAX))
            .unwrap_or(default)
    }

    fn opt_nz32(&mut self, v: &Option<S<i64>>, key: &str, zero_msg: &str) -> Option<NonZeroU32> {
        let v = v.as_ref()?;
        let n = self.uint(v, key, u32::MAX)?;
        let nz = NonZeroU32::new(n);
        if nz.is_none() {
            self.error(v.span(), key, zero_msg);
        }
        nz
    }

    fn opt_nz64(&mut self, v: &Option<S<i64>>, key: &str, zero_msg: &str) -> Option<NonZeroU64> {
        let v = v.as_ref()?;
        let n = self.uint(v, key, u64::MAX)?;
        let nz = NonZeroU64::new(n);
        if nz.is_none() {
            self.error(v.span(), key, zero_msg);
        }
        nz
    }

    fn nz32_or(&mut self, v: &Option<S<i64>>, key: &str, default: NonZeroU32) -> NonZeroU32 {
        self.opt_nz32(v, key, ZERO_COUNT).unwrap_or(default)
    }

    fn percent(&mut self, v: &Option<S<i64>>, key: &str, default: u8) -> u8 {
        let Some(v) = v else { return default };
        match self.uint(v, key, 100u8) {
            Some(p) if p <= 100 => p,
            Some(p) => {
                self.error(
                    v.span(),
                    key,
                    format!("is a percentage: at most 100 (got {p})"),
                );
                default
            }
            None => default,
        }
    }

    fn socket_addr(&mut self, v: &S<String>, key: &str) -> Option<SocketAddr> {
        match v.get_ref().trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    v.span(),
                    key,
                    format!(
                        "{:?} is not a socket address; write IP:PORT, e.g. \"0.0.0.0:8080\"",
                        v.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// Looks up the env var named by `name`; records an error when the name is empty, the
    /// variable is not set, or (unless `empty_ok`) it is empty. The value is never quoted.
    fn env_value(
        &mut self,
        name: &S<String>,
        key: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Option<String> {
        let var = name.get_ref().trim();
        if var.is_empty() {
            self.error(
                name.span(),
                key,
                "must name an environment variable, not be empty",
            );
            return None;
        }
        match env(var) {
            // A name no shell would write may be the secret itself, pasted
            // where its variable's name goes: not repeated in the error,
            // which `weir check`, the log and `/admin/reload` show.
            None if !is_variable_name(var) => {
                self.error(
                    name.span(),
                    key,
                    "names no environment variable that is set, and is no variable name (letters, digits and _): a key pasted in place of its variable's name? (not shown)",
                );
                None
            }
            None => {
                self.error(
                    name.span(),
                    key,
                    format!("environment variable {var} is not set"),
                );
                None
            }
            Some(value) if value.trim().is_empty() => {
                self.error(
                    name.span(),
                    key,
                    format!("environment variable {var} is set but empty"),
                );
                None
            }
            Some(value) => Some(value),
        }
    }

    /// Reports a secret that cannot travel in an `Authorization: Bearer`
    /// header: a backend would be called keyless, and a client's key or
    /// the admin token could never be matched (every request refused).
    fn unsendable(&mut self, name: &S<String>, key: &str, what: &str) {
        let var = name.get_ref().trim();
        self.error(
            name.span(),
            key,
            format!("environment variable {var}: {what} holds a control character (a line break, a tab) or another byte that cannot go in an HTTP header"),
        );
    }

    fn config(&mut self, raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Config {
        let server = self.server(raw.server, env);
        let global_tokens_span = raw
            .limits
            .as_ref()
            .and_then(|l| l.get_ref().tokens_per_minute.as_ref())
            .map(Spanned::span);
        let limits = self.limits(raw.limits);
        let defaults = self.defaults(raw.defaults);
        let mut models = self.models(&raw.models, &defaults);
        let backends = self.backends(&raw.backends, env);
        self.cross_check(
            &raw.models,
            &raw.backends,
            &mut models,
            &backends,
            &defaults,
        );
        self.warn_small_token_buckets(&raw.models, &models, &limits, global_tokens_span);
        let health = self.health(raw.health);
        let outlier = self.outlier(raw.outlier);
        let retry = self.retry(raw.retry);
        let cluster = raw.cluster.and_then(|c| self.cluster(c, env));
        Config {
            source: None,
            source_fingerprint: None,
            server,
            limits,
            defaults,
            models,
            backends,
            health,
            outlier,
            retry,
            cluster,
            warnings: Vec::new(),
        }
    }

    fn server(
        &mut self,
        raw: Option<S<RawServer>>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> ServerConfig {
        let raw = raw.map(Spanned::into_inner).unwrap_or_default();
        let given_listen = (raw.listen.as_ref()).map(|v| self.socket_addr(v, "server.listen"));
        let listen = given_listen.flatten().unwrap_or(defaults::LISTEN);
        // A refused listen (bad text, or a wrong type the schema pass took
        // out) is not compared: its default is not what the file says.
        let listen_known =
            !matches!(given_listen, Some(None)) && !self.near_taken_out("server.listen");
        let admin_listen = raw
            .admin_listen
            .as_ref()
            .and_then(|v| self.socket_addr(v, "server.admin_listen"));
        if let (Some(admin), Some(v), true) = (admin_listen, &raw.admin_listen, listen_known) {
            // Port 0 asks the OS for a free port, so two port-0 addresses never clash.
            if admin == listen && admin.port() != 0 {
                self.error(
                    v.span(),
                    "server.admin_listen",
                    "is the same address as server.listen; omit it to serve admin routes there",
                );
            } else if binds_overlap(admin, listen) {
                self.error(
                    v.span(),
                    "server.admin_listen",
                    format!("shares its port with server.listen ({listen}) on addresses that overlap, so one of them could not listen"),
                );
            }
        }
        let max_body_bytes = match &raw.max_body_bytes {
            Some(v) => match self.uint(v, "server.max_body_bytes", usize::MAX) {
                Some(0) => {
                    self.error(v.span(), "server.max_body_bytes", ZERO_COUNT);
                    defaults::MAX_BODY_BYTES
                }
                Some(n) => n,
                None => defaults::MAX_BODY_BYTES,
            },
            None => defaults::MAX_BODY_BYTES,
        };
        let max_buffered_body_bytes = match &raw.max_buffered_body_bytes {
            Some(v) => match self.uint(v, "server.max_buffered_body_bytes", usize::MAX) {
                Some(n) if n < max_body_bytes => {
                    self.error(
                        v.span(),
                        "server.max_buffered_body_bytes",
                        format!("must be at least server.max_body_bytes ({max_body_bytes}): a body that size could never be held"),
                    );
                    Some(max_body_bytes)
                }
                n => n,
            },
            None => None,
        }
        .unwrap_or_else(|| max_body_bytes.max(defaults::MAX_BUFFERED_BODY_BYTES));
        let errors_before = self.errors.len();
        let request_timeout = self.duration(
            &raw.request_timeout,
            "server.request_timeout",
            defaults::REQUEST_TIMEOUT,
            Zero::Refused,
        );
        let first_byte_timeout = self.duration(
            &raw.first_byte_timeout,
            "server.first_byte_timeout",
            defaults::FIRST_BYTE_TIMEOUT,
            Zero::Refused,
        );
        // A refused value stands in as its default: comparing that would
        // warn about a value the file does not set.
        let both_taken = self.both_taken(
            errors_before,
            ["server.request_timeout", "server.first_byte_timeout"],
        );
        if both_taken && first_byte_timeout > request_timeout {
            self.warn_misordered(
                (&raw.first_byte_timeout, "server.first_byte_timeout", first_byte_timeout),
                (&raw.request_timeout, "server.request_timeout"),
                "is longer than server.request_timeout, which ends the request first",
                |default| format!("is shorter than server.first_byte_timeout ({default}, its default), so it ends the request first"),
            );
        }
        let shutdown_grace = self.duration(
            &raw.shutdown_grace,
            "server.shutdown_grace",
            defaults::SHUTDOWN_GRACE,
            Zero::Allowed,
        );
        let log_format = match &raw.log_format {
            None => LogFormat::Text,
            Some(v) => match v.get_ref().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    self.error(
                        v.span(),
                        "server.log_format",
                        format!("{other:?} is not \"text\" or \"json\""),
                    );
                    LogFormat::Text
                }
            },
        };
        let api_keys_env = raw
            .api_keys_env
            .as_ref()
            .map(|v| v.get_ref().trim().to_owned());
        let api_keys = raw.api_keys_env.as_ref().map(|name| {
            let value = self
                .env_value(name, "server.api_keys_env", env)
                .unwrap_or_default();
            let keys: Vec<&str> = value
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .collect();
            if keys.iter().any(|k| !is_header_safe(k)) {
                self.unsendable(name, "server.api_keys_env", "a key");
            }
            keys.into_iter().map(Secret::new).collect::<Vec<Secret>>()
        });
        // env_value already reported an unset/empty variable; a value of only commas is the
        // one remaining way to end up with no keys.
        if let (Some(keys), Some(name)) = (&api_keys, &raw.api_keys_env) {
            let var = name.get_ref().trim();
            if keys.is_empty() && env(var).is_some_and(|v| !v.trim().is_empty()) {
                self.error(
                    name.span(),
                    "server.api_keys_env",
                    format!("environment variable {var} holds no keys (expected a comma-separated list)"),
                );
            }
        }
        let admin_token_env = raw
            .admin_token_env
            .as_ref()
            .map(|v| v.get_ref().trim().to_owned());
        let admin_token = raw.admin_token_env.as_ref().and_then(|name| {
            let value = self.env_value(name, "server.admin_token_env", env)?;
            let value = value.trim();
            if !is_header_safe(value) {
                self.unsendable(name, "server.admin_token_env", "the token");
            }
            Some(Secret::new(value))
        });
        let max_connections = match &raw.max_connections {
            Some(v) => match self.uint(v, "server.max_connections", usize::MAX) {
                Some(0) => {
                    self.error(v.span(), "server.max_connections", ZERO_COUNT);
                    defaults::MAX_CONNECTIONS
                }
                // The connection semaphore holds at most this many permits.
                Some(n) if n > tokio::sync::Semaphore::MAX_PERMITS => {
                    self.error(
                        v.span(),
                        "server.max_connections",
                        format!(
                            "is too large (got {n}, at most {})",
                            tokio::sync::Semaphore::MAX_PERMITS
                        ),
                    );
                    defaults::MAX_CONNECTIONS
                }
                Some(n) => n,
                None => defaults::MAX_CONNECTIONS,
            },
            None => defaults::MAX_CONNECTIONS,
        };
        let header_read_timeout = self.duration(
            &raw.header_read_timeout,
            "server.header_read_timeout",
            defaults::HEADER_READ_TIMEOUT,
            Zero::Refused,
        );
        let idle_timeout = self.duration(
            &raw.idle_timeout,
            "server.idle_timeout",
            defaults::IDLE_TIMEOUT,
            Zero::Refused,
        );
        ServerConfig {
            listen,
            admin_listen,
            max_body_bytes,
            max_buffered_body_bytes,
            request_timeout,
            first_byte_timeout,
            shutdown_grace,
            log_format,
            api_keys,
            api_keys_env,
            admin_token,
            admin_token_env,
            max_connections,
            header_read_timeout,
            idle_timeout,
            watch_config: raw.watch_config.unwrap_or(defaults::WATCH_CONFIG),
        }
    }

    fn limits(&mut self, raw: Option<S<RawLimits>>) -> GlobalLimits {
        let raw = raw.map(Spanned::into_inner).unwrap_or_default();
        GlobalLimits {
            requests_per_minute: self.opt_nz32(
                &raw.requests_per_minute,
                "limits.requests_per_minute",
                ZERO_RATE,
            ),
            tokens_per_minute: self.opt_nz64(
                &raw.tokens_per_minute,
                "limits.tokens_per_minute",
                ZERO_RATE,
            ),
        }
    }

    fn defaults(&mut self, raw: Option<S<RawDefaults>>) -> Defaults {
        let raw = raw.map(Spanned::into_inner).unwrap_or_default();
        Defaults {
            queue_timeout: self.duration(
                &raw.queue_timeout,
                "defaults.queue_timeout",
                defaults::QUEUE_TIMEOUT,
                Zero::Allowed,
            ),
            max_queue: self.u32_or(&raw.max_queue, "defaults.max_queue", defaults::MAX_QUEUE),
            max_tokens: self.u32_or(&raw.max_tokens, "defaults.max_tokens", defaults::MAX_TOKENS),
        }
    }

    fn models(&mut self, raw: &[S<RawModel>], defaults: &Defaults) -> Vec<ModelConfig> {
        let mut seen: HashSet<String> = HashSet::new();
        let mut models = Vec::with_capacity(raw.len());
        for (i, m) in raw.iter().enumerate() {
            let p = format!("models[{i}]");
            let span = m.span();
            let m = m.get_ref();
            let name = match &m.name {
                None => {
                    self.error(
                        span,
                        format!("{p}.name"),
                        "is missing: every [[models]] entry needs a name",
                    );
                    String::new()
                }
                Some(n) => {
                    let name = n.get_ref().trim().to_owned();
                    if name.is_empty() {
                        self.error(n.span(), format!("{p}.name"), "must not be empty");
                    } else if !seen.insert(name.clone()) {
                        self.error(
                            n.span(),
                            format!("{p}.name"),
                            format!("model {name:?} is declared twice"),
                        );
                    }
                    name
                }
            };
            let requests_per_minute = self.opt_nz32(
                &m.requests_per_minute,
                &format!("{p}.requests_per_minute"),
                ZERO_RATE,
            );
            let burst = self.opt_nz32(&m.burst, &format!("{p}.burst"), ZERO_RATE);
            if let (Some(b), None) = (&m.burst, &m.requests_per_minute) {
                self.warn(
                    b.span(),
                    format!("{p}.burst"),
                    "has no effect without requests_per_minute",
                );
            }
            models.push(ModelConfig {
                name,
                requests_per_minute,
                tokens_per_minute: self.opt_nz64(
                    &m.tokens_per_minute,
                    &format!("{p}.tokens_per_minute"),
                    ZERO_RATE,
                ),
                burst,
                max_concurrent: self.opt_nz32(
                    &m.max_concurrent,
                    &format!("{p}.max_concurrent"),
                    ZERO_RATE,
                ),
                queue_timeout: self.duration(
                    &m.queue_timeout,
                    &format!("{p}.queue_timeout"),
                    defaults.queue_timeout,
                    Zero::Allowed,
                ),
                max_queue: self.u32_or(&m.max_queue, &format!("{p}.max_queue"), defaults.max_queue),
                max_tokens: self.u32_or(
                    &m.max_tokens,
                    &format!("{p}.max_tokens"),
                    defaults.max_tokens,
                ),
                declared: true,
            });
        }
        models
    }

    fn backends(
        &mut self,
        raw: &[S<RawBackend>],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Vec<BackendConfig> {
        let mut seen: HashSet<String> = HashSet::new();
        let mut backends = Vec::with_capacity(raw.len());
        for (i, b) in raw.iter().enumerate() {
            let p = format!("backends[{i}]");
            let span = b.span();
            let b = b.get_ref();
            let name = match &b.name {
                None => {
                    self.error(
                        span.clone(),
                        format!("{p}.name"),
                        "is missing: every [[backends]] entry needs a name",
                    );
                    String::new()
                }
                Some(n) => {
                    let name = n.get_ref().trim().to_owned();
                    if name.is_empty() {
                        self.error(n.span(), format!("{p}.name"), "must not be empty");
                    } else if http::HeaderValue::from_str(&name).is_err() {
                        // It is sent as `x-weir-backend` (SPEC).
                        self.error(
                            n.span(),
                            format!("{p}.name"),
                            format!("{name:?} cannot be sent as a header: control characters are not allowed"),
                        );
                    } else if !seen.insert(name.clone()) {
                        self.error(
                            n.span(),
                            format!("{p}.name"),
                            format!("backend name {name:?} is used twice"),
                        );
                    }
                    name
                }
            };
            let url = match &b.url {
                None => {
                    self.error(
                        span.clone(),
                        format!("{p}.url"),
                        "is missing: every [[backends]] entry needs a url",
                    );
                    None
                }
                Some(u) => self.url(u, &format!("{p}.url")),
            };
            let api_key_env = b
                .api_key_env
                .as_ref()
                .map(|v| v.get_ref().trim().to_owned());
            let api_key = b.api_key_env.as_ref().and_then(|name| {
                let key = format!("{p}.api_key_env");
                let value = self.env_value(name, &key, env)?;
                let value = value.trim();
                // Sent as `Authorization: Bearer KEY`: a key that cannot be a
                // header value (a newline of a multi-line secret, a control
                // byte) would be dropped and the backend called keyless.
                if !is_header_safe(value) {
                    self.unsendable(name, &key, "the key");
                    return None;
                }
                Some(Secret::new(value))
            });
            let mut models: Vec<String> = Vec::new();
            let mut listed: HashSet<&str> = HashSet::new();
            match &b.models {
                None => self.error(
                    span,
                    format!("{p}.models"),
                    "is missing: list the models this backend serves",
                ),
                Some(list) if list.get_ref().is_empty() => self.error(
                    list.span(),
                    format!("{p}.models"),
                    "must list at least one model",
                ),
                Some(list) => {
                    for (j, m) in list.get_ref().iter().enumerate() {
                        let model = m.get_ref().trim();
                        if model.is_empty() {
                            self.error(m.span(), format!("{p}.models[{j}]"), "must not be empty");
                        } else if !listed.insert(model) {
                            self.error(
                                m.span(),
                                format!("{p}.models[{j}]"),
                                format!("model {model:?} is listed twice"),
                            );
                        } else {
                            models.push(model.to_owned());
                        }
                    }
                }
            }
            let mut rename = HashMap::new();
            for (from, to) in b.rename.iter().flatten() {
                // Trimmed as the names in `models` are, so a key written as
                // the list writes it names the same model.
                let from_name = from.get_ref().trim();
                let key = format!("{p}.rename.{from_name}");
                if !listed.contains(from_name) {
                    self.error(
                        from.span(),
                        key,
                        format!("model {:?} is not in {p}.models", from.get_ref()),
                    );
                } else if to.get_ref().trim().is_empty() {
                    self.error(to.span(), key, "must not be empty");
                } else {
                    rename.insert(from_name.to_owned(), to.get_ref().trim().to_owned());
                }
            }
            let weight = self.u32_or(&b.weight, &format!("{p}.weight"), defaults::WEIGHT);
            let health_path = match &b.health_path {
                None => defaults::HEALTH_PATH.to_owned(),
                Some(h) => {
                    let path = h.get_ref();
                    if !path.is_empty() && !path.starts_with('/') {
                        self.error(
                            h.span(),
                            format!("{p}.health_path"),
                            format!(
                                "{path:?} must start with '/' (or be \"\" for GET {{url}}/models)"
                            ),
                        );
                    } else if path.contains('#') {
                        self.error(
                            h.span(),
                            format!("{p}.health_path"),
                            format!("{path:?}: a fragment (#...) is never sent; leave it out"),
                        );
                    } else if !path.is_empty() && path.parse::<http::uri::PathAndQuery>().is_err() {
                        self.error(
                            h.span(),
                            format!("{p}.health_path"),
                            format!("{path:?} is not a valid URL path"),
                        );
                    }
                    path.clone()
                }
            };
            let metrics_path = b.metrics_path.as_ref().map(|m| {
                let path = m.get_ref();
                if !path.starts_with('/') {
                    self.error(
                        m.span(),
                        format!("{p}.metrics_path"),
                        format!("{path:?} must start with '/'"),
                    );
                } else if path.contains('#') {
                    self.error(
                        m.span(),
                        format!("{p}.metrics_path"),
                        format!("{path:?}: a fragment (#...) is never sent; leave it out"),
                    );
                } else if path.parse::<http::uri::PathAndQuery>().is_err() {
                    self.error(
                        m.span(),
                        format!("{p}.metrics_path"),
                        format!("{path:?} is not a valid URL path"),
                    );
                }
                path.clone()
            });
            backends.push(BackendConfig {
                name,
                url: url.unwrap_or_else(|| http::Uri::from_static("http://invalid.invalid")),
                api_key_env,
                api_key,
                models,
                rename,
                weight,
                max_concurrent: self.opt_nz32(
                    &b.max_concurrent,
                    &format!("{p}.max_concurrent"),
                    ZERO_RATE,
                ),
                health_path,
                metrics_path,
                connect_timeout: self.duration(
                    &b.connect_timeout,
                    &format!("{p}.connect_timeout"),
                    defaults::CONNECT_TIMEOUT,
                    Zero::Refused,
                ),
            });
        }
        backends
    }

    fn url(&mut self, v: &S<String>, key: &str) -> Option<http::Uri> {
        let text = v.get_ref().trim();
        let fail = |this: &mut Self, why: &str| {
            // The message goes to the log and `/admin/reload`: a password
            // in the URL is not repeated there.
            let shown = without_userinfo(text);
            this.error(
                v.span(),
                key,
                format!("{shown:?} is not a usable backend URL: {why}"),
            );
            None
        };
        // http::Uri silently drops a fragment, so look for it in the text.
        if text.contains('#') {
            return fail(self, "a fragment (#...) has no meaning here");
        }
        let uri = match text.parse::<http::Uri>() {
            Ok(u) => u,
            // `localhost:8000/v1` reads as scheme `localhost`: say what
            // is missing rather than http's "invalid format".
            Err(_) if !text.contains("://") => {
                return fail(
                    self,
                    "it must start with http:// or https://, e.g. \"http://localhost:8000/v1\"",
                )
            }
            Err(e) => return fail(self, &e.to_string()),
        };
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            Some(other) => return fail(self, &format!("scheme {other:?} is not http or https")),
            None => {
                return fail(
                    self,
                    "it must start with http:// or https://, e.g. \"https://api.example.com/v1\"",
                )
            }
        }
        let Some(authority) = uri.authority() else {
            return fail(self, "it has no host");
        };
        if authority.as_str().contains('@') {
            return fail(
                self,
                "credentials in the URL would leak into logs; use api_key_env",
            );
        }
        if authority.host().is_empty() {
            return fail(self, "it has no host");
        }
        // `[fe80::1%25eth0]`: http::Uri keeps the zone, and no resolver
        // or socket address parse takes it back.
        if authority.host().contains('%') {
            return fail(
                self,
                "an IPv6 zone (%...) is not supported; use a routable address or a host name",
            );
        }
        // http::Uri keeps an authority whose port is not a number that
        // fits in 16 bits (`:80001`, `:abc`, `:`) and reports no port, so
        // the connection would quietly go to 80 or 443 instead.
        // Nor does it look at the digits: `:+8000` parses as 8000 but
        // would go out in `Host` as written.
        let has_port = authority.as_str().len() > authority.host().len();
        let digits = authority
            .port()
            .is_some_and(|p| p.as_str().bytes().all(|b| b.is_ascii_digit()));
        if has_port && !(digits && authority.port_u16().is_some()) {
            return fail(self, "its port is not a number from 1 to 65535");
        }
        if authority.port_u16() == Some(0) {
            return fail(self, "port 0 cannot be connected to");
        }
        if uri.query().is_some() {
            return fail(
                self,
                "a query string (?...) is not allowed; client queries are passed through",
            );
        }
        Some(uri)
    }

    /// Warns of a token bucket smaller than a model's `max_tokens`: every
    /// request of that model that sets no `max_tokens` of its own then
    /// needs more than the bucket holds, and is refused 413. Valid (a
    /// model whose clients all set a small `max_tokens`), but more often a
    /// slip of units.
    fn warn_small_token_buckets(
        &mut self,
        raw_models: &[S<RawModel>],
        models: &[ModelConfig],
        limits: &GlobalLimits,
        global_span: Option<Range<usize>>,
    ) {
        let consequence =
            "a request that sets no max_tokens of its own needs more than the bucket holds (413)";
        // A max_tokens taken out stands in as its default: not compared.
        let default_unknown = self.near_taken_out("defaults.max_tokens");
        let unknown_max_tokens: Vec<&str> = (raw_models.iter().enumerate())
            .filter(|(i, _)| {
                default_unknown || self.near_taken_out(&format!("models[{i}].max_tokens"))
            })
            .filter_map(|(_, raw)| raw.get_ref().name.as_ref().map(|n| n.get_ref().trim()))
            .collect();
        for (i, raw) in raw_models.iter().enumerate() {
            let raw = raw.get_ref();
            let name = raw.name.as_ref().map(|n| n.get_ref().trim());
            let model = (models.iter())
                .find(|m| Some(m.name.as_str()) == name)
                .filter(|m| !unknown_max_tokens.contains(&m.name.as_str()));
            if let (Some(span), Some(model)) = (&raw.tokens_per_minute, model) {
                if let Some(tpm) = model.tokens_per_minute {
                    if tpm.get() < u64::from(model.max_tokens) {
                        self.warn(
                            span.span(),
                            format!("models[{i}].tokens_per_minute"),
                            format!(
                                "{tpm} is below the model's max_tokens ({}): {consequence}",
                                model.max_tokens
                            ),
                        );
                    }
                }
            }
        }
        if let (Some(span), Some(tpm)) = (global_span, limits.tokens_per_minute) {
            let over: Vec<&str> = models
                .iter()
                .filter(|m| u64::from(m.max_tokens) > tpm.get())
                .filter(|m| !unknown_max_tokens.contains(&m.name.as_str()))
                .filter(|m| m.declared || !default_unknown)
                .map(|m| m.name.as_str())
                .collect();
            if !over.is_empty() {
                self.warn(
                    span,
                    "limits.tokens_per_minute",
                    format!(
                        "{tpm} is below the max_tokens of {}: {consequence}",
                        over.join(", ")
                    ),
                );
            }
        }
    }

    /// Checks that need models and backends together, and adds undeclared models.
    fn cross_check(
        &mut self,
        raw_models: &[S<RawModel>],
        raw_backends: &[S<RawBackend>],
        models: &mut Vec<ModelConfig>,
        backends: &[BackendConfig],
        defaults: &Defaults,
    ) {
        if raw_backends.is_empty() {
            self.error(
                0..0,
                "backends",
                "at least one [[backends]] entry is required",
            );
        }
        // Which backends serve each model, in file order: looked up, not
        // searched, so a file with thousands of models or backends is not
        // checked in quadratic time.
        let mut serving: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, b) in backends.iter().enumerate() {
            for model in &b.models {
                serving.entry(model.as_str()).or_default().push(i);
            }
        }
        // Declared models nobody serves (unknown when a list lost an entry).
        let served_known = !self.lost_in_some_entry("backends", "models");
        for (i, m) in models.iter().enumerate() {
            if m.name.is_empty() || !served_known || serving.contains_key(m.name.as_str()) {
                continue;
            }
            let span = raw_models
                .get(i)
                .and_then(|r| r.get_ref().name.as_ref())
                .map_or(0..0, Spanned::span);
            self.error(
                span,
                format!("models[{i}].name"),
                format!("model {:?} is not served by any backend", m.name),
            );
        }
        // Models only backends name: warn once, add with [defaults] limits
        // (the warning is left out when a [[models]] name was taken out).
        let declared_known = !self.lost_in_some_entry("models", "name");
        let mut known: HashSet<String> = models.iter().map(|m| m.name.clone()).collect();
        for (i, b) in backends.iter().enumerate() {
            // Where each name stands in this backend's list (its first place).
            let mut spans: HashMap<&str, Range<usize>> = HashMap::new();
            let raw_list = raw_backends
                .get(i)
                .and_then(|r| r.get_ref().models.as_ref());
            for m in raw_list.into_iter().flat_map(|l| l.get_ref()) {
                spans.entry(m.get_ref().trim()).or_insert_with(|| m.span());
            }
            for model in &b.models {
                if !known.insert(model.clone()) {
                    continue;
                }
                let span = spans.get(model.as_str()).cloned().unwrap_or(0..0);
                if declared_known {
                    self.warn(
                        span,
                        format!("backends[{i}].models"),
                        format!(
                            "model {model:?} is not declared in [[models]]; it gets [defaults] limits"
                        ),
                    );
                }
                models.push(ModelConfig {
                    name: model.clone(),
                    requests_per_minute: None,
                    tokens_per_minute: None,
                    burst: None,
                    max_concurrent: None,
                    queue_timeout: defaults.queue_timeout,
                    max_queue: defaults.max_queue,
                    max_tokens: defaults.max_tokens,
                    declared: false,
                });
            }
        }
        // Weight 0 everywhere: a model no backend would ever be picked for.
        for m in models.iter() {
            let Some(serving) = serving.get(m.name.as_str()) else {
                continue;
            };
            let Some(&first) = serving.first() else {
                continue;
            };
            if serving.iter().all(|&i| backends[i].weight == 0) {
                let span = raw_backends
                    .get(first)
                    .and_then(|r| r.get_ref().weight.as_ref())
                    .map_or(0..0, Spanned::span);
                self.error(
                    span,
                    format!("backends[{first}].weight"),
                    format!("weight 0 everywhere: every backend serving model {:?} has weight 0, so it can never be picked", m.name),
                );
            }
        }
    }

    fn health(&mut self, raw: Option<S<RawHealth>>) -> HealthConfig {
        let raw = raw.map(Spanned::into_inner).unwrap_or_default();
        let live = raw.liveness.unwrap_or_default();
        let ready = raw.readiness.unwrap_or_default();
        let deep = raw.deep.unwrap_or_default();
        let errors_before = self.errors.len();
        let readiness_timeout = self.duration(
            &ready.timeout,
            "health.readiness.timeout",
            defaults::READINESS_TIMEOUT,
            Zero::Refused,
        );
        let degraded_latency = self.duration(
            &ready.degraded_latency,
            "health.readiness.degraded_latency",
            defaults::DEGRADED_LATENCY,
            Zero::Refused,
        );
        // A probe that slow times out first, so slowness is never seen.
        // Compared only when both were taken (a refused one is its default).
        let both_taken = self.both_taken(
            errors_before,
            [
                "health.readiness.timeout",
                "health.readiness.degraded_latency",
            ],
        );
        if both_taken && degraded_latency >= readiness_timeout {
            self.warn_misordered(
                (&ready.degraded_latency, "health.readiness.degraded_latency", degraded_latency),
                (&ready.timeout, "health.readiness.timeout"),
                "is not shorter than health.readiness.timeout, so a probe that slow times out first and is never reported as degraded",
                |default| format!("is not longer than health.readiness.degraded_latency ({default}, its default), so a probe that slow times out first and is never reported as degraded"),
            );
        }
        HealthConfig {
            enabled: raw.enabled.unwrap_or(defaults::HEALTH_ENABLED),
            unhealthy_threshold: self.nz32_or(
                &raw.unhealthy_threshold,
                "health.unhealthy_threshold",
                defaults::UNHEALTHY_THRESHOLD,
            ),
            healthy_threshold: self.nz32_or(
                &raw.healthy_threshold,
                "health.healthy_threshold",
                defaults::HEALTHY_THRESHOLD,
            ),
            slow_start: self.duration(
                &raw.slow_start,
                "health.slow_start",
                defaults::SLOW_START,
                Zero::Allowed,
            ),
            liveness: ProbeTier {
                interval: self.duration(
                    &live.interval,
                    "health.liveness.interval",
                    defaults::LIVENESS_INTERVAL,
                    Zero::Refused,
                ),
                timeout: self.duration(
                    &live.timeout,
                    "health.liveness.timeout",
                    defaults::LIVENESS_TIMEOUT,
                    Zero::Refused,
                ),
            },
            readiness: ReadinessTier {
                interval: self.duration(
                    &ready.interval,
                    "health.readiness.interval",
                    defaults::READINESS_INTERVAL,
                    Zero::Refused,
                ),
                timeout: readiness_timeout,
                degraded_latency,
            },
            deep: DeepTier {
                interval: self.duration(
                    &deep.interval,
                    "health.deep.interval",
                    defaults::DEEP_INTERVAL,
                    Zero::Refused,
                ),
                timeout: self.duration(
                    &deep.timeout,
                    "health.deep.timeout",
                    defaults::DEEP_TIMEOUT,
                    Zero::Refused,
                ),
                samples: self
                    .opt_nz32(&deep.samples, "health.deep.samples", ZERO_COUNT)
                    .map_or(defaults::DEEP_SAMPLES, NonZeroU32::get),
                max_tokens: self
                    .opt_nz32(&deep.max_tokens, "health.deep.max_tokens", ZERO_COUNT)
                    .map_or(defaults::DEEP_MAX_TOKENS, NonZeroU32::get),
            },
        }
    }

    fn outlier(&mut self, raw: Option<S<RawOutlier>>) -> OutlierConfig {
        let raw = raw.map(Spanned::into_inner).unwrap_or_default();
        OutlierConfig {
            consecutive_failures: self.nz32_or(
                &raw.consecutive_failures,
                "outlier.consecutive_failures",
                defaults::CONSECUTIVE_FAILURES,
            ),
            ejection_time: self.duration(
                &raw.ejection_time,
                "outlier.ejection_time",
                defaults::EJECTION_TIME,
                Zero::Refused,
            ),
            max_ejection_percent: self.percent(
                &raw.max_ejection_percent,
                "outlier.max_ejection_percent",
                defaults::MAX_EJECTION_PERCENT,
            ),
        }
    }

    fn retry(&mut self, raw: Option<S<RawRetry>>) -> RetryConfig {
        let raw = raw.map(Spanned::into_inner).unwrap_or_default();
        let base_delay = self.duration(
            &raw.base_delay,
            "retry.base_delay",
            defaults::BASE_DELAY,
            Zero::Allowed,
        );
        let mut max_delay = self.duration(
            &raw.max_delay,
            "retry.max_delay",
            defaults::MAX_DELAY,
            Zero::Allowed,
        );
        if max_delay < base_delay {
            // Point at whichever of the two the file sets (max_delay preferred).
            let (span, key) = match (&raw.max_delay, &raw.base_delay) {
                (Some(m), _) => (m.span(), "retry.max_delay"),
                (None, Some(b)) => (b.span(), "retry.base_delay"),
                (None, None) => (0..0, "retry.max_delay"),
            };
            self.error(
                span,
                key,
                format!(
                    "retry.max_delay ({}) is shorter than retry.base_delay ({})",
                    duration_text(max_delay),
                    duration_text(base_delay)
                ),
            );
            max_delay = base_delay;
        }
        RetryConfig {
            max_attempts: self.nz32_or(
                &raw.max_attempts,
                "retry.max_attempts",
                defaults::MAX_ATTEMPTS,
            ),
            base_delay,
            max_delay,
            budget_percent: self.percent(
                &raw.budget_percent,
                "retry.budget_percent",
                defaults::BUDGET_PERCENT,
            ),
        }
    }

    fn cluster(
        &mut self,
        raw: S<RawCluster>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Option<ClusterConfig> {
        let span = raw.span();
        let raw = raw.into_inner();
        let name = raw
            .redis_url_env
            .unwrap_or_else(|| Spanned::new(span, defaults::REDIS_URL_ENV.to_owned()));
        let key_prefix = match &raw.key_prefix {
            None => defaults::KEY_PREFIX.to_owned(),
            Some(k) => {
                let prefix = k.get_ref().trim();
                if prefix.is_empty() {
                    self.error(k.span(), "cluster.key_prefix", "must not be empty");
                }
                prefix.to_owned()
            }
        };
        let url = self.env_value(&name, "cluster.redis_url_env", env)?;
        let url = url.trim();
        let var = name.get_ref().trim();
        // Checked as the cluster will open it, so `check` passes no URL that
        // `serve` then refuses; the URL itself is never echoed (a password).
        let scheme_known = ["redis://", "rediss://", "redis+unix://"]
            .iter()
            .any(|scheme| url.starts_with(scheme));
        if url.contains("#insecure") {
            // The redis crate's switch to skip certificate checks; this
            // build leaves it out, so the cluster could never connect.
            self.error(
                name.span(),
                "cluster.redis_url_env",
                format!(
                    "environment variable {var} holds a URL ending in #insecure; weir always \
                     verifies Redis' certificate (trust a private CA with SSL_CERT_FILE)"
                ),
            );
        } else {
            match redis::Client::open(url) {
                Ok(client) if scheme_known => {
                    // Redis numbers its databases from 0: a negative index
                    // parses but every connection is refused ("DB index is
                    // out of range"), so the replica would never join. An
                    // index past the server's count is left to the server.
                    let port = match client.get_connection_info().addr() {
                        redis::ConnectionAddr::Tcp(_, port)
                        | redis::ConnectionAddr::TcpTls { port, .. } => Some(*port),
                        _ => None,
                    };
                    // As a backend URL's: port 0 is never connected to, so
                    // the replica would enforce its fallback share for good.
                    if port == Some(0) {
                        self.error(
                            name.span(),
                            "cluster.redis_url_env",
                            format!(
                                "environment variable {var} holds a URL with port 0, \
                                 which cannot be connected to"
                            ),
                        );
                    }
                    if client.get_connection_info().redis_settings().db() < 0 {
                        self.error(
                            name.span(),
                            "cluster.redis_url_env",
                            format!(
                                "environment variable {var} holds a URL with a negative \
                                 database index; Redis numbers its databases from 0"
                            ),
                        );
                    }
                }
                _ => self.error(
                    name.span(),
                    "cluster.redis_url_env",
                    format!(
                        "environment variable {var} does not hold a valid redis://, rediss:// \
                         or redis+unix:// URL"
                    ),
                ),
            }
        }
        Some(ClusterConfig {
            redis_url_env: name.get_ref().trim().to_owned(),
            redis_url: Secret::new(url),
            key_prefix,
        })
    }
}

/// The array items among the key paths the schema pass took out: each
/// array's path (in the file's indices) and the indices taken out of it.
fn items_taken_out(taken_out: &HashSet<String>) -> HashMap<String, Vec<usize>> {
    let mut items: HashMap<String, Vec<usize>> = HashMap::new();
    for path in taken_out {
        let Some((array, index)) = path.strip_suffix(']').and_then(|p| p.rsplit_once('[')) else {
            continue;
        };
        if let Ok(index) = index.parse::<usize>() {
            items.entry(array.to_owned()).or_default().push(index);
        }
    }
    for indices in items.values_mut() {
        indices.sort_unstable();
    }
    items
}

/// A key path counted on what the schema pass left (`backends[0]` is the
/// first backend left) in the file's indices (`backends[1]` when the
/// file's first was taken out), array by array from the outside in.
fn key_in_file(key: &str, items_taken_out: &HashMap<String, Vec<usize>>) -> String {
    let mut out = String::with_capacity(key.len());
    let mut rest = key;
    while let Some(open) = rest.find('[') {
        let Some((index, after)) = rest[open + 1..].split_once(']') else {
            break;
        };
        let Ok(mut index) = index.parse::<usize>() else {
            break;
        };
        out.push_str(&rest[..open]);
        for &taken in items_taken_out.get(&out).map_or(&[][..], Vec::as_slice) {
            if taken <= index {
                index += 1;
            }
        }
        out.push_str(&format!("[{index}]"));
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Whether two listening addresses on the same port would clash: the same
/// IP, or a wildcard of the same family (`0.0.0.0` holds every IPv4
/// address), or `[::]`, which Linux binds for IPv4 too by default.
fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let v6_wildcard = |x: SocketAddr| x.is_ipv6() && x.ip().is_unspecified();
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip()
            || v6_wildcard(a)
            || v6_wildcard(b)
            || a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified()))
}

/// 1-based line and column (in characters) of a byte offset; offsets past the end or inside
/// a character clamp to the nearest position before them, so a bad span cannot panic.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut line = 1;
    let mut column = 1;
    for (i, c) in text.char_indices() {
        if i >= offset {
            break;
        }
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    (line, column)
}

/// The most schema errors (unknown keys, wrong types) one run lists; the
/// rest are counted on a last line.
const MAX_SCHEMA_ERRORS: usize = 100;

/// One unknown key or wrong type: its span, the message, and its key path
/// (`None` when it has no place in the document).
type SchemaError = (Range<usize>, String, Option<String>);

/// Top-level keys that hold an array of tables, checked an item at a time.
const ARRAY_SECTIONS: [&str; 2] = ["models", "backends"];

/// Every unknown key and wrong type in the file, with its span, its message
/// in the file's terms and its key path, and the raw layer of what is left
/// once those entries are taken out (`None` when that could not be done).
/// serde stops at the first such error, so after each one the entry it
/// points at is removed and the rest deserialized again; spans stay those of
/// the original text. Each top-level entry, and each `[[models]]` and
/// `[[backends]]` item, is deserialized on its own, so an error costs the
/// size of its entry, not of the file (a file with an error in each of
/// thousands of backends is not quadratic). A missing key reported after
/// another error in the same entry may only be that removal's echo (a
/// mistyped required key), so it ends the list.
fn schema(text: &str) -> (Option<RawConfig>, Vec<SchemaError>) {
    use toml::de::{DeTable, DeValue};

    let doc = match DeTable::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            return (
                None,
                vec![(e.span().unwrap_or(0..0), e.message().to_owned(), None)],
            )
        }
    };
    let doc_span = doc.span();
    let mut errors = Vec::new();
    let mut whole = true;
    let mut clean = DeTable::new();
    for (key, value) in doc.into_inner() {
        let name = key.get_ref().to_string();
        let value_span = value.span();
        let one = |value| {
            let mut unit = DeTable::new();
            unit.insert(key.clone(), Spanned::new(value_span.clone(), value));
            Spanned::new(doc_span.clone(), unit)
        };
        match value.into_inner() {
            DeValue::Array(items) if ARRAY_SECTIONS.contains(&name.as_str()) => {
                let mut kept = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    let unit = one(DeValue::Array([item].into_iter().collect()));
                    // Paths are the file's: item i, not the unit's item 0.
                    let in_file = |path: String| match path.strip_prefix(&format!("{name}[0]")) {
                        Some(rest) => format!("{name}[{i}]{rest}"),
                        None => path,
                    };
                    match check_entry(unit, &mut errors, in_file) {
                        Some(mut unit) => {
                            if let Some(DeValue::Array(left)) = unit
                                .get_mut()
                                .remove(name.as_str())
                                .map(Spanned::into_inner)
                            {
                                kept.extend(left);
                            }
                        }
                        None => whole = false,
                    }
                }
                clean.insert(
                    key,
                    Spanned::new(value_span, DeValue::Array(kept.into_iter().collect())),
                );
            }
            value => match check_entry(one(value), &mut errors, |path| path) {
                Some(unit) => clean.extend(unit.into_inner()),
                None => whole = false,
            },
        }
    }
    if !whole {
        return (None, errors);
    }
    match RawConfig::deserialize(toml::de::Deserializer::from(Spanned::new(doc_span, clean))) {
        Ok(raw) => (Some(raw), errors),
        // Each entry passed alone; so should all of them. Reported, not assumed.
        Err(e) => {
            errors.push((
                e.span().unwrap_or(0..0),
                plain_schema_message(e.message()),
                None,
            ));
            (None, errors)
        }
    }
}

/// [`schema`] for one document holding a single entry: every error in it
/// (paths passed through `in_file`), and the entry with them taken out,
/// or `None` when one could not be.
fn check_entry<'i>(
    mut unit: Spanned<toml::de::DeTable<'i>>,
    errors: &mut Vec<SchemaError>,
    in_file: impl Fn(String) -> String,
) -> Option<Spanned<toml::de::DeTable<'i>>> {
    let first = errors.len();
    // Paths are read in the entry as written: once an array's item is taken
    // out, the items after it would be named one place early.
    let written = unit.clone();
    // An array of tables where one table belongs (`[[server]]`): serde
    // would read its first table as the table's first field.
    for (span, path) in arrays_for_tables(unit.get_ref()) {
        errors.push((
            span.clone(),
            ARRAY_FOR_TABLE.to_owned(),
            Some(in_file(path)),
        ));
        if !remove_entry(unit.get_mut(), &span) {
            return None;
        }
    }
    loop {
        let e = match RawConfig::deserialize(toml::de::Deserializer::from(unit.clone())) {
            Ok(_) => return Some(unit),
            Err(e) => e,
        };
        if errors.len() > first && e.message().starts_with("missing field") {
            return None;
        }
        let message = plain_schema_message(e.message());
        let Some(span) = e.span() else {
            // Nothing to take out: report it and stop.
            errors.push((0..0, message, None));
            return None;
        };
        if message == ARRAY_FOR_TABLE {
            // serde read the array as the table's fields in order, so the
            // errors already found inside it were about that misreading.
            let inside = |inner: &Range<usize>| span.start <= inner.start && inner.end <= span.end;
            let mut i = first;
            while i < errors.len() {
                if inside(&errors[i].0) {
                    errors.remove(i);
                } else {
                    i += 1;
                }
            }
        }
        let found = narrowest_entry(unit.get_ref(), span.start);
        let path = narrowest_entry(written.get_ref(), span.start).map(|(_, path)| in_file(path));
        errors.push((span, message, path));
        if !found.is_some_and(|(target, _)| remove_entry(unit.get_mut(), &target)) {
            return None;
        }
    }
}

/// The tables of the schema that the document writes as arrays (`[[server]]`,
/// `server = []`, `[[health.deep]]`, `rename = [..]`): each value's span and
/// key path.
fn arrays_for_tables(doc: &toml::de::DeTable<'_>) -> Vec<(Range<usize>, String)> {
    use toml::de::{DeTable, DeValue};

    /// Tables at the top level, and the tables inside them or inside an
    /// array section's items.
    const TABLES: [&str; 7] = [
        "server", "limits", "defaults", "health", "outlier", "retry", "cluster",
    ];
    const INNER: [(&str, &str); 4] = [
        ("health", "liveness"),
        ("health", "readiness"),
        ("health", "deep"),
        ("backends", "rename"),
    ];
    fn arrays(
        table: &DeTable<'_>,
        path: &str,
        names: &[&str],
        out: &mut Vec<(Range<usize>, String)>,
    ) {
        for (k, v) in table.iter() {
            if matches!(v.get_ref(), DeValue::Array(_)) && names.contains(&k.get_ref().as_ref()) {
                let key = if path.is_empty() {
                    k.get_ref().to_string()
                } else {
                    format!("{path}.{}", k.get_ref())
                };
                out.push((v.span(), key));
            }
        }
    }
    let mut out = Vec::new();
    arrays(doc, "", &TABLES, &mut out);
    for (k, v) in doc.iter() {
        let section = k.get_ref().as_ref();
        let inner: Vec<&str> = (INNER.iter())
            .filter(|(outer, _)| *outer == section)
            .map(|(_, inner)| *inner)
            .collect();
        match v.get_ref() {
            DeValue::Table(t) => arrays(t, section, &inner, &mut out),
            DeValue::Array(items) if ARRAY_SECTIONS.contains(&section) => {
                for (i, item) in items.iter().enumerate() {
                    if let DeValue::Table(t) = item.get_ref() {
                        arrays(t, &format!("{section}[{i}]"), &inner, &mut out);
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// serde's message for a TOML date or time where another type belongs,
/// which the `toml` crate hands serde as a map: named as what it is
/// (`written` is the value's text), as in "invalid type: datetime,
/// expected a string" for `request_timeout = 1979-05-27T07:32:00Z`.
fn datetime_named(message: String, written: Option<&str>) -> String {
    let is_datetime = written.is_some_and(|w| {
        let w = w.trim();
        w.starts_with(|c: char| c.is_ascii_digit())
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | ':' | '.' | '+' | ' '))
    });
    match message.strip_prefix("invalid type: map,") {
        Some(rest) if is_datetime => format!("invalid type: datetime,{rest}"),
        _ => message,
    }
}

/// The message for an array where a table belongs.
const ARRAY_FOR_TABLE: &str = "invalid type: array, expected a table";

/// serde's message in the file's terms: the raw layer's type names
/// (`struct RawServer`, `i64`, `i128`) mean nothing to whoever wrote the
/// file. Messages without them pass through unchanged.
fn plain_schema_message(message: &str) -> String {
    // A TOML integer is an i64: one beyond u64 is read as i128, one
    // beyond i64 as u64, and either is then refused.
    let beyond_i64 = |prefix: &str, suffix: &str| {
        message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once('`'))
            .filter(|(_, tail)| tail.starts_with(suffix))
            .map(|(n, _)| n.to_owned())
    };
    if let Some(n) = beyond_i64("invalid type: integer `", " as i128")
        .or_else(|| beyond_i64("invalid value: integer `", ", expected i64"))
    {
        return if n.starts_with('-') {
            format!("must not be negative (got {n})")
        } else {
            format!(
                "is too large (got {n}; a TOML integer is at most {})",
                i64::MAX
            )
        };
    }
    if let Some(at) = message.find("expected struct Raw") {
        // An array where a table belongs is refused for its length.
        if message.starts_with("invalid length") {
            return ARRAY_FOR_TABLE.to_owned();
        }
        return format!("{}expected a table", &message[..at]);
    }
    [
        ("expected i64", "expected an integer"),
        ("expected a sequence", "expected an array"),
        ("expected a map", "expected a table"),
    ]
    .iter()
    .find_map(|(internal, plain)| {
        message
            .strip_suffix(internal)
            .map(|start| format!("{start}{plain}"))
    })
    .unwrap_or_else(|| message.to_owned())
}

/// Removes the entry whose key, value or array item spans exactly
/// `target` (one [`narrowest_entry`] found); false if none does.
fn remove_entry(table: &mut toml::de::DeTable<'_>, target: &Range<usize>) -> bool {
    use toml::de::DeValue;

    let hit = table
        .iter()
        .find(|(k, v)| k.span() == *target || v.span() == *target)
        .map(|(k, _)| k.get_ref().to_string());
    if let Some(name) = hit {
        return table.remove(name.as_str()).is_some();
    }
    for (_, v) in table.iter_mut() {
        let removed = match v.get_mut() {
            DeValue::Table(t) => remove_entry(t, target),
            DeValue::Array(items) => match items.iter().position(|item| item.span() == *target) {
                Some(i) => {
                    *items = (items.iter().enumerate())
                        .filter(|&(j, _)| j != i)
                        .map(|(_, item)| item.clone())
                        .collect();
                    true
                }
                None => items.iter_mut().any(|item| match item.get_mut() {
                    DeValue::Table(t) => remove_entry(t, target),
                    _ => false,
                }),
            },
            _ => false,
        };
        if removed {
            return true;
        }
    }
    false
}

/// The dotted key path (`server.bogus`, `backends[1].liveness.zz`) of the entry at a byte
/// offset, found by walking the spanned document. Used for serde errors, which carry a span
/// but no path.
/// The dotted path of the duplicate key at `span`, for a file that does not
/// parse (so no document to walk): the nearest table header above it
/// (`[[name]]` headers counted into `name[i]`), then the keys leading to it
/// on its own line (a dotted key's first parts, the inline tables it is in),
/// then the key's own text; a header named twice is its own path.
/// A line inside a multi-line string that looks like a header can mislead
/// it; the error's line and column stay exact either way.
fn duplicate_key_path(text: &str, span: Range<usize>) -> Option<String> {
    let key = text.get(span.clone())?.trim();
    if key.is_empty() {
        return None;
    }
    let line_start = text.get(..span.start)?.rfind('\n').map_or(0, |i| i + 1);
    let on_line = text.get(line_start..span.start)?;
    if on_line.trim_start().starts_with('[') {
        let header = text.get(line_start..span.end)?;
        return Some(header.trim().trim_start_matches('[').trim().to_owned());
    }
    let before = text.get(..line_start)?;
    let mut header = String::new();
    let mut arrays: Vec<(String, usize)> = Vec::new();
    for line in before.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            let name = name.trim().to_owned();
            let index = match arrays.iter_mut().find(|(n, _)| *n == name) {
                Some((_, count)) => {
                    *count += 1;
                    *count - 1
                }
                None => {
                    arrays.push((name.clone(), 1));
                    0
                }
            };
            header = format!("{name}[{index}]");
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            header = name.trim().to_owned();
        }
    }
    let path: Vec<String> = (!header.is_empty())
        .then_some(header)
        .into_iter()
        .chain(keys_leading_to(on_line))
        .chain([key.to_owned()])
        .collect();
    Some(path.join("."))
}

/// The keys that lead to a key starting right after `line` (the text of
/// its line before it): the first parts of a dotted key (`liveness.` in
/// `liveness.interval`) and the keys of the inline tables it sits in
/// (`liveness` in `liveness = { interval`). Quoted keys lose their quotes.
fn keys_leading_to(line: &str) -> Vec<String> {
    // Keys of the inline tables still open, and the key being read.
    let mut open: Vec<Vec<String>> = Vec::new();
    let mut key: Vec<String> = Vec::new();
    let mut part = String::new();
    let mut in_value = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                let mut quoted = String::new();
                while let Some(q) = chars.next() {
                    match q {
                        '\\' if c == '"' => quoted.extend(chars.next()),
                        q if q == c => break,
                        q => quoted.push(q),
                    }
                }
                if !in_value {
                    part.push_str(&quoted);
                }
            }
            '.' if !in_value => key.push(std::mem::take(&mut part)),
            '=' if !in_value => {
                key.push(std::mem::take(&mut part));
                in_value = true;
            }
            '{' if in_value => {
                open.push(std::mem::take(&mut key));
                in_value = false;
            }
            '}' => {
                open.pop();
                key.clear();
                in_value = true;
            }
            ',' => {
                key.clear();
                part.clear();
                in_value = false;
            }
            c if !in_value && !c.is_whitespace() => part.push(c),
            _ => {}
        }
    }
    open.into_iter().flatten().chain(key).collect()
}

fn key_path_at(text: &str, offset: usize) -> Option<String> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    narrowest_entry(doc.get_ref(), offset).map(|(_, path)| path)
}

/// The narrowest entry (a key, its value, or an array item) whose span holds the byte
/// `offset`: its span and dotted path. Header tables (`[server]`) span only their header,
/// so the walk descends into every table rather than only those whose span holds it.
fn narrowest_entry(table: &toml::de::DeTable<'_>, offset: usize) -> Option<(Range<usize>, String)> {
    use toml::de::{DeTable, DeValue};

    type Best = Option<(Range<usize>, String)>;

    fn consider(span: Range<usize>, offset: usize, path: &str, best: &mut Best) {
        let holds = span.contains(&offset) || (span.is_empty() && span.start == offset);
        if holds && best.as_ref().is_none_or(|(b, _)| span.len() <= b.len()) {
            *best = Some((span, path.to_owned()));
        }
    }

    fn walk(table: &DeTable<'_>, offset: usize, prefix: &str, best: &mut Best) {
        for (k, v) in table.iter() {
            let path = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            consider(k.span(), offset, &path, best);
            consider(v.span(), offset, &path, best);
            match v.get_ref() {
                DeValue::Table(t) => walk(t, offset, &path, best),
                DeValue::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let item_path = format!("{path}[{i}]");
                        consider(item.span(), offset, &item_path, best);
                        if let DeValue::Table(t) = item.get_ref() {
                            walk(t, offset, &item_path, best);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    let mut best = None;
    walk(table, offset, "", &mut best);
    best
}

// ---------------------------------------------------------------------------------------------
// Rendering for `weir check`.

/// A TOML basic string with the escapes TOML requires.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn dur(d: Duration) -> String {
    quote(&duration_text(d))
}

/// A duration as a config file writes it (`250ms`, `1m 30s`, `365d`), in
/// days at most: humantime's formatter counts months and years of 30.44
/// and 365.25 days, which printed `365d` as `11months 30days 3h 50m 24s`.
/// Read back by the same parser as the file.
pub(crate) fn duration_text(d: Duration) -> String {
    let secs = d.as_secs();
    let nanos = u64::from(d.subsec_nanos());
    let parts = [
        (secs / 86_400, "d"),
        (secs / 3600 % 24, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
        (nanos / 1_000_000, "ms"),
        (nanos / 1000 % 1000, "us"),
        (nanos % 1000, "ns"),
    ];
    let text: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if text.is_empty() {
        "0s".to_owned()
    } else {
        text.join(" ")
    }
}

fn render(c: &Config) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    // Writing to a String cannot fail; the results are ignored on purpose.
    let source = c
        .source
        .as_ref()
        .map_or_else(|| "(string)".to_owned(), |p| p.display().to_string());
    let _ = writeln!(
        o,
        "# weir configuration resolved from {source}: every key with its effective value"
    );
    for w in &c.warnings {
        let _ = writeln!(o, "# warning: {w}");
    }
    let s = &c.server;
    let _ = writeln!(o, "\n[server]");
    let _ = writeln!(o, "listen = {}", quote(&s.listen.to_string()));
    match s.admin_listen {
        Some(a) => {
            let _ = writeln!(o, "admin_listen = {}", quote(&a.to_string()));
        }
        None => {
            let _ = writeln!(
                o,
                "# admin_listen not set: /metrics and /admin/* are served on listen"
            );
        }
    }
    let _ = writeln!(o, "max_body_bytes = {}", s.max_body_bytes);
    let _ = writeln!(o, "max_buffered_body_bytes = {}", s.max_buffered_body_bytes);
    let _ = writeln!(o, "request_timeout = {}", dur(s.request_timeout));
    let _ = writeln!(o, "first_byte_timeout = {}", dur(s.first_byte_timeout));
    let _ = writeln!(o, "shutdown_grace = {}", dur(s.shutdown_grace));
    let format = match s.log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    let _ = writeln!(o, "log_format = {}", quote(format));
    match (&s.api_keys_env, &s.api_keys) {
        (Some(var), Some(keys)) => {
            let _ = writeln!(
                o,
                "api_keys_env = {}  # {} key(s) from ${var}: [redacted]",
                quote(var),
                keys.len()
            );
        }
        _ => {
            let _ = writeln!(o, "# api_keys_env not set: clients need no API key");
        }
    }
    match (&s.admin_token_env, &s.admin_token) {
        (Some(var), Some(_)) => {
            let _ = writeln!(
                o,
                "admin_token_env = {}  # token from ${var}: [redacted]",
                quote(var)
            );
        }
        _ => {
            let _ = writeln!(
                o,
                "# admin_token_env not set: /admin/* answers loopback clients only"
            );
        }
    }
    let _ = writeln!(o, "max_connections = {}", s.max_connections);
    let _ = writeln!(o, "header_read_timeout = {}", dur(s.header_read_timeout));
    let _ = writeln!(o, "idle_timeout = {}", dur(s.idle_timeout));
    let _ = writeln!(o, "watch_config = {}", s.watch_config);

    let _ = writeln!(o, "\n[limits]");
    match c.limits.requests_per_minute {
        Some(r) => {
            let _ = writeln!(o, "requests_per_minute = {r}");
        }
        None => {
            let _ = writeln!(o, "# requests_per_minute not set: no global request limit");
        }
    }
    match c.limits.tokens_per_minute {
        Some(t) => {
            let _ = writeln!(o, "tokens_per_minute = {t}");
        }
        None => {
            let _ = writeln!(o, "# tokens_per_minute not set: no global token limit");
        }
    }

    let d = &c.defaults;
    let _ = writeln!(o, "\n[defaults]");
    let _ = writeln!(o, "queue_timeout = {}", dur(d.queue_timeout));
    let _ = writeln!(o, "max_queue = {}", d.max_queue);
    let _ = writeln!(o, "max_tokens = {}", d.max_tokens);

    for m in &c.models {
        // An undeclared model is rendered commented out, so the text parses back to the same
        // configuration (it would otherwise become declared).
        let prefix = if m.declared { "" } else { "# " };
        if !m.declared {
            let _ = writeln!(
                o,
                "\n# model {:?} is not declared in [[models]]; it gets [defaults] limits:",
                m.name
            );
        } else {
            o.push('\n');
        }
        let _ = writeln!(o, "{prefix}[[models]]");
        let _ = writeln!(o, "{prefix}name = {}", quote(&m.name));
        let opt = |o: &mut String, key: &str, v: Option<String>, none: &str| {
            let _ = match v {
                Some(v) => writeln!(o, "{prefix}{key} = {v}"),
                None => writeln!(o, "# {key} not set: {none}"),
            };
        };
        opt(
            &mut o,
            "requests_per_minute",
            m.requests_per_minute.map(|v| v.to_string()),
            "no request limit",
        );
        opt(
            &mut o,
            "tokens_per_minute",
            m.tokens_per_minute.map(|v| v.to_string()),
            "no token limit",
        );
        opt(
            &mut o,
            "burst",
            m.burst.map(|v| v.to_string()),
            "capacity = requests_per_minute",
        );
        opt(
            &mut o,
            "max_concurrent",
            m.max_concurrent.map(|v| v.to_string()),
            "no concurrency cap",
        );
        let _ = writeln!(o, "{prefix}queue_timeout = {}", dur(m.queue_timeout));
        let _ = writeln!(o, "{prefix}max_queue = {}", m.max_queue);
        let _ = writeln!(o, "{prefix}max_tokens = {}", m.max_tokens);
    }

    for b in &c.backends {
        let _ = writeln!(o, "\n[[backends]]");
        let _ = writeln!(o, "name = {}", quote(&b.name));
        let _ = writeln!(o, "url = {}", quote(&b.url.to_string()));
        match (&b.api_key_env, &b.api_key) {
            (Some(var), Some(_)) => {
                let _ = writeln!(
                    o,
                    "api_key_env = {}  # key from ${var}: [redacted]",
                    quote(var)
                );
            }
            _ => {
                let _ = writeln!(o, "# api_key_env not set: no Authorization header upstream");
            }
        }
        let models: Vec<String> = b.models.iter().map(|m| quote(m)).collect();
        let _ = writeln!(o, "models = [{}]", models.join(", "));
        if !b.rename.is_empty() {
            let mut pairs: Vec<(&String, &String)> = b.rename.iter().collect();
            pairs.sort();
            let pairs: Vec<String> = pairs
                .into_iter()
                .map(|(k, v)| format!("{} = {}", quote(k), quote(v)))
                .collect();
            let _ = writeln!(o, "rename = {{ {} }}", pairs.join(", "));
        }
        let _ = writeln!(o, "weight = {}", b.weight);
        match b.max_concurrent {
            Some(m) => {
                let _ = writeln!(o, "max_concurrent = {m}");
            }
            None => {
                let _ = writeln!(o, "# max_concurrent not set: no in-flight cap");
            }
        }
        let _ = writeln!(o, "health_path = {}", quote(&b.health_path));
        match &b.metrics_path {
            Some(m) => {
                let _ = writeln!(o, "metrics_path = {}", quote(m));
            }
            None => {
                let _ = writeln!(
                    o,
                    "# metrics_path not set: the deep tier reads no engine metrics"
                );
            }
        }
        let _ = writeln!(o, "connect_timeout = {}", dur(b.connect_timeout));
    }

    let h = &c.health;
    let _ = writeln!(o, "\n[health]");
    let _ = writeln!(o, "enabled = {}", h.enabled);
    let _ = writeln!(o, "unhealthy_threshold = {}", h.unhealthy_threshold);
    let _ = writeln!(o, "healthy_threshold = {}", h.healthy_threshold);
    let _ = writeln!(o, "slow_start = {}", dur(h.slow_start));
    let _ = writeln!(
        o,
        "liveness = {{ interval = {}, timeout = {} }}",
        dur(h.liveness.interval),
        dur(h.liveness.timeout)
    );
    let _ = writeln!(
        o,
        "readiness = {{ interval = {}, timeout = {}, degraded_latency = {} }}",
        dur(h.readiness.interval),
        dur(h.readiness.timeout),
        dur(h.readiness.degraded_latency)
    );
    let _ = writeln!(
        o,
        "deep = {{ interval = {}, timeout = {}, samples = {}, max_tokens = {} }}",
        dur(h.deep.interval),
        dur(h.deep.timeout),
        h.deep.samples,
        h.deep.max_tokens
    );

    let ol = &c.outlier;
    let _ = writeln!(o, "\n[outlier]");
    let _ = writeln!(o, "consecutive_failures = {}", ol.consecutive_failures);
    let _ = writeln!(o, "ejection_time = {}", dur(ol.ejection_time));
    let _ = writeln!(o, "max_ejection_percent = {}", ol.max_ejection_percent);

    let r = &c.retry;
    let _ = writeln!(o, "\n[retry]");
    let _ = writeln!(o, "max_attempts = {}", r.max_attempts);
    let _ = writeln!(o, "base_delay = {}", dur(r.base_delay));
    let _ = writeln!(o, "max_delay = {}", dur(r.max_delay));
    let _ = writeln!(o, "budget_percent = {}", r.budget_percent);

    match &c.cluster {
        Some(cl) => {
            let _ = writeln!(o, "\n[cluster]");
            let _ = writeln!(
                o,
                "redis_url_env = {}  # URL from ${}: [redacted]",
                quote(&cl.redis_url_env),
                cl.redis_url_env
            );
            let _ = writeln!(o, "key_prefix = {}", quote(&cl.key_prefix));
        }
        None => {
            let _ = writeln!(
                o,
                "\n# [cluster] not set: rate limits are enforced per process"
            );
        }
    }
    o
}

/// `url` with everything between its scheme and its last `@` shown as
/// `***`: any `user:password@`, even one whose password holds a `/` or a
/// `?` (which would end the authority where a parser looks for it). A
/// path with an `@` is over-masked, which only an error message shows.
fn without_userinfo(url: &str) -> std::borrow::Cow<'_, str> {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url.rfind('@').filter(|&at| at >= start) {
        Some(at) => format!(
            "{}***{}",
            url.get(..start).unwrap_or_default(),
            url.get(at..).unwrap_or_default()
        )
        .into(),
        None => url.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SENTINEL: &str = "sk-SENTINEL-123";

    /// A FIFO is refused from the file opened, and opening it does not wait
    /// for a writer: a path swapped to one after any earlier look cannot
    /// block a reload. (Its writer is never opened here, so a read that
    /// waited would hang the test; it is run on a thread and given 10 s.)
    #[cfg(unix)]
    #[test]
    fn reading_again_refuses_a_fifo_without_waiting_for_its_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("weir.toml");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read_again(&fifo).map_err(|e| e.kind()));
        });
        let read = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the open waited for a writer");
        assert_eq!(read, Err(std::io::ErrorKind::InvalidInput));
        // A regular file and a directory read as before.
        let file = dir.path().join("real.toml");
        std::fs::write(&file, "x = 1").expect("write");
        assert_eq!(read_again(&file).expect("a file reads"), b"x = 1");
        assert!(read_again(dir.path()).is_err());
    }

    /// An environment that knows the variables the tests name.
    fn env(name: &str) -> Option<String> {
        match name {
            "WEIR_API_KEYS" => Some(format!(" {SENTINEL}-a , ,{SENTINEL}-b ")),
            "WEIR_ADMIN_TOKEN" => Some(format!("{SENTINEL}-admin")),
            "UP_KEY" => Some(format!("{SENTINEL}-up")),
            "WEIR_REDIS_URL" => Some(format!("redis://:{SENTINEL}@redis:6379/0")),
            "EMPTY" => Some("  ".to_owned()),
            _ => None,
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const MINIMAL: &str = r#"
[[models]]
name = "m"

[[backends]]
name = "b"
url = "http://127.0.0.1:9001/v1"
models = ["m"]
"#;

    const FULL: &str = r#"
[server]
listen = "127.0.0.1:8081"
admin_listen = "127.0.0.1:9090"
max_body_bytes = 1_048_576
request_timeout = "120s"
first_byte_timeout = "30s"
shutdown_grace = "0s"
log_format = "json"
api_keys_env = "WEIR_API_KEYS"
admin_token_env = "WEIR_ADMIN_TOKEN"
max_connections = 500
header_read_timeout = "5s"
idle_timeout = "90s"
watch_config = true

[limits]
requests_per_minute = 2000
tokens_per_minute = 1_000_000

[defaults]
queue_timeout = "3s"
max_queue = 10
max_tokens = 128

[[models]]
name = "gpt-4.1"
requests_per_minute = 500
tokens_per_minute = 150_000
burst = 50
max_concurrent = 50
max_queue = 5

[[models]]
name = "deepseek"

[[backends]]
name = "sgp-01"
url = "https://api.example.com/v1"
api_key_env = "UP_KEY"
models = ["gpt-4.1", "deepseek"]
rename = { "gpt-4.1" = "gpt-4.1-2025-04-14" }
weight = 70
max_concurrent = 50
health_path = "/health"
metrics_path = "/metrics"
connect_timeout = "2s"

[[backends]]
name = "local"
url = "http://127.0.0.1:9002/"
models = ["gpt-4.1"]
weight = 0

[health]
enabled = false
unhealthy_threshold = 4
healthy_threshold = 1
slow_start = "0s"
liveness = { interval = "1s", timeout = "500ms" }
readiness = { interval = "10s", timeout = "3s", degraded_latency = "1s" }
deep = { interval = "10m", timeout = "2m", samples = 2, max_tokens = 8 }

[outlier]
consecutive_failures = 2
ejection_time = "10s"
max_ejection_percent = 100

[retry]
max_attempts = 1
base_delay = "10ms"
max_delay = "10ms"
budget_percent = 0

[cluster]
redis_url_env = "WEIR_REDIS_URL"
key_prefix = "prod"
"#;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, "weir.toml", &env)
    }

    fn errors(text: &str) -> Vec<ConfigError> {
        match parse(text) {
            Ok(c) => panic!("expected errors, got a config: {c:?}"),
            Err(e) => e.0,
        }
    }

    /// The one error a file produces, as `LINE:COL: KEY: message`.
    fn one_error(text: &str) -> ConfigError {
        let errs = errors(text);
        assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
        errs.into_iter().next().unwrap()
    }

    /// `errs` are exactly these (line, column, key, part of the message).
    fn assert_exactly(errs: &[ConfigError], expect: &[(usize, usize, &str, &str)]) {
        let all = ConfigErrors(errs.to_vec()).to_string();
        for &(line, col, key, needle) in expect {
            assert!(
                has(errs, line, col, key, needle),
                "missing {line}:{col}: {key}: ..{needle}.. in\n{all}"
            );
        }
        assert_eq!(errs.len(), expect.len(), "{all}");
    }

    fn has(errs: &[ConfigError], line: usize, column: usize, key: &str, needle: &str) -> bool {
        errs.iter().any(|e| {
            e.line == line && e.column == column && e.key == key && e.message.contains(needle)
        })
    }

    /// Durations print in days at most, and read back as they were.
    #[test]
    fn durations_print_as_a_file_writes_them_and_read_back() {
        let secs = Duration::from_secs;
        for (d, text) in [
            (secs(365 * 86_400), "365d"),
            (secs(31 * 86_400), "31d"),
            (secs(90), "1m 30s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_micros(1500), "1ms 500us"),
            (Duration::ZERO, "0s"),
            (secs(86_400 + 3600 + 61), "1d 1h 1m 1s"),
        ] {
            assert_eq!(duration_text(d), text);
            assert_eq!(humantime::parse_duration(text).ok(), Some(d), "{text}");
        }
    }

    /// A URL refused for its credentials does not repeat them: the error
    /// goes to the log and the `/admin/reload` answer.
    #[test]
    fn a_url_with_credentials_is_refused_without_showing_them() {
        let toml = "[[backends]]\nname = \"b\"\nurl = \"http://user:hunter2pw@127.0.0.1:1/v1\"\nmodels = [\"m\"]\n";
        let errs = parse(toml).unwrap_err();
        let text = format!("{errs:?}");
        assert!(!text.contains("hunter2pw"), "{text}");
        assert!(text.contains("http://***@127.0.0.1:1/v1"), "{text}");
        assert_eq!(without_userinfo("https://a@b@h/x"), "https://***@h/x");
        assert_eq!(without_userinfo("http://u:pa/ss@h/v1"), "http://***@h/v1");
        assert_eq!(without_userinfo("http://h/p@q"), "http://***@q");
        assert_eq!(without_userinfo("http://h/v1"), "http://h/v1");
        assert_eq!(without_userinfo("u:p@h"), "***@h");
    }

    /// A port that is not a number from 1 to 65535 is refused: http::Uri
    /// takes it and reports no port, which would send the backend's traffic
    /// to 80 or 443.
    #[test]
    fn a_url_whose_port_cannot_be_connected_to_is_refused() {
        let file =
            |url: &str| format!("[[backends]]\nname = \"b\"\nurl = \"{url}\"\nmodels = [\"m\"]\n");
        for url in [
            "http://127.0.0.1:106537/v1",
            "http://127.0.0.1:abc/v1",
            "https://127.0.0.1:/v1",
            "http://[::1]:65536/v1",
            "http://127.0.0.1:0/v1",
            "http://127.0.0.1:+8000/v1",
        ] {
            let errs = parse(&file(url)).unwrap_err();
            let text = format!("{errs:?}");
            assert!(text.contains("port"), "{url}: {text}");
        }
        for (url, port) in [
            ("http://127.0.0.1:65535/v1", 65535),
            ("http://[::1]:8000/v1", 8000),
            ("http://[::1]/v1", 80),
            ("https://api.example.com/v1", 443),
        ] {
            let c = parse(&file(url)).unwrap();
            assert_eq!(c.backends[0].url.port_u16().unwrap_or(port), port, "{url}");
        }
    }

    /// A URL without a scheme, or with an IPv6 zone, is refused with a
    /// message that says what to write instead.
    #[test]
    fn a_url_without_a_scheme_or_with_a_zone_says_why() {
        let file =
            |url: &str| format!("[[backends]]\nname = \"b\"\nurl = \"{url}\"\nmodels = [\"m\"]\n");
        for (url, why) in [
            ("localhost:8000/v1", "must start with http:// or https://"),
            ("http://[fe80::1%25eth0]:8000/v1", "IPv6 zone"),
        ] {
            let errs = parse(&file(url)).unwrap_err();
            let text = format!("{errs:?}");
            assert!(text.contains(why), "{url}: {text}");
        }
    }

    /// A backend's name is sent as `x-weir-backend`: it must be a valid
    /// header value.
    #[test]
    fn a_backend_name_must_be_a_header_value() {
        let toml =
            "[[backends]]\nname = \"x\\ny\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n";
        let errs = parse(toml).unwrap_err();
        assert!(
            format!("{errs:?}").contains("cannot be sent as a header"),
            "{errs:?}"
        );
    }

    /// A rename key is trimmed as the names in `models` are: written as
    /// the list writes it, it names the same model.
    #[test]
    fn a_rename_key_is_trimmed_like_the_models_it_renames() {
        let c = parse(
            "[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/v1\"\n\
             models = [\"m \"]\nrename = { \"m \" = \"real\" }\n",
        )
        .unwrap();
        assert_eq!(
            c.backends[0].rename.get("m").map(String::as_str),
            Some("real")
        );
        let e = one_error(
            "[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/v1\"\n\
             models = [\"m\"]\nrename = { \" x\" = \"real\" }\n",
        );
        assert_eq!(
            (e.line, e.column, e.key.as_str()),
            (5, 12, "backends[0].rename.x")
        );
    }

    /// A probe path's fragment would be dropped before the request is
    /// sent (as a URL's is, which is refused too).
    #[test]
    fn a_fragment_in_a_probe_path_is_refused() {
        for key in ["health_path", "metrics_path"] {
            let e = one_error(&format!(
                "[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/v1\"\n\
                 models = [\"m\"]\n{key} = \"/health#x\"\n"
            ));
            assert_eq!(e.line, 5, "{e}");
            assert_eq!(e.key, format!("backends[0].{key}"));
            assert!(e.message.contains("fragment"), "{e}");
        }
    }

    /// A backend serving many models, and many backends (checked by
    /// lookups, not list searches: `weir check` on 20,000 backends went
    /// from 14.8 s to 1.3 s), give every warning, each pointing at the
    /// model's first place in its list.
    #[test]
    fn many_models_and_backends_are_all_checked() {
        let names: Vec<String> = (0..2_000).map(|i| format!("\"m{i}\"")).collect();
        let mut text = format!(
            "[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [{}]\n",
            names.join(", ")
        );
        for i in 0..200 {
            text.push_str(&format!(
                "[[backends]]\nname = \"b{i}\"\nurl = \"http://127.0.0.1:1/v1\"\n\
                 models = [\"m{i}\"]\nweight = 0\n"
            ));
        }
        let checked = Config::parse_checked(&text, "weir.toml", &env);
        let c = checked.result.unwrap();
        assert_eq!(c.models.len(), 2_000);
        assert_eq!(checked.warnings.len(), 2_000);
        assert!(
            checked.warnings[1].starts_with("weir.toml:4:17: "),
            "{}",
            checked.warnings[1]
        );
    }

    #[test]
    fn full_file_is_read_into_typed_values() {
        let c = parse(FULL).unwrap();
        let s = &c.server;
        assert_eq!(s.listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(s.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(s.max_body_bytes, 1_048_576);
        assert_eq!(s.request_timeout, Duration::from_secs(120));
        assert_eq!(s.first_byte_timeout, Duration::from_secs(30));
        assert_eq!(s.shutdown_grace, Duration::ZERO);
        assert_eq!(s.log_format, LogFormat::Json);
        let keys: Vec<&str> = s
            .api_keys
            .as_ref()
            .unwrap()
            .iter()
            .map(Secret::expose)
            .collect();
        assert_eq!(keys, [format!("{SENTINEL}-a"), format!("{SENTINEL}-b")]);
        assert_eq!(s.api_keys_env.as_deref(), Some("WEIR_API_KEYS"));
        assert_eq!(
            s.admin_token.as_ref().unwrap().expose(),
            format!("{SENTINEL}-admin")
        );
        assert_eq!(s.max_connections, 500);
        assert_eq!(s.header_read_timeout, Duration::from_secs(5));
        assert_eq!(s.idle_timeout, Duration::from_secs(90));
        assert!(s.watch_config);
        assert_eq!(c.limits.requests_per_minute, NonZeroU32::new(2000));
        assert_eq!(c.limits.tokens_per_minute, NonZeroU64::new(1_000_000));

        let gpt = c.model("gpt-4.1").unwrap();
        assert_eq!(gpt.burst, NonZeroU32::new(50));
        assert_eq!(gpt.burst_capacity(), NonZeroU32::new(50));
        assert_eq!(gpt.max_queue, 5);
        assert_eq!(
            gpt.queue_timeout,
            Duration::from_secs(3),
            "inherited from [defaults]"
        );
        assert_eq!(gpt.max_tokens, 128);
        assert!(gpt.declared);
        let ds = c.model("deepseek").unwrap();
        assert_eq!(ds.requests_per_minute, None);
        assert_eq!(ds.burst_capacity(), None);

        let b = c.backend("sgp-01").unwrap();
        assert_eq!(b.url.to_string(), "https://api.example.com/v1");
        assert_eq!(
            b.api_key.as_ref().unwrap().expose(),
            format!("{SENTINEL}-up")
        );
        assert_eq!(
            b.rename.get("gpt-4.1").map(String::as_str),
            Some("gpt-4.1-2025-04-14")
        );
        assert_eq!(b.weight, 70);
        assert_eq!(b.metrics_path.as_deref(), Some("/metrics"));
        assert_eq!(b.connect_timeout, Duration::from_secs(2));
        let local = c.backend("local").unwrap();
        assert_eq!(
            local.url.path(),
            "/",
            "kept as parsed, trailing slash and all"
        );
        assert_eq!(local.weight, 0);

        assert!(!c.health.enabled);
        assert_eq!(c.health.liveness.timeout, Duration::from_millis(500));
        assert_eq!(c.health.deep.interval, Duration::from_secs(600));
        assert_eq!(c.health.deep.samples, 2);
        assert_eq!(c.outlier.max_ejection_percent, 100);
        assert_eq!(c.retry.max_attempts, NonZeroU32::MIN);
        assert_eq!(c.retry.max_delay, Duration::from_millis(10));
        let cluster = c.cluster.as_ref().unwrap();
        assert_eq!(cluster.key_prefix, "prod");
        assert!(cluster.redis_url.expose().starts_with("redis://"));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn render_round_trips_and_never_shows_a_secret() {
        let c = parse(FULL).unwrap();
        let text = c.render();
        assert!(!text.contains("SENTINEL"), "{text}");
        assert!(text.contains("[redacted]"));
        assert!(text.contains("$WEIR_API_KEYS"));
        let again = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(format!("{:?}", again.server), format!("{:?}", c.server));
        assert_eq!(again.server.api_keys, c.server.api_keys);
        assert_eq!(again.limits, c.limits);
        assert_eq!(again.defaults, c.defaults);
        assert_eq!(again.models, c.models);
        assert_eq!(again.backends, c.backends);
        assert_eq!(again.health, c.health);
        assert_eq!(again.outlier, c.outlier);
        assert_eq!(again.retry, c.retry);
        assert_eq!(format!("{:?}", again.cluster), format!("{:?}", c.cluster));

        // Undeclared models and warnings survive the round trip as comments.
        let text = MINIMAL.replace("models = [\"m\"]", "models = [\"m\", \"extra\"]");
        let c = parse(&text).unwrap();
        let rendered = c.render();
        assert!(rendered.contains("# warning: weir.toml:"), "{rendered}");
        let again = parse(&rendered).unwrap();
        assert_eq!(again.models, c.models);
        assert_eq!(again.warnings.len(), 1);
    }

    #[test]
    fn secret_debug_and_display_are_redacted() {
        let s = Secret::new(SENTINEL);
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        let c = parse(FULL).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("SENTINEL"), "{debug}");
    }

    /// The body budget holds at least one body of the largest size
    /// allowed: by default it grows with `max_body_bytes`, and a file that
    /// sets it lower is refused at the key.
    #[test]
    fn the_body_budget_holds_at_least_one_whole_body() {
        let big = Config::parse(
            &format!("[server]\nmax_body_bytes = 2_000_000_000\n{MINIMAL}"),
            "t.toml",
            &no_env,
        )
        .unwrap();
        assert_eq!(big.server.max_buffered_body_bytes, 2_000_000_000);
        let set = Config::parse(
            &format!("[server]\nmax_buffered_body_bytes = 5_000_000\nmax_body_bytes = 5_000_000\n{MINIMAL}"),
            "t.toml",
            &no_env,
        )
        .unwrap();
        assert_eq!(set.server.max_buffered_body_bytes, 5_000_000);
        let e = one_error(&format!(
            "[server]\nmax_buffered_body_bytes = 1000\n{MINIMAL}"
        ));
        assert_eq!(
            (e.line, e.key.as_str()),
            (2, "server.max_buffered_body_bytes")
        );
        assert!(
            e.message
                .contains("at least server.max_body_bytes (10485760)"),
            "{e}"
        );
        let e = one_error(&format!("[server]\nmax_buffered_body_bytes = 0\n{MINIMAL}"));
        assert_eq!(e.key, "server.max_buffered_body_bytes");
    }

    #[test]
    fn defaults_are_filled_in() {
        let c = Config::parse(MINIMAL, "min.toml", &no_env).unwrap();
        assert_eq!(c.source, None);
        let s = &c.server;
        assert_eq!(s.listen, defaults::LISTEN);
        assert_eq!(s.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(s.admin_listen, None);
        assert_eq!(s.max_body_bytes, 10_485_760);
        assert_eq!(s.max_buffered_body_bytes, 1 << 30);
        assert_eq!(s.request_timeout, Duration::from_secs(600));
        assert_eq!(s.first_byte_timeout, Duration::from_secs(60));
        assert_eq!(s.shutdown_grace, Duration::from_secs(30));
        assert_eq!(s.log_format, LogFormat::Text);
        assert!(s.api_keys.is_none() && s.api_keys_env.is_none());
        assert!(s.admin_token.is_none() && s.admin_token_env.is_none());
        assert_eq!(s.max_connections, 10_000);
        assert_eq!(s.header_read_timeout, Duration::from_secs(10));
        assert_eq!(s.idle_timeout, Duration::from_secs(60));
        assert!(!s.watch_config);
        assert_eq!(c.limits, GlobalLimits::default());
        assert_eq!(
            c.defaults,
            Defaults {
                queue_timeout: Duration::from_secs(10),
                max_queue: 1000,
                max_tokens: 256
            }
        );
        let m = c.model("m").unwrap();
        assert_eq!(
            (m.queue_timeout, m.max_queue, m.max_tokens),
            (Duration::from_secs(10), 1000, 256)
        );
        assert_eq!(
            (m.requests_per_minute, m.burst, m.max_concurrent),
            (None, None, None)
        );
        let b = &c.backends[0];
        assert_eq!(b.weight, 100);
        assert_eq!(b.health_path, "");
        assert_eq!(b.metrics_path, None);
        assert_eq!(b.api_key, None);
        assert_eq!(b.connect_timeout, Duration::from_secs(5));
        assert!(b.rename.is_empty());
        let h = &c.health;
        assert!(h.enabled);
        assert_eq!(
            (h.unhealthy_threshold.get(), h.healthy_threshold.get()),
            (3, 2)
        );
        assert_eq!(h.slow_start, Duration::from_secs(30));
        assert_eq!(
            h.liveness,
            ProbeTier {
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2)
            }
        );
        assert_eq!(
            h.readiness,
            ReadinessTier {
                interval: Duration::from_secs(30),
                timeout: Duration::from_secs(10),
                degraded_latency: Duration::from_secs(5)
            }
        );
        assert_eq!(
            h.deep,
            DeepTier {
                interval: Duration::from_secs(300),
                timeout: Duration::from_secs(60),
                samples: 5,
                max_tokens: 16
            }
        );
        assert_eq!(c.outlier.consecutive_failures.get(), 5);
        assert_eq!(c.outlier.ejection_time, Duration::from_secs(30));
        assert_eq!(c.outlier.max_ejection_percent, 50);
        assert_eq!(c.retry.max_attempts.get(), 3);
        assert_eq!(c.retry.base_delay, Duration::from_millis(50));
        assert_eq!(c.retry.max_delay, Duration::from_secs(2));
        assert_eq!(c.retry.budget_percent, 20);
        assert!(c.cluster.is_none());
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn example_file_parses_and_mirrors_defaults() {
        let example = include_str!("../config/weir.toml");
        let c =
            Config::parse(example, "config/weir.toml", &no_env).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backends[0].url.to_string(), "http://127.0.0.1:9001/v1");
        assert_eq!(c.backends[1].url.to_string(), "http://127.0.0.1:9002/v1");
        let min = Config::parse(MINIMAL, "min.toml", &no_env).unwrap();
        assert_eq!(format!("{:?}", c.server), format!("{:?}", min.server));
        assert_eq!(c.limits, min.limits);
        assert_eq!(c.defaults, min.defaults);
        assert_eq!(c.health, min.health);
        assert_eq!(c.outlier, min.outlier);
        assert_eq!(c.retry, min.retry);
        assert!(c.cluster.is_none());
        // Per-backend keys the example writes out equal the defaults too.
        let (ex, df) = (&c.backends[0], &min.backends[0]);
        assert_eq!(
            (ex.weight, &ex.health_path, ex.connect_timeout),
            (df.weight, &df.health_path, df.connect_timeout)
        );
        // The first model spells out the [defaults] overrides with their default values.
        let m = &c.models[0];
        assert_eq!(
            (m.queue_timeout, m.max_queue, m.max_tokens),
            (
                min.defaults.queue_timeout,
                min.defaults.max_queue,
                min.defaults.max_tokens
            )
        );
    }

    #[test]
    fn example_file_commented_env_keys_are_valid_when_uncommented() {
        // The env-var keys are commented out in the example; uncommented, with their variables
        // set, the file still validates.
        let example = include_str!("../config/weir.toml");
        let text: String = example
            .lines()
            .map(|l| {
                let uncomment = [
                    "# api_keys_env",
                    "# admin_token_env",
                    "# admin_listen",
                    "# api_key_env",
                    "# [cluster]",
                    "# redis_url_env",
                    "# key_prefix",
                    "# requests_per_minute",
                    "# tokens_per_minute",
                ];
                match uncomment.iter().find(|p| l.starts_with(*p)) {
                    Some(_) => l.trim_start_matches("# ").to_owned(),
                    None => l.to_owned(),
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let env = |name: &str| match name {
            "LOCAL_1_API_KEY" => Some("k".to_owned()),
            other => env(other),
        };
        let c = Config::parse(&text, "weir.toml", &env).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.cluster.is_some());
        assert!(c.server.admin_token.is_some() && c.server.api_keys.is_some());
        assert!(c.backends[0].api_key.is_some());
        assert!(c.limits.requests_per_minute.is_some());
    }

    #[test]
    fn load_reads_a_file_and_names_it() {
        let path =
            std::env::temp_dir().join(format!("weir-config-test-{}.toml", std::process::id()));
        std::fs::write(&path, MINIMAL).unwrap();
        let c = Config::load(&path, &no_env).unwrap();
        assert_eq!(c.source.as_deref(), Some(path.as_path()));
        std::fs::remove_file(&path).unwrap();
        let e = Config::load(&path, &no_env).unwrap_err();
        assert_eq!(e.0[0].key, "(file)");
        assert!(e.to_string().starts_with(&path.display().to_string()));
    }

    #[test]
    fn unknown_key_is_rejected_with_line_column_and_path() {
        let text = format!("{MINIMAL}\n[server]\nlisten = \"0.0.0.0:1\"\n  bogus = 1\n");
        let e = one_error(&text);
        let line = text.lines().position(|l| l.contains("bogus")).unwrap() + 1;
        assert_eq!(
            (e.line, e.column, e.key.as_str()),
            (line, 3, "server.bogus")
        );
        assert!(e.message.contains("unknown field `bogus`"), "{e}");
        assert_eq!(
            e.to_string(),
            format!("weir.toml:{line}:3: server.bogus: {}", e.message)
        );

        // Inside an array of tables and an inline table.
        let text =
            format!("{MINIMAL}[health]\nliveness = {{ interval = \"1s\", every = \"2s\" }}\n");
        let e = one_error(&text);
        assert_eq!(e.key, "health.liveness.every");
        let text = MINIMAL.replace("name = \"b\"", "name = \"b\"\nwieght = 3");
        let e = one_error(&text);
        assert_eq!(
            (e.line, e.column, e.key.as_str()),
            (7, 1, "backends[0].wieght")
        );
        // An unknown section.
        let e = one_error(&format!("{MINIMAL}[serverr]\n"));
        assert_eq!(e.key, "serverr");
    }

    #[test]
    fn a_duplicate_key_is_named() {
        let errs = errors(
            "[server]\nlisten = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"\n[[models]]\nname = \"a\"\n[[backends]]\nname = \"b\"\n[[backends]]\nname = \"c\"\nname = \"d\"\n",
        );
        let keys: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            keys,
            vec![(3, "server.listen"), (10, "backends[1].name")],
            "{errs:?}"
        );
    }

    /// A dotted key, or one in an inline table, is named by its whole path;
    /// a header named twice by its own.
    #[test]
    fn a_duplicate_dotted_or_inline_key_is_named_in_full() {
        let key = |text: &str| one_error(text).key;
        assert_eq!(
            key("[health]\nliveness.interval = \"5s\"\nliveness.interval = \"6s\"\n"),
            "health.liveness.interval"
        );
        assert_eq!(
            key("[health]\nreadiness = { timeout = \"1s\", interval = \"5s\", interval = \"6s\" }\n"),
            "health.readiness.interval"
        );
        assert_eq!(
            key("health.liveness.interval = \"5s\"\nhealth.liveness.interval = \"6s\"\n"),
            "health.liveness.interval"
        );
        assert_eq!(
            key("backends = 3\n[[backends]]\nname = \"b\"\n"),
            "backends"
        );
        assert_eq!(
            key("[health.deep]\nsamples = 1\n[health.deep]\n"),
            "health.deep"
        );
    }

    /// serde's internal names (`struct RawServer`, `i64`, `i128`) never
    /// reach the user; the location and key path stay as they were.
    #[test]
    fn type_errors_speak_of_tables_arrays_and_integers() {
        let check = |text: &str, expect: (usize, usize, &str, &str)| {
            let e = one_error(text);
            assert_eq!(
                (e.line, e.column, e.key.as_str(), e.message.as_str()),
                expect,
                "{e}"
            );
        };
        check(
            &format!("server = 1\n{MINIMAL}"),
            (
                1,
                10,
                "server",
                "invalid type: integer `1`, expected a table",
            ),
        );
        check(
            &format!("{MINIMAL}[health]\nliveness = \"5s\"\n"),
            (
                10,
                12,
                "health.liveness",
                "invalid type: string \"5s\", expected a table",
            ),
        );
        check(
            &format!("{MINIMAL}[health]\ndeep = [1]\n"),
            (
                10,
                8,
                "health.deep",
                "invalid type: array, expected a table",
            ),
        );
        check(
            &format!("{MINIMAL}[server]\nmax_body_bytes = 99999999999999999999\n"),
            (
                10,
                18,
                "server.max_body_bytes",
                "is too large (got 99999999999999999999; a TOML integer is at most 9223372036854775807)",
            ),
        );
        check(
            &format!("{MINIMAL}[server]\nmax_body_bytes = -99999999999999999999\n"),
            (
                10,
                18,
                "server.max_body_bytes",
                "must not be negative (got -99999999999999999999)",
            ),
        );
        check(
            &format!("{MINIMAL}[server]\nmax_body_bytes = \"x\"\n"),
            (
                10,
                18,
                "server.max_body_bytes",
                "invalid type: string \"x\", expected an integer",
            ),
        );
        let all = ConfigErrors(errors(&format!(
            "{MINIMAL}[[backends]]\nname = \"c\"\nurl = \"http://h/v1\"\nmodels = \"m\"\nrename = 1\n"
        )))
        .to_string();
        assert!(
            all.contains("models: invalid type: string \"m\", expected an array"),
            "{all}"
        );
        assert!(
            all.contains("rename: invalid type: integer `1`, expected a table"),
            "{all}"
        );
        assert!(!all.contains("Raw") && !all.contains("i64"), "{all}");
    }

    /// The warning that `first_byte_timeout` outlasts `request_timeout`
    /// points at the key the file sets.
    #[test]
    fn the_first_byte_warning_points_at_the_key_written() {
        let c = parse(&format!("{MINIMAL}[server]\nrequest_timeout = \"30s\"\n")).unwrap();
        assert_eq!(
            c.warnings,
            ["weir.toml:10:19: server.request_timeout: is shorter than server.first_byte_timeout (1m, its default), so it ends the request first"]
        );
        let c = parse(&format!(
            "{MINIMAL}[server]\nfirst_byte_timeout = \"11m\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.warnings,
            ["weir.toml:10:22: server.first_byte_timeout: is longer than server.request_timeout, which ends the request first"]
        );
    }

    /// A refused timeout is not compared as the default standing in for it:
    /// `first_byte_timeout = "0s"` beside a 30 s `request_timeout` is one
    /// error, not also a warning that 60 s outlasts 30 s.
    #[test]
    fn a_refused_timeout_is_not_compared() {
        for server in [
            "request_timeout = \"30s\"\nfirst_byte_timeout = \"0s\"\n",
            "request_timeout = \"30s\"\nfirst_byte_timeout = \"soon\"\n",
            "request_timeout = \"0s\"\nfirst_byte_timeout = \"11m\"\n",
        ] {
            let checked =
                Config::parse_checked(&format!("{MINIMAL}[server]\n{server}"), "weir.toml", &env);
            let errors = checked.result.expect_err("a timeout is refused");
            assert_eq!(errors.0.len(), 1, "{server}: {errors}");
            assert!(
                checked.warnings.is_empty(),
                "{server}: {:?}",
                checked.warnings
            );
        }
    }

    /// A token bucket smaller than a model's `max_tokens` (here the
    /// default, 256) would refuse every request that sets none: `weir
    /// check` says so, at the key.
    #[test]
    fn token_buckets_below_max_tokens_are_warned_of() {
        let checked = Config::parse_checked(
            "[limits]\ntokens_per_minute = 200\n\n[[models]]\nname = \"m\"\ntokens_per_minute = 100\n\n[[models]]\nname = \"n\"\nmax_tokens = 50\ntokens_per_minute = 100\n\n[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:9001/v1\"\nmodels = [\"m\", \"n\"]\n",
            "weir.toml",
            &env,
        );
        assert!(checked.result.is_ok());
        let w = &checked.warnings;
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("weir.toml:6:21: models[0].tokens_per_minute: 100 is below the model's max_tokens (256)"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with(
                "weir.toml:2:21: limits.tokens_per_minute: 200 is below the max_tokens of m:"
            ),
            "{w:?}"
        );
        let fine = Config::parse_checked(
            &format!("{MINIMAL}\n[limits]\ntokens_per_minute = 256\n"),
            "weir.toml",
            &env,
        );
        assert_eq!(fine.warnings, Vec::<String>::new());
    }

    /// `weir check` needs the warnings of a file that has errors too.
    #[test]
    fn warnings_are_kept_beside_errors() {
        let checked = Config::parse_checked(
            &format!("{MINIMAL}[server]\nrequest_timeout = \"30s\"\nlisten = \"nowhere\"\n"),
            "weir.toml",
            &env,
        );
        let errors = checked.result.expect_err("listen is invalid");
        assert_eq!(errors.0.len(), 1, "{errors}");
        assert_eq!(checked.warnings.len(), 1, "{:?}", checked.warnings);
        assert!(checked.warnings[0].starts_with("weir.toml:10:19: server.request_timeout: "));
    }

    /// What is checked after the schema pass took an entry out does not
    /// report that entry's absence again: no model "not served" because a
    /// backend's `models` had the wrong type, no list "empty" because its
    /// one item was wrong, no comparison with a default standing in for a
    /// refused value.
    #[test]
    fn a_key_taken_out_causes_no_second_error_or_warning() {
        let backend = "[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:9001/v1\"\n";
        let declared = "[[models]]\nname = \"m\"\n";
        for (text, key) in [
            (
                format!("{declared}{backend}models = \"m\"\n"),
                "backends[0].models",
            ),
            (
                format!("{declared}{backend}models = [[\"m\"]]\n"),
                "backends[0].models[0]",
            ),
            (format!("backends = \"x\"\n{declared}"), "backends"),
        ] {
            assert_eq!(one_error(&text).key, key, "{text}");
        }
        for (text, key) in [
            (
                format!("[server]\nrequest_timeout = 5\nfirst_byte_timeout = \"20m\"\n{declared}{backend}models = [\"m\"]\n"),
                "server.request_timeout",
            ),
            (
                format!("[health.readiness]\ntimeout = 5\ndegraded_latency = \"20s\"\n{declared}{backend}models = [\"m\"]\n"),
                "health.readiness.timeout",
            ),
            (
                format!("{declared}tokens_per_minute = 200\nmax_tokens = \"300\"\n{backend}models = [\"m\"]\n"),
                "models[0].max_tokens",
            ),
            (
                format!("[limits]\ntokens_per_minute = 200\n[defaults]\nmax_tokens = \"300\"\n{declared}{backend}models = [\"m\"]\n"),
                "defaults.max_tokens",
            ),
            (
                format!("[[models]]\nname = 7\n{backend}models = [\"m\"]\n"),
                "models[0].name",
            ),
        ] {
            let checked = Config::parse_checked(&text, "weir.toml", &env);
            let errors = checked.result.expect_err("a value has the wrong type");
            assert_eq!(errors.0.len(), 1, "{errors}");
            assert_eq!(errors.0[0].key, key, "{errors}");
            assert!(checked.warnings.is_empty(), "{text}: {:?}", checked.warnings);
        }
        // The same comparisons still warn when both values were taken.
        let checked = Config::parse_checked(
            &format!("[server]\nrequest_timeout = \"5s\"\nfirst_byte_timeout = \"20m\"\n{declared}tokens_per_minute = 200\n{backend}models = [\"m\"]\n"),
            "weir.toml",
            &env,
        );
        assert!(checked.result.is_ok());
        assert_eq!(checked.warnings.len(), 2, "{:?}", checked.warnings);
    }

    #[test]
    fn syntax_and_type_errors_have_locations() {
        let errs = errors("[server\nlisten = \n");
        assert!(errs.iter().all(|e| e.key == "(syntax)"));
        assert_eq!((errs[0].line, errs[0].column), (1, 8));
        // In file order, though the parser's recovery finds line 4 first.
        let errs = errors("[server]\nlisten = \"x\n[limits]\nrequests_per_minute = = 2\n");
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert!(lines.len() >= 2 && lines.is_sorted(), "{lines:?}");
        assert_eq!(lines.first(), Some(&2), "{lines:?}");
        let e = one_error(&format!("{MINIMAL}[server]\nmax_connections = \"many\"\n"));
        assert_eq!(e.key, "server.max_connections");
        assert_eq!(e.column, 19);
    }

    /// SPEC `weir check`: every error. Unknown keys and wrong types at every
    /// level are all reported, each at its own place, with the validation
    /// errors of the rest, and nothing else.
    #[test]
    fn every_unknown_key_and_wrong_type_is_reported() {
        let text = r#"bogus_top = 1

[server]
listn = "127.0.0.1:1"
max_connections = "many"

[[models]]
name = "m"
burts = 5

[[backends]]
name = "b"
url = "http://127.0.0.1:9001/v1"
models = ["m"]
weight = "heavy"

[health]
liveness = { intervl = "5s" }
slow_start = "soon"

[nonsense]
x = 1
"#;
        let errs = errors(text);
        let expect = [
            (1, 1, "bogus_top", "unknown field"),
            (4, 1, "server.listn", "unknown field"),
            (5, 19, "server.max_connections", "invalid type"),
            (9, 1, "models[0].burts", "unknown field"),
            (15, 10, "backends[0].weight", "invalid type"),
            (18, 14, "health.liveness.intervl", "unknown field"),
            // A validation error in what is left is reported in the same run.
            (19, 14, "health.slow_start", "not a duration"),
            (21, 2, "nonsense", "unknown field"),
        ];
        assert_exactly(&errs, &expect);
        assert!(errs
            .windows(2)
            .all(|w| (w[0].line, w[0].column) < (w[1].line, w[1].column)));
        // A mistyped required key is reported as such, not also as missing.
        let errs = errors(&MINIMAL.replace("name = \"b\"", "name = 7\nnmae = \"b\""));
        let all = ConfigErrors(errs.clone()).to_string();
        assert_eq!(errs.len(), 2, "{all}");
        assert!(!all.contains("missing field"), "{all}");
    }

    /// A file that is not UTF-8 is refused at the line and column of its
    /// first byte that is not.
    #[test]
    fn a_file_that_is_not_utf8_is_refused_where_the_byte_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latin1.toml");
        std::fs::write(&path, b"[[backends]]\nname = \"b\"\n# caf\xe9 \xc3\xa9\n").unwrap();
        let errs = Config::check(&path, &env).result.unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert_eq!(
            (errs[0].line, errs[0].column, errs[0].key.as_str()),
            (3, 6, "(file)")
        );
        assert!(
            errs[0].message.contains("byte 0xE9 is not UTF-8"),
            "{}",
            errs[0]
        );
    }

    /// An array's wrong items are named by their place in the file, also
    /// after an earlier item was taken out.
    #[test]
    fn wrong_items_of_one_array_keep_their_own_indices() {
        let text = "[[models]]\nname = \"m\"\n\n[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:9001/v1\"\nmodels = [1, 2, \"m\", 3]\n";
        let errs = errors(text);
        let expect = [
            (7, 11, "backends[0].models[0]", "invalid type"),
            (7, 14, "backends[0].models[1]", "invalid type"),
            (7, 22, "backends[0].models[3]", "invalid type"),
        ];
        assert_exactly(&errs, &expect);
        // What is checked after the wrong items are taken out is named in
        // the file's indices too, and none of it is lost.
        let text = "[[models]]\nname = \"m\"\n\n[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:9001/v1\"\nmodels = [1, \"\", \"m\", \"m\"]\n";
        let expect = [
            (7, 11, "backends[0].models[0]", "invalid type"),
            (7, 14, "backends[0].models[1]", "must not be empty"),
            (7, 23, "backends[0].models[3]", "listed twice"),
        ];
        assert_exactly(&errors(text), &expect);
        let text = "backends = [5, { name = \"b\", url = \"http://127.0.0.1:9001/v1\", models = [\"m\"], max_concurrent = 0 }]\n\n[[models]]\nname = \"m\"\n";
        let errs = errors(text);
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["backends[0]", "backends[1].max_concurrent"],
            "{}",
            ConfigErrors(errs.clone())
        );
    }

    /// Past the cap, the schema errors listed are the file's first ones,
    /// in file order, and a last line counts the rest.
    #[test]
    fn capped_schema_errors_are_the_first_in_the_file_and_the_rest_counted() {
        let keys: String = (0..150).map(|i| format!("k{i} = 1\n")).collect();
        let errs = errors(&format!("[server]\n{keys}{MINIMAL}"));
        assert_eq!(errs.len(), MAX_SCHEMA_ERRORS + 1);
        for (i, e) in errs.iter().take(MAX_SCHEMA_ERRORS).enumerate() {
            assert_eq!(
                (e.line, e.key.clone()),
                (i + 2, format!("server.k{i}")),
                "{e}"
            );
        }
        assert_eq!(
            errs[MAX_SCHEMA_ERRORS].to_string(),
            "weir.toml:102:1: (more): and 50 more unknown keys or wrong types from here on, not listed"
        );
    }

    /// `[[server]]` and the like are one table written as an array of
    /// tables, reported as `server = []` is.
    #[test]
    fn an_array_of_tables_where_a_table_belongs_is_named_as_such() {
        for (section, key) in [
            ("server", "listen = \"x\""),
            ("limits", "x = 1"),
            ("defaults", "x = 1"),
            ("health", "enabled = true"),
            ("outlier", "x = 1"),
            ("retry", "x = 1"),
            ("cluster", "x = 1"),
            ("health.deep", "x = 1"),
            ("backends.rename", "m = \"n\""),
        ] {
            let e = one_error(&format!("{MINIMAL}[[{section}]]\n{key}\n"));
            let shown = section.replace("backends.", "backends[0].");
            assert_eq!(
                e.to_string(),
                format!("weir.toml:9:1: {shown}: invalid type: array, expected a table")
            );
        }
    }

    /// A model declared twice reaches the weight check twice; the error is
    /// printed once.
    #[test]
    fn a_distinct_error_is_printed_once() {
        let text = "[[models]]\nname = \"m\"\n[[models]]\nname = \"m\"\n\
                    [[backends]]\nname = \"b\"\nurl = \"http://h/v1\"\nmodels = [\"m\"]\nweight = 0\n";
        assert_eq!(
            ConfigErrors(errors(text)).to_string(),
            "weir.toml:4:8: models[1].name: model \"m\" is declared twice\n\
             weir.toml:9:10: backends[0].weight: weight 0 everywhere: every backend serving model \"m\" has weight 0, so it can never be picked"
        );
    }

    /// An integer past i64 is refused with TOML's limit, whether serde read
    /// it as u64 or i128.
    #[test]
    fn an_integer_past_i64_names_the_limit() {
        for n in [
            "9223372036854775808",
            "18446744073709551615",
            "99999999999999999999",
        ] {
            let e = one_error(&format!("{MINIMAL}[server]\nmax_body_bytes = {n}\n"));
            assert_eq!(
                e.to_string(),
                format!("weir.toml:10:18: server.max_body_bytes: is too large (got {n}; a TOML integer is at most 9223372036854775807)")
            );
        }
    }

    /// A degraded_latency no shorter than the readiness timeout can never
    /// be seen: the probe times out first.
    #[test]
    fn a_degraded_latency_past_the_readiness_timeout_warns() {
        let warnings = |extra: &str| {
            let (result, warnings) =
                Config::validate(&format!("{MINIMAL}[health]\n{extra}"), "weir.toml", &env);
            assert!(result.is_ok(), "{extra}");
            warnings
        };
        assert_eq!(
            warnings("readiness.degraded_latency = \"10s\"\n"),
            ["weir.toml:10:30: health.readiness.degraded_latency: is not shorter than health.readiness.timeout, so a probe that slow times out first and is never reported as degraded"]
        );
        assert_eq!(
            warnings("readiness.timeout = \"2s\"\n"),
            ["weir.toml:10:21: health.readiness.timeout: is not longer than health.readiness.degraded_latency (5s, its default), so a probe that slow times out first and is never reported as degraded"]
        );
        assert!(
            warnings("readiness = { timeout = \"2s\", degraded_latency = \"1s\" }\n").is_empty()
        );
        // A refused value is not compared.
        assert!(Config::validate(
            &format!("{MINIMAL}[health]\nreadiness.timeout = \"0s\"\n"),
            "weir.toml",
            &env
        )
        .1
        .is_empty());
    }

    #[test]
    fn bad_duration_names_its_key_and_position() {
        let text = format!("{MINIMAL}[server]\nrequest_timeout = \"5 parsecs\"\n");
        let e = one_error(&text);
        assert_eq!(
            (e.line, e.column, e.key.as_str()),
            (10, 19, "server.request_timeout")
        );
        assert!(e.message.contains("not a duration"), "{e}");
        let e = one_error(&format!(
            "{MINIMAL}[health]\nliveness = {{ interval = \"0s\" }}\n"
        ));
        assert_eq!(
            (e.line, e.column, e.key.as_str()),
            (10, 25, "health.liveness.interval")
        );
        // A TOML date or time, unquoted, is named as one (the toml crate
        // hands serde a map for it).
        for written in ["1979-05-27T07:32:00Z", "07:32:00", "1979-05-27"] {
            let e = one_error(&format!("{MINIMAL}[server]\nrequest_timeout = {written}\n"));
            assert_eq!(e.key, "server.request_timeout");
            assert!(
                e.message.starts_with("invalid type: datetime, expected"),
                "{written}: {e}"
            );
        }
        let e = one_error(&format!(
            "{MINIMAL}[server]\nrequest_timeout = {{ a = 1 }}\n"
        ));
        assert!(e.message.starts_with("invalid type: map"), "{e}");
    }

    /// A duration under 1 ms (other than 0 where 0 is allowed) is refused:
    /// the timers tick in milliseconds, so "1ns" would act as 1 ms.
    #[test]
    fn a_duration_below_the_timers_resolution_is_refused() {
        for (section, key, value, says) in [
            ("health.readiness", "timeout", "1ns", "must be at least 1ms"),
            ("server", "request_timeout", "999us", "must be at least 1ms"),
            (
                "server",
                "shutdown_grace",
                "500us",
                "must be 0 or at least 1ms",
            ),
        ] {
            let e = one_error(&format!("{MINIMAL}[{section}]\n{key} = \"{value}\"\n"));
            assert_eq!(e.key, format!("{section}.{key}"));
            assert!(e.message.contains(says), "{e}");
        }
        for value in ["0s", "1ms", "1ms 500us"] {
            assert!(
                parse(&format!(
                    "{MINIMAL}[server]\nshutdown_grace = \"{value}\"\n"
                ))
                .is_ok(),
                "{value}"
            );
        }
    }

    #[test]
    fn every_error_is_reported_together() {
        let text = r#"[server]
listen = "nowhere"
log_format = "xml"
first_byte_timeout = "0s"
api_keys_env = "MISSING_KEYS"

[limits]
requests_per_minute = 0

[[models]]
name = "a"
burst = 0
max_concurrent = -1

[[models]]
name = "a"

[[models]]
name = "lonely"

[[backends]]
name = "x"
url = "ftp://host/v1"
api_key_env = "MISSING_UP"
models = ["a"]
rename = { "zzz" = "y" }
health_path = "health"
metrics_path = "metrics"

[[backends]]
name = "x"
url = "http://h/v1?x=1"
models = []

[outlier]
max_ejection_percent = 101

[retry]
base_delay = "3s"
max_delay = "1s"
budget_percent = 200

[cluster]
"#;
        let errs = Config::parse(text, "bad.toml", &no_env).unwrap_err().0;
        let all = ConfigErrors(errs.clone()).to_string();
        let expect = [
            (2, 10, "server.listen", "not a socket address"),
            (3, 14, "server.log_format", "not \"text\" or \"json\""),
            (4, 22, "server.first_byte_timeout", "longer than 0"),
            (5, 16, "server.api_keys_env", "MISSING_KEYS is not set"),
            (8, 23, "limits.requests_per_minute", "zero rate"),
            (12, 9, "models[0].burst", "zero rate"),
            (13, 18, "models[0].max_concurrent", "negative"),
            (16, 8, "models[1].name", "declared twice"),
            (19, 8, "models[2].name", "not served by any backend"),
            (23, 7, "backends[0].url", "not http or https"),
            (24, 15, "backends[0].api_key_env", "MISSING_UP is not set"),
            (
                26,
                12,
                "backends[0].rename.zzz",
                "not in backends[0].models",
            ),
            (27, 15, "backends[0].health_path", "must start with '/'"),
            (28, 16, "backends[0].metrics_path", "must start with '/'"),
            (31, 8, "backends[1].name", "used twice"),
            (32, 7, "backends[1].url", "query string"),
            (33, 10, "backends[1].models", "at least one model"),
            (36, 24, "outlier.max_ejection_percent", "at most 100"),
            (40, 13, "retry.max_delay", "shorter than retry.base_delay"),
            (41, 18, "retry.budget_percent", "at most 100"),
            (43, 1, "cluster.redis_url_env", "WEIR_REDIS_URL is not set"),
        ];
        assert_exactly(&errs, &expect);
        // Sorted by position, one per line in Display.
        assert_eq!(all.lines().count(), errs.len());
        assert!(all
            .lines()
            .next()
            .unwrap()
            .starts_with("bad.toml:2:10: server.listen: "));
    }

    /// Values that would overflow a clock or a semaphore at run time are
    /// refused here, with the limit in the message, instead of panicking a
    /// running gateway (`Instant + Duration` past 2^63 s).
    #[test]
    fn huge_durations_and_connection_caps_are_refused() {
        let with = |server: &str| format!("[server]\n{server}\n{MINIMAL}");
        for key in ["request_timeout", "header_read_timeout", "idle_timeout"] {
            let e = one_error(&with(&format!("{key} = \"300000000000y\"")));
            assert_eq!(e.key, format!("server.{key}"));
            assert!(e.message.contains("at most 365d"), "{}", e.message);
        }
        let e = one_error(&format!("{MINIMAL}\n[health]\nslow_start = \"366d\"\n"));
        assert_eq!(e.key, "health.slow_start");
        let ok = Config::parse(&with("request_timeout = \"365d\""), "ok.toml", &no_env);
        assert_eq!(ok.unwrap().server.request_timeout, MAX_DURATION);
        let e = one_error(&with("max_connections = 9_000_000_000_000_000_000"));
        assert_eq!(e.key, "server.max_connections");
        assert!(e.message.contains("too large"), "{}", e.message);
    }

    #[test]
    fn a_backend_key_that_cannot_be_a_header_is_an_error_never_printed() {
        let text = MINIMAL.replace(
            "models = [\"m\"]",
            "models = [\"m\"]\napi_key_env = \"KEY\"",
        );
        let multi_line = |n: &str| (n == "KEY").then(|| "sk-top\nsecret".to_owned());
        let errs = Config::parse(&text, "f", &multi_line).unwrap_err().0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].key, "backends[0].api_key_env");
        assert!(errs[0].message.contains("cannot go in an HTTP header"));
        assert!(!format!("{errs:?}").contains("secret"), "{errs:?}");
        let tab = |n: &str| (n == "KEY").then(|| "sk-top\tsecret".to_owned());
        assert!(Config::parse(&text, "f", &tab).is_err());
        let fine = |n: &str| (n == "KEY").then(|| " sk-top-secret \n".to_owned());
        assert!(Config::parse(&text, "f", &fine).is_ok());
    }

    #[test]
    fn client_keys_and_the_admin_token_that_cannot_be_a_header_are_errors_never_printed() {
        // Keys one per line, or a token file with a line break inside:
        // no request could ever match them, so every client (or every
        // admin call) would be refused.
        let text =
            format!("[server]\napi_keys_env = \"KEYS\"\nadmin_token_env = \"ADMIN\"\n{MINIMAL}");
        let broken = |n: &str| match n {
            "KEYS" => Some("key-one\nkey-secret-two".to_owned()),
            "ADMIN" => Some("adm\ntoken-secret".to_owned()),
            _ => None,
        };
        let errs = Config::parse(&text, "f", &broken).unwrap_err().0;
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["server.api_keys_env", "server.admin_token_env"],
            "{errs:?}"
        );
        assert!(errs
            .iter()
            .all(|e| e.message.contains("cannot go in an HTTP header")));
        assert!(!format!("{errs:?}").contains("secret"), "{errs:?}");
        let fine = |n: &str| match n {
            "KEYS" => Some(" key-one, key-two \n".to_owned()),
            "ADMIN" => Some("token\n".to_owned()),
            _ => None,
        };
        assert!(Config::parse(&text, "f", &fine).is_ok());
    }

    #[test]
    fn a_key_pasted_where_its_variables_name_goes_is_not_repeated() {
        let text = MINIMAL.replace(
            "models = [\"m\"]",
            "models = [\"m\"]\napi_key_env = \"sk-proj-abc123-secret\"",
        );
        let e = one_error(&text);
        assert_eq!(e.key, "backends[0].api_key_env");
        assert!(e.message.contains("pasted"), "{}", e.message);
        assert!(!e.message.contains("secret"), "{}", e.message);
    }

    #[test]
    fn missing_env_var_is_an_error_and_its_value_is_never_printed() {
        let text = MINIMAL.replace(
            "models = [\"m\"]",
            "models = [\"m\"]\napi_key_env = \"NOPE\"",
        );
        let e = one_error(&text);
        assert_eq!(e.key, "backends[0].api_key_env");
        assert_eq!(e.message, "environment variable NOPE is not set");
        let e = one_error(&MINIMAL.replace(
            "models = [\"m\"]",
            "models = [\"m\"]\napi_key_env = \"EMPTY\"",
        ));
        assert!(e.message.contains("set but empty"));
        // A variable holding only separators gives no keys: refused rather than locking
        // every client out.
        let only_commas = |n: &str| (n == "K").then(|| " , ,".to_owned());
        let errs = Config::parse(
            &format!("[server]\napi_keys_env = \"K\"\n{MINIMAL}"),
            "f",
            &only_commas,
        )
        .unwrap_err();
        assert!(errs.0[0].message.contains("holds no keys"), "{errs}");
        // A Redis URL that is not redis:// is refused without echoing it.
        let bad_redis = |n: &str| (n == "WEIR_REDIS_URL").then(|| format!("http://{SENTINEL}"));
        let errs = Config::parse(&format!("{MINIMAL}[cluster]\n"), "f", &bad_redis).unwrap_err();
        assert!(errs.to_string().contains("does not hold a valid redis://"));
        assert!(!errs.to_string().contains("SENTINEL"));
        // A URL that passes the scheme check but does not parse is refused
        // too, again unechoed.
        for url in [
            format!("redis://:{SENTINEL}@[bad:6379/0"),
            format!("rediss://:{SENTINEL}@[bad:6379/0"),
            format!("rediss://:{SENTINEL}@redis:6379/0#insecure"),
        ] {
            let env = |n: &str| (n == "WEIR_REDIS_URL").then(|| url.clone());
            let errs = Config::parse(&format!("{MINIMAL}[cluster]\n"), "f", &env).unwrap_err();
            assert_eq!(errs.0.len(), 1, "{errs}");
            assert_eq!(errs.0[0].key, "cluster.redis_url_env");
            assert!(!errs.to_string().contains(SENTINEL), "{errs}");
        }
        // A negative database index parses but Redis refuses every
        // connection with it: refused at its line, unechoed. An index past
        // the server's count may be valid there and passes.
        let negative_db = |n: &str| {
            (n == "WEIR_REDIS_URL").then(|| format!("redis://:{SENTINEL}@127.0.0.1:6379/-1"))
        };
        let text = format!("{MINIMAL}[cluster]\n");
        let errs = Config::parse(&text, "f", &negative_db).unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!(errs.0[0].key, "cluster.redis_url_env");
        assert!(
            errs.0[0].message.contains("negative database index"),
            "{errs}"
        );
        assert!(
            errs.to_string().starts_with("f:"),
            "FILE:LINE:COLUMN: {errs}"
        );
        assert!(!errs.to_string().contains(SENTINEL), "{errs}");
        // Port 0 is never connected to, as for a backend URL.
        for url in ["redis://127.0.0.1:0/0", "rediss://redis:0"] {
            let env = |n: &str| (n == "WEIR_REDIS_URL").then(|| url.to_owned());
            let errs = Config::parse(&text, "f", &env).unwrap_err();
            assert_eq!(errs.0.len(), 1, "{errs}");
            assert!(errs.0[0].message.contains("port 0"), "{errs}");
        }
        let db_99 =
            |n: &str| (n == "WEIR_REDIS_URL").then(|| format!("redis://:{SENTINEL}@127.0.0.1/99"));
        assert!(Config::parse(&text, "f", &db_99).is_ok());
    }

    #[test]
    fn undeclared_model_warns_and_gets_defaults() {
        let text = MINIMAL.replace("models = [\"m\"]", "models = [\"m\", \"x\"]")
            + "[defaults]\nmax_queue = 7\n";
        let c = parse(&text).unwrap();
        assert_eq!(c.models.len(), 2);
        let x = c.model("x").unwrap();
        assert!(!x.declared);
        assert_eq!(x.max_queue, 7);
        assert_eq!(x.queue_timeout, defaults::QUEUE_TIMEOUT);
        assert_eq!(
            (x.requests_per_minute, x.tokens_per_minute, x.max_concurrent),
            (None, None, None)
        );
        assert_eq!(
            c.warnings,
            ["weir.toml:8:16: backends[0].models: model \"x\" is not declared in [[models]]; it gets [defaults] limits"]
        );
        // Named by two backends: one entry, one warning per mention.
        let text =
            format!("{text}\n[[backends]]\nname = \"c\"\nurl = \"http://h\"\nmodels = [\"x\"]\n");
        let c = parse(&text).unwrap();
        assert_eq!(c.models.iter().filter(|m| m.name == "x").count(), 1);
    }

    #[test]
    fn weight_zero_everywhere_is_an_error() {
        let text = MINIMAL.replace("models = [\"m\"]", "models = [\"m\"]\nweight = 0");
        let e = one_error(&text);
        assert_eq!(
            (e.line, e.column, e.key.as_str()),
            (9, 10, "backends[0].weight")
        );
        assert!(e.message.contains("weight 0 everywhere"), "{e}");
        // One other backend with weight keeps the model reachable.
        let ok = format!("{text}\n[[backends]]\nname = \"c\"\nurl = \"http://h\"\nmodels = [\"m\"]\nweight = 1\n");
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn structural_errors() {
        let e = one_error("");
        assert_eq!((e.line, e.column, e.key.as_str()), (1, 1, "backends"));
        let errs = errors("[[backends]]\nweight = 1\n");
        for key in ["backends[0].name", "backends[0].url", "backends[0].models"] {
            assert!(
                has(&errs, 1, 1, key, "is missing"),
                "{key}: {}",
                ConfigErrors(errs.clone())
            );
        }
        for (url, needle) in [
            ("127.0.0.1:9001", "http:// or https://"),
            ("/v1", "http:// or https://"),
            ("http://u:p@h/v1", "credentials"),
            ("http://h/v1#frag", "fragment"),
            ("http://", "not a usable"),
        ] {
            let e = one_error(&MINIMAL.replace("http://127.0.0.1:9001/v1", url));
            assert_eq!(e.key, "backends[0].url");
            assert!(e.message.contains(needle), "{url}: {e}");
        }
        let e = one_error(&MINIMAL.replace("models = [\"m\"]", "models = [\"m\", \"m\"]"));
        assert_eq!(e.key, "backends[0].models[1]");
        let e = one_error(&format!(
            "[server]\nlisten = \"0.0.0.0:1\"\nadmin_listen = \"0.0.0.0:1\"\n{MINIMAL}"
        ));
        assert_eq!(e.key, "server.admin_listen");
        assert!(parse(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{MINIMAL}"
        ))
        .is_ok());
        // A wildcard on the same port overlaps too; another family's
        // specific address, or another port, does not.
        for (listen, admin, clash) in [
            ("127.0.0.1:7", "0.0.0.0:7", true),
            ("0.0.0.0:7", "127.0.0.1:7", true),
            ("127.0.0.1:7", "[::]:7", true),
            ("[::1]:7", "0.0.0.0:7", false),
            ("127.0.0.1:7", "127.0.0.2:7", false),
            ("127.0.0.1:7", "0.0.0.0:8", false),
        ] {
            let text =
                format!("[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n{MINIMAL}");
            match parse(&text) {
                Ok(_) => assert!(!clash, "{listen} {admin}"),
                Err(e) => {
                    assert!(clash, "{listen} {admin}: {e}");
                    assert_eq!(e.0[0].key, "server.admin_listen");
                }
            }
        }
        // A refused listen is not compared with (its default, 0.0.0.0:8080).
        for listen in ["9000", "\"127.0.0.1:99999\""] {
            let e = one_error(&format!(
                "[server]\nlisten = {listen}\nadmin_listen = \"127.0.0.1:8080\"\n{MINIMAL}"
            ));
            assert_eq!(e.key, "server.listen", "{e}");
        }
        let e = one_error(&format!("[server]\nmax_connections = 0\n{MINIMAL}"));
        assert_eq!(e.key, "server.max_connections");
        let e = one_error(&format!("{MINIMAL}[health]\ndeep = {{ samples = 0 }}\n"));
        assert_eq!(e.key, "health.deep.samples");
        let e = one_error(&format!(
            "{MINIMAL}[limits]\nrequests_per_minute = 99_999_999_999\n"
        ));
        assert_eq!(e.key, "limits.requests_per_minute");
        assert!(e.message.contains("too large"), "{e}");
    }

    #[test]
    fn line_col_is_character_based_and_total() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é=1", 2), (1, 2));
        assert_eq!(line_col("é=1", 1), (1, 2), "inside a character");
        assert_eq!(line_col("ab", 99), (1, 3), "past the end");
    }

    /// Property tests (issue #9): whatever text a config file holds,
    /// `Config::parse` answers `Ok` or errors, and both render, never
    /// panicking; no secret value reaches an error message.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Values that have broken config loaders: out-of-range numbers,
        /// odd durations, wrong types, hostile strings.
        const HOSTILE_VALUES: &[&str] = &[
            "-1",
            "0",
            "1",
            "4294967296",
            "18446744073709551616",
            "-9223372036854775809",
            "1e999",
            "nan",
            "inf",
            "-inf",
            "0.5",
            "true",
            "[]",
            "{}",
            "[[]]",
            "\"\"",
            "\" \"",
            "\"0s\"",
            "\"-5s\"",
            "\"1000000000000000h\"",
            "\"18446744073709551615s\"",
            "\"5 parsecs\"",
            "\"\\u0000\"",
            "\"💥\"",
            "\"http://[::1\"",
            "\"ftp://x/v1\"",
            "\"http://\"",
            "\"127.0.0.1:99999\"",
            "\"[::]:0\"",
            "\"UNSET_ENV_VAR\"",
            "\"UP_KEY\"",
            "\"EMPTY\"",
            "{ interval = \"0s\", timeout = \"1s\" }",
            "{ interval = \"1s\" }",
            "{ \"m\" = \"\" }",
            "[\"m\", \"m\"]",
            "[\"nope\"]",
        ];

        /// `(section, key)` pairs of the schema, plus a few that are not.
        const KEYS: &[(&str, &str)] = &[
            ("server", "listen"),
            ("server", "admin_listen"),
            ("server", "max_body_bytes"),
            ("server", "max_buffered_body_bytes"),
            ("server", "request_timeout"),
            ("server", "first_byte_timeout"),
            ("server", "shutdown_grace"),
            ("server", "log_format"),
            ("server", "api_keys_env"),
            ("server", "admin_token_env"),
            ("server", "max_connections"),
            ("server", "header_read_timeout"),
            ("server", "idle_timeout"),
            ("server", "watch_config"),
            ("limits", "requests_per_minute"),
            ("limits", "tokens_per_minute"),
            ("defaults", "queue_timeout"),
            ("defaults", "max_queue"),
            ("defaults", "max_tokens"),
            ("models", "name"),
            ("models", "requests_per_minute"),
            ("models", "tokens_per_minute"),
            ("models", "burst"),
            ("models", "max_concurrent"),
            ("models", "queue_timeout"),
            ("backends", "name"),
            ("backends", "url"),
            ("backends", "api_key_env"),
            ("backends", "models"),
            ("backends", "rename"),
            ("backends", "weight"),
            ("backends", "max_concurrent"),
            ("backends", "health_path"),
            ("backends", "metrics_path"),
            ("backends", "connect_timeout"),
            ("health", "enabled"),
            ("health", "unhealthy_threshold"),
            ("health", "healthy_threshold"),
            ("health", "slow_start"),
            ("health", "liveness"),
            ("health", "readiness"),
            ("health", "deep"),
            ("outlier", "consecutive_failures"),
            ("outlier", "ejection_time"),
            ("outlier", "max_ejection_percent"),
            ("retry", "max_attempts"),
            ("retry", "base_delay"),
            ("retry", "max_delay"),
            ("retry", "budget_percent"),
            ("cluster", "redis_url_env"),
            ("cluster", "key_prefix"),
            ("server", "no_such_key"),
            ("nosuch", "section"),
        ];

        /// Parses and renders whatever comes back; the assertions are that
        /// nothing panics and no secret leaks into an error.
        fn check(text: &str) -> Result<(), TestCaseError> {
            match Config::parse(text, "fuzz.toml", &env) {
                Ok(config) => {
                    let rendered = config.render();
                    prop_assert!(!rendered.contains(SENTINEL), "{rendered}");
                }
                Err(errors) => {
                    let shown = errors.to_string();
                    prop_assert!(!shown.is_empty());
                    prop_assert!(!shown.contains(SENTINEL), "{shown}");
                }
            }
            Ok(())
        }

        /// A valid file with every section, to mutate.
        fn full() -> String {
            format!(
                "{MINIMAL}\n[server]\nlisten = \"127.0.0.1:1\"\napi_keys_env = \"WEIR_API_KEYS\"\n\
                 [limits]\nrequests_per_minute = 10\n[defaults]\nmax_tokens = 5\n\
                 [health]\nliveness = {{ interval = \"1s\", timeout = \"1s\" }}\n\
                 [outlier]\nconsecutive_failures = 2\n[retry]\nmax_attempts = 2\n"
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_text_never_panics(text in any::<String>()) {
                check(&text)?;
            }

            #[test]
            fn toml_shaped_text_never_panics(text in r#"(\[{1,2}[a-z]{0,8}\]{1,2}\n|[a-z_]{1,12} ?= ?("[^"\n]{0,12}"|-?[0-9]{1,22}|\{ ?[a-z]+ ?= ?"[0-9]+m?s" ?\}|\[("[a-z]{0,3}",?){0,3}\])\n|#.{0,5}\n){0,12}"#) {
                check(&text)?;
            }

            #[test]
            fn hostile_values_in_every_key_never_panic(
                picks in prop::collection::vec((prop::sample::select(KEYS), prop::sample::select(HOSTILE_VALUES)), 1..6),
            ) {
                let mut text = full();
                for ((section, key), value) in picks {
                    let header = if matches!(section, "models" | "backends") {
                        format!("[[{section}]]")
                    } else {
                        format!("[{section}]")
                    };
                    text.push_str(&format!("\n{header}\n{key} = {value}\n"));
                }
                check(&text)?;
            }

            #[test]
            fn mutated_valid_files_never_panic(
                edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
            ) {
                let mut bytes = full().into_bytes();
                for (at, byte, op) in edits {
                    let i = at.index(bytes.len().max(1));
                    match op {
                        0 if i < bytes.len() => bytes[i] = byte,
                        1 => bytes.insert(i.min(bytes.len()), byte),
                        _ if i < bytes.len() => { bytes.remove(i); }
                        _ => {}
                    }
                }
                check(&String::from_utf8_lossy(&bytes))?;
            }
        }

        #[test]
        fn the_mutated_file_starts_valid() {
            assert!(Config::parse(&full(), "fuzz.toml", &env).is_ok());
        }
    }
}
