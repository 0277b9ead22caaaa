//! HL7 v2 for the gateway, as plain Rust (no Pingora types, no I/O): MLLP framing, message
//! parsing (delimiters from MSH-1/MSH-2, segments, fields, repetitions, components,
//! subcomponents, escapes), batches and files, the typed MSH header and PID-3 identifiers, and
//! original-mode acknowledgements. See `README.md` beside this crate for the quirks handled.
//!
//! No input makes it panic: every access that input can reach is checked, nothing recurses,
//! and allocation is proportional to the input (the MLLP decoder to its frame limit).
//!
//! ```
//! let msg = caregate_hl7::parse_message(b"MSH|^~\\&|LAB|HOSP|GW|HOSP|20250101||ORU^R01|42|P|2.5\rPID|1||123^^^HOSP^MR\r").expect("parses");
//! let h = msg.header();
//! assert_eq!((h.message_type.as_str(), h.trigger_event.as_str(), h.control_id.as_str()), ("ORU", "R01", "42"));
//! assert_eq!(msg.patient_identifiers()[0].identifier_type_code, "MR");
//! ```

pub mod ack;
pub mod batch;
pub mod error;
pub mod header;
pub mod message;
pub mod mllp;

pub use ack::{
    build_ack, build_ack_unreadable, parse_ack, AckCode, AckError, AckParams, ErrorCode,
    ErrorLocation, ReceivedAck, Severity,
};
pub use batch::{parse_batch, parse_messages, Batch};
pub use error::{MllpError, ParseError, SegmentId};
pub use header::{patient_identifiers, HierarchicDesignator, MessageHeader, PatientIdentifier};
pub use message::{
    escape, parse_message, unescape, unescape_lenient, Delimiters, EscapeError, Field, Message,
    Segment, Value,
};
pub use mllp::{encode_frame, encode_frame_into, MllpDecoder};
