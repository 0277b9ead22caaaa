//! Keys and retention: key rotation mid-trail, off-host checkpoint copies, archiving before
//! deletion, and the configuration rules that go with them.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use caregate_audit::{
    chain_files, find_trails, verify_checkpoints, verify_files, verify_files_keys, AuditConfig,
    AuditKeys, AuditSink, OffHostCheckpoints, PreviousKey, VerifyErrorKind,
};
use common::*;

const KEY2: &str = "second-key-abcdefghij-0123456789-rotated";

fn durable(rt: &tokio::runtime::Runtime, sink: &AuditSink, i: u64) -> u64 {
    rt.block_on(sink.append_durable(record(i))).unwrap()
}

fn rotated_config(path: &Path) -> AuditConfig {
    let mut cfg = config(path);
    cfg.hmac_key = KEY2.into();
    cfg.key_id = Some("k2".into());
    cfg.previous_keys = vec![PreviousKey {
        id: "k1".into(),
        key: KEY.into(),
    }];
    cfg
}

fn both() -> AuditKeys {
    let mut k = AuditKeys::new();
    k.add(Some("k1"), KEY);
    k.add(Some("k2"), KEY2);
    k
}

#[test]
fn a_key_rotation_mid_trail_verifies_with_both_keys_and_fails_with_either_alone() {
    let dir = TempDir::new("key-rotation");
    let path = dir.path().join("audit.jsonl");
    let rt = runtime();
    // Written with the first key, without a key id (as before key ids existed).
    let mut cfg = config(&path);
    cfg.rotate_bytes = 3000;
    cfg.checkpoint_every_records = 4;
    let a = AuditSink::start(&cfg).unwrap();
    for i in 0..12 {
        durable(&rt, &a, i);
    }
    a.shutdown();
    assert!(
        chain_files(&path).len() > 1,
        "rotated before the key change"
    );
    // Restart with the new key; the old one stays listed for resuming.
    let mut cfg2 = rotated_config(&path);
    cfg2.rotate_bytes = 3000;
    cfg2.checkpoint_every_records = 4;
    let b = AuditSink::start(&cfg2).unwrap();
    for i in 12..30 {
        durable(&rt, &b, i);
    }
    b.shutdown();

    let files = chain_files(&path);
    let reports = verify_files_keys(&files, &both()).unwrap();
    let named: Vec<Vec<String>> = reports.iter().map(|r| r.key_ids.clone()).collect();
    assert!(
        named.iter().any(|k| k.iter().any(|id| id == "k2")),
        "{named:?}"
    );
    assert!(
        named[0].is_empty(),
        "the first segment names no key: {named:?}"
    );
    // The switch: the first line written with the new key is a checkpoint naming it.
    let all: Vec<String> = files.iter().flat_map(|f| lines(f)).collect();
    let first_k2 = all
        .iter()
        .position(|l| json(l)["checkpoint"]["key"] == "k2")
        .unwrap();
    assert!(json(&all[first_k2 - 1])["checkpoint"].is_object() || first_k2 > 0);
    // Keys given by id or without ids, in any order: the same.
    let mut unnamed = AuditKeys::new();
    unnamed.add(None, KEY2);
    unnamed.add(None, KEY);
    verify_files_keys(&files, &unnamed).unwrap();
    let ids: Vec<String> = all
        .iter()
        .filter_map(|l| json(l)["record"]["request_id"].as_str().map(String::from))
        .collect();
    assert_eq!(ids.len(), 30);

    // Either key alone fails.
    let e = verify_files(&files, KEY.as_bytes()).unwrap_err();
    assert!(
        matches!(
            e.kind,
            VerifyErrorKind::MacMismatch | VerifyErrorKind::UnknownKey
        ),
        "{e}"
    );
    let e = verify_files(&files, KEY2.as_bytes()).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::MacMismatch, "{e}");
    let mut only_k1 = AuditKeys::new();
    only_k1.add(Some("k1"), KEY);
    let e = verify_files_keys(&files, &only_k1).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::UnknownKey, "{e}");
    assert!(e.to_string().contains("\"k2\""), "{e}");

    // A restart with the new key only (the old one dropped from the config) still resumes:
    // the tail is the new key's.
    let mut cfg3 = config(&path);
    cfg3.hmac_key = KEY2.into();
    cfg3.key_id = Some("k2".into());
    let c = AuditSink::start(&cfg3).unwrap();
    durable(&rt, &c, 30);
    c.shutdown();
    verify_files_keys(&chain_files(&path), &both()).unwrap();
}

#[test]
fn a_writer_refuses_a_tail_of_a_key_it_does_not_know() {
    let dir = TempDir::new("key-unknown");
    let path = dir.path().join("audit.jsonl");
    let rt = runtime();
    let a = AuditSink::start(&config(&path)).unwrap();
    durable(&rt, &a, 0);
    a.shutdown();
    let mut cfg = config(&path);
    cfg.hmac_key = KEY2.into();
    cfg.key_id = Some("k2".into());
    let e = AuditSink::start(&cfg).unwrap_err();
    assert!(e.contains("previous_keys"), "{e}");
    assert!(!e.contains(KEY2) && !e.contains(KEY), "{e}");
}

#[test]
fn a_key_rotation_at_a_hand_over_verifies_with_both_keys() {
    let dir = TempDir::new("key-handover");
    let path = dir.path().join("audit.jsonl");
    let rt = runtime();
    let mut cfg1 = config(&path);
    cfg1.key_id = Some("k1".into());
    let a = AuditSink::start(&cfg1).unwrap();
    durable(&rt, &a, 0);
    a.hand_over().unwrap();
    let b = AuditSink::start_takeover(&rotated_config(&path)).unwrap();
    durable(&rt, &b, 1);
    durable(&rt, &a, 2); // a late record of the old process, with the old key
    a.shutdown();
    durable(&rt, &b, 3);
    b.shutdown();
    let files = chain_files(&path);
    let reports = verify_files_keys(&files, &both()).unwrap();
    assert_eq!(reports[0].key_ids, ["k1"]);
    assert_eq!(reports[1].key_ids, ["k1", "k2"], "continued, then switched");
    assert!(verify_files(&files, KEY.as_bytes()).is_err());
    assert!(verify_files(&files, KEY2.as_bytes()).is_err());
}

fn offhost(dir: &Path) -> OffHostCheckpoints {
    OffHostCheckpoints {
        path: dir.join("offhost").join("checkpoints.jsonl"),
        url: None,
        timeout_ms: 2000,
    }
}

#[test]
fn off_host_checkpoints_detect_a_rewritten_trail() {
    let dir = TempDir::new("offhost");
    let trail_dir = dir.path().join("trail");
    let path = trail_dir.join("audit.jsonl");
    let rt = runtime();
    let mut cfg = config(&path);
    cfg.checkpoint_every_records = 3;
    cfg.rotate_bytes = 3000;
    cfg.offhost_checkpoints = Some(offhost(dir.path()));
    let copies = offhost(dir.path()).path;
    let sink = AuditSink::start(&cfg).unwrap();
    for i in 0..10 {
        durable(&rt, &sink, i);
    }
    sink.shutdown();
    let n_copies = lines(&copies).len() as u64;
    assert!(n_copies >= 3, "{n_copies}");
    assert_eq!(sink.checkpoints_exported(), n_copies);
    assert_eq!(sink.checkpoint_export_failures(), 0);
    for l in lines(&copies) {
        assert!(json(&l)["checkpoint"].is_object(), "{l}");
    }
    let keys = AuditKeys::single(KEY);
    let (_, found) = verify_checkpoints(&chain_files(&path), &keys, &copies).unwrap();
    assert_eq!(found.matched, n_copies);

    // Someone with the key rewrites the whole local trail: altered records, re-chained from
    // scratch, new anchors. It verifies on its own...
    std::fs::remove_dir_all(&trail_dir).unwrap();
    let mut forged = config(&path);
    forged.checkpoint_every_records = 3;
    forged.rotate_bytes = 3000;
    let f = AuditSink::start(&forged).unwrap();
    for i in 0..10 {
        let mut r = record(i);
        if i == 4 {
            r.actor.subject = Some("someone-else".into());
        }
        rt.block_on(f.append_durable(r)).unwrap();
    }
    f.shutdown();
    verify_files(&chain_files(&path), KEY.as_bytes()).unwrap();
    // ...but not against the off-host copies.
    let e = verify_checkpoints(&chain_files(&path), &keys, &copies).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::CheckpointCopyMismatch, "{e}");
    assert!(e.to_string().contains("rewritten"), "{e}");
    assert_eq!(e.file, copies);

    // A trail cut back (its newest part removed with its anchors) fails too.
    std::fs::remove_dir_all(&trail_dir).unwrap();
    let short = AuditSink::start(&forged).unwrap();
    durable(&rt, &short, 0);
    short.shutdown();
    let e = verify_checkpoints(&chain_files(&path), &keys, &copies).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::CheckpointCopyMismatch, "{e}");
}

/// A one-thread HTTP server answering `status` to every request; counts the bodies that
/// look like checkpoint lines.
fn http_server(status: u16) -> (String, Arc<AtomicU64>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/checkpoints", listener.local_addr().unwrap());
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then Content-Length bytes of body.
            while let Ok(n) = c.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(h) = text.find("\r\n\r\n") {
                    let len = text[..h]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= h + 4 + len {
                        if text[h + 4..].contains("\"checkpoint\"") {
                            s.fetch_add(1, Ordering::AcqRel);
                        }
                        break;
                    }
                }
            }
            let _ = write!(
                c,
                "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    (url, seen)
}

#[test]
fn checkpoints_are_posted_and_failures_are_counted_without_blocking() {
    let dir = TempDir::new("offhost-http");
    let rt = runtime();
    let (url, seen) = http_server(200);
    let path = dir.path().join("a").join("audit.jsonl");
    let mut cfg = config(&path);
    cfg.checkpoint_every_records = 2;
    cfg.offhost_checkpoints = Some(OffHostCheckpoints {
        url: Some(url),
        ..offhost(dir.path())
    });
    let sink = AuditSink::start(&cfg).unwrap();
    for i in 0..6 {
        durable(&rt, &sink, i);
    }
    sink.shutdown();
    assert_eq!(seen.load(Ordering::Acquire), 3);
    assert_eq!(sink.checkpoint_export_failures(), 0);

    // An endpoint that fails: counted, and the trail is written as ever.
    let (bad, _) = http_server(503);
    let path = dir.path().join("b").join("audit.jsonl");
    let mut cfg = config(&path);
    cfg.checkpoint_every_records = 2;
    cfg.offhost_checkpoints = Some(OffHostCheckpoints {
        path: dir.path().join("offhost-b").join("cp.jsonl"),
        url: Some(bad),
        timeout_ms: 500,
    });
    let sink = AuditSink::start(&cfg).unwrap();
    for i in 0..6 {
        durable(&rt, &sink, i);
    }
    assert!(sink.healthy());
    sink.shutdown();
    assert_eq!(sink.checkpoint_export_failures(), 3);
    assert_eq!(sink.checkpoints_exported(), 3, "the file copies still made");
    verify_files(&chain_files(&path), KEY.as_bytes()).unwrap();
}

fn rotated(path: &Path, n: u64) -> PathBuf {
    PathBuf::from(format!("{}.{n}", path.display()))
}

#[test]
fn rotated_files_are_archived_before_deletion_and_the_archive_verifies() {
    let dir = TempDir::new("archive");
    let path = dir.path().join("trail").join("audit.jsonl");
    let archive = dir.path().join("archive");
    let rt = runtime();
    let mut cfg = config(&path);
    cfg.rotate_bytes = 2500;
    cfg.checkpoint_every_records = 4;
    cfg.retain_files = Some(1);
    cfg.archive_dir = Some(archive.clone());
    let sink = AuditSink::start(&cfg).unwrap();
    let mut highest_seen = 0;
    for i in 0..60 {
        durable(&rt, &sink, i);
        // Whatever was deleted locally is in the archive already.
        let local: Vec<u64> = (1..=200).filter(|n| rotated(&path, *n).exists()).collect();
        if let Some(max) = local.last() {
            highest_seen = highest_seen.max(*max);
        }
        for n in 1..highest_seen {
            if !rotated(&path, n).exists() {
                assert!(
                    archive.join(format!("audit.jsonl.{n}")).exists(),
                    "audit.jsonl.{n} was deleted before it was archived"
                );
            }
        }
    }
    sink.shutdown();
    assert!(highest_seen >= 4, "rotated several times: {highest_seen}");
    let local = chain_files(&path);
    assert_eq!(
        local.len(),
        2,
        "1 rotated file kept + the active one: {local:?}"
    );
    // The archive holds every rotated file with its anchor, from the start of the chain.
    for n in 1..=highest_seen {
        let a = archive.join(format!("audit.jsonl.{n}"));
        assert!(a.exists(), "{a:?}");
        assert!(archive.join(format!("audit.jsonl.{n}.anchor")).exists());
    }
    let found = find_trails(&archive).unwrap();
    assert_eq!(found.trails, [archive.join("audit.jsonl")]);
    let reports = verify_files(&chain_files(&found.trails[0]), KEY.as_bytes()).unwrap();
    assert!(!reports[0].continuation, "the archive starts the chain");
    // The archive plus the active file: the whole trail.
    let mut whole = chain_files(&archive.join("audit.jsonl"));
    whole.push(path.clone());
    verify_files(&whole, KEY.as_bytes()).unwrap();
}

#[test]
fn without_an_archive_nothing_is_deleted() {
    let dir = TempDir::new("no-archive");
    let path = dir.path().join("audit.jsonl");
    let rt = runtime();
    let mut cfg = config(&path);
    cfg.rotate_bytes = 2500;
    let sink = AuditSink::start(&cfg).unwrap();
    for i in 0..40 {
        durable(&rt, &sink, i);
    }
    sink.shutdown();
    let files = chain_files(&path);
    assert!(files.len() > 3);
    let reports = verify_files(&files, KEY.as_bytes()).unwrap();
    assert!(!reports[0].continuation, "nothing was pruned");
}

#[test]
fn an_archive_copy_that_differs_keeps_the_local_file() {
    let dir = TempDir::new("archive-differs");
    let path = dir.path().join("trail").join("audit.jsonl");
    let archive = dir.path().join("archive");
    std::fs::create_dir_all(&archive).unwrap();
    // Write-once storage already holds something else under the name.
    std::fs::write(archive.join("audit.jsonl.1"), "not the same\n").unwrap();
    let rt = runtime();
    let mut cfg = config(&path);
    cfg.rotate_bytes = 2500;
    cfg.retain_files = Some(0);
    cfg.archive_dir = Some(archive.clone());
    let sink = AuditSink::start(&cfg).unwrap();
    for i in 0..40 {
        durable(&rt, &sink, i);
    }
    sink.shutdown();
    assert!(rotated(&path, 1).exists(), "not archived, so not deleted");
    // Pruning stops there: no gap in the local trail.
    verify_files(&chain_files(&path), KEY.as_bytes()).unwrap();
}

#[test]
fn config_rules_for_keys_and_retention() {
    let base = || AuditConfig::new("/var/log/caregate/audit.jsonl", KEY);
    let fails = |c: AuditConfig, field: &str| {
        let e = c.validate().unwrap_err();
        assert!(e.starts_with(field), "{field}: {e}");
        assert!(!e.contains(KEY), "{e}");
    };
    let mut c = base();
    c.retain_files = Some(30);
    fails(c.clone(), "audit.retain_files");
    c.archive_dir = Some("/mnt/archive/caregate".into());
    c.validate().unwrap();
    c.archive_dir = Some("/var/log/caregate".into());
    fails(c, "audit.archive_dir");

    let mut c = base();
    c.previous_keys = vec![PreviousKey {
        id: "k1".into(),
        key: KEY2.into(),
    }];
    fails(c.clone(), "audit.key_id");
    c.key_id = Some("k2".into());
    c.validate().unwrap();
    c.key_id = Some("k1".into());
    fails(c.clone(), "audit.previous_keys[0].id");
    c.key_id = Some("bad id!".into());
    fails(c.clone(), "audit.key_id");
    c.key_id = Some("k2".into());
    c.previous_keys[0].key = "short".into();
    fails(c.clone(), "audit.previous_keys[0].key");
    assert!(!format!("{c:?}").contains("short"), "redacted");

    let mut c = base();
    c.offhost_checkpoints = Some(OffHostCheckpoints {
        path: "/var/log/caregate/cp.jsonl".into(),
        url: None,
        timeout_ms: 2000,
    });
    fails(c.clone(), "audit.offhost_checkpoints.path");
    if let Some(o) = c.offhost_checkpoints.as_mut() {
        o.path = "/mnt/worm/cp.jsonl".into();
        o.url = Some("ftp://x".into());
    }
    fails(c.clone(), "audit.offhost_checkpoints.url");
    if let Some(o) = c.offhost_checkpoints.as_mut() {
        o.url = Some("https://collector.example/cp".into());
        o.timeout_ms = 0;
    }
    fails(c.clone(), "audit.offhost_checkpoints.timeout_ms");

    // From YAML-shaped input: the new keys parse; unknown ones are refused.
    let v = serde_json::json!({
        "path": "/var/log/caregate/audit.jsonl", "hmac_key": KEY2, "key_id": "2025",
        "previous_keys": [{ "id": "2024", "key": KEY }],
        "archive_dir": "/mnt/archive", "retain_files": 3,
        "offhost_checkpoints": { "path": "/mnt/worm/cp.jsonl", "url": "http://c/x" },
    });
    let c: AuditConfig = serde_json::from_value(v).unwrap();
    c.validate().unwrap();
    assert_eq!(c.offhost_checkpoints.unwrap().timeout_ms, 2000);
    let bad = serde_json::json!({ "path": "/a/b", "hmac_key": KEY, "previous_keys": [{ "id": "x", "key": KEY, "extra": 1 }] });
    assert!(serde_json::from_value::<AuditConfig>(bad).is_err());

    // CAREGATE_AUDIT_KEYS.
    let k = AuditKeys::parse_pairs("2024=abc=\n 2025=def").unwrap();
    assert_eq!(k.ids(), ["2024", "2025"]);
    assert!(AuditKeys::parse_pairs("nokey").is_err());
    assert!(AuditKeys::parse_pairs("a=x a=y").is_err());
    assert!(!format!("{k:?}").contains("abc"));
}
