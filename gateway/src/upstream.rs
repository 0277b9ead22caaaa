//! Upstream pools across availability zones.
//!
//! A pool has zones in priority order; each zone is one Pingora `LoadBalancer` (weighted round
//! robin) over its backends with an active HTTP health check. A request goes to the first zone
//! with a healthy backend it has not tried yet, and fails over to the next zone when a zone is
//! unhealthy or a connect fails. The health checks run in one background service that also
//! publishes `caregate_upstream_backend_healthy` and tells `/readyz` when every pool has had its
//! first pass.
//!
//! Each pool also carries its passive outlier detection (a backend that keeps failing real
//! requests is skipped by [`Pool::pick`] for a while), its bulkhead and its retry budget: see
//! [`crate::outlier`] and `docs/resilience.md`.

use crate::config::{BackendAddress, Loaded, PoolConfig};
use crate::dns::{Dns, NamedBackend, ZoneDiscovery};
use crate::metrics;
use crate::tls_identity::{read_key, read_pem_certs};
use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::lb::health_check::{HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::prelude::HttpPeer;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::tls::x509::X509;
use pingora::utils::tls::CertKey;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Zone {
    pub name: Arc<str>,
    pub lb: Arc<LoadBalancer<RoundRobin>>,
    /// The `backend` labels of the health series this zone has set (its current backends, which
    /// change with DNS answers).
    pub labels: std::sync::Mutex<BTreeSet<String>>,
}

impl Zone {
    /// The zone's current backends (fixed addresses and resolved names).
    pub fn backend_count(&self) -> usize {
        self.lb.backends().get_backend().len()
    }
}

pub struct PeerTls {
    pub sni: String,
    pub ca: Option<Arc<Box<[X509]>>>,
    pub client: Option<Arc<CertKey>>,
}

pub struct Pool {
    pub name: Arc<str>,
    pub zones: Vec<Zone>,
    pub max_attempts: usize,
    pub timeouts: crate::config::TimeoutConfig,
    pub tls: Option<PeerTls>,
    pub health_interval: Duration,
    /// Health passes needed before a backend's state is settled.
    pub settle_passes: usize,
    /// The `Host` sent upstream when the backends are given by name (the name, with the port
    /// unless it is the scheme's default); `None` keeps the client's `Host`.
    pub host_header: Option<String>,
    /// Turns true when a reload retires the pool: its health checks stop.
    retired: tokio::sync::watch::Sender<bool>,
    /// Passive outlier detection: a circuit per backend. Lives with the pool, so a reload
    /// that keeps the pool keeps it; a changed pool starts with every circuit closed.
    pub outlier: crate::outlier::Detector,
    /// The cap on the pool's requests in flight.
    pub bulkhead: crate::outlier::Bulkhead,
    /// The pool's retry budget.
    pub retry_budget: crate::retry::RetryBudget,
}

/// A backend picked for one attempt.
pub struct Pick {
    pub zone: usize,
    pub addr: SocketAddr,
}

impl Pool {
    /// The first healthy, untried backend that outlier detection admits, zones in priority
    /// order (a half-open backend admitted this way takes its probe slot). When outlier
    /// detection admits none anywhere, the first healthy, untried backend whatever its circuit:
    /// ejection never fails a request that a healthy backend could take.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Pick> {
        self.pick_from(tried, 0)
            .or_else(|| self.pick_inner(tried, 0, None))
    }

    /// The first healthy, untried backend that outlier detection admits, starting at zone
    /// `first_zone` (no fallback: see [`Pool::pick`]).
    pub fn pick_from(&self, tried: &[SocketAddr], first_zone: usize) -> Option<Pick> {
        self.pick_inner(tried, first_zone, Some(std::time::Instant::now()))
    }

    /// Whether [`Pool::pick`] would find a backend (nothing is claimed).
    pub fn has_candidate(&self, tried: &[SocketAddr]) -> bool {
        self.pick_inner(tried, 0, None).is_some()
    }

    /// `outlier`: the time to judge circuits at (a half-open backend picked takes its probe
    /// slot); `None` ignores circuits.
    fn pick_inner(
        &self,
        tried: &[SocketAddr],
        first_zone: usize,
        outlier: Option<std::time::Instant>,
    ) -> Option<Pick> {
        for (zi, zone) in self.zones.iter().enumerate().skip(first_zone) {
            let iterations = zone.backend_count().max(1) * 2;
            let found = zone.lb.select_with(b"", iterations, |b, healthy| {
                let Some(a) = b.addr.as_inet() else {
                    return false;
                };
                healthy
                    && !tried.contains(a)
                    && outlier.is_none_or(|now| self.outlier.admits(zi, *a, now, true))
            });
            if let Some(b) = found {
                if let Some(addr) = b.addr.as_inet() {
                    return Some(Pick {
                        zone: zi,
                        addr: *addr,
                    });
                }
            }
        }
        None
    }

    /// Whether any backend in any zone is currently healthy.
    pub fn any_healthy(&self) -> bool {
        self.zones.iter().any(|z| {
            z.lb.backends()
                .get_backend()
                .iter()
                .any(|b| z.lb.backends().ready(b))
        })
    }

    /// The peer for an attempt, with every timeout set.
    pub fn peer(&self, addr: SocketAddr) -> Box<HttpPeer> {
        let (tls, sni) = match &self.tls {
            Some(t) => (true, t.sni.clone()),
            None => (false, String::new()),
        };
        let mut peer = HttpPeer::new(addr, tls, sni);
        let t = &self.timeouts;
        peer.options.connection_timeout = Some(Duration::from_millis(t.connect_ms));
        peer.options.total_connection_timeout = Some(Duration::from_millis(t.total_connect_ms));
        peer.options.read_timeout = Some(Duration::from_millis(t.read_ms));
        peer.options.write_timeout = Some(Duration::from_millis(t.write_ms));
        peer.options.idle_timeout = Some(Duration::from_millis(t.idle_ms));
        if let Some(tls) = &self.tls {
            peer.options.ca = tls.ca.clone();
            peer.client_cert_key = tls.client.clone();
        }
        Box::new(peer)
    }
}

fn build_pool(loaded: &Loaded, pc: &PoolConfig, dns: &Arc<Dns>) -> Result<Pool, String> {
    let sandbox_addr = |name: &str| {
        loaded
            .config
            .sandboxes
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.listen)
    };
    let tls = match &pc.tls {
        None => None,
        Some(t) => {
            let ca = match &t.ca_file {
                Some(p) => Some(Arc::new(
                    read_pem_certs(&loaded.resolve(p))?.into_boxed_slice(),
                )),
                None => None,
            };
            let client = match (&t.client_cert, &t.client_key) {
                (Some(c), Some(k)) => {
                    let certs = read_pem_certs(&loaded.resolve(c))?;
                    let key = read_key(&loaded.resolve(k))?;
                    Some(Arc::new(CertKey::new(certs, key)))
                }
                _ => None,
            };
            Some(PeerTls {
                sni: if t.sni.trim().is_empty() {
                    pc.backend_name().unwrap_or_default().to_string()
                } else {
                    t.sni.clone()
                },
                ca,
                client,
            })
        }
    };
    let hc_conf = &pc.health_check;
    let mut zones = Vec::new();
    let pool_name: Arc<str> = Arc::from(pc.name.as_str());
    for zc in &pc.zones {
        let mut set = BTreeSet::new();
        let mut names = Vec::new();
        for b in &zc.backends {
            let addr = match (&b.address, &b.sandbox) {
                (Some(BackendAddress::Ip(a)), _) => *a,
                (Some(BackendAddress::Name { host, port }), _) => {
                    names.push(NamedBackend {
                        host: host.clone(),
                        port: *port,
                        weight: b.weight,
                    });
                    continue;
                }
                (None, Some(name)) => sandbox_addr(name)
                    .ok_or_else(|| format!("pool {}: no sandbox named {name}", pc.name))?,
                (None, None) => return Err(format!("pool {}: backend without address", pc.name)),
            };
            let backend = Backend::new_with_weight(&addr.to_string(), b.weight)
                .map_err(|e| format!("pool {}: backend {addr}: {e}", pc.name))?;
            set.insert(backend);
        }
        let backends = Backends::new(Box::new(ZoneDiscovery::new(
            pool_name.clone(),
            Arc::from(zc.name.as_str()),
            set,
            names,
            dns.clone(),
        )));
        let mut lb = LoadBalancer::<RoundRobin>::from_backends(backends);

        if pc.protocol == crate::config::PoolProtocol::Mllp {
            // MLLP has no health request: a backend is healthy while it accepts TCP
            // connections. (Pingora's TLS probe cannot present a client certificate, so a
            // backend that requires one is probed by connect only, TLS or not.)
            let mut hc = TcpHealthCheck::new();
            hc.consecutive_success = hc_conf.consecutive_success;
            hc.consecutive_failure = hc_conf.consecutive_failure;
            let timeout = Duration::from_millis(hc_conf.timeout_ms);
            hc.peer_template.options.connection_timeout = Some(timeout);
            hc.peer_template.options.total_connection_timeout = Some(timeout);
            lb.set_health_check(hc);
            zones.push(Zone {
                name: Arc::from(zc.name.as_str()),
                lb: Arc::new(lb),
                labels: std::sync::Mutex::new(BTreeSet::new()),
            });
            continue;
        }
        let mut hc = HttpHealthCheck::new(&hc_conf.host, tls.is_some());
        hc.consecutive_success = hc_conf.consecutive_success;
        hc.consecutive_failure = hc_conf.consecutive_failure;
        let timeout = Duration::from_millis(hc_conf.timeout_ms);
        hc.peer_template.options.connection_timeout = Some(timeout);
        hc.peer_template.options.total_connection_timeout = Some(timeout);
        hc.peer_template.options.read_timeout = Some(timeout);
        hc.peer_template.options.write_timeout = Some(timeout);
        if let Some(t) = &tls {
            hc.peer_template.sni = t.sni.clone();
            hc.peer_template.options.ca = t.ca.clone();
            hc.peer_template.client_cert_key = t.client.clone();
        }
        let mut req = RequestHeader::build("GET", hc_conf.path.as_bytes(), None)
            .map_err(|e| format!("pool {}: health check request: {e}", pc.name))?;
        req.insert_header("host", hc_conf.host.as_str())
            .map_err(|e| format!("pool {}: health check host: {e}", pc.name))?;
        req.insert_header("user-agent", "caregate-health-check")
            .map_err(|e| format!("pool {}: health check header: {e}", pc.name))?;
        hc.req = req;
        let expected = hc_conf.expected_status.clone();
        hc.validator = Some(Box::new(move |resp: &ResponseHeader| {
            if expected.contains(&resp.status.as_u16()) {
                Ok(())
            } else {
                pingora::Error::e_explain(
                    pingora::ErrorType::Custom("unexpected health check status"),
                    "health check",
                )
            }
        }));
        lb.set_health_check(Box::new(hc));
        zones.push(Zone {
            name: Arc::from(zc.name.as_str()),
            lb: Arc::new(lb),
            labels: std::sync::Mutex::new(BTreeSet::new()),
        });
    }
    let host_header = pc.backend_name().map(|h| {
        let port = pc
            .zones
            .iter()
            .flat_map(|z| &z.backends)
            .find_map(|b| match &b.address {
                Some(BackendAddress::Name { port, .. }) => Some(*port),
                _ => None,
            });
        match (port, tls.is_some()) {
            (Some(443), true) | (Some(80), false) | (None, _) => h.to_string(),
            (Some(p), _) => format!("{h}:{p}"),
        }
    });
    Ok(Pool {
        name: pool_name.clone(),
        host_header,
        zones,
        max_attempts: pc.max_attempts,
        timeouts: pc.timeouts.clone(),
        tls,
        health_interval: Duration::from_millis(hc_conf.interval_ms),
        settle_passes: hc_conf.consecutive_failure.max(hc_conf.consecutive_success),
        retired: tokio::sync::watch::channel(false).0,
        outlier: crate::outlier::Detector::new(
            outlier_settings(pc),
            pool_name.clone(),
            pc.zones
                .iter()
                .map(|z| Arc::from(z.name.as_str()))
                .collect(),
        ),
        bulkhead: crate::outlier::Bulkhead::new(pool_name.clone(), pc.max_in_flight),
        retry_budget: crate::retry::RetryBudget::new(
            pc.retry_budget.ratio,
            pc.retry_budget.min_per_second,
            std::time::Instant::now(),
        ),
    })
}

fn outlier_settings(pc: &PoolConfig) -> crate::outlier::Settings {
    let od = &pc.outlier_detection;
    crate::outlier::Settings {
        enabled: od.enabled,
        consecutive_failures: od.consecutive_failures.max(1),
        base_ejection: Duration::from_millis(od.base_ejection_ms),
        max_ejection: Duration::from_millis(od.max_ejection_ms.max(od.base_ejection_ms)),
        max_ejected_percent: od.max_ejected_percent,
        probe_timeout: Duration::from_millis(
            pc.timeouts
                .total_connect_ms
                .saturating_add(pc.timeouts.read_ms),
        ),
    }
}

/// Build every pool of the config (in config order), resolving names through `dns`.
pub fn build_pools(loaded: &Loaded, dns: &Arc<Dns>) -> Result<Vec<Arc<Pool>>, String> {
    loaded
        .config
        .pools
        .iter()
        .map(|pc| build_pool(loaded, pc, dns).map(Arc::new))
        .collect()
}

/// Set once every pool has finished its first discovery and health-check pass.
#[derive(Default)]
pub struct Readiness {
    pub pools_checked: AtomicBool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.pools_checked.load(Ordering::Acquire)
    }
}

/// Runs discovery and the health checks of every zone of every pool of the live generation;
/// pools a reload adds are settled and started by the reload itself.
pub struct HealthService {
    pub live: crate::reload::Live,
    pub readiness: Arc<Readiness>,
}

async fn check_zone(pool: &Pool, zi: usize, zone: &Zone) {
    if let Err(e) = zone.lb.update().await {
        log::warn!(
            "pool {} zone {}: discovery failed: {e}",
            pool.name,
            zone.name
        );
    }
    zone.lb.backends().run_health_check(true).await;
    if *pool.retired.borrow() {
        // A reload retired the pool during this pass: its series are gone, or belong to the
        // pool that replaced it.
        return;
    }
    let mut now = BTreeSet::new();
    let mut addrs = Vec::new();
    for b in zone.lb.backends().get_backend().iter() {
        if let Some(a) = b.addr.as_inet() {
            addrs.push(*a);
        }
        let healthy = zone.lb.backends().ready(b);
        let label = b.addr.to_string();
        metrics::BACKEND_HEALTHY
            .with_label_values(&[&*pool.name, &*zone.name, label.as_str()])
            .set(i64::from(healthy));
        now.insert(label);
    }
    // Backends a DNS answer no longer names: their series go.
    let mut labels = zone.labels.lock().unwrap_or_else(|e| e.into_inner());
    for gone in labels.difference(&now) {
        let _ = metrics::BACKEND_HEALTHY.remove_label_values(&[&*pool.name, &*zone.name, gone]);
        crate::outlier::remove_series(&[&*pool.name, &*zone.name, gone]);
    }
    *labels = now;
    drop(labels);
    pool.outlier
        .refresh_zone(zi, &addrs, std::time::Instant::now());
}

impl Pool {
    /// Stop this pool's health checks (a reload no longer uses it) and drop the metric series
    /// of its backends that `successors` (the pools of the new generation) do not have.
    pub fn retire(&self, successors: &[Arc<Pool>]) {
        let _ = self.retired.send(true);
        for zone in &self.zones {
            let labels = zone.labels.lock().unwrap_or_else(|e| e.into_inner());
            for b in labels.iter() {
                let kept = successors.iter().any(|p| {
                    p.name == self.name
                        && p.zones.iter().any(|z| {
                            z.name == zone.name
                                && z.labels
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .contains(b)
                        })
                });
                if !kept {
                    let _ = metrics::BACKEND_HEALTHY.remove_label_values(&[
                        &*self.name,
                        &*zone.name,
                        b.as_str(),
                    ]);
                    crate::outlier::remove_series(&[&*self.name, &*zone.name, b.as_str()]);
                }
            }
        }
    }
}

/// Run as many health passes as the pool's thresholds need to settle every backend's state
/// (backends start healthy in Pingora).
pub async fn settle(pool: &Pool) {
    for _ in 0..pool.settle_passes.max(1) {
        for (zi, zone) in pool.zones.iter().enumerate() {
            check_zone(pool, zi, zone).await;
        }
    }
}

/// Check every zone of `pool` on its interval until the pool is retired.
pub fn spawn_health(pool: Arc<Pool>) {
    for zi in 0..pool.zones.len() {
        let pool = pool.clone();
        let mut retired = pool.retired.subscribe();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(pool.health_interval);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await;
            loop {
                tokio::select! {
                    _ = interval.tick() => {
                        if let Some(zone) = pool.zones.get(zi) {
                            check_zone(&pool, zi, zone).await;
                        }
                    }
                    r = retired.changed() => {
                        if r.is_err() || *retired.borrow() {
                            break;
                        }
                    }
                }
            }
        });
    }
}

#[async_trait]
impl BackgroundService for HealthService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let generation = self.live.load_full();
        // The first generation's filter tasks (e.g. key-set fetches); a reload starts its own.
        generation.start_tasks();
        for pool in generation.pools.iter() {
            settle(pool).await;
        }
        self.readiness.pools_checked.store(true, Ordering::Release);
        log::info!(
            "upstream health: first pass done for {} pool(s)",
            generation.pools.len()
        );
        for pool in generation.pools.iter() {
            spawn_health(pool.clone());
        }
        let _ = shutdown.changed().await;
        self.live.load().retire();
    }
}
