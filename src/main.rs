//! The `weir` command: `serve` (the default), `check`, `demo`, `mock`,
//! `healthcheck`.
//!
//! This file owns the process concerns the library leaves out: the command
//! line, logging set-up, and turning signals into calls on the gateway's
//! [`weir::Handle`] (SIGHUP reloads; SIGTERM/SIGINT shut down gracefully).

use std::{
    future::Future,
    io::{IsTerminal, Write as _},
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::{error::ErrorKind, Args, CommandFactory, Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::{fmt, EnvFilter};
use weir::{
    config::LogFormat,
    log_writer::{self, LogGuard},
    mock::MockConfig,
    Config, Gateway, Handle,
};

// `--config` is taken only where a config file is read: before the
// subcommand (for the gateway, or for the subcommand after it, since users
// write `weir --config F check` as well as `weir check --config F`) and by
// `serve`, `check` and `healthcheck`. `demo` and `mock` read none, so there
// it is a usage error rather than a flag silently ignored.

/// A reverse-proxy gateway for OpenAI-style LLM APIs.
#[derive(Parser, Debug)]
#[command(name = "weir", version, about)]
struct Cli {
    /// Config file of the gateway, or of the serve, check or healthcheck
    /// after it (default: $WEIR_CONFIG, else config/weir.toml). An empty
    /// WEIR_CONFIG counts as unset.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The config file of the commands that read one.
#[derive(Args, Debug, Default)]
struct ConfigArgs {
    /// Config file (default: $WEIR_CONFIG, else config/weir.toml). An
    /// empty WEIR_CONFIG counts as unset.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default).
    Serve(ConfigArgs),
    /// Validate the config and print it resolved (secrets masked), or every error.
    Check(ConfigArgs),
    /// Run the gateway on 127.0.0.1:8080 in front of two embedded mock backends.
    Demo(DemoArgs),
    /// Run a standalone OpenAI-compatible mock backend.
    Mock(MockArgs),
    /// GET a running gateway's /healthz; exit 0 on 2xx, else 1 (container probes).
    Healthcheck(HealthcheckArgs),
}

#[derive(Args, Debug)]
struct HealthcheckArgs {
    /// Config whose `server.listen` is probed when there is no --url
    /// (default: $WEIR_CONFIG; an empty one counts as unset).
    #[arg(long)]
    config: Option<PathBuf>,
    /// URL to GET (plain http). Default: `/healthz` on the `server.listen`
    /// of `--config` / $WEIR_CONFIG when one is given, else
    /// http://127.0.0.1:8080/healthz. An empty one counts as unset.
    #[arg(long, env = "WEIR_HEALTHCHECK_URL")]
    url: Option<String>,
    /// Give up after this long, connecting included, e.g. "2s" (at least 1ms).
    #[arg(long, value_parser = probe_timeout, default_value = "2s")]
    timeout: Duration,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Where the demo gateway listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

#[derive(Args, Debug)]
struct MockArgs {
    /// Address to listen on, e.g. 127.0.0.1:9001.
    #[arg(long)]
    listen: SocketAddr,
    /// Models listed by /v1/models (comma-separated). Completions answer
    /// whatever model a request names, as the mock checks no model.
    #[arg(long, value_delimiter = ',', default_value = "mock-model", value_parser = model_name)]
    models: Vec<String>,
    /// Delay before the response headers / first chunk, e.g. "50ms".
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    latency: Duration,
    /// Stream pacing in tokens per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    tokens_per_sec: f64,
    /// Completion length in tokens (stream chunks).
    #[arg(long, default_value_t = 16)]
    chunks: u32,
    /// Share of requests answered 500 (0..1; with --rate-limit-rate at
    /// most 1 in all).
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    failure_rate: f64,
    /// Share of requests answered 429 (0..1; with --failure-rate at most 1
    /// in all).
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    rate_limit_rate: f64,
    /// Retry-After seconds sent with a 429.
    #[arg(long, default_value_t = 1)]
    retry_after: u32,
    /// Accept requests and never answer them.
    #[arg(long)]
    hang: bool,
    /// Start answers but never finish them: a stream sends its headers and
    /// its first N token chunks (never the final chunk or [DONE]), a
    /// non-stream answer its headers and no body; the connection stays
    /// open until the client leaves. /health and the injected 500s and
    /// 429s are not held.
    #[arg(long, value_name = "N")]
    stall_after: Option<u32>,
    /// Name sent as `x-mock-name`.
    #[arg(long, default_value = "mock")]
    name: String,
    /// Do not record requests (for load benchmarks).
    #[arg(long)]
    no_record: bool,
    /// A non-stream completion also waits for its tokens at --tokens-per-sec
    /// before it is answered, as an engine generates the whole answer first.
    #[arg(long)]
    pace_answers: bool,
    /// Answer 400 "Unrecognized request argument supplied: stream_options"
    /// to a request whose body has `stream_options`, as some hosted APIs do.
    #[arg(long)]
    refuse_stream_options: bool,
}

/// A share for `weir mock`: a number from 0 to 1 (NaN refused).
fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{text:?} is not a share from 0 to 1")),
    }
}

impl MockArgs {
    /// The two fault shares split the same requests (500 first, then 429,
    /// then answers), so past 1 in all the 429s get less than asked for:
    /// refused, as clap refuses each share past 1. A sum within rounding
    /// of 1 (`0.7 + 0.3`) passes.
    fn check_shares(&self) -> Result<(), String> {
        if self.failure_rate + self.rate_limit_rate > 1.0 + 1e-9 {
            return Err(format!(
                "--failure-rate {} and --rate-limit-rate {} add up to more than 1: \
                 they are shares of the same requests",
                self.failure_rate, self.rate_limit_rate
            ));
        }
        Ok(())
    }
}

/// A model name for `weir mock --models`: not empty.
fn model_name(text: &str) -> Result<String, String> {
    match text.trim() {
        "" => Err("a model name must not be empty".to_owned()),
        name => Ok(name.to_owned()),
    }
}

/// A probe's timeout: a duration of at least a millisecond. Less gives the
/// probe no time to connect, so its verdict would be a coin toss.
fn probe_timeout(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(t) if t >= Duration::from_millis(1) => Ok(t),
        Ok(_) => Err(format!("{text:?} is shorter than 1ms")),
        Err(e) => Err(e.to_string()),
    }
}

/// A finite number of at least 0.
fn non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{text:?} is not a finite number of at least 0")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut command = cli
        .command
        .unwrap_or_else(|| Command::Serve(ConfigArgs::default()));
    // A check across two arguments, which a value parser cannot make:
    // reported as clap reports a bad argument (usage, exit 2).
    if let Command::Mock(args) = &command {
        if let Err(message) = args.check_shares() {
            usage_error("mock", ErrorKind::ArgumentConflict, message);
        }
    }
    let config = match placed_config(cli.config, &mut command) {
        Ok(flag) => flag,
        Err((subcommand, message)) => usage_error(subcommand, ErrorKind::ArgumentConflict, message),
    };
    // Read here rather than by clap, which refuses an empty variable (as
    // a `--config` with no value).
    let config = config.or_else(|| {
        std::env::var_os("WEIR_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "weir: cannot start the async runtime: {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    // Also when a panic unwinds out of `block_on`: the lines queued before
    // it may say why.
    let flush_log = FlushLogOnDrop;
    let result = match command {
        Command::Serve(_) => runtime.block_on(serve(config_path(config))),
        Command::Check(_) => return check(&config_path(config)),
        Command::Demo(args) => runtime.block_on(demo(args)),
        Command::Mock(args) => runtime.block_on(mock(args)),
        Command::Healthcheck(args) => {
            // An empty URL counts as unset, as an empty WEIR_CONFIG does
            // (a templated `WEIR_HEALTHCHECK_URL=${X:-}`).
            let url = match (args.url.filter(|u| !u.trim().is_empty()), &config) {
                (Some(url), _) => url,
                (None, None) => weir::healthcheck::DEFAULT_URL.to_owned(),
                (None, Some(path)) => match std::fs::read_to_string(path)
                    .map_err(|e| e.to_string())
                    .and_then(|text| weir::healthcheck::url_from_config(&text))
                {
                    Ok(url) => url,
                    Err(e) => {
                        let _ = writeln!(
                            std::io::stderr(),
                            "weir healthcheck: {}: {e}",
                            path.display()
                        );
                        return ExitCode::FAILURE;
                    }
                },
            };
            return match runtime.block_on(weir::healthcheck::check(&url, args.timeout)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "weir healthcheck: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    // Blocking work still running (a host name lookup on a DNS server that
    // does not answer) must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // The log's last lines out (at most `log_writer::FLUSH_WAIT` for a stuck
    // reader), before anything written to stderr directly.
    drop(flush_log);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Logged>() => ExitCode::FAILURE,
        Err(e) => {
            // Not `eprintln!` (here or above), which panics (exit 101) on a
            // closed stderr.
            let _ = writeln!(std::io::stderr(), "weir: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exits as clap does on a bad argument (the message, the usage of
/// `weir SUBCOMMAND`, exit 2), for checks clap cannot make itself.
fn usage_error(subcommand: &str, kind: ErrorKind, message: String) -> ! {
    let mut command = Cli::command();
    command.build();
    match command.find_subcommand_mut(subcommand) {
        Some(sub) => sub.error(kind, message).exit(),
        None => command.error(kind, message).exit(),
    }
}

/// The `--config` given before the subcommand or after it (taken out of
/// `command`). Given twice, or before a subcommand that reads no config,
/// it is refused with that subcommand's name: ignoring it would run with
/// a file the user did not mean, or with none.
fn placed_config(
    before: Option<PathBuf>,
    command: &mut Command,
) -> Result<Option<PathBuf>, (&'static str, String)> {
    let (name, reads_config, after) = match command {
        Command::Serve(args) => ("serve", true, args.config.take()),
        Command::Check(args) => ("check", true, args.config.take()),
        Command::Healthcheck(args) => ("healthcheck", true, args.config.take()),
        Command::Demo(_) => ("demo", false, None),
        Command::Mock(_) => ("mock", false, None),
    };
    match (before, after) {
        (Some(_), Some(_)) => Err((
            name,
            "--config given twice, before and after the subcommand".to_owned(),
        )),
        (Some(_), None) if !reads_config => Err((
            name,
            format!(
                "weir {name} reads no config file; --config is for serve, check and healthcheck"
            ),
        )),
        (before, after) => Ok(before.or(after)),
    }
}

fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(|| PathBuf::from("config/weir.toml"))
}

/// `weir check`: the resolved config on stdout, or every error on stderr
/// (SPEC: `FILE:LINE:COLUMN: KEY.PATH: message`); warnings go to stderr in
/// the same form after `warning: ` either way, so they are seen also when
/// errors hide the config (whose `#` comments repeat them).
///
/// Written without `print!`/`eprintln!`, which panic (exit 101) on a closed
/// pipe: `weir check | head` gets what it read and the exit code.
fn check(path: &std::path::Path) -> ExitCode {
    let checked = Config::check(path, &weir::config::process_env);
    let mut err = std::io::stderr().lock();
    let code = match &checked.result {
        // The CAs of SSL_CERT_FILE / SSL_CERT_DIR are read too when an
        // https backend needs them: a file a start would refuse fails here.
        Ok(config) => match weir::check_trusted_cas(config) {
            Ok(warnings) => {
                for warning in warnings {
                    let _ = writeln!(err, "warning: {warning}");
                }
                // A configuration that could not be printed was not
                // checked as far as a script reading it knows.
                let mut out = std::io::stdout().lock();
                match out
                    .write_all(config.render().as_bytes())
                    .and_then(|()| out.flush())
                {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        let _ = writeln!(err, "cannot print the configuration: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(err, "{e}");
                ExitCode::FAILURE
            }
        },
        Err(errors) => {
            for e in &errors.0 {
                let _ = writeln!(err, "{e}");
            }
            ExitCode::FAILURE
        }
    };
    for warning in &checked.warnings {
        let _ = writeln!(err, "warning: {warning}");
    }
    code
}

/// How much of the log waits for stderr before new lines are dropped:
/// 8,192 lines (about 3 MB of access lines) and 4 MiB, enough for a burst,
/// bounded when nobody reads; and the log thread's write buffer, written
/// whenever its queue is empty (a busy gateway's lines in few writes).
const LOG_LIMITS: log_writer::Limits = log_writer::Limits {
    lines: 8192,
    bytes: 4 << 20,
    buffer: 64 * 1024,
};

/// The log's guard, taken and dropped by `main` as the process ends, after
/// the runtime's last lines: the lines still queued go out then.
static LOG_GUARD: std::sync::Mutex<Option<LogGuard>> = std::sync::Mutex::new(None);

/// Drops the log's guard (`LOG_GUARD`), writing out the queued lines.
struct FlushLogOnDrop;

impl Drop for FlushLogOnDrop {
    fn drop(&mut self) {
        drop(LOG_GUARD.lock().ok().and_then(|mut guard| guard.take()));
    }
}

/// Logs to stderr from a thread of its own ([`weir::log_writer`]): a
/// reader that stalls costs lines, never a request or the shutdown.
fn init_logging(format: LogFormat) -> anyhow::Result<()> {
    // An unset RUST_LOG means `info`; an invalid one too, said once logging
    // is up (a typo should not silently change what is logged).
    let (filter, invalid) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) => (
            EnvFilter::new("info"),
            std::env::var_os("RUST_LOG").map(|_| e.to_string()),
        ),
    };
    let (writer, guard) =
        log_writer::spawn(std::io::stderr(), LOG_LIMITS).context("starting the log thread")?;
    if let Ok(mut kept) = LOG_GUARD.lock() {
        *kept = Some(guard);
    }
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal())
        // A log line that cannot be written (stderr a closed pipe, a full
        // disk) is dropped, as nginx drops it: reporting the failure on
        // the same stderr would panic, on whichever request was logging.
        .log_internal_errors(false);
    // A second init (never happens in this binary) would only be refused.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if let Some(error) = invalid {
        tracing::warn!(%error, "RUST_LOG is not a valid filter; logging at info");
    }
    Ok(())
}

async fn serve(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path, &weir::config::process_env)
        .map_err(|errors| anyhow::anyhow!("invalid config:\n{errors}"))?;
    init_logging(config.server.log_format)?;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let served = async {
        // Handlers first: a signal sent as soon as "weir is serving" is
        // logged must reach them, not the default action (which would kill
        // weir).
        let signals = Signals::install()?;
        let handle = Gateway::new(config).config_path(&path).start().await?;
        tracing::info!(listen = %handle.addr(), admin = %handle.admin_addr(), "weir is serving");
        run_until_signalled(handle, signals).await
    };
    // With logging up, why weir stops goes to the log in its format (a
    // JSON log stays all JSON), unless the log would drop it.
    served.await.map_err(|e| {
        if tracing::enabled!(tracing::Level::ERROR) {
            tracing::error!(error = format!("{e:#}"), "weir stopped");
            anyhow::Error::new(Logged)
        } else {
            e
        }
    })
}

/// An error already written to the log, so `main` does not print it again.
#[derive(Debug, thiserror::Error)]
#[error("already logged")]
struct Logged;

/// The signals a running gateway acts on, listened for from the start.
struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            hangup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }
}

/// Reloads on SIGHUP; on SIGTERM/SIGINT stops accepting, lets in-flight
/// requests finish within `shutdown_grace`, and returns. A second SIGTERM
/// or SIGINT during that wait ends it at once (an operator pressing Ctrl-C
/// twice means it), cutting what is still in flight, and exits 1.
///
/// A reload runs beside the signals, not in their stead: probing a new
/// backend can take the liveness timeout, and a SIGTERM meanwhile must stop
/// accepting at once (the shutdown calls the reload off). SIGHUPs that
/// arrive during a reload are merged into one reload after it, as before.
async fn run_until_signalled(handle: Handle, signals: Signals) -> anyhow::Result<()> {
    let Signals {
        mut hangup,
        mut terminate,
        mut interrupt,
    } = signals;
    let mut reloading: Option<Pin<Box<dyn Future<Output = ()> + '_>>> = None;
    loop {
        tokio::select! {
            _ = hangup.recv(), if reloading.is_none() => {
                // The outcome is logged by the reload itself.
                reloading = Some(Box::pin(async {
                    let _ = handle.reload().await;
                }));
            }
            () = async {
                match reloading.as_mut() {
                    Some(reload) => reload.await,
                    None => std::future::pending().await,
                }
            }, if reloading.is_some() => {
                reloading = None;
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    tracing::info!("shutting down: no new connections; waiting for in-flight requests (signal again to stop now)");
    handle.shutdown();
    // The shutdown calls off a reload still running, whose task logs that
    // and ends at once. Wait for it: dropped here, its task would be left
    // to finish on its own, and a stop that came first (nothing in flight)
    // ended the runtime with it still queued, the line never written.
    if let Some(reload) = reloading.take() {
        reload.await;
    }
    // Ends its borrow of `handle` here, before `wait` takes it.
    drop(reloading);
    let again = async {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    };
    let end_grace = handle.grace_ender();
    let wait = handle.wait();
    tokio::pin!(wait);
    let second = tokio::select! {
        () = &mut wait => false,
        () = again => true,
    };
    if second {
        // What is still open is cut now, and logged as cut, before exit.
        end_grace.cancel();
        wait.await;
        anyhow::bail!("stopped by a second signal before in-flight requests finished");
    }
    tracing::info!("shutdown complete");
    Ok(())
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    init_logging(LogFormat::Text)?;
    let signals = Signals::install()?;
    let demo = weir::demo::start(args.listen).await?;
    // Not `println!`, which panics (exit 101) on a closed or full stdout:
    // the gateway runs whether or not anyone reads how to use it.
    let _ = writeln!(std::io::stdout(), "{}", demo.instructions());
    run_until_signalled(demo.gateway, signals).await
}

async fn mock(args: MockArgs) -> anyhow::Result<()> {
    init_logging(LogFormat::Text)?;
    let mut config = MockConfig::default()
        .models(args.models)
        .latency(args.latency)
        .tokens_per_sec(args.tokens_per_sec)
        .chunks(args.chunks)
        .failure_rate(args.failure_rate)
        .rate_limit(args.rate_limit_rate, args.retry_after)
        .hang(args.hang)
        .name(args.name)
        .record(!args.no_record)
        .pace_answers(args.pace_answers)
        .refuse_stream_options(args.refuse_stream_options);
    config.stall_after = args.stall_after;
    let listener = weir::mock::listen(args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    // The port the OS chose for `:0`, not 0.
    let bound = listener.local_addr().unwrap_or(args.listen);
    tracing::info!(listen = %bound, "weir mock is serving");
    weir::mock::serve(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let Ok(mut terminate) = signal(SignalKind::terminate()) else {
        return;
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
