//! Server assembly: one Pingora proxy service per listener, the admin listener, the upstream
//! health service and the built-in sandboxes.

use crate::admin::AdminApp;
use crate::config::{Loaded, TlsListenerConfig};
use crate::proxy::Gateway;
use crate::sandbox_server::{SandboxServer, SandboxService};
use crate::upstream::{HealthService, Readiness};
use caregate_sandbox::Sandbox;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::prelude::{background_service, Opt};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service;
use pingora::tls::ssl::{SslVerifyMode, SslVersion};
use std::collections::HashMap;
use std::sync::Arc;

fn tls_settings(
    loaded: &Loaded,
    t: &TlsListenerConfig,
    what: &str,
    callbacks: Option<crate::tls_identity::ListenerTls>,
) -> Result<TlsSettings, String> {
    let cert = loaded.resolve(&t.cert);
    let key = loaded.resolve(&t.key);
    let path_str = |p: &std::path::Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{what}: path {} is not UTF-8", p.display()))
    };
    let with_callbacks = |cb: pingora::listeners::TlsAcceptCallbacks| {
        let mut tls = TlsSettings::with_callbacks(cb).map_err(|e| format!("{what}: {e}"))?;
        tls.set_private_key_file(&key, pingora::tls::ssl::SslFiletype::PEM)
            .map_err(|e| format!("{what}: cannot load key {}: {e}", key.display()))?;
        tls.set_certificate_chain_file(&cert)
            .map_err(|e| format!("{what}: cannot load certificate {}: {e}", cert.display()))?;
        tls.check_private_key()
            .map_err(|e| format!("{what}: certificate and key do not match: {e}"))?;
        Ok::<_, String>(tls)
    };
    let mut tls = match callbacks {
        // A listener's certificate comes from the live config generation on every handshake
        // (so a reload renews it); the one set here is the fallback. With client certificates,
        // the callbacks also read the verified certificate's subject.
        Some(cb) => with_callbacks(Box::new(cb))?,
        None if t.client_ca.is_some() => {
            with_callbacks(Box::new(crate::tls_identity::ClientCertCallbacks))?
        }
        None => TlsSettings::intermediate(&path_str(&cert)?, &path_str(&key)?)
            .map_err(|e| format!("{what}: cannot load certificate/key: {e}"))?,
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

/// Publishes the audit sink's health and backlog. (The sink is closed by the drain, once no
/// request is in flight: see [`crate::lifecycle::Drain`].)
struct AuditMonitor(Arc<caregate_audit::AuditSink>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for AuditMonitor {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
        let (mut exported, mut failed) = (0u64, 0u64);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // The sink's counts of off-host checkpoint copies, as counter increments.
                    let (e, f) = (self.0.checkpoints_exported(), self.0.checkpoint_export_failures());
                    crate::metrics::AUDIT_CHECKPOINT_EXPORTS
                        .with_label_values(&["ok"])
                        .inc_by(e.saturating_sub(exported));
                    crate::metrics::AUDIT_CHECKPOINT_EXPORTS
                        .with_label_values(&["error"])
                        .inc_by(f.saturating_sub(failed));
                    (exported, failed) = (e.max(exported), f.max(failed));
                    crate::metrics::AUDIT_QUEUE_DEPTH.set(self.0.queue_depth() as i64);
                    crate::metrics::AUDIT_SINK_HEALTHY.set(i64::from(self.0.healthy()));
                }
                _ = shutdown.changed() => break,
            }
        }
    }
}

/// What `run` needs besides the server: the signal watch, and what to close at exit.
pub struct Built {
    pub server: Server,
    pub signals: crate::lifecycle::GatewaySignals,
    pub finisher: Arc<crate::lifecycle::Finisher>,
}

/// Where the running config came from, for reloads.
pub struct Source {
    pub path: std::path::PathBuf,
    pub text: String,
    pub registry: caregate_filters::registry::FilterRegistry,
}

/// Pingora's retry bound, fixed at start: high enough for any pool a reload may bring.
pub const RETRY_CAP: usize = 10;

/// Build the whole server from a validated config. `opt` carries Pingora's own flags
/// (upgrade, daemon, test).
pub fn build_server(loaded: Loaded, opt: Opt, source: Source) -> Result<Built, String> {
    crate::metrics::init();
    let upgrade = opt.upgrade;
    let cfg = loaded.config.clone();
    let readiness = Arc::new(Readiness::default());
    let upgrade_sock = match &cfg.server.upgrade_sock {
        Some(p) => loaded.resolve(p),
        None => {
            std::env::temp_dir().join(format!("caregate-{}.upgrade.sock", cfg.admin.listen.port()))
        }
    };
    let upgrade_sock = upgrade_sock
        .to_str()
        .ok_or_else(|| {
            format!(
                "server.upgrade_sock: {} is not UTF-8",
                upgrade_sock.display()
            )
        })?
        .to_string();

    let conf = ServerConf {
        version: 1,
        threads: cfg.server.threads,
        work_stealing: cfg.server.work_stealing,
        grace_period_seconds: Some(cfg.server.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(cfg.server.graceful_shutdown_timeout_seconds),
        max_retries: RETRY_CAP,
        upgrade_sock,
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
            crate::anomaly::init_metrics();
            // On an upgrade the old process still writes the trail: this one continues it in a
            // new segment once the old one hands it over (at its SIGQUIT).
            let sink = if upgrade {
                caregate_audit::AuditSink::start_takeover(&a)
            } else {
                caregate_audit::AuditSink::start(&a)
            }
            .map_err(|e| format!("audit: {e}"))?;
            server.add_service(background_service(
                "audit monitor",
                AuditMonitor(sink.clone()),
            ));
            Some(sink)
        }
        None => None,
    };
    let otlp = match &cfg.otlp {
        Some(o) => Some(Arc::new(crate::otlp::OtlpExporter::start(o)?)),
        None => None,
    };
    let pid_file = cfg.server.pid_file.as_ref().map(|p| loaded.resolve(p));
    let finisher = Arc::new(crate::lifecycle::Finisher::new(
        audit.clone(),
        access_log.clone(),
        otlp.clone(),
        pid_file,
    ));
    server.add_service(background_service(
        "drain",
        crate::lifecycle::Drain {
            grace: std::time::Duration::from_secs(cfg.server.grace_period_seconds),
            finisher: finisher.clone(),
        },
    ));
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

    let admin_tls = cfg
        .admin
        .tls
        .as_ref()
        .map(|t| tls_settings(&loaded, t, "admin", None))
        .transpose()?;
    let listener_tls = |loaded: &Loaded, live: &crate::reload::Live| {
        cfg.listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                l.tls
                    .as_ref()
                    .map(|t| {
                        let cb = crate::tls_identity::ListenerTls {
                            live: live.clone(),
                            index: i,
                            client_certs: t.client_ca.is_some(),
                        };
                        tls_settings(loaded, t, &format!("listener {}", l.name), Some(cb))
                    })
                    .transpose()
            })
            .collect::<Result<Vec<Option<TlsSettings>>, String>>()
    };
    let base = Loaded {
        config: cfg.clone(),
        route_filters: Vec::new(),
        listener_filters: Vec::new(),
        base_dir: loaded.base_dir.clone(),
    };
    let (generation, _) =
        crate::reload::Generation::build(loaded, 1, Arc::from(source.text.as_str()), None)?;
    let live: crate::reload::Live = Arc::new(arc_swap::ArcSwap::from_pointee(generation));
    let tls_loaded = listener_tls(&base, &live)?;
    let reloader = Arc::new(crate::reload::Reloader::new(
        source.path,
        source.registry,
        live.clone(),
        RETRY_CAP,
        audit.clone(),
    ));

    // HL7 v2: one engine for the MLLP listeners and the `hl7: true` routes.
    // One unusual-access monitor for the process (its counts span listeners and reloads).
    let anomaly = audit
        .as_ref()
        .map(|_| Arc::new(crate::anomaly::Monitor::new(&cfg.unusual_access)));
    let hl7 = Arc::new(crate::hl7gw::Engine::new(
        live.clone(),
        audit.clone(),
        anomaly.clone(),
        Some(pingora::connectors::ConnectorOptions::from_server_conf(
            &server.configuration,
        )),
    ));
    let mut hl7_services = Vec::new();
    for (i, l) in cfg.hl7.listeners.iter().enumerate() {
        let app = crate::hl7gw::service::MllpApp::new(l, hl7.clone());
        let mut svc = Service::new(format!("hl7 {}", l.name), app);
        let addr = l.listen.to_string();
        match &l.tls {
            Some(t) => {
                let mut t = t.clone();
                // MLLP over TLS: no ALPN.
                t.h2 = false;
                let tls =
                    tls_settings(&base, &t, &format!("hl7.listeners[{i}] ({})", l.name), None)?;
                svc.add_tls_with_settings(&addr, None, tls);
            }
            None => svc.add_tcp(&addr),
        }
        hl7_services.push(svc);
    }

    let health = server.add_service(background_service(
        "upstream health",
        HealthService {
            live: live.clone(),
            readiness: readiness.clone(),
        },
    ));
    // Built-in sandboxes listen before the first health pass probes them.
    for h in &sandbox_handles {
        health.add_dependency(h);
    }
    if let Some(ms) = cfg.server.watch_config_interval_ms.filter(|ms| *ms > 0) {
        server.add_service(background_service(
            "config watch",
            crate::reload::FileWatch {
                reloader: reloader.clone(),
                interval: std::time::Duration::from_millis(ms),
            },
        ));
    }

    // One count of client connections for every listener of the process.
    let idle = (cfg.server.downstream_keepalive_seconds > 0)
        .then(|| std::time::Duration::from_secs(cfg.server.downstream_keepalive_seconds));
    let open_files = crate::conn_guard::open_files_limit();
    let max_total = cfg.server.connections.effective_max_total(open_files);
    let conn_tracker = crate::conn_guard::Tracker::new(max_total);
    if cfg.server.connections.max_total.is_some() {
        if let Some(w) = crate::conn_guard::fd_limit_warning(max_total, open_files) {
            log::warn!("{w}");
        }
    }
    for ((li, l), tls) in cfg.listeners.iter().enumerate().zip(tls_loaded) {
        let conns = cfg.server.connections.for_listener(&l.connections);
        let mut exempt = cfg.server.trusted_proxies.clone();
        exempt.extend(conns.exempt.iter().cloned());
        if conns.exempt_loopback {
            exempt.extend(
                ["127.0.0.0/8", "::1/128"]
                    .iter()
                    .filter_map(|n| n.parse::<ipnet::IpNet>().ok()),
            );
        }
        let limits = crate::conn_guard::Limits {
            max_per_client: conns.max_per_client,
            exempt,
            header_timeout: std::time::Duration::from_secs(conns.header_timeout_seconds),
            idle_timeout: idle,
        };
        // Whole exchanges and pre-reads go through their own connector, set up as the proxy's.
        let connector = Arc::new(pingora::connectors::http::Connector::new(Some(
            pingora::connectors::ConnectorOptions::from_server_conf(&server.configuration),
        )));
        let gw = Gateway {
            listener: Arc::from(l.name.as_str()),
            listener_index: li,
            channel: l.channel,
            environment: l.environment,
            tls: l.tls.is_some(),
            live: live.clone(),
            trusted_proxies: cfg.server.trusted_proxies.clone(),
            keepalive_seconds: cfg.server.downstream_keepalive_seconds,
            max_header_bytes: cfg.server.max_request_header_bytes,
            access_log: access_log.clone(),
            audit: audit.clone(),
            otlp: otlp.clone(),
            connector: connector.clone(),
            max_exchange_body: cfg.server.max_exchange_body_bytes,
            exchange_memory: exchange_memory.clone(),
            body_rate: crate::conn_guard::BodyRate {
                min_rate: conns.body_min_rate_bytes_per_second,
                grace: std::time::Duration::from_secs(conns.body_grace_seconds),
            },
            hl7: hl7.clone(),
            anomaly: anomaly.clone(),
        };
        // Present (0) from the first scrape, so that rates and alerts see every listener.
        crate::metrics::LISTENER_CONNECTIONS.with_label_values(&[l.name.as_str()]);
        crate::conn_guard::init_listener(&l.name);
        let mut proxy = pingora::proxy::http_proxy(&server.configuration, gw);
        proxy.h2_options = Some(h2_options(&cfg));
        let mut options = pingora::apps::HttpServerOptions::default();
        options.h2_idle_timeout = idle;
        proxy.server_options = Some(options);
        let mut svc = Service::new(
            l.name.clone(),
            crate::conn_guard::Guarded::new(proxy, &l.name, conn_tracker.clone(), limits),
        );
        let mut endpoint = ListenerConfig::tcp(l.listen.to_string())
            .l4_buffer(L4BufferSettings::default().read(cfg.server.downstream_read_buffer_bytes));
        if let Some(t) = tls {
            endpoint = endpoint.tls(t);
        }
        svc.add_listener(endpoint);
        server.add_service(svc);
    }

    for svc in hl7_services {
        server.add_service(svc);
    }

    let admin = AdminApp {
        readiness,
        audit: audit.clone(),
        live,
        reloader: reloader.clone(),
        sandboxes: controls,
    };
    let mut admin_svc = Service::new("admin".to_string(), HttpServer::new_app(admin));
    let admin_addr = cfg.admin.listen.to_string();
    match admin_tls {
        Some(tls) => admin_svc.add_tls_with_settings(&admin_addr, None, tls),
        None => admin_svc.add_tcp(&admin_addr),
    }
    server.add_service(admin_svc);
    let signals = crate::lifecycle::GatewaySignals {
        drain_delay: std::time::Duration::from_secs(cfg.server.drain_delay_seconds),
        audit,
        reloader: Some(reloader),
    };
    Ok(Built {
        server,
        signals,
        finisher,
    })
}

/// HTTP/2 settings of the client listeners: Pingora's bounded defaults, with the stream cap of
/// `server.connections` and the header bound of `server.max_request_header_bytes`.
fn h2_options(cfg: &crate::config::Config) -> pingora::protocols::http::v2::server::H2Options {
    let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
    h2.max_concurrent_streams(cfg.server.connections.h2_max_concurrent_streams);
    h2.max_header_list_size(u32::try_from(cfg.server.max_request_header_bytes).unwrap_or(u32::MAX));
    h2
}
