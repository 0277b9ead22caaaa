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

use crate::ctx::writers;
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
    /// A form-encoded search (its parameters are in the body), not a Bundle.
    pub form: bool,
}

/// The most a batch/transaction body may hold while it is judged.
const MAX_BUNDLE_BYTES: usize = 16 * 1024 * 1024;

/// The grant a request was allowed under (written only by `smart_scopes`): which context, and
/// whether the patient compartment applies.
#[derive(Debug, Clone)]
pub struct ScopeGrant {
    pub context: Context,
    pub patient_compartment: bool,
    /// Restrictions a read's response must meet (the request alone cannot tell): for resources
    /// of the type (None = every type), at least one parameter set must match.
    pub response_checks: Vec<(Option<String>, Vec<Vec<caregate_fhir::SearchParam>>)>,
}

/// A response held until the restricted scope's conditions are checked (written only by
/// `smart_scopes`).
#[derive(Debug, Default)]
pub struct ScopeResponseBuffer {
    pub active: bool,
    pub body: Vec<u8>,
}

/// Whether a FHIR element meets one token value (`system|code`, `|code`, or `code`): a
/// CodeableConcept (any coding), a Coding, a code string, or an array of those.
fn element_matches(el: Option<&serde_json::Value>, value: &str) -> bool {
    use serde_json::Value;
    let (system, code) = match value.split_once('|') {
        Some((s, c)) => (Some(s), c),
        None => (None, value),
    };
    let coding_matches = |c: &Value| {
        c.get("code").and_then(Value::as_str) == Some(code)
            && match system {
                None => true,
                Some("") => c.get("system").is_none(),
                Some(s) => c.get("system").and_then(Value::as_str) == Some(s),
            }
    };
    match el {
        Some(Value::Array(a)) => a.iter().any(|x| element_matches(Some(x), value)),
        Some(Value::Object(o)) => match o.get("coding").and_then(Value::as_array) {
            Some(codings) => codings.iter().any(coding_matches),
            None => coding_matches(&Value::Object(o.clone())),
        },
        Some(Value::String(s)) => system.is_none() && s == code,
        _ => false,
    }
}

/// Whether a resource meets a restricted scope's conditions.
pub fn resource_meets(
    r: &serde_json::Value,
    checks: &[(Option<String>, Vec<Vec<caregate_fhir::SearchParam>>)],
) -> bool {
    let ty = r.get("resourceType").and_then(serde_json::Value::as_str);
    if ty == Some("OperationOutcome") {
        return true;
    }
    checks.iter().all(|(t, any_of)| {
        if t.is_some() && t.as_deref() != ty {
            return true;
        }
        any_of.iter().any(|params| {
            params
                .iter()
                .all(|p| p.values.iter().any(|v| element_matches(r.get(&p.name), v)))
        })
    })
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
                let unmet: Vec<_> = grant
                    .conditions
                    .iter()
                    .filter(|c| {
                        !c.any_of.is_empty() && !c.any_of.iter().any(|r| r.carried_by_request)
                    })
                    .collect();
                let reads = matches!(
                    req.interaction,
                    Interaction::Read | Interaction::Vread | Interaction::HistoryInstance
                );
                if !unmet.is_empty() && !reads {
                    restricted = true;
                    continue;
                }
                // A read by id cannot be judged from the request: its response is checked.
                let response_checks = unmet
                    .iter()
                    .map(|c| {
                        (
                            c.resource_type.clone(),
                            c.any_of.iter().map(|r| r.params.clone()).collect(),
                        )
                    })
                    .collect();
                return Ok(ScopeGrant {
                    context: grant.context,
                    patient_compartment: grant.patient_compartment,
                    response_checks,
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

    /// Needs the verified caller (its scopes) and the gateway's FHIR classification; provides
    /// scope enforcement; confines access.
    fn declaration(&self) -> crate::Declaration {
        use crate::Capability::{Classification, Principal, ScopeEnforcement};
        crate::Declaration::new()
            .needs(&[Principal, Classification])
            .provides(&[ScopeEnforcement])
            .confining()
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
        let form = crate::builtin::body::is_form(req) && class.interaction.is_search();
        if class.interaction == Interaction::BatchOrTransaction {
            // Judged entry by entry once the whole Bundle is here (body phase).
            let _ = ctx
                .facts
                .insert(writers::SmartScopes, ScopeBundleBuffer::default());
            // Nothing is forwarded before every entry is judged.
            ctx.require_whole_exchange();
            return Ok(Decision::Continue);
        }
        if form {
            // The search's parameters are in the body: judged once it is here.
            let _ = ctx.facts.insert(
                writers::SmartScopes,
                ScopeBundleBuffer {
                    body: Vec::new(),
                    form: true,
                },
            );
            ctx.require_whole_exchange();
            return Ok(Decision::Continue);
        }
        match judge(principal, class, false) {
            Ok(grant) => {
                if !grant.response_checks.is_empty() {
                    // The response is judged whole, before anything of it is released.
                    ctx.require_whole_exchange();
                }
                let _ = ctx.facts.insert(writers::SmartScopes, grant);
                Ok(Decision::Continue)
            }
            Err(detail) => Ok(denied(detail)),
        }
    }

    fn response_filter(
        &self,
        resp: &mut crate::ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let needs = ctx
            .facts
            .get::<ScopeGrant>()
            .map(|g| !g.response_checks.is_empty())
            .unwrap_or(false);
        let status = resp.status.as_u16();
        if !needs || ctx.method == "HEAD" || !(200..300).contains(&status) || status == 204 {
            return Ok(());
        }
        let json = crate::builtin::body::is_json(resp);
        let encoded = crate::builtin::body::is_encoded(resp);
        if !json || encoded {
            ctx.refuse_response(LocalReply::error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "the upstream response cannot be checked against the granted scope",
            ));
            return Err(crate::FilterError {
                filter: "smart_scopes",
                message: "a response under a restricted scope that cannot be checked".into(),
            });
        }
        crate::builtin::body::will_rewrite(resp);
        match ctx
            .facts
            .get_mut::<ScopeResponseBuffer>(writers::SmartScopes)
        {
            Some(b) => {
                b.active = true;
                b.body.clear();
            }
            None => {
                let _ = ctx.facts.insert(
                    writers::SmartScopes,
                    ScopeResponseBuffer {
                        active: true,
                        body: Vec::new(),
                    },
                );
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        chunk: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let checks = match ctx.facts.get::<ScopeGrant>() {
            Some(g) if !g.response_checks.is_empty() => g.response_checks.clone(),
            _ => return Ok(()),
        };
        let Some(buf) = ctx
            .facts
            .get_mut::<ScopeResponseBuffer>(writers::SmartScopes)
        else {
            return Ok(());
        };
        if !buf.active {
            return Ok(());
        }
        if !crate::builtin::body::hold(&mut buf.body, chunk, MAX_BUNDLE_BYTES) {
            buf.active = false;
            ctx.refuse_response(LocalReply::error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "the upstream response is too large to check against the granted scope",
            ));
            return Err(crate::FilterError {
                filter: "smart_scopes",
                message: "a restricted response too large to check; exchange aborted".into(),
            });
        }
        if !end_of_stream {
            return Ok(());
        }
        buf.active = false;
        let body = std::mem::take(&mut buf.body);
        let ok = serde_json::from_slice::<serde_json::Value>(&body)
            .map(|v| {
                if v.get("resourceType").and_then(serde_json::Value::as_str) == Some("Bundle") {
                    v.get("entry")
                        .and_then(serde_json::Value::as_array)
                        .map(|es| {
                            es.iter().all(|e| {
                                e.get("resource")
                                    .map(|r| resource_meets(r, &checks))
                                    .unwrap_or(true)
                            })
                        })
                        .unwrap_or(true)
                } else {
                    resource_meets(&v, &checks)
                }
            })
            .unwrap_or(false);
        // The held body goes back whatever the verdict: a refusal in shadow mode releases it
        // whole (in enforce the gateway discards it and answers the refusal).
        *chunk = Some(bytes::Bytes::from(body));
        if !ok {
            if let Decision::Respond(reply) =
                denied("the resource falls outside the granted (restricted) scope")
            {
                ctx.refuse_response(reply);
            }
            return Err(crate::FilterError {
                filter: "smart_scopes",
                message: "the response falls outside the restricted scope; refused".into(),
            });
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx
            .facts
            .get::<ScopeGrant>()
            .map(|g| !g.response_checks.is_empty())
            .unwrap_or(false)
        {
            req.remove_header(&header::ACCEPT_ENCODING);
        }
        Ok(())
    }

    fn request_body_filter(
        &self,
        chunk: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        let Some(buf) = ctx.facts.get_mut::<ScopeBundleBuffer>(writers::SmartScopes) else {
            return Ok(Decision::Continue);
        };
        if !crate::builtin::body::hold(&mut buf.body, chunk, MAX_BUNDLE_BYTES) {
            return Ok(Decision::Respond(LocalReply::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the Bundle is too large to be authorised",
            )));
        }
        if !end_of_stream {
            return Ok(Decision::Continue);
        }
        let body = std::mem::take(&mut buf.body);
        let form = buf.form;
        let Some(principal) = ctx.facts.get::<Principal>() else {
            *chunk = Some(bytes::Bytes::from(body));
            return Ok(denied("no authenticated caller with scopes"));
        };
        if form {
            let verdict = match (
                ctx.facts.get::<FhirRequest>(),
                std::str::from_utf8(&body)
                    .ok()
                    .map(caregate_fhir::parse_params),
            ) {
                (Some(class), Some(Ok(params))) => {
                    let mut merged = class.clone();
                    merged.params.extend(params);
                    judge(principal, &merged, false)
                }
                _ => Err("the form-encoded search parameters cannot be read"),
            };
            *chunk = Some(bytes::Bytes::from(body));
            return match verdict {
                Ok(grant) => {
                    let _ = ctx.facts.insert(writers::SmartScopes, grant);
                    Ok(Decision::Continue)
                }
                Err(why) => Ok(denied(why)),
            };
        }
        // The held Bundle is put back as the body chunk whatever the verdict, so that a shadowed
        // refusal forwards it whole.
        let parsed = crate::builtin::bundle_entries::entries(&body);
        *chunk = Some(bytes::Bytes::from(body));
        let entries = match parsed {
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
            // A read under a restricted scope needs its response checked; inside a Bundle that
            // check is not made, so such an entry is refused.
            let verdict = judge(principal, &e.request, false).and_then(|g| {
                if g.response_checks.is_empty() {
                    Ok(g)
                } else {
                    Err("a read under a restricted scope is not accepted inside a Bundle")
                }
            });
            if let Err(why) = verdict {
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
        // A read by id is allowed with its response checked.
        let g = judge(&p, &class("GET", "/Observation/1", ""), false).unwrap();
        assert_eq!(g.response_checks.len(), 1);
        let lab = serde_json::json!({"resourceType": "Observation", "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}]});
        let vitals = serde_json::json!({"resourceType": "Observation", "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}]});
        assert!(resource_meets(&lab, &g.response_checks));
        assert!(!resource_meets(&vitals, &g.response_checks));
    }
}
