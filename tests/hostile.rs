//! SPEC "Hostile input and faults", client side: request framing and
//! smuggling attempts, malformed heads, oversized heads, hostile paths and
//! JSON bodies, slowloris, idle keep-alive connections and
//! `max_connections`, all over raw TCP (an HTTP client would fix the
//! request for us). For each: the status, whether the connection closed,
//! and that the backend saw nothing of it.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir::mock::{MockConfig, MockHandle};

const MODEL: &str = "m1";

/// A gateway in front of one recording mock; `server` is extra `[server]`
/// TOML.
async fn setup(server: &str) -> (weir::Handle, MockHandle) {
    gateway_with_mock(MODEL, MockConfig::default(), &format!("[server]\n{server}")).await
}

/// Nothing reached the backend, not even a connection, and weir still
/// serves a good request.
async fn assert_untouched_and_serving(gw: &weir::Handle, m: &MockHandle) {
    assert_eq!(m.requests(), 0, "the backend saw a request");
    assert_eq!(m.connections_accepted(), 0, "weir connected to the backend");
    let r = post(gw.addr(), "/v1/chat/completions", BODY).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

const BODY: &str = r#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;

/// A request head for `POST /v1/chat/completions` with these header lines
/// (CRLF added), followed by `body` as is.
fn post_with(headers: &[&str], body: &str) -> Vec<u8> {
    let mut out = String::from("POST /v1/chat/completions HTTP/1.1\r\nHost: weir\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// `BODY` as one chunk, then the last chunk.
fn chunked_body() -> String {
    format!("{:x}\r\n{BODY}\r\n0\r\n\r\n", BODY.len())
}

/// One hostile request and what weir must do with it.
struct Case {
    name: &'static str,
    request: Vec<u8>,
    /// The status weir answers with.
    status: u16,
    /// Whether weir must close the connection after answering.
    closes: bool,
}

fn case(name: &'static str, request: Vec<u8>, status: u16, closes: bool) -> Case {
    Case {
        name,
        request,
        status,
        closes,
    }
}

/// The request-smuggling and malformed-head battery: each case is refused,
/// nothing reaches the backend.
fn smuggling_cases() -> Vec<Case> {
    let cl = format!("Content-Length: {}", BODY.len());
    let chunked = chunked_body();
    let huge_header = format!("X-Big: {}", "a".repeat(1024 * 1024));
    let many_headers: Vec<String> = (0..100_000).map(|i| format!("X-H{i}: v")).collect();
    let many_headers: Vec<&str> = many_headers.iter().map(String::as_str).collect();
    let long_uri = format!(
        "POST /v1/chat/completions?q={} HTTP/1.1\r\nHost: weir\r\n{cl}\r\n\r\n{BODY}",
        "a".repeat(10 * 1024)
    );
    let two_big = [
        format!("X-A: {}", "a".repeat(33 * 1024)),
        format!("X-B: {}", "b".repeat(33 * 1024)),
    ];
    vec![
        // CL.TE: a front end that reads Content-Length would see "G" as the
        // start of the next request.
        case(
            "CL.TE",
            post_with(&[&cl, "Transfer-Encoding: chunked"], &format!("{chunked}G")),
            400,
            true,
        ),
        case(
            "TE.CL",
            post_with(&["Transfer-Encoding: chunked", &cl], &chunked),
            400,
            true,
        ),
        case(
            "CL.TE with a leading space in the TE value",
            post_with(&[&cl, "Transfer-Encoding:  chunked"], &chunked),
            400,
            true,
        ),
        case(
            "CL.TE with a tab before the TE value",
            post_with(&[&cl, "Transfer-Encoding:\tchunked"], &chunked),
            400,
            true,
        ),
        case(
            "CL.TE with the TE name in odd case",
            post_with(&["tRaNsFeR-eNcOdInG: chunked", &cl], &chunked),
            400,
            true,
        ),
        case(
            "TE.TE: chunked, identity",
            post_with(&["Transfer-Encoding: chunked, identity"], &chunked),
            400,
            true,
        ),
        case(
            "TE.TE: identity, chunked",
            post_with(&["Transfer-Encoding: identity, chunked"], &chunked),
            400,
            true,
        ),
        case(
            "TE.TE: two TE lines, chunked last",
            post_with(
                &["Transfer-Encoding: identity", "Transfer-Encoding: chunked"],
                &chunked,
            ),
            400,
            true,
        ),
        case(
            "TE.TE: two TE lines, chunked first",
            post_with(
                &["Transfer-Encoding: chunked", "Transfer-Encoding: x"],
                &chunked,
            ),
            400,
            true,
        ),
        case(
            "TE: xchunked",
            post_with(&["Transfer-Encoding: xchunked"], &chunked),
            400,
            true,
        ),
        case(
            "TE: chunked with a space before the colon",
            post_with(&["Transfer-Encoding : chunked"], &chunked),
            400,
            true,
        ),
        case(
            "TE: chunked with a tab before the colon",
            post_with(&["Transfer-Encoding\t: chunked"], &chunked),
            400,
            true,
        ),
        case(
            "TE in HTTP/1.0",
            format!("POST /v1/chat/completions HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}")
                .into_bytes(),
            400,
            true,
        ),
        case(
            "duplicate Content-Length, differing",
            post_with(&[&cl, "Content-Length: 7"], BODY),
            400,
            true,
        ),
        case(
            "Content-Length list 5, 6",
            post_with(&["Content-Length: 5, 6"], BODY),
            400,
            true,
        ),
        case(
            "negative Content-Length",
            post_with(&["Content-Length: -1"], BODY),
            400,
            true,
        ),
        case(
            "overflowing Content-Length",
            post_with(&["Content-Length: 184467440737095516160"], BODY),
            400,
            true,
        ),
        case(
            "Content-Length with a plus sign",
            post_with(&[&format!("Content-Length: +{}", BODY.len())], BODY),
            400,
            true,
        ),
        case(
            "bare LF head smuggling CL and TE",
            format!(
                "POST /v1/chat/completions HTTP/1.1\nHost: weir\n{cl}\nTransfer-Encoding: chunked\n\n{chunked}"
            )
            .into_bytes(),
            400,
            true,
        ),
        case(
            "NUL in a header value",
            post_with(&[&cl, "X-A: a\0b"], BODY),
            400,
            true,
        ),
        case(
            "bare CR in a header value",
            post_with(&[&cl, "X-A: a\rb"], BODY),
            400,
            true,
        ),
        case(
            "obs-fold continuation line",
            post_with(&[&cl, "X-A: a", " folded"], BODY),
            400,
            true,
        ),
        case(
            "huge chunk size",
            post_with(
                &["Transfer-Encoding: chunked"],
                "FFFFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n",
            ),
            400,
            true,
        ),
        case(
            // Zeros never overflow the size: only the line limit stops
            // weir from buffering them until the request times out.
            "a chunk-size line of 5,000 leading zeros",
            post_with(&["Transfer-Encoding: chunked"], &"0".repeat(5000)),
            400,
            true,
        ),
        case(
            "invalid chunk extension (bare LF)",
            post_with(
                &["Transfer-Encoding: chunked"],
                &format!("{:x};ext\nx\r\n{BODY}\r\n0\r\n\r\n", BODY.len()),
            ),
            400,
            true,
        ),
        case(
            "chunk size that is not hex",
            post_with(&["Transfer-Encoding: chunked"], "zz\r\nabc\r\n0\r\n\r\n"),
            400,
            true,
        ),
        case(
            "100 000 headers",
            post_with(&many_headers, BODY),
            431,
            true,
        ),
        case("a 1 MiB header", post_with(&[&huge_header], BODY), 431, true),
        case(
            "66 KiB of headers in two fields",
            post_with(&[&cl, &two_big[0], &two_big[1]], BODY),
            431,
            true,
        ),
        case("a 10 KiB request line", long_uri.into_bytes(), 414, true),
        case(
            "a 100 KiB request line (past the whole head's buffer)",
            format!(
                "GET /v1/{} HTTP/1.1\r\nHost: weir\r\n\r\n",
                "a".repeat(100 * 1024)
            )
            .into_bytes(),
            414,
            true,
        ),
        case(
            "space in the request target",
            format!("POST /v1/chat completions HTTP/1.1\r\nHost: weir\r\n{cl}\r\n\r\n{BODY}")
                .into_bytes(),
            400,
            true,
        ),
        case(
            "invalid method token",
            format!("P@ST /v1/chat/completions HTTP/1.1\r\nHost: weir\r\n{cl}\r\n\r\n{BODY}")
                .into_bytes(),
            400,
            true,
        ),
        case(
            "a Host that cannot name a host",
            format!("POST /v1/chat/completions HTTP/1.1\r\nHost: a b@c/d\r\n{cl}\r\n\r\n{BODY}")
                .into_bytes(),
            400,
            true,
        ),
        case(
            "an absolute-form target with userinfo",
            format!(
                "POST http://u@evil.example:1/v1/chat/completions HTTP/1.1\r\nHost: weir\r\n{cl}\r\n\r\n{BODY}"
            )
            .into_bytes(),
            400,
            true,
        ),
        case(
            "unknown HTTP version",
            format!("POST /v1/chat/completions HTTP/1.7\r\nHost: weir\r\n{cl}\r\n\r\n{BODY}")
                .into_bytes(),
            400,
            true,
        ),
        case(
            "space in a header name",
            post_with(&[&cl, "X A: b"], BODY),
            400,
            true,
        ),
    ]
}

/// Paths that must never be forwarded; the body is read, so the connection
/// may stay open.
fn path_cases() -> Vec<Case> {
    let req = |target: &str| {
        format!(
            "POST {target} HTTP/1.1\r\nHost: weir\r\nContent-Length: {}\r\n\r\n{BODY}",
            BODY.len()
        )
        .into_bytes()
    };
    vec![
        case("dot-dot segment", req("/v1/../admin/reload"), 400, false),
        case(
            "percent-encoded dot-dot",
            req("/v1/%2e%2e/admin/reload"),
            400,
            false,
        ),
        case(
            "mixed-case percent-encoded dot-dot",
            req("/v1/%2E%2e/chat/completions"),
            400,
            false,
        ),
        case("half-encoded dot-dot", req("/v1/.%2E/x"), 400, false),
        case(
            "dot-dots behind encoded slashes",
            req("/v1/..%2f..%2ftenant-b/chat/completions"),
            400,
            false,
        ),
        case(
            "dot-dot with a path parameter",
            req("/v1/..;x/chat/completions"),
            400,
            false,
        ),
        case(
            "malformed percent-encoding",
            req("/v1/chat%zz/completions"),
            400,
            false,
        ),
        // nginx refuses a NUL decoded from the path (400); a backend that
        // reads the path as a C string would stop at it (`..%00` is `..`).
        case("encoded NUL", req("/v1/chat/..%00"), 400, false),
        case(
            "encoded NUL inside a segment",
            req("/v1/chat%00/completions"),
            400,
            false,
        ),
        case("dot segment", req("/v1/./chat/completions"), 400, false),
        case("empty segment", req("/v1//chat/completions"), 400, false),
        case("trailing slash", req("/v1/chat/completions/"), 400, false),
        case(
            "authority-form (CONNECT)",
            b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n".to_vec(),
            400,
            false,
        ),
        case(
            "asterisk-form",
            b"OPTIONS * HTTP/1.1\r\nHost: weir\r\n\r\n".to_vec(),
            400,
            false,
        ),
        // `/v1` alone would be forwarded to the backend's base URL.
        case("bare /v1", req("/v1"), 404, false),
        case("bare /v1 with a query", req("/v1?x"), 404, false),
        case(
            "path outside the served routes",
            req("/etc/passwd"),
            404,
            false,
        ),
    ]
}

/// Runs every case on its own connection, all at once, and checks each.
async fn run_cases(addr: std::net::SocketAddr, cases: Vec<Case>) {
    let tasks: Vec<_> = cases
        .into_iter()
        .map(|c| {
            tokio::spawn(async move {
                // Cases that must close do so at once; the others are given
                // long enough to show that they stay open, and for their
                // answer to arrive on a loaded machine (all at once, with
                // 1 s one could come too late and count as none).
                let wait = Duration::from_secs(if c.closes { 10 } else { 3 });
                let reply = raw(addr, c.request, wait).await;
                (c.name, c.status, c.closes, reply)
            })
        })
        .collect();
    let mut failures = Vec::new();
    for t in tasks {
        let (name, status, closes, reply) = t.await.unwrap();
        // Every refusal is weir's own: an OpenAI error with a request id.
        let text = reply.text();
        let ok = reply.status() == status
            && reply.closed == closes
            && reply.responses() == 1
            && text.contains("\r\nx-request-id: ")
            && text.contains("{\"error\":{");
        if !ok {
            failures.push(format!(
                "{name}: want {status} closed={closes}, got {} closed={} ({} responses): {:?}",
                reply.status(),
                reply.closed,
                reply.responses(),
                reply.text().chars().take(300).collect::<String>()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[tokio::test]
async fn smuggling_and_malformed_heads_are_refused_and_never_forwarded() {
    let (gw, m) = setup("").await;
    let cases = smuggling_cases();
    assert!(cases.len() >= 25, "{} cases", cases.len());
    run_cases(gw.addr(), cases).await;
    assert_untouched_and_serving(&gw, &m).await;
}

#[tokio::test]
async fn hostile_paths_are_refused_and_never_forwarded() {
    let (gw, m) = setup("").await;
    run_cases(gw.addr(), path_cases()).await;
    assert_untouched_and_serving(&gw, &m).await;
}

/// weir's framing refusals carry an OpenAI error body, a request id and
/// `connection: close`.
#[tokio::test]
async fn framing_refusals_are_openai_errors_with_a_request_id() {
    let (gw, _m) = setup("").await;
    let cl = format!("Content-Length: {}", BODY.len());
    let reply = raw(
        gw.addr(),
        post_with(&["Transfer-Encoding: chunked", &cl], &chunked_body()),
        Duration::from_secs(10),
    )
    .await;
    let text = reply.text();
    assert_eq!(reply.status(), 400, "{text}");
    assert!(text.contains("x-request-id: "), "{text}");
    assert!(text.contains("\"code\":\"invalid_framing\""), "{text}");
    assert!(text.contains("connection: close"), "{text}");
}

/// A refused head whose headers were read keeps the client's
/// `x-request-id` (SPEC: every response carries the client's id), also
/// when the request target cannot be parsed, as the framing refusals do;
/// the code stays `invalid_framing`.
#[tokio::test]
async fn refusals_of_a_read_head_keep_the_client_request_id() {
    let (gw, m) = setup("").await;
    let cl = format!("Content-Length: {}", BODY.len());
    let cases = [
        (
            "invalid request target",
            b"GET /v1/models/a<b HTTP/1.1\r\nHost: x\r\nx-request-id: keep-me-123\r\n\r\n".to_vec(),
        ),
        (
            "Content-Length beside Transfer-Encoding",
            post_with(
                &[
                    "Transfer-Encoding: chunked",
                    &cl,
                    "x-request-id: keep-me-123",
                ],
                &chunked_body(),
            ),
        ),
    ];
    for (name, request) in cases {
        let reply = raw(gw.addr(), request, Duration::from_secs(10)).await;
        let text = reply.text();
        assert_eq!(reply.status(), 400, "{name}: {text}");
        assert!(
            text.contains("\r\nx-request-id: keep-me-123\r\n"),
            "{name}: {text}"
        );
        assert!(
            text.contains("\"code\":\"invalid_framing\""),
            "{name}: {text}"
        );
    }
    assert_untouched_and_serving(&gw, &m).await;
}

/// What RFC 9112 lets a server accept is accepted, and reaches the backend
/// as one clean request: bare LF line ends, `CHUNKED` in capitals, a
/// repeated identical `Content-Length`, absolute-form targets (served by
/// the configured backend, whatever host they name).
#[tokio::test]
async fn lenient_but_unambiguous_requests_are_forwarded_cleanly() {
    let (gw, m) = gateway_with_mock(MODEL, MockConfig::default().record(true), "").await;
    let cl = format!("Content-Length: {}", BODY.len());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "bare LF line ends",
            format!("POST /v1/chat/completions HTTP/1.1\nHost: weir\n{cl}\nConnection: close\n\n{BODY}")
                .into_bytes(),
        ),
        (
            "CHUNKED in capitals",
            post_with(
                &["Transfer-Encoding: CHUNKED", "Connection: close"],
                &chunked_body(),
            ),
        ),
        (
            "two identical Content-Lengths",
            post_with(&[&cl, &cl, "Connection: close"], BODY),
        ),
        (
            "absolute-form target naming another host",
            format!(
                "POST http://evil.example/v1/chat/completions HTTP/1.1\r\nHost: evil.example\r\n{cl}\r\nConnection: close\r\n\r\n{BODY}"
            )
            .into_bytes(),
        ),
    ];
    for (name, request) in cases {
        let before = m.requests();
        let reply = raw(gw.addr(), request, Duration::from_secs(10)).await;
        assert_eq!(reply.status(), 200, "{name}: {}", reply.text());
        assert_eq!(m.requests(), before + 1, "{name}");
        let seen = m.last_inference().unwrap();
        assert_eq!(seen.uri, "/v1/chat/completions", "{name}");
        assert_eq!(seen.body, BODY.as_bytes(), "{name}");
        let host = seen.headers.get("host").unwrap().to_str().unwrap();
        assert_eq!(host, m.addr().to_string(), "{name}");
        assert!(seen.headers.get("transfer-encoding").is_none(), "{name}");
    }
}

/// SPEC "Bodies": hostile JSON gets a clear 400 (or 413), never a panic,
/// and never reaches the backend.
#[tokio::test]
async fn hostile_json_bodies_are_refused() {
    let (gw, m) = setup("").await;
    let deep = format!(
        r#"{{"model":"m1","x":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep_objects = format!(
        r#"{{"model":"m1","x":{}1{}}}"#,
        r#"{"a":"#.repeat(100_000),
        "}".repeat(100_000)
    );
    let ten_mib = format!(r#"{{"model":"m1","x":"{}"}}"#, "a".repeat(10 * 1024 * 1024));
    // The top-level object is level 1: SPEC refuses bodies nested deeper
    // than 128 levels, so its arrays may reach level 128, not 129.
    let nested = |levels: usize| {
        format!(
            r#"{{"model":"m1","x":{}{}}}"#,
            "[".repeat(levels - 1),
            "]".repeat(levels - 1)
        )
    };
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "arrays nested 129 levels deep",
            nested(129).into_bytes(),
            400,
            "invalid_json",
        ),
        (
            "arrays nested 100 000 deep",
            deep.into_bytes(),
            400,
            "invalid_json",
        ),
        (
            "objects nested 100 000 deep",
            deep_objects.into_bytes(),
            400,
            "invalid_json",
        ),
        (
            "invalid UTF-8",
            b"{\"model\":\"m1\",\"x\":\"\xff\xfe\"}".to_vec(),
            400,
            "invalid_json",
        ),
        (
            "a lone surrogate escape",
            br#"{"model":"m1","x":"\ud800"}"#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "a 10 MiB string",
            ten_mib.into_bytes(),
            413,
            "request_too_large",
        ),
        (
            "duplicate model keys",
            br#"{"model":"m1","model":"other"}"#.to_vec(),
            400,
            "missing_model",
        ),
        (
            "duplicate max_tokens",
            br#"{"model":"m1","max_tokens":1,"max_tokens":100000}"#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "1e999",
            br#"{"model":"m1","temperature":1e999}"#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "max_tokens 1e10",
            br#"{"model":"m1","max_tokens":1e10}"#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "negative max_tokens",
            br#"{"model":"m1","max_tokens":-1}"#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "model as an object",
            br#"{"model":{"name":"m1"}}"#.to_vec(),
            400,
            "missing_model",
        ),
        (
            "model as a number",
            br#"{"model":1}"#.to_vec(),
            400,
            "missing_model",
        ),
        (
            "model null",
            br#"{"model":null}"#.to_vec(),
            400,
            "missing_model",
        ),
        (
            "no model",
            br#"{"messages":[]}"#.to_vec(),
            400,
            "missing_model",
        ),
        (
            "a top-level array",
            br#"[{"model":"m1"}]"#.to_vec(),
            400,
            "invalid_json",
        ),
        ("a bare string", br#""m1""#.to_vec(), 400, "invalid_json"),
        ("an empty body", Vec::new(), 400, "invalid_json"),
        (
            "trailing garbage",
            br#"{"model":"m1"} x"#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "truncated",
            br#"{"model":"m1","messages":[{"#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "stream as a string",
            br#"{"model":"m1","stream":"yes"}"#.to_vec(),
            400,
            "invalid_json",
        ),
    ];
    let client = client();
    for (name, body, status, code) in cases {
        let r = send(
            &client,
            "POST",
            gw.addr(),
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            body,
        )
        .await;
        assert_eq!(r.status.as_u16(), status, "{name}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], code, "{name}: {}", r.text());
        assert_eq!(r.header("x-request-id").len(), 32, "{name}");
    }
    assert_untouched_and_serving(&gw, &m).await;
    let r = post(gw.addr(), "/v1/chat/completions", &nested(128)).await;
    assert_eq!(
        r.status,
        200,
        "128 levels are not deeper than 128: {}",
        r.text()
    );
    assert_eq!(m.requests(), 2, "the 128-level body reached the backend");
}

/// A body that stalls counts against `request_timeout` (SPEC "Slow
/// clients"): 504 `upstream_timeout` once it runs out, the connection
/// closed, and nothing sent to the backend.
#[tokio::test]
async fn stalled_bodies_get_504_at_request_timeout() {
    let (gw, m) = setup("request_timeout = \"500ms\"").await;
    let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let start = tokio::time::Instant::now();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: weir\r\nContent-Length: {}\r\n\r\n",
        BODY.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&BODY.as_bytes()[..10]).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut reply))
        .await
        .expect("the connection was not closed")
        .unwrap();
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 504 "), "{text}");
    assert!(text.contains("\"code\":\"upstream_timeout\""), "{text}");
    assert!(text.contains("\"type\":\"timeout\""), "{text}");
    assert!(
        took >= Duration::from_millis(400),
        "answered too early: {took:?}"
    );
    assert_untouched_and_serving(&gw, &m).await;
}

/// Slowloris: a head dripped a byte at a time is cut at
/// `header_read_timeout` (counted from the accept), without an answer and
/// without touching the backend; others are served meanwhile.
#[tokio::test]
async fn slowloris_heads_are_cut_at_header_read_timeout() {
    let (gw, m) = setup("header_read_timeout = \"300ms\"\nidle_timeout = \"60s\"").await;
    let addr = gw.addr();
    let drips: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                let start = tokio::time::Instant::now();
                let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: weir\r\nX-Slow: ";
                for b in head.iter().chain(std::iter::repeat(&b'a')) {
                    if s.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    let mut buf = [0u8; 64];
                    match tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(n)) => panic!("got an answer: {:?}", &buf[..n]),
                        Err(_) => {}
                    }
                    assert!(start.elapsed() < Duration::from_secs(5), "never cut");
                }
                start.elapsed()
            })
        })
        .collect();
    // Served while the slow heads drip.
    let r = post(addr, "/v1/chat/completions", BODY).await;
    assert_eq!(r.status, 200);
    for d in drips {
        let took = d.await.unwrap();
        assert!(
            took >= Duration::from_millis(250),
            "cut too early: {took:?}"
        );
        assert!(took < Duration::from_secs(3), "cut too late: {took:?}");
    }
    assert_eq!(m.requests(), 1);
}

/// A connection that sends nothing is cut at `header_read_timeout` too.
#[tokio::test]
async fn silent_connections_are_cut_at_header_read_timeout() {
    let (gw, _m) = setup("header_read_timeout = \"200ms\"\nidle_timeout = \"60s\"").await;
    let reply = raw(gw.addr(), Vec::new(), Duration::from_secs(5)).await;
    let after = reply.closed_after.expect("closed");
    assert!(after >= Duration::from_millis(150), "{after:?}");
    assert!(reply.bytes.is_empty());
}

/// Sends one keep-alive request on `s` and reads its whole (non-streamed)
/// response.
async fn keep_alive_request(s: &mut tokio::net::TcpStream) -> String {
    s.write_all(&post_with(
        &[&format!("Content-Length: {}", BODY.len())],
        BODY,
    ))
    .await
    .unwrap();
    let text = read_response(s).await;
    assert!(text.contains("\r\ncontent-length: "), "{text}");
    text
}

/// How long until the server closes `s`, reading nothing else.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> Option<Duration> {
    let start = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(within, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Some(start.elapsed()),
        Ok(Ok(n)) => panic!("unexpected bytes: {:?}", &buf[..n]),
        Err(_) => None,
    }
}

/// `idle_timeout` governs idle keep-alive connections, not
/// `header_read_timeout` (hyper's own timer would close them at the
/// latter): a connection idle longer than the head timeout stays open,
/// then closes at the idle timeout.
#[tokio::test]
async fn idle_keep_alive_connections_close_at_idle_timeout() {
    let (gw, _m) = setup("header_read_timeout = \"200ms\"\nidle_timeout = \"1200ms\"").await;
    let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let first = keep_alive_request(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // Idle for 3× header_read_timeout: still open.
    assert_eq!(
        closed_within(&mut s, Duration::from_millis(600)).await,
        None
    );
    // Still usable.
    let second = keep_alive_request(&mut s).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    let closed = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("closed at idle_timeout");
    assert!(closed >= Duration::from_millis(800), "{closed:?}");

    // A short idle_timeout closes well before a long header_read_timeout.
    let (gw, _m) = setup("header_read_timeout = \"10s\"\nidle_timeout = \"200ms\"").await;
    let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    keep_alive_request(&mut s).await;
    let closed = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("closed at idle_timeout");
    assert!(closed >= Duration::from_millis(100), "{closed:?}");
    assert!(closed < Duration::from_secs(3), "{closed:?}");
}

/// Neither timer cuts a request being served: a slow backend and a long
/// stream outlast both.
#[tokio::test]
async fn requests_in_progress_outlast_head_and_idle_timeouts() {
    let slow = MockConfig::default()
        .latency(Duration::from_millis(600))
        .tokens_per_sec(20.0)
        .chunks(12);
    let (gw, _m) = gateway_with_mock(
        MODEL,
        slow,
        "[server]\nheader_read_timeout = \"150ms\"\nidle_timeout = \"150ms\"",
    )
    .await;
    let r = post(gw.addr(), "/v1/chat/completions", BODY).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s = post_stream(gw.addr(), "/v1/chat/completions", &chat(MODEL, true)).await;
    assert_eq!(s.status, 200);
    assert!(s.text().ends_with("data: [DONE]\n\n"), "{}", s.text());
}

/// `max_connections`: a connection beyond the cap waits in the backlog
/// (nothing answers it) and is served once a slot frees.
#[tokio::test]
async fn connections_beyond_max_connections_wait_for_a_slot() {
    let (gw, _m) = setup("max_connections = 2\nheader_read_timeout = \"30s\"").await;
    let addr = gw.addr();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        keep_alive_request(&mut s).await;
        held.push(s);
    }
    let third = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        keep_alive_request(&mut s).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "served beyond max_connections");
    drop(held.pop());
    let answer = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// With `admin_listen`, the admin listener has connection slots of its
/// own: clients get all `max_connections`, and holding them all does not
/// lock out the operator's probes and scrapes.
#[tokio::test]
async fn clients_at_max_connections_leave_the_admin_listener_serving() {
    let m = weir::mock::start(MockConfig::default().models(vec![MODEL.into()]))
        .await
        .unwrap();
    let toml = format!(
        "[server]\nmax_connections = 2\nheader_read_timeout = \"30s\"\n\n[[models]]\nname = \"{MODEL}\"\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &[MODEL], 1)
    );
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (listener, admin) = (bind(), bind());
    for l in [&listener, &admin] {
        l.set_nonblocking(true).unwrap();
    }
    let gw = weir::Gateway::new(config(&toml))
        .start_on(
            tokio::net::TcpListener::from_std(listener).unwrap(),
            Some(tokio::net::TcpListener::from_std(admin).unwrap()),
        )
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
        let answer = keep_alive_request(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(s);
    }
    for _ in 0..3 {
        let r = get(gw.admin_addr(), "/healthz").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

/// Request ids: a client id with a CR-free but non-visible or too long
/// value is replaced, never echoed.
#[tokio::test]
async fn hostile_request_ids_are_replaced() {
    let (gw, _m) = setup("").await;
    let long = "x".repeat(129);
    for id in ["has space", "tab\there", long.as_str()] {
        let r = send(
            &client(),
            "GET",
            gw.addr(),
            "/healthz",
            &[("x-request-id", id)],
            bytes::Bytes::new(),
        )
        .await;
        let got = r.header("x-request-id");
        assert_ne!(got, id);
        assert_eq!(got.len(), 32, "{got}");
    }
}

/// CPU time (user + system, in clock ticks) the process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): utime is
    // the 12th, stime the 13th.
    let after = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Out of file descriptors (EMFILE), the accept loop logs and backs off
/// instead of spinning, and serves again once descriptors free up.
#[test]
fn accept_errors_back_off_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout = \"60s\"\n\n[[models]]\nname = \"m\"\n\n[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n\n[health]\nenabled = false\n",
    )
    .unwrap();
    let weir = spawn_weir(&path, "info");
    let pid = weir.child.id();
    // "listening" is logged once the socket is bound, before the accept
    // loop has started its lanes (each a runtime with its own descriptors):
    // one answered request proves they exist before descriptors are counted.
    assert!(
        healthz_answers(weir.addr),
        "weir did not answer: {}",
        weir.log.lock().unwrap()
    );
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = open + 8;
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit runs");
    assert!(status.success());
    // More connections than descriptors left: the kernel completes them
    // (backlog), weir's accept fails with EMFILE.
    let held: Vec<std::net::TcpStream> = (0..30)
        .map(|_| std::net::TcpStream::connect(weir.addr).unwrap())
        .collect();
    let logged = || weir.log.lock().unwrap().contains("accept failed");
    let start = tokio::time::Instant::now();
    while !logged() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(logged(), "{}", weir.log.lock().unwrap());
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    // A spinning accept loop would use ~100 ticks (one core) per second.
    assert!(
        used < 30,
        "{used} ticks of CPU in 1 s while out of descriptors"
    );
    drop(held);
    let start = tokio::time::Instant::now();
    let served = loop {
        if healthz_answers(weir.addr) {
            break true;
        }
        if start.elapsed() > Duration::from_secs(10) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        served,
        "weir did not serve again after descriptors freed: {}",
        weir.log.lock().unwrap()
    );
}

/// Whether `GET /healthz` on a fresh connection gets a 200 within 2 s.
fn healthz_answers(addr: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    let attempt = std::net::TcpStream::connect(addr).and_then(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: weir\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    });
    matches!(attempt, Ok(out) if out.starts_with("HTTP/1.1 200"))
}

/// SPEC "Admin": with `admin_token_env`, `/admin/*` needs the exact token
/// (401 `authentication_error` otherwise, with `WWW-Authenticate: Bearer`,
/// as for any missing or wrong credentials), `/metrics` and the probes stay
/// open; with `api_keys_env`, a wrong client key is 401 and never reaches
/// the backend.
#[tokio::test]
async fn admin_and_client_keys_are_enforced() {
    let (gw, m) = setup("admin_token_env = \"ADMIN_TOKEN\"\napi_keys_env = \"CLIENT_KEYS\"").await;
    let addr = gw.addr();
    let c = client();
    let admin = |auth: &'static str| {
        let c = c.clone();
        async move {
            let headers: &[(&str, &str)] = if auth.is_empty() {
                &[]
            } else {
                &[("authorization", auth)]
            };
            send(
                &c,
                "GET",
                addr,
                "/admin/backends",
                headers,
                bytes::Bytes::new(),
            )
            .await
        }
    };
    for wrong in [
        "",
        "Bearer admin-token-",
        "Bearer admin-token-12",
        "Basic admin-token-1",
    ] {
        let answer = admin(wrong).await;
        answer.assert_error(401, "authentication_error", "invalid_admin_token");
        assert_eq!(answer.header("www-authenticate"), "Bearer", "{wrong:?}");
    }
    assert_eq!(admin("Bearer admin-token-1").await.status, 200);
    let reload = send(&c, "POST", addr, "/admin/reload", &[], bytes::Bytes::new()).await;
    reload.assert_error(401, "authentication_error", "invalid_admin_token");
    for open in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(get(addr, open).await.status, 200, "{open}");
    }
    for key in [
        "",
        "Bearer client-key-3",
        "Bearer client-key-1x",
        "Bearer admin-token-1",
    ] {
        let mut headers = vec![("content-type", "application/json")];
        if !key.is_empty() {
            headers.push(("authorization", key));
        }
        let r = send(&c, "POST", addr, "/v1/chat/completions", &headers, BODY).await;
        r.assert_error(401, "authentication_error", "invalid_api_key");
    }
    assert_eq!(m.requests(), 0);
    let r = send(
        &c,
        "POST",
        addr,
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer client-key-2"),
        ],
        BODY,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A new prior-knowledge HTTP/2 connection to `addr`, driven by a task of
/// its own, for requests with bodies of type `B`.
async fn h2_connect<B>(addr: std::net::SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

/// Sends `request` on a new prior-knowledge HTTP/2 connection and reads
/// the whole answer. A request whose version is HTTP/1.1 and whose URI is
/// a bare path goes without `:authority` (h2 takes it for a forwarded
/// HTTP/1.1 request).
async fn h2_send(
    addr: std::net::SocketAddr,
    request: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> Reply {
    use http_body_util::BodyExt;
    let mut sender = h2_connect(addr).await;
    let response = tokio::time::timeout(Duration::from_secs(20), sender.send_request(request))
        .await
        .expect("an answer within 20 s")
        .expect("an answer");
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// `POST` of `BODY` to `uri` with these extra headers.
fn h2_chat(
    uri: &str,
    headers: &[(&str, &str)],
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut request = http::Request::post(uri).header("content-type", "application/json");
    if !uri.starts_with("http") {
        request = request.version(http::Version::HTTP_11);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            BODY.as_bytes(),
        )))
        .unwrap()
}

/// RFC 9113 §8.2.3: an HTTP/2 client's cookie crumbs reach an HTTP/1.1
/// backend as one `Cookie` line; so do an HTTP/1.1 client's two lines.
#[tokio::test]
async fn cookie_crumbs_reach_the_backend_as_one_line() {
    let (gw, m) = gateway_with_mock(MODEL, MockConfig::default().record(true), "").await;
    let uri = format!("http://{}/v1/chat/completions", gw.addr());
    let r = h2_send(
        gw.addr(),
        h2_chat(&uri, &[("cookie", "a=1"), ("x-b", "2"), ("cookie", "b=2")]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let cookies = |m: &MockHandle| -> Vec<String> {
        let seen = m.last_inference().unwrap();
        seen.headers
            .get_all("cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(cookies(&m), ["a=1; b=2"]);
    let reply = raw(
        gw.addr(),
        raw_chat(BODY, "Cookie: a=1\r\nCookie: b=2\r\nConnection: close\r\n"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(reply.status(), 200, "{}", reply.text());
    assert_eq!(cookies(&m), ["a=1; b=2"]);
}

/// HTTP/2 heads get HTTP/1.1's 100-field limit, with the same 431, and
/// one over it is not forwarded.
#[tokio::test]
async fn h2_heads_with_too_many_fields_get_431() {
    let (gw, m) = setup("").await;
    let names: Vec<String> = (0..101).map(|i| format!("x-h-{i}")).collect();
    let get = |n: usize| {
        let mut request = http::Request::get(format!("http://{}/healthz", gw.addr()));
        for name in &names[..n] {
            request = request.header(name.as_str(), "v");
        }
        request.body(http_body_util::Full::default()).unwrap()
    };
    let r = h2_send(gw.addr(), get(100)).await;
    assert_eq!(r.status, 200, "at the limit: {}", r.text());
    h2_send(gw.addr(), get(101)).await.assert_error(
        431,
        "invalid_request_error",
        "headers_too_large",
    );
    // Cookie crumbs are one line (as on HTTP/1.1): 99 fields and 5 crumbs
    // are 100.
    let mut crumbs = http::Request::get(format!("http://{}/healthz", gw.addr()));
    for name in &names[..99] {
        crumbs = crumbs.header(name.as_str(), "v");
    }
    for i in 0..5 {
        crumbs = crumbs.header("cookie", format!("c{i}=v"));
    }
    let crumbs = crumbs.body(http_body_util::Full::default()).unwrap();
    let r = h2_send(gw.addr(), crumbs).await;
    assert_eq!(r.status, 200, "cookie crumbs: {}", r.text());
    let uri = format!("http://{}/v1/chat/completions", gw.addr());
    let over: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    h2_send(gw.addr(), h2_chat(&uri, &over)).await.assert_error(
        431,
        "invalid_request_error",
        "headers_too_large",
    );
    assert_eq!(m.requests(), 0);
}

/// HTTP/2's `:authority` and `Host` get HTTP/1.1's `Host` rules: no
/// userinfo, one of them present, and a `Host` beside `:authority` names
/// the same host.
#[tokio::test]
async fn h2_authorities_are_checked_as_hosts_are() {
    let (gw, m) = setup("").await;
    let addr = gw.addr();
    let path = "/v1/chat/completions";
    let refused: Vec<(&str, http::Request<_>)> = vec![
        (
            "userinfo in :authority",
            h2_chat(&format!("http://user@evil{path}"), &[]),
        ),
        ("neither :authority nor Host", h2_chat(path, &[])),
        (
            "a Host that differs from :authority",
            h2_chat(&format!("http://{addr}{path}"), &[("host", "evil")]),
        ),
        (
            "two Hosts",
            h2_chat(path, &[("host", "weir"), ("host", "weir")]),
        ),
        ("a Host with userinfo", h2_chat(path, &[("host", "u@weir")])),
    ];
    for (name, request) in refused {
        let r = h2_send(addr, request).await;
        assert_eq!(r.status, 400, "{name}: {}", r.text());
        r.assert_error(400, "invalid_request_error", "invalid_framing");
    }
    assert_eq!(m.requests(), 0);
    let accepted: Vec<(&str, http::Request<_>)> = vec![
        ("Host alone", h2_chat(path, &[("host", "weir")])),
        (
            "the same host in another case",
            h2_chat(
                &format!("http://localhost:{}{path}", addr.port()),
                &[("host", &format!("LocalHost:{}", addr.port()))],
            ),
        ),
        (
            "the scheme's default port written on one side only",
            h2_chat(
                &format!("http://weir.example:80{path}"),
                &[("host", "Weir.example")],
            ),
        ),
    ];
    for (name, request) in accepted {
        let r = h2_send(addr, request).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    assert_eq!(m.requests(), 3);
}

/// A chat body of exactly `len` bytes (its prompt padded with `x`).
fn body_of(len: usize) -> String {
    let frame = r#"{"model":"m1","messages":[{"role":"user","content":""}]}"#;
    let pad = "x".repeat(len - frame.len());
    let body = format!(r#"{{"model":"m1","messages":[{{"role":"user","content":"{pad}"}}]}}"#);
    assert_eq!(body.len(), len);
    body
}

/// Reads from `s` until `text` holds a whole response head and its
/// `content-length` body (10 s at most).
async fn read_response(s: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if body.len() >= len && !head.starts_with("HTTP/1.1 100 ") {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert!(n > 0, "closed early; got {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Every body's room is back: the requests that held it have answered
/// (a body's room goes when `forward` returns, before its answer is sent).
async fn assert_nothing_held(gw: &weir::Handle) {
    let held = metric(gw.addr(), "weir_buffered_body_bytes", &[]).await;
    assert_eq!(held, 0.0, "request-body bytes still held");
}

/// Whether `s` reads `100 Continue` within `within` (`None`: nothing came).
async fn continued(s: &mut tokio::net::TcpStream, within: Duration) -> Option<bool> {
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(within, s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(buf[..n].starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"))
}

/// `server.max_buffered_body_bytes`: an HTTP/1.1 body over 64 KiB that
/// finds the budget held by another waits for room, unread (its `100
/// Continue` comes only then), and goes on once the body that held the
/// room has its answer.
#[tokio::test]
async fn http1_bodies_wait_for_room_in_the_body_budget() {
    const LEN: usize = 200_000;
    let (gw, m) = setup(&format!(
        "max_body_bytes = {LEN}\nmax_buffered_body_bytes = {LEN}\nrequest_timeout = \"10s\"\n"
    ))
    .await;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: weir\r\nContent-Length: {LEN}\r\nExpect: 100-continue\r\n\r\n"
    );
    let body = body_of(LEN);
    // The first body has its room (it is asked for) and stalls.
    let mut first = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    first.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(
        continued(&mut first, Duration::from_secs(10)).await,
        Some(true)
    );
    first.write_all(&body.as_bytes()[..9]).await.unwrap();
    let held = metric(gw.addr(), "weir_buffered_body_bytes", &[]).await;
    assert!(held >= (LEN - 65_536) as f64, "{held}");
    // The second finds no room and is not asked for its body.
    let mut second = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    second.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(
        continued(&mut second, Duration::from_millis(300)).await,
        None
    );
    first.write_all(&body.as_bytes()[9..]).await.unwrap();
    let text = read_response(&mut first).await;
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert_eq!(
        continued(&mut second, Duration::from_secs(10)).await,
        Some(true)
    );
    second.write_all(body.as_bytes()).await.unwrap();
    let text = read_response(&mut second).await;
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert_eq!(m.requests(), 2);
    assert_nothing_held(&gw).await;
}

/// An HTTP/2 stream whose refused body weir drains (a 413 answered, the
/// client still connected and silent) does not hold a shutdown up:
/// nothing is in flight, so weir stops after a last second of it, not after
/// the drain's 5 s.
#[tokio::test]
async fn an_http2_lingering_drain_does_not_hold_a_shutdown() {
    use http_body_util::channel::Channel;
    let (gw, _m) = setup("max_body_bytes = 1000\n").await;
    let mut sender = h2_connect(gw.addr()).await;
    let (mut tx, body) = Channel::<bytes::Bytes, std::convert::Infallible>::new(1);
    let request = http::Request::post(format!("http://{}/v1/chat/completions", gw.addr()))
        .header("content-type", "application/json")
        .header("content-length", 5000)
        .body(body)
        .unwrap();
    let response = tokio::spawn(sender.send_request(request));
    tx.send_data(bytes::Bytes::from_static(b"{\"model\":"))
        .await
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("an answer")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 413);
    gw.shutdown();
    let stopped = tokio::time::timeout(Duration::from_secs(4), gw.wait()).await;
    assert!(stopped.is_ok(), "the stream's drain held the shutdown up");
    drop(tx);
}

/// The same budget holds across an HTTP/2 connection's streams, where
/// every body counts, but a stream that finds no room is refused at once
/// (503 `body_memory_full`, `Retry-After: 1`) rather than left unread:
/// h2 gives the connection's window back only as data is read, so an
/// unread stream would stop the others. Here the refused streams send
/// more than that window (1 MiB) and the stream holding the room still
/// gets the rest of its body through.
#[tokio::test]
async fn http2_streams_that_find_no_room_are_refused_without_stopping_the_others() {
    use http_body_util::{channel::Channel, BodyExt};
    const LEN: usize = 2 << 20;
    let (gw, m) = setup(&format!(
        "max_body_bytes = {LEN}\nmax_buffered_body_bytes = 3_000_000\nrequest_timeout = \"20s\"\n"
    ))
    .await;
    let mut sender = h2_connect(gw.addr()).await;
    let post = |length: Option<usize>, body: Channel<bytes::Bytes, std::convert::Infallible>| {
        let mut request = http::Request::post(format!("http://{}/v1/chat/completions", gw.addr()))
            .header("content-type", "application/json");
        if let Some(length) = length {
            request = request.header("content-length", length);
        }
        request.body(body).unwrap()
    };
    let answer = |response: tokio::task::JoinHandle<hyper::Result<http::Response<_>>>| async {
        let response: http::Response<hyper::body::Incoming> =
            tokio::time::timeout(Duration::from_secs(20), response)
                .await
                .expect("an answer")
                .unwrap()
                .unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts, String::from_utf8_lossy(&body).into_owned())
    };
    let body = bytes::Bytes::from(body_of(LEN));
    // The first takes all its room and sends a little.
    let (mut first_tx, first_body) = Channel::new(1);
    let first = tokio::spawn(sender.send_request(post(Some(LEN), first_body)));
    first_tx.send_data(body.slice(..9)).await.unwrap();
    let mut held = 0.0;
    for _ in 0..250 {
        held = metric(gw.addr(), "weir_buffered_body_bytes", &[]).await;
        if held >= LEN as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held >= LEN as f64, "the first body holds its room: {held}");
    // A second declared body, and one of no declared length whose next
    // step does not fit, are refused, each sending a whole 1 MiB and more.
    let (mut second_tx, second_body) = Channel::new(1);
    let second = tokio::spawn(sender.send_request(post(Some(LEN), second_body)));
    let (mut third_tx, third_body) = Channel::new(1);
    let third = tokio::spawn(sender.send_request(post(None, third_body)));
    let sent = body.clone();
    let sending = tokio::spawn(async move {
        for at in (0..LEN).step_by(16 * 1024) {
            let piece = sent.slice(at..(at + 16 * 1024).min(LEN));
            let second = second_tx.send_data(piece.clone()).await;
            let third = third_tx.send_data(piece).await;
            if second.is_err() && third.is_err() {
                break;
            }
        }
    });
    for (parts, text) in [answer(second).await, answer(third).await] {
        assert_eq!(parts.status, 503, "{text}");
        assert_eq!(parts.headers["retry-after"], "1");
        assert!(text.contains("\"code\":\"body_memory_full\""), "{text}");
        assert!(text.contains("max_buffered_body_bytes"), "{text}");
    }
    let _ = sending.await;
    // The first body's rest still gets through on the same connection.
    let rest = body.slice(9..);
    let finishing = tokio::spawn(async move {
        for at in (0..rest.len()).step_by(64 * 1024) {
            let piece = rest.slice(at..(at + 64 * 1024).min(rest.len()));
            first_tx.send_data(piece).await.unwrap();
        }
    });
    let (parts, text) = answer(first).await;
    assert_eq!(parts.status, 200, "{text}");
    finishing.await.unwrap();
    assert_eq!(m.requests(), 1);
    assert_nothing_held(&gw).await;
}

/// Two chunked HTTP/1.1 bodies that outgrow their uncounted 64 KiB do
/// not each hold part of the budget while waiting for more (each would
/// wait on the other until `request_timeout`): the first takes room for
/// `max_body_bytes`, the second waits for its own, and both are served
/// (from the session 42 review).
#[tokio::test]
async fn chunked_bodies_do_not_wait_on_each_other() {
    const LEN: usize = 250_000;
    let (gw, m) = setup(
        "max_body_bytes = 300000\nmax_buffered_body_bytes = 300000\nrequest_timeout = \"10s\"\n",
    )
    .await;
    let head =
        "POST /v1/chat/completions HTTP/1.1\r\nHost: weir\r\nTransfer-Encoding: chunked\r\n\r\n";
    let body = body_of(LEN);
    let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
    let mut a = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let mut b = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    // Each grows past its uncounted part, then by another 64 KiB step:
    // room taken a step at a time, both would hold 128 KiB here, and each
    // need more for the rest. (The waits are bounded, not asserted.)
    let addr = gw.addr();
    let held_up_to = |bytes: f64| async move {
        for _ in 0..50 {
            if metric(addr, "weir_buffered_body_bytes", &[]).await >= bytes {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    for (from, to, held) in [(0, 130_000, 131_072.0), (130_000, 170_000, 262_144.0)] {
        for s in [&mut a, &mut b] {
            if from == 0 {
                s.write_all(head.as_bytes()).await.unwrap();
            }
            s.write_all(chunk(&body[from..to]).as_bytes())
                .await
                .unwrap();
        }
        held_up_to(held).await;
    }
    for s in [&mut a, &mut b] {
        s.write_all(chunk(&body[170_000..]).as_bytes())
            .await
            .unwrap();
        s.write_all(b"0\r\n\r\n").await.unwrap();
    }
    for s in [&mut a, &mut b] {
        let text = read_response(s).await;
        assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    }
    assert_eq!(m.requests(), 2);
    assert_nothing_held(&gw).await;
}

/// RFC 9112 §6.1: an HTTP/1.0 answer with `Transfer-Encoding` has faulty
/// framing, and the connection closes after it. weir decodes the chunks
/// for the client but sends no further request on that connection: bytes
/// an HTTP/1.0 hop left after the last chunk would otherwise be read as
/// the next request's answer.
#[tokio::test]
async fn an_http_1_0_answer_with_transfer_encoding_closes_its_backend_connection() {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let body = r#"{"object":"chat.completion","choices":[]}"#;
    let answer = format!(
        "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = upstream.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            // Each request on the connection (one read: they are small)
            // gets the same answer, as a keep-alive backend's would.
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while matches!(s.read(&mut buf).await, Ok(1..)) {
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let toml = format!(
        "[[models]]\nname = \"{MODEL}\"\n\n{}{QUIET}",
        backend("raw", &format!("http://{up_addr}/v1"), &[MODEL], 1)
    );
    let gw = gateway(&toml).await;
    let requests = 6;
    for _ in 0..requests {
        let r = post(gw.addr(), "/v1/chat/completions", BODY).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), body);
    }
    // One connection per request: none went back to the pool.
    assert_eq!(accepted.load(Ordering::SeqCst), requests);
}
