//! The Redis backend against a real `redis-server` (skipped with a message when it is not
//! installed, unless `CI` is set).
#![allow(clippy::unwrap_used)]

use caregate_integration_tests::{free_port, RedisServer};
use caregate_ratelimit::cluster::{Backend, BackendError};
use caregate_ratelimit::redis_backend::RedisBackend;
use caregate_ratelimit::Quota;
use std::time::{Duration, Instant};

/// A real redis-server on a free loopback port, or None (skipped, said why) when it is not
/// installed and this is not CI.
fn start() -> Option<RedisServer> {
    if !RedisServer::available() {
        return None;
    }
    Some(RedisServer::start(free_port()))
}

#[tokio::test]
async fn gcra_in_lua_matches_the_local_algorithm() {
    let Some(redis) = start() else {
        return;
    };
    let port = redis.port;
    let b = RedisBackend::new(
        &format!("redis://127.0.0.1:{port}/0"),
        Duration::from_millis(500),
    )
    .unwrap();
    let q = Quota::new(1, Duration::from_secs(3600), 3).unwrap();
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let o = b.check("per-client:abc", &q, 1).await.unwrap();
        assert!(o.allowed);
        remaining.push(o.remaining);
    }
    assert_eq!(remaining, [2, 1, 0]);
    let o = b.check("per-client:abc", &q, 1).await.unwrap();
    assert!(!o.allowed);
    assert!(
        o.retry_after > Duration::from_secs(3590),
        "{:?}",
        o.retry_after
    );
    // Another key, a cost above one.
    let o = b.check("per-client:other", &q, 2).await.unwrap();
    assert!(o.allowed);
    assert_eq!(o.remaining, 1);
    // The key expires with its bucket, and carries its hash tag.
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg("caregate:rl:{per-client:abc}")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 3 * 3_600_000 + 1, "{ttl}");
}

#[tokio::test]
async fn a_dead_server_is_an_error_not_a_wait() {
    let port = free_port();
    let b = RedisBackend::new(
        &format!("redis://127.0.0.1:{port}/0"),
        Duration::from_millis(200),
    )
    .unwrap();
    let q = Quota::new(1, Duration::from_secs(1), 1).unwrap();
    let started = Instant::now();
    let e = b.check("k", &q, 1).await.unwrap_err();
    assert!(
        matches!(e, BackendError::Failed(_) | BackendError::Timeout),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}
