//! The MLLP listener: a Pingora service on its own port (TLS and client certificates optional)
//! that reads MLLP frames, hands each message to the [`Engine`] in order, and writes back the
//! acknowledgement before reading the next.

use super::config::MllpListenerConfig;
use super::engine::{Engine, Origin, Upstreams};
use async_trait::async_trait;
use caregate_filters::identity::PeerCertificate;
use caregate_filters::Channel;
use caregate_hl7::{encode_frame, MllpDecoder, MllpError};
use ipnet::IpNet;
use once_cell::sync::Lazy;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use prometheus::{register_int_counter_vec, register_int_gauge_vec, IntCounterVec, IntGaugeVec};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

#[allow(clippy::expect_used)]
pub static CONNECTIONS: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "caregate_hl7_connections",
        "Open MLLP client connections, by hl7 listener.",
        &["listener"]
    )
    .expect("register caregate_hl7_connections")
});

#[allow(clippy::expect_used)]
pub static REFUSED: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_hl7_connections_refused_total",
        "MLLP connections closed at accept, by hl7 listener and reason (`client_not_allowed`).",
        &["listener", "reason"]
    )
    .expect("register caregate_hl7_connections_refused_total")
});

/// One MLLP listener.
pub struct MllpApp {
    pub name: Arc<str>,
    pub channel: Channel,
    pub clients: Vec<IpNet>,
    pub max_message: usize,
    pub idle: Duration,
    pub in_flight: Arc<Semaphore>,
    pub engine: Arc<Engine>,
}

impl MllpApp {
    pub fn new(l: &MllpListenerConfig, engine: Arc<Engine>) -> MllpApp {
        CONNECTIONS.with_label_values(&[l.name.as_str()]).set(0);
        MllpApp {
            name: Arc::from(l.name.as_str()),
            channel: l.channel,
            clients: l.clients.clone(),
            max_message: l.max_message_bytes,
            idle: Duration::from_secs(l.idle_timeout_seconds),
            in_flight: Arc::new(Semaphore::new(l.max_in_flight)),
            engine,
        }
    }
}

struct Open(Arc<str>);

impl Drop for Open {
    fn drop(&mut self) {
        CONNECTIONS.with_label_values(&[&*self.0]).dec();
    }
}

static CONN_SEQ: AtomicU64 = AtomicU64::new(0);

#[async_trait]
impl ServerApp for MllpApp {
    async fn process_new(
        self: &Arc<Self>,
        mut io: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let peer: Option<IpAddr> = io
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        if !self.clients.is_empty()
            && !peer.is_some_and(|ip| self.clients.iter().any(|n| n.contains(&ip)))
        {
            REFUSED
                .with_label_values(&[&*self.name, "client_not_allowed"])
                .inc();
            let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
            return None;
        }
        let cert: Option<PeerCertificate> = io
            .get_ssl_digest()
            .and_then(|d| d.extension.get::<PeerCertificate>().cloned());
        CONNECTIONS.with_label_values(&[&*self.name]).inc();
        let _open = Open(self.name.clone());
        let conn = CONN_SEQ.fetch_add(1, Ordering::Relaxed);
        let mut seq = 0u64;
        let mut decoder = MllpDecoder::new(self.max_message);
        let mut ups = Upstreams::default();
        let mut buf = vec![0u8; 16 * 1024];
        let mut shutdown = shutdown.clone();
        loop {
            let read = tokio::select! {
                r = tokio::time::timeout(self.idle, io.read(&mut buf)) => r,
                _ = shutdown.changed(), if decoder.is_idle() => break,
            };
            let n = match read {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => n,
                Err(_) => {
                    log::debug!("hl7 listener {}: connection idle, closed", self.name);
                    break;
                }
            };
            for item in decoder.push(buf.get(..n).unwrap_or_default()) {
                seq += 1;
                let origin = Origin {
                    source: &self.name,
                    mllp: true,
                    channel: self.channel,
                    peer,
                    cert: cert.as_ref(),
                    caller: None,
                    request_id: format!("mllp-{}-{conn:x}-{seq}", std::process::id()),
                    in_flight: Some(&self.in_flight),
                };
                let handled = match item {
                    Ok(frame) => self.engine.handle(&origin, &frame, &mut ups).await,
                    // Noise between frames is skipped; a dropped partial frame is followed by
                    // the frame that replaced it.
                    Err(MllpError::JunkOutsideFrame { .. })
                    | Err(MllpError::UnexpectedStartBlock { .. }) => continue,
                    Err(MllpError::FrameTooLarge { max, .. }) => Engine::unreadable(
                        &origin,
                        &format!("message larger than {max} bytes (not delivered)"),
                    ),
                    Err(_) => Engine::unreadable(&origin, "broken MLLP framing (not delivered)"),
                };
                let Ok(framed) = encode_frame(&handled.ack) else {
                    log::error!(
                        "hl7 listener {}: an acknowledgement could not be framed",
                        self.name
                    );
                    return None;
                };
                let write = async {
                    io.write_all(&framed).await?;
                    io.flush().await
                };
                match tokio::time::timeout(self.idle, write).await {
                    Ok(Ok(())) => {}
                    _ => return None,
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
        None
    }
}
