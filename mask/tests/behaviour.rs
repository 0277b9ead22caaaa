//! Exact-output tests of the masking behaviour on hand-written bodies.

mod common;

use caregate_mask::{MaskAction, MaskError, MaskRule, MaskRules, Masker, MAX_DEPTH};
use common::*;
use serde_json::Value;

const L: &str = r#"{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"REDACTED","display":"redacted"}"#;

fn meta_l() -> String {
    format!(r#","meta":{{"security":[{L}]}}"#)
}

/// Mask with the given rules; check the byte-level invariants and the
/// reference masking; return the output as a string.
fn mask(rules_json: &str, input: &str) -> (String, usize, usize) {
    let rules = rules(rules_json);
    let masker = Masker::new(rules.clone()).expect("valid rules");
    let out = check_against_reference(&masker, &rules, input.as_bytes(), input);
    (
        String::from_utf8(out.body).expect("utf-8"),
        out.resources_masked,
        out.elements_masked,
    )
}

fn patient_rules() -> &'static str {
    STANDARD_RULES
}

#[test]
fn numbers_escapes_and_whitespace_survive_byte_for_byte() {
    let input = "{\r\n\t\"resourceType\" : \"Observation\" ,\"valueQuantity\":{\"value\":1.50,\"unit\":\"mg\\/dL \\u00e9\\\"\"},\r\n\t\"performer\" : [ {\"reference\":\"Practitioner/1\"} ] ,\n \"component\":[{\"valueInteger\":12345678901234567890},{\"valueQuantity\":{\"value\":-0.0e+10,\"x\":1E+300,\"y\":0.1000000000000000055511151231257827}}] ,\"text\":\"\\ud83d\\ude00\"\n}\n";
    let (out, res, el) = mask(patient_rules(), input);
    assert_eq!((res, el), (1, 1));
    let expected = input
        .replace(
            ",\r\n\t\"performer\" : [ {\"reference\":\"Practitioner/1\"} ]",
            "",
        )
        .replace(
            "\"\\ud83d\\ude00\"\n}",
            &format!("\"\\ud83d\\ude00\"{}\n}}", meta_l()),
        );
    assert_eq!(out, expected);
    for literal in [
        "1.50",
        "12345678901234567890",
        "-0.0e+10",
        "1E+300",
        "0.1000000000000000055511151231257827",
        "\"mg\\/dL \\u00e9\\\"\"",
    ] {
        assert!(out.contains(literal), "{literal}");
    }
    // Beyond what f64 holds (serde_json refuses it), still passed through.
    let m = masker(patient_rules());
    let input = br#"{"resourceType":"Observation","value":1E400,"big":-123456789012345678901234567890.000,"performer":[]}"#;
    let out = m.mask(input).expect("valid JSON");
    assert!(out.body.starts_with(br#"{"resourceType":"Observation","value":1E400,"big":-123456789012345678901234567890.000,"meta""#));
}

#[test]
fn removing_first_middle_last_and_all_members_keeps_valid_json() {
    let rules = r#"{"resources":{"X":[
        {"path":"a","action":"remove"},{"path":"c","action":"remove"},{"path":"e","action":"remove"},
        {"path":"o","action":{"keep_only":["zz"]}}]}}"#;
    let cases = [
        // first
        (
            r#"{"a":1,"resourceType":"X"}"#,
            r#"{"resourceType":"X""#,
            "}",
        ),
        // middle, with whitespace kept around the kept members
        (
            "{ \"resourceType\": \"X\",\n  \"c\": [1, {\"q\": 2}],\n  \"d\": 4 }",
            "{ \"resourceType\": \"X\",\n  \"d\": 4",
            " }",
        ),
        // last
        (
            r#"{"resourceType":"X" , "e" : "x" }"#,
            r#"{"resourceType":"X""#,
            " }",
        ),
        // several, adjacent, at both ends, a duplicate key
        (
            r#"{"a":1,"c":2,"resourceType":"X","b":3,"c":4,"e":5}"#,
            r#"{"resourceType":"X","b":3"#,
            "}",
        ),
        // every member of a nested object
        (
            "{\"resourceType\":\"X\",\"o\":{ \"p\":1, \"q\":{\"r\":[]} }\n}",
            r#"{"resourceType":"X","o":{}"#,
            "\n}",
        ),
        // nested objects of an array, one of them already empty
        (
            r#"{"resourceType":"X","o":[{"zz":1,"p":2},{},{"p":3,"zz":4}]}"#,
            r#"{"resourceType":"X","o":[{"zz":1},{},{"zz":4}]"#,
            "}",
        ),
    ];
    for (input, prefix, suffix) in cases {
        let (out, res, _) = mask(rules, input);
        assert_eq!(res, 1);
        assert_eq!(out, format!("{prefix}{}{suffix}", meta_l()), "{input}");
    }
}

#[test]
fn primitive_extension_siblings_go_with_their_element() {
    let input = r#"{"resourceType":"Patient","_birthDate":{"extension":[{"url":"http://hl7.org/fhir/StructureDefinition/patient-birthTime","valueDateTime":"1961-04-12T10:33:00+01:00"}]},"birthDate":"1961-04-12","gender":"female","_telecom":[null],"telecom":[{"value":"x"}]}"#;
    let (out, res, el) = mask(patient_rules(), input);
    assert_eq!((res, el), (1, 2));
    assert_eq!(
        out,
        format!(
            r#"{{"resourceType":"Patient","birthDate":"1961","gender":"female"{}}}"#,
            meta_l()
        )
    );
    // _x alone (value absent, extension present) still counts and goes.
    let (out, _, el) = mask(
        patient_rules(),
        r#"{"resourceType":"Patient","_birthDate":{"id":"a"}}"#,
    );
    assert_eq!(el, 1);
    assert_eq!(out, format!(r#"{{"resourceType":"Patient"{}}}"#, meta_l()));
    // name.given remove takes the parallel _given array too.
    let rules = r#"{"resources":{"Patient":[{"path":"name.given","action":"remove"}]}}"#;
    let (out, _, el) = mask(
        rules,
        r#"{"resourceType":"Patient","name":[{"given":["A","B"],"_given":[null,{"id":"x"}],"family":"F"},{"family":"G"}]}"#,
    );
    assert_eq!(el, 1);
    assert_eq!(
        out,
        format!(
            r#"{{"resourceType":"Patient","name":[{{"family":"F"}},{{"family":"G"}}]{}}}"#,
            meta_l()
        )
    );
}

#[test]
fn year_last_chars_and_redact() {
    let input = r#"{"resourceType":"Patient","birthDate":"1961-04-12","identifier":[{"system":"s","value":"123-45-6789"},{"value":"12"},{"value":42},{"value":"ab\u00e9cd\ud83d\ude00"}],"name":[{"use":"official","family":"Chalmers","given":["Peter","James"],"period":{"end":2020}}]}"#;
    let (out, res, el) = mask(patient_rules(), input);
    assert_eq!((res, el), (1, 4)); // birthDate, 2 identifier values, name
    assert_eq!(
        out,
        format!(
            r#"{{"resourceType":"Patient","birthDate":"1961","identifier":[{{"system":"s","value":"6789"}},{{"value":"12"}},{{"value":42}},{{"value":"\u00e9cd\ud83d\ude00"}}],"name":[{{"use":"REDACTED","family":"REDACTED","given":["REDACTED","REDACTED"],"period":{{"end":2020}}}}]{}}}"#,
            meta_l()
        )
    );
    // Year on a non-string, or an already reduced value: nothing, no label.
    let input = r#"{"resourceType":"Patient","birthDate":1961,"name":"REDACTED","identifier":[{"value":"1234"}]}"#;
    let (out, res, el) = mask(patient_rules(), input);
    assert_eq!((out.as_str(), res, el), (input, 0, 0));
}

#[test]
fn keep_only_keeps_listed_members_and_their_siblings() {
    let input = r#"{"resourceType":"Patient","address":[{"line":["1 Main St"],"city":"Boston","_state":{"id":"s"},"state":"MA","postalCode":"02101","country":"US"},{"text":"somewhere"}]}"#;
    let (out, res, el) = mask(patient_rules(), input);
    assert_eq!((res, el), (1, 1));
    assert_eq!(
        out,
        format!(
            r#"{{"resourceType":"Patient","address":[{{"_state":{{"id":"s"}},"state":"MA","postalCode":"02101"}},{{}}]{}}}"#,
            meta_l()
        )
    );
}

#[test]
fn label_goes_into_existing_meta_and_security() {
    let p = |meta: &str| format!(r#"{{"resourceType":"Patient","meta":{meta},"telecom":[]}}"#);
    let after = |meta: &str| format!(r#"{{"resourceType":"Patient","meta":{meta}}}"#);
    let cases = [
        (
            r#"{"versionId":"1"}"#.to_string(),
            format!(r#"{{"versionId":"1","security":[{L}]}}"#),
        ),
        ("{}".to_string(), format!(r#"{{"security":[{L}]}}"#)),
        ("{ }".to_string(), format!(r#"{{ "security":[{L}]}}"#)),
        (
            r#"{"security":[]}"#.to_string(),
            format!(r#"{{"security":[{L}]}}"#),
        ),
        (
            r#"{"security":[{"system":"s","code":"c"}],"tag":[]}"#.to_string(),
            format!(r#"{{"security":[{{"system":"s","code":"c"}},{L}],"tag":[]}}"#),
        ),
        // already labelled REDACTED: not added twice
        (
            format!(r#"{{"security":[{L}]}}"#),
            format!(r#"{{"security":[{L}]}}"#),
        ),
        // malformed meta / security are replaced
        ("null".to_string(), format!(r#"{{"security":[{L}]}}"#)),
        (
            r#"{"security":"x"}"#.to_string(),
            format!(r#"{{"security":[{L}]}}"#),
        ),
    ];
    for (meta, expected_meta) in cases {
        let (out, res, el) = mask(patient_rules(), &p(&meta));
        assert_eq!((res, el), (1, 1), "{meta}");
        assert_eq!(out, after(&expected_meta), "{meta}");
    }
}

#[test]
fn rules_on_meta_compose_with_the_label() {
    let rules = r#"{"resources":{"Patient":[
        {"path":"meta.lastUpdated","action":"remove"},
        {"path":"meta.source","action":"remove"}]}}"#;
    let (out, _, el) = mask(
        rules,
        r#"{"resourceType":"Patient","meta":{"lastUpdated":"x","source":"y"}}"#,
    );
    assert_eq!(el, 2);
    assert_eq!(
        out,
        format!(r#"{{"resourceType":"Patient","meta":{{"security":[{L}]}}}}"#)
    );
    let rules = r#"{"resources":{"Patient":[{"path":"meta","action":"remove"}]}}"#;
    let (out, _, _) = mask(
        rules,
        r#"{"resourceType":"Patient","meta":{"security":[]},"id":"1"}"#,
    );
    assert_eq!(
        out,
        format!(r#"{{"resourceType":"Patient","id":"1"{}}}"#, meta_l())
    );
    let rules = r#"{"resources":{"Patient":[{"path":"meta","action":"redact"}]}}"#;
    let (out, _, _) = mask(
        rules,
        &format!(r#"{{"resourceType":"Patient","meta":{{"security":[{L}]}}}}"#),
    );
    assert_eq!(
        out,
        format!(
            r#"{{"resourceType":"Patient","meta":{{"security":[{{"system":"REDACTED","code":"REDACTED","display":"REDACTED"}},{L}]}}}}"#
        )
    );
}

#[test]
fn bundle_entries_are_labelled_once_each_and_others_left_alone() {
    let untouched = r#"{"resourceType":"Observation","id":"o1","status":"final","valueQuantity":{"value":1.50}}"#;
    let input = format!(
        r#"{{"resourceType":"Bundle","type":"searchset","entry":[
  {{"fullUrl":"a","resource":{{"resourceType":"Patient","id":"p1","telecom":[{{"value":"1"}}]}}}},
  {{"fullUrl":"b","resource":{untouched}}},
  {{"resource":{{"resourceType":"Patient","id":"p2","name":[{{"family":"F"}}],"meta":{{"versionId":"3"}}}}}},
  {{"resource":{{"resourceType":"Patient","id":"p3"}}}},
  {{"resource":{{"resourceType":"Observation","performer":[]}},"response":{{"outcome":{{"resourceType":"Patient","telecom":[]}}}}}}
]}}"#
    );
    let (out, res, el) = mask(patient_rules(), &input);
    assert_eq!((res, el), (4, 4));
    assert!(out.contains(untouched));
    assert!(out.contains(r#"{"resourceType":"Patient","id":"p3"}"#));
    assert!(out.starts_with(r#"{"resourceType":"Bundle","type":"searchset","entry":["#));
    assert!(out.ends_with("\n]}"), "the Bundle itself gets no label");
    assert_eq!(out.matches("\"REDACTED\"").count(), 4 + 1); // 4 labels' codes + family
}

#[test]
fn contained_resources_are_masked_and_label_their_container() {
    let input = r##"{"resourceType":"Observation","contained":[{"resourceType":"Patient","id":"p","telecom":[{"value":"555"}],"birthDate":"2001-02-03"},{"resourceType":"Organization","id":"o"}],"subject":{"reference":"#p"}}"##;
    let (out, res, el) = mask(patient_rules(), input);
    assert_eq!((res, el), (1, 2));
    assert_eq!(
        out,
        format!(
            r##"{{"resourceType":"Observation","contained":[{{"resourceType":"Patient","id":"p","birthDate":"2001"}},{{"resourceType":"Organization","id":"o"}}],"subject":{{"reference":"#p"}}{}}}"##,
            meta_l()
        )
    );
    // In a Bundle entry: the entry's resource is labelled, not the Bundle.
    let input = format!(r#"{{"resourceType":"Bundle","entry":[{{"resource":{input}}}]}}"#);
    let (out, res, _) = mask(patient_rules(), &input);
    assert_eq!(res, 1);
    assert!(out.ends_with(&format!(
        r##""subject":{{"reference":"#p"}}{}}}}}]}}"##,
        meta_l()
    )));
    // Contained inside contained (not valid FHIR, still masked).
    let input = r#"{"resourceType":"Basic","contained":[{"resourceType":"Basic","contained":[{"resourceType":"Patient","telecom":[]}]}]}"#;
    let (out, res, el) = mask(patient_rules(), input);
    assert_eq!((res, el), (1, 1));
    assert_eq!(
        out,
        format!(
            r#"{{"resourceType":"Basic","contained":[{{"resourceType":"Basic","contained":[{{"resourceType":"Patient"}}]}}]{}}}"#,
            meta_l()
        )
    );
}

#[test]
fn rules_do_not_reach_into_nested_resources_but_can_remove_them() {
    // Observation's performer rule does not apply to the contained Observation
    // of a Patient... but the Observation rules do, as it is an Observation.
    let input = r#"{"resourceType":"Patient","performer":[1],"contained":[{"resourceType":"Observation","performer":[2]}]}"#;
    let (out, res, el) = mask(patient_rules(), input);
    assert_eq!((res, el), (1, 1));
    assert_eq!(
        out,
        format!(
            r#"{{"resourceType":"Patient","performer":[1],"contained":[{{"resourceType":"Observation"}}]{}}}"#,
            meta_l()
        )
    );
    let rules = r#"{"resources":{"*":[{"path":"contained","action":"remove"}]}}"#;
    let (out, res, el) = mask(rules, input);
    assert_eq!((res, el), (1, 1));
    assert_eq!(
        out,
        format!(
            r#"{{"resourceType":"Patient","performer":[1]{}}}"#,
            meta_l()
        )
    );
}

#[test]
fn wildcard_rules_apply_to_every_type_and_type_rules_override() {
    let rules = r#"{"resources":{
        "*":[{"path":"text","action":"remove"},{"path":"note","action":"redact"}],
        "Patient":[{"path":"text","action":"redact"}]}}"#;
    let (out, _, _) = mask(
        rules,
        r#"{"resourceType":"Condition","text":{"div":"x"},"note":[{"text":"t"}]}"#,
    );
    assert_eq!(
        out,
        format!(
            r#"{{"resourceType":"Condition","note":[{{"text":"REDACTED"}}]{}}}"#,
            meta_l()
        )
    );
    let (out, _, _) = mask(rules, r#"{"resourceType":"Patient","text":{"div":"x"}}"#);
    assert_eq!(
        out,
        format!(
            r#"{{"resourceType":"Patient","text":{{"div":"REDACTED"}}{}}}"#,
            meta_l()
        )
    );
}

#[test]
fn escaped_and_duplicate_keys_are_matched() {
    let input = r#"{"resource\u0054ype":"Patient","tele\u0063om":[1],"telecom":[2],"id":"x"}"#;
    let (out, res, el) = mask(patient_rules(), input);
    assert_eq!((res, el), (1, 1));
    assert_eq!(
        out,
        format!(r#"{{"resource\u0054ype":"Patient","id":"x"{}}}"#, meta_l())
    );
}

#[test]
fn nested_rules_under_redact_and_keep_only() {
    let rules = r#"{"resources":{"Patient":[
        {"path":"name","action":"redact"},
        {"path":"name.given","action":"remove"},
        {"path":"name.period.start","action":"year"},
        {"path":"address","action":{"keep_only":["state","city"]}},
        {"path":"address.city","action":{"last_chars":2}}]}}"#;
    let input = r#"{"resourceType":"Patient","name":[{"given":["A"],"family":"F","period":{"start":"2001-01-01"}}],"address":{"city":"Boston","line":["x"],"state":"MA"}}"#;
    let (out, res, el) = mask(rules, input);
    assert_eq!((res, el), (1, 5));
    assert_eq!(
        out,
        format!(
            r#"{{"resourceType":"Patient","name":[{{"family":"REDACTED","period":{{"start":"REDACTED"}}}}],"address":{{"city":"on","state":"MA"}}{}}}"#,
            meta_l()
        )
    );
}

#[test]
fn errors() {
    let m = masker(STANDARD_RULES);
    for bad in [
        &b""[..],
        b"   ",
        b"{",
        b"{\"resourceType\":\"Patient\",}",
        b"{\"resourceType\":\"Patient\"} {}",
        b"{\"resourceType\":\"Pat\xffient\"}",
        b"\xef\xbb\xbf{\"resourceType\":\"Patient\"}",
        b"{\"resourceType\":\"Patient\",\"x\":01}",
        b"{\"resourceType\":\"Patient\",\"x\":\"\t\"}",
    ] {
        assert_eq!(
            m.mask(bad),
            Err(MaskError::NotJson),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    for not_fhir in [
        &b"[]"[..],
        b"{}",
        b"{\"resourceType\":3}",
        b"\"Patient\"",
        b"{\"a\":{\"resourceType\":\"Patient\"}}",
    ] {
        assert_eq!(m.mask(not_fhir), Err(MaskError::NotFhir));
    }
    let deep = format!(
        r#"{{"resourceType":"Patient","x":{}{}}}"#,
        "[".repeat(MAX_DEPTH),
        "]".repeat(MAX_DEPTH)
    );
    assert_eq!(m.mask(deep.as_bytes()), Err(MaskError::TooDeep));
    let ok = format!(
        r#"{{"resourceType":"Patient","x":{}{},"telecom":[]}}"#,
        "[".repeat(MAX_DEPTH - 1),
        "]".repeat(MAX_DEPTH - 1)
    );
    let out = m.mask(ok.as_bytes()).expect("depth limit is inclusive");
    serde_json::from_slice::<Value>(&out.body).expect("valid");
    assert_eq!(MaskError::TooDeep.to_string(), "body nests JSON too deeply");
}

#[test]
fn rule_serde_forms() {
    let r: MaskRules = serde_json::from_str(
        r#"{"resources":{"Patient":[
            {"path":"telecom","action":"remove"},
            {"path":"name","action":"redact"},
            {"path":"address","action":{"keep_only":["state","postalCode"]}},
            {"path":"birthDate","action":"year"},
            {"path":"identifier.value","action":{"last_chars":4}}]}}"#,
    )
    .expect("parses");
    let actions: Vec<&MaskAction> = r.resources["Patient"].iter().map(|r| &r.action).collect();
    assert_eq!(
        actions,
        [
            &MaskAction::Remove,
            &MaskAction::Redact,
            &MaskAction::KeepOnly(vec!["state".into(), "postalCode".into()]),
            &MaskAction::Year,
            &MaskAction::LastChars(4),
        ]
    );
    for bad in [
        r#"{"resources":{},"extra":1}"#,
        r#"{"resources":{"Patient":[{"path":"a","action":"remove","x":1}]}}"#,
        r#"{"resources":{"Patient":[{"path":"a","action":"delete"}]}}"#,
        r#"{"resources":{"Patient":[{"path":"a","action":{"last_chars":-1}}]}}"#,
        r#"{"resources":{"Patient":[{"action":"remove"}]}}"#,
    ] {
        assert!(serde_json::from_str::<MaskRules>(bad).is_err(), "{bad}");
    }
    // round trip
    let back: MaskRules =
        serde_json::from_str(&serde_json::to_string(&r).expect("ser")).expect("de");
    assert_eq!(back, r);
}

#[test]
fn rule_validation_names_the_place() {
    let one = |rtype: &str, path: &str, action: MaskAction| {
        let mut resources = std::collections::BTreeMap::new();
        resources.insert(
            rtype.to_string(),
            vec![
                MaskRule {
                    path: "ok".into(),
                    action: MaskAction::Redact,
                },
                MaskRule {
                    path: path.into(),
                    action,
                },
            ],
        );
        Masker::new(MaskRules { resources })
            .err()
            .unwrap_or_default()
    };
    let cases = [
        (
            one("Patient", "", MaskAction::Remove),
            "resources.Patient[1].path: empty path",
        ),
        (
            one("Patient", "name..given", MaskAction::Remove),
            r#"resources.Patient[1].path "name..given": segment 2 is empty"#,
        ),
        (
            one("Patient", "name.", MaskAction::Remove),
            "segment 2 is empty",
        ),
        (
            one("Patient", "_birthDate", MaskAction::Remove),
            r#"segment "_birthDate" is not a member name"#,
        ),
        (
            one("Patient", "a.b-c", MaskAction::Remove),
            r#"segment "b-c""#,
        ),
        (one("Patient", "9a", MaskAction::Remove), r#"segment "9a""#),
        (
            one("Patient", "resourceType", MaskAction::Remove),
            "resourceType cannot be masked",
        ),
        (
            one("Patient", "a", MaskAction::KeepOnly(vec![])),
            "resources.Patient[1].action.keep_only: empty list",
        ),
        (
            one("Patient", "a", MaskAction::KeepOnly(vec!["x y".into()])),
            r#"keep_only: "x y" is not a member name"#,
        ),
        (
            one("Patient", "a", MaskAction::LastChars(0)),
            "resources.Patient[1].action.last_chars: must be at least 1",
        ),
        (
            one("Patient", "ok", MaskAction::Remove),
            "resources.Patient[1].path \"ok\": duplicate of resources.Patient[0]",
        ),
        (
            one("Pat ient", "a", MaskAction::Remove),
            r#"resources."Pat ient": key must be"#,
        ),
        (one("*", "ok.x", MaskAction::Year), ""),
    ];
    for (got, want) in cases {
        assert!(got.contains(want), "{got:?} should contain {want:?}");
    }
    let inside = Masker::new(rules(
        r#"{"resources":{"Patient":[{"path":"name.given","action":"year"},{"path":"name","action":"remove"}]}}"#,
    ))
    .err()
    .unwrap_or_default();
    assert_eq!(
        inside,
        r#"resources.Patient: path "name.given" lies inside "name", which is removed"#
    );
    assert!(Masker::new(MaskRules::default()).is_ok());
}

#[test]
fn no_rules_changes_nothing() {
    let m = Masker::new(MaskRules::default()).expect("ok");
    let input = br#"{"resourceType":"Patient","telecom":[{"value":"1"}]}"#;
    let out = m.mask(input).expect("ok");
    assert_eq!(
        (
            out.body.as_slice(),
            out.resources_masked,
            out.elements_masked
        ),
        (&input[..], 0, 0)
    );
}

#[test]
fn one_masker_serves_many_threads() {
    let m = std::sync::Arc::new(masker(STANDARD_RULES));
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let m = m.clone();
            std::thread::spawn(move || {
                let body = format!(r#"{{"resourceType":"Patient","id":"{i}","telecom":[]}}"#);
                m.mask(body.as_bytes()).expect("ok").resources_masked
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().expect("thread"), 1);
    }
}
