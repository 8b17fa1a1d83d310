//! `[cluster]` end to end: real `weir` processes sharing one real
//! `redis-server` (issue #10). Each test starts its own Redis on a free
//! loopback port and skips, saying why, only when `redis-server` cannot be
//! started (CI installs it). The assertions count: what the replicas
//! admitted together against what the bucket formulas allow, and what Redis
//! says was consumed against what the clients saw; timing only bounds the
//! windows the counts are taken over.

mod common;
// The unit tests' throw-away Redis; here for its port and start-up checks.
#[path = "../src/cluster/test_redis.rs"]
#[allow(dead_code)]
mod test_redis;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::*;
use test_redis::{free_port, Failed};
use tokio::time::Instant;
use weir::mock::{self, MockConfig};

const MODEL: &str = "m";

/// A `redis-server` on a fixed loopback port that can be killed and started
/// again on the same port (the outage test).
struct Redis {
    port: u16,
    /// A second port that speaks only TLS, with the certificate in
    /// tests/fixtures/redis-tls (the `rediss://` test).
    tls_port: Option<u16>,
    child: Option<Child>,
}

/// tests/fixtures/redis-tls/NAME: a test CA and a server certificate it
/// signed for 127.0.0.1, valid until 2126.
fn tls_fixture(name: &str) -> String {
    format!(
        "{}/tests/fixtures/redis-tls/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

impl Redis {
    /// Starts one on a free port, or `None` (the test is skipped, said on
    /// stderr) when `redis-server` cannot be started.
    fn start() -> Option<Redis> {
        Self::start_with(false)
    }

    /// As [`start`](Self::start), plus a TLS-only port.
    fn start_tls() -> Option<Redis> {
        Self::start_with(true)
    }

    /// A port found free may be taken by something else (another test's
    /// Redis or server) before `redis-server` binds it; the port answers
    /// then, but not from this Redis, which exited. Fresh ports are tried.
    fn start_with(tls: bool) -> Option<Redis> {
        test_redis::on_free_ports(|port| {
            let tls_port = if tls {
                let port = free_port().ok_or(Failed::Skip("no free port for TLS".into()))?;
                Some(port)
            } else {
                None
            };
            let mut redis = Redis {
                port,
                tls_port,
                child: None,
            };
            redis.try_restart().map(|()| redis)
        })
    }

    /// (Re)starts the server on its port; false when it does not come up.
    fn restart(&mut self) -> bool {
        match self.try_restart() {
            Ok(()) => true,
            Err(Failed::Taken) => {
                eprintln!(
                    "127.0.0.1:{} was taken before redis-server bound it",
                    self.port
                );
                false
            }
            Err(Failed::Skip(why)) => {
                eprintln!("SKIPPED: {why}");
                false
            }
        }
    }

    /// [`restart`](Self::restart), saying whether the port was taken:
    /// up once this process (its pid in `INFO server`) answers on it.
    fn try_restart(&mut self) -> Result<(), Failed> {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"]);
        if let Some(tls_port) = self.tls_port {
            command
                .args(["--tls-port", &tls_port.to_string()])
                .args(["--tls-cert-file", &tls_fixture("server.pem")])
                .args(["--tls-key-file", &tls_fixture("server-key.pem")])
                .args(["--tls-auth-clients", "no"]);
        }
        let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        let mut child = child.map_err(|e| {
            Failed::Skip(format!(
                "cannot start redis-server ({e}); install Debian's redis-server"
            ))
        })?;
        match test_redis::answers_itself(&mut child, self.port) {
            Ok(()) => {
                self.child = Some(child);
                Ok(())
            }
            Err(failed) => Err(test_redis::stop(child, failed)),
        }
    }

    /// SIGKILL: Redis vanishes without a goodbye.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A bucket's hash (`d`, `t`, `T`, `k`, …) as integers.
    async fn bucket(&self, key: &str) -> std::collections::HashMap<String, u64> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Now as Redis' `TIME` counts it (the same machine clock), in µs.
fn wall_us() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(since.as_micros()).unwrap()
}

/// One test's world: its Redis, its mock backend, and `n` replicas
/// sharing that Redis under their own key prefix.
struct Setup {
    redis: Redis,
    backend: mock::MockHandle,
    running: Vec<Running>,
    /// Holds the config file for as long as the replicas may reload it.
    _dir: tempfile::TempDir,
}

/// Starts Redis (or returns `None`: skipped), a mock backend and `n`
/// replicas with `limits`, and waits until each has joined and sees all `n`.
async fn setup(backend: MockConfig, limits: &str, prefix: &str, n: usize) -> Option<Setup> {
    setup_behind(backend, limits, prefix, n, None).await
}

/// As [`setup`], the replicas reaching Redis through [`delaying_proxy`]
/// when `delay` is given.
async fn setup_behind(
    backend: MockConfig,
    limits: &str,
    prefix: &str,
    n: usize,
    delay: Option<Duration>,
) -> Option<Setup> {
    let redis = Redis::start()?;
    let backend = mock::start(backend.models(vec![MODEL.into()]))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\n{limits}\n\n{}{QUIET}[cluster]\nkey_prefix = \"{prefix}\"\n",
        backend_entry(&backend.base_url())
    );
    let path: PathBuf = dir.path().join(format!("{prefix}.toml"));
    std::fs::write(&path, toml).unwrap();
    let url = match delay {
        Some(delay) => format!(
            "redis://127.0.0.1:{}/",
            delaying_proxy(redis.port, delay).await
        ),
        None => redis.url(),
    };
    let running: Vec<Running> = (0..n)
        .map(|_| spawn_weir_env(&path, "info", &[("WEIR_REDIS_URL", &url)]))
        .collect();
    for r in &running {
        let joined = wait_for_metrics(r.addr, 1, n).await;
        assert!(
            joined,
            "replica {} did not join: {}",
            r.addr,
            r.log.lock().unwrap()
        );
    }
    Some(Setup {
        redis,
        backend,
        running,
        _dir: dir,
    })
}

/// A TCP proxy to `127.0.0.1:to` that holds every byte for `delay` in each
/// direction, in order: a Redis `2 × delay` away. Its port; it serves
/// until the test's runtime ends.
async fn delaying_proxy(to: u16, delay: Duration) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                continue;
            };
            let (from_client, to_client) = client.into_split();
            let (from_server, to_server) = server.into_split();
            tokio::spawn(delayed_copy(from_client, to_server, delay));
            tokio::spawn(delayed_copy(from_server, to_client, delay));
        }
    });
    port
}

/// Copies `from` to `to`, each read written `delay` after it arrived.
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((arrived, bytes)) = rx.recv().await {
            tokio::time::sleep_until(arrived + delay).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// The one backend every replica sends `MODEL` to.
fn backend_entry(url: &str) -> String {
    backend("b", url, &[MODEL], 1)
}

/// `weir_cluster_up` and `weir_cluster_replicas` of one replica.
async fn cluster_metrics(addr: SocketAddr) -> (i64, i64) {
    let text = get(addr, "/metrics").await.text();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<i64>().ok())
            .unwrap_or(-1)
    };
    (value("weir_cluster_up "), value("weir_cluster_replicas "))
}

/// Polls until the replica reports `up` and at least `replicas` (20 s).
async fn wait_for_metrics(addr: SocketAddr, up: i64, replicas: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let (u, n) = cluster_metrics(addr).await;
        if u == up && (up == 0 || n >= i64::try_from(replicas).unwrap()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// What one paced client saw.
#[derive(Debug, Default)]
struct Tally {
    admitted: u64,
    limited: u64,
    /// Any other answer, or none (a replica that died): when each was sent.
    other: Vec<Instant>,
    /// When the first request was sent and the last answer came back.
    first_sent: Option<Instant>,
    last_answer: Option<Instant>,
}

/// Sends `rate` chat requests per second to `addr` for `duration`, each on
/// its own task so a slow answer never delays the next, and counts answers.
async fn hammer(addr: SocketAddr, rate: u32, duration: Duration, body: String) -> Tally {
    let client = client();
    let start = Instant::now();
    let every = Duration::from_secs(1) / rate;
    let mut sent = Vec::new();
    let mut next = start;
    while next < start + duration {
        tokio::time::sleep_until(next).await;
        let request = http::Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
            .unwrap();
        let client = client.clone();
        let sent_at = next;
        sent.push(tokio::spawn(async move {
            let answer =
                tokio::time::timeout(Duration::from_secs(10), client.request(request)).await;
            // Status 0: no answer (connection refused or cut).
            let status = match answer {
                Ok(Ok(response)) => response.status().as_u16(),
                _ => 0,
            };
            (status, sent_at, Instant::now())
        }));
        next += every;
    }
    let mut tally = Tally {
        first_sent: Some(start),
        ..Tally::default()
    };
    for task in sent {
        let (status, sent_at, at) = task.await.unwrap();
        match status {
            200 => tally.admitted += 1,
            429 => tally.limited += 1,
            _ => {
                tally.other.push(sent_at);
                continue;
            }
        }
        tally.last_answer = tally.last_answer.max(Some(at));
    }
    tally
}

/// Hammers every replica at once at `rate` each; one tally per replica.
async fn hammer_all(addrs: &[SocketAddr], rate: u32, duration: Duration) -> Vec<Tally> {
    let tasks: Vec<_> = addrs
        .iter()
        .map(|&addr| tokio::spawn(hammer(addr, rate, duration, chat(MODEL, false))))
        .collect();
    let mut tallies = Vec::new();
    for t in tasks {
        tallies.push(t.await.unwrap());
    }
    tallies
}

/// The span from the first request sent to the last answer of all tallies.
fn window(tallies: &[Tally]) -> Duration {
    let first = tallies.iter().filter_map(|t| t.first_sent).min().unwrap();
    let last = tallies.iter().filter_map(|t| t.last_answer).max().unwrap();
    last - first
}

/// What the replicas admitted together is what one bucket allows: at most
/// `allowance` (a token of rounding), and no less than `lowest` of it.
fn assert_one_bucket(admitted: u64, allowance: f64, lowest: f64) {
    #[allow(clippy::cast_precision_loss)]
    let admitted_f = admitted as f64;
    assert!(
        admitted_f <= allowance + 1.0,
        "over-admitted: {admitted} > {allowance:.1}"
    );
    assert!(
        admitted_f >= lowest * allowance,
        "under-admitted: {admitted} < {lowest} × {allowance:.1}"
    );
}

/// Tokens a Redis bucket says were consumed since `since_us` (wall µs):
/// the deficit it holds plus what refilled since, in tokens. Exact as long
/// as the bucket never refilled to full in between (the tests consume
/// faster than it refills).
fn consumed(bucket: &std::collections::HashMap<String, u64>, since_us: u64) -> f64 {
    let (d, t, cost, per_us) = (bucket["d"], bucket["t"], bucket["T"], bucket["k"]);
    assert_eq!(bucket["q"], 1, "microsecond ticks");
    (d as f64 + per_us as f64 * (t - since_us) as f64) / cost as f64
}

/// Three replicas hammered together for 30 s at three times a 600 RPM
/// limit admit what one bucket would: burst + rate × elapsed, within 2%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_hold_the_global_limit_within_two_percent() {
    let backend_config = MockConfig::default();
    // The binding limit: 600 RPM, burst 100, no queueing. The global
    // request limit and the token limit do not bind but are shared too, so
    // their leases and reconciliation run alongside.
    let limits = format!(
        "[limits]\nrequests_per_minute = 60000\n\n[[models]]\nname = \"{MODEL}\"\nrequests_per_minute = 600\nburst = 100\ntokens_per_minute = 1000000\nqueue_timeout = \"0s\"\n"
    );
    let Some(setup) = setup(backend_config, &limits, "hold", 3).await else {
        return;
    };
    let Setup {
        redis: _redis,
        backend,
        running,
        _dir: _keep,
    } = setup;
    let addrs: Vec<SocketAddr> = running.iter().map(|r| r.addr).collect();
    // 3 × 10 requests/s = 30/s, three times the 10/s the limit refills.
    let tallies = hammer_all(&addrs, 10, Duration::from_secs(30)).await;
    let admitted: u64 = tallies.iter().map(|t| t.admitted).sum();
    let other: usize = tallies.iter().map(|t| t.other.len()).sum();
    let elapsed = window(&tallies).as_secs_f64();
    // Bucket formulas: a full bucket of 100, refilled at 600/60 = 10/s.
    let allowance = 100.0 + 10.0 * elapsed;
    eprintln!(
        "admitted {admitted} (per replica {:?}), allowance {allowance:.1} over {elapsed:.2} s, backend saw {}",
        tallies.iter().map(|t| t.admitted).collect::<Vec<_>>(),
        backend.requests()
    );
    assert_eq!(other, 0, "only 200 and 429: {tallies:?}");
    assert_eq!(
        backend.requests(),
        admitted,
        "every admitted request reached the backend"
    );
    assert_one_bucket(admitted, allowance, 0.98);
    // Every replica took part.
    assert!(tallies.iter().all(|t| t.admitted > 10), "{tallies:?}");
}

/// Refunds and charges made on any replica reach the one shared bucket:
/// what Redis says was consumed equals the usage the responses reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_reconciliation_adds_up_across_replicas() {
    // 40 completion tokens per answer: requests with max_tokens 1000 are
    // refunded most of their estimate, those with max_tokens 5 charged.
    let backend_config = MockConfig::default().chunks(40);
    // 12 000 tokens/min: refills 200/s while the test consumes much faster,
    // so the bucket never refills to full and its deficit is exact history.
    let limits = format!(
        "[[models]]\nname = \"{MODEL}\"\ntokens_per_minute = 12000\nqueue_timeout = \"0s\"\n"
    );
    let Some(setup) = setup(backend_config, &limits, "recon", 3).await else {
        return;
    };
    let Setup {
        redis,
        backend: _backend,
        running,
        _dir: _keep,
    } = setup;
    let since = wall_us();
    let mut reported = 0u64;
    let mut first_answer = None;
    let client = client();
    for i in 0..90usize {
        let max_tokens = if i % 2 == 0 { 1000 } else { 5 };
        let body = format!(
            r#"{{"model":"{MODEL}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Hello there, count my tokens"}}]}}"#
        );
        let addr = running[i % 3].addr;
        let reply = send(
            &client,
            "POST",
            addr,
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            body,
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        reported += reply.json()["usage"]["total_tokens"].as_u64().unwrap();
        first_answer.get_or_insert_with(wall_us);
    }
    // Graceful stops hand every lease and every owed charge back to Redis.
    for r in &running {
        signal(&r.child, "-TERM");
    }
    for mut r in running {
        assert_eq!(wait_exit(&mut r.child, Duration::from_secs(10)), Some(0));
    }
    let bucket = redis.bucket(&format!("recon:tokens:{MODEL}")).await;
    let consumed = consumed(&bucket, since);
    eprintln!("usage reported {reported}, Redis consumed {consumed:.2}");
    // `since` precedes the first reservation, which Redis made before the
    // first answer: the formula counts at most that gap of refill (200
    // tokens/s) that the bucket never owed, and nothing else is inexact.
    #[allow(clippy::cast_precision_loss)]
    let (reported, gap_s) = (
        reported as f64,
        (first_answer.unwrap() - since) as f64 / 1e6,
    );
    assert!(
        consumed >= reported - 0.01 && consumed <= reported + 200.0 * gap_s + 0.01,
        "consumed {consumed:.2}, reported {reported}, gap {gap_s:.4} s"
    );
}

/// `rediss://`: a replica that trusts the server's CA (`SSL_CERT_FILE`)
/// joins through Redis' TLS-only port and its limit is kept there; a
/// replica that does not trust it stays on its fallback share and logs why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_url_speaks_tls_and_checks_the_certificate() {
    let Some(redis) = Redis::start_tls() else {
        return;
    };
    let tls_port = redis.tls_port.expect("started with TLS");
    let backend = mock::start(MockConfig::default().models(vec![MODEL.into()]))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[models]]\nname = \"{MODEL}\"\nrequests_per_minute = 6\nburst = 3\nqueue_timeout = \"0s\"\n\n{}{QUIET}[cluster]\nkey_prefix = \"tls\"\n",
        backend_entry(&backend.base_url())
    );
    let path = dir.path().join("tls.toml");
    std::fs::write(&path, toml).unwrap();
    let url = format!("rediss://127.0.0.1:{tls_port}/");
    let ca = tls_fixture("ca.pem");
    let trusting = spawn_weir_env(
        &path,
        "info",
        &[("WEIR_REDIS_URL", &url), ("SSL_CERT_FILE", &ca)],
    );
    assert!(
        wait_for_metrics(trusting.addr, 1, 1).await,
        "did not join over TLS: {}",
        trusting.log.lock().unwrap()
    );
    let client = client();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let reply = send(
            &client,
            "POST",
            trusting.addr,
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            format!(r#"{{"model":"{MODEL}","messages":[]}}"#),
        )
        .await;
        statuses.push(reply.status);
    }
    assert_eq!(statuses, [200, 200, 200, 429], "burst 3 held");
    // The limit lives in Redis (read here through its plain port).
    let bucket = redis.bucket(&format!("tls:requests:{MODEL}")).await;
    assert!(!bucket.is_empty(), "no bucket in Redis");

    // Trusting no CA at all (an empty SSL_CERT_DIR): the handshake fails.
    let no_roots = tempfile::tempdir().unwrap();
    let doubting = spawn_weir_env(
        &path,
        "info",
        &[
            ("WEIR_REDIS_URL", &url),
            ("SSL_CERT_DIR", no_roots.path().to_str().unwrap()),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let said_why = || {
        let log = doubting.log.lock().unwrap();
        log.contains("UnknownIssuer") || log.contains("certificate")
    };
    while !said_why() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        said_why(),
        "no certificate error logged: {}",
        doubting.log.lock().unwrap()
    );
    assert_eq!(cluster_metrics(doubting.addr).await.0, 0, "not joined");
    assert!(
        !doubting.log.lock().unwrap().contains(&url),
        "the URL is a secret"
    );
}

/// Redis dies mid-run: every replica keeps serving at its share (rate /
/// replicas last seen), says so in `weir_cluster_up 0`, and rejoins when
/// Redis is back on the same port, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_fall_back_to_their_share_and_rejoin() {
    let backend_config = MockConfig::default();
    // 600 RPM with burst 60: a third each while Redis is gone, that is
    // 200 RPM (3.3/s) and 20 tokens of burst at most.
    let limits = format!(
        "[[models]]\nname = \"{MODEL}\"\nrequests_per_minute = 600\nburst = 60\nqueue_timeout = \"0s\"\n"
    );
    let Some(setup) = setup(backend_config, &limits, "outage", 3).await else {
        return;
    };
    let Setup {
        mut redis,
        backend: _backend,
        running,
        _dir: _keep,
    } = setup;
    let addrs: Vec<SocketAddr> = running.iter().map(|r| r.addr).collect();
    // Shared: drain the bucket together first.
    let before = hammer_all(&addrs, 20, Duration::from_secs(3)).await;
    assert!(
        before.iter().map(|t| t.limited).sum::<u64>() > 0,
        "{before:?}"
    );

    redis.kill();
    let outage = Instant::now();
    for &addr in &addrs {
        assert!(
            wait_for_metrics(addr, 0, 0).await,
            "{addr} never noticed Redis was gone"
        );
    }
    let during = hammer_all(&addrs, 20, Duration::from_secs(4)).await;
    let span = (Instant::now() - outage).as_secs_f64();
    for (tally, r) in during.iter().zip(&running) {
        // Its share: at most the 20-token share of burst plus 200/min.
        let share = 20.0 + 200.0 / 60.0 * span;
        eprintln!(
            "during the outage {} admitted {} (share {share:.1})",
            r.addr, tally.admitted
        );
        assert!(tally.admitted >= 1, "kept serving: {tally:?}");
        #[allow(clippy::cast_precision_loss)]
        let admitted = tally.admitted as f64;
        assert!(admitted <= share + 1.0, "{admitted} > its share {share:.1}");
        assert!(
            tally.other.is_empty(),
            "no request failed because Redis was gone"
        );
    }
    let warnings = running
        .iter()
        .map(|r| {
            r.log
                .lock()
                .unwrap()
                .matches("Redis is unreachable")
                .count()
        })
        .collect::<Vec<_>>();
    assert_eq!(warnings, vec![1, 1, 1], "logged once per replica");

    assert!(redis.restart(), "redis-server restarts on its port");
    for &addr in &addrs {
        assert!(wait_for_metrics(addr, 1, 3).await, "{addr} did not rejoin");
    }
    // Shared again: a fresh Redis is a full bucket of 60, used by all three.
    let after = hammer_all(&addrs, 20, Duration::from_secs(2)).await;
    let admitted: u64 = after.iter().map(|t| t.admitted).sum();
    let elapsed = window(&after).as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let admitted_f = admitted as f64;
    assert!(
        admitted_f <= 60.0 + 10.0 * elapsed + 1.0,
        "rejoined: {admitted} in {elapsed:.2} s"
    );
    for r in &running {
        let log = r.log.lock().unwrap();
        let back = log.lines().find(|l| l.contains("Redis is back"));
        // The fresh Redis has no registry: the first heartbeat back sees
        // this replica alone, but the count (and so the fallback share)
        // holds at the three last seen until a whole window has run.
        assert!(
            back.is_some_and(|l| l.contains("replicas=3")),
            "{back:?}\n{log}"
        );
    }
}

/// Redis stops answering while the bucket is full. Requests wait 20 ms for
/// it on the slow path and then the fallback admits them at the replica's
/// share, until the heartbeat declares Redis down and the fallback decides
/// alone. Across both phases the two replicas admit one bucket between
/// them, not one per phase: a review saw 484 to 600 admitted against a
/// burst of 300 when going down reset the fallback to its share of the
/// last level Redis had reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_does_not_double_the_burst() {
    let limits = format!(
        "[[models]]\nname = \"{MODEL}\"\nrequests_per_minute = 60\nburst = 300\nqueue_timeout = \"0s\"\n"
    );
    let Some(setup) = setup(MockConfig::default(), &limits, "pause", 2).await else {
        return;
    };
    let addrs: Vec<SocketAddr> = setup.running.iter().map(|r| r.addr).collect();
    // Redis holds every command for longer than the run below.
    let client = redis::Client::open(setup.redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(5000)
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    let tallies = hammer_all(&addrs, 150, Duration::from_secs(3)).await;
    let admitted: u64 = tallies.iter().map(|t| t.admitted).sum();
    let elapsed = window(&tallies).as_secs_f64();
    eprintln!("admitted {admitted} in {elapsed:.2} s with Redis paused");
    for r in &setup.running {
        assert!(
            r.log.lock().unwrap().contains("Redis is unreachable"),
            "{} noticed the pause",
            r.addr
        );
    }
    // The burst, what refilled meanwhile (1 token/s), and a token of
    // rounding per replica. No lease is held: nothing asked before.
    #[allow(clippy::cast_precision_loss)]
    let admitted_f = admitted as f64;
    assert!(
        admitted_f <= 300.0 + elapsed + 2.0,
        "{admitted} admitted in {elapsed:.2} s against a burst of 300: {tallies:?}"
    );
    assert!(
        admitted >= 250,
        "the fallback served meanwhile: {tallies:?}"
    );
}

/// A Redis that answers, but slower than the 20 ms a slow-path request
/// waits at least (40 ms each way): the wait follows Redis' round trip, so
/// Redis still decides and three replicas admit one bucket between them.
/// Before the wait followed the round trip, every slow-path request fell
/// to the replica's local share, whose level follows Redis' a round trip
/// late: a review saw 13 to 16 over a burst of 300 with this delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_still_decides_and_the_cluster_admits_one_bucket() {
    let limits = format!(
        "[[models]]\nname = \"{MODEL}\"\nrequests_per_minute = 600\nburst = 300\nqueue_timeout = \"0s\"\n"
    );
    let delay = Some(Duration::from_millis(40));
    let Some(setup) = setup_behind(MockConfig::default(), &limits, "slow", 3, delay).await else {
        return;
    };
    let addrs: Vec<SocketAddr> = setup.running.iter().map(|r| r.addr).collect();
    // Each has seen Redis' round trip (80 ms) in its heartbeats and waits
    // twice that and a little for it.
    for &addr in &addrs {
        let status = get(addr, "/admin/cluster").await.json();
        let wait = status["slow_path_wait_ms"].as_f64().unwrap_or_default();
        assert!((165.0..=250.0).contains(&wait), "{status}");
    }
    // 3 × 50 requests/s for 2.7 s: about 400 into a bucket of 300.
    let tallies = hammer_all(&addrs, 50, Duration::from_millis(2700)).await;
    let admitted: u64 = tallies.iter().map(|t| t.admitted).sum();
    let other: usize = tallies.iter().map(|t| t.other.len()).sum();
    let elapsed = window(&tallies).as_secs_f64();
    // The burst and what refilled meanwhile (10 tokens/s).
    let allowance = 300.0 + 10.0 * elapsed;
    eprintln!(
        "admitted {admitted} (per replica {:?}), allowance {allowance:.1} over {elapsed:.2} s",
        tallies.iter().map(|t| t.admitted).collect::<Vec<_>>()
    );
    assert_eq!(other, 0, "only 200 and 429: {tallies:?}");
    assert_one_bucket(admitted, allowance, 0.97);
    for r in &setup.running {
        let log = r.log.lock().unwrap();
        assert!(!log.contains("Redis is unreachable"), "{}: {log}", r.addr);
    }
}

/// A replica killed while it holds a lease takes no more than that lease
/// with it: what Redis counts as consumed exceeds what clients were
/// admitted by at most the dead replica's lease and its requests in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_holding_a_lease_loses_at_most_its_lease() {
    let backend_config = MockConfig::default();
    // 600 RPM with a burst of 1200: leases of up to 1% / 2 = 6 tokens each;
    // 30 requests/s consume faster than the 10/s refill, and the burst
    // covers the whole test, so every request is admitted.
    let limits = format!(
        "[[models]]\nname = \"{MODEL}\"\nrequests_per_minute = 600\nburst = 1200\nqueue_timeout = \"0s\"\n"
    );
    let Some(setup) = setup(backend_config, &limits, "crash", 2).await else {
        return;
    };
    let Setup {
        redis,
        backend: _backend,
        mut running,
        _dir: _keep,
    } = setup;
    let since = wall_us();
    let (a, b) = (running[0].addr, running[1].addr);
    let load_a = tokio::spawn(hammer(a, 15, Duration::from_secs(4), chat(MODEL, false)));
    let load_b = tokio::spawn(hammer(b, 15, Duration::from_secs(6), chat(MODEL, false)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = get(a, "/admin/cluster").await.json();
    let lease = status["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["key"] == format!("crash:requests:{MODEL}"))
        .map(|l| {
            (
                l["lease"].as_u64().unwrap(),
                l["max_lease"].as_u64().unwrap(),
            )
        })
        .unwrap();
    eprintln!("lease of the replica about to die: {lease:?}");
    assert!(lease.0 <= lease.1 && lease.1 == 6, "{lease:?}");
    running[0].child.kill().unwrap();
    let _ = running[0].child.wait();
    let killed = Instant::now();
    let load_a = load_a.await.unwrap();
    let load_b = load_b.await.unwrap();
    // The survivor returns its own lease on a graceful stop.
    signal(&running[1].child, "-TERM");
    assert_eq!(
        wait_exit(&mut running[1].child, Duration::from_secs(10)),
        Some(0)
    );
    let bucket = redis.bucket(&format!("crash:requests:{MODEL}")).await;
    let consumed = consumed(&bucket, since);
    let admitted = load_a.admitted + load_b.admitted;
    // Requests to the dead replica sent before it died that got no answer
    // may or may not have been admitted; those sent after were refused.
    let unanswered = load_a.other.iter().filter(|&&at| at <= killed).count();
    eprintln!("admitted {admitted}, Redis consumed {consumed:.2}, unanswered {unanswered}");
    assert!(load_b.other.is_empty() && load_b.limited + load_a.limited == 0);
    #[allow(clippy::cast_precision_loss)]
    let (admitted, unanswered) = (admitted as f64, unanswered as f64);
    // Never fewer consumed than admitted (nothing admitted for free), and
    // no more lost than the lease (6 at most) and the unanswered requests,
    // plus the refill rounding of `since` (well under one token).
    assert!(
        consumed >= admitted - 1.0,
        "consumed {consumed:.2} < admitted {admitted}"
    );
    assert!(
        consumed <= admitted + 6.0 + unanswered + 1.0,
        "lost more than a lease: consumed {consumed:.2}, admitted {admitted}"
    );
}

/// A model a reload removes gives its shared bucket back: no snapshot
/// keeps the start-up one (and with it the removed model's lease and its
/// Redis top-ups) alive once the reload is in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_removed_by_a_reload_leaves_the_cluster_status() {
    let limits = format!("[[models]]\nname = \"{MODEL}\"\nrequests_per_minute = 600\n");
    let Some(setup) = setup(MockConfig::default(), &limits, "gone", 1).await else {
        return;
    };
    let addr = setup.running[0].addr;
    let key = format!("gone:requests:{MODEL}");
    let listed = |status: serde_json::Value| {
        status["limits"]
            .as_array()
            .is_some_and(|limits| limits.iter().any(|l| l["key"] == key.as_str()))
    };
    let status = get(addr, "/admin/cluster").await.json();
    assert!(listed(status.clone()), "{status}");
    let path = setup._dir.path().join("gone.toml");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\n[[models]]\nname = \"other\"\nrequests_per_minute = 600\n\n{}{QUIET}[cluster]\nkey_prefix = \"gone\"\n",
        backend("b", &setup.backend.base_url(), &["other"], 1)
    );
    std::fs::write(&path, toml).unwrap();
    signal(&setup.running[0].child, "-HUP");
    let mut gone = false;
    for _ in 0..100 {
        let status = get(addr, "/admin/cluster").await.json();
        if !listed(status) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gone,
        "{key} is still in /admin/cluster 10 s after the reload: {}",
        setup.running[0].log.lock().unwrap()
    );
}

/// A 429 of a shared limit carries the wait Redis computed, exactly: at 6 a
/// minute with a burst of 1, a request a second after the bucket was
/// emptied (on the other replica) waits at most 9 s. A review saw
/// `retry-after: 10` and reset `10s` 7 s after, for a wait of 3 s: the
/// refusing bucket's wait was replaced by an estimate from whole tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_limits_429_carries_the_exact_wait() {
    let limits = format!(
        "[[models]]\nname = \"{MODEL}\"\nrequests_per_minute = 6\nburst = 1\nqueue_timeout = \"500ms\"\n"
    );
    let Some(setup) = setup(MockConfig::default(), &limits, "exact", 2).await else {
        return;
    };
    let (a, b) = (setup.running[0].addr, setup.running[1].addr);
    let first = post(a, "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(first.status, 200, "{}", first.text());
    // Redis took the token before that answer: a second of it refills.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refused = post(b, "/v1/chat/completions", &chat(MODEL, false)).await;
    refused.assert_error(429, "requests", "rate_limit_exceeded");
    let retry_after: u64 = refused.header("retry-after").parse().unwrap();
    assert!(retry_after <= 9, "retry-after {retry_after}");
    let reset = refused.header("x-ratelimit-reset-requests");
    let reset_s: f64 = reset.strip_suffix('s').unwrap().parse().unwrap();
    assert!(reset_s <= 9.0, "reset {reset}");
    assert_eq!(
        reset_s.ceil().to_string(),
        retry_after.to_string(),
        "Retry-After rounds the reset up: {reset}"
    );
}

/// A 429 from one shared bucket carries the longest wait of all of them,
/// read from Redis for the others, not from this replica's last report: a
/// request refused by the global tokens bucket (5 s) while the model's
/// request bucket, emptied by both replicas, holds it 10 s says 10 s. A
/// review saw `Retry-After: 5`, and the retry 5 s later refused again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_waits_for_the_other_shared_limits_as_redis_has_them() {
    let limits = format!(
        "[limits]\ntokens_per_minute = 60\n\n[defaults]\nqueue_timeout = \"1s\"\n\n[[models]]\nname = \"{MODEL}\"\nrequests_per_minute = 6\nburst = 2\n"
    );
    let Some(setup) = setup(MockConfig::default(), &limits, "longest", 2).await else {
        return;
    };
    let (a, b) = (setup.running[0].addr, setup.running[1].addr);
    let body = |max_tokens: u32| {
        serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens,
        })
        .to_string()
    };
    for replica in [a, b] {
        let r = post(replica, "/v1/chat/completions", &body(1)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // More tokens than the global bucket holds: it admits them within its
    // 1 s queue_timeout, or refuses them for 1–9 s of refill, as the first
    // two requests' unspent tokens have or have not reached Redis yet.
    // Either way the model's request bucket holds the request 10 s.
    let refused = post(a, "/v1/chat/completions", &body(43)).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    let retry_after: u64 = refused.header("retry-after").parse().unwrap();
    assert!(
        (9..=10).contains(&retry_after),
        "retry-after {retry_after}: {}",
        refused.text()
    );
    assert!(
        refused.text().contains("requests per min"),
        "{}",
        refused.text()
    );
}

/// With Redis down, a request the configured limit admits is still
/// admitted: 600 tokens a minute over two replicas is a fallback share of
/// 300 each, and a request of more than 300 (but at most 600) waits for
/// the share to be full and takes it into debt, instead of the permanent
/// 413 ("can ever hold") a review saw until Redis came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_limit_admits_is_not_too_large_for_the_fallback_share() {
    let limits = format!(
        "[[models]]\nname = \"{MODEL}\"\ntokens_per_minute = 600\nqueue_timeout = \"0s\"\n"
    );
    let Some(setup) = setup(MockConfig::default(), &limits, "share", 2).await else {
        return;
    };
    let Setup {
        mut redis,
        backend: _backend,
        running,
        _dir: _keep,
    } = setup;
    redis.kill();
    let addr = running[0].addr;
    assert!(
        wait_for_metrics(addr, 0, 0).await,
        "{addr} never noticed Redis was gone"
    );
    let body = |max_tokens: u32| {
        format!(
            r#"{{"model":"{MODEL}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#
        )
    };
    let big = post(addr, "/v1/chat/completions", &body(400)).await;
    assert_eq!(big.status, 200, "{}", big.text());
    // Its unused tokens came back, but the share is not full again: the
    // next large one waits for it (429, not 413).
    let next = post(addr, "/v1/chat/completions", &body(400)).await;
    next.assert_error(429, "tokens", "rate_limit_exceeded");
    let too_large = post(addr, "/v1/chat/completions", &body(700)).await;
    assert_eq!(too_large.status, 413, "{}", too_large.text());
    assert!(
        too_large.text().contains("limit of 600"),
        "{}",
        too_large.text()
    );
}

/// `weir check` refuses a Redis URL with a negative database index (it
/// parses, but Redis refuses every connection: "DB index is out of range",
/// so serve would never join) at the `[cluster]` line, without echoing the
/// URL or its password; an index past the server's count may be valid
/// there and passes.
#[test]
fn check_refuses_a_negative_redis_database_index() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("weir.toml");
    let toml = "[[models]]\nname = \"m\"\n\n[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n\n[cluster]\nredis_url_env = \"WEIR_TEST_REDIS_URL\"\n";
    std::fs::write(&path, toml).expect("config written");
    let check = |url: &str| {
        Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["check", "--config"])
            .arg(&path)
            .env("WEIR_TEST_REDIS_URL", url)
            .output()
            .expect("weir runs")
    };
    let out = check("redis://:pw-SENTINEL@127.0.0.1:6379/-1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("{}:10:", path.display())), "{err}");
    assert!(err.contains("negative database index"), "{err}");
    assert!(!err.contains("SENTINEL"), "{err}");
    let out = check("redis://:pw-SENTINEL@127.0.0.1:6379/99");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
