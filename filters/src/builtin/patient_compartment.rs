//! `patient_compartment`: a caller with a patient context reaches only their own Patient
//! compartment (FHIR R4 CompartmentDefinition `patient`).
//!
//! ```yaml
//! - kind: patient_compartment
//!   config: { mode: enforce, max_body_bytes: 16777216 }
//! ```
//! Applies to principals with a patient context (a token's configured patient claim); other
//! verified callers pass. A request with no verified caller at all (the filter placed before
//! `jwt_auth`, or an anonymous caller on an optional-bearer route) is refused: it fails closed.
//! Refused with 403 `patient_compartment`: another patient's id anywhere in the request, a search not scoped to the caller's patient by one of the type's linking parameters,
//! chained and `_has` parameters, `$everything` or compartment searches for another patient,
//! system-level searches and history, types outside the compartment, conditional writes, and
//! bulk `$export` unless `allow_bulk_export` (then only for the caller's own patient). A create
//! whose body does not reference the caller's patient, or references another patient, is
//! refused before anything goes upstream. Batch and transaction Bundles are judged entry by
//! entry the same way before anything is forwarded; one refused entry refuses the Bundle, named
//! by its index.
//!
//! What the request alone cannot tell is checked on whole bodies, before anything is released
//! (the gateway runs these requests as whole exchanges):
//! - a read by id, a search (with `_include`/`_revinclude` too), `$everything`: nothing returned
//!   may be another patient's, otherwise the client gets `404 not_found` and none of the data
//!   ([`check_body`], [`standing`]). A read returns a resource of the caller's own. In a Bundle,
//!   each entry is either the caller's own — their `Patient`, or a resource that references
//!   their patient and no other (a resource of a type the CompartmentDefinition lists with
//!   parameters that references no patient stays refused: whose it is cannot be told) — or of
//!   a type outside the compartment (`Practitioner`, `Organization`, `Location`, `Medication`,
//!   ...) that references no patient and embeds no compartment-type resource. Such an entry is
//!   released only with the caller's own data: anything `$everything` returns, an `include`
//!   entry, or an entry the caller's released entries reference. A `Patient` other than the
//!   caller, a `Patient` embedded anywhere (`contained`, a nested Bundle), and a resource that
//!   references another patient are refused wherever they are;
//! - an update, patch or delete by id: the stored resource is read first (a pre-read on the
//!   same upstream) and must belong to the compartment (else `404 not_found`); the new state
//!   must too (an update's body; a JSON Patch is applied to the stored resource and the result
//!   judged). The forwarded request carries `If-Match` with the version that was judged, so a
//!   change in between fails at the backend instead of slipping through.
//!
//! FHIR XML and `Binary` cannot be judged and are refused unless allowed; FHIRPath Patch is
//! refused (only JSON Patch can be applied to judge the result).

use crate::ctx::writers;
use crate::identity::Principal;
use crate::registry::{parse_config, BuildContext, BuildError};
use crate::{
    Decision, Filter, FilterError, LocalReply, Mode, RequestCtx, RequestHeader, ResponseHeader,
    Result, Stored,
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
    /// Bulk data `$export` kick-offs for the caller's own patient (`Patient/$export` or
    /// `Group/{id}/$export` with a `patient` parameter naming only the caller). Its status and
    /// output files are not FHIR interactions and are never passed on this route; refused by
    /// default.
    #[serde(default)]
    pub allow_bulk_export: bool,
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
    allow_bulk_export: bool,
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
    /// The caller's own `Patient/<id>/$everything`: what it returns of types outside the
    /// compartment is released without a reference from the caller's entries.
    pub everything: bool,
    pub response_body: Vec<u8>,
    /// An update, patch or delete by id: what the pre-read found.
    pub write: Option<WriteCheck>,
}

/// The state of a change by id, judged against the stored resource.
#[derive(Debug, Default)]
pub struct WriteCheck {
    pub interaction: Option<Interaction>,
    pub resource_type: String,
    pub id: String,
    /// The request's `Content-Type` (a patch is judged by its format).
    pub content_type: String,
    /// The client's own `If-Match`, if any.
    pub if_match: Option<String>,
    /// The stored resource (when the pre-read found one) and its ETag.
    pub stored: Option<Value>,
    pub stored_etag: Option<String>,
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
        allow_bulk_export: c.allow_bulk_export,
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
        _ if req.operation.as_deref() == Some("$export") => {
            Err("bulk $export is not available with a patient context on this route")
        }
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
        I::Update | I::Patch | I::Delete => match (ty, req.id.as_deref()) {
            (Some("Patient"), Some(id)) if id == patient => Ok(Follow::Stored),
            (Some("Patient"), _) => Err("another patient's record"),
            (Some(t), Some(_)) if PatientCompartment::contains(t) => Ok(Follow::Stored),
            _ => Err("this resource type is outside the patient compartment"),
        },
        I::ConditionalUpdate | I::ConditionalPatch | I::ConditionalDelete => {
            Err("conditional writes are not available with a patient context")
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
    /// An update, patch or delete by id: judged against the stored resource (a pre-read), and
    /// an update or patch against its new state.
    Stored,
}

/// Whether a bulk `$export` kick-off is confined to `patient`: Patient- or Group-level, with a
/// `patient` parameter naming the caller and no one else.
pub fn export_for(patient: &str, req: &FhirRequest) -> bool {
    let level_ok = matches!(
        (req.interaction, req.resource_type.as_deref()),
        (Interaction::OperationType, Some("Patient"))
            | (Interaction::OperationInstance, Some("Group"))
    );
    let named: Vec<&String> = req
        .params
        .iter()
        .filter(|p| p.name == "patient")
        .flat_map(|p| p.values.iter())
        .collect();
    level_ok
        && !named.is_empty()
        && named
            .iter()
            .all(|v| referenced_patient(v, true).as_deref() == Some(patient))
}

/// What one walk over a resource finds.
#[derive(Default)]
struct Scan<'a> {
    /// Every patient referenced anywhere in it (contained resources included).
    patients: Vec<String>,
    /// The type of every resource embedded in it at any depth (contained resources, a nested
    /// Bundle's entries, a `Parameters` value): any object with a `resourceType` member, `None`
    /// when that is not a string.
    embedded: Vec<Option<&'a str>>,
}

fn scan<'a>(v: &'a Value, root: bool, out: &mut Scan<'a>) {
    match v {
        Value::Object(m) => {
            if !root {
                if let Some(t) = m.get("resourceType") {
                    out.embedded.push(t.as_str());
                }
            }
            for (k, val) in m {
                if k == "reference" {
                    if let Some(id) = val.as_str().and_then(|s| referenced_patient(s, false)) {
                        out.patients.push(id);
                    }
                } else {
                    scan(val, false, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| scan(x, false, out)),
        _ => {}
    }
}

/// What a returned resource is to a caller confined to one patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The caller's: their own `Patient`, an `OperationOutcome`, or a resource that references
    /// the caller's patient and no other.
    Own,
    /// Of a type outside the Patient compartment (`Practitioner`, `Organization`, `Location`,
    /// `Medication`, ...: the CompartmentDefinition lists no parameter for it), referencing no
    /// patient and carrying no resource of a compartment type. Not anyone's record: released
    /// with the caller's own data only (see [`check_body`]).
    Outside,
    /// Another patient's, or a patient's the compartment cannot tell (a `Patient` embedded in
    /// another resource, a compartment-type resource that references no patient): never
    /// released.
    Foreign,
}

/// What a resource is to `patient`'s compartment (see [`Standing`]).
///
/// - A `Patient` is the caller's own when its id is the caller's and it links no other patient.
/// - Any resource that references the caller's patient (every `reference` in it, contained
///   resources included) and no other patient is the caller's own, whatever its type.
/// - A resource of a compartment type that references no patient stays refused: whose it is
///   cannot be told.
/// - A resource of a type outside the compartment that references no patient is `Outside`,
///   unless it embeds a resource of a compartment type (which, referencing no patient either,
///   cannot be told whose it is).
/// - A resource that references another patient, or embeds a `Patient` anywhere (in
///   `contained`, in a nested Bundle), is `Foreign`.
pub fn standing(r: &Value, patient: &str) -> Standing {
    let Some(ty) = r.get("resourceType").and_then(Value::as_str) else {
        return Standing::Foreign;
    };
    let mut found = Scan::default();
    scan(r, true, &mut found);
    if found
        .embedded
        .iter()
        .any(|t| matches!(t, None | Some("Patient")))
    {
        return Standing::Foreign;
    }
    let refs = found.patients;
    if refs.iter().any(|p| p != patient) {
        return Standing::Foreign;
    }
    match ty {
        "Patient" if r.get("id").and_then(Value::as_str) == Some(patient) => Standing::Own,
        "Patient" => Standing::Foreign,
        "OperationOutcome" => Standing::Own,
        _ if !refs.is_empty() => Standing::Own,
        t if PatientCompartment::contains(t) => Standing::Foreign,
        _ if found
            .embedded
            .iter()
            .flatten()
            .any(|t| PatientCompartment::contains(t)) =>
        {
            Standing::Foreign
        }
        _ => Standing::Outside,
    }
}

/// Whether a resource belongs to `patient`'s compartment: the Patient itself, or a resource that
/// references that patient and no other. A resource that embeds a Patient (a patient the
/// compartment cannot identify) never belongs. Resources of types outside the compartment that
/// reference no patient do not belong either: they are released only in a Bundle, with the
/// caller's own data ([`check_body`]).
pub fn resource_in_compartment(r: &Value, patient: &str) -> bool {
    standing(r, patient) == Standing::Own
}

/// The targets of every literal reference in `v`: the reference itself (for `urn:uuid:` and
/// other `fullUrl`s) and the `Type/id` it ends in (relative or absolute, `/_history/n` dropped).
/// Local references (`#id`) name contained resources and are left out.
fn reference_targets(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                match (k.as_str(), val.as_str()) {
                    ("reference", Some(s)) if !s.starts_with('#') => {
                        out.push(s.to_string());
                        if let Some(t) = type_and_id(s) {
                            out.push(t);
                        }
                    }
                    _ => reference_targets(val, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| reference_targets(x, out)),
        _ => {}
    }
}

/// `Type/id` of a relative or absolute literal reference, without `/_history/n`.
fn type_and_id(reference: &str) -> Option<String> {
    let s = match reference.find("/_history/") {
        Some(i) => &reference[..i],
        None => reference,
    };
    let s = s.split(['?', '#']).next().unwrap_or(s);
    let mut segs = s.rsplit('/');
    let id = segs.next().filter(|x| !x.is_empty())?;
    let ty = segs
        .next()
        .filter(|t| t.starts_with(|c: char| c.is_ascii_uppercase()))?;
    Some(format!("{ty}/{id}"))
}

/// A resource outside the Bundle's entries (`entry.response.outcome`, R5 `issues`) may only be
/// an `OperationOutcome` of the caller's.
fn only_outcomes(v: &Value, patient: &str) -> bool {
    match v {
        Value::Object(m) if m.contains_key("resourceType") => {
            m.get("resourceType").and_then(Value::as_str) == Some("OperationOutcome")
                && standing(v, patient) == Standing::Own
        }
        Value::Object(m) => m.values().all(|x| only_outcomes(x, patient)),
        Value::Array(a) => a.iter().all(|x| only_outcomes(x, patient)),
        _ => true,
    }
}

/// Check a response body for a caller confined to `patient`. `Err` says why it is refused (a
/// fixed text, for the log: the client only ever sees `404 not_found`).
///
/// A single resource must be the caller's own ([`Standing::Own`]). In a Bundle every entry's
/// resource (`match`, `include` and `outcome` entries alike) must be the caller's own or of a
/// type outside the compartment ([`Standing::Outside`]), and nothing may be another patient's.
/// An `Outside` resource is released only when the exchange returns it for the caller's own
/// data: the whole response of `$everything` (`everything`), an entry with `search.mode`
/// `include` (`_include`, `_revinclude`), or an entry that a released entry references (by
/// `Type/id` under any base, or by its `fullUrl`) — so a `match` entry of an outside type that
/// none of the caller's entries references is refused.
pub fn check_body(
    body: &[u8],
    patient: &str,
    everything: bool,
) -> std::result::Result<(), &'static str> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Err("the response is not JSON");
    };
    if v.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return match standing(&v, patient) {
            Standing::Own => Ok(()),
            Standing::Outside => Err("the resource is of a type outside the patient compartment"),
            Standing::Foreign => Err("the resource is another patient's, or no patient's"),
        };
    }
    let Value::Object(bundle) = &v else {
        return Err("the response is not a FHIR resource");
    };
    if !bundle
        .iter()
        .filter(|(k, _)| k.as_str() != "entry")
        .all(|(_, x)| only_outcomes(x, patient))
    {
        return Err("the Bundle carries a resource outside its entries");
    }
    let entries: &[Value] = match bundle.get("entry") {
        None => &[],
        Some(Value::Array(a)) => a,
        Some(_) => return Err("Bundle.entry is not a list"),
    };
    // The entries of outside types that are not released yet.
    let mut waiting: Vec<&Value> = Vec::new();
    let mut released: Vec<&Value> = Vec::new();
    for e in entries {
        let Value::Object(entry) = e else {
            return Err("a Bundle entry is not an object");
        };
        if !entry
            .iter()
            .filter(|(k, _)| k.as_str() != "resource")
            .all(|(_, x)| only_outcomes(x, patient))
        {
            return Err("a Bundle entry carries a resource besides its own");
        }
        let Some(r) = entry.get("resource") else {
            continue;
        };
        match standing(r, patient) {
            Standing::Foreign => {
                return Err(
                    "an entry is another patient's, or a compartment resource of no patient",
                )
            }
            Standing::Own => released.push(r),
            Standing::Outside => {
                let included = e
                    .get("search")
                    .and_then(|s| s.get("mode"))
                    .and_then(Value::as_str)
                    == Some("include");
                if everything || included {
                    released.push(r);
                } else {
                    waiting.push(e);
                }
            }
        }
    }
    if waiting.is_empty() {
        return Ok(());
    }
    // Release what the released entries reference, and what that references in turn.
    let mut by_target: std::collections::HashMap<String, Vec<usize>> = Default::default();
    for (i, e) in waiting.iter().enumerate() {
        let r = e.get("resource");
        let ty = r
            .and_then(|r| r.get("resourceType"))
            .and_then(Value::as_str);
        let id = r.and_then(|r| r.get("id")).and_then(Value::as_str);
        if let (Some(ty), Some(id)) = (ty, id) {
            by_target.entry(format!("{ty}/{id}")).or_default().push(i);
        }
        if let Some(url) = e.get("fullUrl").and_then(Value::as_str) {
            by_target.entry(url.to_string()).or_default().push(i);
        }
    }
    let mut done = vec![false; waiting.len()];
    let mut queue = Vec::new();
    released
        .iter()
        .for_each(|r| reference_targets(r, &mut queue));
    while let Some(target) = queue.pop() {
        for i in by_target.remove(&target).unwrap_or_default() {
            if !done[i] {
                done[i] = true;
                if let Some(r) = waiting[i].get("resource") {
                    reference_targets(r, &mut queue);
                }
            }
        }
    }
    if done.iter().all(|d| *d) {
        Ok(())
    } else {
        Err("an entry of a type outside the patient compartment that the caller's own entries do not reference")
    }
}

/// Whether a response body may be released to a caller confined to `patient` (outside
/// `$everything`): [`check_body`].
pub fn body_in_compartment(body: &[u8], patient: &str) -> bool {
    check_body(body, patient, false).is_ok()
}

/// Two entity tags name the same version (weak comparison, RFC 9110 §8.8.3.2).
fn same_etag(a: &str, b: &str) -> bool {
    let strip = |t: &str| {
        let t = t.trim();
        t.strip_prefix("W/").unwrap_or(t).to_string()
    };
    strip(a) == strip(b)
}

/// The new state of a changed resource, judged for the compartment: an update's body, or the
/// stored resource with a JSON Patch applied. `Err` is the refusal text.
pub fn new_state(
    w: &WriteCheck,
    body: &[u8],
    patient: &str,
    max_copy: usize,
) -> std::result::Result<(), &'static str> {
    let state = match w.interaction {
        Some(Interaction::Update) => {
            serde_json::from_slice::<Value>(body).map_err(|_| "the body is not a JSON resource")?
        }
        Some(Interaction::Patch) => {
            let ct = w.content_type.to_ascii_lowercase();
            if !ct.starts_with("application/json-patch+json") {
                return Err("only JSON Patch can be checked for the patient compartment");
            }
            let patch: json_patch::Patch =
                serde_json::from_slice(body).map_err(|_| "the body is not a JSON Patch")?;
            let mut doc = w
                .stored
                .clone()
                .ok_or("there is no stored resource to patch")?;
            // `copy` can double the document per operation: bound what it may copy in all.
            let mut copied = 0usize;
            for op in patch.0.iter() {
                if let json_patch::PatchOperation::Copy(c) = op {
                    copied += doc
                        .pointer(c.from.as_str())
                        .and_then(|v| serde_json::to_vec(v).ok())
                        .map(|v| v.len())
                        .unwrap_or(0);
                    if copied > max_copy {
                        return Err("the JSON Patch copies too much");
                    }
                }
                // On a copy of the stored resource: a failure leaves nothing to undo.
                json_patch::patch_unsafe(&mut doc, std::slice::from_ref(op))
                    .map_err(|_| "the JSON Patch does not apply to the stored resource")?;
            }
            doc
        }
        _ => return Ok(()),
    };
    if state.get("resourceType").and_then(Value::as_str) != Some(w.resource_type.as_str())
        || state.get("id").and_then(Value::as_str) != Some(w.id.as_str())
    {
        return Err("the resource's type and id must match the request");
    }
    if !resource_in_compartment(&state, patient) {
        return Err("the resource must reference the caller's patient and no other");
    }
    Ok(())
}

fn too_big() -> FilterError {
    FilterError {
        filter: "patient_compartment",
        message: "body over max_body_bytes".into(),
    }
}

fn not_found() -> LocalReply {
    LocalReply::error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such resource in the caller's patient compartment",
    )
}

fn fact_error(e: crate::FactError) -> FilterError {
    FilterError {
        filter: "patient_compartment",
        message: e.to_string(),
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

    /// Needs the verified caller (its patient context) and the gateway's FHIR classification;
    /// provides the confinement of patient-context callers; once per chain (its per-request
    /// state has one writer); confines access.
    fn declaration(&self) -> crate::Declaration {
        use crate::Capability::{Classification, PatientConfinement, Principal};
        crate::Declaration::new()
            .needs(&[Principal, Classification])
            .provides(&[PatientConfinement])
            .once()
            .confining()
    }

    async fn request_filter(
        &self,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        // Fail closed: a chain that runs this before the identity filter (or a route whose
        // identity filter let an anonymous caller through) has no verified caller to confine.
        // A caller without a patient context (a practitioner, a system) is not confined here.
        let Some(principal) = ctx.facts.get::<Principal>() else {
            return Ok(refuse(
                "no verified caller: the patient compartment cannot be applied",
            ));
        };
        let Some(patient) = principal.patient.clone() else {
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
            // The parameters are in the body: judged once it is here, before it is forwarded.
            let state = CompartmentState {
                patient,
                form_search: true,
                check_request_body: true,
                ..Default::default()
            };
            ctx.facts
                .insert(writers::PatientCompartment, state)
                .map_err(fact_error)?;
            ctx.require_whole_exchange();
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
        let verdict = if class.operation.as_deref() == Some("$export") {
            if !self.allow_bulk_export {
                Err("bulk $export is not available with a patient context on this route")
            } else if export_for(&patient, class) {
                Ok(Follow::Response)
            } else {
                Err("bulk $export must name the caller's own patient, and no other")
            }
        } else {
            judge(&patient, class)
        };
        let follow = match verdict {
            Err(detail) => return Ok(refuse(detail)),
            Ok(f) => f,
        };
        let write = (follow == Follow::Stored).then(|| WriteCheck {
            interaction: Some(class.interaction),
            resource_type: class.resource_type.clone().unwrap_or_default(),
            id: class.id.clone().unwrap_or_default(),
            content_type: req
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
            if_match: req
                .headers
                .get(header::IF_MATCH)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            ..Default::default()
        });
        let preread = write
            .as_ref()
            .map(|w| format!("/{}/{}", w.resource_type, w.id));
        let state = CompartmentState {
            patient,
            bundle: follow == Follow::BundleBody,
            check_request_body: matches!(follow, Follow::RequestBody | Follow::BundleBody)
                || write
                    .as_ref()
                    .map(|w| w.interaction != Some(Interaction::Delete))
                    .unwrap_or(false),
            check_response: follow != Follow::Nothing,
            everything: follow == Follow::Response
                && class.interaction == Interaction::OperationInstance
                && class.operation.as_deref() == Some("$everything"),
            write,
            ..Default::default()
        };
        ctx.facts
            .insert(writers::PatientCompartment, state)
            .map_err(fact_error)?;
        match preread {
            Some(path) => ctx
                .request_preread(writers::PatientCompartment, path)
                .map_err(fact_error)?,
            None if follow != Follow::Nothing => ctx.require_whole_exchange(),
            None => {}
        }
        Ok(Decision::Continue)
    }

    fn preread_filter(&self, stored: &Stored, ctx: &mut RequestCtx) -> Result<Decision> {
        let Some(st) = ctx
            .facts
            .get_mut::<CompartmentState>(writers::PatientCompartment)
        else {
            return Ok(Decision::Continue);
        };
        let patient = st.patient.clone();
        let Some(w) = st.write.as_mut() else {
            return Ok(Decision::Continue);
        };
        match stored.status {
            200 => {
                let v = serde_json::from_slice::<Value>(&stored.body).ok();
                let fits = v
                    .as_ref()
                    .map(|v| {
                        v.get("resourceType").and_then(Value::as_str)
                            == Some(w.resource_type.as_str())
                            && resource_in_compartment(v, &patient)
                    })
                    .unwrap_or(false);
                if !fits {
                    // Not the caller's: indistinguishable from a resource that does not exist.
                    return Ok(Decision::Respond(not_found()));
                }
                if let (Some(mine), Some(theirs)) = (&w.if_match, &stored.etag) {
                    if !same_etag(mine, theirs) {
                        return Ok(Decision::Respond(LocalReply::error(
                            StatusCode::PRECONDITION_FAILED,
                            "precondition_failed",
                            "If-Match does not name the current version",
                        )));
                    }
                }
                w.stored = v;
                w.stored_etag = stored.etag.clone();
                Ok(Decision::Continue)
            }
            // An update may create the resource (its body is judged); a patch or delete of
            // nothing is answered here, so nothing can slip in between.
            404 | 410 if w.interaction == Some(Interaction::Update) && w.if_match.is_none() => {
                Ok(Decision::Continue)
            }
            404 | 410 => Ok(Decision::Respond(not_found())),
            _ => Ok(Decision::Respond(LocalReply::error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "the stored resource could not be checked",
            ))),
        }
    }

    fn request_body_filter(
        &self,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        let Some(st) = ctx
            .facts
            .get_mut::<CompartmentState>(writers::PatientCompartment)
        else {
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
                    if let Some(st) = ctx
                        .facts
                        .get_mut::<CompartmentState>(writers::PatientCompartment)
                    {
                        st.check_response = follow != Follow::Nothing;
                    }
                    Ok(Decision::Continue)
                }
                Err(why) => Ok(refuse(why)),
            };
        }
        if let Some(w) = &st.write {
            let verdict = new_state(w, &body, &st.patient, self.max);
            *chunk = Some(Bytes::from(body));
            return Ok(match verdict {
                Ok(()) => Decision::Continue,
                Err(why) => refuse(why),
            });
        }
        if st.bundle {
            let parsed = crate::builtin::bundle_entries::entries(&body);
            let entries = match parsed {
                Ok(e) => e,
                Err(why) => {
                    // Put back whatever the verdict: a shadowed refusal forwards the body whole.
                    *chunk = Some(Bytes::from(body));
                    return Ok(Decision::Respond(LocalReply::error(
                        StatusCode::FORBIDDEN,
                        "patient_compartment",
                        why,
                    )));
                }
            };
            for e in &entries {
                let verdict = judge(&st.patient, &e.request).and_then(|follow| {
                    match follow {
                        Follow::BundleBody => return Err("a Bundle inside a Bundle entry"),
                        Follow::Stored => {
                            return Err(
                                "updates, patches and deletes cannot be checked inside a Bundle; send them one by one",
                            )
                        }
                        Follow::RequestBody => {
                            let fits = e
                                .resource
                                .as_ref()
                                .map(|r| {
                                    r.get("resourceType").and_then(Value::as_str)
                                        != Some("Patient")
                                        && resource_in_compartment(r, &st.patient)
                                })
                                .unwrap_or(false);
                            if !fits {
                                return Err(
                                    "the resource must reference the caller's patient and no other",
                                );
                            }
                        }
                        Follow::Nothing | Follow::Response => {}
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
        *chunk = Some(Bytes::from(body));
        if !ok {
            return Ok(refuse(
                "the resource must reference the caller's patient and no other",
            ));
        }
        Ok(Decision::Continue)
    }

    async fn upstream_request_filter(
        &self,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(st) = ctx.facts.get::<CompartmentState>() else {
            return Ok(());
        };
        // Responses are read as plain JSON.
        req.remove_header(&header::ACCEPT_ENCODING);
        // A change applies only to the version that was judged.
        if let Some(etag) = st.write.as_ref().and_then(|w| w.stored_etag.as_deref()) {
            if !req.headers.contains_key(header::IF_MATCH) {
                if let Ok(v) = http::HeaderValue::from_str(etag) {
                    let _ = req.insert_header(header::IF_MATCH, v);
                }
            }
        }
        Ok(())
    }

    fn response_filter(&self, resp: &mut ResponseHeader, ctx: &mut RequestCtx) -> Result<()> {
        let status = resp.status.as_u16();
        let head = ctx.method == "HEAD";
        let empty = resp
            .headers
            .get(header::CONTENT_LENGTH)
            .map(|v| v.as_bytes() == b"0")
            .unwrap_or(false);
        let Some(st) = ctx
            .facts
            .get_mut::<CompartmentState>(writers::PatientCompartment)
        else {
            return Ok(());
        };
        if head || empty || !st.check_response || !(200..300).contains(&status) || status == 204 {
            st.check_response = false;
            return Ok(());
        }
        let json = crate::builtin::body::is_json(resp);
        let encoded = crate::builtin::body::is_encoded(resp);
        if !json || encoded {
            // Nothing this filter can judge is ever passed unchecked.
            ctx.refuse_response(LocalReply::error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "the upstream response cannot be checked for the patient compartment",
            ));
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
        let Some(st) = ctx
            .facts
            .get_mut::<CompartmentState>(writers::PatientCompartment)
        else {
            return Ok(());
        };
        if !st.check_response {
            return Ok(());
        }
        if !crate::builtin::body::hold(&mut st.response_body, chunk, self.max) {
            st.check_response = false;
            ctx.refuse_response(LocalReply::error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "the upstream response is larger than this route checks",
            ));
            return Err(too_big());
        }
        if end_of_stream {
            let body = std::mem::take(&mut st.response_body);
            st.check_response = false;
            let verdict = check_body(&body, &st.patient, st.everything);
            // The held body goes back whatever the verdict: a refusal in shadow mode releases
            // it whole (in enforce the gateway discards it and answers the refusal).
            *chunk = Some(Bytes::from(body));
            if let Err(why) = verdict {
                ctx.refuse_response(not_found());
                return Err(FilterError {
                    filter: "patient_compartment",
                    message: format!(
                        "the response holds data outside the caller's compartment ({why}); refused"
                    ),
                });
            }
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
            // Includes are allowed: every returned entry is checked on the response.
            (
                "GET",
                "/Observation",
                "patient=A&_include=Observation:subject",
            ),
            ("GET", "/Patient", "_id=A&_revinclude=Observation:subject"),
            // Changes by id are judged against the stored resource (a pre-read).
            ("PUT", "/Observation/1", ""),
            ("PATCH", "/Observation/1", ""),
            ("DELETE", "/Observation/1", ""),
            ("PUT", "/Patient/A", ""),
        ];
        for (m, p, q) in ok {
            assert!(judge("A", &class(m, p, q)).is_ok(), "{m} {p}?{q}");
        }
        let refused = [
            ("GET", "/Patient/B", ""),
            ("GET", "/Observation", "patient=B"),
            ("GET", "/Observation", "patient=A,B"),
            ("GET", "/Observation", ""),
            ("GET", "/Observation", "subject.name=Smith"),
            ("GET", "/Patient", "_has:Observation:patient:code=1234"),
            ("GET", "/Patient/B/$everything", ""),
            ("GET", "/Patient/B/Observation", ""),
            ("GET", "/Patient", "name=Smith"),
            ("GET", "/Observation", "patient=A&performer=Patient/B"),
            ("PUT", "/Patient/B", ""),
            ("DELETE", "/Patient/B", ""),
            ("PUT", "/Observation", "code=1234"),
            ("DELETE", "/Observation", "patient=A"),
            ("PUT", "/Practitioner/1", ""),
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
        // A contained Patient cannot be identified: never in the compartment.
        let contained = json!({"resourceType": "Observation", "subject": {"reference": "Patient/A"},
            "contained": [{"resourceType": "Patient", "id": "p1", "name": [{"family": "B"}]}]});
        assert!(!resource_in_compartment(&contained, "A"));
        // A Patient that links another patient is not A's alone.
        let linked = json!({"resourceType": "Patient", "id": "A", "link": [{"other": {"reference": "Patient/B"}, "type": "seealso"}]});
        assert!(!resource_in_compartment(&linked, "A"));
        // Include entries are checked like match entries.
        let included = json!({"resourceType": "Bundle", "type": "searchset", "entry": [
            {"resource": own, "search": {"mode": "match"}},
            {"resource": {"resourceType": "Patient", "id": "B"}, "search": {"mode": "include"}}]});
        assert!(!body_in_compartment(included.to_string().as_bytes(), "A"));
    }

    fn entry(resource: Value, mode: &str) -> Value {
        let ty = resource["resourceType"].as_str().unwrap_or("X").to_string();
        let id = resource["id"].as_str().unwrap_or("x").to_string();
        json!({"fullUrl": format!("http://fhir.test/{ty}/{id}"), "resource": resource, "search": {"mode": mode}})
    }

    fn searchset(entries: Vec<Value>) -> Vec<u8> {
        json!({"resourceType": "Bundle", "type": "searchset", "entry": entries})
            .to_string()
            .into_bytes()
    }

    fn encounter(id: &str, patient: &str) -> Value {
        json!({"resourceType": "Encounter", "id": id, "status": "finished",
            "subject": {"reference": format!("Patient/{patient}")},
            "participant": [{"individual": {"reference": "Practitioner/pr1"}}],
            "serviceProvider": {"reference": "Organization/org1"}})
    }

    fn practitioner(id: &str) -> Value {
        json!({"resourceType": "Practitioner", "id": id, "name": [{"family": "Kassulke"}]})
    }

    fn organization(id: &str) -> Value {
        json!({"resourceType": "Organization", "id": id, "name": "Clinic"})
    }

    #[test]
    fn standing_follows_the_compartment_definition() {
        use Standing::*;
        let cases = [
            (json!({"resourceType": "Patient", "id": "A"}), Own),
            (json!({"resourceType": "Patient", "id": "B"}), Foreign),
            (encounter("e1", "A"), Own),
            (encounter("e1", "B"), Foreign),
            (
                json!({"resourceType": "OperationOutcome", "issue": []}),
                Own,
            ),
            // Types outside the compartment that reference no patient.
            (practitioner("pr1"), Outside),
            (organization("org1"), Outside),
            (
                json!({"resourceType": "Location", "id": "l1", "managingOrganization": {"reference": "Organization/org1"}}),
                Outside,
            ),
            (
                json!({"resourceType": "Medication", "id": "m1", "contained": [{"resourceType": "Substance", "id": "s"}]}),
                Outside,
            ),
            (
                json!({"resourceType": "PractitionerRole", "id": "r1", "practitioner": {"reference": "Practitioner/pr1"}}),
                Outside,
            ),
            // An outside type that references a patient is that patient's.
            (
                json!({"resourceType": "Device", "id": "d1", "patient": {"reference": "Patient/A"}}),
                Own,
            ),
            (
                json!({"resourceType": "Device", "id": "d1", "patient": {"reference": "Patient/B"}}),
                Foreign,
            ),
            (
                json!({"resourceType": "Practitioner", "id": "pr1", "extension": [{"url": "x", "valueReference": {"reference": "http://fhir.test/Patient/B"}}]}),
                Foreign,
            ),
            // An embedded Patient, anywhere: the compartment cannot tell who that is.
            (
                json!({"resourceType": "Organization", "id": "o", "contained": [{"resourceType": "Patient", "id": "p"}]}),
                Foreign,
            ),
            (
                json!({"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/A"},
                "contained": [{"resourceType": "List", "id": "l", "contained": [{"resourceType": "Patient", "id": "p"}]}]}),
                Foreign,
            ),
            (
                json!({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Patient", "id": "A"}}]}),
                Foreign,
            ),
            // A compartment-type resource of no patient, also inside an outside type.
            (
                json!({"resourceType": "Encounter", "id": "e", "status": "finished"}),
                Foreign,
            ),
            (
                json!({"resourceType": "Practitioner", "id": "pr", "contained": [{"resourceType": "Observation", "id": "o", "status": "final"}]}),
                Foreign,
            ),
            // Group, Person and RelatedPerson are in the compartment.
            (
                json!({"resourceType": "Group", "id": "g", "member": [{"entity": {"reference": "Patient/A"}}, {"entity": {"reference": "Patient/B"}}]}),
                Foreign,
            ),
            (
                json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true}),
                Foreign,
            ),
            (
                json!({"resourceType": "Person", "id": "p", "link": [{"target": {"reference": "Patient/B"}}]}),
                Foreign,
            ),
            (
                json!({"resourceType": "RelatedPerson", "id": "rp", "patient": {"reference": "Patient/A"}}),
                Own,
            ),
            (
                json!({"resourceType": "RelatedPerson", "id": "rp", "patient": {"reference": "Patient/B"}}),
                Foreign,
            ),
            // Contained resources of the caller's own resource share its patient (a Synthea
            // ExplanationOfBenefit contains a Coverage that references no patient).
            (
                json!({"resourceType": "ExplanationOfBenefit", "id": "eob", "patient": {"reference": "Patient/A"},
                "contained": [{"resourceType": "Coverage", "id": "coverage", "status": "active"}],
                "insurance": [{"coverage": {"reference": "#coverage"}}]}),
                Own,
            ),
            (json!({"id": "x"}), Foreign),
        ];
        for (r, want) in cases {
            assert_eq!(standing(&r, "A"), want, "{r}");
        }
    }

    #[test]
    fn outside_types_come_with_the_callers_own_data() {
        let ok = |body: &[u8], everything: bool| check_body(body, "A", everything);
        // `Encounter?patient=A&_include=Encounter:participant`: included Practitioner.
        let incl = searchset(vec![
            entry(encounter("e1", "A"), "match"),
            entry(practitioner("pr1"), "include"),
        ]);
        assert_eq!(ok(&incl, false), Ok(()));
        // `$everything`: the Organization and Practitioner the caller's resources reference.
        let everything = searchset(vec![
            entry(json!({"resourceType": "Patient", "id": "A"}), "match"),
            entry(encounter("e1", "A"), "match"),
            entry(practitioner("pr1"), "include"),
            entry(organization("org1"), "include"),
        ]);
        assert_eq!(ok(&everything, true), Ok(()));
        assert!(body_in_compartment(&everything, "A"));
        // An outside-type entry in `match` mode is released only when the caller's entries
        // reference it (by `Type/id` under any base, versioned or not), directly or through
        // another released entry; in `$everything` always.
        let referenced = searchset(vec![
            entry(
                json!({"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/A"},
                "participant": [{"individual": {"reference": "http://other.test/fhir/PractitionerRole/r1/_history/3"}}]}),
                "match",
            ),
            entry(
                json!({"resourceType": "PractitionerRole", "id": "r1", "practitioner": {"reference": "Practitioner/pr1"}}),
                "match",
            ),
            entry(practitioner("pr1"), "match"),
        ]);
        assert_eq!(ok(&referenced, false), Ok(()));
        let by_full_url = json!({"resourceType": "Bundle", "type": "searchset", "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Observation", "subject": {"reference": "Patient/A"}, "performer": [{"reference": "urn:uuid:2"}]}},
            {"fullUrl": "urn:uuid:2", "resource": {"resourceType": "Practitioner"}}]});
        assert_eq!(ok(by_full_url.to_string().as_bytes(), false), Ok(()));
        let unreferenced = searchset(vec![
            entry(encounter("e1", "A"), "match"),
            entry(practitioner("pr9"), "match"),
        ]);
        assert!(ok(&unreferenced, false).is_err());
        assert_eq!(ok(&unreferenced, true), Ok(()));
        // Nothing but outside types: no own entry references them.
        let strays = searchset(vec![
            entry(practitioner("pr1"), "match"),
            entry(organization("org1"), "match"),
        ]);
        assert!(ok(&strays, false).is_err());
        // A single resource of an outside type is never released.
        assert!(ok(practitioner("pr1").to_string().as_bytes(), false).is_err());
        assert!(ok(practitioner("pr1").to_string().as_bytes(), true).is_err());
    }

    #[test]
    fn another_patients_data_is_refused_wherever_it_is() {
        let base = || {
            vec![
                entry(json!({"resourceType": "Patient", "id": "A"}), "match"),
                entry(encounter("e1", "A"), "match"),
                entry(practitioner("pr1"), "include"),
                entry(organization("org1"), "include"),
            ]
        };
        let spliced = [
            // (a) another Patient
            entry(json!({"resourceType": "Patient", "id": "B"}), "match"),
            entry(json!({"resourceType": "Patient", "id": "B"}), "include"),
            // (b) another patient's resource as an include
            entry(
                json!({"resourceType": "Observation", "id": "ob", "status": "final", "subject": {"reference": "Patient/B"}}),
                "include",
            ),
            entry(encounter("eb", "B"), "include"),
            // (c) an outside type that contains a Patient, or another patient's resource
            entry(
                json!({"resourceType": "Organization", "id": "org1", "contained": [{"resourceType": "Patient", "id": "p", "name": [{"family": "B"}]}]}),
                "include",
            ),
            entry(
                json!({"resourceType": "Practitioner", "id": "pr2", "contained": [{"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/B"}}]}),
                "include",
            ),
            // (d) a compartment-type resource of no patient
            entry(
                json!({"resourceType": "Observation", "id": "o2", "status": "final"}),
                "match",
            ),
            entry(
                json!({"resourceType": "Encounter", "id": "e2", "status": "finished"}),
                "include",
            ),
            // a Group or Person linking another patient; a RelatedPerson of another patient
            entry(
                json!({"resourceType": "Group", "id": "g", "member": [{"entity": {"reference": "Patient/A"}}, {"entity": {"reference": "Patient/B"}}]}),
                "include",
            ),
            entry(
                json!({"resourceType": "Person", "id": "p", "link": [{"target": {"reference": "Patient/B"}}]}),
                "include",
            ),
            entry(
                json!({"resourceType": "RelatedPerson", "id": "rp", "patient": {"reference": "Patient/B"}}),
                "include",
            ),
            // an outside type that references another patient
            entry(
                json!({"resourceType": "Device", "id": "d", "patient": {"reference": "Patient/B"}}),
                "include",
            ),
            // a nested Bundle carrying a Patient
            entry(
                json!({"resourceType": "Bundle", "id": "nb", "type": "collection", "entry": [{"resource": {"resourceType": "Patient", "id": "B"}}]}),
                "include",
            ),
        ];
        assert_eq!(check_body(&searchset(base()), "A", true), Ok(()));
        for extra in spliced {
            let mut es = base();
            es.push(extra.clone());
            let body = searchset(es);
            assert!(check_body(&body, "A", true).is_err(), "{extra}");
            assert!(check_body(&body, "A", false).is_err(), "{extra}");
        }
        // A resource outside the entries' `resource` (a Patient as an entry's outcome).
        let stray = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"resource": encounter("e1", "A"), "response": {"status": "200", "outcome": {"resourceType": "Patient", "id": "B"}}}]});
        assert!(check_body(stray.to_string().as_bytes(), "A", true).is_err());
        let outcome = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"response": {"status": "404", "outcome": {"resourceType": "OperationOutcome", "issue": []}}}]});
        assert_eq!(
            check_body(outcome.to_string().as_bytes(), "A", false),
            Ok(())
        );
    }

    fn patient_principal(patient: &str) -> Principal {
        Principal {
            subject: format!("user-{patient}"),
            issuer: Some("https://patients.test".into()),
            client_id: None,
            roles: vec![],
            scopes: vec![],
            tenant: None,
            patient: Some(patient.into()),
            fhir_user: None,
            method: crate::identity::AuthMethod::Token,
            system: None,
            expires_at: None,
        }
    }

    #[tokio::test]
    async fn everything_releases_what_it_returns() {
        let filter = build(
            serde_yaml::from_str("{}").unwrap(),
            &BuildContext::default(),
        )
        .unwrap();
        for (path, query, everything) in [
            ("/Patient/A/$everything", "_count=20", true),
            ("/Patient/A/$everything", "_count=20&_cursor=abc", true),
            (
                "/Encounter",
                "patient=A&_include=Encounter:participant",
                false,
            ),
            ("/Patient/A/Encounter", "", false),
        ] {
            let mut ctx = RequestCtx::for_test("GET", path);
            ctx.facts
                .insert(writers::JwtAuth, patient_principal("A"))
                .unwrap();
            ctx.facts
                .insert(writers::Gateway, class("GET", path, query))
                .unwrap();
            let target = format!("{path}?{query}");
            let mut req = RequestHeader::build("GET", target.as_bytes(), None).unwrap();
            let d = filter.request_filter(&mut req, &mut ctx).await.unwrap();
            assert!(matches!(d, Decision::Continue), "{target}");
            let st = ctx.facts.get::<CompartmentState>().unwrap();
            assert!(st.check_response, "{target}");
            assert_eq!(st.everything, everything, "{target}");
        }
    }

    fn write(
        interaction: Interaction,
        ty: &str,
        id: &str,
        ct: &str,
        stored: Option<Value>,
    ) -> WriteCheck {
        WriteCheck {
            interaction: Some(interaction),
            resource_type: ty.into(),
            id: id.into(),
            content_type: ct.into(),
            if_match: None,
            stored,
            stored_etag: None,
        }
    }

    #[test]
    fn new_states_of_changes_by_id() {
        let stored = json!({"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/A"}});
        let upd = write(
            Interaction::Update,
            "Observation",
            "o1",
            "application/fhir+json",
            None,
        );
        let mine = json!({"resourceType": "Observation", "id": "o1", "status": "amended", "subject": {"reference": "Patient/A"}});
        assert_eq!(
            new_state(&upd, mine.to_string().as_bytes(), "A", 1 << 20),
            Ok(())
        );
        let moved = json!({"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/B"}});
        assert!(new_state(&upd, moved.to_string().as_bytes(), "A", 1 << 20).is_err());
        let other_id = json!({"resourceType": "Observation", "id": "o2", "subject": {"reference": "Patient/A"}});
        assert!(new_state(&upd, other_id.to_string().as_bytes(), "A", 1 << 20).is_err());
        assert!(new_state(&upd, b"not json", "A", 1 << 20).is_err());

        let p = write(
            Interaction::Patch,
            "Observation",
            "o1",
            "application/json-patch+json",
            Some(stored.clone()),
        );
        let ok = json!([{"op": "replace", "path": "/status", "value": "amended"}]);
        assert_eq!(
            new_state(&p, ok.to_string().as_bytes(), "A", 1 << 20),
            Ok(())
        );
        let to_b = json!([{"op": "replace", "path": "/subject/reference", "value": "Patient/B"}]);
        assert!(new_state(&p, to_b.to_string().as_bytes(), "A", 1 << 20).is_err());
        let add_b =
            json!([{"op": "add", "path": "/performer", "value": [{"reference": "Patient/B"}]}]);
        assert!(new_state(&p, add_b.to_string().as_bytes(), "A", 1 << 20).is_err());
        let drop_subject = json!([{"op": "remove", "path": "/subject"}]);
        assert!(new_state(&p, drop_subject.to_string().as_bytes(), "A", 1 << 20).is_err());
        let bad = json!([{"op": "replace", "path": "/nope/deeper", "value": 1}]);
        assert!(new_state(&p, bad.to_string().as_bytes(), "A", 1 << 20).is_err());
        let blow_up: Vec<Value> = (0..40)
            .map(|i| json!({"op": "copy", "from": "", "path": format!("/x{i}")}))
            .collect();
        assert_eq!(
            new_state(
                &p,
                serde_json::to_vec(&blow_up).unwrap().as_slice(),
                "A",
                1 << 20
            ),
            Err("the JSON Patch copies too much")
        );
        let fhirpath = write(
            Interaction::Patch,
            "Observation",
            "o1",
            "application/fhir+json",
            Some(stored),
        );
        let params = json!({"resourceType": "Parameters", "parameter": []});
        assert!(new_state(&fhirpath, params.to_string().as_bytes(), "A", 1 << 20).is_err());
        assert!(same_etag("W/\"3\"", "\"3\""));
        assert!(!same_etag("W/\"3\"", "W/\"4\""));
    }

    #[test]
    fn bulk_export_for_the_callers_own_patient_only() {
        assert!(export_for(
            "A",
            &class("GET", "/Patient/$export", "patient=Patient/A")
        ));
        assert!(export_for(
            "A",
            &class("GET", "/Group/g1/$export", "patient=A")
        ));
        assert!(!export_for("A", &class("GET", "/Patient/$export", "")));
        assert!(!export_for(
            "A",
            &class("GET", "/Patient/$export", "patient=A,B")
        ));
        assert!(!export_for("A", &class("GET", "/$export", "patient=A")));
        assert!(judge("A", &class("GET", "/Patient/$export", "patient=A")).is_err());
    }
}
