//! Masking rule configuration (serde) and its compiled form (a path trie per
//! resource type).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Masking configuration: rules per FHIR resource type.
///
/// The key is a resource type name (`Patient`, `Observation`, …) or `"*"`
/// for rules that apply to every resource type. For a type that has its own
/// list, the `"*"` rules apply as well; where both lists name the same path,
/// the type's own rule wins.
///
/// YAML form (JSON works the same way):
///
/// ```yaml
/// resources:
///   Patient:
///     - { path: telecom, action: remove }
///     - { path: name, action: redact }
///     - { path: address, action: { keep_only: [state, postalCode] } }
///     - { path: birthDate, action: year }
///     - { path: identifier.value, action: { last_chars: 4 } }
///   Observation:
///     - { path: performer, action: remove }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskRules {
    /// Resource type (or `"*"`) → rules for that type.
    pub resources: BTreeMap<String, Vec<MaskRule>>,
}

/// One rule: which element, and what to do with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskRule {
    /// Element path below the resource, segments joined by dots:
    /// `telecom`, `name`, `birthDate`, `identifier.value`, `name.given`.
    ///
    /// Each segment is a JSON member name (`[A-Za-z][A-Za-z0-9]*`). Arrays are
    /// transparent, as FHIR repeats are: `name` matches the whole `name`
    /// member and `name.given` matches `given` in every element of `name`.
    /// Choice elements are named in full (`deceasedDateTime`, not
    /// `deceased[x]`). The first segment may not be `resourceType`.
    pub path: String,
    /// What to do with each matched element.
    pub action: MaskAction,
}

/// What a rule does to the element(s) its path matches.
///
/// Whatever the action, the element's FHIR primitive-extension sibling
/// (`_birthDate` for `birthDate`, which can hold e.g. the exact
/// `patient-birthTime`) is removed along with any change to the element
/// itself, except for [`MaskAction::KeepOnly`], which keeps `_x` exactly when
/// it keeps `x`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskAction {
    /// Remove the member (and its `_member` sibling) from its object.
    /// Serde: `remove`.
    Remove,
    /// Replace a string with `"REDACTED"`; for an object or array, every
    /// string leaf inside it (member values and array items, not keys) becomes
    /// `"REDACTED"`. Numbers, booleans and `null` are left alone.
    /// Serde: `redact`.
    Redact,
    /// For an object (or each object of an array): keep only the members with
    /// these names (plus their `_name` primitive-extension siblings), remove
    /// all others. Serde: `{ keep_only: [state, postalCode] }`.
    KeepOnly(Vec<String>),
    /// For a date / dateTime / instant string: keep only its first 4
    /// characters (the year): `"1961-04-12"` → `"1961"`. Non-strings and
    /// strings of at most 4 characters are left alone. Serde: `year`.
    Year,
    /// For a string: keep only its last `n` characters (Unicode scalar
    /// values; the kept characters keep their original JSON spelling).
    /// Strings of at most `n` characters are left alone; `n` must be ≥ 1.
    /// Serde: `{ last_chars: 4 }`.
    LastChars(usize),
}

impl MaskAction {
    /// Actions that act on the element's value and so also remove its
    /// primitive-extension sibling `_name`.
    pub(crate) fn takes_sibling(&self) -> bool {
        !matches!(self, MaskAction::KeepOnly(_))
    }
}

/// Rules compiled into a trie of path segments.
#[derive(Debug, Default)]
pub(crate) struct Trie {
    pub action: Option<MaskAction>,
    pub children: HashMap<String, Trie>,
}

impl Trie {
    fn insert(&mut self, segments: &[&str], action: MaskAction) {
        let mut node = self;
        for seg in segments {
            node = node.children.entry((*seg).to_string()).or_default();
        }
        node.action = Some(action);
    }

    /// Whether anything at this node changes the members of an object.
    pub fn touches_members(&self) -> bool {
        !self.children.is_empty() || matches!(self.action, Some(MaskAction::KeepOnly(_)))
    }
}

/// How a member of an object is treated under the rules of that object's
/// trie node `t`.
pub(crate) struct Decision<'t> {
    /// The rule node matching this member (for a `_x` sibling: `x`'s node).
    pub rule: Option<&'t Trie>,
    /// The member is the `_x` primitive-extension sibling of a ruled `x`.
    pub sibling: bool,
    /// The member is removed from its object.
    pub removed: bool,
}

pub(crate) fn decide<'t>(t: &'t Trie, key: &str) -> Decision<'t> {
    let keep_excluded = match &t.action {
        Some(MaskAction::KeepOnly(list)) => !list
            .iter()
            .any(|k| k == key || key.strip_prefix('_') == Some(k.as_str())),
        _ => false,
    };
    if let Some(c) = t.children.get(key) {
        return Decision {
            rule: Some(c),
            sibling: false,
            removed: keep_excluded || c.action == Some(MaskAction::Remove),
        };
    }
    if let Some(c) = key.strip_prefix('_').and_then(|base| t.children.get(base)) {
        if c.action.as_ref().is_some_and(MaskAction::takes_sibling) {
            return Decision {
                rule: Some(c),
                sibling: true,
                removed: true,
            };
        }
    }
    Decision {
        rule: None,
        sibling: false,
        removed: keep_excluded,
    }
}

/// Rules compiled per resource type.
#[derive(Debug, Default)]
pub(crate) struct Compiled {
    pub by_type: HashMap<String, Trie>,
    pub wildcard: Option<Trie>,
}

impl Compiled {
    pub fn rules_for(&self, resource_type: &str) -> Option<&Trie> {
        self.by_type.get(resource_type).or(self.wildcard.as_ref())
    }
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric())
}

/// Validate one rule list; returns the split paths in order.
fn validate_list<'r>(rtype: &str, rules: &'r [MaskRule]) -> Result<Vec<Vec<&'r str>>, String> {
    let mut seen: Vec<Vec<&str>> = Vec::with_capacity(rules.len());
    for (i, rule) in rules.iter().enumerate() {
        let place = format!("resources.{rtype}[{i}]");
        if rule.path.is_empty() {
            return Err(format!("{place}.path: empty path"));
        }
        let segments: Vec<&str> = rule.path.split('.').collect();
        for (n, seg) in segments.iter().enumerate() {
            if seg.is_empty() {
                return Err(format!(
                    "{place}.path {:?}: segment {} is empty",
                    rule.path,
                    n + 1
                ));
            }
            if !is_name(seg) {
                return Err(format!(
                    "{place}.path {:?}: segment {:?} is not a member name ([A-Za-z][A-Za-z0-9]*)",
                    rule.path, seg
                ));
            }
        }
        if segments.first() == Some(&"resourceType") {
            return Err(format!(
                "{place}.path {:?}: resourceType cannot be masked",
                rule.path
            ));
        }
        match &rule.action {
            MaskAction::KeepOnly(list) => {
                if list.is_empty() {
                    return Err(format!(
                        "{place}.action.keep_only: empty list (use remove to drop the element)"
                    ));
                }
                if let Some(bad) = list.iter().find(|k| !is_name(k)) {
                    return Err(format!(
                        "{place}.action.keep_only: {bad:?} is not a member name ([A-Za-z][A-Za-z0-9]*)"
                    ));
                }
            }
            MaskAction::LastChars(0) => {
                return Err(format!(
                    "{place}.action.last_chars: must be at least 1 (use redact or remove)"
                ));
            }
            _ => {}
        }
        for (j, other) in seen.iter().enumerate() {
            if *other == segments {
                return Err(format!(
                    "{place}.path {:?}: duplicate of resources.{rtype}[{j}]",
                    rule.path
                ));
            }
            let (shorter, longer, short_idx) = if other.len() < segments.len() {
                (other, &segments, j)
            } else {
                (&segments, other, i)
            };
            if longer.starts_with(shorter)
                && rules.get(short_idx).map(|r| &r.action) == Some(&MaskAction::Remove)
            {
                return Err(format!(
                    "resources.{rtype}: path {:?} lies inside {:?}, which is removed",
                    longer.join("."),
                    shorter.join(".")
                ));
            }
        }
        seen.push(segments);
    }
    Ok(seen)
}

pub(crate) fn compile(rules: &MaskRules) -> Result<Compiled, String> {
    let mut validated: BTreeMap<&str, Vec<(Vec<&str>, &MaskAction)>> = BTreeMap::new();
    for (rtype, list) in &rules.resources {
        if rtype != "*" && !is_name(rtype) {
            return Err(format!(
                "resources.{rtype:?}: key must be \"*\" or a resource type name ([A-Za-z][A-Za-z0-9]*)"
            ));
        }
        let paths = validate_list(rtype, list)?;
        validated.insert(
            rtype,
            paths
                .into_iter()
                .zip(list.iter().map(|r| &r.action))
                .collect(),
        );
    }
    let wildcard_rules = validated.remove("*").unwrap_or_default();
    let build = |own: &[(Vec<&str>, &MaskAction)]| {
        let mut trie = Trie::default();
        for (segments, action) in &wildcard_rules {
            if !own.iter().any(|(s, _)| s == segments) {
                trie.insert(segments, (*action).clone());
            }
        }
        for (segments, action) in own {
            trie.insert(segments, (*action).clone());
        }
        trie
    };
    let mut compiled = Compiled::default();
    for (rtype, own) in &validated {
        compiled.by_type.insert((*rtype).to_string(), build(own));
    }
    if !wildcard_rules.is_empty() {
        compiled.wildcard = Some(build(&[]));
    }
    Ok(compiled)
}
