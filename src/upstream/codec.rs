//! HTTP/1.1 as weir speaks it to a plain-http backend: the request head it
//! writes, and the response head and body framing it reads (RFC 9112).
//!
//! Pure functions over byte buffers, so every framing rule is unit-tested
//! without a socket; [`super::conn`] does the I/O. Header parsing is
//! `httparse` (hyper's own parser); body frames are zero-copy slices of the
//! read buffer, as in hyper's decoder.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

/// The largest response head weir accepts. Inference servers send a few
/// hundred bytes; nginx's default `proxy_buffer_size` is 4-8 KiB.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Header lines per response head (hyper's limit).
const MAX_HEADERS: usize = 100;
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 1024;
/// The most trailer bytes weir reads (and drops) after the last chunk, in
/// all.
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Header positions kept on the stack while reading a head.
const SMALL_HEAD: usize = 16;

/// Where one header's name and value sit in the head: name start and end,
/// value start and end.
#[derive(Debug, Default, Clone, Copy)]
struct Span(usize, usize, usize, usize);

/// Where each header of a parsed head sits in the read buffer, so the
/// values can become zero-copy slices of the frozen head once the parser's
/// borrow of the buffer ends. A peer sends a handful; more than fit on the
/// stack spill over.
pub(crate) struct Spans {
    small: [Span; SMALL_HEAD],
    spill: Vec<Span>,
    count: usize,
}

impl Spans {
    /// The spans of `headers`, which `httparse` parsed out of `buf`.
    pub(crate) fn new(buf: &[u8], headers: &[httparse::Header<'_>]) -> Self {
        let base = buf.as_ptr() as usize;
        let mut spans = Spans {
            small: [Span::default(); SMALL_HEAD],
            spill: Vec::new(),
            count: headers.len(),
        };
        for (i, h) in headers.iter().enumerate() {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            let span = Span(name, name + h.name.len(), value, value + h.value.len());
            match spans.small.get_mut(i) {
                Some(slot) => *slot = span,
                None => spans.spill.push(span),
            }
        }
        spans
    }

    /// Each span, in the order parsed.
    fn iter(&self) -> impl Iterator<Item = &Span> {
        self.small.iter().take(self.count).chain(&self.spill)
    }
}

/// The headers at `spans` in `raw`, as a map whose values are slices of
/// `raw`, made for `capacity` headers.
fn header_map<'a>(
    raw: &Bytes,
    spans: impl Iterator<Item = &'a Span>,
    capacity: usize,
) -> Result<HeaderMap, Malformed> {
    let mut headers = HeaderMap::with_capacity(capacity);
    for &Span(ns, ne, vs, ve) in spans {
        let name = HeaderName::from_bytes(raw.get(ns..ne).unwrap_or_default())
            .map_err(|_| Malformed("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(raw.slice(vs..ve))
            .map_err(|_| Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// The header names a `Connection` value lists besides `keep-alive` and
/// `close`: hop-by-hop for that message (RFC 9110 §7.6.1).
pub(crate) fn connection_names(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case(b"keep-alive")
                && !t.eq_ignore_ascii_case(b"close")
        })
}

/// A response's headers as the backend sent them: the head's bytes and
/// where each header sits in them. The proxy writes them to an HTTP/1.1
/// client line by line (hop-by-hop ones left out) and looks up the few it
/// reads by a scan, instead of building an `http::HeaderMap` (hashing and
/// validating every name and value again, two allocations) that is read
/// once and dropped. `httparse` has already checked the names are tokens
/// and the values hold no control characters, as `HeaderMap` would.
#[derive(Debug, Clone, Default)]
pub struct RawHeaders {
    raw: Bytes,
    /// Each header: what it is, by name (decided once while reading the
    /// head), and where it sits in `raw`.
    entries: Vec<(Name, Span)>,
    /// Whether a `Connection` header names other headers (rare): those are
    /// hop-by-hop too, and found by comparing names.
    connection_names: bool,
}

/// The header names a proxy acts on, told apart once per header (by length,
/// then one case-insensitive comparison) so that later lookups compare a
/// byte instead of names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Name {
    Connection,
    ContentLength,
    TransferEncoding,
    ContentType,
    /// Read only to refuse a request body weir cannot parse.
    ContentEncoding,
    Date,
    RetryAfter,
    /// Request headers weir reads or replaces.
    Host,
    Expect,
    /// `cookie`: sent upstream as one line (`headers::Upstream`).
    Cookie,
    AcceptEncoding,
    Authorization,
    XApiKey,
    /// `api-key` (Azure OpenAI's spelling of the client's key).
    ApiKey,
    RequestId,
    /// The other hop-by-hop names: `keep-alive`, `proxy-connection`,
    /// `proxy-authenticate`, `proxy-authorization`, `te`, `trailer`,
    /// `upgrade`.
    HopByHop,
    /// `x-ratelimit-*`.
    RateLimit,
    Other,
}

impl Name {
    /// The kind of the header named `name` (any case; a token, as every
    /// parser weir takes names from checks).
    pub(crate) fn of(name: &[u8]) -> Self {
        let is = |known: &[u8]| token_is(name, known);
        match name.len() {
            2 if is(b"te") => Name::HopByHop,
            4 if is(b"date") => Name::Date,
            4 if is(b"host") => Name::Host,
            6 if is(b"expect") => Name::Expect,
            6 if is(b"cookie") => Name::Cookie,
            7 if is(b"trailer") || is(b"upgrade") => Name::HopByHop,
            7 if is(b"api-key") => Name::ApiKey,
            9 if is(b"x-api-key") => Name::XApiKey,
            10 if is(b"connection") => Name::Connection,
            10 if is(b"keep-alive") => Name::HopByHop,
            11 if is(b"retry-after") => Name::RetryAfter,
            12 if is(b"content-type") => Name::ContentType,
            12 if is(b"x-request-id") => Name::RequestId,
            13 if is(b"authorization") => Name::Authorization,
            14 if is(b"content-length") => Name::ContentLength,
            15 if is(b"accept-encoding") => Name::AcceptEncoding,
            16 if is(b"proxy-connection") => Name::HopByHop,
            16 if is(b"content-encoding") => Name::ContentEncoding,
            17 if is(b"transfer-encoding") => Name::TransferEncoding,
            18 if is(b"proxy-authenticate") => Name::HopByHop,
            19 if is(b"proxy-authorization") => Name::HopByHop,
            n if n > 12 && name[..12].eq_ignore_ascii_case(b"x-ratelimit-") => Name::RateLimit,
            _ => Name::Other,
        }
    }

    /// The header this kind stands for, when it is a single name.
    pub(crate) fn header_name(self) -> Option<HeaderName> {
        Some(match self {
            Name::Connection => header::CONNECTION,
            Name::ContentLength => header::CONTENT_LENGTH,
            Name::TransferEncoding => header::TRANSFER_ENCODING,
            Name::ContentType => header::CONTENT_TYPE,
            Name::ContentEncoding => header::CONTENT_ENCODING,
            Name::Date => header::DATE,
            Name::RetryAfter => header::RETRY_AFTER,
            Name::Host => header::HOST,
            Name::Expect => header::EXPECT,
            Name::Cookie => header::COOKIE,
            Name::AcceptEncoding => header::ACCEPT_ENCODING,
            Name::Authorization => header::AUTHORIZATION,
            Name::XApiKey => crate::headers::X_API_KEY,
            Name::ApiKey => HeaderName::from_static("api-key"),
            Name::RequestId => crate::headers::X_REQUEST_ID,
            Name::HopByHop | Name::RateLimit | Name::Other => return None,
        })
    }

    /// Whether a header of this name describes one connection only (RFC
    /// 9110 §7.6.1), so a proxy never passes it on.
    pub(crate) fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            Name::Connection | Name::TransferEncoding | Name::HopByHop
        )
    }
}

impl RawHeaders {
    /// The headers at `spans` in `raw` (the frozen head they were parsed
    /// from).
    pub(crate) fn new(raw: Bytes, spans: &Spans) -> Self {
        let mut entries = Vec::with_capacity(spans.count);
        let mut connection_names_any = false;
        for span in spans.iter() {
            let (name, value) = at(&raw, *span);
            let kind = Name::of(name);
            connection_names_any |=
                kind == Name::Connection && connection_names(value).next().is_some();
            entries.push((kind, *span));
        }
        Self {
            raw,
            entries,
            connection_names: connection_names_any,
        }
    }

    /// Each header's kind, name and value, in the order received.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Name, &[u8], &[u8])> + '_ {
        self.entries.iter().map(|&(kind, span)| {
            let (name, value) = at(&self.raw, span);
            (kind, name, value)
        })
    }

    /// The values of every header of kind `kind`, in order.
    pub(crate) fn values(&self, kind: Name) -> impl Iterator<Item = &[u8]> + '_ {
        // By kind first: only the values wanted are sliced out.
        self.entries
            .iter()
            .filter(move |&&(k, _)| k == kind)
            .map(|&(_, span)| at(&self.raw, span).1)
    }

    /// The first value of kind `kind`.
    pub(crate) fn get(&self, kind: Name) -> Option<&[u8]> {
        self.values(kind).next()
    }

    /// Whether the header named `name` is one that a `Connection` header
    /// names (other than `keep-alive` and `close`), which makes it
    /// hop-by-hop for this message.
    pub(crate) fn named_by_connection(&self, name: &[u8]) -> bool {
        self.connection_names
            && self
                .values(Name::Connection)
                .flat_map(connection_names)
                .any(|t| t.eq_ignore_ascii_case(name))
    }

    /// The first value of kind `kind` as a header value sharing the head's
    /// bytes (no copy). `None` when absent, or not a valid value.
    pub(crate) fn value(&self, kind: Name) -> Option<HeaderValue> {
        let &(_, Span(_, _, vs, ve)) = self.entries.iter().find(|(k, _)| *k == kind)?;
        HeaderValue::from_maybe_shared(self.raw.slice(vs..ve)).ok()
    }

    /// Bytes of the header section as sent: `name: value` and CRLF per
    /// field.
    pub(crate) fn section_len(&self) -> usize {
        self.entries
            .iter()
            .map(|&(_, Span(ns, ne, vs, ve))| (ne - ns) + (ve - vs) + 4)
            .sum()
    }

    /// The headers as a map, for callers that want one (health probes,
    /// through `PlainClient::send`).
    pub(crate) fn to_map(&self) -> Result<HeaderMap, Malformed> {
        header_map(
            &self.raw,
            self.entries.iter().map(|(_, span)| span),
            self.entries.len(),
        )
    }
}

/// Whether the token `name` is `known` (lowercase letters, digits and
/// `-`), in any case. Setting bit 5 lowercases a letter and leaves `-` and
/// digits as they are; the only other bytes it could turn into one of
/// those are control characters, which no token holds. Eight bytes are
/// compared at a time: every request and response classifies its header
/// names with this.
fn token_is(name: &[u8], known: &[u8]) -> bool {
    const LOWER: u64 = 0x2020_2020_2020_2020;
    fn word(bytes: &[u8]) -> u64 {
        match <[u8; 8]>::try_from(bytes) {
            Ok(whole) => u64::from_le_bytes(whole),
            Err(_) => bytes
                .iter()
                .rev()
                .fold(0, |word, &b| (word << 8) | u64::from(b)),
        }
    }
    if name.len() != known.len() {
        return false;
    }
    let mut name = name.chunks(8);
    let mut known = known.chunks(8);
    loop {
        match (name.next(), known.next()) {
            (Some(n), Some(k)) => {
                let mask = LOWER >> (8 * (8 - n.len()));
                if word(n) | mask != word(k) {
                    return false;
                }
            }
            _ => return true,
        }
    }
}

/// The name and value a span marks in `raw`.
fn at(raw: &[u8], Span(ns, ne, vs, ve): Span) -> (&[u8], &[u8]) {
    (
        raw.get(ns..ne).unwrap_or_default(),
        raw.get(vs..ve).unwrap_or_default(),
    )
}

/// Bytes from a backend that are not acceptable HTTP/1.1. The connection
/// is closed; before the response head this is a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed response: {0}")]
pub struct Malformed(pub &'static str);

/// Headers a request head is written from, one `name: value` line each:
/// a map (health probes), or a client's headers filtered on the way
/// (`headers::Upstream`) without being copied into one.
pub(crate) trait HeaderLines {
    /// Calls `line` with each header's kind, name and value, in order.
    fn each(&self, line: &mut Line<'_>);
}

/// What [`HeaderLines::each`] calls per header: its kind, name and value.
pub(crate) type Line<'f> = dyn FnMut(Name, &[u8], &[u8]) + 'f;

impl HeaderLines for HeaderMap {
    fn each(&self, line: &mut Line<'_>) {
        for (name, value) in self {
            let name = name.as_str().as_bytes();
            line(Name::of(name), name, value.as_bytes());
        }
    }
}

/// What a request head is written from: borrowed pieces, so the proxy
/// needs neither an `http::Request` nor a copy of the client's headers.
pub(crate) struct RequestHead<'a> {
    pub method: &'a Method,
    /// The request target, in pieces written one after the other (e.g. the
    /// backend's base path, the client's path, `?`, the query).
    pub target: &'a [&'a str],
    /// The `Host` value, unless `headers` carry one.
    pub host: Option<&'a str>,
    /// Headers sent as they are, minus `Host`, `Content-Length` and
    /// `Transfer-Encoding` (the body is always sent whole, with its length).
    pub headers: &'a (dyn HeaderLines + Sync),
    /// Sent as `Authorization`, in place of any in `headers`.
    pub authorization: Option<&'a HeaderValue>,
    pub body_len: usize,
}

/// Appends the request head: request line, `Host`, the headers, the
/// backend's `Authorization`, and `Content-Length` for the body.
pub(crate) fn encode_request_head(head: &RequestHead<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    let start = out.len();
    for piece in head.target {
        out.extend_from_slice(piece.as_bytes());
    }
    if out.len() == start {
        out.push(b'/');
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let line = |out: &mut Vec<u8>, name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    if let Some(host) = head.host {
        line(out, b"host", host.as_bytes());
    }
    head.headers.each(&mut |kind, name, value| {
        // The client's `Host` and framing are the client's hop to weir:
        // the backend gets its own host and this body's length.
        let skip = match kind {
            Name::Authorization => head.authorization.is_some(),
            Name::Host | Name::ContentLength | Name::TransferEncoding => true,
            _ => false,
        };
        if !skip {
            line(out, name, value);
        }
    });
    if let Some(key) = head.authorization {
        line(out, b"authorization", key.as_bytes());
    }
    // Like hyper: a body, or a method whose requests normally carry one,
    // gets a length; an empty GET gets none.
    if head.body_len > 0 || !matches!(*head.method, Method::GET | Method::HEAD | Method::DELETE) {
        line(
            out,
            b"content-length",
            itoa::Buffer::new().format(head.body_len).as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head and how its body is framed.
#[derive(Debug)]
pub(crate) struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: RawHeaders,
    pub framing: Framing,
    /// Whether the connection may carry another request once the body has
    /// been read to its end.
    pub reusable: bool,
}

/// Takes a complete response head off the front of `buf`, skipping interim
/// 1xx responses. `Ok(None)`: the head is not complete yet, read more.
/// `head_request`: the request was `HEAD`, so no body follows whatever the
/// headers say.
pub(crate) fn read_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, Malformed> {
    loop {
        // Uninitialised slots: zeroing 100 headers costs more than parsing
        // the handful a backend sends.
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut slots,
        ) {
            // The limit holds however the head arrived: whole in one read
            // or in pieces.
            Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => {
                return Err(Malformed("response head larger than 64 KiB"))
            }
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(Malformed("response head larger than 64 KiB"))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Malformed("more than 100 response headers"))
            }
            Err(_) => return Err(Malformed("response head is not HTTP/1.x")),
        };
        let code = response.code.unwrap_or_default();
        // RFC 9110 §15 defines 100-599; a client must take anything else as
        // a 5xx, so weir refuses it as nginx does ("upstream sent invalid
        // status") rather than pass it on (and into a metric label).
        let status = StatusCode::from_u16(code)
            .ok()
            .filter(|s| s.as_u16() <= 599)
            .ok_or(Malformed("status code outside 100-599"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(Malformed(
                    "101 Switching Protocols on a request without Upgrade",
                ));
            }
            // 100 Continue, 103 Early Hints: the final response follows.
            buf.advance(len);
            continue;
        }
        let version = if response.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let spans = Spans::new(buf, response.headers);
        let raw = buf.split_to(len).freeze();
        let headers = RawHeaders::new(raw, &spans);
        let (framing, framing_reusable) = framing(status, head_request, &headers)?;
        // RFC 9112 §6.1: an HTTP/1.0 message with `Transfer-Encoding` has
        // faulty framing whatever else it says, and the connection closes
        // after it: an HTTP/1.0 hop that passed the header on may have
        // meant the body to run to the close, and what follows the last
        // chunk would be read as the next request's answer.
        let faulty = version == Version::HTTP_10 && headers.get(Name::TransferEncoding).is_some();
        let reusable =
            framing_reusable && !faulty && keep_alive(version, headers.values(Name::Connection));
        return Ok(Some(Head {
            status,
            version,
            headers,
            framing,
            reusable,
        }));
    }
}

/// How the body's end is found (RFC 9112 §6.3), and whether that framing
/// leaves the connection reusable.
fn framing(
    status: StatusCode,
    head_request: bool,
    headers: &RawHeaders,
) -> Result<(Framing, bool), Malformed> {
    if head_request || bodiless(status) {
        return Ok((Framing::Done, true));
    }
    if headers.get(Name::TransferEncoding).is_some() {
        only_chunked(headers.values(Name::TransferEncoding))?;
        // Content-Length beside it is ignored, and the connection closed
        // afterwards: someone along the way got framing wrong.
        let reusable = headers.get(Name::ContentLength).is_none();
        return Ok((Framing::Chunked(Chunk::Size), reusable));
    }
    let length = content_length(headers.values(Name::ContentLength))?;
    Ok(match length {
        Some(0) => (Framing::Done, true),
        Some(n) => (Framing::Length(n), true),
        None => (Framing::UntilClose, false),
    })
}

/// Whether an answer with `status` has no body (204, 304: RFC 9110 §6.4.1),
/// whatever its headers say, and so no length or framing to speak of.
pub(crate) fn bodiless(status: StatusCode) -> bool {
    matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
}

/// Refuses a response whose `Transfer-Encoding` is anything but `chunked`
/// alone: weir sends no `TE`, so a backend may not use another coding
/// (RFC 9112 §6.1, §7.4), and passing its bytes on would be wrong both ways:
/// `Transfer-Encoding` is hop-by-hop, so the client would get gzip bytes
/// labelled as none, and decoding them is not weir's job. `identity` is no
/// coding any more (RFC 9112 dropped it), and with it, or with an empty
/// value, the body would be read to the connection's close whatever its
/// `Content-Length` said. nginx answers all of these 502 too. So is
/// `chunked` applied twice (which §6.1 forbids), or followed by another
/// coding: decoded once, or not at all, its framing would reach the client
/// as body bytes.
pub(crate) fn only_chunked<'a>(values: impl Iterator<Item = &'a [u8]>) -> Result<(), Malformed> {
    let mut chunked = false;
    for coding in values
        .flat_map(|value| value.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
    {
        // Even an empty element: `chunked,` would leave the last element
        // (which `framing`, and hyper for https, read) empty, the body
        // read to the close with its chunk framing in it.
        if chunked {
            return Err(Malformed("a transfer coding after chunked"));
        }
        if coding.is_empty() {
            continue;
        }
        if coding.eq_ignore_ascii_case(b"chunked") {
            chunked = true;
        } else {
            return Err(Malformed("a transfer coding other than chunked"));
        }
    }
    if chunked {
        Ok(())
    } else {
        Err(Malformed("a transfer-encoding without chunked"))
    }
}

/// The message's `Content-Length`, if any. `42, 42` (a list of one
/// repeated length) and repeated identical fields are accepted, as hyper
/// does; differing or non-numeric values are refused.
pub(crate) fn content_length<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<u64>, Malformed> {
    let mut length: Option<u64> = None;
    for value in values {
        // The usual case, one number, without the list machinery.
        if let Some(n) = plain_number(value) {
            if length.is_some_and(|l| l != n) {
                return Err(Malformed("conflicting content-length values"));
            }
            length = Some(n);
            continue;
        }
        for part in value.split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
                return Err(Malformed("invalid content-length"));
            }
            let n = std::str::from_utf8(part)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(Malformed("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Malformed("conflicting content-length values"));
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// `value` as a number when it is only ASCII digits, few enough (19) that
/// they cannot overflow.
fn plain_number(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// Whether the peer keeps the connection open after this message
/// (HTTP/1.0: only when it asks to).
/// `connection` holds the values of its `Connection` headers.
pub(crate) fn keep_alive<'a>(version: Version, connection: impl Iterator<Item = &'a [u8]>) -> bool {
    let mut options = connection
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii);
    if version != Version::HTTP_10 {
        return !options.any(|o| o.eq_ignore_ascii_case(b"close"));
    }
    // `close` wins in HTTP/1.0 too (RFC 9112 §9.3 looks for it first, and
    // nginx does): `keep-alive, close` closes the connection.
    let (mut close, mut keep) = (false, false);
    for option in options {
        close |= option.eq_ignore_ascii_case(b"close");
        keep |= option.eq_ignore_ascii_case(b"keep-alive");
    }
    keep && !close
}

/// The values of `name` in a header map, as bytes (for [`content_length`]
/// and [`keep_alive`]).
pub(crate) fn values<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers.get_all(name).into_iter().map(HeaderValue::as_bytes)
}

/// Where the reader is in a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `Content-Length`: this many bytes still to come.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunk),
    /// No length: the body ends when the backend closes the connection.
    UntilClose,
    /// The whole body has been read.
    Done,
}

/// Where the reader is in a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk, this many data bytes still to come.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk, reading (and dropping) trailer lines; this
    /// many trailer bytes dropped so far.
    Trailers(usize),
}

impl Framing {
    /// Takes the next body bytes off the front of `buf`. `Ok(None)`: more
    /// input is needed, or the body is done ([`Framing::is_done`]). Framing
    /// that follows the data (a chunk's CRLF, the last chunk, trailers) is
    /// consumed as soon as it is buffered, so the body is known to be done
    /// together with its last bytes.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Malformed> {
        self.skip_framing(buf)?;
        let data = match self {
            Framing::UntilClose if !buf.is_empty() => Some(buf.split().freeze()),
            Framing::Length(left) | Framing::Chunked(Chunk::Data(left)) if !buf.is_empty() => {
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= take as u64;
                let data = buf.split_to(take).freeze();
                if *left == 0 {
                    *self = match self {
                        Framing::Length(_) => Framing::Done,
                        _ => Framing::Chunked(Chunk::DataEnd),
                    };
                }
                Some(data)
            }
            _ => None,
        };
        if data.is_some() {
            // Broken framing after good data is reported by the next call
            // (it stops at the same bytes again): the data goes out first.
            let _ = self.skip_framing(buf);
        }
        Ok(data)
    }

    /// The connection reached its end of input.
    pub(crate) fn eof(&mut self) -> Result<(), Malformed> {
        match self {
            Framing::UntilClose | Framing::Done => {
                *self = Framing::Done;
                Ok(())
            }
            _ => Err(Malformed("connection closed before the body ended")),
        }
    }

    /// Whether the whole body has been read.
    pub(crate) fn is_done(&self) -> bool {
        *self == Framing::Done
    }

    /// Body bytes still to come, when the framing says.
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self {
            Framing::Length(n) => Some(*n),
            Framing::Done => Some(0),
            _ => None,
        }
    }

    /// Body bytes the framing has already promised: the rest of a length,
    /// or of the chunk being read.
    pub(crate) fn promised(&self) -> u64 {
        match self {
            Framing::Length(n) | Framing::Chunked(Chunk::Data(n)) => *n,
            _ => 0,
        }
    }

    /// Consumes chunk framing (sizes, CRLFs, trailers) up to the next data
    /// byte or the end of what is buffered.
    fn skip_framing(&mut self, buf: &mut BytesMut) -> Result<(), Malformed> {
        loop {
            let Framing::Chunked(chunk) = self else {
                return Ok(());
            };
            match chunk {
                Chunk::Data(_) => return Ok(()),
                Chunk::Size => match chunk_size_line(buf) {
                    Ok(Some((used, size))) => {
                        buf.advance(used);
                        *chunk = if size == 0 {
                            Chunk::Trailers(0)
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(e),
                },
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(());
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Malformed("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *chunk = Chunk::Size;
                }
                // Dropped, but read as strictly as a head (RFC 9112 §7.1.2):
                // field lines ended by CRLF, no bare CR or LF inside one
                // (which another parser could split differently), and at
                // most MAX_TRAILER_BYTES in all.
                Chunk::Trailers(dropped) => match buf.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        buf.advance(2);
                        *self = Framing::Done;
                        return Ok(());
                    }
                    Some(line) => {
                        let field = buf.get(..line).unwrap_or_default();
                        if field.iter().any(|&b| b == b'\r' || b == b'\n') || !field.contains(&b':')
                        {
                            return Err(Malformed("malformed trailer line"));
                        }
                        *dropped += line + 2;
                        if *dropped > MAX_TRAILER_BYTES {
                            return Err(Malformed("trailers too large"));
                        }
                        buf.advance(line + 2);
                    }
                    None if buf.contains(&b'\n') => {
                        return Err(Malformed("malformed trailer line"))
                    }
                    None if *dropped + buf.len() > MAX_TRAILER_BYTES => {
                        return Err(Malformed("trailers too large"))
                    }
                    None => return Ok(()),
                },
            }
        }
    }
}

/// Parses a chunk-size line (RFC 9112 §7.1): hex digits, optional blanks,
/// optional extensions, CRLF. `Ok(Some((bytes used, size)))`; `Ok(None)`:
/// not complete yet. Stricter than `httparse::parse_chunk_size`, which lets
/// a bare LF inside an extension pass: like hyper, weir takes only CRLF
/// here, so no two parsers can disagree on where a chunk starts.
fn chunk_size_line(buf: &[u8]) -> Result<Option<(usize, u64)>, Malformed> {
    let invalid = Malformed("invalid chunk size");
    let mut size: u64 = 0;
    let mut digits = 0;
    let mut i = 0;
    // The size.
    while let Some(&b) = buf.get(i) {
        let Some(d) = (b as char).to_digit(16) else {
            break;
        };
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(d)))
            .ok_or(Malformed("chunk size too large"))?;
        digits += 1;
        i += 1;
        // Leading zeros never overflow `size`: without this, a line of
        // endless `0`s would be buffered and rescanned without bound.
        if i > MAX_CHUNK_LINE {
            return Err(Malformed("chunk-size line too long"));
        }
    }
    if buf.get(i).is_some() && digits == 0 {
        return Err(invalid);
    }
    // Blanks, extensions, CRLF.
    let mut in_extension = false;
    while let Some(&b) = buf.get(i) {
        match b {
            b'\r' => {
                return match buf.get(i + 1) {
                    Some(b'\n') => Ok(Some((i + 2, size))),
                    Some(_) => Err(invalid),
                    None => Ok(None),
                }
            }
            b'\n' => return Err(Malformed("bare LF in a chunk-size line")),
            b';' => in_extension = true,
            b' ' | b'\t' => {}
            _ if in_extension => {}
            _ => return Err(invalid),
        }
        i += 1;
        if i > MAX_CHUNK_LINE {
            return Err(Malformed("chunk-size line too long"));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &[u8]) -> Result<Option<Head>, Malformed> {
        read_head(&mut BytesMut::from(bytes), false)
    }

    /// Decodes `input` fed in pieces of `step` bytes; returns the body and
    /// whether it ended.
    fn decode_in_steps(mut framing: Framing, input: &[u8], step: usize) -> (Vec<u8>, bool) {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            while let Some(data) = framing.decode(&mut buf).unwrap() {
                body.extend_from_slice(&data);
            }
        }
        (body, framing.is_done())
    }

    #[test]
    fn request_head_has_host_headers_key_and_length() {
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("abc"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        // The client's Host: the backend gets its own.
        headers.insert(header::HOST, HeaderValue::from_static("weir.local"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client"),
        );
        let key = HeaderValue::from_static("Bearer backend");
        let mut out = Vec::new();
        encode_request_head(
            &RequestHead {
                method: &Method::POST,
                target: &["/v1", "/chat/completions", "?", "a=1"],
                host: Some("10.0.0.1:8000"),
                headers: &headers,
                authorization: Some(&key),
                body_len: 12,
            },
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/chat/completions?a=1 HTTP/1.1\r\nhost: 10.0.0.1:8000\r\n\
             x-request-id: abc\r\nauthorization: Bearer backend\r\ncontent-length: 12\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_request_head(
            &RequestHead {
                method: &Method::GET,
                target: &[""],
                host: Some("h"),
                headers: &HeaderMap::new(),
                authorization: None,
                body_len: 0,
            },
            &mut out,
        );
        assert_eq!(out, b"GET / HTTP/1.1\r\nhost: h\r\n\r\n");
    }

    #[test]
    fn a_status_outside_100_to_599_is_malformed() {
        for code in ["099", "600", "999"] {
            let raw = format!("HTTP/1.1 {code} Weird\r\ncontent-length: 0\r\n\r\n");
            assert_eq!(
                head(raw.as_bytes()).unwrap_err(),
                Malformed("status code outside 100-599"),
                "{code}"
            );
        }
        assert_eq!(
            head(b"HTTP/1.1 599 Edge\r\ncontent-length: 0\r\n\r\n")
                .unwrap()
                .unwrap()
                .status,
            599
        );
    }

    #[test]
    fn a_head_arriving_in_pieces_parses_once_complete() {
        let raw =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        for cut in 0..raw.len() - 2 {
            let mut buf = BytesMut::from(&raw[..cut]);
            assert!(read_head(&mut buf, false).unwrap().is_none(), "cut {cut}");
        }
        let mut buf = BytesMut::from(&raw[..]);
        let head = read_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(
            head.headers.get(Name::ContentType),
            Some(&b"application/json"[..])
        );
        assert_eq!(head.framing, Framing::Length(2));
        assert!(head.reusable);
        assert_eq!(&buf[..], b"{}");
    }

    #[test]
    fn many_headers_keep_their_values_and_order() {
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..40 {
            raw.extend_from_slice(format!("x-h{}: v{i}\r\nset-cookie: c{i}\r\n", i % 7).as_bytes());
        }
        raw.extend_from_slice(b"content-length: 0\r\n\r\n");
        let head = head(&raw).unwrap().unwrap();
        assert_eq!(head.headers.iter().count(), 81);
        let named = |wanted: &str| -> Vec<Vec<u8>> {
            head.headers
                .iter()
                .filter(|(_, n, _)| n.eq_ignore_ascii_case(wanted.as_bytes()))
                .map(|(_, _, v)| v.to_vec())
                .collect()
        };
        let cookies = named("set-cookie");
        assert_eq!(cookies.len(), 40);
        assert_eq!(cookies[39], b"c39");
        let h3 = named("X-H3");
        assert_eq!(h3, [&b"v3"[..], b"v10", b"v17", b"v24", b"v31", b"v38"]);
        let map = head.headers.to_map().unwrap();
        assert_eq!(map.len(), 81);
        assert_eq!(map.get_all("x-h3").iter().count(), 6);
    }

    #[test]
    fn header_names_are_told_apart_in_any_case() {
        for kind in [
            Name::Connection,
            Name::ContentLength,
            Name::TransferEncoding,
            Name::ContentType,
            Name::ContentEncoding,
            Name::Date,
            Name::RetryAfter,
        ] {
            let name = kind.header_name().unwrap();
            assert_eq!(Name::of(name.as_str().as_bytes()), kind);
            assert_eq!(Name::of(name.as_str().to_uppercase().as_bytes()), kind);
        }
        for hop in ["TE", "Trailer", "upgrade", "Keep-Alive", "proxy-connection"] {
            assert_eq!(Name::of(hop.as_bytes()), Name::HopByHop, "{hop}");
        }
        assert_eq!(Name::of(b"X-RateLimit-Limit-Tokens"), Name::RateLimit);
        assert_eq!(Name::of(b"x-ratelimit-"), Name::Other);
        assert_eq!(Name::of(b"content-lengths"), Name::Other);
        assert_eq!(
            connection_names(b"keep-alive, X-A ,close,,x-b").collect::<Vec<_>>(),
            [&b"X-A"[..], b"x-b"]
        );
    }

    #[test]
    fn interim_responses_are_skipped() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: x\r\n\r\n\
               HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n"[..],
        );
        let head = read_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(head.status, 201);
        assert!(head.headers.iter().all(|(_, name, _)| name != b"link"));
        assert!(head.framing.is_done());
        assert!(buf.is_empty());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let cases: [(&[u8], Framing, bool); 7] = [
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                Framing::Chunked(Chunk::Size),
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
                Framing::Chunked(Chunk::Size),
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n",
                Framing::Chunked(Chunk::Size),
                true,
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", Framing::UntilClose, false),
            (
                b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
                Framing::Done,
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\nconnection: close\r\n\r\n",
                Framing::Length(7),
                false,
            ),
            (
                b"HTTP/1.0 200 OK\r\ncontent-length: 7\r\n\r\n",
                Framing::Length(7),
                false,
            ),
        ];
        for (raw, framing, reusable) in cases {
            let head = head(raw).unwrap().unwrap();
            let text = String::from_utf8_lossy(raw);
            assert_eq!(head.framing, framing, "{text}");
            assert_eq!(head.reusable, reusable, "{text}");
        }
        // A coding weir did not ask for (it sends no `TE`) is refused,
        // not passed on unlabelled.
        for raw in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: deflate\r\ntransfer-encoding: chunked\r\n\r\n",
            // Chunked twice, or not last: its framing would reach the
            // client as body bytes.
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, identity\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked,\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: \r\n\r\n",
            // No coding at all, or the no-op `identity` (no longer one): the
            // body would be read to the close, whatever its length said.
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: \r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: ,\r\n\r\n",
        ] {
            let text = String::from_utf8_lossy(raw);
            assert!(head(raw).is_err(), "{text}");
        }
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n"[..]);
        assert!(read_head(&mut buf, true)
            .unwrap()
            .unwrap()
            .framing
            .is_done());
    }

    #[test]
    fn bad_heads_are_refused() {
        let bad: [&[u8]; 6] = [
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 999999 Big\r\n\r\n",
        ];
        for raw in bad {
            assert!(head(raw).is_err(), "{}", String::from_utf8_lossy(raw));
        }
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..101 {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(head(&many).is_err());
        let mut huge = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        huge.resize(MAX_HEAD_BYTES + 2, b'a');
        assert!(head(&huge).is_err());
        // Too large even when it arrives whole.
        huge.extend_from_slice(b"\r\n\r\n");
        assert!(head(&huge).is_err());
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_sizes() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\ntrailer: x\r\n\r\n";
        for step in 1..=wire.len() {
            let (body, done) = decode_in_steps(Framing::Chunked(Chunk::Size), wire, step);
            assert_eq!(body, b"hello, world", "step {step}");
            assert!(done, "step {step}");
        }
    }

    #[test]
    fn the_last_chunk_ends_the_body_with_the_last_data() {
        let mut framing = Framing::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(&b"3\r\nend\r\n0\r\n\r\n"[..]);
        assert_eq!(framing.decode(&mut buf).unwrap().unwrap(), "end");
        assert!(framing.is_done());
        assert!(buf.is_empty());
    }

    #[test]
    fn chunk_size_lines_take_blanks_and_extensions() {
        let wire = b"5 ;a=b;c\r\nhello\r\nA\t\r\n0123456789\r\n0;x\r\n\r\n";
        for step in 1..wire.len() {
            let (body, done) = decode_in_steps(Framing::Chunked(Chunk::Size), wire, step);
            assert_eq!(body, b"hello0123456789", "step {step}");
            assert!(done, "step {step}");
        }
    }

    #[test]
    fn close_wins_over_keep_alive_in_every_version() {
        let v10 = Version::HTTP_10;
        let v11 = Version::HTTP_11;
        let keeps =
            |version, values: &[&str]| keep_alive(version, values.iter().map(|v| v.as_bytes()));
        assert!(!keeps(v10, &[]));
        assert!(keeps(v10, &["Keep-Alive"]));
        assert!(!keeps(v10, &["keep-alive, close"]));
        assert!(!keeps(v10, &["close, keep-alive"]));
        assert!(!keeps(v10, &["keep-alive", "close"]));
        assert!(keeps(v11, &[]));
        assert!(keeps(v11, &["keep-alive"]));
        assert!(!keeps(v11, &["keep-alive, close"]));
        assert!(!keeps(v11, &["Close"]));
    }

    #[test]
    fn broken_chunked_framing_is_an_error() {
        let long_extension = [&b"5;"[..], &[b'a'; MAX_CHUNK_LINE]].concat();
        // Many small trailer lines, each well formed, too many in all.
        let many_trailers = [
            &b"0\r\n"[..],
            &b"x: 1\r\n".repeat(MAX_TRAILER_BYTES / 6 + 1),
        ]
        .concat();
        let bad: [&[u8]; 13] = [
            b"zz\r\nhello\r\n",
            b"2\r\nhiX\r\n",
            b"ffffffffffffffffffff\r\n",
            // A bare LF in an extension or ending the line: hyper refuses
            // both, httparse would take them.
            b"5;ext\nhello\r\n",
            b"5\nhello\r\n",
            b"5\rhello\r\n",
            b"5 x\r\nhello\r\n",
            b";x\r\nhello\r\n",
            &long_extension,
            // Trailers: a bare LF inside a line, one ending a line (with
            // more to come), a line that is no field.
            b"0\r\nx: 1\nGET /admin HTTP/1.1\r\n\r\n",
            b"0\r\nx: 1\ny",
            b"0\r\nnot a field\r\n\r\n",
            &many_trailers,
        ];
        for wire in bad {
            let mut framing = Framing::Chunked(Chunk::Size);
            let mut buf = BytesMut::from(wire);
            let result = (|| {
                while framing.decode(&mut buf)?.is_some() {}
                Ok::<_, Malformed>(())
            })();
            assert!(result.is_err(), "{}", String::from_utf8_lossy(wire));
        }
        let mut framing = Framing::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(&[b'1'; MAX_CHUNK_LINE + 1][..]);
        assert!(framing.decode(&mut buf).is_err());
        // Zeros never overflow the size, so only the line limit stops them.
        let mut framing = Framing::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(&[b'0'; MAX_CHUNK_LINE + 1][..]);
        assert!(framing.decode(&mut buf).is_err());
        // A size with leading zeros inside the limit is still a size.
        let mut framing = Framing::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(&b"0002\r\nok\r\n0\r\n\r\n"[..]);
        assert_eq!(framing.decode(&mut buf).unwrap().unwrap(), "ok");
        // Good data read together with the broken framing after it still
        // comes out, and the error with the next call.
        let mut framing = Framing::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(&b"2\r\nok\r\nzz\r\n"[..]);
        assert_eq!(framing.decode(&mut buf).unwrap().unwrap(), "ok");
        assert!(framing.decode(&mut buf).is_err());
    }

    #[test]
    fn length_bodies_stop_at_their_length_and_eof_early_is_an_error() {
        let (body, done) = decode_in_steps(Framing::Length(5), b"hello", 2);
        assert_eq!(body, b"hello");
        assert!(done);
        let mut framing = Framing::Length(5);
        let mut buf = BytesMut::from(&b"hel"[..]);
        assert_eq!(framing.decode(&mut buf).unwrap().unwrap(), "hel");
        assert_eq!(framing.remaining(), Some(2));
        assert!(framing.eof().is_err());
        let mut framing = Framing::UntilClose;
        let mut buf = BytesMut::from(&b"all of it"[..]);
        assert_eq!(framing.decode(&mut buf).unwrap().unwrap(), "all of it");
        assert!(!framing.is_done());
        framing.eof().unwrap();
        assert!(framing.is_done());
    }
}
