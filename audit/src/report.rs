//! Reports for the privacy officer (`caregate audit report --patient X`): every access to one
//! patient's data, read from a trail that verified.
//!
//! [`report`] first verifies the whole trail with [`crate::verify_files`] (every segment, in order,
//! and the links between them) and refuses, with [`ReportError::Verify`] naming the failure,
//! when it does not verify: nothing is ever reported from a trail that fails. It then reads the
//! lines it verified, and only those: each line is authenticated again (MAC, `seq`, `prev`) and
//! the lines read must end at the mac verification saw, so a file changed between the two
//! passes is refused too ([`ReportError::Changed`]); lines a running gateway appends after the
//! verification are not read.
//!
//! A record names patient X when `action.patient` is X, when X is in `action.patients`, or, for
//! an HL7 v2 message, when one of its PID-3 identifiers (`hl7.patient_identifiers[].id`) is X —
//! with [`Query::authority`] set, only an identifier with that assigning authority. Records in
//! `format: fhir_audit_event` are read back from the AuditEvent: its BALP patient entities
//! (`Patient/<id>`) name the patients (an AuditEvent carries no HL7 PID-3 identifiers).
//!
//! The access record and the completion record of one request (same request id, caller and
//! action) become one [`Entry`], with the outcome of the completion; when either record names
//! the patient, the entry is reported. A denied record is an entry of its own (refused, with its
//! reason). Admin records never name a patient. Entries are filtered by [`Query::from`] and
//! [`Query::to`] on their time (the first record's) and sorted by it.
//!
//! A record that verified but that this version cannot read (a kind of record written by a
//! newer caregate) is skipped when the patient's id appears nowhere in it, and refuses the
//! report ([`ReportError::Unreadable`]) when it does: a report never silently leaves out a
//! record that may name the patient.
//!
//! **Break-the-glass reviews** ([`Query::break_glass`], `caregate audit report --break-glass`):
//! the entries of requests that used emergency access, i.e. whose access, completion or denied
//! record carries [`crate::BreakGlassUse`] — of every patient, or, with [`Query::patient`] set,
//! of the entries that also name that patient (the two conditions may be met by the two
//! records of one request). Every entry, in either kind of report, carries the emergency access
//! it used ([`Entry::break_glass`]). In a FHIR-format trail the emergency access is read back
//! from the AuditEvent (the `urn:caregate:audit:break-glass*` extensions and `purposeOfEvent`,
//! see [`crate::fhir`]). An unreadable record refuses a break-the-glass report of every patient
//! when it holds a `break_glass` member anywhere.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chain::{self, LineKind};
use crate::record::{Actor, AuditRecord, BreakGlassUse, Phase};
use crate::verify::{VerifyError, VerifyReport};

/// What to report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// The patient: a FHIR `Patient` id, or an HL7 v2 PID-3 identifier. Required, except in a
    /// break-the-glass review ([`Query::break_glass`]), where empty means every patient.
    pub patient: String,
    /// For HL7 v2 records: only a PID-3 identifier with this assigning authority (PID-3.4, as
    /// recorded in `hl7.patient_identifiers[].authority`) matches. FHIR records match on the
    /// patient id alone.
    pub authority: Option<String>,
    /// Only entries at or after this instant (milliseconds since 1970-01-01T00:00:00Z); see
    /// [`parse_time`].
    pub from: Option<i64>,
    /// Only entries at or before this instant (milliseconds since the epoch, inclusive).
    pub to: Option<i64>,
    /// A break-the-glass review (`--break-glass`): only the entries of requests that used
    /// emergency access (a record carries [`crate::BreakGlassUse`]), of [`Query::patient`] when
    /// it is set, else of every patient.
    pub break_glass: bool,
}

impl Query {
    /// A query for every access to `patient`, at any time.
    pub fn new(patient: impl Into<String>) -> Query {
        Query {
            patient: patient.into(),
            ..Query::default()
        }
    }

    /// A break-the-glass review of every patient, at any time.
    pub fn break_glass() -> Query {
        Query {
            break_glass: true,
            ..Query::default()
        }
    }

    /// Whether the query names a patient (else: a break-the-glass review of every patient).
    fn has_patient(&self) -> bool {
        !self.patient.is_empty()
    }

    fn check(&self) -> Result<(), ReportError> {
        if !self.break_glass && self.patient.is_empty() {
            return Err(ReportError::Query(
                "no patient: name one, or ask for a break-glass review".into(),
            ));
        }
        if self.has_patient() && self.patient.trim().is_empty() {
            return Err(ReportError::Query("the patient id is empty".into()));
        }
        if self.authority.is_some() && !self.has_patient() {
            return Err(ReportError::Query(
                "an assigning authority narrows a patient's identifiers: name the patient".into(),
            ));
        }
        if let (Some(from), Some(to)) = (self.from, self.to) {
            if from > to {
                return Err(ReportError::Query(
                    "the start of the window is after its end".into(),
                ));
            }
        }
        Ok(())
    }

    /// Whether the records of one request (its access and completion records, or its denied
    /// record) make an entry of this report: one of them names the patient (when the query
    /// has one), and, in a break-the-glass review, one of them carries the emergency access.
    pub fn selects(&self, recs: &[&AuditRecord]) -> bool {
        let patient = !self.has_patient() || recs.iter().any(|r| self.names(r));
        let break_glass = !self.break_glass || recs.iter().any(|r| r.break_glass.is_some());
        patient && break_glass
    }

    /// Whether `rec` names the patient (never, for a query without one).
    pub fn names(&self, rec: &AuditRecord) -> bool {
        if !self.has_patient() {
            return false;
        }
        let a = &rec.action;
        if a.patient.as_deref() == Some(self.patient.as_str()) || a.patients.contains(&self.patient)
        {
            return true;
        }
        rec.hl7.as_ref().is_some_and(|h| {
            h.patient_identifiers.iter().any(|id| {
                id.id == self.patient
                    && self
                        .authority
                        .as_ref()
                        .is_none_or(|auth| id.authority == *auth)
            })
        })
    }

    fn in_window(&self, time: &str) -> bool {
        if self.from.is_none() && self.to.is_none() {
            return true;
        }
        // A time that does not parse (never written by caregate) is kept: a report errs on
        // the side of listing an access.
        let Some(t) = parse_instant(time.as_bytes()) else {
            return true;
        };
        self.from.is_none_or(|f| t >= f) && self.to.is_none_or(|to| t <= to)
    }
}

/// One access to the patient's data: a request (its access and completion records merged), or
/// a refused request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// When: the time of the request's first record (the access record, or the denial).
    pub time: String,
    /// When it completed: the completion record's time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed: Option<String>,
    /// The gateway's request id.
    pub request_id: String,
    /// The records merged: `access+completion`, `access` (no completion record: the request
    /// was in flight, or its completion record was lost), `completion` (no access record),
    /// or `denied`.
    pub phase: String,
    /// Who.
    pub who: Who,
    /// The tenant (hospital) the request was made for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// What.
    pub what: What,
    /// How it ended.
    pub outcome: EntryOutcome,
    /// The emergency access (break-the-glass) the request used, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub break_glass: Option<BreakGlass>,
    /// The `seq` of each record merged, in trail order: where the evidence is.
    pub seq: Vec<u64>,
}

/// An emergency access (break-the-glass), as a report names it: the [`crate::BreakGlassUse`]
/// of the entry's records (every member always present).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BreakGlass {
    /// The HL7 PurposeOfUse code claimed (e.g. `ETREAT`).
    pub purpose: String,
    /// The caller's free-text reason.
    pub reason: String,
    /// What it overrode (`tenant`, `mask`, ...), over the entry's records, in order: empty
    /// when nothing needed to be overridden.
    pub overrode: Vec<String>,
    /// True when an earlier claim's grant (same caller, same patient) covered the request
    /// (no header on this request).
    pub from_grant: bool,
}

impl BreakGlass {
    fn of(u: &BreakGlassUse) -> BreakGlass {
        BreakGlass {
            purpose: u.purpose.clone(),
            reason: u.reason.clone(),
            overrode: u.overrode.clone(),
            from_grant: u.from_grant,
        }
    }

    /// Adds what another record of the same request says it overrode.
    fn merge(&mut self, u: &BreakGlassUse) {
        for o in &u.overrode {
            if !self.overrode.contains(o) {
                self.overrode.push(o.clone());
            }
        }
        self.from_grant |= u.from_grant;
    }

    /// `ETREAT overrode tenant,mask (grant): unconscious patient in ER`.
    pub fn text(&self) -> String {
        let mut out = if self.purpose.is_empty() {
            "?".to_string()
        } else {
            self.purpose.clone()
        };
        if !self.overrode.is_empty() {
            out.push_str(&format!(" overrode {}", self.overrode.join(",")));
        }
        if self.from_grant {
            out.push_str(" (grant)");
        }
        if !self.reason.is_empty() {
            out.push_str(&format!(": {}", self.reason));
        }
        out
    }
}

/// Who made the request (see [`crate::Actor`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Who {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_certificate_subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<String>,
}

impl Who {
    fn of(a: &Actor) -> Who {
        Who {
            subject: a.subject.clone(),
            issuer: a.issuer.clone(),
            client_id: a.client_id.clone(),
            roles: a.roles.clone(),
            system: a.system.clone(),
            client_certificate_subject: a.client_certificate_subject.clone(),
            source_address: a.source_address.clone(),
            auth_method: a.auth_method.clone(),
        }
    }

    /// The caller in one phrase: the subject (else the system, the client id, the certificate
    /// subject, the address), then what else is known.
    pub fn text(&self) -> String {
        fn some(o: &Option<String>) -> Option<&str> {
            o.as_deref().filter(|s| !s.is_empty())
        }
        let main = some(&self.subject)
            .or(some(&self.system))
            .or(some(&self.client_id))
            .or(some(&self.client_certificate_subject))
            .or(some(&self.source_address))
            .unwrap_or("unknown");
        let mut out = main.to_string();
        if !self.roles.is_empty() {
            out.push_str(&format!(" [{}]", self.roles.join(",")));
        }
        for (label, v) in [
            ("client", some(&self.client_id)),
            ("system", some(&self.system)),
            ("cert", some(&self.client_certificate_subject)),
            ("from", some(&self.source_address)),
        ] {
            if let Some(v) = v.filter(|v| *v != main) {
                out.push_str(&format!(" {label} {v}"));
            }
        }
        out
    }
}

/// What the request did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct What {
    pub method: String,
    pub route: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interaction: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// For an HL7 v2 message: its type, trigger event and control id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hl7: Option<Hl7What>,
}

/// An HL7 v2 message, as a report names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Hl7What {
    pub message_type: String,
    pub trigger_event: String,
    pub control_id: String,
}

impl What {
    fn of(rec: &AuditRecord) -> What {
        let a = &rec.action;
        What {
            method: a.method.clone(),
            route: a.route.clone(),
            interaction: a.interaction.clone(),
            resource_type: a.resource_type.clone(),
            resource_id: a.resource_id.clone(),
            hl7: rec.hl7.as_ref().map(|h| Hl7What {
                message_type: h.message_type.clone(),
                trigger_event: h.trigger_event.clone(),
                control_id: h.control_id.clone(),
            }),
        }
    }

    /// `GET fhir read Patient/123`, or `MLLP adt ADT^A01 control MSG0001`.
    pub fn text(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        for s in [&self.method, &self.route] {
            if !s.is_empty() {
                parts.push(s.clone());
            }
        }
        if let Some(h) = &self.hl7 {
            parts.push(format!("{}^{}", h.message_type, h.trigger_event));
            if !h.control_id.is_empty() {
                parts.push(format!("control {}", h.control_id));
            }
            return parts.join(" ");
        }
        if let Some(i) = self.interaction.as_deref().filter(|s| !s.is_empty()) {
            parts.push(i.to_string());
        }
        match (
            self.resource_type.as_deref().filter(|s| !s.is_empty()),
            self.resource_id.as_deref().filter(|s| !s.is_empty()),
        ) {
            (Some(t), Some(id)) => parts.push(format!("{t}/{id}")),
            (Some(t), None) => parts.push(t.to_string()),
            (None, Some(id)) => parts.push(id.to_string()),
            (None, None) => {}
        }
        parts.join(" ")
    }
}

/// How the request ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EntryOutcome {
    /// `completed` (a completion record with a status below 400, or an HL7 acknowledgement
    /// that accepts), `failed` (status 400 or above, or an HL7 error or reject
    /// acknowledgement), `refused` (a denied record: no PHI was released) or `no completion
    /// record`.
    pub result: String,
    /// HTTP status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The gateway's reason code (e.g. `tenant_mismatch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// HL7 v2: MSA-1 of the acknowledgement the sender got.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_code: Option<String>,
}

impl EntryOutcome {
    fn of(rec: &AuditRecord) -> EntryOutcome {
        let ack_code = rec.hl7.as_ref().and_then(|h| h.ack_code.clone());
        let failed = rec.outcome.status.is_some_and(|s| s >= 400)
            || matches!(ack_code.as_deref(), Some("AE" | "AR" | "CE" | "CR"));
        let result = match rec.phase {
            Phase::Denied => "refused",
            Phase::Access => "no completion record",
            Phase::Completion | Phase::Admin | Phase::Anomaly if failed => "failed",
            Phase::Completion | Phase::Admin | Phase::Anomaly => "completed",
        };
        EntryOutcome {
            result: result.to_string(),
            status: rec.outcome.status,
            reason: rec.outcome.reason.clone(),
            ack_code,
        }
    }

    /// `completed 200`, `refused 403 tenant_mismatch`, `completed ack AA`.
    pub fn text(&self) -> String {
        let mut out = self.result.clone();
        if let Some(s) = self.status {
            out.push_str(&format!(" {s}"));
        }
        if let Some(r) = self.reason.as_deref().filter(|s| !s.is_empty()) {
            out.push_str(&format!(" {r}"));
        }
        if let Some(a) = self.ack_code.as_deref().filter(|s| !s.is_empty()) {
            out.push_str(&format!(" ack {a}"));
        }
        out
    }
}

/// The header line of [`Entry::text_line`]s (tab-separated columns).
/// `break_glass` is `-` for a request that did not use emergency access.
pub const TEXT_HEADER: &str = "time\twho\ttenant\twhat\toutcome\tbreak_glass\tphase\trequest_id";

impl Entry {
    fn start(rec: &AuditRecord, seq: u64) -> Entry {
        Entry {
            time: rec.time.clone(),
            completed: None,
            request_id: rec.request_id.clone(),
            phase: rec.phase.as_str().to_string(),
            who: Who::of(&rec.actor),
            tenant: rec.actor.tenant.clone(),
            what: What::of(rec),
            outcome: EntryOutcome::of(rec),
            break_glass: rec.break_glass.as_ref().map(BreakGlass::of),
            seq: vec![seq],
        }
    }

    fn complete(&mut self, rec: &AuditRecord, seq: u64) {
        self.phase = "access+completion".into();
        self.completed = Some(rec.time.clone());
        self.outcome = EntryOutcome::of(rec);
        if self.what.hl7.is_none() {
            self.what = What::of(rec);
        }
        if let Some(u) = &rec.break_glass {
            match &mut self.break_glass {
                Some(bg) => bg.merge(u),
                None => self.break_glass = Some(BreakGlass::of(u)),
            }
        }
        self.seq.push(seq);
    }

    /// The entry as one line of tab-separated columns ([`TEXT_HEADER`]). Control characters
    /// (tabs and line breaks included) and bidirectional-text controls in recorded values are
    /// escaped, so a value sent by a client cannot forge a line or a column.
    pub fn text_line(&self) -> String {
        [
            clean(&self.time),
            clean(&self.who.text()),
            clean(self.tenant.as_deref().unwrap_or("-")),
            clean(&self.what.text()),
            clean(&self.outcome.text()),
            clean(
                &self
                    .break_glass
                    .as_ref()
                    .map_or_else(|| "-".to_string(), BreakGlass::text),
            ),
            clean(&self.phase),
            clean(&self.request_id),
        ]
        .join("\t")
    }
}

/// `s` with control and bidirectional-formatting characters escaped (`\t`, `\u{202e}`).
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let bidi = matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A report and the verification it rests on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The entries, by time.
    pub entries: Vec<Entry>,
    /// What [`crate::verify_files`] found, one report per file (their warnings are worth printing:
    /// an unsealed tail, a missing anchor).
    pub verified: Vec<VerifyReport>,
}

/// Why there is no report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportError {
    /// The trail does not verify: nothing is reported from it.
    Verify(VerifyError),
    /// A file no longer holds the lines that verified (it was changed while being read).
    Changed {
        file: PathBuf,
        line: u64,
        detail: String,
    },
    /// A verified record names the patient (its id appears in it) but this version cannot
    /// read it.
    Unreadable {
        file: PathBuf,
        line: u64,
        seq: u64,
        detail: String,
    },
    /// A file cannot be read.
    Io { file: PathBuf, detail: String },
    /// No file was given.
    NoFiles,
    /// The query cannot be answered as given.
    Query(String),
}

impl std::fmt::Display for ReportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReportError::Verify(e) => write!(
                f,
                "the trail does not verify, no report from it: {e}"
            ),
            ReportError::Changed { file, line, detail } => write!(
                f,
                "{}: line {line}: {detail}: the file changed after it was verified; report from a copy, or re-run",
                file.display()
            ),
            ReportError::Unreadable {
                file,
                line,
                seq,
                detail,
            } => write!(
                f,
                "{}: line {line}: seq {seq}: a verified record that may name the patient cannot be read ({detail}): no report that could leave it out; use the caregate version that wrote the trail",
                file.display()
            ),
            ReportError::Io { file, detail } => write!(f, "{}: {detail}", file.display()),
            ReportError::NoFiles => write!(f, "no audit file to report from"),
            ReportError::Query(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for ReportError {}

impl From<VerifyError> for ReportError {
    fn from(e: VerifyError) -> Self {
        ReportError::Verify(e)
    }
}

/// Every access to `query.patient` in the trail made of `paths` (its segments, oldest first,
/// as [`crate::chain_files`] lists them), after verifying the trail with [`crate::verify_files`]; a
/// trail that does not verify is refused ([`ReportError::Verify`]). See the module docs.
pub fn report(
    paths: &[PathBuf],
    hmac_key: &[u8],
    query: &Query,
) -> Result<Vec<Entry>, ReportError> {
    report_verified(paths, hmac_key, query).map(|r| r.entries)
}

/// [`report`], with the verification reports of the files.
pub fn report_verified(
    paths: &[PathBuf],
    hmac_key: &[u8],
    query: &Query,
) -> Result<Report, ReportError> {
    report_verified_keys(paths, &crate::chain::AuditKeys::single(hmac_key), query)
}

/// [`report_verified`] over a trail that may span key rotations: every key it names (see
/// [`crate::verify_files_keys`]).
pub fn report_verified_keys(
    paths: &[PathBuf],
    keys: &crate::chain::AuditKeys,
    query: &Query,
) -> Result<Report, ReportError> {
    query.check()?;
    if paths.is_empty() {
        return Err(ReportError::NoFiles);
    }
    // First the whole trail, every segment and link: never a report from a trail that fails.
    let verified = crate::verify::verify_files_keys(paths, keys)?;
    let mut sel = Selector {
        query,
        entries: Vec::new(),
        open: HashMap::new(),
    };
    for (path, v) in paths.iter().zip(&verified) {
        read_verified(path, v, keys, |line, seq, bytes| {
            sel.push(path, line, seq, bytes)
        })?;
    }
    let mut entries: Vec<Entry> = sel
        .entries
        .into_iter()
        .filter(|e| query.in_window(&e.time))
        .collect();
    sort_entries(&mut entries);
    Ok(Report { entries, verified })
}

/// Sorts entries by time (stable: entries of the same millisecond keep their order); for
/// merging the reports of several trails.
pub fn sort_entries(entries: &mut [Entry]) {
    entries.sort_by_key(|e| parse_instant(e.time.as_bytes()).unwrap_or(i64::MIN));
}

/// Calls `each(line number, seq, line)` for every record line among the lines of `path` that
/// `verified` covers, authenticating each line again and checking that they are the lines
/// verified (the same seq run, `prev` links, and last mac).
fn read_verified(
    path: &Path,
    verified: &VerifyReport,
    keys: &crate::chain::AuditKeys,
    mut each: impl FnMut(u64, u64, &[u8]) -> Result<(), ReportError>,
) -> Result<(), ReportError> {
    let changed = |line: u64, detail: &str| ReportError::Changed {
        file: path.to_path_buf(),
        line,
        detail: detail.to_string(),
    };
    let io = |e: std::io::Error| ReportError::Io {
        file: path.to_path_buf(),
        detail: e.to_string(),
    };
    let file = File::open(path).map_err(io)?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut buf = Vec::with_capacity(4096);
    let mut prev_mac: Option<String> = None;
    let mut next_seq = verified.first_seq;
    let mut in_force: Option<usize> = None;
    for line_no in 1..=verified.lines {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(io)?;
        if n == 0 || buf.last() != Some(&b'\n') {
            return Err(changed(
                line_no,
                "the file is shorter than when it was verified",
            ));
        }
        let line = &buf[..buf.len() - 1];
        let (parsed, key) = chain::parse_line_keys(keys, line, in_force)
            .map_err(|_| changed(line_no, "the line no longer authenticates"))?;
        in_force = Some(key);
        let expected_prev = prev_mac.as_deref().unwrap_or(verified.first_prev.as_str());
        if Some(parsed.seq) != next_seq || parsed.prev != expected_prev {
            return Err(changed(line_no, "the line is not the one verified"));
        }
        if parsed.kind == LineKind::Record {
            each(line_no, parsed.seq, line)?;
        }
        next_seq = Some(parsed.seq + 1);
        prev_mac = Some(parsed.mac);
    }
    if prev_mac.unwrap_or_default() != verified.last_mac {
        return Err(changed(verified.lines, "the lines read end elsewhere"));
    }
    Ok(())
}

/// The member of a record line that holds the record.
#[derive(Deserialize)]
struct RecordLine {
    record: Value,
}

/// What pairs an access record with its completion record: the request id, the caller and the
/// action, all of which both records carry alike. (Request ids can be chosen by clients, so the
/// id alone does not pair.)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RequestKey {
    request_id: String,
    method: String,
    route: String,
    listener: String,
    resource: (Option<String>, Option<String>),
    caller: [Option<String>; 4],
}

impl RequestKey {
    fn of(rec: &AuditRecord) -> RequestKey {
        let a = &rec.action;
        let who = &rec.actor;
        RequestKey {
            request_id: rec.request_id.clone(),
            method: a.method.clone(),
            route: a.route.clone(),
            listener: a.listener.clone(),
            resource: (a.resource_type.clone(), a.resource_id.clone()),
            caller: [
                who.subject.clone(),
                who.client_id.clone(),
                who.system.clone(),
                who.source_address.clone(),
            ],
        }
    }
}

/// An access record waiting for its completion.
enum Open {
    /// It is selected on its own (it names the patient; in a break-the-glass review, it also
    /// carries the emergency access): its entry.
    Reported(usize),
    /// It is not (with its completion, it may be): the record and its seq.
    Pending(Box<(AuditRecord, u64)>),
}

struct Selector<'q> {
    query: &'q Query,
    entries: Vec<Entry>,
    open: HashMap<RequestKey, Open>,
}

impl Selector<'_> {
    fn push(&mut self, path: &Path, line: u64, seq: u64, bytes: &[u8]) -> Result<(), ReportError> {
        let unreadable = |detail: String| ReportError::Unreadable {
            file: path.to_path_buf(),
            line,
            seq,
            detail,
        };
        let rl: RecordLine =
            serde_json::from_slice(bytes).map_err(|e| unreadable(e.to_string()))?;
        let rec = match to_record(&rl.record) {
            Ok(r) => r,
            Err(detail) if self.may_select(&rl.record) => return Err(unreadable(detail)),
            Err(_) => return Ok(()),
        };
        let selected = self.query.selects(&[&rec]);
        match rec.phase {
            Phase::Admin | Phase::Anomaly => {}
            Phase::Denied => {
                if selected {
                    self.entries.push(Entry::start(&rec, seq));
                }
            }
            Phase::Access => {
                let key = RequestKey::of(&rec);
                let open = if selected {
                    self.entries.push(Entry::start(&rec, seq));
                    Open::Reported(self.entries.len() - 1)
                } else {
                    Open::Pending(Box::new((rec, seq)))
                };
                self.open.insert(key, open);
            }
            Phase::Completion => match self.open.remove(&RequestKey::of(&rec)) {
                Some(Open::Reported(i)) => {
                    if let Some(e) = self.entries.get_mut(i) {
                        e.complete(&rec, seq);
                    }
                }
                Some(Open::Pending(access)) => {
                    if self.query.selects(&[&access.0, &rec]) {
                        let (acc, acc_seq) = *access;
                        let mut e = Entry::start(&acc, acc_seq);
                        e.complete(&rec, seq);
                        self.entries.push(e);
                    }
                }
                None => {
                    if selected {
                        self.entries.push(Entry::start(&rec, seq));
                    }
                }
            },
        }
        Ok(())
    }

    /// Whether a record this version cannot read may belong in the report: the patient's id
    /// appears in it, or, in a break-the-glass review of every patient, it holds a
    /// `break_glass` member.
    fn may_select(&self, v: &Value) -> bool {
        if self.query.has_patient() {
            mentions(v, &self.query.patient)
        } else {
            has_key(v, "break_glass")
        }
    }
}

/// Whether an object member named `key` appears anywhere in `v`.
fn has_key(v: &Value, key: &str) -> bool {
    match v {
        Value::Array(a) => a.iter().any(|x| has_key(x, key)),
        Value::Object(m) => m.contains_key(key) || m.values().any(|x| has_key(x, key)),
        _ => false,
    }
}

/// Whether the string `id` appears anywhere in `v` (as a string, or as the id of a
/// `Patient/<id>` reference).
fn mentions(v: &Value, id: &str) -> bool {
    match v {
        Value::String(s) => s == id || s.strip_prefix("Patient/") == Some(id),
        Value::Array(a) => a.iter().any(|x| mentions(x, id)),
        Value::Object(m) => m.values().any(|x| mentions(x, id)),
        _ => false,
    }
}

/// The record of a line: an [`AuditRecord`] (`format: json`), or one read back from a FHIR
/// `AuditEvent` (`format: fhir_audit_event`).
fn to_record(v: &Value) -> Result<AuditRecord, String> {
    if v.get("resourceType").and_then(Value::as_str) == Some("AuditEvent") {
        return Ok(from_audit_event(v));
    }
    AuditRecord::deserialize(v).map_err(|e| e.to_string())
}

/// The parts of an [`AuditRecord`] that [`crate::fhir::to_fhir_audit_event`] keeps, read back.
fn from_audit_event(ev: &Value) -> AuditRecord {
    let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_string);
    let mut rec = AuditRecord {
        time: ev["recorded"].as_str().unwrap_or("").to_string(),
        ..AuditRecord::default()
    };
    let mut bg: Option<BreakGlassUse> = None;
    for ext in ev["extension"].as_array().into_iter().flatten() {
        let Some(name) = ext["url"]
            .as_str()
            .and_then(|u| u.strip_prefix(crate::fhir::EXTENSION_PREFIX))
        else {
            continue;
        };
        let s = text(&ext["valueCode"]).or_else(|| text(&ext["valueString"]));
        let n = ext["valueInteger"]
            .as_u64()
            .or_else(|| ext["valueDecimal"].as_u64());
        match name {
            "phase" => {
                rec.phase = match s.as_deref() {
                    Some("completion") => Phase::Completion,
                    Some("denied") => Phase::Denied,
                    Some("admin") => Phase::Admin,
                    Some("anomaly") => Phase::Anomaly,
                    _ => Phase::Access,
                }
            }
            "method" => rec.action.method = s.unwrap_or_default(),
            "route" => rec.action.route = s.unwrap_or_default(),
            "listener" => rec.action.listener = s.unwrap_or_default(),
            "channel" => rec.action.channel = s.unwrap_or_default(),
            "tenant" => rec.actor.tenant = s,
            "auth-method" => rec.actor.auth_method = s,
            "http-status" => rec.outcome.status = n.and_then(|n| u16::try_from(n).ok()),
            "bytes" => rec.outcome.bytes = n,
            "duration-ms" => rec.outcome.duration_ms = n,
            "break-glass" if ext["valueBoolean"] == Value::Bool(true) => {
                bg.get_or_insert_with(BreakGlassUse::default);
            }
            "break-glass-reason" => {
                bg.get_or_insert_with(BreakGlassUse::default).reason = s.unwrap_or_default()
            }
            "break-glass-overrode" => {
                if let Some(o) = s {
                    bg.get_or_insert_with(BreakGlassUse::default)
                        .overrode
                        .push(o);
                }
            }
            "break-glass-from-grant" => {
                bg.get_or_insert_with(BreakGlassUse::default).from_grant =
                    ext["valueBoolean"] == Value::Bool(true)
            }
            _ => {}
        }
    }
    if let Some(mut bg) = bg {
        bg.purpose = ev["purposeOfEvent"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["coding"].as_array().into_iter().flatten())
            .find(|c| c["system"] == crate::fhir::ACT_REASON)
            .and_then(|c| text(&c["code"]))
            .unwrap_or_default();
        rec.break_glass = Some(bg);
    }
    let subtype = &ev["subtype"][0];
    if subtype["system"]
        .as_str()
        .is_some_and(|s| s.ends_with("/restful-interaction"))
    {
        rec.action.interaction = text(&subtype["code"]);
    }
    rec.outcome.reason = text(&ev["outcomeDesc"]);

    let mut client: Option<&Value> = None;
    for agent in ev["agent"].as_array().into_iter().flatten() {
        let type_system = agent["type"]["coding"][0]["system"].as_str().unwrap_or("");
        let id = &agent["who"]["identifier"];
        if type_system.ends_with("/v3-ParticipationType") {
            rec.actor.subject = text(&id["value"]);
            rec.actor.issuer = text(&id["system"]);
            rec.actor.roles = agent["role"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| text(&r["text"]))
                .collect();
        } else if agent["requestor"] == Value::Bool(false)
            && agent["who"]["display"] == "caregate"
            && id["value"]
                .as_str()
                .is_some_and(|v| v.starts_with("caregate"))
        {
            // The gateway itself.
        } else if client.is_none() {
            client = Some(agent);
        }
    }
    if let Some(agent) = client {
        let who = &agent["who"];
        let name = text(&who["identifier"]["value"]).filter(|v| v != "unknown");
        rec.actor.client_certificate_subject = text(&who["display"]);
        rec.actor.source_address = text(&agent["network"]["address"]);
        rec.actor.system = text(&agent["name"]);
        // The client id, else the system name (see the mapping in `fhir`).
        let cert_only = rec.actor.system.is_none()
            && rec.actor.subject.is_none()
            && rec.actor.auth_method.as_deref() == Some("client_certificate");
        if cert_only {
            rec.actor.system = name;
        } else {
            rec.actor.client_id = name;
        }
    }

    for entity in ev["entity"].as_array().into_iter().flatten() {
        let role = entity["role"]["code"].as_str().unwrap_or("");
        let what = &entity["what"];
        if entity["type"]["code"] == "XrequestId" {
            rec.request_id = what["identifier"]["value"]
                .as_str()
                .unwrap_or("")
                .to_string();
        } else if role == "1" {
            if let Some(id) = what["reference"]
                .as_str()
                .and_then(|r| r.strip_prefix("Patient/"))
                .filter(|id| !id.is_empty())
            {
                if rec.action.patient.is_none() {
                    rec.action.patient = Some(id.to_string());
                }
                if !rec.action.patients.iter().any(|p| p == id) {
                    rec.action.patients.push(id.to_string());
                }
            }
        } else if role == "4" {
            match what["reference"].as_str().and_then(|r| r.split_once('/')) {
                Some((t, id)) => {
                    rec.action.resource_type = Some(t.to_string());
                    rec.action.resource_id = Some(id.to_string());
                }
                None => rec.action.resource_type = text(&what["type"]),
            }
        } else if role == "24" {
            // "search-type Observation (parameters not recorded)"
            rec.action.resource_type = entity["description"]
                .as_str()
                .and_then(|d| d.split_whitespace().nth(1))
                .filter(|t| !t.starts_with('('))
                .map(str::to_string);
        }
    }
    rec
}

/// Parses a `--from` / `--to` bound: RFC 3339 (`2024-05-01T12:00:00Z`,
/// `2024-05-01T14:00:00.250+02:00`) or a date (`2024-05-01`, a UTC day: its first millisecond,
/// or with `end_of_day` its last). Milliseconds since the epoch.
pub fn parse_time(s: &str, end_of_day: bool) -> Result<i64, String> {
    let b = s.trim().as_bytes();
    let parsed = if b.len() == 10 {
        parse_date(b).map(|days| {
            let start = days * 86_400_000;
            if end_of_day {
                start + 86_400_000 - 1
            } else {
                start
            }
        })
    } else {
        parse_instant(b)
    };
    parsed.ok_or_else(|| {
        format!("`{s}` is neither an RFC 3339 time (2024-05-01T12:00:00Z) nor a date (2024-05-01)")
    })
}

fn digits(b: &[u8]) -> Option<i64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
}

/// `YYYY-MM-DD` to days since 1970-01-01.
fn parse_date(b: &[u8]) -> Option<i64> {
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, m, d) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if d < 1 || d > days_in_month {
        return None;
    }
    Some(crate::calendar::days_from_civil(y, m, d))
}

/// RFC 3339 date-time to milliseconds since the epoch (fractions beyond milliseconds are cut).
fn parse_instant(b: &[u8]) -> Option<i64> {
    if b.len() < 20 || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let days = parse_date(&b[..10])?;
    let (h, mi, s) = (
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
    );
    if h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut rest = &b[19..];
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        for (i, d) in frac[..n.min(3)].iter().enumerate() {
            millis += i64::from(d - b'0') * [100, 10, 1][i];
        }
        rest = &frac[n..];
    }
    let offset_min = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), oh1, oh2, b':', om1, om2] => {
            let (oh, om) = (digits(&[*oh1, *oh2])?, digits(&[*om1, *om2])?);
            if oh > 23 || om > 59 {
                return None;
            }
            let m = oh * 60 + om;
            if *sign == b'+' {
                m
            } else {
                -m
            }
        }
        _ => return None,
    };
    Some(days * 86_400_000 + ((h * 60 + mi) * 60 + s) * 1000 + millis - offset_min * 60_000)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{
        chain_files, Action, AuditConfig, AuditFormat, AuditSink, FsyncPolicy, Hl7Message,
        Hl7PatientId, Outcome, VerifyErrorKind,
    };
    use std::sync::atomic::{AtomicU64, Ordering};

    const KEY: &str = "report-unit-test-key-0123456789abcdef-0123";

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "caregate-audit-report-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rec(id: &str, phase: Phase, time: &str, subject: &str) -> AuditRecord {
        AuditRecord {
            time: time.into(),
            request_id: id.into(),
            phase,
            actor: Actor {
                subject: Some(subject.into()),
                issuer: Some("https://idp.example.test".into()),
                client_id: Some("ehr-app".into()),
                roles: vec!["clinician".into()],
                tenant: Some("hospital-a".into()),
                auth_method: Some("token".into()),
                source_address: Some("10.1.2.3".into()),
                ..Actor::default()
            },
            action: Action {
                method: "GET".into(),
                route: "fhir".into(),
                listener: "public".into(),
                channel: "public".into(),
                ..Action::default()
            },
            ..AuditRecord::default()
        }
    }

    /// A read of `Patient/<patient>`.
    fn read(id: &str, phase: Phase, time: &str, patient: &str) -> AuditRecord {
        let mut r = rec(id, phase, time, "dr-alice");
        r.action.interaction = Some("read".into());
        r.action.resource_type = Some("Patient".into());
        r.action.resource_id = Some(patient.into());
        r.action.patient = Some(patient.into());
        if phase != Phase::Access {
            r.outcome = Outcome {
                status: Some(if phase == Phase::Denied { 403 } else { 200 }),
                reason: (phase == Phase::Denied).then(|| "tenant_mismatch".to_string()),
                ..Outcome::default()
            };
        }
        r
    }

    fn write_trail(dir: &TempDir, format: AuditFormat, recs: Vec<AuditRecord>) -> PathBuf {
        let path = dir.0.join("audit.jsonl");
        let mut cfg = AuditConfig::new(&path, KEY);
        cfg.fsync = FsyncPolicy::Never;
        cfg.format = format;
        cfg.checkpoint_every_records = 4;
        let sink = AuditSink::start(&cfg).unwrap();
        for r in recs {
            sink.append(r).unwrap();
        }
        sink.shutdown();
        path
    }

    /// Patient X read twice (one with its completion in a later line), once refused, once by a
    /// search naming several patients, once in a completion whose access record names nobody,
    /// and once by an HL7 message; patient Y read once; an admin record.
    fn sample() -> Vec<AuditRecord> {
        let mut v = vec![
            read("r1", Phase::Access, "2024-05-01T10:00:00.000Z", "pat-x"),
            read("r2", Phase::Access, "2024-05-01T10:00:01.000Z", "pat-y"),
            read("r1", Phase::Completion, "2024-05-01T10:00:02.000Z", "pat-x"),
            read("r2", Phase::Completion, "2024-05-01T10:00:03.000Z", "pat-y"),
            read("r3", Phase::Denied, "2024-05-02T09:00:00.000Z", "pat-x"),
            read("r4", Phase::Access, "2024-05-03T09:00:00.000Z", "pat-x"),
        ];
        let mut search = rec("r5", Phase::Access, "2024-05-04T09:00:00.000Z", "dr-bob");
        search.action.interaction = Some("search-type".into());
        search.action.resource_type = Some("Observation".into());
        search.action.patient = Some("pat-z".into());
        search.action.patients = vec!["pat-z".into(), "pat-x".into()];
        v.push(search.clone());
        search.phase = Phase::Completion;
        search.outcome.status = Some(200);
        v.push(search);
        // The access names nobody; its completion names pat-x (found in the response).
        let mut bulk = rec("r6", Phase::Access, "2024-05-05T09:00:00.000Z", "dr-carol");
        bulk.action.resource_type = Some("Observation".into());
        v.push(bulk.clone());
        bulk.phase = Phase::Completion;
        bulk.outcome.status = Some(200);
        bulk.action.patients = vec!["pat-x".into()];
        v.push(bulk);
        let mut hl7 = rec("r7", Phase::Completion, "2024-05-06T09:00:00.000Z", "lab");
        hl7.action.method = "MLLP".into();
        hl7.action.route = "adt".into();
        hl7.action.interaction = Some("hl7v2:ADT^A01".into());
        hl7.hl7 = Some(Hl7Message {
            message_type: "ADT".into(),
            trigger_event: "A01".into(),
            control_id: "MSG0001".into(),
            sending_application: "EPIC".into(),
            sending_facility: "HOSP".into(),
            patient_identifiers: vec![
                Hl7PatientId {
                    id: "pat-x".into(),
                    authority: "HOSP".into(),
                    r#type: "MR".into(),
                },
                Hl7PatientId {
                    id: "mrn-9".into(),
                    authority: "OTHER".into(),
                    r#type: "MR".into(),
                },
            ],
            ack_code: Some("AA".into()),
        });
        v.push(hl7);
        let mut admin = rec("r8", Phase::Admin, "2024-05-07T09:00:00.000Z", "ops");
        admin.action.patient = None;
        v.push(admin);
        v
    }

    fn ids(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.request_id.as_str()).collect()
    }

    #[test]
    fn reports_exactly_the_accesses_to_the_patient_merged_per_request() {
        let dir = TempDir::new("select");
        let path = write_trail(&dir, AuditFormat::Json, sample());
        let files = chain_files(&path);
        let key = KEY.as_bytes();

        let x = report(&files, key, &Query::new("pat-x")).unwrap();
        assert_eq!(ids(&x), ["r1", "r3", "r4", "r5", "r6", "r7"]);
        let r1 = &x[0];
        assert_eq!(r1.phase, "access+completion");
        assert_eq!(r1.time, "2024-05-01T10:00:00.000Z");
        assert_eq!(r1.completed.as_deref(), Some("2024-05-01T10:00:02.000Z"));
        assert_eq!(r1.outcome.result, "completed");
        assert_eq!(r1.outcome.status, Some(200));
        assert_eq!(r1.who.subject.as_deref(), Some("dr-alice"));
        assert_eq!(r1.tenant.as_deref(), Some("hospital-a"));
        assert_eq!(r1.what.text(), "GET fhir read Patient/pat-x");
        assert_eq!(r1.seq.len(), 2);
        let r3 = &x[1];
        assert_eq!(
            (r3.phase.as_str(), r3.outcome.result.as_str()),
            ("denied", "refused")
        );
        assert_eq!(r3.outcome.text(), "refused 403 tenant_mismatch");
        assert_eq!(x[2].outcome.result, "no completion record");
        assert_eq!(x[3].who.subject.as_deref(), Some("dr-bob"));
        assert_eq!(x[3].phase, "access+completion");
        assert_eq!(x[4].who.subject.as_deref(), Some("dr-carol"));
        assert_eq!(x[4].phase, "access+completion");
        assert_eq!(x[5].what.text(), "MLLP adt ADT^A01 control MSG0001");
        assert_eq!(x[5].outcome.text(), "completed ack AA");
        // Nothing of another patient leaks into the report.
        let json = serde_json::to_string(&x).unwrap();
        assert!(!json.contains("pat-y") && !json.contains("pat-z"), "{json}");
        for e in &x {
            let line = e.text_line();
            assert_eq!(
                line.split('\t').count(),
                TEXT_HEADER.split('\t').count(),
                "{line}"
            );
        }

        let y = report(&files, key, &Query::new("pat-y")).unwrap();
        assert_eq!(ids(&y), ["r2"]);
        assert!(report(&files, key, &Query::new("nobody"))
            .unwrap()
            .is_empty());

        // HL7 identifiers, with and without the assigning authority.
        let mut q = Query::new("mrn-9");
        assert_eq!(ids(&report(&files, key, &q).unwrap()), ["r7"]);
        q.authority = Some("HOSP".into());
        assert!(report(&files, key, &q).unwrap().is_empty());
        q.authority = Some("OTHER".into());
        assert_eq!(ids(&report(&files, key, &q).unwrap()), ["r7"]);
    }

    #[test]
    fn the_window_bounds_are_inclusive_and_dates_cover_their_day() {
        let dir = TempDir::new("window");
        let path = write_trail(&dir, AuditFormat::Json, sample());
        let files = chain_files(&path);
        let mut q = Query::new("pat-x");
        q.from = Some(parse_time("2024-05-02", false).unwrap());
        q.to = Some(parse_time("2024-05-04", true).unwrap());
        assert_eq!(
            ids(&report(&files, KEY.as_bytes(), &q).unwrap()),
            ["r3", "r4", "r5"]
        );
        q.from = Some(parse_time("2024-05-02T11:00:00+02:00", false).unwrap());
        q.to = Some(parse_time("2024-05-04T09:00:00.000Z", true).unwrap());
        assert_eq!(
            ids(&report(&files, KEY.as_bytes(), &q).unwrap()),
            ["r3", "r4", "r5"]
        );
        q.from = Some(parse_time("2024-05-02T09:00:00.001Z", false).unwrap());
        assert_eq!(
            ids(&report(&files, KEY.as_bytes(), &q).unwrap()),
            ["r4", "r5"]
        );
        q.to = q.from.map(|f| f - 1);
        assert!(matches!(
            report(&files, KEY.as_bytes(), &q),
            Err(ReportError::Query(_))
        ));
    }

    #[test]
    fn a_tampered_or_foreign_trail_is_refused() {
        let dir = TempDir::new("tamper");
        let path = write_trail(&dir, AuditFormat::Json, sample());
        let files = chain_files(&path);
        // Another key: the trail does not verify.
        let e = report(
            &files,
            b"another-key-0123456789abcdef-0123456789",
            &Query::new("pat-x"),
        )
        .unwrap_err();
        assert!(
            matches!(&e, ReportError::Verify(v) if v.kind == VerifyErrorKind::MacMismatch),
            "{e}"
        );
        // A record of another patient edited: no report about anybody.
        let text = std::fs::read_to_string(&path).unwrap();
        let edited: Vec<String> = text
            .lines()
            .map(|l| {
                if l.contains("\"request_id\":\"r2\"") {
                    l.replace("dr-alice", "dr-mallory")
                } else {
                    l.to_string()
                }
            })
            .collect();
        assert_ne!(edited.join("\n") + "\n", text);
        std::fs::write(&path, edited.join("\n") + "\n").unwrap();
        let e = report(&files, KEY.as_bytes(), &Query::new("pat-x")).unwrap_err();
        match &e {
            ReportError::Verify(v) => assert_eq!(v.kind, VerifyErrorKind::MacMismatch),
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("does not verify"), "{e}");
    }

    #[test]
    fn fhir_audit_event_trails_are_read_back() {
        let dir = TempDir::new("fhir");
        // Records whose patient is `action.patient` (the AuditEvent's patient entity).
        let mut recs = sample();
        recs.retain(|r| ["r1", "r2", "r3", "r4"].contains(&r.request_id.as_str()));
        let path = write_trail(&dir, AuditFormat::FhirAuditEvent, recs);
        let files = chain_files(&path);
        let x = report(&files, KEY.as_bytes(), &Query::new("pat-x")).unwrap();
        assert_eq!(ids(&x), ["r1", "r3", "r4"]);
        assert_eq!(x[0].phase, "access+completion");
        assert_eq!(x[0].who.subject.as_deref(), Some("dr-alice"));
        assert_eq!(x[0].who.client_id.as_deref(), Some("ehr-app"));
        assert_eq!(x[0].who.source_address.as_deref(), Some("10.1.2.3"));
        assert_eq!(x[0].tenant.as_deref(), Some("hospital-a"));
        assert_eq!(x[0].what.text(), "GET fhir read Patient/pat-x");
        assert_eq!(x[1].outcome.text(), "refused 403 tenant_mismatch");
        let y = report(&files, KEY.as_bytes(), &Query::new("pat-y")).unwrap();
        assert_eq!(ids(&y), ["r2"]);
    }

    #[test]
    fn a_record_this_version_cannot_read_refuses_only_when_it_may_name_the_patient() {
        let dir = TempDir::new("unknown");
        let path = dir.0.join("audit.jsonl");
        let mut out = Vec::new();
        let mut prev = String::new();
        let unknown = [
            br#"{"kind":"anomaly","subject":"dr-eve","patients":["pat-x"]}"#.as_slice(),
            br#"{"kind":"anomaly","subject":"dr-eve"}"#.as_slice(),
        ];
        for (i, payload) in unknown.iter().enumerate() {
            let (line, mac) =
                chain::build_line(KEY.as_bytes(), i as u64 + 1, &prev, "record", payload);
            out.extend_from_slice(&line);
            prev = mac;
        }
        std::fs::write(&path, &out).unwrap();
        let files = vec![path];
        let e = report(&files, KEY.as_bytes(), &Query::new("pat-x")).unwrap_err();
        assert!(matches!(e, ReportError::Unreadable { line: 1, .. }), "{e}");
        assert!(report(&files, KEY.as_bytes(), &Query::new("pat-y"))
            .unwrap()
            .is_empty());
    }

    fn emergency(
        purpose: &str,
        reason: &str,
        overrode: &[&str],
        from_grant: bool,
    ) -> BreakGlassUse {
        BreakGlassUse {
            purpose: purpose.into(),
            reason: reason.into(),
            overrode: overrode.iter().map(|s| s.to_string()).collect(),
            from_grant,
        }
    }

    /// [`sample`] plus emergency accesses: r9 (pat-x, across tenants, masking overridden in
    /// the response), r10 (pat-w, refused upstream), r11 (pat-y, covered by a grant),
    /// r12 (the access names nobody and carries the claim; the completion names pat-v).
    fn sample_with_break_glass() -> Vec<AuditRecord> {
        let mut v = sample();
        let mut r9 = read("r9", Phase::Access, "2024-05-08T03:00:00.000Z", "pat-x");
        r9.actor.subject = Some("dr-erin".into());
        r9.actor.roles = vec!["er_physician".into()];
        r9.break_glass = Some(emergency(
            "ETREAT",
            "unconscious patient in ER",
            &["tenant"],
            false,
        ));
        v.push(r9.clone());
        let mut r9c = read("r9", Phase::Completion, "2024-05-08T03:00:00.500Z", "pat-x");
        r9c.actor = r9.actor.clone();
        r9c.break_glass = Some(emergency(
            "ETREAT",
            "unconscious patient in ER",
            &["tenant", "mask"],
            false,
        ));
        v.push(r9c);
        let mut r10 = read("r10", Phase::Denied, "2024-05-08T04:00:00.000Z", "pat-w");
        r10.outcome.reason = Some("upstream_refused".into());
        r10.break_glass = Some(emergency("ETREAT", "trauma bay 2", &[], false));
        v.push(r10);
        let mut r11 = read(
            "r11",
            Phase::Completion,
            "2024-05-08T05:00:00.000Z",
            "pat-y",
        );
        r11.break_glass = Some(emergency("ETREAT", "trauma bay 2", &["tenant"], true));
        v.push(r11);
        let mut r12 = rec("r12", Phase::Access, "2024-05-08T06:00:00.000Z", "dr-erin");
        r12.action.resource_type = Some("Observation".into());
        r12.break_glass = Some(emergency("ETREAT", "seizure", &["tenant"], false));
        v.push(r12.clone());
        r12.phase = Phase::Completion;
        r12.outcome.status = Some(200);
        r12.action.patients = vec!["pat-v".into()];
        r12.break_glass = None;
        v.push(r12);
        v
    }

    #[test]
    fn break_glass_reviews_list_only_emergency_accesses() {
        let dir = TempDir::new("break-glass");
        let path = write_trail(&dir, AuditFormat::Json, sample_with_break_glass());
        let files = chain_files(&path);
        let key = KEY.as_bytes();

        // Every patient.
        let all = report(&files, key, &Query::break_glass()).unwrap();
        assert_eq!(ids(&all), ["r9", "r10", "r11", "r12"]);
        let r9 = &all[0];
        assert_eq!(r9.phase, "access+completion");
        assert_eq!(
            r9.break_glass,
            Some(BreakGlass {
                purpose: "ETREAT".into(),
                reason: "unconscious patient in ER".into(),
                overrode: vec!["tenant".into(), "mask".into()],
                from_grant: false,
            })
        );
        assert_eq!(
            r9.break_glass.as_ref().unwrap().text(),
            "ETREAT overrode tenant,mask: unconscious patient in ER"
        );
        assert_eq!(all[1].outcome.result, "refused");
        assert!(all[1].break_glass.as_ref().unwrap().overrode.is_empty());
        assert!(all[2].break_glass.as_ref().unwrap().from_grant);
        assert_eq!(all[2].phase, "completion");
        // The claim in the access record, the patient in the completion: one entry.
        assert_eq!(all[3].phase, "access+completion");
        assert_eq!(all[3].seq.len(), 2);

        // One patient's emergency accesses: both conditions, over the request's records.
        let mut q = Query::break_glass();
        q.patient = "pat-x".into();
        assert_eq!(ids(&report(&files, key, &q).unwrap()), ["r9"]);
        q.patient = "pat-v".into();
        assert_eq!(ids(&report(&files, key, &q).unwrap()), ["r12"]);
        q.patient = "pat-z".into();
        assert!(report(&files, key, &q).unwrap().is_empty());
        // With the window.
        let mut q = Query::break_glass();
        q.from = Some(parse_time("2024-05-08T04:00:00Z", false).unwrap());
        q.to = Some(parse_time("2024-05-08T05:00:00Z", false).unwrap());
        assert_eq!(ids(&report(&files, key, &q).unwrap()), ["r10", "r11"]);

        // A patient's report shows the emergency access of the entries that used it.
        let x = report(&files, key, &Query::new("pat-x")).unwrap();
        assert_eq!(ids(&x), ["r1", "r3", "r4", "r5", "r6", "r7", "r9"]);
        assert!(x[..6].iter().all(|e| e.break_glass.is_none()));
        assert_eq!(x[6].break_glass, r9.break_glass);

        // JSON: a `break_glass` member with every part, only on those entries.
        let json: Value = serde_json::to_value(&x).unwrap();
        assert!(json[0].get("break_glass").is_none(), "{json}");
        assert_eq!(
            json[6]["break_glass"],
            serde_json::json!({
                "purpose": "ETREAT",
                "reason": "unconscious patient in ER",
                "overrode": ["tenant", "mask"],
                "from_grant": false,
            })
        );
        let json: Value = serde_json::to_value(&all).unwrap();
        assert_eq!(json[1]["break_glass"]["overrode"], serde_json::json!([]));
        assert_eq!(json[2]["break_glass"]["from_grant"], true);

        // Text: the column, `-` without emergency access.
        let cols: Vec<&str> = TEXT_HEADER.split('\t').collect();
        let at = cols.iter().position(|c| *c == "break_glass").unwrap();
        let line = x[0].text_line();
        assert_eq!(line.split('\t').nth(at), Some("-"), "{line}");
        let line = x[6].text_line();
        assert_eq!(
            line.split('\t').nth(at),
            Some("ETREAT overrode tenant,mask: unconscious patient in ER"),
            "{line}"
        );
        assert_eq!(line.split('\t').count(), cols.len(), "{line}");
        assert_eq!(
            all[2].text_line().split('\t').nth(at),
            Some("ETREAT overrode tenant (grant): trauma bay 2")
        );

        // A trail without any emergency access: an empty review.
        let dir = TempDir::new("break-glass-none");
        let path = write_trail(&dir, AuditFormat::Json, sample());
        assert!(report(&chain_files(&path), key, &Query::break_glass())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn queries_without_a_patient_are_break_glass_reviews_only() {
        let dir = TempDir::new("break-glass-query");
        let path = write_trail(&dir, AuditFormat::Json, sample_with_break_glass());
        let files = chain_files(&path);
        let key = KEY.as_bytes();
        let refused = |q: &Query| matches!(report(&files, key, q), Err(ReportError::Query(_)));
        assert!(refused(&Query::default()));
        assert!(refused(&Query::new("  ")));
        let mut q = Query::break_glass();
        q.patient = " ".into();
        assert!(refused(&q));
        let mut q = Query::break_glass();
        q.authority = Some("HOSP".into());
        assert!(refused(&q));
        q.patient = "pat-x".into();
        assert_eq!(ids(&report(&files, key, &q).unwrap()), ["r9"]);
    }

    #[test]
    fn fhir_audit_event_trails_carry_the_emergency_access() {
        let dir = TempDir::new("break-glass-fhir");
        let mut recs = sample_with_break_glass();
        recs.retain(|r| ["r1", "r9", "r10", "r11"].contains(&r.request_id.as_str()));
        let path = write_trail(&dir, AuditFormat::FhirAuditEvent, recs);
        let files = chain_files(&path);
        let all = report(&files, KEY.as_bytes(), &Query::break_glass()).unwrap();
        assert_eq!(ids(&all), ["r9", "r10", "r11"]);
        assert_eq!(
            all[0].break_glass,
            Some(BreakGlass {
                purpose: "ETREAT".into(),
                reason: "unconscious patient in ER".into(),
                overrode: vec!["tenant".into(), "mask".into()],
                from_grant: false,
            })
        );
        assert!(all[2].break_glass.as_ref().unwrap().from_grant);
        let x = report(&files, KEY.as_bytes(), &Query::new("pat-x")).unwrap();
        assert_eq!(ids(&x), ["r1", "r9"]);
        assert!(x[0].break_glass.is_none());
    }

    #[test]
    fn an_unreadable_record_refuses_a_review_when_it_may_be_an_emergency_access() {
        let dir = TempDir::new("break-glass-unknown");
        let path = dir.0.join("audit.jsonl");
        let write = |payloads: &[&[u8]]| {
            let mut out = Vec::new();
            let mut prev = String::new();
            for (i, payload) in payloads.iter().enumerate() {
                let (line, mac) =
                    chain::build_line(KEY.as_bytes(), i as u64 + 1, &prev, "record", payload);
                out.extend_from_slice(&line);
                prev = mac;
            }
            std::fs::write(&path, &out).unwrap();
        };
        write(&[br#"{"kind":"future","subject":"dr-eve"}"#]);
        let files = vec![path.clone()];
        assert!(report(&files, KEY.as_bytes(), &Query::break_glass())
            .unwrap()
            .is_empty());
        write(&[br#"{"kind":"future","break_glass":{"purpose":"ETREAT"}}"#]);
        let e = report(&files, KEY.as_bytes(), &Query::break_glass()).unwrap_err();
        assert!(matches!(e, ReportError::Unreadable { line: 1, .. }), "{e}");
    }

    #[test]
    fn text_lines_escape_control_characters() {
        let mut r = read(
            "r\u{9}1",
            Phase::Denied,
            "2024-05-01T10:00:00.000Z",
            "pat-x",
        );
        r.actor.subject = Some("dr\nforged\u{202e}".into());
        let line = Entry::start(&r, 1).text_line();
        assert!(!line.contains('\n') && !line.contains('\u{202e}'), "{line}");
        assert_eq!(line.split('\t').count(), 8, "{line}");
        // A client-chosen reason cannot forge a column either.
        r.break_glass = Some(BreakGlassUse {
            purpose: "ETREAT".into(),
            reason: "a\tb\nc".into(),
            ..BreakGlassUse::default()
        });
        let line = Entry::start(&r, 1).text_line();
        assert!(!line.contains('\n'), "{line}");
        assert_eq!(line.split('\t').count(), 8, "{line}");
        assert!(line.contains("ETREAT: a\\tb\\nc"), "{line}");
    }

    #[test]
    fn times_parse() {
        assert_eq!(parse_time("1970-01-01", false), Ok(0));
        assert_eq!(parse_time("1970-01-01", true), Ok(86_399_999));
        assert_eq!(parse_time("1970-01-01T00:00:01.5Z", false), Ok(1500));
        assert_eq!(
            parse_time("2024-05-01T12:00:00.123Z", false),
            Ok(1_714_564_800_123)
        );
        assert_eq!(
            parse_time("2024-05-01T14:00:00.123+02:00", false),
            Ok(1_714_564_800_123)
        );
        assert_eq!(parse_time("2000-02-29", false), Ok(951_782_400_000));
        for bad in [
            "",
            "2024-02-30",
            "2023-02-29",
            "2024-13-01",
            "2024-05-01T25:00:00Z",
            "2024-05-01T12:00:00",
            "yesterday",
            "2024-05-01T12:00:00.Z",
        ] {
            assert!(parse_time(bad, false).is_err(), "{bad}");
        }
        // The sink's own format.
        let now = crate::now_rfc3339();
        assert!(parse_time(&now, false).is_ok(), "{now}");
    }
}
