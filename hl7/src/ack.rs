//! Original-mode acknowledgements: building them (with the incoming message's delimiters) and
//! reading the ones a destination returns.

use crate::error::{ParseError, SegmentId};
use crate::header::{HierarchicDesignator, MessageHeader};
use crate::message::{escape, parse_message, Delimiters};

/// MSA-1 acknowledgement code (HL7 table 0008).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AckCode {
    /// Original mode: application accept.
    AA,
    /// Original mode: application error (the content is in error; do not resend as is).
    AE,
    /// Original mode: application reject (refused for another reason; resend may succeed).
    AR,
    /// Enhanced mode: commit accept.
    CA,
    /// Enhanced mode: commit error.
    CE,
    /// Enhanced mode: commit reject.
    CR,
}

impl AckCode {
    pub fn as_str(&self) -> &'static str {
        match self {
            AckCode::AA => "AA",
            AckCode::AE => "AE",
            AckCode::AR => "AR",
            AckCode::CA => "CA",
            AckCode::CE => "CE",
            AckCode::CR => "CR",
        }
    }

    pub fn parse(s: &str) -> Option<AckCode> {
        Some(match s {
            "AA" => AckCode::AA,
            "AE" => AckCode::AE,
            "AR" => AckCode::AR,
            "CA" => AckCode::CA,
            "CE" => AckCode::CE,
            "CR" => AckCode::CR,
            _ => return None,
        })
    }

    /// True for `AA` and `CA`.
    pub fn is_accept(&self) -> bool {
        matches!(self, AckCode::AA | AckCode::CA)
    }
}

/// HL7 error code (table 0357).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    MessageAccepted,
    SegmentSequenceError,
    RequiredFieldMissing,
    DataTypeError,
    TableValueNotFound,
    UnsupportedMessageType,
    UnsupportedEventCode,
    UnsupportedProcessingId,
    UnsupportedVersionId,
    UnknownKeyIdentifier,
    DuplicateKeyIdentifier,
    ApplicationRecordLocked,
    ApplicationInternalError,
}

impl ErrorCode {
    /// The numeric code, e.g. 207.
    pub fn code(&self) -> u16 {
        match self {
            ErrorCode::MessageAccepted => 0,
            ErrorCode::SegmentSequenceError => 100,
            ErrorCode::RequiredFieldMissing => 101,
            ErrorCode::DataTypeError => 102,
            ErrorCode::TableValueNotFound => 103,
            ErrorCode::UnsupportedMessageType => 200,
            ErrorCode::UnsupportedEventCode => 201,
            ErrorCode::UnsupportedProcessingId => 202,
            ErrorCode::UnsupportedVersionId => 203,
            ErrorCode::UnknownKeyIdentifier => 204,
            ErrorCode::DuplicateKeyIdentifier => 205,
            ErrorCode::ApplicationRecordLocked => 206,
            ErrorCode::ApplicationInternalError => 207,
        }
    }

    /// The table's description, e.g. `Application internal error`.
    pub fn text(&self) -> &'static str {
        match self {
            ErrorCode::MessageAccepted => "Message accepted",
            ErrorCode::SegmentSequenceError => "Segment sequence error",
            ErrorCode::RequiredFieldMissing => "Required field missing",
            ErrorCode::DataTypeError => "Data type error",
            ErrorCode::TableValueNotFound => "Table value not found",
            ErrorCode::UnsupportedMessageType => "Unsupported message type",
            ErrorCode::UnsupportedEventCode => "Unsupported event code",
            ErrorCode::UnsupportedProcessingId => "Unsupported processing id",
            ErrorCode::UnsupportedVersionId => "Unsupported version id",
            ErrorCode::UnknownKeyIdentifier => "Unknown key identifier",
            ErrorCode::DuplicateKeyIdentifier => "Duplicate key identifier",
            ErrorCode::ApplicationRecordLocked => "Application record locked",
            ErrorCode::ApplicationInternalError => "Application internal error",
        }
    }
}

/// ERR-4 severity (table 0516).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
    Information,
}

impl Severity {
    fn as_str(&self) -> &'static str {
        match self {
            Severity::Error => "E",
            Severity::Warning => "W",
            Severity::Information => "I",
        }
    }
}

/// Where an error is: segment name, its sequence (1 for the first of that name) and field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorLocation {
    pub segment: SegmentId,
    pub sequence: usize,
    pub field: Option<usize>,
}

/// The content of an ERR segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckError {
    pub code: ErrorCode,
    pub severity: Severity,
    /// Human-readable text (ERR-8, and MSA-3 before v2.5). Never put PHI here.
    pub text: String,
    pub location: Option<ErrorLocation>,
}

impl AckError {
    pub fn new(code: ErrorCode, text: impl Into<String>) -> Self {
        AckError {
            code,
            severity: Severity::Error,
            text: text.into(),
            location: None,
        }
    }

    /// From a parse error: its code, its location and its (PHI-free) description.
    pub fn from_parse_error(err: &ParseError) -> Self {
        AckError {
            code: err.error_code(),
            severity: Severity::Error,
            text: err.to_string(),
            location: err.location().map(|(segment, field)| ErrorLocation {
                segment,
                sequence: 1,
                field,
            }),
        }
    }
}

/// What to put in an acknowledgement.
#[derive(Clone, Debug)]
pub struct AckParams<'a> {
    /// MSA-1.
    pub code: AckCode,
    /// MSH-10 of the acknowledgement itself.
    pub control_id: &'a str,
    /// MSH-7, e.g. `20250101120000+0000` (this crate has no clock).
    pub timestamp: &'a str,
    /// An ERR segment, when given.
    pub error: Option<&'a AckError>,
    /// MSH-3 and MSH-4 of the acknowledgement; by default the original's MSH-5 and MSH-6.
    pub responder: Option<(&'a HierarchicDesignator, &'a HierarchicDesignator)>,
}

impl<'a> AckParams<'a> {
    pub fn new(code: AckCode, control_id: &'a str, timestamp: &'a str) -> Self {
        AckParams {
            code,
            control_id,
            timestamp,
            error: None,
            responder: None,
        }
    }

    pub fn with_error(mut self, error: &'a AckError) -> Self {
        self.error = Some(error);
        self
    }
}

/// True when `version` (e.g. `2.5.1`) is at least `min` (e.g. `[2, 5]`). Unreadable versions
/// count as the newest.
fn version_at_least(version: &str, min: &[u32]) -> bool {
    let parts: Option<Vec<u32>> = version.split('.').map(|p| p.trim().parse().ok()).collect();
    match parts {
        Some(p) if !p.is_empty() => p.as_slice() >= min,
        _ => true,
    }
}

struct Writer {
    d: Delimiters,
    out: Vec<u8>,
}

impl Writer {
    fn text(&mut self, s: &str) {
        self.out.extend_from_slice(&escape(s.as_bytes(), &self.d));
    }

    fn field(&mut self) {
        self.out.push(self.d.field);
    }

    /// Components joined by the component separator, trailing empty ones dropped.
    fn components(&mut self, parts: &[&str]) {
        let n = parts
            .iter()
            .rposition(|p| !p.is_empty())
            .map_or(0, |i| i + 1);
        for (i, p) in parts.iter().take(n).enumerate() {
            if i > 0 {
                self.out.push(self.d.component);
            }
            self.text(p);
        }
    }

    fn hd(&mut self, hd: &HierarchicDesignator) {
        self.components(&[&hd.namespace_id, &hd.universal_id, &hd.universal_id_type]);
    }

    fn msh(
        &mut self,
        from: [&HierarchicDesignator; 4],
        ts: &str,
        trigger: &str,
        ctrl: &str,
        proc_id: &str,
        version: &str,
    ) {
        self.out.extend_from_slice(b"MSH");
        self.field();
        let enc = self.d.encoding_characters();
        self.out.extend_from_slice(&enc);
        for hd in from {
            self.field();
            self.hd(hd);
        }
        self.field();
        self.text(ts);
        self.field();
        self.field();
        if trigger.is_empty() {
            self.text("ACK");
        } else if version_at_least(version, &[2, 3, 1]) {
            self.components(&["ACK", trigger, "ACK"]);
        } else {
            self.components(&["ACK", trigger]);
        }
        self.field();
        self.text(ctrl);
        self.field();
        self.text(proc_id);
        self.field();
        self.text(version);
        self.out.push(b'\r');
    }

    fn msa_err(
        &mut self,
        code: AckCode,
        original_ctrl: &str,
        error: Option<&AckError>,
        version: &str,
    ) {
        let v25 = version_at_least(version, &[2, 5]);
        self.out.extend_from_slice(b"MSA");
        self.field();
        self.text(code.as_str());
        self.field();
        self.text(original_ctrl);
        if let (Some(err), false) = (error, v25) {
            self.field();
            self.text(&err.text);
        }
        self.out.push(b'\r');
        let Some(err) = error else { return };
        let seq;
        let field;
        let (seg, seq, field) = match &err.location {
            Some(loc) => {
                seq = loc.sequence.to_string();
                field = loc.field.map(|f| f.to_string()).unwrap_or_default();
                (loc.segment.as_str(), seq.as_str(), field.as_str())
            }
            None => ("", "", ""),
        };
        let code = err.code.code().to_string();
        self.out.extend_from_slice(b"ERR");
        self.field();
        if v25 {
            // ERR-2 location (ERL), ERR-3 code (CWE), ERR-4 severity, ERR-8 user message.
            self.field();
            self.components(&[seg, seq, field]);
            self.field();
            self.components(&[&code, err.code.text(), "HL70357"]);
            self.field();
            self.text(err.severity.as_str());
            for _ in 0..4 {
                self.field();
            }
            self.text(&err.text);
        } else {
            // ERR-1 (ELD): segment^sequence^field^code&text&HL70357.
            for part in [seg, seq, field] {
                self.text(part);
                self.out.push(self.d.component);
            }
            self.text(&code);
            self.out.push(self.d.subcomponent);
            self.text(err.code.text());
            self.out.push(self.d.subcomponent);
            self.text("HL70357");
        }
        self.out.push(b'\r');
    }
}

/// Builds an original-mode acknowledgement of a message whose header could be read: its own
/// delimiters (truncation character included), MSH-3/4 and MSH-5/6 swapped (unless
/// `params.responder` names the responder), `ACK^<trigger>^ACK` (the structure from v2.3.1),
/// the original's processing id and version, `MSA|<code>|<original MSH-10>`, and an ERR
/// segment when `params.error` is set (v2.5+ layout: ERR-2 location, ERR-3 code, ERR-4
/// severity, ERR-8 text; before v2.5: ERR-1 and MSA-3). Segments end with CR.
pub fn build_ack(original: &MessageHeader, params: &AckParams<'_>) -> Vec<u8> {
    let mut w = Writer {
        d: original.delimiters,
        out: Vec::with_capacity(256),
    };
    let (app, fac) = params.responder.unwrap_or((
        &original.receiving_application,
        &original.receiving_facility,
    ));
    let version = original.version.as_str();
    w.msh(
        [
            app,
            fac,
            &original.sending_application,
            &original.sending_facility,
        ],
        params.timestamp,
        &original.trigger_event,
        params.control_id,
        &original.processing_id,
        version,
    );
    w.msa_err(params.code, &original.control_id, params.error, version);
    w.out
}

/// Builds an acknowledgement of a message too broken to read its MSH: default delimiters
/// (`|^~\&`), no receiver, an empty MSA-2, processing id `P` and the given `version`.
pub fn build_ack_unreadable(params: &AckParams<'_>, version: &str) -> Vec<u8> {
    let mut w = Writer {
        d: Delimiters::default(),
        out: Vec::with_capacity(256),
    };
    let empty = HierarchicDesignator::default();
    let (app, fac) = params.responder.unwrap_or((&empty, &empty));
    w.msh(
        [app, fac, &empty, &empty],
        params.timestamp,
        "",
        params.control_id,
        "P",
        version,
    );
    w.msa_err(params.code, "", params.error, version);
    w.out
}

/// An acknowledgement received from a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedAck {
    pub header: MessageHeader,
    /// MSA-1.
    pub code: AckCode,
    /// MSA-2: the control id of the message acknowledged.
    pub control_id: String,
    /// MSA-3, possibly empty.
    pub text: String,
    /// The HL7 error codes of the ERR segments (ERR-3.1 from v2.5, else ERR-1.4.1).
    pub error_codes: Vec<String>,
}

/// Reads an acknowledgement: MSA-1 must be one of `AA AE AR CA CE CR`.
pub fn parse_ack(input: &[u8]) -> Result<ReceivedAck, ParseError> {
    let msg = parse_message(input)?;
    let header = msg.header();
    let msa_id = SegmentId(*b"MSA");
    let msa = msg
        .segment("MSA")
        .ok_or(ParseError::MissingSegment { segment: msa_id })?;
    let text = |n: usize| {
        msa.field(n)
            .and_then(|f| f.component(1))
            .map(|v| v.text())
            .unwrap_or_default()
    };
    let code_text = text(1);
    if code_text.is_empty() {
        return Err(ParseError::MissingField {
            segment: msa_id,
            field: 1,
            component: None,
        });
    }
    let code = AckCode::parse(&code_text).ok_or(ParseError::InvalidField {
        segment: msa_id,
        field: 1,
        reason: "not an acknowledgement code (AA AE AR CA CE CR)",
    })?;
    let mut error_codes = Vec::new();
    for err in msg.segments_named("ERR") {
        let v25 = err
            .field(3)
            .and_then(|f| f.component(1))
            .map(|v| v.text())
            .unwrap_or_default();
        let old = err
            .field(1)
            .and_then(|f| f.component(4))
            .and_then(|c| c.subcomponent(1))
            .map(|v| v.text())
            .unwrap_or_default();
        let code = if v25.is_empty() { old } else { v25 };
        if !code.is_empty() {
            error_codes.push(code);
        }
    }
    Ok(ReceivedAck {
        header,
        code,
        control_id: text(2),
        text: text(3),
        error_codes,
    })
}
