//! Listening sockets with a real backlog, and reads from a tokio socket
//! that forget readiness after a short read.
//!
//! tokio's `TcpListener::bind` listens with the standard library's backlog
//! of 128, so a burst of new connections (256 streams opened at once in
//! `benches/load.sh`) overflowed the accept queue: the kernel dropped SYNs
//! and those clients waited out the 1 s retransmission. [`listen`] asks for
//! [`LISTEN_BACKLOG`] instead (the kernel caps it at `net.core.somaxconn`).
//!
//! tokio keeps a socket marked readable until a read returns `WouldBlock`,
//! so the read after one that drained the socket is a wasted syscall: per
//! proxied request that was one `recvfrom` answered `EAGAIN` in four. A
//! read that returns fewer bytes than asked for has emptied the socket's
//! receive queue (TCP copies everything queued up to the length asked), so
//! the mark can go at once, as nginx does (`ngx_unix_recv`) and tokio's own
//! `poll_read` does. Bytes that arrive later raise a new edge-triggered
//! event, which marks the socket readable again; tokio only clears a mark
//! that no event has refreshed since the read began.

use std::io;
use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The accept queue asked of the kernel: room for a burst of thousands of
/// new connections while the accept loop catches up (nginx asks 511, the
/// standard library 128); Linux caps it at `net.core.somaxconn`.
pub(crate) const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` (with `SO_REUSEADDR`, as tokio's `bind` does) and listens
/// with [`LISTEN_BACKLOG`]. Must run inside a tokio runtime.
pub(crate) fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// [`TcpStream::try_read_buf`], but a short read also clears the socket's
/// readiness, so the next read waits for the reactor instead of asking the
/// kernel for bytes it does not have.
pub(crate) fn try_read_buf(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let mut read = None;
    let result = stream.try_io(Interest::READABLE, || {
        let asked = buf.capacity() - buf.len();
        let n = stream.try_read_buf(buf)?;
        if n == 0 || n >= asked {
            return Ok(n);
        }
        // Drained: report `WouldBlock` to `try_io`, which is what clears
        // the readiness observed when it began, and keep the count.
        read = Some(n);
        Err(io::ErrorKind::WouldBlock.into())
    });
    match (result, read) {
        (_, Some(n)) => Ok(n),
        (result, None) => result,
    }
}

/// Whether a socket error says the peer closed the connection (a reset,
/// an abort, a broken pipe, an early end): a client gone, or a backend's
/// kept-alive connection closed under a request.
pub(crate) fn peer_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    /// 600 connections opened at once, none accepted yet: with the
    /// standard library's backlog of 128 the kernel drops the SYNs past the
    /// 129th and those connects hang; with [`LISTEN_BACKLOG`] all complete.
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_accept_queue() {
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let n = somaxconn.min(600);
        if n <= 129 {
            eprintln!("net.core.somaxconn is {somaxconn}: no backlog past 128 to check");
            return;
        }
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut connects = tokio::task::JoinSet::new();
        for _ in 0..n {
            connects.spawn(TcpStream::connect(addr));
        }
        let all = tokio::time::timeout(std::time::Duration::from_secs(30), connects.join_all())
            .await
            .expect("connects past the 129th hung: the backlog is not LISTEN_BACKLOG");
        assert!(all.iter().all(Result::is_ok));
        // They are all waiting to be accepted.
        for _ in 0..n {
            listener.accept().await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_short_read_clears_readiness_and_new_bytes_set_it_again() {
        let (mut client, server) = pair().await;
        client.write_all(b"hello").await.unwrap();
        server.readable().await.unwrap();
        let mut buf = BytesMut::with_capacity(64);
        assert_eq!(try_read_buf(&server, &mut buf).unwrap(), 5);
        assert_eq!(&buf[..], b"hello");
        // No syscall needed to know there is nothing more: the next read
        // is refused from the cleared mark.
        let err = try_read_buf(&server, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        // Later bytes are not missed.
        client.write_all(b" world").await.unwrap();
        server.readable().await.unwrap();
        assert_eq!(try_read_buf(&server, &mut buf).unwrap(), 6);
        assert_eq!(&buf[..], b"hello world");
        // End of input reads as 0, and keeps reading as 0.
        drop(client);
        server.readable().await.unwrap();
        assert_eq!(try_read_buf(&server, &mut buf).unwrap(), 0);
        assert_eq!(try_read_buf(&server, &mut buf).unwrap(), 0);
    }

    #[tokio::test]
    async fn a_full_read_keeps_readiness_for_what_is_left() {
        let (mut client, server) = pair().await;
        client.write_all(&[7u8; 100]).await.unwrap();
        // Wait until all 100 bytes are queued.
        let mut peek = [0u8; 100];
        while server.peek(&mut peek).await.unwrap() < 100 {}
        let mut buf = BytesMut::with_capacity(10);
        let asked = buf.capacity();
        assert_eq!(try_read_buf(&server, &mut buf).unwrap(), asked);
        let mut total = asked;
        while total < 100 {
            buf.reserve(100);
            total += try_read_buf(&server, &mut buf).unwrap();
        }
        assert_eq!(buf.len(), 100);
    }
}
