//! Separators in disguise and bodies where FHIR allows none, through the real binary:
//! double-encoded separators (`%252e`, `%252F`, `%255c`) and Unicode lookalikes (`／`, `‥`, ...)
//! are refused on every route, non-ASCII paths on FHIR routes; a FHIR GET, HEAD or DELETE with a
//! body is refused before anything goes upstream, and its connection is closed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

struct Setup {
    _gw: Gateway,
    admin: SocketAddr,
    public: SocketAddr,
    fhir: EchoServer,
    api: EchoServer,
}

fn setup() -> Setup {
    let fhir = EchoServer::start("fhir");
    let api = EchoServer::start("api");
    let (public, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 2, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: public, channel: public, listen: "127.0.0.1:{public}" }}
pools:
  - {{ name: fhir, zones: [ {{ name: a, backends: [ {{ address: "{fhir}" }} ] }} ] }}
  - {{ name: api, zones: [ {{ name: a, backends: [ {{ address: "{api}" }} ] }} ] }}
routes:
  - {{ name: fhir, listener: public, path_prefix: /fhir, fhir: true, pool: fhir }}
  - {{ name: api, listener: public, path_prefix: /api, pool: api }}
"#,
        fhir = fhir.addr,
        api = api.addr,
    );
    let gw = Gateway::start(&yaml, admin);
    Setup {
        _gw: gw,
        admin: addr(admin),
        public: addr(public),
        fhir,
        api,
    }
}

/// A 400 with the reason code, in the error flavour of the route (OperationOutcome on FHIR
/// routes, problem+json elsewhere), whose body names nothing of the path.
fn assert_refused(r: &Response, reason: &str, target: &str) {
    assert_eq!(r.status, 400, "{target}: {}", r.text());
    let v = r.json();
    let code = match r.header("content-type") {
        Some("application/fhir+json") => {
            assert_eq!(v["resourceType"], "OperationOutcome", "{target}");
            v["issue"][0]["details"]["coding"][0]["code"].clone()
        }
        Some("application/problem+json") => v["reason"].clone(),
        other => panic!("{target}: content-type {other:?}"),
    };
    assert_eq!(code, reason, "{target}: {}", r.text());
    // The request id (random hex) is the one variable part of the body.
    let rid = r
        .header("x-request-id")
        .expect("x-request-id on error replies");
    assert!(
        r.text().contains(rid),
        "{target}: the request id is in the body"
    );
    let text = r.text().replace(rid, "");
    for part in ["secret", "Patient", "caf", "252", "%EF", "%ef"] {
        assert!(
            !text.contains(part),
            "{target}: the error names part of the path ({part}): {text}"
        );
    }
}

/// Send a request head and body on a fresh connection, the body from another thread (the
/// gateway may answer, and close, before reading it); then read the response and whatever
/// follows it until the connection closes.
fn exchange(to: SocketAddr, head: String, body: Vec<u8>, head_request: bool) -> (Response, String) {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        // A refused body may be cut off by the gateway's close: write errors are expected.
        let _ = w.write_all(head.as_bytes());
        let _ = w.write_all(&body);
    });
    let mut reader = BufReader::new(s);
    let r = read_response(&mut reader, head_request).unwrap();
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    let _ = writer.join();
    (r, String::from_utf8_lossy(&rest).into_owned())
}

#[test]
fn separators_in_disguise_are_refused() {
    let s = setup();
    let (fhir_before, api_before) = (s.fhir.count(), s.api.count());

    // On every route: double-encoded separators and Unicode lookalikes (raw and encoded).
    for target in [
        "/api/%252e%252e/secret",
        "/api/%252E%252E/secret",
        "/api/x/..%252F..%252Fsecret",
        "/api/x/..%252f..%252fsecret",
        "/api/x/..%255csecret",
        "/api/x/..%255Csecret",
        "/api/x/%25252e%25252e/secret",
        "/api/x/%25%32%65%25%32%65/secret",
        "/api/x/..%ef%bc%8fsecret",
        "/api/x/..%EF%BC%8F..%EF%BC%8Fsecret",
        "/api/x/..%ef%bc%bcsecret",
        "/api/x/%ef%bc%8e%ef%bc%8e/secret",
        "/api/x/%e2%80%a4%e2%80%a4/secret",
        "/api/x/%e2%80%a5/secret",
        "/api/x/..\u{ff0f}secret",
        "/api/x/\u{2025}/secret",
        "/api/x/\u{ff0e}\u{ff0e}\u{ff3c}secret",
        "/fhir/Patient/%252e%252e/secret",
        "/fhir/Patient/..%252Fsecret",
        "/fhir/Patient/..%ef%bc%8fsecret",
    ] {
        let r = get(s.public, target);
        assert_refused(&r, "bad_path", target);
    }
    // On FHIR routes any non-ASCII character in the path, raw or encoded; also when only the
    // normalised path reaches the FHIR route (the raw one names another route).
    for target in [
        "/fhir/Patient/caf%C3%A9",
        "/fhir/Patient/caf%c3%a9",
        "/fhir/Patient/caf\u{e9}",
        "/fhir/P%C3%A4tient",
        "/api/../fhir/Patient/caf%C3%A9",
        "/api/%2e%2e/fhir/Patient/caf\u{e9}",
    ] {
        let r = get(s.public, target);
        assert_refused(&r, "bad_path", target);
    }
    assert_eq!(s.fhir.count(), fhir_before, "a refused path reached FHIR");
    assert_eq!(s.api.count(), api_before, "a refused path reached the API");

    // Positive controls: an encoded space, non-ASCII letters on a non-FHIR route and a `%25`
    // before something harmless are forwarded (normalised).
    for (target, backend, forwarded) in [
        ("/api/a%20b", "api", "/api/a%20b"),
        ("/api/caf%C3%A9", "api", "/api/caf%C3%A9"),
        ("/api/caf%c3%a9", "api", "/api/caf%C3%A9"),
        ("/api/caf\u{e9}", "api", "/api/caf\u{e9}"),
        ("/api/100%2525", "api", "/api/100%2525"),
        ("/api/%2541", "api", "/api/%2541"),
        ("/api/a%25b", "api", "/api/a%25b"),
        ("/fhir/../api/caf%C3%A9", "api", "/api/caf%C3%A9"),
        ("/fhir/Patient/123", "fhir", "/fhir/Patient/123"),
        // The query is not the path: a FHIR search by a non-ASCII name passes.
        (
            "/fhir/Patient?name=caf%C3%A9",
            "fhir",
            "/fhir/Patient?name=caf%C3%A9",
        ),
    ] {
        let r = get(s.public, target);
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        assert_eq!(r.json()["backend"], backend, "{target}");
        assert_eq!(r.json()["target"], forwarded, "{target}");
    }

    let m = request(s.admin, "GET", "/metrics", &[], b"").text();
    assert!(
        m.contains(
            r#"caregate_filter_decisions_total{filter="gateway",reason="bad_path",result="deny"}"#
        ),
        "{m}"
    );
}

#[test]
fn fhir_reads_and_deletes_carry_no_body() {
    let s = setup();
    let fhir_before = s.fhir.count();
    let big = vec![b'x'; 1024 * 1024];

    // Content-Length framing, 1 MiB: refused, the connection closed, nothing upstream.
    for method in ["GET", "DELETE", "HEAD"] {
        let head = format!(
            "{method} /fhir/Patient/1 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            big.len()
        );
        let (r, rest) = exchange(s.public, head, big.clone(), method == "HEAD");
        assert_eq!(r.status, 400, "{method}: {}", r.text());
        assert_eq!(
            r.header("content-type"),
            Some("application/fhir+json"),
            "{method}"
        );
        if method != "HEAD" {
            assert_refused(&r, "body_not_allowed", method);
        }
        assert_eq!(
            r.header("connection").map(str::to_ascii_lowercase),
            Some("close".to_string()),
            "{method}: the connection must close after a refused body"
        );
        assert!(!rest.contains("HTTP/1.1"), "{method}: {rest}");
    }

    // Chunked framing, followed by a pipelined request on the same connection: the body is
    // refused and nothing after it on that connection is served.
    for method in ["GET", "DELETE"] {
        let head = format!(
            "{method} /fhir/Patient/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n\
             GET /fhir/Patient/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        let (r, rest) = exchange(s.public, head, Vec::new(), false);
        assert_refused(&r, "body_not_allowed", method);
        assert!(!rest.contains("HTTP/1.1"), "{method}: {rest}");
    }
    // An empty chunked body is still a body framing the backend would read.
    let head =
        "GET /fhir/Patient/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            .to_string();
    let (r, _) = exchange(s.public, head, Vec::new(), false);
    assert_refused(&r, "body_not_allowed", "empty chunked GET");
    assert_eq!(
        s.fhir.count(),
        fhir_before,
        "a FHIR read or delete with a body reached the backend"
    );

    // Without a body they pass, also with `Content-Length: 0`; a create keeps its body.
    let r = get(s.public, "/fhir/Patient/1");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(
        s.public,
        "GET",
        "/fhir/Patient/1",
        &[("Content-Length", "0")],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(s.public, "DELETE", "/fhir/Patient/1", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(s.public, "HEAD", "/fhir/Patient/1", &[], b"");
    assert_eq!(r.status, 200);
    let r = request(
        s.public,
        "POST",
        "/fhir/Patient",
        &[("Content-Type", "application/fhir+json")],
        br#"{"resourceType":"Patient"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_len"], 26);
    assert_eq!(s.fhir.count(), fhir_before + 5);

    // A non-FHIR route keeps today's behaviour: a GET body is forwarded.
    let r = request(s.public, "GET", "/api/things", &[], b"hello");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["backend"], "api");
    assert_eq!(r.json()["body_len"], 5);

    let m = request(s.admin, "GET", "/metrics", &[], b"").text();
    assert!(
        m.contains(
            r#"caregate_filter_decisions_total{filter="gateway",reason="body_not_allowed",result="deny"}"#
        ),
        "{m}"
    );
}

/// Over HTTP/2 (TLS, ALPN) a body needs no framing header: a request stream that the HEADERS
/// frame did not end is refused on a FHIR read; a plain read passes.
#[test]
fn fhir_reads_carry_no_body_over_h2() {
    let pki = Pki::new();
    let fhir = EchoServer::start("fhir");
    let (public, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - name: public
    channel: public
    listen: "127.0.0.1:{public}"
    tls: {{ cert: "{cert}", key: "{key}", h2: true }}
pools: [ {{ name: fhir, zones: [ {{ name: a, backends: [ {{ address: "{fhir}" }} ] }} ] }} ]
routes: [ {{ name: fhir, listener: public, path_prefix: /fhir, fhir: true, pool: fhir }} ]
"#,
        cert = pki.path("server.crt"),
        key = pki.path("server.key"),
        fhir = fhir.addr,
    );
    let _gw = Gateway::start(&yaml, admin);
    let ca = pki.path("ca.crt");
    let url = format!("https://localhost:{public}/fhir/Patient/1");
    let resolve = format!("localhost:{public}:127.0.0.1");
    let h2 = |extra: &[&str]| {
        let mut args = vec![
            "--http2",
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
            "-w",
            "\n%{http_version} %{http_code}",
        ];
        args.extend_from_slice(extra);
        args.push(&url);
        let (ok, out) = curl(&args);
        assert!(ok, "curl failed: {out}");
        let (body, tail) = out.rsplit_once('\n').unwrap();
        (body.to_string(), tail.to_string())
    };

    let (_, tail) = h2(&[]);
    assert_eq!(tail, "2 200");
    assert_eq!(fhir.count(), 1);
    // With content-length, and without any framing header at all.
    for extra in [
        &["-X", "GET", "--data", "hello"][..],
        &["-X", "GET", "--data", "hello", "-H", "Content-Length:"][..],
        &["-X", "DELETE", "--data", "hello"][..],
    ] {
        let (body, tail) = h2(extra);
        assert_eq!(tail, "2 400", "{extra:?}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["issue"][0]["details"]["coding"][0]["code"], "body_not_allowed",
            "{extra:?}"
        );
    }
    assert_eq!(
        fhir.count(),
        1,
        "a FHIR read with a body reached the backend"
    );
}
