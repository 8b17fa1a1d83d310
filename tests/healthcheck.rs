//! `weir healthcheck` as the container's HEALTHCHECK runs it: a separate
//! process probing a gateway, judged by its exit code alone.

mod common;

use std::{process::Output, time::Duration};

use common::*;
use tokio::process::Command;
use weir::mock::{self, MockConfig};

const BIN: &str = env!("CARGO_BIN_EXE_weir");
const MODEL: &str = "m1";

async fn running_gateway() -> (weir::Handle, weir::mock::MockHandle) {
    let m = mock::start(MockConfig::default().models(vec![MODEL.into()]))
        .await
        .unwrap();
    let toml = format!(
        "[[models]]\nname = \"{MODEL}\"\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &[MODEL], 1)
    );
    (gateway(&toml).await, m)
}

/// Without `--url`, the probe goes to the `server.listen` of `--config`
/// (over loopback when it is 0.0.0.0); `--url` still wins.
#[tokio::test]
async fn the_config_names_where_to_probe() {
    let (gw, _m) = running_gateway().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.toml");
    std::fs::write(
        &path,
        format!("[server]\nlisten = \"0.0.0.0:{}\"\n", gw.addr().port()),
    )
    .unwrap();
    let config = path.to_str().unwrap();
    let out = healthcheck(&["--config", config], None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = healthcheck(
        &["--config", config, "--url", "http://127.0.0.1:1/healthz"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    std::fs::write(&path, "[server]\nlisten = 8080\n").unwrap();
    let out = healthcheck(&["--config", config], None).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.listen"), "{err}");
}

/// Runs `weir healthcheck ARGS` with `WEIR_HEALTHCHECK_URL` set to `env_url`
/// (or removed), within 20 s.
async fn healthcheck(args: &[&str], env_url: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("healthcheck")
        .args(args)
        .env_remove("WEIR_CONFIG")
        .kill_on_drop(true);
    match env_url {
        Some(url) => cmd.env("WEIR_HEALTHCHECK_URL", url),
        None => cmd.env_remove("WEIR_HEALTHCHECK_URL"),
    };
    tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("weir healthcheck exits within 20s")
        .expect("weir healthcheck runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_serving_gateway_is_healthy() {
    let (gw, _m) = running_gateway().await;
    let url = format!("http://{}/healthz", gw.addr());

    let out = healthcheck(&["--url", &url], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(out.stderr.is_empty(), "{}", stderr(&out));

    // The URL may come from the environment instead (docker run -e ...).
    let out = healthcheck(&[], Some(&url)).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // An empty one counts as unset (a templated `${X:-}`): the config's
    // listen address is probed.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.toml");
    std::fs::write(&path, format!("[server]\nlisten = \"{}\"\n", gw.addr())).unwrap();
    let out = healthcheck(&["--config", path.to_str().unwrap()], Some("")).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[tokio::test]
async fn a_closed_port_is_unhealthy_with_a_one_line_reason() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://{addr}/healthz");

    let out = healthcheck(&["--url", &url, "--timeout", "2s"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(&addr.to_string()), "{err}");
    assert!(err.starts_with("weir healthcheck: "), "{err}");
}

#[tokio::test]
async fn a_non_2xx_answer_is_unhealthy() {
    let (gw, _m) = running_gateway().await;
    let url = format!("http://{}/no-such-route", gw.addr());
    let out = healthcheck(&["--url", &url], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("answered"), "{err}");
}

#[tokio::test]
async fn a_gateway_that_never_answers_is_unhealthy_after_the_timeout() {
    // Bound but never accepted: connecting succeeds, no answer ever comes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/healthz", listener.local_addr().unwrap());
    let started = tokio::time::Instant::now();
    let out = healthcheck(&["--url", &url, "--timeout", "300ms"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("within 300ms"), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(listener);
}

/// A timeout too short to connect in is a usage error (exit 2), not a
/// probe whose verdict is a coin toss.
#[tokio::test]
async fn a_timeout_under_a_millisecond_is_a_usage_error() {
    for timeout in ["0s", "1ns", "999us"] {
        let out = healthcheck(
            &["--url", "http://127.0.0.1:1/healthz", "--timeout", timeout],
            None,
        )
        .await;
        assert_eq!(out.status.code(), Some(2), "{timeout}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("shorter than 1ms"),
            "{}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn a_malformed_url_is_unhealthy() {
    let out = healthcheck(&["--url", "https://127.0.0.1:1/healthz"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("http://"), "{}", stderr(&out));
}
