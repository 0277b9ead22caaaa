//! PHI masking (`caregate-mask`) against a `serde_json` parse-and-serialize round trip of the
//! same bytes, side by side in one group per body, plus the `fhir_mask` filter's response path
//! fed in 16 KB chunks (the engine has no streaming form: the filter buffers, then masks).

use bytes::Bytes;
use caregate_benches::{app_principal, mask_rules, request_ctx, synthea_bundles, MASK_RULES_YAML};
use caregate_filters::{
    BuildContext, Filter, FilterRegistry, FilterSpec, RequestCtx, ResponseHeader,
};
use caregate_mask::Masker;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

const SEARCHSET_70K: &[u8] = include_bytes!("../../data/searchset-70k.json");
const CHUNK: usize = 16 * 1024;
const ROLE: &str = "billing";

/// `fhir_mask` with one profile (role `billing`) holding the bench rules, built as the gateway
/// builds route filters.
fn mask_filter() -> Arc<dyn Filter> {
    let resources: serde_yaml::Value =
        serde_yaml::from_str(MASK_RULES_YAML).expect("MASK_RULES_YAML is YAML");
    let mut profile = serde_yaml::Mapping::new();
    profile.insert("roles".into(), vec![serde_yaml::Value::from(ROLE)].into());
    profile.insert("resources".into(), resources);
    let mut config = serde_yaml::Mapping::new();
    config.insert(
        "profiles".into(),
        vec![serde_yaml::Value::Mapping(profile)].into(),
    );
    FilterRegistry::builtin()
        .build(
            &FilterSpec {
                kind: "fhir_mask".into(),
                config: Some(serde_yaml::Value::Mapping(config)),
            },
            &BuildContext::default(),
        )
        .expect("build fhir_mask")
}

fn response_ctx() -> (ResponseHeader, RequestCtx) {
    let mut ctx = request_ctx("GET", "/fhir/Observation", "");
    let mut p = app_principal();
    p.roles = vec![ROLE.into()];
    ctx.facts
        .insert(caregate_filters::ctx::writers::JwtAuth, p)
        .expect("first principal");
    let mut resp = ResponseHeader::build(200, None).expect("a 200 response header");
    resp.insert_header("content-type", "application/fhir+json")
        .expect("content-type");
    (resp, ctx)
}

/// The filter's response hooks over `chunks`: what comes out (the masked body, in the last
/// chunk).
fn filter_pass(
    f: &dyn Filter,
    chunks: &[Bytes],
    resp: &mut ResponseHeader,
    ctx: &mut RequestCtx,
) -> Vec<Bytes> {
    f.response_filter(resp, ctx)
        .expect("fhir_mask response_filter");
    let mut out = Vec::with_capacity(1);
    for (i, c) in chunks.iter().enumerate() {
        let mut ch = Some(c.clone());
        f.response_body_filter(&mut ch, i + 1 == chunks.len(), ctx)
            .expect("fhir_mask response_body_filter");
        if let Some(x) = ch {
            out.push(x);
        }
    }
    out
}

fn serde_round_trip(body: &[u8]) -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_slice(body).expect("the body is JSON");
    serde_json::to_vec(&v).expect("serialize")
}

fn bench_body(c: &mut Criterion, group: &str, body: &[u8], masker: &Masker, f: &dyn Filter) {
    // Once, outside timing: masking changes the body, so the bench never measures a no-op.
    let masked = masker.mask(body).expect("the body masks");
    assert_ne!(
        masked.body, body,
        "{group}: masking left the body unchanged; the bench would measure a no-op"
    );
    assert!(
        masked.resources_masked >= 1 && masked.elements_masked >= 1,
        "{group}: nothing was masked ({} resources, {} elements)",
        masked.resources_masked,
        masked.elements_masked
    );
    let whole = Bytes::copy_from_slice(body);
    let chunks: Vec<Bytes> = (0..body.len())
        .step_by(CHUNK)
        .map(|s| whole.slice(s..(s + CHUNK).min(body.len())))
        .collect();
    {
        let (mut resp, mut ctx) = response_ctx();
        let out = filter_pass(f, &chunks, &mut resp, &mut ctx);
        let joined: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(
            joined, masked.body,
            "{group}: the filter's chunked output must equal the engine's"
        );
    }

    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("caregate_mask", |b| b.iter(|| masker.mask(black_box(body))));
    g.bench_function("serde_json_roundtrip", |b| {
        b.iter(|| serde_round_trip(black_box(body)))
    });
    g.bench_function("fhir_mask_filter_16k_chunks", |b| {
        b.iter_batched(
            response_ctx,
            |(mut resp, mut ctx)| {
                let out = filter_pass(f, black_box(&chunks), &mut resp, &mut ctx);
                (out, resp, ctx)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn bench_masking(c: &mut Criterion) {
    let masker = Masker::new(mask_rules()).expect("compile the bench mask rules");
    let f = mask_filter();
    bench_body(c, "mask/searchset_70k", SEARCHSET_70K, &masker, &*f);
    for (name, body) in synthea_bundles() {
        bench_body(c, &format!("mask/synthea_{name}"), &body, &masker, &*f);
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    targets = bench_masking
}
criterion_main!(benches);
