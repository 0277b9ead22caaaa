//! `ip_allow` on a listener and on a route, judged on the real client address: the peer, or the
//! forwarded client only when the peer is a trusted proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;

#[test]
fn listener_and_route_ip_rules_use_the_real_client_address() {
    let backend = EchoServer::start("app");
    let (public, internal, admin) = (free_port(), free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1, trusted_proxies: ["127.0.0.2/32"] }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - name: public
    channel: public
    listen: "127.0.0.1:{public}"
  - name: internal
    channel: internal
    listen: "127.0.0.1:{internal}"
    filters: [ {{ kind: ip_allow, config: {{ deny: ["127.0.0.0/8"] }} }} ]
pools: [ {{ name: app, zones: [ {{ name: a, backends: [ {{ address: "{b}" }} ] }} ] }} ]
routes:
  - name: open
    listener: public
    path_prefix: /open
    pool: app
  - name: clinic-only
    listener: public
    path_prefix: /clinic
    pool: app
    filters: [ {{ kind: ip_allow, config: {{ allow: ["127.0.0.1/32", "10.20.0.0/16"] }} }} ]
  - name: internal
    listener: internal
    path_prefix: /
    pool: app
"#,
        b = backend.addr
    );
    let _gw = Gateway::start(&yaml, admin);
    let gw = addr(public);
    let from = |ip: [u8; 4], target: &str, headers: &[(&str, &str)]| {
        request_from(std::net::IpAddr::from(ip), gw, "GET", target, headers)
    };

    // The listener-wide deny covers every route of the internal listener.
    let before = backend.count();
    let r = get(addr(internal), "/anything");
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "ip_not_allowed");
    assert_eq!(backend.count(), before);

    // Route rule: 127.0.0.1 is allowed, 127.0.0.3 (another loopback address) is not.
    assert_eq!(from([127, 0, 0, 1], "/clinic/x", &[]).status, 200);
    assert_eq!(from([127, 0, 0, 1], "/open/x", &[]).status, 200);
    let r = from([127, 0, 0, 3], "/clinic/x", &[]);
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "ip_not_allowed");
    assert_eq!(from([127, 0, 0, 3], "/open/x", &[]).status, 200);

    // An untrusted peer cannot claim an allowed address through X-Forwarded-For.
    let r = from(
        [127, 0, 0, 3],
        "/clinic/x",
        &[("X-Forwarded-For", "10.20.1.1")],
    );
    assert_eq!(r.status, 403);
    // A trusted proxy (127.0.0.2) is believed: its client decides.
    let r = from(
        [127, 0, 0, 2],
        "/clinic/x",
        &[("X-Forwarded-For", "10.20.1.1")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        backend.seen().last().unwrap().header("x-forwarded-for"),
        Some("10.20.1.1, 127.0.0.2")
    );
    let r = from(
        [127, 0, 0, 2],
        "/clinic/x",
        &[("X-Forwarded-For", "192.0.2.7")],
    );
    assert_eq!(r.status, 403);
}
