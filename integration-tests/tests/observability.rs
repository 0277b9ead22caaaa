//! The access log, trace context propagation, and the "no PHI" rule for logs and metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::time::Duration;

#[test]
fn access_log_and_traces_carry_no_phi() {
    let backend = EchoServer::start("fhir");
    // Passes its health checks, then drops every request: a 502.
    let broken = EchoServer::start_with("broken", EchoMode::DropAfterRequest);
    let (public, admin) = (free_port(), free_port());
    let dir = TempDir::new("obs");
    let access = dir.0.join("access.jsonl");
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ path: "{access}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools:
  - {{ name: fhir, zones: [ {{ name: zone-a, backends: [ {{ address: "{b}" }} ] }} ] }}
  - name: broken
    zones: [ {{ name: zone-a, backends: [ {{ address: "{broken}" }} ] }} ]
routes:
  - {{ name: fhir, listener: public, path_prefix: /fhir, fhir: true, pool: fhir }}
  - {{ name: broken, listener: public, path_prefix: /broken, fhir: true, pool: broken }}
"#,
        access = access.display(),
        b = backend.addr,
        broken = broken.addr
    );
    let gw = Gateway::start(&yaml, admin);
    let p = addr(public);
    let secrets = ["Zebediah", "Quuxington", "pat-9f8e7d6c", "1961-04-12"];
    let q = "name=Zebediah%20Quuxington&_id=pat-9f8e7d6c&birthdate=1961-04-12";

    // With a trace context: continued upstream.
    let r = request(
        p,
        "GET",
        &format!("/fhir/Patient/pat-9f8e7d6c?{q}"),
        &[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "vendor=abc"),
        ],
        b"",
    );
    assert_eq!(r.status, 200);
    let ok_id = r.header("x-request-id").unwrap().to_string();
    let seen = backend.seen();
    let tp = seen
        .last()
        .unwrap()
        .header("traceparent")
        .unwrap()
        .to_string();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert!(
        !tp.contains("00f067aa0ba902b7"),
        "the gateway is a new hop with its own span id"
    );
    assert_eq!(
        seen.last().unwrap().header("tracestate"),
        Some("vendor=abc")
    );
    // Without one: a new trace starts at the gateway.
    let r = get(p, &format!("/fhir/Patient?{q}"));
    assert_eq!(r.status, 200);
    let tp2 = backend
        .seen()
        .last()
        .unwrap()
        .header("traceparent")
        .unwrap()
        .to_string();
    assert_eq!(tp2.len(), 55);
    assert!(!tp2.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
    // One that fails upstream.
    let r = get(p, &format!("/broken/Patient/pat-9f8e7d6c?{q}"));
    assert_eq!(r.status, 502);
    let fail_id = r.header("x-request-id").unwrap().to_string();
    assert!(!r.text().contains("pat-9f8e7d6c") && !r.text().contains("Connection refused"));
    // One refused by hygiene.
    assert_eq!(
        get(p, &format!("/fhir/Patient%2Fpat-9f8e7d6c?{q}")).status,
        400
    );

    wait_until("access log lines", Duration::from_secs(10), || {
        std::fs::read_to_string(&access)
            .map(|s| s.lines().count() >= 4)
            .unwrap_or(false)
    });
    let log = std::fs::read_to_string(&access).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ok = lines
        .iter()
        .find(|l| l["request_id"] == ok_id.as_str())
        .expect("logged");
    assert_eq!(ok["route"], "fhir");
    assert_eq!(ok["route_template"], "/fhir/*");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["zone"], "zone-a");
    assert_eq!(ok["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    let fail = lines
        .iter()
        .find(|l| l["request_id"] == fail_id.as_str())
        .expect("logged");
    assert_eq!(fail["status"], 502);
    assert_eq!(fail["reason"], "upstream_error");

    let metrics = gw.metrics();
    let stderr = gw.proc.log();
    assert!(
        stderr.contains("request_id="),
        "the upstream failure was logged with its request id"
    );
    for s in secrets {
        assert!(!log.contains(s), "access log leaks {s}: {log}");
        assert!(!stderr.contains(s), "error log leaks {s}");
        assert!(!metrics.contains(s), "metrics leak {s}");
    }
}

/// Spans over OTLP/HTTP: the gateway's span carries the trace id and span id it sent upstream,
/// with the caller's span as its parent. Needs a binary built with `--features otlp`
/// (scripts/test.sh builds it so).
#[test]
fn spans_are_exported_over_otlp_with_the_ids_sent_upstream() {
    let collector = EchoServer::start("collector");
    let backend = EchoServer::start("fhir");
    let (public, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 2 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
otlp: {{ endpoint: "http://{c}/v1/traces", service_name: caregate-test }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools: [ {{ name: fhir, zones: [ {{ name: zone-a, backends: [ {{ address: "{b}" }} ] }} ] }} ]
routes: [ {{ name: fhir, listener: public, path_prefix: /fhir, fhir: true, pool: fhir }} ]
"#,
        c = collector.addr,
        b = backend.addr
    );
    let gw = Gateway::start(&yaml, admin);
    let r = request(
        addr(public),
        "GET",
        "/fhir/Patient/pat-42?name=Zebediah",
        &[(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )],
        b"",
    );
    assert_eq!(r.status, 200);
    let tp = backend
        .seen()
        .last()
        .unwrap()
        .header("traceparent")
        .unwrap()
        .to_string();
    let span_id = tp.split('-').nth(2).unwrap().to_string();
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let (trace_bytes, span_bytes, parent_bytes) = (
        hex("0af7651916cd43dd8448eb211c80319c"),
        hex(&span_id),
        hex("b7ad6b7169203331"),
    );
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    wait_until("a span at the collector", Duration::from_secs(15), || {
        collector.seen().iter().any(|s| {
            s.method == "POST" && s.target == "/v1/traces" && contains(&s.body, &trace_bytes)
        })
    });
    let export = collector
        .seen()
        .into_iter()
        .find(|s| contains(&s.body, &trace_bytes))
        .unwrap();
    assert_eq!(
        export.header("content-type"),
        Some("application/x-protobuf")
    );
    assert!(
        contains(&export.body, &span_bytes),
        "the span id sent upstream"
    );
    assert!(
        contains(&export.body, &parent_bytes),
        "the caller's span as parent"
    );
    assert!(contains(&export.body, b"caregate-test"));
    assert!(contains(&export.body, b"http.route"));
    assert!(
        !contains(&export.body, b"Zebediah") && !contains(&export.body, b"pat-42"),
        "no PHI in spans"
    );
    drop(gw);
}
