//! # caregate-audit: the tamper-evident PHI audit trail
//!
//! HIPAA 45 CFR 164.312(b) asks for audit controls that record and examine activity in systems
//! holding ePHI. caregate records every request on a PHI route, allowed or denied, in an
//! append-only file whose lines form a keyed hash chain, so that an edit, a removal, a reorder
//! or a cut-off tail is detectable by [`verify`] and [`verify_files`] (`caregate audit verify
//! PATH`).
//!
//! ## Use
//!
//! ```no_run
//! use caregate_audit::{AuditConfig, AuditRecord, AuditSink, Phase};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = AuditConfig::new("/var/log/caregate/audit.jsonl", std::env::var("AUDIT_KEY")?);
//! let sink = AuditSink::start(&cfg)?;
//! let mut rec = AuditRecord { request_id: "r-1".into(), phase: Phase::Access, ..Default::default() };
//! rec.action.method = "GET".into();
//! // Before releasing a PHI response: durable (per the fsync policy) or fail closed (503).
//! let seq = sink.append_durable(rec.clone()).await?;
//! // In the logging phase: the outcome, without waiting.
//! rec.phase = Phase::Completion;
//! sink.append(rec)?;
//! // Readiness: not ready while the sink fails or its queue is full.
//! let _ready = sink.healthy();
//! sink.shutdown();
//! # let _ = seq; Ok(()) }
//! ```
//!
//! API: [`AuditConfig`] (the `audit:` YAML section), [`AuditSink::start`],
//! [`AuditSink::start_takeover`], [`AuditSink::hand_over`], [`AuditSink::append_durable`],
//! [`AuditSink::append`], [`AuditSink::healthy`], [`AuditSink::queue_depth`],
//! [`AuditSink::records_written`], [`AuditSink::group_commits`], [`AuditSink::shutdown`],
//! [`AuditError`], [`AuditRecord`], [`verify`], [`verify_files`], [`chain_files`],
//! [`find_trails`], [`fhir::to_fhir_audit_event`], [`now_rfc3339`].
//!
//! ## Writing: a queue and one writer thread
//!
//! `append*` serialize the record on the caller's thread and put it on a bounded queue
//! (`queue_capacity`; beyond it [`AuditError::QueueFull`]). One `std::thread` writer does
//! **group commits**: it takes everything queued, writes all the lines with one `write`,
//! syncs once (`fsync: always`; `batch` first waits up to `batch_max_delay_ms` to gather a
//! bigger group; `never` does not sync), then wakes every waiter of the group with its sequence
//! number. Checkpoints are written every `checkpoint_every_records` records, every
//! `checkpoint_interval_ms` while records are being written, and at shutdown.
//!
//! **One writer per file.** The writer holds an exclusive advisory lock
//! ([`std::fs::File::try_lock`], `flock(2)`) on every file it appends to, for as long as it
//! may write it: the active file and, after a hand-over, the rotated file it still writes.
//! It takes the lock, then checks that the path still names the locked file (device and
//! inode; else it opens it again), before it reads, cuts or appends anything; a new active
//! file is created already locked (a locked temporary file hard-linked to the path). So no file is ever cut or appended by a
//! process that does not hold its lock, and [`AuditSink::start`] fails, saying so, while
//! another process (or another sink of this one) writes the file. The lock is advisory: it
//! keeps caregate processes apart, not other programs; the file system must support `flock`.
//!
//! ## Faults
//!
//! Before each group commit the writer checks that the path still names the open file
//! (device and inode); if the file was removed or replaced it reopens (and locks) the path;
//! if another process holds that lock, the commit fails. A new, empty file continues the
//! chain (its first line is a checkpoint whose `prev` is the last MAC); a non-empty file that
//! does not end with the chain's last line is refused. (After a hand-over the writer does
//! not follow the path: it keeps writing the file it holds.) If a write, fsync
//! or reopen fails, every waiter of that group gets [`AuditError::SinkFailed`], the sink
//! reports unhealthy, and the group's records are **kept**: the next attempt (when more
//! records arrive, or after a backoff of 100 ms doubling to 2 s) cuts the file back to the
//! last complete commit and writes them first, so the chain stays continuous and nothing is
//! lost silently. Kept records count against `queue_capacity`, so a sink that stays down ends
//! in `QueueFull`. The first successful commit makes the sink healthy again. Records still
//! unwritten after three attempts at shutdown are logged as lost.
//!
//! ## File format
//!
//! JSON lines. Every line is one object with its members in this order:
//!
//! ```text
//! {"seq":1,"prev":"","record":{...},"mac":"<64 hex>"}
//! {"seq":2,"prev":"<mac of seq 1>","record":{...},"mac":"..."}
//! {"seq":3,"prev":"<mac of seq 2>","checkpoint":{"records":2,"time":"2024-05-01T12:00:00.123Z"},"mac":"..."}
//! {"seq":4,"prev":"<mac of seq 3>","checkpoint":{"records":2,"time":"...","handover":true},"mac":"..."}
//! ```
//!
//! - `seq`: 1, 2, 3, ... over records and checkpoints, continuous across rotation.
//! - `prev`: the `mac` of the previous line of the chain ("" for the first line ever).
//! - `record`: the [`AuditRecord`] (`format: json`) or a FHIR R4 `AuditEvent`
//!   (`format: fhir_audit_event`, see [`fhir`]).
//! - `checkpoint`: `records` (records in the chain so far: on the chain's path from the
//!   genesis, see [hand-over](#hand-over-between-processes)) and `time`; and, only in the
//!   checkpoint a process writes when it hands the file over, `"handover":true` (covered by
//!   the MAC like the rest); and, when the writer's key has an id (`key_id`), `"key":"<id>"`.
//! - `mac`: lower-case hex of HMAC-SHA256(`hmac_key`, `prev` || *body*), where `prev` is the
//!   ASCII hex string and *body* is the exact bytes of the line without `,"mac":"..."`, i.e.
//!   `{"seq":N,"prev":"...","record":{...}}`, which is serde_json's compact rendering of
//!   that object (keys in the order written). Verification authenticates the bytes as they
//!   are, so any changed byte (even white space) is an edit.
//!
//! **Anchor.** After every checkpoint the writer replaces `<path>.anchor` atomically (temp
//! file, fsync, rename, fsync of the directory) with
//! `{"seq":..,"mac":"..","file":"..","records":..,"time":"..","anchor_mac":".."}`: the last
//! checkpoint's seq and mac, authenticated by `anchor_mac` = HMAC-SHA256(key,
//! `"caregate-audit-anchor\n"` || the object without `anchor_mac`). A file cut off before its
//! anchor's checkpoint fails verification. The anchor is only as safe as its separation from
//! the log: ship copies of it (it is small) to another system or WORM storage to protect
//! against someone who can rewrite both files.
//!
//! **Rotation.** When the active file reaches `rotate_bytes`, the writer seals it with a
//! checkpoint, renames it to `<path>.<n>` (n = highest existing + 1), writes its anchor
//! `<path>.<n>.anchor`, and starts a new `<path>` whose first line is a checkpoint continuing
//! the chain (`prev` = the seal's mac). With `archive_dir`, a background thread copies every
//! rotated file and its anchor there (synced) and only then deletes all but the newest
//! `retain_files` (more while another process still writes an old one after a hand-over, or
//! while one is not archived); without `archive_dir` nothing is deleted.
//!
//! **Keys.** With `key_id`, every checkpoint names its key (`"key":"<id>"`); the records after
//! a checkpoint are authenticated with the key it names. A writer started with a new key
//! resumes a tail written with one of `previous_keys` and first writes a checkpoint naming the
//! new key; [`verify_files_keys`] with [`AuditKeys`] verifies a trail spanning several keys.
//!
//! **Off-host checkpoints.** With `offhost_checkpoints`, every checkpoint line is appended to a
//! file on other storage (and optionally POSTed to a URL) by a thread of its own;
//! [`verify_checkpoints`] checks a trail against those copies, which catches a rewrite of the
//! whole local trail with the key.
//!
//! **Restart.** [`AuditSink::start`] resumes from the file's last line after verifying the
//! lines back to its last checkpoint; see there.
//!
//! ## Hand-over between processes
//!
//! During a zero-downtime upgrade (or a rollback) two gateway processes run at once: the old
//! one drains its requests in flight, for minutes maybe, and writes their late completion
//! records; the new one serves new requests. They never write the same file:
//!
//! 1. The new process starts its sink with [`AuditSink::start_takeover`]: it returns at once,
//!    and its writer waits (records queue meanwhile; durable appends wait) until `<path>`
//!    exists and its lock is free.
//! 2. The old process, told to upgrade, calls [`AuditSink::hand_over`] before its listening
//!    sockets go to the new one. Its writer commits what is queued and a hand-over checkpoint
//!    (`"handover":true`, seq *S*); writes `<path>.handover.tmp` holding one checkpoint that
//!    continues the chain from it (seq *S*+1, `prev` = its mac, the same record count) and
//!    syncs it; renames `<path>` to `<path>.<n>` as rotation does and writes
//!    `<path>.<n>.anchor`; then publishes the temporary file as `<path>` (never over an
//!    existing file) and syncs the directory.
//! 3. The new writer finds `<path>`, locks it and resumes from its checkpoint as at a restart.
//!    The old writer never writes `<path>` again (nor follows it, rotates or prunes): its late
//!    records continue its own chain in `<path>.<n>` after the hand-over checkpoint, under
//!    its lock, and its shutdown seals that file with a final checkpoint and anchor.
//!
//! The chain thus forks at the hand-over checkpoint: the old process's late records are a
//! dead end at the end of `<path>.<n>`; the trail goes on in the next file. Each branch keeps
//! its own `records` count from the hand-over checkpoint's. If the hand-over fails before the
//! rename, the old process goes on writing `<path>` and the new one waits until it exits (the
//! lock is released with the process). If no hand-over happens at all, the new process takes
//! over when the old one exits. Retention never deletes a rotated file another process still
//! holds (nor any newer one). A start without take-over while the trail is held fails; a
//! rollback is one more hand-over, the same way. If a process dies between the rename and the
//! publication, `<path>` stays missing and the waiting process logs that `<path>.handover.tmp`
//! is left: rename it to `<path>`.
//!
//! ## Verification
//!
//! [`verify`] checks one file: every MAC, `seq` continuity, `prev` links, checkpoint counts,
//! and the anchor; it lists the file's hand-over checkpoints ([`HandOverPoint`]). It fails,
//! naming the file, line, seq and what is wrong ([`VerifyError`]), on:
//!
//! - an edited line: its MAC does not match ([`VerifyErrorKind::MacMismatch`]);
//! - a removed line: a `seq` gap ([`VerifyErrorKind::SeqGap`]) or a broken `prev`;
//! - reordered lines ([`VerifyErrorKind::Reordered`]);
//! - a tail cut inside a line ([`VerifyErrorKind::IncompleteLine`]), or before the anchor's
//!   checkpoint ([`VerifyErrorKind::Truncated`]), or an anchor that names a different line
//!   ([`VerifyErrorKind::AnchorMismatch`]).
//!
//! Records after the last checkpoint are reported as `unsealed tail: N records`, a warning:
//! a running gateway always has one, and cutting it off cannot be detected. A file whose first
//! line has `seq` > 1 and a non-empty `prev` is accepted as the **continuation** of a rotated
//! predecessor (noted in the report) if that line is a checkpoint, as caregate always writes
//! it; the link itself is checked by [`verify_files`] over [`chain_files`] (all rotated files
//! plus the active one). Removing the head of a file exactly up to a checkpoint therefore
//! only shows in [`verify_files`].
//!
//! [`verify_files`] checks the segments of a trail, oldest first, and their links: each
//! file's first line must continue the previous file's last line (rotation) or one of its
//! hand-over checkpoints (hand-over; the lines after it are the old process's late records,
//! verified as part of that file's chain), with the record count carried over. It fails,
//! naming the file, on a missing segment ([`VerifyErrorKind::SeqGap`] or
//! [`VerifyErrorKind::PrevMismatch`]), segments out of order, e.g. renamed
//! ([`VerifyErrorKind::Reordered`]), a second file continuing the same point
//! ([`VerifyErrorKind::Forked`]), a link into the middle of a file at a line that is not a
//! hand-over checkpoint ([`VerifyErrorKind::BadLink`]), and a cut segment (its anchor names a
//! checkpoint beyond its end, as for one file). Late records without a final checkpoint (the
//! old process was killed) and a hand-over checkpoint no later file continues are warnings.
//! `caregate audit verify PATH` runs it over [`chain_files`] of PATH, or over every trail of a
//! directory ([`find_trails`]).
//!
//! ## Reports
//!
//! [`report()`] lists every access to one patient's data (`caregate audit report --patient X`),
//! or, with [`Query::break_glass`], every request that used emergency access (`caregate audit
//! report --break-glass`, the next-day review), from a trail that verified: it runs
//! [`verify_files`] first and refuses a trail that fails; see [`mod@report`].

pub mod calendar;
mod chain;
mod config;
pub mod fhir;
mod record;
pub mod report;
mod retention;
mod sink;
mod verify;

pub use chain::{anchor_path, build_line, Anchor, AuditKeys};
pub use config::{
    AuditConfig, AuditFormat, FsyncPolicy, OffHostCheckpoints, PreviousKey, MIN_HMAC_KEY_BYTES,
};
pub use record::{
    format_rfc3339_millis, now_rfc3339, Action, Actor, AnomalyDetails, AuditRecord, BreakGlassUse,
    ConfigChange, Hl7Message, Hl7PatientId, Outcome, Phase, Upstream,
};
pub use report::{report, report_verified, Entry, Query, ReportError};
pub use sink::{AuditError, AuditSink};
pub use verify::{
    chain_files, find_trails, verify, verify_checkpoints, verify_files, verify_files_keys,
    verify_keys, AnchorCheck, CheckpointCopies, FoundTrails, HandOverPoint, SegmentLink,
    VerifyError, VerifyErrorKind, VerifyReport,
};
