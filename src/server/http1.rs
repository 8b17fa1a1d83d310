//! weir's HTTP/1.1 server side: one loop per client connection that reads a
//! request head, hands the request to [`super::route`], writes the response
//! and goes round again.
//!
//! It replaces hyper's HTTP/1.1 server for the same reason weir has its own
//! upstream client (`crate::upstream`): a proxy's hot path is head in, head
//! out, and hyper's general machinery (dispatcher, buffered transport,
//! header-map encoding, a read wrapper for the timers) cost more than the
//! rest of the request put together. What it does, by RFC 9112:
//!
//! - Heads are parsed by `httparse` (hyper's parser) into zero-copy header
//!   values; framing is decided here, and anything ambiguous (SPEC
//!   "Framing": `Content-Length` beside `Transfer-Encoding`, a
//!   `Transfer-Encoding` other than one `chunked`, differing lengths) is
//!   answered 400 and the connection closed.
//! - The body is read from the socket by whoever holds it
//!   ([`super::request_body`]); `Expect: 100-continue` is answered when it is
//!   first read.
//! - Responses are framed by `Content-Length` when known, chunked otherwise
//!   (HTTP/1.0: until close). Head and ready body bytes go out in one write.
//! - HTTP/1.0 keeps the connection only on `Connection: keep-alive`, and
//!   the answer then says `connection: keep-alive`.
//! - Timers: `header_read_timeout` from the accept or the first byte of a
//!   head, `idle_timeout` between requests, neither while a request is served;
//!   a client that takes no byte of the response for `request_timeout` is cut.
//! - While the response waits for the backend, a client that closes its
//!   connection is noticed at once, and the response (and with it the
//!   upstream request) dropped.
//! - Keep-alive and pipelining; graceful shutdown closes idle connections
//!   at once and busy ones after their response.
//!
//! HTTP/2 (prior knowledge) is detected from the first bytes and handed to
//! hyper ([`super::http2`]).

use std::{
    cell::RefCell,
    future::poll_fn,
    io,
    mem::MaybeUninit,
    net::SocketAddr,
    pin::{pin, Pin},
    sync::Arc,
    task::Poll,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
#[cfg(test)]
use bytes::BytesMut;
use http::{header, HeaderMap, HeaderValue, Method, Response, Uri, Version};
use hyper::body::Body;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::{
    request_body::{ClientBody, Inbound, RequestBody, Wire},
    ClientHead, GraceEnd, Role, MAX_HEADER_BYTES, MAX_REQUEST_LINE_BYTES,
};
use crate::{
    admission::limiter::RateHeaders,
    api::{self, ApiError},
    body::{GatewayBody, ProxiedBody},
    gateway::Shared,
    headers::ClientHeaders,
    socket,
    spare::{self, Spares},
    upstream::codec::{self, Name, RawHeaders},
};

/// The HTTP/2 connection preface a prior-knowledge client opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Header lines per request head (hyper's limit); more get 431.
pub(super) const MAX_HEADERS: usize = 100;

/// Bytes buffered for a head before it counts as too large (431): the
/// header limit plus the longest request line, as before with hyper.
const MAX_HEAD_BUFFER: usize = MAX_HEADER_BYTES + MAX_REQUEST_LINE_BYTES;

/// Response bytes gathered before they are written: what a stream whose
/// client stops reading holds here at most, beside one frame (SPEC: a few
/// tens of KiB per stream).
const FLUSH_BYTES: usize = 16 * 1024;

/// Body frames at least this large are written as they are, not copied
/// into the output buffer.
const DIRECT_WRITE: usize = 16 * 1024;

/// How long a keep-alive connection waits for its client's next request
/// before it gives up the loop's state (the [`Conn::run`] future, ~5.3 KB
/// with the request's routing in it) and waits holding its socket only
/// ([`Conn::park`]). A busy client's next request comes well within it, so
/// a loaded connection never parks and pays nothing; an SDK's pauses
/// between requests (seconds) are far longer, and its idle connection then
/// costs 2.5 KB instead of 6.6 (`benches/idle.sh`).
pub(super) const PARK_AFTER: Duration = Duration::from_millis(100);

/// Bytes read ahead of the next request (pipelining) while a response is
/// written; past this the client is not read until the response ends.
const MAX_READ_AHEAD: usize = 64 * 1024;

/// An unread request body this small is read and dropped after the
/// response, so the connection can be kept; a larger one closes it.
const DRAIN_LIMIT: u64 = 64 * 1024;

/// How long, and how many bytes, a lingering close reads (see
/// [`Conn::close`], and `proxy::linger` for an HTTP/2 stream); nginx's
/// `lingering_timeout` is 5 s too.
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(5);
pub(crate) const LINGER_BYTES: usize = 64 * 1024 * 1024;
/// How much longer a lingering close (or drain) goes on once a shutdown
/// starts: enough for a client still sending to see its answer's end, not
/// the 5 s of an exit held up with nothing in flight.
pub(crate) const LINGER_AT_SHUTDOWN: Duration = Duration::from_secs(1);

/// The per-connection settings, from `[server]` at accept time.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    pub header_read: Duration,
    pub idle: Duration,
    /// How long a client may take no byte of a response.
    pub write: Duration,
}

/// One client connection.
pub(super) struct Conn {
    pub wire: Arc<Wire>,
    pub peer: SocketAddr,
    pub role: Role,
    pub shared: Arc<Shared>,
    pub timeouts: Timeouts,
    pub shutdown: CancellationToken,
}

/// How a connection's loop ended.
pub(super) enum Ended {
    /// Closed (by either side, a timer, an error or shutdown).
    Closed,
    /// The client opened with the HTTP/2 preface: serve it with hyper.
    Http2,
    /// Idle since this instant for [`PARK_AFTER`], nothing of a next
    /// request read: the caller drops the loop's state and waits in
    /// [`Conn::park`], then runs the loop again from there.
    Parked(Instant),
}

/// A request head taken off the buffer.
#[derive(Debug)]
struct Head {
    head: ClientHead,
    version: Version,
    keep_alive: bool,
}

/// A head refused before routing: the error, and the head when it was
/// parsed far enough to have a method and path.
#[derive(Debug)]
struct Refusal {
    error: ApiError,
    head: Option<ClientHead>,
    /// The client's `x-request-id` when its headers were parsed but its
    /// method or target was not (a `head` carries its own), so the answer
    /// still names the client's id (SPEC: every response carries it).
    request_id: Option<HeaderValue>,
}

impl Refusal {
    fn new(error: ApiError) -> Box<Self> {
        Box::new(Self {
            error,
            head: None,
            request_id: None,
        })
    }
}

/// What a connection waits on between requests, made once for its life.
/// Re-arming a registered tokio timer for a later deadline (the idle timer
/// moves on with every request) only updates the entry, and the shutdown
/// wait stays in its waiter list, where a `timeout_at` and a `cancelled()`
/// per request would each add an entry and remove it again.
struct Waits<'t, 's> {
    /// `header_read_timeout` or `idle_timeout`, whichever runs.
    timer: Pin<&'t mut Sleep>,
    shutdown: Pin<&'t mut WaitForCancellationFuture<'s>>,
}

/// What the next read of the connection gave. Not boxed: it lives on the
/// stack for one request, and boxing the head would allocate per request.
#[allow(clippy::large_enum_variant)]
enum Next {
    Head(Head),
    /// Refuse and close.
    Refuse(Box<Refusal>),
    Http2,
    Closed,
    /// Idle for [`PARK_AFTER`] with nothing read: park.
    Park,
}

impl Conn {
    /// Serves requests until the connection closes or parks. `resumed`:
    /// the connection parked, idle since then, and its client has sent
    /// again (or it closed).
    pub(super) async fn run(&self, resumed: Option<Instant>) -> Ended {
        // Taken in `respond`, given back while the client is quiet.
        let mut out = Vec::new();
        // Before the first request the head timer runs from the accept;
        // after a park the idle timer runs on from the last request.
        let mut since = resumed.unwrap_or_else(Instant::now);
        let mut idle = resumed.is_some();
        let mut first = resumed.is_none();
        let mut waits = Waits {
            timer: pin!(tokio::time::sleep_until(since + self.timeouts.header_read)),
            shutdown: pin!(self.shutdown.cancelled()),
        };
        // Made once per connection, like `waits`; polled only while a
        // request waits or its body has nothing ready.
        let mut grace_end = pin!(GraceEnd::new(&self.shutdown, &self.shared));
        loop {
            let head = match self
                .next_head(&mut waits, &mut out, &mut since, &mut idle, first)
                .await
            {
                Next::Head(head) => head,
                Next::Refuse(refusal) => {
                    let Refusal {
                        error,
                        head,
                        request_id,
                    } = *refusal;
                    let response =
                        super::refuse(error, head.as_ref(), request_id, self.peer, &self.shared);
                    // A HEAD gets its refusal without a body (RFC 9110 §9.3.2).
                    let method = match &head {
                        Some(head) if head.method == Method::HEAD => Method::HEAD,
                        _ => Method::GET,
                    };
                    let _ = self
                        .respond(
                            response,
                            &mut out,
                            &method,
                            (Version::HTTP_11, true),
                            grace_end.as_mut(),
                        )
                        .await;
                    // What the client still sends of the refused request is
                    // unread.
                    self.close(true).await;
                    return Ended::Closed;
                }
                Next::Http2 => return Ended::Http2,
                Next::Closed => return Ended::Closed,
                Next::Park => return Ended::Parked(since),
            };
            first = false;
            let keep = self.serve(head, &mut out, grace_end.as_mut()).await;
            if !keep || self.shutdown.is_cancelled() {
                let unread = !self.wire.inbound().framing.is_done();
                self.close(unread).await;
                return Ended::Closed;
            }
            since = Instant::now();
            idle = true;
        }
    }

    /// Routes one request and writes its response; whether the connection
    /// can carry another. When `grace_end` resolves first, the request is
    /// answered 503 or its stream ended (see [`Conn::respond`]).
    async fn serve(
        &self,
        head: Head,
        out: &mut Vec<u8>,
        mut grace_end: Pin<&mut GraceEnd<'_>>,
    ) -> bool {
        let Head {
            head,
            version,
            keep_alive,
        } = head;
        let method = head.method.clone();
        let body = ClientBody::Http1(RequestBody::new(self.wire.clone()));
        // A client that goes away while its request waits (for a slot, a
        // backend) cancels it, as it would with hyper. The routing future
        // ends in this block, so the response writer below reuses its space.
        let response = {
            let route = pin!(super::route(
                head,
                body,
                &self.shared,
                self.peer,
                self.role,
                grace_end.as_mut(),
            ));
            tokio::select! {
                biased;
                response = route => response,
                () = self.client_gone() => return false,
            }
        };
        let keep = self
            .respond(response, out, &method, (version, !keep_alive), grace_end)
            .await;
        keep && self.finish_request_body().await
    }

    /// Reads until a whole request head is buffered. Between requests the
    /// idle timer runs until the first byte, then the head timer.
    async fn next_head(
        &self,
        waits: &mut Waits<'_, '_>,
        out: &mut Vec<u8>,
        since: &mut Instant,
        idle: &mut bool,
        first: bool,
    ) -> Next {
        loop {
            {
                let mut inbound = self.wire.inbound();
                if !inbound.buf.is_empty() {
                    if first && inbound.buf.starts_with(H2_PREFACE) {
                        return Next::Http2;
                    }
                    // The first bytes of an HTTP/2 preface: read on.
                    let maybe_h2 = first
                        && inbound.buf.len() < H2_PREFACE.len()
                        && H2_PREFACE.starts_with(&inbound.buf);
                    if !maybe_h2 {
                        crate::busy_poll::head_read();
                        match parse_head(&mut inbound) {
                            Ok(Some(head)) => return Next::Head(head),
                            Ok(None) => {}
                            Err(refusal) => return Next::Refuse(refusal),
                        }
                    }
                    // Part of a head: its timer runs from now (read only
                    // when a head is incomplete, not for every request).
                    if *idle {
                        *idle = false;
                        *since = Instant::now();
                    }
                }
                if inbound.eof {
                    return Next::Closed;
                }
                // Readiness is cached by tokio: no syscall when none is known.
                inbound.make_room(READ_AHEAD_CHUNK);
                match socket::try_read_buf(&self.wire.stream, &mut inbound.buf) {
                    Ok(0) => return Next::Closed,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if inbound.buf.is_empty() {
                            // Nothing of a request yet: the connection waits
                            // holding no buffers, so an idle keep-alive
                            // connection costs its task and socket only.
                            inbound.release_buffer();
                            release_out(out);
                        }
                    }
                    Err(_) => return Next::Closed,
                }
            }
            let waiting_for_first_byte = *idle || first;
            // Idle, the timer runs to the park, or to `idle_timeout` when
            // that comes first; it then closes the connection.
            let parks = *idle && PARK_AFTER < self.timeouts.idle;
            let deadline = *since
                + if parks {
                    PARK_AFTER
                } else if *idle {
                    self.timeouts.idle
                } else {
                    self.timeouts.header_read
                };
            if waits.timer.deadline() != deadline {
                waits.timer.as_mut().reset(deadline);
            }
            tokio::select! {
                biased;
                () = waits.shutdown.as_mut(), if waiting_for_first_byte && self.wire.inbound().buf.is_empty() => {
                    return Next::Closed
                }
                readable = self.wire.stream.readable() => {
                    if readable.is_err() {
                        return Next::Closed;
                    }
                }
                () = waits.timer.as_mut() => return if parks { Next::Park } else { Next::Closed },
            }
        }
    }

    /// Waits for a parked connection's client to send again (or close):
    /// `true`, run the loop again. `false` when `idle_timeout` from `since`
    /// passes first, or shutdown starts: the caller drops the connection,
    /// as the loop would have.
    pub(super) async fn park(&self, since: Instant) -> bool {
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => false,
            readable = self.wire.stream.readable() => readable.is_ok(),
            () = tokio::time::sleep_until(since + self.timeouts.idle) => false,
        }
    }

    /// Writes `response`; whether the connection can carry another request.
    /// `close`: the connection closes after it whatever the response says.
    /// A body still waiting for the backend when `grace_end` resolves is
    /// ended there ([`GatewayBody::cut_by_shutdown`]): an SSE stream with
    /// its `error` event and its framing's end, then the connection closes.
    async fn respond(
        &self,
        response: Response<GatewayBody>,
        out: &mut Vec<u8>,
        method: &Method,
        (version, mut close): (Version, bool),
        mut grace_end: Pin<&mut GraceEnd<'_>>,
    ) -> bool {
        let (parts, mut body) = response.into_parts();
        // `Connection: close` in the response (weir's refusals set it).
        close |= self.shutdown.is_cancelled()
            || !codec::keep_alive(
                Version::HTTP_11,
                codec::values(&parts.headers, &header::CONNECTION),
            );
        let status = parts.status;
        let bodiless =
            method == Method::HEAD || codec::bodiless(status) || status.is_informational();
        // 204, 304 and 1xx carry no length (RFC 9110 §8.6); HEAD says what
        // GET would have sent.
        let no_content = bodiless && method != Method::HEAD;
        let proxied = match &body {
            GatewayBody::Proxied(proxied) => Some(&**proxied),
            GatewayBody::Full(_) => None,
        };
        let declared = body.declared_length(&parts.headers);
        let mut framing = match declared.or_else(|| body.size_hint().exact()) {
            Some(n) => Out::Length(n),
            None if bodiless => Out::Length(0),
            None if version == Version::HTTP_10 => {
                close = true;
                Out::UntilClose
            }
            None => Out::Chunked,
        };
        {
            let mut inbound = self.wire.inbound();
            inbound.responding = true;
            // A body left unread that is too long to drain after the answer
            // (an early 401 or 404, say), or of unknown length (chunked),
            // means this connection closes: the answer says so. So does
            // one whose client may still wait for `100 Continue` (an early
            // refusal, the body not all here): it may send its body or skip
            // it, and what comes next on the wire could be either (RFC 9110
            // §10.1.1).
            let framing = &inbound.framing;
            let remaining = framing.remaining();
            let arrived = remaining.is_some_and(|n| inbound.buf.len() as u64 >= n);
            close |= !framing.is_done()
                && ((inbound.continue_due && !arrived)
                    || remaining.is_none_or(|n| n > DRAIN_LIMIT));
        }

        take_out(out);
        out.clear();
        let write_length = !no_content;
        let head = ResponseHead {
            status,
            headers: &parts.headers,
            rate: proxied.and_then(ProxiedBody::rate_headers),
            proxied,
            framing: &framing,
            write_length,
            close,
            http10: version == Version::HTTP_10,
        };
        head.encode(out);
        if let GatewayBody::Proxied(proxied) = &mut body {
            proxied.release_backend_headers();
        }
        if bodiless {
            let sent = self.write_all(out).await.is_ok();
            if let (true, GatewayBody::Proxied(proxied)) = (sent, &mut body) {
                // The head was the whole answer (a backend's 204 or 304).
                proxied.end_without_body();
            }
            return sent && !close;
        }
        let mut body = pin!(body);
        loop {
            // What the body has ready goes into `out`; only when it has
            // nothing ready is `out` written and the next frame awaited,
            // noticing meanwhile a client that goes away.
            let next = match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
                Poll::Ready(next) => next,
                Poll::Pending => {
                    if self.write_all(out).await.is_err() {
                        return false;
                    }
                    out.clear();
                    if matches!(framing, Out::Length(0)) {
                        // All the declared bytes are out; whatever else the
                        // body holds cannot be sent.
                        return false;
                    }
                    // A stream between events holds no output buffer.
                    release_out(out);
                    let next = tokio::select! {
                        biased;
                        next = poll_fn(|cx| body.as_mut().poll_frame(cx)) => next,
                        () = self.client_gone() => return false,
                        () = grace_end.as_mut() => {
                            if let Some(last) = body.as_mut().get_mut().cut_by_shutdown() {
                                take_out(out);
                                if self.push(out, last, &mut framing).await.is_ok() {
                                    finish(out, &framing);
                                    let _ = self.write_all(out).await;
                                }
                            }
                            return false;
                        }
                    };
                    take_out(out);
                    next
                }
            };
            match next {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if self.push(out, data, &mut framing).await.is_err() {
                            return false;
                        }
                    }
                    if out.len() >= FLUSH_BYTES {
                        if self.write_all(out).await.is_err() {
                            return false;
                        }
                        out.clear();
                    }
                }
                Some(Err(_)) => {
                    // Cut short: the client sees the connection close
                    // without the end of the body.
                    let _ = self.write_all(out).await;
                    return false;
                }
                None => {
                    let complete = finish(out, &framing);
                    return self.write_all(out).await.is_ok() && complete && !close;
                }
            }
        }
    }

    /// Adds one body frame to `out` in the response's framing; a large
    /// frame is written straight away instead of copied.
    async fn push(&self, out: &mut Vec<u8>, data: Bytes, framing: &mut Out) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let data = match framing {
            Out::Length(left) => {
                // Never more than declared.
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                *left -= take as u64;
                data.slice(..take)
            }
            Out::Chunked => {
                push_hex(out, data.len());
                out.extend_from_slice(b"\r\n");
                data
            }
            Out::UntilClose => data,
        };
        if data.len() >= DIRECT_WRITE {
            self.write_all(out).await?;
            out.clear();
            self.write_all(&data).await?;
        } else {
            out.extend_from_slice(&data);
        }
        if let Out::Chunked = framing {
            out.extend_from_slice(b"\r\n");
        }
        Ok(())
    }

    /// Writes all of `bytes`, giving the client `timeouts.write` to take
    /// each next byte.
    async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.wire.stream.try_write(bytes) {
                Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::time::timeout(self.timeouts.write, self.wire.stream.writable())
                        .await
                        .map_err(|_| {
                            io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the client took no byte within request_timeout",
                            )
                        })??;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Resolves when the client closes its connection (or it fails), once
    /// the request body is no longer being read; reads ahead of a
    /// pipelined request meanwhile, up to [`MAX_READ_AHEAD`].
    async fn client_gone(&self) {
        poll_fn(|cx| {
            if self.wire.body_held() {
                // Re-polled whenever the task wakes, e.g. when the route
                // that holds the body makes progress.
                return Poll::Pending;
            }
            let mut inbound = self.wire.inbound();
            loop {
                if inbound.eof {
                    return Poll::Ready(());
                }
                if inbound.buf.len() >= MAX_READ_AHEAD {
                    return Poll::Pending;
                }
                match self.wire.poll_fill(cx, &mut inbound) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                    Poll::Ready(Ok(_)) => {}
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    }

    /// After the response: waits for whoever still reads the request body
    /// (the drain after a 413), then reads and drops what is left of a
    /// small body. Whether the connection is still usable.
    async fn finish_request_body(&self) -> bool {
        self.wire.body_released().await;
        {
            // The usual case: the body was read to its end.
            let mut inbound = self.wire.inbound();
            if inbound.framing.is_done() {
                inbound.responding = false;
                inbound.continue_due = false;
                return true;
            }
        }
        let deadline = Instant::now() + self.timeouts.header_read;
        let mut drained = 0u64;
        let drain = poll_fn(|cx| {
            let mut inbound = self.wire.inbound();
            let inbound = &mut *inbound;
            inbound.responding = false;
            inbound.continue_due = false;
            loop {
                match inbound.framing.decode(&mut inbound.buf) {
                    Ok(Some(data)) => {
                        drained += data.len() as u64;
                        if drained > DRAIN_LIMIT {
                            return Poll::Ready(false);
                        }
                        continue;
                    }
                    Ok(None) if inbound.framing.is_done() => return Poll::Ready(true),
                    Ok(None) => {}
                    Err(_) => return Poll::Ready(false),
                }
                if inbound.eof || inbound.framing.remaining().is_some_and(|n| n > DRAIN_LIMIT) {
                    return Poll::Ready(false);
                }
                match self.wire.poll_fill(cx, inbound) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(false),
                    Poll::Ready(Ok(_)) => {}
                    Poll::Pending => return Poll::Pending,
                }
            }
        });
        tokio::time::timeout_at(deadline, drain)
            .await
            .unwrap_or(false)
    }

    /// Sends FIN after the last response, so a client reading until close
    /// sees the end at once; the socket closes when the connection drops.
    ///
    /// With `unread` input (a body weir answered without reading, a refused
    /// request), this is nginx's lingering close: closing a socket with
    /// unread bytes makes the kernel send a reset, which can destroy the
    /// answer before the client reads it. So weir first reads and drops
    /// what the client still sends, until it closes its side, for at most
    /// [`LINGER_TIME`] and [`LINGER_BYTES`], and during a shutdown for at
    /// most [`LINGER_AT_SHUTDOWN`] (from the shutdown's start, or from the
    /// close, whichever is later).
    async fn close(&self, unread: bool) {
        let _ = socket2::SockRef::from(&self.wire.stream).shutdown(std::net::Shutdown::Write);
        if !unread {
            return;
        }
        let mut dropped = 0usize;
        let drain = poll_fn(|cx| {
            let mut inbound = self.wire.inbound();
            let inbound = &mut *inbound;
            loop {
                inbound.buf.clear();
                match self.wire.poll_fill(cx, inbound) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                    Poll::Ready(Ok(n)) => {
                        dropped = dropped.saturating_add(n);
                        if dropped > LINGER_BYTES {
                            return Poll::Ready(());
                        }
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        });
        lingering(drain, &self.shutdown).await;
    }
}

/// Runs `drain` (reading and dropping what a client still sends) for at
/// most [`LINGER_TIME`], and no longer than [`LINGER_AT_SHUTDOWN`] past
/// `shutdown`'s cancellation (or its own start, if later): the lingering
/// close above and an HTTP/2 stream's drain after a 413 (`proxy::linger`).
pub(crate) async fn lingering(drain: impl std::future::Future, shutdown: &CancellationToken) {
    let stopped_a_while = async {
        shutdown.cancelled().await;
        tokio::time::sleep(LINGER_AT_SHUTDOWN).await;
    };
    tokio::select! {
        _ = tokio::time::timeout(LINGER_TIME, drain) => {}
        () = stopped_a_while => {}
    }
}

/// Bytes reserved in the read buffer before each read.
const READ_AHEAD_CHUNK: usize = 8 * 1024;
/// Room for a typical response head (and a small body behind it).
const OUT_CAPACITY: usize = 4 * 1024;
/// Spare response buffers kept per thread (see [`SPARE_OUTS`]).
const SPARE_OUT_BUFFERS: usize = 32;
/// Response buffers grown past this (a large body) are freed, not kept.
const MAX_SPARE_OUT: usize = 2 * FLUSH_BYTES;

thread_local! {
    /// Response buffers of connections waiting for their client's next
    /// request (see [`crate::spare`]).
    static SPARE_OUTS: Spares<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Takes this thread's spare response buffer if `out` holds none.
fn take_out(out: &mut Vec<u8>) {
    if out.capacity() == 0 {
        *out = spare::take(&SPARE_OUTS);
        out.reserve(OUT_CAPACITY);
    }
}

/// Gives the response buffer to this thread's spares, emptied, while the
/// connection waits (for its client, or for a stream's next event);
/// [`take_out`] takes one back.
fn release_out(out: &mut Vec<u8>) {
    let mut buf = std::mem::take(out);
    buf.clear();
    spare::keep(&SPARE_OUTS, buf, SPARE_OUT_BUFFERS, MAX_SPARE_OUT);
}

/// How a response body is framed on the wire.
enum Out {
    /// `Content-Length`: this many bytes still to send.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// HTTP/1.0 without a known length: the body ends with the connection.
    UntilClose,
}

/// Appends what ends the body in its framing; whether the body was whole.
fn finish(out: &mut Vec<u8>, framing: &Out) -> bool {
    match framing {
        Out::Length(left) => *left == 0,
        Out::Chunked => {
            out.extend_from_slice(b"0\r\n\r\n");
            true
        }
        Out::UntilClose => true,
    }
}

/// Takes a complete request head off the front of the buffer and sets up
/// its body's framing. `Ok(None)`: not complete yet. A refusal carries the
/// request when the head was parsed far enough to have one.
fn parse_head(inbound: &mut Inbound) -> Result<Option<Head>, Box<Refusal>> {
    let buf = &mut inbound.buf;
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let too_large = || {
        Refusal::new(ApiError::HeadersTooLarge {
            limit: MAX_HEADER_BYTES,
        })
    };
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        // A request line still unended past its limit is a 414 (SPEC
        // "Framing"), however much of it has arrived.
        Ok(httparse::Status::Partial)
            if buf.len() > MAX_REQUEST_LINE_BYTES + 2
                && buf
                    .get(..MAX_REQUEST_LINE_BYTES + 2)
                    .is_some_and(|line| memchr::memchr(b'\n', line).is_none()) =>
        {
            return Err(Refusal::new(ApiError::UriTooLong {
                limit: MAX_REQUEST_LINE_BYTES,
            }))
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BUFFER => return Err(too_large()),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(ApiError::TooManyHeaders {
                limit: MAX_HEADERS,
            }))
        }
        Err(_) => return Err(Refusal::new(ApiError::BadFraming("malformed request head"))),
    };
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let base = buf.as_ptr() as usize;
    let span = |s: &str| {
        let start = s.as_ptr() as usize - base;
        (start, start + s.len())
    };
    let method = span(parsed.method.unwrap_or_default());
    let target = span(parsed.path.unwrap_or_default());
    let spans = codec::Spans::new(buf, parsed.headers);
    let raw = buf.split_to(len).freeze();
    let method = Method::from_bytes(raw.get(method.0..method.1).unwrap_or_default());
    let uri = Uri::from_maybe_shared(raw.slice(target.0..target.1));
    // `httparse` has checked the names are tokens and the values hold no
    // control characters, as an `http::HeaderMap` would.
    let headers = ClientHeaders::Raw(RawHeaders::new(raw, &spans));
    let (method, uri) = match (method, uri) {
        (Ok(method), Ok(uri)) => (method, uri),
        (method, _) => {
            return Err(Box::new(Refusal {
                error: ApiError::BadFraming(if method.is_err() {
                    "invalid method"
                } else {
                    "invalid request target"
                }),
                head: None,
                request_id: headers.value(Name::RequestId),
            }));
        }
    };
    let framing = match request_framing(version, &headers) {
        Ok(framing) => framing,
        Err(what) => {
            return Err(Box::new(Refusal {
                error: ApiError::BadFraming(what),
                head: Some(ClientHead {
                    method,
                    uri,
                    headers,
                }),
                request_id: None,
            }));
        }
    };
    // HTTP/1.1 keeps the connection unless told to close; an HTTP/1.0
    // client must ask with `Connection: keep-alive` (ApacheBench's `-k`
    // does), and the answer then says so.
    let keep_alive = codec::keep_alive(version, headers.values(Name::Connection));
    inbound.continue_due = version == Version::HTTP_11
        && !framing.is_done()
        && headers
            .get(Name::Expect)
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"));
    inbound.framing = framing;
    inbound.continue_sent = 0;
    inbound.responding = false;
    Ok(Some(Head {
        head: ClientHead {
            method,
            uri,
            headers,
        },
        version,
        keep_alive,
    }))
}

/// Whether a `Host` value can name a host: nginx's rule
/// (`ngx_http_validate_host`) plus what cannot be in an authority. A
/// value with a space, a path or query character, userinfo, a backslash or
/// `..` is refused, as RFC 9112 §3.2 asks; names outside RFC 3986's
/// reg-name that real clients send (Envoy's `outbound|8080||svc` health
/// checks, IPv6 zone ids, UTF-8) pass, as they do at nginx. weir routes
/// by the body, not by `Host`.
pub(super) fn is_host(value: &[u8]) -> bool {
    let mut previous = 0u8;
    for &b in value {
        if matches!(b, b' ' | b'\t' | b'/' | b'\\' | b'@' | b'?' | b'#')
            || (b == b'.' && previous == b'.')
        {
            return false;
        }
        previous = b;
    }
    value.first() != Some(&b'[') || value.contains(&b']')
}

/// How a request body is framed (RFC 9112 §6.3), refusing what SPEC
/// "Framing" refuses: a `Transfer-Encoding` other than one `chunked`, one
/// in HTTP/1.0, one beside a `Content-Length`, and lengths that disagree;
/// and a head whose `Host` is repeated, missing in HTTP/1.1, or cannot
/// name a host ([`is_host`]), which RFC 9112 §3.2 says a server must
/// answer with 400.
fn request_framing(
    version: Version,
    headers: &ClientHeaders,
) -> Result<codec::Framing, &'static str> {
    let mut hosts = headers.values(Name::Host);
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    match host {
        None if version == Version::HTTP_11 => {
            return Err("an HTTP/1.1 request without a Host header");
        }
        Some(host) if !is_host(host) => return Err("a Host header that cannot name a host"),
        _ => {}
    }
    let mut encodings = headers.values(Name::TransferEncoding);
    if let Some(first) = encodings.next() {
        if headers.get(Name::ContentLength).is_some() {
            return Err("Content-Length and Transfer-Encoding in one request");
        }
        if version == Version::HTTP_10 {
            return Err("Transfer-Encoding in an HTTP/1.0 request");
        }
        if encodings.next().is_some() || !first.eq_ignore_ascii_case(b"chunked") {
            return Err("Transfer-Encoding must be a single \"chunked\"");
        }
        return Ok(codec::Framing::Chunked(codec::Chunk::Size));
    }
    match codec::content_length(headers.values(Name::ContentLength)) {
        Ok(Some(0) | None) => Ok(codec::Framing::Done),
        Ok(Some(n)) => Ok(codec::Framing::Length(n)),
        Err(e) => Err(e.0),
    }
}

/// What a response head is written from.
struct ResponseHead<'a> {
    status: http::StatusCode,
    /// Sent as they are, except `Connection`, `Transfer-Encoding` and
    /// `Content-Length`, which are replaced by what this connection does.
    headers: &'a HeaderMap,
    /// The `x-ratelimit-*` headers of a proxied response, kept out of the
    /// map (see `api::write_rate_headers`).
    rate: Option<&'a RateHeaders>,
    /// A proxied response's body, which holds the backend's headers that
    /// are not in the map (`ProxiedBody::backend_headers`).
    proxied: Option<&'a ProxiedBody>,
    framing: &'a Out,
    /// Whether to write `content-length` (not on a 204, 304 or 1xx). The
    /// headers' own are never copied: a backend's repeated or listed
    /// length is written once, as the number it agreed on.
    write_length: bool,
    /// Whether the connection closes after this response.
    close: bool,
    /// An HTTP/1.0 client, which takes every answer as the connection's
    /// last unless it says `connection: keep-alive`.
    http10: bool,
}

impl ResponseHead<'_> {
    /// Appends the status line, the headers, `date`, the framing header and
    /// `connection: close` when closing (`keep-alive` to an HTTP/1.0 client
    /// when not).
    fn encode(&self, out: &mut Vec<u8>) {
        push_status_line(out, self.status);
        let line = |out: &mut Vec<u8>, name: &[u8], value: &[u8]| {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        };
        let rate = self.rate;
        let mut has_date = false;
        for (name, value) in self.headers {
            let name = name.as_str().as_bytes();
            if name == b"connection"
                || name == b"transfer-encoding"
                || name == b"content-length"
                || rate.is_some_and(|r| api::writes_rate_header(r, name))
            {
                continue;
            }
            has_date |= name == b"date";
            line(out, name, value.as_bytes());
        }
        if let Some(proxied) = self.proxied {
            for (name, value) in proxied.own_headers() {
                line(out, name.as_str().as_bytes(), value.as_bytes());
            }
            for (kind, name, value) in proxied.backend_headers(self.headers) {
                has_date |= kind == codec::Name::Date;
                line(out, name, value);
            }
        }
        if let Some(rate) = rate {
            api::write_rate_headers(out, rate);
        }
        if !has_date {
            push_date(out);
        }
        match self.framing {
            Out::Length(n) if self.write_length => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Out::Length(_) | Out::UntilClose => {}
            Out::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
        if self.close {
            out.extend_from_slice(b"connection: close\r\n");
        } else if self.http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Appends `HTTP/1.1 <code> <reason>\r\n`: nearly every answer is a 200,
/// whose line is one copy instead of five.
fn push_status_line(out: &mut Vec<u8>, status: http::StatusCode) {
    if status == http::StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends a chunk size in hex.
fn push_hex(out: &mut Vec<u8>, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(n >> (4 * i)) & 0xf]);
    }
}

thread_local! {
    /// The `date` header line for the current second, per lane thread.
    static DATE: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
}

/// Appends `date: <IMF-fixdate>\r\n`, formatted once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(second, line)| {
        if *second != secs {
            *second = secs;
            line.clear();
            line.extend_from_slice(b"date: ");
            line.extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
            line.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(line);
    });
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn inbound(bytes: &[u8]) -> Inbound {
        Inbound {
            buf: BytesMut::from(bytes),
            framing: codec::Framing::Done,
            eof: false,
            continue_due: false,
            continue_sent: 0,
            responding: false,
        }
    }

    #[test]
    fn status_lines_spell_code_and_reason() {
        for code in 100..=999u16 {
            let status = http::StatusCode::from_u16(code).unwrap();
            let mut out = Vec::new();
            push_status_line(&mut out, status);
            let reason = status.canonical_reason().unwrap_or("");
            assert_eq!(out, format!("HTTP/1.1 {code} {reason}\r\n").into_bytes());
        }
    }

    #[test]
    fn heads_parse_at_every_split() {
        let head = b"POST /v1/chat/completions?a=1 HTTP/1.1\r\nHost: weir\r\nContent-Length: 2\r\nX-A: b\r\n\r\n{}";
        let end = head.len() - 2;
        for cut in 0..end {
            assert!(
                parse_head(&mut inbound(&head[..cut])).unwrap().is_none(),
                "cut {cut}"
            );
        }
        let mut input = inbound(head);
        let parsed = parse_head(&mut input).unwrap().unwrap();
        assert_eq!(parsed.head.method, Method::POST);
        assert_eq!(parsed.head.uri.path(), "/v1/chat/completions");
        assert_eq!(parsed.head.uri.query(), Some("a=1"));
        let x_a = parsed
            .head
            .headers
            .iter()
            .find(|(_, name, _)| name == b"X-A");
        assert_eq!(x_a.map(|(_, _, value)| value), Some(&b"b"[..]));
        assert!(parsed.keep_alive);
        assert_eq!(input.framing, codec::Framing::Length(2));
        assert_eq!(&input.buf[..], b"{}");
    }

    #[test]
    fn framing_rules() {
        let framing = |lines: &str| {
            let head = format!("POST / HTTP/1.1\r\nHost: h\r\n{lines}\r\n");
            let mut input = inbound(head.as_bytes());
            parse_head(&mut input)
                .map(|_| input.framing)
                .map_err(|r| r.error.to_string())
        };
        assert_eq!(framing(""), Ok(codec::Framing::Done));
        assert_eq!(framing("Content-Length: 0\r\n"), Ok(codec::Framing::Done));
        assert_eq!(
            framing("Transfer-Encoding: Chunked\r\n"),
            Ok(codec::Framing::Chunked(codec::Chunk::Size))
        );
        assert_eq!(
            framing("Content-Length: 5\r\nContent-Length: 5\r\n"),
            Ok(codec::Framing::Length(5))
        );
        for bad in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: +1\r\n",
        ] {
            assert!(framing(bad).is_err(), "{bad}");
        }
        // RFC 9112 §3.2: one Host, and HTTP/1.1 must send it.
        assert!(framing("Host: i\r\n").is_err());
        for ok in [
            "",
            "weir",
            "weir:8080",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:8080",
            "a-b.example_c~",
            "%41b",
            "h:",
            "outbound|8080||svc.ns.svc.cluster.local",
            "[fe80::1%25eth0]:80",
            "bücher.example",
        ] {
            assert!(is_host(ok.as_bytes()), "{ok:?}");
        }
        for bad in [
            "a b", "a@b", "a/b", "[::1", "a?b", "a#b", "a\\b", "a..b", "..", "a\tb",
        ] {
            assert!(!is_host(bad.as_bytes()), "{bad:?}");
        }
        let mut hostless = inbound(b"POST / HTTP/1.1\r\n\r\n");
        assert!(parse_head(&mut hostless).is_err());
        let mut old = inbound(b"GET / HTTP/1.0\r\n\r\n");
        assert!(parse_head(&mut old).is_ok());
        let mut old = inbound(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(parse_head(&mut old).is_err());
    }

    #[test]
    fn oversized_and_malformed_heads_are_refused() {
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        let code = |bytes: &[u8]| {
            parse_head(&mut inbound(bytes))
                .err()
                .map(|r| r.error.into_response().status())
        };
        assert_eq!(
            code(many.as_bytes()),
            Some(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        // Said as it is: too many fields, not too many bytes.
        let said = parse_head(&mut inbound(many.as_bytes()))
            .err()
            .map(|r| r.error.to_string());
        assert_eq!(
            said.as_deref(),
            Some("The request has more than 100 header fields.")
        );
        let huge = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(MAX_HEAD_BUFFER));
        assert_eq!(
            code(huge.as_bytes()),
            Some(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        for bad in [
            &b"GET / HTTP/1.7\r\n\r\n"[..],
            b"G@T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX A: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\0b\r\n\r\n",
        ] {
            assert_eq!(code(bad), Some(http::StatusCode::BAD_REQUEST));
        }
    }

    #[test]
    fn expect_continue_and_keep_alive() {
        let mut input = inbound(
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n",
        );
        assert!(parse_head(&mut input).unwrap().unwrap().keep_alive);
        assert!(input.continue_due);
        let mut input = inbound(b"POST / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        assert!(!parse_head(&mut input).unwrap().unwrap().keep_alive);
        assert!(!input.continue_due);
        let mut input = inbound(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!parse_head(&mut input).unwrap().unwrap().keep_alive);
        let mut input = inbound(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(parse_head(&mut input).unwrap().unwrap().keep_alive);
    }

    /// The head of an answer with no headers of its own and no rate
    /// headers, as text.
    fn bare_head(status: http::StatusCode, framing: &Out, close: bool, http10: bool) -> String {
        let mut out = Vec::new();
        ResponseHead {
            status,
            headers: &HeaderMap::new(),
            rate: None,
            proxied: None,
            framing,
            write_length: true,
            close,
            http10,
        }
        .encode(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn response_heads() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        headers.insert(header::DATE, HeaderValue::from_static("then"));
        let mut out = Vec::new();
        let rate = RateHeaders {
            requests: Some(crate::admission::limiter::RateState {
                limit: 60,
                remaining: 59,
                reset: Duration::from_secs(1),
            }),
            tokens: None,
        };
        ResponseHead {
            status: http::StatusCode::OK,
            headers: &headers,
            rate: Some(&rate),
            proxied: None,
            framing: &Out::Length(12),
            write_length: true,
            close: true,
            http10: false,
        }
        .encode(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ndate: then\r\n\
             x-ratelimit-limit-requests: 60\r\nx-ratelimit-remaining-requests: 59\r\n\
             x-ratelimit-reset-requests: 1s\r\ncontent-length: 12\r\nconnection: close\r\n\r\n"
        );
        let text = bare_head(http::StatusCode::BAD_GATEWAY, &Out::Chunked, false, false);
        assert!(
            text.starts_with("HTTP/1.1 502 Bad Gateway\r\ndate: "),
            "{text}"
        );
        assert!(
            text.ends_with(" GMT\r\ntransfer-encoding: chunked\r\n\r\n"),
            "{text}"
        );
        // An HTTP/1.0 client is told the connection stays; it is told the
        // same as anyone when it does not.
        for (close, last) in [
            (false, "connection: keep-alive"),
            (true, "connection: close"),
        ] {
            let text = bare_head(http::StatusCode::OK, &Out::Length(2), close, true);
            assert!(
                text.ends_with(&format!("content-length: 2\r\n{last}\r\n\r\n")),
                "{text}"
            );
        }
    }

    #[test]
    fn chunk_sizes_are_hex() {
        for (n, hex) in [
            (0, "0"),
            (1, "1"),
            (15, "f"),
            (16, "10"),
            (4096, "1000"),
            (65535, "ffff"),
        ] {
            let mut out = Vec::new();
            push_hex(&mut out, n);
            assert_eq!(out, hex.as_bytes());
        }
    }
}
