//! Every Synthea bundle, US Core example and R4 spec example, masked with
//! the brief's rule set and a broader one, checked against an independent
//! reference masking over `serde_json::Value` and byte by byte outside the
//! reported edits.

mod common;

use common::*;
use serde_json::Value;

fn run_corpus(sub: &str, rules_json: &str) -> (usize, usize, usize) {
    let rules = rules(rules_json);
    let masker = caregate_mask::Masker::new(rules.clone()).expect("rules valid");
    let (mut files, mut resources, mut elements) = (0, 0, 0);
    for path in json_files(sub) {
        let input = std::fs::read(&path).expect("read");
        let what = path.display().to_string();
        let outcome = check_against_reference(&masker, &rules, &input, &what);
        files += 1;
        resources += outcome.resources_masked;
        elements += outcome.elements_masked;
    }
    (files, resources, elements)
}

/// What the standard rules must have done to every Patient and Observation
/// of an output: checked directly on the output value.
fn assert_standard_masked(v: &Value) {
    match v {
        Value::Object(m) => {
            match m.get("resourceType").and_then(Value::as_str) {
                Some("Patient") => {
                    assert!(!m.contains_key("telecom") && !m.contains_key("_telecom"));
                    assert!(!m.contains_key("_birthDate"));
                    if let Some(b) = m.get("birthDate").and_then(Value::as_str) {
                        assert!(b.chars().count() <= 4, "birthDate {b}");
                    }
                    for name in m
                        .get("name")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        for s in strings(name) {
                            assert_eq!(s, "REDACTED");
                        }
                    }
                    for addr in m
                        .get("address")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        for k in addr.as_object().expect("address object").keys() {
                            assert!(["state", "postalCode"].contains(&k.as_str()), "address.{k}");
                        }
                    }
                    for id in m
                        .get("identifier")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        if let Some(val) = id.get("value").and_then(Value::as_str) {
                            assert!(val.chars().count() <= 4, "identifier.value {val}");
                        }
                    }
                    assert!(has_label(m), "Patient without label");
                }
                Some("Observation") => {
                    assert!(!m.contains_key("performer"));
                }
                _ => {}
            }
            m.values().for_each(assert_standard_masked);
        }
        Value::Array(a) => a.iter().for_each(assert_standard_masked),
        _ => {}
    }
}

fn has_label(m: &serde_json::Map<String, Value>) -> bool {
    count_labels(&Value::Object(m.clone())) > 0
}

fn strings(v: &Value) -> Vec<&str> {
    match v {
        Value::String(s) => vec![s],
        Value::Array(a) => a.iter().flat_map(strings).collect(),
        Value::Object(m) => m.values().flat_map(strings).collect(),
        _ => vec![],
    }
}

#[test]
fn synthea_bundles_standard_rules() {
    let (files, resources, elements) = run_corpus("synthea-r4/bundles", STANDARD_RULES);
    assert_eq!(files, 27);
    // every bundle has one Patient; Synthea Observations have no performer
    assert_eq!(resources, 27);
    assert!(elements >= 27 * 5, "{elements}");
    let masker = masker(STANDARD_RULES);
    for path in json_files("synthea-r4/bundles") {
        let out = masker
            .mask(&std::fs::read(&path).expect("read"))
            .expect("mask");
        assert_standard_masked(&serde_json::from_slice(&out.body).expect("json"));
    }
}

#[test]
fn us_core_examples_standard_rules() {
    let (files, resources, elements) = run_corpus("us-core-examples", STANDARD_RULES);
    assert!(files >= 200, "{files}");
    assert!(resources > 50, "{resources}");
    assert!(elements > resources, "{elements}");
    let masker = masker(STANDARD_RULES);
    for path in json_files("us-core-examples") {
        let out = masker
            .mask(&std::fs::read(&path).expect("read"))
            .expect("mask");
        assert_standard_masked(&serde_json::from_slice(&out.body).expect("json"));
    }
}

#[test]
fn r4_spec_examples_standard_rules() {
    let (files, resources, _) = run_corpus("r4-spec-examples", STANDARD_RULES);
    assert!(files >= 90, "{files}");
    assert!(resources > 20, "{resources}");
}

#[test]
fn synthea_bundles_broad_rules() {
    let (_, resources, elements) = run_corpus("synthea-r4/bundles", BROAD_RULES);
    assert!(resources > 27 * 10, "{resources}");
    assert!(elements > resources, "{elements}");
}

#[test]
fn us_core_examples_broad_rules() {
    let (_, resources, _) = run_corpus("us-core-examples", BROAD_RULES);
    assert!(resources > 100, "{resources}");
}

#[test]
fn r4_spec_examples_broad_rules() {
    let (_, resources, _) = run_corpus("r4-spec-examples", BROAD_RULES);
    assert!(resources > 50, "{resources}");
}

/// Masking the masked output again changes nothing. (With the broad rules
/// the bytes stay the same but `Condition.meta` is removed and re-created
/// with the same label, so only the bytes are compared there.)
#[test]
fn masking_is_idempotent_on_the_corpus() {
    for (rules_json, counts_zero) in [(STANDARD_RULES, true), (BROAD_RULES, false)] {
        let masker = masker(rules_json);
        for sub in ["synthea-r4/bundles", "us-core-examples", "r4-spec-examples"] {
            for path in json_files(sub) {
                let once = masker
                    .mask(&std::fs::read(&path).expect("read"))
                    .expect("mask");
                let twice = masker.mask(&once.body).expect("mask again");
                if counts_zero {
                    assert_eq!(
                        (twice.resources_masked, twice.elements_masked),
                        (0, 0),
                        "{}",
                        path.display()
                    );
                }
                assert_eq!(twice.body, once.body, "{}", path.display());
            }
        }
    }
}
