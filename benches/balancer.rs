//! Backend selection on the hot path: every attempt takes the next turn of
//! the pool's precomputed smooth weighted round-robin period, one atomic
//! increment, so a pick must cost the same at 2, 16 and 1000 backends. The
//! period is built once per snapshot (`balancer/build`), off the request
//! path.
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use weir::balancer::Pool;

/// Uneven weights (10..=50), as a mixed fleet would have.
fn pool(n: usize) -> Pool {
    Pool::new((0..n).map(|i| 10 * (1 + (i % 5) as u64)).collect())
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("balancer/pick");
    for n in [2usize, 16, 1000] {
        let pool = pool(n);
        group.bench_with_input(BenchmarkId::new("all_eligible", n), &pool, |b, pool| {
            b.iter(|| pool.pick(|_| true))
        });
        // The retry case: the peer tried first sits the round out.
        group.bench_with_input(BenchmarkId::new("one_excluded", n), &pool, |b, pool| {
            b.iter(|| pool.pick(|i| i != black_box(0)))
        });
    }
    group.finish();
    let mut group = c.benchmark_group("balancer/build");
    for n in [2usize, 16, 1000] {
        let weights: Vec<u64> = (0..n).map(|i| 10 * (1 + (i % 5) as u64)).collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &weights, |b, w| {
            b.iter(|| Pool::new(black_box(w.clone())))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
