//! Property tests: random bytes never panic; generated FHIR-ish JSON (with
//! varied whitespace, escapes and number spellings) masks to valid JSON equal
//! to the reference masking, unchanged outside the reported edits.

mod common;

use caregate_mask::{MaskError, Masker};
use common::*;
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

/// Rules over the generator's vocabulary.
const PROP_RULES: &str = r#"{"resources": {
  "*": [{"path": "text", "action": "remove"}],
  "Patient": [
    {"path": "telecom", "action": "remove"},
    {"path": "name", "action": "redact"},
    {"path": "name.given", "action": "remove"},
    {"path": "address", "action": {"keep_only": ["state", "postalCode"]}},
    {"path": "birthDate", "action": "year"},
    {"path": "identifier.value", "action": {"last_chars": 4}},
    {"path": "meta.source", "action": "remove"}
  ],
  "Observation": [
    {"path": "performer", "action": "remove"},
    {"path": "value", "action": {"last_chars": 2}},
    {"path": "contained", "action": {"keep_only": ["id"]}}
  ],
  "Bundle": [
    {"path": "entry.value", "action": "year"}
  ]
}}"#;

const KEYS: &[&str] = &[
    "resourceType",
    "id",
    "meta",
    "security",
    "source",
    "system",
    "code",
    "telecom",
    "_telecom",
    "name",
    "given",
    "_given",
    "family",
    "address",
    "state",
    "_state",
    "postalCode",
    "city",
    "birthDate",
    "_birthDate",
    "identifier",
    "value",
    "_value",
    "performer",
    "contained",
    "entry",
    "resource",
    "text",
    "extension",
    "url",
];
const TYPES: &[&str] = &["Patient", "Observation", "Bundle", "Basic"];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-zA-Z0-9 é😀\"\\\\/\n\u{1}-]{0,12}".prop_map(Value::String),
        "(19|20)[0-9]{2}-[01][0-9]-[0-3][0-9]".prop_map(Value::String),
        Just(Value::String(LABEL_SYSTEM.into())),
        Just(Value::String("REDACTED".into())),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![4 => prop::sample::select(KEYS).prop_map(String::from), 1 => "[a-z_]{1,5}"]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(6, 80, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            (
                prop::collection::vec((key(), inner.clone()), 0..6),
                prop::option::weighted(0.3, prop::sample::select(TYPES))
            )
                .prop_map(|(members, rtype)| object(members, rtype)),
        ]
    })
}

fn object(members: Vec<(String, Value)>, rtype: Option<&str>) -> Value {
    let mut m = Map::new();
    if let Some(t) = rtype {
        m.insert("resourceType".into(), Value::String(t.into()));
    }
    for (k, v) in members {
        if k != "resourceType" || rtype.is_none() {
            m.insert(k, v);
        }
    }
    Value::Object(m)
}

fn resource() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(TYPES),
        prop::collection::vec((key(), value()), 0..8),
    )
        .prop_map(|(t, members)| object(members, Some(t)))
}

/// Serializes a value with spelling choices drawn from `choices`: varied
/// whitespace, optional escapes (`\/`, `\uXXXX`, surrogate pairs) and
/// number spellings (`1.50`, `1.5e0`).
struct Speller<'c> {
    choices: &'c [u8],
    i: usize,
    out: String,
}

impl Speller<'_> {
    fn pick(&mut self) -> u8 {
        let c = self
            .choices
            .get(self.i % self.choices.len().max(1))
            .copied()
            .unwrap_or(0);
        self.i += 1;
        c
    }

    fn ws(&mut self) {
        const WS: &[&str] = &["", "", "", " ", "\n  ", "\t", "\r\n", "  "];
        let w = WS[self.pick() as usize % WS.len()];
        self.out.push_str(w);
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            let choice = self.pick() % 8;
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '/' if choice == 0 => self.out.push_str("\\/"),
                c if (c as u32) < 0x20 || choice == 1 => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        self.out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.out.push_str("null"),
            Value::Bool(b) => self.out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => {
                let plain = n.to_string();
                match self.pick() % 4 {
                    0 if n.is_f64() && plain.contains('.') => {
                        self.out.push_str(&format!("{plain}00"))
                    }
                    1 if n.is_f64() => self.out.push_str(&format!("{plain}e0")),
                    _ => self.out.push_str(&plain),
                }
            }
            Value::String(s) => self.string(s),
            Value::Array(a) => {
                self.out.push('[');
                self.ws();
                for (i, item) in a.iter().enumerate() {
                    if i > 0 {
                        self.ws();
                        self.out.push(',');
                        self.ws();
                    }
                    self.value(item);
                }
                self.ws();
                self.out.push(']');
            }
            Value::Object(m) => {
                self.out.push('{');
                self.ws();
                for (i, (k, item)) in m.iter().enumerate() {
                    if i > 0 {
                        self.ws();
                        self.out.push(',');
                        self.ws();
                    }
                    self.string(k);
                    self.ws();
                    self.out.push(':');
                    self.ws();
                    self.value(item);
                }
                self.ws();
                self.out.push('}');
            }
        }
    }
}

fn spell(v: &Value, choices: &[u8]) -> String {
    let mut s = Speller {
        choices,
        i: 0,
        out: String::new(),
    };
    s.ws();
    s.value(v);
    s.ws();
    s.out
}

/// Never panics; agrees with serde_json on what is JSON (except what
/// serde_json refuses beyond the grammar: numbers out of f64 range, lone
/// surrogate escapes); valid JSON in, valid JSON out.
fn check_valid_in_valid_out(m: &Masker, input: &[u8]) {
    let serde = serde_json::from_slice::<Value>(input);
    let result = m.mask(input);
    match (&serde, &result) {
        (Ok(_), Err(MaskError::NotJson)) => {
            panic!(
                "serde_json accepts what the masker calls NotJson: {:?}",
                String::from_utf8_lossy(input)
            )
        }
        (Err(e), Ok(_) | Err(MaskError::NotFhir)) => {
            let why = e.to_string();
            assert!(
                [
                    "number out of range",
                    "surrogate",
                    "hex escape",
                    "unicode code point"
                ]
                .iter()
                .any(|w| why.contains(w)),
                "masker accepts what serde_json refuses ({why}): {:?}",
                String::from_utf8_lossy(input)
            );
        }
        _ => {}
    }
    if let (Ok(_), Ok(out)) = (serde, result) {
        serde_json::from_slice::<Value>(&out.body).expect("valid JSON in, valid JSON out");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_valid_in_valid_out(&masker(PROP_RULES), &bytes);
    }

    #[test]
    fn json_looking_text_never_panics(text in "[\\[\\]{}\",:0-9.eE+\\-a-z\\\\ \n\t/]{0,64}") {
        let m = masker(PROP_RULES);
        check_valid_in_valid_out(&m, text.as_bytes());
        check_valid_in_valid_out(&m, format!("{{\"resourceType\":\"Patient\",\"name\":{text}}}").as_bytes());
    }

    #[test]
    fn generated_resources_match_the_reference(
        v in resource(),
        choices in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let input = spell(&v, &choices);
        for rules_json in [PROP_RULES, STANDARD_RULES] {
            let rules = rules(rules_json);
            let m = Masker::new(rules.clone()).expect("valid");
            check_against_reference(&m, &rules, input.as_bytes(), &input);
        }
    }

    #[test]
    fn mutated_resources_never_panic(
        v in resource(),
        choices in prop::collection::vec(any::<u8>(), 1..32),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        op in 0u8..3,
    ) {
        let mut input = spell(&v, &choices).into_bytes();
        let i = at.index(input.len() + 1);
        match op {
            0 => input.insert(i, byte),
            1 if i < input.len() => { input.remove(i); }
            _ => input.truncate(i),
        }
        check_valid_in_valid_out(&masker(PROP_RULES), &input);
    }
}
