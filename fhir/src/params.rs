//! Search (and simple operation) parameters: `name[:modifier][.chain…]=value[,value…]`.

use crate::encoding::{percent_decode, split_alternatives, unescape};
use crate::error::ClassifyError;
use crate::resource_types::is_resource_type;

/// The R4 search modifiers (<http://hl7.org/fhir/R4/search.html#modifiers>) other than the
/// `:[type]` modifier of reference parameters, which is any R4 resource type.
pub const R4_MODIFIERS: [&str; 11] = [
    "above",
    "below",
    "contains",
    "exact",
    "identifier",
    "in",
    "missing",
    "not",
    "not-in",
    "of-type",
    "text",
];

/// Modifiers of `_include` / `_revinclude` (`iterate` in R4, `recurse` from STU3 still sent by
/// some clients).
pub const INCLUDE_MODIFIERS: [&str; 2] = ["iterate", "recurse"];

/// The most parameters one request may carry (URL and form body together); more is `bad_param`.
pub const MAX_PARAMS: usize = 1000;

/// One search parameter of a request (or of a SMART scope's query restriction).
///
/// Repeating a name (`date=ge2020&date=lt2021`) gives one `SearchParam` per occurrence (AND);
/// the `values` of one occurrence are its comma-separated alternatives (OR).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SearchParam {
    /// The parameter code (`code`, `_lastUpdated`, `subject`, `_has`), percent-decoded.
    pub name: String,
    /// The modifier after `:` on `name`: one of [`R4_MODIFIERS`], a resource type (`subject:Patient`),
    /// `iterate`/`recurse` on `_include`/`_revinclude`, or for `_has` the modifier of the final
    /// parameter (`_has:Observation:patient:code:text`).
    pub modifier: Option<String>,
    /// Chained parameters after `name`, in order, each as written (`param` or `param:modifier`):
    /// `subject:Patient.name` → name `subject`, modifier `Patient`, chain `["name"]`.
    ///
    /// For a reverse chain the name is `_has` and the chain is the `:`-separated segments after it
    /// without the final modifier: `_has:Observation:patient:code` → `["Observation", "patient",
    /// "code"]`; nested `_has:Observation:patient:_has:AuditEvent:entity:agent` →
    /// `["Observation", "patient", "_has", "AuditEvent", "entity", "agent"]`.
    pub chain: Vec<String>,
    /// The alternatives, percent-decoded and split at unescaped commas; `\,` is resolved to `,`
    /// while `\|`, `\$` and `\\` stay escaped (see [`crate::encoding::split_alternatives`]).
    /// `name=` gives no values.
    pub values: Vec<String>,
}

impl SearchParam {
    /// The types a reverse chain (`_has`) looks into, in order (`_has:Observation:patient:code` →
    /// `["Observation"]`). Empty for other parameters.
    pub fn has_types(&self) -> Vec<&str> {
        if self.name != "_has" {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.chain.len() {
            out.push(self.chain[i].as_str());
            // Type, reference param, then "_has" to go on or the final param.
            match self.chain.get(i + 2) {
                Some(s) if s == "_has" => i += 3,
                _ => break,
            }
        }
        out
    }

    /// The explicit types a forward chain passes through (`subject:Patient.organization:Organization.name`
    /// → `["Patient", "Organization"]`). Untyped links (`subject.name`) add nothing: their target type
    /// depends on the parameter's definition.
    pub fn chain_types(&self) -> Vec<&str> {
        if self.chain.is_empty() || self.name == "_has" {
            return Vec::new();
        }
        let mut out = Vec::new();
        if let Some(m) = self.modifier.as_deref() {
            if is_resource_type(m) {
                out.push(m);
            }
        }
        // The modifier of the last link filters values, it does not lead anywhere.
        let n = self.chain.len();
        for link in &self.chain[..n.saturating_sub(1)] {
            if let Some((_, m)) = link.split_once(':') {
                if is_resource_type(m) {
                    out.push(m);
                }
            }
        }
        out
    }
}

/// Parse a query string (`a=1&b=2`, without the `?`; a leading `?` is tolerated) or an
/// `application/x-www-form-urlencoded` body into parameters, appending them to `out`.
///
/// `+` is a space. Empty pieces (`a=1&&b=2`, a trailing `&`) are skipped; a piece without `=` is a
/// parameter without values.
pub fn parse_params_into(query: &str, out: &mut Vec<SearchParam>) -> Result<(), ClassifyError> {
    let query = query.strip_prefix('?').unwrap_or(query);
    for piece in query.split('&') {
        if piece.is_empty() {
            continue;
        }
        if out.len() >= MAX_PARAMS {
            return Err(ClassifyError::bad_param("too many parameters"));
        }
        let (raw_key, raw_value) = piece.split_once('=').unwrap_or((piece, ""));
        let key = percent_decode(raw_key, true)
            .map_err(|_| ClassifyError::bad_param("bad percent-encoding in a parameter name"))?;
        let value = percent_decode(raw_value, true)
            .map_err(|_| ClassifyError::bad_param("bad percent-encoding in a parameter value"))?;
        let mut param = parse_key(&key)?;
        param.values = split_alternatives(&value);
        check_special(&param)?;
        out.push(param);
    }
    Ok(())
}

/// Parse a query string into parameters; see [`parse_params_into`].
pub fn parse_params(query: &str) -> Result<Vec<SearchParam>, ClassifyError> {
    let mut out = Vec::new();
    parse_params_into(query, &mut out)?;
    Ok(out)
}

/// `[A-Za-z_][A-Za-z0-9_-]*`, at most 64 characters.
pub(crate) fn is_param_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

fn check_modifier(name: &str, modifier: &str) -> Result<(), ClassifyError> {
    if modifier.is_empty() {
        return Err(ClassifyError::bad_param("empty modifier"));
    }
    let ok = if name == "_include" || name == "_revinclude" {
        INCLUDE_MODIFIERS.contains(&modifier)
    } else {
        R4_MODIFIERS.contains(&modifier) || is_resource_type(modifier)
    };
    if ok {
        Ok(())
    } else {
        Err(ClassifyError::bad_param("unknown modifier"))
    }
}

/// `name` or `name:modifier`.
fn parse_link(link: &str) -> Result<(&str, Option<&str>), ClassifyError> {
    let (name, modifier) = match link.split_once(':') {
        Some((n, m)) => (n, Some(m)),
        None => (link, None),
    };
    if name.is_empty() {
        return Err(ClassifyError::bad_param("empty parameter name"));
    }
    if !is_param_name(name) {
        return Err(ClassifyError::bad_param("malformed parameter name"));
    }
    if let Some(m) = modifier {
        if m.contains(':') {
            return Err(ClassifyError::bad_param("more than one modifier"));
        }
        check_modifier(name, m)?;
    }
    Ok((name, modifier))
}

fn parse_key(key: &str) -> Result<SearchParam, ClassifyError> {
    if key.is_empty() {
        return Err(ClassifyError::bad_param("empty parameter name"));
    }
    if key == "_has" || key.starts_with("_has:") {
        return parse_has(key);
    }
    let mut links = key.split('.');
    let first = links.next().unwrap_or_default();
    let (name, modifier) = parse_link(first)?;
    let mut chain = Vec::new();
    for link in links {
        if link.is_empty() {
            return Err(ClassifyError::bad_param(
                "empty link in a chained parameter",
            ));
        }
        parse_link(link)?;
        chain.push(link.to_owned());
    }
    if !chain.is_empty() && name.starts_with('_') {
        return Err(ClassifyError::bad_param(
            "a result or control parameter cannot be chained",
        ));
    }
    Ok(SearchParam {
        name: name.to_owned(),
        modifier: modifier.map(str::to_owned),
        chain,
        values: Vec::new(),
    })
}

/// `_has:Type:refParam:(_has:Type:refParam:)*param[:modifier]`.
fn parse_has(key: &str) -> Result<SearchParam, ClassifyError> {
    const MALFORMED: ClassifyError = ClassifyError::bad_param("malformed _has parameter");
    let segs: Vec<&str> = key.split(':').skip(1).collect();
    let mut chain = Vec::new();
    let mut i = 0;
    loop {
        let ty = *segs.get(i).ok_or(MALFORMED)?;
        if ty.is_empty() {
            return Err(MALFORMED);
        }
        if !is_resource_type(ty) {
            return Err(ClassifyError::unknown_type("unknown resource type in _has"));
        }
        let reference = *segs.get(i + 1).ok_or(MALFORMED)?;
        if !is_param_name(reference) || reference == "_has" {
            return Err(MALFORMED);
        }
        chain.push(ty.to_owned());
        chain.push(reference.to_owned());
        let next = *segs.get(i + 2).ok_or(MALFORMED)?;
        if next == "_has" {
            chain.push(next.to_owned());
            i += 3;
            continue;
        }
        if !is_param_name(next) {
            return Err(MALFORMED);
        }
        chain.push(next.to_owned());
        let modifier = match segs.get(i + 3) {
            None => None,
            Some(m) => {
                if segs.len() > i + 4 {
                    return Err(MALFORMED);
                }
                check_modifier(next, m)?;
                Some((*m).to_owned())
            }
        };
        return Ok(SearchParam {
            name: "_has".to_owned(),
            modifier,
            chain,
            values: Vec::new(),
        });
    }
}

/// Values of `_type`, `_include` and `_revinclude` name resource types: check them.
fn check_special(p: &SearchParam) -> Result<(), ClassifyError> {
    match p.name.as_str() {
        "_type" => {
            for v in &p.values {
                let v = unescape(v);
                if v.is_empty() {
                    return Err(ClassifyError::bad_param("empty _type value"));
                }
                if !is_resource_type(&v) {
                    return Err(ClassifyError::unknown_type(
                        "unknown resource type in _type",
                    ));
                }
            }
        }
        "_include" | "_revinclude" => {
            for v in &p.values {
                check_include_value(&unescape(v))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `*`, `Type:*`, `Type:param` or `Type:param:TargetType`.
fn check_include_value(v: &str) -> Result<(), ClassifyError> {
    const MALFORMED: ClassifyError =
        ClassifyError::bad_param("malformed _include/_revinclude value");
    if v == "*" {
        return Ok(());
    }
    let mut parts = v.split(':');
    let ty = parts.next().unwrap_or_default();
    let param = parts.next().ok_or(MALFORMED)?;
    let target = parts.next();
    if parts.next().is_some() {
        return Err(MALFORMED);
    }
    if !is_resource_type(ty) {
        return Err(ClassifyError::unknown_type(
            "unknown resource type in _include/_revinclude",
        ));
    }
    if param != "*" && !is_param_name(param) {
        return Err(MALFORMED);
    }
    if let Some(t) = target {
        if param == "*" {
            return Err(MALFORMED);
        }
        if !is_resource_type(t) {
            return Err(ClassifyError::unknown_type(
                "unknown resource type in _include/_revinclude",
            ));
        }
    }
    Ok(())
}
