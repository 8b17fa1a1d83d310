//! Test helpers: start a gateway on 127.0.0.1:0 in front of real mock
//! backends, and speak HTTP to it with a real client.
#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::{net::TcpListener, time::Instant};
use weir::{Config, Gateway, Handle};

/// The backend key tests configure; it must never reach a client or a log.
pub const BACKEND_KEY: &str = "sk-backend-SENTINEL-7f3a";

/// The environment tests give the config loader.
pub fn test_env(name: &str) -> Option<String> {
    match name {
        "BACKEND_KEY" => Some(BACKEND_KEY.to_owned()),
        "CLIENT_KEYS" => Some("client-key-1, client-key-2".to_owned()),
        "ADMIN_TOKEN" => Some("admin-token-1".to_owned()),
        _ => None,
    }
}

/// Parses `toml` with [`test_env`], panicking with every error if invalid.
pub fn config(toml: &str) -> Config {
    match Config::parse(toml, "test.toml", &test_env) {
        Ok(c) => c,
        Err(e) => panic!("invalid test config:\n{e}\n---\n{toml}"),
    }
}

/// Starts a gateway for `toml` on 127.0.0.1:0 (its `listen` is ignored).
pub async fn gateway(toml: &str) -> Handle {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    Gateway::new(config(toml))
        .env(test_env)
        .start_on(listener, None)
        .expect("gateway starts")
}

/// A `[[backends]]` entry.
pub fn backend(name: &str, url: &str, models: &[&str], weight: u32) -> String {
    let models: Vec<String> = models.iter().map(|m| format!("\"{m}\"")).collect();
    format!(
        "[[backends]]\nname = \"{name}\"\nurl = \"{url}\"\nmodels = [{}]\nweight = {weight}\napi_key_env = \"BACKEND_KEY\"\n\n",
        models.join(", ")
    )
}

/// Settings that keep tests fast and deterministic: health checks off.
pub const QUIET: &str = "[health]\nenabled = false\n\n";

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    /// Asserts an OpenAI-shaped error with this status, type and code.
    pub fn assert_error(&self, status: u16, kind: &str, code: &str) {
        assert_eq!(self.status.as_u16(), status, "{}", self.text());
        let j = self.json();
        assert_eq!(j["error"]["type"], kind, "{j}");
        assert_eq!(j["error"]["code"], code, "{j}");
        assert!(
            j["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{j}"
        );
        assert!(j["error"].get("param").is_some(), "{j}");
    }
}

pub type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A client that speaks HTTP/2 without TLS (prior knowledge).
pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends a request and reads the whole response.
pub async fn send(
    client: &TestClient,
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).expect("request builds");
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("response within 20s")
        .expect("request succeeds");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body reads").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn post(addr: SocketAddr, path: &str, body: &str) -> Reply {
    post_with(&client(), addr, path, body).await
}

/// [`post`] with this client (an HTTP/2 one, one that keeps its connection).
pub async fn post_with(client: &TestClient, addr: SocketAddr, path: &str, body: &str) -> Reply {
    send(
        client,
        "POST",
        addr,
        path,
        &[("content-type", "application/json")],
        body.to_owned(),
    )
    .await
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    send(&client(), "GET", addr, path, &[], Bytes::new()).await
}

/// Sends `n` non-streamed chat requests for `model` at once and returns
/// their statuses.
pub async fn concurrent_chats(addr: SocketAddr, model: &'static str, n: usize) -> Vec<u16> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            tokio::spawn(async move {
                post(addr, "/v1/chat/completions", &chat(model, false))
                    .await
                    .status
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::with_capacity(n);
    for t in tasks {
        statuses.push(t.await.expect("request task"));
    }
    statuses
}

/// A chat body for `model`.
pub fn chat(model: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{model}","stream":{stream},"messages":[{{"role":"user","content":"Hello there"}}]}}"#
    )
}

/// A streamed response: status, headers, and each data frame with the time
/// it arrived (since the request was sent).
pub struct Streamed {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub frames: Vec<(Duration, Bytes)>,
}

impl Streamed {
    pub fn text(&self) -> String {
        let all: Vec<u8> = self
            .frames
            .iter()
            .flat_map(|(_, b)| b.iter().copied())
            .collect();
        String::from_utf8_lossy(&all).into_owned()
    }
    /// The JSON of each `data:` event other than `[DONE]`.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.text()
            .split("\n\n")
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad event {d}: {e}")))
            .collect()
    }
}

pub async fn post_stream(addr: SocketAddr, path: &str, body: &str) -> Streamed {
    let start = Instant::now();
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request builds");
    let response = tokio::time::timeout(Duration::from_secs(20), client().request(req))
        .await
        .expect("response within 20s")
        .expect("request succeeds");
    let (parts, mut body) = response.into_parts();
    let mut frames = Vec::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(20), body.frame())
        .await
        .expect("frame within 20s")
    {
        let frame = frame.expect("frame reads");
        if let Ok(data) = frame.into_data() {
            frames.push((start.elapsed(), data));
        }
    }
    Streamed {
        status: parts.status,
        headers: parts.headers,
        frames,
    }
}

/// A running `weir` binary and everything it wrote to stderr. Dropping it
/// kills the process (a no-op once it has exited).
pub struct Running {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `weir --config CONFIG` with [`BACKEND_KEY`] in its environment and
/// `RUST_LOG=rust_log`, and waits for the `listen=` line of its log.
pub fn spawn_weir(config: &std::path::Path, rust_log: &str) -> Running {
    spawn_weir_env(config, rust_log, &[])
}

/// [`spawn_weir`] with more environment variables (e.g. `WEIR_REDIS_URL`).
pub fn spawn_weir_env(config: &std::path::Path, rust_log: &str, env: &[(&str, &str)]) -> Running {
    spawn_weir_args(&["--config".as_ref(), config.as_os_str()], rust_log, env)
}

/// Runs `weir ARGS` (the gateway, or `weir mock`) as [`spawn_weir_env`]
/// does, and waits for the `listen=` line of its log.
pub fn spawn_weir_args(args: &[&std::ffi::OsStr], rust_log: &str, env: &[(&str, &str)]) -> Running {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .env("BACKEND_KEY", BACKEND_KEY)
        .env("RUST_LOG", rust_log)
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("weir starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let log2 = log.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listen=").nth(1) {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_matches('"');
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr.to_owned());
                }
            }
            let mut log = log2.lock().unwrap_or_else(|e| e.into_inner());
            log.push_str(&line);
            log.push('\n');
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("weir did not start: {}", log.lock().expect("log")));
    Running {
        child,
        addr: addr.parse().expect("listen address"),
        log,
    }
}

/// Sends `sig` (e.g. `-TERM`, `-HUP`) to a child process with `kill`.
pub fn signal(child: &std::process::Child, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// The child's exit code once it exits within `within`, else kills it and
/// returns `None`.
pub fn wait_exit(child: &mut std::process::Child, within: Duration) -> Option<i32> {
    let step = Duration::from_millis(20);
    for _ in 0..(within.as_millis() / step.as_millis()) {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.code();
        }
        std::thread::sleep(step);
    }
    let _ = child.kill();
    None
}

/// [`wait_exit`] for a running weir, off the test's runtime: its exit
/// code (`None` if it was still running after `within`, and was killed).
pub async fn exit_of(mut weir: Running, within: Duration) -> Option<i32> {
    tokio::task::spawn_blocking(move || wait_exit(&mut weir.child, within))
        .await
        .expect("the wait runs")
}

/// Polls `f` until it returns true or `within` passes.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

/// What a raw TCP exchange with weir produced.
#[derive(Debug)]
pub struct RawReply {
    /// Every byte the server sent before closing (or before `wait` ran out).
    pub bytes: Vec<u8>,
    /// Whether the server closed the connection (EOF or reset) within `wait`.
    pub closed: bool,
    /// When it closed, since the request was written.
    pub closed_after: Option<Duration>,
}

impl RawReply {
    /// The status code of the first response, 0 if none arrived.
    pub fn status(&self) -> u16 {
        let text = String::from_utf8_lossy(&self.bytes);
        text.strip_prefix("HTTP/1.1 ")
            .or_else(|| text.strip_prefix("HTTP/1.0 "))
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or(0)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
    /// Responses that arrived (status lines counted).
    pub fn responses(&self) -> usize {
        self.text().matches("HTTP/1.1 ").count()
    }
}

/// Writes `request` to a new connection (from a separate task, so a server
/// that answers and closes before reading it all is still heard), then
/// reads until the server closes or `wait` passes. This is how hostile
/// tests talk: no HTTP client that would fix the request.
pub async fn raw(addr: SocketAddr, request: Vec<u8>, wait: Duration) -> RawReply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to weir");
    let (mut read, mut write) = stream.into_split();
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        // The server may close before it read everything: that is an
        // answer, not a test failure.
        let _ = write.write_all(&request).await;
        write
    });
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = start + wait;
    let closed_after = loop {
        match tokio::time::timeout_at(deadline, read.read(&mut buf)).await {
            Err(_) => break None,
            Ok(Ok(0)) | Ok(Err(_)) => break Some(start.elapsed()),
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    };
    writer.abort();
    RawReply {
        bytes,
        closed: closed_after.is_some(),
        closed_after,
    }
}

/// A gateway in front of one mock started from `cfg` serving `model`
/// (backend `b1`, health checks off); `before` is TOML placed ahead of the
/// model (e.g. a `[server]` table).
pub async fn gateway_with_mock(
    model: &str,
    cfg: weir::mock::MockConfig,
    before: &str,
) -> (Handle, weir::mock::MockHandle) {
    let m = weir::mock::start(cfg.models(vec![model.into()]))
        .await
        .expect("mock starts");
    let toml = format!(
        "{before}\n[[models]]\nname = \"{model}\"\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &[model], 1)
    );
    (gateway(&toml).await, m)
}

/// The value of the `/metrics` sample `name` whose labels include every
/// `key="value"` in `labels`, summed over the samples that match (0 when
/// none does).
pub async fn metric(addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = get(addr, "/metrics").await.text();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A non-stream chat for `model` sent in a task of its own, for a test
/// that has it wait while it goes on.
pub fn chat_later(addr: SocketAddr, model: &'static str) -> tokio::task::JoinHandle<Reply> {
    tokio::spawn(async move { post(addr, "/v1/chat/completions", &chat(model, false)).await })
}

/// Waits (at most 5 s, else panics) until `n` requests of `model` wait in
/// its queue (`weir_queue_depth`).
pub async fn queued(addr: SocketAddr, model: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metric(addr, "weir_queue_depth", &[("model", model)]).await != n as f64 {
        assert!(tokio::time::Instant::now() < deadline, "never {n} queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The bytes of a well-formed `POST /v1/chat/completions` with this JSON
/// body and extra header lines (each ending in CRLF), for raw sockets.
pub fn raw_chat(body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: weir\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The first line of `log` (a running weir's stderr as read so far, e.g.
/// [`Running::log`]) holding `text`, waited for up to 5 s: a line may reach
/// the reader just after what the test saw happen (an answer, a listener
/// closing, the process exiting).
pub async fn log_line(log: &std::sync::Mutex<String>, text: &str) -> Option<String> {
    let line = || {
        let log = log.lock().unwrap_or_else(|e| e.into_inner());
        log.lines().find(|l| l.contains(text)).map(str::to_owned)
    };
    if eventually(Duration::from_secs(5), || line().is_some()).await {
        line()
    } else {
        None
    }
}

/// For a model whose two backends are `busy` (one slot, slow) and
/// `limited` (answering 429), with `max_attempts = 1`: occupies `busy`
/// with one request and has `limited` answer another its 429 (a 502), in
/// whichever order the balancer sends them. Returns the request holding
/// `busy`.
pub async fn hold_one_and_draw_a_429(
    addr: SocketAddr,
    model: &'static str,
    busy: &weir::mock::MockHandle,
    limited: &weir::mock::MockHandle,
) -> tokio::task::JoinHandle<Reply> {
    let chat_later = || {
        tokio::spawn(async move { post(addr, "/v1/chat/completions", &chat(model, false)).await })
    };
    let held = chat_later();
    assert!(
        eventually(Duration::from_secs(5), || busy.in_flight() == 1
            || limited.requests() == 1)
        .await
    );
    if limited.requests() == 1 {
        assert_eq!(held.await.unwrap().status, 502);
        let held = chat_later();
        assert!(eventually(Duration::from_secs(5), || busy.in_flight() == 1).await);
        held
    } else {
        let r = post(addr, "/v1/chat/completions", &chat(model, false)).await;
        assert_eq!(r.status, 502, "{}", r.text());
        held
    }
}
