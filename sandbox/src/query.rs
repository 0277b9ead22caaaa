//! Query-string and form-body handling: percent-decoding (with `+` as space)
//! and re-encoding for the links the sandbox emits.

/// Value of one hexadecimal digit.
fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` escapes and `+` (as a space, like
/// `application/x-www-form-urlencoded`). The result must be UTF-8.
pub(crate) fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hi = b.get(i + 1).copied().and_then(hex);
                let lo = b.get(i + 2).copied().and_then(hex);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi << 4) | lo);
                        i += 3;
                    }
                    _ => return Err(format!("invalid percent-encoding in '{s}'")),
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("percent-decoded text of '{s}' is not UTF-8"))
}

/// Splits a raw query string (or form body) into decoded `(name, value)`
/// pairs, in order. Empty pieces (`a=1&&b=2`) are skipped; a piece without
/// `=` has an empty value.
pub(crate) fn parse_query(q: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for piece in q.split('&') {
        if piece.is_empty() {
            continue;
        }
        let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
        out.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(out)
}

/// Percent-encodes one query component. Unreserved characters and the
/// harmless `: , / * $ @` are kept; everything else (including `+`, `|`,
/// `&`, `=`, `%`, space, non-ASCII) is escaped.
pub(crate) fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.' | b'_' | b'~' | b':' | b',' | b'/' | b'*' | b'$' | b'@'
            );
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Builds `a=1&b=2` from pairs, encoding each side.
pub(crate) fn build_query(params: &[(String, String)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{}={}", encode_component(k), encode_component(v)))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn decode_basics() {
        assert_eq!(percent_decode("a+b%20c%7Cd").unwrap(), "a b c|d");
        assert_eq!(percent_decode("%C3%A9").unwrap(), "é");
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%").is_err());
        assert!(percent_decode("%FF").is_err());
    }

    #[test]
    fn parse_and_rebuild() {
        let p = parse_query("code=http%3A%2F%2Floinc.org%7C8302-2&&flag&x=a%2Bb").unwrap();
        assert_eq!(
            p,
            vec![
                ("code".into(), "http://loinc.org|8302-2".into()),
                ("flag".into(), String::new()),
                ("x".into(), "a+b".into()),
            ]
        );
        let q = build_query(&p);
        assert_eq!(q, "code=http://loinc.org%7C8302-2&flag=&x=a%2Bb");
        assert_eq!(parse_query(&q).unwrap(), p);
    }
}
