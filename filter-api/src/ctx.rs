//! Per-request state shared by the gateway and the filters.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// Which side of the organisation a listener serves (a listener's `channel` in the gateway
/// config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// Patient-facing apps (portal, mobile, telehealth), reachable from the internet.
    Public,
    /// Internal systems (EHR, lab interface engine, billing).
    Internal,
}

impl Channel {
    /// The channel as written in config: `public` or `internal`.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Public => "public",
            Channel::Internal => "internal",
        }
    }
}

/// Whether a listener or pool serves production or a sandbox environment (synthetic data,
/// sandbox-only credentials). A sandbox listener accepts only tokens of sandbox issuers, and a
/// token of a sandbox issuer is refused everywhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Environment {
    /// Real patients, real credentials (the default).
    #[default]
    Production,
    /// Synthetic data and sandbox-only credentials.
    Sandbox,
}

impl Environment {
    /// As written in config: `production` or `sandbox`.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Production => "production",
            Environment::Sandbox => "sandbox",
        }
    }
}

/// A refused second write of a single-writer fact ([`Facts::insert`]), or a refused second
/// pre-read ([`RequestCtx::request_preread`]). Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactError {
    /// The fact: its Rust type name, or `preread` for a second pre-read.
    pub fact: &'static str,
    /// The name ([`Writer::NAME`]) of the writer that wrote it first.
    pub first_writer: &'static str,
    /// The name of the writer whose write was refused.
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

/// The identity under which facts are written: a type, so a misspelt writer does not compile
/// (a string would silently match nothing). Each filter defines its own unit struct:
///
/// ```
/// use caregate_filter_api::ctx::Writer;
/// /// The writer of the consent filter's facts.
/// pub struct Consent;
/// impl Writer for Consent {
///     const NAME: &'static str = "consent";
/// }
/// ```
///
/// The built-in writers are in [`writers`]; [`writers::Gateway`] is reserved for the gateway's
/// own facts (the classification, the peer certificate), which filters only read.
///
/// A writer that does not exist is a compile error, not a silently skipped check:
///
/// ```compile_fail
/// use caregate_filter_api::ctx::{writers, Facts};
/// let mut facts = Facts::default();
/// let _ = facts.get_mut::<u8>(writers::JwtAuht); // misspelt
/// ```
pub trait Writer: 'static {
    /// The writer's name in error messages (the filter kind, by convention).
    const NAME: &'static str;
}

/// The writers of the built-in filters and of the gateway.
pub mod writers {
    macro_rules! writer {
        ($ty:ident, $name:literal, $doc:literal) => {
            #[doc = $doc]
            #[derive(Debug, Clone, Copy)]
            pub struct $ty;
            impl super::Writer for $ty {
                const NAME: &'static str = $name;
            }
        };
    }
    writer!(
        Gateway,
        "gateway",
        "The gateway itself: the FHIR classification and the verified peer certificate. \
         Filters read these facts; a filter that writes under this writer breaks the contract."
    );
    writer!(JwtAuth, "jwt_auth", "`jwt_auth`: the verified `Principal`.");
    writer!(Tenant, "tenant", "`tenant`: the verified `Tenant`.");
    writer!(
        SmartScopes,
        "smart_scopes",
        "`smart_scopes`: its grant and held bodies."
    );
    writer!(
        PatientCompartment,
        "patient_compartment",
        "`patient_compartment`: its per-request state."
    );
    writer!(
        FhirMask,
        "fhir_mask",
        "`fhir_mask`: the held response body."
    );
    writer!(
        FhirLinks,
        "fhir_links",
        "`fhir_links`: the held response body."
    );
    writer!(Cors, "cors", "`cors`: the origin to echo.");
    writer!(
        BreakGlass,
        "break_glass",
        "`break_glass`: the emergency-access decision."
    );
    writer!(
        RequestLimits,
        "request_limits",
        "`request_limits`: the body bytes seen."
    );
}

struct FactEntry {
    writer: TypeId,
    writer_name: &'static str,
    value: Box<dyn Any + Send + Sync>,
}

/// Typed facts about a request, each with exactly one writer.
///
/// A fact is keyed by its Rust type. [`Facts::insert`] refuses a second write, so two filters
/// can never disagree silently about, say, the principal or the tenant; only the fact's own
/// writer (a [`Writer`] type) gets mutable access. Filters that legitimately refine a fact own
/// that fact alone.
#[derive(Default)]
pub struct Facts {
    entries: HashMap<TypeId, FactEntry>,
}

impl Facts {
    /// Write fact `T` as `writer`, who then owns it ([`Facts::get_mut`]). Fails, leaving the
    /// first value in place, when it was written before (by anyone, the same writer included).
    pub fn insert<W: Writer, T: Any + Send + Sync>(
        &mut self,
        _writer: W,
        value: T,
    ) -> Result<(), FactError> {
        let key = TypeId::of::<T>();
        if let Some(existing) = self.entries.get(&key) {
            return Err(FactError {
                fact: std::any::type_name::<T>(),
                first_writer: existing.writer_name,
                second_writer: W::NAME,
            });
        }
        self.entries.insert(
            key,
            FactEntry {
                writer: TypeId::of::<W>(),
                writer_name: W::NAME,
                value: Box::new(value),
            },
        );
        Ok(())
    }

    /// Read fact `T`, whoever wrote it.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.entries
            .get(&TypeId::of::<T>())
            .and_then(|e| e.value.downcast_ref::<T>())
    }

    /// Mutable access to fact `T`, for its own writer only (`None` for anyone else).
    pub fn get_mut<T: Any + Send + Sync>(&mut self, writer: impl Writer) -> Option<&mut T> {
        let writer = type_id_of(&writer);
        let entry = self.entries.get_mut(&TypeId::of::<T>())?;
        if entry.writer != writer {
            return None;
        }
        entry.value.downcast_mut::<T>()
    }

    /// Replace fact `T` (or write it), keeping its writer: only for the sanctioned rewrite of a
    /// gateway-owned fact ([`RequestCtx::rewrite_fhir_request`]).
    fn replace_as_host<T: Any + Send + Sync>(&mut self, value: T) {
        let writer = match self.entries.get(&TypeId::of::<T>()) {
            Some(e) => (e.writer, e.writer_name),
            None => (TypeId::of::<writers::Gateway>(), writers::Gateway::NAME),
        };
        self.entries.insert(
            TypeId::of::<T>(),
            FactEntry {
                writer: writer.0,
                writer_name: writer.1,
                value: Box::new(value),
            },
        );
    }

    /// Who wrote fact `T` (the writer's [`Writer::NAME`]), or `None` when it was not written.
    pub fn writer_of<T: Any + Send + Sync>(&self) -> Option<&'static str> {
        self.entries.get(&TypeId::of::<T>()).map(|e| e.writer_name)
    }
}

/// Why [`RequestCtx::rewrite_fhir_request`] refused a rewrite (nothing was changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RewriteError {
    /// Not a FHIR route: there is no classification to keep in step.
    NotFhir,
    /// The request was rewritten already (by this writer).
    AlreadyRewritten(&'static str),
    /// The target is not a plain, normalised path below the FHIR base.
    BadTarget,
    /// The target is not a valid FHIR R4 interaction (the classification's reason code).
    NotClassified(&'static str),
}

impl std::fmt::Display for RewriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RewriteError::NotFhir => f.write_str("only a request on a FHIR route can be rewritten"),
            RewriteError::AlreadyRewritten(w) => {
                write!(f, "the request was rewritten by {w} already")
            }
            RewriteError::BadTarget => f.write_str("the new target is not a plain normalised path"),
            RewriteError::NotClassified(r) => {
                write!(f, "the new target is not a FHIR interaction ({r})")
            }
        }
    }
}

impl std::error::Error for RewriteError {}

/// The `TypeId` of a value's type (the type of an `impl Writer` argument has no name).
fn type_id_of<W: 'static>(_: &W) -> TypeId {
    TypeId::of::<W>()
}

impl std::fmt::Debug for Facts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Facts")
            .field("count", &self.entries.len())
            .finish()
    }
}

/// One decision of one filter, as counted in `caregate_filter_decisions_total` and kept for the
/// audit record ([`RequestInfo::decisions`]). Plain allows are counted but not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionRecord {
    /// The deciding filter's kind, or `gateway` for the gateway's own refusals (request hygiene,
    /// routing, FHIR classification, body limits, overload, ...).
    pub filter: &'static str,
    /// `deny`, `shadow_deny`, `answer` (a non-error local reply such as a CORS preflight) or
    /// `error` (the filter failed).
    pub result: &'static str,
    /// The reply's stable reason code (`internal_error` for an `error`).
    pub reason: &'static str,
}

/// What the gateway (the host) knows about a request: its identity, route, normalised target,
/// timing and the decisions so far. Filters read it through [`RequestCtx`] (which dereferences
/// to it) and cannot change it: the host sets it ([`RequestCtx::host`]), the chain runner records
/// the decisions, and [`RequestCtx::rewrite_fhir_request`] is the one way to change the target.
///
/// A filter that assigns one of these fields does not compile:
///
/// ```compile_fail
/// fn narrow(ctx: &mut caregate_filter_api::RequestCtx) {
///     ctx.path = "/fhir/Patient/other".to_string(); // read-only to filters
/// }
/// ```
///
/// (Reading is plain field access: `ctx.path`, `ctx.method`, `ctx.request_id`.)
#[derive(Debug)]
pub struct RequestInfo {
    /// The request id: the client's `X-Request-Id` when it is short and plain (at most 128
    /// characters of `A-Z a-z 0-9 - _ . :`), else a new random one. It names the request in
    /// logs, error bodies and the audit record, and goes upstream and back to the client in
    /// `X-Request-Id`.
    pub request_id: String,
    /// The name of the listener that accepted the request.
    pub listener: Arc<str>,
    /// The channel of that listener.
    pub channel: Channel,
    /// The environment of that listener (production unless the listener is a sandbox).
    pub environment: Environment,
    /// Name of the matched route (`None` until routing, or when nothing matched).
    pub route: Option<Arc<str>>,
    /// The API and version the matched route serves (`apis:` in the gateway config), if any:
    /// `(api, version)`.
    pub api_version: Option<(Arc<str>, Arc<str>)>,
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
    /// On a FHIR route, the route's path prefix (the FHIR base below which requests are
    /// classified), set by the gateway; `None` elsewhere.
    pub fhir_base: Option<String>,
    /// The writer that rewrote the request with [`RequestCtx::rewrite_fhir_request`], if any
    /// (kept for the audit record).
    pub rewritten_by: Option<&'static str>,
    /// Every decision so far but plain allows, in order: the filters' (recorded by the
    /// [`Chain`](crate::chain::Chain)) and the gateway's own refusals. Kept for the audit
    /// record.
    pub decisions: Vec<DecisionRecord>,
    /// When the gateway started handling the request: the request's duration in the access
    /// log, metrics and traces is measured from it.
    pub started: Instant,
    /// The upstream attempt: 0 until a backend was picked (so 0 in `request_filter`), 1 for the
    /// first, counting up on retries. A retry replays the request body through the body hooks,
    /// so per-body state must be keyed by it.
    pub attempt: u32,
}

/// Everything the gateway and the filters know about one request.
///
/// The gateway fills the identity of the request (request id, listener, channel, route, client
/// address, normalised path: a [`RequestInfo`], which filters read through this type's `Deref`
/// but cannot assign) before any filter runs; filters add typed [`Facts`].
#[derive(Debug)]
pub struct RequestCtx {
    pub(crate) info: RequestInfo,
    /// Typed facts about the request, each with one writer.
    pub facts: Facts,
    whole_exchange: bool,
    preread: Option<PreRead>,
    response_refusal: Option<crate::LocalReply>,
    /// Where the request stands in its chain: written only by [`crate::chain::Chain`].
    pub(crate) progress: crate::chain::Progress,
}

impl std::ops::Deref for RequestCtx {
    type Target = RequestInfo;

    /// The gateway-owned part of the request, read-only to filters.
    fn deref(&self) -> &RequestInfo {
        &self.info
    }
}

/// A read of the stored resource a request is about to change, asked for by one filter
/// ([`RequestCtx::request_preread`]); its answer goes to every filter's
/// [`crate::Filter::preread_filter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreRead {
    /// The name ([`Writer::NAME`]) of the writer that asked for it.
    pub writer: &'static str,
    /// The FHIR path below the route prefix, e.g. `/Observation/123`.
    pub path: String,
}

/// The answer to a [`PreRead`]: the upstream's answer to a `GET` of the pre-read path
/// (`Accept: application/fhir+json`), passed to [`crate::Filter::preread_filter`].
#[derive(Debug, Clone)]
pub struct Stored {
    /// The upstream's status (e.g. 200, or 404 when nothing is stored there).
    pub status: u16,
    /// The answer's `ETag` header, if any.
    pub etag: Option<String>,
    /// The body (bounded by the gateway's exchange cap), as sent: the gateway asks for no
    /// content coding.
    pub body: bytes::Bytes,
}

impl RequestCtx {
    /// A context for a request on the listener `listener` of `channel`, with every other field
    /// empty (no route, no facts, no decisions, attempt 0) and `started` now. The gateway fills
    /// the request's identity before any filter runs; tests may use [`RequestCtx::for_test`].
    pub fn new(listener: Arc<str>, channel: Channel) -> Self {
        RequestCtx {
            info: RequestInfo {
                request_id: String::new(),
                listener,
                channel,
                environment: Environment::Production,
                route: None,
                api_version: None,
                fhir_route: false,
                client_addr: None,
                method: String::new(),
                path: String::new(),
                query: String::new(),
                fhir_base: None,
                rewritten_by: None,
                decisions: Vec::new(),
                started: Instant::now(),
                attempt: 0,
            },
            facts: Facts::default(),
            whole_exchange: false,
            preread: None,
            response_refusal: None,
            progress: crate::chain::Progress::default(),
        }
    }

    /// The gateway-owned part of the request, to set: **for the host only** (the gateway, a
    /// test harness). A filter reads these fields through `Deref` and must not change them; the
    /// target changes only through [`RequestCtx::rewrite_fhir_request`], which keeps the
    /// classification in step.
    pub fn host(&mut self) -> &mut RequestInfo {
        &mut self.info
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
    pub fn request_preread<W: Writer>(
        &mut self,
        _writer: W,
        path: String,
    ) -> Result<(), FactError> {
        if let Some(p) = &self.preread {
            return Err(FactError {
                fact: "preread",
                first_writer: p.writer,
                second_writer: W::NAME,
            });
        }
        self.whole_exchange = true;
        self.preread = Some(PreRead {
            writer: W::NAME,
            path,
        });
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

    /// Rewrite the FHIR request that goes upstream — and its classification with it, in one
    /// step — so that what the filters after this one judge is exactly what the backend gets.
    /// The one sanctioned way for a filter to change the request target (for example to narrow a
    /// search to the caller's patient): `path_and_query` is the new target below the FHIR base
    /// (`/Observation?code=x&patient=A`).
    ///
    /// The new target is classified as the gateway classifies requests; a target that is not a
    /// valid FHIR R4 interaction, or that is not a plain normalised path (dot segments, empty
    /// segments, encoded separators, `;`, non-ASCII), is refused and nothing changes. Only on a
    /// FHIR route, from a request hook. The classification fact stays the gateway's; the
    /// rewriter is recorded in [`RequestCtx::rewritten_by`] (one rewrite per request).
    pub fn rewrite_fhir_request<W: Writer>(
        &mut self,
        _writer: W,
        req: &mut crate::RequestHeader,
        path_and_query: &str,
    ) -> Result<(), RewriteError> {
        let Some(base) = self.fhir_base.clone() else {
            return Err(RewriteError::NotFhir);
        };
        if let Some(first) = self.rewritten_by {
            return Err(RewriteError::AlreadyRewritten(first));
        }
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, q),
            None => (path_and_query, ""),
        };
        let plain = path.starts_with('/')
            && path.len() > 1
            && !path[1..]
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
            && path
                .bytes()
                .chain(query.bytes())
                .all(|b| b.is_ascii_graphic() && b != b'\\' && b != b';' && b != b'#');
        let lower = path_and_query.to_ascii_lowercase();
        if !plain
            || ["%2f", "%5c", "%2e", "%00"]
                .iter()
                .any(|e| lower.contains(e))
        {
            return Err(RewriteError::BadTarget);
        }
        let content_type = req
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let class =
            caregate_fhir::classify(&self.method, path, query, content_type.as_deref(), None)
                .map_err(|e| RewriteError::NotClassified(e.reason()))?;
        let full = if base == "/" {
            path.to_string()
        } else {
            format!("{base}{path}")
        };
        let target = if query.is_empty() {
            full.clone()
        } else {
            format!("{full}?{query}")
        };
        let uri = http::Uri::try_from(target.as_str()).map_err(|_| RewriteError::BadTarget)?;
        req.set_uri(uri);
        self.info.path = full;
        self.info.query = query.to_string();
        self.facts.replace_as_host(class);
        self.info.rewritten_by = Some(W::NAME);
        Ok(())
    }

    /// Where the request stands in its chain (which hooks ran).
    pub fn progress(&self) -> crate::chain::Progress {
        self.progress
    }

    /// A context for unit tests of filters: listener `test` on the public channel, request id
    /// `test-request`, the given method and path (no query, no route, not a FHIR route).
    pub fn for_test(method: &str, path: &str) -> Self {
        let mut ctx = RequestCtx::new(Arc::from("test"), Channel::Public);
        let info = ctx.host();
        info.request_id = "test-request".to_string();
        info.method = method.to_string();
        info.path = path.to_string();
        ctx
    }

    /// The reason code of the last decision kept in [`RequestInfo::decisions`] (a `deny`,
    /// `shadow_deny`, `answer` or `error`), if any: the reason the access log, the audit record
    /// and the trace name when the gateway has no error reason of its own.
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
        struct Other;
        impl Writer for Other {
            const NAME: &'static str = "other";
        }
        assert!(facts.insert(writers::Tenant, Tenant("a".into())).is_ok());
        let err = facts.insert(Other, Tenant("b".into()));
        assert_eq!(
            err,
            Err(FactError {
                fact: std::any::type_name::<Tenant>(),
                first_writer: "tenant",
                second_writer: "other"
            })
        );
        assert_eq!(facts.get::<Tenant>(), Some(&Tenant("a".into())));
        assert!(facts.get_mut::<Tenant>(Other).is_none());
        assert!(facts.get_mut::<Tenant>(writers::Tenant).is_some());
        assert_eq!(facts.writer_of::<Tenant>(), Some("tenant"));
    }
}
