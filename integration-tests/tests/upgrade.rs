//! A binary upgrade (`run --upgrade`, then SIGQUIT to the old process) under load on a PHI route
//! with the durable audit trail: no HTTP/1.1 request fails, and `audit verify` passes across the
//! segments the two processes wrote, with an access record for every answered request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

const KEY: &str = "integration-upgrade-key-0123456789abcdef01";

fn config(admin: u16, public: u16, backend: &EchoServer, dir: &Path) -> String {
    format!(
        r#"
server: {{ threads: 2, grace_period_seconds: 10, graceful_shutdown_timeout_seconds: 1, drain_delay_seconds: 0, upgrade_sock: "{sock}", pid_file: "{pid}" }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
audit: {{ path: "{audit}", hmac_key: "{KEY}", checkpoint_interval_ms: 100 }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools: [ {{ name: fhir, zones: [ {{ name: zone-a, backends: [ {{ address: "{b}" }} ] }} ] }} ]
routes: [ {{ name: fhir, listener: public, path_prefix: /fhir, fhir: true, phi: true, pool: fhir }} ]
"#,
        sock = dir.join("upgrade.sock").display(),
        pid = dir.join("caregate.pid").display(),
        audit = dir.join("audit.jsonl").display(),
        b = backend.addr
    )
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Access records in every file of the trail directory.
fn access_records(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("audit.jsonl") || name.ends_with(".anchor") {
            continue;
        }
        n += std::fs::read_to_string(&p)
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"phase\":\"access\""))
            .count();
    }
    n
}

#[test]
fn an_upgrade_under_load_loses_no_request_and_keeps_the_audit_chain_whole() {
    let backend = EchoServer::start("fhir");
    let trail = TempDir::new("upgrade-trail");
    let (public, admin) = (free_port(), free_port());
    let yaml = config(admin, public, &backend, &trail.0);
    let mut old = Gateway::start(&yaml, admin);
    let pid_file = trail.0.join("caregate.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        old.proc.pid().to_string()
    );
    let load = Load::start(addr(public), "/fhir/Patient/p1");
    wait_until("the load runs", Duration::from_secs(10), || {
        load.ok.load(Ordering::SeqCst) > 20
    });

    // The new process waits on the upgrade socket; then the old one is told to hand over.
    let config_path = old.config_path.to_str().unwrap().to_string();
    let mut new = Proc::spawn(&["run", "-c", &config_path, "--upgrade"], "gw-new");
    let sock = trail.0.join("upgrade.sock");
    wait_until(
        "the new process waits for the sockets",
        Duration::from_secs(10),
        || sock.exists(),
    );
    signal(old.proc.pid(), "-QUIT");
    let st = old.proc.exit_within(Duration::from_secs(30));
    assert!(st.success(), "old process: {st}\n{}", old.proc.log());
    // The new process answers (readiness over the admin socket it took over) and owns the pid file.
    wait_until("the new process is ready", Duration::from_secs(20), || {
        try_request(addr(admin), "GET", "/readyz", &[], b"")
            .map(|r| r.status == 200)
            .unwrap_or(false)
    });
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        new.pid().to_string()
    );
    let served_before = load.ok.load(Ordering::SeqCst);
    wait_until(
        "the new process serves the load",
        Duration::from_secs(10),
        || load.ok.load(Ordering::SeqCst) > served_before + 20,
    );
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}\nold log:\n{}\nnew log:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        old.proc.log(),
        new.log()
    );

    signal(new.pid(), "-TERM");
    let st = new.exit_within(Duration::from_secs(30));
    assert!(st.success(), "new process: {st}\n{}", new.log());
    assert!(!pid_file.exists(), "the last process removes its pid file");
    assert!(
        !old.proc.log().contains("interrupted write"),
        "{}",
        old.proc.log()
    );
    assert!(!new.log().contains("interrupted write"), "{}", new.log());

    // Every answered request has its access record, once, and the chain verifies whole.
    assert_eq!(access_records(&trail.0), ok);
    let (code, text) = audit_verify(&trail.0.join("audit.jsonl"), KEY);
    assert_eq!(code, Some(0), "{text}");
}
