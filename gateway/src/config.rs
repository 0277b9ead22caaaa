//! The gateway's configuration: one strict YAML file.
//!
//! Unknown keys and wrong types are errors that name their place
//! (`routes[3].filters[1] (cors): config.allowed_origins[0]: ...`); cross-references (a route
//! naming a missing pool or listener, an unknown filter kind) fail at load. `${ENV_VAR}`
//! references are substituted before parsing; a missing variable is an error.

use caregate_filters::builtin::jwt_auth::AuthConfig;
use caregate_filters::declare::{self, ChainRules, Link, Violation};
use caregate_filters::identity::TenantConfig;
use caregate_filters::{
    BuildContext, Capability, Channel, Environment, Filter, FilterRegistry, FilterSpec, Mode,
};
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::HashSet;
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
    /// How backend names (`address: ehr.internal:443`) are resolved.
    #[serde(default)]
    pub resolver: ResolverSettings,
    /// The error log's level and format (reloadable).
    #[serde(default)]
    pub log: crate::logging::LogSettings,
    /// HL7 v2: MLLP listeners, known sending facilities, message routes (`docs/hl7.md`).
    #[serde(default)]
    pub hl7: crate::hl7gw::config::Hl7Config,
    /// The unusual-access monitor over the audit records (`docs/observability.md`).
    #[serde(default)]
    pub unusual_access: crate::anomaly::UnusualAccessConfig,
    /// APIs, their versions and lifecycle (`docs/api-lifecycle.md`). Each route an API names is
    /// served once per version; after [`parse`], `routes` holds those copies.
    #[serde(default)]
    pub apis: Vec<crate::apis::ApiConfig>,
    /// The developer portal: the OpenAPI 3.1 document and its Redoc page.
    #[serde(default)]
    pub portal: Option<crate::portal::PortalConfig>,
    /// `caregate lint`: rule settings and waivers (never read by `run` or `check`).
    #[serde(default)]
    pub lint: crate::lint::LintConfig,
}

/// The resolver of backend names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverSettings {
    /// DNS servers (`ip:port`) to ask, over UDP (TCP for long answers). Empty: the system's
    /// resolver (`getaddrinfo`: `/etc/hosts`, `/etc/resolv.conf`, ...), which gives no TTL.
    #[serde(default)]
    pub servers: Vec<SocketAddr>,
    /// Re-resolve a name at least this often (and at most for as long as the record's TTL).
    #[serde(default = "default_dns_refresh")]
    pub refresh_ms: u64,
    /// Never re-resolve more often than this, whatever the TTL.
    #[serde(default = "default_dns_min_ttl")]
    pub min_ttl_ms: u64,
    /// Timeout of one query.
    #[serde(default = "default_dns_timeout")]
    pub timeout_ms: u64,
}

impl Default for ResolverSettings {
    fn default() -> Self {
        ResolverSettings {
            servers: Vec::new(),
            refresh_ms: default_dns_refresh(),
            min_ttl_ms: default_dns_min_ttl(),
            timeout_ms: default_dns_timeout(),
        }
    }
}

fn default_dns_refresh() -> u64 {
    30_000
}
fn default_dns_min_ttl() -> u64 {
    1_000
}
fn default_dns_timeout() -> u64 {
    2_000
}

/// A backend's address: `ip:port`, or `name:port` resolved through the resolver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAddress {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

impl std::fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendAddress::Ip(a) => write!(f, "{a}"),
            BackendAddress::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl std::str::FromStr for BackendAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(BackendAddress::Ip(a));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` is not ip:port or name:port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("`{s}`: the port must be 1 to 65535"))?;
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(format!("`{s}`: `{host}` is not a valid host name"));
        }
        if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(format!("`{s}` is not a valid IP address"));
        }
        Ok(BackendAddress::Name { host, port })
    }
}

impl<'de> Deserialize<'de> for BackendAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
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
    /// On SIGTERM, how long `/readyz` answers 503 while the listeners keep accepting and
    /// serving, before they close: time for load balancers and Kubernetes endpoints to stop
    /// sending new connections here.
    #[serde(default = "default_drain_delay")]
    pub drain_delay_seconds: u64,
    /// The Unix socket a graceful upgrade passes the listening sockets over. Both processes
    /// must name the same one; two gateways on one host must not. Default: in the system's
    /// temporary directory, named after the admin listener's port (unique per host).
    #[serde(default)]
    pub upgrade_sock: Option<PathBuf>,
    /// A file the gateway writes its process id to at start (and removes at exit if it still
    /// holds its id). A graceful upgrade's new process writes its own id there.
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// Poll the config file this often and reload when its content changes (off by default:
    /// `SIGHUP` and `POST /reload` reload on demand).
    #[serde(default)]
    pub watch_config_interval_ms: Option<u64>,
    /// Caps on client connections and deadlines for slow clients (on by default).
    #[serde(default)]
    pub connections: ConnectionSettings,
}

/// `server.connections`: the layer around every accepted client connection.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionSettings {
    /// Open client connections of the whole process, all listeners together (0: no cap). A
    /// connection past it is answered `503 too_many_connections` and closed. Default: 20000,
    /// or less when the process's open-file limit cannot hold that many (see
    /// [`ConnectionSettings::effective_max_total`]).
    #[serde(default)]
    pub max_total: Option<usize>,
    /// Open connections per client address, the TCP peer (0: no cap). Addresses in
    /// `server.trusted_proxies` and in `exempt` are not capped per address.
    #[serde(default = "default_max_per_client")]
    pub max_per_client: usize,
    /// More client addresses not capped per address (load balancers, NAT gateways).
    #[serde(default)]
    pub exempt: Vec<IpNet>,
    /// Loopback clients (`127.0.0.0/8`, `::1`) are on this host — a sidecar, a local proxy, a
    /// probe — and are not capped per address (they count in `max_total`).
    #[serde(default = "default_true")]
    pub exempt_loopback: bool,
    /// From a request's first byte until its header is complete, however the bytes trickle
    /// in: a client that is slower is cut off (slowloris).
    #[serde(default = "default_header_timeout")]
    pub header_timeout_seconds: u64,
    /// A request body must come at least this fast (bytes per second) once
    /// `body_grace_seconds` have passed since its header; a slower one is answered
    /// `408 body_too_slow` and its connection closed (0: no minimum).
    #[serde(default = "default_body_min_rate")]
    pub body_min_rate_bytes_per_second: u64,
    /// See `body_min_rate_bytes_per_second`.
    #[serde(default = "default_body_grace")]
    pub body_grace_seconds: u64,
    /// HTTP/2: streams a client may have open at once on one connection.
    #[serde(default = "default_h2_streams")]
    pub h2_max_concurrent_streams: u32,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            max_total: None,
            max_per_client: default_max_per_client(),
            exempt: Vec::new(),
            exempt_loopback: true,
            header_timeout_seconds: default_header_timeout(),
            body_min_rate_bytes_per_second: default_body_min_rate(),
            body_grace_seconds: default_body_grace(),
            h2_max_concurrent_streams: default_h2_streams(),
        }
    }
}

impl ConnectionSettings {
    /// The cap on open client connections: `max_total` when set; by default 20000, lowered to
    /// what `open_files` (the process's open-file limit, when known) can hold with an upstream
    /// connection for each and some room for the process's own files.
    pub fn effective_max_total(&self, open_files: Option<u64>) -> usize {
        if let Some(n) = self.max_total {
            return n;
        }
        let fits = open_files.map_or(20_000, |l| {
            usize::try_from(l.saturating_sub(256) / 2).unwrap_or(usize::MAX)
        });
        fits.clamp(64, 20_000)
    }
}
fn default_max_per_client() -> usize {
    512
}
fn default_header_timeout() -> u64 {
    20
}
fn default_body_min_rate() -> u64 {
    500
}
fn default_body_grace() -> u64 {
    20
}
fn default_h2_streams() -> u32 {
    100
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
            drain_delay_seconds: default_drain_delay(),
            upgrade_sock: None,
            pid_file: None,
            watch_config_interval_ms: None,
            connections: ConnectionSettings::default(),
        }
    }
}

fn default_drain_delay() -> u64 {
    5
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
    /// This listener's own slow-client deadlines and per-address cap, over
    /// `server.connections` (e.g. a stricter public channel).
    #[serde(default)]
    pub connections: ListenerConnections,
    /// `production` (default) or `sandbox`: a sandbox listener serves draft API versions,
    /// trusts only sandbox issuers and sends only to sandbox pools.
    #[serde(default)]
    pub environment: Environment,
}

/// `listeners[].connections`: what differs on this listener from `server.connections`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConnections {
    pub max_per_client: Option<usize>,
    /// Added to `server.connections.exempt` on this listener.
    #[serde(default)]
    pub exempt: Vec<IpNet>,
    pub header_timeout_seconds: Option<u64>,
    pub body_min_rate_bytes_per_second: Option<u64>,
    pub body_grace_seconds: Option<u64>,
}

impl ConnectionSettings {
    /// The settings of `listener`: these, with the listener's own over them.
    pub fn for_listener(&self, listener: &ListenerConnections) -> ConnectionSettings {
        let mut exempt = self.exempt.clone();
        exempt.extend(listener.exempt.iter().cloned());
        ConnectionSettings {
            max_total: self.max_total,
            max_per_client: listener.max_per_client.unwrap_or(self.max_per_client),
            exempt,
            exempt_loopback: self.exempt_loopback,
            header_timeout_seconds: listener
                .header_timeout_seconds
                .unwrap_or(self.header_timeout_seconds),
            body_min_rate_bytes_per_second: listener
                .body_min_rate_bytes_per_second
                .unwrap_or(self.body_min_rate_bytes_per_second),
            body_grace_seconds: listener
                .body_grace_seconds
                .unwrap_or(self.body_grace_seconds),
            h2_max_concurrent_streams: self.h2_max_concurrent_streams,
        }
    }
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
    /// A FHIR route: errors are OperationOutcomes, `;` path parameters are refused, and the
    /// gateway classifies each request before the first filter (what `smart_scopes` and
    /// `patient_compartment` need).
    #[serde(default)]
    pub fhir: bool,
    /// The route carries PHI: the filters on its chain that confine access (`jwt_auth`,
    /// `smart_scopes`, `patient_compartment`, `tenant`) may only run in `enforce` mode.
    #[serde(default)]
    pub phi: bool,
    /// The pool requests go to; not used on an `hl7: true` route.
    #[serde(default)]
    pub pool: String,
    /// HL7 v2 ingestion: each POST body is one HL7 v2 message, run through the `hl7.routes`
    /// whose `http_route` names this route and answered with its acknowledgement.
    #[serde(default)]
    pub hl7: bool,
    /// Replace `path_prefix` by this prefix upstream (e.g. `/v1/fhir` -> `/fhir`).
    #[serde(default)]
    pub upstream_prefix: Option<String>,
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
    /// Set on the copies of an API's route, one per version (see [`crate::apis::expand`]).
    #[serde(skip)]
    pub api: Option<Arc<crate::apis::ApiBinding>>,
    /// The developer portal's own route (added from `portal:`): answered by the gateway.
    #[serde(skip)]
    pub portal: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    /// `production` (default) or `sandbox` (synthetic data only): routes on a sandbox listener
    /// may use only sandbox pools.
    #[serde(default)]
    pub environment: Environment,
    /// What the backends speak: `http` (default) or `mllp` (HL7 v2 over TCP; health-checked
    /// by a TCP connect).
    #[serde(default)]
    pub protocol: PoolProtocol,
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
    /// Passive outlier detection: a circuit per backend (on by default; see
    /// `docs/resilience.md`).
    #[serde(default)]
    pub outlier_detection: OutlierDetectionConfig,
    /// The pool's bulkhead: upstream requests in flight at once (one per request, whatever
    /// its attempts); past it a request gets `503 overloaded` at once. 0 = no cap.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// How many retries the pool's requests may cause.
    #[serde(default)]
    pub retry_budget: RetryBudgetConfig,
}

/// `pools[].protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolProtocol {
    #[default]
    Http,
    Mllp,
}

/// `pools[].outlier_detection`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetectionConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Failures in a row (a 5xx other than 501/505, a failed connect, a broken or timed-out
    /// exchange) that eject a backend.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// The first ejection's length; each consecutive ejection doubles it.
    #[serde(default = "default_base_ejection_ms")]
    pub base_ejection_ms: u64,
    #[serde(default = "default_max_ejection_ms")]
    pub max_ejection_ms: u64,
    /// At most this percentage of a zone's backends is ejected at once (never the last one).
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u32,
}

impl Default for OutlierDetectionConfig {
    fn default() -> Self {
        OutlierDetectionConfig {
            enabled: true,
            consecutive_failures: default_consecutive_failures(),
            base_ejection_ms: default_base_ejection_ms(),
            max_ejection_ms: default_max_ejection_ms(),
            max_ejected_percent: default_max_ejected_percent(),
        }
    }
}

/// `pools[].retry_budget`: retries over a sliding 10 s window are at most `ratio` of the
/// pool's requests plus `min_per_second` per second.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetConfig {
    #[serde(default = "default_retry_ratio")]
    pub ratio: f64,
    #[serde(default = "default_retry_min_per_second")]
    pub min_per_second: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            ratio: default_retry_ratio(),
            min_per_second: default_retry_min_per_second(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection_ms() -> u64 {
    30_000
}
fn default_max_ejection_ms() -> u64 {
    300_000
}
fn default_max_ejected_percent() -> u32 {
    50
}
fn default_max_in_flight() -> usize {
    1000
}
fn default_retry_ratio() -> f64 {
    0.2
}
fn default_retry_min_per_second() -> u32 {
    5
}

impl PoolConfig {
    /// The host name of the pool's first backend given by name: the default SNI and upstream
    /// `Host` of the pool.
    pub fn backend_name(&self) -> Option<&str> {
        self.zones
            .iter()
            .flat_map(|z| &z.backends)
            .find_map(|b| match &b.address {
                Some(BackendAddress::Name { host, .. }) => Some(host.as_str()),
                _ => None,
            })
    }
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
    /// `ip:port` of the backend, or `name:port`: resolved through `resolver`, again on the
    /// record's TTL or `resolver.refresh_ms`; every address of the answer is a backend of the
    /// zone, and the last good answer is kept while DNS fails.
    #[serde(default)]
    pub address: Option<BackendAddress>,
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
    /// SNI and the name the backend certificate must carry. Default: the pool's backend name,
    /// when its backends are given by name.
    #[serde(default)]
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

/// The content of a secret file named by `${file:/path}`: one trailing line break removed; no
/// other control character and no `"` (so it cannot change the YAML around it). The content
/// never appears in an error.
fn read_secret_file(line: usize, path: &str) -> Result<String, ConfigError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return err(format!(
            "line {line}: `${{file:{path}}}` must name an absolute path"
        ));
    }
    let mut v = std::fs::read_to_string(p)
        .map_err(|e| ConfigError(format!("line {line}: secret file {path}: {e}")))?;
    if v.ends_with('\n') {
        v.pop();
        if v.ends_with('\r') {
            v.pop();
        }
    }
    if v.is_empty() || v.chars().any(|c| c.is_control() || c == '"') {
        return err(format!(
            "line {line}: secret file {path} is empty, or holds a line break, a control character or a quote"
        ));
    }
    Ok(v)
}

/// Replace `${NAME}` with the environment variable NAME, and `${file:/path}` with the content
/// of a secret file (re-read at every reload, so a rotated secret is picked up). `$${` writes a
/// literal `${`.
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
            if let Some(path) = name.strip_prefix("file:") {
                let line = text[..text.len() - rest.len() + pos].matches('\n').count() + 1;
                out.push_str(&read_secret_file(line, path)?);
                rest = &body[end + 1..];
                continue;
            }
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
    let mut c = serde_yaml::from_str::<Config>(&text).map_err(|e| ConfigError(e.to_string()))?;
    expand(&mut c)?;
    Ok(c)
}

/// The routes as served: an API's routes once per version, and the portal's route.
fn expand(c: &mut Config) -> Result<(), ConfigError> {
    let listeners: Vec<(String, Environment)> = c
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.environment))
        .collect();
    let pools: Vec<(String, Environment)> = c
        .pools
        .iter()
        .map(|p| (p.name.clone(), p.environment))
        .collect();
    let find = |list: &[(String, Environment)], n: &str| {
        list.iter().find(|(x, _)| x == n).map(|(_, e)| *e)
    };
    let routes = std::mem::take(&mut c.routes);
    c.routes = crate::apis::expand(&c.apis, routes, &|n| find(&listeners, n), &|n| {
        find(&pools, n)
    })?;
    if let Some(p) = &c.portal {
        c.routes.push(p.route()?);
    }
    Ok(())
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

/// Read, parse and validate a config file, building its filters with the built-in kinds
/// ([`FilterRegistry::builtin`]). A program with kinds of its own uses [`load_file_with`].
pub fn load_file(path: &Path) -> Result<Loaded, ConfigError> {
    load_file_with(path, &FilterRegistry::builtin())
}

/// Read, parse and validate a config file, building its filters with `registry` (the kinds a
/// `kind:` may name).
pub fn load_file_with(path: &Path, registry: &FilterRegistry) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    let base_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    load_str_with(&text, base_dir, registry)
}

/// Parse and validate config text with the built-in filter kinds (see [`load_str_with`]).
pub fn load_str(text: &str, base_dir: PathBuf) -> Result<Loaded, ConfigError> {
    load_str_with(text, base_dir, &FilterRegistry::builtin())
}

/// Parse and validate config text, building its filters with `registry`. Relative paths in it
/// resolve against `base_dir`.
pub fn load_str_with(
    text: &str,
    base_dir: PathBuf,
    registry: &FilterRegistry,
) -> Result<Loaded, ConfigError> {
    let config = parse(text)?;
    let (route_filters, listener_filters) = validate_with(&config, &base_dir, registry)?;
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

/// The filters built from a config: per route, and per listener.
pub type BuiltFilters = (Vec<Vec<Arc<dyn Filter>>>, Vec<Vec<Arc<dyn Filter>>>);

/// Check cross-references and values; build every route's and listener's filters with the
/// built-in filter kinds (see [`validate_with`]).
pub fn validate(c: &Config, base_dir: &Path) -> Result<BuiltFilters, ConfigError> {
    validate_with(c, base_dir, &FilterRegistry::builtin())
}

/// Check cross-references and values; build every route's and listener's filters with
/// `registry`, and hold every chain to its filters' declarations. A `kind` the registry does
/// not know is an error naming its place.
pub fn validate_with(
    c: &Config,
    base_dir: &Path,
    registry: &FilterRegistry,
) -> Result<BuiltFilters, ConfigError> {
    if c.server.max_exchange_body_bytes == 0 {
        return err("server.max_exchange_body_bytes: must be positive");
    }
    if c.server.max_exchange_memory_bytes < c.server.max_exchange_body_bytes {
        return err("server.max_exchange_memory_bytes: must be at least max_exchange_body_bytes");
    }
    if c.resolver.refresh_ms < 100 || c.resolver.min_ttl_ms > c.resolver.refresh_ms {
        return err("resolver: refresh_ms must be at least 100 and at least min_ttl_ms");
    }
    if c.resolver.timeout_ms == 0 {
        return err("resolver.timeout_ms: must be positive");
    }
    if c.server.connections.header_timeout_seconds == 0 {
        return err("server.connections.header_timeout_seconds: must be at least 1");
    }
    for l in &c.listeners {
        if l.connections.header_timeout_seconds == Some(0) {
            return err(format!(
                "listeners ({}): connections.header_timeout_seconds: must be at least 1",
                l.name
            ));
        }
    }
    if c.server.connections.h2_max_concurrent_streams == 0 {
        return err("server.connections.h2_max_concurrent_streams: must be at least 1");
    }
    if c.server.watch_config_interval_ms.is_some_and(|ms| ms < 100) {
        return err("server.watch_config_interval_ms: must be at least 100");
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

    let mut addrs: Vec<&ListenAddress> = Vec::new();
    let listen = listen_addresses(c);
    for l in &listen {
        if let Some(other) = addrs.iter().find(|o| binds_overlap(o.addr, l.addr)) {
            let (who, addr) = (&l.place, l.addr);
            return err(if other.addr == addr {
                format!("{who}: address {addr} is already used by {}", other.place)
            } else {
                format!(
                    "{who}: address {addr} overlaps {} of {} (the same port on a wildcard address)",
                    other.addr, other.place
                )
            });
        }
        addrs.push(l);
    }
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
        if let Some(tls) = &l.tls {
            if tls.require_client_cert && tls.client_ca.is_none() {
                return err(format!(
                    "listeners[{i}].tls.require_client_cert: needs client_ca"
                ));
            }
        }
    }
    for (i, s) in c.sandboxes.iter().enumerate() {
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
        let od = &p.outlier_detection;
        if od.consecutive_failures == 0 {
            return err(format!(
                "{at}.outlier_detection.consecutive_failures: must be at least 1"
            ));
        }
        if od.base_ejection_ms < 10 || od.max_ejection_ms < od.base_ejection_ms {
            return err(format!(
                "{at}.outlier_detection: base_ejection_ms must be at least 10 and max_ejection_ms at least base_ejection_ms"
            ));
        }
        if od.max_ejected_percent > 100 {
            return err(format!(
                "{at}.outlier_detection.max_ejected_percent: must be between 0 and 100"
            ));
        }
        if !(p.retry_budget.ratio.is_finite() && (0.0..=1.0).contains(&p.retry_budget.ratio)) {
            return err(format!("{at}.retry_budget.ratio: must be between 0 and 1"));
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
            if tls.sni.trim().is_empty() && p.backend_name().is_none() {
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
    crate::hl7gw::config::validate(c, base_dir).map_err(ConfigError)?;
    crate::portal::validate(c, base_dir).map_err(ConfigError)?;
    c.unusual_access.validate().map_err(ConfigError)?;
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
        if r.portal {
            // The portal's own route: answered by the gateway, no pool.
        } else if r.hl7 {
            if !r.pool.is_empty() {
                return err(format!(
                    "{at}.pool: an `hl7: true` route sends each message where its `hl7.routes` say; remove `pool`"
                ));
            }
            if r.fhir {
                return err(format!(
                    "{at}.hl7: a route is either `fhir: true` or `hl7: true`"
                ));
            }
        } else if r.pool.is_empty() {
            return err(format!("{at}.pool: required"));
        } else if !pools.contains(r.pool.as_str()) {
            return err(format!("{at}.pool: no pool named `{}`", r.pool));
        } else if c
            .pools
            .iter()
            .any(|p| p.name == r.pool && p.protocol == PoolProtocol::Mllp)
        {
            return err(format!(
                "{at}.pool: `{}` is an MLLP pool; HTTP routes need an HTTP pool",
                r.pool
            ));
        } else if c
            .listeners
            .iter()
            .any(|l| l.name == r.listener && l.environment == Environment::Sandbox)
            && c.pools
                .iter()
                .any(|p| p.name == r.pool && p.environment != Environment::Sandbox)
        {
            return err(format!(
                "{at}.pool: `{}` is a production pool and `{}` a sandbox listener: sandbox traffic never reaches production pools (set `environment: sandbox` on a sandbox pool)",
                r.pool, r.listener
            ));
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
    // Chains as they will run (listener filters first, then the route's): every filter's
    // declaration holds.
    for (i, r) in c.routes.iter().enumerate() {
        let Some(li) = c.listeners.iter().position(|l| l.name == r.listener) else {
            continue;
        };
        let listener = listener_built[li]
            .iter()
            .enumerate()
            .map(|(n, f)| (format!("listeners[{li}].filters[{n}]"), f.clone()));
        let own = built[i]
            .iter()
            .enumerate()
            .map(|(n, f)| (format!("routes[{i}].filters[{n}]"), f.clone()));
        let chain: Vec<(String, Arc<dyn Filter>)> = listener.chain(own).collect();
        check_chain(i, r, &chain)?;
    }
    // Report errors in `auth` even when no route uses jwt_auth yet, and read every key set
    // given as a file as the gateway will at start.
    match caregate_filters::builtin::jwt_auth::shared_issuer_set(&cx) {
        Some(Ok(set)) => set.check_key_files(),
        // A build error of the shared set was already reported by the filter that built it.
        Some(Err(e)) => Err(e),
        None if !(c.auth.issuers.is_empty() && c.auth.client_certificates.is_empty()) => {
            caregate_filters::builtin::jwt_auth::IssuerSet::build(
                &c.auth,
                &|p| cx.resolve(p),
                std::sync::Arc::new(caregate_filters::builtin::jwt_auth::keys::SystemClock),
            )
            .and_then(|set| set.check_key_files())
        }
        None => Ok(()),
    }
    .map_err(|e| ConfigError(e.to_string()))?;
    check_files(c, base_dir)?;
    Ok((built, listener_built))
}

/// Read a PEM file the gateway will load at start, naming the config place on failure.
fn read_pem(place: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError(format!("{place}: cannot read {}: {e}", path.display())))
}

/// A certificate chain file: at least one PEM certificate; the first is the leaf.
fn load_certs(place: &str, path: &Path) -> Result<Vec<pingora::tls::x509::X509>, ConfigError> {
    let pem = read_pem(place, path)?;
    match pingora::tls::x509::X509::stack_from_pem(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        _ => err(format!(
            "{place}: {} holds no PEM certificate",
            path.display()
        )),
    }
}

/// A certificate and its private key: both readable, and the key the certificate's.
fn check_cert_and_key(
    place: &str,
    cert: &Path,
    cert_place: &str,
    key: &Path,
    key_place: &str,
) -> Result<(), ConfigError> {
    let certs = load_certs(&format!("{place}.{cert_place}"), cert)?;
    let key_pem = read_pem(&format!("{place}.{key_place}"), key)?;
    let Ok(pkey) = pingora::tls::pkey::PKey::private_key_from_pem(&key_pem) else {
        return err(format!(
            "{place}.{key_place}: {} holds no PEM private key (an encrypted key is not supported)",
            key.display()
        ));
    };
    let matches = certs
        .first()
        .and_then(|c| c.public_key().ok())
        .map(|pubkey| pubkey.public_eq(&pkey))
        .unwrap_or(false);
    if !matches {
        return err(format!(
            "{place}: the key {} does not match the certificate {}",
            key.display(),
            cert.display()
        ));
    }
    Ok(())
}

thread_local! {
    /// Set while [`load_str_offline`] runs on this thread.
    static OFFLINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the config being validated on this thread is loaded offline (by `caregate lint`):
/// the certificate, key and CA files it names are not read.
pub fn offline() -> bool {
    OFFLINE.with(|o| o.get())
}

/// [`load_str_with`] without reading the certificate, key and CA files the config names (the
/// listeners', the pools' and the MLLP listeners'): what `caregate lint` runs in a CI job
/// that has no production certificates. `check` and `run` read them.
pub fn load_str_offline(
    text: &str,
    base_dir: PathBuf,
    registry: &FilterRegistry,
) -> Result<Loaded, ConfigError> {
    OFFLINE.with(|o| o.set(true));
    let r = load_str_with(text, base_dir, registry);
    OFFLINE.with(|o| o.set(false));
    r
}

/// Check every file the gateway loads at start (certificates, keys, CA bundles; key sets are
/// checked with the issuers), so `check` refuses what `run` would fail on.
fn check_files(c: &Config, base_dir: &Path) -> Result<(), ConfigError> {
    if offline() {
        return Ok(());
    }
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base_dir.join(p)
        }
    };
    let listener_tls = c
        .listeners
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.tls.as_ref().map(|t| (format!("listeners[{i}].tls"), t)))
        .chain(c.admin.tls.as_ref().map(|t| ("admin.tls".to_string(), t)));
    for (place, t) in listener_tls {
        check_cert_and_key(&place, &resolve(&t.cert), "cert", &resolve(&t.key), "key")?;
        if let Some(ca) = &t.client_ca {
            load_certs(&format!("{place}.client_ca"), &resolve(ca))?;
        }
    }
    for (i, p) in c.pools.iter().enumerate() {
        let Some(t) = &p.tls else { continue };
        let place = format!("pools[{i}] ({}).tls", p.name);
        if let Some(ca) = &t.ca_file {
            load_certs(&format!("{place}.ca_file"), &resolve(ca))?;
        }
        if let (Some(cert), Some(key)) = (&t.client_cert, &t.client_key) {
            check_cert_and_key(
                &place,
                &resolve(cert),
                "client_cert",
                &resolve(key),
                "client_key",
            )?;
        }
    }
    Ok(())
}

/// One address the gateway listens on.
pub struct ListenAddress {
    /// Its place in the config (`listeners[0].listen`, `admin.listen`, `sandboxes[1].listen`).
    pub place: String,
    /// What listens there, for messages at start (`listeners[0] (public)`, `admin.listen`).
    pub who: String,
    /// The address.
    pub addr: SocketAddr,
}

/// Every address the gateway listens on: the admin listener, the listeners, the built-in
/// sandboxes. `check` holds them apart; `run` binds each once before anything starts.
pub fn listen_addresses(c: &Config) -> Vec<ListenAddress> {
    let mut out = vec![ListenAddress {
        place: "admin.listen".into(),
        who: "admin.listen".into(),
        addr: c.admin.listen,
    }];
    out.extend(c.listeners.iter().enumerate().map(|(i, l)| ListenAddress {
        place: format!("listeners[{i}].listen"),
        who: format!("listeners[{i}] ({})", l.name),
        addr: l.listen,
    }));
    out.extend(c.sandboxes.iter().enumerate().map(|(i, s)| ListenAddress {
        place: format!("sandboxes[{i}].listen"),
        who: format!("sandboxes[{i}] ({})", s.name),
        addr: s.listen,
    }));
    out.extend(
        c.hl7
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| ListenAddress {
                place: format!("hl7.listeners[{i}].listen"),
                who: format!("hl7.listeners[{i}] ({})", l.name),
                addr: l.listen,
            }),
    );
    out
}

/// Whether two listen addresses would fight over one port: the same address, or a wildcard
/// (`0.0.0.0` for IPv4, `::` for both families, as Linux binds it by default) beside any
/// address of a family it covers.
fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    if a.ip() == b.ip() {
        return true;
    }
    let covers = |wild: SocketAddr, other: SocketAddr| match wild.ip() {
        std::net::IpAddr::V4(ip) => ip.is_unspecified() && other.is_ipv4(),
        std::net::IpAddr::V6(ip) => ip.is_unspecified(),
    };
    covers(a, b) || covers(b, a)
}

/// Refuse a route whose chain breaks a declaration of one of its filters
/// ([`Filter::declaration`]; the rules are [`caregate_filters::declare::check`]'s). `chain` is
/// the route's chain as it runs — its listener's filters, then its own — each with the place it
/// was configured (`listeners[0].filters[1]`, `routes[2].filters[0]`). On a `fhir: true` route
/// the gateway provides the FHIR classification before the first filter; on a `phi: true` route,
/// confining filters must run in enforce mode. The error names the route and the filters
/// involved; the first violation in chain order is reported.
pub fn check_chain(
    i: usize,
    r: &RouteConfig,
    chain: &[(String, Arc<dyn Filter>)],
) -> Result<(), ConfigError> {
    let links: Vec<Link> = chain.iter().map(|(_, f)| Link::of(f.as_ref())).collect();
    let fhir: &[Capability] = &[Capability::Classification];
    let rules = ChainRules {
        provided: if r.fhir { fhir } else { &[] },
        enforce_confining: r.phi,
    };
    match declare::check(&links, &rules).into_iter().next() {
        None => Ok(()),
        Some(v) => err(describe_violation(i, r, chain, v)),
    }
}

/// The message of a chain that breaks a declaration.
fn describe_violation(
    i: usize,
    r: &RouteConfig,
    chain: &[(String, Arc<dyn Filter>)],
    v: Violation,
) -> String {
    let route = format!("routes[{i}] ({})", r.name);
    // The kind and place of the filter at `n` of the chain.
    let at = |n: usize| {
        chain
            .get(n)
            .map(|(place, f)| (f.kind(), place.as_str()))
            .unwrap_or(("?", "?"))
    };
    match v {
        Violation::ProvidedLater {
            at: n,
            provider,
            capability,
            hard,
        } => {
            let (kind, place) = at(n);
            let (pkind, pplace) = at(provider);
            format!(
                "{route}: `{kind}` ({place}) runs before `{pkind}` ({pplace}); it {} {} that \
                 `{pkind}` provides, so put `{pkind}` first",
                if hard { "needs" } else { "reads" },
                capability.describe()
            )
        }
        Violation::Missing {
            at: n,
            capability,
            off,
        } => {
            let (kind, place) = at(n);
            let what = capability.describe();
            match (off, capability.usual_provider()) {
                (Some(o), _) => {
                    let (okind, oplace) = at(o);
                    format!(
                        "{route}: `{kind}` ({place}) needs {what}, and `{okind}` ({oplace}), \
                         which provides it, is in mode off: it does not run"
                    )
                }
                (None, _) if capability == Capability::Classification => format!(
                    "{route}: `{kind}` ({place}) needs {what}, which the gateway provides on a \
                     FHIR route only; set `fhir: true` on the route, or take `{kind}` out of its \
                     chain"
                ),
                (None, Some(usual)) => format!(
                    "{route}: `{kind}` ({place}) needs {what} that `{usual}` provides, and the \
                     chain has no `{usual}` (listener and route filters together)"
                ),
                (None, None) => format!(
                    "{route}: `{kind}` ({place}) needs {what}, and no filter of its chain \
                     provides it (listener and route filters together)"
                ),
            }
        }
        Violation::Repeated { first, again } => {
            let (kind, first) = at(first);
            let (_, again) = at(again);
            format!(
                "{route}: `{kind}` appears more than once in its chain (listener and route \
                 filters together), at {first} and at {again}; it may appear once per chain"
            )
        }
        Violation::ProvidedTwice {
            first,
            again,
            capability,
        } => {
            let (kind, place) = at(again);
            let what = capability.describe();
            match first {
                Some(f) => {
                    let (fkind, fplace) = at(f);
                    format!(
                        "{route}: `{kind}` ({place}) provides {what}, which `{fkind}` ({fplace}) \
                         provides already; a chain has one provider of it"
                    )
                }
                None => format!(
                    "{route}: `{kind}` ({place}) provides {what}, which the gateway provides \
                     already on this route; a chain has one provider of it"
                ),
            }
        }
        Violation::NotEnforced { at: n, mode } => {
            let (kind, place) = at(n);
            let consequence = match mode {
                Mode::Off => "in mode off it does not run at all",
                _ => "in mode shadow a request it refuses still goes on",
            };
            format!(
                "{place} ({kind}): mode {} is not allowed on a route that carries PHI ({route} \
                 has phi: true): `{kind}` confines access, and {consequence}",
                mode.as_str()
            )
        }
        // A violation this version does not know yet: name the route at least.
        _ => format!("{route}: its chain breaks a filter's declaration ({v:?})"),
    }
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

    /// A kind of a program's own: known to the registry it passes in, unknown to the built-in
    /// one, and its config errors named like a built-in kind's.
    #[test]
    fn a_registry_passed_in_builds_its_own_kinds() {
        fn build_plain(
            config: serde_yaml::Value,
            _cx: &BuildContext,
        ) -> Result<Arc<dyn Filter>, caregate_filters::BuildError> {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct PlainConfig {}
            let _: PlainConfig = caregate_filters::registry::parse_config(config)?;
            Ok(Arc::new(Plain))
        }
        let mut registry = FilterRegistry::builtin();
        assert!(registry.register("plain", build_plain));
        let text = MINIMAL.replace("pool: app }", "pool: app, filters: [ {kind: plain} ] }");
        let l = load_str_with(&text, PathBuf::from("."), &registry).unwrap();
        assert_eq!(l.route_filters[0][0].kind(), "plain");
        let e = error_of(load_str(&text, PathBuf::from(".")));
        assert!(
            e.starts_with("routes[0].filters[0] (plain): kind: unknown filter kind `plain`"),
            "{e}"
        );
        let bad = text.replace("{kind: plain}", "{kind: plain, config: {colour: blue}}");
        let e = error_of(load_str_with(&bad, PathBuf::from("."), &registry));
        assert!(
            e.starts_with("routes[0].filters[0] (plain): config.colour: unknown field `colour`"),
            "{e}"
        );
    }

    #[test]
    fn lifecycle_settings_parse_and_a_busy_file_watch_is_refused() {
        let l = load_str(MINIMAL, PathBuf::from(".")).unwrap();
        assert_eq!(l.config.server.drain_delay_seconds, 5);
        assert!(l.config.server.upgrade_sock.is_none() && l.config.server.pid_file.is_none());
        let text = MINIMAL.replacen(
            "listeners:",
            "server: { drain_delay_seconds: 0, upgrade_sock: /run/cg.sock, pid_file: /run/cg.pid, watch_config_interval_ms: 500 }\nlisteners:",
            1,
        );
        let l = load_str(&text, PathBuf::from(".")).unwrap();
        assert_eq!(l.config.server.drain_delay_seconds, 0);
        assert_eq!(l.config.server.watch_config_interval_ms, Some(500));
        // The connection cap fits the open-file limit unless it is set.
        let c = &l.config.server.connections;
        assert_eq!(c.effective_max_total(None), 20_000);
        assert_eq!(c.effective_max_total(Some(1_048_576)), 20_000);
        assert_eq!(c.effective_max_total(Some(1024)), 384);
        assert_eq!(c.effective_max_total(Some(100)), 64);
        let set = ConnectionSettings {
            max_total: Some(50_000),
            ..c.clone()
        };
        assert_eq!(set.effective_max_total(Some(1024)), 50_000);
        let e = error_of(load_str(
            &text.replace(
                "watch_config_interval_ms: 500",
                "watch_config_interval_ms: 5",
            ),
            PathBuf::from("."),
        ));
        assert_eq!(e, "server.watch_config_interval_ms: must be at least 100");
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

    const WITH_AUTH: &str = r#"
listeners:
  - { name: public, channel: public, listen: "127.0.0.1:0" }
auth:
  issuers:
    - { name: idp, issuer: "https://idp.test", hs_secret: "a-test-secret-of-at-least-32-bytes!", algorithms: [HS256], audiences: [api], claims: { patient: patient } }
tenants: [ { id: a, hosts: [a.test] } ]
pools:
  - name: app
    zones:
      - { name: a, backends: [ { address: "127.0.0.1:9" } ] }
routes:
  - name: fhir
    listener: public
    path_prefix: /fhir
    fhir: true
    pool: app
    filters: FILTERS
"#;

    fn chain(filters: &str) -> Result<Loaded, ConfigError> {
        load_str(&WITH_AUTH.replace("FILTERS", filters), PathBuf::from("."))
    }

    #[test]
    fn confining_filters_must_follow_the_identity_filter() {
        // The order the issue found passing `check`: the compartment check saw no caller yet.
        let e = chain("[ {kind: patient_compartment}, {kind: jwt_auth}, {kind: smart_scopes} ]")
            .err()
            .unwrap()
            .0;
        assert_eq!(
            e,
            "routes[0] (fhir): `patient_compartment` (routes[0].filters[0]) runs before \
             `jwt_auth` (routes[0].filters[1]); it needs the verified caller that `jwt_auth` \
             provides, so put `jwt_auth` first"
        );
        for kind in ["smart_scopes", "tenant", "rbac", "fhir_mask"] {
            let cfg = match kind {
                "tenant" => "{kind: tenant, config: {resolve: [header]}}".to_string(),
                "rbac" => "{kind: rbac, config: {rules: [{effect: allow}]}}".to_string(),
                "fhir_mask" => "{kind: fhir_mask, config: {default: {Patient: [{path: name, action: redact}]}}}".to_string(),
                k => format!("{{kind: {k}}}"),
            };
            let e = chain(&format!("[ {cfg}, {{kind: jwt_auth}} ]"))
                .err()
                .map(|e| e.0)
                .unwrap_or_default();
            assert!(
                e.contains(&format!(
                    "`{kind}` (routes[0].filters[0]) runs before `jwt_auth`"
                )),
                "{kind}: {e}"
            );
        }
        // A confining filter with no identity filter at all can never see a caller.
        let e = chain("[ {kind: smart_scopes} ]").err().unwrap().0;
        assert!(e.contains("has no `jwt_auth`"), "{e}");
        // Off does not run; the right order passes; a caller-less rbac may run alone.
        assert!(
            chain("[ {kind: patient_compartment, config: {mode: off}}, {kind: jwt_auth} ]").is_ok()
        );
        assert!(
            chain("[ {kind: jwt_auth}, {kind: smart_scopes}, {kind: patient_compartment} ]")
                .is_ok()
        );
        assert!(
            chain("[ {kind: rbac, config: {rules: [{effect: allow, methods: [GET]}]}} ]").is_ok()
        );
    }

    #[test]
    fn listener_filters_run_first_in_the_order_check() {
        let text = WITH_AUTH
            .replace(
                "listen: \"127.0.0.1:0\" }",
                "listen: \"127.0.0.1:0\", filters: [ {kind: smart_scopes} ] }",
            )
            .replace("FILTERS", "[ {kind: jwt_auth} ]");
        let e = load_str(&text, PathBuf::from(".")).err().unwrap().0;
        assert!(
            e.contains("`smart_scopes` (listeners[0].filters[0]) runs before `jwt_auth` (routes[0].filters[0])"),
            "{e}"
        );
    }

    /// The `fhir` route of [`WITH_AUTH`] with its `fhir` and `phi` flags set (and the audit
    /// section a PHI route needs).
    fn route_with(fhir: bool, phi: bool, filters: &str) -> Result<Loaded, ConfigError> {
        let text = format!(
            "audit: {{ path: /tmp/caregate-unused-audit.jsonl, hmac_key: \"0123456789abcdef0123456789abcdef\" }}\n{}",
            WITH_AUTH
                .replace("    fhir: true\n", &format!("    fhir: {fhir}\n    phi: {phi}\n"))
                .replace("FILTERS", filters)
        );
        load_str(&text, PathBuf::from("."))
    }

    fn error_of(r: Result<Loaded, ConfigError>) -> String {
        r.err().map(|e| e.0).unwrap_or_default()
    }

    #[test]
    fn once_per_chain() {
        // One on the listener, one on the route: the chain has two.
        let text = WITH_AUTH
            .replace(
                "listen: \"127.0.0.1:0\" }",
                "listen: \"127.0.0.1:0\", filters: [ {kind: jwt_auth} ] }",
            )
            .replace("FILTERS", "[ {kind: jwt_auth} ]");
        let e = error_of(load_str(&text, PathBuf::from(".")));
        assert_eq!(
            e,
            "routes[0] (fhir): `jwt_auth` appears more than once in its chain (listener and \
             route filters together), at listeners[0].filters[0] and at routes[0].filters[0]; it \
             may appear once per chain"
        );
        // Whatever the modes: a second one in mode off is refused too.
        let e = error_of(chain(
            "[ {kind: jwt_auth}, {kind: jwt_auth, config: {mode: off}} ]",
        ));
        assert!(
            e.contains("`jwt_auth` appears more than once in its chain"),
            "{e}"
        );
        for (kind, cfg) in [
            ("tenant", "{kind: tenant, config: {resolve: [header]}}"),
            ("patient_compartment", "{kind: patient_compartment}"),
            (
                "fhir_mask",
                "{kind: fhir_mask, config: {default: {Patient: [{path: name, action: redact}]}}}",
            ),
        ] {
            let e = error_of(chain(&format!("[ {{kind: jwt_auth}}, {cfg}, {cfg} ]")));
            assert!(
                e.starts_with(&format!(
                    "routes[0] (fhir): `{kind}` appears more than once in its chain"
                )),
                "{kind}: {e}"
            );
            assert!(
                e.contains("at routes[0].filters[1] and at routes[0].filters[2]"),
                "{e}"
            );
        }
        // Filters that are not `once` may repeat.
        assert!(chain("[ {kind: headers}, {kind: jwt_auth}, {kind: smart_scopes}, {kind: headers}, {kind: smart_scopes} ]").is_ok());
    }

    #[test]
    fn confining_filters_enforce_on_phi_routes() {
        let full = [
            "{kind: jwt_auth}",
            "{kind: smart_scopes}",
            "{kind: patient_compartment}",
            "{kind: tenant, config: {resolve: [header]}}",
        ];
        let with_mode = |n: usize, mode: &str| {
            let mut filters = full.map(str::to_string);
            filters[n] = if n == 3 {
                format!("{{kind: tenant, config: {{resolve: [header], mode: {mode}}}}}")
            } else {
                full[n].replace('}', &format!(", config: {{mode: {mode}}}}}"))
            };
            format!("[ {} ]", filters.join(", "))
        };
        assert!(route_with(true, true, &format!("[ {} ]", full.join(", "))).is_ok());
        for (n, kind) in ["jwt_auth", "smart_scopes", "patient_compartment", "tenant"]
            .into_iter()
            .enumerate()
        {
            for mode in ["shadow", "off"] {
                let e = error_of(route_with(true, true, &with_mode(n, mode)));
                assert!(
                    e.starts_with(&format!(
                        "routes[0].filters[{n}] ({kind}): mode {mode} is not allowed on a route \
                         that carries PHI (routes[0] (fhir) has phi: true): `{kind}` confines \
                         access, and in mode {mode} "
                    )),
                    "{kind} {mode}: {e}"
                );
                // Without PHI the mode is the operator's choice; only a jwt_auth that does not
                // run leaves the others without their caller.
                let r = route_with(true, false, &with_mode(n, mode));
                if (kind, mode) == ("jwt_auth", "off") {
                    assert_eq!(
                        error_of(r),
                        "routes[0] (fhir): `smart_scopes` (routes[0].filters[1]) needs the \
                         verified caller, and `jwt_auth` (routes[0].filters[0]), which provides \
                         it, is in mode off: it does not run"
                    );
                } else {
                    assert!(r.is_ok(), "{kind} {mode}: {:?}", r.err());
                }
            }
        }
        // Other policy filters keep their shadow mode on PHI routes.
        assert!(route_with(
            true,
            true,
            "[ {kind: ip_allow, config: {allow: [10.0.0.0/8], mode: shadow}}, {kind: jwt_auth}, \
             {kind: rbac, config: {mode: shadow, rules: [{effect: allow}]}}, \
             {kind: fhir_mask, config: {mode: off, default: {Patient: [{path: name, action: redact}]}}} ]"
        )
        .is_ok());
        // A listener's filters count for each PHI route on it.
        let text = format!(
            "audit: {{ path: /tmp/a.jsonl, hmac_key: \"0123456789abcdef0123456789abcdef\" }}\n{}",
            WITH_AUTH
                .replace(
                    "listen: \"127.0.0.1:0\" }",
                    "listen: \"127.0.0.1:0\", filters: [ {kind: jwt_auth}, {kind: tenant, config: {mode: shadow}} ] }",
                )
                .replace("    fhir: true\n", "    fhir: true\n    phi: true\n")
                .replace("FILTERS", "[]")
        );
        let e = error_of(load_str(&text, PathBuf::from(".")));
        assert!(
            e.starts_with(
                "listeners[0].filters[1] (tenant): mode shadow is not allowed on a route that \
                 carries PHI (routes[0] (fhir) has phi: true)"
            ),
            "{e}"
        );
        assert!(load_str(&text.replace("    phi: true\n", ""), PathBuf::from(".")).is_ok());
    }

    #[test]
    fn the_classification_exists_on_fhir_routes_only() {
        for kind in ["smart_scopes", "patient_compartment"] {
            let e = error_of(route_with(
                false,
                false,
                &format!("[ {{kind: jwt_auth}}, {{kind: {kind}}} ]"),
            ));
            assert_eq!(
                e,
                format!(
                    "routes[0] (fhir): `{kind}` (routes[0].filters[1]) needs the FHIR \
                     classification of the request, which the gateway provides on a FHIR route \
                     only; set `fhir: true` on the route, or take `{kind}` out of its chain"
                )
            );
        }
        // The filters that read no classification run anywhere.
        assert!(route_with(
            false,
            false,
            "[ {kind: jwt_auth}, {kind: rbac, config: {rules: [{effect: allow}]}}, \
             {kind: tenant, config: {resolve: [header]}} ]"
        )
        .is_ok());
    }

    /// A user's filter: its kind, mode and declaration are whatever the test says.
    struct Custom {
        kind: &'static str,
        mode: Mode,
        declaration: caregate_filters::Declaration,
    }

    impl Filter for Custom {
        fn kind(&self) -> &'static str {
            self.kind
        }
        fn mode(&self) -> Mode {
            self.mode
        }
        fn declaration(&self) -> caregate_filters::Declaration {
            self.declaration
        }
    }

    /// A user's filter that overrides nothing but its kind: it declares nothing.
    struct Plain;

    impl Filter for Plain {
        fn kind(&self) -> &'static str {
            "plain"
        }
    }

    #[test]
    fn a_custom_filters_declaration_is_honoured() {
        use caregate_filters::{Capability, Declaration};
        const CONSENT: Capability = Capability::Custom("consent_checked");
        let filter = |kind, mode, declaration| -> Arc<dyn Filter> {
            Arc::new(Custom {
                kind,
                mode,
                declaration,
            })
        };
        let lookup = filter(
            "consent_lookup",
            Mode::Enforce,
            Declaration::new().provides(&[CONSENT]).once(),
        );
        let gate = filter(
            "consent_gate",
            Mode::Shadow,
            Declaration::new().needs(&[CONSENT]).confining(),
        );
        let placed = |fs: &[&Arc<dyn Filter>]| -> Vec<(String, Arc<dyn Filter>)> {
            fs.iter()
                .enumerate()
                .map(|(n, f)| (format!("routes[0].filters[{n}]"), Arc::clone(f)))
                .collect()
        };
        let route = |phi: bool| -> RouteConfig {
            serde_yaml::from_str(&format!(
                "{{ name: r, listener: public, path_prefix: /x, pool: app, phi: {phi} }}"
            ))
            .unwrap()
        };
        let plain: Arc<dyn Filter> = Arc::new(Plain);
        let check = |phi: bool, fs: &[&Arc<dyn Filter>]| {
            check_chain(0, &route(phi), &placed(fs))
                .err()
                .map(|e| e.0)
                .unwrap_or_default()
        };

        assert_eq!(check(false, &[&plain, &lookup, &gate, &plain]), "");
        assert_eq!(
            check(false, &[&gate]),
            "routes[0] (r): `consent_gate` (routes[0].filters[0]) needs `consent_checked`, and \
             no filter of its chain provides it (listener and route filters together)"
        );
        assert_eq!(
            check(false, &[&gate, &lookup]),
            "routes[0] (r): `consent_gate` (routes[0].filters[0]) runs before `consent_lookup` \
             (routes[0].filters[1]); it needs `consent_checked` that `consent_lookup` provides, \
             so put `consent_lookup` first"
        );
        assert_eq!(
            check(false, &[&lookup, &plain, &lookup, &gate]),
            "routes[0] (r): `consent_lookup` appears more than once in its chain (listener and \
             route filters together), at routes[0].filters[0] and at routes[0].filters[2]; it \
             may appear once per chain"
        );
        // Confining in shadow: refused on a PHI route, allowed elsewhere. A filter that declares
        // nothing is never refused.
        assert_eq!(
            check(true, &[&lookup, &gate]),
            "routes[0].filters[1] (consent_gate): mode shadow is not allowed on a route that \
             carries PHI (routes[0] (r) has phi: true): `consent_gate` confines access, and in \
             mode shadow a request it refuses still goes on"
        );
        let plain_shadow = filter("plain", Mode::Shadow, Declaration::default());
        assert_eq!(check(true, &[&plain_shadow, &plain]), "");

        // A user's identity filter beside the built-in one: two writers of the caller.
        let jwt = chain("[ {kind: jwt_auth} ]").unwrap().route_filters[0][0].clone();
        let api_key = filter(
            "api_key",
            Mode::Enforce,
            Declaration::new().provides(&[Capability::Principal]),
        );
        assert_eq!(
            check(false, &[&jwt, &api_key]),
            "routes[0] (r): `api_key` (routes[0].filters[1]) provides the verified caller, which \
             `jwt_auth` (routes[0].filters[0]) provides already; a chain has one provider of it"
        );
        // ...and in place of it, it satisfies the built-in filters that need a caller.
        let tenant = chain("[ {kind: jwt_auth}, {kind: tenant, config: {resolve: [header]}} ]")
            .unwrap()
            .route_filters[0][1]
            .clone();
        assert_eq!(check(true, &[&api_key, &tenant]), "");
        assert!(check(true, &[&tenant, &api_key]).contains(
            "`tenant` (routes[0].filters[0]) runs before `api_key` (routes[0].filters[1]); it \
             needs the verified caller that `api_key` provides"
        ));
        // A user's classifier on a FHIR route competes with the gateway's.
        let classifier = filter(
            "classifier",
            Mode::Enforce,
            Declaration::new().provides(&[Capability::Classification]),
        );
        let mut fhir_route = route(false);
        fhir_route.fhir = true;
        assert_eq!(
            check_chain(0, &fhir_route, &placed(&[&classifier]))
                .err()
                .map(|e| e.0)
                .unwrap_or_default(),
            "routes[0] (r): `classifier` (routes[0].filters[0]) provides the FHIR classification \
             of the request, which the gateway provides already on this route; a chain has one \
             provider of it"
        );
    }

    #[test]
    fn readers_follow_their_provider_when_there_is_one() {
        // rbac and fhir_mask work without a caller (caller-less rules; the strictest masking)...
        assert!(route_with(
            false,
            false,
            "[ {kind: rbac, config: {rules: [{effect: allow, methods: [HEAD]}]}}, \
             {kind: fhir_mask, config: {default: {Patient: [{path: name, action: redact}]}}} ]"
        )
        .is_ok());
        // ...but never before the jwt_auth of their chain.
        let e = error_of(chain(
            "[ {kind: rbac, config: {rules: [{effect: allow}]}}, {kind: jwt_auth} ]",
        ));
        assert_eq!(
            e,
            "routes[0] (fhir): `rbac` (routes[0].filters[0]) runs before `jwt_auth` \
             (routes[0].filters[1]); it reads the verified caller that `jwt_auth` provides, so \
             put `jwt_auth` first"
        );
        // A jwt_auth in mode off does not run: the reader has no provider, which is allowed.
        assert!(chain(
            "[ {kind: rbac, config: {rules: [{effect: allow}]}}, {kind: jwt_auth, config: {mode: off}} ]"
        )
        .is_ok());
    }

    #[test]
    fn overlapping_binds_are_refused() {
        let two = |a: &str, b: &str| {
            MINIMAL.replace(
                "  - { name: public, channel: public, listen: \"127.0.0.1:0\" }",
                &format!("  - {{ name: public, channel: public, listen: \"{a}\" }}\n  - {{ name: internal, channel: internal, listen: \"{b}\" }}"),
            )
        };
        for (a, b) in [
            ("0.0.0.0:8443", "127.0.0.1:8443"),
            ("127.0.0.1:8443", "0.0.0.0:8443"),
            ("[::]:8443", "127.0.0.1:8443"),
            ("10.0.0.1:8443", "10.0.0.1:8443"),
        ] {
            let e = load_str(&two(a, b), PathBuf::from(".")).err().unwrap().0;
            assert!(
                e.starts_with("listeners[1].listen: address"),
                "{a} {b}: {e}"
            );
            assert!(e.contains("listeners[0].listen"), "{e}");
        }
        for (a, b) in [
            ("0.0.0.0:8443", "0.0.0.0:9443"),
            ("127.0.0.1:8443", "127.0.0.2:8443"),
            ("0.0.0.0:8443", "[::1]:8443"),
        ] {
            assert!(load_str(&two(a, b), PathBuf::from(".")).is_ok(), "{a} {b}");
        }
        // The admin listener counts too.
        let text = format!(
            "admin: {{ listen: \"0.0.0.0:9901\" }}\n{}",
            two("127.0.0.1:9901", "127.0.0.1:1")
        );
        let e = load_str(&text, PathBuf::from(".")).err().unwrap().0;
        assert!(e.contains("overlaps 0.0.0.0:9901 of admin.listen"), "{e}");
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
        let dir = std::env::temp_dir().join(format!("caregate-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "from-a-file\n").unwrap();
        let r = substitute_env(&format!("a: \"${{file:{}}}\"", f.display()), look).unwrap();
        assert_eq!(r, "a: \"from-a-file\"");
        std::fs::write(&f, "two\nlines\n").unwrap();
        let e = substitute_env(&format!("a: ${{file:{}}}", f.display()), look)
            .err()
            .unwrap()
            .0;
        assert!(e.contains("line break") && !e.contains("two"), "{e}");
        assert!(substitute_env("a: ${file:relative/path}", look).is_err());
        assert!(substitute_env("a: ${file:/nonexistent/caregate/secret}", look).is_err());
        let _ = std::fs::remove_dir_all(&dir);
        assert!(substitute_env("a: ${1X}", look).is_err());
    }
}
