//! The rules, and the matching of findings to waivers.

use super::load::written_names;
use super::{Finding, Level, LevelSetting, Positions, SubjectKind, Waiver};
use crate::apis::LifecycleState;
use crate::config::{Config, Loaded, RouteConfig};
use caregate_filters::{Capability, Channel, Environment, Filter, Mode};
use std::sync::Arc;

/// A rule: its id, default level and what it is about.
#[derive(Debug, Clone, Copy)]
pub struct RuleInfo {
    /// Stable kebab-case id.
    pub id: &'static str,
    pub default: Level,
    /// Whether `lint.rules.<id>` may set it (every rule but `config-invalid`).
    pub configurable: bool,
    /// One line: what the rule asks for.
    pub summary: &'static str,
    /// How to fix a finding.
    pub help: &'static str,
}

pub const CONFIG_INVALID: &str = "config-invalid";

/// Every rule, `config-invalid` first.
pub const RULES: &[RuleInfo] = &[
    RuleInfo {
        id: CONFIG_INVALID,
        default: Level::Error,
        configurable: false,
        summary: "The config loads and validates as `caregate check` would (lint settings and waivers included).",
        help: "Fix the config at the place the message names; `caregate check -c FILE` says the same.",
    },
    RuleInfo {
        id: "naming",
        default: Level::Warning,
        configurable: true,
        summary: "Names of routes, APIs, pools, listeners and tenants, and API version names, follow the naming patterns.",
        help: "Rename to lower-case words joined by `-` (or set `lint.rules.naming.pattern` / `version_pattern`).",
    },
    RuleInfo {
        id: "public-route-authenticated",
        default: Level::Error,
        configurable: true,
        summary: "Every route on a public listener has a filter that authenticates the caller (`jwt_auth`, mode not off).",
        help: "Add `jwt_auth` to the route's or the listener's filters, or waive the finding with the reason the route is open.",
    },
    RuleInfo {
        id: "public-route-rate-limited",
        default: Level::Error,
        configurable: true,
        summary: "Every route on a public listener has a `rate_limit` filter (mode not off), on the route or its listener.",
        help: "Add a `rate_limit` filter to the listener (per address) or the route (per caller, after `jwt_auth`).",
    },
    RuleInfo {
        id: "phi-route-audited",
        default: Level::Error,
        configurable: true,
        summary: "Every `fhir: true` and `hl7: true` route is `phi: true`, so that it is in the audit trail.",
        help: "Set `phi: true` on the route (and keep an `audit:` section).",
    },
    RuleInfo {
        id: "patient-token-confined",
        default: Level::Error,
        configurable: true,
        summary: "A route that admits patient-context tokens has `smart_scopes` and `patient_compartment` after its `jwt_auth`.",
        help: "Add `{ kind: smart_scopes }` and `{ kind: patient_compartment }` after `jwt_auth`, never in mode off.",
    },
    RuleInfo {
        id: "deprecated-version-complete",
        default: Level::Error,
        configurable: true,
        summary: "A deprecated API version (or a live one with `deprecated_at`) has a `sunset` and a `successor`.",
        help: "Set `sunset` (the date it answers 410) and `successor` (the version that replaces it).",
    },
    RuleInfo {
        id: "api-owner-docs",
        default: Level::Warning,
        configurable: true,
        summary: "Every API version has an owner and a docs link (its own or its API's).",
        help: "Set `owner` and `docs` on the API (or on the version).",
    },
    RuleInfo {
        id: "environment-separation",
        default: Level::Error,
        configurable: true,
        summary: "Production listeners send to production pools only, sandbox listeners to sandbox pools only.",
        help: "Point the route (or the API version's `pool`) at a pool of the listener's environment.",
    },
    RuleInfo {
        id: "sandbox-issuer-scope",
        default: Level::Error,
        configurable: true,
        summary: "Sandbox issuers have a sandbox listener to be used on (warning), and sandbox listeners carry only routes of APIs (error).",
        help: "Add an `environment: sandbox` listener or remove the sandbox issuer; serve sandbox traffic through an API's `sandbox:`.",
    },
    RuleInfo {
        id: "unused-waiver",
        default: Level::Warning,
        configurable: true,
        summary: "Every waiver in `lint.waivers` accepts at least one finding.",
        help: "Remove the waiver (what it accepted is fixed), or correct its rule or name.",
    },
];

/// The rule `id`'s description.
pub fn info(id: &str) -> Option<&'static RuleInfo> {
    RULES.iter().find(|r| r.id == id)
}

/// The one finding of a config that does not load.
pub fn config_invalid(message: String, place: String, at: (usize, usize)) -> Finding {
    Finding {
        rule: CONFIG_INVALID,
        level: Level::Error,
        message,
        place,
        line: at.0,
        column: at.1,
        subjects: Vec::new(),
        waived: None,
    }
}

/// A finding before its level and position are settled.
struct Raw {
    rule: &'static str,
    /// A level of this finding other than the rule's default (an override in the config wins).
    level: Option<Level>,
    message: String,
    place: String,
    /// Where to point in the file (default `place`).
    at: Option<String>,
    subjects: Vec<(SubjectKind, String)>,
}

impl Raw {
    fn new(rule: &'static str, message: String, place: String) -> Raw {
        Raw {
            rule,
            level: None,
            message,
            place,
            at: None,
            subjects: Vec::new(),
        }
    }

    fn about(mut self, kind: SubjectKind, name: &str) -> Raw {
        if !self.subjects.iter().any(|(k, n)| *k == kind && n == name) {
            self.subjects.push((kind, name.to_string()));
        }
        self
    }
}

/// What lint knows of the loaded config.
struct Ctx<'a> {
    loaded: &'a Loaded,
    cfg: &'a Config,
    /// Route names as written in `routes:` (before API expansion).
    written_routes: Vec<String>,
}

/// Where a route of the expanded list comes from.
struct Origin {
    /// `routes[i]` of the file (`portal` for the developer portal's route).
    place: String,
    /// The name as written (the template's for an API copy).
    name: String,
    /// API and version of a copy.
    api: Option<(String, String)>,
}

impl Ctx<'_> {
    fn origin(&self, r: &RouteConfig) -> Origin {
        if r.portal {
            return Origin {
                place: "portal".into(),
                name: r.name.clone(),
                api: None,
            };
        }
        let name = r
            .api
            .as_ref()
            .map(|b| b.template.clone())
            .unwrap_or_else(|| r.name.clone());
        let place = match self.written_routes.iter().position(|n| *n == name) {
            Some(i) => format!("routes[{i}]"),
            None => "routes".into(),
        };
        Origin {
            place,
            name,
            api: r
                .api
                .as_ref()
                .map(|b| (b.api.to_string(), b.version.to_string())),
        }
    }

    fn listener_of(&self, r: &RouteConfig) -> Option<(usize, &crate::config::ListenerConfig)> {
        self.cfg
            .listeners
            .iter()
            .enumerate()
            .find(|(_, l)| l.name == r.listener)
    }

    /// The built filters of expanded route `ri` as they run: its listener's, then its own.
    fn chain(&self, ri: usize, r: &RouteConfig) -> Vec<&Arc<dyn Filter>> {
        let mut out: Vec<&Arc<dyn Filter>> = Vec::new();
        if let Some((li, _)) = self.listener_of(r) {
            if let Some(fs) = self.loaded.listener_filters.get(li) {
                out.extend(fs.iter());
            }
        }
        if let Some(fs) = self.loaded.route_filters.get(ri) {
            out.extend(fs.iter());
        }
        out
    }

    fn pool_env(&self, name: &str) -> Option<Environment> {
        self.cfg
            .pools
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.environment)
    }
}

/// Findings about routes, merged over the copies of one written route (an API's route once per
/// version): one finding per written route and message, naming the versions.
#[derive(Default)]
struct RouteFindings {
    /// (raw, API name, versions), in first-seen order.
    items: Vec<(Raw, Option<String>, Vec<String>)>,
}

impl RouteFindings {
    /// A finding about the route `r` (of the expanded list); `versions`: name the versions.
    fn add(&mut self, ctx: &Ctx<'_>, r: &RouteConfig, rule: &'static str, message: String) {
        let o = ctx.origin(r);
        let found = self
            .items
            .iter_mut()
            .find(|(raw, _, _)| raw.rule == rule && raw.place == o.place && raw.message == message);
        let (api, version) = match o.api {
            Some((a, v)) => (Some(a), Some(v)),
            None => (None, None),
        };
        match found {
            Some((_, _, versions)) => {
                if let Some(v) = version {
                    if !versions.contains(&v) {
                        versions.push(v);
                    }
                }
            }
            None => {
                let mut raw = Raw::new(rule, message, o.place)
                    .about(SubjectKind::Route, &o.name)
                    .about(SubjectKind::Listener, &r.listener);
                if !r.pool.is_empty() {
                    raw = raw.about(SubjectKind::Pool, &r.pool);
                }
                if let Some(a) = &api {
                    raw = raw.about(SubjectKind::Api, a);
                }
                self.items.push((raw, api, version.into_iter().collect()));
            }
        }
    }

    fn finish(self) -> Vec<Raw> {
        self.items
            .into_iter()
            .map(|(mut raw, api, versions)| {
                if let Some(api) = api {
                    let s = if versions.len() == 1 { "" } else { "s" };
                    raw.message = format!(
                        "{} (API `{api}`, version{s} {})",
                        raw.message,
                        versions.join(", ")
                    );
                }
                raw
            })
            .collect()
    }
}

/// The routes of public listeners that serve traffic: (expanded index, route, listener name).
fn public_serving_routes<'a>(ctx: &'a Ctx<'a>) -> Vec<(usize, &'a RouteConfig)> {
    ctx.cfg
        .routes
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.portal && !r.hl7)
        .filter(|(_, r)| {
            r.api
                .as_ref()
                .is_none_or(|b| b.lifecycle.state != LifecycleState::Retired)
        })
        .filter(|(_, r)| {
            ctx.listener_of(r)
                .is_some_and(|(_, l)| l.channel == Channel::Public)
        })
        .collect()
}

fn public_route_authenticated(ctx: &Ctx<'_>) -> Vec<Raw> {
    public_routes_need(
        ctx,
        "public-route-authenticated",
        |f| f.declaration().provides.contains(&Capability::Principal),
        "does not authenticate its callers",
        "no `jwt_auth` (or other filter providing the verified caller) on the route or the listener",
    )
}

fn public_route_rate_limited(ctx: &Ctx<'_>) -> Vec<Raw> {
    public_routes_need(
        ctx,
        "public-route-rate-limited",
        |f| f.kind() == "rate_limit",
        "is not rate-limited",
        "no `rate_limit` on the route or the listener",
    )
}

/// A finding of `rule` for every serving public route whose chain (listener and route filters)
/// has no filter that `wanted` accepts in a mode other than `off`: `what` the route lacks, and
/// why (`none`: no such filter at all; else the filter is off).
fn public_routes_need(
    ctx: &Ctx<'_>,
    rule: &'static str,
    wanted: impl Fn(&Arc<dyn Filter>) -> bool,
    what: &str,
    none: &str,
) -> Vec<Raw> {
    let mut out = RouteFindings::default();
    for (ri, r) in public_serving_routes(ctx) {
        let chain = ctx.chain(ri, r);
        if chain.iter().any(|f| wanted(f) && f.mode() != Mode::Off) {
            continue;
        }
        let name = ctx.origin(r).name;
        let why = match chain.iter().find(|f| wanted(f)) {
            Some(f) => format!("its `{}` is in mode off", f.kind()),
            None => none.to_string(),
        };
        let message = format!(
            "route `{name}` on public listener `{}` {what}: {why}",
            r.listener
        );
        out.add(ctx, r, rule, message);
    }
    out.finish()
}

fn phi_route_audited(ctx: &Ctx<'_>) -> Vec<Raw> {
    let rule = "phi-route-audited";
    let mut out: Vec<Raw> = Vec::new();
    for r in ctx.cfg.routes.iter().filter(|r| !r.portal && !r.phi) {
        let what = if r.fhir {
            "a FHIR route (`fhir: true`)"
        } else if r.hl7 {
            "an HL7 v2 route (`hl7: true`)"
        } else {
            continue;
        };
        let o = ctx.origin(r);
        if out.iter().any(|x| x.place == o.place) {
            continue;
        }
        out.push(
            Raw::new(
                rule,
                format!(
                    "route `{}` is {what} but not `phi: true`: its requests carry PHI and are not in the audit trail",
                    o.name
                ),
                o.place,
            )
            .about(SubjectKind::Route, &o.name),
        );
    }
    out
}

fn patient_token_confined(ctx: &Ctx<'_>) -> Vec<Raw> {
    let rule = "patient-token-confined";
    let mut out = RouteFindings::default();
    for u in crate::confinement::unconfined_patient_routes(ctx.cfg) {
        let Some((ri, r)) = ctx
            .cfg
            .routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.name == u.route)
        else {
            continue;
        };
        let o = ctx.origin(r);
        // The analysis names filters by their index in the expanded route list.
        let from = format!("routes[{ri}].");
        let to = format!("{}.", o.place);
        let missing: Vec<String> = u.missing.iter().map(|m| m.replace(&from, &to)).collect();
        let message = format!(
            "route `{}` admits patient-context tokens (issuers: {}) but is not confined to the patient: {}",
            o.name,
            u.issuers.join(", "),
            missing.join("; ")
        );
        out.add(ctx, r, rule, message);
    }
    out.finish()
}

fn deprecated_version_complete(ctx: &Ctx<'_>) -> Vec<Raw> {
    let rule = "deprecated-version-complete";
    let mut out = Vec::new();
    for (ai, a) in ctx.cfg.apis.iter().enumerate() {
        for (vi, v) in a.versions.iter().enumerate() {
            let deprecated = v.state == LifecycleState::Deprecated
                || (v.state == LifecycleState::Live && v.deprecated_at.is_some());
            if !deprecated {
                continue;
            }
            let mut missing = Vec::new();
            if v.sunset.is_none() {
                missing.push("no `sunset` (the date it answers 410)");
            }
            if v.successor.is_none() {
                missing.push("no `successor` (the version its callers move to)");
            }
            if missing.is_empty() {
                continue;
            }
            let how = if v.state == LifecycleState::Deprecated {
                "is deprecated"
            } else {
                "has a `deprecated_at` date"
            };
            out.push(
                Raw::new(
                    rule,
                    format!(
                        "API `{}` version `{}` {how} but has {}",
                        a.name,
                        v.name,
                        missing.join(" and ")
                    ),
                    format!("apis[{ai}].versions[{vi}]"),
                )
                .about(SubjectKind::Api, &a.name),
            );
        }
    }
    out
}

fn api_owner_docs(ctx: &Ctx<'_>) -> Vec<Raw> {
    let rule = "api-owner-docs";
    let mut out = Vec::new();
    let what = |owner: bool, docs: bool| match (owner, docs) {
        (true, true) => "no owner and no docs link",
        (true, false) => "no owner",
        _ => "no docs link",
    };
    for (ai, a) in ctx.cfg.apis.iter().enumerate() {
        let gaps: Vec<(usize, bool, bool)> = a
            .versions
            .iter()
            .enumerate()
            .map(|(vi, v)| {
                (
                    vi,
                    v.owner
                        .as_ref()
                        .or(a.owner.as_ref())
                        .is_none_or(|s| s.trim().is_empty()),
                    v.docs
                        .as_ref()
                        .or(a.docs.as_ref())
                        .is_none_or(|s| s.trim().is_empty()),
                )
            })
            .filter(|(_, o, d)| *o || *d)
            .collect();
        if gaps.is_empty() {
            continue;
        }
        let same = gaps.len() == a.versions.len()
            && gaps.iter().all(|g| (g.1, g.2) == (gaps[0].1, gaps[0].2));
        if same {
            out.push(
                Raw::new(
                    rule,
                    format!(
                        "API `{}` has {}: set `owner` (who to ask, who approves changes) and `docs` (a URL) on the API",
                        a.name,
                        what(gaps[0].1, gaps[0].2)
                    ),
                    format!("apis[{ai}]"),
                )
                .about(SubjectKind::Api, &a.name),
            );
            continue;
        }
        for (vi, o, d) in gaps {
            out.push(
                Raw::new(
                    rule,
                    format!(
                        "API `{}` version `{}` has {} (neither its own nor the API's)",
                        a.name,
                        a.versions.get(vi).map(|v| v.name.as_str()).unwrap_or(""),
                        what(o, d)
                    ),
                    format!("apis[{ai}].versions[{vi}]"),
                )
                .about(SubjectKind::Api, &a.name),
            );
        }
    }
    out
}

fn environment_separation(ctx: &Ctx<'_>) -> Vec<Raw> {
    let rule = "environment-separation";
    let mut out = RouteFindings::default();
    let mut version_pools: Vec<Raw> = Vec::new();
    for r in ctx
        .cfg
        .routes
        .iter()
        .filter(|r| !r.portal && !r.hl7 && !r.pool.is_empty())
    {
        let Some((_, l)) = ctx.listener_of(r) else {
            continue;
        };
        let Some(pool_env) = ctx.pool_env(&r.pool) else {
            continue;
        };
        if pool_env == l.environment {
            continue;
        }
        let name = ctx.origin(r).name;
        let why = match l.environment {
            Environment::Production => "synthetic sandbox data would answer production callers",
            Environment::Sandbox => "sandbox callers would reach production data",
        };
        let message = format!(
            "route `{name}` on {} listener `{}` sends to {} pool `{}`: {why}",
            l.environment.as_str(),
            l.name,
            pool_env.as_str(),
            r.pool
        );
        // A version's own `pool:` is the place to fix.
        if let Some(b) = &r.api {
            let v = ctx
                .cfg
                .apis
                .get(b.api_index)
                .and_then(|a| a.versions.get(b.version_index));
            if v.and_then(|v| v.pool.as_deref()) == Some(r.pool.as_str()) {
                let place = format!("apis[{}].versions[{}]", b.api_index, b.version_index);
                if !version_pools
                    .iter()
                    .any(|x| x.place == place && x.message.starts_with(&message))
                {
                    version_pools.push(
                        Raw::new(
                            rule,
                            format!("{message} (API `{}`, version {})", b.api, b.version),
                            place.clone(),
                        )
                        .about(SubjectKind::Api, &b.api)
                        .about(SubjectKind::Route, &name)
                        .about(SubjectKind::Listener, &l.name)
                        .about(SubjectKind::Pool, &r.pool),
                    );
                    if let Some(last) = version_pools.last_mut() {
                        last.at = Some(format!("{place}.pool"));
                    }
                }
                continue;
            }
        }
        out.add(ctx, r, rule, message);
    }
    let mut all = out.finish();
    all.extend(version_pools);
    all
}

fn sandbox_issuer_scope(ctx: &Ctx<'_>) -> Vec<Raw> {
    let rule = "sandbox-issuer-scope";
    let mut out = Vec::new();
    let has_sandbox_listener = ctx
        .cfg
        .listeners
        .iter()
        .any(|l| l.environment == Environment::Sandbox);
    if !has_sandbox_listener {
        for (i, iss) in ctx.cfg.auth.issuers.iter().enumerate() {
            if iss.sandbox {
                let mut raw = Raw::new(
                    rule,
                    format!(
                        "issuer `{}` is a sandbox issuer but no listener has `environment: sandbox`: its tokens are refused everywhere",
                        iss.name
                    ),
                    format!("auth.issuers[{i}]"),
                )
                .about(SubjectKind::Issuer, &iss.name);
                raw.level = Some(Level::Warning);
                out.push(raw);
            }
        }
    }
    let mut routes = RouteFindings::default();
    for r in ctx
        .cfg
        .routes
        .iter()
        .filter(|r| !r.portal && r.api.is_none())
    {
        let Some((_, l)) = ctx.listener_of(r) else {
            continue;
        };
        if l.environment != Environment::Sandbox {
            continue;
        }
        let message = format!(
            "route `{}` on sandbox listener `{}` belongs to no API: sandbox listeners serve API versions (`apis[].sandbox`), and an unversioned route there is held to nothing the sandbox promises",
            r.name, l.name
        );
        routes.add(ctx, r, rule, message);
    }
    out.extend(routes.finish());
    out
}

fn naming(ctx: &Ctx<'_>, pattern: &regex::Regex, version: &regex::Regex) -> Vec<Raw> {
    let rule = "naming";
    let mut out = Vec::new();
    let mut check = |what: &str, kind: SubjectKind, list: &str, field: &str, names: Vec<String>| {
        for (i, n) in names.iter().enumerate() {
            if !pattern.is_match(n) {
                let place = format!("{list}[{i}]");
                let mut raw = Raw::new(
                    rule,
                    format!(
                        "{what} name `{n}` does not match the naming pattern `{}`",
                        pattern.as_str()
                    ),
                    place.clone(),
                )
                .about(kind, n);
                raw.at = Some(format!("{place}.{field}"));
                out.push(raw);
            }
        }
    };
    check(
        "route",
        SubjectKind::Route,
        "routes",
        "name",
        ctx.written_routes.clone(),
    );
    check(
        "API",
        SubjectKind::Api,
        "apis",
        "name",
        ctx.cfg.apis.iter().map(|a| a.name.clone()).collect(),
    );
    check(
        "pool",
        SubjectKind::Pool,
        "pools",
        "name",
        ctx.cfg.pools.iter().map(|p| p.name.clone()).collect(),
    );
    check(
        "listener",
        SubjectKind::Listener,
        "listeners",
        "name",
        ctx.cfg.listeners.iter().map(|l| l.name.clone()).collect(),
    );
    check(
        "tenant",
        SubjectKind::Tenant,
        "tenants",
        "id",
        ctx.cfg.tenants.iter().map(|t| t.id.clone()).collect(),
    );
    for (ai, a) in ctx.cfg.apis.iter().enumerate() {
        for (vi, v) in a.versions.iter().enumerate() {
            if !version.is_match(&v.name) {
                let place = format!("apis[{ai}].versions[{vi}]");
                let mut raw = Raw::new(
                    rule,
                    format!(
                        "API `{}` version name `{}` does not match the version pattern `{}`",
                        a.name,
                        v.name,
                        version.as_str()
                    ),
                    place.clone(),
                )
                .about(SubjectKind::Api, &a.name);
                raw.at = Some(format!("{place}.name"));
                out.push(raw);
            }
        }
    }
    out
}

pub const DEFAULT_NAME_PATTERN: &str = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$";
pub const DEFAULT_VERSION_PATTERN: &str =
    r"^v[0-9]+(\.[0-9]+)?(-[a-z0-9]+)?$|^[0-9]{4}-[0-9]{2}(-[0-9]{2})?$|^[rR][0-9]+[bB]?$";

/// Problems with `lint:` itself that `check` does not see: patterns that do not compile,
/// waivers of unknown rules, without a subject or a reason. The first one, as a finding.
fn check_settings(
    cfg: &Config,
    positions: &Positions,
) -> Result<(regex::Regex, regex::Regex), Box<Finding>> {
    let invalid = |msg: String, place: String| {
        let at = positions.get(&place);
        Err(Box::new(config_invalid(msg, place, at)))
    };
    let n = &cfg.lint.rules.naming;
    let compile = |p: &Option<String>, default: &str, key: &str| {
        regex::Regex::new(p.as_deref().unwrap_or(default)).map_err(|e| {
            let place = format!("lint.rules.naming.{key}");
            let at = positions.get(&place);
            Box::new(config_invalid(
                format!("{place}: not a regular expression: {e}"),
                place,
                at,
            ))
        })
    };
    let pattern = compile(&n.pattern, DEFAULT_NAME_PATTERN, "pattern")?;
    let version = compile(
        &n.version_pattern,
        DEFAULT_VERSION_PATTERN,
        "version_pattern",
    )?;
    for (i, w) in cfg.lint.waivers.iter().enumerate() {
        let place = format!("lint.waivers[{i}]");
        match info(&w.rule) {
            Some(r) if r.configurable => {}
            Some(_) => {
                return invalid(
                    format!("{place}.rule: `{}` cannot be waived", w.rule),
                    place,
                )
            }
            None => {
                return invalid(
                    format!(
                        "{place}.rule: unknown rule `{}` (one of: {})",
                        w.rule,
                        RULES
                            .iter()
                            .filter(|r| r.configurable)
                            .map(|r| r.id)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    place,
                )
            }
        }
        if w.reason.trim().is_empty() {
            return invalid(
                format!("{place}.reason: a waiver needs its reason (why the finding is accepted)"),
                place,
            );
        }
        if w.subjects().len() != 1 {
            return invalid(
                format!(
                    "{place}: name exactly one of `route`, `api`, `pool`, `listener`, `tenant`, `issuer` (to turn a rule off, set `lint.rules.<id>.level: off`)"
                ),
                place,
            );
        }
    }
    Ok((pattern, version))
}

/// Run every rule on a loaded config; match the waivers; report unused ones.
pub fn run_all(loaded: &Loaded, text: &str, positions: &Positions) -> Vec<Finding> {
    let cfg = &loaded.config;
    let (pattern, version) = match check_settings(cfg, positions) {
        Ok(p) => p,
        Err(f) => return vec![*f],
    };
    let ctx = Ctx {
        loaded,
        cfg,
        written_routes: written_names(text, "routes", "name"),
    };
    let settings = &cfg.lint.rules;
    let enabled = |id: &str| settings.level(id) != Some(LevelSetting::Off);
    let mut raws: Vec<Raw> = Vec::new();
    let rules: [(&str, &dyn Fn() -> Vec<Raw>); 9] = [
        ("naming", &|| naming(&ctx, &pattern, &version)),
        ("public-route-authenticated", &|| {
            public_route_authenticated(&ctx)
        }),
        ("public-route-rate-limited", &|| {
            public_route_rate_limited(&ctx)
        }),
        ("phi-route-audited", &|| phi_route_audited(&ctx)),
        ("patient-token-confined", &|| patient_token_confined(&ctx)),
        ("deprecated-version-complete", &|| {
            deprecated_version_complete(&ctx)
        }),
        ("api-owner-docs", &|| api_owner_docs(&ctx)),
        ("environment-separation", &|| environment_separation(&ctx)),
        ("sandbox-issuer-scope", &|| sandbox_issuer_scope(&ctx)),
    ];
    for (id, rule) in rules {
        if enabled(id) {
            raws.extend(rule());
        }
    }
    let level_of = |raw: &Raw| match settings.level(raw.rule) {
        Some(LevelSetting::Error) => Level::Error,
        Some(LevelSetting::Warning) => Level::Warning,
        _ => raw
            .level
            .or_else(|| info(raw.rule).map(|r| r.default))
            .unwrap_or(Level::Error),
    };
    let mut used = vec![false; cfg.lint.waivers.len()];
    let mut findings: Vec<Finding> = raws
        .into_iter()
        .map(|raw| {
            let (line, column) = positions.get(raw.at.as_deref().unwrap_or(&raw.place));
            let waived = waiver_for(&cfg.lint.waivers, raw.rule, &raw.subjects).map(|i| {
                used[i] = true;
                cfg.lint.waivers[i].reason.clone()
            });
            Finding {
                rule: raw.rule,
                level: level_of(&raw),
                message: raw.message,
                place: raw.place,
                line,
                column,
                subjects: raw.subjects,
                waived,
            }
        })
        .collect();
    if enabled("unused-waiver") {
        for (i, w) in cfg.lint.waivers.iter().enumerate() {
            if used[i] {
                continue;
            }
            let (kind, name) = w
                .subjects()
                .first()
                .map(|(k, n)| (format!("{k:?}").to_lowercase(), n.to_string()))
                .unwrap_or_default();
            let off = if settings.level(&w.rule) == Some(LevelSetting::Off) {
                " (the rule is off)"
            } else {
                ""
            };
            let raw = Raw::new(
                "unused-waiver",
                format!(
                    "the waiver of `{}` for {kind} `{name}` accepts no finding{off}: remove it",
                    w.rule
                ),
                format!("lint.waivers[{i}]"),
            );
            let (line, column) = positions.get(&raw.place);
            findings.push(Finding {
                rule: raw.rule,
                level: level_of(&raw),
                message: raw.message,
                place: raw.place,
                line,
                column,
                subjects: Vec::new(),
                waived: None,
            });
        }
    }
    findings.sort_by(|a, b| {
        (a.line, a.column, a.rule, &a.message).cmp(&(b.line, b.column, b.rule, &b.message))
    });
    findings
}

/// The first waiver of `rule` that names one of `subjects`.
fn waiver_for(waivers: &[Waiver], rule: &str, subjects: &[(SubjectKind, String)]) -> Option<usize> {
    waivers.iter().position(|w| {
        w.rule == rule
            && w.subjects()
                .iter()
                .any(|(k, n)| subjects.iter().any(|(sk, sn)| sk == k && sn == n))
    })
}
