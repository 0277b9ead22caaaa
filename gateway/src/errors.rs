//! The error contract: the one place where a local reply becomes a response body.
//!
//! FHIR routes answer with a FHIR R4 `OperationOutcome` (`application/fhir+json`); other routes
//! with RFC 9457 `application/problem+json`. Both carry the stable reason code and the request
//! id, and nothing else from the request: no path, no query, no token, no upstream error text.

use serde_json::json;

/// The FHIR issue type that best fits a status.
fn fhir_issue_code(status: u16) -> &'static str {
    match status {
        400 => "invalid",
        401 => "login",
        403 => "forbidden",
        404 | 410 => "not-found",
        405 => "not-supported",
        408 | 504 => "timeout",
        413 | 414 | 431 => "too-long",
        429 => "throttled",
        503 => "transient",
        502 => "exception",
        _ => "processing",
    }
}

fn title(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

/// Render an error body. Returns (content type, body).
pub fn render(
    fhir: bool,
    status: u16,
    reason: &str,
    detail: &str,
    request_id: &str,
) -> (&'static str, Vec<u8>) {
    let detail = if detail.is_empty() {
        title(status)
    } else {
        detail
    };
    if fhir {
        let body = json!({
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": "error",
                "code": fhir_issue_code(status),
                "details": {
                    "coding": [{
                        "system": "https://caregate.dev/fhir/CodeSystem/reason",
                        "code": reason,
                    }],
                    "text": detail,
                },
                "diagnostics": format!("request id {request_id}"),
            }],
        });
        ("application/fhir+json", body.to_string().into_bytes())
    } else {
        let body = json!({
            "type": format!("https://caregate.dev/problems/{reason}"),
            "title": title(status),
            "status": status,
            "detail": detail,
            "reason": reason,
            "request_id": request_id,
        });
        ("application/problem+json", body.to_string().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn problem_json() {
        let (ct, body) = render(false, 404, "route_not_found", "", "rid-1");
        assert_eq!(ct, "application/problem+json");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], 404);
        assert_eq!(v["reason"], "route_not_found");
        assert_eq!(v["request_id"], "rid-1");
        assert_eq!(v["title"], "Not Found");
    }

    #[test]
    fn operation_outcome() {
        let (ct, body) = render(true, 503, "no_healthy_upstream", "no backend", "rid-2");
        assert_eq!(ct, "application/fhir+json");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert_eq!(v["issue"][0]["code"], "transient");
        assert_eq!(
            v["issue"][0]["details"]["coding"][0]["code"],
            "no_healthy_upstream"
        );
        assert!(v["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("rid-2"));
    }
}
