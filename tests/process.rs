//! The `weir` binary as users run it: `check`, signals, logs.

mod common;

use std::{net::SocketAddr, process::Command, time::Duration};

use common::*;
use weir::mock::{self, MockConfig};

const BIN: &str = env!("CARGO_BIN_EXE_weir");

fn write_config(dir: &tempfile::TempDir, toml: &str) -> std::path::PathBuf {
    let path = dir.path().join("weir.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

#[test]
fn check_prints_every_error_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        "[server]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"ten seconds\"\n\n[[models]]\nname = \"m\"\n\n[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    assert!(err.contains(&format!("{file}:3:")), "{err}");
    assert!(err.contains("server.request_timeout"), "{err}");

    let path = write_config(&dir, "[server]\nlisten = \"127.0.0.1:0\"\nbogus_key = 1\n");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:3:1", path.display())), "{err}");
    assert!(err.contains("bogus_key"), "{err}");
}

/// A valid file whose resolved configuration cannot be printed (a full
/// disk, a closed pipe) is not a passed check: exit 1, said on stderr.
#[test]
fn check_fails_when_it_cannot_print_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        "[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n",
    );
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot print the configuration"), "{err}");
}

/// Warnings reach stderr after `warning: `, in the errors' form, also when
/// there are errors (which keep their exact SPEC form).
#[test]
fn check_prints_warnings_to_stderr_also_beside_errors() {
    let dir = tempfile::tempdir().unwrap();
    let body = "[server]\nrequest_timeout = \"30s\"\n\n[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n";
    let path = write_config(&dir, &format!("{body}weight = \"heavy\"\n"));
    let file = path.display().to_string();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{file}:8:10: backends[0].weight: invalid type: string \"heavy\", expected an integer"),
            format!("warning: {file}:2:19: server.request_timeout: is shorter than server.first_byte_timeout (1m, its default), so it ends the request first"),
            format!("warning: {file}:7:11: backends[0].models: model \"m\" is not declared in [[models]]; it gets [defaults] limits"),
        ],
        "{err}"
    );
    // Without errors: the config on stdout (warnings as comments there),
    // the warnings on stderr.
    let path = write_config(&dir, body);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 2, "{err}");
    assert!(
        err.lines()
            .all(|l| l.starts_with(&format!("warning: {file}:"))),
        "{err}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("# warning: "), "{text}");
}

/// `weir mock --listen 127.0.0.1:0` logs the port the OS gave it, which
/// answers: a script asking for a free port learns which.
#[tokio::test]
async fn mock_on_port_zero_logs_the_port_it_got() {
    let args = ["mock", "--listen", "127.0.0.1:0"].map(std::ffi::OsStr::new);
    let running = spawn_weir_args(&args, "info", &[]);
    assert_ne!(running.addr.port(), 0, "{}", running.log.lock().unwrap());
    assert_eq!(get(running.addr, "/v1/models").await.status, 200);
}

/// `weir mock` refuses shares outside 0..1 and rates that are not finite,
/// as clap refuses any bad argument (exit 2), instead of running with them.
#[test]
fn mock_refuses_out_of_range_rates() {
    for bad in [
        ["--failure-rate", "2"],
        ["--rate-limit-rate", "NaN"],
        ["--tokens-per-sec=-1", "--chunks=1"],
        ["--models", "a,,b"],
    ] {
        let out = Command::new(BIN)
            .args(["mock", "--listen", "127.0.0.1:0"])
            .args(bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid value"), "{bad:?}: {err}");
    }
}

/// `--failure-rate` and `--rate-limit-rate` split the same requests, so
/// together they may not pass 1 (0.5 and 0.8 gave 51% 500s, 49% 429s and
/// no answer at all): refused as clap refuses a bad argument, with the
/// subcommand's usage and exit 2. Shares that add up to exactly 1 run.
#[test]
fn mock_refuses_fault_shares_that_add_up_past_one() {
    let mut refused = Command::new(BIN)
        .args(["mock", "--listen", "127.0.0.1:0"])
        .args(["--failure-rate", "0.5", "--rate-limit-rate", "0.8"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a mock that accepts the shares serves until it is killed.
    let code = wait_exit(&mut refused, Duration::from_secs(10));
    let out = refused.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with(
            "error: --failure-rate 0.5 and --rate-limit-rate 0.8 add up to more than 1"
        ),
        "{err}"
    );
    assert!(err.contains("Usage: weir mock "), "{err}");

    let mut mock = Command::new(BIN)
        .args(["mock", "--listen", "127.0.0.1:0"])
        .args(["--failure-rate", "0.7", "--rate-limit-rate", "0.3"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The log goes to stderr; a refusal would end it (and the loop) at once.
    let log = mock.stderr.take().unwrap();
    let mut seen = Vec::new();
    let serving = std::io::BufRead::lines(std::io::BufReader::new(log))
        .map_while(Result::ok)
        .inspect(|line| seen.push(line.clone()))
        .any(|line| line.contains("weir mock is serving"));
    mock.kill().unwrap();
    mock.wait().unwrap();
    assert!(serving, "{}", seen.join("\n"));
}

/// `WEIR_CONFIG` names the config when `--config` does not; set but empty,
/// it counts as unset (`config/weir.toml`), in every subcommand.
#[test]
fn weir_config_names_the_file_and_empty_means_unset() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        "[[models]]\nname = \"m\"\n\n[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n",
    );
    let check = |env: &std::ffi::OsStr| {
        Command::new(BIN)
            .arg("check")
            .current_dir(dir.path())
            .env("WEIR_CONFIG", env)
            .output()
            .unwrap()
    };
    let out = check(path.as_os_str());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = check("".as_ref());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("config/weir.toml"), "{err}");
    let out = Command::new(BIN)
        .args(["mock", "--help"])
        .env("WEIR_CONFIG", "")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `weir ARGS` (no `WEIR_CONFIG`) for at most 10 s: its exit code
/// (`None` if it was still running and killed) and stderr.
fn run_bounded(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("WEIR_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let code = wait_exit(&mut child, Duration::from_secs(10));
    let out = child.wait_with_output().unwrap();
    (code, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `--config` is taken before or after the subcommands that read a config
/// (`weir --config F check` is `weir check --config F`; before
/// `healthcheck` it names where to probe; `weir --config F` and
/// `weir serve --config F` run the gateway on it), and refused as clap
/// refuses a bad argument (usage, exit 2) where nothing reads it or when
/// given twice: `demo` and `mock` ignored it, and showed it in their help.
#[test]
fn config_is_taken_where_a_config_is_read_and_refused_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        "[[models]]\nname = \"m\"\n\n[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n",
    );
    let bad_listen = dir.path().join("bad-listen.toml");
    std::fs::write(&bad_listen, "[server]\nlisten = 8080\n").unwrap();
    let missing = dir.path().join("missing.toml");
    let (f, bad, none) = (
        path.as_os_str(),
        bad_listen.as_os_str(),
        missing.as_os_str(),
    );
    let arg = |a: &'static str| std::ffi::OsStr::new(a);
    let (config, listen, any) = (arg("--config"), arg("--listen"), arg("127.0.0.1:0"));

    let after = Command::new(BIN)
        .args([arg("check"), config, f])
        .env_remove("WEIR_CONFIG")
        .output()
        .unwrap();
    let before = Command::new(BIN)
        .args([config, f, arg("check")])
        .env_remove("WEIR_CONFIG")
        .output()
        .unwrap();
    assert_eq!(after.status.code(), Some(0), "{after:?}");
    assert_eq!(before.status.code(), Some(0), "{before:?}");
    assert_eq!(before.stdout, after.stdout);
    for args in [
        [config, bad, arg("healthcheck")],
        [arg("healthcheck"), config, bad],
    ] {
        let (code, err) = run_bounded(&args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains("server.listen"), "{args:?}: {err}");
    }
    for args in [&[config, none][..], &[arg("serve"), config, none]] {
        let (code, err) = run_bounded(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains("cannot read the file"), "{args:?}: {err}");
    }

    for (args, usage) in [
        (&[arg("demo"), listen, any, config, f][..], "weir demo"),
        (&[config, f, arg("demo"), listen, any], "weir demo"),
        (&[arg("mock"), listen, any, config, f], "weir mock"),
        (&[config, f, arg("mock"), listen, any], "weir mock"),
        (&[config, f, arg("check"), config, f], "weir check"),
    ] {
        let (code, err) = run_bounded(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(&format!("Usage: {usage} ")), "{args:?}: {err}");
    }

    let help = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        String::from_utf8_lossy(&out.stdout).contains("--config")
    };
    for sub in ["demo", "mock"] {
        assert!(!help(&[sub, "--help"]), "{sub}");
    }
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["check", "--help"],
        &["healthcheck", "--help"],
    ] {
        assert!(help(args), "{args:?}");
    }
}

/// Starts weir on a port something else holds, with `server_extra` in its
/// `[server]` table, and waits for it to exit: the address and its output.
fn start_on_a_taken_port(server_extra: &str) -> (std::net::SocketAddr, std::process::Output) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &format!("[server]\nlisten = \"{addr}\"\n{server_extra}\n[[models]]\nname = \"m\"\n\n[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n"),
    );
    let out = Command::new(BIN)
        .args(["--config"])
        .arg(&path)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    (addr, out)
}

/// A taken port stops start-up with exit 1 and says why once.
#[test]
fn a_taken_port_is_reported_once_and_exits_one() {
    let (addr, out) = start_on_a_taken_port("");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert_eq!(err.matches("in use").count(), 1, "{err}");
}

/// With `log_format = "json"`, why weir stops is a JSON log line too, and
/// the only place it is said: stderr stays all JSON.
#[test]
fn a_fatal_error_under_json_logging_is_one_json_line() {
    let (addr, out) = start_on_a_taken_port("log_format = \"json\"\n");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let fatal: Vec<_> = lines
        .iter()
        .filter(|l| l["level"] == "ERROR" && l["message"] == "weir stopped")
        .collect();
    assert_eq!(fatal.len(), 1, "{err}");
    let why = fatal[0]["error"].as_str().unwrap_or_default();
    assert!(why.contains(&format!("cannot listen on {addr}")), "{err}");
    assert_eq!(err.matches("in use").count(), 1, "{err}");
}

/// tests/fixtures/redis-tls/NAME: a test CA, and a certificate it signed
/// for 127.0.0.1 with its key.
fn private_ca_fixture(name: &str) -> String {
    format!(
        "{}/tests/fixtures/redis-tls/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// An `https://` backend on 127.0.0.1 whose certificate only the test CA
/// vouches for (an in-cluster server behind a private CA): every request,
/// read whole, gets one chat completion and the connection's close.
fn https_backend_behind_a_private_ca() -> std::net::SocketAddr {
    let body = r#"{"id":"c1","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
    https_backend_answering(format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    ))
}

/// A TLS server's config with the certificate the test CA signed for
/// 127.0.0.1.
fn private_ca_server_config() -> std::sync::Arc<rustls::ServerConfig> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(private_ca_fixture("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(private_ca_fixture("server-key.pem")).unwrap();
    std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap(),
    )
}

/// As [`https_backend_behind_a_private_ca`], answering every request with
/// `reply` (a whole HTTP/1.1 answer) and the connection's close.
fn https_backend_answering(reply: String) -> std::net::SocketAddr {
    https_backend(move |mut tls| {
        use std::io::Write;
        if !read_one_request(&mut tls)? {
            return Ok(());
        }
        tls.write_all(reply.as_bytes())?;
        tls.conn.send_close_notify();
        tls.flush()
    })
}

/// A TLS stream as an https test backend serves it.
type TlsStream = rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream>;

/// An https backend on 127.0.0.1 with the certificate the test CA signed:
/// each connection is `serve`d on a thread of its own (its handshake
/// happens at the first read or write), so one weir refuses ends that
/// thread only.
fn https_backend(
    serve: impl Fn(TlsStream) -> std::io::Result<()> + Send + Sync + 'static,
) -> std::net::SocketAddr {
    let serve = std::sync::Arc::new(serve);
    let config = private_ca_server_config();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (config, serve) = (config.clone(), serve.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
                serve(rustls::StreamOwned::new(conn, tcp))
            });
        }
    });
    addr
}

/// As [`https_backend_answering`], but keeping its connections alive: the
/// first request on each is answered with `reply` (which must not close),
/// the next one read and then dropped unanswered, without TLS's
/// close_notify: a backend, or a middlebox, that has let go of its
/// kept-alive connections.
fn https_backend_dropping_reused_connections(
    reply: String,
    handshake_delay: Duration,
    hold: Duration,
) -> std::net::SocketAddr {
    https_backend(move |mut tls| {
        use std::io::Write;
        // The handshake waits: rustls answers the client's hello at the
        // first read.
        std::thread::sleep(handshake_delay);
        if !read_one_request(&mut tls)? {
            return Ok(());
        }
        tls.write_all(reply.as_bytes())?;
        tls.flush()?;
        // The next request is read, held, then the connection dropped.
        read_one_request(&mut tls)?;
        std::thread::sleep(hold);
        Ok(())
    })
}

/// A chat completion answer that keeps its connection.
fn chat_answer() -> String {
    let body = r#"{"id":"c1","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads one request (head and `Content-Length` body) from `stream`;
/// false if it closed first.
fn read_one_request(stream: &mut impl std::io::Read) -> std::io::Result<bool> {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(false);
        }
        request.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&request).to_lowercase();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = (text[..end].lines())
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if request.len() >= end + 4 + length {
                return Ok(true);
            }
        }
    }
}

/// An https backend's kept-alive connection dropped unanswered just as
/// weir reuses it is what it is for a plain backend: an `idle_closed`
/// retry, at once and on a new connection, not a `protocol` failure held
/// against the backend (which, one failure ejecting here, would take the
/// model's only backend out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_backends_dropped_kept_alive_connection_is_retried_and_not_held_against_it() {
    let addr =
        https_backend_dropping_reused_connections(chat_answer(), Duration::ZERO, Duration::ZERO);
    let (_dir, weir) = weir_in_front_of(
        addr,
        "\n[outlier]\nconsecutive_failures = 1\n\n[retry]\nmax_attempts = 2\nbase_delay = \"2s\"\nmax_delay = \"2s\"\n",
    );
    all_answered(&weir, 3, "").await;
    for kind in ["protocol", "idle_closed"] {
        let errors = metric(
            weir.addr,
            "weir_upstream_errors_total",
            &[("backend", "private"), ("kind", kind)],
        )
        .await;
        assert_eq!(errors, 0.0, "{kind}");
    }
    // The race is not the backend's failure: not logged at `info`.
    let log = weir.log.lock().unwrap().clone();
    assert!(!log.contains("attempt failed"), "{log}");
    let retried = metric(
        weir.addr,
        "weir_retries_total",
        &[("model", "m"), ("reason", "idle_closed")],
    )
    .await;
    assert_eq!(
        retried, 2.0,
        "the second and third requests met a dropped connection"
    );

    // A connection whose handshake took a second or more: the race is the
    // 100 ms slack alone, so a backend that drops the request 400 ms after
    // reading it failed with it in hand (a `protocol` failure), however
    // slow the handshake was.
    let addr = https_backend_dropping_reused_connections(
        chat_answer(),
        Duration::from_millis(1200),
        Duration::from_millis(400),
    );
    second_request_is_held_against(addr).await;
}

/// weir in front of the https backend at `addr`, one failure ejecting and
/// no retry: its first request is answered, its second (which `addr`
/// fails) is a 502 held against the backend as a `protocol` failure, not
/// forgiven as an idle close.
async fn second_request_is_held_against(addr: std::net::SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let config = private_backend_config_with(
        &dir,
        addr,
        "\n[outlier]\nconsecutive_failures = 1\n\n[retry]\nmax_attempts = 1\n",
    );
    let weir = spawn_trusting_the_test_ca(&config);
    let first = post(weir.addr, "/v1/chat/completions", &chat("m", false)).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let second = post(weir.addr, "/v1/chat/completions", &chat("m", false)).await;
    let log = weir.log.lock().unwrap().clone();
    assert_eq!(second.status, 502, "{}\n{log}", second.text());
    // Why, in the log at `info`: the access line says only "502". (The
    // line may still be on its way from weir's stderr.)
    let logged = || {
        let log = weir.log.lock().unwrap().clone();
        log.lines()
            .any(|l| l.contains("attempt failed") && l.contains("backend=private"))
    };
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while !logged() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(logged(), "{}", weir.log.lock().unwrap());
    for (kind, count) in [("protocol", 1.0), ("idle_closed", 0.0)] {
        let errors = metric(
            weir.addr,
            "weir_upstream_errors_total",
            &[("backend", "private"), ("kind", kind)],
        )
        .await;
        assert_eq!(errors, count, "{kind}\n{log}");
    }
}

#[tokio::test]
async fn an_https_http2_backend_dropping_a_connection_with_a_stream_open_is_held_against_it() {
    // Over HTTP/2 there is no idle-close race to forgive: servers close idle
    // connections with GOAWAY, and a connection dropped under an open
    // stream, however soon, is the backend failing with the request in hand.
    second_request_is_held_against(h2_backend_dropping_its_second_stream().await).await;
}

/// A stream an HTTP/2 backend refuses before processing it, past the last
/// stream id of its GOAWAY (as servers close a connection after so many
/// requests) or reset with `REFUSED_STREAM`, goes again at once on another
/// connection (RFC 9113 §8.7): the client gets its answer though no retry
/// is allowed, and nothing is held against the backend (an audit saw 502s
/// and a `protocol` error for every GOAWAY'd stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_http2_backends_refused_streams_are_sent_again() {
    for refusal in [H2Refusal::GoAway, H2Refusal::RefusedStream] {
        let addr = h2_backend_refusing(refusal).await;
        let (_dir, weir) = weir_in_front_of(
            addr,
            "\n[outlier]\nconsecutive_failures = 1\n\n[retry]\nmax_attempts = 1\n",
        );
        all_answered(&weir, 4, &format!("{refusal:?}")).await;
        let errors = metric(
            weir.addr,
            "weir_upstream_errors_total",
            &[("backend", "private")],
        )
        .await;
        assert_eq!(errors, 0.0, "{refusal:?}");
    }
    // One that refuses every stream is failing: a 502, held against it.
    let addr = h2_backend_refusing(H2Refusal::Always).await;
    let (_dir, weir) = weir_in_front_of(addr, "\n[retry]\nmax_attempts = 1\n");
    let reply = post(weir.addr, "/v1/chat/completions", &chat("m", false)).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert!(reply.text().contains("3 times"), "{}", reply.text());
    let errors = metric(
        weir.addr,
        "weir_upstream_errors_total",
        &[("backend", "private"), ("kind", "protocol")],
    )
    .await;
    assert_eq!(errors, 1.0);
}

/// A probe's stream the backend refused unprocessed goes again too: with
/// every other stream refused, and one failed probe enough to take the
/// backend out, the liveness and readiness probes keep it in rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_http2_backends_refused_probe_streams_are_sent_again() {
    let addr = h2_backend_refusing(H2Refusal::RefusedStream).await;
    let dir = tempfile::tempdir().unwrap();
    let health = "[health]\nunhealthy_threshold = 1\nhealthy_threshold = 1\nslow_start = \"0s\"\nliveness = { interval = \"50ms\", timeout = \"2s\" }\nreadiness = { interval = \"50ms\", timeout = \"2s\", degraded_latency = \"2s\" }\ndeep = { interval = \"1h\", timeout = \"2s\", samples = 1, max_tokens = 4 }\n";
    let config = write_config(
        &dir,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[[models]]\nname = \"m\"\n\n{}{health}",
            backend("private", &format!("https://{addr}/v1"), &["m"], 1)
        ),
    );
    let weir = spawn_trusting_the_test_ca(&config);
    // Ten passes in a row on each tier, each probe on a stream of its own,
    // every other one refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let passes = |tier: &str, admin: &serde_json::Value| {
        admin["backends"][0]["tiers"][tier]["consecutive_passes"]
            .as_u64()
            .unwrap_or(0)
    };
    loop {
        let admin: serde_json::Value =
            serde_json::from_str(&get(weir.addr, "/admin/backends").await.text()).unwrap();
        if passes("liveness", &admin) >= 10 && passes("readiness", &admin) >= 10 {
            break;
        }
        let log = weir.log.lock().unwrap().clone();
        assert!(
            tokio::time::Instant::now() < deadline,
            "a refused probe stream failed the probe: {admin}\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = weir.log.lock().unwrap().clone();
    assert!(!log.contains("backend health changed"), "{log}");
}

/// weir trusting the test CA, in front of the https backend at `addr`, with
/// `extra` (TOML) at the end of its config (in the directory returned).
fn weir_in_front_of(addr: std::net::SocketAddr, extra: &str) -> (tempfile::TempDir, Running) {
    let dir = tempfile::tempdir().unwrap();
    let config = private_backend_config_with(&dir, addr, extra);
    let weir = spawn_trusting_the_test_ca(&config);
    (dir, weir)
}

/// Sends `n` chat completions one after the other, each to be answered 200.
async fn all_answered(weir: &Running, n: usize, what: &str) {
    for i in 0..n {
        let reply = post(weir.addr, "/v1/chat/completions", &chat("m", false)).await;
        let log = weir.log.lock().unwrap().clone();
        assert_eq!(
            reply.status,
            200,
            "{what} request {i}: {}\n{log}",
            reply.text()
        );
    }
}

/// How [`h2_backend_refusing`] refuses streams.
#[derive(Debug, Clone, Copy)]
enum H2Refusal {
    /// Every other connection sends GOAWAY (last stream id 0) at once;
    /// the others answer one stream and then close gracefully.
    GoAway,
    /// Every other stream is reset with `REFUSED_STREAM`.
    RefusedStream,
    /// Every stream is reset with `REFUSED_STREAM`.
    Always,
}

/// A TLS acceptor offering only `h2` with the test CA's certificate, and a
/// listener on 127.0.0.1 for it.
async fn h2_tls_listener() -> (
    tokio_rustls::TlsAcceptor,
    tokio::net::TcpListener,
    std::net::SocketAddr,
) {
    let mut tls = (*private_ca_server_config()).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (acceptor, listener, addr)
}

/// An https backend speaking HTTP/2 with the h2 crate itself (ALPN `h2`),
/// the test CA's certificate, refusing streams as `refusal` says and
/// answering the others with a chat completion.
async fn h2_backend_refusing(refusal: H2Refusal) -> std::net::SocketAddr {
    use std::sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    };

    let (acceptor, listener, addr) = h2_tls_listener().await;
    let (connections, streams) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, streams) = (acceptor.clone(), streams.clone());
            let nth = connections.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let go_away = matches!(refusal, H2Refusal::GoAway);
                if go_away && nth % 2 == 0 {
                    // Written by hand once the request's HEADERS frame is
                    // in: h2's own GOAWAY names the streams it has read,
                    // and this one refuses the first too (last stream id
                    // 0). Then the connection is held until weir closes it.
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
                    const GOAWAY: [u8; 17] = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                    let mut preface = [0; 24];
                    if tls.read_exact(&mut preface).await.is_err() {
                        return;
                    }
                    loop {
                        let mut head = [0; 9];
                        if tls.read_exact(&mut head).await.is_err() {
                            return;
                        }
                        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                        let mut payload = vec![0; len];
                        if tls.read_exact(&mut payload).await.is_err() {
                            return;
                        }
                        // HEADERS
                        if head[3] == 1 {
                            break;
                        }
                    }
                    let _ = tls.write_all(&SETTINGS).await;
                    let _ = tls.write_all(&GOAWAY).await;
                    let _ = tls.flush().await;
                    let mut sink = [0; 4096];
                    let read = async { while tls.read(&mut sink).await.is_ok_and(|n| n > 0) {} };
                    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
                    return;
                }
                let Ok(mut h2) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = h2.accept().await {
                    let nth = streams.fetch_add(1, Ordering::Relaxed);
                    if matches!(refusal, H2Refusal::Always) || (!go_away && nth % 2 == 0) {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let answer = chat_answer();
                    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
                    let head = http::Response::builder()
                        .header("content-type", "application/json")
                        .body(())
                        .unwrap();
                    if let Ok(mut send) = respond.send_response(head, false) {
                        let _ = send.send_data(body.into(), true);
                    }
                    if go_away {
                        h2.graceful_shutdown();
                    }
                }
            });
        }
    });
    addr
}

/// An https backend speaking HTTP/2 (ALPN `h2` only) with the test CA's
/// certificate: it answers the first request on a connection with a chat
/// completion and, when the second arrives, drops the connection (its TCP,
/// no GOAWAY) with that stream open.
async fn h2_backend_dropping_its_second_stream() -> std::net::SocketAddr {
    use http_body_util::Full;
    use hyper::{body::Bytes, service::service_fn, Response};
    use std::sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    };

    let (acceptor, listener, addr) = h2_tls_listener().await;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let (drop_tx, drop_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
                let requests = Arc::new(AtomicU32::new(0));
                let service = service_fn(move |_request| {
                    let (requests, drop_tx) = (requests.clone(), drop_tx.clone());
                    async move {
                        if requests.fetch_add(1, Ordering::Relaxed) > 0 {
                            let _ = drop_tx.send(());
                            std::future::pending::<()>().await;
                        }
                        let answer = chat_answer();
                        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let connection =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let mut drop_rx = drop_rx;
                tokio::select! {
                    _ = connection => {}
                    _ = drop_rx.recv() => {}
                }
            });
        }
    });
    addr
}

/// A config in `dir` serving model "m" from one backend,
/// [`https_backend_behind_a_private_ca`], health checks off.
fn private_backend_config(dir: &tempfile::TempDir) -> std::path::PathBuf {
    private_backend_config_at(dir, https_backend_behind_a_private_ca())
}

/// As [`private_backend_config`], for the https backend at `backend_addr`.
fn private_backend_config_at(
    dir: &tempfile::TempDir,
    backend_addr: std::net::SocketAddr,
) -> std::path::PathBuf {
    private_backend_config_with(dir, backend_addr, "")
}

/// As [`private_backend_config_at`], with `extra` (TOML) at the end.
fn private_backend_config_with(
    dir: &tempfile::TempDir,
    backend_addr: std::net::SocketAddr,
    extra: &str,
) -> std::path::PathBuf {
    write_config(
        dir,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[[models]]\nname = \"m\"\n\n{}{QUIET}{extra}",
            backend("private", &format!("https://{backend_addr}/v1"), &["m"], 1)
        ),
    )
}

/// weir on `config`, trusting the test CA and no other file or directory
/// of CAs.
fn spawn_trusting_the_test_ca(config: &std::path::Path) -> Running {
    let ca = private_ca_fixture("ca.pem");
    spawn_weir_env(
        config,
        "info",
        &[("SSL_CERT_FILE", ca.as_str()), ("SSL_CERT_DIR", "")],
    )
}

/// An `https://` backend behind a private CA is trusted through OpenSSL's
/// `SSL_CERT_FILE` or `SSL_CERT_DIR` (beside the webpki roots); without
/// either its answer is a 502 (`UnknownIssuer`), and a file that cannot be
/// read stops start-up with an error naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_backend_behind_a_private_ca_is_trusted_through_ssl_cert_file_or_dir() {
    let dir = tempfile::tempdir().unwrap();
    let config = private_backend_config(&dir);
    let ca = private_ca_fixture("ca.pem");
    let ca_dir = tempfile::tempdir().unwrap();
    std::fs::copy(&ca, ca_dir.path().join("weir-test-ca.pem")).unwrap();
    let ca_dir = ca_dir.path().to_str().unwrap().to_owned();
    // Each variable is given (empty counts as unset), so the test's own
    // environment cannot add a CA.
    for (env, trusted) in [
        ([("SSL_CERT_FILE", ca.as_str()), ("SSL_CERT_DIR", "")], true),
        (
            [("SSL_CERT_FILE", ""), ("SSL_CERT_DIR", ca_dir.as_str())],
            true,
        ),
        ([("SSL_CERT_FILE", ""), ("SSL_CERT_DIR", "")], false),
    ] {
        let weir = spawn_weir_env(&config, "debug", &env);
        let reply = post(weir.addr, "/v1/chat/completions", &chat("m", false)).await;
        let log = weir.log.lock().unwrap().clone();
        if trusted {
            assert_eq!(reply.status, 200, "{env:?}: {}\n{log}", reply.text());
            assert_eq!(reply.json()["choices"][0]["message"]["content"], "hi");
        } else {
            assert_eq!(reply.status, 502, "{env:?}: {}", reply.text());
            assert!(log.contains("UnknownIssuer"), "{log}");
        }
    }
    let missing = dir.path().join("missing-ca.pem");
    // A start refuses it, and `weir check` reads the CAs as a start would
    // and refuses alike, showing no config.
    for args in [&["--config"][..], &["check", "--config"]] {
        let out = Command::new(BIN)
            .args(args)
            .arg(&config)
            .env("BACKEND_KEY", BACKEND_KEY)
            .env("SSL_CERT_FILE", &missing)
            .env("SSL_CERT_DIR", "")
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "SSL_CERT_FILE={}: cannot read it",
                missing.display()
            )),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: no config shown");
    }
}

/// `weir check` shows what a start would warn of in the CA files: a
/// certificate that cannot be a CA (it used to be logged before `weir
/// check` had a log, so only a start said it).
#[test]
fn check_warns_of_a_certificate_that_cannot_be_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let config = private_backend_config(&dir);
    let bundle = dir.path().join("bundle.pem");
    let mut text = std::fs::read_to_string(private_ca_fixture("ca.pem")).unwrap();
    text.push_str("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
    std::fs::write(&bundle, text).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .env("BACKEND_KEY", BACKEND_KEY)
        .env("SSL_CERT_FILE", &bundle)
        .env("SSL_CERT_DIR", "")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "warning: SSL_CERT_FILE={}: 1 of its certificates cannot be used as a CA",
            bundle.display()
        )),
        "{err}"
    );
}

/// An https backend's answer is held to the plain client's rules: a 101 to
/// a request without Upgrade, a status past 599 or a head over 64 KiB is
/// no answer (hyper passes all three on), so the client gets a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_backend_that_answers_what_is_not_http_is_a_502() {
    let big = "a".repeat(200_000);
    // Past 64 KiB, but not past what hyper's read buffer lets through.
    let over = "a".repeat(70_000);
    for (what, reply) in [
        ("101", "HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n".to_owned()),
        ("999", "HTTP/1.1 999 Weird\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}".to_owned()),
        ("big head", format!("HTTP/1.1 200 OK\r\nx-big: {big}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}")),
        ("70 KB head", format!("HTTP/1.1 200 OK\r\nx-big: {over}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}")),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = private_backend_config_at(&dir, https_backend_answering(reply));
        let weir = spawn_trusting_the_test_ca(&config);
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            post(weir.addr, "/v1/chat/completions", &chat("m", false)),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"));
        assert_eq!(reply.status, 502, "{what}: {}", reply.text());
    }
}

/// An https backend that accepts the TCP connection and never answers the
/// TLS handshake is a connect failure after `connect_timeout` (502), as
/// nginx's `proxy_connect_timeout` bounds the handshake, not a wait for
/// `first_byte_timeout` (here 60 s, past the test's patience).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_backend_that_never_finishes_the_handshake_fails_at_connect_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        // Accepted, held open, never read or written.
        let mut held = Vec::new();
        for tcp in listener.incoming().flatten() {
            held.push(tcp);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nfirst_byte_timeout = \"60s\"\n\n\
             [[models]]\nname = \"m\"\n\n{}connect_timeout = \"300ms\"\n\n{QUIET}",
            backend("silent", &format!("https://{addr}/v1"), &["m"], 1)
        ),
    );
    let weir = spawn_weir_env(&config, "info", &[]);
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        post(weir.addr, "/v1/chat/completions", &chat("m", false)),
    )
    .await
    .expect("an answer before first_byte_timeout");
    assert_eq!(reply.status, 502, "{}", reply.text());
    let connect = metric(
        weir.addr,
        "weir_upstream_errors_total",
        &[("backend", "silent"), ("kind", "connect")],
    )
    .await;
    assert!(connect >= 1.0, "{connect}");
}

/// weir on `config` with `SSL_CERT_FILE` a bundle (in `dir`, returned)
/// holding only the server's own certificate, which does not vouch for
/// itself: the private-CA backend cannot be verified.
fn spawn_with_untrusted_bundle(
    dir: &tempfile::TempDir,
    config: &std::path::Path,
) -> (Running, std::path::PathBuf) {
    let bundle = dir.path().join("bundle.pem");
    std::fs::copy(private_ca_fixture("server.pem"), &bundle).unwrap();
    let path = bundle.to_str().unwrap().to_owned();
    let weir = spawn_weir_env(
        config,
        "info",
        &[("SSL_CERT_FILE", path.as_str()), ("SSL_CERT_DIR", "")],
    );
    (weir, bundle)
}

/// Rotates the test CA into `bundle` (written beside, renamed over, as a
/// ConfigMap update does) and tells `weir` to reload.
/// The state `/admin/backends` gives backend `name` ("" if none).
async fn backend_state(addr: std::net::SocketAddr, name: &str) -> String {
    let j = get(addr, "/admin/backends").await.json();
    j["backends"]
        .as_array()
        .and_then(|all| all.iter().find(|b| b["name"] == name))
        .and_then(|b| b["state"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Waits (10 s at most) until `state` says "out".
async fn until_out<F: std::future::Future<Output = String>>(state: impl Fn() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while state().await != "out" {
        assert!(tokio::time::Instant::now() < deadline, "never out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rotate_the_ca_in(weir: &Running, bundle: &std::path::Path) {
    let tmp = bundle.with_extension("pem.tmp");
    std::fs::copy(private_ca_fixture("ca.pem"), &tmp).unwrap();
    std::fs::rename(&tmp, bundle).unwrap();
    signal(&weir.child, "-HUP");
}

/// A reload reads `SSL_CERT_FILE` again: a CA bundle rotated in place is
/// trusted from that reload on, without a restart; a reload that finds the
/// same CAs says "no changes", and one that cannot read the file is
/// refused and keeps the CAs in effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_trusts_a_rotated_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = private_backend_config(&dir);
    // At first the bundle holds only the server's own certificate, which
    // does not vouch for itself: the backend cannot be verified.
    let (weir, bundle) = spawn_with_untrusted_bundle(&dir, &config);
    let log = || weir.log.lock().unwrap().clone();
    let reply = post(weir.addr, "/v1/chat/completions", &chat("m", false)).await;
    assert_eq!(reply.status, 502, "{}\n{}", reply.text(), log());
    assert!(reply.text().contains("UnknownIssuer"), "{}", reply.text());

    rotate_the_ca_in(&weir, &bundle);
    let line = log_line(&weir.log, "config reloaded").await;
    assert!(
        line.as_deref().is_some_and(|l| l.contains("trusted CAs")),
        "{line:?}\n{}",
        log()
    );
    let reply = post(weir.addr, "/v1/chat/completions", &chat("m", false)).await;
    assert_eq!(reply.status, 200, "{}\n{}", reply.text(), log());

    // The same CAs again: nothing to change.
    signal(&weir.child, "-HUP");
    assert!(
        log_line(&weir.log, "no changes").await.is_some(),
        "{}",
        log()
    );

    // A bundle that cannot be read refuses the reload; the CA read before
    // keeps verifying new connections (this backend closes each one).
    std::fs::remove_file(&bundle).unwrap();
    signal(&weir.child, "-HUP");
    let refused = log_line(&weir.log, "config reload refused").await;
    assert!(
        refused.as_deref().is_some_and(|l| l.contains(&format!(
            "SSL_CERT_FILE={}: cannot read it",
            bundle.display()
        ))),
        "{refused:?}\n{}",
        log()
    );
    let reply = post(weir.addr, "/v1/chat/completions", &chat("m", false)).await;
    assert_eq!(reply.status, 200, "{}\n{}", reply.text(), log());
}

/// A reload that reads other CAs restarts the https backends' probes: a
/// backend the old CAs could not verify is probed again within a tenth of
/// its interval, not after the whole of it (it stayed out until then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_new_cas_probes_https_backends_again() {
    let dir = tempfile::tempdir().unwrap();
    let health = "[health]\nunhealthy_threshold = 1\nhealthy_threshold = 1\nslow_start = \"0s\"\nliveness = { interval = \"30s\", timeout = \"1s\" }\nreadiness = { interval = \"30s\", timeout = \"1s\", degraded_latency = \"500ms\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 1 }\n";
    let config = write_config(
        &dir,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[[models]]\nname = \"m\"\n\n{}{health}",
            backend(
                "private",
                &format!("https://{}/v1", https_backend_behind_a_private_ca()),
                &["m"],
                1
            )
        ),
    );
    let (weir, bundle) = spawn_with_untrusted_bundle(&dir, &config);
    let state = || backend_state(weir.addr, "private");
    until_out(state).await;
    rotate_the_ca_in(&weir, &bundle);
    assert!(log_line(&weir.log, "config reloaded").await.is_some());
    // Within a tenth of the 30 s intervals (the restarted probes' jitter),
    // with room to spare; not after the rest of the 30 s. Back in rotation
    // is the point: "degraded" counts (a readiness answer slower than
    // 500 ms on a busy machine, or a deep round that ran under the old
    // CAs, its interval an hour, degrades it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !matches!(state().await.as_str(), "healthy" | "degraded") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not probed again: {}",
            weir.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A health change is logged once, under the tier whose probe made it,
/// with what made it: a slow readiness answer says so (it said nothing),
/// and a deep round running meanwhile does not log the same change again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_readiness_answer_is_logged_once_with_its_reason() {
    let m = mock::start(
        MockConfig::default()
            .models(vec!["m".into()])
            .latency(Duration::from_millis(150)),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let health = "[health]\nliveness = { interval = \"1h\", timeout = \"1s\" }\nreadiness = { interval = \"200ms\", timeout = \"1s\", degraded_latency = \"50ms\" }\ndeep = { interval = \"200ms\", timeout = \"5s\", samples = 3, max_tokens = 4 }\n";
    let config = write_config(
        &dir,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[[models]]\nname = \"m\"\n\n{}{health}",
            backend("slow", &m.base_url(), &["m"], 1)
        ),
    );
    let weir = spawn_weir(&config, "info");
    let line = log_line(&weir.log, "to=\"degraded\"").await;
    let line = line.unwrap_or_else(|| panic!("no degraded line: {}", weir.log.lock().unwrap()));
    assert!(line.contains("tier=\"readiness\""), "{line}");
    assert!(line.contains("slower than degraded_latency"), "{line}");
    // Long enough for deep rounds (three samples of 150 ms or more each)
    // that overlapped the change to have ended.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = weir.log.lock().unwrap().clone();
    assert_eq!(
        log.matches("to=\"degraded\"").count(),
        1,
        "logged once: {log}"
    );
}

/// With its stderr a closed pipe (a log collector gone, `| head`), weir
/// drops the lines it cannot write and serves on, and SIGTERM still exits
/// 0. It used to panic on each log line: every answered request an empty
/// reply, SIGTERM an exit 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stderr_loses_log_lines_not_requests() {
    let (_m, _dir, mut child, stderr, addr) =
        weir_logging_to_a_pipe(std::process::Stdio::null()).await;
    drop(stderr);
    // The reader is gone: every later log write fails.
    for _ in 0..3 {
        assert_eq!(get(addr, "/healthz").await.status, 200);
        let reply = post(addr, "/v1/chat/completions", &chat("m", false)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    signal(&child, "-TERM");
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)), Some(0));
}

/// With its stderr a pipe nobody reads (a stalled log collector, a
/// container log driver in blocking mode), weir drops the lines the pipe
/// and its log queue cannot take and serves on, and SIGTERM still exits 0
/// (its stdout a full disk: nothing is written there). Once the pipe is
/// read again, it says how many lines it dropped. It used to stop
/// everything once the pipe was full: every request hung, SIGTERM too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stderr_loses_log_lines_not_requests() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let (_m, _dir, mut child, mut stderr, addr) = weir_logging_to_a_pipe(full.into()).await;
    // Read no more: an access line per request fills the pipe (64 KiB)
    // within a few hundred requests, the log's queue (8,192 lines) after.
    let client = client();
    for i in 0..10_000 {
        let healthz = send(&client, "GET", addr, "/healthz", &[], "");
        let reply = tokio::time::timeout(Duration::from_secs(5), healthz)
            .await
            .unwrap_or_else(|_| panic!("request {i} hung with stderr full"));
        assert_eq!(reply.status, 200);
    }
    let reply = post(addr, "/v1/chat/completions", &chat("m", false)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reading = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut line = String::new();
        loop {
            line.clear();
            match stderr.read_line(&mut line) {
                Ok(0) | Err(_) => return false,
                Ok(_) if line.contains("log lines dropped") => return true,
                Ok(_) => {}
            }
        }
    });
    let told = tokio::time::timeout(Duration::from_secs(20), reading).await;
    signal(&child, "-TERM");
    assert!(
        matches!(told, Ok(Ok(true))),
        "no line saying lines were dropped"
    );
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)), Some(0));
}

/// weir in front of a mock serving `m`, logging every request (`info`) to
/// a pipe, its stdout `stdout`; the pipe's reader is returned having read
/// up to the line with the listen address (also returned).
async fn weir_logging_to_a_pipe(
    stdout: std::process::Stdio,
) -> (
    weir::mock::MockHandle,
    tempfile::TempDir,
    std::process::Child,
    std::io::BufReader<std::process::ChildStderr>,
    SocketAddr,
) {
    use std::io::BufRead;
    let m = mock::start(MockConfig::default().models(vec!["m".into()]))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[[models]]\nname = \"m\"\n\n{}{QUIET}",
            backend("b", &m.base_url(), &["m"], 1)
        ),
    );
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env("BACKEND_KEY", BACKEND_KEY)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(stdout)
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "no listen line");
        let listen = line.split("listen=").nth(1).and_then(|rest| {
            rest.split_whitespace()
                .next()?
                .trim_matches('"')
                .parse()
                .ok()
        });
        if let Some(addr) = listen {
            break addr;
        }
    };
    (m, dir, child, stderr, addr)
}

/// `weir demo` serves though its instructions cannot be printed (stdout a
/// full disk or a closed pipe): it used to panic, exit 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_with_a_stdout_that_cannot_be_written() {
    use std::io::{BufRead, BufReader};
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(full)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        stderr
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
            .join("\n")
    });
    std::thread::sleep(Duration::from_millis(500));
    if let Some(status) = child.try_wait().unwrap() {
        panic!("weir demo exited: {status}\n{}", reader.join().unwrap());
    }
    signal(&child, "-TERM");
    let code = wait_exit(&mut child, Duration::from_secs(10));
    let log = reader.join().unwrap();
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn check_prints_the_resolved_config_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        "[[models]]\nname = \"m\"\n\n[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\napi_key_env = \"WEIR_TEST_KEY\"\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .env("WEIR_TEST_KEY", BACKEND_KEY)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[redacted]"), "{text}");
    assert!(
        text.contains("request_timeout"),
        "defaults are shown: {text}"
    );
    assert!(!text.contains(BACKEND_KEY), "{text}");
}

/// A mock serving model `m` that streams `chunks` chunks at 10 a second.
async fn slow_stream_mock(chunks: u32) -> mock::MockHandle {
    mock::start(
        MockConfig::default()
            .models(vec!["m".into()])
            .tokens_per_sec(10.0)
            .chunks(chunks),
    )
    .await
    .unwrap()
}

/// A `weir` process (its config in the returned directory) in front of a
/// mock that streams `chunks` chunks at 10 a second, with `shutdown_grace`
/// set to `grace`: the set-up of the signal tests.
async fn weir_before_a_slow_stream(
    chunks: u32,
    grace: &str,
) -> (mock::MockHandle, tempfile::TempDir, Running) {
    let m = slow_stream_mock(chunks).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"{grace}\"\n\n[[models]]\nname = \"m\"\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &["m"], 1)
    );
    let weir = spawn_weir(&write_config(&dir, &toml), "info");
    (m, dir, weir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_stream_finish_then_exits_zero() {
    // 10 chunks at 10/s: the stream runs for about a second.
    let (m, _dir, weir) = weir_before_a_slow_stream(10, "20s").await;
    let addr = weir.addr;
    let stream =
        tokio::spawn(
            async move { post_stream(addr, "/v1/chat/completions", &chat("m", true)).await },
        );
    assert!(
        eventually(Duration::from_secs(5), || m.in_flight() == 1).await,
        "stream started"
    );
    signal(&weir.child, "-TERM");
    let s = stream.await.unwrap();
    assert_eq!(s.status, 200);
    assert!(
        s.text().trim_end().ends_with("data: [DONE]"),
        "stream finished: {}",
        s.text()
    );
    assert!(s.events().len() >= 10);
    let log = weir.log.clone();
    let code = exit_of(weir, Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "{}", log.lock().unwrap());
}

/// Requests still running or waiting when `shutdown_grace` runs out are
/// cut, and each is logged before the process exits, as cut by weir
/// (`ending="shutdown"`), not as a client that left. Each client hears of
/// it: the stream gets an SSE `error` event, the waiters a 503
/// `shutting_down` (logged as such).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cut_at_the_end_of_the_grace_are_all_logged() {
    let m = mock::start(
        MockConfig::default()
            .models(vec!["m".into()])
            .tokens_per_sec(10.0)
            .chunks(1000),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n\n[[models]]\nname = \"m\"\nmax_concurrent = 1\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &["m"], 1)
    );
    let weir = spawn_weir(&write_config(&dir, &toml), "info");
    let addr = weir.addr;
    let mut clients = Vec::new();
    for i in 0..4 {
        let request = raw_chat(&chat("m", true), &format!("x-request-id: CUT-{i}\r\n"));
        clients.push(tokio::spawn(async move {
            raw(addr, request, Duration::from_secs(30)).await
        }));
        if i == 0 {
            assert!(eventually(Duration::from_secs(5), || m.in_flight() == 1).await);
        }
    }
    let log = weir.log.clone();
    // The other three wait for the model's one slot.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(addr, "weir_queue_depth", &[("model", "m")]).await != 3.0 {
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&weir.child, "-TERM");
    let code = exit_of(weir, Duration::from_secs(20)).await;
    assert_eq!(code, Some(0));
    let mut replies = Vec::new();
    for client in clients {
        replies.push(client.await.unwrap());
    }
    let stream = replies[0].text();
    assert!(stream.starts_with("HTTP/1.1 200 OK\r\n"), "{stream}");
    assert!(
        stream.contains("event: error\ndata: ") && stream.contains("\"code\":\"shutting_down\""),
        "{stream}"
    );
    for waiter in &replies[1..] {
        assert!(waiter.closed);
        assert_eq!(waiter.status(), 503, "{}", waiter.text());
        assert!(
            waiter.text().contains("\"code\":\"shutting_down\""),
            "{}",
            waiter.text()
        );
    }
    // The log thread reads stderr to its end.
    assert!(
        eventually(Duration::from_secs(5), || (0..4)
            .all(|i| log.lock().unwrap().contains(&format!("CUT-{i}"))))
        .await,
        "{}",
        log.lock().unwrap()
    );
    let log = log.lock().unwrap().clone();
    for i in 0..4 {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("CUT-{i}")))
            .unwrap_or_default();
        assert!(line.contains("ending=\"shutdown\""), "{line}");
        let status = if i == 0 { "status=200" } else { "status=503" };
        assert!(line.contains(status), "{line}");
    }
}

/// A second SIGTERM during the grace period stops weir at once (exit 1),
/// cutting the stream still running (which gets its SSE `error` event
/// first), which is logged as cut by weir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_at_once() {
    // 1,000 chunks at 10/s: far longer than the test.
    let (m, _dir, weir) = weir_before_a_slow_stream(1000, "60s").await;
    let addr = weir.addr;
    let request = raw_chat(&chat("m", true), "x-request-id: SECOND-CUT\r\n");
    let stream = tokio::spawn(async move { raw(addr, request, Duration::from_secs(30)).await });
    assert!(
        eventually(Duration::from_secs(5), || m.in_flight() == 1).await,
        "stream started"
    );
    signal(&weir.child, "-TERM");
    let log = weir.log.clone();
    assert!(
        log_line(&log, "shutting down").await.is_some(),
        "the first signal was taken"
    );
    signal(&weir.child, "-TERM");
    let code = exit_of(weir, Duration::from_secs(10)).await;
    assert_eq!(code, Some(1), "{}", log.lock().unwrap());
    // Its stderr may still be on its way to the log reader after the exit.
    assert!(
        log_line(&log, "second signal").await.is_some(),
        "{}",
        log.lock().unwrap()
    );
    assert!(
        log_line(&log, "SECOND-CUT").await.is_some(),
        "{}",
        log.lock().unwrap()
    );
    let line = log
        .lock()
        .unwrap()
        .lines()
        .find(|l| l.contains("SECOND-CUT"))
        .unwrap_or_default()
        .to_owned();
    assert!(line.contains("ending=\"shutdown\""), "{line}");
    let s = stream.await.unwrap();
    assert!(s.closed, "the stream was cut");
    assert!(!s.text().contains("[DONE]"));
    assert!(
        s.text().contains("\"code\":\"shutting_down\""),
        "the stream's last word is its error event: {}",
        s.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_even_at_trace_level() {
    let m = mock::start(MockConfig::default().models(vec!["m".into()]))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[models]]\nname = \"m\"\n\n{}{QUIET}",
        backend("b1", &m.base_url(), &["m"], 1)
    );
    let mut weir = spawn_weir(&write_config(&dir, &toml), "trace");
    let r = post(weir.addr, "/v1/chat/completions", &chat("m", false)).await;
    assert_eq!(r.status, 200);
    let s = post_stream(weir.addr, "/v1/chat/completions", &chat("m", true)).await;
    assert_eq!(s.status, 200);
    // The backend did receive the key, so it was in play.
    assert!(
        format!("{:?}", m.recorded()[0].headers).contains(BACKEND_KEY)
            || m.recorded()[0].headers["authorization"] == format!("Bearer {BACKEND_KEY}")
    );
    signal(&weir.child, "-TERM");
    let code = tokio::task::spawn_blocking(move || {
        let code = wait_exit(&mut weir.child, Duration::from_secs(20));
        (code, weir.log.clone())
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(0));
    let log = code.1.lock().unwrap().clone();
    assert!(
        log.contains("request"),
        "trace logging produced output: {log}"
    );
    assert!(
        !log.contains(BACKEND_KEY),
        "the backend key leaked into the logs"
    );
}

/// Health checks on with a 60 s liveness timeout, every tier hourly.
const PATIENT_HEALTH: &str = "[health]\nliveness = { interval = \"1h\", timeout = \"60s\" }\nreadiness = { interval = \"1h\" }\ndeep = { interval = \"1h\" }\n";

/// A `weir` process in front of a mock streaming `chunks` chunks at 10 a
/// second, with `shutdown_grace` set to `grace`, in the middle of a SIGHUP
/// reload that added a backend which never answers: the reload waits for
/// that backend's liveness probe (60 s) when this returns.
async fn weir_reloading_onto_a_hanging_backend(
    chunks: u32,
    grace: &str,
) -> (
    mock::MockHandle,
    mock::MockHandle,
    tempfile::TempDir,
    Running,
) {
    let m1 = slow_stream_mock(chunks).await;
    let m2 = mock::start(MockConfig::default().models(vec!["m".into()]).hang(true))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let head = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"{grace}\"\n\n[[models]]\nname = \"m\"\n\n{PATIENT_HEALTH}\n{}",
        backend("b1", &m1.base_url(), &["m"], 1)
    );
    let path = write_config(&dir, &head);
    let weir = spawn_weir(&path, "info");
    let with_b2 = format!("{head}{}", backend("b2", &m2.base_url(), &["m"], 1));
    let tmp = dir.path().join("weir.toml.tmp");
    std::fs::write(&tmp, with_b2).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    signal(&weir.child, "-HUP");
    assert!(
        eventually(Duration::from_secs(10), || !m2.recorded().is_empty()).await,
        "the reload probes b2: {}",
        weir.log.lock().unwrap()
    );
    (m1, m2, dir, weir)
}

/// Whether a connection to `addr` is refused (the listener is closed)
/// within `within`.
async fn refused_within(addr: std::net::SocketAddr, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// SIGTERM during a reload stuck probing a new backend (timeout 60 s) is
/// taken at once: the reload is called off, nothing is in flight, and weir
/// exits 0 long before the probe would have timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_stuck_reload_stops_at_once() {
    let (_m1, _m2, _dir, weir) = weir_reloading_onto_a_hanging_backend(1, "60s").await;
    // The old config keeps serving while the reload probes.
    let r = get(weir.addr, "/healthz").await;
    assert_eq!(r.status, 200);
    signal(&weir.child, "-TERM");
    let log = weir.log.clone();
    let code = exit_of(weir, Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{}", log.lock().unwrap());
    // Its stderr may still be on its way to the log reader after the exit.
    assert!(
        log_line(&log, "config reload called off").await.is_some(),
        "{}",
        log.lock().unwrap()
    );
    let log = log.lock().unwrap().clone();
    assert!(!log.contains("config reloaded"), "{log}");
}

/// During a reload stuck probing a new backend, the first SIGINT closes the
/// listener at once while a stream runs on, and a second one stops weir
/// (exit 1): neither waits for the probe, and the second is not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_during_a_stuck_reload_exits_one() {
    // 1,000 chunks at 10/s: far longer than the test.
    let (m1, _m2, _dir, weir) = weir_reloading_onto_a_hanging_backend(1000, "60s").await;
    let addr = weir.addr;
    let request = raw_chat(&chat("m", true), "");
    let stream = tokio::spawn(async move { raw(addr, request, Duration::from_secs(30)).await });
    // The readiness and deep probes send chats too; this one says hello.
    assert!(
        eventually(Duration::from_secs(5), || m1
            .recorded()
            .iter()
            .any(|r| String::from_utf8_lossy(&r.body).contains("Hello there")))
        .await,
        "stream started"
    );
    signal(&weir.child, "-INT");
    assert!(
        refused_within(addr, Duration::from_secs(10)).await,
        "the listener closed: {}",
        weir.log.lock().unwrap()
    );
    let log = weir.log.clone();
    // The line may reach the log reader just after the listener closed.
    assert!(
        log_line(&log, "shutting down").await.is_some(),
        "{}",
        log.lock().unwrap()
    );
    signal(&weir.child, "-INT");
    let code = exit_of(weir, Duration::from_secs(10)).await;
    assert_eq!(code, Some(1), "{}", log.lock().unwrap());
    // Its stderr may still be on its way to the log reader after the exit.
    assert!(
        log_line(&log, "second signal").await.is_some(),
        "{}",
        log.lock().unwrap()
    );
    let s = stream.await.unwrap();
    assert!(s.closed, "the stream was cut");
}

/// A request waiting for a slot does not take an https backend that a CA
/// reload brought back into rotation: its snapshot's client still trusts
/// the old CAs and could not verify the backend. It waits for the busy
/// backend instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_does_not_take_a_backend_the_new_cas_brought_back() {
    let dir = tempfile::tempdir().unwrap();
    // Busy for 8 s: the reload and the restarted probes (within 3 s) come
    // back well before it frees, on a loaded machine too.
    let busy = mock::start(
        MockConfig::default()
            .models(vec!["m".into()])
            .latency(Duration::from_secs(8))
            .record(true),
    )
    .await
    .unwrap();
    let health = "[health]\nunhealthy_threshold = 1\nhealthy_threshold = 1\nslow_start = \"0s\"\nliveness = { interval = \"30s\", timeout = \"1s\" }\nreadiness = { interval = \"30s\", timeout = \"20s\", degraded_latency = \"30s\" }\ndeep = { interval = \"1h\", timeout = \"1s\", samples = 1, max_tokens = 1 }\n";
    let config = write_config(
        &dir,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[retry]\nmax_attempts = 1\n\n[[models]]\nname = \"m\"\n\n{}max_concurrent = 1\n\n{}{health}",
            backend("busy", &busy.base_url(), &["m"], 1),
            backend(
                "private",
                &format!("https://{}/v1", https_backend_behind_a_private_ca()),
                &["m"],
                1
            )
        ),
    );
    let (weir, bundle) = spawn_with_untrusted_bundle(&dir, &config);
    until_out(|| backend_state(weir.addr, "private")).await;
    let addr = weir.addr;
    let held = chat_later(addr, "m");
    // `held` has reached `busy` (and holds its one slot). Not its
    // in-flight count: the start-up readiness probe, 8 s long too, may be
    // in flight there beside it (a CI run saw 2 for the 5 s).
    let client_request_arrived = || {
        busy.recorded()
            .iter()
            .any(|r| r.body.windows(11).any(|w| w == b"Hello there"))
    };
    assert!(eventually(Duration::from_secs(5), client_request_arrived).await);
    let waiting = chat_later(addr, "m");
    queued(addr, "m", 1).await;
    rotate_the_ca_in(&weir, &bundle);
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), weir.log.lock().unwrap());
    assert_eq!(r.header("x-weir-backend"), "busy");
    assert_eq!(held.await.unwrap().status, 200);
}
