//! The `consent-gateway` binary end to end: the example config, a backend, real sockets on
//! loopback ports, HS256 tokens; readiness and changes are waited for by polling, never by fixed
//! sleeps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The binary under test, built by Cargo for this test.
const BIN: &str = env!("CARGO_BIN_EXE_consent-gateway");
const HS_SECRET: &str = "consent-example-hs-secret-0123456789";
const AUDIT_KEY: &str = "consent-example-audit-key-0123456789abcdef";

/// The example's own files.
fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(file)
}

/// A temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "consent-e2e-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Poll `f` until it is true; panic with `what` after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A FHIR backend: answers `/healthz` and, for anything else, an empty search Bundle; counts
/// the requests that reached it (health checks aside).
struct Backend {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
}

impl Backend {
    fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let counter = counter.clone();
                std::thread::spawn(move || serve(conn, &counter));
            }
        });
        Backend { addr, seen }
    }

    fn count(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
}

fn serve(conn: TcpStream, seen: &AtomicUsize) {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
            break;
        }
    }
    let body = if target == "/healthz" {
        "ok".to_string()
    } else {
        seen.fetch_add(1, Ordering::SeqCst);
        r#"{"resourceType":"Bundle","type":"searchset","total":0}"#.to_string()
    };
    let mut conn = reader.into_inner();
    let _ = write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A response: status and body.
struct Response {
    status: u16,
    body: String,
}

fn get(to: SocketAddr, target: &str, token: Option<&str>) -> std::io::Result<Response> {
    let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        conn,
        "GET {target} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    conn.read_to_string(&mut raw)?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok(Response { status, body })
}

/// A staff token from the example's issuer, for `tenant`.
fn token(subject: &str, tenant: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": "https://sso.example-hospital.org/realms/staff",
        "aud": "caregate",
        "sub": subject,
        "tenant": tenant,
        "scope": "user/*.rs",
        "iat": now,
        "exp": now + 600,
    });
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(HS_SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// `BIN check -c config`: whether it passed, and what it printed.
fn check(bin: &str, config: &Path) -> (bool, String) {
    let out = Command::new(bin)
        .args(["check", "-c", config.to_str().unwrap()])
        .env("CAREGATE_AUDIT_KEY", AUDIT_KEY)
        .env("STAFF_IDP_HS_SECRET", HS_SECRET)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The example config with `edit` applied, and the example's opt-outs file, in `dir`.
fn example_config(dir: &TempDir, edit: impl Fn(String) -> String) -> PathBuf {
    let text = std::fs::read_to_string(example("consent.yaml")).unwrap();
    std::fs::copy(example("opt-outs.csv"), dir.0.join("opt-outs.csv")).unwrap();
    let path = dir.0.join("consent.yaml");
    std::fs::write(&path, edit(text)).unwrap();
    path
}

/// Replace `from` (which must be there) by `to`.
fn replace(text: String, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the example config lost `{from}`");
    text.replace(from, to)
}

/// A running `consent-gateway run`, killed on drop.
struct Gateway {
    child: Child,
    log: PathBuf,
}

impl Gateway {
    fn start(config: &Path, admin: SocketAddr, public: SocketAddr) -> Gateway {
        let log = config.with_extension("log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(["run", "-c", config.to_str().unwrap()])
            .env("CAREGATE_AUDIT_KEY", AUDIT_KEY)
            .env("STAFF_IDP_HS_SECRET", HS_SECRET)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut gw = Gateway { child, log };
        // Ready when /readyz says so (the backend's health is known) and the public listener
        // accepts.
        wait_until("the gateway to be ready", Duration::from_secs(60), || {
            if let Ok(Some(status)) = gw.child.try_wait() {
                panic!("the gateway exited ({status}):\n{}", gw.log());
            }
            get(admin, "/readyz", None).is_ok_and(|r| r.status == 200)
                && TcpStream::connect_timeout(&public, Duration::from_millis(200)).is_ok()
        });
        gw
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn consent_is_enforced_and_follows_the_opt_outs_file() {
    let dir = TempDir::new("run");
    let backend = Backend::start();
    let public = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = example_config(&dir, |text| {
        let text = replace(text, "127.0.0.1:8080", &public.to_string());
        let text = replace(text, "127.0.0.1:9901", &admin.to_string());
        replace(text, "127.0.0.1:8100", &backend.addr.to_string())
    });
    let gw = Gateway::start(&config, admin, public);
    let hospital_a = token("dr-a", "hospital-a");
    let hospital_b = token("dr-b", "hospital-b");
    let status = |target: &str, token: &str| get(public, target, Some(token)).unwrap().status;

    // example-patient-1 opted out for hospital-b: refused, and nothing reached the backend.
    let r = get(
        public,
        "/fhir/Observation?patient=example-patient-1",
        Some(&hospital_b),
    )
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("consent_refused"), "{}", r.body);
    assert!(
        !r.body.contains("example-patient"),
        "no patient id: {}",
        r.body
    );
    assert_eq!(backend.count(), 0);
    // The same patient for hospital-a, and another patient for hospital-b: served.
    assert_eq!(
        status("/fhir/Observation?patient=example-patient-1", &hospital_a),
        200
    );
    assert_eq!(status("/fhir/Patient/example-patient-3", &hospital_b), 200);
    assert_eq!(backend.count(), 2);
    // example-patient-2 opted out for every organisation.
    assert_eq!(status("/fhir/Patient/example-patient-2", &hospital_a), 403);

    // A new list (written aside and renamed into place, as an editor or a sync job should):
    // example-patient-3 opts out for hospital-b, example-patient-1 opts back in.
    let opt_outs = dir.0.join("opt-outs.csv");
    let next = dir.0.join("opt-outs.csv.next");
    std::fs::write(&next, "example-patient-3,hospital-b\n").unwrap();
    std::fs::rename(&next, &opt_outs).unwrap();
    wait_until(
        "the new opt-outs to take effect",
        Duration::from_secs(20),
        || status("/fhir/Patient/example-patient-3", &hospital_b) == 403,
    );
    assert_eq!(
        status("/fhir/Observation?patient=example-patient-1", &hospital_b),
        200
    );

    // The file goes away: the last good list stays in force, and the log says so without
    // naming a patient.
    std::fs::remove_file(&opt_outs).unwrap();
    wait_until(
        "the failed reload to be logged",
        Duration::from_secs(20),
        || gw.log().contains("keeping the last good list"),
    );
    assert_eq!(status("/fhir/Patient/example-patient-3", &hospital_b), 403);
    assert!(!gw.log().contains("example-patient"), "{}", gw.log());

    // Counted like a built-in filter's decisions.
    let metrics = get(admin, "/metrics", None).unwrap().body;
    assert!(
        metrics.contains(
            r#"caregate_filter_decisions_total{filter="consent",reason="consent_refused",result="deny"}"#
        ),
        "{metrics}"
    );
}

#[test]
fn check_holds_the_consent_kind_to_its_config_and_declaration() {
    // The shipped example, as shipped.
    let (ok, out) = check(BIN, &example("consent.yaml"));
    assert!(ok, "{out}");

    let bad = |edit: &dyn Fn(String) -> String| {
        let dir = TempDir::new("check");
        let (ok, out) = check(BIN, &example_config(&dir, edit));
        assert!(!ok, "{out}");
        out
    };
    let out = bad(&|t| replace(t, "mode: enforce", "mode: enforce\n          colour: blue"));
    assert!(
        out.contains("routes[0].filters[2] (consent): config.colour: unknown field `colour`"),
        "{out}"
    );
    let out = bad(&|t| replace(t, "opt_outs: opt-outs.csv", "opt_outs: missing.csv"));
    assert!(
        out.contains("routes[0].filters[2] (consent): config.opt_outs: cannot read "),
        "{out}"
    );
    // Confining: never in shadow on a route that carries PHI.
    let out = bad(&|t| replace(t, "mode: enforce", "mode: shadow"));
    assert!(
        out.contains(
            "routes[0].filters[2] (consent): mode shadow is not allowed on a route that carries PHI"
        ),
        "{out}"
    );
    // Its declaration follows its config: the organisation from the verified tenant needs the
    // `tenant` filter before it.
    let out = bad(&|t| replace(t, "organisation: tenant_claim", "organisation: tenant"));
    assert!(
        out.contains(
            "routes[0] (fhir): `consent` (routes[0].filters[2]) needs the verified tenant that \
             `tenant` provides, and the chain has no `tenant`"
        ),
        "{out}"
    );
}

#[test]
fn the_stock_caregate_does_not_know_the_consent_kind() {
    // The stock program, in process: exactly what `caregate check` runs.
    let stock = caregate::App::builder().build().unwrap();
    let text = std::fs::read_to_string(example("consent.yaml")).unwrap();
    let text = replace(text, "${CAREGATE_AUDIT_KEY}", AUDIT_KEY);
    let text = replace(text, "${STAFF_IDP_HS_SECRET}", HS_SECRET);
    let err = caregate::config::load_str_with(&text, example(""), stock.registry())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("routes[0].filters[2] (consent): kind: unknown filter kind `consent`"),
        "{err}"
    );
    // And the stock binary, when it was built next to this one (`cargo build -p caregate`).
    let caregate = Path::new(BIN).with_file_name("caregate");
    if caregate.exists() {
        let (ok, out) = check(caregate.to_str().unwrap(), &example("consent.yaml"));
        assert!(!ok);
        assert!(out.contains("unknown filter kind `consent`"), "{out}");
    }
}

#[test]
fn the_custom_binary_has_caregates_command_line() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Usage: consent-gateway <COMMAND>"), "{help}");
    for command in ["run", "check", "demo", "audit", "sandbox"] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "{command}: {help}"
        );
    }
}
