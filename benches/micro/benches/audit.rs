//! Encoding one audit access record (caregate-audit), without the file I/O: building the record
//! from the request's facts, its JSON payload (what `AuditSink::append*` serializes on the
//! caller's thread), its FHIR AuditEvent form, and the HMAC-chained line.

use caregate_audit::fhir::to_fhir_audit_event;
use caregate_audit::{
    build_line, now_rfc3339, Action, Actor, AuditRecord, Outcome, Phase, Upstream,
};
use caregate_benches::{app_principal, request_ctx, PATIENT_ID, TENANT};
use caregate_filters::identity::{Principal, Tenant};
use caregate_filters::RequestCtx;
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::Duration;

/// The record of a request as the gateway builds it (`Gateway::audit_record` in
/// gateway/src/proxy.rs is private and needs a Pingora session; this mirrors its field mapping).
fn record(ctx: &RequestCtx, phase: Phase, status: Option<u16>) -> AuditRecord {
    let principal = ctx.facts.get::<Principal>();
    AuditRecord {
        time: now_rfc3339(),
        request_id: ctx.request_id.clone(),
        phase,
        actor: Actor {
            subject: principal.map(|p| p.subject.clone()),
            issuer: principal.and_then(|p| p.issuer.clone()),
            client_id: principal.and_then(|p| p.client_id.clone()),
            roles: principal.map(|p| p.roles.clone()).unwrap_or_default(),
            tenant: ctx
                .facts
                .get::<Tenant>()
                .map(|t| t.id.clone())
                .or_else(|| principal.and_then(|p| p.tenant.clone())),
            auth_method: principal.map(|p| p.method.as_str().to_string()),
            source_address: ctx.client_addr.map(|a| a.to_string()),
            client_certificate_subject: None,
            system: None,
        },
        action: Action {
            method: ctx.method.clone(),
            route: ctx.route.as_deref().unwrap_or("").to_string(),
            listener: ctx.listener.to_string(),
            channel: ctx.channel.as_str().to_string(),
            interaction: Some("search-type".into()),
            resource_type: Some("Observation".into()),
            resource_id: None,
            patient: principal.and_then(|p| p.patient.clone()),
            ..Default::default()
        },
        outcome: Outcome {
            status,
            reason: None,
            bytes: status.map(|_| 70_655),
            duration_ms: status.map(|_| 12),
        },
        upstream: Some(Upstream {
            pool: "fhir".into(),
            zone: Some("zone-a".into()),
        }),
        config: None,
        hl7: None,
        anomaly: None,
        break_glass: None,
        environment: None,
    }
}

fn bench_audit(c: &mut Criterion) {
    let mut ctx = request_ctx(
        "GET",
        "/fhir/Observation",
        &format!("patient={PATIENT_ID}&category=laboratory"),
    );
    ctx.facts
        .insert(caregate_filters::ctx::writers::JwtAuth, app_principal())
        .expect("first principal");
    ctx.facts
        .insert(
            caregate_filters::ctx::writers::Tenant,
            Tenant {
                id: TENANT.into(),
                pool: None,
            },
        )
        .expect("first tenant");
    let rec = record(&ctx, Phase::Access, None);
    let payload = serde_json::to_vec(&rec).expect("serialize the record");
    let key = b"an-audit-hmac-key-of-32-bytes-or-more!!";
    let prev = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let event = to_fhir_audit_event(&rec);
    assert_eq!(event["resourceType"], "AuditEvent");
    let (line, _) = build_line(key, 42, prev, "record", &payload);
    eprintln!(
        "audit: record payload {} B, AuditEvent {} B, chained line {} B",
        payload.len(),
        serde_json::to_vec(&event).map(|v| v.len()).unwrap_or(0),
        line.len()
    );

    let mut g = c.benchmark_group("audit");
    g.bench_function("record_build_from_facts", |b| {
        b.iter(|| record(black_box(&ctx), Phase::Access, None))
    });
    g.bench_function("record_json", |b| {
        b.iter(|| serde_json::to_vec(black_box(&rec)))
    });
    g.bench_function("fhir_audit_event_json", |b| {
        b.iter(|| serde_json::to_vec(&to_fhir_audit_event(black_box(&rec))))
    });
    g.bench_function("chain_line_hmac", |b| {
        b.iter(|| build_line(key, 42, prev, "record", black_box(&payload)))
    });
    g.bench_function("total_json_build+serialize+chain", |b| {
        b.iter(|| {
            let rec = record(black_box(&ctx), Phase::Access, None);
            let payload = serde_json::to_vec(&rec).expect("serialize");
            build_line(key, 42, prev, "record", &payload)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = bench_audit
}
criterion_main!(benches);
