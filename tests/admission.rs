//! Admission through real sockets: 429s and their headers, concurrency
//! caps, exact token accounting of streams.

mod common;

use std::time::Duration;

use common::*;
use weir::mock::{self, MockConfig};

const MODEL: &str = "m1";

async fn setup(model_limits: &str, cfg: MockConfig) -> (weir::Handle, weir::mock::MockHandle) {
    setup_backend(model_limits, "", cfg).await
}

/// As [`setup`], with `backend_extra` lines in the backend's entry.
async fn setup_backend(
    model_limits: &str,
    backend_extra: &str,
    cfg: MockConfig,
) -> (weir::Handle, weir::mock::MockHandle) {
    let m = mock::start(cfg.models(vec![MODEL.into()])).await.unwrap();
    let toml = format!(
        "[[models]]\nname = \"{MODEL}\"\n{model_limits}\n\n{}{backend_extra}\n\n{QUIET}",
        backend("b1", &m.base_url(), &[MODEL], 1)
    );
    (gateway(&toml).await, m)
}

/// One backend with a single slot, answering after `latency`.
async fn one_slot(model_limits: &str, latency: Duration) -> (weir::Handle, weir::mock::MockHandle) {
    let slow = MockConfig::default().latency(latency);
    setup_backend(model_limits, "max_concurrent = 1", slow).await
}

#[tokio::test]
async fn a_refused_request_gets_429_with_exact_headers_and_message() {
    let (gw, m) = setup(
        "requests_per_minute = 60\nburst = 1\nqueue_timeout = \"100ms\"",
        MockConfig::default(),
    )
    .await;
    let ok = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    // The limit header is the capacity (burst 1), the message the rate.
    assert_eq!(ok.header("x-ratelimit-limit-requests"), "1");
    assert_eq!(ok.header("x-ratelimit-remaining-requests"), "0");
    assert!(
        ok.header("x-ratelimit-reset-requests").ends_with("ms")
            || ok.header("x-ratelimit-reset-requests") == "1s"
    );
    assert!(
        ok.headers.get("x-ratelimit-limit-tokens").is_none(),
        "no token limit, no token headers"
    );

    let limited = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    limited.assert_error(429, "requests", "rate_limit_exceeded");
    assert_eq!(limited.header("retry-after"), "1");
    assert_eq!(limited.header("x-ratelimit-limit-requests"), "1");
    assert_eq!(limited.header("x-ratelimit-remaining-requests"), "0");
    let message = limited.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.starts_with(&format!("Rate limit reached for model {MODEL} on requests per min: limit 60. Please try again in ")),
        "{message}"
    );
    // SPEC: the reset header carries the exact wait Retry-After rounds up.
    let wait = message
        .rsplit("try again in ")
        .next()
        .unwrap()
        .trim_end_matches('.');
    assert_eq!(
        limited.header("x-ratelimit-reset-requests"),
        wait,
        "{message}"
    );
    assert_eq!(
        m.requests(),
        1,
        "the refused request never reached the backend"
    );

    // Retrying after Retry-After succeeds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(again.status, 200, "{}", again.text());
}

/// With a burst, the limit header is the burst (the most permitted before
/// the limit is exhausted), so remaining never exceeds it.
#[tokio::test]
async fn the_limit_header_is_the_burst_remaining_counts_against() {
    let (gw, _m) = setup(
        "requests_per_minute = 60\nburst = 500",
        MockConfig::default(),
    )
    .await;
    let ok = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.header("x-ratelimit-limit-requests"), "500");
    assert_eq!(ok.header("x-ratelimit-remaining-requests"), "499");
}

/// A length field the route's backend does not read (or a 0 it reads as
/// absent) cannot shrink a request's reservation, and a batch of prompts
/// reserves a completion for each: past the bucket, each is a 413.
#[tokio::test]
async fn the_reservation_reads_the_length_field_the_backend_does() {
    let (gw, _m) = setup(
        "tokens_per_minute = 1000\nqueue_timeout = \"0s\"",
        MockConfig::default(),
    )
    .await;
    let hi = r#"[{"role":"user","content":"hi"}]"#;
    for (path, body) in [
        (
            "/v1/chat/completions",
            format!(
                r#"{{"model":"{MODEL}","max_completion_tokens":0,"max_tokens":2000,"messages":{hi}}}"#
            ),
        ),
        (
            "/v1/chat/completions",
            format!(
                r#"{{"model":"{MODEL}","max_output_tokens":1,"max_tokens":2000,"messages":{hi}}}"#
            ),
        ),
        (
            "/v1/completions",
            format!(
                r#"{{"model":"{MODEL}","max_completion_tokens":1,"max_tokens":2000,"prompt":"hi"}}"#
            ),
        ),
        (
            "/v1/completions",
            format!(
                r#"{{"model":"{MODEL}","max_tokens":50,"prompt":{}}}"#,
                serde_json::json!(vec!["hi"; 30])
            ),
        ),
        // The route as the backend decodes it.
        (
            "/v1/%63ompletions",
            format!(
                r#"{{"model":"{MODEL}","max_tokens":50,"prompt":{}}}"#,
                serde_json::json!(vec!["hi"; 30])
            ),
        ),
        (
            "/v1/%72esponses",
            format!(
                r#"{{"model":"{MODEL}","max_tokens":1,"max_output_tokens":2000,"input":"hi"}}"#
            ),
        ),
        // Tools are prompt too: 8,000 bytes of description, 2,000 tokens.
        (
            "/v1/chat/completions",
            format!(
                r#"{{"model":"{MODEL}","max_tokens":10,"messages":{hi},"tools":[{{"type":"function","function":{{"name":"f","description":"{}"}}}}]}}"#,
                "x".repeat(8000)
            ),
        ),
    ] {
        let r = post(gw.addr(), path, &body).await;
        assert_eq!(r.status, 413, "{path} {body}: {}", r.text());
    }
    let ok = post(
        gw.addr(),
        "/v1/completions",
        &format!(r#"{{"model":"{MODEL}","max_tokens":50,"prompt":["hi","there"]}}"#),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
}

#[tokio::test]
async fn token_limit_refusals_and_impossible_requests() {
    let (gw, m) = setup(
        "tokens_per_minute = 1000\nqueue_timeout = \"0s\"",
        MockConfig::default(),
    )
    .await;
    let big = format!(
        r#"{{"model":"{MODEL}","max_tokens":2000,"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    post(gw.addr(), "/v1/chat/completions", &big)
        .await
        .assert_error(413, "invalid_request_error", "request_too_large");
    let half = format!(
        r#"{{"model":"{MODEL}","max_tokens":600,"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    let ok = post(gw.addr(), "/v1/chat/completions", &half).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("x-ratelimit-limit-tokens"), "1000");
    // The mock used far fewer tokens than the 600+ reserved: reconciled,
    // the next 600-token request fits again.
    let again = post(gw.addr(), "/v1/chat/completions", &half).await;
    assert_eq!(again.status, 200, "{}", again.text());
    let third = post(
        gw.addr(),
        "/v1/chat/completions",
        &format!(r#"{{"model":"{MODEL}","max_tokens":990,"messages":[]}}"#),
    )
    .await;
    third.assert_error(429, "tokens", "rate_limit_exceeded");
    assert!(third.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("on tokens per min: limit 1000"));
    assert_eq!(m.requests(), 2);
}

/// A model with a generous limit under a tight global one: the global
/// bucket refuses, and the headers and messages say so (they showed the
/// model's limit, and the 413 passed the global limit off as the model's).
#[tokio::test]
async fn the_global_limit_that_refuses_is_the_one_reported() {
    let (gw, m) = setup(
        "tokens_per_minute = 6000\nqueue_timeout = \"0s\"\n\n[limits]\ntokens_per_minute = 1000",
        MockConfig::default(),
    )
    .await;
    let ask = |max_tokens: u32| {
        format!(r#"{{"model":"{MODEL}","max_tokens":{max_tokens},"messages":[]}}"#)
    };
    let big = post(gw.addr(), "/v1/chat/completions", &ask(2000)).await;
    big.assert_error(413, "invalid_request_error", "request_too_large");
    let message = big.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("more than the global limit of 1000 tokens per min"),
        "{message}"
    );
    // Admitted: the global bucket (1000 - 600 left) is the tighter one.
    let ok = post(gw.addr(), "/v1/chat/completions", &ask(600)).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.header("x-ratelimit-limit-tokens"), "1000");
    let left: u64 = ok.header("x-ratelimit-remaining-tokens").parse().unwrap();
    assert!(left <= 400, "{left}");
    let again = post(gw.addr(), "/v1/chat/completions", &ask(600)).await;
    assert_eq!(again.status, 200, "{}", again.text());
    // Refused by the global bucket: its limit and level, not the model's.
    let limited = post(gw.addr(), "/v1/chat/completions", &ask(990)).await;
    limited.assert_error(429, "tokens", "rate_limit_exceeded");
    let message = limited.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("on global tokens per min: limit 1000."),
        "{message}"
    );
    assert_eq!(limited.header("x-ratelimit-limit-tokens"), "1000");
    let left: u64 = limited
        .header("x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(left < 990, "{left}");
    assert_eq!(m.requests(), 2);
}

#[tokio::test]
async fn max_concurrent_caps_what_the_backend_sees() {
    let (gw, m) = setup(
        "max_concurrent = 2",
        MockConfig::default().latency(Duration::from_millis(300)),
    )
    .await;
    let addr = gw.addr();
    let statuses = concurrent_chats(addr, MODEL, 8).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(m.max_in_flight(), 2, "the model's semaphore held");
    assert_eq!(m.requests(), 8, "every request was admitted in turn");
}

#[tokio::test]
async fn backend_max_concurrent_waits_for_a_free_slot() {
    let (gw, m) = one_slot("", Duration::from_millis(200)).await;
    let addr = gw.addr();
    let statuses = concurrent_chats(addr, MODEL, 4).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(m.max_in_flight(), 1);
}

#[tokio::test]
async fn saturated_backends_refuse_after_queue_timeout() {
    // The first holds the slot for 3 s: time enough, on a loaded machine,
    // for the second to find it taken and wait out its 100 ms.
    let (gw, m) = one_slot("queue_timeout = \"100ms\"", Duration::from_secs(3)).await;
    let addr = gw.addr();
    let first =
        tokio::spawn(async move { post(addr, "/v1/chat/completions", &chat(MODEL, false)).await });
    assert!(eventually(Duration::from_secs(5), || m.in_flight() == 1).await);
    let r = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
    r.assert_error(429, "requests", "rate_limit_exceeded");
    assert!(r.text().contains("max_concurrent"), "{}", r.text());
    assert_eq!(first.await.unwrap().status, 200);
}

/// A request waiting for a saturated backend waits in the model's queue:
/// it shows in `weir_queue_depth`, and once `max_queue` wait, the next is
/// refused at once naming `max_queue`.
#[tokio::test]
async fn waiting_for_a_backend_slot_is_queueing() {
    let (gw, m) = one_slot(
        "queue_timeout = \"20s\"\nmax_queue = 1",
        Duration::from_millis(4000),
    )
    .await;
    let addr = gw.addr();
    let first = chat_later(addr, MODEL);
    assert!(eventually(Duration::from_secs(5), || m.in_flight() == 1).await);
    let second = chat_later(addr, MODEL);
    let depth = || async {
        let text = get(addr, "/metrics").await.text();
        metric(&text, "weir_queue_depth", &format!("model=\"{MODEL}\""))
    };
    queued(addr, MODEL, 1).await;
    let third = post(addr, "/v1/chat/completions", &chat(MODEL, false)).await;
    third.assert_error(429, "requests", "rate_limit_exceeded");
    assert!(third.text().contains("max_queue"), "{}", third.text());
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(second.await.unwrap().status, 200);
    assert_eq!(depth().await, 0.0);
}

/// `max_queue = 0`: a request that would wait, here for the bucket's next
/// token, is refused at once, and the message says why; its `Retry-After`
/// and headers say when the bucket would have covered it (5 s), not 1 s,
/// and show the bucket as a bucket 429 does.
#[tokio::test]
async fn max_queue_0_lets_no_request_wait() {
    let (gw, _m) = setup(
        "requests_per_minute = 12\nburst = 1\nqueue_timeout = \"10s\"\nmax_queue = 0",
        MockConfig::default(),
    )
    .await;
    let first = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let second = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    second.assert_error(429, "requests", "rate_limit_exceeded");
    assert!(
        second
            .text()
            .contains("on max_queue: 0, so no request may wait"),
        "{}",
        second.text()
    );
    assert_eq!(second.header("retry-after"), "5");
    assert_eq!(second.header("x-ratelimit-limit-requests"), "1");
    // The bucket as the refused request leaves it: empty, full again in
    // one token's time (it used to count its own refunded reservation: 10s).
    assert_eq!(second.header("x-ratelimit-remaining-requests"), "0");
    let reset = second.header("x-ratelimit-reset-requests");
    let reset: f64 = reset.trim_end_matches('s').parse().unwrap_or(0.0);
    assert!((4.0..=5.0).contains(&reset), "{reset}");
    // The exact wait (5s, or a tenth under if the machine is slow), not 1s.
    assert!(
        !second.text().contains("try again in 1s."),
        "{}",
        second.text()
    );
}

fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn streams_are_counted_exactly_and_the_added_usage_chunk_is_removed() {
    let (gw, m) = setup(
        "tokens_per_minute = 100000",
        MockConfig::default().chunks(7),
    )
    .await;
    // The client does not ask for usage: weir asks upstream and strips it.
    let s = post_stream(gw.addr(), "/v1/chat/completions", &chat(MODEL, true)).await;
    assert_eq!(s.status, 200);
    assert!(
        s.text().trim_end().ends_with("data: [DONE]"),
        "{}",
        s.text()
    );
    assert!(
        s.events()
            .iter()
            .all(|e| e.get("usage").is_none_or(|u| u.is_null())),
        "{}",
        s.text()
    );
    assert!(
        s.events()
            .iter()
            .all(|e| !e["choices"].as_array().unwrap().is_empty()),
        "{}",
        s.text()
    );
    let upstream_body: serde_json::Value =
        serde_json::from_slice(&m.last_inference().unwrap().body).unwrap();
    assert_eq!(upstream_body["stream_options"]["include_usage"], true);
    let prompt = weir::mock::prompt_tokens(&m.last_inference().unwrap().body).unwrap() as f64;

    // The client asks for usage: it gets it, untouched.
    let asked = format!(
        r#"{{"model":"{MODEL}","stream":true,"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"Hello there"}}]}}"#
    );
    let s2 = post_stream(gw.addr(), "/v1/chat/completions", &asked).await;
    let usage: Vec<_> = s2
        .events()
        .into_iter()
        .filter(|e| e["usage"].is_object())
        .collect();
    assert_eq!(usage.len(), 1, "{}", s2.text());
    assert_eq!(usage[0]["usage"]["completion_tokens"], 7);

    // Both streams were counted with the backend's real usage.
    let text = get(gw.addr(), "/metrics").await.text();
    assert_eq!(
        metric(&text, "weir_tokens_total", "kind=\"completion\""),
        14.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "weir_tokens_total", "kind=\"prompt\""),
        2.0 * prompt,
        "{text}"
    );

    // Other routes pass through untouched: OpenAI defines `stream_options`
    // for chat and text completions only.
    let responses = format!(r#"{{"model":"{MODEL}","stream":true,"input":"hi"}}"#);
    let _ = post_stream(gw.addr(), "/v1/responses", &responses).await;
    let sent = m.last_inference().unwrap();
    assert_eq!(sent.uri, "/v1/responses");
    assert_eq!(sent.body, responses.as_bytes());
}

/// The inference requests the mock saw, in order.
fn inferences(m: &weir::mock::MockHandle) -> Vec<weir::mock::RecordedRequest> {
    m.recorded()
        .into_iter()
        .filter(|r| r.method == http::Method::POST)
        .collect()
}

#[tokio::test]
async fn a_backend_that_refuses_stream_options_gets_streams_without_it() {
    let refusing = MockConfig::default().chunks(7).refuse_stream_options(true);
    let (gw, m) = setup("tokens_per_minute = 100000", refusing).await;
    let client_body = chat(MODEL, true);

    // weir asks for the usage chunk; the backend refuses the field and
    // gets the request again as the client sent it, which it answers.
    let s = post_stream(gw.addr(), "/v1/chat/completions", &client_body).await;
    assert_eq!(s.status, 200, "{}", s.text());
    assert!(
        s.text().trim_end().ends_with("data: [DONE]"),
        "{}",
        s.text()
    );
    assert_eq!(s.events().len(), 8, "{}", s.text());
    let sent = inferences(&m);
    assert_eq!(sent.len(), 2, "{sent:?}");
    let first: serde_json::Value = serde_json::from_slice(&sent[0].body).unwrap();
    assert_eq!(first["stream_options"]["include_usage"], true);
    assert_eq!(sent[1].body, client_body.as_bytes());

    // From now on its streams go without it, once.
    let s = post_stream(gw.addr(), "/v1/chat/completions", &client_body).await;
    assert_eq!(s.status, 200, "{}", s.text());
    let sent = inferences(&m);
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!(sent[2].body, client_body.as_bytes());

    // A client's own `stream_options` goes as sent, and the backend's
    // refusal of it is the client's answer: weir changed nothing to undo.
    let asked = format!(
        r#"{{"model":"{MODEL}","stream":true,"stream_options":{{"include_usage":true}},"messages":[]}}"#
    );
    let r = post(gw.addr(), "/v1/chat/completions", &asked).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("stream_options"), "{}", r.text());
    assert_eq!(inferences(&m).len(), 4);
}

#[tokio::test]
async fn a_bad_request_that_does_not_name_stream_options_is_not_sent_again() {
    let (gw, m) = setup("", MockConfig::default().status(400)).await;
    let r = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, true)).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(inferences(&m).len(), 1);
    // Nor does it stop weir asking that backend for usage.
    let _ = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, true)).await;
    let sent = inferences(&m);
    assert_eq!(sent.len(), 2);
    let body: serde_json::Value = serde_json::from_slice(&sent[1].body).unwrap();
    assert_eq!(body["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn rate_limited_requests_are_counted() {
    let (gw, _m) = setup(
        "requests_per_minute = 60\nburst = 1\nqueue_timeout = \"0s\"",
        MockConfig::default(),
    )
    .await;
    assert_eq!(
        post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false))
            .await
            .status,
        200
    );
    assert_eq!(
        post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false))
            .await
            .status,
        429
    );
    let text = get(gw.addr(), "/metrics").await.text();
    assert_eq!(
        metric(&text, "weir_rate_limited_total", "limit=\"requests\""),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "weir_admitted_total", MODEL), 1.0, "{text}");
}

/// SPEC "Disconnects": a client that leaves mid-stream gives back its unspent
/// token reservation. The stream reserved ~908 tokens of a 1,000-token
/// bucket; leaving after a few events it pays for those few only, so a
/// 500-token request passes at once (kept, it would wait about 25 s).
#[tokio::test]
async fn a_client_leaving_mid_stream_gets_its_unspent_tokens_back() {
    let (gw, _m) = setup(
        "tokens_per_minute = 1000\nqueue_timeout = \"0s\"",
        MockConfig::default().chunks(1000).tokens_per_sec(20.0),
    )
    .await;
    let stream = r#"{"model":"m1","stream":true,"max_tokens":900,"messages":[{"role":"user","content":"hi"}]}"#;
    // A second of it (about 20 events): the stream has surely started.
    let cut = raw(gw.addr(), raw_chat(stream, ""), Duration::from_secs(1)).await;
    assert!(
        String::from_utf8_lossy(&cut.bytes).contains("data: "),
        "the stream had started"
    );
    let half = r#"{"model":"m1","max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut last = 0;
    for _ in 0..60 {
        let r = post(gw.addr(), "/v1/chat/completions", half).await;
        last = r.status.as_u16();
        if last == 200 {
            break;
        }
        assert_eq!(last, 429, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last, 200, "the unspent reservation was not given back");
}

/// A client that leaves before any answer (SPEC "Disconnects"): while it
/// waits for a backend slot, every reserved token comes back; while a
/// backend works on it, all but the prompt (this backend's speed is not
/// measured, health checks being off). Each is logged and counted as 499.
#[tokio::test]
async fn a_client_leaving_before_the_answer_gets_its_tokens_back() {
    // 1000 tokens refilling at 16.7/s; a request that finds too few waits
    // at most 3 s (50 tokens' worth), so one reservation of 600 left
    // charged makes the next such request a 429 at once.
    let limits = "tokens_per_minute = 1000\nqueue_timeout = \"3s\"";
    let (gw, m) = one_slot(limits, Duration::from_millis(1500)).await;
    let addr = gw.addr();
    let asking = |max_tokens: u32| {
        format!(
            r#"{{"model":"{MODEL}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#
        )
    };

    // Settling runs as weir sees the client go, a moment after it went.
    let gone = || async move {
        let text = get(addr, "/metrics").await.text();
        text.lines()
            .filter(|l| l.starts_with("weir_requests_total{") && l.contains("status=\"499\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let settled = |n: f64| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while gone().await < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gone().await
    };

    // 1. Waiting for the one backend slot, which a 300-token request holds.
    let holder = {
        let body = asking(300);
        tokio::spawn(async move { post(addr, "/v1/chat/completions", &body).await })
    };
    assert!(eventually(Duration::from_secs(5), || m.in_flight() == 1).await);
    let left = raw(addr, raw_chat(&asking(600), ""), Duration::from_millis(300)).await;
    assert_eq!(left.status(), 0, "no answer while it waited");
    assert_eq!(settled(1.0).await, 1.0, "logged and counted as 499");
    assert_eq!(m.requests(), 1, "the leaver never reached the backend");
    let next = post(addr, "/v1/chat/completions", &asking(600)).await;
    assert_eq!(
        next.status,
        200,
        "600 tokens stayed charged: {}",
        next.text()
    );
    assert_eq!(holder.await.unwrap().status, 200);

    // 2. Leaving while the backend works on it.
    let left = raw(addr, raw_chat(&asking(600), ""), Duration::from_millis(300)).await;
    assert_eq!(left.status(), 0);
    assert_eq!(settled(2.0).await, 2.0, "logged and counted as 499");
    assert!(eventually(Duration::from_secs(5), || m.in_flight() == 0).await);
    let next = post(addr, "/v1/chat/completions", &asking(600)).await;
    assert_eq!(
        next.status,
        200,
        "600 tokens stayed charged: {}",
        next.text()
    );
}

/// A Responses API answer's `usage`: its counts are `input_tokens` and
/// `output_tokens`.
const RESPONSES_USAGE: &str = r#"{"input_tokens":11,"input_tokens_details":{"cached_tokens":0},"output_tokens":22,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":33}"#;

/// A `/v1/responses` backend written by hand, answering as OpenAI does: a
/// JSON response object with `usage` at its top, or, for `"stream": true`,
/// events ending in `response.completed`, whose `response` repeats the
/// whole answer (here 80 KB, more than weir holds of one event) with the
/// `usage`; that event comes in two chunks.
fn responses_backend(upstream: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let text = "The weir holds the river back. ".repeat(2_600);
    let response = |status: &str, output: &str, usage: &str| {
        format!(
            r#"{{"id":"resp_1","object":"response","status":"{status}","output":[{output}],"tools":[],"usage":{usage},"user":null,"metadata":{{}}}}"#
        )
    };
    let message = format!(
        r#"{{"type":"message","id":"msg_1","role":"assistant","content":[{{"type":"output_text","text":"{text}","annotations":[]}}]}}"#
    );
    let json = response("completed", &message, RESPONSES_USAGE);
    let events = [
        format!(
            "event: response.created\ndata: {{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{}}}\n\n",
            response("in_progress", "", "null")
        ),
        format!("event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"delta\":\"{text}\"}}\n\n"),
        format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{json}}}\n\n"
        ),
    ];
    let (completed_start, completed_end) = events[2].split_at(events[2].len() - 200);
    let chunks = [
        events[0].as_str(),
        events[1].as_str(),
        completed_start,
        completed_end,
    ]
    .map(|c| format!("{:x}\r\n{c}\r\n", c.len()));
    let stream = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{}0\r\n\r\n",
        chunks.concat()
    );
    let whole = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
        json.len()
    );
    tokio::spawn(async move {
        while let Ok((mut s, _)) = upstream.accept().await {
            let (stream, whole) = (stream.clone(), whole.clone());
            tokio::spawn(async move {
                // The head and the body (`Content-Length` long).
                let mut request = Vec::new();
                let mut buf = [0u8; 8192];
                let body = loop {
                    let text = String::from_utf8_lossy(&request).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .to_ascii_lowercase()
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
                            .unwrap_or(0);
                        if body.len() >= length {
                            break body.to_owned();
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                };
                let answer = if body.contains(r#""stream":true"#) {
                    stream
                } else {
                    whole
                };
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
}

/// The Responses API (`/v1/responses`) reports `input_tokens` and
/// `output_tokens`, streamed in `response.completed`'s `response.usage`.
/// Both answers settle their estimate with them: each reserves 600+ of a
/// 1,000-token bucket, and with no queueing, the next fits only if the last
/// was refunded. Both are counted in `weir_tokens_total` and the access log.
#[tokio::test]
async fn responses_api_usage_is_settled_and_counted() {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    responses_backend(upstream);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.toml");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[models]]\nname = \"{MODEL}\"\ntokens_per_minute = 1000\nqueue_timeout = \"0s\"\n\n{}{QUIET}",
        backend("raw", &format!("http://{up_addr}/v1"), &[MODEL], 1)
    );
    std::fs::write(&path, toml).unwrap();
    let weir = spawn_weir(&path, "info");
    let addr = weir.addr;
    let counted = |kind: &'static str| async move {
        let text = get(addr, "/metrics").await.text();
        metric(&text, "weir_tokens_total", &format!("kind=\"{kind}\""))
    };
    let asking = |stream: bool| {
        format!(
            r#"{{"model":"{MODEL}","stream":{stream},"max_output_tokens":600,"input":"Hello there"}}"#
        )
    };
    for (n, stream) in [false, true, false].into_iter().enumerate() {
        let what = if stream { "stream" } else { "JSON answer" };
        if stream {
            let s = post_stream(addr, "/v1/responses", &asking(true)).await;
            assert_eq!(
                s.status,
                200,
                "the last {what} stayed charged: {}",
                s.text()
            );
            assert!(s.text().contains("\"output_tokens\":22"), "passed on whole");
        } else {
            let r = post(addr, "/v1/responses", &asking(false)).await;
            assert_eq!(
                r.status,
                200,
                "the last {what} stayed charged: {}",
                r.text()
            );
        }
        // Settling runs as weir sees the body end, a moment after the
        // client did.
        let want = 22.0 * (n + 1) as f64;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while counted("completion").await < want && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(counted("completion").await, want, "{what} {n}");
        assert_eq!(counted("prompt").await, 11.0 * (n + 1) as f64, "{what} {n}");
    }
    let logged = || {
        let log = weir.log.lock().unwrap();
        log.lines()
            .filter(|l| l.contains("/v1/responses") && l.contains("status=200"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert!(eventually(Duration::from_secs(5), || logged().len() == 3).await);
    for line in logged() {
        assert!(
            line.contains("prompt_tokens=11") && line.contains("completion_tokens=22"),
            "{line}"
        );
    }
}

/// A model with no backend in rotation answers 503 at once, before
/// admission: not after waiting out its bucket (SPEC: refused at once,
/// never after a pointless wait), and without taking a reservation from
/// the requests that come once a backend is back. A review saw the 503
/// come 4 s late, holding a queue slot and a reservation meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_in_rotation_answers_503_before_admission() {
    let m = mock::start(MockConfig::default().models(vec![MODEL.into()]))
        .await
        .unwrap();
    // One request a minute, a burst of 2, and a long queue: a request the
    // bucket cannot cover waits a minute.
    let health = "[health]\nunhealthy_threshold = 1\nhealthy_threshold = 1\nslow_start = \"0s\"\nliveness = { interval = \"50ms\", timeout = \"500ms\" }\nreadiness = { interval = \"1h\", timeout = \"1s\", degraded_latency = \"1s\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 4 }\n";
    let toml = format!(
        "[[models]]\nname = \"{MODEL}\"\nrequests_per_minute = 1\nburst = 2\nqueue_timeout = \"2m\"\n\n{}health_path = \"/health\"\n\n{health}",
        backend("b1", &m.base_url(), &[MODEL], 1)
    );
    let gw = gateway(&toml).await;
    let ok = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.header("x-ratelimit-remaining-requests"), "1");
    let readyz = |status: u16| {
        let addr = gw.addr();
        async move {
            for _ in 0..200 {
                if get(addr, "/readyz").await.status == status {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("/readyz never answered {status}");
        }
    };
    m.update(|c| c.health_status = Some(500));
    readyz(503).await;
    // The bucket holds one more: before the fix the first of these took it
    // and the second waited a minute for the next. Neither may touch the
    // bucket. (The timeout only turns that minute into a failure.)
    for _ in 0..2 {
        let refused = tokio::time::timeout(
            Duration::from_secs(20),
            post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)),
        )
        .await
        .expect("answered at once, not after the bucket's wait");
        refused.assert_error(503, "service_unavailable", "no_healthy_backend");
    }
    m.update(|c| c.health_status = None);
    readyz(200).await;
    let again = post(gw.addr(), "/v1/chat/completions", &chat(MODEL, false)).await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(
        again.header("x-ratelimit-remaining-requests"),
        "0",
        "the 503s took nothing"
    );
    assert_eq!(m.requests(), 2);
}

/// Requests waiting for a saturated backend's slot are served first come,
/// first served (SPEC "Admission"), requests that arrive while the queue
/// drains included: each freed slot goes to the oldest waiter, not to
/// whichever waiting task the runtime happens to poll first, nor to a
/// newcomer's first look.
#[tokio::test]
async fn backend_slot_waiters_are_served_in_arrival_order() {
    let (gw, m) = one_slot("queue_timeout = \"30s\"", Duration::from_millis(60)).await;
    let addr = gw.addr();
    let send = |k: usize| {
        let body = format!(
            r#"{{"model":"{MODEL}","user":"w{k}","messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        tokio::spawn(async move { post(addr, "/v1/chat/completions", &body).await.status })
    };
    let depth = || async {
        let text = get(addr, "/metrics").await.text();
        metric(&text, "weir_queue_depth", &format!("model=\"{MODEL}\""))
    };
    // In the system: at the backend or done (the mock saw it), or queued.
    let mock = &m;
    let seen = |k: usize| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while mock.requests() as f64 + depth().await < k as f64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "request {k} never arrived"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let mut tasks = Vec::new();
    // One at the backend, then waiters in a known order, each counted in
    // the queue before the next is sent, and more while the queue drains.
    for k in 0..16 {
        tasks.push(send(k));
        seen(k + 1).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let order: Vec<String> = m
        .recorded()
        .iter()
        .filter_map(|r| {
            let body: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
            Some(body["user"].as_str()?.to_owned())
        })
        .collect();
    let expected: Vec<String> = (0..16).map(|k| format!("w{k}")).collect();
    assert_eq!(order, expected);
}
