//! The caregate filter API: the contract every filter — built-in or your own — is written
//! against. It depends on none of the built-in filters and none of their heavy crates, so a
//! filter crate builds quickly; `caregate` (the gateway as a library) runs it.
//!
//! A route runs a chain of [`Filter`]s. The gateway calls, for every request:
//!
//! ```text
//! request_filter        (route order; the first Decision::Respond ends the phase)
//! preread_filter        (route order; only when a filter asked for a pre-read)
//! request_body_filter   (route order, per body chunk, once an upstream is connected;
//!                        in a whole exchange: once, on the whole body, before anything is sent)
//! upstream_request_filter (route order, on the copy of the request that goes upstream)
//! response_filter       (REVERSE route order; also on local replies; once per request)
//! response_body_filter  (REVERSE route order, per chunk)
//! logging               (route order, always — after a local reply or an error too)
//! ```
//!
//! By default bodies stream: once a response header went downstream, a response hook that fails
//! can only abort the connection. A filter that must judge a whole body before anything is
//! released asks for a whole exchange ([`RequestCtx::require_whole_exchange`]): the gateway then
//! reads the whole request body, runs the body hooks on it once (`end_of_stream` true) before
//! anything goes upstream, reads the whole response, runs the response hooks on it, and only then
//! answers — a refusal becomes a clean error reply ([`RequestCtx::refuse_response`]).
//!
//! One runner, [`chain::Chain`], applies modes, order, counting and "each hook once" for both
//! the streaming path and whole exchanges; it needs no socket, so a chain can be driven in a unit
//! test.
//!
//! Filters never see Pingora's `Session` and never call each other: they read and write facts in
//! [`RequestCtx`]. Every hook has a no-op default, so a filter implements only what it needs.
//! Filters are built once from typed config ([`build`]) by a registry of filter kinds (the
//! built-in one is `caregate_filters::FilterRegistry`, which your own kinds can be added to) and
//! are immutable; per-request state lives only in the ctx.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod build;
pub mod chain;
pub mod ctx;
pub mod identity;
pub mod reply;

use async_trait::async_trait;
pub use build::{parse_config, BuildContext, BuildError, FilterSpec, SharedBuildState};
use bytes::Bytes;
pub use ctx::{Channel, Environment, FactError, Facts, PreRead, RequestCtx, RequestInfo, Stored};
pub use pingora_http::{RequestHeader, ResponseHeader};
pub use reply::{LocalReply, ReplyBody, TypedBody};
use serde::Deserialize;

/// What a request-side hook decided.
#[must_use]
#[derive(Debug)]
pub enum Decision {
    /// Go on with the next filter (and, at the end of the chain, upstream).
    Continue,
    /// Answer the client locally with this reply; no later filter's request hook runs and nothing
    /// goes upstream.
    Respond(LocalReply),
}

/// An internal failure of a filter ("something broke", never "policy said no": that is
/// [`Decision::Respond`]). The gateway answers it with a 500 `internal_error` whose body names
/// nothing but the reason code; the message goes to the error log, so it must never carry PHI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    /// The kind of the filter that failed (its [`Filter::kind`]).
    pub filter: &'static str,
    /// What went wrong, for the error log only (never sent to the client): it must never carry
    /// PHI or token contents.
    pub message: String,
}

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "filter {}: {}", self.filter, self.message)
    }
}

impl std::error::Error for FilterError {}

/// What a filter hook returns: `Err` is an internal failure of the filter ([`FilterError`]),
/// never a policy refusal.
pub type Result<T> = std::result::Result<T, FilterError>;

/// How a policy filter acts on a would-be denial: the `mode` of a filter's config
/// (`enforce`, `shadow` or `off`; default `enforce`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Denials are answered.
    #[default]
    Enforce,
    /// Denials are counted (`result="shadow_deny"`) and the request goes on: on the request side
    /// any reply with a 4xx or 5xx status, on the response side a refusal with a 4xx status. A
    /// failure is never shadowed: an `Err` of a request-side hook, nor, on the response side, a
    /// 5xx refusal or an `Err` without a refusal (see [`chain`]).
    Shadow,
    /// The filter does not run at all.
    Off,
}

impl Mode {
    /// The mode as written in config: `enforce`, `shadow` or `off`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
            Mode::Off => "off",
        }
    }
}

/// Work a filter needs done in the background (e.g. refreshing a key set). The gateway runs every
/// filter's task in one of its background services, from start until shutdown.
#[async_trait]
pub trait BackgroundTask: Send + Sync + 'static {
    /// Runs until `shutdown` turns true. A task belongs to the configuration generation its
    /// filter was built with: `shutdown` turns true when that generation is retired (a reload
    /// built and started a new one, with new tasks) or when the process stops. So a task holds
    /// no state beyond its generation, and a reload needs no change to this contract.
    async fn run(&self, shutdown: tokio::sync::watch::Receiver<bool>);

    /// Why the filter cannot do its job yet (e.g. an issuer whose key set is not loaded), or
    /// `None` when it can. While any task says why, the gateway's `/readyz` answers 503 with
    /// that reason, so a load balancer sends traffic to replicas that can serve it.
    fn not_ready(&self) -> Option<String> {
        None
    }
}

pub mod declare;
pub use declare::{Capability, Declaration};

/// A filter module. See the crate documentation for when each hook runs.
#[async_trait]
pub trait Filter: Send + Sync + 'static {
    /// The filter's kind, as written in config (`kind: cors`): the `filter` label of
    /// `caregate_filter_decisions_total`.
    fn kind(&self) -> &'static str;

    /// The filter's mode; the gateway applies it to every [`Decision::Respond`] the filter
    /// returns (shadow: counted, not answered; off: the filter is skipped).
    fn mode(&self) -> Mode {
        Mode::Enforce
    }

    /// What the filter needs from the filters before it, what it provides to the filters after
    /// it, whether it may appear once per chain and whether it confines access (see
    /// [`declare`]). `caregate check` refuses a chain that breaks a declaration. The default
    /// declares nothing.
    fn declaration(&self) -> Declaration {
        Declaration::NONE
    }

    /// A task to run in the background for this filter, if it needs one.
    fn background(&self) -> Option<std::sync::Arc<dyn BackgroundTask>> {
        None
    }

    /// Runs on the request header, after request hygiene and route match. `req` is the
    /// normalised request: what this hook sees is what goes upstream.
    async fn request_filter(
        &self,
        _req: &mut RequestHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        Ok(Decision::Continue)
    }

    /// Runs per request body chunk once an upstream is connected. `Respond` here ends the
    /// exchange with the reply's status (the upstream may already have seen part of the body).
    ///
    /// In a whole exchange it runs once, on the whole body (`end_of_stream` true), before
    /// anything goes upstream. Pingora replays the body through this hook when it retries on
    /// another backend, so per-body state must be keyed by [`RequestCtx::attempt`].
    fn request_body_filter(
        &self,
        _chunk: &mut Option<Bytes>,
        _end_of_stream: bool,
        _ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        Ok(Decision::Continue)
    }

    /// Runs on the answer to a pre-read ([`RequestCtx::request_preread`]), in route order, after
    /// the whole request body was read and before the body hooks run on it. `Respond` answers
    /// the client; nothing of the request went upstream.
    fn preread_filter(&self, _stored: &Stored, _ctx: &mut RequestCtx) -> Result<Decision> {
        Ok(Decision::Continue)
    }

    /// Runs on the copy of the request header sent upstream (after the gateway set the verified
    /// identity headers, request id and forwarding headers), once per upstream attempt. An `Err`
    /// is an internal error of the exchange.
    async fn upstream_request_filter(
        &self,
        _req: &mut RequestHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        Ok(())
    }

    /// Runs on the response header going downstream, in reverse route order, for upstream
    /// responses and for local replies alike, once per request.
    ///
    /// To refuse an upstream response, set the reply the client gets with
    /// [`RequestCtx::refuse_response`] and return an `Err`; an `Err` without such a reply becomes
    /// a `502 upstream_error`. On a local reply a failure is only logged and the reply goes out.
    fn response_filter(&self, _resp: &mut ResponseHeader, _ctx: &mut RequestCtx) -> Result<()> {
        Ok(())
    }

    /// Runs per response body chunk, in reverse route order, over the filters whose response
    /// header hook passed the response. It refuses as [`Filter::response_filter`] does; once the
    /// header is downstream (streaming), a refusal can only abort the connection. In a whole
    /// exchange it runs once, on the whole body (`end_of_stream` true), right after the same
    /// filter's header hook.
    fn response_body_filter(
        &self,
        _chunk: &mut Option<Bytes>,
        _end_of_stream: bool,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        Ok(())
    }

    /// Runs once at the end of every request, whatever happened.
    fn logging(&self, _ctx: &RequestCtx) {}
}
