//! `caregate check` and the example configs under `conf/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::process::Command;

fn check(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(caregate_bin())
        .args(["check", "-c", path.to_str().unwrap()])
        .env("CAREGATE_ADMIN_TOKEN", "example-token")
        .env(
            "CAREGATE_AUDIT_KEY",
            "an-example-audit-key-of-at-least-32-bytes",
        )
        .env("CAREGATE_RATELIMIT_KEY", "an-example-rate-limit-key")
        // What `caregate demo` sets for conf/demo.yaml.
        .env("CAREGATE_DEMO_STATE", std::env::temp_dir())
        .env(
            "CAREGATE_DEMO_TOKEN_SECRET",
            "an-example-demo-token-secret-0123456789",
        )
        .env(
            "CAREGATE_DEMO_AUDIT_KEY",
            "an-example-demo-audit-key-0123456789abcd",
        )
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The files the production-shaped example names under /etc/caregate/tls, made from a test PKI
/// (`check` reads every certificate, key and CA file, as `run` would).
fn example_tls_dir(pki: &Pki) -> TempDir {
    let dir = TempDir::new("example-tls");
    pki.write_example_tls(&dir.0);
    dir
}

#[test]
fn every_example_config_is_valid() {
    let conf = repo_root().join("conf");
    let pki = Pki::new();
    let tls = example_tls_dir(&pki);
    let copies = TempDir::new("example-copies");
    let mut n = 0;
    let mut stack = vec![conf];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().map(|e| e == "yaml").unwrap_or(false)
                && std::fs::read_to_string(&p).unwrap().contains("listeners:")
            {
                let text = std::fs::read_to_string(&p).unwrap();
                // Absolute /etc paths point at the test PKI's files in a copy of the config.
                let target = if text.contains("/etc/caregate/tls/") {
                    let copy = copies.0.join(p.file_name().unwrap());
                    let tls_dir = format!("{}/", tls.0.display());
                    std::fs::write(&copy, text.replace("/etc/caregate/tls/", &tls_dir)).unwrap();
                    copy
                } else {
                    p.clone()
                };
                let (ok, out) = check(&target);
                assert!(ok, "{}: {out}", p.display());
                n += 1;
            }
        }
    }
    assert!(
        n >= 2,
        "expected the demo and the example configs, found {n}"
    );
}

#[test]
fn check_names_the_place_of_an_unknown_key() {
    let dir = TempDir::new("check");
    let p = dir.0.join("bad.yaml");
    std::fs::write(
        &p,
        r#"
listeners: [ { name: public, channel: public, listen: "127.0.0.1:0" } ]
pools: [ { name: app, zones: [ { name: a, backends: [ { address: "127.0.0.1:9" } ] } ] } ]
routes:
  - { name: r0, listener: public, path_prefix: /a, pool: app }
  - name: r1
    listener: public
    path_prefix: /b
    pool: app
    filters:
      - { kind: headers }
      - { kind: request_limits, config: { max_body_bytes: 10, max_bodyy: 3 } }
"#,
    )
    .unwrap();
    let (ok, out) = check(&p);
    assert!(!ok);
    assert!(
        out.contains("routes[1].filters[1] (request_limits): config"),
        "{out}"
    );
    assert!(out.contains("unknown field `max_bodyy`"), "{out}");

    std::fs::write(&p, "listeners: []\nroutes: []\ncolour: blue\n").unwrap();
    let (ok, out) = check(&p);
    assert!(!ok);
    assert!(out.contains("unknown field `colour`"), "{out}");

    std::fs::write(
        &p,
        "listeners: [ { name: public, channel: public, listen: \"127.0.0.1:0\" } ]\nadmin: { token: \"${CAREGATE_TEST_UNSET_VAR}\" }\n",
    )
    .unwrap();
    let (ok, out) = check(&p);
    assert!(!ok);
    assert!(
        out.contains("environment variable CAREGATE_TEST_UNSET_VAR is not set"),
        "{out}"
    );
}

/// `check` refuses what `run` would fail on, naming the place: certificate, key, CA and key-set
/// files that are missing, unreadable or wrong, a key that is not the certificate's, overlapping
/// binds, and a chain whose confining filter runs before `jwt_auth`.
#[test]
fn check_refuses_what_would_fail_at_start() {
    let pki = Pki::new();
    let dir = TempDir::new("check-files");
    let jwks = dir.0.join("jwks.json");
    std::fs::copy(repo_root().join("filters/tests/keys/jwks-all.json"), &jwks).unwrap();
    let empty_jwks = dir.0.join("empty-jwks.json");
    std::fs::write(&empty_jwks, r#"{"keys":[]}"#).unwrap();
    let base = format!(
        r#"
admin: {{ listen: "127.0.0.1:19901" }}
listeners:
  - name: public
    channel: public
    listen: "127.0.0.1:18443"
    tls: {{ cert: "{cert}", key: "{key}", client_ca: "{ca}" }}
auth:
  issuers:
    - {{ name: files, issuer: "https://files.test", jwks_file: "{jwks}", algorithms: [RS256], audiences: [x] }}
pools:
  - name: app
    zones: [ {{ name: a, backends: [ {{ address: "127.0.0.1:9" }} ] }} ]
    tls: {{ sni: backend.test, ca_file: "{ca}", client_cert: "{client_cert}", client_key: "{client_key}" }}
routes:
  - name: fhir
    listener: public
    path_prefix: /fhir
    fhir: true
    pool: app
    filters: [ {{ kind: jwt_auth }}, {{ kind: smart_scopes }}, {{ kind: patient_compartment }} ]
"#,
        cert = pki.path("server.crt"),
        key = pki.path("server.key"),
        ca = pki.path("ca.crt"),
        client_cert = pki.path("client.crt"),
        client_key = pki.path("client.key"),
        jwks = jwks.display(),
    );
    let p = dir.0.join("c.yaml");
    std::fs::write(&p, &base).unwrap();
    let (ok, out) = check(&p);
    assert!(ok, "the valid config: {out}");

    let missing = dir.0.join("missing.pem");
    let missing = missing.to_str().unwrap();
    let a_directory = dir.0.to_str().unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            base.replace(&pki.path("server.crt"), missing),
            "listeners[0].tls.cert: cannot read",
        ),
        (
            // A path that cannot be read as a file (the tests run as root, so mode bits
            // would not stop them).
            base.replace(&pki.path("server.key"), a_directory),
            "listeners[0].tls.key: cannot read",
        ),
        (
            base.replace(&pki.path("server.key"), &pki.path("client.key")),
            "listeners[0].tls: the key",
        ),
        (
            base.replacen(&pki.path("ca.crt"), missing, 1),
            "listeners[0].tls.client_ca: cannot read",
        ),
        (
            base.replacen(&pki.path("ca.crt"), &pki.path("server.key"), 1),
            "listeners[0].tls.client_ca:",
        ),
        (
            base.replace(&pki.path("client.key"), &pki.path("server.key")),
            "pools[0] (app).tls: the key",
        ),
        (
            base.replace(jwks.to_str().unwrap(), missing),
            "auth.issuers[0].jwks_file: cannot read",
        ),
        (
            base.replace(jwks.to_str().unwrap(), empty_jwks.to_str().unwrap()),
            "no usable signing key",
        ),
        (
            base.replace(
                "listeners:\n",
                "listeners:\n  - { name: internal, channel: internal, listen: \"0.0.0.0:18443\" }\n",
            ),
            "overlaps 0.0.0.0:18443",
        ),
        (
            base.replace(
                "[ { kind: jwt_auth }, { kind: smart_scopes }, { kind: patient_compartment } ]",
                "[ { kind: patient_compartment }, { kind: jwt_auth }, { kind: smart_scopes } ]",
            ),
            "routes[0] (fhir): `patient_compartment` (routes[0].filters[0]) runs before `jwt_auth` (routes[0].filters[1])",
        ),
    ];
    for (text, want) in cases {
        assert_ne!(text, base, "the case changed nothing: {want}");
        std::fs::write(&p, &text).unwrap();
        let (ok, out) = check(&p);
        assert!(!ok, "accepted, expected `{want}`");
        assert!(out.contains(want), "expected `{want}` in: {out}");
    }
}
