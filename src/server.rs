//! Accepting connections and routing requests.
//!
//! One accept loop per listener (the public one and, when configured, the
//! admin one), hyper-util's auto builder for HTTP/1.1 and h2c, graceful
//! shutdown through `hyper_util::server::graceful`. Routing is a plain match
//! on method and path (SPEC "HTTP surface"); the `/v1` inference routes go to
//! [`crate::proxy`], the operator routes to [`crate::admin`].
//!
//! This module enforces the connection-level limits (header read timeout,
//! `max_connections`, path rules, request ids); it does not read bodies.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http::{HeaderValue, Method, Request, Response};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    access_log::{AccessLog, Ending},
    admin,
    api::ApiError,
    body::GatewayBody,
    gateway::Shared,
    proxy,
};

pub(crate) use crate::reload::reload;

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// `/v1/*`, `/healthz`, `/readyz` (an `admin_listen` is configured).
    Public,
    /// `/metrics`, `/admin/*`, `/healthz`, `/readyz`.
    Admin,
    /// Everything (no `admin_listen`).
    Both,
}

/// Request headers in all beyond which hyper answers 431 (SPEC: 64 KiB).
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// How long the accept loop backs off after an accept error such as EMFILE,
/// instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves one listener until `shutdown` is cancelled, then lets open
/// connections finish within `shutdown_grace`.
pub(crate) async fn serve(
    listener: TcpListener,
    role: Role,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let server_config = shared.snapshot.load().config.server.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server_config.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES + 8 * 1024)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX))
        .keep_alive_interval(None);
    let graceful = GracefulShutdown::new();
    loop {
        // Wait for a connection slot before accepting, so connections beyond
        // `max_connections` wait in the kernel's backlog instead of spinning.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = shared.connections.clone().acquire_owned() => match permit {
                Ok(p) => p,
                // The semaphore is never closed; if it were, stop serving.
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let service = service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(route(req, &shared, peer, role).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        // Connections are tracked by `graceful` (which waits for them on
        // shutdown), not by a JoinSet that would grow with every connection.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let grace = shared.snapshot.load().config.server.shutdown_grace;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "shutdown grace passed with connections still open; closing them"
        );
    }
}

/// Routes one request and stamps `x-request-id` on its response. The
/// access log line is written here for weir's own answers, and by the body
/// when it ends for proxied ones.
async fn route(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    peer: SocketAddr,
    role: Role,
) -> Response<GatewayBody> {
    let request_id = request_id(req.headers().get("x-request-id"));
    let mut log = AccessLog::new(
        request_id.clone(),
        req.method().clone(),
        req.uri().path().to_owned(),
    );
    let mut response = match dispatch(req, shared, peer, role, &request_id, &mut log).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    response.headers_mut().insert("x-request-id", request_id);
    log.status = response.status().as_u16();
    match response.body_mut() {
        GatewayBody::Proxied(body) => body.attach_log(log, shared.clone()),
        GatewayBody::Full(_) => log.emit(&shared.metrics, Ending::Complete),
    }
    response
}

async fn dispatch(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    peer: SocketAddr,
    role: Role,
    request_id: &HeaderValue,
    log: &mut AccessLog,
) -> Result<Response<GatewayBody>, ApiError> {
    let path = req.uri().path();
    check_path(path)?;
    // Loaded once: the whole request sees one routing state.
    let snapshot = shared.snapshot.load_full();
    let public = role != Role::Admin;
    let operator = role != Role::Public;
    match path {
        "/healthz" => only(&req, &Method::GET).map(|()| admin::healthz()),
        "/readyz" => only(&req, &Method::GET).map(|()| admin::readyz(shared)),
        "/metrics" if operator => only(&req, &Method::GET).map(|()| admin::metrics(shared)),
        p if operator && p.starts_with("/admin/") => {
            admin::authorize(req.headers(), peer, &snapshot)?;
            match p {
                "/admin/backends" => only(&req, &Method::GET).map(|()| admin::backends(shared)),
                "/admin/reload" => {
                    only(&req, &Method::POST)?;
                    Ok(admin::reload_response(reload(shared).await))
                }
                _ => Err(unknown(&req)),
            }
        }
        p if public && (p == "/v1" || p.starts_with("/v1/")) => {
            proxy::authorize(req.headers(), &snapshot)?;
            if req.method() == Method::GET {
                return proxy::models(p, &snapshot);
            }
            if req.method() != Method::POST {
                return Err(ApiError::MethodNotAllowed(req.method().to_string()));
            }
            proxy::forward(req, shared, &snapshot, request_id, log).await
        }
        _ => Err(unknown(&req)),
    }
}

/// 405 unless the request uses `method`.
fn only(req: &Request<Incoming>, method: &Method) -> Result<(), ApiError> {
    if req.method() == method {
        Ok(())
    } else {
        Err(ApiError::MethodNotAllowed(req.method().to_string()))
    }
}

fn unknown(req: &Request<Incoming>) -> ApiError {
    ApiError::UnknownRoute {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
    }
}

/// SPEC "Paths": a path with `.` or `..` segments (also percent-encoded) or
/// an empty segment is refused, so no backend ever sees a path that a
/// normalising server would resolve differently from weir.
pub(crate) fn check_path(path: &str) -> Result<(), ApiError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(ApiError::BadPath("the path must start with /"));
    };
    for segment in rest.split('/') {
        if segment.is_empty() {
            return Err(ApiError::BadPath("empty path segment"));
        }
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        if decoded == "." || decoded == ".." {
            return Err(ApiError::BadPath("dot segments are not allowed"));
        }
    }
    Ok(())
}

/// The client's `x-request-id` when it is 1-128 visible ASCII characters,
/// otherwise a fresh random one (SPEC "Request ids").
fn request_id(client: Option<&HeaderValue>) -> HeaderValue {
    if let Some(value) = client {
        let bytes = value.as_bytes();
        if (1..=128).contains(&bytes.len()) && bytes.iter().all(|b| b.is_ascii_graphic()) {
            return value.clone();
        }
    }
    let id: u128 = rand::random();
    HeaderValue::try_from(format!("{id:032x}")).unwrap_or(HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_rules() {
        for ok in [
            "/v1/chat/completions",
            "/healthz",
            "/v1/models/gpt-4.1",
            "/v1/a.b",
        ] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/v1/../admin/backends",
            "/v1/./models",
            "/v1/%2e%2e/admin",
            "/v1/%2E./x",
            "/v1//models",
            "/v1/models/",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        let good = HeaderValue::from_static("abc-123");
        assert_eq!(request_id(Some(&good)), good);
        let spaced = HeaderValue::from_static("has space");
        assert_ne!(request_id(Some(&spaced)), spaced);
        let long = HeaderValue::try_from("x".repeat(129)).unwrap();
        assert_eq!(request_id(Some(&long)).len(), 32);
        assert_eq!(request_id(None).len(), 32);
    }
}
