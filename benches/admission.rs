//! Admission on the hot path: every request reserves from up to four buckets
//! (requests and tokens, global and per model) and refunds or settles later,
//! so one reserve + refund must stay in the tens of nanoseconds, also when
//! several worker threads share a bucket. The full path (`limiter::admit`:
//! four buckets and the model's semaphore) should stay under 200 ns when
//! nothing binds.
use std::future::Future;
use std::hint::black_box;
use std::num::{NonZeroU32, NonZeroU64};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use weir::admission::bucket::Bucket;
use weir::admission::limiter::{admit, Admitted, GlobalLimits, ModelLimits, ModelMetrics};
use weir::config::{GlobalLimits as GlobalLimitsConfig, ModelConfig};
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
            let _ = bucket.refund(300, now);
            wait
        })
    });

    // A bucket deep in debt: the wait takes the u128 division path.
    let indebted = Bucket::new(RATE, CAPACITY, t0);
    indebted.charge(3_000_000, t0);
    c.bench_function("bucket/reserve+refund (waiting)", |b| {
        b.iter(|| {
            let wait = indebted.reserve(black_box(300), now, Duration::from_secs(3600));
            let _ = indebted.refund(300, now);
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
                        let _ = bucket.refund(300, now);
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

/// Global and model limits with every kind set (requests, tokens, a
/// semaphore) but so high that nothing binds: the bench measures the
/// decision, never a wait. ~4e9 requests/min refills ~66 M/s, far above what
/// one core admits, so the buckets never run dry however long it runs.
fn limits() -> (GlobalLimits, Arc<ModelLimits>) {
    let now = Instant::now();
    let global = GlobalLimits::new(
        &GlobalLimitsConfig {
            requests_per_minute: NonZeroU32::new(u32::MAX),
            tokens_per_minute: NonZeroU64::new(1 << 50),
        },
        None,
        now,
    );
    let model = ModelConfig {
        name: "llama-3.1-8b-instruct".into(),
        requests_per_minute: NonZeroU32::new(u32::MAX),
        tokens_per_minute: NonZeroU64::new(1 << 50),
        burst: None,
        max_concurrent: NonZeroU32::new(10_000),
        queue_timeout: Duration::from_secs(10),
        max_queue: 1000,
        max_tokens: 256,
        declared: true,
    };
    let model = Arc::new(ModelLimits::new(&model, None, ModelMetrics::default(), now));
    (global, model)
}

/// One admission that must not wait: the future is polled once with a no-op
/// waker (no runtime involved) and must be ready.
fn admit_now(global: &GlobalLimits, model: &Arc<ModelLimits>, deadline: Instant) -> Admitted {
    let mut future = pin!(admit(
        global,
        model,
        "llama-3.1-8b-instruct",
        black_box(300),
        Instant::now(),
        deadline
    ));
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(Ok(admitted)) => admitted,
        Poll::Ready(Err(e)) => panic!("bench limits bound: {e:?}"),
        Poll::Pending => panic!("bench limits made admission wait"),
    }
}

/// The full admission path: four bucket reservations, the semaphore permit,
/// the rate headers; dropping `Admitted` returns the permit.
fn limiter_uncontended(c: &mut Criterion) {
    let (global, model) = limits();
    let deadline = Instant::now() + Duration::from_secs(24 * 3600);
    c.bench_function("limiter/admit+drop", |b| {
        b.iter(|| drop(admit_now(&global, &model, deadline)))
    });
}

/// As [`contended`], for the full path: two threads admit the same model.
fn limiter_contended(c: &mut Criterion) {
    let (global, model) = limits();
    let deadline = Instant::now() + Duration::from_secs(24 * 3600);
    c.bench_function("limiter/admit+drop 2 threads", |b| {
        b.iter_custom(|iters| {
            let start = Barrier::new(2);
            std::thread::scope(|s| {
                let worker = || {
                    start.wait();
                    let begin = Instant::now();
                    for _ in 0..iters {
                        drop(admit_now(&global, &model, deadline));
                    }
                    begin.elapsed()
                };
                let other = s.spawn(worker);
                let mine = worker();
                other.join().unwrap_or(mine).max(mine)
            })
        })
    });
}

criterion_group!(
    benches,
    uncontended,
    contended,
    limiter_uncontended,
    limiter_contended
);
criterion_main!(benches);
