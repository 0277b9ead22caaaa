//! Process lifecycle: signals and start-up checks.
//!
//! - `SIGHUP` (what systemd's `ExecReload` and most runbooks send) never ends the process: it is
//!   logged and the running config is kept (hot reload is not supported yet). It is caught from
//!   the first moment of `run`, before any listener is up.
//! - `SIGTERM` drains gracefully, `SIGINT` stops at once, `SIGQUIT` hands the listening sockets
//!   to a new process (graceful upgrade), as Pingora does.
//! - Before anything is reported, every listen address (the listeners, the admin listener and
//!   built-in sandboxes) is bound once, so a port that is taken is a fatal start-up error with
//!   the reason, instead of a service that retries and panics later while `/readyz` says ready.

use crate::config::Config;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

/// Catch `SIGHUP` from now on, so it cannot end the process before the signal watch runs.
/// The flag it sets is not read: [`GatewaySignals`] logs each `SIGHUP` once it runs.
pub fn catch_sighup_early() -> std::io::Result<()> {
    signal_hook::flag::register(
        signal_hook::consts::SIGHUP,
        Arc::new(AtomicBool::new(false)),
    )
    .map(|_| ())
}

/// The gateway's signal watch for Pingora's `Server::run`: Pingora's shutdown signals, plus a
/// `SIGHUP` that is logged and otherwise ignored.
pub struct GatewaySignals;

#[async_trait::async_trait]
impl ShutdownSignalWatch for GatewaySignals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut quit), Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            log::error!("cannot install the signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        loop {
            tokio::select! {
                _ = quit.recv() => return ShutdownSignal::GracefulUpgrade,
                _ = term.recv() => return ShutdownSignal::GracefulTerminate,
                _ = int.recv() => return ShutdownSignal::FastShutdown,
                _ = hup.recv() => {
                    crate::metrics::CONFIG_RELOADS.with_label_values(&["not_supported"]).inc();
                    log::warn!(
                        "SIGHUP received: reload is not supported yet; the gateway keeps \
                         serving with the config it started with (restart it to apply changes)"
                    );
                }
            }
        }
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
