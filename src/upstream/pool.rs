//! Idle keep-alive connections to one plain-http backend.
//!
//! A connection is here only between requests: a request takes one out and
//! its response body puts it back once read to the end, so a connection is
//! never shared and never needs a task of its own. Taking is LIFO (the
//! warmest socket first) and checks that the backend has not closed it in
//! the meantime. A sweeper task, alive only while connections idle, closes
//! those idle longer than [`IDLE_TIMEOUT`] or closed by the backend, so
//! file descriptors return to their baseline after a burst.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, Mutex, PoisonError, Weak,
};
use std::time::Duration;

use tokio::{net::TcpStream, time::Instant};

/// How long an idle connection is kept. Shorter than the 60-120 s of
/// hosted APIs' load balancers; uvicorn-based servers (vLLM, SGLang) and
/// llama.cpp close theirs after 5 s, and those closes are found as the
/// connection is taken (`is_open`), so only a close racing the reuse
/// itself reaches a request, as `AttemptError::IdleClosed`.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// How often the sweeper looks at idle connections.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The idle connections of one backend on one lane (`conn::PlainClient`
/// keeps a pool per lane). Aligned to 128 bytes (two cache lines, which
/// adjacent-line prefetch moves together), so its `Arc` allocation shares
/// no line with another lane's: the lanes' pools of a backend are made
/// one after the other, and unpadded they sat on the same lines, which
/// every request's take, put and `Arc` clone then passed between CPUs.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Pool {
    idle: Mutex<Vec<Idle>>,
    /// Whether a sweeper task is running for this pool.
    sweeping: AtomicBool,
}

#[derive(Debug)]
struct Idle {
    stream: TcpStream,
    since: Instant,
}

impl Pool {
    /// The most recently used idle connection that is still open, if any.
    pub(crate) fn take(&self) -> Option<TcpStream> {
        loop {
            let idle = self.lock().pop()?;
            if idle.since.elapsed() < IDLE_TIMEOUT && is_open(&idle.stream) {
                return Some(idle.stream);
            }
            // Expired or closed by the backend: dropped (closed) here,
            // outside the lock, and the next one is tried.
        }
    }

    /// Returns a connection whose response was read to the end.
    pub(crate) fn put(self: &Arc<Self>, stream: TcpStream) {
        self.lock().push(Idle {
            stream,
            since: Instant::now(),
        });
        // Most puts find a sweeper running: a load, and a swap (a locked
        // write) only when none seems to be. A sweeper that is stopping
        // looks for connections put meanwhile (see `sweep`).
        if !self.sweeping.load(Ordering::Acquire) && !self.sweeping.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(sweep(Arc::downgrade(self)));
                }
                Err(_) => self.sweeping.store(false, Ordering::Release),
            }
        }
    }

    /// Closes every idle connection: one of them was found dropped by the
    /// backend, and the others most likely were too.
    pub(crate) fn clear(&self) {
        let dropped = std::mem::take(&mut *self.lock());
        // Closed outside the lock.
        drop(dropped);
    }

    /// Idle connections right now.
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        self.lock().len()
    }

    /// Closes expired and backend-closed connections; whether any remain.
    fn sweep_once(&self) -> bool {
        let stale: Vec<Idle> = {
            let mut idle = self.lock();
            let (keep, stale) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|i| i.since.elapsed() < IDLE_TIMEOUT && is_open(&i.stream));
            *idle = keep;
            stale
        };
        drop(stale);
        !self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // Nothing panics while holding it; a poisoned list is still a list.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sweeper: runs while the pool has idle connections and exists.
async fn sweep(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(pool) = pool.upgrade() else { return };
        if pool.sweep_once() {
            continue;
        }
        pool.sweeping.store(false, Ordering::Release);
        // A connection put back between the sweep and the store saw a
        // sweeper running: keep sweeping for it.
        if pool.lock().is_empty() || pool.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
    }
}

/// Whether an idle connection is still usable: the backend has neither
/// closed it (EOF) nor sent anything unasked (which would be read as the
/// next response).
fn is_open(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{io::AsyncWriteExt, net::TcpListener};

    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    #[tokio::test]
    async fn takes_the_newest_open_connection_and_skips_closed_ones() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Arc::new(Pool::default());
        let (a, a_peer) = pair(&listener).await;
        let (b, b_peer) = pair(&listener).await;
        let (a_port, b_port) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        pool.put(a);
        pool.put(b);
        assert_eq!(pool.idle(), 2);
        // The backend closes `b`, the newest: `a` is handed out instead.
        drop(b_peer);
        let mut a_peer = a_peer;
        let mut taken = None;
        for _ in 0..1000 {
            // The FIN reaches the reactor asynchronously.
            tokio::task::yield_now().await;
            let t = pool.take().unwrap();
            if t.local_addr().unwrap() != b_port {
                taken = Some(t);
                break;
            }
            pool.put(t);
        }
        let taken = taken.expect("the closed connection was still handed out");
        assert_eq!(taken.local_addr().unwrap(), a_port);
        assert_eq!(pool.idle(), 0);
        // A connection the backend wrote to unasked is not reused either.
        pool.put(taken);
        a_peer.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        let mut gone = false;
        for _ in 0..100 {
            tokio::task::yield_now().await;
            match pool.take() {
                None => {
                    gone = true;
                    break;
                }
                Some(t) => pool.put(t),
            }
        }
        assert!(gone);
    }

    #[test]
    fn each_pool_has_its_lines_to_itself() {
        let pools: Vec<Arc<Pool>> = (0..4).map(|_| Arc::default()).collect();
        for pool in &pools {
            assert_eq!(Arc::as_ptr(pool) as usize % 128, 0);
        }
        assert!(std::mem::size_of::<Pool>() <= 128, "one padded block");
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_closes_connections_idle_too_long() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Arc::new(Pool::default());
        let (a, _a_peer) = pair(&listener).await;
        pool.put(a);
        tokio::time::sleep(IDLE_TIMEOUT - SWEEP_EVERY).await;
        assert_eq!(pool.idle(), 1);
        tokio::time::sleep(SWEEP_EVERY * 2).await;
        assert_eq!(pool.idle(), 0);
        assert!(!pool.sweeping.load(Ordering::Acquire));
        // And a new idle connection starts a new sweeper.
        let (b, _b_peer) = pair(&listener).await;
        pool.put(b);
        assert!(pool.sweeping.load(Ordering::Acquire));
    }
}
