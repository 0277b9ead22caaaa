//! Helpers for caregate's end-to-end tests: real processes, real sockets, ephemeral loopback
//! ports, readiness by polling (never fixed sleeps).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The `caregate` binary: `$CAREGATE_BIN`, or the one next to this test's target directory.
pub fn caregate_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CAREGATE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/caregate
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("profile dir");
    let bin = profile_dir.join("caregate");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build -p caregate` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A free loopback port for a process the test starts (a gateway's listeners, a sandbox).
///
/// It comes from below the kernel's ephemeral range, so that no outgoing connection (whose local
/// port the kernel takes from that range) can occupy it between this call and the process's
/// bind; and no port is handed out twice by one test binary, whose tests run in parallel.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<usize>().ok())
        })
        .unwrap_or(0);
    if low > 11_000 {
        let (lo, span) = (10_000, low - 10_000);
        let start = (std::process::id() as usize).wrapping_mul(7919) % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            let port = (lo + (start + n) % span) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "caregate-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed on drop; its stderr goes to a file, readable with `log()`.
pub struct Proc {
    pub child: Child,
    pub log_path: PathBuf,
    _dir: TempDir,
}

impl Proc {
    pub fn spawn(args: &[&str], tag: &str) -> Proc {
        let dir = TempDir::new(tag);
        let log_path = dir.0.join("stderr.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let out = log.try_clone().unwrap();
        let child = Command::new(caregate_bin())
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("spawn caregate");
        Proc {
            child,
            log_path,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for the process to exit, at most `limit` (panicking with its log after that); its
    /// exit status.
    pub fn exit_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {limit:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `caregate audit verify PATH` with the HMAC key in `CAREGATE_AUDIT_KEY`: its exit code and
/// stdout + stderr.
pub fn audit_verify(path: &Path, key: &str) -> (Option<i32>, String) {
    let out = Command::new(caregate_bin())
        .args(["audit", "verify", path.to_str().unwrap()])
        .env("CAREGATE_AUDIT_KEY", key)
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Poll until `f` is true or the deadline passes.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out waiting for {what}");
}

/// A running gateway process.
pub struct Gateway {
    pub proc: Proc,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    _dir: TempDir,
}

impl Gateway {
    /// Write `yaml` to a temp file, start `caregate run` on it and wait for `/readyz`.
    /// Relative paths in the config resolve against the repository's `conf/` folder.
    pub fn start(yaml: &str, admin_port: u16) -> Gateway {
        let dir = TempDir::new("gw");
        let config_path = dir.0.join("caregate.yaml");
        let yaml = yaml.replace("@CONF@", repo_root().join("conf").to_str().unwrap());
        std::fs::write(&config_path, &yaml).unwrap();
        let proc = Proc::spawn(&["run", "-c", config_path.to_str().unwrap()], "gw-proc");
        let admin = addr(admin_port);
        let mut gw = Gateway {
            proc,
            admin,
            config_path,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = try_request(admin, "GET", "/readyz", &[], b"") {
                if r.status == 200 {
                    break;
                }
            }
            if Instant::now() > deadline {
                panic!("gateway not ready; log:\n{}", gw.proc.log());
            }
            if let Ok(Some(status)) = gw.proc.child.try_wait() {
                panic!("gateway exited ({status}); log:\n{}", gw.proc.log());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        // `/readyz` answers from the admin service, which may be up before another service's
        // listener is bound: wait until every `listen:` address of the config accepts.
        for listen in listen_addrs(&yaml) {
            loop {
                if TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    panic!(
                        "gateway listener {listen} never opened; log:\n{}",
                        gw.proc.log()
                    );
                }
                if let Ok(Some(status)) = gw.proc.child.try_wait() {
                    panic!("gateway exited ({status}); log:\n{}", gw.proc.log());
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        gw
    }

    pub fn metrics(&self) -> String {
        request(self.admin, "GET", "/metrics", &[], b"").text()
    }

    /// Send SIGTERM and wait (20 s at most) for the process to exit: its drain ends, the audit
    /// trail is sealed.
    pub fn sigterm_and_wait(&mut self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.proc.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                return;
            }
            assert!(Instant::now() < deadline, "gateway did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// Every socket address given as `listen: "..."` (or unquoted) in a config text.
fn listen_addrs(yaml: &str) -> Vec<SocketAddr> {
    yaml.split("listen:")
        .skip(1)
        .filter_map(|rest| {
            let v = rest.trim_start().trim_start_matches('"');
            let end = v
                .find(|c: char| c == '"' || c == ',' || c == '}' || c.is_whitespace())
                .unwrap_or(v.len());
            v[..end].parse().ok()
        })
        .collect()
}

/// A standalone sandbox FHIR server process (`caregate sandbox`).
pub struct SandboxProc {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl SandboxProc {
    pub fn start(port: u16) -> SandboxProc {
        let data = repo_root().join("conf/demo/data");
        let listen = format!("127.0.0.1:{port}");
        let proc = Proc::spawn(
            &[
                "sandbox",
                "--listen",
                &listen,
                "--data",
                data.to_str().unwrap(),
            ],
            "sandbox",
        );
        let s = SandboxProc {
            proc,
            addr: addr(port),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = try_request(s.addr, "GET", "/healthz", &[], b"") {
                if r.status == 200 {
                    break;
                }
            }
            if Instant::now() > deadline {
                panic!("sandbox not ready; log:\n{}", s.proc.log());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        s
    }
}

/// An HTTP response as read off the wire.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Read one HTTP/1.1 response (Content-Length, chunked or close-delimited).
pub fn read_response(reader: &mut impl BufRead, head_request: bool) -> std::io::Result<Response> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "no response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad status line {line:?}"),
            )
        })?;
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        reader.read_line(&mut l)?;
        let l = l.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        // no body
    } else if get("transfer-encoding")
        .map(|v| v.contains("chunked"))
        .unwrap_or(false)
    {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size")
                })?;
            if n == 0 {
                let mut end = String::new();
                reader.read_line(&mut end)?;
                break;
            }
            let mut chunk = vec![0; n];
            reader.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk);
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
        }
    } else if let Some(cl) = get("content-length") {
        let n: usize = cl.parse().unwrap_or(0);
        body = vec![0; n];
        reader.read_exact(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// One request on a fresh connection (`Connection: close`).
pub fn try_request(
    to: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut req = format!("{method} {target} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {to}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("Connection: close\r\n\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut r = BufReader::new(s);
    read_response(&mut r, method == "HEAD")
}

/// One request from a chosen loopback source address (e.g. 127.0.0.3).
pub fn request_from(
    src: std::net::IpAddr,
    to: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Response {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::new(src, 0).into()).unwrap();
    sock.connect_timeout(&to.into(), Duration::from_secs(2))
        .unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {to}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    read_response(&mut BufReader::new(s), method == "HEAD").unwrap()
}

pub fn request(
    to: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_request(to, method, target, headers, body)
        .unwrap_or_else(|e| panic!("{method} {target} to {to}: {e}"))
}

pub fn get(to: SocketAddr, target: &str) -> Response {
    request(to, "GET", target, &[], b"")
}

/// A request as an echo backend saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The index of this request on its connection (0 = first).
    pub conn_seq: usize,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
}

/// What a scripted backend's answer function did with a request.
pub enum Next {
    /// A response was written: go on with the next request (unless the client asked to close).
    Answered,
    /// Nothing was written: wait for a next request (a stalled backend).
    Ignored,
    /// Close the connection now.
    Close,
}

/// Serve one connection of a scripted backend: answer `/healthz` probes, record every other
/// request in `seen`, and let `answer` respond to it, until the client closes or asks to.
pub fn serve_scripted(
    stream: TcpStream,
    seen: &Mutex<Vec<Seen>>,
    mut answer: impl FnMut(&Seen, &mut TcpStream) -> std::io::Result<Next>,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(mut w) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::new(stream);
    let mut seq = 0;
    while let Some((method, target, headers, body)) = read_request(&mut r) {
        if target == "/healthz" {
            if w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                .is_err()
            {
                return;
            }
            continue;
        }
        let close = headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close"));
        let req = Seen {
            method,
            target,
            headers,
            body,
            conn_seq: seq,
        };
        seen.lock().unwrap().push(req.clone());
        seq += 1;
        match answer(&req, &mut w) {
            Ok(Next::Answered) if !close => {}
            Ok(Next::Ignored) => {}
            _ => return,
        }
    }
}

/// How an echo backend answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EchoMode {
    /// 200 with a JSON echo of what it saw.
    Echo,
    /// Read the request, then close the connection without answering.
    DropAfterRequest,
}

/// A small HTTP/1.1 backend on its own threads that records every request it receives
/// (`/healthz` probes are answered and not recorded).
pub struct EchoServer {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub name: String,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

impl EchoServer {
    pub fn start(name: &str) -> EchoServer {
        Self::start_with(name, EchoMode::Echo)
    }

    pub fn start_with(name: &str, mode: EchoMode) -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let name2 = name.to_string();
        let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped2 = stopped.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped2.load(Ordering::SeqCst) {
                    // Dropping the listener closes the port: connects are refused from now on.
                    return;
                }
                let Ok(stream) = stream else { continue };
                let seen = seen2.clone();
                let name = name2.clone();
                std::thread::spawn(move || serve_echo(stream, seen, &name, mode));
            }
        });
        EchoServer {
            addr,
            seen,
            name: name.to_string(),
            stopped,
        }
    }

    /// Close the listening socket (connections are refused afterwards) and wait until it is.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        wait_until("echo server closed", Duration::from_secs(5), || {
            TcpStream::connect(self.addr).is_err()
        });
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A request as read off a connection: method, target, headers, body.
pub type RawRequest = (String, String, Vec<(String, String)>, Vec<u8>);

/// One request off the connection: request line, headers, Content-Length or chunked body.
pub fn read_request(r: &mut impl BufRead) -> Option<RawRequest> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).ok()? == 0 {
            return None;
        }
        let l = l.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            if r.read_line(&mut size).ok()? == 0 {
                return None;
            }
            let n = usize::from_str_radix(size.trim().split(';').next()?.trim(), 16).ok()?;
            if n == 0 {
                // Trailers, up to the empty line.
                loop {
                    let mut t = String::new();
                    if r.read_line(&mut t).ok()? == 0 || t.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).ok()?;
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(cl) = get("content-length") {
        body = vec![0; cl.parse().ok()?];
        r.read_exact(&mut body).ok()?;
    }
    Some((method, target, headers, body))
}

fn serve_echo(stream: TcpStream, seen: Arc<Mutex<Vec<Seen>>>, name: &str, mode: EchoMode) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    let mut seq = 0;
    while let Some((method, target, headers, body)) = read_request(&mut reader) {
        if target == "/healthz" {
            let _ = writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n");
            continue;
        }
        seen.lock().unwrap().push(Seen {
            method: method.clone(),
            target: target.clone(),
            headers: headers.clone(),
            body: body.clone(),
            conn_seq: seq,
        });
        seq += 1;
        if mode == EchoMode::DropAfterRequest {
            return;
        }
        let mut hmap: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in &headers {
            hmap.entry(k.to_ascii_lowercase())
                .or_default()
                .push(v.clone());
        }
        let out = serde_json::json!({
            "backend": name,
            "method": method,
            "target": target,
            "headers": hmap,
            "body_len": body.len(),
        })
        .to_string();
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
            out.len(),
            out
        );
        if writer.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// A small PKI made with the `openssl` command: a CA, a server certificate for localhost and
/// 127.0.0.1, a client certificate signed by the CA, and a client certificate from another CA.
pub struct Pki {
    pub dir: TempDir,
}

impl Pki {
    pub fn path(&self, name: &str) -> String {
        self.dir.0.join(name).to_str().unwrap().to_string()
    }

    pub fn new() -> Pki {
        let dir = TempDir::new("pki");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir.0)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "rogue-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=caregate test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
            ]);
        }
        std::fs::write(
            dir.0.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(dir.0.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, ca, ext, cn) in [
            ("server", "ca", "server.ext", "localhost"),
            ("client", "ca", "client.ext", "lab-interface-engine"),
            (
                "rogue-client",
                "rogue-ca",
                "client.ext",
                "lab-interface-engine",
            ),
        ] {
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/O=Test Hospital/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.crt"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                ext,
                "-out",
                &format!("{name}.crt"),
            ]);
        }
        Pki { dir }
    }
}

impl Pki {
    /// Write into `dir` the TLS files the production-shaped configs name under
    /// `/etc/caregate/tls` (conf/caregate.example.yaml, the Kubernetes ConfigMap), made from this
    /// PKI: `check` reads every certificate, key and CA file, as `run` would.
    pub fn write_example_tls(&self, dir: &Path) {
        for (name, from) in [
            ("public.crt", "server.crt"),
            ("public.key", "server.key"),
            ("internal.crt", "server.crt"),
            ("internal.key", "server.key"),
            ("hospital-systems-ca.pem", "ca.crt"),
            ("backend-ca.pem", "ca.crt"),
            ("gateway-client.crt", "client.crt"),
            ("gateway-client.key", "client.key"),
        ] {
            std::fs::copy(self.path(from), dir.join(name)).unwrap();
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// Run curl; returns (exit success, stdout).
pub fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The `next` link of a FHIR Bundle (its paging link), if it has one.
pub fn next_link(bundle: &serde_json::Value) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == "next")?["url"]
        .as_str()
        .map(str::to_string)
}

/// One request on a kept-alive connection (reconnecting when the connection is gone, as
/// HTTP/1.1 clients do for an idempotent request on an idle connection the server closed).
pub struct Client {
    pub to: SocketAddr,
    pub conn: Option<BufReader<TcpStream>>,
}

impl Client {
    pub fn get(&mut self, target: &str) -> Result<Response, String> {
        for attempt in 0..2 {
            let reused = self.conn.is_some();
            if self.conn.is_none() {
                let s = TcpStream::connect_timeout(&self.to, Duration::from_secs(2))
                    .map_err(|e| format!("connect: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                self.conn = Some(BufReader::new(s));
            }
            let conn = self.conn.as_mut().unwrap();
            let req = format!("GET {target} HTTP/1.1\r\nHost: {}\r\n\r\n", self.to);
            let sent = conn.get_mut().write_all(req.as_bytes());
            let got = sent
                .map_err(|e| e.to_string())
                .and_then(|_| read_response(conn, false).map_err(|e| e.to_string()));
            match got {
                Ok(r) => {
                    if r.header("connection")
                        .is_some_and(|c| c.eq_ignore_ascii_case("close"))
                    {
                        self.conn = None;
                    }
                    return Ok(r);
                }
                // A kept-alive connection the server closed before reading the request: retry
                // once on a new one. Any other failure counts.
                Err(e) => {
                    self.conn = None;
                    if !(reused && attempt == 0) {
                        return Err(e);
                    }
                }
            }
        }
        Err("no response".into())
    }
}

/// Clients that send requests until stopped, counting answers and failures.
pub struct Load {
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    pub ok: Arc<std::sync::atomic::AtomicUsize>,
    pub failures: Arc<Mutex<Vec<(Instant, String)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Start the clients: two on kept-alive connections, one opening a connection per request.
    pub fn start(to: SocketAddr, target: &'static str) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failures: Arc<Mutex<Vec<(Instant, String)>>> = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        // Two kept-alive clients and one that opens a new connection per request.
        for keepalive in [true, true, false] {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            threads.push(std::thread::spawn(move || {
                let mut c = Client { to, conn: None };
                while !stop.load(Ordering::SeqCst) {
                    let r = if keepalive {
                        c.get(target)
                    } else {
                        try_request(to, "GET", target, &[], b"").map_err(|e| {
                            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                                format!("connect: {e}")
                            } else {
                                e.to_string()
                            }
                        })
                    };
                    match r {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => failures
                            .lock()
                            .unwrap()
                            .push((Instant::now(), format!("{} {}", r.status, r.text()))),
                        Err(e) => failures.lock().unwrap().push((Instant::now(), e)),
                    }
                }
            }));
        }
        Load {
            stop,
            ok,
            failures,
            threads,
        }
    }

    /// Stop the clients: the requests answered 200, and every failure.
    pub fn finish(self) -> (usize, Vec<String>) {
        let (ok, f) = self.finish_timed();
        (ok, f.into_iter().map(|(_, e)| e).collect())
    }

    /// Like [`Load::finish`], with the time of each failure.
    pub fn finish_timed(self) -> (usize, Vec<(Instant, String)>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        let f = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::SeqCst), f)
    }
}

/// Where Debian installs `redis-server` (scripts/deps.sh).
pub const REDIS: &str = "/usr/bin/redis-server";

/// A `redis-server` on a loopback port of its own.
pub struct RedisServer {
    pub child: Option<Child>,
    pub port: u16,
    /// More arguments of redis-server (TLS, `--requirepass`, ...).
    pub extra: Vec<String>,
}

impl RedisServer {
    /// Whether redis-server is installed; false (after saying why) when it is not and this is
    /// not CI (where its absence fails the test).
    pub fn available() -> bool {
        if std::path::Path::new(REDIS).exists() {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "{REDIS} is missing: scripts/deps.sh installs redis-server for the rate_limit tests"
        );
        eprintln!(
            "SKIP rate_limit cluster test: {REDIS} is not installed (scripts/deps.sh installs it)"
        );
        false
    }

    pub fn start(port: u16) -> RedisServer {
        RedisServer::start_with(port, &[])
    }

    /// A redis-server on `port` with more arguments. With `--tls-port`, pass `port` there and
    /// `--port 0` in `extra` (later arguments win).
    pub fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        let mut r = RedisServer {
            child: None,
            port,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.restart();
        r
    }

    pub fn restart(&mut self) {
        let child = Command::new(REDIS)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let to = addr(self.port);
        wait_until("redis-server to accept", Duration::from_secs(10), || {
            TcpStream::connect_timeout(&to, Duration::from_millis(200)).is_ok()
        });
    }

    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "kill {sig} redis-server");
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Start a peer that prints `listening HOST:PORT` on its first stdout line once bound (the
/// project's `mllp-responder`, the hl7apy backend), its stderr going to `stderr`, and wait for
/// that line (30 s at most). Panics with the peer's stderr when it does not come.
pub fn spawn_listening(mut cmd: Command, what: &str, stderr: &Path) -> (Child, SocketAddr) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    let parsed = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|a| a.parse::<SocketAddr>().ok());
    match parsed {
        Some(addr) => (child, addr),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not start ({line:?}): {}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
        }
    }
}
