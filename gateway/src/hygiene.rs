//! Request hygiene that runs before routing: path normalisation, request ids, forwarded headers
//! and the stripping of spoofable and hop-by-hop headers.
//!
//! The path is normalised ONCE; routing, every policy decision and the upstream request all use
//! the normalised form, so no layer can decide on one path and forward another.

use http::HeaderName;
use ipnet::IpNet;
use pingora::http::RequestHeader;
use std::net::IpAddr;

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

/// Normalise a request path (without the query):
/// - percent-decode unreserved characters, upper-case the hex of what stays encoded;
/// - refuse encoded `/` and `\`, NUL and control characters (raw or encoded), a raw `\`,
///   malformed escapes, and escapes that do not decode to valid UTF-8;
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

fn check_utf8_run(run: &mut Vec<u8>) -> Result<(), PathError> {
    if run.is_empty() {
        return Ok(());
    }
    let ok = std::str::from_utf8(run).is_ok();
    run.clear();
    if ok {
        Ok(())
    } else {
        Err(PathError::InvalidUtf8)
    }
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
    fn normalising_twice_changes_nothing() {
        for raw in ["/a//b/./c/../d/", "/x/%41%2e%2E/y", "/fhir/a%20b%3b"] {
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
