//! `weir healthcheck`: one `GET /healthz` against a running gateway.
//!
//! The runtime image is distroless: it has no shell, `curl` or `wget`, so a
//! container `HEALTHCHECK` (Docker) or an `exec` probe cannot call an HTTP
//! tool. Instead the weir binary probes itself: `HEALTHCHECK CMD
//! ["/usr/local/bin/weir", "healthcheck"]` starts a second, short-lived weir
//! process that sends one request to the serving one and exits 0 on a 2xx
//! answer, 1 otherwise. Kubernetes users should prefer `httpGet` probes,
//! which need no process at all (see `deploy/`).
//!
//! Only plain `http://` is supported: the probe always targets the gateway
//! in the same container or pod over loopback, where TLS buys nothing, and
//! leaving it out keeps the probe from loading TLS roots on every run.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

/// Where `weir healthcheck` looks by default: the default `listen`
/// (`0.0.0.0:8080`) reached over loopback.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080/healthz";

/// Why a health check failed. Each variant's message is one line, printed
/// as-is on stderr by `weir healthcheck`, so that `docker inspect` shows
/// the operator the cause and not only "unhealthy".
#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    /// The URL does not parse, or is not an absolute `http://` URL.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// Nothing accepted the connection (the gateway is not listening).
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The connection worked but the exchange did not (reset, garbage).
    #[error("request to {url} failed: {reason}")]
    Request { url: String, reason: String },
    /// No response headers within the timeout: a hung process is unhealthy.
    #[error("no answer from {url} within {}", humantime::format_duration(*.timeout))]
    Timeout { url: String, timeout: Duration },
    /// An answer that is not 2xx.
    #[error("{url} answered {status}")]
    Status { url: String, status: StatusCode },
}

/// The `/healthz` URL of the gateway a config file describes: its
/// `server.listen` (default `0.0.0.0:8080`) over loopback when it listens on
/// every address. Only that key is read, so a config whose secrets live in
/// variables the probe does not have still gives its address.
pub fn url_from_config(text: &str) -> Result<String, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| e.message().to_owned())?;
    let mut addr = match table.get("server").and_then(|s| s.get("listen")) {
        None => crate::config::defaults::LISTEN,
        Some(value) => {
            let listen = value
                .as_str()
                .ok_or_else(|| "server.listen is not a string".to_owned())?;
            listen
                .trim()
                .parse()
                .map_err(|e| format!("server.listen {listen:?}: {e}"))?
        }
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(format!("http://{addr}/healthz"))
}

/// Sends `GET url` and succeeds on a 2xx status.
///
/// `timeout` bounds the whole exchange, connecting included, so that a
/// gateway that accepts connections but never answers (a deadlocked or
/// overloaded process) is reported unhealthy instead of hanging the probe
/// until the container runtime kills it. The response body is not read: the
/// status is the whole answer of `/healthz`.
pub async fn check(url: &str, timeout: Duration) -> Result<(), HealthcheckError> {
    let uri = parse(url)?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(timeout));
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let request = Request::get(uri)
        .header(http::header::USER_AGENT, "weir-healthcheck")
        .body(Empty::new())
        .map_err(|e| HealthcheckError::InvalidUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
    let response = match tokio::time::timeout(timeout, client.request(request)).await {
        Err(_) => {
            return Err(HealthcheckError::Timeout {
                url: url.to_owned(),
                timeout,
            })
        }
        Ok(Err(e)) if e.is_connect() => {
            return Err(HealthcheckError::Connect {
                url: url.to_owned(),
                reason: crate::upstream::error_chain(&e),
            })
        }
        Ok(Err(e)) => {
            return Err(HealthcheckError::Request {
                url: url.to_owned(),
                reason: crate::upstream::error_chain(&e),
            })
        }
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(HealthcheckError::Status {
            url: url.to_owned(),
            status,
        })
    }
}

/// Accepts only absolute `http://` URLs, so that a typo (a missing scheme,
/// `https://`) fails with a clear message instead of a confusing connect
/// error.
fn parse(url: &str) -> Result<Uri, HealthcheckError> {
    let invalid = |reason: &str| HealthcheckError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri =
        url.parse()
            .map_err(|e: http::uri::InvalidUri| HealthcheckError::InvalidUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(invalid(&format!(
                "scheme {other:?} is not supported, use http://"
            )))
        }
        None => {
            return Err(invalid(
                "not an absolute URL; expected http://HOST:PORT/healthz",
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_comes_from_server_listen() {
        assert_eq!(
            url_from_config("[server]\nlisten = \"0.0.0.0:9000\"\n").unwrap(),
            "http://127.0.0.1:9000/healthz"
        );
        assert_eq!(
            url_from_config("[server]\nlisten = \"[::]:9000\"\n").unwrap(),
            "http://[::1]:9000/healthz"
        );
        assert_eq!(
            url_from_config("[server]\nlisten = \"10.0.0.5:81\"\n").unwrap(),
            "http://10.0.0.5:81/healthz"
        );
        assert_eq!(url_from_config("").unwrap(), DEFAULT_URL);
        assert!(url_from_config("[server]\nlisten = \"nope\"\n").is_err());
        assert!(url_from_config("[server\n").is_err());
    }

    #[test]
    fn only_absolute_http_urls_are_accepted() {
        assert!(parse("http://127.0.0.1:8080/healthz").is_ok());
        assert!(parse(DEFAULT_URL).is_ok());
        for bad in [
            "https://127.0.0.1/healthz",
            "127.0.0.1:8080/healthz",
            "/healthz",
            "http://",
        ] {
            assert!(
                matches!(parse(bad), Err(HealthcheckError::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = check(&format!("http://{addr}/healthz"), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(err, HealthcheckError::Connect { .. }), "{err}");
        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[tokio::test]
    async fn a_silent_server_is_a_timeout() {
        // Bound but never accepted: the kernel completes the handshake, then
        // nothing answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let err = check(
            &format!("http://{addr}/healthz"),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, HealthcheckError::Timeout { .. }), "{err}");
        drop(listener);
    }
}
