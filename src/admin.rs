//! The operator endpoints: `/healthz`, `/readyz`, `/metrics`,
//! `/admin/backends`, `/admin/reload`, and who may call `/admin/*`.
//!
//! They only read shared state (the snapshot, the metrics) and never touch
//! the request path's data structures in a way a client could notice.

use std::net::SocketAddr;

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use subtle::ConstantTimeEq;

use crate::{
    api::{json_response, ApiError},
    body::GatewayBody,
    gateway::{ReloadError, Shared},
    snapshot::Snapshot,
};

/// `GET /healthz`: 200 while the process runs.
pub(crate) fn healthz() -> Response<GatewayBody> {
    json_response(StatusCode::OK, r#"{"status":"ok"}"#)
}

/// `GET /readyz`: 200 when every configured model has a backend in
/// rotation, else 503 naming the models that have none.
pub(crate) fn readyz(shared: &Shared) -> Response<GatewayBody> {
    let snapshot = shared.snapshot.load();
    let missing = snapshot.models_without_backend();
    if missing.is_empty() {
        json_response(StatusCode::OK, r#"{"status":"ready"}"#)
    } else {
        let body = serde_json::json!({ "status": "not_ready", "models_without_backend": missing });
        json_response(StatusCode::SERVICE_UNAVAILABLE, body.to_string())
    }
}

/// `GET /metrics`: Prometheus text.
pub(crate) fn metrics(shared: &Shared) -> Response<GatewayBody> {
    let mut response = Response::new(GatewayBody::full(shared.metrics.render()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// `GET /admin/backends`: per backend, its state, weights and in-flight
/// count (SPEC "Precise points" shape). Never includes a key.
pub(crate) fn backends(shared: &Shared) -> Response<GatewayBody> {
    let snapshot = shared.snapshot.load();
    let backends: Vec<serde_json::Value> = snapshot
        .backends()
        .iter()
        .map(|b| {
            let mut models = serde_json::Map::new();
            for name in &b.config.models {
                let weight = snapshot
                    .model(name)
                    .and_then(|route| {
                        route
                            .members
                            .iter()
                            .find(|m| std::sync::Arc::ptr_eq(&m.backend, b))
                    })
                    .map_or(0, |m| m.effective_weight);
                models.insert(
                    name.clone(),
                    serde_json::json!({ "effective_weight": weight }),
                );
            }
            serde_json::json!({
                "name": b.config.name,
                "url": b.config.url.to_string(),
                "state": "healthy",
                "tiers": {},
                "models": models,
                "in_flight": b.in_flight(),
                "latency_ema_ms": null,
                "ejected_until": null,
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        serde_json::json!({ "backends": backends }).to_string(),
    )
}

/// `POST /admin/reload`: the reload's result; 400 with the errors when the
/// new file is invalid (the old config keeps serving).
pub(crate) fn reload_response(result: Result<Vec<String>, ReloadError>) -> Response<GatewayBody> {
    match result {
        Ok(changes) => json_response(
            StatusCode::OK,
            serde_json::json!({ "result": "ok", "changes": changes }).to_string(),
        ),
        Err(e) => {
            let errors: Vec<String> = match &e {
                ReloadError::Invalid(errors) => errors.0.iter().map(ToString::to_string).collect(),
                other => vec![other.to_string()],
            };
            json_response(
                StatusCode::BAD_REQUEST,
                serde_json::json!({ "result": "error", "errors": errors }).to_string(),
            )
        }
    }
}

/// SPEC "Admin": with `admin_token_env` set, `/admin/*` needs that Bearer
/// token (compared in constant time); without it, only loopback clients.
pub(crate) fn authorize(
    headers: &HeaderMap,
    peer: SocketAddr,
    snapshot: &Snapshot,
) -> Result<(), ApiError> {
    match &snapshot.config.server.admin_token {
        Some(token) => {
            let sent = bearer_token(headers).unwrap_or_default();
            if bool::from(sent.as_bytes().ct_eq(token.expose().as_bytes())) {
                Ok(())
            } else {
                Err(ApiError::AdminForbidden("a valid admin token is required"))
            }
        }
        None if peer.ip().is_loopback() => Ok(()),
        None => Err(ApiError::AdminForbidden(
            "admin endpoints answer only loopback clients",
        )),
    }
}

/// The token of `Authorization: Bearer TOKEN`, if any.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}
