//! `caregate lint` as CI runs it: the real binary on the fixtures of `conf/lint/`, on the
//! example that shipped unconfined, on every shipped example, and in each output format.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The secrets the examples name: lint must not need any of them.
const SECRETS: &[&str] = &[
    "CAREGATE_ADMIN_TOKEN",
    "CAREGATE_AUDIT_KEY",
    "CAREGATE_RATELIMIT_KEY",
];

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn lint(path: &Path, format: Option<&str>) -> Out {
    let mut cmd = Command::new(caregate_bin());
    cmd.args(["lint", "-c", path.to_str().unwrap()]);
    if let Some(f) = format {
        cmd.args(["--format", f]);
    }
    for s in SECRETS {
        cmd.env_remove(s);
    }
    let out = cmd.output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn fixtures() -> PathBuf {
    repo_root().join("conf").join("lint")
}

/// A copy of `path` whose /etc/caregate/tls/ files are the test PKI's (lint validates the config
/// as `check` does, which reads them).
fn with_test_tls(path: &Path, tls: &TempDir, copies: &TempDir) -> PathBuf {
    let text = std::fs::read_to_string(path).unwrap();
    if !text.contains("/etc/caregate/tls/") {
        return path.to_path_buf();
    }
    let copy = copies.0.join(path.file_name().unwrap());
    let tls_dir = format!("{}/", tls.0.display());
    std::fs::write(&copy, text.replace("/etc/caregate/tls/", &tls_dir)).unwrap();
    copy
}

#[test]
fn every_fixture_fails_or_passes_as_named() {
    let mut n = 0;
    for e in std::fs::read_dir(fixtures()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".yaml") else {
            continue;
        };
        if name == "unconfined-example.fail.yaml" {
            continue; // needs the test PKI: its own test below
        }
        let out = lint(&p, None);
        if let Some(rule) = stem.strip_suffix(".fail") {
            assert_eq!(out.code, 1, "{name}: {}{}", out.stdout, out.stderr);
            assert!(
                out.stdout.contains(&format!("error[{rule}]")),
                "{name}: {}",
                out.stdout
            );
        } else {
            assert!(stem.ends_with(".pass"), "{name}: neither .fail nor .pass");
            assert_eq!(out.code, 0, "{name}: {}{}", out.stdout, out.stderr);
            assert!(out.stdout.contains("lint passes"), "{name}: {}", out.stdout);
        }
        n += 1;
    }
    // Ten rules and config-invalid, a failing and a passing fixture each.
    assert!(n >= 22, "only {n} fixtures");
}

#[test]
fn the_example_as_first_shipped_is_caught_at_its_route() {
    let pki = Pki::new();
    let tls = TempDir::new("lint-tls");
    pki.write_example_tls(&tls.0);
    let copies = TempDir::new("lint-copies");
    let fixture = fixtures().join("unconfined-example.fail.yaml");
    let path = with_test_tls(&fixture, &tls, &copies);
    let out = lint(&path, None);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let text = std::fs::read_to_string(&fixture).unwrap();
    let line = text
        .lines()
        .position(|l| l.trim() == "- name: patient-fhir")
        .unwrap()
        + 1;
    let expected = format!(
        "{}:{line}:5: error[patient-token-confined] route `patient-fhir` admits patient-context tokens (issuers: patients-idp)",
        path.display()
    );
    assert!(out.stdout.contains(&expected), "{expected}\n{}", out.stdout);
    assert!(
        out.stdout.contains("no `smart_scopes` after `jwt_auth`")
            && out
                .stdout
                .contains("no `patient_compartment` after `jwt_auth`"),
        "{}",
        out.stdout
    );
    let errors = out.stdout.matches(": error[").count();
    assert_eq!(errors, 1, "{}", out.stdout);
    // No secret was set: lint says it used placeholders, and none is printed.
    assert!(out.stdout.contains("note: "), "{}", out.stdout);
    assert!(out.stdout.contains("CAREGATE_AUDIT_KEY"), "{}", out.stdout);

    // The same finding in SARIF, at the same line.
    let out = lint(&path, Some("sarif"));
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let results = v["runs"][0]["results"].as_array().unwrap();
    let r = results
        .iter()
        .find(|r| r["ruleId"] == "patient-token-confined")
        .unwrap();
    assert_eq!(
        r["locations"][0]["physicalLocation"]["region"]["startLine"],
        line
    );
}

#[test]
fn every_shipped_example_passes() {
    let pki = Pki::new();
    let tls = TempDir::new("lint-tls");
    pki.write_example_tls(&tls.0);
    let copies = TempDir::new("lint-copies");
    let mut n = 0;
    let mut failures = Vec::new();
    for e in std::fs::read_dir(repo_root().join("conf")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        if !std::fs::read_to_string(&p).unwrap().contains("listeners:") {
            continue;
        }
        // As shipped, in a CI job without the certificate files (lint does not read them), and
        // with them.
        for target in [p.clone(), with_test_tls(&p, &tls, &copies)] {
            let out = lint(&target, None);
            if out.code != 0 {
                failures.push(format!(
                    "{}:\n{}{}",
                    target.display(),
                    out.stdout,
                    out.stderr
                ));
            }
        }
        n += 1;
    }
    assert!(n >= 2, "found {n} examples");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn sarif_output_is_sarif() {
    let path = fixtures().join("unused-waiver.pass.yaml");
    let out = lint(&path, Some("sarif"));
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["version"], "2.1.0");
    assert!(v["$schema"].as_str().unwrap().ends_with("sarif-2.1.0.json"));
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    let driver = &runs[0]["tool"]["driver"];
    assert_eq!(driver["name"], "caregate-lint");
    let rules = driver["rules"].as_array().unwrap();
    for id in [
        "config-invalid",
        "naming",
        "public-route-authenticated",
        "public-route-rate-limited",
        "phi-route-audited",
        "patient-token-confined",
        "deprecated-version-complete",
        "api-owner-docs",
        "environment-separation",
        "sandbox-issuer-scope",
        "unused-waiver",
    ] {
        let r = rules
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("rule {id} not listed"));
        assert!(r["shortDescription"]["text"].as_str().unwrap().len() > 10);
        assert!(
            ["error", "warning"].contains(&r["defaultConfiguration"]["level"].as_str().unwrap())
        );
    }
    // The waived finding is there, suppressed in source with its justification.
    let results = runs[0]["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{results:?}");
    let r = &results[0];
    assert_eq!(r["ruleId"], "public-route-authenticated");
    assert_eq!(r["level"], "error");
    assert!(r["message"]["text"]
        .as_str()
        .unwrap()
        .contains("status-page"));
    let loc = &r["locations"][0]["physicalLocation"];
    assert_eq!(
        loc["artifactLocation"]["uri"],
        format!("file://{}", path.display())
    );
    assert!(loc["region"]["startLine"].as_u64().unwrap() > 1);
    assert!(loc["region"]["startColumn"].as_u64().unwrap() >= 1);
    assert_eq!(r["suppressions"][0]["kind"], "inSource");
    assert!(r["suppressions"][0]["justification"]
        .as_str()
        .unwrap()
        .contains("public by design"));

    // A failing file: the result is not suppressed, and the exit code says so.
    let out = lint(
        &fixtures().join("environment-separation.fail.yaml"),
        Some("sarif"),
    );
    assert_eq!(out.code, 1);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let r = &v["runs"][0]["results"][0];
    assert_eq!(r["ruleId"], "environment-separation");
    assert!(r.get("suppressions").is_none());
}

#[test]
fn json_output_and_usage_errors() {
    let out = lint(&fixtures().join("naming.fail.yaml"), Some("json"));
    assert_eq!(out.code, 1);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["counts"]["error"], 2);
    let f = &v["findings"][0];
    assert_eq!(f["rule"], "naming");
    assert_eq!(f["place"], "pools[0]");
    assert!(f["line"].as_u64().unwrap() > 1 && f["column"].as_u64().unwrap() > 1);
    assert_eq!(f["suppressed"], false);

    let out = lint(&fixtures().join("naming.pass.yaml"), Some("yaml"));
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("unknown --format"), "{}", out.stderr);

    let out = lint(&fixtures().join("config-invalid.fail.yaml"), Some("json"));
    assert_eq!(out.code, 1);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["findings"].as_array().unwrap().len(), 1);
    assert_eq!(v["findings"][0]["rule"], "config-invalid");
}
