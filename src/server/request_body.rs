//! A client request's body as the routes see it ([`ClientBody`]), and the
//! connection state an HTTP/1.1 body shares with its connection ([`Wire`]).
//!
//! An HTTP/1.1 request body is read by whoever holds it (the proxy, or the
//! lingering drain after a 413) straight from the connection's socket and
//! read buffer, with no task or channel in between; the connection loop
//! reads the next head only once the body is finished or released.

use std::{
    cell::RefCell,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    task::{ready, Context, Poll},
};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::{net::TcpStream, sync::Notify};

use crate::socket;
use crate::spare::{self, Spares};
use crate::upstream::codec::Framing;

/// Bytes asked of the socket per read: a small request fits in one.
const READ_CHUNK: usize = 16 * 1024;

/// The interim answer to `Expect: 100-continue`.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// The client's framing is broken (chunk sizes, lengths).
    #[error("{0}")]
    Malformed(&'static str),
    /// The client closed the connection before the body ended.
    #[error("the client closed the connection before the body ended")]
    Closed,
    /// The socket failed.
    #[error("reading the request body failed: {0}")]
    Io(#[from] io::Error),
    /// hyper's HTTP/2 body failed.
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

impl RequestBodyError {
    /// Whether the client left rather than sent a broken body: its
    /// connection ended or was reset under the body, or (HTTP/2) it reset
    /// the stream, sent GOAWAY or its connection failed. A stream h2 itself
    /// reset (a body that breaks its `content-length`, flow control
    /// broken) was the client's error, not its leaving.
    pub fn client_left(&self) -> bool {
        match self {
            RequestBodyError::Closed => true,
            RequestBodyError::Io(e) => socket::peer_closed(e),
            RequestBodyError::Hyper(e) => {
                for s in crate::upstream::sources(e) {
                    if let Some(h2) = s.downcast_ref::<h2::Error>() {
                        return h2.is_io()
                            || (h2.is_remote() && (h2.is_reset() || h2.is_go_away()));
                    }
                    if let Some(io) = s.downcast_ref::<io::Error>() {
                        return socket::peer_closed(io);
                    }
                }
                // hyper's own: the connection closed or was cancelled.
                e.is_closed() || e.is_canceled() || e.is_incomplete_message()
            }
            RequestBodyError::Malformed(_) => false,
        }
    }
}

/// A request body from either protocol: weir's own HTTP/1.1 connection or
/// hyper's HTTP/2 one.
#[derive(Debug)]
pub enum ClientBody {
    /// Read from the connection's socket by [`RequestBody`].
    Http1(RequestBody),
    /// hyper's HTTP/2 stream.
    Http2(Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        match self.get_mut() {
            ClientBody::Http1(body) => body.poll_data(cx).map(|d| d.map(|d| d.map(Frame::data))),
            ClientBody::Http2(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(RequestBodyError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Http1(body) => body.wire.inbound().framing.is_done(),
            ClientBody::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Http1(body) => {
                let framing = &body.wire.inbound().framing;
                match framing.remaining() {
                    Some(n) => SizeHint::with_exact(n),
                    // Chunked: at least the rest of the chunk being read.
                    None => {
                        let mut hint = SizeHint::new();
                        hint.set_lower(framing.promised());
                        hint
                    }
                }
            }
            ClientBody::Http2(body) => body.size_hint(),
        }
    }
}

/// One HTTP/1.1 client connection's socket and read side, shared by the
/// connection loop and the body of the request being served.
#[derive(Debug)]
pub(crate) struct Wire {
    pub(crate) stream: TcpStream,
    inbound: Mutex<Inbound>,
    /// A [`RequestBody`] for the current request still exists.
    body_held: AtomicBool,
    /// Signalled when that body is dropped.
    released: Notify,
}

/// Spare client read buffers kept per thread: enough for each of a lane's
/// connections that are between requests at once under load.
const SPARE_BUFFERS: usize = 32;
/// Read buffers grown past this (a large body read ahead) are freed, not
/// kept.
const MAX_SPARE: usize = 2 * READ_CHUNK;

thread_local! {
    /// Read buffers of connections waiting for their client's next bytes
    /// (see [`crate::spare`]).
    static SPARE_READS: Spares<BytesMut> = const { RefCell::new(Vec::new()) };
}

/// What has been read from the client and not yet consumed.
#[derive(Debug)]
pub(crate) struct Inbound {
    /// Bytes read and not yet parsed: the rest of the body, or the next
    /// request (pipelining).
    pub(crate) buf: BytesMut,
    /// Where the current request's body stands.
    pub(crate) framing: Framing,
    /// The client has closed its side.
    pub(crate) eof: bool,
    /// The client sent `Expect: 100-continue` and has not been told to go on.
    pub(crate) continue_due: bool,
    /// Bytes of `100 Continue` written so far.
    pub(crate) continue_sent: usize,
    /// The response has begun: too late for `100 Continue`.
    pub(crate) responding: bool,
}

impl Inbound {
    /// Room for a read of about `size` bytes, taking this thread's spare
    /// when the buffer holds no memory (the connection waited with none).
    pub(crate) fn make_room(&mut self, size: usize) {
        if self.buf.capacity() == 0 {
            self.buf = spare::take(&SPARE_READS);
        }
        self.buf.reserve(size);
    }

    /// Gives the buffer to this thread's spares if nothing unread is in
    /// it: a connection that waits for its client holds no read buffer.
    pub(crate) fn release_buffer(&mut self) {
        if self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            spare::keep(&SPARE_READS, buf, SPARE_BUFFERS, MAX_SPARE);
        }
    }
}

impl Wire {
    /// Wraps an accepted socket and what was already read from it.
    pub(crate) fn new(stream: TcpStream, buf: BytesMut) -> Self {
        Self {
            stream,
            inbound: Mutex::new(Inbound {
                buf,
                framing: Framing::Done,
                eof: false,
                continue_due: false,
                continue_sent: 0,
                responding: false,
            }),
            body_held: AtomicBool::new(false),
            released: Notify::new(),
        }
    }

    /// The read side. Only the connection loop and the current body use
    /// it, one at a time, so the lock is never contended.
    pub(crate) fn inbound(&self) -> MutexGuard<'_, Inbound> {
        self.inbound.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the current request's body still exists (someone may read it).
    pub(crate) fn body_held(&self) -> bool {
        self.body_held.load(Ordering::Acquire)
    }

    /// The socket and what was read from it and not consumed, once no
    /// request holds the connection (for handing it to HTTP/2).
    pub(crate) fn into_parts(self) -> (TcpStream, BytesMut) {
        let inbound = self.inbound.into_inner().unwrap_or_else(|e| e.into_inner());
        (self.stream, inbound.buf)
    }

    /// Waits until the current request's body has been dropped.
    pub(crate) async fn body_released(&self) {
        while self.body_held.load(Ordering::Acquire) {
            self.released.notified().await;
        }
    }

    /// Reads what the socket has into the buffer: `Ready(Ok(n))` with the
    /// bytes read, 0 at the client's end of input.
    pub(crate) fn poll_fill(
        &self,
        cx: &mut Context<'_>,
        inbound: &mut Inbound,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            inbound.make_room(READ_CHUNK);
            match socket::try_read_buf(&self.stream, &mut inbound.buf) {
                Ok(0) => {
                    inbound.eof = true;
                    return Poll::Ready(Ok(0));
                }
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// An HTTP/1.1 request body, read from the connection on demand. Dropping
/// it hands the read side back to the connection.
#[derive(Debug)]
pub struct RequestBody {
    wire: Arc<Wire>,
}

impl RequestBody {
    /// The body of the request whose head was just parsed; `inbound`
    /// already holds its framing.
    pub(crate) fn new(wire: Arc<Wire>) -> Self {
        wire.body_held.store(true, Ordering::Release);
        Self { wire }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, RequestBodyError>>> {
        let wire = &*self.wire;
        let mut inbound = wire.inbound();
        let inbound = &mut *inbound;
        loop {
            if inbound.framing.is_done() {
                return Poll::Ready(None);
            }
            match inbound.framing.decode(&mut inbound.buf) {
                Ok(Some(data)) => return Poll::Ready(Some(Ok(data))),
                Ok(None) if inbound.framing.is_done() => return Poll::Ready(None),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(RequestBodyError::Malformed(e.0)))),
            }
            if inbound.eof {
                return Poll::Ready(Some(Err(RequestBodyError::Closed)));
            }
            if inbound.continue_due && !inbound.responding {
                if let Err(e) = ready!(poll_send_continue(&wire.stream, cx, inbound)) {
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            inbound.continue_due = false;
            match ready!(wire.poll_fill(cx, inbound)) {
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.wire.body_held.store(false, Ordering::Release);
        self.wire.released.notify_one();
    }
}

/// Writes (the rest of) `100 Continue`.
fn poll_send_continue(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    inbound: &mut Inbound,
) -> Poll<io::Result<()>> {
    while let Some(rest) = CONTINUE
        .get(inbound.continue_sent..)
        .filter(|r| !r.is_empty())
    {
        ready!(stream.poll_write_ready(cx))?;
        match stream.try_write(rest) {
            Ok(n) => inbound.continue_sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
    Poll::Ready(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(bytes: &[u8]) -> Inbound {
        Inbound {
            buf: BytesMut::from(bytes),
            framing: Framing::Done,
            eof: false,
            continue_due: false,
            continue_sent: 0,
            responding: false,
        }
    }

    #[test]
    fn a_waiting_connection_gives_its_read_buffer_back_and_takes_it_again() {
        let mut waiting = inbound(b"");
        waiting.make_room(1024);
        let memory = waiting.buf.as_ptr();
        waiting.release_buffer();
        assert_eq!(waiting.buf.capacity(), 0, "it waits holding nothing");
        let mut next = inbound(b"");
        next.make_room(1024);
        assert_eq!(next.buf.as_ptr(), memory, "the next read reuses it");
        // Unread bytes (a pipelined request) stay where they are.
        let mut unread = inbound(b"GET / HTTP/1.1\r\n");
        unread.release_buffer();
        assert_eq!(&unread.buf[..], b"GET / HTTP/1.1\r\n");
        // A buffer grown for a large body is freed, not kept.
        let mut grown = inbound(b"");
        grown.buf.reserve(4 * READ_CHUNK);
        grown.release_buffer();
        assert_eq!(grown.buf.capacity(), 0);
        assert!(SPARE_READS.with_borrow(Vec::is_empty));
    }
}
