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

/// The body is about to be rewritten at its end: its length is no longer known, so the response
/// goes out chunked.
pub fn will_rewrite(resp: &mut ResponseHeader) {
    resp.remove_header(&header::CONTENT_LENGTH);
    let _ = resp.insert_header(header::TRANSFER_ENCODING, "chunked");
}

/// Take a body chunk into `held`. Returns false, appending nothing, when `held` would grow past
/// `max` bytes.
pub fn hold(held: &mut Vec<u8>, chunk: &mut Option<bytes::Bytes>, max: usize) -> bool {
    if let Some(c) = chunk.take() {
        if held.len() + c.len() > max {
            return false;
        }
        held.extend_from_slice(&c);
    }
    true
}
