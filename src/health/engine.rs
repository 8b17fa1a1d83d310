//! Reads an inference engine's Prometheus text for the deep health tier:
//! queue depth, running requests and KV-cache use (SPEC "Health tiers").
//!
//! It owns the metric names of the engines weir understands and a small,
//! forgiving parser of the Prometheus text exposition format (0.0.4, which
//! OpenMetrics text also fits for the gauges read here). It deliberately
//! does not judge: [`EngineLoad::is_saturated`] states SPEC's one rule and
//! the checker decides what to do with it.
//!
//! Names come from the engines' own source (see
//! `tests/fixtures/engine-metrics/README.md`):
//!
//! | engine | waiting | running | KV-cache use (0..1) |
//! |---|---|---|---|
//! | vLLM | `vllm:num_requests_waiting` | `vllm:num_requests_running` | `vllm:kv_cache_usage_perc`, older `vllm:gpu_cache_usage_perc` |
//! | SGLang | `sglang:num_queue_reqs` | `sglang:num_running_reqs` | `sglang:token_usage` |
//! | TGI | `tgi_queue_size` | `tgi_batch_current_size` | — |
//! | llama.cpp | `llamacpp:requests_deferred` | `llamacpp:requests_processing` | `llamacpp:kv_cache_usage_ratio` |
//!
//! vLLM's `*_perc` gauges are fractions despite the name: both are computed
//! as `1 - free_blocks / total_blocks` (`vllm/engine/llm_engine.py`,
//! `vllm/v1/core/block_pool.py` `get_usage`) and documented as "1 means 100
//! percent usage". SGLang's `token_usage` is `num_used / max_total_num_tokens`.
//!
//! Why a hand parser rather than the `prometheus-parse` crate (0.2.5): that
//! crate pulls in `regex` and `chrono`, wants owned lines, and fails a whole
//! scrape on one line it does not like; weir wants the opposite: skip what it
//! cannot read, line by line, and never fail. Only three gauges per engine
//! matter, so the parser keeps nothing but those.

/// Load figures read from one engine scrape. `None` = the text did not carry
/// that figure (unknown engine, an older version, or a value that was not a
/// finite non-negative number).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineLoad {
    /// The engine whose metric names were found first.
    pub engine: Option<Engine>,
    /// Requests queued and not yet scheduled, summed over every label set
    /// (data-parallel engines and multi-model servers print one per engine).
    pub waiting: Option<f64>,
    /// Requests being decoded, summed over every label set.
    pub running: Option<f64>,
    /// KV-cache use as a fraction 0..1, the highest over every label set: one
    /// full engine is enough to queue requests.
    pub kv_cache_usage: Option<f64>,
}

/// An inference engine weir reads metrics from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// vLLM (`vllm:` prefix), V0 and V1 engines.
    Vllm,
    /// SGLang (`sglang:` prefix).
    Sglang,
    /// Hugging Face text-generation-inference (`tgi_` prefix).
    Tgi,
    /// llama.cpp's `llama-server --metrics` (`llamacpp:` prefix).
    LlamaCpp,
}

/// KV-cache use at or above which a backend with a waiting queue is
/// saturated (SPEC "Health states": "KV-cache use ≥ 95%").
const SATURATED_KV_CACHE_USAGE: f64 = 0.95;

impl EngineLoad {
    /// SPEC: a waiting queue and KV-cache use >= 95% mark degraded. Both must
    /// be known: a queue alone is normal batching, and a full cache with an
    /// empty queue is an engine using its memory well.
    pub fn is_saturated(&self) -> bool {
        matches!(
            (self.waiting, self.kv_cache_usage),
            (Some(w), Some(kv)) if w > 0.0 && kv >= SATURATED_KV_CACHE_USAGE
        )
    }
}

/// Which figure a metric name feeds.
#[derive(Debug, Clone, Copy)]
enum Figure {
    Waiting,
    Running,
    KvCacheUsage,
}

/// Every metric weir reads, with its engine and figure.
const KNOWN: &[(&str, Engine, Figure)] = &[
    ("vllm:num_requests_waiting", Engine::Vllm, Figure::Waiting),
    ("vllm:num_requests_running", Engine::Vllm, Figure::Running),
    (
        "vllm:kv_cache_usage_perc",
        Engine::Vllm,
        Figure::KvCacheUsage,
    ),
    (
        "vllm:gpu_cache_usage_perc",
        Engine::Vllm,
        Figure::KvCacheUsage,
    ),
    ("sglang:num_queue_reqs", Engine::Sglang, Figure::Waiting),
    ("sglang:num_running_reqs", Engine::Sglang, Figure::Running),
    ("sglang:token_usage", Engine::Sglang, Figure::KvCacheUsage),
    ("tgi_queue_size", Engine::Tgi, Figure::Waiting),
    ("tgi_batch_current_size", Engine::Tgi, Figure::Running),
    (
        "llamacpp:requests_deferred",
        Engine::LlamaCpp,
        Figure::Waiting,
    ),
    (
        "llamacpp:requests_processing",
        Engine::LlamaCpp,
        Figure::Running,
    ),
    (
        "llamacpp:kv_cache_usage_ratio",
        Engine::LlamaCpp,
        Figure::KvCacheUsage,
    ),
];

/// Reads the load figures from Prometheus text. Lines it does not know or
/// cannot read are skipped; it never fails and never panics.
pub fn parse(text: &str) -> EngineLoad {
    let mut load = EngineLoad::default();
    for line in text.lines() {
        let Some((name, value)) = sample(line) else {
            continue;
        };
        let Some(&(_, engine, figure)) = KNOWN.iter().find(|(known, ..)| *known == name) else {
            continue;
        };
        // A gauge that is NaN, infinite or negative says nothing about load.
        if !value.is_finite() || value < 0.0 {
            continue;
        }
        load.engine.get_or_insert(engine);
        match figure {
            Figure::Waiting => *load.waiting.get_or_insert(0.0) += value,
            Figure::Running => *load.running.get_or_insert(0.0) += value,
            Figure::KvCacheUsage => {
                let kv = load.kv_cache_usage.get_or_insert(value);
                *kv = kv.max(value);
            }
        }
    }
    load
}

/// One sample line, `name{labels} value [timestamp]`, as its metric name and
/// value; `None` for comments, blank lines and anything malformed. Labels are
/// skipped, not kept: weir aggregates over them.
fn sample(line: &str) -> Option<(&str, f64)> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let (name, rest) = line.split_at(name_end);
    if name.is_empty() {
        return None;
    }
    let rest = match rest.strip_prefix('{') {
        Some(labels) => skip_labels(labels)?,
        None => rest,
    };
    // The value must be separated from the name or the closing brace only by
    // whitespace; an optional timestamp may follow and is ignored.
    let mut fields = rest.split_whitespace();
    let value = parse_value(fields.next()?)?;
    Some((name, value))
}

/// Given the text after a `{`, returns the text after its matching `}`.
/// Label values are quoted and may contain `}`, `,` and escaped quotes
/// (`\"`, `\\`, `\n`), so the closing brace is found by walking the quotes.
fn skip_labels(text: &str) -> Option<&str> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if in_quotes {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_quotes = false,
                _ => {}
            }
        } else if c == '"' {
            in_quotes = true;
        } else if c == '}' {
            // `i` is a char boundary and `}` is one byte, so `i + 1` is too.
            return text.get(i + 1..);
        }
    }
    None
}

/// A sample value: a float, or Prometheus' `NaN`, `+Inf`, `-Inf` (Rust's
/// `f64` parser accepts those spellings, case-insensitively).
fn parse_value(token: &str) -> Option<f64> {
    token.parse::<f64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VLLM_V0: &str = include_str!("../../tests/fixtures/engine-metrics/vllm-v0.6-busy.txt");
    const VLLM_V1: &str = include_str!("../../tests/fixtures/engine-metrics/vllm-v0.10-dp2.txt");
    const SGLANG: &str = include_str!("../../tests/fixtures/engine-metrics/sglang-dp2.txt");
    const TGI: &str = include_str!("../../tests/fixtures/engine-metrics/tgi-busy.txt");
    const LLAMACPP_BUSY: &str =
        include_str!("../../tests/fixtures/engine-metrics/llamacpp-busy.txt");
    const LLAMACPP_IDLE: &str =
        include_str!("../../tests/fixtures/engine-metrics/llamacpp-idle.txt");

    fn load(
        engine: Engine,
        waiting: Option<f64>,
        running: Option<f64>,
        kv: Option<f64>,
    ) -> EngineLoad {
        EngineLoad {
            engine: Some(engine),
            waiting,
            running,
            kv_cache_usage: kv,
        }
    }

    /// One fixture: the figures read and the saturation verdict.
    fn check(text: &str, expected: EngineLoad, saturated: bool) {
        let got = parse(text);
        assert_eq!(got, expected);
        assert_eq!(got.is_saturated(), saturated, "{got:?}");
    }

    #[test]
    fn vllm_v0_reads_the_older_gpu_cache_gauge() {
        check(
            VLLM_V0,
            load(Engine::Vllm, Some(7.0), Some(24.0), Some(0.9731)),
            true,
        );
    }

    #[test]
    fn vllm_v1_sums_counts_and_takes_the_fullest_engine() {
        // Two data-parallel engines: waiting 3 + 0, running 41 + 38,
        // KV-cache 0.962 and 0.871.
        check(
            VLLM_V1,
            load(Engine::Vllm, Some(3.0), Some(79.0), Some(0.962)),
            true,
        );
    }

    #[test]
    fn sglang_sums_dp_ranks() {
        check(
            SGLANG,
            load(Engine::Sglang, Some(5.0), Some(60.0), Some(0.8125)),
            false,
        );
    }

    #[test]
    fn tgi_has_no_kv_gauge_so_is_never_saturated() {
        check(TGI, load(Engine::Tgi, Some(4.0), Some(32.0), None), false);
    }

    #[test]
    fn llamacpp_fixtures_captured_from_a_real_server() {
        check(
            LLAMACPP_BUSY,
            load(Engine::LlamaCpp, Some(2.0), Some(1.0), None),
            false,
        );
        check(
            LLAMACPP_IDLE,
            load(Engine::LlamaCpp, Some(0.0), Some(0.0), None),
            false,
        );
    }

    #[test]
    fn llamacpp_versions_with_a_kv_gauge() {
        let text = "llamacpp:kv_cache_usage_ratio 0.97\nllamacpp:requests_deferred 1\n";
        check(
            text,
            load(Engine::LlamaCpp, Some(1.0), None, Some(0.97)),
            true,
        );
    }

    #[test]
    fn unknown_or_empty_text_reads_nothing() {
        for text in [
            "",
            "\n\n",
            "# HELP x y\n# TYPE x gauge\nx 1\n",
            "<html>502 Bad Gateway</html>",
            "process_cpu_seconds_total 12.5\n",
        ] {
            assert_eq!(parse(text), EngineLoad::default(), "{text:?}");
        }
    }

    #[test]
    fn labels_with_braces_and_escaped_quotes_in_values() {
        let text = concat!(
            r#"vllm:num_requests_waiting{model_name="a}b",engine="0"} 2"#,
            "\n",
            r#"vllm:num_requests_waiting{model_name="say \"hi\" }{",engine="1"} 3 1712345678000"#,
            "\n",
            r#"vllm:num_requests_waiting{model_name="back\\slash\\"} 4"#,
            "\n",
        );
        let got = parse(text);
        assert_eq!(got.waiting, Some(9.0));
    }

    #[test]
    fn malformed_and_non_finite_lines_are_skipped() {
        let text = concat!(
            "vllm:num_requests_waiting{model_name=\"unterminated} 5\n",
            "vllm:num_requests_waiting NaN\n",
            "vllm:num_requests_waiting +Inf\n",
            "vllm:num_requests_waiting -1\n",
            "vllm:num_requests_waiting\n",
            "vllm:num_requests_waiting{} twelve\n",
            "vllm:num_requests_running{} 2\n",
            "  vllm:kv_cache_usage_perc 0.5   \n",
        );
        assert_eq!(parse(text), load(Engine::Vllm, None, Some(2.0), Some(0.5)),);
    }

    #[test]
    fn windows_line_endings_and_timestamps() {
        let text = "sglang:num_queue_reqs 3 1700000000000\r\nsglang:token_usage 0.99\r\n";
        check(
            text,
            load(Engine::Sglang, Some(3.0), None, Some(0.99)),
            true,
        );
    }

    #[test]
    fn saturation_needs_both_a_queue_and_a_full_cache() {
        let mut l = load(Engine::Vllm, Some(0.0), Some(10.0), Some(1.0));
        assert!(!l.is_saturated(), "full cache, empty queue");
        l.waiting = Some(1.0);
        assert!(l.is_saturated());
        l.kv_cache_usage = Some(0.949);
        assert!(!l.is_saturated(), "queue, cache below 95%");
        l.kv_cache_usage = None;
        assert!(!l.is_saturated(), "queue, cache unknown");
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(text in any::<String>()) {
            let _ = parse(&text);
        }

        #[test]
        fn never_panics_on_metric_like_text(
            text in r#"(vllm:num_requests_waiting|sglang:token_usage|tgi_queue_size|[a-z:_]{0,8})(\{([a-z_]{0,5}="([^"\\]|\\.|[{}"]){0,8}",?){0,3}\}?)?[ \t]{0,2}(-?[0-9.eE+]{0,6}|NaN|\+Inf)?( [0-9]{0,5})?\n?"#
        ) {
            let got = parse(&text);
            for v in [got.waiting, got.running, got.kv_cache_usage].into_iter().flatten() {
                prop_assert!(v.is_finite() && v >= 0.0);
            }
        }
    }
}
