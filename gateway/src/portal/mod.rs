//! The developer portal: an OpenAPI 3.1 document assembled from the route table, the APIs and
//! the backends' CapabilityStatements, served with a Redoc page (`portal:` in the config).

pub mod fetch;
pub mod openapi;

use crate::config::{Config, ConfigError, RouteConfig};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// `portal:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalConfig {
    /// The listener that serves the portal.
    pub listener: String,
    /// Where: `{path_prefix}/` is the Redoc page, `{path_prefix}/openapi.json` the document.
    #[serde(default = "d_prefix")]
    pub path_prefix: String,
    /// The document's title; default "caregate APIs".
    #[serde(default)]
    pub title: Option<String>,
    /// The base URLs clients reach the gateway at (OpenAPI `servers`); default the portal
    /// listener's own address.
    #[serde(default)]
    pub servers: Vec<String>,
    /// A folder holding Redoc's `redoc.standalone.js` (installed from the npm registry, e.g.
    /// `node_modules/redoc/bundles`), served under `{path_prefix}/assets/`. Without it the page
    /// says how to install it; the document is served either way.
    #[serde(default)]
    pub redoc_dir: Option<PathBuf>,
    /// How often the backends' CapabilityStatements are fetched again, in seconds. Default 300.
    #[serde(default = "d_refresh")]
    pub refresh_seconds: u64,
}

fn d_prefix() -> String {
    "/developer".into()
}

fn d_refresh() -> u64 {
    300
}

impl PortalConfig {
    /// The portal's own route on its listener.
    pub fn route(&self) -> Result<RouteConfig, ConfigError> {
        if !self.path_prefix.starts_with('/') || self.path_prefix.len() < 2 {
            return Err(ConfigError(
                "portal.path_prefix: must start with `/` and not be `/` alone".into(),
            ));
        }
        if self.refresh_seconds < 10 {
            return Err(ConfigError(
                "portal.refresh_seconds: must be at least 10".into(),
            ));
        }
        Ok(RouteConfig {
            name: "developer-portal".into(),
            listener: self.listener.clone(),
            hosts: Vec::new(),
            path_prefix: self.path_prefix.trim_end_matches('/').to_string(),
            methods: vec!["GET".into(), "HEAD".into()],
            fhir: false,
            phi: false,
            pool: String::new(),
            hl7: false,
            upstream_prefix: None,
            filters: Vec::new(),
            api: None,
            portal: true,
        })
    }
}

/// What the portal answers.
pub struct PortalReply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Bytes,
    /// Response header fields to add (security headers, caching).
    pub headers: Vec<(&'static str, String)>,
}

/// The Content-Security-Policy of the Redoc page: everything from this origin only, plus what
/// Redoc needs (inline styles, its search worker from a `blob:`, `data:` images).
pub const PAGE_CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
img-src 'self' data:; font-src 'self'; connect-src 'self'; worker-src blob:; base-uri 'none'; \
form-action 'none'; frame-ancestors 'none'";

/// The same policy in the page itself (a `<meta>` cannot say `frame-ancestors`), so the page
/// is confined even where a proxy in front drops the header.
const META_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
img-src 'self' data:; font-src 'self'; connect-src 'self'; worker-src blob:; base-uri 'none'; \
form-action 'none'";

/// Redoc's bundle, in `redoc_dir`.
pub const REDOC_BUNDLE: &str = "redoc.standalone.js";

/// The largest file served from `redoc_dir`.
const MAX_ASSET: u64 = 16 * 1024 * 1024;

/// What a document build needs, kept for the rebuilds when a CapabilityStatement arrives.
struct Model {
    config: Config,
    fragments: HashMap<usize, Value>,
}

/// The document, as served.
struct Rendered {
    json: Bytes,
    yaml: Bytes,
}

/// The portal of one config generation: its document (rebuilt when a CapabilityStatement
/// arrives) and the refresh loop that fetches them.
pub struct PortalState {
    prefix: String,
    title: String,
    redoc_dir: Option<PathBuf>,
    refresh: Duration,
    model: Model,
    targets: Vec<fetch::Target>,
    caps: RwLock<HashMap<openapi::CapKey, fetch::CapSummary>>,
    document: RwLock<Arc<Rendered>>,
    /// Files of `redoc_dir` read so far (a handful: Redoc's bundle and its worker).
    assets: RwLock<HashMap<String, Bytes>>,
}

/// Read an API's `openapi_fragment`: a JSON or YAML object with a `paths` object.
pub fn read_fragment(path: &Path) -> Result<Value, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > 16 * 1024 * 1024 {
        return Err(format!("{}: larger than 16 MiB", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) => serde_yaml::from_str::<Value>(&text)
            .map_err(|e| format!("{}: neither JSON nor YAML: {e}", path.display()))?,
    };
    if !v.is_object() {
        return Err(format!("{}: not an object", path.display()));
    }
    if !v.get("paths").is_some_and(Value::is_object) {
        return Err(format!("{}: has no `paths` object", path.display()));
    }
    Ok(v)
}

fn resolve(base_dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

/// The portal's checks for `caregate check`: its listener exists, and every API's
/// `openapi_fragment` reads as a JSON or YAML object with `paths`.
pub fn validate(cfg: &Config, base_dir: &Path) -> Result<(), String> {
    for (ai, a) in cfg.apis.iter().enumerate() {
        if let Some(f) = &a.openapi_fragment {
            read_fragment(&resolve(base_dir, f))
                .map_err(|e| format!("apis[{ai}] ({}).openapi_fragment: {e}", a.name))?;
        }
    }
    let Some(p) = &cfg.portal else {
        return Ok(());
    };
    if !cfg.listeners.iter().any(|l| l.name == p.listener) {
        return Err(format!(
            "portal.listener: no listener named `{}`",
            p.listener
        ));
    }
    for (i, s) in p.servers.iter().enumerate() {
        if !(s.starts_with("http://") || s.starts_with("https://") || s.starts_with('/')) {
            return Err(format!(
                "portal.servers[{i}]: `{s}` is not an http(s) URL or a path"
            ));
        }
    }
    Ok(())
}

/// Whether `name` may be served from `redoc_dir`: a plain file name, no path.
pub fn valid_asset_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn asset_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, e)| e) {
        Some("js") | Some("mjs") => "text/javascript; charset=utf-8",
        Some("map") | Some("json") => "application/json",
        Some("css") => "text/css; charset=utf-8",
        Some("txt") => "text/plain; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("woff2") => "font/woff2",
        Some("woff") => "font/woff",
        _ => "application/octet-stream",
    }
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn not_found() -> PortalReply {
    PortalReply {
        status: 404,
        content_type: "text/plain; charset=utf-8",
        body: Bytes::from_static(b"not found\n"),
        headers: vec![("x-content-type-options", "nosniff".into())],
    }
}

impl PortalState {
    /// Built with the generation; fetches nothing yet (its background task does).
    pub fn build(loaded: &crate::config::Loaded) -> Result<Arc<PortalState>, String> {
        let cfg = &loaded.config;
        let Some(pc) = &cfg.portal else {
            return Err("portal: not configured".into());
        };
        let mut fragments = HashMap::new();
        for (ai, a) in cfg.apis.iter().enumerate() {
            if let Some(f) = &a.openapi_fragment {
                let v = read_fragment(&loaded.resolve(f))
                    .map_err(|e| format!("apis[{ai}] ({}).openapi_fragment: {e}", a.name))?;
                fragments.insert(ai, v);
            }
        }
        let keys = openapi::cap_keys(cfg, crate::apis::unix_now());
        let targets = fetch::targets(cfg, &loaded.base_dir, &keys);
        let state = PortalState {
            prefix: pc.path_prefix.trim_end_matches('/').to_string(),
            title: pc.title.clone().unwrap_or_else(|| "caregate APIs".into()),
            redoc_dir: pc.redoc_dir.as_deref().map(|d| loaded.resolve(d)),
            refresh: Duration::from_secs(pc.refresh_seconds.max(10)),
            model: Model {
                config: cfg.clone(),
                fragments,
            },
            targets,
            caps: RwLock::new(HashMap::new()),
            document: RwLock::new(Arc::new(Rendered {
                json: Bytes::new(),
                yaml: Bytes::new(),
            })),
            assets: RwLock::new(HashMap::new()),
        };
        state.rebuild();
        Ok(Arc::new(state))
    }

    /// Build the document again from the model and the CapabilityStatements known now.
    fn rebuild(&self) {
        let caps = self.caps.read().map(|c| c.clone()).unwrap_or_default();
        let doc = openapi::document(&openapi::Inputs {
            config: &self.model.config,
            fragments: &self.model.fragments,
            caps: &caps,
            now: crate::apis::unix_now(),
        });
        let json = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        let yaml = serde_yaml::to_string(&doc).unwrap_or_default();
        if let Ok(mut d) = self.document.write() {
            *d = Arc::new(Rendered {
                json: Bytes::from(json),
                yaml: Bytes::from(yaml),
            });
        }
    }

    /// The document as served now (JSON).
    pub fn document_json(&self) -> Bytes {
        self.document
            .read()
            .map(|d| d.json.clone())
            .unwrap_or_default()
    }

    /// The answer to a GET of `rest`, the path below `path_prefix` (`""`, `/`,
    /// `/openapi.json`, `/openapi.yaml`, `/assets/...`).
    pub fn respond(&self, rest: &str) -> PortalReply {
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let doc_headers = || {
            vec![
                ("x-content-type-options", "nosniff".to_string()),
                ("cache-control", "no-cache".to_string()),
                ("access-control-allow-origin", "*".to_string()),
            ]
        };
        match rest {
            "" | "/" | "/index.html" => self.page(),
            "/openapi.json" => PortalReply {
                status: 200,
                content_type: "application/json",
                body: self.document_json(),
                headers: doc_headers(),
            },
            "/openapi.yaml" => PortalReply {
                status: 200,
                content_type: "application/yaml",
                body: self
                    .document
                    .read()
                    .map(|d| d.yaml.clone())
                    .unwrap_or_default(),
                headers: doc_headers(),
            },
            _ => match rest.strip_prefix("/assets/") {
                Some(name) => self.asset(name),
                None => not_found(),
            },
        }
    }

    fn redoc_installed(&self) -> bool {
        self.redoc_dir
            .as_ref()
            .is_some_and(|d| d.join(REDOC_BUNDLE).is_file())
    }

    /// The Redoc page, or without Redoc a page that says how to install it.
    fn page(&self) -> PortalReply {
        let title = escape_html(&self.title);
        let prefix = escape_html(&self.prefix);
        let body = if self.redoc_installed() {
            format!(
                r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<meta http-equiv="Content-Security-Policy" content="{META_CSP}">
<title>{title}</title>
<style>body {{ margin: 0; padding: 0; }}</style>
</head>
<body>
<noscript><p>This page needs JavaScript. The OpenAPI document is at <a href="{prefix}/openapi.json">openapi.json</a>.</p></noscript>
<redoc spec-url="{prefix}/openapi.json" hide-download-button="true" disable-search="false" expand-responses="200,201" hide-hostname="false"></redoc>
<script src="{prefix}/assets/{REDOC_BUNDLE}"></script>
</body>
</html>
"#
            )
        } else {
            format!(
                r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>body {{ font-family: sans-serif; max-width: 50em; margin: 2em auto; padding: 0 1em; line-height: 1.5; }} code {{ background: #f3f3f3; padding: 0 .2em; }}</style>
</head>
<body>
<h1>{title}</h1>
<p>The API reference page needs Redoc, which is not installed on this gateway.</p>
<p>To install it, run <code>bash scripts/deps.sh --with-portal</code> in the caregate repository (it installs Redoc from the npm registry into <code>portal/node_modules</code>), then set <code>portal.redoc_dir</code> to <code>portal/node_modules/redoc/bundles</code> (the folder holding <code>{REDOC_BUNDLE}</code>).</p>
<p>The OpenAPI 3.1 document is available either way: <a href="{prefix}/openapi.json">openapi.json</a> (also as <a href="{prefix}/openapi.yaml">openapi.yaml</a>).</p>
</body>
</html>
"#
            )
        };
        PortalReply {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: Bytes::from(body),
            headers: vec![
                ("content-security-policy", PAGE_CSP.to_string()),
                ("x-content-type-options", "nosniff".to_string()),
                ("x-frame-options", "DENY".to_string()),
                ("referrer-policy", "no-referrer".to_string()),
                ("cross-origin-opener-policy", "same-origin".to_string()),
                ("cache-control", "no-cache".to_string()),
            ],
        }
    }

    /// A file of `redoc_dir`: plain names only, read once and kept.
    fn asset(&self, name: &str) -> PortalReply {
        if !valid_asset_name(name) {
            return not_found();
        }
        let Some(dir) = &self.redoc_dir else {
            return not_found();
        };
        let cached = self.assets.read().ok().and_then(|a| a.get(name).cloned());
        let body = match cached {
            Some(b) => b,
            None => {
                let path = dir.join(name);
                let ok = std::fs::symlink_metadata(&path)
                    .is_ok_and(|m| m.is_file() && m.len() <= MAX_ASSET);
                if !ok {
                    return not_found();
                }
                let Ok(data) = std::fs::read(&path) else {
                    return not_found();
                };
                let b = Bytes::from(data);
                if let Ok(mut a) = self.assets.write() {
                    if a.len() < 64 {
                        a.insert(name.to_string(), b.clone());
                    }
                }
                b
            }
        };
        PortalReply {
            status: 200,
            content_type: asset_type(name),
            body,
            headers: vec![
                ("x-content-type-options", "nosniff".to_string()),
                ("cache-control", "public, max-age=3600".to_string()),
            ],
        }
    }

    /// Fetch every CapabilityStatement once; rebuild the document when one changed. Whether
    /// every target has one now.
    async fn refresh_all(&self) -> bool {
        let mut changed = false;
        let mut complete = true;
        for t in &self.targets {
            match t.fetch().await {
                Ok(summary) => {
                    if let Ok(mut caps) = self.caps.write() {
                        if caps.get(&t.key) != Some(&summary) {
                            caps.insert(t.key.clone(), summary);
                            changed = true;
                        }
                    }
                }
                Err(e) => {
                    let known = self.caps.read().is_ok_and(|c| c.contains_key(&t.key));
                    complete &= known;
                    log::warn!(
                        "portal: CapabilityStatement of pool {} ({}): {e}{}",
                        t.key.pool,
                        t.key.path,
                        if known { " (keeping the last one)" } else { "" }
                    );
                }
            }
        }
        if changed {
            self.rebuild();
            log::info!("portal: the OpenAPI document was rebuilt");
        }
        complete
    }
}

#[async_trait::async_trait]
impl caregate_filters::BackgroundTask for PortalState {
    async fn run(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        if self.targets.is_empty() {
            let _ = shutdown.changed().await;
            return;
        }
        // Until every CapabilityStatement is known, try again soon (the backends may start
        // after the gateway); then every `refresh_seconds`.
        let mut retry = Duration::from_millis(500);
        loop {
            let complete = tokio::select! {
                c = self.refresh_all() => c,
                _ = shutdown.changed() => return,
            };
            let wait = if complete {
                self.refresh
            } else {
                let w = retry;
                retry = (retry * 2).min(Duration::from_secs(30)).min(self.refresh);
                w
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
