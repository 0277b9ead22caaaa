//! Local replies: what a filter answers instead of going upstream.

use http::{HeaderName, HeaderValue, StatusCode};
use std::borrow::Cow;

/// What the body of a local reply is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody {
    /// The error contract's body: a FHIR `OperationOutcome` on FHIR routes, RFC 9457
    /// `application/problem+json` elsewhere, with the reason code and request id. The gateway
    /// renders it; filters never write error bodies themselves.
    Error,
    /// No body (`Content-Length: 0`), e.g. a CORS preflight answer.
    Empty,
    /// A JSON document the filter serves itself (e.g. a SMART configuration).
    Json(bytes::Bytes),
    /// A body of another media type (e.g. an HL7 v2 acknowledgement), with its content type
    /// (boxed: a reply stays small where it is only passed along).
    Other(Box<TypedBody>),
}

/// A reply body with its media type ([`ReplyBody::Other`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypedBody {
    /// The `Content-Type` of the body.
    pub content_type: &'static str,
    /// The body, as sent.
    pub body: bytes::Bytes,
}

/// A reply the gateway writes on a filter's behalf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// The HTTP status of the reply.
    pub status: StatusCode,
    /// Stable snake_case reason code (`route_not_found`, `payload_too_large`, ...): what clients,
    /// metrics and the audit trail key on.
    pub reason: &'static str,
    /// A short human explanation. It goes into the error body, so it must never carry PHI,
    /// token contents or upstream error text.
    pub detail: Cow<'static, str>,
    /// Response headers the reply carries besides those the gateway sets itself (e.g.
    /// `WWW-Authenticate`, `Retry-After`, CORS headers), in order.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// What the body is.
    pub body: ReplyBody,
}

impl LocalReply {
    /// An error reply with the error contract's body ([`ReplyBody::Error`]) and no extra
    /// headers.
    pub fn error(
        status: StatusCode,
        reason: &'static str,
        detail: impl Into<Cow<'static, str>>,
    ) -> Self {
        LocalReply {
            status,
            reason,
            detail: detail.into(),
            headers: Vec::new(),
            body: ReplyBody::Error,
        }
    }

    /// A reply without a body ([`ReplyBody::Empty`]), with an empty detail and no extra
    /// headers.
    pub fn empty(status: StatusCode, reason: &'static str) -> Self {
        LocalReply {
            status,
            reason,
            detail: Cow::Borrowed(""),
            headers: Vec::new(),
            body: ReplyBody::Empty,
        }
    }

    /// Add a response header.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Whether this reply refuses the request (any 4xx/5xx).
    pub fn is_denial(&self) -> bool {
        self.status.is_client_error() || self.status.is_server_error()
    }

    /// A refusal the request itself earned (4xx), as opposed to a failure (5xx): only these are
    /// softened by `mode: shadow` on the response side, where a failure means the response
    /// could not be judged or processed and is never released.
    pub fn is_client_denial(&self) -> bool {
        self.status.is_client_error()
    }
}
