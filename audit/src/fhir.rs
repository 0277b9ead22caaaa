//! FHIR R4 `AuditEvent` output, following the IHE Basic Audit Log Patterns (BALP) RESTful
//! profiles.
//!
//! # Mapping
//!
//! | AuditEvent element | value |
//! | --- | --- |
//! | `type` | `http://terminology.hl7.org/CodeSystem/audit-event-type#rest` "Restful Operation" (fixed by every BALP RESTful profile) |
//! | `subtype` | `http://hl7.org/fhir/restful-interaction#<interaction>`: [`crate::Action::interaction`] mapped to the code system by [`restful_code`] (`search-compartment` → `search`, `operation-*` → `operation`, `conditional-update` → `update`, `batch-or-transaction` → `batch`), else derived from the method (GET/HEAD with an id: `read`, GET without: `search-type` / `search-system`, POST: `create`, PUT: `update`, PATCH: `patch`, DELETE: `delete`) |
//! | `action` | `R` read, vread, history, capabilities; `E` search and operations (BALP Query uses `E`); `C` create; `U` update, patch; `D` delete |
//! | `recorded` | [`crate::AuditRecord::time`] |
//! | `outcome` | `0` success (status below 400, or unknown for an access/completion record), `4` minor failure (4xx, or a denied record without a status), `8` serious failure (5xx) |
//! | `outcomeDesc` | [`crate::Outcome::reason`] |
//! | `agent` client | who = `identifier.value` client id (else the system name, else `unknown`), `who.display` the client certificate subject; network = source address, type `2` (IP) |
//! | `agent` server | who = `caregate:<listener>`, `requestor` false |
//! | `agent` user | when a human subject is known (a subject that is neither the client id nor the system name): who = `identifier {system: issuer, value: subject}`, `requestor` true, `role` = roles (as text), no network |
//! | `source` | `observer.display` "caregate", `type` = `http://terminology.hl7.org/CodeSystem/security-source-type#4` "Application Server" |
//! | `entity` transaction | `type` = `https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType#XrequestId`, `what.identifier.value` = the request id |
//! | `entity` patient | one per patient the record names (`patient`, `patients`): `what.reference` `Patient/<id>`, type `audit-entity-type#1` Person, role `object-role#1` Patient |
//! | `entity` data | reads and writes: `what.reference` `<Type>/<id>` (or `what.type` alone when no id), type `#2` System Object, role `object-role#4` Domain Resource |
//! | `entity` query | searches: type `#2`, role `object-role#24` Query, `description` naming the search (never the query string) |
//! | `extension` | caregate details (`urn:caregate:audit:<name>`): phase, method, route, listener, channel, tenant, auth-method, http-status, bytes, duration-ms, upstream-pool, upstream-zone; for an emergency access (break-the-glass, [`crate::BreakGlassUse`]): `break-glass` (`valueBoolean` true: the flag), `break-glass-reason` (`valueString`, the caller's reason), `break-glass-overrode` (`valueCode`, one per thing overridden: `tenant`, `mask`, ...), `break-glass-from-grant` (`valueBoolean` true, when an earlier claim's grant covered the request) |
//! | `purposeOfEvent` | emergency access only: the PurposeOfUse claimed, `http://terminology.hl7.org/CodeSystem/v3-ActReason#<purpose>` (e.g. `ETREAT`) |
//! | `agent` requestor `purposeOfUse` | emergency access only: the same coding, on the agent that made the request (the user agent, else the client agent) |
//!
//! Agent types follow the profiles: `Read` has the client as DICOM `110152` "Destination Role
//! ID" and the server as `110153` "Source Role ID" (data flows to the client); `Query`,
//! `Create` and `Update` the other way round; `Delete` has the client as DICOM `110150`
//! "Application" and the server as `provenance-participant-type#custodian`. The user agent is
//! `v3-ParticipationType#IRCP` "information recipient" for reads and queries, `#AUT` "author"
//! for create, update and delete.
//!
//! # What the BALP profiles require, and what is emitted
//!
//! - `IHE.BasicAudit.Read` / `PatientRead`: type `rest`; subtype `read`/`vread`; action `R`;
//!   recorded; outcome `0`; agent client (who, network) and server (who, network), user
//!   optional (who, requestor true); entity data (type 2, role from RestObjectRoles, what),
//!   transaction optional; PatientRead adds entity patient (type 1, role 1, what
//!   `Reference(Patient)`). Emitted, except the server's `network` (the gateway does not know
//!   the address the client used; the listener name is in `who`).
//! - `IHE.BasicAudit.Query` / `PatientQuery`: as Read with subtype `search*`, action `E` and
//!   client/server roles swapped; entity query (type 2, role 24) with `query` (base64 of the
//!   raw request) 1..1. Emitted, except `entity[query].query`: caregate never records query
//!   strings (they carry PHI such as names and birth dates); `description` names the search
//!   instead. PatientQuery adds entity patient: emitted when the patient is known.
//! - `IHE.BasicAudit.Create`/`Update`/`Delete` and their `Patient*` variants: subtype
//!   `create` / `update`|`patch` / `delete`, action `C`/`U`/`D`, agents as above (user type
//!   from Author/Informant/Custodian: `AUT`), entity data, patient for the `Patient*`
//!   variants. Emitted as required, with the same server-network exception.
//! - The profiles describe successful events (outcome `0`); denied and failed requests use
//!   the same shape with outcome `4`/`8` and `outcomeDesc`, as the profiles suggest.
//!
//! No `meta.profile` is claimed, because of the two deliberate gaps above.

use serde_json::{json, Map, Value};

use crate::record::{AuditRecord, Phase};

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
const RESTFUL_INTERACTION: &str = "http://hl7.org/fhir/restful-interaction";
const PARTICIPATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
const PROVENANCE_PARTICIPANT: &str =
    "http://terminology.hl7.org/CodeSystem/provenance-participant-type";
const SOURCE_TYPE: &str = "http://terminology.hl7.org/CodeSystem/security-source-type";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
const BALP_ENTITY_TYPE: &str = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType";
/// The code system of HL7 PurposeOfUse codes (`ETREAT`, `BTG`, ...).
pub const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
/// Prefix of caregate's own extension URLs.
pub const EXTENSION_PREFIX: &str = "urn:caregate:audit:";

/// The FHIR restful interaction of a record: the explicit one, else derived from the method.
pub fn interaction_of(rec: &AuditRecord) -> Option<String> {
    if let Some(i) = &rec.action.interaction {
        if !i.is_empty() {
            return Some(i.clone());
        }
    }
    let a = &rec.action;
    let has_id = a.resource_id.as_deref().is_some_and(|s| !s.is_empty());
    let has_type = a.resource_type.as_deref().is_some_and(|s| !s.is_empty());
    let i = match a.method.to_ascii_uppercase().as_str() {
        "GET" | "HEAD" if has_id => "read",
        "GET" | "HEAD" if has_type => "search-type",
        "GET" | "HEAD" => "search-system",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => return None,
    };
    Some(i.to_string())
}

/// The code of `http://hl7.org/fhir/restful-interaction` for a recorded interaction: the
/// gateway records finer ones (`search-compartment`, `operation-instance`,
/// `conditional-update`, ...) than the code system has.
pub fn restful_code(interaction: &str) -> &str {
    match interaction {
        "search-compartment" => "search",
        "batch-or-transaction" => "batch",
        i if i.starts_with("operation") => "operation",
        i => i.strip_prefix("conditional-").unwrap_or(i),
    }
}

/// The AuditEvent `action` code for an interaction (or, when unknown, for the method).
pub fn action_code(interaction: Option<&str>, method: &str) -> &'static str {
    match interaction {
        Some("read" | "vread" | "capabilities") => "R",
        Some(i) if i.starts_with("history") => "R",
        Some(i) if i.starts_with("search") => "E",
        Some(i) if i.starts_with("operation") => "E",
        Some("batch" | "transaction" | "batch-or-transaction") => "E",
        Some("create" | "conditional-create") => "C",
        Some("update" | "patch" | "conditional-update" | "conditional-patch") => "U",
        Some("delete" | "conditional-delete") => "D",
        _ => match method.to_ascii_uppercase().as_str() {
            "GET" | "HEAD" => "R",
            "POST" => "C",
            "PUT" | "PATCH" => "U",
            "DELETE" => "D",
            _ => "E",
        },
    }
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({ "system": system, "code": code, "display": display })
}

fn ext(name: &str, key: &str, value: Value) -> Value {
    let mut m = Map::new();
    m.insert(
        "url".into(),
        Value::String(format!("{EXTENSION_PREFIX}{name}")),
    );
    m.insert(key.into(), value);
    Value::Object(m)
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

/// FHIR `string`s must not be empty; `code`s must not contain leading/trailing whitespace.
fn push_str_ext(exts: &mut Vec<Value>, name: &str, key: &str, v: &str) {
    let v = v.trim();
    if !v.is_empty() {
        exts.push(ext(name, key, Value::String(v.to_string())));
    }
}

/// The record as a FHIR R4 `AuditEvent` (IHE BALP shape; see the module docs).
pub fn to_fhir_audit_event(rec: &AuditRecord) -> Value {
    let a = &rec.action;
    let actor = &rec.actor;
    let interaction = interaction_of(rec);
    let action = action_code(interaction.as_deref(), &a.method);
    let is_query = interaction
        .as_deref()
        .is_some_and(|i| i.starts_with("search"));

    let mut ev = Map::new();
    ev.insert("resourceType".into(), json!("AuditEvent"));

    // Extensions: caregate's details.
    let mut exts = Vec::new();
    exts.push(ext("phase", "valueCode", json!(rec.phase.as_str())));
    push_str_ext(&mut exts, "method", "valueCode", &a.method);
    push_str_ext(&mut exts, "route", "valueString", &a.route);
    push_str_ext(&mut exts, "listener", "valueString", &a.listener);
    push_str_ext(&mut exts, "channel", "valueCode", &a.channel);
    if let Some(t) = non_empty(&actor.tenant) {
        push_str_ext(&mut exts, "tenant", "valueString", t);
    }
    if let Some(m) = non_empty(&actor.auth_method) {
        push_str_ext(&mut exts, "auth-method", "valueCode", m);
    }
    if let Some(s) = rec.outcome.status {
        exts.push(ext("http-status", "valueInteger", json!(s)));
    }
    if let Some(b) = rec.outcome.bytes {
        exts.push(ext("bytes", "valueDecimal", json!(b)));
    }
    if let Some(d) = rec.outcome.duration_ms {
        exts.push(ext("duration-ms", "valueDecimal", json!(d)));
    }
    if let Some(up) = &rec.upstream {
        push_str_ext(&mut exts, "upstream-pool", "valueString", &up.pool);
        if let Some(z) = non_empty(&up.zone) {
            push_str_ext(&mut exts, "upstream-zone", "valueString", z);
        }
    }
    // Emergency access: the flag, the reason, what it overrode, whether a grant covered it.
    let bg = rec.break_glass.as_ref();
    if let Some(bg) = bg {
        exts.push(ext("break-glass", "valueBoolean", json!(true)));
        push_str_ext(&mut exts, "break-glass-reason", "valueString", &bg.reason);
        for o in &bg.overrode {
            push_str_ext(&mut exts, "break-glass-overrode", "valueCode", o);
        }
        if bg.from_grant {
            exts.push(ext("break-glass-from-grant", "valueBoolean", json!(true)));
        }
    }
    ev.insert("extension".into(), Value::Array(exts));
    // The PurposeOfUse claimed (a FHIR code: no surrounding white space, never empty).
    let purpose: Option<Value> = bg
        .map(|bg| bg.purpose.trim())
        .filter(|p| !p.is_empty())
        .map(|p| json!([{ "coding": [{ "system": ACT_REASON, "code": p }] }]));

    if rec.phase == Phase::Admin {
        // A change of the gateway's own configuration (a reload): DICOM's Security Alert,
        // subtype Software Configuration, not a RESTful interaction.
        ev.insert("type".into(), coding(DCM, "110113", "Security Alert"));
        ev.insert(
            "subtype".into(),
            json!([coding(DCM, "110131", "Software Configuration")]),
        );
    } else {
        ev.insert(
            "type".into(),
            coding(EVENT_TYPE, "rest", "Restful Operation"),
        );
        if let Some(i) = &interaction {
            let code = restful_code(i);
            ev.insert(
                "subtype".into(),
                json!([coding(RESTFUL_INTERACTION, code, code)]),
            );
        }
    }
    ev.insert("action".into(), json!(action));
    ev.insert("recorded".into(), json!(rec.time));
    let outcome = match (rec.outcome.status, rec.phase) {
        (Some(s), _) if s >= 500 => "8",
        (Some(s), _) if s >= 400 => "4",
        (Some(_), _) => "0",
        (None, Phase::Denied) => "4",
        (None, _) => "0",
    };
    ev.insert("outcome".into(), json!(outcome));
    if let Some(r) = non_empty(&rec.outcome.reason) {
        ev.insert("outcomeDesc".into(), json!(r));
    }
    if let Some(p) = &purpose {
        ev.insert("purposeOfEvent".into(), p.clone());
    }

    // Agents.
    let (client_type, server_type) = match action {
        "R" => (
            coding(DCM, "110152", "Destination Role ID"),
            coding(DCM, "110153", "Source Role ID"),
        ),
        "D" => (
            coding(DCM, "110150", "Application"),
            coding(PROVENANCE_PARTICIPANT, "custodian", "Custodian"),
        ),
        _ => (
            coding(DCM, "110153", "Source Role ID"),
            coding(DCM, "110152", "Destination Role ID"),
        ),
    };
    let subject = non_empty(&actor.subject);
    let client_name = non_empty(&actor.client_id).or(non_empty(&actor.system));
    let human = subject.filter(|s| {
        Some(*s) != non_empty(&actor.client_id) && Some(*s) != non_empty(&actor.system)
    });
    let mut agents = Vec::new();
    if let Some(user) = human {
        let mut ident = Map::new();
        if let Some(iss) = non_empty(&actor.issuer).filter(|s| !s.contains(char::is_whitespace)) {
            ident.insert("system".into(), json!(iss));
        }
        ident.insert("value".into(), json!(user));
        let user_type = if matches!(action, "R" | "E") {
            coding(PARTICIPATION, "IRCP", "information recipient")
        } else {
            coding(PARTICIPATION, "AUT", "author")
        };
        let mut agent = Map::new();
        agent.insert("type".into(), json!({ "coding": [user_type] }));
        let roles: Vec<Value> = actor
            .roles
            .iter()
            .filter(|r| !r.trim().is_empty())
            .map(|r| json!({ "text": r }))
            .collect();
        if !roles.is_empty() {
            agent.insert("role".into(), Value::Array(roles));
        }
        agent.insert("who".into(), json!({ "identifier": Value::Object(ident) }));
        agent.insert("requestor".into(), json!(true));
        if let Some(p) = &purpose {
            agent.insert("purposeOfUse".into(), p.clone());
        }
        agents.push(Value::Object(agent));
    }
    {
        let mut who = Map::new();
        who.insert(
            "identifier".into(),
            json!({ "value": client_name.unwrap_or("unknown") }),
        );
        if let Some(cs) = non_empty(&actor.client_certificate_subject) {
            who.insert("display".into(), json!(cs));
        }
        let mut agent = Map::new();
        agent.insert("type".into(), json!({ "coding": [client_type] }));
        agent.insert("who".into(), Value::Object(who));
        if let (Some(sys), Some(_)) = (non_empty(&actor.system), non_empty(&actor.client_id)) {
            agent.insert("name".into(), json!(sys));
        }
        agent.insert("requestor".into(), json!(human.is_none()));
        if let (Some(p), None) = (&purpose, human) {
            agent.insert("purposeOfUse".into(), p.clone());
        }
        if let Some(addr) = non_empty(&actor.source_address) {
            agent.insert("network".into(), json!({ "address": addr, "type": "2" }));
        }
        agents.push(Value::Object(agent));
    }
    {
        let listener = a.listener.trim();
        let who = if listener.is_empty() {
            "caregate".to_string()
        } else {
            format!("caregate:{listener}")
        };
        agents.push(json!({
            "type": { "coding": [server_type] },
            "who": { "identifier": { "value": who }, "display": "caregate" },
            "requestor": false,
        }));
    }
    ev.insert("agent".into(), Value::Array(agents));

    ev.insert(
        "source".into(),
        json!({
            "observer": { "display": "caregate" },
            "type": [coding(SOURCE_TYPE, "4", "Application Server")],
        }),
    );

    // Entities.
    let mut entities = Vec::new();
    if !rec.request_id.trim().is_empty() {
        entities.push(json!({
            "what": { "identifier": { "value": rec.request_id } },
            "type": { "system": BALP_ENTITY_TYPE, "code": "XrequestId" },
        }));
    }
    // One BALP patient entity per patient the record names.
    let mut named: Vec<&str> = Vec::new();
    for p in non_empty(&a.patient)
        .into_iter()
        .chain(a.patients.iter().map(String::as_str))
    {
        if !p.trim().is_empty() && !named.contains(&p) {
            named.push(p);
        }
    }
    for p in named {
        entities.push(json!({
            "what": { "reference": format!("Patient/{p}") },
            "type": coding(ENTITY_TYPE, "1", "Person"),
            "role": coding(OBJECT_ROLE, "1", "Patient"),
        }));
    }
    let rtype = non_empty(&a.resource_type);
    if is_query {
        let what = match (rtype, interaction.as_deref()) {
            (Some(t), Some(i)) => format!("{i} {t} (parameters not recorded)"),
            (None, Some(i)) => format!("{i} (parameters not recorded)"),
            _ => "search (parameters not recorded)".to_string(),
        };
        entities.push(json!({
            "type": coding(ENTITY_TYPE, "2", "System Object"),
            "role": coding(OBJECT_ROLE, "24", "Query"),
            "description": what,
        }));
    } else if let Some(t) = rtype {
        let what = match non_empty(&a.resource_id) {
            Some(id) => json!({ "reference": format!("{t}/{id}") }),
            None => json!({ "type": t }),
        };
        entities.push(json!({
            "what": what,
            "type": coding(ENTITY_TYPE, "2", "System Object"),
            "role": coding(OBJECT_ROLE, "4", "Domain Resource"),
        }));
    }
    if !entities.is_empty() {
        ev.insert("entity".into(), Value::Array(entities));
    }
    Value::Object(ev)
}
