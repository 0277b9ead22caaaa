//! Ambiguous framing on a raw socket: a request with both Content-Length and Transfer-Encoding
//! is never forwarded with both, and nothing after it on that connection is served.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[test]
fn content_length_with_transfer_encoding_is_never_smuggled() {
    let backend = EchoServer::start("app");
    let (public, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
server: {{ threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{public}" }} ]
pools: [ {{ name: app, zones: [ {{ name: a, backends: [ {{ address: "{b}" }} ] }} ] }} ]
routes: [ {{ name: app, listener: public, path_prefix: /, pool: app }} ]
"#,
        b = backend.addr
    );
    let _gw = Gateway::start(&yaml, admin);
    let gw = addr(public);

    // CL.TE: the front end must not take Content-Length (which would leave "0\r\n\r\nGET
    // /smuggled" as the start of a second request), nor forward both headers.
    let attack = b"POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut s = TcpStream::connect(gw).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(attack).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let first = read_response(&mut reader, false).unwrap();
    // Whatever the first answer, the connection must then close without a second response.
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    assert!(
        !String::from_utf8_lossy(&rest).contains("HTTP/1.1"),
        "a second response followed on the same connection: {}",
        String::from_utf8_lossy(&rest)
    );
    assert!(
        first.status == 200 || first.status == 400,
        "status {}",
        first.status
    );
    assert_ne!(
        first
            .header("connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("keep-alive"),
        "the connection must close after an ambiguously framed request"
    );

    // TE.CL ordering of the same headers.
    let attack2 = b"POST /second HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled2 HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut s = TcpStream::connect(gw).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(attack2).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let _ = read_response(&mut reader, false);
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    assert!(!String::from_utf8_lossy(&rest).contains("HTTP/1.1"));

    // Conflicting Content-Length values are refused outright.
    let mut s = TcpStream::connect(gw).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"POST /third HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    let r = read_response(&mut reader, false).unwrap();
    assert_eq!(r.status, 400);

    let seen = backend.seen();
    for req in &seen {
        assert!(
            !(req.has_header("content-length") && req.has_header("transfer-encoding")),
            "forwarded with both framing headers: {req:?}"
        );
        assert!(
            !req.target.contains("smuggled"),
            "smuggled request reached the backend"
        );
        assert_ne!(req.target, "/third");
    }
    // The TE-framed bodies that were forwarded carry exactly the chunked payload.
    if let Some(second) = seen.iter().find(|r| r.target == "/second") {
        assert_eq!(second.body, b"hello");
    }
}
