//! The request hooks of a whole route chain — jwt_auth (cached token) + tenant + smart_scopes +
//! patient_compartment — on the recorded request
//! `GET /fhir/Observation?patient=<id>&category=laboratory` of a patient-facing app, built with
//! `FilterRegistry::builtin()` and a `BuildContext` filled as gateway/src/config.rs fills it.

use caregate::hygiene::normalize_path;
use caregate::router::{RouteMatch, RouteTable};
use caregate_benches::routes::ten_routes_with_chain;
use caregate_benches::{jwt, recorded_request, repo_root, request_ctx, runtime, tenants};
use caregate_fhir::classify;
use caregate_filters::builtin::patient_compartment::CompartmentState;
use caregate_filters::builtin::smart_scopes::ScopeGrant;
use caregate_filters::identity::{Principal, Tenant};
use caregate_filters::{
    BuildContext, Decision, Filter, FilterRegistry, FilterSpec, RequestCtx, RequestHeader,
};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::sync::Arc;
use std::time::Duration;

const PATH: &str = "/fhir/Observation";
const CHAIN: [&str; 4] = ["jwt_auth", "tenant", "smart_scopes", "patient_compartment"];

fn build_chain(rt: &tokio::runtime::Runtime) -> Vec<Arc<dyn Filter>> {
    // As gateway/src/config.rs `validate` builds route filters.
    let cx = BuildContext {
        auth: jwt::auth_config(100_000),
        shared: Default::default(),
        pools: vec!["fhir".into()],
        tenants: tenants(),
        base_dir: repo_root().join("conf"),
    };
    let registry = FilterRegistry::builtin();
    let chain: Vec<Arc<dyn Filter>> = CHAIN
        .iter()
        .map(|kind| {
            registry
                .build(
                    &FilterSpec {
                        kind: (*kind).into(),
                        config: Some(serde_yaml::from_str("{mode: enforce}").expect("yaml")),
                    },
                    &cx,
                )
                .unwrap_or_else(|e| panic!("build {kind}: {e}"))
        })
        .collect();
    match caregate_filters::builtin::jwt_auth::shared_issuer_set(&cx) {
        Some(Ok(set)) => {
            rt.block_on(set.refresh(0))
                .expect("load filters/tests/keys/jwks-all.json");
        }
        _ => panic!("jwt_auth built no issuer set"),
    }
    chain
}

/// Every request hook in route order, as the gateway runs them; the recorded request passes.
async fn run_hooks(chain: &[Arc<dyn Filter>], h: &mut RequestHeader, ctx: &mut RequestCtx) {
    for f in chain {
        match f.request_filter(h, ctx).await {
            Ok(Decision::Continue) => {}
            other => panic!("{} refused the recorded request: {other:?}", f.kind()),
        }
    }
}

fn classify_into(ctx: &mut RequestCtx, below: &str) {
    let class = classify(&ctx.method, below, &ctx.query, None, None)
        .expect("classify the recorded request");
    ctx.facts
        .insert(caregate_filters::ctx::writers::Gateway, class)
        .expect("first classification");
}

fn bench_chain(c: &mut Criterion) {
    let rt = runtime();
    let chain = build_chain(&rt);
    let token = jwt::Minter::new().mint(1);
    let header = recorded_request(Some(&token));
    let query = header
        .uri
        .query()
        .expect("the recorded request has a query")
        .to_string();
    let fresh_ctx = || request_ctx("GET", PATH, &query);
    let classified_ctx = || {
        let mut ctx = fresh_ctx();
        classify_into(&mut ctx, "/Observation");
        ctx
    };

    // Once outside timing: the whole chain passes and writes its facts (the first run verifies
    // the token; every later one is a cache hit).
    for _ in 0..2 {
        let (mut h, mut ctx) = (header.clone(), classified_ctx());
        rt.block_on(run_hooks(&chain, &mut h, &mut ctx));
        assert!(ctx.facts.get::<Principal>().is_some(), "jwt_auth ran");
        assert!(ctx.facts.get::<Tenant>().is_some(), "tenant ran");
        assert!(ctx.facts.get::<ScopeGrant>().is_some(), "smart_scopes ran");
        assert!(
            ctx.facts.get::<CompartmentState>().is_some(),
            "patient_compartment ran"
        );
    }

    let mut g = c.benchmark_group("filter_chain");
    g.bench_function("request_hooks", |b| {
        b.to_async(&rt).iter_batched(
            || (header.clone(), classified_ctx()),
            |(mut h, mut ctx)| {
                let chain = &chain;
                async move {
                    run_hooks(chain, &mut h, &mut ctx).await;
                    (h, ctx)
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("classify+request_hooks", |b| {
        b.to_async(&rt).iter_batched(
            || (header.clone(), fresh_ctx()),
            |(mut h, mut ctx)| {
                let chain = &chain;
                async move {
                    classify_into(&mut ctx, "/Observation");
                    run_hooks(chain, &mut h, &mut ctx).await;
                    (h, ctx)
                }
            },
            BatchSize::SmallInput,
        )
    });
    // The gateway's request side up to the upstream: normalise the path, match it in a table
    // of ten routes, classify the part below the route prefix, run the route's chain.
    let table = RouteTable::new(ten_routes_with_chain(chain.clone()));
    g.bench_function("normalize+route10+classify+request_hooks", |b| {
        b.to_async(&rt).iter_batched(
            || (header.clone(), fresh_ctx()),
            |(mut h, mut ctx)| {
                let table = &table;
                async move {
                    let path = normalize_path(h.uri.path()).expect("normal path");
                    let route =
                        match table.lookup(Some(caregate_benches::TENANT_HOST), &path, "GET") {
                            RouteMatch::Found(r) => r,
                            _ => panic!("no route for the recorded request"),
                        };
                    let below = path
                        .strip_prefix(route.path_prefix.as_str())
                        .unwrap_or("/")
                        .to_string();
                    ctx.host().path = path;
                    classify_into(&mut ctx, &below);
                    run_hooks(&route.filters, &mut h, &mut ctx).await;
                    (h, ctx)
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_chain
}
criterion_main!(benches);
