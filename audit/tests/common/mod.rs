//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use caregate_audit::{
    Action, Actor, AuditConfig, AuditRecord, FsyncPolicy, Outcome, Phase, Upstream,
};

pub const KEY: &str = "test-key-0123456789-0123456789-0123456789";

/// A fresh directory under the system temp dir (removed on drop).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!(
            "caregate-audit-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn config(path: &Path) -> AuditConfig {
    let mut cfg = AuditConfig::new(path, KEY);
    cfg.fsync = FsyncPolicy::Always;
    cfg.checkpoint_interval_ms = 60_000;
    cfg
}

pub fn record(i: u64) -> AuditRecord {
    AuditRecord {
        time: String::new(),
        request_id: format!("req-{i:04}"),
        phase: Phase::Access,
        actor: Actor {
            subject: Some("dr-alice".into()),
            issuer: Some("https://idp.example.test".into()),
            client_id: Some("ehr-app".into()),
            roles: vec!["clinician".into()],
            tenant: Some("hospital-a".into()),
            auth_method: Some("token".into()),
            source_address: Some("10.1.2.3".into()),
            client_certificate_subject: None,
            system: None,
        },
        action: Action {
            method: "GET".into(),
            route: "fhir".into(),
            listener: "public".into(),
            channel: "public".into(),
            interaction: Some("read".into()),
            resource_type: Some("Observation".into()),
            resource_id: Some(format!("obs-{i}")),
            patient: Some("pat-1".into()),
            ..Default::default()
        },
        outcome: Outcome {
            status: Some(200),
            reason: None,
            bytes: None,
            duration_ms: None,
        },
        upstream: Some(Upstream {
            pool: "fhir-primary".into(),
            zone: Some("zone-a".into()),
        }),
        config: None,
        hl7: None,
        anomaly: None,
        break_glass: None,
        environment: None,
    }
}

pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

pub fn write_lines(path: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(path, s).unwrap();
}

pub fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap()
}

/// Polls `f` until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
