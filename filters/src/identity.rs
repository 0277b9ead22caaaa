//! Identity facts: who is calling and for which tenant.
//!
//! - [`PeerCertificate`] is written by the gateway (writer `"gateway"`) before any filter runs,
//!   when the listener verified a client certificate.
//! - [`Principal`] is written by `jwt_auth` only: the verified caller (token subject and/or the
//!   certificate's system identity). Policy filters (`rbac`, `tenant`, ...) read it.
//! - [`Tenant`] is written by `tenant` only: the verified tenant of the request; it can select
//!   the tenant's own upstream pool.

use serde::Deserialize;

/// A client certificate the listener verified against its client CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The subject as an RFC 4514-like string, e.g. `CN=lab-engine,O=Test Hospital`.
    pub subject: String,
    pub common_name: Option<String>,
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
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Token => "token",
            AuthMethod::ClientCertificate => "client_certificate",
            AuthMethod::TokenAndClientCertificate => "token+client_certificate",
        }
    }
}

/// The calling system named by a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The mapped system name (e.g. `lab-interface-engine`).
    pub name: String,
    pub certificate_subject: String,
    pub certificate_sha256: String,
}

/// The verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The actor: the token's subject, or the system name for certificate-only callers.
    pub subject: String,
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    /// The tenant claim (or the certificate mapping's tenant).
    pub tenant: Option<String>,
    /// Patient context (e.g. SMART's `patient` claim), only from issuers configured to carry it.
    pub patient: Option<String>,
    pub fhir_user: Option<String>,
    pub method: AuthMethod,
    /// The calling system, when a verified client certificate came with the request.
    pub system: Option<SystemIdentity>,
    /// Token expiry (seconds since the epoch).
    pub expires_at: Option<u64>,
}

impl Principal {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// The verified tenant of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: String,
    /// The tenant's own upstream pool, when configured.
    pub pool: Option<String>,
}

/// A tenant (hospital) of a multi-hospital organisation, as configured at the top of the gateway
/// config (`tenants:`) and handed to the filters that need it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: String,
    /// Host names that select this tenant.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// A path prefix that selects this tenant (e.g. `/hospital-a`).
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Issuers whose tokens may act for this tenant; empty = any configured issuer.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// The tenant's own upstream pool (must exist).
    #[serde(default)]
    pub pool: Option<String>,
}
