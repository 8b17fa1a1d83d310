//! Header hygiene at the proxy boundary.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and every header it
//! names, plus the classic list from RFC 2616 §13.5.1 that proxies still
//! strip) describe one connection and are removed in both directions. The
//! client's credentials never reach a backend; the backend's key is injected
//! instead. This module does not decide *which* key: `proxy` passes it in.

use http::{header, HeaderMap, HeaderName, HeaderValue};

use crate::upstream::codec;

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

/// `x-request-id`: built at compile time, like the other names weir reads
/// or sets on every request (a `&str` key is parsed, and for an insert
/// copied, each time).
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `x-weir-backend`: which backend answered.
pub(crate) const X_WEIR_BACKEND: HeaderName = HeaderName::from_static("x-weir-backend");
/// `x-api-key`: the other place clients put their key.
pub(crate) const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Client headers that carry the client's own credentials for weir.
const CLIENT_CREDENTIALS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    X_API_KEY,
    HeaderName::from_static("api-key"),
];

/// Removes `Connection`, every header it names, and the fixed hop-by-hop
/// list, plus `Upgrade` (weir does not tunnel protocol switches).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Both directions of every request pass here, and most messages carry
    // at most `Connection: keep-alive`: one pass over the names decides
    // what there is to remove.
    let mut connection = false;
    let mut others = false;
    for name in headers.keys() {
        if name == header::CONNECTION {
            connection = true;
        } else if name == header::UPGRADE || HOP_BY_HOP.contains(name) {
            others = true;
        }
    }
    if connection {
        // Collect the names listed in `Connection` before removing it.
        // Unparsable tokens are ignored: they cannot name a header we could
        // remove anyway; `keep-alive` and `close` name nothing the fixed
        // list does not cover.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| codec::connection_names(v.as_bytes()))
            .filter_map(|token| HeaderName::from_bytes(token).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    if others {
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
        headers.remove(header::UPGRADE);
    }
}

/// Prepares client request headers for a backend: hop-by-hop and client
/// credentials removed, the backend's key injected. The client's `Host` and
/// `Content-Length` stay in the map (removing them cost a hash and a probe
/// each, per request) and are replaced where the request is written:
/// `codec::encode_request_head` writes the backend's instead, and
/// `Forward::to_request` drops them for hyper to set.
pub(crate) fn to_upstream(headers: &mut HeaderMap, backend_key: Option<&HeaderValue>) {
    strip_hop_by_hop(headers);
    // One pass over the few names a request has finds what to remove; a
    // `remove` of an absent name still hashes and probes.
    let credentials = headers.keys().any(|name| CLIENT_CREDENTIALS.contains(name));
    if credentials {
        for name in &CLIENT_CREDENTIALS {
            headers.remove(name);
        }
    }
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
        assert!(format!("{h:?}").contains("Sensitive"));
    }
}
