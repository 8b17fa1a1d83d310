//! Per-lane metrics: counters, gauges and histograms that every proxied
//! request updates, kept as one slot per lane and summed when scraped.
//!
//! Both lanes serve requests at once ([`crate::lanes`]). A metric both
//! write (prometheus-client's `Counter`, or its `Histogram`, whose every
//! `observe` takes a mutex) moves its cache line from one CPU to the other
//! on nearly every request. Here each lane adds into a slot of its own, on
//! cache lines no other lane writes, and `/metrics` adds the slots up: the
//! sum is the same number, with no line shared on the request path. So
//! Linux keeps per-CPU counters (`percpu_counter`, summed when read) and
//! Envoy its histograms (one per worker thread, merged when flushed).
//!
//! Slot 0 belongs to every thread that is not a lane (the main runtime,
//! tests), so several threads may write it: every update is still an
//! atomic read-modify-write, correct for any number of writers; on a
//! lane's slot it is merely never contended. The types encode themselves
//! exactly as prometheus-client's `Counter`, `Gauge` and `Histogram` do
//! (same encoder calls), so `/metrics` text is unchanged.

use std::sync::{
    atomic::{AtomicI64, AtomicU64, Ordering},
    Arc,
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric},
};

use crate::lanes::{self, Padded};

/// The most lane slots a metric has. Each slot costs 128 bytes per
/// counter (256 per histogram) per labelled series, so on a host with many
/// CPUs lanes share slots in turn (lane 17 writes lane 1's slot), which
/// keeps a series under 2.2 KB (4.4 KB for a histogram) while contention
/// stays split 16 ways.
const MAX_LANE_SLOTS: usize = 16;

/// A slot for slot 0 (threads outside the lanes) and one per lane, up to
/// [`MAX_LANE_SLOTS`].
fn slots<T: Default>() -> Arc<[Padded<T>]> {
    (0..=lanes::count().min(MAX_LANE_SLOTS))
        .map(|_| Padded::default())
        .collect()
}

/// The calling thread's slot: 0 off the lanes, else its lane's (shared
/// with other lanes past [`MAX_LANE_SLOTS`]). Every update is atomic, so
/// a slot written by several threads still counts right.
#[inline]
fn mine<T>(slots: &[Padded<T>]) -> Option<&T> {
    let lane = lanes::current();
    let slot = match (lane, slots.len()) {
        (0, _) | (_, 0 | 1) => 0,
        (lane, n) => (lane - 1) % (n - 1) + 1,
    };
    slots.get(slot).map(|p| &p.0)
}

/// A counter (`prometheus_client`'s `Counter<u64>`) kept per lane.
#[derive(Debug, Clone)]
pub struct LaneCounter(Arc<[Padded<AtomicU64>]>);

impl Default for LaneCounter {
    fn default() -> Self {
        Self(slots())
    }
}

impl LaneCounter {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.inc_by(1);
    }

    /// Adds `v`.
    #[inline]
    pub fn inc_by(&self, v: u64) {
        if let Some(slot) = mine(&self.0) {
            slot.fetch_add(v, Ordering::Relaxed);
        }
    }

    /// The total over every lane (wrapping, as one `AtomicU64` would).
    pub fn get(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |sum, s| sum.wrapping_add(s.0.load(Ordering::Relaxed)))
    }
}

impl TypedMetric for LaneCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for LaneCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A gauge (`prometheus_client`'s `Gauge<i64>`) moved up and down per
/// lane. A lane's slot may go negative (a request counted in on one thread
/// and out on another); only the sum means anything. No `set`: a value
/// cannot be set by one lane alone.
#[derive(Debug, Clone)]
pub struct LaneGauge(Arc<[Padded<AtomicI64>]>);

impl Default for LaneGauge {
    fn default() -> Self {
        Self(slots())
    }
}

impl LaneGauge {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        if let Some(slot) = mine(&self.0) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes one away.
    #[inline]
    pub fn dec(&self) {
        if let Some(slot) = mine(&self.0) {
            slot.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The sum over every lane.
    pub fn get(&self) -> i64 {
        self.0
            .iter()
            .fold(0i64, |sum, s| sum.wrapping_add(s.0.load(Ordering::Relaxed)))
    }
}

impl TypedMetric for LaneGauge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for LaneGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.get())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A histogram (`prometheus_client`'s classic `Histogram`) with `B` finite
/// bucket bounds, kept per lane without a lock.
#[derive(Debug, Clone)]
pub struct LaneHistogram<const B: usize> {
    /// Ascending, finite upper bounds; `+Inf` is implicit, as there.
    bounds: &'static [f64; B],
    slots: Arc<[Padded<HistogramSlot<B>>]>,
}

/// One lane's observations. `observe` writes the bucket, then the sum,
/// then the count, the last two with `Release`; a scrape reads the count,
/// then the sum (both `Acquire`), then the buckets, so a read whose buckets
/// add up to its count saw exactly those observations in all three
/// ([`HistogramSlot::read_once`]); prometheus-client's mutex gave that.
#[derive(Debug)]
struct HistogramSlot<const B: usize> {
    /// Observations per finite bucket (not cumulative).
    buckets: [AtomicU64; B],
    /// Observations above every bound (and NaN), the `+Inf` bucket's own.
    overflow: AtomicU64,
    /// The sum of the observations, as `f64` bits.
    sum: AtomicU64,
    count: AtomicU64,
}

impl<const B: usize> Default for HistogramSlot<B> {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            overflow: AtomicU64::new(0),
            sum: AtomicU64::new(0.0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }
}

/// How often a scrape reads a slot again when an `observe` ran during the
/// read. A lane's slot has one writer observing once or twice a request,
/// microseconds apart, so this many misses in a row take threads hammering
/// one slot in a loop; the scrape then shows the buckets' own count (so
/// `+Inf` and `_count` still match) and a sum that may be off by the
/// observations in flight, as Java's simpleclient histograms always may.
const READ_TRIES: usize = 64;

/// One read of a [`HistogramSlot`].
#[derive(Debug, Clone, Copy)]
struct SlotRead<const B: usize> {
    sum: f64,
    count: u64,
    buckets: [u64; B],
    overflow: u64,
}

impl<const B: usize> HistogramSlot<B> {
    fn observe(&self, bucket: Option<usize>, v: f64) {
        match bucket.and_then(|i| self.buckets.get(i)) {
            Some(b) => b.fetch_add(1, Ordering::Relaxed),
            None => self.overflow.fetch_add(1, Ordering::Relaxed),
        };
        // A compare-and-swap, not a load and a store: slot 0 has many
        // writers. On a lane's slot it never retries.
        let _ = self
            .sum
            .fetch_update(Ordering::Release, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
        self.count.fetch_add(1, Ordering::Release);
    }

    /// This slot's observations, the same ones in sum, count and buckets
    /// unless [`READ_TRIES`] reads all overlapped an `observe`.
    fn read(&self) -> SlotRead<B> {
        let mut last = self.read_once().0;
        for _ in 1..READ_TRIES {
            let (read, whole) = self.read_once();
            last = read;
            if whole {
                break;
            }
        }
        last
    }

    /// One read, and whether it holds whole observations only.
    ///
    /// The count read first is `c`; every observation it counts wrote its
    /// sum and bucket before, so the sum and buckets read after hold them
    /// all. An observation beyond those that reached the sum wrote its
    /// bucket before its sum, so the buckets then add up to more than `c`.
    /// Buckets adding up to exactly `c` therefore mean the sum holds those
    /// `c` observations and no other.
    fn read_once(&self) -> (SlotRead<B>, bool) {
        let count = self.count.load(Ordering::Acquire);
        let sum = f64::from_bits(self.sum.load(Ordering::Acquire));
        let buckets: [u64; B] = std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        let overflow = self.overflow.load(Ordering::Relaxed);
        let total = buckets.iter().fold(overflow, |t, &n| t.wrapping_add(n));
        // `count: total` either way: when the read is not whole, the
        // `+Inf` bucket and `_count` still agree.
        let read = SlotRead {
            sum,
            count: total,
            buckets,
            overflow,
        };
        (read, total == count)
    }
}

impl<const B: usize> LaneHistogram<B> {
    /// A histogram with these upper bounds (ascending, finite) and `+Inf`.
    pub fn new(bounds: &'static [f64; B]) -> Self {
        debug_assert!(bounds.iter().all(|b| b.is_finite()));
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Self {
            bounds,
            slots: slots(),
        }
    }

    /// Records one observation in the calling lane's slot.
    #[inline]
    pub fn observe(&self, v: f64) {
        // The first bucket whose bound is at least `v`: none for NaN or
        // above every bound (the `+Inf` bucket), as prometheus-client does.
        let bucket = self.bounds.iter().position(|b| *b >= v);
        if let Some(slot) = mine(&self.slots) {
            slot.observe(bucket, v);
        }
    }

    /// The (sum, count, per-bucket counts) over every lane, in the form
    /// prometheus-client's encoder takes: `(bound, count)` with `+Inf`
    /// last, not cumulative (the encoder adds them up).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut sum = 0.0;
        let mut count = 0u64;
        let mut buckets = [0u64; B];
        let mut overflow = 0u64;
        for slot in self.slots.iter() {
            let read = slot.0.read();
            sum += read.sum;
            count = count.wrapping_add(read.count);
            for (total, n) in buckets.iter_mut().zip(read.buckets) {
                *total = total.wrapping_add(n);
            }
            overflow = overflow.wrapping_add(read.overflow);
        }
        let buckets = self
            .bounds
            .iter()
            .copied()
            .zip(buckets)
            .chain(std::iter::once((f64::INFINITY, overflow)))
            .collect();
        (sum, count, buckets)
    }
}

impl<const B: usize> TypedMetric for LaneHistogram<B> {
    const TYPE: MetricType = MetricType::Histogram;
}

impl<const B: usize> EncodeMetric for LaneHistogram<B> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::{
        encoding::text::encode,
        metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
        registry::Registry,
    };

    const BOUNDS: [f64; 4] = [0.005, 0.5, 1.0, 120.0];

    #[test]
    fn lanes_past_the_slots_share_them_in_turn() {
        let slots: Vec<Padded<AtomicU64>> = (0..3).map(|_| Padded::default()).collect();
        let at = |lane: usize| {
            std::thread::scope(|s| {
                s.spawn(|| {
                    lanes::pretend_lane(lane);
                    mine(&slots).map(|m| std::ptr::from_ref(m) as usize)
                })
                .join()
                .ok()
                .flatten()
            })
        };
        let slot = |i: usize| Some(std::ptr::from_ref(&slots[i].0) as usize);
        assert_eq!(at(0), slot(0));
        assert_eq!(at(1), slot(1));
        assert_eq!(at(2), slot(2));
        assert_eq!(at(3), slot(1));
        assert_eq!(at(4), slot(2));
        assert_eq!(mine::<AtomicU64>(&[]).map(|_| ()), None);
    }

    /// The lanes a test writes: slot 0, every lane, and one past them
    /// (which shares a lane's slot).
    fn every_lane() -> Vec<usize> {
        (0..=lanes::count() + 1).collect()
    }

    /// Runs `f` on one thread per entry of `lanes`, each counting as that
    /// lane, and waits for them all.
    fn on_lanes(lanes: &[usize], f: impl Fn(usize) + Sync) {
        std::thread::scope(|s| {
            for &lane in lanes {
                let f = &f;
                s.spawn(move || {
                    lanes::pretend_lane(lane);
                    f(lane);
                });
            }
        });
    }

    /// `name`'s registry with one labelled series of `metric`, as text.
    fn text<M>(metric: M) -> String
    where
        M: EncodeMetric + TypedMetric + Clone + std::fmt::Debug + Send + Sync + 'static,
    {
        let mut registry = Registry::default();
        let family = Family::<Vec<(String, String)>, M, _>::new_with_constructor({
            let metric = metric.clone();
            move || metric.clone()
        });
        let _ = family.get_or_create(&vec![("model".to_owned(), "m".to_owned())]);
        registry.register("weir_x", "Help text", family);
        let mut out = String::new();
        encode(&mut out, &registry).expect("encodes");
        out
    }

    /// Increments from many threads on the same and on different lanes,
    /// slot 0 and a lane past the slots included, all add up.
    #[test]
    fn counter_sums_every_lane() {
        let counter = LaneCounter::default();
        let lanes = [every_lane(), every_lane(), vec![0; 4]].concat();
        on_lanes(&lanes, |lane| {
            for _ in 0..1000 {
                counter.inc();
            }
            counter.inc_by(lane as u64);
        });
        let by_lane: u64 = lanes.iter().map(|&l| l as u64).sum();
        assert_eq!(counter.get(), lanes.len() as u64 * 1000 + by_lane);
    }

    /// A gauge moved up on one lane and down on another sums to what is
    /// left, though one lane's slot is negative.
    #[test]
    fn gauge_sums_every_lane() {
        let gauge = LaneGauge::default();
        on_lanes(&[1], |_| (0..5).for_each(|_| gauge.inc()));
        on_lanes(&[0, 0], |_| gauge.dec());
        assert_eq!(gauge.get(), 3);
    }

    /// Counter and gauge text is prometheus-client's for the same value.
    #[test]
    fn counter_and_gauge_encode_as_prometheus_client() {
        let (ours, theirs) = (LaneCounter::default(), Counter::<u64>::default());
        ours.inc_by(41);
        ours.inc();
        theirs.inc_by(42);
        assert_eq!(text(ours), text(theirs));
        let (ours, theirs) = (LaneGauge::default(), Gauge::<i64>::default());
        on_lanes(&[1], |_| ours.inc());
        on_lanes(&[0, 0], |_| ours.dec());
        theirs.set(-1);
        assert_eq!(text(ours), text(theirs));
    }

    /// The same observations give the same text as prometheus-client's
    /// `Histogram`: buckets (bounds equal to a value, beyond every bound,
    /// negative, NaN), `_sum` and `_count`, on one thread.
    #[test]
    fn histogram_encodes_as_prometheus_client() {
        let values = [
            0.0, 0.001, 0.005, 0.0051, 0.3, 0.5, 0.7, 1.0, 3.25, 120.0, 120.5, 1e9, -2.0,
        ];
        let ours = LaneHistogram::new(&BOUNDS);
        let theirs = Histogram::new(BOUNDS);
        for v in values {
            ours.observe(v);
            theirs.observe(v);
        }
        assert_eq!(text(ours.clone()), text(theirs.clone()));
        assert!(text(ours.clone()).contains("weir_x_bucket{le=\"+Inf\",model=\"m\"} 13"));
        ours.observe(f64::NAN);
        theirs.observe(f64::NAN);
        assert_eq!(text(ours), text(theirs));
        let empty = LaneHistogram::new(&BOUNDS);
        assert_eq!(text(empty), text(Histogram::new(BOUNDS)));
    }

    /// Observations spread over every lane's slot add up to prometheus-
    /// client's text for all of them (values whose sum is exact in any
    /// order, so the per-lane sums add to the same `f64`).
    #[test]
    fn histogram_sums_every_lane() {
        let values = [0.25, 0.5, 1.0, 2.0, 150.0];
        let ours = LaneHistogram::new(&BOUNDS);
        let lanes = [every_lane(), vec![0; 3]].concat();
        on_lanes(&lanes, |_| {
            for v in values {
                ours.observe(v);
            }
        });
        let theirs = Histogram::new(BOUNDS);
        for _ in &lanes {
            for v in values {
                theirs.observe(v);
            }
        }
        assert_eq!(text(ours), text(theirs));
    }

    /// A read between an observation's steps (bucket, sum, count, in
    /// `observe`'s order) is not whole; once the count is in, it is.
    #[test]
    fn histogram_read_mid_observation_is_not_whole() {
        let slot = HistogramSlot::<4>::default();
        slot.observe(Some(1), 0.25);
        assert!(slot.read_once().1);
        slot.buckets[2].fetch_add(1, Ordering::Relaxed);
        assert!(!slot.read_once().1, "bucket written, sum not yet");
        slot.sum.store(1.25f64.to_bits(), Ordering::Release);
        assert!(!slot.read_once().1, "sum written, count not yet");
        slot.count.fetch_add(1, Ordering::Release);
        let (read, whole) = slot.read_once();
        assert!(whole);
        assert_eq!(
            (read.sum, read.count, read.buckets),
            (1.25, 2, [0, 1, 1, 0])
        );
    }

    /// A slot read while threads observe into it, that says it holds whole
    /// observations, does: with every value 150 (above every bound), its
    /// sum is 150 times its count (slot 0 has several writers here, the
    /// hardest case).
    #[test]
    fn histogram_whole_reads_are_whole_while_observed() {
        const PER_THREAD: u64 = 100_000;
        let ours = LaneHistogram::new(&BOUNDS);
        let done = AtomicU64::new(0);
        let writers = 2;
        // Everyone starts together, so the reads overlap the writes.
        let start = std::sync::Barrier::new(writers as usize + 1);
        let slot = &ours.slots[0].0;
        let mut whole_reads = 0;
        std::thread::scope(|s| {
            for _ in 0..writers {
                let (ours, done, start) = (&ours, &done, &start);
                s.spawn(move || {
                    start.wait();
                    for _ in 0..PER_THREAD {
                        ours.observe(150.0);
                    }
                    done.fetch_add(1, Ordering::Release);
                });
            }
            start.wait();
            loop {
                let finished = done.load(Ordering::Acquire) == writers;
                let (read, whole) = slot.read_once();
                if whole {
                    whole_reads += 1;
                    assert_eq!(read.sum, read.count as f64 * 150.0, "{read:?}");
                    assert_eq!(read.overflow, read.count, "{read:?}");
                }
                if finished {
                    assert!(whole, "a read after the writers is whole");
                    assert_eq!(read.count, PER_THREAD * writers);
                    break;
                }
            }
        });
        assert!(whole_reads >= 1);
    }
}
