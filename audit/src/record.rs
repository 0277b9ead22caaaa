//! The audit record and its time stamps.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One audited event. Plain data; `None` where the gateway does not know the value. Serialized
/// in declaration order with `None` fields and empty `roles` left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When the event happened: RFC 3339 UTC with milliseconds (`2024-05-01T12:00:00.123Z`,
    /// see [`now_rfc3339`]). Left empty, the sink fills in the time it was queued.
    pub time: String,
    /// The gateway's request id (`X-Request-Id`).
    pub request_id: String,
    pub phase: Phase,
    pub actor: Actor,
    pub action: Action,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Upstream>,
    /// For a config reload (`phase: admin`): the config hashes involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigChange>,
    /// For an HL7 v2 message: what it was and whom it names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hl7: Option<Hl7Message>,
    /// For an `anomaly` record: what was noticed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<AnomalyDetails>,
    /// Emergency access (break-the-glass): set on every record of a request that claimed it,
    /// or that an earlier claim's grant covered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub break_glass: Option<BreakGlassUse>,
    /// `sandbox` for a request on a sandbox listener (synthetic data, sandbox credentials);
    /// absent for production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
}

/// An emergency access, as claimed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakGlassUse {
    /// The HL7 PurposeOfUse code claimed (e.g. `ETREAT`).
    pub purpose: String,
    /// The caller's free-text reason.
    pub reason: String,
    /// What it overrode on this request (`tenant`, `mask`, ...): empty when nothing needed to
    /// be overridden.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrode: Vec<String>,
    /// True when an earlier claim's grant (same caller, same patient) covered this request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_grant: bool,
}

/// What the unusual-access monitor noticed about a subject.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnomalyDetails {
    /// `distinct_patients` (more distinct patients in the window than the threshold),
    /// `cross_tenant` (a patient of another tenant reached), `repeated_break_glass`.
    pub kind: String,
    /// What was counted in the window (distinct patients, cross-tenant accesses, ...).
    pub count: u64,
    /// The configured threshold it passed.
    pub threshold: u64,
    /// The window, in seconds.
    pub window_seconds: u64,
}

/// An HL7 v2 message, as the audit trail names it: its header fields and the patient
/// identifiers of its PID-3, with the acknowledgement code once known.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hl7Message {
    /// MSH-9.1, e.g. `ORU`.
    pub message_type: String,
    /// MSH-9.2, e.g. `R01`.
    pub trigger_event: String,
    /// MSH-10.
    pub control_id: String,
    /// MSH-3.1.
    pub sending_application: String,
    /// MSH-4.1 (or 4.2).
    pub sending_facility: String,
    /// Every PID-3 identifier of the message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patient_identifiers: Vec<Hl7PatientId>,
    /// MSA-1 of the acknowledgement the sender got (completion and denied records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_code: Option<String>,
}

/// One PID-3 identifier (CX): id, assigning authority, identifier type code.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hl7PatientId {
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub authority: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub r#type: String,
}

/// The configurations a reload involved (hex SHA-256 of the config text).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigChange {
    /// The config running after the reload (the new one if it was applied, else the old one).
    pub running: String,
    /// The config the reload tried to apply ("" when the file could not be read).
    pub attempted: String,
}

/// Which record of a request this is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Written (durably) before a PHI response is released to the client.
    #[default]
    Access,
    /// The final outcome (status, bytes, duration) of a request that had an access record.
    Completion,
    /// A refused request (no PHI released); recorded once, in the logging phase.
    Denied,
    /// An administrative action on the gateway itself (a config reload, applied or refused).
    Admin,
    /// Unusual access noticed by the monitor over the records (e.g. a subject who reached
    /// more distinct patients in a window than configured); names the subject, not a patient.
    Anomaly,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Access => "access",
            Phase::Completion => "completion",
            Phase::Denied => "denied",
            Phase::Admin => "admin",
            Phase::Anomaly => "anomaly",
        }
    }
}

/// Who acted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The authenticated subject (token `sub`, or the system name for certificate-only callers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The issuer the subject belongs to (token `iss`); FHIR `who.identifier.system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// The OAuth client (app) id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// `token`, `client_certificate`, `token+client_certificate`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<String>,
    /// The real client address (IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    /// The verified client certificate's subject (RFC 4514-like).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_subject: Option<String>,
    /// The calling system named by a verified client certificate (e.g. `lab-interface-engine`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

/// What was done.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    /// HTTP method, upper case.
    pub method: String,
    /// The matched route's name.
    pub route: String,
    /// The listener's name.
    pub listener: String,
    /// `public` or `internal`.
    pub channel: String,
    /// The FHIR restful interaction (`read`, `vread`, `search-type`, `create`, `update`,
    /// `patch`, `delete`, `history-instance`, `operation`, ...). `None`: derived from the method
    /// where needed (FHIR output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interaction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// The patient in context (id of a `Patient`), when known: the first of `patients`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// Every patient the request names (the caller's patient context, a Patient instance, a
    /// Patient compartment, `patient`/`subject`/`_id` search parameters), in order, bounded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patients: Vec<String>,
    /// How many more patients the request named than `patients` holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patients_more: Option<u64>,
    /// The compartment of a compartment search, e.g. `Patient/123`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compartment: Option<String>,
    /// The names of the search parameters (never their values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search_params: Vec<String>,
}

/// How it ended (or, for an access record, how it is going).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// HTTP status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Stable reason code (e.g. `audit_unavailable`, `scope_denied`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Response body bytes sent to the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// Where the request went.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// The current time as RFC 3339 UTC with milliseconds, e.g. `2024-05-01T12:00:00.123Z`.
pub fn now_rfc3339() -> String {
    format_rfc3339_millis(SystemTime::now())
}

/// Formats `t` as RFC 3339 UTC with milliseconds (`YYYY-MM-DDTHH:MM:SS.mmmZ`). Times before
/// 1970 are clamped to the epoch.
pub fn format_rfc3339_millis(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let millis = since.subsec_millis();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = crate::calendar::civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_known_instants() {
        let at = |s: u64, ms: u64| {
            format_rfc3339_millis(UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.007Z");
        assert_eq!(at(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(1_714_564_800, 123), "2024-05-01T12:00:00.123Z");
        assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339_millis(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }
}
