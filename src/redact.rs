//! Keeps a backend's provider key out of what the backend sends back (SPEC
//! "Secrets": provider keys never reach a client, a log line or `/admin/*`
//! output). A backend that refuses the key may quote it in its error body
//! (`Incorrect API key provided: sk-…`), which weir passes to the client as
//! it came (SPEC: an upstream 4xx is returned as it came) and quotes in a
//! failed probe's `last_error`. Every whole occurrence of the key is
//! replaced by [`REDACTED`] on those paths, and in every answer's headers
//! (`ProxiedBody::redact_headers`); a successful answer's body is not
//! scanned.

use bytes::{Bytes, BytesMut};
use memchr::memmem;

/// What a key is replaced with.
pub(crate) const REDACTED: &str = "[redacted]";

/// Replaces every occurrence of `key` in `text`.
pub(crate) fn redact_str(text: &str, key: &str) -> String {
    if key.is_empty() {
        return text.to_owned();
    }
    text.replace(key, REDACTED)
}

/// Replaces every occurrence of `key` in `bytes` (a header value, which
/// need not be UTF-8).
pub(crate) fn redact_bytes(bytes: &[u8], key: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(bytes.len());
    let at = match key.is_empty() {
        true => 0,
        false => replace_key(&mut out, bytes, &memmem::Finder::new(key)),
    };
    out.extend_from_slice(bytes.get(at..).unwrap_or_default());
    out
}

/// Appends `text` to `out` with every occurrence of `finder`'s key
/// replaced, up to the end of the last one; returns where the rest of
/// `text` (not yet appended) starts.
fn replace_key(out: &mut BytesMut, text: &[u8], finder: &memmem::Finder<'_>) -> usize {
    let mut at = 0;
    while let Some(found) = text.get(at..).and_then(|rest| finder.find(rest)) {
        out.extend_from_slice(text.get(at..at + found).unwrap_or_default());
        out.extend_from_slice(REDACTED.as_bytes());
        at += found + finder.needle().len();
    }
    at
}

/// Removes a key from a body that arrives in pieces: an occurrence may
/// straddle two frames, so the end of each frame that could begin the key
/// is held back until the next one (at most the key's length less one
/// byte).
#[derive(Debug)]
pub(crate) struct KeyRedactor {
    /// Finds the key, which it owns (`needle`).
    finder: memmem::Finder<'static>,
    held: BytesMut,
}

impl KeyRedactor {
    /// A redactor for `key`; `None` for an empty key (nothing to hide).
    pub(crate) fn new(key: &str) -> Option<Self> {
        if key.is_empty() {
            return None;
        }
        Some(Self {
            finder: memmem::Finder::new(key.as_bytes()).into_owned(),
            held: BytesMut::new(),
        })
    }

    /// Takes the next frame; returns what may be sent now.
    pub(crate) fn push(&mut self, data: Bytes) -> Bytes {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(&data);
        let mut out = BytesMut::with_capacity(buf.len());
        let at = replace_key(&mut out, &buf, &self.finder);
        let tail = buf.get(at..).unwrap_or_default();
        // The longest end of the tail that is the start of the key.
        let key = self.finder.needle();
        let keep = (1..key.len().min(tail.len() + 1))
            .rev()
            .find(|&n| tail.ends_with(key.get(..n).unwrap_or_default()))
            .unwrap_or(0);
        let (send, hold) = tail.split_at(tail.len() - keep);
        out.extend_from_slice(send);
        self.held = BytesMut::from(hold);
        out.freeze()
    }

    /// The body ended: what was held back, which is not the key.
    pub(crate) fn finish(&mut self) -> Bytes {
        std::mem::take(&mut self.held).freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every split of a body into two frames gives the same redacted text.
    #[test]
    fn a_key_split_across_frames_is_still_removed() {
        let key = "sk-SECRET-123";
        let body = "{\"message\":\"Incorrect API key provided: sk-SECRET-123. sk-SECRET-12 sk-SECRET-123sk-SECRET-123\"}";
        let want = "{\"message\":\"Incorrect API key provided: [redacted]. sk-SECRET-12 [redacted][redacted]\"}";
        for cut in 0..=body.len() {
            let mut r = KeyRedactor::new(key).expect("a key");
            let (a, b) = body.split_at(cut);
            let mut got = r.push(Bytes::copy_from_slice(a.as_bytes())).to_vec();
            got.extend_from_slice(&r.push(Bytes::copy_from_slice(b.as_bytes())));
            got.extend_from_slice(&r.finish());
            assert_eq!(String::from_utf8_lossy(&got), want, "cut at {cut}");
        }
    }

    #[test]
    fn a_header_value_loses_every_whole_key() {
        let key = b"aa-KEY";
        for (value, want) in [
            (&b"Bearer aa-KEY"[..], &b"Bearer [redacted]"[..]),
            (b"aa-KEYaa-KEY x aa-KE", b"[redacted][redacted] x aa-KE"),
            (b"\xffaa-KEY\xfe", b"\xff[redacted]\xfe"),
            (b"nothing", b"nothing"),
        ] {
            assert_eq!(redact_bytes(value, key), want);
        }
        assert_eq!(redact_bytes(b"aaaa", b"aa"), &b"[redacted][redacted]"[..]);
        assert_eq!(redact_bytes(b"x", b""), &b"x"[..]);
    }

    #[test]
    fn a_body_without_the_key_passes_unchanged() {
        let mut r = KeyRedactor::new("abcabd").expect("a key");
        let mut got = r.push(Bytes::from_static(b"xxabcab")).to_vec();
        assert_eq!(got, b"xx", "the start of the key is held");
        got.extend_from_slice(&r.push(Bytes::from_static(b"c")));
        got.extend_from_slice(&r.finish());
        assert_eq!(got, b"xxabcabc");
        assert!(KeyRedactor::new("").is_none());
        assert_eq!(
            redact_str("a key k1 k1", "k1"),
            "a key [redacted] [redacted]"
        );
    }
}
