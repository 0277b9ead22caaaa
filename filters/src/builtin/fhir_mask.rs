//! `fhir_mask`: PHI masking for less-privileged callers (the `caregate-mask` engine).
//!
//! ```yaml
//! - kind: fhir_mask
//!   config:
//!     profiles:                      # first profile whose roles the caller has applies
//!       - roles: [billing, front_desk]
//!         resources:
//!           Patient:
//!             - { path: telecom, action: remove }
//!             - { path: name, action: redact }
//!             - { path: address, action: { keep_only: [state, postalCode] } }
//!             - { path: birthDate, action: year }
//!             - { path: identifier.value, action: { last_chars: 4 } }
//!     default: null                  # rules for callers no profile matches (none: unmasked)
//!                                    # a request with NO verified caller gets the strictest
//!                                    # rules of all profiles and the default together
//!     max_body_bytes: 33554432
//! ```
//! Masked elements are removed or reduced; every other byte stays exactly as the backend sent
//! it; each masked resource gets the `REDACTED` security label. The body is buffered up to
//! `max_body_bytes` (the gateway asks the backend for an uncompressed body); a body that cannot
//! be parsed, is compressed anyway, or is over the cap is never passed on: the exchange is
//! aborted. HEAD, 204 and 304 pass untouched.

use crate::ctx::writers;
use crate::identity::Principal;
use crate::registry::{parse_config, BuildContext, BuildError};
use crate::{
    Decision, Filter, FilterError, LocalReply, Mode, RequestCtx, RequestHeader, ResponseHeader,
    Result,
};
use async_trait::async_trait;
use bytes::Bytes;
use caregate_mask::{MaskAction, MaskRule, MaskRules, Masker};
use http::{header, StatusCode};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskProfileConfig {
    pub roles: Vec<String>,
    /// Rules per resource type (read through JSON, so actions take the map form
    /// `{ keep_only: [...] }` as well as plain names).
    pub resources: serde_yaml::Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirMaskConfig {
    #[serde(default)]
    pub profiles: Vec<MaskProfileConfig>,
    #[serde(default)]
    pub default: Option<serde_yaml::Value>,
    #[serde(default = "d_max")]
    pub max_body_bytes: usize,
    #[serde(default)]
    pub mode: Mode,
}

fn d_max() -> usize {
    32 * 1024 * 1024
}

pub struct FhirMaskFilter {
    profiles: Vec<(Vec<String>, Arc<Masker>)>,
    default: Option<Arc<Masker>>,
    /// Every profile's and the default's rules together, each element treated by the strictest
    /// rule any of them has: for a request with no verified caller (fail closed).
    strictest: Arc<Masker>,
    max: usize,
    mode: Mode,
}

/// The masker chosen for this response and the body so far (written only by `fhir_mask`).
pub struct MaskBuffer {
    pub masker: Option<Arc<Masker>>,
    pub body: Vec<u8>,
    /// The upstream's content coding (gzip or deflate), decoded before masking.
    pub encoding: Option<String>,
}

/// Decode a gzip or deflate body, bounded by `max` bytes.
fn decode(encoding: &str, body: &[u8], max: usize) -> std::result::Result<Vec<u8>, FilterError> {
    use std::io::Read;
    let mut out = Vec::new();
    let reader: Box<dyn Read> = match encoding {
        "gzip" | "x-gzip" => Box::new(flate2::read::GzDecoder::new(body)),
        "deflate" => Box::new(flate2::read::ZlibDecoder::new(body)),
        _ => return Err(abort("an unsupported content coding")),
    };
    reader
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| abort("the compressed body cannot be decoded"))?;
    if out.len() > max {
        return Err(abort("the decoded body is over max_body_bytes"));
    }
    Ok(out)
}

pub fn build(
    config: serde_yaml::Value,
    _cx: &BuildContext,
) -> std::result::Result<Arc<dyn Filter>, BuildError> {
    let c: FhirMaskConfig = parse_config(config)?;
    let mut profiles = Vec::new();
    let mut all_rules = Vec::new();
    for (i, p) in c.profiles.into_iter().enumerate() {
        if p.roles.is_empty() {
            return Err(BuildError::new(
                format!("config.profiles[{i}].roles"),
                "list at least one role",
            ));
        }
        let place = format!("config.profiles[{i}].resources");
        let r = mask_rules(&place, p.resources)?;
        let m = Masker::new(r.clone()).map_err(|e| BuildError::new(&place, e))?;
        all_rules.push(r);
        profiles.push((p.roles, Arc::new(m)));
    }
    let default = match c.default {
        Some(v) => {
            let r = mask_rules("config.default", v)?;
            let m = Masker::new(r.clone()).map_err(|e| BuildError::new("config.default", e))?;
            all_rules.push(r);
            Some(Arc::new(m))
        }
        None => None,
    };
    if profiles.is_empty() && default.is_none() {
        return Err(BuildError::new(
            "config",
            "give at least one profile or a default",
        ));
    }
    let strictest = Masker::new(strictest_rules(&all_rules))
        .map_err(|e| BuildError::new("config (the strictest rules of all profiles)", e))?;
    Ok(Arc::new(FhirMaskFilter {
        profiles,
        default,
        strictest: Arc::new(strictest),
        max: c.max_body_bytes.max(1),
        mode: c.mode,
    }))
}

fn mask_rules(path: &str, v: serde_yaml::Value) -> std::result::Result<MaskRules, BuildError> {
    let json = serde_json::to_value(v).map_err(|e| BuildError::new(path, e.to_string()))?;
    let resources =
        serde_json::from_value(json).map_err(|e| BuildError::new(path, e.to_string()))?;
    Ok(MaskRules { resources })
}

/// The stricter of two actions on the same element: the same action stays (two `keep_only`
/// lists keep only what both keep, two `last_chars` the fewer); `redact` beats the string
/// reductions; any other mix, and anything with `remove`, removes.
fn stricter(a: &MaskAction, b: &MaskAction) -> MaskAction {
    use MaskAction::*;
    match (a, b) {
        _ if a == b => a.clone(),
        (KeepOnly(x), KeepOnly(y)) => {
            let both: Vec<String> = x.iter().filter(|k| y.contains(k)).cloned().collect();
            if both.is_empty() {
                Remove
            } else {
                KeepOnly(both)
            }
        }
        (LastChars(n), LastChars(m)) => LastChars((*n).min(*m)),
        (Redact, Year | LastChars(_)) | (Year | LastChars(_), Redact) => Redact,
        _ => Remove,
    }
}

/// The rules one profile applies to resource type `rtype` (`"*"` for types it does not name):
/// its own list for the type, plus its `"*"` rules on paths the own list does not name.
fn effective_rules(set: &MaskRules, rtype: &str) -> Vec<MaskRule> {
    let own = set.resources.get(rtype).cloned().unwrap_or_default();
    let mut out = own.clone();
    if rtype != "*" {
        for w in set.resources.get("*").into_iter().flatten() {
            if !own.iter().any(|o| o.path == w.path) {
                out.push(w.clone());
            }
        }
    }
    out
}

/// One rule set that treats every element at least as strictly as each of `sets` does: the
/// rules a request without a verified caller gets, whatever profile it would have matched.
fn strictest_rules(sets: &[MaskRules]) -> MaskRules {
    let types: std::collections::BTreeSet<&String> =
        sets.iter().flat_map(|s| s.resources.keys()).collect();
    let mut resources = std::collections::BTreeMap::new();
    for rtype in types {
        let mut merged: Vec<MaskRule> = Vec::new();
        for set in sets {
            for rule in effective_rules(set, rtype) {
                match merged.iter_mut().find(|m| m.path == rule.path) {
                    Some(m) => m.action = stricter(&m.action, &rule.action),
                    None => merged.push(rule),
                }
            }
        }
        // A path inside a removed element has nothing left to mask (and may not be listed).
        let removed: Vec<String> = merged
            .iter()
            .filter(|m| m.action == MaskAction::Remove)
            .map(|m| format!("{}.", m.path))
            .collect();
        merged.retain(|m| !removed.iter().any(|r| m.path.starts_with(r.as_str())));
        if !merged.is_empty() {
            resources.insert(rtype.clone(), merged);
        }
    }
    MaskRules { resources }
}

fn abort(why: &str) -> FilterError {
    FilterError {
        filter: "fhir_mask",
        message: format!("{why}; exchange aborted (nothing unmasked is released)"),
    }
}

fn refused(ctx: &mut RequestCtx) {
    ctx.refuse_response(LocalReply::error(
        StatusCode::BAD_GATEWAY,
        "upstream_error",
        "the upstream response cannot be masked",
    ));
}

impl FhirMaskFilter {
    fn on_header(&self, resp: &mut ResponseHeader, ctx: &mut RequestCtx) -> Result<()> {
        let Some(masker) = self.masker_for(ctx) else {
            return Ok(());
        };
        let status = resp.status.as_u16();
        if ctx.method == "HEAD" || status == 204 || status == 304 || !(200..300).contains(&status) {
            return Ok(());
        }
        let json = crate::builtin::body::is_json(resp);
        if !json {
            return Err(abort("a response that cannot be masked (not JSON)"));
        }
        // A backend that compresses although asked not to is decoded, masked, and sent plain.
        let encoding = resp
            .headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| v != "identity");
        if let Some(e) = &encoding {
            if !matches!(e.as_str(), "gzip" | "x-gzip" | "deflate") {
                return Err(abort(
                    "a response in a content coding that cannot be decoded",
                ));
            }
            resp.remove_header(&header::CONTENT_ENCODING);
        }
        crate::builtin::body::will_rewrite(resp);
        ctx.facts
            .insert(
                writers::FhirMask,
                MaskBuffer {
                    masker: Some(masker),
                    body: Vec::new(),
                    encoding,
                },
            )
            .map_err(|e| FilterError {
                filter: "fhir_mask",
                message: e.to_string(),
            })?;
        Ok(())
    }

    fn on_body(
        &self,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(buf) = ctx.facts.get_mut::<MaskBuffer>(writers::FhirMask) else {
            return Ok(());
        };
        let Some(masker) = buf.masker.clone() else {
            return Ok(());
        };
        if !crate::builtin::body::hold(&mut buf.body, chunk, self.max) {
            buf.masker = None;
            return Err(abort("the body is over max_body_bytes"));
        }
        if end_of_stream {
            let mut body = std::mem::take(&mut buf.body);
            buf.masker = None;
            if let Some(e) = buf.encoding.take() {
                body = decode(&e, &body, self.max)?;
            }
            let out = masker
                .mask(&body)
                .map_err(|e| abort(&format!("the body cannot be masked ({e})")))?;
            *chunk = Some(Bytes::from(out.body));
        }
        Ok(())
    }

    fn masker_for(&self, ctx: &RequestCtx) -> Option<Arc<Masker>> {
        // Emergency access where the route lets it override masking: the clinician sees the
        // record whole (and the audit trail says so).
        if let Some(bg) = ctx.facts.get::<crate::identity::BreakGlass>() {
            if bg.allows(crate::identity::BreakGlassOverride::Mask) {
                bg.overrode(crate::identity::BreakGlassOverride::Mask);
                return None;
            }
        }
        let Some(principal) = ctx.facts.get::<Principal>() else {
            // No verified caller (the chain lets anonymous callers through, or runs this before
            // jwt_auth): the strictest rules, never none.
            return Some(self.strictest.clone());
        };
        let roles = principal.roles.as_slice();
        self.profiles
            .iter()
            .find(|(want, _)| want.iter().any(|w| roles.contains(w)))
            .map(|(_, m)| m.clone())
            .or_else(|| self.default.clone())
    }
}

#[async_trait]
impl Filter for FhirMaskFilter {
    fn kind(&self) -> &'static str {
        "fhir_mask"
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    /// Reads the verified caller (its roles; without one, the strictest rules apply) and the
    /// emergency-access decision (it honours a `mask` override); once per chain (its
    /// per-response state has one writer).
    fn declaration(&self) -> crate::Declaration {
        crate::Declaration::new()
            .reads(&[crate::Capability::Principal, crate::Capability::BreakGlass])
            .once()
    }

    async fn upstream_request_filter(
        &self,
        req: &mut RequestHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        req.remove_header(&header::ACCEPT_ENCODING);
        Ok(())
    }

    async fn request_filter(
        &self,
        _req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        if ctx.method != "HEAD" && self.masker_for(ctx).is_some() {
            // The body is masked whole; holding the header too means a body that cannot be
            // masked becomes a clean 502 instead of an aborted 200.
            ctx.require_whole_exchange();
        }
        Ok(Decision::Continue)
    }

    fn response_filter(&self, resp: &mut ResponseHeader, ctx: &mut RequestCtx) -> Result<()> {
        self.on_header(resp, ctx).inspect_err(|_| refused(ctx))
    }

    fn response_body_filter(
        &self,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.on_body(chunk, end_of_stream, ctx)
            .inspect_err(|_| refused(ctx))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::identity::AuthMethod;

    fn filter() -> Arc<dyn Filter> {
        build(
            serde_yaml::from_str(
                "profiles:\n  - roles: [billing]\n    resources:\n      Patient:\n        - { path: telecom, action: remove }\n        - { path: birthDate, action: year }\n        - { path: address, action: { keep_only: [state] } }\n",
            )
            .unwrap(),
            &BuildContext::default(),
        )
        .unwrap()
    }

    fn ctx(role: &str) -> RequestCtx {
        let mut c = RequestCtx::for_test("GET", "/fhir/Patient/1");
        c.facts
            .insert(
                writers::JwtAuth,
                Principal {
                    subject: "s".into(),
                    issuer: None,
                    client_id: None,
                    roles: vec![role.into()],
                    scopes: vec![],
                    tenant: None,
                    patient: None,
                    fhir_user: None,
                    method: AuthMethod::Token,
                    system: None,
                    expires_at: None,
                },
            )
            .unwrap();
        c
    }

    fn run(role: &str, body: &[u8], split: usize) -> std::result::Result<Vec<u8>, FilterError> {
        let f = filter();
        let mut c = ctx(role);
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("content-type", "application/fhir+json")
            .unwrap();
        f.response_filter(&mut resp, &mut c)?;
        let mut out = Vec::new();
        let mut a = Some(Bytes::copy_from_slice(&body[..split]));
        f.response_body_filter(&mut a, false, &mut c)?;
        if let Some(x) = a {
            out.extend_from_slice(&x);
        }
        let mut b = Some(Bytes::copy_from_slice(&body[split..]));
        f.response_body_filter(&mut b, true, &mut c)?;
        if let Some(x) = b {
            out.extend_from_slice(&x);
        }
        Ok(out)
    }

    #[test]
    fn masks_for_the_profile_only_and_identically_at_every_split() {
        let body = br#"{"resourceType":"Patient","id":"1","telecom":[{"value":"555"}],"birthDate":"1961-04-12","x":1.50}"#;
        let first = run("billing", body, 0).unwrap();
        let text = String::from_utf8(first.clone()).unwrap();
        assert!(
            !text.contains("555")
                && text.contains("\"1961\"")
                && text.contains("REDACTED")
                && text.contains("1.50")
        );
        for cut in 0..body.len() {
            assert_eq!(run("billing", body, cut).unwrap(), first, "split at {cut}");
        }
        assert_eq!(
            run("clinician", body, 5).unwrap(),
            body.to_vec(),
            "no profile: untouched"
        );
        assert!(
            run("billing", b"{not json", 3).is_err(),
            "never passed unmasked"
        );
    }

    #[test]
    fn gzip_bodies_are_decoded_masked_and_sent_plain() {
        use std::io::Write;
        let body = br#"{"resourceType":"Patient","id":"1","telecom":[{"value":"555"}]}"#;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(body).unwrap();
        let gz = gz.finish().unwrap();
        let f = filter();
        let mut c = ctx("billing");
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("content-type", "application/fhir+json")
            .unwrap();
        resp.insert_header("content-encoding", "gzip").unwrap();
        f.response_filter(&mut resp, &mut c).unwrap();
        assert!(resp.headers.get("content-encoding").is_none());
        let mut chunk = Some(Bytes::from(gz));
        f.response_body_filter(&mut chunk, true, &mut c).unwrap();
        let out = String::from_utf8(chunk.unwrap().to_vec()).unwrap();
        assert!(!out.contains("555") && out.contains("REDACTED"), "{out}");
    }

    /// The same body split into chunks masks identically: at every offset for every US Core
    /// example (the 255 KB CapabilityStatement, a conformance resource, gets pseudo-random
    /// offsets), at pseudo-random offsets for the large Synthea bundles.
    #[test]
    fn chunking_never_changes_the_output_over_the_corpora() {
        let data = std::env::var("CAREGATE_FHIR_DATA")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/fhir")
            });
        assert!(
            data.join("us-core-examples").is_dir(),
            "FHIR test data not found at {}",
            data.display()
        );
        let f = build(
            serde_yaml::from_str(
                "profiles:\n  - roles: [billing]\n    resources:\n      Patient:\n        - { path: telecom, action: remove }\n        - { path: name, action: redact }\n        - { path: birthDate, action: year }\n",
            )
            .unwrap(),
            &BuildContext::default(),
        )
        .unwrap();
        let once = |body: &[u8], cuts: &[usize]| -> Vec<u8> {
            let mut c = ctx("billing");
            let mut resp = ResponseHeader::build(200, None).unwrap();
            resp.insert_header("content-type", "application/fhir+json")
                .unwrap();
            f.response_filter(&mut resp, &mut c).unwrap();
            let mut out = Vec::new();
            let mut start = 0;
            let ends: Vec<usize> = cuts
                .iter()
                .copied()
                .chain(std::iter::once(body.len()))
                .collect();
            for (i, &cut) in ends.iter().enumerate() {
                let mut ch = Some(Bytes::copy_from_slice(&body[start..cut]));
                f.response_body_filter(&mut ch, i + 1 == ends.len(), &mut c)
                    .unwrap();
                if let Some(x) = ch {
                    out.extend_from_slice(&x);
                }
                start = cut;
            }
            out
        };
        let mut files = 0;
        for dir in ["us-core-examples", "synthea-r4/bundles"] {
            for e in std::fs::read_dir(data.join(dir)).unwrap() {
                let p = e.unwrap().path();
                if p.extension().map(|x| x != "json").unwrap_or(true) {
                    continue;
                }
                let body = std::fs::read(&p).unwrap();
                let whole = once(&body, &[]);
                let offsets: Vec<usize> = if dir == "us-core-examples" && body.len() <= 32 * 1024 {
                    (1..body.len()).collect()
                } else {
                    let mut x: u64 = body.len() as u64 ^ 0x9e37_79b9_7f4a_7c15;
                    (0..25)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            1 + (x as usize) % (body.len() - 1)
                        })
                        .collect()
                };
                for o in offsets {
                    assert_eq!(once(&body, &[o]), whole, "{} split at {o}", p.display());
                }
                let three = [body.len() / 3, body.len() / 2, 2 * body.len() / 3];
                assert_eq!(once(&body, &three), whole, "{}", p.display());
                files += 1;
            }
        }
        assert!(files > 200, "{files}");
    }

    fn mask_as(f: &Arc<dyn Filter>, c: &mut RequestCtx, body: &[u8]) -> String {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("content-type", "application/fhir+json")
            .unwrap();
        f.response_filter(&mut resp, c).unwrap();
        let mut chunk = Some(Bytes::copy_from_slice(body));
        f.response_body_filter(&mut chunk, true, c).unwrap();
        String::from_utf8(chunk.unwrap().to_vec()).unwrap()
    }

    /// With no verified caller (the filter ran before jwt_auth, or the route let an anonymous
    /// caller through) the response gets every profile's rules at their strictest, even where
    /// no profile and no default would mask for a caller without the roles.
    #[tokio::test]
    async fn no_verified_caller_gets_the_strictest_rules_of_all_profiles() {
        let f = build(
            serde_yaml::from_str(
                "profiles:\n  - roles: [billing]\n    resources:\n      Patient:\n        - { path: telecom, action: remove }\n        - { path: birthDate, action: year }\n        - { path: address, action: { keep_only: [state, city] } }\n  - roles: [front_desk]\n    resources:\n      Patient:\n        - { path: birthDate, action: redact }\n        - { path: address, action: { keep_only: [state, postalCode] } }\n        - { path: identifier.value, action: { last_chars: 4 } }\n      \"*\":\n        - { path: note, action: remove }\n",
            )
            .unwrap(),
            &BuildContext::default(),
        )
        .unwrap();
        let body = br#"{"resourceType":"Patient","id":"1","telecom":[{"value":"555-0100"}],"birthDate":"1961-04-12","address":[{"city":"Boston","state":"MA","postalCode":"02110"}],"identifier":[{"value":"123456789"}],"note":[{"text":"n"}]}"#;
        let mut anonymous = RequestCtx::for_test("GET", "/fhir/Patient/1");
        // The request is held whole, so a body that cannot be masked is a clean error.
        let mut req = RequestHeader::build("GET", b"/fhir/Patient/1", None).unwrap();
        assert!(matches!(
            f.request_filter(&mut req, &mut anonymous).await,
            Ok(Decision::Continue)
        ));
        assert!(anonymous.whole_exchange());
        let out = mask_as(&f, &mut anonymous, body);
        assert!(!out.contains("555"), "telecom removed: {out}");
        assert!(
            out.contains(r#""birthDate":"REDACTED""#),
            "redact beats year: {out}"
        );
        assert!(
            out.contains(r#""state":"MA""#) && !out.contains("Boston") && !out.contains("02110"),
            "only what both keep_only lists keep: {out}"
        );
        assert!(out.contains("6789") && !out.contains("12345"), "{out}");
        assert!(!out.contains(r#""note""#), "the wildcard rule too: {out}");
        // A verified caller with no matching role and no default: untouched, as before.
        let mut clinician = ctx("clinician");
        assert_eq!(mask_as(&f, &mut clinician, body).as_bytes(), body);
        // A billing caller gets billing's rules only.
        let mut billing = ctx("billing");
        let out = mask_as(&f, &mut billing, body);
        assert!(
            out.contains(r#""birthDate":"1961""#) && out.contains("Boston"),
            "{out}"
        );
    }

    #[test]
    fn strictest_rules_merge_actions_and_drop_paths_inside_removed_ones() {
        let set = |yaml: &str| mask_rules("t", serde_yaml::from_str(yaml).unwrap()).unwrap();
        let merged = strictest_rules(&[
            set("Patient: [ { path: name, action: remove }, { path: gender, action: year } ]"),
            set("Patient: [ { path: name.given, action: redact }, { path: gender, action: { last_chars: 2 } } ]\nObservation: [ { path: note, action: redact } ]"),
        ]);
        let patient = &merged.resources["Patient"];
        assert_eq!(patient.len(), 2, "{patient:?}");
        assert!(patient
            .iter()
            .any(|r| r.path == "name" && r.action == MaskAction::Remove));
        assert!(patient
            .iter()
            .any(|r| r.path == "gender" && r.action == MaskAction::Remove));
        assert_eq!(merged.resources["Observation"].len(), 1);
        assert!(Masker::new(merged).is_ok());
    }
}
