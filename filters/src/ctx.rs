//! Per-request state shared by the gateway and the filters.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// Which side of the organisation a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// Patient-facing apps (portal, mobile, telehealth), reachable from the internet.
    Public,
    /// Internal systems (EHR, lab interface engine, billing).
    Internal,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Public => "public",
            Channel::Internal => "internal",
        }
    }
}

/// A second write of a single-writer fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactError {
    pub fact: &'static str,
    pub first_writer: &'static str,
    pub second_writer: &'static str,
}

impl std::fmt::Display for FactError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fact {} was already written by {}; {} may not write it again",
            self.fact, self.first_writer, self.second_writer
        )
    }
}

impl std::error::Error for FactError {}

struct FactEntry {
    writer: &'static str,
    value: Box<dyn Any + Send + Sync>,
}

/// Typed facts about a request, each with exactly one writer.
///
/// A fact is keyed by its Rust type. [`Facts::insert`] refuses a second write, so two filters
/// can never disagree silently about, say, the principal or the tenant. Filters that legitimately
/// refine a fact (rewriting the request and its classification together) own that fact alone.
#[derive(Default)]
pub struct Facts {
    entries: HashMap<TypeId, FactEntry>,
}

impl Facts {
    /// Write fact `T`. Fails, leaving the first value in place, when it was written before.
    pub fn insert<T: Any + Send + Sync>(
        &mut self,
        writer: &'static str,
        value: T,
    ) -> Result<(), FactError> {
        let key = TypeId::of::<T>();
        if let Some(existing) = self.entries.get(&key) {
            return Err(FactError {
                fact: std::any::type_name::<T>(),
                first_writer: existing.writer,
                second_writer: writer,
            });
        }
        self.entries.insert(
            key,
            FactEntry {
                writer,
                value: Box::new(value),
            },
        );
        Ok(())
    }

    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.entries
            .get(&TypeId::of::<T>())
            .and_then(|e| e.value.downcast_ref::<T>())
    }

    /// Mutable access, for the fact's own writer only.
    pub fn get_mut<T: Any + Send + Sync>(&mut self, writer: &'static str) -> Option<&mut T> {
        let entry = self.entries.get_mut(&TypeId::of::<T>())?;
        if entry.writer != writer {
            return None;
        }
        entry.value.downcast_mut::<T>()
    }

    /// Who wrote fact `T`.
    pub fn writer_of<T: Any + Send + Sync>(&self) -> Option<&'static str> {
        self.entries.get(&TypeId::of::<T>()).map(|e| e.writer)
    }
}

impl std::fmt::Debug for Facts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Facts")
            .field("count", &self.entries.len())
            .finish()
    }
}

/// One decision of one filter, as counted in `caregate_filter_decisions_total` and kept for the
/// audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionRecord {
    pub filter: &'static str,
    /// `deny`, `shadow_deny`, `answer` (a non-error local reply such as a CORS preflight) or
    /// `error` (the filter failed).
    pub result: &'static str,
    /// Stable reason code (`none` for allow).
    pub reason: &'static str,
}

/// Everything the gateway and the filters know about one request.
///
/// The gateway fills the identity of the request (request id, listener, channel, route, client
/// address, normalised path) before any filter runs; filters add typed [`Facts`].
#[derive(Debug)]
pub struct RequestCtx {
    pub request_id: String,
    pub listener: Arc<str>,
    pub channel: Channel,
    /// Name of the matched route (`None` until routing, or when nothing matched).
    pub route: Option<Arc<str>>,
    /// Whether the matched route serves FHIR (its errors are OperationOutcomes).
    pub fhir_route: bool,
    /// The real client address (the peer, or the forwarded client behind a trusted proxy).
    pub client_addr: Option<IpAddr>,
    /// The request method, upper case.
    pub method: String,
    /// The normalised path: what routing and every policy decision use, and what goes upstream.
    pub path: String,
    /// The raw query string (without `?`), or empty.
    pub query: String,
    pub facts: Facts,
    pub decisions: Vec<DecisionRecord>,
    pub started: Instant,
    /// The upstream attempt (1 for the first; retries count up). A retry replays the request
    /// body through the body hooks, so per-body state must be keyed by it.
    pub attempt: u32,
    whole_exchange: bool,
    preread: Option<PreRead>,
    response_refusal: Option<crate::LocalReply>,
}

/// A read of the stored resource a request is about to change, asked for by one filter
/// ([`RequestCtx::request_preread`]); its answer goes to every filter's
/// [`crate::Filter::preread_filter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreRead {
    pub writer: &'static str,
    /// The FHIR path below the route prefix, e.g. `/Observation/123`.
    pub path: String,
}

/// The answer to a [`PreRead`].
#[derive(Debug, Clone)]
pub struct Stored {
    pub status: u16,
    pub etag: Option<String>,
    /// The body (bounded by the gateway's exchange cap), decoded as sent.
    pub body: bytes::Bytes,
}

impl RequestCtx {
    pub fn new(listener: Arc<str>, channel: Channel) -> Self {
        RequestCtx {
            request_id: String::new(),
            listener,
            channel,
            route: None,
            fhir_route: false,
            client_addr: None,
            method: String::new(),
            path: String::new(),
            query: String::new(),
            facts: Facts::default(),
            decisions: Vec::new(),
            started: Instant::now(),
            attempt: 0,
            whole_exchange: false,
            preread: None,
            response_refusal: None,
        }
    }

    /// Ask the gateway to run this request as a whole exchange: it reads the whole request body
    /// and runs the body hooks on it before anything is forwarded, and reads the whole response
    /// and runs the response hooks on it before anything is released. A response hook that fails
    /// then turns into a clean error reply ([`RequestCtx::refuse_response`]) instead of an aborted
    /// connection. Bodies are bounded by the gateway's `server.max_exchange_body_bytes`.
    pub fn require_whole_exchange(&mut self) {
        self.whole_exchange = true;
    }

    /// Whether a filter asked for a whole exchange.
    pub fn whole_exchange(&self) -> bool {
        self.whole_exchange
    }

    /// Ask the gateway to read `path` (below the route prefix) from the same upstream before the
    /// request itself goes there, e.g. the stored resource an update would replace. Implies a
    /// whole exchange. One pre-read per request: a second one is refused.
    pub fn request_preread(&mut self, writer: &'static str, path: String) -> Result<(), FactError> {
        if let Some(p) = &self.preread {
            return Err(FactError {
                fact: "preread",
                first_writer: p.writer,
                second_writer: writer,
            });
        }
        self.whole_exchange = true;
        self.preread = Some(PreRead { writer, path });
        Ok(())
    }

    /// The pre-read asked for, if any.
    pub fn preread(&self) -> Option<&PreRead> {
        self.preread.as_ref()
    }

    /// A response hook that refuses the response sets the reply the client gets when nothing has
    /// been released yet (a whole exchange), then returns its error. The first refusal wins.
    pub fn refuse_response(&mut self, reply: crate::LocalReply) {
        if self.response_refusal.is_none() {
            self.response_refusal = Some(reply);
        }
    }

    /// The refusal set by a response hook, if any (taken by the gateway).
    pub fn take_response_refusal(&mut self) -> Option<crate::LocalReply> {
        self.response_refusal.take()
    }

    /// A context for unit tests of filters.
    pub fn for_test(method: &str, path: &str) -> Self {
        let mut ctx = RequestCtx::new(Arc::from("test"), Channel::Public);
        ctx.request_id = "test-request".to_string();
        ctx.method = method.to_string();
        ctx.path = path.to_string();
        ctx
    }

    /// The last reason code recorded for a denial, if any.
    pub fn deny_reason(&self) -> Option<&'static str> {
        self.decisions
            .iter()
            .rev()
            .find(|d| d.result != "allow")
            .map(|d| d.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Tenant(String);

    #[test]
    fn a_fact_has_one_writer() {
        let mut facts = Facts::default();
        assert!(facts.insert("tenant", Tenant("a".into())).is_ok());
        let err = facts.insert("other", Tenant("b".into()));
        assert_eq!(
            err,
            Err(FactError {
                fact: std::any::type_name::<Tenant>(),
                first_writer: "tenant",
                second_writer: "other"
            })
        );
        assert_eq!(facts.get::<Tenant>(), Some(&Tenant("a".into())));
        assert!(facts.get_mut::<Tenant>("other").is_none());
        assert!(facts.get_mut::<Tenant>("tenant").is_some());
        assert_eq!(facts.writer_of::<Tenant>(), Some("tenant"));
    }
}
