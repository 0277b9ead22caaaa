//! `break_glass`: emergency access (HIPAA 45 CFR 164.312(a)(2)(ii)). An entitled clinician may
//! claim it for a request, with an HL7 PurposeOfUse code and a free-text reason; the filters
//! that honour it (they read the `break_glass` capability: `tenant`, `fhir_mask`) then let the
//! request through what the route allows it to override, and every record of the request in
//! the audit trail carries the claim.
//!
//! ```yaml
//! - kind: jwt_auth
//! - kind: break_glass
//!   config:
//!     roles: [clinician, er_physician]   # who may claim it (required)
//!     purposes: [ETREAT]                 # accepted PurposeOfUse codes (default [ETREAT])
//!     header: x-break-glass              # `X-Break-Glass: ETREAT; unconscious patient in the ER`
//!     overrides: [tenant, mask]          # what it may override on this route (required)
//!     grant_seconds: 3600                # a claim for a patient covers that caller's later
//!                                        # requests for the patient this long (0: no grant)
//! - kind: tenant
//! ```
//!
//! A claim from a caller without one of the roles, or with a patient context (a patient app),
//! or with a purpose the route does not accept, or a malformed header, is refused 403
//! `break_glass_refused`: nothing is overridden, and the refusal is audited. An entitled caller
//! who did not claim it gets the [`BreakGlassAvailable`] fact, so that a refusal of an
//! honouring filter can say how to claim it. The purpose comes from the header only (token
//! claims are not read in this version).

use crate::ctx::writers;
use crate::identity::{
    BreakGlass, BreakGlassAvailable, BreakGlassOverride, BreakGlassRefused, Principal,
};
use crate::registry::{parse_config, BuildContext, BuildError};
use crate::{Decision, Filter, FilterError, LocalReply, Mode, RequestCtx, RequestHeader, Result};
use async_trait::async_trait;
use http::{HeaderName, StatusCode};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakGlassConfig {
    #[serde(default)]
    mode: Mode,
    roles: Vec<String>,
    #[serde(default = "default_purposes")]
    purposes: Vec<String>,
    #[serde(default = "default_header")]
    header: String,
    overrides: Vec<BreakGlassOverride>,
    #[serde(default = "default_grant")]
    grant_seconds: u64,
}

fn default_purposes() -> Vec<String> {
    vec!["ETREAT".into()]
}
fn default_header() -> String {
    "x-break-glass".into()
}
fn default_grant() -> u64 {
    3600
}

/// The longest reason accepted, in characters.
const MAX_REASON: usize = 500;
/// Grants kept at most (the oldest go first); bounds memory whatever the traffic.
const MAX_GRANTS: usize = 100_000;

struct Grant {
    until: Instant,
    purpose: String,
    reason: String,
}

pub struct BreakGlassFilter {
    mode: Mode,
    roles: Vec<String>,
    purposes: Vec<String>,
    header: HeaderName,
    overrides: Vec<BreakGlassOverride>,
    grant: Duration,
    /// (subject, patient) -> the grant of an earlier claim.
    grants: Mutex<HashMap<(String, String), Grant>>,
}

pub fn build(
    config: serde_yaml::Value,
    _cx: &BuildContext,
) -> std::result::Result<Arc<dyn Filter>, BuildError> {
    let c: BreakGlassConfig = parse_config(config)?;
    if c.roles.iter().all(|r| r.trim().is_empty()) {
        return Err(BuildError::new(
            "config.roles",
            "name at least one role that may claim emergency access",
        ));
    }
    if c.purposes.is_empty() {
        return Err(BuildError::new(
            "config.purposes",
            "name at least one accepted PurposeOfUse code (e.g. ETREAT)",
        ));
    }
    for (i, p) in c.purposes.iter().enumerate() {
        if p.is_empty()
            || p.len() > 32
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(BuildError::new(
                format!("config.purposes[{i}]"),
                "a PurposeOfUse code: letters, digits, `-` or `_` (e.g. ETREAT)",
            ));
        }
    }
    if c.overrides.is_empty() {
        return Err(BuildError::new(
            "config.overrides",
            "name what emergency access may override on this route (tenant, mask, consent)",
        ));
    }
    let header = HeaderName::from_bytes(c.header.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| BuildError::new("config.header", "not a valid header name"))?;
    Ok(Arc::new(BreakGlassFilter {
        mode: c.mode,
        roles: c.roles,
        purposes: c.purposes,
        header,
        overrides: c.overrides,
        grant: Duration::from_secs(c.grant_seconds),
        grants: Mutex::new(HashMap::new()),
    }))
}

/// A refused claim: 403 `break_glass_refused`, and the [`BreakGlassRefused`] fact naming why
/// (for the gateway's `caregate_break_glass_refused_total{reason}`).
fn refused(ctx: &mut RequestCtx, why: &'static str, detail: &'static str) -> Decision {
    let _ = ctx
        .facts
        .insert(writers::BreakGlass, BreakGlassRefused { reason: why });
    Decision::Respond(LocalReply::error(
        StatusCode::FORBIDDEN,
        "break_glass_refused",
        detail,
    ))
}

/// `PURPOSE; reason`, the reason 1–500 printable characters.
fn parse_claim(value: &str) -> Option<(String, String)> {
    let (purpose, reason) = value.split_once(';')?;
    let purpose = purpose.trim().to_ascii_uppercase();
    let reason = reason.trim();
    if purpose.is_empty()
        || reason.is_empty()
        || reason.chars().count() > MAX_REASON
        || reason.chars().any(char::is_control)
    {
        return None;
    }
    Some((purpose, reason.to_string()))
}

impl BreakGlassFilter {
    fn entitled(&self, p: &Principal) -> bool {
        p.patient.is_none() && self.roles.iter().any(|r| p.has_role(r))
    }

    /// The patients the request names (its FHIR classification), for grants.
    fn patients(ctx: &RequestCtx) -> Vec<String> {
        ctx.facts
            .get::<caregate_fhir::FhirRequest>()
            .map(|c| caregate_fhir::named_patients(c).0)
            .unwrap_or_default()
    }

    fn put(&self, ctx: &mut RequestCtx, fact: BreakGlass) -> Result<()> {
        ctx.facts
            .insert(writers::BreakGlass, fact)
            .map_err(|e| FilterError {
                filter: "break_glass",
                message: e.to_string(),
            })
    }

    /// The request's decision at `now`.
    fn decide(&self, req: &RequestHeader, ctx: &mut RequestCtx, now: Instant) -> Result<Decision> {
        let claims: Vec<&http::HeaderValue> = req.headers.get_all(&self.header).iter().collect();
        let principal = ctx.facts.get::<Principal>().cloned();
        if claims.is_empty() {
            let Some(p) = principal.filter(|p| self.entitled(p)) else {
                return Ok(Decision::Continue);
            };
            // An earlier claim's grant for every patient this request names.
            let patients = Self::patients(ctx);
            if !patients.is_empty() && !self.grant.is_zero() {
                let grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
                let covering: Vec<&Grant> = patients
                    .iter()
                    .filter_map(|id| grants.get(&(p.subject.clone(), id.clone())))
                    .filter(|g| g.until > now)
                    .collect();
                if covering.len() == patients.len() {
                    if let Some(g) = covering.first() {
                        let fact = BreakGlass::new(
                            g.purpose.clone(),
                            g.reason.clone(),
                            self.overrides.clone(),
                            true,
                        );
                        drop(grants);
                        self.put(ctx, fact)?;
                        return Ok(Decision::Continue);
                    }
                }
            }
            let _ = ctx.facts.insert(
                writers::BreakGlass,
                BreakGlassAvailable {
                    header: self.header.as_str().to_string(),
                    purposes: self.purposes.clone(),
                },
            );
            return Ok(Decision::Continue);
        }
        let Some(p) = principal else {
            return Ok(refused(
                ctx,
                "not_entitled",
                "emergency access needs an authenticated caller",
            ));
        };
        if p.patient.is_some() {
            return Ok(refused(
                ctx,
                "patient_context",
                "emergency access cannot be claimed with a patient context",
            ));
        }
        if !self.roles.iter().any(|r| p.has_role(r)) {
            return Ok(refused(
                ctx,
                "not_entitled",
                "the caller has no role that may claim emergency access on this route",
            ));
        }
        let claim = match claims.as_slice() {
            [one] => one.to_str().ok().and_then(parse_claim),
            _ => None,
        };
        let Some((purpose, reason)) = claim else {
            return Ok(refused(
                ctx,
                "bad_header",
                "write the claim as `PURPOSE; reason` (one header, a reason of 1 to 500 characters)",
            ));
        };
        if !self.purposes.contains(&purpose) {
            return Ok(refused(
                ctx,
                "purpose_not_accepted",
                "this purpose of use is not accepted for emergency access on this route",
            ));
        }
        if !self.grant.is_zero() {
            let patients = Self::patients(ctx);
            let mut grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
            if grants.len() + patients.len() > MAX_GRANTS {
                grants.retain(|_, g| g.until > now);
                while grants.len() + patients.len() > MAX_GRANTS {
                    let Some(oldest) = grants
                        .iter()
                        .min_by_key(|(_, g)| g.until)
                        .map(|(k, _)| k.clone())
                    else {
                        break;
                    };
                    grants.remove(&oldest);
                }
            }
            for id in patients {
                grants.insert(
                    (p.subject.clone(), id),
                    Grant {
                        until: now + self.grant,
                        purpose: purpose.clone(),
                        reason: reason.clone(),
                    },
                );
            }
        }
        self.put(
            ctx,
            BreakGlass::new(purpose, reason, self.overrides.clone(), false),
        )?;
        Ok(Decision::Continue)
    }
}

#[async_trait]
impl Filter for BreakGlassFilter {
    fn kind(&self) -> &'static str {
        "break_glass"
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    /// Needs the verified caller; reads the classification (the patients a grant covers);
    /// provides the emergency-access decision, once per chain.
    fn declaration(&self) -> crate::Declaration {
        use crate::Capability::{BreakGlass, Classification, Principal};
        crate::Declaration::new()
            .needs(&[Principal])
            .reads(&[Classification])
            .provides(&[BreakGlass])
            .once()
    }

    async fn request_filter(
        &self,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        self.decide(req, ctx, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::identity::AuthMethod;

    fn filter(cfg: &str) -> Arc<dyn Filter> {
        build(serde_yaml::from_str(cfg).unwrap(), &BuildContext::default()).unwrap()
    }

    fn concrete(cfg: &str) -> BreakGlassFilter {
        let c: BreakGlassConfig = parse_config(serde_yaml::from_str(cfg).unwrap()).unwrap();
        BreakGlassFilter {
            mode: c.mode,
            roles: c.roles,
            purposes: c.purposes,
            header: HeaderName::from_bytes(c.header.as_bytes()).unwrap(),
            overrides: c.overrides,
            grant: Duration::from_secs(c.grant_seconds),
            grants: Mutex::new(HashMap::new()),
        }
    }

    const CFG: &str =
        "{roles: [er_physician], purposes: [ETREAT], overrides: [tenant], grant_seconds: 60}";

    fn principal(roles: &[&str], patient: Option<&str>) -> Principal {
        Principal {
            subject: "dr-x".into(),
            issuer: None,
            client_id: None,
            roles: roles.iter().map(|r| r.to_string()).collect(),
            scopes: vec![],
            tenant: Some("north".into()),
            patient: patient.map(str::to_string),
            fhir_user: None,
            method: AuthMethod::Token,
            system: None,
            expires_at: None,
        }
    }

    fn ctx_for(p: Option<Principal>, path: &str) -> RequestCtx {
        let mut ctx = RequestCtx::for_test("GET", path);
        if let Some(p) = p {
            ctx.facts.insert(writers::JwtAuth, p).unwrap();
        }
        if let Some(rest) = path.strip_prefix("/fhir") {
            let class = caregate_fhir::classify("GET", rest, "", None, None).unwrap();
            ctx.facts.insert(writers::Gateway, class).unwrap();
        }
        ctx
    }

    fn req(claim: Option<&str>) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/fhir/Patient/p1", None).unwrap();
        if let Some(c) = claim {
            r.insert_header("x-break-glass", c).unwrap();
        }
        r
    }

    fn reason_of(d: &Decision) -> Option<&'static str> {
        match d {
            Decision::Respond(r) => Some(r.reason),
            Decision::Continue => None,
        }
    }

    #[test]
    fn an_entitled_claim_is_in_force_and_grants_the_patient() {
        let f = concrete(CFG);
        let now = Instant::now();
        let mut ctx = ctx_for(Some(principal(&["er_physician"], None)), "/fhir/Patient/p1");
        let d = f
            .decide(
                &req(Some("etreat; unconscious patient in the ER")),
                &mut ctx,
                now,
            )
            .unwrap();
        assert_eq!(reason_of(&d), None);
        let bg = ctx.facts.get::<BreakGlass>().unwrap();
        assert_eq!((bg.purpose.as_str(), bg.from_grant), ("ETREAT", false));
        assert_eq!(bg.reason, "unconscious patient in the ER");
        assert!(bg.allows(BreakGlassOverride::Tenant) && !bg.allows(BreakGlassOverride::Mask));

        // The grant: the same caller, the same patient, without the header, within 60 s.
        let mut later = ctx_for(Some(principal(&["er_physician"], None)), "/fhir/Patient/p1");
        let _ = f
            .decide(&req(None), &mut later, now + Duration::from_secs(30))
            .unwrap();
        assert!(later.facts.get::<BreakGlass>().unwrap().from_grant);
        // Another patient, or after the grant: only "available".
        let mut other = ctx_for(Some(principal(&["er_physician"], None)), "/fhir/Patient/p2");
        let _ = f
            .decide(&req(None), &mut other, now + Duration::from_secs(30))
            .unwrap();
        assert!(other.facts.get::<BreakGlass>().is_none());
        assert!(other.facts.get::<BreakGlassAvailable>().is_some());
        let mut expired = ctx_for(Some(principal(&["er_physician"], None)), "/fhir/Patient/p1");
        let _ = f
            .decide(&req(None), &mut expired, now + Duration::from_secs(61))
            .unwrap();
        assert!(expired.facts.get::<BreakGlass>().is_none());
    }

    #[test]
    fn nothing_is_in_force_for_a_caller_who_may_not_claim_it() {
        let f = concrete(CFG);
        let now = Instant::now();
        for (p, why) in [
            (Some(principal(&["nurse"], None)), "no role"),
            (
                Some(principal(&["er_physician"], Some("p1"))),
                "patient app",
            ),
            (None, "no caller"),
        ] {
            let mut ctx = ctx_for(p, "/fhir/Patient/p1");
            let d = f
                .decide(&req(Some("ETREAT; emergency")), &mut ctx, now)
                .unwrap();
            assert_eq!(reason_of(&d), Some("break_glass_refused"), "{why}");
            assert!(ctx.facts.get::<BreakGlass>().is_none(), "{why}");
        }
        // Without a claim such callers are not told about emergency access either.
        let mut ctx = ctx_for(Some(principal(&["nurse"], None)), "/fhir/Patient/p1");
        let _ = f.decide(&req(None), &mut ctx, now).unwrap();
        assert!(ctx.facts.get::<BreakGlassAvailable>().is_none());
    }

    #[test]
    fn malformed_or_unaccepted_claims_are_refused() {
        let f = concrete(CFG);
        for claim in [
            "ETREAT",
            "ETREAT;",
            "; reason",
            "HMARKT; marketing",
            "ETREAT; a\tb",
        ] {
            let mut ctx = ctx_for(Some(principal(&["er_physician"], None)), "/fhir/Patient/p1");
            let d = f
                .decide(&req(Some(claim)), &mut ctx, Instant::now())
                .unwrap();
            assert_eq!(reason_of(&d), Some("break_glass_refused"), "{claim:?}");
            assert!(ctx.facts.get::<BreakGlass>().is_none());
        }
        let long = format!("ETREAT; {}", "x".repeat(MAX_REASON + 1));
        let mut ctx = ctx_for(Some(principal(&["er_physician"], None)), "/fhir/Patient/p1");
        let d = f
            .decide(&req(Some(&long)), &mut ctx, Instant::now())
            .unwrap();
        assert_eq!(reason_of(&d), Some("break_glass_refused"));
    }

    #[test]
    fn the_config_is_checked() {
        let bad = |cfg: &str| {
            build(serde_yaml::from_str(cfg).unwrap(), &BuildContext::default())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(bad("{roles: [], overrides: [tenant]}").contains("config.roles"));
        assert!(bad("{roles: [a], overrides: []}").contains("config.overrides"));
        assert!(
            bad("{roles: [a], overrides: [tenant], purposes: [\"E T\"]}")
                .contains("config.purposes[0]")
        );
        assert!(bad("{roles: [a], overrides: [everything]}").contains("overrides"));
        assert_eq!(filter(CFG).kind(), "break_glass");
    }
}
