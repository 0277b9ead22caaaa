//! The entries of a batch or transaction Bundle, classified, for filters that authorise them
//! one by one before anything is forwarded.

use caregate_fhir::{classify_relative_url, FhirRequest};
use serde_json::Value;

/// One entry: its index, its classified request and its resource (for writes).
pub struct Entry {
    pub index: usize,
    pub request: FhirRequest,
    pub resource: Option<Value>,
}

/// Parse a batch/transaction Bundle body into classified entries. `Err` carries a refusal text
/// naming the entry by index (never by ids or values).
pub fn entries(body: &[u8]) -> Result<Vec<Entry>, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|_| "the body is not a JSON Bundle".to_string())?;
    if v.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err("the body is not a Bundle".into());
    }
    match v.get("type").and_then(Value::as_str) {
        Some("batch") | Some("transaction") => {}
        _ => return Err("only batch and transaction Bundles are accepted here".into()),
    }
    let Some(list) = v.get("entry").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(list.len());
    for (index, e) in list.iter().enumerate() {
        let method = e
            .pointer("/request/method")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("entry {index}: no request.method"))?;
        let url = e
            .pointer("/request/url")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("entry {index}: no request.url"))?;
        let url = url.strip_prefix('/').unwrap_or(url);
        let request = classify_relative_url(&method.to_ascii_uppercase(), &format!("/{url}"))
            .map_err(|_| format!("entry {index}: the request cannot be classified"))?;
        out.push(Entry {
            index,
            request,
            resource: e.get("resource").cloned(),
        });
    }
    Ok(out)
}
