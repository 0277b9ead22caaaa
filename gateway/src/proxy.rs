//! The `ProxyHttp` implementation: request hygiene, routing, the filter chain, zone failover
//! and the one place where errors become responses.

use crate::access_log::{rfc3339_millis, AccessLog, TraceContext};
use crate::errors;
use crate::hygiene;
use crate::metrics;
use crate::retry;
use crate::router::{request_host, Route, RouteMatch};
use async_trait::async_trait;
use bytes::Bytes;
use caregate_filters::chain::{Chain, DecisionSink, Verdict};
use caregate_filters::ctx::DecisionRecord;
use caregate_filters::identity::{PeerCertificate, Principal, Tenant};
use caregate_filters::{Channel, LocalReply, ReplyBody, RequestCtx};
use http::{header, HeaderValue, StatusCode};
use ipnet::IpNet;
use pingora::http::ResponseHeader;
use pingora::prelude::{HttpPeer, Session};
use pingora::proxy::{FailToProxy, ProxyHttp};
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One listener's proxy: its route table (in the live config generation) over the shared
/// pools.
pub struct Gateway {
    pub listener: Arc<str>,
    /// The listener's index in the config (its route table's index in a generation).
    pub listener_index: usize,
    pub channel: Channel,
    /// Production, or a sandbox listener (listeners are fixed at start).
    pub environment: caregate_filters::Environment,
    pub tls: bool,
    /// The live config generation; each request reads it once and keeps it.
    pub live: crate::reload::Live,
    pub trusted_proxies: Vec<IpNet>,
    pub keepalive_seconds: u64,
    pub max_header_bytes: usize,
    pub access_log: Option<AccessLog>,
    pub audit: Option<Arc<caregate_audit::AuditSink>>,
    pub otlp: Option<Arc<crate::otlp::OtlpExporter>>,
    /// The connector of whole exchanges and pre-reads (its own connection pool).
    pub connector: Arc<pingora::connectors::http::Connector>,
    /// `server.max_exchange_body_bytes`.
    pub max_exchange_body: usize,
    /// What all whole exchanges of the process may hold at once (`server.max_exchange_memory_bytes`).
    pub exchange_memory: crate::exchange::MemoryBudget,
    /// The minimum rate of request bodies (`server.connections`).
    pub body_rate: crate::conn_guard::BodyRate,
    /// The HL7 v2 engine of `hl7: true` routes.
    pub hl7: Arc<crate::hl7gw::Engine>,
    /// The unusual-access monitor over the audit records (with an audit trail only).
    pub anomaly: Option<Arc<crate::anomaly::Monitor>>,
}

/// Per-request state of the gateway (the filters' part is `req`).
pub struct Ctx {
    pub req: RequestCtx,
    /// The config generation this request runs with, from start to end.
    pub(crate) gen: Arc<crate::reload::Generation>,
    /// Counts the request in flight while it lives (the drain waits for none).
    pub(crate) _in_flight: crate::lifecycle::InFlight,
    pub(crate) route: Option<Arc<Route>>,
    pub(crate) tried: Vec<SocketAddr>,
    pub(crate) attempts: usize,
    /// The pool serving this request (the route's, or the tenant's own).
    pub(crate) pool: Option<usize>,
    /// The lowest-priority zone an attempt has gone to so far.
    pub(crate) max_zone_tried: Option<usize>,
    pub(crate) current: Option<(usize, SocketAddr)>,
    pub(crate) connected_at: Option<Instant>,
    /// A reply decided during the body phase or upstream selection, rendered by fail_to_proxy.
    pub(crate) pending: Option<LocalReply>,
    pub(crate) forwarded_for: String,
    pub(crate) forwarded_proto: &'static str,
    pub(crate) forwarded_host: Option<String>,
    pub(crate) trace: Option<TraceContext>,
    /// The matched route carries PHI (known as soon as the route is).
    pub(crate) phi: bool,
    /// The durable access record was written (a completion record follows in logging).
    pub(crate) audited_access: bool,
    /// The patients of an audited FHIR response, found as its body passes (for the completion
    /// record).
    pub(crate) body_patients: Option<caregate_fhir::PatientScanner>,
    /// The reason code of a failed exchange (upstream error, timeout, ...).
    pub(crate) error_reason: Option<&'static str>,
    /// Time to the upstream response header, for the access log.
    pub(crate) upstream_ms: Option<f64>,
    /// The request's slot in its pool's bulkhead (taken at the first attempt, one per
    /// request whatever its attempts; given back when the context is dropped).
    pub(crate) bulkhead: Option<crate::outlier::Slot>,
    /// Request body bytes received so far (the minimum-rate rule).
    pub(crate) body_in: u64,
    /// The API version's state for this request (a route of an API only).
    pub(crate) api_state: Option<crate::apis::Effective>,
}

const BODY_LIMIT_FOR_CLOSE: u64 = 0;

/// The error that ends an attempt answered with a failing status, when the retry rule already
/// decided to retry it (`upstream_response_filter`); `error_while_proxy` keeps that decision.
const RETRY_ON_STATUS: &str = "retry_on_upstream_status";

impl Gateway {
    /// Count `chunk` bytes of the request body and apply the minimum-rate rule: a body slower
    /// than `server.connections.body_min_rate_bytes_per_second` (after the grace time) gets a
    /// `408 body_too_slow`, and its connection is closed (the rest of the body is not read).
    pub(crate) fn body_too_slow(&self, chunk: usize, ctx: &mut Ctx) -> Option<LocalReply> {
        ctx.body_in = ctx.body_in.saturating_add(chunk as u64);
        // Counted from the upstream connection when there is one: Pingora reads the body only
        // once it is connected, so the connect time is not the client's.
        let from = ctx.connected_at.unwrap_or(ctx.req.started);
        if chunk == 0 || !self.body_rate.too_slow(ctx.body_in, from.elapsed()) {
            return None;
        }
        crate::conn_guard::CUT
            .with_label_values(&[&*self.listener, "body_too_slow"])
            .inc();
        Some(LocalReply::error(
            StatusCode::REQUEST_TIMEOUT,
            "body_too_slow",
            "the request body came slower than the gateway's minimum rate",
        ))
    }

    fn reply_for_error(&self, e: &Error, ctx: &mut Ctx) -> Option<LocalReply> {
        if let Some(r) = ctx.pending.take() {
            return Some(r);
        }
        let r = match e.etype() {
            ErrorType::HTTPStatus(code) => {
                let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY);
                let reason = match code {
                    400 => "bad_request",
                    413 => "payload_too_large",
                    503 => "no_healthy_upstream",
                    504 => "upstream_timeout",
                    _ => "upstream_error",
                };
                LocalReply::error(status, reason, "")
            }
            ErrorType::ConnectTimedout
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout
            | ErrorType::TLSHandshakeTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                LocalReply::error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    "the upstream service did not answer in time",
                )
            }
            _ => match e.esource() {
                ErrorSource::Upstream => LocalReply::error(
                    StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    "the upstream service failed",
                ),
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        return None
                    }
                    _ => LocalReply::error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "the request could not be read",
                    ),
                },
                ErrorSource::Internal | ErrorSource::Unset => internal_error(),
            },
        };
        Some(r)
    }

    /// Write a local reply: the error contract's body, the reply's headers, the response hooks
    /// of the filters that ran, then header and body.
    pub(crate) async fn send_reply(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        reply: LocalReply,
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(reply.status, Some(8))?;
        let body = match reply.body {
            ReplyBody::Error => {
                let (ct, body) = errors::render(
                    ctx.req.fhir_route,
                    reply.status.as_u16(),
                    reply.reason,
                    &reply.detail,
                    &ctx.req.request_id,
                );
                resp.insert_header(header::CONTENT_TYPE, ct)?;
                resp.insert_header(header::CACHE_CONTROL, "no-store")?;
                Bytes::from(body)
            }
            ReplyBody::Empty => Bytes::new(),
            ReplyBody::Json(b) => {
                resp.insert_header(header::CONTENT_TYPE, "application/json")?;
                b
            }
            ReplyBody::Other(typed) => {
                resp.insert_header(header::CONTENT_TYPE, typed.content_type)?;
                if !reply
                    .headers
                    .iter()
                    .any(|(n, _)| n == header::CACHE_CONTROL)
                {
                    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
                }
                typed.body
            }
        };
        for (name, value) in reply.headers {
            resp.append_header(name, value)?;
        }
        let status = reply.status.as_u16();
        if !(status == 204 || status == 304 || (100..200).contains(&status)) {
            resp.set_content_length(body.len())?;
        }
        // The response hooks that have not run yet (each runs once per request).
        if let Some(route) = ctx.route.clone() {
            Chain::new(&route.filters, &MetricsSink).local_reply(&mut resp, &mut ctx.req);
        }
        set_gateway_headers(&mut resp, ctx);
        if request_has_body(session) || reply.status.is_server_error() {
            // Never leave an unread body (or a doubtful connection) to be parsed as the next
            // request.
            session.set_keepalive(None);
        }
        let head = session.req_header().method == http::Method::HEAD;
        session
            .write_response_header(Box::new(resp), head || body.is_empty())
            .await?;
        if !head && !body.is_empty() {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }

    /// Record a failed upstream attempt (the one owner of the attempt bookkeeping for both
    /// paths) and decide, by the one retry rule ([`retry::may_retry`]), whether another attempt
    /// may go out: it needs an attempt left in the pool's budget and a backend not tried yet.
    pub(crate) fn note_failure(
        &self,
        ctx: &mut Ctx,
        failure: retry::Failure,
        req: retry::Request,
    ) -> bool {
        let Some((zone, addr)) = ctx.current.take() else {
            return false;
        };
        ctx.tried.push(addr);
        let Some(pool) = ctx.pool.and_then(|p| ctx.gen.pools.get(p)) else {
            return false;
        };
        let now = Instant::now();
        if failure.backend_fault() {
            let zone_size = pool.zones.get(zone).map_or(0, |z| z.backend_count());
            pool.outlier.failure(zone, addr, zone_size, now);
        }
        let mut again = retry::may_retry(failure, req)
            && ctx.attempts < pool.max_attempts
            && pool.has_candidate(&ctx.tried);
        // Only a request a backend may have worked on spends the budget: a failed connect sent
        // nothing, and its retry (zone failover) multiplies no backend's work.
        if again && failure.spends_budget() && !pool.retry_budget.try_retry(now) {
            crate::outlier::RETRY_BUDGET_EXHAUSTED
                .with_label_values(&[&*pool.name])
                .inc();
            again = false;
        }
        if again {
            let zone_name = pool.zones.get(zone).map(|z| &*z.name).unwrap_or("");
            metrics::RETRIES
                .with_label_values(&[&*pool.name, zone_name, failure.label()])
                .inc();
        }
        again
    }

    /// Record the status an upstream attempt answered with, for outlier detection: a 5xx
    /// (other than 501/505) is a failure of the backend, anything else a success.
    pub(crate) fn note_response(&self, ctx: &Ctx, status: u16) {
        if (100..200).contains(&status) {
            return;
        }
        let (Some((zone, addr)), Some(pool)) =
            (ctx.current, ctx.pool.and_then(|p| ctx.gen.pools.get(p)))
        else {
            return;
        };
        let now = Instant::now();
        if crate::outlier::status_is_failure(status) {
            let zone_size = pool.zones.get(zone).map_or(0, |z| z.backend_count());
            pool.outlier.failure(zone, addr, zone_size, now);
        } else {
            pool.outlier.success(zone, addr, now);
        }
    }

    pub(crate) fn record_gateway_denial(ctx: &mut Ctx, reason: &'static str) {
        MetricsSink.record("gateway", "deny", reason);
        ctx.req.host().decisions.push(DecisionRecord {
            filter: "gateway",
            result: "deny",
            reason,
        });
    }

    /// Request hygiene and routing. Returns a reply when the request is refused.
    fn prepare(&self, session: &mut Session, ctx: &mut Ctx) -> Option<LocalReply> {
        let peer: Option<IpAddr> = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let peer_trusted = peer
            .map(|ip| self.trusted_proxies.iter().any(|n| n.contains(&ip)))
            .unwrap_or(false);

        let req = session.req_header();
        ctx.req.host().method = req.method.as_str().to_string();
        ctx.req.host().request_id = hygiene::accept_request_id(
            req.headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok()),
        )
        .unwrap_or_else(hygiene::new_request_id);

        let header_bytes: usize = req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        let host = request_host(
            req.headers.get(header::HOST).and_then(|v| v.to_str().ok()),
            req.uri.host(),
        );
        let raw_path = req.uri.path().to_string();
        let query = req.uri.query().map(str::to_string);

        // The flavour of early errors follows the route the raw path would have reached.
        let gen = ctx.gen.clone();
        let Some(table) = gen.table(self.listener_index) else {
            return Some(LocalReply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the listener has no route table",
            ));
        };
        if let RouteMatch::Found(r) | RouteMatch::MethodNotAllowed(r) =
            table.lookup(host.as_deref(), &raw_path, &ctx.req.method)
        {
            ctx.req.host().fhir_route = r.fhir;
        }
        if header_bytes > self.max_header_bytes {
            Self::record_gateway_denial(ctx, "header_too_large");
            return Some(LocalReply::error(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header_too_large",
                "the request header section is too large",
            ));
        }

        // Forwarding facts, from the headers as they came (believed only from trusted proxies).
        // Every X-Forwarded-For line, in order: a proxy may add its own line after the
        // client's.
        let xff_in = if peer_trusted {
            let lines: Vec<&str> = req
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!lines.is_empty()).then(|| lines.join(", "))
        } else {
            None
        };
        // Repeated proto/host lines are ambiguous: believe none of them.
        let single = |name: &str| {
            let mut it = req.headers.get_all(name).iter();
            match (it.next(), it.next()) {
                (Some(v), None) => v.to_str().ok().map(str::to_string),
                _ => None,
            }
        };
        ctx.req.host().client_addr =
            hygiene::real_client(peer, xff_in.as_deref(), &self.trusted_proxies);
        ctx.forwarded_for = match (&xff_in, peer) {
            (Some(x), Some(p)) => format!("{x}, {p}"),
            (None, Some(p)) => p.to_string(),
            (Some(x), None) => x.clone(),
            (None, None) => String::new(),
        };
        let proto_in = if peer_trusted {
            single("x-forwarded-proto")
                .filter(|v| v == "https" || v == "http")
                .map(|v| if v == "https" { "https" } else { "http" })
        } else {
            None
        };
        ctx.forwarded_proto = proto_in.unwrap_or(if self.tls { "https" } else { "http" });
        let host_in = if peer_trusted {
            single("x-forwarded-host")
        } else {
            None
        };
        let authority = req.uri.authority().map(|a| a.as_str().to_string());
        ctx.forwarded_host = host_in
            .or_else(|| {
                req.headers
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            })
            .or_else(|| authority.clone());
        let raw_utf8 = req.raw_path_is_utf8();
        ctx.trace = Some(TraceContext::from_headers(
            req.headers.get("traceparent").and_then(|v| v.to_str().ok()),
            req.headers.get("tracestate").and_then(|v| v.to_str().ok()),
        ));

        hygiene::strip_untrusted_headers(session.req_header_mut(), peer_trusted);
        // HTTP/2 clients send `:authority` and no Host: keep the host the route was chosen by
        // for the backend, before the URI is reduced to path and query.
        if !session.req_header().headers.contains_key(header::HOST) {
            if let Some(a) = &authority {
                if let Ok(v) = HeaderValue::from_str(a) {
                    let _ = session.req_header_mut().insert_header(header::HOST, v);
                }
            }
        }
        if !raw_utf8 {
            Self::record_gateway_denial(ctx, "bad_path");
            return Some(LocalReply::error(
                StatusCode::BAD_REQUEST,
                "bad_path",
                "the path is not valid UTF-8",
            ));
        }

        let path = match hygiene::normalize_path(&raw_path) {
            Ok(p) => p,
            Err(e) => {
                Self::record_gateway_denial(ctx, "bad_path");
                return Some(LocalReply::error(
                    StatusCode::BAD_REQUEST,
                    "bad_path",
                    e.detail(),
                ));
            }
        };
        let requested = table
            .by_version()
            .then(|| crate::apis::RequestedVersion::from_headers(&session.req_header().headers));
        let route =
            match table.lookup_version(host.as_deref(), &path, &ctx.req.method, requested.as_ref())
            {
                RouteMatch::Found(r) => r.clone(),
                RouteMatch::MethodNotAllowed(r) => {
                    ctx.req.host().fhir_route = r.fhir;
                    ctx.req.host().route = Some(r.name.clone());
                    ctx.phi = r.phi;
                    Self::record_gateway_denial(ctx, "method_not_allowed");
                    let allow = r.methods.join(", ");
                    let mut reply = LocalReply::error(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "method_not_allowed",
                        "this method is not allowed on this route",
                    );
                    if let Ok(v) = HeaderValue::from_str(&allow) {
                        reply = reply.with_header(header::ALLOW, v);
                    }
                    return Some(reply);
                }
                RouteMatch::NotFound => {
                    ctx.req.host().fhir_route = false;
                    Self::record_gateway_denial(ctx, "route_not_found");
                    return Some(LocalReply::error(
                        StatusCode::NOT_FOUND,
                        "route_not_found",
                        "no route serves this path on this listener",
                    ));
                }
            };
        ctx.req.host().fhir_route = route.fhir;
        ctx.req.host().route = Some(route.name.clone());
        ctx.phi = route.phi;
        // The API version's lifecycle: a retired version (by hand, or past its sunset date)
        // answers 410 and names its successor.
        if let Some(b) = &route.api {
            ctx.req.host().api_version = Some((b.api.clone(), b.version.clone()));
            let eff = b.lifecycle.evaluate(crate::apis::unix_now());
            ctx.api_state = Some(eff);
            b.requests(eff).inc();
            if eff == crate::apis::Effective::Retired {
                ctx.route = Some(route.clone());
                Self::record_gateway_denial(ctx, "api_sunset");
                let detail = match &b.lifecycle.successor_link {
                    Some(s) => format!(
                        "version {} of this API is retired; use its successor at {s}",
                        b.version
                    ),
                    None => format!("version {} of this API is retired", b.version),
                };
                return Some(LocalReply::error(StatusCode::GONE, "api_sunset", detail));
            }
        }
        // FHIR routes, judged on the route the normalised path reached (the one the request
        // goes to): no path parameters and nothing but ASCII in the path.
        if route.fhir {
            if let Err(e) = hygiene::check_fhir_path(&path) {
                Self::record_gateway_denial(ctx, "bad_path");
                return Some(LocalReply::error(
                    StatusCode::BAD_REQUEST,
                    "bad_path",
                    e.detail(),
                ));
            }
        }
        // A FHIR read, search or delete carries no body: refuse one before anything goes
        // upstream (send_reply closes the connection, so the unread body is never parsed as
        // a request). HTTP/2 has no framing headers to tell: a request stream the HEADERS
        // frame did not end carries a body too.
        if route.fhir
            && matches!(ctx.req.method.as_str(), "GET" | "HEAD" | "DELETE")
            && (request_has_body(session) || (session.is_http2() && !session.is_body_empty()))
        {
            Self::record_gateway_denial(ctx, "body_not_allowed");
            return Some(LocalReply::error(
                StatusCode::BAD_REQUEST,
                "body_not_allowed",
                "a GET, HEAD or DELETE request on a FHIR route must not carry a body",
            ));
        }
        // From here on the session's request carries the normalised path: what the filters
        // judge is what goes upstream.
        let uri = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        match http::Uri::try_from(uri.as_str()) {
            Ok(u) => session.req_header_mut().set_uri(u),
            Err(_) => {
                Self::record_gateway_denial(ctx, "bad_path");
                return Some(LocalReply::error(
                    StatusCode::BAD_REQUEST,
                    "bad_path",
                    "invalid request target",
                ));
            }
        }
        ctx.req.host().path = path;
        ctx.req.host().query = query.unwrap_or_default();
        // FHIR routes: every request is classified once; what cannot be classified is refused.
        // (OPTIONS is no FHIR interaction: CORS preflights are answered by the cors filter.)
        // (`/.well-known/` documents, such as the SMART configuration, are not FHIR interactions.)
        let well_known = ctx.req.path.contains("/.well-known/");
        if route.fhir {
            ctx.req.host().fhir_base = Some(route.path_prefix.clone());
        }
        if route.fhir && ctx.req.method != "OPTIONS" && !well_known {
            let below = if route.path_prefix == "/" {
                ctx.req.path.as_str()
            } else {
                ctx.req
                    .path
                    .strip_prefix(route.path_prefix.as_str())
                    .unwrap_or("")
            };
            let content_type = session
                .req_header()
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            match caregate_fhir::classify(
                &ctx.req.method,
                if below.is_empty() { "/" } else { below },
                &ctx.req.query,
                content_type.as_deref(),
                None,
            ) {
                Ok(class) => {
                    let _ = ctx
                        .req
                        .facts
                        .insert(caregate_filters::ctx::writers::Gateway, class);
                }
                Err(e) => {
                    ctx.route = Some(route);
                    Self::record_gateway_denial(ctx, e.reason());
                    return Some(LocalReply::error(
                        StatusCode::BAD_REQUEST,
                        e.reason(),
                        e.detail(),
                    ));
                }
            }
        }
        ctx.route = Some(route);
        let cert = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .and_then(|d| d.extension.get::<PeerCertificate>())
            .cloned();
        if let Some(cert) = cert {
            // The first fact of the request: cannot conflict.
            let _ = ctx
                .req
                .facts
                .insert(caregate_filters::ctx::writers::Gateway, cert);
        }
        None
    }
}

/// The completion record of an audited FHIR request names the patients its response held:
/// start scanning the response (streamed or held whole, one rule for both), when its body is
/// sent as it is (no `Content-Encoding` but `identity`: only then can the patients be read).
pub(crate) fn start_patient_scan(ctx: &mut Ctx, resp: &ResponseHeader) {
    let identity = resp
        .headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim().eq_ignore_ascii_case("identity"));
    if ctx.audited_access && ctx.req.fhir_route && identity {
        ctx.body_patients = Some(caregate_fhir::PatientScanner::new());
    }
}

/// The resource type, id and interaction of a FHIR request path below the route prefix, as far
/// as the path alone tells (full FHIR classification refines this).
fn fhir_shape(method: &str, rest: &str) -> (Option<String>, Option<String>, Option<String>) {
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let ty = segs
        .first()
        .filter(|s| {
            s.chars()
                .next()
                .map(|c| c.is_ascii_uppercase())
                .unwrap_or(false)
        })
        .map(|s| s.to_string());
    let id = segs
        .get(1)
        .filter(|s| !s.starts_with('_') && !s.starts_with('$'))
        .map(|s| s.to_string());
    let op = segs.iter().any(|s| s.starts_with('$'));
    let interaction = match (method, ty.is_some(), id.is_some()) {
        _ if op => "operation",
        (_, _, _) if segs.get(1) == Some(&"_search") => "search-type",
        (_, _, _) if segs.get(2) == Some(&"_history") && segs.get(3).is_some() => "vread",
        (_, _, _) if segs.get(2) == Some(&"_history") => "history-instance",
        ("GET" | "HEAD", true, true) => "read",
        ("GET" | "HEAD", true, false) => "search-type",
        ("GET" | "HEAD", false, _) => "search-system",
        ("POST", true, false) => "create",
        ("POST", false, _) => "batch",
        ("PUT", _, _) => "update",
        ("PATCH", _, _) => "patch",
        ("DELETE", _, _) => "delete",
        _ => "other",
    };
    (ty, id, Some(interaction.to_string()))
}

impl Gateway {
    /// An `hl7: true` route: the body is one HL7 v2 message, handled like one from an MLLP
    /// listener; the answer is its acknowledgement (the status says how it went, see
    /// [`crate::hl7gw::Outcome::http_status`]).
    /// The developer portal's route: the Redoc page, the OpenAPI document, Redoc's files.
    async fn portal(&self, session: &mut Session, ctx: &mut Ctx, route: &Route) -> Result<()> {
        let rest = ctx
            .req
            .path
            .strip_prefix(route.path_prefix.as_str())
            .unwrap_or("")
            .to_string();
        let Some(p) = ctx.gen.portal.clone() else {
            let reply = LocalReply::error(
                StatusCode::NOT_FOUND,
                "route_not_found",
                "no developer portal is configured",
            );
            return self.send_reply(session, ctx, reply).await;
        };
        let answer = p.respond(&rest);
        let Ok(status) = StatusCode::from_u16(answer.status) else {
            return Error::e_explain(ErrorType::InternalError, "portal status");
        };
        let reply = LocalReply {
            status,
            reason: if status.is_success() {
                "portal"
            } else {
                "route_not_found"
            },
            detail: std::borrow::Cow::Borrowed(""),
            headers: answer
                .headers
                .iter()
                .filter_map(|(name, value)| {
                    Some((
                        http::HeaderName::from_bytes(name.as_bytes()).ok()?,
                        HeaderValue::from_str(value).ok()?,
                    ))
                })
                .collect(),
            body: ReplyBody::Other(Box::new(caregate_filters::TypedBody {
                content_type: answer.content_type,
                body: answer.body,
            })),
        };
        self.send_reply(session, ctx, reply).await
    }

    async fn hl7_ingest(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        let max = caregate_hl7::mllp::DEFAULT_MAX_FRAME;
        let mut body = Vec::new();
        let mut too_large = false;
        while let Some(chunk) = session.read_request_body().await? {
            if let Some(reply) = self.body_too_slow(chunk.len(), ctx) {
                return self.send_reply(session, ctx, reply).await;
            }
            if body.len() + chunk.len() > max {
                too_large = true;
                session.set_keepalive(None);
                break;
            }
            body.extend_from_slice(&chunk);
        }
        let principal = ctx.req.facts.get::<Principal>();
        let caller = principal.map(|p| (p.subject.clone(), p.client_id.clone()));
        let cert = ctx.req.facts.get::<PeerCertificate>().cloned();
        let route_name = ctx
            .route
            .as_ref()
            .map(|r| r.name.clone())
            .unwrap_or_else(|| Arc::from(""));
        let origin = crate::hl7gw::Origin {
            source: &route_name,
            mllp: false,
            channel: self.channel,
            peer: ctx.req.client_addr,
            cert: cert.as_ref(),
            caller,
            request_id: ctx.req.request_id.clone(),
            in_flight: None,
        };
        let handled = if too_large {
            crate::hl7gw::Engine::unreadable(
                &origin,
                &format!("message larger than {max} bytes (not delivered)"),
            )
        } else {
            let mut ups = crate::hl7gw::Upstreams::default();
            self.hl7.handle(&origin, &body, &mut ups).await
        };
        let status = if too_large {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::from_u16(handled.outcome.http_status()).unwrap_or(StatusCode::BAD_GATEWAY)
        };
        let reply = LocalReply {
            status,
            reason: handled.outcome.label(),
            detail: std::borrow::Cow::Borrowed(""),
            headers: Vec::new(),
            body: ReplyBody::Other(Box::new(caregate_filters::TypedBody {
                content_type: crate::hl7gw::MEDIA_TYPE,
                body: Bytes::from(handled.ack),
            })),
        };
        self.send_reply(session, ctx, reply).await
    }

    /// The request as it goes upstream: the session's request as the filters left it, mapped
    /// to the route's upstream prefix, with the verified identity, trace and forwarding headers,
    /// then the filters' upstream request hooks.
    pub(crate) async fn prepare_upstream_request(
        &self,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(route) = ctx.route.clone() else {
            return Ok(());
        };
        // What goes upstream is the session's request as the filters left it (re-checked), mapped
        // to the route's upstream prefix: one source of truth for the target.
        let path = hygiene::normalize_path(upstream_request.uri.path()).map_err(|_| {
            Error::explain(ErrorType::InternalError, "a filter left an invalid path")
        })?;
        let path = route.upstream_path(&path);
        let uri = match upstream_request.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let uri = http::Uri::try_from(uri.as_str())
            .map_err(|_| Error::explain(ErrorType::InternalError, "upstream uri"))?;
        upstream_request.set_uri(uri);
        // Backends given by name get their own name as `Host` (the client's is in
        // `X-Forwarded-Host`).
        if let Some(h) = ctx
            .pool
            .and_then(|p| ctx.gen.pools.get(p))
            .and_then(|p| p.host_header.as_deref())
        {
            upstream_request.insert_header(header::HOST, h)?;
        }
        set_identity_headers(upstream_request, &ctx.req)?;
        if let Some(t) = &ctx.trace {
            upstream_request.insert_header("traceparent", t.traceparent())?;
            match &t.tracestate {
                Some(ts) => {
                    if let Ok(v) = HeaderValue::from_str(ts) {
                        upstream_request.insert_header("tracestate", v)?;
                    }
                }
                None => {
                    upstream_request.remove_header("tracestate");
                }
            }
        }
        upstream_request.insert_header("x-request-id", ctx.req.request_id.as_str())?;
        if !ctx.forwarded_for.is_empty() {
            upstream_request.insert_header("x-forwarded-for", ctx.forwarded_for.as_str())?;
        }
        upstream_request.insert_header("x-forwarded-proto", ctx.forwarded_proto)?;
        if let Some(h) = &ctx.forwarded_host {
            if let Ok(v) = HeaderValue::from_str(h) {
                upstream_request.insert_header("x-forwarded-host", v)?;
            }
        }
        Chain::new(&route.filters, &MetricsSink)
            .upstream_request(upstream_request, &mut ctx.req)
            .await
            .map_err(|e| {
                Error::explain(
                    ErrorType::InternalError,
                    format!("upstream request hook: {e}"),
                )
            })
    }

    /// Choose the backend of the next attempt (the route's pool, or the tenant's own), zone by
    /// zone; records the attempt in the ctx.
    pub(crate) fn select_peer(&self, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(route) = ctx.route.clone() else {
            return Error::e_explain(ErrorType::InternalError, "no route");
        };
        let pool_idx = match ctx.req.facts.get::<Tenant>().and_then(|t| t.pool.as_ref()) {
            Some(name) => match ctx.gen.pool_index.get(name) {
                Some(i) => *i,
                None => return Error::e_explain(ErrorType::InternalError, "tenant pool missing"),
            },
            None => route.pool,
        };
        ctx.pool = Some(pool_idx);
        let Some(pool) = ctx.gen.pools.get(pool_idx) else {
            return Error::e_explain(ErrorType::InternalError, "route pool missing");
        };
        // The bulkhead: one slot per request, taken at its first attempt, without waiting.
        if ctx.bulkhead.is_none() {
            match pool.bulkhead.enter() {
                Some(slot) => {
                    ctx.bulkhead = Some(slot);
                    pool.retry_budget.request(Instant::now());
                }
                None => {
                    Self::record_gateway_denial(ctx, "overloaded");
                    ctx.pending = Some(
                        LocalReply::error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "overloaded",
                            "too many requests to this service are in flight; retry shortly",
                        )
                        .with_header(header::RETRY_AFTER, HeaderValue::from_static("1")),
                    );
                    return Error::e_explain(ErrorType::HTTPStatus(503), "pool bulkhead full");
                }
            }
        }
        // The last attempt goes to a later zone when one has a healthy backend, so a zone whose
        // backends all still look healthy cannot use up the whole budget.
        let last_attempt = ctx.attempts + 1 >= pool.max_attempts;
        let pick = match ctx.max_zone_tried {
            Some(z) if last_attempt => pool
                .pick_from(&ctx.tried, z + 1)
                .or_else(|| pool.pick(&ctx.tried)),
            _ => pool.pick(&ctx.tried),
        };
        match pick {
            Some(pick) => {
                ctx.attempts += 1;
                ctx.req.host().attempt = ctx.attempts as u32;
                ctx.max_zone_tried =
                    Some(ctx.max_zone_tried.map_or(pick.zone, |z| z.max(pick.zone)));
                ctx.current = Some((pick.zone, pick.addr));
                Ok(pool.peer(pick.addr))
            }
            None => {
                ctx.pending = Some(
                    LocalReply::error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no_healthy_upstream",
                        "no healthy backend is available in any zone",
                    )
                    .with_header(header::RETRY_AFTER, HeaderValue::from_static("5")),
                );
                Error::e_explain(ErrorType::HTTPStatus(503), "no healthy upstream")
            }
        }
    }

    /// An audit record of this request. The patient is the principal's patient context, or the
    /// Patient read or written.
    fn audit_record(
        &self,
        session: &Session,
        ctx: &Ctx,
        phase: caregate_audit::Phase,
        status: Option<u16>,
        reason: Option<&'static str>,
    ) -> caregate_audit::AuditRecord {
        use caregate_audit::{Action, Actor, AuditRecord, Outcome, Upstream};
        let principal = ctx.req.facts.get::<Principal>();
        let cert = ctx.req.facts.get::<PeerCertificate>();
        let rest = match &ctx.route {
            Some(r) if r.path_prefix != "/" => ctx
                .req
                .path
                .strip_prefix(r.path_prefix.as_str())
                .unwrap_or(&ctx.req.path),
            _ => &ctx.req.path,
        };
        // A FHIR request: everything from the gateway's classification (the path alone cannot
        // tell a history from a vread, or a compartment search from a read); other routes: the
        // path's shape.
        let class = ctx.req.facts.get::<caregate_fhir::FhirRequest>();
        let (resource_type, resource_id, interaction) = match class {
            Some(c) => (
                c.resource_type.clone(),
                c.id.clone(),
                Some(c.interaction.as_str().to_string()),
            ),
            None => fhir_shape(&ctx.req.method, rest),
        };
        let mut patients: Vec<String> = principal
            .and_then(|p| p.patient.clone())
            .into_iter()
            .collect();
        let mut patients_more = 0usize;
        match class {
            Some(c) => {
                let (named, more) = caregate_fhir::named_patients(c);
                patients_more = more;
                for id in named {
                    if !patients.contains(&id) {
                        patients.push(id);
                    }
                }
            }
            None => {
                if let (Some("Patient"), Some(id)) = (resource_type.as_deref(), &resource_id) {
                    if !patients.contains(id) {
                        patients.push(id.clone());
                    }
                }
            }
        }
        // The completion record adds the patients the response held.
        if phase == caregate_audit::Phase::Completion {
            if let Some(scanner) = &ctx.body_patients {
                let (found, more) = scanner.patients();
                patients_more += more as usize;
                for id in found {
                    if !patients.contains(id) {
                        patients.push(id.clone());
                    }
                }
            }
        }
        if patients.len() > caregate_fhir::MAX_NAMED_PATIENTS {
            patients_more += patients.len() - caregate_fhir::MAX_NAMED_PATIENTS;
            patients.truncate(caregate_fhir::MAX_NAMED_PATIENTS);
        }
        let patient = patients.first().cloned();
        let compartment = class
            .and_then(|c| c.compartment.as_ref())
            .map(|(t, id)| format!("{t}/{id}"));
        let mut search_params: Vec<String> = Vec::new();
        if let Some(c) = class {
            for p in &c.params {
                if !search_params.contains(&p.name) {
                    search_params.push(p.name.clone());
                }
            }
        }
        let pool = ctx.pool.and_then(|p| ctx.gen.pools.get(p));
        AuditRecord {
            time: String::new(),
            request_id: ctx.req.request_id.clone(),
            phase,
            actor: Actor {
                subject: principal.map(|p| p.subject.clone()),
                issuer: principal.and_then(|p| p.issuer.clone()),
                client_id: principal.and_then(|p| p.client_id.clone()),
                roles: principal.map(|p| p.roles.clone()).unwrap_or_default(),
                tenant: ctx
                    .req
                    .facts
                    .get::<Tenant>()
                    .map(|t| t.id.clone())
                    .or_else(|| principal.and_then(|p| p.tenant.clone())),
                auth_method: principal.map(|p| p.method.as_str().to_string()),
                source_address: ctx.req.client_addr.map(|a| a.to_string()),
                client_certificate_subject: cert.map(|c| c.subject.clone()),
                system: principal.and_then(|p| p.system.as_ref().map(|s| s.name.clone())),
            },
            action: Action {
                method: ctx.req.method.clone(),
                route: ctx.req.route.as_deref().unwrap_or("").to_string(),
                listener: ctx.req.listener.to_string(),
                channel: ctx.req.channel.as_str().to_string(),
                interaction,
                resource_type,
                resource_id,
                patient,
                patients,
                patients_more: (patients_more > 0).then_some(patients_more as u64),
                compartment,
                search_params,
            },
            outcome: Outcome {
                status,
                reason: reason.map(str::to_string),
                bytes: status.map(|_| session.body_bytes_sent() as u64),
                duration_ms: status.map(|_| ctx.req.started.elapsed().as_millis() as u64),
            },
            upstream: pool.map(|p| Upstream {
                pool: p.name.to_string(),
                zone: ctx
                    .current
                    .and_then(|(z, _)| p.zones.get(z))
                    .map(|z| z.name.to_string()),
            }),
            config: None,
            hl7: None,
            anomaly: None,
            environment: (self.environment == caregate_filters::Environment::Sandbox)
                .then(|| "sandbox".to_string()),
            break_glass: ctx
                .req
                .facts
                .get::<caregate_filters::identity::BreakGlass>()
                .map(|bg| caregate_audit::BreakGlassUse {
                    purpose: bg.purpose.clone(),
                    reason: bg.reason.clone(),
                    overrode: bg
                        .overridden()
                        .iter()
                        .map(|o| o.as_str().to_string())
                        .collect(),
                    from_grant: bg.from_grant,
                }),
        }
    }

    /// The access log line of a request. Only bounded, non-identifying values: the route and
    /// its template, never the path, query, ids, tokens or the client address.
    fn access_line(&self, session: &Session, ctx: &Ctx, status: u16) -> String {
        let (zone, backend) = match (ctx.pool.and_then(|p| ctx.gen.pools.get(p)), ctx.current) {
            (Some(pool), Some((z, addr))) => (
                pool.zones.get(z).map(|z| z.name.to_string()),
                Some(addr.to_string()),
            ),
            _ => (None, None),
        };
        let api = ctx.route.as_ref().and_then(|r| r.api.as_deref());
        let template = ctx.route.as_ref().map(|r| {
            if r.path_prefix == "/" {
                "/*".to_string()
            } else {
                format!("{}/*", r.path_prefix)
            }
        });
        serde_json::json!({
            "time": rfc3339_millis(std::time::SystemTime::now()),
            "request_id": ctx.req.request_id,
            "trace_id": ctx.trace.as_ref().map(|t| t.trace_id.clone()),
            "listener": &*ctx.req.listener,
            "route": ctx.req.route.as_deref(),
            "route_template": template,
            "method": metrics::method_label(&ctx.req.method),
            "status": status,
            "reason": ctx.error_reason.or_else(|| ctx.req.deny_reason()),
            "duration_ms": (ctx.req.started.elapsed().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
            "upstream_ms": ctx.upstream_ms.map(|m| (m * 1000.0).round() / 1000.0),
            "pool": ctx.pool.and_then(|p| ctx.gen.pools.get(p)).map(|p| p.name.to_string()),
            "zone": zone,
            "backend": backend,
            "attempts": ctx.attempts,
            "bytes_sent": session.body_bytes_sent(),
            // The OAuth client (app) of a verified token: which app calls, never who.
            "client_id": ctx
                .req
                .facts
                .get::<Principal>()
                .and_then(|p| p.client_id.as_deref())
                .map(|c| c.chars().take(128).collect::<String>()),
            // The API version and its state at the time: `caregate usage` reads these.
            "api": api.map(|b| &*b.api),
            "api_version": api.map(|b| &*b.version),
            "api_state": ctx.api_state.map(|s| s.as_str()),
            "environment": self.environment.as_str(),
        })
        .to_string()
    }
}

pub(crate) use caregate_filters::chain::internal_error;

/// Whether a final (non-1xx) response header went downstream: after a `100 Continue` an error
/// reply can still be written.
pub(crate) fn final_response_written(session: &Session) -> bool {
    session
        .response_written()
        .map(|r| !r.status.is_informational())
        .unwrap_or(false)
}

/// The facts of the streaming path's request that the retry rule judges.
fn retry_request(session: &Session) -> retry::Request {
    retry::Request {
        idempotent: session.req_header().method.is_idempotent(),
        body_replayable: !session.as_ref().retry_buffer_truncated(),
        response_started: final_response_written(session),
    }
}

pub(crate) fn request_has_body(session: &Session) -> bool {
    let h = &session.req_header().headers;
    if h.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|n| n > BODY_LIMIT_FOR_CLOSE)
        .unwrap_or(false)
}

/// The verified identity, as the backends see it. Client-sent copies were stripped in hygiene.
fn set_identity_headers(req: &mut pingora::http::RequestHeader, ctx: &RequestCtx) -> Result<()> {
    let mut put = |name: &'static str, value: &str| -> Result<()> {
        // A claim that is not a valid header value is left out rather than forwarded mangled.
        if let Ok(v) = HeaderValue::from_str(value) {
            req.insert_header(name, v)?;
        }
        Ok(())
    };
    if let Some(p) = ctx.facts.get::<Principal>() {
        put("x-caregate-subject", &p.subject)?;
        put("x-caregate-auth-method", p.method.as_str())?;
        if !p.roles.is_empty() {
            put("x-caregate-roles", &p.roles.join(","))?;
        }
        if let Some(c) = &p.client_id {
            put("x-caregate-client-id", c)?;
        }
        if let Some(s) = &p.system {
            put("x-caregate-system", &s.name)?;
        }
        if let Some(pt) = &p.patient {
            put("x-caregate-patient", pt)?;
        }
    }
    if let Some(t) = ctx.facts.get::<Tenant>() {
        put("x-caregate-tenant", &t.id)?;
    }
    Ok(())
}

/// What the gateway adds to every response it sends (proxied, whole exchange or local reply):
/// `X-Request-Id`, and the lifecycle header fields of the request's API version
/// (`Deprecation`, `Sunset`, `Link`) on every response of a deprecated, sunsetting or retired
/// version.
pub(crate) fn set_gateway_headers(resp: &mut ResponseHeader, ctx: &Ctx) {
    set_request_id(resp, &ctx.req.request_id);
    let (Some(route), Some(eff)) = (&ctx.route, ctx.api_state) else {
        return;
    };
    let Some(b) = &route.api else { return };
    for (name, value) in b.response_headers(eff) {
        if *name == "link" {
            let _ = resp.append_header(*name, value.clone());
        } else {
            let _ = resp.insert_header(*name, value.clone());
        }
    }
}

/// A preview version serves only callers with one of its preview roles.
fn preview_refusal(route: &Route, ctx: &mut Ctx) -> Option<LocalReply> {
    let b = route.api.as_ref()?;
    let roles = &b.lifecycle.preview_roles;
    let allowed = ctx
        .req
        .facts
        .get::<caregate_filters::identity::Principal>()
        .is_some_and(|p| p.roles.iter().any(|r| roles.contains(r)));
    if allowed {
        return None;
    }
    Gateway::record_gateway_denial(ctx, "role_denied");
    Some(LocalReply::error(
        StatusCode::FORBIDDEN,
        "role_denied",
        "this API version is in preview, open to its preview roles only",
    ))
}

fn set_request_id(resp: &mut ResponseHeader, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        let _ = resp.insert_header("x-request-id", v);
    }
}

/// The chain's decisions, counted in `caregate_filter_decisions_total{filter,result,reason}`.
pub(crate) struct MetricsSink;

impl DecisionSink for MetricsSink {
    fn record(&self, filter: &'static str, result: &'static str, reason: &'static str) {
        metrics::FILTER_DECISIONS
            .with_label_values(&[filter, result, reason])
            .inc();
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    /// Boxed: Pingora keeps the context inside each connection's task, whose whole size is
    /// allocated when a connection is accepted, so an inline context would cost every idle
    /// keep-alive connection its size again (see benches/RESULTS.md, memory).
    type CTX = Box<Ctx>;

    fn new_ctx(&self) -> Box<Ctx> {
        let mut req = RequestCtx::new(self.listener.clone(), self.channel);
        req.host().environment = self.environment;
        Box::new(Ctx {
            req,
            gen: self.live.load_full(),
            _in_flight: crate::lifecycle::InFlight::enter(),
            route: None,
            tried: Vec::new(),
            attempts: 0,
            pool: None,
            max_zone_tried: None,
            current: None,
            connected_at: None,
            pending: None,
            forwarded_for: String::new(),
            forwarded_proto: "http",
            forwarded_host: None,
            trace: None,
            phi: false,
            audited_access: false,
            body_patients: None,
            error_reason: None,
            upstream_ms: None,
            bulkhead: None,
            body_in: 0,
            api_state: None,
        })
    }

    async fn early_request_filter(&self, session: &mut Session, _ctx: &mut Box<Ctx>) -> Result<()> {
        // The header is complete: the connection layer's header deadline no longer applies.
        crate::conn_guard::header_done(session);
        // Bound idle keep-alive, but never re-enable a connection Pingora has already marked
        // for closing (ambiguous framing, `Connection: close`).
        if self.keepalive_seconds > 0 && session.get_keepalive().is_some() {
            session.set_keepalive(Some(self.keepalive_seconds));
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Box<Ctx>) -> Result<bool> {
        if let Some(reply) = self.prepare(session, ctx) {
            self.send_reply(session, ctx, reply).await?;
            return Ok(true);
        }
        let Some(route) = ctx.route.clone() else {
            return Ok(false);
        };
        let verdict = Chain::new(&route.filters, &MetricsSink)
            .request(session.req_header_mut(), &mut ctx.req)
            .await;
        if let Verdict::Reply(reply) = verdict {
            self.send_reply(session, ctx, reply).await?;
            return Ok(true);
        }
        if ctx.api_state == Some(crate::apis::Effective::Preview) {
            if let Some(reply) = preview_refusal(&route, ctx) {
                self.send_reply(session, ctx, reply).await?;
                return Ok(true);
            }
        }
        if route.portal {
            self.portal(session, ctx, &route).await?;
            return Ok(true);
        }
        if route.hl7 {
            // The message's own audit records replace the HTTP access record.
            self.hl7_ingest(session, ctx).await?;
            return Ok(true);
        }
        // PHI: the access record is durable before anything goes upstream, so before any PHI
        // response header can be released. If the sink cannot take it, fail closed.
        if ctx.phi {
            if let Some(sink) = &self.audit {
                let rec =
                    self.audit_record(session, ctx, caregate_audit::Phase::Access, None, None);
                let found = crate::anomaly::observe(self.anomaly.as_deref(), &ctx.gen, &rec);
                match sink.append_durable(rec).await {
                    Ok(_) => {
                        metrics::AUDIT_RECORDS
                            .with_label_values(&["access", "ok"])
                            .inc();
                        ctx.audited_access = true;
                        crate::anomaly::append(sink, found);
                    }
                    Err(e) => {
                        metrics::AUDIT_RECORDS
                            .with_label_values(&["access", "error"])
                            .inc();
                        log::error!(
                            "request {}: audit sink refused the access record: {e:?}",
                            ctx.req.request_id
                        );
                        Self::record_gateway_denial(ctx, "audit_unavailable");
                        let reply = LocalReply::error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "audit_unavailable",
                            "the audit trail is unavailable; PHI is not served without it",
                        )
                        .with_header(header::RETRY_AFTER, HeaderValue::from_static("5"));
                        self.send_reply(session, ctx, reply).await?;
                        return Ok(true);
                    }
                }
            }
        }
        if ctx.req.whole_exchange() {
            self.whole_exchange(session, ctx).await?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        if let Some(reply) = self.body_too_slow(body.as_ref().map_or(0, |b| b.len()), ctx) {
            ctx.pending = Some(reply);
            return Error::e_explain(ErrorType::HTTPStatus(408), "request body too slow");
        }
        let Some(route) = ctx.route.clone() else {
            return Ok(());
        };
        // Per chunk of each attempt (Pingora replays the body on a retry).
        let verdict = Chain::new(&route.filters, &MetricsSink).request_body(
            body,
            end_of_stream,
            &mut ctx.req,
        );
        if let Verdict::Reply(reply) = verdict {
            let status = reply.status.as_u16();
            ctx.pending = Some(reply);
            return Error::e_explain(ErrorType::HTTPStatus(status), "refused by a body filter");
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Box<Ctx>,
    ) -> Result<Box<HttpPeer>> {
        self.select_peer(ctx)
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Box<Ctx>,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let req = retry_request(session);
        e.set_retry(self.note_failure(ctx, retry::Failure::Connect, req));
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Box<Ctx>,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if matches!(e.etype(), ErrorType::Custom(kind) if *kind == RETRY_ON_STATUS) {
            // Decided (and counted) in upstream_response_filter.
            e.set_retry(true);
            return e;
        }
        let req = retry_request(session);
        let failure = retry::Failure::after_send(&e);
        e.set_retry(self.note_failure(ctx, failure, req));
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        ctx.connected_at = Some(Instant::now());
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        self.prepare_upstream_request(upstream_request, ctx).await
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        self.note_response(ctx, status);
        self.observe_upstream(ctx);
        if crate::outlier::status_is_failure(status) {
            // Nothing of this response went downstream: an idempotent request goes to another
            // backend (the one retry rule decides, budget included); otherwise the client gets
            // the status as the backend sent it.
            let req = retry_request(session);
            if self.note_failure(ctx, retry::Failure::Status, req) {
                let mut e = Error::explain(
                    ErrorType::Custom(RETRY_ON_STATUS),
                    "the upstream answered a failing status; retried on another backend",
                );
                e.set_retry(true);
                return Err(e.into_up());
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        start_patient_scan(ctx, upstream_response);
        if let Some(route) = ctx.route.clone() {
            let verdict =
                Chain::new(&route.filters, &MetricsSink).response(upstream_response, &mut ctx.req);
            if let Verdict::Reply(reply) = verdict {
                // Nothing went downstream yet: the reply replaces the response (fail_to_proxy
                // sends it, through the response hooks that have not run).
                let status = reply.status.as_u16();
                ctx.pending = Some(reply);
                return Error::e_explain(
                    ErrorType::HTTPStatus(status),
                    "refused by a response hook",
                );
            }
        }
        set_gateway_headers(upstream_response, ctx);
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Box<Ctx>,
    ) -> Result<Option<Duration>> {
        if let Some(route) = ctx.route.clone() {
            let verdict = Chain::new(&route.filters, &MetricsSink).response_body(
                body,
                end_of_stream,
                &mut ctx.req,
            );
            if let Verdict::Reply(reply) = verdict {
                // The header is downstream already: the exchange is aborted, so the client sees
                // an incomplete response, never a complete one it must not have.
                return Error::e_explain(
                    ErrorType::InternalError,
                    format!("response body refused ({})", reply.reason),
                );
            }
        }
        // What the client gets (after the filters), scanned for the patients it holds.
        if let (Some(scanner), Some(b)) = (&mut ctx.body_patients, body.as_ref()) {
            scanner.feed(b);
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Box<Ctx>,
    ) -> FailToProxy {
        let reply = self.reply_for_error(e, ctx);
        let code = match reply {
            Some(reply) => {
                let code = reply.status.as_u16();
                ctx.error_reason = Some(reply.reason);
                if !final_response_written(session) {
                    if let Err(we) = self.send_reply(session, ctx, reply).await {
                        log::warn!(
                            "request {}: could not send the error reply: {we}",
                            ctx.req.request_id
                        );
                    }
                }
                code
            }
            None => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn request_summary(&self, session: &Session, ctx: &Box<Ctx>) -> String {
        // Never the path or query: they can carry patient identifiers.
        format!(
            "{} listener={} route={} request_id={}",
            metrics::method_label(session.req_header().method.as_str()),
            ctx.req.listener,
            ctx.req.route.as_deref().unwrap_or("-"),
            ctx.req.request_id
        )
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Box<Ctx>) {
        // The next read on this connection waits for a new request (the idle bound).
        crate::conn_guard::request_done(session);
        let status = session
            .response_written()
            .filter(|r| !r.status.is_informational())
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let route = ctx.req.route.as_deref().unwrap_or("none");
        let method = metrics::method_label(&ctx.req.method);
        metrics::REQUESTS
            .with_label_values(&[
                &*ctx.req.listener,
                route,
                method,
                metrics::status_class(status),
                metrics::status_code(status),
            ])
            .inc();
        metrics::REQUEST_BODY_BYTES
            .with_label_values(&[&*ctx.req.listener, route])
            .inc_by(session.body_bytes_read() as u64);
        metrics::RESPONSE_BODY_BYTES
            .with_label_values(&[&*ctx.req.listener, route])
            .inc_by(session.body_bytes_sent() as u64);
        metrics::REQUEST_DURATION
            .with_label_values(&[&*ctx.req.listener, route])
            .observe(ctx.req.started.elapsed().as_secs_f64());
        if let (Some(p), Some((zone, _))) = (ctx.pool, ctx.current) {
            if zone > 0 && (200..500).contains(&status) {
                if let Some(pool) = ctx.gen.pools.get(p) {
                    let from = pool.zones.first().map(|z| &*z.name).unwrap_or("");
                    let to = pool.zones.get(zone).map(|z| &*z.name).unwrap_or("");
                    metrics::FAILOVERS
                        .with_label_values(&[&*pool.name, from, to])
                        .inc();
                }
            }
        }
        if let Some(route) = ctx.route.clone() {
            Chain::new(&route.filters, &MetricsSink).logging(&ctx.req);
            if let Some(bg) = ctx
                .req
                .facts
                .get::<caregate_filters::identity::BreakGlass>()
            {
                metrics::BREAK_GLASS
                    .with_label_values(&[&*route.name, bg.purpose.as_str()])
                    .inc();
            }
            if let Some(r) = ctx
                .req
                .facts
                .get::<caregate_filters::identity::BreakGlassRefused>()
            {
                metrics::BREAK_GLASS_REFUSED
                    .with_label_values(&[&*route.name, r.reason])
                    .inc();
            }
        }
        if ctx.phi {
            if let Some(sink) = &self.audit {
                let reason = ctx.error_reason.or_else(|| ctx.req.deny_reason());
                let phase = if ctx.audited_access {
                    Some(caregate_audit::Phase::Completion)
                } else if status >= 400 || status == 0 {
                    Some(caregate_audit::Phase::Denied)
                } else {
                    None
                };
                if let Some(phase) = phase {
                    let rec = self.audit_record(session, ctx, phase, Some(status), reason);
                    let found = crate::anomaly::observe(self.anomaly.as_deref(), &ctx.gen, &rec);
                    let result = if sink.append(rec).is_ok() {
                        crate::anomaly::append(sink, found);
                        "ok"
                    } else {
                        "error"
                    };
                    metrics::AUDIT_RECORDS
                        .with_label_values(&[phase.as_str(), result])
                        .inc();
                }
            }
        }
        if let Some(log) = &self.access_log {
            log.write(self.access_line(session, ctx, status));
        }
        if let (Some(exp), Some(t)) = (&self.otlp, &ctx.trace) {
            let end = std::time::SystemTime::now();
            let start = end.checked_sub(ctx.req.started.elapsed()).unwrap_or(end);
            let route = ctx.req.route.as_deref().unwrap_or("none");
            let mut attributes = vec![
                (
                    "http.request.method",
                    metrics::method_label(&ctx.req.method).to_string(),
                ),
                ("http.route", route.to_string()),
                ("caregate.listener", ctx.req.listener.to_string()),
                ("caregate.request_id", ctx.req.request_id.clone()),
            ];
            if let Some(r) = ctx.error_reason.or_else(|| ctx.req.deny_reason()) {
                attributes.push(("caregate.reason", r.to_string()));
            }
            if let Some(pool) = ctx.pool.and_then(|p| ctx.gen.pools.get(p)) {
                attributes.push(("caregate.upstream.pool", pool.name.to_string()));
                if let Some(z) = ctx.current.and_then(|(z, _)| pool.zones.get(z)) {
                    attributes.push(("caregate.upstream.zone", z.name.to_string()));
                }
            }
            exp.record(crate::otlp::RequestSpan {
                trace_id: &t.trace_id,
                span_id: &t.span_id,
                parent_id: t.parent_id.as_deref(),
                sampled: t.flags.ends_with('1') || t.flags.ends_with('3'),
                name: format!("{} {route}", metrics::method_label(&ctx.req.method)),
                start,
                end,
                attributes,
                status,
            });
        }
    }
}
