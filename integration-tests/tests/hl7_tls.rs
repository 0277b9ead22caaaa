//! HL7 v2 over MLLP over TLS with client certificates (mTLS), with a TLS client nobody on the
//! team wrote: `openssl s_client` sends framed messages through the gateway's TLS hl7 listener to
//! the native `mllp-responder` backend.
//!
//! - a client with the CA's client certificate (CN `lab-interface-engine`) gets the backend's AA
//!   for a message whose route admits that CN (`client_certs`), and the gateway's AR for a message
//!   whose route admits only another CN; only the admitted message reaches the backend;
//! - a client with no certificate, and one with a certificate of another CA (same CN), are refused
//!   at the handshake: no ACK, nothing forwarded;
//! - the audit trail names the client certificate's subject.
//!
//! Needs the `openssl` command (the test PKI is made with it too): without it the test is skipped
//! with a message, except under CI (`CI` set), where its absence fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const KEY: &str = "integration-hl7-tls-audit-key-0123456789abcdef";
/// The CN of the Pki's `client` certificate (and of its `rogue-client`, from another CA).
const CLIENT_CN: &str = "lab-interface-engine";

/// ORU^R01 from LIS at NORTH_LAB, with a PID: routed to `lab-results`, which admits CLIENT_CN.
const ORU_ALLOWED: &str =
    "MSH|^~\\&|LIS|NORTH_LAB|EHR|HOSP|20250101120000||ORU^R01|tls-1|P|2.5\rPID|1||12345^^^HOSP^MR\rOBR|1\r";
/// ADT^A01 from LIS at NORTH_LAB, with a PID: routed to `adt-other-engine`, which admits only
/// another CN.
const ADT_REFUSED: &str =
    "MSH|^~\\&|LIS|NORTH_LAB|EHR|HOSP|20250101120000||ADT^A01|tls-2|P|2.5\rEVN|A01|20250101120000\rPID|1||67890^^^HOSP^MR\r";
/// The same ORU (another control id), sent without a client certificate.
const ORU_NO_CERT: &str =
    "MSH|^~\\&|LIS|NORTH_LAB|EHR|HOSP|20250101120000||ORU^R01|tls-3|P|2.5\rPID|1||12345^^^HOSP^MR\rOBR|1\r";
/// The same ORU (another control id), sent with the other CA's certificate.
const ORU_ROGUE: &str =
    "MSH|^~\\&|LIS|NORTH_LAB|EHR|HOSP|20250101120000||ORU^R01|tls-4|P|2.5\rPID|1||12345^^^HOSP^MR\rOBR|1\r";

/// Whether the `openssl` command runs; false (after saying why) when it does not and this is not
/// CI, where its absence fails the test.
fn openssl_available() -> bool {
    let ok = Command::new("openssl")
        .arg("version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "`openssl` is not on PATH: the hl7_tls test needs it (TLS client and test PKI)"
    );
    eprintln!("SKIP hl7_tls: `openssl` is not on PATH");
    false
}

/// The `mllp-responder` binary of this package, built next to the test binaries.
fn responder_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_mllp-responder") {
        let p = PathBuf::from(p);
        if p.exists() {
            return p;
        }
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/mllp-responder
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("profile dir");
    let bin = profile_dir.join("mllp-responder");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build -p caregate-integration-tests --bin mllp-responder`",
        bin.display()
    );
    bin
}

/// `mllp-responder --mode aa --record FILE` on a port of its own, killed on drop.
struct Responder {
    child: Child,
    addr: SocketAddr,
    record: PathBuf,
    _dir: TempDir,
}

impl Responder {
    /// Start it and wait for its `listening <addr>` line.
    fn start() -> Responder {
        let dir = TempDir::new("mllp-responder");
        let record = dir.0.join("received.txt");
        let stderr = dir.0.join("stderr.log");
        let mut cmd = Command::new(responder_bin());
        cmd.args(["--listen", "127.0.0.1:0", "--mode", "aa", "--record"])
            .arg(&record);
        let (child, addr) = spawn_listening(cmd, "mllp-responder", &stderr);
        Responder {
            child,
            addr,
            record,
            _dir: dir,
        }
    }

    /// The MSH-10 of every message it received, in order.
    fn control_ids(&self) -> Vec<String> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one `openssl s_client` session got.
struct Session {
    /// The acknowledgements read back (frame content), one per message answered, in order.
    acks: Vec<String>,
    /// Everything s_client wrote on stdout (the frames, and anything else).
    stdout: Vec<u8>,
    /// Its stdout closed (it exited: connection closed or handshake failed) before every message
    /// was answered.
    closed: bool,
    /// No answer and no close within the session's time limit.
    timed_out: bool,
    /// s_client's stderr (handshake diagnostics).
    stderr: String,
}

impl Session {
    fn describe(&self) -> String {
        format!(
            "acks: {:?}; closed: {}; timed out: {}; stdout: {:?}; s_client stderr:\n{}",
            self.acks,
            self.closed,
            self.timed_out,
            String::from_utf8_lossy(&self.stdout),
            self.stderr
        )
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Send `messages` in order over one TLS connection to `127.0.0.1:port` with `openssl s_client`
/// (trusting the Pki's CA; with the Pki certificate and key named `cert`, e.g. `client`, if
/// any), each framed in MLLP, waiting for each one's framed acknowledgement before sending the
/// next. Never hangs: the whole session is bounded by `limit`.
fn s_client(
    pki: &Pki,
    port: u16,
    cert: Option<&str>,
    messages: &[&str],
    limit: Duration,
) -> Session {
    let dir = TempDir::new("s-client");
    let err_path = dir.0.join("stderr.log");
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &format!("127.0.0.1:{port}"),
        "-CAfile",
        &pki.path("ca.crt"),
        "-quiet",
        "-no_ign_eof",
    ]);
    if let Some(name) = cert {
        cmd.args([
            "-cert",
            &pki.path(&format!("{name}.crt")),
            "-key",
            &pki.path(&format!("{name}.key")),
        ]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn openssl s_client");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let deadline = Instant::now() + limit;
    let (mut all, mut pending, mut acks) = (Vec::new(), Vec::new(), Vec::new());
    let (mut closed, mut timed_out) = (false, false);
    'messages: for m in messages {
        let mut framed = vec![0x0b];
        framed.extend_from_slice(m.as_bytes());
        framed.extend_from_slice(b"\x1c\r");
        // s_client reads its stdin only once the handshake is done; a failed one makes it exit
        // (then this write fails, or the read below sees the end).
        if stdin
            .write_all(&framed)
            .and_then(|()| stdin.flush())
            .is_err()
        {
            closed = true;
            break;
        }
        loop {
            if let Some(end) = find(&pending, b"\x1c\r") {
                let frame: Vec<u8> = pending.drain(..end + 2).collect();
                let body = &frame[..end];
                // Anything before the start block (s_client chatter) is not the frame.
                let start = body.iter().rposition(|&b| b == 0x0b).map_or(0, |i| i + 1);
                acks.push(String::from_utf8_lossy(&body[start..]).into_owned());
                continue 'messages;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(bytes) => {
                    all.extend_from_slice(&bytes);
                    pending.extend_from_slice(&bytes);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break 'messages;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    timed_out = true;
                    break 'messages;
                }
            }
        }
    }
    // End of input: with -no_ign_eof, s_client closes the connection and exits.
    drop(stdin);
    let exit_by = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < exit_by => std::thread::sleep(Duration::from_millis(25)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
    let _ = reader.join();
    // Whatever arrived after the last answer (or on a closed session).
    while let Ok(bytes) = rx.try_recv() {
        all.extend_from_slice(&bytes);
    }
    Session {
        acks,
        stdout: all,
        closed,
        timed_out,
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
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

/// The records of an audit trail (`{"seq":..,"record":{..},"mac":..}` lines; checkpoints left
/// out).
fn audit_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("record").cloned())
        .collect()
}

/// Scenario: an hl7 listener with TLS that requires a client certificate, two routes keyed by
/// message type whose `client_certs` admit different CNs, and the native responder behind them.
#[test]
fn mllp_over_mtls_admits_by_client_certificate_cn_and_refuses_clients_without_one() {
    if !openssl_available() {
        return;
    }
    let pki = Pki::new();
    let responder = Responder::start();
    let dir = TempDir::new("hl7-tls");
    let audit = dir.0.join("audit.jsonl");
    let (admin, internal, mllp) = (free_port(), free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 2 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
audit: {{ path: "{audit}", hmac_key: "{KEY}", format: json, checkpoint_interval_ms: 200 }}
listeners:
  - {{ name: internal, channel: internal, listen: "127.0.0.1:{internal}" }}
pools:
  - {{ name: lab, protocol: mllp, health_check: {{ interval_ms: 200, timeout_ms: 200 }}, zones: [ {{ name: zone-a, backends: [ {{ address: "{backend}" }} ] }} ] }}
hl7:
  facilities:
    - {{ name: NORTH_LAB }}
  listeners:
    - name: hl7-tls
      listen: "127.0.0.1:{mllp}"
      channel: internal
      tls: {{ cert: "{cert}", key: "{key}", client_ca: "{ca}", require_client_cert: true }}
  routes:
    - {{ name: lab-results, listener: hl7-tls, message_types: [ "ORU^R01" ], sending_facilities: [ NORTH_LAB ], client_certs: [ {CLIENT_CN} ], pool: lab, ack_timeout_ms: 5000 }}
    - {{ name: adt-other-engine, listener: hl7-tls, message_types: [ "ADT^A01" ], sending_facilities: [ NORTH_LAB ], client_certs: [ adt-interface-engine ], pool: lab, ack_timeout_ms: 5000 }}
"#,
        audit = audit.display(),
        backend = responder.addr,
        cert = pki.path("server.crt"),
        key = pki.path("server.key"),
        ca = pki.path("ca.crt"),
    );
    let gw = Gateway::start(&yaml, admin);
    let limit = Duration::from_secs(30);

    // The CA's client certificate: the ORU's route admits its CN (the backend's AA comes back),
    // the ADT's route does not (the gateway's AR), on the same connection, in order.
    let s = s_client(
        &pki,
        mllp,
        Some("client"),
        &[ORU_ALLOWED, ADT_REFUSED],
        limit,
    );
    assert_eq!(
        s.acks.len(),
        2,
        "an acknowledgement per message; {}\ngateway log:\n{}",
        s.describe(),
        gw.proc.log()
    );
    assert_eq!(
        msa(&s.acks[0]),
        ("AA".to_string(), "tls-1".to_string()),
        "the admitted ORU: {}",
        s.describe()
    );
    assert_eq!(
        msa(&s.acks[1]),
        ("AR".to_string(), "tls-2".to_string()),
        "the ADT whose route admits another CN: {}",
        s.describe()
    );
    assert!(
        s.acks[1]
            .split('\r')
            .any(|seg| seg.starts_with("ERR|") && seg.contains("client certificate")),
        "the gateway's AR says why (ERR: the client certificate is not admitted): {:?}",
        s.acks[1]
    );

    // No client certificate: refused at the handshake, no acknowledgement, nothing forwarded.
    let s = s_client(&pki, mllp, None, &[ORU_NO_CERT], limit);
    assert!(
        !String::from_utf8_lossy(&s.stdout).contains("MSA|AA"),
        "a client without a certificate got an AA: {}",
        s.describe()
    );
    assert!(
        s.acks.is_empty(),
        "no acknowledgement without a client certificate: {}",
        s.describe()
    );
    assert!(
        s.closed && !s.timed_out,
        "the connection without a client certificate must be closed: {}",
        s.describe()
    );

    // A certificate with the admitted CN from another CA: refused at the handshake too.
    let s = s_client(&pki, mllp, Some("rogue-client"), &[ORU_ROGUE], limit);
    assert!(
        !String::from_utf8_lossy(&s.stdout).contains("MSA|AA") && s.acks.is_empty(),
        "a client certificate of an untrusted CA got an answer: {}",
        s.describe()
    );
    assert!(
        s.closed && !s.timed_out,
        "the connection with an untrusted client certificate must be closed: {}",
        s.describe()
    );

    // Only the admitted message reached the backend.
    assert_eq!(
        responder.control_ids(),
        vec!["tls-1".to_string()],
        "what the responder received"
    );

    // The audit trail: the admitted message's access record (written before forwarding) names
    // the client certificate's subject; the refused one has a denied record.
    let of = |records: &[Value], control_id: &str, phase: &str| -> Option<Value> {
        records
            .iter()
            .find(|r| r["hl7"]["control_id"] == control_id && r["phase"] == phase)
            .cloned()
    };
    wait_until(
        "the audit records of tls-1 (access) and tls-2 (denied)",
        Duration::from_secs(10),
        || {
            let rs = audit_records(&audit);
            of(&rs, "tls-1", "access").is_some() && of(&rs, "tls-2", "denied").is_some()
        },
    );
    let records = audit_records(&audit);
    let access = of(&records, "tls-1", "access").unwrap();
    let subject = access["actor"]["client_certificate_subject"]
        .as_str()
        .unwrap_or_else(|| panic!("actor.client_certificate_subject in {access}"));
    assert!(
        subject.contains(&format!("CN={CLIENT_CN}")),
        "the access record names the client certificate subject: {access}"
    );
    assert_eq!(access["action"]["method"], "MLLP", "{access}");
    assert_eq!(access["action"]["route"], "lab-results", "{access}");
    assert_eq!(access["action"]["listener"], "hl7-tls", "{access}");
    assert_eq!(access["actor"]["system"], "LIS@NORTH_LAB", "{access}");
    assert!(
        access["hl7"]["patient_identifiers"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|p| p["id"] == "12345")),
        "PID-3 in {access}"
    );
    let denied = of(&records, "tls-2", "denied").unwrap();
    assert_eq!(denied["action"]["route"], "adt-other-engine", "{denied}");
    assert_eq!(denied["hl7"]["ack_code"], "AR", "{denied}");
    assert!(
        denied["actor"]["client_certificate_subject"]
            .as_str()
            .is_some_and(|s| s.contains(&format!("CN={CLIENT_CN}"))),
        "{denied}"
    );
    // Nothing was audited for the connections refused at the handshake.
    assert!(
        !records
            .iter()
            .any(|r| r["hl7"]["control_id"] == "tls-3" || r["hl7"]["control_id"] == "tls-4"),
        "no record for a message refused at the handshake"
    );
}
