//! The fast path of [`super::read`]: a hand-written scanner over the body's
//! bytes that finds the same [`Read`] as the serde pass, for the bodies
//! clients actually send, at a fraction of the cost.
//!
//! # Why two readers
//!
//! The serde pass is the reference: it states every rule of the module docs
//! through serde_json, whose error messages (with line and column) are what a
//! client sees. This scanner answers only when it is *sure* the serde pass
//! would accept the body and what it would find; at anything unusual it gives
//! up (`None`) and the serde pass decides, errors included. So a refusal is
//! never the scanner's, and the property tests in `super` hold the two to the
//! same answer on generated and mutated bodies.
//!
//! It gives up on: any malformed JSON; nesting deeper than [`MAX_LEVELS`];
//! numbers too long or with exponents too large to be sure they are finite;
//! escapes in keys or in `model`; a UTF-16 surrogate escape that is not a
//! well-formed pair; a field weir reads with a value the serde pass would
//! refuse or would read through a float (`"max_tokens": 1.0`), and a negative
//! number where prompt text is counted; a duplicate key weir reads; a body
//! without `model`. Each is rare in real traffic and all are handled by the
//! serde pass exactly as before.
#![forbid(unsafe_code)]

use std::ops::Range;

use super::{Counted, Key, Read, StreamOptionsSpan, Top, TOKEN_ID_BYTES};

/// Arrays/objects the scanner follows (the top-level object is level 1);
/// deeper bodies go to the serde pass, whose limit is far above this, so the
/// scanner never accepts what the serde pass would refuse as too deep.
pub(super) const MAX_LEVELS: u32 = 64;

// The scanner must give up before the serde pass would refuse a depth.
const _: () = assert!(MAX_LEVELS as usize <= super::MAX_DEPTH);

/// Longest number the scanner reads, in bytes; within it, a number without an
/// exponent is always a finite `f64` for serde_json.
const MAX_NUMBER_LEN: usize = 64;

/// Largest exponent (in absolute value) the scanner accepts: with at most
/// [`MAX_NUMBER_LEN`] digits, `1e{±200}` times them stays far inside `f64`'s
/// finite range (serde_json refuses infinite numbers; tiny ones become 0).
const MAX_EXPONENT: u32 = 200;

/// Reads `text`, or `None` to leave it to the serde pass.
pub(super) fn read(text: &str) -> Option<Read> {
    let mut s = Scanner {
        text,
        b: text.as_bytes(),
        i: 0,
    };
    s.ws();
    let mut top = Top::default();
    let mut seen = 0u16;
    s.object(1, |s, key, level| {
        member(&mut top, &mut seen, s, key, level)
    })?;
    let close = s.i.checked_sub(1)?;
    s.ws();
    if s.i != text.len() {
        return None;
    }
    top.into_read(close)
}

/// Reads the value of the top-level member `key` into `top`; `seen` holds
/// the keys weir reads met so far, so that a duplicate gives up.
fn member(
    top: &mut Top,
    seen: &mut u16,
    s: &mut Scanner<'_>,
    key: &[u8],
    level: u32,
) -> Option<()> {
    let key = top_key(key);
    if !matches!(key, Key::Other | Key::Beside) {
        if *seen & key.bit() != 0 {
            return None;
        }
        *seen |= key.bit();
    }
    match key {
        Key::Model => {
            let start = s.i;
            if s.string()?.escaped {
                return None;
            }
            let plain = s.text.get(start + 1..s.i - 1)?;
            top.model = Some((plain.to_owned(), start..s.i));
        }
        Key::Stream => top.stream = s.boolean()?,
        Key::MaxTokens => top.max_tokens = s.count()?,
        Key::MaxCompletionTokens => top.max_completion_tokens = s.count()?,
        Key::MaxOutputTokens => top.max_output_tokens = s.count()?,
        Key::N => top.n = s.count()?,
        Key::BestOf => top.best_of = s.count()?,
        Key::StreamOptions => top.stream_options = Some(s.stream_options(level)?),
        Key::Messages => top.messages(s.messages(level)?),
        Key::Prompt => {
            let (bytes, prompts) = s.prompt(level)?;
            top.prompt(bytes);
            top.prompts = prompts;
        }
        Key::Input => top.prompt(s.text_bytes(level, Counted::Prompt)?),
        Key::Beside => top.prompt(s.text_bytes(level, Counted::Every)?),
        Key::Other => s.skip(level)?,
    }
    Some(())
}

/// [`super::top_key`] for a key's raw bytes (keys with escapes never get
/// here).
fn top_key(key: &[u8]) -> Key {
    match key {
        b"model" => Key::Model,
        b"stream" => Key::Stream,
        b"max_tokens" => Key::MaxTokens,
        b"max_completion_tokens" => Key::MaxCompletionTokens,
        b"max_output_tokens" => Key::MaxOutputTokens,
        b"n" => Key::N,
        b"best_of" => Key::BestOf,
        b"stream_options" => Key::StreamOptions,
        b"messages" => Key::Messages,
        b"prompt" => Key::Prompt,
        b"input" => Key::Input,
        b"tools" | b"functions" | b"response_format" | b"instructions" | b"suffix" => Key::Beside,
        _ => Key::Other,
    }
}

/// A string just scanned.
struct Text {
    /// Its length once unescaped, in UTF-8 bytes.
    len: usize,
    /// Whether it has any escape.
    escaped: bool,
}

/// A number just scanned, as serde_json would hand it to a visitor.
enum Number {
    /// A non-negative integer that fits `u64` (`visit_u64`).
    Unsigned(u64),
    /// A negative integer, or one too long to be sure of its type.
    Other,
    /// A fraction or an exponent (`visit_f64`).
    Float,
}

/// A cursor over the body. Every method leaves `i` just past what it read, or
/// returns `None` (give up).
struct Scanner<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// Skips JSON whitespace.
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// Consumes `word` (`true`, `false`, `null`).
    fn word(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i.checked_add(word.len())?;
        if self.b.get(self.i..end)? != word {
            return None;
        }
        self.i = end;
        Some(())
    }

    /// An object at `level`, `{` under the cursor: calls `member` with each
    /// key (no escapes: else give up) and the object's level, the cursor on
    /// the value, which `member` must consume.
    fn object(
        &mut self,
        level: u32,
        mut member: impl FnMut(&mut Self, &[u8], u32) -> Option<()>,
    ) -> Option<()> {
        self.container(level, b'{', b'}', |s| {
            let start = s.i;
            if s.string()?.escaped {
                return None;
            }
            let key = s.b.get(start + 1..s.i - 1)?;
            s.ws();
            if s.peek() != Some(b':') {
                return None;
            }
            s.i += 1;
            s.ws();
            member(s, key, level)
        })
    }

    /// An array at `level`, `[` under the cursor: calls `element` with the
    /// cursor on each element, which it must consume.
    fn array(&mut self, level: u32, element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.container(level, b'[', b']', element)
    }

    /// The frame of an object or array at `level`: `open` under the cursor,
    /// then `item`s separated by commas, then `close`.
    fn container(
        &mut self,
        level: u32,
        open: u8,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        if level > MAX_LEVELS || self.peek() != Some(open) {
            return None;
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(close) {
            self.i += 1;
            return Some(());
        }
        loop {
            item(self)?;
            self.ws();
            match self.peek()? {
                b',' => {
                    self.i += 1;
                    self.ws();
                }
                c if c == close => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Skips any value inside a container at `level`.
    fn skip(&mut self, level: u32) -> Option<()> {
        match self.peek()? {
            b'{' => self.object(level + 1, |s, _, level| s.skip(level)),
            b'[' => self.array(level + 1, |s| s.skip(level + 1)),
            b'"' => self.string().map(drop),
            b't' => self.word(b"true"),
            b'f' => self.word(b"false"),
            b'n' => self.word(b"null"),
            _ => self.number().map(drop),
        }
    }

    /// `true`/`false`, or `null` as `None`; anything else gives up.
    fn boolean(&mut self) -> Option<Option<bool>> {
        match self.peek()? {
            b't' => self.word(b"true").map(|()| Some(true)),
            b'f' => self.word(b"false").map(|()| Some(false)),
            b'n' => self.word(b"null").map(|()| None),
            _ => None,
        }
    }

    /// A plain integer in `u32`, or `null` as `None`; anything else (floats
    /// included, which the serde pass may still accept) gives up.
    fn count(&mut self) -> Option<Option<u32>> {
        if self.peek()? == b'n' {
            return self.word(b"null").map(|()| None);
        }
        match self.number()? {
            Number::Unsigned(v) => u32::try_from(v).ok().map(Some),
            Number::Other | Number::Float => None,
        }
    }

    /// `stream_options` inside the top-level object at `level`.
    fn stream_options(&mut self, level: u32) -> Option<(StreamOptionsSpan, bool)> {
        let start = self.i;
        if self.peek()? == b'n' {
            self.word(b"null")?;
            return Some((StreamOptionsSpan::Null(start..self.i), false));
        }
        let mut include_usage: Option<(Range<usize>, bool)> = None;
        let mut has_members = false;
        self.object(level + 1, |s, key, level| {
            has_members = true;
            if key != b"include_usage" {
                return s.skip(level);
            }
            if include_usage.is_some() {
                return None;
            }
            let value = s.i;
            let on = s.boolean()?.unwrap_or(false);
            include_usage = Some((value..s.i, on));
            Some(())
        })?;
        let on = include_usage.as_ref().is_some_and(|(_, on)| *on);
        let span = StreamOptionsSpan::Object {
            span: start..self.i,
            include_usage: include_usage.map(|(span, _)| span),
            has_members,
        };
        Some((span, on))
    }

    /// `messages` inside a container at `level`: `(entries, prompt bytes)`
    /// of an array; anything else counts nothing.
    fn messages(&mut self, level: u32) -> Option<(u32, usize)> {
        if self.peek()? != b'[' {
            return self.skip(level).map(|()| (0, 0));
        }
        let (mut count, mut bytes) = (0u32, 0usize);
        self.array(level + 1, |s| {
            let len = s.text_bytes(level + 1, Counted::Prompt)?;
            count = count.saturating_add(1);
            bytes = bytes.saturating_add(len);
            Some(())
        })?;
        Some((count, bytes))
    }

    /// `prompt` inside the top-level object at `level`: its text bytes and
    /// the prompts it holds, as the serde pass's `Prompt` counts them (the
    /// strings and arrays of an array, else 1).
    fn prompt(&mut self, level: u32) -> Option<(usize, u32)> {
        if self.peek()? != b'[' {
            return self
                .text_bytes(level, Counted::Prompt)
                .map(|bytes| (bytes, 1));
        }
        let (mut bytes, mut prompts) = (0usize, 0u32);
        self.array(level + 1, |s| {
            if matches!(s.peek()?, b'"' | b'[') {
                prompts = prompts.saturating_add(1);
            }
            bytes = bytes.saturating_add(s.text_bytes(level + 1, Counted::Prompt)?);
            Some(())
        })?;
        Some((bytes, prompts.max(1)))
    }

    /// Bytes of text in a value inside a container at `level`, counted as
    /// `counted` says, as the serde pass's `TextBytes` counts them.
    fn text_bytes(&mut self, level: u32, counted: Counted) -> Option<usize> {
        let mut bytes = 0usize;
        match self.peek()? {
            b'"' => return self.string().map(|text| text.len),
            b'[' => self.array(level + 1, |s| {
                bytes = bytes.saturating_add(s.text_bytes(level + 1, counted)?);
                Some(())
            })?,
            b'{' => self.object(level + 1, |s, key, level| match counted {
                Counted::Prompt if !matches!(key, b"content" | b"text") => s.skip(level),
                Counted::Prompt => {
                    bytes = bytes.saturating_add(s.text_bytes(level, counted)?);
                    Some(())
                }
                Counted::Every => {
                    bytes = bytes
                        .saturating_add(key.len())
                        .saturating_add(s.text_bytes(level, counted)?);
                    Some(())
                }
            })?,
            b't' | b'f' | b'n' => self.skip(level)?,
            // Numbers count nothing: any the scanner reads will do.
            _ if counted == Counted::Every => self.skip(level)?,
            _ => match self.number()? {
                Number::Unsigned(_) => bytes = TOKEN_ID_BYTES,
                Number::Float => {}
                Number::Other => return None,
            },
        }
        Some(bytes)
    }

    /// A string, `"` under the cursor.
    fn string(&mut self) -> Option<Text> {
        if self.peek() != Some(b'"') {
            return None;
        }
        self.i += 1;
        let start = self.i;
        // bytes of escapes beyond the UTF-8 they stand for
        let mut shrink = 0usize;
        loop {
            self.i = plain_run(self.b, self.i);
            match self.peek()? {
                b'"' => {
                    let len = (self.i - start).checked_sub(shrink)?;
                    self.i += 1;
                    return Some(Text {
                        len,
                        escaped: shrink > 0,
                    });
                }
                b'\\' => {
                    // the backslash and `read` bytes stand for `wrote` bytes
                    // (always fewer)
                    let (read, wrote) = escape(self.b.get(self.i + 1..)?)?;
                    shrink += read + 1 - wrote;
                    self.i += read + 1;
                }
                // a control character: refused by serde_json
                _ => return None,
            }
        }
    }

    /// A number; gives up on anything malformed, too long, or with a large
    /// exponent.
    fn number(&mut self) -> Option<Number> {
        let start = self.i;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        let digits = self.i;
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        let int_end = self.i;
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.i += 1;
            let before = self.i;
            self.digits();
            if self.i == before {
                return None;
            }
            float = true;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            let before = self.i;
            self.digits();
            let exponent = std::str::from_utf8(self.b.get(before..self.i)?).ok()?;
            if exponent.is_empty() || exponent.len() > 3 {
                return None;
            }
            if exponent.parse::<u32>().ok()? > MAX_EXPONENT {
                return None;
            }
            float = true;
        }
        if self.i - start > MAX_NUMBER_LEN {
            return None;
        }
        if float {
            return Some(Number::Float);
        }
        if negative || int_end - digits > 19 {
            return Some(Number::Other);
        }
        let mut value = 0u64;
        for &d in self.b.get(digits..int_end)? {
            value = value * 10 + u64::from(d - b'0');
        }
        Some(Number::Unsigned(value))
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }
}

/// The end of the run of plain string bytes (not `"`, `\` or a control
/// character) starting at `i`, eight bytes at a time where it can.
fn plain_run(b: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = b.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        // A byte is flagged when it is below 0x20, or equals `"` or `\`
        // (serde_json's test: exact for bytes below 0x80, and a byte at or
        // above 0x80 is never flagged because of `!w`).
        let quote = w ^ (ONES * u64::from(b'"'));
        let backslash = w ^ (ONES * u64::from(b'\\'));
        let flags =
            (w.wrapping_sub(ONES * 0x20) | quote.wrapping_sub(ONES) | backslash.wrapping_sub(ONES))
                & !w
                & HIGHS;
        if flags != 0 {
            return i + (flags.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if c < 0x20 || c == b'"' || c == b'\\' {
            break;
        }
        i += 1;
    }
    i
}

/// The escape after a backslash, `rest` starting at the character after it:
/// `(bytes of rest it takes, UTF-8 bytes it stands for)`, or `None` for an
/// invalid escape or a surrogate that is not part of a well-formed pair.
fn escape(rest: &[u8]) -> Option<(usize, usize)> {
    match *rest.first()? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some((1, 1)),
        b'u' => {
            let unit = hex4(rest.get(1..5)?)?;
            match unit {
                0..=0x7f => Some((5, 1)),
                0x80..=0x7ff => Some((5, 2)),
                0xd800..=0xdbff => {
                    // a high surrogate must be followed by `\u` and a low one
                    if rest.get(5..7)? != b"\\u" {
                        return None;
                    }
                    let low = hex4(rest.get(7..11)?)?;
                    (0xdc00..=0xdfff).contains(&low).then_some((11, 4))
                }
                0xdc00..=0xdfff => None,
                _ => Some((5, 3)),
            }
        }
        _ => None,
    }
}

/// Four hex digits, either case.
fn hex4(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0u32, |acc, &d| {
        let v = char::from(d).to_digit(16)?;
        Some(acc * 16 + v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanned(body: &str) -> Option<super::super::RequestFacts> {
        read(body).map(|read| read.facts)
    }

    #[test]
    fn typical_bodies_are_read_without_the_serde_pass() {
        let f = scanned(
            r#"{"model":"m","messages":[{"role":"user","content":"a\nb\u00e9\ud83d\ude00"}],"max_tokens":16,"temperature":0.5e0,"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .expect("scanned");
        assert_eq!(f.model, "m");
        assert_eq!(f.prompt_bytes, "a\nbé😀".len());
        assert_eq!(
            (f.max_tokens, f.stream, f.include_usage),
            (Some(16), true, true)
        );
    }

    #[test]
    fn unusual_bodies_are_left_to_the_serde_pass() {
        for body in [
            r#"{"model":"m\u0031"}"#,              // escaped model
            r#"{"mod\u0065l":"m"}"#,               // escaped key
            r#"{"model":"m","max_tokens":1.0}"#,   // a float count
            r#"{"model":"m","x":1e999}"#,          // out of range
            r#"{"model":"m","x":"\ud800"}"#,       // lone surrogate
            r#"{"model":"m","x":"\udc00\ud800"}"#, // reversed pair
            r#"{"model":"m","x":"\udc00"}"#,       // lone low surrogate
            r#"{"model":"m","x":"\ud800\u0041"}"#, // high, then no low
            r#"{"model":"m","x":"\x"}"#,           // unknown escape
            r#"{"model":"m","x":"\u12g4"}"#,       // bad hex
            r#"{"model":"m" "x":1}"#,              // missing comma
            r#"{"model":"m","x":[1 2]}"#,          // missing comma
            r#"{"model":"m","x" 1}"#,              // missing colon
            r#"{"model":"m",}"#,                   // trailing comma
            r#"{"model":"m","x":"abc}"#,           // unclosed string
            r#"{"model":"m","x":[1}"#,             // unclosed array
            r#"{"model":"m","x":tru}"#,            // bad literal
            r#"{"model":"m","x":-01}"#,            // leading zero
            r#"{"model":"m","x":1.}"#,             // empty fraction
            r#"{"model":"m","x":.5}"#,             // no integer part
            r#"{"model":"m","x":1e}"#,             // empty exponent
            r#"["model","m"]"#,                    // not an object
            r#"{"model":"m","prompt":[-1]}"#,      // negative token id
            r#"{"model":"m","model":"n"}"#,        // duplicate
            r#"{"model":"m","x":01}"#,             // malformed number
            r#"{"model":"m","x":[1,]}"#,           // trailing comma
            r#"{"model":"m"} x"#,                  // trailing bytes
            r#"{"messages":[]}"#,                  // no model
            "{\"model\":\"m\",\"x\":\"a\u{1}\"}",  // control character
        ] {
            assert!(read(body).is_none(), "{body}");
        }
        let deep = format!(
            r#"{{"model":"m","x":{}{}}}"#,
            "[".repeat(64),
            "]".repeat(64)
        );
        assert!(read(&deep).is_none());
        let ok = format!(
            r#"{{"model":"m","x":{}{}}}"#,
            "[".repeat(63),
            "]".repeat(63)
        );
        assert!(read(&ok).is_some());
    }

    #[test]
    fn plain_runs_stop_at_quotes_backslashes_and_controls() {
        for (text, end) in [
            ("abcdefghij\"", 10),
            ("abcdefgh\\", 8),
            ("ab\u{1f}", 2),
            ("héllo wörld, \u{7f}é\"", 18),
            ("", 0),
        ] {
            assert_eq!(plain_run(text.as_bytes(), 0), end, "{text:?}");
        }
    }
}
