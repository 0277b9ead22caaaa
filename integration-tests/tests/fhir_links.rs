//! Link rewriting with a backend whose base URL differs from the gateway's public base, checked
//! by a real FHIR client (fhirpy) that pages through the gateway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::process::Command;

#[test]
fn a_real_fhir_client_pages_through_the_gateway_and_only_sees_gateway_urls() {
    let python = repo_root().join("integration-tests/peers/fhirpy/.venv/bin/python");
    assert!(
        python.exists(),
        "fhirpy is not installed: run `bash scripts/deps.sh --with-test-peers` (scripts/test.sh does)"
    );
    let (public, admin, sb) = (free_port(), free_port(), free_port());
    let backend_base = format!("http://127.0.0.1:{sb}/fhir");
    let public_base = format!("http://127.0.0.1:{public}/r4");
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
sandboxes: [ {{ name: fhir, listen: "127.0.0.1:{sb}", data_dir: "@CONF@/demo/data" }} ]
pools: [ {{ name: fhir, zones: [ {{ name: a, backends: [ {{ sandbox: fhir }} ] }} ] }} ]
routes:
  - name: r4
    listener: public
    path_prefix: /r4
    upstream_prefix: /fhir
    fhir: true
    pool: fhir
    filters:
      - {{ kind: fhir_links, config: {{ backend_base: "{backend_base}", public_base: "{public_base}" }} }}
"#
    );
    let _gw = Gateway::start(&yaml, admin);
    wait_until("sandbox up", std::time::Duration::from_secs(20), || {
        try_request(addr(sb), "GET", "/healthz", &[], b"").is_ok()
    });

    // The backend itself writes its own base into links...
    let direct = get(addr(sb), "/fhir/Observation?_count=3");
    assert!(direct.text().contains(&backend_base));
    // ... which the gateway rewrites, in the body and in Location headers.
    let r = get(addr(public), "/r4/Observation?_count=3");
    assert_eq!(r.status, 200);
    assert!(!r.text().contains(&backend_base), "{}", r.text());
    assert!(r.json()["link"][0]["url"]
        .as_str()
        .unwrap()
        .starts_with(&public_base));
    let out = Command::new(&python)
        .arg(repo_root().join("integration-tests/peers/fhirpy/page_through.py"))
        .arg(&public_base)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fhirpy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["patients"].as_u64().unwrap() >= 4, "{v}");
    assert!(
        v["observations"].as_u64().unwrap() > 5,
        "paged through more than one page: {v}"
    );
    let requested = v["requested"].as_array().unwrap();
    assert!(requested.len() > 4, "fhirpy followed next links: {v}");
    for u in requested.iter().chain(v["seen"].as_array().unwrap()) {
        let u = u.as_str().unwrap();
        assert!(
            u.starts_with(&public_base),
            "the client saw a non-gateway URL: {u}"
        );
    }

    // Location headers of writes are rewritten too.
    let created = request(
        addr(public),
        "POST",
        "/r4/Patient",
        &[("Content-Type", "application/fhir+json")],
        br#"{"resourceType":"Patient","name":[{"family":"Test"}]}"#,
    );
    assert_eq!(created.status, 201, "{}", created.text());
    assert!(created
        .header("location")
        .unwrap()
        .starts_with(&format!("{public_base}/Patient/")));
}
