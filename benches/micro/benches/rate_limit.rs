//! The `rate_limit` hot path: the GCRA step, the local store (one hot key, and a flood of
//! distinct keys past its cap), the HMAC key hashing, a concurrency slot, the filter's request
//! hook with a local limit, and — when `/usr/bin/redis-server` is installed — the same check
//! against a local Redis (one round trip per request, loopback).

use caregate_benches::{repo_root, runtime};
use caregate_filters::{BuildContext, FilterRegistry, FilterSpec, RequestCtx, RequestHeader};
use caregate_ratelimit::cluster::Backend;
use caregate_ratelimit::concurrency::ConcurrencyLimiter;
use caregate_ratelimit::keys::KeyHasher;
use caregate_ratelimit::local::LocalStore;
use caregate_ratelimit::redis_backend::RedisBackend;
use caregate_ratelimit::{gcra, Quota};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn quota() -> Quota {
    // Generous enough that the measured requests are allowed.
    Quota::new(1_000_000_000, Duration::from_secs(1), 1_000_000_000).expect("quota")
}

fn bench_local(c: &mut Criterion) {
    let q = quota();
    let mut g = c.benchmark_group("rate_limit");
    g.bench_function("gcra_step", |b| {
        let mut tat = None;
        let mut now = 0u64;
        b.iter(|| {
            now += 1_000;
            let (o, t) = gcra::step(tat, now, &q, 1);
            tat = t.or(tat);
            black_box(o)
        })
    });
    let store = LocalStore::new(100_000);
    g.bench_function("local_check_hot_key", |b| {
        b.iter(|| black_box(store.check("per-client:4:app1", &q, 1)))
    });
    let keys: Vec<String> = (0..200_000).map(|i| format!("per-addr:10.{i}")).collect();
    let flood = LocalStore::new(100_000);
    let mut i = 0usize;
    g.bench_function("local_check_flood_past_cap", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(flood.check(&keys[i], &q, 1))
        })
    });
    let hasher = KeyHasher::new(b"0123456789abcdef0123456789abcdef").expect("secret");
    g.bench_function("hmac_key", |b| {
        b.iter(|| black_box(hasher.hash(b"7:subject=36:ee9f8dd8-72d2-4769-8020-89e504b1504b")))
    });
    let conc = ConcurrencyLimiter::new();
    g.bench_function("concurrency_acquire_release", |b| {
        b.iter(|| black_box(conc.try_acquire("per-user:abc", 10).is_ok()))
    });

    // The filter's request hook + logging, local store, keyed on the client address and on the
    // (hashed) subject.
    let rt = runtime();
    let cx = BuildContext {
        base_dir: repo_root().join("conf"),
        ..Default::default()
    };
    let spec = FilterSpec {
        kind: "rate_limit".into(),
        config: Some(
            serde_yaml::from_str(
                "hash_key: 0123456789abcdef0123456789abcdef\n\
                 limits:\n\
                 - { name: per-addr, key: [client_addr], rate: 1000000000, per_seconds: 1 }\n",
            )
            .expect("yaml"),
        ),
    };
    let filter = FilterRegistry::builtin()
        .build(&spec, &cx)
        .expect("build rate_limit");
    let ctx = || {
        let mut ctx = RequestCtx::for_test("GET", "/api/x");
        ctx.host().client_addr = Some("192.0.2.7".parse().expect("ip"));
        ctx
    };
    let header = RequestHeader::build("GET", b"/api/x", None).expect("header");
    g.bench_function("filter_request_hook_local", |b| {
        b.to_async(&rt).iter_batched(
            || (header.clone(), ctx()),
            |(mut h, mut ctx)| {
                let f = &filter;
                async move {
                    let d = f.request_filter(&mut h, &mut ctx).await;
                    f.logging(&ctx);
                    (d.is_ok(), ctx)
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// A redis-server on a free loopback port, killed on drop.
struct Redis(std::process::Child, u16);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> Option<Redis> {
    let bin = "/usr/bin/redis-server";
    if !std::path::Path::new(bin).exists() {
        eprintln!("rate_limit/redis_check skipped: {bin} is not installed");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = std::process::Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let redis = Redis(child, port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(redis)
}

fn bench_redis(c: &mut Criterion) {
    let Some(redis) = start_redis() else {
        return;
    };
    let rt = runtime();
    let backend = Arc::new(
        RedisBackend::new(
            &format!("redis://127.0.0.1:{}/0", redis.1),
            Duration::from_secs(1),
        )
        .expect("url"),
    );
    let q = quota();
    rt.block_on(backend.check("warm", &q, 1))
        .expect("redis answers");
    let mut g = c.benchmark_group("rate_limit");
    g.bench_function("redis_check_loopback", |b| {
        b.to_async(&rt).iter(|| {
            let backend = &backend;
            let q = &q;
            async move { black_box(backend.check("per-client:4:app1", q, 1).await.is_ok()) }
        })
    });
    g.finish();
    drop(redis);
}

criterion_group!(benches, bench_local, bench_redis);
criterion_main!(benches);
