//! `rate_limit`: rate and concurrency limits per key, local to the replica or shared through
//! Redis, with a cost per FHIR interaction. See `docs/rate-limits.md` for the full reference.
//!
//! ```yaml
//! - kind: rate_limit
//!   config:
//!     mode: enforce                  # enforce | shadow | off
//!     hash_key: "${RATE_LIMIT_HASH_KEY}"   # required when a limit keys on subject or patient
//!     store: { kind: redis, url: "redis://127.0.0.1:6379/0", timeout_ms: 20, fallback: local, local_share: 0.5 }
//!     costs: { search: 5, "$everything": 50 }
//!     limits:
//!       - { name: per-client, key: [client_id], rate: 100, per_seconds: 60, burst: 20 }
//!       - { name: per-user-concurrency, key: [subject], concurrency: 10 }
//! ```
//!
//! Every request is checked against every limit, concurrency limits first, then rate limits in
//! config order; the first refusal refuses (429 `rate_limited` with `Retry-After` and the IETF
//! `RateLimit-Policy` / `RateLimit` fields, draft-ietf-httpapi-ratelimit-headers-10), and the
//! local units other limits took for the refused request are given back. With the `deny`
//! fallback and Redis unavailable: 503 `rate_limit_unavailable` with `Retry-After`.
//!
//! Keys never hold a person's id in clear: with `hash_key` every bucket key is stored as a
//! truncated HMAC-SHA256. Metric labels carry route and limit names only.

use crate::ctx::Writer;
use crate::identity::{Principal, Tenant};
use crate::registry::{parse_config, BuildContext, BuildError};
use crate::{
    BackgroundTask, Decision, Filter, LocalReply, Mode, RequestCtx, RequestHeader, ResponseHeader,
    Result,
};
use async_trait::async_trait;
use caregate_fhir::FhirRequest;
use caregate_ratelimit::cluster::{
    Backend, ClusterConfig, ClusterLimiter, Fallback as ClusterFallback, Source,
};
use caregate_ratelimit::concurrency::{ConcurrencyLimiter, ConcurrencyPermit};
use caregate_ratelimit::cost::CostTable;
use caregate_ratelimit::keys::{compose, KeyHasher};
use caregate_ratelimit::local::LocalStore;
use caregate_ratelimit::redis_backend::RedisBackend;
use caregate_ratelimit::{Outcome, Quota, SystemClock};
use http::{HeaderName, HeaderValue, StatusCode};
use once_cell::sync::Lazy;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A counter family, registered with the default registry. A second registration of the same
/// name (the crate compiled twice into one test binary) keeps counting, unexported.
fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    #[allow(clippy::expect_used)]
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric name");
    let _ = prometheus::register(Box::new(c.clone()));
    c
}

static DECISIONS: Lazy<IntCounterVec> = Lazy::new(|| {
    counter(
        "caregate_ratelimit_decisions_total",
        "rate_limit decisions per limit, by route, limit name and result \
         (allowed|limited|shadow_limited|unavailable|shadow_unavailable).",
        &["route", "limit", "result"],
    )
});

static RATE_LIMITED: Lazy<IntCounterVec> = Lazy::new(|| {
    counter(
        "caregate_rate_limited_total",
        "Requests refused by rate_limit (enforce mode), by route and limit name.",
        &["route", "limit"],
    )
});

static FALLBACK: Lazy<IntGaugeVec> = Lazy::new(|| {
    #[allow(clippy::expect_used)]
    let g = IntGaugeVec::new(
        Opts::new(
            "caregate_ratelimit_fallback",
            "1 while a shared rate-limit store is unavailable and its fallback applies, else 0.",
        ),
        &["store"],
    )
    .expect("a valid metric name");
    let _ = prometheus::register(Box::new(g.clone()));
    g
});

static STORE_ERRORS: Lazy<IntCounterVec> = Lazy::new(|| {
    counter(
        "caregate_ratelimit_store_errors_total",
        "Failed calls to a shared rate-limit store, by kind (timeout|error).",
        &["kind"],
    )
});

/// The writer of this filter's per-request fact ([`RateLimitState`]).
#[derive(Debug, Clone, Copy)]
pub struct RateLimitWriter;

impl Writer for RateLimitWriter {
    const NAME: &'static str = "rate_limit";
}

/// Per-request state (written by `rate_limit` only; a chain may hold several `rate_limit`
/// filters, e.g. one for the listener and one for the route, which share it): the concurrency
/// slots the request holds (given back in the logging hook, or when the ctx is dropped) and the
/// `RateLimit` and `RateLimit-Policy` fields the response gets.
#[derive(Debug, Default)]
pub struct RateLimitState {
    permits: Mutex<Vec<ConcurrencyPermit>>,
    /// The `RateLimit` field value for an allowed request (enforce mode only): the most
    /// constraining limit of every `rate_limit` filter that ran, with its units left.
    rate_limit: Option<(u64, HeaderValue)>,
    /// The `RateLimit-Policy` items of the filters that set `rate_limit`.
    policies: Vec<HeaderValue>,
}

/// Write this filter's part of the request's state, merged with what an earlier `rate_limit`
/// filter of the chain wrote.
fn put_state(
    ctx: &mut RequestCtx,
    permits: Vec<ConcurrencyPermit>,
    rate_limit: Option<(u64, HeaderValue)>,
    policy: Option<&HeaderValue>,
) {
    let policies: Vec<HeaderValue> = match (&rate_limit, policy) {
        (Some(_), Some(p)) => vec![p.clone()],
        _ => Vec::new(),
    };
    if let Some(state) = ctx.facts.get_mut::<RateLimitState>(RateLimitWriter) {
        match state.permits.lock() {
            Ok(mut held) => held.extend(permits),
            Err(p) => p.into_inner().extend(permits),
        }
        state.policies.extend(policies);
        let tighter = match (&state.rate_limit, &rate_limit) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some((have, _)), Some((new, _))) => new < have,
        };
        if tighter {
            state.rate_limit = rate_limit;
        }
        return;
    }
    let _ = ctx.facts.insert(
        RateLimitWriter,
        RateLimitState {
            permits: Mutex::new(permits),
            rate_limit,
            policies,
        },
    );
}

impl RateLimitState {
    /// Concurrency slots still held.
    pub fn held(&self) -> usize {
        match self.permits.lock() {
            Ok(p) => p.len(),
            Err(p) => p.into_inner().len(),
        }
    }

    fn release(&self) {
        let mut permits = match self.permits.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        permits.clear();
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    #[serde(default)]
    pub mode: Mode,
    /// The HMAC secret bucket keys are hashed with (at least 16 bytes; use `${ENV}` or
    /// `${file:/abs/path}`).
    #[serde(default)]
    pub hash_key: Option<String>,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub costs: BTreeMap<String, u64>,
    pub limits: Vec<LimitConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    #[default]
    Local,
    Redis,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackKind {
    #[default]
    Local,
    Deny,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default)]
    pub kind: StoreKind,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default)]
    pub fallback: Option<FallbackKind>,
    #[serde(default)]
    pub local_share: Option<f64>,
    #[serde(default)]
    pub max_keys: Option<usize>,
    /// TLS files of a `rediss://` store: its CA instead of the system's roots, and a client
    /// certificate for Redis's `tls-auth-clients`.
    #[serde(default)]
    pub tls: Option<StoreTls>,
}

/// `store.tls`: PEM files, relative to the config file's folder.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreTls {
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub client_cert: Option<std::path::PathBuf>,
    #[serde(default)]
    pub client_key: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPart {
    ClientId,
    Subject,
    Tenant,
    Patient,
    Route,
    ApiVersion,
    ClientAddr,
}

impl KeyPart {
    fn name(self) -> &'static str {
        match self {
            KeyPart::ClientId => "client_id",
            KeyPart::Subject => "subject",
            KeyPart::Tenant => "tenant",
            KeyPart::Patient => "patient",
            KeyPart::Route => "route",
            KeyPart::ApiVersion => "api_version",
            KeyPart::ClientAddr => "client_addr",
        }
    }

    /// Names a person: stored only hashed.
    fn personal(self) -> bool {
        matches!(self, KeyPart::Subject | KeyPart::Patient)
    }

    /// Read from the verified caller.
    fn of_principal(self) -> bool {
        matches!(
            self,
            KeyPart::ClientId | KeyPart::Subject | KeyPart::Tenant | KeyPart::Patient
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    pub name: String,
    #[serde(default)]
    pub key: Vec<KeyPart>,
    #[serde(default)]
    pub rate: Option<u64>,
    #[serde(default)]
    pub per_seconds: Option<u64>,
    #[serde(default)]
    pub burst: Option<u64>,
    #[serde(default)]
    pub concurrency: Option<u32>,
}

enum LimitKind {
    Rate { quota: Quota },
    Concurrency { max: u32 },
}

struct Limit {
    name: String,
    key: Vec<KeyPart>,
    kind: LimitKind,
}

enum Store {
    Local(Arc<LocalStore>),
    Cluster(Arc<ClusterLimiter>),
}

/// A Redis-backed limiter and the task that keeps its connection open.
type SharedRedis = (Arc<ClusterLimiter>, Arc<RedisWarmer>);

/// The stores shared by every `rate_limit` filter of one config generation: limits with the
/// same name share their buckets across routes.
#[derive(Default)]
struct Shared {
    local: Mutex<HashMap<usize, Arc<LocalStore>>>,
    cluster: Mutex<HashMap<String, SharedRedis>>,
    concurrency: ConcurrencyLimiter,
}

pub struct RateLimitFilter {
    mode: Mode,
    limits: Vec<Limit>,
    hasher: Option<KeyHasher>,
    costs: CostTable,
    store: Store,
    concurrency: ConcurrencyLimiter,
    policy: Option<HeaderValue>,
    declaration: crate::Declaration,
    warmer: Option<Arc<RedisWarmer>>,
}

/// Opens the Redis connection in the background (at start and after a failure), with a longer
/// connect timeout than a request may wait.
struct RedisWarmer {
    backend: Arc<RedisBackend>,
    limiter: Arc<ClusterLimiter>,
    connect_timeout: Duration,
}

#[async_trait]
impl BackgroundTask for RedisWarmer {
    async fn run(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let every = self
            .limiter
            .config()
            .retry_after
            .max(Duration::from_millis(100));
        loop {
            if *shutdown.borrow() {
                return;
            }
            if !self.backend.is_connected() {
                let _ = self.backend.connect(self.connect_timeout).await;
            }
            FALLBACK
                .with_label_values(&["redis"])
                .set(i64::from(self.limiter.degraded()));
            tokio::select! {
                _ = shutdown.changed() => {}
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

// Not `once`: a listener's rate_limit (say, per client address, before authentication) and a
// route's (per client or user) run in one chain and share the request's state.
const DECLARE_NONE: crate::Declaration = crate::Declaration::new();
const DECLARE_PRINCIPAL: crate::Declaration =
    crate::Declaration::new().needs(&[crate::Capability::Principal]);
const DECLARE_PRINCIPAL_TENANT: crate::Declaration = crate::Declaration::new()
    .needs(&[crate::Capability::Principal])
    .reads(&[crate::Capability::Tenant]);

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn build_limits(list: &[LimitConfig]) -> std::result::Result<Vec<Limit>, BuildError> {
    if list.is_empty() {
        return Err(BuildError::new("config.limits", "name at least one limit"));
    }
    let mut out: Vec<Limit> = Vec::with_capacity(list.len());
    for (i, l) in list.iter().enumerate() {
        let place = format!("config.limits[{i}]");
        if !valid_name(&l.name) {
            return Err(BuildError::new(
                format!("{place}.name"),
                "a limit name is 1-64 characters of a-z, 0-9, - and _, starting with a letter or digit",
            ));
        }
        if out.iter().any(|o| o.name == l.name) {
            return Err(BuildError::new(
                format!("{place}.name"),
                format!("a second limit named `{}`", l.name),
            ));
        }
        let mut seen = Vec::new();
        for (k, part) in l.key.iter().enumerate() {
            if seen.contains(part) {
                return Err(BuildError::new(
                    format!("{place}.key[{k}]"),
                    format!("`{}` is named twice", part.name()),
                ));
            }
            seen.push(*part);
        }
        let kind = match (l.rate, l.per_seconds, l.concurrency) {
            (None, None, Some(max)) => {
                if l.burst.is_some() {
                    return Err(BuildError::new(
                        format!("{place}.burst"),
                        "burst applies to rate limits only",
                    ));
                }
                if max == 0 {
                    return Err(BuildError::new(
                        format!("{place}.concurrency"),
                        "must be at least 1",
                    ));
                }
                LimitKind::Concurrency { max }
            }
            (Some(rate), per, None) => {
                let per = per.unwrap_or(1);
                if per == 0 || per > 86_400 {
                    return Err(BuildError::new(
                        format!("{place}.per_seconds"),
                        "must be between 1 and 86400",
                    ));
                }
                let burst = l.burst.unwrap_or(rate);
                let quota = Quota::new(rate, Duration::from_secs(per), burst)
                    .map_err(|e| BuildError::new(place.clone(), e.to_string()))?;
                LimitKind::Rate { quota }
            }
            (None, Some(_), _) => {
                return Err(BuildError::new(
                    format!("{place}.per_seconds"),
                    "per_seconds needs rate",
                ))
            }
            _ => {
                return Err(BuildError::new(
                    place,
                    "a limit has either rate (with per_seconds, burst) or concurrency",
                ))
            }
        };
        out.push(Limit {
            name: l.name.clone(),
            key: l.key.clone(),
            kind,
        });
    }
    Ok(out)
}

/// Read the TLS files of a Redis store (checked at build, as `caregate check` reads every
/// certificate file of a config).
fn store_tls(
    t: &StoreTls,
    cx: &BuildContext,
) -> std::result::Result<caregate_ratelimit::redis_backend::TlsFiles, BuildError> {
    let read = |p: &std::path::Path, field: &str| {
        let path = cx.resolve(p);
        std::fs::read(&path).map_err(|e| {
            BuildError::new(
                format!("config.store.tls.{field}"),
                format!("cannot read {}: {e}", path.display()),
            )
        })
    };
    let root_ca = match &t.ca_file {
        Some(p) => Some(read(p, "ca_file")?),
        None => None,
    };
    let client = match (&t.client_cert, &t.client_key) {
        (Some(c), Some(k)) => Some((read(c, "client_cert")?, read(k, "client_key")?)),
        (None, None) => None,
        _ => {
            return Err(BuildError::new(
                "config.store.tls",
                "client_cert and client_key go together",
            ))
        }
    };
    Ok(caregate_ratelimit::redis_backend::TlsFiles { root_ca, client })
}

fn build_store(
    c: &StoreConfig,
    shared: &Shared,
    cx: &BuildContext,
) -> std::result::Result<(Store, Option<Arc<RedisWarmer>>), BuildError> {
    let max_keys = c.max_keys.unwrap_or(100_000);
    if max_keys == 0 {
        return Err(BuildError::new(
            "config.store.max_keys",
            "must be at least 1",
        ));
    }
    let local = |max_keys: usize| {
        let mut m = match shared.local.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry(max_keys)
            .or_insert_with(|| Arc::new(LocalStore::new(max_keys)))
            .clone()
    };
    match c.kind {
        StoreKind::Local => {
            for (set, field) in [
                (c.url.is_some(), "url"),
                (c.timeout_ms.is_some(), "timeout_ms"),
                (c.retry_after_ms.is_some(), "retry_after_ms"),
                (c.connect_timeout_ms.is_some(), "connect_timeout_ms"),
                (c.fallback.is_some(), "fallback"),
                (c.local_share.is_some(), "local_share"),
                (c.tls.is_some(), "tls"),
            ] {
                if set {
                    return Err(BuildError::new(
                        format!("config.store.{field}"),
                        "applies to `kind: redis` only",
                    ));
                }
            }
            Ok((Store::Local(local(max_keys)), None))
        }
        StoreKind::Redis => {
            let Some(url) = c.url.as_deref() else {
                return Err(BuildError::new(
                    "config.store.url",
                    "a redis store needs its url (redis://host:port/db or rediss://...)",
                ));
            };
            let timeout = c.timeout_ms.unwrap_or(20);
            if timeout == 0 || timeout > 10_000 {
                return Err(BuildError::new(
                    "config.store.timeout_ms",
                    "must be between 1 and 10000",
                ));
            }
            let retry_after = c.retry_after_ms.unwrap_or(1000);
            if retry_after == 0 || retry_after > 600_000 {
                return Err(BuildError::new(
                    "config.store.retry_after_ms",
                    "must be between 1 and 600000",
                ));
            }
            let connect_timeout = c.connect_timeout_ms.unwrap_or(2000).max(timeout);
            let fallback = match c.fallback.unwrap_or_default() {
                FallbackKind::Local => {
                    let share = c.local_share.unwrap_or(0.5);
                    if !(share > 0.0 && share <= 1.0) {
                        return Err(BuildError::new(
                            "config.store.local_share",
                            "must be above 0 and at most 1",
                        ));
                    }
                    ClusterFallback::Local { share }
                }
                FallbackKind::Deny => {
                    if c.local_share.is_some() {
                        return Err(BuildError::new(
                            "config.store.local_share",
                            "applies to `fallback: local` only",
                        ));
                    }
                    ClusterFallback::Deny
                }
            };
            let tls = match &c.tls {
                Some(t) => Some(store_tls(t, cx)?),
                None => None,
            };
            // The store's identity: one connection per store, shared by the filters that name
            // the same one (the TLS files by their contents, so a renewed file is a new store).
            let tls_id = tls.as_ref().map(|t| {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                t.root_ca.hash(&mut h);
                t.client.hash(&mut h);
                h.finish()
            });
            let id = format!(
                "{url}\u{0}{timeout}\u{0}{retry_after}\u{0}{fallback:?}\u{0}{max_keys}\u{0}{tls_id:?}"
            );
            let mut m = match shared.cluster.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            if let Some((limiter, warmer)) = m.get(&id) {
                return Ok((Store::Cluster(limiter.clone()), Some(warmer.clone())));
            }
            let backend = Arc::new(
                RedisBackend::with_tls(url, Duration::from_millis(timeout), tls)
                    .map_err(|e| BuildError::new("config.store.url", e))?,
            );
            let limiter = Arc::new(ClusterLimiter::new(
                backend.clone() as Arc<dyn Backend>,
                ClusterConfig {
                    timeout: Duration::from_millis(timeout),
                    retry_after: Duration::from_millis(retry_after),
                    fallback,
                },
                max_keys,
                Arc::new(SystemClock::default()),
            ));
            let warmer = Arc::new(RedisWarmer {
                backend,
                limiter: limiter.clone(),
                connect_timeout: Duration::from_millis(connect_timeout),
            });
            m.insert(id, (limiter.clone(), warmer.clone()));
            Ok((Store::Cluster(limiter), Some(warmer)))
        }
    }
}

/// A Structured Fields string (RFC 9651 sf-string): limit names are plain, but quote safely.
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        if (' '..='~').contains(&c) {
            out.push(c);
        }
    }
    out.push('"');
    out
}

pub fn build(
    config: serde_yaml::Value,
    cx: &BuildContext,
) -> std::result::Result<Arc<dyn Filter>, BuildError> {
    let c: RateLimitConfig = parse_config(config)?;
    let limits = build_limits(&c.limits)?;
    let personal = limits.iter().any(|l| l.key.iter().any(|p| p.personal()));
    let hasher = match &c.hash_key {
        Some(secret) => Some(
            KeyHasher::new(secret.as_bytes()).map_err(|e| BuildError::new("config.hash_key", e))?,
        ),
        None if personal => {
            return Err(BuildError::new(
                "config.hash_key",
                "a limit keys on subject or patient: set hash_key (a secret of at least 16 bytes, \
                 e.g. \"${file:/etc/caregate/ratelimit.key}\") so those ids are stored only hashed",
            ))
        }
        None => None,
    };
    let costs =
        CostTable::with_overrides(&c.costs).map_err(|e| BuildError::new("config.costs", e))?;
    let shared = cx.shared.get_or_init(Shared::default);
    let (store, warmer) = build_store(&c.store, &shared, cx)?;
    let policies: Vec<String> = limits
        .iter()
        .filter_map(|l| match &l.kind {
            LimitKind::Rate { quota } => Some(format!(
                "{};q={};w={}",
                sf_string(&l.name),
                quota.rate(),
                quota.period().as_secs()
            )),
            LimitKind::Concurrency { .. } => None,
        })
        .collect();
    let policy = if policies.is_empty() {
        None
    } else {
        HeaderValue::from_str(&policies.join(", ")).ok()
    };
    let needs_principal = limits
        .iter()
        .any(|l| l.key.iter().any(|p| p.of_principal()));
    let reads_tenant = limits.iter().any(|l| l.key.contains(&KeyPart::Tenant));
    let declaration = match (needs_principal, reads_tenant) {
        (false, _) => DECLARE_NONE,
        (true, false) => DECLARE_PRINCIPAL,
        (true, true) => DECLARE_PRINCIPAL_TENANT,
    };
    Ok(Arc::new(RateLimitFilter {
        mode: c.mode,
        limits,
        hasher,
        costs,
        store,
        concurrency: shared.concurrency.clone(),
        policy,
        declaration,
        warmer,
    }))
}

/// What refused a request.
struct Refusal {
    limit: usize,
    outcome: Outcome,
    unavailable: bool,
}

impl RateLimitFilter {
    /// The stored key of `limit` for this request. A part the request lacks (an anonymous
    /// caller's subject, a token without client id, ...) is replaced by the client address,
    /// marked as such (`subject@addr=...`), never by an empty value.
    fn bucket_key(&self, limit: &Limit, ctx: &RequestCtx) -> String {
        let principal = ctx.facts.get::<Principal>();
        let addr = || match ctx.client_addr {
            Some(a) => a.to_canonical().to_string(),
            None => "unknown".to_string(),
        };
        let parts: Vec<String> = limit
            .key
            .iter()
            .map(|part| {
                let value = match part {
                    KeyPart::ClientId => principal.and_then(|p| p.client_id.clone()),
                    KeyPart::Subject => principal.map(|p| p.subject.clone()),
                    KeyPart::Tenant => ctx
                        .facts
                        .get::<Tenant>()
                        .map(|t| t.id.clone())
                        .or_else(|| principal.and_then(|p| p.tenant.clone())),
                    KeyPart::Patient => principal.and_then(|p| p.patient.clone()),
                    KeyPart::Route => Some(ctx.route.as_deref().unwrap_or("none").to_string()),
                    KeyPart::ApiVersion => Some(match &ctx.api_version {
                        Some((api, version)) => format!("{api}/{version}"),
                        None => "none".to_string(),
                    }),
                    KeyPart::ClientAddr => Some(addr()),
                };
                match value {
                    Some(v) => format!("{}={v}", part.name()),
                    None => format!("{}@addr={}", part.name(), addr()),
                }
            })
            .collect();
        let composed = compose(parts.iter().map(String::as_str));
        match &self.hasher {
            Some(h) => format!("{}:{}", limit.name, h.hash(composed.as_bytes())),
            None => format!("{}:{composed}", limit.name),
        }
    }

    fn record(&self, route: &str, limit: &str, result: &'static str) {
        DECISIONS.with_label_values(&[route, limit, result]).inc();
    }

    fn refusal_reply(&self, r: &Refusal) -> LocalReply {
        let limit = &self.limits[r.limit];
        let retry = r.outcome.retry_after_secs();
        let retry_value = HeaderValue::from(retry);
        if r.unavailable {
            return LocalReply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "rate_limit_unavailable",
                "the rate limit cannot be checked right now; retry later",
            )
            .with_header(http::header::RETRY_AFTER, retry_value);
        }
        let mut reply = LocalReply::error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            match limit.kind {
                LimitKind::Rate { .. } => "the rate limit of this route was exceeded",
                LimitKind::Concurrency { .. } => {
                    "too many requests of this caller are in progress on this route"
                }
            },
        )
        .with_header(http::header::RETRY_AFTER, retry_value);
        if let LimitKind::Rate { .. } = limit.kind {
            if let Some(p) = &self.policy {
                reply = reply.with_header(HeaderName::from_static("ratelimit-policy"), p.clone());
            }
            let field = format!(
                "{};r={};t={}",
                sf_string(&limit.name),
                r.outcome.remaining,
                retry
            );
            if let Ok(v) = HeaderValue::from_str(&field) {
                reply = reply.with_header(HeaderName::from_static("ratelimit"), v);
            }
        }
        reply
    }

    /// Checks the rate limits: the outcomes of those checked, and the first refusal.
    async fn check_rates(
        &self,
        keys: &[String],
        cost: u64,
    ) -> (Vec<(usize, Outcome)>, Option<Refusal>) {
        let rates: Vec<(usize, &Quota)> = self
            .limits
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.kind {
                LimitKind::Rate { quota } => Some((i, quota)),
                LimitKind::Concurrency { .. } => None,
            })
            .collect();
        let mut done: Vec<(usize, Outcome)> = Vec::with_capacity(rates.len());
        match &self.store {
            Store::Local(store) => {
                for &(i, quota) in &rates {
                    let o = store.check(&keys[i], quota, cost);
                    if !o.allowed {
                        // Give back what the limits before it took for this request.
                        for &(j, _) in &done {
                            if let LimitKind::Rate { quota } = &self.limits[j].kind {
                                store.refund(&keys[j], quota, cost);
                            }
                        }
                        return (
                            done,
                            Some(Refusal {
                                limit: i,
                                outcome: o,
                                unavailable: false,
                            }),
                        );
                    }
                    done.push((i, o));
                }
                (done, None)
            }
            Store::Cluster(limiter) => {
                // Sent together on the one multiplexed connection: one round trip.
                let checks = futures_util::future::join_all(
                    rates
                        .iter()
                        .map(|&(i, quota)| limiter.check(&keys[i], quota, cost)),
                )
                .await;
                let mut refusal = None;
                for (&(i, _), c) in rates.iter().zip(checks.iter()) {
                    if let Some(e) = &c.error {
                        STORE_ERRORS.with_label_values(&[e.kind()]).inc();
                    }
                    if refusal.is_none() && !c.outcome.allowed {
                        refusal = Some(Refusal {
                            limit: i,
                            outcome: c.outcome,
                            unavailable: c.source == Source::Unavailable,
                        });
                    } else {
                        done.push((i, c.outcome));
                    }
                }
                FALLBACK
                    .with_label_values(&["redis"])
                    .set(i64::from(limiter.degraded()));
                if refusal.is_some() {
                    // Give back what the local fallback took for this request (the shared
                    // store's units stay taken: giving them back would be a second round trip).
                    for (&(i, quota), c) in rates.iter().zip(checks.iter()) {
                        if c.source == Source::Fallback && c.outcome.allowed {
                            limiter.refund_fallback(&keys[i], quota, cost);
                        }
                    }
                }
                (done, refusal)
            }
        }
    }
}

#[async_trait]
impl Filter for RateLimitFilter {
    fn kind(&self) -> &'static str {
        "rate_limit"
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    /// Needs the verified caller when a limit keys on subject, patient, client_id or tenant
    /// (and reads the verified tenant when one keys on tenant); once per chain.
    fn declaration(&self) -> crate::Declaration {
        self.declaration
    }

    fn background(&self) -> Option<Arc<dyn BackgroundTask>> {
        self.warmer
            .as_ref()
            .map(|w| w.clone() as Arc<dyn BackgroundTask>)
    }

    async fn request_filter(
        &self,
        _req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        let shadow = self.mode == Mode::Shadow;
        let cost = self.costs.cost(ctx.facts.get::<FhirRequest>());
        let route = ctx.route.clone();
        let route: &str = route.as_deref().unwrap_or("none");
        let keys: Vec<String> = self
            .limits
            .iter()
            .map(|l| self.bucket_key(l, ctx))
            .collect();

        // Concurrency first: its slots can be given back at once.
        let mut permits = Vec::new();
        let mut refusal = None;
        let busy = |i: usize| Refusal {
            limit: i,
            outcome: Outcome {
                allowed: false,
                remaining: 0,
                reset_after: Duration::from_secs(1),
                retry_after: Duration::from_secs(1),
            },
            unavailable: false,
        };
        for (i, l) in self.limits.iter().enumerate() {
            let LimitKind::Concurrency { max } = l.kind else {
                continue;
            };
            if shadow {
                // The slot is taken whatever the limit, so the in-flight count stays true.
                let (p, over) = self.concurrency.acquire_counting(&keys[i], max);
                permits.push(p);
                if over && refusal.is_none() {
                    refusal = Some(busy(i));
                } else if !over {
                    self.record(route, &l.name, "allowed");
                }
                continue;
            }
            match self.concurrency.try_acquire(&keys[i], max) {
                Ok(p) => {
                    permits.push(p);
                    self.record(route, &l.name, "allowed");
                }
                Err(_) => {
                    refusal = Some(busy(i));
                    break;
                }
            }
        }

        let mut header = None;
        if refusal.is_none() {
            let (done, refused) = self.check_rates(&keys, cost).await;
            for (i, _) in &done {
                self.record(route, &self.limits[*i].name, "allowed");
            }
            // The most constraining limit: the fewest units left, then the longest wait.
            header = done
                .iter()
                .min_by_key(|(_, o)| (o.remaining, std::cmp::Reverse(o.reset_after)))
                .and_then(|(i, o)| {
                    HeaderValue::from_str(&format!(
                        "{};r={};t={}",
                        sf_string(&self.limits[*i].name),
                        o.remaining,
                        o.reset_secs()
                    ))
                    .ok()
                    .map(|v| (o.remaining, v))
                });
            refusal = refused;
        }

        let Some(refusal) = refusal else {
            let header = if shadow { None } else { header };
            put_state(ctx, permits, header, self.policy.as_ref());
            return Ok(Decision::Continue);
        };

        let name = &self.limits[refusal.limit].name;
        let result = match (shadow, refusal.unavailable) {
            (false, false) => "limited",
            (false, true) => "unavailable",
            (true, false) => "shadow_limited",
            (true, true) => "shadow_unavailable",
        };
        self.record(route, name, result);
        if !shadow {
            RATE_LIMITED.with_label_values(&[route, name]).inc();
            // Enforced: the request ends here, its slots go back now.
            drop(permits);
            permits = Vec::new();
        }
        // In shadow the request goes on (the chain counts the reply as `shadow_deny`) and keeps
        // its slots until it ends; no rate-limit field is sent.
        put_state(ctx, permits, None, None);
        Ok(Decision::Respond(self.refusal_reply(&refusal)))
    }

    fn response_filter(&self, resp: &mut ResponseHeader, ctx: &mut RequestCtx) -> Result<()> {
        let Some(state) = ctx.facts.get::<RateLimitState>() else {
            return Ok(());
        };
        // Every rate_limit filter of the chain writes the same merged fields.
        if let Some((_, v)) = &state.rate_limit {
            let _ = resp.insert_header(HeaderName::from_static("ratelimit"), v.clone());
            let joined: Vec<&[u8]> = state.policies.iter().map(HeaderValue::as_bytes).collect();
            if let Ok(p) = HeaderValue::from_bytes(&joined.join(&b", "[..])) {
                if !p.is_empty() {
                    let _ = resp.insert_header(HeaderName::from_static("ratelimit-policy"), p);
                }
            }
        }
        Ok(())
    }

    /// Gives the request's concurrency slots back (dropping the ctx would too).
    fn logging(&self, ctx: &RequestCtx) {
        if let Some(state) = ctx.facts.get::<RateLimitState>() {
            state.release();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use caregate_testkit::{principal, Harness};

    /// A chain of filters built by this module's own `build` (so the facts it writes have the
    /// types this test sees).
    fn harness(yaml: &str) -> Harness {
        let specs: Vec<crate::FilterSpec> = serde_yaml::from_str(yaml).unwrap();
        let cx = BuildContext::default();
        let filters = specs
            .into_iter()
            .map(|s| build(s.config.unwrap(), &cx).unwrap())
            .collect();
        Harness::from_filters(filters)
    }

    fn build_err(yaml: &str) -> String {
        Harness::builtin(yaml).err().unwrap_or_default()
    }

    const KEY: &str = "hash_key: 0123456789abcdef0123456789abcdef";

    #[tokio::test]
    async fn a_listener_limit_and_a_route_limit_share_one_chain() {
        // The listener's per-address limit (generous) and the route's (tight) both count every
        // request; the response names the tighter one and both policies; slots of both go back.
        let h = harness(
            "- kind: rate_limit\n  config:\n    limits:\n      - { name: per-addr, key: [client_addr], rate: 100, per_seconds: 60 }\n      - { name: addr-in-flight, key: [client_addr], concurrency: 5 }\n- kind: rate_limit\n  config:\n    limits:\n      - { name: route-tight, key: [route], rate: 2, per_seconds: 60 }\n",
        );
        let addr = "192.0.2.9".parse().unwrap();
        let mut x = h.request("GET", "/api/x").client(addr);
        assert!(x.run_request().await.is_continue());
        assert_eq!(
            x.ctx.facts.get::<RateLimitState>().unwrap().held(),
            1,
            "the listener's concurrency slot"
        );
        let resp = x.respond(200, &[], b"ok");
        assert_eq!(resp.header("ratelimit"), Some("\"route-tight\";r=1;t=30"));
        assert_eq!(
            resp.header("ratelimit-policy"),
            Some("\"per-addr\";q=100;w=60, \"route-tight\";q=2;w=60")
        );
        x.logging();
        assert_eq!(x.ctx.facts.get::<RateLimitState>().unwrap().held(), 0);
        let mut y = h.request("GET", "/api/x").client(addr);
        assert!(y.run_request().await.is_continue());
        y.logging();
        // The route's limit refuses the third; the listener's had room.
        let mut z = h.request("GET", "/api/x").client(addr);
        let out = z.run_request().await;
        assert_eq!(out.status(), Some(429));
        z.logging();
        assert_eq!(z.ctx.facts.get::<RateLimitState>().unwrap().held(), 0);
    }

    #[tokio::test]
    async fn an_api_version_key_counts_each_version_apart() {
        let h = harness(
            "- kind: rate_limit\n  config:\n    limits:\n      - { name: per-version, key: [api_version], rate: 1, per_seconds: 60 }\n",
        );
        let version = |v: &str| Some((Arc::from("patient-api"), Arc::from(v)));
        let mut a = h.request("GET", "/v1/fhir/Patient");
        a.ctx.host().api_version = version("v1");
        assert!(a.run_request().await.is_continue());
        a.logging();
        // Another version has its own bucket; the same version again is refused.
        let mut b = h.request("GET", "/v2/fhir/Patient");
        b.ctx.host().api_version = version("v2");
        assert!(b.run_request().await.is_continue());
        b.logging();
        let mut c = h.request("GET", "/v1/fhir/Observation");
        c.ctx.host().api_version = version("v1");
        assert_eq!(c.run_request().await.status(), Some(429));
        c.logging();
    }

    #[tokio::test]
    async fn burst_then_429_with_headers() {
        let h = harness(
            "- kind: rate_limit\n  config:\n    limits:\n      - { name: per-addr, key: [client_addr], rate: 2, per_seconds: 60 }\n",
        );
        let addr = "192.0.2.7".parse().unwrap();
        for left in ["1", "0"] {
            let mut x = h.request("GET", "/api/x").client(addr);
            assert!(x.run_request().await.is_continue());
            let resp = x.respond(200, &[], b"ok");
            assert_eq!(
                resp.header("ratelimit"),
                Some(
                    format!(
                        "\"per-addr\";r={left};t={}",
                        if left == "1" { 30 } else { 60 }
                    )
                    .as_str()
                )
            );
            assert_eq!(
                resp.header("ratelimit-policy"),
                Some("\"per-addr\";q=2;w=60")
            );
            x.logging();
        }
        let mut x = h.request("GET", "/api/x").client(addr);
        let out = x.run_request().await;
        assert_eq!(out.status(), Some(429));
        assert_eq!(out.reason(), Some("rate_limited"));
        let reply = out.reply().unwrap().clone();
        assert_eq!(reply.body, crate::ReplyBody::Error);
        let header = x.reply(&reply);
        let get = |n: &str| {
            header
                .headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        assert_eq!(get("retry-after").as_deref(), Some("30"));
        assert_eq!(get("ratelimit").as_deref(), Some("\"per-addr\";r=0;t=30"));
        assert_eq!(
            get("ratelimit-policy").as_deref(),
            Some("\"per-addr\";q=2;w=60")
        );
        assert_eq!(header.headers.get_all("ratelimit").iter().count(), 1);
        assert_eq!(x.decisions(), [("rate_limit", "deny", "rate_limited")]);
        // Another address has its own bucket.
        let mut y = h
            .request("GET", "/api/x")
            .client("192.0.2.8".parse().unwrap());
        assert!(y.run_request().await.is_continue());
    }

    #[tokio::test]
    async fn shadow_counts_but_never_refuses_nor_sends_fields() {
        let h = harness(
            "- kind: rate_limit\n  config:\n    mode: shadow\n    limits:\n      - { name: one, key: [client_addr], rate: 1, per_seconds: 60 }\n      - { name: conc, key: [client_addr], concurrency: 1 }\n",
        );
        let addr = "192.0.2.9".parse().unwrap();
        let mut first = h.request("GET", "/x").client(addr);
        assert!(first.run_request().await.is_continue());
        let mut second = h.request("GET", "/x").client(addr);
        assert!(second.run_request().await.is_continue());
        assert_eq!(
            second.decisions()[0],
            ("rate_limit", "shadow_deny", "rate_limited")
        );
        let resp = second.respond(200, &[], b"");
        assert_eq!(resp.header("ratelimit"), None);
        assert_eq!(resp.header("retry-after"), None);
        // Both hold a slot while in flight; the logging hook gives them back.
        let state = |x: &caregate_testkit::Exchange<'_>| {
            x.ctx.facts.get::<RateLimitState>().unwrap().held()
        };
        assert_eq!((state(&first), state(&second)), (1, 1));
        first.logging();
        second.logging();
        assert_eq!((state(&first), state(&second)), (0, 0));
    }

    #[tokio::test]
    async fn concurrency_slots_are_given_back_at_the_end() {
        let h = harness(&format!(
            "- kind: rate_limit\n  config:\n    {KEY}\n    limits:\n      - {{ name: conc, key: [subject], concurrency: 2 }}\n",
        ));
        let p = || principal("dr-who");
        let mut a = h.request("GET", "/x").principal(p());
        let mut b = h.request("GET", "/x").principal(p());
        let mut c = h.request("GET", "/x").principal(p());
        assert!(a.run_request().await.is_continue());
        assert!(b.run_request().await.is_continue());
        let out = c.run_request().await;
        assert_eq!(out.status(), Some(429));
        assert_eq!(out.reason(), Some("rate_limited"));
        let hdr = c.reply(out.reply().unwrap());
        assert_eq!(hdr.headers.get("retry-after").unwrap(), "1");
        c.logging();
        // Someone else is not affected.
        let mut other = h.request("GET", "/x").principal(principal("nurse"));
        assert!(other.run_request().await.is_continue());
        a.logging();
        let mut d = h.request("GET", "/x").principal(p());
        assert!(d.run_request().await.is_continue(), "a's slot came back");
        drop(b); // dropping the ctx gives the slot back too
        let mut e = h.request("GET", "/x").principal(p());
        assert!(e.run_request().await.is_continue());
    }

    #[tokio::test]
    async fn costs_follow_the_fhir_classification() {
        let h = harness(
            "- kind: rate_limit\n  config:\n    costs: { search: 4 }\n    limits:\n      - { name: fhir, key: [client_addr], rate: 10, per_seconds: 3600 }\n",
        )
        .fhir("/fhir");
        let addr = "198.51.100.1".parse().unwrap();
        let remaining = |x: &mut caregate_testkit::Exchange<'_>| {
            x.respond(200, &[], b"{}")
                .header("ratelimit")
                .map(str::to_string)
        };
        let mut read = h.request("GET", "/fhir/Patient/1").client(addr);
        assert!(read.run_request().await.is_continue());
        assert!(
            remaining(&mut read).unwrap().contains("r=9"),
            "read costs 1"
        );
        let mut search = h.request("GET", "/fhir/Observation?code=x").client(addr);
        assert!(search.run_request().await.is_continue());
        assert!(
            remaining(&mut search).unwrap().contains("r=5"),
            "search costs 4"
        );
        // $everything costs 50, more than the whole bucket (10): it needs a full one.
        let mut everything = h.request("GET", "/fhir/Patient/1/$everything").client(addr);
        assert_eq!(everything.run_request().await.status(), Some(429));
        // The refused request took nothing: a read still passes.
        let mut read = h.request("GET", "/fhir/Patient/2").client(addr);
        assert!(read.run_request().await.is_continue());
        assert!(remaining(&mut read).unwrap().contains("r=4"));
    }

    #[tokio::test]
    async fn a_refusal_gives_back_what_other_limits_took() {
        let h = harness(
            "- kind: rate_limit\n  config:\n    limits:\n      - { name: wide, key: [], rate: 3, per_seconds: 60 }\n      - { name: narrow, key: [client_addr], rate: 1, per_seconds: 60 }\n",
        );
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let mut x = h.request("GET", "/").client(ip("192.0.2.1"));
        assert!(x.run_request().await.is_continue());
        let r = x.respond(200, &[], b"");
        assert_eq!(
            r.header("ratelimit"),
            Some("\"narrow\";r=0;t=60"),
            "most constraining"
        );
        assert_eq!(
            r.header("ratelimit-policy"),
            Some("\"wide\";q=3;w=60, \"narrow\";q=1;w=60")
        );
        for _ in 0..5 {
            let mut x = h.request("GET", "/").client(ip("192.0.2.1"));
            assert_eq!(x.run_request().await.status(), Some(429));
        }
        // The refused requests did not eat the shared bucket: two more callers pass.
        for other in ["192.0.2.2", "192.0.2.3"] {
            let mut y = h.request("GET", "/").client(ip(other));
            assert!(y.run_request().await.is_continue(), "{other}");
        }
        let mut z = h.request("GET", "/").client(ip("192.0.2.4"));
        let out = z.run_request().await;
        assert_eq!(out.status(), Some(429));
        let hdr = z.reply(out.reply().unwrap());
        assert!(hdr
            .headers
            .get("ratelimit")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("\"wide\";r=0"));
    }

    #[tokio::test]
    async fn anonymous_callers_are_keyed_by_address_and_ids_are_hashed() {
        let h = harness(&format!(
            "- kind: rate_limit\n  config:\n    {KEY}\n    limits:\n      - {{ name: per-user, key: [subject], rate: 1, per_seconds: 60 }}\n",
        ));
        let a = "192.0.2.1".parse().unwrap();
        // Two anonymous callers at different addresses do not share a bucket.
        let mut x = h.request("GET", "/").client(a);
        assert!(x.run_request().await.is_continue());
        let mut y = h.request("GET", "/").client("192.0.2.2".parse().unwrap());
        assert!(y.run_request().await.is_continue());
        let mut z = h.request("GET", "/").client(a);
        assert_eq!(z.run_request().await.status(), Some(429));
        // A named caller is limited by subject, wherever they come from.
        let mut p = h
            .request("GET", "/")
            .principal(principal("patient-42"))
            .client(a);
        assert!(p.run_request().await.is_continue());
        let mut q = h
            .request("GET", "/")
            .principal(principal("patient-42"))
            .client("203.0.113.5".parse().unwrap());
        let out = q.run_request().await;
        assert_eq!(out.status(), Some(429));
        assert!(!out.reply().unwrap().detail.contains("patient-42"));
    }

    #[test]
    fn stored_keys_never_hold_a_person_in_clear() {
        let filter = RateLimitFilter {
            mode: Mode::Enforce,
            limits: build_limits(&[LimitConfig {
                name: "u".into(),
                key: vec![KeyPart::Subject, KeyPart::Patient],
                rate: Some(1),
                per_seconds: None,
                burst: None,
                concurrency: None,
            }])
            .unwrap(),
            hasher: Some(KeyHasher::new(b"0123456789abcdef").unwrap()),
            costs: CostTable::default(),
            store: Store::Local(Arc::new(LocalStore::new(10))),
            concurrency: ConcurrencyLimiter::new(),
            policy: None,
            declaration: DECLARE_PRINCIPAL,
            warmer: None,
        };
        let mut ctx = RequestCtx::for_test("GET", "/");
        let mut p: Principal = principal("alice-smith").into();
        p.patient = Some("Patient/777".into());
        ctx.facts.insert(crate::ctx::writers::JwtAuth, p).unwrap();
        let key = filter.bucket_key(&filter.limits[0], &ctx);
        assert!(key.starts_with("u:"), "{key}");
        assert!(!key.contains("alice") && !key.contains("777"), "{key}");
        assert_eq!(key.len(), 2 + 32);
    }

    #[test]
    fn config_errors_name_their_place() {
        let cases = [
            ("limits: []", "config.limits"),
            ("limits: [{ name: a, key: [subject], rate: 1 }]", "config.hash_key"),
            ("{hash_key: short, limits: [{ name: a, rate: 1 }]}", "config.hash_key"),
            ("limits: [{ name: 'A b', rate: 1 }]", "config.limits[0].name"),
            ("limits: [{ name: a, rate: 1 }, { name: a, rate: 2 }]", "config.limits[1].name"),
            ("limits: [{ name: a, rate: 1, concurrency: 2 }]", "config.limits[0]"),
            ("limits: [{ name: a }]", "config.limits[0]"),
            ("limits: [{ name: a, key: [nobody], rate: 1 }]", "config.limits[0].key"),
            ("limits: [{ name: a, rate: 1, per_seconds: 0 }]", "config.limits[0].per_seconds"),
            ("{costs: { serch: 1 }, limits: [{ name: a, rate: 1 }]}", "config.costs"),
            ("{store: { kind: redis }, limits: [{ name: a, rate: 1 }]}", "config.store.url"),
            ("{store: { kind: redis, url: 'http://x' }, limits: [{ name: a, rate: 1 }]}", "config.store.url"),
            ("{store: { url: 'redis://x' }, limits: [{ name: a, rate: 1 }]}", "config.store.url"),
            ("{store: { kind: redis, url: 'redis://x', local_share: 2 }, limits: [{ name: a, rate: 1 }]}", "config.store.local_share"),
            ("{store: { kind: redis, url: 'redis://x', fallback: deny, local_share: 0.5 }, limits: [{ name: a, rate: 1 }]}", "config.store.local_share"),
            ("{limits: [{ name: a, rate: 1 }], extra: 1}", "config"),
        ];
        for (yaml, place) in cases {
            let e = build(
                serde_yaml::from_str(yaml).unwrap(),
                &BuildContext::default(),
            )
            .err()
            .unwrap();
            assert!(e.path.starts_with(place), "{yaml}: {e}");
        }
        assert!(build_err("- kind: rate_limit\n  config: { limits: [] }")
            .starts_with("filters[0] (rate_limit)"));
    }

    #[test]
    fn declarations_follow_the_keys() {
        let d = |yaml: &str| {
            build(
                serde_yaml::from_str(yaml).unwrap(),
                &BuildContext::default(),
            )
            .unwrap()
            .declaration()
        };
        assert_eq!(
            d("limits: [{ name: a, key: [client_addr, route], rate: 1 }]"),
            DECLARE_NONE
        );
        assert_eq!(
            d("limits: [{ name: a, key: [client_id], rate: 1 }]"),
            DECLARE_PRINCIPAL
        );
        assert_eq!(
            d("limits: [{ name: a, key: [tenant], concurrency: 1 }]"),
            DECLARE_PRINCIPAL_TENANT
        );
        let redis = build(
            serde_yaml::from_str("{store: { kind: redis, url: 'redis://127.0.0.1:1/0' }, limits: [{ name: a, rate: 1 }]}")
                .unwrap(),
            &BuildContext::default(),
        )
        .unwrap();
        assert!(redis.background().is_some());
    }
}
