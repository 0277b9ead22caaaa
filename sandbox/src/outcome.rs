//! Errors as FHIR `OperationOutcome`s, and HTTP reason phrases.

use serde_json::{json, Value};

/// A failed request: HTTP status, FHIR issue type code and a diagnostic.
#[derive(Debug, Clone)]
pub(crate) struct Fail {
    pub status: u16,
    pub code: &'static str,
    pub msg: String,
}

impl Fail {
    pub fn new(status: u16, code: &'static str, msg: impl Into<String>) -> Fail {
        Fail {
            status,
            code,
            msg: msg.into(),
        }
    }
    pub fn bad_request(msg: impl Into<String>) -> Fail {
        Fail::new(400, "invalid", msg)
    }
    pub fn not_supported(msg: impl Into<String>) -> Fail {
        Fail::new(400, "not-supported", msg)
    }
    pub fn not_found(msg: impl Into<String>) -> Fail {
        Fail::new(404, "not-found", msg)
    }
    pub fn gone(msg: impl Into<String>) -> Fail {
        Fail::new(410, "deleted", msg)
    }
    pub fn method_not_allowed(method: &str, path: &str) -> Fail {
        Fail::new(
            405,
            "not-supported",
            format!("method {method} is not allowed on '{path}'"),
        )
    }
    /// 412: an `If-Match` precondition does not hold.
    pub fn precondition_failed(msg: impl Into<String>) -> Fail {
        Fail::new(412, "conflict", msg)
    }
    /// 415: a body in a media type the sandbox does not handle.
    pub fn unsupported_media_type(msg: impl Into<String>) -> Fail {
        Fail::new(415, "not-supported", msg)
    }
    /// 422: a well-formed request that cannot be processed (e.g. a JSON
    /// Patch that does not apply).
    pub fn unprocessable(msg: impl Into<String>) -> Fail {
        Fail::new(422, "processing", msg)
    }
    pub fn internal(msg: impl Into<String>) -> Fail {
        Fail::new(500, "exception", msg)
    }

    /// The `OperationOutcome` describing this failure.
    pub fn outcome(&self) -> Value {
        let severity = if self.status >= 500 { "fatal" } else { "error" };
        outcome(severity, self.code, &self.msg)
    }
}

/// An `OperationOutcome` with one issue.
pub(crate) fn outcome(severity: &str, code: &str, diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]
    })
}

/// `"201 Created"`-style status line used in batch/transaction responses.
pub(crate) fn status_line(status: u16) -> String {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        412 => "Precondition Failed",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        500 => "Internal Server Error",
        _ => "",
    };
    if reason.is_empty() {
        status.to_string()
    } else {
        format!("{status} {reason}")
    }
}
