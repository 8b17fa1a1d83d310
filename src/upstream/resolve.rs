//! A plain backend's host name, looked up once for many connections.
//!
//! `TcpStream::connect((host, port))` runs a blocking `getaddrinfo` on
//! tokio's blocking pool for every new connection, uncached and not
//! cancellable. Under a burst of new connections to a name (a backend
//! whose pool is empty, or one whose name does not resolve, where no
//! connection is ever pooled) that started up to 512 threads per runtime,
//! each holding a socket to the resolver. Here one lookup runs at a time
//! per backend and its answer serves every connection for a while, as
//! Envoy's `STRICT_DNS` clusters do: [`FRESH_FOR`] for addresses,
//! [`FAILED_FOR`] for a failure. An IP address is never looked up.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwapOption;
use tokio::{sync::Mutex, time::Instant};

/// How long a lookup's addresses are used before the name is looked up
/// again (Envoy's default DNS refresh rate).
const FRESH_FOR: Duration = Duration::from_secs(5);

/// How long a failed lookup answers for the name: long enough that a
/// burst of requests to a name that does not resolve costs one lookup, not
/// one per request.
const FAILED_FOR: Duration = Duration::from_secs(1);

/// One lookup's answer and until when it holds.
#[derive(Debug)]
struct Answer {
    until: Instant,
    addrs: Result<Arc<[SocketAddr]>, String>,
}

/// The addresses of one `host:port`.
#[derive(Debug)]
pub(crate) struct Resolver {
    host: String,
    port: u16,
    /// The last answer, read without a lock.
    answer: ArcSwapOption<Answer>,
    /// Held by the one lookup in progress; others wait for its answer.
    lookup: Mutex<()>,
}

impl Resolver {
    /// A resolver for `host` (without brackets) and `port`.
    pub(crate) fn new(host: &str, port: u16) -> Self {
        Self {
            host: host.to_owned(),
            port,
            answer: ArcSwapOption::empty(),
            lookup: Mutex::new(()),
        }
    }

    /// The addresses to connect to: a literal IP at once, else the cached
    /// answer while it holds, else one lookup shared by every caller.
    pub(crate) async fn addrs(&self) -> io::Result<Arc<[SocketAddr]>> {
        if let Ok(ip) = self.host.parse::<std::net::IpAddr>() {
            return Ok(Arc::from([SocketAddr::new(ip, self.port)]));
        }
        if let Some(answer) = self.fresh() {
            return answer;
        }
        let _lookup = self.lookup.lock().await;
        // Another caller may have looked it up while this one waited.
        if let Some(answer) = self.fresh() {
            return answer;
        }
        let found = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map(|addrs| addrs.collect::<Arc<[SocketAddr]>>());
        let (addrs, ttl) = match found {
            Ok(addrs) if !addrs.is_empty() => (Ok(addrs), FRESH_FOR),
            Ok(_) => (Err("the name has no address".to_owned()), FAILED_FOR),
            Err(e) => (Err(e.to_string()), FAILED_FOR),
        };
        self.answer.store(Some(Arc::new(Answer {
            until: Instant::now() + ttl,
            addrs: addrs.clone(),
        })));
        addrs.map_err(lookup_error)
    }

    /// The cached answer, if it still holds.
    fn fresh(&self) -> Option<io::Result<Arc<[SocketAddr]>>> {
        let answer = self.answer.load();
        let answer = answer.as_ref().filter(|a| a.until > Instant::now())?;
        Some(answer.addrs.clone().map_err(lookup_error))
    }
}

fn lookup_error(message: String) -> io::Error {
    io::Error::other(format!("could not resolve the host: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ip_is_not_looked_up_and_a_name_is_cached() {
        let ip = Resolver::new("127.0.0.1", 8080);
        assert_eq!(
            &*ip.addrs().await.unwrap(),
            &["127.0.0.1:8080".parse().unwrap()]
        );
        assert!(ip.answer.load().is_none());
        let v6 = Resolver::new("::1", 80);
        assert_eq!(&*v6.addrs().await.unwrap(), &["[::1]:80".parse().unwrap()]);
        let name = Resolver::new("localhost", 9);
        let first = name.addrs().await.unwrap();
        assert!(first.iter().all(|a| a.port() == 9 && a.ip().is_loopback()));
        let cached = name.answer.load_full().expect("cached");
        assert!(Arc::ptr_eq(&first, cached.addrs.as_ref().unwrap()));
        assert!(Arc::ptr_eq(&first, &name.addrs().await.unwrap()));
    }

    /// A name that does not resolve fails every caller for a while with
    /// one lookup: `.invalid` never resolves (RFC 6761).
    #[tokio::test]
    async fn a_failed_lookup_is_cached_briefly() {
        let bad = Resolver::new("no-such-host.invalid", 80);
        let e = bad.addrs().await.unwrap_err();
        assert!(e.to_string().contains("could not resolve"), "{e}");
        let cached = bad.answer.load_full().expect("the failure is cached");
        assert!(cached.until <= Instant::now() + FAILED_FOR);
        bad.addrs().await.unwrap_err();
        let again = bad.answer.load_full().expect("still cached");
        assert!(Arc::ptr_eq(&cached, &again), "no second lookup");
    }
}
