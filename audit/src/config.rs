//! The `audit:` section of the gateway configuration.

use std::path::PathBuf;

use serde::Deserialize;

/// Smallest accepted `hmac_key`, in bytes (the HMAC-SHA256 block of security).
pub const MIN_HMAC_KEY_BYTES: usize = 32;

/// The `audit:` section of the gateway YAML.
///
/// ```yaml
/// audit:
///   path: /var/log/caregate/audit.jsonl
///   hmac_key: ${CAREGATE_AUDIT_KEY}   # at least 32 bytes
///   format: json                      # json | fhir_audit_event
///   fsync: always                     # always | batch | never
///   batch_max_delay_ms: 5             # group-commit wait (see the field)
///   queue_capacity: 10000
///   checkpoint_every_records: 1000
///   checkpoint_interval_ms: 1000
///   rotate_bytes: 268435456           # 0 = never rotate
///   retain_files: 30
/// ```
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The active file, e.g. `/var/log/caregate/audit.jsonl`. Rotated files are `<path>.<n>`,
    /// anchors `<path>.anchor` and `<path>.<n>.anchor`.
    pub path: PathBuf,
    /// The chain secret (from `${ENV}`); at least [`MIN_HMAC_KEY_BYTES`] bytes. Its UTF-8 bytes
    /// are the HMAC-SHA256 key.
    pub hmac_key: String,
    /// What a record line carries in its `record` member.
    #[serde(default)]
    pub format: AuditFormat,
    /// When a group commit counts as durable.
    #[serde(default)]
    pub fsync: FsyncPolicy,
    /// How long the writer waits after the first queued record to collect a larger group
    /// before writing and syncing it: for every record with `fsync: batch`; with `always` and
    /// `never` only while the queue holds nothing but records nobody waits for (completion and
    /// denial records), which then ride along with the next access record's commit.
    #[serde(default = "default_batch_max_delay_ms")]
    pub batch_max_delay_ms: u64,
    /// Records queued or in flight (including records kept for retry after a failed write)
    /// before `append*` answer [`crate::AuditError::QueueFull`].
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// A checkpoint after this many records.
    #[serde(default = "default_checkpoint_every_records")]
    pub checkpoint_every_records: u64,
    /// A checkpoint at least this often while records are being written.
    #[serde(default = "default_checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
    /// Rotate once the active file reaches this size; 0 = never.
    #[serde(default = "default_rotate_bytes")]
    pub rotate_bytes: u64,
    /// How many rotated files (`<path>.<n>`) to keep; older ones are deleted with their anchors.
    #[serde(default = "default_retain_files")]
    pub retain_files: usize,
}

/// The content of a record line's `record` member.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuditFormat {
    /// The [`crate::AuditRecord`] as JSON.
    #[default]
    Json,
    /// A FHIR R4 `AuditEvent` following IHE BALP (see [`crate::fhir`]).
    FhirAuditEvent,
}

/// When a group commit is durable.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// Write and `fdatasync` every group commit as soon as the writer is free.
    #[default]
    Always,
    /// Like `always`, but the writer first waits up to `batch_max_delay_ms` (or until 512
    /// records are queued) to make the group larger: fewer syncs, more latency.
    Batch,
    /// Write without syncing (the OS page cache decides). Not durable across a power loss; for
    /// development and tests only.
    Never,
}

fn default_batch_max_delay_ms() -> u64 {
    5
}
fn default_queue_capacity() -> usize {
    10_000
}
fn default_checkpoint_every_records() -> u64 {
    1000
}
fn default_checkpoint_interval_ms() -> u64 {
    1000
}
fn default_rotate_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_retain_files() -> usize {
    30
}

impl AuditConfig {
    /// A config with every optional setting at its default.
    pub fn new(path: impl Into<PathBuf>, hmac_key: impl Into<String>) -> Self {
        AuditConfig {
            path: path.into(),
            hmac_key: hmac_key.into(),
            format: AuditFormat::default(),
            fsync: FsyncPolicy::default(),
            batch_max_delay_ms: default_batch_max_delay_ms(),
            queue_capacity: default_queue_capacity(),
            checkpoint_every_records: default_checkpoint_every_records(),
            checkpoint_interval_ms: default_checkpoint_interval_ms(),
            rotate_bytes: default_rotate_bytes(),
            retain_files: default_retain_files(),
        }
    }

    /// The checks [`crate::AuditSink::start`] makes before touching the file system; errors
    /// name the field (`audit.hmac_key: ...`). Meant for `caregate check`.
    pub fn validate(&self) -> Result<(), String> {
        if self.path.as_os_str().is_empty() || self.path.file_name().is_none() {
            return Err(format!(
                "audit.path: must name a file, got {:?}",
                self.path.display().to_string()
            ));
        }
        if self.hmac_key.len() < MIN_HMAC_KEY_BYTES {
            return Err(format!(
                "audit.hmac_key: must be at least {MIN_HMAC_KEY_BYTES} bytes, got {}",
                self.hmac_key.len()
            ));
        }
        if self.queue_capacity == 0 {
            return Err("audit.queue_capacity: must be at least 1".into());
        }
        if self.checkpoint_every_records == 0 {
            return Err("audit.checkpoint_every_records: must be at least 1".into());
        }
        if self.checkpoint_interval_ms == 0 {
            return Err("audit.checkpoint_interval_ms: must be at least 1".into());
        }
        if self.batch_max_delay_ms > 10_000 {
            return Err("audit.batch_max_delay_ms: must be at most 10000".into());
        }
        Ok(())
    }
}

impl std::fmt::Debug for AuditConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditConfig")
            .field("path", &self.path)
            .field("hmac_key", &"<redacted>")
            .field("format", &self.format)
            .field("fsync", &self.fsync)
            .field("batch_max_delay_ms", &self.batch_max_delay_ms)
            .field("queue_capacity", &self.queue_capacity)
            .field("checkpoint_every_records", &self.checkpoint_every_records)
            .field("checkpoint_interval_ms", &self.checkpoint_interval_ms)
            .field("rotate_bytes", &self.rotate_bytes)
            .field("retain_files", &self.retain_files)
            .finish()
    }
}
