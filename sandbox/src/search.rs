//! Search: parameter parsing, matching, paging, `_include`/`_revinclude`,
//! and the `searchset` Bundles (also used by `$everything`).

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::outcome::Fail;
use crate::params::{param_def, Kind, ParamDef};
use crate::query::build_query;
use crate::store::{local_ref, Store};
use crate::types::{looks_like_type, valid_id};

/// Page size when `_count` is absent.
pub(crate) const DEFAULT_COUNT: usize = 50;
/// Largest page size honoured.
pub(crate) const MAX_COUNT: usize = 200;

/// Result parameters that are accepted but have no effect.
const IGNORED: &[&str] = &[
    "_format",
    "_pretty",
    "_elements",
    "_sort",
    "_total",
    "_contained",
    "_containedType",
];

#[derive(Debug, PartialEq)]
enum Modifier {
    None,
    Text,
    Not,
    Exact,
    Contains,
}

#[derive(Debug)]
enum RefQuery {
    /// A bare id: matches `AnyType/id` (restricted by the parameter target).
    Bare(String),
    /// A local `Type/id`.
    Local(String),
    /// Anything else (external URL, urn): compared verbatim.
    Absolute(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum DateOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug)]
enum Criterion {
    Missing(bool),
    Id(String),
    Ref(RefQuery),
    Token {
        system: Option<String>,
        code: String,
    },
    /// Lower-cased text for `:text`, string params (`:exact` keeps case).
    Text(String),
    Date(DateOp, String),
}

/// One search parameter occurrence: the criteria are OR-ed; filters AND-ed.
#[derive(Debug)]
struct Filter {
    def: ParamDef,
    modifier: Modifier,
    criteria: Vec<Criterion>,
}

/// `_include` / `_revinclude` specification.
#[derive(Debug)]
struct Include {
    /// Source type, or `*`.
    source: String,
    /// `None` for the `Type:*` / `*` wildcard (all references).
    def: Option<ParamDef>,
    target: Option<String>,
}

/// A parsed search request.
#[derive(Debug)]
pub(crate) struct Spec {
    filters: Vec<Filter>,
    count: usize,
    offset: usize,
    summary_count: bool,
    includes: Vec<Include>,
    revincludes: Vec<Include>,
    /// The parameters echoed in links (all but `_count`/`_offset`).
    echo: Vec<(String, String)>,
}

/// A resource in a result page.
pub(crate) struct Hit {
    pub t: String,
    pub id: String,
    pub res: Arc<Value>,
}

/// Splits on `sep` except where escaped with `\` (FHIR search escaping);
/// escapes are removed.
fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n @ ('\\' | ',' | '|' | '$')) => cur.push(n),
                Some(n) => {
                    cur.push('\\');
                    cur.push(n);
                }
                None => cur.push('\\'),
            }
        } else if c == sep {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn parse_usize(name: &str, v: &str) -> Result<usize, Fail> {
    v.trim()
        .parse::<usize>()
        .map_err(|_| Fail::bad_request(format!("{name} must be a non-negative integer, got '{v}'")))
}

fn parse_ref(v: &str, type_modifier: Option<&str>, base: &str) -> RefQuery {
    if let Some(l) = local_ref(v, base) {
        return RefQuery::Local(l);
    }
    if v.contains(':') || v.contains('/') {
        return RefQuery::Absolute(v.to_string());
    }
    match type_modifier {
        Some(t) => RefQuery::Local(format!("{t}/{v}")),
        None => RefQuery::Bare(v.to_string()),
    }
}

/// Whether `s` is a FHIR date search value (after its prefix):
/// `YYYY[-MM[-DD[Thh:mm[:ss[.fff]][Z|+hh:mm|-hh:mm]]]]`. Anything else is a 400, never a
/// search that silently matches nothing.
fn is_search_date(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |from: usize, n: usize| {
        b.get(from..from + n)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    if !digits(0, 4) {
        return false;
    }
    // Date part: YYYY, YYYY-MM or YYYY-MM-DD.
    let mut i = 4;
    for _ in 0..2 {
        if i == b.len() {
            return true;
        }
        if b[i] != b'-' || !digits(i + 1, 2) {
            return false;
        }
        i += 3;
    }
    if i == b.len() {
        return true;
    }
    // Time part (only after a full date): Thh:mm[:ss[.f{1,9}]].
    if b[i] != b'T' || !digits(i + 1, 2) || b.get(i + 3) != Some(&b':') || !digits(i + 4, 2) {
        return false;
    }
    i += 6;
    if b.get(i) == Some(&b':') {
        if !digits(i + 1, 2) {
            return false;
        }
        i += 3;
        if b.get(i) == Some(&b'.') {
            let n = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
            if !(1..=9).contains(&n) {
                return false;
            }
            i += 1 + n;
        }
    }
    match &b[i..] {
        [] | [b'Z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()),
        _ => false,
    }
}

fn parse_date(v: &str) -> Result<Criterion, Fail> {
    // A literal '+' in a time zone may have arrived as a space.
    let v = v.trim().replace(' ', "+");
    let (op, rest) = match v.get(..2) {
        Some("eq") => (DateOp::Eq, &v[2..]),
        Some("ne") => (DateOp::Ne, &v[2..]),
        Some("lt") | Some("eb") => (DateOp::Lt, &v[2..]),
        Some("le") => (DateOp::Le, &v[2..]),
        Some("gt") | Some("sa") => (DateOp::Gt, &v[2..]),
        Some("ge") => (DateOp::Ge, &v[2..]),
        _ => (DateOp::Eq, v.as_str()),
    };
    if !is_search_date(rest) {
        return Err(Fail::bad_request(format!(
            "invalid date search value '{v}'"
        )));
    }
    Ok(Criterion::Date(op, rest.to_string()))
}

/// Parses one `_include`/`_revinclude` value.
fn parse_include(v: &str, rev: bool) -> Result<Include, Fail> {
    let what = if rev { "_revinclude" } else { "_include" };
    if v == "*" && !rev {
        return Ok(Include {
            source: "*".into(),
            def: None,
            target: None,
        });
    }
    let parts: Vec<&str> = v.split(':').collect();
    let (source, param, target) = match parts.as_slice() {
        [s, p] => (*s, *p, None),
        [s, p, t] => (*s, *p, Some(*t)),
        _ => {
            return Err(Fail::bad_request(format!(
                "invalid {what} value '{v}' (expected Type:param[:TargetType])"
            )))
        }
    };
    if !looks_like_type(source) || target.is_some_and(|t| !looks_like_type(t)) {
        return Err(Fail::bad_request(format!("invalid {what} value '{v}'")));
    }
    let def = if param == "*" {
        None
    } else {
        match param_def(source, param) {
            Some(d) if matches!(d.kind, Kind::Reference(_)) => Some(d),
            _ => {
                return Err(Fail::bad_request(format!(
                    "invalid {what} value '{v}': '{param}' is not a supported reference search parameter of {source}"
                )))
            }
        }
    };
    Ok(Include {
        source: source.to_string(),
        def,
        target: target.map(str::to_string),
    })
}

impl Spec {
    /// Parses search parameters for type `t`. Unknown parameters and
    /// unsupported modifiers are errors (400).
    pub fn parse(t: &str, params: &[(String, String)], base: &str) -> Result<Spec, Fail> {
        let mut spec = Spec {
            filters: Vec::new(),
            count: DEFAULT_COUNT,
            offset: 0,
            summary_count: false,
            includes: Vec::new(),
            revincludes: Vec::new(),
            echo: Vec::new(),
        };
        for (key, value) in params {
            let (name, modifier) = match key.split_once(':') {
                Some((n, m)) => (n, Some(m)),
                None => (key.as_str(), None),
            };
            match name {
                "_count" | "_offset" if modifier.is_none() => {
                    let n = parse_usize(name, value)?;
                    if name == "_count" {
                        spec.count = n.min(MAX_COUNT);
                    } else {
                        spec.offset = n;
                    }
                    continue;
                }
                "_summary" if modifier.is_none() => spec.summary_count = value == "count",
                "_include" | "_revinclude" => {
                    if !matches!(modifier, None | Some("iterate") | Some("recurse")) {
                        return Err(Fail::bad_request(format!("unsupported modifier on {key}")));
                    }
                    let rev = name == "_revinclude";
                    let inc = parse_include(value, rev)?;
                    if rev {
                        spec.revincludes.push(inc);
                    } else {
                        spec.includes.push(inc);
                    }
                }
                n if IGNORED.contains(&n) => {}
                _ => {
                    let Some(def) = param_def(t, name) else {
                        return Err(Fail::bad_request(format!(
                            "unknown search parameter '{name}' for resource type {t}"
                        )));
                    };
                    if value.is_empty() {
                        // FHIR: empty parameter values are ignored.
                        continue;
                    }
                    spec.filters
                        .push(parse_filter(t, key, name, modifier, value, def, base)?);
                }
            }
            spec.echo.push((key.clone(), value.clone()));
        }
        Ok(spec)
    }

    /// Whether resource `id`/`res` satisfies every filter.
    pub fn matches(&self, id: &str, res: &Value, base: &str) -> bool {
        self.filters.iter().all(|f| f.matches(id, res, base))
    }
}

fn parse_filter(
    t: &str,
    key: &str,
    name: &str,
    modifier: Option<&str>,
    value: &str,
    def: ParamDef,
    base: &str,
) -> Result<Filter, Fail> {
    let bad_modifier = || Fail::bad_request(format!("unsupported modifier in '{key}'"));
    if modifier == Some("missing") {
        let m = match value {
            "true" => true,
            "false" => false,
            _ => return Err(Fail::bad_request(format!("{key} must be true or false"))),
        };
        return Ok(Filter {
            def,
            modifier: Modifier::None,
            criteria: vec![Criterion::Missing(m)],
        });
    }
    let mut type_modifier = None;
    let modifier = match (def.kind, modifier) {
        (_, None) => Modifier::None,
        (Kind::Reference(_), Some(m)) if looks_like_type(m) => {
            type_modifier = Some(m);
            Modifier::None
        }
        (Kind::Token, Some("text")) => Modifier::Text,
        (Kind::Token, Some("not")) => Modifier::Not,
        (Kind::Str, Some("exact")) => Modifier::Exact,
        (Kind::Str, Some("contains")) => Modifier::Contains,
        _ => return Err(bad_modifier()),
    };
    let mut criteria = Vec::new();
    for v in split_escaped(value, ',') {
        if v.is_empty() {
            continue;
        }
        let c = match def.kind {
            Kind::Id => {
                // `patient=Patient/123` on Patient, `_id=123`.
                let id = match local_ref(&v, base) {
                    Some(l) if l.starts_with(&format!("{t}/")) => l[t.len() + 1..].to_string(),
                    _ => v,
                };
                Criterion::Id(id)
            }
            Kind::Reference(_) => Criterion::Ref(parse_ref(&v, type_modifier, base)),
            Kind::Token if modifier == Modifier::Text => Criterion::Text(v.to_lowercase()),
            Kind::Token => match v.split_once('|') {
                Some((s, c)) => Criterion::Token {
                    system: Some(s.to_string()),
                    code: c.to_string(),
                },
                None => Criterion::Token {
                    system: None,
                    code: v,
                },
            },
            Kind::Str if modifier == Modifier::Exact => Criterion::Text(v),
            Kind::Str => Criterion::Text(v.to_lowercase()),
            Kind::Date => parse_date(&v)?,
        };
        criteria.push(c);
    }
    if criteria.is_empty() {
        return Err(Fail::bad_request(format!("no usable value for '{name}'")));
    }
    Ok(Filter {
        def,
        modifier,
        criteria,
    })
}

/// All values at a dotted element path, flattening arrays at every step.
pub(crate) fn values_at<'a>(v: &'a Value, path: &str, out: &mut Vec<&'a Value>) {
    fn walk<'a>(v: &'a Value, segs: &[&str], out: &mut Vec<&'a Value>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| walk(x, segs, out)),
            _ => match segs.split_first() {
                None => out.push(v),
                Some((first, rest)) => {
                    if let Some(x) = v.get(*first) {
                        walk(x, rest, out);
                    }
                }
            },
        }
    }
    let segs: Vec<&str> = path.split('.').collect();
    walk(v, &segs, out);
}

fn elements<'a>(res: &'a Value, def: &ParamDef) -> Vec<&'a Value> {
    let mut out = Vec::new();
    for p in def.paths {
        values_at(res, p, &mut out);
    }
    out
}

/// Local references (`Type/id`) found at the parameter's paths, restricted
/// to its target type if it has one.
fn refs_at(res: &Value, def: &ParamDef, base: &str) -> Vec<String> {
    let target = match def.kind {
        Kind::Reference(t) => t,
        _ => None,
    };
    elements(res, def)
        .into_iter()
        .filter_map(|e| e.get("reference").and_then(Value::as_str))
        .filter_map(|r| local_ref(r, base))
        .filter(|r| target.is_none_or(|t| type_of(r) == t))
        .collect()
}

fn type_of(local: &str) -> &str {
    local.split_once('/').map_or(local, |(t, _)| t)
}

fn coding_matches(c: &Value, system: Option<&str>, code: &str) -> bool {
    let code_ok = code.is_empty() || c.get("code").and_then(Value::as_str) == Some(code);
    let sys = c.get("system").and_then(Value::as_str);
    let sys_ok = match system {
        None => true,
        Some("") => sys.is_none(),
        Some(s) => sys == Some(s),
    };
    code_ok && sys_ok
}

fn token_matches(e: &Value, system: Option<&str>, code: &str) -> bool {
    match e {
        Value::String(s) => !code.is_empty() && s == code,
        Value::Bool(b) => code == if *b { "true" } else { "false" },
        Value::Object(m) => {
            if let Some(codings) = m.get("coding") {
                // CodeableConcept
                match codings {
                    Value::Array(a) => a.iter().any(|c| coding_matches(c, system, code)),
                    _ => coding_matches(codings, system, code),
                }
            } else if m.contains_key("code") {
                coding_matches(e, system, code)
            } else if let Some(v) = m.get("value").and_then(Value::as_str) {
                // Identifier
                let sys = m.get("system").and_then(Value::as_str);
                let sys_ok = match system {
                    None => true,
                    Some("") => sys.is_none(),
                    Some(s) => sys == Some(s),
                };
                sys_ok && (code.is_empty() || v == code)
            } else {
                false
            }
        }
        _ => false,
    }
}

/// Display texts of a code element (for `:text`), lower-cased.
fn code_texts(e: &Value, out: &mut Vec<String>) {
    if let Some(t) = e.get("text").and_then(Value::as_str) {
        out.push(t.to_lowercase());
    }
    if let Some(d) = e.get("display").and_then(Value::as_str) {
        out.push(d.to_lowercase());
    }
    if let Some(Value::Array(cs)) = e.get("coding") {
        for c in cs {
            if let Some(d) = c.get("display").and_then(Value::as_str) {
                out.push(d.to_lowercase());
            }
        }
    }
}

/// Strings searched by string parameters: the string itself, or the parts
/// of a HumanName/Address (plus "given family" as one string).
fn string_values(e: &Value, out: &mut Vec<String>) {
    match e {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| string_values(x, out)),
        Value::Object(m) => {
            for k in [
                "text",
                "family",
                "given",
                "prefix",
                "suffix",
                "line",
                "city",
                "state",
                "postalCode",
                "country",
            ] {
                if let Some(x) = m.get(k) {
                    string_values(x, out);
                }
            }
            if let Some(family) = m.get("family").and_then(Value::as_str) {
                let mut full: Vec<&str> = Vec::new();
                if let Some(Value::Array(g)) = m.get("given") {
                    full.extend(g.iter().filter_map(Value::as_str));
                }
                full.push(family);
                out.push(full.join(" "));
            }
        }
        _ => {}
    }
}

fn date_matches(e: &Value, op: DateOp, v: &str) -> bool {
    let s = match e {
        Value::String(s) => s.as_str(),
        Value::Object(m) => match m.get("start").and_then(Value::as_str) {
            Some(s) => s,
            None => return false,
        },
        _ => return false,
    };
    let n = s.len().min(v.len());
    let head = s.get(..n).unwrap_or(s);
    let eq = s.starts_with(v) || v.starts_with(s);
    match op {
        DateOp::Eq => eq,
        DateOp::Ne => !eq,
        DateOp::Lt => head < v && !eq,
        DateOp::Le => head <= v || eq,
        DateOp::Gt => head > v && !eq,
        DateOp::Ge => head >= v || eq,
    }
}

fn ref_matches(r: &str, q: &RefQuery, target: Option<&str>, base: &str) -> bool {
    let local = local_ref(r, base);
    let target_ok = |l: &str| target.is_none_or(|t| type_of(l) == t);
    match q {
        RefQuery::Bare(id) => {
            local.is_some_and(|l| target_ok(&l) && l.split_once('/').is_some_and(|(_, i)| i == id))
        }
        RefQuery::Local(want) => local.is_some_and(|l| &l == want && target_ok(&l)),
        RefQuery::Absolute(a) => r == a,
    }
}

impl Filter {
    fn matches(&self, id: &str, res: &Value, base: &str) -> bool {
        if let [Criterion::Missing(missing)] = self.criteria.as_slice() {
            let present = self.def.kind == Kind::Id || !elements(res, &self.def).is_empty();
            return present != *missing;
        }
        let els = elements(res, &self.def);
        let any = self.criteria.iter().any(|c| match c {
            Criterion::Missing(_) => false,
            Criterion::Id(want) => id == want,
            Criterion::Ref(q) => {
                let target = match self.def.kind {
                    Kind::Reference(t) => t,
                    _ => None,
                };
                els.iter()
                    .filter_map(|e| e.get("reference").and_then(Value::as_str))
                    .any(|r| ref_matches(r, q, target, base))
            }
            Criterion::Token { system, code } => els
                .iter()
                .any(|e| token_matches(e, system.as_deref(), code)),
            Criterion::Text(text) if self.def.kind == Kind::Token => {
                let mut texts = Vec::new();
                els.iter().for_each(|e| code_texts(e, &mut texts));
                texts.iter().any(|t| t.contains(text.as_str()))
            }
            Criterion::Text(text) => {
                let mut strs = Vec::new();
                els.iter().for_each(|e| string_values(e, &mut strs));
                strs.iter().any(|s| match self.modifier {
                    Modifier::Exact => s == text,
                    Modifier::Contains => s.to_lowercase().contains(text.as_str()),
                    _ => s.to_lowercase().starts_with(text.as_str()),
                })
            }
            Criterion::Date(op, v) => els.iter().any(|e| date_matches(e, *op, v)),
        });
        if self.modifier == Modifier::Not {
            !any
        } else {
            any
        }
    }
}

/// Adds `_include`d and `_revinclude`d resources for a page of matches.
fn includes(store: &Store, base: &str, spec: &Spec, page: &[Hit]) -> Vec<Hit> {
    let mut seen: HashSet<String> = page.iter().map(|h| format!("{}/{}", h.t, h.id)).collect();
    let page_keys = seen.clone();
    let mut out = Vec::new();
    for inc in &spec.includes {
        for hit in page
            .iter()
            .filter(|h| inc.source == "*" || inc.source == h.t)
        {
            let refs: Vec<String> = match &inc.def {
                Some(def) => refs_at(&hit.res, def, base),
                None => store
                    .record(&hit.t, &hit.id)
                    .map(|r| r.refs.to_vec())
                    .unwrap_or_default(),
            };
            for r in refs {
                if inc.target.as_deref().is_some_and(|t| type_of(&r) != t) || seen.contains(&r) {
                    continue;
                }
                if let (Some(res), Some((t, id))) = (store.resolve(&r), r.split_once('/')) {
                    out.push(Hit {
                        t: t.to_string(),
                        id: id.to_string(),
                        res: Arc::clone(res),
                    });
                    seen.insert(r);
                }
            }
        }
    }
    for rev in &spec.revincludes {
        for (id, rec, res) in store.live_of_type(&rev.source) {
            let key = format!("{}/{}", rev.source, id);
            if seen.contains(&key) {
                continue;
            }
            let refs: Vec<String> = match &rev.def {
                Some(def) => refs_at(res, def, base),
                None => rec.refs.to_vec(),
            };
            let hit = refs.iter().any(|r| {
                page_keys.contains(r) && rev.target.as_deref().is_none_or(|t| type_of(r) == t)
            });
            if hit {
                out.push(Hit {
                    t: rev.source.clone(),
                    id: id.to_string(),
                    res: Arc::clone(res),
                });
                seen.insert(key);
            }
        }
    }
    out
}

/// Paging state and link data for a searchset.
pub(crate) struct Paging<'a> {
    pub base: &'a str,
    /// Absolute URL the links are built on (no query).
    pub link_path: String,
    pub echo: &'a [(String, String)],
    pub count: usize,
    pub offset: usize,
    pub total: usize,
}

/// Builds a `searchset` Bundle.
pub(crate) fn searchset(p: &Paging<'_>, matches: &[Hit], included: &[Hit]) -> Value {
    let link = |relation: &str, offset: usize| {
        let mut q: Vec<(String, String)> = p.echo.to_vec();
        q.push(("_count".into(), p.count.to_string()));
        if offset > 0 {
            q.push(("_offset".into(), offset.to_string()));
        }
        json!({"relation": relation, "url": format!("{}?{}", p.link_path, build_query(&q))})
    };
    let mut links = vec![link("self", p.offset), link("first", 0)];
    if p.count > 0 && p.offset > 0 {
        links.push(link("previous", p.offset.saturating_sub(p.count)));
    }
    if p.count > 0 && p.offset.saturating_add(p.count) < p.total {
        links.push(link("next", p.offset + p.count));
    }
    if p.count > 0 && p.total > 0 {
        links.push(link("last", (p.total - 1) / p.count * p.count));
    }
    let entry = |h: &Hit, mode: &str| {
        json!({
            "fullUrl": format!("{}/{}/{}", p.base, h.t, h.id),
            "resource": h.res.as_ref(),
            "search": {"mode": mode},
        })
    };
    let entries: Vec<Value> = matches
        .iter()
        .map(|h| entry(h, "match"))
        .chain(included.iter().map(|h| entry(h, "include")))
        .collect();
    let mut b = Map::new();
    b.insert("resourceType".into(), "Bundle".into());
    b.insert(
        "meta".into(),
        json!({"lastUpdated": crate::types::now_instant()}),
    );
    b.insert("type".into(), "searchset".into());
    b.insert("total".into(), p.total.into());
    b.insert("link".into(), Value::Array(links));
    if !entries.is_empty() {
        b.insert("entry".into(), Value::Array(entries));
    }
    Value::Object(b)
}

/// The page `offset..offset+count` of `all`.
fn page<T>(all: Vec<T>, offset: usize, count: usize) -> Vec<T> {
    all.into_iter().skip(offset).take(count).collect()
}

/// Searches type `t`. With `compartment = Some((patient_id, paths))` only
/// resources referencing `Patient/patient_id` through `paths` are
/// considered, and links are built on `{base}/Patient/{id}/{t}`.
pub(crate) fn search(
    store: &Store,
    base: &str,
    t: &str,
    params: &[(String, String)],
    compartment: Option<(&str, &'static [&'static str])>,
) -> Result<Value, Fail> {
    let spec = Spec::parse(t, params, base)?;
    let compartment_filter = compartment.map(|(pid, paths)| Filter {
        def: ParamDef {
            kind: Kind::Reference(Some("Patient")),
            paths,
        },
        modifier: Modifier::None,
        criteria: vec![Criterion::Ref(RefQuery::Local(format!("Patient/{pid}")))],
    });
    let all: Vec<Hit> = store
        .live_of_type(t)
        .filter(|(id, _, res)| {
            compartment_filter
                .as_ref()
                .is_none_or(|f| f.matches(id, res, base))
                && spec.matches(id, res, base)
        })
        .map(|(id, _, res)| Hit {
            t: t.to_string(),
            id: id.to_string(),
            res: Arc::clone(res),
        })
        .collect();
    let total = all.len();
    let count = if spec.summary_count { 0 } else { spec.count };
    let matches = page(all, spec.offset, count);
    let included = includes(store, base, &spec, &matches);
    let link_path = match compartment {
        Some((pid, _)) => format!("{base}/Patient/{pid}/{t}"),
        None => format!("{base}/{t}"),
    };
    Ok(searchset(
        &Paging {
            base,
            link_path,
            echo: &spec.echo,
            count,
            offset: spec.offset,
            total,
        },
        &matches,
        &included,
    ))
}

/// `Patient/{pid}/$everything`: the patient first, then every live resource
/// that references it, by type then id. Parameters: `_count`, `_offset`,
/// `_type` (comma list); `_since`, `start`, `end` are accepted and ignored.
pub(crate) fn everything(
    store: &Store,
    base: &str,
    pid: &str,
    params: &[(String, String)],
) -> Result<Value, Fail> {
    let mut count = DEFAULT_COUNT;
    let mut offset = 0;
    let mut types: Option<Vec<String>> = None;
    let mut echo = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "_count" => {
                count = parse_usize(k, v)?.min(MAX_COUNT);
                continue;
            }
            "_offset" => {
                offset = parse_usize(k, v)?;
                continue;
            }
            "_type" => {
                let list: Vec<String> = v.split(',').map(|s| s.trim().to_string()).collect();
                if list.iter().any(|t| !looks_like_type(t)) {
                    return Err(Fail::bad_request(format!("invalid _type value '{v}'")));
                }
                types.get_or_insert_with(Vec::new).extend(list);
            }
            "_since" | "start" | "end" => {}
            n if IGNORED.contains(&n) || n == "_summary" => {}
            _ => {
                return Err(Fail::bad_request(format!(
                    "unknown parameter '{k}' for $everything"
                )))
            }
        }
        echo.push((k.clone(), v.clone()));
    }
    if !valid_id(pid) {
        return Err(Fail::bad_request(format!("invalid id '{pid}'")));
    }
    let Some(record) = store.record("Patient", pid) else {
        return Err(Fail::not_found(format!("Patient/{pid} is not known")));
    };
    let Some(patient) = record.current() else {
        return Err(Fail::gone(format!("Patient/{pid} has been deleted")));
    };
    let key = format!("Patient/{pid}");
    let wanted = |t: &str| types.as_ref().is_none_or(|ts| ts.iter().any(|x| x == t));
    let mut all = Vec::new();
    if wanted("Patient") {
        all.push(Hit {
            t: "Patient".into(),
            id: pid.to_string(),
            res: Arc::clone(patient),
        });
    }
    for (t, id, rec, res) in store.live_all() {
        if wanted(t) && !(t == "Patient" && id == pid) && rec.refs.binary_search(&key).is_ok() {
            all.push(Hit {
                t: t.to_string(),
                id: id.to_string(),
                res: Arc::clone(res),
            });
        }
    }
    let total = all.len();
    let matches = page(all, offset, count);
    Ok(searchset(
        &Paging {
            base,
            link_path: format!("{base}/Patient/{pid}/$everything"),
            echo: &echo,
            count,
            offset,
            total,
        },
        &matches,
        &[],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn search_dates_follow_the_fhir_grammar() {
        for ok in [
            "2020",
            "2020-01",
            "2020-01-31",
            "2020-01-31T10:00",
            "2020-01-31T10:00:05",
            "2020-01-31T10:00:05.123Z",
            "2020-01-31T10:00+01:00",
        ] {
            assert!(is_search_date(ok), "{ok}");
            assert!(parse_date(&format!("ge{ok}")).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "202",
            "1234Z",
            "2020-1",
            "2020-01-",
            "2020T10:00",
            "2020-01-31T10",
            "2020-01-31T10:00:05.",
            "2020-01-31T10:00+0100",
            "20200131",
            "2020-01-31Z",
            "ap2020",
        ] {
            assert!(!is_search_date(bad), "{bad}");
            assert!(parse_date(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn escaped_split() {
        assert_eq!(split_escaped("a,b\\,c,", ','), ["a", "b,c", ""]);
    }

    #[test]
    fn tokens() {
        let cc =
            json!({"coding": [{"system": "http://loinc.org", "code": "1"}], "text": "Body Height"});
        assert!(token_matches(&cc, None, "1"));
        assert!(token_matches(&cc, Some("http://loinc.org"), "1"));
        assert!(token_matches(&cc, Some("http://loinc.org"), ""));
        assert!(!token_matches(&cc, Some(""), "1"));
        assert!(!token_matches(&cc, Some("x"), "1"));
        assert!(token_matches(&json!("male"), None, "male"));
        let ident = json!({"system": "s", "value": "v"});
        assert!(token_matches(&ident, Some("s"), "v"));
        assert!(!token_matches(&ident, Some("t"), "v"));
    }

    #[test]
    fn dates() {
        let d = json!("1984-07-02");
        assert!(date_matches(&d, DateOp::Eq, "1984"));
        assert!(date_matches(&d, DateOp::Eq, "1984-07-02"));
        assert!(!date_matches(&d, DateOp::Eq, "1984-07-03"));
        assert!(date_matches(&d, DateOp::Lt, "1985"));
        assert!(!date_matches(&d, DateOp::Lt, "1984"));
        assert!(date_matches(&d, DateOp::Ge, "1984"));
        assert!(date_matches(&d, DateOp::Gt, "1983-12-31"));
    }

    #[test]
    fn paths() {
        let r = json!({"a": [{"b": {"reference": "X/1"}}, {"b": [{"reference": "X/2"}]}]});
        let mut out = Vec::new();
        values_at(&r, "a.b", &mut out);
        assert_eq!(out.len(), 2);
    }
}
