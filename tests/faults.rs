//! SPEC "Hostile input and faults", backend side: a fault-injecting
//! upstream written here on raw sockets (refuses, resets, garbage, 1 MiB of
//! headers, broken chunked framing, a one-byte-per-second drip, silence),
//! and for each: what the client sees (a retry to a healthy backend where
//! one exists, else 502/504, or mid-stream an SSE `error` event), that
//! outlier detection counted it, and that weir keeps serving others. Plus
//! a client leaving mid-stream: the backend sees its connection close at
//! once and the concurrency permit is back.

mod common;

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::Instant,
};
use weir::mock::{self, MockConfig};

/// What the faulty backend does once it has read a request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Nothing listens on its port.
    Refuses,
    /// Closes with a TCP reset before any response byte.
    ResetBeforeHeaders,
    /// Answers bytes that are not HTTP.
    Garbage,
    /// Sends a status line and 1 MiB of headers.
    HugeHeaders,
    /// Answers with `transfer-encoding: gzip, chunked`, a coding weir
    /// never asked for.
    GzipTransferCoding,
    /// Sends its response head one byte per second.
    DripHeaders,
    /// Reads the request and never answers.
    NeverAnswers,
    /// Starts an SSE stream, then resets the connection.
    ResetMidStream,
    /// Starts an SSE stream, sends its usage chunk, then resets.
    ResetAfterUsage,
    /// Sends a whole SSE stream up to `data: [DONE]`, then resets instead
    /// of ending the chunked body.
    ResetAfterDone,
    /// Sends a whole SSE stream up to `data: [DONE]`, then keeps the
    /// connection open without ending the chunked body.
    OpenAfterDone,
    /// As `OpenAfterDone`, sending an SSE comment every 200 ms meanwhile.
    PingsAfterDone,
    /// Starts an SSE stream, then sends a chunk size that is not hex.
    BrokenChunked,
    /// Starts an SSE stream, then drips its next event one byte per second.
    DripBody,
    /// Sends SSE response headers, then nothing.
    StallAfterHeaders,
    /// Answers a JSON 200 whose chunked body starts with a chunk size
    /// that is not hex.
    JsonBrokenChunked,
    /// Answers a JSON 200 with `content-length: 500` and closes with no
    /// body.
    JsonClosedBeforeBody,
    /// Answers a JSON 200's head (`content-length: 2`), then nothing.
    JsonStallAfterHeaders,
}

/// One SSE event of a chat stream.
const EVENT: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":null}]}\n\n";

/// A stream's usage chunk (the one weir asks for with `include_usage`).
const USAGE_EVENT: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3000,\"total_tokens\":3005}}\n\n";

const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

/// Starts a backend with `fault` on 127.0.0.1 and returns its base URL.
async fn faulty(fault: Fault) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    if fault == Fault::Refuses {
        drop(listener);
    } else {
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(misbehave(stream, fault));
            }
        });
    }
    format!("http://{addr}/v1")
}

/// Reads one request (head and `content-length` body), then misbehaves.
async fn misbehave(mut s: TcpStream, fault: Fault) {
    if read_request(&mut s).await.is_none() {
        return;
    }
    let chunk = |data: &str| format!("{:x}\r\n{data}\r\n", data.len()).into_bytes();
    let _ = match fault {
        Fault::Refuses => Ok(()),
        Fault::ResetBeforeHeaders => reset(s),
        Fault::Garbage => {
            let r = s
                .write_all(b"\x00\x01\x02 SMTP ready\r\n\r\n\xff\xfe")
                .await;
            drop(s);
            r
        }
        Fault::HugeHeaders => {
            let mut head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-big: ".to_vec();
            head.extend(std::iter::repeat_n(b'a', 1024 * 1024));
            head.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\n{}");
            s.write_all(&head).await
        }
        Fault::GzipTransferCoding => {
            let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: gzip, chunked\r\n\r\n";
            // Not even gzip: weir must not pass it on, whatever it is.
            s.write_all(&[&head[..], &chunk("{}"), b"0\r\n\r\n"].concat())
                .await
        }
        Fault::DripHeaders => drip(&mut s, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await,
        Fault::NeverAnswers => {
            // Hold the connection until weir gives up on it.
            let mut buf = [0u8; 1024];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            Ok(())
        }
        Fault::ResetMidStream => {
            let r = s.write_all(&[SSE_HEAD, &chunk(EVENT)].concat()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            r.and(reset(s))
        }
        Fault::ResetAfterUsage => {
            let r = s
                .write_all(&[SSE_HEAD, &chunk(EVENT), &chunk(USAGE_EVENT)].concat())
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            r.and(reset(s))
        }
        Fault::ResetAfterDone => {
            let r = s
                .write_all(
                    &[
                        SSE_HEAD,
                        &chunk(EVENT),
                        &chunk(USAGE_EVENT),
                        &chunk("data: [DONE]\n\n"),
                    ]
                    .concat(),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            r.and(reset(s))
        }
        Fault::OpenAfterDone | Fault::PingsAfterDone => {
            let whole = [
                SSE_HEAD,
                &chunk(EVENT),
                &chunk(USAGE_EVENT),
                &chunk("data: [DONE]\n\n"),
            ]
            .concat();
            let r = s.write_all(&whole).await;
            if fault == Fault::PingsAfterDone {
                while s.write_all(&chunk(": ping\n\n")).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            let mut buf = [0u8; 1024];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            r
        }
        Fault::BrokenChunked => {
            s.write_all(&[SSE_HEAD, &chunk(EVENT), b"zz\r\nnot a chunk\r\n"].concat())
                .await
        }
        Fault::StallAfterHeaders | Fault::JsonStallAfterHeaders => {
            let head: &[u8] = if fault == Fault::StallAfterHeaders {
                SSE_HEAD
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
            };
            let r = s.write_all(head).await;
            let mut buf = [0u8; 1024];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            r
        }
        Fault::JsonBrokenChunked => {
            let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
            s.write_all(&[&head[..], b"zz\r\nnot a chunk\r\n"].concat())
                .await
        }
        Fault::JsonClosedBeforeBody => {
            let r = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n")
                .await;
            drop(s);
            r
        }
        Fault::DripBody => {
            let r = s.write_all(&[SSE_HEAD, &chunk(EVENT)].concat()).await;
            let rest = [chunk(EVENT), b"0\r\n\r\n".to_vec()].concat();
            r.and(drip(&mut s, &rest).await)
        }
    };
}

/// Closes with RST (SO_LINGER 0) instead of FIN. (The deprecation warns
/// that a lingering close blocks the thread; with a zero linger it does
/// not.)
#[allow(deprecated)]
fn reset(s: TcpStream) -> std::io::Result<()> {
    s.set_linger(Some(Duration::ZERO))?;
    drop(s);
    Ok(())
}

/// Writes `bytes` one per second, until the peer goes away.
async fn drip(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    for b in bytes {
        s.write_all(&[*b]).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// Reads a request head and its `content-length` body; `None` if the
/// connection closed first.
async fn read_request(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return Some(got);
            }
        }
        let n = s.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// A gateway with three models: `mixed` (the faulty backend `bad`, weight
/// 100, and a healthy mock `good`, weight 1), `alone` (the faulty backend
/// only, as `bad2`) and `other` (the healthy mock only). One failure ejects
/// a backend, so the ejection count shows that outlier detection counted it.
async fn setup(fault: Fault) -> weir::Handle {
    setup_ejecting_after(fault, 1).await
}

/// [`setup`] with `consecutive_failures = failures`.
async fn setup_ejecting_after(fault: Fault, failures: u32) -> weir::Handle {
    let bad = faulty(fault).await;
    let good = mock::start(MockConfig::default().models(vec!["mixed".into(), "other".into()]))
        .await
        .unwrap();
    let toml = format!(
        r#"[server]
first_byte_timeout = "300ms"
request_timeout = "3s"

[[models]]
name = "mixed"
[[models]]
name = "alone"
[[models]]
name = "other"

{}{}{}{}
[outlier]
consecutive_failures = {failures}
max_ejection_percent = 100

[retry]
max_attempts = 3
base_delay = "1ms"
max_delay = "5ms"
budget_percent = 100
"#,
        backend("bad", &bad, &["mixed"], 100),
        backend("bad2", &bad, &["alone"], 1),
        backend("good", &good.base_url(), &["mixed", "other"], 1),
        QUIET
    );
    // The mock lives as long as the test's runtime.
    std::mem::forget(good);
    gateway(&toml).await
}

/// The `/admin/backends` entry of `name`.
async fn backend_state(addr: SocketAddr, name: &str) -> serde_json::Value {
    let all = get(addr, "/admin/backends").await.json();
    all["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no backend {name} in {all}"))
}

/// A fault before any response byte: with a healthy peer the client gets
/// the peer's 200 (one retry); alone, `alone_status`. Either way the fault
/// is counted under `kind` and the backend ejected, and `other` is served.
async fn check_before_headers(fault: Fault, kind: &str, alone_status: u16) {
    let gw = setup(fault).await;
    let addr = gw.addr();
    let mut started = Instant::now();
    let mut r = post(addr, "/v1/chat/completions", &chat("mixed", false)).await;
    // The balancer starts at a random point of its schedule: one time in
    // 101 the first pick is `good` itself and no fault is met. The next
    // pick is then `bad` (weight 100 against 1).
    if metric(addr, "weir_retries_total", &[("model", "mixed")]).await == 0.0 {
        assert_eq!(r.header("x-weir-backend"), "good", "{fault:?}");
        started = Instant::now();
        r = post(addr, "/v1/chat/completions", &chat("mixed", false)).await;
    }
    assert_eq!(r.status, 200, "{fault:?}: {}", r.text());
    assert_eq!(r.header("x-weir-backend"), "good", "{fault:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "{fault:?}");
    assert_eq!(
        metric(addr, "weir_retries_total", &[("model", "mixed")]).await,
        1.0,
        "{fault:?}"
    );
    assert_eq!(
        backend_state(addr, "bad").await["ejections"],
        1,
        "{fault:?}"
    );

    let r = post(addr, "/v1/chat/completions", &chat("alone", false)).await;
    assert_eq!(r.status.as_u16(), alone_status, "{fault:?}: {}", r.text());
    let code = if alone_status == 504 {
        "upstream_timeout"
    } else {
        "bad_gateway"
    };
    assert_eq!(r.json()["error"]["code"], code, "{fault:?}");
    assert_eq!(
        backend_state(addr, "bad2").await["ejections"],
        1,
        "{fault:?}"
    );
    // `bad` failed once (then `good` answered); `bad2`, alone, was tried
    // once: its failure ejected it (`consecutive_failures = 1`), and an
    // ejected backend gets no retry, even when it is the only one.
    for (backend, attempts) in [("bad", 1.0), ("bad2", 1.0)] {
        let errors = metric(
            addr,
            "weir_upstream_errors_total",
            &[("backend", backend), ("kind", kind)],
        )
        .await;
        assert_eq!(errors, attempts, "{fault:?} {backend}");
    }
    let r = post(addr, "/v1/chat/completions", &chat("other", false)).await;
    assert_eq!(r.status, 200, "{fault:?}: weir stopped serving");
}

#[tokio::test]
async fn refused_connections_are_retried_elsewhere_or_502() {
    check_before_headers(Fault::Refuses, "connect", 502).await;
}

#[tokio::test]
async fn resets_before_headers_are_retried_elsewhere_or_502() {
    check_before_headers(Fault::ResetBeforeHeaders, "protocol", 502).await;
}

#[tokio::test]
async fn garbage_answers_are_retried_elsewhere_or_502() {
    check_before_headers(Fault::Garbage, "protocol", 502).await;
}

#[tokio::test]
async fn one_mib_of_headers_is_retried_elsewhere_or_502() {
    check_before_headers(Fault::HugeHeaders, "protocol", 502).await;
}

/// RFC 9112 §6.1: weir sends no `TE`, and `Transfer-Encoding` is
/// hop-by-hop, so a gzip-coded body passed on would reach the client
/// unlabelled; it is refused as nginx refuses it.
#[tokio::test]
async fn a_transfer_coding_weir_did_not_ask_for_is_retried_elsewhere_or_502() {
    check_before_headers(Fault::GzipTransferCoding, "protocol", 502).await;
}

#[tokio::test]
async fn dripped_headers_time_out_and_are_retried_elsewhere_or_504() {
    check_before_headers(Fault::DripHeaders, "timeout", 504).await;
}

/// SPEC "Backend faults": a broken body becomes a retry while nothing has
/// reached the client. An answer's head goes out with its first body
/// bytes, so a body that breaks before them is a failed attempt, not a
/// 200 with a cut body.
#[tokio::test]
async fn json_bodies_broken_before_their_first_byte_are_retried_elsewhere_or_502() {
    check_before_headers(Fault::JsonBrokenChunked, "protocol", 502).await;
    check_before_headers(Fault::JsonClosedBeforeBody, "protocol", 502).await;
}

#[tokio::test]
async fn json_bodies_silent_after_their_head_are_retried_elsewhere_or_504() {
    check_before_headers(Fault::JsonStallAfterHeaders, "timeout", 504).await;
}

#[tokio::test]
async fn silent_backends_time_out_and_are_retried_elsewhere_or_504() {
    check_before_headers(Fault::NeverAnswers, "timeout", 504).await;
}

/// A fault after the response headers: the client keeps what it got, then
/// an SSE `error` event ends the stream. `kind` is the
/// `weir_upstream_errors_total` kind it counts as, which also counts
/// towards outlier detection; `None` when weir's own `request_timeout`
/// ended it (not a failure weir can attribute to the backend).
async fn check_mid_stream(fault: Fault, kind: Option<&str>) -> (Streamed, weir::Handle) {
    let gw = setup(fault).await;
    let addr = gw.addr();
    let s = post_stream(addr, "/v1/chat/completions", &chat("alone", true)).await;
    assert_eq!(s.status, 200, "{fault:?}");
    let text = s.text();
    assert!(text.starts_with(EVENT), "{fault:?}: {text}");
    let (_, last) = text
        .trim_end()
        .rsplit_once("\n\n")
        .unwrap_or_else(|| panic!("{fault:?}: one event only: {text}"));
    assert!(
        last.starts_with("event: error\ndata: {"),
        "{fault:?}: {text}"
    );
    let event: serde_json::Value =
        serde_json::from_str(last.trim_start_matches("event: error\ndata: ")).unwrap();
    assert_eq!(event["error"]["type"], "upstream_error", "{fault:?}");
    assert_eq!(
        backend_state(addr, "bad2").await["ejections"],
        u64::from(kind.is_some()),
        "{fault:?}"
    );
    if let Some(kind) = kind {
        let errors = metric(
            addr,
            "weir_upstream_errors_total",
            &[("backend", "bad2"), ("kind", kind)],
        )
        .await;
        assert_eq!(errors, 1.0, "{fault:?}");
    }
    let r = post(addr, "/v1/chat/completions", &chat("other", false)).await;
    assert_eq!(r.status, 200, "{fault:?}: weir stopped serving");
    (s, gw)
}

#[tokio::test]
async fn resets_mid_stream_end_with_an_sse_error_event() {
    check_mid_stream(Fault::ResetMidStream, Some("protocol")).await;
}

/// SPEC "Token accounting": a stream that reported its usage and was then
/// cut by the backend cost what it reported, not its estimate.
/// Each answer's headers arrive, then its body breaks: the failures are
/// consecutive (the headers alone are not a success), so the third ejects.
#[tokio::test]
async fn bodies_breaking_after_their_headers_count_in_a_row_and_eject() {
    for fault in [Fault::ResetMidStream, Fault::BrokenChunked] {
        let gw = setup_ejecting_after(fault, 3).await;
        let addr = gw.addr();
        for n in 1..=3 {
            assert_eq!(
                backend_state(addr, "bad2").await["ejections"],
                0,
                "{fault:?} {n}"
            );
            let s = post_stream(addr, "/v1/chat/completions", &chat("alone", true)).await;
            assert_eq!(s.status, 200, "{fault:?}");
            assert!(s.text().contains("event: error"), "{fault:?}: {}", s.text());
        }
        assert_eq!(
            backend_state(addr, "bad2").await["ejections"],
            1,
            "{fault:?}"
        );
    }
}

#[tokio::test]
async fn a_stream_cut_after_its_usage_is_charged_that_usage() {
    let (s, gw) = check_mid_stream(Fault::ResetAfterUsage, Some("protocol")).await;
    assert!(
        !s.text().contains("\"usage\""),
        "weir's usage chunk is removed: {}",
        s.text()
    );
    let addr = gw.addr();
    for (kind, tokens) in [("prompt", 5.0), ("completion", 3000.0)] {
        let counted = metric(
            addr,
            "weir_tokens_total",
            &[("model", "alone"), ("kind", kind)],
        )
        .await;
        assert_eq!(counted, tokens, "{kind}");
    }
}

/// A backend that resets after `data: [DONE]` has sent the whole stream:
/// the client gets it as sent, ended cleanly, with no `error` event after
/// `[DONE]`; the answer counts as complete (its usage charged, no failure
/// against the backend).
#[tokio::test]
async fn a_reset_after_done_ends_the_stream_cleanly() {
    let gw = setup(Fault::ResetAfterDone).await;
    let addr = gw.addr();
    for _ in 0..2 {
        let s = post_stream(addr, "/v1/chat/completions", &chat("alone", true)).await;
        assert_eq!(s.status, 200);
        // `post_stream` reads the body to its last chunk: it ended cleanly.
        assert_eq!(
            s.text(),
            format!("{EVENT}data: [DONE]\n\n"),
            "as sent, the usage chunk weir asked for removed"
        );
    }
    assert_eq!(backend_state(addr, "bad2").await["ejections"], 0);
    let errors = metric(
        addr,
        "weir_upstream_errors_total",
        &[("backend", "bad2"), ("kind", "protocol")],
    )
    .await;
    assert_eq!(errors, 0.0);
    let completion = metric(
        addr,
        "weir_tokens_total",
        &[("model", "alone"), ("kind", "completion")],
    )
    .await;
    assert_eq!(completion, 6000.0, "both answers' usage charged");
}

/// A backend that keeps a stream open after `data: [DONE]` (no last
/// chunk), silent or sending comments: the client's stream ends whole
/// about a second after `[DONE]`, not at `first_byte_timeout` (30 s here)
/// or `request_timeout` (60 s), as complete: its usage charged, no failure
/// against the backend.
#[tokio::test]
async fn a_stream_held_open_after_done_ends_soon_after_it() {
    held_open_after_done(Fault::OpenAfterDone).await;
    held_open_after_done(Fault::PingsAfterDone).await;
}

async fn held_open_after_done(fault: Fault) {
    let bad = faulty(fault).await;
    let toml = format!(
        "[server]\nfirst_byte_timeout = \"30s\"\nrequest_timeout = \"60s\"\n\n[[models]]\nname = \"alone\"\n\n{}{QUIET}",
        backend("bad2", &bad, &["alone"], 1)
    );
    let gw = gateway(&toml).await;
    let addr = gw.addr();
    let start = Instant::now();
    let s = post_stream(addr, "/v1/chat/completions", &chat("alone", true)).await;
    let ended = start.elapsed();
    assert_eq!(s.status, 200);
    let text = s.text().replace(": ping\n\n", "");
    assert_eq!(text, format!("{EVENT}data: [DONE]\n\n"), "{fault:?}");
    assert!(
        ended < Duration::from_secs(10),
        "{fault:?}: ended after {ended:?}"
    );
    for kind in ["protocol", "timeout"] {
        let errors = metric(
            addr,
            "weir_upstream_errors_total",
            &[("backend", "bad2"), ("kind", kind)],
        )
        .await;
        assert_eq!(errors, 0.0, "{fault:?} {kind}");
    }
    let completion = metric(
        addr,
        "weir_tokens_total",
        &[("model", "alone"), ("kind", "completion")],
    )
    .await;
    assert_eq!(completion, 3000.0, "{fault:?}: its usage charged");
}

#[tokio::test]
async fn broken_chunked_framing_ends_with_an_sse_error_event() {
    check_mid_stream(Fault::BrokenChunked, Some("protocol")).await;
}

/// A body dripping one byte per second leaves gaps longer than
/// `first_byte_timeout` (300 ms here): the first one ends it as the
/// backend's timeout, not held for the minutes the drip would take nor
/// until `request_timeout` (3 s).
#[tokio::test]
async fn dripped_bodies_end_at_first_byte_timeout_with_an_sse_error_event() {
    let (s, _gw) = check_mid_stream(Fault::DripBody, Some("timeout")).await;
    let (at, _) = s.frames.last().unwrap();
    assert!(*at >= Duration::from_millis(250), "{at:?}");
    assert!(*at < Duration::from_millis(2500), "{at:?}");
}

/// A mock serving `m1` whose streams stall after their first event, the
/// connection held open (`stall_after(1)`).
async fn stalling_mock() -> mock::MockHandle {
    mock::start(
        MockConfig::default()
            .models(vec!["m1".into()])
            .stall_after(1),
    )
    .await
    .unwrap()
}

/// A stream that goes silent after its first event, its connection held
/// open (the mock's `stall_after`): weir ends it at `request_timeout` (1 s
/// here) with an `error` event after what arrived, and closes the
/// backend's connection instead of keeping the stalled answer.
#[tokio::test]
async fn a_stream_stalled_after_its_first_event_ends_at_request_timeout() {
    let m = stalling_mock().await;
    let toml = format!(
        "[server]\nrequest_timeout = \"1s\"\n\n[[models]]\nname = \"m1\"\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &["m1"], 1)
    );
    let gw = gateway(&toml).await;

    let s = post_stream(gw.addr(), "/v1/chat/completions", &chat("m1", true)).await;

    assert_eq!(s.status, 200);
    let text = s.text();
    let events: Vec<&str> = text.trim_end().split("\n\n").collect();
    assert_eq!(events.len(), 2, "{text}");
    assert!(events[0].contains(r#""content":"tok0""#), "{text}");
    assert!(events[1].starts_with("event: error\ndata: {"), "{text}");
    let (at, _) = s.frames.last().unwrap();
    assert!(*at >= Duration::from_millis(900), "{at:?}");
    let closed = eventually(Duration::from_secs(5), || {
        m.connections_open() == 0 && m.in_flight() == 0
    })
    .await;
    assert!(closed, "weir kept the stalled backend connection");
}

/// The access log tells weir's own `request_timeout` cutting a stream
/// (`ending="timeout"`) from a backend failing (`upstream_error`): the cut
/// is not held against the backend, so an operator filtering for backend
/// failures must not find it there.
#[tokio::test]
async fn a_stream_cut_by_request_timeout_is_logged_as_timeout() {
    let m = stalling_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.toml");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"1s\"\n\n[[models]]\nname = \"m1\"\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &["m1"], 1)
    );
    std::fs::write(&path, toml).unwrap();
    let weir = spawn_weir_env(&path, "info", &[]);
    let s = post_stream(weir.addr, "/v1/chat/completions", &chat("m1", true)).await;
    assert_eq!(s.status, 200);
    assert!(s.text().contains("event: error"), "{}", s.text());
    let line = log_line(&weir.log, "ending=").await.expect("a log line");
    assert!(line.contains("ending=\"timeout\""), "{line}");
}

/// A gateway in front of one mock (`b1`, model `m1`) whose streams stall
/// after their first event (`stall_after(1)`), with `first_byte_timeout`
/// 1 s, `request_timeout` 60 s and `consecutive_failures = failures`.
async fn stalling_gateway(failures: u32) -> (weir::Handle, mock::MockHandle) {
    let m = stalling_mock().await;
    let toml = format!(
        "[server]\nfirst_byte_timeout = \"1s\"\nrequest_timeout = \"60s\"\n\n\
         [[models]]\nname = \"m1\"\n\n{}\
         [outlier]\nconsecutive_failures = {failures}\nmax_ejection_percent = 100\n\n{QUIET}",
        backend("b1", &m.base_url(), &["m1"], 1)
    );
    (gateway(&toml).await, m)
}

/// A stalled stream read to its end: its first event, then the `error`
/// event the idle limit ends it with (bounded well below
/// `request_timeout`, which would end it only after 60 s).
async fn read_stalled_stream(addr: SocketAddr) -> String {
    let s = tokio::time::timeout(
        Duration::from_secs(20),
        post_stream(addr, "/v1/chat/completions", &chat("m1", true)),
    )
    .await
    .expect("the stalled stream ends long before request_timeout");
    assert_eq!(s.status, 200);
    let text = s.text();
    let events: Vec<&str> = text.trim_end().split("\n\n").collect();
    assert_eq!(events.len(), 2, "{text}");
    assert!(events[0].contains(r#""content":"tok0""#), "{text}");
    let error = events[1]
        .strip_prefix("event: error\ndata: ")
        .unwrap_or_else(|| panic!("no error event: {text}"));
    let error: serde_json::Value = serde_json::from_str(error).unwrap();
    assert_eq!(error["error"]["type"], "upstream_error", "{text}");
    assert_eq!(
        error["error"]["message"], "the upstream sent nothing for first_byte_timeout (1s)",
        "{text}"
    );
    text
}

/// A stream that stalls mid-way (its first event sent, its connection held
/// open) ends with an SSE `error` event once the backend has sent nothing
/// for `first_byte_timeout` (1 s), not at `request_timeout` (60 s), and
/// counts as the backend's timeout: it is ejected after one failure, and
/// its stalled connection is closed.
#[tokio::test]
async fn a_stream_stalled_mid_way_ends_at_first_byte_timeout_and_ejects() {
    let (gw, m) = stalling_gateway(1).await;
    let addr = gw.addr();

    read_stalled_stream(addr).await;

    let errors = metric(
        addr,
        "weir_upstream_errors_total",
        &[("backend", "b1"), ("kind", "timeout")],
    )
    .await;
    assert_eq!(errors, 1.0);
    assert_eq!(backend_state(addr, "b1").await["ejections"], 1);
    let closed = eventually(Duration::from_secs(5), || {
        m.connections_open() == 0 && m.in_flight() == 0
    })
    .await;
    assert!(closed, "weir kept the stalled backend connection");
}

/// A client that gives up on a stalled stream before the idle limit does
/// not count as a success of the backend (which would start its failures
/// in a row over): with `consecutive_failures = 2`, a timeout, a client
/// leaving after its first event, and a second timeout eject it.
#[tokio::test]
async fn a_client_leaving_a_stalled_stream_does_not_reset_the_failures_in_a_row() {
    let (gw, m) = stalling_gateway(2).await;
    let addr = gw.addr();

    read_stalled_stream(addr).await;
    assert_eq!(backend_state(addr, "b1").await["ejections"], 0);

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&raw_chat(&chat("m1", true), "")).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data: {") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("first event within 5s")
            .unwrap();
        assert!(n > 0, "closed before the first event");
        got.extend_from_slice(&buf[..n]);
    }
    drop(s);
    let left = eventually(Duration::from_secs(5), || m.in_flight() == 0).await;
    assert!(left, "the abandoned stream is still held");
    assert_eq!(backend_state(addr, "b1").await["ejections"], 0);

    read_stalled_stream(addr).await;
    assert_eq!(
        metric(
            addr,
            "weir_upstream_errors_total",
            &[("backend", "b1"), ("kind", "timeout")],
        )
        .await,
        2.0
    );
    assert_eq!(backend_state(addr, "b1").await["ejections"], 1);
}

/// The idle limit counts only time weir waits on the backend: a client
/// that reads a fast stream slowly (2.5 s between reads, past
/// `first_byte_timeout` = 2 s) holds weir back from reading the backend
/// (back-pressure), and that is not the backend's silence. The stream is
/// not cut and arrives whole.
#[tokio::test]
async fn a_slow_but_steady_reader_is_not_cut_by_the_idle_limit() {
    let fast = MockConfig::default().chunks(400_000);
    let (gw, m) = gateway_with_mock(
        "m1",
        fast,
        "[server]\nfirst_byte_timeout = \"2s\"\nrequest_timeout = \"60s\"",
    )
    .await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(&raw_chat(&chat("m1", true), "connection: close\r\n"))
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // `first_byte_timeout` is also what the stream's first event gets: an
    // attempt that missed it on a loaded machine (the mock runs on this
    // test's thread) is rightly counted as the backend's timeout, and
    // retried, before the head above went out. The idle limit must count
    // none from here.
    let timeouts = || {
        metric(
            gw.addr(),
            "weir_upstream_errors_total",
            &[("kind", "timeout")],
        )
    };
    let before = timeouts().await;
    let mut total = n;
    let mut tail = Vec::new();
    let mut reads = 0;
    loop {
        if reads < 4 {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            // Still streaming: weir was held back, not the backend done.
            assert_eq!(m.in_flight(), 1, "the backend finished: weir buffered");
        }
        reads += 1;
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .expect("stream goes on")
            .unwrap();
        if n == 0 {
            break;
        }
        total += n;
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 512 {
            tail.drain(..tail.len() - 512);
        }
    }
    let tail = String::from_utf8_lossy(&tail);
    assert!(total > 10_000_000, "{total} bytes");
    assert!(!tail.contains("event: error"), "cut: {tail}");
    assert!(tail.contains("data: [DONE]"), "{tail}");
    assert_eq!(timeouts().await, before, "the idle limit counted a timeout");
}

/// SSE headers and then silence (SPEC: `first_byte_timeout` covers
/// "response headers / first SSE event"; 300 ms here): a stream's headers
/// go out with its first event, so nothing has reached the client and the
/// stream is retried on another backend; alone, the client gets 504
/// `upstream_timeout` naming `first_byte_timeout`, not a 200 whose body is
/// an error. Either way it counts as the backend's timeout.
#[tokio::test]
async fn a_stream_without_a_first_event_is_retried_elsewhere_or_504() {
    check_before_headers(Fault::StallAfterHeaders, "timeout", 504).await;

    let gw = setup_ejecting_after(Fault::StallAfterHeaders, 100).await;
    let started = Instant::now();
    let s = post_stream(gw.addr(), "/v1/chat/completions", &chat("mixed", true)).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.headers["x-weir-backend"], "good");
    assert!(
        s.text().trim_end().ends_with("data: [DONE]"),
        "{}",
        s.text()
    );
    assert!(started.elapsed() < Duration::from_millis(2500));
    let r = post(gw.addr(), "/v1/chat/completions", &chat("alone", true)).await;
    r.assert_error(504, "timeout", "upstream_timeout");
    let message = r.json()["error"]["message"].to_string();
    assert!(message.contains("first_byte_timeout"), "{message}");
}

/// A client leaving mid-stream: the backend sees its connection close
/// within 5 s (not the 20 s the stream would run; typically a few
/// ms, but the bound must hold on a loaded machine), the model's only concurrency permit is back (the next
/// request is admitted although the queue allows no wait), and the
/// in-flight gauge returns to 0.
#[tokio::test]
async fn a_client_leaving_mid_stream_cancels_upstream_and_frees_its_permit() {
    let m = mock::start(
        MockConfig::default()
            .models(vec!["m1".into()])
            .tokens_per_sec(20.0)
            .chunks(400),
    )
    .await
    .unwrap();
    let toml = format!(
        "[defaults]\nqueue_timeout = \"1ms\"\n\n[[models]]\nname = \"m1\"\nmax_concurrent = 1\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &["m1"], 1)
    );
    let gw = gateway(&toml).await;
    let addr = gw.addr();
    for round in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&raw_chat(&chat("m1", true), "")).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("data: {") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("first event within 5s")
                .unwrap();
            assert!(n > 0, "closed before the first event");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(m.in_flight(), 1);
        assert_eq!(m.connections_open(), 1);
        // While it streams, the only permit is taken.
        let r = post(addr, "/v1/chat/completions", &chat("m1", false)).await;
        assert_eq!(r.status, 429, "round {round}: {}", r.text());

        let left = Instant::now();
        drop(s);
        let closed = eventually(Duration::from_secs(5), || {
            m.connections_open() == 0 && m.in_flight() == 0
        })
        .await;
        let took = left.elapsed();
        assert!(
            closed,
            "round {round}: the backend's connection stayed open"
        );
        assert!(
            took < Duration::from_secs(5),
            "round {round}: closed after {took:?}"
        );
        let r = post(addr, "/v1/chat/completions", &chat("m1", false)).await;
        assert_eq!(
            r.status,
            200,
            "round {round}: permit not back: {}",
            r.text()
        );
        assert_eq!(
            metric(addr, "weir_in_flight", &[("model", "m1")]).await,
            0.0
        );
    }
}

/// Back-pressure: a client that stops reading a fast stream makes weir stop
/// reading the backend, so the backend cannot finish (weir buffers nothing
/// beyond socket buffers and a frame); once the client reads on, the whole
/// stream arrives intact.
#[tokio::test]
async fn a_slow_reader_slows_the_backend_down() {
    let fast = MockConfig::default().chunks(400_000);
    let (gw, m) = gateway_with_mock("m1", fast, "").await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(&raw_chat(&chat("m1", true), "connection: close\r\n"))
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Stop reading for a while: the backend must still be streaming.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(m.in_flight(), 1, "the backend finished: weir buffered");
    let mut total = n;
    let mut tail = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .expect("stream goes on")
            .unwrap();
        if n == 0 {
            break;
        }
        total += n;
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 256 {
            tail.drain(..tail.len() - 256);
        }
    }
    assert!(total > 10_000_000, "{total} bytes");
    assert!(
        String::from_utf8_lossy(&tail).contains("data: [DONE]"),
        "{}",
        String::from_utf8_lossy(&tail)
    );
    assert_eq!(m.in_flight(), 0);
}

/// A client that never reads (and never closes) a stream is treated as
/// gone once it has taken no byte for `request_timeout`: weir closes its
/// connection and the backend's, instead of holding them forever (hyper
/// stops polling a body it cannot write, so the body's own deadline never
/// fires).
#[tokio::test]
async fn a_client_that_never_reads_is_dropped_at_request_timeout() {
    let fast = MockConfig::default().chunks(400_000);
    let (gw, m) = gateway_with_mock(
        "m1",
        fast,
        "[server]\nrequest_timeout = \"1s\"\nfirst_byte_timeout = \"1s\"",
    )
    .await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(&raw_chat(&chat("m1", true), "connection: close\r\n"))
        .await
        .unwrap();
    // weir's writes cannot stall before the request was sent, so the
    // deadline is at least request_timeout from here.
    let stalled = Instant::now();
    let mut buf = vec![0u8; 1024];
    let _ = s.read(&mut buf).await.unwrap();
    let released = eventually(Duration::from_secs(10), || {
        m.in_flight() == 0 && m.connections_open() == 0
    })
    .await;
    assert!(released, "the backend stream is still held");
    assert!(
        stalled.elapsed() >= Duration::from_millis(900),
        "{:?}",
        stalled.elapsed()
    );
    let r = post(gw.addr(), "/v1/chat/completions", &chat("m1", false)).await;
    assert_eq!(r.status, 200);
}

/// Mock backends named `b0`, `b1`, ... serving `mixed`, one per config.
async fn mocks(cfgs: Vec<MockConfig>) -> Vec<mock::MockHandle> {
    let mut v = Vec::new();
    for (i, cfg) in cfgs.into_iter().enumerate() {
        let cfg = cfg.models(vec!["mixed".into()]).name(format!("b{i}"));
        v.push(mock::start(cfg).await.unwrap());
    }
    v
}

/// The backends' `[[backends]]` entries (weight 1 each, `extra` appended to
/// the entry of the backend at the same index) and `rest` after them.
fn retry_config(ms: &[mock::MockHandle], extra: &[&str], rest: &str) -> String {
    let mut toml = String::from("[[models]]\nname = \"mixed\"\n\n");
    for (i, m) in ms.iter().enumerate() {
        toml.push_str(backend(&format!("b{i}"), &m.base_url(), &["mixed"], 1).trim_end());
        toml.push('\n');
        toml.push_str(extra.get(i).copied().unwrap_or(""));
        toml.push_str("\n\n");
    }
    toml.push_str(QUIET);
    toml.push_str(rest);
    toml
}

/// A backend that outlier detection ejects during a request is not tried
/// again by that request's retries, although the request's snapshot still
/// has it in rotation (SPEC "Ejection": out whatever happens).
#[tokio::test]
async fn a_retry_skips_a_backend_ejected_during_the_request() {
    let ms = mocks(vec![MockConfig::default().failure_rate(1.0); 2]).await;
    let toml = retry_config(
        &ms,
        &[],
        "[outlier]\nconsecutive_failures = 1\nmax_ejection_percent = 50\n\n[retry]\nmax_attempts = 3\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\nbudget_percent = 100\n",
    );
    let gw = gateway(&toml).await;
    let r = post(gw.addr(), "/v1/chat/completions", &chat("mixed", false)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    // The first backend tried was ejected (the second was not: 50 % were
    // out), so the third attempt went to the second again.
    let mut seen: Vec<u64> = ms.iter().map(mock::MockHandle::requests).collect();
    seen.sort_unstable();
    assert_eq!(seen, vec![1, 2]);
    let first = ms.iter().position(|m| m.requests() == 1).unwrap();
    assert_eq!(
        backend_state(gw.addr(), &format!("b{first}")).await["state"],
        "ejected"
    );
}

/// A backend that answered 429 in this request is out for its
/// `Retry-After`, for this request's retries too: the repeat goes to the
/// backend that answered 500 instead, at once.
#[tokio::test]
async fn a_retry_skips_a_backend_whose_429_is_still_running() {
    let ms = mocks(vec![
        MockConfig::default().rate_limit(1.0, 30),
        MockConfig::default().failure_rate(1.0),
    ])
    .await;
    let toml = retry_config(
        &ms,
        &[],
        "[outlier]\nconsecutive_failures = 100\n\n[retry]\nmax_attempts = 3\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\nbudget_percent = 100\n",
    );
    let gw = gateway(&toml).await;
    let started = Instant::now();
    let r = post(gw.addr(), "/v1/chat/completions", &chat("mixed", false)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        ms[0].requests(),
        1,
        "the 429 backend was asked again inside its Retry-After"
    );
    assert_eq!(ms[1].requests(), 2);
}

/// A backend the clock held out when a request began (its 429 window ran)
/// takes that request's retry once the window ends: it is untried, so the
/// retry does not wait out the other backend's longer `Retry-After` to go
/// back to it; and when it fails, the next retry repeats it (free) rather
/// than give up. Retries used to see only the backends in rotation in the
/// request's snapshot, and this one ended 502 after waiting 3 s.
#[tokio::test]
async fn a_retry_goes_to_a_backend_whose_429_window_ended_during_the_request() {
    // `a` answers its first `solo` request 429 with `Retry-After: 2`, its
    // first `mixed` one 500, then 200s.
    let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a_addr = a.local_addr().unwrap();
    let a_requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = a_requests.clone();
    let mixed_failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = a.accept().await {
            let (counted, mixed_failed) = (counted.clone(), mixed_failed.clone());
            tokio::spawn(async move {
                while let Some(request) = read_request(&mut s).await {
                    let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let solo = String::from_utf8_lossy(&request).contains("\"solo\"");
                    let answer = if n == 0 {
                        "HTTP/1.1 429 Too Many Requests\r\nretry-after: 2\r\ncontent-length: 0\r\n\r\n".to_owned()
                    } else if !solo && !mixed_failed.swap(true, std::sync::atomic::Ordering::SeqCst)
                    {
                        "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n".to_owned()
                    } else {
                        let body = r#"{"id":"c1","object":"chat.completion","created":0,"model":"mixed","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    // `b` answers every request 429 with `Retry-After: 3`.
    let b = mock::start(
        MockConfig::default()
            .models(vec!["mixed".into(), "solo".into()])
            .rate_limit(1.0, 3),
    )
    .await
    .unwrap();
    let toml = format!(
        "[[models]]\nname = \"mixed\"\n[[models]]\nname = \"solo\"\n\n{}{}{QUIET}\
         [outlier]\nconsecutive_failures = 100\n\n[retry]\nmax_attempts = 3\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\nbudget_percent = 100\n",
        backend("a", &format!("http://{a_addr}/v1"), &["mixed", "solo"], 1),
        backend("b", &b.base_url(), &["mixed"], 1),
    );
    let gw = gateway(&toml).await;
    // `solo` is served by `a` alone: its 429 takes `a` out of rotation for
    // two seconds; the request waits for it and is served then.
    let addr = gw.addr();
    let solo =
        tokio::spawn(async move { post(addr, "/v1/chat/completions", &chat("solo", false)).await });
    let out = eventually(Duration::from_secs(5), || {
        a_requests.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    assert!(out, "a was asked");
    let mut held = false;
    for _ in 0..50 {
        let a = backend_state(gw.addr(), "a").await;
        if a["models"]["mixed"]["effective_weight"] == 0 {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(held, "a out of rotation");
    // This request's snapshot has `a` out: it goes to `b` (429, three
    // seconds), its retry to `a` once a's two seconds are over (500), and
    // the next to `a` again, free while `b` still waits.
    let r = post(gw.addr(), "/v1/chat/completions", &chat("mixed", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-weir-backend"), "a");
    assert_eq!(b.requests(), 1, "b was not asked again");
    assert_eq!(solo.await.unwrap().status, 200);
}

/// With every backend of the model held out by a 429's `Retry-After`, the
/// 503 says when the first comes back (`Retry-After`), so a client returns
/// when weir will serve instead of at once; a backend out by its health
/// checks gives no such time. The 503 used to carry no `Retry-After`.
#[tokio::test]
async fn a_503_while_every_backend_waits_out_a_429_says_when() {
    let ms = mocks(vec![MockConfig::default().rate_limit(1.0, 30)]).await;
    let toml = retry_config(
        &ms,
        &[],
        "[outlier]\nconsecutive_failures = 100\n\n[retry]\nmax_attempts = 1\n",
    );
    let gw = gateway(&toml).await;
    let first = post(gw.addr(), "/v1/chat/completions", &chat("mixed", false)).await;
    assert_ne!(first.status, 200, "{}", first.text());
    assert_503_says_back_in_30s(gw.addr()).await;
}

/// Asks for model `mixed` until weir answers 503 (the snapshot after a 429
/// has its backend out; one built before may serve and draw another 429
/// meanwhile), and checks that the 503 says when the backend is back: the
/// mocks' `Retry-After: 30`.
async fn assert_503_says_back_in_30s(addr: SocketAddr) {
    let mut refused = None;
    for _ in 0..50 {
        let r = post(addr, "/v1/chat/completions", &chat("mixed", false)).await;
        if r.status == 503 {
            refused = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = refused.expect("a 503 once the backend is out");
    refused.assert_error(503, "service_unavailable", "no_healthy_backend");
    let retry_after: u64 = refused.header("retry-after").parse().unwrap_or(0);
    assert!((29..=30).contains(&retry_after), "{retry_after}");
}

/// A backend configured with weight 0 never serves, so it is neither "in
/// rotation" nor waited for: the 503 of a model whose other backend waits
/// out a 429 still says when that one is back. It used to say nothing.
#[tokio::test]
async fn a_weight_0_backend_does_not_hide_when_the_model_is_back() {
    let ms = mocks(vec![
        MockConfig::default().rate_limit(1.0, 30),
        MockConfig::default(),
    ])
    .await;
    let toml = format!(
        "[[models]]\nname = \"mixed\"\n\n{}{}{QUIET}[outlier]\nconsecutive_failures = 100\n\n[retry]\nmax_attempts = 1\n",
        backend("b0", &ms[0].base_url(), &["mixed"], 1),
        backend("idle", &ms[1].base_url(), &["mixed"], 0),
    );
    let gw = gateway(&toml).await;
    let first = post(gw.addr(), "/v1/chat/completions", &chat("mixed", false)).await;
    assert_ne!(first.status, 200, "{}", first.text());
    assert_503_says_back_in_30s(gw.addr()).await;
    assert_eq!(ms[1].requests(), 0);
}

/// An attempt cut by weir's own `request_timeout` after queueing had used
/// most of it (less than half of what a first attempt gets was left) is
/// the request's deadline, not the backend's failure: a 504 naming
/// `request_timeout`, no timeout counted, no ejection. An attempt given
/// most of it is judged as any: a hung backend is counted and ejected
/// whatever the two timeouts are (`request_timeout` below half of
/// `first_byte_timeout` used to hide it).
#[tokio::test]
async fn a_request_timeout_cut_counts_against_the_backend_only_with_time_given() {
    // One token every three seconds: a second request sent `d` after the
    // first took its token waits 3 s - d of its 3 s, and goes to the
    // 1.5 s backend with d left, under half its time, whenever d < 1.5 s
    // (a loaded machine's delay in sending it; at one token every two
    // seconds that slack was 0.5 s, and a loaded run missed it).
    let ms = mocks(vec![
        MockConfig::default().latency(Duration::from_millis(1500))
    ])
    .await;
    let toml = retry_config(
        &ms,
        &[],
        "[server]\nrequest_timeout = \"3s\"\nfirst_byte_timeout = \"10s\"\n\n[outlier]\nconsecutive_failures = 1\n",
    )
    .replace(
        "[[models]]\nname = \"mixed\"\n",
        "[[models]]\nname = \"mixed\"\nrequests_per_minute = 20\nburst = 1\n",
    );
    let gw = gateway(&toml).await;
    let addr = gw.addr();
    // The second is sent once the first has reached the backend: sent 50 ms
    // after it instead, it could overtake it on a loaded machine (a new
    // connection each), take the token, and leave the first to be cut.
    let first = chat_later(addr, "mixed");
    assert!(eventually(Duration::from_secs(5), || ms[0].requests() == 1).await);
    let second = post(addr, "/v1/chat/completions", &chat("mixed", false)).await;
    let first = first.await.expect("first request");
    assert_eq!(first.status, 200, "{}", first.text());
    second.assert_error(504, "timeout", "upstream_timeout");
    assert!(
        second.text().contains("request_timeout"),
        "{}",
        second.text()
    );
    let labels = [("backend", "b0"), ("kind", "timeout")];
    assert_eq!(
        metric(addr, "weir_upstream_errors_total", &labels).await,
        0.0
    );
    assert_eq!(backend_state(addr, "b0").await["state"], "healthy");

    // Given the whole request_timeout (under half the first_byte_timeout),
    // a silent backend is the one at fault.
    let ms = mocks(vec![MockConfig::default().hang(true)]).await;
    let toml = retry_config(
        &ms,
        &[],
        "[server]\nrequest_timeout = \"300ms\"\nfirst_byte_timeout = \"5s\"\n\n[outlier]\nconsecutive_failures = 2\n",
    );
    let gw = gateway(&toml).await;
    for _ in 0..2 {
        let r = post(gw.addr(), "/v1/chat/completions", &chat("mixed", false)).await;
        assert_eq!(r.status, 504, "{}", r.text());
    }
    let timeouts = metric(gw.addr(), "weir_upstream_errors_total", &labels).await;
    assert_eq!(timeouts, 2.0);
    assert_eq!(backend_state(gw.addr(), "b0").await["state"], "ejected");
}

/// A retry takes no turn of the balancer's shared sequence: with a failing
/// backend beside a good one (not ejected), first attempts still alternate
/// between them. Retries took the turn after the failing backend's, so
/// every first attempt landed on it.
#[tokio::test]
async fn retries_leave_the_first_attempts_their_turns() {
    let ms = mocks(vec![
        MockConfig::default().failure_rate(1.0),
        MockConfig::default(),
    ])
    .await;
    let toml = retry_config(
        &ms,
        &[],
        "[outlier]\nconsecutive_failures = 1000\n\n[retry]\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\nbudget_percent = 100\n",
    );
    let gw = gateway(&toml).await;
    for _ in 0..8 {
        let r = post(gw.addr(), "/v1/chat/completions", &chat("mixed", false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Four first attempts each; the failing backend's four retried on b1.
    assert_eq!(ms[0].requests(), 4);
    assert_eq!(ms[1].requests(), 8);
}

/// After a failure, an untried backend that is busy (at its
/// `max_concurrent`) does not hold the retry: it goes back to the backend
/// that failed, and the client gets that backend's failure as a 502, not a
/// concurrency 429 after `queue_timeout`.
#[tokio::test]
async fn a_retry_does_not_wait_for_a_busy_backend() {
    let ms = mocks(vec![
        MockConfig::default().failure_rate(1.0),
        MockConfig::default().hang(true),
    ])
    .await;
    let toml = retry_config(
        &ms,
        &["", "max_concurrent = 1"],
        "[server]\nfirst_byte_timeout = \"20s\"\nrequest_timeout = \"30s\"\n\n[outlier]\nconsecutive_failures = 100\n\n[retry]\nmax_attempts = 2\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\nbudget_percent = 100\n",
    )
    .replace("[[models]]\nname = \"mixed\"\n", "[[models]]\nname = \"mixed\"\nqueue_timeout = \"20s\"\n");
    let gw = gateway(&toml).await;
    let addr = gw.addr();
    // One request holds b1's only slot (b0 fails it over to b1 if picked first).
    let holder =
        tokio::spawn(
            async move { post(addr, "/v1/chat/completions", &chat("mixed", false)).await },
        );
    assert!(eventually(Duration::from_secs(5), || ms[1].in_flight() == 1).await);
    let before = ms[0].requests();
    let started = Instant::now();
    let r = post(addr, "/v1/chat/completions", &chat("mixed", false)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("answered 500"), "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(ms[0].requests() - before, 2, "both attempts went to b0");
    holder.abort();
}

/// A request that no backend answered is weir's own answer: counted and
/// logged with `backend=""`, not under the last backend it tried.
#[tokio::test]
async fn failed_requests_are_counted_as_weirs_own_answers() {
    let ms = mocks(vec![MockConfig::default().failure_rate(1.0)]).await;
    let toml = retry_config(
        &ms,
        &[],
        "[outlier]\nconsecutive_failures = 100\n\n[retry]\nmax_attempts = 2\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\nbudget_percent = 100\n",
    );
    let gw = gateway(&toml).await;
    let r = post(gw.addr(), "/v1/chat/completions", &chat("mixed", false)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let labels = |backend| [("model", "mixed"), ("backend", backend), ("status", "502")];
    assert_eq!(
        metric(gw.addr(), "weir_requests_total", &labels("")).await,
        1.0
    );
    assert_eq!(
        metric(gw.addr(), "weir_requests_total", &labels("b0")).await,
        0.0
    );
}

/// A 5xx's `Retry-After` holds this request off the backend that sent it,
/// and only it: the retries go on to a backend that asked for no pause,
/// whichever of the two was tried first, instead of asking the first again
/// inside its pause (`a_first`) or waiting out a pause the other one never
/// asked for (`b_first`).
#[tokio::test]
async fn a_5xx_retry_after_pauses_only_the_backend_that_sent_it() {
    let paused = mock::start(
        MockConfig::default()
            .models(vec!["a_first".into(), "b_first".into()])
            .status(503)
            .rate_limit(0.0, 30),
    )
    .await
    .unwrap();
    let resets = faulty(Fault::ResetBeforeHeaders).await;
    // Weights 100 to 1, so each model's first pick is (almost always) the
    // backend its name says.
    let toml = format!(
        r#"[server]
request_timeout = "60s"

[[models]]
name = "a_first"
[[models]]
name = "b_first"

{}{}{}{}{QUIET}
[outlier]
consecutive_failures = 1000

[retry]
max_attempts = 3
base_delay = "1ms"
max_delay = "5ms"
budget_percent = 100
"#,
        backend("a1", &paused.base_url(), &["a_first"], 100),
        backend("b1", &resets, &["a_first"], 1),
        backend("a2", &paused.base_url(), &["b_first"], 1),
        backend("b2", &resets, &["b_first"], 100),
    );
    let gw = gateway(&toml).await;
    for (model, asked) in [("a_first", 1), ("b_first", 2)] {
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            post(gw.addr(), "/v1/chat/completions", &chat(model, false)),
        )
        .await
        .unwrap_or_else(|_| panic!("{model}: the retry waited out the 503's Retry-After: 30"));
        assert_eq!(r.status, 502, "{model}: {}", r.text());
        // Its third attempt went to the backend that reset, the only one
        // not paused.
        assert!(
            r.text().contains("upstream failed"),
            "{model}: {}",
            r.text()
        );
        assert_eq!(
            paused.requests(),
            asked,
            "{model}: the 503 backend was asked again inside its Retry-After"
        );
    }
}

/// A retry does not wait out an ejection longer than `max_delay`: the only
/// backend's 500 ejects it for 3 s, and the client gets that 500 as a 502
/// at once, instead of after 3 s and 6 s more of waiting for a backend
/// that fails again, escalating its ejection count to 3 for one request.
#[tokio::test]
async fn a_retry_does_not_wait_out_an_ejection() {
    let ms = mocks(vec![MockConfig::default().failure_rate(1.0)]).await;
    let toml = retry_config(
        &ms,
        &[],
        "[server]\nrequest_timeout = \"60s\"\n\n[outlier]\nconsecutive_failures = 1\nejection_time = \"3s\"\n\n[retry]\nmax_attempts = 3\nbase_delay = \"1ms\"\nmax_delay = \"200ms\"\nbudget_percent = 100\n",
    );
    let gw = gateway(&toml).await;
    let r = post(gw.addr(), "/v1/chat/completions", &chat("mixed", false)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("answered 500"), "{}", r.text());
    assert_eq!(ms[0].requests(), 1, "the ejected backend was tried again");
    assert_eq!(backend_state(gw.addr(), "b0").await["ejections"], 1);
}

/// SPEC "Timeouts": 504 when time runs out, 502 when attempts do. With
/// attempts to spare, failures until `request_timeout` leaves no time for
/// another are a 504 naming it; so is a backend's `Retry-After` (a 503's
/// or a 429's) that ends after `request_timeout`, at once, naming the
/// backend's answer.
#[tokio::test]
async fn retries_that_run_out_of_time_answer_504() {
    let cases = [
        // The last failure is most often the 500, but an attempt that
        // starts just before the deadline is cut by it instead.
        (MockConfig::default().failure_rate(1.0), None),
        (
            MockConfig::default().status(503).rate_limit(0.0, 30),
            Some("answered 503"),
        ),
        (
            MockConfig::default().rate_limit(1.0, 30),
            Some("answered 429"),
        ),
    ];
    for (cfg, answered) in cases {
        let ms = mocks(vec![cfg]).await;
        let toml = retry_config(
            &ms,
            &[],
            "[server]\nrequest_timeout = \"1s\"\n\n[outlier]\nconsecutive_failures = 1000000\n\n[retry]\nmax_attempts = 4294967295\nbase_delay = \"1ms\"\nmax_delay = \"200ms\"\nbudget_percent = 100\n",
        );
        let gw = gateway(&toml).await;
        let r = post(gw.addr(), "/v1/chat/completions", &chat("mixed", false)).await;
        assert_eq!(r.status, 504, "{answered:?}: {}", r.text());
        let error = &r.json()["error"];
        assert_eq!(error["code"], "upstream_timeout", "{error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains("request_timeout (1s)"), "{message}");
        if let Some(answered) = answered {
            assert!(message.contains(answered), "{message}");
            assert_eq!(
                ms[0].requests(),
                1,
                "{answered}: asked inside its Retry-After"
            );
        }
    }
}

/// A backend that answers `413` after reading only a request's head, as
/// Go's `MaxBytesReader` does, and then closes (`hold` false: the body it
/// left unread makes the kernel reset the connection) or keeps the
/// connection without reading more. Returns its base URL.
async fn answers_before_the_body(hold: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let body = r#"{"error":{"message":"http: request body too large"}}"#;
                let answer = format!(
                    "HTTP/1.1 413 Request Entity Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
                if hold {
                    std::future::pending::<()>().await;
                }
            });
        }
    });
    format!("http://{addr}/v1")
}

/// A backend's early answer to a body larger than the socket buffers
/// take (8 MB) reaches the client as any 4xx does: no retry, no upstream
/// error, no ejection, and not after `first_byte_timeout`.
async fn check_early_answer(hold: bool) {
    let bad = answers_before_the_body(hold).await;
    let toml = format!(
        "[server]\nfirst_byte_timeout = \"1s\"\nrequest_timeout = \"20s\"\nmax_body_bytes = 20000000\n\n\
         [[models]]\nname = \"m\"\n\n{}{QUIET}\
         [outlier]\nconsecutive_failures = 1\nmax_ejection_percent = 100\n\n\
         [retry]\nmax_attempts = 3\nbase_delay = \"1ms\"\nmax_delay = \"5ms\"\nbudget_percent = 100\n",
        backend("bad", &bad, &["m"], 1),
    );
    let gw = gateway(&toml).await;
    let addr = gw.addr();
    let content = "x".repeat(8_000_000);
    let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{content}"}}]}}"#);
    let r = post(addr, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 413, "hold {hold}: {}", r.text());
    assert_eq!(
        r.json()["error"]["message"],
        "http: request body too large",
        "hold {hold}"
    );
    let errors = metric(addr, "weir_upstream_errors_total", &[("backend", "bad")]).await;
    assert_eq!(errors, 0.0, "hold {hold}");
    let retries = metric(addr, "weir_retries_total", &[("model", "m")]).await;
    assert_eq!(retries, 0.0, "hold {hold}");
    assert_eq!(
        backend_state(addr, "bad").await["ejections"],
        0,
        "hold {hold}"
    );
}

#[tokio::test]
async fn an_early_answer_to_a_large_body_then_a_close_reaches_the_client() {
    check_early_answer(false).await;
}

#[tokio::test]
async fn an_early_answer_to_a_large_body_on_a_held_connection_reaches_the_client() {
    check_early_answer(true).await;
}

/// A backend whose worker dies 0.7 s into the second request on a
/// connection (a reset, long after the request went out) fails that
/// request: it is not the idle-close race, so it counts as a `protocol`
/// error and one ejects the backend; the request is not sent again to it.
#[tokio::test]
async fn a_late_reset_on_a_kept_alive_connection_counts_and_ejects() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request(&mut s).await.is_none() {
                    return;
                }
                let ok = r#"{"id":"c1","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{ok}",
                    ok.len()
                );
                if s.write_all(answer.as_bytes()).await.is_err()
                    || read_request(&mut s).await.is_none()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(700)).await;
                let _ = reset(s);
            });
        }
    });
    let toml = format!(
        "[server]\nfirst_byte_timeout = \"3s\"\nrequest_timeout = \"10s\"\n\n\
         [[models]]\nname = \"m\"\n\n{}{QUIET}\
         [outlier]\nconsecutive_failures = 1\nmax_ejection_percent = 100\n\n\
         [retry]\nmax_attempts = 3\nbase_delay = \"1ms\"\nmax_delay = \"5ms\"\nbudget_percent = 100\n",
        backend("bad", &url, &["m"], 1),
    );
    let gw = gateway(&toml).await;
    let addr = gw.addr();
    // One client connection: its requests run on one lane, whose pool
    // holds the backend connection the first one used.
    let client = client();
    let json = [("content-type", "application/json")];
    let r = send(
        &client,
        "POST",
        addr,
        "/v1/chat/completions",
        &json,
        chat("m", false),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(
        &client,
        "POST",
        addr,
        "/v1/chat/completions",
        &json,
        chat("m", false),
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.text());
    let errors = metric(
        addr,
        "weir_upstream_errors_total",
        &[("backend", "bad"), ("kind", "protocol")],
    )
    .await;
    assert_eq!(errors, 1.0);
    let idle = metric(
        addr,
        "weir_retries_total",
        &[("model", "m"), ("reason", "idle_closed")],
    )
    .await;
    assert_eq!(idle, 0.0);
    assert_eq!(backend_state(addr, "bad").await["ejections"], 1);
}

/// How a backend answers a request that carries `stream_options` (the
/// field weir adds to streams for their usage).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Refusal {
    /// Takes the field, but answers a request without `messages` with
    /// FastAPI's 422 quoting the whole body as `input` (vLLM does), which
    /// so names every field in it, `stream_options` too.
    QuotesTheBody,
    /// As `QuotesTheBody`, and busy (a 503) for a request without
    /// `messages` that does not carry the field.
    QuotesTheBodyThenBusy,
    /// Azure's 400 "Unrecognized request argument", chunked, the field's
    /// name in the second chunk, 30 ms after the first.
    NameInALaterChunk,
    /// Azure's 400 with a length, its body in two writes 30 ms apart.
    BodyInTwoWrites,
    /// Azure's 400 with a length (no `connection: close`), and the
    /// connection closed 3 ms later, as a server closing after an error.
    ThenCloses,
    /// Takes the field, but answers a request without `messages` with a
    /// 400 that does not name it (as for a prompt past the model's
    /// context), keeping the connection.
    ClientError,
}

/// Azure OpenAI's refusal of a field it does not know.
const UNRECOGNIZED: &str = r#"{"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error","param":null,"code":null}}"#;

/// A keep-alive backend that answers a request with `stream_options` as
/// `how` says and streams the others (with their usage chunk when asked);
/// returns its URL and every request body it read, in order.
async fn refusing(how: Refusal) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let (url, seen, _) = refusing_counted(how).await;
    (url, seen)
}

/// As [`refusing`], and the number of connections it accepted.
async fn refusing_counted(
    how: Refusal,
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    std::sync::Arc<AtomicUsize>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let log = log.clone();
            tokio::spawn(async move {
                while let Some(request) = read_request(&mut s).await {
                    let text = String::from_utf8_lossy(&request).into_owned();
                    let body = text
                        .split_once("\r\n\r\n")
                        .map_or("", |(_, b)| b)
                        .to_owned();
                    log.lock().unwrap().push(body.clone());
                    if refuse(&mut s, how, &body).await.is_none() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}/v1"), seen, accepted)
}

/// Writes the answer [`refusing`] gives `body`; `None` once the connection
/// is done.
async fn refuse(s: &mut TcpStream, how: Refusal, body: &str) -> Option<()> {
    let chunk = |data: &str| format!("{:x}\r\n{data}\r\n", data.len()).into_bytes();
    let with_length = |status: &str, json: &str| {
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            json.len()
        );
        head + json
    };
    let pause = Duration::from_millis(30);
    let quotes = matches!(how, Refusal::QuotesTheBody | Refusal::QuotesTheBodyThenBusy);
    if how == Refusal::QuotesTheBodyThenBusy
        && !body.contains("\"messages\"")
        && !body.contains("stream_options")
    {
        let busy = r#"{"error":{"message":"busy","type":"server_error"}}"#;
        let answer = with_length("503 Service Unavailable", busy);
        return s.write_all(answer.as_bytes()).await.ok();
    }
    if how == Refusal::ClientError && !body.contains("\"messages\"") {
        let too_long = r#"{"error":{"message":"This model's maximum context length is 4096 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
        let answer = with_length("400 Bad Request", too_long);
        return s.write_all(answer.as_bytes()).await.ok();
    }
    if quotes && !body.contains("\"messages\"") {
        let quoted = format!(
            r#"{{"detail":[{{"type":"missing","loc":["body","messages"],"msg":"Field required","input":{body}}}]}}"#
        );
        let answer = with_length("422 Unprocessable Entity", &quoted);
        return s.write_all(answer.as_bytes()).await.ok();
    }
    if !quotes && how != Refusal::ClientError && body.contains("stream_options") {
        match how {
            Refusal::NameInALaterChunk => {
                let (a, b) = UNRECOGNIZED.split_at(50);
                let head = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                s.write_all(&[&head[..], &chunk(a)].concat()).await.ok()?;
                tokio::time::sleep(pause).await;
                s.write_all(&[&chunk(b)[..], b"0\r\n\r\n"].concat())
                    .await
                    .ok()?;
            }
            Refusal::BodyInTwoWrites => {
                let answer = with_length("400 Bad Request", UNRECOGNIZED);
                let (a, b) = answer.split_at(answer.len() - UNRECOGNIZED.len() + 20);
                s.write_all(a.as_bytes()).await.ok()?;
                tokio::time::sleep(pause).await;
                s.write_all(b.as_bytes()).await.ok()?;
            }
            Refusal::ThenCloses
            | Refusal::QuotesTheBody
            | Refusal::QuotesTheBodyThenBusy
            | Refusal::ClientError => {
                let answer = with_length("400 Bad Request", UNRECOGNIZED);
                s.write_all(answer.as_bytes()).await.ok()?;
                tokio::time::sleep(Duration::from_millis(3)).await;
                return None;
            }
        }
        return Some(());
    }
    let mut stream = [SSE_HEAD, &chunk(EVENT)].concat();
    if body.contains("include_usage") {
        stream.extend(chunk(USAGE_EVENT));
    }
    stream.extend(chunk("data: [DONE]\n\n"));
    stream.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&stream).await.ok()
}

/// A gateway with one model `m` on the backend at `url`, `extra` in its
/// config.
async fn on_one_backend(url: &str, extra: &str) -> weir::Handle {
    let toml = format!(
        "{extra}\n[[models]]\nname = \"m\"\n\n{}{QUIET}",
        backend("b", url, &["m"], 1)
    );
    gateway(&toml).await
}

/// A validation error that quotes the request (FastAPI's `input`) names
/// the `stream_options` weir added without refusing it: the request goes
/// again without the field, is refused again, and that second answer is
/// the client's. The backend is not marked as refusing the field: the
/// next stream still asks for its usage.
#[tokio::test]
async fn a_validation_error_quoting_the_body_does_not_stop_usage_for_the_backend() {
    let r = usage_still_asked_after_a_bad_stream(Refusal::QuotesTheBody, "", 422).await;
    assert!(!r.text().contains("stream_options"), "{}", r.text());
}

/// Sends a streamed request without `messages` to a backend refusing
/// `how`, with `extra` config, and expects `status` for it; then a good
/// stream. The backend saw the bad one with the usage field and once more
/// without it, and the good one still with it (it was not marked as
/// refusing the field). The bad request's answer is returned.
async fn usage_still_asked_after_a_bad_stream(how: Refusal, extra: &str, status: u16) -> Reply {
    let (url, seen) = refusing(how).await;
    let gw = on_one_backend(&url, extra).await;
    let bad = r#"{"model":"m","stream":true}"#;
    let r = post(gw.addr(), "/v1/chat/completions", bad).await;
    assert_eq!(r.status, status, "{}", r.text());
    let s = post_stream(gw.addr(), "/v1/chat/completions", &chat("m", true)).await;
    assert_eq!(s.status, 200, "{}", s.text());
    let bodies = seen.lock().unwrap().clone();
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    assert!(bodies[0].contains("include_usage"), "{bodies:?}");
    assert!(!bodies[1].contains("stream_options"), "{bodies:?}");
    assert!(
        bodies[2].contains("include_usage"),
        "weir stopped asking the backend for usage after a {status}: {bodies:?}"
    );
    r
}

/// A refusal is read whole (up to 4 KiB), not only its first read: the
/// field's name in a later chunk, or in a later write of a body with a
/// length, is seen, and the stream goes again without the field.
#[tokio::test]
async fn a_refusal_that_names_the_field_in_a_later_read_is_seen() {
    for how in [Refusal::NameInALaterChunk, Refusal::BodyInTwoWrites] {
        let (url, seen) = refusing(how).await;
        let gw = on_one_backend(&url, "").await;
        let s = post_stream(gw.addr(), "/v1/chat/completions", &chat("m", true)).await;
        assert_eq!(s.status, 200, "{how:?}: {}", s.text());
        let bodies = seen.lock().unwrap().clone();
        assert_eq!(bodies.len(), 2, "{how:?}: {bodies:?}");
        assert!(!bodies[1].contains("stream_options"), "{how:?}: {bodies:?}");
    }
}

/// The request sent again after a refusal does not take the refusal's
/// connection back from the pool: a backend that closes it just after
/// its error would otherwise fail the second send (and with one attempt
/// allowed, the client would get a 502).
#[tokio::test]
async fn the_request_sent_again_after_a_refusal_goes_on_a_new_connection() {
    let (url, seen) = refusing(Refusal::ThenCloses).await;
    let gw = on_one_backend(&url, "[retry]\nmax_attempts = 1\n").await;
    let s = post_stream(gw.addr(), "/v1/chat/completions", &chat("m", true)).await;
    assert_eq!(s.status, 200, "{}", s.text());
    assert_eq!(seen.lock().unwrap().len(), 2);
    let idle = metric(
        gw.addr(),
        "weir_retries_total",
        &[("model", "m"), ("reason", "idle_closed")],
    )
    .await;
    assert_eq!(idle, 0.0);
}

/// A client error that does not name `stream_options` (here a prompt past
/// the model's context), answered to a stream weir added the field to,
/// leaves its connection in the pool: the next stream goes on it. (Both
/// on one client connection: each lane has a pool of its own.)
#[tokio::test]
async fn a_client_error_to_a_stream_weir_asked_usage_for_keeps_its_connection() {
    let (url, seen, accepted) = refusing_counted(Refusal::ClientError).await;
    let gw = on_one_backend(&url, "").await;
    let client = client();
    let bad = r#"{"model":"m","stream":true}"#;
    let r = post_with(&client, gw.addr(), "/v1/chat/completions", bad).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("context_length_exceeded"), "{}", r.text());
    let s = post_with(&client, gw.addr(), "/v1/chat/completions", &chat("m", true)).await;
    assert_eq!(s.status, 200, "{}", s.text());
    let bodies = seen.lock().unwrap().clone();
    assert_eq!(bodies.len(), 2, "sent once each: {bodies:?}");
    assert!(
        bodies.iter().all(|b| b.contains("include_usage")),
        "{bodies:?}"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the 400's connection was not kept"
    );
}

/// A re-send that fails (a 503, or a 429) shows nothing about the field
/// either: a validation error quoting the body, then a busy backend, must
/// not stop usage for the backend for good.
#[tokio::test]
async fn a_failed_resend_after_a_quoting_validation_error_does_not_stop_usage() {
    let busy = Refusal::QuotesTheBodyThenBusy;
    usage_still_asked_after_a_bad_stream(busy, "[retry]\nmax_attempts = 1\n", 502).await;
}
