//! The layer around every accepted client connection: connection caps, the request header
//! deadline, the idle bound, and the count of open connections per listener.
//!
//! Pingora runs no hook before a request header is complete, and its read timeouts apply to
//! each read, not to the whole header: a client that sends one header byte every few seconds
//! is never cut off by them (slowloris). So each listener's proxy is wrapped in [`Guarded`], a
//! `ServerApp` that sees the connection as soon as it is accepted (after the TLS handshake,
//! which Pingora bounds at 60 s):
//!
//! - it admits the connection against a process-wide cap and a cap per client address (the
//!   TCP peer; trusted proxies and configured exemptions are not capped) or refuses it at once
//!   with a `503 too_many_connections` (an HTTP/2 connection is closed without a reply);
//! - it wraps the stream in [`GuardedIo`], which enforces two deadlines on reads:
//!   the *idle* bound while the connection waits for a request's first byte (the connection is
//!   closed as a client close would, at `server.downstream_keepalive_seconds`), and the *header*
//!   deadline from a request's first byte until its header is complete (the connection is cut
//!   at `server.connections.header_timeout_seconds`, however the bytes trickle in);
//! - its [`Admission`] keeps `caregate_listener_connections` exact, for the whole life of the
//!   connection.
//!
//! The proxy tells the layer where a request stands: [`header_done`] in
//! `early_request_filter` (the header was parsed: no deadline of this layer applies to the body,
//! which the proxy bounds by a minimum rate, nor to the wait for the upstream) and
//! [`request_done`] in `logging` (the next read waits for a new request). HTTP/2 connections
//! carry many requests at once: there the layer applies no read deadline, and the HTTP/2
//! options bound streams, header lists and idle connections instead.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;
use once_cell::sync::Lazy;
use pingora::apps::ServerApp;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, UniqueID, UniqueIDType,
    ALPN,
};
use pingora::protocols::{Stream, IO};
use pingora::server::ShutdownWatch;
use prometheus::{register_int_counter_vec, IntCounterVec, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

/// Connections refused at accept, by listener and reason (`per_client_limit`, `total_limit`).
#[allow(clippy::expect_used)]
pub static REFUSED: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_connections_refused_total",
        "Client connections refused at accept because a connection cap was reached, by listener and reason (per_client_limit, total_limit).",
        &["listener", "reason"]
    )
    .expect("register caregate_connections_refused_total")
});

/// Connections the gateway closed on a client that was too slow, by listener and reason.
#[allow(clippy::expect_used)]
pub static CUT: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_slow_clients_cut_total",
        "Client connections or requests cut because the client was too slow, by listener and reason (header_timeout: the request header was not complete in time; body_too_slow: the request body came slower than the minimum rate).",
        &["listener", "reason"]
    )
    .expect("register caregate_slow_clients_cut_total")
});

/// Idle connections closed at the idle bound, by listener.
#[allow(clippy::expect_used)]
pub static IDLE_CLOSED: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_idle_connections_closed_total",
        "Client connections closed after waiting idle for a request for the keep-alive bound, by listener.",
        &["listener"]
    )
    .expect("register caregate_idle_connections_closed_total")
});

/// Touch the families so that they are present from the first scrape.
pub fn init() {
    Lazy::force(&REFUSED);
    Lazy::force(&CUT);
    Lazy::force(&IDLE_CLOSED);
}

/// Create the series of `listener` at 0, so that they are present from the first scrape.
pub fn init_listener(listener: &str) {
    for reason in [Refusal::PerClient.label(), Refusal::Total.label()] {
        REFUSED.with_label_values(&[listener, reason]);
    }
    for reason in ["header_timeout", "body_too_slow"] {
        CUT.with_label_values(&[listener, reason]);
    }
    IDLE_CLOSED.with_label_values(&[listener]);
}

/// The soft limit of open files of this process (`/proc/self/limits`), if it can be read.
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A warning when `max_total` client connections cannot all be open under the process's
/// open-file limit (each also needs an upstream connection at times, and the process its own
/// files): accept would then fail with EMFILE before the cap refuses cleanly.
pub fn fd_limit_warning(max_total: usize, limit: Option<u64>) -> Option<String> {
    let limit = limit?;
    let needed = (max_total as u64).saturating_mul(2).saturating_add(256);
    (max_total == 0 || needed > limit).then(|| {
        format!(
            "server.connections.max_total is {} but the open-file limit is {limit}: raise the limit \
             (LimitNOFILE, ulimit -n) to at least {needed}, or lower max_total, so that the cap \
             refuses clients cleanly before accept runs out of file descriptors",
            if max_total == 0 { "unlimited".to_string() } else { max_total.to_string() }
        )
    })
}

/// A listener's caps and deadlines: `server.connections` with the listener's own
/// `connections` over it, and `server.downstream_keepalive_seconds`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections per client address on this listener; 0: no cap.
    pub max_per_client: usize,
    /// Client addresses that are not capped per address (trusted proxies, load balancers).
    pub exempt: Vec<IpNet>,
    /// From a request's first byte until its header is complete.
    pub header_timeout: Duration,
    /// Waiting for the first byte of a request; `None`: unbounded.
    pub idle_timeout: Option<Duration>,
}

/// Counts open connections, in total (every listener of the process) and per listener and
/// client address.
pub struct Tracker {
    /// Open client connections of the whole process; 0: no cap.
    max_total: usize,
    total: AtomicUsize,
    per_client: Mutex<HashMap<(Arc<str>, IpAddr), usize>>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client address has `max_per_client` connections open.
    PerClient,
    /// The process has `max_total` connections open.
    Total,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::PerClient => "per_client_limit",
            Refusal::Total => "total_limit",
        }
    }
}

impl Tracker {
    /// A tracker with a cap of `max_total` connections for the process (0: none).
    pub fn new(max_total: usize) -> Arc<Tracker> {
        Arc::new(Tracker {
            max_total,
            total: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
        })
    }

    /// Open connections of the process now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Admit a connection from `peer` on `listener` (None: a peer without an IP address, e.g. a
    /// Unix socket, capped in total only), or say why not.
    pub fn admit(
        self: &Arc<Self>,
        listener: &Arc<str>,
        limits: &Limits,
        peer: Option<IpAddr>,
        open: &IntGauge,
    ) -> Result<Admission, Refusal> {
        let max_total = self.max_total;
        let prev = self.total.fetch_add(1, Ordering::AcqRel);
        if max_total > 0 && prev >= max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Total);
        }
        let counted = match peer {
            Some(ip)
                if limits.max_per_client > 0 && !limits.exempt.iter().any(|n| n.contains(&ip)) =>
            {
                let mut map = match self.per_client.lock() {
                    Ok(m) => m,
                    Err(poisoned) => poisoned.into_inner(),
                };
                let n = map.entry((listener.clone(), ip)).or_insert(0);
                if *n >= limits.max_per_client {
                    drop(map);
                    self.total.fetch_sub(1, Ordering::AcqRel);
                    return Err(Refusal::PerClient);
                }
                *n += 1;
                Some(ip)
            }
            _ => None,
        };
        open.inc();
        Ok(Admission {
            tracker: self.clone(),
            listener: listener.clone(),
            counted,
            open: open.clone(),
        })
    }
}

/// One admitted connection: its counts are given back when it is dropped (when the connection
/// closes, however it ends).
pub struct Admission {
    tracker: Arc<Tracker>,
    listener: Arc<str>,
    counted: Option<IpAddr>,
    /// The listener's `caregate_listener_connections` series.
    open: IntGauge,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.tracker.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.counted {
            let mut map = match self.tracker.per_client.lock() {
                Ok(m) => m,
                Err(poisoned) => poisoned.into_inner(),
            };
            let key = (self.listener.clone(), ip);
            if let Some(n) = map.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
        self.open.dec();
    }
}

/// A listener's application wrapped in the connection layer.
pub struct Guarded<A> {
    inner: Arc<A>,
    listener: Arc<str>,
    tracker: Arc<Tracker>,
    limits: Limits,
    /// The listener's `caregate_listener_connections` series, looked up once.
    open: IntGauge,
}

impl<A> Guarded<A> {
    /// Wrap `inner`, the application of the listener named `listener`, with its `limits`.
    pub fn new(inner: A, listener: &str, tracker: Arc<Tracker>, limits: Limits) -> Self {
        Guarded {
            inner: Arc::new(inner),
            listener: Arc::from(listener),
            tracker,
            limits,
            open: crate::metrics::LISTENER_CONNECTIONS.with_label_values(&[listener]),
        }
    }
}

/// The refusal a capped HTTP/1 client reads before the connection closes.
fn refusal_bytes(reason: Refusal) -> Vec<u8> {
    let detail = match reason {
        Refusal::PerClient => "too many connections from this client address; retry later",
        Refusal::Total => "the gateway has too many open connections; retry later",
    };
    let id = format!("conn-{:016x}", rand::random::<u64>());
    let (content_type, body) =
        crate::errors::render(false, 503, "too_many_connections", detail, &id);
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\nx-request-id: {id}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        let admission = match self
            .tracker
            .admit(&self.listener, &self.limits, peer, &self.open)
        {
            Ok(a) => a,
            Err(reason) => {
                REFUSED
                    .with_label_values(&[self.listener.as_ref(), reason.label()])
                    .inc();
                if !h2 {
                    // Best effort, bounded: a client that does not read gets the close only.
                    let bytes = refusal_bytes(reason);
                    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&bytes))
                        .await;
                    let _ = tokio::time::timeout(Duration::from_secs(1), stream.flush()).await;
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
                return None;
            }
        };
        let limits = &self.limits;
        let io = GuardedIo {
            inner: stream,
            born: Instant::now(),
            phase: AtomicU8::new(if h2 { PHASE_NONE } else { PHASE_AWAIT }),
            since_ms: AtomicU64::new(0),
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            timer: None,
            timer_at: None,
            listener: self.listener.clone(),
            _admission: admission,
        };
        self.inner.process_new(Box::new(io), shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// Waiting for the first byte of a request (the idle bound applies).
const PHASE_AWAIT: u8 = 0;
/// A request header is being read (the header deadline applies).
const PHASE_HEADER: u8 = 1;
/// The header was parsed; the request is in the proxy's hands (no deadline of this layer).
const PHASE_REQUEST: u8 = 2;
/// No deadline at all (HTTP/2: many requests share the connection).
const PHASE_NONE: u8 = 3;

/// An accepted client stream with the idle bound and the header deadline on its reads.
pub struct GuardedIo {
    inner: Stream,
    born: Instant,
    phase: AtomicU8,
    /// When the current phase began, in ms after `born`.
    since_ms: AtomicU64,
    header_timeout: Duration,
    idle_timeout: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    timer_at: Option<Instant>,
    listener: Arc<str>,
    _admission: Admission,
}

impl fmt::Debug for GuardedIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedIo")
            .field("inner", &self.inner)
            .field("phase", &self.phase.load(Ordering::Relaxed))
            .finish()
    }
}

impl GuardedIo {
    fn enter(&self, phase: u8) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.since_ms.store(ms, Ordering::Release);
        self.phase.store(phase, Ordering::Release);
    }

    /// The deadline of the current phase, if it has one.
    fn deadline(&self) -> Option<(u8, Instant)> {
        let phase = self.phase.load(Ordering::Acquire);
        let limit = match phase {
            PHASE_AWAIT => self.idle_timeout?,
            PHASE_HEADER => self.header_timeout,
            _ => return None,
        };
        let since = Duration::from_millis(self.since_ms.load(Ordering::Acquire));
        Some((phase, self.born + since + limit))
    }
}

/// The layer around the stream of this session, when it has one (HTTP/1).
fn guarded(session: &pingora::proxy::Session) -> Option<&GuardedIo> {
    let stream = session.as_downstream().stream()?;
    let io: &dyn IO = &**stream;
    io.as_any().downcast_ref::<GuardedIo>()
}

/// The request header of `session` is complete: the header deadline no longer applies.
pub fn header_done(session: &pingora::proxy::Session) {
    if let Some(io) = guarded(session) {
        if io.phase.load(Ordering::Acquire) != PHASE_NONE {
            io.enter(PHASE_REQUEST);
        }
    }
}

/// The request of `session` is over: the next read waits for a new request (the idle bound).
pub fn request_done(session: &pingora::proxy::Session) {
    if let Some(io) = guarded(session) {
        if io.phase.load(Ordering::Acquire) != PHASE_NONE {
            io.enter(PHASE_AWAIT);
        }
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && this.phase.load(Ordering::Acquire) == PHASE_AWAIT
                {
                    this.enter(PHASE_HEADER);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some((phase, at)) = this.deadline() else {
                    this.timer = None;
                    this.timer_at = None;
                    return Poll::Pending;
                };
                if this.timer_at != Some(at) {
                    match this.timer.as_mut() {
                        Some(t) => t.as_mut().reset(at),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                    this.timer_at = Some(at);
                }
                let fired = match this.timer.as_mut() {
                    Some(t) => t.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if !fired {
                    return Poll::Pending;
                }
                this.timer = None;
                this.timer_at = None;
                if phase == PHASE_AWAIT {
                    // Read as the client closing an idle connection: a quiet close.
                    IDLE_CLOSED
                        .with_label_values(&[this.listener.as_ref()])
                        .inc();
                    this.phase.store(PHASE_NONE, Ordering::Release);
                    return Poll::Ready(Ok(()));
                }
                CUT.with_label_values(&[this.listener.as_ref(), "header_timeout"])
                    .inc();
                this.phase.store(PHASE_NONE, Ordering::Release);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the request header was not complete within the header deadline",
                )))
            }
        }
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for GuardedIo {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for GuardedIo {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedIo {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedIo {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedIo {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for GuardedIo {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, socket_digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(socket_digest)
    }
}

#[async_trait]
impl Peek for GuardedIo {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// The minimum-rate rule for request bodies: after `grace`, a body must have come at
/// `min_rate` bytes per second or faster, counted from the end of its header.
#[derive(Debug, Clone, Copy)]
pub struct BodyRate {
    /// Bytes per second; 0: no minimum.
    pub min_rate: u64,
    /// Time allowed before the rate counts.
    pub grace: Duration,
}

impl BodyRate {
    /// Whether `bytes` received `elapsed` after the header is too slow.
    pub fn too_slow(&self, bytes: u64, elapsed: Duration) -> bool {
        if self.min_rate == 0 || elapsed <= self.grace {
            return false;
        }
        let counted = (elapsed - self.grace).as_secs_f64();
        (bytes as f64) < counted * self.min_rate as f64
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limits(max_per_client: usize, exempt: &[&str]) -> Limits {
        Limits {
            max_per_client,
            exempt: exempt.iter().map(|s| s.parse().unwrap()).collect(),
            header_timeout: Duration::from_secs(1),
            idle_timeout: None,
        }
    }

    #[test]
    fn per_client_cap_holds_and_frees_on_close() {
        let t = Tracker::new(0);
        let open = IntGauge::new("test_open", "open connections").unwrap();
        let lim = limits(2, &[]);
        let l: Arc<str> = Arc::from("t-per-client");
        let other_listener: Arc<str> = Arc::from("t-per-client-2");
        let a: IpAddr = "10.1.1.1".parse().unwrap();
        let b: IpAddr = "10.1.1.2".parse().unwrap();
        let one = t.admit(&l, &lim, Some(a), &open).unwrap();
        let _two = t.admit(&l, &lim, Some(a), &open).unwrap();
        assert_eq!(
            t.admit(&l, &lim, Some(a), &open).err(),
            Some(Refusal::PerClient)
        );
        // Another address, or the same address on another listener, is not affected.
        let _other = t.admit(&l, &lim, Some(b), &open).unwrap();
        let _elsewhere = t.admit(&other_listener, &lim, Some(a), &open).unwrap();
        drop(one);
        let _again = t.admit(&l, &lim, Some(a), &open).unwrap();
        assert_eq!(t.open(), 4, "the refused and dropped ones are not counted");
    }

    #[test]
    fn total_cap_and_exempt_addresses() {
        let t = Tracker::new(3);
        let open = IntGauge::new("test_open", "open connections").unwrap();
        let lim = limits(1, &["192.0.2.0/24"]);
        let l: Arc<str> = Arc::from("t-total");
        let lb: IpAddr = "192.0.2.7".parse().unwrap();
        let held: Vec<_> = (0..3)
            .map(|_| t.admit(&l, &lim, Some(lb), &open).unwrap())
            .collect();
        assert_eq!(
            t.admit(&l, &lim, Some("10.0.0.1".parse().unwrap()), &open)
                .err(),
            Some(Refusal::Total)
        );
        drop(held);
        assert_eq!(t.open(), 0);
        assert!(t.per_client.lock().unwrap().is_empty());
    }

    #[test]
    fn a_cap_above_the_open_file_limit_is_warned_about() {
        assert!(fd_limit_warning(20_000, Some(1_048_576)).is_none());
        let w = fd_limit_warning(20_000, Some(1024)).unwrap();
        assert!(w.contains("40256"), "{w}");
        assert!(fd_limit_warning(0, Some(1024)).is_some(), "no cap at all");
        assert!(fd_limit_warning(20_000, None).is_none(), "limit unknown");
    }

    #[test]
    fn body_rate_rule() {
        let r = BodyRate {
            min_rate: 500,
            grace: Duration::from_secs(20),
        };
        assert!(!r.too_slow(0, Duration::from_secs(20)));
        assert!(r.too_slow(0, Duration::from_secs(21)));
        assert!(!r.too_slow(5_000, Duration::from_secs(30)));
        assert!(r.too_slow(4_999, Duration::from_secs(30)));
        let off = BodyRate {
            min_rate: 0,
            grace: Duration::ZERO,
        };
        assert!(!off.too_slow(0, Duration::from_secs(3600)));
    }

    #[test]
    fn refusal_is_a_complete_http_response() {
        let bytes = refusal_bytes(Refusal::PerClient);
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
        assert!(body.contains("too_many_connections"));
    }
}
