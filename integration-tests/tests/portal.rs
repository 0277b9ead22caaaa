//! The developer portal end to end: a gateway with a FHIR API in two versions on a sandbox
//! listener, against the built-in synthetic FHIR sandbox. Its OpenAPI document is validated by
//! `openapi-spec-validator`, exercised by `schemathesis` (the read and search operations, with
//! a sandbox token), and its Redoc page is rendered by headless Chromium with the network off
//! for anything but loopback.
//!
//! Peers: the venv `integration-tests/peers/portal/.venv` (openapi-spec-validator,
//! schemathesis), Redoc in `portal/node_modules` and Debian's `/usr/bin/chromium`, all installed
//! by `bash scripts/deps.sh --with-test-peers`. A missing peer skips its part with a message,
//! except under CI (`CI` set), where its absence fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECRET: &str = "portal-sandbox-token-secret-0123456789abcdef";
const SECRET_VAR: &str = "CAREGATE_PORTAL_TEST_HS_SECRET";

/// Whether a peer is there; without it, skip (outside CI) or fail (under CI).
fn peer(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} is missing (CI is set, so this fails): run `bash scripts/deps.sh --with-test-peers`"
    );
    eprintln!("SKIPPED part of the portal test: {what} is missing (run `bash scripts/deps.sh --with-test-peers`)");
    false
}

fn venv_bin(name: &str) -> PathBuf {
    repo_root()
        .join("integration-tests/peers/portal/.venv/bin")
        .join(name)
}

fn redoc_dir() -> PathBuf {
    repo_root().join("portal/node_modules/redoc/bundles")
}

fn token(scope: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "https://sandbox-idp.test", "aud": "developer-sandbox", "sub": "dev-1", "exp": now + 3600, "scope": scope}),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn config(admin: u16, public: u16, sandbox: u16, fhir: u16) -> String {
    format!(
        r#"
server: {{ threads: 2, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
auth:
  issuers:
    - {{ name: sandbox-idp, issuer: "https://sandbox-idp.test", algorithms: [HS256], hs_secret: "${{{SECRET_VAR}}}", audiences: [developer-sandbox], sandbox: true }}
listeners:
  - {{ name: public, channel: public, listen: "127.0.0.1:{public}" }}
  - {{ name: developer-sandbox, channel: public, listen: "127.0.0.1:{sandbox}", environment: sandbox }}
sandboxes: [ {{ name: synthetic, listen: "127.0.0.1:{fhir}", data_dir: "@CONF@/demo/data" }} ]
pools:
  - {{ name: sandbox-fhir, environment: sandbox, zones: [ {{ name: a, backends: [ {{ sandbox: synthetic }} ] }} ], health_check: {{ path: /healthz, interval_ms: 500 }} }}
routes:
  - name: patient-fhir
    listener: developer-sandbox
    path_prefix: /fhir
    fhir: true
    methods: [GET, HEAD]
    pool: sandbox-fhir
    filters:
      - {{ kind: jwt_auth }}
      - {{ kind: smart_scopes }}
apis:
  - name: patient-api
    title: Patient API
    description: Patients and their clinical data, as FHIR R4.
    owner: patient-records-team
    docs: https://developer.example-hospital.org/patient-api
    routes: [patient-fhir]
    sandbox: {{ listener: developer-sandbox, pool: sandbox-fhir }}
    versions:
      - {{ name: v1, state: deprecated, deprecated_at: "2025-01-01", sunset: "2999-12-31", successor: v2 }}
      - {{ name: v2, state: live }}
portal:
  listener: developer-sandbox
  title: Example Hospital developer sandbox
  redoc_dir: "{redoc}"
  refresh_seconds: 10
"#,
        redoc = redoc_dir().display()
    )
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_portal_documents_validates_fuzzes_and_renders() {
    std::env::set_var(SECRET_VAR, SECRET);
    let (admin, public, sandbox, fhir) = (free_port(), free_port(), free_port(), free_port());
    let gw = Gateway::start(&config(admin, public, sandbox, fhir), admin);
    let sb = addr(sandbox);
    let dir = TempDir::new("portal");

    // The document: the CapabilityStatement-derived paths appear once it is fetched.
    let mut doc = Value::Null;
    wait_until(
        "the CapabilityStatement in the document",
        Duration::from_secs(30),
        || {
            let r = get(sb, "/developer/openapi.json");
            if r.status != 200 {
                return false;
            }
            doc = r.json();
            doc["paths"]["/v2/fhir/Patient/{id}"].is_object()
        },
    );
    let r = get(sb, "/developer/openapi.json");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["servers"][0]["url"],
        format!("http://127.0.0.1:{sandbox}")
    );
    let v1 = &doc["paths"]["/v1/fhir/Patient/{id}"]["get"];
    assert_eq!(v1["deprecated"], true);
    assert_eq!(v1["tags"][0], "patient-api v1 (deprecated)");
    assert!(v1["responses"]["410"].is_object());
    assert!(doc["paths"]["/v2/fhir/Patient"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "birthdate"));
    // GET/HEAD only on the route: no create.
    assert!(doc["paths"]["/v2/fhir/Patient"].get("post").is_none());
    assert_eq!(
        doc["components"]["securitySchemes"]["smart"]["type"],
        "openIdConnect"
    );
    let doc_path = dir.0.join("openapi.json");
    std::fs::write(&doc_path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    // The versions really route (the deprecated one with its headers).
    let auth = format!("Bearer {}", token("user/*.rs"));
    let r = request(
        sb,
        "GET",
        "/v1/fhir/Patient?_count=1",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("deprecation").is_some() && r.header("sunset").is_some());
    let r = request(
        sb,
        "GET",
        "/v2/fhir/Patient?_count=1",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // The public (production) listener has no portal.
    assert_eq!(get(addr(public), "/developer/openapi.json").status, 404);

    // a. openapi-spec-validator.
    let validator = venv_bin("openapi-spec-validator");
    if peer("openapi-spec-validator (venv)", validator.exists()) {
        let (ok, out) = run(Command::new(&validator).arg(&doc_path));
        assert!(ok, "openapi-spec-validator refused the document:\n{out}");
        eprintln!("openapi-spec-validator: {}", out.trim());
    }

    // b. schemathesis: the read and search operations of both versions for two types.
    let st = venv_bin("st");
    if peer("schemathesis (venv)", st.exists()) {
        let report = dir.0.join("junit.xml");
        // Real ids for the reads (the rest of the run draws its own, which are not found).
        let mut toml = String::new();
        for ty in ["Patient", "Observation"] {
            let id = get(addr(fhir), &format!("/fhir/{ty}?_count=1")).json()["entry"][0]
                ["resource"]["id"]
                .as_str()
                .unwrap()
                .to_string();
            for v in ["v1", "v2"] {
                toml.push_str(&format!(
                    "[[operations]]\ninclude-operation-id = \"patient-fhir@{v}.read.{ty}\"\nparameters = {{ \"path.id\" = \"{id}\" }}\n\n"
                ));
            }
        }
        let config_file = dir.0.join("schemathesis.toml");
        std::fs::write(&config_file, toml).unwrap();
        let (ok, out) = run(Command::new(&st).current_dir(&dir.0).args([
            "--config-file",
            config_file.to_str().unwrap(),
            "run",
            &format!("http://127.0.0.1:{sandbox}/developer/openapi.json"),
            "--url",
            &format!("http://127.0.0.1:{sandbox}"),
            "--include-operation-id-regex",
            r"^patient-fhir@v[12]\.(read|search)\.(Patient|Observation)$",
            "-H",
            &format!("Authorization: {auth}"),
            "--max-examples",
            "15",
            "--seed",
            "20240601",
            "--workers",
            "2",
            "--request-timeout",
            "10",
            "--report",
            "junit",
            "--report-junit-path",
            report.to_str().unwrap(),
        ]));
        eprintln!("schemathesis output:\n{out}");
        assert!(
            ok,
            "schemathesis failed:\n{out}\ngateway log:\n{}",
            gw.proc.log()
        );
        // The run's size, from its summary: operations tested and test cases generated.
        let tested = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Tested: "))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let generated = out
            .lines()
            .find_map(|l| l.trim().split_once(" generated"))
            .and_then(|(n, _)| n.trim().parse::<usize>().ok())
            .unwrap_or(0);
        eprintln!(
            "schemathesis run size: {tested} operations, at most 15 examples each per phase, {generated} test cases in all"
        );
        assert_eq!(tested, 8, "{out}");
        assert!(generated >= 8, "{out}");
        assert!(report.exists());
    }

    // c. The Redoc page in headless Chromium, offline but for loopback.
    let chromium = Path::new("/usr/bin/chromium");
    let redoc_ok = redoc_dir().join("redoc.standalone.js").is_file();
    if peer("Redoc (portal/node_modules)", redoc_ok) && peer("/usr/bin/chromium", chromium.exists())
    {
        let page = get(sb, "/developer/");
        assert_eq!(page.status, 200);
        let html = page.text();
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "{html}"
        );
        let js = get(sb, "/developer/assets/redoc.standalone.js");
        assert_eq!(js.status, 200);
        assert!(js.body.len() > 100_000);
        assert_eq!(
            get(sb, "/developer/assets/..%2F..%2Fpackage.json").status / 100,
            4
        );

        let url = format!("http://127.0.0.1:{sandbox}/developer/");
        let shot = dir.0.join("portal.png");
        let chrome = |extra: &[&str]| {
            let profile = TempDir::new("chromium-profile");
            let mut c = Command::new(chromium);
            c.args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                // Nothing but loopback: every name resolves to nothing, and anything not on
                // loopback goes to a proxy that does not exist.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--proxy-server=http://127.0.0.1:9",
                "--window-size=1400,1800",
                "--virtual-time-budget=10000",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .args(extra)
            .arg(&url);
            let r = run(&mut c);
            drop(profile);
            r
        };
        let (_, dom) = chrome(&["--dump-dom"]);
        // Redoc rendered the operations (their summaries) and the lifecycle (tags).
        for text in [
            "Read a Patient",
            "Search Observation",
            "patient-api v1 (deprecated)",
            "patient-api v2",
        ] {
            assert!(
                dom.contains(text),
                "the rendered page has no `{text}`:\n{}",
                &dom[..dom.len().min(4000)]
            );
        }
        let (ok, out) = chrome(&[&format!("--screenshot={}", shot.display())]);
        assert!(ok && shot.exists(), "chromium --screenshot failed:\n{out}");
        let png = std::fs::read(&shot).unwrap();
        eprintln!("screenshot: {} bytes", png.len());
        assert!(
            png.len() > 30_000,
            "a near-empty screenshot ({} bytes)",
            png.len()
        );
        if let Ok(keep) = std::env::var("CAREGATE_PORTAL_SCREENSHOT") {
            std::fs::copy(&shot, keep).unwrap();
        }
        // The security headers the gateway sends with the page.
        let csp = page
            .header("content-security-policy")
            .unwrap_or_default()
            .to_string();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
            "the page has no strict Content-Security-Policy header: `{csp}`"
        );
        assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    }
}
