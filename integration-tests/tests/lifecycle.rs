//! Hot reload under load, refused reloads, and the drain on SIGTERM, against the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A config with `routes` (YAML flow items) over pools `a` (backend A in zone z1) and `ab`
/// (zones in the order given).
fn config(public: u16, admin: u16, a: SocketAddr, zones: &str, routes: &str) -> String {
    format!(
        r#"
server: {{ threads: 2, grace_period_seconds: 10, graceful_shutdown_timeout_seconds: 1, drain_delay_seconds: 2 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools:
  - {{ name: a, zones: [ {{ name: z1, backends: [ {{ address: "{a}" }} ] }} ], health_check: {{ interval_ms: 200 }} }}
  - {{ name: ab, zones: [ {zones} ], health_check: {{ interval_ms: 200 }} }}
routes: [ {routes} ]
"#
    )
}

fn zones(first: SocketAddr, second: SocketAddr) -> String {
    format!(
        r#"{{ name: primary, backends: [ {{ address: "{first}" }} ] }}, {{ name: secondary, backends: [ {{ address: "{second}" }} ] }}"#
    )
}

fn reload_via_admin(gw: &Gateway) -> Response {
    request(gw.admin, "POST", "/reload", &[], b"")
}

fn sighup(gw: &Gateway) {
    let st = Command::new("kill")
        .args(["-HUP", &gw.proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

fn generation(gw: &Gateway) -> u64 {
    request(gw.admin, "GET", "/config", &[], b"").json()["generation"]
        .as_u64()
        .unwrap()
}

fn backend_of(r: &Response) -> String {
    r.json()["backend"].as_str().unwrap_or_default().to_string()
}

#[test]
fn twenty_reloads_under_load_lose_no_request() {
    let (a, b, c) = (
        EchoServer::start("A"),
        EchoServer::start("B"),
        EchoServer::start("C"),
    );
    let (public, admin) = (free_port(), free_port());
    let base = r#"{ name: steady, listener: public, path_prefix: /steady, pool: a }"#;
    let gw = Gateway::start(
        &config(public, admin, a.addr, &zones(a.addr, b.addr), base),
        admin,
    );
    let load = Load::start(addr(public), "/steady/x");
    let mut expected_generation = 1;
    for i in 0..20u32 {
        // Add, change and remove routes and move pool `ab` between zones, in turn.
        let routes = match i % 4 {
            0 => format!(
                "{base}, {{ name: extra, listener: public, path_prefix: /extra, pool: ab }}"
            ),
            1 => format!(
                "{base}, {{ name: extra, listener: public, path_prefix: /extra2, pool: ab }}"
            ),
            2 => {
                format!("{base}, {{ name: other, listener: public, path_prefix: /other, pool: a }}")
            }
            _ => base.to_string(),
        };
        let zone_order = match i % 4 {
            0 => zones(a.addr, b.addr),
            // A backend added to the secondary zone, then removed again.
            2 => format!(
                r#"{{ name: primary, backends: [ {{ address: "{}" }} ] }}, {{ name: secondary, backends: [ {{ address: "{}" }}, {{ address: "{}" }} ] }}"#,
                a.addr, b.addr, c.addr
            ),
            _ => zones(b.addr, a.addr),
        };
        std::fs::write(
            &gw.config_path,
            config(public, admin, a.addr, &zone_order, &routes),
        )
        .unwrap();
        expected_generation += 1;
        if i % 2 == 0 {
            let r = reload_via_admin(&gw);
            assert_eq!(r.status, 200, "{}", r.text());
        } else {
            sighup(&gw);
            wait_until("the SIGHUP reload", Duration::from_secs(15), || {
                generation(&gw) == expected_generation
            });
        }
        assert_eq!(generation(&gw), expected_generation);
        let p = addr(public);
        match i % 4 {
            0 => {
                // Pool `ab` now prefers zone primary = A.
                let r = get(p, "/extra/y");
                assert_eq!(
                    (r.status, backend_of(&r)),
                    (200, "A".into()),
                    "{}",
                    r.text()
                );
            }
            1 => {
                // The route moved; the backend moved to the other zone: B serves first.
                assert_eq!(get(p, "/extra/y").status, 404);
                let r = get(p, "/extra2/y");
                assert_eq!(
                    (r.status, backend_of(&r)),
                    (200, "B".into()),
                    "{}",
                    r.text()
                );
            }
            2 => {
                assert_eq!(get(p, "/extra2/y").status, 404);
                assert_eq!(get(p, "/other/y").status, 200);
            }
            _ => {
                assert_eq!(get(p, "/other/y").status, 404);
                // The removed backend's health series goes with it.
                let gone = format!("backend=\"{}\"", c.addr);
                wait_until(
                    "the removed backend's series",
                    Duration::from_secs(10),
                    || !gw.metrics().contains(&gone),
                );
            }
        }
    }
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failures: {failures:?}",
        failures.len()
    );
    assert!(ok > 100, "only {ok} requests under load");
    let m = gw.metrics();
    assert!(
        m.contains("caregate_config_generation 21"),
        "{}",
        m.lines()
            .filter(|l| l.contains("config"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_bad_file_or_a_fixed_setting_changes_nothing() {
    let (a, b) = (EchoServer::start("A"), EchoServer::start("B"));
    let (public, admin) = (free_port(), free_port());
    let routes = r#"{ name: steady, listener: public, path_prefix: /steady, pool: a }"#;
    let good = config(public, admin, a.addr, &zones(a.addr, b.addr), routes);
    let gw = Gateway::start(&good, admin);
    let hash = request(gw.admin, "GET", "/config", &[], b"").json()["sha256"]
        .as_str()
        .unwrap()
        .to_string();

    // A file that does not parse, one that fails validation, one that changes a listener.
    let bad_yaml = format!("{good}\nnot_a_section: [");
    let bad_ref = good.replace("pool: a }", "pool: nowhere }");
    let moved = good.replace(
        &format!("127.0.0.1:{public}"),
        &format!("127.0.0.1:{}", free_port()),
    );
    for (bad, says) in [
        (bad_yaml, "rejected"),
        (bad_ref, "nowhere"),
        (moved, "listeners[0] (public)"),
    ] {
        std::fs::write(&gw.config_path, &bad).unwrap();
        let r = reload_via_admin(&gw);
        assert_eq!(r.status, 422, "{}", r.text());
        assert!(r.text().contains(says), "{}", r.text());
        assert!(r.text().contains("keeps serving"), "{}", r.text());
        assert_eq!(get(addr(public), "/steady/x").status, 200);
        assert_eq!(generation(&gw), 1);
    }
    let now = request(gw.admin, "GET", "/config", &[], b"").json()["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(now, hash);
    let m = gw.metrics();
    assert!(
        m.lines()
            .any(|l| l.starts_with("caregate_config_reloads_total{")
                && l.contains("outcome=\"rejected\"")
                && l.ends_with(" 3")),
        "{m}"
    );

    // A good file again applies; rollback returns to the previous one.
    let with_extra = good.replace(
        routes,
        &format!("{routes}, {{ name: extra, listener: public, path_prefix: /extra, pool: a }}"),
    );
    std::fs::write(&gw.config_path, &with_extra).unwrap();
    assert_eq!(reload_via_admin(&gw).status, 200);
    assert_eq!(get(addr(public), "/extra/x").status, 200);
    let r = request(gw.admin, "POST", "/reload/rollback", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(addr(public), "/extra/x").status, 404);
    let back = request(gw.admin, "GET", "/config", &[], b"").json()["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(back, hash);
    // Reload is an admin action: without the token (when one is set) it is refused; here the
    // admin listener has none, and GET is not a reload.
    assert_eq!(request(gw.admin, "GET", "/reload", &[], b"").status, 405);
}

#[test]
fn sigterm_fails_readiness_before_the_listeners_close() {
    let (a, b) = (EchoServer::start("A"), EchoServer::start("B"));
    let (public, admin) = (free_port(), free_port());
    let routes = r#"{ name: steady, listener: public, path_prefix: /steady, pool: a }"#;
    let mut gw = Gateway::start(
        &config(public, admin, a.addr, &zones(a.addr, b.addr), routes),
        admin,
    );
    let load = Load::start(addr(public), "/steady/x");
    wait_until("the load runs", Duration::from_secs(10), || {
        load.ok.load(Ordering::SeqCst) > 10
    });
    let st = Command::new("kill")
        .args(["-TERM", &gw.proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let sent = Instant::now();
    wait_until("readiness fails", Duration::from_secs(5), || {
        try_request(gw.admin, "GET", "/readyz", &[], b"")
            .map(|r| r.status == 503 && r.text().contains("draining"))
            .unwrap_or(false)
    });
    let not_ready_at = sent.elapsed();
    // Inside the delay (2 s) the listener still accepts and serves new connections.
    let r = get(addr(public), "/steady/during-drain");
    assert_eq!(r.status, 200);
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "the check came too late to mean anything"
    );
    // Then the listener closes and the process exits by itself, well before the grace period.
    wait_until("the listener closes", Duration::from_secs(10), || {
        TcpStream::connect(addr(public)).is_err()
    });
    let closed_at = sent.elapsed();
    assert!(
        closed_at >= Duration::from_secs(2),
        "closed after {closed_at:?}"
    );
    assert!(not_ready_at < closed_at);
    let (ok, failures) = load.finish_timed();
    // Requests refused or reset once the listener closes are expected (nothing listens, and
    // connections still in its accept queue are reset); none may fail inside the delay.
    let inside: Vec<_> = failures
        .iter()
        .filter(|(at, _)| *at < sent + Duration::from_millis(1900))
        .collect();
    assert!(inside.is_empty(), "{inside:?}");
    assert!(ok > 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = gw.proc.child.try_wait().unwrap() {
            assert!(st.success(), "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "{}", gw.proc.log());
        std::thread::sleep(Duration::from_millis(25));
    }
    let log = gw.proc.log();
    assert!(log.contains("SIGTERM received: draining"), "{log}");
    assert!(log.contains("drained: no request in flight"), "{log}");
    gw.proc.kill();
}

/// The serial number of the certificate a TLS listener serves to a new connection.
fn served_serial(port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername localhost </dev/null 2>/dev/null | openssl x509 -noout -serial"
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_renewed_certificate_is_served_after_reload() {
    let pki = Pki::new();
    let a = EchoServer::start("A");
    let (public, admin) = (free_port(), free_port());
    let dir = TempDir::new("tls-reload");
    let (cert, key) = (dir.0.join("public.crt"), dir.0.join("public.key"));
    std::fs::copy(pki.path("server.crt"), &cert).unwrap();
    std::fs::copy(pki.path("server.key"), &key).unwrap();
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}", tls: {{ cert: "{cert}", key: "{key}" }} }} ]
pools: [ {{ name: a, zones: [ {{ name: z1, backends: [ {{ address: "{a}" }} ] }} ] }} ]
routes: [ {{ name: steady, listener: public, path_prefix: /steady, pool: a }} ]
"#,
        cert = cert.display(),
        key = key.display(),
        a = a.addr
    );
    let gw = Gateway::start(&yaml, admin);
    let before = served_serial(public);
    assert!(before.starts_with("serial="), "{before:?}");

    // Renew: a new certificate for the same name from the same CA, written over the old file.
    let renewed = Command::new("openssl")
        .args([
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "renewed.crt",
        ])
        .current_dir(&pki.dir.0)
        .output()
        .unwrap();
    assert!(renewed.status.success());
    std::fs::copy(pki.path("renewed.crt"), &cert).unwrap();
    // Until the reload, the running certificate is served.
    assert_eq!(served_serial(public), before);
    let r = reload_via_admin(&gw);
    assert_eq!(r.status, 200, "{}", r.text());
    let after = served_serial(public);
    assert!(after.starts_with("serial="), "{after:?}");
    assert_ne!(after, before);
    // And it is a certificate clients trust.
    let (ok, out) = curl(&[
        "-sS",
        "--cacert",
        &pki.path("ca.crt"),
        &format!("https://localhost:{public}/steady/x"),
        "--resolve",
        &format!("localhost:{public}:127.0.0.1"),
    ]);
    assert!(ok, "{out}");

    // A key that does not match the certificate is refused; the renewed one stays.
    std::fs::copy(pki.path("client.key"), &key).unwrap();
    let r = reload_via_admin(&gw);
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("does not match"), "{}", r.text());
    assert_eq!(served_serial(public), after);
}

#[test]
fn reloads_are_audited_and_a_rotated_secret_file_takes_effect() {
    let a = EchoServer::start("A");
    let (public, admin) = (free_port(), free_port());
    let dir = TempDir::new("reload-audit");
    let token_file = dir.0.join("admin-token");
    std::fs::write(&token_file, "first-admin-token-0123456789\n").unwrap();
    let audit = dir.0.join("audit.jsonl");
    let yaml = |extra_route: bool| {
        format!(
            r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}", token: "${{file:{token}}}" }}
audit: {{ path: "{audit}", hmac_key: "reload-audit-key-0123456789abcdef0123" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools: [ {{ name: a, zones: [ {{ name: z1, backends: [ {{ address: "{a}" }} ] }} ] }} ]
routes: [ {{ name: steady, listener: public, path_prefix: /steady, pool: a }}{extra} ]
"#,
            token = token_file.display(),
            audit = audit.display(),
            a = a.addr,
            extra = if extra_route {
                ", { name: extra, listener: public, path_prefix: /extra, pool: a }"
            } else {
                ""
            }
        )
    };
    let gw = Gateway::start(&yaml(false), admin);
    let bearer = |t: &str| format!("Bearer {t}");
    let reload = |t: &str| {
        request(
            gw.admin,
            "POST",
            "/reload",
            &[("Authorization", &bearer(t))],
            b"",
        )
    };
    assert_eq!(request(gw.admin, "POST", "/reload", &[], b"").status, 401);
    assert_eq!(reload("first-admin-token-0123456789").status, 200);

    // Rotate the secret file; the next reload takes the new token, the old one stops working.
    std::fs::write(&token_file, "second-admin-token-9876543210\n").unwrap();
    std::fs::write(&gw.config_path, yaml(true)).unwrap();
    assert_eq!(reload("first-admin-token-0123456789").status, 200);
    assert_eq!(reload("first-admin-token-0123456789").status, 401);
    assert_eq!(get(addr(public), "/extra/x").status, 200);
    std::fs::write(&gw.config_path, "listeners: [").unwrap();
    let r = reload("second-admin-token-9876543210");
    assert_eq!(r.status, 422, "{}", r.text());

    // Three reloads (the refused requests were no reloads), each with its audit record: who
    // asked, the outcome, the config hashes. The two requests refused for their token are
    // admin records of their own.
    let admin_records = |refused: bool| -> Vec<serde_json::Value> {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["record"]["phase"] == "admin")
            .map(|v| v["record"].clone())
            .filter(|r| (r["outcome"]["reason"] == "admin_token_refused") == refused)
            .collect()
    };
    wait_until("the reload audit records", Duration::from_secs(10), || {
        admin_records(false).len() == 3 && admin_records(true).len() == 2
    });
    let recs = admin_records(false);
    let outcomes: Vec<_> = recs
        .iter()
        .map(|r| r["outcome"]["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, ["applied", "applied", "rejected"]);
    assert!(recs
        .iter()
        .all(|r| r["actor"]["subject"] == "admin-api"
            && r["action"]["interaction"] == "config-reload"));
    let running = |i: usize| recs[i]["config"]["running"].as_str().unwrap().to_string();
    // The second reload applied a new text; the rejected one left the running config as it was.
    assert_ne!(running(0), running(1));
    assert_eq!(running(1), running(2));
    assert_eq!(
        recs[2]["config"]["attempted"],
        serde_json::json!(super_hash("listeners: ["))
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(
        !text.contains("second-admin-token"),
        "no secret in the audit trail"
    );
}

/// The hex SHA-256 of a text, as the gateway names configs.
fn super_hash(text: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("sha256sum | cut -d' ' -f1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(text.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_changed_file_is_reloaded_when_watched() {
    let a = EchoServer::start("A");
    let (public, admin) = (free_port(), free_port());
    let yaml = |prefix: &str| {
        format!(
            r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1, watch_config_interval_ms: 100 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools: [ {{ name: a, zones: [ {{ name: z1, backends: [ {{ address: "{a}" }} ] }} ] }} ]
routes: [ {{ name: r, listener: public, path_prefix: {prefix}, pool: a }} ]
"#,
            a = a.addr
        )
    };
    let gw = Gateway::start(&yaml("/one"), admin);
    assert_eq!(get(addr(public), "/one/x").status, 200);
    std::fs::write(&gw.config_path, yaml("/two")).unwrap();
    wait_until(
        "the watched file is reloaded",
        Duration::from_secs(10),
        || generation(&gw) == 2,
    );
    assert_eq!(get(addr(public), "/two/x").status, 200);
    assert_eq!(get(addr(public), "/one/x").status, 404);
    assert!(gw
        .metrics()
        .lines()
        .any(|l| l.starts_with("caregate_config_reloads_total{")
            && l.contains("trigger=\"file\"")
            && l.contains("outcome=\"applied\"")));
}

#[test]
fn a_request_keeps_the_config_it_started_with() {
    // A backend that holds its answer to /slow until released.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let slow_addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = std::sync::Arc::new(std::sync::Mutex::new(released));
    {
        let seen = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (seen, released) = (seen.clone(), released.clone());
                std::thread::spawn(move || {
                    serve_scripted(stream, &seen, |_, w| {
                        let _ = released.lock().unwrap().recv();
                        w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nslow-done")?;
                        Ok(Next::Answered)
                    })
                });
            }
        });
    }
    let a = EchoServer::start("A");
    let (public, admin) = (free_port(), free_port());
    // Generation 1: /slow goes to the slow backend and its responses are marked `one`;
    // generation 2: /slow's filter marks them `two`, and pool `s` names another backend.
    let yaml = |generation: &str, backend: SocketAddr| {
        format!(
            r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools: [ {{ name: s, zones: [ {{ name: z1, backends: [ {{ address: "{backend}" }} ] }} ] }} ]
routes:
  - {{ name: slow, listener: public, path_prefix: /slow, pool: s,
      filters: [ {{ kind: headers, config: {{ response: {{ set: {{ x-generation: "{generation}" }} }} }} }} ] }}
"#
        )
    };
    let gw = Gateway::start(&yaml("one", slow_addr), admin);
    let slow = std::thread::spawn(move || get(addr(public), "/slow/x"));
    wait_until(
        "the slow request reaches its backend",
        Duration::from_secs(10),
        || !seen.lock().unwrap().is_empty(),
    );
    std::fs::write(&gw.config_path, yaml("two", a.addr)).unwrap();
    let r = reload_via_admin(&gw);
    assert_eq!(r.status, 200, "{}", r.text());
    // New requests get the new generation: its filter and its backend.
    let r = get(addr(public), "/slow/y");
    assert_eq!((r.status, r.header("x-generation")), (200, Some("two")));
    assert_eq!(backend_of(&r), "A");
    // The request in flight keeps the route, filters, pool and backend it started with.
    release.send(()).unwrap();
    let r = slow.join().unwrap();
    assert_eq!((r.status, r.text()), (200, "slow-done".to_string()));
    assert_eq!(r.header("x-generation"), Some("one"));
}
