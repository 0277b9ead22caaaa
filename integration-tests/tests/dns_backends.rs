//! Backends by DNS name, against a small DNS server run by the test on loopback: the answer
//! moves traffic, an outage keeps the last answer, a name that never resolves leaves the gateway
//! running but not ready, and the upstream `Host` is the backend's name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the test DNS server answers for every A query: some addresses, or nothing at all (an
/// outage: the query times out).
type Answers = Arc<Mutex<Option<Vec<Ipv4Addr>>>>;

/// The DNS response to query `q`: its question, and one A record (TTL 1 s) per address for an
/// A query, none for other types.
fn dns_response(q: &[u8], ips: &[Ipv4Addr]) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    let mut i = 12;
    while i < q.len() && q[i] != 0 {
        i += 1 + q[i] as usize;
    }
    i += 1;
    if i + 4 > q.len() {
        return None;
    }
    let qtype = u16::from_be_bytes([q[i], q[i + 1]]);
    let question_end = i + 4;
    let answers: &[Ipv4Addr] = if qtype == 1 { ips } else { &[] };
    let mut r = Vec::new();
    r.extend_from_slice(&q[0..2]);
    r.extend_from_slice(&[0x81, 0x80, 0, 1]);
    r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&q[12..question_end]);
    for ip in answers {
        r.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1]);
        r.extend_from_slice(&1u32.to_be_bytes());
        r.extend_from_slice(&[0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}

/// Start the DNS server; its address.
fn dns_server(answers: Answers) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let current = answers.lock().unwrap().clone();
            if let Some(ips) = current {
                if let Some(r) = dns_response(&buf[..n], &ips) {
                    let _ = sock.send_to(&r, from);
                }
            }
        }
    });
    addr
}

/// Two backends on one port, at 127.0.0.2 and 127.0.0.3, answering with their name and the
/// `Host` they saw.
fn two_backends() -> u16 {
    for _ in 0..50 {
        let a = TcpListener::bind("127.0.0.2:0").unwrap();
        let port = a.local_addr().unwrap().port();
        let Ok(b) = TcpListener::bind(("127.0.0.3", port)) else {
            continue;
        };
        for (name, l) in [("A", a), ("B", b)] {
            std::thread::spawn(move || {
                for stream in l.incoming() {
                    let Ok(stream) = stream else { continue };
                    std::thread::spawn(move || {
                        let seen = Mutex::new(Vec::new());
                        serve_scripted(stream, &seen, |req, w| {
                            let host = req.header("host").unwrap_or("").to_string();
                            let body = format!("{name} {host}");
                            write!(
                                w,
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            )?;
                            Ok(Next::Answered)
                        })
                    });
                }
            });
        }
        return port;
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

fn config(public: u16, admin: u16, dns: SocketAddr, port: u16) -> String {
    format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
resolver: {{ servers: ["{dns}"], refresh_ms: 300, min_ttl_ms: 100, timeout_ms: 300 }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools:
  - {{ name: ehr, zones: [ {{ name: z1, backends: [ {{ address: "ehr.test:{port}" }} ] }} ],
      health_check: {{ interval_ms: 100 }} }}
routes: [ {{ name: ehr, listener: public, path_prefix: /ehr, pool: ehr }} ]
"#
    )
}

#[test]
fn the_dns_answer_moves_traffic_and_an_outage_keeps_the_last_answer() {
    let port = two_backends();
    let answers: Answers = Arc::new(Mutex::new(Some(vec![Ipv4Addr::new(127, 0, 0, 2)])));
    let dns = dns_server(answers.clone());
    let (public, admin) = (free_port(), free_port());
    let gw = Gateway::start(&config(public, admin, dns, port), admin);
    let p = addr(public);
    let r = get(p, "/ehr/x");
    assert_eq!(r.status, 200, "{}", r.text());
    // The backend got its own name as Host (the port is not the scheme's default).
    assert_eq!(r.text(), format!("A ehr.test:{port}"));

    // The name moves to the other address: traffic follows, without a reload.
    *answers.lock().unwrap() = Some(vec![Ipv4Addr::new(127, 0, 0, 3)]);
    wait_until("traffic moves to B", Duration::from_secs(10), || {
        get(p, "/ehr/x").text().starts_with("B ")
    });
    // A's health series is gone with it.
    wait_until("A's series removed", Duration::from_secs(10), || {
        !gw.metrics()
            .contains(&format!("backend=\"127.0.0.2:{port}\""))
    });

    // DNS goes silent: the last answer stays in use, and the failures are counted.
    *answers.lock().unwrap() = None;
    wait_until("DNS failures counted", Duration::from_secs(10), || {
        gw.metrics().lines().any(|l| {
            l.starts_with("caregate_dns_resolutions_total{pool=\"ehr\",result=\"error\"}")
                && !l.ends_with(" 0")
        })
    });
    for _ in 0..10 {
        let r = get(p, "/ehr/x");
        assert_eq!(
            (r.status, r.text().starts_with("B ")),
            (200, true),
            "{}",
            r.text()
        );
    }
    assert!(
        gw.proc.log().contains("cannot resolve ehr.test"),
        "{}",
        gw.proc.log()
    );
    // And it answers again: both addresses share the traffic.
    *answers.lock().unwrap() = Some(vec![
        Ipv4Addr::new(127, 0, 0, 2),
        Ipv4Addr::new(127, 0, 0, 3),
    ]);
    wait_until("both backends serve", Duration::from_secs(10), || {
        let seen: std::collections::BTreeSet<String> = (0..6)
            .map(|_| get(p, "/ehr/x").text()[..1].to_string())
            .collect();
        seen.len() == 2
    });
}

#[test]
fn a_name_that_never_resolves_leaves_the_gateway_up_but_not_ready() {
    let port = two_backends();
    let answers: Answers = Arc::new(Mutex::new(None));
    let dns = dns_server(answers.clone());
    let (public, admin) = (free_port(), free_port());
    let dir = TempDir::new("dns-unresolved");
    let cfg = dir.0.join("caregate.yaml");
    std::fs::write(&cfg, config(public, admin, dns, port)).unwrap();
    let mut proc = Proc::spawn(&["run", "-c", cfg.to_str().unwrap()], "dns-unresolved");
    wait_until(
        "not ready, with the reason",
        Duration::from_secs(15),
        || {
            try_request(addr(admin), "GET", "/readyz", &[], b"")
                .map(|r| r.status == 503 && r.text().contains("no pool has a backend"))
                .unwrap_or(false)
        },
    );
    assert!(
        proc.child.try_wait().unwrap().is_none(),
        "it must keep running"
    );
    // Once the name resolves, it becomes ready and serves.
    *answers.lock().unwrap() = Some(vec![Ipv4Addr::new(127, 0, 0, 2)]);
    wait_until("ready", Duration::from_secs(15), || {
        try_request(addr(admin), "GET", "/readyz", &[], b"")
            .map(|r| r.status == 200)
            .unwrap_or(false)
    });
    let r = get(addr(public), "/ehr/x");
    assert_eq!(r.status, 200, "{}", r.text());
    proc.kill();
}
