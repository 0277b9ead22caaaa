//! Two processes and one audit trail: the file lock, hand-over and take-over (zero-downtime
//! upgrades and rollbacks), and verification of the segments and their links.
//!
//! Two sinks in one test process stand for two gateway processes: the lock is `flock(2)`,
//! held per open file, so it keeps two sinks of one process apart just as two processes.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use caregate_audit::{
    anchor_path, build_line, chain_files, find_trails, verify, verify_files, AnchorCheck,
    AuditError, AuditSink, SegmentLink, VerifyError, VerifyErrorKind,
};
use common::*;

fn rotated(path: &Path, n: u64) -> PathBuf {
    PathBuf::from(format!("{}.{n}", path.display()))
}

/// Request id -> how many record lines carry it, over `files`.
fn id_counts(files: &[PathBuf]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for f in files {
        for l in lines(f) {
            if let Some(id) = json(&l)["record"]["request_id"].as_str() {
                *out.entry(id.to_string()).or_insert(0) += 1;
            }
        }
    }
    out
}

fn ids(range: impl IntoIterator<Item = u64>) -> Vec<String> {
    range.into_iter().map(|i| format!("req-{i:04}")).collect()
}

/// Every record in `expected` is in the trail exactly once, and nothing else is.
fn assert_each_once(files: &[PathBuf], expected: &[String]) {
    let counts = id_counts(files);
    let mut want: Vec<&String> = expected.iter().collect();
    want.sort();
    let got: Vec<&String> = counts.keys().collect();
    assert_eq!(got, want, "the records in the trail");
    for (id, n) in &counts {
        assert_eq!(*n, 1, "{id} is written {n} times");
    }
}

fn verify_fails(files: &[PathBuf]) -> VerifyError {
    match verify_files(files, KEY.as_bytes()) {
        Ok(r) => panic!("verify passed: {r:#?}"),
        Err(e) => e,
    }
}

fn durable(rt: &tokio::runtime::Runtime, sink: &AuditSink, i: u64) -> u64 {
    rt.block_on(sink.append_durable(record(i))).unwrap()
}

#[test]
fn a_second_writer_on_the_same_file_is_refused() {
    let dir = TempDir::new("lock");
    let path = dir.path().join("audit.jsonl");
    let rt = runtime();
    let a = AuditSink::start(&config(&path)).unwrap();
    durable(&rt, &a, 0);
    let e = AuditSink::start(&config(&path)).unwrap_err();
    assert!(
        e.contains("another running process writes this audit trail"),
        "{e}"
    );
    assert!(e.contains("run --upgrade"), "{e}");
    assert!(!e.contains("req-") && !e.contains(KEY), "{e}");
    // The first one is not disturbed.
    durable(&rt, &a, 1);
    assert!(a.healthy());
    a.shutdown();
    let r = verify(&path, KEY.as_bytes()).unwrap();
    assert_eq!(r.records, 2);
    assert_eq!(r.unsealed_records, 0);

    // It is the file lock that refuses: any holder of it (here a plain handle) keeps a writer
    // out, and once it is released a writer starts.
    let holder = std::fs::File::open(&path).unwrap();
    holder.lock().unwrap();
    let e = AuditSink::start(&config(&path)).unwrap_err();
    assert!(e.contains("another running process"), "{e}");
    holder.unlock().unwrap();
    let b = AuditSink::start(&config(&path)).unwrap();
    durable(&rt, &b, 2);
    b.shutdown();
    let r = verify(&path, KEY.as_bytes()).unwrap();
    assert_eq!(r.records, 3);
}

#[test]
fn hand_over_then_take_over_with_late_records_on_both_sides() {
    let dir = TempDir::new("handover");
    let path = dir.path().join("audit.jsonl");
    let cfg = config(&path);
    let rt = runtime();
    let a = AuditSink::start(&cfg).unwrap();
    for i in 0..5 {
        durable(&rt, &a, i);
    }
    a.hand_over().unwrap();

    // A's file is now <path>.1 and ends with the hand-over checkpoint; <path> holds the
    // continuation: one checkpoint linked to it.
    let old = rotated(&path, 1);
    let la = lines(&old);
    let ho = json(la.last().unwrap());
    assert_eq!(ho["seq"], 6);
    assert_eq!(ho["checkpoint"]["records"], 5);
    assert_eq!(ho["checkpoint"]["handover"], true);
    let keys: Vec<&String> = ho["checkpoint"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["records", "time", "handover"]);
    let lp = lines(&path);
    assert_eq!(lp.len(), 1);
    let cont = json(&lp[0]);
    assert_eq!(cont["seq"], 7);
    assert_eq!(cont["prev"], ho["mac"]);
    assert_eq!(cont["checkpoint"]["records"], 5);
    assert!(cont["checkpoint"].get("handover").is_none());
    assert!(!dir.path().join("audit.jsonl.handover.tmp").exists());
    let anchor = json(&std::fs::read_to_string(anchor_path(&old)).unwrap());
    assert_eq!(anchor["seq"], 6);

    // B takes over at once; A's late completions and B's new records go on concurrently.
    let b = AuditSink::start_takeover(&cfg).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 100..110 {
                durable(&rt, &a, i);
            }
            for i in 110..115 {
                a.append(record(i)).unwrap();
            }
        });
        s.spawn(|| {
            for i in 200..220 {
                durable(&rt, &b, i);
            }
        });
    });
    a.shutdown();
    b.shutdown();
    assert_eq!(a.records_written(), 20);
    assert_eq!(b.records_written(), 20);

    let files = chain_files(&path);
    assert_eq!(files, [old.clone(), path.clone()]);
    let reports = verify_files(&files, KEY.as_bytes()).unwrap();
    // A's late records continue its own chain after the hand-over checkpoint and are sealed.
    let ra = &reports[0];
    assert_eq!(ra.records, 20);
    assert_eq!(ra.unsealed_records, 0);
    assert_eq!(ra.handovers.len(), 1);
    assert_eq!(ra.handovers[0].seq, 6);
    assert_eq!(ra.handovers[0].late_records, 15);
    assert_eq!(ra.last_checkpoint.map(|c| c.1), Some(20));
    assert!(matches!(ra.anchor, AnchorCheck::Matched { .. }));
    // B's first line links to A's hand-over checkpoint; its count goes on from there.
    let rb = &reports[1];
    assert_eq!(
        rb.link,
        Some(SegmentLink {
            file: old.clone(),
            seq: 6,
            handover: true
        })
    );
    assert_eq!(rb.records, 20);
    assert_eq!(rb.last_checkpoint.map(|c| c.1), Some(25));
    assert!(matches!(rb.anchor, AnchorCheck::Matched { .. }));
    for r in &reports {
        assert!(r.warnings.is_empty(), "{:?}: {:?}", r.file, r.warnings);
    }
    let mut expected = ids(0..5);
    expected.extend(ids(100..115));
    expected.extend(ids(200..220));
    assert_each_once(&files, &expected);
}

#[test]
fn a_taking_over_sink_waits_for_the_hand_over() {
    let dir = TempDir::new("takeover-first");
    let path = dir.path().join("audit.jsonl");
    let cfg = config(&path);
    let rt = runtime();
    let a = AuditSink::start(&cfg).unwrap();
    for i in 0..3 {
        durable(&rt, &a, i);
    }
    // The new process starts first; its records wait while A still owns the file.
    let b = AuditSink::start_takeover(&cfg).unwrap();
    let waiting = rt.spawn({
        let b = b.clone();
        async move { b.append_durable(record(500)).await }
    });
    assert!(wait_until(Duration::from_secs(10), || b.queue_depth() == 1));
    b.append(record(501)).unwrap();
    for i in 3..8 {
        durable(&rt, &a, i);
    }
    assert!(!waiting.is_finished());
    assert_eq!(b.records_written(), 0);
    assert_eq!(b.queue_depth(), 2);
    assert!(b.healthy(), "waiting is not failing");
    assert_eq!(
        id_counts(std::slice::from_ref(&path)).len(),
        8,
        "only A wrote"
    );

    a.hand_over().unwrap();
    a.hand_over().unwrap(); // harmless
    let seq = rt.block_on(waiting).unwrap().unwrap();
    // The continuation checkpoint is seq 10 (after 8 records and the hand-over at 9).
    assert_eq!(seq, 11);
    a.append(record(8)).unwrap(); // a late completion
    a.shutdown();
    assert_eq!(a.hand_over(), Err(AuditError::Closed));
    b.shutdown();
    assert_eq!(b.records_written(), 2);
    assert!(
        !rotated(&path, 2).exists(),
        "one hand-over, one rotated file"
    );

    let files = chain_files(&path);
    let reports = verify_files(&files, KEY.as_bytes()).unwrap();
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[1].link.as_ref().map(|l| l.seq), Some(9));
    let mut expected = ids(0..9);
    expected.extend(ids(500..502));
    assert_each_once(&files, &expected);
}

/// A -> B -> C, each taking over while its predecessor still writes late records: repeated
/// upgrades, or an upgrade and a rollback to the previous binary.
fn three_processes(dir: &TempDir) -> (PathBuf, Vec<String>) {
    let path = dir.path().join("audit.jsonl");
    let cfg = config(&path);
    let rt = runtime();
    let a = AuditSink::start(&cfg).unwrap();
    for i in 0..5 {
        durable(&rt, &a, i);
    }
    let b = AuditSink::start_takeover(&cfg).unwrap();
    a.hand_over().unwrap();
    for i in 100..110 {
        durable(&rt, &b, i);
    }
    for i in 5..8 {
        durable(&rt, &a, i); // late
    }
    let c = AuditSink::start_takeover(&cfg).unwrap();
    let c_first = rt.spawn({
        let c = c.clone();
        async move { c.append_durable(record(200)).await }
    });
    b.hand_over().unwrap();
    rt.block_on(c_first).unwrap().unwrap();
    for i in 110..113 {
        durable(&rt, &b, i); // late
    }
    for i in 201..206 {
        durable(&rt, &c, i);
    }
    a.shutdown();
    b.shutdown();
    c.shutdown();
    let mut expected = ids(0..8);
    expected.extend(ids(100..113));
    expected.extend(ids(200..206));
    (path, expected)
}

#[test]
fn repeated_hand_overs_verify() {
    let dir = TempDir::new("three");
    let (path, expected) = three_processes(&dir);
    let files = chain_files(&path);
    assert_eq!(files, [rotated(&path, 1), rotated(&path, 2), path.clone()]);
    let reports = verify_files(&files, KEY.as_bytes()).unwrap();
    assert_eq!(reports[0].link, None);
    assert_eq!(
        reports[1].link,
        Some(SegmentLink {
            file: files[0].clone(),
            seq: reports[0].handovers[0].seq,
            handover: true
        })
    );
    assert_eq!(
        reports[2].link,
        Some(SegmentLink {
            file: files[1].clone(),
            seq: reports[1].handovers[0].seq,
            handover: true
        })
    );
    assert_eq!(reports[0].handovers[0].late_records, 3);
    assert_eq!(reports[1].handovers[0].late_records, 3);
    for r in &reports {
        assert!(r.warnings.is_empty(), "{:?}: {:?}", r.file, r.warnings);
    }
    assert_each_once(&files, &expected);
    // The directory holds one trail.
    let found = find_trails(dir.path()).unwrap();
    assert_eq!(found.trails, std::slice::from_ref(&path));
    assert!(found.skipped.is_empty());
}

#[test]
fn a_missing_middle_segment_is_detected() {
    let dir = TempDir::new("missing");
    let (path, _) = three_processes(&dir);
    std::fs::remove_file(rotated(&path, 2)).unwrap();
    std::fs::remove_file(anchor_path(&rotated(&path, 2))).unwrap();
    let e = verify_fails(&chain_files(&path));
    assert_eq!((e.kind, e.line), (VerifyErrorKind::SeqGap, Some(1)), "{e}");
    assert_eq!(e.file, path);
    assert!(e.to_string().contains("missing"), "{e}");
}

#[test]
fn a_late_tail_cut_before_its_final_seal_is_detected() {
    let dir = TempDir::new("cut-late");
    let (path, _) = three_processes(&dir);
    let old = rotated(&path, 1);
    let l = lines(&old);
    write_lines(&old, &l[..l.len() - 2]); // the last late record and the seal
    let e = verify_fails(&chain_files(&path));
    assert_eq!(e.kind, VerifyErrorKind::Truncated, "{e}");
    assert_eq!(e.file, old);
}

#[test]
fn renamed_segments_are_detected() {
    let dir = TempDir::new("swap");
    let (path, _) = three_processes(&dir);
    let (one, two) = (rotated(&path, 1), rotated(&path, 2));
    let tmp = dir.path().join("x");
    // Swap the files and their anchors, so that each file still matches its anchor.
    for (a, b) in [
        (one.clone(), two.clone()),
        (anchor_path(&one), anchor_path(&two)),
    ] {
        std::fs::rename(&a, &tmp).unwrap();
        std::fs::rename(&b, &a).unwrap();
        std::fs::rename(&tmp, &b).unwrap();
    }
    let e = verify_fails(&chain_files(&path));
    assert_eq!(e.kind, VerifyErrorKind::Reordered, "{e}");
    assert_eq!(e.file, two);

    // The last two swapped: the file in the middle continues the one after it.
    let dir = TempDir::new("swap-last");
    let (path, _) = three_processes(&dir);
    let two = rotated(&path, 2);
    let files = vec![rotated(&path, 1), path.clone(), two.clone()];
    let e = verify_fails(&files);
    assert_eq!(e.kind, VerifyErrorKind::Reordered, "{e}");
    assert_eq!(e.file, path);
    assert!(e.detail.contains("audit.jsonl.2"), "{e}");
}

#[test]
fn an_edited_line_in_a_segment_is_detected() {
    let dir = TempDir::new("edit-seg");
    let (path, _) = three_processes(&dir);
    let two = rotated(&path, 2);
    let mut l = lines(&two);
    let i = l.iter().position(|l| l.contains("req-0105")).unwrap();
    l[i] = l[i].replacen("req-0105", "req-0106", 1);
    write_lines(&two, &l);
    let e = verify_fails(&chain_files(&path));
    assert_eq!(
        (e.kind, e.line),
        (VerifyErrorKind::MacMismatch, Some(i as u64 + 1))
    );
    assert_eq!(e.file, two);
}

#[test]
fn a_second_successor_of_a_hand_over_is_detected() {
    let dir = TempDir::new("fork");
    let path = dir.path().join("audit.jsonl");
    let cfg = config(&path);
    let rt = runtime();
    let a = AuditSink::start(&cfg).unwrap();
    durable(&rt, &a, 0);
    a.hand_over().unwrap();
    a.shutdown();
    let b = AuditSink::start_takeover(&cfg).unwrap();
    durable(&rt, &b, 1);
    b.shutdown();
    verify_files(&chain_files(&path), KEY.as_bytes()).unwrap();
    // A copy of B's segment put in as another segment: two files continue A's hand-over.
    std::fs::copy(&path, rotated(&path, 2)).unwrap();
    let e = verify_fails(&chain_files(&path));
    assert_eq!(e.kind, VerifyErrorKind::Forked, "{e}");
    assert_eq!(e.file, path);
    assert!(e.detail.contains("audit.jsonl.2"), "{e}");
}

#[test]
fn a_link_into_the_middle_of_a_segment_must_be_a_hand_over() {
    let dir = TempDir::new("mid-link");
    let path = dir.path().join("audit.jsonl");
    let mut cfg = config(&path);
    cfg.checkpoint_every_records = 2;
    let rt = runtime();
    let a = AuditSink::start(&cfg).unwrap();
    for i in 0..6 {
        durable(&rt, &a, i);
    }
    a.shutdown();
    // A file (made with the key) continuing the ordinary checkpoint seq 3.
    let l = lines(&path);
    let cp3 = json(&l[2]);
    assert_eq!(cp3["seq"], 3);
    let (first, mac) = build_line(
        KEY.as_bytes(),
        4,
        cp3["mac"].as_str().unwrap(),
        "checkpoint",
        br#"{"records":2,"time":"2024-05-01T12:00:00.000Z"}"#,
    );
    let (rec, _) = build_line(KEY.as_bytes(), 5, &mac, "record", br#"{"request_id":"x"}"#);
    let branch = dir.path().join("branch.jsonl");
    std::fs::write(&branch, [first, rec].concat()).unwrap();
    verify(&branch, KEY.as_bytes()).unwrap();
    let e = verify_fails(&[path.clone(), branch.clone()]);
    assert_eq!((e.kind, e.line), (VerifyErrorKind::BadLink, Some(1)), "{e}");
    assert_eq!(e.file, branch);
    assert!(e.detail.contains("seq 3"), "{e}");
}

#[test]
fn a_killed_old_process_leaves_an_unsealed_tail_that_only_warns() {
    let dir = TempDir::new("killed");
    let path = dir.path().join("audit.jsonl");
    let cfg = config(&path);
    let rt = runtime();
    let a = AuditSink::start(&cfg).unwrap();
    for i in 0..3 {
        durable(&rt, &a, i);
    }
    a.hand_over().unwrap();
    let b = AuditSink::start_takeover(&cfg).unwrap();
    durable(&rt, &b, 100);
    for i in 3..5 {
        durable(&rt, &a, i);
    }
    // What a SIGKILL leaves: the late records, no final seal, the anchor as it was.
    let old = rotated(&path, 1);
    let killed = (
        std::fs::read(&old).unwrap(),
        std::fs::read(anchor_path(&old)).unwrap(),
    );
    a.shutdown();
    b.shutdown();
    assert_ne!(std::fs::read(&old).unwrap(), killed.0, "shutdown sealed it");
    std::fs::write(&old, &killed.0).unwrap();
    std::fs::write(anchor_path(&old), &killed.1).unwrap();

    let files = chain_files(&path);
    let reports = verify_files(&files, KEY.as_bytes()).unwrap();
    let r = &reports[0];
    assert_eq!(r.unsealed_records, 2);
    assert!(
        r.warnings.iter().any(|w| w.starts_with("unsealed tail: 2")),
        "{:?}",
        r.warnings
    );
    assert!(
        r.warnings.iter().any(|w| w.contains("killed?")),
        "{:?}",
        r.warnings
    );
    let mut expected = ids(0..5);
    expected.push("req-0100".into());
    assert_each_once(&files, &expected);
}

#[test]
fn take_over_proceeds_at_once_when_nobody_holds_the_file() {
    let dir = TempDir::new("free");
    let path = dir.path().join("audit.jsonl");
    let cfg = config(&path);
    let rt = runtime();
    let a = AuditSink::start(&cfg).unwrap();
    durable(&rt, &a, 0);
    a.shutdown();
    // The old process exited without a hand-over: the new one resumes like a restart.
    let b = AuditSink::start_takeover(&cfg).unwrap();
    assert_eq!(durable(&rt, &b, 1), 3);
    b.shutdown();
    let r = verify(&path, KEY.as_bytes()).unwrap();
    assert_eq!(r.records, 2);
    assert_eq!(chain_files(&path), std::slice::from_ref(&path));
}

#[test]
fn a_take_over_that_cannot_resume_is_unhealthy_not_silent() {
    let dir = TempDir::new("takeover-bad");
    let path = dir.path().join("audit.jsonl");
    let mut cfg = config(&path);
    cfg.checkpoint_every_records = 2;
    let rt = runtime();
    let a = AuditSink::start(&cfg).unwrap();
    for i in 0..4 {
        durable(&rt, &a, i);
    }
    a.shutdown();
    // Cut back before the anchor's checkpoint.
    let l = lines(&path);
    write_lines(&path, &l[..3]);
    let before = std::fs::read(&path).unwrap();
    let b = AuditSink::start_takeover(&cfg).unwrap();
    assert!(wait_until(Duration::from_secs(10), || !b.healthy()));
    assert_eq!(
        rt.block_on(b.append_durable(record(9))),
        Err(AuditError::SinkFailed)
    );
    assert_eq!(b.records_written(), 0);
    assert_eq!(
        b.hand_over(),
        Err(AuditError::SinkFailed),
        "nothing to hand over"
    );
    b.shutdown();
    assert_eq!(b.queue_depth(), 0);
    assert_eq!(std::fs::read(&path).unwrap(), before, "not touched");

    // What can be checked at once is checked at once.
    let mut short = cfg.clone();
    short.hmac_key = "short".into();
    assert!(AuditSink::start_takeover(&short)
        .unwrap_err()
        .contains("audit.hmac_key"));
    let a = std::fs::read_to_string(anchor_path(&path)).unwrap();
    std::fs::write(anchor_path(&path), a.replacen("\"seq\":6", "\"seq\":5", 1)).unwrap();
    let e = AuditSink::start_takeover(&cfg).unwrap_err();
    assert!(e.contains("anchor_mac does not match"), "{e}");
}

#[test]
fn shutdown_while_waiting_to_take_over_loses_only_what_it_could_not_write() {
    let dir = TempDir::new("takeover-closed");
    let path = dir.path().join("audit.jsonl");
    let cfg = config(&path);
    let rt = runtime();
    // Nothing at the path: a taking-over sink waits for it and never creates it.
    let b = AuditSink::start_takeover(&cfg).unwrap();
    let waiting = rt.spawn({
        let b = b.clone();
        async move { b.append_durable(record(1)).await }
    });
    b.append(record(2)).unwrap();
    assert!(wait_until(Duration::from_secs(10), || b.queue_depth() == 2));
    let hand_over = std::thread::spawn({
        let b = b.clone();
        move || b.hand_over()
    });
    b.shutdown();
    assert_eq!(rt.block_on(waiting).unwrap(), Err(AuditError::Closed));
    assert_eq!(hand_over.join().unwrap(), Err(AuditError::Closed));
    assert_eq!(b.queue_depth(), 0);
    assert!(!path.exists());
}

#[test]
fn a_start_during_a_hand_over_is_refused_and_works_after_it() {
    let dir = TempDir::new("start-during");
    let path = dir.path().join("audit.jsonl");
    let cfg = config(&path);
    let rt = runtime();
    let a = AuditSink::start(&cfg).unwrap();
    durable(&rt, &a, 0);
    a.hand_over().unwrap();
    // As between the rename and the publication of the continuation: no <path>, and the
    // newest rotated file is still written by A.
    std::fs::remove_file(&path).unwrap();
    let e = AuditSink::start(&cfg).unwrap_err();
    assert!(e.contains("still writes"), "{e}");
    assert!(e.contains("audit.jsonl.1"), "{e}");
    assert!(!path.exists(), "a refused start creates nothing");
    durable(&rt, &a, 1); // late
    a.shutdown();
    // A is gone: a start continues the end of its file; the hand-over is not continued.
    let b = AuditSink::start(&cfg).unwrap();
    durable(&rt, &b, 2);
    b.shutdown();
    let files = chain_files(&path);
    let reports = verify_files(&files, KEY.as_bytes()).unwrap();
    assert_eq!(reports[1].link.as_ref().map(|l| l.handover), Some(false));
    assert!(
        reports[0]
            .warnings
            .iter()
            .any(|w| w.contains("no later file continues the hand-over")),
        "{:?}",
        reports[0].warnings
    );
    assert_each_once(&files, &ids(0..3));
}

#[test]
fn retention_keeps_a_segment_its_old_process_still_writes() {
    let dir = TempDir::new("retain");
    let path = dir.path().join("audit.jsonl");
    let mut cfg = config(&path);
    cfg.rotate_bytes = 3000;
    cfg.retain_files = Some(1);
    cfg.archive_dir = Some(dir.path().join("archive"));
    cfg.checkpoint_every_records = 4;
    let rt = runtime();
    let a = AuditSink::start(&cfg).unwrap();
    durable(&rt, &a, 0);
    a.hand_over().unwrap();
    let b = AuditSink::start_takeover(&cfg).unwrap();
    for i in 100..130 {
        durable(&rt, &b, i);
    }
    assert!(rotated(&path, 3).exists(), "B rotated a few times");
    // A's file and everything newer are kept while A may write: no gap.
    assert!(rotated(&path, 1).exists());
    durable(&rt, &a, 1); // late, still in A's file
    let files = chain_files(&path);
    let reports = verify_files(&files, KEY.as_bytes()).unwrap();
    assert_eq!(
        reports[0].unsealed_records, 1,
        "A's late tail, not sealed yet"
    );
    let mut expected = ids(0..2);
    expected.extend(ids(100..130));
    assert_each_once(&files, &expected);
    a.shutdown();
    // A is done: the next rotation prunes down to retain_files.
    for i in 130..150 {
        durable(&rt, &b, i);
    }
    b.shutdown();
    let files = chain_files(&path);
    assert_eq!(files.len(), 2, "{files:?}");
    verify_files(&files, KEY.as_bytes()).unwrap();
}

#[test]
fn find_trails_lists_trails_and_skips_what_is_no_audit_file() {
    let dir = TempDir::new("find");
    let rt = runtime();
    for name in ["a.jsonl", "b.jsonl"] {
        let sink = AuditSink::start(&config(&dir.path().join(name))).unwrap();
        durable(&rt, &sink, 0);
        sink.hand_over().unwrap();
        sink.shutdown();
    }
    std::fs::write(dir.path().join("notes.txt"), "hello\n").unwrap();
    std::fs::write(dir.path().join("empty.log"), "").unwrap();
    std::fs::write(dir.path().join("x.jsonl.handover.tmp"), "tmp").unwrap();
    // Only rotated files left of a trail: still a trail.
    std::fs::rename(dir.path().join("b.jsonl"), dir.path().join("b.jsonl.2")).unwrap();
    std::fs::remove_file(anchor_path(&dir.path().join("b.jsonl"))).unwrap();
    let found = find_trails(dir.path()).unwrap();
    assert_eq!(
        found.trails,
        [dir.path().join("a.jsonl"), dir.path().join("b.jsonl")]
    );
    assert_eq!(found.skipped, [dir.path().join("notes.txt")]);
    for t in &found.trails {
        verify_files(&chain_files(t), KEY.as_bytes()).unwrap();
    }
}
