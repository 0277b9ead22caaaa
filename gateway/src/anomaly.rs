//! The unusual-access monitor: reads the audit records as the gateway writes them and notices a
//! subject who
//!
//! - touches more distinct patients within a sliding window than configured (`distinct_patients`,
//!   the classic sign of record snooping);
//! - is refused for reaching another tenant (`cross_tenant`: records with the reason
//!   `tenant_mismatch` of a caller that belongs to a tenant);
//! - uses break-the-glass repeatedly (`repeated_break_glass`: access records that claim
//!   emergency access, `break_glass` set and not `from_grant`, or with the reason `break_glass`).
//!
//! Each finding is an `anomaly` audit record that names the subject and never a patient, and a
//! count in `caregate_audit_anomalies_total{kind}`. The monitor is pure logic over records and a
//! caller-supplied clock ([`Monitor::observe`]); the call sites append what it returns.
//!
//! Memory is bounded: patients are kept as keyed 64-bit hashes (never their ids), at most
//! `threshold + 1` per subject and kind, and the number of subjects and of kept entries is capped
//! (the least recently active subjects are evicted first). The state is sharded by subject so
//! that concurrent requests rarely wait on each other.
//!
//! ```yaml
//! unusual_access:              # top level of the gateway config; every key is optional
//!   enabled: true
//!   window_seconds: 3600       # the sliding window every count is taken over
//!   max_distinct_patients: 100 # more distinct patients than this in the window: an anomaly
//!   cross_tenant: true
//!   max_cross_tenant: 0        # more cross-tenant refusals than this in the window (0: the first)
//!   max_break_glass: 3         # more break-the-glass accesses than this in the window
//!   exempt_roles: [bulk-export]  # roles left out of the distinct-patient count
//! ```
//! See `docs/observability.md` ("Unusual access").

use arc_swap::ArcSwap;
use caregate_audit::{Action, Actor, AnomalyDetails, AuditRecord, Outcome, Phase};
use once_cell::sync::Lazy;
use prometheus::{register_int_counter_vec, IntCounterVec};
use serde::Deserialize;
use std::collections::hash_map::Entry;
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// More distinct patients in the window than `max_distinct_patients`.
pub const KIND_DISTINCT_PATIENTS: &str = "distinct_patients";
/// More refused cross-tenant attempts in the window than `max_cross_tenant`.
pub const KIND_CROSS_TENANT: &str = "cross_tenant";
/// More break-the-glass accesses in the window than `max_break_glass`.
pub const KIND_REPEATED_BREAK_GLASS: &str = "repeated_break_glass";
/// Every kind, the values of the metric's `kind` label.
pub const KINDS: [&str; 3] = [
    KIND_DISTINCT_PATIENTS,
    KIND_CROSS_TENANT,
    KIND_REPEATED_BREAK_GLASS,
];

/// The reason code of a refusal by the `tenant` filter (see `filters/src/builtin/tenant.rs`).
pub const REASON_TENANT_MISMATCH: &str = "tenant_mismatch";
/// The reason code of an access granted by break-the-glass.
pub const REASON_BREAK_GLASS: &str = "break_glass";

/// Upper bound of every `max_*` setting: bounds the entries kept per subject.
pub const MAX_THRESHOLD: u64 = 10_000;
/// Upper bound of `window_seconds`: 7 days.
pub const MAX_WINDOW_SECONDS: u64 = 7 * 24 * 3600;

/// Subjects tracked at once, at most.
const MAX_SUBJECTS: usize = 100_000;
/// Entries (patients, events) kept at once over all subjects, at most: a few tens of MB.
const MAX_ENTRIES: usize = 1_000_000;
/// Shards of the state, by subject.
const SHARDS: usize = 16;
/// Idle subjects are swept from a shard every this many observations.
const SWEEP_EVERY: u64 = 1024;

// The registration of a well-formed, uniquely named metric cannot fail; `expect` documents that
// this happens once, at start-up, and never on a request.
#[allow(clippy::expect_used)]
pub static ANOMALIES: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_audit_anomalies_total",
        "Anomaly audit records of the unusual-access monitor, by kind (distinct_patients|cross_tenant|repeated_break_glass).",
        &["kind"]
    )
    .expect("register caregate_audit_anomalies_total")
});

/// Register `caregate_audit_anomalies_total` with a 0 series for every kind, so that the family
/// is there from the first scrape (alerts and dashboards can tell 0 from absent).
pub fn init_metrics() {
    Lazy::force(&ANOMALIES);
    for kind in KINDS {
        let _ = ANOMALIES.with_label_values(&[kind]);
    }
}

/// The `unusual_access:` section of the config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnusualAccessConfig {
    /// Run the monitor (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The sliding window, in seconds, that every count is taken over (default 3600).
    #[serde(default = "default_window_seconds")]
    pub window_seconds: u64,
    /// A subject with more distinct patients than this in the window is flagged (default 100).
    #[serde(default = "default_max_distinct_patients")]
    pub max_distinct_patients: u64,
    /// Flag refused cross-tenant attempts (default true).
    #[serde(default = "default_true")]
    pub cross_tenant: bool,
    /// A subject with more cross-tenant refusals than this in the window is flagged (default 0:
    /// the first one).
    #[serde(default)]
    pub max_cross_tenant: u64,
    /// A subject with more break-the-glass accesses than this in the window is flagged
    /// (default 3).
    #[serde(default = "default_max_break_glass")]
    pub max_break_glass: u64,
    /// Subjects with any of these roles are left out of the distinct-patient count (a bulk
    /// export or an interface's service account). Cross-tenant and break-the-glass still apply.
    #[serde(default)]
    pub exempt_roles: Vec<String>,
}

fn default_true() -> bool {
    true
}
fn default_window_seconds() -> u64 {
    3600
}
fn default_max_distinct_patients() -> u64 {
    100
}
fn default_max_break_glass() -> u64 {
    3
}

impl Default for UnusualAccessConfig {
    fn default() -> Self {
        UnusualAccessConfig {
            enabled: true,
            window_seconds: default_window_seconds(),
            max_distinct_patients: default_max_distinct_patients(),
            cross_tenant: true,
            max_cross_tenant: 0,
            max_break_glass: default_max_break_glass(),
            exempt_roles: Vec::new(),
        }
    }
}

impl UnusualAccessConfig {
    /// The config's own checks; the error names the key (`unusual_access.window_seconds: ...`).
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_WINDOW_SECONDS).contains(&self.window_seconds) {
            return Err(format!(
                "unusual_access.window_seconds: must be from 1 to {MAX_WINDOW_SECONDS} (7 days), got {}",
                self.window_seconds
            ));
        }
        for (key, value, min) in [
            ("max_distinct_patients", self.max_distinct_patients, 1),
            ("max_cross_tenant", self.max_cross_tenant, 0),
            ("max_break_glass", self.max_break_glass, 1),
        ] {
            if !(min..=MAX_THRESHOLD).contains(&value) {
                return Err(format!(
                    "unusual_access.{key}: must be from {min} to {MAX_THRESHOLD}, got {value}"
                ));
            }
        }
        for (i, r) in self.exempt_roles.iter().enumerate() {
            if r.trim().is_empty() {
                return Err(format!(
                    "unusual_access.exempt_roles[{i}]: must not be empty"
                ));
            }
        }
        Ok(())
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.window_seconds)
    }
}

/// The process-wide sequence of anomaly record ids (`anomaly-1`, `anomaly-2`, ...), like
/// `config-reload-<n>`.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The capacity limits (constants in production; small in tests).
#[derive(Debug, Clone, Copy)]
struct Limits {
    subjects_per_shard: usize,
    entries_per_shard: usize,
    /// Sweep idle subjects from a shard every this many observations of it.
    sweep_every: u64,
}

impl Limits {
    fn production() -> Self {
        Limits {
            subjects_per_shard: MAX_SUBJECTS / SHARDS,
            entries_per_shard: MAX_ENTRIES / SHARDS,
            sweep_every: SWEEP_EVERY,
        }
    }
}

/// The unusual-access monitor. Cheap to share (`Arc<Monitor>`); every method takes `&self`.
pub struct Monitor {
    cfg: ArcSwap<UnusualAccessConfig>,
    /// The config generation last compared with `cfg` (see [`observe`]): one atomic load per
    /// record instead of a comparison of the configs.
    generation: std::sync::atomic::AtomicU64,
    hasher: RandomState,
    shards: Vec<Mutex<Shard>>,
    limits: Limits,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("cfg", &**self.cfg.load())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Shard {
    subjects: HashMap<u64, SubjectState>,
    /// Sum of the subjects' `weight()`.
    entries: usize,
    /// The latest `now` seen: the clock never goes back within a shard (two threads may take
    /// `Instant::now()` in one order and the lock in the other).
    last_now: Option<Instant>,
    observations: u64,
}

struct SubjectState {
    last_seen: Instant,
    /// Patient key -> when last touched, for the live (in-window) patients.
    patients: HashMap<u64, Instant>,
    /// (when, patient key), oldest first; an entry whose time is not the patient's last touch
    /// in `patients` is stale and skipped.
    order: VecDeque<(Instant, u64)>,
    cross_tenant: VecDeque<Instant>,
    break_glass: VecDeque<Instant>,
    /// When each kind (index in `KINDS`) was last flagged: not again within the window.
    flagged: [Option<Instant>; 3],
}

impl SubjectState {
    fn new(now: Instant) -> Self {
        SubjectState {
            last_seen: now,
            patients: HashMap::new(),
            order: VecDeque::new(),
            cross_tenant: VecDeque::new(),
            break_glass: VecDeque::new(),
            flagged: [None; 3],
        }
    }

    fn weight(&self) -> usize {
        1 + self.patients.len()
            + self.order.len()
            + self.cross_tenant.len()
            + self.break_glass.len()
    }

    /// Forget what left the window.
    fn expire(&mut self, now: Instant, window: Duration) {
        while let Some(&(t, k)) = self.order.front() {
            if now.saturating_duration_since(t) < window {
                break;
            }
            self.order.pop_front();
            if self.patients.get(&k) == Some(&t) {
                self.patients.remove(&k);
            }
        }
        for q in [&mut self.cross_tenant, &mut self.break_glass] {
            while q
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) >= window)
            {
                q.pop_front();
            }
        }
        for f in &mut self.flagged {
            if f.is_some_and(|t| now.saturating_duration_since(t) >= window) {
                *f = None;
            }
        }
    }

    fn touch(&mut self, key: u64, now: Instant) {
        if self.patients.insert(key, now) != Some(now) {
            self.order.push_back((now, key));
        }
    }

    /// Keep at most `cap` live patients (the most recent), and no more than about twice as
    /// many `order` entries as live ones.
    fn trim_patients(&mut self, cap: usize) {
        while self.patients.len() > cap {
            match self.order.pop_front() {
                Some((t, k)) => {
                    if self.patients.get(&k) == Some(&t) {
                        self.patients.remove(&k);
                    }
                }
                None => {
                    // Unreachable (every live patient has its entry); stay bounded regardless.
                    self.patients.clear();
                }
            }
        }
        if self.order.len() > 2 * self.patients.len() + 16 {
            let mut live: Vec<(Instant, u64)> =
                self.patients.iter().map(|(k, t)| (*t, *k)).collect();
            live.sort_unstable();
            self.order = live.into();
        }
    }

    /// Whether `kind` may be flagged now (not flagged within the window).
    fn may_flag(&self, kind: usize) -> bool {
        self.flagged[kind].is_none()
    }

    /// Count one event of kind `index` (1 cross-tenant, 2 break-the-glass) at `now`: a finding
    /// when the window's count passes `threshold` and the kind was not flagged in it.
    fn event(
        &mut self,
        index: usize,
        now: Instant,
        kind: &'static str,
        threshold: u64,
    ) -> Option<Finding> {
        let q = if index == 1 {
            &mut self.cross_tenant
        } else {
            &mut self.break_glass
        };
        q.push_back(now);
        let count = q.len() as u64;
        trim_events(q, cap_for(threshold));
        if count > threshold && self.may_flag(index) {
            self.flagged[index] = Some(now);
            return Some(Finding {
                kind,
                count,
                threshold,
            });
        }
        None
    }
}

fn trim_events(q: &mut VecDeque<Instant>, cap: usize) {
    while q.len() > cap {
        q.pop_front();
    }
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn cap_for(threshold: u64) -> usize {
    usize::try_from(threshold.saturating_add(1)).unwrap_or(usize::MAX)
}

/// One finding, before it becomes a record.
struct Finding {
    kind: &'static str,
    count: u64,
    threshold: u64,
}

impl Monitor {
    pub fn new(cfg: &UnusualAccessConfig) -> Monitor {
        Monitor::with_limits(cfg, Limits::production())
    }

    fn with_limits(cfg: &UnusualAccessConfig, limits: Limits) -> Monitor {
        Monitor {
            cfg: ArcSwap::from_pointee(cfg.clone()),
            // Built from the config of the first generation.
            generation: std::sync::atomic::AtomicU64::new(1),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            limits,
        }
    }

    /// The config in force.
    pub fn config(&self) -> Arc<UnusualAccessConfig> {
        self.cfg.load_full()
    }

    /// Apply a reloaded config. When it differs from the running one, counting starts afresh
    /// (what was counted under other thresholds or another window is dropped).
    pub fn reconfigure(&self, cfg: &UnusualAccessConfig) {
        if **self.cfg.load() == *cfg {
            return;
        }
        self.cfg.store(Arc::new(cfg.clone()));
        for s in &self.shards {
            *lock(s) = Shard::default();
        }
    }

    /// Look at one audit record just handed to the sink; `now` is the monotonic time of the
    /// observation (`Instant::now()`). Returns the `anomaly` records to append (usually none),
    /// and counts each in `caregate_audit_anomalies_total`. No I/O.
    ///
    /// What counts, for records with a non-empty `actor.subject`:
    /// - `access` records: their patients (`action.patients`, else `action.patient`, else the
    ///   first PID-3 identifier of an HL7 message) towards `distinct_patients`, unless a role
    ///   is exempt; and, with a `break_glass` claim (not one covered by an earlier claim's
    ///   grant) or `outcome.reason` `break_glass`, one break-the-glass use;
    /// - `access` and `denied` records with `outcome.reason` `tenant_mismatch` of a caller with
    ///   a tenant (`actor.tenant`): one cross-tenant attempt.
    ///
    /// Everything else (completion, admin, anomaly records; no subject) is ignored.
    pub fn observe(&self, rec: &AuditRecord, now: Instant) -> Vec<AuditRecord> {
        let cfg = self.cfg.load();
        if !cfg.enabled || !matches!(rec.phase, Phase::Access | Phase::Denied) {
            return Vec::new();
        }
        let Some(subject) = rec.actor.subject.as_deref().filter(|s| !s.is_empty()) else {
            return Vec::new();
        };
        let reason = rec.outcome.reason.as_deref();
        let access = rec.phase == Phase::Access;
        // A claim of emergency access: the record's `break_glass` (not a request that an
        // earlier claim's grant covered), or the reason code `break_glass`.
        let break_glass = access
            && (reason == Some(REASON_BREAK_GLASS)
                || rec.break_glass.as_ref().is_some_and(|b| !b.from_grant));
        let cross_tenant = cfg.cross_tenant
            && reason == Some(REASON_TENANT_MISMATCH)
            && rec.actor.tenant.as_deref().is_some_and(|t| !t.is_empty());
        let exempt = rec.actor.roles.iter().any(|r| cfg.exempt_roles.contains(r));
        let patients = if access && !exempt {
            self.patient_keys(rec)
        } else {
            Vec::new()
        };
        if patients.is_empty() && !break_glass && !cross_tenant {
            return Vec::new();
        }

        let window = cfg.window();
        let key = self
            .hasher
            .hash_one((rec.actor.issuer.as_deref().unwrap_or(""), subject));
        let mut findings: Vec<Finding> = Vec::new();
        {
            let mut shard = lock(&self.shards[(key % SHARDS as u64) as usize]);
            let now = match shard.last_now {
                Some(last) if last > now => last,
                _ => now,
            };
            shard.last_now = Some(now);
            shard.observations += 1;
            if shard
                .observations
                .is_multiple_of(self.limits.sweep_every.max(1))
            {
                shard.sweep_idle(now, window);
            }
            let shard = &mut *shard;
            let (st, before) = match shard.subjects.entry(key) {
                Entry::Occupied(o) => {
                    let w = o.get().weight();
                    (o.into_mut(), w)
                }
                Entry::Vacant(v) => (v.insert(SubjectState::new(now)), 0),
            };
            st.last_seen = now;
            st.expire(now, window);

            if !patients.is_empty() {
                for p in &patients {
                    st.touch(*p, now);
                }
                let count = st.patients.len() as u64;
                if count > cfg.max_distinct_patients && st.may_flag(0) {
                    st.flagged[0] = Some(now);
                    findings.push(Finding {
                        kind: KIND_DISTINCT_PATIENTS,
                        count,
                        threshold: cfg.max_distinct_patients,
                    });
                }
                st.trim_patients(cap_for(cfg.max_distinct_patients));
            }
            if cross_tenant {
                findings.extend(st.event(1, now, KIND_CROSS_TENANT, cfg.max_cross_tenant));
            }
            if break_glass {
                findings.extend(st.event(2, now, KIND_REPEATED_BREAK_GLASS, cfg.max_break_glass));
            }
            let after = st.weight();
            shard.entries = shard.entries.saturating_sub(before) + after;
            if shard.subjects.len() > self.limits.subjects_per_shard
                || shard.entries > self.limits.entries_per_shard
            {
                shard.evict(now, window, key, self.limits);
            }
        }

        findings
            .into_iter()
            .map(|f| {
                ANOMALIES.with_label_values(&[f.kind]).inc();
                anomaly_record(rec, &f, cfg.window_seconds)
            })
            .collect()
    }

    /// The keys of the patients an access record names: hashes, so that the monitor never
    /// holds a patient id.
    fn patient_keys(&self, rec: &AuditRecord) -> Vec<u64> {
        if !rec.action.patients.is_empty() {
            return rec
                .action
                .patients
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| self.hasher.hash_one(("fhir", p.as_str())))
                .collect();
        }
        if let Some(p) = rec.action.patient.as_deref().filter(|p| !p.is_empty()) {
            return vec![self.hasher.hash_one(("fhir", p))];
        }
        // An HL7 v2 message: the repetitions of PID-3 are identifiers of one patient, so the
        // first one (with its assigning authority) stands for the message's patient.
        if let Some(h) = &rec.hl7 {
            if let Some(id) = h.patient_identifiers.iter().find(|i| !i.id.is_empty()) {
                return vec![self
                    .hasher
                    .hash_one(("hl7", id.authority.as_str(), id.id.as_str()))];
            }
        }
        Vec::new()
    }

    #[cfg(test)]
    fn tracked(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(s, e), m| {
            let g = lock(m);
            (s + g.subjects.len(), e + g.entries)
        })
    }
}

impl Shard {
    /// Drop the subjects idle for a whole window: everything they held has expired (their
    /// state equals a new subject's).
    fn sweep_idle(&mut self, now: Instant, window: Duration) {
        let mut freed = 0;
        self.subjects.retain(|_, st| {
            let keep = now.saturating_duration_since(st.last_seen) < window;
            if !keep {
                freed += st.weight();
            }
            keep
        });
        self.entries = self.entries.saturating_sub(freed);
    }

    /// Over a limit: drop idle subjects, then the least recently active ones (never `keep`, the
    /// subject just observed) until an eighth below the limits.
    fn evict(&mut self, now: Instant, window: Duration, keep: u64, limits: Limits) {
        self.sweep_idle(now, window);
        let subjects_goal = limits.subjects_per_shard - limits.subjects_per_shard / 8;
        let entries_goal = limits.entries_per_shard - limits.entries_per_shard / 8;
        if self.subjects.len() <= limits.subjects_per_shard
            && self.entries <= limits.entries_per_shard
        {
            return;
        }
        let mut by_age: Vec<(Instant, u64)> = self
            .subjects
            .iter()
            .filter(|(k, _)| **k != keep)
            .map(|(k, st)| (st.last_seen, *k))
            .collect();
        by_age.sort_unstable();
        for (_, k) in by_age {
            if self.subjects.len() <= subjects_goal && self.entries <= entries_goal {
                break;
            }
            if let Some(st) = self.subjects.remove(&k) {
                self.entries = self.entries.saturating_sub(st.weight());
            }
        }
    }
}

/// The `anomaly` record of a finding: the triggering record's subject and context, never a
/// patient.
fn anomaly_record(trigger: &AuditRecord, f: &Finding, window_seconds: u64) -> AuditRecord {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    AuditRecord {
        time: String::new(),
        request_id: format!("anomaly-{n}"),
        phase: Phase::Anomaly,
        actor: Actor {
            subject: trigger.actor.subject.clone(),
            issuer: trigger.actor.issuer.clone(),
            client_id: trigger.actor.client_id.clone(),
            roles: trigger.actor.roles.clone(),
            tenant: trigger.actor.tenant.clone(),
            ..Default::default()
        },
        action: Action {
            method: "MONITOR".into(),
            route: trigger.action.route.clone(),
            listener: trigger.action.listener.clone(),
            channel: trigger.action.channel.clone(),
            ..Default::default()
        },
        outcome: Outcome {
            reason: Some(f.kind.to_string()),
            ..Default::default()
        },
        anomaly: Some(AnomalyDetails {
            kind: f.kind.to_string(),
            count: f.count,
            threshold: f.threshold,
            window_seconds,
        }),
        ..Default::default()
    }
}

/// Observe `rec` with `monitor` (if any), under the config of the generation the request runs
/// with (a reload that changed `unusual_access` starts counting afresh).
pub fn observe(
    monitor: Option<&Monitor>,
    generation: &crate::reload::Generation,
    rec: &AuditRecord,
) -> Vec<AuditRecord> {
    match monitor {
        Some(m) => {
            use std::sync::atomic::Ordering;
            if m.generation.load(Ordering::Acquire) != generation.number {
                m.reconfigure(&generation.config.unusual_access);
                m.generation.store(generation.number, Ordering::Release);
            }
            m.observe(rec, Instant::now())
        }
        None => Vec::new(),
    }
}

/// Queue the anomaly records `observe` returned (after the record that raised them).
pub fn append(sink: &caregate_audit::AuditSink, found: Vec<AuditRecord>) {
    for a in found {
        let result = if sink.append(a).is_ok() {
            "ok"
        } else {
            "error"
        };
        crate::metrics::AUDIT_RECORDS
            .with_label_values(&["anomaly", result])
            .inc();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use caregate_audit::{BreakGlassUse, Hl7Message, Hl7PatientId};

    fn cfg(max_patients: u64) -> UnusualAccessConfig {
        UnusualAccessConfig {
            window_seconds: 600,
            max_distinct_patients: max_patients,
            ..Default::default()
        }
    }

    fn access(subject: &str, patients: &[&str]) -> AuditRecord {
        AuditRecord {
            request_id: "r".into(),
            phase: Phase::Access,
            actor: Actor {
                subject: Some(subject.into()),
                issuer: Some("https://idp.test".into()),
                client_id: Some("ehr-app".into()),
                roles: vec!["clinician".into()],
                tenant: Some("hospital-a".into()),
                source_address: Some("10.0.0.7".into()),
                ..Default::default()
            },
            action: Action {
                method: "GET".into(),
                route: "fhir".into(),
                listener: "public".into(),
                channel: "public".into(),
                interaction: Some("read".into()),
                resource_type: Some("Patient".into()),
                resource_id: patients.first().map(|p| p.to_string()),
                patient: patients.first().map(|p| p.to_string()),
                patients: patients.iter().map(|p| p.to_string()).collect(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn with_reason(mut r: AuditRecord, phase: Phase, reason: &str) -> AuditRecord {
        r.phase = phase;
        r.outcome.reason = Some(reason.into());
        r
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn config_defaults_and_strictness() {
        let c: UnusualAccessConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(c, UnusualAccessConfig::default());
        assert!(c.enabled && c.cross_tenant);
        assert_eq!(
            (
                c.window_seconds,
                c.max_distinct_patients,
                c.max_cross_tenant,
                c.max_break_glass
            ),
            (3600, 100, 0, 3)
        );
        assert!(c.validate().is_ok());
        let c: UnusualAccessConfig =
            serde_yaml::from_str("{ window_seconds: 600, max_distinct_patients: 5 }").unwrap();
        assert_eq!((c.window_seconds, c.max_distinct_patients), (600, 5));
        assert!(c.enabled);
        let e = serde_yaml::from_str::<UnusualAccessConfig>("{ max_patients: 5 }").unwrap_err();
        assert!(e.to_string().contains("max_patients"), "{e}");
    }

    #[test]
    fn validate_names_the_key() {
        fn bad(f: impl Fn(&mut UnusualAccessConfig), key: &str) {
            let mut c = UnusualAccessConfig::default();
            f(&mut c);
            let e = c.validate().unwrap_err();
            assert!(e.starts_with(&format!("unusual_access.{key}:")), "{e}");
        }
        bad(|c| c.window_seconds = 0, "window_seconds");
        bad(
            |c| c.window_seconds = MAX_WINDOW_SECONDS + 1,
            "window_seconds",
        );
        bad(|c| c.max_distinct_patients = 0, "max_distinct_patients");
        bad(
            |c| c.max_distinct_patients = MAX_THRESHOLD + 1,
            "max_distinct_patients",
        );
        bad(|c| c.max_break_glass = 0, "max_break_glass");
        bad(
            |c| c.max_cross_tenant = MAX_THRESHOLD + 1,
            "max_cross_tenant",
        );
        bad(|c| c.exempt_roles = vec![" ".into()], "exempt_roles[0]");
        let strict = UnusualAccessConfig {
            max_cross_tenant: 0,
            ..Default::default()
        };
        assert!(strict.validate().is_ok());
    }

    #[test]
    fn at_the_threshold_nothing_past_it_one_anomaly_without_patients() {
        let m = Monitor::new(&cfg(5));
        let t0 = Instant::now();
        for i in 0..5 {
            let out = m.observe(
                &access("dr-a", &[format!("pat-a{i}").as_str()]),
                secs(t0, i),
            );
            assert!(out.is_empty(), "{out:?}");
        }
        // Reading the same patients again adds nothing.
        for i in 0..5 {
            assert!(m
                .observe(
                    &access("dr-a", &[format!("pat-a{i}").as_str()]),
                    secs(t0, 10 + i)
                )
                .is_empty());
        }
        let before = ANOMALIES.with_label_values(&[KIND_DISTINCT_PATIENTS]).get();
        let out = m.observe(&access("dr-a", &["pat-a5"]), secs(t0, 20));
        assert_eq!(out.len(), 1, "{out:?}");
        let a = &out[0];
        assert_eq!(a.phase, Phase::Anomaly);
        assert!(a.request_id.starts_with("anomaly-"), "{}", a.request_id);
        assert_eq!(a.actor.subject.as_deref(), Some("dr-a"));
        assert_eq!(a.actor.issuer.as_deref(), Some("https://idp.test"));
        assert_eq!(a.actor.client_id.as_deref(), Some("ehr-app"));
        assert_eq!(a.actor.tenant.as_deref(), Some("hospital-a"));
        assert_eq!(a.actor.roles, vec!["clinician".to_string()]);
        assert_eq!(a.actor.source_address, None);
        assert_eq!(a.action.method, "MONITOR");
        assert_eq!(
            (
                a.action.route.as_str(),
                a.action.listener.as_str(),
                a.action.channel.as_str()
            ),
            ("fhir", "public", "public")
        );
        assert_eq!(a.outcome.reason.as_deref(), Some(KIND_DISTINCT_PATIENTS));
        assert_eq!(
            a.anomaly,
            Some(AnomalyDetails {
                kind: KIND_DISTINCT_PATIENTS.into(),
                count: 6,
                threshold: 5,
                window_seconds: 600,
            })
        );
        let text = serde_json::to_string(a).unwrap();
        assert!(
            !text.contains("pat-"),
            "a patient in the anomaly record: {text}"
        );
        assert!(
            ANOMALIES.with_label_values(&[KIND_DISTINCT_PATIENTS]).get() > before,
            "the metric did not count it"
        );
    }

    #[test]
    fn one_anomaly_per_window_then_again_if_it_goes_on() {
        let m = Monitor::new(&cfg(5));
        let t0 = Instant::now();
        let mut found = Vec::new();
        // 20 new patients, one every 10 s: past the threshold at the 6th, suppressed after.
        for i in 0..20u64 {
            found.extend(m.observe(
                &access("dr-b", &[format!("p{i}").as_str()]),
                secs(t0, 10 * i),
            ));
        }
        assert_eq!(found.len(), 1, "{found:?}");
        // Past the window since the flag (at 50 s) and still reading new patients: once more.
        let mut later = Vec::new();
        for i in 0..10u64 {
            later.extend(m.observe(
                &access("dr-b", &[format!("q{i}").as_str()]),
                secs(t0, 655 + i),
            ));
        }
        assert_eq!(later.len(), 1, "{later:?}");
        assert_eq!(later[0].anomaly.as_ref().unwrap().threshold, 5);
    }

    #[test]
    fn the_window_slides() {
        let m = Monitor::new(&cfg(5));
        let t0 = Instant::now();
        for i in 0..5u64 {
            assert!(m
                .observe(&access("dr-c", &[format!("p{i}").as_str()]), secs(t0, i))
                .is_empty());
        }
        // The first five have left the 600 s window: five more are still within the threshold.
        for i in 5..10u64 {
            assert!(m
                .observe(
                    &access("dr-c", &[format!("p{i}").as_str()]),
                    secs(t0, 600 + i)
                )
                .is_empty());
        }
        // A patient read again stays in the window from its last read.
        let m = Monitor::new(&cfg(2));
        assert!(m.observe(&access("dr-d", &["x"]), secs(t0, 0)).is_empty());
        assert!(m.observe(&access("dr-d", &["y"]), secs(t0, 100)).is_empty());
        assert!(m.observe(&access("dr-d", &["x"]), secs(t0, 550)).is_empty());
        // At 710 s, y (100 s) has left the window but x (550 s) has not: x, z = 2.
        assert!(m.observe(&access("dr-d", &["z"]), secs(t0, 710)).is_empty());
        assert_eq!(m.observe(&access("dr-d", &["w"]), secs(t0, 711)).len(), 1);
    }

    #[test]
    fn one_request_naming_many_patients_counts_them_all() {
        let m = Monitor::new(&cfg(5));
        let t0 = Instant::now();
        let ids: Vec<String> = (0..8).map(|i| format!("pat-{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let out = m.observe(&access("dr-e", &refs), t0);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].anomaly.as_ref().unwrap().count, 8);
    }

    #[test]
    fn subjects_are_counted_apart_and_per_issuer() {
        let m = Monitor::new(&cfg(3));
        let t0 = Instant::now();
        for i in 0..3u64 {
            assert!(m
                .observe(&access("dr-f", &[format!("p{i}").as_str()]), secs(t0, i))
                .is_empty());
            assert!(m
                .observe(
                    &access("dr-g", &[format!("p{}", i + 3).as_str()]),
                    secs(t0, i)
                )
                .is_empty());
            let mut other_idp = access("dr-f", &[format!("p{}", i + 3).as_str()]);
            other_idp.actor.issuer = Some("https://other-idp.test".into());
            assert!(m.observe(&other_idp, secs(t0, i)).is_empty());
        }
    }

    #[test]
    fn what_is_not_counted() {
        let m = Monitor::new(&cfg(1));
        let t0 = Instant::now();
        // No subject.
        let mut anon = access("x", &["a", "b", "c"]);
        anon.actor.subject = None;
        assert!(m.observe(&anon, t0).is_empty());
        let mut empty = access("", &["a", "b", "c"]);
        empty.actor.subject = Some(String::new());
        assert!(m.observe(&empty, t0).is_empty());
        // Completion and denied records do not count patients.
        for phase in [
            Phase::Completion,
            Phase::Denied,
            Phase::Admin,
            Phase::Anomaly,
        ] {
            let mut r = access("dr-h", &["a", "b", "c"]);
            r.phase = phase;
            assert!(m.observe(&r, t0).is_empty(), "{phase:?}");
        }
        // An exempt role.
        let exempt = Monitor::new(&UnusualAccessConfig {
            exempt_roles: vec!["bulk-export".into()],
            ..cfg(1)
        });
        let mut r = access("svc-export", &["a", "b", "c"]);
        r.actor.roles.push("bulk-export".into());
        assert!(exempt.observe(&r, t0).is_empty());
        // Disabled.
        let off = Monitor::new(&UnusualAccessConfig {
            enabled: false,
            ..cfg(1)
        });
        assert!(off
            .observe(&access("dr-h", &["a", "b", "c"]), t0)
            .is_empty());
        assert_eq!(off.tracked().0, 0);
    }

    #[test]
    fn cross_tenant_refusals() {
        let m = Monitor::new(&cfg(100));
        let t0 = Instant::now();
        let refused = with_reason(
            access("dr-x", &["p1"]),
            Phase::Denied,
            REASON_TENANT_MISMATCH,
        );
        let out = m.observe(&refused, t0);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(
            out[0].anomaly,
            Some(AnomalyDetails {
                kind: KIND_CROSS_TENANT.into(),
                count: 1,
                threshold: 0,
                window_seconds: 600,
            })
        );
        assert_eq!(out[0].outcome.reason.as_deref(), Some(KIND_CROSS_TENANT));
        assert!(!serde_json::to_string(&out[0]).unwrap().contains("p1"));
        // Not again within the window; again after it.
        assert!(m.observe(&refused, secs(t0, 10)).is_empty());
        assert!(m.observe(&refused, secs(t0, 599)).is_empty());
        assert_eq!(m.observe(&refused, secs(t0, 600)).len(), 1);
        // A caller without a tenant (no claim) is not reaching another tenant.
        let mut no_tenant = refused.clone();
        no_tenant.actor.subject = Some("dr-y".into());
        no_tenant.actor.tenant = None;
        assert!(m.observe(&no_tenant, t0).is_empty());
        // Other denials do not count.
        let other = with_reason(access("dr-z", &["p1"]), Phase::Denied, "scope_denied");
        assert!(m.observe(&other, t0).is_empty());
        // A configured allowance.
        let m = Monitor::new(&UnusualAccessConfig {
            max_cross_tenant: 2,
            ..cfg(100)
        });
        assert!(m.observe(&refused, secs(t0, 0)).is_empty());
        assert!(m.observe(&refused, secs(t0, 1)).is_empty());
        let out = m.observe(&refused, secs(t0, 2));
        assert_eq!(out[0].anomaly.as_ref().unwrap().count, 3);
        // Switched off.
        let m = Monitor::new(&UnusualAccessConfig {
            cross_tenant: false,
            ..cfg(100)
        });
        assert!(m.observe(&refused, t0).is_empty());
    }

    #[test]
    fn repeated_break_glass() {
        let m = Monitor::new(&cfg(100));
        let t0 = Instant::now();
        let bg = |p: &str| with_reason(access("dr-er", &[p]), Phase::Access, REASON_BREAK_GLASS);
        for i in 0..3u64 {
            assert!(m.observe(&bg("p1"), secs(t0, i)).is_empty());
        }
        let out = m.observe(&bg("p2"), secs(t0, 3));
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(
            out[0].anomaly,
            Some(AnomalyDetails {
                kind: KIND_REPEATED_BREAK_GLASS.into(),
                count: 4,
                threshold: 3,
                window_seconds: 600,
            })
        );
        assert!(m.observe(&bg("p3"), secs(t0, 4)).is_empty());
        // The record's break_glass claim counts; a request its grant covered does not.
        let m = Monitor::new(&cfg(100));
        let claim = |from_grant: bool| {
            let mut r = access("dr-claim", &["p1"]);
            r.break_glass = Some(BreakGlassUse {
                purpose: "ETREAT".into(),
                reason: "cardiac arrest".into(),
                overrode: vec!["tenant".into()],
                from_grant,
            });
            r
        };
        for i in 0..10u64 {
            assert!(m.observe(&claim(true), secs(t0, i)).is_empty());
        }
        for i in 0..3u64 {
            assert!(m.observe(&claim(false), secs(t0, 10 + i)).is_empty());
        }
        let out = m.observe(&claim(false), secs(t0, 20));
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].anomaly.as_ref().unwrap().count, 4);
        assert_eq!(out[0].break_glass, None);
        let text = serde_json::to_string(&out[0]).unwrap();
        assert!(!text.contains("cardiac"), "{text}");
        // A denied record with that reason is not a use.
        let m = Monitor::new(&cfg(100));
        for i in 0..10u64 {
            let r = with_reason(access("dr-er", &["p1"]), Phase::Denied, REASON_BREAK_GLASS);
            assert!(m.observe(&r, secs(t0, i)).is_empty());
        }
        // Spread beyond the window: never more than 3 at once.
        let m = Monitor::new(&cfg(100));
        for i in 0..10u64 {
            assert!(m.observe(&bg("p1"), secs(t0, 250 * i)).is_empty());
        }
    }

    #[test]
    fn two_kinds_from_one_record() {
        let m = Monitor::new(&UnusualAccessConfig {
            max_break_glass: 1,
            ..cfg(2)
        });
        let t0 = Instant::now();
        let bg = |ps: &[&str]| with_reason(access("dr-2", ps), Phase::Access, REASON_BREAK_GLASS);
        assert!(m.observe(&bg(&["a"]), t0).is_empty());
        let out = m.observe(&bg(&["b", "c"]), secs(t0, 1));
        let kinds: Vec<&str> = out
            .iter()
            .map(|a| a.anomaly.as_ref().unwrap().kind.as_str())
            .collect();
        assert_eq!(
            kinds,
            vec![KIND_DISTINCT_PATIENTS, KIND_REPEATED_BREAK_GLASS]
        );
        assert_ne!(out[0].request_id, out[1].request_id);
    }

    #[test]
    fn hl7_messages_count_their_patient() {
        let m = Monitor::new(&cfg(2));
        let t0 = Instant::now();
        let msg = |ids: &[(&str, &str)]| AuditRecord {
            phase: Phase::Access,
            actor: Actor {
                subject: Some("lab-feed".into()),
                ..Default::default()
            },
            action: Action {
                method: "POST".into(),
                route: "hl7".into(),
                ..Default::default()
            },
            hl7: Some(Hl7Message {
                message_type: "ORU".into(),
                trigger_event: "R01".into(),
                patient_identifiers: ids
                    .iter()
                    .map(|(id, auth)| Hl7PatientId {
                        id: id.to_string(),
                        authority: auth.to_string(),
                        r#type: "MR".into(),
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        // One patient named by two identifiers, three times: one patient.
        for i in 0..3u64 {
            assert!(m
                .observe(&msg(&[("mrn-1", "HOSP"), ("ssn-1", "SSA")]), secs(t0, i))
                .is_empty());
        }
        assert!(m
            .observe(&msg(&[("mrn-2", "HOSP")]), secs(t0, 5))
            .is_empty());
        // The same id from another authority is another patient: 3 > 2.
        let out = m.observe(&msg(&[("mrn-2", "OTHER")]), secs(t0, 6));
        assert_eq!(out.len(), 1);
        let text = serde_json::to_string(&out[0]).unwrap();
        assert!(!text.contains("mrn-") && !text.contains("ssn-"), "{text}");
        // No identifier: nothing to count.
        assert!(m.observe(&msg(&[]), secs(t0, 7)).is_empty());
    }

    #[test]
    fn a_clock_that_goes_back_is_harmless() {
        let m = Monitor::new(&cfg(2));
        let t0 = Instant::now() + Duration::from_secs(1000);
        assert!(m.observe(&access("dr-t", &["a"]), t0).is_empty());
        assert!(m
            .observe(&access("dr-t", &["b"]), t0 - Duration::from_secs(500))
            .is_empty());
        assert_eq!(
            m.observe(&access("dr-t", &["c"]), t0 - Duration::from_secs(1))
                .len(),
            1
        );
    }

    #[test]
    fn memory_is_bounded() {
        let limits = Limits {
            subjects_per_shard: 8,
            entries_per_shard: 200,
            sweep_every: SWEEP_EVERY,
        };
        let m = Monitor::with_limits(&cfg(50), limits);
        let t0 = Instant::now();
        // Many subjects: at most the limit per shard is kept.
        for s in 0..2000u64 {
            m.observe(&access(&format!("dr-{s}"), &["a"]), secs(t0, s % 100));
        }
        let (subjects, entries) = m.tracked();
        assert!(subjects <= SHARDS * 8, "{subjects} subjects");
        assert!(entries <= SHARDS * 200, "{entries} entries");
        // One subject touching many patients keeps at most threshold + 1 of them.
        let m = Monitor::new(&cfg(50));
        for i in 0..5000u64 {
            m.observe(
                &access("dr-many", &[format!("p{i}").as_str()]),
                secs(t0, i / 100),
            );
        }
        let (subjects, entries) = m.tracked();
        assert_eq!(subjects, 1);
        assert!(entries <= 1 + 2 * 51 + 16 + 51, "{entries} entries");
        // The same patient read again and again does not grow the queue.
        let m = Monitor::new(&cfg(50));
        for i in 0..5000u64 {
            m.observe(&access("dr-one", &["p"]), t0 + Duration::from_millis(i));
        }
        assert!(m.tracked().1 < 40, "{:?}", m.tracked());
        // Idle subjects are swept: 2000 subjects at t0, then, a window later, 256 others
        // (on every shard, but with a chance of about 1e-6) observed 8 times each.
        let m = Monitor::with_limits(
            &cfg(50),
            Limits {
                sweep_every: 4,
                ..Limits::production()
            },
        );
        for s in 0..2000u64 {
            m.observe(&access(&format!("dr-{s}"), &["a"]), t0);
        }
        assert_eq!(m.tracked().0, 2000);
        for round in 0..8u64 {
            for s in 0..256u64 {
                m.observe(
                    &access(&format!("dr-late-{s}"), &["a"]),
                    secs(t0, 3600 + round),
                );
            }
        }
        let (subjects, entries) = m.tracked();
        assert_eq!(subjects, 256);
        // Each: itself, one patient, its 8 reads (compacted past 18).
        assert_eq!(entries, 256 * 10);
    }

    #[test]
    fn reconfigure_starts_afresh() {
        let m = Monitor::new(&cfg(3));
        let t0 = Instant::now();
        for i in 0..3u64 {
            assert!(m
                .observe(&access("dr-r", &[format!("p{i}").as_str()]), t0)
                .is_empty());
        }
        m.reconfigure(&cfg(3));
        assert_eq!(m.tracked().0, 1, "an unchanged config keeps the state");
        m.reconfigure(&cfg(4));
        assert_eq!(m.tracked(), (0, 0));
        assert_eq!(m.config().max_distinct_patients, 4);
        for i in 10..14u64 {
            assert!(m
                .observe(&access("dr-r", &[format!("p{i}").as_str()]), t0)
                .is_empty());
        }
        assert_eq!(m.observe(&access("dr-r", &["p20"]), t0).len(), 1);
    }

    #[test]
    fn init_metrics_shows_every_kind() {
        init_metrics();
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&prometheus::gather())
            .unwrap();
        for k in KINDS {
            assert!(
                text.contains(&format!("caregate_audit_anomalies_total{{kind=\"{k}\"}}")),
                "{k} missing from:\n{text}"
            );
        }
    }
}
