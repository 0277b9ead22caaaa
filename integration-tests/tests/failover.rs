//! Zone failover with real backend processes, and the retry rules for non-idempotent requests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct Outcome {
    started: Instant,
    finished: Instant,
    status: Option<u16>,
}

#[test]
fn killing_a_zone_under_load_fails_over_without_hanging() {
    let a1 = SandboxProc::start(free_port());
    let a2 = SandboxProc::start(free_port());
    let b1 = SandboxProc::start(free_port());
    let (public, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 2, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools:
  - name: fhir
    zones:
      - {{ name: zone-a, backends: [ {{ address: "{a1}" }}, {{ address: "{a2}" }} ] }}
      - {{ name: zone-b, backends: [ {{ address: "{b1}" }} ] }}
    health_check: {{ interval_ms: 300, timeout_ms: 300, consecutive_failure: 2 }}
    timeouts: {{ connect_ms: 300, read_ms: 5000, write_ms: 5000, idle_ms: 20000 }}
    max_attempts: 4
routes:
  - {{ name: fhir, listener: public, path_prefix: /fhir, fhir: true, pool: fhir }}
"#,
        a1 = a1.addr,
        a2 = a2.addr,
        b1 = b1.addr
    );
    let gw = Gateway::start(&yaml, admin);
    let gw_addr = addr(public);

    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..3 {
        let outcomes = outcomes.clone();
        let stop = stop.clone();
        clients.push(std::thread::spawn(move || {
            // Bounded: at most 2,000 requests per client.
            for _ in 0..2000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let started = Instant::now();
                let status = try_request(gw_addr, "GET", "/fhir/Patient?_count=2", &[], b"")
                    .ok()
                    .map(|r| r.status);
                outcomes.lock().unwrap().push(Outcome {
                    started,
                    finished: Instant::now(),
                    status,
                });
            }
        }));
    }
    wait_until("traffic through zone a", Duration::from_secs(20), || {
        outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.status == Some(200))
            .count()
            >= 30
    });
    let mut a1 = a1;
    let mut a2 = a2;
    let kill_at = Instant::now();
    a1.proc.kill();
    a2.proc.kill();
    // Keep the stream going until well past the health checker's verdict, bounded by count.
    wait_until("traffic after the kill", Duration::from_secs(30), || {
        outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.started > kill_at + Duration::from_secs(1))
            .count()
            >= 60
    });
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }

    let all = outcomes.lock().unwrap().clone();
    let after: Vec<_> = all.iter().filter(|o| o.started >= kill_at).collect();
    let in_flight: Vec<_> = all
        .iter()
        .filter(|o| o.started < kill_at && o.finished >= kill_at)
        .collect();
    assert!(after.len() >= 60);
    for o in &after {
        assert_eq!(
            o.status,
            Some(200),
            "a GET sent after the kill failed: {o:?}"
        );
    }
    for o in &in_flight {
        assert!(
            matches!(o.status, Some(200) | Some(502)),
            "an in-flight GET ended with {:?}",
            o.status
        );
    }
    for o in &all {
        assert!(
            o.finished - o.started < Duration::from_secs(6),
            "a request hung for {:?}",
            o.finished - o.started
        );
    }

    let m = gw.metrics();
    assert!(
        m.contains(
            r#"caregate_upstream_failovers_total{from_zone="zone-a",pool="fhir",to_zone="zone-b"}"#
        ),
        "no failover counted"
    );
    wait_until("zone a marked unhealthy", Duration::from_secs(10), || {
        gw.metrics().contains(&format!(
            r#"caregate_upstream_backend_healthy{{backend="{}",pool="fhir",zone="zone-a"}} 0"#,
            a1.addr
        ))
    });
    assert!(m.contains(&format!(
        r#"caregate_upstream_backend_healthy{{backend="{}",pool="fhir",zone="zone-b"}} 1"#,
        b1.addr
    )));
}

#[test]
fn a_post_whose_connection_failed_after_sending_is_not_sent_twice() {
    let dropper = EchoServer::start_with("dropper", EchoMode::DropAfterRequest);
    let standby = EchoServer::start("standby");
    let (public, admin) = (free_port(), free_port());
    // Healthy at start-up, closed afterwards: the health checker still believes in it.
    let soon_dead = EchoServer::start("soon-dead");
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools:
  - name: app
    zones:
      - {{ name: a, backends: [ {{ address: "{d}" }} ] }}
      - {{ name: b, backends: [ {{ address: "{s}" }} ] }}
    health_check: {{ interval_ms: 60000 }}
    timeouts: {{ connect_ms: 300, read_ms: 3000, write_ms: 3000, idle_ms: 20000 }}
  - name: dead
    zones:
      - {{ name: a, backends: [ {{ address: "{dead}" }} ] }}
      - {{ name: b, backends: [ {{ address: "{s}" }} ] }}
    health_check: {{ interval_ms: 60000 }}
routes:
  - {{ name: app, listener: public, path_prefix: /app, pool: app }}
  - {{ name: dead, listener: public, path_prefix: /dead, pool: dead }}
"#,
        d = dropper.addr,
        s = standby.addr,
        dead = soon_dead.addr
    );
    let _gw = Gateway::start(&yaml, admin);
    let gw = addr(public);
    soon_dead.stop();

    let r = request(
        gw,
        "POST",
        "/app/orders",
        &[("Content-Type", "application/json")],
        b"{\"order\":1}",
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["reason"], "upstream_error");
    assert_eq!(
        dropper.seen().iter().filter(|s| s.method == "POST").count(),
        1
    );
    assert_eq!(
        standby.seen().iter().filter(|s| s.method == "POST").count(),
        0,
        "the POST was sent twice"
    );

    // A connect failure sent nothing: even a POST moves on to the next zone.
    let r = request(gw, "POST", "/dead/orders", &[], b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["backend"], "standby");
    assert_eq!(
        standby.seen().iter().filter(|s| s.method == "POST").count(),
        1
    );
}

#[test]
fn no_healthy_backend_anywhere_is_a_503() {
    let (public, admin) = (free_port(), free_port());
    let (d1, d2) = (free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools:
  - name: app
    zones:
      - {{ name: a, backends: [ {{ address: "127.0.0.1:{d1}" }} ] }}
      - {{ name: b, backends: [ {{ address: "127.0.0.1:{d2}" }} ] }}
    health_check: {{ interval_ms: 200, timeout_ms: 200, consecutive_failure: 1 }}
routes:
  - {{ name: app, listener: public, path_prefix: /, fhir: true, pool: app }}
"#
    );
    let gw = Gateway::start(&yaml, admin);
    let r = get(addr(public), "/Patient/1");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("5"));
    let v = r.json();
    assert_eq!(v["resourceType"], "OperationOutcome");
    assert_eq!(
        v["issue"][0]["details"]["coding"][0]["code"],
        "no_healthy_upstream"
    );
    let _ = gw;
}
