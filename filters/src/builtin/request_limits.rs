//! `request_limits`: maximum body size, maximum URI length and the allowed methods of a route.
//!
//! ```yaml
//! - kind: request_limits
//!   config: { max_body_bytes: 1048576, max_uri_length: 4096, methods: [GET, POST], mode: enforce }
//! ```
//! A declared `Content-Length` over the limit is refused before anything goes upstream (413
//! `payload_too_large`); a chunked body is counted as it streams and cut off with 413 once it
//! passes the limit. A URI over the limit gets 414 `uri_too_long`; a method not listed gets 405
//! `method_not_allowed` with an `Allow` header.

use crate::ctx::writers;
use crate::registry::{parse_config, BuildError};
use crate::{Decision, Filter, LocalReply, Mode, RequestCtx, RequestHeader, Result};
use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLimitsConfig {
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    #[serde(default)]
    pub max_uri_length: Option<usize>,
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    #[serde(default)]
    pub mode: Mode,
}

pub struct RequestLimitsFilter {
    max_body_bytes: Option<u64>,
    max_uri_length: Option<usize>,
    methods: Option<Vec<String>>,
    allow_header: Option<HeaderValue>,
    mode: Mode,
}

/// Bytes of request body seen so far in the current upstream attempt (written only by this
/// filter; a retry replays the body, so the count restarts with each attempt).
#[derive(Debug, Default)]
pub struct BodyBytesSeen {
    pub attempt: u32,
    pub bytes: u64,
}

const KNOWN_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
];

pub fn build(
    config: serde_yaml::Value,
    _cx: &crate::registry::BuildContext,
) -> std::result::Result<Arc<dyn Filter>, BuildError> {
    let c: RequestLimitsConfig = parse_config(config)?;
    let methods = match c.methods {
        None => None,
        Some(list) => {
            if list.is_empty() {
                return Err(BuildError::new(
                    "config.methods",
                    "an empty method list would refuse every request; omit it to allow all",
                ));
            }
            let mut out = Vec::new();
            for (i, m) in list.iter().enumerate() {
                let up = m.to_ascii_uppercase();
                if !KNOWN_METHODS.contains(&up.as_str()) {
                    return Err(BuildError::new(
                        format!("config.methods[{i}]"),
                        format!("unknown method `{m}`"),
                    ));
                }
                out.push(up);
            }
            Some(out)
        }
    };
    if c.max_uri_length == Some(0) {
        return Err(BuildError::new(
            "config.max_uri_length",
            "must be at least 1",
        ));
    }
    let allow_header = match &methods {
        Some(m) => Some(
            HeaderValue::from_str(&m.join(", "))
                .map_err(|_| BuildError::new("config.methods", "not a valid Allow header"))?,
        ),
        None => None,
    };
    Ok(Arc::new(RequestLimitsFilter {
        max_body_bytes: c.max_body_bytes,
        max_uri_length: c.max_uri_length,
        methods,
        allow_header,
        mode: c.mode,
    }))
}

fn too_large() -> LocalReply {
    LocalReply::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "the request body is larger than this route accepts",
    )
}

#[async_trait]
impl Filter for RequestLimitsFilter {
    fn kind(&self) -> &'static str {
        "request_limits"
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    /// Declares nothing. Reads no fact (only the request itself).
    fn declaration(&self) -> crate::Declaration {
        crate::Declaration::NONE
    }

    async fn request_filter(
        &self,
        req: &mut RequestHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        if let (Some(methods), Some(allow)) = (&self.methods, &self.allow_header) {
            if !methods.iter().any(|m| m == req.method.as_str()) {
                return Ok(Decision::Respond(
                    LocalReply::error(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "method_not_allowed",
                        "this method is not allowed on this route",
                    )
                    .with_header(header::ALLOW, allow.clone()),
                ));
            }
        }
        if let Some(max) = self.max_uri_length {
            let len = req
                .uri
                .path_and_query()
                .map(|pq| pq.as_str().len())
                .unwrap_or(0);
            if len > max {
                return Ok(Decision::Respond(LocalReply::error(
                    StatusCode::URI_TOO_LONG,
                    "uri_too_long",
                    "the request URI is longer than this route accepts",
                )));
            }
        }
        if let Some(max) = self.max_body_bytes {
            if let Some(cl) = req.headers.get(header::CONTENT_LENGTH) {
                // Pingora has already refused an unparseable or conflicting Content-Length.
                let declared = cl
                    .to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(u64::MAX);
                if declared > max {
                    return Ok(Decision::Respond(too_large()));
                }
            }
        }
        Ok(Decision::Continue)
    }

    fn request_body_filter(
        &self,
        chunk: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        let Some(max) = self.max_body_bytes else {
            return Ok(Decision::Continue);
        };
        let n = chunk.as_ref().map(|b| b.len() as u64).unwrap_or(0);
        if ctx.facts.get::<BodyBytesSeen>().is_none() {
            // Cannot fail: checked just above, and only this filter writes the fact.
            let _ = ctx
                .facts
                .insert(writers::RequestLimits, BodyBytesSeen::default());
        }
        let attempt = ctx.attempt;
        let seen = match ctx.facts.get_mut::<BodyBytesSeen>(writers::RequestLimits) {
            Some(s) => {
                if s.attempt != attempt {
                    *s = BodyBytesSeen { attempt, bytes: 0 };
                }
                s.bytes = s.bytes.saturating_add(n);
                s.bytes
            }
            None => n,
        };
        // Only the first chunk past the limit is reported, so a shadowed limit is counted once.
        if seen > max && seen - n <= max {
            return Ok(Decision::Respond(too_large()));
        }
        Ok(Decision::Continue)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn filter(yaml: &str) -> Arc<dyn Filter> {
        build(serde_yaml::from_str(yaml).unwrap(), &Default::default()).unwrap()
    }

    fn reply(d: Decision) -> Option<LocalReply> {
        match d {
            Decision::Respond(r) => Some(r),
            Decision::Continue => None,
        }
    }

    #[tokio::test]
    async fn method_uri_and_declared_length() {
        let f = filter("{max_body_bytes: 10, max_uri_length: 12, methods: [get, POST]}");
        let mut ctx = RequestCtx::for_test("GET", "/");

        let mut req = RequestHeader::build("DELETE", b"/a", None).unwrap();
        let r = reply(f.request_filter(&mut req, &mut ctx).await.unwrap()).unwrap();
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.reason, "method_not_allowed");
        assert_eq!(r.headers[0].1, "GET, POST");

        let mut req = RequestHeader::build("GET", b"/abcdef?x=123456", None).unwrap();
        let r = reply(f.request_filter(&mut req, &mut ctx).await.unwrap()).unwrap();
        assert_eq!((r.status.as_u16(), r.reason), (414, "uri_too_long"));

        let mut req = RequestHeader::build("POST", b"/a", None).unwrap();
        req.insert_header("content-length", "11").unwrap();
        let r = reply(f.request_filter(&mut req, &mut ctx).await.unwrap()).unwrap();
        assert_eq!((r.status.as_u16(), r.reason), (413, "payload_too_large"));

        let mut req = RequestHeader::build("POST", b"/a", None).unwrap();
        req.insert_header("content-length", "10").unwrap();
        assert!(reply(f.request_filter(&mut req, &mut ctx).await.unwrap()).is_none());
    }

    #[test]
    fn streamed_body_is_counted_across_chunks() {
        let f = filter("{max_body_bytes: 10}");
        let mut ctx = RequestCtx::for_test("POST", "/");
        let mut c = Some(Bytes::from_static(b"123456"));
        assert!(reply(f.request_body_filter(&mut c, false, &mut ctx).unwrap()).is_none());
        let mut c = Some(Bytes::from_static(b"1234"));
        assert!(reply(f.request_body_filter(&mut c, false, &mut ctx).unwrap()).is_none());
        let mut c = Some(Bytes::from_static(b"1"));
        let r = reply(f.request_body_filter(&mut c, true, &mut ctx).unwrap()).unwrap();
        assert_eq!(r.reason, "payload_too_large");
        // A retry replays the body: the count starts again.
        ctx.host().attempt = 2;
        let mut c = Some(Bytes::from_static(b"1234567890"));
        assert!(reply(f.request_body_filter(&mut c, true, &mut ctx).unwrap()).is_none());
    }

    #[test]
    fn bad_config_is_refused() {
        let e = build(
            serde_yaml::from_str("{methods: [GET, FETCH]}").unwrap(),
            &Default::default(),
        )
        .err()
        .unwrap();
        assert_eq!(e.path, "config.methods[1]");
        let e = build(
            serde_yaml::from_str("{methods: []}").unwrap(),
            &Default::default(),
        )
        .err()
        .unwrap();
        assert_eq!(e.path, "config.methods");
        let e = build(
            serde_yaml::from_str("{mode: maybe}").unwrap(),
            &Default::default(),
        )
        .err()
        .unwrap();
        assert!(e.path.starts_with("config"), "{e}");
    }
}
