//! weir's own HTTP/1.1 server side (`server/http1.rs`), over raw TCP: the
//! parts of RFC 9112 no other suite reaches. `Expect: 100-continue`,
//! pipelining, HTTP/1.0, an unread body after an early answer, a client
//! that leaves before its answer, and graceful shutdown of idle and busy
//! connections.

mod common;

use std::time::Duration;

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use weir::mock::MockConfig;

const MODEL: &str = "m1";

/// Reads from `s` until `done` holds for what arrived (10 s at most).
async fn read_until(s: &mut TcpStream, mut done: impl FnMut(&str) -> bool) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if done(&text) {
            return text;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        assert!(n > 0, "closed early; got {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Whether `text` holds `n` whole responses framed by `content-length`.
fn whole_responses(text: &str, n: usize) -> bool {
    let mut rest = text;
    for _ in 0..n {
        let Some((head, after)) = rest.split_once("\r\n\r\n") else {
            return false;
        };
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if after.len() < len {
            return false;
        }
        rest = &after[len..];
    }
    true
}

/// Whether the server closes `s` within `within` (reading and dropping
/// anything else it sends).
async fn closes_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn expect_100_continue_is_answered_when_the_body_is_read() {
    let (gw, m) = gateway_with_mock(MODEL, MockConfig::default(), "").await;
    let body = chat(MODEL, false);
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: weir\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let interim = read_until(&mut s, |t| t.contains("\r\n\r\n")).await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    assert_eq!(m.requests(), 0);
    s.write_all(body.as_bytes()).await.unwrap();
    let text = read_until(&mut s, |t| whole_responses(t, 1)).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert_eq!(m.requests(), 1);
}

/// An answer given before the body of an `Expect: 100-continue` request
/// (here a 404 for an unknown path) says `connection: close` and closes:
/// the client may send its body or skip it, and weir cannot tell which
/// its next bytes are (it used to read the next request as the body).
#[tokio::test]
async fn an_early_answer_to_a_client_awaiting_100_continue_closes() {
    let (gw, _m) = gateway_with_mock(MODEL, MockConfig::default(), "").await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(
        b"POST /nope HTTP/1.1\r\nHost: weir\r\nContent-Length: 58\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let text = read_until(&mut s, |t| whole_responses(t, 1)).await;
    assert!(text.starts_with("HTTP/1.1 404 "), "{text}");
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
    assert!(closes_within(&mut s, Duration::from_secs(8)).await);
    // A client that sent its body with the head (without waiting) is in
    // step: the body is dropped and the connection serves on.
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let mut wire =
        b"POST /nope HTTP/1.1\r\nHost: weir\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n{}"
            .to_vec();
    wire.extend(raw_chat(&chat(MODEL, false), ""));
    s.write_all(&wire).await.unwrap();
    let text = read_until(&mut s, |t| whole_responses(t, 2)).await;
    assert!(text.starts_with("HTTP/1.1 404 "), "{text}");
    assert!(!text.contains("connection: close"), "{text}");
    assert!(text.contains("HTTP/1.1 200 OK"), "{text}");
}

/// A chunk whose size alone takes the body past `max_body_bytes` is
/// refused with 413 as soon as its data starts, as a `Content-Length` over
/// the limit is, not after `request_timeout` waiting for the rest.
#[tokio::test]
async fn a_chunk_larger_than_the_body_limit_is_refused_at_once() {
    let limits = "[server]\nmax_body_bytes = 1000\nrequest_timeout = \"60s\"\n";
    let (gw, m) = gateway_with_mock(MODEL, MockConfig::default(), limits).await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: weir\r\nTransfer-Encoding: chunked\r\n\r\nfffff\r\n{\"model\":";
    s.write_all(head.as_bytes()).await.unwrap();
    let text = read_until(&mut s, |t| t.contains("\r\n\r\n")).await;
    assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
    assert_eq!(m.requests(), 0);
}

/// A connection in its lingering close (a 413 answered with the body
/// unread, its client still connected and silent) does not hold a
/// shutdown up: nothing is in flight, so weir stops after a last second of
/// it, not after the linger's 5 s (nor, with a shorter grace, at the
/// grace's end).
#[tokio::test]
async fn a_lingering_close_does_not_hold_a_shutdown() {
    let limits = "[server]\nmax_body_bytes = 1000\n";
    let (gw, _m) = gateway_with_mock(MODEL, MockConfig::default(), limits).await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: weir\r\nContent-Length: 5000\r\n\r\n{\"model\":";
    s.write_all(head.as_bytes()).await.unwrap();
    let text = read_until(&mut s, |t| t.contains("\r\n\r\n")).await;
    assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
    gw.shutdown();
    let stopped = tokio::time::timeout(Duration::from_secs(4), gw.wait()).await;
    assert!(stopped.is_ok(), "the lingering close held the shutdown up");
    drop(s);
}

/// RFC 9110: a resource that answers GET answers HEAD (the GET's headers,
/// no body), and a 405 says in `Allow` which methods the route takes.
#[tokio::test]
async fn head_is_answered_where_get_is_and_405_says_allow() {
    let (gw, _m) = gateway_with_mock(MODEL, MockConfig::default(), "").await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: weir\r\n\r\n")
        .await
        .unwrap();
    let get = read_until(&mut s, |t| whole_responses(t, 1)).await;
    let length = |t: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map(str::to_owned)
    };
    s.write_all(b"HEAD /v1/models HTTP/1.1\r\nHost: weir\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut s, |t| t.ends_with("\r\n\r\n")).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(length(&head), length(&get), "{head}");
    // The connection serves on: nothing of a body was sent after the head.
    for (method, path, allow) in [
        ("PUT", "/v1/models", "GET, HEAD, POST"),
        ("DELETE", "/v1/chat/completions", "POST"),
        ("POST", "/readyz", "GET, HEAD"),
        ("GET", "/admin/reload", "POST"),
    ] {
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: weir\r\nContent-Length: 0\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        let text = read_until(&mut s, |t| whole_responses(t, 1)).await;
        assert!(text.starts_with("HTTP/1.1 405 "), "{method} {path}: {text}");
        assert!(text.contains(&format!("\r\nallow: {allow}\r\n")), "{text}");
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (gw, m) = gateway_with_mock(MODEL, MockConfig::default(), "").await;
    let body = chat(MODEL, false);
    let mut wire = Vec::new();
    for id in ["first", "second", "third"] {
        wire.extend(raw_chat(&body, &format!("x-request-id: {id}\r\n")));
    }
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(&wire).await.unwrap();
    let text = read_until(&mut s, |t| whole_responses(t, 3)).await;
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("x-request-id: "))
        .collect();
    assert_eq!(ids, ["first", "second", "third"], "{text}");
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{text}");
    assert_eq!(m.requests(), 3);
    // The connection is still open for a fourth.
    s.write_all(&raw_chat(&body, "")).await.unwrap();
    read_until(&mut s, |t| whole_responses(t, 1)).await;
}

/// An HTTP/1.0 client keeps its connection only when it asks
/// (`Connection: keep-alive`, as ApacheBench's `-k` does) and the answer
/// has a length: the answer then says `connection: keep-alive`. Without
/// the ask, or with a streamed answer (no length in HTTP/1.0), one answer
/// and the connection closes.
#[tokio::test]
async fn http_1_0_keeps_the_connection_only_when_it_asks() {
    let (gw, m) = gateway_with_mock(MODEL, MockConfig::default(), "").await;
    let body = chat(MODEL, false);
    let request = |connection: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.0\r\nContent-Length: {}\r\n{connection}\r\n{body}",
            body.len()
        )
    };
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    for round in 0..2 {
        s.write_all(request("Connection: Keep-Alive\r\n").as_bytes())
            .await
            .unwrap();
        let text = read_until(&mut s, |t| whole_responses(t, 1)).await;
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\n"),
            "round {round}: {text}"
        );
        assert!(
            text.contains("\r\nconnection: keep-alive\r\n"),
            "round {round}: {text}"
        );
    }
    // The same connection, now without the ask: answered, then closed.
    s.write_all(request("").as_bytes()).await.unwrap();
    let text = read_until(&mut s, |t| whole_responses(t, 1)).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
    assert!(closes_within(&mut s, Duration::from_secs(5)).await);
    assert_eq!(m.requests(), 3);

    let request = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let reply = raw(gw.addr(), request.into_bytes(), Duration::from_secs(10)).await;
    assert_eq!(reply.status(), 200, "{}", reply.text());
    assert!(reply.closed, "{}", reply.text());
    assert!(whole_responses(&reply.text(), 1), "{}", reply.text());
    // A streamed answer has no length: it ends with the connection, asked
    // to stay or not.
    let body = chat(MODEL, true);
    let request = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
        body.len()
    );
    let reply = raw(gw.addr(), request.into_bytes(), Duration::from_secs(10)).await;
    let text = reply.text();
    assert_eq!(reply.status(), 200, "{text}");
    assert!(reply.closed);
    assert!(!text.contains("transfer-encoding"), "{text}");
    assert!(!text.contains("keep-alive"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

/// A body the route never read (here: an unknown path answered before it)
/// is read and dropped when small, so the connection carries on; a large
/// one closes the connection instead.
#[tokio::test]
async fn an_unread_body_is_drained_when_small_and_closes_when_large() {
    let (gw, _m) = gateway_with_mock(MODEL, MockConfig::default(), "").await;
    let body = chat(MODEL, false);
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let head = format!(
        "POST /nowhere/at/all HTTP/1.1\r\nHost: weir\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // Answered before the body was sent.
    let text = read_until(&mut s, |t| whole_responses(t, 1)).await;
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    s.write_all(body.as_bytes()).await.unwrap();
    s.write_all(&raw_chat(&body, "")).await.unwrap();
    let text = read_until(&mut s, |t| whole_responses(t, 1)).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");

    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"POST /nowhere HTTP/1.1\r\nHost: weir\r\nContent-Length: 10000000\r\n\r\n")
        .await
        .unwrap();
    let text = read_until(&mut s, |t| whole_responses(t, 1)).await;
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(closes_within(&mut s, Duration::from_secs(5)).await);
}

/// A client that closes its connection while its request waits for the
/// backend cancels the request: the backend's connection closes and its
/// slot is free, long before the backend would have answered.
#[tokio::test]
async fn a_client_leaving_before_its_answer_cancels_the_request() {
    let slow = MockConfig::default().latency(Duration::from_secs(30));
    let (gw, m) = gateway_with_mock(MODEL, slow, "").await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(&raw_chat(&chat(MODEL, false), ""))
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || m.in_flight() == 1).await);
    drop(s);
    assert!(
        eventually(Duration::from_secs(5), || m.in_flight() == 0
            && m.connections_open() == 0)
        .await,
        "the backend still serves a request nobody waits for"
    );
    assert_eq!(
        metric(gw.addr(), "weir_in_flight", &[("model", MODEL)]).await,
        0.0
    );
}

/// On shutdown an idle keep-alive connection is closed at once, and one
/// whose request is under way gets its answer, marked `connection: close`,
/// then is closed.
#[tokio::test]
async fn shutdown_closes_idle_connections_and_finishes_busy_ones() {
    let slow = MockConfig::default().latency(Duration::from_millis(500));
    let (gw, m) = gateway_with_mock(MODEL, slow, "").await;
    let body = chat(MODEL, false);
    let mut idle = TcpStream::connect(gw.addr()).await.unwrap();
    idle.write_all(&raw_chat(&body, "")).await.unwrap();
    read_until(&mut idle, |t| whole_responses(t, 1)).await;

    let mut busy = TcpStream::connect(gw.addr()).await.unwrap();
    busy.write_all(&raw_chat(&body, "")).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || m.in_flight() == 1).await);
    gw.shutdown();
    assert!(closes_within(&mut idle, Duration::from_secs(5)).await);
    let text = read_until(&mut busy, |t| whole_responses(t, 1)).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
    assert!(closes_within(&mut busy, Duration::from_secs(5)).await);
}

/// What two clients got when `shutdown_grace` (here 300 ms, against a
/// stream of 100 s) ran out: the client of a stream that was running, and
/// one (`x-request-id: WAITER`) queued behind it for the model's
/// `max_concurrent = 1`; each read until weir closed its connection. The
/// gateway must have stopped meanwhile.
async fn clients_at_the_grace_s_end() -> (String, String) {
    let m = weir::mock::start(
        MockConfig::default()
            .models(vec![MODEL.into()])
            .tokens_per_sec(10.0)
            .chunks(1000),
    )
    .await
    .unwrap();
    let gw = gateway(&format!(
        "[server]\nshutdown_grace = \"300ms\"\n\n[[models]]\nname = \"{MODEL}\"\nmax_concurrent = 1\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &[MODEL], 1)
    ))
    .await;
    let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
    stream
        .write_all(&raw_chat(&chat(MODEL, true), ""))
        .await
        .unwrap();
    let started = read_until(&mut stream, |t| t.contains("data: ")).await;
    let waiter = raw_chat(&chat(MODEL, false), "x-request-id: WAITER\r\n");
    let addr = gw.addr();
    let waiter = tokio::spawn(async move { raw(addr, waiter, Duration::from_secs(30)).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(gw.addr(), "weir_queue_depth", &[("model", MODEL)]).await != 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.shutdown();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "weir closed the stream's connection");
    assert!(
        tokio::time::timeout(Duration::from_secs(10), gw.wait())
            .await
            .is_ok(),
        "the gateway stopped"
    );
    let waiter = waiter.await.unwrap();
    assert!(waiter.closed, "weir closed the waiter's connection");
    (started + &String::from_utf8_lossy(&rest), waiter.text())
}

/// A stream still running when `shutdown_grace` runs out ends with an SSE
/// `error` event (`service_unavailable`, `shutting_down`) and the end of
/// its chunked body, then its connection closes: an SDK raises a clear
/// error instead of seeing a bare close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_at_the_grace_s_end_gets_an_error_event() {
    let (text, _) = clients_at_the_grace_s_end().await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.ends_with("\r\n0\r\n\r\n"),
        "a whole chunked body: {text}"
    );
    let (_, last) = text
        .rsplit_once("event: error\ndata: ")
        .unwrap_or_else(|| panic!("no error event: {text}"));
    let data = last.split_once('\n').map_or(last, |(data, _)| data);
    let event: serde_json::Value = serde_json::from_str(data).expect("the event's data is JSON");
    assert_eq!(event["error"]["type"], "service_unavailable", "{event}");
    assert_eq!(event["error"]["code"], "shutting_down", "{event}");
    assert!(!text.contains("[DONE]"), "{text}");
}

/// A request still queued (here behind `max_concurrent = 1`) when
/// `shutdown_grace` runs out is answered an OpenAI-shaped 503
/// `shutting_down` with `connection: close` and its request id, instead of
/// a bare close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_queued_at_the_grace_s_end_gets_a_503() {
    let (_, text) = clients_at_the_grace_s_end().await;
    assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
    assert!(text.contains("\r\nx-request-id: WAITER\r\n"), "{text}");
    let (_, body) = text.split_once("\r\n\r\n").unwrap_or_default();
    let j: serde_json::Value = serde_json::from_str(body).expect("a JSON error");
    assert_eq!(j["error"]["type"], "service_unavailable", "{j}");
    assert_eq!(j["error"]["code"], "shutting_down", "{j}");
    assert!(
        j["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{j}"
    );
}

/// An answer given before the body is read (here a 404) reaches a client
/// that sends its whole large body before it reads, as Python's
/// `http.client` does: weir reads and drops the rest (nginx's lingering
/// close) instead of closing on unread bytes, which makes the kernel reset
/// the connection and the client's write fail.
#[tokio::test]
async fn an_early_answer_survives_a_large_body_still_being_sent() {
    let (gw, _m) = gateway_with_mock(MODEL, MockConfig::default(), "").await;
    let body = vec![b'x'; 8 * 1024 * 1024];
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let head = format!(
        "POST /nowhere HTTP/1.1\r\nHost: weir\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body)
        .await
        .expect("weir takes the body it will not use");
    let text = read_until(&mut s, |t| whole_responses(t, 1)).await;
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
    assert!(closes_within(&mut s, Duration::from_secs(5)).await);
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or any request with
/// two, is a 400; an HTTP/1.0 request may leave it out. A refused HEAD gets
/// its answer without a body.
#[tokio::test]
async fn host_is_required_once_and_a_refused_head_has_no_body() {
    let (gw, _m) = gateway_with_mock(MODEL, MockConfig::default(), "").await;
    for request in [
        &b"GET /healthz HTTP/1.1\r\n\r\n"[..],
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /healthz HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n",
    ] {
        let reply = raw(gw.addr(), request.to_vec(), Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&reply.bytes).into_owned();
        assert_eq!(reply.status(), 400, "{text}");
        assert!(text.contains("Host header"), "{text}");
    }
    let reply = raw(
        gw.addr(),
        b"GET /healthz HTTP/1.0\r\n\r\n".to_vec(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(reply.status(), 200);
    let reply = raw(
        gw.addr(),
        b"HEAD /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec(),
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&reply.bytes).into_owned();
    assert_eq!(reply.status(), 400, "{text}");
    assert!(text.ends_with("\r\n\r\n"), "a body after the head: {text}");
}
