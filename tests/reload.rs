//! Reload (SIGHUP, `POST /admin/reload`, `watch_config`) through real
//! sockets, in-process mocks and real files: nothing dropped under load, live
//! state carried over, invalid files refused, last reload wins, the file
//! watcher, the binary's SIGHUP, and the figures for docs/BENCHMARKS.md.

mod common;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use tokio::{net::TcpListener, time::Instant};
use weir::{
    mock::{self, MockConfig, MockHandle},
    Config, Gateway, Handle,
};

const MODEL: &str = "m";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A gateway started from a real file that tests rewrite and reload.
struct Live {
    /// Keeps the directory alive.
    _dir: tempfile::TempDir,
    path: PathBuf,
    gw: Handle,
}

impl Live {
    async fn start(toml: &str) -> Live {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("weir.toml");
        std::fs::write(&path, toml).expect("write config");
        Self::start_at(dir, path).await
    }

    async fn start_at(dir: tempfile::TempDir, path: PathBuf) -> Live {
        let config = Config::load(&path, &test_env).unwrap_or_else(|e| panic!("{e}"));
        Self::start_loaded(dir, path, config).await
    }

    /// Starts a gateway on `config`, which was loaded from `path` (and
    /// may no longer be what the file holds).
    async fn start_loaded(dir: tempfile::TempDir, path: PathBuf, config: Config) -> Live {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gw = Gateway::new(config)
            .config_path(&path)
            .env(test_env)
            .start_on(listener, None)
            .expect("gateway starts");
        Live {
            _dir: dir,
            path,
            gw,
        }
    }

    /// Replaces the file atomically (write a sibling, rename over), as
    /// editors and deploy tools do, so a concurrent reader never sees half.
    fn write(&self, toml: &str) {
        write_atomically(&self.path, toml);
    }

    /// `POST /admin/reload`.
    async fn reload(&self) -> Reply {
        post(self.gw.admin_addr(), "/admin/reload", "").await
    }

    /// Writes `toml` and reloads it, asserting success; returns the changes.
    async fn apply(&self, toml: &str) -> Vec<String> {
        self.write(toml);
        let r = self.reload().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        assert_eq!(j["result"], "ok", "{j}");
        j["changes"]
            .as_array()
            .expect("changes is a list")
            .iter()
            .map(|c| c.as_str().expect("a string").to_owned())
            .collect()
    }

    /// Effective weight per backend for MODEL in the current snapshot.
    fn weights(&self) -> HashMap<String, f64> {
        let snapshot = self.gw.snapshot();
        let route = snapshot.model(MODEL).expect("model routed");
        route
            .members
            .iter()
            .map(|m| (m.backend.config.name.clone(), m.effective_weight))
            .collect()
    }

    async fn reload_count(&self, result: &str) -> u64 {
        reload_count(self.gw.admin_addr(), result).await
    }

    /// `reload_count("ok")` once it has reached `n`, or after 5 s. A watched
    /// reload is counted after the snapshot a test saw it by is stored.
    async fn ok_reloads_once(&self, n: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let count = self.reload_count("ok").await;
            if count >= n || Instant::now() >= deadline {
                return count;
            }
            tokio::time::sleep(ms(20)).await;
        }
    }
}

fn write_atomically(path: &Path, toml: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, toml).expect("write temp config");
    std::fs::rename(&tmp, path).expect("rename over config");
}

/// `weir_config_reloads_total{result}` as /metrics reports it.
async fn reload_count(admin: std::net::SocketAddr, result: &str) -> u64 {
    let text = get(admin, "/metrics").await.text();
    let prefix = format!("weir_config_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in /metrics:\n{text}"))
}

async fn mock_named(name: &str, cfg: MockConfig) -> MockHandle {
    mock::start(cfg.models(vec![MODEL.into()]).name(name))
        .await
        .expect("mock starts")
}

/// One model (with `model_extra` lines) served by `backends` (name, mock,
/// weight), then `tail` (health off unless `tail` says otherwise).
fn file(model_extra: &str, backends: &[(&str, &MockHandle, u32)], tail: &str) -> String {
    let mut s = format!("[[models]]\nname = \"{MODEL}\"\n{model_extra}\n\n");
    for (name, m, weight) in backends {
        s.push_str(&backend(name, &m.base_url(), &[MODEL], *weight));
    }
    s.push_str(if tail.is_empty() { QUIET } else { tail });
    s
}

/// Sends `n` sequential requests; counts answers per backend.
async fn shares(addr: std::net::SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        *counts
            .entry(r.header("x-weir-backend").to_owned())
            .or_default() += 1;
    }
    counts
}

fn counts(pairs: &[(&str, usize)]) -> HashMap<String, usize> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// What one client request saw: when it was sent (since the test began),
/// its status, the backend, and for streams whether it ended with [DONE].
#[derive(Debug, Clone)]
struct Seen {
    sent: Duration,
    status: u16,
    backend: String,
    complete: bool,
}

/// 4 request loops and 2 stream loops against the gateway until `stop`.
fn load(
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> Vec<tokio::task::JoinHandle<Vec<Seen>>> {
    let mut tasks = Vec::new();
    for i in 0..6 {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = t0.elapsed();
                if i < 4 {
                    let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
                    seen.push(Seen {
                        sent,
                        status: r.status.as_u16(),
                        backend: r.header("x-weir-backend").to_owned(),
                        complete: r.status == 200 && r.json()["object"] == "chat.completion",
                    });
                } else {
                    let s = post_stream(addr, "/v1/chat/completions", &chat(MODEL, true)).await;
                    let backend = s
                        .headers
                        .get("x-weir-backend")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    seen.push(Seen {
                        sent,
                        status: s.status.as_u16(),
                        backend,
                        complete: s.text().trim_end().ends_with("data: [DONE]")
                            && s.events().len() >= 8,
                    });
                }
            }
            seen
        }));
    }
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_reloads_under_load_fail_no_request_and_cut_no_stream() {
    let cfg = || {
        MockConfig::default()
            .latency(ms(2))
            .chunks(8)
            .tokens_per_sec(200.0)
    };
    let (m1, m2, m3) = (
        mock_named("b1", cfg()).await,
        mock_named("b2", cfg()).await,
        mock_named("b3", cfg()).await,
    );
    let limits = |rpm: u32, conc: u32| {
        format!(
            "requests_per_minute = {rpm}\ntokens_per_minute = 100000000\nmax_concurrent = {conc}"
        )
    };
    let first = file(
        &limits(100_000, 64),
        &[("b1", &m1, 1), ("b2", &m2, 1), ("b3", &m3, 1)],
        "",
    );
    // Weights change, backends come and go, limits change; the last file
    // removes b2 for good.
    let steps = [
        file(
            &limits(100_000, 64),
            &[("b1", &m1, 1), ("b2", &m2, 2), ("b3", &m3, 3)],
            "",
        ),
        file(
            &limits(200_000, 64),
            &[("b1", &m1, 3), ("b2", &m2, 1), ("b3", &m3, 1)],
            "",
        ),
        file(&limits(200_000, 32), &[("b1", &m1, 1), ("b2", &m2, 1)], ""),
        file(
            &limits(200_000, 32),
            &[("b1", &m1, 1), ("b2", &m2, 1), ("b3", &m3, 2)],
            "",
        ),
        file(&limits(150_000, 100), &[("b2", &m2, 1), ("b3", &m3, 1)], ""),
        file(
            &limits(150_000, 100),
            &[("b1", &m1, 5), ("b2", &m2, 1), ("b3", &m3, 1)],
            "",
        ),
        file(
            &limits(100_000, 16),
            &[("b1", &m1, 1), ("b2", &m2, 4), ("b3", &m3, 1)],
            "",
        ),
        file(&limits(100_000, 64), &[("b1", &m1, 2), ("b3", &m3, 2)], ""),
        file(
            &limits(120_000, 64),
            &[("b1", &m1, 1), ("b2", &m2, 1), ("b3", &m3, 1)],
            "",
        ),
        file(&limits(120_000, 64), &[("b1", &m1, 2), ("b3", &m3, 1)], ""),
    ];
    let live = Live::start(&first).await;
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(live.gw.addr(), stop.clone(), t0);
    tokio::time::sleep(ms(100)).await;
    for step in &steps {
        live.apply(step).await;
        tokio::time::sleep(ms(40)).await;
    }
    let removed_at = t0.elapsed();
    assert_eq!(live.weights(), weights_of(&[("b1", 2.0), ("b3", 1.0)]));
    // b2 drains: what it had in flight finishes.
    assert!(
        eventually(Duration::from_secs(5), || m2.in_flight() == 0).await,
        "b2 drained"
    );
    tokio::time::sleep(ms(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load loop"));
    }
    let failed: Vec<&Seen> = all
        .iter()
        .filter(|s| s.status != 200 || !s.complete)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        all.len()
    );
    let late_b2: Vec<&Seen> = all
        .iter()
        .filter(|s| s.sent > removed_at && s.backend == "b2")
        .collect();
    assert!(
        late_b2.is_empty(),
        "sent after b2's removal, answered by b2: {late_b2:?}"
    );
    let streams = all.iter().filter(|s| s.complete).count();
    assert!(
        all.len() > 100 && streams > 0,
        "load ran: {} requests",
        all.len()
    );
    assert_eq!(live.reload_count("ok").await, 10);
    assert_eq!(live.reload_count("error").await, 0);
}

/// Effective weights as `Live::weights` reports them.
fn weights_of(pairs: &[(&str, f64)]) -> HashMap<String, f64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// A backend that refused the `stream_options` weir adds is asked again
/// after a reload: it may have been upgraded meanwhile.
#[tokio::test]
async fn a_reload_asks_a_backend_that_refused_stream_options_again() {
    let refusing = MockConfig::default().refuse_stream_options(true);
    let m = mock_named("b1", refusing).await;
    let toml = file("", &[("b1", &m, 1)], "");
    let live = Live::start(&toml).await;
    let sent = |m: &MockHandle| -> Vec<serde_json::Value> {
        m.recorded()
            .into_iter()
            .filter(|r| r.method == http::Method::POST)
            .map(|r| serde_json::from_slice(&r.body).expect("a JSON body"))
            .collect()
    };
    let body = chat(MODEL, true);
    let stream = || post_stream(live.gw.addr(), "/v1/chat/completions", &body);
    // Refused, and sent again without it; then without it from the start.
    assert_eq!(stream().await.status, 200);
    assert_eq!(stream().await.status, 200);
    let bodies = sent(&m);
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    assert_eq!(bodies[0]["stream_options"]["include_usage"], true);
    assert!(bodies[2].get("stream_options").is_none(), "{:?}", bodies[2]);
    // The backend now takes the field; a reload of the same file asks again.
    m.update(|c| c.refuse_stream_options = false);
    live.apply(&toml).await;
    let s = stream().await;
    assert_eq!(s.status, 200, "{}", s.text());
    let bodies = sent(&m);
    assert_eq!(bodies.len(), 4, "{bodies:?}");
    assert_eq!(bodies[3]["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn new_weights_hold_exactly_after_a_reload() {
    let (m1, m2, m3) = (
        mock_named("b1", MockConfig::default()).await,
        mock_named("b2", MockConfig::default()).await,
        mock_named("b3", MockConfig::default()).await,
    );
    let live = Live::start(&file(
        "",
        &[("b1", &m1, 1), ("b2", &m2, 1), ("b3", &m3, 1)],
        "",
    ))
    .await;
    // Leave the old pool's round-robin state mid-cycle.
    shares(live.gw.addr(), 7).await;
    let changes = live
        .apply(&file(
            "",
            &[("b1", &m1, 1), ("b2", &m2, 2), ("b3", &m3, 3)],
            "",
        ))
        .await;
    assert_eq!(
        changes,
        ["backend b2 weight 1 -> 2", "backend b3 weight 1 -> 3"],
        "{changes:?}"
    );
    // Smooth WRR is exact over every whole cycle (6 picks) from a fresh pool.
    let got = shares(live.gw.addr(), 198).await;
    assert_eq!(got, counts(&[("b1", 33), ("b2", 66), ("b3", 99)]));
    let backends = get(live.gw.admin_addr(), "/admin/backends").await.json();
    let weight = |i: usize| backends["backends"][i]["models"][MODEL]["effective_weight"].clone();
    assert_eq!(
        (weight(0), weight(1), weight(2)),
        (1.into(), 2.into(), 3.into())
    );
}

#[tokio::test]
async fn a_removed_backend_gets_no_request_once_the_reload_returns() {
    let (m1, m2) = (
        mock_named("b1", MockConfig::default()).await,
        mock_named("b2", MockConfig::default()).await,
    );
    let live = Live::start(&file("", &[("b1", &m1, 1), ("b2", &m2, 1)], "")).await;
    let before = shares(live.gw.addr(), 10).await;
    assert_eq!(before, counts(&[("b1", 5), ("b2", 5)]));
    let changes = live.apply(&file("", &[("b1", &m1, 1)], "")).await;
    assert_eq!(changes, ["backend b2 removed (draining)"]);
    let seen_by_b2 = m2.requests();
    assert_eq!(shares(live.gw.addr(), 40).await, counts(&[("b1", 40)]));
    assert_eq!(m2.requests(), seen_by_b2);
    // The probe tasks of a removed backend stop too (none ran: health off).
    assert!(live
        .gw
        .snapshot()
        .backends()
        .iter()
        .all(|b| b.config.name != "b2"));
}

/// A backend a reload removed is listed under `draining` in
/// `/admin/backends` while its requests run, and leaves once they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_backends_lists_a_removed_backend_until_it_has_drained() {
    let m1 = mock_named("b1", MockConfig::default().chunks(60).tokens_per_sec(10.0)).await;
    let m2 = mock_named("b2", MockConfig::default()).await;
    let live = Live::start(&file("", &[("b1", &m1, 1)], "")).await;
    let addr = live.gw.addr();
    let stream =
        tokio::spawn(
            async move { post_stream(addr, "/v1/chat/completions", &chat(MODEL, true)).await },
        );
    assert!(eventually(Duration::from_secs(5), || m1.in_flight() == 1).await);
    let changes = live.apply(&file("", &[("b2", &m2, 1)], "")).await;
    assert!(
        changes.contains(&"backend b1 removed (draining)".to_owned()),
        "{changes:?}"
    );
    let admin = |live: &Live| {
        let addr = live.gw.admin_addr();
        async move { get(addr, "/admin/backends").await.json() }
    };
    let j = admin(&live).await;
    assert_eq!(j["backends"].as_array().map(Vec::len), Some(1), "{j}");
    assert_eq!(j["backends"][0]["name"], "b2", "{j}");
    assert_eq!(
        j["draining"],
        serde_json::json!([{"name": "b1", "url": m1.base_url(), "in_flight": 1}]),
        "{j}"
    );
    let s = stream.await.expect("stream task");
    assert!(
        s.text().trim_end().ends_with("data: [DONE]"),
        "the stream finished"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let j = admin(&live).await;
        if j["draining"] == serde_json::json!([]) {
            break;
        }
        assert!(Instant::now() < deadline, "b1 still draining: {j}");
        tokio::time::sleep(ms(20)).await;
    }
}

/// A reload that removes a model's limit lets the requests waiting in that
/// bucket go at once: they used to wait out a bucket no request used any
/// more (about 10 s here), while later requests, under no limit, passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_limit_lets_its_waiters_go() {
    let m1 = mock_named("b1", MockConfig::default().chunks(100_000)).await;
    let queue = "queue_timeout = \"60s\"";
    let live = Live::start(&file(
        &format!("tokens_per_minute = 600\n{queue}"),
        &[("b1", &m1, 1)],
        "",
    ))
    .await;
    let addr = live.gw.addr();
    let body = |n: u32| {
        serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": n})
            .to_string()
    };
    let r = post(addr, "/v1/chat/completions", &body(580)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // About 100 tokens more than are left: a wait of about 10 s.
    let a = tokio::spawn(async move { post(addr, "/v1/chat/completions", &body(100)).await });
    let depth = || {
        metric(
            live.gw.admin_addr(),
            "weir_queue_depth",
            &[("model", MODEL)],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while depth().await != 1.0 {
        assert!(Instant::now() < deadline, "never queued");
        tokio::time::sleep(ms(10)).await;
    }
    let changes = live.apply(&file(queue, &[("b1", &m1, 1)], "")).await;
    assert!(
        changes.contains(&format!("model {MODEL} tokens_per_minute 600 -> none")),
        "{changes:?}"
    );
    let a = tokio::time::timeout(Duration::from_secs(5), a)
        .await
        .expect("the waiter went once its limit was gone")
        .expect("task");
    assert_eq!(a.status, 200, "{}", a.text());
}

/// A probe sent with the old key, in flight when a reload changes the key,
/// opens no window for its 429 either: the key change cancels the old
/// probes (and a 429 landing between the build and that cancel is dropped
/// by the key generation, a window no test can force).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_keys_probe_429_arriving_after_the_key_changed_opens_no_window() {
    let (upstream, arrived) = quota_spent_upstream(ms(500)).await;
    let health = "[health]\nslow_start = \"0s\"\nliveness = { interval = \"1h\", timeout = \"2s\" }\nreadiness = { interval = \"100ms\", timeout = \"2s\", degraded_latency = \"1s\" }\ndeep = { interval = \"1h\", timeout = \"2s\", samples = 1, max_tokens = 1 }\n";
    let old = format!(
        "[[models]]\nname = \"{MODEL}\"\n\n{}{health}",
        backend("b1", &format!("http://{upstream}/v1"), &[MODEL], 1)
    );
    let live = Live::start(&old).await;
    // The first readiness probe, with the old key, is waiting for its 429.
    assert!(
        eventually(Duration::from_secs(5), || arrived.load(Ordering::SeqCst)
            >= 1)
        .await
    );
    let new = old.replace(
        "api_key_env = \"BACKEND_KEY\"",
        "api_key_env = \"ADMIN_TOKEN\"",
    );
    live.apply(&new).await;
    // Past the old probe's 429 (500 ms after it arrived).
    tokio::time::sleep(ms(800)).await;
    let j = get(live.gw.admin_addr(), "/admin/backends").await.json();
    assert_eq!(
        j["backends"][0]["rate_limited_until"],
        serde_json::Value::Null,
        "{j}"
    );
    let r = post(live.gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A stream sent to `addr`, once it runs on `m1` (a slow stream backend,
/// weighted 100 to its peer's 1). A pool starts at a random point of its
/// period, so the first pick is the peer's one turn in 101 (a CI run met
/// it): that stream ends at once, and the next is sent.
async fn stream_running_on(
    addr: std::net::SocketAddr,
    m1: &MockHandle,
) -> tokio::task::JoinHandle<Streamed> {
    for _ in 0..3 {
        let stream = tokio::spawn(async move {
            post_stream(addr, "/v1/chat/completions", &chat(MODEL, true)).await
        });
        let settled = eventually(Duration::from_secs(5), || {
            m1.in_flight() == 1 || stream.is_finished()
        })
        .await;
        if settled && m1.in_flight() == 1 {
            return stream;
        }
    }
    panic!("no stream ran on {}", m1.base_url());
}

/// A backend a reload removed and the next restored while a request still
/// ran on it comes back with its live state: that request counts towards
/// its `max_concurrent` (it used to start again from 0 and take a second
/// request beside the first), and it is not listed as draining as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_restored_while_it_drains_keeps_counting_its_requests() {
    let m1 = mock_named("b1", MockConfig::default().chunks(60).tokens_per_sec(10.0)).await;
    let m2 = mock_named("b2", MockConfig::default()).await;
    let b1 = format!(
        "{}max_concurrent = 1\n\n",
        backend("b1", &m1.base_url(), &[MODEL], 100)
    );
    let b2 = backend("b2", &m2.base_url(), &[MODEL], 1);
    let both = format!("[[models]]\nname = \"{MODEL}\"\n\n{b1}{b2}{QUIET}");
    let live = Live::start(&both).await;
    let addr = live.gw.addr();
    let stream = stream_running_on(addr, &m1).await;
    live.apply(&file("", &[("b2", &m2, 1)], "")).await;
    let changes = live.apply(&both).await;
    assert!(
        changes.contains(&"backend b1 added".to_owned()),
        "{changes:?}"
    );
    let j = get(live.gw.admin_addr(), "/admin/backends").await.json();
    assert_eq!(j["draining"], serde_json::json!([]), "{j}");
    let restored = j["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["name"] == "b1"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(restored["in_flight"], 1, "{j}");
    // b1 (weight 100) is at its one slot: the next request goes to b2.
    let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-weir-backend"), "b2");
    assert_eq!(m1.max_in_flight(), 1);
    let s = stream.await.expect("stream task");
    assert!(s.text().trim_end().ends_with("data: [DONE]"));
}

/// A stream running on `m` (the model's only slot), and a request waiting
/// in the model's queue for that slot.
async fn stream_and_waiter(
    addr: std::net::SocketAddr,
    m: &MockHandle,
) -> (
    tokio::task::JoinHandle<Streamed>,
    tokio::task::JoinHandle<Reply>,
) {
    let stream =
        tokio::spawn(
            async move { post_stream(addr, "/v1/chat/completions", &chat(MODEL, true)).await },
        );
    assert!(eventually(Duration::from_secs(5), || m.in_flight() == 1).await);
    let waiter =
        tokio::spawn(async move { post(addr, "/v1/chat/completions", &chat(MODEL, false)).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metric(addr, "weir_queue_depth", &[("model", MODEL)]).await != 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (stream, waiter)
}

/// A request waiting for the slot of its model's only backend is served
/// when a reload renames that backend (or moves it, or swaps the model's
/// backends): the backend it was routed to drains, and with none the
/// reload kept left in its route, it waits for that one, rather than
/// answering 503 while the new one serves requests made after the reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_a_slot_survives_its_backend_being_renamed() {
    let m = mock_named("b1", MockConfig::default().chunks(100).tokens_per_sec(20.0)).await;
    let named = |name: &str| {
        format!(
            "[[models]]\nname = \"{MODEL}\"\nqueue_timeout = \"15s\"\n\n{}max_concurrent = 1\n\n{QUIET}",
            backend(name, &m.base_url(), &[MODEL], 1)
        )
    };
    let live = Live::start(&named("b1")).await;
    let addr = live.gw.addr();
    let (stream, waiter) = stream_and_waiter(addr, &m).await;
    let changes = live.apply(&named("b9")).await;
    assert!(
        changes.contains(&"backend b9 added".to_owned()),
        "{changes:?}"
    );
    let r = waiter.await.expect("waiter");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-weir-backend"), "b1");
    let s = stream.await.expect("stream");
    assert!(s.text().trim_end().ends_with("data: [DONE]"));
    let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.header("x-weir-backend"), "b9");
}

/// A backend a reload keeps but moves off a model is not a renamed one: a
/// request for that model waiting for its slot is not sent there (it would
/// answer for a model it no longer serves) and gets the 503 of a model with
/// no backend its route knows, which an SDK retries on the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_a_slot_is_not_sent_to_a_backend_moved_off_its_model() {
    let m1 = mock_named("b1", MockConfig::default().chunks(100).tokens_per_sec(20.0)).await;
    let m2 = mock_named("b2", MockConfig::default()).await;
    let models = format!(
        "[[models]]\nname = \"{MODEL}\"\nqueue_timeout = \"15s\"\n\n[[models]]\nname = \"other\"\n\n"
    );
    let before = format!(
        "{models}{}max_concurrent = 1\n\n{QUIET}",
        backend("b1", &m1.base_url(), &[MODEL, "other"], 1)
    );
    let after = format!(
        "{models}{}max_concurrent = 1\n\n{}{QUIET}",
        backend("b1", &m1.base_url(), &["other"], 1),
        backend("b2", &m2.base_url(), &[MODEL], 1)
    );
    let live = Live::start(&before).await;
    let addr = live.gw.addr();
    let (stream, waiter) = stream_and_waiter(addr, &m1).await;
    live.apply(&after).await;
    let r = waiter.await.expect("waiter");
    r.assert_error(503, "service_unavailable", "no_healthy_backend");
    assert!(stream
        .await
        .expect("stream")
        .text()
        .trim_end()
        .ends_with("data: [DONE]"));
    let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.header("x-weir-backend"), "b2");
}

/// A reload that gives a backend another key forgets the 429s its old key
/// drew (a new key is a new quota, and swapping it is the usual fix for
/// one that ran out): it is back in rotation and its probes start again at
/// once, instead of waiting out the old key's Retry-After (up to 1 h).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_backend_key_forgets_the_old_keys_429s() {
    let m1 = mock_named("b1", MockConfig::default().rate_limit(1.0, 600)).await;
    let m2 = mock_named("b2", MockConfig::default()).await;
    let health = "[health]\nslow_start = \"0s\"\nliveness = { interval = \"1h\", timeout = \"1s\" }\nreadiness = { interval = \"100ms\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 4 }\n";
    let old = with_health_path(file("", &[("b1", &m1, 100), ("b2", &m2, 1)], health));
    let live = Live::start(&old).await;
    let b1 = |live: &Live| {
        let addr = live.gw.admin_addr();
        async move {
            let j = get(addr, "/admin/backends").await.json();
            j["backends"]
                .as_array()
                .and_then(|b| b.iter().find(|b| b["name"] == "b1"))
                .cloned()
                .unwrap_or_default()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while b1(&live).await["rate_limited_until"].is_null() {
        assert!(Instant::now() < deadline, "b1's probe 429 holds it out");
        tokio::time::sleep(ms(20)).await;
    }
    // Past the next readiness turn, which finds the pause and sleeps it out.
    tokio::time::sleep(ms(300)).await;
    m1.update(|c| c.rate_limit_rate = 0.0);
    // The first backend in the file is b1.
    let new = old.replacen(
        "api_key_env = \"BACKEND_KEY\"",
        "api_key_env = \"ADMIN_TOKEN\"",
        1,
    );
    let changes = live.apply(&new).await;
    assert!(
        changes
            .iter()
            .any(|c| c.starts_with("backend b1 api_key_env")),
        "{changes:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let b = b1(&live).await;
        if b["rate_limited_until"].is_null() && b["state"] == "healthy" {
            break;
        }
        assert!(Instant::now() < deadline, "b1 still held out: {b}");
        tokio::time::sleep(ms(20)).await;
    }
    // Before any client request: a probe with the new key.
    let new_key_probed = || {
        m1.recorded().iter().any(|r| {
            r.uri == "/v1/chat/completions"
                && r.headers.get("authorization").and_then(|v| v.to_str().ok())
                    == Some("Bearer admin-token-1")
        })
    };
    assert!(
        eventually(Duration::from_secs(5), new_key_probed).await,
        "b1's readiness probes started again, with the new key"
    );
    // b1 takes requests again. The pool starts at a random point of its
    // 101-pick period, so any one pick may be b2's; of three in a row at
    // most one is (weights 100 and 1).
    let mut by_b1 = 0;
    for _ in 0..3 {
        let r = post(live.gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        by_b1 += usize::from(r.header("x-weir-backend") == "b1");
    }
    assert!(by_b1 >= 2, "b1 answered {by_b1} of 3");
}

/// An upstream on 127.0.0.1 that answers a request made with
/// [`BACKEND_KEY`] after `delay` with a 429 and `Retry-After: 3600`, and
/// any other key at once with a chat completion; returns its address and
/// how many requests arrived.
async fn quota_spent_upstream(delay: Duration) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrived = Arc::new(AtomicUsize::new(0));
    let count = arrived.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // One request per connection: head and Content-Length body.
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_lowercase();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let length: usize = text[..end]
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + length {
                        break;
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let old_key = String::from_utf8_lossy(&buf).contains(BACKEND_KEY);
                let reply = if old_key {
                    tokio::time::sleep(delay).await;
                    "HTTP/1.1 429 Too Many Requests\r\nretry-after: 3600\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}".to_owned()
                } else {
                    let body = r#"{"id":"c","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    (addr, arrived)
}

/// A 429 drawn with the old key by a request still running when a reload
/// gave the backend a new key was the old quota's: it opens no window (it
/// used to take the backend out for its `Retry-After`, an hour, under the
/// key that replaced the spent one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_keys_429_arriving_after_the_key_changed_opens_no_window() {
    let (upstream, arrived) = quota_spent_upstream(ms(500)).await;
    let old = format!(
        "[[models]]\nname = \"{MODEL}\"\n\n{}{QUIET}[retry]\nmax_attempts = 1\n",
        backend("b1", &format!("http://{upstream}/v1"), &[MODEL], 1)
    );
    let live = Live::start(&old).await;
    let addr = live.gw.addr();
    let spent =
        tokio::spawn(async move { post(addr, "/v1/chat/completions", &chat(MODEL, false)).await });
    assert!(
        eventually(Duration::from_secs(5), || arrived.load(Ordering::SeqCst)
            == 1)
        .await
    );
    let new = old.replace(
        "api_key_env = \"BACKEND_KEY\"",
        "api_key_env = \"ADMIN_TOKEN\"",
    );
    live.apply(&new).await;
    let spent = spent.await.expect("the old key's request");
    assert_ne!(spent.status, 200, "{}", spent.text());
    let j = get(live.gw.admin_addr(), "/admin/backends").await.json();
    assert_eq!(
        j["backends"][0]["rate_limited_until"],
        serde_json::Value::Null,
        "{j}"
    );
    let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A backend restored while it drains is an added backend for its health:
/// with checks on it waits for its first passing liveness probe, whatever
/// it was before it left (it used to come back with its old health, in
/// rotation, its liveness now failing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_restored_while_it_drains_waits_for_its_first_liveness_probe() {
    let m1 = mock_named("b1", MockConfig::default().chunks(30).tokens_per_sec(10.0)).await;
    let m2 = mock_named("b2", MockConfig::default()).await;
    let b1 = format!(
        "{}health_path = \"/health\"\n\n",
        backend("b1", &m1.base_url(), &[MODEL], 100)
    );
    let b2 = backend("b2", &m2.base_url(), &[MODEL], 1);
    let health = "[health]\nslow_start = \"0s\"\nliveness = { interval = \"1h\", timeout = \"1s\" }\nreadiness = { interval = \"1h\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 1 }\n";
    let both = format!("[[models]]\nname = \"{MODEL}\"\n\n{b1}{b2}{health}");
    let only_b2 = format!("[[models]]\nname = \"{MODEL}\"\n\n{b2}{health}");
    let live = Live::start(&both).await;
    let addr = live.gw.addr();
    let stream = stream_running_on(addr, &m1).await;
    live.apply(&only_b2).await;
    m1.update(|c| c.health_status = Some(503));
    let changes = live.apply(&both).await;
    assert!(
        changes
            .iter()
            .any(|c| c.starts_with("backend b1 waits for its first passing liveness probe")),
        "{changes:?}"
    );
    // b1 (weight 100) is out of rotation: the next request goes to b2.
    let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-weir-backend"), "b2");
    let s = stream.await.expect("stream task");
    assert!(s.text().trim_end().ends_with("data: [DONE]"));
}

/// The samples at /metrics with `label="value"`, counted per name.
async fn series_with(
    addr: std::net::SocketAddr,
    label: &str,
    value: &str,
) -> std::collections::BTreeMap<String, usize> {
    let text = get(addr, "/metrics").await.text();
    let wanted = format!("{label}=\"{value}\"");
    let mut per_name = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some((name, rest)) = line.split_once('{') {
            if rest.contains(&wanted) {
                *per_name.entry(name.to_owned()).or_default() += 1;
            }
        }
    }
    per_name
}

/// A reload that removes a model drops its series from /metrics (and a
/// removed backend's), also while a request for it still runs: that one
/// finishes counting where no scrape sees it. One that adds a model or a
/// backend creates their series at 0; a model that stays keeps its counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_drops_a_removed_models_series_and_creates_an_added_ones() {
    let models = ["m", "slow", "slow2", "slow3"].map(String::from).to_vec();
    let fast = mock::start(MockConfig::default().models(models.clone()))
        .await
        .expect("mock starts");
    let streaming = mock::start(
        MockConfig::default()
            .models(models)
            .chunks(60)
            .tokens_per_sec(10.0),
    )
    .await
    .expect("mock starts");
    let file = |slow: &str, slow_backends: &[(&str, &MockHandle)]| {
        let mut s = format!("[[models]]\nname = \"m\"\n\n[[models]]\nname = \"{slow}\"\n\n");
        s.push_str(&backend("b1", &fast.base_url(), &["m"], 1));
        for (name, mock) in slow_backends {
            s.push_str(&backend(name, &mock.base_url(), &[slow], 1));
        }
        s + QUIET
    };
    let live = Live::start(&file("slow", &[("b2", &streaming)])).await;
    let addr = live.gw.addr();
    for model in ["m", "m", "slow"] {
        let r = post(addr, "/v1/chat/completions", &chat(model, false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let m_ok = [("model", "m"), ("backend", "b1"), ("status", "200")];
    assert_eq!(metric(addr, "weir_requests_total", &m_ok).await, 2.0);
    let stream = tokio::spawn(async move {
        post_stream(addr, "/v1/chat/completions", &chat("slow", true)).await
    });
    assert!(eventually(Duration::from_secs(5), || streaming.in_flight() == 1).await);
    let fresh: std::collections::BTreeMap<String, usize> = [
        ("weir_admitted_total", 1),
        ("weir_backend_effective_weight", 1),
        ("weir_in_flight", 1),
        ("weir_queue_depth", 1),
        ("weir_rate_limited_total", 4),
        ("weir_request_duration_seconds_bucket", 16),
        ("weir_request_duration_seconds_count", 1),
        ("weir_request_duration_seconds_sum", 1),
        ("weir_retries_total", 6),
        ("weir_time_to_first_byte_seconds_bucket", 16),
        ("weir_time_to_first_byte_seconds_count", 1),
        ("weir_time_to_first_byte_seconds_sum", 1),
        ("weir_tokens_total", 2),
    ]
    .into_iter()
    .map(|(name, n)| (name.to_owned(), n))
    .collect();
    let mut slow = fresh.clone();
    slow.insert("weir_requests_total".into(), 1);
    assert_eq!(series_with(addr, "model", "slow").await, slow);
    assert_eq!(
        series_with(addr, "backend", "b2").await,
        [
            ("weir_backend_effective_weight".to_owned(), 1),
            ("weir_requests_total".to_owned(), 1),
            ("weir_upstream_errors_total".to_owned(), 5),
        ]
        .into()
    );

    // `slow` becomes `slow2`, served by b1's mock as the new backend b3;
    // b2 goes, with the stream on `slow` still running there.
    live.apply(&file("slow2", &[("b3", &fast)])).await;
    assert_eq!(streaming.in_flight(), 1, "the stream outlives the reload");
    assert_eq!(series_with(addr, "model", "slow").await, [].into());
    assert_eq!(series_with(addr, "backend", "b2").await, [].into());
    assert_eq!(series_with(addr, "model", "slow2").await, fresh);
    assert_eq!(
        series_with(addr, "backend", "b3").await,
        [
            ("weir_backend_effective_weight".to_owned(), 1),
            ("weir_upstream_errors_total".to_owned(), 5),
        ]
        .into()
    );
    let s = stream.await.expect("stream task");
    assert!(
        s.text().trim_end().ends_with("data: [DONE]"),
        "the stream finished"
    );
    // It counted its answer, tokens and times as it ended: out of sight.
    assert_eq!(series_with(addr, "model", "slow").await, [].into());
    assert_eq!(series_with(addr, "backend", "b2").await, [].into());

    live.apply(&file("slow3", &[("b3", &fast)])).await;
    assert_eq!(series_with(addr, "model", "slow2").await, [].into());
    assert_eq!(series_with(addr, "model", "slow3").await, fresh);
    // A model that stays keeps its counts, and the whole text parses.
    assert_eq!(metric(addr, "weir_requests_total", &m_ok).await, 2.0);
    let text = get(addr, "/metrics").await.text();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("unparsable /metrics ({e}):\n{text}"));
}

#[tokio::test]
async fn bucket_levels_survive_unrelated_and_changed_limits() {
    let m1 = mock_named("b1", MockConfig::default()).await;
    let limited = "requests_per_minute = 1\nburst = 1\nqueue_timeout = \"100ms\"";
    let live = Live::start(&file(limited, &[("b1", &m1, 1)], "")).await;
    let addr = live.gw.addr();
    let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
    r.assert_error(429, "requests", "rate_limit_exceeded");
    let limits_before = live
        .gw
        .snapshot()
        .model(MODEL)
        .expect("model")
        .limits
        .clone();

    // An unrelated change (a weight): same buckets, still limited.
    let changes = live.apply(&file(limited, &[("b1", &m1, 3)], "")).await;
    assert_eq!(changes, ["backend b1 weight 1 -> 3"]);
    let limits_after = live
        .gw
        .snapshot()
        .model(MODEL)
        .expect("model")
        .limits
        .clone();
    assert!(
        Arc::ptr_eq(&limits_before, &limits_after),
        "same ModelLimits"
    );
    let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
    r.assert_error(429, "requests", "rate_limit_exceeded");

    // A changed limit keeps the (empty) level: a fresh bucket would admit.
    let raised = "requests_per_minute = 2\nburst = 2\nqueue_timeout = \"100ms\"";
    let changes = live.apply(&file(raised, &[("b1", &m1, 3)], "")).await;
    assert_eq!(
        changes,
        ["model m requests_per_minute 1 -> 2", "model m burst 1 -> 2"]
    );
    let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
    r.assert_error(429, "requests", "rate_limit_exceeded");
    assert_eq!(
        r.header("x-ratelimit-limit-requests"),
        "2",
        "new limit in force"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_permits_survive_a_reload() {
    // One stream of 20 tokens at 10/s holds the only permit for ~2s.
    let m1 = mock_named("b1", MockConfig::default().chunks(60).tokens_per_sec(10.0)).await;
    let one = "max_concurrent = 1\nqueue_timeout = \"100ms\"";
    let live = Live::start(&file(one, &[("b1", &m1, 1)], "")).await;
    let addr = live.gw.addr();
    let stream =
        tokio::spawn(
            async move { post_stream(addr, "/v1/chat/completions", &chat(MODEL, true)).await },
        );
    assert!(eventually(Duration::from_secs(5), || m1.in_flight() == 1).await);
    live.apply(&file(one, &[("b1", &m1, 2)], "")).await;
    let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
    r.assert_error(429, "requests", "rate_limit_exceeded");
    assert!(r.text().contains("max_concurrent"), "{}", r.text());
    // Raising the limit adds one permit to the same semaphore: one more fits.
    let two = "max_concurrent = 2\nqueue_timeout = \"100ms\"";
    let changes = live.apply(&file(two, &[("b1", &m1, 2)], "")).await;
    assert_eq!(changes, ["model m max_concurrent 1 -> 2"]);
    let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s = stream.await.expect("stream task");
    assert!(
        s.text().trim_end().ends_with("data: [DONE]"),
        "the stream finished"
    );
}

/// `max_concurrent` (or the whole model) removed by one reload and
/// restored by the next: the stream admitted before still holds its
/// permit, so a new request does not fit beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_removed_and_restored_still_counts_running_streams() {
    let m1 = mock_named("b1", MockConfig::default().chunks(60).tokens_per_sec(10.0)).await;
    let one = "max_concurrent = 1\nqueue_timeout = \"100ms\"";
    let limited = file(one, &[("b1", &m1, 1)], "");
    // The same backend, serving only another model: `m` is gone.
    let without_m = format!(
        "[[models]]\nname = \"other\"\n\n{}{QUIET}",
        backend("b1", &m1.base_url(), &["other"], 1)
    );
    for (step, gap) in [
        ("max_concurrent removed", file("", &[("b1", &m1, 1)], "")),
        ("model removed", without_m),
    ] {
        let live = Live::start(&limited).await;
        let addr = live.gw.addr();
        let stream = tokio::spawn(async move {
            post_stream(addr, "/v1/chat/completions", &chat(MODEL, true)).await
        });
        assert!(eventually(Duration::from_secs(5), || m1.in_flight() == 1).await);
        live.apply(&gap).await;
        live.apply(&limited).await;
        let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
        assert_eq!(r.status, 429, "{step}: {}", r.text());
        assert!(r.text().contains("max_concurrent"), "{step}: {}", r.text());
        let s = stream.await.expect("stream task");
        assert!(
            s.text().trim_end().ends_with("data: [DONE]"),
            "{step}: the stream finished"
        );
        // Its permit is back (the last frame can reach the client just
        // before weir lets go of it).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
            if r.status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "{step}: {}", r.text());
        }
    }
}

#[tokio::test]
async fn invalid_files_change_nothing_and_are_reported() {
    let m1 = mock_named("b1", MockConfig::default()).await;
    let good = file("", &[("b1", &m1, 1)], "");
    let live = Live::start(&good).await;
    let path = live.path.display().to_string();
    let good_lines = good.lines().count();
    let cases = [
        (
            "bad TOML",
            format!("{good}[server\n"),
            format!("{path}:{}:", good_lines + 1),
        ),
        (
            "unknown key",
            format!("[server]\nbogus_key = 1\n{good}"),
            format!("{path}:2:1:"),
        ),
        (
            "missing env var",
            good.replace("BACKEND_KEY", "WEIR_NOT_SET_ANYWHERE"),
            "WEIR_NOT_SET_ANYWHERE".to_owned(),
        ),
    ];
    let before = live.gw.snapshot();
    for (i, (what, text, expected)) in cases.iter().enumerate() {
        live.write(text);
        let r = live.reload().await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        let j = r.json();
        assert_eq!(j["result"], "error", "{what}: {j}");
        let errors: Vec<String> = j["errors"]
            .as_array()
            .expect("errors")
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.iter().any(|e| e.contains(expected.as_str())),
            "{what}: want {expected} in {errors:?}"
        );
        // Every error names file:line:column.
        assert!(
            errors.iter().all(|e| e.contains(&format!("{path}:"))),
            "{what}: {errors:?}"
        );
        assert_eq!(live.reload_count("error").await, i as u64 + 1, "{what}");
        assert!(
            Arc::ptr_eq(&before, &live.gw.snapshot()),
            "{what}: snapshot kept"
        );
        let r = post(live.gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
        assert_eq!(r.status, 200, "{what}: still serving: {}", r.text());
        assert_eq!(r.header("x-weir-backend"), "b1");
    }
    // The SIGHUP path (Handle::reload) refuses the same way.
    assert!(live.gw.reload().await.is_err());
    assert_eq!(live.reload_count("error").await, 4);
    assert_eq!(live.reload_count("ok").await, 0);
    // Fixing the file is picked up by the next reload.
    live.apply(&good.replace("weight = 1", "weight = 2")).await;
    assert_eq!(live.reload_count("ok").await, 1);
}

/// A config path that is a FIFO (a named pipe, whose read blocks until
/// something writes to it) is refused at once, and the next reload works.
/// The read used to block, and with it every later reload (they run one
/// at a time), until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_path_that_is_a_fifo_is_refused_and_holds_up_no_later_reload() {
    let m1 = mock_named("b1", MockConfig::default()).await;
    let good = file("", &[("b1", &m1, 1)], "");
    let live = Live::start(&good).await;
    std::fs::remove_file(&live.path).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&live.path)
        .status()
        .unwrap();
    assert!(made.success());
    let r = tokio::time::timeout(Duration::from_secs(10), live.reload())
        .await
        .expect("answered, not blocked on the FIFO");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("not a regular file"), "{}", r.text());
    std::fs::remove_file(&live.path).unwrap();
    live.apply(&good.replace("weight = 1", "weight = 2")).await;
    assert_eq!(live.reload_count("ok").await, 1);
}

/// A reload that shortens a probe interval applies at once: the probes do
/// not first sleep out the (hour-long) interval they were started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_probe_interval_applies_at_once() {
    let m = mock_named("b1", MockConfig::default()).await;
    let health = |liveness: &str| {
        format!(
            "[health]\nunhealthy_threshold = 1\n\
             liveness = {{ interval = \"{liveness}\", timeout = \"200ms\" }}\n\
             readiness = {{ interval = \"1h\" }}\ndeep = {{ interval = \"1h\" }}\n"
        )
    };
    let live = Live::start(&file("", &[("b1", &m, 1)], &health("1h"))).await;
    live.apply(&file("", &[("b1", &m, 1)], &health("100ms")))
        .await;
    m.shutdown();
    m.stopped().await;
    assert!(
        eventually(Duration::from_secs(5), || live.weights()["b1"] == 0.0).await,
        "the dead backend is still in rotation"
    );
}

#[tokio::test]
async fn admin_reload_answers_with_the_changes_and_listen_needs_a_restart() {
    let (m1, m2, m3) = (
        mock_named("b1", MockConfig::default()).await,
        mock_named("b2", MockConfig::default()).await,
        mock_named("b3", MockConfig::default()).await,
    );
    let listen = "[server]\nlisten = \"127.0.0.1:18080\"\n\n";
    let live = Live::start(&format!(
        "{listen}{}",
        file(
            "requests_per_minute = 60",
            &[("b1", &m1, 1), ("b3", &m3, 1)],
            ""
        )
    ))
    .await;
    let r = live.reload().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(
        r.json(),
        serde_json::json!({"result": "ok", "changes": ["no changes"]})
    );

    let moved =
        "[server]\nlisten = \"127.0.0.1:18081\"\nmax_buffered_body_bytes = 2_000_000_000\n\n";
    let changes = live
        .apply(&format!(
            "{moved}{}",
            file(
                "requests_per_minute = 120",
                &[("b1", &m1, 3), ("b2", &m2, 1)],
                ""
            )
        ))
        .await;
    assert_eq!(
        changes,
        [
            "server.listen 127.0.0.1:18080 -> 127.0.0.1:18081 needs a restart (still 127.0.0.1:18080)",
            "server.max_buffered_body_bytes 1073741824 -> 2000000000 needs a restart (still 1073741824)",
            "backend b1 weight 1 -> 3",
            "backend b2 added",
            "backend b3 removed (draining)",
            "model m requests_per_minute 60 -> 120",
        ]
    );
    // Otherwise ignored: the running value stays, and the next reload of
    // the same file still says so.
    assert_eq!(
        live.gw.snapshot().config.server.listen.to_string(),
        "127.0.0.1:18080"
    );
    let r = live.reload().await.json();
    assert_eq!(
        r["changes"],
        serde_json::json!([
            "server.listen 127.0.0.1:18080 -> 127.0.0.1:18081 needs a restart (still 127.0.0.1:18080)",
            "server.max_buffered_body_bytes 1073741824 -> 2000000000 needs a restart (still 1073741824)"
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reloads_are_serialised_and_the_last_file_wins() {
    let m1 = mock_named("b1", MockConfig::default()).await;
    let live = Live::start(&file("", &[("b1", &m1, 1)], "")).await;
    let admin = live.gw.admin_addr();
    let mut reloads = Vec::new();
    for weight in 2..=6 {
        live.write(&file("", &[("b1", &m1, weight)], ""));
        reloads.push(tokio::spawn(async move {
            post(admin, "/admin/reload", "").await
        }));
    }
    for r in reloads {
        let r = r.await.expect("reload task");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(live.weights(), weights_of(&[("b1", 6.0)]));
    assert_eq!(live.reload_count("ok").await, 5);
}

/// Health checks on, liveness every 50ms against `/health`.
fn fast_health() -> &'static str {
    "[health]\nunhealthy_threshold = 1\nhealthy_threshold = 1\nslow_start = \"0s\"\nliveness = { interval = \"50ms\", timeout = \"500ms\" }\nreadiness = { interval = \"1h\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 4 }\n"
}

fn with_health_path(toml: String) -> String {
    toml.replace(
        "api_key_env = \"BACKEND_KEY\"\n",
        "api_key_env = \"BACKEND_KEY\"\nhealth_path = \"/health\"\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_backend_waits_for_its_first_passing_liveness_probe() {
    let m1 = mock_named("b1", MockConfig::default()).await;
    // b2 fails liveness until the test lets it pass.
    let m2 = mock_named("b2", MockConfig::default().health_status(503)).await;
    let live = Live::start(&with_health_path(file(
        "",
        &[("b1", &m1, 1)],
        fast_health(),
    )))
    .await;
    // b2 failed its probe before the swap and stays out; the answer says so.
    let changes = live
        .apply(&with_health_path(file(
            "",
            &[("b1", &m1, 1), ("b2", &m2, 1)],
            fast_health(),
        )))
        .await;
    assert!(
        changes.iter().any(|c| c
            .starts_with("backend b2 waits for its first passing liveness probe (")
            && c.contains("503")),
        "{changes:?}"
    );
    // Give b2's liveness probes time to run (and fail) a few times.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let backends = get(live.gw.admin_addr(), "/admin/backends").await.json();
        let failures = &backends["backends"][1]["tiers"]["liveness"]["consecutive_failures"];
        if failures.as_u64().unwrap_or(0) >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "b2 is probed: {backends}");
        tokio::time::sleep(ms(20)).await;
    }
    assert_eq!(shares(live.gw.addr(), 20).await, counts(&[("b1", 20)]));
    // b2's own readiness and deep probes may fire meanwhile (their first
    // run is spread over the interval); only a client's request counts.
    let client_body = chat(MODEL, false);
    assert!(
        m2.recorded()
            .iter()
            .all(|r| r.body.as_ref() != client_body.as_bytes()),
        "no client request reached b2"
    );
    let backends = get(live.gw.admin_addr(), "/admin/backends").await.json();
    assert_eq!(
        backends["backends"][1]["pending_first_probe"], true,
        "{backends}"
    );
    assert_eq!(
        backends["backends"][1]["tiers"]["liveness"]["state"], "pending",
        "{backends}"
    );
    m2.update(|c| c.health_status = None);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got_b2 = false;
    while Instant::now() < deadline && !got_b2 {
        let r = post(live.gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
        got_b2 = r.header("x-weir-backend") == "b2";
    }
    assert!(got_b2, "b2 entered rotation after passing liveness");
}

/// A backend a reload added enters rotation on its first passing liveness
/// probe with every tier in, and each tier's `weir_backend_up` says so at
/// once: the readiness and deep gauges its failed probes set to 0 while it
/// was pending read 1, not only after those tiers' next probes (an hour
/// away here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tier_of_a_new_backend_reads_up_once_it_is_seen_alive() {
    let m1 = mock_named("b1", MockConfig::default()).await;
    // b2 fails every probe until the test lets it pass.
    let failing = MockConfig::default().health_status(503).status(500);
    let m2 = mock_named("b2", failing).await;
    let health = |every: &str| {
        format!(
            "[health]\nunhealthy_threshold = 1\nhealthy_threshold = 1\nslow_start = \"0s\"\nliveness = {{ interval = \"50ms\", timeout = \"1s\" }}\nreadiness = {{ interval = \"{every}\", timeout = \"1s\", degraded_latency = \"1s\" }}\ndeep = {{ interval = \"{every}\", timeout = \"1s\", samples = 1, max_tokens = 4 }}\n"
        )
    };
    let both =
        |every: &str| with_health_path(file("", &[("b1", &m1, 1), ("b2", &m2, 1)], &health(every)));
    let one = with_health_path(file("", &[("b1", &m1, 1)], &health("50ms")));
    let live = Live::start(&one).await;
    live.apply(&both("50ms")).await;
    let up = |tier| [("backend", "b2"), ("tier", tier)];
    let deadline = Instant::now() + Duration::from_secs(10);
    for tier in ["readiness", "deep"] {
        while metric(live.gw.addr(), "weir_backend_up", &up(tier)).await != 0.0 {
            assert!(Instant::now() < deadline, "b2's {tier} probes fail");
            tokio::time::sleep(ms(20)).await;
        }
    }
    // Their next probes an hour away (after at most one more each).
    live.apply(&both("1h")).await;
    tokio::time::sleep(ms(200)).await;
    let backends = get(live.gw.admin_addr(), "/admin/backends").await.json();
    assert_eq!(
        backends["backends"][1]["pending_first_probe"], true,
        "{backends}"
    );
    m2.update(|c| {
        c.status_override = None;
        c.health_status = None;
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    for tier in ["liveness", "readiness", "deep"] {
        while metric(live.gw.addr(), "weir_backend_up", &up(tier)).await != 1.0 {
            let backends = get(live.gw.admin_addr(), "/admin/backends").await.json();
            assert!(
                Instant::now() < deadline,
                "b2's {tier} gauge once it is seen alive: {backends}"
            );
            tokio::time::sleep(ms(20)).await;
        }
    }
}

/// Health checks on, every tier once an hour: a backend a reload adds can
/// only get in by the probe the reload runs before its swap (or by a
/// pending backend's first regular probe, which runs at once).
/// The change list names each setting of `[server]`, `[health]`,
/// `[outlier]` and `[retry]` that changed, as the file names it, with both
/// values (it used to say only "[health] settings changed").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_list_names_each_setting_that_changed() {
    let m = mock_named("b1", MockConfig::default()).await;
    let live = Live::start(&file("", &[("b1", &m, 1)], hourly_health())).await;
    let tail = format!(
        "{}\n[outlier]\nejection_time = \"45s\"\n\n[retry]\nmax_attempts = 2\nbudget_percent = 50\n",
        hourly_health()
            .replace("unhealthy_threshold = 1", "unhealthy_threshold = 3")
            .replace("interval = \"1h\", timeout = \"2s\"", "interval = \"30s\", timeout = \"2s\"")
    );
    let changed = format!(
        "[server]\nshutdown_grace = \"45s\"\n\n{}",
        file("", &[("b1", &m, 1)], &tail)
    );
    let mut changes = live.apply(&changed).await;
    changes.sort();
    assert_eq!(
        changes,
        [
            "health.liveness.interval 1h -> 30s",
            "health.unhealthy_threshold 1 -> 3",
            "outlier.ejection_time 30s -> 45s",
            "retry.budget_percent 20 -> 50",
            "retry.max_attempts 3 -> 2",
            "server.shutdown_grace 30s -> 45s",
        ]
    );
}

fn hourly_health() -> &'static str {
    "[health]\nunhealthy_threshold = 1\nhealthy_threshold = 1\nslow_start = \"0s\"\nliveness = { interval = \"1h\", timeout = \"2s\" }\nreadiness = { interval = \"1h\" }\ndeep = { interval = \"1h\" }\n"
}

/// Moving the only backend to another URL: the new one is probed before the
/// swap and replaces the old one in it, so requests fired all through the
/// reload never get 503 and `/readyz` never fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moving_the_only_backend_to_a_new_url_drops_no_request() {
    let old = mock_named("b1", MockConfig::default()).await;
    let new = mock_named("b1", MockConfig::default()).await;
    let at = |m: &MockHandle| with_health_path(file("", &[("b1", m, 1)], hourly_health()));
    let live = Live::start(&at(&old)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let addr = live.gw.addr();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = if i == 0 {
                    get(addr, "/readyz").await
                } else {
                    post(addr, "/v1/chat/completions", &chat(MODEL, false)).await
                };
                statuses.push((i, r.status.as_u16(), r.text()));
            }
            statuses
        }));
    }
    // Let the loops run before, during and after the reload.
    let before = old.requests();
    assert!(eventually(Duration::from_secs(5), || old.requests() >= before + 20).await);
    let changes = live.apply(&at(&new)).await;
    assert!(
        changes.iter().all(|c| !c.contains("waits for")),
        "{changes:?}"
    );
    let after = new.requests();
    assert!(eventually(Duration::from_secs(5), || new.requests() >= after + 20).await);
    stop.store(true, Ordering::Relaxed);
    let mut answers = 0;
    for task in tasks {
        for (i, status, body) in task.await.expect("loop") {
            answers += 1;
            assert_eq!(status, 200, "loop {i}: {body}");
        }
    }
    assert!(answers > 40, "{answers}");
}

/// A pending backend's first regular liveness probe runs at once, not after
/// the start-up jitter: here the probes restart (a new interval) while b2
/// waits to be seen alive, and the next hour-long wait is not taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_backend_is_probed_at_once_when_its_probes_start() {
    let m1 = mock_named("b1", MockConfig::default()).await;
    let m2 = mock_named("b2", MockConfig::default().health_status(503)).await;
    let health = |interval: &str| {
        hourly_health().replace("\"1h\", timeout", &format!("\"{interval}\", timeout"))
    };
    let both = |interval: &str| {
        with_health_path(file(
            "",
            &[("b1", &m1, 1), ("b2", &m2, 1)],
            &health(interval),
        ))
    };
    let live = Live::start(&with_health_path(file(
        "",
        &[("b1", &m1, 1)],
        &health("1h"),
    )))
    .await;
    let changes = live.apply(&both("1h")).await;
    assert!(
        changes
            .iter()
            .any(|c| c.starts_with("backend b2 waits for its first passing liveness probe (")),
        "{changes:?}"
    );
    assert_eq!(live.weights().get("b2"), Some(&0.0));
    m2.update(|c| c.health_status = None);
    live.apply(&both("59m")).await;
    assert!(
        wait_for_weight(&live, "b2", 1.0, Duration::from_secs(5)).await,
        "{:?}",
        live.weights()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_health_checks_off_puts_probed_out_backends_back() {
    let m1 = mock_named("b1", MockConfig::default()).await;
    let m2 = mock_named("b2", MockConfig::default().health_status(503)).await;
    let both = |tail: &str| with_health_path(file("", &[("b1", &m1, 1), ("b2", &m2, 1)], tail));
    let live = Live::start(&both(fast_health())).await;
    let out = || live.weights().get("b2").copied() == Some(0.0);
    assert!(
        eventually(Duration::from_secs(5), out).await,
        "b2 probed out"
    );
    let changes = live.apply(&both(QUIET)).await;
    assert_eq!(changes, ["health.enabled true -> false"]);
    // SPEC: without active checks, backends stay in rotation unless ejected.
    assert!(
        eventually(Duration::from_secs(5), || live.weights().get("b2")
            == Some(&1.0))
        .await,
        "{:?}",
        live.weights()
    );
    assert_eq!(
        shares(live.gw.addr(), 10).await,
        counts(&[("b1", 5), ("b2", 5)])
    );
}

/// A config with `watch_config` on, serving MODEL from `m` (as `b1`) at
/// `weight`.
fn watched(m: &MockHandle, weight: u32) -> String {
    format!(
        "[server]\nwatch_config = true\n\n{}",
        file("", &[("b1", m, weight)], "")
    )
}

async fn wait_for_weight(live: &Live, backend: &str, weight: f64, within: Duration) -> bool {
    eventually(within, || live.weights().get(backend) == Some(&weight)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_config_picks_up_an_atomic_rename() {
    let m1 = mock_named("b1", MockConfig::default()).await;
    let watched = |w: u32| watched(&m1, w);
    let live = Live::start(&watched(1)).await;
    // Let the watcher start before the first change.
    tokio::time::sleep(ms(100)).await;
    live.write(&watched(4));
    assert!(
        wait_for_weight(&live, "b1", 4.0, Duration::from_secs(5)).await,
        "{:?}",
        live.weights()
    );
    // A second save is seen too (the watch survived the rename).
    live.write(&watched(7));
    assert!(wait_for_weight(&live, "b1", 7.0, Duration::from_secs(5)).await);
    // An in-place rewrite (truncate + write) as well.
    std::fs::write(&live.path, watched(2)).expect("rewrite");
    assert!(wait_for_weight(&live, "b1", 2.0, Duration::from_secs(5)).await);
    // Debounced: one reload per save, not one per event.
    assert_eq!(live.ok_reloads_once(3).await, 3);
    // Touching the file without changing it reloads nothing.
    let f = std::fs::File::options()
        .append(true)
        .open(&live.path)
        .expect("open");
    f.set_modified(std::time::SystemTime::now()).expect("touch");
    tokio::time::sleep(ms(500)).await;
    assert_eq!(live.reload_count("ok").await, 3);
}

/// A save that lands after the file was read and before the watch began
/// raises no event the watch can see; it is found by comparing the file
/// with what was loaded, and applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_config_applies_a_change_made_before_the_watch_began() {
    let m1 = mock_named("b1", MockConfig::default()).await;
    let watched = |w: u32| watched(&m1, w);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("weir.toml");
    std::fs::write(&path, watched(1)).expect("write config");
    let config = Config::load(&path, &test_env).unwrap_or_else(|e| panic!("{e}"));
    // The save between the read and the start.
    write_atomically(&path, &watched(6));
    let live = Live::start_loaded(dir, path, config).await;
    assert!(
        wait_for_weight(&live, "b1", 6.0, Duration::from_secs(5)).await,
        "{:?}",
        live.weights()
    );
    assert_eq!(live.ok_reloads_once(1).await, 1);
    // Unchanged since: nothing more to reload.
    tokio::time::sleep(ms(500)).await;
    assert_eq!(live.ok_reloads_once(1).await, 1);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_config_follows_a_configmap_symlink_swap() {
    use std::os::unix::fs::symlink;
    let m1 = mock_named("b1", MockConfig::default()).await;
    let watched = |w: u32| watched(&m1, w);
    // The kubelet's layout: weir.toml -> ..data/weir.toml, ..data -> ..v1.
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    std::fs::create_dir(root.join("..v1")).expect("mkdir");
    std::fs::write(root.join("..v1/weir.toml"), watched(1)).expect("write");
    symlink("..v1", root.join("..data")).expect("symlink");
    symlink("..data/weir.toml", root.join("weir.toml")).expect("symlink");
    let live = Live::start_at(dir, root.join("weir.toml")).await;
    tokio::time::sleep(ms(100)).await;
    // The update: a new directory, a new link renamed over ..data, the old
    // directory removed.
    std::fs::create_dir(root.join("..v2")).expect("mkdir");
    std::fs::write(root.join("..v2/weir.toml"), watched(5)).expect("write");
    symlink("..v2", root.join("..data_tmp")).expect("symlink");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
    std::fs::remove_dir_all(root.join("..v1")).expect("rm old");
    assert!(
        wait_for_weight(&live, "b1", 5.0, Duration::from_secs(5)).await,
        "{:?}",
        live.weights()
    );
    assert_eq!(live.ok_reloads_once(1).await, 1);
}

/// A config path through a directory symlink a deploy swaps
/// (`current/weir.toml` with `current -> releases/v1`, then `releases/v2`)
/// is followed: the swap reloads, and so does a later edit in the new
/// release. The watch used to stay on the first release, blind to both.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_config_follows_a_swapped_directory_symlink() {
    use std::os::unix::fs::symlink;
    let m1 = mock_named("b1", MockConfig::default()).await;
    let watched = |w: u32| watched(&m1, w);
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    for (release, weight) in [("v1", 1), ("v2", 5)] {
        std::fs::create_dir_all(root.join("releases").join(release)).expect("mkdir");
        std::fs::write(
            root.join("releases").join(release).join("weir.toml"),
            watched(weight),
        )
        .expect("write");
    }
    symlink("releases/v1", root.join("current")).expect("symlink");
    let live = Live::start_at(dir, root.join("current/weir.toml")).await;
    tokio::time::sleep(ms(100)).await;
    symlink("releases/v2", root.join("current_tmp")).expect("symlink");
    std::fs::rename(root.join("current_tmp"), root.join("current")).expect("swap");
    assert!(
        wait_for_weight(&live, "b1", 5.0, Duration::from_secs(5)).await,
        "{:?}",
        live.weights()
    );
    // Edited in place, in the release now current.
    std::fs::write(root.join("releases/v2/weir.toml"), watched(7)).expect("edit");
    assert!(
        wait_for_weight(&live, "b1", 7.0, Duration::from_secs(5)).await,
        "{:?}",
        live.weights()
    );
    assert_eq!(live.ok_reloads_once(2).await, 2);
}

/// A config path that is a symlink to a file beside it or in a
/// subdirectory (not a ConfigMap's `..data` layout): edits of the target,
/// in place and by rename, are seen.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_config_follows_a_symlink_to_a_file_beside_or_below_it() {
    use std::os::unix::fs::symlink;
    let m1 = mock_named("b1", MockConfig::default()).await;
    let watched = |w: u32| watched(&m1, w);
    for target in ["weir-v2.toml", "sub/real.toml"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        std::fs::create_dir(root.join("sub")).expect("mkdir");
        std::fs::write(root.join(target), watched(1)).expect("write");
        symlink(target, root.join("weir.toml")).expect("symlink");
        let live = Live::start_at(dir, root.join("weir.toml")).await;
        // The first change may be caught as the watch starts (by comparing
        // the file); the next two can only come from the watch's events.
        std::fs::write(root.join(target), watched(3)).expect("rewrite");
        assert!(
            wait_for_weight(&live, "b1", 3.0, Duration::from_secs(5)).await,
            "{target}: {:?}",
            live.weights()
        );
        std::fs::write(root.join(target), watched(4)).expect("rewrite");
        assert!(
            wait_for_weight(&live, "b1", 4.0, Duration::from_secs(5)).await,
            "{target} edited in place: {:?}",
            live.weights()
        );
        write_atomically(&root.join(target), &watched(7));
        assert!(
            wait_for_weight(&live, "b1", 7.0, Duration::from_secs(5)).await,
            "{target} replaced by rename: {:?}",
            live.weights()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_running_binary() {
    let m1 = mock_named("b1", MockConfig::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("weir.toml");
    let text = |w: u32| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n{}",
            file("", &[("b1", &m1, w)], "")
        )
    };
    std::fs::write(&path, text(1)).expect("write");
    let weir = spawn_weir(&path, "info");
    let addr = weir.addr;
    let weight = move || async move {
        get(addr, "/admin/backends").await.json()["backends"][0]["models"][MODEL]
            ["effective_weight"]
            .clone()
    };
    assert_eq!(weight().await, 1);
    write_atomically(&path, &text(9));
    signal(&weir.child, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while weight().await != 9 && Instant::now() < deadline {
        tokio::time::sleep(ms(20)).await;
    }
    assert_eq!(weight().await, 9, "{}", weir.log.lock().expect("log"));
    // The line is written after the snapshot the admin answer came from.
    for text in ["config reloaded", "backend b1 weight 1 -> 9"] {
        assert!(
            log_line(&weir.log, text).await.is_some(),
            "{text}: {}",
            weir.log.lock().expect("log")
        );
    }
    let r = post(weir.addr, "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 200);
}

/// Health checks on, every tier hourly, and a liveness timeout (60 s) far
/// beyond what a test waits: a reload probing a backend that never answers
/// stays stuck for the whole test.
fn patient_health() -> &'static str {
    "[health]\nliveness = { interval = \"1h\", timeout = \"60s\" }\nreadiness = { interval = \"1h\" }\ndeep = { interval = \"1h\" }\n"
}

/// b1 answering, and b2 that never answers (not in the file yet).
async fn answering_and_hanging() -> (MockHandle, MockHandle) {
    (
        mock_named("b1", MockConfig::default()).await,
        mock_named("b2", MockConfig::default().hang(true)).await,
    )
}

/// A shutdown calls off a `POST /admin/reload` stuck probing a new backend:
/// the gateway stops without waiting out the probe's timeout, and the
/// client is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_calls_off_an_admin_reload_stuck_probing() {
    let (m1, m2) = answering_and_hanging().await;
    let live = Live::start(&file("", &[("b1", &m1, 1)], patient_health())).await;
    live.write(&file(
        "",
        &[("b1", &m1, 1), ("b2", &m2, 1)],
        patient_health(),
    ));
    let admin = live.gw.admin_addr();
    let reload = tokio::spawn(async move { post(admin, "/admin/reload", "").await });
    assert!(
        eventually(Duration::from_secs(10), || !m2.recorded().is_empty()).await,
        "the reload probes b2"
    );
    shut_down_without_waiting_for_the_probe(live).await;
    let r = reload.await.expect("the admin client ran");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("shutting down"), "{}", r.text());
}

/// Shuts `live` down: it must stop within 10 s, not wait out the 60 s
/// liveness probe of the reload in progress.
async fn shut_down_without_waiting_for_the_probe(live: Live) {
    let Live { _dir, gw, .. } = live;
    gw.shutdown();
    assert!(
        tokio::time::timeout(Duration::from_secs(10), gw.wait())
            .await
            .is_ok(),
        "the shutdown waited for the reload's probe"
    );
}

/// The same for a reload `watch_config` started: the watcher's task (which
/// the gateway waits for) does not hold a shutdown up for the probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_calls_off_a_watched_reload_stuck_probing() {
    let (m1, m2) = answering_and_hanging().await;
    let watched = |backends: &[(&str, &MockHandle, u32)]| {
        format!(
            "[server]\nwatch_config = true\n\n{}",
            file("", backends, patient_health())
        )
    };
    let live = Live::start(&watched(&[("b1", &m1, 1)])).await;
    live.write(&watched(&[("b1", &m1, 1), ("b2", &m2, 1)]));
    assert!(
        eventually(Duration::from_secs(10), || !m2.recorded().is_empty()).await,
        "the watcher's reload probes b2"
    );
    shut_down_without_waiting_for_the_probe(live).await;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms_f(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Latencies of 4 request loops over `run`, while `during` runs alongside.
async fn latencies_during(
    addr: std::net::SocketAddr,
    run: Duration,
    during: impl std::future::Future<Output = ()>,
) -> Vec<Duration> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        loops.push(tokio::spawn(async move {
            let client = client();
            let mut took = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let r = send(
                    &client,
                    "POST",
                    addr,
                    "/v1/chat/completions",
                    &[("content-type", "application/json")],
                    chat(MODEL, false),
                )
                .await;
                assert_eq!(r.status, 200, "{}", r.text());
                took.push(start.elapsed());
            }
            took
        }));
    }
    let until = tokio::time::sleep(run);
    tokio::join!(until, during);
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for l in loops {
        all.extend(l.await.expect("loop"));
    }
    all.sort();
    all
}

/// Timings for docs/BENCHMARKS.md "Reload": printed, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn figures_reload_latency_and_p99_during_a_reload_storm() {
    let (m1, m2, m3) = (
        mock_named("b1", MockConfig::default().record(false)).await,
        mock_named("b2", MockConfig::default().record(false)).await,
        mock_named("b3", MockConfig::default().record(false)).await,
    );
    let weights = |i: u32| {
        file(
            "requests_per_minute = 1000000\nmax_concurrent = 1000",
            &[
                ("b1", &m1, 1 + i % 5),
                ("b2", &m2, 1),
                ("b3", &m3, 2 + i % 3),
            ],
            "",
        )
    };
    let live = Live::start(&weights(0)).await;
    let admin = live.gw.admin_addr();

    // 1. POST /admin/reload until it returns, and until the new weights are
    //    what the snapshot serves (they are stored before the answer).
    let mut round_trip = Vec::new();
    let mut visible = Vec::new();
    for i in 1..=30u32 {
        live.write(&weights(i));
        let start = Instant::now();
        let r = post(admin, "/admin/reload", "").await;
        round_trip.push(start.elapsed());
        assert_eq!(r.status, 200);
        let want = f64::from(1 + i % 5);
        while live.weights().get("b1") != Some(&want) {
            tokio::task::yield_now().await;
        }
        visible.push(start.elapsed());
    }
    round_trip.sort();
    visible.sort();
    // The same through Handle::reload (what SIGHUP calls), no HTTP.
    let mut direct = Vec::new();
    for i in 31..=60u32 {
        live.write(&weights(i));
        let start = Instant::now();
        live.gw.reload().await.expect("reload");
        direct.push(start.elapsed());
    }
    direct.sort();
    println!(
        "FIGURE reload_admin_roundtrip_ms p50={:.2} p99={:.2} max={:.2} (n=30)",
        ms_f(percentile(&round_trip, 50.0)),
        ms_f(percentile(&round_trip, 99.0)),
        ms_f(round_trip[round_trip.len() - 1]),
    );
    println!(
        "FIGURE reload_new_weights_visible_ms p50={:.2} max={:.2} (n=30)",
        ms_f(percentile(&visible, 50.0)),
        ms_f(visible[visible.len() - 1]),
    );
    println!(
        "FIGURE reload_handle_ms p50={:.2} max={:.2} (n=30; SIGHUP's path)",
        ms_f(percentile(&direct, 50.0)),
        ms_f(direct[direct.len() - 1]),
    );

    // 2. Request latency with no reloads, then during 20 reloads over 2s.
    let addr = live.gw.addr();
    let quiet = latencies_during(addr, Duration::from_secs(2), async {}).await;
    let storm = latencies_during(addr, Duration::from_secs(2), async {
        for i in 0..20u32 {
            live.write(&weights(100 + i));
            let r = post(admin, "/admin/reload", "").await;
            assert_eq!(r.status, 200);
            tokio::time::sleep(ms(100)).await;
        }
    })
    .await;
    for (name, l) in [("no_reloads", &quiet), ("reload_storm_20_in_2s", &storm)] {
        println!(
            "FIGURE request_latency_{name}_ms n={} p50={:.3} p99={:.3} max={:.3}",
            l.len(),
            ms_f(percentile(l, 50.0)),
            ms_f(percentile(l, 99.0)),
            ms_f(l[l.len() - 1]),
        );
    }
}

/// `weir_backend_up` follows the health record a reload keeps: a tier that
/// is down stays 0 when new probe intervals restart the probes, and a
/// backend added by a reload reads 0 for liveness until it is first seen
/// alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_up_follows_the_kept_health_across_a_reload() {
    let m1 = mock_named("b1", MockConfig::default().health_status(503)).await;
    let m2 = mock_named("b2", MockConfig::default().health_status(503)).await;
    let m3 = mock_named("b3", MockConfig::default()).await;
    // b3 must pass the probe the reload runs before its swap: a timeout a
    // loaded machine can miss would leave it pending (b1 and b2 answer
    // 503 at once, so the long timeout costs nothing).
    let health = |liveness: &str| {
        format!(
            "[health]\nunhealthy_threshold = 1\n\
             liveness = {{ interval = \"{liveness}\", timeout = \"5s\" }}\n\
             readiness = {{ interval = \"1h\" }}\ndeep = {{ interval = \"1h\" }}\n"
        )
    };
    let live = Live::start(&with_health_path(file(
        "",
        &[("b1", &m1, 1)],
        &health("50ms"),
    )))
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let labels = [("backend", "b1"), ("tier", "liveness")];
    while metric(live.gw.addr(), "weir_backend_up", &labels).await != 0.0 {
        assert!(Instant::now() < deadline, "b1's liveness never went down");
        tokio::time::sleep(ms(20)).await;
    }
    // Slower probes restart every probe task; none runs again for an hour
    // (b2, waiting to be seen alive, is probed once more at once, and fails).
    live.apply(&with_health_path(file(
        "",
        &[("b1", &m1, 1), ("b2", &m2, 1), ("b3", &m3, 1)],
        &health("1h"),
    )))
    .await;
    // Read from the exposition itself: a missing series would sum to 0.
    let text = get(live.gw.addr(), "/metrics").await.text();
    let series = |backend: &str, tier: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("weir_backend_up{")
                    && l.contains(&format!("backend=\"{backend}\""))
                    && l.contains(&format!("tier=\"{tier}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(
        series("b1", "liveness").as_deref(),
        Some("0"),
        "b1 is still down: {text}"
    );
    assert_eq!(
        series("b2", "liveness").as_deref(),
        Some("0"),
        "b2 was never seen alive: {text}"
    );
    assert_eq!(
        series("b3", "liveness").as_deref(),
        Some("1"),
        "b3 passed its probe before the reload's swap: {text}"
    );
}

/// A reload that lowers `request_timeout` also shortens how long a client
/// connecting afterwards may take no byte of a response: weir drops a
/// client that never reads at the new value, not the one the listener
/// started with.
#[tokio::test]
async fn a_reloaded_request_timeout_applies_to_clients_that_stop_reading() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = mock_named("b1", MockConfig::default().chunks(400_000)).await;
    let slow = "[server]\nrequest_timeout = \"1h\"\nfirst_byte_timeout = \"1s\"\n";
    let fast = "[server]\nrequest_timeout = \"1s\"\nfirst_byte_timeout = \"1s\"\n";
    let live = Live::start(&format!("{slow}{}", file("", &[("b1", &m, 1)], ""))).await;
    let changes = live
        .apply(&format!("{fast}{}", file("", &[("b1", &m, 1)], "")))
        .await;
    assert!(
        changes.iter().any(|c| c.contains("request_timeout")),
        "{changes:?}"
    );
    let mut s = tokio::net::TcpStream::connect(live.gw.addr())
        .await
        .unwrap();
    s.write_all(&raw_chat(&chat(MODEL, true), "connection: close\r\n"))
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let _ = s.read(&mut buf).await.unwrap();
    // Never read again: the stream fills the socket buffers and stalls.
    let released = eventually(Duration::from_secs(20), || {
        m.in_flight() == 0 && m.connections_open() == 0
    })
    .await;
    assert!(
        released,
        "the stream is still held: the old request_timeout (1h) applies"
    );
}

/// A request waiting for a slot does not take a backend a reload gave a new
/// key (which cleared its 429 window): its snapshot would send the old
/// key, which the backend refuses. It waits for the busy one instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_does_not_take_a_rekeyed_backend_with_the_old_key() {
    let model = || MockConfig::default().models(vec![MODEL.into()]);
    // `busy` stays busy long enough (8 s, within the 10 s queue_timeout)
    // for the set-up below to finish on a loaded machine.
    let busy = mock::start(model().latency(Duration::from_secs(8)))
        .await
        .unwrap();
    let limited = mock::start(model().rate_limit(1.0, 600)).await.unwrap();
    let config = |key: &str| {
        format!(
            "[[models]]\nname = \"{MODEL}\"\n\n{}max_concurrent = 1\n\n{}\n[health]\nenabled = false\n\n[retry]\nmax_attempts = 1\n",
            backend("busy", &busy.base_url(), &[MODEL], 1),
            backend("limited", &limited.base_url(), &[MODEL], 1)
                .replace("BACKEND_KEY", key),
        )
    };
    let live = Live::start(&config("BACKEND_KEY")).await;
    let addr = live.gw.addr();
    let chat_later = || {
        tokio::spawn(async move { post(addr, "/v1/chat/completions", &chat(MODEL, false)).await })
    };
    // Occupy `busy` and have `limited` answer one 429, in either order.
    let held = hold_one_and_draw_a_429(addr, MODEL, &busy, &limited).await;
    assert!(
        eventually(Duration::from_secs(5), || live.weights()["limited"] == 0.0).await,
        "{:?}",
        live.weights()
    );
    // From here `limited` would answer anyone: only the key it is sent
    // tells the two outcomes apart.
    limited.update(|c| c.rate_limit_rate = 0.0);
    let waiting = chat_later();
    queued(addr, MODEL, 1).await;
    live.apply(&config("ADMIN_TOKEN")).await;
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-weir-backend"), "busy");
    assert_eq!(held.await.unwrap().status, 200);
    assert_eq!(limited.requests(), 1, "sent again with the old key");
}

/// A request waiting for a saturated backend's slot when a reload raises
/// that backend's `max_concurrent` takes the new slot at once: its own
/// snapshot still has the old cap, but the in-flight count is the same
/// backend's, and it is first in line (it used to wait, in line, until the
/// running request ended, with the new slot free all along).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_takes_the_slot_a_reload_adds_to_its_backend() {
    let m1 = mock_named("b1", MockConfig::default().chunks(60).tokens_per_sec(10.0)).await;
    let capped = |n: u32| {
        format!(
            "[defaults]\nqueue_timeout = \"30s\"\n\n[[models]]\nname = \"{MODEL}\"\n\n{}max_concurrent = {n}\n\n{QUIET}",
            backend("b1", &m1.base_url(), &[MODEL], 1)
        )
    };
    let live = Live::start(&capped(1)).await;
    let addr = live.gw.addr();
    // A 6 s stream holds the only slot; a second request waits in line.
    let stream =
        tokio::spawn(
            async move { post_stream(addr, "/v1/chat/completions", &chat(MODEL, true)).await },
        );
    assert!(eventually(Duration::from_secs(5), || m1.in_flight() == 1).await);
    let waiter = chat_later(addr, MODEL);
    queued(addr, MODEL, 1).await;
    let changes = live.apply(&capped(2)).await;
    assert_eq!(changes, ["backend b1 max_concurrent 1 -> 2"]);
    let r = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("the waiter took the new slot before the stream ended")
        .expect("request task");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!stream.is_finished(), "the stream still holds its slot");
    assert_eq!(m1.max_in_flight(), 2);
    let s = stream.await.expect("stream task");
    assert!(s.text().trim_end().ends_with("data: [DONE]"));
}

/// A backend judged far below its peers on its first model (degraded) is
/// not held to that verdict once a reload makes another model its first:
/// its deep tier no longer measures the model it was judged on, and the
/// verdict would otherwise last until its next deep round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_a_backends_first_model_forgets_its_speed_verdict() {
    let start = |tps: f64| {
        MockConfig::default()
            .models(vec![MODEL.into(), "other".into()])
            .tokens_per_sec(tps)
            .chunks(8)
            .start()
    };
    let mocks = [
        start(400.0).await.unwrap(),
        start(10.0).await.unwrap(),
        start(400.0).await.unwrap(),
    ];
    let config = |slow_models: &[&str]| {
        let mut toml =
            format!("[[models]]\nname = \"{MODEL}\"\n\n[[models]]\nname = \"other\"\n\n");
        for (i, m) in mocks.iter().enumerate() {
            let models: &[&str] = if i == 1 { slow_models } else { &[MODEL] };
            toml.push_str(&backend(&format!("b{i}"), &m.base_url(), models, 100));
            toml.push('\n');
        }
        toml.push_str("[health]\nslow_start = \"0s\"\nliveness = { interval = \"1h\", timeout = \"1s\" }\nreadiness = { interval = \"1h\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"2s\", timeout = \"5s\", samples = 1, max_tokens = 8 }\n");
        toml
    };
    let live = Live::start(&config(&[MODEL, "other"])).await;
    let state = || async {
        let j = get(live.gw.admin_addr(), "/admin/backends").await.json();
        let b1 = j["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["name"] == "b1"));
        b1.map(|b| b["state"].clone()).unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while state().await != "degraded" {
        assert!(Instant::now() < deadline, "b1 never degraded");
        tokio::time::sleep(ms(10)).await;
    }
    // Its next deep round is about 2 s away.
    live.apply(&config(&["other", MODEL])).await;
    assert_eq!(state().await, "healthy");
}
