//! One proxied request, phase by phase: read the body, learn its facts,
//! pick a backend, forward, retry while nothing reached the client, stream
//! the answer back.
//!
//! Phases are plain function calls on owned, typed values (pingora's
//! request phases, without the plug-in points): [`forward`] reads top to
//! bottom like SPEC's "Semantics users rely on". Retry eligibility is data:
//! an attempt fails with an [`AttemptError`] (nothing sent to the client
//! yet) or answers a status weir may retry elsewhere; once a response is
//! handed to the client it is never replayed.

use std::time::Duration;

use bytes::Bytes;
use http::{header, request::Parts, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use crate::{
    admin::bearer_token,
    api::{facts, json_response, ApiError},
    body::{GatewayBody, ProxiedBody},
    gateway::Shared,
    headers,
    metrics::UpstreamErrorLabels,
    server::RequestLog,
    snapshot::{model_object, Member, ModelRoute, Snapshot},
    upstream::{self, AttemptError},
};

/// Why the last attempt did not produce the client's answer.
#[derive(Debug)]
enum Failure {
    /// The attempt failed before any response (connect, reset, timeout).
    Attempt(AttemptError),
}

/// SPEC "Admin"/401: when `api_keys_env` is set, the client must send one of
/// those keys as a Bearer token (or `x-api-key`), compared in constant time.
pub(crate) fn authorize(headers: &HeaderMap, snapshot: &Snapshot) -> Result<(), ApiError> {
    let Some(keys) = &snapshot.config.server.api_keys else {
        return Ok(());
    };
    let sent = bearer_token(headers)
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .unwrap_or_default();
    // Compare against every key, so the time taken does not say which
    // (or whether any) prefix matched.
    let matched = keys.iter().fold(subtle::Choice::from(0), |acc, k| {
        acc | sent.as_bytes().ct_eq(k.expose().as_bytes())
    });
    if bool::from(matched) {
        Ok(())
    } else {
        Err(ApiError::InvalidApiKey)
    }
}

/// `GET /v1/models` and `GET /v1/models/{id}`, answered by weir itself.
pub(crate) fn models(path: &str, snapshot: &Snapshot) -> Result<Response<GatewayBody>, ApiError> {
    if path == "/v1/models" {
        return Ok(json_response(StatusCode::OK, snapshot.models_list()));
    }
    match path.strip_prefix("/v1/models/") {
        Some(id) if snapshot.config.model(id).is_some() => {
            Ok(json_response(StatusCode::OK, model_object(id).to_string()))
        }
        Some(id) => Err(ApiError::ModelNotFound(id.to_owned())),
        None => Err(ApiError::UnknownRoute {
            method: "GET".to_owned(),
            path: path.to_owned(),
        }),
    }
}

/// Proxies one `POST /v1/*` request.
pub(crate) async fn forward(
    req: Request<Incoming>,
    shared: &Shared,
    snapshot: &Snapshot,
    request_id: &HeaderValue,
    log: &mut RequestLog,
) -> Result<Response<GatewayBody>, ApiError> {
    let server = &snapshot.config.server;
    let deadline = Instant::now() + server.request_timeout;
    let (parts, body) = req.into_parts();
    let body = read_body(&parts, body, server.max_body_bytes, deadline).await?;
    let facts = facts::parse(&body)?;
    log.model = Some(facts.model.clone());
    let route = snapshot
        .model(&facts.model)
        .ok_or_else(|| ApiError::ModelNotFound(facts.model.clone()))?;
    let upstream_headers = upstream_headers(parts.headers, request_id);
    let exchange = Exchange {
        shared,
        route,
        rest: parts.uri.path().strip_prefix("/v1").unwrap_or(""),
        query: parts.uri.query(),
        headers: &upstream_headers,
        body: &body,
        deadline,
        first_byte_timeout: server.first_byte_timeout,
        max_attempts: snapshot.config.retry.max_attempts.get(),
    };
    exchange.run(log).await
}

/// Everything the attempts of one request share.
struct Exchange<'a> {
    shared: &'a Shared,
    route: &'a ModelRoute,
    /// The client's path after `/v1`.
    rest: &'a str,
    query: Option<&'a str>,
    /// Client headers, cleaned for upstream, without the backend's key.
    headers: &'a HeaderMap,
    /// The client's body as received.
    body: &'a Bytes,
    /// `request_timeout` from the start of the request.
    deadline: Instant,
    first_byte_timeout: Duration,
    max_attempts: u32,
}

impl Exchange<'_> {
    /// Attempts up to `max_attempts` backends, each a different one while
    /// another is eligible, and returns the first answer that may go to
    /// the client.
    async fn run(&self, log: &mut RequestLog) -> Result<Response<GatewayBody>, ApiError> {
        let members = &self.route.members;
        let mut tried: Vec<usize> = Vec::with_capacity(self.max_attempts as usize);
        let mut last: Option<Failure> = None;
        for attempt in 1..=self.max_attempts {
            let eligible = |i: usize, tried: &[usize]| {
                !tried.contains(&i) && members.get(i).is_some_and(|m| !m.backend.is_saturated())
            };
            let Some(i) = self.route.pool.pick(|i| eligible(i, &tried)) else {
                break;
            };
            tried.push(i);
            let Some(member) = members.get(i) else { break };
            let Some(in_flight) = member.backend.try_begin() else {
                continue;
            };
            log.attempts = attempt;
            log.backend = Some(member.backend.config.name.clone());
            let remaining = self.deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ApiError::UpstreamTimeout(self.first_byte_timeout));
            }
            let request = self.request_for(member)?;
            let wait = self.first_byte_timeout.min(remaining);
            match upstream::send(&member.backend.client, request, wait).await {
                Ok(response) => {
                    let status = response.status();
                    let another = (0..members.len())
                        .any(|j| eligible(j, &tried) && self.route.pool.weight(j) > 0);
                    if is_retryable(status) && attempt < self.max_attempts && another {
                        let kind = if status == StatusCode::TOO_MANY_REQUESTS {
                            "status_429"
                        } else {
                            "status_5xx"
                        };
                        self.count_error(member, kind);
                        continue;
                    }
                    return Ok(respond(response, member, in_flight, self.deadline));
                }
                Err(e) => {
                    tracing::debug!(backend = %member.backend.config.name, error = %e, "attempt failed");
                    self.count_error(member, e.kind());
                    last = Some(Failure::Attempt(e));
                }
            }
        }
        Err(match last {
            None => ApiError::NoHealthyBackend(self.route.config.name.clone()),
            Some(Failure::Attempt(AttemptError::Timeout(d))) => ApiError::UpstreamTimeout(d),
            Some(Failure::Attempt(e)) => ApiError::BadGateway {
                model: self.route.config.name.clone(),
                detail: e.to_string(),
            },
        })
    }

    /// The upstream request for one attempt: the backend's URL and key, the
    /// original body unless the backend renames the model.
    fn request_for(&self, member: &Member) -> Result<Request<Full<Bytes>>, ApiError> {
        let backend = &member.backend;
        let uri = upstream::upstream_uri(&backend.config.url, self.rest, self.query)
            .map_err(|e| ApiError::Internal(format!("upstream uri: {e}")))?;
        let body = match &member.upstream_model {
            Some(model) => {
                facts::rewrite(self.body, Some(model), false)?.unwrap_or_else(|| self.body.clone())
            }
            None => self.body.clone(),
        };
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = self.headers.clone();
        if let Some(key) = &backend.authorization {
            request
                .headers_mut()
                .insert(header::AUTHORIZATION, key.clone());
        }
        Ok(request)
    }

    fn count_error(&self, member: &Member, kind: &'static str) {
        self.shared
            .metrics
            .upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                backend: member.backend.config.name.clone(),
                kind,
            })
            .inc();
    }
}

/// An upstream 429 or 5xx is retried elsewhere (SPEC "Errors").
fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// The client's response: the backend's status and headers (hop-by-hop
/// removed, `x-weir-backend` added) and its body streamed through.
fn respond(
    response: Response<Incoming>,
    member: &Member,
    in_flight: crate::snapshot::InFlight,
    deadline: Instant,
) -> Response<GatewayBody> {
    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if sse {
        // weir may append an SSE error event, so the length is not known.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    parts
        .headers
        .insert("x-weir-backend", member.backend.name_header.clone());
    let body = ProxiedBody::new(
        body,
        in_flight,
        Box::pin(tokio::time::sleep_until(deadline)),
        sse,
    );
    Response::from_parts(parts, GatewayBody::Proxied(body))
}

/// Client headers as the backend should see them (no key yet).
fn upstream_headers(mut headers: HeaderMap, request_id: &HeaderValue) -> HeaderMap {
    headers::to_upstream(&mut headers, None);
    headers.insert("x-request-id", request_id.clone());
    headers
}

/// Reads the whole request body, refusing it as soon as it is known to be
/// larger than `limit` (413 without reading the rest) and bounding the wait
/// by `request_timeout`.
async fn read_body(
    parts: &Parts,
    body: Incoming,
    limit: usize,
    deadline: Instant,
) -> Result<Bytes, ApiError> {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    match tokio::time::timeout_at(deadline, Limited::new(body, limit).collect()).await {
        Err(_) => Err(ApiError::BodyTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::BodyTooLarge { limit })
        }
        Ok(Err(e)) => Err(ApiError::BodyRead(e.to_string())),
    }
}
