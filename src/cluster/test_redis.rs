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
    pub(crate) fn start() -> Option<TestRedis> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        Self::start_on(port)
    }

    /// As [`start`](Self::start), on `port` (a client already pointed at
    /// it sees Redis appear).
    pub(crate) fn start_on(port: u16) -> Option<TestRedis> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                eprintln!(
                    "SKIPPED: cannot start redis-server ({e}); install Debian's redis-server"
                );
                return None;
            }
        };
        for _ in 0..250 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(TestRedis {
                    child,
                    url: format!("redis://127.0.0.1:{port}/"),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("SKIPPED: redis-server did not listen on 127.0.0.1:{port} within 5 s");
        None
    }

    /// A connection to it.
    pub(crate) async fn connect(&self) -> redis::aio::ConnectionManager {
        let client = redis::Client::open(self.url.as_str()).expect("test URL parses");
        redis::aio::ConnectionManager::new(client)
            .await
            .expect("test redis answers")
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
