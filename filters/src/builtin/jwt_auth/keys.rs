//! Issuers and their key sets: configuration, fetching (JWKS file, JWKS URL, OIDC discovery),
//! background and on-demand refresh, and signature verification.

use super::cache::TokenCache;
use super::token::{self, Parts, Rejection};
use crate::identity::{AuthMethod, Principal};
use crate::registry::BuildError;
pub use caregate_filter_api::auth::{
    AuthConfig, ClaimMapping, ClientCertificateMapping, IssuerConfig, TokenCacheConfig,
};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use once_cell::sync::Lazy;
use prometheus::{register_int_counter_vec, IntCounterVec};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[allow(clippy::expect_used)]
static JWKS_REFRESH: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_jwks_refresh_total",
        "Key set refreshes, by configured issuer name and result (ok|error).",
        &["issuer", "result"]
    )
    .expect("register caregate_jwks_refresh_total")
});

#[allow(clippy::expect_used)]
pub(crate) static TOKEN_CACHE: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_token_cache_total",
        "Verified-token cache lookups, by result (hit|miss).",
        &["result"]
    )
    .expect("register caregate_token_cache_total")
});

/// Seconds since the epoch. Tests substitute a manual clock.
pub trait Clock: Send + Sync {
    fn now(&self) -> u64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A clock that moves only when told (tests).
#[derive(Default)]
pub struct ManualClock(pub AtomicU64);

impl ManualClock {
    pub fn set(&self, t: u64) {
        self.0.store(t, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
    Okp,
    Hmac,
}

fn family(alg: Algorithm) -> Family {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Family::Rsa,
        Algorithm::ES256 | Algorithm::ES384 => Family::Ec,
        Algorithm::EdDSA => Family::Okp,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
        // Anything newer than this code is treated like a shared-secret algorithm: it can only
        // be listed with hs_secret, and no public key ever verifies it.
        _ => Family::Hmac,
    }
}

struct KeyEntry {
    kid: Option<String>,
    family: Family,
    alg: Option<String>,
    key: DecodingKey,
}

#[derive(Default)]
struct KeyState {
    keys: Vec<KeyEntry>,
    /// Clock time of the last successful fetch.
    last_success: Option<u64>,
}

enum Source {
    File(PathBuf),
    Url(String),
    Discovery(String),
    /// HS only: no key set to fetch.
    None,
}

struct Issuer {
    cfg: IssuerConfig,
    algorithms: Vec<Algorithm>,
    hs_key: Option<DecodingKey>,
    source: Source,
    client: Option<reqwest::Client>,
    state: RwLock<KeyState>,
    last_attempt: Mutex<Option<u64>>,
    fetch_lock: tokio::sync::Mutex<()>,
}

/// All trusted issuers with their key sets and the shared verified-token cache. Built once per
/// config and shared by every `jwt_auth` filter.
pub struct IssuerSet {
    issuers: Vec<Issuer>,
    pub(crate) cache: TokenCache,
    pub(crate) certs: Vec<ClientCertificateMapping>,
    clock: Arc<dyn Clock>,
}

fn err(path: String, msg: impl Into<String>) -> BuildError {
    BuildError::new(path, msg)
}

impl IssuerSet {
    /// Validate the `auth` section and build the set. `resolve` turns config-relative paths
    /// into real ones.
    pub fn build(
        cfg: &AuthConfig,
        resolve: &dyn Fn(&std::path::Path) -> PathBuf,
        clock: Arc<dyn Clock>,
    ) -> Result<IssuerSet, BuildError> {
        let mut issuers = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, ic) in cfg.issuers.iter().enumerate() {
            let at = format!("auth.issuers[{i}]");
            if ic.name.is_empty() || !names.insert(ic.name.clone()) {
                return Err(err(format!("{at}.name"), "must be present and unique"));
            }
            if ic.issuer.is_empty() {
                return Err(err(format!("{at}.issuer"), "must not be empty"));
            }
            if cfg.issuers[..i].iter().any(|o| o.issuer == ic.issuer) {
                return Err(err(
                    format!("{at}.issuer"),
                    "another issuer has the same `issuer` value",
                ));
            }
            if ic.audiences.is_empty() {
                return Err(err(
                    format!("{at}.audiences"),
                    "list at least one accepted audience",
                ));
            }
            if ic.algorithms.is_empty() {
                return Err(err(
                    format!("{at}.algorithms"),
                    "list the accepted algorithms",
                ));
            }
            let mut algorithms = Vec::new();
            for (a, name) in ic.algorithms.iter().enumerate() {
                let alg = Algorithm::from_str(name).map_err(|_| {
                    err(
                        format!("{at}.algorithms[{a}]"),
                        format!("unknown algorithm `{name}`"),
                    )
                })?;
                if family(alg) == Family::Hmac && ic.hs_secret.as_deref().unwrap_or("").is_empty() {
                    return Err(err(
                        format!("{at}.algorithms[{a}]"),
                        "HS algorithms need hs_secret (and are never verified with a public key)",
                    ));
                }
                algorithms.push(alg);
            }
            let sources = [ic.discovery, ic.jwks_url.is_some(), ic.jwks_file.is_some()]
                .iter()
                .filter(|b| **b)
                .count();
            let needs_keys = algorithms.iter().any(|a| family(*a) != Family::Hmac);
            if needs_keys && sources != 1 {
                return Err(err(
                    at.clone(),
                    "give exactly one key source: discovery: true, jwks_url or jwks_file",
                ));
            }
            if !needs_keys && sources != 0 {
                return Err(err(at.clone(), "an HS-only issuer takes no key set"));
            }
            let source = if ic.discovery {
                Source::Discovery(format!(
                    "{}/.well-known/openid-configuration",
                    ic.issuer.trim_end_matches('/')
                ))
            } else if let Some(u) = &ic.jwks_url {
                Source::Url(u.clone())
            } else if let Some(f) = &ic.jwks_file {
                Source::File(resolve(f))
            } else {
                Source::None
            };
            if let Source::Url(u) | Source::Discovery(u) = &source {
                if !(u.starts_with("https://") || u.starts_with("http://")) {
                    return Err(err(at.clone(), "key set URLs must be http(s)"));
                }
            }
            let client = match &source {
                Source::Url(_) | Source::Discovery(_) => {
                    let mut b = reqwest::Client::builder()
                        .timeout(Duration::from_millis(ic.fetch_timeout_ms.max(1)))
                        .redirect(reqwest::redirect::Policy::none());
                    if let Some(ca) = &ic.ca_file {
                        let pem = std::fs::read(resolve(ca)).map_err(|e| {
                            err(format!("{at}.ca_file"), format!("cannot read: {e}"))
                        })?;
                        let cert = reqwest::Certificate::from_pem(&pem)
                            .map_err(|_| err(format!("{at}.ca_file"), "not a PEM certificate"))?;
                        b = b.add_root_certificate(cert);
                    }
                    Some(
                        b.build()
                            .map_err(|e| err(at.clone(), format!("HTTP client: {e}")))?,
                    )
                }
                _ => None,
            };
            let hs_key = match &ic.hs_secret {
                Some(s) if !s.is_empty() => Some(
                    DecodingKey::from_secret(s.as_bytes())
                        .map_err(|_| err(format!("{at}.hs_secret"), "not a usable secret"))?,
                ),
                _ => None,
            };
            if ic.typ.is_empty() {
                return Err(err(format!("{at}.typ"), "list at least one accepted typ"));
            }
            issuers.push(Issuer {
                cfg: ic.clone(),
                algorithms,
                hs_key,
                source,
                client,
                state: RwLock::new(KeyState::default()),
                last_attempt: Mutex::new(None),
                fetch_lock: tokio::sync::Mutex::new(()),
            });
        }
        for (i, m) in cfg.client_certificates.iter().enumerate() {
            if m.common_name.is_some() == m.subject.is_some() {
                return Err(err(
                    format!("auth.client_certificates[{i}]"),
                    "give exactly one of common_name or subject",
                ));
            }
        }
        Ok(IssuerSet {
            issuers,
            cache: TokenCache::new(cfg.token_cache.max_entries, cfg.token_cache.max_bytes),
            certs: cfg.client_certificates.clone(),
            clock,
        })
    }

    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.issuers.iter().position(|i| i.cfg.name == name)
    }

    pub fn len(&self) -> usize {
        self.issuers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Whether issuer `idx` is a sandbox issuer (its tokens count on sandbox listeners only).
    pub fn is_sandbox(&self, idx: usize) -> bool {
        self.issuers.get(idx).is_some_and(|i| i.cfg.sandbox)
    }

    pub fn issuer_value(&self, idx: usize) -> Option<&str> {
        self.issuers.get(idx).map(|i| i.cfg.issuer.as_str())
    }

    /// Fetch one issuer's key set now. Keeps the last good set on failure.
    pub async fn refresh(&self, idx: usize) -> Result<usize, String> {
        let Some(issuer) = self.issuers.get(idx) else {
            return Err("no such issuer".into());
        };
        let _guard = issuer.fetch_lock.lock().await;
        if let Ok(mut last) = issuer.last_attempt.lock() {
            *last = Some(self.clock.now());
        }
        let result = self.fetch(issuer).await;
        let label = issuer.cfg.name.as_str();
        match result {
            Ok(keys) => {
                let n = keys.len();
                let removed: Vec<Option<String>> = {
                    let Ok(mut st) = issuer.state.write() else {
                        return Err("key state poisoned".into());
                    };
                    let removed = st
                        .keys
                        .iter()
                        .filter(|old| {
                            !keys
                                .iter()
                                .any(|k| k.kid == old.kid && k.family == old.family)
                        })
                        .map(|old| old.kid.clone())
                        .collect();
                    st.keys = keys;
                    st.last_success = Some(self.clock.now());
                    removed
                };
                if !removed.is_empty() {
                    self.cache.flush_keys(idx, Some(&removed));
                }
                JWKS_REFRESH.with_label_values(&[label, "ok"]).inc();
                Ok(n)
            }
            Err(e) => {
                JWKS_REFRESH.with_label_values(&[label, "error"]).inc();
                log::warn!("issuer {label}: key set refresh failed: {e}");
                Err(e)
            }
        }
    }

    async fn get_json(&self, issuer: &Issuer, url: &str) -> Result<Value, String> {
        let client = issuer.client.as_ref().ok_or("no HTTP client")?;
        let resp = client
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: status {}", resp.status()));
        }
        let bytes = resp.bytes().await.map_err(|e| format!("GET {url}: {e}"))?;
        if bytes.len() > 1024 * 1024 {
            return Err(format!("GET {url}: document too large"));
        }
        serde_json::from_slice(&bytes).map_err(|_| format!("GET {url}: not JSON"))
    }

    async fn fetch(&self, issuer: &Issuer) -> Result<Vec<KeyEntry>, String> {
        let doc = match &issuer.source {
            Source::None => return Ok(Vec::new()),
            Source::File(p) => {
                let text = tokio::fs::read_to_string(p)
                    .await
                    .map_err(|e| format!("{}: {e}", p.display()))?;
                serde_json::from_str::<Value>(&text)
                    .map_err(|_| format!("{}: not JSON", p.display()))?
            }
            Source::Url(u) => self.get_json(issuer, u).await?,
            Source::Discovery(u) => {
                let meta = self.get_json(issuer, u).await?;
                if meta.get("issuer").and_then(Value::as_str) != Some(issuer.cfg.issuer.as_str()) {
                    return Err("discovery document names another issuer".into());
                }
                let jwks_uri = meta
                    .get("jwks_uri")
                    .and_then(Value::as_str)
                    .ok_or("discovery document has no jwks_uri")?
                    .to_string();
                if !(jwks_uri.starts_with("https://") || jwks_uri.starts_with("http://")) {
                    return Err("jwks_uri is not http(s)".into());
                }
                self.get_json(issuer, &jwks_uri).await?
            }
        };
        parse_key_set(&doc)
    }

    /// Read and check every key set given as a file, as the gateway will at start: a missing,
    /// unreadable or malformed file, or one without a usable signing key, is an error naming
    /// the issuer's `jwks_file`. `caregate check` runs this.
    pub fn check_key_files(&self) -> Result<(), BuildError> {
        for (i, issuer) in self.issuers.iter().enumerate() {
            let Source::File(p) = &issuer.source else {
                continue;
            };
            let at = format!("auth.issuers[{i}].jwks_file");
            let text = std::fs::read_to_string(p)
                .map_err(|e| err(at.clone(), format!("cannot read {}: {e}", p.display())))?;
            let doc = serde_json::from_str::<Value>(&text)
                .map_err(|_| err(at.clone(), format!("{}: not JSON", p.display())))?;
            parse_key_set(&doc).map_err(|e| err(at.clone(), format!("{}: {e}", p.display())))?;
        }
        Ok(())
    }

    /// The issuers that cannot verify a token now: those with a key source whose key set has
    /// not been loaded yet (or was lost), or whose last good set is older than
    /// `max_stale_seconds`. The gateway is not ready while any is listed.
    pub fn issuers_without_keys(&self) -> Vec<String> {
        let now = self.clock.now();
        self.issuers
            .iter()
            .filter(|issuer| !matches!(issuer.source, Source::None))
            .filter(|issuer| match issuer.state.read() {
                Ok(st) => {
                    st.keys.is_empty()
                        || st
                            .last_success
                            .map(|t| now.saturating_sub(t) > issuer.cfg.max_stale_seconds)
                            .unwrap_or(true)
                }
                Err(_) => true,
            })
            .map(|issuer| issuer.cfg.name.clone())
            .collect()
    }
}

/// The usable signing keys of a JWK Set document.
fn parse_key_set(doc: &Value) -> Result<Vec<KeyEntry>, String> {
    {
        let list = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("key set has no `keys` array")?;
        let mut keys = Vec::new();
        for k in list {
            // Encryption keys and symmetric keys never verify tokens (RS/HS confusion).
            if k.get("use").and_then(Value::as_str) == Some("enc") {
                continue;
            }
            let Ok(jwk) = serde_json::from_value::<Jwk>(k.clone()) else {
                continue;
            };
            let fam = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Family::Rsa,
                AlgorithmParameters::EllipticCurve(_) => Family::Ec,
                AlgorithmParameters::OctetKeyPair(_) => Family::Okp,
                _ => continue,
            };
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            keys.push(KeyEntry {
                kid: jwk.common.key_id.clone(),
                family: fam,
                alg: k.get("alg").and_then(Value::as_str).map(str::to_string),
                key,
            });
        }
        if keys.is_empty() {
            return Err("key set holds no usable signing key".into());
        }
        Ok(keys)
    }
}

impl IssuerSet {
    /// Whether an unknown-kid refresh may run now (rate limit).
    fn may_refresh(&self, issuer: &Issuer) -> bool {
        let now = self.clock.now();
        match issuer.last_attempt.lock() {
            Ok(last) => match *last {
                None => true,
                Some(t) => now.saturating_sub(t) >= issuer.cfg.unknown_kid_refresh_seconds,
            },
            Err(_) => false,
        }
    }

    fn select_key(
        &self,
        issuer: &Issuer,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<Option<DecodingKey>, Rejection> {
        let fam = family(alg);
        if fam == Family::Hmac {
            return Ok(issuer.hs_key.clone());
        }
        let st = issuer.state.read().map_err(|_| Rejection::UnknownKey)?;
        if !matches!(issuer.source, Source::None) {
            match st.last_success {
                None => return Ok(None),
                Some(t) if self.clock.now().saturating_sub(t) > issuer.cfg.max_stale_seconds => {
                    return Err(Rejection::StaleKeys)
                }
                _ => {}
            }
        }
        let alg_name = format!("{alg:?}");
        let fits = |k: &&KeyEntry| {
            k.family == fam && k.alg.as_deref().map(|a| a == alg_name).unwrap_or(true)
        };
        let found: Vec<&KeyEntry> = match kid {
            Some(kid) => st
                .keys
                .iter()
                .filter(fits)
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            None => st.keys.iter().filter(fits).collect(),
        };
        match found.as_slice() {
            [one] => Ok(Some(one.key.clone())),
            _ => Ok(None),
        }
    }

    /// Verify a token completely; returns the principal, the issuer index, the kid and `exp`.
    /// `allowed` lists the issuers the route accepts.
    pub async fn verify(
        &self,
        token: &str,
        max_bytes: usize,
        allowed: &[usize],
    ) -> Result<(Principal, usize, Option<String>, u64), Rejection> {
        let parts: Parts = token::parse(token, max_bytes)?;
        let iss = match parts.claims.get("iss") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(Rejection::BadClaimType),
            None => return Err(Rejection::MissingClaim),
        };
        let idx = self
            .issuers
            .iter()
            .position(|i| i.cfg.issuer == iss)
            .filter(|i| allowed.contains(i))
            .ok_or(Rejection::UnknownIssuer)?;
        let issuer = &self.issuers[idx];
        let alg = Algorithm::from_str(&parts.alg).map_err(|_| Rejection::AlgNotAllowed)?;
        if !issuer.algorithms.contains(&alg) {
            return Err(Rejection::AlgNotAllowed);
        }
        token::check_typ(&parts.header, &issuer.cfg.typ)?;

        let mut key = self.select_key(issuer, alg, parts.kid.as_deref())?;
        if key.is_none() && !matches!(issuer.source, Source::None) && self.may_refresh(issuer) {
            // An unknown kid (or no keys yet): one rate-limited refresh, then try again.
            let _ = self.refresh(idx).await;
            key = self.select_key(issuer, alg, parts.kid.as_deref())?;
        }
        let key = key.ok_or(Rejection::UnknownKey)?;

        let mut validation = Validation::new(alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims = Default::default();
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => Rejection::BadSignature,
                    jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => Rejection::AlgNotAllowed,
                    _ => Rejection::BadSignature,
                }
            })?;
        let claims = data.claims;
        // Judge the verified claims, never the unverified copy.
        if claims.get("iss").and_then(Value::as_str) != Some(issuer.cfg.issuer.as_str()) {
            return Err(Rejection::UnknownIssuer);
        }
        let now = self.clock.now();
        let exp = token::check_times(&claims, now, issuer.cfg.leeway_seconds)?;
        token::check_audience(&claims, &issuer.cfg.audiences)?;
        for c in &issuer.cfg.required_claims {
            if !claims.contains_key(c) {
                return Err(Rejection::MissingClaim);
            }
        }
        let m = &issuer.cfg.claims;
        let subject = token::claim_string(&claims, &m.subject).ok_or(Rejection::MissingClaim)?;
        let scopes = match &m.scopes {
            Some(path) => token::claim_list(&claims, path),
            None => {
                let mut s = token::claim_list(&claims, "scope");
                if s.is_empty() {
                    s = token::claim_list(&claims, "scp");
                }
                s
            }
        };
        let principal = Principal {
            subject,
            issuer: Some(issuer.cfg.issuer.clone()),
            client_id: token::claim_string(&claims, &m.client_id)
                .or_else(|| token::claim_string(&claims, "azp")),
            roles: token::claim_list(&claims, &m.roles),
            scopes,
            tenant: token::claim_string(&claims, &m.tenant),
            patient: m
                .patient
                .as_deref()
                .and_then(|p| token::claim_string(&claims, p)),
            fhir_user: token::claim_string(&claims, &m.fhir_user),
            method: AuthMethod::Token,
            system: None,
            expires_at: Some(exp),
        };
        Ok((principal, idx, parts.kid, exp))
    }

    /// Run the background refresh of every issuer with a key source until shutdown.
    pub async fn run_refresh(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut next: Vec<u64> = vec![0; self.issuers.len()];
        loop {
            let now = self.clock.now();
            for (i, issuer) in self.issuers.iter().enumerate() {
                if matches!(issuer.source, Source::None) || now < next[i] {
                    continue;
                }
                let ok = self.refresh(i).await.is_ok();
                // After a failure, try again sooner than the regular period.
                let wait = if ok {
                    issuer.cfg.refresh_seconds
                } else {
                    issuer.cfg.refresh_seconds.min(5)
                };
                next[i] = self.clock.now().saturating_add(wait.max(1));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { return; }
                }
            }
        }
    }
}
