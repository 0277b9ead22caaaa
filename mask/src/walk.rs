//! The masking walk: visits the span tree once, decides per member what to
//! keep, and records byte edits (replace `start..end` of the input with some
//! bytes). The edits never overlap; applying them copies every other byte of
//! the input unchanged.

use std::borrow::Cow;
use std::ops::Range;

use crate::json::{char_len, char_starts, Kind, Member, Node};
use crate::rules::{decide, Compiled, MaskAction, Trie};
use crate::MaskError;

/// The security label appended to `meta.security` of masked resources.
pub(crate) const LABEL: &str = r#"{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"REDACTED","display":"redacted"}"#;
const LABEL_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
const LABEL_CODE: &str = "REDACTED";
const REDACTED: &[u8] = b"\"REDACTED\"";

pub(crate) struct Edit {
    pub start: usize,
    pub end: usize,
    pub text: Cow<'static, [u8]>,
}

pub(crate) struct Walker<'m, 'a> {
    rules: &'m Compiled,
    input: &'a [u8],
    pub edits: Vec<Edit>,
    /// Edits made by the rules of the resource being walked (nested
    /// resources save and restore it).
    ctx_edits: usize,
    /// Elements masked in the resource being walked, including its contained
    /// resources.
    res_elements: usize,
    pub elements_masked: usize,
    pub resources_masked: usize,
}

/// The `resourceType` of an object, if it has a string one (the last one
/// wins, as in most JSON parsers).
pub(crate) fn resource_type<'a>(input: &'a [u8], members: &[Member]) -> Option<Cow<'a, str>> {
    members
        .iter()
        .rev()
        .find(|m| m.key_is(input, "resourceType"))
        .and_then(|m| m.value.as_str(input))
}

impl<'m, 'a> Walker<'m, 'a> {
    pub fn new(rules: &'m Compiled, input: &'a [u8]) -> Self {
        Walker {
            rules,
            input,
            edits: Vec::new(),
            ctx_edits: 0,
            res_elements: 0,
            elements_masked: 0,
            resources_masked: 0,
        }
    }

    fn push(&mut self, start: usize, end: usize, text: Cow<'static, [u8]>) {
        self.edits.push(Edit { start, end, text });
        self.ctx_edits += 1;
    }

    fn count_element(&mut self) {
        self.elements_masked += 1;
        self.res_elements += 1;
    }

    /// Walk a resource object. A contained resource's masking is accounted
    /// to (and labelled on) its container.
    pub fn resource(&mut self, obj: &Node, members: &[Member], contained: bool) {
        let rtype = resource_type(self.input, members).unwrap_or_default();
        let trie = self.rules.rules_for(&rtype);
        let saved_ctx = self.ctx_edits;
        let first_edit = self.edits.len();
        let saved_elements = std::mem::replace(&mut self.res_elements, 0);
        self.members(obj, members, trie, false, true);
        let mine = self.res_elements;
        if contained {
            self.res_elements = saved_elements + mine;
        } else {
            self.res_elements = saved_elements;
            if mine > 0 {
                self.resources_masked += 1;
                self.label(obj, members, trie, first_edit);
            }
        }
        self.ctx_edits = saved_ctx;
    }

    fn value(&mut self, v: &Node, t: Option<&Trie>, redact: bool, contained: bool) {
        match &v.kind {
            Kind::Object(members) => {
                if resource_type(self.input, members).is_some() {
                    if redact {
                        // Inside a redacted element: redacted whole, by
                        // neither the outer rules nor its own.
                        self.members(v, members, None, true, false);
                    } else {
                        self.resource(v, members, contained);
                    }
                } else {
                    self.members(v, members, t, redact, false);
                }
            }
            Kind::Array(items) => {
                for item in items {
                    self.value(item, t, redact, contained);
                }
            }
            Kind::Str { .. } => self.string(v, t, redact),
            Kind::Scalar => {}
        }
    }

    fn string(&mut self, v: &Node, t: Option<&Trie>, redact: bool) {
        let Some(raw) = v.raw_str(self.input) else {
            return;
        };
        if redact {
            if v.as_str(self.input).as_deref() != Some("REDACTED") {
                self.push(v.start, v.end, Cow::Borrowed(REDACTED));
            }
            return;
        }
        let kept: Option<&[u8]> = match t.and_then(|t| t.action.as_ref()) {
            Some(MaskAction::Year) => {
                // Offset just past the 4th character, if there is a 5th.
                let mut at = 0;
                for _ in 0..4 {
                    at += char_len(raw, at);
                }
                if at < raw.len() {
                    raw.get(..at)
                } else {
                    None
                }
            }
            Some(MaskAction::LastChars(n)) => {
                let starts = char_starts(raw);
                match starts.len().checked_sub(*n) {
                    Some(skip) if skip > 0 => starts.get(skip).and_then(|&at| raw.get(at..)),
                    _ => None,
                }
            }
            _ => None,
        };
        if let Some(kept) = kept {
            let mut text = Vec::with_capacity(kept.len() + 2);
            text.push(b'"');
            text.extend_from_slice(kept);
            text.push(b'"');
            self.push(v.start, v.end, Cow::Owned(text));
        }
    }

    /// Walk the members of an object whose path trie node is `t`.
    fn members(
        &mut self,
        obj: &Node,
        members: &[Member],
        t: Option<&Trie>,
        redact: bool,
        resource_root: bool,
    ) {
        let input = self.input;
        let Some(t) = t.filter(|t| t.touches_members()) else {
            // No rule reaches into these members: look for nested resources
            // (and redact, if inside a redacted element).
            for m in members {
                let contained = resource_root && m.key_is(input, "contained");
                self.value(&m.value, None, redact, contained);
            }
            return;
        };
        let decisions: Vec<_> = members.iter().map(|m| decide(t, &m.key(input))).collect();
        self.remove_members(obj, members, |i| {
            decisions.get(i).is_some_and(|d| d.removed)
        });
        // Elements (rule nodes with an action) that changed, by rule node.
        let mut changed: Vec<(&Trie, bool)> = Vec::new();
        for (m, d) in members.iter().zip(&decisions) {
            let mut did_change = d.removed;
            if !d.removed {
                let before = self.ctx_edits;
                let rule = if d.sibling { None } else { d.rule };
                let redact =
                    redact || rule.and_then(|r| r.action.as_ref()) == Some(&MaskAction::Redact);
                let contained = resource_root && m.key_is(input, "contained");
                self.value(&m.value, rule, redact, contained);
                did_change = self.ctx_edits > before;
            }
            if let Some(rule) = d.rule.filter(|r| r.action.is_some()) {
                match changed.iter_mut().find(|(r, _)| std::ptr::eq(*r, rule)) {
                    Some(entry) => entry.1 |= did_change,
                    None => changed.push((rule, did_change)),
                }
            }
        }
        for _ in changed.iter().filter(|(_, c)| *c) {
            self.count_element();
        }
    }

    /// Record the edits that remove the members for which `removed(i)`
    /// holds, keeping the object valid JSON and the kept members' original
    /// separators and whitespace.
    fn remove_members(&mut self, obj: &Node, members: &[Member], removed: impl Fn(usize) -> bool) {
        let Some(first_kept) = (0..members.len()).find(|&i| !removed(i)) else {
            if !members.is_empty() {
                // Everything goes: `{ ... }` → `{}`.
                self.push(obj.start + 1, obj.end.saturating_sub(1), Cow::Borrowed(b""));
            }
            return;
        };
        for i in (0..members.len()).filter(|&i| removed(i)) {
            let range = if i < first_kept {
                // From this key up to the next member's key.
                members
                    .get(i)
                    .zip(members.get(i + 1))
                    .map(|(m, n)| m.key_start..n.key_start)
            } else {
                // From the end of the previous member (its comma included)
                // to the end of this one.
                i.checked_sub(1)
                    .and_then(|p| members.get(p))
                    .zip(members.get(i))
                    .map(|(p, m)| p.value.end..m.value.end)
            };
            if let Some(r) = range {
                self.push(r.start, r.end, Cow::Borrowed(b""));
            }
        }
    }

    /// Insert `member` (`"name":value`) as the last member of `obj`, given
    /// which members are kept.
    fn append_member(
        &mut self,
        obj: &Node,
        members: &[Member],
        kept: impl Fn(&Member) -> bool,
        member: String,
    ) {
        match members.iter().rev().find(|m| kept(m)) {
            Some(last) => {
                let at = last.value.end;
                self.push(at, at, Cow::Owned(format!(",{member}").into_bytes()));
            }
            None => {
                let at = obj.end.saturating_sub(1);
                self.push(at, at, Cow::Owned(member.into_bytes()));
            }
        }
    }

    /// Replace a whole value, dropping the edits made inside it (all of
    /// which were recorded at index `first_edit` or later).
    fn replace(&mut self, v: &Node, text: String, first_edit: usize) {
        // Insertions right before or after the value stay.
        let inside = |e: &Edit| {
            e.start >= v.start
                && e.end <= v.end
                && !(e.start == e.end && (e.start == v.start || e.end == v.end))
        };
        let tail = self.edits.split_off(first_edit.min(self.edits.len()));
        self.edits.extend(tail.into_iter().filter(|e| !inside(e)));
        self.push(v.start, v.end, Cow::Owned(text.into_bytes()));
    }

    fn has_label(&self, items: &[Node]) -> bool {
        let input = self.input;
        items.iter().any(|item| {
            let Some(ms) = item.members() else {
                return false;
            };
            let field = |name: &str| {
                ms.iter()
                    .rev()
                    .find(|m| m.key_is(input, name))
                    .and_then(|m| m.value.as_str(input))
            };
            field("system").as_deref() == Some(LABEL_SYSTEM)
                && field("code").as_deref() == Some(LABEL_CODE)
        })
    }

    /// Append the REDACTED security label to the resource `obj`.
    fn label(&mut self, obj: &Node, members: &[Member], t: Option<&Trie>, first_edit: usize) {
        let input = self.input;

        let meta = members
            .iter()
            .rev()
            .find(|m| m.key_is(input, "meta") && kept_by(input, t)(m));
        let Some(meta) = meta else {
            self.append_member(
                obj,
                members,
                kept_by(input, t),
                format!("\"meta\":{{\"security\":[{LABEL}]}}"),
            );
            return;
        };
        let Some(meta_members) = meta.value.members() else {
            self.replace(
                &meta.value,
                format!("{{\"security\":[{LABEL}]}}"),
                first_edit,
            );
            return;
        };
        let tm = t.and_then(|t| t.children.get("meta"));
        let security = meta_members
            .iter()
            .rev()
            .find(|m| m.key_is(input, "security") && kept_by(input, tm)(m));
        let Some(security) = security else {
            self.append_member(
                &meta.value,
                meta_members,
                kept_by(input, tm),
                format!("\"security\":[{LABEL}]"),
            );
            return;
        };
        match &security.value.kind {
            Kind::Array(items) => {
                if tm.is_none() && self.has_label(items) {
                    return;
                }
                let text = if items.is_empty() {
                    LABEL.to_string()
                } else {
                    format!(",{LABEL}")
                };
                let at = match items.last() {
                    Some(last) => last.end,
                    None => security.value.end.saturating_sub(1),
                };
                self.push(at, at, Cow::Owned(text.into_bytes()));
            }
            _ => self.replace(&security.value, format!("[{LABEL}]"), first_edit),
        }
    }
}

/// Predicate: is a member of an object with trie node `t` kept?
fn kept_by<'x>(input: &'x [u8], t: Option<&'x Trie>) -> impl Fn(&Member) -> bool + 'x {
    move |m: &Member| t.is_none_or(|t| !decide(t, &m.key(input)).removed)
}

/// One edit as applied: the input bytes replaced and the output bytes that
/// replaced them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditSpan {
    /// Replaced range of the input (empty for an insertion).
    pub input: Range<usize>,
    /// Range of the output that replaced it (empty for a removal).
    pub output: Range<usize>,
}

/// Apply non-overlapping edits to `input`.
pub(crate) fn apply(
    input: &[u8],
    mut edits: Vec<Edit>,
) -> Result<(Vec<u8>, Vec<EditSpan>), MaskError> {
    edits.sort_by_key(|e| (e.start, e.end));
    let extra: usize = edits.iter().map(|e| e.text.len()).sum();
    let mut out = Vec::with_capacity(input.len() + extra);
    let mut spans = Vec::with_capacity(edits.len());
    let mut cursor = 0;
    for e in &edits {
        // Edits are disjoint by construction; refuse rather than emit a
        // half-masked body if that ever fails to hold.
        let Some(between) = input.get(cursor..e.start) else {
            return Err(MaskError::NotJson);
        };
        if e.end < e.start || e.end > input.len() {
            return Err(MaskError::NotJson);
        }
        out.extend_from_slice(between);
        let out_start = out.len();
        out.extend_from_slice(&e.text);
        spans.push(EditSpan {
            input: e.start..e.end,
            output: out_start..out.len(),
        });
        cursor = e.end;
    }
    out.extend_from_slice(input.get(cursor..).unwrap_or_default());
    Ok((out, spans))
}
