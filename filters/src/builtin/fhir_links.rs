//! `fhir_links`: clients page through the gateway, never straight to the backend.
//!
//! ```yaml
//! - kind: fhir_links
//!   config:
//!     backend_base: http://10.1.1.10:8080/fhir     # what the FHIR server writes into its links
//!     public_base: https://api.example-hospital.org/fhir   # the route as clients reach it
//!     max_body_bytes: 33554432
//! ```
//! Or, instead of `public_base`, `public_origin: https://api.example-hospital.org`: the public
//! base is then that origin followed by the FHIR base of the route each request came by (its
//! `path_prefix`), so one filter serves every version of an API (`/v1/fhir`, `/v2/fhir`).
//! In JSON response bodies every string value that starts with `backend_base` (followed by `/`,
//! `?`, `#` or the end of the string) is rewritten to start with `public_base` — `Bundle.link.url`,
//! `entry.fullUrl`, and absolute references alike. `Location` and `Content-Location` headers are
//! rewritten the same way. Everything else stays byte-for-byte as the backend sent it.
//!
//! The body is buffered (up to `max_body_bytes`) and rewritten at its end; the gateway asks the
//! backend for an uncompressed body on routes with this filter. A body over the cap is never
//! passed on half-rewritten: the exchange is aborted.

use crate::ctx::writers;
use crate::registry::{parse_config, BuildContext, BuildError};
use crate::{Filter, FilterError, RequestCtx, RequestHeader, ResponseHeader, Result};
use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirLinksConfig {
    pub backend_base: String,
    /// The route as clients reach it (an http(s) URL with the route's path).
    #[serde(default)]
    pub public_base: Option<String>,
    /// Or: the scheme and authority clients reach the gateway at; the path is the FHIR base of
    /// the route each request came by.
    #[serde(default)]
    pub public_origin: Option<String>,
    #[serde(default = "d_max")]
    pub max_body_bytes: usize,
}

fn d_max() -> usize {
    32 * 1024 * 1024
}

pub struct FhirLinksFilter {
    backend: String,
    public: Public,
    max: usize,
}

/// Where links are rewritten to.
enum Public {
    /// One public base.
    Base(String),
    /// An origin, followed by the request's FHIR base.
    Origin(String),
}

/// Per-request state: whether this response is rewritten, to which public base, and the body
/// so far.
#[derive(Debug, Default)]
pub struct LinkRewriteBuffer {
    pub active: bool,
    pub public: String,
    pub body: Vec<u8>,
}

fn valid_base(path: &str, v: &str) -> std::result::Result<String, BuildError> {
    let t = v.trim_end_matches('/');
    let rest = t
        .strip_prefix("https://")
        .or_else(|| t.strip_prefix("http://"));
    match rest {
        Some(r) if !r.is_empty() && !t.contains(['"', '\\', '?', '#', ' ']) => Ok(t.to_string()),
        _ => Err(BuildError::new(
            path,
            format!("`{v}` is not an http(s) base URL"),
        )),
    }
}

pub fn build(
    config: serde_yaml::Value,
    _cx: &BuildContext,
) -> std::result::Result<Arc<dyn Filter>, BuildError> {
    let c: FhirLinksConfig = parse_config(config)?;
    let backend = valid_base("config.backend_base", &c.backend_base)?;
    let public = match (&c.public_base, &c.public_origin) {
        (Some(b), None) => Public::Base(valid_base("config.public_base", b)?),
        (None, Some(o)) => {
            let o = valid_base("config.public_origin", o)?;
            let authority = o.split_once("://").map(|(_, a)| a).unwrap_or("");
            if authority.contains('/') {
                return Err(BuildError::new(
                    "config.public_origin",
                    "give scheme and host only (the path comes from the route); or use public_base",
                ));
            }
            Public::Origin(o)
        }
        _ => {
            return Err(BuildError::new(
                "config",
                "give exactly one of public_base and public_origin",
            ))
        }
    };
    if c.max_body_bytes == 0 {
        return Err(BuildError::new("config.max_body_bytes", "must be positive"));
    }
    Ok(Arc::new(FhirLinksFilter {
        backend,
        public,
        max: c.max_body_bytes,
    }))
}

fn boundary_ok(next: Option<&u8>) -> bool {
    matches!(
        next,
        None | Some(b'/') | Some(b'?') | Some(b'#') | Some(b'"')
    )
}

impl FhirLinksFilter {
    /// The public base of this request: the configured one, or the origin followed by the
    /// route's FHIR base (`None` on a route without one: nothing is rewritten).
    fn public_for(&self, ctx: &RequestCtx) -> Option<String> {
        match &self.public {
            Public::Base(b) => Some(b.clone()),
            Public::Origin(o) => ctx
                .fhir_base
                .as_deref()
                .map(|p| format!("{o}{}", p.trim_end_matches('/'))),
        }
    }

    /// Rewrite a URL that starts with the backend base to start with `public`.
    pub fn rewrite_url(&self, url: &str, public: &str) -> Option<String> {
        let rest = url.strip_prefix(self.backend.as_str())?;
        if !boundary_ok(rest.as_bytes().first()) {
            return None;
        }
        Some(format!("{public}{rest}"))
    }

    /// Rewrite every JSON string that starts with the backend base to start with `public`.
    /// Bytes outside those string prefixes are copied unchanged.
    pub fn rewrite_body(&self, body: &[u8], public: &str) -> Vec<u8> {
        let needle = format!("\"{}", self.backend);
        let needle = needle.as_bytes();
        let mut out = Vec::with_capacity(body.len());
        let mut i = 0;
        while i < body.len() {
            if body[i..].starts_with(needle)
                && boundary_ok(body.get(i + needle.len()))
                && !escaped_quote(body, i)
            {
                out.push(b'"');
                out.extend_from_slice(public.as_bytes());
                i += needle.len();
            } else {
                out.push(body[i]);
                i += 1;
            }
        }
        out
    }
}

/// Whether the quote at `i` is escaped (inside a string), i.e. not the start of a string.
fn escaped_quote(body: &[u8], i: usize) -> bool {
    let mut n = 0;
    let mut j = i;
    while j > 0 && body[j - 1] == b'\\' {
        n += 1;
        j -= 1;
    }
    n % 2 == 1
}

#[async_trait]
impl Filter for FhirLinksFilter {
    fn kind(&self) -> &'static str {
        "fhir_links"
    }

    /// Declares nothing. Reads no fact (only the response).
    fn declaration(&self) -> crate::Declaration {
        crate::Declaration::NONE
    }

    async fn upstream_request_filter(
        &self,
        req: &mut RequestHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The body is rewritten as bytes: ask for it uncompressed.
        req.remove_header(&header::ACCEPT_ENCODING);
        Ok(())
    }

    fn response_filter(&self, resp: &mut ResponseHeader, ctx: &mut RequestCtx) -> Result<()> {
        let Some(public) = self.public_for(ctx) else {
            return Ok(());
        };
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let new = resp
                .headers
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| self.rewrite_url(v, &public))
                .and_then(|v| HeaderValue::from_str(&v).ok());
            if let Some(v) = new {
                let _ = resp.insert_header(name, v);
            }
        }
        let status = resp.status.as_u16();
        let bodyless = status == 204 || status == 304 || ctx.method == "HEAD";
        let encoded = crate::builtin::body::is_encoded(resp);
        if crate::builtin::body::is_json(resp) && !bodyless && !encoded {
            crate::builtin::body::will_rewrite(resp);
            if let Some(b) = ctx.facts.get_mut::<LinkRewriteBuffer>(writers::FhirLinks) {
                // The hooks ran before on this request (an error reply after a response).
                b.active = true;
                b.public = public;
                b.body.clear();
                return Ok(());
            }
            ctx.facts
                .insert(
                    writers::FhirLinks,
                    LinkRewriteBuffer {
                        active: true,
                        public,
                        body: Vec::new(),
                    },
                )
                .map_err(|e| FilterError {
                    filter: "fhir_links",
                    message: e.to_string(),
                })?;
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(buf) = ctx.facts.get_mut::<LinkRewriteBuffer>(writers::FhirLinks) else {
            return Ok(());
        };
        if !buf.active {
            return Ok(());
        }
        if !crate::builtin::body::hold(&mut buf.body, chunk, self.max) {
            buf.active = false;
            buf.body = Vec::new();
            return Err(FilterError {
                filter: "fhir_links",
                message: "response body over max_body_bytes; exchange aborted".into(),
            });
        }
        if end_of_stream {
            let body = std::mem::take(&mut buf.body);
            buf.active = false;
            *chunk = Some(Bytes::from(self.rewrite_body(&body, &buf.public)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn filter() -> FhirLinksFilter {
        FhirLinksFilter {
            backend: "http://10.0.0.5:8080/fhir".into(),
            public: Public::Base("https://api.example.org/r4".into()),
            max: 1 << 20,
        }
    }

    #[test]
    fn rewrites_links_full_urls_and_references_only() {
        let f = filter();
        let body = br#"{"resourceType":"Bundle","link":[{"relation":"next","url":"http://10.0.0.5:8080/fhir/Patient?_count=1&_offset=1"}],
 "entry":[{"fullUrl":"http://10.0.0.5:8080/fhir/Patient/1","resource":{"resourceType":"Patient","id":"1","note":"see http://10.0.0.5:8080/fhir/x",
 "other":"http://10.0.0.5:8080/fhirx/1","esc":"a\"http://10.0.0.5:8080/fhir/1","n":1.50}}]}"#;
        let out = String::from_utf8(f.rewrite_body(body, "https://api.example.org/r4")).unwrap();
        assert!(out.contains(r#""url":"https://api.example.org/r4/Patient?_count=1&_offset=1""#));
        assert!(out.contains(r#""fullUrl":"https://api.example.org/r4/Patient/1""#));
        // Only string values that START with the base; not a longer path; not inside a string.
        assert!(out.contains("see http://10.0.0.5:8080/fhir/x"));
        assert!(out.contains(r#""http://10.0.0.5:8080/fhirx/1""#));
        assert!(out.contains(r#"a\"http://10.0.0.5:8080/fhir/1"#));
        assert!(out.contains("\"n\":1.50"));
        assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok());
    }

    #[test]
    fn headers_and_chunked_bodies() {
        let f = filter();
        let mut ctx = RequestCtx::for_test("GET", "/fhir/Patient");
        let mut resp = ResponseHeader::build(201, None).unwrap();
        resp.insert_header("location", "http://10.0.0.5:8080/fhir/Patient/9/_history/1")
            .unwrap();
        resp.insert_header("content-type", "application/fhir+json")
            .unwrap();
        resp.insert_header("content-length", "10").unwrap();
        f.response_filter(&mut resp, &mut ctx).unwrap();
        assert_eq!(
            resp.headers.get("location").unwrap(),
            "https://api.example.org/r4/Patient/9/_history/1"
        );
        assert!(resp.headers.get("content-length").is_none());
        let body = br#"{"fullUrl":"http://10.0.0.5:8080/fhir/Patient/9"}"#;
        // Split at every offset: the same output.
        for cut in 0..body.len() {
            let mut ctx2 = RequestCtx::for_test("GET", "/");
            let mut r = ResponseHeader::build(200, None).unwrap();
            r.insert_header("content-type", "application/json").unwrap();
            f.response_filter(&mut r, &mut ctx2).unwrap();
            let mut a = Some(Bytes::copy_from_slice(&body[..cut]));
            f.response_body_filter(&mut a, false, &mut ctx2).unwrap();
            assert!(a.is_none(), "nothing is released before the end");
            let mut b = Some(Bytes::copy_from_slice(&body[cut..]));
            f.response_body_filter(&mut b, true, &mut ctx2).unwrap();
            assert_eq!(
                &b.unwrap()[..],
                br#"{"fullUrl":"https://api.example.org/r4/Patient/9"}"#
            );
        }
    }

    #[test]
    fn an_origin_follows_the_route_each_request_came_by() {
        let f = FhirLinksFilter {
            backend: "http://10.0.0.5:8080/fhir".into(),
            public: Public::Origin("https://api.example.org".into()),
            max: 1 << 20,
        };
        for base in ["/v1/fhir", "/v2/fhir"] {
            let mut ctx = RequestCtx::for_test("GET", &format!("{base}/Patient"));
            ctx.host().fhir_base = Some(base.to_string());
            let mut r = ResponseHeader::build(200, None).unwrap();
            r.insert_header("content-type", "application/fhir+json")
                .unwrap();
            f.response_filter(&mut r, &mut ctx).unwrap();
            let mut b = Some(Bytes::from_static(
                br#"{"fullUrl":"http://10.0.0.5:8080/fhir/Patient/9"}"#,
            ));
            f.response_body_filter(&mut b, true, &mut ctx).unwrap();
            assert_eq!(
                String::from_utf8(b.unwrap().to_vec()).unwrap(),
                format!(r#"{{"fullUrl":"https://api.example.org{base}/Patient/9"}}"#)
            );
        }
        // No FHIR base (not a FHIR route): nothing is touched.
        let mut ctx = RequestCtx::for_test("GET", "/x");
        let mut r = ResponseHeader::build(200, None).unwrap();
        r.insert_header("content-type", "application/json").unwrap();
        f.response_filter(&mut r, &mut ctx).unwrap();
        assert!(ctx.facts.get::<LinkRewriteBuffer>().is_none());
        // Exactly one of the two; an origin has no path.
        let cx = BuildContext::default();
        for bad in [
            "{backend_base: http://b/fhir}",
            "{backend_base: http://b/fhir, public_base: https://a/fhir, public_origin: https://a}",
            "{backend_base: http://b/fhir, public_origin: https://a/fhir}",
        ] {
            assert!(
                build(serde_yaml::from_str(bad).unwrap(), &cx).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn over_the_cap_aborts() {
        let mut f = filter();
        f.max = 8;
        let mut ctx = RequestCtx::for_test("GET", "/");
        let mut r = ResponseHeader::build(200, None).unwrap();
        r.insert_header("content-type", "application/fhir+json")
            .unwrap();
        f.response_filter(&mut r, &mut ctx).unwrap();
        let mut a = Some(Bytes::from_static(b"0123456789"));
        assert!(f.response_body_filter(&mut a, false, &mut ctx).is_err());
    }

    #[test]
    fn config_is_checked() {
        let cx = BuildContext::default();
        let e = build(
            serde_yaml::from_str("{backend_base: ftp://x, public_base: https://a/b}").unwrap(),
            &cx,
        )
        .err()
        .unwrap();
        assert_eq!(e.path, "config.backend_base");
    }
}
