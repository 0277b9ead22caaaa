//! PHI masking for FHIR R4 JSON bodies.
//!
//! [`Masker::mask`] takes the bytes of a FHIR JSON body — a single resource,
//! or a Bundle of any type whose `entry[].resource` are resources — and
//! removes or reduces the elements named by [`MaskRules`]. Every byte that is
//! not part of a masked element comes out exactly as it went in: whitespace,
//! key order, number spellings (`1.50`, `12345678901234567890`) and string
//! escapes are untouched, because the body is never parsed into a value tree
//! and re-serialized. Instead a small strict JSON tokenizer records the byte
//! span of every value, the rules are applied as a list of byte edits
//! (remove `a..b`, replace `a..b` with `"REDACTED"`, insert at `a`), and the
//! edits are applied in one pass. The cost is linear in the body size.
//!
//! # Which objects are resources
//!
//! Any JSON object with a string `resourceType` member is a resource, wherever
//! it sits: the body itself, `Bundle.entry[].resource`,
//! `Bundle.entry[].response.outcome`, `Parameters.parameter[].resource`,
//! `contained[]` at any depth, a Bundle inside a Bundle. Each is masked with
//! the rules of its own type (see [`MaskRules`]); a type's rule paths never
//! reach into a nested resource (write a rule for the nested type instead),
//! although a rule may remove or redact the element holding it whole (a
//! resource inside a redacted element is redacted like any other content and
//! gets no label of its own).
//!
//! # The security label
//!
//! Each resource in which anything was masked gets
//! `{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"REDACTED","display":"redacted"}`
//! appended to `meta.security`, creating `"meta":{"security":[…]}` (as the
//! last member of the resource) or `"security":[…]` (as the last member of
//! `meta`) when absent. The label is not added twice if `meta.security`
//! already holds a `REDACTED` code of that system.
//!
//! A resource in `contained` does not get a label of its own: FHIR R4
//! invariant dom-5 forbids security labels on contained resources. Masking
//! inside a contained resource labels its container instead (the label then
//! covers the whole container, contained resources included). Bundle entries
//! and other nested resources are independent and each gets its own label.
//! Resources with nothing masked are left byte-for-byte untouched.
//!
//! # Example
//!
//! ```
//! use caregate_mask::{Masker, MaskRules};
//!
//! let rules: MaskRules = serde_json::from_str(r#"{"resources": {"Patient": [
//!     {"path": "telecom", "action": "remove"},
//!     {"path": "birthDate", "action": "year"},
//!     {"path": "identifier.value", "action": {"last_chars": 4}}
//! ]}}"#).unwrap();
//! let masker = Masker::new(rules).unwrap();
//! let body = br#"{"resourceType":"Patient", "identifier":[{"value":"123-45-6789"}],
//!   "telecom":[{"value":"555"}], "birthDate":"1961-04-12"}"#;
//! let out = masker.mask(body).unwrap();
//! assert_eq!(
//!     String::from_utf8(out.body).unwrap(),
//!     r#"{"resourceType":"Patient", "identifier":[{"value":"6789"}], "birthDate":"1961","meta":{"security":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"REDACTED","display":"redacted"}]}}"#
//! );
//! assert_eq!((out.resources_masked, out.elements_masked), (1, 3));
//! ```

mod json;
mod rules;
mod walk;

use std::fmt;

pub use json::MAX_DEPTH;
pub use rules::{MaskAction, MaskRule, MaskRules};
pub use walk::EditSpan;

/// The compiled masking engine. Build it once with [`Masker::new`]; it is
/// immutable and `Send + Sync`, so one instance can serve every request.
#[derive(Debug)]
pub struct Masker {
    rules: rules::Compiled,
}

/// The result of [`Masker::mask`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskOutcome {
    /// The masked body (equal to the input when nothing was masked).
    pub body: Vec<u8>,
    /// Resources in which anything was masked, each of which now carries the
    /// REDACTED security label; a contained resource counts as part of its
    /// container.
    pub resources_masked: usize,
    /// Masked element occurrences: each member matched by a rule (together
    /// with its `_name` sibling) that was removed or changed counts once.
    /// A rule matching `identifier.value` in three identifiers counts 3; a
    /// rule removing a `telecom` array counts 1.
    pub elements_masked: usize,
}

/// Why a body could not be masked. No partial output is ever produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskError {
    /// Not valid JSON (RFC 8259, UTF-8, no byte-order mark, nothing but
    /// whitespace after the value).
    NotJson,
    /// Valid JSON, but not a FHIR resource: the top level is not an object
    /// with a string `resourceType`.
    NotFhir,
    /// Arrays/objects nested deeper than [`MAX_DEPTH`] levels.
    TooDeep,
}

impl fmt::Display for MaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MaskError::NotJson => "body is not valid JSON",
            MaskError::NotFhir => "body is not a FHIR resource (no resourceType)",
            MaskError::TooDeep => "body nests JSON too deeply",
        })
    }
}

impl std::error::Error for MaskError {}

impl Masker {
    /// Compile and validate `rules`.
    ///
    /// Errors name the offending place, e.g.
    /// `resources.Patient[2].path "name..given": segment 2 is empty`.
    /// Checked: resource type keys (`*` or `[A-Za-z][A-Za-z0-9]*`), path
    /// segments (non-empty, `[A-Za-z][A-Za-z0-9]*`, not starting with
    /// `resourceType`), `keep_only` (non-empty list of member names),
    /// `last_chars` (≥ 1), no duplicate path within one list, no path inside
    /// a path the same list removes.
    pub fn new(rules: MaskRules) -> Result<Masker, String> {
        Ok(Masker {
            rules: rules::compile(&rules)?,
        })
    }

    /// Mask a FHIR JSON body. See the crate documentation for what is masked
    /// and what is guaranteed to stay byte-identical.
    pub fn mask(&self, body: &[u8]) -> Result<MaskOutcome, MaskError> {
        self.mask_traced(body).map(|(outcome, _)| outcome)
    }

    /// [`Masker::mask`], also returning every edit made, in order: the input
    /// range replaced and the output range that replaced it. Outside these
    /// ranges the output is the input, byte for byte. Meant for tests,
    /// debugging and audit detail.
    pub fn mask_traced(&self, body: &[u8]) -> Result<(MaskOutcome, Vec<EditSpan>), MaskError> {
        if std::str::from_utf8(body).is_err() {
            return Err(MaskError::NotJson);
        }
        let root = json::parse(body)?;
        let members = match &root.kind {
            json::Kind::Object(members) if walk::resource_type(body, members).is_some() => members,
            _ => return Err(MaskError::NotFhir),
        };
        let mut walker = walk::Walker::new(&self.rules, body);
        walker.resource(&root, members, false);
        let (resources_masked, elements_masked) = (walker.resources_masked, walker.elements_masked);
        let (out, spans) = walk::apply(body, walker.edits)?;
        Ok((
            MaskOutcome {
                body: out,
                resources_masked,
                elements_masked,
            },
            spans,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn masker_is_send_sync() {
        assert_send_sync::<Masker>();
    }
}
