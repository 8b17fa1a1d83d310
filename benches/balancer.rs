//! Backend selection on the hot path: every attempt runs one smooth weighted
//! round-robin pick over the model's pool under a short mutex. A pick is one
//! pass over the weights, so it grows with the pool; 2 and 16 backends are
//! the common sizes, 1000 the pathological one.
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use weir::balancer::Pool;

/// Uneven weights (10..=50), as a mixed fleet would have.
fn pool(n: usize) -> Pool {
    Pool::new((0..n).map(|i| 10 * (1 + (i % 5) as u32)).collect())
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
