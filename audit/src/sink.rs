//! The sink: a bounded queue in front of one writer thread doing group commits.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::chain::{self, Anchor, AuditKeys, LineKind};
use crate::config::{AuditConfig, AuditFormat, FsyncPolicy};
use crate::fhir::to_fhir_audit_event;
use crate::record::{now_rfc3339, AuditRecord};
use crate::retention::{Archiver, ExportStats, Exporter};

/// Why a record was not (durably) written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditError {
    /// The queue holds `queue_capacity` records (queued, in flight or kept for retry). The
    /// record was not accepted.
    QueueFull,
    /// The group commit carrying the record failed (write, fsync or reopen). The record was
    /// accepted and is kept: the writer retries it first, so it lands in the chain once the
    /// sink recovers (unless the process stops first). It is not durable now.
    SinkFailed,
    /// The sink was shut down.
    Closed,
}

impl std::fmt::Display for AuditError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuditError::QueueFull => "audit queue full",
            AuditError::SinkFailed => "audit sink failed",
            AuditError::Closed => "audit sink closed",
        })
    }
}

impl std::error::Error for AuditError {}

type Waiter = oneshot::Sender<Result<u64, AuditError>>;
type HandOverReply = mpsc::Sender<Result<(), AuditError>>;

struct Item {
    /// The `record` member, compact JSON.
    payload: Vec<u8>,
    waiter: Option<Waiter>,
}

struct QueueState {
    queue: VecDeque<Item>,
    /// When the queue last went from empty to non-empty (for `fsync: batch`, and for queues
    /// holding only records nobody waits for).
    first_enqueued: Option<Instant>,
    /// Queued records whose caller waits for their commit (`append_durable`).
    waiting: usize,
    closed: bool,
    /// Callers of [`AuditSink::hand_over`] waiting for the writer's answer.
    handovers: Vec<HandOverReply>,
}

struct Shared {
    state: Mutex<QueueState>,
    wake: Condvar,
    capacity: usize,
    /// Records accepted and not yet written: queued, in the writer's hands, or kept for retry.
    depth: AtomicUsize,
    /// The last group commit succeeded.
    sink_ok: AtomicBool,
    closed: AtomicBool,
    written: AtomicU64,
    commits: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The audit sink. `Send + Sync`; share it as `Arc<AuditSink>`.
pub struct AuditSink {
    shared: Arc<Shared>,
    format: AuditFormat,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The archiver and checkpoint exporter threads, joined after the writer.
    helpers: Mutex<Vec<JoinHandle<()>>>,
    export: Arc<ExportStats>,
}

/// With `fsync: batch`, a queue this long is committed without waiting for the delay.
const BATCH_FLUSH_LEN: usize = 512;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// First read window when looking for the last checkpoint of a file.
const TAIL_WINDOW: u64 = 256 * 1024;
/// How often a taking-over writer looks whether it can have the file.
const TAKEOVER_POLL: Duration = Duration::from_millis(20);
/// How often a taking-over writer says that it is still waiting.
const TAKEOVER_LOG_EVERY: Duration = Duration::from_secs(10);

impl AuditSink {
    /// Opens (or creates) `cfg.path` for appending, takes its lock, resumes the chain from its
    /// last line and spawns the writer thread.
    ///
    /// **One writer per file.** The writer holds an exclusive advisory lock
    /// ([`File::try_lock`], `flock(2)`) on every file it appends to, for as long as it may write
    /// it. If another process (or another sink of this one) holds the lock of `cfg.path`, this
    /// fails with an error saying so: during a zero-downtime upgrade the new process uses
    /// [`AuditSink::start_takeover`] instead.
    ///
    /// Resuming reads the file's tail back to its last checkpoint and verifies those lines
    /// (MAC and chain) with the key: a tail that fails (edited, or another key) is an error, so
    /// a chain is never extended past lines it cannot vouch for. An incomplete last line (an
    /// interrupted write: never acknowledged) is cut off. An empty or missing file continues
    /// from the newest rotated file (`<path>.<n>`), if any (an error while another process
    /// still holds that file's lock), else starts a new chain (seq 1). If the anchor
    /// (`<path>.anchor`) is forged or names a checkpoint beyond the chain's end (the file was
    /// cut off or removed), this is an error too: investigate with [`crate::verify`], then move
    /// the anchor aside to start anyway.
    pub fn start(cfg: &AuditConfig) -> Result<Arc<AuditSink>, String> {
        cfg.validate()?;
        let path = cfg.path.clone();
        let keys = cfg.keys();
        create_parent(&path)?;
        let shown = path.display();
        let opened = open_locked(&path, false).map_err(|e| format!("audit.path: {shown}: {e}"))?;
        let file = match opened {
            Opened::Locked(f) => f,
            Opened::Held => return Err(held_error(&path)),
            Opened::Missing => {
                // Do not create the file while a hand-over is under way (between renaming the
                // old file and publishing its continuation, the path is absent for a moment).
                if let Some((_, rotated)) = rotated_files(&path).pop() {
                    if locked_by_other(&rotated) {
                        return Err(still_written_error(&path, &rotated));
                    }
                }
                match open_locked(&path, true).map_err(|e| format!("audit.path: {shown}: {e}"))? {
                    Opened::Locked(f) => f,
                    Opened::Held => return Err(held_error(&path)),
                    Opened::Missing => {
                        return Err(format!(
                            "audit.path: {shown}: removed while it was being created"
                        ))
                    }
                }
            }
        };
        let resumed = resume(&path, &keys, file)?;
        AuditSink::spawn(cfg, keys, Some(resumed))
    }

    /// Starts a sink that takes the audit trail over from the process running now (a
    /// zero-downtime upgrade, or a rollback to the previous binary). Returns at once.
    ///
    /// The configuration and the anchor's authenticity are checked now (errors as for
    /// [`AuditSink::start`]). The writer thread then waits (polling every 20 ms, logging at
    /// `info` at once and every 10 s) until `cfg.path` exists and its lock is free: the old
    /// process releases it by [`AuditSink::hand_over`] (it renames the file away and publishes a
    /// new `cfg.path` continuing the chain) or by exiting. It never creates `cfg.path`. Then it
    /// resumes exactly as [`AuditSink::start`] does. If the lock is free at once (the old process
    /// has exited, or there is none), it proceeds at once.
    ///
    /// Meanwhile records queue as usual ([`AuditSink::append_durable`] waits; the queue bound
    /// applies), [`AuditSink::healthy`] stays true and nothing counts as written. If resuming
    /// fails (the tail does not verify, the anchor names a checkpoint beyond the chain's end),
    /// the sink turns unhealthy, logs the reason, answers waiting and later durable appends with
    /// [`AuditError::SinkFailed`] (keeping the records) and retries with a backoff up to 2 s.
    /// Shut down while waiting, it logs the queued records as lost.
    pub fn start_takeover(cfg: &AuditConfig) -> Result<Arc<AuditSink>, String> {
        cfg.validate()?;
        let path = cfg.path.clone();
        let keys = cfg.keys();
        create_parent(&path)?;
        // Whether the anchor fits the chain is checked when the file is acquired (the old
        // process still moves it); a forged or unreadable one is an error now.
        chain::read_anchor(&keys, &path).map_err(|e| format!("audit: {e}"))?;
        AuditSink::spawn(cfg, keys, None)
    }

    /// Hands the audit trail over to the next process (call it in the old process when it is
    /// told to upgrade, before its listening sockets go to the new process). Blocks until done;
    /// from async code call it in `spawn_blocking`.
    ///
    /// The writer commits what is queued and writes a hand-over checkpoint
    /// (`"handover":true`); writes the continuation file (one checkpoint continuing the chain
    /// from it) under the temporary name `<path>.handover.tmp` and syncs it; renames `<path>`
    /// to `<path>.<n>` (as rotation does) and writes `<path>.<n>.anchor`; publishes the
    /// continuation as `<path>` (never replacing an existing file) and syncs the directory.
    /// From then on this sink never writes `<path>` again: the records it still gets (late
    /// completions of requests in flight) continue its own chain in `<path>.<n>` after the
    /// hand-over checkpoint, under its lock, and [`AuditSink::shutdown`] seals that file with
    /// a final checkpoint and anchor. It no longer rotates or prunes.
    ///
    /// Calling it again is harmless (`Ok`). Errors: [`AuditError::SinkFailed`] when the commit
    /// failed or the continuation could not be published (logged; if the file was not renamed
    /// yet, the sink goes on as before and the new process waits until this one exits),
    /// [`AuditError::Closed`] after shutdown. A sink still waiting to take over first waits
    /// until it has the file (its predecessor hands over or exits); one whose take-over failed
    /// answers [`AuditError::SinkFailed`] at once.
    pub fn hand_over(&self) -> Result<(), AuditError> {
        let (tx, rx) = mpsc::channel();
        {
            let mut st = self.shared.lock();
            if st.closed {
                return Err(AuditError::Closed);
            }
            st.handovers.push(tx);
        }
        self.shared.wake.notify_all();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(r) => return r,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(AuditError::Closed),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let gone = self
                        .writer
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .as_ref()
                        .is_none_or(JoinHandle::is_finished);
                    if gone {
                        // The writer may have answered just before it ended.
                        return rx.try_recv().unwrap_or(Err(AuditError::Closed));
                    }
                }
            }
        }
    }

    fn spawn(
        cfg: &AuditConfig,
        keys: AuditKeys,
        resumed: Option<Resumed>,
    ) -> Result<Arc<AuditSink>, String> {
        let export = Arc::new(ExportStats::default());
        let mut helpers = Vec::new();
        let sync = cfg.fsync != FsyncPolicy::Never;
        let exporter = match &cfg.offhost_checkpoints {
            Some(o) => {
                let (e, h) = Exporter::start(o, sync, export.clone())?;
                helpers.push(h);
                Some(e)
            }
            None => None,
        };
        let archiver = match &cfg.archive_dir {
            Some(dir) => {
                let (a, h) = Archiver::start(&cfg.path, dir, cfg.retain_files, sync)?;
                helpers.push(h);
                Some(a)
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(QueueState {
                queue: VecDeque::new(),
                first_enqueued: None,
                waiting: 0,
                closed: false,
                handovers: Vec::new(),
            }),
            wake: Condvar::new(),
            capacity: cfg.queue_capacity,
            depth: AtomicUsize::new(0),
            sink_ok: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            written: AtomicU64::new(0),
            commits: AtomicU64::new(0),
        });
        let mut writer = Writer {
            shared: shared.clone(),
            path: cfg.path.clone(),
            file_path: cfg.path.clone(),
            key: keys.key(0).to_vec(),
            key_id: cfg.key_id.clone(),
            keys,
            key_switch: false,
            exporter,
            archiver,
            fsync: cfg.fsync,
            batch_delay: Duration::from_millis(cfg.batch_max_delay_ms),
            cp_every: cfg.checkpoint_every_records,
            cp_interval: Duration::from_millis(cfg.checkpoint_interval_ms),
            rotate_bytes: cfg.rotate_bytes,
            acquiring: true,
            handed_over: false,
            startup_commit: false,
            file: None,
            pos: None,
            head_seq: 0,
            head_mac: String::new(),
            records_total: 0,
            unsealed: 0,
            last_cp_at: Instant::now(),
            pending: Vec::new(),
            failing: false,
            backoff: BACKOFF_START,
            retry_at: None,
        };
        if let Some(r) = resumed {
            writer.resumed(r);
        }
        // Archive what earlier runs rotated (and prune, if due) without waiting for a rotation.
        if let Some(a) = &writer.archiver {
            a.trigger();
        }
        let handle = std::thread::Builder::new()
            .name("caregate-audit".into())
            .spawn(move || writer.run())
            .map_err(|e| format!("audit: cannot start the writer thread: {e}"))?;
        Ok(Arc::new(AuditSink {
            shared,
            format: cfg.format,
            writer: Mutex::new(Some(handle)),
            helpers: Mutex::new(helpers),
            export,
        }))
    }
    /// Queues `rec` and waits until its group commit is written (and fsynced, per the
    /// policy). Returns the record's sequence number.
    ///
    /// Errors: [`AuditError::QueueFull`] (not accepted), [`AuditError::SinkFailed`] (accepted,
    /// kept for retry, not durable now), [`AuditError::Closed`]. Dropping the future does not
    /// withdraw the record.
    pub async fn append_durable(&self, rec: AuditRecord) -> Result<u64, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(rec, Some(tx))?;
        rx.await.unwrap_or(Err(AuditError::Closed))
    }

    /// Queues `rec` without waiting (completion and denied records). Its sequence number is
    /// assigned when it is written.
    pub fn append(&self, rec: AuditRecord) -> Result<(), AuditError> {
        self.enqueue(rec, None)
    }

    /// False while the last group commit (write, fsync or reopen) failed, while the queue is
    /// full, and after shutdown; true again once a commit succeeds. While a take-over waits for
    /// the file it stays true (records queue; none counts as written) unless resuming failed.
    pub fn healthy(&self) -> bool {
        self.shared.sink_ok.load(Ordering::Acquire)
            && !self.shared.closed.load(Ordering::Acquire)
            && self.shared.depth.load(Ordering::Acquire) < self.shared.capacity
    }

    /// Records accepted and not yet written (queued, being written, or kept for retry).
    pub fn queue_depth(&self) -> usize {
        self.shared.depth.load(Ordering::Acquire)
    }

    /// Records written (and synced per the policy) by this sink since it started; checkpoints
    /// are not counted.
    pub fn records_written(&self) -> u64 {
        self.shared.written.load(Ordering::Acquire)
    }

    /// Successful group commits (one write and at most one fsync each) since start.
    pub fn group_commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Acquire)
    }

    /// Checkpoint lines copied off the host (`offhost_checkpoints`): appended to its file.
    pub fn checkpoints_exported(&self) -> u64 {
        self.export.exported.load(Ordering::Acquire)
    }

    /// Checkpoint copies that failed (file append or sync, HTTP POST, or dropped because the
    /// exporter's queue was full), each logged. They never hold up the trail's own writes.
    pub fn checkpoint_export_failures(&self) -> u64 {
        self.export.failures.load(Ordering::Acquire)
    }

    /// Stops accepting records, writes everything queued, seals the file with a final
    /// checkpoint (and anchor) and joins the writer thread, which releases the file's lock.
    /// After a hand-over the file sealed is the rotated file `<path>.<n>` this sink still
    /// writes. Blocks; idempotent. If the sink is failing, it retries a few times, then logs
    /// how many records were lost; a sink still waiting to take over logs its queued records
    /// as lost.
    pub fn shutdown(&self) {
        {
            let mut st = self.shared.lock();
            st.closed = true;
            self.shared.closed.store(true, Ordering::Release);
        }
        self.shared.wake.notify_all();
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = handle {
            if h.join().is_err() {
                log::error!("audit: the writer thread panicked");
            }
        }
        // The writer is gone: the exporter and the archiver finish what they were given.
        let helpers =
            std::mem::take(&mut *self.helpers.lock().unwrap_or_else(PoisonError::into_inner));
        for h in helpers {
            if h.join().is_err() {
                log::error!("audit: a helper thread panicked");
            }
        }
    }

    fn enqueue(&self, mut rec: AuditRecord, waiter: Option<Waiter>) -> Result<(), AuditError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(AuditError::Closed);
        }
        if self.shared.depth.load(Ordering::Acquire) >= self.shared.capacity {
            return Err(AuditError::QueueFull);
        }
        if rec.time.is_empty() {
            rec.time = now_rfc3339();
        }
        let payload = match self.format {
            AuditFormat::Json => serde_json::to_vec(&rec),
            AuditFormat::FhirAuditEvent => serde_json::to_vec(&to_fhir_audit_event(&rec)),
        }
        .map_err(|e| {
            log::error!("audit: cannot serialize a record: {e}");
            AuditError::SinkFailed
        })?;
        {
            let mut st = self.shared.lock();
            if st.closed {
                return Err(AuditError::Closed);
            }
            if self.shared.depth.load(Ordering::Acquire) >= self.shared.capacity {
                return Err(AuditError::QueueFull);
            }
            self.shared.depth.fetch_add(1, Ordering::AcqRel);
            let first = st.queue.is_empty();
            if first {
                st.first_enqueued = Some(Instant::now());
            }
            let durable = waiter.is_some();
            if durable {
                st.waiting += 1;
            }
            st.queue.push_back(Item { payload, waiter });
            // The writer already knows about a non-empty queue (it is committing, or waiting
            // with a deadline from `first_enqueued`); wake it only when that changes.
            if !(first || durable || st.queue.len() >= BATCH_FLUSH_LEN) {
                return Ok(());
            }
        }
        self.shared.wake.notify_one();
        Ok(())
    }
}

impl Drop for AuditSink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink")
            .field("healthy", &self.healthy())
            .field("queue_depth", &self.queue_depth())
            .field("records_written", &self.records_written())
            .finish()
    }
}

/// Rotated files `<path>.<n>`, oldest (smallest n) first.
pub(crate) fn rotated_files(path: &Path) -> Vec<(u64, PathBuf)> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!("{name}.");
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            let file_name = e.file_name();
            let Some(f) = file_name.to_str() else {
                continue;
            };
            let Some(rest) = f.strip_prefix(&prefix) else {
                continue;
            };
            if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Ok(n) = rest.parse::<u64>() {
                out.push((n, dir.join(f)));
            }
        }
    }
    out.sort();
    out
}

fn create_parent(path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| format!("audit.path: {}: {e}", dir.display()))?;
    }
    Ok(())
}

fn held_error(path: &Path) -> String {
    format!(
        "audit: {}: another running process writes this audit trail (the file is locked; pid unknown); \
         to take over from it use `run --upgrade`",
        path.display()
    )
}

fn still_written_error(path: &Path, rotated: &Path) -> String {
    format!(
        "audit: {}: another running process still writes {} (it is handing this audit trail over, \
         or finishing after a hand-over; pid unknown); to take over from it use `run --upgrade`",
        path.display(),
        rotated.display()
    )
}

/// What [`open_locked`] found.
enum Opened {
    /// Open for appending, locked by us, and the path names it.
    Locked(File),
    /// Another open file (another process, or another sink of this one) holds the lock.
    Held,
    /// There is no file at the path (and `create` was false).
    Missing,
}

/// Opens `path` for reading and appending and takes its exclusive lock without waiting; then
/// checks that the path still names the locked file (device and inode), else opens it again.
/// With `create`, a missing file is created already locked ([`create_locked`]).
fn open_locked(path: &Path, create: bool) -> io::Result<Opened> {
    for _ in 0..16 {
        let file = match OpenOptions::new().read(true).append(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Ok(Opened::Missing);
                }
                match create_locked(path) {
                    Ok(f) => return Ok(Opened::Locked(f)),
                    // Someone else created it meanwhile: open theirs (and find its lock).
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(Opened::Held),
            Err(TryLockError::Error(e)) => return Err(lock_error(e)),
        }
        if names(path, &file)? {
            return Ok(Opened::Locked(file));
        }
        // Renamed or replaced between the open and the lock: the lock is not the path's.
    }
    Err(io::Error::other(
        "the path was replaced again and again while it was being opened",
    ))
}

fn lock_error(e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("cannot lock the file (the audit trail needs file locks): {e}"),
    )
}

/// Whether `path` names the open `file` (same device and inode).
fn names(path: &Path, file: &File) -> io::Result<bool> {
    let m = file.metadata()?;
    match fs::metadata(path) {
        Ok(p) => Ok(p.dev() == m.dev() && p.ino() == m.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Creates `path` as a new, empty file that is locked before it appears under that name, so
/// that no other process can take its lock first: a locked temporary file, hard-linked to
/// `path` (which fails if `path` exists), then unlinked. `AlreadyExists` if `path` exists.
fn create_locked(path: &Path) -> io::Result<File> {
    static N: AtomicU64 = AtomicU64::new(0);
    let tmp = chain::sibling(
        path,
        &format!(
            ".new-{}-{}.tmp",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ),
    );
    let _ = fs::remove_file(&tmp); // left by an earlier process with the same pid
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .open(&tmp)?;
    if let Err(e) = file.try_lock() {
        let _ = fs::remove_file(&tmp);
        return Err(match e {
            TryLockError::WouldBlock => io::Error::other("a new file was locked by another"),
            TryLockError::Error(e) => lock_error(e),
        });
    }
    let linked = link_no_replace(&tmp, path);
    let _ = fs::remove_file(&tmp);
    linked.map(|()| file)
}

/// Gives the file `from` the name `to` unless `to` exists (`AlreadyExists`): a hard link
/// (`from` keeps its name too), or a rename where the file system has no hard links.
pub(crate) fn link_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    match fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
        Err(e) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, e));
            }
            log::debug!(
                "audit: cannot hard-link {} ({e}); renaming it instead",
                from.display()
            );
            fs::rename(from, to)
        }
    }
}

/// Whether another open file (another process, or another sink of this one) holds the lock of
/// `path`. Takes the lock for a moment when it is free.
pub(crate) fn locked_by_other(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    matches!(f.try_lock(), Err(TryLockError::WouldBlock))
}

/// `<path>.handover.tmp`: where a hand-over prepares the continuation file.
fn handover_tmp(path: &Path) -> PathBuf {
    chain::sibling(path, ".handover.tmp")
}

/// The number the next rotated file gets: the highest existing + 1.
fn next_rotated(path: &Path) -> u64 {
    rotated_files(path).last().map_or(1, |(n, _)| n + 1)
}

/// Where a resumed chain stands: what [`resume`] found in a locked file.
struct Resumed {
    file: File,
    pos: FilePos,
    seq: u64,
    mac: String,
    records_total: u64,
    unsealed: u64,
    /// Index (in the writer's keys) of the key the chain's last line was written with; `None`
    /// for a new chain.
    key: Option<usize>,
}

/// Resumes the chain from `file` (open, locked, named by `path`): verifies its tail back to the
/// last checkpoint, cuts an incomplete last line, continues the newest rotated file if it is
/// empty, and checks the anchor. See [`AuditSink::start`].
fn resume(path: &Path, keys: &AuditKeys, file: File) -> Result<Resumed, String> {
    let shown = path.display();
    let meta = file
        .metadata()
        .map_err(|e| format!("audit.path: {shown}: {e}"))?;
    let mut tail =
        read_tail(&file, meta.len(), keys).map_err(|e| format!("audit.path: {shown}: {e}"))?;
    if tail.valid_len < meta.len() {
        log::warn!(
            "audit: {shown}: removing an incomplete last line ({} bytes) left by an interrupted write",
            meta.len() - tail.valid_len
        );
        file.set_len(tail.valid_len)
            .map_err(|e| format!("audit.path: {shown}: {e}"))?;
    }
    if tail.valid_len == 0 {
        if let Some((n, rotated)) = rotated_files(path).pop() {
            if locked_by_other(&rotated) {
                return Err(still_written_error(path, &rotated));
            }
            let f =
                File::open(&rotated).map_err(|e| format!("audit: {}: {e}", rotated.display()))?;
            let len = f
                .metadata()
                .map_err(|e| format!("audit: {}: {e}", rotated.display()))?
                .len();
            tail = read_tail(&f, len, keys)
                .map_err(|e| format!("audit: {}: {e}", rotated.display()))?;
            tail.valid_len = 0;
            log::info!(
                "audit: {shown} is empty; continuing the chain of rotated file {n} at seq {}",
                tail.seq
            );
        }
    }
    let records_total = match tail.records_total {
        Some(r) => r,
        None => {
            log::warn!(
                "audit: {shown}: the chain's record count is unknown (no checkpoint since seq {}); counting from here",
                tail.first_seq
            );
            tail.unsealed
        }
    };
    if let Some(anchor) = chain::read_anchor(keys, path).map_err(|e| format!("audit: {e}"))? {
        if anchor.seq > tail.seq {
            return Err(format!(
                "audit: the chain in {shown} ends at seq {} but its anchor names checkpoint seq {} ({}): \
                 the trail was cut off or removed; check it with `caregate audit verify`, then move the anchor aside to start anyway",
                tail.seq,
                anchor.seq,
                anchor.time
            ));
        }
    }
    Ok(Resumed {
        pos: FilePos {
            dev: meta.dev(),
            ino: meta.ino(),
            committed: tail.valid_len,
        },
        file,
        seq: tail.seq,
        mac: tail.mac,
        records_total,
        unsealed: tail.unsealed,
        key: tail.key,
    })
}

/// The end of a file's chain, as found by [`read_tail`].
#[derive(Debug, Clone, Default)]
struct Tail {
    /// seq and mac of the last complete line (0 and "" for an empty file).
    seq: u64,
    mac: String,
    /// seq of the first line read.
    first_seq: u64,
    /// Records in the chain, when known (from a checkpoint or from the genesis).
    records_total: Option<u64>,
    /// Records after the last checkpoint.
    unsealed: u64,
    /// Length up to the end of the last complete line.
    valid_len: u64,
    /// Index (in the keys) of the key the last line was written with.
    key: Option<usize>,
}

/// Reads a file backwards to its last checkpoint (or its start) and verifies those lines.
fn read_tail(file: &File, len: u64, keys: &AuditKeys) -> Result<Tail, String> {
    let mut window = TAIL_WINDOW;
    loop {
        let start = len.saturating_sub(window);
        let size = usize::try_from(len - start).map_err(|_| "file too large".to_string())?;
        let mut buf = vec![0u8; size];
        file.read_exact_at(&mut buf, start)
            .map_err(|e| format!("cannot read: {e}"))?;
        // Skip the (partial) line the window starts in.
        let from = if start == 0 {
            Some(0)
        } else {
            buf.iter().position(|b| *b == b'\n').map(|i| i + 1)
        };
        let end = buf.iter().rposition(|b| *b == b'\n').map(|i| i + 1);
        let (from, end) = match (from, end) {
            (Some(f), Some(e)) if e > f => (f, e),
            _ if start == 0 => {
                // No complete line at all: nothing, or an interrupted first write.
                if !buf.is_empty() && !buf.starts_with(b"{\"seq\":") {
                    return Err("the file holds no audit line".into());
                }
                return Ok(Tail::default());
            }
            _ => {
                window = window.saturating_mul(4);
                continue;
            }
        };
        let partial = &buf[end..];
        if !partial.is_empty() && !partial.starts_with(b"{\"seq\":") {
            return Err(format!(
                "the file ends with {} bytes that are not an audit line",
                partial.len()
            ));
        }
        let mut lines = Vec::new();
        let mut off = from;
        let mut in_force = None;
        for raw in buf[from..end].split(|b| *b == b'\n') {
            let at = start + off as u64;
            off += raw.len() + 1;
            if off > end {
                break; // the empty piece after the final newline
            }
            let (p, k) = chain::parse_line_keys(keys, raw, in_force).map_err(|e| {
                let what = match e {
                    chain::LineError::Malformed(m) => m,
                    chain::LineError::MacMismatch => {
                        "mac mismatch (the line was edited, or hmac_key is not the key this file was written with: \
                         after a key rotation list the earlier key in audit.previous_keys)".into()
                    }
                    chain::LineError::UnknownKey(id) => format!(
                        "the checkpoint names key id {id:?}, which is neither audit.key_id nor in audit.previous_keys"
                    ),
                };
                format!("the line at byte {at} fails verification: {what}")
            })?;
            in_force = Some(k);
            lines.push((at, p));
        }
        for w in lines.windows(2) {
            let (at, b) = (&w[1].0, &w[1].1);
            let a = &w[0].1;
            if b.seq != a.seq + 1 || b.prev != a.mac {
                return Err(format!(
                    "the line at byte {at} (seq {}) does not follow seq {}: the chain is broken",
                    b.seq, a.seq
                ));
            }
        }
        if start == 0 {
            if let Some((_, first)) = lines.first() {
                let genesis_ok = if first.seq == 1 {
                    first.prev.is_empty()
                } else {
                    !first.prev.is_empty()
                };
                if !genesis_ok {
                    return Err(format!(
                        "the first line (seq {}) does not start or continue a chain",
                        first.seq
                    ));
                }
            }
        }
        let cp = lines
            .iter()
            .rposition(|(_, p)| matches!(p.kind, LineKind::Checkpoint { .. }));
        if cp.is_none() && start > 0 {
            window = window.saturating_mul(4);
            continue;
        }
        let Some((_, last)) = lines.last() else {
            return Ok(Tail::default());
        };
        let first_seq = lines.first().map(|(_, p)| p.seq).unwrap_or(0);
        let (records_total, unsealed) = match cp {
            Some(i) => {
                let after = lines[i + 1..]
                    .iter()
                    .filter(|(_, p)| p.kind == LineKind::Record)
                    .count() as u64;
                let base = match &lines[i].1.kind {
                    LineKind::Checkpoint { records, .. } => *records,
                    LineKind::Record => 0,
                };
                (Some(base + after), after)
            }
            None => {
                let n = lines
                    .iter()
                    .filter(|(_, p)| p.kind == LineKind::Record)
                    .count() as u64;
                ((first_seq == 1).then_some(n), n)
            }
        };
        return Ok(Tail {
            seq: last.seq,
            mac: last.mac.clone(),
            first_seq,
            records_total,
            unsealed,
            valid_len: start + end as u64,
            key: in_force,
        });
    }
}

/// Where the writer is in the file it writes.
#[derive(Debug, Clone, Copy)]
struct FilePos {
    dev: u64,
    ino: u64,
    /// Bytes known to be ours and complete; anything beyond is an interrupted write.
    committed: u64,
}

/// Which checkpoint a commit ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seal {
    /// None (beyond those due every `cp_every` records).
    No,
    /// A checkpoint if records are unsealed.
    Checkpoint,
    /// A hand-over checkpoint, always.
    HandOver,
}

/// What [`Writer::wait_for_work`] returns.
struct Work {
    batch: Vec<Item>,
    closed: bool,
    handovers: Vec<HandOverReply>,
}

/// What a taking-over writer found at the path.
enum Acquired {
    Resumed(Resumed),
    /// Not yet: why.
    Wait(&'static str),
}

struct Writer {
    shared: Arc<Shared>,
    /// The configured path (the active file).
    path: PathBuf,
    /// The file written: `path`, or after a hand-over the rotated file `<path>.<n>`.
    file_path: PathBuf,
    /// The key lines are written with (`hmac_key`), and its id (`key_id`).
    key: Vec<u8>,
    key_id: Option<String>,
    /// Every key accepted when reading back: `hmac_key`, then `previous_keys`.
    keys: AuditKeys,
    /// The chain's last line was written with another key: the next commit starts with a
    /// checkpoint naming `key_id` (the key changes there).
    key_switch: bool,
    /// Copies checkpoint lines off the host.
    exporter: Option<Exporter>,
    /// Archives rotated files (and prunes them per `retain_files`).
    archiver: Option<Archiver>,
    fsync: FsyncPolicy,
    batch_delay: Duration,
    cp_every: u64,
    cp_interval: Duration,
    rotate_bytes: u64,
    /// Taking over: the file is not ours yet ([`Writer::acquire`]).
    acquiring: bool,
    /// Handed over: this writer writes `file_path` (never `path`), through the file it holds
    /// open and locked; it neither follows the path, nor rotates, nor prunes.
    handed_over: bool,
    /// Commit as soon as possible even with nothing queued (to open a continuation file).
    startup_commit: bool,
    file: Option<File>,
    pos: Option<FilePos>,
    head_seq: u64,
    head_mac: String,
    records_total: u64,
    unsealed: u64,
    last_cp_at: Instant,
    /// Records of failed commits, retried first (their waiters already got `SinkFailed`).
    pending: Vec<Item>,
    failing: bool,
    backoff: Duration,
    retry_at: Option<Instant>,
}

fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

impl Writer {
    fn run(mut self) {
        if self.acquiring && !self.acquire() {
            self.close_out();
            return;
        }
        loop {
            let work = self.wait_for_work();
            let mut items = std::mem::take(&mut self.pending);
            items.extend(work.batch);
            if !work.handovers.is_empty() {
                let result = self.hand_over(items);
                for tx in work.handovers {
                    let _ = tx.send(result);
                }
                if work.closed {
                    self.finish(Vec::new());
                    self.close_out();
                    return;
                }
                continue;
            }
            if work.closed {
                self.finish(items);
                self.close_out();
                return;
            }
            let checkpoint_due = self.unsealed > 0 && self.last_cp_at.elapsed() >= self.cp_interval;
            if items.is_empty() && !checkpoint_due && !self.startup_commit {
                continue;
            }
            let seal = if checkpoint_due {
                Seal::Checkpoint
            } else {
                Seal::No
            };
            if self.commit_and_settle(items, seal) && self.rotation_due() {
                self.rotate();
            }
        }
    }

    /// Takes over the state [`resume`] found.
    fn resumed(&mut self, r: Resumed) {
        // Written with an earlier key (a key rotation): the chain goes on with this one after a
        // checkpoint that names it.
        self.key_switch = r
            .key
            .is_some_and(|k| self.keys.key(k) != self.key.as_slice());
        if self.key_switch {
            log::info!(
                "audit: {}: the chain was written with another key; continuing it with key {} from seq {}",
                self.path.display(),
                self.key_id.as_deref().unwrap_or("(unnamed)"),
                r.seq + 1
            );
        }
        self.startup_commit = (r.pos.committed == 0 && r.seq > 0) || self.key_switch;
        self.file = Some(r.file);
        self.pos = Some(r.pos);
        self.head_seq = r.seq;
        self.head_mac = r.mac;
        self.records_total = r.records_total;
        self.unsealed = r.unsealed;
        self.file_path = self.path.clone();
        self.last_cp_at = Instant::now();
        self.acquiring = false;
    }

    /// Take-over: waits until the path exists and its lock is free, then resumes from it.
    /// Returns false if the sink was shut down first.
    fn acquire(&mut self) -> bool {
        let shown = self.path.display().to_string();
        let since = Instant::now();
        let mut next_log: Option<Instant> = None;
        let mut last_error: Option<String> = None;
        let mut poll_at = since;
        loop {
            if self.shared.lock().closed {
                self.abandon_queue();
                return false;
            }
            let now = Instant::now();
            if now >= poll_at {
                match self.try_acquire() {
                    Ok(Acquired::Resumed(r)) => {
                        self.resumed(r);
                        if self.failing {
                            self.failing = false;
                            self.backoff = BACKOFF_START;
                            self.shared.sink_ok.store(true, Ordering::Release);
                        }
                        log::info!(
                            "audit: {shown}: took the audit trail over at seq {} (after {} ms)",
                            self.head_seq,
                            since.elapsed().as_millis()
                        );
                        return true;
                    }
                    Ok(Acquired::Wait(why)) => {
                        if next_log.is_none_or(|t| now >= t) {
                            let tmp = handover_tmp(&self.path);
                            let hint = if why == WAIT_MISSING && tmp.exists() {
                                format!(
                                    "; if no other gateway process runs any more, a hand-over was interrupted: \
                                     rename {} to {shown}",
                                    tmp.display()
                                )
                            } else {
                                String::new()
                            };
                            log::info!(
                                "audit: {shown}: waiting to take the audit trail over ({} s): {why}{hint}",
                                since.elapsed().as_secs()
                            );
                            next_log = Some(now + TAKEOVER_LOG_EVERY);
                        }
                        poll_at = now + TAKEOVER_POLL;
                    }
                    Err(e) => {
                        if last_error.as_deref() == Some(e.as_str()) {
                            log::debug!("audit: {shown}: still cannot take over: {e}");
                        } else {
                            log::error!(
                                "audit: {shown}: cannot take the audit trail over, PHI routes fail closed until this is resolved: {e}"
                            );
                        }
                        last_error = Some(e);
                        self.failing = true;
                        self.shared.sink_ok.store(false, Ordering::Release);
                        poll_at = now + self.backoff;
                        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            let mut st = self.shared.lock();
            if self.failing {
                // Nobody waits for a commit that cannot happen now; the records stay queued.
                for item in st.queue.iter_mut() {
                    if let Some(tx) = item.waiter.take() {
                        let _ = tx.send(Err(AuditError::SinkFailed));
                    }
                }
                st.waiting = 0;
                // Nothing to hand over: this sink holds no file (the next process waits for
                // the lock, which this one does not hold).
                for tx in std::mem::take(&mut st.handovers) {
                    let _ = tx.send(Err(AuditError::SinkFailed));
                }
            }
            if st.closed {
                continue;
            }
            let wait = poll_at.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                drop(
                    self.shared
                        .wake
                        .wait_timeout(st, wait)
                        .unwrap_or_else(PoisonError::into_inner),
                );
            }
        }
    }

    fn try_acquire(&self) -> Result<Acquired, String> {
        match open_locked(&self.path, false) {
            Ok(Opened::Locked(f)) => resume(&self.path, &self.keys, f).map(Acquired::Resumed),
            Ok(Opened::Held) => Ok(Acquired::Wait(WAIT_HELD)),
            Ok(Opened::Missing) => Ok(Acquired::Wait(WAIT_MISSING)),
            Err(e) => Err(format!("audit.path: {}: {e}", self.path.display())),
        }
    }

    /// Shut down before the file was acquired: the queued records cannot be written.
    fn abandon_queue(&mut self) {
        let items: Vec<Item> = {
            let mut st = self.shared.lock();
            st.waiting = 0;
            st.first_enqueued = None;
            st.queue.drain(..).collect()
        };
        let lost = items.len();
        for mut item in items {
            if let Some(tx) = item.waiter.take() {
                let _ = tx.send(Err(AuditError::Closed));
            }
        }
        if lost > 0 {
            self.shared.depth.fetch_sub(lost, Ordering::AcqRel);
            log::error!(
                "audit: {}: {lost} audit records could not be written: the sink shut down before it could take the audit trail over",
                self.path.display()
            );
        }
    }

    /// Answers the hand-over requests nobody will handle any more.
    fn close_out(&self) {
        let replies = std::mem::take(&mut self.shared.lock().handovers);
        for tx in replies {
            let _ = tx.send(Err(AuditError::Closed));
        }
    }

    /// Blocks until there is something to do.
    fn wait_for_work(&mut self) -> Work {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        let mut yielded = false;
        loop {
            if st.closed || !st.handovers.is_empty() {
                break;
            }
            let now = Instant::now();
            let mut deadline: Option<Instant> = None;
            if !st.queue.is_empty() {
                // A record someone waits for is committed at once (unless `fsync: batch`);
                // records nobody waits for (completion and denial records) wait up to
                // `batch_max_delay_ms` for company, so under load they ride along with the
                // next durable record's group commit instead of costing a write and an fsync
                // each.
                let lazy = self.fsync == FsyncPolicy::Batch || st.waiting == 0;
                if !lazy && !yielded && st.queue.len() < BATCH_FLUSH_LEN {
                    // Once per commit, let the threads that produce records run first: where
                    // they share this core, the records they have ready join this group
                    // instead of each paying a write and an fsync of its own. Where they do
                    // not, this returns at once.
                    yielded = true;
                    drop(st);
                    std::thread::yield_now();
                    st = shared.lock();
                    continue;
                }
                if !lazy || st.queue.len() >= BATCH_FLUSH_LEN {
                    break;
                }
                let d = st.first_enqueued.unwrap_or(now) + self.batch_delay;
                if now >= d {
                    break;
                }
                deadline = earliest(deadline, d);
            }
            if !self.pending.is_empty() || self.startup_commit {
                let d = self.retry_at.unwrap_or(now);
                if now >= d {
                    break;
                }
                deadline = earliest(deadline, d);
            }
            if self.unsealed > 0 {
                // While failing, a due checkpoint waits for the retry time like the rest.
                let mut d = self.last_cp_at + self.cp_interval;
                if let Some(r) = self.retry_at {
                    d = d.max(r);
                }
                if now >= d {
                    break;
                }
                deadline = earliest(deadline, d);
            }
            st = match deadline {
                Some(d) => {
                    shared
                        .wake
                        .wait_timeout(st, d.saturating_duration_since(now))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner),
            };
        }
        let batch: Vec<Item> = st.queue.drain(..).collect();
        st.first_enqueued = None;
        st.waiting = 0;
        Work {
            batch,
            closed: st.closed,
            handovers: std::mem::take(&mut st.handovers),
        }
    }

    fn rotation_due(&self) -> bool {
        !self.handed_over
            && self.rotate_bytes > 0
            && self.pos.is_some_and(|p| p.committed >= self.rotate_bytes)
    }

    /// Commits `items` (and a checkpoint per `seal`), then wakes the waiters: with their
    /// sequence numbers, or with `SinkFailed` (the items are kept for retry). Returns whether
    /// the commit succeeded.
    fn commit_and_settle(&mut self, mut items: Vec<Item>, seal: Seal) -> bool {
        match self.commit(&items, seal) {
            Ok(seqs) => {
                let n = items.len();
                // Publish the sink's state before waking the waiters, so a caller whose record
                // was just written never sees the sink as unhealthy or the record as pending.
                self.shared.depth.fetch_sub(n, Ordering::AcqRel);
                self.shared.written.fetch_add(n as u64, Ordering::AcqRel);
                self.shared.commits.fetch_add(1, Ordering::AcqRel);
                if self.failing {
                    log::warn!(
                        "audit: {}: writing again (chain at seq {})",
                        self.file_path.display(),
                        self.head_seq
                    );
                }
                self.failing = false;
                self.backoff = BACKOFF_START;
                self.retry_at = None;
                self.startup_commit = false;
                self.shared.sink_ok.store(true, Ordering::Release);
                for (item, seq) in items.into_iter().zip(seqs) {
                    if let Some(tx) = item.waiter {
                        let _ = tx.send(Ok(seq));
                    }
                }
                true
            }
            Err(e) => {
                if self.failing {
                    log::debug!("audit: {}: still failing: {e}", self.file_path.display());
                } else {
                    log::error!(
                        "audit: {}: write failed, PHI routes fail closed until it recovers: {e}",
                        self.file_path.display()
                    );
                }
                self.failing = true;
                self.shared.sink_ok.store(false, Ordering::Release);
                for item in &mut items {
                    if let Some(tx) = item.waiter.take() {
                        let _ = tx.send(Err(AuditError::SinkFailed));
                    }
                }
                self.pending = items;
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                false
            }
        }
    }

    /// The hand-over (see [`AuditSink::hand_over`]): commits `items` with a hand-over
    /// checkpoint, then publishes the continuation file.
    fn hand_over(&mut self, items: Vec<Item>) -> Result<(), AuditError> {
        if self.handed_over {
            if !items.is_empty() {
                self.commit_and_settle(items, Seal::No);
            }
            return Ok(());
        }
        if !self.commit_and_settle(items, Seal::HandOver) {
            log::error!(
                "audit: {}: hand-over failed: the hand-over checkpoint could not be written",
                self.path.display()
            );
            return Err(AuditError::SinkFailed);
        }
        self.publish_continuation().map_err(|e| {
            log::error!("audit: {}: hand-over failed: {e}", self.path.display());
            AuditError::SinkFailed
        })
    }

    /// Steps (b) to (d) of the hand-over, after the hand-over checkpoint was committed.
    fn publish_continuation(&mut self) -> Result<(), String> {
        let sync = self.fsync != FsyncPolicy::Never;
        let tmp = handover_tmp(&self.path);
        let shown_tmp = tmp.display().to_string();
        // (b) The continuation file: one checkpoint continuing the chain from the hand-over
        // checkpoint, exactly what rotation writes as a new file's first line.
        let (line, _) = chain::build_line(
            &self.key,
            self.head_seq + 1,
            &self.head_mac,
            "checkpoint",
            &chain::checkpoint_payload(
                self.records_total,
                &now_rfc3339(),
                false,
                self.key_id.as_deref(),
            ),
        );
        let tmp_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&tmp)
            .map_err(|e| format!("{shown_tmp}: {e}"))?;
        match tmp_file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(format!("{shown_tmp} is locked by another process"))
            }
            Err(TryLockError::Error(e)) => return Err(format!("{shown_tmp}: {}", lock_error(e))),
        }
        let written = tmp_file
            .set_len(0)
            .and_then(|()| (&tmp_file).write_all(&line))
            .and_then(|()| if sync { tmp_file.sync_all() } else { Ok(()) });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(format!("{shown_tmp}: {e}"));
        }
        // (c) Rename the file this process wrote out of the way, as rotation does.
        let ours = match (fs::metadata(&self.path), self.pos) {
            (Ok(m), Some(p)) => m.dev() == p.dev && m.ino() == p.ino,
            _ => false,
        };
        if !ours {
            let _ = fs::remove_file(&tmp);
            return Err(format!(
                "{} no longer names the file this process writes",
                self.path.display()
            ));
        }
        let rotated = chain::sibling(&self.path, &format!(".{}", next_rotated(&self.path)));
        if let Err(e) = fs::rename(&self.path, &rotated) {
            let _ = fs::remove_file(&tmp);
            return Err(format!(
                "cannot rename {} to {}: {e}",
                self.path.display(),
                rotated.display()
            ));
        }
        // From here on this process never writes `path` again.
        self.handed_over = true;
        self.file_path = rotated.clone();
        self.after_rename(&rotated, sync);
        // (d) Publish the continuation as `path`, never replacing a file someone else made.
        let published = link_no_replace(&tmp, &self.path);
        let _ = fs::remove_file(&tmp);
        if let Err(e) = published {
            return Err(format!(
                "cannot publish the continuation file as {}: {e}; this process writes its remaining records to {}",
                self.path.display(),
                rotated.display()
            ));
        }
        if sync {
            if let Err(e) = chain::sync_dir(&self.path) {
                log::warn!(
                    "audit: fsync of the directory of {}: {e}",
                    self.path.display()
                );
            }
        }
        drop(tmp_file);
        // The continuation's opening checkpoint is part of the trail now.
        if let Some(x) = &self.exporter {
            x.send(line);
        }
        log::info!(
            "audit: handed {} over at seq {}; this process writes its remaining records to {}",
            self.path.display(),
            self.head_seq,
            rotated.display()
        );
        Ok(())
    }

    /// Makes sure the open file is the one at `path` and ends where we left it. Returns
    /// whether the file is empty while the chain is not (a continuation file, which starts
    /// with a checkpoint).
    fn ensure_file(&mut self) -> Result<bool, String> {
        if self.handed_over {
            return self.ensure_pinned();
        }
        let shown = self.path.display().to_string();
        if self.file.is_some() {
            let same = match (fs::metadata(&self.path), self.pos) {
                (Ok(m), Some(p)) => m.dev() == p.dev && m.ino() == p.ino,
                _ => false,
            };
            if !same {
                log::warn!("audit: {shown} was removed or replaced while open; reopening it");
                self.file = None;
            }
        }
        if self.file.is_none() {
            let opened = match open_locked(&self.path, true) {
                Ok(Opened::Locked(f)) => f,
                Ok(Opened::Held) => {
                    return Err(format!(
                        "{shown} is locked: another running process writes this audit trail"
                    ))
                }
                Ok(Opened::Missing) => return Err("the file vanished while being opened".into()),
                Err(e) => return Err(format!("open: {e}")),
            };
            self.file = Some(opened);
        }
        let Some(file) = self.file.as_ref() else {
            return Err("no file".into());
        };
        let m = match file.metadata() {
            Ok(m) => m,
            Err(e) => {
                self.file = None;
                return Err(format!("stat: {e}"));
            }
        };
        let len = m.len();
        if let Some(p) = self.pos {
            if p.dev == m.dev() && p.ino == m.ino() && len >= p.committed {
                if len > p.committed {
                    log::warn!(
                        "audit: {shown}: removing {} bytes of an interrupted write",
                        len - p.committed
                    );
                    if let Err(e) = file.set_len(p.committed) {
                        self.file = None;
                        return Err(format!("truncate: {e}"));
                    }
                }
                return Ok(p.committed == 0 && self.head_seq > 0);
            }
        }
        // A file we know nothing about: new, replaced, or cut short behind our back.
        if len == 0 {
            if self.fsync != FsyncPolicy::Never {
                if let Err(e) = chain::sync_dir(&self.path) {
                    self.file = None;
                    return Err(format!("fsync directory: {e}"));
                }
            }
            self.pos = Some(FilePos {
                dev: m.dev(),
                ino: m.ino(),
                committed: 0,
            });
            if self.head_seq > 0 {
                log::warn!(
                    "audit: {shown} is a new file; continuing the chain at seq {}",
                    self.head_seq + 1
                );
            }
            return Ok(self.head_seq > 0);
        }
        let tail = match read_tail(file, len, &self.keys) {
            Ok(t) => t,
            Err(e) => {
                self.file = None;
                return Err(format!("{shown} is not this chain's file: {e}"));
            }
        };
        if tail.seq != self.head_seq || tail.mac != self.head_mac {
            self.file = None;
            return Err(format!(
                "{shown} does not continue the audit chain (it ends at seq {}, the chain is at seq {}); move it aside",
                tail.seq, self.head_seq
            ));
        }
        if tail.valid_len < len {
            if let Err(e) = file.set_len(tail.valid_len) {
                self.file = None;
                return Err(format!("truncate: {e}"));
            }
        }
        self.pos = Some(FilePos {
            dev: m.dev(),
            ino: m.ino(),
            committed: tail.valid_len,
        });
        Ok(false)
    }

    /// After a hand-over: the file stays the one this writer holds open (and locked), whatever
    /// its name; bytes beyond the last commit are cut back.
    fn ensure_pinned(&mut self) -> Result<bool, String> {
        let shown = self.file_path.display().to_string();
        let (Some(file), Some(p)) = (self.file.as_ref(), self.pos) else {
            return Err(format!("{shown} is not open any more"));
        };
        let len = file.metadata().map_err(|e| format!("stat: {e}"))?.len();
        if len > p.committed {
            log::warn!(
                "audit: {shown}: removing {} bytes of an interrupted write",
                len - p.committed
            );
            file.set_len(p.committed)
                .map_err(|e| format!("truncate: {e}"))?;
        } else if len < p.committed {
            return Err(format!(
                "{shown} was cut short behind this process's back ({len} bytes, {} were written)",
                p.committed
            ));
        }
        Ok(false)
    }

    /// Writes `items` as one group (plus checkpoints: an opening one for a continuation file,
    /// every `cp_every` records, and a final one per `seal`), syncs once, and advances the
    /// chain. Returns the items' sequence numbers. On error nothing advances.
    fn commit(&mut self, items: &[Item], seal: Seal) -> Result<Vec<u64>, String> {
        let opening = self.ensure_file()?;
        let mut buf = Vec::with_capacity(items.iter().map(|i| i.payload.len() + 200).sum());
        let mut seq = self.head_seq;
        let mut mac = self.head_mac.clone();
        let mut total = self.records_total;
        let mut unsealed = self.unsealed;
        let mut last_cp: Option<(u64, String, u64)> = None;
        let mut seqs = Vec::with_capacity(items.len());
        let time = now_rfc3339();
        let key = self.key.as_slice();
        let key_id = self.key_id.as_deref();
        // The checkpoint lines of this commit, for the off-host copies.
        let mut cp_lines: Vec<Vec<u8>> = Vec::new();
        let exporting = self.exporter.is_some();
        let mut checkpoint =
            |buf: &mut Vec<u8>, seq: &mut u64, mac: &mut String, total: u64, handover: bool| {
                *seq += 1;
                let (line, m) = chain::build_line(
                    key,
                    *seq,
                    mac,
                    "checkpoint",
                    &chain::checkpoint_payload(total, &time, handover, key_id),
                );
                buf.extend_from_slice(&line);
                if exporting {
                    cp_lines.push(line);
                }
                *mac = m;
                last_cp = Some((*seq, mac.clone(), total));
            };
        // A continuation file opens with a checkpoint; so does a change of key (the records
        // after it are written with the key it names).
        if opening || self.key_switch {
            checkpoint(&mut buf, &mut seq, &mut mac, total, false);
        }
        for item in items {
            seq += 1;
            let (line, m) = chain::build_line(key, seq, &mac, "record", &item.payload);
            buf.extend_from_slice(&line);
            mac = m;
            seqs.push(seq);
            total += 1;
            unsealed += 1;
            if unsealed >= self.cp_every {
                checkpoint(&mut buf, &mut seq, &mut mac, total, false);
                unsealed = 0;
            }
        }
        match seal {
            Seal::Checkpoint if unsealed > 0 => {
                checkpoint(&mut buf, &mut seq, &mut mac, total, false);
                unsealed = 0;
            }
            Seal::HandOver => {
                checkpoint(&mut buf, &mut seq, &mut mac, total, true);
                unsealed = 0;
            }
            Seal::Checkpoint | Seal::No => {}
        }
        if buf.is_empty() {
            return Ok(seqs);
        }
        let Some(file) = self.file.as_mut() else {
            return Err("no file".into());
        };
        let written = file.write_all(&buf).and_then(|()| {
            if self.fsync == FsyncPolicy::Never {
                Ok(())
            } else {
                file.sync_data()
            }
        });
        if let Err(e) = written {
            // Reopen (and cut back to `committed`) before the next attempt; after a hand-over
            // keep the file (and its lock) and cut back through it.
            if !self.handed_over {
                self.file = None;
            }
            return Err(e.to_string());
        }
        self.head_seq = seq;
        self.head_mac = mac;
        self.records_total = total;
        self.unsealed = unsealed;
        self.key_switch = false;
        if let Some(p) = self.pos.as_mut() {
            p.committed += buf.len() as u64;
        }
        if let Some(x) = &self.exporter {
            for line in cp_lines {
                x.send(line);
            }
        }
        if let Some((seq, mac, records)) = last_cp {
            self.last_cp_at = Instant::now();
            self.write_anchor(&self.file_path.clone(), seq, mac, records);
        }
        Ok(seqs)
    }

    fn write_anchor(&self, file: &Path, seq: u64, mac: String, records: u64) {
        let anchor = Anchor {
            seq,
            mac,
            file: file.display().to_string(),
            records,
            time: now_rfc3339(),
        };
        if let Err(e) =
            chain::write_anchor(&self.key, file, &anchor, self.fsync != FsyncPolicy::Never)
        {
            log::warn!("audit: cannot write the anchor of {}: {e}", file.display());
        }
    }

    /// After the active file was renamed to `rotated`: sync the directory (if `sync`) and write
    /// the renamed file's anchor (its last checkpoint).
    fn after_rename(&mut self, rotated: &Path, sync: bool) {
        if sync {
            if let Err(e) = chain::sync_dir(&self.path) {
                log::warn!(
                    "audit: fsync of the directory of {}: {e}",
                    self.path.display()
                );
            }
        }
        self.write_anchor(
            rotated,
            self.head_seq,
            self.head_mac.clone(),
            self.records_total,
        );
    }

    /// Seals the active file, renames it to `<path>.<n>` (with its own anchor), starts a new
    /// file continuing the chain, and prunes old rotated files, oldest first, stopping at one
    /// another process still holds (an old process writing its late records after a
    /// hand-over), so the trail keeps no gap. A failed step is logged and retried after the
    /// next commit.
    fn rotate(&mut self) {
        if let Err(e) = self.commit(&[], Seal::Checkpoint) {
            log::warn!(
                "audit: {}: cannot seal before rotating: {e}",
                self.path.display()
            );
            self.file = None;
            return;
        }
        let rotated = chain::sibling(&self.path, &format!(".{}", next_rotated(&self.path)));
        if let Err(e) = fs::rename(&self.path, &rotated) {
            log::warn!(
                "audit: cannot rotate {} to {}: {e}",
                self.path.display(),
                rotated.display()
            );
            return;
        }
        self.file = None;
        self.pos = None;
        self.after_rename(&rotated, self.fsync != FsyncPolicy::Never);
        log::info!(
            "audit: rotated {} to {} at seq {}",
            self.path.display(),
            rotated.display(),
            self.head_seq
        );
        // Archive the rotated file (and prune per `retain_files`) off this thread: copying a
        // large file to other storage must not hold up the records.
        if let Some(a) = &self.archiver {
            a.trigger();
        }
        // Open the new file with its opening checkpoint now.
        self.startup_commit = true;
        if let Err(e) = self.commit(&[], Seal::No) {
            log::warn!(
                "audit: cannot start the new file {}: {e}",
                self.path.display()
            );
            return;
        }
        self.startup_commit = false;
    }

    /// Shutdown: write what is left, seal the file, give up after a few failed attempts.
    fn finish(&mut self, items: Vec<Item>) {
        self.pending = items;
        for attempt in 0..3u32 {
            let items = std::mem::take(&mut self.pending);
            if items.is_empty() && self.unsealed == 0 && !self.startup_commit {
                break;
            }
            self.commit_and_settle(items, Seal::Checkpoint);
            if !self.failing && self.unsealed == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100) * (attempt + 1));
        }
        let lost = self.pending.len();
        if lost > 0 {
            log::error!(
                "audit: {}: {lost} audit records could not be written before shutdown and are lost",
                self.file_path.display()
            );
            for item in &mut self.pending {
                if let Some(tx) = item.waiter.take() {
                    let _ = tx.send(Err(AuditError::Closed));
                }
            }
            self.pending.clear();
            self.shared.depth.fetch_sub(lost, Ordering::AcqRel);
        }
        self.file = None;
        // A last archiving pass (the process that handed over leaves that to its successor).
        if !self.handed_over {
            if let Some(a) = &self.archiver {
                a.trigger();
            }
        }
        // Dropping them lets the archiver and the exporter finish and end.
        self.archiver = None;
        self.exporter = None;
    }
}

const WAIT_HELD: &str =
    "another running process writes it (the file is locked) until it hands it over or exits";
const WAIT_MISSING: &str =
    "the file does not exist (yet): the running process publishes it when it hands over";
