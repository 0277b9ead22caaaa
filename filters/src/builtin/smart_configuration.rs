//! `smart_configuration`: the route's SMART App Launch discovery document, served at the edge.
//!
//! ```yaml
//! - kind: smart_configuration        # first in the chain: discovery is public
//!   config:
//!     document:
//!       authorization_endpoint: https://login.example-hospital.org/authorize
//!       token_endpoint: https://login.example-hospital.org/token
//!       capabilities: [launch-standalone, client-public, context-standalone-patient, permission-v2]
//!       scopes_supported: [openid, fhirUser, launch/patient, "patient/*.rs"]
//! ```
//! `GET {route prefix}/.well-known/smart-configuration` is answered with the document
//! (`application/json`, 200); every other request passes. The document must be a JSON object
//! with at least `token_endpoint` and `capabilities` (SMART App Launch 2.x).

use crate::registry::{parse_config, BuildContext, BuildError};
use crate::{Decision, Filter, LocalReply, ReplyBody, RequestCtx, RequestHeader, Result};
use async_trait::async_trait;
use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmartConfigurationConfig {
    pub document: serde_yaml::Value,
}

pub struct SmartConfigurationFilter {
    body: Bytes,
}

pub fn build(
    config: serde_yaml::Value,
    _cx: &BuildContext,
) -> std::result::Result<Arc<dyn Filter>, BuildError> {
    let c: SmartConfigurationConfig = parse_config(config)?;
    let doc = serde_json::to_value(c.document)
        .map_err(|e| BuildError::new("config.document", e.to_string()))?;
    let Some(obj) = doc.as_object() else {
        return Err(BuildError::new(
            "config.document",
            "must be a mapping (a JSON object)",
        ));
    };
    for required in ["token_endpoint", "capabilities"] {
        if !obj.contains_key(required) {
            return Err(BuildError::new(
                "config.document",
                format!("`{required}` is required"),
            ));
        }
    }
    Ok(Arc::new(SmartConfigurationFilter {
        body: Bytes::from(doc.to_string()),
    }))
}

#[async_trait]
impl Filter for SmartConfigurationFilter {
    fn kind(&self) -> &'static str {
        "smart_configuration"
    }

    /// Declares nothing. Reads no fact: discovery is public.
    fn declaration(&self) -> crate::Declaration {
        crate::Declaration::NONE
    }

    async fn request_filter(
        &self,
        _req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        if (ctx.method == "GET" || ctx.method == "HEAD")
            && ctx.path.ends_with("/.well-known/smart-configuration")
        {
            let mut reply = LocalReply::empty(StatusCode::OK, "smart_configuration");
            reply.body = ReplyBody::Json(self.body.clone());
            return Ok(Decision::Respond(reply));
        }
        Ok(Decision::Continue)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn serves_the_document_and_nothing_else() {
        let f = build(
            serde_yaml::from_str(
                "document: {token_endpoint: 'https://idp/token', capabilities: [permission-v2]}",
            )
            .unwrap(),
            &BuildContext::default(),
        )
        .unwrap();
        let mut req =
            RequestHeader::build("GET", b"/fhir/.well-known/smart-configuration", None).unwrap();
        let mut ctx = RequestCtx::for_test("GET", "/fhir/.well-known/smart-configuration");
        match f.request_filter(&mut req, &mut ctx).await.unwrap() {
            Decision::Respond(r) => {
                assert_eq!(r.status, StatusCode::OK);
                let ReplyBody::Json(b) = r.body else {
                    panic!("json")
                };
                let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
                assert_eq!(v["token_endpoint"], "https://idp/token");
            }
            Decision::Continue => panic!("not served"),
        }
        let mut ctx = RequestCtx::for_test("GET", "/fhir/Patient");
        assert!(matches!(
            f.request_filter(&mut req, &mut ctx).await.unwrap(),
            Decision::Continue
        ));
        let e = build(
            serde_yaml::from_str("document: {capabilities: []}").unwrap(),
            &BuildContext::default(),
        )
        .err()
        .unwrap();
        assert!(e.message.contains("token_endpoint"));
    }
}
