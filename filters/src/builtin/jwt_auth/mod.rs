//! `jwt_auth`: who is calling — bearer tokens (RFC 6750) and verified client certificates.
//!
//! Issuers are configured once for the organisation (`auth.issuers` in the gateway config: the
//! key source — JWKS file, JWKS URL or OIDC discovery —, allowed algorithms, audiences, claim
//! mapping, typ, leeway, refresh and staleness); each route's filter says which identity sources
//! it accepts or requires and which issuers it trusts:
//!
//! ```yaml
//! - kind: jwt_auth
//!   config:
//!     bearer: required            # required | optional | off
//!     client_certificate: off     # required | optional | off
//!     issuers: [patients-idp]     # default: every configured issuer
//!     realm: caregate
//!     max_token_bytes: 8192
//! ```
//!
//! The verified identity becomes the [`Principal`] fact (this filter is its only writer). When a
//! token and a verified client certificate both arrive, the token's subject is the actor and the
//! certificate names the calling system (`principal.system`). A certificate-only caller's
//! subject is its mapped system name (`auth.client_certificates`).
//!
//! Rejections: no token → 401 `token_missing` with a plain `Bearer realm=...` challenge; a bad,
//! oversized, unsigned or expired token → 401 `token_invalid` / `token_expired` with
//! `error="invalid_token"` (RFC 6750 §3.1); a required certificate missing or unmapped → 403
//! `client_certificate_required` / `client_certificate_unknown`. Never a 500, never a pass.
//! Repeat tokens are answered from a bounded cache of verified tokens (no signature check).

pub mod cache;
pub mod keys;
pub mod token;

use crate::ctx::writers;
use crate::identity::{AuthMethod, PeerCertificate, Principal, SystemIdentity};
use crate::registry::{parse_config, BuildContext, BuildError};
use crate::{
    BackgroundTask, Decision, Filter, FilterError, LocalReply, Mode, RequestCtx, RequestHeader,
    Result,
};
use async_trait::async_trait;
use http::{header, HeaderValue, StatusCode};
pub use keys::{AuthConfig, ClientCertificateMapping, IssuerConfig, IssuerSet};
use serde::Deserialize;
use std::sync::Arc;
use token::Rejection;

/// Whether an identity source is used on a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceMode {
    Required,
    Optional,
    Off,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtAuthConfig {
    #[serde(default = "d_required")]
    pub bearer: SourceMode,
    #[serde(default = "d_off")]
    pub client_certificate: SourceMode,
    /// Names of the issuers this route trusts; default all.
    #[serde(default)]
    pub issuers: Option<Vec<String>>,
    #[serde(default = "d_realm")]
    pub realm: String,
    #[serde(default = "d_max")]
    pub max_token_bytes: usize,
    #[serde(default)]
    pub mode: Mode,
}

fn d_required() -> SourceMode {
    SourceMode::Required
}
fn d_off() -> SourceMode {
    SourceMode::Off
}
fn d_realm() -> String {
    "caregate".into()
}
fn d_max() -> usize {
    8192
}

pub struct JwtAuthFilter {
    set: Arc<IssuerSet>,
    /// The production issuers this route trusts (never a sandbox issuer).
    allowed: Vec<usize>,
    /// Every sandbox issuer: what the route trusts on a sandbox listener, instead of `allowed`.
    sandbox_allowed: Vec<usize>,
    bearer: SourceMode,
    cert: SourceMode,
    challenge: String,
    max_token_bytes: usize,
    mode: Mode,
}

/// One refresh loop per issuer set, however many routes share it.
#[async_trait]
impl BackgroundTask for IssuerSet {
    async fn run(&self, shutdown: tokio::sync::watch::Receiver<bool>) {
        self.run_refresh(shutdown).await;
    }

    fn not_ready(&self) -> Option<String> {
        let missing = self.issuers_without_keys();
        (!missing.is_empty()).then(|| {
            format!(
                "no usable key set for issuer(s) {} (tokens from them cannot be verified)",
                missing.join(", ")
            )
        })
    }
}

pub fn build(
    config: serde_yaml::Value,
    cx: &BuildContext,
) -> std::result::Result<Arc<dyn Filter>, BuildError> {
    let c: JwtAuthConfig = parse_config(config)?;
    let set = cx
        .shared
        .get_or_init(|| {
            SharedIssuerSet(
                IssuerSet::build(&cx.auth, &|p| cx.resolve(p), Arc::new(keys::SystemClock))
                    .map(Arc::new),
            )
        })
        .0
        .clone()?;
    JwtAuthFilter::new(set, c).map(|f| Arc::new(f) as Arc<dyn Filter>)
}

/// The issuer set built once per config (by the first `jwt_auth`) and shared by every
/// `jwt_auth` route, or the error building it gave.
pub struct SharedIssuerSet(pub std::result::Result<Arc<IssuerSet>, BuildError>);

/// The issuer set the `jwt_auth` filters of this build context share, if one was built.
pub fn shared_issuer_set(
    cx: &BuildContext,
) -> Option<std::result::Result<Arc<IssuerSet>, BuildError>> {
    cx.shared.get::<SharedIssuerSet>().map(|s| s.0.clone())
}

impl JwtAuthFilter {
    pub fn new(set: Arc<IssuerSet>, c: JwtAuthConfig) -> std::result::Result<Self, BuildError> {
        if c.bearer == SourceMode::Off && c.client_certificate == SourceMode::Off {
            return Err(BuildError::new(
                "config",
                "turn on at least one identity source",
            ));
        }
        if c.bearer != SourceMode::Required
            && c.client_certificate != SourceMode::Required
            && (c.bearer == SourceMode::Off || c.client_certificate == SourceMode::Off)
        {
            return Err(BuildError::new(
                "config",
                "with a single identity source, make it `required`",
            ));
        }
        if c.bearer == SourceMode::Optional && c.client_certificate == SourceMode::Off {
            return Err(BuildError::new(
                "config.bearer",
                "`optional` needs client_certificate as the other source; use `required`",
            ));
        }
        if c.bearer != SourceMode::Off && set.is_empty() {
            return Err(BuildError::new(
                "config.bearer",
                "no issuers are configured (auth.issuers)",
            ));
        }
        let allowed = match &c.issuers {
            None => (0..set.len()).filter(|&i| !set.is_sandbox(i)).collect(),
            Some(names) => {
                let mut v = Vec::new();
                for (i, n) in names.iter().enumerate() {
                    let idx = set.index_of(n).ok_or_else(|| {
                        BuildError::new(
                            format!("config.issuers[{i}]"),
                            format!("no issuer named `{n}`"),
                        )
                    })?;
                    if set.is_sandbox(idx) {
                        return Err(BuildError::new(
                            format!("config.issuers[{i}]"),
                            format!("`{n}` is a sandbox issuer: its tokens are accepted on sandbox listeners only, where every sandbox issuer is trusted; do not name it"),
                        ));
                    }
                    v.push(idx);
                }
                v
            }
        };
        let sandbox_allowed = (0..set.len()).filter(|&i| set.is_sandbox(i)).collect();
        if c.max_token_bytes < 64 {
            return Err(BuildError::new(
                "config.max_token_bytes",
                "must be at least 64",
            ));
        }
        if !c
            .realm
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            return Err(BuildError::new(
                "config.realm",
                "use plain ASCII without quotes",
            ));
        }
        Ok(JwtAuthFilter {
            set,
            allowed,
            sandbox_allowed,
            bearer: c.bearer,
            cert: c.client_certificate,
            challenge: format!("Bearer realm=\"{}\"", c.realm),
            max_token_bytes: c.max_token_bytes,
            mode: c.mode,
        })
    }

    fn missing(&self) -> Decision {
        let mut r = LocalReply::error(
            StatusCode::UNAUTHORIZED,
            "token_missing",
            "this route needs a bearer token",
        );
        if let Ok(v) = HeaderValue::from_str(&self.challenge) {
            r = r.with_header(header::WWW_AUTHENTICATE, v);
        }
        Decision::Respond(r)
    }

    fn invalid(&self, why: Rejection) -> Decision {
        let mut r = LocalReply::error(StatusCode::UNAUTHORIZED, why.reason(), why.description());
        let value = format!(
            "{}, error=\"invalid_token\", error_description=\"{}\"",
            self.challenge,
            why.description()
        );
        if let Ok(v) = HeaderValue::from_str(&value) {
            r = r.with_header(header::WWW_AUTHENTICATE, v);
        }
        Decision::Respond(r)
    }

    fn map_certificate(
        &self,
        cert: &PeerCertificate,
    ) -> Option<(SystemIdentity, Option<String>, Vec<String>)> {
        let m = self
            .set
            .certs
            .iter()
            .find(|m| match (&m.common_name, &m.subject) {
                (Some(cn), _) => cert.common_name.as_deref() == Some(cn.as_str()),
                (None, Some(s)) => cert.subject == *s,
                (None, None) => false,
            })?;
        Some((
            SystemIdentity {
                name: m.system.clone(),
                certificate_subject: cert.subject.clone(),
                certificate_sha256: cert.sha256.clone(),
            },
            m.tenant.clone(),
            m.roles.clone(),
        ))
    }

    /// The bearer token of the request: `Ok(None)` when there is none, `Err` when the
    /// Authorization header is malformed or repeated.
    fn bearer_token(req: &RequestHeader) -> std::result::Result<Option<String>, Rejection> {
        let mut values = req.headers.get_all(header::AUTHORIZATION).iter();
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(Rejection::Malformed);
        }
        let v = first.to_str().map_err(|_| Rejection::Malformed)?;
        let Some((scheme, rest)) = v.split_once(' ') else {
            // A bare scheme with no credentials, or another scheme's token68.
            return if v.eq_ignore_ascii_case("bearer") {
                Err(Rejection::Malformed)
            } else {
                Ok(None)
            };
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Ok(None);
        }
        let t = rest.trim();
        if t.is_empty() || t.contains(' ') {
            return Err(Rejection::Malformed);
        }
        Ok(Some(t.to_string()))
    }
}

#[async_trait]
impl Filter for JwtAuthFilter {
    fn kind(&self) -> &'static str {
        "jwt_auth"
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    /// Provides the verified caller (it writes `Principal`, once per chain) and confines access
    /// to verified callers.
    fn declaration(&self) -> crate::Declaration {
        crate::Declaration::new()
            .provides(&[crate::Capability::Principal])
            .once()
            .confining()
    }

    fn background(&self) -> Option<Arc<dyn BackgroundTask>> {
        Some(self.set.clone())
    }

    async fn request_filter(
        &self,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        // The certificate side.
        let mut system = None;
        if self.cert != SourceMode::Off {
            match ctx.facts.get::<PeerCertificate>() {
                Some(cert) => match self.map_certificate(cert) {
                    Some(s) => system = Some(s),
                    None if self.cert == SourceMode::Required => {
                        return Ok(Decision::Respond(LocalReply::error(
                            StatusCode::FORBIDDEN,
                            "client_certificate_unknown",
                            "the client certificate is not mapped to a known system",
                        )))
                    }
                    None => {}
                },
                None if self.cert == SourceMode::Required => {
                    return Ok(Decision::Respond(LocalReply::error(
                        StatusCode::FORBIDDEN,
                        "client_certificate_required",
                        "this route needs a client certificate",
                    )))
                }
                None => {}
            }
        }

        // The token side.
        let mut principal = None;
        if self.bearer != SourceMode::Off {
            match Self::bearer_token(req) {
                Err(why) => return Ok(self.invalid(why)),
                Ok(None) => {
                    if self.bearer == SourceMode::Required || system.is_none() {
                        return Ok(self.missing());
                    }
                }
                Ok(Some(token)) => {
                    if token.len() > self.max_token_bytes {
                        return Ok(self.invalid(Rejection::TooLarge));
                    }
                    // A sandbox listener trusts the sandbox issuers only; every other
                    // listener never trusts them.
                    let allowed = if ctx.environment == caregate_filter_api::Environment::Sandbox {
                        &self.sandbox_allowed
                    } else {
                        &self.allowed
                    };
                    let key = cache::hash_token(&token);
                    let now = self.set.now();
                    let cached = self.set.cache.get(&key, now);
                    let p = match cached {
                        Some(p) => {
                            keys::TOKEN_CACHE.with_label_values(&["hit"]).inc();
                            let trusted = p
                                .issuer
                                .as_deref()
                                .and_then(|iss| {
                                    allowed
                                        .iter()
                                        .find(|i| self.set.issuer_value(**i) == Some(iss))
                                })
                                .is_some();
                            if !trusted {
                                return Ok(self.invalid(Rejection::UnknownIssuer));
                            }
                            p
                        }
                        None => {
                            keys::TOKEN_CACHE.with_label_values(&["miss"]).inc();
                            match self.set.verify(&token, self.max_token_bytes, allowed).await {
                                Ok((p, idx, kid, exp)) => {
                                    self.set.cache.insert(key, p.clone(), exp, idx, kid, now);
                                    p
                                }
                                Err(why) => return Ok(self.invalid(why)),
                            }
                        }
                    };
                    principal = Some(p);
                }
            }
        }

        let principal = match (principal, system) {
            (Some(mut p), Some((sys, _, _))) => {
                p.method = AuthMethod::TokenAndClientCertificate;
                p.system = Some(sys);
                p
            }
            (Some(p), None) => p,
            (None, Some((sys, tenant, roles))) => Principal {
                subject: sys.name.clone(),
                issuer: None,
                client_id: None,
                roles,
                scopes: Vec::new(),
                tenant,
                patient: None,
                fhir_user: None,
                method: AuthMethod::ClientCertificate,
                system: Some(sys),
                expires_at: None,
            },
            (None, None) => return Ok(self.missing()),
        };
        ctx.facts
            .insert(writers::JwtAuth, principal)
            .map_err(|e| FilterError {
                filter: "jwt_auth",
                message: e.to_string(),
            })?;
        Ok(Decision::Continue)
    }
}

#[cfg(test)]
mod tests;
