//! Loading a config for lint: `${ENV}` references that are not set become a placeholder (lint
//! runs in CI, without the secrets), and whatever was substituted never appears in a finding.

use super::Positions;

/// The value of an unset variable (or an unreadable secret file) for lint: long enough for the
/// checks on key lengths, and plainly not a secret.
pub const PLACEHOLDER: &str = "caregate-lint-placeholder-not-a-secret-000000";

/// Config text with its references replaced, in the escaped form `config::substitute_env`
/// reads back unchanged.
pub struct Substituted {
    pub text: String,
    /// References that got the placeholder (`CAREGATE_AUDIT_KEY`, `file:/run/secrets/x`).
    pub placeholders: Vec<String>,
    /// (reference, value) of every reference that was substituted with a real value.
    secrets: Vec<(String, String)>,
}

impl Substituted {
    /// `msg` with every substituted value replaced by its reference.
    pub fn redact(&self, msg: &str) -> String {
        let mut out = msg.to_string();
        for (name, value) in &self.secrets {
            if value.len() >= 3 && out.contains(value.as_str()) {
                out = out.replace(value.as_str(), &format!("${{{name}}}"));
            }
        }
        out
    }
}

/// Replace `${NAME}` by `lookup(NAME)`, or by [`PLACEHOLDER`] when it is not set, and
/// `${file:/path}` by a placeholder when the file cannot be read (a readable one is left for
/// the loader). Each value has its `${` written `$${`, so that the loader's own substitution
/// gives it back as it is. Malformed references are left for the loader to report.
pub fn substitute_with(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Substituted {
    let mut out = String::with_capacity(text.len());
    let mut placeholders: Vec<String> = Vec::new();
    let mut secrets: Vec<(String, String)> = Vec::new();
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("$${");
            rest = tail;
            continue;
        }
        let Some(body) = after.strip_prefix("${") else {
            out.push('$');
            rest = &after[1..];
            continue;
        };
        let Some(end) = body.find('}') else {
            // Unterminated: the loader says where.
            out.push_str(after);
            rest = "";
            break;
        };
        let name = &body[..end];
        let whole = &after[..end + 3];
        if let Some(path) = name.strip_prefix("file:") {
            match std::fs::read_to_string(path) {
                Ok(v) => {
                    let v = v.trim_end_matches(['\n', '\r']).to_string();
                    secrets.push((name.to_string(), v));
                    out.push_str(whole);
                }
                Err(_) => {
                    if !placeholders.iter().any(|p| p == name) {
                        placeholders.push(name.to_string());
                    }
                    out.push_str(PLACEHOLDER);
                }
            }
        } else {
            let valid = !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !name.as_bytes()[0].is_ascii_digit();
            if !valid {
                out.push_str(whole);
            } else {
                match lookup(name) {
                    Some(v) => {
                        out.push_str(&v.replace("${", "$${"));
                        secrets.push((name.to_string(), v));
                    }
                    None => {
                        if !placeholders.iter().any(|p| p == name) {
                            placeholders.push(name.to_string());
                        }
                        out.push_str(PLACEHOLDER);
                    }
                }
            }
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    // Longest first, so a value inside another is not redacted half-way.
    secrets.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
    Substituted {
        text: out,
        placeholders,
        secrets,
    }
}

/// Where a load error points: its config place (`routes[3].filters[1]`, with the route index of
/// the file, not of the expanded route list) and the (line, column) of that place, or the line
/// and column the YAML parser named.
pub fn place_of_error(msg: &str, text: &str, positions: &Positions) -> (String, (usize, usize)) {
    let place = leading_place(msg, text);
    if let Some(at) = yaml_position(msg) {
        return (place, at);
    }
    if let Some(line) = msg
        .strip_prefix("line ")
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.trim().parse::<usize>().ok())
    {
        return (place, (line, 1));
    }
    if place.is_empty() {
        (place, (1, 1))
    } else {
        let at = positions.get(&place);
        (place, at)
    }
}

/// `... at line 12 column 5` (serde_yaml's form).
fn yaml_position(msg: &str) -> Option<(usize, usize)> {
    let i = msg.rfind(" at line ")?;
    let mut words = msg[i + " at line ".len()..].split_whitespace();
    let line = words.next()?.trim_end_matches(',').parse().ok()?;
    let column = match (words.next(), words.next()) {
        (Some("column"), Some(c)) => c
            .trim_end_matches(|ch: char| !ch.is_ascii_digit())
            .parse()
            .unwrap_or(1),
        _ => 1,
    };
    Some((line, column))
}

/// The config path a validation message starts with (`routes[5] (patient-fhir@v1).filters[2]
/// (jwt_auth): ...` -> `routes[1].filters[2]`), with a route named by its written index.
fn leading_place(msg: &str, text: &str) -> String {
    let head = msg.split(": ").next().unwrap_or("");
    let mut place = String::new();
    let mut route_name: Option<String> = None;
    let mut rest = head;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix(" (") {
            let Some(end) = r.find(')') else { break };
            if route_name.is_none() && place.starts_with("routes[") && !place.contains('.') {
                route_name = Some(r[..end].to_string());
            }
            rest = &r[end + 1..];
            continue;
        }
        let c = rest.chars().next().unwrap_or(' ');
        if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']') {
            place.push(c);
            rest = &rest[c.len_utf8()..];
        } else {
            return String::new();
        }
    }
    let looks_like_place = place.split('.').next().is_some_and(|first| {
        first.chars().all(|c| {
            c.is_ascii_lowercase() || c == '_' || c == '[' || c == ']' || c.is_ascii_digit()
        })
    }) && (place.contains('[') || place.contains('.'));
    if !looks_like_place {
        return String::new();
    }
    // The route index of the file for an expanded route.
    if let (Some(name), Some(rest)) = (route_name, place.strip_prefix("routes[")) {
        let template = name.split('@').next().unwrap_or(&name);
        if let Some(i) = written_route_index(text, template) {
            let tail = rest.split_once(']').map(|(_, t)| t).unwrap_or("");
            return format!("routes[{i}]{tail}");
        }
    }
    place
}

/// The index in the file's `routes:` of the route named `name`.
pub fn written_route_index(text: &str, name: &str) -> Option<usize> {
    written_names(text, "routes", "name")
        .iter()
        .position(|n| n == name)
}

/// The `field` of every item of the top-level list `list`, as written (empty string for an
/// item without it).
pub fn written_names(text: &str, list: &str, field: &str) -> Vec<String> {
    let Ok(v) = serde_yaml::from_str::<serde_yaml::Value>(text) else {
        return Vec::new();
    };
    v.get(list)
        .and_then(|l| l.as_sequence())
        .map(|items| {
            items
                .iter()
                .map(|i| {
                    i.get(field)
                        .and_then(|n| n.as_str())
                        .unwrap_or("")
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_variables_get_the_placeholder_and_values_round_trip() {
        let lookup = |n: &str| match n {
            "SET" => Some("s3cr${et}-value".to_string()),
            _ => None,
        };
        let s = substitute_with(
            "a: \"${SET}\"\nb: \"${UNSET}\"\nc: \"$${LITERAL}\"\nd: \"${UNSET}\"\ne: \"${1bad}\"\n",
            &lookup,
        );
        assert_eq!(s.placeholders, vec!["UNSET".to_string()]);
        // What the loader's substitution makes of it: the value, the placeholder, the literal.
        let back = crate::config::substitute_env(&s.text, |_| None);
        assert!(
            back.is_err(),
            "the malformed reference is left for the loader"
        );
        let s = substitute_with(
            "a: \"${SET}\"\nb: \"${UNSET}\"\nc: \"$${LITERAL}\"\n",
            &lookup,
        );
        let back = crate::config::substitute_env(&s.text, |_| None).unwrap_or_default();
        assert_eq!(
            back,
            format!("a: \"s3cr${{et}}-value\"\nb: \"{PLACEHOLDER}\"\nc: \"${{LITERAL}}\"\n")
        );
        assert_eq!(
            s.redact("bad value `s3cr${et}-value` here"),
            "bad value `${SET}` here"
        );
    }

    #[test]
    fn error_places_are_read_from_messages() {
        let text = "routes:\n  - name: a\n  - name: b\n";
        let p = Positions::parse(text);
        assert_eq!(
            place_of_error("routes[4] (b@v2).filters[1] (cors): config: bad", text, &p),
            ("routes[1].filters[1]".to_string(), (3, 5))
        );
        assert_eq!(
            place_of_error("routes[0] (a).pool: no pool named `x`", text, &p),
            ("routes[0].pool".to_string(), (2, 5))
        );
        assert_eq!(
            place_of_error(
                "routes[1].x: unknown field `y` at line 3 column 7",
                text,
                &p
            )
            .1,
            (3, 7)
        );
        assert_eq!(
            place_of_error("line 2: environment variable X is not set", text, &p),
            (String::new(), (2, 1))
        );
        assert_eq!(
            place_of_error("listeners: at least one listener is required", text, &p).0,
            ""
        );
    }
}
