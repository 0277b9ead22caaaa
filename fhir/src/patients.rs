//! The patients a classified request names: what the audit trail records for every caller
//! (the response's own Patient references are found apart, in the body).

use crate::request::{FhirRequest, Interaction};

/// At most this many patients are taken from one request (a search may list many ids); the
/// audit record counts the rest.
pub const MAX_NAMED_PATIENTS: usize = 64;

/// The patient id a reference names: `Patient/x` (also as an absolute URL, with a version), or a
/// bare `x` where the parameter only takes patients.
fn patient_ref(value: &str, bare_is_patient: bool) -> Option<String> {
    let v = value.trim();
    let v = v.split("/_history/").next().unwrap_or(v);
    if let Some(i) = v.rfind("Patient/") {
        let at_boundary = i == 0 || v.as_bytes().get(i - 1) == Some(&b'/');
        let id = v.get(i + "Patient/".len()..).unwrap_or("");
        if at_boundary && !id.is_empty() && !id.contains('/') {
            return Some(id.to_string());
        }
        return None;
    }
    (bare_is_patient && !v.is_empty() && !v.contains('/') && !v.contains('|'))
        .then(|| v.to_string())
}

/// Every patient the request names, in order, without repeats, at most
/// [`MAX_NAMED_PATIENTS`], and how many more it named:
/// - a Patient instance (read, vread, history, update, patch, delete, an instance operation
///   such as `$everything`);
/// - a Patient compartment search (`Patient/x/Observation`);
/// - the `patient` parameter (a bare id or a reference), the `subject` parameter when it is a
///   Patient reference (or typed `subject:Patient`), and `_id` of a Patient search.
pub fn named_patients(req: &FhirRequest) -> (Vec<String>, usize) {
    let mut out: Vec<String> = Vec::new();
    let mut more = 0usize;
    let mut add = |id: String, out: &mut Vec<String>| {
        if out.contains(&id) {
            return;
        }
        if out.len() < MAX_NAMED_PATIENTS {
            out.push(id);
        } else {
            more += 1;
        }
    };
    let patient_type = req.resource_type.as_deref() == Some("Patient");
    if patient_type && !matches!(req.interaction, Interaction::SearchType) {
        if let Some(id) = req.id.as_deref().filter(|s| !s.is_empty()) {
            add(id.to_string(), &mut out);
        }
    }
    if let Some((t, id)) = &req.compartment {
        if t == "Patient" && !id.is_empty() {
            add(id.clone(), &mut out);
        }
    }
    for p in &req.params {
        if !p.chain.is_empty() {
            continue;
        }
        let typed_patient = p.modifier.as_deref() == Some("Patient");
        let bare = match p.name.as_str() {
            "patient" => true,
            "subject" => typed_patient,
            "_id" => patient_type && req.interaction.is_search(),
            _ => continue,
        };
        for v in &p.values {
            if let Some(id) = patient_ref(v, bare) {
                add(id, &mut out);
            }
        }
    }
    (out, more)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::classify;

    fn named(method: &str, path: &str, query: &str) -> Vec<String> {
        let req = classify(method, path, query, None, None).unwrap();
        named_patients(&req).0
    }

    #[test]
    fn every_way_a_request_names_a_patient() {
        assert_eq!(named("GET", "/Patient/p1", ""), ["p1"]);
        assert_eq!(named("GET", "/Patient/p1/_history/2", ""), ["p1"]);
        assert_eq!(named("GET", "/Patient/p1/_history", ""), ["p1"]);
        assert_eq!(named("GET", "/Patient/p1/$everything", ""), ["p1"]);
        assert_eq!(named("GET", "/Patient/p1/Observation", "code=x"), ["p1"]);
        assert_eq!(named("GET", "/Observation", "patient=p2"), ["p2"]);
        assert_eq!(
            named("GET", "/Observation", "patient=Patient/p2,p3"),
            ["p2", "p3"]
        );
        assert_eq!(named("GET", "/Observation", "subject=Patient/p4"), ["p4"]);
        assert_eq!(named("GET", "/Observation", "subject:Patient=p5"), ["p5"]);
        assert_eq!(
            named(
                "GET",
                "/Observation",
                "subject=https://ehr.example/fhir/Patient/p6"
            ),
            ["p6"]
        );
        assert_eq!(named("GET", "/Patient", "_id=p7,p8"), ["p7", "p8"]);
        assert_eq!(named("PUT", "/Patient/p9", ""), ["p9"]);
        assert_eq!(named("GET", "/Patient/p1", "").len(), 1);
    }

    #[test]
    fn requests_that_name_no_patient() {
        assert!(named("GET", "/metadata", "").is_empty());
        assert!(named("GET", "/Observation/o1", "").is_empty());
        assert!(named("GET", "/Observation", "subject=Group/g1").is_empty());
        assert!(named("GET", "/Observation", "subject=g1").is_empty());
        assert!(named("GET", "/Observation", "patient.name=smith").is_empty());
        assert!(named("GET", "/Patient", "name=smith").is_empty());
        assert!(named("GET", "/Practitioner/x", "").is_empty());
    }

    #[test]
    fn repeats_are_dropped_and_the_list_is_bounded() {
        assert_eq!(
            named("GET", "/Patient/p1/Observation", "patient=p1"),
            ["p1"]
        );
        let ids: Vec<String> = (0..100).map(|i| format!("p{i}")).collect();
        let req = classify(
            "GET",
            "/Observation",
            &format!("patient={}", ids.join(",")),
            None,
            None,
        )
        .unwrap();
        let (list, more) = named_patients(&req);
        assert_eq!(
            (list.len(), more),
            (MAX_NAMED_PATIENTS, 100 - MAX_NAMED_PATIENTS)
        );
    }
}

/// One open JSON container of the scanner.
enum Frame {
    Object {
        /// The next string is a key.
        expect_key: bool,
        /// The key of the value being read.
        key: Key,
        /// `"resourceType": "Patient"` seen in this object.
        patient: bool,
        /// Its `"id"`.
        id: Option<String>,
    },
    Array,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Other,
    ResourceType,
    Id,
    Reference,
}

/// Finds the patients a FHIR JSON response holds, as its bytes pass, chunk by chunk: every
/// `Patient` resource (its `id`) and every `reference` to `Patient/<id>`, anywhere (Bundle
/// entries, contained resources). Bounded: strings longer than `MAX_STRING` bytes are skipped
/// (no id or reference is that long), the nesting depth is capped, and at most
/// [`MAX_NAMED_PATIENTS`] ids are kept, with a count of the rest. Input that is not JSON
/// makes it stop looking, never fail.
pub struct PatientScanner {
    stack: Vec<Frame>,
    in_string: bool,
    escape: bool,
    /// The string being read (`None` once it is too long to matter).
    buf: Option<Vec<u8>>,
    found: Vec<String>,
    more: u64,
    broken: bool,
}

const MAX_STRING: usize = 512;
const MAX_DEPTH: usize = 128;

impl Default for PatientScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl PatientScanner {
    /// A scanner at the start of a body.
    pub fn new() -> Self {
        PatientScanner {
            stack: Vec::new(),
            in_string: false,
            escape: false,
            buf: None,
            found: Vec::new(),
            more: 0,
            broken: false,
        }
    }

    fn add(&mut self, id: String) {
        if id.is_empty() || self.found.contains(&id) {
            return;
        }
        if self.found.len() < MAX_NAMED_PATIENTS {
            self.found.push(id);
        } else {
            self.more += 1;
        }
    }

    /// Feed the next bytes of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if self.broken {
                return;
            }
            if self.in_string {
                if self.escape {
                    self.escape = false;
                    let decoded = match b {
                        b'"' | b'\\' | b'/' => b,
                        // Other escapes never occur in ids or references; keep them visible.
                        _ => b'?',
                    };
                    self.push_string_byte(decoded);
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                    self.end_string();
                } else {
                    self.push_string_byte(b);
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    self.buf = Some(Vec::new());
                }
                b'{' | b'[' => {
                    if self.stack.len() >= MAX_DEPTH {
                        self.broken = true;
                        return;
                    }
                    self.stack.push(if b == b'{' {
                        Frame::Object {
                            expect_key: true,
                            key: Key::Other,
                            patient: false,
                            id: None,
                        }
                    } else {
                        Frame::Array
                    });
                }
                b'}' | b']' => match self.stack.pop() {
                    Some(Frame::Object {
                        patient: true,
                        id: Some(id),
                        ..
                    }) => self.add(id),
                    Some(_) => {}
                    None => self.broken = true,
                },
                b',' => {
                    if let Some(Frame::Object {
                        expect_key, key, ..
                    }) = self.stack.last_mut()
                    {
                        *expect_key = true;
                        *key = Key::Other;
                    }
                }
                _ => {}
            }
        }
    }

    fn push_string_byte(&mut self, b: u8) {
        if let Some(buf) = &mut self.buf {
            if buf.len() < MAX_STRING {
                buf.push(b);
            } else {
                self.buf = None;
            }
        }
    }

    fn end_string(&mut self) {
        let text = self.buf.take().and_then(|v| String::from_utf8(v).ok());
        let Some(Frame::Object {
            expect_key,
            key,
            patient,
            id,
        }) = self.stack.last_mut()
        else {
            return;
        };
        if *expect_key {
            *expect_key = false;
            *key = match text.as_deref() {
                Some("resourceType") => Key::ResourceType,
                Some("id") => Key::Id,
                Some("reference") => Key::Reference,
                _ => Key::Other,
            };
            return;
        }
        let Some(text) = text else {
            return;
        };
        match *key {
            Key::ResourceType => *patient = text == "Patient",
            Key::Id => *id = Some(text),
            Key::Reference => {
                if let Some(pid) = patient_ref(&text, false) {
                    self.add(pid);
                }
            }
            Key::Other => {}
        }
    }

    /// The patients found so far, and how many more there were.
    pub fn patients(&self) -> (&[String], u64) {
        (&self.found, self.more)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod scanner_tests {
    use super::*;

    fn scan_in_chunks(body: &str, size: usize) -> Vec<String> {
        let mut s = PatientScanner::new();
        for c in body.as_bytes().chunks(size) {
            s.feed(c);
        }
        s.patients().0.to_vec()
    }

    #[test]
    fn finds_patients_and_references_whatever_the_chunking() {
        let body = r#"{"resourceType":"Bundle","type":"searchset","entry":[
            {"fullUrl":"http://x/fhir/Observation/o1","resource":{"resourceType":"Observation","id":"o1",
              "subject":{"reference":"Patient/p1"},"performer":[{"reference":"Practitioner/d1"}],
              "note":[{"text":"see \"Patient/p9\" and reference"}]}},
            {"resource":{"resourceType":"Patient","id":"p2","name":[{"family":"Doe"}]}},
            {"resource":{"resourceType":"Encounter","id":"e1","subject":{"reference":"https:\/\/ehr.example\/fhir\/Patient\/p3"},
              "contained":[{"resourceType":"Patient","id":"p4"}]}},
            {"resource":{"resourceType":"Observation","id":"o2","subject":{"reference":"Patient/p1/_history/3"}}}
        ]}"#;
        for size in [1, 2, 3, 7, 64, body.len()] {
            assert_eq!(
                scan_in_chunks(body, size),
                ["p1", "p2", "p3", "p4"],
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn ignores_what_is_not_a_patient_and_survives_junk() {
        assert!(scan_in_chunks(r#"{"resourceType":"Practitioner","id":"d1"}"#, 5).is_empty());
        assert!(scan_in_chunks(r#"{"id":"p1","kind":"Patient"}"#, 5).is_empty());
        assert!(scan_in_chunks(r#"{"reference":"Group/g1"}"#, 5).is_empty());
        assert!(scan_in_chunks("not json at all ] } {", 3).is_empty());
        let deep = "[".repeat(10_000);
        assert!(scan_in_chunks(&deep, 100).is_empty());
        let long = format!(r#"{{"reference":"Patient/{}"}}"#, "x".repeat(10_000));
        assert!(scan_in_chunks(&long, 100).is_empty());
    }

    #[test]
    fn the_list_is_bounded_with_a_count_of_the_rest() {
        let entries: Vec<String> = (0..100)
            .map(|i| format!(r#"{{"resourceType":"Patient","id":"p{i}"}}"#))
            .collect();
        let body = format!("[{}]", entries.join(","));
        let mut s = PatientScanner::new();
        s.feed(body.as_bytes());
        let (list, more) = s.patients();
        assert_eq!(
            (list.len() as u64, more),
            (MAX_NAMED_PATIENTS as u64, 100 - MAX_NAMED_PATIENTS as u64)
        );
    }
}
