//! Small shared checks of the filters that read bodies (FHIR JSON, form searches).

use crate::{RequestHeader, ResponseHeader};
use http::header;

/// Whether a response declares a JSON body (`application/fhir+json`, `application/json`, ...).
pub fn is_json(resp: &ResponseHeader) -> bool {
    resp.headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.to_ascii_lowercase().contains("json"))
        .unwrap_or(false)
}

/// Whether a response's body is in a content coding other than `identity`.
pub fn is_encoded(resp: &ResponseHeader) -> bool {
    resp.headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.as_bytes() != b"identity")
        .unwrap_or(false)
}

/// Whether a request carries a form-encoded body.
pub fn is_form(req: &RequestHeader) -> bool {
    req.headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        })
        .unwrap_or(false)
}
