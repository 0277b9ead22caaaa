//! Configuration generations and hot reload.
//!
//! Everything a reload may change lives in one [`Generation`]: the route tables of every
//! listener with their filter chains, the upstream pools, the filters' background tasks. The
//! proxy reads the live generation once per request (in `new_ctx`), so a request keeps the
//! config it started with to its end, whatever happens meanwhile.
//!
//! A reload ([`Reloader::reload`]; `SIGHUP`, `POST /reload` on the admin listener, or a change
//! of the file when `server.watch_config` is on) reads the file and builds it whole, exactly as
//! `caregate check` does, then:
//! - refuses a change to a setting fixed at start (listeners, admin, server, audit, access log,
//!   span export, sandboxes) with a message naming it: those need a restart or an upgrade;
//! - keeps every pool whose config is unchanged as it is (health state, connections), builds
//!   changed and new pools and runs their health checks until every backend's state is settled
//!   *before* they take traffic;
//! - starts the new filters' background tasks and waits (bounded) until they can do their job
//!   (e.g. every issuer's key set is loaded);
//! - swaps the new generation in, in one step, and retires the old one: its tasks stop, pools
//!   it alone used stop being checked and their metric series go.
//!
//! A file that fails any step changes nothing: the running generation keeps serving, and the
//! reason is logged, counted (`caregate_config_reloads_total{outcome="rejected"}`) and audited.
//! Every reload, applied or not, writes an audit record (`phase: admin`) naming who asked and the
//! config hash before and after. The previous generation's text is kept, so
//! `POST /reload/rollback` goes back to it (through the same checks).

use crate::config::{Config, Loaded};
use crate::metrics;
use crate::router::{Route, RouteTable};
use crate::upstream::{build_pools, Pool};
use arc_swap::ArcSwap;
use caregate_filters::registry::FilterRegistry;
use caregate_filters::BackgroundTask;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The live generation, read once per request.
pub type Live = Arc<ArcSwap<Generation>>;

/// One built configuration: what a reload swaps.
pub struct Generation {
    /// 1 at start, +1 per applied reload.
    pub number: u64,
    /// SHA-256 of the config text (hex): what `GET /config` shows and the audit records name.
    pub hash: String,
    /// The config text it was built from (for rollback).
    text: Arc<str>,
    pub config: Config,
    /// The route table of each listener (index = listener index; listeners are fixed at start).
    pub tables: Vec<RouteTable>,
    pub pools: Arc<Vec<Arc<Pool>>>,
    /// Pool name -> index, for tenants that select their own pool.
    pub pool_index: Arc<HashMap<String, usize>>,
    /// The filters' background tasks, each once even when shared.
    pub tasks: Vec<Arc<dyn BackgroundTask>>,
    tasks_stop: watch::Sender<bool>,
    /// Each listener's certificate, key and client CAs (index = listener index; `None` without
    /// TLS), served to every new handshake.
    pub certs: Vec<Option<Arc<crate::tls_identity::ListenerCert>>>,
    /// The developer portal (with `portal:` in the config).
    pub portal: Option<Arc<crate::portal::PortalState>>,
}

/// The hex SHA-256 of a config text.
pub fn config_hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn same_task(a: &Arc<dyn BackgroundTask>, b: &Arc<dyn BackgroundTask>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

impl Generation {
    /// Build a generation from a validated config. Pools whose config is the same as in
    /// `previous` are taken over as they are; the others are built new (returned apart, so the
    /// caller can settle their health before the generation takes traffic).
    pub fn build(
        loaded: Loaded,
        number: u64,
        text: Arc<str>,
        previous: Option<&Generation>,
    ) -> Result<(Generation, Vec<Arc<Pool>>), String> {
        let cfg = &loaded.config;
        let dns = Arc::new(crate::dns::Dns::new(&cfg.resolver));
        let fresh = build_pools(&loaded, &dns)?;
        let mut pools = Vec::with_capacity(fresh.len());
        let mut new_pools = Vec::new();
        for (i, pool) in fresh.into_iter().enumerate() {
            let kept = previous.and_then(|p| {
                let pc = cfg.pools.get(i)?;
                let (j, old) = p
                    .config
                    .pools
                    .iter()
                    .enumerate()
                    .find(|(_, o)| o.name == pc.name)?;
                (format!("{old:?}") == format!("{pc:?}")
                    && format!("{:?}", p.config.resolver) == format!("{:?}", cfg.resolver))
                .then(|| p.pools.get(j).cloned())
                .flatten()
            });
            match kept {
                Some(old) => pools.push(old),
                None => {
                    new_pools.push(pool.clone());
                    pools.push(pool);
                }
            }
        }
        let pool_index: HashMap<String, usize> = cfg
            .pools
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        let mut tasks: Vec<Arc<dyn BackgroundTask>> = Vec::new();
        for f in loaded
            .route_filters
            .iter()
            .chain(loaded.listener_filters.iter())
            .flatten()
        {
            if let Some(t) = f.background() {
                if !tasks.iter().any(|x| same_task(x, &t)) {
                    tasks.push(t);
                }
            }
        }
        // Every API version's series exists from the start (at its state now), for dashboards.
        let now = crate::apis::unix_now();
        for r in &cfg.routes {
            if let Some(b) = &r.api {
                b.requests(b.lifecycle.evaluate(now));
            }
        }
        let portal = match &cfg.portal {
            Some(_) => {
                let p = crate::portal::PortalState::build(&loaded)?;
                tasks.push(p.clone() as Arc<dyn BackgroundTask>);
                Some(p)
            }
            None => None,
        };
        let mut tables = Vec::with_capacity(cfg.listeners.len());
        for (li, l) in cfg.listeners.iter().enumerate() {
            let listener_filters = loaded.listener_filters.get(li).cloned().unwrap_or_default();
            let mut routes = Vec::new();
            for (i, r) in cfg.routes.iter().enumerate() {
                if r.listener != l.name {
                    continue;
                }
                let pool = if r.hl7 || r.portal {
                    usize::MAX
                } else {
                    *pool_index
                        .get(r.pool.as_str())
                        .ok_or_else(|| format!("route {}: unknown pool", r.name))?
                };
                routes.push(Arc::new(Route {
                    name: Arc::from(r.name.as_str()),
                    hosts: r.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                    path_prefix: r.path_prefix.clone(),
                    methods: r.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                    fhir: r.fhir,
                    phi: r.phi,
                    pool,
                    hl7: r.hl7,
                    upstream_prefix: r.upstream_prefix.clone(),
                    api: r.api.clone(),
                    portal: r.portal,
                    filters: listener_filters
                        .iter()
                        .cloned()
                        .chain(loaded.route_filters.get(i).cloned().unwrap_or_default())
                        .collect(),
                }));
            }
            tables.push(RouteTable::new(routes));
        }
        let mut certs = Vec::with_capacity(cfg.listeners.len());
        for (i, l) in cfg.listeners.iter().enumerate() {
            certs.push(match &l.tls {
                Some(t) => Some(Arc::new(crate::tls_identity::ListenerCert::load(
                    &format!("listeners[{i}] ({})", l.name),
                    &loaded.resolve(&t.cert),
                    &loaded.resolve(&t.key),
                    t.client_ca.as_ref().map(|p| loaded.resolve(p)).as_deref(),
                )?)),
                None => None,
            });
        }
        let (tasks_stop, _) = watch::channel(false);
        Ok((
            Generation {
                number,
                hash: config_hash(&text),
                text,
                config: loaded.config,
                tables,
                pools: Arc::new(pools),
                pool_index: Arc::new(pool_index),
                tasks,
                tasks_stop,
                certs,
                portal,
            },
            new_pools,
        ))
    }

    /// The route table of listener `index`.
    pub fn table(&self, index: usize) -> Option<&RouteTable> {
        self.tables.get(index)
    }

    /// Start the filters' background tasks (on the current runtime); they run until
    /// [`Generation::retire`].
    pub fn start_tasks(&self) {
        for t in &self.tasks {
            let t = t.clone();
            let rx = self.tasks_stop.subscribe();
            tokio::spawn(async move { t.run(rx).await });
        }
    }

    /// Why a filter of this generation cannot do its job yet, if one cannot.
    pub fn not_ready(&self) -> Option<String> {
        self.tasks.iter().find_map(|t| t.not_ready())
    }

    /// Stop this generation's tasks.
    pub fn retire(&self) {
        let _ = self.tasks_stop.send(true);
    }
}

/// What asked for a reload (the `trigger` label and the audit record's actor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    Admin,
    File,
    Rollback,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "signal",
            Trigger::Admin => "admin",
            Trigger::File => "file",
            Trigger::Rollback => "rollback",
        }
    }
}

/// The settings a reload cannot change, each difference named.
pub fn fixed_changes(old: &Config, new: &Config, retry_cap: usize) -> Vec<String> {
    let mut out = Vec::new();
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    if differs(&old.server, &new.server) {
        out.push("server: its settings are fixed at start".to_string());
    }
    // The admin token may change (a rotated secret); the admin listener may not.
    if old.admin.listen != new.admin.listen || differs(&old.admin.tls, &new.admin.tls) {
        out.push(
            "admin: the admin listener's address and TLS settings are fixed at start".to_string(),
        );
    }
    if old.admin.token.is_some() != new.admin.token.is_some() {
        out.push("admin.token: can be changed by reload, not added or removed".to_string());
    }
    if old.listeners.len() != new.listeners.len() {
        out.push("listeners: listeners cannot be added or removed by reload".to_string());
    } else {
        for (i, (a, b)) in old.listeners.iter().zip(&new.listeners).enumerate() {
            let shape = |l: &crate::config::ListenerConfig| {
                format!(
                    "{} {:?} {} {:?} {:?}",
                    l.name,
                    l.channel,
                    l.listen,
                    l.tls
                        .as_ref()
                        .map(|t| (t.client_ca.is_some(), t.require_client_cert, t.h2)),
                    l.connections
                )
            };
            if shape(a) != shape(b) {
                out.push(format!(
                    "listeners[{i}] ({}): name, channel, address, TLS and connection settings are fixed at start (its filters, certificate, key and client CA files may change)",
                    a.name
                ));
            }
        }
    }
    if differs(&old.audit, &new.audit) {
        out.push("audit: the audit trail is fixed at start".to_string());
    }
    if differs(&old.access_log, &new.access_log) {
        out.push("access_log: fixed at start".to_string());
    }
    if differs(&old.otlp, &new.otlp) {
        out.push("otlp: fixed at start".to_string());
    }
    if differs(&old.sandboxes, &new.sandboxes) {
        out.push("sandboxes: built-in sandboxes are fixed at start".to_string());
    }
    // The MLLP listeners are services of their own, bound at start (their routes, facilities
    // and allowlists are reloadable).
    if differs(&old.hl7.listeners, &new.hl7.listeners) {
        out.push(
            "hl7.listeners: MLLP listeners are fixed at start (hl7.routes and hl7.facilities may change)"
                .to_string(),
        );
    }
    for (i, p) in new.pools.iter().enumerate() {
        if p.max_attempts > retry_cap {
            out.push(format!(
                "pools[{i}] ({}).max_attempts: {} is above the retry bound fixed at start ({retry_cap})",
                p.name, p.max_attempts
            ));
        }
    }
    out
}

/// How long a reload waits for new filters' background tasks (e.g. key sets) to be ready.
const TASKS_READY_LIMIT: Duration = Duration::from_secs(15);

/// Builds, checks and swaps in new generations. One reload at a time.
pub struct Reloader {
    pub path: PathBuf,
    registry: FilterRegistry,
    pub live: Live,
    /// The retry bound Pingora was started with (`ServerConf::max_retries`).
    retry_cap: usize,
    audit: Option<Arc<caregate_audit::AuditSink>>,
    /// The text of the generation before the live one (for rollback).
    state: tokio::sync::Mutex<Option<Arc<str>>>,
}

/// The result of a reload, for the admin API and the log.
pub struct ReloadOutcome {
    pub applied: bool,
    pub message: String,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        registry: FilterRegistry,
        live: Live,
        retry_cap: usize,
        audit: Option<Arc<caregate_audit::AuditSink>>,
    ) -> Reloader {
        Reloader {
            path,
            registry,
            live,
            retry_cap,
            audit,
            state: tokio::sync::Mutex::new(None),
        }
    }

    /// Reload the config file.
    pub async fn reload(&self, trigger: Trigger) -> ReloadOutcome {
        let mut previous = self.state.lock().await;
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                let msg = format!("cannot read {}: {e}", self.path.display());
                return self.finish(trigger, None, Err(msg));
            }
        };
        let result = self.apply(Arc::from(text.as_str())).await;
        if let Ok(old) = &result {
            *previous = Some(old.clone());
        }
        self.finish(trigger, Some(config_hash(&text)), result.map(|_| ()))
    }

    /// Go back to the generation before the live one (through the same checks).
    pub async fn rollback(&self) -> ReloadOutcome {
        let mut previous = self.state.lock().await;
        let Some(text) = previous.clone() else {
            return self.finish(
                Trigger::Rollback,
                None,
                Err("no previous configuration to roll back to".into()),
            );
        };
        let hash = config_hash(&text);
        let result = self.apply(text).await;
        if let Ok(old) = &result {
            *previous = Some(old.clone());
        }
        self.finish(Trigger::Rollback, Some(hash), result.map(|_| ()))
    }

    /// Build, check and swap; returns the text of the generation it replaced.
    async fn apply(&self, text: Arc<str>) -> Result<Arc<str>, String> {
        let current = self.live.load_full();
        let base_dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let registry = self.registry.clone();
        let t = text.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            crate::config::load_str_with(&t, base_dir, &registry).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("the build failed: {e}"))??;
        let fixed = fixed_changes(&current.config, &loaded.config, self.retry_cap);
        if !fixed.is_empty() {
            return Err(format!(
                "{} (restart or upgrade to apply these)",
                fixed.join("; ")
            ));
        }
        let (generation, new_pools) =
            Generation::build(loaded, current.number + 1, text, Some(&current))?;
        // New and changed pools: settle every backend's health before they take traffic.
        for pool in &new_pools {
            crate::upstream::settle(pool).await;
        }
        generation.start_tasks();
        let deadline = tokio::time::Instant::now() + TASKS_READY_LIMIT;
        while let Some(why) = generation.not_ready() {
            if tokio::time::Instant::now() >= deadline {
                generation.retire();
                for p in &new_pools {
                    p.retire(&current.pools);
                }
                return Err(format!("the new filters are not ready: {why}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for pool in &new_pools {
            crate::upstream::spawn_health(pool.clone());
        }
        let generation = Arc::new(generation);
        crate::logging::configure(&generation.config.log);
        crate::access_log::reopen();
        let old = self.live.swap(generation.clone());
        old.retire();
        for pool in old.pools.iter() {
            if !generation.pools.iter().any(|p| Arc::ptr_eq(p, pool)) {
                pool.retire(&generation.pools);
            }
        }
        metrics::CONFIG_GENERATION.set(i64::try_from(generation.number).unwrap_or(i64::MAX));
        Ok(old.text.clone())
    }

    fn finish(
        &self,
        trigger: Trigger,
        attempted: Option<String>,
        result: Result<(), String>,
    ) -> ReloadOutcome {
        let live = self.live.load();
        let (outcome, message) = match &result {
            Ok(()) => (
                "applied",
                format!(
                    "config reloaded ({}): generation {}, hash {}",
                    trigger.as_str(),
                    live.number,
                    live.hash
                ),
            ),
            Err(e) => (
                "rejected",
                format!(
                    "config reload ({}) rejected, the running config (generation {}) keeps serving: {e}",
                    trigger.as_str(),
                    live.number
                ),
            ),
        };
        metrics::CONFIG_RELOADS
            .with_label_values(&[trigger.as_str(), outcome])
            .inc();
        if result.is_ok() {
            log::info!("{message}");
        } else {
            log::error!("{message}");
        }
        if let Some(audit) = &self.audit {
            let rec = caregate_audit::AuditRecord {
                request_id: format!("config-reload-{}", live.number),
                phase: caregate_audit::Phase::Admin,
                actor: caregate_audit::Actor {
                    subject: Some(
                        match trigger {
                            Trigger::Signal => "signal:SIGHUP",
                            Trigger::Admin => "admin-api",
                            Trigger::File => "file-watch",
                            Trigger::Rollback => "admin-api:rollback",
                        }
                        .to_string(),
                    ),
                    ..Default::default()
                },
                action: caregate_audit::Action {
                    method: "RELOAD".into(),
                    route: "config".into(),
                    listener: "admin".into(),
                    channel: "admin".into(),
                    interaction: Some("config-reload".into()),
                    ..Default::default()
                },
                outcome: caregate_audit::Outcome {
                    status: Some(if result.is_ok() { 200 } else { 422 }),
                    reason: Some(outcome.into()),
                    ..Default::default()
                },
                config: Some(caregate_audit::ConfigChange {
                    running: live.hash.clone(),
                    attempted: attempted.unwrap_or_default(),
                }),
                ..Default::default()
            };
            if let Err(e) = audit.append(rec) {
                log::error!("config reload: the audit record was not written: {e}");
            }
        }
        ReloadOutcome {
            applied: result.is_ok(),
            message,
        }
    }
}

/// Polls the config file and reloads when its content changes (`server.watch_config`).
pub struct FileWatch {
    pub reloader: Arc<Reloader>,
    pub interval: Duration,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for FileWatch {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut seen = std::fs::read(&self.reloader.path)
            .ok()
            .map(|b| Sha256::digest(&b).to_vec());
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let now = std::fs::read(&self.reloader.path)
                .ok()
                .map(|b| Sha256::digest(&b).to_vec());
            if now.is_some() && now != seen {
                seen = now;
                let _ = self.reloader.reload(Trigger::File).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg(extra_server: &str, listen: u16, cert: bool, route: &str) -> Config {
        let tls = if cert {
            ", tls: { cert: a.crt, key: a.key }"
        } else {
            ""
        };
        crate::config::parse(&format!(
            "server: {{ threads: 2{extra_server} }}\nadmin: {{ listen: \"127.0.0.1:9\", token: \"t-one\" }}\nlisteners: [ {{ name: public, channel: public, listen: \"127.0.0.1:{listen}\"{tls} }} ]\npools: [ {{ name: p, zones: [ {{ name: z, backends: [ {{ address: \"127.0.0.1:1\" }} ] }} ] }} ]\nroutes: [ {{ name: r, listener: public, path_prefix: {route}, pool: p }} ]\n"
        ))
        .unwrap()
    }

    #[test]
    fn routes_pools_and_the_admin_token_may_change_what_is_fixed_is_named() {
        let base = cfg("", 8080, false, "/a");
        assert!(fixed_changes(&base, &cfg("", 8080, false, "/b"), 10).is_empty());
        let mut token = base.clone();
        token.admin.token = Some("t-two".into());
        assert!(fixed_changes(&base, &token, 10).is_empty());

        let moved = fixed_changes(&base, &cfg("", 8081, false, "/a"), 10);
        assert_eq!(moved.len(), 1, "{moved:?}");
        assert!(moved[0].starts_with("listeners[0] (public)"), "{moved:?}");
        let tls = fixed_changes(&base, &cfg("", 8080, true, "/a"), 10);
        assert!(tls[0].starts_with("listeners[0] (public)"), "{tls:?}");
        let server = fixed_changes(
            &base,
            &cfg(", drain_delay_seconds: 1", 8080, false, "/a"),
            10,
        );
        assert_eq!(server, ["server: its settings are fixed at start"]);
        let mut no_token = base.clone();
        no_token.admin.token = None;
        assert!(fixed_changes(&base, &no_token, 10)[0].starts_with("admin.token"));
        let capped = fixed_changes(&base, &base, 2);
        assert!(capped[0].contains("above the retry bound"), "{capped:?}");
    }

    #[test]
    fn the_hash_is_the_sha256_of_the_text() {
        assert_eq!(
            config_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
