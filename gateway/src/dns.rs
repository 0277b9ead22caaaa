//! Backends by DNS name.
//!
//! A backend written `address: ehr.internal:443` is resolved through the configured resolver
//! (`resolver.servers`, asked directly, with the records' TTLs) or the system's (`getaddrinfo`,
//! re-resolved every `resolver.refresh_ms`). Every address of an answer is a backend of the
//! zone. The zone's Pingora load balancer asks [`ZoneDiscovery`] for its backends before every
//! health-check pass; a name is asked again once its answer is older than its TTL (bounded by
//! `min_ttl_ms` and `refresh_ms`). When a query fails or answers nothing, the last good answer
//! is kept (and said in the log and in `caregate_dns_resolutions_total`); a name that never
//! resolved gives no backend, so its pool has none until it does.

use crate::config::ResolverSettings;
use async_trait::async_trait;
use once_cell::sync::Lazy;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::Backend;
use prometheus::{register_int_counter_vec, IntCounterVec};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[allow(clippy::expect_used)]
pub static RESOLUTIONS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_dns_resolutions_total",
        "Resolutions of backend names, by pool and result (ok; error: the last good answer is kept).",
        &["pool", "result"]
    )
    .expect("register caregate_dns_resolutions_total")
});

enum How {
    System,
    Servers(Box<hickory_resolver::TokioResolver>),
}

/// The resolver of backend names, shared by every pool of a generation.
pub struct Dns {
    how: How,
    refresh: Duration,
    min_ttl: Duration,
    timeout: Duration,
}

impl Dns {
    pub fn new(cfg: &ResolverSettings) -> Dns {
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let how = if cfg.servers.is_empty() {
            How::System
        } else {
            use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
            let mut group = NameServerConfigGroup::new();
            for s in &cfg.servers {
                group.merge(NameServerConfigGroup::from_ips_clear(
                    &[s.ip()],
                    s.port(),
                    true,
                ));
            }
            let mut builder = hickory_resolver::TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], group),
                hickory_resolver::name_server::TokioConnectionProvider::default(),
            );
            let opts = builder.options_mut();
            opts.timeout = timeout;
            opts.attempts = 1;
            // The zone asks again on the TTL: no second cache in between.
            opts.cache_size = 0;
            How::Servers(Box::new(builder.build()))
        };
        Dns {
            how,
            refresh: Duration::from_millis(cfg.refresh_ms),
            min_ttl: Duration::from_millis(cfg.min_ttl_ms),
            timeout,
        }
    }

    /// The addresses of `host` and for how long they may be used.
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Result<(Vec<SocketAddr>, Duration), String> {
        match &self.how {
            How::System => {
                let found =
                    tokio::time::timeout(self.timeout, tokio::net::lookup_host((host, port)))
                        .await
                        .map_err(|_| "timed out".to_string())?
                        .map_err(|e| e.to_string())?;
                let mut addrs: Vec<SocketAddr> = found.collect();
                addrs.sort();
                addrs.dedup();
                Ok((addrs, self.refresh))
            }
            How::Servers(r) => {
                // A trailing dot: the name is absolute, never completed with search domains.
                let answer = r
                    .lookup_ip(format!("{host}."))
                    .await
                    .map_err(|e| e.to_string())?;
                let ttl = answer
                    .valid_until()
                    .saturating_duration_since(Instant::now())
                    .clamp(self.min_ttl, self.refresh);
                let mut addrs: Vec<SocketAddr> =
                    answer.iter().map(|ip| SocketAddr::new(ip, port)).collect();
                addrs.sort();
                addrs.dedup();
                Ok((addrs, ttl))
            }
        }
    }

    /// How long to wait before asking again after a failure.
    fn retry_after(&self) -> Duration {
        self.min_ttl
    }
}

/// A backend given by name.
pub struct NamedBackend {
    pub host: String,
    pub port: u16,
    pub weight: usize,
}

struct Answer {
    addrs: Vec<SocketAddr>,
    ask_again: Instant,
}

/// The backends of one zone: its fixed addresses, and the current addresses of its names.
pub struct ZoneDiscovery {
    pub pool: Arc<str>,
    pub zone: Arc<str>,
    pub fixed: BTreeSet<Backend>,
    pub names: Vec<NamedBackend>,
    pub dns: Arc<Dns>,
    answers: tokio::sync::Mutex<HashMap<(String, u16), Answer>>,
}

impl ZoneDiscovery {
    pub fn new(
        pool: Arc<str>,
        zone: Arc<str>,
        fixed: BTreeSet<Backend>,
        names: Vec<NamedBackend>,
        dns: Arc<Dns>,
    ) -> ZoneDiscovery {
        ZoneDiscovery {
            pool,
            zone,
            fixed,
            names,
            dns,
            answers: tokio::sync::Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait]
impl ServiceDiscovery for ZoneDiscovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let mut set = self.fixed.clone();
        let mut answers = self.answers.lock().await;
        for n in &self.names {
            let key = (n.host.clone(), n.port);
            let now = Instant::now();
            if answers.get(&key).is_none_or(|a| now >= a.ask_again) {
                match self.dns.resolve(&n.host, n.port).await {
                    Ok((addrs, ttl)) if !addrs.is_empty() => {
                        RESOLUTIONS.with_label_values(&[&*self.pool, "ok"]).inc();
                        let changed = answers.get(&key).is_none_or(|a| a.addrs != addrs);
                        if changed {
                            log::info!(
                                "pool {} zone {}: {} resolves to {} address(es)",
                                self.pool,
                                self.zone,
                                n.host,
                                addrs.len()
                            );
                        }
                        answers.insert(
                            key.clone(),
                            Answer {
                                addrs,
                                ask_again: now + ttl,
                            },
                        );
                    }
                    other => {
                        RESOLUTIONS.with_label_values(&[&*self.pool, "error"]).inc();
                        let why = match other {
                            Err(e) => e,
                            Ok(_) => "no address in the answer".to_string(),
                        };
                        let kept = answers.get(&key).map_or(0, |a| a.addrs.len());
                        log::warn!(
                            "pool {} zone {}: cannot resolve {}: {why}; keeping the last answer ({kept} address(es))",
                            self.pool,
                            self.zone,
                            n.host
                        );
                        let retry = now + self.dns.retry_after();
                        match answers.get_mut(&key) {
                            Some(a) => a.ask_again = retry,
                            None => {
                                answers.insert(
                                    key.clone(),
                                    Answer {
                                        addrs: Vec::new(),
                                        ask_again: retry,
                                    },
                                );
                            }
                        }
                    }
                }
            }
            if let Some(a) = answers.get(&key) {
                for addr in &a.addrs {
                    if let Ok(b) = Backend::new_with_weight(&addr.to_string(), n.weight) {
                        set.insert(b);
                    }
                }
            }
        }
        Ok((set, HashMap::new()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use crate::config::BackendAddress;

    #[test]
    fn backend_addresses_are_ips_or_names() {
        assert_eq!(
            "10.0.0.1:443".parse::<BackendAddress>().unwrap(),
            BackendAddress::Ip("10.0.0.1:443".parse().unwrap())
        );
        assert_eq!(
            "[::1]:8080".parse::<BackendAddress>().unwrap(),
            BackendAddress::Ip("[::1]:8080".parse().unwrap())
        );
        assert_eq!(
            "EHR.Internal.:443".parse::<BackendAddress>().unwrap(),
            BackendAddress::Name {
                host: "ehr.internal".into(),
                port: 443
            }
        );
        for bad in [
            "ehr.internal",
            "ehr.internal:0",
            "ehr.internal:70000",
            "-ehr.internal:443",
            "ehr..internal:443",
            "10.0.0.300:443",
            "ehr internal:443",
            ":443",
        ] {
            assert!(bad.parse::<BackendAddress>().is_err(), "{bad}");
        }
    }
}
