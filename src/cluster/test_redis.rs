//! A throw-away `redis-server` for the unit tests of the scripts: started on
//! a free loopback port with persistence off, killed on drop. A test that
//! cannot start one says so and is skipped (CI installs Debian's
//! `redis-server`, so there it always runs).

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::Duration,
};

/// A running `redis-server`; killed when dropped.
pub(crate) struct TestRedis {
    child: Child,
    /// `redis://127.0.0.1:PORT/`.
    pub url: String,
}

impl TestRedis {
    /// Starts one, or returns `None` (after saying why on stderr) when
    /// `redis-server` is missing or does not come up.
    ///
    /// The port is found free by binding it and letting go, and something
    /// else (another test's Redis or server, in this process or another)
    /// may take it before `redis-server` binds it: then the port answers,
    /// but not from this test's Redis, which exited, and the test would
    /// share the other's keys or lose its connection when that one goes (a
    /// loaded run saw `broken pipe` on a fresh Redis' first call). Another
    /// port is tried then.
    pub(crate) fn start() -> Option<TestRedis> {
        on_free_ports(Self::spawn_on)
    }

    /// As [`start`](Self::start), on `port` (a client already pointed at
    /// it sees Redis appear).
    pub(crate) fn start_on(port: u16) -> Option<TestRedis> {
        match Self::spawn_on(port) {
            Ok(redis) => Some(redis),
            Err(Failed::Taken) => {
                eprintln!("SKIPPED: 127.0.0.1:{port} was taken before redis-server bound it");
                None
            }
            Err(Failed::Skip(why)) => {
                eprintln!("SKIPPED: {why}");
                None
            }
        }
    }

    /// Runs `redis-server` on `port` and waits until that process (its pid
    /// in `INFO server`) answers there.
    fn spawn_on(port: u16) -> Result<TestRedis, Failed> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                return Err(Failed::Skip(format!(
                    "cannot start redis-server ({e}); install Debian's redis-server"
                )))
            }
        };
        match answers_itself(&mut child, port) {
            Ok(()) => Ok(TestRedis {
                child,
                url: format!("redis://127.0.0.1:{port}/"),
            }),
            Err(failed) => Err(stop(child, failed)),
        }
    }

    /// A connection to it.
    pub(crate) async fn connect(&self) -> redis::aio::ConnectionManager {
        let client = redis::Client::open(self.url.as_str()).expect("test URL parses");
        redis::aio::ConnectionManager::new(client)
            .await
            .expect("test redis answers")
    }
}

/// A free loopback port (free when asked: see [`on_free_ports`]).
pub(crate) fn free_port() -> Option<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .ok()
        .map(|a| a.port())
}

/// `start`'s Redis on a free port, tried on a fresh port while another
/// server takes the one found free before `redis-server` binds it (up to
/// 10 times); `None` after saying on stderr why the test is skipped.
/// tests/cluster.rs uses it too.
pub(crate) fn on_free_ports<T>(mut start: impl FnMut(u16) -> Result<T, Failed>) -> Option<T> {
    for _ in 0..10 {
        match start(free_port()?) {
            Ok(redis) => return Some(redis),
            Err(Failed::Taken) => continue,
            Err(Failed::Skip(why)) => {
                eprintln!("SKIPPED: {why}");
                return None;
            }
        }
    }
    eprintln!("SKIPPED: every port tried for redis-server was taken first");
    None
}

/// Waits until `child`, a `redis-server` just started on `port`, answers
/// there itself (its pid in `INFO server`; Redis binds every port it is
/// given before it answers anyone): `Taken` when it exits first (it could
/// not bind the port) or another server answers, `Skip` when nothing
/// answers within 5 s. tests/cluster.rs uses it too.
pub(crate) fn answers_itself(child: &mut Child, port: u16) -> Result<(), Failed> {
    for _ in 0..250 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return Err(Failed::Taken);
        }
        match redis_pid(port) {
            Some(pid) if pid == child.id() => return Ok(()),
            Some(_) => return Err(Failed::Taken),
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    Err(Failed::Skip(format!(
        "redis-server did not listen on 127.0.0.1:{port} within 5 s"
    )))
}

/// Why a `redis-server` just started gives no Redis.
pub(crate) enum Failed {
    /// Something else had the port first.
    Taken,
    /// No Redis here: the test is skipped, saying this.
    Skip(String),
}

/// Kills and reaps `child`, for `failed`.
pub(crate) fn stop(mut child: Child, failed: Failed) -> Failed {
    let _ = child.kill();
    let _ = child.wait();
    failed
}

/// The pid of the Redis answering on 127.0.0.1:`port` (`INFO server`'s
/// `process_id`), `None` while nothing answers there as Redis does.
fn redis_pid(port: u16) -> Option<u32> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream.write_all(b"INFO server\r\n").ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got);
        if let Some(rest) = text.split("process_id:").nth(1) {
            if let Some((pid, _)) = rest.split_once("\r\n") {
                return pid.trim().parse().ok();
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
