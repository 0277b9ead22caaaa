//! Tests of `caregate lint`: every rule on its fixtures, waivers, levels, API copies, output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use caregate_filters::FilterRegistry;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/lint")
}

fn lint(text: &str) -> Report {
    lint_text_with(
        text,
        PathBuf::from("."),
        &FilterRegistry::builtin(),
        &|_| None,
    )
}

fn rules_of(r: &Report) -> Vec<&'static str> {
    r.findings.iter().map(|f| f.rule).collect()
}

/// A config with one internal listener, one pool and `routes` (YAML list items), plus `extra`.
fn config(routes: &str, extra: &str) -> String {
    format!(
        r#"
listeners:
  - {{ name: internal, channel: internal, listen: "127.0.0.1:18080" }}
  - name: public
    channel: public
    listen: "127.0.0.1:18443"
    filters:
      - {{ kind: rate_limit, config: {{ limits: [ {{ name: per-address, key: [client_addr], rate: 60, per_seconds: 60 }} ] }} }}
pools:
  - {{ name: app, zones: [ {{ name: a, backends: [ {{ address: "127.0.0.1:9" }} ] }} ] }}
routes:
{routes}
{extra}
"#
    )
}

#[test]
fn every_rule_has_a_failing_and_a_passing_fixture() {
    let registry = FilterRegistry::builtin();
    for r in RULES {
        for (kind, should_fail) in [("fail", true), ("pass", false)] {
            let path = fixtures().join(format!("{}.{kind}.yaml", r.id));
            assert!(path.exists(), "{} is missing", path.display());
            let report = lint_file(&path, &registry);
            let ids = rules_of(&report);
            if should_fail {
                assert!(report.fails(), "{}: {:?}", path.display(), report.findings);
                assert!(
                    report
                        .findings
                        .iter()
                        .any(|f| f.rule == r.id && f.waived.is_none()),
                    "{}: {ids:?}",
                    path.display()
                );
                // A failing fixture fails for its own rule only.
                assert!(
                    ids.iter().all(|id| *id == r.id),
                    "{}: {:?}",
                    path.display(),
                    report.findings
                );
            } else {
                assert!(!report.fails(), "{}: {:?}", path.display(), report.findings);
                assert!(
                    report.findings.iter().all(|f| f.waived.is_some()),
                    "{}: {:?}",
                    path.display(),
                    report.findings
                );
            }
        }
    }
}

#[test]
fn findings_point_at_their_place_in_the_file() {
    let registry = FilterRegistry::builtin();
    let r = lint_file(
        &fixtures().join("patient-token-confined.fail.yaml"),
        &registry,
    );
    let f = &r.findings[0];
    assert_eq!(f.place, "routes[0]");
    let text =
        std::fs::read_to_string(fixtures().join("patient-token-confined.fail.yaml")).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("- name: patient-fhir"))
        .unwrap()
        + 1;
    assert_eq!((f.line, f.column), (line, 5));
    assert!(f
        .message
        .contains("no `smart_scopes` after `jwt_auth` (routes[0].filters[0])"));
    // The placeholder was noted, and is no secret.
    assert!(r.notes[0].contains("CAREGATE_AUDIT_KEY"), "{:?}", r.notes);
}

#[test]
fn api_copies_are_reported_at_their_template_with_the_versions() {
    let text = config(
        "  - { name: billing, listener: internal, path_prefix: /billing, pool: app }\n  - { name: claims, listener: public, path_prefix: /claims, pool: app }",
        r#"
apis:
  - name: claims-api
    owner: revenue-cycle-team
    docs: https://developer.example-hospital.org/claims
    routes: [claims]
    versions:
      - { name: v1, state: retired }
      - { name: v2, state: live }
      - { name: v3, state: preview, preview_roles: [partner] }
"#,
    );
    let r = lint(&text);
    let auth: Vec<&Finding> = r
        .findings
        .iter()
        .filter(|f| f.rule == "public-route-authenticated")
        .collect();
    assert_eq!(auth.len(), 1, "{:?}", r.findings);
    assert_eq!(auth[0].place, "routes[1]");
    // The retired version serves nothing: it is not named.
    assert!(
        auth[0]
            .message
            .ends_with("(API `claims-api`, versions v2, v3)"),
        "{}",
        auth[0].message
    );
    assert_eq!(
        auth[0].line,
        text.lines()
            .position(|l| l.contains("name: claims,"))
            .unwrap()
            + 1
    );
}

#[test]
fn levels_can_be_set_and_rules_turned_off() {
    let routes = "  - { name: Billing, listener: internal, path_prefix: /billing, pool: app }";
    let r = lint(&config(routes, ""));
    assert_eq!(rules_of(&r), vec!["naming"]);
    assert_eq!(r.findings[0].level, Level::Warning);
    assert!(!r.fails());
    let r = lint(&config(
        routes,
        "lint: { rules: { naming: { level: error } } }",
    ));
    assert!(r.fails());
    let r = lint(&config(
        routes,
        "lint: { rules: { naming: { level: off } } }",
    ));
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    let r = lint(&config(
        routes,
        "lint: { rules: { naming: { pattern: '^[A-Za-z]+$' } } }",
    ));
    // The pattern applies to every kind of name: `per-address` is no name of these kinds.
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    let r = lint(&config(
        routes,
        "lint: { rules: { naming: { pattern: '^[a-z' } } }",
    ));
    assert_eq!(rules_of(&r), vec!["config-invalid"]);
    assert_eq!(r.findings[0].place, "lint.rules.naming.pattern");
    // An unknown rule id is refused by the strict parse, as `check` refuses it.
    let r = lint(&config(
        routes,
        "lint: { rules: { nameing: { level: off } } }",
    ));
    assert_eq!(rules_of(&r), vec!["config-invalid"]);
    assert!(
        r.findings[0].message.contains("nameing"),
        "{}",
        r.findings[0].message
    );
}

#[test]
fn waivers_suppress_and_unused_ones_are_reported() {
    let routes = "  - { name: status, listener: public, path_prefix: /status, pool: app }\n  - { name: Billing, listener: internal, path_prefix: /billing, pool: app }";
    let waive = |w: &str| config(routes, &format!("lint:\n  waivers:\n{w}"));
    let r = lint(&config(routes, ""));
    assert!(r.fails());
    let r = lint(&waive(
        "    - { rule: public-route-authenticated, route: status, reason: \"public on purpose\" }\n",
    ));
    assert!(!r.fails(), "{:?}", r.findings);
    assert_eq!(r.waived(), 1);
    let w = r
        .findings
        .iter()
        .find(|f| f.rule == "public-route-authenticated")
        .unwrap();
    assert_eq!(w.waived.as_deref(), Some("public on purpose"));
    // By listener, too.
    let r = lint(&waive(
        "    - { rule: public-route-authenticated, listener: public, reason: \"open listener\" }\n",
    ));
    assert_eq!(r.waived(), 1);
    // A waiver that matches nothing.
    let r = lint(&waive(
        "    - { rule: public-route-authenticated, route: status, reason: \"public on purpose\" }\n    - { rule: naming, route: billing, reason: \"legacy name\" }\n",
    ));
    let unused: Vec<&Finding> = r
        .findings
        .iter()
        .filter(|f| f.rule == "unused-waiver")
        .collect();
    assert_eq!(unused.len(), 1, "{:?}", r.findings);
    assert_eq!(unused[0].place, "lint.waivers[1]");
    assert_eq!(unused[0].level, Level::Warning);
    assert!(
        unused[0].message.contains("route `billing`"),
        "{}",
        unused[0].message
    );
    // The naming finding on `Billing` stays: names are matched exactly.
    assert!(r
        .findings
        .iter()
        .any(|f| f.rule == "naming" && f.waived.is_none()));

    // A missing reason: the strict parse refuses it.
    let r = lint(&waive("    - { rule: naming, route: Billing }\n"));
    assert_eq!(rules_of(&r), vec!["config-invalid"]);
    assert!(
        r.findings[0].message.contains("reason"),
        "{}",
        r.findings[0].message
    );
    // An empty reason, an unknown rule, no subject, two subjects: lint refuses them.
    for (w, needle) in [
        (
            "{ rule: naming, route: Billing, reason: \"  \" }",
            "needs its reason",
        ),
        (
            "{ rule: nameing, route: Billing, reason: x }",
            "unknown rule `nameing`",
        ),
        (
            "{ rule: config-invalid, route: Billing, reason: x }",
            "cannot be waived",
        ),
        ("{ rule: naming, reason: x }", "exactly one of"),
        (
            "{ rule: naming, route: Billing, pool: app, reason: x }",
            "exactly one of",
        ),
    ] {
        let r = lint(&waive(&format!("    - {w}\n")));
        assert_eq!(rules_of(&r), vec!["config-invalid"], "{w}");
        assert!(
            r.findings[0].message.contains(needle),
            "{w}: {}",
            r.findings[0].message
        );
        assert_eq!(r.findings[0].place, "lint.waivers[0]");
        assert!(r.fails());
    }
}

#[test]
fn sandbox_issuers_without_a_sandbox_listener_are_a_warning() {
    let text = config(
        "  - { name: billing, listener: internal, path_prefix: /billing, pool: app }",
        r#"
auth:
  issuers:
    - { name: sandbox-idp, issuer: "https://sandbox.example.org", jwks_url: "https://sandbox.example.org/jwks", algorithms: [RS256], audiences: [x], sandbox: true }
"#,
    );
    let r = lint(&text);
    assert_eq!(
        rules_of(&r),
        vec!["sandbox-issuer-scope"],
        "{:?}",
        r.findings
    );
    assert_eq!(r.findings[0].level, Level::Warning);
    assert_eq!(r.findings[0].place, "auth.issuers[0]");
    assert!(!r.fails());
}

#[test]
fn environment_separation_in_both_directions() {
    // `check` refuses a sandbox listener sending to a production pool; the rule still reports
    // it on a config built by hand.
    let text =
        std::fs::read_to_string(fixtures().join("environment-separation.pass.yaml")).unwrap();
    let sub = load::substitute_with(&text, &|_| None);
    let mut loaded =
        crate::config::load_str_with(&sub.text, PathBuf::from("."), &FilterRegistry::builtin())
            .unwrap();
    for p in &mut loaded.config.pools {
        p.environment = caregate_filters::Environment::Production;
    }
    let positions = Positions::parse(&sub.text);
    let f = rules::run_all(&loaded, &sub.text, &positions);
    let sep: Vec<&Finding> = f
        .iter()
        .filter(|f| f.rule == "environment-separation")
        .collect();
    assert_eq!(sep.len(), 1, "{f:?}");
    assert!(sep[0]
        .message
        .contains("sandbox listener `sandbox` sends to production pool `synthetic`"));
    assert!(
        sep[0].message.contains("versions v1, v2"),
        "{}",
        sep[0].message
    );
    assert_eq!(sep[0].place, "routes[0]");
}

#[test]
fn invalid_configs_are_one_finding_without_secrets() {
    let text = "listeners: [ { name: a, channel: public, listen: \"127.0.0.1:0\" } ]\nserver: { threads: \"${THREADS_SECRET}\" }\n";
    let r = lint_text_with(text, PathBuf::from("."), &FilterRegistry::builtin(), &|n| {
        (n == "THREADS_SECRET").then(|| "hunter2-very-secret".to_string())
    });
    assert_eq!(rules_of(&r), vec!["config-invalid"]);
    let f = &r.findings[0];
    assert!(!f.message.contains("hunter2"), "{}", f.message);
    assert_eq!(f.line, 2, "{f:?}");
    // A validation error names its place; the finding points there.
    let r = lint(&config(
        "  - { name: billing, listener: internal, path_prefix: /billing, pool: nowhere }",
        "",
    ));
    assert_eq!(rules_of(&r), vec!["config-invalid"]);
    assert_eq!(r.findings[0].place, "routes[0].pool");
    // An unreadable file.
    let r = lint_file(
        Path::new("/nonexistent/caregate.yaml"),
        &FilterRegistry::builtin(),
    );
    assert_eq!(rules_of(&r), vec!["config-invalid"]);
    assert!(r.fails());
}

#[test]
fn sarif_has_the_shape_code_scanning_reads() {
    let registry = FilterRegistry::builtin();
    let mut report = lint_file(&fixtures().join("unused-waiver.pass.yaml"), &registry);
    report
        .findings
        .extend(lint_file(&fixtures().join("phi-route-audited.fail.yaml"), &registry).findings);
    let v: serde_json::Value =
        serde_json::from_str(&output::sarif(&report, "conf/lint/x.yaml")).unwrap();
    assert_eq!(v["version"], "2.1.0");
    assert!(v["$schema"].as_str().unwrap().contains("sarif-2.1.0"));
    let run = &v["runs"][0];
    assert_eq!(run["tool"]["driver"]["name"], "caregate-lint");
    let rules = run["tool"]["driver"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), RULES.len());
    for r in rules {
        assert!(r["id"].is_string() && r["shortDescription"]["text"].is_string());
        let level = r["defaultConfiguration"]["level"].as_str().unwrap();
        assert!(level == "error" || level == "warning");
    }
    let results = run["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for res in results {
        let loc = &res["locations"][0]["physicalLocation"];
        assert_eq!(loc["artifactLocation"]["uri"], "conf/lint/x.yaml");
        assert!(loc["region"]["startLine"].as_u64().unwrap() >= 1);
        assert!(loc["region"]["startColumn"].as_u64().unwrap() >= 1);
        assert!(res["message"]["text"].is_string());
        let id = res["ruleId"].as_str().unwrap();
        let index = res["ruleIndex"].as_u64().unwrap() as usize;
        assert_eq!(rules[index]["id"], id);
    }
    let suppressed = results
        .iter()
        .find(|r| r["ruleId"] == "public-route-authenticated")
        .unwrap();
    assert_eq!(suppressed["suppressions"][0]["kind"], "inSource");
    assert!(suppressed["suppressions"][0]["justification"]
        .as_str()
        .unwrap()
        .contains("public by design"));
    let open = results
        .iter()
        .find(|r| r["ruleId"] == "phi-route-audited")
        .unwrap();
    assert!(open.get("suppressions").is_none());
    assert_eq!(open["level"], "error");
}

#[test]
fn text_and_json_outputs() {
    let registry = FilterRegistry::builtin();
    let report = lint_file(&fixtures().join("unused-waiver.pass.yaml"), &registry);
    let t = output::text(&report, "f.yaml");
    assert_eq!(t, "f.yaml: 0 errors, 0 warnings, 1 waived: lint passes\n");
    let report = lint_file(&fixtures().join("naming.fail.yaml"), &registry);
    let t = output::text(&report, "f.yaml");
    assert!(
        t.starts_with("f.yaml:7:7: error[naming] pool name `Billing_Backend` does not match"),
        "{t}"
    );
    assert!(t.contains(" (pools[0])\n"), "{t}");
    assert!(
        t.ends_with("f.yaml: 2 errors, 0 warnings, 0 waived: lint fails\n"),
        "{t}"
    );
    let v: serde_json::Value = serde_json::from_str(&output::json(&report, "f.yaml")).unwrap();
    assert_eq!(v["counts"]["error"], 2);
    assert_eq!(v["findings"][0]["rule"], "naming");
    assert_eq!(v["findings"][0]["line"], 7);
    assert_eq!(v["findings"][0]["place"], "pools[0]");
    assert_eq!(v["passed"], false);
}
