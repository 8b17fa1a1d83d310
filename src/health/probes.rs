//! One active probe of each tier (SPEC "Health tiers"), each returning a
//! typed result: liveness (`GET health_path`), readiness (a one-token chat
//! completion) and deep (streamed sample completions for time to first token
//! and tokens/s, plus the engine's Prometheus metrics).
//!
//! A probe goes through the backend's own pooled client (`upstream`), so it
//! sees what traffic sees: the same `connect_timeout`, TLS setup and
//! keep-alive connections. Each probe is bounded as a whole, body included,
//! by its tier's `timeout`: a backend that sends headers and then stalls
//! fails the probe rather than holding it.
//!
//! It deliberately does not judge: thresholds, rise/fall counts, "slower than
//! `degraded_latency`", the throughput factor against the pool's median and
//! what saturation means for the weight all belong to the checker, which
//! compares these results over time and across backends.
//!
//! Throughput follows vLLM's `benchmarks/benchmark_serving.py`: time per
//! output token is (last chunk - first chunk) / (tokens - 1), so the first
//! token, which pays for the prefill, counts toward time to first token only.

use std::{sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use tokio::time::Instant;

use super::engine::{self, EngineLoad};
use crate::{
    config::{BackendConfig, Secret},
    snapshot::BackendState,
    upstream::{self, retry_after::retry_after_given, AttemptError, UpstreamBody},
};

/// The result of one liveness or readiness probe.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeOutcome {
    /// The backend answered as the tier requires.
    Pass {
        /// From sending the request to the end of the response body.
        latency: Duration,
    },
    /// It did not; `error` says why, for `/admin/backends` `last_error`.
    Fail {
        /// Time spent until the failure was known (about `timeout` on a hang).
        latency: Duration,
        /// What went wrong: a status, a connect error, a timeout, a bad body.
        error: String,
    },
    /// The backend answered 429: it can answer but is busy. Neither a pass
    /// nor a failure; the checker keeps it out of rotation, and its probes
    /// off it, for `retry_after`.
    RateLimited {
        /// Time until the 429's head and body were read.
        latency: Duration,
        /// Its `Retry-After` (the proxy's reading: seconds or an HTTP-date,
        /// at most an hour, 1 s without one).
        retry_after: Duration,
        /// What `/admin/backends` `last_error` shows for it.
        error: String,
    },
}

/// One streamed sample completion of the deep tier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeepSample {
    /// From sending the request to the first chunk with content.
    pub ttft: Duration,
    /// Decode speed of this sample, in completion tokens per second.
    pub tokens_per_sec: f64,
}

/// The result of one deep probe round.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeepResult {
    /// The samples that completed, in the order they ran.
    pub samples: Vec<DeepSample>,
    /// Samples that failed, or could not run before the deep `timeout`.
    pub failures: u32,
    /// The engine's load, when `metrics_path` is set and was read.
    pub engine: Option<EngineLoad>,
    /// Median of the samples' tokens/s; `None` without samples.
    pub median_tokens_per_sec: Option<f64>,
    /// Median of the samples' time to first token; `None` without samples.
    pub median_ttft: Option<Duration>,
    /// Why the last failed sample failed.
    pub last_error: Option<String>,
    /// A sample was answered 429 with this `Retry-After`: the round stopped
    /// there (that sample is not a failure; `last_error` says so unless an
    /// earlier sample failed).
    pub rate_limited: Option<Duration>,
    /// Why `metrics_path` could not be read (the samples may still be fine).
    pub metrics_error: Option<String>,
    /// The backend serves embeddings: no sample was sent, and none is
    /// missed (the round passes on the engine's metrics alone).
    pub embeddings_only: bool,
}

/// Liveness and `/models` answers beyond this are not read further.
const SMALL_BODY_LIMIT: usize = 1 << 20;

/// Engine metrics beyond this are not read: vLLM's text with all its
/// histograms is a few hundred KiB per model.
const METRICS_BODY_LIMIT: usize = 16 << 20;

/// An SSE line longer than this fails the sample; completion chunks of a
/// short probe are well under 1 KiB.
const SSE_LINE_LIMIT: usize = 1 << 20;

/// Characters of an error body quoted in a failure message.
const ERROR_SNIPPET_CHARS: usize = 200;

/// The readiness prompt: any answer will do, one token is asked for.
const READINESS_PROMPT: &str = "ping";

/// The deep-tier prompt: one the model is unlikely to answer in fewer
/// tokens than `max_tokens`, so every sample decodes the same length.
const DEEP_PROMPT: &str = "Count from 1 to 500, separated by spaces.";

/// Shortest span a tokens/s figure divides by: an unpaced stream can deliver
/// every chunk in one read, and a zero span must not make it infinitely fast.
/// A decode span shorter than this is not measured at all (see
/// [`Tally::sample`]).
const MIN_SPAN: Duration = Duration::from_millis(1);

/// Longest deep round when `timeout` is too large for the clock to add.
const MAX_DEEP_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The pause a busy backend asks for: a 429 that says when to come back
/// (`Retry-After`). A 429 without one is judged as any other refusal, and
/// so is one whose Retry-After asks for no pause (`0`, a date already
/// past): neutral, it would leave a backend that answers every request so
/// in rotation at full weight for good.
fn busy(status: StatusCode, response: &http::Response<UpstreamBody>) -> Option<Duration> {
    (status == StatusCode::TOO_MANY_REQUESTS)
        .then(|| retry_after_given(response))
        .flatten()
        .filter(|wait| !wait.is_zero())
}

/// Why a probe failed; its `Display` is the `error` a failure carries.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    /// The whole probe, body included, did not finish within the tier's timeout.
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    /// Connect, first-byte timeout or protocol failure, as `upstream` reports it.
    #[error(transparent)]
    Attempt(#[from] AttemptError),
    /// A 429 with its `Retry-After`: the backend is busy, not failing.
    /// (One without says no more than that it refuses: a key whose quota
    /// ran out answers so for good, so that is a failing [`Self::Status`].)
    #[error("status 429: rate limited; not probed for {0:?} (its Retry-After)")]
    RateLimited(Duration),
    /// A non-2xx answer, with the start of its body (control characters
    /// escaped, see [`printable`]).
    #[error("status {status}: {body}")]
    Status { status: StatusCode, body: String },
    /// The body broke off or was larger than the probe reads.
    #[error("reading the body: {0}")]
    Body(String),
    /// A readiness answer that is not JSON.
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    /// A 2xx readiness answer that is JSON but no answer: an `error`
    /// object (wrappers that say "model not loaded" with a 200), or no
    /// `choices` (chat) or `data` (embeddings) list.
    #[error("the 200 is not {0}")]
    NotAnAnswer(&'static str),
    /// The probe URL could not be built (validated config makes this unlikely).
    #[error("building the probe url: {0}")]
    Uri(#[from] http::Error),
    /// The backend lists no model to probe (validation forbids it).
    #[error("the backend serves no model")]
    NoModel,
    /// A stream that ended without one chunk of content.
    #[error("the stream ended without content")]
    NoContent,
    /// A stream line beyond [`SSE_LINE_LIMIT`].
    #[error("a stream line is longer than {0} bytes")]
    LineTooLong(usize),
}

impl ProbeOutcome {
    /// Whether the probe passed.
    pub fn is_pass(&self) -> bool {
        matches!(self, ProbeOutcome::Pass { .. })
    }

    /// The latency of a pass or the time to a failure or a 429.
    pub fn latency(&self) -> Duration {
        match self {
            ProbeOutcome::Pass { latency }
            | ProbeOutcome::Fail { latency, .. }
            | ProbeOutcome::RateLimited { latency, .. } => *latency,
        }
    }
}

/// Liveness: `GET health_path` against the URL's origin, or `GET {url}/models`
/// when `health_path` is `""`; any 2xx passes. Only the `/models` form sends
/// the backend's key: hosted APIs refuse it without one, while an engine's
/// health endpoint needs none and should not be handed the key.
pub async fn liveness(backend: &BackendState, timeout: Duration) -> ProbeOutcome {
    let start = Instant::now();
    let result = tokio::time::timeout(timeout, check_liveness(backend, timeout)).await;
    outcome(start, timeout, result)
}

/// Readiness: a one-token, non-streamed chat completion on the backend's
/// first model (under its upstream name), with its key. A 2xx with a JSON
/// body passes, a 429 is [`ProbeOutcome::RateLimited`] (so is one to
/// liveness or a deep sample); judging the latency against
/// `degraded_latency` is the caller's.
pub async fn readiness(backend: &BackendState, timeout: Duration) -> ProbeOutcome {
    let start = Instant::now();
    let result = tokio::time::timeout(timeout, check_readiness(backend, timeout)).await;
    outcome(start, timeout, result)
}

/// Deep: `samples` streamed completions of `max_tokens`, one after another,
/// for time to first token and tokens/s, and, when `metrics_path` is set,
/// the engine's load. The metrics are read alongside the samples, so a slow
/// metrics endpoint does not eat the samples' time or the reverse; one
/// probe request in flight barely moves the figures read. Everything ends by
/// `timeout`: samples that could not finish by then count as failures.
pub async fn deep(
    backend: &BackendState,
    timeout: Duration,
    samples: u32,
    max_tokens: u32,
) -> DeepResult {
    let start = Instant::now();
    let deadline = start
        .checked_add(timeout)
        .unwrap_or(start + MAX_DEEP_TIMEOUT);
    // An embedding model streams no tokens to time: only its engine's
    // load is read (no samples, none failed; no throughput factor).
    let embeddings_only = backend.live.probe_embeddings.load(Ordering::Relaxed);
    let samples = if embeddings_only { 0 } else { samples };
    let (mut result, metrics) = tokio::join!(
        run_samples(backend, deadline, timeout, samples, max_tokens),
        read_engine(backend, deadline, timeout),
    );
    result.embeddings_only = embeddings_only;
    match metrics {
        Ok(load) => result.engine = load,
        Err(e) => result.metrics_error = Some(e.to_string()),
    }
    result
}

/// A probe's result as an outcome, the latency taken now.
fn outcome(
    start: Instant,
    timeout: Duration,
    result: Result<Result<(), ProbeError>, tokio::time::error::Elapsed>,
) -> ProbeOutcome {
    let latency = start.elapsed();
    match result.unwrap_or(Err(ProbeError::Timeout(timeout))) {
        Ok(()) => ProbeOutcome::Pass { latency },
        Err(e @ ProbeError::RateLimited(retry_after)) => ProbeOutcome::RateLimited {
            latency,
            retry_after,
            error: e.to_string(),
        },
        Err(e) => ProbeOutcome::Fail {
            latency,
            error: e.to_string(),
        },
    }
}

async fn check_liveness(backend: &BackendState, timeout: Duration) -> Result<(), ProbeError> {
    let config = &backend.config;
    let (uri, authorization) = if config.health_path.is_empty() {
        (
            upstream::upstream_uri(&config.url, "/models", None)?,
            backend.authorization.as_ref(),
        )
    } else {
        (origin_uri(&config.url, &config.health_path)?, None)
    };
    let request = request(Method::GET, uri, authorization, None)?;
    // Its content does not matter to liveness, only that it arrives in
    // time (a body that cannot be read passes).
    small_answer(backend, request, timeout).await.map(drop)
}

/// Sends a probe whose answer is small and read whole (so the pooled
/// connection can be reused): a 429 with a Retry-After is
/// [`ProbeError::RateLimited`], any other non-2xx a [`status_error`]; a
/// 2xx gives its body, or why it could not be read.
async fn small_answer(
    backend: &BackendState,
    request: Request<Bytes>,
    timeout: Duration,
) -> Result<Result<Bytes, ProbeError>, ProbeError> {
    let response = upstream::send(&backend.client, request, timeout).await?;
    let status = response.status();
    let rate_limited = busy(status, &response);
    let body = read_body(response.into_body(), SMALL_BODY_LIMIT).await;
    if let Some(wait) = rate_limited {
        return Err(ProbeError::RateLimited(wait));
    }
    if !status.is_success() {
        return Err(status_error(
            status,
            body.ok().as_deref(),
            backend.config.api_key.as_ref(),
        ));
    }
    Ok(body)
}

/// What a readiness answer must be to pass: a chat completion (its
/// `choices`) or an embedding list (its `data`), without an `error`.
#[derive(Clone, Copy)]
enum Answer {
    Chat,
    Embeddings,
}

/// The parts of a readiness answer read: the rest is skipped.
#[derive(serde::Deserialize)]
struct AnswerJson {
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
    #[serde(default)]
    data: Option<Vec<serde::de::IgnoredAny>>,
}

/// Passes a body that is the answer `kind` asks for: an object with its
/// list (`choices` or `data`) and no non-null `error`. A 200 holding an
/// error ("model not loaded" from a wrapper in front of the engine) is no
/// answer the model gave.
fn is_answer(body: &[u8], kind: Answer) -> Result<(), ProbeError> {
    let answer = serde_json::from_slice::<AnswerJson>(body).map_err(|e| match e.classify() {
        // Valid JSON of another shape (an array, a string) is no answer
        // either; only bytes that are not JSON at all are `NotJson`.
        serde_json::error::Category::Data => ProbeError::NotAnAnswer(kind.name()),
        _ => ProbeError::NotJson(e.to_string()),
    })?;
    let list = match kind {
        Answer::Chat => answer.choices,
        Answer::Embeddings => answer.data,
    };
    if answer.error.is_some() || list.is_none() {
        return Err(ProbeError::NotAnAnswer(kind.name()));
    }
    Ok(())
}

impl Answer {
    fn name(self) -> &'static str {
        match self {
            Answer::Chat => "a chat completion (an `error`, or no `choices`)",
            Answer::Embeddings => "an embedding list (an `error`, or no `data`)",
        }
    }
}

async fn check_readiness(backend: &BackendState, timeout: Duration) -> Result<(), ProbeError> {
    let config = &backend.config;
    let model = probe_model(config).ok_or(ProbeError::NoModel)?;
    // A backend whose last round passed on an embedding gets the
    // embedding first; chat again only when that fails, so the fallback is
    // no standing verdict (a reload that puts a chat model first, an
    // engine that starts serving chat) and costs no request per round.
    let embeddings = &backend.live.probe_embeddings;
    let mut embedding_failed = None;
    if embeddings.load(Ordering::Relaxed) {
        match check_embedding(backend, model, timeout).await {
            Ok(()) => return Ok(()),
            Err(e) => embedding_failed = Some(e),
        }
    }
    let body = |limit_field: &str| {
        serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": READINESS_PROMPT}],
            limit_field: 1,
            "stream": false,
        })
    };
    let response = match send_chat(backend, body, timeout).await {
        Ok((_, response)) => response,
        // An embedding model refuses chat (OpenAI 404 "not a chat model",
        // vLLM `--task embed` 400/404, TEI without the route): one
        // embedding tells whether it can answer what it serves.
        Err(chat @ ProbeError::Status { status, .. }) if refuses_chat(status) => {
            // Chat is refused still: the embedding's own failure says why.
            if let Some(e) = embedding_failed {
                return Err(e);
            }
            if check_embedding(backend, model, timeout).await.is_err() {
                return Err(chat);
            }
            if !embeddings.swap(true, Ordering::Relaxed) {
                tracing::info!(backend = %config.name, model, "backend refuses chat and answers embeddings; its readiness passes on an embedding");
            }
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    is_answer(
        &read_body(response.into_body(), SMALL_BODY_LIMIT).await?,
        Answer::Chat,
    )?;
    embeddings.store(false, Ordering::Relaxed);
    Ok(())
}

/// Whether a chat probe's status may mean "this model does not chat":
/// the answers engines give a route or model they do not serve so.
fn refuses_chat(status: StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 404 | 405 | 422 | 501)
}

/// Readiness for an embedding model: `POST {url}/embeddings` with a
/// one-word input, answered 2xx with JSON.
async fn check_embedding(
    backend: &BackendState,
    model: &str,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let body = serde_json::json!({ "model": model, "input": READINESS_PROMPT });
    let uri = upstream::upstream_uri(&backend.config.url, "/embeddings", None)?;
    let request = request(
        Method::POST,
        uri,
        backend.authorization.as_ref(),
        Some(Bytes::from(body.to_string())),
    )?;
    is_answer(
        &small_answer(backend, request, timeout).await??,
        Answer::Embeddings,
    )
}

/// Runs the samples one after another until done or `deadline`.
async fn run_samples(
    backend: &BackendState,
    deadline: Instant,
    timeout: Duration,
    samples: u32,
    max_tokens: u32,
) -> DeepResult {
    let mut result = DeepResult::default();
    for i in 0..samples {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout_at(deadline, sample(backend, max_tokens, remaining)).await {
            Ok(Ok(s)) => result.samples.push(s),
            Ok(Err(ProbeError::RateLimited(wait))) => {
                // The backend asked for a pause: the rest of the round
                // would only add to its 429s.
                result.rate_limited = Some(wait);
                result
                    .last_error
                    .get_or_insert_with(|| ProbeError::RateLimited(wait).to_string());
                break;
            }
            Ok(Err(e)) => {
                result.failures += 1;
                result.last_error = Some(e.to_string());
            }
            Err(_) => {
                // This sample and those that never ran: the round could not
                // measure them within its timeout.
                result.failures += samples - i;
                result.last_error = Some(ProbeError::Timeout(timeout).to_string());
                break;
            }
        }
    }
    let mut rates: Vec<f64> = result.samples.iter().map(|s| s.tokens_per_sec).collect();
    let mut ttfts: Vec<Duration> = result.samples.iter().map(|s| s.ttft).collect();
    result.median_tokens_per_sec = median_f64(&mut rates);
    result.median_ttft = median_duration(&mut ttfts);
    result
}

/// One streamed completion, timed from sending the request.
async fn sample(
    backend: &BackendState,
    max_tokens: u32,
    first_byte_timeout: Duration,
) -> Result<DeepSample, ProbeError> {
    let config = &backend.config;
    let model = probe_model(config).ok_or(ProbeError::NoModel)?;
    let body = |limit_field: &str| {
        serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": DEEP_PROMPT}],
            limit_field: max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
    };
    let (start, response) = send_chat(backend, body, first_byte_timeout).await?;
    let mut body = response.into_body();
    let mut tally = Tally::default();
    let mut pending: Vec<u8> = Vec::new();
    while !tally.done {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|e| ProbeError::Body(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let now = Instant::now();
        // Only the new bytes are searched (what was held has no newline),
        // and the finished lines leave in one drain: a backend dripping a
        // long line a byte at a time costs linear time, not quadratic.
        let mut from = pending.len();
        pending.extend_from_slice(&data);
        let mut line_start = 0;
        while let Some(i) = memchr::memchr(b'\n', pending.get(from..).unwrap_or_default()) {
            let end = from + i;
            tally.line(pending.get(line_start..=end).unwrap_or_default(), now);
            line_start = end + 1;
            from = line_start;
        }
        pending.drain(..line_start);
        if pending.len() > SSE_LINE_LIMIT {
            return Err(ProbeError::LineTooLong(SSE_LINE_LIMIT));
        }
    }
    // A last event without its final newline still counts.
    tally.line(&pending, Instant::now());
    tally.sample(start)
}

/// Reads and parses `metrics_path`; `Ok(None)` when it is not set.
async fn read_engine(
    backend: &BackendState,
    deadline: Instant,
    timeout: Duration,
) -> Result<Option<EngineLoad>, ProbeError> {
    let config = &backend.config;
    let Some(path) = &config.metrics_path else {
        return Ok(None);
    };
    let read = async {
        let uri = origin_uri(&config.url, path)?;
        let request = request(Method::GET, uri, None, None)?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let response = upstream::send(&backend.client, request, remaining).await?;
        let status = response.status();
        let body = read_body(response.into_body(), METRICS_BODY_LIMIT).await;
        if !status.is_success() {
            return Err(status_error(
                status,
                body.ok().as_deref(),
                config.api_key.as_ref(),
            ));
        }
        let body = body?;
        Ok(Some(engine::parse(&String::from_utf8_lossy(&body))))
    };
    tokio::time::timeout_at(deadline, read)
        .await
        .unwrap_or(Err(ProbeError::Timeout(timeout)))
}

/// What a streamed completion has shown so far.
#[derive(Debug, Default)]
struct Tally {
    /// When the first chunk with content arrived.
    first_content: Option<Instant>,
    /// When the latest chunk with content arrived.
    last_content: Option<Instant>,
    /// Chunks with content: the token count when no usage chunk comes.
    content_chunks: u64,
    /// `usage.completion_tokens` of the usage chunk, when one came.
    completion_tokens: Option<u64>,
    /// `data: [DONE]` seen; nothing after it matters.
    done: bool,
}

/// The parts of a chat completion chunk the deep tier reads; everything else
/// is ignored, and a chunk that does not parse is skipped.
#[derive(Deserialize)]
struct Chunk {
    choices: Option<Vec<ChunkChoice>>,
    usage: Option<ChunkUsage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    delta: Option<Delta>,
}

/// Reasoning models stream their thinking as `reasoning_content` (vLLM,
/// SGLang, DeepSeek) or `reasoning` before any `content`; those are decoded
/// tokens too, so they count for time to first token and tokens/s.
#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
    reasoning_content: Option<String>,
    reasoning: Option<String>,
}

#[derive(Deserialize)]
struct ChunkUsage {
    completion_tokens: Option<u64>,
}

impl Tally {
    /// One SSE line (its newline included or not) that arrived at `now`.
    fn line(&mut self, line: &[u8], now: Instant) {
        let Some(data) = line.trim_ascii().strip_prefix(b"data:") else {
            return;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else {
            return;
        };
        if let Some(tokens) = chunk.usage.and_then(|u| u.completion_tokens) {
            self.completion_tokens = Some(tokens);
        }
        let has_content = chunk
            .choices
            .iter()
            .flatten()
            .filter_map(|c| c.delta.as_ref())
            .any(Delta::has_text);
        if has_content {
            self.content_chunks += 1;
            self.first_content.get_or_insert(now);
            self.last_content = Some(now);
        }
    }

    /// The sample this stream makes, timed from `start` (request sent).
    fn sample(&self, start: Instant) -> Result<DeepSample, ProbeError> {
        let (Some(first), Some(last)) = (self.first_content, self.last_content) else {
            return Err(ProbeError::NoContent);
        };
        let tokens = self
            .completion_tokens
            .filter(|&t| t > 0)
            .unwrap_or(self.content_chunks);
        // Whole numbers of tokens fit an f64 exactly far beyond any stream.
        let tokens = f64::from(u32::try_from(tokens).unwrap_or(u32::MAX));
        let decode = last.duration_since(first);
        let tokens_per_sec = if tokens >= 2.0 && decode >= MIN_SPAN {
            (tokens - 1.0) / decode.as_secs_f64()
        } else {
            // One token, or every token in one read (a buffering proxy, a
            // backend that sends its whole answer at once): no decode span
            // was seen, so the whole request is all there is to divide by.
            // Dividing by the 1 ms floor instead made such a backend look
            // thousands of times faster than its peers, and throttled them.
            tokens / last.duration_since(start).max(MIN_SPAN).as_secs_f64()
        };
        Ok(DeepSample {
            ttft: first.duration_since(start),
            tokens_per_sec,
        })
    }
}

impl Delta {
    fn has_text(&self) -> bool {
        [&self.content, &self.reasoning_content, &self.reasoning]
            .into_iter()
            .flatten()
            .any(|s| !s.is_empty())
    }
}

/// The model name sent upstream for probes: the first model, renamed.
fn probe_model(config: &BackendConfig) -> Option<&str> {
    let model = config.models.first()?;
    Some(
        config
            .rename
            .get(model)
            .map_or(model.as_str(), String::as_str),
    )
}

/// `path` (which may carry a query) against the origin of `base`: engines
/// serve `/health` and `/metrics` at the root, beside `/v1`.
fn origin_uri(base: &Uri, path: &str) -> Result<Uri, http::Error> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = base.scheme().cloned();
    parts.authority = base.authority().cloned();
    parts.path_and_query = Some(path.parse()?);
    Ok(Uri::from_parts(parts)?)
}

/// A probe request; a body makes it JSON.
fn request(
    method: Method,
    uri: Uri,
    authorization: Option<&HeaderValue>,
    json: Option<Bytes>,
) -> Result<Request<Bytes>, http::Error> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(auth) = authorization {
        builder = builder.header(header::AUTHORIZATION, auth.clone());
    }
    let body = match json {
        Some(json) => {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
            json
        }
        None => Bytes::new(),
    };
    builder.body(body)
}

/// Sends a probe's chat completion built by `body` around the name of the
/// field that limits its length, and returns when that request was sent
/// and its 2xx answer (a 429 is [`ProbeError::RateLimited`], another
/// non-2xx the error quoting its body).
///
/// The field is `max_tokens`, which every engine knows (an older one that
/// ignored an unknown `max_completion_tokens` would generate without
/// limit), until the backend refuses it with a 400 that asks for
/// `max_completion_tokens` (OpenAI's reasoning models, Azure OpenAI:
/// `unsupported_parameter`): then the probe is sent again at once with
/// that field, and the backend's probes keep using it.
async fn send_chat(
    backend: &BackendState,
    body: impl Fn(&str) -> serde_json::Value,
    timeout: Duration,
) -> Result<(Instant, http::Response<UpstreamBody>), ProbeError> {
    let flag = &backend.live.probe_max_completion_tokens;
    loop {
        let completion_tokens = flag.load(Ordering::Relaxed);
        let field = if completion_tokens {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        let request = chat_request(backend, &body(field))?;
        let start = Instant::now();
        let response = upstream::send(&backend.client, request, timeout).await?;
        let status = response.status();
        if status.is_success() {
            return Ok((start, response));
        }
        let rate_limited = busy(status, &response);
        let answer = read_body(response.into_body(), SMALL_BODY_LIMIT).await;
        if let Some(wait) = rate_limited {
            return Err(ProbeError::RateLimited(wait));
        }
        let answer = answer.ok();
        if status == StatusCode::BAD_REQUEST
            && !completion_tokens
            && answer
                .as_deref()
                .is_some_and(asks_for_max_completion_tokens)
        {
            flag.store(true, Ordering::Relaxed);
            tracing::info!(backend = %backend.config.name, "backend refuses max_tokens; its probes send max_completion_tokens");
            continue;
        }
        return Err(status_error(
            status,
            answer.as_deref(),
            backend.config.api_key.as_ref(),
        ));
    }
}

/// Whether a 400's body refuses `max_tokens` for `max_completion_tokens`:
/// OpenAI's "Unsupported parameter: 'max_tokens' is not supported with this
/// model. Use 'max_completion_tokens' instead." (code
/// `unsupported_parameter`, param `max_tokens`), or any answer naming
/// `max_completion_tokens`.
fn asks_for_max_completion_tokens(body: &[u8]) -> bool {
    let has = |needle: &str| memchr::memmem::find(body, needle.as_bytes()).is_some();
    has("max_completion_tokens") || (has("unsupported_parameter") && has("max_tokens"))
}

/// `POST {url}/chat/completions` with the backend's key and this JSON body,
/// as readiness and deep samples send it.
fn chat_request(
    backend: &BackendState,
    body: &serde_json::Value,
) -> Result<Request<Bytes>, http::Error> {
    let uri = upstream::upstream_uri(&backend.config.url, "/chat/completions", None)?;
    request(
        Method::POST,
        uri,
        backend.authorization.as_ref(),
        Some(Bytes::from(body.to_string())),
    )
}

/// The whole body, up to `limit` bytes.
async fn read_body(body: UpstreamBody, limit: usize) -> Result<Bytes, ProbeError> {
    Limited::new(body, limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ProbeError::Body(e.to_string()))
}

/// A non-2xx answer as an error quoting the start of its body, which is
/// where engines and hosted APIs say what is wrong. Not for 401 and 403:
/// hosted APIs' answers to a bad key may quote part of it, and the quote
/// goes to `/admin/backends` and the log, where no key may appear (SPEC
/// "Secrets").
fn status_error(status: StatusCode, body: Option<&[u8]>, key: Option<&Secret>) -> ProbeError {
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return ProbeError::Status {
            status,
            body: "(body not kept: it may quote the key)".to_owned(),
        };
    }
    let text = body.map(String::from_utf8_lossy).unwrap_or_default();
    // Any other answer may echo the request too (a 400 quoting its
    // headers): the key is taken out before the quote is cut.
    let text = match key {
        Some(key) => crate::redact::redact_str(&text, key.expose()),
        None => text.into_owned(),
    };
    let body = printable(text.trim().chars().take(ERROR_SNIPPET_CHARS));
    ProbeError::Status { status, body }
}

/// The quoted characters with every control character (and the Unicode
/// line and paragraph separators) written as its Rust escape (`\n`,
/// `\u{1b}`): the quote is the backend's text, and goes to the log, where
/// a line break in it would start a forged log line of the backend's
/// making, and a terminal escape would act on whoever reads the log.
fn printable(quote: impl Iterator<Item = char>) -> String {
    let mut out = String::new();
    for c in quote {
        if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Median of `values` (mean of the middle two for an even count).
fn median_f64(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    let upper = *values.get(mid)?;
    if values.len() % 2 == 1 {
        return Some(upper);
    }
    let lower = *values.get(mid.checked_sub(1)?)?;
    Some((lower + upper) / 2.0)
}

/// Median of `values` (midpoint of the middle two for an even count).
fn median_duration(values: &mut [Duration]) -> Option<Duration> {
    values.sort();
    let mid = values.len() / 2;
    let upper = *values.get(mid)?;
    if values.len() % 2 == 1 {
        return Some(upper);
    }
    let lower = *values.get(mid.checked_sub(1)?)?;
    Some(lower + (upper - lower) / 2)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        mock::{self, MockConfig, MockHandle},
        snapshot::Snapshot,
        Config,
    };

    #[test]
    fn an_auth_failure_keeps_no_body_others_keep_its_start() {
        let echo = br#"{"error":{"message":"Incorrect API key provided: sk-abc***wxyz"}}"#;
        for status in [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN] {
            let e = status_error(status, Some(echo), None).to_string();
            assert!(!e.contains("sk-abc"), "{e}");
            assert!(e.contains(status.as_str()), "{e}");
        }
        let e = status_error(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(b"engine loading"),
            None,
        )
        .to_string();
        assert!(e.contains("engine loading"), "{e}");
        // An answer that echoes the request quotes the key weir sent.
        let key = Secret::new("sk-SUPERSECRET-123");
        let echo = b"bad request: authorization: Bearer sk-SUPERSECRET-123";
        let e = status_error(StatusCode::BAD_REQUEST, Some(echo), Some(&key)).to_string();
        assert!(!e.contains("SUPERSECRET"), "{e}");
        assert!(e.contains("Bearer [redacted]"), "{e}");
    }

    /// A backend's error body cannot forge a log line or act on a terminal:
    /// line breaks and other control characters in the quote are escaped,
    /// and the rest of the text, quotes and all, stays as it came.
    #[test]
    fn a_quoted_body_carries_no_control_characters() {
        let body = "oops\n2026-12-04T21:00:00Z  INFO weir::access_log: request status=200\r\n\
                    \u{1b}[2J \"x\"\t\u{2028}end\u{0}";
        let e = status_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some(body.as_bytes()),
            None,
        );
        let e = e.to_string();
        assert!(!e.chars().any(char::is_control), "{e:?}");
        assert!(!e.contains('\u{2028}'), "{e:?}");
        assert_eq!(
            e,
            "status 500 Internal Server Error: oops\\n2026-12-04T21:00:00Z  INFO \
             weir::access_log: request status=200\\r\\n\\u{1b}[2J \"x\"\\t\\u{2028}end\\u{0}"
        );
    }

    /// Room for a loaded 2-core machine on top of any expected duration.
    const MARGIN: Duration = Duration::from_secs(3);

    /// Generous: these tests must not flake on a busy machine.
    const TIMEOUT: Duration = Duration::from_secs(10);

    /// The key `UP_KEY` resolves to in these tests.
    const KEY: &str = "sk-probe-test";

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A backend `b` at `url` serving model `m`, with `extra` backend keys.
    fn backend_at(url: &str, extra: &str) -> Arc<BackendState> {
        let text = format!(
            r#"
[[models]]
name = "m"

[[backends]]
name = "b"
url = "{url}"
models = ["m"]
{extra}

[health]
enabled = false
"#
        );
        let env = |name: &str| (name == "UP_KEY").then(|| KEY.to_owned());
        let config = Config::parse(&text, "t.toml", &env).expect("test config is valid");
        let snapshot = Snapshot::build(Arc::new(config), None, &crate::metrics::Metrics::new())
            .expect("snapshot builds");
        snapshot.backends()[0].clone()
    }

    fn backend(mock: &MockHandle, extra: &str) -> Arc<BackendState> {
        backend_at(&mock.base_url(), extra)
    }

    /// A mock with these knobs.
    async fn start(cfg: MockConfig) -> MockHandle {
        mock::start(cfg).await.expect("mock starts")
    }

    fn assert_pass(outcome: &ProbeOutcome) {
        assert!(outcome.is_pass(), "expected a pass: {outcome:?}");
    }

    fn assert_fail(outcome: &ProbeOutcome, containing: &str) {
        match outcome {
            ProbeOutcome::Fail { error, .. } => {
                assert!(error.contains(containing), "{error:?} lacks {containing:?}")
            }
            ProbeOutcome::Pass { .. } | ProbeOutcome::RateLimited { .. } => {
                panic!("expected a failure: {outcome:?}")
            }
        }
    }

    /// The recorded requests to `path`.
    fn requests_to(mock: &MockHandle, path: &str) -> Vec<mock::RecordedRequest> {
        mock.recorded()
            .into_iter()
            .filter(|r| r.uri == path)
            .collect()
    }

    #[test]
    fn a_readiness_answer_is_a_completion_or_an_embedding_list() {
        for (body, kind) in [
            (r#"{"choices":[{"index":0}],"usage":{}}"#, Answer::Chat),
            (r#"{"choices":[],"error":null}"#, Answer::Chat),
            (
                r#"{"object":"list","data":[{"embedding":[0.1]}]}"#,
                Answer::Embeddings,
            ),
        ] {
            assert!(is_answer(body.as_bytes(), kind).is_ok(), "{body}");
        }
        for (body, kind) in [
            (r#"{"error":{"message":"model not loaded"}}"#, Answer::Chat),
            (r#"{"hello":"world"}"#, Answer::Chat),
            (
                r#"{"choices":[{"index":0}],"error":{"message":"x"}}"#,
                Answer::Chat,
            ),
            (r#"{"choices":null}"#, Answer::Chat),
            (r#"{"choices":{}}"#, Answer::Chat),
            ("[1]", Answer::Chat),
            (r#"{"choices":[{"index":0}]}"#, Answer::Embeddings),
        ] {
            assert!(
                matches!(
                    is_answer(body.as_bytes(), kind),
                    Err(ProbeError::NotAnAnswer(_))
                ),
                "{body}"
            );
        }
        assert!(matches!(
            is_answer(b"<html></html>", Answer::Chat),
            Err(ProbeError::NotJson(_))
        ));
    }

    /// A backend that answers a readiness probe 200 with an error object
    /// ("model not loaded", as wrappers in front of an engine do) cannot
    /// infer: it fails, saying why. Any JSON used to pass.
    #[tokio::test]
    async fn readiness_fails_on_a_200_holding_an_error() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                let body = r#"{"error":{"message":"model not loaded","type":"server_error"}}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        let b = backend_at(&format!("http://{addr}/v1"), "");
        assert_fail(&readiness(&b, TIMEOUT).await, "not a chat completion");
    }

    #[tokio::test]
    async fn liveness_passes_on_health_path_without_the_key() {
        let mock = start(MockConfig::new()).await;
        let b = backend(&mock, "health_path = \"/health\"\napi_key_env = \"UP_KEY\"");
        assert_pass(&liveness(&b, TIMEOUT).await);
        let seen = requests_to(&mock, "/health");
        assert_eq!(seen.len(), 1, "GET /health at the origin, not under /v1");
        assert!(seen[0].headers.get(header::AUTHORIZATION).is_none());
    }

    #[tokio::test]
    async fn liveness_with_empty_health_path_lists_models_with_the_key() {
        let mock = start(MockConfig::new()).await;
        let b = backend(&mock, "health_path = \"\"\napi_key_env = \"UP_KEY\"");
        assert_pass(&liveness(&b, TIMEOUT).await);
        let seen = requests_to(&mock, "/v1/models");
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0]
                .headers
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
            Some(format!("Bearer {KEY}").as_bytes())
        );
    }

    #[tokio::test]
    async fn liveness_fails_on_a_500() {
        let mock = start(MockConfig::new().health_status(500)).await;
        let b = backend(&mock, "health_path = \"/health\"");
        assert_fail(&liveness(&b, TIMEOUT).await, "500");
        // And recovers when the backend does.
        mock.update(|c| c.health_status = None);
        assert_pass(&liveness(&b, TIMEOUT).await);
    }

    #[tokio::test]
    async fn liveness_fails_on_a_closed_port() {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("bound address");
        drop(listener);
        let b = backend_at(&format!("http://{addr}/v1"), "health_path = \"/health\"");
        let outcome = liveness(&b, TIMEOUT).await;
        assert_fail(&outcome, "connect");
        assert!(outcome.latency() < TIMEOUT, "{outcome:?}");
    }

    #[tokio::test]
    async fn liveness_fails_on_a_hang_within_its_timeout() {
        let mock = start(MockConfig::new().hang(true)).await;
        let b = backend(&mock, "health_path = \"/health\"");
        let timeout = ms(300);
        let started = Instant::now();
        let outcome = liveness(&b, timeout).await;
        assert!(!outcome.is_pass(), "{outcome:?}");
        assert!(outcome.latency() >= timeout, "{outcome:?}");
        assert!(started.elapsed() < timeout + MARGIN);
    }

    #[tokio::test]
    async fn readiness_passes_with_one_token_on_the_renamed_model_and_the_key() {
        let mock = start(MockConfig::new()).await;
        let b = backend(
            &mock,
            "api_key_env = \"UP_KEY\"\nrename = { \"m\" = \"upstream-m\" }",
        );
        assert_pass(&readiness(&b, TIMEOUT).await);
        let sent = mock.last_inference().expect("a completion was sent");
        assert_eq!(sent.uri, "/v1/chat/completions");
        assert!(sent.headers.get(header::AUTHORIZATION).is_some());
        let body: serde_json::Value = serde_json::from_slice(&sent.body).expect("json body");
        assert_eq!(body["model"], "upstream-m");
        assert_eq!(body["max_tokens"], 1);
        assert_eq!(body["stream"], false);
    }

    #[tokio::test]
    async fn readiness_fails_when_inference_fails_but_health_passes() {
        let mock = start(MockConfig::new().fail_inference_only(true)).await;
        let b = backend(&mock, "");
        assert_pass(&liveness(&b, TIMEOUT).await);
        assert_fail(&readiness(&b, TIMEOUT).await, "500");
    }

    /// A 429 is its own outcome, carrying the backend's Retry-After; a
    /// deep round stops at one, which is no failed sample.
    #[tokio::test]
    async fn a_429_is_rate_limited_with_its_retry_after() {
        let mock = start(MockConfig::new().rate_limit(1.0, 7)).await;
        let b = backend(&mock, "");
        match readiness(&b, TIMEOUT).await {
            ProbeOutcome::RateLimited {
                retry_after, error, ..
            } => {
                assert_eq!(retry_after, Duration::from_secs(7));
                assert!(error.contains("429"), "{error}");
            }
            other => panic!("expected a 429: {other:?}"),
        }
        let result = deep(&b, TIMEOUT, 3, 4).await;
        assert_eq!(result.rate_limited, Some(Duration::from_secs(7)));
        assert_eq!(
            (result.samples.len(), result.failures),
            (0, 0),
            "{result:?}"
        );
        assert_eq!(
            requests_to(&mock, "/v1/chat/completions").len(),
            2,
            "one sample"
        );
    }

    /// A 429 without `Retry-After` (a key whose quota ran out answers so
    /// for good) is a failed probe, not a pause: a backend that refuses
    /// every probe so is taken out by `unhealthy_threshold` as before.
    #[tokio::test]
    async fn a_429_without_retry_after_is_a_failure() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("bound");
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                        let answer =
                            "HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}";
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let b = backend_at(&format!("http://{addr}/v1"), "");
        assert_fail(&readiness(&b, TIMEOUT).await, "429");
    }

    /// A 429 whose Retry-After asks for no pause (`0`) is a failure too: as
    /// a pause of nothing it left a backend that answers every request so
    /// in rotation at full weight for good.
    #[tokio::test]
    async fn a_429_with_retry_after_0_is_a_failure() {
        let mock = start(MockConfig::new().rate_limit(1.0, 0)).await;
        let b = backend(&mock, "");
        assert_fail(&readiness(&b, TIMEOUT).await, "429");
        let result = deep(&b, TIMEOUT, 2, 4).await;
        assert_eq!(result.rate_limited, None, "{result:?}");
        assert_eq!(result.failures, 2, "{result:?}");
    }

    #[tokio::test]
    async fn readiness_latency_includes_the_backend_latency() {
        let latency = ms(150);
        let mock = start(MockConfig::new().latency(latency)).await;
        let b = backend(&mock, "");
        let outcome = readiness(&b, TIMEOUT).await;
        assert_pass(&outcome);
        assert!(outcome.latency() >= latency, "{outcome:?}");
        assert!(outcome.latency() < latency + MARGIN, "{outcome:?}");
    }

    #[tokio::test]
    async fn readiness_fails_on_a_hang_within_its_timeout() {
        let mock = start(MockConfig::new().hang(true)).await;
        let b = backend(&mock, "");
        let started = Instant::now();
        let outcome = readiness(&b, ms(300)).await;
        assert!(!outcome.is_pass(), "{outcome:?}");
        assert!(started.elapsed() < ms(300) + MARGIN);
    }

    #[tokio::test]
    async fn deep_measures_throughput_and_time_to_first_token() {
        let latency = ms(100);
        let mock = start(
            MockConfig::new()
                .latency(latency)
                .tokens_per_sec(50.0)
                .chunks(10),
        )
        .await;
        let b = backend(&mock, "");
        let result = deep(&b, Duration::from_secs(30), 3, 10).await;
        assert_eq!(result.failures, 0, "{result:?}");
        assert_eq!(result.samples.len(), 3);
        let rate = result.median_tokens_per_sec.expect("a median rate");
        assert!((25.0..=100.0).contains(&rate), "50 tok/s expected: {rate}");
        for s in &result.samples {
            assert!(s.ttft >= latency, "{s:?}");
        }
        let ttft = result.median_ttft.expect("a median ttft");
        assert!(ttft >= latency && ttft < latency + MARGIN, "{ttft:?}");
        assert_eq!(result.engine, None, "no metrics_path, no engine read");
        let sent = mock.last_inference().expect("a sample was sent");
        let body: serde_json::Value = serde_json::from_slice(&sent.body).expect("json body");
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["max_tokens"], 10);
    }

    #[tokio::test]
    async fn deep_reads_engine_metrics_and_sees_saturation() {
        let mock = start(
            MockConfig::new()
                .chunks(4)
                .requests_waiting(3)
                .kv_cache_usage(0.97),
        )
        .await;
        let b = backend(&mock, "metrics_path = \"/metrics\"");
        let result = deep(&b, TIMEOUT, 2, 4).await;
        assert_eq!(result.failures, 0, "{result:?}");
        let load = result.engine.expect("engine load read");
        assert_eq!(load.engine, Some(engine::Engine::Vllm));
        assert_eq!(load.waiting, Some(3.0));
        assert_eq!(load.kv_cache_usage, Some(0.97));
        assert!(load.running.is_some());
        assert!(load.is_saturated());

        mock.update(|c| {
            c.requests_waiting = Some(0);
            c.kv_cache_usage = Some(0.99);
        });
        let load = deep(&b, TIMEOUT, 1, 4).await.engine.expect("engine load");
        assert!(!load.is_saturated(), "full cache, no queue: {load:?}");
    }

    #[tokio::test]
    async fn deep_counts_failed_samples() {
        let mock = start(MockConfig::new().fail_inference_only(true)).await;
        let b = backend(&mock, "metrics_path = \"/metrics\"");
        let result = deep(&b, TIMEOUT, 3, 4).await;
        assert_eq!(result.failures, 3);
        assert!(result.samples.is_empty());
        assert_eq!(result.median_tokens_per_sec, None);
        assert_eq!(result.median_ttft, None);
        assert!(
            result
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("500")),
            "{result:?}"
        );
        assert!(result.engine.is_some(), "metrics still read: {result:?}");
    }

    #[tokio::test]
    async fn deep_stops_at_its_timeout() {
        // 100 tokens at 5 tok/s take 20 s per sample; the round has 1 s.
        let mock = start(MockConfig::new().tokens_per_sec(5.0).chunks(100)).await;
        let b = backend(&mock, "");
        let timeout = Duration::from_secs(1);
        let started = Instant::now();
        let result = deep(&b, timeout, 3, 100).await;
        assert!(started.elapsed() < timeout + MARGIN);
        assert_eq!(result.failures, 3, "{result:?}");
        assert!(result.samples.is_empty());
    }

    #[tokio::test]
    async fn deep_reports_an_unreadable_metrics_path() {
        let mock = start(MockConfig::new().chunks(2)).await;
        let b = backend(&mock, "metrics_path = \"/nope\"");
        let result = deep(&b, TIMEOUT, 1, 2).await;
        assert_eq!(result.failures, 0, "{result:?}");
        assert_eq!(result.engine, None);
        assert!(
            result
                .metrics_error
                .as_deref()
                .is_some_and(|e| e.contains("404")),
            "{result:?}"
        );
    }

    #[test]
    fn tally_reads_split_lines_usage_and_done() {
        let t0 = Instant::now();
        let t1 = t0 + ms(100);
        let t2 = t0 + ms(300);
        let mut tally = Tally::default();
        tally.line(
            br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
            t0,
        );
        tally.line(b"\r\n", t0);
        tally.line(b": keep-alive comment\n", t0);
        tally.line(
            br#"data:{"choices":[{"delta":{"reasoning_content":"hm"}}]}"#,
            t1,
        );
        tally.line(
            br#"data: {"choices":[{"delta":{"content":"a"}}],"usage":null}"#,
            t1,
        );
        tally.line(b"data: not json\n", t1);
        tally.line(br#"data: {"choices":[{"delta":{"content":"b"}}]}"#, t2);
        tally.line(
            br#"data: {"choices":[],"usage":{"completion_tokens":5}}"#,
            t2,
        );
        tally.line(b"data: [DONE]\r\n", t2);
        assert!(tally.done);
        assert_eq!(tally.content_chunks, 3);
        assert_eq!(tally.completion_tokens, Some(5));
        let s = tally.sample(t0).expect("a sample");
        assert_eq!(s.ttft, ms(100));
        // 4 tokens after the first over 200 ms.
        assert!((s.tokens_per_sec - 20.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn tally_without_usage_counts_chunks_and_guards_a_zero_span() {
        let t0 = Instant::now();
        let mut tally = Tally::default();
        for _ in 0..3 {
            tally.line(br#"data: {"choices":[{"delta":{"content":"x"}}]}"#, t0);
        }
        let s = tally.sample(t0).expect("a sample");
        assert_eq!(s.ttft, Duration::ZERO);
        assert!(s.tokens_per_sec.is_finite(), "{s:?}");
        // A whole answer in one read, 320 ms after the request: 16 tokens
        // over the request's 320 ms (50/s), not 15 over a 1 ms floor.
        let mut burst = Tally::default();
        let t1 = t0 + Duration::from_millis(320);
        for _ in 0..16 {
            burst.line(br#"data: {"choices":[{"delta":{"content":"x"}}]}"#, t1);
        }
        let s = burst.sample(t0).expect("a sample");
        assert!((s.tokens_per_sec - 50.0).abs() < 1e-9, "{s:?}");
        assert!(
            Tally::default().sample(t0).is_err(),
            "no content, no sample"
        );
    }

    #[test]
    fn medians() {
        assert_eq!(median_f64(&mut []), None);
        assert_eq!(median_f64(&mut [3.0]), Some(3.0));
        assert_eq!(median_f64(&mut [9.0, 1.0, 4.0]), Some(4.0));
        assert_eq!(median_f64(&mut [4.0, 1.0, 2.0, 9.0]), Some(3.0));
        assert_eq!(median_duration(&mut []), None);
        assert_eq!(median_duration(&mut [ms(30), ms(10)]), Some(ms(20)));
        assert_eq!(median_duration(&mut [ms(5), ms(30), ms(10)]), Some(ms(10)));
    }

    #[test]
    fn origin_uri_replaces_the_path() {
        let base: Uri = "https://api.example.com:8443/openai/v1/".parse().unwrap();
        assert_eq!(
            origin_uri(&base, "/health?full=1").unwrap().to_string(),
            "https://api.example.com:8443/health?full=1"
        );
    }
}
