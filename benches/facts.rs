//! Request-facts extraction on the hot path: every proxied request is parsed
//! once, and streamed or renamed ones are rewritten. Both must stay in the
//! microseconds even for a ~100 KB body.
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use weir::api::facts::{parse, rewrite};

/// A typical small chat request.
fn small_chat() -> Vec<u8> {
    br#"{"model":"llama-3.1-8b-instruct","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Write a haiku about rivers and weirs."}],"max_tokens":256,"temperature":0.7,"stream":true}"#
        .to_vec()
}

/// A ~100 KB chat request: a long conversation with escapes, parts and tools.
fn big_chat() -> Vec<u8> {
    let mut messages = Vec::new();
    let line = "The weir holds the river back, then lets it go in measured \"steps\".\n";
    let mut i = 0;
    let mut len = 0;
    while len < 100_000 {
        let content = line.repeat(3 + i % 5);
        let message = if i % 3 == 2 {
            serde_json::json!({"role": "user", "content": [
                {"type": "text", "text": content},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
            ]})
        } else {
            serde_json::json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": content})
        };
        let text = message.to_string();
        len += text.len();
        messages.push(message);
        i += 1;
    }
    serde_json::to_vec(&serde_json::json!({
        "model": "llama-3.1-70b-instruct",
        "messages": messages,
        "max_completion_tokens": 1024,
        "stream": true,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}],
    }))
    .unwrap_or_default()
}

fn bench(c: &mut Criterion) {
    let small = small_chat();
    let big = big_chat();

    let mut group = c.benchmark_group("facts");
    group.throughput(Throughput::Bytes(small.len() as u64));
    group.bench_function("parse_small", |b| b.iter(|| parse(black_box(&small))));
    group.bench_function("rewrite_small_model_and_usage", |b| {
        b.iter(|| {
            rewrite(
                black_box(&small),
                Some("meta-llama/Llama-3.1-8B-Instruct"),
                true,
            )
        })
    });
    group.throughput(Throughput::Bytes(big.len() as u64));
    group.bench_function("parse_100k", |b| b.iter(|| parse(black_box(&big))));
    group.bench_function("rewrite_100k_usage", |b| {
        b.iter(|| rewrite(black_box(&big), None, true))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
