//! `patient_compartment`: a caller with a patient context reaches only their own Patient
//! compartment (FHIR R4 CompartmentDefinition `patient`).
//!
//! ```yaml
//! - kind: patient_compartment
//!   config: { mode: enforce, max_body_bytes: 16777216 }
//! ```
//! Applies to principals with a patient context (a token's configured patient claim); other
//! callers pass. Refused with 403 `patient_compartment`: another patient's id anywhere in the
//! request, a search not scoped to the caller's patient by one of the type's linking parameters,
//! chained and `_has` parameters, `_include`/`_revinclude` (their results could reach other
//! patients), `$everything` or compartment searches for another patient, system-level searches
//! and history, types outside the compartment, and updates, patches
//! and deletes by id (the stored resource cannot be judged from the request). A create whose body
//! does not reference the caller's patient, or references another patient, is refused before
//! anything but the header went upstream. Batch and transaction Bundles are judged entry by entry
//! the same way; one refused entry refuses the Bundle, named by its index.
//!
//! A read by id cannot be judged from the request: the response body is buffered (bounded) and
//! every returned resource — the resource, or each entry of a Bundle — must belong to the
//! caller's compartment. If one does not, the exchange is aborted: the client gets an incomplete
//! response, never a complete 2xx with another patient's data.

use crate::identity::Principal;
use crate::registry::{parse_config, BuildContext, BuildError};
use crate::{
    Decision, Filter, FilterError, LocalReply, Mode, RequestCtx, RequestHeader, ResponseHeader,
    Result,
};
use async_trait::async_trait;
use bytes::Bytes;
use caregate_fhir::{FhirRequest, Interaction, PatientCompartment};
use http::{header, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatientCompartmentConfig {
    #[serde(default)]
    pub mode: Mode,
    /// FHIR XML cannot be checked for the compartment: refused unless allowed here (and then
    /// only where no body check is needed).
    #[serde(default)]
    pub allow_xml: bool,
    /// `Binary` resources carry no patient reference the gateway can check.
    #[serde(default)]
    pub allow_binary: bool,
    #[serde(default = "d_max")]
    pub max_body_bytes: usize,
}

fn d_max() -> usize {
    16 * 1024 * 1024
}

pub struct PatientCompartmentFilter {
    mode: Mode,
    max: usize,
    allow_xml: bool,
    allow_binary: bool,
}

/// Per-request state (written only by this filter).
#[derive(Debug, Default)]
pub struct CompartmentState {
    pub patient: String,
    pub bundle: bool,
    /// A form-encoded search whose parameters are judged from the body.
    pub form_search: bool,
    pub check_request_body: bool,
    pub request_body: Vec<u8>,
    pub check_response: bool,
    pub response_body: Vec<u8>,
}

pub fn build(
    config: serde_yaml::Value,
    _cx: &BuildContext,
) -> std::result::Result<Arc<dyn Filter>, BuildError> {
    let c: PatientCompartmentConfig = parse_config(config)?;
    if c.max_body_bytes == 0 {
        return Err(BuildError::new("config.max_body_bytes", "must be positive"));
    }
    Ok(Arc::new(PatientCompartmentFilter {
        mode: c.mode,
        max: c.max_body_bytes,
        allow_xml: c.allow_xml,
        allow_binary: c.allow_binary,
    }))
}

fn refuse(detail: &'static str) -> Decision {
    Decision::Respond(LocalReply::error(
        StatusCode::FORBIDDEN,
        "patient_compartment",
        detail,
    ))
}

/// The patient id a reference value names (`Patient/x`, `x` for a patient parameter, or an
/// absolute URL ending in `/Patient/x`, with an optional `/_history/n`).
fn referenced_patient(value: &str, bare_is_patient: bool) -> Option<String> {
    let v = value.split('|').next_back().unwrap_or(value);
    let v = match v.find("/_history/") {
        Some(i) => &v[..i],
        None => v,
    };
    if let Some(i) = v.rfind("Patient/") {
        let before_ok = i == 0 || v.as_bytes()[i - 1] == b'/';
        let id = &v[i + "Patient/".len()..];
        if before_ok && !id.is_empty() && !id.contains('/') {
            return Some(id.to_string());
        }
        return None;
    }
    (bare_is_patient && !v.is_empty() && !v.contains('/')).then(|| v.to_string())
}

/// Judge a classified request for a caller confined to `patient`.
pub fn judge(patient: &str, req: &FhirRequest) -> std::result::Result<Follow, &'static str> {
    use Interaction as I;
    let ty = req.resource_type.as_deref();
    for p in &req.params {
        if p.name == "_has" || p.name.starts_with("_has:") {
            return Err("reverse chaining (_has) can probe other patients");
        }
        if !p.chain.is_empty() {
            return Err("chained parameters can probe other patients");
        }
        if p.name == "_include" || p.name == "_revinclude" {
            return Err("_include and _revinclude can return other patients' data");
        }
        for v in &p.values {
            if let Some(other) = referenced_patient(v, false) {
                if other != patient {
                    return Err("the request names another patient");
                }
            }
        }
    }
    match req.interaction {
        I::Capabilities => Ok(Follow::Nothing),
        I::Read | I::Vread | I::HistoryInstance => match ty {
            Some("Patient") if req.id.as_deref() == Some(patient) => Ok(Follow::Response),
            Some("Patient") => Err("another patient's record"),
            Some(t) if PatientCompartment::contains(t) => Ok(Follow::Response),
            _ => Err("this resource type is outside the patient compartment"),
        },
        I::OperationInstance => match (ty, req.id.as_deref(), req.operation.as_deref()) {
            (Some("Patient"), Some(id), Some("$everything")) if id == patient => {
                Ok(Follow::Response)
            }
            (Some("Patient"), Some(_), Some("$everything")) => {
                Err("$everything for another patient")
            }
            _ => Err("this operation is not available with a patient context"),
        },
        I::SearchCompartment => match &req.compartment {
            Some((t, id)) if t == "Patient" && id == patient => Ok(Follow::Response),
            _ => Err("a compartment search for another patient"),
        },
        I::SearchType => {
            let t = ty.ok_or("a search without a resource type")?;
            if t == "Patient" {
                if req
                    .params
                    .iter()
                    .any(|p| p.name == "_id" && p.modifier.is_some())
                {
                    return Err("a Patient search must be scoped to the caller (_id)");
                }
                let ids: Vec<&String> = req
                    .params
                    .iter()
                    .filter(|p| p.name == "_id")
                    .flat_map(|p| p.values.iter())
                    .collect();
                if !ids.is_empty() && ids.iter().all(|v| v.as_str() == patient) {
                    return Ok(Follow::Response);
                }
                return Err("a Patient search must be scoped to the caller (_id)");
            }
            let links = PatientCompartment::params_for(t);
            if links.is_empty() {
                return Err("this resource type is outside the patient compartment");
            }
            // The compartment's linking parameters, and `patient` (the common shorthand search
            // parameter for "subject/beneficiary is this Patient").
            let scoped = req.params.iter().any(|p| {
                (p.name == "patient" || links.contains(&p.name))
                    && p.modifier
                        .as_deref()
                        .map(|m| m == "Patient")
                        .unwrap_or(true)
                    && !p.values.is_empty()
                    && p.values
                        .iter()
                        .all(|v| referenced_patient(v, true).as_deref() == Some(patient))
            });
            if scoped {
                Ok(Follow::Response)
            } else {
                Err("the search must be scoped to the caller's patient")
            }
        }
        I::Create => match ty {
            Some(t) if t != "Patient" && PatientCompartment::contains(t) => Ok(Follow::RequestBody),
            _ => Err("this resource type cannot be created with a patient context"),
        },
        I::Update | I::Patch | I::Delete => {
            Err("updates and deletes by id cannot be confined to the compartment yet")
        }
        I::BatchOrTransaction => Ok(Follow::BundleBody),
        _ => Err("this interaction is not available with a patient context"),
    }
}

/// What the filter must look at after the request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    Nothing,
    Response,
    RequestBody,
    /// A batch/transaction: every entry is judged from the body before anything is forwarded.
    BundleBody,
}

/// Every patient a resource (and its contained resources) references.
fn patients_in(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                if k == "reference" {
                    if let Some(id) = val.as_str().and_then(|s| referenced_patient(s, false)) {
                        out.push(id);
                    }
                } else {
                    patients_in(val, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| patients_in(x, out)),
        _ => {}
    }
}

/// Whether a resource belongs to `patient`'s compartment: the Patient itself, or a resource that
/// references that patient and no other.
pub fn resource_in_compartment(r: &Value, patient: &str) -> bool {
    match r.get("resourceType").and_then(Value::as_str) {
        Some("Patient") => r.get("id").and_then(Value::as_str) == Some(patient),
        Some("OperationOutcome") => true,
        Some(_) => {
            let mut refs = Vec::new();
            patients_in(r, &mut refs);
            !refs.is_empty() && refs.iter().all(|p| p == patient)
        }
        None => false,
    }
}

/// Check a response body: a resource, or every entry of a Bundle.
pub fn body_in_compartment(body: &[u8], patient: &str) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    if v.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
        return v
            .get("entry")
            .and_then(Value::as_array)
            .map(|es| {
                es.iter().all(|e| {
                    e.get("resource")
                        .map(|r| resource_in_compartment(r, patient))
                        .unwrap_or(true)
                })
            })
            .unwrap_or(true);
    }
    resource_in_compartment(&v, patient)
}

fn too_big() -> FilterError {
    FilterError {
        filter: "patient_compartment",
        message: "body over max_body_bytes".into(),
    }
}

#[async_trait]
impl Filter for PatientCompartmentFilter {
    fn kind(&self) -> &'static str {
        "patient_compartment"
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    async fn request_filter(
        &self,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        let Some(patient) = ctx.facts.get::<Principal>().and_then(|p| p.patient.clone()) else {
            return Ok(Decision::Continue);
        };
        let Some(class) = ctx.facts.get::<FhirRequest>() else {
            return Ok(refuse("this request is not a classified FHIR interaction"));
        };
        let header_has_xml = |name: http::header::HeaderName| {
            req.headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.to_ascii_lowercase().contains("xml"))
        };
        let wants_xml = header_has_xml(header::ACCEPT)
            || header_has_xml(header::CONTENT_TYPE)
            || class.params.iter().any(|p| {
                p.name == "_format"
                    && p.values
                        .iter()
                        .any(|v| v.to_ascii_lowercase().contains("xml"))
            });
        if wants_xml && !self.allow_xml {
            return Ok(Decision::Respond(LocalReply::error(
                StatusCode::NOT_ACCEPTABLE,
                "unsupported_format",
                "FHIR XML cannot be checked for the patient compartment on this route; use JSON",
            )));
        }
        let form_body = crate::builtin::body::is_form(req);
        if form_body && class.interaction.is_search() {
            // The parameters are in the body: judged once it is here (body phase).
            let state = CompartmentState {
                patient,
                form_search: true,
                check_request_body: true,
                ..Default::default()
            };
            ctx.facts
                .insert("patient_compartment", state)
                .map_err(|e| FilterError {
                    filter: "patient_compartment",
                    message: e.to_string(),
                })?;
            return Ok(Decision::Continue);
        }
        if form_body {
            return Ok(refuse("a form body is only accepted on searches"));
        }
        if req.headers.contains_key("if-none-exist") {
            // Conditional create criteria are a search whose outcome reveals other records.
            return Ok(refuse(
                "conditional requests are not available with a patient context",
            ));
        }
        if class.resource_type.as_deref() == Some("Binary") && !self.allow_binary {
            return Ok(refuse(
                "Binary resources are not available with a patient context on this route",
            ));
        }
        match judge(&patient, class) {
            Err(detail) => Ok(refuse(detail)),
            Ok(follow) => {
                let state = CompartmentState {
                    patient,
                    bundle: follow == Follow::BundleBody,
                    check_request_body: matches!(follow, Follow::RequestBody | Follow::BundleBody),
                    check_response: follow != Follow::Nothing,
                    ..Default::default()
                };
                ctx.facts
                    .insert("patient_compartment", state)
                    .map_err(|e| FilterError {
                        filter: "patient_compartment",
                        message: e.to_string(),
                    })?;
                Ok(Decision::Continue)
            }
        }
    }

    fn request_body_filter(
        &self,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        let Some(st) = ctx.facts.get_mut::<CompartmentState>("patient_compartment") else {
            return Ok(Decision::Continue);
        };
        if !st.check_request_body {
            return Ok(Decision::Continue);
        }
        // Hold the body until it is judged.
        if !crate::builtin::body::hold(&mut st.request_body, chunk, self.max) {
            return Err(too_big());
        }
        if !end_of_stream {
            return Ok(Decision::Continue);
        }
        let body = std::mem::take(&mut st.request_body);
        st.check_request_body = false;
        if st.form_search {
            let patient = st.patient.clone();
            let verdict = match (
                ctx.facts.get::<FhirRequest>(),
                std::str::from_utf8(&body)
                    .ok()
                    .map(caregate_fhir::parse_params),
            ) {
                (Some(class), Some(Ok(params))) => {
                    let mut merged = class.clone();
                    merged.params.extend(params);
                    judge(&patient, &merged)
                }
                _ => Err("the form-encoded search parameters cannot be read"),
            };
            *chunk = Some(Bytes::from(body));
            return match verdict {
                Ok(follow) => {
                    if let Some(st) = ctx.facts.get_mut::<CompartmentState>("patient_compartment") {
                        st.check_response = follow != Follow::Nothing;
                    }
                    Ok(Decision::Continue)
                }
                Err(why) => Ok(refuse(why)),
            };
        }
        if st.bundle {
            let entries = match crate::builtin::bundle_entries::entries(&body) {
                Ok(e) => e,
                Err(why) => {
                    return Ok(Decision::Respond(LocalReply::error(
                        StatusCode::FORBIDDEN,
                        "patient_compartment",
                        why,
                    )))
                }
            };
            for e in &entries {
                let verdict = judge(&st.patient, &e.request).and_then(|follow| {
                    if follow == Follow::BundleBody {
                        return Err("a Bundle inside a Bundle entry");
                    }
                    if follow == Follow::RequestBody {
                        let fits = e
                            .resource
                            .as_ref()
                            .map(|r| resource_in_compartment(r, &st.patient))
                            .unwrap_or(false);
                        if !fits {
                            return Err(
                                "the resource must reference the caller's patient and no other",
                            );
                        }
                    }
                    Ok(follow)
                });
                if let Err(why) = verdict {
                    *chunk = Some(Bytes::from(body));
                    return Ok(Decision::Respond(LocalReply::error(
                        StatusCode::FORBIDDEN,
                        "patient_compartment",
                        format!("entry {}: {why}; the whole Bundle is refused", e.index),
                    )));
                }
            }
            *chunk = Some(Bytes::from(body));
            return Ok(Decision::Continue);
        }
        let ok = serde_json::from_slice::<Value>(&body)
            .map(|v| {
                v.get("resourceType").and_then(Value::as_str) != Some("Patient")
                    && resource_in_compartment(&v, &st.patient)
            })
            .unwrap_or(false);
        if !ok {
            return Ok(refuse(
                "the resource must reference the caller's patient and no other",
            ));
        }
        *chunk = Some(Bytes::from(body));
        Ok(Decision::Continue)
    }

    async fn upstream_request_filter(
        &self,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Responses are read as plain JSON.
        if ctx.facts.get::<CompartmentState>().is_some() {
            req.remove_header(&header::ACCEPT_ENCODING);
        }
        Ok(())
    }

    fn response_filter(&self, resp: &mut ResponseHeader, ctx: &mut RequestCtx) -> Result<()> {
        let status = resp.status.as_u16();
        let head = ctx.method == "HEAD";
        let Some(st) = ctx.facts.get_mut::<CompartmentState>("patient_compartment") else {
            return Ok(());
        };
        if head || !st.check_response || !(200..300).contains(&status) || status == 204 {
            st.check_response = false;
            return Ok(());
        }
        let json = crate::builtin::body::is_json(resp);
        let encoded = crate::builtin::body::is_encoded(resp);
        if !json || encoded {
            // Nothing this filter can judge is ever passed unchecked.
            return Err(FilterError {
                filter: "patient_compartment",
                message: "a response that cannot be checked for the compartment".into(),
            });
        }
        crate::builtin::body::will_rewrite(resp);
        Ok(())
    }

    fn response_body_filter(
        &self,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(st) = ctx.facts.get_mut::<CompartmentState>("patient_compartment") else {
            return Ok(());
        };
        if !st.check_response {
            return Ok(());
        }
        if !crate::builtin::body::hold(&mut st.response_body, chunk, self.max) {
            return Err(too_big());
        }
        if end_of_stream {
            let body = std::mem::take(&mut st.response_body);
            st.check_response = false;
            if !body_in_compartment(&body, &st.patient) {
                return Err(FilterError {
                    filter: "patient_compartment",
                    message:
                        "the response holds data outside the caller's compartment; exchange aborted"
                            .into(),
                });
            }
            *chunk = Some(Bytes::from(body));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn class(method: &str, path: &str, query: &str) -> FhirRequest {
        caregate_fhir::classify(method, path, query, None, None).unwrap()
    }

    #[test]
    fn requests() {
        let ok = [
            ("GET", "/Patient/A", ""),
            ("GET", "/Observation", "patient=A"),
            ("GET", "/Observation", "subject=Patient/A&_count=5"),
            ("GET", "/Patient", "_id=A"),
            ("GET", "/Patient/A/Observation", ""),
            ("GET", "/Patient/A/$everything", ""),
            ("GET", "/Observation/123", ""),
            ("GET", "/metadata", ""),
        ];
        for (m, p, q) in ok {
            assert!(judge("A", &class(m, p, q)).is_ok(), "{m} {p}?{q}");
        }
        let refused = [
            ("GET", "/Patient/B", ""),
            ("GET", "/Observation", "patient=B"),
            ("GET", "/Observation", "patient=A,B"),
            ("GET", "/Observation", ""),
            (
                "GET",
                "/Observation",
                "patient=A&_include=Observation:subject",
            ),
            (
                "GET",
                "/Observation",
                "patient=A&_revinclude=Provenance:target",
            ),
            ("GET", "/Observation", "subject.name=Smith"),
            ("GET", "/Patient", "_has:Observation:patient:code=1234"),
            ("GET", "/Patient/B/$everything", ""),
            ("GET", "/Patient/B/Observation", ""),
            ("GET", "/Patient", "name=Smith"),
            ("GET", "/Observation", "patient=A&performer=Patient/B"),
            ("PUT", "/Observation/1", ""),
            ("DELETE", "/Observation/1", ""),
            ("GET", "/Practitioner/1", ""),
            ("GET", "/$export", ""),
            ("GET", "/Patient/$export", ""),
        ];
        for (m, p, q) in refused {
            assert!(judge("A", &class(m, p, q)).is_err(), "{m} {p}?{q}");
        }
    }

    #[test]
    fn responses() {
        let own = json!({"resourceType": "Observation", "subject": {"reference": "Patient/A"}});
        let other = json!({"resourceType": "Observation", "subject": {"reference": "Patient/B"}});
        let mixed = json!({"resourceType": "Observation", "subject": {"reference": "Patient/A"}, "performer": [{"reference": "http://x/fhir/Patient/B"}]});
        assert!(resource_in_compartment(&own, "A"));
        assert!(!resource_in_compartment(&other, "A"));
        assert!(!resource_in_compartment(&mixed, "A"));
        assert!(!resource_in_compartment(
            &json!({"resourceType": "Practitioner"}),
            "A"
        ));
        let bundle = json!({"resourceType": "Bundle", "entry": [{"resource": own}, {"resource": {"resourceType": "Patient", "id": "A"}}]});
        assert!(body_in_compartment(bundle.to_string().as_bytes(), "A"));
        let leaky =
            json!({"resourceType": "Bundle", "entry": [{"resource": own}, {"resource": other}]});
        assert!(!body_in_compartment(leaky.to_string().as_bytes(), "A"));
        assert!(!body_in_compartment(b"not json", "A"));
    }
}
