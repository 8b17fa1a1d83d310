//! Busy polling: a lane that has just served a request keeps checking its
//! sockets for a few tens of microseconds instead of going to sleep at once
//! (HAProxy's `busy-polling`, Seastar's idle poll, the guest kernel's
//! `haltpoll`, done in user space and only around requests).
//!
//! On a virtual machine an idle vCPU halts, and waking it again is a trip
//! through the hypervisor: about 20 µs on the bench machine, whose guest
//! halt polling is off (`guest_halt_poll_ns` = 0), against ~15 µs for a
//! whole request to the upstream on one vCPU. A request through a proxy
//! waits on two such wake-ups of the proxy's own CPU (the client's request,
//! the backend's answer). A lane that polls through those gaps is awake when
//! the bytes arrive and sees them on its next `epoll_wait(0)`; the bench's
//! one-connection round trip through weir drops by about a third, below
//! the upstream's own when hit directly (docs/BENCHMARKS.md, sessions 11
//! and 12).
//!
//! The price is CPU that would otherwise be idle, so polling is bounded
//! three ways: it starts only when a request or response head is read (the
//! chunks of a long stream do not start it), it stops once nothing has been
//! read for [`DEFAULT_WINDOW`], and it stops the moment the kernel runs
//! something else on the lane's CPU: each poll that found nothing offers
//! the CPU away (`sched_yield`) and any taker ends polling, so polling
//! never takes a CPU that another thread wants. It then stays off for
//! [`BACKOFF`], twice as long each time it is preempted again, up to
//! [`MAX_BACKOFF`]: on a saturated machine it all but stops. The one
//! exception is a lane serving a single client connection with at most
//! one exchange in flight: what takes its CPU then is that client or its
//! backend, woken beside the lane, and the lane gives it the CPU and polls
//! on once it has run ([`Serving`]). It is on by
//! default only when the lanes are pinned one per CPU (a whole machine or a
//! cpuset, see `lanes`): under a CPU quota it would burn the quota.
//! `WEIR_BUSY_POLL` sets it: `auto` (the default), `off`, or a window in
//! microseconds (1 to 1000).

use std::{
    cell::Cell,
    task::{Poll, Waker},
    time::Duration,
};

use tokio::time::Instant;

/// How long a lane keeps polling after the last head it read: longer than
/// one request's trip to a fast backend and back on the bench machine
/// (20–40 µs), far shorter than a kernel time slice.
const DEFAULT_WINDOW: Duration = Duration::from_micros(50);

/// How long polling stays off after the lane was preempted while polling,
/// the first time: a brief contender (the client on the same CPU) gets
/// the CPU and polling is back a few requests later.
const BACKOFF: Duration = Duration::from_millis(1);

/// The longest a preempted poller stays off: preempted again and again
/// (every CPU busy), it doubles its quiet period up to this, so that a
/// saturated lane costs about what one that never polls does.
const MAX_BACKOFF: Duration = Duration::from_millis(32);

/// The largest window a setting may ask for: beyond this, polling is a
/// CPU burner, not a latency tool.
const MAX_WINDOW_US: u64 = 1000;

/// The environment variable that sets busy polling.
const ENV: &str = "WEIR_BUSY_POLL";

thread_local! {
    /// Heads read on this thread; the poller compares it between polls.
    static HEADS: Cell<u64> = const { Cell::new(0) };
    /// Client connections open on this thread ([`Serving::connection`]).
    static CONNECTIONS: Cell<u32> = const { Cell::new(0) };
    /// Backend exchanges in flight on this thread ([`Serving::exchange`]).
    static EXCHANGES: Cell<u32> = const { Cell::new(0) };
    /// The idle poller of this lane, waiting for the next head to start.
    static IDLE: Cell<Option<Waker>> = const { Cell::new(None) };
}

#[cfg(test)]
thread_local! {
    /// Polls made by this thread's poller (read by the tests only, so
    /// counted only in test builds).
    static POLLS: Cell<u64> = const { Cell::new(0) };
}

/// Called by the request path when it reads a request head from a client
/// or a response head from a backend: starts this lane's poller if it is
/// idle. Costs a thread-local increment otherwise; a no-op off the lanes.
#[inline]
pub(crate) fn head_read() {
    HEADS.with(|h| h.set(h.get().wrapping_add(1)));
    if let Some(poller) = IDLE.with(Cell::take) {
        // On the lane's own thread: sets the runtime's flag, no system call.
        poller.wake();
    }
}

/// One client connection open, or one backend exchange in flight, on the
/// calling thread while this lives: what the poller counts to tell a lane
/// that serves one client at a time from a loaded one ([`Rule`]). Made and
/// dropped on the same lane thread (a connection's tasks stay on its
/// lane); a thread-local count, so it costs no shared write. Off the
/// lanes (their start failed, the main runtime serves) a task may move
/// between threads and leave a count off there, where no poller reads it.
#[derive(Debug)]
pub(crate) struct Serving(&'static std::thread::LocalKey<Cell<u32>>);

impl Serving {
    /// Counts a client connection until dropped.
    pub(crate) fn connection() -> Self {
        Self::count(&CONNECTIONS)
    }

    /// Counts a backend exchange (request sent, response not yet done)
    /// until dropped.
    pub(crate) fn exchange() -> Self {
        Self::count(&EXCHANGES)
    }

    fn count(key: &'static std::thread::LocalKey<Cell<u32>>) -> Self {
        key.with(|n| n.set(n.get().saturating_add(1)));
        Self(key)
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// Whether the calling thread serves at most one client connection with at
/// most one backend exchange in flight.
fn alone() -> bool {
    CONNECTIONS.with(Cell::get) <= 1 && EXCHANGES.with(Cell::get) <= 1
}

/// The polling window for lanes pinned (`pinned`) or not, from
/// `WEIR_BUSY_POLL`; `None` is off. A setting that cannot be read is
/// reported and read as `auto`.
pub(crate) fn planned(pinned: bool) -> Option<Duration> {
    let setting = std::env::var(ENV).ok();
    window(setting.as_deref(), pinned).unwrap_or_else(|bad| {
        tracing::warn!(
            "{ENV}={bad:?} is not \"auto\", \"off\" or 1..={MAX_WINDOW_US} microseconds; using \"auto\""
        );
        window(None, pinned).unwrap_or_default()
    })
}

/// The polling window a setting asks for: `auto` (or none) polls for
/// [`DEFAULT_WINDOW`] when the lanes are pinned, `off` or `0` never, and a
/// number of microseconds up to [`MAX_WINDOW_US`] for that long. Anything
/// else is returned as the error, for the caller to report.
fn window(setting: Option<&str>, pinned: bool) -> Result<Option<Duration>, &str> {
    match setting.map(str::trim) {
        None | Some("") | Some("auto") => Ok(pinned.then_some(DEFAULT_WINDOW)),
        Some("off") | Some("0") => Ok(None),
        Some(us) => match us.parse::<u64>() {
            Ok(us) if us <= MAX_WINDOW_US => Ok(Some(Duration::from_micros(us))),
            _ => Err(setting.unwrap_or_default()),
        },
    }
}

/// The lane's poller, run beside its tasks for the lane's whole life: waits
/// for a head, then yields to the runtime (which, with nothing else to run,
/// checks its sockets with a zero timeout instead of blocking) until the
/// window passes without a head or the lane is preempted.
pub(crate) async fn run(window: Duration) {
    let mut rule = Rule::new(window);
    loop {
        if let Some(until) = rule.quiet_until() {
            tokio::time::sleep_until(until).await;
        }
        // Whether the waker is registered, so that its absence means
        // `head_read` took it: a head was read.
        let mut armed = false;
        std::future::poll_fn(|cx| match IDLE.with(Cell::take) {
            None if armed => Poll::Ready(()),
            _ => {
                IDLE.with(|idle| idle.set(Some(cx.waker().clone())));
                armed = true;
                Poll::Pending
            }
        })
        .await;
        rule.start(Instant::now(), HEADS.with(Cell::get), preemptions());
        loop {
            tokio::task::yield_now().await;
            #[cfg(test)]
            POLLS.with(|p| p.set(p.get() + 1));
            let idle = || {
                // Offer the CPU to anything else runnable on it: if the
                // kernel takes the offer, that counts as a preemption and
                // polling backs off (unless the lane serves one client
                // alone); if not, this is a cheap system call.
                std::thread::yield_now();
                (preemptions(), alone())
            };
            if !rule.keep_polling(Instant::now(), HEADS.with(Cell::get), idle) {
                break;
            }
        }
    }
}

/// Polls made by the calling thread's poller so far.
#[cfg(test)]
pub(crate) fn polls() -> u64 {
    POLLS.with(Cell::get)
}

/// When to keep polling, apart from the clock and the kernel so that a test
/// can drive it.
#[derive(Debug)]
struct Rule {
    window: Duration,
    /// Heads read when last looked at, and when that count last moved.
    heads: u64,
    since: Instant,
    /// The thread's involuntary context switches when polling started.
    preemptions: i64,
    /// Polling is off until then, after a preemption.
    quiet_until: Option<Instant>,
    /// The last quiet period; zero once polling has ended by its window.
    backoff: Duration,
}

impl Rule {
    fn new(window: Duration) -> Self {
        Self {
            window,
            heads: 0,
            since: Instant::now(),
            preemptions: 0,
            quiet_until: None,
            backoff: Duration::ZERO,
        }
    }

    /// The end of the quiet period, if one is running; clears it.
    fn quiet_until(&mut self) -> Option<Instant> {
        self.quiet_until.take()
    }

    /// A head was read: polling starts now.
    fn start(&mut self, now: Instant, heads: u64, preemptions: i64) {
        self.heads = heads;
        self.since = now;
        self.preemptions = preemptions;
    }

    /// After one more poll: `false` stops polling, because the window has
    /// passed since the last head, or because the lane was preempted. Then
    /// polling stays off for [`BACKOFF`], doubled for each preemption
    /// since polling last ended by its window, up to [`MAX_BACKOFF`].
    ///
    /// A poll that saw a new head is the lane at work, not polling, and
    /// goes on without `idle`'s system calls; that keeps a saturated lane
    /// as cheap as one that does not poll. Only a poll that found nothing
    /// calls `idle`, which offers the CPU away and returns the thread's
    /// preemption count and whether the lane serves one client alone.
    ///
    /// A lane serving one client alone is not stopped by a preemption:
    /// the thread that ran is that client or its backend, placed on the
    /// lane's CPU by the kernel when the lane woke it. It has had the CPU
    /// (the lane offered it), and polling goes on; backing off would put
    /// the lane to sleep between the client and the backend, and each
    /// request would pay an idle CPU's wake-up twice (docs/BENCHMARKS.md,
    /// session 26). With more to serve, the lane's CPU is wanted for work
    /// and polling backs off as above.
    fn keep_polling(
        &mut self,
        now: Instant,
        heads: u64,
        idle: impl FnOnce() -> (i64, bool),
    ) -> bool {
        if heads != self.heads {
            self.heads = heads;
            self.since = now;
            return true;
        }
        let (preemptions, alone) = idle();
        if preemptions != self.preemptions {
            if !alone {
                self.backoff = (self.backoff * 2).clamp(BACKOFF, MAX_BACKOFF);
                self.quiet_until = Some(now + self.backoff);
                return false;
            }
            self.preemptions = preemptions;
        }
        if now.duration_since(self.since) < self.window {
            return true;
        }
        // A gap no other thread wanted the CPU in: the lane is not
        // contended (any more), the next preemption starts from BACKOFF.
        self.backoff = Duration::ZERO;
        false
    }
}

/// The calling thread's involuntary context switches: the kernel ran
/// something else on its CPU while it could have gone on.
#[cfg(target_os = "linux")]
fn preemptions() -> i64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_THREAD).map_or(0, |u| u.involuntary_context_switches())
}

/// Elsewhere preemption is not seen; polling is off there unless asked for.
#[cfg(not(target_os = "linux"))]
fn preemptions() -> i64 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_reads_auto_off_or_microseconds() {
        assert_eq!(window(None, true), Ok(Some(DEFAULT_WINDOW)));
        assert_eq!(window(Some(" auto "), true), Ok(Some(DEFAULT_WINDOW)));
        // Not pinned: lanes may share CPUs under a quota; off unless asked.
        assert_eq!(window(None, false), Ok(None));
        assert_eq!(window(Some("off"), true), Ok(None));
        assert_eq!(window(Some("0"), true), Ok(None));
        assert_eq!(
            window(Some("200"), false),
            Ok(Some(Duration::from_micros(200)))
        );
        assert_eq!(window(Some("1001"), true), Err("1001"));
        assert_eq!(window(Some("-5"), true), Err("-5"));
        assert_eq!(window(Some("yes"), true), Err("yes"));
    }

    #[test]
    fn polling_lasts_a_window_past_the_last_head() {
        let t0 = Instant::now();
        let us = |n| t0 + Duration::from_micros(n);
        let mut rule = Rule::new(Duration::from_micros(50));
        rule.start(t0, 7, 3);
        assert!(rule.keep_polling(us(10), 7, || (3, false)));
        assert!(rule.keep_polling(us(49), 7, || (3, false)));
        // A head read at 49 µs moves the window on.
        assert!(rule.keep_polling(us(49), 8, || (3, false)));
        assert!(rule.keep_polling(us(98), 8, || (3, false)));
        assert!(!rule.keep_polling(us(99), 8, || (3, false)));
        assert_eq!(rule.quiet_until(), None);
    }

    #[test]
    fn a_preempted_poller_stops_and_stays_off() {
        let t0 = Instant::now();
        let mut rule = Rule::new(Duration::from_micros(50));
        rule.start(t0, 0, 3);
        // A poll that saw a head is work, not polling: no system calls.
        let unasked = || -> (i64, bool) { panic!("a busy lane was asked to yield") };
        assert!(rule.keep_polling(t0 + Duration::from_micros(5), 1, unasked));
        assert!(rule.keep_polling(t0 + Duration::from_micros(5), 1, || (3, false)));
        // Something else wanted the CPU: stop at once, even mid-window.
        let t1 = t0 + Duration::from_micros(6);
        assert!(!rule.keep_polling(t1, 1, || (4, false)));
        assert_eq!(rule.quiet_until(), Some(t1 + BACKOFF));
        assert_eq!(rule.quiet_until(), None);
    }

    #[test]
    fn a_lane_serving_one_client_alone_polls_on_through_a_preemption() {
        let t0 = Instant::now();
        let us = |n| t0 + Duration::from_micros(n);
        let mut rule = Rule::new(Duration::from_micros(50));
        rule.start(t0, 0, 3);
        // The client or its backend ran on the lane's CPU: polling goes on,
        // with no quiet period, and counts preemptions from there.
        assert!(rule.keep_polling(us(10), 0, || (4, true)));
        assert!(rule.keep_polling(us(20), 0, || (4, false)));
        assert!(rule.keep_polling(us(30), 0, || (6, true)));
        assert_eq!(rule.quiet_until(), None);
        // The window still ends it.
        assert!(!rule.keep_polling(us(50), 0, || (6, true)));
        assert_eq!(rule.quiet_until(), None);
        // More to serve: a preemption stops polling as before.
        rule.start(us(60), 0, 6);
        assert!(!rule.keep_polling(us(61), 0, || (7, false)));
        assert_eq!(rule.quiet_until(), Some(us(61) + BACKOFF));
    }

    #[test]
    fn serving_counts_connections_and_exchanges_while_alive() {
        assert!(alone());
        let first = Serving::connection();
        let exchange = Serving::exchange();
        assert!(alone(), "one client, one exchange");
        let second = Serving::exchange();
        assert!(!alone(), "two exchanges in flight (HTTP/2)");
        drop(second);
        let other = Serving::connection();
        assert!(!alone(), "two client connections");
        drop((first, other, exchange));
        assert!(alone());
        assert_eq!(CONNECTIONS.with(Cell::get), 0);
        assert_eq!(EXCHANGES.with(Cell::get), 0);
    }

    #[test]
    fn preempted_again_and_again_the_poller_backs_off_longer() {
        let t0 = Instant::now();
        let mut rule = Rule::new(Duration::from_micros(50));
        let mut quiet = Vec::new();
        for n in 0..8 {
            rule.start(t0, 0, n);
            assert!(!rule.keep_polling(t0, 0, || (n + 1, false)));
            quiet.push(rule.quiet_until().map(|t| t.duration_since(t0)));
        }
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(
            quiet,
            [ms(1), ms(2), ms(4), ms(8), ms(16), ms(32), ms(32), ms(32)]
        );
        // Polling that ends by its window, no one else wanting the CPU,
        // starts the next backoff from the bottom again.
        rule.start(t0, 0, 8);
        assert!(!rule.keep_polling(t0 + Duration::from_micros(50), 0, || (8, false)));
        assert_eq!(rule.quiet_until(), None);
        rule.start(t0, 0, 8);
        assert!(!rule.keep_polling(t0, 0, || (9, false)));
        assert_eq!(rule.quiet_until(), Some(t0 + BACKOFF));
    }
}
