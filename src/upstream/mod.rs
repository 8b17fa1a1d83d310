//! The clients that talk to backends.
//!
//! Only this module opens upstream connections. Each backend gets its own
//! client, so its `connect_timeout` applies and its pool of keep-alive
//! connections survives a reload that keeps the backend (the client lives in
//! the backend's carried-over state).
//!
//! * plain `http://` backends (inference servers beside weir, the hot path)
//!   use [`conn`]: HTTP/1.1 driven by the request's own task, the response
//!   body read straight from the backend's socket, idle connections in a
//!   [`pool`]. [`codec`] is its wire format.
//! * `https://` backends (hosted APIs) use hyper-util's pooled client with
//!   rustls (`ring` provider, webpki roots: weir needs neither OpenSSL nor
//!   the system's certificate store), which also speaks HTTP/2 where the
//!   server offers it. Private CAs are trusted beside the webpki roots
//!   through OpenSSL's `SSL_CERT_FILE` and `SSL_CERT_DIR`, read again at
//!   each reload ([`trust`]).
//!
//! It does not decide what to retry: it reports *how* an attempt failed
//! ([`AttemptError`]) and `proxy` decides from that alone. [`retry_after`]
//! reads a backend's `Retry-After` for the proxy and the health probes alike.

pub(crate) mod codec;
mod conn;
mod pool;
mod resolve;
pub(crate) mod retry_after;
mod tracked;
pub(crate) mod trust;

use resolve::HostResolver;

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{uri::Scheme, HeaderValue, Method, Request, Response, Uri};

use crate::{headers::Upstream, metrics::FailureKind};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};

pub(crate) use conn::PlainClient;

/// A backend's client, by the scheme of its URL.
#[derive(Debug, Clone)]
pub(crate) enum HttpClient {
    /// `http://`: weir's own HTTP/1.1 client.
    Plain(PlainClient),
    /// `https://`: hyper-util with rustls (boxed: it is six times the
    /// size of the plain client, and built once per backend), and the CAs
    /// it trusts: a reload that reads other CAs builds another.
    Tls(Box<TlsClient>, Arc<trust::Trust>),
}

impl HttpClient {
    /// Whether a snapshot build may keep this client for a backend whose
    /// URL and connect timeout are unchanged: a plain one always, an https
    /// one while the CAs it trusts are still those in effect.
    pub(crate) fn reusable(&self) -> bool {
        match self {
            HttpClient::Plain(_) => true,
            HttpClient::Tls(_, trust) => trust::is_current(trust),
        }
    }
}

/// hyper-util's pooled client over rustls. Request bodies are the buffered
/// client body (`Full<Bytes>`).
pub(crate) type TlsClient =
    Client<Bounded<HttpsConnector<HttpConnector<HostResolver>>>, Full<Bytes>>;

/// A backend's response body, streamed as it arrives.
#[derive(Debug)]
pub enum UpstreamBody {
    /// Read by weir's own client from the backend's socket.
    Plain(conn::ResponseBody),
    /// Read through hyper-util.
    Tls(Incoming),
    /// One whose first frame weir read before answering (an SSE answer's
    /// first event, or the first bytes of a body that did not come whole
    /// with its head: see `proxy`, which retries an answer that sends none
    /// in time), handed on before the rest.
    Primed(Box<Primed>),
}

/// An [`UpstreamBody`] (never itself primed) and the frame already read
/// from it.
#[derive(Debug)]
pub struct Primed {
    first: Option<Frame<Bytes>>,
    /// What [`primed_gathered`] read after the data it joined to `first`
    /// and could not join (trailers, or the body's failure): handed on
    /// next.
    then: Option<Result<Frame<Bytes>, BodyReadError>>,
    rest: UpstreamBody,
}

/// An answer with its first frame read (see [`UpstreamBody::first_frame`];
/// `sse`: a 2xx SSE answer, whose first frame is its first event): the
/// response to send, or the attempt's failure.
pub(crate) async fn primed(
    response: Response<UpstreamBody>,
    wait: Duration,
    sse: bool,
) -> Result<Response<UpstreamBody>, AttemptError> {
    let (parts, body) = response.into_parts();
    let body = body.first_frame(wait, sse).await?;
    Ok(Response::from_parts(parts, body))
}

/// As [`primed`] (not for a 2xx SSE answer), its first frame then joined by
/// the data that follows, until `gather` bytes or the body's end are in
/// hand, or `wait` (from the start) has passed: an answer whose words came
/// in two reads or two chunks is read as one (see [`UpstreamBody::first_bytes`]).
pub(crate) async fn primed_gathered(
    response: Response<UpstreamBody>,
    wait: Duration,
    gather: usize,
) -> Result<Response<UpstreamBody>, AttemptError> {
    let until = tokio::time::Instant::now() + wait;
    let mut response = primed(response, wait, false).await?;
    if let UpstreamBody::Primed(primed) = response.body_mut() {
        primed.gather(until, gather).await;
    }
    Ok(response)
}

impl UpstreamBody {
    /// Whether the whole body came with the head, already read from the
    /// backend (nothing of it can fail any more): a plain backend's body
    /// of known length that is all buffered, or any empty one. `proxy`
    /// primes the others (see [`UpstreamBody::first_frame`]).
    pub(crate) fn arrived_whole(&self) -> bool {
        match self {
            UpstreamBody::Plain(body) => body.arrived_whole(),
            UpstreamBody::Tls(body) => body.is_end_stream(),
            UpstreamBody::Primed(_) => false,
        }
    }

    /// The data of the frame [`UpstreamBody::first_frame`] read, if any.
    pub(crate) fn first_bytes(&self) -> Option<&[u8]> {
        match self {
            UpstreamBody::Primed(primed) => primed
                .first
                .as_ref()
                .and_then(Frame::data_ref)
                .map(|data| &data[..]),
            _ => None,
        }
    }

    /// Reads the body's first frame with data (or its end, or trailers),
    /// for at most `wait`: the body with that frame put back in front, so
    /// the client gets it as the body's first. An error, or nothing within
    /// `wait`, is the attempt's failure: nothing has reached the client
    /// yet, so another backend may be tried. `sse` names the failure to
    /// wait for an event rather than for bytes.
    pub(crate) async fn first_frame(
        mut self,
        wait: Duration,
        sse: bool,
    ) -> Result<Self, AttemptError> {
        let read = async {
            loop {
                match std::future::poll_fn(|cx| Pin::new(&mut self).poll_frame(cx)).await {
                    Some(Ok(frame)) if frame.data_ref().is_some_and(Bytes::is_empty) => {}
                    Some(Ok(frame)) => return Ok(Some(frame)),
                    Some(Err(e)) => return Err(e),
                    None => return Ok(None),
                }
            }
        };
        match tokio::time::timeout(wait, read).await {
            Err(_) if sse => Err(AttemptError::NoFirstEvent(wait)),
            Err(_) => Err(AttemptError::NoFirstBytes(wait)),
            Ok(Err(e)) => Err(AttemptError::Protocol(e.to_string())),
            Ok(Ok(first)) => Ok(UpstreamBody::Primed(Box::new(Primed {
                first,
                then: None,
                rest: self,
            }))),
        }
    }
}

impl UpstreamBody {
    /// The response's headers as a plain backend sent them, when the
    /// response's map was left empty for them ([`conn::PlainClient::forward`]).
    pub(crate) fn raw_headers(&self) -> Option<&codec::RawHeaders> {
        match self {
            UpstreamBody::Plain(body) => Some(body.headers()),
            UpstreamBody::Tls(_) => None,
            UpstreamBody::Primed(primed) => match &primed.rest {
                UpstreamBody::Plain(body) => Some(body.headers()),
                _ => None,
            },
        }
    }

    /// Drops the headers kept by [`UpstreamBody::raw_headers`] once they
    /// have been written: they share the read buffer's allocation, which
    /// would otherwise stay alive as long as a long stream.
    pub(crate) fn release_raw_headers(&mut self) {
        match self {
            UpstreamBody::Plain(body) => body.release_headers(),
            UpstreamBody::Tls(_) => {}
            UpstreamBody::Primed(primed) => {
                if let UpstreamBody::Plain(body) = &mut primed.rest {
                    body.release_headers();
                }
            }
        }
    }
}

/// Why a backend's body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    /// The connection failed (reset, closed early).
    #[error("reading the upstream body: {0}")]
    Io(#[from] std::io::Error),
    /// The backend's framing was broken (bad chunk size, early close).
    #[error(transparent)]
    Malformed(#[from] codec::Malformed),
    /// hyper-util's client failed (https backends).
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// rustls refused the provider (never happens with `ring` and TLS 1.2/1.3,
    /// but it is a `Result` in rustls' API, so it is one here).
    #[error("tls setup failed: {0}")]
    Tls(String),
    /// A place `SSL_CERT_FILE` or `SSL_CERT_DIR` names for private CAs
    /// cannot be trusted (unreadable, or holds no certificate): a start or
    /// reload that needs it fails rather than serve a backend that could
    /// not be verified.
    #[error("{var}={}: {why}", path.display())]
    TrustedCa {
        /// `SSL_CERT_FILE` or `SSL_CERT_DIR`.
        var: &'static str,
        /// The file or directory it names, or the file in that directory.
        path: std::path::PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// How one attempt to a backend failed. `proxy` retries on another backend
/// from this alone; nothing of the response has reached the client yet.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AttemptError {
    /// Nothing listens at the backend's address (ECONNREFUSED): outlier
    /// detection ejects it at once.
    #[error("connection refused: {0}")]
    Refused(String),
    /// The TCP/TLS connection could not be made (unreachable, connect
    /// timeout, TLS failure). The request never reached the backend.
    #[error("connect failed: {0}")]
    Connect(String),
    /// No response headers within `first_byte_timeout`.
    #[error("no response headers within {0:?}")]
    Timeout(Duration),
    /// An SSE answer's headers came, but no event within
    /// `first_byte_timeout` of them (SPEC: "response headers / first SSE
    /// event"): a backend whose queue holds the stream back.
    #[error("no event within {0:?} of the response headers")]
    NoFirstEvent(Duration),
    /// Another answer's headers came, without the whole body, and no byte
    /// of the body followed within `first_byte_timeout` of them: its head
    /// would reach the client with nothing after it.
    #[error("no body within {0:?} of the response headers")]
    NoFirstBytes(Duration),
    /// The connection broke or the backend answered something that is not
    /// HTTP (reset, garbage, oversized headers).
    #[error("upstream failed: {0}")]
    Protocol(String),
    /// A kept-alive connection closed, after the request was written,
    /// without a byte of answer: most often the backend closing it as it
    /// idled, just as weir reused it, but possibly a worker that read the
    /// request and died. Never re-sent to the same backend; retried
    /// elsewhere at once, and not held against the backend.
    #[error("kept-alive connection closed without an answer: {0}")]
    IdleClosed(String),
    /// An HTTP/2 backend refused the stream before processing it (its
    /// GOAWAY, or `REFUSED_STREAM`: [`tracked::unprocessed`]): [`resending`]
    /// sends it again on another connection, not held against the
    /// backend; refused every time, the attempt is a `Protocol` failure.
    #[error("HTTP/2 stream refused before it was processed: {0}")]
    Unprocessed(String),
}

impl AttemptError {
    /// Its `kind` in `weir_upstream_errors_total` (and `reason` in
    /// `weir_retries_total`).
    pub(crate) fn kind(&self) -> FailureKind {
        match self {
            AttemptError::Refused(_) | AttemptError::Connect(_) => FailureKind::Connect,
            AttemptError::Timeout(_)
            | AttemptError::NoFirstEvent(_)
            | AttemptError::NoFirstBytes(_) => FailureKind::Timeout,
            AttemptError::Protocol(_) => FailureKind::Protocol,
            AttemptError::IdleClosed(_) | AttemptError::Unprocessed(_) => FailureKind::IdleClosed,
        }
    }
}

/// Whether a backend at `url` is reached over TLS (and so needs [`trust`]).
pub(crate) fn is_https(url: &Uri) -> bool {
    url.scheme() == Some(&Scheme::HTTPS)
}

/// Builds the client for the backend at `url` with this connect timeout.
pub(crate) fn client(url: &Uri, connect_timeout: Duration) -> Result<HttpClient, UpstreamError> {
    if is_https(url) {
        let trust = trust::current()?;
        let client = tls_client(url.host().unwrap_or_default(), connect_timeout, &trust);
        Ok(HttpClient::Tls(Box::new(client), trust))
    } else {
        Ok(HttpClient::Plain(PlainClient::new(url, connect_timeout)))
    }
}

/// How long an https backend's HTTP/2 connection may send nothing before
/// it is pinged, and how long the ping may wait for its answer: an idle
/// pooled connection (50 s at most) is pinged twice, and a server busy
/// for a while still answers in time.
const H2_PING_AFTER: Duration = Duration::from_secs(20);

/// `host` as the URL writes it (see [`resolve::Resolver::new`]).
fn tls_client(host: &str, connect_timeout: Duration, trust: &trust::Trust) -> TlsClient {
    // The host's addresses from one shared lookup (`resolve.rs`).
    let mut http = HttpConnector::new_with_resolver(HostResolver::new(host));
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(30)));
    let https = Bounded {
        inner: hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(trust.config.as_ref().clone())
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http),
        limit: connect_timeout,
    };
    Client::builder(TokioExecutor::new())
        // The plain client's head limit (64 KiB) for https too: hyper's
        // own read buffer would take a head of about 400 KB (`send` checks
        // the head's size, which this alone bounds only roughly).
        .http1_max_buf_size(codec::MAX_HEAD_BYTES)
        .http2_max_header_list_size(codec::MAX_HEAD_BYTES as u32)
        // An HTTP/2 connection whose peer stops answering while TCP stays
        // up (a middlebox that dropped it, a wedged server) would keep
        // every request and probe multiplexed on it: it is pinged after
        // `H2_PING_AFTER` without a frame from the backend, idle or not,
        // and closed when a ping waits as long for its answer. (An
        // HTTP/1.1 connection that times out is dropped with its request.)
        .http2_keep_alive_interval(H2_PING_AFTER)
        .http2_keep_alive_timeout(H2_PING_AFTER)
        .http2_keep_alive_while_idle(true)
        .pool_idle_timeout(pool::IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https)
}

/// A connector whose whole connection, TCP and then the TLS handshake,
/// must be made within `limit`, as nginx's `proxy_connect_timeout` bounds
/// its SSL handshake too: a backend that accepts and never finishes the
/// handshake is a `connect` failure after `connect_timeout`, not a
/// `timeout` after `first_byte_timeout` (hyper-util's connector bounds
/// only the TCP connect).
#[derive(Debug, Clone)]
pub(crate) struct Bounded<C> {
    inner: C,
    limit: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The handshake that did not finish within `connect_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("connection not made within connect_timeout ({0:?}, TCP and TLS handshake)")]
struct ConnectTimedOut(Duration);

impl<C> tower_service::Service<Uri> for Bounded<C>
where
    C: tower_service::Service<Uri>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = tracked::Tracked<C::Response>;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let limit = self.limit;
        Box::pin(async move {
            let began = tokio::time::Instant::now();
            match tokio::time::timeout(limit, connecting).await {
                Ok(Ok(io)) => Ok(tracked::Tracked::new(io, began.elapsed())),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(ConnectTimedOut(limit).into()),
            }
        })
    }
}

/// A proxied request as the exchange holds it, borrowed: the plain client
/// writes it straight onto the wire (no `http::Request` built, no header
/// map copied per attempt); for https one is built from it.
pub(crate) struct Forward<'a> {
    /// The backend's URL (scheme, authority, base path).
    pub base: &'a Uri,
    /// The client's path after `/v1`.
    pub rest: &'a str,
    pub query: Option<&'a str>,
    /// The client's headers as they go upstream.
    pub headers: &'a Upstream<'a>,
    /// The backend's key.
    pub authorization: Option<&'a HeaderValue>,
    /// The body to send (possibly rewritten for this backend).
    pub body: Bytes,
    /// Sent on a new connection, not a pooled one: a request sent again at
    /// once after an answer (a refusal of `stream_options`) would
    /// otherwise take that answer's connection back from the pool just as
    /// a backend that closes after an error closes it (`IdleClosed`).
    /// Plain backends only: hyper-util's pool sees only a close that has
    /// already arrived, so to an https backend the race remains.
    pub fresh: bool,
}

impl Forward<'_> {
    /// The same request as an `http::Request` (POST), for hyper-util.
    fn to_request(&self) -> Result<Request<Bytes>, http::Error> {
        let mut request = Request::new(self.body.clone());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = upstream_uri(self.base, self.rest, self.query)?;
        // Without `Host` and the length: hyper sets both from the URI and
        // the body.
        *request.headers_mut() = self.headers.to_map();
        if let Some(key) = self.authorization {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, key.clone());
        }
        Ok(request)
    }
}

/// How many times [`resending`] sends again a request an HTTP/2 backend
/// refused unprocessed before the attempt fails: enough for a connection
/// that closed under it, not a loop with a backend that refuses every
/// stream.
const UNPROCESSED_RESENDS: u32 = 2;

/// Sends a proxied request; the same contract as [`send`].
pub(crate) async fn forward(
    client: &HttpClient,
    request: &Forward<'_>,
    first_byte_timeout: Duration,
) -> Result<Response<UpstreamBody>, AttemptError> {
    match client {
        HttpClient::Plain(plain) => {
            let answer = tokio::time::timeout(first_byte_timeout, plain.forward(request)).await;
            plain_answer(first_byte_timeout, answer)
        }
        // The client's path was parsed as a URI by hyper already, so
        // joining it to a configured URL cannot fail in practice.
        HttpClient::Tls(..) => {
            let build = || {
                request
                    .to_request()
                    .map_err(|e| AttemptError::Protocol(format!("upstream uri: {e}")))
            };
            resending(client, build, first_byte_timeout).await
        }
    }
}

/// Sends one request and waits at most `first_byte_timeout` for its
/// response headers (connecting included). To an `https://` backend, a
/// stream refused unprocessed goes again, as [`forward`]'s do: a probe
/// that met a connection closing under it is not a failed probe.
pub(crate) async fn send(
    client: &HttpClient,
    request: Request<Bytes>,
    first_byte_timeout: Duration,
) -> Result<Response<UpstreamBody>, AttemptError> {
    match client {
        HttpClient::Plain(..) => send_once(client, request, first_byte_timeout).await,
        HttpClient::Tls(..) => {
            let (parts, body) = request.into_parts();
            let build = || {
                let mut again = Request::new(body.clone());
                *again.method_mut() = parts.method.clone();
                *again.uri_mut() = parts.uri.clone();
                *again.version_mut() = parts.version;
                *again.headers_mut() = parts.headers.clone();
                Ok(again)
            };
            resending(client, build, first_byte_timeout).await
        }
    }
}

/// Sends the request `build` makes to an `https://` backend; a stream the
/// backend refused unprocessed (an HTTP/2 GOAWAY past it, `REFUSED_STREAM`)
/// goes again at once, on another connection (hyper-util's pool drops one
/// that is going away), up to [`UNPROCESSED_RESENDS`] times within the same
/// `first_byte_timeout`.
async fn resending(
    client: &HttpClient,
    mut build: impl FnMut() -> Result<Request<Bytes>, AttemptError>,
    first_byte_timeout: Duration,
) -> Result<Response<UpstreamBody>, AttemptError> {
    let deadline = tokio::time::Instant::now() + first_byte_timeout;
    let mut resent = 0;
    loop {
        let request = build()?;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        // Boxed: hyper's request future is three times the size of the
        // plain client's, and every future that awaits this one would
        // otherwise carry (and move) its bytes on every request.
        match Box::pin(send_once(client, request, left)).await {
            Err(AttemptError::Unprocessed(_)) if resent < UNPROCESSED_RESENDS => {
                resent += 1;
            }
            // A backend that refuses every stream (one shedding load so) is
            // failing.
            Err(AttemptError::Unprocessed(e)) => {
                return Err(AttemptError::Protocol(format!(
                    "{} times: HTTP/2 stream refused before it was processed: {e}",
                    resent + 1
                )))
            }
            // Timed out on the whole `first_byte_timeout`.
            Err(AttemptError::Timeout(_)) => return Err(AttemptError::Timeout(first_byte_timeout)),
            outcome => return outcome,
        }
    }
}

/// One try of [`send`].
async fn send_once(
    client: &HttpClient,
    request: Request<Bytes>,
    first_byte_timeout: Duration,
) -> Result<Response<UpstreamBody>, AttemptError> {
    match client {
        HttpClient::Plain(plain) => {
            let answer = tokio::time::timeout(first_byte_timeout, plain.send(request)).await;
            plain_answer(first_byte_timeout, answer)
        }
        HttpClient::Tls(tls, _) => {
            let request = request.map(Full::new);
            let sent = tokio::time::Instant::now();
            match tokio::time::timeout(first_byte_timeout, tls.request(request)).await {
                Err(_) => Err(AttemptError::Timeout(first_byte_timeout)),
                Ok(Ok(response)) => {
                    tracked::answered(&response);
                    // hyper read the head; weir's own client says so in
                    // `conn.rs`, before it parses one.
                    crate::busy_poll::head_read();
                    // hyper takes 100-999, and hands a 101 over; the plain
                    // client's rules (codec::read_head) hold for https too.
                    let status = response.status();
                    if status.as_u16() > 599 {
                        return Err(AttemptError::Protocol(
                            "status code outside 100-599".to_owned(),
                        ));
                    }
                    if status.is_informational() {
                        return Err(AttemptError::Protocol(format!(
                            "{status} on a request without Upgrade"
                        )));
                    }
                    // hyper's read buffer (64 KiB, the builder's) lets a
                    // head somewhat over it through: the limit counted as
                    // the plain client counts it, the head's bytes.
                    let head: usize = (response.headers().iter())
                        .map(|(name, value)| name.as_str().len() + value.len() + 4)
                        .sum();
                    if head > codec::MAX_HEAD_BYTES {
                        return Err(AttemptError::Protocol(
                            "response head larger than 64 KiB".to_owned(),
                        ));
                    }
                    // As the plain client's `framing`: a 204 or 304 has no
                    // body, so no framing to refuse.
                    let codings = response.headers().get_all(http::header::TRANSFER_ENCODING);
                    if !codec::bodiless(response.status()) && codings.iter().next().is_some() {
                        codec::only_chunked(codings.iter().map(http::HeaderValue::as_bytes))
                            .map_err(|e| AttemptError::Protocol(e.0.to_owned()))?;
                    }
                    Ok(response.map(UpstreamBody::Tls))
                }
                Ok(Err(e)) if e.is_connect() && is_refused(&e) => {
                    Err(AttemptError::Refused(error_chain(&e)))
                }
                Ok(Err(e)) if e.is_connect() => Err(AttemptError::Connect(error_chain(&e))),
                // The plain client's rules (`conn.rs`): hyper-util has sent
                // again a request its kept-alive connection closed before
                // writing; one written and then dropped unanswered within
                // the race of an idle close is `IdleClosed`.
                Ok(Err(e)) if tracked::idle_closed(&e, sent.elapsed()) => {
                    Err(AttemptError::IdleClosed(error_chain(&e)))
                }
                Ok(Err(e)) if tracked::unprocessed(&e) => {
                    Err(AttemptError::Unprocessed(error_chain(&e)))
                }
                Ok(Err(e)) => Err(AttemptError::Protocol(error_chain(&e))),
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        match self.get_mut() {
            UpstreamBody::Plain(body) => Pin::new(body).poll_frame(cx),
            UpstreamBody::Tls(body) => poll_tls(body, cx),
            UpstreamBody::Primed(primed) => primed.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Plain(body) => body.is_end_stream(),
            UpstreamBody::Tls(body) => body.is_end_stream(),
            UpstreamBody::Primed(primed) => primed.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Plain(body) => body.size_hint(),
            UpstreamBody::Tls(body) => body.size_hint(),
            // The backend's length, the first frame included (an SSE
            // answer's length is weir's to decide: `ProxiedBody` gives none).
            UpstreamBody::Primed(primed) => primed.size_hint(),
        }
    }
}

fn poll_tls(
    body: &mut Incoming,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
    Pin::new(body)
        .poll_frame(cx)
        .map(|f| f.map(|r| r.map_err(BodyReadError::from)))
}

// Not through `UpstreamBody`'s own methods: a recursive `poll_frame` would
// not be inlined where every other answer's body is read.
impl Primed {
    /// Joins the data that follows `first` to it (see [`primed_gathered`]).
    async fn gather(&mut self, until: tokio::time::Instant, gather: usize) {
        let Some(data) = self.first.as_ref().and_then(Frame::data_ref) else {
            return;
        };
        // Most answers came whole with their first read: nothing to join.
        if data.len() >= gather || self.rest.is_end_stream() {
            return;
        }
        let mut joined = bytes::BytesMut::from(&data[..]);
        while joined.len() < gather && !self.rest.is_end_stream() {
            let next = std::future::poll_fn(|cx| Pin::new(&mut self.rest).poll_frame(cx));
            match tokio::time::timeout_at(until, next).await {
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(more) => joined.extend_from_slice(&more),
                    Err(frame) => {
                        self.then = Some(Ok(frame));
                        break;
                    }
                },
                Ok(Some(Err(e))) => {
                    self.then = Some(Err(e));
                    break;
                }
                // The end, or quiet: what came so far.
                Ok(None) | Err(_) => break,
            }
        }
        self.first = Some(Frame::data(joined.freeze()));
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        if let Some(frame) = self.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(next) = self.then.take() {
            return Poll::Ready(Some(next));
        }
        match &mut self.rest {
            UpstreamBody::Plain(body) => Pin::new(body).poll_frame(cx),
            UpstreamBody::Tls(body) => poll_tls(body, cx),
            // Never made (`first_frame` primes an unprimed body).
            UpstreamBody::Primed(_) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none()
            && self.then.is_none()
            && match &self.rest {
                UpstreamBody::Plain(body) => body.is_end_stream(),
                UpstreamBody::Tls(body) => body.is_end_stream(),
                UpstreamBody::Primed(_) => true,
            }
    }

    fn size_hint(&self) -> SizeHint {
        let first = (self.first.as_ref())
            .and_then(Frame::data_ref)
            .map_or(0, |data| data.len() as u64);
        let rest = match &self.rest {
            UpstreamBody::Plain(body) => body.size_hint(),
            UpstreamBody::Tls(body) => body.size_hint(),
            UpstreamBody::Primed(_) => SizeHint::with_exact(0),
        };
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(first));
        if let Some(upper) = rest.upper() {
            // Never below the lower bound (which `set_upper` asserts).
            hint.set_upper(upper.saturating_add(first));
        }
        hint
    }
}

/// The upstream URI: the backend's base URL followed by the client's path
/// after `/v1`, with the query string (SPEC "Paths").
pub(crate) fn upstream_uri(
    base: &Uri,
    rest: &str,
    query: Option<&str>,
) -> Result<Uri, http::Error> {
    let pieces = target_pieces(base, rest, query);
    let path_and_query: String = pieces.concat();
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse()?);
    Ok(Uri::from_parts(parts)?)
}

/// The upstream request target in pieces, written one after the other:
/// the base URL's path without its trailing `/`, the client's path after
/// `/v1`, and `?query` when there is one. The one joining rule for both
/// [`upstream_uri`] and the plain client's request line.
pub(crate) fn target_pieces<'a>(
    base: &'a Uri,
    rest: &'a str,
    query: Option<&'a str>,
) -> [&'a str; 4] {
    let (mark, query) = match query {
        Some(q) => ("?", q),
        None => ("", ""),
    };
    [base.path().trim_end_matches('/'), rest, mark, query]
}

/// The plain client's answer within `first_byte_timeout`, in the shape
/// [`send`] returns. A plain function over the awaited result, not an async
/// wrapper: an async fn taking the call's future would hold it twice.
fn plain_answer(
    first_byte_timeout: Duration,
    answer: Result<Result<Response<conn::ResponseBody>, AttemptError>, tokio::time::error::Elapsed>,
) -> Result<Response<UpstreamBody>, AttemptError> {
    match answer {
        Err(_) => Err(AttemptError::Timeout(first_byte_timeout)),
        Ok(result) => result.map(|r| r.map(UpstreamBody::Plain)),
    }
}

/// `e` and its sources, outermost first: hyper-util's errors carry their
/// cause (an `io::Error`, a `hyper::Error`) a few levels down.
pub(crate) fn sources<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |s| s.source())
}

/// Whether an `io::Error` of kind `ConnectionRefused` is in the chain.
fn is_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    sources(e).any(|s| {
        s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

/// The error and its sources on one line: hyper's top-level messages
/// ("client error (Connect)") say little without their causes. A cause
/// whose text the line already holds is not repeated.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let line = s.to_string();
        if !out.contains(&line) {
            out.push_str(": ");
            out.push_str(&line);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn a_forward_becomes_the_same_request_for_hyper_util() {
        let base: Uri = "https://api.example.com/openai/v1/".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("client"));
        headers.insert("authorization", HeaderValue::from_static("Bearer client"));
        headers.insert("host", HeaderValue::from_static("weir.local"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        let client = crate::headers::ClientHeaders::Map(headers);
        let id = HeaderValue::from_static("r1");
        let upstream = crate::headers::Upstream {
            client: &client,
            request_id: &id,
        };
        let key = HeaderValue::from_static("Bearer sk-backend");
        let forward = Forward {
            base: &base,
            rest: "/chat/completions",
            query: Some("a=1"),
            headers: &upstream,
            authorization: Some(&key),
            body: Bytes::from_static(b"{}"),
            fresh: false,
        };
        let request = forward.to_request().unwrap();
        assert_eq!(request.method(), Method::POST);
        assert_eq!(
            request.uri().to_string(),
            "https://api.example.com/openai/v1/chat/completions?a=1"
        );
        assert_eq!(request.headers()["x-request-id"], "r1");
        assert_eq!(request.headers()["authorization"], "Bearer sk-backend");
        assert_eq!(request.headers()["x-kept"], "1");
        assert_eq!(request.headers()["accept-encoding"], "identity");
        assert_eq!(request.headers().len(), 4, "{:?}", request.headers());
        assert_eq!(request.body(), "{}");
    }

    #[test]
    fn upstream_uri_joins_base_path_and_rest() {
        let base: Uri = "https://api.example.com/v1".parse().unwrap();
        let uri = upstream_uri(&base, "/chat/completions", Some("a=1")).unwrap();
        assert_eq!(
            uri.to_string(),
            "https://api.example.com/v1/chat/completions?a=1"
        );
        let base: Uri = "http://127.0.0.1:9001/openai/v1/".parse().unwrap();
        let uri = upstream_uri(&base, "/models", None).unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:9001/openai/v1/models");
    }
}
