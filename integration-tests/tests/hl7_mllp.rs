//! HL7 v2 over MLLP end to end, with peers nobody on the team wrote: python-hl7's
//! `MLLPClient` (PyPI `hl7`) sends real sample messages through the gateway's MLLP listener (or
//! an `hl7: true` HTTP route), and hl7apy's `MLLPServer` (PyPI `hl7apy`) is the backend that
//! acknowledges them and records what it received (`integration-tests/peers/hl7/`).
//!
//! The messages are the collected samples of `hl7/tests/data/`, used from there, not copied:
//! its README.md gives their sources, commits and licences (MIT, BSD-3-Clause, MPL-2.0; the
//! `normalized-cr/` copies only have their line breaks made CR).
//!
//! The peers live in `integration-tests/peers/hl7/.venv`, which `scripts/deps.sh
//! --with-test-peers` installs: without it every test here is skipped with a message, except
//! under CI (`CI` set), where its absence fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use serde_json::Value;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const PEERS: &str = "integration-tests/peers/hl7";
const KEY: &str = "integration-hl7-audit-key-0123456789abcdef";

/// ORU^R01 v2.4 from GHH LAB at ELAB-3, MSH-10 `CNTRL-3456`, PID-3 `555-44-4444`.
const ORU: &str = "normalized-cr/microsoft-fhir-converter__ORU-R01-RMGEAD.hl7";
/// ORU^R01 v2.5.1 from IA PHIMS Stage at IA Public Health Lab (7.5 kB; it has a PRT segment
/// hl7apy's v2.5.1 library does not know, so the backend builds its ACK by hand).
const ORU_PHL: &str = "normalized-cr/microsoft-fhir-converter__ORU-R01-01.hl7";
/// ADT^A01 v2.5.1 from ADT1 at GOOD HEALTH HOSPITAL, MSH-10 `MSG00001`, two PID-3 ids.
const ADT_A01: &str = "normalized-cr/microsoft-fhir-converter__ADT01-28.hl7";
/// ADT^A03 v2.5 from IRIS at SANTER, MSH-10 `263206` (nHapi, MPL-2.0).
const ADT_A03: &str = "normalized-cr/nhapi__adt_a03.hl7";
/// ADT^A01 v2.3 from HNAM_PM at HNA500: a facility no route admits (python-hl7's sample).
const UNKNOWN_FACILITY: &str = "python-hl7/sample_msh.hl7";

/// The peers' Python, or `None` (after saying why) when they are not installed and this is not
/// CI, where their absence fails the test.
fn python() -> Option<PathBuf> {
    let py = repo_root().join(PEERS).join(".venv/bin/python");
    if py.exists() {
        return Some(py);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing: `bash scripts/deps.sh --with-test-peers` installs python-hl7 and hl7apy for the hl7_mllp tests",
        py.display()
    );
    eprintln!(
        "SKIP hl7_mllp: {} is not installed (`bash scripts/deps.sh --with-test-peers` installs it)",
        py.display()
    );
    None
}

fn sample(rel: &str) -> PathBuf {
    repo_root().join("hl7/tests/data").join(rel)
}

/// The segments of a sample message file (BOM dropped, any line break a segment end).
fn segments(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text
        .trim_start_matches('\u{feff}')
        .replace("\r\n", "\r")
        .replace('\n', "\r");
    text.split('\r')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// What a sample's MSH says: MSH-10, MSH-9, MSH-3.1, MSH-4.1.
struct Header {
    control_id: String,
    message_type: String,
    application: String,
    facility: String,
    /// MSH-15 or MSH-16 is valued: enhanced acknowledgement mode, where the gateway's own
    /// refusal is `CR` (commit reject) rather than `AR`.
    enhanced: bool,
}

impl Header {
    /// The gateway's own refusal of this message: `AR`, or `CR` in enhanced mode.
    fn refusal(&self) -> &'static str {
        if self.enhanced {
            "CR"
        } else {
            "AR"
        }
    }
}

fn header(path: &Path) -> Header {
    let segs = segments(path);
    // "MSH" is element 0 and MSH-2 element 1: MSH-n is element n - 1.
    let f: Vec<&str> = segs[0].split('|').collect();
    let first = |s: &str| s.split('^').next().unwrap_or("").to_string();
    Header {
        control_id: f[9].to_string(),
        message_type: f[8].to_string(),
        application: first(f[2]),
        facility: first(f[3]),
        enhanced: [14, 15]
            .iter()
            .any(|&i| f.get(i).is_some_and(|v| !v.is_empty())),
    }
}

/// The ids (CX.1) of a sample's PID-3 repetitions, empty ones left out.
fn pid3_ids(path: &Path) -> Vec<String> {
    segments(path)
        .iter()
        .find(|s| s.starts_with("PID|"))
        .map(|pid| {
            pid.split('|')
                .nth(3)
                .unwrap_or("")
                .split('~')
                .map(|cx| cx.split('^').next().unwrap_or("").to_string())
                .filter(|id| !id.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// hl7apy's `MLLPServer` (backend.py) on a port of its own, killed on drop.
struct Backend {
    child: Child,
    addr: SocketAddr,
    record: PathBuf,
    stderr: PathBuf,
    _dir: TempDir,
}

impl Backend {
    /// Start it answering `mode` (aa, ae, ar) and wait for its `listening HOST:PORT` line.
    fn start(py: &Path, mode: &str) -> Backend {
        let dir = TempDir::new("hl7apy");
        let record = dir.0.join("received.jsonl");
        let stderr = dir.0.join("stderr.log");
        let mut cmd = Command::new(py);
        cmd.arg(repo_root().join(PEERS).join("backend.py"))
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--mode",
                mode,
                "--record",
            ])
            .arg(&record);
        let (child, addr) = spawn_listening(cmd, "hl7apy backend", &stderr);
        Backend {
            child,
            addr,
            record,
            stderr,
            _dir: dir,
        }
    }

    /// Every message it received, as it recorded them (one JSON object each).
    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The MSH-10 of every message it received, in order (`<none>` for a frame without one).
    fn control_ids(&self) -> Vec<String> {
        self.records()
            .iter()
            .map(|r| r["control_id"].as_str().unwrap_or("<none>").to_string())
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Kill it and wait until its port refuses connections.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let to = self.addr;
        wait_until("the backend's port closed", Duration::from_secs(10), || {
            TcpStream::connect_timeout(&to, Duration::from_millis(200)).is_err()
        });
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// python-hl7's `MLLPClient` (sender.py) sends `files` in order over one connection to
/// `127.0.0.1:port`: the JSON line it printed for each message.
fn send(py: &Path, port: u16, files: &[PathBuf], extra: &[&str]) -> Vec<Value> {
    let out = Command::new(py)
        .arg(repo_root().join(PEERS).join("sender.py"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--timeout", "20"])
        .args(extra)
        .args(files)
        .stdin(Stdio::null())
        .output()
        .expect("run sender.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<Value> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("sender printed {l:?} ({e}); stderr: {stderr}"))
        })
        .collect();
    assert_eq!(
        lines.len(),
        files.len(),
        "one line per message from the sender: {stdout}\nstderr: {stderr}"
    );
    lines
}

/// The sender got an acknowledgement `code` whose MSA-2 is `control_id`.
fn assert_ack(r: &Value, code: &str, control_id: &str) {
    assert_eq!(r["status"], "ack", "no acknowledgement: {r}");
    assert_eq!(r["ack"], code, "MSA-1: {r}");
    assert_eq!(r["control_id"], control_id, "MSA-2: {r}");
}

/// The gateway's own answer (not a relayed one): the code, and an ERR segment saying why.
fn assert_gateway_answer(r: &Value, code: &str) {
    assert_eq!(r["status"], "ack", "no acknowledgement: {r}");
    assert_eq!(r["ack"], code, "MSA-1: {r}");
    assert!(
        !r["err_segments"].as_array().unwrap().is_empty(),
        "an ERR segment with the gateway's {code}: {r}"
    );
    assert!(
        !r["raw"].as_str().unwrap().contains("|BACKEND-"),
        "the gateway answered, not a backend: {r}"
    );
}

/// A relayed acknowledgement: the backend's own, its MSH-10 one backend.py numbers.
fn assert_relayed(r: &Value) {
    assert!(
        r["raw"].as_str().unwrap().contains("|BACKEND-"),
        "the backend's own ACK, relayed as it sent it: {r}"
    );
}

/// An mllp pool of one backend per zone, with fast TCP health checks.
fn mllp_pool(name: &str, zones: &[(&str, SocketAddr)]) -> String {
    let zones: Vec<String> = zones
        .iter()
        .map(|(z, a)| format!("{{ name: {z}, backends: [ {{ address: \"{a}\" }} ] }}"))
        .collect();
    format!(
        "  - {{ name: {name}, protocol: mllp, health_check: {{ interval_ms: 200, timeout_ms: 200 }}, zones: [ {} ] }}\n",
        zones.join(", ")
    )
}

/// The hl7 routes most tests use, on the MLLP listener `hl7-in`: lab results from ELAB-3 and
/// IA Public Health Lab, ADT from GOOD HEALTH HOSPITAL and SANTER, both to `pool`.
fn mllp_routes(pool: &str) -> String {
    format!(
        r#"    - {{ name: lab-results, listener: hl7-in, message_types: [ "ORU^R01" ], sending_facilities: [ ELAB-3, "IA Public Health Lab" ], pool: {pool}, ack_timeout_ms: 5000 }}
    - {{ name: adt, listener: hl7-in, message_types: [ ADT ], sending_facilities: [ "GOOD HEALTH HOSPITAL", SANTER ], pool: {pool}, ack_timeout_ms: 5000 }}
"#
    )
}

/// A gateway config: admin, the HTTP listener `internal`, the MLLP listener `hl7-in`, the known
/// facilities, `pools`, the hl7 `routes`, and `more` top-level sections (audit, HTTP routes).
fn config(
    ports: (u16, u16, u16),
    max_message_bytes: usize,
    pools: &str,
    routes: &str,
    more: &str,
) -> String {
    let (admin, internal, mllp) = ports;
    format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 2 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
listeners:
  - {{ name: internal, channel: internal, listen: "127.0.0.1:{internal}" }}
pools:
{pools}
hl7:
  facilities:
    - {{ name: ELAB-3 }}
    - {{ name: "IA Public Health Lab" }}
    - {{ name: "GOOD HEALTH HOSPITAL" }}
    - {{ name: SANTER }}
  listeners:
    - {{ name: hl7-in, listen: "127.0.0.1:{mllp}", channel: internal, max_message_bytes: {max_message_bytes} }}
  routes:
{routes}
{more}
"#
    )
}

fn ports() -> (u16, u16, u16) {
    (free_port(), free_port(), free_port())
}

const MIB: usize = 1 << 20;

/// The sum of the `caregate_hl7_messages_total` series that carry every one of `labels`.
fn hl7_messages(metrics: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("caregate_hl7_messages_total{"))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// MSA-1 and MSA-2 of an acknowledgement (CR-separated segments, `|` fields).
fn msa(ack: &str) -> (String, String) {
    let seg = ack
        .split(['\r', '\n'])
        .find(|s| s.starts_with("MSA|"))
        .unwrap_or_else(|| panic!("no MSA segment in {ack:?}"));
    let f: Vec<&str> = seg.split('|').collect();
    (
        f.get(1).copied().unwrap_or("").to_string(),
        f.get(2).copied().unwrap_or("").to_string(),
    )
}

/// Write the malformed inputs of these tests into `dir`: text that is not HL7 at all, and an
/// MSH with a control id but no message type.
fn malformed(dir: &Path) -> (PathBuf, PathBuf) {
    let garbage = dir.join("garbage.txt");
    std::fs::write(
        &garbage,
        b"this is not an HL7 message, just a line of text\r",
    )
    .unwrap();
    let no_type = dir.join("no-type.hl7");
    std::fs::write(
        &no_type,
        b"MSH|^~\\&|GHH LAB|ELAB-3|GHH OE|BLDG4|200202150930|||MALFORMED-1|P|2.4\rPID|||555-44-4444||EVERYWOMAN^EVE\r",
    )
    .unwrap();
    (garbage, no_type)
}

/// Scenario: real ORU and ADT messages flow through to a real MLLP backend and its ACKs come
/// back, in order over one connection; the gateway's own answers and the outcomes show in the
/// metrics.
#[test]
fn real_messages_flow_to_a_real_mllp_backend_and_its_acks_come_back() {
    let Some(py) = python() else { return };
    let backend = Backend::start(&py, "aa");
    let ports = ports();
    let yaml = config(
        ports,
        MIB,
        &mllp_pool("lab", &[("zone-a", backend.addr)]),
        &mllp_routes("lab"),
        "",
    );
    let gw = Gateway::start(&yaml, ports.0);

    let files: Vec<PathBuf> = [ORU, ADT_A01, ADT_A03, ORU_PHL].map(sample).to_vec();
    let sent: Vec<String> = files.iter().map(|f| header(f).control_id).collect();
    let acks = send(&py, ports.2, &files, &[]);
    for ((ack, id), f) in acks.iter().zip(&sent).zip(&files) {
        assert_eq!(ack["sent_control_id"], id.as_str(), "{ack}");
        assert_ack(ack, "AA", id);
        assert_relayed(ack);
        assert_eq!(
            ack["ack_type"],
            format!("ACK^{}^ACK", &header(f).message_type[4..7])
        );
    }
    assert_eq!(
        backend.control_ids(),
        sent,
        "the backend received exactly those messages, in order; its log: {}",
        backend.log()
    );
    let types: Vec<String> = backend
        .records()
        .iter()
        .map(|r| r["type"].as_str().unwrap_or("").to_string())
        .collect();
    let sent_types: Vec<String> = files.iter().map(|f| header(f).message_type).collect();
    assert_eq!(types, sent_types, "unchanged MSH-9");

    // A malformed message and one from a facility no route admits: the gateway's own answers,
    // nothing forwarded.
    let dir = TempDir::new("hl7-flow");
    let (_, no_type) = malformed(&dir.0);
    let r = send(&py, ports.2, &[no_type], &["--raw"]);
    assert_gateway_answer(&r[0], "AE");
    let unknown = sample(UNKNOWN_FACILITY);
    let r = send(&py, ports.2, std::slice::from_ref(&unknown), &[]);
    assert_gateway_answer(&r[0], "AR");
    assert_eq!(r[0]["control_id"], header(&unknown).control_id.as_str());
    assert_eq!(
        backend.control_ids(),
        sent,
        "nothing more reached the backend"
    );

    // The metrics: 4 accepted (relayed AA from pool lab), 1 malformed, 1 refused.
    let mut last = String::new();
    wait_until(
        "caregate_hl7_messages_total to count every message",
        Duration::from_secs(10),
        || {
            last = gw.metrics();
            hl7_messages(&last, &["outcome=\"accepted\""]) == 4.0
                && hl7_messages(&last, &["outcome=\"malformed\""]) == 1.0
                && hl7_messages(&last, &["outcome=\"refused\""]) == 1.0
        },
    );
    let m = last;
    assert_eq!(
        hl7_messages(
            &m,
            &[
                "outcome=\"accepted\"",
                "destination=\"lab\"",
                "source=\"hl7-in\""
            ]
        ),
        4.0,
        "{m}"
    );
    assert_eq!(
        hl7_messages(&m, &["outcome=\"accepted\"", "route=\"lab-results\""]),
        2.0,
        "{m}"
    );
    assert_eq!(
        hl7_messages(&m, &["outcome=\"accepted\"", "route=\"adt\""]),
        2.0,
        "{m}"
    );
    assert_eq!(
        hl7_messages(
            &m,
            &[
                "outcome=\"accepted\"",
                "type=\"ORU^R01\"",
                "facility=\"ELAB-3\""
            ]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        hl7_messages(&m, &["outcome=\"malformed\"", "destination=\"gateway\""]),
        1.0,
        "{m}"
    );
    assert_eq!(
        hl7_messages(
            &m,
            &[
                "outcome=\"refused\"",
                "destination=\"gateway\"",
                "facility=\"other\""
            ]
        ),
        1.0,
        "{m}"
    );
    assert!(
        m.contains("caregate_hl7_message_duration_seconds"),
        "the duration histogram: {m}"
    );
}

/// Scenario: malformed input (not HL7 at all, an MSH without a message type, a frame over the
/// listener's `max_message_bytes`) gets AE from the gateway and never reaches the backend; the
/// listener goes on serving good messages.
#[test]
fn malformed_messages_get_ae_and_never_reach_the_backend() {
    let Some(py) = python() else { return };
    let backend = Backend::start(&py, "aa");
    let ports = ports();
    let yaml = config(
        ports,
        4096,
        &mllp_pool("lab", &[("zone-a", backend.addr)]),
        &mllp_routes("lab"),
        "",
    );
    let _gw = Gateway::start(&yaml, ports.0);
    let dir = TempDir::new("hl7-malformed");
    let (garbage, no_type) = malformed(&dir.0);
    let too_large = sample(ORU_PHL);
    assert!(std::fs::metadata(&too_large).unwrap().len() > 4096);
    let good = sample(ORU);
    // Sent as they are (--raw), one frame each, over one connection (or a new one when the
    // gateway closed it after refusing a frame).
    let acks = send(
        &py,
        ports.2,
        &[garbage, no_type, too_large, good.clone()],
        &["--raw"],
    );
    assert_gateway_answer(&acks[0], "AE");
    assert_gateway_answer(&acks[1], "AE");
    assert_eq!(
        acks[1]["control_id"], "MALFORMED-1",
        "MSA-2 = the readable MSH-10"
    );
    assert_gateway_answer(&acks[2], "AE");
    assert_ack(&acks[3], "AA", &header(&good).control_id);
    assert_relayed(&acks[3]);
    assert_eq!(
        backend.control_ids(),
        vec![header(&good).control_id],
        "only the good message reached the backend"
    );
}

/// Scenario: a message from a sending facility that no route admits gets AR and never reaches
/// the backend.
#[test]
fn a_message_from_a_facility_no_route_admits_gets_ar_and_is_not_forwarded() {
    let Some(py) = python() else { return };
    let backend = Backend::start(&py, "aa");
    let ports = ports();
    let yaml = config(
        ports,
        MIB,
        &mllp_pool("lab", &[("zone-a", backend.addr)]),
        &mllp_routes("lab"),
        "",
    );
    let gw = Gateway::start(&yaml, ports.0);
    let unknown = sample(UNKNOWN_FACILITY);
    assert_eq!(header(&unknown).facility, "HNA500");
    let good = sample(ADT_A03);
    let acks = send(&py, ports.2, &[unknown.clone(), good.clone()], &[]);
    assert_gateway_answer(&acks[0], "AR");
    assert_eq!(acks[0]["control_id"], header(&unknown).control_id.as_str());
    assert_ack(&acks[1], "AA", &header(&good).control_id);
    assert_eq!(
        backend.control_ids(),
        vec![header(&good).control_id.clone()],
        "the refused message never reached the backend"
    );

    // A reload that admits the facility: the same message now goes through, on the same
    // listener, without a restart.
    let admitted = yaml
        .replace(
            "    - { name: SANTER }",
            "    - { name: SANTER }\n    - { name: HNA500 }",
        )
        .replace(
            "sending_facilities: [ \"GOOD HEALTH HOSPITAL\", SANTER ]",
            "sending_facilities: [ \"GOOD HEALTH HOSPITAL\", SANTER, HNA500 ]",
        );
    assert_ne!(admitted, yaml);
    std::fs::write(&gw.config_path, &admitted).unwrap();
    let r = request(gw.admin, "POST", "/reload", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let acks = send(&py, ports.2, std::slice::from_ref(&unknown), &[]);
    assert_ack(&acks[0], "AA", &header(&unknown).control_id);
    assert_eq!(
        backend.control_ids(),
        vec![header(&good).control_id, header(&unknown).control_id],
        "after the reload the message reached the backend"
    );
}

/// Scenario: the only zone's backend is stopped: messages get AR (never AA) and reach nothing;
/// this holds from the first message after the stop, before any health check noticed.
#[test]
fn with_the_only_backend_stopped_messages_get_ar_and_reach_nothing() {
    let Some(py) = python() else { return };
    let mut backend = Backend::start(&py, "aa");
    let ports = ports();
    let yaml = config(
        ports,
        MIB,
        &mllp_pool("lab", &[("zone-a", backend.addr)]),
        &mllp_routes("lab"),
        "",
    );
    let _gw = Gateway::start(&yaml, ports.0);
    let first = sample(ORU);
    let r = send(&py, ports.2, std::slice::from_ref(&first), &[]);
    assert_ack(&r[0], "AA", &header(&first).control_id);

    backend.stop();
    let files: Vec<PathBuf> = [ADT_A01, ADT_A03, ORU_PHL].map(sample).to_vec();
    let acks = send(&py, ports.2, &files, &[]);
    for (ack, f) in acks.iter().zip(&files) {
        assert_ne!(ack["ack"], "AA", "never AA with no backend: {ack}");
        assert_ne!(ack["ack"], "CA", "never CA with no backend: {ack}");
        assert_gateway_answer(ack, header(f).refusal());
        assert_eq!(ack["control_id"], header(f).control_id.as_str());
    }
    assert_eq!(
        backend.control_ids(),
        vec![header(&first).control_id],
        "nothing reached the backend after it stopped"
    );
}

/// Scenario: zone A's backend is down (a closed port), zone B's is up: messages go to zone B
/// and are acknowledged AA, before and after health checks mark zone A down.
#[test]
fn with_zone_a_down_messages_go_to_zone_b() {
    let Some(py) = python() else { return };
    let zone_b = Backend::start(&py, "aa");
    let dead = addr(free_port()); // nothing listens there
    let ports = ports();
    let yaml = config(
        ports,
        MIB,
        &mllp_pool("lab", &[("zone-a", dead), ("zone-b", zone_b.addr)]),
        &mllp_routes("lab"),
        "",
    );
    let _gw = Gateway::start(&yaml, ports.0);
    let files: Vec<PathBuf> = [ORU, ADT_A01, ADT_A03, ORU_PHL].map(sample).to_vec();
    let sent: Vec<String> = files.iter().map(|f| header(f).control_id).collect();
    let acks = send(&py, ports.2, &files, &[]);
    for (ack, id) in acks.iter().zip(&sent) {
        assert_ack(ack, "AA", id);
        assert_relayed(ack);
    }
    assert_eq!(zone_b.control_ids(), sent, "zone B's backend got them all");
}

/// Scenario: with `audit:` configured, every message with a PID segment has an access and a
/// completion record naming its control id and PID-3 identifiers (a refused one: a denied
/// record), and `caregate audit verify` passes on the trail.
#[test]
fn every_message_with_a_pid_is_audited_and_the_trail_verifies() {
    let Some(py) = python() else { return };
    let backend = Backend::start(&py, "aa");
    let dir = TempDir::new("hl7-audit");
    let audit = dir.0.join("audit.jsonl");
    let ports = ports();
    let more = format!(
        "audit: {{ path: \"{}\", hmac_key: \"{KEY}\", format: json, checkpoint_interval_ms: 200 }}\n",
        audit.display()
    );
    let yaml = config(
        ports,
        MIB,
        &mllp_pool("lab", &[("zone-a", backend.addr)]),
        &mllp_routes("lab"),
        &more,
    );
    let mut gw = Gateway::start(&yaml, ports.0);
    let files: Vec<PathBuf> = [ORU, ADT_A01, ADT_A03, ORU_PHL].map(sample).to_vec();
    let acks = send(&py, ports.2, &files, &[]);
    for (ack, f) in acks.iter().zip(&files) {
        assert_ack(ack, "AA", &header(f).control_id);
    }
    let unknown = sample(UNKNOWN_FACILITY);
    let r = send(&py, ports.2, std::slice::from_ref(&unknown), &[]);
    assert_gateway_answer(&r[0], "AR");
    gw.sigterm_and_wait();

    let records: Vec<Value> = std::fs::read_to_string(&audit)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v.get("record").cloned())
        .collect();
    let of = |control_id: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["hl7"]["control_id"] == control_id)
            .collect()
    };
    let ids_of = |r: &Value| -> Vec<String> {
        r["hl7"]["patient_identifiers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| p["id"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    for (f, route) in files
        .iter()
        .zip(["lab-results", "adt", "adt", "lab-results"])
    {
        let h = header(f);
        let expected_ids = pid3_ids(f);
        assert!(!expected_ids.is_empty(), "{} has a PID-3", f.display());
        let rs = of(&h.control_id);
        let phases: Vec<&str> = rs.iter().map(|r| r["phase"].as_str().unwrap()).collect();
        assert_eq!(
            phases,
            vec!["access", "completion"],
            "{}: {rs:?}",
            h.control_id
        );
        for r in &rs {
            let hl7 = &r["hl7"];
            assert_eq!(hl7["message_type"], &h.message_type[..3], "{r}");
            assert_eq!(hl7["trigger_event"], &h.message_type[4..7], "{r}");
            assert_eq!(hl7["sending_application"], h.application.as_str(), "{r}");
            assert_eq!(hl7["sending_facility"], h.facility.as_str(), "{r}");
            let got = ids_of(r);
            for id in &expected_ids {
                assert!(got.contains(id), "PID-3 id {id} in {r}");
            }
            assert_eq!(r["action"]["method"], "MLLP", "{r}");
            assert_eq!(r["action"]["route"], route, "{r}");
            assert_eq!(r["action"]["listener"], "hl7-in", "{r}");
            assert_eq!(
                r["actor"]["system"],
                format!("{}@{}", h.application, h.facility),
                "{r}"
            );
            assert!(
                r["actor"]["source_address"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("127.0.0.1")),
                "{r}"
            );
        }
        assert_eq!(rs[1]["hl7"]["ack_code"], "AA", "{}", rs[1]);
    }
    // Authority and type of a PID-3 identifier (ADT1 / MR).
    let adt = of(&header(&sample(ADT_A01)).control_id);
    let patid = adt[1]["hl7"]["patient_identifiers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "PATID1234")
        .cloned()
        .unwrap_or_else(|| panic!("PATID1234 in {}", adt[1]));
    assert_eq!(patid["authority"], "ADT1", "{patid}");
    assert_eq!(patid["type"], "MR", "{patid}");
    // The refused message: one denied record, with its AR.
    let rs = of(&header(&unknown).control_id);
    assert_eq!(rs.len(), 1, "{rs:?}");
    assert_eq!(rs[0]["phase"], "denied", "{}", rs[0]);
    assert_eq!(rs[0]["hl7"]["ack_code"], "AR", "{}", rs[0]);
    for id in pid3_ids(&unknown) {
        assert!(ids_of(rs[0]).contains(&id), "PID-3 id {id} in {}", rs[0]);
    }

    let (code, out) = audit_verify(&audit, KEY);
    assert_eq!(code, Some(0), "caregate audit verify: {out}");
}

/// Scenario: HL7 v2 over HTTP: an `hl7: true` route on the HTTP listener, an hl7 route naming it
/// in `http_route` and sending to the mllp pool. A POSTed ORU gets 200 with the backend's AA
/// as body; garbage gets 400 with the gateway's AE.
#[test]
fn http_ingestion_answers_with_the_ack() {
    let Some(py) = python() else { return };
    let backend = Backend::start(&py, "aa");
    let (admin, internal, mllp) = ports();
    let routes = "    - { name: lab-http, http_route: hl7-http, message_types: [ \"ORU^R01\" ], sending_facilities: [ ELAB-3 ], pool: lab, ack_timeout_ms: 5000 }\n";
    let more = "routes:\n  - { name: hl7-http, listener: internal, path_prefix: /hl7v2, methods: [POST], hl7: true }\n";
    let yaml = config(
        (admin, internal, mllp),
        MIB,
        &mllp_pool("lab", &[("zone-a", backend.addr)]),
        routes,
        more,
    );
    let _gw = Gateway::start(&yaml, admin);
    let oru = sample(ORU);
    let body = std::fs::read(&oru).unwrap();
    let r = request(
        addr(internal),
        "POST",
        "/hl7v2",
        &[("Content-Type", "application/hl7-v2")],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type")
            .map(|v| v.split(';').next().unwrap_or("").trim()),
        Some("application/hl7-v2")
    );
    let ack = r.text();
    assert_eq!(
        msa(&ack),
        ("AA".to_string(), header(&oru).control_id),
        "{ack:?}"
    );
    assert!(ack.contains("|BACKEND-"), "the backend's own ACK: {ack:?}");
    assert_eq!(backend.control_ids(), vec![header(&oru).control_id]);

    let r = request(
        addr(internal),
        "POST",
        "/hl7v2",
        &[("Content-Type", "application/hl7-v2")],
        b"this is not an HL7 message",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(msa(&r.text()).0, "AE", "{:?}", r.text());
    assert_eq!(
        backend.control_ids(),
        vec![header(&oru).control_id],
        "the garbage never reached the backend"
    );
}
