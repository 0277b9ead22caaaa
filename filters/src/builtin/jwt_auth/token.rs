//! Structural checks on a compact JWS before any key is touched (RFC 8725), and the claim checks
//! done against the gateway's own clock (so they can run under virtual time in tests).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};

/// Why a token was refused. Each maps to a reason code and an `error_description` that names no
/// token content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed,
    TooLarge,
    AlgNone,
    AlgNotAllowed,
    EmbeddedKey,
    UnknownCrit,
    BadKid,
    BadTyp,
    UnknownIssuer,
    UnknownKey,
    StaleKeys,
    BadSignature,
    WrongAudience,
    MissingClaim,
    BadClaimType,
    Expired,
    NotYetValid,
    IssuedInFuture,
}

impl Rejection {
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::Expired => "token_expired",
            _ => "token_invalid",
        }
    }

    /// Text for `error_description` and the error body: generic, never token content.
    pub fn description(self) -> &'static str {
        match self {
            Rejection::Malformed => "the token is not a well-formed JWS",
            Rejection::TooLarge => "the token is too large",
            Rejection::AlgNone => "unsigned tokens are not accepted",
            Rejection::AlgNotAllowed => "the token's algorithm is not accepted for its issuer",
            Rejection::EmbeddedKey => {
                "tokens that carry or point to their own keys are not accepted"
            }
            Rejection::UnknownCrit => {
                "the token has critical header parameters this gateway does not understand"
            }
            Rejection::BadKid => "the token's key id is invalid",
            Rejection::BadTyp => "the token's type is not accepted",
            Rejection::UnknownIssuer => "the token's issuer is not trusted here",
            Rejection::UnknownKey => "the token was signed with an unknown key",
            Rejection::StaleKeys => "the issuer's keys could not be refreshed for too long",
            Rejection::BadSignature => "the token's signature is invalid",
            Rejection::WrongAudience => "the token is not meant for this gateway",
            Rejection::MissingClaim => "the token lacks a required claim",
            Rejection::BadClaimType => "a claim of the token has the wrong type",
            Rejection::Expired => "the token has expired",
            Rejection::NotYetValid => "the token is not valid yet",
            Rejection::IssuedInFuture => "the token was issued in the future",
        }
    }
}

/// The decoded, not yet verified parts of a token.
#[derive(Debug)]
pub struct Parts {
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
    pub alg: String,
    pub kid: Option<String>,
}

const MAX_KID_LEN: usize = 256;
const MAX_SEGMENT_DEPTH_BYTES: usize = 64 * 1024;

fn decode_segment(seg: &str) -> Result<Map<String, Value>, Rejection> {
    if seg.len() > MAX_SEGMENT_DEPTH_BYTES {
        return Err(Rejection::TooLarge);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(seg.as_bytes())
        .map_err(|_| Rejection::Malformed)?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Rejection::Malformed),
    }
}

/// Split and decode a compact JWS, and refuse what RFC 8725 says never to accept:
/// `alg: none`, embedded or referenced keys (`jwk`, `jku`, `x5u`, `x5c`), `crit` parameters and
/// bad `kid`s. The size cap applies before anything is decoded.
pub fn parse(token: &str, max_bytes: usize) -> Result<Parts, Rejection> {
    if token.len() > max_bytes {
        return Err(Rejection::TooLarge);
    }
    let mut it = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(Rejection::Malformed);
    };
    if h.is_empty() || p.is_empty() {
        return Err(Rejection::Malformed);
    }
    let header = decode_segment(h)?;
    let alg = match header.get("alg") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err(Rejection::Malformed),
    };
    if alg.eq_ignore_ascii_case("none") {
        return Err(Rejection::AlgNone);
    }
    if s.is_empty() {
        return Err(Rejection::Malformed);
    }
    for embedded in ["jwk", "jku", "x5u", "x5c"] {
        if header.contains_key(embedded) {
            return Err(Rejection::EmbeddedKey);
        }
    }
    if header.contains_key("crit") {
        // No extension is understood here, so any critical parameter must be refused.
        return Err(Rejection::UnknownCrit);
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k))
            if !k.is_empty()
                && k.len() <= MAX_KID_LEN
                && k.bytes().all(|b| (0x21..0x7f).contains(&b)) =>
        {
            Some(k.clone())
        }
        Some(_) => return Err(Rejection::BadKid),
    };
    let claims = decode_segment(p)?;
    Ok(Parts {
        header,
        claims,
        alg,
        kid,
    })
}

/// `typ` (if present) must be one of `accepted`, compared case-insensitively, with or without the
/// `application/` prefix.
pub fn check_typ(header: &Map<String, Value>, accepted: &[String]) -> Result<(), Rejection> {
    match header.get("typ") {
        None => Ok(()),
        Some(Value::String(t)) => {
            let t = t.to_ascii_lowercase();
            let t = t.strip_prefix("application/").unwrap_or(&t);
            let fits = |a: &String| {
                let a = a.to_ascii_lowercase();
                a.strip_prefix("application/").unwrap_or(&a) == t
            };
            if accepted.iter().any(fits) {
                Ok(())
            } else {
                Err(Rejection::BadTyp)
            }
        }
        Some(_) => Err(Rejection::BadTyp),
    }
}

/// A NumericDate claim: a JSON number (never a string). `Ok(None)` when absent.
pub fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, Rejection> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                Ok(Some(v))
            } else if let Some(f) = n.as_f64() {
                if f.is_finite() && f >= 0.0 {
                    Ok(Some(f as u64))
                } else {
                    Err(Rejection::BadClaimType)
                }
            } else {
                Err(Rejection::BadClaimType)
            }
        }
        Some(_) => Err(Rejection::BadClaimType),
    }
}

/// Time checks against `now` (seconds since the epoch): `exp` required and in the future,
/// `nbf` (if any) reached, `iat` (if any) not in the future — each with `leeway`.
/// Returns the expiry.
pub fn check_times(claims: &Map<String, Value>, now: u64, leeway: u64) -> Result<u64, Rejection> {
    let exp = numeric_date(claims, "exp")?.ok_or(Rejection::MissingClaim)?;
    let nbf = numeric_date(claims, "nbf")?;
    let iat = numeric_date(claims, "iat")?;
    if now >= exp.saturating_add(leeway) {
        return Err(Rejection::Expired);
    }
    if let Some(nbf) = nbf {
        if nbf > now.saturating_add(leeway) {
            return Err(Rejection::NotYetValid);
        }
    }
    if let Some(iat) = iat {
        if iat > now.saturating_add(leeway) {
            return Err(Rejection::IssuedInFuture);
        }
    }
    Ok(exp)
}

/// `aud` (string or array of strings) must name one of `audiences`.
pub fn check_audience(claims: &Map<String, Value>, audiences: &[String]) -> Result<(), Rejection> {
    let matches = |a: &str| audiences.iter().any(|x| x == a);
    match claims.get("aud") {
        Some(Value::String(a)) if matches(a) => Ok(()),
        Some(Value::Array(list))
            if list
                .iter()
                .any(|v| v.as_str().map(matches).unwrap_or(false)) =>
        {
            Ok(())
        }
        Some(Value::String(_)) | Some(Value::Array(_)) => Err(Rejection::WrongAudience),
        None => Err(Rejection::MissingClaim),
        Some(_) => Err(Rejection::BadClaimType),
    }
}

/// Read a claim by a dotted path (`realm_access.roles`).
pub fn claim_path<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let first = parts.next()?;
    let mut v = claims.get(first)?;
    for p in parts {
        v = v.as_object()?.get(p)?;
    }
    Some(v)
}

/// A string claim.
pub fn claim_string(claims: &Map<String, Value>, path: &str) -> Option<String> {
    match claim_path(claims, path)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// A list claim: an array of strings, or one space-separated string.
pub fn claim_list(claims: &Map<String, Value>, path: &str) -> Vec<String> {
    match claim_path(claims, path) {
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str())
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn seg(v: Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn tok(h: Value, p: Value) -> String {
        format!("{}.{}.c2ln", seg(h), seg(p))
    }

    fn typ() -> Vec<String> {
        vec!["jwt".into(), "at+jwt".into()]
    }

    #[test]
    fn structural_rejections() {
        let p = json!({"iss": "x"});
        let cases = [
            (tok(json!({"alg": "none"}), p.clone()), Rejection::AlgNone),
            (tok(json!({"alg": "NONE"}), p.clone()), Rejection::AlgNone),
            (
                tok(json!({"alg": "RS256", "jwk": {}}), p.clone()),
                Rejection::EmbeddedKey,
            ),
            (
                tok(json!({"alg": "RS256", "jku": "http://x"}), p.clone()),
                Rejection::EmbeddedKey,
            ),
            (
                tok(json!({"alg": "RS256", "x5u": "http://x"}), p.clone()),
                Rejection::EmbeddedKey,
            ),
            (
                tok(json!({"alg": "RS256", "x5c": ["a"]}), p.clone()),
                Rejection::EmbeddedKey,
            ),
            (
                tok(json!({"alg": "RS256", "crit": ["exp"]}), p.clone()),
                Rejection::UnknownCrit,
            ),
            (
                tok(json!({"alg": "RS256", "kid": ""}), p.clone()),
                Rejection::BadKid,
            ),
            (
                tok(json!({"alg": "RS256", "kid": 7}), p.clone()),
                Rejection::BadKid,
            ),
            (
                tok(json!({"alg": "RS256", "kid": "a b"}), p.clone()),
                Rejection::BadKid,
            ),
            (
                tok(json!({"alg": "RS256", "kid": "k".repeat(300)}), p.clone()),
                Rejection::BadKid,
            ),
            (tok(json!({"typ": "JWT"}), p.clone()), Rejection::Malformed),
            ("a.b".to_string(), Rejection::Malformed),
            ("a.b.c.d".to_string(), Rejection::Malformed),
            ("!!.b.c".to_string(), Rejection::Malformed),
            (
                format!("{}.{}.", seg(json!({"alg": "RS256"})), seg(p.clone())),
                Rejection::Malformed,
            ),
        ];
        for (t, want) in cases {
            assert_eq!(parse(&t, 8192).err(), Some(want), "{t}");
        }
        assert_eq!(
            parse(&"a".repeat(9000), 8192).err(),
            Some(Rejection::TooLarge)
        );
        let ok = parse(
            &tok(
                json!({"alg": "RS256", "typ": "application/at+JWT", "kid": "k1"}),
                p.clone(),
            ),
            8192,
        )
        .unwrap();
        assert_eq!(ok.kid.as_deref(), Some("k1"));
        assert_eq!(check_typ(&ok.header, &typ()), Ok(()));
        let bad = parse(&tok(json!({"alg": "RS256", "typ": "JOSE"}), p), 8192).unwrap();
        assert_eq!(check_typ(&bad.header, &typ()), Err(Rejection::BadTyp));
        assert_eq!(ok.alg, "RS256");
    }

    #[test]
    fn time_checks() {
        let now = 1_000_000;
        let c = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(
            check_times(&c(json!({"exp": now + 10})), now, 0),
            Ok(now + 10)
        );
        assert_eq!(
            check_times(&c(json!({"exp": now})), now, 0),
            Err(Rejection::Expired)
        );
        assert_eq!(
            check_times(&c(json!({"exp": now - 5})), now, 10),
            Ok(now - 5)
        );
        assert_eq!(
            check_times(&c(json!({})), now, 0),
            Err(Rejection::MissingClaim)
        );
        assert_eq!(
            check_times(&c(json!({"exp": "9999999999"})), now, 0),
            Err(Rejection::BadClaimType)
        );
        assert_eq!(
            check_times(&c(json!({"exp": -1})), now, 0),
            Err(Rejection::BadClaimType)
        );
        assert_eq!(
            check_times(&c(json!({"exp": now + 100, "nbf": now + 50})), now, 10),
            Err(Rejection::NotYetValid)
        );
        assert_eq!(
            check_times(&c(json!({"exp": now + 100, "iat": now + 50})), now, 10),
            Err(Rejection::IssuedInFuture)
        );
        assert_eq!(
            check_times(&c(json!({"exp": now + 100, "iat": now + 5})), now, 10),
            Ok(now + 100)
        );
    }

    #[test]
    fn audience_and_claims() {
        let c = json!({"aud": ["a", "b"], "realm_access": {"roles": ["x", "y"]}, "scope": "p/a.rs u/b.r"});
        let c = c.as_object().unwrap();
        assert!(check_audience(c, &["b".into()]).is_ok());
        assert_eq!(
            check_audience(c, &["z".into()]),
            Err(Rejection::WrongAudience)
        );
        assert_eq!(claim_list(c, "realm_access.roles"), vec!["x", "y"]);
        assert_eq!(claim_list(c, "scope"), vec!["p/a.rs", "u/b.r"]);
        assert_eq!(claim_string(c, "missing.path"), None);
    }
}
