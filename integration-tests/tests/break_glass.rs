//! Break-the-glass end to end, on a real gateway with the audit trail: a clinician of hospital
//! A reaches hospital B's patient only with an entitled role and an accepted purpose of use; the
//! records carry the claim, a grant covers the next request for the same patient, the metric
//! counts it; a caller without the role, or a patient app, is refused and nothing is overridden.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const KEY: &str = "break-glass-audit-key-0123456789abcdef0123";
const SECRET: &str = "break-glass-token-secret-0123456789abcdef";

fn token(sub: &str, tenant: &str, roles: &[&str], patient: Option<&str>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut claims = json!({"iss": "https://staff.test", "aud": "caregate", "sub": sub,
        "exp": now + 600, "tenant": tenant, "roles": roles});
    if let Some(p) = patient {
        claims["patient"] = json!(p);
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("record").cloned())
        .collect()
}

#[test]
fn emergency_access_crosses_hospitals_only_when_entitled_and_is_audited() {
    let backend = EchoServer::start("hospital-b");
    let dir = TempDir::new("break-glass");
    let audit = dir.0.join("audit.jsonl");
    let (admin, public) = (free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 2 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
audit: {{ path: "{audit}", hmac_key: "{KEY}", checkpoint_interval_ms: 200 }}
auth:
  issuers:
    - {{ name: staff, issuer: "https://staff.test", algorithms: [HS256], hs_secret: "{SECRET}", audiences: [caregate], claims: {{ patient: patient }} }}
tenants:
  - {{ id: hospital-a, hosts: [a.example.org] }}
  - {{ id: hospital-b, hosts: [b.example.org] }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools: [ {{ name: fhir, zones: [ {{ name: z, backends: [ {{ address: "{b}" }} ] }} ] }} ]
routes:
  - name: fhir
    listener: public
    path_prefix: /fhir
    fhir: true
    phi: true
    pool: fhir
    filters:
      - {{ kind: jwt_auth }}
      - {{ kind: break_glass, config: {{ roles: [er_physician], purposes: [ETREAT], overrides: [tenant], grant_seconds: 600 }} }}
      - {{ kind: tenant, config: {{ resolve: [host] }} }}
"#,
        audit = audit.display(),
        b = backend.addr
    );
    let gw = Gateway::start(&yaml, admin);
    let p = addr(public);
    let get = |tok: &str, target: &str, claim: Option<&str>, id: &str| {
        let bearer = format!("Bearer {tok}");
        let mut headers = vec![
            ("Host", "b.example.org"),
            ("Authorization", bearer.as_str()),
            ("X-Request-Id", id),
        ];
        if let Some(c) = claim {
            headers.push(("X-Break-Glass", c));
        }
        request(p, "GET", target, &headers, b"")
    };
    let doctor = token("dr-er", "hospital-a", &["er_physician"], None);
    let nurse = token("nurse-a", "hospital-a", &["nurse"], None);
    let patient_app = token("app-user", "hospital-a", &["er_physician"], Some("p1"));

    // Without a claim: refused, and told that emergency access may be claimed.
    let r = get(&doctor, "/fhir/Patient/p1", None, "bg-1");
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(
        r.text().contains("tenant_mismatch") && r.text().contains("break-the-glass"),
        "{}",
        r.text()
    );
    assert_eq!(backend.count(), 0);
    // With a claim: through, to hospital B's patient.
    let r = get(
        &doctor,
        "/fhir/Patient/p1",
        Some("ETREAT; unconscious patient in the ER"),
        "bg-2",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // The grant: the same doctor, the same patient, no header.
    let r = get(&doctor, "/fhir/Patient/p1/Observation", None, "bg-3");
    assert_eq!(r.status, 200, "{}", r.text());
    // Another patient is not covered.
    let r = get(&doctor, "/fhir/Patient/p2", None, "bg-4");
    assert_eq!(r.status, 403, "{}", r.text());
    // A purpose the route does not accept, a caller without the role, a patient app: refused,
    // nothing overridden.
    let r = get(
        &doctor,
        "/fhir/Patient/p2",
        Some("HMARKT; marketing"),
        "bg-5",
    );
    assert_eq!(r.status, 403);
    assert!(r.text().contains("break_glass_refused"), "{}", r.text());
    let r = get(
        &nurse,
        "/fhir/Patient/p1",
        Some("ETREAT; emergency"),
        "bg-6",
    );
    assert_eq!(r.status, 403);
    assert!(r.text().contains("break_glass_refused"), "{}", r.text());
    let r = get(
        &patient_app,
        "/fhir/Patient/p1",
        Some("ETREAT; emergency"),
        "bg-7",
    );
    assert_eq!(r.status, 403);
    assert!(r.text().contains("break_glass_refused"), "{}", r.text());
    assert_eq!(
        backend.count(),
        2,
        "only the claimed and the granted request went upstream"
    );

    wait_until("the records", Duration::from_secs(10), || {
        let rs = records(&audit);
        ["bg-2", "bg-3"].iter().all(|id| {
            rs.iter()
                .any(|r| r["request_id"] == *id && r["phase"] == "completion")
        }) && ["bg-1", "bg-4", "bg-5", "bg-6", "bg-7"]
            .iter()
            .all(|id| rs.iter().any(|r| r["request_id"] == *id))
    });
    let rs = records(&audit);
    let of = |id: &str| -> Vec<&Value> { rs.iter().filter(|r| r["request_id"] == id).collect() };
    for r in of("bg-2") {
        let bg = &r["break_glass"];
        assert_eq!(bg["purpose"], "ETREAT", "{r}");
        assert_eq!(bg["reason"], "unconscious patient in the ER", "{r}");
        assert_eq!(bg["overrode"], json!(["tenant"]), "{r}");
        assert!(bg.get("from_grant").is_none(), "{r}");
    }
    for r in of("bg-3") {
        assert_eq!(r["break_glass"]["from_grant"], true, "{r}");
    }
    for id in ["bg-1", "bg-4", "bg-5", "bg-6", "bg-7"] {
        for r in of(id) {
            assert!(
                r.get("break_glass").is_none(),
                "{id}: nothing was overridden: {r}"
            );
            assert_eq!(r["phase"], "denied", "{r}");
        }
    }
    let metrics = gw.metrics();
    assert!(
        metrics.contains("caregate_break_glass_total{purpose=\"ETREAT\",route=\"fhir\"} 2"),
        "{metrics}"
    );
    for (reason, n) in [
        ("not_entitled", 1),
        ("patient_context", 1),
        ("purpose_not_accepted", 1),
    ] {
        let line =
            format!("caregate_break_glass_refused_total{{reason=\"{reason}\",route=\"fhir\"}} {n}");
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
    let (code, out) = audit_verify(&audit, KEY);
    assert_eq!(code, Some(0), "{out}");

    // The next-day review lists exactly the two emergency accesses, with their purpose and
    // reason.
    let out = std::process::Command::new(caregate_bin())
        .args(["audit", "report", "--break-glass", "--format", "json"])
        .arg(&audit)
        .env("CAREGATE_AUDIT_KEY", KEY)
        .env_remove("CAREGATE_AUDIT_KEYS")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = entries.as_array().unwrap();
    let ids: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["request_id"].as_str())
        .collect();
    assert_eq!(ids, ["bg-2", "bg-3"], "{entries:?}");
    assert_eq!(entries[0]["break_glass"]["purpose"], "ETREAT");
    assert_eq!(
        entries[0]["break_glass"]["reason"],
        "unconscious patient in the ER"
    );
}
