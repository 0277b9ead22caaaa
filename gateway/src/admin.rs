//! The admin listener: the gateway's own small HTTP app.
//!
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /readyz`: 200 once every pool has had its settling health-check passes, while the
//!   audit sink (if any) writes, and while every filter can do its job (every issuer has a
//!   usable key set); 503 with the reason otherwise.
//!   While the process drains (after `SIGTERM` or `SIGQUIT`) it answers 503 `draining`.
//! - `GET /metrics`: the Prometheus text of the default registry.
//! - `POST /reload`: reload the config file (as `SIGHUP` does); 200 with the new generation
//!   and hash, or 422 with the reason it was rejected (the running config keeps serving).
//! - `POST /reload/rollback`: go back to the config before the running one (same checks).
//! - `GET /config`: the running config's generation and SHA-256 (JSON); never the config.
//! - `POST /sandbox/{name}/outage` and `POST /sandbox/{name}/restore`: switch a built-in
//!   sandbox backend into a simulated outage and back (demo and tests).
//!
//! Bound to loopback by default. With `admin.token` set, every path but `/healthz` and
//! `/readyz` (the orchestrator's probes) needs `Authorization: Bearer <token>`.

use crate::sandbox_server::SandboxControl;
use crate::upstream::Readiness;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{Encoder, TextEncoder};
use std::collections::HashMap;
use std::sync::Arc;

pub struct AdminApp {
    pub readiness: Arc<Readiness>,
    /// Not ready while the audit sink fails: the load balancer should send PHI traffic to
    /// replicas that can audit it.
    pub audit: Option<Arc<caregate_audit::AuditSink>>,
    /// The live config generation. Its `admin.token` guards every path but the probes (it is
    /// reloadable, so a rotated secret takes effect at the next reload); `/readyz` is not ready
    /// while one of its filters cannot do its job yet (e.g. an issuer's key set is not loaded).
    pub live: crate::reload::Live,
    pub reloader: Arc<crate::reload::Reloader>,
    pub sandboxes: HashMap<String, Arc<SandboxControl>>,
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = r.body().len();
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

fn plain(status: u16, body: &str) -> Response<Vec<u8>> {
    reply(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes().to_vec(),
    )
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl AdminApp {
    /// Every pool is without a backend (its names never resolved).
    fn no_backend(&self) -> bool {
        let g = self.live.load();
        !g.pools.is_empty()
            && g.pools
                .iter()
                .all(|p| p.zones.iter().all(|z| z.backend_count() == 0))
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        let generation = self.live.load();
        let Some(token) = generation
            .config
            .admin
            .token
            .as_deref()
            .filter(|t| !t.is_empty())
        else {
            return true;
        };
        let presented = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        same(presented.as_bytes(), token.as_bytes())
    }
}

impl AdminApp {
    /// An `admin` audit record of an action at the admin listener (queued, not waited for).
    fn audit_admin(
        &self,
        session: &ServerSession,
        method: &http::Method,
        path: &str,
        status: u16,
        reason: &str,
    ) {
        let Some(sink) = &self.audit else { return };
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Only known paths are named; anything else is `other` (a path is caller input).
        let route = match path {
            "/metrics" | "/config" | "/reload" | "/reload/rollback" => path.trim_start_matches('/'),
            p if p.starts_with("/sandbox/") => "sandbox",
            _ => "other",
        };
        let rec = caregate_audit::AuditRecord {
            request_id: format!("admin-{}-{n}", std::process::id()),
            phase: caregate_audit::Phase::Admin,
            actor: caregate_audit::Actor {
                source_address: session
                    .client_addr()
                    .and_then(|a| a.as_inet())
                    .map(|a| a.ip().to_string()),
                ..Default::default()
            },
            action: caregate_audit::Action {
                method: method.as_str().to_string(),
                route: route.to_string(),
                listener: "admin".into(),
                channel: "admin".into(),
                interaction: Some(reason.replace('_', "-")),
                ..Default::default()
            },
            outcome: caregate_audit::Outcome {
                status: Some(status),
                reason: Some(reason.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        let result = if sink.append(rec).is_ok() {
            "ok"
        } else {
            "error"
        };
        crate::metrics::AUDIT_RECORDS
            .with_label_values(&["admin", result])
            .inc();
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => return plain(200, "ok\n"),
            ("GET", "/readyz") => {
                return if crate::lifecycle::draining() {
                    plain(503, "not ready: draining (the gateway is stopping)\n")
                } else if !self.readiness.ready() {
                    plain(
                        503,
                        "not ready: upstream health checks have not completed\n",
                    )
                } else if self.no_backend() {
                    plain(
                        503,
                        "not ready: no pool has a backend (every backend name is unresolved)\n",
                    )
                } else if self.audit.as_ref().map(|a| !a.healthy()).unwrap_or(false) {
                    plain(503, "not ready: the audit sink is failing\n")
                } else if let Some(why) = self.live.load().not_ready() {
                    plain(503, &format!("not ready: {why}\n"))
                } else {
                    plain(200, "ready\n")
                }
            }
            _ => {}
        }
        if !self.authorized(session) {
            // A wrong or missing admin token is an admin action attempted: audited (never the
            // token itself).
            self.audit_admin(session, &method, &path, 401, "admin_token_refused");
            let mut r = plain(401, "unauthorized\n");
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"caregate-admin\""),
            );
            return r;
        }
        if method == http::Method::GET && path == "/metrics" {
            crate::metrics::IN_FLIGHT
                .set(i64::try_from(crate::lifecycle::in_flight()).unwrap_or(i64::MAX));
            let encoder = TextEncoder::new();
            let mut buf = Vec::new();
            return match encoder.encode(&prometheus::gather(), &mut buf) {
                Ok(()) => reply(200, encoder.format_type(), buf),
                Err(_) => plain(500, "metrics encoding failed\n"),
            };
        }
        match (method.as_str(), path.as_str()) {
            ("POST", "/reload") | ("POST", "/reload/rollback") => {
                let outcome = if path == "/reload" {
                    self.reloader.reload(crate::reload::Trigger::Admin).await
                } else {
                    self.reloader.rollback().await
                };
                return plain(
                    if outcome.applied { 200 } else { 422 },
                    &format!("{}\n", outcome.message),
                );
            }
            ("GET", "/config") => {
                let g = self.live.load();
                let body = serde_json::json!({ "generation": g.number, "sha256": g.hash });
                return reply(200, "application/json", body.to_string().into_bytes());
            }
            (_, "/reload") | (_, "/reload/rollback") => return plain(405, "use POST\n"),
            _ => {}
        }
        if let Some(rest) = path.strip_prefix("/sandbox/") {
            if method != http::Method::POST {
                return plain(405, "use POST\n");
            }
            let (name, action) = rest.split_once('/').unwrap_or((rest, ""));
            let Some(control) = self.sandboxes.get(name) else {
                return plain(404, "no such sandbox\n");
            };
            return match action {
                "outage" => {
                    control.set_down(true);
                    self.audit_admin(session, &method, &path, 200, "sandbox_outage");
                    plain(200, "sandbox down: its listener is closed\n")
                }
                "restore" => {
                    control.set_down(false);
                    self.audit_admin(session, &method, &path, 200, "sandbox_restore");
                    plain(200, "sandbox restored\n")
                }
                _ => plain(404, "unknown action (outage|restore)\n"),
            };
        }
        plain(404, "not found\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
