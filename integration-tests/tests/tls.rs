//! Real TLS: a public listener with TLS 1.2+ and h2 by ALPN; an internal listener that requires
//! client certificates (mTLS); and a pool that reaches its backend over TLS with SNI, a private CA
//! and a client certificate (mTLS to the EHR) — the backend being a second caregate process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;

#[test]
fn tls_h2_mtls_and_upstream_mtls() {
    let pki = Pki::new();
    let ehr = EchoServer::start("ehr");

    // The "EHR side": a caregate whose internal listener requires a client certificate.
    let (ehr_tls, ehr_admin) = (free_port(), free_port());
    let ehr_yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{ehr_admin}" }}
listeners:
  - name: internal
    channel: internal
    listen: "127.0.0.1:{ehr_tls}"
    tls: {{ cert: "{cert}", key: "{key}", client_ca: "{ca}", require_client_cert: false }}
auth:
  client_certificates:
    - {{ common_name: lab-interface-engine, system: lab-interface-engine, tenant: hospital-a, roles: [lab_system] }}
pools: [ {{ name: ehr, zones: [ {{ name: a, backends: [ {{ address: "{ehr}" }} ] }} ] }} ]
routes:
  - name: ehr
    listener: internal
    path_prefix: /
    pool: ehr
    filters:
      - {{ kind: jwt_auth, config: {{ bearer: off, client_certificate: required }} }}
      - {{ kind: rbac, config: {{ rules: [ {{ effect: allow, roles: [lab_system], channels: [internal] }} ] }} }}
"#,
        cert = pki.path("server.crt"),
        key = pki.path("server.key"),
        ca = pki.path("ca.crt"),
        ehr = ehr.addr,
    );
    let _ehr_gw = Gateway::start(&ehr_yaml, ehr_admin);

    // The edge: a public TLS listener with h2, and a pool that speaks mTLS to the EHR side.
    let (public, admin) = (free_port(), free_port());
    let edge_yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - name: public
    channel: public
    listen: "127.0.0.1:{public}"
    tls: {{ cert: "{cert}", key: "{key}", h2: true }}
pools:
  - name: ehr
    zones: [ {{ name: a, backends: [ {{ address: "127.0.0.1:{ehr_tls}" }} ] }} ]
    tls: {{ sni: localhost, ca_file: "{ca}", client_cert: "{ccert}", client_key: "{ckey}" }}
routes: [ {{ name: ehr, listener: public, path_prefix: /ehr, pool: ehr }} ]
"#,
        cert = pki.path("server.crt"),
        key = pki.path("server.key"),
        ca = pki.path("ca.crt"),
        ccert = pki.path("client.crt"),
        ckey = pki.path("client.key"),
    );
    let edge = Gateway::start(&edge_yaml, admin);
    let ca = pki.path("ca.crt");

    // h2 by ALPN, end to end through mTLS to the backend side.
    let url = format!("https://localhost:{public}/ehr/Patient/1");
    let resolve = format!("localhost:{public}:127.0.0.1");
    let (ok, out) = curl(&[
        "--http2",
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        "-w",
        "\n%{http_version} %{http_code}",
        &url,
    ]);
    assert!(ok, "curl failed: {out}");
    let (body, tail) = out.rsplit_once('\n').unwrap();
    assert_eq!(tail, "2 200", "{out}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["backend"], "ehr");
    assert_eq!(v["target"], "/ehr/Patient/1");
    // The EHR side saw the request arrive over TLS, from the system its certificate names.
    assert_eq!(v["headers"]["x-forwarded-proto"][0], "https");
    assert_eq!(
        v["headers"]["x-caregate-subject"][0],
        "lab-interface-engine"
    );
    assert_eq!(v["headers"]["x-caregate-system"][0], "lab-interface-engine");
    assert_eq!(
        v["headers"]["x-caregate-auth-method"][0],
        "client_certificate"
    );

    // HTTP/1.1 works too; TLS 1.1 is refused.
    let (ok, out) = curl(&[
        "--http1.1",
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        "-w",
        "%{http_version}",
        "-o",
        "/dev/null",
        &url,
    ]);
    assert!(ok && out == "1.1", "{out}");
    let (ok, _) = curl(&[
        "--tlsv1.1",
        "--tls-max",
        "1.1",
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        &url,
    ]);
    assert!(!ok, "TLS 1.1 must be refused");

    // mTLS on the EHR side's listener: no certificate, an untrusted one, a trusted one.
    let ehr_url = format!("https://localhost:{ehr_tls}/Patient/2");
    let ehr_resolve = format!("localhost:{ehr_tls}:127.0.0.1");
    let before = ehr.count();
    let (ok, out) = curl(&[
        "--cacert",
        &ca,
        "--resolve",
        &ehr_resolve,
        "-w",
        "\n%{http_code}",
        &ehr_url,
    ]);
    assert!(ok, "{out}");
    assert!(
        out.ends_with("\n403"),
        "no client certificate must be refused: {out}"
    );
    assert!(out.contains("client_certificate_required"), "{out}");
    let (ok, _) = curl(&[
        "--cacert",
        &ca,
        "--resolve",
        &ehr_resolve,
        "--cert",
        &pki.path("rogue-client.crt"),
        "--key",
        &pki.path("rogue-client.key"),
        &ehr_url,
    ]);
    assert!(!ok, "an untrusted client certificate must be refused");
    assert_eq!(ehr.count(), before, "a refused client reached the backend");
    let (ok, out) = curl(&[
        "--cacert",
        &ca,
        "--resolve",
        &ehr_resolve,
        "--cert",
        &pki.path("client.crt"),
        "--key",
        &pki.path("client.key"),
        "-w",
        "\n%{http_code}",
        &ehr_url,
    ]);
    assert!(ok, "{out}");
    assert!(out.ends_with("\n200"), "{out}");
    assert_eq!(ehr.count(), before + 1);

    assert!(edge
        .metrics()
        .lines()
        .any(|l| l.starts_with("caregate_requests_total{") && l.contains("listener=\"public\"")));
}
