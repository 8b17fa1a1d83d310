//! The OpenAI-compatible surface: what a request body says ([`facts`]) and
//! the one place where weir's errors become HTTP responses ([`ApiError`]).
//!
//! Every error weir itself produces is OpenAI-shaped,
//! `{"error": {"message", "type", "param", "code"}}`, so each OpenAI SDK raises
//! the matching exception (SPEC "Errors"). Lower layers return typed errors
//! and never build responses themselves.

pub mod facts;

use std::time::Duration;

use http::{header, HeaderName, HeaderValue, Response, StatusCode};

use crate::{
    admission::limiter::{AdmitError, LimitKind, RateHeaders},
    body::GatewayBody,
};

/// The OpenAI endpoint a proxied request names, which decides how its
/// body is read for admission: which length field bounds its completion,
/// whether a prompt array is a batch, whether it generates at all, and
/// whether `stream_options` exists there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions` (legacy).
    Completions,
    /// `/v1/responses`.
    Responses,
    /// `/v1/embeddings`: generates nothing.
    Embeddings,
    /// Any other `POST /v1/*`.
    Other,
}

impl Endpoint {
    /// The endpoint of `rest`, the client's path after `/v1`, as the
    /// backend's engine routes it: percent-decoded first, as uvicorn (vLLM,
    /// SGLang) does, so `/v1/%63ompletions` is `Completions` (the path
    /// itself goes upstream as the client sent it).
    pub fn of(rest: &str) -> Self {
        match &*percent_encoding::percent_decode_str(rest).decode_utf8_lossy() {
            "/chat/completions" => Endpoint::Chat,
            "/completions" => Endpoint::Completions,
            "/responses" => Endpoint::Responses,
            "/embeddings" => Endpoint::Embeddings,
            _ => Endpoint::Other,
        }
    }

    /// Whether OpenAI defines `stream_options` (and its usage chunk) here.
    pub fn has_stream_options(self) -> bool {
        matches!(self, Endpoint::Chat | Endpoint::Completions)
    }
}

/// `content-type` of every JSON body weir writes.
pub(crate) const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// What a request cut at the end of `shutdown_grace` is told: one not yet
/// answered in its 503 ([`ApiError::ShuttingDown`]), a stream in its SSE
/// `error` event.
pub(crate) const SHUTDOWN_MESSAGE: &str =
    "weir is shutting down and its shutdown grace ran out before this request was done; retry it";

/// An error weir answers itself, with everything its response needs.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not a JSON object weir can read (400 `invalid_json`).
    #[error("{0}")]
    InvalidJson(String),
    /// The body has no string `model` (400 `missing_model`).
    #[error("{0}")]
    MissingModel(String),
    /// The path is not one weir serves safely (400).
    #[error("invalid path: {0}")]
    BadPath(&'static str),
    /// The request's framing is ambiguous (SPEC "Framing"): 400, and the
    /// connection is closed, since where this request ends is unknown.
    #[error("invalid request framing: {0}")]
    BadFraming(&'static str),
    /// The request line is longer than weir reads (414).
    #[error("The request line is longer than {limit} bytes.")]
    UriTooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// The request headers are larger than weir reads (431).
    #[error("The request headers are larger than {limit} bytes in all.")]
    HeadersTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// More header fields than weir reads (431, as hyper answers it).
    #[error("The request has more than {limit} header fields.")]
    TooManyHeaders {
        /// The limit in fields.
        limit: usize,
    },
    /// The client's Bearer key is not one of `api_keys_env` (401).
    #[error("Incorrect API key provided.")]
    InvalidApiKey,
    /// `/admin/*` without the admin token `admin_token_env` names, or with
    /// another (401, with `WWW-Authenticate: Bearer`, RFC 6750).
    #[error("a valid admin token is required (Authorization: Bearer)")]
    AdminUnauthorized,
    /// `/admin/*` from a client that may not use it: not on loopback, when
    /// no admin token is set (403).
    #[error("{0}")]
    AdminForbidden(&'static str),
    /// No backend serves the model (404 `model_not_found`). The name is
    /// the client's: quoted only up to 256 bytes.
    #[error(
        "The model `{}` does not exist or you do not have access to it.",
        crate::access_log::logged_model(.0)
    )]
    ModelNotFound(String),
    /// No such route (404).
    #[error("Invalid URL ({method} {path})")]
    UnknownRoute {
        /// The request method.
        method: String,
        /// The request path.
        path: String,
    },
    /// The route exists but not for this method (405).
    #[error("Method {method} is not allowed on this route")]
    MethodNotAllowed {
        /// The request's method.
        method: String,
        /// The route's methods, for the `Allow` header RFC 9110 asks of a 405.
        allow: &'static str,
    },
    /// The body is larger than `max_body_bytes` (413).
    #[error("Request body is larger than the limit of {limit} bytes.")]
    BodyTooLarge {
        /// `server.max_body_bytes`.
        limit: usize,
    },
    /// The client did not send its whole body within `request_timeout`:
    /// 504 `upstream_timeout`, as SPEC's table has it for `request_timeout`
    /// (SPEC "Slow clients": a stalled body counts against it).
    #[error("The request body was not received within request_timeout.")]
    BodyTimeout,
    /// The body waited for room in `server.max_buffered_body_bytes` (other
    /// requests' bodies held it all) until `request_timeout` passed: 504,
    /// as [`ApiError::BodyTimeout`], saying why.
    #[error("The request body could not be read within request_timeout: the memory weir keeps for request bodies (server.max_buffered_body_bytes) stayed full.")]
    BodyRoomTimeout,
    /// An HTTP/2 body found no room in `server.max_buffered_body_bytes`
    /// (it may not wait: see `proxy::read_body`): 503 `body_memory_full`
    /// with `Retry-After: 1`, which OpenAI's SDKs retry.
    #[error("The memory weir keeps for request bodies (server.max_buffered_body_bytes) is full; try again shortly.")]
    BodyMemoryFull,
    /// The client's body could not be read (400).
    #[error("The request body could not be read: {0}")]
    BodyRead(String),
    /// The client left before its body ended (its connection closed or
    /// reset, its HTTP/2 stream reset): a 400 `invalid_body`, which only a
    /// client that half-closed and still reads receives; its log line has
    /// nginx's 499 and `ending="client_gone"` (`server::route`).
    #[error(
        "The request body ended before its length: the client closed its side of the connection."
    )]
    ClientGone,
    /// A request larger than a token bucket can ever hold (413).
    #[error("{0}")]
    TooManyTokens(String),
    /// A rate limit would not admit the request within `queue_timeout`
    /// (429; `type` is `requests` or `tokens`).
    #[error("{message}")]
    RateLimited {
        /// OpenAI's wording: which limit, its value, when to come back.
        message: String,
        /// `requests` or `tokens`.
        kind: &'static str,
        /// The exact wait; `Retry-After` rounds it up to whole seconds.
        retry_after: Duration,
        /// `x-ratelimit-*` values, when a bucket applies.
        headers: RateHeaders,
    },
    /// Every attempt failed (502 `bad_gateway`).
    #[error("Every attempt to reach a backend for model `{model}` failed: {detail}")]
    BadGateway {
        /// The client's model.
        model: String,
        /// The last attempt's failure, without secrets.
        detail: String,
        /// When the last attempt was a backend's 429 and every backend is
        /// held out by the clock: until the first is back, sent as
        /// `Retry-After` so a client does not come back before weir can
        /// serve it.
        retry_after: Option<Duration>,
    },
    /// No backend of the model is in rotation (503 `no_healthy_backend`).
    #[error("No backend for model `{model}` is available right now.")]
    NoHealthyBackend {
        /// The client's model.
        model: String,
        /// When the first backend is back by the clock alone (every one
        /// is held out by a 429's `Retry-After` or an ejection): sent as
        /// `Retry-After`, so a client comes back when weir will serve.
        retry_after: Option<Duration>,
    },
    /// `first_byte_timeout` or `request_timeout` passed (504); the message
    /// names which, with its configured value.
    #[error("The upstream did not answer within {limit} ({after:?}).")]
    UpstreamTimeout {
        /// `first_byte_timeout` or `request_timeout`.
        limit: &'static str,
        /// Its value.
        after: Duration,
    },
    /// `request_timeout` would pass before another attempt could start,
    /// with attempts left (504, SPEC "Timeouts": time ran out, not
    /// attempts); the message says what the last attempt met.
    #[error("The upstream did not answer within request_timeout ({after:?}): too little of it was left to try again after the last failure ({detail}).")]
    NoTimeToRetry {
        /// `request_timeout`.
        after: Duration,
        /// The last attempt's failure, without secrets.
        detail: String,
        /// As [`ApiError::BadGateway`]'s: when the last attempt was a
        /// backend's 429 and every backend is held out by the clock (the
        /// wait that did not fit in `request_timeout`), until the first is
        /// back.
        retry_after: Option<Duration>,
    },
    /// `shutdown_grace` ran out (or a second signal ended it) while the
    /// request still waited: for its body, admission, a backend slot or
    /// the backend's answer (503 `shutting_down`, and the connection
    /// closes). OpenAI's SDKs retry a 503, on a new connection.
    #[error("{}", SHUTDOWN_MESSAGE)]
    ShuttingDown,
    /// A bug or an unexpected internal failure (500).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// Status, OpenAI `type` and `code` of this error (SPEC "Errors").
    fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        use ApiError::*;
        match self {
            InvalidJson(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("invalid_json"),
            ),
            MissingModel(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("missing_model"),
            ),
            BadPath(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("invalid_path"),
            ),
            BadFraming(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("invalid_framing"),
            ),
            UriTooLong { .. } => (
                StatusCode::URI_TOO_LONG,
                "invalid_request_error",
                Some("uri_too_long"),
            ),
            HeadersTooLarge { .. } | TooManyHeaders { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "invalid_request_error",
                Some("headers_too_large"),
            ),
            BodyRead(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("invalid_body"),
            ),
            ClientGone => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("invalid_body"),
            ),
            InvalidApiKey => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                Some("invalid_api_key"),
            ),
            AdminUnauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                Some("invalid_admin_token"),
            ),
            AdminForbidden(_) => (StatusCode::FORBIDDEN, "permission_error", Some("forbidden")),
            ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            UnknownRoute { .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("unknown_url"),
            ),
            MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                Some("method_not_allowed"),
            ),
            TooManyTokens(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
            ),
            RateLimited { kind, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                kind,
                Some("rate_limit_exceeded"),
            ),
            BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
            ),
            BodyTimeout | BodyRoomTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                Some("upstream_timeout"),
            ),
            BadGateway { .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                Some("bad_gateway"),
            ),
            NoHealthyBackend { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                Some("no_healthy_backend"),
            ),
            UpstreamTimeout { .. } | NoTimeToRetry { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                Some("upstream_timeout"),
            ),
            ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                Some("shutting_down"),
            ),
            BodyMemoryFull => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                Some("body_memory_full"),
            ),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                Some("internal_error"),
            ),
        }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// Whether the connection should be closed after answering: the request
    /// body was not (fully) read, so the connection cannot be reused safely,
    /// or weir is stopping.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ApiError::BodyTooLarge { .. }
                | ApiError::BodyTimeout
                | ApiError::BodyRoomTimeout
                | ApiError::BodyRead(_)
                | ApiError::ClientGone
                | ApiError::BadFraming(_)
                | ApiError::UriTooLong { .. }
                | ApiError::HeadersTooLarge { .. }
                | ApiError::TooManyHeaders { .. }
                | ApiError::ShuttingDown
        )
    }

    /// The OpenAI-shaped response for this error.
    pub fn into_response(self) -> Response<GatewayBody> {
        let (status, kind, code) = self.parts();
        let body = serde_json::json!({
            "error": { "message": self.to_string(), "type": kind, "param": null, "code": code }
        });
        let mut response = Response::new(GatewayBody::full(body.to_string()));
        *response.status_mut() = status;
        response.headers_mut().insert(header::CONTENT_TYPE, JSON);
        // When weir knows when the client should come back: a 429's exact
        // wait, or a 503's until the first backend is back.
        let (retry_after, rate) = match &self {
            ApiError::RateLimited {
                retry_after,
                headers,
                ..
            } => (Some(*retry_after), Some(headers)),
            ApiError::NoHealthyBackend { retry_after, .. }
            | ApiError::BadGateway { retry_after, .. }
            | ApiError::NoTimeToRetry { retry_after, .. } => (*retry_after, None),
            ApiError::BodyMemoryFull => (Some(Duration::from_secs(1)), None),
            _ => (None, None),
        };
        if let Some(wait) = retry_after {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(wait)),
            );
        }
        if let Some(headers) = rate {
            insert_rate_headers(response.headers_mut(), headers);
        }
        if let ApiError::MethodNotAllowed { allow, .. } = &self {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if let ApiError::AdminUnauthorized = &self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.closes_connection() {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<AdmitError> for ApiError {
    fn from(e: AdmitError) -> Self {
        match e {
            AdmitError::TooLarge {
                model,
                estimate,
                capacity,
                global,
            } => {
                // A model without its own limit is held to the global one:
                // the message must not pass that off as the model's.
                let scope = if global { "global " } else { "" };
                ApiError::TooManyTokens(format!(
                    "Request too large for model `{model}`: it needs an estimated {estimate} tokens, more than the {scope}limit of {capacity} tokens per min can ever hold. Reduce the prompt or max_tokens."
                ))
            }
            AdmitError::RateLimited {
                model,
                kind,
                global,
                limit,
                wait,
                mut headers,
            } => {
                // SPEC "Precise points": on a 429 the refused kind's
                // `x-ratelimit-reset-*` carries the exact wait that
                // `Retry-After` rounds up (elsewhere: until the bucket is full).
                let refused = match kind {
                    LimitKind::Tokens => &mut headers.tokens,
                    _ => &mut headers.requests,
                };
                if let Some(state) = refused {
                    state.reset = wait;
                }
                let what = if kind == LimitKind::Tokens {
                    "tokens"
                } else {
                    "requests"
                };
                let scope = if global { "global " } else { "" };
                ApiError::RateLimited {
                    message: format!(
                        "Rate limit reached for model {model} on {scope}{what} per min: limit {limit}. Please try again in {}.",
                        format_duration(wait)
                    ),
                    kind: what,
                    retry_after: wait,
                    headers,
                }
            }
            AdmitError::Saturated {
                model,
                kind,
                limit,
                bucket_wait,
            } => {
                let what = if kind == LimitKind::Queue && limit == 0 {
                    "max_queue: 0, so no request may wait".to_owned()
                } else if kind == LimitKind::Queue {
                    format!("max_queue: {limit} requests are already waiting")
                } else {
                    format!("max_concurrent: limit {limit} requests in flight")
                };
                // Refused a wait for a bucket: when the buckets would have
                // covered it is known exactly.
                let (retry_after, headers) =
                    bucket_wait.unwrap_or((Duration::from_secs(1), RateHeaders::default()));
                ApiError::RateLimited {
                    message: format!(
                        "Rate limit reached for model {model} on {what}. Please try again in {}.",
                        format_duration(retry_after)
                    ),
                    kind: "requests",
                    retry_after,
                    headers,
                }
            }
        }
    }
}

/// `Retry-After` in whole seconds: the exact wait rounded up, at least 1
/// (SPEC "Precise points").
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// OpenAI's duration format for `x-ratelimit-reset-*` and messages:
/// `120ms`, `1.2s`, `6m0s`, `1h40m0s`.
pub fn format_duration(d: Duration) -> String {
    let mut out = Vec::with_capacity(8);
    push_duration(d, &mut out);
    // Digits and unit letters only: always valid UTF-8.
    String::from_utf8_lossy(&out).into_owned()
}

/// Appends `d` in [`format_duration`]'s format, without a temporary.
fn push_duration(d: Duration, out: &mut Vec<u8>) {
    let mut digits = itoa::Buffer::new();
    if d.as_secs() == 0 {
        // Under a second: milliseconds, in 32 bits (`as_millis` is a u128).
        // Round sub-millisecond waits up, so "0ms" never tells a client to
        // retry when it would still be refused.
        let ms = d.subsec_millis() + u32::from(!d.subsec_nanos().is_multiple_of(1_000_000));
        if ms == 1000 {
            // 999.x ms rounded up is a whole second: "1s", not "1000ms".
            out.extend_from_slice(b"1s");
            return;
        }
        out.extend_from_slice(digits.format(ms).as_bytes());
        out.extend_from_slice(b"ms");
        return;
    }
    let total_secs = d.as_secs();
    let tenths = d.subsec_nanos().div_ceil(100_000_000);
    let (secs, tenths) = if tenths == 10 {
        (total_secs + 1, 0)
    } else {
        (total_secs, tenths)
    };
    // Go's duration style, as OpenAI's headers are: hours once there is
    // one (`1h40m0s`, not `100m0s`), and then minutes even when 0.
    let (hours, minutes, secs) = (secs / 3600, secs / 60 % 60, secs % 60);
    if hours > 0 {
        out.extend_from_slice(digits.format(hours).as_bytes());
        out.push(b'h');
    }
    if hours > 0 || minutes > 0 {
        out.extend_from_slice(digits.format(minutes).as_bytes());
        out.push(b'm');
    }
    out.extend_from_slice(digits.format(secs).as_bytes());
    if tenths > 0 {
        out.push(b'.');
        out.extend_from_slice(digits.format(tenths).as_bytes());
    }
    out.push(b's');
}

/// The `x-ratelimit-*` names, per kind: limit, remaining, reset.
const RATE_HEADER_NAMES: [[HeaderName; 3]; 2] = [
    [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ],
];

/// Inserts the `x-ratelimit-*` headers OpenAI clients read; a kind without
/// a limit sends none (SPEC "Precise points"). The values are written into
/// one buffer and handed out as slices of it, instead of one allocation per
/// value. (Proxied HTTP/1.1 responses skip the map: [`write_rate_headers`].)
pub(crate) fn insert_rate_headers(h: &mut http::HeaderMap, headers: &RateHeaders) {
    let (text, ends) = render_rate_values(headers);
    let text = bytes::Bytes::from(text);
    each_rate_header(headers, &ends, |name, range| {
        if let Ok(value) = HeaderValue::from_maybe_shared(text.slice(range)) {
            h.insert(name, value);
        }
    });
}

/// Appends the `x-ratelimit-*` header lines to an HTTP/1.1 response head
/// being written, without a header map: every proxied response carries six
/// of them, and inserting them into the map cost more than the rest of the
/// response head.
pub(crate) fn write_rate_headers(out: &mut Vec<u8>, headers: &RateHeaders) {
    let mut digits = itoa::Buffer::new();
    for (state, [limit, remaining, reset]) in [headers.requests, headers.tokens]
        .iter()
        .zip(&RATE_HEADER_LINES)
    {
        let Some(state) = state else { continue };
        for (line, value) in [(limit, state.limit), (remaining, state.remaining)] {
            out.extend_from_slice(line);
            out.extend_from_slice(digits.format(value).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(reset);
        push_duration(state.reset, out);
        out.extend_from_slice(b"\r\n");
    }
}

/// [`RATE_HEADER_NAMES`] as the starts of their header lines, `name: `
/// (one copy each instead of two).
const RATE_HEADER_LINES: [[&[u8]; 3]; 2] = [
    [
        b"x-ratelimit-limit-requests: ",
        b"x-ratelimit-remaining-requests: ",
        b"x-ratelimit-reset-requests: ",
    ],
    [
        b"x-ratelimit-limit-tokens: ",
        b"x-ratelimit-remaining-tokens: ",
        b"x-ratelimit-reset-tokens: ",
    ],
];

/// Whether weir writes a header named `name` (any case) from `headers`: a
/// backend's own `x-ratelimit-*` of that name is then left out, so the
/// client reads one value, weir's.
pub(crate) fn writes_rate_header(headers: &RateHeaders, name: &[u8]) -> bool {
    const PREFIX: &[u8] = b"x-ratelimit-";
    if name.len() <= PREFIX.len() || !name[..PREFIX.len()].eq_ignore_ascii_case(PREFIX) {
        return false;
    }
    [headers.requests.is_some(), headers.tokens.is_some()]
        .into_iter()
        .zip(&RATE_HEADER_NAMES)
        .any(|(applies, names)| {
            applies
                && names
                    .iter()
                    .any(|n| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
        })
}

/// The `x-ratelimit-*` values one after the other, and where each ends.
fn render_rate_values(headers: &RateHeaders) -> (Vec<u8>, [[usize; 3]; 2]) {
    let mut text = Vec::with_capacity(96);
    let mut ends = [[0usize; 3]; 2];
    let mut digits = itoa::Buffer::new();
    for (state, ends) in [headers.requests, headers.tokens].iter().zip(&mut ends) {
        let Some(state) = state else { continue };
        text.extend_from_slice(digits.format(state.limit).as_bytes());
        ends[0] = text.len();
        text.extend_from_slice(digits.format(state.remaining).as_bytes());
        ends[1] = text.len();
        push_duration(state.reset, &mut text);
        ends[2] = text.len();
    }
    (text, ends)
}

/// Calls `f` with each header name that applies and its value's range in
/// the rendered text.
fn each_rate_header(
    headers: &RateHeaders,
    ends: &[[usize; 3]; 2],
    mut f: impl FnMut(HeaderName, std::ops::Range<usize>),
) {
    let states = [headers.requests, headers.tokens];
    let mut start = 0;
    for ((state, names), ends) in states.iter().zip(RATE_HEADER_NAMES).zip(ends) {
        if state.is_none() {
            continue;
        }
        for (name, &end) in names.into_iter().zip(ends) {
            f(name, start..end);
            start = end;
        }
    }
}

impl From<facts::FactsError> for ApiError {
    fn from(e: facts::FactsError) -> Self {
        match e {
            facts::FactsError::MissingModel | facts::FactsError::DuplicateModel => {
                ApiError::MissingModel(e.to_string())
            }
            other => ApiError::InvalidJson(other.to_string()),
        }
    }
}

/// A 200 JSON response from a pre-rendered body.
pub(crate) fn json_response(
    status: StatusCode,
    body: impl Into<bytes::Bytes>,
) -> Response<GatewayBody> {
    let mut response = Response::new(GatewayBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, JSON);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_is_read_as_the_engines_route_it() {
        for (rest, endpoint) in [
            ("/chat/completions", Endpoint::Chat),
            ("/completions", Endpoint::Completions),
            ("/%63ompletions", Endpoint::Completions),
            ("/chat%2Fcompletions", Endpoint::Chat),
            ("/responses", Endpoint::Responses),
            ("/embeddings", Endpoint::Embeddings),
            ("/messages", Endpoint::Other),
            ("/completions/x", Endpoint::Other),
        ] {
            assert_eq!(Endpoint::of(rest), endpoint, "{rest}");
        }
        assert!(Endpoint::Chat.has_stream_options() && Endpoint::Completions.has_stream_options());
        assert!(!Endpoint::Responses.has_stream_options() && !Endpoint::Other.has_stream_options());
    }

    #[test]
    fn rate_header_lines_start_with_the_rate_header_names() {
        for (lines, names) in RATE_HEADER_LINES.iter().zip(&RATE_HEADER_NAMES) {
            for (line, name) in lines.iter().zip(names) {
                assert_eq!(*line, format!("{name}: ").as_bytes());
            }
        }
    }

    #[test]
    fn durations_in_openai_format() {
        let ms = Duration::from_millis;
        assert_eq!(format_duration(ms(120)), "120ms");
        assert_eq!(format_duration(Duration::from_micros(1)), "1ms");
        assert_eq!(format_duration(ms(1200)), "1.2s");
        assert_eq!(format_duration(ms(6500)), "6.5s");
        assert_eq!(format_duration(ms(1000)), "1s");
        assert_eq!(format_duration(Duration::from_micros(999_500)), "1s");
        assert_eq!(format_duration(ms(999)), "999ms");
        assert_eq!(format_duration(ms(1201)), "1.3s");
        assert_eq!(format_duration(ms(360_000)), "6m0s");
        assert_eq!(format_duration(ms(3_599_000)), "59m59s");
        assert_eq!(format_duration(ms(3_600_000)), "1h0m0s");
        assert_eq!(format_duration(ms(6_000_000)), "1h40m0s");
        assert_eq!(format_duration(ms(3_605_500)), "1h0m5.5s");
        assert_eq!(format_duration(ms(90_000_000)), "25h0m0s");
        assert_eq!(retry_after_secs(ms(1)), 1);
        assert_eq!(retry_after_secs(ms(1000)), 1);
        assert_eq!(retry_after_secs(ms(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[test]
    fn every_error_is_openai_shaped() {
        let cases = [
            (
                ApiError::InvalidJson("x".into()),
                400,
                "invalid_request_error",
                "invalid_json",
            ),
            (
                ApiError::MissingModel("x".into()),
                400,
                "invalid_request_error",
                "missing_model",
            ),
            (
                ApiError::InvalidApiKey,
                401,
                "authentication_error",
                "invalid_api_key",
            ),
            (
                ApiError::ModelNotFound("m".into()),
                404,
                "invalid_request_error",
                "model_not_found",
            ),
            (
                ApiError::BodyTooLarge { limit: 1 },
                413,
                "invalid_request_error",
                "request_too_large",
            ),
            (
                ApiError::BadGateway {
                    model: "m".into(),
                    detail: "d".into(),
                    retry_after: None,
                },
                502,
                "upstream_error",
                "bad_gateway",
            ),
            (
                ApiError::NoHealthyBackend {
                    model: "m".into(),
                    retry_after: None,
                },
                503,
                "service_unavailable",
                "no_healthy_backend",
            ),
            (
                ApiError::ShuttingDown,
                503,
                "service_unavailable",
                "shutting_down",
            ),
            (
                ApiError::UpstreamTimeout {
                    limit: "first_byte_timeout",
                    after: Duration::from_secs(1),
                },
                504,
                "timeout",
                "upstream_timeout",
            ),
        ];
        for (error, status, kind, code) in cases {
            let (s, k, c) = error.parts();
            assert_eq!((s.as_u16(), k, c), (status, kind, Some(code)), "{error:?}");
        }
    }
}
