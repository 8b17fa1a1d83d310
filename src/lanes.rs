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
//! hop between threads happens on the request path. Lanes share the rest
//! (snapshot, buckets, the balancer's cursor) through atomics; what every
//! request writes and nothing needs exact at once (metrics, the retry
//! budget's count) is kept per lane, on lines of its own ([`Padded`]).
//!
//! The rest of weir (accept loops, admin listener, health probes, reloads)
//! stays on the main runtime, whose thread is lane 0 for [`current`].
//!
//! When the process may run on exactly as many CPUs as it has lanes (a
//! whole machine, a cpuset), lane *i* is pinned to the *i*-th of them, as
//! thread-per-core servers do (nginx's `worker_cpu_affinity auto`). Left to
//! the kernel, two busy lanes end up sharing one CPU while the other runs
//! something else, and one lane's connections wait out the other's
//! time slice: on two vCPUs beside the load generator and the upstream,
//! that was half the bench's 32-connection p99 (docs/BENCHMARKS.md, session
//! 10). Under a CPU quota smaller than the CPUs allowed (a Kubernetes limit
//! without a cpuset) lanes are not pinned: they must be free to run on
//! whichever shared CPU is idle. `WEIR_CPU_AFFINITY=off` turns pinning off.

use std::{
    cell::Cell,
    future::Future,
    io,
    sync::atomic::{AtomicUsize, Ordering},
    sync::OnceLock,
    time::Duration,
};

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

use crate::busy_poll;

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

/// A value alone on its cache lines: 128 bytes, since x86 prefetches
/// lines in pairs and Apple/ARM cores use 128-byte lines (crossbeam's
/// `CachePadded` uses the same figure). Per-lane state padded so, written
/// by one lane, never moves a line another lane reads or writes.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub T);

/// Makes the calling thread count as lane `lane` for [`current`], so tests
/// of per-lane state can write several lanes' slots without starting lanes.
#[cfg(test)]
pub(crate) fn pretend_lane(lane: usize) {
    LANE.with(|l| l.set(lane));
}

/// Running lanes; dropping them stops their threads (and drops whatever
/// tasks are still on them).
#[derive(Debug)]
pub(crate) struct Lanes {
    handles: Vec<Handle>,
    /// The lanes' threads, joined by [`Lanes::stop`].
    threads: Vec<std::thread::JoinHandle<()>>,
    next: AtomicUsize,
    stop: CancellationToken,
}

impl Lanes {
    /// Starts [`count`] lanes, pinned and busy polling as this process's
    /// CPUs and environment say.
    pub(crate) fn start() -> io::Result<Self> {
        let cpus = planned_cpus();
        let poll = busy_poll::planned(cpus.is_some());
        Self::start_with(cpus, poll)
    }

    /// Starts [`count`] lanes, lane *i* pinned to `cpus[i - 1]` if given,
    /// each polling for `poll` after a head if given.
    ///
    /// Each lane is a runtime with descriptors of its own (epoll, eventfd);
    /// if one cannot start (EMFILE), the lanes already running are stopped
    /// by the partial value's `Drop` instead of idling forever.
    fn start_with(cpus: Option<Vec<usize>>, poll: Option<Duration>) -> io::Result<Self> {
        let mut lanes = Self {
            handles: Vec::with_capacity(count()),
            threads: Vec::with_capacity(count()),
            next: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        };
        for lane in 1..=count() {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            // The lane's own token (cancelled with `stop`): the lane's
            // root task polls it at every turn while it busy polls, and
            // each poll locks the token's waiter list, which must not be
            // one list shared with the other lanes.
            let stop = lanes.stop.child_token();
            let cpu = cpus.as_ref().and_then(|cpus| cpus.get(lane - 1).copied());
            let thread = std::thread::Builder::new()
                .name(format!("weir-lane-{lane}"))
                .spawn(move || {
                    LANE.with(|l| l.set(lane));
                    if let Some(cpu) = cpu {
                        if let Err(e) = affinity::pin_current(cpu) {
                            tracing::warn!(lane, cpu, error = %e, "cannot pin the lane to its CPU");
                        }
                    }
                    runtime.block_on(async {
                        match poll {
                            Some(window) => tokio::select! {
                                () = stop.cancelled() => {}
                                () = busy_poll::run(window) => {}
                            },
                            None => stop.cancelled().await,
                        }
                    });
                    // Drops every task (a connection cut at shutdown logs
                    // as it drops), without waiting long for blocking work
                    // (a host name lookup) that may never end.
                    runtime.shutdown_timeout(LANE_SHUTDOWN);
                })?;
            lanes.handles.push(handle);
            lanes.threads.push(thread);
        }
        Ok(lanes)
    }

    /// Stops the lanes and waits (up to [`STOP_WAIT`]) until their threads
    /// have dropped every task they ran: a connection cut at shutdown
    /// writes its log lines as it drops, and the process must not exit
    /// before that.
    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut self.threads);
        // A plain thread, not the runtime's blocking pool: one still
        // joining when the wait ends must not hold up the runtime's drop
        // (and with it the process's exit).
        let (joined, all_joined) = tokio::sync::oneshot::channel();
        let joiner = std::thread::Builder::new()
            .name("weir-lane-join".to_owned())
            .spawn(move || {
                for thread in threads {
                    let _ = thread.join();
                }
                let _ = joined.send(());
            });
        if joiner.is_err() {
            return;
        }
        if tokio::time::timeout(STOP_WAIT, all_joined).await.is_err() {
            tracing::warn!("the connection lanes did not stop within {STOP_WAIT:?}");
        }
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

/// How long [`Lanes::stop`] waits for the lanes' threads.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a stopping lane waits for its blocking work.
const LANE_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(1);

/// The environment variable that can turn lane pinning off (`off`); the
/// default, `auto`, pins when [`pinning`] says so.
const AFFINITY_ENV: &str = "WEIR_CPU_AFFINITY";

/// The CPU each lane is to be pinned to, for this process and its
/// `WEIR_CPU_AFFINITY`; `None` leaves placement to the kernel. A setting
/// that is neither `auto` nor `off` is reported and read as `auto`.
fn planned_cpus() -> Option<Vec<usize>> {
    let setting = std::env::var(AFFINITY_ENV).ok();
    let allowed = affinity::allowed()?;
    pinning(&allowed, count(), setting.as_deref()).unwrap_or_else(|bad| {
        tracing::warn!("{AFFINITY_ENV}={bad:?} is neither \"auto\" nor \"off\"; using \"auto\"");
        pinning(&allowed, count(), None).unwrap_or_default()
    })
}

/// The CPU each lane is pinned to (lane *i* to the *i*-th), given the CPUs
/// the process may run on, the lane count and the `WEIR_CPU_AFFINITY`
/// setting; `Ok(None)` leaves placement to the kernel. Pinning needs one
/// allowed CPU per lane and nothing more: with more CPUs allowed than lanes
/// (a CPU quota) a pinned lane could not move off a CPU that other
/// processes keep busy. A setting other than `auto` or `off` is returned
/// as the error, for the caller to report.
fn pinning<'s>(
    allowed: &[usize],
    lanes: usize,
    setting: Option<&'s str>,
) -> Result<Option<Vec<usize>>, &'s str> {
    match setting.map(str::trim) {
        None | Some("") | Some("auto") => {}
        Some("off") => return Ok(None),
        Some(_) => return Err(setting.unwrap_or_default()),
    }
    if lanes < 2 || allowed.len() != lanes {
        return Ok(None);
    }
    Ok(Some(allowed.to_vec()))
}

/// The CPU-affinity system calls, where the platform has them.
#[cfg(target_os = "linux")]
mod affinity {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;

    /// The CPUs the calling thread may run on, in ascending order.
    pub(super) fn allowed() -> Option<Vec<usize>> {
        let set = sched_getaffinity(Pid::from_raw(0)).ok()?;
        Some(
            (0..CpuSet::count())
                .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
                .collect(),
        )
    }

    /// Restricts the calling thread to `cpu`.
    pub(super) fn pin_current(cpu: usize) -> nix::Result<()> {
        let mut set = CpuSet::new();
        set.set(cpu)?;
        sched_setaffinity(Pid::from_raw(0), &set)
    }
}

/// Elsewhere lanes are not pinned.
#[cfg(not(target_os = "linux"))]
mod affinity {
    pub(super) fn allowed() -> Option<Vec<usize>> {
        None
    }

    pub(super) fn pin_current(_cpu: usize) -> std::io::Result<()> {
        Ok(())
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

    #[test]
    fn lanes_are_pinned_only_with_one_allowed_cpu_each() {
        // A whole machine or a cpuset: lane i on the i-th allowed CPU.
        assert_eq!(pinning(&[0, 1], 2, None), Ok(Some(vec![0, 1])));
        assert_eq!(
            pinning(&[2, 5, 7], 3, Some("auto")),
            Ok(Some(vec![2, 5, 7]))
        );
        assert_eq!(pinning(&[0, 1], 2, Some(" auto ")), Ok(Some(vec![0, 1])));
        // A quota below the CPUs allowed: the kernel places the lanes.
        assert_eq!(pinning(&[0, 1, 2, 3], 2, None), Ok(None));
        // One lane, or switched off.
        assert_eq!(pinning(&[0], 1, None), Ok(None));
        assert_eq!(pinning(&[0, 1], 2, Some("off")), Ok(None));
        // Anything else is reported, not guessed at.
        assert_eq!(pinning(&[0, 1], 2, Some("yes")), Err("yes"));
        assert_eq!(pinning(&[0, 1], 2, Some("0-1")), Err("0-1"));
    }

    #[tokio::test]
    async fn a_lane_runs_where_pinning_puts_it() {
        let before = affinity::allowed();
        let planned = planned_cpus();
        let lanes = Lanes::start().unwrap();
        for lane in 1..=count() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            lanes.spawn(async move {
                let _ = tx.send((current(), affinity::allowed()));
            });
            let (on, cpus) = rx.await.unwrap();
            assert_eq!(on, lane);
            match &planned {
                Some(plan) => assert_eq!(cpus, Some(vec![plan[lane - 1]])),
                None => assert_eq!(cpus, before),
            }
        }
        // The thread that started the lanes keeps its own CPUs.
        assert_eq!(affinity::allowed(), before);
    }

    /// Polls made on the first lane while a task there reads heads, up to
    /// `tries` times a millisecond apart until the lane has polled.
    async fn polls_after_heads(poll: Option<Duration>, tries: usize) -> u64 {
        let lanes = Lanes::start_with(None, poll).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        lanes.spawn(async move {
            for _ in 0..tries {
                busy_poll::head_read();
                tokio::time::sleep(Duration::from_millis(1)).await;
                if busy_poll::polls() > 0 {
                    break;
                }
            }
            let _ = tx.send(busy_poll::polls());
        });
        rx.await.unwrap()
    }

    #[tokio::test]
    async fn a_lane_polls_after_a_head_only_when_polling_is_on() {
        assert!(polls_after_heads(Some(Duration::from_micros(50)), 200).await > 0);
        assert_eq!(polls_after_heads(None, 20).await, 0);
    }
}
