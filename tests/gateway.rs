//! The gateway core through real sockets: proxying, streaming, errors,
//! header hygiene, secrets, balancing.

mod common;

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir::mock::{self, MockConfig};

const MODEL: &str = "m1";

async fn one_backend(cfg: MockConfig, extra: &str) -> (weir::Handle, weir::mock::MockHandle) {
    let m = mock::start(cfg.models(vec![MODEL.into()])).await.unwrap();
    let toml = format!(
        "{extra}\n[[models]]\nname = \"{MODEL}\"\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &[MODEL], 1)
    );
    (gateway(&toml).await, m)
}

#[tokio::test]
async fn non_stream_chat_completions_and_embeddings_pass_through() {
    let (gw, m) = one_backend(MockConfig::default(), "").await;
    let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["object"], "chat.completion");
    assert_eq!(j["model"], MODEL);
    assert!(j["choices"][0]["message"]["content"].is_string());
    assert!(j["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(r.header("x-weir-backend"), "b1");
    assert_eq!(r.header("x-request-id").len(), 32);

    let r = post(
        gw.addr(),
        "/v1/completions",
        &format!(r#"{{"model":"{MODEL}","prompt":"Say hi"}}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "text_completion");

    let r = post(
        gw.addr(),
        "/v1/embeddings",
        &format!(r#"{{"model":"{MODEL}","input":["a","b"]}}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "list");
    assert!(r.json()["data"][0]["embedding"].is_array());

    // The mock saw the original paths under its base URL.
    let paths: Vec<String> = m.recorded().iter().map(|r| r.uri.clone()).collect();
    assert!(
        paths.iter().any(|p| p.ends_with("/v1/chat/completions")),
        "{paths:?}"
    );
    assert!(
        paths.iter().any(|p| p.ends_with("/v1/embeddings")),
        "{paths:?}"
    );
}

#[tokio::test]
async fn client_request_id_is_kept_and_forwarded() {
    let (gw, m) = one_backend(MockConfig::default(), "").await;
    let r = send(
        &client(),
        "POST",
        gw.addr(),
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-request-id", "my-trace-42"),
        ],
        chat(MODEL, false),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), "my-trace-42");
    let seen = m.recorded();
    assert_eq!(seen.last().unwrap().headers["x-request-id"], "my-trace-42");
}

#[tokio::test]
async fn stream_arrives_as_sent_not_buffered() {
    // 20 chunks at 20 tokens/s: the backend spends ~950 ms or more between
    // its first and last chunk. A buffering proxy would deliver them all at
    // once; weir must deliver them spread out. (The margin is wide: the
    // mock catches up on frames a stalled thread held back.)
    let (gw, _m) = one_backend(MockConfig::default().tokens_per_sec(20.0).chunks(20), "").await;
    let s = post_stream(gw.addr(), "/v1/chat/completions", &chat(MODEL, true)).await;
    assert_eq!(s.status, 200);
    assert!(s.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(s.headers["x-weir-backend"], "b1");
    let text = s.text();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let events = s.events();
    assert!(events.len() >= 6, "{events:?}");
    assert_eq!(events[0]["object"], "chat.completion.chunk");
    assert!(
        s.frames.len() >= 3,
        "chunks were coalesced: {} frames",
        s.frames.len()
    );
    let first = s.frames.first().unwrap().0;
    let last = s.frames.last().unwrap().0;
    assert!(
        last - first >= Duration::from_millis(500),
        "first chunk at {first:?}, last at {last:?}: the stream was buffered"
    );
}

#[tokio::test]
async fn models_are_listed_by_weir() {
    let (gw, m) = one_backend(MockConfig::default(), "").await;
    let r = get(gw.addr(), "/v1/models").await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["object"], "list");
    assert_eq!(j["data"][0]["id"], MODEL);
    assert_eq!(j["data"][0]["object"], "model");
    let r = get(gw.addr(), &format!("/v1/models/{MODEL}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["id"], MODEL);
    get(gw.addr(), "/v1/models/nope").await.assert_error(
        404,
        "invalid_request_error",
        "model_not_found",
    );
    assert_eq!(m.requests(), 0, "weir answers /v1/models itself");
}

/// An id with a slash arrives percent-encoded from the OpenAI SDKs
/// (`models.retrieve("org/model-x")`) and is found decoded.
#[tokio::test]
async fn model_ids_are_percent_decoded() {
    let (gw, _m) = gateway_with_mock("org/model-x", MockConfig::default(), "").await;
    for path in ["/v1/models/org%2Fmodel-x", "/v1/models/org%2fmodel%2Dx"] {
        let r = get(gw.addr(), path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.json()["id"], "org/model-x", "{path}");
    }
    get(gw.addr(), "/v1/models/org%FFx").await.assert_error(
        404,
        "invalid_request_error",
        "model_not_found",
    );
}

#[tokio::test]
async fn client_errors_are_openai_shaped() {
    let (gw, m) = one_backend(MockConfig::default(), "[server]\nmax_body_bytes = 1000\n").await;
    let a = gw.addr();
    post(a, "/v1/chat/completions", "not json")
        .await
        .assert_error(400, "invalid_request_error", "invalid_json");
    post(a, "/v1/chat/completions", "[1,2]").await.assert_error(
        400,
        "invalid_request_error",
        "invalid_json",
    );
    post(a, "/v1/chat/completions", r#"{"messages":[]}"#)
        .await
        .assert_error(400, "invalid_request_error", "missing_model");
    post(a, "/v1/chat/completions", r#"{"model":{"x":1}}"#)
        .await
        .assert_error(400, "invalid_request_error", "missing_model");
    post(a, "/v1/chat/completions", &chat("unknown-model", false))
        .await
        .assert_error(404, "invalid_request_error", "model_not_found");
    let big = format!(r#"{{"model":"{MODEL}","prompt":"{}"}}"#, "x".repeat(2000));
    post(a, "/v1/completions", &big).await.assert_error(
        413,
        "invalid_request_error",
        "request_too_large",
    );
    assert_eq!(m.requests(), 0, "no bad request reached the backend");
}

#[tokio::test]
async fn oversized_body_is_refused_without_reading_it() {
    let (gw, m) = one_backend(MockConfig::default(), "[server]\nmax_body_bytes = 1000\n").await;
    // Announce 10 MB and send only the headers: weir must answer 413 at
    // once rather than wait for a body it will never accept.
    let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 10000000\r\n\r\n{\"model\":")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answered at once")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("request_too_large"), "{head}");
    assert_eq!(m.requests(), 0);
}

#[tokio::test]
async fn api_keys_are_checked_and_never_forwarded() {
    let (gw, m) = one_backend(
        MockConfig::default(),
        "[server]\napi_keys_env = \"CLIENT_KEYS\"\n",
    )
    .await;
    let a = gw.addr();
    let c = client();
    let json = ("content-type", "application/json");
    send(
        &c,
        "POST",
        a,
        "/v1/chat/completions",
        &[json],
        chat(MODEL, false),
    )
    .await
    .assert_error(401, "authentication_error", "invalid_api_key");
    send(
        &c,
        "POST",
        a,
        "/v1/chat/completions",
        &[json, ("authorization", "Bearer wrong")],
        chat(MODEL, false),
    )
    .await
    .assert_error(401, "authentication_error", "invalid_api_key");
    let ok = send(
        &c,
        "POST",
        a,
        "/v1/chat/completions",
        &[
            json,
            ("authorization", "Bearer client-key-2"),
            ("x-api-key", "client-key-2"),
        ],
        chat(MODEL, false),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let seen = m.recorded();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(h["authorization"], format!("Bearer {BACKEND_KEY}"));
    assert!(h.get("x-api-key").is_none());
    assert!(!format!("{h:?}").contains("client-key-2"));
    // The backend's key never reaches the client.
    assert!(!format!("{:?}{}", ok.headers, ok.text()).contains(BACKEND_KEY));
}

/// The client's `OpenAI-Organization` and `OpenAI-Project` scope its own
/// key, which never goes upstream: they stay behind with it, so a provider
/// never sees them beside the backend's key. Forwarding headers pass as the
/// client sent them, and weir adds none of its own (README "Headers").
#[tokio::test]
async fn the_client_keys_organization_and_project_stay_behind() {
    let (gw, m) = one_backend(MockConfig::default(), "").await;
    let c = client();
    let ok = send(
        &c,
        "POST",
        gw.addr(),
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("OpenAI-Organization", "org-client"),
            ("openai-project", "proj_client"),
            ("x-forwarded-for", "10.0.0.7"),
            ("forwarded", "for=10.0.0.7"),
            ("x-end-to-end", "kept"),
        ],
        chat(MODEL, false),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let bare = send(
        &c,
        "POST",
        gw.addr(),
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        chat(MODEL, false),
    )
    .await;
    assert_eq!(bare.status, 200, "{}", bare.text());
    let seen = m.recorded();
    assert_eq!(seen.len(), 2);
    let h = &seen[0].headers;
    assert!(h.get("openai-organization").is_none(), "{h:?}");
    assert!(h.get("openai-project").is_none(), "{h:?}");
    assert_eq!(h["authorization"], format!("Bearer {BACKEND_KEY}"));
    assert_eq!(h["x-end-to-end"], "kept");
    assert_eq!(h["x-forwarded-for"], "10.0.0.7");
    assert_eq!(h["forwarded"], "for=10.0.0.7");
    let h = &seen[1].headers;
    for added in ["x-forwarded-for", "forwarded", "x-real-ip", "via"] {
        assert!(h.get(added).is_none(), "{added}: {h:?}");
    }
}

#[tokio::test]
async fn unreachable_backend_gives_502() {
    // Bind and drop a listener to get a port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let toml = format!(
        "[[models]]\nname = \"{MODEL}\"\n\n{}{QUIET}",
        backend("dead", &format!("http://127.0.0.1:{port}/v1"), &[MODEL], 1)
    );
    let gw = gateway(&toml).await;
    post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false))
        .await
        .assert_error(502, "upstream_error", "bad_gateway");
}

#[tokio::test]
async fn hanging_backend_gives_504_after_first_byte_timeout() {
    let (gw, _m) = one_backend(
        MockConfig::default().hang(true),
        "[server]\nfirst_byte_timeout = \"200ms\"\n",
    )
    .await;
    post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false))
        .await
        .assert_error(504, "timeout", "upstream_timeout");
}

#[tokio::test]
async fn upstream_client_errors_are_returned_as_they_came() {
    let m = mock::start(MockConfig::default().models(vec![MODEL.into()]))
        .await
        .unwrap();
    m.update(|c| c.status_override = Some(400));
    let toml = format!(
        "[[models]]\nname = \"{MODEL}\"\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &[MODEL], 1)
    );
    let gw = gateway(&toml).await;
    let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-weir-backend"), "b1");
    assert_eq!(m.requests(), 1, "a 4xx is not retried");
}

/// A backend that sends `Content-Length` beside `Transfer-Encoding:
/// chunked`: the chunks frame the body (RFC 9112 §6.3), so the stale length
/// must not reach the client, which would cut the body where it says.
#[tokio::test]
async fn a_backend_length_beside_chunked_framing_is_dropped() {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let body = format!(
        r#"{{"object":"chat.completion","pad":"{}"}}"#,
        "x".repeat(100)
    );
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let gw = gateway_before(upstream, answer).await;
    let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 200);
    assert_ne!(r.header("content-length"), "5");
    assert_eq!(r.text(), body);
}

/// A gateway whose one backend `raw` answers every request with `answer`.
async fn gateway_before(upstream: tokio::net::TcpListener, answer: String) -> weir::Handle {
    let up_addr = upstream.local_addr().unwrap();
    answer_every_request(upstream, answer);
    let toml = format!(
        "[[models]]\nname = \"{MODEL}\"\n\n{}{QUIET}",
        backend("raw", &format!("http://{up_addr}/v1"), &[MODEL], 1)
    );
    gateway(&toml).await
}

/// SPEC "Secrets": a backend's error answer that quotes the key weir sent
/// (as hosted APIs do for a key they refuse) reaches the client without
/// it, whether the answer is framed by chunks (the key split across two)
/// or by a length, which then no longer holds.
#[tokio::test]
async fn a_backend_error_quoting_its_key_reaches_the_client_without_it() {
    let (start, end) = BACKEND_KEY.split_at(7);
    let message = |key: &str| {
        format!(
            r#"{{"error":{{"message":"Incorrect API key provided: {key}.","type":"invalid_request_error"}}}}"#
        )
    };
    let whole = message(BACKEND_KEY);
    let (first, second) = whole.split_at(whole.find(end).unwrap());
    assert!(first.ends_with(start));
    let chunked = format!(
        "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n{:x}\r\n{second}\r\n0\r\n\r\n",
        first.len(),
        second.len()
    );
    let sized = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{whole}",
        whole.len()
    );
    for (answer, status) in [(chunked, 401), (sized, 403)] {
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = gateway_before(upstream, answer).await;
        let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
        assert_eq!(r.status, status, "{}", r.text());
        assert_eq!(r.text(), message("[redacted]"), "{status}");
        assert!(!format!("{:?}", r.headers).contains(BACKEND_KEY));
    }
}

/// SPEC "Secrets": a backend header that carries the key weir sent (one
/// echoing `Authorization`, a redirect with the key in it) reaches the
/// client with the key replaced, on a success as on an error; the header's
/// other values and the other headers pass as they came.
#[tokio::test]
async fn a_backend_header_quoting_its_key_reaches_the_client_without_it() {
    for (status, body) in [
        ("200 OK", r#"{"object":"chat.completion"}"#),
        ("400 Bad Request", r#"{"error":{"message":"no"}}"#),
    ] {
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nx-echo-auth: Bearer {BACKEND_KEY}\r\nx-other: kept\r\nX-Echo-Auth: plain\r\nlink: <https://h/?k={BACKEND_KEY}&again={BACKEND_KEY}>\r\nx-request-id: {BACKEND_KEY}\r\nx-weir-backend: {BACKEND_KEY}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = gateway_before(upstream, answer).await;
        let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
        assert!(
            !format!("{:?}", r.headers).contains(BACKEND_KEY),
            "{:?}",
            r.headers
        );
        let echoed: Vec<&str> = (r.headers.get_all("x-echo-auth").iter())
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(echoed, ["Bearer [redacted]", "plain"], "{status}");
        assert_eq!(
            r.header("link"),
            "<https://h/?k=[redacted]&again=[redacted]>"
        );
        assert_eq!(r.header("x-other"), "kept");
        // A backend's copies of weir's own headers never pass, key or not.
        assert_eq!(r.headers.get_all("x-request-id").iter().count(), 1);
        assert_eq!(r.headers.get_all("x-weir-backend").iter().count(), 1);
        assert_eq!(r.header("x-weir-backend"), "raw");
        assert_eq!(r.text(), body, "{status}");
    }
}

/// A backend written by hand: reads one request per connection and sends
/// `answer`, on every connection.
fn answer_every_request(upstream: tokio::net::TcpListener, answer: String) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = upstream.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
}

/// The weir binary (logging at info) in front of one raw backend that
/// answers every request 204, and the directory of its config.
async fn weir_before_a_204_backend() -> (Running, tempfile::TempDir) {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    answer_every_request(upstream, "HTTP/1.1 204 No Content\r\n\r\n".to_owned());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.toml");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[models]]\nname = \"{MODEL}\"\n\n{}{QUIET}",
        backend("raw", &format!("http://{up_addr}/v1"), &[MODEL], 1)
    );
    std::fs::write(&path, toml).unwrap();
    (spawn_weir_env(&path, "info", &[]), dir)
}

/// A backend's 204 is the whole answer: the access log says `complete`,
/// not that the client left.
#[tokio::test]
async fn a_bodiless_backend_answer_is_logged_as_complete() {
    let (weir, _dir) = weir_before_a_204_backend().await;
    let r = post(weir.addr, "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 204);
    let line = log_line(&weir.log, "status=204").await.expect("a log line");
    assert!(line.contains("ending=\"complete\""), "{line}");
}

/// A client that leaves while sending its body (HTTP/1.1: its connection
/// closes short of `content-length`; HTTP/2: its connection goes with the
/// stream's body unfinished) is logged as gone, with nginx's 499, not as a
/// 400 answered `complete`: nobody received an answer. One that only
/// half-closed and still reads gets the 400. An HTTP/2 body that ends
/// short of its `content-length` (the client still there, h2 resetting
/// the stream) is the client's error: 400, not a client that left.
#[tokio::test]
async fn a_client_leaving_mid_body_is_logged_as_gone() {
    let (weir, _dir) = weir_before_a_204_backend().await;

    let mut h1 = tokio::net::TcpStream::connect(weir.addr).await.unwrap();
    h1.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: weir\r\ncontent-type: application/json\r\n\
          content-length: 100\r\nx-request-id: gone-h1\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    h1.shutdown().await.unwrap();
    let mut answer = String::new();
    let _ = h1.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("invalid_body"), "{answer}");

    // weir must have the stream before its connection goes: a connection
    // dropped earlier carries no request to log. Under load that can take
    // longer, so the wait grows until one is logged.
    let mut logged = None;
    for (n, wait) in [200u64, 1000, 3000].into_iter().enumerate() {
        let id = format!("gone-h2-{n}");
        h2_body_then(weir.addr, &id, Duration::from_millis(wait), false).await;
        if let Some(line) = log_line(&weir.log, &format!("request_id=\"{id}\"")).await {
            logged = Some(line);
            break;
        }
    }
    let line = logged.unwrap_or_else(|| panic!("a log line:\n{}", weir.log.lock().unwrap()));
    assert!(
        line.contains("status=499"),
        "{line}\n{}",
        weir.log.lock().unwrap()
    );
    assert!(line.contains("ending=\"client_gone\""), "{line}");
    let line = log_line(&weir.log, "request_id=\"gone-h1\"")
        .await
        .unwrap_or_else(|| panic!("a log line for gone-h1:\n{}", weir.log.lock().unwrap()));
    assert!(line.contains("status=499"), "{line}");
    assert!(line.contains("ending=\"client_gone\""), "{line}");
    let gone = metric(
        weir.addr,
        "weir_requests_total",
        &[("model", ""), ("backend", ""), ("status", "499")],
    )
    .await;
    assert_eq!(gone, 2.0);

    h2_body_then(weir.addr, "short-h2", Duration::ZERO, true).await;
    let line = log_line(&weir.log, "request_id=\"short-h2\"")
        .await
        .unwrap_or_else(|| panic!("a log line for short-h2:\n{}", weir.log.lock().unwrap()));
    assert!(line.contains("status=400"), "{line}");
    assert!(line.contains("ending=\"complete\""), "{line}");
}

/// Over a new HTTP/2 connection to `addr`: a POST promising 100 bytes, 9
/// of them sent; then, after `wait`, the body ended there (`end`: the
/// stream's END_STREAM, the connection kept) or the connection dropped.
async fn h2_body_then(addr: std::net::SocketAddr, id: &str, wait: Duration, end: bool) {
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    // The socket as the test holds it, to cut: hyper keeps its connection
    // (and a graceful close) in a task of its own.
    let cut = tcp.try_clone().unwrap();
    tcp.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let (mut body_tx, body) =
        http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(1);
    let request = http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("content-length", "100")
        .header("x-request-id", id)
        .body(body)
        .unwrap();
    let answer = tokio::spawn(async move { sender.send_request(request).await });
    body_tx
        .send_data(Bytes::from_static(b"{\"model\":"))
        .await
        .unwrap();
    tokio::time::sleep(wait).await;
    if end {
        drop(body_tx);
        let _ = answer.await;
        conn.abort();
    } else {
        cut.shutdown(std::net::Shutdown::Both).unwrap();
        let _ = answer.await;
        drop(body_tx);
        conn.abort();
    }
}

/// Every answer has its access log line: also a head that could not be
/// parsed (method and path `-`, the request id sent back), and a client's
/// model name, which it controls, is logged and quoted only in part.
#[tokio::test]
async fn refusals_of_unparsable_heads_are_logged_and_long_models_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.toml");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[models]]\nname = \"{MODEL}\"\n\n{}{QUIET}",
        backend("b", "http://127.0.0.1:9/v1", &[MODEL], 1)
    );
    std::fs::write(&path, toml).unwrap();
    let weir = spawn_weir_env(&path, "info", &[]);
    let reply = raw(
        weir.addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n".to_vec(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(reply.status(), 400);
    let text = String::from_utf8_lossy(&reply.bytes).to_ascii_lowercase();
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("a request id")
        .trim()
        .to_owned();
    let line = log_line(&weir.log, &id).await.expect("a log line");
    assert!(
        line.contains("method=\"-\"") || line.contains("method=-"),
        "{line}"
    );
    assert!(line.contains("status=400"), "{line}");
    let long = "z".repeat(100_000);
    let r = post(weir.addr, "/v1/chat/completions", &chat(&long, false)).await;
    r.assert_error(404, "invalid_request_error", "model_not_found");
    assert!(r.text().len() < 1000, "{}", r.text().len());
    let line = log_line(&weir.log, "status=404").await.expect("a log line");
    assert!(line.len() < 1000, "{}", line.len());
    assert!(line.contains(&"z".repeat(256)), "{line}");
}

/// A backend that repeats its `Content-Length` (two lines, or a list of
/// equal values) is read as the one length they agree on, and the client
/// gets that length once: Node's parser, for one, refuses a repeated one
/// (RFC 9110 §8.6).
#[tokio::test]
async fn a_repeated_backend_length_reaches_the_client_once() {
    let body = r#"{"object":"chat.completion","choices":[]}"#;
    for lengths in [
        format!("content-length: {0}\r\nContent-Length: {0}\r\n", body.len()),
        format!("content-length: {0}, {0}\r\n", body.len()),
    ] {
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        let answer =
            format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{lengths}\r\n{body}");
        answer_every_request(upstream, answer);
        let toml = format!(
            "[[models]]\nname = \"{MODEL}\"\n\n{}{QUIET}",
            backend("raw", &format!("http://{up_addr}/v1"), &[MODEL], 1)
        );
        let gw = gateway(&toml).await;
        let request = raw_chat(&chat(MODEL, false), "connection: close\r\n");
        let reply = raw(gw.addr(), request, Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&reply.bytes).into_owned();
        assert_eq!(reply.status(), 200, "{text}");
        let (head, rest) = text.split_once("\r\n\r\n").unwrap();
        let lines: Vec<&str> = head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("content-length:"))
            .collect();
        assert_eq!(lines, [format!("content-length: {}", body.len())], "{head}");
        assert_eq!(rest, body);
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_both_ways() {
    // An upstream written by hand, so it can send hop-by-hop headers back.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        let mut buf = vec![0u8; 65536];
        let mut got = Vec::new();
        loop {
            let n = s.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            if n == 0 || got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                break;
            }
        }
        *seen2.lock().unwrap() = String::from_utf8_lossy(&got).to_lowercase();
        let body = r#"{"object":"chat.completion","choices":[]}"#;
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: x-up-hop\r\nx-up-hop: secret\r\nkeep-alive: timeout=5\r\nx-up-kept: yes\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nx-ratelimit-limit-requests: 999\r\nx-ratelimit-limit-tokens: 5\r\nx-request-id: from-backend\r\nx-weir-backend: spoofed\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await.unwrap();
    });
    let toml = format!(
        "[limits]\nrequests_per_minute = 1000\n\n[[models]]\nname = \"{MODEL}\"\n\n{}{QUIET}",
        backend("raw", &format!("http://{up_addr}/v1"), &[MODEL], 1)
    );
    let gw = gateway(&toml).await;
    let r = send(
        &client(),
        "POST",
        gw.addr(),
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("connection", "x-client-hop"),
            ("x-client-hop", "1"),
            ("te", "trailers"),
            ("x-client-kept", "yes"),
        ],
        chat(MODEL, false),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.headers.get("x-up-hop").is_none());
    assert!(r.headers.get("keep-alive").is_none());
    assert_eq!(r.header("x-up-kept"), "yes");
    let all = |name: &str| -> Vec<String> {
        r.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        all("set-cookie"),
        ["a=1", "b=2"],
        "repeated headers pass in order"
    );
    // What weir sets replaces the backend's header of the same name: one
    // value each, weir's. A backend's own limits never pass: a kind weir
    // has no limit for has no headers (SPEC).
    assert_eq!(all("x-ratelimit-limit-requests"), ["1000"]);
    assert!(all("x-ratelimit-limit-tokens").is_empty());
    assert_eq!(all("x-weir-backend"), ["raw"]);
    let ids = all("x-request-id");
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_ne!(ids[0], "from-backend");
    assert_eq!(all("content-length").len(), 1);
    assert_eq!(all("date").len(), 1);
    let upstream_saw = seen.lock().unwrap().clone();
    assert!(!upstream_saw.contains("x-client-hop"), "{upstream_saw}");
    assert!(!upstream_saw.contains("\r\nte:"), "{upstream_saw}");
    // The backend gets its own Host and this body's length, once each.
    assert_eq!(
        upstream_saw.matches("\r\nhost:").count(),
        1,
        "{upstream_saw}"
    );
    assert!(
        upstream_saw.contains(&format!("\r\nhost: {up_addr}\r\n")),
        "{upstream_saw}"
    );
    assert_eq!(
        upstream_saw.matches("\r\ncontent-length:").count(),
        1,
        "{upstream_saw}"
    );
    assert!(
        upstream_saw.contains("x-client-kept: yes"),
        "{upstream_saw}"
    );
    assert!(upstream_saw.contains(&format!(
        "authorization: bearer {}",
        BACKEND_KEY.to_lowercase()
    )));
}

#[tokio::test]
async fn weights_three_to_one_interleave() {
    three_to_one_interleaves(&[]).await;
}

/// A new connection per request goes to each lane in turn; picks still
/// follow one interleaved sequence (one cursor for every lane), not one per
/// lane, which bunches them when consecutive requests land on different
/// lanes.
#[tokio::test]
async fn weights_interleave_across_lanes_too() {
    three_to_one_interleaves(&[("connection", "close")]).await;
}

async fn three_to_one_interleaves(headers: &[(&str, &str)]) {
    let heavy = mock::start(
        MockConfig::default()
            .models(vec![MODEL.into()])
            .record(false),
    )
    .await
    .unwrap();
    let light = mock::start(
        MockConfig::default()
            .models(vec![MODEL.into()])
            .record(false),
    )
    .await
    .unwrap();
    let toml = format!(
        "[[models]]\nname = \"{MODEL}\"\n\n{}{}{QUIET}",
        backend("heavy", &heavy.base_url(), &[MODEL], 3),
        backend("light", &light.base_url(), &[MODEL], 1)
    );
    let gw = gateway(&toml).await;
    let c = client();
    let mut picks = Vec::with_capacity(400);
    for _ in 0..400 {
        let r = send(
            &c,
            "POST",
            gw.addr(),
            "/v1/chat/completions",
            &[&[("content-type", "application/json")], headers].concat(),
            chat(MODEL, false),
        )
        .await;
        assert_eq!(r.status, 200);
        picks.push(r.header("x-weir-backend").to_owned());
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for p in &picks {
        *counts.entry(p.as_str()).or_default() += 1;
    }
    assert_eq!(counts.get("heavy"), Some(&300), "{counts:?}");
    assert_eq!(counts.get("light"), Some(&100), "{counts:?}");
    let longest = picks
        .chunk_by(|a, b| a == b)
        .filter(|r| r[0] == "heavy")
        .map(<[String]>::len)
        .max();
    assert_eq!(
        longest,
        Some(3),
        "never more than three heavy picks in a row"
    );
    assert_eq!(heavy.requests(), 300);
}

#[tokio::test]
async fn model_rename_changes_only_the_model() {
    let m = mock::start(MockConfig::default().models(vec!["upstream-name".into()]))
        .await
        .unwrap();
    let toml = format!(
        "[[models]]\nname = \"{MODEL}\"\n\n{}rename = {{ \"{MODEL}\" = \"upstream-name\" }}\n\n{QUIET}",
        backend("b1", &m.base_url(), &[MODEL], 1)
    );
    let gw = gateway(&toml).await;
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}],"temperature":0.5}}"#
    );
    let r = post(gw.addr(), "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = &m.recorded()[0].body;
    let expected = body.replace(
        &format!(r#""model":"{MODEL}""#),
        r#""model":"upstream-name""#,
    );
    assert_eq!(sent, &Bytes::from(expected));
}

#[tokio::test]
async fn admin_and_probe_endpoints_answer() {
    let (gw, _m) = one_backend(MockConfig::default(), "").await;
    let a = gw.addr();
    assert_eq!(get(a, "/healthz").await.status, 200);
    assert_eq!(get(a, "/readyz").await.status, 200);
    let b = get(a, "/admin/backends").await;
    assert_eq!(b.status, 200);
    let j = b.json();
    assert_eq!(j["backends"][0]["name"], "b1");
    assert_eq!(j["backends"][0]["models"][MODEL]["effective_weight"], 1);
    // SPEC: `"latency_ema_ms": N`, a number also before any request.
    assert_eq!(j["backends"][0]["latency_ema_ms"], 0.0, "{j}");
    assert!(!b.text().contains(BACKEND_KEY));
    assert_eq!(
        post(a, "/v1/chat/completions", &chat(MODEL, false))
            .await
            .status,
        200
    );
    let j = get(a, "/admin/backends").await.json();
    let ema = j["backends"][0]["latency_ema_ms"].as_f64().unwrap();
    assert!(ema > 0.0, "{j}");
    let m = get(a, "/metrics").await;
    assert_eq!(m.status, 200);
    assert!(m.text().contains("weir_build_info"), "{}", m.text());
    // `/` too (load balancers' default health check): unknown, not bad.
    for path in ["/nope", "/"] {
        get(a, path)
            .await
            .assert_error(404, "invalid_request_error", "unknown_url");
    }
    get(a, "/v1/../admin/backends").await.assert_error(
        400,
        "invalid_request_error",
        "invalid_path",
    );
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let limits = "[limits]\nrequests_per_minute = 1000\n";
    let (gw, _m) = one_backend(MockConfig::default(), limits).await;
    let c = h2c_client();
    let r = post_with(&c, gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-weir-backend"), "b1");
    assert_eq!(r.header("x-request-id").len(), 32);
    // HTTP/1.1 heads get these written directly; h2 through the map.
    assert_eq!(r.header("x-ratelimit-limit-requests"), "1000");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), "999");
    // A HEAD answer carries no DATA (RFC 9110), and the connection serves on.
    let r = send(&c, "HEAD", gw.addr(), "/healthz", &[], "").await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty(), "{}", r.text());
    let get = send(&c, "GET", gw.addr(), "/healthz", &[], "").await;
    assert_eq!(
        r.header("content-length"),
        get.body.len().to_string(),
        "HEAD has GET's length"
    );
    // Headers over 64 KiB get weir's own 431, as on HTTP/1.1.
    let big = "a".repeat(3500);
    let names: Vec<String> = (0..20).map(|i| format!("x-big-{i}")).collect();
    let headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), big.as_str())).collect();
    send(&c, "GET", gw.addr(), "/healthz", &headers, "")
        .await
        .assert_error(431, "invalid_request_error", "headers_too_large");
    let r = send(&c, "DELETE", gw.addr(), "/healthz", &[], "").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), "GET, HEAD");
    let r = send(&c, "GET", gw.addr(), "/healthz", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A backend's 204 reaches an HTTP/2 client without `content-length`
/// (RFC 9110 §8.6), as it reaches an HTTP/1.1 one: also when the backend
/// wrongly sent one (a non-zero one used to reach HTTP/2 clients, which
/// then waited for that body and failed the request).
#[tokio::test]
async fn h2c_a_204_carries_no_content_length() {
    let (gw, _m) = one_backend(MockConfig::default().status(204), "").await;
    check_204s(gw.addr()).await;
    for declared in [0, 30] {
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", upstream.local_addr().unwrap());
        answer_every_request(
            upstream,
            format!("HTTP/1.1 204 No Content\r\ncontent-length: {declared}\r\n\r\n"),
        );
        let gw = gateway(&format!(
            "[[models]]\nname = \"{MODEL}\"\n\n{}{QUIET}",
            backend("b1", &url, &[MODEL], 1)
        ))
        .await;
        check_204s(gw.addr()).await;
    }
}

/// A 204 through weir at `addr`, over HTTP/2 and HTTP/1.1: no body, no
/// `content-length`.
async fn check_204s(addr: std::net::SocketAddr) {
    for client in [h2c_client(), client()] {
        let r = post_with(&client, addr, "/v1/chat/completions", &chat(MODEL, false)).await;
        assert_eq!(r.status, 204, "{}", r.text());
        assert!(r.body.is_empty());
        assert_eq!(r.headers.get("content-length"), None);
        assert_eq!(r.header("x-weir-backend"), "b1");
    }
}

#[tokio::test]
async fn demo_starts_and_answers() {
    let demo = weir::demo::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let r = post(
        demo.gateway.addr(),
        "/v1/chat/completions",
        &chat(weir::demo::DEMO_MODEL, false),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(demo.instructions().contains("curl"));
    assert!(demo
        .instructions()
        .contains(&demo.gateway.addr().to_string()));
}

/// An HTTP/2 (prior knowledge) connection to `addr` whose client grants
/// each stream `window` bytes (hyper's default when `None`); the task
/// driving it ends when the connection closes.
async fn h2c(
    addr: std::net::SocketAddr,
    window: Option<u32>,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(window)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    (sender, tokio::spawn(conn))
}

/// An HTTP/2 client that grants a stream no window cannot hold its
/// response (and with it the model's only concurrency slot and the backend
/// request) past `request_timeout`: hyper never polls a body it cannot
/// send, so the connection is closed once the body outlives its deadline.
#[tokio::test]
async fn h2c_a_stream_without_window_is_cut_after_request_timeout() {
    let m = mock::start(
        MockConfig::default()
            .models(vec![MODEL.into()])
            .tokens_per_sec(20.0)
            .chunks(1000),
    )
    .await
    .unwrap();
    let toml = format!(
        "[server]\nrequest_timeout = \"1s\"\n\n[[models]]\nname = \"{MODEL}\"\nmax_concurrent = 1\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &[MODEL], 1)
    );
    let gw = gateway(&toml).await;
    let (mut sender, closed) = h2c(gw.addr(), Some(0)).await;
    let request = hyper::Request::post(format!("http://{}/v1/chat/completions", gw.addr()))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(chat(MODEL, true))))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let in_flight = || metric(gw.addr(), "weir_in_flight", &[("model", MODEL)]);
    assert_eq!(in_flight().await, 1.0);
    // request_timeout (1 s) and the grace (1 s), with room for a busy host.
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("the connection is closed")
        .unwrap()
        .ok();
    // The stream's task lets go of its body (and the slot) when the lane
    // next polls it, just after the connection it was cut with: the client
    // can see the close first.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while in_flight().await != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "the slot is back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(response);
}

/// weir's own answers are bounded the same way: a client that grants no
/// window and asks for a 404 or the model list (no key needed) cannot hold
/// its connection past `request_timeout` from the answer.
#[tokio::test]
async fn h2c_an_own_answer_without_window_is_cut_after_request_timeout() {
    let (gw, _m) = one_backend(
        MockConfig::default(),
        "[server]\nrequest_timeout = \"1s\"\nidle_timeout = \"60s\"\nheader_read_timeout = \"60s\"\n",
    )
    .await;
    for path in ["/v1/nope", "/v1/models"] {
        let (mut sender, closed) = h2c(gw.addr(), Some(0)).await;
        let request = hyper::Request::get(format!("http://{}{path}", gw.addr()))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert!(
            response.status() == 404 || response.status() == 200,
            "{path}"
        );
        // request_timeout (1 s) and the grace (1 s), with room for a busy host.
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .unwrap_or_else(|_| panic!("{path}: the connection is closed"))
            .unwrap()
            .ok();
        drop(response);
    }
}

/// HTTP/2 "rapid reset", also with each reset sent after the response
/// head (past h2's own guard, which counts resets before a stream is
/// accepted): a connection on which the client cancelled half or more of
/// at least 100 streams is closed (Envoy's rule). One that cancels fewer
/// stays open.
#[tokio::test]
async fn h2c_a_client_cancelling_most_of_its_streams_is_cut_off() {
    let (gw, _m) = one_backend(
        MockConfig::default().tokens_per_sec(1000.0).chunks(2000),
        "",
    )
    .await;
    let connect = || h2c(gw.addr(), None);
    // A stream (dropped after its head), or the model list (read whole).
    let request = |stream: bool| {
        let uri = format!("http://{}/v1/chat/completions", gw.addr());
        match stream {
            true => hyper::Request::post(uri)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(Bytes::from(chat(MODEL, true)))),
            false => hyper::Request::get(uri.replace("chat/completions", "models"))
                .body(http_body_util::Full::new(Bytes::new())),
        }
        .unwrap()
    };
    // 80 whole answers and 40 streams dropped after their head: fewer
    // than half cancelled, the connection stays.
    let (mut sender, closed) = connect().await;
    for i in 0..120 {
        let cancel = i % 3 == 0;
        let response = sender.send_request(request(cancel)).await.unwrap();
        assert_eq!(response.status(), 200);
        if !cancel {
            response.into_body().collect().await.unwrap();
        }
    }
    let response = sender.send_request(request(false)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(!closed.is_finished());
    // Every stream dropped after its head: closed at the 100th.
    let (mut sender, closed) = connect().await;
    for _ in 0..100 {
        match sender.send_request(request(true)).await {
            Ok(response) => drop(response),
            Err(_) => break,
        }
    }
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("the connection is closed")
        .unwrap()
        .ok();
    // Others are served as before.
    assert_eq!(
        post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false))
            .await
            .status,
        200
    );
}

/// On HTTP/2 too, ending `shutdown_grace` (as a second signal does, with
/// `grace_ender`) ends a stream still running with its SSE `error` event
/// and the stream's end, and answers a stream still queued (behind
/// `max_concurrent = 1`) with a 503 `shutting_down`, on the same
/// connection; then the gateway stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_streams_get_their_last_word_when_the_grace_is_ended() {
    let m = mock::start(
        MockConfig::default()
            .models(vec![MODEL.into()])
            .tokens_per_sec(10.0)
            .chunks(1000),
    )
    .await
    .unwrap();
    let toml = format!(
        "[server]\nshutdown_grace = \"60s\"\n\n[[models]]\nname = \"{MODEL}\"\nmax_concurrent = 1\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &[MODEL], 1)
    );
    let gw = gateway(&toml).await;
    let (mut sender, _conn) = h2c(gw.addr(), None).await;
    let request = |stream: bool| {
        hyper::Request::post(format!("http://{}/v1/chat/completions", gw.addr()))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(Bytes::from(chat(MODEL, stream))))
            .unwrap()
    };
    let response = sender.send_request(request(true)).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = tokio::spawn(response.into_body().collect());
    let mut waiting = sender.clone();
    let waiter = request(false);
    let waiter = tokio::spawn(async move {
        let response = waiting.send_request(waiter).await.unwrap();
        let status = response.status();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(gw.addr(), "weir_queue_depth", &[("model", MODEL)]).await != 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.shutdown();
    gw.grace_ender().cancel();

    let body = tokio::time::timeout(Duration::from_secs(10), body)
        .await
        .expect("the stream ended")
        .unwrap()
        .expect("the stream ended cleanly, not reset")
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    let (_, last) = text
        .rsplit_once("event: error\ndata: ")
        .unwrap_or_else(|| panic!("no error event: {text}"));
    let event: serde_json::Value =
        serde_json::from_str(last.trim_end()).expect("the event's data is JSON");
    assert_eq!(event["error"]["code"], "shutting_down", "{event}");

    let (status, body) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter was answered")
        .unwrap();
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    let j: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error");
    assert_eq!(j["error"]["type"], "service_unavailable", "{j}");
    assert_eq!(j["error"]["code"], "shutting_down", "{j}");
    assert!(
        tokio::time::timeout(Duration::from_secs(10), gw.wait())
            .await
            .is_ok(),
        "the gateway stopped"
    );
}

/// An HTTP/2 client that pings its idle connection keeps it for
/// `idle_timeout`: a PING is not the start of a request, so
/// `header_read_timeout` (1 s here) does not apply to it.
#[tokio::test]
async fn h2c_pings_on_an_idle_connection_do_not_shorten_it() {
    let timeouts = "[server]\nheader_read_timeout = \"1s\"\nidle_timeout = \"20s\"\n";
    let (gw, _m) = one_backend(MockConfig::default(), timeouts).await;
    let stream = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(200))
            .keep_alive_while_idle(true)
            .handshake::<_, http_body_util::Full<Bytes>>(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let get = || {
        hyper::Request::get(format!("http://{}/healthz", gw.addr()))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap()
    };
    let r = sender.send_request(get()).await.unwrap();
    assert_eq!(r.status(), 200);
    // Ten pings later, well past header_read_timeout.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = sender
        .send_request(get())
        .await
        .expect("the pinged connection is still open");
    assert_eq!(r.status(), 200);
}

/// Reads one whole request (head, then `content-length` bytes of body);
/// false when the connection ends first.
async fn read_one_request(s: &mut tokio::net::TcpStream) -> bool {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return true;
            }
        }
        match s.read(&mut buf).await {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
}

/// A backend that takes a request on a kept-alive connection and closes it
/// unanswered (as a crashing worker does) may have read it: weir does not
/// send it there again but retries it on another backend, counted as a
/// retry (SPEC "Retries": never the same backend twice while another is
/// available).
#[tokio::test]
async fn a_request_dropped_on_a_kept_alive_connection_goes_to_another_backend() {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = upstream.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let body = r#"{"object":"chat.completion","choices":[]}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                // Answers the first request, takes the second and closes.
                for answered in [true, false] {
                    if !read_one_request(&mut s).await {
                        return;
                    }
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if answered {
                        let _ = s.write_all(answer.as_bytes()).await;
                    }
                }
            });
        }
    });
    let other = mock::start(MockConfig::default().models(vec![MODEL.into()]))
        .await
        .unwrap();
    let toml = format!(
        "[[models]]\nname = \"{MODEL}\"\n\n{}{}{QUIET}",
        backend("a", &format!("http://{up_addr}/v1"), &[MODEL], 1000),
        backend("b", &other.base_url(), &[MODEL], 1)
    );
    let gw = gateway(&toml).await;
    // `a` takes nearly every first attempt; each of its connections (one
    // per lane) answers once and drops the next request.
    let (mut from_a, mut from_b) = (0usize, 0usize);
    for _ in 0..20 {
        let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        match r.header("x-weir-backend") {
            "a" => from_a += 1,
            _ => from_b += 1,
        }
    }
    let retries = metric(gw.addr(), "weir_retries_total", &[("model", MODEL)]).await;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let retries = retries as usize;
    assert!(retries > 0, "every dropped request was sent to a again");
    // Each retry went to `b`; `a` saw its answers and each dropped request
    // once, never a second copy.
    assert!(from_b >= retries, "{from_b} < {retries}");
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        from_a + retries
    );
}

/// An HTTP/2 connection whose timer runs out (here `header_read_timeout`
/// before any request) says GOAWAY before it closes (RFC 9113 §9.1), so a
/// client knows no request of its was taken.
#[tokio::test]
async fn h2c_timeouts_send_goaway_before_closing() {
    let timeouts = "[server]\nheader_read_timeout = \"1s\"\n";
    let (gw, _m) = one_backend(MockConfig::default(), timeouts).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    // The preface and an empty SETTINGS frame; nothing after it, and no
    // answer to the server's PING either.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut wire = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            wire.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_all)
        .await
        .expect("closed within 10 s");
    // Frame types, walking the 9-byte frame headers.
    let mut types = Vec::new();
    let mut at = 0;
    while let Some(header) = wire.get(at..at + 9) {
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        types.push(header[3]);
        at += 9 + len;
    }
    assert!(types.contains(&0x7), "no GOAWAY among frames {types:?}");
}

/// A body whose bytes are not the JSON weir reads `model` from is refused
/// before it is read, with the reason (SPEC: 400 `invalid_json`): a
/// multipart form (file uploads) or a compressed body. A plain JSON body
/// labelled `Content-Encoding: gzip` used to go to the backend labelled
/// compressed; a multipart form got "invalid number at line 1 column 2".
/// `identity` and a form `Content-Type` on JSON (`curl -d`) are served.
#[tokio::test]
async fn bodies_that_are_not_json_as_sent_are_refused_with_the_reason() {
    let (gw, m) = one_backend(MockConfig::default(), "").await;
    let c = client();
    let body = chat(MODEL, false);
    let path = "/v1/chat/completions";
    for (headers, why) in [
        (
            [
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            "Content-Encoding",
        ),
        (
            [
                ("content-type", "Multipart/Form-Data; boundary=x"),
                ("content-encoding", "identity"),
            ],
            "multipart bodies",
        ),
        (
            [
                ("content-type", "multipart/mixed; boundary=x"),
                ("content-encoding", "identity, br"),
            ],
            "Content-Encoding",
        ),
    ] {
        let r = send(&c, "POST", gw.addr(), path, &headers, body.clone()).await;
        r.assert_error(400, "invalid_request_error", "invalid_json");
        assert!(r.text().contains(why), "{}", r.text());
    }
    assert_eq!(m.requests(), 0);
    for headers in [
        [
            ("content-type", "application/json"),
            ("content-encoding", "identity, identity"),
        ],
        [
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-a", "b"),
        ],
    ] {
        let r = send(&c, "POST", gw.addr(), path, &headers, body.clone()).await;
        assert_eq!(r.status, 200, "{headers:?}: {}", r.text());
    }
    assert_eq!(m.requests(), 2);
    // And `multipart/mixed` as any multipart body.
    let mixed = [("content-type", "multipart/mixed; boundary=x")];
    let r = send(&c, "POST", gw.addr(), path, &mixed, body.clone()).await;
    assert!(r.text().contains("multipart bodies"), "{}", r.text());
}
