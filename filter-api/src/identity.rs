//! Identity facts: who is calling and for which tenant.
//!
//! - [`PeerCertificate`] is written by the gateway (writer `"gateway"`) before any filter runs,
//!   when the listener verified a client certificate.
//! - [`Principal`] is written by `jwt_auth` only: the verified caller (token subject and/or the
//!   certificate's system identity). Policy filters (`rbac`, `tenant`, ...) read it.
//! - [`Tenant`] is written by `tenant` only: the verified tenant of the request; it can select
//!   the tenant's own upstream pool.

use serde::Deserialize;

/// A client certificate the listener verified against its client CA. Written by the gateway
/// ([`writers::Gateway`](crate::ctx::writers::Gateway)) before any filter runs, on every request
/// of a connection that presented one; `jwt_auth` maps it to a [`SystemIdentity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The subject as an RFC 4514-like string, e.g. `CN=lab-engine,O=Test Hospital`: the
    /// attributes in the fixed order `CN`, `OU`, `O`, `L`, `ST`, `C`, with `,`, `+`, `=`, `\`,
    /// `"`, `;`, `<` and `>` in values escaped with a backslash.
    pub subject: String,
    /// The subject's (first) common name (`CN`), if any.
    pub common_name: Option<String>,
    /// The subject's (first) organisation (`O`), if any.
    pub organization: Option<String>,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub sha256: String,
}

/// How the principal was authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A bearer token.
    Token,
    /// A client certificate only.
    ClientCertificate,
    /// A bearer token on a connection with a verified client certificate.
    TokenAndClientCertificate,
}

impl AuthMethod {
    /// A stable name: `token`, `client_certificate` or `token+client_certificate` (the audit
    /// record's `auth_method` and the `x-caregate-auth-method` header sent upstream).
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Token => "token",
            AuthMethod::ClientCertificate => "client_certificate",
            AuthMethod::TokenAndClientCertificate => "token+client_certificate",
        }
    }
}

/// The calling system named by a client certificate: `jwt_auth` sets it in
/// [`Principal::system`] from the first mapping of `auth.client_certificates`
/// ([`ClientCertificateMapping`](crate::auth::ClientCertificateMapping)) that matches the
/// [`PeerCertificate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The mapped system name (e.g. `lab-interface-engine`); sent upstream as
    /// `x-caregate-system`.
    pub name: String,
    /// The certificate's subject ([`PeerCertificate::subject`]).
    pub certificate_subject: String,
    /// SHA-256 of the DER certificate, lower-case hex ([`PeerCertificate::sha256`]).
    pub certificate_sha256: String,
}

/// The verified caller. Written by `jwt_auth` only
/// ([`writers::JwtAuth`](crate::ctx::writers::JwtAuth)), from a verified token, a verified client
/// certificate, or both; policy filters (`rbac`, `tenant`, `smart_scopes`, ...) read it. The
/// claims are read as the issuer's [`ClaimMapping`](crate::auth::ClaimMapping) says. The gateway
/// sends parts of it upstream as `x-caregate-*` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The actor: the token's subject, or the system name for certificate-only callers.
    pub subject: String,
    /// The token's issuer: the configured exact `iss` value
    /// ([`IssuerConfig::issuer`](crate::auth::IssuerConfig::issuer)), not the issuer's short
    /// name. `None` for certificate-only callers.
    pub issuer: Option<String>,
    /// The OAuth client id (the mapped client id claim, else `azp`); `None` when the token has
    /// neither, and for certificate-only callers.
    pub client_id: Option<String>,
    /// The roles: the token's mapped roles claim, or the certificate mapping's roles for
    /// certificate-only callers.
    pub roles: Vec<String>,
    /// The token's scopes, one entry per scope; empty for certificate-only callers.
    pub scopes: Vec<String>,
    /// The tenant claim, or the certificate mapping's tenant for certificate-only callers.
    pub tenant: Option<String>,
    /// Patient context (e.g. SMART's `patient` claim), only from issuers configured to carry it.
    pub patient: Option<String>,
    /// The FHIR user (SMART's `fhirUser` claim by default, e.g. `Practitioner/123`), if the
    /// token carries it.
    pub fhir_user: Option<String>,
    /// How the caller was authenticated.
    pub method: AuthMethod,
    /// The calling system, when a verified client certificate came with the request.
    pub system: Option<SystemIdentity>,
    /// Token expiry (`exp`, seconds since the epoch); `None` for certificate-only callers.
    pub expires_at: Option<u64>,
}

impl Principal {
    /// Whether the caller holds `role` (exact, case-sensitive match).
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// The verified tenant of a request. Written by `tenant` only
/// ([`writers::Tenant`](crate::ctx::writers::Tenant)), once it found the tenant the request asks
/// for and checked that the verified caller belongs to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// The tenant's id ([`TenantConfig::id`]); sent upstream as `x-caregate-tenant`.
    pub id: String,
    /// The tenant's own upstream pool, when configured: the gateway then sends the request to
    /// it instead of the route's pool.
    pub pool: Option<String>,
}

/// A tenant (hospital) of a multi-hospital organisation, as configured at the top of the gateway
/// config (`tenants:`) and handed to the filters that need it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The tenant's id: the value a caller's tenant (token claim or certificate mapping) must
    /// equal, and what the `tenant` filter's header names. Unique and non-empty.
    pub id: String,
    /// Host names that select this tenant (compared lower-cased, without port or trailing
    /// dot). A host selects one tenant at most.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// A path prefix that selects this tenant (e.g. `/hospital-a`): the path equals it or
    /// continues it with `/` (never `/hospital-ab`).
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Issuers whose tokens may act for this tenant, by their exact `iss` value
    /// ([`IssuerConfig::issuer`](crate::auth::IssuerConfig::issuer), not the short name); empty =
    /// any configured issuer. Certificate-only callers have no issuer and are judged by their
    /// mapped tenant alone.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// The tenant's own upstream pool (must name a configured pool); copied into
    /// [`Tenant::pool`].
    #[serde(default)]
    pub pool: Option<String>,
}

/// What an emergency access may override. A filter honours one of these only if it reads the
/// [`Capability::BreakGlass`](crate::Capability::BreakGlass) capability and the claim's route
/// allows the override.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakGlassOverride {
    /// Tenant isolation across the hospitals of the organisation (`tenant`).
    Tenant,
    /// Masking of PHI (`fhir_mask`).
    Mask,
    /// Consent refusals (filters of one's own that honour it).
    Consent,
}

impl BreakGlassOverride {
    /// As written in config: `tenant`, `mask`, `consent`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakGlassOverride::Tenant => "tenant",
            BreakGlassOverride::Mask => "mask",
            BreakGlassOverride::Consent => "consent",
        }
    }
}

/// An emergency access (break-the-glass) in force for this request: an entitled caller claimed
/// it (or an earlier claim's grant covers this patient). Written by `break_glass` only
/// ([`writers::BreakGlass`](crate::ctx::writers::BreakGlass)). Filters that honour it record
/// what they overrode with [`BreakGlass::overrode`].
#[derive(Debug)]
pub struct BreakGlass {
    /// The HL7 PurposeOfUse code (e.g. `ETREAT`).
    pub purpose: String,
    /// The caller's free-text reason.
    pub reason: String,
    /// What this route lets an emergency access override.
    pub overrides: Vec<BreakGlassOverride>,
    /// True when an earlier claim's grant covers this request (no claim on it).
    pub from_grant: bool,
    /// What was overridden on this request (filled in by honouring filters).
    overrode: std::sync::Mutex<Vec<BreakGlassOverride>>,
}

impl BreakGlass {
    /// A decision to put in force.
    pub fn new(
        purpose: String,
        reason: String,
        overrides: Vec<BreakGlassOverride>,
        from_grant: bool,
    ) -> Self {
        BreakGlass {
            purpose,
            reason,
            overrides,
            from_grant,
            overrode: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Whether the route lets an emergency access override `what`.
    pub fn allows(&self, what: BreakGlassOverride) -> bool {
        self.overrides.contains(&what)
    }

    /// A filter overrode `what` for this request (recorded in the audit trail).
    pub fn overrode(&self, what: BreakGlassOverride) {
        let mut v = self.overrode.lock().unwrap_or_else(|e| e.into_inner());
        if !v.contains(&what) {
            v.push(what);
        }
    }

    /// What was overridden so far.
    pub fn overridden(&self) -> Vec<BreakGlassOverride> {
        self.overrode
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The caller could claim emergency access on this route but did not: a refusal may say so.
/// Written by `break_glass` only.
#[derive(Debug, Clone)]
pub struct BreakGlassAvailable {
    /// The request header that carries a claim.
    pub header: String,
    /// The accepted purposes.
    pub purposes: Vec<String>,
}

/// A refused claim of emergency access, and why (`not_entitled`, `patient_context`,
/// `purpose_not_accepted`, `bad_header`). Written by `break_glass` only.
#[derive(Debug, Clone, Copy)]
pub struct BreakGlassRefused {
    /// The reason code.
    pub reason: &'static str,
}
