//! `rbac`: role-based access control for a route, over the verified [`Principal`] (written by
//! `jwt_auth`), the listener's channel and the request method.
//!
//! ```yaml
//! - kind: rbac
//!   config:
//!     mode: enforce          # enforce | shadow | off (default enforce)
//!     default: deny          # deny | allow: the effect when no rule matches (default deny)
//!     rules:                 # first matching rule wins
//!       - effect: deny       # patient-context tokens never reach this internal route
//!         patient_context: true
//!       - effect: allow
//!         roles: [clinician, nurse]          # any of
//!         scopes: [user/*.rs]                # any of, exact match on the principal's scopes
//!         client_ids: [ehr-app]              # any of
//!         channels: [internal]               # any of: public | internal
//!         methods: [GET, HEAD]               # any of
//!         auth_methods: [token, client_certificate, token+client_certificate]  # any of
//!         systems: [lab-interface-engine]    # the certificate's mapped system name, any of
//!       - effect: allow                      # health probes need no identity
//!         methods: [HEAD]
//! ```
//! A rule matches when every condition it states holds; a rule that states none matches every
//! request. Conditions on the caller (`roles`, `scopes`, `client_ids`, `auth_methods`,
//! `patient_context`, `systems`) never match a request without a principal; `channels` and
//! `methods` look only at the request.
//!
//! Without a principal, the request is refused (`role_denied`, "no authenticated caller")
//! unless the first matching rule is one without caller conditions, which then decides;
//! `default: allow` never admits an anonymous caller.
//!
//! Reason code: 403 `role_denied` (a deny rule, the default deny, or no authenticated caller).
//! Config errors name their place (`config.rules[2].auth_methods[0]`); an empty `rules` list or an
//! empty condition list (which could never match) is refused.

use crate::identity::{AuthMethod, Principal};
use crate::registry::{parse_config, BuildContext, BuildError};
use crate::{Channel, Decision, Filter, LocalReply, Mode, RequestCtx, RequestHeader, Result};
use async_trait::async_trait;
use http::StatusCode;
use serde::Deserialize;
use std::sync::Arc;

/// What a rule (or the default) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    #[default]
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbacConfig {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub default: Effect,
    pub rules: Vec<RuleConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub effect: Effect,
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    #[serde(default)]
    pub client_ids: Option<Vec<String>>,
    #[serde(default)]
    pub channels: Option<Vec<Channel>>,
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    #[serde(default)]
    pub auth_methods: Option<Vec<String>>,
    #[serde(default)]
    pub patient_context: Option<bool>,
    #[serde(default)]
    pub systems: Option<Vec<String>>,
}

/// One compiled rule. `None` = the condition is not stated.
#[derive(Debug)]
struct Rule {
    effect: Effect,
    roles: Option<Vec<String>>,
    scopes: Option<Vec<String>>,
    client_ids: Option<Vec<String>>,
    channels: Option<Vec<Channel>>,
    methods: Option<Vec<String>>,
    auth_methods: Option<Vec<AuthMethod>>,
    patient_context: Option<bool>,
    systems: Option<Vec<String>>,
}

impl Rule {
    /// Whether the rule states any condition about the caller.
    fn has_identity_conditions(&self) -> bool {
        self.roles.is_some()
            || self.scopes.is_some()
            || self.client_ids.is_some()
            || self.auth_methods.is_some()
            || self.patient_context.is_some()
            || self.systems.is_some()
    }

    fn matches(&self, principal: Option<&Principal>, ctx: &RequestCtx) -> bool {
        if let Some(channels) = &self.channels {
            if !channels.contains(&ctx.channel) {
                return false;
            }
        }
        if let Some(methods) = &self.methods {
            if !methods.iter().any(|m| m == &ctx.method) {
                return false;
            }
        }
        if !self.has_identity_conditions() {
            return true;
        }
        let Some(p) = principal else {
            return false;
        };
        if let Some(roles) = &self.roles {
            if !roles.iter().any(|r| p.has_role(r)) {
                return false;
            }
        }
        if let Some(scopes) = &self.scopes {
            if !scopes.iter().any(|s| p.scopes.iter().any(|have| have == s)) {
                return false;
            }
        }
        if let Some(ids) = &self.client_ids {
            match &p.client_id {
                Some(id) if ids.iter().any(|i| i == id) => {}
                _ => return false,
            }
        }
        if let Some(methods) = &self.auth_methods {
            if !methods.contains(&p.method) {
                return false;
            }
        }
        if let Some(want) = self.patient_context {
            if p.patient.is_some() != want {
                return false;
            }
        }
        if let Some(systems) = &self.systems {
            match &p.system {
                Some(s) if systems.iter().any(|n| n == &s.name) => {}
                _ => return false,
            }
        }
        true
    }
}

pub struct RbacFilter {
    mode: Mode,
    default: Effect,
    rules: Vec<Rule>,
}

fn parse_auth_method(s: &str) -> Option<AuthMethod> {
    [
        AuthMethod::Token,
        AuthMethod::ClientCertificate,
        AuthMethod::TokenAndClientCertificate,
    ]
    .into_iter()
    .find(|m| m.as_str() == s)
}

/// Check a stated "any of" list: not empty, no empty entries.
fn names(
    place: &str,
    list: Option<Vec<String>>,
) -> std::result::Result<Option<Vec<String>>, BuildError> {
    let Some(list) = list else {
        return Ok(None);
    };
    if list.is_empty() {
        return Err(BuildError::new(
            place,
            "an empty list never matches; omit the condition instead",
        ));
    }
    for (j, item) in list.iter().enumerate() {
        if item.trim().is_empty() {
            return Err(BuildError::new(
                format!("{place}[{j}]"),
                "must not be empty",
            ));
        }
    }
    Ok(Some(list))
}

fn compile_rule(i: usize, r: RuleConfig) -> std::result::Result<Rule, BuildError> {
    let at = |field: &str| format!("config.rules[{i}].{field}");
    let methods = match names(&at("methods"), r.methods)? {
        None => None,
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (j, m) in list.iter().enumerate() {
                let up = m.trim().to_ascii_uppercase();
                if http::Method::from_bytes(up.as_bytes()).is_err() {
                    return Err(BuildError::new(
                        format!("{}[{j}]", at("methods")),
                        format!("`{m}` is not an HTTP method"),
                    ));
                }
                out.push(up);
            }
            Some(out)
        }
    };
    let auth_methods = match names(&at("auth_methods"), r.auth_methods)? {
        None => None,
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (j, m) in list.iter().enumerate() {
                let parsed = parse_auth_method(m.trim()).ok_or_else(|| {
                    BuildError::new(
                        format!("{}[{j}]", at("auth_methods")),
                        format!(
                            "unknown auth method `{m}` (known: token, client_certificate, \
                             token+client_certificate)"
                        ),
                    )
                })?;
                out.push(parsed);
            }
            Some(out)
        }
    };
    let channels = match r.channels {
        Some(c) if c.is_empty() => {
            return Err(BuildError::new(
                at("channels"),
                "an empty list never matches; omit the condition instead",
            ))
        }
        other => other,
    };
    Ok(Rule {
        effect: r.effect,
        roles: names(&at("roles"), r.roles)?,
        scopes: names(&at("scopes"), r.scopes)?,
        client_ids: names(&at("client_ids"), r.client_ids)?,
        channels,
        methods,
        auth_methods,
        patient_context: r.patient_context,
        systems: names(&at("systems"), r.systems)?,
    })
}

pub fn build(
    config: serde_yaml::Value,
    _cx: &BuildContext,
) -> std::result::Result<Arc<dyn Filter>, BuildError> {
    let c: RbacConfig = parse_config(config)?;
    if c.rules.is_empty() {
        return Err(BuildError::new(
            "config.rules",
            "at least one rule is required (use `default` for the fallback effect)",
        ));
    }
    let rules = c
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| compile_rule(i, r))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Arc::new(RbacFilter {
        mode: c.mode,
        default: c.default,
        rules,
    }))
}

fn denied(detail: &'static str) -> Decision {
    Decision::Respond(LocalReply::error(
        StatusCode::FORBIDDEN,
        "role_denied",
        detail,
    ))
}

impl RbacFilter {
    /// The decision for a request, given its principal (if any).
    fn decide(&self, principal: Option<&Principal>, ctx: &RequestCtx) -> Decision {
        let matched = self.rules.iter().find(|r| r.matches(principal, ctx));
        match (matched, principal) {
            (Some(rule), _) => match rule.effect {
                Effect::Allow => Decision::Continue,
                Effect::Deny => denied("the caller is not allowed on this route"),
            },
            (None, None) => denied("no authenticated caller"),
            (None, Some(_)) => match self.default {
                Effect::Allow => Decision::Continue,
                Effect::Deny => denied("the caller is not allowed on this route"),
            },
        }
    }
}

#[async_trait]
impl Filter for RbacFilter {
    fn kind(&self) -> &'static str {
        "rbac"
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    /// Reads the verified caller: a rule without caller conditions works without one, but a
    /// `jwt_auth` in the chain must come first.
    fn declaration(&self) -> crate::Declaration {
        crate::Declaration::new().reads(&[crate::Capability::Principal])
    }

    async fn request_filter(
        &self,
        _req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        let principal = ctx.facts.get::<Principal>();
        Ok(self.decide(principal, ctx))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::identity::SystemIdentity;

    fn filter(yaml: &str) -> Arc<dyn Filter> {
        build(serde_yaml::from_str(yaml).unwrap(), &Default::default()).unwrap()
    }

    fn build_err(yaml: &str) -> BuildError {
        build(serde_yaml::from_str(yaml).unwrap(), &Default::default())
            .err()
            .unwrap()
    }

    fn principal(roles: &[&str]) -> Principal {
        Principal {
            subject: "user-1".into(),
            issuer: Some("https://idp.example".into()),
            client_id: Some("ehr-app".into()),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            scopes: vec!["user/*.rs".into()],
            tenant: Some("hospital-a".into()),
            patient: None,
            fhir_user: None,
            method: AuthMethod::Token,
            system: None,
            expires_at: None,
        }
    }

    fn patient_app() -> Principal {
        Principal {
            client_id: Some("portal-app".into()),
            roles: vec![],
            scopes: vec!["patient/*.rs".into()],
            patient: Some("p-123".into()),
            ..principal(&[])
        }
    }

    fn lab_engine() -> Principal {
        Principal {
            subject: "lab-interface-engine".into(),
            issuer: None,
            client_id: None,
            roles: vec![],
            scopes: vec![],
            method: AuthMethod::ClientCertificate,
            system: Some(SystemIdentity {
                name: "lab-interface-engine".into(),
                certificate_subject: "CN=lab".into(),
                certificate_sha256: "00".into(),
            }),
            ..principal(&[])
        }
    }

    /// `Some(reason)` for a denial, `None` for Continue.
    async fn run(
        f: &Arc<dyn Filter>,
        p: Option<Principal>,
        channel: Channel,
        method: &str,
    ) -> Option<&'static str> {
        let mut ctx = RequestCtx::for_test(method, "/fhir/Observation");
        ctx.host().channel = channel;
        if let Some(p) = p {
            ctx.facts.insert(crate::ctx::writers::JwtAuth, p).unwrap();
        }
        let mut req = RequestHeader::build(method, b"/fhir/Observation", None).unwrap();
        match f.request_filter(&mut req, &mut ctx).await.unwrap() {
            Decision::Continue => None,
            Decision::Respond(r) => {
                assert_eq!(r.status, StatusCode::FORBIDDEN);
                Some(r.reason)
            }
        }
    }

    const INTERNAL_ROUTE: &str = "
rules:
  - effect: deny
    patient_context: true
  - effect: allow
    roles: [clinician, nurse]
    channels: [internal]
    methods: [get, HEAD]
  - effect: allow
    systems: [lab-interface-engine]
    auth_methods: [client_certificate, token+client_certificate]
  - effect: allow
    client_ids: [billing-app]
    scopes: [system/Claim.cruds]
  - effect: deny
    roles: [admin]
";

    /// (name, principal, channel, method, expected denial)
    type Case = (
        &'static str,
        Option<Principal>,
        Channel,
        &'static str,
        Option<&'static str>,
    );

    #[tokio::test]
    async fn principal_by_rule_matrix() {
        let f = filter(INTERNAL_ROUTE);
        use Channel::{Internal, Public};
        let billing = Principal {
            client_id: Some("billing-app".into()),
            scopes: vec!["system/Claim.cruds".into()],
            ..principal(&[])
        };
        let billing_wrong_scope = Principal {
            scopes: vec!["system/Claim.r".into()],
            ..billing.clone()
        };
        let clinician_with_patient = Principal {
            patient: Some("p-1".into()),
            ..principal(&["clinician"])
        };
        let cases: Vec<Case> = vec![
            (
                "clinician GET internal",
                Some(principal(&["clinician"])),
                Internal,
                "GET",
                None,
            ),
            (
                "nurse HEAD internal",
                Some(principal(&["nurse"])),
                Internal,
                "HEAD",
                None,
            ),
            (
                "clinician on public channel",
                Some(principal(&["clinician"])),
                Public,
                "GET",
                Some("role_denied"),
            ),
            (
                "clinician POST",
                Some(principal(&["clinician"])),
                Internal,
                "POST",
                Some("role_denied"),
            ),
            (
                "no role",
                Some(principal(&[])),
                Internal,
                "GET",
                Some("role_denied"),
            ),
            (
                "other role",
                Some(principal(&["billing"])),
                Internal,
                "GET",
                Some("role_denied"),
            ),
            // patient-context confinement: the first rule refuses a patient token even with a role
            (
                "patient app",
                Some(patient_app()),
                Internal,
                "GET",
                Some("role_denied"),
            ),
            (
                "clinician with patient ctx",
                Some(clinician_with_patient),
                Internal,
                "GET",
                Some("role_denied"),
            ),
            (
                "lab engine by certificate",
                Some(lab_engine()),
                Public,
                "POST",
                None,
            ),
            (
                "lab engine by token only",
                Some(Principal {
                    method: AuthMethod::Token,
                    ..lab_engine()
                }),
                Internal,
                "POST",
                Some("role_denied"),
            ),
            ("billing client + scope", Some(billing), Public, "PUT", None),
            (
                "billing client, wrong scope",
                Some(billing_wrong_scope),
                Public,
                "PUT",
                Some("role_denied"),
            ),
            (
                "admin is denied explicitly",
                Some(principal(&["admin"])),
                Internal,
                "DELETE",
                Some("role_denied"),
            ),
            // first match wins: an admin who is also a clinician is allowed by the earlier rule
            (
                "clinician+admin",
                Some(principal(&["admin", "clinician"])),
                Internal,
                "GET",
                None,
            ),
            ("anonymous", None, Internal, "GET", Some("role_denied")),
        ];
        for (name, p, channel, method, want) in cases {
            assert_eq!(run(&f, p, channel, method).await, want, "{name}");
        }
    }

    #[tokio::test]
    async fn default_effect_applies_when_no_rule_matches() {
        let allow = filter("{default: allow, rules: [{effect: deny, roles: [guest]}]}");
        assert_eq!(
            run(&allow, Some(principal(&["x"])), Channel::Public, "GET").await,
            None
        );
        assert_eq!(
            run(&allow, Some(principal(&["guest"])), Channel::Public, "GET").await,
            Some("role_denied")
        );
        // default allow never admits an anonymous caller
        assert_eq!(
            run(&allow, None, Channel::Public, "GET").await,
            Some("role_denied")
        );

        let deny = filter("{rules: [{effect: allow, roles: [clinician]}]}");
        assert_eq!(
            run(&deny, Some(principal(&["x"])), Channel::Public, "GET").await,
            Some("role_denied")
        );
    }

    #[tokio::test]
    async fn anonymous_callers_only_match_rules_without_identity_conditions() {
        let f = filter(
            "rules:
  - {effect: allow, roles: [clinician]}
  - {effect: allow, methods: [HEAD], channels: [internal]}
  - {effect: deny, methods: [DELETE]}
  - {effect: allow, patient_context: false}",
        );
        assert_eq!(run(&f, None, Channel::Internal, "HEAD").await, None);
        assert_eq!(
            run(&f, None, Channel::Public, "HEAD").await,
            Some("role_denied")
        );
        assert_eq!(
            run(&f, None, Channel::Internal, "GET").await,
            Some("role_denied")
        );
        assert_eq!(
            run(&f, None, Channel::Internal, "DELETE").await,
            Some("role_denied")
        );
        // `patient_context: false` is a condition on the caller: it needs a principal
        assert_eq!(
            run(&f, Some(principal(&[])), Channel::Public, "GET").await,
            None
        );
        assert_eq!(
            run(&f, Some(patient_app()), Channel::Public, "GET").await,
            Some("role_denied")
        );

        let mut ctx = RequestCtx::for_test("GET", "/");
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        match f.request_filter(&mut req, &mut ctx).await.unwrap() {
            Decision::Respond(r) => assert_eq!(r.detail, "no authenticated caller"),
            Decision::Continue => panic!("must be refused"),
        }
    }

    #[tokio::test]
    async fn a_rule_without_conditions_matches_everything() {
        let f = filter("{rules: [{effect: deny, patient_context: true}, {effect: allow}]}");
        assert_eq!(run(&f, None, Channel::Public, "GET").await, None);
        assert_eq!(
            run(&f, Some(principal(&[])), Channel::Public, "GET").await,
            None
        );
        assert_eq!(
            run(&f, Some(patient_app()), Channel::Public, "GET").await,
            Some("role_denied")
        );
    }

    #[test]
    fn mode_and_kind() {
        assert_eq!(filter("{rules: [{effect: allow}]}").mode(), Mode::Enforce);
        assert_eq!(
            filter("{mode: shadow, rules: [{effect: allow}]}").mode(),
            Mode::Shadow
        );
        assert_eq!(
            filter("{mode: off, rules: [{effect: allow}]}").mode(),
            Mode::Off
        );
        assert_eq!(filter("{rules: [{effect: allow}]}").kind(), "rbac");
    }

    #[test]
    fn bad_config_names_its_place() {
        let cases = [
            ("{rules: []}", "config.rules"),
            ("{mode: enforce}", "config"),
            ("{rules: [{effect: maybe}]}", "config.rules[0].effect"),
            ("{default: perhaps, rules: [{effect: allow}]}", "config.default"),
            ("{rules: [{effect: allow}, {effect: allow, roles: []}]}", "config.rules[1].roles"),
            ("{rules: [{effect: allow, roles: [a, '']}]}", "config.rules[0].roles[1]"),
            ("{rules: [{effect: allow, scopes: []}]}", "config.rules[0].scopes"),
            ("{rules: [{effect: allow, channels: [dmz]}]}", "config.rules[0].channels[0]"),
            ("{rules: [{effect: allow, channels: []}]}", "config.rules[0].channels"),
            (
                "{rules: [{effect: allow}, {effect: allow}, {effect: deny, auth_methods: [token, password]}]}",
                "config.rules[2].auth_methods[1]",
            ),
            ("{rules: [{effect: allow, methods: ['GE T']}]}", "config.rules[0].methods[0]"),
            ("{rules: [{effect: allow, role: [a]}]}", "config.rules[0]"),
        ];
        for (yaml, path) in cases {
            let e = build_err(yaml);
            assert!(e.path.starts_with(path), "{yaml}: {e}");
        }
        let e = build_err("{rules: [{effect: allow, channels: [dmz]}]}");
        assert_eq!(e.path, "config.rules[0].channels[0]", "{e}");
    }

    #[test]
    fn registered_under_its_kind() {
        let spec = crate::FilterSpec {
            kind: "rbac".into(),
            config: Some(serde_yaml::from_str("{rules: [{effect: allow}]}").unwrap()),
        };
        let f = crate::FilterRegistry::builtin()
            .build(&spec, &Default::default())
            .unwrap();
        assert_eq!(f.kind(), "rbac");
    }
}
