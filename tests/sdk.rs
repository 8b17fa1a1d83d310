//! The official OpenAI Python SDK pointed at weir (`.ci/run` installs it).
//! Its exceptions are the contract SPEC's error shapes are written for.

mod common;

use common::*;
use weir::mock::{self, MockConfig};

/// Runs tests/sdk/openai_client.py and returns its JSON line.
pub async fn run_sdk(base_url: &str, model: &str, scenario: &str) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_client.py");
    let out = tokio::process::Command::new("python3")
        .args([script, base_url, model, scenario])
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the openai SDK script failed (is `openai` installed? .ci/run installs it):\n{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_chats_streams_embeds_and_lists_models() {
    let m = mock::start(MockConfig::default().models(vec!["m".into()]).chunks(5))
        .await
        .unwrap();
    let toml = format!(
        "[[models]]\nname = \"m\"\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &["m"], 1)
    );
    let gw = gateway(&toml).await;
    let j = run_sdk(&format!("http://{}/v1", gw.addr()), "m", "chat").await;
    assert_eq!(j["content"], "tok0 tok1 tok2 tok3 tok4", "{j}");
    assert_eq!(j["streamed"], "tok0 tok1 tok2 tok3 tok4", "{j}");
    assert_eq!(
        j["usage_chunks"], 0,
        "the client did not ask for usage: {j}"
    );
    assert!(j["usage_total"].as_u64().unwrap() > 5, "{j}");
    assert!(j["embedding_len"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(j["models"], serde_json::json!(["m"]), "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_raises_the_matching_exceptions() {
    let m = mock::start(MockConfig::default().models(vec!["m".into()]))
        .await
        .unwrap();
    let toml = format!(
        "[[models]]\nname = \"m\"\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &["m"], 1)
    );
    let gw = gateway(&toml).await;
    let j = run_sdk(&format!("http://{}/v1", gw.addr()), "m", "errors").await;
    assert_eq!(j["not_found"], "model_not_found", "{j}");
    assert_eq!(j["bad_request"], "missing_model", "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_raises_rate_limit_error() {
    let m = mock::start(MockConfig::default().models(vec!["m".into()]))
        .await
        .unwrap();
    let toml = format!(
        "[[models]]\nname = \"m\"\nrequests_per_minute = 1\nburst = 1\nqueue_timeout = \"0s\"\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &["m"], 1)
    );
    let gw = gateway(&toml).await;
    assert_eq!(
        post(gw.addr(), "/v1/chat/completions", &chat("m", false))
            .await
            .status,
        200
    );
    let j = run_sdk(&format!("http://{}/v1", gw.addr()), "m", "rate_limit").await;
    assert_eq!(j["rate_limited"], "rate_limit_exceeded", "{j}");
    // One request per minute: the bucket refills a minute after the first
    // request, less the time the SDK took to start.
    let retry_after: u64 = j["retry_after"].as_str().unwrap().parse().unwrap();
    assert!((30..=60).contains(&retry_after), "{j}");
}

/// What the SDK raises when weir's `shutdown_grace` ends (here ended early,
/// as a second signal does) while it streams and while a second request
/// waits for the model's one slot: an `APIError` from the stream (its
/// `event: error`) and a 503 `InternalServerError`, both `shutting_down`,
/// never a bare connection error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_hears_of_a_shutdown_that_cuts_its_requests() {
    let m = mock::start(
        MockConfig::default()
            .models(vec!["m".into()])
            .tokens_per_sec(10.0)
            .chunks(1000),
    )
    .await
    .unwrap();
    let toml = format!(
        "[server]\nshutdown_grace = \"60s\"\n\n[[models]]\nname = \"m\"\nmax_concurrent = 1\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &["m"], 1)
    );
    let gw = gateway(&toml).await;
    let base = format!("http://{}/v1", gw.addr());
    let sdk = tokio::spawn(async move { run_sdk(&base, "m", "shutdown").await });
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while metric(gw.addr(), "weir_queue_depth", &[("model", "m")]).await != 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    gw.shutdown();
    gw.grace_ender().cancel();
    let j = sdk.await.unwrap();
    assert_eq!(j["stream"][0], "APIError", "{j}");
    assert_eq!(j["stream"][1], "shutting_down", "{j}");
    assert!(j["chunks"].as_u64().unwrap() >= 1, "{j}");
    assert_eq!(
        j["waiter"],
        serde_json::json!([503, "shutting_down"]),
        "{j}"
    );
}
