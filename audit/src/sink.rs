//! The sink: a bounded queue in front of one writer thread doing group commits.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::chain::{self, Anchor, LineKind};
use crate::config::{AuditConfig, AuditFormat, FsyncPolicy};
use crate::fhir::to_fhir_audit_event;
use crate::record::{now_rfc3339, AuditRecord};

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
}

/// With `fsync: batch`, a queue this long is committed without waiting for the delay.
const BATCH_FLUSH_LEN: usize = 512;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// First read window when looking for the last checkpoint of a file.
const TAIL_WINDOW: u64 = 256 * 1024;

impl AuditSink {
    /// Opens (or creates) `cfg.path` for appending, resumes the chain from its last line and
    /// spawns the writer thread.
    ///
    /// Resuming reads the file's tail back to its last checkpoint and verifies those lines
    /// (MAC and chain) with the key: a tail that fails (edited, or another key) is an error, so
    /// a chain is never extended past lines it cannot vouch for. An incomplete last line (an
    /// interrupted write: never acknowledged) is cut off. An empty or missing file continues
    /// from the newest rotated file (`<path>.<n>`), if any, else starts a new chain (seq 1).
    /// If the anchor (`<path>.anchor`) is forged or names a checkpoint beyond the chain's end
    /// (the file was cut off or removed), this is an error too: investigate with
    /// [`crate::verify`], then move the anchor aside to start anyway.
    ///
    /// One sink per file: nothing stops two processes from appending to the same path, and
    /// their chains would break each other.
    pub fn start(cfg: &AuditConfig) -> Result<Arc<AuditSink>, String> {
        cfg.validate()?;
        let path = cfg.path.clone();
        let key = cfg.hmac_key.as_bytes().to_vec();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| format!("audit.path: {}: {e}", dir.display()))?;
        }
        let file =
            open_active(&path).map_err(|e| format!("audit.path: {}: {e}", path.display()))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("audit.path: {}: {e}", path.display()))?;
        let mut tail = read_tail(&file, meta.len(), &key)
            .map_err(|e| format!("audit.path: {}: {e}", path.display()))?;
        if tail.valid_len < meta.len() {
            log::warn!(
                "audit: {}: removing an incomplete last line ({} bytes) left by an interrupted write",
                path.display(),
                meta.len() - tail.valid_len
            );
            file.set_len(tail.valid_len)
                .map_err(|e| format!("audit.path: {}: {e}", path.display()))?;
        }
        if tail.valid_len == 0 {
            if let Some((n, rotated)) = rotated_files(&path).pop() {
                let f = File::open(&rotated)
                    .map_err(|e| format!("audit: {}: {e}", rotated.display()))?;
                let len = f
                    .metadata()
                    .map_err(|e| format!("audit: {}: {e}", rotated.display()))?
                    .len();
                tail = read_tail(&f, len, &key)
                    .map_err(|e| format!("audit: {}: {e}", rotated.display()))?;
                tail.valid_len = 0;
                log::info!(
                    "audit: {} is empty; continuing the chain of rotated file {n} at seq {}",
                    path.display(),
                    tail.seq
                );
            }
        }
        let records_total = match tail.records_total {
            Some(r) => r,
            None => {
                log::warn!(
                    "audit: {}: the chain's record count is unknown (no checkpoint since seq {}); counting from here",
                    path.display(),
                    tail.first_seq
                );
                tail.unsealed
            }
        };
        if let Some(anchor) = chain::read_anchor(&key, &path).map_err(|e| format!("audit: {e}"))? {
            if anchor.seq > tail.seq {
                return Err(format!(
                    "audit: the chain in {} ends at seq {} but its anchor names checkpoint seq {} ({}): \
                     the trail was cut off or removed; check it with `caregate audit verify`, then move the anchor aside to start anyway",
                    path.display(),
                    tail.seq,
                    anchor.seq,
                    anchor.time
                ));
            }
        }
        let pos = FilePos {
            dev: meta.dev(),
            ino: meta.ino(),
            committed: tail.valid_len,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(QueueState {
                queue: VecDeque::new(),
                first_enqueued: None,
                waiting: 0,
                closed: false,
            }),
            wake: Condvar::new(),
            capacity: cfg.queue_capacity,
            depth: AtomicUsize::new(0),
            sink_ok: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            written: AtomicU64::new(0),
            commits: AtomicU64::new(0),
        });
        let writer = Writer {
            shared: shared.clone(),
            path: path.clone(),
            key,
            fsync: cfg.fsync,
            batch_delay: Duration::from_millis(cfg.batch_max_delay_ms),
            cp_every: cfg.checkpoint_every_records,
            cp_interval: Duration::from_millis(cfg.checkpoint_interval_ms),
            rotate_bytes: cfg.rotate_bytes,
            retain: cfg.retain_files,
            startup_commit: pos.committed == 0 && tail.seq > 0,
            file: Some(file),
            pos: Some(pos),
            head_seq: tail.seq,
            head_mac: tail.mac,
            records_total,
            unsealed: tail.unsealed,
            last_cp_at: Instant::now(),
            pending: Vec::new(),
            failing: false,
            backoff: BACKOFF_START,
            retry_at: None,
        };
        let handle = std::thread::Builder::new()
            .name("caregate-audit".into())
            .spawn(move || writer.run())
            .map_err(|e| format!("audit: cannot start the writer thread: {e}"))?;
        Ok(Arc::new(AuditSink {
            shared,
            format: cfg.format,
            writer: Mutex::new(Some(handle)),
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
    /// full, and after shutdown; true again once a commit succeeds.
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

    /// Stops accepting records, writes everything queued, seals the file with a final
    /// checkpoint (and anchor) and joins the writer thread. Blocks; idempotent. If the sink is
    /// failing, it retries a few times, then logs how many records were lost.
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

fn open_active(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
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
}

/// Reads a file backwards to its last checkpoint (or its start) and verifies those lines.
fn read_tail(file: &File, len: u64, key: &[u8]) -> Result<Tail, String> {
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
        for raw in buf[from..end].split(|b| *b == b'\n') {
            let at = start + off as u64;
            off += raw.len() + 1;
            if off > end {
                break; // the empty piece after the final newline
            }
            let p = chain::parse_line(key, raw).map_err(|e| {
                let what = match e {
                    chain::LineError::Malformed(m) => m,
                    chain::LineError::MacMismatch => {
                        "mac mismatch (the line was edited, or hmac_key is not the key this file was written with)".into()
                    }
                };
                format!("the line at byte {at} fails verification: {what}")
            })?;
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

struct Writer {
    shared: Arc<Shared>,
    path: PathBuf,
    key: Vec<u8>,
    fsync: FsyncPolicy,
    batch_delay: Duration,
    cp_every: u64,
    cp_interval: Duration,
    rotate_bytes: u64,
    retain: usize,
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
        loop {
            let (batch, closed) = self.wait_for_work();
            let mut items = std::mem::take(&mut self.pending);
            items.extend(batch);
            if closed {
                self.finish(items);
                return;
            }
            let checkpoint_due = self.unsealed > 0 && self.last_cp_at.elapsed() >= self.cp_interval;
            if items.is_empty() && !checkpoint_due && !self.startup_commit {
                continue;
            }
            self.commit_and_settle(items, checkpoint_due);
        }
    }

    /// Blocks until there is something to do; returns the queued items and whether the sink
    /// is closing.
    fn wait_for_work(&mut self) -> (Vec<Item>, bool) {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        let mut yielded = false;
        loop {
            if st.closed {
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
        (batch, st.closed)
    }

    /// Commits `items` (and a checkpoint if `seal`), then wakes the waiters: with their
    /// sequence numbers, or with `SinkFailed` (the items are kept for retry).
    fn commit_and_settle(&mut self, mut items: Vec<Item>, seal: bool) {
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
                        self.path.display(),
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
                if self.rotate_bytes > 0
                    && self.pos.is_some_and(|p| p.committed >= self.rotate_bytes)
                {
                    self.rotate();
                }
            }
            Err(e) => {
                if self.failing {
                    log::debug!("audit: {}: still failing: {e}", self.path.display());
                } else {
                    log::error!(
                        "audit: {}: write failed, PHI routes fail closed until it recovers: {e}",
                        self.path.display()
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
            }
        }
    }

    /// Makes sure the open file is the one at `path` and ends where we left it. Returns
    /// whether the file is empty while the chain is not (a continuation file, which starts
    /// with a checkpoint).
    fn ensure_file(&mut self) -> Result<bool, String> {
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
            self.file = Some(open_active(&self.path).map_err(|e| format!("open: {e}"))?);
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
        let tail = match read_tail(file, len, &self.key) {
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

    /// Writes `items` as one group (plus checkpoints: an opening one for a continuation file,
    /// every `cp_every` records, and a final one if `seal`), syncs once, and advances the
    /// chain. Returns the items' sequence numbers. On error nothing advances.
    fn commit(&mut self, items: &[Item], seal: bool) -> Result<Vec<u64>, String> {
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
        let mut checkpoint = |buf: &mut Vec<u8>, seq: &mut u64, mac: &mut String, total: u64| {
            *seq += 1;
            let (line, m) = chain::build_line(
                key,
                *seq,
                mac,
                "checkpoint",
                &chain::checkpoint_payload(total, &time),
            );
            buf.extend_from_slice(&line);
            *mac = m;
            last_cp = Some((*seq, mac.clone(), total));
        };
        if opening {
            checkpoint(&mut buf, &mut seq, &mut mac, total);
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
                checkpoint(&mut buf, &mut seq, &mut mac, total);
                unsealed = 0;
            }
        }
        if seal && unsealed > 0 {
            checkpoint(&mut buf, &mut seq, &mut mac, total);
            unsealed = 0;
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
            // Reopen (and cut back to `committed`) before the next attempt.
            self.file = None;
            return Err(e.to_string());
        }
        self.head_seq = seq;
        self.head_mac = mac;
        self.records_total = total;
        self.unsealed = unsealed;
        if let Some(p) = self.pos.as_mut() {
            p.committed += buf.len() as u64;
        }
        if let Some((seq, mac, records)) = last_cp {
            self.last_cp_at = Instant::now();
            self.write_anchor(&self.path.clone(), seq, mac, records);
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

    /// Seals the active file, renames it to `<path>.<n>` (with its own anchor), starts a new
    /// file continuing the chain, and prunes old rotated files. A failed step is logged and
    /// retried after the next commit.
    fn rotate(&mut self) {
        if let Err(e) = self.commit(&[], true) {
            log::warn!(
                "audit: {}: cannot seal before rotating: {e}",
                self.path.display()
            );
            self.file = None;
            return;
        }
        let rotated_list = rotated_files(&self.path);
        let n = rotated_list.last().map_or(1, |(n, _)| n + 1);
        let rotated = chain::sibling(&self.path, &format!(".{n}"));
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
        if self.fsync != FsyncPolicy::Never {
            if let Err(e) = chain::sync_dir(&self.path) {
                log::warn!(
                    "audit: fsync of the directory of {}: {e}",
                    self.path.display()
                );
            }
        }
        self.write_anchor(
            &rotated,
            self.head_seq,
            self.head_mac.clone(),
            self.records_total,
        );
        log::info!(
            "audit: rotated {} to {} at seq {}",
            self.path.display(),
            rotated.display(),
            self.head_seq
        );
        let mut all = rotated_files(&self.path);
        if all.len() > self.retain {
            let excess = all.len() - self.retain;
            for (_, old) in all.drain(..excess) {
                if let Err(e) = fs::remove_file(&old) {
                    log::warn!("audit: cannot remove {}: {e}", old.display());
                    continue;
                }
                let _ = fs::remove_file(chain::anchor_path(&old));
                log::info!("audit: removed old rotated file {}", old.display());
            }
        }
        // Open the new file with its opening checkpoint now.
        self.startup_commit = true;
        if let Err(e) = self.commit(&[], false) {
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
            self.commit_and_settle(items, true);
            if !self.failing && self.unsealed == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100) * (attempt + 1));
        }
        let lost = self.pending.len();
        if lost > 0 {
            log::error!(
                "audit: {}: {lost} audit records could not be written before shutdown and are lost",
                self.path.display()
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
    }
}
