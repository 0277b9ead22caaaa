//! `jwt_auth`'s request hook on an RS256 (2048-bit) bearer token: cold (signature verified)
//! and cached (answered from the verified-token cache).

use caregate_benches::{jwt, recorded_request, request_ctx, runtime, test_mode};
use caregate_filters::builtin::jwt_auth::cache::hash_token;
use caregate_filters::builtin::jwt_auth::keys::SystemClock;
use caregate_filters::builtin::jwt_auth::{IssuerSet, JwtAuthConfig, JwtAuthFilter};
use caregate_filters::identity::Principal;
use caregate_filters::{Decision, Filter, RequestCtx, RequestHeader};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A `jwt_auth` filter (`{}`: bearer required, every issuer) over its own issuer set with a
/// token cache of `cache_entries` entries.
fn filter(rt: &tokio::runtime::Runtime, cache_entries: usize) -> JwtAuthFilter {
    let set = IssuerSet::build(
        &jwt::auth_config(cache_entries),
        &|p| p.to_path_buf(),
        Arc::new(SystemClock),
    )
    .expect("build the issuer set");
    let set = Arc::new(set);
    rt.block_on(set.refresh(0))
        .expect("load filters/tests/keys/jwks-all.json");
    let cfg: JwtAuthConfig = serde_yaml::from_str("{}").expect("default jwt_auth config");
    JwtAuthFilter::new(set, cfg).expect("build jwt_auth")
}

fn ctx() -> RequestCtx {
    request_ctx("GET", "/fhir/Observation", "patient=p&category=laboratory")
}

async fn run(f: &JwtAuthFilter, h: &mut RequestHeader, ctx: &mut RequestCtx) {
    let d = f.request_filter(h, ctx).await;
    assert!(
        matches!(d, Ok(Decision::Continue)),
        "jwt_auth refused the bench token: {d:?}"
    );
}

fn bench_jwt(c: &mut Criterion) {
    let rt = runtime();
    let minter = jwt::Minter::new();
    // Distinct tokens cycled through a FIFO cache half their number: every lookup misses, every
    // verified token is inserted and evicts the oldest (the full cost of a never-seen token).
    let (n_tokens, cache_entries) = if test_mode() { (4, 2) } else { (2048, 1024) };
    let started = Instant::now();
    let distinct: Vec<RequestHeader> = (0..n_tokens)
        .map(|i| recorded_request(Some(&minter.mint(i as u64))))
        .collect();
    eprintln!(
        "jwt: minted {n_tokens} RS256 tokens in {:.1?} (outside timing)",
        started.elapsed()
    );
    let token = minter.mint(u64::MAX);
    eprintln!("jwt: token {} bytes", token.len());
    let one = recorded_request(Some(&token));

    let cold = filter(&rt, cache_entries);
    let off = filter(&rt, 0);
    let cached = filter(&rt, 100_000);

    // Once outside timing: the token is accepted and mapped.
    let mut c0 = ctx();
    rt.block_on(run(&cached, &mut one.clone(), &mut c0));
    let p = c0.facts.get::<Principal>().expect("a principal");
    assert_eq!(p.patient.as_deref(), Some(caregate_benches::PATIENT_ID));
    assert_eq!(p.tenant.as_deref(), Some(caregate_benches::TENANT));
    // ... and the second time it comes from the cache.
    let hits = jwt::token_cache_count("hit");
    rt.block_on(run(&cached, &mut one.clone(), &mut ctx()));
    assert_eq!(
        jwt::token_cache_count("hit"),
        hits + 1,
        "a repeated token must be a cache hit"
    );

    let hits_before = jwt::token_cache_count("hit");
    let mut g = c.benchmark_group("jwt_auth");
    let mut next = 0usize;
    g.bench_function("cold/distinct_tokens_cache_smaller_than_set", |b| {
        b.to_async(&rt).iter_batched(
            || {
                next = (next + 1) % distinct.len();
                (distinct[next].clone(), ctx())
            },
            |(mut h, mut ctx)| {
                let f = &cold;
                async move {
                    run(f, &mut h, &mut ctx).await;
                    (h, ctx)
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("cold/cache_off_same_token", |b| {
        b.to_async(&rt).iter_batched(
            || (one.clone(), ctx()),
            |(mut h, mut ctx)| {
                let f = &off;
                async move {
                    run(f, &mut h, &mut ctx).await;
                    (h, ctx)
                }
            },
            BatchSize::SmallInput,
        )
    });
    let hits_after = jwt::token_cache_count("hit");
    assert_eq!(
        hits_before, hits_after,
        "the cold benches must never hit the token cache"
    );
    g.bench_function("cached/same_token", |b| {
        b.to_async(&rt).iter_batched(
            || (one.clone(), ctx()),
            |(mut h, mut ctx)| {
                let f = &cached;
                async move {
                    run(f, &mut h, &mut ctx).await;
                    (h, ctx)
                }
            },
            BatchSize::SmallInput,
        )
    });

    // Parts of the two paths, to see where the time goes: the signature check alone
    // (jsonwebtoken with the same key, built from the JWKS entry as caregate builds it, and the
    // validation caregate asks of it), and the cache key (SHA-256 of the token).
    let key = rsa1_decoding_key();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims = Default::default();
    jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(&token, &key, &validation)
        .expect("the bench token verifies");
    g.bench_function("parts/jsonwebtoken_decode_only", |b| {
        b.iter(|| {
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                black_box(&token),
                &key,
                &validation,
            )
        })
    });
    g.bench_function("parts/hash_token_sha256", |b| {
        b.iter(|| hash_token(black_box(&token)))
    });
    g.finish();
}

/// The `rsa1` entry of jwks-all.json as a decoding key (`DecodingKey::from_jwk`, as
/// filters/src/builtin/jwt_auth/keys.rs builds it).
fn rsa1_decoding_key() -> DecodingKey {
    let text = std::fs::read(jwt::keys_dir().join("jwks-all.json")).expect("read jwks-all.json");
    let set: serde_json::Value = serde_json::from_slice(&text).expect("jwks-all.json is JSON");
    let jwk = set["keys"]
        .as_array()
        .and_then(|ks| ks.iter().find(|k| k["kid"] == "rsa1"))
        .cloned()
        .expect("jwks-all.json holds rsa1");
    let jwk: Jwk = serde_json::from_value(jwk).expect("rsa1 is a JWK");
    DecodingKey::from_jwk(&jwk).expect("rsa1 is an RSA public key")
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_jwt
}
criterion_main!(benches);
