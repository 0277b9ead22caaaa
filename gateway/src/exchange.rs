//! Whole exchanges (DESIGN.md, "whole-exchange checks").
//!
//! Pingora releases the response header downstream before any body hook runs, so a check that
//! needs a whole body can, in the streaming path, only abort a connection after a `200` went out.
//! When a filter asks for a whole exchange ([`RequestCtx::require_whole_exchange`]) the gateway
//! does the upstream exchange itself, through Pingora's HTTP connector, from `request_filter`:
//!
//! 1. it reads the whole request body (bounded by `server.max_exchange_body_bytes`);
//! 2. it runs a pre-read of the stored resource when a filter asked for one, and the filters'
//!    pre-read hooks on its answer;
//! 3. it runs the request body hooks once on the whole body — nothing went upstream yet, so a
//!    refused Bundle entry or write never reaches the backend;
//! 4. it sends the request (same backend choice, zone order and retry rules as the streaming
//!    path) and reads the whole response (bounded);
//! 5. it runs the response hooks on the header and the whole body; a refusal becomes a clean
//!    local reply (`404 not_found` for data outside the caller's compartment, ...);
//! 6. only then does it write the response downstream, with an exact `Content-Length`.
//!
//! [`RequestCtx::require_whole_exchange`]: caregate_filters::RequestCtx::require_whole_exchange

use crate::metrics;
use crate::proxy::{request_has_body, set_gateway_headers, Ctx, Gateway, MetricsSink};
use crate::retry;
use bytes::{Bytes, BytesMut};
use caregate_filters::chain::{Chain, Verdict};
use caregate_filters::{LocalReply, Stored};
use http::{header, StatusCode};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::Session;
use pingora::protocols::http::client::HttpSession;
use pingora::{Error, ErrorType, Result};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Hop-by-hop headers: they describe the client's connection, not the request.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// What all whole exchanges of the process may hold at once, in KiB permits.
#[derive(Clone)]
pub struct MemoryBudget(Arc<Semaphore>);

impl MemoryBudget {
    pub fn new(bytes: usize) -> Self {
        let kib = bytes.div_ceil(1024).min(Semaphore::MAX_PERMITS);
        MemoryBudget(Arc::new(Semaphore::new(kib)))
    }

    /// KiB not held by any exchange right now.
    pub fn available_kib(&self) -> usize {
        self.0.available_permits()
    }
}

/// What one whole exchange holds of the budget; given back when it is dropped.
pub(crate) struct Held {
    budget: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Held {
    fn new(budget: &MemoryBudget) -> Self {
        Held {
            budget: budget.0.clone(),
            permit: None,
        }
    }

    /// Take `more` bytes (on top of what is held already); false when the budget has not
    /// got them.
    fn take(&mut self, more: usize) -> bool {
        let want = more.div_ceil(1024);
        let Ok(n) = u32::try_from(want) else {
            return false;
        };
        if n == 0 {
            return true;
        }
        match self.budget.clone().try_acquire_many_owned(n) {
            Ok(p) => {
                match &mut self.permit {
                    Some(held) => held.merge(p),
                    None => self.permit = Some(p),
                }
                true
            }
            Err(_) => false,
        }
    }
}

impl Held {
    /// Give back what a discarded response body of `bytes` took (a retried attempt's).
    fn give_back(&mut self, bytes: usize) {
        let n = bytes.div_ceil(1024);
        if let Some(held) = &mut self.permit {
            // Each take rounded up, so the permit holds at least this much; None otherwise.
            drop(held.split(n));
        }
    }
}

fn overloaded() -> LocalReply {
    LocalReply::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "the gateway is checking too many large bodies at once; retry shortly",
    )
    .with_header(header::RETRY_AFTER, http::HeaderValue::from_static("1"))
}

/// What one upstream exchange returned.
pub(crate) struct Exchanged {
    pub header: ResponseHeader,
    pub body: Bytes,
}

enum Read {
    Whole(Bytes),
    TooLarge,
    OverBudget,
    TooSlow(LocalReply),
}

impl Gateway {
    /// Run the request as a whole exchange and answer the client. `Err` goes to `fail_to_proxy`
    /// (which answers when nothing was written yet).
    pub(crate) async fn whole_exchange(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        let Some(route) = ctx.route.clone() else {
            return Error::e_explain(ErrorType::InternalError, "no route");
        };
        let chain = Chain::new(&route.filters, &MetricsSink);

        // 1. The whole request body. A client that waits for `100 Continue` before sending it
        // gets one now: every request hook has passed.
        let expects_continue = {
            let req = session.req_header();
            req.version == http::Version::HTTP_11
                && req
                    .headers
                    .get(header::EXPECT)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        };
        if expects_continue {
            session
                .as_downstream_mut()
                .write_continue_response()
                .await?;
        }
        let mut held = Held::new(&self.exchange_memory);
        let body = match self.read_request(session, ctx, &mut held).await? {
            Read::Whole(b) => b,
            Read::TooSlow(reply) => {
                session.set_keepalive(None);
                Self::record_gateway_denial(ctx, "body_too_slow");
                return self.send_reply(session, ctx, reply).await;
            }
            Read::OverBudget => {
                Self::record_gateway_denial(ctx, "overloaded");
                return self.send_reply(session, ctx, overloaded()).await;
            }
            Read::TooLarge => {
                Self::record_gateway_denial(ctx, "payload_too_large");
                let reply = LocalReply::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the request body is larger than this route checks",
                );
                return self.send_reply(session, ctx, reply).await;
            }
        };

        // 2. The pre-read of the stored resource, if a filter asked for one.
        if let Some(pre) = ctx.req.preread().cloned() {
            let stored = self.preread(session, ctx, &pre.path, &mut held).await?;
            if let Verdict::Reply(reply) = chain.preread(&stored, &mut ctx.req) {
                return self.send_reply(session, ctx, reply).await;
            }
        }

        // 3. The request body hooks, once, on the whole body: nothing went upstream yet.
        let had_body = !body.is_empty() || request_has_body(session);
        let mut chunk = (!body.is_empty()).then_some(body);
        if let Verdict::Reply(reply) = chain.request_body(&mut chunk, true, &mut ctx.req) {
            return self.send_reply(session, ctx, reply).await;
        }
        let body = chunk.unwrap_or_default();

        // 4. The exchange.
        let mut up = session.req_header().clone();
        for h in HOP_BY_HOP {
            up.remove_header(h);
        }
        up.remove_header(&header::TRANSFER_ENCODING);
        up.remove_header(&header::CONTENT_LENGTH);
        if had_body || !body.is_empty() {
            up.insert_header(header::CONTENT_LENGTH, body.len())?;
        }
        self.prepare_upstream_request(&mut up, ctx).await?;
        let Exchanged {
            header: mut resp,
            body: rbody,
        } = self.exchange(ctx, &up, &body, &mut held).await?;

        // 5. The response hooks, each filter's on the header and then on the whole body. A
        // refusal is a clean reply: nothing was released, and the reply passes through the
        // response hooks that have not run (each runs once).
        let mut out = Some(rbody);
        if let Verdict::Reply(reply) = chain.whole_response(&mut resp, &mut out, &mut ctx.req) {
            return self.send_reply(session, ctx, reply).await;
        }

        // 6. The response, whole (scanned for the patients it holds, for the completion record).
        let body = out.unwrap_or_default();
        crate::proxy::start_patient_scan(ctx, &resp);
        if let Some(scanner) = &mut ctx.body_patients {
            scanner.feed(&body);
        }
        let status = resp.status.as_u16();
        let head = session.req_header().method == http::Method::HEAD;
        resp.remove_header(&header::TRANSFER_ENCODING);
        for h in HOP_BY_HOP {
            resp.remove_header(h);
        }
        if !(head || status == 204 || status == 304 || (100..200).contains(&status)) {
            resp.insert_header(header::CONTENT_LENGTH, body.len())?;
        }
        set_gateway_headers(&mut resp, ctx);
        let empty = head || body.is_empty();
        session.write_response_header(Box::new(resp), empty).await?;
        if !empty {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }

    /// Read `path` (below the route prefix) from the request's upstream, with the verified
    /// identity of the request: the stored state a filter judges a change against.
    async fn preread(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        path: &str,
        held: &mut Held,
    ) -> Result<Stored> {
        let Some(route) = ctx.route.clone() else {
            return Error::e_explain(ErrorType::InternalError, "no route");
        };
        let full = if route.path_prefix == "/" {
            path.to_string()
        } else {
            format!("{}{path}", route.path_prefix)
        };
        let mut req = RequestHeader::build("GET", full.as_bytes(), Some(8))?;
        if let Some(h) = session.req_header().headers.get(header::HOST) {
            req.insert_header(header::HOST, h.clone())?;
        }
        req.insert_header(header::ACCEPT, "application/fhir+json")?;
        self.prepare_upstream_request(&mut req, ctx).await?;
        // The pre-read's answer is read as sent: no content coding.
        req.remove_header(&header::ACCEPT_ENCODING);
        req.remove_header(&header::IF_MATCH);
        req.remove_header(&header::IF_NONE_MATCH);
        let got = self.exchange(ctx, &req, &Bytes::new(), held).await?;
        // The request itself gets the whole attempt budget and starts again at the first zone.
        ctx.attempts = 0;
        ctx.tried.clear();
        ctx.max_zone_tried = None;
        Ok(Stored {
            status: got.header.status.as_u16(),
            etag: got
                .header
                .headers
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: got.body,
        })
    }

    /// One upstream exchange with the streaming path's backend choice and its one retry rule
    /// ([`retry::may_retry`]): a failed connect goes to another backend; a connection that
    /// broke goes to another backend only for an idempotent method (the whole body is held);
    /// timeouts are not retried. The response body is read whole, bounded.
    pub(crate) async fn exchange(
        &self,
        ctx: &mut Ctx,
        req: &RequestHeader,
        body: &Bytes,
        held: &mut Held,
    ) -> Result<Exchanged> {
        let request = retry::Request {
            idempotent: req.method.is_idempotent(),
            // The whole body is held: it can always be sent again.
            body_replayable: true,
            // Nothing is released before the exchange is over.
            response_started: false,
        };
        loop {
            let peer = self.select_peer(ctx)?;
            let (mut http, _reused) = match self.connector.get_http_session(&*peer).await {
                Ok(x) => x,
                Err(e) => {
                    let e = e.into_up();
                    if self.note_failure(ctx, retry::Failure::Connect, request) {
                        continue;
                    }
                    return Err(e);
                }
            };
            // Pingora's proxy sets these itself for its own sessions; the connector does not.
            http.set_read_timeout(peer.options.read_timeout);
            http.set_write_timeout(peer.options.write_timeout);
            ctx.connected_at = Some(Instant::now());
            match send(&mut http, req, body, self.max_exchange_body, held).await {
                Ok(Sent::Whole(got)) => {
                    let status = got.header.status.as_u16();
                    self.note_response(ctx, status);
                    self.observe_upstream(ctx);
                    let idle = peer.options.idle_timeout;
                    self.connector
                        .release_http_session(http, &*peer, idle)
                        .await;
                    // The one retry rule: a failing status of an idempotent request goes to
                    // another backend while one is left (else the client gets it as sent).
                    if crate::outlier::status_is_failure(status)
                        && self.note_failure(ctx, retry::Failure::Status, request)
                    {
                        held.give_back(got.body.len());
                        continue;
                    }
                    return Ok(*got);
                }
                Ok(Sent::OverBudget) => {
                    http.shutdown().await;
                    self.observe_upstream(ctx);
                    Self::record_gateway_denial(ctx, "overloaded");
                    ctx.pending = Some(overloaded());
                    return Error::e_explain(
                        ErrorType::HTTPStatus(503),
                        "whole exchanges over max_exchange_memory_bytes",
                    );
                }
                Ok(Sent::TooLarge) => {
                    http.shutdown().await;
                    self.observe_upstream(ctx);
                    ctx.pending = Some(LocalReply::error(
                        StatusCode::BAD_GATEWAY,
                        "upstream_error",
                        "the upstream response is larger than this route checks",
                    ));
                    return Error::e_explain(
                        ErrorType::HTTPStatus(502),
                        "upstream response over max_exchange_body_bytes",
                    );
                }
                Err(e) => {
                    // The client session leaves the source unset: everything here is upstream.
                    let e = e.into_up();
                    http.shutdown().await;
                    if self.note_failure(ctx, retry::Failure::after_send(&e), request) {
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    pub(crate) fn observe_upstream(&self, ctx: &mut Ctx) {
        if let (Some(at), Some((zone, _)), Some(p)) = (ctx.connected_at, ctx.current, ctx.pool) {
            if let Some(pool) = ctx.gen.pools.get(p) {
                let zone_name = pool.zones.get(zone).map(|z| &*z.name).unwrap_or("");
                let secs = at.elapsed().as_secs_f64();
                ctx.upstream_ms = Some(secs * 1000.0);
                metrics::UPSTREAM_DURATION
                    .with_label_values(&[&*pool.name, zone_name])
                    .observe(secs);
            }
        }
    }
}

impl Gateway {
    /// The whole request body, or `TooLarge` once it passes `max_exchange_body`, or `TooSlow`
    /// below the minimum rate (the rest is left unread; the connection is not reused after the
    /// reply).
    async fn read_request(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        held: &mut Held,
    ) -> Result<Read> {
        let max = self.max_exchange_body;
        let mut buf = BytesMut::new();
        while let Some(chunk) = session.read_request_body().await? {
            if let Some(reply) = self.body_too_slow(chunk.len(), ctx) {
                return Ok(Read::TooSlow(reply));
            }
            if buf.len() + chunk.len() > max {
                session.set_keepalive(None);
                return Ok(Read::TooLarge);
            }
            if !held.take(chunk.len()) {
                session.set_keepalive(None);
                return Ok(Read::OverBudget);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Read::Whole(buf.freeze()))
    }
}

enum Sent {
    Whole(Box<Exchanged>),
    /// The response body passes `max`.
    TooLarge,
    /// The memory budget of whole exchanges has not got room for it.
    OverBudget,
}

/// Send a request and read the whole response.
async fn send(
    http: &mut HttpSession,
    req: &RequestHeader,
    body: &Bytes,
    max: usize,
    held: &mut Held,
) -> Result<Sent> {
    http.write_request_header(Box::new(req.clone())).await?;
    if !body.is_empty() {
        http.write_request_body(body.clone(), true).await?;
    }
    http.finish_request_body().await?;
    // 1xx interim responses (100 Continue, 103 Early Hints) are skipped.
    let header = loop {
        http.read_response_header().await?;
        let Some(h) = http.response_header() else {
            return Error::e_explain(ErrorType::InvalidHTTPHeader, "no response header");
        };
        if h.status.is_informational() && h.status != StatusCode::SWITCHING_PROTOCOLS {
            continue;
        }
        break h.clone();
    };
    let mut buf = BytesMut::new();
    if req.method != http::Method::HEAD {
        while let Some(chunk) = http.read_response_body().await? {
            if buf.len() + chunk.len() > max {
                return Ok(Sent::TooLarge);
            }
            if !held.take(chunk.len()) {
                return Ok(Sent::OverBudget);
            }
            buf.extend_from_slice(&chunk);
        }
    }
    Ok(Sent::Whole(Box::new(Exchanged {
        header,
        body: buf.freeze(),
    })))
}
