//! Process lifecycle: signals, draining, start-up checks.
//!
//! - `SIGHUP` (what systemd's `ExecReload` and most runbooks send) reloads the config file (see
//!   [`crate::reload`]); it is caught from the first moment of `run`, before any listener is up,
//!   so it never ends the process.
//! - `SIGTERM` drains: `/readyz` turns 503 at once, the listeners keep accepting and serving for
//!   `server.drain_delay_seconds` (load balancers and Kubernetes endpoints move away meanwhile),
//!   then they close and the requests in flight finish, within `server.grace_period_seconds`.
//!   The process exits as soon as none is left, after sealing the audit trail and flushing the
//!   access log and span exporter.
//! - `SIGQUIT` is a graceful upgrade: the audit trail is handed over first (this process seals
//!   its segment and the new process continues the chain in a new one, see `caregate-audit`),
//!   then the listening sockets go to the new process over `server.upgrade_sock`, then this
//!   process drains as on `SIGTERM` (without the delay: the sockets keep being served).
//! - `SIGUSR1` reopens the access log file (rotation by rename, without copytruncate).
//! - `SIGINT` stops at once.
//! - Before anything is reported, every listen address (the listeners, the admin listener and
//!   built-in sandboxes) is bound once, so a port that is taken is a fatal start-up error with
//!   the reason, instead of a service that retries and panics later while `/readyz` says ready.

use crate::config::Config;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};

/// Set when the process starts to stop: `/readyz` answers 503 from then on.
static DRAINING: AtomicBool = AtomicBool::new(false);
/// Requests between their context's creation and its drop.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Whether the process is stopping (readiness must fail).
pub fn draining() -> bool {
    DRAINING.load(Ordering::Acquire)
}

fn start_draining() {
    DRAINING.store(true, Ordering::Release);
    crate::metrics::DRAINING.set(1);
}

/// Requests in flight now.
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::Acquire)
}

/// Counts one request in flight for as long as it lives (held by the request's context). One
/// atomic per request; `caregate_requests_in_flight` reads it at each scrape.
pub struct InFlight(());

impl InFlight {
    pub fn enter() -> InFlight {
        IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Catch `SIGHUP` from now on, so it cannot end the process before the signal watch runs.
/// The flag it sets is not read: [`GatewaySignals`] handles each `SIGHUP` once it runs.
pub fn catch_sighup_early() -> std::io::Result<()> {
    // SIGUSR1 (reopen the access log) too: its default action would end the process.
    for sig in [signal_hook::consts::SIGHUP, signal_hook::consts::SIGUSR1] {
        signal_hook::flag::register(sig, Arc::new(AtomicBool::new(false)))?;
    }
    Ok(())
}

/// What the process must close before it exits, once: the audit trail (its final, sealing
/// checkpoint), the access log, the span exporter, the pid file.
#[derive(Default)]
pub struct Finisher {
    audit: Option<Arc<caregate_audit::AuditSink>>,
    access_log: Option<crate::access_log::AccessLog>,
    otlp: Option<Arc<crate::otlp::OtlpExporter>>,
    pid_file: Option<PathBuf>,
    done: Mutex<bool>,
}

impl Finisher {
    pub fn new(
        audit: Option<Arc<caregate_audit::AuditSink>>,
        access_log: Option<crate::access_log::AccessLog>,
        otlp: Option<Arc<crate::otlp::OtlpExporter>>,
        pid_file: Option<PathBuf>,
    ) -> Finisher {
        Finisher {
            audit,
            access_log,
            otlp,
            pid_file,
            done: Mutex::new(false),
        }
    }

    /// Write the pid file (if configured).
    pub fn write_pid_file(&self) -> Result<(), String> {
        if let Some(p) = &self.pid_file {
            std::fs::write(p, format!("{}\n", std::process::id()))
                .map_err(|e| format!("server.pid_file: {}: {e}", p.display()))?;
        }
        Ok(())
    }

    /// Close everything; blocking; the second call does nothing.
    pub fn finish(&self) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        if *done {
            return;
        }
        *done = true;
        if let Some(a) = &self.audit {
            a.shutdown();
        }
        if let Some(l) = &self.access_log {
            l.flush(Duration::from_secs(2));
        }
        if let Some(o) = &self.otlp {
            o.shutdown();
        }
        if let Some(p) = &self.pid_file {
            // A new process of a graceful upgrade has written its own id there: leave it.
            let ours = format!("{}\n", std::process::id());
            if std::fs::read_to_string(p).ok().as_deref() == Some(ours.as_str()) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// The gateway's signal watch for Pingora's `Server::run` (see the module docs).
pub struct GatewaySignals {
    pub drain_delay: Duration,
    pub audit: Option<Arc<caregate_audit::AuditSink>>,
    pub reloader: Option<Arc<crate::reload::Reloader>>,
}

#[async_trait::async_trait]
impl ShutdownSignalWatch for GatewaySignals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut quit), Ok(mut term), Ok(mut int), Ok(mut hup), Ok(mut usr1)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined1()),
        ) else {
            log::error!("cannot install the signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        loop {
            tokio::select! {
                _ = quit.recv() => {
                    start_draining();
                    log::info!("SIGQUIT received: graceful upgrade; handing the audit trail over");
                    if let Some(audit) = self.audit.clone() {
                        match tokio::task::spawn_blocking(move || audit.hand_over()).await {
                            Ok(Ok(())) => log::info!("audit trail handed over to the next process"),
                            Ok(Err(e)) => log::error!("audit hand-over failed: {e}; the new process waits for this one to exit"),
                            Err(e) => log::error!("audit hand-over failed: {e}"),
                        }
                    }
                    return ShutdownSignal::GracefulUpgrade;
                }
                _ = term.recv() => {
                    start_draining();
                    log::info!(
                        "SIGTERM received: draining; /readyz answers 503, listeners keep serving for {} s",
                        self.drain_delay.as_secs()
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(self.drain_delay) => {}
                        _ = int.recv() => return ShutdownSignal::FastShutdown,
                    }
                    log::info!("drain delay over: closing the listeners; {} requests in flight", in_flight());
                    return ShutdownSignal::GracefulTerminate;
                }
                _ = int.recv() => return ShutdownSignal::FastShutdown,
                _ = usr1.recv() => {
                    log::info!("SIGUSR1 received: reopening the access log");
                    crate::access_log::reopen();
                }
                _ = hup.recv() => {
                    match &self.reloader {
                        Some(r) => {
                            let _ = r.reload(crate::reload::Trigger::Signal).await;
                        }
                        None => log::warn!("SIGHUP received: reload is not available in this process"),
                    }
                }
            }
        }
    }
}

/// After Pingora's shutdown broadcast (the listeners have closed): waits until no request is
/// in flight (or the grace period is over), closes what must be closed, and exits, instead of
/// sleeping the whole grace period.
pub struct Drain {
    pub grace: Duration,
    pub finisher: Arc<Finisher>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let _ = shutdown.changed().await;
        start_draining();
        let deadline = Instant::now() + self.grace;
        // A request between the accept and its context does not count yet: require a short
        // quiet spell, not one empty reading.
        let mut quiet_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if in_flight() == 0 {
                let since = *quiet_since.get_or_insert(now);
                if now.duration_since(since) >= Duration::from_millis(150) {
                    log::info!("drained: no request in flight");
                    break;
                }
            } else {
                quiet_since = None;
            }
            if now >= deadline {
                log::warn!(
                    "grace period over with {} requests in flight; they are cut off",
                    in_flight()
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let f = self.finisher.clone();
        let _ = tokio::task::spawn_blocking(move || f.finish()).await;
        log::info!("stopped");
        std::process::exit(0);
    }
}

/// Bind every listen address once and release it: a taken port or an address this host does
/// not have is an error naming the listener, before the server starts. (Not on a graceful
/// upgrade: the old process holds the sockets then, and hands them over.)
pub fn precheck_binds(cfg: &Config) -> Result<(), String> {
    let mut held = Vec::new();
    for crate::config::ListenAddress { who, addr, .. } in crate::config::listen_addresses(cfg) {
        match TcpListener::bind(addr) {
            // Held until all are checked, so two of our own addresses cannot both pass.
            Ok(l) => held.push(l),
            Err(e) => return Err(format!("{who}: cannot listen on {addr}: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::SocketAddr;

    fn config(listen: SocketAddr, admin: SocketAddr) -> Config {
        crate::config::parse(&format!(
            "admin: {{ listen: \"{admin}\" }}\nlisteners: [ {{ name: public, channel: public, listen: \"{listen}\" }} ]\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_taken_port_is_named() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let free = TcpListener::bind("127.0.0.1:0").unwrap();
        let free_addr = free.local_addr().unwrap();
        drop(free);
        let e = precheck_binds(&config(addr, free_addr)).unwrap_err();
        assert!(
            e.starts_with("listeners[0] (public): cannot listen on"),
            "{e}"
        );
        let e = precheck_binds(&config(free_addr, addr)).unwrap_err();
        assert!(e.starts_with("admin.listen: cannot listen on"), "{e}");
        drop(taken);
        assert!(precheck_binds(&config(addr, free_addr)).is_ok());
    }
}
