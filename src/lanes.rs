//! Lanes: one single-threaded runtime per core for client connections
//! (nginx's worker processes, Envoy's worker threads, as threads).
//!
//! On tokio's work-stealing runtime every wake-up of a proxied request (the
//! client's bytes, the backend's answer) may land on another worker, which
//! then wakes a parked thread to share the work: futex calls and context
//! switches that a proxy doing 5 µs of work per request pays several times
//! over. A connection accepted by weir is instead handed, whole, to one
//! lane; its requests, its upstream connections (the pools are per lane,
//! see [`current`]) and their timers all live on that lane's thread, so no
//! hop between threads happens on the request path. Lanes share everything
//! else (snapshot, buckets, metrics) through the same atomics as before.
//!
//! The rest of weir (accept loops, admin listener, health probes, reloads)
//! stays on the main runtime, whose thread is lane 0 for [`current`].

use std::{
    cell::Cell,
    future::Future,
    io,
    sync::atomic::{AtomicUsize, Ordering},
    sync::OnceLock,
};

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

thread_local! {
    /// This thread's lane: 1..=count() on lane threads, 0 elsewhere.
    static LANE: Cell<usize> = const { Cell::new(0) };
}

/// How many lanes a gateway runs: one per core the process may use
/// (`available_parallelism` honours cgroup CPU quotas).
pub(crate) fn count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The lane of the calling thread: 1..=[`count`] on a lane, 0 on any other
/// thread. Per-lane state (upstream pools) is indexed by it.
pub(crate) fn current() -> usize {
    LANE.with(Cell::get)
}

/// Running lanes; dropping them stops their threads (and drops whatever
/// tasks are still on them).
#[derive(Debug)]
pub(crate) struct Lanes {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stop: CancellationToken,
}

impl Lanes {
    /// Starts [`count`] lanes.
    ///
    /// Each lane is a runtime with descriptors of its own (epoll, eventfd);
    /// if one cannot start (EMFILE), the lanes already running are stopped
    /// by the partial value's `Drop` instead of idling forever.
    pub(crate) fn start() -> io::Result<Self> {
        let mut lanes = Self {
            handles: Vec::with_capacity(count()),
            next: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        };
        for lane in 1..=count() {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            let stop = lanes.stop.clone();
            std::thread::Builder::new()
                .name(format!("weir-lane-{lane}"))
                .spawn(move || {
                    LANE.with(|l| l.set(lane));
                    runtime.block_on(stop.cancelled());
                })?;
            lanes.handles.push(handle);
        }
        Ok(lanes)
    }

    /// Runs `task` on the next lane, round-robin.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len().max(1);
        match self.handles.get(i) {
            Some(handle) => drop(handle.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_run_on_lane_threads_round_robin() {
        let lanes = Lanes::start().unwrap();
        let mut seen = Vec::new();
        for _ in 0..count() * 2 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            lanes.spawn(async move {
                let _ = tx.send(current());
            });
            seen.push(rx.await.unwrap());
        }
        assert_eq!(current(), 0);
        let expected: Vec<usize> = (1..=count()).chain(1..=count()).collect();
        assert_eq!(seen, expected);
    }
}
