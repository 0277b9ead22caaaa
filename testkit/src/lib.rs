//! Unit-test caregate filters through the real chain runner, with no sockets.
//!
//! A [`Harness`] holds a chain — filters built from a YAML snippet by a registry (the built-in
//! one, or your own with your kinds registered), or filter objects you built — and drives
//! requests through it with [`caregate_filters::chain::Chain`], the same runner the gateway
//! uses: modes, hook order, "each hook once", decision counting and refusals as values are
//! exactly the gateway's. Each [`Exchange`] is one request: give it headers, a verified caller
//! and facts, run its phases, and inspect the outcome, the reason code, the header edits, the
//! facts and the decisions the gateway would have counted in
//! `caregate_filter_decisions_total`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use caregate_testkit::{principal, Harness};
//! // A filter that cannot be built: the error names its place, as `caregate check` does.
//! let err = Harness::builtin("- kind: jwt_auth").err().unwrap_or_default();
//! assert!(err.starts_with("filters[0] (jwt_auth):"), "{err}");
//!
//! let h = Harness::builtin("- kind: smart_scopes").unwrap().fhir("/fhir");
//! let mut x = h
//!     .request("GET", "/fhir/Observation?patient=A")
//!     .principal(principal("dr-x").scopes("user/Patient.rs"));
//! let out = x.run_request().await;
//! assert_eq!(out.status(), Some(403));
//! assert_eq!(out.reason(), Some("insufficient_scope"));
//! assert_eq!(x.decisions(), [("smart_scopes", "deny", "insufficient_scope")]);
//! # }
//! ```
//!
//! Set-up mistakes (a header the request cannot hold, a fact written twice, a bad status) panic
//! with the reason: they are bugs of the test, not outcomes of the chain.
#![warn(missing_docs)]

use bytes::Bytes;
use caregate_filters::chain::{Chain, DecisionSink, Verdict};
use caregate_filters::ctx::{writers, Writer};
use caregate_filters::identity::{AuthMethod, Principal};
use caregate_filters::{
    BuildContext, Channel, Filter, FilterRegistry, FilterSpec, LocalReply, RequestCtx,
    RequestHeader, ResponseHeader, Stored,
};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// A decision as the gateway counts it: `(filter kind, result, reason)`.
pub type Counted = (&'static str, &'static str, &'static str);

#[derive(Default)]
struct Collect(Mutex<Vec<Counted>>);

impl DecisionSink for Collect {
    fn record(&self, filter: &'static str, result: &'static str, reason: &'static str) {
        if let Ok(mut v) = self.0.lock() {
            v.push((filter, result, reason));
        }
    }
}

/// A chain under test, and how its requests are set up (default: not a FHIR route, public
/// channel).
pub struct Harness {
    filters: Vec<Arc<dyn Filter>>,
    fhir_prefix: Option<String>,
    channel: Channel,
}

impl Harness {
    /// A chain of filters you built.
    pub fn from_filters(filters: Vec<Arc<dyn Filter>>) -> Harness {
        Harness {
            filters,
            fhir_prefix: None,
            channel: Channel::Public,
        }
    }

    /// A chain built from a YAML list of filter specs (`- kind: ...\n  config: {...}`), as a
    /// route's `filters:` would be, by `registry` with `cx` (the organisation-wide sections:
    /// `auth`, `tenants`, the folder relative paths resolve against). The error names the
    /// filter's place and kind, as `caregate check` does (`filters[0] (jwt_auth): ...`), or
    /// starts with `filters:` when the YAML is not a list of filter specs.
    pub fn from_yaml_with(
        registry: &FilterRegistry,
        cx: &BuildContext,
        yaml: &str,
    ) -> Result<Harness, String> {
        let specs: Vec<FilterSpec> =
            serde_yaml::from_str(yaml).map_err(|e| format!("filters: {e}"))?;
        let mut filters = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let f = registry
                .build(spec, cx)
                .map_err(|e| format!("filters[{i}] ({}): {e}", spec.kind))?;
            filters.push(f);
        }
        Ok(Harness::from_filters(filters))
    }

    /// [`Harness::from_yaml_with`] with a default build context.
    pub fn from_yaml(registry: &FilterRegistry, yaml: &str) -> Result<Harness, String> {
        Harness::from_yaml_with(registry, &BuildContext::default(), yaml)
    }

    /// [`Harness::from_yaml`] with the built-in registry.
    pub fn builtin(yaml: &str) -> Result<Harness, String> {
        Harness::from_yaml(&FilterRegistry::builtin(), yaml)
    }

    /// Serve FHIR below `prefix` (`/fhir`): each request below it is classified as the gateway
    /// classifies it on a `fhir: true` route (the classification fact, written by the gateway),
    /// and an invalid one is refused with a 400 and the gateway's reason code before any filter
    /// runs (counted as a `gateway` `deny`). Classification happens when the request phase
    /// runs ([`Exchange::run_request`]), so headers set before it (`Content-Type`) count.
    pub fn fhir(mut self, prefix: &str) -> Harness {
        self.fhir_prefix = Some(prefix.trim_end_matches('/').to_string());
        self
    }

    /// The listener's channel (default public).
    pub fn channel(mut self, channel: Channel) -> Harness {
        self.channel = channel;
        self
    }

    /// The chain's filters.
    pub fn filters(&self) -> &[Arc<dyn Filter>] {
        &self.filters
    }

    /// A request through the chain: `uri` is the path and query as the gateway normalised it.
    /// The method is upper-cased; the context has listener and route `test`, request id
    /// `testkit-request`, the harness's channel, and attempt 1 (as once a backend is picked).
    /// A `uri` the request header cannot hold leaves the header's target at `/` (the context
    /// still gets the path and query).
    pub fn request(&self, method: &str, uri: &str) -> Exchange<'_> {
        let (path, query) = match uri.split_once('?') {
            Some((p, q)) => (p, q),
            None => (uri, ""),
        };
        let mut ctx = RequestCtx::new(Arc::from("test"), self.channel);
        ctx.host().request_id = "testkit-request".to_string();
        ctx.host().method = method.to_ascii_uppercase();
        ctx.host().path = path.to_string();
        ctx.host().query = query.to_string();
        ctx.host().route = Some(Arc::from("test"));
        ctx.host().attempt = 1;
        let req = RequestHeader::build(ctx.method.as_str(), uri.as_bytes(), None).ok();
        Exchange {
            harness: self,
            req: req.unwrap_or_else(|| empty_request(&ctx.method)),
            ctx,
            sink: Collect::default(),
            classified: false,
        }
    }
}

fn empty_request(method: &str) -> RequestHeader {
    // A request the header type cannot hold: the harness still runs, on `GET /`.
    RequestHeader::build(method, b"/", None)
        .or_else(|_| RequestHeader::build("GET", b"/", None))
        .unwrap_or_else(|_| unreachable_request())
}

#[allow(clippy::panic)]
fn unreachable_request() -> RequestHeader {
    panic!("the testkit cannot build `GET /`")
}

/// What a phase decided.
#[derive(Debug)]
pub struct Outcome {
    reply: Option<LocalReply>,
}

impl Outcome {
    /// The phase went on (no reply).
    pub fn is_continue(&self) -> bool {
        self.reply.is_none()
    }

    /// The reply's reason code, when the phase answered.
    pub fn reason(&self) -> Option<&'static str> {
        self.reply.as_ref().map(|r| r.reason)
    }

    /// The reply's status, when the phase answered.
    pub fn status(&self) -> Option<u16> {
        self.reply.as_ref().map(|r| r.status.as_u16())
    }

    /// The reply, when the phase answered.
    pub fn reply(&self) -> Option<&LocalReply> {
        self.reply.as_ref()
    }
}

impl From<Verdict> for Outcome {
    fn from(v: Verdict) -> Self {
        Outcome { reply: v.reply() }
    }
}

/// A response after the response hooks ran (a whole exchange: nothing was released before).
#[derive(Debug)]
pub struct Response {
    /// The header the client would get: the upstream's as the hooks left it, or the refusal's
    /// as the hooks that had not run yet left it.
    pub header: ResponseHeader,
    /// The body the client would get (the upstream's as the hooks left it), or empty for a
    /// refusal (the gateway renders the refusal's error body).
    pub body: Bytes,
    /// The refusal that replaced the upstream response, if any.
    pub refused: Option<LocalReply>,
}

impl Response {
    /// The status the client gets.
    pub fn status(&self) -> u16 {
        self.header.status.as_u16()
    }

    /// The refusal's reason code, if the response was refused.
    pub fn reason(&self) -> Option<&'static str> {
        self.refused.as_ref().map(|r| r.reason)
    }

    /// A header of the response, as text (`None` when absent or not visible ASCII).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One request through the harness's chain.
pub struct Exchange<'h> {
    harness: &'h Harness,
    /// The request header the filters see and edit (what goes upstream).
    pub req: RequestHeader,
    /// The request's context: facts, decisions, the gateway's fields.
    pub ctx: RequestCtx,
    sink: Collect,
    classified: bool,
}

impl<'h> Exchange<'h> {
    /// Add a request header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        if let Err(e) = self.req.append_header(name.to_string(), value) {
            panic_with(&format!("header {name}: {e}"));
        }
        self
    }

    /// The verified caller, as `jwt_auth` would have written it (the [`Principal`] fact, under
    /// [`writers::JwtAuth`]). Accepts a [`PrincipalBuilder`] or a [`Principal`].
    pub fn principal(mut self, p: impl Into<Principal>) -> Self {
        if let Err(e) = self.ctx.facts.insert(writers::JwtAuth, p.into()) {
            panic_with(&e.to_string());
        }
        self
    }

    /// Any fact, under its writer (a second write of the same fact type panics).
    pub fn fact<W: Writer, T: std::any::Any + Send + Sync>(mut self, writer: W, value: T) -> Self {
        if let Err(e) = self.ctx.facts.insert(writer, value) {
            panic_with(&e.to_string());
        }
        self
    }

    /// The real client address ([`RequestCtx::client_addr`]; unset by default).
    pub fn client(mut self, addr: IpAddr) -> Self {
        self.ctx.host().client_addr = Some(addr);
        self
    }

    /// The decisions the gateway would have counted so far, in order, plain allows included
    /// (unlike [`RequestCtx::decisions`]).
    pub fn decisions(&self) -> Vec<Counted> {
        self.sink.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Classify the request as the gateway does on a FHIR route (once).
    fn classify(&mut self) -> Option<Outcome> {
        if self.classified {
            return None;
        }
        self.classified = true;
        let prefix = self.harness.fhir_prefix.as_deref()?;
        let below = self.ctx.path.strip_prefix(prefix)?.to_string();
        if !(below.is_empty() || below.starts_with('/')) {
            return None;
        }
        let info = self.ctx.host();
        info.fhir_route = true;
        info.fhir_base = Some(if prefix.is_empty() { "/" } else { prefix }.to_string());
        let content_type = self
            .req
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        match caregate_fhir::classify(
            &self.ctx.method,
            if below.is_empty() { "/" } else { &below },
            &self.ctx.query,
            content_type.as_deref(),
            None,
        ) {
            Ok(class) => {
                if let Err(e) = self.ctx.facts.insert(writers::Gateway, class) {
                    panic_with(&e.to_string());
                }
                None
            }
            Err(e) => {
                self.sink.record("gateway", "deny", e.reason());
                Some(Outcome {
                    reply: Some(LocalReply::error(
                        http::StatusCode::BAD_REQUEST,
                        e.reason(),
                        "not a valid FHIR R4 REST request",
                    )),
                })
            }
        }
    }

    /// The request phase: on a FHIR harness the classification first, then the request header
    /// hooks in chain order (once).
    pub async fn run_request(&mut self) -> Outcome {
        if let Some(refused) = self.classify() {
            return refused;
        }
        let filters = &self.harness.filters;
        let chain = Chain::new(filters, &self.sink);
        chain.request(&mut self.req, &mut self.ctx).await.into()
    }

    /// A pre-read's answer (`status`, `ETag`, body) through the pre-read hooks of the filters
    /// the request phase reached.
    pub fn preread(&mut self, status: u16, etag: Option<&str>, body: &[u8]) -> Outcome {
        let stored = Stored {
            status,
            etag: etag.map(str::to_string),
            body: Bytes::copy_from_slice(body),
        };
        let filters = &self.harness.filters;
        Chain::new(filters, &self.sink)
            .preread(&stored, &mut self.ctx)
            .into()
    }

    /// The whole request body through the body hooks (one chunk, end of stream; an empty body is
    /// passed as no chunk); returns the outcome and the body as the hooks left it (what goes
    /// upstream).
    pub fn body(&mut self, body: &[u8]) -> (Outcome, Bytes) {
        let mut chunk = (!body.is_empty()).then(|| Bytes::copy_from_slice(body));
        let filters = &self.harness.filters;
        let v = Chain::new(filters, &self.sink).request_body(&mut chunk, true, &mut self.ctx);
        (v.into(), chunk.unwrap_or_default())
    }

    /// The upstream request hooks on a copy of [`Exchange::req`]: what the backend would get,
    /// except for what the gateway sets before these hooks run (the upstream URI, the verified
    /// identity headers, request id and forwarding headers), which the copy does not carry.
    /// `Err` is the failing filter's error, as text.
    pub async fn upstream_request(&mut self) -> Result<RequestHeader, String> {
        let mut up = self.req.clone();
        let filters = &self.harness.filters;
        Chain::new(filters, &self.sink)
            .upstream_request(&mut up, &mut self.ctx)
            .await
            .map_err(|e| e.to_string())?;
        Ok(up)
    }

    /// A whole upstream response through the response hooks (reverse order, each filter's
    /// header hook then its body hook), as in a whole exchange. A refusal passes through the
    /// hooks that have not run, on the refusal's status, as the gateway's reply would.
    pub fn respond(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let mut header = response_header(status, headers);
        let mut out = Some(Bytes::copy_from_slice(body));
        let verdict = {
            let filters = &self.harness.filters;
            Chain::new(filters, &self.sink).whole_response(&mut header, &mut out, &mut self.ctx)
        };
        match verdict {
            Verdict::Continue => Response {
                header,
                body: out.unwrap_or_default(),
                refused: None,
            },
            Verdict::Reply(reply) => {
                let header = self.reply(&reply);
                Response {
                    header,
                    body: Bytes::new(),
                    refused: Some(reply),
                }
            }
        }
    }

    /// A local reply (for example the request phase's refusal) through the response hooks that
    /// have not run yet, as the gateway sends it.
    pub fn reply(&mut self, reply: &LocalReply) -> ResponseHeader {
        let mut header = response_header(reply.status.as_u16(), &[]);
        for (name, value) in &reply.headers {
            let _ = header.append_header(name.clone(), value.clone());
        }
        Chain::new(&self.harness.filters, &self.sink).local_reply(&mut header, &mut self.ctx);
        header
    }

    /// The logging hooks (always the last phase).
    pub fn logging(&self) {
        Chain::new(&self.harness.filters, &self.sink).logging(&self.ctx);
    }
}

fn response_header(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
    let mut h = match ResponseHeader::build(status, None) {
        Ok(h) => h,
        Err(e) => panic_with(&format!("status {status}: {e}")),
    };
    for (name, value) in headers {
        if let Err(e) = h.append_header(name.to_string(), *value) {
            panic_with(&format!("header {name}: {e}"));
        }
    }
    h
}

/// Test set-up mistakes end the test, with the reason.
#[allow(clippy::panic)]
fn panic_with(why: &str) -> ! {
    panic!("caregate-testkit: {why}")
}

/// A verified caller for tests: `principal("dr-x").roles(&["clinician"]).scopes("user/*.rs")`.
///
/// It starts as a token caller ([`AuthMethod::Token`]) with issuer `https://idp.test`, client id
/// `test-app`, and no roles, scopes, tenant, patient, FHIR user, system or expiry.
pub fn principal(subject: &str) -> PrincipalBuilder {
    PrincipalBuilder(Principal {
        subject: subject.to_string(),
        issuer: Some("https://idp.test".to_string()),
        client_id: Some("test-app".to_string()),
        roles: Vec::new(),
        scopes: Vec::new(),
        tenant: None,
        patient: None,
        fhir_user: None,
        method: AuthMethod::Token,
        system: None,
        expires_at: None,
    })
}

/// Builds a [`Principal`] (see [`principal`]).
#[derive(Debug, Clone)]
pub struct PrincipalBuilder(Principal);

impl PrincipalBuilder {
    /// The caller's roles.
    pub fn roles(mut self, roles: &[&str]) -> Self {
        self.0.roles = roles.iter().map(|r| r.to_string()).collect();
        self
    }
    /// The caller's scopes, space-separated as in a token.
    pub fn scopes(mut self, scopes: &str) -> Self {
        self.0.scopes = scopes.split_whitespace().map(str::to_string).collect();
        self
    }
    /// The caller's tenant claim.
    pub fn tenant(mut self, tenant: &str) -> Self {
        self.0.tenant = Some(tenant.to_string());
        self
    }
    /// A patient context (a SMART patient-facing token).
    pub fn patient(mut self, patient: &str) -> Self {
        self.0.patient = Some(patient.to_string());
        self
    }
    /// The OAuth client id.
    pub fn client_id(mut self, client_id: &str) -> Self {
        self.0.client_id = Some(client_id.to_string());
        self
    }
    /// The token's issuer.
    pub fn issuer(mut self, issuer: &str) -> Self {
        self.0.issuer = Some(issuer.to_string());
        self
    }
    /// The finished principal.
    pub fn build(self) -> Principal {
        self.0
    }
}

impl From<PrincipalBuilder> for Principal {
    fn from(b: PrincipalBuilder) -> Principal {
        b.0
    }
}
