//! Identity end to end: a real OpenID provider (oidc-provider, npm) found by OIDC discovery,
//! with key rotation and an outage; and the tenant isolation matrix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine;
use caregate_integration_tests::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn oidc_dir() -> PathBuf {
    repo_root().join("integration-tests/peers/oidc")
}

struct Provider {
    child: Child,
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node_available() {
    assert!(
        oidc_dir().join("node_modules/oidc-provider").exists(),
        "oidc-provider is not installed: run `npm ci --prefix integration-tests/peers/oidc` (scripts/test.sh does)"
    );
}

fn gen_keys(args: &[&str]) {
    let out = Command::new("node")
        .arg(oidc_dir().join("gen-keys.mjs"))
        .args(args)
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "gen-keys: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start_provider(port: u16, keys: &str) -> Provider {
    let mut child = Command::new("node")
        .arg(oidc_dir().join("server.mjs"))
        .args(["--port", &port.to_string(), "--keys", keys, "--clients"])
        .arg(oidc_dir().join("clients.example.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("node server.mjs");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(
        line.starts_with("READY "),
        "provider did not start: {line:?}"
    );
    Provider { child }
}

fn token(port: u16, client: &str, secret: &str) -> String {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{client}:{secret}"));
    let r = request(
        addr(port),
        "POST",
        "/token",
        &[
            ("Authorization", &format!("Basic {basic}")),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        b"grant_type=client_credentials&scope=system%2F*.rs",
    );
    assert_eq!(r.status, 200, "token endpoint: {}", r.text());
    r.json()["access_token"].as_str().unwrap().to_string()
}

fn kid_of(token: &str) -> String {
    let h = token.split('.').next().unwrap();
    let h = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h)
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&h).unwrap();
    v["kid"].as_str().unwrap().to_string()
}

#[test]
fn a_real_openid_provider_discovery_rotation_and_outage() {
    node_available();
    let dir = TempDir::new("oidc");
    let keys = dir.0.join("keys.json");
    let keys = keys.to_str().unwrap().to_string();
    gen_keys(&["--out", &keys]);
    let idp_port = free_port();
    let backend = EchoServer::start("fhir");
    let (public, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
auth:
  issuers:
    - name: test-idp
      issuer: "http://127.0.0.1:{idp_port}"
      discovery: true
      algorithms: [RS256]
      audiences: ["https://gateway.test/fhir"]
      refresh_seconds: 3600
      unknown_kid_refresh_seconds: 0
pools: [ {{ name: fhir, zones: [ {{ name: a, backends: [ {{ address: "{b}" }} ] }} ] }} ]
routes:
  - name: fhir
    listener: public
    path_prefix: /fhir
    fhir: true
    pool: fhir
    filters: [ {{ kind: jwt_auth, config: {{ bearer: required }} }} ]
"#,
        b = backend.addr
    );
    let mut idp = Some(start_provider(idp_port, &keys));
    let gw = Gateway::start(&yaml, admin);
    let p = addr(public);
    let call = |t: &str| {
        request(
            p,
            "GET",
            "/fhir/Patient",
            &[("Authorization", &format!("Bearer {t}"))],
            b"",
        )
    };

    // Tokens from the provider's token endpoint, keys found by discovery.
    let t1 = token(idp_port, "hospital-a-app", "hospital-a-secret");
    let r = call(&t1);
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = backend.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.header("x-caregate-subject"), Some("hospital-a-app"));
    assert_eq!(last.header("x-caregate-roles"), Some("clinician"));
    assert_eq!(last.header("x-caregate-auth-method"), Some("token"));
    // No token, a tampered token.
    let r = get(p, "/fhir/Patient");
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"caregate\"")
    );
    assert_eq!(
        r.json()["issue"][0]["details"]["coding"][0]["code"],
        "token_missing"
    );
    let mut tampered = t1.clone();
    tampered.pop();
    tampered.push(if t1.ends_with('A') { 'B' } else { 'A' });
    let r = call(&tampered);
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("error=\"invalid_token\""));

    // The provider rotates its keys: new tokens carry a new kid and still pass.
    gen_keys(&["--add-to", &keys]);
    drop(idp.take());
    idp = Some(start_provider(idp_port, &keys));
    let t2 = token(idp_port, "hospital-a-app", "hospital-a-secret");
    assert_ne!(kid_of(&t2), kid_of(&t1));
    assert_eq!(call(&t2).status, 200, "a token signed with the rotated key");
    let t2b = token(idp_port, "hospital-b-app", "hospital-b-secret");

    // Another rotation, then the provider goes away before the gateway saw the newest key.
    gen_keys(&["--add-to", &keys]);
    drop(idp.take());
    idp = Some(start_provider(idp_port, &keys));
    let t3 = token(idp_port, "hospital-a-app", "hospital-a-secret");
    drop(idp.take());
    // Known keys still verify (t2b was never seen, so no cache is involved) ...
    let r = call(&t2b);
    assert_eq!(
        r.status,
        200,
        "a token signed by a known key while the provider is down: {}",
        r.text()
    );
    assert_eq!(
        backend.seen().last().unwrap().header("x-caregate-subject"),
        Some("hospital-b-app")
    );
    // ... and an unknown kid fails with 401, not a hang or a 500.
    let r = call(&t3);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        r.json()["issue"][0]["details"]["coding"][0]["code"],
        "token_invalid"
    );
    let m = gw.metrics();
    assert!(
        m.contains(r#"caregate_jwks_refresh_total{issuer="test-idp",result="ok"}"#),
        "{m}"
    );
    assert!(m.contains(r#"caregate_jwks_refresh_total{issuer="test-idp",result="error"}"#));
    assert!(!m.contains(&t1[..20]), "no token material in metrics");
}

const SECRET: &[u8] = b"tenant-matrix-shared-secret-0123456789";

fn hs_token(sub: &str, tenant: Option<&str>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut c = json!({"iss": "https://staff-idp.test", "aud": "caregate", "sub": sub, "exp": now + 600, "iat": now, "roles": ["clinician"]});
    if let Some(t) = tenant {
        c["tenant"] = json!(t);
    }
    encode(
        &Header::new(Algorithm::HS256),
        &c,
        &EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap()
}

#[test]
fn tenant_isolation_matrix() {
    let audit_dir = TempDir::new("tenant-audit");
    let a = EchoServer::start("hospital-a");
    let b = EchoServer::start("hospital-b");
    let (public, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
audit: {{ path: "{audit}", hmac_key: "tenant-matrix-audit-key-0123456789abcdef" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
auth:
  issuers:
    - {{ name: staff, issuer: "https://staff-idp.test", algorithms: [HS256], hs_secret: "{secret}", audiences: [caregate] }}
tenants:
  - {{ id: hospital-a, hosts: [a.example.org], pool: pool-a }}
  - {{ id: hospital-b, hosts: [b.example.org], pool: pool-b }}
pools:
  - {{ name: pool-a, zones: [ {{ name: z, backends: [ {{ address: "{a}" }} ] }} ] }}
  - {{ name: pool-b, zones: [ {{ name: z, backends: [ {{ address: "{b}" }} ] }} ] }}
routes:
  - name: fhir
    listener: public
    path_prefix: /fhir
    fhir: true
    phi: true
    pool: pool-a
    filters:
      - {{ kind: jwt_auth }}
      - {{ kind: tenant, config: {{ resolve: [host, header] }} }}
"#,
        secret = String::from_utf8_lossy(SECRET),
        a = a.addr,
        b = b.addr,
        audit = audit_dir.0.join("audit.jsonl").display()
    );
    let _gw = Gateway::start(&yaml, admin);
    let p = addr(public);
    let tenants = [
        ("hospital-a", "a.example.org", &a),
        ("hospital-b", "b.example.org", &b),
    ];
    for (i, (tenant, host, backend)) in tenants.iter().enumerate() {
        let (other, _, other_backend) = tenants[1 - i];
        let own = hs_token("dr-own", Some(tenant));
        let foreign = hs_token("dr-foreign", Some(other));
        let none = hs_token("dr-none", None);
        let (before_own, before_other) = (backend.count(), other_backend.count());

        // Own token: reaches its own hospital's backend only, with the verified identity.
        let r = request(
            p,
            "GET",
            "/fhir/Patient/1",
            &[
                ("Host", host),
                ("Authorization", &format!("Bearer {own}")),
                ("X-Caregate-Tenant", other),
            ],
            b"",
        );
        assert_eq!(r.status, 200, "{tenant}: {}", r.text());
        assert_eq!(r.json()["backend"], *tenant);
        let seen = backend.seen();
        let last = seen.last().unwrap();
        assert_eq!(last.header("x-caregate-tenant"), Some(*tenant));
        assert_eq!(last.header("x-caregate-subject"), Some("dr-own"));
        assert_eq!(backend.count(), before_own + 1);

        // Everything cross-tenant is refused and reaches no backend.
        let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
            (
                "other tenant's token",
                vec![
                    ("Host", host.to_string()),
                    ("Authorization", format!("Bearer {foreign}")),
                ],
            ),
            (
                "no tenant claim",
                vec![
                    ("Host", host.to_string()),
                    ("Authorization", format!("Bearer {none}")),
                ],
            ),
            (
                "spoofed tenant header",
                vec![
                    ("Host", "127.0.0.1".to_string()),
                    ("Authorization", format!("Bearer {own}")),
                    ("X-Tenant-Id", other.to_string()),
                ],
            ),
            (
                "own token, other hospital's host",
                vec![
                    ("Host", tenants[1 - i].1.to_string()),
                    ("Authorization", format!("Bearer {own}")),
                ],
            ),
            (
                "unknown tenant",
                vec![
                    ("Host", "127.0.0.1".to_string()),
                    ("Authorization", format!("Bearer {own}")),
                    ("X-Tenant-Id", "hospital-z".to_string()),
                ],
            ),
        ];
        for (what, headers) in cases {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = request(p, "GET", "/fhir/Patient/1", &h, b"");
            assert_eq!(r.status, 403, "{tenant} / {what}: {}", r.text());
            assert_eq!(
                r.json()["issue"][0]["details"]["coding"][0]["code"],
                "tenant_mismatch",
                "{what}"
            );
        }
        assert_eq!(
            backend.count(),
            before_own + 1,
            "{tenant}: a refused request reached a backend"
        );
        assert_eq!(
            other_backend.count(),
            before_other,
            "{tenant}: a refused request reached the other hospital"
        );
    }
}

#[test]
fn shadow_tenant_isolation_is_refused_on_phi_routes() {
    let dir = TempDir::new("phi");
    let p = dir.0.join("c.yaml");
    std::fs::write(
        &p,
        r#"
listeners: [ { name: public, channel: public, listen: "127.0.0.1:0" } ]
audit: { path: "/tmp/caregate-unused-audit.jsonl", hmac_key: "0123456789abcdef0123456789abcdef" }
auth: { issuers: [ { name: s, issuer: "https://s.test", algorithms: [HS256], hs_secret: "0123456789abcdef0123", audiences: [c] } ] }
tenants: [ { id: a } ]
pools: [ { name: p, zones: [ { name: z, backends: [ { address: "127.0.0.1:9" } ] } ] } ]
routes:
  - { name: r, listener: public, path_prefix: /fhir, pool: p, phi: true, filters: [ { kind: jwt_auth }, { kind: tenant, config: { mode: shadow } } ] }
"#,
    )
    .unwrap();
    let out = Command::new(caregate_bin())
        .args(["check", "-c", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("routes[0].filters[1] (tenant): mode shadow is not allowed"),
        "{err}"
    );
    let _ = Duration::from_secs(0);
}

/// An issuer whose key set cannot be loaded at start leaves the gateway not ready (its tokens
/// could not be verified), with the reason on `/readyz`; once the provider answers, it is.
#[test]
fn an_issuer_without_a_usable_key_set_is_not_ready() {
    node_available();
    let dir = TempDir::new("oidc-late");
    let keys = dir.0.join("keys.json");
    let keys = keys.to_str().unwrap().to_string();
    gen_keys(&["--out", &keys]);
    let idp_port = free_port();
    let backend = EchoServer::start("fhir");
    let (public, admin) = (free_port(), free_port());
    let cfg = dir.0.join("caregate.yaml");
    std::fs::write(
        &cfg,
        format!(
            r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
auth:
  issuers:
    - {{ name: late-idp, issuer: "http://127.0.0.1:{idp_port}", discovery: true, algorithms: [RS256], audiences: [x], refresh_seconds: 1 }}
pools: [ {{ name: fhir, zones: [ {{ name: a, backends: [ {{ address: "{b}" }} ] }} ] }} ]
routes:
  - {{ name: fhir, listener: public, path_prefix: /fhir, pool: fhir, filters: [ {{ kind: jwt_auth }} ] }}
"#,
            b = backend.addr
        ),
    )
    .unwrap();
    // The provider is down when the gateway starts.
    let gw = Proc::spawn(&["run", "-c", cfg.to_str().unwrap()], "late-idp");
    let mut last = String::new();
    wait_until(
        "a not-ready answer naming the issuer",
        Duration::from_secs(30),
        || match try_request(addr(admin), "GET", "/readyz", &[], b"") {
            Ok(r) => {
                last = format!("{} {}", r.status, r.text());
                r.status == 503
                    && r.text()
                        .contains("no usable key set for issuer(s) late-idp")
            }
            Err(_) => false,
        },
    );
    assert!(!last.contains(&idp_port.to_string()), "{last}");
    // The upstream is healthy: only the missing key set holds readiness back.
    let m = request(addr(admin), "GET", "/metrics", &[], b"").text();
    assert!(m.contains("caregate_upstream_backend_healthy{"), "{m}");
    let _idp = start_provider(idp_port, &keys);
    wait_until(
        "ready once the key set loads",
        Duration::from_secs(30),
        || {
            try_request(addr(admin), "GET", "/readyz", &[], b"")
                .map(|r| r.status == 200)
                .unwrap_or(false)
        },
    );
    drop(gw);
}
