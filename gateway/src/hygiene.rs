//! Request hygiene that runs before routing: path normalisation, request ids, forwarded headers
//! and the stripping of spoofable and hop-by-hop headers.
//!
//! The path is normalised ONCE; routing, every policy decision and the upstream request all use
//! the normalised form, so no layer can decide on one path and forward another.

use http::HeaderName;
use ipnet::IpNet;
use pingora::http::RequestHeader;
use std::net::IpAddr;
use unicode_normalization::UnicodeNormalization;

/// Why a path was refused (all answered with 400 `bad_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    EncodedSlash,
    BadPercentEncoding,
    ControlCharacter,
    InvalidUtf8,
    Backslash,
    EscapesRoot,
    DotSegmentParameter,
    /// `%25` before the hex of `.`, `/` or `\` (`%252e`, `%252F`, `%255c`): a backend that
    /// decodes twice sees a separator.
    DoubleEncodedSeparator,
    /// A character whose Unicode compatibility form (NFKC) holds `/`, `\`, `.`, `%` or `;`
    /// (full-width solidus U+FF0F, two-dot leader U+2025, ...): a backend that folds Unicode
    /// sees a separator.
    SeparatorLookalike,
    /// A non-ASCII character (raw or percent-encoded) on a FHIR route.
    NonAscii,
    /// `;` (raw or `%3B`) on a FHIR route.
    PathParameter,
}

impl PathError {
    /// A short explanation that names no part of the path (paths can carry PHI).
    pub fn detail(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "the request path must start with '/'",
            PathError::EncodedSlash => "encoded '/' or '\\' is not allowed in the path",
            PathError::BadPercentEncoding => "the path has a malformed percent-encoding",
            PathError::ControlCharacter => "the path contains NUL or a control character",
            PathError::InvalidUtf8 => "the path is not valid UTF-8",
            PathError::Backslash => "'\\' is not allowed in the path",
            PathError::EscapesRoot => "the path climbs above the root",
            PathError::DotSegmentParameter => {
                "a dot segment with parameters ('..;') is not allowed"
            }
            PathError::DoubleEncodedSeparator => {
                "a double-encoded '.', '/' or '\\' ('%25' before its hex) is not allowed in the path"
            }
            PathError::SeparatorLookalike => {
                "a character that Unicode compatibility folding turns into '/', '\\', '.', '%' or ';' is not allowed in the path"
            }
            PathError::NonAscii => "non-ASCII characters are not allowed in the path on FHIR routes",
            PathError::PathParameter => "path parameters (';') are not allowed on FHIR routes",
        }
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// What a character in disguise may not fold into: the path separators `/` and `\`, the `.` of
/// dot segments, the `%` of an escape (`％２ｅ` folds into `%2e`) and the `;` of path
/// parameters (`..；` folds into `..;`).
const FOLD_TARGETS: [char; 5] = ['/', '\\', '.', '%', ';'];

/// Whether a non-ASCII character's Unicode compatibility form (NFKC) holds a separator: a
/// backend that folds Unicode (NFKC, or the "best fit" mappings built on it) would see one.
fn is_separator_lookalike(c: char) -> bool {
    !c.is_ascii() && std::iter::once(c).nfkc().any(|f| FOLD_TARGETS.contains(&f))
}

/// Whether a path holds `%25` before the hex of `.`, `/` or `\` (any case, also after more
/// `25`s: `%252e`, `%252F`, `%255c`, `%25252e`), which a backend that decodes twice (or more)
/// turns into a separator.
fn has_double_encoded_separator(path: &[u8]) -> bool {
    let hex = |i: usize| -> Option<u8> {
        let h = hex_val(*path.get(i)?)?;
        let l = hex_val(*path.get(i + 1)?)?;
        Some(h * 16 + l)
    };
    for i in 0..path.len() {
        if path[i] != b'%' || hex(i + 1) != Some(0x25) {
            continue;
        }
        // What follows the decoded `%`: more `25`s keep it an escape of `%` one level down.
        let mut j = i + 3;
        while path.get(j..j + 2) == Some(&b"25"[..]) {
            j += 2;
        }
        if matches!(hex(j), Some(b'.' | b'/' | b'\\')) {
            return true;
        }
    }
    false
}

/// Normalise a request path (without the query):
/// - percent-decode unreserved characters, upper-case the hex of what stays encoded;
/// - refuse encoded `/` and `\`, NUL and control characters (raw or encoded), a raw `\`,
///   malformed escapes, and escapes that do not decode to valid UTF-8;
/// - refuse separators in disguise: `%25` before the hex of `.`, `/` or `\` (double encoding),
///   and characters, raw or encoded, whose NFKC form holds `/`, `\`, `.`, `%` or `;`
///   (full-width solidus U+FF0F, one-dot leader U+2024, ...);
/// - merge duplicate slashes and resolve `.` and `..` segments (including encoded ones);
///   a `..` that would climb above the root is refused.
///
/// The trailing slash is kept. The result is what routing sees and what goes upstream.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Pass 1: decode unreserved escapes, validate the rest, collect the decoded bytes of every
    // escape run to check UTF-8.
    let mut out = Vec::with_capacity(bytes.len());
    let mut decoded_run: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                return Err(PathError::BadPercentEncoding);
            };
            let (Some(h), Some(l)) = (hex_val(h), hex_val(l)) else {
                return Err(PathError::BadPercentEncoding);
            };
            let v = h * 16 + l;
            if v == b'/' || v == b'\\' {
                return Err(PathError::EncodedSlash);
            }
            if v < 0x20 || v == 0x7f {
                return Err(PathError::ControlCharacter);
            }
            if v >= 0x80 {
                decoded_run.push(v);
            } else {
                check_utf8_run(&mut decoded_run)?;
            }
            if is_unreserved(v) {
                out.push(v);
            } else {
                out.extend_from_slice(&[b'%', HEX[(v >> 4) as usize], HEX[(v & 15) as usize]]);
            }
            i += 3;
            continue;
        }
        check_utf8_run(&mut decoded_run)?;
        if b < 0x20 || b == 0x7f {
            return Err(PathError::ControlCharacter);
        }
        if b == b'\\' {
            return Err(PathError::Backslash);
        }
        if b >= 0x80 {
            // Raw non-ASCII bytes: the whole path must then be valid UTF-8 (checked below).
        }
        out.push(b);
        i += 1;
    }
    check_utf8_run(&mut decoded_run)?;
    let path = String::from_utf8(out).map_err(|_| PathError::InvalidUtf8)?;
    if path.chars().any(is_separator_lookalike) {
        return Err(PathError::SeparatorLookalike);
    }
    // On the decoded form: `%25%32%65` has become `%252e` by now.
    if has_double_encoded_separator(path.as_bytes()) {
        return Err(PathError::DoubleEncodedSeparator);
    }

    // Pass 2: segments. Empty segments (duplicate slashes) and "." vanish; ".." pops.
    let trailing_slash =
        path.len() > 1 && (path.ends_with('/') || path.ends_with("/.") || path.ends_with("/.."));
    let mut segments: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        // `..;x` and `.;x` are dot segments to servlet containers, which strip path parameters
        // before resolving: refuse them everywhere.
        let before_param = seg.split([';']).next().unwrap_or(seg);
        let before_param = before_param.split("%3B").next().unwrap_or(before_param);
        if before_param.len() < seg.len() && (before_param == "." || before_param == "..") {
            return Err(PathError::DotSegmentParameter);
        }
        match seg {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::EscapesRoot);
                }
            }
            s => segments.push(s),
        }
    }
    let mut normalized = String::with_capacity(path.len());
    for s in &segments {
        normalized.push('/');
        normalized.push_str(s);
    }
    if segments.is_empty() || trailing_slash {
        normalized.push('/');
    }
    Ok(normalized)
}

/// A run of percent-decoded bytes >= 0x80 must be valid UTF-8 and hold no separator in
/// disguise.
fn check_utf8_run(run: &mut Vec<u8>) -> Result<(), PathError> {
    if run.is_empty() {
        return Ok(());
    }
    let result = match std::str::from_utf8(run) {
        Ok(s) if s.chars().any(is_separator_lookalike) => Err(PathError::SeparatorLookalike),
        Ok(_) => Ok(()),
        Err(_) => Err(PathError::InvalidUtf8),
    };
    run.clear();
    result
}

/// The further checks of a normalised path on a FHIR route: FHIR resource types, ids and
/// operation names are ASCII and take no path parameters, so any non-ASCII character (raw or
/// percent-encoded) and any `;` (raw or `%3B`) is refused.
pub fn check_fhir_path(normalized: &str) -> Result<(), PathError> {
    let b = normalized.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let (v, len) = match b[i] {
            b'%' => match (
                b.get(i + 1).copied().and_then(hex_val),
                b.get(i + 2).copied().and_then(hex_val),
            ) {
                (Some(h), Some(l)) => (h * 16 + l, 3),
                _ => return Err(PathError::BadPercentEncoding),
            },
            c => (c, 1),
        };
        if v >= 0x80 {
            return Err(PathError::NonAscii);
        }
        if v == b';' {
            return Err(PathError::PathParameter);
        }
        i += len;
    }
    Ok(())
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) never forwarded. `transfer-encoding` and
/// `content-length` are left to Pingora, which owns message framing.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// A header name folded for comparison: lower case, every character that is not a letter or a
/// digit turned into `-` (so `X_Caregate.Subject` and `x-caregate-subject` compare equal, as
/// CGI-style backends would fold them).
fn fold_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// Whether a client-sent header name would alias one of the gateway's identity headers:
/// `x-caregate-*` in any letter case and with `_` or `.` in place of `-`.
pub fn is_reserved_identity_header(name: &str) -> bool {
    fold_name(name).starts_with("x-caregate-")
}

/// Identity and override headers that backends commonly trust: never accepted from any client.
const ALWAYS_STRIP: &[&str] = &[
    "x-user",
    "x-user-id",
    "x-remote-user",
    "remote-user",
    "x-forwarded-user",
    "x-authenticated-user",
    "x-auth-user",
    "x-patient-id",
    "x-roles",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Forwarding headers believed only from trusted proxies.
const FORWARDING: &[&str] = &[
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
];

/// Remove what a client may not send upstream: every `x-caregate-*` alias, identity and
/// method/URL override headers, the headers named in `Connection`, hop-by-hop headers, and
/// (when the peer is not a trusted proxy) the forwarding headers it could spoof.
pub fn strip_untrusted_headers(req: &mut RequestHeader, peer_trusted: bool) {
    let mut to_remove: Vec<HeaderName> = Vec::new();
    for value in req.headers.get_all(http::header::CONNECTION) {
        if let Ok(v) = value.to_str() {
            for token in v.split(',').map(|t| t.trim()).filter(|t| !t.is_empty()) {
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    // Never let `Connection` remove framing or the Host.
                    if !matches!(
                        name.as_str(),
                        "host" | "content-length" | "transfer-encoding"
                    ) {
                        to_remove.push(name);
                    }
                }
            }
        }
    }
    for (name, _) in req.headers.iter() {
        let folded = fold_name(name.as_str());
        let forwarding = FORWARDING.contains(&folded.as_str());
        if folded.starts_with("x-caregate-")
            || ALWAYS_STRIP.contains(&folded.as_str())
            || (forwarding && (!peer_trusted || folded != name.as_str()))
        {
            // (A forwarding header spelled with `_` or `.` is never a real proxy's.)
            to_remove.push(name.clone());
        }
    }
    for h in HOP_BY_HOP {
        to_remove.push(HeaderName::from_static(h));
    }
    for name in to_remove {
        // remove_header returns the removed values; repeat for duplicates.
        while req.remove_header(&name).is_some() {}
    }
}

/// The real client address: the peer, or — when the peer is a trusted proxy — the right-most
/// address of `X-Forwarded-For` that is not itself a trusted proxy.
pub fn real_client(peer: Option<IpAddr>, xff: Option<&str>, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = peer?;
    if !trusted.iter().any(|n| n.contains(&peer)) {
        return Some(peer);
    }
    let Some(xff) = xff else {
        return Some(peer);
    };
    let mut last = peer;
    for part in xff.rsplit(',') {
        let Ok(ip) = part.trim().parse::<IpAddr>() else {
            // A malformed entry: stop trusting the chain here.
            return Some(last);
        };
        last = ip;
        if !trusted.iter().any(|n| n.contains(&ip)) {
            return Some(ip);
        }
    }
    Some(last)
}

/// A client-sent request id is kept when it is short and plain; otherwise a new one is made.
pub fn accept_request_id(value: Option<&str>) -> Option<String> {
    let v = value?;
    if !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        Some(v.to_string())
    } else {
        None
    }
}

/// A new random request id (128 bits, hex, UUID layout).
pub fn new_request_id() -> String {
    let v: u128 = rand::random();
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn normalises() {
        let cases = [
            ("/", "/"),
            ("/fhir/Patient", "/fhir/Patient"),
            ("/fhir//Patient///1", "/fhir/Patient/1"),
            ("/fhir/./Patient/../Observation", "/fhir/Observation"),
            ("/fhir/%2e%2e/internal", "/internal"),
            ("/fhir/%2E/Patient", "/fhir/Patient"),
            ("/fhir/Patient/", "/fhir/Patient/"),
            ("/fhir/Patient/.", "/fhir/Patient/"),
            ("/fhir/%50atient", "/fhir/Patient"),
            ("/fhir/a%20b", "/fhir/a%20b"),
            ("/fhir/a%3bb", "/fhir/a%3Bb"),
            ("/fhir/caf%C3%A9", "/fhir/caf%C3%A9"),
            ("/fhir/café", "/fhir/café"),
            ("/a/b/..", "/a/"),
            ("//", "/"),
            ("/%7Euser", "/~user"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn refuses() {
        let cases = [
            ("fhir", PathError::NotAbsolute),
            ("/fhir%2FPatient", PathError::EncodedSlash),
            ("/fhir%2fPatient", PathError::EncodedSlash),
            ("/fhir%5CPatient", PathError::EncodedSlash),
            ("/fhir\\Patient", PathError::Backslash),
            ("/fhir/%00", PathError::ControlCharacter),
            ("/fhir/\u{0}", PathError::ControlCharacter),
            ("/fhir/%0d%0aX:1", PathError::ControlCharacter),
            ("/fhir/%7f", PathError::ControlCharacter),
            ("/fhir/%", PathError::BadPercentEncoding),
            ("/fhir/%4", PathError::BadPercentEncoding),
            ("/fhir/%zz", PathError::BadPercentEncoding),
            ("/fhir/%C3", PathError::InvalidUtf8),
            ("/fhir/%FF%FE", PathError::InvalidUtf8),
            ("/fhir/%C3%28", PathError::InvalidUtf8),
            ("/..", PathError::EscapesRoot),
            ("/fhir/../../etc", PathError::EscapesRoot),
            ("/%2e%2e/x", PathError::EscapesRoot),
            ("/portal/..;/internal", PathError::DotSegmentParameter),
            ("/portal/.;x/internal", PathError::DotSegmentParameter),
            ("/portal/%2e%2e;/internal", PathError::DotSegmentParameter),
            ("/portal/..%3b/internal", PathError::DotSegmentParameter),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw), Err(want), "{raw}");
        }
    }

    #[test]
    fn refuses_double_encoded_separators() {
        for raw in [
            "/%252e%252e/internal",
            "/portal/%252E%252E/internal",
            "/portal/..%252F..%252Finternal",
            "/portal/..%252f",
            "/portal/..%255c..%255Cinternal",
            "/portal/%255C",
            // Triple encoding, and a `%25` whose hex digits were themselves escaped.
            "/portal/%25252e%25252e/x",
            "/portal/%25%32%65%25%32%65/x",
            "/portal/%25%32%46",
            // Lower-case `%25` hex is the same escape.
            "/portal/%252e",
        ] {
            assert_eq!(
                normalize_path(raw),
                Err(PathError::DoubleEncodedSeparator),
                "{raw}"
            );
        }
        // A plain `%25` before something harmless stays, encoded.
        for (raw, want) in [
            ("/api/100%2525", "/api/100%2525"),
            ("/api/%2541", "/api/%2541"),
            ("/api/%25", "/api/%25"),
            ("/api/a%25b", "/api/a%25b"),
            ("/api/%252", "/api/%252"),
            ("/api/%2520x", "/api/%2520x"),
            ("/api/%25%2e", "/api/%25."),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn refuses_unicode_separator_lookalikes() {
        for raw in [
            // Full-width solidus U+FF0F, raw and encoded.
            "/portal/..%ef%bc%8f..%EF%BC%8Finternal",
            "/portal/..\u{ff0f}internal",
            // Full-width reverse solidus U+FF3C, full stop U+FF0E.
            "/portal/..%EF%BC%BCinternal",
            "/portal/\u{ff0e}\u{ff0e}/internal",
            // One-dot leader U+2024, two-dot leader U+2025, small full stop U+FE52.
            "/portal/\u{2024}\u{2024}/internal",
            "/portal/%E2%80%A5/internal",
            "/portal/\u{fe52}",
            // Small reverse solidus U+FE68; full-width percent U+FF05 and semicolon U+FF1B.
            "/portal/\u{fe68}",
            "/portal/\u{ff05}2e\u{ff05}2e/x",
            "/portal/..\u{ff1b}/internal",
            // Behind an ordinary non-ASCII letter in the same escaped run.
            "/portal/caf%C3%A9%EF%BC%8F",
        ] {
            assert_eq!(
                normalize_path(raw),
                Err(PathError::SeparatorLookalike),
                "{raw}"
            );
        }
        // Letters that NFKC maps to letters, and other non-ASCII text, pass.
        for (raw, want) in [
            ("/portal/caf%C3%A9", "/portal/caf%C3%A9"),
            ("/portal/café", "/portal/café"),
            ("/portal/\u{fb01}le", "/portal/\u{fb01}le"),
            ("/portal/%E6%97%A5%E6%9C%AC", "/portal/%E6%97%A5%E6%9C%AC"),
            ("/portal/\u{3002}", "/portal/\u{3002}"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn fhir_paths_are_ascii_without_parameters() {
        for ok in [
            "/fhir/Patient/123",
            "/fhir/Patient/a%20b",
            "/fhir/Patient/$everything",
            "/fhir/Observation/_search",
            "/",
        ] {
            assert_eq!(check_fhir_path(ok), Ok(()), "{ok}");
        }
        for (path, want) in [
            ("/fhir/Patient/caf%C3%A9", PathError::NonAscii),
            ("/fhir/Patient/caf%c3%a9", PathError::NonAscii),
            ("/fhir/Patient/café", PathError::NonAscii),
            ("/fhir/Patient/%80", PathError::NonAscii),
            ("/fhir/Patient;jsessionid=1", PathError::PathParameter),
            ("/fhir/Patient/1%3Bx", PathError::PathParameter),
            ("/fhir/Patient/1%3bx", PathError::PathParameter),
            ("/fhir/Patient/%4", PathError::BadPercentEncoding),
        ] {
            assert_eq!(check_fhir_path(path), Err(want), "{path}");
        }
        // The whole gate of a FHIR route: normalisation, then the FHIR checks.
        let fhir = |raw: &str| normalize_path(raw).and_then(|p| check_fhir_path(&p));
        assert_eq!(fhir("/fhir/Patient/%C3%A9"), Err(PathError::NonAscii));
        assert_eq!(
            fhir("/fhir/Patient/..%ef%bc%8f"),
            Err(PathError::SeparatorLookalike)
        );
        assert_eq!(fhir("/fhir/%50atient/1"), Ok(()));
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for raw in [
            "/a//b/./c/../d/",
            "/x/%41%2e%2E/y",
            "/fhir/a%20b%3b",
            "/api/100%2525",
            "/portal/caf%c3%a9",
            "/portal/café",
        ] {
            let once = normalize_path(raw).unwrap();
            assert_eq!(normalize_path(&once).unwrap(), once);
        }
    }

    #[test]
    fn strips_identity_aliases_connection_named_and_hop_by_hop() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for (k, v) in [
            ("X-Caregate-Subject", "admin"),
            ("x_caregate_roles", "admin"),
            ("X_CAREGATE_TENANT", "b"),
            ("X.Caregate.Subject", "admin"),
            ("x-user", "admin"),
            ("X-Original-URL", "/admin"),
            ("X-HTTP-Method-Override", "DELETE"),
            ("x-forwarded-prefix", "/evil"),
            ("true-client-ip", "1.1.1.1"),
            ("connection", "x-secret, keep-alive"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-keep", "yes"),
        ] {
            req.append_header(k.to_string(), v).unwrap();
        }
        strip_untrusted_headers(&mut req, false);
        let left: Vec<String> = req.headers.keys().map(|k| k.as_str().to_string()).collect();
        assert_eq!(left, vec!["x-keep".to_string()]);
    }

    #[test]
    fn real_client_trusts_only_configured_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer = "10.1.1.1".parse().ok();
        assert_eq!(
            real_client(peer, Some("203.0.113.9, 10.2.2.2"), &trusted),
            "203.0.113.9".parse().ok()
        );
        // An untrusted peer's header is ignored.
        assert_eq!(
            real_client("198.51.100.7".parse().ok(), Some("203.0.113.9"), &trusted),
            "198.51.100.7".parse().ok()
        );
        // Garbage in the chain stops the walk at the last trusted hop.
        assert_eq!(real_client(peer, Some("junk"), &trusted), peer);
    }

    #[test]
    fn request_ids() {
        assert_eq!(accept_request_id(Some("abc-123")), Some("abc-123".into()));
        assert_eq!(accept_request_id(Some("a b")), None);
        assert_eq!(accept_request_id(Some(&"x".repeat(129))), None);
        let a = new_request_id();
        assert_eq!(a.len(), 36);
        assert_ne!(a, new_request_id());
    }
}
