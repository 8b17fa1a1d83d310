//! Health and balancing through real sockets: active tiers, passive
//! ejection, slow start, deep-tier weights, upstream 429s, retries.
//! Timing-sensitive checks poll with generous deadlines and print what they
//! measured (docs/BENCHMARKS.md quotes these figures).

mod common;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};
use weir::mock::{self, MockConfig, MockHandle};
use weir::snapshot::Member;

const MODEL: &str = "m";

/// Liveness probes every 100 ms, one flipping a backend out or back in
/// (at once, no slow start); readiness and deep tier out of the way after
/// their first round at start (an inference a mock's `in_flight` counts
/// while it runs: [`busy`] counts weir's client requests only).
const LIVENESS_ONLY: &str = "[health]\nunhealthy_threshold = 1\nhealthy_threshold = 1\nslow_start = \"0s\"\nliveness = { interval = \"100ms\", timeout = \"500ms\" }\nreadiness = { interval = \"1h\", timeout = \"60s\", degraded_latency = \"60s\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 4 }\n";

/// A mock serving [`MODEL`].
async fn serving(cfg: MockConfig) -> MockHandle {
    mock::start(cfg.models(vec![MODEL.into()]))
        .await
        .expect("mock starts")
}

/// `before`, then [`MODEL`] on two backends (name, mock, extra lines),
/// each probed at `/health` under [`LIVENESS_ONLY`], with no retries.
fn probed_pair(
    before: &str,
    (a, ma, extra_a): (&str, &MockHandle, &str),
    (b, mb, extra_b): (&str, &MockHandle, &str),
) -> String {
    format!(
        "{before}[[models]]\nname = \"{MODEL}\"\n\n{}{extra_a}health_path = \"/health\"\n\n{}{extra_b}health_path = \"/health\"\n\n{LIVENESS_ONLY}\n[retry]\nmax_attempts = 1\n",
        backend(a, &ma.base_url(), &[MODEL], 1),
        backend(b, &mb.base_url(), &[MODEL], 1),
    )
}

/// `read` of `backend`'s member in the current snapshot's route for
/// [`MODEL`], or `absent` when it has none.
fn member<T>(gw: &weir::Handle, backend: &str, read: impl Fn(&Member) -> T, absent: T) -> T {
    let snapshot = gw.snapshot();
    let route = snapshot.model(MODEL).expect("model routed");
    route
        .members
        .iter()
        .find(|m| m.backend.config.name == backend)
        .map_or(absent, read)
}

/// Client requests weir has in flight to `backend` (probes not counted).
fn busy(gw: &weir::Handle, backend: &str) -> u32 {
    member(gw, backend, |m| m.backend.in_flight(), 0)
}

fn weight(gw: &weir::Handle, backend: &str) -> f64 {
    member(gw, backend, |m| m.effective_weight, 0.0)
}

async fn admin_backend(gw: &weir::Handle, name: &str) -> serde_json::Value {
    let j = get(gw.admin_addr(), "/admin/backends").await.json();
    j["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no backend {name} in {j}"))
}

/// Polls `/admin/backends` until backend `name` satisfies `done`; returns
/// its last entry and whether `done` held within `within`.
async fn admin_until(
    gw: &weir::Handle,
    name: &str,
    within: Duration,
    mut done: impl FnMut(&serde_json::Value) -> bool,
) -> (serde_json::Value, bool) {
    let deadline = Instant::now() + within;
    loop {
        let b = admin_backend(gw, name).await;
        if done(&b) {
            return (b, true);
        }
        if Instant::now() >= deadline {
            return (b, false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn mocks(n: usize, cfg: MockConfig) -> Vec<MockHandle> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(
            mock::start(cfg.clone().models(vec![MODEL.into()]).name(format!("b{i}")))
                .await
                .unwrap(),
        );
    }
    v
}

fn config_for(mocks: &[MockHandle], weights: &[u32], health: &str, extra_backend: &str) -> String {
    let mut toml = format!("[[models]]\nname = \"{MODEL}\"\n\n");
    for (i, (m, w)) in mocks.iter().zip(weights).enumerate() {
        toml.push_str(&backend(&format!("b{i}"), &m.base_url(), &[MODEL], *w));
        toml.push_str(extra_backend);
        toml.push('\n');
    }
    toml.push_str(health);
    toml
}

/// Fast probes for tests: liveness every 100 ms, the slow tiers effectively off.
const FAST_LIVENESS: &str = "[health]\nunhealthy_threshold = 2\nhealthy_threshold = 2\nslow_start = \"0s\"\nliveness = { interval = \"100ms\", timeout = \"100ms\" }\nreadiness = { interval = \"1h\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 4 }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_backend_under_load_shows_no_client_error() {
    let ms = mocks(
        3,
        MockConfig::default()
            .latency(Duration::from_millis(2))
            .record(false),
    )
    .await;
    // A retry budget that never binds: the requests caught on the dead
    // backend before its ejection each get a retry (with SPEC's default of
    // 20%, a few of them at once may find the budget spent and answer 502).
    let health = format!("{FAST_LIVENESS}\n[retry]\nbudget_percent = 100\n");
    let gw = gateway(&config_for(&ms, &[1, 1, 1], &health, "")).await;
    let addr = gw.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(HashMap::<u16, u32>::new()));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, statuses) = (stop.clone(), statuses.clone());
        load.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let r = send(
                    &c,
                    "POST",
                    addr,
                    "/v1/chat/completions",
                    &[("content-type", "application/json")],
                    chat(MODEL, false),
                )
                .await;
                *statuses
                    .lock()
                    .unwrap()
                    .entry(r.status.as_u16())
                    .or_default() += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    ms[1].shutdown();
    ms[1].stopped().await;

    // Passive: `consecutive_failures` (5) refused connections in a row eject it.
    let mut passive = None;
    let mut liveness = None;
    while killed.elapsed() < Duration::from_secs(5) && (passive.is_none() || liveness.is_none()) {
        if passive.is_none() && weight(&gw, "b1") == 0.0 {
            passive = Some(killed.elapsed());
        }
        if liveness.is_none()
            && admin_backend(&gw, "b1").await["tiers"]["liveness"]["state"] == "down"
        {
            liveness = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let statuses = statuses.lock().unwrap().clone();
    let passive = passive.expect("ejected by outlier detection");
    let liveness = liveness.expect("marked down by liveness");
    println!("FIGURE kill-to-out passive={passive:?} liveness={liveness:?} statuses={statuses:?}");
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "client-visible errors: {statuses:?}"
    );
    // Both are a few hundred ms (the FIGURE line above); the bounds only
    // tell "promptly" from "never" or "at some much later event" on a
    // loaded machine: interval × unhealthy_threshold + timeout = 300 ms,
    // jittered by ±10%.
    assert!(
        passive < Duration::from_secs(5),
        "passive ejection took {passive:?}"
    );
    assert!(
        liveness < Duration::from_secs(5),
        "liveness took {liveness:?}"
    );
    assert_eq!(admin_backend(&gw, "b1").await["state"], "ejected");
}

/// SPEC's `[outlier]`: `consecutive_failures` counts connect errors like
/// resets, 5xx and timeouts; a refused connection is one of them and does
/// not eject a backend on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_count_towards_consecutive_failures() {
    let ms = mocks(1, MockConfig::default()).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/v1", dead.local_addr().unwrap());
    drop(dead);
    let toml = format!(
        "[[models]]\nname = \"{MODEL}\"\n\n{}\n{}\n[health]\nenabled = false\n\n[outlier]\nconsecutive_failures = 3\nmax_ejection_percent = 100\n\n[retry]\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\n",
        backend("b0", &ms[0].base_url(), &[MODEL], 1),
        backend("dead", &dead_url, &[MODEL], 1),
    );
    let gw = gateway(&toml).await;
    let addr = gw.addr();
    let mut refused = 0.0;
    for _ in 0..40 {
        let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
        assert_eq!(r.status, 200, "retried on b0: {}", r.text());
        refused = metric(
            addr,
            "weir_upstream_errors_total",
            &[("backend", "dead"), ("kind", "connect")],
        )
        .await;
        let state = admin_backend(&gw, "dead").await["state"].clone();
        if refused < 3.0 {
            assert_eq!(state, "healthy", "ejected after {refused} refusals");
        } else {
            assert_eq!(state, "ejected", "still in rotation after {refused}");
            break;
        }
    }
    assert_eq!(refused, 3.0, "the dead backend was picked too rarely");
}

/// A failed attempt gives its backend slot back before the retry back-off,
/// whatever the failure: a backend with `max_concurrent` is not held
/// saturated by a request that is only waiting to try elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_frees_its_backend_slot_before_the_back_off() {
    let ms = mocks(1, MockConfig::default()).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/v1", dead.local_addr().unwrap());
    drop(dead);
    // `dead` is picked first (weight 1000 against 1, one time in 1,001 the
    // schedule starts on b0 instead); the back-off is up to 1 s.
    let toml = format!(
        "[[models]]\nname = \"{MODEL}\"\n\n{}max_concurrent = 1\n\n{}\n[health]\nenabled = false\n\n[retry]\nbase_delay = \"1s\"\nmax_delay = \"1s\"\n",
        backend("dead", &dead_url, &[MODEL], 1000),
        backend("b0", &ms[0].base_url(), &[MODEL], 1),
    );
    let gw = gateway(&toml).await;
    let addr = gw.addr();
    let request =
        tokio::spawn(async move { post(addr, "/v1/chat/completions", &chat(MODEL, false)).await });
    // The retry is counted just before the back-off starts, after the slot
    // was given back: sampling from then on leaves out the connect attempt
    // itself, which holds the slot for as long as the machine is slow.
    while !request.is_finished()
        && metric(addr, "weir_retries_total", &[("model", MODEL)]).await < 1.0
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut most = 0;
    while !request.is_finished() {
        let n = admin_backend(&gw, "dead").await["in_flight"]
            .as_u64()
            .unwrap_or(0);
        most = most.max(n);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let r = request.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        most, 0,
        "the dead backend's slot was held during the back-off"
    );
}

/// Failures arriving together (both lanes at once) still eject one backend
/// once, and never more of a model's backends than `max_ejection_percent`
/// allows: the share check and the ejection are one step. A guard of that
/// invariant; the race it excludes is too narrow to provoke reliably.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_failures_eject_once_and_within_the_share() {
    let ms = mocks(
        2,
        MockConfig::default()
            .failure_rate(1.0)
            .latency(Duration::from_millis(50)),
    )
    .await;
    let health = "[health]\nenabled = false\n\n[outlier]\nconsecutive_failures = 1\nmax_ejection_percent = 50\n\n[retry]\nmax_attempts = 1\n";
    let gw = gateway(&config_for(&ms, &[1, 1], health, "")).await;
    let statuses = concurrent_chats(gw.addr(), MODEL, 40).await;
    assert!(statuses.iter().all(|&s| s == 502), "{statuses:?}");
    let mut ejected = 0;
    for name in ["b0", "b1"] {
        let b = admin_backend(&gw, name).await;
        if b["state"] == "ejected" {
            ejected += 1;
            assert_eq!(b["ejections"], 1, "{b}");
        }
    }
    assert_eq!(ejected, 1, "50% of two backends is one");
}

/// The share is of the backends that serve the model: a weight-0 one,
/// which never takes a request, does not count. It used to: two failing
/// backends beside a weight-0 one were both ejected (1 of 3 is under 50 %),
/// and the model had none left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_zero_backend_does_not_count_in_the_ejection_share() {
    let ms = mocks(3, MockConfig::default().failure_rate(1.0)).await;
    let health = "[health]\nenabled = false\n\n[outlier]\nconsecutive_failures = 1\nmax_ejection_percent = 50\n\n[retry]\nmax_attempts = 1\n";
    let gw = gateway(&config_for(&ms, &[1, 1, 0], health, "")).await;
    for _ in 0..10 {
        let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
        assert_eq!(r.status, 502, "{}", r.text());
    }
    let mut ejected = 0;
    for name in ["b0", "b1"] {
        if admin_backend(&gw, name).await["state"] == "ejected" {
            ejected += 1;
        }
    }
    assert_eq!(ejected, 1, "50% of the two serving backends is one");
    assert_eq!(ms[2].requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_takes_out_a_backend_that_cannot_infer() {
    let ms = mocks(2, MockConfig::default()).await;
    let health = "[health]\nunhealthy_threshold = 2\nhealthy_threshold = 1\nslow_start = \"0s\"\nliveness = { interval = \"100ms\", timeout = \"500ms\" }\nreadiness = { interval = \"100ms\", timeout = \"500ms\", degraded_latency = \"1s\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 4 }\n";
    let gw = gateway(&config_for(
        &ms,
        &[1, 1],
        health,
        "health_path = \"/health\"\n",
    ))
    .await;
    ms[0].update(|c| c.fail_inference_only = true);
    let start = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || weight(&gw, "b0") == 0.0).await,
        "b0 still in rotation"
    );
    println!("FIGURE readiness-out {:?}", start.elapsed());
    let b0 = admin_backend(&gw, "b0").await;
    assert_eq!(b0["state"], "out", "{b0}");
    assert_eq!(b0["tiers"]["readiness"]["state"], "down", "{b0}");
    assert_eq!(
        b0["tiers"]["liveness"]["state"], "up",
        "/health still passes: {b0}"
    );
    assert_eq!(weight(&gw, "b1"), 1.0);
    // Everything now goes to b1.
    for _ in 0..10 {
        let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-weir-backend"), "b1");
    }
    // /readyz stays 200: the model still has a backend.
    assert_eq!(get(gw.addr(), "/readyz").await.status, 200);
    let metrics = get(gw.addr(), "/metrics").await.text();
    assert!(
        metrics.contains("weir_backend_up{backend=\"b0\",tier=\"readiness\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weir_backend_up{backend=\"b0\",tier=\"liveness\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weir_backend_effective_weight{backend=\"b0\",model=\"m\"} 0"),
        "{metrics}"
    );
}

/// SPEC "Health states": slowness is judged on answers only. A failed
/// readiness probe (not yet `unhealthy_threshold` of them) is no fast
/// answer, so a degraded backend stays degraded at half weight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_readiness_probe_keeps_a_slow_backend_degraded() {
    let ms = mocks(2, MockConfig::default()).await;
    let health = "[health]\nunhealthy_threshold = 1000\nhealthy_threshold = 1\nslow_start = \"0s\"\nliveness = { interval = \"1h\", timeout = \"1s\" }\nreadiness = { interval = \"50ms\", timeout = \"2s\", degraded_latency = \"100ms\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 4 }\n";
    let gw = gateway(&config_for(
        &ms,
        &[100, 100],
        health,
        "health_path = \"/health\"\n",
    ))
    .await;
    ms[0].update(|c| c.latency = Duration::from_millis(300));
    let (b0, slow) = admin_until(&gw, "b0", Duration::from_secs(10), |b| {
        b["state"] == "degraded"
    })
    .await;
    assert!(slow, "a slow readiness answer degrades: {b0}");
    assert!(eventually(Duration::from_secs(5), || weight(&gw, "b0") == 50.0).await);
    // Now readiness fails, fast: no answer at all, which must not read as
    // a fast one.
    ms[0].update(|c| {
        c.latency = Duration::ZERO;
        c.fail_inference_only = true;
    });
    let (b0, failed) = admin_until(&gw, "b0", Duration::from_secs(10), |b| {
        b["tiers"]["readiness"]["consecutive_failures"]
            .as_u64()
            .is_some_and(|n| n >= 2)
    })
    .await;
    assert!(failed, "readiness failures: {b0}");
    assert_eq!(b0["state"], "degraded", "{b0}");
    assert_eq!(b0["tiers"]["readiness"]["state"], "slow", "{b0}");
    assert_eq!(weight(&gw, "b0"), 50.0);
    // The next fast answer restores it.
    ms[0].update(|c| c.fail_inference_only = false);
    let (b0, restored) = admin_until(&gw, "b0", Duration::from_secs(10), |b| {
        b["state"] == "healthy"
    })
    .await;
    assert!(restored, "{b0}");
}

/// SPEC "Balancing": shares follow effective weights, also for small
/// configured weights: of three weight-1 backends, a degraded one (x0.5)
/// gets half the picks of each healthy one (it was rounded back up to 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_weight_1_backend_gets_half_the_picks_of_its_peers() {
    let ms = mocks(3, MockConfig::default()).await;
    // One readiness answer slower than `degraded_latency` degrades a
    // backend until the next: the healthy peers, probed every 50 ms, must
    // never take that long, or the pool below is not 1:2:2: 100 ms is
    // within a loaded machine's scheduling stalls, 500 ms far less so.
    let health = "[health]\nslow_start = \"0s\"\nliveness = { interval = \"1h\", timeout = \"1s\" }\nreadiness = { interval = \"50ms\", timeout = \"5s\", degraded_latency = \"500ms\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 4 }\n";
    let gw = gateway(&config_for(
        &ms,
        &[1, 1, 1],
        health,
        "health_path = \"/health\"\n",
    ))
    .await;
    ms[0].update(|c| c.latency = Duration::from_millis(700));
    assert!(
        eventually(Duration::from_secs(10), || weight(&gw, "b0") == 0.5).await,
        "b0 degraded to half of weight 1: {}",
        weight(&gw, "b0")
    );
    let b0 = admin_backend(&gw, "b0").await;
    assert_eq!(b0["state"], "degraded", "{b0}");
    assert_eq!(b0["models"][MODEL]["effective_weight"], 0.5, "{b0}");
    assert_eq!(
        admin_backend(&gw, "b1").await["models"][MODEL]["effective_weight"],
        1
    );
    let metrics = get(gw.addr(), "/metrics").await.text();
    assert!(
        metrics.contains("weir_backend_effective_weight{backend=\"b0\",model=\"m\"} 0.5\n"),
        "{metrics}"
    );
    // The pool the requests pick from: 1:2:2 over every window of 5.
    let snapshot = gw.snapshot();
    let pool = &snapshot.model(MODEL).expect("routed").pool;
    let mut picks = [0u32; 3];
    for _ in 0..500 {
        let i = pool.pick(|_| true).expect("a backend in rotation");
        picks[i] += 1;
    }
    assert_eq!(picks, [100, 200, 200]);
    // And requests go that way: b0 answers about a fifth of them.
    let mut served = HashMap::<String, u32>::new();
    for _ in 0..30 {
        let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
        assert_eq!(r.status, 200);
        *served
            .entry(r.header("x-weir-backend").to_owned())
            .or_default() += 1;
    }
    let b0 = served.get("b0").copied().unwrap_or(0);
    assert!((3..=9).contains(&b0), "{served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_backend_returns_through_slow_start() {
    let ms = mocks(2, MockConfig::default()).await;
    let health = "[health]\nunhealthy_threshold = 2\nhealthy_threshold = 2\nslow_start = \"2s\"\nliveness = { interval = \"50ms\", timeout = \"200ms\" }\nreadiness = { interval = \"1h\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 4 }\n";
    let gw = gateway(&config_for(
        &ms,
        &[100, 100],
        health,
        "health_path = \"/health\"\n",
    ))
    .await;
    ms[0].update(|c| c.health_status = Some(500));
    assert!(eventually(Duration::from_secs(5), || weight(&gw, "b0") == 0.0).await);
    assert_eq!(get(gw.addr(), "/readyz").await.status, 200);
    ms[0].update(|c| c.health_status = None);
    // Back after healthy_threshold passes, at a fraction of its weight...
    assert!(eventually(Duration::from_secs(5), || weight(&gw, "b0") > 0.0).await);
    let first = weight(&gw, "b0");
    assert!(first <= 50.0, "came back at {first}, not ramping from 10%");
    // ...rising to full weight over slow_start.
    let mut seen = vec![first];
    let deadline = Instant::now() + Duration::from_secs(6);
    while weight(&gw, "b0") < 100.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen.push(weight(&gw, "b0"));
    }
    println!("FIGURE slow-start weights {seen:?}");
    assert_eq!(weight(&gw, "b0"), 100.0, "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "monotonic ramp: {seen:?}"
    );
    assert!(
        seen.iter().any(|&w| w > first && w < 100.0),
        "intermediate steps: {seen:?}"
    );
}

/// A backend that refused the `stream_options` weir adds is asked again
/// once liveness brings it back: a restart may have been an upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_back_from_down_is_asked_for_usage_again() {
    let ms = mocks(1, MockConfig::default().refuse_stream_options(true)).await;
    let gw = gateway(&config_for(
        &ms,
        &[100],
        FAST_LIVENESS,
        "health_path = \"/health\"\n",
    ))
    .await;
    // The client's streams, as the backend got them (probes do not stream).
    let streams = || -> Vec<serde_json::Value> {
        ms[0]
            .recorded()
            .into_iter()
            .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
            .filter(|b| b["stream"] == true)
            .collect()
    };
    let body = chat(MODEL, true);
    let stream = || post_stream(gw.addr(), "/v1/chat/completions", &body);
    assert_eq!(stream().await.status, 200);
    assert_eq!(stream().await.status, 200);
    let sent = streams();
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert!(sent[2].get("stream_options").is_none(), "{:?}", sent[2]);
    // Down, then back, upgraded: the next stream asks for usage again.
    ms[0].update(|c| {
        c.health_status = Some(500);
        c.refuse_stream_options = false;
    });
    assert!(eventually(Duration::from_secs(5), || weight(&gw, "b0") == 0.0).await);
    ms[0].update(|c| c.health_status = None);
    assert!(eventually(Duration::from_secs(5), || weight(&gw, "b0") > 0.0).await);
    let s = stream().await;
    assert_eq!(s.status, 200, "{}", s.text());
    let sent = streams();
    assert_eq!(sent.len(), 4, "{sent:?}");
    assert_eq!(sent[3]["stream_options"]["include_usage"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_tier_shrinks_a_slow_backend_and_degrades_a_saturated_one() {
    let fast = mock::start(
        MockConfig::default()
            .models(vec![MODEL.into()])
            .tokens_per_sec(200.0)
            .chunks(8),
    )
    .await
    .unwrap();
    let slow = mock::start(
        MockConfig::default()
            .models(vec![MODEL.into()])
            .tokens_per_sec(25.0)
            .chunks(8),
    )
    .await
    .unwrap();
    let full = mock::start(
        MockConfig::default()
            .models(vec![MODEL.into()])
            .tokens_per_sec(200.0)
            .chunks(8)
            .requests_waiting(3)
            .kv_cache_usage(0.97),
    )
    .await
    .unwrap();
    let health = "[health]\nslow_start = \"0s\"\nliveness = { interval = \"1h\", timeout = \"1s\" }\nreadiness = { interval = \"1h\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"300ms\", timeout = \"5s\", samples = 2, max_tokens = 8 }\n";
    let ms = [fast, slow, full];
    let gw = gateway(&config_for(
        &ms,
        &[100, 100, 100],
        health,
        "metrics_path = \"/metrics\"\n",
    ))
    .await;
    let settled = eventually(Duration::from_secs(10), || {
        weight(&gw, "b1") < 60.0 && weight(&gw, "b2") <= 50.0 && weight(&gw, "b0") == 100.0
    })
    .await;
    let weights = (weight(&gw, "b0"), weight(&gw, "b1"), weight(&gw, "b2"));
    println!("FIGURE deep-tier weights fast/slow/saturated = {weights:?}");
    assert!(settled, "weights {weights:?}");
    assert_eq!(admin_backend(&gw, "b2").await["state"], "degraded");
    assert_eq!(admin_backend(&gw, "b1").await["state"], "healthy");
}

/// SPEC "Health tiers": "a backend far below its peers … is degraded".
/// `b1` decodes at a fortieth of its peers' speed: degraded, at half
/// weight on top of the throughput factor's floor (100 × 0.5 × 0.1), and
/// healthy again at full weight once it is as fast as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_far_below_its_peers_is_degraded_until_it_catches_up() {
    let start = |tps: f64| {
        mock::start(
            MockConfig::default()
                .models(vec![MODEL.into()])
                .tokens_per_sec(tps)
                .chunks(8),
        )
    };
    let ms = [
        start(400.0).await.unwrap(),
        start(10.0).await.unwrap(),
        start(400.0).await.unwrap(),
    ];
    let health = "[health]\nslow_start = \"0s\"\nliveness = { interval = \"1h\", timeout = \"1s\" }\nreadiness = { interval = \"1h\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"200ms\", timeout = \"5s\", samples = 1, max_tokens = 8 }\n";
    let gw = gateway(&config_for(&ms, &[100, 100, 100], health, "")).await;
    let (b, degraded) = admin_until(&gw, "b1", Duration::from_secs(10), |b| {
        b["state"] == "degraded"
    })
    .await;
    assert!(degraded, "{b}");
    assert!(
        eventually(Duration::from_secs(5), || weight(&gw, "b1") == 5.0).await,
        "weight {}",
        weight(&gw, "b1")
    );
    for peer in ["b0", "b2"] {
        assert_eq!(admin_backend(&gw, peer).await["state"], "healthy");
    }
    ms[1].update(|c| *c = c.clone().tokens_per_sec(400.0));
    let (b, healthy) = admin_until(&gw, "b1", Duration::from_secs(10), |b| {
        b["state"] == "healthy"
    })
    .await;
    assert!(healthy, "{b}");
    assert!(
        eventually(Duration::from_secs(5), || weight(&gw, "b1") == 100.0).await,
        "weight {}",
        weight(&gw, "b1")
    );
}

/// The deep tier samples a backend on its first model; a pool compares
/// only figures measured on its own model. `d` serves a small model (fast)
/// and the big one and is measured on the small one; `e` serves only the
/// big one and is measured there: on the big model neither is known to be
/// slower than the other, so both keep their full weight (comparing `d`'s
/// small-model speed with `e`'s gave `e` a fifth of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_is_compared_only_on_the_model_it_was_measured_on() {
    let start = |models: &[&str], tps: f64| {
        mock::start(
            MockConfig::default()
                .models(models.iter().map(|m| m.to_string()).collect())
                .tokens_per_sec(tps)
                .chunks(8),
        )
    };
    let d = start(&["small", "big"], 250.0).await.unwrap();
    let e = start(&["big"], 25.0).await.unwrap();
    let health = "[health]\nslow_start = \"0s\"\nliveness = { interval = \"1h\", timeout = \"1s\" }\nreadiness = { interval = \"1h\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"200ms\", timeout = \"5s\", samples = 1, max_tokens = 8 }\n";
    let toml = format!(
        "[[models]]\nname = \"small\"\n\n[[models]]\nname = \"big\"\n\n{}{}{health}",
        backend("d", &d.base_url(), &["small", "big"], 100),
        backend("e", &e.base_url(), &["big"], 100),
    );
    let gw = gateway(&toml).await;
    // Two measured rounds each: the rebuild the first one asked for has
    // run by the time the second is recorded.
    for name in ["d", "e"] {
        let (b, measured) = admin_until(&gw, name, Duration::from_secs(10), |b| {
            b["tokens_per_sec"].is_number()
                && b["tiers"]["deep"]["consecutive_passes"].as_u64() >= Some(2)
        })
        .await;
        assert!(measured, "{b}");
    }
    let big = |name: &str| {
        let snapshot = gw.snapshot();
        let route = snapshot.model("big").expect("big routed");
        route
            .members
            .iter()
            .find(|m| m.backend.config.name == name)
            .map_or(0.0, |m| m.effective_weight)
    };
    let tps = |b: serde_json::Value| b["tokens_per_sec"].as_f64().unwrap_or(0.0);
    let (d_tps, e_tps) = (
        tps(admin_backend(&gw, "d").await),
        tps(admin_backend(&gw, "e").await),
    );
    assert!(d_tps > 2.0 * e_tps, "d {d_tps} tok/s, e {e_tps} tok/s");
    assert_eq!((big("d"), big("e")), (100.0, 100.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_sends_traffic_elsewhere_until_retry_after() {
    let ms = mocks(2, MockConfig::default()).await;
    ms[0].update(|c| {
        c.rate_limit_rate = 1.0;
        c.retry_after = 1;
    });
    let health = "[health]\nenabled = false\nslow_start = \"0s\"\n";
    let gw = gateway(&config_for(&ms, &[1, 1], health, "")).await;
    let mut backends = Vec::new();
    for _ in 0..6 {
        let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        backends.push(r.header("x-weir-backend").to_owned());
    }
    assert!(backends.iter().all(|b| b == "b1"), "{backends:?}");
    assert_eq!(ms[0].requests(), 1, "b0 was left alone after its 429");
    ms[0].update(|c| c.rate_limit_rate = 0.0);
    assert!(
        eventually(Duration::from_secs(3), || weight(&gw, "b0") == 1.0).await,
        "b0 returns after Retry-After"
    );
    let mut back = false;
    for _ in 0..6 {
        back |= post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false))
            .await
            .header("x-weir-backend")
            == "b0";
    }
    assert!(back);
}

/// When a model's every attempt ends in a backend's 429 (here its only
/// backend, with one attempt allowed), the 502 carries a `Retry-After`
/// until that backend's window ends, as the 503 of the requests after it
/// does, so an SDK retrying the 502 waits for it; so does the 504 when
/// attempts are left but the window ends after `request_timeout`; a 502
/// from a 5xx has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_502_or_504_after_a_backend_429_says_when_to_come_back() {
    let ms = mocks(1, MockConfig::default()).await;
    ms[0].update(|c| {
        c.rate_limit_rate = 1.0;
        c.retry_after = 30;
    });
    let rest = "[health]\nenabled = false\n\n[retry]\nmax_attempts = 1\n";
    let gw = gateway(&config_for(&ms, &[1], rest, "")).await;
    let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let wait: u64 = r.header("retry-after").parse().unwrap_or(0);
    assert!((29..=30).contains(&wait), "Retry-After {wait}");
    let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(!r.header("retry-after").is_empty());

    // Attempts left, but the backend's window ends after request_timeout:
    // the 504 that says so carries the same Retry-After.
    let ms = mocks(1, MockConfig::default()).await;
    ms[0].update(|c| {
        c.rate_limit_rate = 1.0;
        c.retry_after = 30;
    });
    let timed = "[server]\nrequest_timeout = \"5s\"\n\n[health]\nenabled = false\n\n[retry]\nmax_attempts = 3\n";
    let gw = gateway(&config_for(&ms, &[1], timed, "")).await;
    let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.text().contains("too little"), "{}", r.text());
    let wait: u64 = r.header("retry-after").parse().unwrap_or(0);
    assert!((29..=30).contains(&wait), "Retry-After {wait}");

    let ms = mocks(1, MockConfig::default()).await;
    ms[0].update(|c| c.failure_rate = 1.0);
    let gw = gateway(&config_for(&ms, &[1], rest, "")).await;
    let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.header("retry-after"), "");
}

/// Readiness probes every 50 ms, the other tiers effectively off, and
/// `unhealthy_threshold` 2.
const FAST_READINESS: &str = "[health]\nunhealthy_threshold = 2\nhealthy_threshold = 1\nslow_start = \"0s\"\nliveness = { interval = \"1h\", timeout = \"1s\" }\nreadiness = { interval = \"50ms\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 4 }\n";

/// Readiness probes `mock` received (non-streamed completions; deep
/// samples stream), of the last `mock::RECORDED_CAPACITY` requests.
fn readiness_probes(mock: &MockHandle) -> usize {
    mock.recorded()
        .iter()
        .filter(|r| r.uri == "/v1/chat/completions")
        .filter(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).is_ok_and(|b| b["stream"] == false)
        })
        .count()
}

/// The backend's `rate_limited_until` is more than `ahead` away.
fn rate_limited_beyond(b: &serde_json::Value, ahead: Duration) -> bool {
    b["rate_limited_until"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .is_some_and(|t| t > std::time::SystemTime::now() + ahead)
}

/// A readiness probe answered 429 (a hosted backend that is busy, not
/// broken) is no failure: however many come, the tier stays up with no
/// failure counted and the backend is neither taken out by readiness nor
/// ejected; probing goes on once its Retry-After passes; and it is held
/// out of rotation for its Retry-After as after a client's 429, which
/// `/admin/backends` and the metrics show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readiness_probe_answered_429_is_no_failure_and_holds_for_its_retry_after() {
    let ms = mocks(2, MockConfig::default()).await;
    // `Retry-After: 1` first: held for a second each time, then probed
    // again, more times than unhealthy_threshold.
    ms[0].update(|c| {
        c.rate_limit_rate = 1.0;
        c.retry_after = 1;
    });
    let gw = gateway(&config_for(
        &ms,
        &[1, 1],
        FAST_READINESS,
        "health_path = \"/health\"\n",
    ))
    .await;
    let (b0, held) = admin_until(&gw, "b0", Duration::from_secs(10), |b| {
        !b["rate_limited_until"].is_null()
    })
    .await;
    assert!(held, "{b0}");
    assert!(
        eventually(Duration::from_secs(15), || readiness_probes(&ms[0]) > 4).await,
        "b0 probed again after each Retry-After, more than unhealthy_threshold times"
    );
    let b0 = admin_backend(&gw, "b0").await;
    assert_eq!(b0["tiers"]["readiness"]["state"], "up", "{b0}");
    assert_eq!(b0["tiers"]["readiness"]["consecutive_failures"], 0, "{b0}");
    assert!(
        b0["tiers"]["readiness"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("429")),
        "{b0}"
    );
    assert!(b0["ejected_until"].is_null(), "{b0}");

    // `Retry-After: 30`: out of rotation for it, not down, not ejected.
    ms[0].update(|c| c.retry_after = 30);
    let (b0, held) = admin_until(&gw, "b0", Duration::from_secs(10), |b| {
        rate_limited_beyond(b, Duration::from_secs(10))
    })
    .await;
    assert!(held, "rate_limited_until about 30 s ahead: {b0}");
    assert_eq!(b0["state"], "out", "{b0}");
    assert_eq!(b0["tiers"]["readiness"]["state"], "up", "{b0}");
    assert_eq!(b0["tiers"]["readiness"]["consecutive_failures"], 0, "{b0}");
    assert!(b0["ejected_until"].is_null(), "{b0}");
    assert_eq!(b0["ejections"], 0, "{b0}");
    assert!(
        eventually(Duration::from_secs(5), || weight(&gw, "b0") == 0.0).await,
        "b0 out of rotation for its Retry-After"
    );
    let up = |tier| [("backend", "b0"), ("tier", tier)];
    assert_eq!(
        metric(gw.addr(), "weir_backend_up", &up("readiness")).await,
        1.0
    );
    assert_eq!(
        metric(gw.addr(), "weir_backend_up", &up("liveness")).await,
        1.0
    );
    let b0_weight = [("backend", "b0"), ("model", MODEL)];
    assert_eq!(
        metric(gw.addr(), "weir_backend_effective_weight", &b0_weight).await,
        0.0
    );
    for _ in 0..6 {
        let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-weir-backend"), "b1");
    }
}

/// A backend that answered a probe 429 asked for a pause: no probe goes to
/// it before its Retry-After passes (they would only add to its 429s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_answered_a_probe_429_is_not_probed_before_its_retry_after() {
    let ms = mocks(1, MockConfig::default().rate_limit(1.0, 30)).await;
    let gw = gateway(&config_for(
        &ms,
        &[1],
        FAST_READINESS,
        "health_path = \"/health\"\n",
    ))
    .await;
    let (b0, held) = admin_until(&gw, "b0", Duration::from_secs(10), |b| {
        !b["rate_limited_until"].is_null()
    })
    .await;
    assert!(held, "{b0}");
    let probed = readiness_probes(&ms[0]);
    assert_eq!(probed, 1, "one probe, then the pause");
    // Twenty readiness intervals, all within the 30 s asked for.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        readiness_probes(&ms[0]),
        probed,
        "probed during Retry-After"
    );
    assert_eq!(
        admin_backend(&gw, "b0").await["tiers"]["readiness"]["state"],
        "up"
    );
}

/// A client's 429 holds the backend out of rotation for its Retry-After,
/// but its probes go on: only a probe's own 429 pauses its tier, or steady
/// traffic drawing 429s would keep the probes quiet for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_429_does_not_pause_the_probes() {
    let ms = mocks(1, MockConfig::default()).await;
    let health = format!("{FAST_LIVENESS}\n[retry]\nmax_attempts = 1\n");
    let gw = gateway(&config_for(
        &ms,
        &[1],
        &health,
        "health_path = \"/health\"\n",
    ))
    .await;
    let liveness = |m: &MockHandle| m.recorded().iter().filter(|r| r.uri == "/health").count();
    assert!(eventually(Duration::from_secs(5), || liveness(&ms[0]) >= 1).await);
    // The mock's 429s are for completions only: `/health` stays 200.
    ms[0].update(|c| {
        c.rate_limit_rate = 1.0;
        c.retry_after = 30;
    });
    let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let b0 = admin_backend(&gw, "b0").await;
    assert!(!b0["rate_limited_until"].is_null(), "{b0}");
    let before = liveness(&ms[0]);
    // Liveness probes every 100 ms, all inside the 30 s the 429 asked for.
    assert!(
        eventually(Duration::from_secs(5), || liveness(&ms[0]) >= before + 3).await,
        "liveness stopped probing after a client's 429: {} then {}",
        before,
        liveness(&ms[0])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_try_each_backend_once_then_answer_502() {
    let ms = mocks(3, MockConfig::default().failure_rate(1.0)).await;
    let health = "[health]\nenabled = false\n\n[outlier]\nconsecutive_failures = 100\n\n[retry]\nmax_attempts = 3\nbase_delay = \"1ms\"\nmax_delay = \"5ms\"\n";
    let gw = gateway(&config_for(&ms, &[1, 1, 1], health, "")).await;
    let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    // SPEC: 502 `bad_gateway` when every attempt failed, a 5xx answer too.
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "bad_gateway", "{}", r.text());
    assert!(r.text().contains("answered 500"), "{}", r.text());
    let seen: Vec<u64> = ms.iter().map(MockHandle::requests).collect();
    assert_eq!(seen, vec![1, 1, 1], "never the same backend twice");
    let metrics = get(gw.addr(), "/metrics").await.text();
    assert!(
        metrics.contains("weir_retries_total{model=\"m\",reason=\"status_5xx\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_backend_is_retried_after_a_transient_failure() {
    let ms = mocks(1, MockConfig::default()).await;
    let health = "[health]\nenabled = false\n\n[retry]\nmax_attempts = 3\nbase_delay = \"1ms\"\nmax_delay = \"5ms\"\n";
    let gw = gateway(&config_for(&ms, &[1], health, "")).await;
    ms[0].update(|c| c.failure_rate = 1.0);
    let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(ms[0].requests(), 3, "all attempts went to the only backend");
}

/// A backend's 429 is a failed attempt too: with no retry left the client
/// gets weir's 502, not the backend's 429 (SPEC: every attempt failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_no_retry_left_is_a_502() {
    let ms = mocks(1, MockConfig::default().rate_limit(1.0, 1)).await;
    let health = "[health]\nenabled = false\n\n[retry]\nmax_attempts = 1\n";
    let gw = gateway(&config_for(&ms, &[1], health, "")).await;
    let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "upstream_error", "{}", r.text());
    assert!(r.text().contains("answered 429"), "{}", r.text());
    assert_eq!(ms[0].requests(), 1);
}

/// A 503's `Retry-After` paces the retry that goes back to the same
/// backend, as a 429's does (SPEC "Retries"; RFC 9110 §10.2.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_retry_after_paces_the_retry() {
    let ms = mocks(1, MockConfig::default().rate_limit(0.0, 1).status(503)).await;
    let health = "[health]\nenabled = false\n\n[outlier]\nconsecutive_failures = 1000\n\n[retry]\nmax_attempts = 2\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\n";
    let gw = gateway(&config_for(&ms, &[1], health, "")).await;
    let started = tokio::time::Instant::now();
    let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(ms[0].requests(), 2, "retried on the only backend");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the retry came {:?} after the first attempt, inside its Retry-After: 1",
        started.elapsed()
    );
}

/// A retry that finds every backend busy ends with the last failure at
/// once: it neither queues for a slot (this one waited for the other
/// request to finish, then answered 200 seconds later) nor, with a full
/// queue, turns into a 429 for a request already admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_finds_every_backend_busy_ends_with_the_last_failure() {
    for max_queue in ["", "max_queue = 0\n"] {
        let ms = mocks(1, MockConfig::default().rate_limit(0.0, 5).status(503)).await;
        let health = "[health]\nenabled = false\n\n[outlier]\nconsecutive_failures = 1000\n\n[retry]\nmax_attempts = 2\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\n";
        let toml = config_for(&ms, &[1], health, "max_concurrent = 1\n").replacen(
            "\n\n",
            &format!("\n{max_queue}\n"),
            1,
        );
        let gw = gateway(&toml).await;
        let addr = gw.addr();
        // X: a 503 asking for 5 s, so its retry waits that long: time for
        // Y, below, to take the slot first on a loaded machine.
        let x =
            tokio::spawn(
                async move { post(addr, "/v1/chat/completions", &chat(MODEL, false)).await },
            );
        assert!(eventually(Duration::from_secs(5), || ms[0].requests() == 1).await);
        // The mock counts X as its request arrives, before weir has read the
        // 503 and freed X's slot: Y sent now could find the slot X's (a 429
        // with `max_queue = 0`), and X's retry the slot free.
        let (b0, freed) =
            admin_until(&gw, "b0", Duration::from_secs(5), |b| b["in_flight"] == 0).await;
        assert!(freed, "X's slot is still taken: {b0}");
        // Y takes the only slot meanwhile, for longer than X's pause.
        ms[0].update(|c| {
            c.status_override = None;
            c.latency = Duration::from_secs(8);
        });
        let y =
            tokio::spawn(
                async move { post(addr, "/v1/chat/completions", &chat(MODEL, false)).await },
            );
        assert!(eventually(Duration::from_secs(5), || ms[0].in_flight() == 1).await);
        let x = x.await.expect("x");
        assert_eq!(x.status, 502, "{max_queue:?}: {}", x.text());
        assert!(x.text().contains("503"), "{}", x.text());
        assert_eq!(ms[0].requests(), 2, "X's retry never went out");
        assert_eq!(y.await.expect("y").status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_retries() {
    let ms = mocks(
        2,
        MockConfig::default()
            .failure_rate(1.0)
            .latency(Duration::from_millis(200)),
    )
    .await;
    let health = "[health]\nenabled = false\n\n[outlier]\nconsecutive_failures = 1000\n\n[retry]\nmax_attempts = 2\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\nbudget_percent = 20\n";
    let gw = gateway(&config_for(&ms, &[1, 1], health, "")).await;
    let addr = gw.addr();
    let statuses = concurrent_chats(addr, MODEL, 20).await;
    assert!(statuses.iter().all(|&s| s == 502), "{statuses:?}");
    let total: u64 = ms.iter().map(MockHandle::requests).sum();
    let retries = total - 20;
    println!("FIGURE retry-budget 20 failing requests -> {retries} retries");
    // 20% of 20 in flight: about 4 retries at once, far from one per request.
    assert!(retries <= 8, "{retries} retries despite the budget");
    assert!(retries >= 1, "a budget still allows some retries");
}

/// `budget_percent = 0` turns retries off: Envoy's floor of 3 concurrent
/// retries applies only to a budget the operator left some room in (SPEC:
/// retries never exceed this share).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_budget_of_zero_turns_retries_off() {
    let ms = mocks(2, MockConfig::default().failure_rate(1.0)).await;
    for (budget, sent) in [(0, 1), (1, 2)] {
        let health = format!(
            "[health]\nenabled = false\n\n[outlier]\nconsecutive_failures = 1000\n\n[retry]\nmax_attempts = 2\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\nbudget_percent = {budget}\n"
        );
        let gw = gateway(&config_for(&ms, &[1, 1], &health, "")).await;
        let before: u64 = ms.iter().map(MockHandle::requests).sum();
        let answer = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
        assert_eq!(answer.status, 502, "budget {budget}: {}", answer.text());
        let after: u64 = ms.iter().map(MockHandle::requests).sum();
        assert_eq!(after - before, sent, "budget {budget}: attempts sent");
    }
}

/// The retry budget is a share of every request in flight, streams still
/// running included (SPEC `budget_percent`): 40 open streams and 10 failing
/// requests allow 10 retries at once, where the 10 alone would allow 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_in_flight_count_in_the_retry_budget_base() {
    let ms = mocks(
        2,
        MockConfig::default()
            .failure_rate(1.0)
            .latency(Duration::from_millis(300)),
    )
    .await;
    let slow = mock::start(
        MockConfig::default()
            .models(vec!["slow".into()])
            .chunks(1000)
            .tokens_per_sec(10.0),
    )
    .await
    .unwrap();
    let toml = format!(
        "[[models]]\nname = \"slow\"\n\n{}\n{}",
        backend("slow", &slow.base_url(), &["slow"], 1),
        config_for(
            &ms,
            &[1, 1],
            "[health]\nenabled = false\n\n[outlier]\nconsecutive_failures = 1000\n\n[retry]\nmax_attempts = 2\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\nbudget_percent = 20\n",
            "",
        ),
    );
    let gw = gateway(&toml).await;
    let addr = gw.addr();
    let body = chat("slow", true);
    let streams: Vec<_> = (0..40)
        .map(|_| {
            let request = raw_chat(&body, "");
            tokio::spawn(async move { raw(addr, request, Duration::from_secs(30)).await })
        })
        .collect();
    // Every stream admitted and answered, so each counts as in flight.
    assert!(
        eventually(Duration::from_secs(10), || slow.requests() >= 40).await,
        "streams started: {}",
        slow.requests()
    );
    let statuses = concurrent_chats(addr, MODEL, 10).await;
    assert!(statuses.iter().all(|&s| s == 502), "{statuses:?}");
    let retries = ms.iter().map(MockHandle::requests).sum::<u64>() - 10;
    assert_eq!(retries, 10, "20% of 50 in flight is 10 retries at once");
    for s in streams {
        s.abort();
    }
}

/// OpenAI's answer to `max_tokens` on a reasoning model, byte for byte.
const UNSUPPORTED_MAX_TOKENS: &str = r#"{"error":{"message":"Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.","type":"invalid_request_error","param":"max_tokens","code":"unsupported_parameter"}}"#;

/// A backend that refuses `max_tokens` as OpenAI's reasoning models do and
/// answers anything else (`/health`, a completion with
/// `max_completion_tokens`) with a small completion. Returns its address
/// and every request body it read.
async fn reasoning_model_upstream() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    scripted_upstream(|body, _| {
        if body.contains("\"max_tokens\"") {
            reply("400 Bad Request", "", UNSUPPORTED_MAX_TOKENS)
        } else {
            reply("200 OK", "", PONG)
        }
    })
    .await
}

/// A gateway with one model served by one backend, `name` at `addr` (a
/// hand-made upstream), then `tail` (e.g. its `[health]`).
async fn one_backend_gateway(
    name: &str,
    addr: std::net::SocketAddr,
    model: &str,
    tail: &str,
) -> weir::Handle {
    let toml = format!(
        "[[models]]\nname = \"{model}\"\n\n{}{tail}",
        backend(name, &format!("http://{addr}/v1"), &[model], 1)
    );
    gateway(&toml).await
}

/// A small non-streamed completion.
const PONG: &str = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"pong"},"finish_reason":"length"}]}"#;

/// A whole HTTP/1.1 answer: status line, `extra` header lines (each ending
/// in CRLF), a JSON content type and `body` with its length.
fn reply(status: &str, extra: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A keep-alive HTTP/1.1 backend on 127.0.0.1 that answers each request
/// (head and `Content-Length` body) with `answer(body, n)`, `n` counting
/// the requests from 1. Returns its address and every request body it read.
async fn scripted_upstream(
    answer: impl Fn(&str, usize) -> String + Send + Sync + 'static,
) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = upstream.accept().await else {
                return;
            };
            let seen = seen.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // One request: its head, then content-length bytes.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + length {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..head_end + length).skip(head_end).collect();
                    let body = String::from_utf8_lossy(&body).into_owned();
                    let n = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(body.clone());
                        seen.len()
                    };
                    if s.write_all(answer(&body, n).as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, bodies)
}

/// A backend serving only an embedding model refuses chat (OpenAI's 404
/// "not a chat model"): its readiness probe sends an embedding instead and
/// passes, and the deep tier, with no tokens to time, does not fail it.
/// It used to be taken out for good, with `/readyz` 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embeddings_only_backend_is_probed_with_an_embedding() {
    const NOT_CHAT: &str = r#"{"error":{"message":"This is not a chat model and thus not supported in the v1/chat/completions endpoint.","type":"invalid_request_error","param":"model","code":null}}"#;
    const EMBEDDING: &str = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2]}],"model":"emb","usage":{"prompt_tokens":1,"total_tokens":1}}"#;
    let (addr, bodies) = scripted_upstream(|body, _| {
        if body.contains("\"input\"") {
            reply("200 OK", "", EMBEDDING)
        } else if body.contains("\"messages\"") {
            reply("404 Not Found", "", NOT_CHAT)
        } else {
            reply("200 OK", "", "{}")
        }
    })
    .await;
    let health = "[health]\nunhealthy_threshold = 1\nhealthy_threshold = 1\nslow_start = \"0s\"\nliveness = { interval = \"100ms\", timeout = \"1s\" }\nreadiness = { interval = \"100ms\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"100ms\", timeout = \"1s\", samples = 1, max_tokens = 4 }\n";
    let gw = one_backend_gateway("e", addr, "emb", health).await;
    // Several rounds of every tier.
    let rounds = || {
        bodies
            .lock()
            .unwrap()
            .iter()
            .filter(|b| b.contains("\"input\""))
            .count()
    };
    assert!(
        eventually(Duration::from_secs(5), || rounds() >= 3).await,
        "readiness probes send embeddings"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = admin_backend(&gw, "e").await;
    assert_eq!(e["state"], "healthy", "{e}");
    assert_eq!(e["tiers"]["readiness"]["state"], "up", "{e}");
    assert_ne!(e["tiers"]["deep"]["state"], "down", "{e}");
    assert_eq!(get(gw.addr(), "/readyz").await.status, 200);
    let r = post(
        gw.addr(),
        "/v1/embeddings",
        &serde_json::json!({"model": "emb", "input": "hi"}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The embedding fallback is no standing verdict: a readiness round whose
/// embedding fails asks for chat again, so a backend that starts answering
/// chat (an engine restarted with a chat model, a reload that puts a chat
/// model first) is judged on chat. It used to send embeddings for good,
/// and was taken out once they were refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_answers_chat_again_is_probed_with_chat_again() {
    const NOT_CHAT: &str = r#"{"error":{"message":"This is not a chat model.","type":"invalid_request_error","param":"model","code":null}}"#;
    const EMBEDDING: &str = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1]}],"model":"m","usage":{"prompt_tokens":1,"total_tokens":1}}"#;
    let chats = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let switch = chats.clone();
    let (addr, bodies) = scripted_upstream(move |body, _| {
        let chats = switch.load(std::sync::atomic::Ordering::SeqCst);
        match (
            body.contains("\"messages\""),
            body.contains("\"input\""),
            chats,
        ) {
            (true, _, true) => reply("200 OK", "", PONG),
            (true, _, false) => reply("404 Not Found", "", NOT_CHAT),
            (_, true, false) => reply("200 OK", "", EMBEDDING),
            (_, true, true) => reply("404 Not Found", "", "{}"),
            _ => reply("200 OK", "", "{}"),
        }
    })
    .await;
    let health = "[health]\nunhealthy_threshold = 1\nhealthy_threshold = 1\nslow_start = \"0s\"\nliveness = { interval = \"100ms\", timeout = \"1s\" }\nreadiness = { interval = \"100ms\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 4 }\n";
    let gw = one_backend_gateway("e", addr, MODEL, health).await;
    let count = |what: &str| {
        let bodies = bodies.lock().unwrap();
        bodies.iter().filter(|b| b.contains(what)).count()
    };
    assert!(
        eventually(Duration::from_secs(5), || count("\"input\"") >= 2).await,
        "readiness falls back to embeddings"
    );
    let e = admin_backend(&gw, "e").await;
    assert_eq!(e["tiers"]["readiness"]["state"], "up", "{e}");
    chats.store(true, std::sync::atomic::Ordering::SeqCst);
    let refused = count("\"messages\"");
    // Three more chat probes, all answered: readiness stays up.
    assert!(
        eventually(Duration::from_secs(5), || count("\"messages\"")
            >= refused + 3)
        .await,
        "readiness asks for chat again"
    );
    let e = admin_backend(&gw, "e").await;
    assert_eq!(e["tiers"]["readiness"]["state"], "up", "{e}");
    assert_eq!(e["state"], "healthy", "{e}");
}

/// A deep round whose first sample measured and whose second drew a 429
/// with a Retry-After pauses the deep tier all the same: no deep sample
/// goes out before it ends (the round used to be judged on its first
/// sample alone, and the deep tier went on probing every interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_round_with_a_429_after_a_good_sample_pauses_the_deep_tier() {
    let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = streams.clone();
    let (addr, _) = scripted_upstream(move |body, _| {
        if !body.contains("\"stream\":true") {
            return reply("200 OK", "", PONG);
        }
        // Odd streams answer, even ones are rate limited.
        if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 2 == 1 {
            return reply("429 Too Many Requests", "retry-after: 30\r\n", "{}");
        }
        let chunk = r#"data: {"choices":[{"index":0,"delta":{"content":"x"}}]}"#;
        let sse = format!("{chunk}\n\n{chunk}\n\n{chunk}\n\ndata: [DONE]\n\n");
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{sse}",
            sse.len()
        )
    })
    .await;
    let health = "[health]\nslow_start = \"0s\"\nliveness = { interval = \"1h\", timeout = \"1s\" }\nreadiness = { interval = \"1h\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"100ms\", timeout = \"1s\", samples = 2, max_tokens = 4 }\n";
    let gw = one_backend_gateway("d", addr, MODEL, health).await;
    let (d, held) = admin_until(&gw, "d", Duration::from_secs(10), |b| {
        !b["rate_limited_until"].is_null()
    })
    .await;
    assert!(held, "{d}");
    let sampled = streams.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(sampled, 2, "one round: a good sample, then the 429");
    // Ten deep intervals, all inside the 30 s asked for.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        streams.load(std::sync::atomic::Ordering::SeqCst),
        sampled,
        "deep samples went out during the Retry-After"
    );
}

/// Readiness probes of a backend that refuses `max_tokens` for
/// `max_completion_tokens` (OpenAI's reasoning models, Azure OpenAI) are
/// sent again at once with `max_completion_tokens` and pass, instead of
/// failing until the backend is out; later probes send that field first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_switch_to_max_completion_tokens_when_max_tokens_is_refused() {
    let (addr, bodies) = reasoning_model_upstream().await;
    let health = "[health]\nunhealthy_threshold = 1\nhealthy_threshold = 1\nslow_start = \"0s\"\nliveness = { interval = \"1h\", timeout = \"1s\" }\nreadiness = { interval = \"100ms\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 4 }\n";
    let gw = one_backend_gateway("o", addr, MODEL, health).await;
    let (b, passed) = admin_until(&gw, "o", Duration::from_secs(10), |b| {
        b["tiers"]["readiness"]["consecutive_passes"].as_u64() >= Some(3)
    })
    .await;
    assert!(passed, "{b}");
    assert_eq!(b["state"], "healthy", "{b}");
    assert_eq!(b["tiers"]["readiness"]["consecutive_failures"], 0, "{b}");
    let completions: Vec<String> = bodies
        .lock()
        .unwrap()
        .iter()
        .filter(|b| b.contains("messages"))
        .cloned()
        .collect();
    // The first probe's max_tokens was refused; every later one (the retry
    // included) asked for max_completion_tokens.
    assert!(
        completions[0].contains("\"max_tokens\":1"),
        "{completions:?}"
    );
    assert!(completions.len() >= 4, "{completions:?}");
    for body in &completions[1..] {
        assert!(body.contains("\"max_completion_tokens\":1"), "{body}");
        assert!(!body.contains("\"max_tokens\""), "{body}");
    }
    assert_eq!(weight(&gw, "o"), 1.0);
}

/// A backend that answers every request with a chunked SSE response holding
/// `body`, then, 100 ms later, drops the connection without the last chunk.
/// Returns its address and how many connections it accepted.
async fn breaking_sse_upstream(body: &'static str) -> (std::net::SocketAddr, Arc<AtomicU32>) {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    let accepted = Arc::new(AtomicU32::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = upstream.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Abrupt end: no terminating chunk.
                drop(s);
            });
        }
    });
    (addr, accepted)
}

/// A stream that breaks in the middle of an event never leaves half an event
/// at the client, where the error event would be read as part of it; with
/// the client's own `include_usage` (nothing stripped) as without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_breaks_mid_event_ends_with_a_clean_error_event() {
    let (up_addr, _) = breaking_sse_upstream(
        "data: {\"object\":\"chat.completion.chunk\",\"choices\":[]}\n\n\
         data: {\"object\":\"chat.comp",
    )
    .await;
    let gw = one_backend_gateway("broken", up_addr, MODEL, "[health]\nenabled = false\n").await;
    for body in [
        chat(MODEL, true),
        format!(
            "{{\"model\":\"{MODEL}\",\"stream\":true,\"stream_options\":{{\"include_usage\":true}},\"messages\":[]}}"
        ),
    ] {
        let s = post_stream(gw.addr(), "/v1/chat/completions", &body).await;
        assert_eq!(s.status, 200);
        let text = s.text();
        assert!(text.contains("chat.completion.chunk"), "{text}");
        assert!(!text.contains("\"chat.comp\n") && !text.contains("chat.compevent"), "{text}");
        // Every event is whole: each data line is JSON, the last one the error.
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        for event in &events {
            let data = event.lines().find_map(|l| l.strip_prefix("data: "));
            let data = data.unwrap_or_else(|| panic!("no data in {event:?}: {text}"));
            assert!(serde_json::from_str::<serde_json::Value>(data).is_ok(), "{text}");
        }
        assert!(events.last().is_some_and(|e| e.starts_with("event: error")), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_breaks_after_its_first_byte_ends_with_an_error_and_is_not_replayed() {
    let (up_addr, accepted) = breaking_sse_upstream(
        "data: {\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n",
    )
    .await;
    let other = mock::start(MockConfig::default().models(vec![MODEL.into()]))
        .await
        .unwrap();
    let toml = format!(
        "[[models]]\nname = \"{MODEL}\"\n\n{}{}[health]\nenabled = false\n\n[outlier]\nconsecutive_failures = 1\n",
        backend("broken", &format!("http://{up_addr}/v1"), &[MODEL], 1000),
        backend("other", &other.base_url(), &[MODEL], 1)
    );
    let gw = gateway(&toml).await;
    // Each pool starts at a random point of its period, so one request in
    // 1,001 goes to `other` first: take the first that `broken` answers.
    let mut answered_by_other = 0;
    let s = loop {
        let s = post_stream(gw.addr(), "/v1/chat/completions", &chat(MODEL, true)).await;
        assert_eq!(s.status, 200);
        if s.headers["x-weir-backend"] == "broken" {
            break s;
        }
        answered_by_other += 1;
        assert!(answered_by_other < 5, "broken (weight 1000) never picked");
    };
    let text = s.text();
    assert!(text.contains("\"content\":\"hi\""), "{text}");
    assert!(
        text.contains("event: error"),
        "the stream ends with an SSE error event: {text}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "not replayed");
    assert_eq!(
        other.requests(),
        answered_by_other,
        "not replayed elsewhere either"
    );
    // The broken body counted towards outlier detection (threshold 1).
    assert!(
        eventually(Duration::from_secs(5), || weight(&gw, "broken") == 0.0).await,
        "a mid-stream failure counts as a failure"
    );
}

/// A `metrics_path` that fails (here a 404) does not fail the deep tier,
/// but it is not silent either: `/admin/backends` shows it as the deep
/// tier's `metrics_error`, and the log warns once when it starts failing,
/// not every round; a reload to a readable path clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_metrics_path_is_shown_and_logged_once() {
    let ms = mocks(1, MockConfig::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("weir.toml");
    let health = "[health]\nslow_start = \"0s\"\nliveness = { interval = \"1h\", timeout = \"1s\" }\nreadiness = { interval = \"1h\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"50ms\", timeout = \"2s\", samples = 1, max_tokens = 4 }\n";
    let text = |metrics_path: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n{}",
            config_for(
                &ms,
                &[1],
                health,
                &format!("metrics_path = \"{metrics_path}\"\n")
            )
        )
    };
    std::fs::write(&path, text("/no-such-metrics")).expect("write");
    let weir = spawn_weir(&path, "info");
    let deep = |addr| async move {
        get(addr, "/admin/backends").await.json()["backends"][0]["tiers"]["deep"].clone()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tier = deep(weir.addr).await;
    while tier["consecutive_passes"].as_u64().unwrap_or(0) < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        tier = deep(weir.addr).await;
    }
    assert_eq!(tier["state"], "up", "the samples pass: {tier}");
    let error = tier["metrics_error"].as_str().unwrap_or_default();
    assert!(error.contains("404"), "{tier}");
    let log = weir.log.lock().expect("log").clone();
    assert_eq!(
        log.matches("engine metrics unreadable").count(),
        1,
        "one warning for five failing rounds: {log}"
    );
    assert!(log.contains("/no-such-metrics"), "{log}");

    std::fs::write(&path, text("/metrics")).expect("write");
    assert_eq!(post(weir.addr, "/admin/reload", "").await.status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !deep(weir.addr).await["metrics_error"].is_null() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(deep(weir.addr).await["metrics_error"].is_null());
    let recovered = || {
        weir.log
            .lock()
            .expect("log")
            .contains("engine metrics no longer failing")
    };
    assert!(
        eventually(Duration::from_secs(5), recovered).await,
        "{}",
        weir.log.lock().expect("log")
    );
}

/// A deep round whose samples fail at once reports how long it took, not
/// the deep timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_round_that_fails_at_once_reports_its_real_latency() {
    let ms = mocks(1, MockConfig::default().fail_inference_only(true)).await;
    let health = "[health]\nslow_start = \"0s\"\nliveness = { interval = \"1h\", timeout = \"1s\" }\nreadiness = { interval = \"1h\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"50ms\", timeout = \"60s\", samples = 1, max_tokens = 4 }\n";
    let gw = gateway(&config_for(&ms, &[1], health, "")).await;
    let (b0, failed) = admin_until(&gw, "b0", Duration::from_secs(10), |b| {
        b["tiers"]["deep"]["consecutive_failures"].as_u64() >= Some(1)
    })
    .await;
    assert!(failed, "{b0}");
    let deep = &b0["tiers"]["deep"];
    assert!(
        deep["last_error"].as_str().unwrap_or("").contains("500"),
        "{deep}"
    );
    let latency = deep["last_latency_ms"].as_f64().unwrap_or(f64::NAN);
    assert!(
        latency < 30_000.0,
        "a 500 at once, not the 60 s timeout: {deep}"
    );
}

/// With `slow_start = "0s"` an ejected backend returns at full weight, so
/// `/admin/backends` shows no `slow_start_until` (it repeated
/// `ejected_until`); with a slow start, none either while it is ejected:
/// its ramp has not begun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_slow_start_until_without_slow_start() {
    for slow_start in ["0s", "30s"] {
        no_slow_start_until_while_ejected(slow_start).await;
    }
}

async fn no_slow_start_until_while_ejected(slow_start: &str) {
    let ms = mocks(2, MockConfig::default()).await;
    ms[0].update(|c| c.failure_rate = 1.0);
    let settings = format!("[health]\nenabled = false\nslow_start = \"{slow_start}\"\n\n[outlier]\nconsecutive_failures = 1\nejection_time = \"1h\"\n");
    let gw = gateway(&config_for(&ms, &[1, 1], &settings, "")).await;
    // Requests until one lands on b0 and ejects it (retried on b1).
    let mut b0 = admin_backend(&gw, "b0").await;
    for _ in 0..10 {
        let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        b0 = admin_backend(&gw, "b0").await;
        if b0["state"] == "ejected" {
            break;
        }
    }
    assert_eq!(b0["state"], "ejected", "{b0}");
    assert!(b0["ejected_until"].is_string(), "{b0}");
    assert!(b0["slow_start_until"].is_null(), "{b0}");
}

/// A request waiting for a slot, every backend of its snapshot busy or
/// held out, takes a backend the clock brings back meanwhile (its 429
/// window over) rather than wait for a busy one to finish: the waiter is
/// woken when a new snapshot is published and looks there for its
/// model's backends back in rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_a_slot_takes_a_backend_that_comes_back() {
    waiting_request_takes_a_backend_back(false).await;
}

/// The same during a shutdown's grace: the clock still brings the backend
/// back (the supervisor runs until the listeners end), and the waiting
/// request is served by it instead of cut with a 503 at the grace's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_coming_back_during_the_shutdown_grace_serves_the_waiters() {
    waiting_request_takes_a_backend_back(true).await;
}

async fn waiting_request_takes_a_backend_back(shut_down: bool) {
    let busy = serving(MockConfig::default().latency(Duration::from_secs(8))).await;
    let limited = serving(MockConfig::default().rate_limit(1.0, 3)).await;
    let toml = format!(
        "[server]\nshutdown_grace = \"6s\"\n\n[[models]]\nname = \"{MODEL}\"\n\n{}max_concurrent = 1\n\n{}\n[health]\nenabled = false\n\n[retry]\nmax_attempts = 1\n",
        backend("busy", &busy.base_url(), &[MODEL], 1),
        backend("limited", &limited.base_url(), &[MODEL], 1),
    );
    let gw = gateway(&toml).await;
    let addr = gw.addr();
    // Occupy `busy` and have `limited` answer one 429, in either order.
    let held = hold_one_and_draw_a_429(addr, MODEL, &busy, &limited).await;
    // Seen at weight 0 within its 3 s window, unless the machine stalled
    // through all of it; then the request below takes `limited` at once
    // and the test proves less, but does not fail falsely.
    if !eventually(Duration::from_secs(3), || weight(&gw, "limited") == 0.0).await {
        eprintln!("the 429 window passed unseen: the wait is not exercised");
    }
    limited.update(|c| c.rate_limit_rate = 0.0);
    // Both out of reach in this request's snapshot: it waits, and takes
    // `limited` when its window ends (3 s), not `busy` when its slot
    // frees (8 s), nor a 503 when the grace (6 s) ends.
    let waiting = chat_later(addr, MODEL);
    if shut_down {
        // Queued first: once the shutdown starts, nothing new is accepted.
        let deadline = Instant::now() + Duration::from_secs(5);
        while metric(addr, "weir_queue_depth", &[("model", MODEL)]).await != 1.0
            && !waiting.is_finished()
        {
            assert!(Instant::now() < deadline, "never queued");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        gw.shutdown();
    }
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-weir-backend"), "limited");
    if shut_down {
        // `busy` outlasts the grace: cut then; and weir stops.
        let _ = held.await;
        tokio::time::timeout(Duration::from_secs(30), gw.wait())
            .await
            .expect("weir stops once its grace is over");
    } else {
        assert_eq!(held.await.unwrap().status, 200);
    }
}

/// A request waiting for a slot does not take a backend that went out
/// while it waited: the slot a 429 answer frees is in that backend's
/// Retry-After window (SPEC), though the request's snapshot, older than
/// the 429, still has it in rotation. It waits for the busy one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_does_not_take_a_backend_that_went_out_meanwhile() {
    let busy = serving(MockConfig::default().latency(Duration::from_secs(5))).await;
    // Answers its one request 429 after 2 s, which frees its slot.
    let refusing = serving(
        MockConfig::default()
            .latency(Duration::from_secs(2))
            .rate_limit(1.0, 600),
    )
    .await;
    let toml = format!(
        "[[models]]\nname = \"{MODEL}\"\n\n{}max_concurrent = 1\n\n{}max_concurrent = 1\n\n[health]\nenabled = false\n\n[retry]\nmax_attempts = 1\n",
        backend("busy", &busy.base_url(), &[MODEL], 1),
        backend("refusing", &refusing.base_url(), &[MODEL], 1),
    );
    let gw = gateway(&toml).await;
    let addr = gw.addr();
    // One request on each backend (each takes the other once one is full).
    let (first, second) = (chat_later(addr, MODEL), chat_later(addr, MODEL));
    assert!(
        eventually(Duration::from_secs(5), || busy.in_flight() == 1
            && refusing.in_flight() == 1)
        .await
    );
    let waiting = chat_later(addr, MODEL);
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-weir-backend"), "busy");
    assert_eq!(refusing.requests(), 1, "sent into its Retry-After window");
    let mut statuses = [first.await.unwrap().status, second.await.unwrap().status];
    statuses.sort();
    assert_eq!(statuses, [200, 502]);
}

/// A request waiting for a slot leaves out a backend a newer snapshot has
/// taken out by its probes: it is not sent there when that backend's slot
/// frees, and with every backend out it gets the 503 a new request would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_leaves_out_a_backend_its_probes_took_out() {
    let busy = serving(MockConfig::default().latency(Duration::from_secs(5))).await;
    let limited = serving(MockConfig::default().rate_limit(1.0, 600)).await;
    let toml = probed_pair(
        "",
        ("busy", &busy, "max_concurrent = 1\n"),
        ("limited", &limited, ""),
    );
    let gw = gateway(&toml).await;
    let addr = gw.addr();
    // Occupy `busy` and have `limited` answer one 429 (a 10-minute window).
    let held = hold_one_and_draw_a_429(addr, MODEL, &busy, &limited).await;
    assert!(eventually(Duration::from_secs(5), || weight(&gw, "limited") == 0.0).await);
    let waiting = chat_later(addr, MODEL);
    queued(addr, MODEL, 1).await;
    // `busy` fails its liveness probe: out, with its request still running.
    busy.update(|c| c.health_status = Some(503));
    let r = waiting.await.unwrap();
    r.assert_error(503, "service_unavailable", "no_healthy_backend");
    assert_eq!(busy.requests(), 1, "sent to a backend out of rotation");
    let _ = held.await;
}

/// A backend back in rotation while still busy (out when the request
/// began to wait) wakes the waiting request when its slot frees: the
/// request is in line for it too. (It was not: the freed slot woke nobody,
/// and the request slept towards its deadline beside an idle backend.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_takes_a_slot_freed_on_a_backend_back_in_rotation() {
    let short = serving(MockConfig::default().latency(Duration::from_secs(5))).await;
    let long = serving(MockConfig::default().latency(Duration::from_secs(30))).await;
    let toml = probed_pair(
        "[defaults]\nqueue_timeout = \"60s\"\n\n",
        ("short", &short, "max_concurrent = 1\n"),
        ("long", &long, "max_concurrent = 1\n"),
    );
    let gw = gateway(&toml).await;
    let addr = gw.addr();
    // One request on each backend (one slot each).
    let held = [chat_later(addr, MODEL), chat_later(addr, MODEL)];
    assert!(
        eventually(Duration::from_secs(5), || busy(&gw, "short") == 1
            && busy(&gw, "long") == 1)
        .await
    );
    // `short` fails its liveness probe: out, its request still running.
    short.update(|c| c.health_status = Some(503));
    assert!(eventually(Duration::from_secs(5), || weight(&gw, "short") == 0.0).await);
    let waiting = chat_later(addr, MODEL);
    queued(addr, MODEL, 1).await;
    // Back in rotation, still busy; its request ends 5 s after it began.
    short.update(|c| c.health_status = None);
    assert!(eventually(Duration::from_secs(5), || weight(&gw, "short") > 0.0).await);
    assert_eq!(busy(&gw, "short"), 1, "still busy when it came back");
    // About 10 s (5 s waiting, 5 s answering); `long` frees its slot at 30 s.
    let r = tokio::time::timeout(Duration::from_secs(25), waiting)
        .await
        .expect("woken when `short` freed its slot, not at the deadline")
        .expect("request task");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-weir-backend"), "short");
    assert_eq!(busy(&gw, "long"), 1, "`long` still busy: not where it went");
    for h in held {
        h.abort();
    }
}
