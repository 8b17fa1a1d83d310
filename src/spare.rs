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

/// A buffer kept here.
pub(crate) trait Buffer {
    /// Whether the buffer holds memory, no more than `max` bytes of it.
    fn fits(&mut self, max: usize) -> bool;
}

impl Buffer for Vec<u8> {
    fn fits(&mut self, max: usize) -> bool {
        (1..=max).contains(&self.capacity())
    }
}

impl Buffer for BytesMut {
    /// `capacity()` is only the view's free tail: a head split off the
    /// front of a buffer grown for it leaves a small view on a large block.
    /// `try_reclaim` finds the block's size without allocating: it
    /// succeeds only where the block, no longer shared, has room for more
    /// than `max` (and the buffer is dropped anyway). A block still shared
    /// with a frame being sent is judged by its view.
    fn fits(&mut self, max: usize) -> bool {
        (1..=max).contains(&self.capacity()) && !self.try_reclaim(max.saturating_add(1))
    }
}

/// Keeps an emptied buffer for [`take`] if it holds memory, no more than
/// `max_capacity` bytes of it (one grown for a large head or body is not
/// worth keeping), and this thread holds fewer than `max` of its kind;
/// else it is freed.
pub(crate) fn keep<T: Buffer>(
    kind: &'static LocalKey<Spares<T>>,
    mut buf: T,
    max: usize,
    max_capacity: usize,
) {
    if !buf.fits(max_capacity) {
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

    thread_local! {
        static READS: Spares<BytesMut> = const { RefCell::new(Vec::new()) };
    }

    #[test]
    fn a_small_view_on_a_large_block_is_not_kept() {
        // A 40 KiB head read into a 64 KiB block and split off: the view
        // left is 24 KiB, the memory behind it 64.
        let mut buf = BytesMut::with_capacity(64 * 1024);
        buf.resize(40 * 1024, b'h');
        let head = buf.split_to(40 * 1024).freeze();
        assert!(buf.capacity() <= 32 * 1024);
        drop(head);
        keep(&READS, buf, 4, 32 * 1024);
        assert_eq!(
            READS.with_borrow(Vec::len),
            0,
            "64 KiB kept under a 32 KiB cap"
        );
        // Within the cap, split or not, it is kept.
        let mut small = BytesMut::with_capacity(16 * 1024);
        small.resize(1024, b'h');
        drop(small.split_to(1024));
        keep(&READS, small, 4, 32 * 1024);
        keep(&READS, BytesMut::with_capacity(8 * 1024), 4, 32 * 1024);
        assert_eq!(READS.with_borrow(Vec::len), 2);
    }
}
