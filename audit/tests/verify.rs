//! The chain on disk and `verify`: a clean file passes, every kind of tampering fails at the
//! right place.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use caregate_audit::{anchor_path, verify, AnchorCheck, AuditSink, VerifyError, VerifyErrorKind};
use common::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// 12 records with a checkpoint every 5, sealed at shutdown:
/// lines 1-5 records (seq 1-5), 6 checkpoint, 7-11 records, 12 checkpoint, 13-14 records,
/// 15 checkpoint (the anchor).
fn sample_chain(dir: &TempDir) -> PathBuf {
    let path = dir.path().join("audit.jsonl");
    let mut cfg = config(&path);
    cfg.checkpoint_every_records = 5;
    let sink = AuditSink::start(&cfg).unwrap();
    let rt = runtime();
    for i in 1..=12 {
        rt.block_on(sink.append_durable(record(i))).unwrap();
    }
    sink.shutdown();
    path
}

fn fails(path: &Path) -> VerifyError {
    match verify(path, KEY.as_bytes()) {
        Ok(r) => panic!("verify passed: {r:?}"),
        Err(e) => e,
    }
}

fn assert_place(e: &VerifyError, kind: VerifyErrorKind, line: Option<u64>, seq: Option<u64>) {
    assert_eq!((e.kind, e.line, e.seq), (kind, line, seq), "{e}");
}

#[test]
fn clean_chain_verifies() {
    let dir = TempDir::new("clean");
    let path = sample_chain(&dir);
    let r = verify(&path, KEY.as_bytes()).unwrap();
    assert_eq!(r.lines, 15);
    assert_eq!(r.records, 12);
    assert_eq!(r.checkpoints, 3);
    assert_eq!((r.first_seq, r.last_seq), (Some(1), Some(15)));
    assert_eq!(r.last_checkpoint, Some((15, 12)));
    assert_eq!(r.unsealed_records, 0);
    assert!(!r.continuation);
    assert_eq!(r.anchor, AnchorCheck::Matched { seq: 15 });
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn line_format_is_the_documented_one() {
    let dir = TempDir::new("format");
    let path = sample_chain(&dir);
    let mut prev = String::new();
    for (i, line) in lines(&path).iter().enumerate() {
        let v = json(line);
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        let member = if (i + 1) % 6 == 0 || i + 1 == 15 {
            "checkpoint"
        } else {
            "record"
        };
        assert_eq!(keys, ["seq", "prev", member, "mac"], "line {}", i + 1);
        assert_eq!(v["seq"], (i + 1) as u64);
        assert_eq!(v["prev"], prev.as_str());
        // mac = HMAC-SHA256(key, prev || line without ,"mac":"...")
        let mac = v["mac"].as_str().unwrap().to_string();
        let body = line.replace(&format!(",\"mac\":\"{mac}\""), "");
        let mut h = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
        h.update(prev.as_bytes());
        h.update(body.as_bytes());
        assert_eq!(hex::encode(h.finalize().into_bytes()), mac);
        prev = mac;
    }
    let cp = json(&lines(&path)[5]);
    assert_eq!(cp["checkpoint"]["records"], 5);
    let anchor = json(&std::fs::read_to_string(anchor_path(&path)).unwrap());
    assert_eq!(anchor["seq"], 15);
    assert_eq!(anchor["mac"], json(&lines(&path)[14])["mac"]);
    assert_eq!(anchor["records"], 12);
}

#[test]
fn an_edited_byte_is_a_mac_mismatch_at_that_line() {
    let dir = TempDir::new("edit");
    let path = sample_chain(&dir);
    let mut l = lines(&path);
    assert!(l[2].contains("req-0003"));
    l[2] = l[2].replacen("req-0003", "req-0X03", 1);
    write_lines(&path, &l);
    let e = fails(&path);
    assert_place(&e, VerifyErrorKind::MacMismatch, Some(3), Some(3));
    let shown = e.to_string();
    assert!(shown.contains("audit.jsonl: line 3: seq 3:"), "{shown}");
}

#[test]
fn an_edited_checkpoint_is_a_mac_mismatch() {
    let dir = TempDir::new("edit-cp");
    let path = sample_chain(&dir);
    let mut l = lines(&path);
    l[11] = l[11].replacen("\"records\":10", "\"records\":11", 1);
    write_lines(&path, &l);
    assert_place(
        &fails(&path),
        VerifyErrorKind::MacMismatch,
        Some(12),
        Some(12),
    );
}

#[test]
fn white_space_counts_as_an_edit() {
    let dir = TempDir::new("ws");
    let path = sample_chain(&dir);
    let mut l = lines(&path);
    l[6] = l[6].replacen("{\"seq\":7,", "{\"seq\":7, ", 1);
    write_lines(&path, &l);
    assert_place(
        &fails(&path),
        VerifyErrorKind::MacMismatch,
        Some(7),
        Some(7),
    );
}

#[test]
fn a_removed_line_is_a_seq_gap() {
    let dir = TempDir::new("remove");
    let path = sample_chain(&dir);
    let mut l = lines(&path);
    l.remove(3); // seq 4
    write_lines(&path, &l);
    let e = fails(&path);
    assert_place(&e, VerifyErrorKind::SeqGap, Some(4), Some(5));
    assert!(e.detail.contains("expected seq 4"), "{e}");
}

#[test]
fn a_removed_first_line_is_caught() {
    let dir = TempDir::new("remove-first");
    let path = sample_chain(&dir);
    let mut l = lines(&path);
    l.remove(0);
    write_lines(&path, &l);
    assert_place(&fails(&path), VerifyErrorKind::BadStart, Some(1), Some(2));
}

#[test]
fn swapped_lines_are_reordered() {
    let dir = TempDir::new("swap");
    let path = sample_chain(&dir);
    let mut l = lines(&path);
    l.swap(7, 8); // seq 8 and 9
    write_lines(&path, &l);
    let e = fails(&path);
    assert_place(&e, VerifyErrorKind::Reordered, Some(8), Some(9));
}

#[test]
fn a_duplicated_line_is_caught() {
    let dir = TempDir::new("dup");
    let path = sample_chain(&dir);
    let mut l = lines(&path);
    let dup = l[4].clone();
    l.insert(5, dup);
    write_lines(&path, &l);
    assert_place(&fails(&path), VerifyErrorKind::Reordered, Some(6), Some(5));
}

#[test]
fn a_line_replaced_by_a_reconstructed_one_breaks_the_links() {
    // Same seq, plausible content, but not made with the key: the MAC gives it away.
    let dir = TempDir::new("replace");
    let path = sample_chain(&dir);
    let mut l = lines(&path);
    let mut v = json(&l[3]);
    v["record"]["request_id"] = "forged".into();
    l[3] = serde_json::to_string(&v).unwrap();
    write_lines(&path, &l);
    assert_place(
        &fails(&path),
        VerifyErrorKind::MacMismatch,
        Some(4),
        Some(4),
    );
}

#[test]
fn a_tail_cut_inside_a_line_is_incomplete() {
    let dir = TempDir::new("cut-mid");
    let path = sample_chain(&dir);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 20]).unwrap();
    assert_place(
        &fails(&path),
        VerifyErrorKind::IncompleteLine,
        Some(15),
        Some(15),
    );
}

#[test]
fn a_tail_cut_exactly_at_a_checkpoint_is_caught_by_the_anchor() {
    let dir = TempDir::new("cut-cp");
    let path = sample_chain(&dir);
    let l = lines(&path);
    write_lines(&path, &l[..12]); // ends with the checkpoint seq 12: looks sealed
    let e = fails(&path);
    assert_place(&e, VerifyErrorKind::Truncated, Some(12), Some(15));
    assert!(e.detail.contains("ends at seq 12"), "{e}");
}

#[test]
fn a_tail_cut_after_a_record_is_caught_by_the_anchor() {
    let dir = TempDir::new("cut-rec");
    let path = sample_chain(&dir);
    let l = lines(&path);
    write_lines(&path, &l[..13]);
    assert_place(
        &fails(&path),
        VerifyErrorKind::Truncated,
        Some(13),
        Some(15),
    );
}

#[test]
fn an_emptied_file_is_caught_by_the_anchor() {
    let dir = TempDir::new("cut-all");
    let path = sample_chain(&dir);
    std::fs::write(&path, b"").unwrap();
    assert_place(&fails(&path), VerifyErrorKind::Truncated, None, Some(15));
}

#[test]
fn without_the_anchor_a_cut_at_a_checkpoint_only_warns() {
    let dir = TempDir::new("no-anchor");
    let path = sample_chain(&dir);
    let l = lines(&path);
    write_lines(&path, &l[..12]);
    std::fs::remove_file(anchor_path(&path)).unwrap();
    let r = verify(&path, KEY.as_bytes()).unwrap();
    assert_eq!(r.anchor, AnchorCheck::Missing);
    assert!(r.warnings.iter().any(|w| w.contains("no anchor file")));
}

#[test]
fn a_forged_anchor_is_rejected() {
    let dir = TempDir::new("forged-anchor");
    let path = sample_chain(&dir);
    let l = lines(&path);
    write_lines(&path, &l[..12]);
    // Point the anchor at the remaining last checkpoint (its mac is in the file).
    let a = std::fs::read_to_string(anchor_path(&path)).unwrap();
    let cp12 = json(&l[11]);
    let cp15 = json(&l[14]);
    let forged = a.replacen("\"seq\":15", "\"seq\":12", 1).replacen(
        cp15["mac"].as_str().unwrap(),
        cp12["mac"].as_str().unwrap(),
        1,
    );
    std::fs::write(anchor_path(&path), forged).unwrap();
    assert_eq!(fails(&path).kind, VerifyErrorKind::AnchorInvalid);
}

#[test]
fn an_anchor_from_another_file_is_a_mismatch() {
    // A valid anchor of one chain does not vouch for another chain of the same key.
    let a = TempDir::new("anchor-a");
    let b = TempDir::new("anchor-b");
    let pa = sample_chain(&a);
    let pb = b.path().join("audit.jsonl");
    let mut cfg = config(&pb);
    cfg.checkpoint_every_records = 5;
    let sink = AuditSink::start(&cfg).unwrap();
    for i in 101..=112 {
        sink.append(record(i)).unwrap();
    }
    sink.shutdown();
    verify(&pb, KEY.as_bytes()).unwrap();
    std::fs::copy(anchor_path(&pa), anchor_path(&pb)).unwrap();
    let e = fails(&pb);
    assert_place(&e, VerifyErrorKind::AnchorMismatch, Some(15), Some(15));
}

/// Signs an anchor the documented way: HMAC(key, "caregate-audit-anchor\n" || body).
fn signed_anchor(body: &str) -> String {
    let mut h = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    h.update(b"caregate-audit-anchor\n");
    h.update(body.as_bytes());
    let mac = hex::encode(h.finalize().into_bytes());
    format!("{},\"anchor_mac\":\"{mac}\"}}\n", &body[..body.len() - 1])
}

#[test]
fn an_anchor_naming_a_record_line_is_a_mismatch() {
    let dir = TempDir::new("anchor-record");
    let path = sample_chain(&dir);
    let l = lines(&path);
    let mac14 = json(&l[13])["mac"].as_str().unwrap().to_string();
    let body =
        format!("{{\"seq\":14,\"mac\":\"{mac14}\",\"file\":\"x\",\"records\":12,\"time\":\"t\"}}");
    std::fs::write(anchor_path(&path), signed_anchor(&body)).unwrap();
    let e = fails(&path);
    assert_place(&e, VerifyErrorKind::AnchorMismatch, Some(14), Some(14));
    assert!(e.detail.contains("not a checkpoint"), "{e}");
    // The documented format is what the writer uses: re-signing the real anchor's body gives
    // the real anchor back.
    let dir2 = TempDir::new("anchor-format");
    let path2 = sample_chain(&dir2);
    let real = std::fs::read_to_string(anchor_path(&path2)).unwrap();
    let body = &real[..real.find(",\"anchor_mac\"").unwrap()];
    assert_eq!(signed_anchor(&format!("{body}}}")), real);
}

#[test]
fn another_key_fails_at_line_one() {
    let dir = TempDir::new("key");
    let path = sample_chain(&dir);
    let e = verify(&path, b"some-other-key-0123456789-0123456789").unwrap_err();
    assert_place(&e, VerifyErrorKind::MacMismatch, Some(1), Some(1));
}

#[test]
fn a_running_sink_has_an_unsealed_tail_that_only_warns() {
    let dir = TempDir::new("unsealed");
    let path = dir.path().join("audit.jsonl");
    let sink = AuditSink::start(&config(&path)).unwrap();
    let rt = runtime();
    for i in 0..3 {
        rt.block_on(sink.append_durable(record(i))).unwrap();
    }
    let r = verify(&path, KEY.as_bytes()).unwrap();
    assert_eq!(r.unsealed_records, 3);
    assert!(r
        .warnings
        .iter()
        .any(|w| w.starts_with("unsealed tail: 3 records")));
    sink.shutdown();
    let r = verify(&path, KEY.as_bytes()).unwrap();
    assert_eq!(r.unsealed_records, 0);
    assert_eq!(r.anchor, AnchorCheck::Matched { seq: 4 });
}

#[test]
fn a_missing_file_is_an_io_error() {
    let dir = TempDir::new("missing");
    let e = verify(&dir.path().join("nope.jsonl"), KEY.as_bytes()).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::Io);
}

#[test]
fn garbage_is_malformed_not_a_panic() {
    let dir = TempDir::new("garbage");
    let path = dir.path().join("audit.jsonl");
    for junk in [
        &b"\n"[..],
        b"not json\n",
        b"{\"seq\":1}\n",
        b"[1,2,3]\n",
        b"\xff\xfe\xfd\n",
        b"{\"seq\":1,\"prev\":\"\",\"record\":{},\"mac\":\"zz\"}\n",
    ] {
        std::fs::write(&path, junk).unwrap();
        let e = verify(&path, KEY.as_bytes()).unwrap_err();
        assert_eq!(e.kind, VerifyErrorKind::Malformed, "{e}");
        assert_eq!(e.line, Some(1));
    }
}
