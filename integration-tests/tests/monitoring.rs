//! The shipped Grafana dashboard and Prometheus rules use only metrics the gateway really
//! exports: drive representative traffic (allowed, denied, failed over, audited, token checks)
//! and look for every name they reference in `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn referenced_metrics() -> Vec<String> {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/check-monitoring.sh"))
        .arg("--list-metrics")
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    assert!(names.len() >= 10, "too few metric names found: {names:?}");
    names
}

#[test]
fn every_metric_of_the_dashboard_and_rules_is_exported() {
    let names = referenced_metrics();
    let ok = EchoServer::start("zone-b");
    let soon_dead = EchoServer::start("zone-a");
    let dir = TempDir::new("mon");
    let (public, admin, mllp) = (free_port(), free_port(), free_port());
    let secret = "monitoring-test-secret-0123456789abcdef";
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
audit: {{ path: "{audit}", hmac_key: "0123456789abcdef0123456789abcdef-audit-key" }}
auth:
  issuers:
    - {{ name: files, issuer: "https://files.test", jwks_file: "@CONF@/../filters/tests/keys/jwks-all.json", algorithms: [RS256], audiences: [x] }}
    - {{ name: staff, issuer: "https://staff.test", algorithms: [HS256], hs_secret: "{secret}", audiences: [caregate] }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools:
  - name: fhir
    zones:
      - {{ name: zone-a, backends: [ {{ address: "{a}" }} ] }}
      - {{ name: zone-b, backends: [ {{ address: "{b}" }} ] }}
    health_check: {{ interval_ms: 60000 }}
  - name: lab
    protocol: mllp
    zones: [ {{ name: zone-a, backends: [ {{ address: "127.0.0.1:{no_lab}" }} ] }} ]
    health_check: {{ interval_ms: 60000 }}
hl7:
  listeners: [ {{ name: hl7-internal, listen: "127.0.0.1:{mllp}" }} ]
  routes: [ {{ name: adt, listener: hl7-internal, message_types: [ "ADT^A01" ], pool: lab, ack_timeout_ms: 2000 }} ]
apis:
  - {{ name: lab-api, versioning: header, default_version: v1, routes: [limited], versions: [ {{ name: v1, state: live }} ] }}
routes:
  - name: fhir
    listener: public
    path_prefix: /fhir
    fhir: true
    phi: true
    pool: fhir
    filters:
      - {{ kind: jwt_auth }}
      - {{ kind: break_glass, config: {{ roles: [er_physician], overrides: [tenant] }} }}
  - name: limited
    listener: public
    path_prefix: /limited
    pool: fhir
    filters:
      - kind: rate_limit
        config:
          store: {{ kind: redis, url: "redis://127.0.0.1:{no_redis}/0", timeout_ms: 20, retry_after_ms: 100, local_share: 1.0 }}
          limits: [ {{ name: tiny, key: [client_addr], rate: 1, per_seconds: 3600, burst: 1 }} ]
"#,
        no_redis = free_port(),
        no_lab = free_port(),
        audit = dir.0.join("audit.jsonl").display(),
        a = soon_dead.addr,
        b = ok.addr
    );
    let gw = Gateway::start(&yaml, admin);
    soon_dead.stop();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "https://staff.test", "aud": "caregate", "sub": "dr-x", "exp": now + 600}),
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap();
    let p = addr(public);
    // Allowed twice (a verified token, then a cache hit), through a failover to zone b.
    for _ in 0..2 {
        let r = request(
            p,
            "GET",
            "/fhir/Patient/1",
            &[("Authorization", &format!("Bearer {token}"))],
            b"",
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Emergency access: claimed by an entitled clinician, refused to one without the role.
    let er = encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "https://staff.test", "aud": "caregate", "sub": "dr-er", "exp": now + 600, "roles": ["er_physician"]}),
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap();
    for (tok, want) in [(&er, 200), (&token, 403)] {
        let r = request(
            p,
            "GET",
            "/fhir/Patient/1",
            &[
                ("Authorization", &format!("Bearer {tok}")),
                ("X-Break-Glass", "ETREAT; emergency"),
            ],
            b"",
        );
        assert_eq!(r.status, want, "{}", r.text());
    }
    // Denied.
    assert_eq!(get(p, "/fhir/Patient/1").status, 401);
    // Rate limited, by the local fallback of a Redis store that is not there.
    assert_eq!(get(p, "/limited/a").status, 200);
    let r = get(p, "/limited/b");
    assert_eq!(r.status, 429, "{}", r.text());
    // An HL7 v2 message over MLLP, to a destination that is down: the gateway's own AR.
    let mut c = std::net::TcpStream::connect(addr(mllp)).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    std::io::Write::write_all(
        &mut c,
        b"\x0bMSH|^~\\&|ADT|HOSP|EHR|HOSP|20250101||ADT^A01|m-1|P|2.5\rEVN|A01|20250101\r\x1c\r",
    )
    .unwrap();
    let mut ack = Vec::new();
    let mut buf = [0u8; 4096];
    while !ack.ends_with(b"\x1c\r") {
        let n = std::io::Read::read(&mut c, &mut buf).unwrap();
        assert!(n > 0, "the MLLP listener closed without an acknowledgement");
        ack.extend_from_slice(&buf[..n]);
    }
    let ack = String::from_utf8_lossy(&ack);
    assert!(ack.contains("MSA|AR|m-1"), "{ack}");
    // A reload of the unchanged file (the reload series appear with the first reload).
    let r = request(gw.admin, "POST", "/reload", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let metrics = gw.metrics();
    for n in &names {
        assert!(
            metrics.lines().any(|l| l.starts_with(n.as_str())),
            "{n} is used by the dashboard or the alert rules but /metrics does not export it"
        );
    }
    // What operators expect beyond the dashboard: exact codes, body bytes, the build, the
    // process.
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(metrics.contains("code=\"401\""), "{metrics}");
    assert!(value("caregate_response_body_bytes_total{") > 0.0);
    let build = format!("version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("caregate_build_info{features=") && l.ends_with(&build)),
        "{metrics}"
    );
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_open_fds") > 0.0);
    // Three client connections held open are seen on the public listener.
    let held: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(p).unwrap())
        .collect();
    let open = || {
        gw.metrics()
            .lines()
            .find(|l| l.starts_with("caregate_listener_connections{listener=\"public\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    wait_until(
        "3 connections seen",
        std::time::Duration::from_secs(5),
        || open() >= 3.0,
    );
    drop(held);
    wait_until(
        "the connections closed",
        std::time::Duration::from_secs(5),
        || open() == 0.0,
    );
}
