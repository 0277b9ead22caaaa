//! Offline verification of audit files (`caregate audit verify PATH`): one file ([`verify`]),
//! and the segments of a trail and their links ([`verify_files`] over [`chain_files`]).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use std::collections::HashMap;

use crate::chain::{self, AuditKeys, LineError, LineKind, ParsedLine};

/// What [`verify`] found in a file that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub file: PathBuf,
    /// Lines in the file (records and checkpoints).
    pub lines: u64,
    /// Record lines.
    pub records: u64,
    /// Checkpoint lines.
    pub checkpoints: u64,
    /// Sequence numbers of the first and last line (`None` for an empty file).
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The first line continues a chain begun in an earlier (rotated) file: its `seq` is above
    /// 1 and its `prev` is the MAC of a line this file does not hold. Only this file is
    /// verified; the link to its predecessor is not.
    pub continuation: bool,
    /// The first line's `prev` ("" for the genesis) and the last line's `mac`: how this file
    /// links to its predecessor and successor.
    pub first_prev: String,
    pub last_mac: String,
    /// The last checkpoint line: (seq, records in the chain up to it).
    pub last_checkpoint: Option<(u64, u64)>,
    /// The record count of the first line when it is a checkpoint (a continuation's opening
    /// checkpoint): the count at the point of the predecessor it continues.
    pub opening_records: Option<u64>,
    /// Records in the chain up to the last line, when known (from a checkpoint, or counted
    /// from the genesis).
    pub records_at_end: Option<u64>,
    /// The hand-over checkpoints of this file (`"handover":true`), in file order. A later file
    /// may continue the chain from one of them; the lines after it are the late records of the
    /// process that handed over.
    pub handovers: Vec<HandOverPoint>,
    /// Set by [`verify_files`]: the line of an earlier file that this file's first line
    /// continues (checked: seq, `prev` and record count). `None` for the first file of the
    /// list, an empty file, and from [`verify`].
    pub link: Option<SegmentLink>,
    /// Records after the last checkpoint (all records when there is none). Normal for a
    /// running gateway; they are not protected against a cut-off tail.
    pub unsealed_records: u64,
    /// How the anchor file was used.
    pub anchor: AnchorCheck,
    /// The key ids this file's checkpoints name (`"key"`), in the order they take effect
    /// (empty for a file written without `key_id`). A key rotation shows as a second id.
    pub key_ids: Vec<String>,
    /// Human-readable notes (continuation, unsealed tail, anchor state). Not failures.
    pub warnings: Vec<String>,
}

/// A hand-over checkpoint in a file: where the process that wrote the file handed the trail
/// over to the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandOverPoint {
    /// The checkpoint's sequence number and 1-based line.
    pub seq: u64,
    pub line: u64,
    /// Its MAC: the `prev` of the successor's first line.
    pub mac: String,
    /// Records in the chain up to it.
    pub records: u64,
    /// Records after it in this file: the late records of the process that handed over.
    pub late_records: u64,
}

/// How a file continues an earlier one (see [`VerifyReport::link`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentLink {
    /// The earlier file.
    pub file: PathBuf,
    /// The seq of the line continued: the earlier file's last line, or a hand-over checkpoint.
    pub seq: u64,
    /// Whether that line is a hand-over checkpoint.
    pub handover: bool,
}

/// How [`verify`] used `<file>.anchor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnchorCheck {
    /// The anchor names a checkpoint in this file and it matched (seq and mac).
    Matched { seq: u64 },
    /// The anchor names the checkpoint just before this file's first line (its `prev`).
    Precedes { seq: u64 },
    /// The anchor names a checkpoint older than this file's first line; not checkable.
    Predates { seq: u64 },
    /// There is no anchor file: a tail cut off at a checkpoint cannot be detected.
    Missing,
}

/// What is wrong, for programs; [`VerifyError::detail`] says it for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyErrorKind {
    /// The file or its anchor cannot be read.
    Io,
    /// A line is not an audit line (bad JSON, members, hex, ...).
    Malformed,
    /// A line's MAC does not match its content: the line was edited (or another key).
    MacMismatch,
    /// The last line has no newline: the file was cut off inside a line.
    IncompleteLine,
    /// The first line is neither the genesis (seq 1, empty prev) nor a continuation.
    BadStart,
    /// A sequence number is missing: lines were removed.
    SeqGap,
    /// Lines are out of order (or duplicated).
    Reordered,
    /// `prev` is not the MAC of the line before: a line was removed, inserted or replaced.
    PrevMismatch,
    /// A checkpoint's record count disagrees with the records before it.
    CheckpointMismatch,
    /// The anchor names a checkpoint beyond the end of the file: the tail was cut off.
    Truncated,
    /// The anchor names a line of this file that is not that checkpoint.
    AnchorMismatch,
    /// The anchor file itself is malformed or its `anchor_mac` does not match.
    AnchorInvalid,
    /// A file's first line continues a line of the previous file that is neither its last
    /// line nor a hand-over checkpoint.
    BadLink,
    /// Two files continue the same line (the same hand-over checkpoint): a copied or
    /// forged segment.
    Forked,
    /// A checkpoint names a key id that none of the keys given has (and no key given without
    /// an id authenticates it): verify with every key of the trail (key rotation).
    UnknownKey,
    /// An off-host checkpoint copy does not match the trail: the trail's line of that seq is
    /// another one (the trail was rewritten), or the trail ends before it (cut off or rolled
    /// back). See [`verify_checkpoints`].
    CheckpointCopyMismatch,
}

/// Why a file failed verification, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    pub file: PathBuf,
    /// 1-based line number, when the problem is at a line.
    pub line: Option<u64>,
    /// The sequence number involved (of the line, or the one expected/named).
    pub seq: Option<u64>,
    pub kind: VerifyErrorKind,
    pub detail: String,
}

impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ": line {line}")?;
        }
        if let Some(seq) = self.seq {
            write!(f, ": seq {seq}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

impl std::error::Error for VerifyError {}

/// Verifies one audit file and its anchor (`<path>.anchor`, if present).
///
/// Recomputes every line's MAC with `hmac_key` and checks the chain: `seq` continuous from the
/// first line, each `prev` equal to the previous line's `mac`, checkpoint record counts
/// consistent. The first line must be the genesis (`seq` 1, `prev` "") or a continuation of a
/// rotated predecessor (`seq` > 1, non-empty `prev`; reported, not followed).
///
/// With an anchor: a checkpoint it names inside the file must be exactly that line (seq and
/// mac); one beyond the end of the file means the tail was cut off. Without an anchor, or for
/// records after the last checkpoint, a cut-off tail cannot be detected: the report says so
/// (`unsealed tail: N records`) without failing, since a running gateway always has such a tail.
pub fn verify(path: &Path, hmac_key: &[u8]) -> Result<VerifyReport, VerifyError> {
    verify_keys(path, &AuditKeys::single(hmac_key))
}

/// [`verify`] with several keys (a trail written across a key rotation): see [`AuditKeys`] for
/// which key checks which line. A file written with two keys verifies only when both are
/// given.
pub fn verify_keys(path: &Path, keys: &AuditKeys) -> Result<VerifyReport, VerifyError> {
    verify_inner(path, keys, &mut |_, _| {})
}

/// [`verify_keys`], calling `on_checkpoint(seq, mac)` for every checkpoint line.
fn verify_inner(
    path: &Path,
    keys: &AuditKeys,
    on_checkpoint: &mut dyn FnMut(u64, &str),
) -> Result<VerifyReport, VerifyError> {
    let err = |line: Option<u64>, seq: Option<u64>, kind, detail: String| VerifyError {
        file: path.to_path_buf(),
        line,
        seq,
        kind,
        detail,
    };
    let file = File::open(path).map_err(|e| err(None, None, VerifyErrorKind::Io, e.to_string()))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut report = VerifyReport {
        file: path.to_path_buf(),
        lines: 0,
        records: 0,
        checkpoints: 0,
        first_seq: None,
        last_seq: None,
        continuation: false,
        first_prev: String::new(),
        last_mac: String::new(),
        last_checkpoint: None,
        opening_records: None,
        records_at_end: None,
        handovers: Vec::new(),
        link: None,
        unsealed_records: 0,
        anchor: AnchorCheck::Missing,
        key_ids: Vec::new(),
        warnings: Vec::new(),
    };
    let mut prev_mac = String::new();
    // The key in force (index into `keys`).
    let mut in_force: Option<usize> = None;
    // (seq, mac) of every checkpoint, to check the anchor against.
    let mut checkpoints: Vec<(u64, String)> = Vec::new();
    // Records in the chain at the last checkpoint, when known from the start of the chain.
    let mut chain_records: Option<u64> = None;
    let mut buf = Vec::with_capacity(4096);
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(|e| {
            err(
                Some(report.lines + 1),
                None,
                VerifyErrorKind::Io,
                e.to_string(),
            )
        })?;
        if n == 0 {
            break;
        }
        let line_no = report.lines + 1;
        let expected = report.last_seq.map(|s| s + 1);
        if buf.last() != Some(&b'\n') {
            return Err(err(
                Some(line_no),
                expected,
                VerifyErrorKind::IncompleteLine,
                format!(
                    "incomplete last line ({} bytes, no newline): the file was cut off inside a line",
                    buf.len()
                ),
            ));
        }
        let line = &buf[..buf.len() - 1];
        let parsed: ParsedLine = match chain::parse_line_keys(keys, line, in_force) {
            Ok((p, k)) => {
                in_force = Some(k);
                p
            }
            Err(LineError::Malformed(m)) => {
                return Err(err(Some(line_no), expected, VerifyErrorKind::Malformed, m))
            }
            Err(LineError::MacMismatch) => {
                let seq = seq_hint(line).or(expected);
                return Err(err(
                    Some(line_no),
                    seq,
                    VerifyErrorKind::MacMismatch,
                    "mac does not match the line: the line was edited (or the key is wrong)".into(),
                ));
            }
            Err(LineError::UnknownKey(id)) => {
                let seq = seq_hint(line).or(expected);
                return Err(err(
                    Some(line_no),
                    seq,
                    VerifyErrorKind::UnknownKey,
                    format!(
                        "the checkpoint names key id {id:?}, and no key given authenticates it: give every key of the trail (the line may also have been edited)"
                    ),
                ));
            }
        };
        if let Some(id) = &parsed.key_id {
            if report.key_ids.last() != Some(id) {
                report.key_ids.push(id.clone());
            }
        }
        match expected {
            None => {
                if parsed.seq == 1 && !parsed.prev.is_empty() {
                    return Err(err(
                        Some(line_no),
                        Some(1),
                        VerifyErrorKind::BadStart,
                        "seq 1 must have an empty prev".into(),
                    ));
                }
                if parsed.seq > 1 {
                    if parsed.prev.is_empty() {
                        return Err(err(
                            Some(line_no),
                            Some(parsed.seq),
                            VerifyErrorKind::BadStart,
                            format!(
                                "the chain starts at seq {} with an empty prev: lines before it were removed",
                                parsed.seq
                            ),
                        ));
                    }
                    if parsed.kind == LineKind::Record {
                        return Err(err(
                            Some(line_no),
                            Some(parsed.seq),
                            VerifyErrorKind::BadStart,
                            format!(
                                "the file starts at seq {} with a record: lines before it were removed (a continuation file starts with a checkpoint)",
                                parsed.seq
                            ),
                        ));
                    }
                    report.continuation = true;
                    report.warnings.push(format!(
                        "continuation: the first line is seq {} and continues a chain from an earlier file (prev {}); that link is not verified here",
                        parsed.seq, parsed.prev
                    ));
                } else {
                    chain_records = Some(0);
                }
                if let LineKind::Checkpoint { records, .. } = &parsed.kind {
                    report.opening_records = Some(*records);
                }
                report.first_seq = Some(parsed.seq);
                report.first_prev.clone_from(&parsed.prev);
            }
            Some(exp) => {
                if parsed.seq != exp {
                    let (kind, what) = if parsed.seq < exp {
                        (
                            VerifyErrorKind::Reordered,
                            "lines are out of order or duplicated",
                        )
                    } else if next_seq(&mut reader) == Some(exp) {
                        (VerifyErrorKind::Reordered, "lines are out of order")
                    } else {
                        (
                            VerifyErrorKind::SeqGap,
                            "lines before this one were removed",
                        )
                    };
                    return Err(err(
                        Some(line_no),
                        Some(parsed.seq),
                        kind,
                        format!("expected seq {exp}, found seq {}: {what}", parsed.seq),
                    ));
                }
                if parsed.prev != prev_mac {
                    return Err(err(
                        Some(line_no),
                        Some(parsed.seq),
                        VerifyErrorKind::PrevMismatch,
                        format!(
                            "prev does not match the mac of line {} (seq {}): a line was removed, inserted or replaced",
                            line_no - 1,
                            exp - 1
                        ),
                    ));
                }
            }
        }
        match &parsed.kind {
            LineKind::Record => {
                report.records += 1;
                report.unsealed_records += 1;
            }
            LineKind::Checkpoint {
                records, handover, ..
            } => {
                if let Some(base) = chain_records {
                    if base + report.unsealed_records != *records {
                        return Err(err(
                            Some(line_no),
                            Some(parsed.seq),
                            VerifyErrorKind::CheckpointMismatch,
                            format!(
                                "checkpoint says {records} records, the chain holds {}",
                                base + report.unsealed_records
                            ),
                        ));
                    }
                }
                chain_records = Some(*records);
                report.checkpoints += 1;
                report.unsealed_records = 0;
                report.last_checkpoint = Some((parsed.seq, *records));
                checkpoints.push((parsed.seq, parsed.mac.clone()));
                on_checkpoint(parsed.seq, &parsed.mac);
                if *handover {
                    report.handovers.push(HandOverPoint {
                        seq: parsed.seq,
                        line: line_no,
                        mac: parsed.mac.clone(),
                        records: *records,
                        // For now the records before it; made the records after it below.
                        late_records: report.records,
                    });
                }
            }
        }
        report.lines = line_no;
        report.last_seq = Some(parsed.seq);
        prev_mac = parsed.mac;
    }
    report.last_mac.clone_from(&prev_mac);
    report.records_at_end = chain_records.map(|r| r + report.unsealed_records);
    for h in &mut report.handovers {
        h.late_records = report.records - h.late_records;
    }

    if report.unsealed_records > 0 {
        report.warnings.push(format!(
            "unsealed tail: {} records after the last checkpoint{}",
            report.unsealed_records,
            match report.last_checkpoint {
                Some((seq, _)) => format!(" (seq {seq})"),
                None => " (the file has no checkpoint)".into(),
            }
        ));
    }

    // The anchor.
    let anchor = chain::read_anchor(keys, path)
        .map_err(|e| err(None, None, VerifyErrorKind::AnchorInvalid, e))?;
    let Some(anchor) = anchor else {
        report.warnings.push(format!(
            "no anchor file ({}): a tail cut off at a checkpoint cannot be detected",
            chain::anchor_path(path).display()
        ));
        return Ok(report);
    };
    let (Some(first), Some(last)) = (report.first_seq, report.last_seq) else {
        return Err(err(
            None,
            Some(anchor.seq),
            VerifyErrorKind::Truncated,
            format!(
                "the file is empty but its anchor names checkpoint seq {}: the file was cut off",
                anchor.seq
            ),
        ));
    };
    if anchor.seq > last {
        return Err(err(
            Some(report.lines),
            Some(anchor.seq),
            VerifyErrorKind::Truncated,
            format!(
                "the file ends at seq {last} (line {}) but the anchor names checkpoint seq {}: the tail was cut off",
                report.lines, anchor.seq
            ),
        ));
    }
    if anchor.seq >= first {
        let line_no = anchor.seq - first + 1;
        match checkpoints.iter().find(|(s, _)| *s == anchor.seq) {
            None => {
                return Err(err(
                    Some(line_no),
                    Some(anchor.seq),
                    VerifyErrorKind::AnchorMismatch,
                    format!(
                        "the anchor names checkpoint seq {} but that line is not a checkpoint",
                        anchor.seq
                    ),
                ))
            }
            Some((_, mac)) if *mac != anchor.mac => {
                return Err(err(
                    Some(line_no),
                    Some(anchor.seq),
                    VerifyErrorKind::AnchorMismatch,
                    format!(
                        "the anchor names checkpoint seq {} with mac {}, the file has mac {mac}",
                        anchor.seq, anchor.mac
                    ),
                ))
            }
            Some(_) => {}
        }
        if let Some((last_cp, _)) = report.last_checkpoint {
            if last_cp > anchor.seq {
                report.warnings.push(format!(
                    "the anchor lags: it names checkpoint seq {}, the last checkpoint is seq {last_cp}",
                    anchor.seq
                ));
            }
        }
        report.anchor = AnchorCheck::Matched { seq: anchor.seq };
    } else if anchor.seq + 1 == first && report.continuation && anchor.mac == report.first_prev {
        report.anchor = AnchorCheck::Precedes { seq: anchor.seq };
    } else {
        report.warnings.push(format!(
            "the anchor names checkpoint seq {}, before this file's first line (seq {first}); not checked",
            anchor.seq
        ));
        report.anchor = AnchorCheck::Predates { seq: anchor.seq };
    }
    Ok(report)
}

/// The `seq` of an unauthenticated line, for error messages.
fn seq_hint(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64))
}

/// Peeks the `seq` of the next line (consumes it; only used on the way to an error).
fn next_seq(reader: &mut impl BufRead) -> Option<u64> {
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).ok()?;
    seq_hint(line.strip_suffix(b"\n").unwrap_or(&line))
}

/// The files of the chain whose active file is `path`, oldest first: the rotated files
/// `<path>.<n>` in increasing `n`, then `path` itself (if it exists).
pub fn chain_files(path: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = crate::sink::rotated_files(path)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    if path.exists() {
        out.push(path.to_path_buf());
    }
    out
}

/// The audit trails found in a directory by [`find_trails`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FoundTrails {
    /// Each trail as the path of its active file (which may be missing when only rotated
    /// files are left); verify it with `verify_files(&chain_files(path), key)`. Sorted.
    pub trails: Vec<PathBuf>,
    /// Files that look like no audit file (neither starting with `{"seq":`, nor anchored, nor
    /// with rotated siblings): not verified.
    pub skipped: Vec<PathBuf>,
}

/// Finds the audit trails in directory `dir`: every file except anchors (`*.anchor`),
/// temporary files (`*.tmp`), hidden files and empty files without an anchor; a rotated file
/// `<name>.<n>` counts for the trail `<name>`; a file with no anchor and no rotated siblings
/// whose first bytes are not an audit line is listed as skipped.
pub fn find_trails(dir: &Path) -> std::io::Result<FoundTrails> {
    let mut names: Vec<String> = Vec::new();
    let mut files: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if name.starts_with('.') || name.ends_with(".anchor") || name.ends_with(".tmp") {
            continue;
        }
        match name.rsplit_once('.') {
            Some((base, n))
                if !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) =>
            {
                names.push(base.to_string());
            }
            _ => files.push(name),
        }
    }
    let mut found = FoundTrails::default();
    for name in files {
        let path = dir.join(&name);
        if names.contains(&name) || chain::anchor_path(&path).exists() {
            names.push(name);
            continue;
        }
        let mut head = [0u8; 7];
        let n = File::open(&path)
            .and_then(|f| std::io::Read::read(&mut &f, &mut head))
            .unwrap_or(0);
        if n == 0 {
            continue; // empty and unanchored: nothing to verify
        }
        if n == head.len() && head == *b"{\"seq\":" {
            names.push(name);
        } else {
            found.skipped.push(path);
        }
    }
    names.sort();
    names.dedup();
    found.trails = names.into_iter().map(|n| dir.join(n)).collect();
    found.skipped.sort();
    Ok(found)
}

/// Verifies the segments of one trail, oldest first (for example [`chain_files`]): each file
/// with [`verify`], and each link. A file's first line must continue the previous (non-empty)
/// file: its last line (rotation), or one of its hand-over checkpoints (a hand-over between
/// processes: the predecessor's lines after that checkpoint are the old process's late
/// records, verified as part of that file's own chain) — `seq` + 1, `prev` = that line's
/// `mac`, and the opening checkpoint's record count equal to the count at that line. The link
/// is recorded in [`VerifyReport::link`]. Retention may have deleted the oldest files, so the
/// first file may be a continuation (reported, not failed). Empty files are passed over.
///
/// Record counts: after a hand-over both chains count on from the hand-over checkpoint's count
/// (the successor's opening checkpoint repeats it), so a checkpoint counts the records on its
/// own path from the genesis, and the late records of the old process count in its file only.
///
/// Fails, naming the file whose first line does not fit (line 1) and what is wrong:
/// - a missing segment: the first line continues a line no file before it holds
///   ([`VerifyErrorKind::SeqGap`]) or the link does not match ([`VerifyErrorKind::PrevMismatch`]);
/// - reordered segments (files renamed): the first line continues an earlier file than the
///   previous one, or a later file, or starts before the previous file
///   ([`VerifyErrorKind::Reordered`]);
/// - a second successor of the same line, e.g. a copied segment ([`VerifyErrorKind::Forked`]);
/// - a link into the middle of the previous file at a line that is not a hand-over checkpoint
///   ([`VerifyErrorKind::BadLink`]);
/// - a record count that does not carry over ([`VerifyErrorKind::CheckpointMismatch`]);
///
/// and on whatever [`verify`] finds in a file (a cut segment: its anchor names a checkpoint
/// beyond its end). Warnings (not failures): an unsealed tail (for a predecessor's late
/// records: the old process ended without sealing, e.g. killed), and a hand-over checkpoint
/// no later file continues (the hand-over did not finish, or the continuation is missing).
pub fn verify_files(paths: &[PathBuf], hmac_key: &[u8]) -> Result<Vec<VerifyReport>, VerifyError> {
    verify_files_keys(paths, &AuditKeys::single(hmac_key))
}

/// [`verify_files`] with several keys (a trail written across a key rotation; see
/// [`AuditKeys`]): every key the trail names must be given.
pub fn verify_files_keys(
    paths: &[PathBuf],
    keys: &AuditKeys,
) -> Result<Vec<VerifyReport>, VerifyError> {
    verify_files_inner(paths, keys, &mut |_, _, _| {})
}

fn verify_files_inner(
    paths: &[PathBuf],
    keys: &AuditKeys,
    on_checkpoint: &mut dyn FnMut(usize, u64, &str),
) -> Result<Vec<VerifyReport>, VerifyError> {
    let hmac_key = keys;
    let mut reports: Vec<VerifyReport> = Vec::with_capacity(paths.len());
    // Lines continued by a later file: (file index, seq, successor index).
    let mut taken: Vec<(usize, u64, usize)> = Vec::new();
    let mut prev_idx: Option<usize> = None;
    for (i, path) in paths.iter().enumerate() {
        let mut report = verify_inner(path, keys, &mut |seq, mac| on_checkpoint(i, seq, mac))?;
        if let (Some(first), Some(p)) = (report.first_seq, prev_idx) {
            let Some(point) = link_point(&reports[p], first, &report.first_prev) else {
                return Err(diagnose_link(
                    paths, &reports, &taken, p, i, &report, hmac_key,
                ));
            };
            if let (Some(at), Some(opening)) = (point.records, report.opening_records) {
                if at != opening {
                    return Err(VerifyError {
                        file: path.clone(),
                        line: Some(1),
                        seq: Some(first),
                        kind: VerifyErrorKind::CheckpointMismatch,
                        detail: format!(
                            "the opening checkpoint says {opening} records, {} holds {at} at seq {}",
                            paths[p].display(),
                            point.seq
                        ),
                    });
                }
            }
            taken.push((p, point.seq, i));
            report.link = Some(SegmentLink {
                file: paths[p].clone(),
                seq: point.seq,
                handover: point.handover,
            });
            // The link is verified now.
            report.warnings.retain(|w| !w.starts_with("continuation:"));
        }
        if report.first_seq.is_some() {
            prev_idx = Some(i);
        }
        reports.push(report);
    }
    for (i, report) in reports.iter_mut().enumerate() {
        let mut notes = Vec::new();
        for h in &report.handovers {
            match taken.iter().find(|(f, s, _)| *f == i && *s == h.seq) {
                Some(_) => {
                    let after_h = report.last_checkpoint.is_some_and(|(s, _)| s >= h.seq);
                    if report.unsealed_records > 0 && after_h {
                        notes.push(format!(
                            "{} of the {} late records after the hand-over at seq {} have no final checkpoint: \
                             the process that handed over ended without sealing this file (killed?)",
                            report.unsealed_records, h.late_records, h.seq
                        ));
                    }
                }
                None => notes.push(format!(
                    "no later file continues the hand-over checkpoint seq {} (line {}): the hand-over did not \
                     finish, or the file that continues it is missing",
                    h.seq, h.line
                )),
            }
        }
        report.warnings.extend(notes);
    }
    Ok(reports)
}

/// A line of a file that a successor may continue.
struct LinkPoint {
    seq: u64,
    /// Records in the chain up to it, when known.
    records: Option<u64>,
    handover: bool,
}

/// The line of `pred` that a first line (`first`, `prev`) continues: a hand-over checkpoint or
/// the last line.
fn link_point(pred: &VerifyReport, first: u64, prev: &str) -> Option<LinkPoint> {
    if let Some(h) = pred
        .handovers
        .iter()
        .find(|h| h.seq + 1 == first && h.mac == prev)
    {
        return Some(LinkPoint {
            seq: h.seq,
            records: Some(h.records),
            handover: true,
        });
    }
    match pred.last_seq {
        Some(last) if last + 1 == first && pred.last_mac == prev => Some(LinkPoint {
            seq: last,
            records: pred.records_at_end,
            handover: false,
        }),
        _ => None,
    }
}

/// Why file `i` does not continue file `p` (the previous non-empty one): names the file and
/// the kind of damage as precisely as the files allow.
fn diagnose_link(
    paths: &[PathBuf],
    reports: &[VerifyReport],
    taken: &[(usize, u64, usize)],
    p: usize,
    i: usize,
    report: &VerifyReport,
    hmac_key: &AuditKeys,
) -> VerifyError {
    let first = report.first_seq.unwrap_or(0);
    let prev = report.first_prev.as_str();
    let err = |kind, detail: String| VerifyError {
        file: paths[i].clone(),
        line: Some(1),
        seq: Some(first),
        kind,
        detail,
    };
    let pred = &reports[p];
    let pred_name = paths[p].display();
    let what = |lp: &LinkPoint| {
        if lp.handover {
            format!("its hand-over checkpoint seq {}", lp.seq)
        } else {
            format!("its last line (seq {})", lp.seq)
        }
    };
    // It continues a file before the previous one.
    for k in (0..p).rev() {
        if let Some(lp) = link_point(&reports[k], first, prev) {
            if let Some((_, _, succ)) = taken.iter().find(|(f, s, _)| *f == k && *s == lp.seq) {
                return err(
                    VerifyErrorKind::Forked,
                    format!(
                        "the file continues {} after {}, which {} continues already: two files continue the same point (a copied or forged segment)",
                        paths[k].display(),
                        what(&lp),
                        paths[*succ].display()
                    ),
                );
            }
            return err(
                VerifyErrorKind::Reordered,
                format!(
                    "the file continues {} after {}, not {pred_name} just before it: the files are out of order (renamed?)",
                    paths[k].display(),
                    what(&lp)
                ),
            );
        }
    }
    // It continues a file after it.
    for (k, later) in paths.iter().enumerate().skip(i + 1) {
        if let Ok(r) = verify_keys(later, hmac_key) {
            if let Some(lp) = link_point(&r, first, prev) {
                return err(
                    VerifyErrorKind::Reordered,
                    format!(
                        "the file continues {} after {}, a file listed after it (number {} of {}): the files are out of order (renamed?)",
                        later.display(),
                        what(&lp),
                        k + 1,
                        paths.len()
                    ),
                );
            }
        }
    }
    let (Some(pf), Some(pl)) = (pred.first_seq, pred.last_seq) else {
        return err(
            VerifyErrorKind::SeqGap,
            format!("the file does not continue {pred_name}"),
        );
    };
    if first == pl + 1 {
        return err(
            VerifyErrorKind::PrevMismatch,
            format!(
                "prev does not match the last mac of {pred_name} (seq {pl}): the files do not link (a segment between them is missing, or one was replaced)"
            ),
        );
    }
    if first <= pf {
        return err(
            VerifyErrorKind::Reordered,
            format!(
                "the file starts at seq {first}, not after {pred_name} (seq {pf}..{pl}): the files are out of order or duplicated"
            ),
        );
    }
    if first <= pl {
        if let Some(kind) = line_with_mac(&paths[p], hmac_key, first - 1, prev) {
            return err(
                VerifyErrorKind::BadLink,
                format!(
                    "the file continues {pred_name} at seq {} (a {kind}), which is neither its last line (seq {pl}) nor a hand-over checkpoint",
                    first - 1
                ),
            );
        }
    }
    let holds = if pred.handovers.is_empty() {
        String::new()
    } else {
        format!(
            ", hand-over checkpoints at seq {}",
            pred.handovers
                .iter()
                .map(|h| h.seq.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    err(
        VerifyErrorKind::SeqGap,
        format!(
            "the file starts at seq {first} but {pred_name} ends at seq {pl}{holds}, and no file holds the line it continues: lines or files are missing"
        ),
    )
}

/// Whether the line `seq` of `path` has MAC `mac`; what it is if so. For error messages.
fn line_with_mac(path: &Path, keys: &AuditKeys, seq: u64, mac: &str) -> Option<&'static str> {
    let file = File::open(path).ok()?;
    for line in BufReader::new(file).split(b'\n') {
        let line = line.ok()?;
        if let Ok((p, _)) = chain::parse_line_keys(keys, &line, None) {
            if p.seq == seq {
                return (p.mac == mac).then_some(match p.kind {
                    LineKind::Record => "record",
                    LineKind::Checkpoint { .. } => "checkpoint",
                });
            }
        }
    }
    None
}

/// What [`verify_checkpoints`] found besides the trail's own reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointCopies {
    /// The file of copies.
    pub file: PathBuf,
    /// Copies that matched a checkpoint of the trail (seq and mac).
    pub matched: u64,
    /// Copies of checkpoints older than the oldest segment given (archived or pruned): not
    /// checked.
    pub older: u64,
    /// Notes (not failures), e.g. an incomplete last line in the copies file.
    pub warnings: Vec<String>,
}

/// Verifies a trail ([`verify_files_keys`]) and checks it against copies of its checkpoints
/// kept off the host (`audit.offhost_checkpoints`): `copies` holds checkpoint lines, one per
/// line, as the writer copied them. Every copy must authenticate with `keys`, and the trail
/// must hold a checkpoint with the same seq and mac; so a trail rewritten from scratch with
/// the key (altered records, re-chained, new anchors), or cut back or rolled back to before
/// the newest copy, fails ([`VerifyErrorKind::CheckpointCopyMismatch`], naming the copies file
/// and line). Copies older than the first line of the trail given (segments archived or
/// pruned) are counted in [`CheckpointCopies::older`], not failed: verify the archive with
/// them too. An incomplete last line in the copies file (an interrupted append) is a note.
pub fn verify_checkpoints(
    paths: &[PathBuf],
    keys: &AuditKeys,
    copies: &Path,
) -> Result<(Vec<VerifyReport>, CheckpointCopies), VerifyError> {
    let cerr = |line: Option<u64>, seq: Option<u64>, kind, detail: String| VerifyError {
        file: copies.to_path_buf(),
        line,
        seq,
        kind,
        detail,
    };
    let bytes =
        std::fs::read(copies).map_err(|e| cerr(None, None, VerifyErrorKind::Io, e.to_string()))?;
    let mut out = CheckpointCopies {
        file: copies.to_path_buf(),
        ..Default::default()
    };
    // (seq, mac, line number) of every copy.
    let mut wanted: Vec<(u64, String, u64)> = Vec::new();
    let mut pieces = bytes.split(|b| *b == b'\n').peekable();
    let mut n = 0u64;
    while let Some(raw) = pieces.next() {
        if pieces.peek().is_none() {
            if !raw.is_empty() {
                out.warnings.push(format!(
                    "{}: the last line is incomplete ({} bytes, no newline): an interrupted copy, not checked",
                    copies.display(),
                    raw.len()
                ));
            }
            break;
        }
        n += 1;
        if raw.is_empty() {
            continue;
        }
        let p =
            match chain::parse_line_keys(keys, raw, None) {
                Ok((p, _)) => p,
                Err(LineError::Malformed(m)) => {
                    return Err(cerr(Some(n), seq_hint(raw), VerifyErrorKind::Malformed, m))
                }
                Err(LineError::MacMismatch) | Err(LineError::UnknownKey(_)) => return Err(cerr(
                    Some(n),
                    seq_hint(raw),
                    VerifyErrorKind::MacMismatch,
                    "the copy does not authenticate with the keys given (edited, or another key)"
                        .into(),
                )),
            };
        if p.kind == LineKind::Record {
            return Err(cerr(
                Some(n),
                Some(p.seq),
                VerifyErrorKind::Malformed,
                "a record, not a checkpoint: this is not a file of checkpoint copies".into(),
            ));
        }
        wanted.push((p.seq, p.mac, n));
    }
    let mut held: HashMap<u64, Vec<(String, usize)>> = HashMap::new();
    let reports = verify_files_inner(paths, keys, &mut |file, seq, mac| {
        held.entry(seq).or_default().push((mac.to_string(), file));
    })?;
    let first = reports.iter().filter_map(|r| r.first_seq).min();
    let last = reports.iter().filter_map(|r| r.last_seq).max();
    for (seq, mac, line) in wanted {
        if held
            .get(&seq)
            .is_some_and(|v| v.iter().any(|(m, _)| *m == mac))
        {
            out.matched += 1;
            continue;
        }
        if first.is_some_and(|f| seq < f) {
            out.older += 1;
            continue;
        }
        let detail = match last {
            Some(l) if seq > l => format!(
                "the off-host copy of checkpoint seq {seq} is beyond the end of the trail (seq {l}): the trail was cut off or rolled back"
            ),
            None => format!(
                "the off-host copy of checkpoint seq {seq} has no counterpart: the trail is empty"
            ),
            _ => {
                let at = reports
                    .iter()
                    .find(|r| {
                        r.first_seq.is_some_and(|f| f <= seq) && r.last_seq.is_some_and(|l| seq <= l)
                    })
                    .map(|r| format!(" ({})", r.file.display()))
                    .unwrap_or_default();
                format!(
                    "the trail's line seq {seq}{at} is not the checkpoint copied off the host (mac {mac}): the trail was rewritten"
                )
            }
        };
        return Err(cerr(
            Some(line),
            Some(seq),
            VerifyErrorKind::CheckpointCopyMismatch,
            detail,
        ));
    }
    if out.older > 0 {
        out.warnings.push(format!(
            "{}: {} copies of checkpoints older than the first segment given (seq {}) were not checked: verify the archive with them",
            copies.display(),
            out.older,
            first.unwrap_or(0)
        ));
    }
    Ok((reports, out))
}
