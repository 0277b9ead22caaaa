//! Routes that admit patient-context tokens without confining them to the patient.
//!
//! A token carries a patient context only when its issuer maps a patient claim
//! (`auth.issuers[].claims.patient`). There is no default claim name: an issuer without
//! `claims.patient` never carries a patient context. A route **admits** a patient context when its
//! chain (the listener's filters, then the route's, in the order they run) has a `jwt_auth` that
//! accepts bearer tokens from such an issuer: the issuers in its `issuers` list, or every
//! configured issuer when the list is absent. (`jwt_auth` itself trusts no issuer for an explicitly
//! empty list. This check counts an empty list as "every issuer", so it errs on the safe side.)
//!
//! Such a route is **confined** only when `smart_scopes` and `patient_compartment` both come after
//! that `jwt_auth` (before it, they see no caller), each in a mode other than `off`. Without both,
//! a patient's token reaches other patients' records: `smart_scopes` checks the token's scopes
//! but not whose data the request touches, and `patient_compartment` checks whose data it touches.
//!
//! The check works on the raw config (each filter's `kind` and `config` YAML), so it builds no
//! filter. A filter config it cannot read counts against the route: for `jwt_auth`, it admits every
//! patient-context issuer; for a confining filter, it does not confine.

use crate::config::{Config, RouteConfig};
use caregate_filters::builtin::jwt_auth::{JwtAuthConfig, SourceMode};
use caregate_filters::{FilterSpec, Mode};
use serde_yaml::Value;

/// The filters that must follow a `jwt_auth` admitting a patient context, in their usual order.
pub const CONFINING: [&str; 2] = ["smart_scopes", "patient_compartment"];

/// A route that admits patient-context tokens and is not confined to the patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnconfinedRoute {
    /// The route's name.
    pub route: String,
    /// The patient-context issuers (names from `auth.issuers`) that the route admits.
    pub issuers: Vec<String>,
    /// What is missing, one entry per confining filter that does not confine.
    pub missing: Vec<String>,
}

impl std::fmt::Display for UnconfinedRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "route `{}` admits patient-context tokens (issuers: {}) but is not confined to the \
             patient: {}",
            self.route,
            self.issuers.join(", "),
            self.missing.join("; ")
        )
    }
}

/// Every route whose chain admits a patient-context issuer without both `smart_scopes` and
/// `patient_compartment` (in a mode other than `off`) after the `jwt_auth` that admits it.
/// Routes come in config order; an empty result means every such route is confined.
pub fn unconfined_patient_routes(cfg: &Config) -> Vec<UnconfinedRoute> {
    let patient_issuers: Vec<&str> = cfg
        .auth
        .issuers
        .iter()
        .filter(|i| i.claims.patient.is_some())
        .map(|i| i.name.as_str())
        .collect();
    if patient_issuers.is_empty() {
        return Vec::new();
    }
    cfg.routes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| judge_route(cfg, i, r, &patient_issuers))
        .collect()
}

/// One filter of a chain and where it was configured.
struct Link<'a> {
    place: String,
    spec: &'a FilterSpec,
}

/// The route's chain as it runs: its listener's filters first, then its own.
fn chain<'a>(cfg: &'a Config, ri: usize, r: &'a RouteConfig) -> Vec<Link<'a>> {
    let mut out = Vec::new();
    if let Some((li, l)) = cfg
        .listeners
        .iter()
        .enumerate()
        .find(|(_, l)| l.name == r.listener)
    {
        out.extend(l.filters.iter().enumerate().map(|(f, spec)| Link {
            place: format!("listeners[{li}].filters[{f}]"),
            spec,
        }));
    }
    out.extend(r.filters.iter().enumerate().map(|(f, spec)| Link {
        place: format!("routes[{ri}].filters[{f}]"),
        spec,
    }));
    out
}

fn judge_route(
    cfg: &Config,
    ri: usize,
    r: &RouteConfig,
    patient_issuers: &[&str],
) -> Option<UnconfinedRoute> {
    let chain = chain(cfg, ri, r);
    let mut issuers: Vec<String> = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    for (n, link) in chain.iter().enumerate() {
        if link.spec.kind != "jwt_auth" {
            continue;
        }
        let admitted = admitted_patient_issuers(link.spec, patient_issuers);
        if admitted.is_empty() {
            continue;
        }
        let gaps: Vec<String> = CONFINING
            .iter()
            .filter_map(|kind| gap(&chain, n, kind))
            .collect();
        if gaps.is_empty() {
            continue;
        }
        for i in admitted {
            if !issuers.contains(&i) {
                issuers.push(i);
            }
        }
        for g in gaps {
            if !missing.contains(&g) {
                missing.push(g);
            }
        }
    }
    if missing.is_empty() {
        None
    } else {
        Some(UnconfinedRoute {
            route: r.name.clone(),
            issuers,
            missing,
        })
    }
}

/// The patient-context issuers a `jwt_auth` accepts tokens from.
fn admitted_patient_issuers(spec: &FilterSpec, patient_issuers: &[&str]) -> Vec<String> {
    let all = || patient_issuers.iter().map(|s| s.to_string()).collect();
    let config = spec
        .config
        .clone()
        .unwrap_or(Value::Mapping(Default::default()));
    let Ok(c) = serde_yaml::from_value::<JwtAuthConfig>(config) else {
        // Unreadable: assume the widest reading.
        return all();
    };
    if c.bearer == SourceMode::Off {
        // Certificates only: a certificate-mapped caller never has a patient context.
        return Vec::new();
    }
    match c.issuers {
        Some(names) if !names.is_empty() => patient_issuers
            .iter()
            .filter(|p| names.iter().any(|n| n == *p))
            .map(|s| s.to_string())
            .collect(),
        _ => all(),
    }
}

/// The filter's `mode` (default `enforce`), or `None` when it cannot be read.
fn mode_of(spec: &FilterSpec) -> Option<Mode> {
    match &spec.config {
        None | Some(Value::Null) => Some(Mode::default()),
        Some(Value::Mapping(m)) => match m.get("mode") {
            None => Some(Mode::default()),
            Some(v) => serde_yaml::from_value::<Mode>(v.clone()).ok(),
        },
        Some(_) => None,
    }
}

/// Why `kind` does not confine what the `jwt_auth` at `at` admits, or `None` when it does.
fn gap(chain: &[Link<'_>], at: usize, kind: &str) -> Option<String> {
    let after: Vec<&Link<'_>> = chain[at + 1..]
        .iter()
        .filter(|l| l.spec.kind == kind)
        .collect();
    if after
        .iter()
        .any(|l| matches!(mode_of(l.spec), Some(m) if m != Mode::Off))
    {
        return None;
    }
    let jwt = &chain[at].place;
    if let Some(l) = after.iter().find(|l| mode_of(l.spec).is_none()) {
        return Some(format!(
            "`{kind}` ({}) has a config whose mode cannot be read",
            l.place
        ));
    }
    if let Some(l) = after.first() {
        return Some(format!("`{kind}` ({}) is in mode off", l.place));
    }
    if let Some(l) = chain[..at].iter().find(|l| l.spec.kind == kind) {
        return Some(format!(
            "`{kind}` ({}) runs before `jwt_auth` ({jwt}), where there is no caller yet",
            l.place
        ));
    }
    Some(format!("no `{kind}` after `jwt_auth` ({jwt})"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PATIENT_JWT: &str = "{ kind: jwt_auth, config: { issuers: [patients-idp] } }";
    const STAFF_JWT: &str = "{ kind: jwt_auth, config: { issuers: [staff-idp] } }";
    const SCOPES: &str = "{ kind: smart_scopes }";
    const COMPARTMENT: &str = "{ kind: patient_compartment }";

    /// A config with a patient-context issuer and a staff issuer, one listener with
    /// `listener_filters` and one route `r` with `route_filters`.
    fn config_with(listener_filters: &[&str], route_filters: &[&str]) -> Config {
        let text = format!(
            r#"
listeners:
  - {{ name: public, channel: public, listen: "127.0.0.1:0", filters: [{}] }}
auth:
  issuers:
    - name: patients-idp
      issuer: https://patients.example.org
      jwks_url: https://patients.example.org/jwks
      algorithms: [RS256]
      audiences: [fhir]
      claims: {{ patient: patient }}
    - name: staff-idp
      issuer: https://staff.example.org
      jwks_url: https://staff.example.org/jwks
      algorithms: [RS256]
      audiences: [caregate]
pools:
  - {{ name: app, zones: [ {{ name: a, backends: [ {{ address: "127.0.0.1:9" }} ] }} ] }}
routes:
  - {{ name: r, listener: public, path_prefix: /fhir, fhir: true, pool: app, filters: [{}] }}
"#,
            listener_filters.join(", "),
            route_filters.join(", ")
        );
        crate::config::parse(&text).unwrap()
    }

    fn findings(listener_filters: &[&str], route_filters: &[&str]) -> Vec<UnconfinedRoute> {
        unconfined_patient_routes(&config_with(listener_filters, route_filters))
    }

    fn assert_unconfined(f: &[UnconfinedRoute], needle: &str) {
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].route, "r");
        let text = f[0].to_string();
        assert!(text.contains(needle), "`{needle}` not in: {text}");
    }

    #[test]
    fn a_confined_route_passes() {
        assert!(findings(&[], &[PATIENT_JWT, SCOPES, COMPARTMENT]).is_empty());
        // Other filters in between and both confining filters in any order after jwt_auth.
        assert!(findings(
            &[],
            &[
                "{ kind: cors, config: { allowed_origins: [\"https://a.example.org\"] } }",
                PATIENT_JWT,
                "{ kind: headers }",
                COMPARTMENT,
                "{ kind: smart_scopes, config: { mode: enforce } }",
            ]
        )
        .is_empty());
    }

    #[test]
    fn missing_either_filter_fails() {
        let f = findings(&[], &[PATIENT_JWT, SCOPES]);
        assert_unconfined(&f, "no `patient_compartment` after `jwt_auth`");
        assert_eq!(f[0].missing.len(), 1);
        assert_eq!(f[0].issuers, vec!["patients-idp".to_string()]);

        let f = findings(&[], &[PATIENT_JWT, COMPARTMENT]);
        assert_unconfined(&f, "no `smart_scopes` after `jwt_auth`");
        assert_eq!(f[0].missing.len(), 1);

        let f = findings(&[], &[PATIENT_JWT]);
        assert_unconfined(&f, "no `smart_scopes`");
        assert_unconfined(&f, "no `patient_compartment`");
        assert_eq!(f[0].missing.len(), 2);
        assert!(f[0]
            .to_string()
            .starts_with("route `r` admits patient-context tokens"));
    }

    #[test]
    fn filters_before_jwt_auth_fail() {
        let f = findings(&[], &[SCOPES, COMPARTMENT, PATIENT_JWT]);
        assert_unconfined(
            &f,
            "`smart_scopes` (routes[0].filters[0]) runs before `jwt_auth`",
        );
        assert_unconfined(
            &f,
            "`patient_compartment` (routes[0].filters[1]) runs before",
        );
        assert_eq!(f[0].missing.len(), 2);

        let f = findings(&[], &[SCOPES, PATIENT_JWT, COMPARTMENT]);
        assert_unconfined(
            &f,
            "`smart_scopes` (routes[0].filters[0]) runs before `jwt_auth`",
        );
        assert_eq!(f[0].missing.len(), 1);
    }

    #[test]
    fn mode_off_fails() {
        let off_scopes = "{ kind: smart_scopes, config: { mode: off } }";
        let off_compartment =
            "{ kind: patient_compartment, config: { mode: off, allow_xml: false } }";
        let f = findings(&[], &[PATIENT_JWT, off_scopes, COMPARTMENT]);
        assert_unconfined(&f, "`smart_scopes` (routes[0].filters[1]) is in mode off");
        let f = findings(&[], &[PATIENT_JWT, SCOPES, off_compartment]);
        assert_unconfined(
            &f,
            "`patient_compartment` (routes[0].filters[2]) is in mode off",
        );
        // A mode that cannot be read does not confine either.
        let f = findings(
            &[],
            &[
                PATIENT_JWT,
                "{ kind: smart_scopes, config: { mode: sometimes } }",
                COMPARTMENT,
            ],
        );
        assert_unconfined(&f, "mode cannot be read");
        // Shadow is not `off`: it counts (the brief of this check; shadow still records).
        assert!(findings(
            &[],
            &[
                PATIENT_JWT,
                "{ kind: smart_scopes, config: { mode: shadow } }",
                COMPARTMENT
            ]
        )
        .is_empty());
    }

    #[test]
    fn a_staff_only_issuer_route_passes() {
        assert!(findings(&[], &[STAFF_JWT]).is_empty());
        assert!(findings(
            &["{ kind: ip_allow, config: { allow: [10.0.0.0/8] } }"],
            &[STAFF_JWT]
        )
        .is_empty());
        // Certificates only: no token, so no patient context.
        assert!(findings(
            &[],
            &["{ kind: jwt_auth, config: { bearer: off, client_certificate: required } }"]
        )
        .is_empty());
        // No jwt_auth at all: no caller, no patient context (an unauthenticated route is
        // another rule's business).
        assert!(findings(&[], &["{ kind: headers }"]).is_empty());
    }

    #[test]
    fn every_issuer_by_default_includes_the_patient_issuer() {
        let f = findings(&[], &["{ kind: jwt_auth }"]);
        assert_unconfined(&f, "issuers: patients-idp");
        let f = findings(&[], &["{ kind: jwt_auth, config: { bearer: required } }"]);
        assert_unconfined(&f, "issuers: patients-idp");
        // An explicitly empty list is counted as every issuer (the safe side).
        let f = findings(&[], &["{ kind: jwt_auth, config: { issuers: [] } }"]);
        assert_unconfined(&f, "issuers: patients-idp");
        // Both issuers named: only the patient one is reported.
        let f = findings(
            &[],
            &["{ kind: jwt_auth, config: { issuers: [staff-idp, patients-idp] } }"],
        );
        assert_eq!(f[0].issuers, vec!["patients-idp".to_string()]);
        // A jwt_auth config that cannot be read admits every patient issuer.
        let f = findings(
            &[],
            &["{ kind: jwt_auth, config: { issuers: [patients-idp], colour: blue } }"],
        );
        assert_unconfined(&f, "issuers: patients-idp");
    }

    #[test]
    fn without_a_patient_claim_no_issuer_carries_a_patient_context() {
        let mut cfg = config_with(&[], &["{ kind: jwt_auth }"]);
        assert_eq!(unconfined_patient_routes(&cfg).len(), 1);
        for i in &mut cfg.auth.issuers {
            i.claims.patient = None;
        }
        assert!(unconfined_patient_routes(&cfg).is_empty());
    }

    #[test]
    fn listener_level_filters_count() {
        // jwt_auth on the listener, confinement on the route.
        assert!(findings(&[PATIENT_JWT], &[SCOPES, COMPARTMENT]).is_empty());
        // Everything on the listener.
        assert!(findings(&[PATIENT_JWT, SCOPES, COMPARTMENT], &[]).is_empty());
        // jwt_auth on the listener and nothing after it.
        let f = findings(&[PATIENT_JWT], &["{ kind: headers }"]);
        assert_unconfined(
            &f,
            "no `smart_scopes` after `jwt_auth` (listeners[0].filters[0])",
        );
        // Confinement on the listener runs before the route's jwt_auth.
        let f = findings(&[SCOPES, COMPARTMENT], &[PATIENT_JWT]);
        assert_unconfined(
            &f,
            "`smart_scopes` (listeners[0].filters[0]) runs before `jwt_auth`",
        );
        assert_unconfined(
            &f,
            "`patient_compartment` (listeners[0].filters[1]) runs before",
        );
        // A listener-level compartment in mode off.
        let f = findings(
            &[
                PATIENT_JWT,
                SCOPES,
                "{ kind: patient_compartment, config: { mode: off } }",
            ],
            &[],
        );
        assert_unconfined(
            &f,
            "`patient_compartment` (listeners[0].filters[2]) is in mode off",
        );
    }

    #[test]
    fn routes_are_reported_in_config_order_with_their_own_names() {
        let mut cfg = config_with(&[], &[PATIENT_JWT]);
        let mut second = cfg.routes[0].clone();
        second.name = "second".into();
        second.filters.clear();
        cfg.routes.push(second);
        let mut third = cfg.routes[0].clone();
        third.name = "third".into();
        cfg.routes.push(third);
        let names: Vec<String> = unconfined_patient_routes(&cfg)
            .into_iter()
            .map(|f| f.route)
            .collect();
        assert_eq!(names, vec!["r".to_string(), "third".to_string()]);
    }
}
