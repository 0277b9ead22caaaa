//! Percent-encoding and the FHIR search escapes (`\,` `\$` `\|` `\\`).
//!
//! FHIR search values are URL-decoded first, then read with FHIR's own escapes
//! (<http://hl7.org/fhir/R4/search.html#escaping>): an unescaped `,` separates alternatives (OR), an
//! unescaped `|` separates a token's system from its code, an unescaped `$` separates the parts of a
//! composite value.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::fmt;

/// Everything but the RFC 3986 unreserved characters is encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-decoding failed: a `%` not followed by two hex digits, or bytes that are not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError;

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bad percent-encoding or not UTF-8")
    }
}

impl std::error::Error for DecodeError {}

/// Strictly percent-decode `s` (a path segment, or a query or form key or value).
///
/// With `plus_as_space` a `+` means a space, as in `application/x-www-form-urlencoded` and as FHIR
/// servers read query strings (the spec asks for `+` in a date's time zone to be sent as `%2B`).
/// Unlike lenient decoders, a stray `%` is an error rather than a literal, so that the gateway and
/// the upstream server cannot read the same bytes differently.
pub fn percent_decode(s: &str, plus_as_space: bool) -> Result<String, DecodeError> {
    let bytes = s.as_bytes();
    if !bytes
        .iter()
        .any(|&b| b == b'%' || (plus_as_space && b == b'+'))
    {
        return Ok(s.to_owned());
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|&b| hex(b)).ok_or(DecodeError)?;
                let lo = bytes.get(i + 2).and_then(|&b| hex(b)).ok_or(DecodeError)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_as_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| DecodeError)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-encode `s` for use as one path segment, query key or query value: everything but
/// `A-Z a-z 0-9 - . _ ~` is encoded (so the result also survives form decoding).
pub fn percent_encode(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// Split a URL-decoded search value at its unescaped commas (the OR list).
///
/// `\,` does not split and becomes `,` in its alternative; the other escapes (`\|`, `\$`, `\\`) are
/// kept as they are, because `|` and `$` still carry meaning inside one alternative (token system,
/// composite parts). Use [`unescape`] or [`split_token`] on an alternative to resolve them. A backslash
/// before any other character, or at the end, is kept literally. An empty input gives no alternatives.
pub fn split_alternatives(value: &str) -> Vec<String> {
    if value.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(',') => cur.push(','),
                Some(n) => {
                    cur.push('\\');
                    cur.push(n);
                }
                None => cur.push('\\'),
            },
            ',' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Resolve the FHIR escapes `\\`, `\,`, `\$`, `\|` in one alternative. Other backslashes stay.
pub fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n @ ('\\' | ',' | '$' | '|')) => out.push(n),
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Escape `\`, `,`, `$` and `|` with a backslash (the inverse of [`unescape`]).
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '\\' | ',' | '$' | '|') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Split one token alternative at its first unescaped `|` into `(system, code)`, both unescaped.
///
/// `code` → `(None, "code")`; `system|code` → `(Some("system"), "code")`; `|code` →
/// `(Some(""), "code")` (explicitly no system); `system|` → `(Some("system"), "")`.
pub fn split_token(value: &str) -> (Option<String>, String) {
    let mut chars = value.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '|' => return (Some(unescape(&value[..i])), unescape(&value[i + 1..])),
            _ => {}
        }
    }
    (None, unescape(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_strictly() {
        assert_eq!(percent_decode("a%20b+c", true), Ok("a b c".to_owned()));
        assert_eq!(percent_decode("a%20b+c", false), Ok("a b+c".to_owned()));
        assert_eq!(percent_decode("%7c%7C", false), Ok("||".to_owned()));
        assert_eq!(percent_decode("%", false), Err(DecodeError));
        assert_eq!(percent_decode("%4", false), Err(DecodeError));
        assert_eq!(percent_decode("%zz", false), Err(DecodeError));
        assert_eq!(percent_decode("%ff", false), Err(DecodeError));
        assert_eq!(percent_decode("%C3%A9", false), Ok("é".to_owned()));
    }

    #[test]
    fn splits_and_unescapes() {
        assert_eq!(split_alternatives(""), Vec::<String>::new());
        assert_eq!(split_alternatives("a,b"), vec!["a", "b"]);
        assert_eq!(split_alternatives(r"a\,b,c"), vec!["a,b", "c"]);
        assert_eq!(split_alternatives(r"a\\,b"), vec![r"a\\", "b"]);
        assert_eq!(split_alternatives(r"s\|c"), vec![r"s\|c"]);
        assert_eq!(split_alternatives("a,"), vec!["a", ""]);
        assert_eq!(unescape(r"a\|b\$c\\d\,e\x"), r"a|b$c\d,e\x");
        assert_eq!(escape(r"a|b$c\d,e"), r"a\|b\$c\\d\,e");
        assert_eq!(
            split_token("http://loinc.org|1234-5"),
            (Some("http://loinc.org".into()), "1234-5".into())
        );
        assert_eq!(split_token(r"a\|b"), (None, "a|b".into()));
        assert_eq!(split_token("|x"), (Some(String::new()), "x".into()));
    }
}
