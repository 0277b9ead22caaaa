//! Slow and greedy clients, against a real gateway process: the request header deadline (a
//! slowloris client is cut while normal traffic goes on), the idle bound, the minimum body rate,
//! and the connection caps per client address and in total, with trusted proxies exempt.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn config(public: u16, admin: u16, backend: SocketAddr, server_extra: &str) -> String {
    config_with(public, admin, backend, server_extra, "")
}

fn config_with(
    public: u16,
    admin: u16,
    backend: SocketAddr,
    server_extra: &str,
    listener_extra: &str,
) -> String {
    format!(
        r#"
server: {{ threads: 2, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1{server_extra} }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}"{listener_extra} }} ]
pools: [ {{ name: app, zones: [ {{ name: a, backends: [ {{ address: "{backend}" }} ] }} ] }} ]
routes: [ {{ name: app, listener: public, path_prefix: /, pool: app }} ]
"#
    )
}

fn connect_from(src: IpAddr, to: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::new(src, 0).into()).unwrap();
    sock.connect_timeout(&to.into(), Duration::from_secs(2))
        .unwrap();
    sock.into()
}

/// Read until the peer closes (or resets) the connection; the bytes read before.
fn read_to_close(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                return None
            }
            Err(_) => return Some(out),
        }
    }
}

fn metric(gw: &Gateway, prefix: &str) -> f64 {
    gw.metrics()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One slowloris client: a request header sent one byte per second. Returns how long after the
/// first byte the gateway closed the connection, or None if it was still open after `give_up`.
fn slowloris(to: SocketAddr, give_up: Duration) -> Option<Duration> {
    let mut s = TcpStream::connect(to).unwrap();
    let header = format!(
        "GET /slow HTTP/1.1\r\nHost: {to}\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(64)
    );
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 512];
    for byte in header.as_bytes() {
        if s.write_all(std::slice::from_ref(byte)).is_err() {
            return Some(start.elapsed());
        }
        // The pause between bytes is a read: it notices the close at once.
        match s.read(&mut buf) {
            Ok(_) => return Some(start.elapsed()),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            Err(_) => return Some(start.elapsed()),
        }
        if start.elapsed() > give_up {
            return None;
        }
    }
    None
}

#[test]
fn slowloris_clients_are_cut_at_the_header_deadline_while_normal_traffic_succeeds() {
    let backend = EchoServer::start("app");
    let (public, admin) = (free_port(), free_port());
    // The server-wide deadline is long; the listener's own is 3 s.
    let yaml = config_with(
        public,
        admin,
        backend.addr,
        ", connections: { header_timeout_seconds: 60, max_per_client: 0 }",
        ", connections: { header_timeout_seconds: 3 }",
    );
    let gw = Gateway::start(&yaml, admin);
    let to = addr(public);

    let slow: Vec<_> = (0..100)
        .map(|_| std::thread::spawn(move || slowloris(to, Duration::from_secs(20))))
        .collect();
    // 2,000 normal requests, 100 at a time, while the slow clients hold their connections.
    let normal: Vec<_> = (0..100)
        .map(|_| {
            std::thread::spawn(move || {
                (0..20)
                    .filter(|_| {
                        try_request(to, "GET", "/normal", &[], b"")
                            .map(|r| r.status)
                            .ok()
                            == Some(200)
                    })
                    .count()
            })
        })
        .collect();
    let ok: usize = normal.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(ok, 2000, "every normal request succeeds");

    for h in slow {
        let cut = h
            .join()
            .unwrap()
            .expect("a slowloris client was never cut off");
        assert!(
            cut >= Duration::from_millis(2500) && cut <= Duration::from_millis(6500),
            "cut {cut:?} after its first byte; the header deadline is 3 s"
        );
    }
    assert!(
        metric(
            &gw,
            "caregate_slow_clients_cut_total{listener=\"public\",reason=\"header_timeout\"}"
        ) >= 100.0
    );
    // A header that is slow but within the deadline is served.
    let mut s = TcpStream::connect(to).unwrap();
    for part in [
        "GET /in-time HTTP/1.1\r\n",
        &format!("Host: {to}\r\n"),
        "Connection: close\r\n\r\n",
    ] {
        s.write_all(part.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    let r = read_response(&mut std::io::BufReader::new(s), false).unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn idle_connections_are_closed_at_the_keepalive_bound() {
    let backend = EchoServer::start("app");
    let (public, admin) = (free_port(), free_port());
    let yaml = config(
        public,
        admin,
        backend.addr,
        ", downstream_keepalive_seconds: 2",
    );
    let gw = Gateway::start(&yaml, admin);
    let to = addr(public);

    // A connection that never sends a byte.
    let mut silent = TcpStream::connect(to).unwrap();
    let t = Instant::now();
    let got = read_to_close(&mut silent, Duration::from_secs(10)).expect("still open");
    assert!(got.is_empty(), "closed quietly, without a reply");
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );

    // A kept-alive connection after one request.
    let mut s = TcpStream::connect(to).unwrap();
    s.write_all(format!("GET /one HTTP/1.1\r\nHost: {to}\r\n\r\n").as_bytes())
        .unwrap();
    let mut reader = std::io::BufReader::new(s.try_clone().unwrap());
    assert_eq!(read_response(&mut reader, false).unwrap().status, 200);
    let t = Instant::now();
    assert!(read_to_close(&mut s, Duration::from_secs(10)).is_some());
    assert!(t.elapsed() >= Duration::from_millis(1500));
    assert!(
        metric(
            &gw,
            "caregate_idle_connections_closed_total{listener=\"public\"}"
        ) >= 2.0
    );
}

#[test]
fn a_request_body_slower_than_the_minimum_rate_is_refused() {
    let backend = EchoServer::start("app");
    let (public, admin) = (free_port(), free_port());
    let yaml = config(
        public,
        admin,
        backend.addr,
        ", connections: { body_min_rate_bytes_per_second: 1000, body_grace_seconds: 1 }",
    );
    let gw = Gateway::start(&yaml, admin);
    let to = addr(public);

    // A body at full speed passes.
    let body = vec![b'x'; 50_000];
    assert_eq!(request(to, "POST", "/fast", &[], &body).status, 200);

    // 100 bytes every half second (200 B/s) of a 100 kB body.
    let mut s = TcpStream::connect(to).unwrap();
    s.write_all(
        format!("POST /slow HTTP/1.1\r\nHost: {to}\r\nContent-Length: 100000\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(15) {
        if s.write_all(&[b'y'; 100]).is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            Err(_) => break,
        }
        if got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() > 100 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body_too_slow"), "{text}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    assert!(
        metric(
            &gw,
            "caregate_slow_clients_cut_total{listener=\"public\",reason=\"body_too_slow\"}"
        ) >= 1.0
    );
}

#[test]
fn connection_caps_per_client_address_and_in_total() {
    let backend = EchoServer::start("app");
    let (public, admin) = (free_port(), free_port());
    let yaml = config(
        public,
        admin,
        backend.addr,
        ", trusted_proxies: [\"127.0.0.2/32\"], connections: { max_per_client: 3, max_total: 8, exempt_loopback: false }",
    );
    let gw = Gateway::start(&yaml, admin);
    let to = addr(public);
    let open = || metric(&gw, "caregate_listener_connections{listener=\"public\"}");
    wait_until("no connection open", Duration::from_secs(5), || {
        open() == 0.0
    });

    let one: IpAddr = "127.0.0.1".parse().unwrap();
    let held: Vec<_> = (0..3).map(|_| connect_from(one, to)).collect();
    wait_until("3 connections counted", Duration::from_secs(5), || {
        open() == 3.0
    });
    // The fourth from the same address is refused with a clear reply.
    let mut fourth = connect_from(one, to);
    let got = read_to_close(&mut fourth, Duration::from_secs(5)).expect("refused and closed");
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("too_many_connections"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 1"),
        "{text}"
    );

    // A trusted proxy is not capped per address (5 > 3), but counts in the total (3 + 5 = 8).
    let proxy: IpAddr = "127.0.0.2".parse().unwrap();
    let via_proxy: Vec<_> = (0..5).map(|_| connect_from(proxy, to)).collect();
    wait_until("8 connections counted", Duration::from_secs(5), || {
        open() == 8.0
    });
    // The total is reached: another address is refused too.
    let mut other = connect_from("127.0.0.3".parse().unwrap(), to);
    let got = read_to_close(&mut other, Duration::from_secs(5)).expect("refused and closed");
    assert!(String::from_utf8_lossy(&got).contains("too_many_connections"));
    assert!(
        metric(
            &gw,
            "caregate_connections_refused_total{listener=\"public\",reason=\"per_client_limit\"}"
        ) >= 1.0
    );
    assert!(
        metric(
            &gw,
            "caregate_connections_refused_total{listener=\"public\",reason=\"total_limit\"}"
        ) >= 1.0
    );

    // Closing connections gives the places back; a held connection still serves requests.
    drop(via_proxy);
    let mut held = held;
    let mut first = held.remove(0);
    wait_until("3 connections counted", Duration::from_secs(5), || {
        open() == 3.0
    });
    first
        .write_all(
            format!("GET /held HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
    let r = read_response(&mut std::io::BufReader::new(first), false).unwrap();
    assert_eq!(r.status, 200);
    let r = request_from("127.0.0.3".parse().unwrap(), to, "GET", "/again", &[]);
    assert_eq!(r.status, 200);
}
