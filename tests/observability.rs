//! Metrics and logs as operators see them: /metrics parsed with a real
//! Prometheus parser, JSON log lines parsed and checked field by field.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use weir::mock::{self, MockConfig};

/// Scrapes /metrics and parses it as Prometheus text.
async fn scrape(addr: std::net::SocketAddr) -> prometheus_parse::Scrape {
    let text = get(addr, "/metrics").await.text();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines)
        .unwrap_or_else(|e| panic!("unparsable /metrics ({e}):\n{text}"))
}

/// The value of the sample `name` whose labels include all of `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref h) => h.last().map_or(0.0, |b| b.count),
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_requests_429s_and_retries() {
    let good = mock::start(MockConfig::default().models(vec!["m".into(), "limited".into()]))
        .await
        .unwrap();
    let failing = mock::start(
        MockConfig::default()
            .models(vec!["m".into()])
            .failure_rate(1.0),
    )
    .await
    .unwrap();
    let toml = format!(
        "[[models]]\nname = \"m\"\n\n[[models]]\nname = \"limited\"\nrequests_per_minute = 1\nburst = 1\nqueue_timeout = \"0s\"\n\n{}{}{QUIET}[outlier]\nconsecutive_failures = 1000\n\n[retry]\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\n",
        backend("good", &good.base_url(), &["m", "limited"], 1),
        backend("failing", &failing.base_url(), &["m"], 1000),
    );
    let gw = gateway(&toml).await;
    let before = scrape(gw.addr()).await;
    assert_eq!(
        value(
            &before,
            "weir_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    for _ in 0..3 {
        let r = post(gw.addr(), "/v1/chat/completions", &chat("m", false)).await;
        assert_eq!(r.status, 200, "retried onto the good backend: {}", r.text());
    }
    let s = post_stream(gw.addr(), "/v1/chat/completions", &chat("limited", true)).await;
    assert_eq!(s.status, 200);
    assert_eq!(
        post(gw.addr(), "/v1/chat/completions", &chat("limited", false))
            .await
            .status,
        429
    );

    // A model nobody serves is answered 404 and counted without its name:
    // clients must not be able to grow the metrics' label set.
    assert_eq!(
        post(
            gw.addr(),
            "/v1/chat/completions",
            &chat("made-up-model-7", false)
        )
        .await
        .status,
        404
    );

    // This gateway has no config file: a reload is refused, and counted.
    assert_eq!(
        send(&client(), "POST", gw.addr(), "/admin/reload", &[], "")
            .await
            .status,
        400
    );

    let after = scrape(gw.addr()).await;
    // Standalone: limits are per process, one replica.
    assert_eq!(value(&after, "weir_cluster_up", &[]), 0.0);
    assert_eq!(value(&after, "weir_cluster_replicas", &[]), 1.0);
    // Every SPEC metric is exported (weir_backend_up needs active checks,
    // which this gateway has off; tests/health.rs covers it).
    let r = get(gw.addr(), "/metrics").await;
    // SPEC: Prometheus text format (0.0.4), not OpenMetrics.
    assert_eq!(
        r.header("content-type"),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = r.text();
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.contains("# TYPE weir_requests_total counter\n"),
        "{text}"
    );
    for name in [
        "weir_requests_total",
        "weir_request_duration_seconds",
        "weir_time_to_first_byte_seconds",
        "weir_tokens_total",
        "weir_rate_limited_total",
        "weir_queue_depth",
        "weir_in_flight",
        "weir_backend_effective_weight",
        "weir_retries_total",
        "weir_upstream_errors_total",
        "weir_config_reloads_total",
        "weir_cluster_up",
        "weir_cluster_replicas",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} is not exported:\n{text}"
        );
    }
    assert_eq!(
        value(&before, "weir_config_reloads_total", &[("result", "error")]),
        0.0
    );
    assert_eq!(
        value(&after, "weir_config_reloads_total", &[("result", "error")]),
        1.0
    );
    assert!(after
        .samples
        .iter()
        .all(|s| s.labels.get("model") != Some("made-up-model-7")));
    assert_eq!(
        value(
            &after,
            "weir_requests_total",
            &[("model", ""), ("backend", ""), ("status", "404")]
        ),
        1.0
    );
    let ok = [("model", "m"), ("backend", "good"), ("status", "200")];
    assert_eq!(value(&after, "weir_requests_total", &ok), 3.0);
    assert_eq!(
        value(
            &after,
            "weir_requests_total",
            &[("model", "limited"), ("status", "429")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "weir_rate_limited_total",
            &[("model", "limited"), ("limit", "requests")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "weir_retries_total",
            &[("model", "m"), ("reason", "status_5xx")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &after,
            "weir_upstream_errors_total",
            &[("backend", "failing"), ("kind", "status_5xx")]
        ),
        3.0
    );
    assert!(
        value(
            &after,
            "weir_tokens_total",
            &[("model", "m"), ("kind", "completion")]
        ) > 0.0
    );
    assert_eq!(
        value(&after, "weir_request_duration_seconds", &[("model", "m")]),
        3.0,
        "histogram count"
    );
    assert_eq!(
        value(
            &after,
            "weir_time_to_first_byte_seconds",
            &[("model", "limited")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "weir_backend_effective_weight",
            &[("backend", "good"), ("model", "m")]
        ),
        1.0
    );
    assert_eq!(value(&after, "weir_in_flight", &[("model", "m")]), 0.0);
    assert_eq!(value(&after, "weir_queue_depth", &[("model", "m")]), 0.0);
}

/// The `(labels…, value)` of every `name` series, sorted.
fn series(scrape: &prometheus_parse::Scrape, name: &str, labels: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v) => v.to_string(),
                ref other => format!("{other:?}"),
            };
            let mut parts: Vec<&str> = labels
                .iter()
                .map(|l| s.labels.get(l).unwrap_or("-"))
                .collect();
            parts.push(&value);
            parts.join(" ")
        })
        .collect();
    out.sort();
    out
}

/// A fresh gateway lists `weir_retries_total` for every model and reason,
/// and `weir_upstream_errors_total` for every backend and kind, at 0
/// before anything failed, so dashboards and `absent()` alerts see data.
/// An API request refused before its model was read (bad JSON, a body
/// too large, a missing key) is counted as `model=""`, as an unknown model
/// is, so a flood of them shows, and so is `GET /v1/models` (an API
/// route weir answers itself, naming no model); weir's other routes
/// (`/healthz`, `/metrics`) are not client traffic and stay out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requests_that_name_no_model_are_counted() {
    let m = mock::start(MockConfig::default().models(vec!["m".into()]))
        .await
        .unwrap();
    let toml = format!(
        "[server]\nmax_body_bytes = 1000\n\n[[models]]\nname = \"m\"\n\n{}{QUIET}",
        backend("b", &m.base_url(), &["m"], 1),
    );
    let gw = gateway(&toml).await;
    let bad = post(gw.addr(), "/v1/chat/completions", "{\"model\": ").await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    let large = post(gw.addr(), "/v1/chat/completions", &"x".repeat(2000)).await;
    assert_eq!(large.status, 413, "{}", large.text());
    assert_eq!(get(gw.addr(), "/healthz").await.status, 200);
    assert_eq!(get(gw.addr(), "/v1/models").await.status, 200);
    assert_eq!(get(gw.addr(), "/v1/models/m").await.status, 200);
    assert_eq!(get(gw.addr(), "/v1/models/nope").await.status, 404);
    let after = scrape(gw.addr()).await;
    let unnamed = |status: &str| {
        value(
            &after,
            "weir_requests_total",
            &[("model", ""), ("backend", ""), ("status", status)],
        )
    };
    assert_eq!(unnamed("400"), 1.0);
    assert_eq!(unnamed("413"), 1.0);
    assert_eq!(unnamed("404"), 1.0);
    assert_eq!(
        unnamed("200"),
        2.0,
        "the two /v1/models answers are counted; /healthz and /metrics are not"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_gateway_lists_retries_and_upstream_errors_at_0() {
    let m = mock::start(MockConfig::default().models(vec!["m".into(), "n".into()]))
        .await
        .unwrap();
    let toml = format!(
        "[[models]]\nname = \"m\"\n\n[[models]]\nname = \"n\"\n\n{}{}{QUIET}",
        backend("b1", &m.base_url(), &["m", "n"], 1),
        backend("b2", &m.base_url(), &["m"], 1),
    );
    let gw = gateway(&toml).await;
    let text = get(gw.addr(), "/metrics").await.text();
    assert!(
        text.contains("# TYPE weir_retries_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE weir_upstream_errors_total counter\n"),
        "{text}"
    );
    let scrape = scrape(gw.addr()).await;
    let reasons = [
        "connect",
        "idle_closed",
        "protocol",
        "status_429",
        "status_5xx",
        "timeout",
    ];
    let expected: Vec<String> = ["m", "n"]
        .iter()
        .flat_map(|m| reasons.iter().map(move |r| format!("{m} {r} 0")))
        .collect();
    assert_eq!(
        series(&scrape, "weir_retries_total", &["model", "reason"]),
        expected
    );
    // `idle_closed` is retried but never held against a backend.
    let expected: Vec<String> = ["b1", "b2"]
        .iter()
        .flat_map(|b| {
            reasons
                .iter()
                .filter(|k| **k != "idle_closed")
                .map(move |k| format!("{b} {k} 0"))
        })
        .collect();
    assert_eq!(
        series(&scrape, "weir_upstream_errors_total", &["backend", "kind"]),
        expected
    );
}

/// A weir process, killed if its test fails before stopping it.
struct JsonWeir(std::process::Child);

impl JsonWeir {
    /// SIGTERM (a graceful stop, flushing the log), then waits for it.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

impl Drop for JsonWeir {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the weir binary on `toml` (written into `dir`) with `RUST_LOG`
/// set to `rust_log`, and returns it with its stderr, line by line.
fn spawn_logging(
    dir: &tempfile::TempDir,
    toml: &str,
    rust_log: &str,
) -> (JsonWeir, std::sync::mpsc::Receiver<String>) {
    let path = dir.path().join("weir.toml");
    std::fs::write(&path, toml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("--config")
        .arg(&path)
        .env("BACKEND_KEY", BACKEND_KEY)
        .env("RUST_LOG", rust_log)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (JsonWeir(child), rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_every_field_and_no_secret() {
    let m = mock::start(MockConfig::default().models(vec!["m".into()]).chunks(4))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, rx) = spawn_logging(
        &dir,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nlog_format = \"json\"\n\n[[models]]\nname = \"m\"\n\n{}{QUIET}",
            backend("b1", &m.base_url(), &["m"], 1)
        ),
        "trace",
    );
    let mut lines = Vec::new();
    let addr: std::net::SocketAddr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("weir logs its listen address");
        let json: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        lines.push(line);
        if json["message"] == "weir is serving" {
            break json["listen"].as_str().unwrap().parse().unwrap();
        }
    };
    let r = send(
        &client(),
        "POST",
        addr,
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-request-id", "log-test-1"),
            ("authorization", "Bearer client-secret-9"),
        ],
        chat("m", false),
    )
    .await;
    assert_eq!(r.status, 200);
    let s = post_stream(addr, "/v1/chat/completions", &chat("m", true)).await;
    assert_eq!(s.status, 200);
    child.stop();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        lines.push(line);
    }
    let requests: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
        })
        .filter(|j| j["message"] == "request" && j["path"] == "/v1/chat/completions")
        .collect();
    assert_eq!(requests.len(), 2, "one line per request: {requests:?}");
    let first = requests
        .iter()
        .find(|j| j["request_id"] == "log-test-1")
        .expect("the client's request id");
    for field in [
        "model",
        "backend",
        "status",
        "attempts",
        "queue_ms",
        "ttfb_ms",
        "total_ms",
        "prompt_tokens",
        "completion_tokens",
        "ending",
        "level",
        "timestamp",
    ] {
        assert!(
            first.get(field).is_some_and(|v| !v.is_null()),
            "field {field} missing: {first}"
        );
    }
    assert_eq!(first["model"], "m");
    assert_eq!(first["backend"], "b1");
    assert_eq!(first["status"], 200);
    assert_eq!(first["ending"], "complete");
    let client = first["client"].as_str().unwrap_or_default();
    assert!(
        client
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback()),
        "the client's address: {first}"
    );
    let stream = requests
        .iter()
        .find(|j| j["request_id"] != "log-test-1")
        .unwrap();
    assert_eq!(
        stream["completion_tokens"], 4,
        "the stream's real usage: {stream}"
    );
    let all = lines.join("\n");
    assert!(!all.contains(BACKEND_KEY), "backend key in the logs");
    assert!(!all.contains("client-secret-9"), "client key in the logs");
}

/// The next JSON log line (within 20 s) whose message is `wanted`; fails
/// on a line whose message is `forbidden` before it.
fn next_message(
    rx: &std::sync::mpsc::Receiver<String>,
    wanted: &str,
    forbidden: Option<&str>,
) -> serde_json::Value {
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no log line {wanted:?}"));
        let json: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if let Some(forbidden) = forbidden {
            assert_ne!(json["message"], forbidden, "{json}");
        }
        if json["message"] == wanted {
            return json;
        }
    }
}

/// A backend the clock brings back (its 429 window over) is logged, as the
/// 429 that took it out was: operators see both ends of the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_a_429_window_is_logged() {
    let m = mock::start(
        MockConfig::default()
            .models(vec!["m".into()])
            .rate_limit(1.0, 1),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, rx) = spawn_logging(
        &dir,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nlog_format = \"json\"\n\n[retry]\nmax_attempts = 1\n\n[[models]]\nname = \"m\"\n\n{}{QUIET}",
            backend("b1", &m.base_url(), &["m"], 1)
        ),
        "info",
    );
    let next_message = |wanted: &str| next_message(&rx, wanted, None);
    let listen = next_message("weir is serving");
    let addr: std::net::SocketAddr = listen["listen"].as_str().unwrap().parse().unwrap();
    let r = send(
        &client(),
        "POST",
        addr,
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        chat("m", false),
    )
    .await;
    // No retry left: a 502 naming the backend's 429 (README "Retries").
    assert_eq!(r.status, 502);
    let out = next_message("backend rate-limited weir; out of rotation until its Retry-After");
    assert_eq!(out["backend"], "b1");
    // One second later (the mock's Retry-After) the clock ends the window.
    let back = next_message("backend back in rotation: its Retry-After window ended");
    assert_eq!(back["backend"], "b1");
    child.stop();
}

/// A 429 whose `Retry-After` is already over (`0`) opens no window, so the
/// clock never announces one as ended: a later rebuild (here another
/// backend's 429, then the end of its window) logs only that backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_already_over_is_never_announced_as_ended() {
    let start = |retry_after: u32| {
        mock::start(
            MockConfig::default()
                .models(vec!["a".into(), "b".into()])
                .rate_limit(1.0, retry_after),
        )
    };
    let (zero, one) = (start(0).await.unwrap(), start(1).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (mut child, rx) = spawn_logging(
        &dir,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nlog_format = \"json\"\n\n[retry]\nmax_attempts = 1\n\n[[models]]\nname = \"a\"\n\n[[models]]\nname = \"b\"\n\n{}{}{QUIET}",
            backend("b0", &zero.base_url(), &["a"], 1),
            backend("b1", &one.base_url(), &["b"], 1)
        ),
        "info",
    );
    let ended = "backend back in rotation: its Retry-After window ended";
    let listen = next_message(&rx, "weir is serving", None);
    let addr: std::net::SocketAddr = listen["listen"].as_str().unwrap().parse().unwrap();
    let r = post(addr, "/v1/chat/completions", &chat("a", false)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let over = next_message(
        &rx,
        "backend rate-limited weir with a Retry-After already over; it stays in rotation",
        None,
    );
    assert_eq!(over["backend"], "b0");
    let r = post(addr, "/v1/chat/completions", &chat("b", false)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    next_message(
        &rx,
        "backend rate-limited weir; out of rotation until its Retry-After",
        None,
    );
    // Every line up to b1's window ending: none says b0's ended.
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("b1's window ends within its Retry-After");
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        if json["message"] == ended {
            assert_eq!(json["backend"], "b1", "{json}");
            break;
        }
    }
    child.stop();
}

/// When the clock ends a 429 window while the probes hold the backend out
/// (it went down meanwhile, unlogged: it was out already), the end is
/// logged with why it is still out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_ending_on_a_backend_still_failing_its_probes_says_why() {
    let m = mock::start(
        MockConfig::default()
            .models(vec!["m".into()])
            .rate_limit(1.0, 3),
    )
    .await
    .unwrap();
    let health = "[health]\nunhealthy_threshold = 1\nhealthy_threshold = 1\nslow_start = \"0s\"\nliveness = { interval = \"100ms\", timeout = \"500ms\" }\nreadiness = { interval = \"1h\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 4 }\n";
    let dir = tempfile::tempdir().unwrap();
    let (mut child, rx) = spawn_logging(
        &dir,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nlog_format = \"json\"\n\n[retry]\nmax_attempts = 1\n\n[[models]]\nname = \"m\"\n\n{}health_path = \"/health\"\n\n{health}",
            backend("b1", &m.base_url(), &["m"], 1)
        ),
        "info",
    );
    let next_message = |wanted: &str| {
        next_message(
            &rx,
            wanted,
            Some("backend back in rotation: its Retry-After window ended"),
        )
    };
    let listen = next_message("weir is serving");
    let addr: std::net::SocketAddr = listen["listen"].as_str().unwrap().parse().unwrap();
    let r = post(addr, "/v1/chat/completions", &chat("m", false)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    next_message("backend rate-limited weir; out of rotation until its Retry-After");
    // Its liveness fails from now on, within the 3 s window: no line (the
    // backend is out either way) until the window ends.
    m.update(|c| c.health_status = Some(503));
    let still = next_message("backend still out of rotation after its Retry-After window ended");
    assert_eq!(still["backend"], "b1");
    assert!(
        still["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("liveness failing:") && r.contains("503")),
        "{still}"
    );
    child.stop();
}
