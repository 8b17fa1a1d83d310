//! Routing-state load on the hot path: every request loads the snapshot once
//! from an `ArcSwap` and keeps it to its end, then looks its model up. The
//! snapshot is the one a started gateway publishes (health checks off), so it
//! is built exactly as in production.
use std::hint::black_box;

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion};
use weir::{Config, Gateway};

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"

[[models]]
name = "llama-3.1-8b-instruct"
requests_per_minute = 100_000
tokens_per_minute = 100_000_000
max_concurrent = 1000

[[models]]
name = "llama-3.1-70b-instruct"

[[backends]]
name = "a"
url = "http://127.0.0.1:9/v1"
models = ["llama-3.1-8b-instruct", "llama-3.1-70b-instruct"]
weight = 3

[[backends]]
name = "b"
url = "http://127.0.0.1:9/v1"
models = ["llama-3.1-8b-instruct"]
weight = 1

[health]
enabled = false
"#;

/// Starts a gateway (a runtime is needed for startup only) and keeps its
/// published snapshot.
fn snapshot() -> ArcSwap<weir::snapshot::Snapshot> {
    let config = match Config::parse(CONFIG, "bench.toml", &|_| None) {
        Ok(c) => c,
        Err(e) => panic!("invalid bench config:\n{e}"),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("cannot start a runtime: {e}"),
    };
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("cannot bind 127.0.0.1:0: {e}"),
        };
        let handle = match Gateway::new(config).start_on(listener, None) {
            Ok(h) => h,
            Err(e) => panic!("gateway does not start: {e}"),
        };
        let snapshot = handle.snapshot();
        handle.shutdown();
        handle.wait().await;
        ArcSwap::new(snapshot)
    })
}

fn bench(c: &mut Criterion) {
    let swap = snapshot();
    let mut group = c.benchmark_group("snapshot");
    group.bench_function("load_full", |b| b.iter(|| swap.load_full()));
    group.bench_function("load_full+model", |b| {
        b.iter(|| {
            let snapshot = swap.load_full();
            snapshot
                .model(black_box("llama-3.1-8b-instruct"))
                .map(|m| m.config.max_tokens)
        })
    });
    group.bench_function("load_guard", |b| {
        b.iter(|| {
            swap.load()
                .model(black_box("llama-3.1-8b-instruct"))
                .is_some()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
