//! Error types. Every message names a position (segment index and name, field number, byte
//! offset) and never the content of a field: an error can be logged without leaking PHI.

use std::fmt;

/// A segment name (three ASCII letters or digits, e.g. `MSH`, `PID`, `ZPD`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SegmentId(pub(crate) [u8; 3]);

impl SegmentId {
    /// Builds a segment id from a name of exactly three ASCII letters or digits.
    pub fn new(name: &str) -> Option<SegmentId> {
        SegmentId::from_bytes(name.as_bytes())
    }

    pub(crate) fn from_bytes(name: &[u8]) -> Option<SegmentId> {
        match name {
            [a, b, c] if name.iter().all(u8::is_ascii_alphanumeric) => {
                Some(SegmentId([*a, *b, *c]))
            }
            _ => None,
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII alphanumerics are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SegmentId({})", self.as_str())
    }
}

impl PartialEq<&str> for SegmentId {
    fn eq(&self, other: &&str) -> bool {
        self.0.as_slice() == other.as_bytes()
    }
}

/// Why an HL7 v2 message, batch or file could not be read.
///
/// `segment_index` is 0-based over the non-empty segments of the input given to the parser;
/// `offset` is a byte offset into that input (a leading byte-order mark counts).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseError {
    /// Nothing but a byte-order mark and line breaks.
    Empty,
    /// The input does not begin with an `MSH` segment (after a BOM and line breaks).
    /// `found` is the first segment's name when it is a well-formed one.
    MissingMsh {
        offset: usize,
        found: Option<SegmentId>,
    },
    /// MSH-1 / FHS-1 / BHS-1: the byte after the segment name is absent, or is a letter, a
    /// digit, a line break or a non-ASCII byte.
    InvalidFieldSeparator { segment: SegmentId, offset: usize },
    /// MSH-2 / FHS-2 / BHS-2: the encoding characters are not 4 (or 5, with the v2.7
    /// truncation character) distinct printable ASCII punctuation bytes different from the
    /// field separator.
    InvalidEncodingCharacters {
        segment: SegmentId,
        offset: usize,
        reason: &'static str,
    },
    /// A segment whose name is not three ASCII letters or digits followed by the field
    /// separator or the segment's end.
    InvalidSegmentName { segment_index: usize, offset: usize },
    /// `parse_message` was given more than one `MSH` (use `parse_batch`).
    MultipleMessages { segment_index: usize, offset: usize },
    /// `parse_message` was given a batch or file envelope segment (use `parse_batch`).
    UnexpectedEnvelope {
        segment_index: usize,
        segment: SegmentId,
        offset: usize,
    },
    /// A batch (`BHS`) holds a segment that is not inside any message: no `MSH` came before
    /// it in that batch. `batch_segment_index` is the index of the `BHS`.
    BatchWithoutMessageHeader {
        batch_segment_index: usize,
        segment_index: usize,
        segment: SegmentId,
        offset: usize,
    },
    /// A non-envelope segment before the first `MSH` of a file that has no batch header.
    SegmentOutsideMessage {
        segment_index: usize,
        segment: SegmentId,
        offset: usize,
    },
    /// An envelope segment out of place: `FHS` not first, `BHS` inside an open batch, `BTS`
    /// without `BHS`, `FTS` without `FHS` or not last, anything after `FTS`.
    EnvelopeOutOfOrder {
        segment_index: usize,
        segment: SegmentId,
        offset: usize,
    },
    /// A batch or file envelope with no message at all and no `MSH` anywhere.
    NoMessage,
    /// A required field is empty or absent.
    MissingField {
        segment: SegmentId,
        field: usize,
        component: Option<usize>,
    },
    /// A field holds a value this crate cannot accept (e.g. an unknown MSA-1 code).
    InvalidField {
        segment: SegmentId,
        field: usize,
        reason: &'static str,
    },
    /// A required segment is absent (e.g. `MSA` in an acknowledgement).
    MissingSegment { segment: SegmentId },
}

impl ParseError {
    /// The HL7 error code (table 0357) an acknowledgement of this error should carry.
    pub fn error_code(&self) -> crate::ack::ErrorCode {
        use crate::ack::ErrorCode;
        match self {
            ParseError::MissingField { .. } | ParseError::MissingSegment { .. } => {
                ErrorCode::RequiredFieldMissing
            }
            ParseError::InvalidField { .. } => ErrorCode::DataTypeError,
            ParseError::InvalidFieldSeparator { .. }
            | ParseError::InvalidEncodingCharacters { .. } => ErrorCode::DataTypeError,
            _ => ErrorCode::SegmentSequenceError,
        }
    }

    /// Where the error is, as (segment name, field number) when it names one: for the ERR
    /// segment's location.
    pub fn location(&self) -> Option<(SegmentId, Option<usize>)> {
        match self {
            ParseError::InvalidFieldSeparator { segment, .. } => Some((*segment, Some(1))),
            ParseError::InvalidEncodingCharacters { segment, .. } => Some((*segment, Some(2))),
            ParseError::MissingField { segment, field, .. }
            | ParseError::InvalidField { segment, field, .. } => Some((*segment, Some(*field))),
            ParseError::UnexpectedEnvelope { segment, .. }
            | ParseError::BatchWithoutMessageHeader { segment, .. }
            | ParseError::SegmentOutsideMessage { segment, .. }
            | ParseError::EnvelopeOutOfOrder { segment, .. }
            | ParseError::MissingSegment { segment } => Some((*segment, None)),
            _ => None,
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Empty => f.write_str("empty HL7 input"),
            ParseError::MissingMsh { offset, found: Some(seg) } => write!(
                f,
                "expected an MSH segment at byte {offset}, found segment {seg}"
            ),
            ParseError::MissingMsh { offset, found: None } => {
                write!(f, "expected an MSH segment at byte {offset}")
            }
            ParseError::InvalidFieldSeparator { segment, offset } => write!(
                f,
                "{segment}-1 (field separator) at byte {offset} is missing or not a delimiter"
            ),
            ParseError::InvalidEncodingCharacters { segment, offset, reason } => write!(
                f,
                "{segment}-2 (encoding characters) at byte {offset}: {reason}"
            ),
            ParseError::InvalidSegmentName { segment_index, offset } => write!(
                f,
                "segment {segment_index} at byte {offset}: name is not 3 letters or digits followed by the field separator"
            ),
            ParseError::MultipleMessages { segment_index, offset } => write!(
                f,
                "segment {segment_index} at byte {offset}: a second MSH (several messages; parse as a batch)"
            ),
            ParseError::UnexpectedEnvelope { segment_index, segment, offset } => write!(
                f,
                "segment {segment_index} ({segment}) at byte {offset}: batch/file envelope in a single message (parse as a batch)"
            ),
            ParseError::BatchWithoutMessageHeader {
                batch_segment_index,
                segment_index,
                segment,
                offset,
            } => write!(
                f,
                "segment {segment_index} ({segment}) at byte {offset}: not inside any message; the batch opened by BHS at segment {batch_segment_index} has no MSH before it"
            ),
            ParseError::SegmentOutsideMessage { segment_index, segment, offset } => write!(
                f,
                "segment {segment_index} ({segment}) at byte {offset}: before the first MSH"
            ),
            ParseError::EnvelopeOutOfOrder { segment_index, segment, offset } => write!(
                f,
                "segment {segment_index} ({segment}) at byte {offset}: batch/file envelope segment out of order"
            ),
            ParseError::NoMessage => f.write_str("no MSH segment: the input holds no message"),
            ParseError::MissingField { segment, field, component: Some(c) } => {
                write!(f, "required {segment}-{field}.{c} is empty")
            }
            ParseError::MissingField { segment, field, component: None } => {
                write!(f, "required {segment}-{field} is empty")
            }
            ParseError::InvalidField { segment, field, reason } => {
                write!(f, "{segment}-{field}: {reason}")
            }
            ParseError::MissingSegment { segment } => write!(f, "required segment {segment} is missing"),
        }
    }
}

impl std::error::Error for ParseError {}

/// An MLLP framing error. `offset` counts bytes from the start of the stream given to the
/// decoder (or of the message given to the encoder).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MllpError {
    /// Bytes other than CR/LF between frames. Reported once for a run of such bytes, at its
    /// first byte; the run is skipped up to the next start block (0x0B).
    JunkOutsideFrame { offset: usize },
    /// A frame grew beyond the configured maximum. Its bytes are dropped (never buffered past
    /// the limit) until its end block; the decoder then resumes with the next frame.
    FrameTooLarge { offset: usize, max: usize },
    /// A start block (0x0B) inside a frame: the partial frame that began at `frame_offset` is
    /// dropped and a new frame starts at `offset`.
    UnexpectedStartBlock { frame_offset: usize, offset: usize },
    /// The end block 0x1C was not followed by 0x0D: the frame is dropped.
    MissingCarriageReturn { offset: usize },
    /// The stream ended inside a frame.
    Truncated {
        frame_offset: usize,
        buffered: usize,
    },
    /// The encoder was given a message holding a framing byte (0x0B or 0x1C).
    FramingByteInMessage { offset: usize },
}

impl fmt::Display for MllpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MllpError::JunkOutsideFrame { offset } => {
                write!(f, "MLLP: bytes outside a frame at stream byte {offset} (skipped to the next start block)")
            }
            MllpError::FrameTooLarge { offset, max } => {
                write!(f, "MLLP: frame starting at stream byte {offset} exceeds {max} bytes (dropped)")
            }
            MllpError::UnexpectedStartBlock { frame_offset, offset } => write!(
                f,
                "MLLP: start block at stream byte {offset} inside the frame started at byte {frame_offset} (partial frame dropped)"
            ),
            MllpError::MissingCarriageReturn { offset } => write!(
                f,
                "MLLP: end block at stream byte {offset} not followed by CR (frame dropped)"
            ),
            MllpError::Truncated { frame_offset, buffered } => write!(
                f,
                "MLLP: stream ended inside the frame started at byte {frame_offset} ({buffered} bytes buffered)"
            ),
            MllpError::FramingByteInMessage { offset } => {
                write!(f, "MLLP: message byte {offset} is a framing byte (0x0B or 0x1C)")
            }
        }
    }
}

impl std::error::Error for MllpError {}
