//! `caregate demo`: every request the banner prints is run, in order, in one shell (its token
//! variables carry over), and each answers as its `# expect:` says.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate_integration_tests::*;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn every_request_the_demo_prints_answers_as_the_banner_says() {
    let root = repo_root();
    let (public, internal, admin, za, zb) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let dir = TempDir::new("demo-tour");
    let state = dir.0.join("state");
    // The shipped demo config, on free ports, with its relative folders made absolute.
    let text = std::fs::read_to_string(root.join("conf/demo.yaml"))
        .unwrap()
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{public}"))
        .replace("127.0.0.1:8081", &format!("127.0.0.1:{internal}"))
        .replace("127.0.0.1:9901", &format!("127.0.0.1:{admin}"))
        .replace("127.0.0.1:8101", &format!("127.0.0.1:{za}"))
        .replace("127.0.0.1:8102", &format!("127.0.0.1:{zb}"))
        .replace(
            "data_dir: demo/data",
            &format!("data_dir: {}", root.join("conf/demo/data").display()),
        )
        .replace(
            "redoc_dir: ../portal/",
            &format!("redoc_dir: {}/", root.join("portal").display()),
        );
    let cfg = dir.0.join("demo.yaml");
    std::fs::write(&cfg, text).unwrap();
    let mut demo = Proc::spawn(
        &[
            "demo",
            "-c",
            cfg.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
        "demo-proc",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = try_request(addr(admin), "GET", "/readyz", &[], b"") {
            if r.status == 200 && demo.log().contains("Stop with Ctrl-C.") {
                break;
            }
        }
        if let Ok(Some(st)) = demo.child.try_wait() {
            panic!("demo exited ({st}); log:\n{}", demo.log());
        }
        assert!(Instant::now() < deadline, "demo not ready:\n{}", demo.log());
        std::thread::sleep(Duration::from_millis(25));
    }
    for port in [public, internal] {
        wait_until("demo listener", Duration::from_secs(20), || {
            std::net::TcpStream::connect(addr(port)).is_ok()
        });
    }

    // The banner's lines: commands and assignments, each command with what it answers.
    let log = demo.log();
    let start = log.find("caregate demo:").expect("banner");
    let end = log[start..].find("Stop with Ctrl-C.").unwrap() + start;
    let mut script = String::from("set -u\n");
    let mut expects = Vec::new();
    for line in log[start..end].lines() {
        let Some(l) = line.strip_prefix("  ") else {
            continue;
        };
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        match l.split_once("   # expect: ") {
            Some((cmd, expect)) => {
                let i = expects.len();
                script.push_str(&format!(
                    "echo '@@begin {i}'\n{{ {cmd} ; }} 2>&1\necho '@@end {i}'\n"
                ));
                expects.push((cmd.to_string(), expect.to_string()));
            }
            None => script.push_str(&format!("{l}\n")),
        }
    }
    assert!(
        expects.len() >= 18,
        "expected the whole tour, found {} checks:\n{}",
        expects.len(),
        &log[start..end]
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&root)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut failures = Vec::new();
    for (i, (cmd, expect)) in expects.iter().enumerate() {
        let b = format!("@@begin {i}\n");
        let e = format!("@@end {i}\n");
        let got = match (out.find(&b), out.find(&e)) {
            (Some(x), Some(y)) if y >= x + b.len() => &out[x + b.len()..y],
            _ => "<no output>",
        };
        if !got.contains(expect.as_str()) {
            failures.push(format!(
                "{cmd}\n  expected: {expect}\n  got: {}",
                got.chars().take(400).collect::<String>()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} banner requests did not answer as the banner says:\n{}",
        failures.len(),
        expects.len(),
        failures.join("\n")
    );
    demo.kill();
}
