//! Keeping the trail beyond the host: archiving rotated files before they are deleted
//! (`archive_dir`, `retain_files`), and copying checkpoints off the host
//! (`offhost_checkpoints`). Both run on threads of their own, never on the writer's.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::chain;
use crate::config::OffHostCheckpoints;
use crate::sink::{link_no_replace, locked_by_other, rotated_files};

/// Counters of the checkpoint exporter.
#[derive(Debug, Default)]
pub(crate) struct ExportStats {
    pub exported: AtomicU64,
    pub failures: AtomicU64,
}

/// Checkpoint lines waiting for the exporter; beyond it a copy is dropped (and counted).
const EXPORT_QUEUE: usize = 1024;

/// The writer's handle on the exporter thread.
pub(crate) struct Exporter {
    tx: SyncSender<Vec<u8>>,
    stats: Arc<ExportStats>,
    /// Set when the writer lets go (shutdown): the exporter drains what is queued.
    closing: Arc<AtomicBool>,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Release);
    }
}

impl Exporter {
    /// Starts the exporter thread. It ends when the [`Exporter`] is dropped, after the lines
    /// queued before.
    pub fn start(
        cfg: &OffHostCheckpoints,
        sync: bool,
        stats: Arc<ExportStats>,
    ) -> Result<(Exporter, JoinHandle<()>), String> {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(EXPORT_QUEUE);
        let path = cfg.path.clone();
        let url = cfg.url.clone();
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let st = stats.clone();
        let closing = Arc::new(AtomicBool::new(false));
        let cl = closing.clone();
        let handle = std::thread::Builder::new()
            .name("caregate-audit-export".into())
            .spawn(move || export_loop(&path, url.as_deref(), timeout, sync, &rx, &st, &cl))
            .map_err(|e| format!("audit: cannot start the checkpoint exporter thread: {e}"))?;
        Ok((Exporter { tx, stats, closing }, handle))
    }

    /// Queues a checkpoint line (with its newline) without waiting; a full queue drops it
    /// (counted, logged).
    pub fn send(&self, line: Vec<u8>) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                let n = self.stats.failures.fetch_add(1, Ordering::AcqRel) + 1;
                log::warn!(
                    "audit: off-host checkpoint copy dropped: the exporter's queue is full ({n} failed copies so far)"
                );
            }
            Err(TrySendError::Disconnected(_)) => {
                self.stats.failures.fetch_add(1, Ordering::AcqRel);
                log::error!("audit: off-host checkpoint copy dropped: the exporter has stopped");
            }
        }
    }
}

fn export_loop(
    path: &Path,
    url: Option<&str>,
    timeout: Duration,
    sync: bool,
    rx: &mpsc::Receiver<Vec<u8>>,
    stats: &ExportStats,
    closing: &AtomicBool,
) {
    let http = url.and_then(|u| match Http::new(u, timeout) {
        Ok(h) => Some(h),
        Err(e) => {
            log::error!(
                "audit: offhost_checkpoints.url: {e}; checkpoints are copied to the file only"
            );
            None
        }
    });
    let mut file: Option<File> = None;
    // After a failure at shutdown, the rest is not sent over HTTP (each would wait a timeout).
    let mut http_down = false;
    while let Ok(line) = rx.recv() {
        match append(&mut file, path, &line, sync) {
            Ok(()) => {
                stats.exported.fetch_add(1, Ordering::AcqRel);
            }
            Err(e) => {
                file = None;
                let n = stats.failures.fetch_add(1, Ordering::AcqRel) + 1;
                log::error!(
                    "audit: cannot copy a checkpoint to {}: {e} ({n} failed copies so far)",
                    path.display()
                );
            }
        }
        if let Some(h) = &http {
            if http_down {
                stats.failures.fetch_add(1, Ordering::AcqRel);
                continue;
            }
            let body = line.strip_suffix(b"\n").unwrap_or(&line).to_vec();
            if let Err(e) = h.post(body) {
                let n = stats.failures.fetch_add(1, Ordering::AcqRel) + 1;
                log::warn!(
                    "audit: cannot POST a checkpoint to {}: {e} ({n} failed copies so far)",
                    h.url
                );
                // Still running: the writer keeps sending (the queue bounds it). Draining
                // at shutdown: give up on HTTP.
                http_down = closing.load(Ordering::Acquire);
            }
        }
    }
}

fn append(file: &mut Option<File>, path: &Path, line: &[u8], sync: bool) -> io::Result<()> {
    if file.is_none() {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        *file = Some(OpenOptions::new().create(true).append(true).open(path)?);
    }
    let Some(f) = file.as_mut() else {
        return Err(io::Error::other("not open"));
    };
    f.write_all(line)?;
    if sync {
        f.sync_data()?;
    }
    Ok(())
}

/// A POST to the configured URL, with a bounded timeout, from the exporter thread.
struct Http {
    url: String,
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Http {
    fn new(url: &str, timeout: Duration) -> Result<Http, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
        // The client's connector and timers belong to this runtime.
        let client = {
            let _in_rt = rt.enter();
            reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout)
                .build()
                .map_err(|e| format!("cannot build the HTTP client: {e}"))?
        };
        Ok(Http {
            url: url.to_string(),
            client,
            rt,
        })
    }

    fn post(&self, body: Vec<u8>) -> Result<(), String> {
        let req = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body);
        // `send` arms its timeout at once: inside the runtime.
        let resp = self
            .rt
            .block_on(async move { req.send().await })
            .map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", resp.status()))
        }
    }
}

/// The writer's handle on the archiver thread.
pub(crate) struct Archiver {
    tx: SyncSender<()>,
}

impl Archiver {
    /// Starts the archiver thread for the trail at `path`. It ends when the [`Archiver`] is
    /// dropped, after a last pass if one was asked for.
    pub fn start(
        path: &Path,
        archive_dir: &Path,
        retain: Option<usize>,
        sync: bool,
    ) -> Result<(Archiver, JoinHandle<()>), String> {
        fs::create_dir_all(archive_dir)
            .map_err(|e| format!("audit.archive_dir: {}: {e}", archive_dir.display()))?;
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        let path = path.to_path_buf();
        let dir = archive_dir.to_path_buf();
        let handle = std::thread::Builder::new()
            .name("caregate-audit-archive".into())
            .spawn(move || {
                let mut done = HashSet::new();
                while rx.recv().is_ok() {
                    archive_and_prune(&path, &dir, retain, sync, &mut done);
                }
            })
            .map_err(|e| format!("audit: cannot start the archiver thread: {e}"))?;
        Ok((Archiver { tx }, handle))
    }

    /// Asks for a pass (archive every rotated file not archived yet, then prune); a pass asked
    /// for while one is pending is the same pass.
    pub fn trigger(&self) {
        let _ = self.tx.try_send(());
    }
}

/// Copies every rotated file of `path` (and its anchor) that no other process still writes to
/// `dir`, then deletes the oldest beyond `retain`, oldest first, stopping at the first one that
/// is not archived or still written (the local trail keeps no gap). `done`: files (name and
/// length) found archived already.
pub(crate) fn archive_and_prune(
    path: &Path,
    dir: &Path,
    retain: Option<usize>,
    sync: bool,
    done: &mut HashSet<(PathBuf, u64)>,
) {
    let all = rotated_files(path);
    let mut archived = Vec::with_capacity(all.len());
    for (_, f) in &all {
        if locked_by_other(f) {
            // Another process (the one that handed over) still writes it: later.
            archived.push(false);
            continue;
        }
        match archive_one(f, dir, sync, done) {
            Ok(()) => archived.push(true),
            Err(e) => {
                log::error!(
                    "audit: cannot archive {} to {}: {e}; it is kept (not deleted) until it is archived",
                    f.display(),
                    dir.display()
                );
                archived.push(false);
            }
        }
    }
    let Some(retain) = retain else {
        return;
    };
    if all.len() <= retain {
        return;
    }
    let excess = all.len() - retain;
    for ((_, old), ok) in all.iter().zip(&archived).take(excess) {
        if !ok {
            log::info!(
                "audit: keeping {} and newer rotated files for now: it is not archived yet, or another process still writes it",
                old.display()
            );
            break;
        }
        // The lock is checked again: nothing is deleted that another process holds.
        if locked_by_other(old) {
            break;
        }
        if let Err(e) = fs::remove_file(old) {
            log::warn!("audit: cannot remove {}: {e}", old.display());
            break;
        }
        let _ = fs::remove_file(chain::anchor_path(old));
        log::info!(
            "audit: removed old rotated file {} (archived in {})",
            old.display(),
            dir.display()
        );
    }
}

/// Makes sure `dir` holds a copy of `file` (same bytes) and of its anchor.
fn archive_one(
    file: &Path,
    dir: &Path,
    sync: bool,
    done: &mut HashSet<(PathBuf, u64)>,
) -> Result<(), String> {
    let name = file.file_name().ok_or_else(|| "no file name".to_string())?;
    let dest = dir.join(name);
    let len = fs::metadata(file).map_err(|e| e.to_string())?.len();
    let key = (dest.clone(), len);
    if !done.contains(&key) {
        if dest.exists() {
            if !same_bytes(file, &dest).map_err(|e| e.to_string())? {
                return Err(format!(
                    "{} exists and differs from it (not replaced: archives are write-once)",
                    dest.display()
                ));
            }
        } else {
            copy_synced(file, &dest, sync, false)?;
        }
        log::info!("audit: archived {} to {}", file.display(), dest.display());
    }
    // The anchor: the file's last checkpoint (it changes only while the file is written).
    let anchor = chain::anchor_path(file);
    if anchor.exists() {
        let dest_anchor = chain::anchor_path(&dest);
        let same = dest_anchor.exists() && same_bytes(&anchor, &dest_anchor).unwrap_or(false);
        if !same {
            copy_synced(&anchor, &dest_anchor, sync, true)?;
        }
    }
    done.insert(key);
    Ok(())
}

/// Copies `from` to `to` through a temporary file in the same directory, synced, then given
/// its name (never replacing a file unless `replace`), then syncs the directory.
fn copy_synced(from: &Path, to: &Path, sync: bool, replace: bool) -> Result<(), String> {
    let tmp = chain::sibling(to, &format!(".{}.tmp", std::process::id()));
    let shown = to.display();
    let result = (|| -> io::Result<()> {
        let mut src = File::open(from)?;
        let mut dst = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        io::copy(&mut src, &mut dst)?;
        if sync {
            dst.sync_all()?;
        }
        drop(dst);
        if replace {
            fs::rename(&tmp, to)?;
        } else {
            link_no_replace(&tmp, to)?;
        }
        if sync {
            chain::sync_dir(to)?;
        }
        Ok(())
    })();
    let _ = fs::remove_file(&tmp);
    result.map_err(|e| format!("{shown}: {e}"))
}

fn same_bytes(a: &Path, b: &Path) -> io::Result<bool> {
    let (ma, mb) = (fs::metadata(a)?, fs::metadata(b)?);
    if ma.len() != mb.len() {
        return Ok(false);
    }
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
