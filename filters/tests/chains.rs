//! Built-in filters together, through the real chain runner (the testkit): what a client of a
//! configured route would see, with no socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_testkit::{principal, Harness};

const PORTAL: &str = r#"
- kind: cors
  config: { allowed_origins: ["https://portal.example.org"] }
- kind: smart_scopes
- kind: patient_compartment
"#;

fn observation_of(patient: &str) -> String {
    format!(
        r#"{{"resourceType":"Observation","id":"o1","status":"final","code":{{"text":"x"}},"subject":{{"reference":"Patient/{patient}"}}}}"#
    )
}

/// A patient's read of another patient's resource is refused in the response check with a clean
/// 404; the refusal still carries the CORS headers of `cors` (in front of the refusing filter),
/// and every response hook ran once.
#[tokio::test]
async fn a_compartment_refusal_keeps_the_cors_headers_of_the_filters_in_front() {
    let h = Harness::builtin(PORTAL).unwrap().fhir("/fhir");
    let mut x = h
        .request("GET", "/fhir/Observation/o1")
        .header("origin", "https://portal.example.org")
        .principal(principal("pat-a").patient("A").scopes("patient/*.rs"));
    assert!(x.run_request().await.is_continue());
    assert!(x.ctx.whole_exchange(), "a read by id is judged whole");
    let other = x.respond(
        200,
        &[("content-type", "application/fhir+json")],
        observation_of("B").as_bytes(),
    );
    assert_eq!(other.status(), 404);
    assert_eq!(other.reason(), Some("not_found"));
    assert_eq!(
        other.header("access-control-allow-origin"),
        Some("https://portal.example.org")
    );
    assert!(other.body.is_empty(), "none of B's data");
    assert_eq!(
        x.decisions().last(),
        Some(&("patient_compartment", "deny", "not_found"))
    );

    // The caller's own resource is released byte for byte.
    let mut x = h
        .request("GET", "/fhir/Observation/o1")
        .principal(principal("pat-a").patient("A").scopes("patient/*.rs"));
    assert!(x.run_request().await.is_continue());
    let own = observation_of("A");
    let r = x.respond(
        200,
        &[("content-type", "application/fhir+json")],
        own.as_bytes(),
    );
    assert_eq!((r.status(), r.reason()), (200, None));
    assert_eq!(r.body, own.as_bytes());
}

/// In shadow mode a response refusal is counted and the response is released whole; a
/// failure (a response that cannot be judged) is never shadowed.
#[tokio::test]
async fn a_shadowed_compartment_check_counts_and_releases() {
    let h = Harness::builtin(
        "- kind: smart_scopes\n- { kind: patient_compartment, config: { mode: shadow } }",
    )
    .unwrap()
    .fhir("/fhir");
    let mut x = h
        .request("GET", "/fhir/Observation/o1")
        .principal(principal("pat-a").patient("A").scopes("patient/*.rs"));
    assert!(x.run_request().await.is_continue());
    let other = observation_of("B");
    let r = x.respond(
        200,
        &[("content-type", "application/fhir+json")],
        other.as_bytes(),
    );
    assert_eq!((r.status(), r.reason()), (200, None));
    assert_eq!(r.body, other.as_bytes(), "released whole");
    assert!(x
        .decisions()
        .contains(&("patient_compartment", "shadow_deny", "not_found")));

    let mut x = h
        .request("GET", "/fhir/Observation/o1")
        .principal(principal("pat-a").patient("A").scopes("patient/*.rs"));
    assert!(x.run_request().await.is_continue());
    let r = x.respond(200, &[("content-type", "text/plain")], b"not json");
    assert_eq!((r.status(), r.reason()), (502, Some("upstream_error")));
}

/// A request the gateway cannot classify never reaches the filters.
#[tokio::test]
async fn an_invalid_fhir_request_is_refused_before_the_chain() {
    let h = Harness::builtin(PORTAL).unwrap().fhir("/fhir");
    let mut x = h.request("GET", "/fhir/NotAType/1");
    let out = x.run_request().await;
    assert_eq!(out.status(), Some(400));
    assert_eq!(x.decisions().len(), 1, "{:?}", x.decisions());
    assert_eq!(x.decisions()[0].0, "gateway");
}

mod narrowing {
    //! A filter of a user's own that rewrites the request (narrows a search to the caller's
    //! patient) through the one sanctioned operation: the classification follows, so the
    //! filters after it judge exactly what goes upstream.
    use super::*;
    use async_trait::async_trait;
    use caregate_filters::ctx::Writer;
    use caregate_filters::identity::Principal;
    use caregate_filters::{Decision, Filter, RequestCtx, RequestHeader};
    use std::sync::Arc;

    struct Narrow;
    impl Writer for Narrow {
        const NAME: &'static str = "narrow";
    }

    /// Adds `patient=<caller's patient>` to an Observation search that names none.
    struct NarrowFilter;

    #[async_trait]
    impl Filter for NarrowFilter {
        fn kind(&self) -> &'static str {
            "narrow"
        }
        async fn request_filter(
            &self,
            req: &mut RequestHeader,
            ctx: &mut RequestCtx,
        ) -> caregate_filters::Result<Decision> {
            let Some(patient) = ctx.facts.get::<Principal>().and_then(|p| p.patient.clone()) else {
                return Ok(Decision::Continue);
            };
            if ctx.query.contains("patient=") {
                return Ok(Decision::Continue);
            }
            let target = format!("/Observation?{}&patient={patient}", ctx.query);
            ctx.rewrite_fhir_request(Narrow, req, &target)
                .map_err(|e| caregate_filters::FilterError {
                    filter: "narrow",
                    message: e.to_string(),
                })?;
            Ok(Decision::Continue)
        }
    }

    fn chain(with_narrowing: bool) -> Harness {
        let built = Harness::builtin("- kind: smart_scopes\n- kind: patient_compartment").unwrap();
        let mut filters: Vec<Arc<dyn Filter>> = Vec::new();
        if with_narrowing {
            filters.push(Arc::new(NarrowFilter));
        }
        filters.extend(built.filters().iter().cloned());
        Harness::from_filters(filters).fhir("/fhir")
    }

    #[tokio::test]
    async fn a_narrowed_search_is_judged_as_it_goes_upstream() {
        let caller = || principal("pat-a").patient("A").scopes("patient/*.rs");
        // Unnarrowed, a patient's search without `patient=` is refused by the compartment.
        let h = chain(false);
        let mut x = h
            .request("GET", "/fhir/Observation?code=8302-2")
            .principal(caller());
        assert_eq!(x.run_request().await.reason(), Some("patient_compartment"));
        // Narrowed first, the same search is judged as the narrowed one, and that is what
        // goes upstream.
        let h = chain(true);
        let mut x = h
            .request("GET", "/fhir/Observation?code=8302-2")
            .principal(caller());
        assert!(x.run_request().await.is_continue(), "{:?}", x.decisions());
        assert_eq!(
            x.req.uri.to_string(),
            "/fhir/Observation?code=8302-2&patient=A"
        );
        let class = x.ctx.facts.get::<caregate_fhir::FhirRequest>().unwrap();
        assert!(class.params.iter().any(|p| p.name == "patient"));
        assert_eq!(x.ctx.rewritten_by, Some("narrow"));
        assert_eq!(
            x.ctx.facts.writer_of::<caregate_fhir::FhirRequest>(),
            Some("gateway")
        );
    }

    #[tokio::test]
    async fn a_rewrite_the_gateway_would_not_accept_changes_nothing() {
        let h = chain(false);
        let mut x = h.request("GET", "/fhir/Observation?code=1");
        // No caller: smart_scopes refuses; the rewrite is tried on the request as it stands.
        assert_eq!(x.run_request().await.reason(), Some("insufficient_scope"));
        let before = x.req.uri.to_string();
        for bad in [
            "/Observation/../Patient/B",
            "/Observation//x",
            "/Observation%2FB",
            "/NotAType?x=1",
            "Observation",
            "/Observation;x",
        ] {
            assert!(
                x.ctx.rewrite_fhir_request(Narrow, &mut x.req, bad).is_err(),
                "{bad}"
            );
            assert_eq!(x.req.uri.to_string(), before, "{bad}");
        }
        assert!(x.ctx.rewritten_by.is_none());
    }
}
