//! The per-request decisions before any filter: path normalisation, route match, FHIR
//! classification, SMART scope checks and the Patient-compartment check.

use caregate::hygiene::normalize_path;
use caregate::router::{RouteMatch, RouteTable};
use caregate_benches::routes::{ten_routes, thousand_routes};
use caregate_benches::{app_principal, request_ctx, runtime, PATIENT_ID};
use caregate_fhir::{classify, Context, FhirRequest, Permit, ScopeSet};
use caregate_filters::builtin::patient_compartment::{body_in_compartment, judge};
use caregate_filters::builtin::smart_scopes;
use caregate_filters::{
    BuildContext, Decision, FilterRegistry, FilterSpec, RequestCtx, RequestHeader,
};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

const SEARCHSET_70K: &[u8] = include_bytes!("../../data/searchset-70k.json");

fn bench_normalize_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("normalize_path");
    let cases = [
        // The path part of `/fhir/Observation?patient=123&category=laboratory`.
        ("typical_fhir", "/fhir/Observation".to_string()),
        ("typical_fhir_read", format!("/fhir/Patient/{PATIENT_ID}")),
        // Percent escapes (unreserved ones decoded, others upper-cased), duplicate slashes and
        // dot segments, some of them encoded.
        (
            "escapes_and_dot_segments",
            "/fhir//Patient/./%65e9f8dd8-72d2/../%2e/ee9f8dd8%2D72d2-4769-8020-89e504b1504b/_history/%31%e2%82%ac"
                .to_string(),
        ),
    ];
    for (name, path) in cases {
        let normal = normalize_path(&path).expect("the bench paths are acceptable");
        assert!(normal.starts_with("/fhir/"), "{name}: {normal}");
        g.bench_function(name, |b| b.iter(|| normalize_path(black_box(&path))));
    }
    g.finish();
}

fn bench_route_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    for (name, routes) in [
        ("10_routes", ten_routes()),
        ("1000_routes_hostless", thousand_routes(false)),
        ("1000_routes_99_hosts", thousand_routes(true)),
    ] {
        let n = routes.len();
        let table = RouteTable::new(routes);
        assert_eq!(table.len(), n);
        assert!(n == 10 || n == 1000);
        let host = Some("a.example.org");
        match table.lookup(host, "/fhir/Observation", "GET") {
            RouteMatch::Found(r) => assert_eq!(&*r.name, "patient-fhir"),
            _ => panic!("the FHIR route must match /fhir/Observation"),
        }
        assert!(matches!(
            table.lookup(host, "/nowhere/x", "GET"),
            RouteMatch::NotFound
        ));
        g.bench_function(format!("{name}/hit_fhir"), |b| {
            b.iter(|| {
                matches!(
                    table.lookup(black_box(host), black_box("/fhir/Observation"), "GET"),
                    RouteMatch::Found(_)
                )
            })
        });
        g.bench_function(format!("{name}/miss"), |b| {
            b.iter(|| {
                matches!(
                    table.lookup(black_box(host), black_box("/nowhere/x"), "GET"),
                    RouteMatch::NotFound
                )
            })
        });
    }
    g.finish();
}

type ClassifyCase = (
    &'static str,
    &'static str,
    String,
    String,
    Option<&'static str>,
    Option<Vec<u8>>,
);

fn classify_cases() -> Vec<ClassifyCase> {
    let p = PATIENT_ID;
    vec![
        ("read", "GET", format!("/Patient/{p}"), String::new(), None, None),
        (
            "search_6_params",
            "GET",
            "/Observation".into(),
            format!(
                "patient={p}&category=laboratory&date=ge2023-01-01&code=http://loinc.org|4548-4,http://loinc.org|2339-0&_count=50&_sort=-date"
            ),
            None,
            None,
        ),
        (
            "post_search_form_body",
            "POST",
            "/Observation/_search".into(),
            String::new(),
            Some("application/x-www-form-urlencoded"),
            Some(format!("patient={p}&category=laboratory&_count=50").into_bytes()),
        ),
        (
            "instance_operation_everything",
            "GET",
            format!("/Patient/{p}/$everything"),
            "_count=100".into(),
            None,
            None,
        ),
    ]
}

fn bench_classify(c: &mut Criterion) {
    let mut g = c.benchmark_group("fhir_classify");
    for (name, method, path, query, ct, body) in classify_cases() {
        let class = classify(method, &path, &query, ct, body.as_deref())
            .expect("the bench requests classify");
        assert!(
            !name.starts_with("search") || class.params.len() == 6,
            "{class:?}"
        );
        g.bench_function(name, |b| {
            b.iter(|| {
                classify(
                    black_box(method),
                    black_box(&path),
                    black_box(&query),
                    ct,
                    body.as_deref(),
                )
            })
        });
    }
    g.finish();
}

fn bench_scopes(c: &mut Criterion) {
    let mut g = c.benchmark_group("smart_scopes");
    let p = PATIENT_ID;
    let lab = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
    // A granular v2 scope with a query restriction, beside plain ones.
    let granular = format!(
        "launch/patient openid fhirUser patient/Patient.r patient/Observation.rs?category={lab} patient/Condition.rs"
    );
    let scopes = ScopeSet::parse(&granular).expect("the bench scopes parse");
    let plain = ScopeSet::parse(caregate_benches::APP_SCOPES).expect("the app scopes parse");

    let restricted_search = classify(
        "GET",
        "/Observation",
        &format!("patient={p}&category={lab}"),
        None,
        None,
    )
    .expect("classify the restricted search");
    let plain_search = classify(
        "GET",
        "/Observation",
        &format!("patient={p}&category=laboratory"),
        None,
        None,
    )
    .expect("classify the search");
    let read = classify("GET", &format!("/Patient/{p}"), "", None, None).expect("classify read");

    match scopes.permits(Context::Patient, &restricted_search) {
        Permit::Allow(g) => assert!(
            g.conditions
                .iter()
                .all(|c| c.any_of.iter().any(|r| r.carried_by_request)),
            "the search carries the scope's restriction: {g:?}"
        ),
        other => panic!("restricted search must be allowed: {other:?}"),
    }
    assert!(scopes.permits(Context::Patient, &read).is_allowed());
    assert!(plain.permits(Context::Patient, &plain_search).is_allowed());

    g.bench_function("parse_granular_scope_string", |b| {
        b.iter(|| ScopeSet::parse(black_box(&granular)))
    });
    g.bench_function("permits/search_granular_query_restriction", |b| {
        b.iter(|| scopes.permits(Context::Patient, black_box(&restricted_search)))
    });
    g.bench_function("permits/read_patient", |b| {
        b.iter(|| scopes.permits(Context::Patient, black_box(&read)))
    });
    g.bench_function("permits/search_plain_scope", |b| {
        b.iter(|| plain.permits(Context::Patient, black_box(&plain_search)))
    });
    // What the smart_scopes filter does per request: join + parse the token's scopes, then
    // permits() for each context the caller has.
    let principal = app_principal();
    assert!(smart_scopes::judge(&principal, &plain_search, false).is_ok());
    g.bench_function("filter_judge/search_plain_scope", |b| {
        b.iter(|| smart_scopes::judge(black_box(&principal), black_box(&plain_search), false))
    });
    g.finish();
}

fn compartment_ctx(class: &FhirRequest) -> RequestCtx {
    let mut ctx = request_ctx("GET", "/fhir/Observation", "");
    ctx.facts
        .insert(caregate_filters::ctx::writers::JwtAuth, app_principal())
        .expect("first principal");
    ctx.facts
        .insert(caregate_filters::ctx::writers::Gateway, class.clone())
        .expect("first classification");
    ctx
}

fn bench_compartment(c: &mut Criterion) {
    let mut g = c.benchmark_group("patient_compartment");
    let search = classify(
        "GET",
        "/Observation",
        &format!("patient={PATIENT_ID}&category=laboratory"),
        None,
        None,
    )
    .expect("classify the search");
    assert!(judge(PATIENT_ID, &search).is_ok());
    g.bench_function("judge/search_by_patient", |b| {
        b.iter(|| judge(black_box(PATIENT_ID), black_box(&search)))
    });

    // The filter's request hook, built as the gateway builds it.
    let filter = FilterRegistry::builtin()
        .build(
            &FilterSpec {
                kind: "patient_compartment".into(),
                config: None,
            },
            &BuildContext::default(),
        )
        .expect("build patient_compartment");
    let header = caregate_benches::recorded_request(None);
    let rt = runtime();
    {
        let (mut h, mut ctx) = (header.clone(), compartment_ctx(&search));
        let d = rt.block_on(filter.request_filter(&mut h, &mut ctx));
        assert!(matches!(d, Ok(Decision::Continue)), "{d:?}");
    }
    g.bench_function("request_hook/search_by_patient", |b| {
        b.to_async(&rt).iter_batched(
            || (header.clone(), compartment_ctx(&search)),
            |(mut h, mut ctx): (RequestHeader, RequestCtx)| {
                let f = &filter;
                async move {
                    let d = f.request_filter(&mut h, &mut ctx).await;
                    (d, h, ctx)
                }
            },
            BatchSize::SmallInput,
        )
    });

    // The response check on a 70 KB searchset Bundle (53 entries, all the patient's).
    assert!(
        body_in_compartment(SEARCHSET_70K, PATIENT_ID),
        "every entry of searchset-70k.json is in the patient's compartment"
    );
    g.throughput(Throughput::Bytes(SEARCHSET_70K.len() as u64));
    g.bench_function("response_check/searchset_70k", |b| {
        b.iter(|| body_in_compartment(black_box(SEARCHSET_70K), PATIENT_ID))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_normalize_path, bench_route_lookup, bench_classify, bench_scopes, bench_compartment
}
criterion_main!(benches);
