//! `rate_limit` end to end: a local limit on one gateway, and a cluster-wide limit shared by two
//! gateway processes through a real `redis-server`, which is then stalled (SIGSTOP) and killed:
//! requests go on under the local fallback without waiting on Redis, and the shared limit
//! applies again once Redis is back.
//!
//! The Redis test needs `/usr/bin/redis-server` (scripts/deps.sh installs it): without it the
//! test is skipped with a message, except under CI (`CI` set), where its absence fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The request timeout towards Redis the cluster test configures, and the most a request may
/// take while Redis is down or stalled (timeout + a generous margin for a debug build on a
/// loaded machine).
const TIMEOUT_MS: u64 = 100;
const MAX_LATENCY: Duration = Duration::from_millis(600);

fn pool(backend: &EchoServer) -> String {
    format!(
        "pools: [ {{ name: app, zones: [ {{ name: a, backends: [ {{ address: \"{}\" }} ] }} ] }} ]",
        backend.addr
    )
}

#[test]
fn a_local_limit_refuses_after_the_burst_with_headers() {
    let backend = EchoServer::start("app");
    let (public, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: public, channel: public, listen: "127.0.0.1:{public}" }}
{pool}
routes:
  - name: api
    listener: public
    path_prefix: /api
    pool: app
    filters:
      - kind: rate_limit
        config:
          limits:
            - {{ name: per-addr, key: [client_addr], rate: 3, per_seconds: 60 }}
"#,
        pool = pool(&backend)
    );
    let gw = Gateway::start(&yaml, admin);
    let to = addr(public);
    for left in [2, 1, 0] {
        let r = get(to, "/api/x");
        assert_eq!(r.status, 200, "{}", r.text());
        let field = r.header("ratelimit").unwrap_or_default();
        assert!(
            field.starts_with(&format!("\"per-addr\";r={left};t=")),
            "{field}"
        );
        assert_eq!(r.header("ratelimit-policy"), Some("\"per-addr\";q=3;w=60"));
    }
    let before = backend.count();
    let r = get(to, "/api/x");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["reason"], "rate_limited");
    assert_eq!(r.header("retry-after"), Some("20"), "one unit every 20 s");
    assert_eq!(r.header("ratelimit"), Some("\"per-addr\";r=0;t=20"));
    assert_eq!(r.header("ratelimit-policy"), Some("\"per-addr\";q=3;w=60"));
    assert_eq!(backend.count(), before, "nothing went upstream");
    // Another client address has its own bucket.
    let r = request_from(IpAddr::from([127, 0, 0, 2]), to, "GET", "/api/x", &[]);
    assert_eq!(r.status, 200);

    let m = gw.metrics();
    assert!(
        m.contains(
            "caregate_ratelimit_decisions_total{limit=\"per-addr\",result=\"limited\",route=\"api\"} 1"
        ),
        "{m}"
    );
    assert!(
        m.contains("caregate_rate_limited_total{limit=\"per-addr\",route=\"api\"} 1"),
        "{m}"
    );
}

fn cluster_gateway(backend: &EchoServer, redis_port: u16) -> (Gateway, SocketAddr) {
    let (public, admin) = (free_port(), free_port());
    let store = format!(
        "{{ kind: redis, url: \"redis://127.0.0.1:{redis_port}/0\", timeout_ms: {TIMEOUT_MS}, retry_after_ms: 300, fallback: local, local_share: 0.5 }}"
    );
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: public, channel: public, listen: "127.0.0.1:{public}" }}
{pool}
routes:
  - name: api
    listener: public
    path_prefix: /api
    pool: app
    filters:
      - kind: rate_limit
        config:
          store: {store}
          limits:
            - {{ name: shared, key: [client_addr], rate: 10, per_seconds: 3600 }}
  - name: probe
    listener: public
    path_prefix: /probe
    pool: app
    filters:
      - kind: rate_limit
        config:
          store: {store}
          limits:
            - {{ name: probe, key: [], rate: 1000, per_seconds: 3600 }}
"#,
        pool = pool(backend)
    );
    (Gateway::start(&yaml, admin), addr(public))
}

/// Whether the gateway decides on Redis: the probe limit (1000, shared by both gateways) shows
/// more than the 500 units its local fallback (half) could ever leave.
fn on_redis(to: SocketAddr) -> bool {
    let Ok(r) = try_request(to, "GET", "/probe", &[], b"") else {
        return false;
    };
    r.header("ratelimit")
        .and_then(|f| f.split(";r=").nth(1))
        .and_then(|rest| rest.split(';').next())
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|r| r > 500)
}

/// `n` requests from `src`: the first `first` to the first gateway, the rest to the second; how
/// many each allowed, checking every answer is a 200 or a 429 and every latency stays under
/// [`MAX_LATENCY`].
fn spread(gws: &[SocketAddr; 2], src: [u8; 4], first: usize, n: usize) -> [usize; 2] {
    let mut allowed = [0; 2];
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let k = usize::from(i >= first);
        let started = Instant::now();
        let r = request_from(IpAddr::from(src), gws[k], "GET", "/api/x", &[]);
        let took = started.elapsed();
        slowest = slowest.max(took);
        assert!(
            took < MAX_LATENCY,
            "request {i} took {took:?} (Redis timeout {TIMEOUT_MS} ms)"
        );
        match r.status {
            200 => allowed[k] += 1,
            429 => {
                assert_eq!(r.json()["reason"], "rate_limited");
                assert!(r.header("retry-after").is_some());
            }
            s => panic!("unexpected status {s}: {}", r.text()),
        }
    }
    eprintln!("from {src:?}: allowed {allowed:?} of {n}, slowest request {slowest:?}");
    allowed
}

#[test]
fn a_cluster_limit_holds_across_two_gateways_and_survives_redis_outages() {
    if !RedisServer::available() {
        return;
    }
    let mut redis = RedisServer::start(free_port());
    let backend = EchoServer::start("app");
    let (gw1, a1) = cluster_gateway(&backend, redis.port);
    let (gw2, a2) = cluster_gateway(&backend, redis.port);
    let gws = [a1, a2];
    for &g in &gws {
        wait_until(
            "the gateway to decide on Redis",
            Duration::from_secs(20),
            || on_redis(g),
        );
    }

    // Redis up: the limit (10 per hour for one client address) holds across both gateways,
    // exactly — tolerance zero: the check and the update are one atomic script.
    // Six requests to the first gateway, then the rest to the second: it has only the four
    // units the first one left (alone, it would allow 10; on its local fallback, 5).
    let allowed = spread(&gws, [127, 0, 0, 10], 6, 40);
    assert_eq!(allowed, [6, 4], "one shared bucket");

    // Redis stalled (SIGSTOP): no request waits longer than the timeout (+ margin); each gateway
    // enforces half the limit locally (local_share 0.5 of 10 = 5).
    redis.signal("-STOP");
    let allowed = spread(&gws, [127, 0, 0, 11], 8, 16);
    assert_eq!(allowed, [5, 5], "the local share on each gateway");
    redis.signal("-CONT");
    for &g in &gws {
        wait_until(
            "the gateway back on Redis after SIGCONT",
            Duration::from_secs(20),
            || on_redis(g),
        );
    }
    let allowed = spread(&gws, [127, 0, 0, 12], 6, 40);
    assert_eq!(allowed, [6, 4], "one shared bucket again");

    // Redis killed: the same fallback, and the replicas say so in their metrics.
    redis.kill();
    let allowed = spread(&gws, [127, 0, 0, 13], 8, 16);
    assert_eq!(allowed, [5, 5], "the local share on each gateway");
    for gw in [&gw1, &gw2] {
        let m = gw.metrics();
        assert!(
            m.contains("caregate_ratelimit_fallback{store=\"redis\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("caregate_ratelimit_store_errors_total{kind=\"timeout\"}"),
            "the stall counted as timeouts: {m}"
        );
        assert!(
            m.contains("caregate_ratelimit_store_errors_total{kind=\"error\"}"),
            "the dead server counted as errors: {m}"
        );
    }

    // Redis back on the same port (empty): the shared limit applies again.
    redis.restart();
    for &g in &gws {
        wait_until(
            "the gateway back on Redis after a restart",
            Duration::from_secs(20),
            || on_redis(g),
        );
    }
    let allowed = spread(&gws, [127, 0, 0, 14], 6, 40);
    assert_eq!(allowed, [6, 4], "one shared bucket again");
    for gw in [&gw1, &gw2] {
        assert!(gw
            .metrics()
            .contains("caregate_ratelimit_fallback{store=\"redis\"} 0"));
    }
}

/// A gateway whose `rate_limit` store is `rediss://` with AUTH and the test CA.
fn tls_gateway(
    backend: &EchoServer,
    redis_port: u16,
    password: &str,
    ca: &str,
) -> (Gateway, SocketAddr) {
    let (public, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: public, channel: public, listen: "127.0.0.1:{public}" }}
{pool}
routes:
  - name: api
    listener: public
    path_prefix: /api
    pool: app
    filters:
      - kind: rate_limit
        config:
          store:
            kind: redis
            url: "rediss://:{password}@127.0.0.1:{redis_port}/0"
            tls: {{ ca_file: "{ca}" }}
            timeout_ms: 500
            retry_after_ms: 300
            fallback: local
            local_share: 0.34
          limits:
            - {{ name: tls-shared, key: [], rate: 3, per_seconds: 3600 }}
"#,
        pool = pool(backend)
    );
    (Gateway::start(&yaml, admin), addr(public))
}

#[test]
fn a_redis_store_over_tls_with_auth_and_a_wrong_password_falls_back() {
    if !RedisServer::available() {
        return;
    }
    let pki = Pki::new();
    let port = free_port();
    let _redis = RedisServer::start_with(
        port,
        &[
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &pki.path("server.crt"),
            "--tls-key-file",
            &pki.path("server.key"),
            "--tls-ca-cert-file",
            &pki.path("ca.crt"),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "s3cret-redis-pw",
        ],
    );
    let backend = EchoServer::start("app");

    // The right password over TLS: the limit of 3 is counted in Redis (the local fallback's
    // share would allow fewer).
    let (gw, to) = tls_gateway(&backend, port, "s3cret-redis-pw", &pki.path("ca.crt"));
    let statuses: Vec<u16> = (0..4).map(|_| get(to, "/api/x").status).collect();
    assert_eq!(statuses, [200, 200, 200, 429], "{}", gw.proc.log());
    let m = gw.metrics();
    assert!(
        m.contains("caregate_ratelimit_fallback{store=\"redis\"} 0"),
        "{m}"
    );
    assert!(!m.contains("caregate_ratelimit_store_errors_total"), "{m}");

    // A wrong password: Redis refuses AUTH; requests go on at once with the local share, the
    // replica says it is in fallback, and the password is in no log line.
    let (bad, bad_to) = tls_gateway(&backend, port, "not-the-password", &pki.path("ca.crt"));
    let started = std::time::Instant::now();
    let statuses: Vec<u16> = (0..3).map(|_| get(bad_to, "/api/y").status).collect();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The local share (0.34 of 3, rounded up) allows fewer than Redis did.
    assert_eq!(statuses[0], 200);
    assert_eq!(statuses[2], 429, "{statuses:?}");
    let m = bad.metrics();
    assert!(
        m.contains("caregate_ratelimit_fallback{store=\"redis\"} 1"),
        "{m}"
    );
    assert!(!bad.proc.log().contains("not-the-password"));
}
