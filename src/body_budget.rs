//! The memory every buffered request body may hold at once
//! (`server.max_buffered_body_bytes`).
//!
//! weir reads a request's whole body before it routes it (the `model` is in
//! it) and keeps it until a backend has answered, for retries. Per request
//! `max_body_bytes` bounds that; across requests only this budget does.
//! Without it 10,000 connections, or one HTTP/2 connection with its 200
//! streams, could each hold `max_body_bytes` (10 MiB by default) at once.
//!
//! A body with a declared length reserves all its room before a byte of it
//! is read, so two half-read bodies never wait on each other for the rest.
//! A chunked HTTP/1.1 one, once it outgrows what it may hold uncounted,
//! waits (before it holds any room) for room for `max_body_bytes`, and gives back
//! the excess once read whole; a chunked HTTP/2 one takes room 64 KiB at a
//! time, never waiting. An HTTP/1.1 body that finds no
//! room waits, first come first served, while its bytes wait in the
//! client's socket; the request's deadline ends the wait. An HTTP/2 one
//! is refused at once instead (see `proxy::read_body`: an unread stream
//! would hold its connection's flow-control window). HTTP/1.1 bodies up to
//! [`UNCOUNTED`] are not counted: a connection reads one request at a
//! time, so `max_connections` bounds them, and the usual small request
//! takes no lock here.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// HTTP/1.1 body bytes each request holds without reserving them.
pub const UNCOUNTED: usize = 64 * 1024;

/// The budget counts KiB, so a 4 TiB budget still fits a `u32` reservation.
const UNIT: usize = 1024;

/// A chunked HTTP/2 body reserves, and a chunked body gives back what it
/// did not need, in steps of this.
const STEP: usize = 64 * 1024;

/// The room all buffered request bodies share; one per process, kept across
/// reloads (the setting needs a restart).
#[derive(Debug)]
pub struct BodyBudget {
    room: Arc<Semaphore>,
    /// The whole budget in units: no reservation asks for more.
    units: u32,
}

/// Room one body holds in the [`BodyBudget`], given back when dropped.
#[derive(Debug, Default)]
pub struct Room {
    held: Option<OwnedSemaphorePermit>,
    /// Bytes covered, beyond what the body may hold uncounted.
    bytes: usize,
    /// Set while the body waits for room, so a deadline that passes then
    /// is told apart from one that passes waiting for the client.
    pub waiting: bool,
}

impl BodyBudget {
    /// A budget of `bytes` (at least one unit).
    pub fn new(bytes: usize) -> Self {
        let units = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX));
        BodyBudget {
            room: Arc::new(Semaphore::new(units as usize)),
            units,
        }
    }

    /// Bytes held now by every body (`weir_buffered_body_bytes`).
    pub fn held(&self) -> usize {
        (self.units as usize)
            .saturating_sub(self.room.available_permits())
            .saturating_mul(UNIT)
    }

    /// Bytes free now.
    #[cfg(test)]
    fn available(&self) -> usize {
        self.room.available_permits().saturating_mul(UNIT)
    }

    /// Makes `room` cover a body of `len` bytes of which `uncounted` need no
    /// room, waiting for the difference. A body larger than the whole budget
    /// takes the whole budget (it waits until every other body is gone),
    /// so the wait always ends.
    pub async fn reserve(&self, room: &mut Room, len: usize, uncounted: usize) {
        let Some((want, more)) = self.missing(room, len, uncounted) else {
            return;
        };
        if more > 0 {
            room.waiting = true;
            // The semaphore is never closed: an error cannot happen, and
            // would only mean the body goes uncounted.
            if let Ok(permit) = self.room.clone().acquire_many_owned(more).await {
                room.take(permit);
            }
            room.waiting = false;
        }
        room.bytes = want;
    }

    /// [`reserve`](Self::reserve) without waiting: `false`, and `room`
    /// unchanged, when the budget cannot cover it now.
    pub fn try_reserve(&self, room: &mut Room, len: usize, uncounted: usize) -> bool {
        let Some((want, more)) = self.missing(room, len, uncounted) else {
            return true;
        };
        if more > 0 {
            match self.room.clone().try_acquire_many_owned(more) {
                Ok(permit) => room.take(permit),
                Err(_) => return false,
            }
        }
        room.bytes = want;
        true
    }

    /// The bytes `room` must cover for a body of `len`, and the units it
    /// still lacks; `None` when it covers them already.
    fn missing(&self, room: &Room, len: usize, uncounted: usize) -> Option<(usize, u32)> {
        let want = len.saturating_sub(uncounted);
        if want <= room.bytes {
            return None;
        }
        let held_units = room.held.as_ref().map_or(0, |p| p.num_permits());
        let want_units = u32::try_from(want.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .min(self.units);
        let more = want_units.saturating_sub(u32::try_from(held_units).unwrap_or(u32::MAX));
        Some((want, more))
    }

    /// [`reserve`](Self::reserve) for a body whose length is not declared:
    /// `len` read so far, of at most `limit`. Once it outgrows `uncounted`
    /// it waits once, before it holds any room, for room for `limit`: a body that
    /// held some room while it waited for more could wait on another that
    /// does the same, each until its deadline. [`fit`](Self::fit) gives
    /// back what the whole body did not need.
    pub async fn reserve_read(&self, room: &mut Room, len: usize, limit: usize, uncounted: usize) {
        if len.saturating_sub(uncounted) > room.bytes {
            self.reserve(room, limit.max(len), uncounted).await;
        }
    }

    /// Gives back the room beyond a body of `len` bytes (rounded up to a
    /// [`STEP`]), once the whole of it has been read.
    pub fn fit(&self, room: &mut Room, len: usize, uncounted: usize) {
        let want = step_ahead(len).saturating_sub(uncounted);
        if want >= room.bytes {
            return;
        }
        if let Some(held) = &mut room.held {
            let keep = want.div_ceil(UNIT);
            let extra = held.num_permits().saturating_sub(keep);
            drop(held.split(extra));
            if held.num_permits() == 0 {
                room.held = None;
            }
        }
        room.bytes = want;
    }

    /// [`reserve_read`](Self::reserve_read) without waiting, as
    /// [`try_reserve`](Self::try_reserve), and a [`STEP`] at a time: a body
    /// that does not wait cannot wait on another.
    pub fn try_reserve_read(&self, room: &mut Room, len: usize, uncounted: usize) -> bool {
        len.saturating_sub(uncounted) <= room.bytes
            || self.try_reserve(room, step_ahead(len), uncounted)
    }
}

/// `len` rounded up to the next [`STEP`].
fn step_ahead(len: usize) -> usize {
    len.div_ceil(STEP).saturating_mul(STEP).max(len)
}

impl Room {
    /// Adds `permit` to what the room holds.
    fn take(&mut self, permit: OwnedSemaphorePermit) {
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_body_waits_until_another_gives_its_room_back() {
        let budget = Arc::new(BodyBudget::new(100 * UNIT));
        let mut first = Room::default();
        budget.reserve(&mut first, 80 * UNIT, 0).await;
        assert_eq!(budget.available(), 20 * UNIT);
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let mut second = Room::default();
                budget.reserve(&mut second, 30 * UNIT, 0).await;
                second
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "30 KiB does not fit in 20");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("room came back")
            .expect("no panic");
        assert_eq!(budget.available(), 70 * UNIT);
        drop(second);
        assert_eq!(budget.available(), 100 * UNIT);
    }

    #[tokio::test]
    async fn uncounted_bytes_and_room_already_held_are_not_reserved_again() {
        let budget = BodyBudget::new(100 * UNIT);
        let mut room = Room::default();
        budget.reserve(&mut room, 64 * UNIT, 64 * UNIT).await;
        assert_eq!(budget.available(), 100 * UNIT);
        budget.reserve(&mut room, 74 * UNIT, 64 * UNIT).await;
        assert_eq!(budget.available(), 90 * UNIT);
        budget.reserve(&mut room, 70 * UNIT, 64 * UNIT).await;
        assert_eq!(budget.available(), 90 * UNIT, "never given back early");
        budget.reserve(&mut room, 84 * UNIT, 64 * UNIT).await;
        assert_eq!(budget.available(), 80 * UNIT, "only the difference");
        drop(room);
        assert_eq!(budget.available(), 100 * UNIT);
    }

    #[tokio::test]
    async fn a_body_larger_than_the_budget_takes_all_of_it() {
        let budget = BodyBudget::new(10 * UNIT);
        let mut room = Room::default();
        tokio::time::timeout(
            Duration::from_secs(5),
            budget.reserve(&mut room, 50 * UNIT, 0),
        )
        .await
        .expect("does not wait for room that can never exist");
        assert_eq!(budget.available(), 0);
    }

    #[tokio::test]
    async fn a_body_that_may_not_wait_takes_no_room_when_there_is_not_enough() {
        let budget = BodyBudget::new(100 * UNIT);
        let mut first = Room::default();
        assert!(budget.try_reserve(&mut first, 80 * UNIT, 0));
        let mut second = Room::default();
        assert!(!budget.try_reserve(&mut second, 30 * UNIT, 0));
        assert_eq!(budget.available(), 20 * UNIT, "nothing taken");
        assert!(budget.try_reserve(&mut second, 20 * UNIT, 0));
        assert!(!budget.try_reserve_read(&mut second, 20 * UNIT + 1, 0));
        assert_eq!(budget.available(), 0);
        drop(first);
        assert!(budget.try_reserve_read(&mut second, 20 * UNIT + 1, 0));
        assert_eq!(budget.available(), 100 * UNIT - STEP);
    }

    #[tokio::test]
    async fn an_undeclared_body_reserves_its_limit_then_fits() {
        let budget = BodyBudget::new(1024 * UNIT);
        let mut room = Room::default();
        budget.reserve_read(&mut room, 1, 512 * UNIT, 0).await;
        assert_eq!(budget.available(), 512 * UNIT);
        budget
            .reserve_read(&mut room, STEP + 1, 512 * UNIT, 0)
            .await;
        assert_eq!(budget.available(), 512 * UNIT, "still covered");
        budget.fit(&mut room, STEP + 1, 0);
        assert_eq!(budget.available(), 1024 * UNIT - 2 * STEP);
        drop(room);
        assert_eq!(budget.available(), 1024 * UNIT);
        let mut small = Room::default();
        budget
            .reserve_read(&mut small, STEP, 512 * UNIT, STEP)
            .await;
        budget.fit(&mut small, STEP, STEP);
        assert_eq!(budget.available(), 1024 * UNIT, "within the uncounted part");
    }

    /// Two undeclared bodies never each hold part of the budget while
    /// waiting for more: the second waits for all of its room before it
    /// holds any, and the first, holding all of its own, never waits.
    #[tokio::test]
    async fn undeclared_bodies_do_not_wait_on_each_other() {
        let budget = Arc::new(BodyBudget::new(300 * UNIT));
        let mut first = Room::default();
        budget
            .reserve_read(&mut first, 130 * UNIT, 250 * UNIT, 64 * UNIT)
            .await;
        let second = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let mut room = Room::default();
                budget
                    .reserve_read(&mut room, 130 * UNIT, 250 * UNIT, 64 * UNIT)
                    .await;
                room
            })
        };
        tokio::task::yield_now().await;
        assert!(!second.is_finished());
        tokio::time::timeout(
            Duration::from_secs(5),
            budget.reserve_read(&mut first, 250 * UNIT, 250 * UNIT, 64 * UNIT),
        )
        .await
        .expect("the first grows to its end without waiting");
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("room came back")
            .expect("no panic");
    }
}
