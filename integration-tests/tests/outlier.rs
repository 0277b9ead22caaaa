//! Per-pool resilience with real gateway processes: outlier detection (a backend that answers
//! 500 to everything is ejected, and comes back once it recovers; its 500s are retried for
//! idempotent requests, which see no error), the bulkhead (a stalled
//! backend cannot hold more than `max_in_flight` requests; the next one is refused at once),
//! and the retry budget (a spent budget means a failed connect is not retried).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A scripted backend on its own threads: `/healthz` answers 200; every other request is
/// recorded and answered by `answer`.
fn scripted<F>(answer: F) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>)
where
    F: Fn(&Seen, &mut TcpStream) -> std::io::Result<Next> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let seen = seen2.clone();
            let answer = answer.clone();
            std::thread::spawn(move || serve_scripted(stream, &seen, |req, w| answer(req, w)));
        }
    });
    (addr, seen)
}

fn respond(w: &mut TcpStream, status: &str, body: &str) -> std::io::Result<Next> {
    write!(
        w,
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()?;
    Ok(Next::Answered)
}

/// The value of one series of the gateway's metrics (labels in Prometheus's order), if present.
fn metric(gw: &Gateway, series: &str) -> Option<f64> {
    let text = gw.metrics();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

const SERVER: &str =
    "server: { threads: 2, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }";

#[test]
fn a_backend_answering_500_is_ejected_and_returns_once_it_recovers() {
    let recovered = Arc::new(AtomicBool::new(false));
    let flag = recovered.clone();
    // Healthy to the health check (`/healthz` is 200), 500 to everything else until recovered.
    let (bad, bad_seen) = scripted(move |_, w| {
        if flag.load(Ordering::SeqCst) {
            respond(w, "200 OK", "bad-backend-recovered")
        } else {
            respond(w, "500 Internal Server Error", "broken")
        }
    });
    let good = EchoServer::start("good");
    let (public, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
{SERVER}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools:
  - name: ehr
    zones:
      - {{ name: a, backends: [ {{ address: "{bad}" }}, {{ address: "{good}" }} ] }}
    health_check: {{ interval_ms: 300, timeout_ms: 300 }}
    timeouts: {{ connect_ms: 300, read_ms: 3000, write_ms: 3000, idle_ms: 20000 }}
    outlier_detection: {{ consecutive_failures: 3, base_ejection_ms: 4000 }}
routes:
  - {{ name: ehr, listener: public, path_prefix: /ehr, pool: ehr }}
"#,
        good = good.addr
    );
    let gw = Gateway::start(&yaml, admin);
    let gw_addr = addr(public);

    // Round robin sends every other request to the bad backend: each of its 500s is retried on
    // the good one (GET is idempotent), so clients see no error, and the third in a row ejects
    // it.
    let started = Instant::now();
    let statuses: Vec<u16> = (0..30)
        .map(|_| get(gw_addr, "/ehr/Observation").status)
        .collect();
    let phase_one = started.elapsed();
    assert!(statuses.iter().all(|s| *s == 200), "statuses: {statuses:?}");
    if phase_one < Duration::from_millis(4000) {
        // Within the ejection interval: after three 500s it got no more requests.
        assert_eq!(bad_seen.lock().unwrap().len(), 3);
    }
    assert!(
        metric(
            &gw,
            r#"caregate_upstream_retries_total{kind="status",pool="ehr",zone="a"}"#
        )
        .unwrap_or(0.0)
            >= 3.0
    );
    let m = gw.metrics();
    let state = format!(r#"caregate_backend_circuit_state{{backend="{bad}",pool="ehr",zone="a"}}"#);
    assert!(m.contains(&format!(
        r#"caregate_backend_ejections_total{{backend="{bad}",pool="ehr",zone="a"}} 1"#
    )));
    // The health check still believes in it: outlier detection did the work.
    assert!(m.contains(&format!(
        r#"caregate_upstream_backend_healthy{{backend="{bad}",pool="ehr",zone="a"}} 1"#
    )));
    assert!(m.contains(&format!(
        r#"caregate_backend_circuit_state{{backend="{}",pool="ehr",zone="a"}} 0"#,
        good.addr
    )));
    if phase_one < Duration::from_millis(4000) {
        assert_eq!(metric(&gw, &state), Some(1.0));
    }

    // It recovers: once the ejection interval is over, a probe goes to it, succeeds, and the
    // circuit closes; from then on it takes its share again. Clients see only 200s.
    recovered.store(true, Ordering::SeqCst);
    let before = bad_seen.lock().unwrap().len();
    wait_until(
        "the recovered backend takes traffic",
        Duration::from_secs(20),
        || {
            let r = get(gw_addr, "/ehr/Observation");
            assert_eq!(r.status, 200, "{}", r.text());
            bad_seen.lock().unwrap().len() >= before + 3
        },
    );
    assert_eq!(metric(&gw, &state), Some(0.0));
}

#[test]
fn a_stalled_backend_holds_at_most_max_in_flight_requests() {
    let answering = Arc::new(AtomicBool::new(false));
    let flag = answering.clone();
    // Reads each request and, until told otherwise, never answers it.
    let (slow, slow_seen) = scripted(move |_, w| {
        if flag.load(Ordering::SeqCst) {
            respond(w, "200 OK", "answered")
        } else {
            Ok(Next::Ignored)
        }
    });
    let other = EchoServer::start("other");
    let (public, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
{SERVER}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools:
  - name: slow
    zones:
      - {{ name: a, backends: [ {{ address: "{slow}" }} ] }}
    timeouts: {{ connect_ms: 300, read_ms: 3000, write_ms: 3000, idle_ms: 20000 }}
    max_in_flight: 2
  - name: other
    zones:
      - {{ name: a, backends: [ {{ address: "{other}" }} ] }}
routes:
  - {{ name: slow, listener: public, path_prefix: /slow, pool: slow }}
  - {{ name: other, listener: public, path_prefix: /other, pool: other }}
"#,
        other = other.addr
    );
    let gw = Gateway::start(&yaml, admin);
    let gw_addr = addr(public);

    let stalled: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let t = Instant::now();
                let r = try_request(gw_addr, "GET", "/slow/Patient/1", &[], b"").ok();
                (
                    r.map(|r| (r.status, r.json()["reason"].clone())),
                    t.elapsed(),
                )
            })
        })
        .collect();
    wait_until(
        "two requests held by the stalled backend",
        Duration::from_secs(10),
        || slow_seen.lock().unwrap().len() == 2,
    );
    assert_eq!(
        metric(&gw, r#"caregate_pool_in_flight{pool="slow"}"#),
        Some(2.0)
    );

    // The third is refused at once, while the other two still hang.
    let t = Instant::now();
    let r = get(gw_addr, "/slow/Patient/2");
    let took = t.elapsed();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["reason"], "overloaded");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.header("x-request-id").is_some());
    assert!(took < Duration::from_secs(1), "the refusal took {took:?}");
    assert!(stalled.iter().all(|h| !h.is_finished()));
    assert_eq!(
        slow_seen.lock().unwrap().len(),
        2,
        "the refused request went upstream"
    );
    // Another pool is not affected.
    assert_eq!(get(gw_addr, "/other/x").status, 200);
    assert_eq!(
        metric(&gw, r#"caregate_bulkhead_refusals_total{pool="slow"}"#),
        Some(1.0)
    );

    // The stalled requests time out (504); their slots come back.
    answering.store(true, Ordering::SeqCst);
    for h in stalled {
        let (r, took) = h.join().unwrap();
        let (status, reason) = r.expect("a stalled request got no response");
        assert_eq!(status, 504);
        assert_eq!(reason, "upstream_timeout");
        assert!(took < Duration::from_secs(8), "{took:?}");
    }
    wait_until("the slots are back", Duration::from_secs(5), || {
        metric(&gw, r#"caregate_pool_in_flight{pool="slow"}"#) == Some(0.0)
    });
    assert_eq!(get(gw_addr, "/slow/Patient/3").status, 200);

    // A client that goes away does not keep its slot either.
    answering.store(false, Ordering::SeqCst);
    let before = slow_seen.lock().unwrap().len();
    {
        let mut s = TcpStream::connect(gw_addr).unwrap();
        write!(
            s,
            "GET /slow/Patient/4 HTTP/1.1\r\nHost: {gw_addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        wait_until(
            "the abandoned request reached the backend",
            Duration::from_secs(5),
            || slow_seen.lock().unwrap().len() > before,
        );
    }
    wait_until(
        "the abandoned request's slot is back",
        Duration::from_secs(10),
        || metric(&gw, r#"caregate_pool_in_flight{pool="slow"}"#) == Some(0.0),
    );
}

#[test]
fn a_spent_retry_budget_means_a_failed_request_is_not_sent_again() {
    let good = EchoServer::start("good");
    // Reads each request, then closes the connection without answering (healthy to the
    // health check): a GET whose connection broke is retried on the other backend.
    let dropper = EchoServer::start_with("dropper", EchoMode::DropAfterRequest);
    // Healthy at start-up, closed afterwards (connects refused): the health check, every
    // minute, still believes in it.
    let dead = EchoServer::start("dead");
    let (public, admin) = (free_port(), free_port());
    let pool = |name: &str, bad: SocketAddr, extra: &str| {
        format!(
            r#"
  - name: {name}
    zones:
      - {{ name: a, backends: [ {{ address: "{bad}" }}, {{ address: "{good}" }} ] }}
    health_check: {{ interval_ms: 60000 }}
    timeouts: {{ connect_ms: 300, read_ms: 3000, write_ms: 3000, idle_ms: 20000 }}
    outlier_detection: {{ enabled: false }}
{extra}"#,
            good = good.addr
        )
    };
    let none = "    retry_budget: { ratio: 0, min_per_second: 0 }\n";
    let yaml = format!(
        r#"
{SERVER}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools:{budget}{none}{connect}
routes:
  - {{ name: budget, listener: public, path_prefix: /budget, pool: budget }}
  - {{ name: none, listener: public, path_prefix: /none, pool: none }}
  - {{ name: connect, listener: public, path_prefix: /connect, pool: connect }}
"#,
        budget = pool("budget", dropper.addr, ""),
        none = pool("none", dropper.addr, none),
        connect = pool("connect", dead.addr, none),
    );
    let gw = Gateway::start(&yaml, admin);
    let gw_addr = addr(public);
    dead.stop();

    // With the default budget, a GET whose connection broke goes to the other backend.
    for _ in 0..6 {
        let r = get(gw_addr, "/budget/x");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let retried = metric(
        &gw,
        r#"caregate_upstream_retries_total{kind="proxy",pool="budget",zone="a"}"#,
    )
    .unwrap_or(0.0);
    assert!(retried >= 1.0, "no retry counted");

    // With no budget, the request whose connection broke gets the error.
    let sent_before = dropper.count();
    let statuses: Vec<(u16, serde_json::Value)> = (0..6)
        .map(|_| {
            let r = get(gw_addr, "/none/x");
            (
                r.status,
                r.json().get("reason").cloned().unwrap_or_default(),
            )
        })
        .collect();
    let failed = statuses.iter().filter(|(s, _)| *s == 502).count();
    assert!(failed >= 1, "{statuses:?}");
    assert!(statuses
        .iter()
        .all(|(s, reason)| *s == 200 || (*s == 502 && reason == "upstream_error")));
    assert_eq!(dropper.count() - sent_before, failed);
    assert_eq!(
        metric(&gw, r#"caregate_retry_budget_exhausted_total{pool="none"}"#),
        Some(failed as f64)
    );
    assert_eq!(
        metric(
            &gw,
            r#"caregate_upstream_retries_total{kind="proxy",pool="none",zone="a"}"#
        ),
        None
    );

    // A failed connect sent nothing: its retry (failover) spends no budget, even none.
    for _ in 0..6 {
        let r = get(gw_addr, "/connect/x");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(
        metric(
            &gw,
            r#"caregate_upstream_retries_total{kind="connect",pool="connect",zone="a"}"#
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(
        metric(
            &gw,
            r#"caregate_retry_budget_exhausted_total{pool="connect"}"#
        ),
        Some(0.0),
        "the pool's series is there from start, at 0"
    );
}

#[test]
fn a_failing_status_is_retried_only_for_idempotent_requests_and_passed_on_when_none_is_left() {
    // Two backends answering 500: a GET is tried on both, then gets the last 500 as sent (not
    // a gateway 502); a POST is never sent twice.
    let (one, one_seen) = scripted(|_, w| respond(w, "500 Internal Server Error", "broken"));
    let (two, two_seen) = scripted(|_, w| respond(w, "503 Service Unavailable", "busy"));
    let (public, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
{SERVER}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools:
  - name: ehr
    zones:
      - {{ name: a, backends: [ {{ address: "{one}" }}, {{ address: "{two}" }} ] }}
    max_attempts: 3
    outlier_detection: {{ enabled: false }}
routes:
  - {{ name: ehr, listener: public, path_prefix: /ehr, pool: ehr }}
"#
    );
    let _gw = Gateway::start(&yaml, admin);
    let gw_addr = addr(public);
    let seen = || one_seen.lock().unwrap().len() + two_seen.lock().unwrap().len();

    let r = get(gw_addr, "/ehr/Observation");
    assert!(r.status == 500 || r.status == 503, "{}", r.status);
    assert!(
        r.text() == "broken" || r.text() == "busy",
        "the backend's own answer"
    );
    assert_eq!(seen(), 2, "tried once on each backend");
    assert_eq!(one_seen.lock().unwrap().len(), 1);

    let before = seen();
    let r = request(gw_addr, "POST", "/ehr/Observation", &[], b"{}");
    assert!(r.status == 500 || r.status == 503, "{}", r.status);
    assert_eq!(seen(), before + 1, "a POST is sent once");
}
