//! The portal's OpenAPI 3.1 document, built from the expanded route table, the APIs' lifecycle,
//! the issuers and the backends' CapabilityStatements (see `docs/portal.md`).
//!
//! Everything here is pure: [`document`] takes the config, the fragments read at build time and
//! the CapabilityStatement summaries fetched so far, and returns the document as JSON.

use super::fetch::CapSummary;
use crate::apis::{http_date, Effective, VersionSelect, Versioning};
use crate::config::{Config, RouteConfig};
use caregate_filters::builtin::jwt_auth::{JwtAuthConfig, SourceMode};
use caregate_filters::{Channel, Environment, FilterSpec};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// What identifies one CapabilityStatement: the pool and the upstream path of `metadata`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CapKey {
    pub pool: String,
    pub path: String,
}

/// The statuses every operation documents besides its success (`410` is added where it applies).
const ERROR_STATUSES: &[u16] = &[
    400, 401, 403, 404, 405, 413, 414, 429, 431, 500, 502, 503, 504,
];

/// FHIR ids (R4 `id`): 1 to 64 of `[A-Za-z0-9-.]`, and not `.` or `..` (dot segments are
/// resolved by the gateway's path normalisation, so they cannot name a resource).
const FHIR_ID_PATTERN: &str = "^[A-Za-z0-9.-]*[A-Za-z0-9-][A-Za-z0-9.-]*$";

/// The `metadata` path upstream for a FHIR route.
pub fn cap_key(r: &RouteConfig) -> CapKey {
    let up = r.upstream_prefix.as_deref().unwrap_or(&r.path_prefix);
    CapKey {
        pool: r.pool.clone(),
        path: join(up, "/metadata"),
    }
}

/// `prefix` + `tail` (`tail` starts with `/`), without a doubled slash.
pub fn join(prefix: &str, tail: &str) -> String {
    let p = prefix.trim_end_matches('/');
    format!("{p}{tail}")
}

/// The portal listener's environment.
fn portal_env(cfg: &Config) -> Environment {
    let Some(p) = &cfg.portal else {
        return Environment::Production;
    };
    cfg.listeners
        .iter()
        .find(|l| l.name == p.listener)
        .map(|l| l.environment)
        .unwrap_or_default()
}

/// The channel of a listener (by name); internal when unknown, so nothing is shown by mistake.
fn channel_of(cfg: &Config, listener: &str) -> Channel {
    cfg.listeners
        .iter()
        .find(|l| l.name == listener)
        .map(|l| l.channel)
        .unwrap_or(Channel::Internal)
}

/// The routes the document describes, routes of the portal's own listener first, each with
/// its API version's state now. Skipped: the portal's route, HL7 routes, retired versions,
/// drafts unless the portal is on a sandbox listener, and, on a portal served on a public
/// listener, the routes of internal listeners (internal APIs are not described to the
/// internet).
pub fn documented_routes(cfg: &Config, now: i64) -> Vec<(&RouteConfig, Option<Effective>)> {
    let portal_listener = cfg.portal.as_ref().map(|p| p.listener.as_str());
    let sandbox_portal = portal_env(cfg) == Environment::Sandbox;
    let public_portal = portal_listener.is_some_and(|l| channel_of(cfg, l) == Channel::Public);
    let mut out: Vec<(&RouteConfig, Option<Effective>)> = Vec::new();
    for r in &cfg.routes {
        if r.portal || r.hl7 {
            continue;
        }
        if public_portal && channel_of(cfg, &r.listener) == Channel::Internal {
            continue;
        }
        let eff = r.api.as_ref().map(|b| b.lifecycle.evaluate(now));
        match eff {
            Some(Effective::Retired) => continue,
            Some(Effective::Draft) if !sandbox_portal => continue,
            _ => {}
        }
        out.push((r, eff));
    }
    // Stable: the portal listener's routes first, then the others in config order.
    out.sort_by_key(|(r, _)| Some(r.listener.as_str()) != portal_listener);
    out
}

/// The FHIR routes whose CapabilityStatement the document would use.
pub fn cap_keys(cfg: &Config, now: i64) -> Vec<CapKey> {
    let mut seen = BTreeSet::new();
    for (r, _) in documented_routes(cfg, now) {
        if r.fhir && !r.pool.is_empty() {
            seen.insert(cap_key(r));
        }
    }
    seen.into_iter().collect()
}

/// The inputs of one build of the document.
pub struct Inputs<'a> {
    pub config: &'a Config,
    /// Each API's `openapi_fragment`, parsed (by API index).
    pub fragments: &'a HashMap<usize, Value>,
    pub caps: &'a HashMap<CapKey, CapSummary>,
    /// Unix seconds: the lifecycle's dates are judged at this time.
    pub now: i64,
}

/// How a route's callers authenticate, as OpenAPI security requirements.
struct RouteSecurity {
    /// One requirement per alternative (empty: no authentication).
    requirements: Vec<Value>,
    /// The route has `smart_scopes` (scopes per interaction apply).
    scoped: bool,
}

struct Builder<'a> {
    i: &'a Inputs<'a>,
    paths: BTreeMap<String, Map<String, Value>>,
    op_ids: HashSet<String>,
    tags: Vec<Value>,
    tag_names: HashSet<String>,
    schemes: BTreeMap<String, Value>,
    /// Scopes named by operations, per oauth2 scheme (for the flow's scope list).
    scheme_scopes: BTreeMap<String, BTreeSet<String>>,
    notes: Vec<String>,
    fhir_errors: bool,
    problem_errors: bool,
}

/// The OpenAPI 3.1 document.
pub fn document(i: &Inputs<'_>) -> Value {
    let cfg = i.config;
    let mut b = Builder {
        i,
        paths: BTreeMap::new(),
        op_ids: HashSet::new(),
        tags: Vec::new(),
        tag_names: HashSet::new(),
        schemes: BTreeMap::new(),
        scheme_scopes: BTreeMap::new(),
        notes: Vec::new(),
        fhir_errors: false,
        problem_errors: false,
    };
    let issuer_count = used_issuers(cfg, i.now).len();
    for (r, eff) in documented_routes(cfg, i.now) {
        let sec = b.security(r, issuer_count);
        let meta = b.route_meta(r, eff);
        if r.fhir {
            b.fhir_route(r, &meta, &sec);
        } else {
            b.plain_route(r, &meta, &sec);
        }
        if let Some(binding) = &r.api {
            if let Some(frag) = i.fragments.get(&binding.api_index) {
                b.merge_fragment_paths(r, &meta, &sec, frag);
            }
        }
    }
    let mut components = Map::new();
    let mut schemas = base_schemas();
    let mut responses = Map::new();
    for s in ERROR_STATUSES.iter().copied().chain([410]) {
        if b.fhir_errors {
            responses.insert(format!("fhir-{s}"), error_response(true, Some(s)));
        }
        if b.problem_errors {
            responses.insert(format!("problem-{s}"), error_response(false, Some(s)));
        }
    }
    if b.fhir_errors {
        responses.insert("fhir-default".into(), error_response(true, None));
    }
    if b.problem_errors {
        responses.insert("problem-default".into(), error_response(false, None));
    }
    // The fragments' components: theirs are added, ours win on a clash.
    let mut other_sections: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut frag_ids: Vec<&usize> = i.fragments.keys().collect();
    frag_ids.sort();
    for ai in frag_ids {
        let Some(frag) = i.fragments.get(ai) else {
            continue;
        };
        let api = cfg.apis.get(*ai).map(|a| a.name.as_str()).unwrap_or("?");
        let Some(comps) = frag.get("components").and_then(Value::as_object) else {
            continue;
        };
        for (section, entries) in comps {
            let Some(entries) = entries.as_object() else {
                continue;
            };
            let target: &mut Map<String, Value> = match section.as_str() {
                "schemas" => &mut schemas,
                "responses" => &mut responses,
                "securitySchemes" => continue,
                _ => other_sections.entry(section.clone()).or_default(),
            };
            for (name, v) in entries {
                if target.contains_key(name) {
                    b.notes.push(format!(
                        "components.{section}.{name} of the `{api}` fragment was not merged: the gateway's own definition of that name wins."
                    ));
                } else {
                    target.insert(name.clone(), v.clone());
                }
            }
        }
    }
    components.insert("schemas".into(), Value::Object(schemas));
    if !responses.is_empty() {
        components.insert("responses".into(), Value::Object(responses));
    }
    for (k, v) in other_sections {
        components.insert(k, Value::Object(v));
    }
    let mut schemes = Map::new();
    for (name, mut s) in std::mem::take(&mut b.schemes) {
        if let Some(scopes) = b.scheme_scopes.get(&name) {
            if let Some(flow) = s.pointer_mut("/flows/authorizationCode/scopes") {
                if let Some(obj) = flow.as_object_mut() {
                    for sc in scopes {
                        obj.entry(sc.clone())
                            .or_insert_with(|| Value::String(scope_description(sc)));
                    }
                }
            }
        }
        schemes.insert(name, s);
    }
    if !schemes.is_empty() {
        components.insert("securitySchemes".into(), Value::Object(schemes));
    }

    let title = cfg
        .portal
        .as_ref()
        .and_then(|p| p.title.clone())
        .unwrap_or_else(|| "caregate APIs".into());
    let mut description = String::from(
        "The APIs served by this caregate gateway, built from its route table and the backends' \
         FHIR CapabilityStatements. Errors on FHIR routes are FHIR `OperationOutcome`s \
         (`application/fhir+json`), elsewhere RFC 9457 `application/problem+json`; both carry a \
         stable `reason` code and the request id.",
    );
    if portal_env(cfg) == Environment::Sandbox {
        description.push_str(
            "\n\nThis is a **sandbox**: synthetic data only, sandbox credentials only; draft \
             versions are listed.",
        );
    }
    for n in &b.notes {
        description.push_str("\n\n");
        description.push_str(n);
    }
    let mut paths = Map::new();
    for (p, item) in std::mem::take(&mut b.paths) {
        paths.insert(p, Value::Object(item));
    }
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": "",
            "description": description,
        },
        "servers": servers(cfg),
        "tags": b.tags,
        "paths": paths,
        "components": components,
    });
    // The version: a hash of the content, so two replicas with the same config and backends
    // announce the same version, and any change of the document changes it.
    let digest = hex::encode(Sha256::digest(doc.to_string().as_bytes()));
    if let Some(v) = doc.pointer_mut("/info/version") {
        *v = Value::String(format!("sha256:{}", &digest[..16]));
    }
    doc
}

/// OpenAPI `servers`: `portal.servers`, or the portal listener's own address.
fn servers(cfg: &Config) -> Value {
    let Some(p) = &cfg.portal else {
        return json!([]);
    };
    if !p.servers.is_empty() {
        return Value::Array(p.servers.iter().map(|u| json!({ "url": u })).collect());
    }
    match cfg.listeners.iter().find(|l| l.name == p.listener) {
        Some(l) => {
            json!([{ "url": listener_url(l), "description": format!("listener `{}`", l.name) }])
        }
        None => json!([]),
    }
}

fn listener_url(l: &crate::config::ListenerConfig) -> String {
    let scheme = if l.tls.is_some() { "https" } else { "http" };
    format!("{scheme}://{}", l.listen)
}

/// The issuers a route trusts, by index in `auth.issuers`.
fn route_issuers(cfg: &Config, r: &RouteConfig, jwt: &JwtAuthConfig) -> Vec<usize> {
    let sandbox = cfg
        .listeners
        .iter()
        .find(|l| l.name == r.listener)
        .is_some_and(|l| l.environment == Environment::Sandbox);
    cfg.auth
        .issuers
        .iter()
        .enumerate()
        .filter(|(_, i)| {
            if sandbox {
                i.sandbox
            } else {
                !i.sandbox
                    && jwt
                        .issuers
                        .as_ref()
                        .is_none_or(|names| names.iter().any(|n| n == &i.name))
            }
        })
        .map(|(n, _)| n)
        .collect()
}

/// The route's filters: its listener's first, then its own.
fn chain<'c>(cfg: &'c Config, r: &'c RouteConfig) -> impl Iterator<Item = &'c FilterSpec> {
    cfg.listeners
        .iter()
        .filter(move |l| l.name == r.listener)
        .flat_map(|l| l.filters.iter())
        .chain(r.filters.iter())
}

fn jwt_config(spec: &FilterSpec) -> Option<JwtAuthConfig> {
    let v = spec
        .config
        .clone()
        .unwrap_or_else(|| serde_yaml::Value::Mapping(Default::default()));
    serde_yaml::from_value(v).ok()
}

/// Every issuer some documented route trusts.
fn used_issuers(cfg: &Config, now: i64) -> BTreeSet<usize> {
    let mut out = BTreeSet::new();
    for (r, _) in documented_routes(cfg, now) {
        for spec in chain(cfg, r).filter(|s| s.kind == "jwt_auth") {
            if let Some(j) = jwt_config(spec) {
                if j.bearer != SourceMode::Off {
                    out.extend(route_issuers(cfg, r, &j));
                }
            }
        }
    }
    out
}

fn scope_description(s: &str) -> String {
    match s {
        "openid" => "OpenID Connect sign-in".into(),
        "fhirUser" => "The signed-in user's FHIR resource (`fhirUser` claim)".into(),
        "launch/patient" => "A patient context chosen at launch".into(),
        "offline_access" => "A refresh token".into(),
        _ => {
            let (ctx, rest) = s.split_once('/').unwrap_or(("", s));
            let who = match ctx {
                "patient" => "in the patient context",
                "user" => "that the user may see",
                "system" => "for a backend system",
                _ => "",
            };
            let (ty, perms) = rest.split_once('.').unwrap_or((rest, ""));
            let ty = if ty == "*" { "any resource type" } else { ty };
            let mut what = Vec::new();
            for c in perms.chars() {
                what.push(match c {
                    'c' => "create",
                    'r' => "read",
                    'u' => "update",
                    'd' => "delete",
                    's' => "search",
                    _ => "?",
                });
            }
            format!("SMART: {} {ty} {who}", what.join("/"))
                .trim()
                .to_string()
        }
    }
}

/// What the operations of a route share: tags, lifecycle, deprecation.
struct RouteMeta {
    tag: String,
    deprecated: bool,
    /// A paragraph on the API version's lifecycle, owner and docs.
    lifecycle: String,
    sunset: bool,
    /// A header parameter naming the version (header versioning), if any.
    version_param: Option<Value>,
    /// Response headers a deprecated version adds to every response.
    deprecation_headers: bool,
    /// The route's listener, when it is not the portal's (its own base URL).
    other_server: Option<String>,
}

impl Builder<'_> {
    fn route_meta(&mut self, r: &RouteConfig, eff: Option<Effective>) -> RouteMeta {
        let cfg = self.i.config;
        let other_server = match &cfg.portal {
            Some(p) if p.listener != r.listener => cfg
                .listeners
                .iter()
                .find(|l| l.name == r.listener)
                .map(listener_url),
            _ => None,
        };
        let Some(binding) = &r.api else {
            let tag = r.name.clone();
            self.add_tag(&tag, format!("Route `{}` (`{}`).", r.name, r.path_prefix));
            return RouteMeta {
                tag,
                deprecated: false,
                lifecycle: String::new(),
                sunset: false,
                version_param: None,
                deprecation_headers: false,
                other_server,
            };
        };
        let api = cfg.apis.get(binding.api_index);
        let version = api.and_then(|a| a.versions.get(binding.version_index));
        let eff = eff.unwrap_or(Effective::Live);
        let lc = &binding.lifecycle;
        let mut tag = format!("{} {}", binding.api, binding.version);
        if eff != Effective::Live {
            tag.push_str(&format!(" ({})", eff.as_str()));
        }
        let mut lines = vec![format!("**Lifecycle:** {}", eff.as_str())];
        if let Some(d) = lc.deprecated_at {
            lines.push(format!("**Deprecated from:** {}", http_date(d)));
        }
        if let Some(s) = lc.sunset {
            lines.push(format!(
                "**Sunset:** {} (from then on every request is answered `410 api_sunset`)",
                http_date(s)
            ));
        }
        if let Some(s) = version.and_then(|v| v.successor.as_ref()) {
            match &lc.successor_link {
                Some(l) => lines.push(format!("**Successor:** {s} (`{l}`)")),
                None => lines.push(format!("**Successor:** {s}")),
            }
        }
        if eff == Effective::Preview {
            lines.push(format!(
                "**Preview:** only for callers with one of the roles {}",
                lc.preview_roles.join(", ")
            ));
        }
        if let Some(o) = version
            .and_then(|v| v.owner.clone())
            .or_else(|| api.and_then(|a| a.owner.clone()))
        {
            lines.push(format!("**Owner:** {o}"));
        }
        if let Some(d) = version
            .and_then(|v| v.docs.clone())
            .or_else(|| api.and_then(|a| a.docs.clone()))
        {
            lines.push(format!("**Docs:** {d}"));
        }
        let versioning = api.map(|a| a.versioning).unwrap_or_default();
        match versioning {
            Versioning::Path => {}
            Versioning::Header => lines.push(format!(
                "**Version selection:** send `API-Version: {}`{}",
                binding.version,
                if matches!(binding.select, VersionSelect::Header { default: true }) {
                    " (the default version when no header is sent)"
                } else {
                    ""
                }
            )),
            Versioning::MediaType => lines.push(format!(
                "**Version selection:** send `Accept: application/fhir+json; version={}`{}",
                binding.version,
                if matches!(binding.select, VersionSelect::MediaType { default: true }) {
                    " (the default version when no version is named)"
                } else {
                    ""
                }
            )),
        }
        let lifecycle = lines.join("  \n");
        let mut tag_desc = String::new();
        if let Some(a) = api {
            tag_desc.push_str(a.title.as_deref().unwrap_or(&a.name));
            tag_desc.push_str(&format!(", version {}.", binding.version));
            if let Some(d) = &a.description {
                tag_desc.push_str("\n\n");
                tag_desc.push_str(d);
            }
        }
        tag_desc.push_str("\n\n");
        tag_desc.push_str(&lifecycle);
        self.add_tag(&tag, tag_desc);
        let version_param = match versioning {
            Versioning::Header => Some(json!({
                "name": "API-Version",
                "in": "header",
                "required": !matches!(binding.select, VersionSelect::Header { default: true }),
                "description": "The API version this request is for.",
                "schema": { "type": "string", "enum": [binding.version.as_ref()] },
            })),
            _ => None,
        };
        RouteMeta {
            tag,
            deprecated: eff == Effective::Deprecated,
            lifecycle,
            sunset: lc.sunset.is_some(),
            version_param,
            deprecation_headers: eff == Effective::Deprecated || lc.deprecated_at.is_some(),
            other_server,
        }
    }

    fn add_tag(&mut self, name: &str, description: String) {
        if self.tag_names.insert(name.to_string()) {
            self.tags
                .push(json!({ "name": name, "description": description }));
        }
    }

    /// The route's security requirements, registering the schemes they use.
    fn security(&mut self, r: &RouteConfig, issuer_count: usize) -> RouteSecurity {
        let cfg = self.i.config;
        let jwt = chain(cfg, r)
            .filter(|s| s.kind == "jwt_auth")
            .find_map(jwt_config);
        let scoped = chain(cfg, r).any(|s| s.kind == "smart_scopes");
        let Some(jwt) = jwt else {
            return RouteSecurity {
                requirements: Vec::new(),
                scoped: false,
            };
        };
        let smart_doc = chain(cfg, r)
            .filter(|s| s.kind == "smart_configuration")
            .find_map(|s| s.config.as_ref()?.get("document").cloned());
        let mut bearer_alts: Vec<String> = Vec::new();
        if jwt.bearer != SourceMode::Off {
            for ii in route_issuers(cfg, r, &jwt) {
                let Some(iss) = cfg.auth.issuers.get(ii) else {
                    continue;
                };
                let name = if issuer_count <= 1 {
                    "smart".to_string()
                } else {
                    format!("smart-{}", iss.name)
                };
                if !self.schemes.contains_key(&name) {
                    self.schemes
                        .insert(name.clone(), smart_scheme(iss, smart_doc.as_ref()));
                }
                bearer_alts.push(name);
            }
            if bearer_alts.is_empty() || !scoped {
                self.schemes.entry("bearer".into()).or_insert_with(|| {
                    json!({
                        "type": "http",
                        "scheme": "bearer",
                        "bearerFormat": "JWT",
                        "description": "A JWT access token of an issuer this route trusts (`Authorization: Bearer ...`).",
                    })
                });
                if !scoped {
                    bearer_alts.push("bearer".into());
                }
            }
        }
        let cert = jwt.client_certificate != SourceMode::Off;
        if cert {
            self.schemes.entry("mutualTLS".into()).or_insert_with(|| {
                json!({
                    "type": "mutualTLS",
                    "description": "A client certificate signed by the listener's client CA, mapped to a system in `auth.client_certificates`.",
                })
            });
        }
        let mut requirements: Vec<Value> = Vec::new();
        let cert_required = jwt.client_certificate == SourceMode::Required;
        for s in &bearer_alts {
            let mut req = Map::new();
            req.insert(s.clone(), json!([]));
            if cert_required {
                req.insert("mutualTLS".into(), json!([]));
            }
            requirements.push(Value::Object(req));
        }
        if jwt.bearer != SourceMode::Required {
            // No token needed: a certificate alone, or nothing.
            if cert {
                requirements.push(json!({ "mutualTLS": [] }));
            }
            if !cert_required {
                requirements.push(json!({}));
            }
        }
        RouteSecurity {
            requirements,
            scoped,
        }
    }

    /// The requirements of one operation: for scoped FHIR routes, per SMART context.
    fn op_security(&mut self, sec: &RouteSecurity, ty: Option<&str>, perms: &str) -> Value {
        if !sec.scoped {
            return Value::Array(sec.requirements.clone());
        }
        let ty = ty.unwrap_or("*");
        let mut out = Vec::new();
        for req in &sec.requirements {
            let Some(obj) = req.as_object() else {
                continue;
            };
            let smart = obj.keys().find(|k| k.starts_with("smart")).cloned();
            let Some(smart) = smart else {
                out.push(req.clone());
                continue;
            };
            for scopes in [
                vec![
                    format!("patient/{ty}.{perms}"),
                    "launch/patient".to_string(),
                ],
                vec![format!("user/{ty}.{perms}")],
                vec![format!("system/{ty}.{perms}")],
            ] {
                self.scheme_scopes
                    .entry(smart.clone())
                    .or_default()
                    .extend(scopes.iter().cloned());
                let mut o = obj.clone();
                o.insert(smart.clone(), json!(scopes));
                out.push(Value::Object(o));
            }
        }
        Value::Array(out)
    }

    fn unique_id(&mut self, base: String) -> String {
        let mut id = base.clone();
        let mut n = 2;
        while !self.op_ids.insert(id.clone()) {
            id = format!("{base}-{n}");
            n += 1;
        }
        id
    }

    /// Insert `op` at `path`/`method` unless one is there (the first route wins; later ones are
    /// named in its description).
    fn insert_op(
        &mut self,
        r: &RouteConfig,
        meta: &RouteMeta,
        path: &str,
        method: &str,
        op: Value,
    ) {
        let item = self.paths.entry(path.to_string()).or_default();
        if let Some(existing) = item.get_mut(method) {
            if let Some(d) = existing.get_mut("description") {
                if let Some(s) = d.as_str() {
                    *d = Value::String(format!(
                        "{s}\n\nAlso served by route `{}` (listener `{}`).",
                        r.name, r.listener
                    ));
                }
            }
            return;
        }
        if let Some(url) = &meta.other_server {
            item.entry("servers").or_insert_with(
                || json!([{ "url": url, "description": format!("listener `{}`", r.listener) }]),
            );
        }
        item.insert(method.to_string(), op);
    }

    fn allows(r: &RouteConfig, method: &str) -> bool {
        r.methods.is_empty() || r.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
    }

    /// The error responses of an operation.
    fn errors(
        &mut self,
        fhir: bool,
        meta: &RouteMeta,
        extra_410: Option<&str>,
    ) -> Map<String, Value> {
        let kind = if fhir {
            self.fhir_errors = true;
            "fhir"
        } else {
            self.problem_errors = true;
            "problem"
        };
        let mut m = Map::new();
        for s in ERROR_STATUSES {
            m.insert(
                s.to_string(),
                json!({ "$ref": format!("#/components/responses/{kind}-{s}") }),
            );
        }
        if meta.sunset || extra_410.is_some() {
            m.insert(
                "410".into(),
                json!({ "$ref": format!("#/components/responses/{kind}-410") }),
            );
        }
        m.insert(
            "default".into(),
            json!({ "$ref": format!("#/components/responses/{kind}-default") }),
        );
        m
    }

    /// Success response headers (a deprecated version's `Deprecation`, `Sunset`, `Link`).
    fn success_headers(meta: &RouteMeta, extra: Option<(&str, Value)>) -> Value {
        let mut h = Map::new();
        if meta.deprecation_headers {
            h.insert("Deprecation".into(), json!({ "description": "When this version was (or will be) deprecated (RFC 9745).", "schema": { "type": "string" } }));
            h.insert("Sunset".into(), json!({ "description": "When this version stops being served (RFC 8594).", "schema": { "type": "string" } }));
            h.insert("Link".into(), json!({ "description": "`rel=\"deprecation\"`, `\"sunset\"` and `\"successor-version\"` links.", "schema": { "type": "string" } }));
        }
        if let Some((k, v)) = extra {
            h.insert(k.into(), v);
        }
        Value::Object(h)
    }

    #[allow(clippy::too_many_arguments)]
    fn operation(
        &mut self,
        r: &RouteConfig,
        meta: &RouteMeta,
        id: String,
        summary: String,
        description: String,
        parameters: Vec<Value>,
        responses: Map<String, Value>,
        security: Value,
    ) -> Value {
        let mut desc = description;
        if !meta.lifecycle.is_empty() {
            desc.push_str("\n\n");
            desc.push_str(&meta.lifecycle);
        }
        let mut params = parameters;
        if let Some(p) = &meta.version_param {
            params.push(p.clone());
        }
        let mut op = json!({
            "operationId": self.unique_id(id),
            "summary": summary,
            "description": desc,
            "tags": [meta.tag],
            "responses": responses,
            "security": security,
        });
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if meta.deprecated {
            op["deprecated"] = Value::Bool(true);
        }
        op["x-caregate-route"] = Value::String(r.name.clone());
        op
    }

    fn fhir_route(&mut self, r: &RouteConfig, meta: &RouteMeta, sec: &RouteSecurity) {
        let caps = if r.pool.is_empty() {
            None
        } else {
            self.i.caps.get(&cap_key(r))
        };
        let prefix = r.path_prefix.clone();
        let fhir_json = "application/fhir+json";
        if Self::allows(r, "GET") {
            let mut resp = self.errors(true, meta, None);
            resp.insert("200".into(), json!({
                "description": "The server's CapabilityStatement.",
                "headers": Self::success_headers(meta, None),
                "content": { fhir_json: { "schema": { "$ref": "#/components/schemas/CapabilityStatement" } } },
            }));
            let op = self.operation(
                r,
                meta,
                format!("{}.capabilities", r.name),
                "The server's CapabilityStatement".into(),
                "What the FHIR server behind this route supports (`GET [base]/metadata`).".into(),
                Vec::new(),
                resp,
                Value::Array(Vec::new()),
            );
            self.insert_op(r, meta, &join(&prefix, "/metadata"), "get", op);
        }
        match caps {
            Some(caps) if !caps.resources.is_empty() => {
                for res in &caps.resources {
                    let t = res.type_name.as_str();
                    let has = |c: &str| res.interactions.iter().any(|i| i == c);
                    if has("read") && Self::allows(r, "GET") {
                        let mut resp = self.errors(true, meta, Some("deleted"));
                        resp.insert("200".into(), json!({
                            "description": format!("The {t}."),
                            "headers": Self::success_headers(meta, None),
                            "content": { fhir_json: { "schema": { "$ref": "#/components/schemas/Resource" } } },
                        }));
                        let sec_v = self.op_security(sec, Some(t), "rs");
                        let op = self.operation(
                            r,
                            meta,
                            format!("{}.read.{t}", r.name),
                            format!("Read a {t}"),
                            format!("FHIR read: the current version of the {t} with this id. A deleted resource is answered `410`."),
                            vec![id_param()],
                            resp,
                            sec_v,
                        );
                        self.insert_op(r, meta, &join(&prefix, &format!("/{t}/{{id}}")), "get", op);
                    }
                    if has("search-type") && Self::allows(r, "GET") {
                        let mut resp = self.errors(true, meta, None);
                        resp.insert("200".into(), json!({
                            "description": format!("A `searchset` Bundle of {t} resources."),
                            "headers": Self::success_headers(meta, None),
                            "content": { fhir_json: { "schema": { "$ref": "#/components/schemas/Bundle" } } },
                        }));
                        let params: Vec<Value> = res
                            .search_params
                            .iter()
                            .map(|(n, ty)| search_param(n, ty))
                            .collect();
                        let sec_v = self.op_security(sec, Some(t), "rs");
                        let op = self.operation(
                            r,
                            meta,
                            format!("{}.search.{t}", r.name),
                            format!("Search {t}"),
                            format!("FHIR search-type on {t}. The parameters are those the server's CapabilityStatement lists (modifiers and chained parameters are not listed)."),
                            params,
                            resp,
                            sec_v,
                        );
                        self.insert_op(r, meta, &join(&prefix, &format!("/{t}")), "get", op);
                    }
                    if has("create") && Self::allows(r, "POST") {
                        let mut resp = self.errors(true, meta, None);
                        resp.insert("201".into(), json!({
                            "description": format!("The {t} was created."),
                            "headers": Self::success_headers(meta, Some(("Location", json!({ "description": "The new resource's URL.", "schema": { "type": "string" } })))),
                            "content": { fhir_json: { "schema": { "$ref": "#/components/schemas/Resource" } } },
                        }));
                        let sec_v = self.op_security(sec, Some(t), "c");
                        let mut op = self.operation(
                            r,
                            meta,
                            format!("{}.create.{t}", r.name),
                            format!("Create a {t}"),
                            format!("FHIR create: a new {t}; the server assigns its id."),
                            Vec::new(),
                            resp,
                            sec_v,
                        );
                        op["requestBody"] = json!({
                            "required": true,
                            "content": { fhir_json: { "schema": {
                                "allOf": [ { "$ref": "#/components/schemas/NewResource" } ],
                                "properties": { "resourceType": { "const": t } },
                            } } },
                        });
                        self.insert_op(r, meta, &join(&prefix, &format!("/{t}")), "post", op);
                    }
                }
            }
            _ => {
                // No CapabilityStatement (yet): a generic pair with the type as a parameter.
                let type_param = json!({
                    "name": "type",
                    "in": "path",
                    "required": true,
                    "description": "A FHIR resource type (`Patient`, `Observation`, ...).",
                    "schema": { "type": "string", "pattern": "^[A-Z][A-Za-z]{1,63}$" },
                });
                if Self::allows(r, "GET") {
                    let mut resp = self.errors(true, meta, Some("deleted"));
                    resp.insert("200".into(), json!({
                        "description": "The resource.",
                        "headers": Self::success_headers(meta, None),
                        "content": { fhir_json: { "schema": { "$ref": "#/components/schemas/Resource" } } },
                    }));
                    let sec_v = self.op_security(sec, None, "rs");
                    let op = self.operation(
                        r,
                        meta,
                        format!("{}.read", r.name),
                        "Read a resource".into(),
                        "FHIR read. The backend's CapabilityStatement has not been fetched, so its resource types are not listed.".into(),
                        vec![type_param.clone(), id_param()],
                        resp,
                        sec_v,
                    );
                    self.insert_op(r, meta, &join(&prefix, "/{type}/{id}"), "get", op);
                    let mut resp = self.errors(true, meta, None);
                    resp.insert("200".into(), json!({
                        "description": "A `searchset` Bundle.",
                        "headers": Self::success_headers(meta, None),
                        "content": { fhir_json: { "schema": { "$ref": "#/components/schemas/Bundle" } } },
                    }));
                    let sec_v = self.op_security(sec, None, "rs");
                    let op = self.operation(
                        r,
                        meta,
                        format!("{}.search", r.name),
                        "Search resources of a type".into(),
                        "FHIR search-type.".into(),
                        vec![type_param],
                        resp,
                        sec_v,
                    );
                    self.insert_op(r, meta, &join(&prefix, "/{type}"), "get", op);
                }
            }
        }
    }

    fn plain_route(&mut self, r: &RouteConfig, meta: &RouteMeta, sec: &RouteSecurity) {
        let methods: Vec<String> = if r.methods.is_empty() {
            ["get", "post", "put", "patch", "delete"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            r.methods
                .iter()
                .map(|m| m.to_ascii_lowercase())
                .filter(|m| {
                    matches!(
                        m.as_str(),
                        "get" | "put" | "post" | "delete" | "options" | "patch" | "trace"
                    )
                })
                .collect()
        };
        let path = join(&r.path_prefix, "/{path}");
        for m in methods {
            let mut resp = self.errors(false, meta, None);
            resp.insert(
                "200".into(),
                json!({
                    "description": "The backend's answer.",
                    "headers": Self::success_headers(meta, None),
                    "content": { "*/*": { "schema": {} } },
                }),
            );
            let sec_v = Value::Array(sec.requirements.clone());
            let mut op = self.operation(
                r,
                meta,
                format!("{}.{m}", r.name),
                format!(
                    "{} {}/…",
                    m.to_ascii_uppercase(),
                    r.path_prefix.trim_end_matches('/')
                ),
                format!("Forwarded to pool `{}`.", r.pool),
                vec![json!({
                    "name": "path",
                    "in": "path",
                    "required": true,
                    "description": "The path below the route's prefix.",
                    "schema": { "type": "string" },
                })],
                resp,
                sec_v,
            );
            if matches!(m.as_str(), "post" | "put" | "patch") {
                op["requestBody"] = json!({ "content": { "*/*": { "schema": {} } } });
            }
            self.insert_op(r, meta, &path, &m, op);
        }
    }

    /// The API's own paths (as the backend serves them) under this route copy's prefix.
    fn merge_fragment_paths(
        &mut self,
        r: &RouteConfig,
        meta: &RouteMeta,
        sec: &RouteSecurity,
        frag: &Value,
    ) {
        let Some(paths) = frag.get("paths").and_then(Value::as_object) else {
            return;
        };
        let up = r.upstream_prefix.as_deref().unwrap_or(&r.path_prefix);
        let up = up.trim_end_matches('/');
        for (p, item) in paths {
            // A backend path under the route's upstream prefix maps to the route's prefix;
            // any other path is taken as relative to the route's prefix.
            let rest = if up.is_empty() {
                p.as_str()
            } else {
                p.strip_prefix(up)
                    .filter(|rest| rest.is_empty() || rest.starts_with('/'))
                    .unwrap_or(p.as_str())
            };
            if !(rest.is_empty() || rest.starts_with('/')) {
                continue;
            }
            let Some(item) = item.as_object() else {
                continue;
            };
            let path = join(&r.path_prefix, if rest.is_empty() { "" } else { rest });
            let path = if path.is_empty() {
                "/".to_string()
            } else {
                path
            };
            for (m, op) in item {
                let method = m.to_ascii_lowercase();
                if !matches!(
                    method.as_str(),
                    "get" | "put" | "post" | "delete" | "options" | "head" | "patch" | "trace"
                ) {
                    continue;
                }
                if !Self::allows(r, &method) {
                    continue;
                }
                let exists = self
                    .paths
                    .get(&path)
                    .is_some_and(|i| i.contains_key(&method));
                if exists {
                    continue;
                }
                let Some(src) = op.as_object() else {
                    continue;
                };
                let mut o = src.clone();
                let base_id = match src.get("operationId").and_then(Value::as_str) {
                    Some(id) => format!("{}.{id}", r.name),
                    None => format!("{}.{method}{}", r.name, rest.replace(['{', '}'], "")),
                };
                o.insert("operationId".into(), Value::String(self.unique_id(base_id)));
                o.insert("tags".into(), json!([meta.tag]));
                if meta.deprecated {
                    o.insert("deprecated".into(), Value::Bool(true));
                }
                if !o.contains_key("security") {
                    o.insert("security".into(), Value::Array(sec.requirements.clone()));
                }
                let mut desc = o
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                if !meta.lifecycle.is_empty() {
                    if !desc.is_empty() {
                        desc.push_str("\n\n");
                    }
                    desc.push_str(&meta.lifecycle);
                }
                o.insert("description".into(), Value::String(desc));
                let errs = self.errors(r.fhir, meta, None);
                let responses = o
                    .entry("responses")
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Some(resp) = responses.as_object_mut() {
                    for (k, v) in errs {
                        resp.entry(k).or_insert(v);
                    }
                }
                o.insert("x-caregate-route".into(), Value::String(r.name.clone()));
                // Path-level parameters of the fragment go with each operation.
                if let Some(pp) = item.get("parameters").and_then(Value::as_array) {
                    let params = o
                        .entry("parameters")
                        .or_insert_with(|| Value::Array(Vec::new()));
                    if let Some(a) = params.as_array_mut() {
                        for p in pp {
                            a.push(p.clone());
                        }
                    }
                }
                self.insert_op(r, meta, &path, &method, Value::Object(o));
            }
        }
    }
}

fn id_param() -> Value {
    json!({
        "name": "id",
        "in": "path",
        "required": true,
        "description": "The resource's logical id.",
        "schema": { "type": "string", "minLength": 1, "maxLength": 64, "pattern": FHIR_ID_PATTERN },
    })
}

/// One FHIR date search value: an optional comparator, then `YYYY[-MM[-DD[Thh:mm[:ss[.f]][tz]]]]`.
const DATE_VALUE: &str = "(eq|ne|lt|le|gt|ge|sa|eb)?[0-9]{4}(-[0-9]{2}(-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\\.[0-9]{1,9})?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?";
/// One FHIR number search value.
const NUMBER_VALUE: &str = "(eq|ne|lt|le|gt|ge|sa|eb|ap)?-?[0-9]+(\\.[0-9]+)?";

/// A FHIR search parameter as a query parameter (typed string). Its value is a
/// comma-separated list of alternatives (FHIR's OR; `\,` escapes a comma); empty alternatives
/// are skipped, and an empty parameter is ignored — but a list of only commas has no value.
fn search_param(name: &str, ty: &str) -> Value {
    let list = |v: &str| format!("^$|^,*{v}(,+{v})*,*$");
    let (pattern, what) = match ty {
        "date" => (
            list(DATE_VALUE),
            "dates, `YYYY[-MM[-DD[Thh:mm[:ss][Z|+hh:mm]]]]`, each optionally prefixed by `eq`, `ne`, `lt`, `le`, `gt`, `ge`, `sa` or `eb`",
        ),
        "number" => (list(NUMBER_VALUE), "numbers, each optionally prefixed by a comparator"),
        "token" => ("^$|[^,]".to_string(), "tokens: `code`, `system|code` or `|code`"),
        "reference" => (
            "^$|[^,]".to_string(),
            "references: `id`, `Type/id` or an absolute URL",
        ),
        "uri" => ("^$|[^,]".to_string(), "URIs"),
        _ => (
            "^$|[^,]".to_string(),
            "strings (matched case-insensitively from their start)",
        ),
    };
    json!({
        "name": name,
        "in": "query",
        "required": false,
        "description": format!("FHIR `{ty}` search parameter: one or more comma-separated {what}. An empty value is ignored."),
        "schema": { "type": "string", "pattern": pattern },
    })
}

/// The security scheme of one issuer: oauth2 with the route's SMART endpoints when known,
/// else OpenID Connect discovery.
fn smart_scheme(
    iss: &caregate_filters::builtin::jwt_auth::IssuerConfig,
    smart_doc: Option<&serde_yaml::Value>,
) -> Value {
    let ep = |k: &str| {
        smart_doc
            .and_then(|d| d.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let sandbox = if iss.sandbox {
        " A **sandbox** issuer: its tokens are accepted on sandbox listeners only."
    } else {
        ""
    };
    let mut scopes = Map::new();
    for s in [
        "openid",
        "fhirUser",
        "launch/patient",
        "offline_access",
        "patient/*.rs",
        "user/*.rs",
        "system/*.rs",
    ] {
        scopes.insert(s.into(), Value::String(scope_description(s)));
    }
    if let Some(list) = smart_doc
        .and_then(|d| d.get("scopes_supported"))
        .and_then(|v| v.as_sequence())
    {
        for s in list.iter().filter_map(|v| v.as_str()) {
            scopes
                .entry(s.to_string())
                .or_insert_with(|| Value::String(scope_description(s)));
        }
    }
    match (ep("authorization_endpoint"), ep("token_endpoint")) {
        (Some(auth), Some(token)) => json!({
            "type": "oauth2",
            "description": format!("SMART on FHIR (issuer `{}`).{sandbox}", iss.issuer),
            "flows": { "authorizationCode": {
                "authorizationUrl": auth,
                "tokenUrl": token,
                "scopes": scopes,
            } },
        }),
        _ => json!({
            "type": "openIdConnect",
            "description": format!("SMART on FHIR / OpenID Connect (issuer `{}`). Scopes: {}.{sandbox}", iss.issuer, scopes.keys().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")),
            "openIdConnectUrl": format!("{}/.well-known/openid-configuration", iss.issuer.trim_end_matches('/')),
        }),
    }
}

/// A component response for an error status (`None`: `default`).
fn error_response(fhir: bool, status: Option<u16>) -> Value {
    let reasons = match status {
        Some(400) => "`bad_request`, `bad_path`: a malformed request, path or FHIR parameter.",
        Some(401) => "`token_missing`, `token_invalid`, `token_expired`: no valid credentials. Carries `WWW-Authenticate: Bearer realm=...`.",
        Some(403) => "`insufficient_scope`, `role_denied`, `tenant_mismatch`, `patient_compartment`, `ip_not_allowed`: authenticated but not allowed.",
        Some(404) => "`not_found`, `route_not_found`: no such resource (or outside the caller's compartment), or no route.",
        Some(405) => "`method_not_allowed`: the route does not take this method. Carries `Allow`.",
        Some(410) => "`api_sunset`: this API version is past its sunset date; on FHIR reads also a deleted resource.",
        Some(413) => "`payload_too_large`: the body is too large.",
        Some(414) => "The URI is too long.",
        Some(429) => "`rate_limited`: too many requests. Carries `Retry-After`.",
        Some(431) => "The request's header section is too large.",
        Some(500) => "An unexpected error.",
        Some(502) => "`upstream_error`: the backend failed.",
        Some(503) => "`no_healthy_upstream`, `audit_unavailable`, `overloaded`: try again later (`Retry-After` when known).",
        Some(504) => "`upstream_timeout`: the backend did not answer in time.",
        _ => "Any other error, in the same shape.",
    };
    let mut headers = Map::new();
    match status {
        Some(401) => {
            headers.insert(
                "WWW-Authenticate".into(),
                json!({ "description": "RFC 6750 challenge.", "schema": { "type": "string" } }),
            );
        }
        Some(405) => {
            headers.insert("Allow".into(), json!({ "description": "The methods the route takes.", "schema": { "type": "string" } }));
        }
        Some(429) | Some(503) => {
            headers.insert(
                "Retry-After".into(),
                json!({ "description": "Seconds to wait.", "schema": { "type": "string" } }),
            );
        }
        _ => {}
    }
    let (ct, schema) = if fhir {
        (
            "application/fhir+json",
            "#/components/schemas/OperationOutcome",
        )
    } else {
        ("application/problem+json", "#/components/schemas/Problem")
    };
    let mut v = json!({
        "description": reasons,
        "content": { ct: { "schema": { "$ref": schema } } },
    });
    if !headers.is_empty() {
        v["headers"] = Value::Object(headers);
    }
    v
}

/// The generic FHIR and problem schemas.
fn base_schemas() -> Map<String, Value> {
    let v = json!({
        "Resource": {
            "type": "object",
            "description": "A FHIR R4 resource (described generically: see the FHIR specification for each type).",
            "required": ["resourceType", "id"],
            "properties": {
                "resourceType": { "type": "string" },
                "id": { "type": "string" },
                "meta": { "type": "object" },
            },
            "additionalProperties": true,
        },
        "NewResource": {
            "type": "object",
            "description": "A FHIR R4 resource to create (its id is assigned by the server).",
            "required": ["resourceType"],
            "properties": { "resourceType": { "type": "string" } },
            "additionalProperties": true,
        },
        "Bundle": {
            "type": "object",
            "description": "A FHIR Bundle (a `searchset` for searches).",
            "required": ["resourceType", "type"],
            "properties": {
                "resourceType": { "const": "Bundle" },
                "type": { "type": "string" },
                "total": { "type": "integer", "minimum": 0 },
                "link": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["relation", "url"],
                        "properties": { "relation": { "type": "string" }, "url": { "type": "string" } },
                    },
                },
                "entry": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "fullUrl": { "type": "string" },
                            "resource": {
                                "type": "object",
                                "required": ["resourceType"],
                                "properties": { "resourceType": { "type": "string" } },
                                "additionalProperties": true,
                            },
                            "search": { "type": "object" },
                        },
                    },
                },
            },
            "additionalProperties": true,
        },
        "CapabilityStatement": {
            "type": "object",
            "required": ["resourceType"],
            "properties": {
                "resourceType": { "const": "CapabilityStatement" },
                "fhirVersion": { "type": "string" },
                "rest": { "type": "array", "items": { "type": "object" } },
            },
            "additionalProperties": true,
        },
        "OperationOutcome": {
            "type": "object",
            "description": "A FHIR OperationOutcome. The gateway's own errors carry their reason code in `issue[0].details.coding[0].code` (system `https://caregate.dev/fhir/CodeSystem/reason`) and the request id in `issue[0].diagnostics`; never PHI, token contents or upstream error text.",
            "required": ["resourceType", "issue"],
            "properties": {
                "resourceType": { "const": "OperationOutcome" },
                "issue": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["severity", "code"],
                        "properties": {
                            "severity": { "enum": ["fatal", "error", "warning", "information"] },
                            "code": { "type": "string" },
                            "details": {
                                "type": "object",
                                "properties": {
                                    "coding": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": { "system": { "type": "string" }, "code": { "type": "string" } },
                                        },
                                    },
                                    "text": { "type": "string" },
                                },
                            },
                            "diagnostics": { "type": "string" },
                        },
                    },
                },
            },
            "additionalProperties": true,
        },
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details, with caregate's stable `reason` code and the `request_id`.",
            "required": ["type", "title", "status", "reason", "request_id"],
            "properties": {
                "type": { "type": "string", "description": "`https://caregate.dev/problems/{reason}`" },
                "title": { "type": "string" },
                "status": { "type": "integer" },
                "detail": { "type": "string" },
                "reason": { "type": "string", "description": "The stable snake_case reason code." },
                "request_id": { "type": "string" },
            },
            "additionalProperties": true,
        },
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}
