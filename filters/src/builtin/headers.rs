//! `headers`: set, append and remove request and response headers.
//!
//! ```yaml
//! - kind: headers
//!   config:
//!     request:  { set: { x-env: sandbox }, append: { via: caregate }, remove: [x-debug] }
//!     response: { set: { strict-transport-security: "max-age=63072000" }, remove: [server] }
//! ```
//! Request edits apply to what goes upstream. Names under `x-caregate-` are reserved for the
//! gateway's verified identity headers and are refused at load.

use crate::registry::{parse_config, BuildError};
use crate::{Filter, RequestCtx, RequestHeader, ResponseHeader, Result};
use async_trait::async_trait;
use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEditsConfig {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub append: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersConfig {
    #[serde(default)]
    pub request: HeaderEditsConfig,
    #[serde(default)]
    pub response: HeaderEditsConfig,
}

#[derive(Debug, Default)]
struct HeaderEdits {
    set: Vec<(HeaderName, HeaderValue)>,
    append: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

pub struct HeadersFilter {
    request: HeaderEdits,
    response: HeaderEdits,
}

fn header_name(path: &str, name: &str) -> std::result::Result<HeaderName, BuildError> {
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| BuildError::new(path, format!("`{name}` is not a valid header name")))?;
    let folded: String = parsed
        .as_str()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    if folded.starts_with("x-caregate-") {
        return Err(BuildError::new(
            path,
            format!("`{name}` is reserved for the gateway's verified identity headers"),
        ));
    }
    if matches!(
        parsed.as_str(),
        "host" | "content-length" | "transfer-encoding" | "connection"
    ) {
        return Err(BuildError::new(
            path,
            format!("`{name}` is managed by the gateway and cannot be edited"),
        ));
    }
    Ok(parsed)
}

fn build_edits(side: &str, c: HeaderEditsConfig) -> std::result::Result<HeaderEdits, BuildError> {
    let mut out = HeaderEdits::default();
    for (which, map, target) in [
        ("set", c.set, &mut out.set),
        ("append", c.append, &mut out.append),
    ] {
        for (name, value) in map {
            let path = format!("config.{side}.{which}.{name}");
            let n = header_name(&path, &name)?;
            let v = HeaderValue::from_str(&value)
                .map_err(|_| BuildError::new(&path, "not a valid header value"))?;
            target.push((n, v));
        }
    }
    for (i, name) in c.remove.iter().enumerate() {
        out.remove
            .push(header_name(&format!("config.{side}.remove[{i}]"), name)?);
    }
    Ok(out)
}

pub fn build(
    config: serde_yaml::Value,
    _cx: &crate::registry::BuildContext,
) -> std::result::Result<Arc<dyn Filter>, BuildError> {
    let c: HeadersConfig = parse_config(config)?;
    Ok(Arc::new(HeadersFilter {
        request: build_edits("request", c.request)?,
        response: build_edits("response", c.response)?,
    }))
}

macro_rules! apply_edits {
    ($edits:expr, $h:expr) => {{
        for name in &$edits.remove {
            $h.remove_header(name);
        }
        for (name, value) in &$edits.set {
            // insert/append only fail on invalid names, which the build step refused.
            let _ = $h.insert_header(name.clone(), value.clone());
        }
        for (name, value) in &$edits.append {
            let _ = $h.append_header(name.clone(), value.clone());
        }
    }};
}

#[async_trait]
impl Filter for HeadersFilter {
    fn kind(&self) -> &'static str {
        "headers"
    }

    /// Declares nothing. Reads no fact.
    fn declaration(&self) -> crate::Declaration {
        crate::Declaration::NONE
    }

    async fn upstream_request_filter(
        &self,
        req: &mut RequestHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        apply_edits!(self.request, req);
        Ok(())
    }

    fn response_filter(&self, resp: &mut ResponseHeader, _ctx: &mut RequestCtx) -> Result<()> {
        apply_edits!(self.response, resp);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn filter(yaml: &str) -> std::result::Result<Arc<dyn Filter>, BuildError> {
        build(serde_yaml::from_str(yaml).unwrap(), &Default::default())
    }

    #[tokio::test]
    async fn edits_request_and_response() {
        let f = filter(
            "request: {set: {x-env: sandbox}, append: {via: caregate}, remove: [x-debug]}\n\
             response: {set: {x-frame-options: DENY}, remove: [server]}",
        )
        .unwrap();
        let mut ctx = RequestCtx::for_test("GET", "/");
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("x-debug", "1").unwrap();
        req.insert_header("via", "1.1 lb").unwrap();
        f.upstream_request_filter(&mut req, &mut ctx).await.unwrap();
        assert!(req.headers.get("x-debug").is_none());
        assert_eq!(req.headers.get("x-env").unwrap(), "sandbox");
        let vias: Vec<_> = req.headers.get_all("via").iter().collect();
        assert_eq!(vias.len(), 2);

        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("server", "backend/1.0").unwrap();
        f.response_filter(&mut resp, &mut ctx).unwrap();
        assert!(resp.headers.get("server").is_none());
        assert_eq!(resp.headers.get("x-frame-options").unwrap(), "DENY");
    }

    #[test]
    fn reserved_and_invalid_names_are_refused() {
        let e = filter("request: {set: {X-Caregate-Subject: admin}}")
            .err()
            .unwrap();
        assert_eq!(e.path, "config.request.set.X-Caregate-Subject");
        let e = filter("request: {set: {x_caregate_roles: admin}}")
            .err()
            .unwrap();
        assert!(e.message.contains("reserved"));
        let e = filter("response: {remove: [\"bad name\"]}").err().unwrap();
        assert_eq!(e.path, "config.response.remove[0]");
        let e = filter("request: {set: {content-length: \"5\"}}")
            .err()
            .unwrap();
        assert!(e.message.contains("managed by the gateway"));
    }
}
