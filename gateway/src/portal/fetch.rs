//! Fetching and summarising the backends' CapabilityStatements for the portal's document.
//!
//! For each FHIR route of the document, `GET {backend}{upstream prefix}/metadata`
//! (`Accept: application/fhir+json`) from the route's pool, with the pool's TLS settings, one
//! backend after the other until one answers 200 with a CapabilityStatement. The body is capped
//! ([`MAX_BODY`]) and only what the document needs is kept: resource types, their interactions
//! and their search parameters (name and type), each bounded.

use super::openapi::CapKey;
use crate::config::{BackendAddress, Config, PoolConfig};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The most of a CapabilityStatement read.
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// Bounds on what a summary keeps.
const MAX_TYPES: usize = 300;
const MAX_PARAMS: usize = 100;
/// The timeout of one fetch.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(4);

/// What the document needs of one resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapResource {
    pub type_name: String,
    /// FHIR `TypeRestfulInteraction` codes (`read`, `search-type`, `create`, ...).
    pub interactions: Vec<String>,
    /// Search parameters: (name, FHIR `SearchParamType`).
    pub search_params: Vec<(String, String)>,
}

/// What the document needs of one CapabilityStatement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CapSummary {
    pub resources: Vec<CapResource>,
}

fn is_type_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.as_bytes().first().is_some_and(u8::is_ascii_uppercase)
        && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn is_param_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

const INTERACTIONS: &[&str] = &[
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
];

const PARAM_TYPES: &[&str] = &[
    "number",
    "date",
    "string",
    "token",
    "reference",
    "composite",
    "quantity",
    "uri",
    "special",
];

/// Summarise a CapabilityStatement (JSON): its first `rest` entry in `server` mode.
pub fn summarize(body: &[u8]) -> Result<CapSummary, String> {
    if body.len() > MAX_BODY {
        return Err(format!("larger than {MAX_BODY} bytes"));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if v.get("resourceType").and_then(Value::as_str) != Some("CapabilityStatement") {
        return Err("not a CapabilityStatement".into());
    }
    let rest = v
        .get("rest")
        .and_then(Value::as_array)
        .and_then(|r| {
            r.iter()
                .find(|e| e.get("mode").and_then(Value::as_str) == Some("server"))
                .or_else(|| r.first())
        })
        .ok_or("no `rest` entry")?;
    let mut out = CapSummary::default();
    let resources = rest
        .get("resource")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for r in resources {
        if out.resources.len() >= MAX_TYPES {
            break;
        }
        let Some(t) = r
            .get("type")
            .and_then(Value::as_str)
            .filter(|t| is_type_name(t))
        else {
            continue;
        };
        if out.resources.iter().any(|x| x.type_name == t) {
            continue;
        }
        let mut interactions: Vec<String> = Vec::new();
        for i in r
            .get("interaction")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if let Some(code) = i.get("code").and_then(Value::as_str) {
                if INTERACTIONS.contains(&code) && !interactions.iter().any(|x| x == code) {
                    interactions.push(code.to_string());
                }
            }
        }
        let mut search_params: Vec<(String, String)> = Vec::new();
        for p in r
            .get("searchParam")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if search_params.len() >= MAX_PARAMS {
                break;
            }
            let (Some(n), Some(ty)) = (
                p.get("name").and_then(Value::as_str),
                p.get("type").and_then(Value::as_str),
            ) else {
                continue;
            };
            if is_param_name(n)
                && PARAM_TYPES.contains(&ty)
                && !search_params.iter().any(|(x, _)| x == n)
            {
                search_params.push((n.to_string(), ty.to_string()));
            }
        }
        out.resources.push(CapResource {
            type_name: t.to_string(),
            interactions,
            search_params,
        });
    }
    Ok(out)
}

/// Where one backend of a pool is reached.
#[derive(Debug, Clone)]
enum Reach {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

/// One CapabilityStatement to fetch: its key and the pool's backends.
#[derive(Debug, Clone)]
pub struct Target {
    pub key: CapKey,
    backends: Vec<Reach>,
    tls: Option<TlsFiles>,
}

#[derive(Debug, Clone)]
struct TlsFiles {
    sni: String,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

/// The fetch targets of `keys` (a key whose pool is unknown or has no HTTP backend is left out).
pub fn targets(cfg: &Config, base_dir: &Path, keys: &[CapKey]) -> Vec<Target> {
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base_dir.join(p)
        }
    };
    let mut out = Vec::new();
    for key in keys {
        let Some(pool) = cfg.pools.iter().find(|p| p.name == key.pool) else {
            continue;
        };
        if pool.protocol != crate::config::PoolProtocol::Http {
            continue;
        }
        let backends = backends(cfg, pool);
        if backends.is_empty() {
            continue;
        }
        let tls = pool.tls.as_ref().map(|t| TlsFiles {
            sni: if t.sni.is_empty() {
                pool.backend_name().unwrap_or_default().to_string()
            } else {
                t.sni.clone()
            },
            ca_file: t.ca_file.as_deref().map(resolve),
            client_cert: t.client_cert.as_deref().map(resolve),
            client_key: t.client_key.as_deref().map(resolve),
        });
        out.push(Target {
            key: key.clone(),
            backends,
            tls,
        });
    }
    out
}

fn backends(cfg: &Config, pool: &PoolConfig) -> Vec<Reach> {
    let mut out = Vec::new();
    for b in pool.zones.iter().flat_map(|z| &z.backends) {
        match (&b.address, &b.sandbox) {
            (Some(BackendAddress::Ip(a)), _) => out.push(Reach::Addr(*a)),
            (Some(BackendAddress::Name { host, port }), _) => out.push(Reach::Name {
                host: host.clone(),
                port: *port,
            }),
            (None, Some(name)) => {
                if let Some(s) = cfg.sandboxes.iter().find(|s| &s.name == name) {
                    out.push(Reach::Addr(s.listen));
                }
            }
            (None, None) => {}
        }
    }
    out
}

impl Target {
    /// The first CapabilityStatement one of the backends answers with.
    pub async fn fetch(&self) -> Result<CapSummary, String> {
        let mut last = String::from("no backend");
        for b in &self.backends {
            match self.fetch_one(b).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn fetch_one(&self, b: &Reach) -> Result<CapSummary, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        let url = match &self.tls {
            None => match b {
                Reach::Addr(a) => format!("http://{a}{}", self.key.path),
                Reach::Name { host, port } => format!("http://{host}:{port}{}", self.key.path),
            },
            Some(t) => {
                if let Some(ca) = &t.ca_file {
                    let pem = tokio::fs::read(ca)
                        .await
                        .map_err(|e| format!("{}: {e}", ca.display()))?;
                    for c in reqwest::Certificate::from_pem_bundle(&pem)
                        .map_err(|e| format!("{}: {e}", ca.display()))?
                    {
                        builder = builder.add_root_certificate(c);
                    }
                    builder = builder.tls_built_in_root_certs(false);
                }
                if let (Some(cert), Some(key)) = (&t.client_cert, &t.client_key) {
                    let c = tokio::fs::read(cert)
                        .await
                        .map_err(|e| format!("{}: {e}", cert.display()))?;
                    let k = tokio::fs::read(key)
                        .await
                        .map_err(|e| format!("{}: {e}", key.display()))?;
                    let id = reqwest::Identity::from_pkcs8_pem(&c, &k)
                        .map_err(|e| format!("client certificate: {e}"))?;
                    builder = builder.identity(id);
                }
                // The URL names the SNI host; the connection goes to the backend's address.
                let (host, port) = match b {
                    Reach::Addr(a) => (t.sni.clone(), a.port()),
                    Reach::Name { host, port } => (
                        if t.sni.is_empty() {
                            host.clone()
                        } else {
                            t.sni.clone()
                        },
                        *port,
                    ),
                };
                if host.is_empty() {
                    return Err("no TLS server name (set pools[].tls.sni)".into());
                }
                let addr = match b {
                    Reach::Addr(a) => Some(*a),
                    Reach::Name { host: h, port } if h != &host => {
                        tokio::net::lookup_host((h.as_str(), *port))
                            .await
                            .ok()
                            .and_then(|mut it| it.next())
                    }
                    Reach::Name { .. } => None,
                };
                if let Some(a) = addr {
                    builder = builder.resolve(&host, a);
                }
                format!("https://{host}:{port}{}", self.key.path)
            }
        };
        let client = builder.build().map_err(|e| format!("HTTP client: {e}"))?;
        let mut resp = client
            .get(&url)
            .header("accept", "application/fhir+json")
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if resp.status().as_u16() != 200 {
            return Err(format!("GET {url}: status {}", resp.status().as_u16()));
        }
        if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
            return Err(format!("GET {url}: larger than {MAX_BODY} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("GET {url}: {e}"))? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(format!("GET {url}: larger than {MAX_BODY} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        summarize(&body).map_err(|e| format!("GET {url}: {e}"))
    }
}
