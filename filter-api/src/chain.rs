//! The one runner of a route's filter chain.
//!
//! [`Chain`] owns, in one place, everything about *how* filters run, so that the gateway's
//! streaming path (Pingora's `ProxyHttp` hooks) and its whole-exchange path are thin adapters
//! over the same rules, and a chain can be driven in a unit test with no socket:
//!
//! - **Modes.** A filter in `off` never runs. A filter in `shadow` that refuses is counted as
//!   `shadow_deny` and the request goes on: on the request side, any reply with a 4xx or 5xx
//!   status; on the response side (response checks included), a refusal with a 4xx status. A
//!   failure is never shadowed: an `Err` of a request-side hook (`500 internal_error`), nor, on
//!   the response side, a 5xx refusal or an `Err` without a refusal (`502 upstream_error`).
//! - **Order.** Request-side hooks (`request_filter`, `preread_filter`, `request_body_filter`,
//!   `upstream_request_filter`) run in chain order, over the filters whose request hook ran;
//!   response-side hooks (`response_filter`, `response_body_filter`) in reverse order over the
//!   same filters; `logging` in chain order over them.
//! - **How often.** The request header hook and the response header hook of each filter run
//!   **once per request**. When a response check refuses a response that was not released yet,
//!   the local reply that replaces it passes only through the response hooks that had not run
//!   yet (the filters in front of the refusing one), so no hook sees two response headers.
//!   Body hooks and `upstream_request_filter` run **once per upstream attempt**: Pingora replays
//!   the request body through the body hooks when it retries on another backend, so per-body
//!   state must be keyed by [`RequestCtx::attempt`].
//! - **Decisions.** Every decision is recorded through the injected [`DecisionSink`] (the
//!   gateway's metrics) and, except plain allows, in [`RequestCtx::decisions`] (the audit
//!   record).
//! - **Refusals are values** on both sides: every phase answers a [`Verdict`]; a response check
//!   refuses with the [`LocalReply`] it set ([`RequestCtx::refuse_response`]), or a `502
//!   upstream_error` when it failed without one.

use crate::ctx::DecisionRecord;
use crate::{
    Decision, Filter, LocalReply, Mode, RequestCtx, RequestHeader, ResponseHeader, Stored,
};
use bytes::Bytes;
use http::StatusCode;
use std::sync::Arc;

/// Where the chain reports each decision: the gateway counts them in
/// `caregate_filter_decisions_total{filter,result,reason}`; tests collect them.
pub trait DecisionSink: Send + Sync {
    /// One decision: `filter` is the filter's kind, `result` one of `allow`, `deny`,
    /// `shadow_deny`, `answer`, `error`, and `reason` the reply's reason code (`none` for allow).
    fn record(&self, filter: &'static str, result: &'static str, reason: &'static str);
}

/// A sink that drops every decision.
pub struct NoSink;

impl DecisionSink for NoSink {
    fn record(&self, _filter: &'static str, _result: &'static str, _reason: &'static str) {}
}

/// What a phase of the chain decided.
#[must_use]
#[derive(Debug)]
pub enum Verdict {
    /// Go on: forward the request, or release the response.
    Continue,
    /// Answer the client with this reply instead.
    Reply(LocalReply),
}

impl Verdict {
    /// The reply, if the phase refused.
    pub fn reply(self) -> Option<LocalReply> {
        match self {
            Verdict::Continue => None,
            Verdict::Reply(r) => Some(r),
        }
    }
}

/// Where a request stands in its chain (kept in the [`RequestCtx`], written only by [`Chain`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// How many filters (from the front) had their request hook called.
    pub(crate) ran: usize,
    /// How many filters (from the front) have not had their response header hook called yet:
    /// the response header hooks run over `pending - 1` down to 0.
    pub(crate) response_pending: usize,
    /// Whether the response header phase started (`response_pending` is meaningful).
    pub(crate) response_started: bool,
    /// The filters whose response header hook ran on the response being released: the body
    /// hooks run over these (`body_from..body_to`, in reverse).
    pub(crate) body_from: usize,
    pub(crate) body_to: usize,
}

impl Progress {
    /// How many filters, from the front of the chain, the request phase reached (filters in
    /// mode off among them count, though their hook did not run): the later phases run over
    /// these.
    pub fn ran(&self) -> usize {
        self.ran
    }
}

/// The reply for a filter that failed (`Err`): its message goes to the error log only.
pub fn internal_error() -> LocalReply {
    LocalReply::error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "the request could not be processed",
    )
}

fn upstream_unprocessable() -> LocalReply {
    LocalReply::error(
        StatusCode::BAD_GATEWAY,
        "upstream_error",
        "the upstream response could not be processed",
    )
}

/// A route's filters, run by the rules above. Cheap to build per request.
pub struct Chain<'a> {
    filters: &'a [Arc<dyn Filter>],
    sink: &'a dyn DecisionSink,
}

impl<'a> Chain<'a> {
    /// The chain of `filters`, in the order they run (the listener's filters, then the
    /// route's), reporting every decision to `sink`.
    pub fn new(filters: &'a [Arc<dyn Filter>], sink: &'a dyn DecisionSink) -> Self {
        Chain { filters, sink }
    }

    /// The filters whose request hook ran, in chain order.
    fn ran(&self, ctx: &RequestCtx) -> &'a [Arc<dyn Filter>] {
        let filters: &'a [Arc<dyn Filter>] = self.filters;
        &filters[..ctx.progress.ran.min(filters.len())]
    }

    fn count(
        &self,
        ctx: &mut RequestCtx,
        filter: &'static str,
        result: &'static str,
        reason: &'static str,
    ) {
        self.sink.record(filter, result, reason);
        ctx.info.decisions.push(DecisionRecord {
            filter,
            result,
            reason,
        });
    }

    /// Apply a filter's mode to what one of its request-side hooks decided: `Some(reply)` ends
    /// the phase.
    fn judge(
        &self,
        f: &dyn Filter,
        decided: crate::Result<Decision>,
        what: &str,
        ctx: &mut RequestCtx,
    ) -> Option<LocalReply> {
        match decided {
            Ok(Decision::Continue) => None,
            Ok(Decision::Respond(reply)) => {
                if reply.is_denial() && f.mode() == Mode::Shadow {
                    self.count(ctx, f.kind(), "shadow_deny", reply.reason);
                    return None;
                }
                let result = if reply.is_denial() { "deny" } else { "answer" };
                self.count(ctx, f.kind(), result, reply.reason);
                Some(reply)
            }
            Err(e) => {
                log::error!(
                    "request {}: filter {} failed on {what}: {e}",
                    ctx.request_id,
                    f.kind()
                );
                self.count(ctx, f.kind(), "error", "internal_error");
                Some(internal_error())
            }
        }
    }

    /// The request header hooks, in chain order, once per request: the first enforced refusal
    /// (or local answer, such as a CORS preflight) ends the phase. Allows are reported to the
    /// sink (but not kept in [`RequestCtx::decisions`]). Asked twice, it answers a
    /// `500 internal_error` and runs no hook.
    pub async fn request(&self, req: &mut RequestHeader, ctx: &mut RequestCtx) -> Verdict {
        if ctx.progress.ran > 0 || ctx.progress.response_started {
            // Once per request: a second call is a bug of the adapter, refused loudly.
            log::error!(
                "request {}: the request hooks were asked to run twice",
                ctx.request_id
            );
            return Verdict::Reply(internal_error());
        }
        for (i, f) in self.filters.iter().enumerate() {
            if f.mode() == Mode::Off {
                continue;
            }
            ctx.progress.ran = i + 1;
            let decided = f.request_filter(req, ctx).await;
            if matches!(decided, Ok(Decision::Continue)) {
                self.sink.record(f.kind(), "allow", "none");
                continue;
            }
            if let Some(reply) = self.judge(f.as_ref(), decided, "the request", ctx) {
                return Verdict::Reply(reply);
            }
        }
        Verdict::Continue
    }

    /// The pre-read hooks on the stored resource, in chain order.
    pub fn preread(&self, stored: &Stored, ctx: &mut RequestCtx) -> Verdict {
        for f in self.ran(ctx) {
            if f.mode() == Mode::Off {
                continue;
            }
            let decided = f.preread_filter(stored, ctx);
            if let Some(reply) = self.judge(f.as_ref(), decided, "a pre-read", ctx) {
                return Verdict::Reply(reply);
            }
        }
        Verdict::Continue
    }

    /// The request body hooks on one chunk, in chain order (once per chunk of each attempt).
    pub fn request_body(
        &self,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Verdict {
        for f in self.ran(ctx) {
            if f.mode() == Mode::Off {
                continue;
            }
            let decided = f.request_body_filter(chunk, end_of_stream, ctx);
            if let Some(reply) = self.judge(f.as_ref(), decided, "the request body", ctx) {
                return Verdict::Reply(reply);
            }
        }
        Verdict::Continue
    }

    /// The upstream request hooks on the request about to go upstream, in chain order (once per
    /// attempt). A failure is an internal error of the exchange.
    pub async fn upstream_request(
        &self,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> crate::Result<()> {
        for f in self.ran(ctx) {
            if f.mode() == Mode::Off {
                continue;
            }
            f.upstream_request_filter(req, ctx).await?;
        }
        Ok(())
    }

    /// Judge what a response-side hook did: its refusal (set with
    /// [`RequestCtx::refuse_response`]), or a `502 upstream_error` when it failed without one.
    /// In shadow, a client-side refusal (4xx) is counted and the response goes on; a failure is
    /// never shadowed.
    fn judge_response(
        &self,
        f: &dyn Filter,
        outcome: crate::Result<()>,
        ctx: &mut RequestCtx,
    ) -> Option<LocalReply> {
        let refusal = ctx.take_response_refusal();
        let reply = match (outcome, refusal) {
            (Ok(()), None) => return None,
            (_, Some(reply)) => reply,
            (Err(e), None) => {
                log::warn!("request {}: {e}", ctx.request_id);
                upstream_unprocessable()
            }
        };
        if reply.is_client_denial() && f.mode() == Mode::Shadow {
            self.count(ctx, f.kind(), "shadow_deny", reply.reason);
            return None;
        }
        self.count(ctx, f.kind(), "deny", reply.reason);
        Some(reply)
    }

    /// Start the response phase once: every filter whose request hook ran owes one response
    /// header hook.
    fn start_response(&self, ctx: &mut RequestCtx) {
        if !ctx.progress.response_started {
            ctx.progress.response_started = true;
            ctx.progress.response_pending = ctx.progress.ran.min(self.filters.len());
        }
    }

    /// The next filter, in reverse chain order, whose response header hook is still owed (and
    /// runs: not in mode off); marks it as run.
    fn next_pending(&self, ctx: &mut RequestCtx) -> Option<(usize, &'a Arc<dyn Filter>)> {
        let filters: &'a [Arc<dyn Filter>] = self.filters;
        while ctx.progress.response_pending > 0 {
            let i = ctx.progress.response_pending - 1;
            ctx.progress.response_pending = i;
            match filters.get(i) {
                Some(f) if f.mode() != Mode::Off => return Some((i, f)),
                _ => {}
            }
        }
        None
    }

    /// The response header hooks on an upstream response being streamed, in reverse chain
    /// order over the filters whose request hook ran and whose response hook has not run yet.
    ///
    /// A hook that refuses (in enforce, or fails in any mode) ends the phase with the reply that
    /// replaces the response; the filters in front of the refusing one have not run their
    /// response hooks, and run them on that reply ([`Chain::local_reply`]).
    pub fn response(&self, resp: &mut ResponseHeader, ctx: &mut RequestCtx) -> Verdict {
        self.start_response(ctx);
        ctx.progress.body_to = ctx.progress.response_pending;
        ctx.progress.body_from = ctx.progress.response_pending;
        while let Some((i, f)) = self.next_pending(ctx) {
            let outcome = f.response_filter(resp, ctx);
            if let Some(reply) = self.judge_response(f.as_ref(), outcome, ctx) {
                return Verdict::Reply(reply);
            }
            ctx.progress.body_from = i;
        }
        Verdict::Continue
    }

    /// The response body hooks on one chunk of a streamed response, in reverse chain order over
    /// the filters whose response header hook passed it. The header is already downstream, so
    /// the adapter can only abort the exchange on a refusal.
    pub fn response_body(
        &self,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Verdict {
        let to = ctx.progress.body_to.min(self.filters.len());
        for i in (ctx.progress.body_from..to).rev() {
            let Some(f) = self.filters.get(i) else {
                continue;
            };
            if f.mode() == Mode::Off {
                continue;
            }
            let outcome = f.response_body_filter(chunk, end_of_stream, ctx);
            if let Some(reply) = self.judge_response(f.as_ref(), outcome, ctx) {
                return Verdict::Reply(reply);
            }
        }
        Verdict::Continue
    }

    /// The response hooks on a whole response that nothing of was released yet (a whole
    /// exchange): filter by filter in reverse chain order, each one's header hook and then its
    /// body hook on the whole body. A refusal ends the phase with the reply that replaces the
    /// response; the filters in front of the refusing one run their response hooks on that
    /// reply instead ([`Chain::local_reply`]), so every hook runs once.
    pub fn whole_response(
        &self,
        resp: &mut ResponseHeader,
        body: &mut Option<Bytes>,
        ctx: &mut RequestCtx,
    ) -> Verdict {
        self.start_response(ctx);
        while let Some((_, f)) = self.next_pending(ctx) {
            let outcome = f.response_filter(resp, ctx);
            if let Some(reply) = self.judge_response(f.as_ref(), outcome, ctx) {
                return Verdict::Reply(reply);
            }
            let outcome = f.response_body_filter(body, true, ctx);
            if let Some(reply) = self.judge_response(f.as_ref(), outcome, ctx) {
                return Verdict::Reply(reply);
            }
        }
        Verdict::Continue
    }

    /// The response header hooks on a local reply (a refusal, an error, an answer at the
    /// edge): the filters whose request hook ran and whose response hook has not run yet, in
    /// reverse chain order. A hook cannot refuse a local reply: a failure is logged and the
    /// reply goes out.
    pub fn local_reply(&self, resp: &mut ResponseHeader, ctx: &mut RequestCtx) {
        self.start_response(ctx);
        while let Some((_, f)) = self.next_pending(ctx) {
            let outcome = f.response_filter(resp, ctx);
            // A refusal set on a reply means nothing: the reply is what goes out.
            let _ = ctx.take_response_refusal();
            if let Err(e) = outcome {
                log::error!(
                    "request {}: response hook of {} failed on a local reply: {e}",
                    ctx.request_id,
                    f.kind()
                );
            }
        }
        // No body hook runs on a local reply.
        ctx.progress.body_from = 0;
        ctx.progress.body_to = 0;
    }

    /// The logging hooks of the filters whose request hook ran, in chain order: always, at the
    /// end of every request.
    pub fn logging(&self, ctx: &RequestCtx) {
        for f in self.ran(ctx) {
            if f.mode() != Mode::Off {
                f.logging(ctx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::FilterError;
    use async_trait::async_trait;
    use std::sync::Mutex;

    /// What the probes did, in order ("name:hook").
    type Log = Arc<Mutex<Vec<String>>>;

    #[derive(Default)]
    struct Collect(Mutex<Vec<(&'static str, &'static str, &'static str)>>);

    impl DecisionSink for Collect {
        fn record(&self, filter: &'static str, result: &'static str, reason: &'static str) {
            self.0.lock().unwrap().push((filter, result, reason));
        }
    }

    /// A filter that records each hook it runs and refuses where told.
    struct Probe {
        name: &'static str,
        mode: Mode,
        log: Log,
        refuse_request: Option<u16>,
        refuse_response: Option<u16>,
        refuse_body: Option<u16>,
        fail_response: bool,
    }

    impl Probe {
        fn new(name: &'static str, log: &Log) -> Probe {
            Probe {
                name,
                mode: Mode::Enforce,
                log: log.clone(),
                refuse_request: None,
                refuse_response: None,
                refuse_body: None,
                fail_response: false,
            }
        }
        fn note(&self, hook: &str) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{}:{hook}", self.name));
        }
    }

    fn reply(status: u16, reason: &'static str) -> LocalReply {
        LocalReply::error(StatusCode::from_u16(status).unwrap(), reason, "")
    }

    #[async_trait]
    impl Filter for Probe {
        fn kind(&self) -> &'static str {
            self.name
        }
        fn mode(&self) -> Mode {
            self.mode
        }
        async fn request_filter(
            &self,
            _req: &mut RequestHeader,
            _ctx: &mut RequestCtx,
        ) -> crate::Result<Decision> {
            self.note("request");
            Ok(match self.refuse_request {
                Some(s) => Decision::Respond(reply(s, "probe_refused")),
                None => Decision::Continue,
            })
        }
        fn request_body_filter(
            &self,
            _chunk: &mut Option<Bytes>,
            _eos: bool,
            _ctx: &mut RequestCtx,
        ) -> crate::Result<Decision> {
            self.note("body");
            Ok(Decision::Continue)
        }
        fn response_filter(
            &self,
            resp: &mut ResponseHeader,
            ctx: &mut RequestCtx,
        ) -> crate::Result<()> {
            self.note(&format!("response {}", resp.status.as_u16()));
            if self.fail_response {
                return Err(FilterError {
                    filter: self.name,
                    message: "broken".into(),
                });
            }
            if let Some(s) = self.refuse_response {
                ctx.refuse_response(reply(s, "probe_response"));
                return Err(FilterError {
                    filter: self.name,
                    message: "refused".into(),
                });
            }
            Ok(())
        }
        fn response_body_filter(
            &self,
            _chunk: &mut Option<Bytes>,
            _eos: bool,
            ctx: &mut RequestCtx,
        ) -> crate::Result<()> {
            self.note("response_body");
            if let Some(s) = self.refuse_body {
                ctx.refuse_response(reply(s, "probe_body"));
                return Err(FilterError {
                    filter: self.name,
                    message: "refused".into(),
                });
            }
            Ok(())
        }
        fn logging(&self, _ctx: &RequestCtx) {
            self.note("logging");
        }
    }

    fn chain_of(probes: Vec<Probe>) -> Vec<Arc<dyn Filter>> {
        probes
            .into_iter()
            .map(|p| Arc::new(p) as Arc<dyn Filter>)
            .collect()
    }

    fn taken(log: &Log) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    fn req() -> RequestHeader {
        RequestHeader::build("GET", b"/fhir/Patient/1", None).unwrap()
    }

    fn resp(status: u16) -> ResponseHeader {
        ResponseHeader::build(status, None).unwrap()
    }

    #[tokio::test]
    async fn request_hooks_in_order_response_hooks_in_reverse_over_those_that_ran() {
        let log = Log::default();
        let sink = Collect::default();
        let mut off = Probe::new("off", &log);
        off.mode = Mode::Off;
        let mut stop = Probe::new("c", &log);
        stop.refuse_request = Some(403);
        let filters = chain_of(vec![
            Probe::new("a", &log),
            off,
            Probe::new("b", &log),
            stop,
            Probe::new("d", &log),
        ]);
        let chain = Chain::new(&filters, &sink);
        let mut ctx = RequestCtx::for_test("GET", "/fhir/Patient/1");
        let verdict = chain.request(&mut req(), &mut ctx).await;
        assert_eq!(verdict.reply().map(|r| r.reason), Some("probe_refused"));
        assert_eq!(taken(&log), ["a:request", "b:request", "c:request"]);
        // The refusal goes out through the response hooks of the filters that ran, reversed.
        chain.local_reply(&mut resp(403), &mut ctx);
        assert_eq!(
            taken(&log),
            ["c:response 403", "b:response 403", "a:response 403"]
        );
        chain.logging(&ctx);
        assert_eq!(taken(&log), ["a:logging", "b:logging", "c:logging"]);
        // Allows counted in the sink only; the denial in the sink and the ctx (the audit).
        assert_eq!(
            *sink.0.lock().unwrap(),
            [
                ("a", "allow", "none"),
                ("b", "allow", "none"),
                ("c", "deny", "probe_refused")
            ]
        );
        assert_eq!(ctx.deny_reason(), Some("probe_refused"));
    }

    #[tokio::test]
    async fn shadow_counts_a_refusal_and_goes_on_but_never_shadows_a_failure() {
        let log = Log::default();
        let sink = Collect::default();
        let mut shadow = Probe::new("s", &log);
        shadow.mode = Mode::Shadow;
        shadow.refuse_request = Some(403);
        shadow.refuse_response = Some(404);
        let mut broken = Probe::new("m", &log);
        broken.mode = Mode::Shadow;
        broken.refuse_body = Some(502);
        let filters = chain_of(vec![shadow, broken]);
        let chain = Chain::new(&filters, &sink);
        let mut ctx = RequestCtx::for_test("GET", "/fhir/Patient/1");
        assert!(matches!(
            chain.request(&mut req(), &mut ctx).await,
            Verdict::Continue
        ));
        // The shadowed response check lets the response through; the 502 (a response that
        // cannot be processed) is never shadowed.
        let mut body = Some(Bytes::from_static(b"{}"));
        let verdict = chain.whole_response(&mut resp(200), &mut body, &mut ctx);
        assert_eq!(verdict.reply().map(|r| r.status.as_u16()), Some(502));
        let got = sink.0.lock().unwrap().clone();
        assert!(
            got.contains(&("s", "shadow_deny", "probe_refused")),
            "{got:?}"
        );
        assert!(got.contains(&("m", "deny", "probe_body")), "{got:?}");
        // The shadowed filter's response hooks have not run yet (it comes first in the chain):
        // they run on the reply.
        let before = taken(&log);
        assert_eq!(
            before,
            [
                "s:request",
                "m:request",
                "m:response 200",
                "m:response_body"
            ]
        );
        chain.local_reply(&mut resp(502), &mut ctx);
        assert_eq!(taken(&log), ["s:response 502"]);
    }

    #[tokio::test]
    async fn a_refused_response_is_a_value_and_every_response_hook_runs_once() {
        let log = Log::default();
        let sink = Collect::default();
        let mut compartment = Probe::new("compartment", &log);
        compartment.refuse_response = Some(404);
        let filters = chain_of(vec![
            Probe::new("cors", &log),
            compartment,
            Probe::new("headers", &log),
        ]);
        let chain = Chain::new(&filters, &sink);
        let mut ctx = RequestCtx::for_test("GET", "/fhir/Patient/1");
        assert!(matches!(
            chain.request(&mut req(), &mut ctx).await,
            Verdict::Continue
        ));
        taken(&log);
        let mut body = Some(Bytes::from_static(b"{}"));
        let refused = chain.whole_response(&mut resp(200), &mut body, &mut ctx);
        let reply = refused.reply().unwrap();
        assert_eq!(
            (reply.status.as_u16(), reply.reason),
            (404, "probe_response")
        );
        assert_eq!(
            taken(&log),
            [
                "headers:response 200",
                "headers:response_body",
                "compartment:response 200"
            ]
        );
        // The reply passes through the hooks that have not run; a second pass runs none.
        chain.local_reply(&mut resp(404), &mut ctx);
        chain.local_reply(&mut resp(404), &mut ctx);
        assert_eq!(taken(&log), ["cors:response 404"]);
        // A failure without a reply of its own is a 502.
        let mut broken = Probe::new("broken", &log);
        broken.fail_response = true;
        let filters = chain_of(vec![broken]);
        let chain = Chain::new(&filters, &sink);
        let mut ctx = RequestCtx::for_test("GET", "/x");
        let _ = chain.request(&mut req(), &mut ctx).await;
        let reply = chain.response(&mut resp(200), &mut ctx).reply().unwrap();
        assert_eq!(
            (reply.status.as_u16(), reply.reason),
            (502, "upstream_error")
        );
    }

    #[tokio::test]
    async fn body_hooks_run_per_attempt_and_request_hooks_once() {
        let log = Log::default();
        let filters = chain_of(vec![Probe::new("a", &log)]);
        let chain = Chain::new(&filters, &NoSink);
        let mut ctx = RequestCtx::for_test("POST", "/fhir/Observation");
        let _ = chain.request(&mut req(), &mut ctx).await;
        // Pingora replays the body on a retry: the body hooks run again.
        for _attempt in 0..2 {
            let mut chunk = Some(Bytes::from_static(b"{}"));
            assert!(matches!(
                chain.request_body(&mut chunk, true, &mut ctx),
                Verdict::Continue
            ));
        }
        assert_eq!(taken(&log), ["a:request", "a:body", "a:body"]);
        // The request hooks never run twice.
        let again = chain.request(&mut req(), &mut ctx).await;
        assert_eq!(again.reply().map(|r| r.reason), Some("internal_error"));
        assert!(taken(&log).is_empty());
    }

    #[tokio::test]
    async fn streamed_body_hooks_skip_filters_whose_header_hook_did_not_pass_it() {
        let log = Log::default();
        let mut off = Probe::new("off", &log);
        off.mode = Mode::Off;
        let filters = chain_of(vec![Probe::new("a", &log), off, Probe::new("b", &log)]);
        let chain = Chain::new(&filters, &NoSink);
        let mut ctx = RequestCtx::for_test("GET", "/x");
        let _ = chain.request(&mut req(), &mut ctx).await;
        taken(&log);
        assert!(matches!(
            chain.response(&mut resp(200), &mut ctx),
            Verdict::Continue
        ));
        let mut chunk = Some(Bytes::from_static(b"x"));
        assert!(matches!(
            chain.response_body(&mut chunk, true, &mut ctx),
            Verdict::Continue
        ));
        assert_eq!(
            taken(&log),
            [
                "b:response 200",
                "a:response 200",
                "b:response_body",
                "a:response_body"
            ]
        );
    }

    #[tokio::test]
    async fn a_shadowed_response_check_lets_the_response_through() {
        let log = Log::default();
        let sink = Collect::default();
        let mut check = Probe::new("check", &log);
        check.mode = Mode::Shadow;
        check.refuse_response = Some(404);
        let filters = chain_of(vec![Probe::new("a", &log), check]);
        let chain = Chain::new(&filters, &sink);
        let mut ctx = RequestCtx::for_test("GET", "/x");
        let _ = chain.request(&mut req(), &mut ctx).await;
        let mut body = Some(Bytes::from_static(b"{}"));
        assert!(matches!(
            chain.whole_response(&mut resp(200), &mut body, &mut ctx),
            Verdict::Continue
        ));
        assert!(sink
            .0
            .lock()
            .unwrap()
            .contains(&("check", "shadow_deny", "probe_response")));
        // In enforce the same check refuses, streaming or whole.
        let mut check = Probe::new("check", &log);
        check.refuse_response = Some(404);
        let filters = chain_of(vec![check]);
        let chain = Chain::new(&filters, &sink);
        let mut ctx = RequestCtx::for_test("GET", "/x");
        let _ = chain.request(&mut req(), &mut ctx).await;
        let reply = chain.response(&mut resp(200), &mut ctx).reply().unwrap();
        assert_eq!(reply.reason, "probe_response");
    }
}
