//! `cors`: CORS for the browser apps of the patient portal (Fetch standard, CORS protocol).
//!
//! ```yaml
//! - kind: cors
//!   config:
//!     allowed_origins: [https://portal.example-hospital.org]
//!     allowed_methods: [GET, POST]
//!     allowed_headers: [authorization, content-type]
//!     expose_headers: [x-request-id]
//!     allow_credentials: true
//!     max_age_seconds: 600
//! ```
//! Preflights (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) are answered at the
//! gateway: 204 with the allow headers when origin, method and every requested header are
//! allowed, 403 `cors_denied` otherwise; they never reach the backend. Actual requests from an
//! allowed origin get `Access-Control-Allow-Origin` (the origin itself, never `*` together with
//! credentials) and `Vary: Origin`; other origins get no CORS headers, so the browser withholds
//! the response. Origins are compared exactly (scheme, host, port), case-insensitively.

use crate::ctx::writers;
use crate::registry::{parse_config, BuildError};
use crate::{Decision, Filter, LocalReply, RequestCtx, RequestHeader, ResponseHeader, Result};
use async_trait::async_trait;
use http::{header, HeaderValue, StatusCode};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    pub allowed_origins: Vec<String>,
    #[serde(default = "default_methods")]
    pub allowed_methods: Vec<String>,
    #[serde(default)]
    pub allowed_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub allow_credentials: bool,
    #[serde(default)]
    pub max_age_seconds: Option<u32>,
}

fn default_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into(), "POST".into()]
}

pub struct CorsFilter {
    any_origin: bool,
    origins: Vec<String>,
    methods: Vec<String>,
    headers: Vec<String>,
    allow_methods_value: HeaderValue,
    allow_headers_value: Option<HeaderValue>,
    expose_value: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
}

/// The allowed origin of this request, to echo in the response (written only by `cors`).
#[derive(Debug, Clone)]
pub struct CorsOrigin(pub HeaderValue);

fn list_value(
    path: &str,
    items: &[String],
) -> std::result::Result<Option<HeaderValue>, BuildError> {
    if items.is_empty() {
        return Ok(None);
    }
    HeaderValue::from_str(&items.join(", "))
        .map(Some)
        .map_err(|_| BuildError::new(path, "not a valid header value"))
}

pub fn build(
    config: serde_yaml::Value,
    _cx: &crate::registry::BuildContext,
) -> std::result::Result<Arc<dyn Filter>, BuildError> {
    let c: CorsConfig = parse_config(config)?;
    if c.allowed_origins.is_empty() {
        return Err(BuildError::new(
            "config.allowed_origins",
            "at least one origin is required",
        ));
    }
    let any_origin = c.allowed_origins.iter().any(|o| o == "*");
    if any_origin && c.allow_credentials {
        return Err(BuildError::new(
            "config.allowed_origins",
            "`*` cannot be combined with allow_credentials: list the origins",
        ));
    }
    let mut origins = Vec::new();
    for (i, o) in c.allowed_origins.iter().enumerate() {
        if o == "*" {
            continue;
        }
        let lower = o.trim_end_matches('/').to_ascii_lowercase();
        let rest = lower
            .strip_prefix("https://")
            .or_else(|| lower.strip_prefix("http://"));
        let ok = matches!(rest, Some(r) if !r.is_empty() && !r.contains('/'))
            && HeaderValue::from_str(&lower).is_ok();
        if !ok {
            return Err(BuildError::new(
                format!("config.allowed_origins[{i}]"),
                format!("`{o}` is not an origin (scheme://host[:port])"),
            ));
        }
        origins.push(lower);
    }
    let methods: Vec<String> = c
        .allowed_methods
        .iter()
        .map(|m| m.to_ascii_uppercase())
        .collect();
    let headers: Vec<String> = c
        .allowed_headers
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    for (i, h) in headers.iter().enumerate() {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            return Err(BuildError::new(
                format!("config.allowed_headers[{i}]"),
                format!("`{h}` is not a header name"),
            ));
        }
    }
    let allow_methods_value = list_value("config.allowed_methods", &methods)?.ok_or_else(|| {
        BuildError::new("config.allowed_methods", "at least one method is required")
    })?;
    Ok(Arc::new(CorsFilter {
        any_origin,
        origins,
        allow_headers_value: list_value("config.allowed_headers", &headers)?,
        expose_value: list_value("config.expose_headers", &c.expose_headers)?,
        methods,
        headers,
        allow_methods_value,
        credentials: c.allow_credentials,
        max_age: c.max_age_seconds.map(HeaderValue::from),
    }))
}

impl CorsFilter {
    fn origin_allowed(&self, origin: &str) -> bool {
        if self.any_origin {
            return true;
        }
        let o = origin.to_ascii_lowercase();
        self.origins.contains(&o)
    }

    fn echo_value(&self, origin: &HeaderValue) -> HeaderValue {
        if self.any_origin {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        }
    }

    fn denied(detail: &'static str) -> Decision {
        Decision::Respond(LocalReply::error(
            StatusCode::FORBIDDEN,
            "cors_denied",
            detail,
        ))
    }
}

#[async_trait]
impl Filter for CorsFilter {
    fn kind(&self) -> &'static str {
        "cors"
    }

    /// Declares nothing. Reads no fact (only the request itself): it belongs before `jwt_auth`, since a preflight carries no token.
    fn declaration(&self) -> crate::Declaration {
        crate::Declaration::NONE
    }

    async fn request_filter(
        &self,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        let Some(origin) = req.headers.get(header::ORIGIN).cloned() else {
            return Ok(Decision::Continue);
        };
        let origin_str = origin.to_str().unwrap_or("");
        let is_preflight = req.method == http::Method::OPTIONS
            && req
                .headers
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if !is_preflight {
            if self.origin_allowed(origin_str) {
                let _ = ctx
                    .facts
                    .insert(writers::Cors, CorsOrigin(self.echo_value(&origin)));
            }
            return Ok(Decision::Continue);
        }
        if !self.origin_allowed(origin_str) {
            return Ok(Self::denied("this origin is not allowed"));
        }
        let method = req
            .headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !self.methods.iter().any(|m| m == method) {
            return Ok(Self::denied(
                "this method is not allowed for cross-origin requests",
            ));
        }
        for value in req.headers.get_all(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            let list = value.to_str().unwrap_or("\u{0}");
            for h in list.split(',').map(|h| h.trim()).filter(|h| !h.is_empty()) {
                if !self.headers.iter().any(|a| a.eq_ignore_ascii_case(h)) {
                    return Ok(Self::denied(
                        "a requested header is not allowed for cross-origin requests",
                    ));
                }
            }
        }
        let mut reply = LocalReply::empty(StatusCode::NO_CONTENT, "cors_preflight")
            .with_header(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                self.echo_value(&origin),
            )
            .with_header(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                self.allow_methods_value.clone(),
            )
            .with_header(header::VARY, HeaderValue::from_static("Origin"));
        if let Some(h) = &self.allow_headers_value {
            reply = reply.with_header(header::ACCESS_CONTROL_ALLOW_HEADERS, h.clone());
        }
        if self.credentials {
            reply = reply.with_header(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(m) = &self.max_age {
            reply = reply.with_header(header::ACCESS_CONTROL_MAX_AGE, m.clone());
        }
        Ok(Decision::Respond(reply))
    }

    fn response_filter(&self, resp: &mut ResponseHeader, ctx: &mut RequestCtx) -> Result<()> {
        let Some(CorsOrigin(origin)) = ctx.facts.get::<CorsOrigin>().cloned() else {
            return Ok(());
        };
        if resp
            .headers
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        {
            // A preflight answer (or a backend that does its own CORS): leave it alone.
            return Ok(());
        }
        let _ = resp.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        let _ = resp.append_header(header::VARY, HeaderValue::from_static("Origin"));
        if self.credentials {
            let _ = resp.insert_header(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(e) = &self.expose_value {
            let _ = resp.insert_header(header::ACCESS_CONTROL_EXPOSE_HEADERS, e.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn filter() -> Arc<dyn Filter> {
        build(
            serde_yaml::from_str(
                "allowed_origins: [https://portal.example.org]\n\
                 allowed_methods: [GET, POST]\n\
                 allowed_headers: [Authorization, content-type]\n\
                 expose_headers: [x-request-id]\n\
                 allow_credentials: true\nmax_age_seconds: 600",
            )
            .unwrap(),
            &Default::default(),
        )
        .unwrap()
    }

    fn preflight(origin: &str, method: &str, headers: Option<&str>) -> RequestHeader {
        let mut req = RequestHeader::build("OPTIONS", b"/fhir/Patient", None).unwrap();
        req.insert_header("origin", origin).unwrap();
        req.insert_header("access-control-request-method", method)
            .unwrap();
        if let Some(h) = headers {
            req.insert_header("access-control-request-headers", h)
                .unwrap();
        }
        req
    }

    #[tokio::test]
    async fn preflight_is_answered_or_refused() {
        let f = filter();
        let mut ctx = RequestCtx::for_test("OPTIONS", "/fhir/Patient");
        let mut req = preflight(
            "https://PORTAL.example.org",
            "POST",
            Some("authorization, Content-Type"),
        );
        match f.request_filter(&mut req, &mut ctx).await.unwrap() {
            Decision::Respond(r) => {
                assert_eq!(r.status, StatusCode::NO_CONTENT);
                let get = |n: &str| {
                    r.headers
                        .iter()
                        .find(|(k, _)| k == n)
                        .map(|(_, v)| v.clone())
                };
                assert_eq!(
                    get("access-control-allow-origin").unwrap(),
                    "https://PORTAL.example.org"
                );
                assert_eq!(get("access-control-allow-credentials").unwrap(), "true");
                assert_eq!(get("access-control-max-age").unwrap(), "600");
            }
            Decision::Continue => panic!("preflight must be answered"),
        }
        for req in [
            preflight("https://evil.example", "GET", None),
            preflight("https://portal.example.org", "DELETE", None),
            preflight(
                "https://portal.example.org",
                "GET",
                Some("x-caregate-subject"),
            ),
            preflight("https://portal.example.org.evil.example", "GET", None),
        ] {
            let mut req = req;
            match f.request_filter(&mut req, &mut ctx).await.unwrap() {
                Decision::Respond(r) => {
                    assert_eq!((r.status.as_u16(), r.reason), (403, "cors_denied"))
                }
                Decision::Continue => panic!("must be refused"),
            }
        }
    }

    #[tokio::test]
    async fn actual_request_gets_headers_only_for_allowed_origins() {
        let f = filter();
        let mut ctx = RequestCtx::for_test("GET", "/fhir/Patient");
        let mut req = RequestHeader::build("GET", b"/fhir/Patient", None).unwrap();
        req.insert_header("origin", "https://portal.example.org")
            .unwrap();
        assert!(matches!(
            f.request_filter(&mut req, &mut ctx).await.unwrap(),
            Decision::Continue
        ));
        let mut resp = ResponseHeader::build(200, None).unwrap();
        f.response_filter(&mut resp, &mut ctx).unwrap();
        assert_eq!(
            resp.headers.get("access-control-allow-origin").unwrap(),
            "https://portal.example.org"
        );
        assert_eq!(
            resp.headers.get("access-control-expose-headers").unwrap(),
            "x-request-id"
        );

        let mut ctx = RequestCtx::for_test("GET", "/fhir/Patient");
        let mut req = RequestHeader::build("GET", b"/fhir/Patient", None).unwrap();
        req.insert_header("origin", "https://evil.example").unwrap();
        assert!(matches!(
            f.request_filter(&mut req, &mut ctx).await.unwrap(),
            Decision::Continue
        ));
        let mut resp = ResponseHeader::build(200, None).unwrap();
        f.response_filter(&mut resp, &mut ctx).unwrap();
        assert!(resp.headers.get("access-control-allow-origin").is_none());
    }

    #[test]
    fn wildcard_with_credentials_is_refused() {
        let e = build(
            serde_yaml::from_str("{allowed_origins: ['*'], allow_credentials: true}").unwrap(),
            &Default::default(),
        )
        .err()
        .unwrap();
        assert!(e.message.contains("cannot be combined"));
        let e = build(
            serde_yaml::from_str("{allowed_origins: ['portal.example.org']}").unwrap(),
            &Default::default(),
        )
        .err()
        .unwrap();
        assert_eq!(e.path, "config.allowed_origins[0]");
    }
}
