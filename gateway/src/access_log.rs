//! The access log: one JSON line per request, written off the request path.
//!
//! It holds no PHI: no query string or values, no resource ids, no raw path (only the route and
//! its template), no tokens, no client address (an IP address is a HIPAA identifier). Lines go
//! through a bounded queue to a writer thread; when the queue is full a line is dropped and
//! counted in `caregate_access_log_dropped_total` rather than slowing a request down.

use once_cell::sync::Lazy;
use prometheus::{register_int_counter, IntCounter};
use serde::Deserialize;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

#[allow(clippy::expect_used)]
static DROPPED: Lazy<IntCounter> = Lazy::new(|| {
    register_int_counter!(
        "caregate_access_log_dropped_total",
        "Access log lines dropped because the writer could not keep up."
    )
    .expect("register caregate_access_log_dropped_total")
});

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A file to append to; stdout when absent.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default = "d_queue")]
    pub queue_capacity: usize,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: true,
            path: None,
            queue_capacity: d_queue(),
        }
    }
}

fn yes() -> bool {
    true
}
fn d_queue() -> usize {
    65_536
}

/// Flipped to ask every access-log writer to reopen its file.
static REOPEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Ask the access log to reopen its file (after a rotation by rename): on `SIGUSR1` and at every
/// reload. It happens within a second.
pub fn reopen() {
    REOPEN.fetch_xor(true, Ordering::AcqRel);
}

/// The writer's end of the queue. Cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<String>,
    /// Lines queued and lines written (and flushed), for [`AccessLog::flush`].
    progress: std::sync::Arc<(AtomicU64, AtomicU64)>,
}

impl AccessLog {
    /// Start the writer thread. The file (if any) is opened for append now, so a bad path is a
    /// start-up error.
    pub fn start(
        cfg: &AccessLogConfig,
        resolve: impl Fn(&std::path::Path) -> PathBuf,
    ) -> Result<Option<AccessLog>, String> {
        if !cfg.enabled {
            return Ok(None);
        }
        Lazy::force(&DROPPED);
        let path = cfg.path.as_ref().map(|p| resolve(p));
        let open = |p: &PathBuf| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map(|f| Box::new(std::io::BufWriter::new(f)) as Box<dyn Write + Send>)
        };
        let mut out: Box<dyn Write + Send> = match &path {
            Some(p) => open(p).map_err(|e| format!("access log {}: {e}", p.display()))?,
            None => Box::new(std::io::BufWriter::new(std::io::stdout())),
        };
        let mut seen_reopen = REOPEN.load(Ordering::Acquire);
        let (tx, rx) = sync_channel::<String>(cfg.queue_capacity.max(1));
        let progress = std::sync::Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let written = progress.clone();
        std::thread::Builder::new()
            .name("caregate-access-log".into())
            .spawn(move || {
                loop {
                    // Reopen the file when asked (log rotation by rename, then SIGUSR1 or a
                    // reload), checked at least every second even without traffic.
                    let line = match rx.recv_timeout(std::time::Duration::from_secs(1)) {
                        Ok(l) => Some(l),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    };
                    let asked = REOPEN.load(Ordering::Acquire);
                    if asked != seen_reopen {
                        seen_reopen = asked;
                        if let Some(p) = &path {
                            let _ = out.flush();
                            match open(p) {
                                Ok(f) => {
                                    out = f;
                                    log::info!("access log reopened");
                                }
                                Err(e) => log::error!(
                                    "access log {}: cannot reopen: {e}; writing to the old file",
                                    p.display()
                                ),
                            }
                        }
                    }
                    let Some(line) = line else { continue };
                    let _ = out.write_all(line.as_bytes());
                    let _ = out.write_all(b"\n");
                    let mut n = 1;
                    // Flush when the queue is drained, so lines appear promptly but in batches.
                    while let Ok(more) = rx.try_recv() {
                        let _ = out.write_all(more.as_bytes());
                        let _ = out.write_all(b"\n");
                        n += 1;
                    }
                    let _ = out.flush();
                    written.1.fetch_add(n, Ordering::Release);
                }
            })
            .map_err(|e| format!("access log thread: {e}"))?;
        Ok(Some(AccessLog { tx, progress }))
    }

    pub fn write(&self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => {
                self.progress.0.fetch_add(1, Ordering::Release);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => DROPPED.inc(),
        }
    }

    /// Wait (at most `limit`) until every line queued so far is written and flushed: before
    /// the process exits.
    pub fn flush(&self, limit: std::time::Duration) {
        let target = self.progress.0.load(Ordering::Acquire);
        let deadline = std::time::Instant::now() + limit;
        while self.progress.1.load(Ordering::Acquire) < target {
            if std::time::Instant::now() >= deadline {
                log::warn!("access log: lines still queued at exit are lost");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// The W3C trace context of a request: the incoming trace continued, or a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: String,
    /// This hop's span id (the parent id sent upstream).
    pub span_id: String,
    pub flags: String,
    /// The caller's span id, when the trace was continued.
    pub parent_id: Option<String>,
    /// `tracestate`, forwarded only with a valid incoming `traceparent`.
    pub tracestate: Option<String>,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn random_hex(bytes: usize) -> String {
    loop {
        let v: u128 = rand::random();
        let h = format!("{v:032x}");
        let h = h[..bytes * 2].to_string();
        if h.bytes().any(|b| b != b'0') {
            return h;
        }
    }
}

impl TraceContext {
    /// Continue a valid `traceparent` (version 00; a later version is read by its first four
    /// fields, as the spec asks), or start a new, sampled trace.
    pub fn from_headers(traceparent: Option<&str>, tracestate: Option<&str>) -> TraceContext {
        if let Some(tp) = traceparent {
            let parts: Vec<&str> = tp.trim().split('-').collect();
            if parts.len() >= 4 {
                let (version, trace, parent, flags) = (parts[0], parts[1], parts[2], parts[3]);
                let version_ok =
                    is_hex(version, 2) && version != "ff" && (version != "00" || parts.len() == 4);
                if version_ok
                    && is_hex(trace, 32)
                    && trace.bytes().any(|b| b != b'0')
                    && is_hex(parent, 16)
                    && parent.bytes().any(|b| b != b'0')
                    && is_hex(flags, 2)
                {
                    return TraceContext {
                        trace_id: trace.to_string(),
                        span_id: random_hex(8),
                        flags: flags.to_string(),
                        parent_id: Some(parent.to_string()),
                        tracestate: tracestate
                            .filter(|s| s.len() <= 512 && s.is_ascii())
                            .map(str::to_string),
                    };
                }
            }
        }
        TraceContext {
            trace_id: random_hex(16),
            span_id: random_hex(8),
            flags: "01".into(),
            parent_id: None,
            tracestate: None,
        }
    }

    /// The `traceparent` sent upstream: same trace, this hop as the parent.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_valid_and_restarts_invalid_traces() {
        let t = TraceContext::from_headers(
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("congo=t61rcWkgMzE"),
        );
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(t.span_id, "00f067aa0ba902b7");
        assert_eq!(t.flags, "01");
        assert_eq!(t.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        let tp = t.traceparent();
        assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && tp.ends_with("-01"));

        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            let t = TraceContext::from_headers(Some(bad), Some("x=y"));
            assert_ne!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert!(
                t.tracestate.is_none(),
                "tracestate dropped with an invalid traceparent"
            );
            assert_eq!(t.trace_id.len(), 32);
        }
        // A future version is read by its first four fields.
        let t = TraceContext::from_headers(
            Some("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"),
            None,
        );
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a time since the epoch (the audit trail's format).
pub use caregate_audit::format_rfc3339_millis as rfc3339_millis;

#[cfg(test)]
mod time_tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(UNIX_EPOCH + Duration::from_millis(1_795_877_695_123)),
            "2026-11-28T14:54:55.123Z"
        );
        assert_eq!(
            rfc3339_millis(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
