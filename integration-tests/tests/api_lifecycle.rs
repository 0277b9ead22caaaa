//! API versions and their lifecycle end to end: deprecation and sunset headers, the 410 after
//! sunset (with the real clock passing a sunset a few seconds ahead), retired, draft and preview
//! versions, header versioning, the sandbox environment (sandbox-only tokens, sandbox pools,
//! labelled metrics, access log and audit) and `caregate usage` on the real access log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const PROD_SECRET: &str = "production-issuer-secret-0123456789abcdef";
const SBX_SECRET: &str = "sandbox-issuer-secret-0123456789abcdef0000";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(iss: &str, secret: &str, client: &str, roles: &[&str]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": iss, "aud": "api", "sub": format!("user-{client}"), "client_id": client,
                "exp": now() + 600, "roles": roles, "scope": "user/*.rs"}),
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// `YYYY-MM-DDTHH:MM:SSZ` of Unix seconds.
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[test]
fn versions_move_through_their_lifecycle_and_sandboxes_stay_apart() {
    let (public, sandbox, admin, sb_prod, sb_sbx) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let dir = TempDir::new("api-lifecycle");
    let access = dir.0.join("access.jsonl");
    let audit = dir.0.join("audit.jsonl");
    // v5 reaches its sunset a few seconds from now, on the real clock.
    let soon = now() + 4;
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ path: "{access}" }}
audit: {{ path: "{audit}", hmac_key: "api-lifecycle-test-audit-key-0123456789abcdef" }}
auth:
  issuers:
    - {{ name: staff, issuer: "https://staff.test", algorithms: [HS256], hs_secret: "{PROD_SECRET}", audiences: [api] }}
    - {{ name: sbx, issuer: "https://sandbox.test", sandbox: true, algorithms: [HS256], hs_secret: "{SBX_SECRET}", audiences: [api] }}
listeners:
  - {{ name: public, channel: public, listen: "127.0.0.1:{public}" }}
  - {{ name: try, channel: public, environment: sandbox, listen: "127.0.0.1:{sandbox}" }}
sandboxes:
  - {{ name: prod-fhir, listen: "127.0.0.1:{sb_prod}", data_dir: "@CONF@/demo/data" }}
  - {{ name: sbx-fhir, listen: "127.0.0.1:{sb_sbx}", data_dir: "@CONF@/demo/data" }}
pools:
  - {{ name: fhir, zones: [ {{ name: a, backends: [ {{ sandbox: prod-fhir }} ] }} ] }}
  - {{ name: fhir-sbx, environment: sandbox, zones: [ {{ name: a, backends: [ {{ sandbox: sbx-fhir }} ] }} ] }}
apis:
  - name: patient-api
    owner: patient-platform
    docs: https://dev.example.test/patient-api
    routes: [pfhir]
    sandbox: {{ listener: try, pool: fhir-sbx }}
    versions:
      - {{ name: v0, state: retired, successor: v2 }}
      - {{ name: v1, state: deprecated, deprecated_at: 2026-01-01, sunset: 2031-01-01, successor: v2 }}
      - {{ name: v2, state: live }}
      - {{ name: v3, state: draft }}
      - {{ name: v4, state: preview, preview_roles: [beta] }}
      - {{ name: v5, state: live, sunset: "{soon_text}", successor: v2 }}
  - name: header-api
    owner: ehr-team
    docs: https://dev.example.test/header-api
    versioning: header
    default_version: r1
    routes: [hfhir]
    versions:
      - {{ name: r1, state: live }}
      - {{ name: r2, state: deprecated, sunset: 2031-06-30, successor: r1 }}
routes:
  - name: pfhir
    listener: public
    path_prefix: /fhir
    fhir: true
    phi: true
    pool: fhir
    filters: [ {{ kind: jwt_auth }} ]
  - name: hfhir
    listener: public
    path_prefix: /h/fhir
    upstream_prefix: /fhir
    fhir: true
    phi: true
    pool: fhir
    filters: [ {{ kind: jwt_auth }} ]
"#,
        access = access.display(),
        audit = audit.display(),
        soon_text = rfc3339(soon),
    );
    let mut gw = Gateway::start(&yaml, admin);
    let (p, s) = (addr(public), addr(sandbox));
    let old_app = token("https://staff.test", PROD_SECRET, "old-mobile-app", &[]);
    let new_app = token("https://staff.test", PROD_SECRET, "new-app", &[]);
    let beta = token("https://staff.test", PROD_SECRET, "beta-app", &["beta"]);
    let sbx = token("https://sandbox.test", SBX_SECRET, "sandbox-app", &[]);
    let bearer = |t: &str| format!("Bearer {t}");
    let call = |to, path: &str, t: &str| {
        let h = bearer(t);
        request(to, "GET", path, &[("authorization", h.as_str())], b"")
    };

    // A live version: served, no lifecycle headers.
    let r = call(p, "/v2/fhir/Patient?_count=1", &new_app);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("deprecation").is_none() && r.header("sunset").is_none());

    // A deprecated version: served, with Deprecation (RFC 9745), Sunset (RFC 8594) and Link.
    let r = call(p, "/v1/fhir/Patient?_count=1", &old_app);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("deprecation"), Some("@1767225600"));
    assert_eq!(r.header("sunset"), Some("Wed, 01 Jan 2031 00:00:00 GMT"));
    let links: Vec<&str> = r
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("link"))
        .map(|(_, v)| v.as_str())
        .collect();
    let links = links.join(", ");
    assert!(
        links.contains("<https://dev.example.test/patient-api>; rel=\"deprecation\"")
            && links.contains("rel=\"sunset\"")
            && links.contains("</v2/fhir>; rel=\"successor-version\""),
        "{links}"
    );

    // Retired by hand: 410 api_sunset naming the successor, as an OperationOutcome.
    let r = call(p, "/v0/fhir/Patient?_count=1", &old_app);
    assert_eq!(r.status, 410);
    assert!(r.text().contains("api_sunset") && r.text().contains("/v2/fhir"));
    assert!(r
        .header("content-type")
        .unwrap_or("")
        .starts_with("application/fhir+json"));
    assert!(r.text().contains("OperationOutcome"));
    assert!(r.header("link").unwrap_or("").contains("successor-version"));

    // Draft: not on the production listener; served on the sandbox listener.
    let r = call(p, "/v3/fhir/Patient?_count=1", &new_app);
    assert_eq!(r.status, 404);
    assert!(r.text().contains("route_not_found"));
    let r = call(s, "/v3/fhir/Patient?_count=1", &sbx);
    assert_eq!(r.status, 200, "{}", r.text());

    // Preview: only callers with a preview role.
    let r = call(p, "/v4/fhir/Patient?_count=1", &new_app);
    assert_eq!(r.status, 403);
    assert!(r.text().contains("role_denied"));
    assert_eq!(call(p, "/v4/fhir/Patient?_count=1", &beta).status, 200);

    // Sandbox credentials only in the sandbox, and only sandbox credentials there.
    let r = call(p, "/v2/fhir/Patient?_count=1", &sbx);
    assert_eq!(r.status, 401, "a sandbox token on a production route");
    assert_eq!(call(s, "/v2/fhir/Patient?_count=1", &new_app).status, 401);
    assert_eq!(call(s, "/v1/fhir/Patient?_count=1", &sbx).status, 200);

    // Header versioning: no header -> the default version; API-Version picks another; an
    // unknown version reaches nothing.
    let r = call(p, "/h/fhir/Patient?_count=1", &new_app);
    assert_eq!(r.status, 200);
    assert!(r.header("deprecation").is_none());
    let h = bearer(&old_app);
    let r = request(
        p,
        "GET",
        "/h/fhir/Patient?_count=1",
        &[("authorization", h.as_str()), ("api-version", "r2")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert!(r.header("deprecation").is_some());
    assert!(r
        .header("link")
        .unwrap_or("")
        .contains("</h/fhir>; rel=\"successor-version\""));
    let r = request(
        p,
        "GET",
        "/h/fhir/Patient?_count=1",
        &[("authorization", h.as_str()), ("api-version", "r9")],
        b"",
    );
    assert_eq!(r.status, 404);

    // v5: served with its Sunset date until the clock passes it, then 410.
    let r = call(p, "/v5/fhir/Patient?_count=1", &new_app);
    if now() < soon {
        assert_eq!(r.status, 200);
        assert!(r.header("sunset").is_some());
    }
    wait_until(
        "v5 retired by its sunset date",
        Duration::from_secs(15),
        || call(p, "/v5/fhir/Patient?_count=1", &new_app).status == 410,
    );

    // Metrics count calls per API, version, state and environment.
    let m = gw.metrics();
    assert!(
        m.lines()
            .any(|l| l.starts_with("caregate_api_requests_total{")
                && l.contains("api=\"patient-api\"")
                && l.contains("version=\"v1\"")
                && l.contains("state=\"deprecated\"")
                && l.contains("environment=\"production\"")),
        "{m}"
    );
    assert!(m
        .lines()
        .any(|l| l.starts_with("caregate_api_requests_total{")
            && l.contains("environment=\"sandbox\"")));

    // A lifecycle change is a reload, not a restart: v2 retired by hand answers 410 at once.
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    let retired = text.replace(
        "{ name: v2, state: live }",
        "{ name: v2, state: retired, successor: v1 }",
    );
    assert_ne!(text, retired);
    std::fs::write(&gw.config_path, retired).unwrap();
    let r = request(gw.admin, "POST", "/reload", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call(p, "/v2/fhir/Patient?_count=1", &new_app);
    assert_eq!(r.status, 410, "{}", r.text());
    assert!(r
        .header("link")
        .unwrap_or("")
        .contains("</v1/fhir>; rel=\"successor-version\""));

    gw.sigterm_and_wait();

    // The access log: sandbox traffic is labelled and never went to the production pool.
    let log = std::fs::read_to_string(&access).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let sandbox_lines: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["listener"] == "try").collect();
    assert!(sandbox_lines.len() >= 3);
    for l in &sandbox_lines {
        assert_eq!(l["environment"], "sandbox");
        assert_ne!(
            l["pool"], "fhir",
            "sandbox traffic reached a production pool: {l}"
        );
    }
    assert!(sandbox_lines.iter().any(|l| l["pool"] == "fhir-sbx"));
    // The audit trail labels sandbox records.
    let trail = std::fs::read_to_string(&audit).unwrap();
    assert!(trail
        .lines()
        .any(|l| l.contains("\"environment\":\"sandbox\"")));
    assert!(trail
        .lines()
        .filter(|l| l.contains("\"listener\":\"public\""))
        .all(|l| !l.contains("\"environment\":\"sandbox\"")));

    // `caregate usage`: who still calls deprecated (or retired) versions, from the real log.
    let out = Command::new(caregate_bin())
        .args(["usage", access.to_str().unwrap(), "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let users: Vec<(String, String)> = report["usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["version"].as_str().unwrap().to_string(),
                u["client_id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        users.contains(&("v1".into(), "old-mobile-app".into())),
        "{users:?}"
    );
    // A retired version answers 410 before any credential is looked at: those calls are
    // counted without a client id.
    assert!(users.contains(&("v0".into(), String::new())), "{users:?}");
    assert!(
        users.contains(&("r2".into(), "old-mobile-app".into())),
        "{users:?}"
    );
    assert!(
        !users.iter().any(|(_, c)| c == "new-app" || c == "beta-app"),
        "only calls to live versions: {users:?}"
    );
    let text = Command::new(caregate_bin())
        .args(["usage", access.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("old-mobile-app") && text.contains("patient-api"),
        "{text}"
    );
}

#[test]
fn a_sandbox_listener_never_sends_to_a_production_pool() {
    let dir = TempDir::new("api-sandbox-check");
    let cfg = dir.0.join("c.yaml");
    std::fs::write(
        &cfg,
        r#"
listeners:
  - { name: try, channel: public, environment: sandbox, listen: "127.0.0.1:0" }
pools: [ { name: fhir, zones: [ { name: a, backends: [ { address: "127.0.0.1:9" } ] } ] } ]
routes: [ { name: r, listener: try, path_prefix: /fhir, pool: fhir } ]
"#,
    )
    .unwrap();
    let out = Command::new(caregate_bin())
        .args(["check", "-c", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sandbox traffic never reaches production pools"),
        "{err}"
    );
}
