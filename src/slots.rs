//! Waiting for a saturated backend's slot, first come, first served.
//!
//! A backend at its `max_concurrent` is skipped; when every backend of a
//! model is, a first attempt waits for one to free a slot (SPEC
//! "Admission": waiting requests are served first come, first served). A
//! request may take any of several backends, and a backend may serve
//! several models, so no one semaphore holds the line. Instead each
//! waiting request has a ticket in one queue per process, with the
//! backends it would take; a free slot is taken only by the oldest waiter
//! that wants that backend, and a freed slot wakes that waiter alone (not
//! every waiter, to race for it, as a broadcast would). The queue is
//! touched only while some request waits: a request that finds a free
//! backend and nobody waiting takes no lock.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use tokio::sync::Notify;

/// A backend as the queue knows it: the address of its live state, which
/// survives reloads (a backend carried over keeps it) and is unique while
/// any request that names it holds its snapshot.
pub(crate) type BackendId = usize;

/// Lets requests wait for "some backend freed a slot" without polling, in
/// arrival order.
#[derive(Debug, Default)]
pub(crate) struct SlotSignal {
    /// Woken (all waiters) when a new snapshot is published: it may have a
    /// backend back, or out (which a waiter must stop wanting).
    pub notify: Notify,
    /// Requests waiting right now; releases skip the queue when zero.
    pub waiters: AtomicUsize,
    /// The waiting requests and, per backend, who waits for it.
    queue: Mutex<Queue>,
}

/// Every operation is O(log n) in the waiters (a broadcast wake makes
/// each of them look again, so a scan per look would be quadratic).
#[derive(Debug, Default)]
struct Queue {
    /// The next ticket: tickets only grow, so ticket order is arrival order.
    next: u64,
    /// Each waiter by its ticket.
    waiting: BTreeMap<u64, Waiter>,
    /// Per backend, the tickets of the waiters that want it; the first is
    /// the one in line for its next free slot.
    lines: HashMap<BackendId, BTreeSet<u64>, foldhash::fast::RandomState>,
}

#[derive(Debug)]
struct Waiter {
    /// The backends it would take a slot of, as of its last look.
    wants: Vec<BackendId>,
    /// Woken when a slot it is first in line for frees.
    wake: Arc<Notify>,
}

impl Queue {
    /// The first in line for `backend`, if anyone waits for it.
    fn first(&self, backend: BackendId) -> Option<u64> {
        self.lines.get(&backend)?.first().copied()
    }

    /// Wakes the first in line for `backend`, if any.
    fn wake_first(&self, backend: BackendId) {
        if let Some(w) = self.first(backend).and_then(|t| self.waiting.get(&t)) {
            w.wake.notify_one();
        }
    }

    /// Takes `ticket` out of `backend`'s line; if it was first, the next
    /// in line may take that backend now, and is woken.
    fn leave_line(&mut self, backend: BackendId, ticket: u64) {
        let Some(line) = self.lines.get_mut(&backend) else {
            return;
        };
        let was_first = line.first() == Some(&ticket);
        line.remove(&ticket);
        if line.is_empty() {
            self.lines.remove(&backend);
        } else if was_first {
            self.wake_first(backend);
        }
    }
}

impl SlotSignal {
    /// Wakes every waiting request, if any, to look again: a new snapshot
    /// was published. SeqCst, paired with the waiter count's increment:
    /// either this load sees a waiter that counted itself, or that
    /// waiter's next look sees what changed before the call.
    pub(crate) fn announce(&self) {
        if self.anyone_waiting() {
            self.notify.notify_waiters();
        }
    }

    /// A slot of `backend` was given back: the first waiter in line for it
    /// may take it. SeqCst, paired with [`InLine::join`]'s count: either
    /// this load sees that waiter, or the waiter's look (after it said what
    /// it wants) sees the slot free.
    pub(crate) fn released(&self, backend: BackendId) {
        if self.anyone_waiting() {
            self.lock().wake_first(backend);
        }
    }

    /// Whether some request is waiting for a slot: a newcomer then lines
    /// up behind it instead of taking a free slot first. SeqCst (see
    /// [`SlotSignal::released`]).
    pub(crate) fn anyone_waiting(&self) -> bool {
        self.waiters.load(Ordering::SeqCst) > 0
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding it (no allocation failure aside),
        // so a poisoned lock is taken as it is.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request's place in the line for a slot; leaving it (dropping) hands
/// the backends it was first in line for to the next in line.
#[derive(Debug)]
pub(crate) struct InLine<'a> {
    signal: &'a SlotSignal,
    ticket: u64,
    wake: Arc<Notify>,
}

impl<'a> InLine<'a> {
    /// Takes the next ticket, wanting nothing yet ([`InLine::want`] says
    /// what, before each look).
    pub(crate) fn join(signal: &'a SlotSignal) -> Self {
        // SeqCst, paired with `released`: counted before the first look.
        signal.waiters.fetch_add(1, Ordering::SeqCst);
        let wake = Arc::new(Notify::new());
        let mut queue = signal.lock();
        let ticket = queue.next;
        queue.next += 1;
        queue.waiting.insert(
            ticket,
            Waiter {
                wants: Vec::new(),
                wake: wake.clone(),
            },
        );
        Self {
            signal,
            ticket,
            wake,
        }
    }

    /// Stands in line for `wants` (replacing what it wanted before) and
    /// returns those it is first in line for: the ones it may take now if
    /// they have a free slot. Backends it stopped wanting go to the next
    /// in line.
    pub(crate) fn want(&self, wants: Vec<BackendId>) -> Vec<BackendId> {
        let mut queue = self.signal.lock();
        let queue = &mut *queue;
        let Some(me) = queue.waiting.get_mut(&self.ticket) else {
            return Vec::new();
        };
        let old = std::mem::replace(&mut me.wants, wants.clone());
        for &backend in &wants {
            if !old.contains(&backend) {
                queue.lines.entry(backend).or_default().insert(self.ticket);
            }
        }
        for backend in old {
            if !wants.contains(&backend) {
                queue.leave_line(backend, self.ticket);
            }
        }
        wants
            .into_iter()
            .filter(|&b| queue.first(b) == Some(self.ticket))
            .collect()
    }

    /// Resolves when a slot this request is first in line for may have
    /// freed (or one it was behind another for: that one left).
    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        let mut queue = self.signal.lock();
        if let Some(me) = queue.waiting.remove(&self.ticket) {
            for backend in me.wants {
                queue.leave_line(backend, self.ticket);
            }
        }
        drop(queue);
        self.signal.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn wakes(place: &InLine<'_>) -> bool {
        tokio::time::timeout(Duration::from_millis(10), place.woken())
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_in_line_for_a_backend_is_the_one_woken() {
        let signal = SlotSignal::default();
        let first = InLine::join(&signal);
        let second = InLine::join(&signal);
        let other = InLine::join(&signal);
        assert_eq!(first.want(vec![1, 2]), vec![1, 2]);
        assert_eq!(second.want(vec![1]), Vec::<BackendId>::new());
        // Behind `first` for 1, first in line for 3.
        assert_eq!(other.want(vec![1, 3]), vec![3]);
        assert!(signal.anyone_waiting());

        signal.released(1);
        assert!(wakes(&first).await);
        assert!(!wakes(&second).await && !wakes(&other).await);
        signal.released(3);
        assert!(wakes(&other).await);
        assert!(!wakes(&second).await);

        // `first` leaves: `second` is first in line for 1 now.
        drop(first);
        assert!(wakes(&second).await);
        assert!(!wakes(&other).await, "behind `second` for 1");
        assert_eq!(second.want(vec![1]), vec![1]);
        assert_eq!(other.want(vec![1, 3]), vec![3]);

        // `second` stops wanting 1: `other` is next for it.
        assert_eq!(second.want(vec![2]), vec![2]);
        assert!(wakes(&other).await);
        assert_eq!(other.want(vec![1, 3]), vec![1, 3]);
        drop(second);
        drop(other);
        assert!(!signal.anyone_waiting());
        signal.released(1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_newcomer_is_behind_everyone_who_wants_the_same_backend() {
        let signal = SlotSignal::default();
        let waiting = InLine::join(&signal);
        waiting.want(vec![7]);
        let newcomer = InLine::join(&signal);
        assert!(newcomer.want(vec![7, 8]) == vec![8]);
        // Nobody before the waiter: leaving wakes nobody ahead of it.
        drop(newcomer);
        assert!(!wakes(&waiting).await);
    }
}
