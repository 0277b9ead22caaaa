//! `smart_scopes`: SMART on FHIR scopes (v2 and v1) enforced at the edge.
//!
//! ```yaml
//! - kind: smart_scopes
//!   config: { mode: enforce }
//! ```
//! Needs the principal's scopes (`jwt_auth` before it) and the gateway's classification of the
//! FHIR request (FHIR routes). A request is allowed when a scope of a context the caller has
//! permits it: `patient/` scopes only for a token with a patient context, `user/` scopes, and
//! `system/` scopes. Denials are 403 `insufficient_scope` with
//! `WWW-Authenticate: Bearer error="insufficient_scope"`.
//!
//! Fail-closed where the request alone cannot be judged yet: a search under a scope with a query
//! restriction must carry that restriction itself; `_include`/`_revinclude` and chained
//! parameters (whose targets the request does not name) need a wildcard read/search scope;
//! form-encoded `_search` bodies are refused. Batch and transaction Bundles are judged entry by
//! entry once their body is here; one refused entry refuses the Bundle, named by its index.

use crate::identity::Principal;
use crate::registry::{parse_config, BuildContext, BuildError};
use crate::{Decision, Filter, LocalReply, Mode, RequestCtx, RequestHeader, Result};
use async_trait::async_trait;
use caregate_fhir::{Context, FhirRequest, Interaction, Permit, ScopeSet};
use http::{header, HeaderValue, StatusCode};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmartScopesConfig {
    #[serde(default)]
    pub mode: Mode,
}

pub struct SmartScopesFilter {
    mode: Mode,
}

/// A batch/transaction body held until every entry is judged (written only by `smart_scopes`).
#[derive(Debug, Default)]
pub struct ScopeBundleBuffer {
    pub body: Vec<u8>,
}

/// The most a batch/transaction body may hold while it is judged.
const MAX_BUNDLE_BYTES: usize = 16 * 1024 * 1024;

/// The grant a request was allowed under (written only by `smart_scopes`): which context, and
/// whether the patient compartment applies.
#[derive(Debug, Clone)]
pub struct ScopeGrant {
    pub context: Context,
    pub patient_compartment: bool,
}

pub fn build(
    config: serde_yaml::Value,
    _cx: &BuildContext,
) -> std::result::Result<Arc<dyn Filter>, BuildError> {
    let c: SmartScopesConfig = parse_config(config)?;
    Ok(Arc::new(SmartScopesFilter { mode: c.mode }))
}

fn denied(detail: &'static str) -> Decision {
    Decision::Respond(
        LocalReply::error(StatusCode::FORBIDDEN, "insufficient_scope", detail).with_header(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"insufficient_scope\""),
        ),
    )
}

/// Judge a classified request against a principal's scopes.
pub fn judge(
    principal: &Principal,
    req: &FhirRequest,
    form_search: bool,
) -> std::result::Result<ScopeGrant, &'static str> {
    if form_search {
        return Err("form-encoded searches are not accepted on this route yet; use GET");
    }
    let (scopes, _unparsed) = ScopeSet::parse_lenient(&principal.scopes.join(" "));
    // Includes and chains reach types the request does not name: only a wildcard scope covers
    // them.
    let reaches_other_types = req.params.iter().any(|p| {
        p.name == "_include"
            || p.name == "_revinclude"
            || (!p.chain.is_empty() && p.modifier.is_none())
    });
    if reaches_other_types {
        let wildcard = [Context::Patient, Context::User, Context::System]
            .iter()
            .any(|c| {
                (*c != Context::Patient || principal.patient.is_some())
                    && caregate_fhir::R4_RESOURCE_TYPES.iter().all(|t| {
                        matches!(
                            scopes.permits_resource(*c, t, caregate_fhir::Permission::Read),
                            Permit::Allow(_)
                        )
                    })
            });
        if !wildcard {
            return Err("_include, _revinclude and untyped chains need a wildcard read scope");
        }
    }
    let mut contexts = Vec::new();
    if principal.patient.is_some() {
        contexts.push(Context::Patient);
    }
    contexts.push(Context::User);
    contexts.push(Context::System);
    let mut restricted = false;
    for ctx in contexts {
        match scopes.permits(ctx, req) {
            Permit::Allow(grant) => {
                let unmet = grant.conditions.iter().any(|c| {
                    !c.any_of.is_empty() && !c.any_of.iter().any(|r| r.carried_by_request)
                });
                if unmet {
                    restricted = true;
                    continue;
                }
                return Ok(ScopeGrant {
                    context: grant.context,
                    patient_compartment: grant.patient_compartment,
                });
            }
            Permit::PerEntry => {
                return Err("batch and transaction Bundles are judged entry by entry")
            }
            Permit::Deny(_) => {}
        }
    }
    if restricted {
        Err("the granted scope is restricted: the search must carry its restriction")
    } else {
        Err("no granted scope permits this interaction on this resource type")
    }
}

#[async_trait]
impl Filter for SmartScopesFilter {
    fn kind(&self) -> &'static str {
        "smart_scopes"
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    async fn request_filter(
        &self,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        let Some(principal) = ctx.facts.get::<Principal>() else {
            return Ok(denied("no authenticated caller with scopes"));
        };
        let Some(class) = ctx.facts.get::<FhirRequest>() else {
            return Ok(denied("this request is not a classified FHIR interaction"));
        };
        let form = req
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.to_ascii_lowercase()
                    .starts_with("application/x-www-form-urlencoded")
            })
            .unwrap_or(false)
            && class.interaction.is_search();
        if class.interaction == Interaction::BatchOrTransaction {
            // Judged entry by entry once the whole Bundle is here (body phase).
            let _ = ctx
                .facts
                .insert("smart_scopes", ScopeBundleBuffer::default());
            return Ok(Decision::Continue);
        }
        match judge(principal, class, form) {
            Ok(grant) => {
                let _ = ctx.facts.insert("smart_scopes", grant);
                Ok(Decision::Continue)
            }
            Err(detail) => Ok(denied(detail)),
        }
    }

    fn request_body_filter(
        &self,
        chunk: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        let Some(buf) = ctx.facts.get_mut::<ScopeBundleBuffer>("smart_scopes") else {
            return Ok(Decision::Continue);
        };
        if let Some(c) = chunk.take() {
            if buf.body.len() + c.len() > MAX_BUNDLE_BYTES {
                return Ok(Decision::Respond(LocalReply::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the Bundle is too large to be authorised",
                )));
            }
            buf.body.extend_from_slice(&c);
        }
        if !end_of_stream {
            return Ok(Decision::Continue);
        }
        let body = std::mem::take(&mut buf.body);
        let Some(principal) = ctx.facts.get::<Principal>() else {
            return Ok(denied("no authenticated caller with scopes"));
        };
        let entries = match crate::builtin::bundle_entries::entries(&body) {
            Ok(e) => e,
            Err(why) => {
                return Ok(Decision::Respond(
                    LocalReply::error(StatusCode::FORBIDDEN, "insufficient_scope", why)
                        .with_header(
                            header::WWW_AUTHENTICATE,
                            HeaderValue::from_static("Bearer error=\"insufficient_scope\""),
                        ),
                ))
            }
        };
        for e in &entries {
            if let Err(why) = judge(principal, &e.request, false) {
                return Ok(Decision::Respond(
                    LocalReply::error(
                        StatusCode::FORBIDDEN,
                        "insufficient_scope",
                        format!("entry {}: {why}; the whole Bundle is refused", e.index),
                    )
                    .with_header(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer error=\"insufficient_scope\""),
                    ),
                ));
            }
        }
        *chunk = Some(bytes::Bytes::from(body));
        Ok(Decision::Continue)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::identity::AuthMethod;

    fn principal(scopes: &str, patient: Option<&str>) -> Principal {
        Principal {
            subject: "s".into(),
            issuer: None,
            client_id: None,
            roles: vec![],
            scopes: scopes.split_whitespace().map(str::to_string).collect(),
            tenant: None,
            patient: patient.map(str::to_string),
            fhir_user: None,
            method: AuthMethod::Token,
            system: None,
            expires_at: None,
        }
    }

    fn class(method: &str, path: &str, query: &str) -> FhirRequest {
        caregate_fhir::classify(method, path, query, None, None).unwrap()
    }

    #[test]
    fn scopes_decide() {
        let p = principal("patient/Observation.rs patient/Patient.r", Some("A"));
        assert!(judge(&p, &class("GET", "/Observation", "patient=A"), false).is_ok());
        assert!(
            judge(&p, &class("GET", "/Patient/A", ""), false)
                .unwrap()
                .patient_compartment
        );
        assert!(
            judge(&p, &class("POST", "/Observation", ""), false).is_err(),
            "no c"
        );
        assert!(
            judge(&p, &class("GET", "/Condition", "patient=A"), false).is_err(),
            "no Condition"
        );
        // patient/ scopes need a patient context.
        let np = principal("patient/*.rs", None);
        assert!(judge(&np, &class("GET", "/Observation", ""), false).is_err());
        let u = principal("user/*.cruds", None);
        assert!(judge(&u, &class("DELETE", "/Observation/1", ""), false).is_ok());
        assert!(
            judge(&u, &class("POST", "/", ""), false).is_err(),
            "batch refused for now"
        );
        assert!(
            judge(&u, &class("POST", "/Observation/_search", ""), true).is_err(),
            "form search refused for now"
        );
        // v1 scopes.
        let v1 = principal("user/Observation.read", None);
        assert!(judge(&v1, &class("GET", "/Observation/1", ""), false).is_ok());
        assert!(judge(&v1, &class("PUT", "/Observation/1", ""), false).is_err());
    }

    #[test]
    fn restricted_scopes_need_the_restriction_in_the_search() {
        let p = principal(
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
            Some("A"),
        );
        let with = class(
            "GET",
            "/Observation",
            "patient=A&category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
        );
        assert!(judge(&p, &with, false).is_ok());
        assert!(judge(&p, &class("GET", "/Observation", "patient=A"), false).is_err());
    }
}
