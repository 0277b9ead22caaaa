//! The caregate filter contract and the built-in filters.
//!
//! A route runs a chain of [`Filter`]s. The gateway calls, for every request:
//!
//! ```text
//! request_filter        (route order; the first Decision::Respond ends the phase)
//! preread_filter        (route order; only when a filter asked for a pre-read)
//! request_body_filter   (route order, per body chunk, once an upstream is connected;
//!                        in a whole exchange: once, on the whole body, before anything is sent)
//! upstream_request_filter (route order, on the copy of the request that goes upstream)
//! response_filter       (REVERSE route order; also on local replies)
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
//! Filters never see Pingora's `Session` and never call each other: they read and write facts in
//! [`RequestCtx`]. Every hook has a no-op default, so a filter implements only what it needs.
//! Filters are built once from typed config by the [`registry`] and are immutable; per-request
//! state lives only in the ctx.
#![forbid(unsafe_code)]

pub mod builtin;
pub mod ctx;
pub mod identity;
pub mod registry;
pub mod reply;

use async_trait::async_trait;
use bytes::Bytes;
pub use ctx::{Channel, FactError, Facts, PreRead, RequestCtx, Stored};
pub use pingora_http::{RequestHeader, ResponseHeader};
pub use registry::{BuildContext, BuildError, FilterRegistry, FilterSpec};
pub use reply::{LocalReply, ReplyBody};
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
    pub filter: &'static str,
    pub message: String,
}

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "filter {}: {}", self.filter, self.message)
    }
}

impl std::error::Error for FilterError {}

pub type Result<T> = std::result::Result<T, FilterError>;

/// How a policy filter acts on a would-be denial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Denials are answered.
    #[default]
    Enforce,
    /// Denials are counted (`result="shadow_deny"`) and the request goes on.
    Shadow,
    /// The filter does not run at all.
    Off,
}

impl Mode {
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
    /// Runs until `shutdown` turns true.
    async fn run(&self, shutdown: tokio::sync::watch::Receiver<bool>);
}

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
    /// identity headers, request id and forwarding headers).
    async fn upstream_request_filter(
        &self,
        _req: &mut RequestHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        Ok(())
    }

    /// Runs on the response header going downstream, in reverse route order, for upstream
    /// responses and for local replies alike.
    fn response_filter(&self, _resp: &mut ResponseHeader, _ctx: &mut RequestCtx) -> Result<()> {
        Ok(())
    }

    /// Runs per response body chunk, in reverse route order.
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
