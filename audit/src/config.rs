//! The `audit:` section of the gateway configuration.

use std::path::{Path, PathBuf};

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
///   key_id: "2025"                    # names hmac_key in the chain (key rotation)
///   previous_keys:                    # earlier keys, still accepted when resuming
///     - { id: "2024", key: "${CAREGATE_AUDIT_KEY_2024}" }
///   archive_dir: /mnt/audit-archive/caregate   # rotated files are copied here
///   retain_files: 30                  # then all but the newest 30 deleted locally
///   offhost_checkpoints:
///     path: /mnt/audit-checkpoints/caregate-checkpoints.jsonl
///     url: https://collector.example/caregate/checkpoints   # optional
///     timeout_ms: 2000
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
    /// How many rotated files (`<path>.<n>`) to keep locally once they are archived; older ones
    /// are deleted with their anchors, but only after they were copied to `archive_dir`.
    /// Requires `archive_dir`. Unset: no rotated file is ever deleted.
    #[serde(default)]
    pub retain_files: Option<usize>,
    /// Where every rotated file (and its anchor) is copied, and fsynced, after rotation, before
    /// `retain_files` may delete it: other storage (WORM / object lock) for the retention
    /// period. Not the directory of `path`.
    #[serde(default)]
    pub archive_dir: Option<PathBuf>,
    /// The id of `hmac_key`, named by every checkpoint the writer writes (`"key":"<id>"`), so a
    /// trail spanning several keys (key rotation) can be verified. Unset: checkpoints name no
    /// key (as before key ids existed). Required with `previous_keys`.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Earlier keys of the trail (after a key rotation): the writer accepts a file whose tail
    /// was written with one of them when it resumes, and continues with `hmac_key` after a
    /// checkpoint naming `key_id`.
    #[serde(default)]
    pub previous_keys: Vec<PreviousKey>,
    /// Copies of every checkpoint line sent off the host, so that a rewrite of the whole local
    /// trail (by someone holding the key) is detectable with `caregate audit verify
    /// --checkpoints`.
    #[serde(default)]
    pub offhost_checkpoints: Option<OffHostCheckpoints>,
}

/// An earlier audit key (`audit.previous_keys[]`).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PreviousKey {
    /// Its key id, as the chain names it (for a trail written before key ids existed: any
    /// label).
    pub id: String,
    /// The key (from `${ENV}`), at least [`MIN_HMAC_KEY_BYTES`] bytes.
    pub key: String,
}

impl std::fmt::Debug for PreviousKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreviousKey")
            .field("id", &self.id)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Where checkpoint copies go (`audit.offhost_checkpoints`). Checkpoints carry no PHI: seq,
/// prev, record count, time, key id and mac.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OffHostCheckpoints {
    /// A file on other storage (another mount: NFS, WORM), to which every checkpoint line is
    /// appended (and synced per `fsync`). Required.
    pub path: PathBuf,
    /// Optional: an `http://` or `https://` URL each checkpoint line is POSTed to
    /// (`Content-Type: application/json`, the line without its newline); a 2xx answer is
    /// success.
    #[serde(default)]
    pub url: Option<String>,
    /// Timeout of one POST (connect included), 1 to 60000 ms.
    #[serde(default = "default_offhost_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_offhost_timeout_ms() -> u64 {
    2000
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
            retain_files: None,
            archive_dir: None,
            key_id: None,
            previous_keys: Vec::new(),
            offhost_checkpoints: None,
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
        if let Some(id) = &self.key_id {
            if !crate::chain::valid_key_id(id) {
                return Err(format!(
                    "audit.key_id: {id:?} must be 1 to 64 letters, digits, '.', '_' or '-'"
                ));
            }
        }
        if !self.previous_keys.is_empty() && self.key_id.is_none() {
            return Err(
                "audit.key_id: required with audit.previous_keys (the chain names the current key by it where the key changes)"
                    .into(),
            );
        }
        for (i, pk) in self.previous_keys.iter().enumerate() {
            if !crate::chain::valid_key_id(&pk.id) {
                return Err(format!(
                    "audit.previous_keys[{i}].id: {:?} must be 1 to 64 letters, digits, '.', '_' or '-'",
                    pk.id
                ));
            }
            if self.key_id.as_deref() == Some(pk.id.as_str())
                || self.previous_keys[..i].iter().any(|o| o.id == pk.id)
            {
                return Err(format!(
                    "audit.previous_keys[{i}].id: {:?} is used twice (key ids are unique)",
                    pk.id
                ));
            }
            if pk.key.len() < MIN_HMAC_KEY_BYTES {
                return Err(format!(
                    "audit.previous_keys[{i}].key: must be at least {MIN_HMAC_KEY_BYTES} bytes, got {}",
                    pk.key.len()
                ));
            }
        }
        let dir_of = |p: &Path| -> PathBuf {
            let d = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            d.canonicalize().unwrap_or(d)
        };
        let trail_dir = dir_of(&self.path);
        if let Some(a) = &self.archive_dir {
            if a.as_os_str().is_empty() {
                return Err("audit.archive_dir: must name a directory".into());
            }
            let a_abs = a.canonicalize().unwrap_or_else(|_| a.clone());
            if a_abs == trail_dir {
                return Err(format!(
                    "audit.archive_dir: {} is the directory of audit.path: archive to other storage",
                    a.display()
                ));
            }
        }
        if self.retain_files.is_some() && self.archive_dir.is_none() {
            return Err(
                "audit.retain_files: deletes rotated audit files, so it needs audit.archive_dir (where each one is copied first); \
                 without retain_files no audit file is deleted"
                    .into(),
            );
        }
        if let Some(o) = &self.offhost_checkpoints {
            if o.path.as_os_str().is_empty() || o.path.file_name().is_none() {
                return Err(format!(
                    "audit.offhost_checkpoints.path: must name a file, got {:?}",
                    o.path.display().to_string()
                ));
            }
            if dir_of(&o.path) == trail_dir {
                return Err(format!(
                    "audit.offhost_checkpoints.path: {} is in the directory of audit.path: send the copies to other storage",
                    o.path.display()
                ));
            }
            if let Some(url) = &o.url {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(format!(
                        "audit.offhost_checkpoints.url: must be an http:// or https:// URL, got {url:?}"
                    ));
                }
            }
            if o.timeout_ms == 0 || o.timeout_ms > 60_000 {
                return Err("audit.offhost_checkpoints.timeout_ms: must be 1 to 60000".into());
            }
        }
        Ok(())
    }

    /// The keys the writer accepts when it resumes: `hmac_key` (with `key_id`) first, then
    /// `previous_keys`.
    pub fn keys(&self) -> crate::AuditKeys {
        let mut k = crate::AuditKeys::new();
        k.add(self.key_id.as_deref(), self.hmac_key.as_bytes());
        for pk in &self.previous_keys {
            k.add(Some(&pk.id), pk.key.as_bytes());
        }
        k
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
            .field("archive_dir", &self.archive_dir)
            .field("key_id", &self.key_id)
            .field("previous_keys", &self.previous_keys)
            .field("offhost_checkpoints", &self.offhost_checkpoints)
            .finish()
    }
}
