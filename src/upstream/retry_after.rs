//! A backend's `Retry-After` (RFC 9110 §10.2.3), read the same way
//! wherever weir hears one: from a proxied request's 429 (out of rotation
//! until then) or 503 (that request's retries wait), and from a health
//! probe's 429 (out of rotation and not probed until then).

use std::time::{Duration, SystemTime};

use http::{header, Response};

use super::{codec::Name, UpstreamBody};

/// The wait a 429 without a readable `Retry-After` stands for: the
/// HTTP-date form is rare from inference servers and a missing header is
/// common; a second keeps a busy backend out briefly without starving it.
pub(crate) const DEFAULT: Duration = Duration::from_secs(1);

/// The longest wait a backend can ask for, so it cannot take itself out of
/// rotation (or out of its probes) for days.
pub(crate) const MAX: Duration = Duration::from_secs(3600);

/// A 429's `Retry-After`, or [`DEFAULT`] when it sent none weir can read.
pub(crate) fn retry_after(response: &Response<UpstreamBody>) -> Duration {
    retry_after_given(response).unwrap_or(DEFAULT)
}

/// A backend's `Retry-After`, if it sent one (capped at [`MAX`]): in the
/// header map for an `https://` backend or a probe, kept as received for a
/// proxied request to a plain one.
pub(crate) fn retry_after_given(response: &Response<UpstreamBody>) -> Option<Duration> {
    response
        .headers()
        .get(header::RETRY_AFTER)
        .map(http::HeaderValue::as_bytes)
        .or_else(|| response.body().raw_headers()?.get(Name::RetryAfter))
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
}

/// A `Retry-After` value: delay-seconds, or an HTTP-date counted from
/// `now` (a date already past is no wait); at most [`MAX`].
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    // Delay-seconds is digits only (RFC 9110 §10.2.3): `+30` is no value,
    // though Rust's integer parser would take it.
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too large for 64 bits is still a (very long) wait.
        value.parse::<u64>().map_or(MAX, Duration::from_secs)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::parse_retry_after;

    #[test]
    fn retry_after_takes_seconds_or_a_date_capped_at_an_hour() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let secs = |s| Some(Duration::from_secs(s));
        // Wed, 21 Oct 2015 07:28:00 GMT is `now`.
        for (value, wait) in [
            ("120", secs(120)),
            (" 7 ", secs(7)),
            ("0", secs(0)),
            ("86400", secs(3600)),
            ("99999999999999999999", secs(3600)),
            ("Wed, 21 Oct 2015 07:28:08 GMT", secs(8)),
            ("Wed, 21 Oct 2015 07:27:00 GMT", secs(0)),
            ("Thu, 22 Oct 2015 07:28:00 GMT", secs(3600)),
            ("Wednesday, 21-Oct-15 07:28:30 GMT", secs(30)),
            ("-1", None),
            ("+30", None),
            ("1.5", None),
            ("soon", None),
            ("", None),
        ] {
            assert_eq!(parse_retry_after(value, now), wait, "{value:?}");
        }
    }
}
