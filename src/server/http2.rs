//! HTTP/2 clients (prior knowledge, h2c), served by hyper.
//!
//! [`super::http1`] tells an HTTP/2 connection by its preface and hands the
//! socket over, with the bytes already read, to hyper's HTTP/2 server. h2
//! has no framing ambiguity to refuse; weir adds its connection timers.
//!
//! # Connection timers ([`ClientIo`])
//!
//! hyper's own timers do not tell an idle connection from a busy one, so
//! every HTTP/2 socket is wrapped in [`ClientIo`], which knows (through
//! [`ConnWatch`]) whether a request is being served: before the first
//! request, `header_read_timeout` applies; between requests,
//! `idle_timeout`; while a request is served, neither (`request_timeout`
//! bounds it). A timer that runs out sends GOAWAY, as shutdown does, and
//! the connection is cut [`GOAWAY_GRACE`] later if it is still open. A
//! client that takes no byte for `request_timeout` is cut.
//!
//! # Streams the client gives no window
//!
//! hyper polls a response body only when the client's flow-control window
//! has room, so a client that grants none would keep a response, and its
//! concurrency permit, reservation and backend request, past
//! `request_timeout`: the body's own deadline never gets polled. Each
//! proxied response therefore has a watchdog; a body still held
//! [`GOAWAY_GRACE`] after its deadline closes the connection (GOAWAY, then
//! cut), which drops it. weir's own answers (errors, the model list) have
//! one too, at `request_timeout` from the answer: without it a client
//! granting no window held the connection, unauthenticated, forever. A
//! client that reads slowly but grants window gets the body's own timeout
//! (an SSE `error` event) instead.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Response};
use hyper::{
    body::{Body, Frame, SizeHint},
    server::conn::http2,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::oneshot,
    time::{Instant, Sleep},
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::{http1::Timeouts, request_body::ClientBody, GraceEnd, Role, MAX_HEADER_BYTES};
use crate::{body::GatewayBody, gateway::Shared, headers::ClientHeaders, upstream::codec};

/// Serves an HTTP/2 connection until it closes; on shutdown, hyper's
/// graceful close (GOAWAY, in-flight streams finish).
pub(super) async fn serve(
    stream: TcpStream,
    prefix: Bytes,
    peer: SocketAddr,
    role: Role,
    shared: Arc<Shared>,
    timeouts: Timeouts,
    shutdown: CancellationToken,
) {
    let watch = Arc::new(ConnWatch::default());
    let expired = watch.expired.clone();
    let stuck = watch.stuck.clone();
    let resets = watch.reset_flood.clone();
    // Cancelled by this task when `shutdown_grace` ends (see `until_cut`):
    // the streams still waiting are answered 503, the SSE streams still
    // running get their `error` event (`ConnBody`).
    let cut = CancellationToken::new();
    let conn_cut = cut.clone();
    let grace_shared = shared.clone();
    // How long weir's own answer may wait for window: as long as a client
    // may take no byte of any response.
    let own_answer_limit = timeouts.write;
    let io = ClientIo::new(stream, prefix, watch.clone(), timeouts);
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        // Counted from the moment hyper hands the request over until it
        // drops the response body, so `ClientIo` never times out a
        // connection that is serving a request.
        let busy = Busy::new(watch.clone());
        let stuck = watch.stuck.clone();
        let shared = shared.clone();
        let cut = cut.clone();
        crate::busy_poll::head_read();
        async move {
            let (parts, body) = req.into_parts();
            // A HEAD answer has headers only (RFC 9110 §9.3.2); HTTP/1.1
            // writes none, and hyper's HTTP/2 would send the body as DATA.
            let head_request = parts.method == http::Method::HEAD;
            let head = super::ClientHead {
                method: parts.method,
                uri: parts.uri,
                headers: ClientHeaders::Map(parts.headers),
            };
            // Boxed: the routing future is most of a stream task's size,
            // and only needed until the response head. A stream then holds
            // its task (about 1 KiB) and its body, not the 3.7 KiB of
            // routing state besides, for as long as it streams (an
            // allocation a request; HTTP/1.1 keeps it inline, where the
            // connection's task is reused for each of its requests).
            let mut response = Box::pin(super::route(
                head,
                ClientBody::Http2(body),
                &shared,
                peer,
                role,
                std::pin::pin!(cut.cancelled()),
            ))
            .await;
            // HTTP/1.1 writes a proxied response's rate headers and a plain
            // backend's headers straight into the head (see
            // `ProxiedBody::backend_headers`); hyper needs them in the map.
            if let GatewayBody::Proxied(proxied) = response.body() {
                let backend: Vec<(HeaderName, HeaderValue)> = proxied
                    .backend_headers(response.headers())
                    .filter_map(|(_, name, value)| {
                        Some((
                            HeaderName::from_bytes(name).ok()?,
                            HeaderValue::from_bytes(value).ok()?,
                        ))
                    })
                    .collect();
                // One length, as read: never a backend's repeated or listed
                // one, which is a PROTOCOL_ERROR in HTTP/2 (RFC 9113 §8.1.1).
                let length = response.body().declared_length(response.headers());
                let rate = proxied.rate_headers().copied();
                let own: Vec<(HeaderName, HeaderValue)> = proxied
                    .own_headers()
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect();
                let (mut parts, mut body) = response.into_parts();
                for (name, value) in own {
                    parts.headers.insert(name, value);
                }
                for (name, value) in backend {
                    parts.headers.append(name, value);
                }
                parts.headers.remove(header::CONTENT_LENGTH);
                // None on a 204 or 304, whatever the backend said (RFC 9110
                // §8.6; a client reads a non-zero one as a body to wait for),
                // as an HTTP/1.1 head leaves it out.
                let bodiless = codec::bodiless(parts.status);
                if let Some(length) = length.filter(|_| !bodiless) {
                    parts.headers.insert(header::CONTENT_LENGTH, length.into());
                }
                if let Some(rate) = rate {
                    crate::api::insert_rate_headers(&mut parts.headers, &rate);
                }
                if let GatewayBody::Proxied(proxied) = &mut body {
                    proxied.release_backend_headers();
                }
                response = Response::from_parts(parts, body);
            }
            if head_request {
                // The same head as GET's, its length included (RFC 9110
                // §9.3.2), which hyper would otherwise take from the
                // empty body.
                let length = response.body().size_hint().exact();
                if let Some(length) = length {
                    if !response.headers().contains_key(header::CONTENT_LENGTH) {
                        response
                            .headers_mut()
                            .insert(header::CONTENT_LENGTH, length.into());
                    }
                }
                response = response.map(|_| GatewayBody::empty());
            }
            let (watchdog, cut) = match response.body() {
                GatewayBody::Proxied(proxied) => (
                    Some(watch_stuck(proxied.deadline(), stuck)),
                    Some(cut.cancelled_owned()),
                ),
                // An empty body needs no window (a zero-length DATA frame
                // is not flow-controlled).
                GatewayBody::Full(_) if response.body().size_hint().exact() == Some(0) => {
                    (None, None)
                }
                // A 404, a 401, the model list: a client granting no
                // window would hold the connection forever (no deadline
                // of a request bounds it, and the reader's timers stop
                // while a response is held).
                GatewayBody::Full(_) => (
                    Some(watch_stuck(Instant::now() + own_answer_limit, stuck)),
                    None,
                ),
            };
            // hyper would send a 204's empty body as `content-length: 0`,
            // which RFC 9110 §8.6 forbids (HTTP/1.1 heads leave it out).
            let no_length = codec::bodiless(response.status());
            Ok::<_, Infallible>(response.map(|inner| ConnBody {
                inner,
                no_length,
                cut,
                busy,
                _watchdog: watchdog,
            }))
        }
    });
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        // Twice weir's limit (h2 counts 32 bytes more per field): a head
        // over 64 KiB gets weir's own 431, with its JSON and request id,
        // not h2's bare one.
        .max_header_list_size(u32::try_from(2 * MAX_HEADER_BYTES).unwrap_or(u32::MAX))
        // SPEC "Slow clients": a few tens of KiB per stream, not h2's
        // 400 KiB, for a client that reads slowly.
        .max_send_buf_size(MAX_SEND_BUF)
        .keep_alive_interval(None);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    // A timer that runs out (see `ClientIo`) and shutdown both end the
    // connection with GOAWAY first (RFC 9113 §9.1), so a client knows which
    // of its requests were not taken.
    let grace_end = std::pin::pin!(GraceEnd::new(&shutdown, &grace_shared));
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            until_cut(conn, grace_end, &conn_cut).await
        }
        () = expired.cancelled() => {
            conn.as_mut().graceful_shutdown();
            until_cut(conn, grace_end, &conn_cut).await
        }
        () = resets.cancelled() => {
            tracing::info!(%peer, "the client cancelled half or more of its streams on this connection (at least 100): closing it");
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(GOAWAY_GRACE, conn.as_mut())
                .await
                .unwrap_or(Ok(()))
        }
        () = stuck.cancelled() => {
            tracing::debug!(%peer, "a response outlived request_timeout without window: closing");
            conn.as_mut().graceful_shutdown();
            // The stuck stream will not end by itself: cut what is left.
            tokio::time::timeout(GOAWAY_GRACE, conn.as_mut())
                .await
                .unwrap_or(Ok(()))
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Drives a connection that has sent GOAWAY until its streams are done;
/// if `grace_end` comes first, cancels `cut`, so that its streams answer
/// or end (503, SSE `error` event) and the connection can close, then
/// drives it on (what is still open when the accept loop's flush ends is
/// dropped with the lanes).
async fn until_cut<C: Future>(
    mut conn: Pin<&mut C>,
    grace_end: Pin<&mut GraceEnd<'_>>,
    cut: &CancellationToken,
) -> C::Output {
    tokio::select! {
        result = conn.as_mut() => result,
        () = grace_end => {
            cut.cancel();
            conn.await
        }
    }
}

/// What one HTTP/2 connection's requests tell its [`ClientIo`].
#[derive(Debug, Default)]
struct ConnWatch {
    /// Requests hyper has handed over whose response body it still holds.
    busy: AtomicUsize,
    /// The connection's reader while a request is served, woken when the
    /// last one ends so the idle timer starts even if no byte arrives.
    reader: Mutex<Option<Waker>>,
    /// Cancelled when a read deadline passes: the connection sends GOAWAY
    /// and closes.
    expired: CancellationToken,
    /// Cancelled when a response body outlives its deadline because the
    /// client gives it no window (see the module doc).
    stuck: CancellationToken,
    /// Streams handed over, and those the client cancelled before their
    /// response ended (reset, or the connection's request dropped).
    streams: AtomicU32,
    cancelled: AtomicU32,
    /// Cancelled when [`PREMATURE_RESETS`] says the client is resetting
    /// streams to make weir and its backends work for nothing (the "rapid
    /// reset" attack, also with each reset sent a little later, past h2's
    /// own guard): the connection is closed.
    reset_flood: CancellationToken,
}

/// Envoy's rule for premature resets: once a connection has had at least
/// `.0` streams, it is closed when the client cancelled half or more of
/// them. A client that stops a stream now and then never comes near it; one
/// that cancels thousands a second (each one a backend request weir sent
/// and a backend connection it closed) is cut after a hundred.
const PREMATURE_RESETS: (u32, u32) = (100, 2);

/// The most a stream buffers for a client that reads slowly.
const MAX_SEND_BUF: usize = 16 * 1024;

/// Watches a proxied response whose `request_timeout` ends at `deadline`:
/// unless the returned guard is dropped (the body ended, or hyper dropped
/// it) by [`GOAWAY_GRACE`] after that, cancels `stuck`.
fn watch_stuck(deadline: Instant, stuck: CancellationToken) -> oneshot::Sender<Infallible> {
    let (guard, mut ended) = oneshot::channel::<Infallible>();
    tokio::spawn(async move {
        tokio::select! {
            _ = &mut ended => {}
            () = tokio::time::sleep_until(deadline + GOAWAY_GRACE) => stuck.cancel(),
        }
    });
    guard
}

/// One request in [`ConnWatch::busy`], from hyper handing it over until
/// its response body is dropped; dropped before [`Busy::finish`], the
/// client cancelled it.
struct Busy {
    watch: Arc<ConnWatch>,
    /// The response ended, or weir ended it (set through `&self`, as
    /// hyper asks `is_end_stream` through a shared reference).
    finished: AtomicBool,
}

impl Busy {
    fn new(watch: Arc<ConnWatch>) -> Self {
        watch.busy.fetch_add(1, Ordering::AcqRel);
        watch.streams.fetch_add(1, Ordering::Relaxed);
        Self {
            watch,
            finished: AtomicBool::new(false),
        }
    }

    /// The response ended (or failed on weir's side): not the client's
    /// cancellation.
    fn finish(&self) {
        self.finished.store(true, Ordering::Relaxed);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let watch = &self.watch;
        if !self.finished.load(Ordering::Relaxed) {
            let cancelled = watch.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
            let streams = watch.streams.load(Ordering::Relaxed);
            let (least, share) = PREMATURE_RESETS;
            if streams >= least && cancelled.saturating_mul(share) >= streams {
                watch.reset_flood.cancel();
            }
        }
        if watch.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            let reader = (watch.reader.lock())
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(waker) = reader {
                waker.wake();
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body plus its request's [`Busy`] mark and, for a proxied
    /// one, its [`watch_stuck`] guard and `cut`, the connection's wait for
    /// the end of `shutdown_grace`: polled only when the body has nothing
    /// ready, it locks this connection's own token, nothing shared.
    struct ConnBody {
        inner: GatewayBody,
        // A 204 or 304: no length to announce (see `size_hint`).
        no_length: bool,
        #[pin]
        cut: Option<WaitForCancellationFutureOwned>,
        busy: Busy,
        _watchdog: Option<oneshot::Sender<Infallible>>,
    }
}

impl Body for ConnBody {
    type Data = Bytes;
    type Error = crate::body::BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let poll = Pin::new(&mut *this.inner).poll_frame(cx);
        if matches!(poll, Poll::Ready(None | Some(Err(_)))) {
            this.busy.finish();
        }
        if poll.is_ready() {
            return poll;
        }
        let cut = this.cut.as_mut().as_pin_mut().map(|cut| cut.poll(cx));
        if cut.is_none_or(|cut| cut.is_pending()) {
            return Poll::Pending;
        }
        this.cut.set(None);
        // weir ends it, not the client.
        this.busy.finish();
        // An SSE stream ends with its `error` event (then `None`: the
        // body is finished); another body is reset, as a backend failure
        // resets it.
        Poll::Ready(Some(match this.inner.cut_by_shutdown() {
            Some(last) => Ok(Frame::data(last)),
            None => Err(crate::body::BodyError::Shutdown),
        }))
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.busy.finish();
        }
        end
    }

    /// Unknown for a 204 or 304, so that hyper, which announces a known
    /// length, announces none.
    fn size_hint(&self) -> SizeHint {
        if self.no_length {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

/// Where a connection is between requests, for its read deadline.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// A head is due since this instant (the accept):
    /// `header_read_timeout` applies.
    Head(Instant),
    /// A request is being served: no read deadline.
    Busy,
    /// Idle since this instant (the last response ended): `idle_timeout`.
    /// Bytes read meanwhile do not end it: on HTTP/2 they are as likely a
    /// PING or a WINDOW_UPDATE as a request, and a client that pings to
    /// keep its connection must not be held to `header_read_timeout` for
    /// a head it never meant to send. A request that starts makes the
    /// connection busy.
    Idle(Instant),
}

/// How long a connection whose read deadline passed has to close after
/// its GOAWAY before it is cut.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// An accepted client socket with weir's read deadlines (see the module
/// doc). Every field is `Unpin`, so no projection is needed.
struct ClientIo {
    stream: TcpStream,
    /// Shared with the requests served on this connection.
    watch: Arc<ConnWatch>,
    /// The current read deadline; reset as the phase changes.
    timer: Pin<Box<Sleep>>,
    phase: Phase,
    /// Bytes read before the protocol was known, served before the socket.
    prefix: Bytes,
    /// Set when a read deadline passed and GOAWAY is on its way: the
    /// connection is cut if it has not closed by then, and why.
    closing: Option<(Instant, &'static str)>,
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
    fn new(stream: TcpStream, prefix: Bytes, watch: Arc<ConnWatch>, timeouts: Timeouts) -> Self {
        let now = Instant::now();
        Self {
            stream,
            watch,
            timer: Box::pin(tokio::time::sleep_until(now + timeouts.header_read)),
            phase: Phase::Head(now),
            prefix,
            closing: None,
            header_read_timeout: timeouts.header_read,
            idle_timeout: timeouts.idle,
            write_stall: None,
            write_stalled: false,
            write_timeout: timeouts.write,
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
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let busy = this.watch.busy.load(Ordering::Acquire) > 0;
        this.phase = match (this.phase, busy) {
            (_, true) => Phase::Busy,
            (Phase::Busy, false) => {
                let now = Instant::now();
                // A stream taken as GOAWAY went out has just ended: its
                // last frames get the whole grace to leave.
                if let Some((until, _)) = &mut this.closing {
                    *until = (*until).max(now + GOAWAY_GRACE);
                }
                Phase::Idle(now)
            }
            (phase, false) => phase,
        };
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => {
                let phase_deadline = match this.phase {
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
                let deadline = this.closing.map_or(phase_deadline, |(until, _)| until);
                if this.timer.deadline() != deadline {
                    this.timer.as_mut().reset(deadline);
                }
                if this.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if let Some((_, what)) = this.closing {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
                }
                // Say goodbye first: hyper sends GOAWAY (and a PING) and
                // closes once the client has answered, or GOAWAY_GRACE
                // runs out and the connection is cut.
                let what = match this.phase {
                    Phase::Idle(_) => "idle_timeout passed",
                    _ => "header_read_timeout passed",
                };
                let until = Instant::now() + GOAWAY_GRACE;
                this.closing = Some((until, what));
                this.watch.expired.cancel();
                this.timer.as_mut().reset(until);
                // Registers the waker for the grace.
                let _ = this.timer.as_mut().poll(cx);
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
