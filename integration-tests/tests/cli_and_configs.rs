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

#[test]
fn every_example_config_is_valid() {
    let conf = repo_root().join("conf");
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
                let (ok, out) = check(&p);
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
