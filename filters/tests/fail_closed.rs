//! The confining filters fail closed: run without the verified caller they need (the filter
//! placed before `jwt_auth`, which `caregate check` refuses, or an anonymous caller let through
//! by an optional bearer), they refuse; a verified caller without a patient context (a
//! practitioner) is not "absent". Driven through the real chain runner by the testkit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_filters::identity::TenantConfig;
use caregate_filters::{BuildContext, FilterRegistry};
use caregate_testkit::{principal, Harness, PrincipalBuilder};

/// `GET /fhir/Patient/B` (another patient's record) through `filters`; the refusal's reason.
async fn decide(h: &Harness, caller: Option<PrincipalBuilder>) -> Option<&'static str> {
    let mut x = h
        .request("GET", "/fhir/Patient/B")
        .header("host", "a.hospital.test");
    if let Some(p) = caller {
        x = x.principal(p);
    }
    let out = x.run_request().await;
    if let Some(status) = out.status() {
        assert!(status == 401 || status == 403, "{status}");
    }
    out.reason()
}

#[tokio::test]
async fn patient_compartment_refuses_without_a_verified_caller() {
    let h = Harness::builtin("- kind: patient_compartment")
        .unwrap()
        .fhir("/fhir");
    assert_eq!(decide(&h, None).await, Some("patient_compartment"));
    // A patient-context caller asking for another patient's record: refused, as before.
    let patient_a = principal("a").patient("A").scopes("patient/*.rs");
    assert_eq!(
        decide(&h, Some(patient_a)).await,
        Some("patient_compartment")
    );
    // A practitioner (no patient context) is a verified caller, not an absent one.
    let practitioner = principal("dr").scopes("user/*.rs");
    assert_eq!(decide(&h, Some(practitioner)).await, None);
}

#[tokio::test]
async fn smart_scopes_refuses_without_a_verified_caller() {
    let h = Harness::builtin("- kind: smart_scopes")
        .unwrap()
        .fhir("/fhir");
    assert_eq!(decide(&h, None).await, Some("insufficient_scope"));
    let practitioner = principal("dr").scopes("user/Patient.rs");
    assert_eq!(decide(&h, Some(practitioner)).await, None);
}

#[tokio::test]
async fn tenant_refuses_without_a_verified_caller() {
    let cx = BuildContext {
        tenants: vec![TenantConfig {
            id: "a".into(),
            hosts: vec!["a.hospital.test".into()],
            path_prefix: None,
            issuers: vec![],
            pool: None,
        }],
        ..BuildContext::default()
    };
    let h = Harness::from_yaml_with(
        &FilterRegistry::builtin(),
        &cx,
        "- { kind: tenant, config: { resolve: [host] } }",
    )
    .unwrap()
    .fhir("/fhir");
    assert_eq!(decide(&h, None).await, Some("tenant_mismatch"));
    let member = principal("dr").tenant("a").scopes("user/*.rs");
    assert_eq!(decide(&h, Some(member)).await, None);
}
