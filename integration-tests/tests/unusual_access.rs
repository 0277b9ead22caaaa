//! The unusual-access monitor end to end, on a real gateway with an audit trail: a practitioner
//! who reads as many distinct patients as the threshold raises nothing; one who reads one more
//! raises exactly one `anomaly` record (naming the subject, never a patient) and
//! `caregate_audit_anomalies_total{kind="distinct_patients"}`; a caller refused for another
//! tenant raises one `cross_tenant` anomaly however often it tries within the window; and the
//! trail with its anomaly records verifies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const KEY: &str = "unusual-access-audit-key-0123456789abcdef";
const SECRET: &str = "unusual-access-token-secret-0123456789abcdef";

fn token(sub: &str, tenant: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "https://staff.test", "aud": "caregate", "sub": sub, "exp": now + 600, "tenant": tenant, "roles": ["clinician"]}),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn config(admin: u16, public: u16, backend: &EchoServer, audit: &Path) -> String {
    format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 2 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
audit: {{ path: "{audit}", hmac_key: "{KEY}", checkpoint_interval_ms: 200 }}
unusual_access: {{ window_seconds: 600, max_distinct_patients: 5 }}
auth:
  issuers:
    - {{ name: staff, issuer: "https://staff.test", algorithms: [HS256], hs_secret: "{SECRET}", audiences: [caregate] }}
tenants: [ {{ id: hospital-a, hosts: [a.example.org] }} ]
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools: [ {{ name: fhir, zones: [ {{ name: zone-a, backends: [ {{ address: "{b}" }} ] }} ] }} ]
routes:
  - name: fhir
    listener: public
    path_prefix: /fhir
    fhir: true
    phi: true
    pool: fhir
    filters: [ {{ kind: jwt_auth }}, {{ kind: tenant, config: {{ resolve: [host] }} }} ]
"#,
        audit = audit.display(),
        b = backend.addr
    )
}

/// Every record of an audit file, in order.
fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("record").is_some())
        .map(|v| v["record"].clone())
        .collect()
}

fn anomalies(path: &Path) -> Vec<Value> {
    records(path)
        .into_iter()
        .filter(|r| r["phase"] == "anomaly")
        .collect()
}

/// GET /fhir/Patient/<id> on hospital-a's host with `bearer`: the status.
fn read_patient(p: std::net::SocketAddr, bearer: &str, id: &str) -> u16 {
    request(
        p,
        "GET",
        &format!("/fhir/Patient/{id}"),
        &[
            ("Host", "a.example.org"),
            ("Authorization", &format!("Bearer {bearer}")),
        ],
        b"",
    )
    .status
}

/// No patient id of this test (they all contain `pat-`) anywhere in the record, and no patient
/// field.
fn assert_names_no_patient(rec: &Value) {
    let text = rec.to_string();
    assert!(
        !text.contains("pat-"),
        "a patient in an anomaly record: {text}"
    );
    assert!(rec["action"].get("patient").is_none(), "{text}");
    assert!(rec["action"].get("patients").is_none(), "{text}");
    assert!(rec.get("hl7").is_none(), "{text}");
}

#[test]
fn reading_more_distinct_patients_than_the_threshold_raises_one_anomaly() {
    let backend = EchoServer::start("fhir");
    let dir = TempDir::new("unusual-access");
    let audit = dir.0.join("audit.jsonl");
    let (public, admin) = (free_port(), free_port());
    let mut gw = Gateway::start(&config(admin, public, &backend, &audit), admin);
    let p = addr(public);

    // The metric is there from the first scrape, at 0 for every kind.
    let metrics = gw.metrics();
    for kind in ["distinct_patients", "cross_tenant", "repeated_break_glass"] {
        assert!(
            metrics.contains(&format!(
                "caregate_audit_anomalies_total{{kind=\"{kind}\"}} 0"
            )),
            "no 0 series for {kind}:\n{metrics}"
        );
    }

    // Practitioner A: 5 distinct patients (one of them read three times), the threshold itself.
    let a = token("dr-a", "hospital-a");
    for i in 0..5 {
        assert_eq!(read_patient(p, &a, &format!("a-pat-{i}")), 200);
    }
    for _ in 0..2 {
        assert_eq!(read_patient(p, &a, "a-pat-0"), 200);
    }
    // Practitioner B: 6 distinct patients, one past it.
    let b = token("dr-b", "hospital-a");
    for i in 0..6 {
        assert_eq!(read_patient(p, &b, &format!("b-pat-{i}")), 200);
    }

    // The anomaly record follows B's sixth access record in the trail; anything A raised
    // would be before it.
    wait_until("the anomaly record", Duration::from_secs(10), || {
        !anomalies(&audit).is_empty()
    });
    let found = anomalies(&audit);
    assert_eq!(found.len(), 1, "exactly one anomaly: {found:#?}");
    let rec = &found[0];
    assert!(
        rec["request_id"].as_str().unwrap().starts_with("anomaly-"),
        "{rec}"
    );
    assert_eq!(rec["actor"]["subject"], "dr-b", "{rec}");
    assert_eq!(rec["actor"]["issuer"], "https://staff.test", "{rec}");
    assert_eq!(rec["actor"]["tenant"], "hospital-a", "{rec}");
    assert_eq!(rec["action"]["method"], "MONITOR", "{rec}");
    assert_eq!(rec["action"]["route"], "fhir", "{rec}");
    assert_eq!(rec["outcome"]["reason"], "distinct_patients", "{rec}");
    assert_eq!(
        rec["anomaly"],
        json!({"kind": "distinct_patients", "count": 6, "threshold": 5, "window_seconds": 600}),
        "{rec}"
    );
    assert_names_no_patient(rec);
    // B's patients were all audited as usual: the monitor adds records, it removes none.
    let recs = records(&audit);
    for i in 0..6 {
        let id = format!("b-pat-{i}");
        assert!(
            recs.iter()
                .any(|r| r["phase"] == "access" && r["action"]["patient"] == id.as_str()),
            "no access record for {id}"
        );
    }
    wait_until("the anomaly in the metrics", Duration::from_secs(5), || {
        gw.metrics()
            .contains("caregate_audit_anomalies_total{kind=\"distinct_patients\"} 1")
    });

    // B goes on: no second anomaly within the window.
    for i in 6..9 {
        assert_eq!(read_patient(p, &b, &format!("b-pat-{i}")), 200);
    }

    // A clinician of another hospital, refused three times: one cross_tenant anomaly.
    let c = token("dr-c", "hospital-b");
    for i in 0..3 {
        assert_eq!(read_patient(p, &c, &format!("c-pat-{i}")), 403);
    }
    wait_until("the cross-tenant anomaly", Duration::from_secs(10), || {
        anomalies(&audit)
            .iter()
            .any(|r| r["anomaly"]["kind"] == "cross_tenant")
    });
    let metrics = gw.metrics();
    assert!(
        metrics.contains("caregate_audit_anomalies_total{kind=\"cross_tenant\"} 1"),
        "{metrics}"
    );

    gw.sigterm_and_wait();
    let found = anomalies(&audit);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert_eq!(found[0]["actor"]["subject"], "dr-b");
    let cross = &found[1];
    assert_eq!(cross["actor"]["subject"], "dr-c", "{cross}");
    assert_eq!(cross["actor"]["tenant"], "hospital-b", "{cross}");
    assert_eq!(
        cross["anomaly"],
        json!({"kind": "cross_tenant", "count": 1, "threshold": 0, "window_seconds": 600}),
        "{cross}"
    );
    for rec in &found {
        assert_names_no_patient(rec);
        assert_ne!(rec["actor"]["subject"], "dr-a", "{rec}");
    }

    let (code, out) = audit_verify(&audit, KEY);
    assert_eq!(
        code,
        Some(0),
        "verify failed on a trail with anomaly records: {out}"
    );
}
