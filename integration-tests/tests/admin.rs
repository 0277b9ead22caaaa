//! The admin listener: readiness follows the first health pass; the bearer token guards
//! everything but the probes; the sandbox outage switch closes a real socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::net::TcpListener;
use std::time::Duration;

#[test]
fn readiness_waits_for_the_first_health_pass_and_the_token_guards_metrics() {
    // A backend that accepts connections and never answers: the first health probe takes its
    // whole timeout, so the gateway is up but not ready for that long.
    let blackhole = TcpListener::bind("127.0.0.1:0").unwrap();
    let hole = blackhole.local_addr().unwrap();
    let _keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in blackhole.incoming().flatten() {
            held.push(s);
        }
    });
    let (public, admin) = (free_port(), free_port());
    let dir = TempDir::new("admin");
    let cfg = dir.0.join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}", token: "${{CAREGATE_TEST_ADMIN_TOKEN}}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools:
  - name: app
    zones: [ {{ name: a, backends: [ {{ address: "{hole}" }} ] }} ]
    health_check: {{ interval_ms: 5000, timeout_ms: 3000, consecutive_failure: 1 }}
    timeouts: {{ read_ms: 1000 }}
routes: [ {{ name: app, listener: public, path_prefix: /, pool: app }} ]
"#
        ),
    )
    .unwrap();
    std::env::set_var("CAREGATE_TEST_ADMIN_TOKEN", "s3cret-admin-token");
    let mut gw = Proc::spawn(&["run", "-c", cfg.to_str().unwrap()], "admin-gw");
    let a = addr(admin);
    wait_until("admin /healthz", Duration::from_secs(30), || {
        try_request(a, "GET", "/healthz", &[], b"")
            .map(|r| r.status == 200)
            .unwrap_or(false)
    });
    let r = get(a, "/readyz");
    assert_eq!(r.status, 503, "ready before the first health pass finished");
    wait_until("admin /readyz", Duration::from_secs(30), || {
        try_request(a, "GET", "/readyz", &[], b"")
            .map(|r| r.status == 200)
            .unwrap_or(false)
    });

    let r = get(a, "/metrics");
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"caregate-admin\"")
    );
    let r = request(
        a,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer wrong-token-of-same-len")],
        b"",
    );
    assert_eq!(r.status, 401);
    let r = request(
        a,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer s3cret-admin-token")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert!(r.text().contains("caregate_upstream_backend_healthy"));
    // The never-answering backend is unhealthy, so requests get a 503 at once, not a hang.
    let r = get(addr(public), "/anything");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["reason"], "no_healthy_upstream");
    gw.kill();
}

#[test]
fn sandbox_outage_closes_its_socket_and_traffic_fails_over() {
    let (public, admin, za, zb) = (free_port(), free_port(), free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
sandboxes:
  - {{ name: sa, listen: "127.0.0.1:{za}", data_dir: "@CONF@/demo/data" }}
  - {{ name: sb, listen: "127.0.0.1:{zb}", data_dir: "@CONF@/demo/data" }}
pools:
  - name: fhir
    zones:
      - {{ name: zone-a, backends: [ {{ sandbox: sa }} ] }}
      - {{ name: zone-b, backends: [ {{ sandbox: sb }} ] }}
    health_check: {{ interval_ms: 200, timeout_ms: 200 }}
routes: [ {{ name: fhir, listener: public, path_prefix: /fhir, fhir: true, pool: fhir }} ]
"#
    );
    let gw = Gateway::start(&yaml, admin);
    let p = addr(public);
    wait_until("both sandboxes up", Duration::from_secs(20), || {
        try_request(addr(za), "GET", "/healthz", &[], b"").is_ok()
            && try_request(addr(zb), "GET", "/healthz", &[], b"").is_ok()
    });
    let r = get(p, "/fhir/Patient?_count=1");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["total"], 4);
    // Links come from the sandbox's own base URL (zone a serves while healthy).
    assert!(r.json()["link"][0]["url"]
        .as_str()
        .unwrap()
        .starts_with(&format!("http://127.0.0.1:{za}/fhir")));

    let r = request(gw.admin, "POST", "/sandbox/sa/outage", &[], b"");
    assert_eq!(r.status, 200);
    wait_until("zone a socket closed", Duration::from_secs(10), || {
        try_request(addr(za), "GET", "/healthz", &[], b"").is_err()
    });
    for _ in 0..10 {
        let r = get(p, "/fhir/Patient?_count=1");
        assert_eq!(r.status, 200);
        assert!(r.json()["link"][0]["url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("http://127.0.0.1:{zb}/fhir")));
    }
    assert!(gw.metrics().contains(
        r#"caregate_upstream_failovers_total{from_zone="zone-a",pool="fhir",to_zone="zone-b"}"#
    ));
    let r = request(gw.admin, "POST", "/sandbox/sa/restore", &[], b"");
    assert_eq!(r.status, 200);
    wait_until("zone a back", Duration::from_secs(10), || {
        try_request(p, "GET", "/fhir/Patient?_count=1", &[], b"")
            .map(|r| {
                r.json()["link"][0]["url"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&za.to_string())
            })
            .unwrap_or(false)
    });
    assert_eq!(
        request(gw.admin, "POST", "/sandbox/nope/outage", &[], b"").status,
        404
    );
}
