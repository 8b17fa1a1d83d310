//! The per-request access log line and the request metrics that are only
//! known when a request is over.
//!
//! One line per request at `info` (nginx's access log, as structured
//! fields): request id, method, path, model, backend, status, attempts,
//! queue wait, time to first byte, total time, prompt and completion tokens,
//! and how the response ended. For a proxied response that is when its body
//! ends (or the client goes away), not when its headers leave, so streams
//! report their real duration and token counts. No header value other than
//! the request id is ever logged, so no secret can reach a log line.

use std::time::Duration;

use http::{HeaderValue, Method, Uri};
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;

use std::sync::Arc;

use crate::{
    admission::tokens::Usage,
    metrics::{Metrics, RequestCounters},
    snapshot::BackendState,
};

/// How a response ended, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Sent in full.
    Complete,
    /// The upstream body failed or timed out mid-way.
    UpstreamError,
    /// The client went away before the end.
    ClientGone,
}

impl Ending {
    fn as_str(self) -> &'static str {
        match self {
            Ending::Complete => "complete",
            Ending::UpstreamError => "upstream_error",
            Ending::ClientGone => "client_gone",
        }
    }
}

/// A model's latency histograms, resolved once per model.
#[derive(Debug, Clone)]
pub(crate) struct ModelTimings {
    /// `weir_request_duration_seconds{model}`.
    pub duration: Histogram,
    /// `weir_time_to_first_byte_seconds{model}`.
    pub ttfb: Histogram,
}

/// Everything the access log line says about one request.
#[derive(Debug)]
pub(crate) struct AccessLog {
    /// The request id sent back in `x-request-id`.
    pub request_id: HeaderValue,
    /// The request method; `None` for a head that could not be parsed
    /// (logged as `-`, as nginx does).
    pub method: Option<Method>,
    /// The request target, of which the line shows the path (not the
    /// query string: it may carry tokens). Held as the client's `Uri`,
    /// which shares the request head's bytes, instead of a copy. `None`
    /// as for the method.
    pub uri: Option<Uri>,
    /// When weir started on the request.
    pub started: Instant,
    /// The client's model, once read.
    pub model: Option<String>,
    /// The backend that answered (shared, so that naming it costs a
    /// reference count rather than a copy of its name per request).
    pub backend: Option<Arc<BackendState>>,
    /// The status sent to the client.
    pub status: u16,
    /// Attempts made upstream.
    pub attempts: u32,
    /// Time spent waiting for admission.
    pub queued: Duration,
    /// Time until the first body byte left weir.
    pub ttfb: Option<Duration>,
    /// The usage the response reported.
    pub usage: Option<Usage>,
    /// The model's histograms, when the request named a routed model.
    pub timings: Option<ModelTimings>,
    /// The `weir_requests_total` handles to count this request with: the
    /// answering backend's, or the model's own-answer ones. A model name
    /// no route knows is counted as `model=""`, so clients cannot grow the
    /// metric's label set.
    pub counters: Option<Arc<RequestCounters>>,
}

impl AccessLog {
    /// A log for a request that just arrived.
    pub(crate) fn new(request_id: HeaderValue, method: Method, uri: Uri) -> Self {
        Self::with_target(request_id, Some(method), Some(uri))
    }

    /// The line of a request whose head could not be parsed (a refusal
    /// before any method or path was read): it is logged all the same,
    /// so malformed and smuggling attempts show in the access log.
    pub(crate) fn unparsed(request_id: HeaderValue) -> Self {
        Self::with_target(request_id, None, None)
    }

    fn with_target(request_id: HeaderValue, method: Option<Method>, uri: Option<Uri>) -> Self {
        Self {
            request_id,
            method,
            uri,
            started: Instant::now(),
            model: None,
            backend: None,
            status: 0,
            attempts: 0,
            queued: Duration::ZERO,
            ttfb: None,
            usage: None,
            timings: None,
            counters: None,
        }
    }

    /// The first body byte is leaving now.
    pub(crate) fn first_byte(&mut self) {
        if self.ttfb.is_none() {
            let ttfb = self.started.elapsed();
            self.ttfb = Some(ttfb);
            if let Some(t) = &self.timings {
                t.ttfb.observe(ttfb.as_secs_f64());
            }
        }
    }

    /// Writes the line and records the request's metrics.
    pub(crate) fn emit(self, metrics: &Metrics, ending: Ending) {
        let total = self.started.elapsed();
        if let Some(t) = &self.timings {
            t.duration.observe(total.as_secs_f64());
        }
        match &self.counters {
            Some(counters) => counters.inc(self.status),
            None if self.model.is_some() => metrics.unknown_model_requests.inc(self.status),
            None => {}
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        tracing::info!(
            request_id = self.request_id.to_str().unwrap_or(""),
            method = self.method.as_ref().map_or("-", Method::as_str),
            path = self.uri.as_ref().map_or("-", Uri::path),
            status = self.status,
            model = logged_model(self.model.as_deref().unwrap_or("")),
            backend = self.backend.as_ref().map_or("", |b| b.config.name.as_str()),
            attempts = self.attempts,
            queue_ms = ms(self.queued),
            ttfb_ms = self.ttfb.map(ms),
            total_ms = ms(total),
            prompt_tokens = self.usage.map(|u| u.prompt_tokens),
            completion_tokens = self.usage.map(|u| u.completion_tokens),
            ending = ending.as_str(),
            "request"
        );
    }
}
/// The most of a client's model name a log line shows: a client controls
/// it, and a 5 MB name (an unknown model, refused with 404) must not make
/// a 5 MB line that log shippers drop or split.
pub(crate) const MAX_LOGGED_MODEL: usize = 256;

/// `model` cut to [`MAX_LOGGED_MODEL`] bytes at a character boundary.
pub(crate) fn logged_model(model: &str) -> &str {
    if model.len() <= MAX_LOGGED_MODEL {
        return model;
    }
    let mut end = MAX_LOGGED_MODEL;
    while !model.is_char_boundary(end) {
        end -= 1;
    }
    model.get(..end).unwrap_or_default()
}
