//! Start whole or not at all, and signals: a taken port is a fatal start-up error, SIGHUP
//! reloads and never stops the gateway, `--daemon` is refused with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

fn config(public: u16, admin: u16, backend: std::net::SocketAddr) -> String {
    format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools: [ {{ name: app, zones: [ {{ name: a, backends: [ {{ address: "{backend}" }} ] }} ] }} ]
routes: [ {{ name: app, listener: public, path_prefix: /app, pool: app }} ]
"#
    )
}

#[test]
fn a_taken_port_makes_run_exit_non_zero_within_seconds() {
    let backend = EchoServer::start("app");
    for taken_is_admin in [false, true] {
        let holder = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = holder.local_addr().unwrap().port();
        let other = free_port();
        let (public, admin) = if taken_is_admin {
            (other, taken)
        } else {
            (taken, other)
        };
        let dir = TempDir::new("taken");
        let cfg = dir.0.join("caregate.yaml");
        std::fs::write(&cfg, config(public, admin, backend.addr)).unwrap();
        let started = Instant::now();
        let mut p = Proc::spawn(&["run", "-c", cfg.to_str().unwrap()], "taken-port");
        let st = p.exit_within(Duration::from_secs(10));
        assert!(!st.success(), "exit status {st}");
        let log = p.log();
        let who = if taken_is_admin {
            "admin.listen"
        } else {
            "listeners[0] (public)"
        };
        assert!(
            log.contains(&format!(
                "cannot start: {who}: cannot listen on 127.0.0.1:{taken}"
            )),
            "{log}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        // Nothing was left listening on the port that was free.
        assert!(std::net::TcpStream::connect(addr(other)).is_err());
        drop(holder);
    }
}

#[test]
fn sighup_reloads_and_leaves_the_gateway_serving() {
    let backend = EchoServer::start("app");
    let (public, admin) = (free_port(), free_port());
    let gw = Gateway::start(&config(public, admin, backend.addr), admin);
    // One signal at a time: two SIGHUPs sent before the first is handled are one pending
    // signal to the kernel, so the second waits until the first reload is counted.
    for n in 1..=2 {
        let st = Command::new("kill")
            .args(["-HUP", &gw.proc.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        wait_until("the SIGHUP counted", Duration::from_secs(10), || {
            gw.metrics().lines().any(|l| {
                l.starts_with("caregate_config_reloads_total{")
                    && l.contains("outcome=\"applied\"")
                    && l.contains("trigger=\"signal\"")
                    && l.ends_with(&format!(" {n}"))
            })
        });
    }
    let r = get(addr(public), "/app/after-hup");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(backend.count(), 1);
    assert!(
        gw.proc
            .log()
            .contains("config reloaded (signal): generation 3"),
        "{}",
        gw.proc.log()
    );
    let r = request(gw.admin, "GET", "/readyz", &[], b"");
    assert_eq!(r.status, 200);
}

#[test]
fn daemon_is_refused_with_the_reason() {
    let backend = EchoServer::start("app");
    let (public, admin) = (free_port(), free_port());
    let dir = TempDir::new("daemon");
    let cfg = dir.0.join("caregate.yaml");
    std::fs::write(&cfg, config(public, admin, backend.addr)).unwrap();
    let out = Command::new(caregate_bin())
        .args(["run", "--daemon", "-c", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--daemon is not supported"), "{err}");
    assert!(err.contains("systemd"), "{err}");
    assert!(std::net::TcpStream::connect(addr(admin)).is_err());
}
