//! Header hygiene at the proxy boundary.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and every header it
//! names, plus the classic list from RFC 2616 §13.5.1 that proxies still
//! strip) describe one connection and are removed in both directions. The
//! client's credentials never reach a backend; the backend's key is injected
//! instead. This module does not decide *which* key: `proxy` passes it in.

use http::{header, HeaderMap, HeaderName, HeaderValue};

/// Headers that are hop-by-hop whether or not `Connection` names them.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Client headers that carry the client's own credentials for weir.
const CLIENT_CREDENTIALS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
];

/// Removes `Connection`, every header it names, and the fixed hop-by-hop
/// list, plus `Upgrade` (weir does not tunnel protocol switches).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Collect the names listed in `Connection` before removing it. Unparsable
    // tokens are ignored: they cannot name a header we could remove anyway.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Prepares client request headers for a backend: hop-by-hop and client
/// credentials removed, `Host` and `Content-Length` left for the client
/// library to set from the URI and the body, the backend's key injected.
pub(crate) fn to_upstream(headers: &mut HeaderMap, backend_key: Option<&HeaderValue>) {
    strip_hop_by_hop(headers);
    for name in &CLIENT_CREDENTIALS {
        headers.remove(name);
    }
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    if let Some(key) = backend_key {
        headers.insert(header::AUTHORIZATION, key.clone());
    }
}

/// `Authorization: Bearer KEY` for a backend key, marked sensitive so that
/// hyper's and http's debug output never prints it. `None` if the key holds
/// bytes that cannot be a header value (rejected at config validation, so
/// this only guards against surprises).
pub(crate) fn bearer(key: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::try_from(format!("Bearer {key}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-end-to-end"], "kept");
    }

    #[test]
    fn replaces_client_credentials_with_backend_key() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client-key"),
        );
        h.insert("x-api-key", HeaderValue::from_static("client-key"));
        h.insert(header::HOST, HeaderValue::from_static("weir.local"));
        let key = bearer("sk-backend").unwrap();
        to_upstream(&mut h, Some(&key));
        assert_eq!(h[header::AUTHORIZATION], "Bearer sk-backend");
        assert!(h.get("x-api-key").is_none());
        assert!(h.get(header::HOST).is_none());
        assert!(format!("{h:?}").contains("Sensitive"));
    }
}
