//! Accepting connections and routing requests.
//!
//! One accept loop per listener (the public one and, when configured, the
//! admin one), hyper-util's auto builder for HTTP/1.1 and h2c, graceful
//! shutdown through `hyper_util::server::graceful`. Routing is a plain match
//! on method and path (SPEC "HTTP surface"); the `/v1` inference routes go to
//! [`crate::proxy`], the operator routes to [`crate::admin`].
//!
//! This module enforces the connection-level limits (header read timeout,
//! idle timeout, `max_connections`, request framing, head sizes, path
//! rules, request ids); it does not read bodies.
//!
//! # Connection timers and framing ([`ClientIo`])
//!
//! hyper 1.x starts its `header_read_timeout` whenever it waits for a head,
//! including while a keep-alive connection sits idle between requests, so
//! with it an idle connection closes after `header_read_timeout`, never after
//! `idle_timeout`. weir therefore turns hyper's timer off and wraps every
//! accepted socket in [`ClientIo`], which knows (through [`ConnWatch`]) whether
//! a request is being served: before the first request and while a head is
//! arriving, `header_read_timeout` applies; between requests,
//! `idle_timeout`; while a request is served, neither (`request_timeout`
//! bounds it). The same wrapper scans request heads for a `Content-Length`
//! beside a `Transfer-Encoding`, which hyper resolves silently in favour of
//! `Transfer-Encoding` (RFC 9112 §6.3 allows that) but SPEC "Framing" refuses
//! with 400 and a closed connection; hyper drops the `Content-Length` before
//! weir sees the request, so the raw bytes are the only place to see it.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, Uri};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};
use tokio_util::sync::CancellationToken;

use crate::{
    access_log::{AccessLog, Ending},
    admin,
    api::ApiError,
    body::GatewayBody,
    config::ServerConfig,
    gateway::Shared,
    headers,
    lanes::Lanes,
    proxy,
};

pub(crate) use crate::reload::reload;

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// `/v1/*`, `/healthz`, `/readyz` (an `admin_listen` is configured).
    Public,
    /// `/metrics`, `/admin/*`, `/healthz`, `/readyz`.
    Admin,
    /// Everything (no `admin_listen`).
    Both,
}

/// Request headers in all beyond which weir answers 431 (SPEC: 64 KiB).
/// hyper's read buffer is this plus [`MAX_REQUEST_LINE_BYTES`], so hyper
/// itself answers 431 to a head that does not fit, and [`check_head`] to
/// one that fits but whose headers exceed this.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Request lines longer than this get 414 (SPEC "Framing": 8 KiB).
const MAX_REQUEST_LINE_BYTES: usize = 8 * 1024;

/// How long the accept loop backs off after an accept error such as EMFILE,
/// instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves one listener until `shutdown` is cancelled, then lets open
/// connections finish within `shutdown_grace`.
pub(crate) async fn serve(
    listener: TcpListener,
    role: Role,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let server_config = shared.snapshot.load().config.server.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // `ClientIo` enforces the head and idle timeouts (see the module doc).
        .header_read_timeout(None)
        .max_buf_size(MAX_HEADER_BYTES + MAX_REQUEST_LINE_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX))
        .keep_alive_interval(None);
    let builder = Arc::new(builder);
    let server_config = Arc::new(server_config);
    // Client connections run on the lanes (one thread per core); the
    // admin listener's few connections stay on the main runtime.
    let lanes = match role {
        Role::Admin => None,
        Role::Public | Role::Both => match Lanes::start() {
            Ok(lanes) => Some(lanes),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the connection lanes; serving on the main runtime");
                None
            }
        },
    };
    let graceful = GracefulShutdown::new();
    loop {
        // Wait for a connection slot before accepting, so connections beyond
        // `max_connections` wait in the kernel's backlog instead of spinning.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = shared.connections.clone().acquire_owned() => match permit {
                Ok(p) => p,
                // The semaphore is never closed; if it were, stop serving.
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let accepted = Accepted {
            peer,
            role,
            shared: shared.clone(),
            builder: builder.clone(),
            server_config: server_config.clone(),
            graceful: graceful.watcher(),
            permit,
        };
        // Connections are tracked by `graceful` (which waits for them on
        // shutdown), not by a JoinSet that would grow with every connection.
        match &lanes {
            Some(lanes) => match stream.into_std() {
                // Re-registered with the lane's own reactor there.
                Ok(stream) => lanes.spawn(accepted.serve(Socket::Std(stream))),
                Err(e) => tracing::debug!(%peer, error = %e, "accepted socket unusable"),
            },
            None => drop(tokio::spawn(accepted.serve(Socket::Tokio(stream)))),
        }
    }
    drop(listener);
    let grace = shared.snapshot.load().config.server.shutdown_grace;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "shutdown grace passed with connections still open; closing them"
        );
    }
    // Stops the lane threads, dropping connections still open past the grace.
    drop(lanes);
}

/// An accepted socket, registered with a reactor or about to be.
enum Socket {
    /// Accepted on this runtime.
    Tokio(TcpStream),
    /// Handed over from the accept loop to a lane.
    Std(std::net::TcpStream),
}

/// One accepted connection and what serving it needs.
struct Accepted {
    peer: SocketAddr,
    role: Role,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    server_config: Arc<ServerConfig>,
    graceful: hyper_util::server::graceful::Watcher,
    /// The `max_connections` slot, held until the connection closes.
    permit: tokio::sync::OwnedSemaphorePermit,
}

impl Accepted {
    /// Serves the connection until it closes.
    async fn serve(self, socket: Socket) {
        let Accepted {
            peer,
            role,
            shared,
            builder,
            server_config,
            graceful,
            permit,
        } = self;
        let stream = match socket {
            Socket::Tokio(stream) => stream,
            Socket::Std(stream) => match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "cannot register the connection");
                    return;
                }
            },
        };
        let watch = Arc::new(ConnWatch::default());
        let io = ClientIo::new(stream, watch.clone(), &server_config);
        let service = service_fn(move |req| {
            // Counted from the moment hyper hands the request over until it
            // drops the response body, so `ClientIo` never times out a
            // connection that is serving a request.
            let busy = Busy::new(watch.clone());
            let shared = shared.clone();
            async move {
                let response = route(req, &shared, peer, role, &busy.0).await;
                Ok::<_, Infallible>(response.map(|inner| ConnBody { inner, _busy: busy }))
            }
        });
        let conn = builder.serve_connection(TokioIo::new(io), service);
        if let Err(e) = graceful.watch(conn.into_owned()).await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
        drop(permit);
    }
}

/// Routes one request and stamps `x-request-id` on its response. The
/// access log line is written here for weir's own answers, and by the body
/// when it ends for proxied ones.
async fn route(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    peer: SocketAddr,
    role: Role,
    watch: &ConnWatch,
) -> Response<GatewayBody> {
    let request_id = request_id(req.headers().get(headers::X_REQUEST_ID));
    let mut log = AccessLog::new(
        request_id.clone(),
        req.method().clone(),
        req.uri().path().to_owned(),
    );
    let result = match check_head(&req, watch) {
        Ok(()) => dispatch(req, shared, peer, role, &request_id, &mut log).await,
        Err(error) => Err(error),
    };
    let mut response = match result {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    response
        .headers_mut()
        .insert(headers::X_REQUEST_ID, request_id);
    log.status = response.status().as_u16();
    match response.body_mut() {
        GatewayBody::Proxied(body) => body.attach_log(log, shared.clone()),
        GatewayBody::Full(_) => log.emit(&shared.metrics, Ending::Complete),
    }
    response
}

async fn dispatch(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    peer: SocketAddr,
    role: Role,
    request_id: &HeaderValue,
    log: &mut AccessLog,
) -> Result<Response<GatewayBody>, ApiError> {
    let path = req.uri().path();
    check_path(path)?;
    // Loaded once: the whole request sees one routing state.
    let snapshot = shared.snapshot.load_full();
    let public = role != Role::Admin;
    let operator = role != Role::Public;
    match path {
        "/healthz" => only(&req, &Method::GET).map(|()| admin::healthz()),
        "/readyz" => only(&req, &Method::GET).map(|()| admin::readyz(shared)),
        "/metrics" if operator => only(&req, &Method::GET).map(|()| admin::metrics(shared)),
        p if operator && p.starts_with("/admin/") => {
            admin::authorize(req.headers(), peer, &snapshot)?;
            match p {
                "/admin/backends" => only(&req, &Method::GET).map(|()| admin::backends(shared)),
                "/admin/cluster" => only(&req, &Method::GET).map(|()| admin::cluster(shared)),
                "/admin/reload" => {
                    only(&req, &Method::POST)?;
                    Ok(admin::reload_response(reload(shared).await))
                }
                _ => Err(unknown(&req)),
            }
        }
        p if public && (p == "/v1" || p.starts_with("/v1/")) => {
            proxy::authorize(req.headers(), &snapshot)?;
            if req.method() == Method::GET {
                return proxy::models(p, &snapshot);
            }
            if req.method() != Method::POST {
                return Err(ApiError::MethodNotAllowed(req.method().to_string()));
            }
            proxy::forward(req, shared, &snapshot, request_id, log).await
        }
        _ => Err(unknown(&req)),
    }
}

/// 405 unless the request uses `method`.
fn only(req: &Request<Incoming>, method: &Method) -> Result<(), ApiError> {
    if req.method() == method {
        Ok(())
    } else {
        Err(ApiError::MethodNotAllowed(req.method().to_string()))
    }
}

fn unknown(req: &Request<Incoming>) -> ApiError {
    ApiError::UnknownRoute {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
    }
}

/// SPEC "Framing" for what hyper accepts but weir does not: a
/// `Content-Length` beside a `Transfer-Encoding` (seen by [`ClientIo`]), a
/// `Transfer-Encoding` other than one `chunked`, a request line over 8 KiB
/// and headers over 64 KiB in all. Each answer closes the connection.
fn check_head(req: &Request<Incoming>, watch: &ConnWatch) -> Result<(), ApiError> {
    if watch.ambiguous_framing.load(Ordering::Acquire) {
        return Err(ApiError::BadFraming(
            "Content-Length and Transfer-Encoding in one request",
        ));
    }
    let headers = req.headers();
    let mut encodings = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = encodings.next() {
        if encodings.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(ApiError::BadFraming(
                "Transfer-Encoding must be a single \"chunked\"",
            ));
        }
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err(ApiError::BadFraming(
                "Content-Length and Transfer-Encoding in one request",
            ));
        }
    }
    // method, target, "HTTP/1.1" and two spaces
    let line = req.method().as_str().len() + target_len(req.uri()) + 10;
    if line > MAX_REQUEST_LINE_BYTES {
        return Err(ApiError::UriTooLong {
            limit: MAX_REQUEST_LINE_BYTES,
        });
    }
    if header_bytes(headers) > MAX_HEADER_BYTES {
        return Err(ApiError::HeadersTooLarge {
            limit: MAX_HEADER_BYTES,
        });
    }
    Ok(())
}

/// Bytes of the request target as the client sent it (origin or absolute
/// form).
fn target_len(uri: &Uri) -> usize {
    let scheme = uri.scheme_str().map_or(0, |s| s.len() + 3);
    let authority = uri.authority().map_or(0, |a| a.as_str().len());
    let path = uri.path_and_query().map_or(0, |p| p.as_str().len());
    scheme + authority + path
}

/// Bytes of the header section as sent: `name: value` and CRLF per field.
fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// SPEC "Paths": a path with `.` or `..` segments (also percent-encoded) or
/// an empty segment is refused, so no backend ever sees a path that a
/// normalising server would resolve differently from weir.
pub(crate) fn check_path(path: &str) -> Result<(), ApiError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(ApiError::BadPath("the path must start with /"));
    };
    for segment in rest.split('/') {
        if segment.is_empty() {
            return Err(ApiError::BadPath("empty path segment"));
        }
        if is_dot_segment(segment) {
            return Err(ApiError::BadPath("dot segments are not allowed"));
        }
    }
    Ok(())
}

/// Whether a path segment is `.` or `..`, with any dot written `%2e` or
/// `%2E` (checked without decoding: every request passes here).
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() && dots < 3 {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', b'e' | b'E', tail @ ..] => tail,
            _ => return false,
        };
        dots += 1;
    }
    rest.is_empty() && (dots == 1 || dots == 2)
}

/// The client's `x-request-id` when it is 1-128 visible ASCII characters,
/// otherwise a fresh random one (SPEC "Request ids").
fn request_id(client: Option<&HeaderValue>) -> HeaderValue {
    if let Some(value) = client {
        let bytes = value.as_bytes();
        if (1..=128).contains(&bytes.len()) && bytes.iter().all(|b| b.is_ascii_graphic()) {
            return value.clone();
        }
    }
    let id: u128 = rand::random();
    let mut hex = [0u8; 32];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&hex).unwrap_or(HeaderValue::from_static("0"))
}

/// What one client connection's requests tell its [`ClientIo`], and what
/// the wrapper tells them. Lives as long as the connection.
#[derive(Debug, Default)]
pub(crate) struct ConnWatch {
    /// Requests hyper has handed over whose response body it still holds.
    busy: AtomicUsize,
    /// A request head on this connection has both `Content-Length` and
    /// `Transfer-Encoding`; every request on it is refused from then on.
    ambiguous_framing: AtomicBool,
    /// The connection's reader while a request is served, woken when the
    /// last one ends so the idle timer starts even if no byte arrives.
    reader: Mutex<Option<Waker>>,
}

/// One request in [`ConnWatch::busy`], from hyper handing it over until
/// its response body is dropped.
struct Busy(Arc<ConnWatch>);

impl Busy {
    fn new(watch: Arc<ConnWatch>) -> Self {
        watch.busy.fetch_add(1, Ordering::AcqRel);
        Self(watch)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            let reader = self
                .0
                .reader
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(waker) = reader {
                waker.wake();
            }
        }
    }
}

/// A response body plus its request's [`Busy`] mark.
struct ConnBody {
    inner: GatewayBody,
    _busy: Busy,
}

impl Body for ConnBody {
    type Data = Bytes;
    type Error = crate::body::BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where a connection is between requests, for its read deadline.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// A head is due since this instant (the accept, or the first byte
    /// after an idle spell): `header_read_timeout` applies.
    Head(Instant),
    /// A request is being served: no read deadline.
    Busy,
    /// Idle since this instant (the last response ended): `idle_timeout`.
    Idle(Instant),
}

/// An accepted client socket with weir's read deadlines and framing scan
/// (see the module doc). Every field is `Unpin`, so no projection is needed.
struct ClientIo {
    stream: TcpStream,
    /// Shared with the requests served on this connection.
    watch: Arc<ConnWatch>,
    /// The current read deadline; reset as the phase changes.
    timer: Pin<Box<Sleep>>,
    phase: Phase,
    scan: FramingScan,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    /// Set while a write waits for the client to take bytes: the deadline
    /// after which the client counts as gone. Created on the first stall.
    write_stall: Option<Pin<Box<Sleep>>>,
    /// Whether `write_stall` is running (a write is pending).
    write_stalled: bool,
    /// How long a client may refuse every byte (`request_timeout`): a
    /// client that never reads would otherwise hold its stream, permit and
    /// reservation forever, since hyper stops polling a body it cannot
    /// write, so the body's own deadline never fires.
    write_timeout: Duration,
}

impl ClientIo {
    fn new(stream: TcpStream, watch: Arc<ConnWatch>, server: &crate::config::ServerConfig) -> Self {
        let now = Instant::now();
        Self {
            stream,
            watch,
            timer: Box::pin(tokio::time::sleep_until(now + server.header_read_timeout)),
            phase: Phase::Head(now),
            scan: FramingScan::default(),
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            write_stall: None,
            write_stalled: false,
            write_timeout: server.request_timeout,
        }
    }

    /// Tracks a write's progress: a pending write starts (or keeps) the
    /// stall deadline, any progress clears it; an expired deadline turns
    /// the pending write into an error, which makes hyper close the
    /// connection and drop what the request holds.
    fn watch_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.write_stalled = false;
            return poll;
        }
        let deadline = Instant::now() + self.write_timeout;
        let timer = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.write_stalled {
            self.write_stalled = true;
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no byte within request_timeout",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let busy = this.watch.busy.load(Ordering::Acquire) > 0;
        this.phase = match (this.phase, busy) {
            (_, true) => Phase::Busy,
            (Phase::Busy, false) => Phase::Idle(Instant::now()),
            (phase, false) => phase,
        };
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().get(before..).unwrap_or_default();
                if !read.is_empty() {
                    if this.scan.feed(read) {
                        this.watch.ambiguous_framing.store(true, Ordering::Release);
                    }
                    if let Phase::Idle(_) = this.phase {
                        this.phase = Phase::Head(Instant::now());
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let deadline = match this.phase {
                    Phase::Busy => {
                        let mut reader =
                            this.watch.reader.lock().unwrap_or_else(|e| e.into_inner());
                        if !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            *reader = Some(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                    Phase::Head(since) => since + this.header_read_timeout,
                    Phase::Idle(since) => since + this.idle_timeout,
                };
                if this.timer.deadline() != deadline {
                    this.timer.as_mut().reset(deadline);
                }
                if this.timer.as_mut().poll(cx).is_ready() {
                    let what = match this.phase {
                        Phase::Idle(_) => "idle_timeout passed",
                        _ => "header_read_timeout passed",
                    };
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.watch_write(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.watch_write(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_flush(cx);
        this.watch_write(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Bytes of a line kept to classify it: enough for `transfer-encoding` and
/// a colon after a few blanks.
const LINE_PREFIX: usize = 24;

/// Scans the bytes a client sends, line by line, for a block (lines between
/// blank lines, i.e. one request head) naming both `Content-Length` and
/// `Transfer-Encoding`. It does not follow message framing: body lines are
/// scanned too, which can only add refusals, never miss a head, and a JSON
/// body (all weir forwards) cannot hold a line that starts with a header
/// name and a colon. Stops at an HTTP/2 preface (h2 has no such ambiguity).
#[derive(Debug, Default)]
struct FramingScan {
    /// The current line's first bytes, lower-cased.
    prefix: [u8; LINE_PREFIX],
    /// Bytes of the current line so far, CRs not counted.
    len: usize,
    /// Lines ended so far (the first one may be the h2 preface).
    lines: u64,
    /// The current block has a `Content-Length` line.
    content_length: bool,
    /// The current block has a `Transfer-Encoding` line.
    transfer_encoding: bool,
    /// The connection speaks HTTP/2: nothing more to scan.
    off: bool,
    /// The current line cannot name either field (nor be the h2 preface or
    /// a blank line): it is skipped to its end unread.
    boring: bool,
}

impl FramingScan {
    /// Feeds bytes read from the client; true when a head had both headers.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut ambiguous = false;
        let mut rest = bytes;
        while !self.off && !rest.is_empty() {
            if self.len == 0 && !self.boring {
                // Most lines (the request line, other headers, the body)
                // are told apart by their first byte alone.
                let first = rest.first().map_or(b'\n', u8::to_ascii_lowercase);
                self.boring = !matches!(first, b'c' | b't' | b'p' | b'\r' | b'\n');
            }
            if self.boring || self.len >= LINE_PREFIX {
                // The line is classified by its prefix: skip to its end.
                match rest.iter().position(|&b| b == b'\n') {
                    Some(i) => rest = rest.get(i..).unwrap_or_default(),
                    None => return ambiguous,
                }
            }
            let Some((&b, tail)) = rest.split_first() else {
                break;
            };
            rest = tail;
            match b {
                b'\n' => ambiguous |= self.end_line(),
                b'\r' => {}
                _ => {
                    if let Some(slot) = self.prefix.get_mut(self.len) {
                        *slot = b.to_ascii_lowercase();
                    }
                    self.len += 1;
                }
            }
        }
        ambiguous
    }

    fn end_line(&mut self) -> bool {
        if self.boring {
            // Not blank, and names neither field.
            self.boring = false;
            self.lines += 1;
            return self.content_length && self.transfer_encoding;
        }
        let line = self
            .prefix
            .get(..self.len.min(LINE_PREFIX))
            .unwrap_or_default();
        self.lines += 1;
        if self.len == 0 {
            self.content_length = false;
            self.transfer_encoding = false;
        } else if self.lines == 1 && line.starts_with(b"pri * http/2.0") {
            self.off = true;
        } else if names_field(line, b"content-length") {
            self.content_length = true;
        } else if names_field(line, b"transfer-encoding") {
            self.transfer_encoding = true;
        }
        self.len = 0;
        self.content_length && self.transfer_encoding
    }
}

/// Whether a lower-cased line starts with the field `name` and a colon
/// (blanks before the colon allowed, which hyper would refuse anyway).
fn names_field(line: &[u8], name: &[u8]) -> bool {
    line.strip_prefix(name).is_some_and(|rest| {
        rest.iter()
            .find(|&&b| b != b' ' && b != b'\t')
            .is_some_and(|&b| b == b':')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_rules() {
        for ok in [
            "/v1/chat/completions",
            "/healthz",
            "/v1/models/gpt-4.1",
            "/v1/a.b",
            "/v1/.../x",
            "/v1/%2e%2e%2e/x",
            "/v1/..a/x",
            "/v1/%2f/x",
            "/v1/%2",
        ] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/v1/../admin/backends",
            "/v1/./models",
            "/v1/%2e%2e/admin",
            "/v1/%2E./x",
            "/v1/.%2e",
            "/v1/%2E",
            "/v1//models",
            "/v1/models/",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        let good = HeaderValue::from_static("abc-123");
        assert_eq!(request_id(Some(&good)), good);
        let spaced = HeaderValue::from_static("has space");
        assert_ne!(request_id(Some(&spaced)), spaced);
        let long = HeaderValue::try_from("x".repeat(129)).unwrap();
        assert_eq!(request_id(Some(&long)).len(), 32);
        assert_eq!(request_id(None).len(), 32);
    }

    fn scan(chunks: &[&[u8]]) -> bool {
        let mut scan = FramingScan::default();
        chunks.iter().fold(false, |seen, c| scan.feed(c) | seen)
    }

    #[test]
    fn framing_scan_finds_content_length_beside_transfer_encoding() {
        let head = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(scan(&[head]));
        // split anywhere, bare LF, odd case, blanks before the colon
        for cut in 0..head.len() {
            assert!(scan(&[&head[..cut], &head[cut..]]), "cut at {cut}");
        }
        assert!(scan(&[
            b"POST / HTTP/1.1\nTRANSFER-encoding: x\ncontent-length : 1\n\n"
        ]));
        // a long line before them does not hide them
        let long = format!(
            "POST /{} HTTP/1.1\r\nX: {}\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n",
            "a".repeat(100),
            "b".repeat(100)
        );
        assert!(scan(&[long.as_bytes()]));
    }

    #[test]
    fn framing_scan_keeps_requests_apart() {
        // keep-alive: one request with Content-Length, the next chunked
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        ]));
        // names inside values or longer names do not count
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nX-Transfer-Encoding: chunked\r\nContent-Lengths: 1\r\nX: content-length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        // HTTP/2 prior knowledge: not scanned
        assert!(!scan(&[
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nContent-Length: 1\nTransfer-Encoding: chunked\n"
        ]));
    }
}
