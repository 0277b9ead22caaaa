//! A small, strict JSON tokenizer that builds a tree of byte spans.
//!
//! The masker never re-serializes JSON: it only needs to know where each
//! value, key and member starts and ends in the input so that it can cut or
//! replace exact byte ranges. This module parses RFC 8259 JSON into such a
//! span tree in one pass, rejecting anything that is not valid JSON.
//!
//! Everything here works on `&[u8]` with checked access; nothing panics on
//! any input.

use std::borrow::Cow;

use crate::MaskError;

/// Deepest nesting of arrays/objects accepted in the input (the top-level
/// value counts as level 1). Kept below the 128 levels that common JSON
/// parsers (serde_json among them) accept, so that the few levels the
/// security label adds (`meta` → `security` → coding) never push a masked
/// body past what downstream parsers can read.
pub const MAX_DEPTH: usize = 100;

/// One JSON value: its byte range in the input and what kind it is.
#[derive(Debug)]
pub(crate) struct Node {
    /// Offset of the first byte of the value.
    pub start: usize,
    /// Offset just past the last byte of the value.
    pub end: usize,
    pub kind: Kind,
}

#[derive(Debug)]
pub(crate) enum Kind {
    Object(Vec<Member>),
    Array(Vec<Node>),
    /// A string token; `escaped` tells whether it contains a backslash.
    Str {
        escaped: bool,
    },
    /// Numbers, `true`, `false`, `null`.
    Scalar,
}

/// One `"key": value` pair of an object.
#[derive(Debug)]
pub(crate) struct Member {
    /// Offset of the key's opening quote.
    pub key_start: usize,
    /// Offset just past the key's closing quote.
    pub key_end: usize,
    pub key_escaped: bool,
    pub value: Node,
}

impl Member {
    /// The decoded key.
    pub fn key<'a>(&self, input: &'a [u8]) -> Cow<'a, str> {
        string_content(input, self.key_start, self.key_end, self.key_escaped)
    }

    /// Whether the decoded key is `name`: a byte comparison unless the key holds an escape
    /// (this runs for every member of every object while looking for resources, so it must
    /// not decode or re-validate the key).
    pub fn key_is(&self, input: &[u8], name: &str) -> bool {
        if self.key_escaped {
            return self.key(input) == name;
        }
        input.get(self.key_start + 1..self.key_end.saturating_sub(1)) == Some(name.as_bytes())
    }
}

impl Node {
    /// The decoded value if this node is a string.
    pub fn as_str<'a>(&self, input: &'a [u8]) -> Option<Cow<'a, str>> {
        match self.kind {
            Kind::Str { escaped } => Some(string_content(input, self.start, self.end, escaped)),
            _ => None,
        }
    }

    /// The raw bytes between the quotes if this node is a string.
    pub fn raw_str<'a>(&self, input: &'a [u8]) -> Option<&'a [u8]> {
        match self.kind {
            Kind::Str { .. } => input.get(self.start + 1..self.end.saturating_sub(1)),
            _ => None,
        }
    }

    pub fn members(&self) -> Option<&[Member]> {
        match &self.kind {
            Kind::Object(m) => Some(m),
            _ => None,
        }
    }
}

/// Decode the string token at `start..end` (quotes included).
fn string_content(input: &[u8], start: usize, end: usize, escaped: bool) -> Cow<'_, str> {
    let raw = input
        .get(start + 1..end.saturating_sub(1))
        .unwrap_or_default();
    if escaped {
        Cow::Owned(decode_escaped(raw))
    } else {
        // The whole input was checked to be UTF-8 and string tokens start and
        // end on ASCII quotes, so this cannot fail; fall back to lossy anyway.
        String::from_utf8_lossy(raw)
    }
}

fn hex4(raw: &[u8], at: usize) -> Option<u32> {
    let digits = raw.get(at..at + 4)?;
    let mut v = 0u32;
    for &d in digits {
        v = v * 16 + (d as char).to_digit(16)?;
    }
    Some(v)
}

/// If `raw[at..]` starts with `\uXXXX` (optionally a surrogate pair written
/// as two escapes), return the code point (U+FFFD for a lone surrogate) and
/// the number of bytes consumed.
fn unicode_escape(raw: &[u8], at: usize) -> Option<(char, usize)> {
    let hi = hex4(raw, at + 2)?;
    if (0xD800..0xDC00).contains(&hi) {
        if raw.get(at + 6) == Some(&b'\\') && raw.get(at + 7) == Some(&b'u') {
            if let Some(lo) = hex4(raw, at + 8) {
                if (0xDC00..0xE000).contains(&lo) {
                    let cp = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                    return Some((char::from_u32(cp).unwrap_or('\u{FFFD}'), 12));
                }
            }
        }
        return Some(('\u{FFFD}', 6));
    }
    Some((char::from_u32(hi).unwrap_or('\u{FFFD}'), 6))
}

/// Decode the content of a validated JSON string that contains escapes.
fn decode_escaped(raw: &[u8]) -> String {
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let simple = match raw.get(i + 1) {
            Some(b'"') => Some(b'"'),
            Some(b'\\') => Some(b'\\'),
            Some(b'/') => Some(b'/'),
            Some(b'b') => Some(0x08),
            Some(b'f') => Some(0x0C),
            Some(b'n') => Some(b'\n'),
            Some(b'r') => Some(b'\r'),
            Some(b't') => Some(b'\t'),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            i += 2;
        } else if let Some((c, len)) = unicode_escape(raw, i) {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            i += len;
        } else {
            // Not reachable for validated input; keep the byte.
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Byte length of the character (one decoded `char`, i.e. a raw UTF-8
/// sequence, a simple escape, a `\uXXXX` escape or an escaped surrogate
/// pair) starting at `raw[at]` inside validated string content.
pub(crate) fn char_len(raw: &[u8], at: usize) -> usize {
    match raw.get(at) {
        None => 0,
        Some(b'\\') => match raw.get(at + 1) {
            Some(b'u') => unicode_escape(raw, at).map_or(2, |(_, len)| len),
            _ => 2,
        },
        Some(&b) if b < 0x80 => 1,
        Some(&b) if b >= 0xF0 => 4,
        Some(&b) if b >= 0xE0 => 3,
        Some(_) => 2,
    }
    .min(raw.len().saturating_sub(at))
    .max(1)
}

/// Byte offsets (into `raw`) where each character of the string content
/// starts.
pub(crate) fn char_starts(raw: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        starts.push(i);
        i += char_len(raw, i);
    }
    starts
}

/// Parse `input` (already known to be UTF-8) into a span tree.
pub(crate) fn parse(input: &[u8]) -> Result<Node, MaskError> {
    let mut p = Parser { b: input, pos: 0 };
    let root = p.value(0)?;
    p.skip_ws();
    if p.pos != input.len() {
        return Err(MaskError::NotJson);
    }
    Ok(root)
}

struct Parser<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), MaskError> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(MaskError::NotJson)
        }
    }

    /// Parse one value; `depth` is the number of containers around it.
    fn value(&mut self, depth: usize) -> Result<Node, MaskError> {
        self.skip_ws();
        let start = self.pos;
        let kind = match self.peek() {
            Some(b'{') => {
                if depth + 1 > MAX_DEPTH {
                    return Err(MaskError::TooDeep);
                }
                self.pos += 1;
                Kind::Object(self.object_body(depth + 1)?)
            }
            Some(b'[') => {
                if depth + 1 > MAX_DEPTH {
                    return Err(MaskError::TooDeep);
                }
                self.pos += 1;
                Kind::Array(self.array_body(depth + 1)?)
            }
            Some(b'"') => Kind::Str {
                escaped: self.string()?,
            },
            Some(b'-' | b'0'..=b'9') => {
                self.number()?;
                Kind::Scalar
            }
            Some(b't') => self.literal(b"true")?,
            Some(b'f') => self.literal(b"false")?,
            Some(b'n') => self.literal(b"null")?,
            _ => return Err(MaskError::NotJson),
        };
        Ok(Node {
            start,
            end: self.pos,
            kind,
        })
    }

    fn object_body(&mut self, depth: usize) -> Result<Vec<Member>, MaskError> {
        let mut members = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(members);
        }
        loop {
            self.skip_ws();
            let key_start = self.pos;
            if self.peek() != Some(b'"') {
                return Err(MaskError::NotJson);
            }
            let key_escaped = self.string()?;
            let key_end = self.pos;
            self.skip_ws();
            self.expect(b':')?;
            let value = self.value(depth)?;
            members.push(Member {
                key_start,
                key_end,
                key_escaped,
                value,
            });
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(members);
                }
                _ => return Err(MaskError::NotJson),
            }
        }
    }

    fn array_body(&mut self, depth: usize) -> Result<Vec<Node>, MaskError> {
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(items);
        }
        loop {
            items.push(self.value(depth)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(items);
                }
                _ => return Err(MaskError::NotJson),
            }
        }
    }

    /// Parse a string token starting at the opening quote; returns whether
    /// it contains escapes.
    fn string(&mut self) -> Result<bool, MaskError> {
        self.expect(b'"')?;
        let mut escaped = false;
        loop {
            match self.peek() {
                None => return Err(MaskError::NotJson),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    match self.b.get(self.pos + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.pos += 2
                        }
                        Some(b'u') => {
                            if hex4(self.b, self.pos + 2).is_none() {
                                return Err(MaskError::NotJson);
                            }
                            self.pos += 6;
                        }
                        _ => return Err(MaskError::NotJson),
                    }
                }
                Some(c) if c < 0x20 => return Err(MaskError::NotJson),
                Some(_) => self.pos += 1,
            }
        }
    }

    fn digits(&mut self) -> usize {
        let from = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - from
    }

    fn number(&mut self) -> Result<(), MaskError> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(MaskError::NotJson),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(MaskError::NotJson);
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(MaskError::NotJson);
            }
        }
        Ok(())
    }

    fn literal(&mut self, word: &[u8]) -> Result<Kind, MaskError> {
        if self.b.get(self.pos..self.pos + word.len()) == Some(word) {
            self.pos += word.len();
            Ok(Kind::Scalar)
        } else {
            Err(MaskError::NotJson)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> bool {
        parse(s.as_bytes()).is_ok()
    }

    #[test]
    fn accepts_and_rejects_like_rfc8259() {
        for good in [
            "{}",
            "[]",
            " { \"a\" : [1, -0.5e+3, 1.50, 12345678901234567890, true, false, null] } ",
            "\"\\u00e9\\ud83d\\ude00\\n\"",
            "0",
            "-0",
        ] {
            assert!(ok(good), "{good}");
        }
        for bad in [
            "",
            "{",
            "{\"a\"}",
            "{\"a\":1,}",
            "[1,]",
            "01",
            "1.",
            ".5",
            "1e",
            "+1",
            "tru",
            "nul",
            "\"a",
            "\"\\x\"",
            "\"\\u12g4\"",
            "\"\u{1}\"",
            "{} x",
            "{'a':1}",
            "[1 2]",
        ] {
            assert!(!ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn depth_limit() {
        let deep = |n: usize| "[".repeat(n) + &"]".repeat(n);
        assert!(parse(deep(MAX_DEPTH).as_bytes()).is_ok());
        assert_eq!(
            parse(deep(MAX_DEPTH + 1).as_bytes()).err(),
            Some(MaskError::TooDeep)
        );
    }

    #[test]
    fn decodes_keys_and_counts_chars() {
        let input = br#"{"tele\u0063om":1,"x\ud83d\ude00":2}"#;
        let root = parse(input).expect("parses");
        let keys: Vec<String> = root
            .members()
            .expect("object")
            .iter()
            .map(|m| m.key(input).into_owned())
            .collect();
        assert_eq!(keys, ["telecom", "x\u{1F600}"]);
        // key_is compares the decoded key, escaped or not.
        let members = root.members().expect("object");
        assert!(members[0].key_is(input, "telecom"));
        assert!(!members[0].key_is(input, "tele\\u0063om"));
        assert!(members[1].key_is(input, "x\u{1F600}"));
        assert!(!members[1].key_is(input, "x"));
        let plain = br#"{"resourceType":"Patient","resourceTypes":1}"#;
        let root = parse(plain).expect("parses");
        let members = root.members().expect("object");
        assert!(members[0].key_is(plain, "resourceType"));
        assert!(!members[1].key_is(plain, "resourceType"));
        assert!(!members[0].key_is(plain, "resourceTyp"));
        assert_eq!(
            char_starts(br"a\u00e9\ud83d\ude00\n\ud800x"),
            vec![0, 1, 7, 19, 21, 27]
        );
        assert_eq!(char_starts("héllo".as_bytes()), vec![0, 1, 3, 4, 5]);
    }
}
