//! `caregate audit report --patient X` on a trail written by a real gateway in front of the
//! sandbox: it lists exactly X's accesses (allowed and refused), nothing about anyone else, and
//! refuses a trail that does not verify.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const KEY: &str = "report-integration-audit-key-0123456789abcdef";
const SECRET: &str = "report-test-token-secret-0123456789abcdef";

fn token(sub: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "https://staff.test", "aud": "caregate", "sub": sub, "exp": now + 600, "roles": ["clinician"]}),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// `caregate audit report ARGS PATH` with `key` in `CAREGATE_AUDIT_KEY`: (exit code, stdout,
/// stderr).
fn report(path: &Path, args: &[&str], key: &str) -> (Option<i32>, String, String) {
    let out = Command::new(caregate_bin())
        .args(["audit", "report"])
        .args(args)
        .arg(path)
        .env("CAREGATE_AUDIT_KEY", key)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The JSON report for `patient`, which must succeed.
fn json_report(path: &Path, patient: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["--patient", patient, "--format", "json"];
    args.extend_from_slice(extra);
    let (code, out, err) = report(path, &args, KEY);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    serde_json::from_str::<Value>(&out)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
        .as_array()
        .unwrap()
        .clone()
}

fn request_ids(entries: &[Value]) -> BTreeSet<String> {
    entries
        .iter()
        .map(|e| e["request_id"].as_str().unwrap().to_string())
        .collect()
}

/// A gateway with the audit trail in front of the built-in sandbox (the demo's Synthea data),
/// on a `fhir: true, phi: true` route behind `jwt_auth`.
fn sandbox_config(admin: u16, public: u16, sb: u16, audit: &Path) -> String {
    format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 2 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
audit: {{ path: "{audit}", hmac_key: "{KEY}", checkpoint_interval_ms: 200 }}
auth:
  issuers:
    - {{ name: staff, issuer: "https://staff.test", algorithms: [HS256], hs_secret: "{SECRET}", audiences: [caregate] }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
sandboxes: [ {{ name: fhir, listen: "127.0.0.1:{sb}", data_dir: "@CONF@/demo/data" }} ]
pools: [ {{ name: fhir, zones: [ {{ name: a, backends: [ {{ sandbox: fhir }} ] }} ] }} ]
routes:
  - name: fhir
    listener: public
    path_prefix: /fhir
    fhir: true
    phi: true
    pool: fhir
    filters: [ {{ kind: jwt_auth }} ]
"#,
        audit = audit.display()
    )
}

#[test]
fn the_report_lists_exactly_one_patients_accesses_and_refuses_a_tampered_trail() {
    let (public, admin, sb) = (free_port(), free_port(), free_port());
    let dir = TempDir::new("audit-report");
    let audit = dir.0.join("audit.jsonl");
    let yaml = sandbox_config(admin, public, sb, &audit);
    let mut gw = Gateway::start(&yaml, admin);
    let s = addr(sb);
    wait_until("sandbox up", Duration::from_secs(20), || {
        try_request(s, "GET", "/healthz", &[], b"").is_ok()
    });
    // Two real patients of the sandbox.
    let patients = get(s, "/fhir/Patient?_count=10").json();
    let ids: Vec<String> = patients["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect();
    let (x, y) = (ids[0].clone(), ids[1].clone());
    assert_ne!(x, y);

    let p = addr(public);
    let bearer = format!("Bearer {}", token("dr-a"));
    // GET /fhir/Patient/<id>, with or without the token: (status, request id).
    let read = |id: &str, with_token: bool| {
        let mut headers = vec![];
        if with_token {
            headers.push(("Authorization", bearer.as_str()));
        }
        let r = request(p, "GET", &format!("/fhir/Patient/{id}"), &headers, b"");
        (r.status, r.header("x-request-id").unwrap().to_string())
    };
    let mut x_allowed = BTreeSet::new();
    let mut x_denied = BTreeSet::new();
    let mut y_ids = BTreeSet::new();
    for _ in 0..2 {
        let (status, id) = read(&x, true);
        assert_eq!(status, 200);
        x_allowed.insert(id);
        let (status, id) = read(&y, true);
        assert_eq!(status, 200);
        y_ids.insert(id);
    }
    let (status, id) = read(&x, false);
    assert_eq!(status, 401);
    x_denied.insert(id);
    gw.sigterm_and_wait();
    let (code, out) = audit_verify(&audit, KEY);
    assert_eq!(code, Some(0), "{out}");

    // JSON: exactly X's three requests, one entry each.
    let entries = json_report(&audit, &x, &[]);
    assert_eq!(entries.len(), 3, "{entries:#?}");
    let all_x: BTreeSet<String> = x_allowed.union(&x_denied).cloned().collect();
    assert_eq!(request_ids(&entries), all_x);
    for e in &entries {
        let id = e["request_id"].as_str().unwrap();
        assert_eq!(e["what"]["method"], "GET", "{e}");
        assert_eq!(e["what"]["route"], "fhir", "{e}");
        assert_eq!(e["what"]["resource_type"], "Patient", "{e}");
        assert_eq!(e["what"]["resource_id"], x.as_str(), "{e}");
        assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
        assert!(!e["seq"].as_array().unwrap().is_empty(), "{e}");
        if x_allowed.contains(id) {
            assert_eq!(e["phase"], "access+completion", "{e}");
            assert_eq!(e["outcome"]["result"], "completed", "{e}");
            assert_eq!(e["outcome"]["status"], 200, "{e}");
            assert_eq!(e["who"]["subject"], "dr-a", "{e}");
            assert_eq!(e["what"]["interaction"], "read", "{e}");
            assert!(e["completed"].is_string(), "{e}");
        } else {
            assert_eq!(e["phase"], "denied", "{e}");
            assert_eq!(e["outcome"]["result"], "refused", "{e}");
            assert_eq!(e["outcome"]["status"], 401, "{e}");
            assert_eq!(e["outcome"]["reason"], "token_missing", "{e}");
        }
    }
    let text = serde_json::to_string(&entries).unwrap();
    assert!(!text.contains(&y), "Y appears in X's report: {text}");
    for id in &y_ids {
        assert!(
            !text.contains(id.as_str()),
            "Y's request in X's report: {text}"
        );
    }
    // Sorted by time.
    let times: Vec<&str> = entries
        .iter()
        .map(|e| e["time"].as_str().unwrap())
        .collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted);

    // Y's report: Y's two reads only.
    assert_eq!(request_ids(&json_report(&audit, &y, &[])), y_ids);
    // The directory holding the trail reports the same.
    assert_eq!(request_ids(&json_report(&dir.0, &x, &[])), all_x);

    // Text: a header line, then one line per access, none about Y.
    let (code, out, err) = report(&audit, &["--patient", &x], KEY);
    assert_eq!(code, Some(0), "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].starts_with("time\twho\t"), "{out}");
    for l in &lines[1..] {
        assert!(l.contains(&format!("Patient/{x}")), "{l}");
        assert!(all_x.iter().any(|id| l.ends_with(id.as_str())), "{l}");
    }
    assert!(!out.contains(&y), "{out}");
    assert_eq!(out.matches("dr-a").count(), 2, "{out}");
    assert!(out.contains("refused 401 token_missing"), "{out}");

    // The time window: inclusive bounds; dates cover their UTC day.
    let first = entries[0]["time"].as_str().unwrap().to_string();
    assert_eq!(json_report(&audit, &x, &["--from", &first]).len(), 3);
    assert_eq!(json_report(&audit, &x, &["--from", &first[..10]]).len(), 3);
    assert!(json_report(&audit, &x, &["--to", "1999-12-31"]).is_empty());
    assert!(json_report(&audit, &x, &["--from", "2999-01-01T00:00:00+01:00"]).is_empty());
    let (code, out, _) = report(&audit, &["--patient", &x, "--to", "1999-12-31"], KEY);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("no access to patient"), "{out}");

    // A patient nobody read: exit 0, saying so.
    let (code, out, _) = report(&audit, &["--patient", "no-such-patient"], KEY);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("no access to patient"), "{out}");
    assert!(json_report(&audit, "no-such-patient", &[]).is_empty());

    // Usage errors: exit 2.
    let (code, _, err) = report(&audit, &["--patient", &x, "--from", "yesterday"], KEY);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = report(&dir.0.join("missing.jsonl"), &["--patient", &x], KEY);
    assert_eq!(code, Some(2), "{err}");

    // The wrong key: the trail does not verify; nothing is listed.
    let (code, out, err) = report(
        &audit,
        &["--patient", &x],
        "another-key-0123456789abcdef-0123456789abcdef",
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("does not verify"), "{err}");

    // One of Y's records edited: no report about anybody from this trail.
    let original = std::fs::read_to_string(&audit).unwrap();
    let y_id = y_ids.iter().next().unwrap().clone();
    let mut edited = 0;
    let tampered: String = original
        .lines()
        .map(|l| {
            if edited == 0 && l.contains(&y_id) && l.contains("\"subject\":\"dr-a\"") {
                edited += 1;
                l.replace("\"subject\":\"dr-a\"", "\"subject\":\"dr-z\"")
            } else {
                l.to_string()
            }
        })
        .map(|l| l + "\n")
        .collect();
    assert_eq!(edited, 1, "no record of {y_id} to edit:\n{original}");
    std::fs::write(&audit, tampered).unwrap();
    for args in [
        vec!["--patient", x.as_str()],
        vec!["--patient", x.as_str(), "--format", "json"],
    ] {
        let (code, out, err) = report(&audit, &args, KEY);
        assert_eq!(code, Some(1), "{out}{err}");
        assert!(out.is_empty(), "{out}");
        assert!(err.contains("does not verify"), "{err}");
        assert!(err.contains("mac does not match"), "{err}");
    }
    let (code, _, err) = report(&dir.0, &["--patient", &x], KEY);
    assert_eq!(code, Some(1), "{err}");
}

/// Data reached through the response names its patient too: a practitioner's read of one of X's
/// Observations, and a search whose results hold X's data, are in the completion records and in
/// `audit report --patient X`, though the requests never name X.
#[test]
fn accesses_found_in_the_response_name_the_patient_and_are_reported() {
    let (public, admin, sb) = (free_port(), free_port(), free_port());
    let dir = TempDir::new("audit-report-body");
    let audit = dir.0.join("audit.jsonl");
    let mut gw = Gateway::start(&sandbox_config(admin, public, sb, &audit), admin);
    let s = addr(sb);
    wait_until("sandbox up", Duration::from_secs(20), || {
        try_request(s, "GET", "/healthz", &[], b"").is_ok()
    });
    // One of the sandbox's Observations and its patient.
    let bundle = get(s, "/fhir/Observation?_count=1").json();
    let obs = &bundle["entry"][0]["resource"];
    let obs_id = obs["id"].as_str().unwrap().to_string();
    let x = obs["subject"]["reference"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let p = addr(public);
    let bearer = format!("Bearer {}", token("dr-b"));
    let get_id = |target: &str| {
        let r = request(p, "GET", target, &[("Authorization", bearer.as_str())], b"");
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        r.header("x-request-id").unwrap().to_string()
    };
    let read = get_id(&format!("/fhir/Observation/{obs_id}"));
    let search = get_id(&format!("/fhir/Observation?_id={obs_id}"));
    wait_until("completion records", Duration::from_secs(10), || {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .matches("\"completion\"")
            .count()
            >= 2
    });
    gw.sigterm_and_wait();
    let records: Vec<Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("record").cloned())
        .collect();
    for rid in [&read, &search] {
        let access = records
            .iter()
            .find(|r| r["request_id"] == rid.as_str() && r["phase"] == "access")
            .unwrap();
        assert!(
            access["action"].get("patients").is_none(),
            "the request alone names no patient: {access}"
        );
        let done = records
            .iter()
            .find(|r| r["request_id"] == rid.as_str() && r["phase"] == "completion")
            .unwrap();
        let named: Vec<&str> = done["action"]["patients"]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert!(named.contains(&x.as_str()), "{done}");
    }
    let entries = json_report(&audit, &x, &[]);
    let ids = request_ids(&entries);
    assert!(ids.contains(&read) && ids.contains(&search), "{entries:?}");
}
