//! The operator endpoints: `/healthz`, `/readyz`, `/metrics`,
//! `/admin/backends`, `/admin/cluster`, `/admin/reload`, and who may call
//! `/admin/*`.
//!
//! They only read shared state (the snapshot, the metrics) and never touch
//! the request path's data structures in a way a client could notice.

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use http::{header, HeaderValue, Response, StatusCode};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use crate::{
    api::{json_response, ApiError},
    body::GatewayBody,
    gateway::{ReloadError, Shared},
    headers::ClientHeaders,
    health::state::Tier,
    snapshot::Snapshot,
    upstream::codec::Name,
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

/// `GET /metrics`: Prometheus text format 0.0.4 (SPEC).
pub(crate) fn metrics(shared: &Shared) -> Response<GatewayBody> {
    let held = shared.body_budget.held();
    shared
        .metrics
        .buffered_body_bytes
        .set(i64::try_from(held).unwrap_or(i64::MAX));
    let mut response = Response::new(GatewayBody::full(shared.metrics.render()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    response
}

/// `GET /admin/backends`: per backend, its state in each tier, last probe
/// results, effective weight per model, in-flight count, latency EMA and
/// ejection state (SPEC "Precise points" shape), then, under `draining`,
/// the backends a reload removed that still have requests running, so an
/// operator can see when draining ends. Never includes a key.
pub(crate) fn backends(shared: &Shared) -> Response<GatewayBody> {
    let snapshot = shared.snapshot.load();
    let now = Instant::now();
    let wall = SystemTime::now();
    // Instants are process-relative; report deadlines as wall-clock times.
    let to_wall = |t: Instant| rfc3339(wall + t.saturating_duration_since(now));
    let slow_start = snapshot.config.health.slow_start;
    let backends: Vec<serde_json::Value> = snapshot
        .backends()
        .iter()
        .map(|b| {
            let health = b.live.health();
            let mut models = serde_json::Map::new();
            for name in &b.config.models {
                let weight = snapshot
                    .model(name)
                    .and_then(|route| route.members.iter().find(|m| Arc::ptr_eq(&m.backend, b)))
                    .map_or(0.0, |m| m.effective_weight);
                models.insert(
                    name.clone(),
                    serde_json::json!({ "effective_weight": weight_json(weight) }),
                );
            }
            let mut tiers = serde_json::Map::new();
            for tier in Tier::ALL {
                let t = health.tier(tier);
                let state = match (t.checked_at, t.down) {
                    // A backend a reload added, not seen alive yet: as
                    // `weir_backend_up{tier="liveness"}` says, not up.
                    _ if tier == Tier::Liveness && health.pending => "pending",
                    (None, _) => "unknown",
                    (Some(_), true) => "down",
                    (Some(_), false) if tier == Tier::Readiness && t.slow => "slow",
                    (Some(_), false) => "up",
                };
                let mut entry = serde_json::json!({
                    "state": state,
                    "last_latency_ms": t.last_latency.map(|d| d.as_secs_f64() * 1000.0),
                    "last_error": t.last_error,
                    "checked_at": t.checked_at.map(rfc3339),
                    "consecutive_passes": t.passes,
                    "consecutive_failures": t.failures,
                });
                if tier == Tier::Deep {
                    // A failing metrics_path does not fail the tier (the
                    // samples decide that), so it has a field of its own.
                    entry["metrics_error"] = health.metrics_error.clone().into();
                }
                tiers.insert(tier.as_str().to_owned(), entry);
            }
            let ejected_until = health.ejected_until.filter(|&t| t > now).map(to_wall);
            serde_json::json!({
                "name": b.config.name,
                "url": b.config.url.to_string(),
                "state": health.state(now).as_str(),
                "tiers": tiers,
                "models": models,
                "in_flight": b.in_flight(),
                // SPEC's shape has a number here: 0 until a request
                // through weir was answered by the backend.
                "latency_ema_ms": b.live.latency_ema_ms().unwrap_or(0.0),
                "ejected_until": ejected_until,
                "ejections": health.ejections,
                "rate_limited_until": health.rate_limited_until.filter(|&t| t > now).map(to_wall),
                // Null when no ramp applies, `slow_start = "0s"` included
                // (back_since + 0 would repeat ejected_until), and while
                // the backend is out (ejected, or its probes failing or
                // not passed yet): its ramp has not begun.
                "slow_start_until": health
                    .back_since
                    .filter(|&since| !slow_start.is_zero() && since <= now && !health.is_out())
                    .map(|t| t + slow_start)
                    .filter(|&t| t > now)
                    .map(to_wall),
                "tokens_per_sec": health.tokens_per_sec,
                "engine_saturated": health.saturated,
                "pending_first_probe": health.pending,
            })
        })
        .collect();
    // Removed by a reload, in no pool, but still serving requests that
    // began before it: listed apart, so `backends` keeps SPEC's shape.
    let draining: Vec<serde_json::Value> = snapshot
        .draining_backends()
        .map(|(d, in_flight)| {
            serde_json::json!({ "name": d.name, "url": d.url.to_string(), "in_flight": in_flight })
        })
        .collect();
    json_response(
        StatusCode::OK,
        serde_json::json!({ "backends": backends, "draining": draining }).to_string(),
    )
}

/// `GET /admin/cluster`: this replica's id, whether Redis is up, the
/// replicas alive, the last Redis error and each shared limit's lease
/// (docs/CLUSTER.md); `{"enabled": false}` without `[cluster]`. Never
/// includes the Redis URL.
pub(crate) fn cluster(shared: &Shared) -> Response<GatewayBody> {
    let status = shared.cluster.as_ref().map_or_else(
        || serde_json::json!({ "enabled": false }),
        |cluster| cluster.status(),
    );
    json_response(StatusCode::OK, status.to_string())
}

/// An effective weight as JSON: a whole number as an integer (`100`, as
/// configured weights are written), a fraction as one (`0.5`).
fn weight_json(weight: f64) -> serde_json::Value {
    // Below 2^53 every whole f64 is an exact integer; weights stay under
    // u32::MAX.
    if weight.fract() == 0.0 && (0.0..9.0e15).contains(&weight) {
        serde_json::Value::from(weight as u64)
    } else {
        serde_json::Value::from(weight)
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-23T10:44:48.123Z`.
fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `POST /admin/reload`: the reload's result; 400 with the errors when the
/// new file is invalid (the old config keeps serving), 503 when a shutdown
/// called the reload off (nothing was wrong with the request; the server
/// is going away, as a proxy answers while draining).
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
            let status = match e {
                ReloadError::ShuttingDown | ReloadError::Interrupted(_) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                _ => StatusCode::BAD_REQUEST,
            };
            json_response(
                status,
                serde_json::json!({ "result": "error", "errors": errors }).to_string(),
            )
        }
    }
}

/// SPEC "Admin": with `admin_token_env` set, `/admin/*` needs that Bearer
/// token (compared in constant time); without it, only loopback clients.
pub(crate) fn authorize(
    headers: &ClientHeaders,
    peer: SocketAddr,
    snapshot: &Snapshot,
) -> Result<(), ApiError> {
    match &snapshot.config.server.admin_token {
        Some(token) => {
            let sent = bearer_token(headers).unwrap_or_default();
            if bool::from(sent.ct_eq(token.expose().as_bytes())) {
                Ok(())
            } else {
                Err(ApiError::AdminUnauthorized)
            }
        }
        // On a dual-stack `[::]` listener an IPv4 client arrives as
        // `::ffff:127.0.0.1`, which is loopback only once made canonical.
        None if peer.ip().to_canonical().is_loopback() => Ok(()),
        None => Err(ApiError::AdminForbidden(
            "admin endpoints answer only loopback clients",
        )),
    }
}

/// The token of `Authorization: Bearer TOKEN`, if any.
pub(crate) fn bearer_token(headers: &ClientHeaders) -> Option<&[u8]> {
    let value = headers.get(Name::Authorization)?;
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, token) = (&value[..space], &value[space + 1..]);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| token.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, metrics::Metrics};
    use http::HeaderMap;

    fn snapshot(server: &str) -> Snapshot {
        let toml = format!(
            "[server]\n{server}\n[[models]]\nname = \"m\"\n\n[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n"
        );
        let env = |name: &str| (name == "TOKEN").then(|| "s3cret-token".to_owned());
        let config = Config::parse(&toml, "test.toml", &env).unwrap();
        Snapshot::build(Arc::new(config), None, &Metrics::new()).unwrap()
    }

    fn headers(authorization: &str) -> ClientHeaders {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(authorization).unwrap(),
        );
        ClientHeaders::Map(h)
    }

    fn none() -> ClientHeaders {
        ClientHeaders::Map(HeaderMap::new())
    }

    /// SPEC "Admin": without a token only loopback peers; with one, only
    /// the exact token, from anywhere.
    #[test]
    fn admin_needs_loopback_or_the_exact_token() {
        let loopback: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let v6_loopback: SocketAddr = "[::1]:5000".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        // What a dual-stack `[::]` listener reports for IPv4 peers.
        let mapped_loopback: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        let mapped_remote: SocketAddr = "[::ffff:10.1.2.3]:5000".parse().unwrap();
        let open = snapshot("");
        assert!(authorize(&none(), loopback, &open).is_ok());
        assert!(authorize(&none(), v6_loopback, &open).is_ok());
        assert!(authorize(&none(), mapped_loopback, &open).is_ok());
        assert!(authorize(&none(), remote, &open).is_err());
        assert!(authorize(&none(), mapped_remote, &open).is_err());
        assert!(authorize(&headers("Bearer anything"), remote, &open).is_err());

        let locked = snapshot("admin_token_env = \"TOKEN\"");
        assert!(authorize(&headers("Bearer s3cret-token"), remote, &locked).is_ok());
        assert!(authorize(&headers("bearer s3cret-token"), remote, &locked).is_ok());
        for wrong in [
            "Bearer s3cret-toke",
            "Bearer s3cret-token2",
            "Bearer ",
            "s3cret-token",
            "Basic s3cret-token",
            "Bearer S3CRET-TOKEN",
        ] {
            assert!(
                authorize(&headers(wrong), remote, &locked).is_err(),
                "{wrong}"
            );
        }
        // With a token, loopback alone is not enough.
        assert!(authorize(&none(), loopback, &locked).is_err());
    }
}
