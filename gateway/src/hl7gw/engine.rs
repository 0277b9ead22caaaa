//! One HL7 v2 message through the gateway: parse, route, check, audit, forward, acknowledge.
//!
//! The same path serves the MLLP listeners ([`super::service`]) and `hl7: true` HTTP routes.
//! The gateway acknowledges `AA` (or `CA`) only by relaying a destination's own acknowledgement;
//! everything it answers itself is `AE` (the content is in error) or `AR` (refused: route,
//! allowlist, load, audit, destination down or silent). A message goes to another backend only
//! when connecting failed, never once it was sent.

use super::config::Hl7RouteConfig;
use crate::config::PoolProtocol;
use crate::reload::{Generation, Live};
use crate::upstream::{Pick, Pool};
use caregate_audit::{AuditRecord, AuditSink, Hl7Message, Hl7PatientId, Phase};
use caregate_filters::identity::PeerCertificate;
use caregate_filters::Channel;
use caregate_hl7::{
    build_ack, build_ack_unreadable, encode_frame, parse_ack, parse_message, AckCode, AckError,
    AckParams, ErrorCode, Message, MessageHeader, MllpDecoder, ParseError,
};
use once_cell::sync::Lazy;
use pingora::connectors::TransportConnector;
use pingora::protocols::Stream;
use pingora::upstreams::peer::HttpPeer;
use prometheus::{register_histogram_vec, register_int_counter_vec, HistogramVec, IntCounterVec};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[allow(clippy::expect_used)]
pub static MESSAGES: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_hl7_messages_total",
        "HL7 v2 messages handled, by source (hl7 listener or HTTP route), hl7 route, message type (configured types, else `other`), sending facility (configured facilities, else `other`), outcome and destination (a pool, or `gateway` when the gateway answered itself).",
        &["source", "route", "type", "facility", "outcome", "destination"]
    )
    .expect("register caregate_hl7_messages_total")
});

#[allow(clippy::expect_used)]
pub static DURATION: Lazy<HistogramVec> = Lazy::new(|| {
    register_histogram_vec!(
        "caregate_hl7_message_duration_seconds",
        "Time from a message's receipt to its acknowledgement, by source.",
        &["source"],
        vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0
        ]
    )
    .expect("register caregate_hl7_message_duration_seconds")
});

/// The largest acknowledgement read from a destination.
const MAX_ACK_BYTES: usize = 1 << 20;

/// How a message ended; the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The destination accepted it (`AA`/`CA` relayed).
    Accepted,
    /// The destination found its content in error (`AE`/`CE` relayed).
    DestinationError,
    /// The destination refused it (`AR`/`CR` relayed).
    DestinationReject,
    /// Unreadable or invalid: `AE` from the gateway.
    Malformed,
    /// No route, or an allowlist refused it: `AR`.
    Refused,
    /// The listener had too many messages in flight: `AR`.
    Busy,
    /// The audit trail could not take the access record: `AR`, not forwarded.
    AuditUnavailable,
    /// No backend of the destination could be connected: `AR`, never sent.
    Unavailable,
    /// Sent, and no acknowledgement came in time (or the connection closed): `AR`.
    Timeout,
    /// The destination's answer was not an acknowledgement of this message: `AR`.
    BadAck,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::DestinationError => "destination_error",
            Outcome::DestinationReject => "destination_reject",
            Outcome::Malformed => "malformed",
            Outcome::Refused => "refused",
            Outcome::Busy => "busy",
            Outcome::AuditUnavailable => "audit_unavailable",
            Outcome::Unavailable => "unavailable",
            Outcome::Timeout => "timeout",
            Outcome::BadAck => "bad_ack",
        }
    }

    /// The HTTP status an `hl7: true` route answers with.
    pub fn http_status(self) -> u16 {
        match self {
            Outcome::Accepted | Outcome::DestinationError | Outcome::DestinationReject => 200,
            Outcome::Malformed => 400,
            Outcome::Refused => 403,
            Outcome::Busy | Outcome::AuditUnavailable | Outcome::Unavailable => 503,
            Outcome::BadAck => 502,
            Outcome::Timeout => 504,
        }
    }
}

/// Where a message came from.
pub struct Origin<'a> {
    /// The hl7 listener's or the HTTP route's name.
    pub source: &'a str,
    /// True for an MLLP listener, false for an HTTP route.
    pub mllp: bool,
    pub channel: Channel,
    pub peer: Option<IpAddr>,
    pub cert: Option<&'a PeerCertificate>,
    /// The caller of an HTTP route (subject, client id), when authenticated.
    pub caller: Option<(String, Option<String>)>,
    pub request_id: String,
    /// The listener's bound on messages in flight.
    pub in_flight: Option<&'a Arc<tokio::sync::Semaphore>>,
}

/// The answer to one message.
pub struct Handled {
    /// The acknowledgement, unframed.
    pub ack: Vec<u8>,
    pub code: AckCode,
    pub outcome: Outcome,
}

/// Open MLLP connections to backends, kept by one client connection (so its messages stay in
/// order and do not pay a connect each).
#[derive(Default)]
pub struct Upstreams {
    conns: Vec<(Arc<str>, SocketAddr, Stream)>,
}

impl Upstreams {
    fn take(&mut self, pool: &str) -> Option<(SocketAddr, Stream)> {
        let i = self.conns.iter().position(|(p, _, _)| &**p == pool)?;
        let (_, a, s) = self.conns.swap_remove(i);
        Some((a, s))
    }

    fn put(&mut self, pool: Arc<str>, addr: SocketAddr, s: Stream) {
        // One connection per pool is enough for one client connection's ordered messages.
        self.conns.retain(|(p, _, _)| *p != pool);
        self.conns.push((pool, addr, s));
    }
}

/// The process's HL7 v2 engine.
pub struct Engine {
    pub live: Live,
    pub audit: Option<Arc<AuditSink>>,
    /// The unusual-access monitor over the audit records.
    pub anomaly: Option<Arc<crate::anomaly::Monitor>>,
    l4: TransportConnector,
    http: Arc<pingora::connectors::http::Connector>,
    /// MLLP backends seen closing a kept connection (some receivers take one message per
    /// connection): they get a new connection for every message.
    closers: std::sync::Mutex<std::collections::HashSet<SocketAddr>>,
}

static ACK_SEQ: AtomicU64 = AtomicU64::new(0);

/// MSH-10 of an acknowledgement the gateway writes: unique per process run, at most 20
/// characters (the v2.3–v2.5 length of MSH-10).
fn own_control_id() -> String {
    let n = ACK_SEQ.fetch_add(1, Ordering::Relaxed);
    format!("CG{:x}{:x}", std::process::id() & 0xffff, n)
}

/// `YYYYMMDDHHMMSS+0000` for MSH-7.
fn hl7_timestamp() -> String {
    let t = caregate_audit::format_rfc3339_millis(SystemTime::now());
    // 2024-05-01T12:00:00.123Z
    let digits: String = t.chars().take(19).filter(|c| c.is_ascii_digit()).collect();
    format!("{digits}+0000")
}

/// MSH-4.1, else MSH-4.2.
fn facility_of(h: &MessageHeader) -> &str {
    if h.sending_facility.namespace_id.is_empty() {
        &h.sending_facility.universal_id
    } else {
        &h.sending_facility.namespace_id
    }
}

fn type_matches(r: &Hl7RouteConfig, ty: &str, trigger: &str) -> bool {
    r.message_types.is_empty()
        || r.message_types.iter().any(|t| match t.split_once('^') {
            Some((a, "*")) => a == ty,
            Some((a, b)) => a == ty && b == trigger,
            None => t == ty,
        })
}

fn source_matches(r: &Hl7RouteConfig, o: &Origin<'_>) -> bool {
    if o.mllp {
        r.listener.as_deref() == Some(o.source)
    } else {
        r.http_route.as_deref() == Some(o.source)
    }
}

/// The bounded metric labels of a message.
struct Labels {
    route: String,
    ty: String,
    facility: String,
    destination: String,
}

impl Engine {
    pub fn new(
        live: Live,
        audit: Option<Arc<AuditSink>>,
        anomaly: Option<Arc<crate::anomaly::Monitor>>,
        options: Option<pingora::connectors::ConnectorOptions>,
    ) -> Engine {
        Engine {
            live,
            audit,
            anomaly,
            l4: TransportConnector::new(options.clone()),
            http: Arc::new(pingora::connectors::http::Connector::new(options)),
            closers: Default::default(),
        }
    }

    /// Handle one message (the content of one MLLP frame, or one HTTP body).
    pub async fn handle(&self, origin: &Origin<'_>, frame: &[u8], ups: &mut Upstreams) -> Handled {
        let gen = self.live.load_full();
        let started = Instant::now();
        let mut labels = Labels {
            route: "none".into(),
            ty: "other".into(),
            facility: "other".into(),
            destination: "gateway".into(),
        };
        let handled = self.run(&gen, origin, frame, ups, &mut labels).await;
        MESSAGES
            .with_label_values(&[
                origin.source,
                labels.route.as_str(),
                labels.ty.as_str(),
                labels.facility.as_str(),
                handled.outcome.label(),
                labels.destination.as_str(),
            ])
            .inc();
        DURATION
            .with_label_values(&[origin.source])
            .observe(started.elapsed().as_secs_f64());
        handled
    }

    /// An `AE` for a frame the listener could not take whole (too large, broken framing).
    pub fn unreadable(origin: &Origin<'_>, text: &str) -> Handled {
        MESSAGES
            .with_label_values(&[
                origin.source,
                "none",
                "other",
                "other",
                "malformed",
                "gateway",
            ])
            .inc();
        let err = AckError::new(ErrorCode::ApplicationInternalError, text);
        own_ack(AckCode::AE, &err, Outcome::Malformed)
    }

    async fn run(
        &self,
        gen: &Generation,
        origin: &Origin<'_>,
        frame: &[u8],
        ups: &mut Upstreams,
        labels: &mut Labels,
    ) -> Handled {
        if is_batch(frame) {
            return batch_refused();
        }
        let msg = match parse_message(frame) {
            Ok(m) => m,
            Err(e) => return unreadable_message(&e),
        };
        let header = msg.header();
        let enhanced = header.accept_ack_type.is_some() || header.application_ack_type.is_some();
        let reply = Reply {
            header: &header,
            enhanced,
        };
        if let Err(e) = header.validate() {
            return reply.error(&AckError::from_parse_error(&e), Outcome::Malformed);
        }
        let hl7 = &gen.config.hl7;
        let facility = facility_of(&header).to_string();
        let known = hl7.facilities.iter().find(|f| f.name == facility);
        if let Some(f) = known {
            labels.facility = f.name.clone();
        }
        let tenant = known.and_then(|f| f.tenant.clone());
        let ty = format!("{}^{}", header.message_type, header.trigger_event);
        // A label value only for a type some route names (a sender cannot mint label values).
        let named = hl7.routes.iter().any(|r| {
            !r.message_types.is_empty()
                && type_matches(r, &header.message_type, &header.trigger_event)
        });
        if named && super::config::valid_message_type(&ty) {
            labels.ty = ty.clone();
        }
        let patients = msg.segment("PID").is_some();
        let audit_base = |phase: Phase, route: &str, ack: Option<&str>, reason: &str| {
            audit_record(
                origin,
                &msg,
                &header,
                tenant.as_deref(),
                phase,
                route,
                ack,
                reason,
            )
        };
        // A refusal before forwarding: the gateway's AR (CR), and a `denied` record when the
        // message names a patient.
        let refuse = |route: &str, code: ErrorCode, text: &str, outcome: Outcome, reason: &str| {
            let h = reply.reject(&AckError::new(code, text), outcome);
            if patients {
                self.audit_plain(audit_base(
                    Phase::Denied,
                    route,
                    Some(h.code.as_str()),
                    reason,
                ));
            }
            h
        };

        // Routing: listener or HTTP route, message type, sending facility, tenant.
        let route = hl7.routes.iter().find(|r| {
            source_matches(r, origin)
                && type_matches(r, &header.message_type, &header.trigger_event)
                && (r.sending_facilities.is_empty() || r.sending_facilities.contains(&facility))
                && (r.tenants.is_empty() || tenant.as_ref().is_some_and(|t| r.tenants.contains(t)))
        });
        let Some(route) = route else {
            let typed = hl7.routes.iter().any(|r| {
                source_matches(r, origin)
                    && type_matches(r, &header.message_type, &header.trigger_event)
            });
            let (code, text) = if typed {
                (
                    ErrorCode::ApplicationInternalError,
                    "refused: no route admits this message type from this sending facility",
                )
            } else {
                (
                    ErrorCode::UnsupportedMessageType,
                    "refused: this message type is not routed here",
                )
            };
            return refuse("", code, text, Outcome::Refused, "hl7_no_route");
        };
        labels.route = route.name.clone();

        // The route's allowlists.
        let refused = if !route.sending_applications.is_empty()
            && !route
                .sending_applications
                .contains(&header.sending_application.namespace_id)
        {
            Some("refused: the sending application is not admitted by this route")
        } else if !route.clients.is_empty()
            && !origin
                .peer
                .is_some_and(|ip| route.clients.iter().any(|n| n.contains(&ip)))
        {
            Some("refused: the client address is not admitted by this route")
        } else if !route.client_certs.is_empty()
            && !origin
                .cert
                .and_then(|c| c.common_name.as_ref())
                .is_some_and(|cn| route.client_certs.contains(cn))
        {
            Some("refused: the client certificate is not admitted by this route")
        } else {
            None
        };
        if let Some(text) = refused {
            return refuse(
                &route.name,
                ErrorCode::ApplicationInternalError,
                text,
                Outcome::Refused,
                "hl7_not_allowed",
            );
        }

        // The listener's bound on messages in flight.
        let _permit = match origin.in_flight {
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    return refuse(
                        &route.name,
                        ErrorCode::ApplicationInternalError,
                        "busy: too many messages in flight; resend shortly",
                        Outcome::Busy,
                        "hl7_busy",
                    )
                }
            },
            None => None,
        };
        let _in_flight = crate::lifecycle::InFlight::enter();

        let Some(pool) = gen
            .pool_index
            .get(&route.pool)
            .and_then(|i| gen.pools.get(*i))
            .cloned()
        else {
            return reply.reject(
                &AckError::new(
                    ErrorCode::ApplicationInternalError,
                    "destination not configured",
                ),
                Outcome::Unavailable,
            );
        };
        labels.destination = pool.name.to_string();
        let protocol = gen
            .config
            .pools
            .iter()
            .find(|p| p.name == route.pool)
            .map(|p| p.protocol)
            .unwrap_or_default();

        // Audit: durable before the message leaves the gateway.
        if patients {
            if let Some(sink) = &self.audit {
                let rec = audit_base(Phase::Access, &route.name, None, "");
                let found = crate::anomaly::observe(self.anomaly.as_deref(), gen, &rec);
                match sink.append_durable(rec).await {
                    Ok(_) => {
                        crate::metrics::AUDIT_RECORDS
                            .with_label_values(&["access", "ok"])
                            .inc();
                        crate::anomaly::append(sink, found);
                    }
                    Err(e) => {
                        crate::metrics::AUDIT_RECORDS
                            .with_label_values(&["access", "error"])
                            .inc();
                        log::error!(
                            "hl7 {}: audit sink refused the access record: {e:?}",
                            origin.request_id
                        );
                        return reply.reject(
                            &AckError::new(
                                ErrorCode::ApplicationInternalError,
                                "the audit trail is unavailable; resend later",
                            ),
                            Outcome::AuditUnavailable,
                        );
                    }
                }
            }
        }

        let timeout = Duration::from_millis(route.ack_timeout_ms);
        let sent = match protocol {
            PoolProtocol::Mllp => self.forward_mllp(&pool, frame, timeout, ups).await,
            PoolProtocol::Http => {
                self.forward_http(&pool, route, origin, frame, timeout)
                    .await
            }
        };
        let handled = match sent {
            Ok(bytes) => match parse_ack(&bytes) {
                Ok(ack) if ack.control_id == header.control_id => {
                    let outcome = match ack.code {
                        AckCode::AA | AckCode::CA => Outcome::Accepted,
                        AckCode::AE | AckCode::CE => Outcome::DestinationError,
                        AckCode::AR | AckCode::CR => Outcome::DestinationReject,
                    };
                    Handled {
                        ack: bytes,
                        code: ack.code,
                        outcome,
                    }
                }
                Ok(_) => reply.reject(
                    &AckError::new(
                        ErrorCode::ApplicationInternalError,
                        "the destination acknowledged another message; resend",
                    ),
                    Outcome::BadAck,
                ),
                Err(_) => reply.reject(
                    &AckError::new(
                        ErrorCode::ApplicationInternalError,
                        "the destination's answer is not an acknowledgement; resend",
                    ),
                    Outcome::BadAck,
                ),
            },
            Err(Failure::Unavailable) => reply.reject(
                &AckError::new(
                    ErrorCode::ApplicationInternalError,
                    "the destination is unavailable; the message was not delivered; resend later",
                ),
                Outcome::Unavailable,
            ),
            Err(Failure::NoAck) => reply.reject(
                &AckError::new(
                    ErrorCode::ApplicationInternalError,
                    "no acknowledgement from the destination in time; resend",
                ),
                Outcome::Timeout,
            ),
            Err(Failure::BadAck) => reply.reject(
                &AckError::new(
                    ErrorCode::ApplicationInternalError,
                    "the destination's answer is not an acknowledgement; resend",
                ),
                Outcome::BadAck,
            ),
        };
        if patients {
            let mut rec = audit_base(
                Phase::Completion,
                &route.name,
                Some(handled.code.as_str()),
                handled.outcome.label(),
            );
            rec.upstream = Some(caregate_audit::Upstream {
                pool: pool.name.to_string(),
                zone: None,
            });
            self.audit_plain(rec);
        }
        handled
    }

    fn audit_plain(&self, rec: AuditRecord) {
        if let Some(sink) = &self.audit {
            let phase = rec.phase.as_str();
            let found = crate::anomaly::observe(self.anomaly.as_deref(), &self.live.load(), &rec);
            let result = if sink.append(rec).is_ok() {
                crate::anomaly::append(sink, found);
                "ok"
            } else {
                "error"
            };
            crate::metrics::AUDIT_RECORDS
                .with_label_values(&[phase, result])
                .inc();
        }
    }

    /// Send over MLLP: a kept connection to the pool when it is still open, else the first
    /// backend that accepts a connection (zones in order). Returns the acknowledgement.
    async fn forward_mllp(
        &self,
        pool: &Arc<Pool>,
        frame: &[u8],
        timeout: Duration,
        ups: &mut Upstreams,
    ) -> Result<Vec<u8>, Failure> {
        let framed = encode_frame(frame).map_err(|_| Failure::BadAck)?;
        let mut stream = None;
        if let Some((addr, mut s)) = ups.take(&pool.name) {
            if !still_open(&mut s).await {
                self.closers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(addr);
            } else if pool.has_candidate(&[]) {
                stream = Some((addr, s));
            }
        }
        let (addr, mut s) = match stream {
            Some(x) => x,
            None => self.connect(pool).await?,
        };
        let zone = zone_of(pool, addr);
        let exchange = async {
            s.write_all(&framed).await.map_err(|_| Failure::NoAck)?;
            s.flush().await.map_err(|_| Failure::NoAck)?;
            let mut dec = MllpDecoder::new(MAX_ACK_BYTES);
            let mut buf = vec![0u8; 8192];
            loop {
                let n = s.read(&mut buf).await.map_err(|_| Failure::NoAck)?;
                if n == 0 {
                    return Err(Failure::NoAck);
                }
                for item in dec.push(buf.get(..n).unwrap_or_default()) {
                    match item {
                        Ok(ack) => return Ok(ack),
                        Err(caregate_hl7::MllpError::JunkOutsideFrame { .. }) => {}
                        Err(_) => return Err(Failure::BadAck),
                    }
                }
            }
        };
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(Failure::NoAck),
        };
        let now = Instant::now();
        match &result {
            Ok(_) => {
                if let Some(z) = zone {
                    pool.outlier.success(z, addr, now);
                }
                let closes = self
                    .closers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&addr);
                if !closes {
                    ups.put(pool.name.clone(), addr, s);
                }
            }
            Err(_) => {
                if let Some(z) = zone {
                    backend_failed(pool, z, addr, now);
                }
            }
        }
        result
    }

    /// The first backend that accepts a connection; a failed connect goes on to the next
    /// (nothing was sent).
    async fn connect(&self, pool: &Arc<Pool>) -> Result<(SocketAddr, Stream), Failure> {
        let (pick, _, stream) =
            connect_first(pool, |peer| async move { self.l4.new_stream(&*peer).await }).await?;
        Ok((pick.addr, stream))
    }

    /// POST the message to an HTTP pool; the response body is the acknowledgement.
    async fn forward_http(
        &self,
        pool: &Arc<Pool>,
        route: &Hl7RouteConfig,
        origin: &Origin<'_>,
        frame: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, Failure> {
        let (pick, peer, (mut http, _)) = connect_first(pool, |peer| async move {
            self.http.get_http_session(&*peer).await
        })
        .await?;
        http.set_read_timeout(Some(timeout));
        http.set_write_timeout(peer.options.write_timeout);
        let req = http_request(pool, route, origin, frame.len()).map_err(|_| Failure::BadAck)?;
        let body = bytes::Bytes::copy_from_slice(frame);
        let exchange = async {
            http.write_request_header(Box::new(req)).await?;
            http.write_request_body(body, true).await?;
            http.finish_request_body().await?;
            let status = loop {
                http.read_response_header().await?;
                match http.response_header() {
                    Some(h) if h.status.is_informational() => continue,
                    Some(h) => break h.status.as_u16(),
                    None => {
                        return pingora::Error::e_explain(
                            pingora::ErrorType::InvalidHTTPHeader,
                            "no response header",
                        )
                    }
                }
            };
            let mut buf = Vec::new();
            while let Some(chunk) = http.read_response_body().await? {
                if buf.len() + chunk.len() > MAX_ACK_BYTES {
                    return pingora::Error::e_explain(
                        pingora::ErrorType::InvalidHTTPHeader,
                        "acknowledgement too large",
                    );
                }
                buf.extend_from_slice(&chunk);
            }
            Ok::<_, Box<pingora::Error>>((status, buf))
        };
        let result = tokio::time::timeout(timeout, exchange).await;
        http.shutdown().await;
        let now = Instant::now();
        match result {
            Ok(Ok((status, body))) => {
                if status < 500 {
                    pool.outlier.success(pick.zone, pick.addr, now);
                } else {
                    backend_failed(pool, pick.zone, pick.addr, now);
                }
                // A non-2xx answer counts only when it still is this message's ACK.
                if (200..300).contains(&status) || parse_ack(&body).is_ok() {
                    Ok(body)
                } else {
                    Err(Failure::BadAck)
                }
            }
            Ok(Err(_)) | Err(_) => {
                backend_failed(pool, pick.zone, pick.addr, now);
                Err(Failure::NoAck)
            }
        }
    }
}

/// The first backend of `pool` that takes a connection, in failover order (zones by priority,
/// outlier ejection respected), with `connect` (an MLLP stream or an HTTP session): at most
/// `max_attempts` plus one try per zone. A failed connect counts against its backend and the
/// next one is tried: nothing was sent yet, so that is always safe.
async fn connect_first<T, E, F, Fut>(
    pool: &Arc<Pool>,
    mut connect: F,
) -> Result<(Pick, Box<HttpPeer>, T), Failure>
where
    E: std::fmt::Display,
    F: FnMut(Box<HttpPeer>) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut tried = Vec::new();
    let limit = pool.max_attempts.max(1) + pool.zones.len();
    while tried.len() < limit {
        let Some(pick) = pool.pick(&tried) else {
            break;
        };
        let peer = pool.peer(pick.addr);
        match connect(peer.clone()).await {
            Ok(t) => return Ok((pick, peer, t)),
            Err(e) => {
                log::warn!(
                    "hl7: pool {} backend {}: connect failed: {e}",
                    pool.name,
                    pick.addr
                );
                backend_failed(pool, pick.zone, pick.addr, Instant::now());
                tried.push(pick.addr);
            }
        }
    }
    Err(Failure::Unavailable)
}

fn http_request(
    pool: &Pool,
    route: &Hl7RouteConfig,
    origin: &Origin<'_>,
    len: usize,
) -> pingora::Result<pingora::http::RequestHeader> {
    let mut req = pingora::http::RequestHeader::build("POST", route.path.as_bytes(), None)?;
    let host = pool
        .host_header
        .clone()
        .unwrap_or_else(|| "localhost".into());
    req.insert_header("host", host)?;
    req.insert_header("content-type", super::MEDIA_TYPE)?;
    req.insert_header("content-length", len.to_string())?;
    req.insert_header("x-request-id", origin.request_id.as_str())?;
    req.insert_header("user-agent", "caregate-hl7")?;
    Ok(req)
}

/// Outlier detection hears of a failed attempt on a backend of `pool`.
fn backend_failed(pool: &Pool, zone: usize, addr: SocketAddr, now: Instant) {
    let size = pool.zones.get(zone).map_or(1, |z| z.backend_count());
    pool.outlier.failure(zone, addr, size, now);
}

fn zone_of(pool: &Pool, addr: SocketAddr) -> Option<usize> {
    pool.zones.iter().position(|z| {
        z.lb.backends()
            .get_backend()
            .iter()
            .any(|b| b.addr.as_inet() == Some(&addr))
    })
}

/// Whether a kept connection is still usable: nothing to read and not closed. A peer that
/// closed it (or wrote something unasked) makes it unusable; the message then goes on a new
/// connection, never having been sent on the old one.
async fn still_open(s: &mut Stream) -> bool {
    let mut one = [0u8; 1];
    // Pending (the timeout elapsed) means open and quiet.
    tokio::time::timeout(Duration::ZERO, s.read(&mut one))
        .await
        .is_err()
}

enum Failure {
    /// No backend could be connected: never sent.
    Unavailable,
    /// Sent; no acknowledgement in time, or the connection broke.
    NoAck,
    /// Sent; the answer was not an acknowledgement.
    BadAck,
}

/// How the gateway answers a message whose header it could read.
struct Reply<'a> {
    header: &'a MessageHeader,
    enhanced: bool,
}

impl Reply<'_> {
    fn build(&self, code: AckCode, err: &AckError, outcome: Outcome) -> Handled {
        let id = own_control_id();
        let ts = hl7_timestamp();
        Handled {
            ack: build_ack(self.header, &AckParams::new(code, &id, &ts).with_error(err)),
            code,
            outcome,
        }
    }

    /// `AE` (`CE` in enhanced mode).
    fn error(&self, err: &AckError, outcome: Outcome) -> Handled {
        let code = if self.enhanced {
            AckCode::CE
        } else {
            AckCode::AE
        };
        self.build(code, err, outcome)
    }

    /// `AR` (`CR` in enhanced mode).
    fn reject(&self, err: &AckError, outcome: Outcome) -> Handled {
        let code = if self.enhanced {
            AckCode::CR
        } else {
            AckCode::AR
        };
        self.build(code, err, outcome)
    }
}

/// Whether a frame is a batch or file envelope (`FHS`/`BHS` first, after a byte-order mark and
/// line breaks).
fn is_batch(frame: &[u8]) -> bool {
    let rest = frame.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(frame);
    let start = rest
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(rest.len());
    let rest = rest.get(start..).unwrap_or_default();
    rest.starts_with(b"FHS") || rest.starts_with(b"BHS")
}

/// `AR` for a batch envelope, which is not taken here: the sender can resend its messages one
/// by one.
fn batch_refused() -> Handled {
    let err = AckError::new(
        ErrorCode::UnsupportedMessageType,
        "batches (FHS/BHS) are not taken here; send their messages one by one",
    );
    own_ack(AckCode::AR, &err, Outcome::Refused)
}

/// `AE` for a message that does not parse.
fn unreadable_message(e: &ParseError) -> Handled {
    own_ack(
        AckCode::AE,
        &AckError::from_parse_error(e),
        Outcome::Malformed,
    )
}

/// The gateway's own acknowledgement `code` with `err`, for a message it could not read far
/// enough to echo (a fresh control id, HL7 v2.5).
fn own_ack(code: AckCode, err: &AckError, outcome: Outcome) -> Handled {
    let id = own_control_id();
    let ts = hl7_timestamp();
    Handled {
        ack: build_ack_unreadable(&AckParams::new(code, &id, &ts).with_error(err), "2.5"),
        code,
        outcome,
    }
}

#[allow(clippy::too_many_arguments)]
fn audit_record(
    origin: &Origin<'_>,
    msg: &Message<'_>,
    header: &MessageHeader,
    tenant: Option<&str>,
    phase: Phase,
    route: &str,
    ack: Option<&str>,
    reason: &str,
) -> AuditRecord {
    let facility = facility_of(header).to_string();
    let app = header.sending_application.namespace_id.clone();
    let (subject, client_id) = match &origin.caller {
        Some((s, c)) => (Some(s.clone()), c.clone()),
        None => (None, None),
    };
    AuditRecord {
        request_id: origin.request_id.clone(),
        phase,
        actor: caregate_audit::Actor {
            subject,
            client_id,
            tenant: tenant.map(str::to_string),
            auth_method: Some(
                match (origin.cert.is_some(), origin.caller.is_some()) {
                    (true, true) => "token+client_certificate",
                    (true, false) => "client_certificate",
                    (false, true) => "token",
                    (false, false) => "network",
                }
                .into(),
            ),
            source_address: origin.peer.map(|ip| ip.to_string()),
            client_certificate_subject: origin.cert.map(|c| c.subject.clone()),
            system: Some(format!("{app}@{facility}")),
            ..Default::default()
        },
        action: caregate_audit::Action {
            method: if origin.mllp { "MLLP" } else { "POST" }.into(),
            route: route.to_string(),
            listener: origin.source.to_string(),
            channel: origin.channel.as_str().into(),
            interaction: Some(format!(
                "hl7v2:{}^{}",
                header.message_type, header.trigger_event
            )),
            ..Default::default()
        },
        outcome: caregate_audit::Outcome {
            reason: (!reason.is_empty()).then(|| reason.to_string()),
            ..Default::default()
        },
        hl7: Some(Hl7Message {
            message_type: header.message_type.clone(),
            trigger_event: header.trigger_event.clone(),
            control_id: header.control_id.clone(),
            sending_application: app,
            sending_facility: facility,
            patient_identifiers: msg
                .patient_identifiers()
                .into_iter()
                .map(|p| Hl7PatientId {
                    id: p.id,
                    authority: if p.assigning_authority.namespace_id.is_empty() {
                        p.assigning_authority.universal_id
                    } else {
                        p.assigning_authority.namespace_id
                    },
                    r#type: p.identifier_type_code,
                })
                .collect(),
            ack_code: ack.map(str::to_string),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn route(types: &[&str]) -> Hl7RouteConfig {
        serde_yaml::from_str(&format!(
            "{{ name: r, listener: l, pool: p, message_types: [{}] }}",
            types
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .unwrap()
    }

    #[test]
    fn message_types_match_by_type_trigger_or_wildcard() {
        assert!(type_matches(&route(&[]), "ADT", "A01"));
        assert!(type_matches(&route(&["ADT"]), "ADT", "A08"));
        assert!(type_matches(&route(&["ADT^*"]), "ADT", "A08"));
        assert!(type_matches(&route(&["ORU^R01", "ADT^A01"]), "ADT", "A01"));
        assert!(!type_matches(&route(&["ADT^A01"]), "ADT", "A08"));
        assert!(!type_matches(&route(&["ORU"]), "ADT", "A01"));
    }

    #[test]
    fn the_gateways_own_acks_fit_hl7_fields() {
        let id = own_control_id();
        assert!(id.len() <= 20 && id.starts_with("CG"), "{id}");
        assert_ne!(id, own_control_id());
        let ts = hl7_timestamp();
        assert_eq!(ts.len(), 19, "{ts}");
        assert!(ts.ends_with("+0000") && ts[..14].bytes().all(|b| b.is_ascii_digit()));
    }

    fn header(extra: &str) -> MessageHeader {
        let text = format!("MSH|^~\\&|LIS|NORTH_LAB|EHR|HOSP|20250101||ORU^R01|c-1|P|2.5{extra}\rPID|1||9^^^H^MR\r");
        parse_message(text.as_bytes()).unwrap().header()
    }

    #[test]
    fn refusals_are_ar_or_cr_errors_ae_or_ce_and_name_the_message() {
        let err = AckError::new(ErrorCode::ApplicationInternalError, "x");
        let original = header("");
        let r = Reply {
            header: &original,
            enhanced: false,
        };
        let h = r.reject(&err, Outcome::Refused);
        let ack = parse_ack(&h.ack).unwrap();
        assert_eq!((ack.code, ack.control_id.as_str()), (AckCode::AR, "c-1"));
        assert_eq!(r.error(&err, Outcome::Malformed).code, AckCode::AE);

        let enhanced = header("|||AL|NE");
        assert!(enhanced.accept_ack_type.is_some());
        let r = Reply {
            header: &enhanced,
            enhanced: true,
        };
        assert_eq!(
            parse_ack(&r.reject(&err, Outcome::Busy).ack).unwrap().code,
            AckCode::CR
        );
        assert_eq!(r.error(&err, Outcome::Malformed).code, AckCode::CE);
    }

    #[test]
    fn unreadable_input_is_ae_and_a_batch_envelope_is_ar() {
        let e = parse_message(b"hello").unwrap_err();
        let h = unreadable_message(&e);
        assert_eq!((h.code, h.outcome), (AckCode::AE, Outcome::Malformed));
        assert_eq!(parse_ack(&h.ack).unwrap().code, AckCode::AE);

        let batch = b"\r\nBHS|^~\\&|LIS|NORTH_LAB\rMSH|^~\\&|LIS|NORTH_LAB|EHR|HOSP|20250101||ORU^R01|c-1|P|2.5\rBTS|1\r";
        assert!(is_batch(batch));
        assert!(!is_batch(b"MSH|^~\\&|LIS"));
        let h = batch_refused();
        assert_eq!((h.code, h.outcome), (AckCode::AR, Outcome::Refused));
        assert_eq!(parse_ack(&h.ack).unwrap().code, AckCode::AR);
    }

    #[test]
    fn every_outcome_has_a_label_and_an_http_status() {
        for o in [
            Outcome::Accepted,
            Outcome::DestinationError,
            Outcome::DestinationReject,
            Outcome::Malformed,
            Outcome::Refused,
            Outcome::Busy,
            Outcome::AuditUnavailable,
            Outcome::Unavailable,
            Outcome::Timeout,
            Outcome::BadAck,
        ] {
            assert!(!o.label().is_empty());
            assert!((200..600).contains(&o.http_status()));
        }
        assert_eq!(Outcome::Accepted.http_status(), 200);
        assert_eq!(Outcome::Timeout.http_status(), 504);
    }
}
