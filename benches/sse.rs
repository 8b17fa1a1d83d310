//! SSE usage handling on the hot path: every streamed response runs through a
//! `UsageFilter`, which reads `usage` and, when weir added `include_usage`,
//! removes the usage-only chunk. Measured over a whole realistic response (16
//! content chunks, a usage chunk, `[DONE]`), event-aligned frames as vLLM
//! sends them and 100-byte frames that split events.
use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use weir::admission::tokens::UsageFilter;

/// One vLLM-style `chat.completion.chunk` event.
fn chunk(i: usize, content: &str, finish: Option<&str>) -> String {
    let finish = finish.map_or("null".to_owned(), |f| format!("\"{f}\""));
    format!(
        "data: {{\"id\":\"chatcmpl-9f8e7d6c5b4a\",\"object\":\"chat.completion.chunk\",\"created\":1767225600,\"model\":\"llama-3.1-8b-instruct\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"logprobs\":null,\"finish_reason\":{finish}}}],\"usage\":null,\"x\":{i}}}\n\n"
    )
}

/// The events of one response: 16 content chunks (the last one finishing),
/// the usage-only chunk and `[DONE]`.
fn events() -> Vec<String> {
    let words = [
        "The",
        " weir",
        " holds",
        " the",
        " river",
        " back",
        ",",
        " then",
        " lets",
        " it",
        " go",
        " in",
        " measured",
        " steps",
        ".",
        "",
    ];
    let mut events: Vec<String> = words
        .iter()
        .enumerate()
        .map(|(i, w)| chunk(i, w, (i == words.len() - 1).then_some("stop")))
        .collect();
    events.push(
        "data: {\"id\":\"chatcmpl-9f8e7d6c5b4a\",\"object\":\"chat.completion.chunk\",\"created\":1767225600,\"model\":\"llama-3.1-8b-instruct\",\"choices\":[],\"usage\":{\"prompt_tokens\":31,\"total_tokens\":47,\"completion_tokens\":16}}\n\n"
            .to_owned(),
    );
    events.push("data: [DONE]\n\n".to_owned());
    events
}

/// Runs one response through a fresh filter, as the proxy does per stream.
fn filter(frames: &[Bytes], strip: bool) -> (usize, Option<u64>) {
    let mut filter = UsageFilter::new(strip);
    let mut sent = 0;
    for frame in frames {
        sent += filter.push(frame.clone()).len();
    }
    sent += filter.finish().len();
    (sent, filter.usage().map(|u| u.completion_tokens))
}

fn bench(c: &mut Criterion) {
    let events = events();
    let aligned: Vec<Bytes> = events.iter().map(|e| Bytes::from(e.clone())).collect();
    let whole = Bytes::from(events.concat());
    let split: Vec<Bytes> = whole.chunks(100).map(Bytes::copy_from_slice).collect();

    let mut group = c.benchmark_group("sse/usage_filter_16_chunks");
    group.throughput(Throughput::Bytes(whole.len() as u64));
    for (name, frames) in [("aligned", &aligned), ("split_100B", &split)] {
        for strip in [false, true] {
            let id = BenchmarkId::new(name, if strip { "strip" } else { "keep" });
            group.bench_with_input(id, frames, |b, frames| {
                b.iter(|| filter(black_box(frames), strip))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
