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

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use crate::server::{lingering, ClientBody, ClientHead, RequestBodyError, LINGER_BYTES};
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    access_log::AccessLog,
    admin::bearer_token,
    admission::{
        limiter::{self, AdmitError, Admitted, LimitKind},
        tokens::{self, UsageFilter, UsageTail},
    },
    api::{facts, json_response, ApiError, Endpoint},
    body::{settle_cut, Accounting, AnsweredBy, GatewayBody, ProxiedBody, UsageReader},
    body_budget::{self, BodyBudget, Room},
    gateway::Shared,
    headers::{self, ClientHeaders, Upstream},
    health::outlier::{self, Outcome},
    jitter,
    metrics::FailureKind,
    slots::{BackendId, InLine},
    snapshot::{model_object, BackendState, InFlight, Member, ModelRoute, Place, Snapshot},
    upstream::{
        self,
        codec::{self, Name},
        retry_after::{retry_after, retry_after_given},
        AttemptError, Forward, UpstreamBody,
    },
};

/// Why the last attempt did not produce the client's answer.
#[derive(Debug)]
enum Failure {
    /// The attempt failed before any response (connect, reset, timeout).
    Attempt(AttemptError),
    /// The backend answered 429 or 5xx, and no retry was left.
    Status(StatusCode),
}

impl Failure {
    /// What went wrong, for the client's error message (no secrets).
    fn detail(&self) -> String {
        match self {
            Self::Attempt(e) => e.to_string(),
            Self::Status(status) => format!("the last backend answered {}", status.as_u16()),
        }
    }
}

/// SPEC "Admin"/401: when `api_keys_env` is set, the client must send one of
/// those keys as a Bearer token (or `x-api-key`), compared in constant time.
pub(crate) fn authorize(headers: &ClientHeaders, snapshot: &Snapshot) -> Result<(), ApiError> {
    let Some(keys) = &snapshot.config.server.api_keys else {
        return Ok(());
    };
    let sent = bearer_token(headers)
        .or_else(|| headers.get(Name::XApiKey))
        .unwrap_or_default();
    // Compare against every key, so the time taken does not say which
    // (or whether any) prefix matched.
    let matched = keys.iter().fold(subtle::Choice::from(0), |acc, k| {
        acc | sent.ct_eq(k.expose().as_bytes())
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
    // Ids such as `org/model` come percent-encoded (`org%2Fmodel`), as the
    // OpenAI SDKs send them; an id that does not decode to UTF-8 is unknown.
    let id = path.strip_prefix("/v1/models/").map(|raw| {
        percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .unwrap_or(std::borrow::Cow::Borrowed(raw))
    });
    match id {
        Some(id) if snapshot.config.model(&id).is_some() => {
            Ok(json_response(StatusCode::OK, model_object(&id).to_string()))
        }
        Some(id) => Err(ApiError::ModelNotFound(id.into_owned())),
        None => Err(ApiError::UnknownRoute {
            method: "GET".to_owned(),
            path: path.to_owned(),
        }),
    }
}

/// Proxies one `POST /v1/*` request.
pub(crate) async fn forward(
    head: &ClientHead,
    body: ClientBody,
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    request_id: &HeaderValue,
    log: &mut AccessLog,
) -> Result<Response<GatewayBody>, ApiError> {
    let server = &snapshot.config.server;
    // From the start of the request (the log's clock reading).
    let deadline = log.started + server.request_timeout;
    parsable_body(&head.headers)?;
    // `_room` is the body's share of `max_buffered_body_bytes`, held as
    // long as the body: until a backend's answer ends the retries.
    let (body, _room) =
        read_body(&head.headers, body, server.max_body_bytes, deadline, shared).await?;
    let facts = facts::parse(&body)?;
    let Some((place, route)) = snapshot.route(&facts.model) else {
        log.model = Some(facts.model.clone());
        return Err(ApiError::ModelNotFound(facts.model));
    };
    log.place = Some(place);
    let rest = head.uri.path().strip_prefix("/v1").unwrap_or("");
    let endpoint = Endpoint::of(rest);
    let estimate = tokens::estimate(&facts, route.config.max_tokens, endpoint);
    // The name is the route's from here on (the same string): the client's
    // copy goes to the log without another allocation.
    log.model = Some(facts.model);
    // SPEC: refused at once, never after a pointless wait. With no backend
    // in rotation the answer is this 503 whatever admission says, and
    // waiting there would hold a queue slot and a reservation ahead of
    // later requests.
    if !route.pool.has_peer_in_rotation() {
        return Err(no_backend(route));
    }
    let now = Instant::now();
    let queue_deadline = (now + route.limits.queue_timeout()).min(deadline);
    log.wait_starts(now);
    let admitted = limiter::admit(
        &snapshot.global,
        &route.limits,
        &route.config.name,
        estimate.total(),
        now,
        queue_deadline,
    )
    .await?;
    log.admitted_after(admitted.queued);
    let upstream_headers = Upstream {
        client: &head.headers,
        request_id,
    };
    let exchange = Exchange {
        shared,
        snapshot,
        route,
        place,
        rest,
        query: head.uri.query(),
        headers: &upstream_headers,
        body: &body,
        // SPEC "Token accounting": ask for the usage chunk when the client
        // did not, and remove it again on the way back. Only where OpenAI
        // defines `stream_options`: other routes pass through untouched.
        add_include_usage: facts.stream && !facts.include_usage && endpoint.has_stream_options(),
        client_stream_options: facts.has_stream_options,
        prompt_estimate: estimate.prompt,
        deadline,
        queue_deadline,
        first_byte_timeout: server.first_byte_timeout,
        max_attempts: snapshot.config.retry.max_attempts.get(),
    };
    // In flight until its response ends (the retry budget's base): handed
    // to the body with the admission.
    let mut pending = Pending {
        admitted: Some((admitted, ActiveRequest::new(shared.clone()))),
        working: None,
        prompt_estimate: estimate.prompt,
    };
    exchange.run(&mut pending, log).await
}

/// An admission no backend has answered yet. However the request ends
/// before an answer takes it over, its reservation is settled here, so a
/// client that leaves (and drops this future) is settled too (SPEC
/// "Disconnects"): every token is refunded when no backend is working on
/// the request (all attempts failed, or it waited for a slot or a back-off),
/// and all but what the backend may have spent when the client leaves
/// during an attempt: the prompt, and the time since it went out at the
/// backend's measured tokens/s, as for a stream cut before its first event.
/// The concurrency permit returns as the admission drops.
struct Pending<'a> {
    admitted: Option<(Admitted, ActiveRequest)>,
    /// The attempt under way, if any: when it went out, and to whom.
    working: Option<(Instant, &'a BackendState)>,
    /// The prompt part of the estimate.
    prompt_estimate: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let Some((admitted, _)) = self.admitted.take() else {
            return;
        };
        match self.working {
            Some((sent_at, backend)) => {
                settle_cut(&admitted, self.prompt_estimate, 0, sent_at, Some(backend));
            }
            None => admitted.reconcile(0),
        }
    }
}

/// Everything the attempts of one request share.
struct Exchange<'a> {
    shared: &'a Arc<Shared>,
    snapshot: &'a Arc<Snapshot>,
    route: &'a ModelRoute,
    /// Where `route` is in `snapshot`.
    place: Place,
    /// The client's path after `/v1`.
    rest: &'a str,
    query: Option<&'a str>,
    /// Client headers as they go upstream, without the backend's key.
    headers: &'a Upstream<'a>,
    /// The client's body as received.
    body: &'a Bytes,
    /// Whether weir adds `stream_options.include_usage` upstream (to a
    /// backend that has not refused `stream_options`).
    add_include_usage: bool,
    /// Whether the client sent `stream_options` itself: only when weir
    /// added the whole member does a backend's refusal of it say that the
    /// backend does not take it.
    client_stream_options: bool,
    /// The prompt part of the admitted estimate: what a stream the client
    /// leaves early has spent at least.
    prompt_estimate: u64,
    /// `request_timeout` from the start of the request.
    deadline: Instant,
    /// How long the request may wait for a saturated backend.
    queue_deadline: Instant,
    first_byte_timeout: Duration,
    max_attempts: u32,
}

impl<'a> Exchange<'a> {
    /// Attempts up to `max_attempts` backends, each a different one while
    /// another is eligible, and returns the first answer that may go to
    /// the client.
    async fn run(
        &self,
        pending: &mut Pending<'a>,
        log: &mut AccessLog,
    ) -> Result<Response<GatewayBody>, ApiError> {
        let members = &self.route.members;
        // Filled only when an attempt fails: most requests never allocate it.
        let mut tried: Vec<usize> = Vec::new();
        // Backends that answered a 429, or a 5xx with a `Retry-After`, and
        // until when this request leaves them alone (only when one asks
        // for a pause).
        let mut paused: Vec<(usize, Instant)> = Vec::new();
        let mut last: Option<Failure> = None;
        let mut attempt = 0;
        let mut retry_permit: Option<RetryPermit<'_>> = None;
        // Why the retry about to be picked is made: counted in
        // `weir_retries_total` once it goes out (a backend picked, time
        // left, its request built).
        let mut retry_reason: Option<FailureKind> = None;
        loop {
            let pick = self.next_backend(&tried, &paused, attempt > 0, log).await;
            log.wait_ends();
            let (i, in_flight) = match pick {
                Pick::Backend(i, in_flight) => (i, in_flight),
                Pick::NoneLeft => break,
                // A retry that found every backend busy answers with what
                // went wrong upstream, not with a concurrency 429 the
                // client's own request never hit.
                Pick::Saturated if attempt > 0 => break,
                Pick::Saturated => return Err(self.saturated_error()),
                Pick::QueueFull(error) => return Err(ApiError::from(error)),
            };
            attempt += 1;
            let Some(member) = members.get(i) else { break };
            let backend = &member.backend;
            log.attempts = attempt;
            let started = Instant::now();
            let remaining = self.deadline.saturating_duration_since(started);
            if remaining.is_zero() {
                return Err(self.timeout(Duration::ZERO));
            }
            let mut add_usage = self.add_include_usage
                && !backend.live.refuses_stream_options.load(Ordering::Relaxed);
            let request = self.request_for(member, add_usage)?;
            if let Some(reason) = retry_reason.take() {
                self.route.retries.inc(reason);
            }
            pending.working = Some((started, backend));
            let watch = add_usage && !self.client_stream_options;
            let (mut outcome, mut stream, mut wait) =
                self.exchange(backend, &request, remaining, watch).await;
            // A backend that does not take the `stream_options` weir added
            // (some hosted APIs answer 400 "Unrecognized request argument")
            // gets the client's request again as the client sent it, now
            // and from now on: its streams are charged their estimate.
            if watch && refuses_stream_options(&outcome) {
                add_usage = false;
                drop(outcome);
                let mut request = self.request_for(member, false)?;
                request.fresh = true;
                let left = self.deadline.saturating_duration_since(Instant::now());
                (outcome, stream, wait) =
                    Box::pin(self.exchange(backend, &request, left, false)).await;
                // Only an answer to the request without the field shows
                // that the field was what the backend refused. Refused
                // again, the request was refused for something else: a
                // validation error that quotes the body it refuses
                // (FastAPI's and vLLM's `input`) names every field in it,
                // the one weir added too. A re-send that failed (an error,
                // a 429 or a 5xx) shows nothing either way. Logged once, by
                // the first of concurrent refusals.
                if matches!(&outcome, Ok(response)
                    if !may_refuse(response.status()) && !is_retryable(response.status()))
                    && !backend
                        .live
                        .refuses_stream_options
                        .swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(
                        backend = %backend.config.name,
                        "backend refused stream_options: streams go to it without, charged their estimate"
                    );
                }
            }
            pending.working = None;
            // Cut by weir's own `request_timeout` after queueing or earlier
            // attempts had used most of it (less than half of what a first
            // attempt gets was left): the request's deadline, not the
            // backend's silence (as a body cut so is not held against it),
            // and no time is left for another attempt. An attempt given
            // most of that is judged as any: a hung backend is a hung
            // backend whatever the two timeouts are (Envoy holds a route
            // timeout against the host too).
            let allowance = self
                .first_byte_timeout
                .min(self.snapshot.config.server.request_timeout);
            let timed_out = matches!(
                outcome,
                Err(AttemptError::Timeout(_)
                    | AttemptError::NoFirstEvent(_)
                    | AttemptError::NoFirstBytes(_))
            );
            if wait < allowance / 2 && timed_out {
                return Err(self.timeout(wait));
            }
            // A kept-alive connection closed unanswered is most often the
            // backend's idle close racing weir's reuse: not held against
            // the backend, and no back-off before the next one.
            let idle_closed = matches!(outcome, Err(AttemptError::IdleClosed(_)));
            // Each failure says why, and the status it answered with, if it
            // answered.
            let (reason, answered) = match outcome {
                Ok(response) if !is_retryable(response.status()) => {
                    self.report(backend, Outcome::Answered(started.elapsed()));
                    let Some((admitted, active)) = pending.admitted.take() else {
                        break;
                    };
                    // Named only when its answer goes to the client: a
                    // 502/504/499 is weir's own answer (`backend=""`).
                    let place = Place {
                        member: Some(i),
                        ..self.place
                    };
                    log.place = Some(place);
                    let sent = (admitted, active, started);
                    let how = Answer { stream, add_usage };
                    return Ok(self.respond(response, how, member, place, in_flight, sent));
                }
                Ok(response) if response.status() == StatusCode::TOO_MANY_REQUESTS => {
                    // Out of rotation for its `Retry-After`, which the
                    // retry reads from the backend's live state; and this
                    // request's retries leave it alone for as long, also
                    // when the window is not opened (a 429 for a key a
                    // reload has replaced: the retry would send that key).
                    let pause = retry_after(&response);
                    self.report(backend, Outcome::RateLimited(pause));
                    hold_off(&mut paused, i, pause);
                    (FailureKind::Status429, Some(response.status()))
                }
                // A 5xx's `Retry-After` (a 503's, RFC 9110 §10.2.3) keeps
                // this request's retries off this backend, and only it,
                // until it passes (other requests are not held to it).
                Ok(response) => {
                    self.report(backend, Outcome::Failure);
                    if let Some(pause) = retry_after_given(&response) {
                        hold_off(&mut paused, i, pause);
                    }
                    (FailureKind::Status5xx, Some(response.status()))
                }
                Err(e) => {
                    // Why is an operator's to see at `info` (the access
                    // line says only how the request ended), as nginx logs
                    // each upstream error; not the idle-close race.
                    if idle_closed {
                        tracing::debug!(backend = %backend.config.name, error = %e, "attempt failed");
                    } else {
                        tracing::info!(backend = %backend.config.name, error = %e, "attempt failed");
                        self.report(backend, Outcome::Failure);
                    }
                    let reason = e.kind();
                    last = Some(Failure::Attempt(e));
                    (reason, None)
                }
            };
            // An answered failure is what the client hears of if no later
            // attempt answers (a retry may yet find no backend to go to).
            if let Some(status) = answered {
                last = Some(Failure::Status(status));
            }
            // The attempt failed, whichever way: its backend slot frees now,
            // not after any back-off.
            drop(in_flight);
            if !idle_closed {
                backend.errors.inc(reason);
            }
            if !tried.contains(&i) {
                tried.push(i);
            }
            match self.retry_delay(attempt, &tried, &paused, &mut retry_permit) {
                // The failed answer was dropped unread: nothing of it
                // reached the client, so another backend may answer.
                Next::After(delay) => {
                    retry_reason = Some(reason);
                    if !idle_closed {
                        tokio::time::sleep(delay).await;
                    }
                }
                // No retry left: every attempt failed, which SPEC answers
                // with 502 even when the last one was a 429 or 5xx answer.
                Next::GiveUp => break,
                // Time ran out, not attempts (SPEC "Timeouts"): 504, as
                // when the last attempt itself was cut by request_timeout.
                Next::OutOfTime => {
                    return Err(ApiError::NoTimeToRetry {
                        after: self.snapshot.config.server.request_timeout,
                        detail: last.as_ref().map_or_else(String::new, Failure::detail),
                        retry_after: self.back_after(last.as_ref()),
                    })
                }
            }
        }
        Err(match last {
            None => no_backend(self.route),
            Some(Failure::Attempt(
                AttemptError::Timeout(d)
                | AttemptError::NoFirstEvent(d)
                | AttemptError::NoFirstBytes(d),
            )) => self.timeout(d),
            Some(failure) => ApiError::BadGateway {
                model: self.route.config.name.clone(),
                detail: failure.detail(),
                retry_after: self.back_after(Some(&failure)),
            },
        })
    }

    /// One request to `backend`, with `remaining` of the request's time:
    /// its answer, whether that is a 2xx stream, and how long the last
    /// wait on it was allowed. A stream's headers alone tell the client
    /// nothing: they go out with its first event, so a backend that holds
    /// the stream back (a queue in front of its engine) is retried
    /// elsewhere, nothing having reached the client yet. Any other answer
    /// for the client goes out with its first body bytes too: one whose
    /// body breaks or stalls before them is a failed attempt, retried or
    /// answered 502/504 (SPEC "Backend faults"), not a head with a cut
    /// body. (Taken out and put back only then: an answer whose body came
    /// whole with its head, most JSON answers, stays where it is, unmoved;
    /// unless `watch`, which reads a 400's or 422's first bytes for a
    /// refusal of `stream_options`.)
    async fn exchange(
        &self,
        backend: &BackendState,
        request: &Forward<'_>,
        remaining: Duration,
        watch: bool,
    ) -> (Result<Response<UpstreamBody>, AttemptError>, bool, Duration) {
        let mut wait = self.first_byte_timeout.min(remaining);
        let mut outcome = upstream::forward(&backend.client, request, wait).await;
        let stream = matches!(&outcome, Ok(response) if is_successful_stream(response));
        // A refusal is judged on its first few KiB, not on its first read:
        // its words may come in two reads or two chunks.
        let refusal = watch && matches!(&outcome, Ok(response) if may_refuse(response.status()));
        let prime = stream
            || refusal
            || matches!(&outcome, Ok(response)
                if !is_retryable(response.status()) && !response.body().arrived_whole());
        if prime {
            let placeholder = Err(AttemptError::NoFirstEvent(Duration::ZERO));
            if let Ok(response) = std::mem::replace(&mut outcome, placeholder) {
                let left = self.deadline.saturating_duration_since(Instant::now());
                wait = self.first_byte_timeout.min(left);
                // Boxed: the wait's state is needed only here, and inline
                // it would grow every request's future.
                outcome = if refusal {
                    Box::pin(upstream::primed_gathered(response, wait, REFUSAL_BYTES)).await
                } else {
                    Box::pin(upstream::primed(response, wait, stream)).await
                };
            }
        }
        (outcome, stream, wait)
    }

    /// When the client may come back, for the 502 or 504 that ends the
    /// attempts: the last word was a backend's 429, and every backend is
    /// held out by the clock (see [`back_in`]).
    fn back_after(&self, last: Option<&Failure>) -> Option<Duration> {
        match last {
            Some(Failure::Status(StatusCode::TOO_MANY_REQUESTS)) => back_in(self.route),
            _ => None,
        }
    }

    /// Whether to retry after a failed attempt, and after how long (SPEC
    /// "Retries", Envoy's policy): attempts left, a backend left (untried
    /// ones first; the same ones again only when none is left), the retry
    /// budget, and the back-off — full jitter, exponential from
    /// `base_delay` to `max_delay`. Which backend takes the retry is
    /// decided after the back-off, by [`Exchange::next_backend`], from the
    /// state then: a backend may be held out or freed meanwhile. A backend
    /// that asked for a pause (this request's 429 or 5xx `Retry-After` in `paused`, anyone's 429 in its live
    /// state) is not available until it passes; one ejected is not
    /// available either, and not waited for past `max_delay` (nor does a
    /// retry meet it failing again). When the next attempt must go to a
    /// backend already tried, the back-off lasts at least until the first
    /// available one is back. All within `request_timeout`: a retry that
    /// could not start before it is [`Next::OutOfTime`].
    fn retry_delay<'s>(
        &'s self,
        attempt: u32,
        tried: &[usize],
        paused: &[(usize, Instant)],
        permit: &mut Option<RetryPermit<'s>>,
    ) -> Next {
        if attempt >= self.max_attempts {
            return Next::GiveUp;
        }
        let now = Instant::now();
        let members = &self.route.members;
        let retry = &self.snapshot.config.retry;
        // When backend `j` may take the next attempt, if this retry would
        // wait for it. The snapshot's weights predate what this request's
        // own failures did: a backend that answered 429, or was ejected,
        // since it began is out until its live state says it is back. One
        // the clock held out when it began comes back the same way.
        let back_at = |j: usize| -> Option<Instant> {
            let member = members
                .get(j)
                .filter(|_| self.route.pool.weight(j) > 0 || self.may_rejoin(j))?;
            let live = match member.backend.live.held_out_until(now) {
                None => now,
                Some(held) if held.asked || held.until <= now + retry.max_delay => held.until,
                Some(_) => return None,
            };
            let asked = paused
                .iter()
                .find(|(k, _)| *k == j)
                .map_or(now, |&(_, t)| t);
            Some(live.max(asked))
        };
        // A busy backend is not "another backend available": the retry
        // goes back to one already tried rather than wait for its slot.
        let untried_left = (0..members.len()).any(|j| {
            back_at(j) == Some(now)
                && !tried.contains(&j)
                && members.get(j).is_some_and(|m| !m.backend.is_saturated())
        });
        let repeat = !untried_left;
        // The soonest any backend is back in rotation.
        let soonest = (0..members.len()).filter_map(back_at).min();
        if repeat && soonest.is_none() {
            return Next::GiveUp;
        }
        if permit.is_none() {
            match RetryPermit::try_new(self.shared, retry.budget_percent) {
                Some(p) => *permit = Some(p),
                None => return Next::GiveUp,
            }
        }
        let exp = retry
            .base_delay
            .saturating_mul(
                1u32.checked_shl(attempt.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(retry.max_delay);
        let mut delay = jitter::up_to(exp);
        if repeat {
            let back = soonest.map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
            delay = delay.max(back);
        }
        if Instant::now() + delay < self.deadline {
            Next::After(delay)
        } else {
            Next::OutOfTime
        }
    }

    /// The 504 for an attempt that waited `waited` for headers: cut by
    /// `first_byte_timeout` when it waited that long, else by
    /// `request_timeout`.
    fn timeout(&self, waited: Duration) -> ApiError {
        if waited >= self.first_byte_timeout {
            ApiError::UpstreamTimeout {
                limit: "first_byte_timeout",
                after: self.first_byte_timeout,
            }
        } else {
            ApiError::UpstreamTimeout {
                limit: "request_timeout",
                after: self.snapshot.config.server.request_timeout,
            }
        }
    }

    /// Reports an attempt's outcome to passive outlier detection.
    fn report(&self, backend: &BackendState, outcome: Outcome) {
        outlier::report(self.shared, self.snapshot, backend, outcome);
    }

    /// The next backend to try: smooth WRR over those not yet tried and not
    /// saturated; for a retry with none such, over those already tried that
    /// are free (SPEC: never the same backend twice while another is
    /// available, and a busy one is not available). When every backend is
    /// saturated, a retry gets [`Pick::Saturated`] at once; a first attempt
    /// waits (until the queue deadline) for one to free a slot, in the
    /// model's queue (`max_queue`, `weir_queue_depth`, `queue_ms`) like a
    /// request waiting for admission.
    ///
    /// A retry (`retrying`) also skips backends held out since the
    /// request's snapshot was taken (ejected, or rate-limited by a 429),
    /// reading their live state, and so does a first attempt from its
    /// second look on (it waits), when it also looks in the newest snapshot
    /// for members back in rotation ([`Exchange::back_in_rotation`]). Its
    /// first look takes no lock. All of it
    /// is read now, after the retry's back-off, not when the retry was
    /// decided.
    async fn next_backend(
        &self,
        tried: &[usize],
        paused: &[(usize, Instant)],
        retrying: bool,
        log: &mut AccessLog,
    ) -> Pick {
        let members = &self.route.members;
        let signal = &self.snapshot.slots;
        // In line for a slot from the second look on (`crate::slots`).
        let mut counted: Option<InLine<'_>> = None;
        let mut queued: Option<limiter::QueueSlot> = None;
        loop {
            // The first look registers nothing: registering locks the
            // waiter list that every lane's requests share, and most
            // requests find a backend at once. From the second look on,
            // interest is registered before looking, so a snapshot
            // published between the look and the wait still wakes us (a
            // slot freed then wakes us through our place in line).
            let notified = signal.notify.notified();
            tokio::pin!(notified);
            if counted.is_some() {
                notified.as_mut().enable();
            }
            // Scoped: what it reads of the newest snapshot is let go
            // before the wait.
            {
                // A retry, and a first attempt once it waits (its snapshot may
                // be seconds old by then: a backend ejected or answering a 429
                // meanwhile is out, SPEC), also read the live state; a first
                // look takes no lock.
                let now = (retrying || counted.is_some()).then(Instant::now);
                // A waiting first attempt also leaves out what a newer snapshot
                // has taken out of rotation (its probes failing, removed by a
                // reload): the one it took was built before.
                let newest = counted
                    .as_ref()
                    .map(|_| self.shared.snapshot.load())
                    .filter(|newest| !Arc::ptr_eq(newest, self.snapshot));
                let newest_route = newest
                    .as_ref()
                    .and_then(|n| n.route(&self.route.config.name))
                    .map(|(_, route)| route);
                // Out of rotation in the newest snapshot (its probes
                // failing), or no longer serving the model there though
                // still in the config: left out.
                let out_in_newest = |m: &Member| {
                    newest_route.is_some_and(|route| match route.counterpart(&m.backend) {
                        Some((k, _)) => route.pool.weight(k) == 0,
                        None => newest.as_ref().is_some_and(|n| in_config(n, m)),
                    })
                };
                let held = |i: usize, m: &Member| {
                    now.is_some_and(|now| {
                        m.backend.live.held_out_until(now).is_some()
                            || paused.iter().any(|&(j, t)| j == i && t > now)
                            || out_in_newest(m)
                    })
                };
                // One a reload has removed (or renamed, or moved: the
                // newest snapshot has another backend in its place, which
                // this request's route cannot know) still drains: it is
                // taken only when none of those the reload kept is left,
                // rather than answering 503 while it runs.
                let removed = |m: &Member| newest.as_ref().is_some_and(|n| !in_config(n, m));
                let pool = &self.route.pool;
                let kept_left = (0..members.len()).any(|i| {
                    pool.weight(i) > 0 && members.get(i).is_some_and(|m| !held(i, m) && !removed(m))
                });
                let held_out = |i: usize, m: &Member| held(i, m) || (kept_left && removed(m));
                // In line: the backends it would take, of which it may take
                // those it is first in line for (SPEC "Admission": first
                // come, first served).
                // Those back in rotation since its snapshot count too: one
                // of them freeing a slot must wake it.
                let mine = counted.as_ref().map(|place| {
                    let mut wants: Vec<BackendId> = members
                        .iter()
                        .enumerate()
                        .filter(|&(i, m)| pool.weight(i) > 0 && !held_out(i, m))
                        .map(|(_, m)| m.backend.slot_id())
                        .collect();
                    self.back_member(newest_route, |m| {
                        wants.push(m.backend.slot_id());
                        false
                    });
                    place.want(wants)
                });
                // In line, what it may take was already chosen among those
                // not held out (their health read once a look).
                let available = |i: usize| {
                    members.get(i).is_some_and(|m| {
                        !capped(m, newest_route).is_saturated()
                            && match &mine {
                                Some(mine) => mine.contains(&m.backend.slot_id()),
                                None => !held_out(i, m),
                            }
                    })
                };
                // A first look while others wait for a slot takes none: it
                // gets in line behind them (retries do not wait, nor queue).
                let behind_others = !retrying && counted.is_none() && signal.anyone_waiting();
                let picked = if behind_others {
                    None
                } else if retrying {
                    // A retry takes turns of the retries' own sequence (see
                    // `Pool::pick_aside`); with nothing untried free now, it
                    // goes back to one tried.
                    // One held out when the request began (out of its
                    // snapshot's rotation) and back by its live state since
                    // counts as any other: untried before those tried, and
                    // repeated like them when none is left.
                    let rejoined = |untried: bool| {
                        (0..members.len()).find(|&j| {
                            pool.weight(j) == 0
                                && (!untried || !tried.contains(&j))
                                && self.may_rejoin(j)
                                && available(j)
                        })
                    };
                    pool.pick_aside(|i| !tried.contains(&i) && available(i))
                        .or_else(|| rejoined(true))
                        .or_else(|| pool.pick_aside(available))
                        .or_else(|| rejoined(false))
                } else {
                    pool.pick(available)
                };
                if let Some(i) = picked {
                    match members
                        .get(i)
                        .and_then(|m| capped(m, newest_route).try_begin())
                    {
                        Some(in_flight) => return Pick::Backend(i, in_flight),
                        // Lost a race for its last slot: look again.
                        None => continue,
                    }
                }
                // A retry does not queue for a slot (nor take a place in the
                // model's queue, whose refusal would be a 429 for a request
                // already admitted): with every backend busy, it ends with
                // the last failure.
                if retrying {
                    return Pick::Saturated;
                }
                if counted.is_none() {
                    // Every backend looked saturated, or others wait: get in
                    // line, then look again, registered. A slot given back
                    // after that wakes us if we are first in line for it (its
                    // release sees the count); one given back before shows in
                    // the look. Both sides use sequentially consistent order
                    // for this.
                    counted = Some(InLine::join(signal));
                    continue;
                }
                let back_busy = match self.back_in_rotation(newest_route, mine.as_deref()) {
                    Back::Taken(i, in_flight) => return Pick::Backend(i, in_flight),
                    Back::Busy => true,
                    Back::None => false,
                };
                // In rotation, busy or not: one of its snapshot's not held
                // out, or one back since (which its next look may take).
                let any_left = back_busy
                    || (0..members.len()).any(|i| {
                        self.route.pool.weight(i) > 0
                            && members.get(i).is_some_and(|m| !held_out(i, m))
                    });
                if !any_left {
                    return Pick::NoneLeft;
                }
            }
            if queued.is_none() {
                let slot =
                    match limiter::queue_or_refuse(&self.route.limits, &self.route.config.name) {
                        Ok(slot) => slot,
                        Err(full) => return Pick::QueueFull(full),
                    };
                log.wait_starts(Instant::now());
                queued = Some(slot);
            }
            let woken = async {
                match &counted {
                    Some(place) => tokio::select! {
                        () = &mut notified => {}
                        () = place.woken() => {}
                    },
                    None => notified.await,
                }
            };
            if tokio::time::timeout_at(self.queue_deadline, woken)
                .await
                .is_err()
            {
                return Pick::Saturated;
            }
        }
    }

    /// For a first attempt that found every backend of its snapshot busy: a
    /// member its snapshot has out of rotation (weight 0: a 429 window, an
    /// ejection, failing probes) that a newer snapshot has back in, with a
    /// free slot, which is then taken. Only this pick looks past the
    /// request's snapshot (the member, its client and everything else stay
    /// the request's own): waiting for a busy backend while one that came
    /// back sits idle would hold the request for nothing, and for an LLM
    /// backend "busy" can last minutes. See [`Exchange::back_member`] for
    /// which members count; of those, it takes only one it is first in
    /// line for (`mine`, when it waits in line).
    fn back_in_rotation(&self, newest: Option<&ModelRoute>, mine: Option<&[BackendId]>) -> Back {
        let mut taken = None;
        let mut busy = false;
        let j = self.back_member(newest, |m| {
            // One that someone before it in line waits for is theirs.
            if mine.is_some_and(|mine| !mine.contains(&m.backend.slot_id())) {
                busy = true;
                return false;
            }
            taken = m.backend.try_begin();
            busy |= taken.is_none();
            taken.is_some()
        });
        match (j, taken) {
            (Some(j), Some(in_flight)) => Back::Taken(j, in_flight),
            _ if busy => Back::Busy,
            _ => Back::None,
        }
    }

    /// The first member, among those its snapshot has out of rotation
    /// (weight 0), that the newest snapshot has back in and that `accept`
    /// takes. Only a member unchanged since: a backend a reload added is
    /// not looked for (the request's route does not know it), nor one a
    /// reload changed (another key, `max_concurrent`, anything in its
    /// entry), restored, or gave other trusted CAs: the request would send
    /// it as its snapshot has it, with the old key or an https client that
    /// cannot verify it. Nor one held out now (a 429 or an ejection since
    /// the newest snapshot was built, which a freed slot may announce
    /// before the next build does).
    /// `newest` is the model's route in the newest snapshot, if that is
    /// not the request's own.
    fn back_member(
        &self,
        newest: Option<&ModelRoute>,
        mut accept: impl FnMut(&Member) -> bool,
    ) -> Option<usize> {
        let newest = newest?;
        let now = Instant::now();
        self.route
            .members
            .iter()
            .enumerate()
            .position(|(j, member)| {
                let mine = &member.backend;
                self.route.pool.weight(j) == 0
                    && newest.counterpart(mine).is_some_and(|(k, m)| {
                        newest.pool.weight(k) > 0
                            && m.backend.generation == mine.generation
                            && m.backend.config == mine.config
                            && mine.client.reusable()
                    })
                    && mine.live.held_out_until(now).is_none()
                    && accept(member)
            })
    }

    /// Whether member `j`, out of rotation in the request's snapshot
    /// (weight 0), may take a retry when its live state lets it: its probes
    /// pass (now: they may have failed when the request began), so only
    /// the clock holds it out, or did (a 429's window, an ejection), and it
    /// rejoins when that ends, as the snapshot built then will say. Not one
    /// configured with weight 0, out by its probes, or changed or removed by
    /// a reload since (the request would send it as its snapshot has it).
    fn may_rejoin(&self, j: usize) -> bool {
        let Some(backend) = self.route.members.get(j).map(|m| &m.backend) else {
            return false;
        };
        if backend.config.weight == 0
            || backend.live.with_health(|h| h.is_out())
            || !backend.client.reusable()
        {
            return false;
        }
        let newest = self.shared.snapshot.load();
        Arc::ptr_eq(&newest, self.snapshot)
            || newest
                .route(&self.route.config.name)
                .and_then(|(_, route)| route.counterpart(backend))
                .is_some_and(|(_, m)| {
                    m.backend.generation == backend.generation && m.backend.config == backend.config
                })
    }

    fn saturated_error(&self) -> ApiError {
        let limit = self
            .route
            .members
            .iter()
            .filter_map(|m| m.backend.config.max_concurrent)
            .map(|m| u64::from(m.get()))
            .sum();
        self.route.limits.count_limited(LimitKind::Concurrency);
        ApiError::from(AdmitError::Saturated {
            model: self.route.config.name.clone(),
            kind: LimitKind::Concurrency,
            limit,
            bucket_wait: None,
        })
    }

    /// The upstream request for one attempt: the backend's URL and key, the
    /// original body unless the backend renames the model or weir adds
    /// `include_usage` (`add_usage`). Borrowed: nothing of the request is
    /// copied.
    fn request_for<'m>(
        &'m self,
        member: &'m Member,
        add_usage: bool,
    ) -> Result<Forward<'m>, ApiError> {
        let backend = &member.backend;
        let body = if member.upstream_model.is_some() || add_usage {
            facts::rewrite(self.body, member.upstream_model.as_deref(), add_usage)?
                .unwrap_or_else(|| self.body.clone())
        } else {
            self.body.clone()
        };
        Ok(Forward {
            base: &backend.config.url,
            rest: self.rest,
            query: self.query,
            headers: self.headers,
            authorization: backend.authorization.as_ref(),
            body,
            fresh: false,
        })
    }

    /// The client's response: the backend's status and headers (hop-by-hop
    /// removed, `x-weir-backend` and the rate-limit headers added) and its
    /// body streamed through, with usage read on the way.
    fn respond(
        &self,
        response: Response<UpstreamBody>,
        Answer { stream, add_usage }: Answer,
        member: &Member,
        place: Place,
        in_flight: InFlight,
        (admitted, active, sent_at): (Admitted, ActiveRequest, Instant),
    ) -> Response<GatewayBody> {
        let (mut parts, body) = response.into_parts();
        // A plain backend's headers stay out of the map (the writers pass
        // them on: `ProxiedBody::backend_headers`); an https one's are here.
        if parts.headers.contains_key(header::TRANSFER_ENCODING) {
            // The chunks framed it, not this length (RFC 9112 §6.3); see
            // `ProxiedBody::may_pass_on` for a plain backend's.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        headers::strip_hop_by_hop(&mut parts.headers);
        // A 2xx stream's type was read (`Exchange::exchange`): only other
        // answers are looked at again.
        let sse = stream
            || (!parts.status.is_success()
                && upstream_header(&parts.headers, &body, Name::ContentType)
                    .is_some_and(is_event_stream));
        if sse {
            // weir may remove the usage chunk or append an error event, so
            // the length is not known.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        if !parts.headers.is_empty() {
            // An https backend's: weir sets these itself (see
            // `ProxiedBody::own_headers`), and its limits are the ones
            // the client is held to, so a backend's `x-ratelimit-*` never
            // pass (SPEC: a model with no limit of a kind sends none).
            parts.headers.remove(headers::X_WEIR_BACKEND);
            parts.headers.remove(headers::X_REQUEST_ID);
            headers::strip_rate_headers(&mut parts.headers);
        }
        // The `x-ratelimit-*` headers travel with the body (see
        // `ProxiedBody::rate_headers`).
        let reader = if sse {
            UsageReader::Sse(UsageFilter::new(add_usage))
        } else {
            UsageReader::Json(UsageTail::new())
        };
        let accounting = Accounting {
            admitted,
            reader,
            tokens: self.route.tokens.clone(),
            success: parts.status.is_success(),
            prompt_estimate: self.prompt_estimate,
            sent_at,
        };
        let mut body = ProxiedBody::new(
            body,
            in_flight,
            self.deadline,
            sse,
            self.first_byte_timeout,
            Some(accounting),
            AnsweredBy { active, place },
        );
        // SPEC "Secrets": an error answer may quote the key weir sent (a
        // 401's "Incorrect API key provided: sk-…"); it reaches the client
        // without it. Its length changes with it. Headers are few and
        // short: any answer's are looked at.
        if let Some(key) = &member.backend.config.api_key {
            body.redact_headers(&mut parts.headers, key.expose());
            if !parts.status.is_success() {
                body.redact(key.expose());
                parts.headers.remove(header::CONTENT_LENGTH);
            }
        }
        Response::from_parts(parts, GatewayBody::Proxied(Box::new(body)))
    }
}

/// A retry in progress, counted against `retry.budget_percent` of the
/// requests in flight (Envoy's retry budget, with Envoy's default
/// `min_retry_concurrency` of 3: a few retries may always run, so the
/// handful of requests caught on a backend that dies all get theirs).
/// A budget of 0 is the operator asking for none: SPEC's "never exceed
/// this share" then holds without the floor.
struct RetryPermit<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> RetryPermit<'a> {
    fn try_new(shared: &'a Shared, budget_percent: u8) -> Option<Self> {
        use std::sync::atomic::Ordering;
        if budget_percent == 0 {
            return None;
        }
        // A request counted in on one lane and out on another leaves the
        // sum exact; read mid-way, it is never taken for less than 0.
        let active = u64::try_from(shared.active_requests.get()).unwrap_or(0);
        let allowed = (active * u64::from(budget_percent) / 100).max(MIN_RETRY_CONCURRENCY);
        shared
            .active_retries
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < allowed).then_some(n + 1)
            })
            .ok()?;
        Some(Self(&shared.active_retries))
    }
}

impl Drop for RetryPermit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Counts a request in `Shared::active_requests` from admission until its
/// response ends (a stream too): SPEC's retry budget is a share of the
/// requests in flight, streams included.
#[derive(Debug)]
pub(crate) struct ActiveRequest(Arc<Shared>);

impl ActiveRequest {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        shared.active_requests.inc();
        Self(shared)
    }

    /// The gateway state it counts in.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.0
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active_requests.dec();
    }
}

/// Retries that may run at once whatever the budget (Envoy's default).
const MIN_RETRY_CONCURRENCY: u64 = 3;

/// Whether a `Content-Type` value is `text/event-stream`, parameters
/// allowed; type and subtype are case-insensitive (RFC 9110 §8.3.1).
fn is_event_stream(value: &[u8]) -> bool {
    const SSE: &[u8] = b"text/event-stream";
    value
        .get(..SSE.len())
        .is_some_and(|v| v.eq_ignore_ascii_case(SSE))
        && matches!(value.get(SSE.len()), None | Some(b';' | b' ' | b'\t'))
}

/// Whether `snapshot` still has `m`'s backend (the same name and URL, so
/// the same live state), for any model.
fn in_config(snapshot: &Snapshot, m: &Member) -> bool {
    (snapshot.backends().iter()).any(|b| Arc::ptr_eq(&b.live, &m.backend.live))
}

/// How an answer goes to the client: `stream`, a 2xx SSE answer (whose
/// first event was read); `add_usage`, weir asked for its usage chunk
/// (and removes it again).
#[derive(Clone, Copy)]
struct Answer {
    stream: bool,
    add_usage: bool,
}

/// How much of a 400's or 422's body is read for a refusal of
/// `stream_options` (see [`Exchange::exchange`]).
const REFUSAL_BYTES: usize = 4096;

/// A status a backend refuses an unknown request field with.
fn may_refuse(status: StatusCode) -> bool {
    status == StatusCode::BAD_REQUEST || status == StatusCode::UNPROCESSABLE_ENTITY
}

/// Whether the answer refuses the request's `stream_options` (Azure
/// OpenAI's "Unrecognized request argument supplied: stream_options",
/// a 422 with `"loc":["body","stream_options"]`): a 400 or 422 whose first
/// bytes, read by [`Exchange::exchange`], name it.
fn refuses_stream_options(outcome: &Result<Response<UpstreamBody>, AttemptError>) -> bool {
    matches!(outcome, Ok(response)
        if may_refuse(response.status())
            && response
                .body()
                .first_bytes()
                .is_some_and(|bytes| memchr::memmem::find(bytes, b"stream_options").is_some()))
}

/// Whether a backend's answer is a 2xx SSE stream, whose headers wait for
/// its first event (see [`Exchange::exchange`]).
fn is_successful_stream(response: &Response<UpstreamBody>) -> bool {
    response.status().is_success()
        && upstream_header(response.headers(), response.body(), Name::ContentType)
            .is_some_and(is_event_stream)
}

/// A backend response's header of kind `kind`: in the map for an
/// `https://` backend, kept as received for a plain one.
fn upstream_header<'a>(map: &'a HeaderMap, body: &'a UpstreamBody, kind: Name) -> Option<&'a [u8]> {
    kind.header_name()
        .and_then(|name| map.get(name))
        .map(HeaderValue::as_bytes)
        .or_else(|| body.raw_headers()?.get(kind))
}

/// What [`Exchange::retry_delay`] decided after a failed attempt.
enum Next {
    /// Retry after this back-off.
    After(Duration),
    /// No retry: attempts, backends worth waiting for or the retry budget
    /// ran out; the client gets the last failure (502, or 504 for a
    /// timeout).
    GiveUp,
    /// The next attempt could not start before `request_timeout` (504).
    OutOfTime,
}

/// What [`Exchange::next_backend`] found.
enum Pick {
    /// This member, with its in-flight slot taken.
    Backend(usize, InFlight),
    /// Every backend was tried (or none is in rotation).
    NoneLeft,
    /// Backends remain but all stayed saturated until the queue deadline.
    Saturated,
    /// Backends remain but all are saturated and the model's queue is full.
    QueueFull(AdmitError),
}

/// The entry of a member whose `max_concurrent` a waiting look goes by:
/// the newest snapshot's for the same backend (same live state, so the
/// same in-flight count), if `newest` has it, else its own. A reload that
/// raised the cap gives requests already waiting the new slots (their own
/// snapshot still had the old cap, and they are first in line).
fn capped<'a>(member: &'a Member, newest: Option<&'a ModelRoute>) -> &'a BackendState {
    newest
        .and_then(|route| route.counterpart(&member.backend))
        .map_or(&member.backend, |(_, m)| &m.backend)
}

/// What [`Exchange::back_in_rotation`] found among the members that are
/// back in a newer snapshot.
enum Back {
    /// This one, with its in-flight slot taken.
    Taken(usize, InFlight),
    /// Some, all at their `max_concurrent`: worth waiting for.
    Busy,
    /// None.
    None,
}

/// An upstream 429 or 5xx is retried elsewhere (SPEC "Errors").
fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// This request leaves backend `i` alone for `pause` from now (its 429's
/// or 5xx's `Retry-After`); a zero pause asks for none.
fn hold_off(paused: &mut Vec<(usize, Instant)>, i: usize, pause: Duration) {
    if pause.is_zero() {
        return;
    }
    let until = Instant::now() + pause;
    match paused.iter_mut().find(|(j, _)| *j == i) {
        Some((_, t)) => *t = until,
        None => paused.push((i, until)),
    }
}

/// The 503 of a model with no backend in rotation; when every backend is
/// held out by the clock alone (a 429's `Retry-After`, an ejection), with
/// a `Retry-After` until the first comes back.
#[cold]
fn no_backend(route: &ModelRoute) -> ApiError {
    ApiError::NoHealthyBackend {
        model: route.config.name.clone(),
        retry_after: back_in(route),
    }
}

/// When every backend of the model is held out by the clock alone (a
/// 429's `Retry-After`, an ejection), how long until the first is back.
fn back_in(route: &ModelRoute) -> Option<Duration> {
    let now = Instant::now();
    route
        .members
        .iter()
        // One configured with weight 0 is never back, nor waited for.
        .filter(|m| m.backend.config.weight > 0)
        .map(|m| m.backend.live.with_health(|h| h.back_at(now)))
        .collect::<Option<Vec<Instant>>>()
        .and_then(|backs| backs.into_iter().min())
        .map(|at| at.saturating_duration_since(now))
}

/// Refuses, before reading it, a body whose bytes are not the JSON weir
/// reads `model` from (SPEC: 400 `invalid_json`), saying why: a compressed
/// one (`Content-Encoding` other than `identity`; a plain JSON body sent so
/// would reach the backend labelled compressed), or a multipart body (the
/// file uploads of `/v1/audio/transcriptions` and the like), which weir
/// cannot route. Any other `Content-Type` is parsed as JSON: `curl -d`
/// labels JSON as a form.
fn parsable_body(headers: &ClientHeaders) -> Result<(), ApiError> {
    let encoded = headers.values(Name::ContentEncoding).any(|value| {
        value.split(|&b| b == b',').any(|coding| {
            let coding = coding.trim_ascii();
            !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity")
        })
    });
    if encoded {
        return Err(ApiError::InvalidJson(
            "Request bodies sent with a Content-Encoding are not read: weir reads the model from the JSON body, so send it uncompressed.".to_owned(),
        ));
    }
    let multipart = headers.get(Name::ContentType).is_some_and(|t| {
        t.trim_ascii_start()
            .get(..10)
            .is_some_and(|kind| kind.eq_ignore_ascii_case(b"multipart/"))
    });
    if multipart {
        return Err(ApiError::InvalidJson(
            "multipart bodies (file uploads) are not routed: weir reads the model from a JSON body.".to_owned(),
        ));
    }
    Ok(())
}

/// Reads the whole request body, refusing it as soon as it is known to be
/// larger than `limit` (413 without reading the rest) and bounding the wait
/// by `request_timeout`. The body's room in `budget` comes with it: all of
/// it before the first byte is read when the length is declared, as it
/// arrives otherwise (see [`crate::body_budget`]).
///
/// An HTTP/1.1 body that finds no room waits for it, unread. An HTTP/2 one
/// is refused at once (503): h2 gives back its connection's flow-control
/// window only as a stream's data is read, so a stream left unread would
/// stop every other stream of its connection, those holding room and
/// waiting for the rest of their bodies too. (From `shared`: the budget,
/// and `stopping`, which ends a refused body's drain.)
async fn read_body(
    headers: &ClientHeaders,
    mut body: ClientBody,
    limit: usize,
    deadline: Instant,
    shared: &Shared,
) -> Result<(Bytes, Room), ApiError> {
    let budget = &shared.body_budget;
    let declared = codec::content_length(headers.values(Name::ContentLength))
        .ok()
        .flatten();
    let http2 = matches!(body, ClientBody::Http2(_));
    let refusal = 'read: {
        if declared.is_some_and(|n| n > limit as u64) {
            break 'read ApiError::BodyTooLarge { limit };
        }
        let uncounted = if http2 { 0 } else { body_budget::UNCOUNTED };
        let mut room = Room::default();
        // Checked here, so the usual small body polls no future for it.
        if let Some(n) = declared.filter(|&n| n > uncounted as u64) {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if http2 {
                if !budget.try_reserve(&mut room, n, uncounted) {
                    break 'read ApiError::BodyMemoryFull;
                }
            } else {
                let reserve = budget.reserve(&mut room, n, uncounted);
                if tokio::time::timeout_at(deadline, reserve).await.is_err() {
                    return Err(ApiError::BodyRoomTimeout);
                }
            }
        }
        // Through `&mut`, so a body found too large is still there to drain.
        // Without a length (chunked), a chunk's size already promises how
        // much more is coming: one over the limit is refused at once,
        // not after waiting for bytes the client may never send.
        let promises = declared.is_none();
        let grow = (promises && uncounted < limit).then_some(Grow {
            budget,
            room: &mut room,
            uncounted,
            wait: !http2,
        });
        let read = tokio::time::timeout_at(deadline, collect(&mut body, limit, promises, grow));
        match read.await {
            Err(_) if room.waiting => return Err(ApiError::BodyRoomTimeout),
            Err(_) => return Err(ApiError::BodyTimeout),
            Ok(Ok(whole)) => return Ok((whole, room)),
            Ok(Err(Collect::TooLarge)) => break 'read ApiError::BodyTooLarge { limit },
            Ok(Err(Collect::NoRoom)) => break 'read ApiError::BodyMemoryFull,
            Ok(Err(Collect::Failed(e))) if e.client_left() => return Err(ApiError::ClientGone),
            Ok(Err(Collect::Failed(e))) => return Err(ApiError::BodyRead(e.to_string())),
        }
    };
    // A client waiting for `100 Continue` has sent nothing more and gets
    // the 413 (or 503) at once; one that is still sending gets it too,
    // because the rest is read and dropped meanwhile: on HTTP/1.1 by the
    // connection once it has answered (its lingering close,
    // `server::http1`), on HTTP/2 here, per stream (which also gives its
    // connection's window back).
    if http2 && headers.get(Name::Expect).is_none() {
        linger(body, shared.stopping.clone());
    }
    Err(refusal)
}

/// Why [`collect`] stopped short of the body's end.
enum Collect {
    /// More than the limit: the rest is still in the body, to drain.
    TooLarge,
    /// No room in the body budget, for a body that may not wait for it.
    NoRoom,
    Failed(RequestBodyError),
}

/// How a body of no declared length takes its room as it arrives.
struct Grow<'a> {
    budget: &'a BodyBudget,
    room: &'a mut Room,
    uncounted: usize,
    /// Wait for room (HTTP/1.1), or give up at once (HTTP/2).
    wait: bool,
}

/// The body's bytes, at most `limit` of them. A body that arrives in one
/// frame (the usual case: it came with the head) is that frame, not a
/// copy; a longer one is gathered into one buffer. With `promises`, what
/// the body's framing has promised (the rest of a chunk) counts too. With
/// `grow` (a body of no declared length), room is reserved for what
/// arrives before it is kept.
async fn collect(
    body: &mut ClientBody,
    limit: usize,
    promises: bool,
    mut grow: Option<Grow<'_>>,
) -> Result<Bytes, Collect> {
    let mut whole = Bytes::new();
    let mut gathered: Option<BytesMut> = None;
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        // Trailers carry nothing weir forwards.
        let Ok(data) = frame.map_err(Collect::Failed)?.into_data() else {
            continue;
        };
        len = len.saturating_add(data.len());
        let promised = if promises {
            usize::try_from(hyper::body::Body::size_hint(&*body).lower()).unwrap_or(usize::MAX)
        } else {
            0
        };
        if len.saturating_add(promised) > limit {
            return Err(Collect::TooLarge);
        }
        if let Some(grow) = &mut grow {
            if grow.wait {
                grow.budget
                    .reserve_read(grow.room, len, limit, grow.uncounted)
                    .await;
            } else if !grow.budget.try_reserve_read(grow.room, len, grow.uncounted) {
                return Err(Collect::NoRoom);
            }
        }
        if whole.is_empty() && gathered.is_none() {
            whole = data;
        } else {
            gathered
                .get_or_insert_with(|| {
                    // Room for the whole body when its length is known,
                    // not doubling (which could hold twice what the body
                    // budget counts).
                    let rest = hyper::body::Body::size_hint(&*body).lower();
                    let rest = usize::try_from(rest).unwrap_or(0);
                    let mut all = BytesMut::with_capacity(len.saturating_add(rest).min(limit));
                    all.extend_from_slice(&whole);
                    all
                })
                .extend_from_slice(&data);
        }
    }
    if let Some(grow) = grow {
        grow.budget.fit(grow.room, len, grow.uncounted);
    }
    Ok(gathered.map_or(whole, BytesMut::freeze))
}

/// nginx's lingering close, for one HTTP/2 stream: reads and drops what
/// the client still sends of a refused body (up to [`LINGER_BYTES`], for
/// as long as [`lingering`] allows, which is shorter once a shutdown
/// starts), so a client that is still writing reads the 413 instead of a
/// stream reset. hyper writes the answer meanwhile.
fn linger(mut body: ClientBody, stopping: CancellationToken) {
    tokio::spawn(async move {
        let drain = async {
            let mut read = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if read > LINGER_BYTES as u64 {
                    break;
                }
            }
        };
        lingering(drain, &stopping).await;
    });
}

#[cfg(test)]
mod tests {
    use super::is_event_stream;

    #[test]
    fn event_streams_are_known_in_any_case_with_parameters() {
        for yes in [
            &b"text/event-stream"[..],
            b"Text/Event-Stream; charset=utf-8",
            b"TEXT/EVENT-STREAM ;charset=utf-8",
        ] {
            assert!(is_event_stream(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"application/json"[..],
            b"text/event-streams",
            b"text/event",
            b"",
        ] {
            assert!(!is_event_stream(no), "{}", String::from_utf8_lossy(no));
        }
    }
}
