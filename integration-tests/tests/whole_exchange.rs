//! Whole exchanges end to end (gateway/src/exchange.rs): when a filter must judge a whole body
//! the gateway reads the whole request, judges it before anything is forwarded, does the upstream
//! exchange itself, reads the whole (bounded) response, runs the response checks and only then
//! answers, with an exact Content-Length. Refusals are clean, complete OperationOutcomes.
//!
//! The backend here is a small scripted HTTP/1.1 server that records every request and answers
//! by path with canned responses: plain, gzip-compressed, chunked, truncated, not JSON, too
//! large, or (in drop mode) no answer at all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use flate2::{write::GzEncoder, Compression};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const PATIENT_SECRET: &str = "whole-exchange-patient-secret-0123456789abcdef";
const STAFF_SECRET: &str = "whole-exchange-staff-secret-0123456789abcdef";
/// `server.max_exchange_body_bytes` of every gateway here.
const MAX_EXCHANGE: usize = 65536;

const PATIENT_A: &str = r#"{"resourceType":"Patient","id":"pat-a","meta":{"versionId":"3"},"name":[{"family":"Lindqvist","given":["Maja"]}],"telecom":[{"system":"phone","value":"+46-555-0100"},{"system":"email","value":"maja.l@example.org"}],"gender":"female","birthDate":"1961-04-12"}"#;

/// Deliberately unusual formatting and number spelling: any re-serialisation would show.
const OBS_A: &str = "{\n  \"resourceType\" : \"Observation\",\n  \"id\": \"obs-a\",\n  \"status\": \"final\",\n  \"code\": {\"text\": \"heart rate\"},\n  \"subject\": {\"reference\": \"Patient/pat-a\"},\n  \"valueQuantity\": {\"value\": 72.50, \"unit\": \"/min\"}\n}\n";

const OBS_B: &str = r#"{"resourceType":"Observation","id":"obs-b","status":"final","code":{"text":"blood glucose"},"subject":{"reference":"Patient/pat-b"},"valueQuantity":{"value":6.1,"unit":"mmol/L"}}"#;

/// Valid framing, invalid JSON: cut off in the middle of the telecom list.
const PATIENT_TRUNCATED: &str = r#"{"resourceType":"Patient","id":"pat-trunc","name":[{"family":"Lindqvist","given":["Maja"]}],"telecom":[{"system":"phone","value":"+46-555-0100"#;

const TEXT_BODY: &str = "Lindqvist, Maja: +46-555-0100\n";

// ---------------------------------------------------------------------------------------------
// The scripted backend.

/// A canned answer.
#[derive(Clone)]
struct Canned {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// The body is gzip-compressed: sent with `Content-Encoding: gzip`, whatever was asked.
    gzip: bool,
    /// 0: `Content-Length` framing; n: `Transfer-Encoding: chunked` in n chunks.
    chunks: usize,
}

impl Canned {
    fn json(body: &str) -> Canned {
        Canned {
            status: 200,
            content_type: "application/fhir+json",
            body: body.as_bytes().to_vec(),
            gzip: false,
            chunks: 0,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Answer by path.
    Serve,
    /// Read the request, then close the connection without answering (`/healthz` is answered).
    Drop,
    /// Read the request and never answer it (the connection stays open until the peer closes).
    Stall,
    /// Answer the first request of each connection; close a reused connection on the next
    /// request without answering (a pooled connection that broke).
    DropReused,
}

struct Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Backend {
    fn start(behaviour: Behaviour) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let canned = Arc::new(canned());
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (seen, canned) = (seen2.clone(), canned.clone());
                std::thread::spawn(move || serve(stream, behaviour, &canned, &seen));
            }
        });
        Backend { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// An Observation of patient A whose JSON is `len` bytes or more.
fn big_observation(id: &str, len: usize) -> String {
    json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "long"},
        "subject": {"reference": "Patient/pat-a"}, "note": [{"text": "x".repeat(len)}]})
    .to_string()
}

/// The canned answers, by path.
fn canned() -> HashMap<String, Canned> {
    let mut m = HashMap::new();
    m.insert("/fhir/Patient/pat-a".into(), Canned::json(PATIENT_A));
    m.insert(
        "/fhir/Patient/pat-a-gz".into(),
        Canned {
            gzip: true,
            body: gzip(PATIENT_A.as_bytes()),
            ..Canned::json("")
        },
    );
    m.insert("/fhir/Observation/obs-a".into(), Canned::json(OBS_A));
    m.insert(
        "/fhir/Observation/obs-a-gz".into(),
        Canned {
            gzip: true,
            body: gzip(OBS_A.replace("obs-a", "obs-a-gz").as_bytes()),
            ..Canned::json("")
        },
    );
    m.insert(
        "/fhir/Observation/obs-b".into(),
        Canned {
            chunks: 5,
            ..Canned::json(OBS_B)
        },
    );
    m.insert(
        "/fhir/Observation/obs-big".into(),
        Canned::json(&big_observation("obs-big", 200 * 1024)),
    );
    m.insert(
        "/fhir/Patient/pat-trunc".into(),
        Canned::json(PATIENT_TRUNCATED),
    );
    m.insert(
        "/fhir/Patient/pat-text".into(),
        Canned {
            content_type: "text/plain",
            ..Canned::json(TEXT_BODY)
        },
    );
    m
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        404 => "Not Found",
        _ => "Status",
    }
}

fn write_answer(w: &mut TcpStream, method: &str, c: &Canned) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\n",
        c.status,
        reason_phrase(c.status),
        c.content_type
    );
    if c.gzip {
        head.push_str("content-encoding: gzip\r\n");
    }
    if c.chunks > 0 {
        head.push_str("transfer-encoding: chunked\r\n");
    } else {
        head.push_str(&format!("content-length: {}\r\n", c.body.len()));
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    if method == "HEAD" {
        return w.flush();
    }
    if c.chunks > 0 {
        let size = c.body.len().div_ceil(c.chunks).max(1);
        for piece in c.body.chunks(size) {
            w.write_all(format!("{:x}\r\n", piece.len()).as_bytes())?;
            w.write_all(piece)?;
            w.write_all(b"\r\n")?;
            // Each chunk in its own write: the gateway really sees several reads.
            w.flush()?;
        }
        w.write_all(b"0\r\n\r\n")?;
    } else {
        w.write_all(&c.body)?;
    }
    w.flush()
}

fn serve(
    stream: TcpStream,
    behaviour: Behaviour,
    canned: &HashMap<String, Canned>,
    seen: &Mutex<Vec<Seen>>,
) {
    serve_scripted(stream, seen, |req, w| {
        match behaviour {
            Behaviour::Drop => return Ok(Next::Close),
            // Wait for a next request that never comes: the gateway times out and closes.
            Behaviour::Stall => return Ok(Next::Ignored),
            Behaviour::DropReused if req.conn_seq > 0 => return Ok(Next::Close),
            Behaviour::Serve | Behaviour::DropReused => {}
        }
        let path = req.target.split('?').next().unwrap_or("");
        let answer = match (req.method.as_str(), canned.get(path)) {
            // A create: the stored resource is what was sent.
            ("POST", _) => Canned {
                status: 201,
                ..Canned::json(std::str::from_utf8(&req.body).unwrap_or("{}"))
            },
            (_, Some(c)) => c.clone(),
            (_, None) => Canned {
                status: 404,
                ..Canned::json(
                    r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"not-found"}]}"#,
                )
            },
        };
        write_answer(w, &req.method, &answer)?;
        Ok(Next::Answered)
    });
}

// ---------------------------------------------------------------------------------------------
// The client side.

/// One request on a fresh connection (`Connection: close`). The response is everything the
/// gateway sent until it closed the connection, so a body longer or shorter than its
/// Content-Length shows (`assert_complete`).
fn call(
    to: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {to}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("Connection: close\r\n\r\n");
    // A refusal may come, and the connection close, before the whole body is written.
    let _ = s.write_all(req.as_bytes()).and_then(|_| s.write_all(body));
    let mut raw = Vec::new();
    // A reset after the reply still leaves what was read in `raw`.
    let _ = s.read_to_end(&mut raw);
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "{method} {target}: no complete response head: {:?}",
                String::from_utf8_lossy(&raw)
            )
        });
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {target}: bad status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    }
}

/// The reply is whole and exactly framed: a Content-Length equal to the bytes that came before
/// the gateway closed the connection, and no chunked framing.
fn assert_complete(r: &Response, what: &str) {
    assert!(
        r.header("transfer-encoding").is_none(),
        "{what}: chunked reply {:?}",
        r.headers
    );
    let cl: usize = r
        .header("content-length")
        .unwrap_or_else(|| panic!("{what}: no Content-Length in {:?}", r.headers))
        .parse()
        .unwrap();
    assert_eq!(cl, r.body.len(), "{what}: Content-Length is not the body's");
}

/// The reason code of an OperationOutcome error reply.
fn reason(r: &Response) -> String {
    let v = r.json();
    assert_eq!(v["resourceType"], "OperationOutcome", "{}", r.text());
    v["issue"][0]["details"]["coding"][0]["code"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn patient_token(patient: &str, scope: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "https://patients.test", "aud": "portal", "sub": format!("user-{patient}"),
            "exp": now() + 600, "patient": patient, "scope": scope}),
        &EncodingKey::from_secret(PATIENT_SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn staff_token(role: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "https://staff.test", "aud": "ehr", "sub": format!("{role}-1"),
            "exp": now() + 600, "roles": [role]}),
        &EncodingKey::from_secret(STAFF_SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A gateway whose `/fhir` route serves patient-context callers (jwt_auth, smart_scopes,
/// patient_compartment) from one pool with the given backends, all in one zone.
fn patient_gateway(
    public: u16,
    admin: u16,
    backends: &[SocketAddr],
    max_attempts: u32,
    read_ms: u64,
) -> Gateway {
    patient_gateway_with(public, admin, backends, max_attempts, read_ms, "")
}

fn patient_gateway_with(
    public: u16,
    admin: u16,
    backends: &[SocketAddr],
    max_attempts: u32,
    read_ms: u64,
    server_extra: &str,
) -> Gateway {
    let list = backends
        .iter()
        .map(|b| format!("{{ address: \"{b}\" }}"))
        .collect::<Vec<_>>()
        .join(", ");
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1, max_exchange_body_bytes: {MAX_EXCHANGE}{server_extra} }}
admin: {{ listen: "127.0.0.1:{admin}" }}
auth:
  issuers:
    - {{ name: patients, issuer: "https://patients.test", algorithms: [HS256], hs_secret: "{PATIENT_SECRET}", audiences: [portal], claims: {{ patient: patient }} }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools:
  - name: fhir
    zones: [ {{ name: a, backends: [ {list} ] }} ]
    health_check: {{ interval_ms: 60000 }}
    timeouts: {{ connect_ms: 500, read_ms: {read_ms}, write_ms: 5000, idle_ms: 20000 }}
    max_attempts: {max_attempts}
routes:
  - name: portal
    listener: public
    path_prefix: /fhir
    fhir: true
    pool: fhir
    filters:
      - {{ kind: jwt_auth }}
      - {{ kind: smart_scopes }}
      - {{ kind: patient_compartment }}
  - {{ name: plain, listener: public, path_prefix: /plain, pool: fhir }}
"#
    );
    Gateway::start(&yaml, admin)
}

// ---------------------------------------------------------------------------------------------

#[test]
fn a_patient_caller_gets_whole_checked_exchanges_and_clean_refusals() {
    let backend = Backend::start(Behaviour::Serve);
    let (public, admin) = (free_port(), free_port());
    let gw = patient_gateway(public, admin, &[backend.addr], 3, 5000);
    let p = addr(public);
    let auth = format!(
        "Bearer {}",
        patient_token("pat-a", "patient/*.cruds launch/patient")
    );
    let log = || gw.proc.log();

    // A's own observation: byte-identical, exactly framed; the backend saw the verified identity
    // (not the client's forged copy) and no Accept-Encoding.
    let r = call(
        p,
        "GET",
        "/fhir/Observation/obs-a",
        &[
            ("Authorization", &auth),
            ("Accept-Encoding", "gzip, deflate"),
            ("X-Caregate-Patient", "pat-b"),
        ],
        b"",
    );
    assert_eq!(r.status, 200, "{}\n{}", r.text(), log());
    assert_eq!(r.body, OBS_A.as_bytes(), "the body was changed");
    assert_complete(&r, "own observation");
    let seen = backend.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let fwd = &seen[0];
    assert_eq!(
        (fwd.method.as_str(), fwd.target.as_str()),
        ("GET", "/fhir/Observation/obs-a")
    );
    let all = |name: &str| -> Vec<&str> {
        fwd.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(all("x-caregate-patient"), ["pat-a"], "{:?}", fwd.headers);
    assert_eq!(all("x-caregate-subject"), ["user-pat-a"]);
    assert_eq!(all("x-caregate-auth-method"), ["token"]);
    assert!(
        !fwd.has_header("accept-encoding"),
        "Accept-Encoding was forwarded: {:?}",
        fwd.headers
    );
    assert_eq!(fwd.header("x-request-id"), r.header("x-request-id"));

    // B's observation, sent chunked in several pieces: a clean, complete 404 that names nothing
    // of B.
    let r = call(
        p,
        "GET",
        "/fhir/Observation/obs-b",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(r.status, 404, "{}\n{}", r.text(), log());
    assert_eq!(reason(&r), "not_found");
    assert_complete(&r, "B's observation");
    assert!(
        !r.text().contains("pat-b") && !r.text().contains("obs-b") && !r.text().contains("6.1"),
        "{}",
        r.text()
    );
    assert_eq!(
        backend.seen().last().unwrap().target,
        "/fhir/Observation/obs-b"
    );

    // A gzip-compressed answer (sent although no compression was asked for) cannot be checked:
    // 502, never the data.
    let r = call(
        p,
        "GET",
        "/fhir/Observation/obs-a-gz",
        &[("Authorization", &auth), ("Accept-Encoding", "gzip")],
        b"",
    );
    assert_eq!(r.status, 502, "{}\n{}", r.text(), log());
    assert_eq!(reason(&r), "upstream_error");
    assert_complete(&r, "gzip answer");
    assert!(r.header("content-encoding").is_none());
    assert!(!r.text().contains("obs-a-gz") && !r.text().contains("72.50"));

    // An answer over max_exchange_body_bytes: 502, complete.
    let r = call(
        p,
        "GET",
        "/fhir/Observation/obs-big",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(r.status, 502, "{}\n{}", r.text(), log());
    assert_eq!(reason(&r), "upstream_error");
    assert_complete(&r, "too large answer");
    assert!(r.body.len() < 4096 && !r.text().contains("xxxxxxxx"));

    // A transaction Bundle with one foreign entry: refused whole, before anything is forwarded.
    let before = backend.count();
    let own = json!({"resourceType": "Observation", "status": "final", "code": {"text": "steps"},
        "subject": {"reference": "Patient/pat-a"}});
    let foreign = json!({"resourceType": "Observation", "status": "final", "code": {"text": "steps"},
        "subject": {"reference": "Patient/pat-b"}});
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": own, "request": {"method": "POST", "url": "Observation"}},
        {"resource": foreign, "request": {"method": "POST", "url": "Observation"}}
    ]});
    let r = call(
        p,
        "POST",
        "/fhir",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/fhir+json"),
        ],
        tx.to_string().as_bytes(),
    );
    assert_eq!(r.status, 403, "{}\n{}", r.text(), log());
    assert_eq!(reason(&r), "patient_compartment");
    assert_complete(&r, "refused transaction");
    let detail = r.json()["issue"][0]["details"]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(detail.starts_with("entry 1:"), "{detail}");
    assert!(!r.text().contains("pat-b"));
    assert_eq!(backend.count(), before, "the refused Bundle was forwarded");

    // A request body over max_exchange_body_bytes: 413, and nothing forwarded.
    let big_tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": serde_json::from_str::<serde_json::Value>(&big_observation("x", 100 * 1024)).unwrap(),
         "request": {"method": "POST", "url": "Observation"}}
    ]})
    .to_string();
    assert!(big_tx.len() > MAX_EXCHANGE + 30 * 1024);
    let r = call(
        p,
        "POST",
        "/fhir",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/fhir+json"),
        ],
        big_tx.as_bytes(),
    );
    assert_eq!(r.status, 413, "{}\n{}", r.text(), log());
    assert_eq!(reason(&r), "payload_too_large");
    assert_complete(&r, "too large request");
    assert_eq!(
        backend.count(),
        before,
        "the too large Bundle was forwarded"
    );

    // A's own create goes through: the judged body is forwarded whole, exactly framed.
    let body = own.to_string();
    let r = call(
        p,
        "POST",
        "/fhir/Observation",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/fhir+json"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 201, "{}\n{}", r.text(), log());
    assert_complete(&r, "own create");
    assert_eq!(r.body, body.as_bytes());
    let seen = backend.seen();
    assert_eq!(seen.len(), before + 1);
    let fwd = seen.last().unwrap();
    assert_eq!(
        (fwd.method.as_str(), fwd.target.as_str()),
        ("POST", "/fhir/Observation")
    );
    assert_eq!(fwd.body, body.as_bytes());
    assert_eq!(fwd.header("content-length"), Some(&*body.len().to_string()));
    assert!(!fwd.has_header("transfer-encoding"));
    assert_eq!(fwd.header("x-caregate-patient"), Some("pat-a"));

    // A client that sends `Expect: 100-continue` and waits gets its `100 Continue` from the
    // gateway (the body is read before anything goes upstream), then the final answer.
    let mut s = TcpStream::connect_timeout(&p, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "POST /fhir/Observation HTTP/1.1\r\nHost: {p}\r\nAuthorization: {auth}\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut interim = Vec::new();
    let mut byte = [0u8; 1];
    while !interim.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed before 100 Continue");
        interim.push(byte[0]);
    }
    assert!(
        interim.starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    s.write_all(body.as_bytes()).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        rest.starts_with(b"HTTP/1.1 201"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    let fwd = backend.seen().last().unwrap().clone();
    assert_eq!(fwd.body, body.as_bytes());
    assert!(
        !fwd.has_header("expect"),
        "the gateway answered the expectation itself"
    );
}

#[test]
fn masked_callers_get_whole_masked_bodies_or_a_clean_502() {
    let backend = Backend::start(Behaviour::Serve);
    let (public, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1, max_exchange_body_bytes: {MAX_EXCHANGE} }}
admin: {{ listen: "127.0.0.1:{admin}" }}
auth:
  issuers:
    - {{ name: staff, issuer: "https://staff.test", algorithms: [HS256], hs_secret: "{STAFF_SECRET}", audiences: [ehr] }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools:
  - name: fhir
    zones: [ {{ name: a, backends: [ {{ address: "{b}" }} ] }} ]
    health_check: {{ interval_ms: 60000 }}
routes:
  - name: staff
    listener: public
    path_prefix: /fhir
    fhir: true
    pool: fhir
    filters:
      - {{ kind: jwt_auth }}
      - kind: fhir_mask
        config:
          profiles:
            - roles: [billing]
              resources:
                Patient:
                  - {{ path: telecom, action: remove }}
                  - {{ path: birthDate, action: year }}
"#,
        b = backend.addr
    );
    let gw = Gateway::start(&yaml, admin);
    let p = addr(public);
    let billing = format!("Bearer {}", staff_token("billing"));
    let clinician = format!("Bearer {}", staff_token("clinician"));
    let log = || gw.proc.log();
    let original: serde_json::Value = serde_json::from_str(PATIENT_A).unwrap();
    let assert_masked = |r: &Response, what: &str| {
        assert_eq!(r.status, 200, "{what}: {}\n{}", r.text(), log());
        assert_complete(r, what);
        assert!(
            r.header("content-encoding").is_none(),
            "{what}: {:?}",
            r.headers
        );
        let m = r.json();
        assert!(m.get("telecom").is_none(), "{what}: {m}");
        assert!(
            !r.text().contains("555-0100") && !r.text().contains("maja.l@example.org"),
            "{what}"
        );
        assert_eq!(m["birthDate"], "1961", "{what}");
        assert!(
            m["meta"]["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|l| l["code"] == "REDACTED")),
            "{what}: {m}"
        );
        // What the profile does not name is untouched.
        assert_eq!(m["name"], original["name"]);
        assert_eq!(m["gender"], original["gender"]);
        assert_eq!(m["id"], original["id"]);
    };

    // The billing profile: masked whole, exactly framed; asked upstream without compression.
    let r = call(
        p,
        "GET",
        "/fhir/Patient/pat-a",
        &[("Authorization", &billing), ("Accept-Encoding", "gzip")],
        b"",
    );
    assert_masked(&r, "billing read");
    let fwd = backend.seen().last().unwrap().clone();
    assert_eq!(fwd.target, "/fhir/Patient/pat-a");
    assert!(
        !fwd.has_header("accept-encoding"),
        "Accept-Encoding was forwarded: {:?}",
        fwd.headers
    );
    assert_eq!(fwd.header("x-caregate-roles"), Some("billing"));

    // A backend that compresses anyway: decoded, masked, sent plain.
    let r = call(
        p,
        "GET",
        "/fhir/Patient/pat-a-gz",
        &[("Authorization", &billing), ("Accept-Encoding", "gzip")],
        b"",
    );
    assert_masked(&r, "billing read of a gzip answer");

    // A truncated JSON body cannot be masked: a clean 502 without any of the patient's data.
    let r = call(
        p,
        "GET",
        "/fhir/Patient/pat-trunc",
        &[("Authorization", &billing)],
        b"",
    );
    assert_eq!(r.status, 502, "{}\n{}", r.text(), log());
    assert_eq!(reason(&r), "upstream_error");
    assert_complete(&r, "truncated JSON");
    assert!(
        !r.text().contains("Lindqvist") && !r.text().contains("555-0100"),
        "{}",
        r.text()
    );

    // Neither can a body that is not JSON.
    let r = call(
        p,
        "GET",
        "/fhir/Patient/pat-text",
        &[("Authorization", &billing)],
        b"",
    );
    assert_eq!(r.status, 502, "{}\n{}", r.text(), log());
    assert_eq!(reason(&r), "upstream_error");
    assert_complete(&r, "text/plain");
    assert!(!r.text().contains("Lindqvist") && !r.text().contains("555-0100"));

    // HEAD: the backend's status, and not a byte of body.
    let heads = backend.count();
    let r = call(
        p,
        "HEAD",
        "/fhir/Patient/pat-a",
        &[("Authorization", &billing)],
        b"",
    );
    assert_eq!(r.status, 200, "{:?}\n{}", r.headers, log());
    assert!(r.body.is_empty(), "a HEAD reply with a body: {}", r.text());
    let seen = backend.seen();
    assert_eq!(seen.len(), heads + 1);
    assert_eq!(seen.last().unwrap().method, "HEAD");

    // A role with no profile (and no default): the bytes as the backend sent them.
    let r = call(
        p,
        "GET",
        "/fhir/Patient/pat-a",
        &[("Authorization", &clinician)],
        b"",
    );
    assert_eq!(r.status, 200, "{}\n{}", r.text(), log());
    assert_eq!(
        r.body,
        PATIENT_A.as_bytes(),
        "an unmasked caller's body was changed"
    );
    assert_eq!(
        r.header("content-length"),
        Some(&*PATIENT_A.len().to_string())
    );
}

// Failures after the request was sent, in a whole exchange: the errors of Pingora's client
// session are upstream errors (a dropped connection is `502`, a read timeout `504`), a broken
// connection of an idempotent request goes to the other backend, and the pool's read and write
// timeouts apply (Pingora's connector does not set them; its proxy does for streamed requests).

/// A failing and a good backend in one zone, both healthy (the failing one answers its health
/// probes), two attempts.
fn failing_and_good(failing: Behaviour, read_ms: u64) -> (Backend, Backend, Gateway, SocketAddr) {
    let bad = Backend::start(failing);
    let good = Backend::start(Behaviour::Serve);
    let (public, admin) = (free_port(), free_port());
    let gw = patient_gateway(public, admin, &[bad.addr, good.addr], 2, read_ms);
    (bad, good, gw, addr(public))
}

#[test]
fn whole_exchange_reads_whose_connection_broke_go_to_the_other_backend() {
    let (dropper, good, gw, p) = failing_and_good(Behaviour::Drop, 5000);
    let auth = format!(
        "Bearer {}",
        patient_token("pat-a", "patient/*.cruds launch/patient")
    );
    // Round robin over two backends: some of the six reads go to the dropper first.
    for i in 0..6 {
        let r = call(
            p,
            "GET",
            "/fhir/Observation/obs-a",
            &[("Authorization", &auth)],
            b"",
        );
        assert_eq!(r.status, 200, "GET {i}: {}\n{}", r.text(), gw.proc.log());
        assert_eq!(r.body, OBS_A.as_bytes());
        assert_complete(&r, "retried read");
    }
    let dropped = dropper
        .seen()
        .iter()
        .filter(|s| s.method == "GET" && s.target == "/fhir/Observation/obs-a")
        .count();
    assert!(dropped >= 1, "no read reached the dropping backend");
    assert_eq!(
        good.seen().iter().filter(|s| s.method == "GET").count(),
        6,
        "every read is answered by the good backend"
    );
}

#[test]
fn a_whole_exchange_create_that_was_sent_is_never_sent_again() {
    let (dropper, good, gw, p) = failing_and_good(Behaviour::Drop, 5000);
    let auth = format!(
        "Bearer {}",
        patient_token("pat-a", "patient/*.cruds launch/patient")
    );
    // Round robin brings a create to the dropper within two; that one is a 502 and is not
    // sent again to the good backend. The others are created once each.
    let mut landed = false;
    for i in 0..10 {
        let body = json!({"resourceType": "Observation", "status": "final",
            "code": {"text": format!("create-{i}")}, "subject": {"reference": "Patient/pat-a"}})
        .to_string();
        let r = call(
            p,
            "POST",
            "/fhir/Observation",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/fhir+json"),
            ],
            body.as_bytes(),
        );
        let on_dropper = dropper
            .seen()
            .iter()
            .filter(|s| s.method == "POST" && s.body == body.as_bytes())
            .count();
        let on_good = good
            .seen()
            .iter()
            .filter(|s| s.method == "POST" && s.body == body.as_bytes())
            .count();
        if on_dropper > 0 {
            assert_eq!(on_dropper, 1);
            assert_eq!(on_good, 0, "the create was sent twice");
            assert_eq!(r.status, 502, "{}\n{}", r.text(), gw.proc.log());
            assert_eq!(reason(&r), "upstream_error");
            assert_complete(&r, "dropped create");
            landed = true;
            break;
        }
        assert_eq!(r.status, 201, "create {i}: {}\n{}", r.text(), gw.proc.log());
        assert_eq!(on_good, 1);
    }
    assert!(landed, "no create reached the dropping backend");
}

/// DESIGN.md's rule, one for both paths: a `POST` whose pooled (reused) upstream connection
/// broke after it was sent is never sent again — neither by a whole exchange (a patient's
/// create, judged whole) nor by the streaming proxy (a route without body checks).
#[test]
fn a_post_on_a_broken_reused_connection_is_sent_again_in_neither_path() {
    let (dropper, good, gw, p) = failing_and_good(Behaviour::DropReused, 5000);
    let auth = format!(
        "Bearer {}",
        patient_token("pat-a", "patient/*.cruds launch/patient")
    );
    for path in ["/fhir/Observation", "/plain/Observation"] {
        // Round robin: the dropper answers a first create on a new connection (kept in the
        // pool), and a later one reuses that connection and breaks.
        let mut landed = false;
        for i in 0..12 {
            let body = json!({"resourceType": "Observation", "status": "final",
                "code": {"text": format!("{path}-{i}")}, "subject": {"reference": "Patient/pat-a"}})
            .to_string();
            let r = call(
                p,
                "POST",
                path,
                &[
                    ("Authorization", &auth),
                    ("Content-Type", "application/fhir+json"),
                ],
                body.as_bytes(),
            );
            let sent = |b: &Backend| {
                b.seen()
                    .into_iter()
                    .filter(|s| s.method == "POST" && s.body == body.as_bytes())
                    .collect::<Vec<_>>()
            };
            let (on_dropper, on_good) = (sent(&dropper), sent(&good));
            if on_dropper.iter().any(|s| s.conn_seq > 0) {
                assert_eq!(on_dropper.len(), 1, "{path}: sent twice to the dropper");
                assert!(on_good.is_empty(), "{path}: the create was sent again");
                assert_eq!(r.status, 502, "{path}: {}\n{}", r.text(), gw.proc.log());
                let code = if path.starts_with("/fhir") {
                    reason(&r)
                } else {
                    // problem+json off FHIR routes
                    r.json()["reason"].as_str().unwrap_or("").to_string()
                };
                assert_eq!(code, "upstream_error");
                landed = true;
                break;
            }
            assert_eq!(r.status, 201, "{path} create {i}: {}", r.text());
            assert_eq!(on_dropper.len() + on_good.len(), 1, "{path}: sent once");
        }
        assert!(
            landed,
            "{path}: no create went out on a reused connection to the dropper"
        );
    }
}

#[test]
fn a_whole_exchange_that_timed_out_is_a_504_and_is_not_retried() {
    let (staller, good, gw, p) = failing_and_good(Behaviour::Stall, 300);
    let auth = format!(
        "Bearer {}",
        patient_token("pat-a", "patient/*.cruds launch/patient")
    );
    // Round robin brings a read to the staller within two; a slow backend is not a dead one:
    // that read times out, and is not sent to the good backend.
    let mut landed = false;
    for i in 0..4 {
        let (stalled_before, good_before) = (staller.count(), good.count());
        // Answered well within the client's own read timeout, or the pool's read timeout was
        // not applied.
        let (tx, rx) = std::sync::mpsc::channel();
        let auth2 = auth.clone();
        std::thread::spawn(move || {
            let _ = tx.send(call(
                p,
                "GET",
                "/fhir/Observation/obs-a",
                &[("Authorization", &auth2)],
                b"",
            ));
        });
        let r = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!(
                "GET {i}: no answer within 10 s although the pool's read_ms is 300\n{}",
                gw.proc.log()
            ),
            Err(e) => panic!("GET {i}: the client failed ({e}); see its panic above"),
        };
        if staller.count() > stalled_before {
            assert_eq!(good.count(), good_before, "the timed-out read was retried");
            assert_eq!(r.status, 504, "{}\n{}", r.text(), gw.proc.log());
            assert_eq!(reason(&r), "upstream_timeout");
            assert_complete(&r, "timed-out read");
            landed = true;
            break;
        }
        assert_eq!(r.status, 200, "GET {i}: {}\n{}", r.text(), gw.proc.log());
        assert_eq!(good.count(), good_before + 1);
    }
    assert!(landed, "no read reached the stalling backend");
}

#[test]
fn whole_exchanges_share_one_memory_budget() {
    // The budget holds one 50 KB body, not two: while a create with one waits on a stalled
    // backend, a second large create is refused at once with 503 overloaded; once the first is
    // over, the budget is free again.
    let staller = Backend::start(Behaviour::Stall);
    let (public, admin) = (free_port(), free_port());
    let gw = patient_gateway_with(
        public,
        admin,
        &[staller.addr],
        1,
        1500,
        &format!(", max_exchange_memory_bytes: {MAX_EXCHANGE}"),
    );
    let p = addr(public);
    let auth = format!(
        "Bearer {}",
        patient_token("pat-a", "patient/*.cruds launch/patient")
    );
    let create = |kb: usize| {
        json!({"resourceType": "Observation", "status": "final", "code": {"text": "x".repeat(kb * 1024)},
            "subject": {"reference": "Patient/pat-a"}})
        .to_string()
    };
    let first = {
        let (auth, body) = (auth.clone(), create(50));
        std::thread::spawn(move || {
            call(
                p,
                "POST",
                "/fhir/Observation",
                &[
                    ("Authorization", &auth),
                    ("Content-Type", "application/fhir+json"),
                ],
                body.as_bytes(),
            )
        })
    };
    wait_until(
        "the first create is held upstream",
        Duration::from_secs(10),
        || staller.count() == 1,
    );
    let second = create(20);
    let r = call(
        p,
        "POST",
        "/fhir/Observation",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/fhir+json"),
        ],
        second.as_bytes(),
    );
    assert_eq!(r.status, 503, "{}\n{}", r.text(), gw.proc.log());
    assert_eq!(reason(&r), "overloaded");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_complete(&r, "over the budget");
    assert_eq!(staller.count(), 1, "the refused create was forwarded");
    let r = first.join().unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    // The first exchange gave its share back: the same create now goes upstream (and times out
    // there in turn).
    let r = call(
        p,
        "POST",
        "/fhir/Observation",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/fhir+json"),
        ],
        second.as_bytes(),
    );
    assert_eq!(r.status, 504, "{}\n{}", r.text(), gw.proc.log());
    assert_eq!(staller.count(), 2);
}
