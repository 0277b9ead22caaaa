//! The error returned by [`classify`](crate::classify).

use std::fmt;

/// Why a request could not be classified; the stable code is [`ClassifyError::reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The method, the path shape or the body's content type does not fit any FHIR R4 interaction.
    BadRequest,
    /// A segment in the place of a resource type (or a `_type`/`_include` value, or a `_has` or
    /// type-modifier type) is not an R4 resource type.
    UnknownResourceType,
    /// A logical id or version id is not `[A-Za-z0-9\-\.]{1,64}` (or is the dot segment `.` / `..`).
    BadId,
    /// A search or operation parameter is malformed (percent-encoding, name, modifier, chain, `_has`).
    BadParam,
}

impl ErrorKind {
    /// The stable code: `bad_request`, `unknown_resource_type`, `bad_id` or `bad_param`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::UnknownResourceType => "unknown_resource_type",
            ErrorKind::BadId => "bad_id",
            ErrorKind::BadParam => "bad_param",
        }
    }
}

/// A request that is not valid FHIR R4 REST.
///
/// The detail is a fixed sentence chosen by the parser: it never contains ids, parameter values or any
/// other part of the request, so it is safe to log and to return to the client (no PHI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClassifyError {
    kind: ErrorKind,
    detail: &'static str,
}

impl ClassifyError {
    pub(crate) const fn new(kind: ErrorKind, detail: &'static str) -> Self {
        ClassifyError { kind, detail }
    }
    pub(crate) const fn bad_request(detail: &'static str) -> Self {
        Self::new(ErrorKind::BadRequest, detail)
    }
    pub(crate) const fn unknown_type(detail: &'static str) -> Self {
        Self::new(ErrorKind::UnknownResourceType, detail)
    }
    pub(crate) const fn bad_id(detail: &'static str) -> Self {
        Self::new(ErrorKind::BadId, detail)
    }
    pub(crate) const fn bad_param(detail: &'static str) -> Self {
        Self::new(ErrorKind::BadParam, detail)
    }

    /// The stable reason code (`bad_request`, `unknown_resource_type`, `bad_id`, `bad_param`), for
    /// metrics labels, audit records and `OperationOutcome` details.
    pub fn reason(&self) -> &'static str {
        self.kind.as_str()
    }

    /// The error class.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// A fixed human-readable sentence; never echoes request data.
    pub fn detail(&self) -> &'static str {
        self.detail
    }
}

impl fmt::Display for ClassifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason(), self.detail)
    }
}

impl std::error::Error for ClassifyError {}
