//! Server assembly: one Pingora proxy service per listener, the admin listener, the upstream
//! health service and the built-in sandboxes.

use crate::admin::AdminApp;
use crate::config::{Loaded, TlsListenerConfig};
use crate::proxy::Gateway;
use crate::router::{Route, RouteTable};
use crate::sandbox_server::{SandboxServer, SandboxService};
use crate::upstream::{build_pools, HealthService, Readiness};
use caregate_sandbox::Sandbox;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::prelude::{background_service, Opt};
use pingora::proxy::http_proxy_service_with_name;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service;
use pingora::tls::ssl::{SslVerifyMode, SslVersion};
use std::collections::HashMap;
use std::sync::Arc;

fn tls_settings(loaded: &Loaded, t: &TlsListenerConfig, what: &str) -> Result<TlsSettings, String> {
    let cert = loaded.resolve(&t.cert);
    let key = loaded.resolve(&t.key);
    let path_str = |p: &std::path::Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{what}: path {} is not UTF-8", p.display()))
    };
    let mut tls = if t.client_ca.is_some() {
        // With client certificates, a callback reads the verified certificate's subject.
        let mut tls =
            TlsSettings::with_callbacks(Box::new(crate::tls_identity::ClientCertCallbacks))
                .map_err(|e| format!("{what}: {e}"))?;
        tls.set_private_key_file(&key, pingora::tls::ssl::SslFiletype::PEM)
            .map_err(|e| format!("{what}: cannot load key {}: {e}", key.display()))?;
        tls.set_certificate_chain_file(&cert)
            .map_err(|e| format!("{what}: cannot load certificate {}: {e}", cert.display()))?;
        tls.check_private_key()
            .map_err(|e| format!("{what}: certificate and key do not match: {e}"))?;
        tls
    } else {
        TlsSettings::intermediate(&path_str(&cert)?, &path_str(&key)?)
            .map_err(|e| format!("{what}: cannot load certificate/key: {e}"))?
    };
    tls.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| format!("{what}: {e}"))?;
    if t.h2 {
        tls.enable_h2();
    }
    if let Some(ca) = &t.client_ca {
        let mode = if t.require_client_cert {
            SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT
        } else {
            SslVerifyMode::PEER
        };
        tls.set_verify(mode);
        tls.set_ca_file(loaded.resolve(ca))
            .map_err(|e| format!("{what}: cannot load client CA: {e}"))?;
    }
    Ok(tls)
}

fn same_task(
    a: &Arc<dyn caregate_filters::BackgroundTask>,
    b: &Arc<dyn caregate_filters::BackgroundTask>,
) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

/// Publishes the audit sink's health and backlog, and closes the sink (final checkpoint) at
/// shutdown.
struct AuditMonitor(Arc<caregate_audit::AuditSink>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for AuditMonitor {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    crate::metrics::AUDIT_QUEUE_DEPTH.set(self.0.queue_depth() as i64);
                    crate::metrics::AUDIT_SINK_HEALTHY.set(i64::from(self.0.healthy()));
                }
                _ = shutdown.changed() => break,
            }
        }
        let sink = self.0.clone();
        let _ = tokio::task::spawn_blocking(move || sink.shutdown()).await;
    }
}

/// Flushes the span exporter at shutdown.
struct OtlpFlusher(Arc<crate::otlp::OtlpExporter>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for OtlpFlusher {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let _ = shutdown.changed().await;
        let exp = self.0.clone();
        let _ = tokio::task::spawn_blocking(move || exp.shutdown()).await;
    }
}

/// Runs the filters' background tasks until shutdown.
struct FilterTasks(Vec<Arc<dyn caregate_filters::BackgroundTask>>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for FilterTasks {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut handles = Vec::new();
        for t in &self.0 {
            let t = t.clone();
            let rx = rx.clone();
            handles.push(tokio::spawn(async move { t.run(rx).await }));
        }
        let _ = shutdown.changed().await;
        let _ = tx.send(true);
        for h in handles {
            let _ = h.await;
        }
    }
}

/// Build the whole server from a validated config. `opt` carries Pingora's own flags
/// (upgrade, daemon, test).
pub fn build_server(loaded: Loaded, opt: Opt) -> Result<Server, String> {
    crate::metrics::init();
    let cfg = &loaded.config;
    let pools = Arc::new(build_pools(&loaded)?);
    let readiness = Arc::new(Readiness::default());

    let conf = ServerConf {
        version: 1,
        threads: cfg.server.threads,
        work_stealing: cfg.server.work_stealing,
        grace_period_seconds: Some(cfg.server.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(cfg.server.graceful_shutdown_timeout_seconds),
        max_retries: cfg
            .pools
            .iter()
            .map(|p| p.max_attempts)
            .max()
            .unwrap_or(1)
            .max(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();

    let access_log = crate::access_log::AccessLog::start(&cfg.access_log, |p| loaded.resolve(p))?;
    let audit = match &cfg.audit {
        Some(a) => {
            let mut a = a.clone();
            a.path = loaded.resolve(&a.path);
            crate::metrics::init_audit();
            let sink = caregate_audit::AuditSink::start(&a).map_err(|e| format!("audit: {e}"))?;
            server.add_service(background_service(
                "audit monitor",
                AuditMonitor(sink.clone()),
            ));
            Some(sink)
        }
        None => None,
    };
    let otlp = match &cfg.otlp {
        Some(o) => {
            let exp = Arc::new(crate::otlp::OtlpExporter::start(o)?);
            server.add_service(background_service("otlp flusher", OtlpFlusher(exp.clone())));
            Some(exp)
        }
        None => None,
    };
    let exchange_memory = crate::exchange::MemoryBudget::new(cfg.server.max_exchange_memory_bytes);
    let mut controls = HashMap::new();
    let mut sandbox_handles = Vec::new();
    for s in &cfg.sandboxes {
        let base = s.base_url();
        let sandbox = Sandbox::new(&base);
        let dir = loaded.resolve(&s.data_dir);
        let n = sandbox
            .load_dir(&dir)
            .map_err(|e| format!("sandbox {}: {e}", s.name))?;
        log::info!("sandbox {}: {n} resources loaded", s.name);
        let srv = Arc::new(SandboxServer::new(
            &s.name,
            s.listen,
            &base,
            Arc::new(sandbox),
        ));
        controls.insert(s.name.clone(), srv.control.clone());
        sandbox_handles.push(server.add_service(background_service(
            &format!("sandbox {}", s.name),
            SandboxService(srv),
        )));
    }

    let health = server.add_service(background_service(
        "upstream health",
        HealthService {
            pools: pools.as_ref().clone(),
            readiness: readiness.clone(),
        },
    ));
    // Built-in sandboxes listen before the first health pass probes them.
    for h in &sandbox_handles {
        health.add_dependency(h);
    }

    let pool_index: HashMap<&str, usize> = cfg
        .pools
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    let pool_index_owned: Arc<HashMap<String, usize>> = Arc::new(
        pool_index
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
    );
    // Filters' background work (e.g. key-set refresh), each task once even when shared.
    let mut tasks: Vec<Arc<dyn caregate_filters::BackgroundTask>> = Vec::new();
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
    let filter_tasks = tasks.clone();
    if !tasks.is_empty() {
        server.add_service(background_service("filter tasks", FilterTasks(tasks)));
    }
    for (li, l) in cfg.listeners.iter().enumerate() {
        let listener_filters = loaded.listener_filters.get(li).cloned().unwrap_or_default();
        let mut routes = Vec::new();
        for (i, r) in cfg.routes.iter().enumerate() {
            if r.listener != l.name {
                continue;
            }
            let pool = *pool_index
                .get(r.pool.as_str())
                .ok_or_else(|| format!("route {}: unknown pool", r.name))?;
            routes.push(Arc::new(Route {
                name: Arc::from(r.name.as_str()),
                hosts: r.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                path_prefix: r.path_prefix.clone(),
                methods: r.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                fhir: r.fhir,
                phi: r.phi,
                pool,
                upstream_prefix: r.upstream_prefix.clone(),
                filters: listener_filters
                    .iter()
                    .cloned()
                    .chain(loaded.route_filters.get(i).cloned().unwrap_or_default())
                    .collect(),
            }));
        }
        // Whole exchanges and pre-reads go through their own connector, set up as the proxy's.
        let connector = Arc::new(pingora::connectors::http::Connector::new(Some(
            pingora::connectors::ConnectorOptions::from_server_conf(&server.configuration),
        )));
        let gw = Gateway {
            listener: Arc::from(l.name.as_str()),
            channel: l.channel,
            tls: l.tls.is_some(),
            table: RouteTable::new(routes),
            pools: pools.clone(),
            trusted_proxies: cfg.server.trusted_proxies.clone(),
            keepalive_seconds: cfg.server.downstream_keepalive_seconds,
            max_header_bytes: cfg.server.max_request_header_bytes,
            pool_index: pool_index_owned.clone(),
            access_log: access_log.clone(),
            audit: audit.clone(),
            otlp: otlp.clone(),
            connector: connector.clone(),
            max_exchange_body: cfg.server.max_exchange_body_bytes,
            exchange_memory: exchange_memory.clone(),
        };
        let mut svc = http_proxy_service_with_name(&server.configuration, gw, &l.name);
        let mut endpoint = ListenerConfig::tcp(l.listen.to_string())
            .l4_buffer(L4BufferSettings::default().read(cfg.server.downstream_read_buffer_bytes));
        if let Some(t) = &l.tls {
            endpoint = endpoint.tls(tls_settings(&loaded, t, &format!("listener {}", l.name))?);
        }
        svc.add_listener(endpoint);
        server.add_service(svc);
    }

    let admin = AdminApp {
        readiness,
        audit: audit.clone(),
        token: cfg.admin.token.clone().filter(|t| !t.is_empty()),
        filter_tasks,
        sandboxes: controls,
    };
    let mut admin_svc = Service::new("admin".to_string(), HttpServer::new_app(admin));
    let admin_addr = cfg.admin.listen.to_string();
    match &cfg.admin.tls {
        Some(t) => {
            let tls = tls_settings(&loaded, t, "admin")?;
            admin_svc.add_tls_with_settings(&admin_addr, None, tls);
        }
        None => admin_svc.add_tcp(&admin_addr),
    }
    server.add_service(admin_svc);
    Ok(server)
}
