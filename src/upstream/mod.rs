//! The clients that talk to backends.
//!
//! Only this module opens upstream connections. Each backend gets its own
//! client, so its `connect_timeout` applies and its pool of keep-alive
//! connections survives a reload that keeps the backend (the client lives in
//! the backend's carried-over state).
//!
//! * plain `http://` backends (inference servers beside weir, the hot path)
//!   use [`conn`]: HTTP/1.1 driven by the request's own task, the response
//!   body read straight from the backend's socket, idle connections in a
//!   [`pool`]. [`codec`] is its wire format.
//! * `https://` backends (hosted APIs) use hyper-util's pooled client with
//!   rustls (`ring` provider, webpki roots: weir needs neither OpenSSL nor
//!   the system's certificate store), which also speaks HTTP/2 where the
//!   server offers it. Private CAs are trusted beside the webpki roots
//!   through OpenSSL's `SSL_CERT_FILE` and `SSL_CERT_DIR`.
//!
//! It does not decide what to retry: it reports *how* an attempt failed
//! ([`AttemptError`]) and `proxy` decides from that alone. [`retry_after`]
//! reads a backend's `Retry-After` for the proxy and the health probes alike.

pub(crate) mod codec;
mod conn;
mod pool;
mod resolve;
pub(crate) mod retry_after;

use resolve::HostResolver;

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{uri::Scheme, HeaderValue, Method, Request, Response, Uri};

use crate::{headers::Upstream, metrics::FailureKind};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};

pub(crate) use conn::PlainClient;

/// A backend's client, by the scheme of its URL.
#[derive(Debug, Clone)]
pub(crate) enum HttpClient {
    /// `http://`: weir's own HTTP/1.1 client.
    Plain(PlainClient),
    /// `https://`: hyper-util with rustls (boxed: it is six times the
    /// size of the plain client, and built once per backend).
    Tls(Box<TlsClient>),
}

/// hyper-util's pooled client over rustls. Request bodies are the buffered
/// client body (`Full<Bytes>`).
pub(crate) type TlsClient = Client<HttpsConnector<HttpConnector<HostResolver>>, Full<Bytes>>;

/// A backend's response body, streamed as it arrives.
#[derive(Debug)]
pub enum UpstreamBody {
    /// Read by weir's own client from the backend's socket.
    Plain(conn::ResponseBody),
    /// Read through hyper-util.
    Tls(Incoming),
}

impl UpstreamBody {
    /// The response's headers as a plain backend sent them, when the
    /// response's map was left empty for them ([`conn::PlainClient::forward`]).
    pub(crate) fn raw_headers(&self) -> Option<&codec::RawHeaders> {
        match self {
            UpstreamBody::Plain(body) => Some(body.headers()),
            UpstreamBody::Tls(_) => None,
        }
    }

    /// Drops the headers kept by [`UpstreamBody::raw_headers`] once they
    /// have been written: they share the read buffer's allocation, which
    /// would otherwise stay alive as long as a long stream.
    pub(crate) fn release_raw_headers(&mut self) {
        if let UpstreamBody::Plain(body) = self {
            body.release_headers();
        }
    }
}

/// Why a backend's body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    /// The connection failed (reset, closed early).
    #[error("reading the upstream body: {0}")]
    Io(#[from] std::io::Error),
    /// The backend's framing was broken (bad chunk size, early close).
    #[error(transparent)]
    Malformed(#[from] codec::Malformed),
    /// hyper-util's client failed (https backends).
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// rustls refused the provider (never happens with `ring` and TLS 1.2/1.3,
    /// but it is a `Result` in rustls' API, so it is one here).
    #[error("tls setup failed: {0}")]
    Tls(String),
    /// A place `SSL_CERT_FILE` or `SSL_CERT_DIR` names for private CAs
    /// cannot be trusted (unreadable, or holds no certificate): a start or
    /// reload that needs it fails rather than serve a backend that could
    /// not be verified.
    #[error("{var}={}: {why}", path.display())]
    TrustedCa {
        /// `SSL_CERT_FILE` or `SSL_CERT_DIR`.
        var: &'static str,
        /// The file or directory it names, or the file in that directory.
        path: std::path::PathBuf,
        /// What is wrong with it.
        why: String,
    },
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
    /// A kept-alive connection closed, after the request was written,
    /// without a byte of answer: most often the backend closing it as it
    /// idled, just as weir reused it, but possibly a worker that read the
    /// request and died. Never re-sent to the same backend; retried
    /// elsewhere at once, and not held against the backend.
    #[error("kept-alive connection closed without an answer: {0}")]
    IdleClosed(String),
}

impl AttemptError {
    /// Its `kind` in `weir_upstream_errors_total` (and `reason` in
    /// `weir_retries_total`).
    pub(crate) fn kind(&self) -> FailureKind {
        match self {
            AttemptError::Refused(_) | AttemptError::Connect(_) => FailureKind::Connect,
            AttemptError::Timeout(_) => FailureKind::Timeout,
            AttemptError::Protocol(_) => FailureKind::Protocol,
            AttemptError::IdleClosed(_) => FailureKind::IdleClosed,
        }
    }
}

/// Builds the client for the backend at `url` with this connect timeout.
pub(crate) fn client(url: &Uri, connect_timeout: Duration) -> Result<HttpClient, UpstreamError> {
    if url.scheme() == Some(&Scheme::HTTPS) {
        tls_client(url.host().unwrap_or_default(), connect_timeout)
            .map(|c| HttpClient::Tls(Box::new(c)))
    } else {
        Ok(HttpClient::Plain(PlainClient::new(url, connect_timeout)))
    }
}

/// `host` as the URL writes it (see [`resolve::Resolver::new`]).
fn tls_client(host: &str, connect_timeout: Duration) -> Result<TlsClient, UpstreamError> {
    // The host's addresses from one shared lookup (`resolve.rs`).
    let mut http = HttpConnector::new_with_resolver(HostResolver::new(host));
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
        .pool_idle_timeout(pool::IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https))
}

/// A proxied request as the exchange holds it, borrowed: the plain client
/// writes it straight onto the wire (no `http::Request` built, no header
/// map copied per attempt); for https one is built from it.
pub(crate) struct Forward<'a> {
    /// The backend's URL (scheme, authority, base path).
    pub base: &'a Uri,
    /// The client's path after `/v1`.
    pub rest: &'a str,
    pub query: Option<&'a str>,
    /// The client's headers as they go upstream.
    pub headers: &'a Upstream<'a>,
    /// The backend's key.
    pub authorization: Option<&'a HeaderValue>,
    /// The body to send (possibly rewritten for this backend).
    pub body: Bytes,
}

impl Forward<'_> {
    /// The same request as an `http::Request` (POST), for hyper-util.
    fn to_request(&self) -> Result<Request<Bytes>, http::Error> {
        let mut request = Request::new(self.body.clone());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = upstream_uri(self.base, self.rest, self.query)?;
        // Without `Host` and the length: hyper sets both from the URI and
        // the body.
        *request.headers_mut() = self.headers.to_map();
        if let Some(key) = self.authorization {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, key.clone());
        }
        Ok(request)
    }
}

/// Sends a proxied request; the same contract as [`send`].
pub(crate) async fn forward(
    client: &HttpClient,
    request: &Forward<'_>,
    first_byte_timeout: Duration,
) -> Result<Response<UpstreamBody>, AttemptError> {
    match client {
        HttpClient::Plain(plain) => {
            let answer = tokio::time::timeout(first_byte_timeout, plain.forward(request)).await;
            plain_answer(first_byte_timeout, answer)
        }
        HttpClient::Tls(_) => {
            // The client's path was parsed as a URI by hyper already, so
            // joining it to a configured URL cannot fail in practice.
            let request = request
                .to_request()
                .map_err(|e| AttemptError::Protocol(format!("upstream uri: {e}")))?;
            // Boxed: hyper's request future is three times the size of the
            // plain client's, and every future that awaits this one would
            // otherwise carry (and move) its bytes on every request.
            Box::pin(send(client, request, first_byte_timeout)).await
        }
    }
}

/// Sends one request and waits at most `first_byte_timeout` for its
/// response headers (connecting included).
pub(crate) async fn send(
    client: &HttpClient,
    request: Request<Bytes>,
    first_byte_timeout: Duration,
) -> Result<Response<UpstreamBody>, AttemptError> {
    match client {
        HttpClient::Plain(plain) => {
            let answer = tokio::time::timeout(first_byte_timeout, plain.send(request)).await;
            plain_answer(first_byte_timeout, answer)
        }
        HttpClient::Tls(tls) => {
            let request = request.map(Full::new);
            match tokio::time::timeout(first_byte_timeout, tls.request(request)).await {
                Err(_) => Err(AttemptError::Timeout(first_byte_timeout)),
                Ok(Ok(response)) => {
                    // hyper read the head; weir's own client says so in
                    // `conn.rs`, before it parses one.
                    crate::busy_poll::head_read();
                    Ok(response.map(UpstreamBody::Tls))
                }
                Ok(Err(e)) if e.is_connect() && is_refused(&e) => {
                    Err(AttemptError::Refused(error_chain(&e)))
                }
                Ok(Err(e)) if e.is_connect() => Err(AttemptError::Connect(error_chain(&e))),
                Ok(Err(e)) => Err(AttemptError::Protocol(error_chain(&e))),
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        match self.get_mut() {
            UpstreamBody::Plain(body) => Pin::new(body).poll_frame(cx),
            UpstreamBody::Tls(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyReadError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Plain(body) => body.is_end_stream(),
            UpstreamBody::Tls(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Plain(body) => body.size_hint(),
            UpstreamBody::Tls(body) => body.size_hint(),
        }
    }
}

/// The upstream URI: the backend's base URL followed by the client's path
/// after `/v1`, with the query string (SPEC "Paths").
pub(crate) fn upstream_uri(
    base: &Uri,
    rest: &str,
    query: Option<&str>,
) -> Result<Uri, http::Error> {
    let pieces = target_pieces(base, rest, query);
    let path_and_query: String = pieces.concat();
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse()?);
    Ok(Uri::from_parts(parts)?)
}

/// The upstream request target in pieces, written one after the other:
/// the base URL's path without its trailing `/`, the client's path after
/// `/v1`, and `?query` when there is one. The one joining rule for both
/// [`upstream_uri`] and the plain client's request line.
pub(crate) fn target_pieces<'a>(
    base: &'a Uri,
    rest: &'a str,
    query: Option<&'a str>,
) -> [&'a str; 4] {
    let (mark, query) = match query {
        Some(q) => ("?", q),
        None => ("", ""),
    };
    [base.path().trim_end_matches('/'), rest, mark, query]
}

/// The plain client's answer within `first_byte_timeout`, in the shape
/// [`send`] returns. A plain function over the awaited result, not an async
/// wrapper: an async fn taking the call's future would hold it twice.
fn plain_answer(
    first_byte_timeout: Duration,
    answer: Result<Result<Response<conn::ResponseBody>, AttemptError>, tokio::time::error::Elapsed>,
) -> Result<Response<UpstreamBody>, AttemptError> {
    match answer {
        Err(_) => Err(AttemptError::Timeout(first_byte_timeout)),
        Ok(result) => result.map(|r| r.map(UpstreamBody::Plain)),
    }
}

/// The rustls client configuration, built once, from the process
/// environment, when the first https backend's client is built (at start,
/// or at the reload that adds the first one): loading the roots and the
/// provider is the expensive part of a connector. A failure is not kept, so
/// a later reload tries again; a success is kept until weir stops.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, UpstreamError> {
    static TLS: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    if let Some(config) = TLS.get() {
        return Ok(config.clone());
    }
    let config = tls_config_from(&crate::config::process_env)?;
    Ok(TLS.get_or_init(|| Arc::new(config)).clone())
}

/// The rustls client configuration for the environment `env` (injected so
/// tests never touch the process's): the webpki roots, plus the CAs of
/// `SSL_CERT_FILE` and `SSL_CERT_DIR` ([`private_cas`]), so a backend behind
/// a private CA can be trusted without a config key of its own.
fn tls_config_from(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<rustls::ClientConfig, UpstreamError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for mut source in private_cas(env)? {
        let (added, ignored) = roots.add_parsable_certificates(std::mem::take(&mut source.certs));
        if added == 0 {
            return Err(source.refused("holds no certificate rustls can use as a CA"));
        }
        if ignored > 0 {
            tracing::warn!(
                "{}={}: {ignored} of its certificates cannot be used as a CA and are not trusted",
                source.var,
                source.path.display()
            );
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| UpstreamError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// OpenSSL's variable for one PEM bundle of trusted CAs.
const SSL_CERT_FILE: &str = "SSL_CERT_FILE";
/// OpenSSL's variable for directories of PEM files of trusted CAs
/// (`:`-separated).
const SSL_CERT_DIR: &str = "SSL_CERT_DIR";

/// The certificates of one place `SSL_CERT_FILE` or `SSL_CERT_DIR` names,
/// kept with that place so an error can say which to fix.
struct CaSource {
    var: &'static str,
    path: std::path::PathBuf,
    certs: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl CaSource {
    /// The error saying why this source cannot be trusted.
    fn refused(&self, why: impl Into<String>) -> UpstreamError {
        UpstreamError::TrustedCa {
            var: self.var,
            path: self.path.clone(),
            why: why.into(),
        }
    }
}

/// The PEM certificates of `SSL_CERT_FILE` and of every file in each
/// directory of `SSL_CERT_DIR`, the convention of OpenSSL, curl and the
/// `rediss://` client (an empty value counts as unset). The file must hold
/// one; a directory must hold one among its files (subdirectories,
/// dangling links and files without a certificate are passed over, as
/// `/etc/ssl/certs` has all three). A file that cannot be read, or a
/// certificate section that is not valid PEM, is an error naming the file.
fn private_cas(env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<CaSource>, UpstreamError> {
    let mut sources = Vec::new();
    if let Some(file) = env(SSL_CERT_FILE).filter(|v| !v.is_empty()) {
        let mut source = CaSource {
            var: SSL_CERT_FILE,
            path: file.into(),
            certs: Vec::new(),
        };
        source.certs = pem_certificates(&source.path).map_err(|why| source.refused(why))?;
        if source.certs.is_empty() {
            return Err(source.refused(NO_PEM_CERTIFICATE));
        }
        sources.push(source);
    }
    let dirs = env(SSL_CERT_DIR).unwrap_or_default();
    for dir in std::env::split_paths(&dirs).filter(|d| !d.as_os_str().is_empty()) {
        let mut source = CaSource {
            var: SSL_CERT_DIR,
            path: dir,
            certs: Vec::new(),
        };
        let files = pem_files(&source.path).map_err(|why| source.refused(why))?;
        for file in files {
            let certs = pem_certificates(&file).map_err(|why| UpstreamError::TrustedCa {
                var: SSL_CERT_DIR,
                path: file.clone(),
                why,
            })?;
            source.certs.extend(certs);
        }
        if source.certs.is_empty() {
            return Err(source.refused(format!("no file in it {NO_PEM_CERTIFICATE}")));
        }
        // `openssl rehash` links each certificate under its hash beside
        // its own name, so a directory names most of them twice.
        source
            .certs
            .sort_unstable_by(|a, b| a.as_ref().cmp(b.as_ref()));
        source.certs.dedup_by(|a, b| a.as_ref() == b.as_ref());
        sources.push(source);
    }
    Ok(sources)
}

/// Why a file (or directory) of CAs is refused when it holds none.
const NO_PEM_CERTIFICATE: &str = "holds no PEM certificate (-----BEGIN CERTIFICATE-----)";

/// The files in `dir`, links followed, in name order.
fn pem_files(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read the directory: {e}"))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot read the directory: {e}"))?
            .path();
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => files.push(path),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
    }
    files.sort_unstable();
    Ok(files)
}

/// The `CERTIFICATE` sections of the PEM file at `path` (other sections
/// and text between them are passed over).
fn pem_certificates(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not valid PEM: {e}"))
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
    use http::HeaderMap;

    #[test]
    fn a_forward_becomes_the_same_request_for_hyper_util() {
        let base: Uri = "https://api.example.com/openai/v1/".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("client"));
        headers.insert("authorization", HeaderValue::from_static("Bearer client"));
        headers.insert("host", HeaderValue::from_static("weir.local"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        let client = crate::headers::ClientHeaders::Map(headers);
        let id = HeaderValue::from_static("r1");
        let upstream = crate::headers::Upstream {
            client: &client,
            request_id: &id,
        };
        let key = HeaderValue::from_static("Bearer sk-backend");
        let forward = Forward {
            base: &base,
            rest: "/chat/completions",
            query: Some("a=1"),
            headers: &upstream,
            authorization: Some(&key),
            body: Bytes::from_static(b"{}"),
        };
        let request = forward.to_request().unwrap();
        assert_eq!(request.method(), Method::POST);
        assert_eq!(
            request.uri().to_string(),
            "https://api.example.com/openai/v1/chat/completions?a=1"
        );
        assert_eq!(request.headers()["x-request-id"], "r1");
        assert_eq!(request.headers()["authorization"], "Bearer sk-backend");
        assert_eq!(request.headers()["x-kept"], "1");
        assert_eq!(request.headers()["accept-encoding"], "identity");
        assert_eq!(request.headers().len(), 4, "{:?}", request.headers());
        assert_eq!(request.body(), "{}");
    }

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

    /// tests/fixtures/redis-tls/NAME: a test CA and a certificate it signed
    /// for 127.0.0.1 (the `https://` backend test in tests/process.rs uses
    /// them too).
    fn fixture(name: &str) -> String {
        format!(
            "{}/tests/fixtures/redis-tls/{name}",
            env!("CARGO_MANIFEST_DIR")
        )
    }

    /// An environment holding only `vars`.
    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    /// The error message for `vars`, which must fail.
    fn refused(vars: &[(&str, &str)]) -> String {
        match tls_config_from(&env_of(vars)) {
            Ok(_) => panic!("{vars:?} was trusted"),
            Err(e) => e.to_string(),
        }
    }

    /// How many CAs beside the webpki roots `vars` trusts.
    fn private_ca_count(vars: &[(&str, &str)]) -> usize {
        let sources = private_cas(&env_of(vars)).unwrap();
        sources.iter().map(|s| s.certs.len()).sum()
    }

    #[test]
    fn without_ssl_cert_file_or_dir_only_the_webpki_roots_are_trusted() {
        assert_eq!(private_ca_count(&[]), 0);
        assert_eq!(
            private_ca_count(&[("SSL_CERT_FILE", ""), ("SSL_CERT_DIR", "")]),
            0
        );
        assert!(tls_config_from(&env_of(&[])).is_ok());
    }

    #[test]
    fn ssl_cert_file_and_every_file_in_ssl_cert_dir_are_trusted() {
        let ca = fixture("ca.pem");
        assert_eq!(private_ca_count(&[("SSL_CERT_FILE", &ca)]), 1);
        assert!(tls_config_from(&env_of(&[("SSL_CERT_FILE", &ca)])).is_ok());
        // A directory as /etc/ssl/certs has it: the CA under its name and
        // a hash link, a subdirectory, a file without a certificate and a
        // dangling link, all passed over but the one CA (counted once).
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(&ca, dir.path().join("weir-test-ca.pem")).unwrap();
        std::os::unix::fs::symlink("weir-test-ca.pem", dir.path().join("1a2b3c4d.0")).unwrap();
        std::os::unix::fs::symlink("gone.pem", dir.path().join("5e6f7a8b.0")).unwrap();
        std::fs::create_dir(dir.path().join("java")).unwrap();
        std::fs::write(dir.path().join("README"), "not a certificate\n").unwrap();
        let path = dir.path().to_str().unwrap();
        assert_eq!(private_ca_count(&[("SSL_CERT_DIR", path)]), 1);
        // Several directories, `:`-separated, as OpenSSL takes them.
        let other = tempfile::tempdir().unwrap();
        std::fs::copy(fixture("server.pem"), other.path().join("leaf.pem")).unwrap();
        let both = format!("{path}:{}", other.path().display());
        assert_eq!(private_ca_count(&[("SSL_CERT_DIR", &both)]), 2);
        assert_eq!(
            private_ca_count(&[("SSL_CERT_FILE", &ca), ("SSL_CERT_DIR", &both)]),
            3,
            "the file and the directories are read each for itself"
        );
        assert!(tls_config_from(&env_of(&[("SSL_CERT_DIR", &both)])).is_ok());
    }

    #[test]
    fn a_ca_file_or_dir_that_cannot_be_trusted_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let missing = missing.to_str().unwrap();
        let e = refused(&[("SSL_CERT_FILE", missing)]);
        assert!(
            e.starts_with(&format!("SSL_CERT_FILE={missing}: cannot read it")),
            "{e}"
        );
        let text = dir.path().join("text.pem");
        std::fs::write(&text, "no certificate here\n").unwrap();
        let text = text.to_str().unwrap();
        let e = refused(&[("SSL_CERT_FILE", text)]);
        assert_eq!(
            e,
            format!("SSL_CERT_FILE={text}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        );
        // A key is not a certificate.
        let key = fixture("server-key.pem");
        let e = refused(&[("SSL_CERT_FILE", &key)]);
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
        let broken = broken.to_str().unwrap();
        let e = refused(&[("SSL_CERT_FILE", broken)]);
        assert!(
            e.starts_with(&format!("SSL_CERT_FILE={broken}: not valid PEM")),
            "{e}"
        );
        // Valid PEM around bytes that are no certificate.
        let junk = dir.path().join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let junk = junk.to_str().unwrap();
        let e = refused(&[("SSL_CERT_FILE", junk)]);
        assert!(
            e.starts_with(&format!(
                "SSL_CERT_FILE={junk}: holds no certificate rustls"
            )),
            "{e}"
        );
        // A directory: missing, without a certificate, or with a broken file
        // (named, not its directory).
        let e = refused(&[("SSL_CERT_DIR", missing)]);
        assert!(
            e.starts_with(&format!(
                "SSL_CERT_DIR={missing}: cannot read the directory"
            )),
            "{e}"
        );
        let empty = tempfile::tempdir().unwrap();
        std::fs::write(empty.path().join("README"), "nothing\n").unwrap();
        let empty = empty.path().to_str().unwrap();
        let e = refused(&[("SSL_CERT_DIR", empty)]);
        assert!(
            e.starts_with(&format!("SSL_CERT_DIR={empty}: no file in it holds")),
            "{e}"
        );
        let e = refused(&[("SSL_CERT_DIR", dir.path().to_str().unwrap())]);
        assert!(
            e.starts_with(&format!("SSL_CERT_DIR={broken}: not valid PEM")),
            "{e}"
        );
    }
}
