//! Header hygiene at the proxy boundary.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and every header it
//! names, plus the classic list from RFC 2616 §13.5.1 that proxies still
//! strip) describe one connection and are removed in both directions. The
//! client's credentials never reach a backend; the backend's key is injected
//! instead. This module does not decide *which* key: `proxy` passes it in.

use http::{header, HeaderMap, HeaderName, HeaderValue};

use crate::upstream::codec::{self, HeaderLines, Line, Name, RawHeaders};

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

/// Removes a backend's `x-ratelimit-*` headers (an https backend's, which
/// arrive in a map): the client reads weir's limits or none.
pub(crate) fn strip_rate_headers(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| codec::Name::of(name.as_str().as_bytes()) == codec::Name::RateLimit)
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

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

/// A client request's headers: as an HTTP/1.1 head carried them (its
/// bytes, read in place: building an `http::HeaderMap` per request, to read
/// a few headers and write the rest out again, cost more than any other
/// step of the request), or the map hyper's HTTP/2 server hands over.
#[derive(Debug)]
pub(crate) enum ClientHeaders {
    Raw(RawHeaders),
    Map(HeaderMap),
}

impl ClientHeaders {
    /// The first value of kind `kind` (one of the single names weir reads).
    pub(crate) fn get(&self, kind: Name) -> Option<&[u8]> {
        match self {
            Self::Raw(raw) => raw.get(kind),
            Self::Map(map) => map.get(kind.header_name()?).map(HeaderValue::as_bytes),
        }
    }

    /// Every value of kind `kind`, in order.
    pub(crate) fn values(&self, kind: Name) -> impl Iterator<Item = &[u8]> {
        match self {
            Self::Raw(raw) => Either::Raw(raw.values(kind)),
            Self::Map(map) => Either::Map(
                kind.header_name()
                    .into_iter()
                    .flat_map(|name| map.get_all(name).into_iter().map(HeaderValue::as_bytes)),
            ),
        }
    }

    /// The first value of kind `kind` as a header value (sharing the
    /// head's bytes for HTTP/1.1).
    pub(crate) fn value(&self, kind: Name) -> Option<HeaderValue> {
        match self {
            Self::Raw(raw) => raw.value(kind),
            Self::Map(map) => map.get(kind.header_name()?).cloned(),
        }
    }

    /// Each header's kind, name and value, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Name, &[u8], &[u8])> {
        match self {
            Self::Raw(raw) => Either::Raw(raw.iter()),
            Self::Map(map) => Either::Map(map.iter().map(|(name, value)| {
                let name = name.as_str().as_bytes();
                (Name::of(name), name, value.as_bytes())
            })),
        }
    }

    /// Whether a `Connection` header names `name`, which makes it
    /// hop-by-hop for this request.
    pub(crate) fn named_by_connection(&self, name: &[u8]) -> bool {
        match self {
            Self::Raw(raw) => raw.named_by_connection(name),
            Self::Map(map) => map
                .get_all(header::CONNECTION)
                .iter()
                .flat_map(|v| codec::connection_names(v.as_bytes()))
                .any(|t| t.eq_ignore_ascii_case(name)),
        }
    }

    /// Bytes of the header section as sent: `name: value` and CRLF per
    /// field.
    pub(crate) fn section_len(&self) -> usize {
        match self {
            Self::Raw(raw) => raw.section_len(),
            Self::Map(map) => map
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 4)
                .sum(),
        }
    }
}

/// An iterator over either form of [`ClientHeaders`]: one `match` per
/// item, where chaining two optional iterators cost more than the lookups.
enum Either<R, M> {
    Raw(R),
    Map(M),
}

impl<T, R: Iterator<Item = T>, M: Iterator<Item = T>> Iterator for Either<R, M> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        match self {
            Either::Raw(raw) => raw.next(),
            Either::Map(map) => map.next(),
        }
    }
}

/// A client's headers as they go to a backend: hop-by-hop ones (RFC 9110
/// §7.6.1, with those `Connection` names) and the client's credentials for
/// weir left out, and weir's `x-request-id` in place of the client's. The
/// request writers add the backend's `Host`, length and key
/// (`codec::encode_request_head`, or hyper from `to_map`).
pub(crate) struct Upstream<'a> {
    pub client: &'a ClientHeaders,
    pub request_id: &'a HeaderValue,
}

impl Upstream<'_> {
    /// Whether the client's header `name` (of kind `kind`) goes upstream.
    /// Besides the credentials and the request id (replaced), `Expect` stays
    /// behind (weir sends the whole body at once, as nginx does) and so does
    /// `Accept-Encoding` (replaced by `identity`: weir reads `usage` from
    /// the answer and removes its own usage chunk, neither of which it can
    /// do in compressed bytes), and so do the scopes of the client's own key
    /// ([`scopes_the_client_key`]).
    fn passes(&self, kind: Name, name: &[u8]) -> bool {
        let replaced = matches!(
            kind,
            Name::Authorization
                | Name::XApiKey
                | Name::ApiKey
                | Name::RequestId
                | Name::Expect
                | Name::AcceptEncoding
        ) || (kind == Name::Other && scopes_the_client_key(name));
        !replaced && !kind.is_hop_by_hop() && !self.client.named_by_connection(name)
    }

    /// The same headers as a map, for hyper (`https://` backends), which
    /// sets `Host` and the length itself.
    pub(crate) fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        self.each(&mut |kind, name, value| {
            if matches!(kind, Name::Host | Name::ContentLength) {
                return;
            }
            // Both were valid when the request was read.
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            {
                map.append(name, value);
            }
        });
        map
    }
}

impl HeaderLines for Upstream<'_> {
    /// The client's headers that pass, in its order, then the request id
    /// and `accept-encoding: identity` (see [`Upstream::passes`]).
    /// Every `Cookie` goes as one line, at the first one's place, its
    /// values joined with `"; "` (see [`join_cookies`]).
    fn each(&self, line: &mut Line<'_>) {
        let mut cookie_sent = false;
        for (kind, name, value) in self.client.iter() {
            if !self.passes(kind, name) {
                continue;
            }
            if kind == Name::Cookie {
                if cookie_sent {
                    continue;
                }
                cookie_sent = true;
                if let Some(joined) = join_cookies(self.client) {
                    line(kind, name, &joined);
                    continue;
                }
            }
            line(kind, name, value);
        }
        line(Name::RequestId, b"x-request-id", self.request_id.as_bytes());
        line(Name::AcceptEncoding, b"accept-encoding", b"identity");
    }
}

/// The client's `Cookie` values joined with `"; "`, or `None` when it sent
/// at most one (nothing to join, nothing allocated). An HTTP/2 client may
/// split its cookies into one field per crumb (RFC 9113 §8.2.3), which
/// must be joined before they go to an HTTP/1.1 hop, where a server reads
/// one `Cookie` line (RFC 6265 §5.4: a client sends one). Joined for
/// HTTP/1.1 clients too: their only way to send two lines is to break
/// that rule, and a backend that reads the first line alone would see
/// part of the cookies.
fn join_cookies(client: &ClientHeaders) -> Option<Vec<u8>> {
    let mut values = client.values(Name::Cookie);
    let first = values.next()?;
    let mut rest = values.peekable();
    rest.peek()?;
    let mut joined = first.to_vec();
    for value in rest {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value);
    }
    Some(joined)
}

/// Whether `name` is `OpenAI-Organization` or `OpenAI-Project` (any case):
/// they pick the organization and project the client's own key acts for.
/// weir sends the backend's key instead of the client's, and a provider may
/// refuse that key beside an organization or project it does not belong to,
/// so they stay behind with the key they scope. One length compare for
/// nearly every other header.
fn scopes_the_client_key(name: &[u8]) -> bool {
    match name.len() {
        14 => name.eq_ignore_ascii_case(b"openai-project"),
        19 => name.eq_ignore_ascii_case(b"openai-organization"),
        _ => false,
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

    /// A client head as the HTTP/1.1 server reads it.
    fn raw(head: &str) -> ClientHeaders {
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut slots);
        let len = match request.parse(head.as_bytes()).unwrap() {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => panic!("partial head"),
        };
        let spans = codec::Spans::new(head.as_bytes(), request.headers);
        let bytes = bytes::Bytes::copy_from_slice(&head.as_bytes()[..len]);
        ClientHeaders::Raw(RawHeaders::new(bytes, &spans))
    }

    #[test]
    fn upstream_headers_leave_out_hop_by_hop_credentials_their_scopes_and_the_client_id() {
        let id = HeaderValue::from_static("weir-id");
        let head =
            "POST / HTTP/1.1\r\nHost: weir.local\r\nConnection: keep-alive, X-Secret-Hop\r\n\
            x-secret-hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\n\
            Authorization: Bearer client-key\r\nx-api-key: k\r\napi-key: k\r\n\
            X-Request-Id: client-id\r\nX-End-To-End: kept\r\nContent-Length: 2\r\n\
            Expect: 100-continue\r\nAccept-Encoding: gzip, br\r\n\
            OpenAI-Organization: org-client\r\nopenai-project: proj_client\r\n\r\n";
        let mut map = HeaderMap::new();
        map.insert(header::HOST, HeaderValue::from_static("weir.local"));
        map.insert(header::CONNECTION, HeaderValue::from_static("x-secret-hop"));
        map.insert("x-secret-hop", HeaderValue::from_static("1"));
        map.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client-key"),
        );
        map.insert("x-request-id", HeaderValue::from_static("client-id"));
        map.insert("x-end-to-end", HeaderValue::from_static("kept"));
        map.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        map.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        map.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        map.insert(
            "openai-organization",
            HeaderValue::from_static("org-client"),
        );
        map.insert("openai-project", HeaderValue::from_static("proj_client"));
        for client in [raw(head), ClientHeaders::Map(map)] {
            let upstream = Upstream {
                client: &client,
                request_id: &id,
            };
            let mut lines: Vec<(String, String)> = Vec::new();
            upstream.each(&mut |_, n, v| {
                lines.push((
                    String::from_utf8_lossy(n).to_lowercase(),
                    String::from_utf8_lossy(v).into_owned(),
                ));
            });
            // Host and the length are left to the writers.
            let names: Vec<&str> = lines.iter().map(|(n, _)| n.as_str()).collect();
            // `Expect` stays behind, and so do the organization and project
            // of the client's key; the client's encodings give way to
            // `identity`, so the answer's usage can be read.
            assert_eq!(
                names,
                [
                    "host",
                    "x-end-to-end",
                    "content-length",
                    "x-request-id",
                    "accept-encoding"
                ],
                "{client:?}"
            );
            assert_eq!(lines[3].1, "weir-id");
            assert_eq!(lines[4].1, "identity");
            let map = upstream.to_map();
            assert_eq!(map.len(), 3, "{map:?}");
            assert_eq!(map["x-end-to-end"], "kept");
            assert_eq!(map["x-request-id"], "weir-id");
            assert_eq!(map["accept-encoding"], "identity");
        }
    }

    #[test]
    fn cookie_crumbs_go_upstream_as_one_line_at_the_first_ones_place() {
        let id = HeaderValue::from_static("weir-id");
        let head = "POST / HTTP/1.1\r\nHost: a\r\nCookie: a=1\r\nx-b: 2\r\n\
            cookie: b=2\r\nCOOKIE: c=3\r\n\r\n";
        let mut map = HeaderMap::new();
        map.insert(header::HOST, HeaderValue::from_static("a"));
        map.append(header::COOKIE, HeaderValue::from_static("a=1"));
        map.insert("x-b", HeaderValue::from_static("2"));
        map.append(header::COOKIE, HeaderValue::from_static("b=2"));
        map.append(header::COOKIE, HeaderValue::from_static("c=3"));
        for client in [raw(head), ClientHeaders::Map(map)] {
            let upstream = Upstream {
                client: &client,
                request_id: &id,
            };
            let mut cookies = Vec::new();
            upstream.each(&mut |kind, _, v| {
                if kind == Name::Cookie {
                    cookies.push(String::from_utf8_lossy(v).into_owned());
                }
            });
            assert_eq!(cookies, ["a=1; b=2; c=3"], "{client:?}");
            let map = upstream.to_map();
            assert_eq!(map.get_all(header::COOKIE).iter().count(), 1);
            assert_eq!(map[header::COOKIE], "a=1; b=2; c=3");
        }
        // One cookie line is passed as it is.
        let client = raw("POST / HTTP/1.1\r\nHost: a\r\nCookie: a=1; b=2\r\n\r\n");
        assert_eq!(join_cookies(&client), None);
        let upstream = Upstream {
            client: &client,
            request_id: &id,
        };
        let mut lines = Vec::new();
        upstream.each(&mut |_, n, v| lines.push((n.to_vec(), v.to_vec())));
        assert_eq!(lines[1], (b"Cookie".to_vec(), b"a=1; b=2".to_vec()));
    }

    #[test]
    fn client_headers_are_found_by_kind_in_any_case() {
        let head = "POST / HTTP/1.1\r\nHOST: a\r\nx-request-ID: r1\r\nConnection: close\r\n\
            connection: x-a\r\nContent-Length: 2\r\n\r\n";
        let client = raw(head);
        assert_eq!(client.get(Name::Host), Some(&b"a"[..]));
        assert_eq!(client.value(Name::RequestId).unwrap(), "r1");
        assert_eq!(
            client.values(Name::Connection).collect::<Vec<_>>(),
            [&b"close"[..], b"x-a"]
        );
        assert!(client.named_by_connection(b"X-A"));
        assert!(!client.named_by_connection(b"close"));
        assert_eq!(
            client.section_len(),
            head.len() - "POST / HTTP/1.1\r\n\r\n".len()
        );
        assert_eq!(client.get(Name::Expect), None);
    }

    #[test]
    fn the_backend_key_is_sensitive() {
        let key = bearer("sk-backend").unwrap();
        assert!(key.is_sensitive());
    }
}
