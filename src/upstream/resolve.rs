//! A plain backend's host name, looked up once for many connections.
//!
//! `TcpStream::connect((host, port))` runs a blocking `getaddrinfo` on
//! tokio's blocking pool for every new connection, uncached and not
//! cancellable. Under a burst of new connections to a name (a backend
//! whose pool is empty, or one whose name does not resolve, where no
//! connection is ever pooled) that started up to 512 threads per runtime,
//! each holding a socket to the resolver. Here one lookup runs at a time
//! per backend, in a task of its own (a caller that gives up does not
//! start another), and its answer serves every connection for a while, as
//! Envoy's `STRICT_DNS` clusters do: [`FRESH_FOR`] for addresses. A failed
//! refresh keeps the last good addresses and tries again after
//! [`FAILED_FOR`] (a DNS hiccup must not fail every new connection, which
//! would eject a healthy backend); a name never resolved answers its
//! failure for [`FAILED_FOR`]. Stale addresses are used while the refresh
//! runs. An IP address is never looked up.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwapOption;
use hyper_util::client::legacy::connect::dns::Name;
use tokio::{sync::Notify, time::Instant};

/// How long a lookup's addresses are used before the name is looked up
/// again (Envoy's default DNS refresh rate).
const FRESH_FOR: Duration = Duration::from_secs(5);

/// How long a failed lookup stands before the next one: long enough that a
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
    /// Whether a lookup is running.
    looking_up: AtomicBool,
    /// Woken when a lookup stores its answer.
    looked_up: Notify,
}

impl Resolver {
    /// A resolver for `host` as a URL writes it (an IPv6 literal in
    /// brackets, which are dropped here) and `port`.
    pub(crate) fn new(host: &str, port: u16) -> Self {
        Self {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            answer: ArcSwapOption::empty(),
            looking_up: AtomicBool::new(false),
            looked_up: Notify::new(),
        }
    }

    /// The addresses to connect to: a literal IP at once; else the answer
    /// while it holds; else good addresses past their time (a refresh
    /// starts); else the answer of the lookup that runs.
    pub(crate) async fn addrs(self: &Arc<Self>) -> io::Result<Arc<[SocketAddr]>> {
        if let Ok(ip) = self.host.parse::<std::net::IpAddr>() {
            return Ok(Arc::from([SocketAddr::new(ip, self.port)]));
        }
        loop {
            // Registered before looking, so an answer stored between the
            // look and the wait still wakes this caller.
            let stored = self.looked_up.notified();
            tokio::pin!(stored);
            stored.as_mut().enable();
            if let Some(answer) = self.answer.load_full() {
                if answer.until > Instant::now() {
                    return answer.addrs.clone().map_err(lookup_error);
                }
                if let Ok(addrs) = &answer.addrs {
                    self.refresh();
                    return Ok(addrs.clone());
                }
            }
            self.refresh();
            stored.await;
        }
    }

    /// Starts a lookup unless one is running. It runs to its end in a
    /// task of its own and stores its answer (keeping the last good
    /// addresses if it fails).
    fn refresh(self: &Arc<Self>) {
        if self.looking_up.swap(true, Ordering::AcqRel) {
            return;
        }
        let resolver = Arc::clone(self);
        tokio::spawn(async move {
            let found = tokio::net::lookup_host((resolver.host.as_str(), resolver.port))
                .await
                .map(|addrs| addrs.collect::<Arc<[SocketAddr]>>());
            let now = Instant::now();
            let answer = match found {
                Ok(addrs) if !addrs.is_empty() => Answer {
                    until: now + FRESH_FOR,
                    addrs: Ok(addrs),
                },
                failed => {
                    let error = match failed {
                        Ok(_) => "the name has no address".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    let last_good = resolver
                        .answer
                        .load()
                        .as_ref()
                        .and_then(|a| a.addrs.as_ref().ok().cloned());
                    Answer {
                        until: now + FAILED_FOR,
                        addrs: last_good.ok_or(error),
                    }
                }
            };
            resolver.answer.store(Some(Arc::new(answer)));
            resolver.looking_up.store(false, Ordering::Release);
            resolver.looked_up.notify_waiters();
        });
    }
}

/// The same for an `https://` backend: hyper-util's connector asks this
/// service for a host's addresses (port 0; the connector sets the port),
/// instead of its own resolver, which runs a blocking lookup for every new
/// connection.
#[derive(Debug, Clone)]
pub(crate) struct HostResolver(Arc<Resolver>);

impl HostResolver {
    /// A resolver for the backend URL's host.
    pub(crate) fn new(host: &str) -> Self {
        Self(Arc::new(Resolver::new(host, 0)))
    }
}

impl tower_service::Service<Name> for HostResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        // Every request of a backend's client goes to its URL's host; any
        // other name (never, in practice) gets a lookup of its own.
        let resolver = if name.as_str() == self.0.host {
            self.0.clone()
        } else {
            Arc::new(Resolver::new(name.as_str(), 0))
        };
        Box::pin(async move { Ok(resolver.addrs().await?.to_vec().into_iter()) })
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
        let ip = Arc::new(Resolver::new("127.0.0.1", 8080));
        assert_eq!(
            &*ip.addrs().await.unwrap(),
            &["127.0.0.1:8080".parse().unwrap()]
        );
        assert!(ip.answer.load().is_none());
        let v6 = Arc::new(Resolver::new("::1", 80));
        assert_eq!(&*v6.addrs().await.unwrap(), &["[::1]:80".parse().unwrap()]);
        let name = Arc::new(Resolver::new("localhost", 9));
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
        let bad = Arc::new(Resolver::new("no-such-host.invalid", 80));
        let e = bad.addrs().await.unwrap_err();
        assert!(e.to_string().contains("could not resolve"), "{e}");
        let cached = bad.answer.load_full().expect("the failure is cached");
        assert!(cached.until <= Instant::now() + FAILED_FOR);
        bad.addrs().await.unwrap_err();
        let again = bad.answer.load_full().expect("still cached");
        assert!(Arc::ptr_eq(&cached, &again), "no second lookup");
    }

    /// A refresh that fails keeps the last good addresses (used meanwhile,
    /// and after it for [`FAILED_FOR`]): a DNS hiccup does not fail every
    /// new connection to a backend that is fine.
    #[tokio::test]
    async fn a_failed_refresh_keeps_the_last_good_addresses() {
        let r = Arc::new(Resolver::new("no-such-host.invalid", 80));
        let good: Arc<[SocketAddr]> = Arc::from(["127.0.0.1:80".parse::<SocketAddr>().unwrap()]);
        r.answer.store(Some(Arc::new(Answer {
            until: Instant::now(),
            addrs: Ok(good.clone()),
        })));
        let stale = r.addrs().await.unwrap();
        assert!(
            Arc::ptr_eq(&stale, &good),
            "stale addresses while refreshing"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while r.looking_up.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the lookup ends");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let kept = r.answer.load_full().expect("an answer");
        assert!(Arc::ptr_eq(kept.addrs.as_ref().unwrap(), &good));
        assert!(kept.until > Instant::now() && kept.until <= Instant::now() + FAILED_FOR);
    }

    /// hyper-util's connector gets an https backend's addresses from the
    /// shared lookup, at port 0 (the connector sets the URL's port).
    #[tokio::test]
    async fn an_https_backend_shares_the_lookup() {
        use tower_service::Service;
        let mut r = HostResolver::new("localhost");
        let name: Name = "localhost".parse().expect("a name");
        let addrs: Vec<SocketAddr> = r.call(name.clone()).await.unwrap().collect();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.port() == 0 && a.ip().is_loopback()));
        let cached =
            r.0.answer
                .load_full()
                .expect("cached in the shared resolver");
        let again: Vec<SocketAddr> = r.call(name).await.unwrap().collect();
        assert_eq!(again, addrs);
        let still = r.0.answer.load_full().expect("cached");
        assert!(Arc::ptr_eq(&cached, &still), "no second lookup");
    }
}
