//! The sink: group commit, back-pressure, failures and recovery, rotation, restart.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use caregate_audit::{
    anchor_path, chain_files, verify, verify_files, AnchorCheck, AuditConfig, AuditError,
    AuditSink, FsyncPolicy, VerifyErrorKind,
};
use common::*;

fn request_ids(path: &std::path::Path) -> Vec<String> {
    lines(path)
        .iter()
        .filter_map(|l| json(l)["record"]["request_id"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn config_is_strict_and_checks_the_key() {
    let yaml_ok = serde_json::json!({ "path": "/tmp/a.jsonl", "hmac_key": KEY, "fsync": "batch" });
    let cfg: AuditConfig = serde_json::from_value(yaml_ok).unwrap();
    assert_eq!(cfg.fsync, FsyncPolicy::Batch);
    assert_eq!(cfg.batch_max_delay_ms, 5);
    assert_eq!(cfg.queue_capacity, 10_000);
    assert_eq!(cfg.checkpoint_every_records, 1000);
    assert_eq!(cfg.checkpoint_interval_ms, 1000);
    assert_eq!(cfg.rotate_bytes, 256 * 1024 * 1024);
    assert_eq!(
        cfg.retain_files, None,
        "nothing is deleted unless archived first"
    );
    assert_eq!(cfg.archive_dir, None);
    let unknown = serde_json::json!({ "path": "/tmp/a", "hmac_key": KEY, "fsynk": "always" });
    let e = serde_json::from_value::<AuditConfig>(unknown).unwrap_err();
    assert!(e.to_string().contains("unknown field"), "{e}");
    let fmt =
        serde_json::json!({ "path": "/tmp/a", "hmac_key": KEY, "format": "fhir_audit_event" });
    assert!(serde_json::from_value::<AuditConfig>(fmt).is_ok());

    let dir = TempDir::new("short-key");
    let short = AuditConfig::new(dir.path().join("a.jsonl"), "too-short");
    let e = AuditSink::start(&short).unwrap_err();
    assert!(e.contains("audit.hmac_key"), "{e}");
    assert!(
        !format!("{short:?}").contains("too-short"),
        "the key is redacted"
    );
}

/// With `fsync: always`, records nobody waits for (completions, denials) wait for company:
/// they share the next durable record's write and fsync, and alone are written within
/// `batch_max_delay_ms`.
#[test]
fn records_nobody_waits_for_ride_along_with_the_next_durable_one() {
    let dir = TempDir::new("ride-along");
    let path = dir.path().join("audit.jsonl");
    let mut cfg = config(&path);
    cfg.fsync = FsyncPolicy::Always;
    cfg.batch_max_delay_ms = 10_000;
    let sink = AuditSink::start(&cfg).unwrap();
    let rt = runtime();
    let before = sink.group_commits();
    for i in 0..3 {
        sink.append(record(i)).unwrap();
    }
    assert_eq!(rt.block_on(sink.append_durable(record(3))).unwrap(), 4);
    assert_eq!(sink.records_written(), 4);
    assert_eq!(
        sink.group_commits() - before,
        1,
        "three completions and one access record in one commit"
    );
    sink.shutdown();

    // Alone, a record nobody waits for is written after the delay, not never.
    let path = dir.path().join("alone.jsonl");
    let mut cfg = config(&path);
    cfg.batch_max_delay_ms = 50;
    let sink = AuditSink::start(&cfg).unwrap();
    sink.append(record(7)).unwrap();
    let t = std::time::Instant::now();
    while sink.records_written() < 1 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "never written"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(!lines(&path).is_empty());
    sink.shutdown();
}

#[test]
fn group_commit_wakes_every_waiter() {
    let dir = TempDir::new("group");
    let path = dir.path().join("audit.jsonl");
    let mut cfg = config(&path);
    cfg.fsync = FsyncPolicy::Batch;
    cfg.batch_max_delay_ms = 200;
    let sink = AuditSink::start(&cfg).unwrap();
    let rt = runtime();
    let seqs: Vec<u64> = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..64 {
            let sink = sink.clone();
            tasks.push(tokio::spawn(
                async move { sink.append_durable(record(i)).await },
            ));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap().unwrap());
        }
        seqs
    });
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), 64, "every waiter got its own seq");
    assert_eq!(sink.records_written(), 64);
    assert!(
        sink.group_commits() <= 4,
        "64 waiters in {} commits",
        sink.group_commits()
    );
    assert_eq!(sink.queue_depth(), 0);
    // Each waiter's seq is the line that holds its record.
    let l = lines(&path);
    for (i, seq) in seqs.iter().enumerate() {
        let v = json(&l[*seq as usize - 1]);
        assert_eq!(v["seq"], *seq);
        assert_eq!(v["record"]["request_id"], format!("req-{i:04}"));
    }
    sink.shutdown();
    verify(&path, KEY.as_bytes()).unwrap();
}

#[test]
fn fsync_always_commits_concurrent_waiters_together() {
    let dir = TempDir::new("always");
    let path = dir.path().join("audit.jsonl");
    let sink = AuditSink::start(&config(&path)).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..200 {
            let sink = sink.clone();
            tasks.push(tokio::spawn(
                async move { sink.append_durable(record(i)).await },
            ));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    });
    assert_eq!(sink.records_written(), 200);
    assert!(sink.group_commits() <= 200);
    sink.shutdown();
    let r = verify(&path, KEY.as_bytes()).unwrap();
    assert_eq!(r.records, 200);
}

#[test]
fn completion_records_do_not_wait_and_are_flushed_at_shutdown() {
    let dir = TempDir::new("append");
    let path = dir.path().join("audit.jsonl");
    let sink = AuditSink::start(&config(&path)).unwrap();
    for i in 0..50 {
        sink.append(record(i)).unwrap();
    }
    sink.shutdown();
    assert_eq!(sink.records_written(), 50);
    assert_eq!(request_ids(&path).len(), 50);
    assert_eq!(sink.append(record(99)), Err(AuditError::Closed));
    let rt = runtime();
    assert_eq!(
        rt.block_on(sink.append_durable(record(99))),
        Err(AuditError::Closed)
    );
    assert!(!sink.healthy());
    sink.shutdown(); // idempotent
}

#[test]
fn time_is_filled_in_when_empty() {
    let dir = TempDir::new("time");
    let path = dir.path().join("audit.jsonl");
    let sink = AuditSink::start(&config(&path)).unwrap();
    sink.append(record(1)).unwrap();
    let mut with_time = record(2);
    with_time.time = "2024-05-01T12:00:00.123Z".into();
    sink.append(with_time).unwrap();
    sink.shutdown();
    let l = lines(&path);
    let t = json(&l[0])["record"]["time"].as_str().unwrap().to_string();
    assert_eq!(t.len(), 24, "{t}");
    assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T' && t.as_bytes()[19] == b'.');
    assert_eq!(json(&l[1])["record"]["time"], "2024-05-01T12:00:00.123Z");
}

#[test]
fn checkpoints_by_count_and_by_interval() {
    let dir = TempDir::new("cp");
    let path = dir.path().join("audit.jsonl");
    let mut cfg = config(&path);
    cfg.checkpoint_every_records = 3;
    cfg.checkpoint_interval_ms = 100;
    let sink = AuditSink::start(&cfg).unwrap();
    let rt = runtime();
    for i in 0..4 {
        rt.block_on(sink.append_durable(record(i))).unwrap();
    }
    // 3 records + checkpoint + 1 record; the interval seals the last one.
    assert!(wait_until(Duration::from_secs(5), || {
        verify(&path, KEY.as_bytes()).is_ok_and(|r| r.anchor == AnchorCheck::Matched { seq: 6 })
    }));
    let r = verify(&path, KEY.as_bytes()).unwrap();
    assert_eq!(r.lines, 6);
    assert_eq!(r.checkpoints, 2);
    assert_eq!(r.unsealed_records, 0);
    // Nothing new: no more checkpoints.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lines(&path).len(), 6);
    sink.shutdown();
    assert_eq!(lines(&path).len(), 6, "already sealed: no extra checkpoint");
}

#[test]
fn queue_full_is_refused_and_unhealthy() {
    let dir = TempDir::new("full");
    let logdir = dir.path().join("logs");
    let path = logdir.join("audit.jsonl");
    let mut cfg = config(&path);
    cfg.queue_capacity = 3;
    let sink = AuditSink::start(&cfg).unwrap();
    let rt = runtime();
    rt.block_on(sink.append_durable(record(0))).unwrap();
    // Take the directory away: nothing can be written, so nothing leaves the queue.
    std::fs::rename(&logdir, dir.path().join("logs.moved")).unwrap();
    for i in 1..=3 {
        sink.append(record(i)).unwrap();
    }
    assert_eq!(sink.queue_depth(), 3);
    assert_eq!(sink.append(record(4)), Err(AuditError::QueueFull));
    assert_eq!(
        rt.block_on(sink.append_durable(record(5))),
        Err(AuditError::QueueFull)
    );
    assert!(!sink.healthy());
    // Put a directory back: the kept records are retried (backoff) and written.
    std::fs::create_dir(&logdir).unwrap();
    assert!(wait_until(Duration::from_secs(10), || sink.queue_depth() == 0));
    assert!(wait_until(Duration::from_secs(2), || sink.healthy()));
    sink.shutdown();
    assert_eq!(request_ids(&path), ["req-0001", "req-0002", "req-0003"]);
}

#[test]
fn a_failing_sink_fails_waiters_then_recovers_without_losing_records() {
    let dir = TempDir::new("fail");
    let logdir = dir.path().join("logs");
    let moved = dir.path().join("logs.old");
    let path = logdir.join("audit.jsonl");
    let sink = AuditSink::start(&config(&path)).unwrap();
    let rt = runtime();
    for i in 0..3 {
        assert_eq!(rt.block_on(sink.append_durable(record(i))).unwrap(), i + 1);
    }
    assert!(sink.healthy());

    // The directory is replaced by a plain file: reopening the path fails (ENOTDIR).
    std::fs::rename(&logdir, &moved).unwrap();
    std::fs::write(&logdir, b"not a directory").unwrap();
    assert_eq!(
        rt.block_on(sink.append_durable(record(3))),
        Err(AuditError::SinkFailed)
    );
    assert!(!sink.healthy());
    sink.append(record(4)).unwrap();
    assert_eq!(
        rt.block_on(sink.append_durable(record(5))),
        Err(AuditError::SinkFailed)
    );
    assert!(!sink.healthy());
    assert_eq!(sink.queue_depth(), 3, "failed records are kept");

    // Repair: the next group commit reopens, continues the chain and writes the kept records
    // first.
    std::fs::remove_file(&logdir).unwrap();
    std::fs::create_dir(&logdir).unwrap();
    let seq = rt.block_on(sink.append_durable(record(6))).unwrap();
    assert!(sink.healthy());
    assert_eq!(sink.queue_depth(), 0);
    sink.shutdown();

    let old = moved.join("audit.jsonl");
    assert_eq!(request_ids(&old), ["req-0000", "req-0001", "req-0002"]);
    assert_eq!(
        request_ids(&path),
        ["req-0003", "req-0004", "req-0005", "req-0006"],
        "no record lost, order kept"
    );
    // The new file continues the chain: opening checkpoint seq 4, records 5..8.
    let new_lines = lines(&path);
    assert_eq!(json(&new_lines[0])["checkpoint"]["records"], 3);
    assert_eq!(seq, 8);
    let r_old = verify(&old, KEY.as_bytes()).unwrap();
    let r_new = verify(&path, KEY.as_bytes()).unwrap();
    assert!(r_new.continuation);
    assert_eq!(r_new.first_seq, Some(4));
    assert_eq!(r_new.first_prev, r_old.last_mac);
    assert_eq!(r_new.anchor, AnchorCheck::Matched { seq: 9 });
    verify_files(&[old, path], KEY.as_bytes()).unwrap();
}

#[test]
fn dev_full_fails_with_sink_failed() {
    let full = std::path::Path::new("/dev/full");
    if !full.exists() {
        return;
    }
    let cfg = config(full);
    let sink = AuditSink::start(&cfg).unwrap();
    let rt = runtime();
    assert_eq!(
        rt.block_on(sink.append_durable(record(1))),
        Err(AuditError::SinkFailed)
    );
    assert!(!sink.healthy());
    assert_eq!(sink.queue_depth(), 1);
    assert_eq!(sink.records_written(), 0);
    sink.shutdown(); // gives up after a few attempts, logs the loss
    assert_eq!(sink.queue_depth(), 0);
    assert!(!anchor_path(full).exists());
}

#[test]
fn a_file_removed_while_open_is_reopened_and_continues_the_chain() {
    let dir = TempDir::new("removed");
    let path = dir.path().join("audit.jsonl");
    let sink = AuditSink::start(&config(&path)).unwrap();
    let rt = runtime();
    for i in 0..3 {
        rt.block_on(sink.append_durable(record(i))).unwrap();
    }
    let kept = dir.path().join("kept.jsonl");
    std::fs::rename(&path, &kept).unwrap();
    assert_eq!(rt.block_on(sink.append_durable(record(3))).unwrap(), 5);
    assert!(sink.healthy());
    sink.shutdown();
    assert_eq!(request_ids(&kept), ["req-0000", "req-0001", "req-0002"]);
    assert_eq!(request_ids(&path), ["req-0003"]);
    let r = verify(&path, KEY.as_bytes()).unwrap();
    assert!(r.continuation);
    verify_files(&[kept, path], KEY.as_bytes()).unwrap();
}

#[test]
fn a_foreign_file_at_the_path_is_refused() {
    let dir = TempDir::new("foreign");
    let path = dir.path().join("audit.jsonl");
    let sink = AuditSink::start(&config(&path)).unwrap();
    let rt = runtime();
    rt.block_on(sink.append_durable(record(0))).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"someone else's data\n").unwrap();
    assert_eq!(
        rt.block_on(sink.append_durable(record(1))),
        Err(AuditError::SinkFailed)
    );
    assert!(!sink.healthy());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"someone else's data\n",
        "not touched"
    );
    // Moving it aside lets the sink continue.
    std::fs::rename(&path, dir.path().join("aside")).unwrap();
    rt.block_on(sink.append_durable(record(2))).unwrap();
    assert!(sink.healthy());
    sink.shutdown();
    assert_eq!(request_ids(&path), ["req-0001", "req-0002"]);
}

#[test]
fn rotation_continues_the_chain_and_keeps_retain_files() {
    let dir = TempDir::new("rotate");
    let path = dir.path().join("audit.jsonl");
    let mut cfg = config(&path);
    cfg.rotate_bytes = 4000;
    cfg.retain_files = Some(3);
    cfg.archive_dir = Some(dir.path().join("archive"));
    cfg.checkpoint_every_records = 4;
    let sink = AuditSink::start(&cfg).unwrap();
    let rt = runtime();
    let mut last = 0;
    for i in 0..40 {
        let seq = rt.block_on(sink.append_durable(record(i))).unwrap();
        assert!(seq > last);
        last = seq;
    }
    sink.shutdown();

    let files = chain_files(&path);
    assert_eq!(
        files.len(),
        4,
        "3 rotated files kept + the active one: {files:?}"
    );
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names[3], "audit.jsonl");
    let reports = verify_files(&files, KEY.as_bytes()).unwrap();
    for (f, r) in files.iter().zip(&reports) {
        assert!(
            r.continuation,
            "{f:?}: the oldest were pruned, so all continue"
        );
        assert_eq!(r.unsealed_records, 0, "{f:?} is sealed");
        assert!(
            matches!(r.anchor, AnchorCheck::Matched { .. }),
            "{f:?}: {:?}",
            r.anchor
        );
        assert_eq!(lines(f).len() as u64, r.lines);
    }
    // Every rotated file starts with a checkpoint (continuation) and ends with one (seal).
    for f in &files[..3] {
        let l = lines(f);
        assert!(json(&l[0])["checkpoint"].is_object());
        assert!(json(l.last().unwrap())["checkpoint"].is_object());
        assert!(std::fs::metadata(f).unwrap().len() >= 4000);
    }
    // seq continues from file to file; the last record is in the active file.
    assert!(request_ids(&path).contains(&"req-0039".to_string()));
    // Pruned files took their anchors with them.
    let anchors = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".anchor")
        })
        .count();
    assert_eq!(anchors, 4);
    // Removing a middle rotated file breaks the sequence of files.
    let e = verify_files(&[files[0].clone(), files[2].clone()], KEY.as_bytes()).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::SeqGap);
    assert_eq!(e.line, Some(1));
}

#[test]
fn restart_resumes_the_chain() {
    let dir = TempDir::new("restart");
    let path = dir.path().join("audit.jsonl");
    let cfg = config(&path);
    let rt = runtime();
    for round in 0..3u64 {
        let sink = AuditSink::start(&cfg).unwrap();
        for i in 0..3 {
            rt.block_on(sink.append_durable(record(round * 10 + i)))
                .unwrap();
        }
        sink.shutdown();
    }
    let r = verify(&path, KEY.as_bytes()).unwrap();
    assert_eq!(r.records, 9);
    assert_eq!(r.checkpoints, 3);
    assert_eq!(r.last_checkpoint, Some((12, 9)));
    assert_eq!(r.anchor, AnchorCheck::Matched { seq: 12 });
}

#[test]
fn restart_without_shutdown_counts_the_unsealed_records() {
    let dir = TempDir::new("crash");
    let path = dir.path().join("audit.jsonl");
    let cfg = config(&path);
    let rt = runtime();
    {
        let sink = AuditSink::start(&cfg).unwrap();
        rt.block_on(sink.append_durable(record(0))).unwrap();
        sink.shutdown(); // sealed: seq 2 checkpoint, records 1
    }
    // Simulate a crash: two records after the checkpoint and a torn third line.
    let before = lines(&path);
    {
        let sink = AuditSink::start(&cfg).unwrap();
        rt.block_on(sink.append_durable(record(1))).unwrap();
        rt.block_on(sink.append_durable(record(2))).unwrap();
        let l = lines(&path);
        assert_eq!(l.len(), 4);
        // keep the two unsealed records, drop the seal that shutdown will write
        sink.shutdown();
        let mut l = lines(&path);
        l.truncate(4);
        write_lines(&path, &l);
        std::fs::remove_file(anchor_path(&path)).unwrap();
    }
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"{\"seq\":5,\"prev\":\"abc");
    std::fs::write(&path, &bytes).unwrap();

    let sink = AuditSink::start(&cfg).unwrap();
    assert_eq!(rt.block_on(sink.append_durable(record(3))).unwrap(), 5);
    sink.shutdown();
    let r = verify(&path, KEY.as_bytes()).unwrap();
    assert_eq!(r.records, 4);
    assert_eq!(r.last_checkpoint, Some((6, 4)));
    assert!(lines(&path).starts_with(&before));
}

#[test]
fn start_refuses_a_tampered_tail_or_another_key() {
    let dir = TempDir::new("refuse");
    let path = dir.path().join("audit.jsonl");
    let cfg = config(&path);
    let rt = runtime();
    let sink = AuditSink::start(&cfg).unwrap();
    rt.block_on(sink.append_durable(record(0))).unwrap();
    sink.shutdown();

    let mut other = cfg.clone();
    other.hmac_key = "another-key-0123456789-0123456789-01".into();
    let e = AuditSink::start(&other).unwrap_err();
    assert!(e.contains("fails verification"), "{e}");

    let mut l = lines(&path);
    l[0] = l[0].replacen("req-0000", "req-9999", 1);
    write_lines(&path, &l);
    let e = AuditSink::start(&cfg).unwrap_err();
    assert!(e.contains("fails verification"), "{e}");
}

#[test]
fn start_refuses_a_file_cut_before_its_anchor() {
    let dir = TempDir::new("refuse-cut");
    let path = dir.path().join("audit.jsonl");
    let mut cfg = config(&path);
    cfg.checkpoint_every_records = 2;
    let rt = runtime();
    let sink = AuditSink::start(&cfg).unwrap();
    for i in 0..4 {
        rt.block_on(sink.append_durable(record(i))).unwrap();
    }
    sink.shutdown();
    let l = lines(&path);
    write_lines(&path, &l[..3]); // up to the first checkpoint
    let e = AuditSink::start(&cfg).unwrap_err();
    assert!(e.contains("anchor names checkpoint seq 6"), "{e}");
    // A deleted file with its anchor left behind is refused as well.
    std::fs::remove_file(&path).unwrap();
    assert!(AuditSink::start(&cfg).is_err());
    // Moving the anchor aside is the operator's way to start anyway.
    std::fs::rename(anchor_path(&path), dir.path().join("old.anchor")).unwrap();
    let sink = AuditSink::start(&cfg).unwrap();
    assert_eq!(rt.block_on(sink.append_durable(record(9))).unwrap(), 1);
    sink.shutdown();
}

#[test]
fn an_empty_active_file_continues_the_newest_rotated_file() {
    let dir = TempDir::new("after-rotate");
    let path = dir.path().join("audit.jsonl");
    let cfg = config(&path);
    let rt = runtime();
    let sink = AuditSink::start(&cfg).unwrap();
    for i in 0..3 {
        rt.block_on(sink.append_durable(record(i))).unwrap();
    }
    sink.shutdown();
    // As if the gateway stopped right after renaming the file during rotation.
    let rotated = dir.path().join("audit.jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    std::fs::copy(anchor_path(&path), anchor_path(&rotated)).unwrap();
    let sink = AuditSink::start(&cfg).unwrap();
    // The opening checkpoint is written at once.
    assert!(wait_until(Duration::from_secs(5), || path.exists()
        && !lines(&path).is_empty()));
    assert_eq!(rt.block_on(sink.append_durable(record(3))).unwrap(), 6);
    sink.shutdown();
    let reports = verify_files(&chain_files(&path), KEY.as_bytes()).unwrap();
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[1].last_checkpoint, Some((7, 4)));
}

#[test]
fn sink_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<AuditSink>();
    assert_send_sync::<Arc<AuditSink>>();
}

#[test]
fn bytes_beyond_the_last_commit_are_cut_back_before_writing() {
    // What a torn write (ENOSPC halfway) leaves behind, simulated by appending to the file.
    let dir = TempDir::new("torn");
    let path = dir.path().join("audit.jsonl");
    let sink = AuditSink::start(&config(&path)).unwrap();
    let rt = runtime();
    rt.block_on(sink.append_durable(record(0))).unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"seq\":2,\"prev\":\"0123").unwrap();
    }
    assert_eq!(rt.block_on(sink.append_durable(record(1))).unwrap(), 2);
    sink.shutdown();
    let r = verify(&path, KEY.as_bytes()).unwrap();
    assert_eq!(r.records, 2);
    assert!(!r.continuation);
}
