//! Admission on the hot path: every request reserves from up to four buckets
//! (requests and tokens, global and per model) and refunds or settles later,
//! so one reserve + refund must stay in the tens of nanoseconds, also when
//! several worker threads share a bucket.
use std::hint::black_box;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use weir::admission::bucket::Bucket;
// tokio's Instant is plain std time outside a paused runtime; the std type is
// banned by clippy.toml, so the custom timings below use this one too.
use tokio::time::Instant;

// `unwrap` in a const: a zero here would fail the build, not the bench.
const RATE: NonZeroU64 = NonZeroU64::new(600_000).unwrap();
const CAPACITY: NonZeroU64 = NonZeroU64::new(1_000_000).unwrap();

fn uncontended(c: &mut Criterion) {
    let t0 = Instant::now();
    let now = t0 + Duration::from_secs(1);
    let bucket = Bucket::new(RATE, CAPACITY, t0);
    c.bench_function("bucket/reserve+refund", |b| {
        b.iter(|| {
            let wait = bucket.reserve(black_box(300), now, Duration::ZERO);
            bucket.refund(300, now);
            wait
        })
    });

    // A bucket deep in debt: the wait takes the u128 division path.
    let indebted = Bucket::new(RATE, CAPACITY, t0);
    indebted.charge(3_000_000, t0);
    c.bench_function("bucket/reserve+refund (waiting)", |b| {
        b.iter(|| {
            let wait = indebted.reserve(black_box(300), now, Duration::from_secs(3600));
            indebted.refund(300, now);
            wait
        })
    });

    c.bench_function("bucket/remaining+reset_after", |b| {
        b.iter(|| {
            (
                indebted.remaining(black_box(now)),
                indebted.reset_after(now),
            )
        })
    });
}

/// Two threads each do `iters` reserve + refund pairs on one bucket; the time
/// reported per iteration is wall time / iters, i.e. the latency one thread
/// sees while the other competes for the lock.
fn contended(c: &mut Criterion) {
    let t0 = Instant::now();
    let now = t0 + Duration::from_secs(1);
    let bucket = Bucket::new(RATE, CAPACITY, t0);
    c.bench_function("bucket/reserve+refund 2 threads", |b| {
        b.iter_custom(|iters| {
            let start = Barrier::new(2);
            let done = AtomicBool::new(false);
            std::thread::scope(|s| {
                let worker = || {
                    start.wait();
                    let begin = Instant::now();
                    for _ in 0..iters {
                        let wait = bucket.reserve(black_box(300), now, Duration::ZERO);
                        bucket.refund(300, now);
                        let _ = black_box(wait);
                    }
                    done.store(true, Ordering::Relaxed);
                    begin.elapsed()
                };
                let other = s.spawn(worker);
                let mine = worker();
                // A panicking worker already fails the bench; fall back to ours.
                other.join().unwrap_or(mine).max(mine)
            })
        })
    });
}

criterion_group!(benches, uncontended, contended);
criterion_main!(benches);
