//! Routing by listener, host, path and method; the internal channel; request hygiene (path
//! tricks, identity-header spoofing, hop-by-hop headers); the error contract; admin endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::net::SocketAddr;

struct Setup {
    gw: Gateway,
    public: SocketAddr,
    internal: SocketAddr,
    fhir: EchoServer,
    portal: EchoServer,
    ehr: EchoServer,
    api: EchoServer,
}

fn setup() -> Setup {
    let fhir = EchoServer::start("fhir");
    let portal = EchoServer::start("portal");
    let ehr = EchoServer::start("ehr");
    let api = EchoServer::start("api");
    let (public, internal, admin) = (free_port(), free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: public, channel: public, listen: "127.0.0.1:{public}" }}
  - {{ name: internal, channel: internal, listen: "127.0.0.1:{internal}" }}
pools:
  - {{ name: fhir, zones: [ {{ name: a, backends: [ {{ address: "{fhir}" }} ] }} ], health_check: {{ interval_ms: 500 }} }}
  - {{ name: portal, zones: [ {{ name: a, backends: [ {{ address: "{portal}" }} ] }} ], health_check: {{ interval_ms: 500 }} }}
  - {{ name: ehr, zones: [ {{ name: a, backends: [ {{ address: "{ehr}" }} ] }} ], health_check: {{ interval_ms: 500 }} }}
  - {{ name: api, zones: [ {{ name: a, backends: [ {{ address: "{api}" }} ] }} ], health_check: {{ interval_ms: 500 }} }}
routes:
  - name: patient-fhir
    listener: public
    path_prefix: /fhir
    methods: [GET, POST, OPTIONS]
    fhir: true
    pool: fhir
    filters:
      - kind: cors
        config: {{ allowed_origins: ["https://portal.example.org"], allowed_methods: [GET, POST], allowed_headers: [authorization] }}
      - kind: request_limits
        config: {{ max_body_bytes: 64, max_uri_length: 200 }}
      - kind: headers
        config: {{ request: {{ set: {{ x-gateway-route: patient-fhir }} }}, response: {{ set: {{ x-content-type-options: nosniff }}, remove: [server] }} }}
  - name: portal-site
    listener: public
    hosts: [portal.example.org]
    path_prefix: /
    pool: portal
  - name: api
    listener: public
    path_prefix: /api
    methods: [GET]
    pool: api
  - name: ehr
    listener: internal
    path_prefix: /internal/fhir
    upstream_prefix: /fhir
    fhir: true
    pool: ehr
"#,
        fhir = fhir.addr,
        portal = portal.addr,
        ehr = ehr.addr,
        api = api.addr,
    );
    let gw = Gateway::start(&yaml, admin);
    Setup {
        gw,
        public: addr(public),
        internal: addr(internal),
        fhir,
        portal,
        ehr,
        api,
    }
}

fn assert_problem(r: &Response, status: u16, reason: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let v = r.json();
    assert_eq!(v["status"], status);
    assert_eq!(v["reason"], reason);
    let rid = r
        .header("x-request-id")
        .expect("x-request-id on error replies");
    assert_eq!(v["request_id"], rid);
}

fn assert_outcome(r: &Response, status: u16, reason: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/fhir+json"));
    let v = r.json();
    assert_eq!(v["resourceType"], "OperationOutcome");
    assert_eq!(v["issue"][0]["severity"], "error");
    assert_eq!(v["issue"][0]["details"]["coding"][0]["code"], reason);
    let rid = r
        .header("x-request-id")
        .expect("x-request-id on error replies");
    assert!(v["issue"][0]["diagnostics"].as_str().unwrap().contains(rid));
}

#[test]
fn routing_channels_hygiene_and_errors() {
    let s = setup();

    // --- routing by path, host, method and listener ---
    let r = get(s.public, "/fhir/Patient/123");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["backend"], "fhir");
    assert_eq!(r.json()["target"], "/fhir/Patient/123");
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert!(r.header("x-request-id").is_some());

    let r = request(
        s.public,
        "GET",
        "/index.html",
        &[("Host", "portal.example.org")],
        b"",
    );
    assert_eq!(r.json()["backend"], "portal");
    // Another host gets no route for "/".
    assert_problem(
        &request(
            s.public,
            "GET",
            "/index.html",
            &[("Host", "other.example.org")],
            b"",
        ),
        404,
        "route_not_found",
    );
    // Host with port and upper case still matches.
    let r = request(
        s.public,
        "GET",
        "/x",
        &[("Host", "PORTAL.example.org:443")],
        b"",
    );
    assert_eq!(r.json()["backend"], "portal");

    let r = get(s.public, "/api/v1/things");
    assert_eq!(r.json()["backend"], "api");
    let r = request(s.public, "DELETE", "/api/v1/things", &[], b"");
    assert_problem(&r, 405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET"));
    // Prefix matching is per segment.
    assert_problem(&get(s.public, "/apix"), 404, "route_not_found");

    // --- internal routes only on the internal listener ---
    let r = get(s.internal, "/internal/fhir/Patient/9");
    assert_eq!(r.json()["backend"], "ehr");
    assert_eq!(
        r.json()["target"],
        "/fhir/Patient/9",
        "upstream_prefix rewrite"
    );
    let ehr_before = s.ehr.count();
    for (target, host) in [
        ("/internal/fhir/Patient/9", None),
        ("/internal/fhir/Patient/9", Some("internal.example.org")),
        ("/fhir/../internal/fhir/Patient/9", None),
        ("/fhir/%2e%2e/internal/fhir/Patient/9", None),
        ("//internal/fhir/Patient/9", None),
        ("/INTERNAL/fhir/Patient/9", None),
    ] {
        let mut headers = vec![];
        if let Some(h) = host {
            headers.push(("Host", h));
        }
        let r = request(s.public, "GET", target, &headers, b"");
        assert_ne!(
            r.status, 200,
            "{target} reached something on the public listener"
        );
        if r.status == 200 {
            assert_ne!(r.json()["backend"], "ehr");
        }
    }
    assert_eq!(
        s.ehr.count(),
        ehr_before,
        "the EHR backend saw a request from the public listener"
    );
    // ... and public routes are not on the internal listener.
    assert_problem(&get(s.internal, "/api/v1/things"), 404, "route_not_found");

    // --- path tricks: refused, or normalised before routing and forwarding ---
    let fhir_before = s.fhir.count();
    for (target, reason) in [
        ("/fhir/Patient%2F123", "bad_path"),
        ("/fhir/Patient%2f..%2f..%2fapi", "bad_path"),
        ("/fhir/Patient%5C123", "bad_path"),
        ("/fhir/Patient/%00", "bad_path"),
        ("/fhir/Patient/%0d%0aX-Evil:%201", "bad_path"),
        ("/fhir/Patient/%C3%28", "bad_path"),
        ("/fhir/Patient/%zz", "bad_path"),
        ("/fhir/../../etc/passwd", "bad_path"),
        ("/fhir/Patient;jsessionid=1", "bad_path"),
        ("/fhir/Patient/1;x", "bad_path"),
    ] {
        let r = get(s.public, target);
        assert_outcome(&r, 400, reason);
    }
    assert_eq!(
        s.fhir.count(),
        fhir_before,
        "a refused path reached the FHIR backend"
    );
    // Positive controls: the legitimate forms of those paths reach the FHIR backend normalised.
    for (target, forwarded) in [
        ("/fhir/Patient/123", "/fhir/Patient/123"),
        ("/fhir//Patient///123", "/fhir/Patient/123"),
        ("/fhir/./Patient/./123", "/fhir/Patient/123"),
        ("/fhir/x/../Patient/123", "/fhir/Patient/123"),
        ("/fhir/%50atient/123", "/fhir/Patient/123"),
        (
            "/fhir/Patient/123?name=a%2Fb&_count=1",
            "/fhir/Patient/123?name=a%2Fb&_count=1",
        ),
    ] {
        let r = get(s.public, target);
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        assert_eq!(r.json()["backend"], "fhir", "{target}");
        assert_eq!(r.json()["target"], forwarded, "{target}");
    }
    // A dot-segment that leaves the FHIR prefix is routed by its normalised form.
    let r = get(s.public, "/fhir/../api/v1/x");
    assert_eq!(r.json()["backend"], "api");
    assert_eq!(r.json()["target"], "/api/v1/x");
    // Non-FHIR routes also refuse encoded slashes and servlet-style `..;` segments.
    assert_problem(&get(s.public, "/api/a%2Fb"), 400, "bad_path");
    assert_problem(
        &get(s.public, "/api/..;/internal/fhir/Patient/9"),
        400,
        "bad_path",
    );
    // A header section over the bound is refused with 431.
    let huge = "x".repeat(40 * 1024);
    assert_problem(
        &request(s.public, "GET", "/api/v1/x", &[("X-Big", &huge)], b""),
        431,
        "header_too_large",
    );

    // --- identity spoofing and hop-by-hop headers never reach the backend ---
    let r = request(
        s.public,
        "GET",
        "/fhir/Patient/1",
        &[
            ("X-Caregate-Subject", "admin"),
            ("x-caregate-tenant", "hospital-b"),
            ("X_Caregate_Roles", "superuser"),
            ("x-CAREGATE_patient", "p1"),
            ("X.Caregate.Subject", "admin"),
            ("X-User", "admin"),
            ("X-Original-URL", "/internal/fhir/Patient"),
            ("X-HTTP-Method-Override", "DELETE"),
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("TE", "trailers"),
            ("X-Forwarded-For", "10.9.9.9"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Request-Id", "client-rid-42"),
        ],
        b"",
    );
    assert_eq!(r.status, 200);
    let seen = s.fhir.seen();
    let last = seen.last().unwrap();
    for (k, _) in &last.headers {
        let norm = k.to_ascii_lowercase().replace('_', "-");
        assert!(!norm.starts_with("x-caregate-"), "{k} reached the backend");
    }
    for h in [
        "x-secret-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "x-user",
        "x-original-url",
        "x-http-method-override",
    ] {
        assert!(!last.has_header(h), "{h} reached the backend");
    }
    assert_eq!(
        last.header("x-forwarded-for"),
        Some("127.0.0.1"),
        "untrusted XFF replaced"
    );
    assert_ne!(last.header("x-forwarded-host"), Some("evil.example"));
    assert_eq!(last.header("x-forwarded-proto"), Some("http"));
    assert_eq!(last.header("x-request-id"), Some("client-rid-42"));
    assert_eq!(r.header("x-request-id"), Some("client-rid-42"));
    assert_eq!(
        last.header("x-gateway-route"),
        Some("patient-fhir"),
        "headers filter"
    );

    // --- request_limits and CORS ---
    let big = vec![b'x'; 100];
    let before = s.fhir.count();
    assert_outcome(
        &request(s.public, "POST", "/fhir/Patient", &[], &big),
        413,
        "payload_too_large",
    );
    let long = format!("/fhir/Patient?name={}", "a".repeat(300));
    assert_outcome(&get(s.public, &long), 414, "uri_too_long");
    assert_outcome(
        &request(s.public, "PUT", "/fhir/Patient/1", &[], b"{}"),
        405,
        "method_not_allowed",
    );
    let r = request(
        s.public,
        "OPTIONS",
        "/fhir/Patient",
        &[
            ("Origin", "https://portal.example.org"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "authorization"),
        ],
        b"",
    );
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://portal.example.org")
    );
    let r = request(
        s.public,
        "OPTIONS",
        "/fhir/Patient",
        &[
            ("Origin", "https://evil.example"),
            ("Access-Control-Request-Method", "GET"),
        ],
        b"",
    );
    assert_outcome(&r, 403, "cors_denied");
    assert_eq!(
        s.fhir.count(),
        before,
        "refused requests and preflights never reach the backend"
    );
    let r = request(
        s.public,
        "GET",
        "/fhir/Patient",
        &[("Origin", "https://portal.example.org")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://portal.example.org")
    );

    // --- admin endpoints ---
    assert_eq!(get(s.gw.admin, "/healthz").status, 200);
    assert_eq!(get(s.gw.admin, "/readyz").status, 200);
    let m = s.gw.metrics();
    for name in [
        "caregate_requests_total",
        "caregate_request_duration_seconds",
        "caregate_upstream_duration_seconds",
        "caregate_upstream_backend_healthy",
        "caregate_filter_decisions_total",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
    assert!(
        m.contains(
            r#"caregate_filter_decisions_total{filter="gateway",reason="bad_path",result="deny"}"#
        ),
        "{m}"
    );
    assert!(m.contains(
        r#"caregate_filter_decisions_total{filter="cors",reason="cors_denied",result="deny"}"#
    ));
    assert!(m.contains(r#"caregate_requests_total{code="200",listener="public",method="GET",route="patient-fhir",status_class="2xx"}"#));
    // No raw path or query value in any label.
    assert!(!m.contains("Patient/1"));
    assert!(!m.contains("evil.example"));
    let _ = (&s.portal, &s.api);
}
