//! The https client's connections as weir follows them: hyper-util pools
//! them, and weir marks each once it has answered ([`Tracked`]), so that
//! `send` tells the idle-close race from a backend failing with the
//! request in hand, as the plain client does (`conn::PlainClient::round_trip`).

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use http::Response;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};

use super::{
    conn::{IDLE_RACE_SLACK, MAX_HANDSHAKE_SAMPLE},
    sources,
};

/// One https connection (TCP, then TLS), as hyper-util's pool holds it.
/// Reads and writes go straight through; what it adds is [`Seen`], which
/// hyper-util hands to every response made on it and to its errors.
#[derive(Debug)]
pub(crate) struct Tracked<T> {
    inner: T,
    seen: Seen,
}

/// What weir knows of one connection.
#[derive(Clone, Debug)]
pub(crate) struct Seen(Arc<State>);

#[derive(Debug)]
struct State {
    /// Whether a response head has come on it: a request on it since is
    /// one on a kept-alive connection.
    answered: AtomicBool,
    /// How long its TCP and TLS handshakes took (two round trips or
    /// more): a close racing a reuse arrives within them (see
    /// `conn::PlainClient::idle_race`).
    handshake: Duration,
}

impl<T> Tracked<T> {
    /// A connection just made, whose handshakes took `handshake`.
    pub(crate) fn new(inner: T, handshake: Duration) -> Self {
        Tracked {
            inner,
            seen: Seen(Arc::new(State {
                answered: AtomicBool::new(false),
                handshake,
            })),
        }
    }
}

/// Marks the connection `response` came on as having answered.
pub(crate) fn answered<B>(response: &Response<B>) {
    if let Some(seen) = response.extensions().get::<Seen>() {
        seen.0.answered.store(true, Ordering::Relaxed);
    }
}

/// Whether `error`, `waited` after its request went out, is a kept-alive
/// HTTP/1.1 connection closed without an answer as the race with the
/// backend's idle close does it: the connection had answered before (one
/// request at a time: before this one), and the close (a reset, or the end
/// of the stream, with or without TLS's close_notify) came within that
/// race: [`IDLE_RACE_SLACK`] plus the connection's handshakes, TCP's and
/// TLS's, two round trips or more (the plain client allows two TCP ones),
/// counted only when under a second, as the plain client's samples are.
/// Never on HTTP/2, whose servers close idle connections with GOAWAY
/// (streams it refuses are [`unprocessed`]) and whose streams share a
/// connection: one dropped with streams open is the backend's failure.
pub(crate) fn idle_closed(error: &hyper_util::client::legacy::Error, waited: Duration) -> bool {
    let Some(info) = error.connect_info().filter(|info| !info.is_negotiated_h2()) else {
        return false;
    };
    let mut extensions = http::Extensions::new();
    info.get_extras(&mut extensions);
    let Some(Seen(state)) = extensions.get::<Seen>() else {
        return false;
    };
    // A handshake of a second or more (a resent SYN, an overloaded
    // backend) says nothing of the round trip: the plain client drops such
    // samples, and here the race is then the slack alone.
    let handshake = Some(state.handshake).filter(|&h| h < MAX_HANDSHAKE_SAMPLE);
    let race = IDLE_RACE_SLACK + handshake.unwrap_or_default();
    state.answered.load(Ordering::Relaxed) && waited <= race && closed(error)
}

/// Whether `error` is an HTTP/2 stream the backend refused before
/// processing it, which may be sent again (RFC 9113 §6.8, §8.7): one above
/// the last stream id of the backend's GOAWAY (a server closing a
/// connection after so many requests, or while shutting down, refuses the
/// streams that crossed its GOAWAY; h2 also fails a stream opened after
/// it), or one reset with `REFUSED_STREAM`; or a request an HTTP/2
/// connection that closed (on a GOAWAY read first) handed back unsent
/// (hyper's "canceled"). A stream the GOAWAY let through and the close
/// then cut ends with a broken pipe instead. (hyper reports the
/// connection's GOAWAY also for a stream it opened just as the GOAWAY
/// came, which the backend may have taken: rare, and then sent twice.)
pub(crate) fn unprocessed(error: &hyper_util::client::legacy::Error) -> bool {
    let h2 = error
        .connect_info()
        .is_some_and(|info| info.is_negotiated_h2());
    h2 && sources(error).any(|s| {
        s.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
            || s.downcast_ref::<h2::Error>().is_some_and(|e| {
                e.is_remote()
                    && (e.is_go_away()
                        || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)))
            })
    })
}

/// Whether the connection closed under the request: hyper saw the stream
/// end before an answer, or the socket reported a reset, an abort or an
/// early end (rustls: no close_notify).
fn closed(error: &(dyn std::error::Error + 'static)) -> bool {
    // Down to the first `io::Error`, which says how the socket ended.
    for s in sources(error) {
        if s.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
        {
            return true;
        }
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return crate::socket::peer_closed(io);
        }
    }
    false
}

impl<T: Connection> Connection for Tracked<T> {
    fn connected(&self) -> Connected {
        self.inner.connected().extra(self.seen.clone())
    }
}

impl<T: Read + Unpin> Read for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}
