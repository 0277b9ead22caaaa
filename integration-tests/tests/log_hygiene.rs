//! No PHI in the logs at the most verbose level: PHI-shaped traffic (a query naming a patient,
//! bearer tokens, bodies, a distinct client address, failing backends, malformed requests) at
//! `log.level: trace`, then every log is searched. And the access log is reopened after a
//! rotation by rename.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECRET: &str = "log-hygiene-secret-0123456789abcdef";
/// Values that must appear in no log: the patient's name and birth date, an identifier, the
/// client's address, a body marker.
const NAME: &str = "Zebedeeworth";
const BIRTH: &str = "1931-02-03";
const IDENT: &str = "MRN-77341";
const BODY: &str = "Bodymarkerqx";
const CLIENT: &str = "127.0.0.77";

fn token() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "https://staff.test", "aud": "caregate", "sub": "dr-who", "azp": "ehr-app", "exp": now + 600, "roles": ["clinician"]}),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[test]
fn the_most_verbose_logs_hold_no_phi_and_the_access_log_reopens() {
    let backend = EchoServer::start("fhir");
    let dropper = EchoServer::start_with("drops", EchoMode::DropAfterRequest);
    let dir = TempDir::new("log-hygiene");
    let access = dir.0.join("access.jsonl");
    let (public, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
log: {{ level: trace, format: json }}
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ path: "{access}" }}
auth:
  issuers:
    - {{ name: staff, issuer: "https://staff.test", algorithms: [HS256], hs_secret: "{SECRET}", audiences: [caregate] }}
listeners: [ {{ name: public, channel: public, listen: "0.0.0.0:{public}" }} ]
pools:
  - {{ name: fhir, zones: [ {{ name: a, backends: [ {{ address: "{b}" }} ] }} ] }}
  - {{ name: dead, zones: [ {{ name: a, backends: [ {{ address: "{d}" }} ] }} ], max_attempts: 1 }}
routes:
  - {{ name: fhir, listener: public, path_prefix: /fhir, fhir: true, pool: fhir, filters: [ {{ kind: jwt_auth }} ] }}
  - {{ name: down, listener: public, path_prefix: /down, pool: dead }}
"#,
        access = access.display(),
        b = backend.addr,
        d = dropper.addr
    );
    let mut gw = Gateway::start(&yaml, admin);
    let p = addr(public);
    let t = token();
    let auth = format!("Bearer {t}");
    let q = format!("/fhir/Patient?family={NAME}&birthdate={BIRTH}&identifier={IDENT}");
    let src = CLIENT.parse().unwrap();
    // Allowed, refused (no token, bad token), a body, a failing backend, malformed requests.
    let r = request_from(src, p, "GET", &q, &[("Authorization", &auth)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(request_from(src, p, "GET", &q, &[]).status, 401);
    let forged = format!("Bearer {}x", &t[..t.len() - 1]);
    assert_eq!(
        request_from(src, p, "GET", &q, &[("Authorization", &forged)]).status,
        401
    );
    let body =
        json!({"resourceType": "Patient", "name": [{"family": NAME}], "note": BODY}).to_string();
    let r = request(
        p,
        "POST",
        "/fhir/Patient",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/fhir+json"),
        ],
        body.as_bytes(),
    );
    assert!(r.status < 500, "{}", r.text());
    assert_eq!(
        request_from(src, p, "GET", &format!("/down/x?family={NAME}"), &[]).status,
        502
    );
    assert_eq!(
        request_from(
            src,
            p,
            "GET",
            &format!("/fhir/%252e%252e/Patient?family={NAME}"),
            &[]
        )
        .status,
        400
    );
    // Malformed framing, straight on the socket (Pingora answers it before any hook).
    let mut s = TcpStream::connect(p).unwrap();
    s.write_all(format!("GET /fhir/Patient?family={NAME} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n{BODY}").as_bytes()).unwrap();
    let mut sink = Vec::new();
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.read_to_end(&mut sink);

    // Rotate the access log by rename and ask for a reopen: new lines go to a new file.
    let rotated = dir.0.join("access.jsonl.1");
    wait_until("the access log has lines", Duration::from_secs(10), || {
        std::fs::read_to_string(&access)
            .map(|t| t.lines().count() >= 5)
            .unwrap_or(false)
    });
    std::fs::rename(&access, &rotated).unwrap();
    let st = Command::new("kill")
        .args(["-USR1", &gw.proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    wait_until(
        "a new access log after SIGUSR1",
        Duration::from_secs(10),
        || {
            let _ = get(p, "/fhir/metadata");
            std::fs::read_to_string(&access)
                .map(|t| !t.is_empty())
                .unwrap_or(false)
        },
    );
    // The access log names the calling app (not PHI).
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("\"client_id\":\"ehr-app\""), "{old}");

    // Stop, then search every log the gateway wrote.
    gw.proc.kill();
    let logs = [
        ("error log", gw.proc.log()),
        ("access log", old),
        (
            "access log (reopened)",
            std::fs::read_to_string(&access).unwrap(),
        ),
    ];
    let err = &logs[0].1;
    if std::env::var("SHOW_LOG").is_ok() {
        eprintln!("{err}");
    }
    assert!(
        err.lines().count() > 3,
        "the trace-level log is not empty: {err}"
    );
    for line in err.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["time"].is_string() && v["level"].is_string() && v["message"].is_string());
    }
    let signature = t.rsplit('.').next().unwrap();
    for (what, text) in &logs {
        for secret in [NAME, BIRTH, IDENT, BODY, CLIENT, signature, "family="] {
            assert!(!text.contains(secret), "{what} contains {secret}:\n{text}");
        }
    }
}
