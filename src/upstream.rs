//! The pooled HTTP clients that talk to backends.
//!
//! Only this module opens upstream connections. Each backend gets its own
//! hyper-util pooled client (keep-alive, connection reuse), so its
//! `connect_timeout` applies and its pool survives a reload that keeps the
//! backend (the client lives in the backend's carried-over state). https
//! backends use rustls with the `ring` provider and the webpki roots, so weir
//! needs neither OpenSSL nor the system's certificate store.
//!
//! It does not decide what to retry: it reports *how* an attempt failed
//! ([`AttemptError`]) and `proxy` decides from that alone.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};

/// A pooled client for one backend. Request bodies are the buffered client
/// body (`Full<Bytes>`), cheap to clone for a retry.
pub(crate) type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How long an idle pooled upstream connection is kept. Shorter than the
/// common 60-120 s keep-alive of inference servers, so weir closes first and
/// rarely sends on a connection the backend is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// rustls refused the provider (never happens with `ring` and TLS 1.2/1.3,
    /// but it is a `Result` in rustls' API, so it is one here).
    #[error("tls setup failed: {0}")]
    Tls(String),
}

/// How one attempt to a backend failed. `proxy` retries on another backend
/// from this alone; nothing of the response has reached the client yet.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AttemptError {
    /// Nothing listens at the backend's address (ECONNREFUSED): outlier
    /// detection ejects it at once.
    #[error("connection refused: {0}")]
    Refused(String),
    /// The TCP/TLS connection could not be made (unreachable, connect
    /// timeout, TLS failure). The request never reached the backend.
    #[error("connect failed: {0}")]
    Connect(String),
    /// No response headers within `first_byte_timeout`.
    #[error("no response headers within {0:?}")]
    Timeout(Duration),
    /// The connection broke or the backend answered something that is not
    /// HTTP (reset, garbage, oversized headers).
    #[error("upstream failed: {0}")]
    Protocol(String),
}

impl AttemptError {
    /// The `kind` label of `weir_upstream_errors_total`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            AttemptError::Refused(_) | AttemptError::Connect(_) => "connect",
            AttemptError::Timeout(_) => "timeout",
            AttemptError::Protocol(_) => "protocol",
        }
    }
}

/// Builds the pooled client for a backend with this connect timeout.
pub(crate) fn client(connect_timeout: Duration) -> Result<HttpClient, UpstreamError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(30)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config()?.as_ref().clone())
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https))
}

/// Sends one request and waits at most `first_byte_timeout` for its
/// response headers.
pub(crate) async fn send(
    client: &HttpClient,
    request: Request<Full<Bytes>>,
    first_byte_timeout: Duration,
) -> Result<Response<Incoming>, AttemptError> {
    match tokio::time::timeout(first_byte_timeout, client.request(request)).await {
        Err(_) => Err(AttemptError::Timeout(first_byte_timeout)),
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) if e.is_connect() && is_refused(&e) => {
            Err(AttemptError::Refused(error_chain(&e)))
        }
        Ok(Err(e)) if e.is_connect() => Err(AttemptError::Connect(error_chain(&e))),
        Ok(Err(e)) => Err(AttemptError::Protocol(error_chain(&e))),
    }
}

/// The upstream URI: the backend's base URL followed by the client's path
/// after `/v1`, with the query string (SPEC "Paths").
pub(crate) fn upstream_uri(
    base: &Uri,
    rest: &str,
    query: Option<&str>,
) -> Result<Uri, http::Error> {
    let base_path = base.path().trim_end_matches('/');
    let mut path_and_query =
        String::with_capacity(base_path.len() + rest.len() + 1 + query.map_or(0, str::len));
    path_and_query.push_str(base_path);
    path_and_query.push_str(rest);
    if let Some(q) = query {
        path_and_query.push('?');
        path_and_query.push_str(q);
    }
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse()?);
    Ok(Uri::from_parts(parts)?)
}

/// The rustls client configuration, built once: loading the webpki roots
/// and the provider is the expensive part of a connector.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, UpstreamError> {
    static TLS: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    if let Some(config) = TLS.get() {
        return Ok(config.clone());
    }
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| UpstreamError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TLS.get_or_init(|| Arc::new(config)).clone())
}

/// Whether an `io::Error` of kind `ConnectionRefused` is in the chain.
fn is_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        source = s.source();
    }
    false
}

/// The error and its sources on one line: hyper's top-level messages
/// ("client error (Connect)") say little without their causes.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_uri_joins_base_path_and_rest() {
        let base: Uri = "https://api.example.com/v1".parse().unwrap();
        let uri = upstream_uri(&base, "/chat/completions", Some("a=1")).unwrap();
        assert_eq!(
            uri.to_string(),
            "https://api.example.com/v1/chat/completions?a=1"
        );
        let base: Uri = "http://127.0.0.1:9001/openai/v1/".parse().unwrap();
        let uri = upstream_uri(&base, "/models", None).unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:9001/openai/v1/models");
    }
}
