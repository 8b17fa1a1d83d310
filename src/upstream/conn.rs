//! The client for plain-http backends (the vLLM, SGLang, TGI and llama.cpp
//! servers next to weir): HTTP/1.1 over pooled keep-alive connections,
//! driven by the request's own task.
//!
//! hyper-util's pooled client gives every connection a task of its own and
//! hands each request, response and body frame across to it through
//! channels; per connection it keeps a dispatch channel and two 8 KiB
//! buffers for as long as the connection lives. Here the request's task
//! writes the request and reads the response itself, and the response body
//! reads the backend's socket when hyper's server asks it for the next frame:
//! no hand-off, no wake-up of another task, and a read buffer that exists
//! only while bytes are in flight (an idle stream holds none). That is the
//! whole difference measured in docs/BENCHMARKS.md.

use std::{
    cell::RefCell,
    future::{poll_fn, Future},
    io,
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{uri::Authority, Method, Request, Response, Uri};
use hyper::body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use crate::{
    lanes, socket,
    spare::{self, Spares},
};

use super::{
    codec::{self, Framing, Head, RawHeaders, RequestHead},
    pool::Pool,
    resolve::Resolver,
    AttemptError, BodyReadError, Forward,
};

/// The first read of a response, and the usual size of later ones.
const READ_SIZE: usize = 8 * 1024;
/// Reads grow (doubling while they fill the buffer) up to this size, so a
/// large body does not take a system call per 8 KiB. Small, because a
/// stream whose client stops reading holds about one read's worth here
/// (SPEC: a few tens of KiB per stream at most).
const MAX_READ_SIZE: usize = 16 * 1024;
/// Read buffers grown past this (for a large response head) are freed,
/// not kept as spares.
const MAX_SPARE_READ: usize = 2 * MAX_READ_SIZE;
/// Request bodies up to this size are copied behind the head and sent in
/// one write; larger ones are written after it.
const COPY_BODY_MAX: usize = 16 * 1024;
/// Room for a typical request head.
const HEAD_CAPACITY: usize = 512;
/// What a close on a reused connection may take beyond a round trip and
/// still be the idle-close race ([`PlainClient::idle_race`]): the
/// gateway's own delay in seeing it, when busy.
pub(super) const IDLE_RACE_SLACK: Duration = Duration::from_millis(100);
/// Handshakes this long are not round-trip samples: the SYN was lost and
/// sent again (Linux waits 1 s).
pub(super) const MAX_HANDSHAKE_SAMPLE: Duration = Duration::from_secs(1);

/// Spare buffers of each kind kept per thread (see [`SPARE_READS`]).
const SPARE_BUFFERS: usize = 16;
/// Head buffers larger than this (a large header set behind a copied
/// body) are not kept: at most 16 x 20 KiB per thread.
const MAX_SPARE_HEAD: usize = COPY_BODY_MAX + 4 * 1024;

thread_local! {
    /// Emptied read buffers of responses that have ended, for the next
    /// exchange on this thread. A read buffer is past glibc's per-thread
    /// cache, so a fresh one per request cost more than all of its other
    /// allocations together; a few spares per thread bound what is kept,
    /// where a buffer per pooled connection would not be.
    static SPARE_READS: Spares<BytesMut> = const { RefCell::new(Vec::new()) };
    /// The same for the buffers request heads are written into.
    static SPARE_HEADS: Spares<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A read buffer with room for [`READ_SIZE`] bytes. `reserve` reuses a
/// spare's memory in place once no frame cut from it is alive any more,
/// and allocates anew otherwise.
fn read_buffer() -> BytesMut {
    let mut buf = spare::take(&SPARE_READS);
    buf.reserve(READ_SIZE);
    buf
}

/// Makes room in `buf` for a read of about `size` bytes, taking a spare
/// when it holds no memory. Called only once the socket is readable: a
/// buffer is held while there is something to read, not while the backend
/// thinks (10,000 streams opened at once would otherwise hold 8 KiB each
/// until their heads came, and glibc keeps that high-water mark).
fn make_room(buf: &mut BytesMut, size: usize) {
    if buf.capacity() == 0 {
        *buf = read_buffer();
    }
    if buf.capacity() - buf.len() < size / 4 {
        buf.reserve(size);
    }
}

/// Keeps an emptied read buffer for [`read_buffer`].
fn recycle(buf: BytesMut) {
    if buf.is_empty() {
        spare::keep(&SPARE_READS, buf, SPARE_BUFFERS, MAX_SPARE_READ);
    }
}

/// A plain-http backend's client: where it is, and its idle connections.
#[derive(Debug, Clone)]
pub(crate) struct PlainClient {
    /// Idle connections, one pool per lane (index [`lanes::current`]): a
    /// socket is only ever used on the thread whose reactor it belongs to.
    /// Each pool has its cache lines to itself (see [`Pool`]).
    pools: Arc<[Arc<Pool>]>,
    /// The backend's host and port: requests to it share the pool; a
    /// request elsewhere gets a connection of its own.
    authority: Option<Authority>,
    /// Its addresses, looked up once for many connections.
    resolver: Option<Arc<Resolver>>,
    connect_timeout: Duration,
    /// How long the latest TCP handshake with the backend took, in
    /// microseconds: a round trip, for [`PlainClient::idle_race`].
    handshake_us: Arc<AtomicU32>,
}

impl PlainClient {
    /// A client for the backend at `url` (its host and port).
    pub(crate) fn new(url: &Uri, connect_timeout: Duration) -> Self {
        let authority = url.authority().cloned();
        let resolver = authority.as_ref().map(|a| {
            let (host, port) = host_port(a);
            Arc::new(Resolver::new(host, port))
        });
        Self {
            pools: (0..=lanes::count()).map(|_| Arc::default()).collect(),
            authority,
            resolver,
            connect_timeout,
            handshake_us: Arc::default(),
        }
    }

    /// Sends one request and reads its response head. The caller bounds the
    /// whole call by `first_byte_timeout`.
    pub(crate) async fn send(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<ResponseBody>, AttemptError> {
        let (parts, body) = request.into_parts();
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = parts.uri.authority();
        let head = RequestHead {
            method: &parts.method,
            target: &[target],
            host: authority.map(Authority::as_str),
            headers: &parts.headers,
            authorization: None,
            body_len: body.len(),
        };
        let mut response = self.round_trip(authority, &head, &body, false).await?;
        let headers = std::mem::take(&mut response.body_mut().headers)
            .to_map()
            .map_err(|e| AttemptError::Protocol(e.to_string()))?;
        *response.headers_mut() = headers;
        Ok(response)
    }

    /// Sends a proxied request, its head written straight from the
    /// exchange's pieces: no `http::Request`, no copy of the headers. The
    /// response's header map is empty: its headers stay as the backend sent
    /// them, in [`ResponseBody::headers`], for the proxy to pass on.
    pub(crate) async fn forward(
        &self,
        request: &Forward<'_>,
    ) -> Result<Response<ResponseBody>, AttemptError> {
        let authority = request.base.authority();
        let head = RequestHead {
            method: &Method::POST,
            target: &super::target_pieces(request.base, request.rest, request.query),
            host: authority.map(Authority::as_str),
            headers: request.headers,
            authorization: request.authorization,
            body_len: request.body.len(),
        };
        self.round_trip(authority, &head, &request.body, request.fresh)
            .await
    }

    /// Writes `head` and `body` to `authority` (a pooled connection when it
    /// is the backend's, unless `fresh`) and reads the response head.
    async fn round_trip(
        &self,
        authority: Option<&Authority>,
        head: &RequestHead<'_>,
        body: &Bytes,
        fresh: bool,
    ) -> Result<Response<ResponseBody>, AttemptError> {
        let authority =
            authority.ok_or_else(|| AttemptError::Connect("no host in the URL".to_owned()))?;
        let pooled = self.authority.as_ref() == Some(authority);
        let copied = body.len() <= COPY_BODY_MAX;
        let mut wire = spare::take(&SPARE_HEADS);
        wire.clear();
        wire.reserve(HEAD_CAPACITY + if copied { body.len() } else { 0 });
        codec::encode_request_head(head, &mut wire);
        if copied {
            wire.extend_from_slice(body);
        }
        let request = Wire {
            head: &wire,
            body: (!copied).then_some(&body[..]),
            head_request: *head.method == Method::HEAD,
        };
        let pool = self.pool();
        let idle = if pooled && !fresh { pool.take() } else { None };
        let reused = idle.is_some();
        // When a reused connection's request went out: the idle-close
        // race shows within a round trip of it (see `idle_race`).
        let sent_at = reused.then(Instant::now);
        let stream = match idle {
            Some(stream) => stream,
            None => self.connect(authority).await?,
        };
        let exchanged = match exchange(stream, &request).await {
            Ok(done) => Ok(done),
            // The backend had closed the idle connection: the request could
            // not be written, so no backend saw it, and it goes once more on
            // a new connection (hyper-util's retry of a request that was
            // never sent). A request written whole is never sent again
            // here: if the connection then closes without an answer at
            // once, the backend may have read it (a crash mid-request looks
            // the same as an idle close), so the attempt fails as
            // `IdleClosed`, which the retry policy sends to another
            // backend. A close later than the race allows is the backend
            // failing with the request in hand: a `Protocol` failure that
            // counts against it, as on a new connection.
            Err(Failed::Stale(_)) if reused => match self.connect(authority).await {
                Ok(stream) => exchange(stream, &request)
                    .await
                    .map_err(Failed::into_attempt),
                Err(e) => Err(e),
            },
            Err(Failed::Closed(e)) if sent_at.is_some_and(|t| t.elapsed() <= self.idle_race()) => {
                // The others idle beside it most likely went the same way
                // (the backend, or a middlebox on the way, dropped its
                // kept-alive connections): let go of them all, so the
                // retry, if it comes back here, goes out on a new one.
                pool.clear();
                Err(AttemptError::IdleClosed(e.to_string()))
            }
            Err(e) => Err(e.into_attempt()),
        };
        spare::keep(&SPARE_HEADS, wire, SPARE_BUFFERS, MAX_SPARE_HEAD);
        let (stream, buf, head) = exchanged?;
        let pool = (pooled && head.reusable).then(|| pool.clone());
        let mut response = Response::new(ResponseBody::new(stream, buf, head.framing, pool));
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        response.body_mut().headers = head.headers;
        Ok(response)
    }

    /// How soon after a request went out on a kept-alive connection a close
    /// without an answer may be the backend closing the connection as it
    /// idled, just as weir reused it. On the wire, the backend's FIN (or
    /// its RST to the request) was already on its way when the request
    /// went out, so it arrives within a round trip: [`IDLE_RACE_SLACK`]
    /// (for a busy gateway's scheduling) plus twice the latest handshake.
    /// A close after that is a backend that took the request and failed.
    fn idle_race(&self) -> Duration {
        let round_trip = u64::from(self.handshake_us.load(Ordering::Relaxed));
        IDLE_RACE_SLACK + Duration::from_micros(2 * round_trip)
    }

    /// The calling lane's pool.
    fn pool(&self) -> &Arc<Pool> {
        let pools = &*self.pools;
        &pools[lanes::current().min(pools.len() - 1)]
    }

    /// Opens a connection to `authority` within `connect_timeout`: the
    /// backend's own through its [`Resolver`], another (never in practice)
    /// with a lookup of its own. The errors name no address: they reach
    /// the client in a 502, and the log names the backend.
    async fn connect(&self, authority: &Authority) -> Result<TcpStream, AttemptError> {
        let resolver = match &self.resolver {
            Some(r) if self.authority.as_ref() == Some(authority) => r.clone(),
            _ => {
                let (host, port) = host_port(authority);
                Arc::new(Resolver::new(host, port))
            }
        };
        let connected = tokio::time::timeout(self.connect_timeout, connect_first(&resolver)).await;
        let (stream, handshake) = match connected {
            Err(_) => {
                return Err(AttemptError::Connect(format!(
                    "connecting took longer than {:?}",
                    self.connect_timeout
                )))
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(AttemptError::Refused(e.to_string()))
            }
            Ok(Err(e)) => return Err(AttemptError::Connect(e.to_string())),
            Ok(Ok(connected)) => connected,
        };
        // A retransmitted SYN (1 s) is no round trip: that sample is left out.
        if handshake < MAX_HANDSHAKE_SAMPLE {
            let us = u32::try_from(handshake.as_micros()).unwrap_or(u32::MAX);
            self.handshake_us.store(us, Ordering::Relaxed);
        }
        // Small requests and SSE events go out at once; dead peers are
        // noticed on connections that idle in the pool.
        let socket = socket2::SockRef::from(&stream);
        let tuned = stream.set_nodelay(true).and_then(|()| {
            socket
                .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(Duration::from_secs(30)))
        });
        if let Err(e) = tuned {
            tracing::debug!(%authority, error = %e, "could not tune the upstream socket");
        }
        Ok(stream)
    }
}

/// An authority's host (as written: [`Resolver::new`] takes an IPv6
/// literal's brackets off) and port (80 unless given).
fn host_port(authority: &Authority) -> (&str, u16) {
    (authority.host(), authority.port_u16().unwrap_or(80))
}

/// Connects to the first of the resolver's addresses that accepts, in the
/// order the lookup gave them (as `TcpStream::connect` does); the last
/// error if none does. With the connection, how long its handshake took.
async fn connect_first(resolver: &Arc<Resolver>) -> io::Result<(TcpStream, Duration)> {
    let addrs = resolver.addrs().await?;
    let mut last = None;
    for addr in addrs.iter() {
        let began = Instant::now();
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok((stream, began.elapsed())),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("the name has no address")))
}

/// The bytes of one request, ready to write.
struct Wire<'a> {
    /// Head, with the body behind it when the body is small.
    head: &'a [u8],
    /// A large body, written after the head.
    body: Option<&'a [u8]>,
    head_request: bool,
}

/// How one exchange on a connection failed.
enum Failed {
    /// Writing the request failed because the peer had closed or reset
    /// the connection: on a reused connection, the backend closed it while
    /// it idled, and nothing of the request was taken.
    Stale(io::Error),
    /// The request was written and the connection closed or reset before
    /// a byte of answer came back: the backend may have read it.
    Closed(io::Error),
    /// Any other failure: the attempt failed.
    Attempt(AttemptError),
}

impl Failed {
    fn into_attempt(self) -> AttemptError {
        match self {
            Failed::Stale(e) | Failed::Closed(e) => {
                AttemptError::Protocol(format!("connection closed before the response head: {e}"))
            }
            Failed::Attempt(e) => e,
        }
    }
}

/// Writes the request and reads the response head; returns the connection
/// and the buffer holding whatever body bytes came with the head.
async fn exchange(
    mut stream: TcpStream,
    request: &Wire<'_>,
) -> Result<(TcpStream, BytesMut, Head), Failed> {
    let mut buf = BytesMut::new();
    let unwritten = match send(&mut stream, request, &mut buf).await? {
        Sent::Whole => None,
        Sent::Answered(mut head) => {
            // The rest of the request is still owed: nothing more can go
            // on this connection.
            head.reusable = false;
            return Ok((stream, buf, head));
        }
        Sent::Failed(e) => Some(e),
    };
    // Bytes read while writing were not a whole head yet.
    let mut received = !buf.is_empty();
    loop {
        // Nothing to parse before the first read.
        if received {
            if let Some(mut head) = parse_head(&mut buf, request)? {
                // An answer that came although the request could not be
                // written whole (a 413 before a reset): it is the
                // backend's, and the connection is done.
                head.reusable &= unwritten.is_none();
                return Ok((stream, buf, head));
            }
        }
        let read = match stream.readable().await {
            Ok(()) => {
                make_room(&mut buf, READ_SIZE);
                stream.read_buf(&mut buf).await
            }
            Err(e) => Err(e),
        };
        if !received && !matches!(read, Ok(1..)) {
            if let Some(e) = unwritten {
                // No answer either: the attempt failed as the write did.
                return Err(write_failed(e));
            }
        }
        match read {
            Ok(0) if !received => {
                return Err(Failed::Closed(io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(0) => {
                return Err(Failed::Attempt(AttemptError::Protocol(
                    "connection closed inside the response head".to_owned(),
                )))
            }
            Ok(_) => received = true,
            Err(e) if !received && socket::peer_closed(&e) => return Err(Failed::Closed(e)),
            Err(e) => {
                return Err(Failed::Attempt(AttemptError::Protocol(format!(
                    "reading the response head: {e}"
                ))))
            }
        }
    }
}

/// How writing a request ended.
enum Sent {
    /// All of it went out.
    Whole,
    /// The backend answered before taking all of it (a `413` after reading
    /// the head, as Go's `MaxBytesReader` does): the rest is not written.
    Answered(Head),
    /// Writing failed; an answer sent before may still be readable.
    Failed(io::Error),
}

/// Writes the request. When the socket takes it at once (any request but
/// one with a large body, as a rule) that is all; else the answer is read
/// while the rest is written, as hyper and Envoy do: a backend may answer
/// early and stop reading, and waiting on the write alone would block
/// until `first_byte_timeout`, or fail with a reset and lose the answer.
async fn send(
    stream: &mut TcpStream,
    request: &Wire<'_>,
    buf: &mut BytesMut,
) -> Result<Sent, Failed> {
    let (reader, mut writer) = stream.split();
    let written = async {
        writer.write_all(request.head).await?;
        if let Some(body) = request.body {
            writer.write_all(body).await?;
        }
        io::Result::Ok(())
    };
    let mut written = pin!(written);
    let done = |result: io::Result<()>| Ok(result.map_or_else(Sent::Failed, |()| Sent::Whole));
    if let Poll::Ready(result) = poll_fn(|cx| Poll::Ready(written.as_mut().poll(cx))).await {
        return done(result);
    }
    // Until the backend closes its side (or resets): then the write's
    // outcome decides.
    let mut reading = true;
    loop {
        tokio::select! {
            biased;
            result = &mut written => return done(result),
            ready = reader.readable(), if reading => {
                if ready.is_err() {
                    reading = false;
                    continue;
                }
                // A read buffer only once the backend has sent something:
                // a long upload holds none.
                make_room(buf, READ_SIZE);
                match socket::try_read_buf(reader.as_ref(), buf) {
                    Ok(0) => reading = false,
                    Ok(_) => {
                        if let Some(head) = parse_head(buf, request)? {
                            return Ok(Sent::Answered(head));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => reading = false,
                }
            }
        }
    }
}

/// The response head in `buf`, once all of it has come (a head read, for
/// the busy poller); a malformed one fails the attempt.
fn parse_head(buf: &mut BytesMut, request: &Wire<'_>) -> Result<Option<Head>, Failed> {
    crate::busy_poll::head_read();
    codec::read_head(buf, request.head_request)
        .map_err(|e| Failed::Attempt(AttemptError::Protocol(e.to_string())))
}

/// The failure of a request that could not be written and got no answer.
fn write_failed(e: io::Error) -> Failed {
    if socket::peer_closed(&e) {
        Failed::Stale(e)
    } else {
        Failed::Attempt(AttemptError::Protocol(format!("writing the request: {e}")))
    }
}

/// A response body read straight from the backend's connection, frame by
/// frame as hyper's server asks for them. Read to its end, it returns the
/// connection to the pool; dropped before, it closes it (which is how the
/// backend learns that the client went away).
#[derive(Debug)]
pub struct ResponseBody {
    stream: Option<TcpStream>,
    /// Bytes read and not yet handed out; empty (no allocation) while
    /// waiting for the backend.
    buf: BytesMut,
    framing: Framing,
    /// Where the connection goes once the body is read, if it may be reused.
    pool: Option<Arc<Pool>>,
    /// The size of the next read.
    read_size: usize,
    /// The response's headers as received (see [`PlainClient::forward`]).
    headers: RawHeaders,
}

impl ResponseBody {
    fn new(stream: TcpStream, buf: BytesMut, framing: Framing, pool: Option<Arc<Pool>>) -> Self {
        let mut body = Self {
            stream: Some(stream),
            buf,
            framing,
            pool,
            read_size: READ_SIZE,
            headers: RawHeaders::default(),
        };
        if body.framing.is_done() {
            body.release();
        }
        body
    }

    /// The response's headers as the backend sent them; empty once `send`
    /// has moved them into the response's map.
    pub(crate) fn headers(&self) -> &RawHeaders {
        &self.headers
    }

    /// Whether the body is all here: ended, or of a length all buffered.
    pub(crate) fn arrived_whole(&self) -> bool {
        self.framing.is_done()
            || (self.framing.remaining()).is_some_and(|n| self.buf.len() as u64 >= n)
    }

    /// Drops the headers once the proxy has passed them on.
    pub(crate) fn release_headers(&mut self) {
        self.headers = RawHeaders::default();
    }

    /// The body was read to its end: the connection goes back to the pool
    /// if it may be reused and nothing unasked follows the body.
    fn release(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        if let (Some(pool), true) = (self.pool.take(), self.buf.is_empty()) {
            pool.put(stream);
        }
        recycle(std::mem::take(&mut self.buf));
    }

    /// The connection failed: it is closed and the body ends with `error`.
    fn fail(&mut self, error: BodyReadError) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        self.stream = None;
        self.framing = Framing::Done;
        self.buf = BytesMut::new();
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        let this = self.get_mut();
        loop {
            match this.framing.decode(&mut this.buf) {
                Err(e) => return this.fail(e.into()),
                Ok(Some(data)) => {
                    if this.framing.is_done() {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) if this.framing.is_done() => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
            }
            let Some(stream) = &this.stream else {
                return Poll::Ready(None);
            };
            match stream.poll_read_ready(cx) {
                Poll::Pending => {
                    if this.buf.is_empty() {
                        // Hold no buffer while the backend is quiet.
                        recycle(std::mem::take(&mut this.buf));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return this.fail(e.into()),
                Poll::Ready(Ok(())) => {}
            }
            make_room(&mut this.buf, this.read_size);
            let spare = this.buf.capacity() - this.buf.len();
            match socket::try_read_buf(stream, &mut this.buf) {
                Ok(0) => match this.framing.eof() {
                    Ok(()) => {
                        // Ended by close: nothing to return to the pool.
                        this.pool = None;
                    }
                    Err(e) => return this.fail(e.into()),
                },
                Ok(n) => {
                    if n == spare {
                        this.read_size = (this.read_size * 2).min(MAX_READ_SIZE);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return this.fail(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn read_buffers_are_reused_once_their_frames_are_gone() {
        let mut buf = read_buffer();
        let memory = buf.as_ptr();
        buf.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\nhello");
        let frame = buf.split().freeze();
        recycle(buf);
        // A frame cut from it is still alive: its bytes are left alone and
        // the next exchange reads into new memory.
        let mut second = read_buffer();
        assert!(second.capacity() >= READ_SIZE);
        assert_ne!(second.as_ptr(), memory);
        second.extend_from_slice(b"other bytes");
        assert_eq!(&frame[..], b"HTTP/1.1 200 OK\r\n\r\nhello");
        drop(second);
        // Once it is gone, the same memory serves the next exchange.
        let mut buf = read_buffer();
        let memory = buf.as_ptr();
        buf.extend_from_slice(b"abc");
        drop(buf.split().freeze());
        recycle(buf);
        let again = read_buffer();
        assert_eq!(again.as_ptr(), memory);
        assert!(again.is_empty() && again.capacity() >= READ_SIZE);
        // A buffer with unread bytes is not kept.
        let mut unread = read_buffer();
        unread.extend_from_slice(b"x");
        recycle(unread);
        assert!(SPARE_READS.with_borrow(Vec::is_empty));
    }
    use tokio::{io::AsyncReadExt, net::TcpListener};

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    /// Reads one request head and its `content-length` body.
    async fn read_request(s: &mut TcpStream) -> Option<String> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while buf.len() < end + 4 + len {
                    let n = s.read(&mut chunk).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A backend whose `n`th connection (from 0) runs `serve(n, stream)`;
    /// returns its URL and the count of connections accepted.
    async fn backend<F, Fut>(serve: F) -> (Uri, Arc<AtomicUsize>)
    where
        F: Fn(usize, TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url: Uri = format!("http://{}/v1", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let serve = Arc::new(serve);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn({
                    let serve = serve.clone();
                    async move { serve(n, stream).await }
                });
            }
        });
        (url, accepted)
    }

    fn post(url: &Uri, body: &'static str) -> Request<Bytes> {
        let mut request = Request::new(Bytes::from_static(body.as_bytes()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = format!("{url}/chat/completions").parse().unwrap();
        request
    }

    async fn text(response: Response<ResponseBody>) -> String {
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    #[tokio::test]
    async fn requests_share_a_kept_alive_connection() {
        let (url, accepted) = backend(|_, mut s| async move {
            while let Some(request) = read_request(&mut s).await {
                assert!(request.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"));
                assert!(request.ends_with("\r\n\r\n{}"), "{request}");
                s.write_all(OK).await.unwrap();
            }
        })
        .await;
        let client = PlainClient::new(&url, Duration::from_secs(1));
        for _ in 0..3 {
            let response = client.send(post(&url, "{}")).await.unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(text(response).await, "ok");
            assert_eq!(client.pool().idle(), 1);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_exchange_holds_no_read_buffer_until_the_backend_answers() {
        // The backend reads the request, says so, and answers only when
        // told: meanwhile the exchange waits with the thread's spare read
        // buffer left where it was (10,000 streams opened at once would
        // each hold 8 KiB otherwise).
        let (read_tx, read_rx) = tokio::sync::oneshot::channel::<()>();
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel::<()>();
        let signals = Arc::new(std::sync::Mutex::new(Some((read_tx, answer_rx))));
        let (url, _) = backend(move |_, mut s| {
            let signals = signals.lock().unwrap().take();
            async move {
                let (read_tx, answer_rx) = signals.unwrap();
                read_request(&mut s).await;
                read_tx.send(()).unwrap();
                answer_rx.await.unwrap();
                s.write_all(OK).await.unwrap();
            }
        })
        .await;
        let spare = read_buffer();
        let memory = spare.as_ptr();
        recycle(spare);
        let client = PlainClient::new(&url, Duration::from_secs(1));
        let exchange = tokio::spawn({
            let url = url.clone();
            async move { text(client.send(post(&url, "{}")).await.unwrap()).await }
        });
        read_rx.await.unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            SPARE_READS.with_borrow(Vec::len),
            1,
            "the spare is not taken"
        );
        answer_tx.send(()).unwrap();
        assert_eq!(exchange.await.unwrap(), "ok");
        // The answer was read into the spare, which is back for the next
        // exchange, its memory whole again now that the answer is gone.
        assert_eq!(read_buffer().as_ptr(), memory);
    }

    #[tokio::test]
    async fn a_long_upload_holds_no_read_buffer() {
        // The backend takes the first bytes of a body larger than the
        // sockets' buffers, then nothing until told: the exchange waits to
        // write the rest, watching for an early answer meanwhile, with the
        // thread's spare read buffer left where it was.
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let signals = Arc::new(std::sync::Mutex::new(Some((started_tx, go_rx))));
        let (url, _) = backend(move |_, mut s| {
            let signals = signals.lock().unwrap().take();
            async move {
                let (started_tx, go_rx) = signals.unwrap();
                let mut first = [0u8; 1];
                s.read_exact(&mut first).await.unwrap();
                started_tx.send(()).unwrap();
                go_rx.await.unwrap();
                read_request(&mut s).await.unwrap();
                s.write_all(OK).await.unwrap();
            }
        })
        .await;
        recycle(read_buffer());
        let client = PlainClient::new(&url, Duration::from_secs(5));
        let mut request = Request::new(Bytes::from(vec![b'x'; 32 << 20]));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = format!("{url}/chat/completions").parse().unwrap();
        let exchange = tokio::spawn(async move { text(client.send(request).await.unwrap()).await });
        // The exchange wrote what the sockets take in the poll that
        // connected, before the backend could run.
        started_rx.await.unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            SPARE_READS.with_borrow(Vec::len),
            1,
            "a read buffer was taken before the backend sent anything"
        );
        go_tx.send(()).unwrap();
        assert_eq!(exchange.await.unwrap(), "ok");
    }

    #[tokio::test]
    async fn an_idle_close_lets_go_of_the_other_idle_connections() {
        // Every connection answers its first request and closes its second
        // unanswered: a backend, or a middlebox, that has dropped its
        // kept-alive connections. One such close empties the pool, so the
        // next request (a retry here) goes on a new connection rather than
        // meeting the same end on each pooled one in turn.
        let (url, accepted) = backend(|_, mut s| async move {
            read_request(&mut s).await;
            s.write_all(OK).await.unwrap();
            read_request(&mut s).await;
        })
        .await;
        let client = PlainClient::new(&url, Duration::from_secs(1));
        let (a, b, c) = tokio::join!(
            client.send(post(&url, "{}")),
            client.send(post(&url, "{}")),
            client.send(post(&url, "{}"))
        );
        for answer in [a, b, c] {
            assert_eq!(text(answer.unwrap()).await, "ok");
        }
        assert_eq!(client.pool().idle(), 3);
        let e = client.send(post(&url, "{}")).await.unwrap_err();
        assert!(matches!(e, AttemptError::IdleClosed(_)), "{e:?}");
        assert_eq!(client.pool().idle(), 0, "the other two let go");
        assert_eq!(
            text(client.send(post(&url, "{}")).await.unwrap()).await,
            "ok"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 4, "a new connection");
    }

    #[tokio::test]
    async fn a_request_taken_and_unanswered_on_a_kept_alive_connection_is_not_resent() {
        // The first connection answers once, then takes the next request
        // and closes without a word (a crash looks like this). That request
        // may have been read, so it fails here, for the retry policy to
        // send elsewhere; the next one goes on a new connection.
        let (url, accepted) = backend(|n, mut s| async move {
            if read_request(&mut s).await.is_some() && n == 1 {
                s.write_all(OK).await.unwrap();
            } else if n == 0 {
                s.write_all(OK).await.unwrap();
                read_request(&mut s).await;
            }
        })
        .await;
        let client = PlainClient::new(&url, Duration::from_secs(1));
        assert_eq!(
            text(client.send(post(&url, "{}")).await.unwrap()).await,
            "ok"
        );
        let e = client.send(post(&url, "{}")).await.unwrap_err();
        assert!(matches!(e, AttemptError::IdleClosed(_)), "{e:?}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "not sent again");
        assert_eq!(
            text(client.send(post(&url, "{}")).await.unwrap()).await,
            "ok"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // A new connection closed unanswered is the backend's failure.
        let (url, _) = backend(|_, mut s| async move {
            read_request(&mut s).await;
        })
        .await;
        let client = PlainClient::new(&url, Duration::from_secs(1));
        let e = client.send(post(&url, "{}")).await.unwrap_err();
        assert!(matches!(e, AttemptError::Protocol(_)), "{e:?}");
    }

    /// A late close on a reused connection, as RST (`reset`) or FIN.
    async fn late_close(reset: bool) {
        // Every connection answers its first request; its second the
        // backend holds for 0.7 s, then closes unanswered: a worker that
        // died with the request in hand, not the idle-close race.
        let (url, accepted) = backend(move |_, mut s| async move {
            read_request(&mut s).await;
            s.write_all(OK).await.unwrap();
            read_request(&mut s).await;
            tokio::time::sleep(Duration::from_millis(700)).await;
            if reset {
                s.set_zero_linger().unwrap();
            }
        })
        .await;
        let client = PlainClient::new(&url, Duration::from_secs(1));
        assert_eq!(
            text(client.send(post(&url, "{}")).await.unwrap()).await,
            "ok"
        );
        // The backend's hold passes at once (the connection is pooled:
        // no connect in paused time).
        tokio::time::pause();
        let e = client.send(post(&url, "{}")).await.unwrap_err();
        assert!(matches!(e, AttemptError::Protocol(_)), "{reset}: {e:?}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "not sent again");
    }

    #[tokio::test]
    async fn a_late_reset_on_a_kept_alive_connection_is_the_backends_failure() {
        late_close(true).await;
    }

    #[tokio::test]
    async fn a_late_close_on_a_kept_alive_connection_is_the_backends_failure() {
        late_close(false).await;
    }

    /// What a backend does after answering `413` to a request's head.
    #[derive(Clone, Copy, Debug)]
    enum AfterAnswer {
        /// Closes with the body unread (the kernel resets the connection).
        Closes,
        /// Keeps the connection and reads nothing more.
        Holds,
        /// Answers and resets as soon as it accepts, before weir writes.
        ResetsFirst,
    }

    /// A backend answers before reading an 8 MiB body (more than the
    /// socket buffers take): weir reads the answer while writing, stops
    /// writing, and the answer is the response; the connection is not
    /// reused.
    async fn early_answer(after: AfterAnswer) {
        const TOO_LARGE: &[u8] =
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\n\
              content-length: 27\r\nconnection: close\r\n\r\n{\"error\":\"body too large\"}\n";
        let (answered, ready) = tokio::sync::oneshot::channel();
        let answered = std::sync::Mutex::new(Some(answered));
        let (url, accepted) = backend(move |_, mut s| {
            let answered = answered.lock().unwrap().take();
            async move {
                if !matches!(after, AfterAnswer::ResetsFirst) {
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut chunk).await.unwrap();
                        assert!(n > 0);
                        head.extend_from_slice(&chunk[..n]);
                    }
                }
                s.write_all(TOO_LARGE).await.unwrap();
                match after {
                    AfterAnswer::Closes => drop(s),
                    AfterAnswer::Holds => std::future::pending().await,
                    AfterAnswer::ResetsFirst => {
                        s.set_zero_linger().unwrap();
                        drop(s);
                        if let Some(answered) = answered {
                            let _ = answered.send(());
                        }
                    }
                }
            }
        })
        .await;
        let mut request = Request::new(Bytes::from(vec![b'x'; 8 << 20]));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = format!("{url}/chat/completions").parse().unwrap();
        let client = PlainClient::new(&url, Duration::from_secs(1));
        let response = if let AfterAnswer::ResetsFirst = after {
            // The answer and the reset are in before the first byte goes
            // out: the write fails, and the answer is still read.
            let stream = client.connect(url.authority().unwrap()).await.unwrap();
            ready.await.unwrap();
            let (parts, body) = request.into_parts();
            let head = RequestHead {
                method: &parts.method,
                target: &["/v1/chat/completions"],
                host: None,
                headers: &parts.headers,
                authorization: None,
                body_len: body.len(),
            };
            let mut wire = Vec::new();
            codec::encode_request_head(&head, &mut wire);
            let request = Wire {
                head: &wire,
                body: Some(&body),
                head_request: false,
            };
            let (stream, buf, head) = match exchange(stream, &request).await {
                Ok(exchanged) => exchanged,
                Err(e) => panic!("{after:?}: {:?}", e.into_attempt()),
            };
            assert!(!head.reusable);
            let mut response = Response::new(ResponseBody::new(stream, buf, head.framing, None));
            *response.status_mut() = head.status;
            response
        } else {
            // Bounded here by `first_byte_timeout` in the proxy.
            tokio::time::timeout(Duration::from_secs(10), client.send(request))
                .await
                .unwrap_or_else(|_| panic!("{after:?}: no answer while writing"))
                .unwrap_or_else(|e| panic!("{after:?}: {e:?}"))
        };
        assert_eq!(response.status(), 413, "{after:?}");
        assert_eq!(text(response).await, "{\"error\":\"body too large\"}\n");
        assert_eq!(client.pool().idle(), 0, "{after:?}: reused");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "{after:?}: sent again");
    }

    #[tokio::test]
    async fn an_early_answer_then_a_close_is_the_response() {
        early_answer(AfterAnswer::Closes).await;
    }

    #[tokio::test]
    async fn an_early_answer_on_a_held_connection_is_the_response() {
        early_answer(AfterAnswer::Holds).await;
    }

    #[tokio::test]
    async fn an_answer_before_a_failed_write_is_the_response() {
        early_answer(AfterAnswer::ResetsFirst).await;
    }

    #[tokio::test]
    async fn chunked_bodies_stream_and_end_with_their_last_chunk() {
        let (url, _) = backend(|_, mut s| async move {
            read_request(&mut s).await;
            s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                  transfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n",
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.write_all(b"3\r\n1\n\n\r\n0\r\n\r\n").await.unwrap();
            read_request(&mut s).await;
        })
        .await;
        let client = PlainClient::new(&url, Duration::from_secs(1));
        let response = client.send(post(&url, "{}")).await.unwrap();
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "data: ");
        assert!(!body.is_end_stream());
        assert_eq!(client.pool().idle(), 0, "pooled before the body ended");
        let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(last, "1\n\n");
        assert!(body.is_end_stream(), "the last chunk came with the data");
        assert_eq!(client.pool().idle(), 1);
    }

    #[tokio::test]
    async fn unfinished_or_closing_responses_do_not_return_to_the_pool() {
        let (url, accepted) = backend(|n, mut s| async move {
            while read_request(&mut s).await.is_some() {
                let answer: &[u8] = match n {
                    0 => b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\npart",
                    1 => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    _ => b"HTTP/1.1 200 OK\r\n\r\nuntil close",
                };
                s.write_all(answer).await.unwrap();
                if n == 2 {
                    return;
                }
            }
        })
        .await;
        let client = PlainClient::new(&url, Duration::from_secs(1));
        // Dropped after its first frame: the connection is closed.
        let mut body = client.send(post(&url, "{}")).await.unwrap().into_body();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "part"
        );
        drop(body);
        assert_eq!(client.pool().idle(), 0);
        // `connection: close`, and a body ended by close: not reused.
        assert_eq!(
            text(client.send(post(&url, "{}")).await.unwrap()).await,
            "ok"
        );
        assert_eq!(client.pool().idle(), 0);
        let response = client.send(post(&url, "{}")).await.unwrap();
        assert_eq!(text(response).await, "until close");
        assert_eq!(client.pool().idle(), 0);
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn refused_and_large_bodies() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url: Uri = format!("http://{}/v1", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(listener);
        let client = PlainClient::new(&url, Duration::from_secs(1));
        let e = client.send(post(&url, "{}")).await.unwrap_err();
        assert!(matches!(e, AttemptError::Refused(_)), "{e:?}");
        // A body above COPY_BODY_MAX is written after the head, whole.
        static BIG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let big = BIG.get_or_init(|| "x".repeat(COPY_BODY_MAX * 3 + 7));
        let (url, _) = backend(|_, mut s| async move {
            let request = read_request(&mut s).await.unwrap();
            let body = &request[request.find("\r\n\r\n").unwrap() + 4..];
            let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
            s.write_all(answer.as_bytes()).await.unwrap();
            s.write_all(body.as_bytes()).await.unwrap();
        })
        .await;
        let client = PlainClient::new(&url, Duration::from_secs(1));
        let response = client.send(post(&url, big)).await.unwrap();
        assert_eq!(response.body().size_hint().exact(), Some(big.len() as u64));
        assert_eq!(text(response).await, *big);
    }
}
