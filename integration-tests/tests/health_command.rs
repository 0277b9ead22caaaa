//! `caregate health`: the probe the Dockerfile HEALTHCHECK and the Kubernetes exec probes run,
//! against a real gateway's admin listener on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn health(args: &[&str]) -> Output {
    Command::new(caregate_bin())
        .arg("health")
        .args(args)
        .output()
        .expect("run caregate health")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn config(public: u16, admin_listen: &str, drain: u64) -> String {
    format!(
        r#"
server: {{ threads: 1, drain_delay_seconds: {drain}, grace_period_seconds: 1, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "{admin_listen}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools: [ {{ name: app, zones: [ {{ name: a, backends: [ {{ address: "127.0.0.1:1" }} ] }} ] }} ]
routes: [ {{ name: app, listener: public, path_prefix: /, pool: app }} ]
"#
    )
}

#[test]
fn health_and_ready_exit_0_on_a_running_gateway_and_1_while_it_drains() {
    let (public, admin) = (free_port(), free_port());
    let mut gw = Gateway::start(&config(public, &format!("127.0.0.1:{admin}"), 5), admin);
    let target = format!("127.0.0.1:{admin}");

    let o = health(&["--admin", &target]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(o.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("/healthz: 200"),
        "{o:?}"
    );
    let o = health(&["--admin", &target, "--ready"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");

    // The address from the config file's admin.listen.
    let cfg = gw.config_path.to_str().unwrap().to_string();
    let o = health(&["-c", &cfg, "--ready"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");

    // SIGTERM: /readyz answers 503 for drain_delay_seconds while the process still lives, so
    // the readiness probe fails (and takes the pod out of the endpoints) and liveness passes.
    let st = Command::new("kill")
        .args(["-TERM", &gw.proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(4);
    let not_ready = loop {
        let o = health(&["--admin", &target, "--ready"]);
        if o.status.code() == Some(1) || Instant::now() > deadline {
            break o;
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    assert_eq!(not_ready.status.code(), Some(1), "{not_ready:?}");
    let why = stderr(&not_ready);
    assert!(why.contains("/readyz: 503"), "{why}");
    assert!(why.contains("draining"), "{why}");
    assert_eq!(why.trim_end().lines().count(), 1, "one line: {why}");
    let o = health(&["--admin", &target]);
    assert_eq!(o.status.code(), Some(0), "alive while draining: {o:?}");

    let st = gw.proc.exit_within(Duration::from_secs(20));
    assert!(st.success(), "{st:?}");
    let o = health(&["--admin", &target]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
}

#[test]
fn an_unspecified_admin_address_is_probed_on_loopback() {
    let (public, admin) = (free_port(), free_port());
    let gw = Gateway::start(&config(public, &format!("0.0.0.0:{admin}"), 0), admin);
    let cfg = gw.config_path.to_str().unwrap().to_string();
    let o = health(&["-c", &cfg]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("http://127.0.0.1:{admin}/healthz")),
        "{o:?}"
    );
}

#[test]
fn nothing_listening_a_silent_peer_or_a_bad_config_exits_1_with_one_line() {
    // Nothing listens: a port taken from a listener that is closed again.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for args in [
        vec!["--admin".to_string(), format!("127.0.0.1:{port}")],
        vec![
            "--admin".to_string(),
            format!("127.0.0.1:{port}"),
            "--ready".into(),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = health(&args);
        assert_eq!(o.status.code(), Some(1), "{o:?}");
        let why = stderr(&o);
        assert!(why.starts_with("caregate health: "), "{why}");
        assert!(why.contains("cannot connect"), "{why}");
        assert_eq!(why.trim_end().lines().count(), 1, "{why}");
    }

    // A peer that accepts and never answers: the probe gives up after its 2 s.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let at = silent.local_addr().unwrap().to_string();
    let started = Instant::now();
    let o = health(&["--admin", &at]);
    let took = started.elapsed();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr(&o).contains("within 2 s"), "{o:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    drop(silent);

    // A config file that cannot be read, and one whose admin listener has TLS.
    let dir = TempDir::new("health");
    let o = health(&["-c", dir.0.join("missing.yaml").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr(&o).contains("cannot read"), "{o:?}");
    let tls = dir.0.join("tls.yaml");
    std::fs::write(
        &tls,
        "admin: { listen: \"127.0.0.1:9\", tls: { cert: a.crt, key: a.key } }\nlisteners: []\n",
    )
    .unwrap();
    let o = health(&["-c", tls.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr(&o).contains("admin.tls is set"), "{o:?}");
}

/// The config of deploy/kubernetes/configmap.yaml, as the pod reads it: `caregate check` passes
/// with its mounted files in place, and `health -c` finds its admin listener (on the pod
/// address) on loopback.
#[test]
fn the_kubernetes_configmap_config_passes_check() {
    let manifest = std::fs::read_to_string(repo_root().join("deploy/kubernetes/configmap.yaml"))
        .expect("deploy/kubernetes/configmap.yaml");
    let mut lines = manifest.lines().skip_while(|l| *l != "  caregate.yaml: |");
    assert!(lines.next().is_some(), "no `caregate.yaml: |` block");
    let config: String = lines
        .take_while(|l| l.trim().is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    assert!(config.contains("admin:"), "{config}");

    // The pod's mounts: /etc/caregate/tls (the three TLS Secrets) and /etc/caregate/secrets.
    let pki = Pki::new();
    let dir = TempDir::new("k8s-config");
    let tls = dir.0.join("tls");
    let secrets = dir.0.join("secrets");
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::create_dir_all(&secrets).unwrap();
    pki.write_example_tls(&tls);
    std::fs::write(
        secrets.join("audit-key"),
        "an-audit-key-of-at-least-32-bytes-for-the-test\n",
    )
    .unwrap();
    std::fs::write(secrets.join("admin-token"), "an-admin-token\n").unwrap();
    std::fs::write(secrets.join("ratelimit-key"), "a-rate-limit-hash-key\n").unwrap();
    std::fs::write(secrets.join("redis-password"), "a-redis-password\n").unwrap();
    let config = config
        .replace("/etc/caregate/tls/", &format!("{}/", tls.display()))
        .replace("/etc/caregate/secrets/", &format!("{}/", secrets.display()));
    assert!(!config.contains("/etc/caregate/"), "{config}");
    let path = dir.0.join("caregate.yaml");
    std::fs::write(&path, &config).unwrap();

    let o = Command::new(caregate_bin())
        .args(["check", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "caregate check: {o:?}");

    // Nothing listens on the pod's admin port here: the probe names 127.0.0.1:9901.
    let o = health(&["-c", path.to_str().unwrap()]);
    if o.status.code() == Some(1) {
        assert!(
            stderr(&o).contains("http://127.0.0.1:9901/healthz"),
            "{o:?}"
        );
    }
}
