//! `ScopeSet::permits`: a matrix of scopes × interactions × resource types × contexts against an
//! independent oracle, then the conditional cases (query restrictions, filters, operations).

use caregate_fhir::{
    classify, Condition, Context, Denial, FhirRequest, Permission, Permit, Restriction, ScopeSet,
};

/// (label, method, path, query, form?) with `{T}` for the resource type, and the letters needed.
const INTERACTIONS: &[(&str, &str, &str, &str, bool, &str)] = &[
    ("read", "GET", "/{T}/1", "", false, "r"),
    ("vread", "GET", "/{T}/1/_history/2", "", false, "r"),
    ("history-instance", "GET", "/{T}/1/_history", "", false, "r"),
    ("update", "PUT", "/{T}/1", "", false, "u"),
    ("patch", "PATCH", "/{T}/1", "", false, "u"),
    ("delete", "DELETE", "/{T}/1", "", false, "d"),
    ("create", "POST", "/{T}", "", false, "c"),
    ("search-type", "GET", "/{T}", "_count=5", false, "s"),
    ("search-post", "POST", "/{T}/_search", "", true, "s"),
    ("history-type", "GET", "/{T}/_history", "", false, "s"),
    (
        "conditional-update",
        "PUT",
        "/{T}",
        "identifier=x",
        false,
        "us",
    ),
    (
        "conditional-patch",
        "PATCH",
        "/{T}",
        "identifier=x",
        false,
        "us",
    ),
    (
        "conditional-delete",
        "DELETE",
        "/{T}",
        "identifier=x",
        false,
        "ds",
    ),
    ("compartment", "GET", "/Patient/p1/{T}", "", false, "s"),
    ("system-search-typed", "GET", "/", "_type={T}", false, "s"),
];

/// Requests that need a permission on every type: only `*` scopes can grant them.
const ALL_TYPE_INTERACTIONS: &[(&str, &str, &str, &str)] = &[
    ("search-system", "GET", "/", "_lastUpdated=gt2020"),
    ("history-system", "GET", "/_history", ""),
    ("compartment-all", "GET", "/Patient/p1/*", ""),
    ("system-search-post", "POST", "/_search", ""),
];

const TYPES: &[&str] = &[
    "Observation",
    "Patient",
    "Condition",
    "Medication",
    "AllergyIntolerance",
];

/// Single scopes: (scope, context, type or "*", granted letters).
const SCOPES: &[(&str, Context, &str, &str)] = &[
    (
        "patient/Observation.rs",
        Context::Patient,
        "Observation",
        "rs",
    ),
    (
        "patient/Observation.r",
        Context::Patient,
        "Observation",
        "r",
    ),
    (
        "patient/Observation.s",
        Context::Patient,
        "Observation",
        "s",
    ),
    (
        "patient/Observation.c",
        Context::Patient,
        "Observation",
        "c",
    ),
    (
        "patient/Observation.cu",
        Context::Patient,
        "Observation",
        "cu",
    ),
    (
        "patient/Observation.cruds",
        Context::Patient,
        "Observation",
        "cruds",
    ),
    ("patient/*.rs", Context::Patient, "*", "rs"),
    ("patient/*.cruds", Context::Patient, "*", "cruds"),
    ("patient/Patient.r", Context::Patient, "Patient", "r"),
    ("patient/*.read", Context::Patient, "*", "rs"),
    ("patient/*.*", Context::Patient, "*", "cruds"),
    (
        "patient/Observation.write",
        Context::Patient,
        "Observation",
        "cud",
    ),
    ("user/*.cruds", Context::User, "*", "cruds"),
    ("user/Observation.rs", Context::User, "Observation", "rs"),
    ("user/Condition.ud", Context::User, "Condition", "ud"),
    (
        "user/Observation.write",
        Context::User,
        "Observation",
        "cud",
    ),
    ("user/*.s", Context::User, "*", "s"),
    ("system/Patient.r", Context::System, "Patient", "r"),
    ("system/*.rs", Context::System, "*", "rs"),
    ("system/Encounter.cud", Context::System, "Encounter", "cud"),
    (
        "system/AllergyIntolerance.ds",
        Context::System,
        "AllergyIntolerance",
        "ds",
    ),
];

const CONTEXTS: [Context; 3] = [Context::Patient, Context::User, Context::System];

fn req(method: &str, path: &str, query: &str, form: bool) -> FhirRequest {
    let (ct, body) = if form {
        (
            Some("application/x-www-form-urlencoded"),
            Some(&b"_count=1"[..]),
        )
    } else {
        (None, None)
    };
    match classify(method, path, query, ct, body) {
        Ok(r) => r,
        Err(e) => panic!("{method} {path}?{query}: {e}"),
    }
}

#[test]
fn matrix_scopes_interactions_types_contexts() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for &(scope, scope_ctx, scope_type, letters) in SCOPES {
        let set = ScopeSet::parse(scope).expect("matrix scope parses");
        for ctx in CONTEXTS {
            for ty in TYPES {
                for &(label, method, path, query, form, needs) in INTERACTIONS {
                    let r = req(
                        method,
                        &path.replace("{T}", ty),
                        &query.replace("{T}", ty),
                        form,
                    );
                    let want = ctx == scope_ctx
                        && (scope_type == "*" || scope_type == *ty)
                        && needs.chars().all(|l| letters.contains(l));
                    let permit = set.permits(ctx, &r);
                    checked += 1;
                    let ok = match (&permit, want) {
                        (Permit::Allow(g), true) => {
                            g.conditions.is_empty()
                                && g.patient_compartment == (ctx == Context::Patient)
                                && g.context == ctx
                        }
                        (Permit::Deny(Denial::MissingPermission { .. }), false) => true,
                        _ => false,
                    };
                    if !ok {
                        failures.push(format!(
                            "{scope} as {ctx} on {label} {ty}: want {want}, got {permit:?}"
                        ));
                    }
                }
            }
            for &(label, method, path, query) in ALL_TYPE_INTERACTIONS {
                let r = req(method, path, query, method == "POST");
                let want = ctx == scope_ctx && scope_type == "*" && letters.contains('s');
                let permit = set.permits(ctx, &r);
                checked += 1;
                if permit.is_allowed() != want {
                    failures.push(format!(
                        "{scope} as {ctx} on {label}: want {want}, got {permit:?}"
                    ));
                }
                if !want {
                    assert_eq!(
                        permit,
                        Permit::Deny(Denial::MissingPermission {
                            permission: Permission::Search,
                            resource_type: None
                        })
                    );
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked > 4500, "{checked}");
}

#[test]
fn scopes_are_a_union() {
    let split = ScopeSet::parse("patient/Observation.r patient/Observation.s").expect("ok");
    let joined = ScopeSet::parse("patient/Observation.rs").expect("ok");
    for ty in TYPES {
        for &(_, method, path, query, form, _) in INTERACTIONS {
            let r = req(
                method,
                &path.replace("{T}", ty),
                &query.replace("{T}", ty),
                form,
            );
            assert_eq!(
                split.permits(Context::Patient, &r),
                joined.permits(Context::Patient, &r)
            );
        }
    }
    let mixed = ScopeSet::parse("user/Observation.u user/Observation.s").expect("ok");
    assert!(mixed
        .permits(Context::User, &req("PUT", "/Observation", "code=x", false))
        .is_allowed());
}

const LAB: &str = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
const VITALS: &str = "http://terminology.hl7.org/CodeSystem/observation-category|vital-signs";

fn restricted() -> ScopeSet {
    ScopeSet::parse(&format!(
        "patient/Observation.rs?category={LAB} patient/Observation.rs?category={VITALS}"
    ))
    .expect("ok")
}

fn conditions(p: Permit) -> Vec<Condition> {
    match p {
        Permit::Allow(g) => g.conditions,
        other => panic!("not allowed: {other:?}"),
    }
}

#[test]
fn query_restrictions_become_conditions() {
    let set = restricted();
    // A search that carries the lab restriction.
    let c = conditions(set.permits(
        Context::Patient,
        &req(
            "GET",
            "/Observation",
            &format!("patient=1&category={LAB}"),
            false,
        ),
    ));
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].permission, Permission::Search);
    assert_eq!(c[0].resource_type.as_deref(), Some("Observation"));
    assert_eq!(c[0].any_of.len(), 2);
    let carried: Vec<bool> = c[0].any_of.iter().map(|r| r.carried_by_request).collect();
    assert_eq!(carried, [true, false]);
    assert_eq!(c[0].any_of[0].params[0].name, "category");
    assert_eq!(c[0].any_of[0].params[0].values, [LAB]);

    // Percent-encoded in a form body: same values, still carried.
    let body = "category=http%3A%2F%2Fterminology.hl7.org%2FCodeSystem%2Fobservation-category%7Cvital-signs";
    let r = classify(
        "POST",
        "/Observation/_search",
        "",
        Some("application/x-www-form-urlencoded"),
        Some(body.as_bytes()),
    )
    .expect("ok");
    let c = conditions(set.permits(Context::Patient, &r));
    assert_eq!(
        c[0].any_of
            .iter()
            .map(|r| r.carried_by_request)
            .collect::<Vec<_>>(),
        [false, true]
    );

    // Without the system, or with an extra alternative, the search does not carry it.
    for q in [
        "category=laboratory",
        &format!("category={LAB},exam"),
        "code=x",
        "",
    ] {
        let c = conditions(set.permits(Context::Patient, &req("GET", "/Observation", q, false)));
        assert!(c[0].any_of.iter().all(|r| !r.carried_by_request), "{q}");
    }
    // A read: the returned resource must be checked.
    let c = conditions(set.permits(Context::Patient, &req("GET", "/Observation/1", "", false)));
    assert_eq!(c[0].permission, Permission::Read);
    assert!(c[0].any_of.iter().all(|r| !r.carried_by_request));
    // An unrestricted scope for the same need removes the condition; a `*` one too.
    for extra in ["patient/Observation.s", "patient/*.rs"] {
        let set =
            ScopeSet::parse(&format!("patient/Observation.rs?category={LAB} {extra}")).expect("ok");
        let p = set.permits(Context::Patient, &req("GET", "/Observation", "", false));
        assert!(
            matches!(p, Permit::Allow(ref g) if g.conditions.is_empty()),
            "{p:?}"
        );
    }
    // Other letters are still denied.
    assert!(!set
        .permits(
            Context::Patient,
            &req("DELETE", "/Observation/1", "", false)
        )
        .is_allowed());
    // Compartment search carries too.
    let c = conditions(set.permits(
        Context::Patient,
        &req(
            "GET",
            "/Patient/1/Observation",
            &format!("category={LAB}"),
            false,
        ),
    ));
    assert!(c[0].any_of[0].carried_by_request);
    // A system search is never "carried" (the parameter applies across types).
    let set = ScopeSet::parse(&format!("user/*.rs?category={LAB}")).expect("ok");
    let c = conditions(set.permits(
        Context::User,
        &req("GET", "/", &format!("category={LAB}"), false),
    ));
    assert_eq!(c[0].resource_type, None);
    assert_eq!(
        c[0].any_of,
        [Restriction {
            params: c[0].any_of[0].params.clone(),
            carried_by_request: false
        }]
    );
}

#[test]
fn filters_into_other_types() {
    let set = ScopeSet::parse("patient/Patient.rs patient/Observation.rs").expect("ok");
    let has = req(
        "GET",
        "/Patient",
        "_has:Observation:patient:code=1234-5",
        false,
    );
    assert!(set.permits(Context::Patient, &has).is_allowed());
    let chain = req("GET", "/Observation", "subject:Patient.name=peter", false);
    assert!(set.permits(Context::Patient, &chain).is_allowed());
    let only_patient = ScopeSet::parse("patient/Patient.rs").expect("ok");
    assert_eq!(
        only_patient.permits(Context::Patient, &has),
        Permit::Deny(Denial::MissingPermission {
            permission: Permission::Search,
            resource_type: Some("Observation".into())
        })
    );
    let nested = req(
        "GET",
        "/Patient",
        "_has:Observation:patient:_has:AuditEvent:entity:agent=x",
        false,
    );
    assert!(
        matches!(set.permits(Context::Patient, &nested), Permit::Deny(Denial::MissingPermission { resource_type: Some(ref t), .. }) if t == "AuditEvent")
    );
    let restricted_obs = ScopeSet::parse(&format!(
        "patient/Patient.rs patient/Observation.rs?category={LAB}"
    ))
    .expect("ok");
    assert_eq!(
        restricted_obs.permits(Context::Patient, &has),
        Permit::Deny(Denial::RestrictedFilter {
            resource_type: Some("Observation".into())
        })
    );
}

#[test]
fn operations() {
    let everything = req("GET", "/Patient/p1/$everything", "", false);
    assert!(ScopeSet::parse("patient/*.rs")
        .expect("ok")
        .permits(Context::Patient, &everything)
        .is_allowed());
    assert_eq!(
        ScopeSet::parse("patient/Patient.rs patient/Observation.rs")
            .expect("ok")
            .permits(Context::Patient, &everything),
        Permit::Deny(Denial::MissingPermission {
            permission: Permission::Search,
            resource_type: None
        })
    );
    let export = req("GET", "/$export", "_type=Patient,Observation", false);
    let typed = ScopeSet::parse("system/Patient.rs system/Observation.rs").expect("ok");
    assert!(typed.permits(Context::System, &export).is_allowed());
    assert!(!typed
        .permits(Context::System, &req("GET", "/$export", "", false))
        .is_allowed());
    assert!(ScopeSet::parse("system/*.rs")
        .expect("ok")
        .permits(Context::System, &req("GET", "/Group/g/$export", "", false))
        .is_allowed());
    let lastn = req("GET", "/Observation/$lastn", "", false);
    assert!(ScopeSet::parse("user/Observation.s")
        .expect("ok")
        .permits(Context::User, &lastn)
        .is_allowed());
    let meta_add = req("POST", "/Patient/1/$meta-add", "", false);
    assert!(ScopeSet::parse("user/Patient.u")
        .expect("ok")
        .permits(Context::User, &meta_add)
        .is_allowed());
    assert!(!ScopeSet::parse("user/Patient.rs")
        .expect("ok")
        .permits(Context::User, &meta_add)
        .is_allowed());
    let all = ScopeSet::parse("user/*.cruds").expect("ok");
    for (m, p) in [
        ("POST", "/$process-message"),
        ("GET", "/Observation/$everything"),
        ("POST", "/Patient/1/$custom"),
    ] {
        assert_eq!(
            all.permits(Context::User, &req(m, p, "", false)),
            Permit::Deny(Denial::UnmappedOperation),
            "{p}"
        );
    }
    assert!(all
        .permits(
            Context::User,
            &req("GET", "/ValueSet/$expand", "url=x", false)
        )
        .is_allowed());
}

#[test]
fn capabilities_batch_and_resources() {
    let empty = ScopeSet::default();
    assert!(empty
        .permits(Context::Patient, &req("GET", "/metadata", "", false))
        .is_unconditional());
    assert_eq!(
        empty.permits(Context::User, &req("POST", "/", "", false)),
        Permit::PerEntry
    );
    let set = ScopeSet::parse("patient/Observation.rs openid launch/patient").expect("ok");
    assert!(set
        .permits_resource(Context::Patient, "Observation", Permission::Read)
        .is_allowed());
    assert!(!set
        .permits_resource(Context::Patient, "Patient", Permission::Read)
        .is_allowed());
    assert!(!set
        .permits_resource(Context::User, "Observation", Permission::Read)
        .is_allowed());
    assert!(!set
        .permits(Context::Patient, &req("GET", "/Patient/1", "", false))
        .is_allowed());
    let d = Denial::MissingPermission {
        permission: Permission::Read,
        resource_type: Some("Patient".into()),
    };
    assert_eq!(d.reason(), "missing_permission");
    assert_eq!(d.to_string(), "no scope grants 'r' on Patient");
}
