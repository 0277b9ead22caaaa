//! Offline verification of one audit file (`caregate audit verify FILE`).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::chain::{self, LineError, LineKind, ParsedLine};

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
    /// Records after the last checkpoint (all records when there is none). Normal for a
    /// running gateway; they are not protected against a cut-off tail.
    pub unsealed_records: u64,
    /// How the anchor file was used.
    pub anchor: AnchorCheck,
    /// Human-readable notes (continuation, unsealed tail, anchor state). Not failures.
    pub warnings: Vec<String>,
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
        unsealed_records: 0,
        anchor: AnchorCheck::Missing,
        warnings: Vec::new(),
    };
    let mut prev_mac = String::new();
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
        let parsed: ParsedLine = match chain::parse_line(hmac_key, line) {
            Ok(p) => p,
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
        };
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
            LineKind::Checkpoint { records, .. } => {
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
            }
        }
        report.lines = line_no;
        report.last_seq = Some(parsed.seq);
        prev_mac = parsed.mac;
    }
    report.last_mac.clone_from(&prev_mac);

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
    let anchor = chain::read_anchor(hmac_key, path)
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

/// Verifies consecutive files of one chain, oldest first (for example [`chain_files`]): each
/// with [`verify`], and each link: a file's first line must continue the previous file's last
/// line (`seq` + 1, `prev` = its `mac`). Empty files are passed over. Retention may have
/// deleted the oldest files, so the first file may be a continuation (reported, not failed).
pub fn verify_files(paths: &[PathBuf], hmac_key: &[u8]) -> Result<Vec<VerifyReport>, VerifyError> {
    let mut reports: Vec<VerifyReport> = Vec::with_capacity(paths.len());
    let mut last: Option<(u64, String, PathBuf)> = None;
    for path in paths {
        let report = verify(path, hmac_key)?;
        if let (Some(first), Some((last_seq, last_mac, last_file))) = (report.first_seq, &last) {
            if first != last_seq + 1 {
                return Err(VerifyError {
                    file: path.clone(),
                    line: Some(1),
                    seq: Some(first),
                    kind: VerifyErrorKind::SeqGap,
                    detail: format!(
                        "the file starts at seq {first} but {} ends at seq {last_seq}: lines or files are missing",
                        last_file.display()
                    ),
                });
            }
            if report.first_prev != *last_mac {
                return Err(VerifyError {
                    file: path.clone(),
                    line: Some(1),
                    seq: Some(first),
                    kind: VerifyErrorKind::PrevMismatch,
                    detail: format!(
                        "prev does not match the last mac of {}: the files do not link",
                        last_file.display()
                    ),
                });
            }
        }
        if let Some(last_seq) = report.last_seq {
            last = Some((last_seq, report.last_mac.clone(), path.clone()));
        }
        reports.push(report);
    }
    Ok(reports)
}
