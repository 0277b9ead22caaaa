//! The organisation-wide `auth:` section of the gateway config: trusted token issuers, the
//! verified-token cache and client-certificate mappings. Plain data, handed to every filter
//! builder in the [`BuildContext`](crate::BuildContext); `jwt_auth` builds its key sets from it.

use serde::Deserialize;
use std::path::PathBuf;

/// Which claims of a verified token fill which fields of the
/// [`Principal`](crate::identity::Principal) (`auth.issuers[].claims`).
///
/// Each entry is a claim name or a dotted path into nested objects (`realm_access.roles`). A
/// single-valued claim counts only when it is a non-empty string; a list claim may be an array of
/// strings or one space-separated string. Every field has a default, so the whole section may be
/// left out.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimMapping {
    /// The claim holding the caller's subject ([`Principal::subject`]). Default `sub`. A token
    /// without it is refused.
    ///
    /// [`Principal::subject`]: crate::identity::Principal::subject
    #[serde(default = "d_sub")]
    pub subject: String,
    /// The claim holding the OAuth client id ([`Principal::client_id`]); `azp` is tried when it
    /// is absent. Default `client_id`.
    ///
    /// [`Principal::client_id`]: crate::identity::Principal::client_id
    #[serde(default = "d_client_id")]
    pub client_id: String,
    /// The claim holding the roles ([`Principal::roles`]): a claim path (`realm_access.roles`)
    /// holding an array or a space-separated string. Default `roles`; a token without it has no
    /// roles.
    ///
    /// [`Principal::roles`]: crate::identity::Principal::roles
    #[serde(default = "d_roles")]
    pub roles: String,
    /// The claim holding the scopes ([`Principal::scopes`]): an array or a space-separated
    /// string. By default (`None`) `scope` is read, and `scp` when `scope` yields no scope.
    ///
    /// [`Principal::scopes`]: crate::identity::Principal::scopes
    #[serde(default)]
    pub scopes: Option<String>,
    /// The claim holding the caller's tenant ([`Principal::tenant`], what the `tenant` filter
    /// checks). Default `tenant`.
    ///
    /// [`Principal::tenant`]: crate::identity::Principal::tenant
    #[serde(default = "d_tenant")]
    pub tenant: String,
    /// The claim carrying the patient context (e.g. SMART's `patient`). Without it, this issuer's
    /// tokens never carry a patient context. No default.
    #[serde(default)]
    pub patient: Option<String>,
    /// The claim holding the FHIR user ([`Principal::fhir_user`], e.g. `Practitioner/123`).
    /// Default `fhirUser` (SMART's claim).
    ///
    /// [`Principal::fhir_user`]: crate::identity::Principal::fhir_user
    #[serde(default = "d_fhir_user")]
    pub fhir_user: String,
}

impl Default for ClaimMapping {
    fn default() -> Self {
        ClaimMapping {
            subject: d_sub(),
            client_id: d_client_id(),
            roles: d_roles(),
            scopes: None,
            tenant: d_tenant(),
            patient: None,
            fhir_user: d_fhir_user(),
        }
    }
}

fn d_sub() -> String {
    "sub".into()
}
fn d_client_id() -> String {
    "client_id".into()
}
fn d_roles() -> String {
    "roles".into()
}
fn d_tenant() -> String {
    "tenant".into()
}
fn d_fhir_user() -> String {
    "fhirUser".into()
}

/// One trusted token issuer (an entry of the `auth.issuers` section of the gateway config).
///
/// An issuer that lists any asymmetric algorithm (`RS*`, `PS*`, `ES*`, `EdDSA`) needs exactly
/// one key source: `discovery: true`, `jwks_url` or `jwks_file`. An issuer that lists only HS
/// algorithms takes no key source and verifies with `hs_secret`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// A short, unique name: the `issuer` label of metrics and what routes' `issuers` lists
    /// refer to (tenants list `issuer` values).
    pub name: String,
    /// The exact `iss` value. A token is matched to its issuer by it (it must be unique); it is
    /// also what [`Principal::issuer`](crate::identity::Principal::issuer) holds.
    pub issuer: String,
    /// Find the JWKS through `{issuer}/.well-known/openid-configuration`: the discovery document
    /// must name this `issuer`, and its `jwks_uri` is fetched. Default `false`.
    #[serde(default)]
    pub discovery: bool,
    /// The URL (`http` or `https`) of the issuer's JWK Set.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// A file holding the issuer's JWK Set; a relative path resolves against the config file's
    /// folder. It is read at start and on every refresh.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Accepted algorithms (JWS names such as `RS256`, `ES256`, `EdDSA`, `HS256`); never taken
    /// from the token. At least one.
    pub algorithms: Vec<String>,
    /// Accepted audiences: a token's `aud` (a string or an array) must name at least one of
    /// them. At least one.
    pub audiences: Vec<String>,
    /// Claims that must be present besides `exp` (e.g. `sub`, `iat`). Default none.
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds. Default 30.
    #[serde(default = "d_leeway")]
    pub leeway_seconds: u64,
    /// Accepted `typ` header values, compared case-insensitively (`application/` prefix
    /// optional); a token without `typ` is accepted. Default `[JWT, at+jwt]`; must not be empty.
    #[serde(default = "d_typ")]
    pub typ: Vec<String>,
    /// Shared secret for HS256/384/512 (only then may HS algorithms be listed).
    #[serde(default)]
    pub hs_secret: Option<String>,
    /// How often the key set is fetched again in the background, in seconds; after a failed
    /// fetch it is tried again after at most 5 seconds. Default 300.
    #[serde(default = "d_refresh")]
    pub refresh_seconds: u64,
    /// At most one refresh for unknown `kid`s per this many seconds, so random kids cannot make
    /// the gateway hammer the identity provider. Default 10.
    #[serde(default = "d_kid_refresh")]
    pub unknown_kid_refresh_seconds: u64,
    /// How long, in seconds, the last good key set is trusted while the provider cannot be
    /// reached. Past it the issuer's tokens are refused and the gateway reports itself not ready.
    /// Default 86 400 (one day).
    #[serde(default = "d_stale")]
    pub max_stale_seconds: u64,
    /// CA bundle (PEM) for an identity provider with a private CA, used to fetch the discovery
    /// document and the key set; a relative path resolves against the config file's folder.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Timeout of each HTTP fetch (discovery document, key set), in milliseconds. Default 5000.
    #[serde(default = "d_fetch_timeout")]
    pub fetch_timeout_ms: u64,
    /// Which claims fill which fields of the principal. Default: [`ClaimMapping`]'s defaults.
    #[serde(default)]
    pub claims: ClaimMapping,
    /// A sandbox issuer (synthetic users of a sandbox environment): its tokens are accepted
    /// only on `environment: sandbox` listeners, where only sandbox issuers are trusted, and
    /// refused on every production listener. Default `false`.
    #[serde(default)]
    pub sandbox: bool,
}

fn d_leeway() -> u64 {
    30
}
fn d_typ() -> Vec<String> {
    vec!["JWT".into(), "at+jwt".into()]
}
fn d_refresh() -> u64 {
    300
}
fn d_kid_refresh() -> u64 {
    10
}
fn d_stale() -> u64 {
    86_400
}
fn d_fetch_timeout() -> u64 {
    5_000
}

/// A mapping from a verified client certificate to a system identity (an entry of
/// `auth.client_certificates`). Give exactly one of `common_name` and `subject`; `jwt_auth` uses
/// the first mapping that matches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertificateMapping {
    /// Match the certificate's subject common name exactly...
    #[serde(default)]
    pub common_name: Option<String>,
    /// ...or its whole subject, exactly as the gateway renders it
    /// ([`PeerCertificate::subject`](crate::identity::PeerCertificate::subject), e.g.
    /// `CN=lab-engine,O=Test Hospital`).
    #[serde(default)]
    pub subject: Option<String>,
    /// The system's name ([`SystemIdentity::name`](crate::identity::SystemIdentity::name)): the
    /// principal's subject for certificate-only callers.
    pub system: String,
    /// The tenant of a certificate-only caller. When a token arrives as well, the token's claims
    /// decide and this is ignored.
    #[serde(default)]
    pub tenant: Option<String>,
    /// The roles of a certificate-only caller. When a token arrives as well, the token's claims
    /// decide and these are ignored. Default none.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// Sizes of the verified-token cache (`auth.token_cache`): verified tokens, keyed by their
/// SHA-256, are kept until their `exp` so a token seen again costs no signature check; the
/// oldest entries are evicted first.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCacheConfig {
    /// At most this many tokens are cached; 0 disables the cache. Default 100 000.
    #[serde(default = "d_cache_entries")]
    pub max_entries: usize,
    /// At most this many bytes (an estimate of each entry's memory) are cached. Default
    /// 67 108 864 (64 MiB).
    #[serde(default = "d_cache_bytes")]
    pub max_bytes: usize,
}

impl Default for TokenCacheConfig {
    fn default() -> Self {
        TokenCacheConfig {
            max_entries: d_cache_entries(),
            max_bytes: d_cache_bytes(),
        }
    }
}

fn d_cache_entries() -> usize {
    100_000
}
fn d_cache_bytes() -> usize {
    64 * 1024 * 1024
}

/// The organisation-wide `auth:` section of the gateway config. Every part is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The trusted token issuers. Default none.
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
    /// Sizes of the verified-token cache shared by every `jwt_auth`. Default: the
    /// [`TokenCacheConfig`] defaults.
    #[serde(default)]
    pub token_cache: TokenCacheConfig,
    /// Mappings from verified client certificates to calling systems, tried in order. Default
    /// none.
    #[serde(default)]
    pub client_certificates: Vec<ClientCertificateMapping>,
}
