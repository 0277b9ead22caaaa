//! `tenant`: tenant isolation for a multi-hospital organisation. It finds the tenant a request
//! asks for, checks that the verified caller belongs to it, and writes the [`Tenant`] fact
//! (which can select the tenant's own upstream pool).
//!
//! ```yaml
//! tenants:                          # top level of the gateway config
//!   - { id: hospital-a, hosts: [a.example.org], path_prefix: /hospital-a,
//!       issuers: [https://idp-a.example.org], pool: hospital-a-fhir }
//!   - { id: hospital-b, hosts: [b.example.org], path_prefix: /hospital-b }
//! routes:
//!   - ...
//!     filters:
//!       - kind: jwt_auth
//!         config: { ... }
//!       - kind: tenant
//!         config:
//!           mode: enforce              # enforce | shadow | off (default enforce)
//!           resolve: [host, path, header]   # the order of the sources (this is the default)
//!           header: x-tenant-id        # the header of the `header` source (default x-tenant-id)
//! ```
//! The requested tenant comes from the first source, in `resolve` order, that names one:
//! - `host`: the `Host` header (or the URI's host), lower-cased, without port or trailing dot,
//!   equal to one of a tenant's `hosts`;
//! - `path`: the normalised path equals a tenant's `path_prefix` or continues it with `/`
//!   (`/hospital-a/fhir/Patient`, never `/hospital-ab`);
//! - `header`: the header's value is a tenant id. A header that is present but names no
//!   configured tenant (or is repeated) is refused outright.
//!
//! A request for which no source names a tenant is refused. Then the caller (the [`Principal`]
//! written by `jwt_auth`) must carry that tenant (`principal.tenant`, the token's claim or the
//! certificate mapping's tenant); a principal with an `issuer` must, when the tenant lists
//! `issuers`, come from one of them (certificate-only principals have no issuer and are judged by
//! their mapped tenant alone). On success the filter writes the [`Tenant`] fact, and on the
//! request that goes upstream it sets the tenant header to the verified tenant id, so a backend
//! that reads the header never sees a value the gateway did not check.
//!
//! Reason code: 403 `tenant_mismatch` (no tenant named, an unknown tenant header, no caller, no
//! tenant claim, another tenant's caller, or an issuer the tenant does not accept). Details never
//! name a tenant, subject or issuer.
//!
//! Build errors: no configured tenants, a tenant `pool` that is not a configured pool, two tenants
//! sharing an id, host or path prefix, a bad path prefix, an empty or repeated `resolve` entry,
//! or a bad header name.

use crate::ctx::writers;
use crate::identity::{
    BreakGlass, BreakGlassAvailable, BreakGlassOverride, Principal, Tenant, TenantConfig,
};
use crate::registry::{parse_config, BuildContext, BuildError};
use crate::{Decision, Filter, FilterError, LocalReply, Mode, RequestCtx, RequestHeader, Result};
use async_trait::async_trait;
use http::{header, HeaderName, HeaderValue, StatusCode};
use serde::Deserialize;
use std::sync::Arc;

/// Where the requested tenant is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Host,
    Path,
    Header,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantFilterConfig {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "default_resolve")]
    pub resolve: Vec<Source>,
    #[serde(default = "default_header")]
    pub header: String,
}

fn default_resolve() -> Vec<Source> {
    vec![Source::Host, Source::Path, Source::Header]
}

fn default_header() -> String {
    "x-tenant-id".to_string()
}

/// One configured tenant, prepared for matching.
#[derive(Debug)]
struct TenantEntry {
    id: String,
    hosts: Vec<String>,
    path_prefix: Option<String>,
    issuers: Vec<String>,
    pool: Option<String>,
}

pub struct TenantFilter {
    mode: Mode,
    resolve: Vec<Source>,
    header: HeaderName,
    tenants: Vec<TenantEntry>,
}

/// Lower-case, without a trailing dot.
fn canonical_host(h: &str) -> String {
    h.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// The host part of a `Host` value (`name[:port]`, `[v6]:port`), canonicalised.
fn host_without_port(h: &str) -> String {
    let h = h.trim();
    let name = if h.starts_with('[') {
        match h.find(']') {
            Some(end) => &h[..=end],
            None => h,
        }
    } else {
        match h.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => h,
        }
    };
    canonical_host(name)
}

fn compile_tenants(
    tenants: &[TenantConfig],
    pools: &[String],
) -> std::result::Result<Vec<TenantEntry>, BuildError> {
    if tenants.is_empty() {
        return Err(BuildError::new(
            "config",
            "the tenant filter needs at least one tenant in the top-level `tenants` section",
        ));
    }
    let mut out: Vec<TenantEntry> = Vec::with_capacity(tenants.len());
    for (i, t) in tenants.iter().enumerate() {
        if t.id.trim().is_empty() {
            return Err(BuildError::new(
                format!("tenants[{i}].id"),
                "must not be empty",
            ));
        }
        if out.iter().any(|o| o.id == t.id) {
            return Err(BuildError::new(
                format!("tenants[{i}].id"),
                format!("tenant id `{}` is configured twice", t.id),
            ));
        }
        if let Some(pool) = &t.pool {
            if !pools.contains(pool) {
                return Err(BuildError::new(
                    format!("tenants[{i}].pool"),
                    format!("`{pool}` is not a configured upstream pool"),
                ));
            }
        }
        let mut hosts = Vec::with_capacity(t.hosts.len());
        for (j, h) in t.hosts.iter().enumerate() {
            let host = canonical_host(h);
            if host.is_empty() || host.contains('/') || host_without_port(&host) != host {
                return Err(BuildError::new(
                    format!("tenants[{i}].hosts[{j}]"),
                    format!("`{h}` is not a host name (no scheme, port or path)"),
                ));
            }
            if out.iter().any(|o| o.hosts.contains(&host)) || hosts.contains(&host) {
                return Err(BuildError::new(
                    format!("tenants[{i}].hosts[{j}]"),
                    format!("host `{h}` selects more than one tenant"),
                ));
            }
            hosts.push(host);
        }
        let path_prefix = match &t.path_prefix {
            None => None,
            Some(p) => {
                let trimmed = p.trim_end_matches('/');
                if !p.starts_with('/') || trimmed.is_empty() || trimmed.contains("//") {
                    return Err(BuildError::new(
                        format!("tenants[{i}].path_prefix"),
                        format!("`{p}` is not a path prefix like `/hospital-a`"),
                    ));
                }
                if out
                    .iter()
                    .any(|o| o.path_prefix.as_deref() == Some(trimmed))
                {
                    return Err(BuildError::new(
                        format!("tenants[{i}].path_prefix"),
                        format!("path prefix `{p}` selects more than one tenant"),
                    ));
                }
                Some(trimmed.to_string())
            }
        };
        out.push(TenantEntry {
            id: t.id.clone(),
            hosts,
            path_prefix,
            issuers: t.issuers.clone(),
            pool: t.pool.clone(),
        });
    }
    Ok(out)
}

pub fn build(
    config: serde_yaml::Value,
    cx: &BuildContext,
) -> std::result::Result<Arc<dyn Filter>, BuildError> {
    let c: TenantFilterConfig = parse_config(config)?;
    if c.resolve.is_empty() {
        return Err(BuildError::new(
            "config.resolve",
            "name at least one source (host, path, header)",
        ));
    }
    for (i, s) in c.resolve.iter().enumerate() {
        if c.resolve[..i].contains(s) {
            return Err(BuildError::new(
                format!("config.resolve[{i}]"),
                "this source is listed twice",
            ));
        }
    }
    let header =
        HeaderName::from_bytes(c.header.trim().to_ascii_lowercase().as_bytes()).map_err(|_| {
            BuildError::new(
                "config.header",
                format!("`{}` is not a header name", c.header),
            )
        })?;
    let tenants = compile_tenants(&cx.tenants, &cx.pools)?;
    Ok(Arc::new(TenantFilter {
        mode: c.mode,
        resolve: c.resolve,
        header,
        tenants,
    }))
}

fn mismatch(detail: &'static str) -> Decision {
    Decision::Respond(LocalReply::error(
        StatusCode::FORBIDDEN,
        "tenant_mismatch",
        detail,
    ))
}

/// What one source says about the requested tenant.
enum Found<'a> {
    /// Nothing: try the next source.
    Nothing,
    Tenant(&'a TenantEntry),
    /// The source names something that is not a configured tenant.
    Unknown,
}

impl TenantFilter {
    fn by_host(&self, req: &RequestHeader) -> Found<'_> {
        let host = match req.headers.get(header::HOST) {
            Some(v) => match v.to_str() {
                Ok(s) => host_without_port(s),
                Err(_) => return Found::Nothing,
            },
            None => match req.uri.host() {
                Some(h) => canonical_host(h),
                None => return Found::Nothing,
            },
        };
        match self.tenants.iter().find(|t| t.hosts.contains(&host)) {
            Some(t) => Found::Tenant(t),
            None => Found::Nothing,
        }
    }

    fn by_path(&self, path: &str) -> Found<'_> {
        let hit = self.tenants.iter().find(|t| {
            t.path_prefix.as_deref().is_some_and(|p| {
                path.strip_prefix(p)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
        });
        match hit {
            Some(t) => Found::Tenant(t),
            None => Found::Nothing,
        }
    }

    fn by_header(&self, req: &RequestHeader) -> Found<'_> {
        let mut values = req.headers.get_all(&self.header).iter();
        let Some(value) = values.next() else {
            return Found::Nothing;
        };
        if values.next().is_some() {
            return Found::Unknown;
        }
        let Ok(id) = value.to_str() else {
            return Found::Unknown;
        };
        let id = id.trim();
        match self.tenants.iter().find(|t| t.id == id) {
            Some(t) => Found::Tenant(t),
            None => Found::Unknown,
        }
    }

    /// The tenant the request asks for, or the denial.
    fn requested<'a>(
        &'a self,
        req: &RequestHeader,
        ctx: &RequestCtx,
    ) -> std::result::Result<&'a TenantEntry, Decision> {
        for source in &self.resolve {
            let found = match source {
                Source::Host => self.by_host(req),
                Source::Path => self.by_path(&ctx.path),
                Source::Header => self.by_header(req),
            };
            match found {
                Found::Nothing => continue,
                Found::Tenant(t) => return Ok(t),
                Found::Unknown => {
                    return Err(mismatch("the request names an unknown tenant"));
                }
            }
        }
        Err(mismatch("the request does not name a tenant"))
    }

    fn caller_may_act(tenant: &TenantEntry, principal: Option<&Principal>) -> Option<Decision> {
        let Some(p) = principal else {
            return Some(mismatch("no authenticated caller"));
        };
        let Some(claimed) = &p.tenant else {
            return Some(mismatch("the caller carries no tenant"));
        };
        if *claimed != tenant.id {
            return Some(mismatch(
                "the caller does not belong to the requested tenant",
            ));
        }
        if let Some(issuer) = &p.issuer {
            if !tenant.issuers.is_empty() && !tenant.issuers.contains(issuer) {
                return Some(mismatch(
                    "the caller's issuer may not act for the requested tenant",
                ));
            }
        }
        None
    }
}

#[async_trait]
impl Filter for TenantFilter {
    fn kind(&self) -> &'static str {
        "tenant"
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    /// Needs the verified caller; provides the verified tenant (it writes `Tenant`, once per
    /// chain); confines access; honours emergency access (`break_glass`, when the chain has
    /// it, runs first).
    fn declaration(&self) -> crate::Declaration {
        use crate::Capability::{BreakGlass, Principal, Tenant};
        crate::Declaration::new()
            .needs(&[Principal])
            .reads(&[BreakGlass])
            .provides(&[Tenant])
            .once()
            .confining()
    }

    async fn request_filter(
        &self,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        let tenant = match self.requested(req, ctx) {
            Ok(t) => t,
            Err(denial) => return Ok(denial),
        };
        if let Some(denial) = Self::caller_may_act(tenant, ctx.facts.get::<Principal>()) {
            // Emergency access across the organisation's hospitals: only for a caller of the
            // organisation (authenticated, with a tenant of their own), and only where the
            // route lets it override tenant isolation.
            let own_tenant = ctx
                .facts
                .get::<Principal>()
                .is_some_and(|p| p.tenant.is_some());
            match ctx.facts.get::<BreakGlass>() {
                Some(bg) if own_tenant && bg.allows(BreakGlassOverride::Tenant) => {
                    bg.overrode(BreakGlassOverride::Tenant);
                }
                _ => {
                    if ctx.facts.get::<BreakGlassAvailable>().is_some() && own_tenant {
                        return Ok(mismatch(
                            "the caller does not belong to the requested tenant; emergency access (break-the-glass) may be claimed on this route",
                        ));
                    }
                    return Ok(denial);
                }
            }
        }
        ctx.facts
            .insert(
                writers::Tenant,
                Tenant {
                    id: tenant.id.clone(),
                    pool: tenant.pool.clone(),
                },
            )
            .map_err(|e| FilterError {
                filter: "tenant",
                message: e.to_string(),
            })?;
        Ok(Decision::Continue)
    }

    async fn upstream_request_filter(
        &self,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The client's requested-tenant header never goes upstream as sent: it is replaced by
        // the verified tenant, or removed when there is none (shadow mode).
        let verified = if ctx.facts.writer_of::<Tenant>() == Some("tenant") {
            ctx.facts.get::<Tenant>()
        } else {
            None
        };
        let Some(t) = verified else {
            while req.remove_header(&self.header).is_some() {}
            return Ok(());
        };
        let value = HeaderValue::from_str(&t.id).map_err(|_| FilterError {
            filter: "tenant",
            message: "the tenant id is not a valid header value".to_string(),
        })?;
        req.insert_header(self.header.clone(), value)
            .map_err(|_| FilterError {
                filter: "tenant",
                message: "cannot set the tenant header".to_string(),
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::identity::{AuthMethod, SystemIdentity};

    fn tenants() -> Vec<TenantConfig> {
        serde_yaml::from_str(
            "
- id: hospital-a
  hosts: [a.example.org, A-alt.Example.org.]
  path_prefix: /hospital-a/
  issuers: [https://idp-a.example.org]
  pool: pool-a
- id: hospital-b
  hosts: [b.example.org]
  path_prefix: /hospital-b
",
        )
        .unwrap()
    }

    fn cx() -> BuildContext {
        BuildContext {
            pools: vec!["default".into(), "pool-a".into()],
            tenants: tenants(),
            ..Default::default()
        }
    }

    fn filter(yaml: &str) -> Arc<dyn Filter> {
        build(serde_yaml::from_str(yaml).unwrap(), &cx()).unwrap()
    }

    fn build_err(yaml: &str, cx: &BuildContext) -> BuildError {
        build(serde_yaml::from_str(yaml).unwrap(), cx)
            .err()
            .unwrap()
    }

    fn token(tenant: Option<&str>, issuer: &str) -> Principal {
        Principal {
            subject: "user-1".into(),
            issuer: Some(issuer.into()),
            client_id: Some("portal".into()),
            roles: vec![],
            scopes: vec![],
            tenant: tenant.map(String::from),
            patient: None,
            fhir_user: None,
            method: AuthMethod::Token,
            system: None,
            expires_at: None,
        }
    }

    fn token_a() -> Principal {
        token(Some("hospital-a"), "https://idp-a.example.org")
    }

    fn token_b() -> Principal {
        token(Some("hospital-b"), "https://idp-b.example.org")
    }

    #[derive(Default)]
    struct Req<'a> {
        host: Option<&'a str>,
        path: &'a str,
        header: Option<&'a str>,
        principal: Option<Principal>,
    }

    struct Outcome {
        denial: Option<&'static str>,
        tenant: Option<Tenant>,
        forwarded_header: Option<String>,
    }

    async fn run(f: &Arc<dyn Filter>, r: Req<'_>) -> Outcome {
        let path = if r.path.is_empty() {
            "/fhir/Patient"
        } else {
            r.path
        };
        let mut ctx = RequestCtx::for_test("GET", path);
        if let Some(p) = r.principal {
            ctx.facts.insert(writers::JwtAuth, p).unwrap();
        }
        let mut req = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        if let Some(h) = r.host {
            req.insert_header("host", h).unwrap();
        }
        if let Some(h) = r.header {
            req.insert_header("x-tenant-id", h).unwrap();
        }
        let denial = match f.request_filter(&mut req, &mut ctx).await.unwrap() {
            Decision::Continue => None,
            Decision::Respond(reply) => {
                assert_eq!(reply.status, StatusCode::FORBIDDEN);
                assert!(!reply.detail.contains("hospital"), "{}", reply.detail);
                Some(reply.reason)
            }
        };
        f.upstream_request_filter(&mut req, &mut ctx).await.unwrap();
        Outcome {
            denial,
            tenant: ctx.facts.get::<Tenant>().cloned(),
            forwarded_header: req
                .headers
                .get("x-tenant-id")
                .map(|v| v.to_str().unwrap().to_string()),
        }
    }

    const DENY: Option<&str> = Some("tenant_mismatch");

    #[tokio::test]
    async fn two_tenant_matrix() {
        let f = filter("{}");
        let cases: Vec<(&str, Req<'_>, Option<&str>)> = vec![
            // own token, each source
            (
                "A by host",
                Req {
                    host: Some("a.example.org"),
                    principal: Some(token_a()),
                    ..Default::default()
                },
                None,
            ),
            (
                "A by host with port and case",
                Req {
                    host: Some("A.Example.ORG:8443"),
                    principal: Some(token_a()),
                    ..Default::default()
                },
                None,
            ),
            (
                "A by second host",
                Req {
                    host: Some("a-alt.example.org"),
                    principal: Some(token_a()),
                    ..Default::default()
                },
                None,
            ),
            (
                "A by path",
                Req {
                    host: Some("api.example.org"),
                    path: "/hospital-a/fhir/Patient",
                    principal: Some(token_a()),
                    ..Default::default()
                },
                None,
            ),
            (
                "A by bare prefix",
                Req {
                    path: "/hospital-a",
                    principal: Some(token_a()),
                    ..Default::default()
                },
                None,
            ),
            (
                "B by header",
                Req {
                    header: Some("hospital-b"),
                    principal: Some(token_b()),
                    ..Default::default()
                },
                None,
            ),
            (
                "B by host",
                Req {
                    host: Some("b.example.org"),
                    principal: Some(token_b()),
                    ..Default::default()
                },
                None,
            ),
            // the other tenant's token
            (
                "B token on A host",
                Req {
                    host: Some("a.example.org"),
                    principal: Some(token_b()),
                    ..Default::default()
                },
                DENY,
            ),
            (
                "A token on B path",
                Req {
                    path: "/hospital-b/fhir/Patient",
                    principal: Some(token_a()),
                    ..Default::default()
                },
                DENY,
            ),
            (
                "A token with B header",
                Req {
                    header: Some("hospital-b"),
                    principal: Some(token_a()),
                    ..Default::default()
                },
                DENY,
            ),
            // no tenant claim / no caller
            (
                "no claim",
                Req {
                    host: Some("a.example.org"),
                    principal: Some(token(None, "https://idp-a.example.org")),
                    ..Default::default()
                },
                DENY,
            ),
            (
                "no principal",
                Req {
                    host: Some("a.example.org"),
                    ..Default::default()
                },
                DENY,
            ),
            // spoofed header: a B caller on A's host cannot switch tenants with the header
            (
                "spoofed header",
                Req {
                    host: Some("a.example.org"),
                    header: Some("hospital-b"),
                    principal: Some(token_b()),
                    ..Default::default()
                },
                DENY,
            ),
            // host vs header disagreement: the host (first source) decides
            (
                "host wins over header",
                Req {
                    host: Some("a.example.org"),
                    header: Some("hospital-b"),
                    principal: Some(token_a()),
                    ..Default::default()
                },
                None,
            ),
            // unknown header value, and nothing naming a tenant
            (
                "unknown header",
                Req {
                    header: Some("hospital-z"),
                    principal: Some(token_a()),
                    ..Default::default()
                },
                DENY,
            ),
            (
                "header of other case",
                Req {
                    header: Some("HOSPITAL-A"),
                    principal: Some(token_a()),
                    ..Default::default()
                },
                DENY,
            ),
            (
                "no source",
                Req {
                    host: Some("api.example.org"),
                    principal: Some(token_a()),
                    ..Default::default()
                },
                DENY,
            ),
            (
                "prefix is not a segment",
                Req {
                    path: "/hospital-ab/fhir",
                    principal: Some(token_a()),
                    ..Default::default()
                },
                DENY,
            ),
        ];
        for (name, req, want) in cases {
            let out = run(&f, req).await;
            assert_eq!(out.denial, want, "{name}");
            assert_eq!(
                out.tenant.is_some(),
                want.is_none(),
                "{name}: fact only on success"
            );
        }
    }

    #[tokio::test]
    async fn fact_carries_the_pool_and_the_verified_tenant_goes_upstream() {
        let f = filter("{}");
        let out = run(
            &f,
            Req {
                host: Some("a.example.org"),
                header: Some("hospital-b"),
                principal: Some(token_a()),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(
            out.tenant,
            Some(Tenant {
                id: "hospital-a".into(),
                pool: Some("pool-a".into())
            })
        );
        assert_eq!(out.forwarded_header.as_deref(), Some("hospital-a"));

        let out = run(
            &f,
            Req {
                header: Some("hospital-b"),
                principal: Some(token_b()),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(
            out.tenant,
            Some(Tenant {
                id: "hospital-b".into(),
                pool: None
            })
        );

        // a refused request (shadow mode lets it on) gets no fact, and the unverified header
        // does not go upstream
        let out = run(
            &f,
            Req {
                header: Some("hospital-b"),
                principal: Some(token_a()),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(out.tenant, None);
        assert_eq!(out.forwarded_header, None);
    }

    #[tokio::test]
    async fn resolve_order_and_header_name_are_configurable() {
        // header first: the header decides even on another tenant's host
        let f = filter("{resolve: [header, host], header: X-Hospital}");
        let mut ctx = RequestCtx::for_test("GET", "/hospital-a/x");
        ctx.facts.insert(writers::JwtAuth, token_b()).unwrap();
        let mut req = RequestHeader::build("GET", b"/hospital-a/x", None).unwrap();
        req.insert_header("host", "a.example.org").unwrap();
        req.insert_header("x-hospital", "hospital-b").unwrap();
        assert!(matches!(
            f.request_filter(&mut req, &mut ctx).await.unwrap(),
            Decision::Continue
        ));
        f.upstream_request_filter(&mut req, &mut ctx).await.unwrap();
        assert_eq!(req.headers.get("x-hospital").unwrap(), "hospital-b");

        // only the path source: host and x-tenant-id are ignored
        let f = filter("{resolve: [path]}");
        let out = run(
            &f,
            Req {
                host: Some("a.example.org"),
                header: Some("hospital-a"),
                principal: Some(token_a()),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(out.denial, DENY);
        let out = run(
            &f,
            Req {
                path: "/hospital-b/fhir",
                header: Some("hospital-z"),
                principal: Some(token_b()),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(out.denial, None, "the header is not a source here");
    }

    #[tokio::test]
    async fn repeated_tenant_header_is_refused() {
        let f = filter("{resolve: [header]}");
        let mut ctx = RequestCtx::for_test("GET", "/");
        ctx.facts.insert(writers::JwtAuth, token_a()).unwrap();
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("x-tenant-id", "hospital-a").unwrap();
        req.append_header("x-tenant-id", "hospital-b").unwrap();
        match f.request_filter(&mut req, &mut ctx).await.unwrap() {
            Decision::Respond(r) => assert_eq!(r.reason, "tenant_mismatch"),
            Decision::Continue => panic!("must be refused"),
        }
    }

    #[tokio::test]
    async fn issuer_restriction() {
        let f = filter("{}");
        let a_host = |p: Principal| Req {
            host: Some("a.example.org"),
            principal: Some(p),
            ..Default::default()
        };
        // A accepts only idp-a
        let wrong_issuer = token(Some("hospital-a"), "https://idp-b.example.org");
        assert_eq!(run(&f, a_host(wrong_issuer)).await.denial, DENY);
        assert_eq!(run(&f, a_host(token_a())).await.denial, None);
        // B lists no issuers: any issuer may act for it
        let any_issuer = token(Some("hospital-b"), "https://idp-other.example.org");
        let out = run(
            &f,
            Req {
                host: Some("b.example.org"),
                principal: Some(any_issuer),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(out.denial, None);
        // a certificate-only principal has no issuer: judged by its mapped tenant
        let lab = Principal {
            subject: "lab-interface-engine".into(),
            issuer: None,
            method: AuthMethod::ClientCertificate,
            system: Some(SystemIdentity {
                name: "lab-interface-engine".into(),
                certificate_subject: "CN=lab".into(),
                certificate_sha256: "00".into(),
            }),
            ..token(Some("hospital-a"), "unused")
        };
        assert_eq!(run(&f, a_host(lab.clone())).await.denial, None);
        let lab_b = Principal {
            tenant: Some("hospital-b".into()),
            ..lab
        };
        assert_eq!(run(&f, a_host(lab_b)).await.denial, DENY);
    }

    #[tokio::test]
    async fn a_second_tenant_fact_is_an_internal_error() {
        let f = filter("{}");
        let mut ctx = RequestCtx::for_test("GET", "/");
        ctx.facts.insert(writers::JwtAuth, token_a()).unwrap();
        struct Other;
        impl crate::ctx::Writer for Other {
            const NAME: &'static str = "other";
        }
        ctx.facts
            .insert(
                Other,
                Tenant {
                    id: "hospital-a".into(),
                    pool: None,
                },
            )
            .unwrap();
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("host", "a.example.org").unwrap();
        let err = f.request_filter(&mut req, &mut ctx).await.err().unwrap();
        assert_eq!(err.filter, "tenant");
        // the other writer's fact does not reach the upstream header either
        f.upstream_request_filter(&mut req, &mut ctx).await.unwrap();
        assert!(req.headers.get("x-tenant-id").is_none());
    }

    #[test]
    fn mode_and_kind() {
        assert_eq!(filter("{}").mode(), Mode::Enforce);
        assert_eq!(filter("{mode: shadow}").mode(), Mode::Shadow);
        assert_eq!(filter("{mode: off}").mode(), Mode::Off);
        assert_eq!(filter("{}").kind(), "tenant");
    }

    #[test]
    fn build_errors() {
        let e = build_err("{}", &BuildContext::default());
        assert!(e.message.contains("at least one tenant"), "{e}");

        let no_pool = BuildContext {
            pools: vec!["default".into()],
            ..cx()
        };
        assert_eq!(build_err("{}", &no_pool).path, "tenants[0].pool");

        let with = |extra: &str| {
            let mut t = tenants();
            t.push(serde_yaml::from_str(extra).unwrap());
            BuildContext { tenants: t, ..cx() }
        };
        assert_eq!(
            build_err("{}", &with("{id: hospital-a}")).path,
            "tenants[2].id"
        );
        assert_eq!(
            build_err(
                "{}",
                &with("{id: c, hosts: [c.example.org, B.example.org]}")
            )
            .path,
            "tenants[2].hosts[1]"
        );
        assert_eq!(
            build_err("{}", &with("{id: c, hosts: ['c.example.org:443']}")).path,
            "tenants[2].hosts[0]"
        );
        assert_eq!(
            build_err("{}", &with("{id: c, path_prefix: /hospital-b/}")).path,
            "tenants[2].path_prefix"
        );
        assert_eq!(
            build_err("{}", &with("{id: c, path_prefix: /}")).path,
            "tenants[2].path_prefix"
        );
        assert_eq!(
            build_err("{}", &with("{id: c, path_prefix: c}")).path,
            "tenants[2].path_prefix"
        );

        assert_eq!(build_err("{resolve: []}", &cx()).path, "config.resolve");
        assert_eq!(
            build_err("{resolve: [host, path, host]}", &cx()).path,
            "config.resolve[2]"
        );
        assert_eq!(
            build_err("{resolve: [host, cookie]}", &cx()).path,
            "config.resolve[1]"
        );
        assert_eq!(
            build_err("{header: 'x tenant'}", &cx()).path,
            "config.header"
        );
        assert!(build_err("{headers: x}", &cx()).path.starts_with("config"));
    }

    #[test]
    fn registered_under_its_kind() {
        let spec = crate::FilterSpec {
            kind: "tenant".into(),
            config: Some(serde_yaml::from_str("resolve: [host]").unwrap()),
        };
        let f = crate::FilterRegistry::builtin()
            .build(&spec, &cx())
            .unwrap();
        assert_eq!(f.kind(), "tenant");
    }
}
