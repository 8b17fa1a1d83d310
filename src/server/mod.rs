//! Accepting connections and routing requests.
//!
//! One accept loop per listener (the public one and, when configured, the
//! admin one). Client connections are served by weir's own HTTP/1.1 server
//! ([`http1`]); a connection that opens with the HTTP/2 preface is handed to
//! hyper ([`http2`]). Routing is a plain match on method and path (SPEC
//! "HTTP surface"); the `/v1` inference routes go to [`crate::proxy`], the
//! operator routes to [`crate::admin`].
//!
//! This module enforces the connection-level limits (`max_connections`,
//! head sizes, path rules, request ids) and graceful shutdown; [`http1`]
//! the connection timers and request framing. It does not read bodies.

mod http1;
mod http2;
mod request_body;

pub(crate) use http1::{lingering, LINGER_BYTES};
pub(crate) use request_body::{ClientBody, RequestBodyError};

use std::{
    cell::RefCell,
    future::Future,
    net::SocketAddr,
    pin::{pin, Pin},
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::BytesMut;
use http::{HeaderValue, Method, Response, Uri};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFuture, WaitForCancellationFutureOwned},
    task::TaskTracker,
};

use crate::{
    access_log::{AccessLog, Ending},
    admin,
    api::ApiError,
    body::GatewayBody,
    gateway::Shared,
    headers::{self, ClientHeaders},
    lanes::Lanes,
    proxy,
    snapshot::Snapshot,
    upstream::codec::Name,
};

pub(crate) use crate::reload::reload;

/// A client request's head as weir routes it: HTTP/1.1 heads are read in
/// place ([`ClientHeaders::Raw`]), HTTP/2 ones come as hyper's map.
#[derive(Debug)]
pub(crate) struct ClientHead {
    pub method: Method,
    pub uri: Uri,
    pub headers: ClientHeaders,
}

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
/// [`http1`] buffers this plus [`MAX_REQUEST_LINE_BYTES`] for a head and
/// answers 431 to one that does not fit; [`check_head`] to one that fits
/// but whose headers exceed this.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Request lines longer than this get 414 (SPEC "Framing": 8 KiB).
const MAX_REQUEST_LINE_BYTES: usize = 8 * 1024;

/// How long the accept loop backs off after an accept error such as EMFILE,
/// instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long connections still open when `shutdown_grace` ends get to
/// write their last words (a 503, an SSE `error` event) and close before
/// they are dropped: enough for a few small writes to a client that reads,
/// short enough that stopping stays prompt (a client that reads nothing
/// holds no shutdown up).
const CUT_FLUSH: Duration = Duration::from_millis(300);

/// Connections the separate admin listener (`admin_listen`) serves at once,
/// outside `max_connections`: probes and scrapes must get through when
/// clients have taken every client slot, which is when they matter most.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Serves one listener until `shutdown` is cancelled, then lets open
/// connections finish within `shutdown_grace`.
pub(crate) async fn serve(
    listener: TcpListener,
    role: Role,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    // Copied out of a guard dropped at once: a guard kept for the accept
    // loop's life would keep the start-up snapshot (its buckets, leases and
    // clients) alive after every reload.
    let mut timeouts = {
        let snapshot = shared.snapshot.load();
        let server = &snapshot.config.server;
        http1::Timeouts {
            header_read: server.header_read_timeout,
            idle: server.idle_timeout,
            write: server.request_timeout,
        }
    };
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
    // Connections are tracked (for the shutdown grace) by a TaskTracker,
    // not a JoinSet that would grow with every connection.
    let tracker = TaskTracker::new();
    // The admin listener has slots of its own: sharing `max_connections`
    // would let clients lock out probes, and its idle accept loop would
    // hold one of the clients' slots.
    let slots = match role {
        Role::Admin => Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS)),
        Role::Public | Role::Both => shared.connections.clone(),
    };
    loop {
        // Wait for a connection slot before accepting, so connections beyond
        // `max_connections` wait in the kernel's backlog instead of spinning.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
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
        // `request_timeout` follows reloads (for the connections accepted
        // after one); the header and idle timers need a restart.
        timeouts.write = shared.snapshot.load().config.server.request_timeout;
        let accepted = Accepted {
            peer,
            role,
            shared: shared.clone(),
            timeouts,
            // Its own token (cancelled with the listener's): a connection
            // polls its shutdown wait whenever it wakes, and each poll locks
            // the token's waiter list. One list shared by every connection
            // of every lane would pass its lock between CPUs on most
            // requests.
            shutdown: shutdown.child_token(),
            permit,
        };
        match &lanes {
            Some(lanes) => match stream.into_std() {
                // Re-registered with the lane's own reactor there.
                Ok(stream) => {
                    lanes.spawn(tracker.track_future(accepted.serve(Socket::Std(stream))))
                }
                Err(e) => tracing::debug!(%peer, error = %e, "accepted socket unusable"),
            },
            None => drop(tracker.spawn(accepted.serve(Socket::Tokio(stream)))),
        }
    }
    drop(listener);
    tracker.close();
    let grace = shared.snapshot.load().config.server.shutdown_grace;
    let closed = tokio::select! {
        () = tracker.wait() => true,
        () = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "shutdown grace passed with connections still open; closing them");
            false
        }
        () = shared.grace_over.cancelled() => {
            tracing::warn!("grace ended by a second signal; closing the connections still open");
            false
        }
    };
    if !closed {
        shared.cut.store(true, std::sync::atomic::Ordering::Relaxed);
        // Tells the connections still open (see `GraceEnd`): each answers a
        // request still waiting with a 503 `shutting_down`, ends a stream
        // with an SSE `error` event, and closes. They get `CUT_FLUSH` to
        // write that; whatever still runs after it is dropped.
        shared.grace_over.cancel();
        if tokio::time::timeout(CUT_FLUSH, tracker.wait())
            .await
            .is_err()
        {
            tracing::debug!("connections still open after the cut's flush; dropping them");
        }
    }
    // Stops the lane threads, dropping connections still open past the
    // grace, and waits for them, so every request they cut is logged
    // before the process exits.
    if let Some(lanes) = lanes {
        lanes.stop().await;
    }
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
    timeouts: http1::Timeouts,
    /// Cancelled on shutdown: idle connections close, busy ones after
    /// their response.
    shutdown: CancellationToken,
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
            timeouts,
            shutdown,
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
        // Counted on its lane for the busy poller while it is open.
        let _serving = crate::busy_poll::Serving::connection();
        let conn = http1::Conn {
            wire: Arc::new(request_body::Wire::new(stream, BytesMut::new())),
            peer,
            role,
            shared,
            timeouts,
            shutdown,
        };
        // The loop is boxed so that it can be dropped while the connection
        // is parked: the task itself stays small (one allocation more per
        // connection, none per request). The park's wait is boxed too, so
        // that a busy connection's task does not hold its 384 bytes.
        let mut resumed = None;
        let ended = loop {
            match Box::pin(conn.run(resumed)).await {
                http1::Ended::Parked(since) => {
                    #[cfg(test)]
                    tests::parked(peer);
                    if !Box::pin(conn.park(since)).await {
                        break http1::Ended::Closed;
                    }
                    resumed = Some(since);
                }
                ended => break ended,
            }
        };
        if let http1::Ended::Http2 = ended {
            let http1::Conn {
                wire,
                shared,
                shutdown,
                ..
            } = conn;
            // No request was served, so nothing else holds the connection.
            if let Ok(wire) = Arc::try_unwrap(wire) {
                let (stream, read) = wire.into_parts();
                // Boxed, as the HTTP/1.1 loop is: inline, its 2.5 KB would
                // be in every connection's task, parked ones included.
                Box::pin(http2::serve(
                    stream,
                    read.freeze(),
                    peer,
                    role,
                    shared,
                    timeouts,
                    shutdown,
                ))
                .await;
            }
        }
        drop(permit);
    }
}

pin_project_lite::pin_project! {
    /// One connection's wait for the end of `shutdown_grace` (or the second
    /// signal that ends it): first for its own shutdown token, then, once
    /// that is cancelled, for a child of [`Shared::grace_over`] made then.
    /// Until a shutdown starts, polling it locks nothing but the
    /// connection's own token (no line another connection or lane writes),
    /// and during one only its own child. Once resolved it stays so.
    pub(super) struct GraceEnd<'a> {
        #[pin]
        shutdown: WaitForCancellationFuture<'a>,
        #[pin]
        grace: Option<WaitForCancellationFutureOwned>,
        shared: &'a Shared,
    }
}

impl<'a> GraceEnd<'a> {
    /// The end of the grace for a connection whose shutdown token is
    /// `shutdown`.
    pub(super) fn new(shutdown: &'a CancellationToken, shared: &'a Shared) -> Self {
        Self {
            shutdown: shutdown.cancelled(),
            grace: None,
            shared,
        }
    }
}

impl Future for GraceEnd<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        // Ready again whenever polled once cancelled.
        if this.shutdown.poll(cx).is_pending() {
            return Poll::Pending;
        }
        if this.grace.is_none() {
            let grace = this.shared.grace_over.child_token().cancelled_owned();
            this.grace.set(Some(grace));
        }
        match this.grace.as_pin_mut() {
            Some(grace) => grace.poll(cx),
            // Set just above.
            None => Poll::Pending,
        }
    }
}

/// Routes one request and stamps `x-request-id` on its response
/// ([`stamp`]). A request not answered when `cutoff` resolves (the end
/// of `shutdown_grace` for its connection, [`GraceEnd`]) because it still
/// waits for its body, admission, a backend slot or the backend's head is
/// answered 503 `shutting_down` instead, logged with `ending="shutdown"`;
/// dropping the routing future settles its admission as a client that
/// left would.
async fn route<F: Future<Output = ()>>(
    head: ClientHead,
    body: ClientBody,
    shared: &Arc<Shared>,
    peer: SocketAddr,
    role: Role,
    cutoff: Pin<&mut F>,
) -> Response<GatewayBody> {
    let request_id = request_id(head.headers.value(Name::RequestId));
    // Loaded once: the whole request sees one routing state. A proxied
    // response's body takes this one over (`stamp`), so a request costs
    // one reference count on the snapshot, whose line every lane shares.
    let snapshot = shared.snapshot.load_full();
    let mut routing = Routing {
        log: None,
        shared,
        snapshot: &snapshot,
    };
    let log = routing.log.insert(AccessLog::new(
        request_id.clone(),
        peer,
        head.method.clone(),
        head.uri.clone(),
    ));
    let result = match check_head(&head) {
        Ok(()) => {
            // Pinned where it is made: `select!` then holds a reference,
            // not a move of the whole (kilobytes) future on every request.
            let dispatch = pin!(dispatch(
                &head,
                body,
                shared,
                &snapshot,
                peer,
                role,
                &request_id,
                log
            ));
            // The cutoff is polled only while the request waits (biased):
            // until a shutdown starts, that locks the connection's own
            // token, never anything another connection or lane touches.
            tokio::select! {
                biased;
                result = dispatch => result,
                () = cutoff => Err(ApiError::ShuttingDown),
            }
        }
        Err(error) => Err(error),
    };
    let ending = match &result {
        Err(ApiError::ShuttingDown) => Ending::Shutdown,
        _ => Ending::Complete,
    };
    // A client that left while sending its body keeps its line in
    // `routing`, whose drop writes it as any client that left (499,
    // `client_gone`); only one that half-closed and still reads gets the 400.
    let gone = matches!(result, Err(ApiError::ClientGone));
    let response = match result {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    let log = if gone { None } else { routing.log.take() };
    drop(routing);
    stamp(response, request_id, log, Some(snapshot), shared, ending)
}

/// The log line of a request that has no response yet. If the client
/// leaves first (the connection drops the routing future), the line is
/// still written, with nginx's status 499 ("client closed request") and
/// ending `client_gone`, and counted in `weir_requests_total`.
struct Routing<'a> {
    log: Option<AccessLog>,
    shared: &'a Shared,
    /// The request's snapshot, where the line finds its route.
    snapshot: &'a Snapshot,
}

impl Drop for Routing<'_> {
    fn drop(&mut self) {
        if let Some(mut log) = self.log.take() {
            log.status = CLIENT_CLOSED_REQUEST;
            log.emit(
                &self.shared.metrics,
                Some(self.snapshot),
                self.shared.gone(),
            );
        }
    }
}

/// nginx's non-standard status for a request its client abandoned.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// The answer to a request [`http1`] refuses before routing it (a head it
/// cannot parse or whose framing is ambiguous): the client's request id
/// if its headers were read (`client_id` when they were but the method or
/// target was not, else the head's), else a fresh one, and an access log line either
/// way (with `-` for the method and path a head that could not be parsed
/// never gave).
fn refuse(
    error: ApiError,
    head: Option<&ClientHead>,
    client_id: Option<HeaderValue>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> Response<GatewayBody> {
    let client_id = client_id.or_else(|| head.and_then(|h| h.headers.value(Name::RequestId)));
    let request_id = request_id(client_id);
    let log = match head {
        Some(head) => AccessLog::new(
            request_id.clone(),
            peer,
            head.method.clone(),
            head.uri.clone(),
        ),
        None => AccessLog::unparsed(request_id.clone(), peer),
    };
    stamp(
        error.into_response(),
        request_id,
        Some(log),
        None,
        shared,
        Ending::Complete,
    )
}

/// Puts `x-request-id` on a response and hands its access log line on:
/// written now for weir's own answers (with `ending`), by the body when it
/// ends for proxied ones, which also takes over the request's `snapshot`
/// (where its line, `x-weir-backend` and outlier reports find the route).
fn stamp(
    mut response: Response<GatewayBody>,
    request_id: HeaderValue,
    log: Option<AccessLog>,
    snapshot: Option<Arc<Snapshot>>,
    shared: &Arc<Shared>,
    ending: Ending,
) -> Response<GatewayBody> {
    match response.body_mut() {
        GatewayBody::Proxied(body) => body.set_request_id(request_id),
        GatewayBody::Full(_) => {
            response
                .headers_mut()
                .insert(headers::X_REQUEST_ID, request_id);
        }
    }
    if let Some(mut log) = log {
        log.status = response.status().as_u16();
        match response.body_mut() {
            GatewayBody::Proxied(body) => body.attach_log(log, snapshot),
            GatewayBody::Full(_) => log.emit(&shared.metrics, snapshot.as_deref(), ending),
        }
    }
    response
}

// The request's parts as separate borrows: `log` is written while the
// snapshot and the request id (which the log line also holds) are read.
#[allow(clippy::too_many_arguments)]
async fn dispatch(
    req: &ClientHead,
    body: ClientBody,
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    peer: SocketAddr,
    role: Role,
    request_id: &HeaderValue,
    log: &mut AccessLog,
) -> Result<Response<GatewayBody>, ApiError> {
    let path = req.uri.path();
    check_path(path)?;
    let public = role != Role::Admin;
    let operator = role != Role::Public;
    match path {
        "/healthz" => only_get(req).map(|()| admin::healthz()),
        "/readyz" => only_get(req).map(|()| admin::readyz(shared)),
        "/metrics" if operator => only_get(req).map(|()| admin::metrics(shared)),
        p if operator && p.starts_with("/admin/") => {
            admin::authorize(&req.headers, peer, snapshot)?;
            match p {
                "/admin/backends" => only_get(req).map(|()| admin::backends(shared)),
                "/admin/cluster" => only_get(req).map(|()| admin::cluster(shared)),
                "/admin/reload" => {
                    if req.method != Method::POST {
                        return Err(not_allowed(req, "POST"));
                    }
                    Ok(admin::reload_response(reload(shared).await))
                }
                _ => Err(unknown(req)),
            }
        }
        p if public && (p == "/v1" || p.starts_with("/v1/")) => {
            proxy::authorize(&req.headers, snapshot)?;
            // `/v1` itself is no route: forwarded, it would reach the
            // backend's base URL.
            if p == "/v1" {
                return Err(unknown(req));
            }
            if req.method == Method::GET || req.method == Method::HEAD {
                return proxy::models(p, snapshot);
            }
            if req.method != Method::POST {
                // GET answers only the models routes (elsewhere it is a 404);
                // POST goes anywhere under /v1.
                let models = p == "/v1/models" || p.starts_with("/v1/models/");
                return Err(not_allowed(
                    req,
                    if models { "GET, HEAD, POST" } else { "POST" },
                ));
            }
            check_forwarded_path(p)?;
            proxy::forward(req, body, shared, snapshot, request_id, log).await
        }
        _ => Err(unknown(req)),
    }
}

/// 405 unless the request is a GET or a HEAD (RFC 9110: a resource that
/// answers GET answers HEAD; the connection writes no body for it).
fn only_get(req: &ClientHead) -> Result<(), ApiError> {
    if req.method == Method::GET || req.method == Method::HEAD {
        Ok(())
    } else {
        Err(not_allowed(req, "GET, HEAD"))
    }
}

/// The 405 for `req` on a route that takes `allow`.
fn not_allowed(req: &ClientHead, allow: &'static str) -> ApiError {
    ApiError::MethodNotAllowed {
        method: req.method.to_string(),
        allow,
    }
}

fn unknown(req: &ClientHead) -> ApiError {
    ApiError::UnknownRoute {
        method: req.method.to_string(),
        path: req.uri.path().to_owned(),
    }
}

/// SPEC "Framing" on a parsed head: a request line over 8 KiB and headers
/// over 64 KiB in all. Each answer closes the connection. (Its
/// `Transfer-Encoding` rules are [`http1`]'s `request_framing`, applied
/// before routing; HTTP/2 refuses the header outright.)
fn check_head(req: &ClientHead) -> Result<(), ApiError> {
    // method, target, "HTTP/1.1" and two spaces
    let line = req.method.as_str().len() + target_len(&req.uri) + 10;
    if line > MAX_REQUEST_LINE_BYTES {
        return Err(ApiError::UriTooLong {
            limit: MAX_REQUEST_LINE_BYTES,
        });
    }
    if req.headers.section_len() > MAX_HEADER_BYTES {
        return Err(ApiError::HeadersTooLarge {
            limit: MAX_HEADER_BYTES,
        });
    }
    // HTTP/1.1 heads with more fields are refused while parsed; HTTP/2
    // ones get the same limit here (hyper's map counts each field).
    if let ClientHeaders::Map(map) = &req.headers {
        // Cookie crumbs (RFC 9113 §8.2.3 lets a client split its cookies
        // into one field each, for HPACK) count as the one line they are
        // on HTTP/1.1 and upstream.
        let crumbs = || map.get_all(http::header::COOKIE).iter().count();
        if map.len() > http1::MAX_HEADERS
            && map.len() - crumbs().saturating_sub(1) > http1::MAX_HEADERS
        {
            return Err(ApiError::TooManyHeaders {
                limit: http1::MAX_HEADERS,
            });
        }
    }
    check_authority(req)
}

/// SPEC "Framing" for the authority a request names besides `Host` (whose
/// HTTP/1.1 rules are [`http1`]'s): an absolute-form target's or HTTP/2's
/// `:authority` must name a host as `Host` must (no userinfo: RFC 9110
/// §4.2.4); an HTTP/2 request needs one of the two, at most one `Host`,
/// and a `Host` beside `:authority` must name the same host (RFC 9113
/// §8.3.1 asks to treat a mismatch as malformed). A backend that routes
/// or logs by the host it is told then never sees one weir did not check.
fn check_authority(req: &ClientHead) -> Result<(), ApiError> {
    let authority = req.uri.authority().map(|a| a.as_str().as_bytes());
    if authority.is_some_and(|a| !http1::is_host(a)) {
        return Err(ApiError::BadFraming(
            "a request authority that cannot name a host",
        ));
    }
    let ClientHeaders::Map(map) = &req.headers else {
        return Ok(());
    };
    let mut hosts = map.get_all(http::header::HOST).iter();
    let host = hosts.next().map(HeaderValue::as_bytes);
    if hosts.next().is_some() {
        return Err(ApiError::BadFraming("more than one Host header"));
    }
    match (authority, host) {
        (None, None) => Err(ApiError::BadFraming(
            "an HTTP/2 request without :authority or Host",
        )),
        (Some(authority), Some(host)) if !same_host(req, host, authority) => Err(
            ApiError::BadFraming("a Host header that differs from :authority"),
        ),
        (None, Some(host)) if !http1::is_host(host) => Err(ApiError::BadFraming(
            "a Host header that cannot name a host",
        )),
        _ => Ok(()),
    }
}

/// Whether `Host` and `:authority` name the same host: compared without
/// case and without the scheme's default port, which either may leave out
/// (`example.com` and `Example.com:443` on https are one entity).
fn same_host(req: &ClientHead, host: &[u8], authority: &[u8]) -> bool {
    let default_port: &[u8] = match req.uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("https") => b":443",
        _ => b":80",
    };
    let bare = |h: &'_ [u8]| -> Vec<u8> {
        let h = h.strip_suffix(default_port).unwrap_or(h);
        h.to_ascii_lowercase()
    };
    host.eq_ignore_ascii_case(authority) || bare(host) == bare(authority)
}

/// Bytes of the request target as the client sent it (origin or absolute
/// form).
fn target_len(uri: &Uri) -> usize {
    let scheme = uri.scheme_str().map_or(0, |s| s.len() + 3);
    let authority = uri.authority().map_or(0, |a| a.as_str().len());
    let path = uri.path_and_query().map_or(0, |p| p.as_str().len());
    scheme + authority + path
}

/// SPEC "Paths": a path with `.` or `..` segments (also percent-encoded) or
/// an empty segment is refused, so no backend ever sees a path that a
/// normalising server would resolve differently from weir.
pub(crate) fn check_path(path: &str) -> Result<(), ApiError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(ApiError::BadPath("the path must start with /"));
    };
    // `/` itself has no segment, empty or not: routing answers it (404).
    if rest.is_empty() {
        return Ok(());
    }
    for segment in rest.as_bytes().split(|&b| b == b'/') {
        if segment.is_empty() {
            return Err(ApiError::BadPath("empty path segment"));
        }
        if is_dot_segment(segment) {
            return Err(ApiError::BadPath("dot segments are not allowed"));
        }
    }
    Ok(())
}

/// The stricter rule for a path weir forwards (SPEC "Paths"): the backend
/// must see the segments weir saw. An encoded slash or backslash (`%2F`,
/// `%5C`, or `\`) would become a separator at a server that decodes them,
/// turning `..%2F..%2Fother` into two dot segments behind weir's check;
/// and `..;x` is a dot segment to servers that strip path parameters
/// (Tomcat, Spring). Paths weir answers itself (a model id with a `/`,
/// `GET /v1/models/a%2Fb`) are not forwarded and keep [`check_path`] alone.
fn check_forwarded_path(path: &str) -> Result<(), ApiError> {
    let bytes = path.as_bytes();
    // Most paths hold none of the three bytes a trick needs.
    if memchr::memchr3(b'%', b'\\', b';', bytes).is_none() {
        return Ok(());
    }
    // Each `%` read once: the byte it encodes, if it is one (RFC 3986: two
    // hex digits follow it).
    let mut encoded_separator = bytes.contains(&b'\\');
    let mut malformed = false;
    let mut nul = false;
    for at in memchr::memchr_iter(b'%', bytes) {
        match bytes.get(at + 1..at + 3).and_then(hex_byte) {
            Some(b'/' | b'\\') => encoded_separator = true,
            Some(0) => nul = true,
            Some(_) => {}
            None => malformed = true,
        }
    }
    if encoded_separator {
        return Err(ApiError::BadPath(
            "encoded slashes and backslashes are not allowed in a forwarded path",
        ));
    }
    // A backend would read `%zz` or a trailing `%` its own way (nginx
    // answers 400, as here).
    if malformed {
        return Err(ApiError::BadPath("malformed percent-encoding in the path"));
    }
    // A NUL decoded from `%00` ends the path early at a backend that reads
    // it as a C string (`..%00` would be `..` there); nginx answers 400
    // (`ngx_http_parse_complex_uri`), as here.
    if nul {
        return Err(ApiError::BadPath(
            "an encoded NUL (%00) is not allowed in a forwarded path",
        ));
    }
    for segment in bytes.split(|&b| b == b'/') {
        if let Some(end) = segment.iter().position(|&b| b == b';') {
            if segment
                .get(..end)
                .is_some_and(|s| s.is_empty() || is_dot_segment(s))
            {
                return Err(ApiError::BadPath("dot segments are not allowed"));
            }
        }
    }
    Ok(())
}

/// The byte two hex digits encode (`2f` is `/`); `None` for anything else.
fn hex_byte(digits: &[u8]) -> Option<u8> {
    let [high, low] = digits else { return None };
    let digit = |d: &u8| char::from(*d).to_digit(16);
    u8::try_from(digit(high)? * 16 + digit(low)?).ok()
}

/// Whether a path segment is `.` or `..`, with any dot written `%2e` or
/// `%2E` (checked without decoding: every request passes here).
fn is_dot_segment(segment: &[u8]) -> bool {
    let mut rest = segment;
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
fn request_id(client: Option<HeaderValue>) -> HeaderValue {
    if let Some(value) = client {
        let bytes = value.as_bytes();
        if (1..=128).contains(&bytes.len()) && bytes.iter().all(|b| b.is_ascii_graphic()) {
            return value;
        }
    }
    let id: u128 = rand::random();
    let mut hex = [0u8; 32];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(id.to_be_bytes()) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
    }
    FRESH_IDS.with_borrow_mut(|ids| {
        if ids.capacity() < hex.len() {
            // Reuses the last block in place once no id cut from it is
            // alive any more.
            ids.reserve(ID_BLOCK);
        }
        ids.extend_from_slice(&hex);
        HeaderValue::from_maybe_shared(ids.split().freeze())
            .unwrap_or(HeaderValue::from_static("0"))
    })
}

/// Each byte's two lowercase hex digits, so an id takes 16 lookups, not 32
/// shifts and masks.
const HEX_PAIRS: [[u8; 2]; 256] = {
    let digits = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [digits[i >> 4], digits[i & 0xf]];
        i += 1;
    }
    pairs
};

/// Bytes set aside at a time for fresh request ids: 128 of them.
const ID_BLOCK: usize = 4096;

thread_local! {
    /// Where fresh request ids are written, each then cut off as a shared
    /// slice: an id is copied into the upstream request, the response and
    /// the log line by reference count, and a block of them costs one
    /// allocation instead of two per id (its bytes, then a shared header
    /// for the first clone).
    static FRESH_IDS: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Mutex, PoisonError};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    /// The peers whose connection parked, one entry per park: a test tells
    /// its own connection from other tests' by its address.
    static PARKED: Mutex<Vec<SocketAddr>> = Mutex::new(Vec::new());

    pub(super) fn parked(peer: SocketAddr) {
        PARKED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(peer);
    }

    fn parks(peer: SocketAddr) -> usize {
        let list = PARKED.lock().unwrap_or_else(PoisonError::into_inner);
        list.iter().filter(|p| **p == peer).count()
    }

    /// Waits (10 s at most) until `peer`'s connection has parked `n` times.
    async fn until_parked(peer: SocketAddr, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while parks(peer) < n {
            assert!(
                Instant::now() < deadline,
                "{peer} parked {} times, not {n}",
                parks(peer)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a small chat completion and reads the whole answer; its status.
    async fn exchange(s: &mut tokio::net::TcpStream) -> String {
        let body = r#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: weir\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed mid-answer: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            let Some(end) = text.find("\r\n\r\n") else {
                continue;
            };
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")?
                        .parse()
                        .ok()
                })
                .expect("content-length");
            if got.len() >= end + 4 + length {
                return text.lines().next().unwrap_or_default().to_owned();
            }
        }
    }

    /// A keep-alive connection idle for PARK_AFTER gives up its loop's
    /// state and waits parked; its client's next request is served as
    /// before, the idle timer runs on from the last request, and shutdown
    /// closes it parked.
    #[tokio::test]
    async fn an_idle_keep_alive_connection_parks_and_serves_on() {
        let mock = crate::mock::start(crate::mock::MockConfig::default().models(vec!["m1".into()]))
            .await
            .unwrap();
        let toml = format!(
            "[server]\nidle_timeout = \"60s\"\n\n[[models]]\nname = \"m1\"\n\n\
             [[backends]]\nname = \"b1\"\nurl = \"{}\"\nmodels = [\"m1\"]\n\n\
             [health]\nenabled = false\n",
            mock.base_url()
        );
        let config = crate::config::Config::parse(&toml, "test.toml", &|_| None).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = crate::gateway::Gateway::new(config)
            .start_on(listener, None)
            .unwrap();
        let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
        let me = s.local_addr().unwrap();
        assert_eq!(exchange(&mut s).await, "HTTP/1.1 200 OK");
        until_parked(me, 1).await;
        assert_eq!(exchange(&mut s).await, "HTTP/1.1 200 OK");
        assert_eq!(exchange(&mut s).await, "HTTP/1.1 200 OK");
        until_parked(me, 2).await;
        gw.shutdown();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "not closed at shutdown: {read:?}"
        );
    }

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
            "/",
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
    fn forwarded_path_rules() {
        for ok in [
            "/v1/chat/completions",
            "/v1/a;b/x",
            "/v1/a%2e",
            "/v1/%25%32%66",
            "/v1/a%C3%A9",
        ] {
            assert!(check_forwarded_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/v1/..%2f..%2ftenant-b/chat/completions",
            "/v1/%2e%2e%2F%2e%2e%2Ftenant-b/x",
            "/v1/x%2f..%2f..%2fy",
            "/v1/a%5Cb",
            "/v1/a\\b",
            "/v1/..;x/admin",
            "/v1/.;/x",
            "/v1/%2e%2e;/x",
            "/v1/;x/y",
            "/v1/a%2",
            "/v1/a%zz/x",
            "/v1/x%",
            "/v1/%g0",
            "/v1/chat/..%00",
            "/v1/chat%00/completions",
        ] {
            assert!(check_forwarded_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        let good = HeaderValue::from_static("abc-123");
        assert_eq!(request_id(Some(good.clone())), good);
        let spaced = HeaderValue::from_static("has space");
        assert_ne!(request_id(Some(spaced.clone())), spaced);
        let long = HeaderValue::try_from("x".repeat(129)).unwrap();
        assert_eq!(request_id(Some(long)).len(), 32);
        assert_eq!(request_id(None).len(), 32);
    }

    #[test]
    fn hex_pairs_spell_each_byte() {
        for byte in 0..=255u8 {
            assert_eq!(
                HEX_PAIRS[usize::from(byte)],
                *format!("{byte:02x}").as_bytes()
            );
        }
    }

    #[test]
    fn fresh_request_ids_stay_intact_while_later_ones_are_made() {
        // More than one block of ids, all kept alive: none may be written
        // over by a later one, and none repeats.
        let ids: Vec<HeaderValue> = (0..3 * ID_BLOCK / 32).map(|_| request_id(None)).collect();
        let mut seen = std::collections::HashSet::new();
        for id in &ids {
            let text = id.to_str().unwrap();
            assert_eq!(text.len(), 32);
            assert!(text.bytes().all(|b| b.is_ascii_hexdigit()), "{text}");
            assert!(seen.insert(text.to_owned()), "repeated id {text}");
        }
        let copies: Vec<Vec<u8>> = ids.iter().map(|id| id.as_bytes().to_vec()).collect();
        // Dropping some and making more reuses blocks, never a live id.
        let kept: Vec<&HeaderValue> = ids.iter().step_by(2).collect();
        let more: Vec<HeaderValue> = (0..ID_BLOCK / 8).map(|_| request_id(None)).collect();
        for (id, copy) in kept.iter().zip(copies.iter().step_by(2)) {
            assert_eq!(id.as_bytes(), &copy[..]);
        }
        assert!(more.iter().all(|id| !seen.contains(id.to_str().unwrap())));
    }
}
