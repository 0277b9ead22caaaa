//! SMART scopes and the patient compartment end to end, against the sandbox (a FHIR server with
//! no access control of its own that really returns other patients' data when asked).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECRET: &str = "patient-app-token-secret-0123456789abcdef";

fn token(patient: &str, scope: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "https://patients.test", "aud": "portal", "sub": format!("user-{patient}"), "exp": now + 600, "patient": patient, "scope": scope}),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[test]
fn a_patient_token_reaches_only_its_own_compartment() {
    let (public, admin, sb) = (free_port(), free_port(), free_port());
    let dir = TempDir::new("compartment");
    let backend_base = format!("http://127.0.0.1:{sb}/fhir");
    let public_base = format!("http://127.0.0.1:{public}/fhir");
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
audit: {{ path: "{audit}", hmac_key: "compartment-test-audit-key-0123456789abcdef" }}
auth:
  issuers:
    - {{ name: patients, issuer: "https://patients.test", algorithms: [HS256], hs_secret: "{SECRET}", audiences: [portal], claims: {{ patient: patient }} }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
sandboxes: [ {{ name: fhir, listen: "127.0.0.1:{sb}", data_dir: "@CONF@/demo/data" }} ]
pools: [ {{ name: fhir, zones: [ {{ name: a, backends: [ {{ sandbox: fhir }} ] }} ] }} ]
routes:
  - name: portal-fhir
    listener: public
    path_prefix: /fhir
    fhir: true
    phi: true
    pool: fhir
    filters:
      - {{ kind: smart_configuration, config: {{ document: {{ token_endpoint: "https://patients.test/token", capabilities: [launch-standalone, context-standalone-patient, permission-v2], scopes_supported: ["patient/*.rs"] }} }} }}
      - {{ kind: jwt_auth }}
      - {{ kind: smart_scopes }}
      - {{ kind: patient_compartment }}
      - {{ kind: fhir_links, config: {{ backend_base: "{backend_base}", public_base: "{public_base}" }} }}
"#,
        audit = dir.0.join("audit.jsonl").display()
    );
    let _gw = Gateway::start(&yaml, admin);
    let s = addr(sb);
    wait_until("sandbox up", Duration::from_secs(20), || {
        try_request(s, "GET", "/healthz", &[], b"").is_ok()
    });
    // Two real patients, and one of B's observations, straight from the backend.
    let patients = get(s, "/fhir/Patient?_count=10").json();
    let ids: Vec<String> = patients["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect();
    let (a, b) = (ids[0].clone(), ids[1].clone());
    let b_obs = get(s, &format!("/fhir/Observation?patient={b}&_count=1")).json()["entry"][0]
        ["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let a_obs = get(s, &format!("/fhir/Observation?patient={a}&_count=1")).json()["entry"][0]
        ["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let p = addr(public);
    let t = token(&a, "patient/*.cruds launch/patient");
    let auth = format!("Bearer {t}");
    let call = |m: &str, target: &str, body: &[u8]| {
        try_request(
            p,
            m,
            target,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/fhir+json"),
            ],
            body,
        )
    };

    // SMART discovery is public and served at the edge.
    let r = get(p, "/fhir/.well-known/smart-configuration");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["token_endpoint"], "https://patients.test/token");

    // A's own data: reads, searches, compartment search, $everything, paging through the gateway.
    for target in [
        format!("/fhir/Patient/{a}"),
        format!("/fhir/Observation/{a_obs}"),
        format!("/fhir/Observation?patient={a}&_count=5"),
        format!("/fhir/Patient/{a}/Observation?_count=5"),
        format!("/fhir/Patient?_id={a}"),
        format!("/fhir/Patient/{a}/$everything?_count=5"),
        // Includes are allowed: every returned entry is checked.
        format!("/fhir/Observation?patient={a}&_count=5&_include=Observation:subject"),
        format!("/fhir/Patient?_id={a}&_revinclude=Observation:subject"),
    ] {
        let r = call("GET", &target, b"").unwrap();
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        assert!(
            !r.text().contains(&format!("Patient/{b}")),
            "{target} returned B's data"
        );
    }
    let page1 = call(
        "GET",
        &format!("/fhir/Observation?patient={a}&_count=3"),
        b"",
    )
    .unwrap()
    .json();
    let next = next_link(&page1).expect("a next link");
    assert!(next.starts_with(&public_base), "{next}");
    let page2 = call(
        "GET",
        next.strip_prefix(&format!("http://127.0.0.1:{public}"))
            .unwrap(),
        b"",
    )
    .unwrap();
    assert_eq!(page2.status, 200);
    assert_ne!(
        page2.json()["entry"][0]["resource"]["id"],
        page1["entry"][0]["resource"]["id"]
    );

    // Every way to B's data the request shows is refused, 403 patient_compartment.
    let before =
        get(s, &format!("/fhir/Observation?patient={b}&_summary=count")).json()["total"].clone();
    for (m, target, body) in [
        ("GET", format!("/fhir/Patient/{b}"), String::new()),
        ("GET", format!("/fhir/Observation?patient={b}"), String::new()),
        ("GET", format!("/fhir/Observation?subject=Patient/{b}"), String::new()),
        ("GET", format!("/fhir/Observation?patient={a},{b}"), String::new()),
        ("GET", format!("/fhir/Patient/$export?patient={a}"), String::new()),
        ("GET", "/fhir/$export".to_string(), String::new()),
        ("GET", "/fhir/Group/1/$export".to_string(), String::new()),
        ("GET", "/fhir?_type=Patient".to_string(), String::new()),
        ("GET", "/fhir/_history".to_string(), String::new()),
        ("GET", "/fhir/Observation/_history".to_string(), String::new()),
        ("PUT", format!("/fhir/Observation?patient={b}"), json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{a}")}}).to_string()),
        ("DELETE", format!("/fhir/Observation?patient={b}"), String::new()),
        ("PUT", format!("/fhir/Patient/{b}"), json!({"resourceType": "Patient", "id": b}).to_string()),
        ("GET", "/fhir/Observation?subject.name=Smith".to_string(), String::new()),
        ("GET", "/fhir/Patient?_has:Observation:patient:code=8302-2".to_string(), String::new()),
        ("GET", format!("/fhir/Patient/{b}/$everything"), String::new()),
        ("GET", format!("/fhir/Patient/{b}/Observation"), String::new()),
        ("GET", "/fhir/Observation".to_string(), String::new()),
        ("POST", "/fhir/Observation".to_string(), json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{b}")}}).to_string()),
    ] {
        let r = call(m, &target, body.as_bytes()).unwrap();
        assert_eq!(r.status, 403, "{m} {target}: {}", r.text());
        let v = r.json();
        assert_eq!(v["issue"][0]["details"]["coding"][0]["code"], "patient_compartment", "{target}");
        assert!(!r.text().contains(&b), "the refusal names no ids");
    }
    // Batch and transaction Bundles are authorised entry by entry before anything is forwarded:
    // one foreign entry refuses the whole Bundle, naming the entry by its index.
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "GET", "url": format!("Patient/{a}")}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "y"}, "subject": {"reference": format!("Patient/{a}")}},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "z"}, "subject": {"reference": format!("Patient/{b}")}},
         "request": {"method": "POST", "url": "Observation"}}
    ]});
    let r = call("POST", "/fhir", tx.to_string().as_bytes()).unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    let v = r.json();
    assert_eq!(
        v["issue"][0]["details"]["coding"][0]["code"],
        "patient_compartment"
    );
    assert!(
        v["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .starts_with("entry 2:"),
        "{v}"
    );
    assert!(!r.text().contains(&b));
    // Foreign GET, DELETE and PUT entries, a conditional entry, and a nested Bundle: each refuses
    // its Bundle, named by index, and nothing of it is forwarded.
    for (entry, body_entry) in [
        (
            "GET B",
            json!({"request": {"method": "GET", "url": format!("/Patient/{b}")}}),
        ),
        (
            "DELETE B's observation",
            json!({"request": {"method": "DELETE", "url": format!("Observation/{b_obs}")}}),
        ),
        (
            "PUT over B's observation",
            json!({"resource": {"resourceType": "Observation", "id": b_obs, "status": "final", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{a}")}},
            "request": {"method": "PUT", "url": format!("Observation/{b_obs}")}}),
        ),
        (
            "conditional delete",
            json!({"request": {"method": "DELETE", "url": format!("Observation?patient={b}")}}),
        ),
        (
            "nested Bundle",
            json!({"resource": {"resourceType": "Bundle", "type": "transaction"}, "request": {"method": "POST", "url": "/"}}),
        ),
    ] {
        let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": format!("Patient/{a}")}}, body_entry]});
        let r = call("POST", "/fhir", batch.to_string().as_bytes()).unwrap();
        assert_eq!(r.status, 403, "{entry}: {}", r.text());
        let text = r.json()["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(text.starts_with("entry 1:"), "{entry}: {text}");
        assert!(!r.text().contains(&b), "{entry}");
    }
    assert_eq!(get(s, &format!("/fhir/Observation/{b_obs}")).status, 200);
    // A's own transaction goes through.
    let own_tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "w"}, "subject": {"reference": format!("Patient/{a}")}},
         "request": {"method": "POST", "url": "Observation"}}
    ]});
    let r = call("POST", "/fhir", own_tx.to_string().as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["type"], "transaction-response");
    // The write referencing B never reached the backend.
    assert_eq!(
        get(s, &format!("/fhir/Observation?patient={b}&_summary=count")).json()["total"],
        before
    );

    // A read by id of B's observation cannot be judged from the request: the whole response is
    // checked before anything is released, and the client gets a clean 404 — the same answer
    // as for an id that does not exist (no existence oracle).
    let b_obs_body = get(s, &format!("/fhir/Observation/{b_obs}")).text();
    for target in [
        format!("/fhir/Observation/{b_obs}"),
        format!("/fhir/Observation/{b_obs}/_history/1"),
    ] {
        let r = call("GET", &target, b"").unwrap();
        assert_eq!(r.status, 404, "{target}: {}", r.text());
        assert_eq!(
            r.json()["issue"][0]["details"]["coding"][0]["code"],
            "not_found"
        );
        assert!(!r.text().contains(&b) && !r.text().contains(&b_obs));
    }

    // Cross-patient references, added to the backend's data so that includes really reach B:
    // one of B's observations performed by A (a carer's home reading), and one of A's
    // observations with B as a performer.
    let seed = |body: serde_json::Value| -> String {
        let r = request(
            s,
            "POST",
            "/fhir/Observation",
            &[("Content-Type", "application/fhir+json")],
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    };
    let b_by_a = seed(
        json!({"resourceType": "Observation", "status": "final", "code": {"text": "home glucose"},
        "subject": {"reference": format!("Patient/{b}")}, "performer": [{"reference": format!("Patient/{a}")}]}),
    );
    let a_about_b = seed(json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://example.org/test", "code": "carer-reading"}]},
        "subject": {"reference": format!("Patient/{a}")}, "performer": [{"reference": format!("Patient/{b}")}]}));
    for (target, leak) in [
        (
            format!("/fhir/Patient?_id={a}&_revinclude=Observation:performer"),
            b_by_a.clone(),
        ),
        (
            format!("/fhir/Observation?patient={a}&code=http://example.org/test|carer-reading&_include=Observation:performer"),
            b.clone(),
        ),
    ] {
        // The backend really returns B's data for this search ...
        let direct = get(s, &target).text();
        assert!(direct.contains(&leak), "the backend did not reach B: {target}");
        // ... and the gateway delivers none of it.
        let r = call("GET", &target, b"").unwrap();
        assert_eq!(r.status, 404, "{target}: {}", r.text());
        assert!(!r.text().contains(&leak) && !r.text().contains(&b), "{target}");
    }
    // The seeded data goes again, so A's own searches below are A's alone.
    for id in [&b_by_a, &a_about_b] {
        assert_eq!(
            request(s, "DELETE", &format!("/fhir/Observation/{id}"), &[], b"").status,
            200
        );
    }

    // Changes by id are judged against the stored resource, read first from the backend.
    let patch = |target: &str, ops: serde_json::Value, if_match: Option<&str>| {
        let mut h = vec![
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json-patch+json"),
        ];
        if let Some(m) = if_match {
            h.push(("If-Match", m));
        }
        request(p, "PATCH", target, &h, ops.to_string().as_bytes())
    };
    // B's observation: an update, a patch and a delete are all 404, and it stays as it was.
    let takeover = json!({"resourceType": "Observation", "id": b_obs, "status": "final", "code": {"text": "mine now"}, "subject": {"reference": format!("Patient/{a}")}});
    let r = call(
        "PUT",
        &format!("/fhir/Observation/{b_obs}"),
        takeover.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    let r = patch(
        &format!("/fhir/Observation/{b_obs}"),
        json!([{"op": "replace", "path": "/status", "value": "cancelled"}]),
        None,
    );
    assert_eq!(r.status, 404, "{}", r.text());
    let r = call("DELETE", &format!("/fhir/Observation/{b_obs}"), b"").unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(
        get(s, &format!("/fhir/Observation/{b_obs}")).text(),
        b_obs_body
    );
    // A's own observation: an update and a JSON Patch that keep it A's work, and the forwarded
    // change is pinned to the version that was judged.
    let mut mine = get(s, &format!("/fhir/Observation/{a_obs}")).json();
    mine["status"] = json!("amended");
    let r = call(
        "PUT",
        &format!("/fhir/Observation/{a_obs}"),
        mine.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let etag = r.header("etag").unwrap().to_string();
    let r = patch(
        &format!("/fhir/Observation/{a_obs}"),
        json!([{"op": "replace", "path": "/status", "value": "corrected"}]),
        Some(&etag),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        get(s, &format!("/fhir/Observation/{a_obs}")).json()["status"],
        "corrected"
    );
    // A stale If-Match is refused before anything goes upstream.
    let r = patch(
        &format!("/fhir/Observation/{a_obs}"),
        json!([{"op": "replace", "path": "/status", "value": "final"}]),
        Some(&etag),
    );
    assert_eq!(r.status, 412, "{}", r.text());
    // Moving A's observation to B, by update or by patch, is refused; so is FHIRPath Patch,
    // which the gateway cannot apply to judge.
    let before_move = get(s, &format!("/fhir/Observation/{a_obs}")).text();
    let mut moved = get(s, &format!("/fhir/Observation/{a_obs}")).json();
    moved["subject"]["reference"] = json!(format!("Patient/{b}"));
    let r = call(
        "PUT",
        &format!("/fhir/Observation/{a_obs}"),
        moved.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(
        r.json()["issue"][0]["details"]["coding"][0]["code"],
        "patient_compartment"
    );
    for ops in [
        json!([{"op": "replace", "path": "/subject/reference", "value": format!("Patient/{b}")}]),
        json!([{"op": "add", "path": "/performer", "value": [{"reference": format!("Patient/{b}")}]}]),
        json!([{"op": "remove", "path": "/subject"}]),
    ] {
        let r = patch(&format!("/fhir/Observation/{a_obs}"), ops, None);
        assert_eq!(r.status, 403, "{}", r.text());
        assert!(!r.text().contains(&b));
    }
    let fhirpath = json!({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
        {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Observation.subject"},
        {"name": "value", "valueReference": {"reference": format!("Patient/{b}")}}]}]});
    let r = call(
        "PATCH",
        &format!("/fhir/Observation/{a_obs}"),
        fhirpath.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(
        get(s, &format!("/fhir/Observation/{a_obs}")).text(),
        before_move
    );
    // Update-as-create of a new id in A's compartment, then its delete.
    let fresh = json!({"resourceType": "Observation", "id": "a-own-new-1", "status": "final", "code": {"text": "new"}, "subject": {"reference": format!("Patient/{a}")}});
    let r = call(
        "PUT",
        "/fhir/Observation/a-own-new-1",
        fresh.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = call("DELETE", "/fhir/Observation/a-own-new-1", b"").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(s, "/fhir/Observation/a-own-new-1").status, 410);
    // A's own Patient record can be updated, and only as A's.
    let mut me = get(s, &format!("/fhir/Patient/{a}")).json();
    me["active"] = json!(true);
    let r = call(
        "PUT",
        &format!("/fhir/Patient/{a}"),
        me.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let mut linked = me.clone();
    linked["link"] = json!([{"other": {"reference": format!("Patient/{b}")}, "type": "seealso"}]);
    let r = call(
        "PUT",
        &format!("/fhir/Patient/{a}"),
        linked.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());

    // A's own write works and lands in A's compartment.
    let own = json!({"resourceType": "Observation", "status": "final", "code": {"text": "steps"}, "subject": {"reference": format!("Patient/{a}")}});
    let r = call("POST", "/fhir/Observation", own.to_string().as_bytes()).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(r.header("location").unwrap().starts_with(&public_base));

    // Scopes: a token without Observation read gets insufficient_scope.
    let narrow = format!("Bearer {}", token(&a, "patient/Patient.r"));
    let r = request(
        p,
        "GET",
        &format!("/fhir/Observation?patient={a}"),
        &[("Authorization", &narrow)],
        b"",
    );
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer error=\"insufficient_scope\"")
    );
    assert_eq!(
        r.json()["issue"][0]["details"]["coding"][0]["code"],
        "insufficient_scope"
    );
    // A form-encoded POST _search is judged with its body's parameters: another patient there is
    // refused, the caller's own works.
    let r = request(
        p,
        "POST",
        "/fhir/Observation/_search",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        format!("patient={b}").as_bytes(),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let r = request(
        p,
        "POST",
        "/fhir/Observation/_search",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        format!("patient={a}&_count=2").as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["resourceType"], "Bundle");
    // XML and Binary cannot be checked: refused with a clear error, never passed unchecked.
    let r = call("GET", &format!("/fhir/Patient/{a}?_format=xml"), b"").unwrap();
    assert_eq!(r.status, 406);
    assert_eq!(
        r.json()["issue"][0]["details"]["coding"][0]["code"],
        "unsupported_format"
    );
    let r = request(
        p,
        "GET",
        &format!("/fhir/Patient/{a}"),
        &[("Authorization", &auth), ("Accept", "application/fhir+xml")],
        b"",
    );
    assert_eq!(r.status, 406);
    let r = call("GET", "/fhir/Binary/1", b"").unwrap();
    assert_eq!(r.status, 403);
    // Scopes are judged per Bundle entry too.
    let r = request(
        p,
        "POST",
        "/fhir",
        &[
            ("Authorization", &narrow),
            ("Content-Type", "application/fhir+json"),
        ],
        own_tx.to_string().as_bytes(),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(
        r.json()["issue"][0]["details"]["coding"][0]["code"],
        "insufficient_scope"
    );
    assert!(r.json()["issue"][0]["details"]["text"]
        .as_str()
        .unwrap()
        .starts_with("entry 0:"));
    // A restricted scope (laboratory results only): searches must carry the restriction; a read
    // by id is checked on the response, and a vital sign is never delivered.
    let lab_scope = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
    let lab_auth = format!("Bearer {}", token(&a, lab_scope));
    let lab_id = get(
        s,
        &format!("/fhir/Observation?patient={a}&category=laboratory&_count=1"),
    )
    .json()["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let vital_id = get(
        s,
        &format!("/fhir/Observation?patient={a}&category=vital-signs&_count=1"),
    )
    .json()["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = request(
        p,
        "GET",
        &format!("/fhir/Observation/{lab_id}"),
        &[("Authorization", &lab_auth)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // The vital sign is refused cleanly, before anything of it is released.
    let r = request(
        p,
        "GET",
        &format!("/fhir/Observation/{vital_id}"),
        &[("Authorization", &lab_auth)],
        b"",
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer error=\"insufficient_scope\"")
    );
    assert!(!r.text().contains(&vital_id));
    let r = request(
        p,
        "GET",
        &format!("/fhir/Observation?patient={a}"),
        &[("Authorization", &lab_auth)],
        b"",
    );
    assert_eq!(r.status, 403);
    let r = request(
        p,
        "GET",
        &format!("/fhir/Observation?patient={a}&category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory"),
        &[("Authorization", &lab_auth)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Unknown resource types and bad ids are 400 OperationOutcomes from classification.
    let r = request(
        p,
        "GET",
        "/fhir/NotAType/1",
        &[("Authorization", &narrow)],
        b"",
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["resourceType"], "OperationOutcome");

    // Every refusal is in the audit trail with its outcome: the 403s before anything went
    // upstream (denied records), the 404s after the backend answered (completion records).
    let audit = dir.0.join("audit.jsonl");
    let records = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("record").cloned())
            .collect()
    };
    wait_until("audited refusals", Duration::from_secs(10), || {
        let rs = records();
        let has = |phase: &str, status: u64, reason: &str| {
            rs.iter().any(|r| {
                r["phase"] == phase
                    && r["outcome"]["status"] == status
                    && r["outcome"]["reason"] == reason
                    && r["action"]["patient"] == a.as_str()
            })
        };
        has("denied", 403, "patient_compartment")
            && has("completion", 404, "not_found")
            && has("denied", 403, "insufficient_scope")
    });
}

fn staff_token(role: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "https://patients.test", "aud": "portal", "sub": format!("{role}-1"), "exp": now + 600, "roles": [role]}),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[test]
fn less_privileged_roles_get_masked_phi_and_everything_else_is_byte_identical() {
    let (public, admin, sb) = (free_port(), free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
auth:
  issuers:
    - {{ name: staff, issuer: "https://patients.test", algorithms: [HS256], hs_secret: "{SECRET}", audiences: [portal] }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
sandboxes: [ {{ name: fhir, listen: "127.0.0.1:{sb}", data_dir: "@CONF@/demo/data" }} ]
pools: [ {{ name: fhir, zones: [ {{ name: a, backends: [ {{ sandbox: fhir }} ] }} ] }} ]
routes:
  - name: staff-fhir
    listener: public
    path_prefix: /fhir
    fhir: true
    pool: fhir
    filters:
      - {{ kind: jwt_auth }}
      - kind: fhir_mask
        config:
          profiles:
            - roles: [billing]
              resources:
                Patient:
                  - {{ path: telecom, action: remove }}
                  - {{ path: name, action: redact }}
                  - {{ path: address, action: {{ keep_only: [state, postalCode] }} }}
                  - {{ path: birthDate, action: year }}
                  - {{ path: identifier.value, action: {{ last_chars: 4 }} }}
"#
    );
    let _gw = Gateway::start(&yaml, admin);
    let s = addr(sb);
    wait_until("sandbox up", Duration::from_secs(20), || {
        try_request(s, "GET", "/healthz", &[], b"").is_ok()
    });
    let a = get(s, "/fhir/Patient?_count=1").json()["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let direct = get(s, &format!("/fhir/Patient/{a}"));
    let p = addr(public);

    let clinician = request(
        p,
        "GET",
        &format!("/fhir/Patient/{a}"),
        &[(
            "Authorization",
            &format!("Bearer {}", staff_token("clinician")),
        )],
        b"",
    );
    assert_eq!(clinician.status, 200);
    let strip_meta = |v: &serde_json::Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("meta");
        v
    };
    assert_eq!(
        strip_meta(&clinician.json()),
        strip_meta(&direct.json()),
        "no profile: unmasked"
    );

    let billing = request(
        p,
        "GET",
        &format!("/fhir/Patient/{a}"),
        &[(
            "Authorization",
            &format!("Bearer {}", staff_token("billing")),
        )],
        b"",
    );
    assert_eq!(billing.status, 200);
    let m = billing.json();
    let d = direct.json();
    assert!(m.get("telecom").is_none());
    assert!(m["name"][0]["family"] == "REDACTED");
    assert_eq!(
        m["birthDate"].as_str().unwrap(),
        &d["birthDate"].as_str().unwrap()[..4]
    );
    let addr0 = m["address"][0].as_object().unwrap();
    assert!(
        addr0.keys().all(|k| k == "state" || k == "postalCode"),
        "{addr0:?}"
    );
    assert!(m["meta"]["security"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["code"] == "REDACTED"));
    for (i, id) in m["identifier"].as_array().unwrap().iter().enumerate() {
        let orig = d["identifier"][i]["value"].as_str().unwrap();
        let want: String = orig
            .chars()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        assert_eq!(id["value"].as_str().unwrap(), want);
    }
    // Unmasked elements are untouched.
    assert_eq!(m["gender"], d["gender"]);
    assert_eq!(m["id"], d["id"]);
    // Every resource of a search Bundle is masked too.
    let bundle = request(
        p,
        "GET",
        "/fhir/Patient?_count=10",
        &[(
            "Authorization",
            &format!("Bearer {}", staff_token("billing")),
        )],
        b"",
    )
    .json();
    for e in bundle["entry"].as_array().unwrap() {
        assert!(e["resource"].get("telecom").is_none());
        assert_eq!(e["resource"]["name"][0]["family"], "REDACTED");
    }
}
