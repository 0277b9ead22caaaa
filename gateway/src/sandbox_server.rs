//! The HTTP side of the built-in FHIR sandbox (`caregate-sandbox` holds the FHIR logic).
//!
//! A sandbox listens on its own loopback address, like a real backend, so the gateway reaches it
//! through the same pools, health checks and failover as any other upstream. An outage can be
//! switched on from the admin listener: the sandbox then closes its listening socket and every
//! open connection, so the gateway sees real connection failures, and reopens it on restore.

use async_trait::async_trait;
use caregate_sandbox::{Sandbox, SandboxRequest};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

const MAX_BODY: usize = 32 * 1024 * 1024;

/// Switches a sandbox between serving and a simulated outage.
pub struct SandboxControl {
    down: watch::Sender<bool>,
}

impl SandboxControl {
    pub fn new() -> Arc<Self> {
        let (down, _) = watch::channel(false);
        Arc::new(SandboxControl { down })
    }

    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }

    pub fn is_down(&self) -> bool {
        *self.down.borrow()
    }
}

/// One sandbox FHIR server.
pub struct SandboxServer {
    pub name: String,
    pub listen: SocketAddr,
    /// Path part of the base URL (e.g. `/fhir`), stripped before the FHIR logic sees the path.
    pub base_path: String,
    pub sandbox: Arc<Sandbox>,
    pub control: Arc<SandboxControl>,
}

impl SandboxServer {
    pub fn new(name: &str, listen: SocketAddr, base_url: &str, sandbox: Arc<Sandbox>) -> Self {
        SandboxServer {
            name: name.to_string(),
            listen,
            base_path: base_path_of(base_url),
            sandbox,
            control: SandboxControl::new(),
        }
    }

    /// Serve until `stop` turns true. Returns an error only when the first bind fails.
    pub async fn serve(&self, stop: watch::Receiver<bool>) -> std::io::Result<()> {
        self.serve_with(None, stop).await
    }

    /// Like [`SandboxServer::serve`], starting with a listener already bound.
    pub async fn serve_with(
        &self,
        mut bound: Option<TcpListener>,
        mut stop: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let mut first = true;
        let mut down_rx = self.control.down.subscribe();
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            if *down_rx.borrow_and_update() {
                tokio::select! {
                    _ = down_rx.changed() => continue,
                    _ = stop.changed() => continue,
                }
            }
            let bind = match bound.take() {
                Some(l) => Ok(l),
                None => TcpListener::bind(self.listen).await,
            };
            let listener = match bind {
                Ok(l) => l,
                Err(e) if first => return Err(e),
                Err(e) => {
                    log::warn!("sandbox {}: rebind failed: {e}", self.name);
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
            };
            first = false;
            log::info!("sandbox {} serving on {}", self.name, self.listen);
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let sandbox = self.sandbox.clone();
                        let base = self.base_path.clone();
                        conns.spawn(async move {
                            let svc = service_fn(move |req| {
                                let sandbox = sandbox.clone();
                                let base = base.clone();
                                async move { Ok::<_, std::convert::Infallible>(handle(&sandbox, &base, req).await) }
                            });
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                    _ = down_rx.changed() => {
                        if *down_rx.borrow() {
                            log::warn!("sandbox {}: simulated outage, listener closed", self.name);
                            break;
                        }
                    }
                    _ = stop.changed() => {
                        if *stop.borrow() { break; }
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
            conns.abort_all();
            drop(listener);
        }
    }
}

fn base_path_of(base_url: &str) -> String {
    let after_scheme = base_url
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(base_url);
    match after_scheme.find('/') {
        Some(i) => after_scheme[i..].trim_end_matches('/').to_string(),
        None => String::new(),
    }
}

fn text(status: u16, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

async fn handle(sandbox: &Sandbox, base: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return text(200, "ok\n");
    }
    let rest = match path.strip_prefix(base) {
        Some(r) if r.is_empty() || r.starts_with('/') => r.to_string(),
        _ => return text(404, "not under the sandbox base path\n"),
    };
    let method = req.method().as_str().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let if_match = req
        .headers()
        .get(hyper::header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return text(413, "request body too large or unreadable\n"),
    };
    let sreq = SandboxRequest {
        method: &method,
        path: &rest,
        query: &query,
        body: &body,
        content_type: content_type.as_deref(),
        if_match: if_match.as_deref(),
    };
    let out = sandbox.handle(&sreq);
    let mut r = Response::new(Full::new(Bytes::from(out.body)));
    *r.status_mut() =
        hyper::StatusCode::from_u16(out.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(out.content_type),
    );
    if let Some(loc) = out
        .location
        .and_then(|l| hyper::header::HeaderValue::from_str(&l).ok())
    {
        r.headers_mut().insert(hyper::header::LOCATION, loc);
    }
    if let Some(tag) = out
        .etag
        .and_then(|l| hyper::header::HeaderValue::from_str(&l).ok())
    {
        r.headers_mut().insert(hyper::header::ETAG, tag);
    }
    r
}

/// A sandbox run as one of the gateway's background services.
pub struct SandboxService(pub Arc<SandboxServer>);

#[async_trait]
impl BackgroundService for SandboxService {
    /// Ready once the socket is bound, so the health checks that depend on this service never
    /// probe a sandbox that is not listening yet.
    async fn start_with_ready_notifier(
        &self,
        shutdown: ShutdownWatch,
        ready: pingora::services::ServiceReadyNotifier,
    ) {
        let bound = TcpListener::bind(self.0.listen).await;
        ready.notify_ready();
        match bound {
            Ok(l) => self.run(Some(l), shutdown).await,
            Err(e) => log::error!(
                "sandbox {}: cannot listen on {}: {e}",
                self.0.name,
                self.0.listen
            ),
        }
    }

    async fn start(&self, shutdown: ShutdownWatch) {
        self.run(None, shutdown).await;
    }
}

impl SandboxService {
    async fn run(&self, bound: Option<TcpListener>, mut shutdown: ShutdownWatch) {
        let (tx, rx) = watch::channel(false);
        let server = self.0.clone();
        let task = tokio::spawn(async move { server.serve_with(bound, rx).await });
        let _ = shutdown.changed().await;
        let _ = tx.send(true);
        match task.await {
            Ok(Err(e)) => log::error!("sandbox {}: {e}", self.0.name),
            Err(e) => log::error!("sandbox {}: task failed: {e}", self.0.name),
            Ok(Ok(())) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_paths() {
        assert_eq!(base_path_of("http://127.0.0.1:8101/fhir"), "/fhir");
        assert_eq!(base_path_of("http://127.0.0.1:8101/fhir/"), "/fhir");
        assert_eq!(base_path_of("http://127.0.0.1:8101"), "");
        assert_eq!(base_path_of("https://h/a/b"), "/a/b");
    }
}
