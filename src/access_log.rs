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

use std::{net::SocketAddr, time::Duration};

use http::{HeaderValue, Method, Uri};
use tokio::time::Instant;

use crate::{
    admission::tokens::Usage,
    metrics::{LatencyHistogram, Metrics},
    snapshot::{Member, ModelRoute, Place, Snapshot},
};

/// How a response ended, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Sent in full.
    Complete,
    /// The upstream body failed mid-way, or the backend stayed silent for
    /// `first_byte_timeout`.
    UpstreamError,
    /// weir's own `request_timeout` passed mid-body: not the backend's
    /// failure (a backend sending steadily can be cut this way), so not
    /// logged as one.
    Timeout,
    /// The client went away before the end.
    ClientGone,
    /// weir cut it: `shutdown_grace` ran out before it ended.
    Shutdown,
}

impl Ending {
    fn as_str(self) -> &'static str {
        match self {
            Ending::Complete => "complete",
            Ending::UpstreamError => "upstream_error",
            Ending::Timeout => "timeout",
            Ending::ClientGone => "client_gone",
            Ending::Shutdown => "shutdown",
        }
    }
}

/// A model's latency histograms, resolved once per model; per lane, so
/// observing takes no lock.
#[derive(Debug, Clone)]
pub(crate) struct ModelTimings {
    /// `weir_request_duration_seconds{model}`.
    pub duration: LatencyHistogram,
    /// `weir_time_to_first_byte_seconds{model}`.
    pub ttfb: LatencyHistogram,
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
    /// The client's address and port, as nginx's `$remote_addr` (a refusal
    /// says whom it refused).
    pub client: SocketAddr,
    /// When weir started on the request.
    pub started: Instant,
    /// The client's model, once read.
    pub model: Option<String>,
    /// Where the request was routed, when it named a routed model: its
    /// route (whose latency histograms it is timed in) and, once a
    /// backend's answer goes to the client, that backend (named on the
    /// line, and whose `weir_requests_total` counts it; else the model's
    /// own-answer counters do). Resolved against the request's snapshot,
    /// which every caller of [`AccessLog::emit`] holds: the line keeps no
    /// handle of its own, each of which would be a reference count shared
    /// by every lane, taken and given back per request.
    pub place: Option<Place>,
    /// The status sent to the client.
    pub status: u16,
    /// Attempts made upstream.
    pub attempts: u32,
    /// Time spent waiting: for admission, and for a backend slot.
    pub queued: Duration,
    /// When the wait under way started, if one is: a request refused or
    /// left while it waits counts its wait too.
    waiting_since: Option<Instant>,
    /// Time until the first body byte left weir.
    pub ttfb: Option<Duration>,
    /// The usage the response reported.
    pub usage: Option<Usage>,
}

impl AccessLog {
    /// A log for a request that just arrived.
    pub(crate) fn new(
        request_id: HeaderValue,
        client: SocketAddr,
        method: Method,
        uri: Uri,
    ) -> Self {
        Self::with_target(request_id, client, Some(method), Some(uri))
    }

    /// The line of a request whose head could not be parsed (a refusal
    /// before any method or path was read): it is logged all the same,
    /// so malformed and smuggling attempts show in the access log.
    pub(crate) fn unparsed(request_id: HeaderValue, client: SocketAddr) -> Self {
        Self::with_target(request_id, client, None, None)
    }

    fn with_target(
        request_id: HeaderValue,
        client: SocketAddr,
        method: Option<Method>,
        uri: Option<Uri>,
    ) -> Self {
        Self {
            request_id,
            client,
            method,
            uri,
            started: Instant::now(),
            model: None,
            place: None,
            status: 0,
            attempts: 0,
            queued: Duration::ZERO,
            waiting_since: None,
            ttfb: None,
            usage: None,
        }
    }

    /// A wait (for admission, or for a backend slot) starts at `at`.
    pub(crate) fn wait_starts(&mut self, at: Instant) {
        self.waiting_since = Some(at);
    }

    /// The wait under way, if any, ends now and counts in `queue_ms`.
    pub(crate) fn wait_ends(&mut self) {
        if let Some(since) = self.waiting_since.take() {
            self.queued += since.elapsed();
        }
    }

    /// Admission took `queued` (measured by the limiter, which knows
    /// whether it waited): the wait started before it is over.
    pub(crate) fn admitted_after(&mut self, queued: Duration) {
        self.waiting_since = None;
        self.queued += queued;
    }

    /// Whether this was a request for the API (`/v1/...`), or one whose
    /// head could not be read, rather than for weir itself (`/healthz`,
    /// `/metrics`, `/admin/...`, whose scrapes and probes are not client
    /// traffic).
    fn is_api_request(&self) -> bool {
        self.uri.as_ref().is_none_or(|uri| {
            let path = uri.path();
            path == "/v1" || path.starts_with("/v1/")
        })
    }

    /// The model's histograms, when the request named a routed model.
    fn timings<'s>(&self, snapshot: Option<&'s Snapshot>) -> Option<&'s ModelTimings> {
        Some(&self.route(snapshot)?.timings)
    }

    /// The request's route, when it named a routed model.
    fn route<'s>(&self, snapshot: Option<&'s Snapshot>) -> Option<&'s ModelRoute> {
        snapshot?.route_at(self.place?)
    }

    /// The backend that answered, when one's answer went to the client.
    fn member<'s>(&self, snapshot: Option<&'s Snapshot>) -> Option<&'s Member> {
        snapshot?.member_at(self.place?)
    }

    /// The first body byte is leaving now; `snapshot` is the request's.
    pub(crate) fn first_byte(&mut self, snapshot: Option<&Snapshot>) {
        if self.ttfb.is_none() {
            let ttfb = self.started.elapsed();
            self.ttfb = Some(ttfb);
            if let Some(t) = self.timings(snapshot) {
                t.ttfb.observe(ttfb.as_secs_f64());
            }
        }
    }

    /// Writes the line and records the request's metrics; `snapshot` is
    /// the one the request was routed with (`None` for a request refused
    /// before it loaded one, which has no [`Place`]).
    pub(crate) fn emit(mut self, metrics: &Metrics, snapshot: Option<&Snapshot>, ending: Ending) {
        // A request that ends while it waits (refused, or its client
        // left) waited until now.
        self.wait_ends();
        let total = self.started.elapsed();
        if let Some(t) = self.timings(snapshot) {
            t.duration.observe(total.as_secs_f64());
        }
        let member = self.member(snapshot);
        // Counted under the answering backend, or as the model's own
        // answer. A model name no route knows is counted as `model=""`,
        // so clients cannot grow the metric's label set; so is an API
        // request refused before its model was read (a bad key, bad JSON,
        // a body too large, a malformed head), so floods of them show;
        // and so is weir's own answer to `GET /v1/models` (it names no
        // model). weir's other routes (`/healthz`, `/metrics`, `/admin`)
        // are not API traffic and are not counted.
        let counters = match member {
            Some(member) => Some(&member.requests),
            None => self.route(snapshot).map(|r| &r.own_answers),
        };
        match counters {
            Some(counters) => counters.inc(self.status),
            None if self.model.is_some() || self.is_api_request() => {
                metrics.unknown_model_requests.inc(self.status);
            }
            None => {}
        }
        // One division, so the figure prints as the exact microseconds
        // (`0.035142`, not `0.03514200000000001`).
        let ms = |d: Duration| d.as_nanos() as f64 / 1e6;
        tracing::info!(
            request_id = self.request_id.to_str().unwrap_or(""),
            client = %self.client,
            method = self.method.as_ref().map_or("-", Method::as_str),
            path = self.uri.as_ref().map_or("-", |uri| cut(uri.path(), MAX_LOGGED_PATH)),
            status = self.status,
            model = logged_model(self.model.as_deref().unwrap_or("")),
            backend = member.map_or("", |m| m.backend.config.name.as_str()),
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

/// The most of a request's path a log line shows: a 414's target may be
/// far longer than any real route.
const MAX_LOGGED_PATH: usize = 1024;

/// `model` cut to [`MAX_LOGGED_MODEL`] bytes at a character boundary.
pub(crate) fn logged_model(model: &str) -> &str {
    cut(model, MAX_LOGGED_MODEL)
}

/// `text` cut to at most `max` bytes at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> AccessLog {
        AccessLog::new(
            HeaderValue::from_static("id"),
            SocketAddr::from(([127, 0, 0, 1], 40000)),
            Method::POST,
            Uri::from_static("/v1/chat/completions"),
        )
    }

    /// `queue_ms` counts every wait: admission's, a backend slot's, and
    /// one still under way when the request ends (refused, or its client
    /// left while it waited).
    #[tokio::test(start_paused = true)]
    async fn every_wait_counts_in_queue_ms() {
        let mut log = line();
        log.wait_starts(Instant::now());
        log.admitted_after(Duration::from_millis(30));
        tokio::time::sleep(Duration::from_millis(5)).await;
        log.wait_ends();
        assert_eq!(log.queued, Duration::from_millis(30), "no wait under way");
        log.wait_starts(Instant::now());
        tokio::time::sleep(Duration::from_millis(200)).await;
        log.wait_ends();
        assert_eq!(
            log.queued,
            Duration::from_millis(230),
            "a backend slot's wait"
        );
        let mut refused = line();
        refused.wait_starts(Instant::now());
        tokio::time::sleep(Duration::from_millis(300)).await;
        refused.wait_ends();
        assert_eq!(
            refused.queued,
            Duration::from_millis(300),
            "refused after waiting"
        );
    }

    /// A line finds its route and answering backend in the request's
    /// snapshot: timed in its model's histograms, counted under the
    /// backend that answered or as the model's own answer, and a model no
    /// route knows under `model=""`.
    #[test]
    fn a_line_counts_where_its_place_in_the_snapshot_says() {
        let toml = "[[models]]\nname = \"m\"\n\n[[models]]\nname = \"n\"\n\n\
            [[backends]]\nname = \"b1\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\", \"n\"]\n\n\
            [[backends]]\nname = \"b2\"\nurl = \"http://127.0.0.1:2/v1\"\nmodels = [\"n\"]\n";
        let config = crate::config::Config::parse(toml, "t.toml", &|_| None).unwrap();
        let metrics = Metrics::new();
        let snapshot = Snapshot::build(std::sync::Arc::new(config), None, &metrics).unwrap();
        let (place, route) = snapshot.route("n").unwrap();
        assert_eq!(route.config.name, "n");
        let b2 = Place {
            member: Some(1),
            ..place
        };
        assert_eq!(snapshot.member_at(b2).unwrap().backend.config.name, "b2");
        assert!(snapshot.member_at(place).is_none());
        for (routed, status) in [(Some(place), 502), (Some(b2), 200), (None, 404)] {
            let mut log = line();
            log.model = Some(if routed.is_some() { "n" } else { "zz" }.to_owned());
            log.place = routed;
            log.status = status;
            log.emit(&metrics, Some(&snapshot), Ending::Complete);
        }
        let text = metrics.render();
        for expected in [
            "weir_requests_total{model=\"n\",backend=\"\",status=\"502\"} 1\n",
            "weir_requests_total{model=\"n\",backend=\"b2\",status=\"200\"} 1\n",
            "weir_requests_total{model=\"\",backend=\"\",status=\"404\"} 1\n",
            "weir_request_duration_seconds_count{model=\"n\"} 2\n",
        ] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
        assert!(
            !text.contains("model=\"m\",backend=\"b1\",status"),
            "{text}"
        );
    }

    #[test]
    fn a_long_model_name_is_cut_at_a_character_boundary() {
        assert_eq!(logged_model("m"), "m");
        let long = "é".repeat(200);
        let cut = logged_model(&long);
        assert!(cut.len() <= MAX_LOGGED_MODEL && cut.len() >= MAX_LOGGED_MODEL - 1);
        assert!(long.starts_with(cut));
    }

    /// A path is cut likewise, at [`MAX_LOGGED_PATH`] (a 414's 16 KB target
    /// was logged whole).
    #[test]
    fn a_long_path_is_cut_at_a_character_boundary() {
        let long = format!("/v1/{}", "y".repeat(16_000));
        assert_eq!(cut(&long, MAX_LOGGED_PATH), &long[..MAX_LOGGED_PATH]);
        let wide = "é".repeat(600);
        assert_eq!(cut(&wide, MAX_LOGGED_PATH).len(), MAX_LOGGED_PATH);
        assert_eq!(cut("/v1/models", MAX_LOGGED_PATH), "/v1/models");
    }
}
