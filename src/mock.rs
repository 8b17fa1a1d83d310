//! An OpenAI-compatible mock backend: what `weir mock`, `weir demo`, the integration tests and
//! the load benches put behind the gateway instead of a real inference engine.
//!
//! It owns the mock's whole life: the accept loop (HTTP/1.1 and h2c on one port, via
//! `hyper_util`'s auto builder), the routes an OpenAI-style engine serves (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, `/v1/models`, plus vLLM-style `/health` and `/metrics`),
//! fault injection (latency, token pacing, 500s, 429s with `Retry-After`, a fixed status, hangs,
//! answers that stall part-way)
//! and the bookkeeping tests assert on (request, in-flight, connection counts and the last
//! [`RECORDED_CAPACITY`] requests).
//!
//! It deliberately does not tokenize, check models against its list, speak TLS or validate more
//! of the request than it needs: it answers the shape, not the meaning. Token counts are made up
//! but deterministic, so a test can predict `usage` (see [`prompt_tokens`]).
//!
//! Knobs live in one [`MockConfig`] behind an `ArcSwap`: each request loads it once, so a test can
//! change a running backend ([`MockHandle::update`]) without locks on the request path. A stream is
//! a `MockBody` holding its pre-rendered SSE frames and a timer that paces them, so pacing costs
//! no task or channel per request, and a client that leaves drops the body and with it the
//! in-flight guard (STYLE §3, "cancellation is drop").
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How many requests [`MockHandle::recorded`] keeps; older ones are dropped first.
pub const RECORDED_CAPACITY: usize = 64;

/// Request bodies above this are answered 413; a mock has no business buffering more.
const MAX_BODY_BYTES: usize = 16 << 20;

/// Length of the made-up embedding vectors.
const EMBEDDING_DIMS: usize = 8;

/// Longest pause between two stream chunks, so a tiny `tokens_per_sec` cannot overflow a timer.
const MAX_CHUNK_INTERVAL: Duration = Duration::from_secs(3600);

/// The mock's knobs. Every field can be changed on a running mock ([`MockHandle::set_config`]);
/// a change applies to requests that start afterwards.
///
/// `Default` is realistic-but-fast: no latency, unpaced streams of 16 tokens, no injected
/// failures, one model `mock-model`, recording on.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Models listed by `GET /v1/models`. Completions echo whatever `model` the client sent.
    pub models: Vec<String>,
    /// Wait before the response headers (non-stream and errors) or before the first chunk.
    pub latency: Duration,
    /// Pace of stream chunks, one token per chunk; 0, negative, NaN or infinite = unpaced.
    pub tokens_per_sec: f64,
    /// Completion length in tokens (capped by the request's `max_completion_tokens`/`max_tokens`).
    pub chunks: u32,
    /// Share (0..=1) of inference requests answered 500 with an OpenAI error body.
    pub failure_rate: f64,
    /// Share (0..=1) of inference requests answered 429 with `Retry-After: retry_after`,
    /// drawn after `failure_rate`'s 500s: the two should add up to at most 1
    /// (`weir mock` refuses more), or the 429s get only what is left.
    pub rate_limit_rate: f64,
    /// Seconds sent in `Retry-After` with each 429.
    pub retry_after: u32,
    /// Accept every request (all routes, `/health` included) and never answer it.
    pub hang: bool,
    /// Answer inference requests but never finish them: a stream sends its head and its first
    /// `N` token chunks (at most all of them, never the finish chunk or `[DONE]`), a non-stream
    /// answer its head (with its `content-length`) and no body; then nothing more until the
    /// client leaves or the mock shuts down. The connection stays open, and `/health` and the
    /// injected failures are unaffected: a backend that stops mid-answer while its probes pass.
    pub stall_after: Option<u32>,
    /// Answer every inference request with this status and an OpenAI error body.
    pub status_override: Option<u16>,
    /// Answer every inference request 500 while `/health` stays 200: a backend that passes
    /// liveness and fails readiness.
    pub fail_inference_only: bool,
    /// Status of `GET /health` when set (default 200): a backend that fails liveness.
    pub health_status: Option<u16>,
    /// Sent back as `x-mock-name` on every response, so a test sees which backend answered.
    pub name: String,
    /// Keep the last [`RECORDED_CAPACITY`] requests; benches turn it off to save the copies.
    pub record: bool,
    /// `vllm:num_requests_waiting` in `/metrics` (default 0).
    pub requests_waiting: Option<u64>,
    /// `vllm:kv_cache_usage_perc` in `/metrics` (default: 1% per in-flight request, at most 1).
    pub kv_cache_usage: Option<f64>,
    /// A non-stream completion also waits for its tokens at `tokens_per_sec` before it is
    /// answered, as an engine generates the whole answer first (`weir demo`, `weir mock
    /// --pace-answers`). Off by default: tests pace streams and want quick probes.
    pub pace_answers: bool,
    /// Refuse an inference request whose body has `stream_options` with a 400 naming it, as
    /// some hosted OpenAI-compatible APIs do (Azure OpenAI's older API versions, early Groq
    /// and Mistral): what weir's `stream_options` fallback is for.
    pub refuse_stream_options: bool,
}

/// One request as the mock saw it, for tests that check what the gateway forwarded.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// Request method.
    pub method: Method,
    /// Path and query, e.g. `/v1/chat/completions?x=1`.
    pub uri: String,
    /// Headers exactly as received (hop-by-hop ones included, so tests can check they were cut).
    pub headers: HeaderMap,
    /// The whole request body.
    pub body: Bytes,
}

/// A running mock. Cloning shares it; dropping the last clone does *not* stop it (tests often
/// keep only the address), [`MockHandle::shutdown`] does.
#[derive(Clone)]
pub struct MockHandle {
    shared: Arc<Shared>,
}

/// Bind `127.0.0.1:0` and serve in a spawned task; the usual way tests get a backend.
pub async fn start(cfg: MockConfig) -> std::io::Result<MockHandle> {
    let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    spawn(listener, cfg)
}

/// Binds `addr` with the gateway's accept backlog, so a burst of new
/// connections (a bench opening hundreds of streams at once) is queued,
/// not dropped into a 1 s SYN retransmission. Must run inside a runtime.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    crate::socket::listen(addr)
}

/// Serve on `listener` until `shutdown` completes, then close every connection; this is
/// `weir mock --listen` (STYLE §7: main turns signals into the future).
pub async fn serve(
    listener: TcpListener,
    cfg: MockConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let shared = Shared::new(listener.local_addr()?, cfg);
    let token = shared.shutdown.clone();
    tokio::select! {
        () = accept_loop(listener, shared.clone()) => {}
        () = shutdown => token.cancel(),
    }
    shared.tasks.close();
    shared.tasks.wait().await;
    Ok(())
}

/// Like [`start`], on a listener the caller bound (a fixed port, or re-binding the port of a mock
/// that was shut down to simulate a restart).
pub fn spawn(listener: TcpListener, cfg: MockConfig) -> std::io::Result<MockHandle> {
    let shared = Shared::new(listener.local_addr()?, cfg);
    shared.tasks.spawn(accept_loop(listener, shared.clone()));
    Ok(MockHandle { shared })
}

/// The made-up prompt token count the mock reports for this request body, so tests can predict
/// `usage`: for chat, each message counts `content bytes / 4 + 4` (content parts count their
/// `text`); for `prompt`/`input`, each string counts `bytes / 4` and each token id 1; the total is
/// at least 1. `None` when the body is not a JSON request object.
pub fn prompt_tokens(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<InferenceRequest>(body)
        .ok()
        .map(|req| req.prompt_tokens())
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            models: vec!["mock-model".to_owned()],
            latency: Duration::ZERO,
            tokens_per_sec: 0.0,
            chunks: 16,
            failure_rate: 0.0,
            rate_limit_rate: 0.0,
            retry_after: 1,
            hang: false,
            stall_after: None,
            status_override: None,
            fail_inference_only: false,
            health_status: None,
            name: "mock".to_owned(),
            record: true,
            requests_waiting: None,
            kv_cache_usage: None,
            pace_answers: false,
            refuse_stream_options: false,
        }
    }
}

impl MockConfig {
    /// The defaults; reads better at the start of a builder chain.
    pub fn new() -> Self {
        Self::default()
    }

    /// Models listed by `/v1/models`.
    pub fn models(mut self, models: Vec<String>) -> Self {
        self.models = models;
        self
    }

    /// A single listed model.
    pub fn model(self, model: impl Into<String>) -> Self {
        self.models(vec![model.into()])
    }

    /// Wait before headers (non-stream) or the first chunk (stream).
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Stream pacing; 0 or infinite = unpaced.
    pub fn tokens_per_sec(mut self, tokens_per_sec: f64) -> Self {
        self.tokens_per_sec = tokens_per_sec;
        self
    }

    /// Non-stream completions wait for their tokens too (see [`MockConfig::pace_answers`]).
    pub fn pace_answers(mut self, pace: bool) -> Self {
        self.pace_answers = pace;
        self
    }

    /// Completion length in tokens.
    pub fn chunks(mut self, chunks: u32) -> Self {
        self.chunks = chunks;
        self
    }

    /// Share of inference requests answered 500.
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.failure_rate = rate;
        self
    }

    /// Share of inference requests answered 429 with `Retry-After: retry_after`.
    pub fn rate_limit(mut self, rate: f64, retry_after: u32) -> Self {
        self.rate_limit_rate = rate;
        self.retry_after = retry_after;
        self
    }

    /// Never answer.
    pub fn hang(mut self, hang: bool) -> Self {
        self.hang = hang;
        self
    }

    /// Stall every answer after its head and `chunks` token chunks (see
    /// [`MockConfig::stall_after`]).
    pub fn stall_after(mut self, chunks: u32) -> Self {
        self.stall_after = Some(chunks);
        self
    }

    /// Answer every inference request with `status` (e.g. 400 to test pass-through, 503).
    pub fn status(mut self, status: u16) -> Self {
        self.status_override = Some(status);
        self
    }

    /// Refuse `stream_options` with a 400 (see [`MockConfig::refuse_stream_options`]).
    pub fn refuse_stream_options(mut self, refuse: bool) -> Self {
        self.refuse_stream_options = refuse;
        self
    }

    /// Completions 500, `/health` 200.
    pub fn fail_inference_only(mut self, fail: bool) -> Self {
        self.fail_inference_only = fail;
        self
    }

    /// Status of `GET /health`.
    pub fn health_status(mut self, status: u16) -> Self {
        self.health_status = Some(status);
        self
    }

    /// Value of the `x-mock-name` response header.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Keep recent requests for [`MockHandle::recorded`].
    pub fn record(mut self, record: bool) -> Self {
        self.record = record;
        self
    }

    /// `vllm:num_requests_waiting` reported by `/metrics`.
    pub fn requests_waiting(mut self, waiting: u64) -> Self {
        self.requests_waiting = Some(waiting);
        self
    }

    /// `vllm:kv_cache_usage_perc` reported by `/metrics` (0..=1).
    pub fn kv_cache_usage(mut self, usage: f64) -> Self {
        self.kv_cache_usage = Some(usage);
        self
    }

    /// Start a mock with these knobs on `127.0.0.1:0`: `MockConfig::new().chunks(4).start()`.
    pub async fn start(self) -> std::io::Result<MockHandle> {
        start(self).await
    }
}

impl MockHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://ADDR/v1`, the form a backend `url` takes in weir's config.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.shared.addr)
    }

    /// Replace every knob; requests already running keep the config they started with.
    pub fn set_config(&self, cfg: MockConfig) {
        let _writer = lock(&self.shared.config_writer);
        self.shared.config.store(Arc::new(cfg));
    }

    /// Change some knobs: `mock.update(|c| c.failure_rate = 1.0)`.
    pub fn update(&self, f: impl FnOnce(&mut MockConfig)) {
        // The writer lock makes two concurrent updates compose instead of one losing the other.
        let _writer = lock(&self.shared.config_writer);
        let mut cfg = MockConfig::clone(&self.shared.config.load());
        f(&mut cfg);
        self.shared.config.store(Arc::new(cfg));
    }

    /// The knobs now in force.
    pub fn config(&self) -> MockConfig {
        MockConfig::clone(&self.shared.config.load())
    }

    /// Inference requests (POST completions, chat, embeddings) started since the last reset.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Inference requests whose response is not finished (a stream counts until its last chunk
    /// or until the client leaves).
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Highest [`Self::in_flight`] seen since the last reset.
    pub fn max_in_flight(&self) -> u64 {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// TCP connections now open.
    pub fn connections_open(&self) -> u64 {
        self.shared.connections_open.load(Ordering::SeqCst)
    }

    /// TCP connections accepted since the last reset (keep-alive reuse keeps this low).
    pub fn connections_accepted(&self) -> u64 {
        self.shared.connections_accepted.load(Ordering::SeqCst)
    }

    /// The last [`RECORDED_CAPACITY`] requests on every route, oldest first.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.recorded).iter().cloned().collect()
    }

    /// The most recent POST (inference) request, skipping health and metrics probes.
    pub fn last_inference(&self) -> Option<RecordedRequest> {
        lock(&self.shared.recorded)
            .iter()
            .rev()
            .find(|r| r.method == Method::POST)
            .cloned()
    }

    /// Zero the counters and forget recorded requests; in-flight and open counts are live values
    /// and stay, and the maximum restarts from the current in-flight count.
    pub fn reset_stats(&self) {
        let s = &self.shared;
        s.requests.store(0, Ordering::SeqCst);
        s.connections_accepted.store(0, Ordering::SeqCst);
        s.max_in_flight
            .store(s.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
        lock(&s.recorded).clear();
    }

    /// Stop accepting and drop every connection at once, mid-stream or hung ones included: a
    /// backend that dies. Returns at once; await [`Self::stopped`] to know the port is closed.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
    }

    /// Completes once, after [`Self::shutdown`], the listener and every connection are closed.
    pub async fn stopped(&self) {
        self.shared.tasks.wait().await;
    }
}

impl std::fmt::Debug for MockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockHandle")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

/// State shared by the handle, the accept loop and every request; lives as long as any of them.
struct Shared {
    /// Bound address, fixed at start.
    addr: SocketAddr,
    /// Knobs; each request loads them once.
    config: ArcSwap<MockConfig>,
    /// Serialises writers of `config` only; readers never take it.
    config_writer: Mutex<()>,
    requests: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    connections_open: AtomicU64,
    connections_accepted: AtomicU64,
    /// Source of response ids (`chatcmpl-mock-N`).
    next_id: AtomicU64,
    /// Ring of recent requests, newest at the back.
    recorded: Mutex<VecDeque<RecordedRequest>>,
    /// Cancelled by `shutdown`; the accept loop and every connection watch it.
    shutdown: CancellationToken,
    /// Owns the accept loop and connection tasks, so `stopped` can wait for them.
    tasks: TaskTracker,
}

impl Shared {
    fn new(addr: SocketAddr, cfg: MockConfig) -> Arc<Self> {
        Arc::new(Self {
            addr,
            config: ArcSwap::from_pointee(cfg),
            config_writer: Mutex::new(()),
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            connections_accepted: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            recorded: Mutex::new(VecDeque::with_capacity(RECORDED_CAPACITY)),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    fn record(&self, parts: &http::request::Parts, body: &Bytes) {
        let request = RecordedRequest {
            method: parts.method.clone(),
            uri: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
            headers: parts.headers.clone(),
            body: body.clone(),
        };
        let mut ring = lock(&self.recorded);
        if ring.len() >= RECORDED_CAPACITY {
            ring.pop_front();
        }
        ring.push_back(request);
    }
}

/// One inference request being answered; gives its in-flight slot back on drop, which is also
/// what happens when hyper drops a response because the client left.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(shared: &Arc<Shared>) -> Self {
        shared.requests.fetch_add(1, Ordering::SeqCst);
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One open TCP connection; counted down when its task ends, however it ends.
struct OpenConnection(Arc<Shared>);

impl OpenConnection {
    fn open(shared: &Arc<Shared>) -> Self {
        shared.connections_accepted.fetch_add(1, Ordering::SeqCst);
        shared.connections_open.fetch_add(1, Ordering::SeqCst);
        Self(shared.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body: pre-rendered frames, optionally released on a schedule. A non-stream answer
/// is one frame with an exact length; a stream is one frame per SSE event, so each chunk goes out
/// as its own write when paced.
struct MockBody {
    frames: VecDeque<Bytes>,
    /// `None` when every frame may go at once.
    pacing: Option<Pacing>,
    /// Frames handed out so far; the index of the next frame.
    sent: u32,
    /// The index of the frame never handed out (`stall_after`): from there the body stays
    /// pending, holding its connection, until hyper drops it. `None` for a body that finishes.
    stall_at: Option<u32>,
    /// Advertise the exact length (non-stream); a stream stays chunked as real engines send it.
    exact_length: bool,
    /// Held until the body is finished or dropped.
    _in_flight: Option<InFlight>,
}

/// When stream frames may go: frame `i < paced` at `first + i × interval`, the rest right after.
struct Pacing {
    first: Instant,
    interval: Duration,
    paced: u32,
    sleep: Pin<Box<Sleep>>,
}

impl Pacing {
    fn deadline(&self, frame: u32) -> Instant {
        let steps = frame.min(self.paced.saturating_sub(1));
        self.interval
            .checked_mul(steps)
            .and_then(|offset| self.first.checked_add(offset))
            .unwrap_or(self.first)
    }
}

impl MockBody {
    fn full(bytes: Bytes, in_flight: Option<InFlight>) -> Self {
        Self {
            frames: VecDeque::from([bytes]),
            pacing: None,
            sent: 0,
            stall_at: None,
            exact_length: true,
            _in_flight: in_flight,
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.frames.is_empty() {
            return Poll::Ready(None);
        }
        if this.stall_at == Some(this.sent) {
            // No waker is kept: nothing is ever due. The client leaving (hyper sees the EOF or
            // the h2 reset) or a shutdown (the connection task ends) drops the body instead.
            return Poll::Pending;
        }
        if let Some(pacing) = &mut this.pacing {
            let at = pacing.deadline(this.sent);
            if at > Instant::now() {
                if pacing.sleep.deadline() != at {
                    pacing.sleep.as_mut().reset(at);
                }
                ready!(pacing.sleep.as_mut().poll(cx));
            }
        }
        this.sent += 1;
        Poll::Ready(this.frames.pop_front().map(|bytes| Ok(Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact_length {
            let len: usize = self.frames.iter().map(Bytes::len).sum();
            SizeHint::with_exact(u64::try_from(len).unwrap_or(u64::MAX))
        } else {
            SizeHint::default()
        }
    }
}

/// What an inference request asks for; unknown fields are ignored, as engines do.
#[derive(Deserialize)]
struct InferenceRequest {
    model: Option<String>,
    stream: Option<bool>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    stream_options: Option<StreamOptions>,
    messages: Option<Vec<Message>>,
    prompt: Option<Value>,
    input: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Message {
    content: Option<Value>,
}

impl InferenceRequest {
    fn prompt_tokens(&self) -> u64 {
        let total = match &self.messages {
            Some(messages) => messages
                .iter()
                .map(|m| m.content.as_ref().map_or(0, content_bytes) / 4 + 4)
                .sum(),
            None => self
                .prompt
                .as_ref()
                .or(self.input.as_ref())
                .map_or(0, input_tokens),
        };
        total.max(1)
    }
}

/// Bytes of text in a chat `content`: a string, or an array of parts with `text`.
fn content_bytes(content: &Value) -> u64 {
    match content {
        Value::String(s) => len_u64(s),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(len_u64)
            .sum(),
        _ => 0,
    }
}

/// Tokens in a `prompt`/`input`: strings count bytes / 4, token ids 1 each, arrays their items.
fn input_tokens(input: &Value) -> u64 {
    match input {
        Value::String(s) => len_u64(s) / 4,
        Value::Number(_) => 1,
        Value::Array(items) => items.iter().map(input_tokens).sum(),
        _ => 0,
    }
}

/// How many embeddings an `input` asks for: one per string or token-id array.
fn embedding_count(input: Option<&Value>) -> usize {
    match input {
        Some(Value::Array(items)) if items.iter().any(|i| !i.is_number()) => items.len(),
        _ => 1,
    }
}

fn len_u64(s: &str) -> u64 {
    u64::try_from(s.len()).unwrap_or(u64::MAX)
}

/// Where a request goes, decided from method and path alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Completions,
    Embeddings,
    Models,
    Model,
    Health,
    Metrics,
    MethodNotAllowed,
    NotFound,
}

impl Route {
    fn of(method: &Method, path: &str) -> Self {
        // The API routes answer with or without the `/v1` prefix, like vLLM.
        let api = match path.strip_prefix("/v1") {
            Some(rest) if rest.starts_with('/') => rest,
            _ => path,
        };
        let (route, allowed) = match api {
            "/chat/completions" => (Self::Chat, Method::POST),
            "/completions" => (Self::Completions, Method::POST),
            "/embeddings" => (Self::Embeddings, Method::POST),
            "/models" => (Self::Models, Method::GET),
            _ if api.starts_with("/models/") => (Self::Model, Method::GET),
            _ => match path {
                "/health" => (Self::Health, Method::GET),
                "/metrics" => (Self::Metrics, Method::GET),
                _ => return Self::NotFound,
            },
        };
        if *method == allowed {
            route
        } else {
            Self::MethodNotAllowed
        }
    }

    fn is_inference(self) -> bool {
        matches!(self, Self::Chat | Self::Completions | Self::Embeddings)
    }
}

/// What the fault knobs make of one inference request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Answer,
    Fail(StatusCode),
}

/// Apply the fault knobs; `draw` is uniform in `[0, 1)`, so rate 1.0 always fires and 0.0 never.
fn decide(cfg: &MockConfig, draw: f64) -> Outcome {
    if let Some(code) = cfg.status_override {
        return Outcome::Fail(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        );
    }
    if cfg.fail_inference_only || draw < cfg.failure_rate {
        return Outcome::Fail(StatusCode::INTERNAL_SERVER_ERROR);
    }
    if draw < cfg.failure_rate + cfg.rate_limit_rate {
        return Outcome::Fail(StatusCode::TOO_MANY_REQUESTS);
    }
    Outcome::Answer
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // weir passes on up to 100 client headers and adds its own (the request
    // id, the coding): hyper's default of 100 would refuse such a request
    // with a bare 431 that no real engine sends.
    builder.http1().max_headers(128);
    loop {
        let stream = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(err) => {
                    // EMFILE and friends pass; ending the loop would turn a blip into an outage.
                    tracing::warn!(%err, addr = %shared.addr, "mock: accept failed");
                    tokio::select! {
                        () = shared.shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            },
        };
        // Streams are many tiny writes; Nagle would batch chunks and hide the pacing.
        let _ = stream.set_nodelay(true);
        let connection = OpenConnection::open(&shared);
        let builder = builder.clone();
        let conn_shared = shared.clone();
        shared.tasks.spawn(async move {
            let _connection = connection;
            let token = conn_shared.shutdown.clone();
            let service = service_fn(move |req| respond(conn_shared.clone(), req));
            tokio::select! {
                _ = builder.serve_connection(TokioIo::new(stream), service) => {}
                // Dropping the connection closes the socket: the mock dies abruptly, as a crashed
                // engine would, instead of draining.
                () = token.cancelled() => {}
            }
        });
    }
    shared.tasks.close();
}

async fn respond(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let cfg = shared.config.load_full();
    let route = Route::of(req.method(), req.uri().path());
    let in_flight = route.is_inference().then(|| InFlight::enter(&shared));
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<LengthLimitError>() => {
            return Ok(error(
                &cfg,
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
            ))
        }
        Err(err) => {
            return Ok(error(
                &cfg,
                StatusCode::BAD_REQUEST,
                &format!("reading request body: {err}"),
            ))
        }
    };
    if cfg.record {
        shared.record(&parts, &body);
    }
    if cfg.hang {
        // Holds the in-flight slot until the client or a shutdown drops this future.
        std::future::pending::<()>().await;
    }
    let response = match route {
        Route::Chat | Route::Completions | Route::Embeddings => {
            infer(&shared, &cfg, route, &body, in_flight).await
        }
        Route::Models => json_response(&cfg, StatusCode::OK, &models_json(&cfg)),
        Route::Model => {
            let id = parts
                .uri
                .path()
                .rsplit_once("/models/")
                .map_or("", |(_, id)| id);
            match cfg.models.iter().find(|m| *m == id) {
                Some(m) => json_response(&cfg, StatusCode::OK, &model_json(m)),
                None => error(
                    &cfg,
                    StatusCode::NOT_FOUND,
                    &format!("The model `{id}` does not exist."),
                ),
            }
        }
        Route::Health => {
            let status = cfg
                .health_status
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::OK);
            json_response(
                &cfg,
                status,
                &json!({"status": if status.is_success() { "ok" } else { "unhealthy" }}),
            )
        }
        Route::Metrics => {
            let mut response = text_response(
                &cfg,
                metrics_text(&cfg, shared.in_flight.load(Ordering::Relaxed)),
            );
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        Route::MethodNotAllowed => {
            error(&cfg, StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        Route::NotFound => error(
            &cfg,
            StatusCode::NOT_FOUND,
            &format!("no route for {}", parts.uri.path()),
        ),
    };
    Ok(response)
}

/// Answer a completion, chat or embeddings request.
async fn infer(
    shared: &Shared,
    cfg: &MockConfig,
    route: Route,
    body: &Bytes,
    in_flight: Option<InFlight>,
) -> Response<MockBody> {
    let req: InferenceRequest = match serde_json::from_slice(body) {
        Ok(req) => req,
        Err(err) => {
            return error(
                cfg,
                StatusCode::BAD_REQUEST,
                &format!("We could not parse the JSON body of your request: {err}"),
            )
        }
    };
    let Some(model) = req.model.clone() else {
        return error(
            cfg,
            StatusCode::BAD_REQUEST,
            "you must provide a model parameter",
        );
    };
    let draw = if cfg.failure_rate > 0.0 || cfg.rate_limit_rate > 0.0 {
        rand::random::<f64>()
    } else {
        1.0
    };
    if cfg.refuse_stream_options && req.stream_options.is_some() {
        return error(
            cfg,
            StatusCode::BAD_REQUEST,
            "Unrecognized request argument supplied: stream_options",
        );
    }
    let stream = req.stream.unwrap_or(false) && route != Route::Embeddings;
    if let Outcome::Fail(status) = decide(cfg, draw) {
        wait(cfg.latency).await;
        return failure(cfg, status);
    }
    let prompt_tokens = req.prompt_tokens();
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if route == Route::Embeddings {
        wait(cfg.latency).await;
        let body = embeddings_json(&model, req.input.as_ref(), prompt_tokens);
        return answer(cfg, &body, in_flight);
    }
    let limit = req.max_completion_tokens.or(req.max_tokens);
    let tokens = limit.map_or(cfg.chunks, |l| {
        u32::try_from(l).unwrap_or(u32::MAX).min(cfg.chunks)
    });
    let completion = Completion {
        chat: route == Route::Chat,
        id: if route == Route::Chat {
            format!("chatcmpl-mock-{id}")
        } else {
            format!("cmpl-mock-{id}")
        },
        created,
        model,
        prompt_tokens,
        tokens,
        finish_reason: if tokens < cfg.chunks {
            "length"
        } else {
            "stop"
        },
    };
    if stream {
        let include_usage = req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        return stream_response(cfg, &completion, include_usage, in_flight);
    }
    let generating = if cfg.pace_answers {
        token_interval(cfg)
            .saturating_mul(completion.tokens)
            .min(MAX_CHUNK_INTERVAL)
    } else {
        Duration::ZERO
    };
    wait(cfg.latency.saturating_add(generating)).await;
    answer(cfg, &completion.to_json(), in_flight)
}

/// The time one token takes at `tokens_per_sec`; zero when unpaced.
fn token_interval(cfg: &MockConfig) -> Duration {
    if cfg.tokens_per_sec.is_finite() && cfg.tokens_per_sec > 0.0 {
        Duration::try_from_secs_f64(1.0 / cfg.tokens_per_sec)
            .map_or(MAX_CHUNK_INTERVAL, |d| d.min(MAX_CHUNK_INTERVAL))
    } else {
        Duration::ZERO
    }
}

/// A non-stream 200: in flight until its body is sent, which a `stall_after` holds back whole
/// (its head, `content-length` included, goes out; the body never does).
fn answer(cfg: &MockConfig, body: &Value, in_flight: Option<InFlight>) -> Response<MockBody> {
    let mut response = json_response(cfg, StatusCode::OK, body);
    let body = response.body_mut();
    body._in_flight = in_flight;
    body.stall_at = cfg.stall_after.map(|_| 0);
    response
}

async fn wait(latency: Duration) {
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
}

/// Everything needed to render one completion, streamed or not.
struct Completion {
    chat: bool,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: u64,
    tokens: u32,
    finish_reason: &'static str,
}

impl Completion {
    fn text(&self) -> String {
        let mut text = String::new();
        for i in 0..self.tokens {
            let _ = write!(text, "{}", Token(i));
        }
        text
    }

    fn usage(&self) -> Value {
        let completion = u64::from(self.tokens);
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn to_json(&self) -> Value {
        if self.chat {
            json!({
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text(), "refusal": null},
                    "logprobs": null,
                    "finish_reason": self.finish_reason,
                }],
                "usage": self.usage(),
                "system_fingerprint": null,
            })
        } else {
            json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "text": self.text(),
                    "index": 0,
                    "logprobs": null,
                    "finish_reason": self.finish_reason,
                }],
                "usage": self.usage(),
                "system_fingerprint": null,
            })
        }
    }

    /// The SSE events OpenAI sends: one chunk per token (the first carries the role), a chunk
    /// with `finish_reason`, the usage chunk if asked for, `[DONE]`. With `include_usage` every
    /// chunk also carries `"usage": null`, as OpenAI's do.
    fn sse_frames(&self, include_usage: bool) -> VecDeque<Bytes> {
        let model = serde_json::to_string(&self.model).unwrap_or_else(|_| "\"\"".to_owned());
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let head = format!(
            r#"data: {{"id":"{}","object":"{object}","created":{},"model":{model},"system_fingerprint":null,"choices":["#,
            self.id, self.created
        );
        let tail = if include_usage {
            ",\"usage\":null}\n\n"
        } else {
            "}\n\n"
        };
        let choice = |content: &str, first: bool, finish: Option<&str>| -> String {
            let finish = finish.map_or_else(|| "null".to_owned(), |f| format!("\"{f}\""));
            if self.chat {
                let delta = match (first, content.is_empty()) {
                    (true, _) => format!(r#"{{"role":"assistant","content":"{content}"}}"#),
                    (false, true) => "{}".to_owned(),
                    (false, false) => format!(r#"{{"content":"{content}"}}"#),
                };
                format!(r#"{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}"#)
            } else {
                format!(
                    r#"{{"text":"{content}","index":0,"logprobs":null,"finish_reason":{finish}}}"#
                )
            }
        };
        let mut frames = VecDeque::with_capacity(self.tokens as usize + 3);
        for i in 0..self.tokens {
            let content = Token(i).to_string();
            frames.push_back(Bytes::from(format!(
                "{head}{}]{tail}",
                choice(&content, i == 0, None)
            )));
        }
        let last = choice("", self.tokens == 0, Some(self.finish_reason));
        frames.push_back(Bytes::from(format!("{head}{last}]{tail}")));
        if include_usage {
            frames.push_back(Bytes::from(format!(
                "{head}],\"usage\":{}}}\n\n",
                self.usage()
            )));
        }
        frames.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        frames
    }
}

/// The `i`th made-up token as it appears in the text: `tok0`, ` tok1`, ` tok2`…
struct Token(u32);

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == 0 {
            write!(f, "tok0")
        } else {
            write!(f, " tok{}", self.0)
        }
    }
}

fn stream_response(
    cfg: &MockConfig,
    completion: &Completion,
    include_usage: bool,
    in_flight: Option<InFlight>,
) -> Response<MockBody> {
    let interval = token_interval(cfg);
    let pacing = (!cfg.latency.is_zero() || !interval.is_zero()).then(|| {
        let now = Instant::now();
        // A latency too large for the clock means "never"; an hour is as good as never here.
        let first = now
            .checked_add(cfg.latency)
            .unwrap_or(now + MAX_CHUNK_INTERVAL);
        Pacing {
            first,
            interval,
            paced: completion.tokens,
            sleep: Box::pin(tokio::time::sleep_until(first)),
        }
    });
    let body = MockBody {
        frames: completion.sse_frames(include_usage),
        pacing,
        sent: 0,
        // Token chunks come first, so stalling at frame `n` sends `n` of them and never the
        // finish chunk, even when `n` is more than the completion has.
        stall_at: cfg.stall_after.map(|n| n.min(completion.tokens)),
        exact_length: false,
        _in_flight: in_flight,
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    name_header(cfg, headers);
    response
}

fn embeddings_json(model: &str, input: Option<&Value>, prompt_tokens: u64) -> Value {
    let data: Vec<Value> = (0..embedding_count(input))
        .map(|index| {
            // Deterministic, distinct per index, and of unit-ish size like real embeddings.
            let vector: Vec<f64> = (0..EMBEDDING_DIMS)
                .map(|d| ((index * EMBEDDING_DIMS + d) as f64 * 0.7).sin() * 0.35)
                .collect();
            json!({"object": "embedding", "index": index, "embedding": vector})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })
}

fn model_json(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 1_700_000_000u64, "owned_by": "weir-mock"})
}

fn models_json(cfg: &MockConfig) -> Value {
    let data: Vec<Value> = cfg.models.iter().map(|m| model_json(m)).collect();
    json!({"object": "list", "data": data})
}

/// vLLM's gauges, so weir's deep health tier can read this mock like an engine.
fn metrics_text(cfg: &MockConfig, in_flight: u64) -> String {
    let model = cfg.models.first().map_or(String::new(), |m| {
        m.replace('\\', "\\\\").replace('"', "\\\"")
    });
    let waiting = cfg.requests_waiting.unwrap_or(0);
    let kv = cfg
        .kv_cache_usage
        .unwrap_or_else(|| (in_flight as f64 * 0.01).min(1.0));
    let mut text = String::with_capacity(640);
    for (name, help, value) in [
        (
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            in_flight as f64,
        ),
        (
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            waiting as f64,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            kv,
        ),
    ] {
        let _ = write!(
            text,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{model_name=\"{model}\"}} {value:?}\n"
        );
    }
    text
}

/// An injected failure, shaped as OpenAI sends it.
fn failure(cfg: &MockConfig, status: StatusCode) -> Response<MockBody> {
    let mut response = match status {
        StatusCode::TOO_MANY_REQUESTS => {
            let body = error_json(
                "Rate limit reached for requests (mock).",
                "requests",
                Some("rate_limit_exceeded"),
            );
            json_response(cfg, status, &body)
        }
        StatusCode::INTERNAL_SERVER_ERROR => {
            let body = error_json(
                "The server had an error while processing your request (mock).",
                "server_error",
                None,
            );
            json_response(cfg, status, &body)
        }
        _ => error(
            cfg,
            status,
            &format!(
                "mock status override: {}",
                status.canonical_reason().unwrap_or("error")
            ),
        ),
    };
    // A 503 (overloaded) says when to come back too, as hosted APIs' do.
    if matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    ) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(cfg.retry_after));
    }
    response
}

/// An OpenAI error response whose `type` follows the status, as OpenAI's do.
fn error(cfg: &MockConfig, status: StatusCode, message: &str) -> Response<MockBody> {
    let (kind, code) = match status.as_u16() {
        401 => ("authentication_error", Some("invalid_api_key")),
        403 => ("permission_error", None),
        404 => ("not_found_error", None),
        429 => ("requests", Some("rate_limit_exceeded")),
        500..=599 => ("server_error", None),
        _ => ("invalid_request_error", None),
    };
    json_response(cfg, status, &error_json(message, kind, code))
}

fn error_json(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

fn json_response(cfg: &MockConfig, status: StatusCode, body: &Value) -> Response<MockBody> {
    // Serialising a `Value` cannot fail: its map keys are strings.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(MockBody::full(Bytes::from(bytes), None));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    name_header(cfg, response.headers_mut());
    response
}

fn text_response(cfg: &MockConfig, text: String) -> Response<MockBody> {
    let mut response = Response::new(MockBody::full(Bytes::from(text), None));
    name_header(cfg, response.headers_mut());
    response
}

fn name_header(cfg: &MockConfig, headers: &mut HeaderMap) {
    if cfg.name.is_empty() {
        return;
    }
    if let Ok(value) = HeaderValue::from_str(&cfg.name) {
        headers.insert("x-mock-name", value);
    }
}

/// Poisoning only means a test panicked while holding the lock; the data is still usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use hyper::client::conn::{http1, http2};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A response as a client saw it, with the arrival time of every SSE event.
    struct Reply {
        status: StatusCode,
        headers: HeaderMap,
        body: Vec<u8>,
        events: Vec<(Instant, String)>,
    }

    impl Reply {
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).expect("response body is JSON")
        }

        /// The `data:` payloads, `[DONE]` included.
        fn data(&self) -> Vec<&str> {
            self.events.iter().map(|(_, d)| d.as_str()).collect()
        }

        /// The JSON chunks, `[DONE]` excluded.
        fn chunks(&self) -> Vec<Value> {
            self.data()
                .into_iter()
                .filter(|d| *d != "[DONE]")
                .map(|d| serde_json::from_str(d).expect("chunk is JSON"))
                .collect()
        }

        fn header(&self, name: &str) -> &str {
            self.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        }
    }

    fn post(path: &str, body: Value) -> Request<Full<Bytes>> {
        Request::post(path)
            .header(header::HOST, "mock")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("valid request")
    }

    fn chat(body: Value) -> Request<Full<Bytes>> {
        post("/v1/chat/completions", body)
    }

    fn get(path: &str) -> Request<Full<Bytes>> {
        Request::get(path)
            .header(header::HOST, "mock")
            .body(Full::new(Bytes::new()))
            .expect("valid request")
    }

    /// One request on a fresh HTTP/1.1 connection.
    async fn send(mock: &MockHandle, req: Request<Full<Bytes>>) -> Reply {
        let stream = TcpStream::connect(mock.addr()).await.expect("connect");
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        read(sender.send_request(req).await.expect("response")).await
    }

    async fn read(response: Response<Incoming>) -> Reply {
        let (parts, mut body) = response.into_parts();
        let (mut bytes, mut events, mut pending) = (Vec::new(), Vec::new(), String::new());
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.expect("body frame").into_data() else {
                continue;
            };
            let at = Instant::now();
            bytes.extend_from_slice(&data);
            pending.push_str(std::str::from_utf8(&data).expect("utf-8 body"));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                if let Some(data) = event.trim_end().strip_prefix("data: ") {
                    events.push((at, data.to_owned()));
                }
            }
        }
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: bytes,
            events,
        }
    }

    /// Poll `check` until it holds, failing after a generous deadline.
    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(ms(5)).await;
        }
    }

    fn hello(extra: Value) -> Value {
        let mut body = json!({
            "model": "gpt-test",
            "messages": [{"role": "user", "content": "hello world!"}],
        });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        body
    }

    #[tokio::test]
    async fn chat_answers_in_openai_shape_with_predictable_usage() {
        let mock = MockConfig::new().name("b1").start().await.expect("start");

        let reply = send(&mock, chat(hello(json!({"max_tokens": 3})))).await;

        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("x-mock-name"), "b1");
        assert_eq!(reply.header("content-type"), "application/json");
        let body = reply.json();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], "gpt-test");
        assert!(body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-")));
        assert!(body["created"].is_u64());
        let choice = &body["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["content"], "tok0 tok1 tok2");
        assert_eq!(choice["finish_reason"], "length");
        // "hello world!" is 12 bytes: 12 / 4 + 4 per message.
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
        );
        assert_eq!(prompt_tokens(&reply_request_body(&mock)), Some(7));
        assert_eq!(mock.requests(), 1);
        eventually("in-flight back to 0", || mock.in_flight() == 0).await;
    }

    fn reply_request_body(mock: &MockHandle) -> Bytes {
        mock.last_inference().expect("a recorded request").body
    }

    #[tokio::test]
    async fn completion_length_is_chunks_unless_max_tokens_is_lower() {
        let mock = MockConfig::new().chunks(2).start().await.expect("start");

        let reply = send(&mock, chat(hello(json!({"max_completion_tokens": 10})))).await;

        let body = reply.json();
        assert_eq!(body["choices"][0]["message"]["content"], "tok0 tok1");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["completion_tokens"], 2);
    }

    #[tokio::test]
    async fn text_completions_and_embeddings_have_their_shapes() {
        let mock = MockConfig::new().chunks(2).start().await.expect("start");

        let text = send(
            &mock,
            post(
                "/v1/completions",
                json!({"model": "m", "prompt": "12345678"}),
            ),
        )
        .await
        .json();
        let embed = send(
            &mock,
            post(
                "/embeddings",
                json!({"model": "e", "input": ["abcd", "efgh"]}),
            ),
        )
        .await
        .json();

        assert_eq!(text["object"], "text_completion");
        assert_eq!(text["choices"][0]["text"], "tok0 tok1");
        assert_eq!(text["usage"]["prompt_tokens"], 2);
        assert_eq!(embed["object"], "list");
        assert_eq!(embed["model"], "e");
        assert_eq!(embed["data"].as_array().map(Vec::len), Some(2));
        assert_eq!(embed["data"][1]["index"], 1);
        assert_eq!(
            embed["data"][0]["embedding"].as_array().map(Vec::len),
            Some(EMBEDDING_DIMS)
        );
        assert_eq!(
            embed["usage"],
            json!({"prompt_tokens": 2, "total_tokens": 2})
        );
    }

    #[tokio::test]
    async fn stream_sends_token_chunks_then_finish_then_done() {
        let mock = MockConfig::new().chunks(3).start().await.expect("start");

        let reply = send(&mock, chat(hello(json!({"stream": true})))).await;

        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply
            .header("content-type")
            .starts_with("text/event-stream"));
        assert_eq!(reply.data().last(), Some(&"[DONE]"));
        let chunks = reply.chunks();
        assert_eq!(chunks.len(), 4, "3 tokens + finish: {:?}", reply.data());
        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], "gpt-test");
            assert_eq!(chunk["id"], chunks[0]["id"]);
            assert!(
                chunk.get("usage").is_none(),
                "no usage unless asked: {chunk}"
            );
        }
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": "tok0"})
        );
        assert_eq!(
            chunks[1]["choices"][0]["delta"],
            json!({"content": " tok1"})
        );
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(chunks[3]["choices"][0]["delta"], json!({}));
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    }

    #[tokio::test]
    async fn stream_sends_usage_chunk_only_with_include_usage() {
        let mock = MockConfig::new().chunks(3).start().await.expect("start");

        let reply = send(
            &mock,
            chat(hello(
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            )),
        )
        .await;

        let chunks = reply.chunks();
        assert_eq!(
            chunks.len(),
            5,
            "3 tokens + finish + usage: {:?}",
            reply.data()
        );
        for chunk in &chunks[..4] {
            assert_eq!(chunk["usage"], Value::Null);
        }
        let usage = &chunks[4];
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
        );
        assert_eq!(reply.data().last(), Some(&"[DONE]"));
    }

    #[tokio::test]
    async fn text_completion_stream_uses_text_completion_chunks() {
        let mock = MockConfig::new().chunks(2).start().await.expect("start");

        let reply = send(
            &mock,
            post(
                "/v1/completions",
                json!({"model": "m", "prompt": "hi", "stream": true}),
            ),
        )
        .await;

        let chunks = reply.chunks();
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0]["object"], "text_completion");
        assert_eq!(chunks[1]["choices"][0]["text"], " tok1");
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
    }

    #[tokio::test]
    async fn stream_chunks_are_paced_by_tokens_per_sec() {
        let mock = MockConfig::new()
            .chunks(5)
            .tokens_per_sec(50.0)
            .start()
            .await
            .expect("start");

        let reply = send(&mock, chat(hello(json!({"stream": true})))).await;

        // 5 tokens at 50/s: the 5th is due 4 × 20 ms = 80 ms after the first.
        let first = reply.events[0].0;
        let fifth = reply.events[4].0;
        assert!(
            fifth - first >= ms(60),
            "chunks not spread out: {:?}",
            fifth - first
        );
    }

    /// With `pace_answers`, a non-stream answer comes once its tokens are
    /// generated: 5 tokens at 50/s after the 30 ms latency, 130 ms in all.
    #[tokio::test]
    async fn paced_answers_wait_for_their_tokens() {
        let mock = MockConfig::new()
            .chunks(5)
            .tokens_per_sec(50.0)
            .latency(ms(30))
            .pace_answers(true)
            .start()
            .await
            .expect("start");
        let started = Instant::now();
        let reply = send(&mock, chat(hello(json!({})))).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(started.elapsed() >= ms(130), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn latency_delays_headers_and_first_chunk() {
        let mock = MockConfig::new()
            .latency(ms(100))
            .start()
            .await
            .expect("start");

        let started = Instant::now();
        let reply = send(&mock, chat(hello(json!({})))).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(started.elapsed() >= ms(90), "{:?}", started.elapsed());

        let started = Instant::now();
        let reply = send(&mock, chat(hello(json!({"stream": true})))).await;
        assert!(reply.events[0].0 - started >= ms(90));
    }

    #[tokio::test]
    async fn rate_limit_answers_429_with_retry_after() {
        let mock = MockConfig::new()
            .rate_limit(1.0, 7)
            .start()
            .await
            .expect("start");

        let reply = send(&mock, chat(hello(json!({})))).await;

        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(reply.header("retry-after"), "7");
        assert_eq!(reply.json()["error"]["code"], "rate_limit_exceeded");
        assert_eq!(reply.json()["error"]["type"], "requests");
    }

    #[tokio::test]
    async fn failure_rate_switches_at_runtime() {
        let mock = MockConfig::new()
            .failure_rate(1.0)
            .start()
            .await
            .expect("start");

        let failed = send(&mock, chat(hello(json!({})))).await;
        mock.update(|c| c.failure_rate = 0.0);
        let answered = send(&mock, chat(hello(json!({})))).await;

        assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(failed.json()["error"]["type"], "server_error");
        assert_eq!(answered.status, StatusCode::OK);
        assert_eq!(mock.requests(), 2);
    }

    #[test]
    fn fault_knobs_decide_outcome() {
        let check = |cfg: MockConfig, draw: f64, want: Outcome| {
            assert_eq!(decide(&cfg, draw), want, "{cfg:?} draw {draw}");
        };
        let fail = |s: u16| Outcome::Fail(StatusCode::from_u16(s).expect("valid status"));
        check(MockConfig::new(), 0.0, Outcome::Answer);
        check(MockConfig::new().failure_rate(1.0), 0.999, fail(500));
        check(MockConfig::new().failure_rate(0.3), 0.3, Outcome::Answer);
        check(
            MockConfig::new().failure_rate(0.3).rate_limit(0.2, 1),
            0.4,
            fail(429),
        );
        check(
            MockConfig::new().failure_rate(0.3).rate_limit(0.2, 1),
            0.5,
            Outcome::Answer,
        );
        check(
            MockConfig::new().status(400).failure_rate(1.0),
            0.0,
            fail(400),
        );
        check(MockConfig::new().fail_inference_only(true), 0.9, fail(500));
    }

    #[tokio::test]
    async fn status_override_and_fail_inference_only_leave_health_alone() {
        let mock = MockConfig::new().status(400).start().await.expect("start");

        let bad = send(&mock, chat(hello(json!({})))).await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert_eq!(bad.json()["error"]["type"], "invalid_request_error");
        assert_eq!(send(&mock, get("/health")).await.status, StatusCode::OK);

        mock.set_config(MockConfig::new().fail_inference_only(true));
        assert_eq!(
            send(&mock, chat(hello(json!({})))).await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let health = send(&mock, get("/health")).await;
        assert_eq!(health.status, StatusCode::OK);
        assert_eq!(health.json(), json!({"status": "ok"}));

        mock.update(|c| c.health_status = Some(503));
        assert_eq!(
            send(&mock, get("/health")).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn bad_json_and_unknown_routes_get_openai_errors() {
        let mock = start(MockConfig::default()).await.expect("start");

        let bad = send(
            &mock,
            Request::post("/v1/chat/completions")
                .header(header::HOST, "mock")
                .body(Full::new(Bytes::from_static(b"{not json")))
                .expect("valid request"),
        )
        .await;
        let no_model = send(&mock, chat(json!({"messages": []}))).await;
        let missing = send(&mock, get("/v1/nothing")).await;
        let wrong_method = send(&mock, get("/v1/chat/completions")).await;

        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert_eq!(bad.json()["error"]["type"], "invalid_request_error");
        assert_eq!(no_model.status, StatusCode::BAD_REQUEST);
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(missing.json()["error"]["message"].is_string());
    }

    #[tokio::test]
    async fn models_lists_configured_models() {
        let mock = MockConfig::new()
            .models(vec!["a".into(), "b".into()])
            .start()
            .await
            .expect("start");

        let list = send(&mock, get("/v1/models")).await.json();
        let one = send(&mock, get("/v1/models/b")).await;
        let none = send(&mock, get("/v1/models/zzz")).await;

        assert_eq!(list["object"], "list");
        assert_eq!(list["data"][0]["id"], "a");
        assert_eq!(list["data"][1]["object"], "model");
        assert_eq!(one.json()["id"], "b");
        assert_eq!(none.status, StatusCode::NOT_FOUND);
        assert_eq!(mock.requests(), 0, "only inference routes count");
    }

    /// A raw HTTP/1.1 client that asked `mock` for a streamed chat and has
    /// read until `until` appeared (its connection held open, unread after).
    async fn raw_stream_until(mock: &MockHandle, until: &str) -> TcpStream {
        let body = hello(json!({"stream": true})).to_string();
        let mut client = TcpStream::connect(mock.addr()).await.expect("connect");
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        client.write_all(request.as_bytes()).await.expect("write");
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains(until) {
            let mut buf = [0u8; 1024];
            let n = client.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before the first chunk");
            seen.extend_from_slice(&buf[..n]);
        }
        client
    }

    #[tokio::test]
    async fn in_flight_returns_to_zero_when_client_leaves_mid_stream() {
        // 100 tokens at 20/s: five seconds of stream, so the client surely leaves mid-way.
        let mock = MockConfig::new()
            .chunks(100)
            .tokens_per_sec(20.0)
            .start()
            .await
            .expect("start");
        let client = raw_stream_until(&mock, "data: ").await;
        assert_eq!(mock.in_flight(), 1);
        assert_eq!(mock.connections_open(), 1);

        drop(client);

        eventually("in-flight back to 0", || mock.in_flight() == 0).await;
        eventually("connection closed", || mock.connections_open() == 0).await;
        assert_eq!(mock.max_in_flight(), 1);
    }

    #[tokio::test]
    async fn metrics_report_in_flight_like_vllm() {
        let mock = MockConfig::new()
            .chunks(100)
            .tokens_per_sec(20.0)
            .requests_waiting(3)
            .start()
            .await
            .expect("start");
        let streaming = mock.clone();
        let stream =
            tokio::spawn(
                async move { send(&streaming, chat(hello(json!({"stream": true})))).await },
            );
        eventually("a stream in flight", || mock.in_flight() == 1).await;

        let metrics = send(&mock, get("/metrics")).await;

        let text = String::from_utf8(metrics.body.clone()).expect("utf-8");
        assert!(metrics.header("content-type").starts_with("text/plain"));
        assert!(
            text.contains("vllm:num_requests_running{model_name=\"mock-model\"} 1.0\n"),
            "{text}"
        );
        assert!(
            text.contains("vllm:num_requests_waiting{model_name=\"mock-model\"} 3.0\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE vllm:kv_cache_usage_perc gauge\n"),
            "{text}"
        );
        stream.abort();
    }

    #[tokio::test]
    async fn records_requests_with_headers_and_body() {
        let mock = MockConfig::new().start().await.expect("start");
        let mut req = chat(hello(json!({})));
        req.headers_mut()
            .insert("x-test", HeaderValue::from_static("abc"));

        send(&mock, req).await;
        send(&mock, get("/health?probe=1")).await;

        let recorded = mock.recorded();
        assert_eq!(recorded.len(), 2);
        assert_eq!(recorded[1].uri, "/health?probe=1");
        let chat = mock.last_inference().expect("recorded chat");
        assert_eq!(chat.method, Method::POST);
        assert_eq!(chat.uri, "/v1/chat/completions");
        assert_eq!(chat.headers["x-test"], "abc");
        assert_eq!(chat.body, Bytes::from(hello(json!({})).to_string()));

        mock.reset_stats();
        assert!(mock.recorded().is_empty());
        assert_eq!(mock.requests(), 0);
    }

    #[tokio::test]
    async fn keep_alive_reuses_one_connection() {
        let mock = MockConfig::new().start().await.expect("start");
        let stream = TcpStream::connect(mock.addr()).await.expect("connect");
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);

        for _ in 0..3 {
            let reply = read(
                sender
                    .send_request(chat(hello(json!({}))))
                    .await
                    .expect("response"),
            )
            .await;
            assert_eq!(reply.status, StatusCode::OK);
        }

        assert_eq!(mock.connections_accepted(), 1);
        assert_eq!(mock.requests(), 3);
    }

    #[tokio::test]
    async fn speaks_h2c() {
        let mock = MockConfig::new().chunks(2).start().await.expect("start");
        let stream = TcpStream::connect(mock.addr()).await.expect("connect");
        let (mut sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        let url = format!("http://{}/v1/chat/completions", mock.addr());

        let reply = read(
            sender
                .send_request(post(&url, hello(json!({"stream": true}))))
                .await
                .expect("response"),
        )
        .await;

        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.data().len(), 4);
    }

    #[tokio::test]
    async fn hang_holds_the_request_until_shutdown() {
        let mock = MockConfig::new().hang(true).start().await.expect("start");
        let hung = mock.clone();
        let waiting = tokio::spawn(async move {
            let stream = TcpStream::connect(hung.addr()).await.expect("connect");
            let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            sender
                .send_request(chat(hello(json!({}))))
                .await
                .map(|r| r.status())
        });
        eventually("the hung request in flight", || mock.in_flight() == 1).await;
        assert!(!waiting.is_finished());

        mock.shutdown();
        mock.stopped().await;

        let answer = waiting.await.expect("client task");
        assert!(answer.is_err(), "a hung request gets no answer: {answer:?}");
        assert_eq!(mock.in_flight(), 0);
        assert_eq!(mock.connections_open(), 0);
        assert!(
            TcpStream::connect(mock.addr()).await.is_err(),
            "listener closed"
        );
    }

    #[tokio::test]
    async fn in_flight_returns_to_zero_when_client_leaves_a_hung_request() {
        let mock = MockConfig::new().hang(true).start().await.expect("start");
        let body = hello(json!({})).to_string();
        let mut client = TcpStream::connect(mock.addr()).await.expect("connect");
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        client.write_all(request.as_bytes()).await.expect("write");
        eventually("the hung request in flight", || mock.in_flight() == 1).await;

        drop(client);

        eventually("in-flight back to 0", || mock.in_flight() == 0).await;
        eventually("connection closed", || mock.connections_open() == 0).await;
    }

    /// The events of `body` until `n` have come (frames may merge them), as text.
    async fn first_events(body: &mut Incoming, n: usize) -> String {
        let mut text = String::new();
        while text.matches("\n\n").count() < n {
            let frame = body.frame().await.expect("a frame").expect("a good frame");
            if let Ok(data) = frame.into_data() {
                text.push_str(std::str::from_utf8(&data).expect("utf-8"));
            }
        }
        text
    }

    /// On a paused clock the runtime moves time on only once no task can make progress, so
    /// anything the mock was going to send has been sent before this gives up.
    async fn nothing_more(body: &mut Incoming) {
        let more = tokio::time::timeout(Duration::from_secs(3600), body.frame()).await;
        assert!(more.is_err(), "the body went on: {more:?}");
    }

    /// A new HTTP/1.1 connection's sender.
    async fn connect(mock: &MockHandle) -> http1::SendRequest<Full<Bytes>> {
        let stream = TcpStream::connect(mock.addr()).await.expect("connect");
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        sender
    }

    #[tokio::test(start_paused = true)]
    async fn stall_after_sends_n_chunks_then_holds_the_stream_until_shutdown() {
        let mock = MockConfig::new()
            .chunks(5)
            .stall_after(2)
            .start()
            .await
            .expect("start");
        let mut sender = connect(&mock).await;

        let response = sender
            .send_request(chat(hello(json!({"stream": true}))))
            .await
            .expect("response head");
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let text = first_events(&mut body, 2).await;
        assert_eq!(text.matches("\n\n").count(), 2, "{text}");
        assert!(text.contains(r#""content":"tok0""#), "{text}");
        assert!(text.contains(r#""content":" tok1""#), "{text}");
        nothing_more(&mut body).await;
        assert_eq!(mock.in_flight(), 1);
        assert_eq!(mock.connections_open(), 1);

        mock.shutdown();
        tokio::time::timeout(Duration::from_secs(10), mock.stopped())
            .await
            .expect("a stalled stream does not hold the shutdown up");

        let end = body.frame().await;
        assert!(matches!(end, Some(Err(_))), "cut, not finished: {end:?}");
        assert_eq!(mock.in_flight(), 0);
        assert_eq!(mock.connections_open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn stall_after_past_the_last_token_still_holds_back_the_finish() {
        let mock = MockConfig::new()
            .chunks(2)
            .stall_after(10)
            .start()
            .await
            .expect("start");
        let mut sender = connect(&mock).await;

        let response = sender
            .send_request(chat(hello(json!({"stream": true}))))
            .await
            .expect("response head");
        let mut body = response.into_body();
        let text = first_events(&mut body, 2).await;
        nothing_more(&mut body).await;

        assert!(!text.contains("finish_reason\":\"stop"), "{text}");
        assert!(!text.contains("[DONE]"), "{text}");
        assert_eq!(mock.in_flight(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stall_after_set_on_a_running_mock_holds_a_plain_answer_after_its_head() {
        let mock = MockConfig::new().start().await.expect("start");
        assert_eq!(
            send(&mock, chat(hello(json!({})))).await.status,
            StatusCode::OK
        );

        mock.update(|c| c.stall_after = Some(3));
        let mut sender = connect(&mock).await;
        let response = sender
            .send_request(chat(hello(json!({}))))
            .await
            .expect("response head");
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers().contains_key(header::CONTENT_LENGTH),
            "{:?}",
            response.headers()
        );
        let mut body = response.into_body();
        nothing_more(&mut body).await;
        assert_eq!(mock.in_flight(), 1);

        // Probes and injected failures are answered whole beside it.
        assert_eq!(send(&mock, get("/health")).await.status, StatusCode::OK);
        mock.update(|c| c.failure_rate = 1.0);
        let failed = send(&mock, chat(hello(json!({})))).await;
        assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(failed.json()["error"]["type"], "server_error");
        mock.update(|c| {
            c.failure_rate = 0.0;
            c.stall_after = None;
        });
        let answered = send(&mock, chat(hello(json!({})))).await;
        assert_eq!(answered.json()["choices"][0]["finish_reason"], "stop");
        assert_eq!(mock.in_flight(), 1, "the stalled answer is still held");
    }

    #[tokio::test]
    async fn in_flight_returns_to_zero_when_client_leaves_a_stalled_stream() {
        let mock = MockConfig::new()
            .stall_after(1)
            .start()
            .await
            .expect("start");
        let client = raw_stream_until(&mock, "\n\n\r\n").await;
        assert_eq!(mock.in_flight(), 1);

        drop(client);

        eventually("in-flight back to 0", || mock.in_flight() == 0).await;
        eventually("connection closed", || mock.connections_open() == 0).await;
    }

    #[tokio::test]
    async fn serve_stops_when_shutdown_completes() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, MockConfig::new(), async {
            let _ = stopped.await;
        }));
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client
            .write_all(b"GET /health HTTP/1.1\r\nhost: mock\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 256];
        let n = client.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

        let _ = stop.send(());

        server.await.expect("serve task").expect("serve result");
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
