//! Test helpers: an independent reference masker over `serde_json::Value`
//! (rule by rule, by JSON pointer) and the byte-level edit checks.
#![allow(dead_code)]

use std::path::PathBuf;

use caregate_mask::{EditSpan, MaskAction, MaskOutcome, MaskRules, Masker};
use serde_json::{json, Map, Value};

pub const LABEL_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

pub fn label() -> Value {
    json!({"system": LABEL_SYSTEM, "code": "REDACTED", "display": "redacted"})
}

/// The FHIR test data in the shared folder beside the repository
/// (`$CAREGATE_FHIR_DATA` overrides). Panics if it is missing: the corpus
/// tests must not pass vacuously.
pub fn fhir_data_dir() -> PathBuf {
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("CAREGATE_FHIR_DATA") {
        candidates.push(PathBuf::from(dir));
    }
    candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/fhir"));
    candidates
        .into_iter()
        .find(|d| d.join("synthea-r4/bundles").is_dir())
        .expect("FHIR test data (shared/data/fhir) not found; set CAREGATE_FHIR_DATA")
}

/// All `*.json` files of a folder under the FHIR data dir, sorted.
pub fn json_files(sub: &str) -> Vec<PathBuf> {
    let dir = fhir_data_dir().join(sub);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no json files in {}", dir.display());
    files
}

pub fn rules(json: &str) -> MaskRules {
    serde_json::from_str(json).expect("rules parse")
}

pub fn masker(json: &str) -> Masker {
    Masker::new(rules(json)).expect("rules valid")
}

/// The rule set of the brief.
pub const STANDARD_RULES: &str = r#"{"resources": {
  "Patient": [
    {"path": "telecom", "action": "remove"},
    {"path": "name", "action": "redact"},
    {"path": "address", "action": {"keep_only": ["state", "postalCode"]}},
    {"path": "birthDate", "action": "year"},
    {"path": "identifier.value", "action": {"last_chars": 4}}
  ],
  "Observation": [
    {"path": "performer", "action": "remove"}
  ]
}}"#;

/// A broader rule set: wildcard rules, nested paths under redacted and
/// kept-only elements, rules inside `meta`, removal of `meta` itself,
/// contained resources, rules on the Bundle itself.
pub const BROAD_RULES: &str = r#"{"resources": {
  "*": [
    {"path": "text", "action": "remove"},
    {"path": "note", "action": "redact"}
  ],
  "Patient": [
    {"path": "name", "action": "redact"},
    {"path": "name.given", "action": "remove"},
    {"path": "address", "action": {"keep_only": ["state", "country"]}},
    {"path": "address.state", "action": {"last_chars": 1}},
    {"path": "identifier", "action": {"keep_only": ["system", "value", "type"]}},
    {"path": "identifier.value", "action": {"last_chars": 4}},
    {"path": "identifier.type.text", "action": "redact"},
    {"path": "telecom.value", "action": "redact"},
    {"path": "birthDate", "action": "year"},
    {"path": "communication.language", "action": "remove"},
    {"path": "extension.valueString", "action": {"last_chars": 2}},
    {"path": "text", "action": "redact"}
  ],
  "Observation": [
    {"path": "performer", "action": "remove"},
    {"path": "effectiveDateTime", "action": "year"},
    {"path": "issued", "action": "year"},
    {"path": "subject.display", "action": "redact"},
    {"path": "valueQuantity.value", "action": "remove"},
    {"path": "component.valueQuantity", "action": {"keep_only": ["unit"]}}
  ],
  "Encounter": [
    {"path": "participant", "action": {"keep_only": ["type"]}},
    {"path": "period.start", "action": "year"},
    {"path": "meta.lastUpdated", "action": "remove"},
    {"path": "meta.profile", "action": "redact"}
  ],
  "Condition": [
    {"path": "meta", "action": "remove"},
    {"path": "onsetDateTime", "action": "year"}
  ],
  "Medication": [
    {"path": "code.text", "action": "redact"}
  ],
  "Practitioner": [
    {"path": "name", "action": {"keep_only": ["prefix"]}},
    {"path": "identifier.value", "action": {"last_chars": 2}}
  ],
  "Bundle": [
    {"path": "entry.fullUrl", "action": {"last_chars": 12}},
    {"path": "entry.request.url", "action": "redact"}
  ]
}}"#;

// ---------------------------------------------------------------- reference

#[derive(Clone, Debug, PartialEq)]
enum Step {
    Key(String),
    Idx(usize),
}
type Ptr = Vec<Step>;

fn get<'v>(mut v: &'v Value, ptr: &[Step]) -> Option<&'v Value> {
    for s in ptr {
        v = match (s, v) {
            (Step::Key(k), Value::Object(m)) => m.get(k)?,
            (Step::Idx(i), Value::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(v)
}

fn get_mut<'v>(mut v: &'v mut Value, ptr: &[Step]) -> Option<&'v mut Value> {
    for s in ptr {
        v = match (s, v) {
            (Step::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (Step::Idx(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(v)
}

fn is_resource(v: &Value) -> bool {
    v.get("resourceType").is_some_and(Value::is_string)
}

fn with(ptr: &[Step], s: Step) -> Ptr {
    let mut p = ptr.to_vec();
    p.push(s);
    p
}

/// Pointers of the values reached from `ptr`, arrays expanded
/// (recursively). Nested resources are excluded when `stop_at_resources`.
fn expand(root: &Value, ptr: Ptr, stop_at_resources: bool, out: &mut Vec<Ptr>) {
    match get(root, &ptr) {
        Some(Value::Array(a)) => {
            for i in 0..a.len() {
                expand(root, with(&ptr, Step::Idx(i)), stop_at_resources, out);
            }
        }
        Some(v) if stop_at_resources && !ptr.is_empty() && is_resource(v) => {}
        Some(_) => out.push(ptr),
        None => {}
    }
}

/// Pointers of the objects holding the last segment of `path`.
fn parents(root: &Value, path: &[String]) -> Vec<Ptr> {
    let mut cur: Vec<Ptr> = vec![vec![]];
    for seg in &path[..path.len() - 1] {
        let mut next = Vec::new();
        for p in cur {
            expand(root, with(&p, Step::Key(seg.clone())), true, &mut next);
        }
        cur = next;
    }
    cur.retain(|p| get(root, p).is_some_and(Value::is_object));
    cur
}

fn rules_for(rules: &MaskRules, rtype: &str) -> Vec<(Vec<String>, MaskAction)> {
    let split = |p: &str| p.split('.').map(String::from).collect::<Vec<_>>();
    let own = rules.resources.get(rtype).cloned().unwrap_or_default();
    let mut out: Vec<(Vec<String>, MaskAction)> = rules
        .resources
        .get("*")
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|w| !own.iter().any(|o| o.path == w.path))
        .map(|r| (split(&r.path), r.action))
        .collect();
    out.extend(own.into_iter().map(|r| (split(&r.path), r.action)));
    out
}

fn redact_all(v: &mut Value) {
    match v {
        Value::String(s) => *s = "REDACTED".into(),
        Value::Array(a) => a.iter_mut().for_each(redact_all),
        Value::Object(m) => m.values_mut().for_each(redact_all),
        _ => {}
    }
}

fn strings_mut(v: &mut Value, f: &dyn Fn(&str) -> String) {
    match v {
        Value::String(s) => *s = f(s),
        Value::Array(a) => a.iter_mut().for_each(|x| strings_mut(x, f)),
        _ => {}
    }
}

fn objects_mut(v: &mut Value, f: &dyn Fn(&mut Map<String, Value>)) {
    match v {
        Value::Object(m) if !is_resource(&Value::Object(m.clone())) => f(m),
        Value::Array(a) => a.iter_mut().for_each(|x| objects_mut(x, f)),
        _ => {}
    }
}

#[derive(Default, Debug, PartialEq, Eq, Clone, Copy)]
pub struct Counts {
    pub resources: usize,
    pub elements: usize,
}

/// Mask one resource in place; returns the elements masked in it (its
/// contained resources included).
fn reference_resource(
    res: &mut Value,
    rules: &MaskRules,
    contained: bool,
    counts: &mut Counts,
) -> usize {
    let rtype = res["resourceType"].as_str().unwrap_or_default().to_string();
    let list = rules_for(rules, &rtype);
    let original = res.clone();
    let mut by_len = list.clone();
    by_len.sort_by_key(|(p, _)| p.len());
    let last = |p: &Vec<String>| p.last().cloned().expect("non-empty path");
    // 1. structure: removals and keep_only, shorter paths first.
    for (path, action) in &by_len {
        let x = last(path);
        for parent in parents(res, path) {
            let obj = get_mut(res, &parent)
                .and_then(Value::as_object_mut)
                .expect("parent");
            match action {
                MaskAction::Remove => {
                    obj.shift_remove(&x);
                    obj.shift_remove(&format!("_{x}"));
                }
                MaskAction::KeepOnly(keep) => {
                    if let Some(v) = obj.get_mut(&x) {
                        objects_mut(v, &|m| {
                            m.retain(|k, _| keep.iter().any(|n| n == k || format!("_{n}") == *k))
                        });
                    }
                }
                _ => {
                    obj.shift_remove(&format!("_{x}"));
                }
            }
        }
    }
    // 2. year / last_chars.
    for (path, action) in &list {
        let x = last(path);
        let f: Box<dyn Fn(&str) -> String> = match action {
            MaskAction::Year => Box::new(|s: &str| s.chars().take(4).collect()),
            MaskAction::LastChars(n) => {
                let n = *n;
                Box::new(move |s: &str| {
                    let c: Vec<char> = s.chars().collect();
                    c[c.len().saturating_sub(n)..].iter().collect()
                })
            }
            _ => continue,
        };
        for parent in parents(res, path) {
            if let Some(v) = get_mut(res, &with(&parent, Step::Key(x.clone()))) {
                strings_mut(v, &*f);
            }
        }
    }
    // 3. nested resources, outside the elements about to be redacted.
    let mut skip: Vec<Ptr> = Vec::new();
    for (path, action) in &list {
        if *action == MaskAction::Redact {
            for parent in parents(res, path) {
                skip.push(with(&parent, Step::Key(last(path))));
            }
        }
    }
    let mut from_contained = 0;
    nested(res, &[], &skip, false, rules, counts, &mut from_contained);
    // 4. redact.
    for (path, action) in &list {
        if *action == MaskAction::Redact {
            for parent in parents(res, path) {
                if let Some(v) = get_mut(res, &with(&parent, Step::Key(last(path)))) {
                    redact_all(v);
                }
            }
        }
    }
    // 5. count: per rule and holding object, compare x and _x before/after,
    // ignoring what happened inside nested resources (they count for
    // themselves) unless they sit in a redacted element.
    let mut redacted: Vec<Ptr> = Vec::new();
    for (path, action) in &list {
        if *action == MaskAction::Redact {
            for parent in parents(&original, path) {
                redacted.push(with(&parent, Step::Key(last(path))));
            }
        }
    }
    let mut nested_ptrs = Vec::new();
    collect_nested(&original, &[], &redacted, &mut nested_ptrs);
    let (mut before_n, mut after_n) = (original.clone(), res.clone());
    for p in &nested_ptrs {
        for v in [&mut before_n, &mut after_n] {
            if let Some(slot) = get_mut(v, p) {
                *slot = Value::Null;
            }
        }
    }
    let mut mine = 0;
    for (path, _) in &list {
        let x = last(path);
        for parent in parents(&original, path) {
            let Some(after) = get(&after_n, &parent) else {
                continue;
            };
            let before = get(&before_n, &parent).expect("exists");
            let pair = |v: &Value| (v.get(&x).cloned(), v.get(format!("_{x}")).cloned());
            if pair(before) != pair(after) {
                mine += 1;
            }
        }
    }
    counts.elements += mine;
    let total = mine + from_contained;
    if !contained && total > 0 {
        counts.resources += 1;
        let touches_meta = list.iter().any(|(p, _)| p[0] == "meta");
        let obj = res.as_object_mut().expect("resource object");
        match obj.get_mut("meta") {
            None => {
                obj.insert("meta".into(), json!({"security": [label()]}));
            }
            Some(Value::Object(meta)) => match meta.get_mut("security") {
                None => {
                    meta.insert("security".into(), json!([label()]));
                }
                Some(Value::Array(a)) => {
                    let has = a.iter().any(|l| {
                        l.get("system") == Some(&json!(LABEL_SYSTEM))
                            && l.get("code") == Some(&json!("REDACTED"))
                    });
                    if touches_meta || !has {
                        a.push(label());
                    }
                }
                Some(other) => *other = json!([label()]),
            },
            Some(other) => *other = json!({"security": [label()]}),
        }
    }
    if contained {
        total
    } else {
        0
    }
}

/// Pointers of the nested resources of a resource (not looking inside them
/// or inside `skip`).
fn collect_nested(v: &Value, ptr: &[Step], skip: &[Ptr], out: &mut Vec<Ptr>) {
    if skip.iter().any(|s| s.as_slice() == ptr) {
        return;
    }
    if !ptr.is_empty() && is_resource(v) {
        out.push(ptr.to_vec());
        return;
    }
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                collect_nested(c, &with(ptr, Step::Key(k.clone())), skip, out);
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                collect_nested(c, &with(ptr, Step::Idx(i)), skip, out);
            }
        }
        _ => {}
    }
}

fn nested(
    res: &mut Value,
    ptr: &[Step],
    skip: &[Ptr],
    contained: bool,
    rules: &MaskRules,
    counts: &mut Counts,
    from_contained: &mut usize,
) {
    if skip.iter().any(|s| s.as_slice() == ptr) {
        return;
    }
    let here = get_mut(res, ptr).expect("exists");
    if !ptr.is_empty() && is_resource(here) {
        *from_contained += reference_resource(here, rules, contained, counts);
        return;
    }
    let steps: Vec<(Step, bool)> = match here {
        Value::Object(m) => m
            .keys()
            .map(|k| (Step::Key(k.clone()), ptr.is_empty() && k == "contained"))
            .collect(),
        Value::Array(a) => (0..a.len()).map(|i| (Step::Idx(i), contained)).collect(),
        _ => return,
    };
    for (s, c) in steps {
        nested(res, &with(ptr, s), skip, c, rules, counts, from_contained);
    }
}

/// The reference masking of a whole body.
pub fn reference(input: &Value, rules: &MaskRules) -> (Value, Counts) {
    let mut v = input.clone();
    let mut counts = Counts::default();
    reference_resource(&mut v, rules, false, &mut counts);
    (v, counts)
}

// ------------------------------------------------------------- byte checks

/// The output equals the input outside the reported edits; the edits are
/// sorted, disjoint, never no-ops, and each is a pure insertion, a pure
/// removal, the replacement of one JSON string token by another, or of a
/// malformed `meta` / `meta.security` by the label.
pub fn check_edits(input: &[u8], output: &[u8], spans: &[EditSpan]) {
    let (mut i, mut o) = (0usize, 0usize);
    for s in spans {
        assert!(
            s.input.start >= i && s.output.start >= o,
            "edits out of order: {s:?}"
        );
        assert_eq!(
            &input[i..s.input.start],
            &output[o..s.output.start],
            "bytes between edits differ before {s:?}"
        );
        let before = &input[s.input.clone()];
        let after = &output[s.output.clone()];
        assert_ne!(before, after, "no-op edit {s:?}");
        if !before.is_empty() && !after.is_empty() {
            let b: Value =
                serde_json::from_slice(before).expect("replaced bytes are one JSON value");
            let a: Value = serde_json::from_slice(after).expect("replacement is one JSON value");
            // A string reduced, or a malformed meta / meta.security
            // replaced by the label.
            let label_fix = a == json!({"security": [label()]}) || a == json!([label()]);
            assert!(
                (b.is_string() && a.is_string()) || label_fix,
                "replacement of a non-string: {:?} -> {:?}",
                String::from_utf8_lossy(before),
                String::from_utf8_lossy(after)
            );
        }
        i = s.input.end;
        o = s.output.end;
    }
    assert_eq!(&input[i..], &output[o..], "tails differ");
}

/// Mask `input` and check it against the reference: valid JSON out, same
/// value (key order included) as the reference, same counts, bytes equal
/// outside the edits, and untouched when nothing was masked.
pub fn check_against_reference(
    masker: &Masker,
    rules: &MaskRules,
    input: &[u8],
    what: &str,
) -> MaskOutcome {
    let (outcome, spans) = masker
        .mask_traced(input)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let out_value: Value = serde_json::from_slice(&outcome.body)
        .unwrap_or_else(|e| panic!("{what}: output is not JSON: {e}"));
    let in_value: Value = serde_json::from_slice(input).expect("input JSON");
    let (expected, counts) = reference(&in_value, rules);
    assert_eq!(
        serde_json::to_string(&out_value).expect("ser"),
        serde_json::to_string(&expected).expect("ser"),
        "{what}: output differs from the reference masking"
    );
    assert_eq!(
        (outcome.resources_masked, outcome.elements_masked),
        (counts.resources, counts.elements),
        "{what}: counts (resources, elements)"
    );
    check_edits(input, &outcome.body, &spans);
    if counts.elements == 0 {
        assert_eq!(
            outcome.body, input,
            "{what}: nothing masked but bytes changed"
        );
        assert!(spans.is_empty());
    }
    outcome
}

/// Number of REDACTED labels in any `meta.security` of a value.
pub fn count_labels(v: &Value) -> usize {
    match v {
        Value::Object(m) => {
            let here = m
                .get("meta")
                .and_then(|meta| meta.get("security"))
                .and_then(Value::as_array)
                .map_or(0, |a| {
                    a.iter()
                        .filter(|l| {
                            l.get("system") == Some(&json!(LABEL_SYSTEM))
                                && l.get("code") == Some(&json!("REDACTED"))
                        })
                        .count()
                });
            here + m.values().map(count_labels).sum::<usize>()
        }
        Value::Array(a) => a.iter().map(count_labels).sum(),
        _ => 0,
    }
}
