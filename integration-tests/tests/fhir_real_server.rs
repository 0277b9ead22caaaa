//! The patient compartment against a real FHIR server's answers: exchanges recorded from
//! helios-hfs 0.2.7 loaded with Synthea patients (`data/captured-helios-hfs/`, see its README),
//! replayed by a small backend that answers each recorded request target with the recorded body.
//!
//! A real server's `Patient/<id>/$everything` and `_include=Encounter:participant` return, as
//! FHIR allows, the `Practitioner` and `Organization` the patient's resources reference: types
//! outside the Patient compartment, which must reach the patient whole and unchanged. The same
//! answers with another patient's data spliced in must not: `404 not_found`, none of it released.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

const SECRET: &str = "real-server-patient-secret-0123456789abcdef";
/// The captured patient: the caller's patient context.
const PATIENT: &str = "01a2225c-7329-7681-ab88-3d9494dc7bdf";
/// Another captured patient (`01_GET__Patient__count_5.json`, `12_GET__Observation_…`).
const OTHER: &str = "01a2225c-7996-7c11-b56b-dd20a4e588c8";
/// The base URL the server was recorded under (in `fullUrl`s and links).
const RECORDED_BASE: &str = "http://127.0.0.1:8085";

const READ: &str = "02_GET__Patient_01a2225c_7329_7681_ab88_3d9494dc7bdf.json";
const COMPARTMENT_SEARCH: &str =
    "05_GET__Patient_01a2225c_7329_7681_ab88_3d9494dc7bdf_Observation__count_5.json";
const INCLUDE: &str =
    "07_GET__Encounter_patient_01a2225c_7329_7681_ab88_3d9494dc7bdf__count_5__incl.json";
const EVERYTHING_1: &str =
    "10_GET__Patient_01a2225c_7329_7681_ab88_3d9494dc7bdf__everything__count_20.json";
const EVERYTHING_2: &str =
    "10_GET__Patient_01a2225c_7329_7681_ab88_3d9494dc7bdf__everything__count_20__next.json";
const OTHER_PATIENTS: &str = "01_GET__Patient__count_5.json";
const OTHER_OBSERVATIONS: &str = "12_GET__Observation_not_a_param_1.json";

// ---------------------------------------------------------------------------------------------
// The recorded exchanges.

/// One recorded exchange: the request target (path and query, without the recorded base) and
/// the response as the replay backend serves it.
#[derive(Clone)]
struct Recorded {
    target: String,
    status: u16,
    /// The recorded headers without the framing and coding ones (the stored body is decoded).
    headers: Vec<(String, String)>,
    body: Value,
}

impl Recorded {
    fn load(file: &str) -> Recorded {
        let path: PathBuf = repo_root()
            .join("integration-tests/data/captured-helios-hfs")
            .join(file);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let v: Value = serde_json::from_str(&text).unwrap();
        let url = v["request"]["url"].as_str().unwrap();
        let target = url.strip_prefix(RECORDED_BASE).unwrap_or(url).to_string();
        assert!(target.starts_with('/'), "{file}: {url}");
        let headers = v["response"]["headers"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.to_ascii_lowercase().as_str(),
                    "content-encoding" | "transfer-encoding" | "content-length" | "connection"
                )
            })
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        Recorded {
            target,
            status: v["response"]["status"].as_u64().unwrap() as u16,
            headers,
            body: v["response"]["body"].clone(),
        }
    }

    /// The body as the backend sends it.
    fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The same exchange with `f` applied to the body.
    fn with(&self, f: impl FnOnce(&mut Value)) -> Recorded {
        let mut r = self.clone();
        f(&mut r.body);
        r
    }
}

/// The resources of a recorded Bundle.
fn resources(r: &Recorded) -> Vec<Value> {
    r.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"].clone())
        .collect()
}

/// Add an entry (with a `fullUrl` under the recorded base) to a Bundle.
fn add_entry(bundle: &mut Value, resource: Value, mode: &str) {
    let url = format!(
        "{RECORDED_BASE}/{}/{}",
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap_or("x")
    );
    bundle["entry"]
        .as_array_mut()
        .unwrap()
        .push(json!({"fullUrl": url, "resource": resource, "search": {"mode": mode}}));
}

/// The first entry's resource of the given type.
fn first_of<'a>(bundle: &'a mut Value, ty: &str) -> &'a mut Value {
    bundle["entry"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .map(|e| &mut e["resource"])
        .find(|r| r["resourceType"] == ty)
        .unwrap_or_else(|| panic!("no {ty} entry"))
}

// ---------------------------------------------------------------------------------------------
// The replay backend.

/// A scripted HTTP/1.1 backend that answers each request target it was given with its
/// recorded answer (plain, `Content-Length` framed), anything else with a FHIR `404`, and
/// records every request.
struct Replay {
    addr: SocketAddr,
    answers: Arc<Mutex<HashMap<String, Recorded>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Replay {
    fn start() -> Replay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let answers: Arc<Mutex<HashMap<String, Recorded>>> = Arc::default();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (answers2, seen2) = (answers.clone(), seen.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (answers, seen) = (answers2.clone(), seen2.clone());
                std::thread::spawn(move || replay(stream, &answers, &seen));
            }
        });
        Replay {
            addr,
            answers,
            seen,
        }
    }

    /// Answer `target` (as the gateway forwards it) with `r`, in place of what it answered.
    fn answer(&self, target: &str, r: &Recorded) {
        self.answers
            .lock()
            .unwrap()
            .insert(target.to_string(), r.clone());
    }

    fn seen_targets(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.target.clone())
            .collect()
    }
}

fn replay(stream: TcpStream, answers: &Mutex<HashMap<String, Recorded>>, seen: &Mutex<Vec<Seen>>) {
    serve_scripted(stream, seen, |req, w| {
        let answer = answers.lock().unwrap().get(&req.target).cloned();
        let (status, head, body) = match (req.method.as_str(), answer) {
            ("GET", Some(rec)) => (rec.status, rec.headers.clone(), rec.bytes()),
            _ => (
                404,
                vec![("content-type".to_string(), "application/fhir+json".to_string())],
                br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"not-found"}]}"#
                    .to_vec(),
            ),
        };
        let mut out = format!("HTTP/1.1 {status} Recorded\r\n");
        for (k, v) in &head {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&body);
        w.write_all(&bytes)?;
        w.flush()?;
        Ok(Next::Answered)
    });
}

// ---------------------------------------------------------------------------------------------
// The gateway and the caller.

fn patient_token(patient: &str, scope: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "https://patients.test", "aud": "portal", "sub": format!("user-{patient}"),
            "exp": now + 600, "patient": patient, "scope": scope}),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A gateway whose `/fhir` route serves patient-context callers (jwt_auth, smart_scopes,
/// patient_compartment) from the replay backend. Requests go upstream with their path as the
/// client sent it (`/fhir/...`), so the replay answers `/fhir` + the recorded target.
fn gateway(backend: SocketAddr) -> (Gateway, SocketAddr) {
    let (public, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
auth:
  issuers:
    - {{ name: patients, issuer: "https://patients.test", algorithms: [HS256], hs_secret: "{SECRET}", audiences: [portal], claims: {{ patient: patient }} }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools:
  - name: fhir
    zones: [ {{ name: a, backends: [ {{ address: "{backend}" }} ] }} ]
    health_check: {{ interval_ms: 60000 }}
    timeouts: {{ connect_ms: 1000, read_ms: 10000, write_ms: 5000, idle_ms: 20000 }}
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
"#
    );
    (Gateway::start(&yaml, admin), addr(public))
}

/// Each recorded exchange, answered by the backend at the target the gateway forwards.
fn replayed(backend: &Replay, files: &[&str]) -> HashMap<String, Recorded> {
    let mut m = HashMap::new();
    for f in files {
        let r = Recorded::load(f);
        backend.answer(&format!("/fhir{}", r.target), &r);
        m.insert(f.to_string(), r);
    }
    m
}

fn call(gw: SocketAddr, token: &str, target: &str) -> Response {
    request(
        gw,
        "GET",
        target,
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Accept", "application/fhir+json"),
            // Asked for, as the recording client did; the gateway takes it off upstream.
            ("Accept-Encoding", "gzip"),
        ],
        b"",
    )
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

// ---------------------------------------------------------------------------------------------

#[test]
fn a_patient_gets_the_real_servers_answers_whole_includes_and_everything() {
    let backend = Replay::start();
    let rec = replayed(
        &backend,
        &[
            READ,
            COMPARTMENT_SEARCH,
            INCLUDE,
            EVERYTHING_1,
            EVERYTHING_2,
        ],
    );
    let (gw, p) = gateway(backend.addr);
    let token = patient_token(PATIENT, "launch/patient patient/*.rs");

    // What the defect was about: the Practitioner and Organization the patient's resources
    // reference come with `$everything` (both pages) and with `_include=Encounter:participant`.
    for (file, outside) in [
        (INCLUDE, vec!["Practitioner"]),
        (EVERYTHING_1, vec!["Organization"]),
        (EVERYTHING_2, vec!["Practitioner", "Organization"]),
    ] {
        let types: Vec<Value> = resources(&rec[file])
            .iter()
            .map(|r| r["resourceType"].clone())
            .collect();
        for t in outside {
            assert!(types.contains(&json!(t)), "{file} has no {t}");
        }
    }

    for file in [READ, COMPARTMENT_SEARCH, INCLUDE, EVERYTHING_1] {
        let r = &rec[file];
        let target = format!("/fhir{}", r.target);
        let got = call(p, &token, &target);
        assert_eq!(
            got.status,
            200,
            "{target}: {}\n{}",
            got.text(),
            gw.proc.log()
        );
        assert_eq!(
            got.body,
            r.bytes(),
            "{target}: the body is not the backend's, byte for byte"
        );
        assert_eq!(
            got.header("content-type"),
            r.header("content-type"),
            "{target}"
        );
        assert_eq!(
            got.header("content-length"),
            Some(r.bytes().len().to_string().as_str()),
            "{target}"
        );
        // Forwarded as sent: the replay found the recorded target.
        assert_eq!(
            backend.seen_targets().last().map(String::as_str),
            Some(target.as_str())
        );
    }

    // Page 2 of `$everything`, by the `next` link of page 1 as the patient received it.
    let page1 = call(p, &token, &format!("/fhir{}", rec[EVERYTHING_1].target)).json();
    let next = next_link(&page1).expect("a next link");
    assert!(next.contains("_cursor="), "{next}");
    let next_target = format!("/fhir{}", next.strip_prefix(RECORDED_BASE).unwrap());
    assert_eq!(next_target, format!("/fhir{}", rec[EVERYTHING_2].target));
    let page2 = call(p, &token, &next_target);
    assert_eq!(page2.status, 200, "{}\n{}", page2.text(), gw.proc.log());
    assert_eq!(page2.body, rec[EVERYTHING_2].bytes());
    assert_eq!(
        backend.seen_targets().last().map(String::as_str),
        Some(next_target.as_str())
    );
    // The gateway asked for an uncompressed answer.
    assert!(backend
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|s| !s.has_header("accept-encoding")));
}

#[test]
fn another_patients_data_spliced_into_the_real_answers_is_never_released() {
    let backend = Replay::start();
    let rec = replayed(
        &backend,
        &[COMPARTMENT_SEARCH, INCLUDE, EVERYTHING_1, EVERYTHING_2],
    );
    let (gw, p) = gateway(backend.addr);
    let token = patient_token(PATIENT, "launch/patient patient/*.rs");

    // Another real patient, and one of their real Observations.
    let other_patient = resources(&Recorded::load(OTHER_PATIENTS))
        .into_iter()
        .find(|r| r["id"] == OTHER)
        .unwrap();
    let other_family = other_patient["name"][0]["family"]
        .as_str()
        .unwrap()
        .to_string();
    let other_obs = resources(&Recorded::load(OTHER_OBSERVATIONS))
        .into_iter()
        .find(|r| r["subject"]["reference"] == format!("Patient/{OTHER}"))
        .unwrap();
    let other_obs_id = other_obs["id"].as_str().unwrap().to_string();
    // One of the caller's Encounters, moved to the other patient under a new id.
    let mut other_enc = resources(&rec[INCLUDE])
        .into_iter()
        .find(|r| r["resourceType"] == "Encounter")
        .unwrap();
    other_enc["id"] = json!("01a2225c-ffff-7000-8000-00000000e0b0");
    other_enc["subject"]["reference"] = json!(format!("Patient/{OTHER}"));
    // One of the caller's Observations with its subject taken off (a compartment type that
    // references no patient: whose it is cannot be told).
    let mut orphan_obs = resources(&rec[COMPARTMENT_SEARCH])[0].clone();
    orphan_obs["id"] = json!("01a2225c-ffff-7000-8000-0000000000b5");
    orphan_obs.as_object_mut().unwrap().remove("subject");
    orphan_obs.as_object_mut().unwrap().remove("encounter");

    let cases: Vec<(&str, &str, Recorded, Vec<String>)> = vec![
        // (a) another Patient as an entry.
        (
            "$everything page 1 + another Patient (match)",
            EVERYTHING_1,
            rec[EVERYTHING_1].with(|b| add_entry(b, other_patient.clone(), "match")),
            vec![],
        ),
        (
            "_include search + another Patient (include)",
            INCLUDE,
            rec[INCLUDE].with(|b| add_entry(b, other_patient.clone(), "include")),
            vec![],
        ),
        // (b) another patient's Observation or Encounter as an include entry.
        (
            "$everything page 2 + another patient's Observation (include)",
            EVERYTHING_2,
            rec[EVERYTHING_2].with(|b| add_entry(b, other_obs.clone(), "include")),
            vec![other_obs_id.clone()],
        ),
        (
            "_include search + another patient's Encounter (include)",
            INCLUDE,
            rec[INCLUDE].with(|b| add_entry(b, other_enc.clone(), "include")),
            vec!["01a2225c-ffff-7000-8000-00000000e0b0".into()],
        ),
        // (c) an Organization or Practitioner that contains a Patient.
        (
            "$everything page 1: the Organization contains a Patient",
            EVERYTHING_1,
            rec[EVERYTHING_1].with(|b| {
                first_of(b, "Organization")["contained"] = json!([other_patient.clone()]);
            }),
            vec![],
        ),
        (
            "_include search: the Practitioner contains a Patient",
            INCLUDE,
            rec[INCLUDE].with(|b| {
                first_of(b, "Practitioner")["contained"] = json!([other_patient.clone()]);
            }),
            vec![],
        ),
        (
            "$everything page 2: the Practitioner contains another patient's Observation",
            EVERYTHING_2,
            rec[EVERYTHING_2].with(|b| {
                first_of(b, "Practitioner")["contained"] = json!([other_obs.clone()]);
            }),
            vec![other_obs_id.clone()],
        ),
        (
            "$everything page 2: the Practitioner references another patient",
            EVERYTHING_2,
            rec[EVERYTHING_2].with(|b| {
                first_of(b, "Practitioner")["extension"] = json!([{"url": "http://example.org/x",
                    "valueReference": {"reference": format!("Patient/{OTHER}")}}]);
            }),
            vec![],
        ),
        (
            "_include search + a Group of the caller and another patient (include)",
            INCLUDE,
            rec[INCLUDE].with(|b| {
                add_entry(
                    b,
                    json!({"resourceType": "Group", "id": "01a2225c-ffff-7000-8000-0000000000a1",
                        "type": "person", "actual": true, "member": [
                            {"entity": {"reference": format!("Patient/{PATIENT}")}},
                            {"entity": {"reference": format!("Patient/{OTHER}")}}]}),
                    "include",
                )
            }),
            vec!["01a2225c-ffff-7000-8000-0000000000a1".into()],
        ),
        // (d) a compartment-type resource that references no patient.
        (
            "$everything page 2 + an Observation of no patient (match)",
            EVERYTHING_2,
            rec[EVERYTHING_2].with(|b| add_entry(b, orphan_obs.clone(), "match")),
            vec!["01a2225c-ffff-7000-8000-0000000000b5".into()],
        ),
        (
            "compartment search + an Observation of no patient (match)",
            COMPARTMENT_SEARCH,
            rec[COMPARTMENT_SEARCH].with(|b| add_entry(b, orphan_obs.clone(), "match")),
            vec!["01a2225c-ffff-7000-8000-0000000000b5".into()],
        ),
        // An outside type that none of the caller's entries references, as a `match` entry of
        // a search (not `$everything`, not an include).
        (
            "compartment search + an unreferenced Organization (match)",
            COMPARTMENT_SEARCH,
            rec[COMPARTMENT_SEARCH].with(|b| {
                add_entry(
                    b,
                    json!({"resourceType": "Organization", "id": "01a2225c-ffff-7000-8000-0000000000c1", "name": "Elsewhere Clinic"}),
                    "match",
                )
            }),
            vec!["01a2225c-ffff-7000-8000-0000000000c1".into()],
        ),
    ];
    for (what, file, spliced, ids) in cases {
        let target = format!("/fhir{}", rec[file].target);
        backend.answer(&target, &spliced);
        let before = backend.seen_targets().len();
        let r = call(p, &token, &target);
        assert_eq!(
            backend.seen_targets().len(),
            before + 1,
            "{what}: the backend was not asked"
        );
        assert_eq!(r.status, 404, "{what}: {}\n{}", r.text(), gw.proc.log());
        assert_eq!(reason(&r), "not_found", "{what}");
        let text = r.text();
        for id in ids.iter().map(String::as_str).chain([OTHER, PATIENT]) {
            assert!(!text.contains(id), "{what}: the refusal carries {id}");
        }
        assert!(
            !text.contains(&other_family),
            "{what}: the refusal carries PHI"
        );
        assert!(
            !text.contains("01a2225c"),
            "{what}: the refusal carries an id"
        );
        // The same request with the recorded answer: released whole.
        backend.answer(&target, &rec[file]);
        let r = call(p, &token, &target);
        assert_eq!(r.status, 200, "{what}, unspliced: {}", r.text());
        assert_eq!(r.body, rec[file].bytes(), "{what}, unspliced");
    }

    // What `$everything` returns of outside types is released even when none of the caller's
    // entries references it.
    let target = format!("/fhir{}", rec[EVERYTHING_2].target);
    let extra = rec[EVERYTHING_2].with(|b| {
        add_entry(
            b,
            json!({"resourceType": "Location", "id": "01a2225c-ffff-7000-8000-0000000000d1", "name": "Ward 3"}),
            "match",
        )
    });
    backend.answer(&target, &extra);
    let r = call(p, &token, &target);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, extra.bytes());
}
