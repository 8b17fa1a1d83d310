//! Per-thread spare buffers. A buffer above glibc's per-thread cache size
//! (a read buffer, a response head) costs more to allocate afresh than all
//! of a request's other allocations together, and holding one per
//! connection costs memory for every connection that is only waiting. So
//! connections give their emptied buffers back here while they wait, and
//! take one when there is something to read or write: a lane keeps a few
//! of each kind, for whichever of its connections needs one next.

use std::{cell::RefCell, thread::LocalKey};

use bytes::BytesMut;

/// One kind of spare buffer, declared with `thread_local!` where it is used.
pub(crate) type Spares<T> = RefCell<Vec<T>>;

/// This thread's last spare of a kind, or a new (unallocated) one.
pub(crate) fn take<T: Default>(kind: &'static LocalKey<Spares<T>>) -> T {
    kind.with_borrow_mut(Vec::pop).unwrap_or_default()
}

/// A buffer kept here: how much memory it holds.
pub(crate) trait Buffer {
    fn capacity(&self) -> usize;
}

impl Buffer for Vec<u8> {
    fn capacity(&self) -> usize {
        Vec::capacity(self)
    }
}

impl Buffer for BytesMut {
    fn capacity(&self) -> usize {
        BytesMut::capacity(self)
    }
}

/// Keeps an emptied buffer for [`take`] if it holds memory, no more than
/// `max_capacity` bytes of it (one grown for a large body is not worth
/// keeping), and this thread holds fewer than `max` of its kind; else it
/// is freed.
pub(crate) fn keep<T: Buffer>(
    kind: &'static LocalKey<Spares<T>>,
    buf: T,
    max: usize,
    max_capacity: usize,
) {
    if buf.capacity() == 0 || buf.capacity() > max_capacity {
        return;
    }
    kind.with_borrow_mut(|spares| {
        if spares.len() < max {
            spares.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static TEST: Spares<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    #[test]
    fn spares_are_taken_last_kept_first_and_bounded() {
        assert_eq!(take(&TEST).capacity(), 0, "none kept yet: a new one");
        keep(&TEST, Vec::new(), 2, 100);
        keep(&TEST, Vec::with_capacity(200), 2, 100);
        assert_eq!(TEST.with_borrow(Vec::len), 0, "no memory, or too much");
        keep(&TEST, Vec::with_capacity(10), 2, 100);
        keep(&TEST, Vec::with_capacity(20), 2, 100);
        keep(&TEST, Vec::with_capacity(30), 2, 100);
        assert_eq!(TEST.with_borrow(Vec::len), 2, "the third is freed");
        assert_eq!(take(&TEST).capacity(), 20);
        assert_eq!(take(&TEST).capacity(), 10);
        assert_eq!(take(&TEST).capacity(), 0);
    }
}
