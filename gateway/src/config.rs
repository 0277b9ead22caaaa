//! The gateway's configuration: one strict YAML file.
//!
//! Unknown keys and wrong types are errors that name their place
//! (`routes[3].filters[1] (cors): config.allowed_origins[0]: ...`); cross-references (a route
//! naming a missing pool or listener, an unknown filter kind) fail at load. `${ENV_VAR}`
//! references are substituted before parsing; a missing variable is an error.

use caregate_filters::builtin::jwt_auth::AuthConfig;
use caregate_filters::identity::TenantConfig;
use caregate_filters::{BuildContext, Channel, Filter, FilterRegistry, FilterSpec, Mode};
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerSettings,
    #[serde(default)]
    pub admin: AdminConfig,
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    #[serde(default)]
    pub sandboxes: Vec<SandboxConfig>,
    /// Trusted token issuers, the verified-token cache, client-certificate mappings.
    #[serde(default)]
    pub auth: AuthConfig,
    /// The hospitals of a multi-hospital organisation.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// One JSON line per request, without PHI.
    #[serde(default)]
    pub access_log: crate::access_log::AccessLogConfig,
    /// The PHI audit trail; required when any route has `phi: true`.
    #[serde(default)]
    pub audit: Option<caregate_audit::AuditConfig>,
    /// Span export over OTLP/HTTP (needs the `otlp` cargo feature).
    #[serde(default)]
    pub otlp: Option<crate::otlp::OtlpConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Worker threads per listening service.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// How long SIGTERM waits for in-flight requests before the runtime stops.
    #[serde(default = "default_grace")]
    pub grace_period_seconds: u64,
    #[serde(default = "default_shutdown_timeout")]
    pub graceful_shutdown_timeout_seconds: u64,
    /// Peers whose `X-Forwarded-*` headers are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// Idle keep-alive timeout of downstream HTTP/1.1 connections.
    #[serde(default = "default_keepalive")]
    pub downstream_keepalive_seconds: u64,
    /// Bound on the request header section size the gateway forwards (431 beyond it).
    #[serde(default = "default_max_header_bytes")]
    pub max_request_header_bytes: usize,
    /// Read buffer of each downstream connection's socket. Pingora's default is 64 KiB per
    /// connection, which an idle keep-alive connection holds for its whole life; reads larger
    /// than the buffer bypass it, so a small one costs no throughput.
    #[serde(default = "default_read_buffer")]
    pub downstream_read_buffer_bytes: usize,
    /// Let a listener's worker threads steal each other's tasks (one multi-threaded runtime per
    /// listener). `false` gives each thread its own single-threaded runtime, as nginx workers
    /// are: cheaper per request, but a busy connection cannot move to an idle thread.
    #[serde(default = "default_work_stealing")]
    pub work_stealing: bool,
    /// Bound on each body the gateway holds whole: the request and response bodies of a whole
    /// exchange (asked for by filters that judge a body before anything is released, such as
    /// the patient compartment's response check) and a pre-read of a stored resource.
    #[serde(default = "default_max_exchange_body")]
    pub max_exchange_body_bytes: usize,
    /// Bound on the bodies all whole exchanges of the process hold at once. A whole exchange
    /// that would pass it is answered `503 overloaded` (`Retry-After: 1`) instead of growing the
    /// gateway's memory without bound under many concurrent large checks.
    #[serde(default = "default_max_exchange_memory")]
    pub max_exchange_memory_bytes: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            threads: default_threads(),
            grace_period_seconds: default_grace(),
            graceful_shutdown_timeout_seconds: default_shutdown_timeout(),
            trusted_proxies: Vec::new(),
            downstream_keepalive_seconds: default_keepalive(),
            max_request_header_bytes: default_max_header_bytes(),
            downstream_read_buffer_bytes: default_read_buffer(),
            work_stealing: default_work_stealing(),
            max_exchange_body_bytes: default_max_exchange_body(),
            max_exchange_memory_bytes: default_max_exchange_memory(),
        }
    }
}

fn default_threads() -> usize {
    2
}
fn default_grace() -> u64 {
    5
}
fn default_shutdown_timeout() -> u64 {
    5
}
fn default_keepalive() -> u64 {
    60
}
fn default_max_header_bytes() -> usize {
    32 * 1024
}
fn default_read_buffer() -> usize {
    4096
}
fn default_work_stealing() -> bool {
    true
}
fn default_max_exchange_body() -> usize {
    16 * 1024 * 1024
}
fn default_max_exchange_memory() -> usize {
    512 * 1024 * 1024
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// When set, every admin path but `/healthz` and `/readyz` needs `Authorization: Bearer`.
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub tls: Option<TlsListenerConfig>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token: None,
            tls: None,
        }
    }
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub channel: Channel,
    pub listen: SocketAddr,
    #[serde(default)]
    pub tls: Option<TlsListenerConfig>,
    /// Filters that run first on every route of this listener (e.g. an `ip_allow` for the whole
    /// internal channel).
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListenerConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle for client certificates (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a certificate (only with `client_ca`).
    #[serde(default)]
    pub require_client_cert: bool,
    /// Offer HTTP/2 by ALPN.
    #[serde(default = "yes")]
    pub h2: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// Name of the listener whose route table holds this route.
    pub listener: String,
    /// Host names this route answers (without port); empty = any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Path prefix, matched on whole segments (`/fhir` matches `/fhir` and `/fhir/...`).
    pub path_prefix: String,
    /// Methods; empty = any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// A FHIR route: errors are OperationOutcomes, `;` path parameters are refused.
    #[serde(default)]
    pub fhir: bool,
    /// The route carries PHI: tenant isolation on it may only run in `enforce` mode.
    #[serde(default)]
    pub phi: bool,
    pub pool: String,
    /// Replace `path_prefix` by this prefix upstream (e.g. `/v1/fhir` -> `/fhir`).
    #[serde(default)]
    pub upstream_prefix: Option<String>,
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    /// Zones in priority order: traffic goes to the first zone with a healthy backend.
    pub zones: Vec<ZoneConfig>,
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    #[serde(default)]
    pub timeouts: TimeoutConfig,
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
    /// Total attempts per request (first try + retries), across backends and zones.
    #[serde(default = "default_attempts")]
    pub max_attempts: usize,
}

fn default_attempts() -> usize {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    pub name: String,
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `ip:port` of the backend (no host names: Pingora resolves on the worker thread).
    #[serde(default)]
    pub address: Option<SocketAddr>,
    /// Or the name of a built-in `sandboxes` entry.
    #[serde(default)]
    pub sandbox: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: usize,
}

fn default_weight() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(default = "default_hc_path")]
    pub path: String,
    /// Host header of the probe.
    #[serde(default = "default_hc_host")]
    pub host: String,
    #[serde(default = "default_hc_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_hc_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_one")]
    pub consecutive_success: usize,
    #[serde(default = "default_two")]
    pub consecutive_failure: usize,
    #[serde(default = "default_expected")]
    pub expected_status: Vec<u16>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            path: default_hc_path(),
            host: default_hc_host(),
            interval_ms: default_hc_interval(),
            timeout_ms: default_hc_timeout(),
            consecutive_success: default_one(),
            consecutive_failure: default_two(),
            expected_status: default_expected(),
        }
    }
}

fn default_hc_path() -> String {
    "/healthz".into()
}
fn default_hc_host() -> String {
    "localhost".into()
}
fn default_hc_interval() -> u64 {
    2000
}
fn default_hc_timeout() -> u64 {
    1000
}
fn default_one() -> usize {
    1
}
fn default_two() -> usize {
    2
}
fn default_expected() -> Vec<u16> {
    vec![200]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutConfig {
    #[serde(default = "default_connect_ms")]
    pub connect_ms: u64,
    #[serde(default = "default_total_connect_ms")]
    pub total_connect_ms: u64,
    #[serde(default = "default_read_ms")]
    pub read_ms: u64,
    #[serde(default = "default_read_ms")]
    pub write_ms: u64,
    #[serde(default = "default_idle_ms")]
    pub idle_ms: u64,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            connect_ms: default_connect_ms(),
            total_connect_ms: default_total_connect_ms(),
            read_ms: default_read_ms(),
            write_ms: default_read_ms(),
            idle_ms: default_idle_ms(),
        }
    }
}

fn default_connect_ms() -> u64 {
    500
}
fn default_total_connect_ms() -> u64 {
    2000
}
fn default_read_ms() -> u64 {
    30_000
}
fn default_idle_ms() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// SNI and the name the backend certificate must carry.
    pub sni: String,
    /// CA bundle that signs the backends' certificates (default: the system store).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mTLS to the backend (e.g. the EHR).
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// The sandbox's own base URL (its links are built from it). Default:
    /// `http://{listen}/fhir`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Folder of FHIR JSON files (Bundles or resources) to load; relative to the config file.
    pub data_dir: PathBuf,
}

impl SandboxConfig {
    pub fn base_url(&self) -> String {
        self.base_url
            .clone()
            .unwrap_or_else(|| format!("http://{}/fhir", self.listen))
    }
}

/// A config error, with the place it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Replace `${NAME}` with the environment variable NAME. `$${` writes a literal `${`.
pub fn substitute_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(body) = after.strip_prefix("${") {
            let Some(end) = body.find('}') else {
                let line = text[..text.len() - rest.len() + pos].matches('\n').count() + 1;
                return err(format!("line {line}: unterminated ${{...}} reference"));
            };
            let name = &body[..end];
            let valid = !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !name.as_bytes()[0].is_ascii_digit();
            let line = text[..text.len() - rest.len() + pos].matches('\n').count() + 1;
            if !valid {
                return err(format!(
                    "line {line}: `${{{name}}}` is not a valid variable name"
                ));
            }
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => {
                    return err(format!(
                        "line {line}: environment variable {name} is not set"
                    ))
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Parse the YAML text of a config (after `${ENV}` substitution), naming the place of any error.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let text = substitute_env(text, |n| std::env::var(n).ok())?;
    // serde_yaml's errors name the place (`routes[3].filters[1]: unknown field ...`) and the
    // line and column.
    serde_yaml::from_str::<Config>(&text).map_err(|e| ConfigError(e.to_string()))
}

/// A fully validated configuration: the raw config plus everything built from it.
pub struct Loaded {
    pub config: Config,
    /// Filters of each route, in route order (index = route index).
    pub route_filters: Vec<Vec<Arc<dyn Filter>>>,
    /// Filters of each listener (index = listener index), run before the route's own.
    pub listener_filters: Vec<Vec<Arc<dyn Filter>>>,
    /// The directory relative paths are resolved against.
    pub base_dir: PathBuf,
}

impl Loaded {
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

/// Read, parse and validate a config file.
pub fn load_file(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    let base_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    load_str(&text, base_dir)
}

/// Parse and validate config text.
pub fn load_str(text: &str, base_dir: PathBuf) -> Result<Loaded, ConfigError> {
    let config = parse(text)?;
    let (route_filters, listener_filters) = validate(&config, &base_dir)?;
    Ok(Loaded {
        config,
        route_filters,
        listener_filters,
        base_dir,
    })
}

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

fn unique<'a>(
    what: &str,
    names: impl Iterator<Item = &'a str>,
) -> Result<HashSet<&'a str>, ConfigError> {
    let mut seen = HashSet::new();
    for (i, n) in names.enumerate() {
        if n.is_empty() {
            return err(format!("{what}[{i}].name: must not be empty"));
        }
        if !seen.insert(n) {
            return err(format!("{what}[{i}].name: duplicate name `{n}`"));
        }
    }
    Ok(seen)
}

/// Check cross-references and values; build every route's filters.
/// The filters built from a config: per route, and per listener.
pub type BuiltFilters = (Vec<Vec<Arc<dyn Filter>>>, Vec<Vec<Arc<dyn Filter>>>);

/// Check cross-references and values; build every route's and listener's filters.
pub fn validate(c: &Config, base_dir: &Path) -> Result<BuiltFilters, ConfigError> {
    if c.server.max_exchange_body_bytes == 0 {
        return err("server.max_exchange_body_bytes: must be positive");
    }
    if c.server.max_exchange_memory_bytes < c.server.max_exchange_body_bytes {
        return err("server.max_exchange_memory_bytes: must be at least max_exchange_body_bytes");
    }
    if c.server.threads == 0 {
        return err("server.threads: must be at least 1");
    }
    if c.listeners.is_empty() {
        return err("listeners: at least one listener is required");
    }
    let listeners = unique("listeners", c.listeners.iter().map(|l| l.name.as_str()))?;
    let pools = unique("pools", c.pools.iter().map(|p| p.name.as_str()))?;
    let sandboxes = unique("sandboxes", c.sandboxes.iter().map(|s| s.name.as_str()))?;
    unique("routes", c.routes.iter().map(|r| r.name.as_str()))?;

    let mut addrs: BTreeMap<SocketAddr, String> = BTreeMap::new();
    let mut bind = |addr: SocketAddr, who: String| -> Result<(), ConfigError> {
        if addr.port() != 0 {
            if let Some(other) = addrs.insert(addr, who.clone()) {
                return err(format!("{who}: address {addr} is already used by {other}"));
            }
        }
        Ok(())
    };
    bind(c.admin.listen, "admin.listen".into())?;
    if c.admin.token.as_deref() == Some("") {
        return err(
            "admin.token: is empty (an unset secret?); remove the key to run without a token",
        );
    }
    if let Some(tls) = &c.admin.tls {
        if tls.require_client_cert && tls.client_ca.is_none() {
            return err("admin.tls.require_client_cert: needs client_ca");
        }
    }
    for (i, l) in c.listeners.iter().enumerate() {
        bind(l.listen, format!("listeners[{i}].listen"))?;
        if let Some(tls) = &l.tls {
            if tls.require_client_cert && tls.client_ca.is_none() {
                return err(format!(
                    "listeners[{i}].tls.require_client_cert: needs client_ca"
                ));
            }
        }
    }
    for (i, s) in c.sandboxes.iter().enumerate() {
        bind(s.listen, format!("sandboxes[{i}].listen"))?;
        let base = s.base_url();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return err(format!("sandboxes[{i}].base_url: must be an http(s) URL"));
        }
    }

    for (i, p) in c.pools.iter().enumerate() {
        let at = format!("pools[{i}] ({})", p.name);
        if p.zones.is_empty() {
            return err(format!("{at}.zones: at least one zone is required"));
        }
        if p.max_attempts == 0 || p.max_attempts > 10 {
            return err(format!("{at}.max_attempts: must be between 1 and 10"));
        }
        unique(
            &format!("{at}.zones"),
            p.zones.iter().map(|z| z.name.as_str()),
        )?;
        let hc = &p.health_check;
        if !hc.path.starts_with('/') {
            return err(format!("{at}.health_check.path: must start with '/'"));
        }
        if hc.interval_ms < 100 || hc.timeout_ms == 0 {
            return err(format!(
                "{at}.health_check: interval_ms must be at least 100 and timeout_ms positive"
            ));
        }
        if hc.consecutive_success == 0 || hc.consecutive_failure == 0 {
            return err(format!(
                "{at}.health_check: consecutive thresholds must be at least 1"
            ));
        }
        if hc.expected_status.is_empty()
            || hc.expected_status.iter().any(|s| !(100..600).contains(s))
        {
            return err(format!(
                "{at}.health_check.expected_status: list HTTP status codes"
            ));
        }
        let t = &p.timeouts;
        if [
            t.connect_ms,
            t.total_connect_ms,
            t.read_ms,
            t.write_ms,
            t.idle_ms,
        ]
        .contains(&0)
        {
            return err(format!("{at}.timeouts: every timeout must be positive"));
        }
        if let Some(tls) = &p.tls {
            if tls.sni.trim().is_empty() {
                // Pingora turns certificate verification off for an empty SNI.
                return err(format!("{at}.tls.sni: must name the backend's certificate"));
            }
            if tls.client_cert.is_some() != tls.client_key.is_some() {
                return err(format!("{at}.tls: client_cert and client_key go together"));
            }
        }
        for (z, zone) in p.zones.iter().enumerate() {
            if zone.backends.is_empty() {
                return err(format!(
                    "{at}.zones[{z}].backends: at least one backend is required"
                ));
            }
            for (b, be) in zone.backends.iter().enumerate() {
                let place = format!("{at}.zones[{z}].backends[{b}]");
                match (&be.address, &be.sandbox) {
                    (Some(_), None) => {}
                    (None, Some(name)) => {
                        if !sandboxes.contains(name.as_str()) {
                            return err(format!("{place}.sandbox: no sandbox named `{name}`"));
                        }
                    }
                    _ => {
                        return err(format!(
                            "{place}: give exactly one of `address` or `sandbox`"
                        ))
                    }
                }
                if be.weight == 0 {
                    return err(format!("{place}.weight: must be at least 1"));
                }
            }
        }
    }

    let tenant_ids = unique("tenants", c.tenants.iter().map(|t| t.id.as_str()));
    let tenant_ids = tenant_ids.map_err(|e| ConfigError(e.0.replace(".name", ".id")))?;
    let _ = tenant_ids;
    for (i, t) in c.tenants.iter().enumerate() {
        let at = format!("tenants[{i}] ({})", t.id);
        if let Some(p) = &t.pool {
            if !pools.contains(p.as_str()) {
                return err(format!("{at}.pool: no pool named `{p}`"));
            }
        }
        for (j, iss) in t.issuers.iter().enumerate() {
            if !c.auth.issuers.iter().any(|x| x.issuer == *iss) {
                return err(format!(
                    "{at}.issuers[{j}]: `{iss}` is not the `issuer` of any auth.issuers entry"
                ));
            }
        }
        if let Some(prefix) = &t.path_prefix {
            if !prefix.starts_with('/') || prefix.len() < 2 || prefix.ends_with('/') {
                return err(format!("{at}.path_prefix: write it as /name"));
            }
        }
    }

    if let Some(a) = &c.audit {
        a.validate().map_err(ConfigError)?;
    }
    if let Some(o) = &c.otlp {
        o.validate().map_err(ConfigError)?;
    }
    if c.audit.is_none() {
        if let Some((i, r)) = c.routes.iter().enumerate().find(|(_, r)| r.phi) {
            return err(format!(
                "routes[{i}] ({}).phi: a route that carries PHI needs the audit trail (an `audit:` section)",
                r.name
            ));
        }
    }

    let registry = FilterRegistry::builtin();
    let cx = BuildContext {
        auth: c.auth.clone(),
        shared: Default::default(),
        pools: c.pools.iter().map(|p| p.name.clone()).collect(),
        tenants: c.tenants.clone(),
        base_dir: base_dir.to_path_buf(),
    };
    let mut built = Vec::with_capacity(c.routes.len());
    for (i, r) in c.routes.iter().enumerate() {
        let at = format!("routes[{i}] ({})", r.name);
        if !listeners.contains(r.listener.as_str()) {
            return err(format!("{at}.listener: no listener named `{}`", r.listener));
        }
        if !pools.contains(r.pool.as_str()) {
            return err(format!("{at}.pool: no pool named `{}`", r.pool));
        }
        match crate::hygiene::normalize_path(&r.path_prefix) {
            Ok(n)
                if n == r.path_prefix
                    || n == format!("{}/", r.path_prefix)
                    || r.path_prefix == "/" => {}
            _ => {
                return err(format!(
                    "{at}.path_prefix: must be a normalised absolute path such as /fhir"
                ))
            }
        }
        if r.path_prefix.len() > 1 && r.path_prefix.ends_with('/') {
            return err(format!("{at}.path_prefix: write it without a trailing '/'"));
        }
        if let Some(up) = &r.upstream_prefix {
            if !up.starts_with('/') || crate::hygiene::normalize_path(up).is_err() {
                return err(format!("{at}.upstream_prefix: must be an absolute path"));
            }
        }
        for (m, method) in r.methods.iter().enumerate() {
            if !METHODS.contains(&method.to_ascii_uppercase().as_str()) {
                return err(format!("{at}.methods[{m}]: unknown method `{method}`"));
            }
        }
        let mut filters = Vec::with_capacity(r.filters.len());
        for (f, spec) in r.filters.iter().enumerate() {
            let filter = registry.build(spec, &cx).map_err(|e| {
                ConfigError(format!("routes[{i}].filters[{f}] ({}): {e}", spec.kind))
            })?;
            if r.phi && filter.kind() == "tenant" && filter.mode() != Mode::Enforce {
                return err(format!(
                    "routes[{i}].filters[{f}] (tenant): mode {} is not allowed on a route that \
                     carries PHI (phi: true): a shadowed tenant mismatch would let one hospital \
                     reach another's data",
                    filter.mode().as_str()
                ));
            }
            filters.push(filter);
        }
        built.push(filters);
    }
    let mut listener_built = Vec::with_capacity(c.listeners.len());
    for (i, l) in c.listeners.iter().enumerate() {
        let mut filters = Vec::with_capacity(l.filters.len());
        for (f, spec) in l.filters.iter().enumerate() {
            let filter = registry.build(spec, &cx).map_err(|e| {
                ConfigError(format!("listeners[{i}].filters[{f}] ({}): {e}", spec.kind))
            })?;
            filters.push(filter);
        }
        listener_built.push(filters);
    }
    // Chains as they will run (listener filters first): PHI routes keep tenant isolation in
    // enforce, and fact-writing filters appear once.
    for (i, r) in c.routes.iter().enumerate() {
        let Some(li) = c.listeners.iter().position(|l| l.name == r.listener) else {
            continue;
        };
        let chain: Vec<&Arc<dyn Filter>> =
            listener_built[li].iter().chain(built[i].iter()).collect();
        for once in ["jwt_auth", "tenant"] {
            if chain.iter().filter(|f| f.kind() == once).count() > 1 {
                return err(format!(
                    "routes[{i}] ({}): `{once}` appears more than once in its chain (listener and route filters together)",
                    r.name
                ));
            }
        }
        if r.phi {
            if let Some(f) = listener_built[li]
                .iter()
                .find(|f| f.kind() == "tenant" && f.mode() != Mode::Enforce)
            {
                return err(format!(
                    "listeners[{li}] ({}): tenant isolation in mode {} is not allowed where a route carries PHI ({})",
                    r.listener,
                    f.mode().as_str(),
                    r.name
                ));
            }
        }
    }
    // Report errors in `auth` even when no route uses jwt_auth yet.
    if cx.shared.issuer_set.get().is_none()
        && !(c.auth.issuers.is_empty() && c.auth.client_certificates.is_empty())
    {
        caregate_filters::builtin::jwt_auth::IssuerSet::build(
            &c.auth,
            &|p| cx.resolve(p),
            std::sync::Arc::new(caregate_filters::builtin::jwt_auth::keys::SystemClock),
        )
        .map_err(|e| ConfigError(e.to_string()))?;
    }
    Ok((built, listener_built))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MINIMAL: &str = r#"
listeners:
  - { name: public, channel: public, listen: "127.0.0.1:0" }
pools:
  - name: app
    zones:
      - { name: a, backends: [ { address: "127.0.0.1:9" } ] }
routes:
  - { name: r, listener: public, path_prefix: /api, pool: app }
"#;

    #[test]
    fn minimal_config_loads() {
        let l = load_str(MINIMAL, PathBuf::from(".")).unwrap();
        assert_eq!(l.config.routes.len(), 1);
        assert_eq!(l.config.server.grace_period_seconds, 5);
    }

    #[test]
    fn exchange_bounds_are_checked() {
        let l = load_str(MINIMAL, PathBuf::from(".")).unwrap();
        assert_eq!(l.config.server.max_exchange_body_bytes, 16 << 20);
        assert_eq!(l.config.server.max_exchange_memory_bytes, 512 << 20);
        let text = format!(
            "server: {{ max_exchange_body_bytes: 1048576, max_exchange_memory_bytes: 1024 }}\n{MINIMAL}"
        );
        let e = load_str(&text, PathBuf::from(".")).err().unwrap().0;
        assert_eq!(
            e,
            "server.max_exchange_memory_bytes: must be at least max_exchange_body_bytes"
        );
        let text = format!("server: {{ max_exchange_body_bytes: 0 }}\n{MINIMAL}");
        let e = load_str(&text, PathBuf::from(".")).err().unwrap().0;
        assert_eq!(e, "server.max_exchange_body_bytes: must be positive");
    }

    #[test]
    fn unknown_key_names_its_place() {
        let text = MINIMAL.replace("pool: app }", "pool: app, colour: blue }");
        let e = load_str(&text, PathBuf::from(".")).err().unwrap().0;
        assert!(e.starts_with("routes[0]: unknown field `colour`"), "{e}");
    }

    #[test]
    fn filter_config_errors_name_the_filter() {
        let text = MINIMAL.replace(
            "pool: app }",
            "pool: app, filters: [ {kind: cors, config: {allowed_origins: [x], origin: 1}} ] }",
        );
        let e = load_str(&text, PathBuf::from(".")).err().unwrap().0;
        assert!(e.starts_with("routes[0].filters[0] (cors): config"), "{e}");
        assert!(e.contains("unknown field `origin`"), "{e}");
    }

    #[test]
    fn cross_references_are_checked() {
        let e = load_str(
            &MINIMAL.replace("pool: app }", "pool: nope }"),
            PathBuf::from("."),
        )
        .err()
        .unwrap()
        .0;
        assert_eq!(e, "routes[0] (r).pool: no pool named `nope`");
        let e = load_str(
            &MINIMAL.replace("listener: public,", "listener: inside,"),
            PathBuf::from("."),
        )
        .err()
        .unwrap()
        .0;
        assert!(e.contains("no listener named `inside`"), "{e}");
        let e = load_str(
            &MINIMAL.replace("{ address: \"127.0.0.1:9\" }", "{ sandbox: ghost }"),
            PathBuf::from("."),
        )
        .err()
        .unwrap()
        .0;
        assert!(e.contains("no sandbox named `ghost`"), "{e}");
        let e = load_str(
            &MINIMAL.replace("kind", "x").replace("/api", "/api/"),
            PathBuf::from("."),
        )
        .err()
        .unwrap()
        .0;
        assert!(e.contains("path_prefix"), "{e}");
    }

    #[test]
    fn wrong_type_names_its_place() {
        let e = load_str(
            &MINIMAL.replace("listen: \"127.0.0.1:0\"", "listen: 8080"),
            PathBuf::from("."),
        )
        .err()
        .unwrap()
        .0;
        assert!(e.starts_with("listeners[0].listen:"), "{e}");
    }

    #[test]
    fn env_substitution() {
        let look = |n: &str| (n == "SECRET").then(|| "s3cr3t".to_string());
        assert_eq!(substitute_env("a: ${SECRET}", look).unwrap(), "a: s3cr3t");
        assert_eq!(
            substitute_env("a: $${SECRET} $5", look).unwrap(),
            "a: ${SECRET} $5"
        );
        let e = substitute_env("x: 1\na: ${MISSING}", look).err().unwrap().0;
        assert_eq!(e, "line 2: environment variable MISSING is not set");
        let e = substitute_env("a: 1\n${MISSING}: x", look).err().unwrap().0;
        assert_eq!(e, "line 2: environment variable MISSING is not set");
        assert!(substitute_env("a: ${", look).is_err());
        assert!(substitute_env("a: ${1X}", look).is_err());
    }
}
