//! Typed views of MSH (the message header) and PID-3 (patient identifiers).

use crate::error::{ParseError, SegmentId};
use crate::message::{Delimiters, Field, Message, Segment, Value};

/// An HD (hierarchic designator): namespace id, universal id, universal id type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HierarchicDesignator {
    pub namespace_id: String,
    pub universal_id: String,
    pub universal_id_type: String,
}

impl HierarchicDesignator {
    fn from_parts(mut parts: impl Iterator<Item = String>) -> Self {
        HierarchicDesignator {
            namespace_id: parts.next().unwrap_or_default(),
            universal_id: parts.next().unwrap_or_default(),
            universal_id_type: parts.next().unwrap_or_default(),
        }
    }

    /// From a field: components 1-3 of its first repetition.
    fn from_field(field: Option<Field<'_>>) -> Self {
        match field {
            Some(f) => Self::from_parts(f.first().components().map(|c| c.text())),
            None => Self::default(),
        }
    }

    /// From a component: subcomponents 1-3 (an HD inside a CX, e.g. PID-3.4).
    fn from_component(value: Option<Value<'_>>) -> Self {
        match value {
            Some(v) => Self::from_parts(v.subcomponents().map(|c| c.text())),
            None => Self::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.namespace_id.is_empty()
            && self.universal_id.is_empty()
            && self.universal_id_type.is_empty()
    }
}

/// The fields of MSH this gateway needs, unescaped. An absent or empty field is an empty
/// string (or `None`): [`MessageHeader::from_message`] never fails; [`MessageHeader::validate`]
/// checks the fields HL7 requires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageHeader {
    /// MSH-1 and MSH-2.
    pub delimiters: Delimiters,
    /// MSH-3.
    pub sending_application: HierarchicDesignator,
    /// MSH-4.
    pub sending_facility: HierarchicDesignator,
    /// MSH-5.
    pub receiving_application: HierarchicDesignator,
    /// MSH-6.
    pub receiving_facility: HierarchicDesignator,
    /// MSH-7 (as written, not interpreted).
    pub date_time: String,
    /// MSH-9.1, e.g. `ADT`.
    pub message_type: String,
    /// MSH-9.2, e.g. `A01`.
    pub trigger_event: String,
    /// MSH-9.3, e.g. `ADT_A01`, when present.
    pub message_structure: Option<String>,
    /// MSH-10.
    pub control_id: String,
    /// MSH-11.1 (`P`, `T`, `D`).
    pub processing_id: String,
    /// MSH-12.1, e.g. `2.5.1`.
    pub version: String,
    /// MSH-15 (`AL`, `NE`, `ER`, `SU`), when present: enhanced acknowledgement mode.
    pub accept_ack_type: Option<String>,
    /// MSH-16, when present.
    pub application_ack_type: Option<String>,
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

impl MessageHeader {
    /// Reads the header of a parsed message.
    pub fn from_message(message: &Message<'_>) -> Self {
        match message.msh() {
            Some(msh) => Self::from_segment(msh),
            None => Self::empty(message.delimiters()),
        }
    }

    fn empty(delimiters: Delimiters) -> Self {
        MessageHeader {
            delimiters,
            sending_application: HierarchicDesignator::default(),
            sending_facility: HierarchicDesignator::default(),
            receiving_application: HierarchicDesignator::default(),
            receiving_facility: HierarchicDesignator::default(),
            date_time: String::new(),
            message_type: String::new(),
            trigger_event: String::new(),
            message_structure: None,
            control_id: String::new(),
            processing_id: String::new(),
            version: String::new(),
            accept_ack_type: None,
            application_ack_type: None,
        }
    }

    /// Reads a header from an `MSH` segment.
    pub fn from_segment(msh: &Segment<'_>) -> Self {
        let text = |n: usize, c: usize| -> String {
            msh.field(n)
                .and_then(|f| f.component(c))
                .map(|v| v.text())
                .unwrap_or_default()
        };
        MessageHeader {
            delimiters: msh.delimiters(),
            sending_application: HierarchicDesignator::from_field(msh.field(3)),
            sending_facility: HierarchicDesignator::from_field(msh.field(4)),
            receiving_application: HierarchicDesignator::from_field(msh.field(5)),
            receiving_facility: HierarchicDesignator::from_field(msh.field(6)),
            date_time: text(7, 1),
            message_type: text(9, 1),
            trigger_event: text(9, 2),
            message_structure: non_empty(text(9, 3)),
            control_id: text(10, 1),
            processing_id: text(11, 1),
            version: text(12, 1),
            accept_ack_type: non_empty(text(15, 1)),
            application_ack_type: non_empty(text(16, 1)),
        }
    }

    /// MSH-9 as `type^trigger[^structure]` with `^` (whatever the message's own component
    /// separator), e.g. `ADT^A01^ADT_A01`: for routing keys and metrics.
    pub fn message_type_string(&self) -> String {
        let mut s = self.message_type.clone();
        if !self.trigger_event.is_empty() || self.message_structure.is_some() {
            s.push('^');
            s.push_str(&self.trigger_event);
        }
        if let Some(structure) = &self.message_structure {
            s.push('^');
            s.push_str(structure);
        }
        s
    }

    /// Checks the fields HL7 requires here: MSH-9.1, MSH-9.2 (except for `ACK`), MSH-10,
    /// MSH-11 and MSH-12. The error names the first missing field.
    pub fn validate(&self) -> Result<(), ParseError> {
        let msh = SegmentId(*b"MSH");
        let missing = |field, component| {
            Err(ParseError::MissingField {
                segment: msh,
                field,
                component,
            })
        };
        if self.message_type.is_empty() {
            return missing(9, Some(1));
        }
        if self.trigger_event.is_empty() && self.message_type != "ACK" {
            return missing(9, Some(2));
        }
        if self.control_id.is_empty() {
            return missing(10, None);
        }
        if self.processing_id.is_empty() {
            return missing(11, None);
        }
        if self.version.is_empty() {
            return missing(12, None);
        }
        Ok(())
    }
}

/// One PID-3 repetition (a CX).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PatientIdentifier {
    /// CX-1.
    pub id: String,
    /// CX-4 (an HD in subcomponents).
    pub assigning_authority: HierarchicDesignator,
    /// CX-5, e.g. `MR`.
    pub identifier_type_code: String,
    /// Index (in the parser's input) of the PID segment it comes from.
    pub segment_index: usize,
}

/// Every PID-3 repetition of every PID segment of a message (an ADT^A24 links two
/// patients), in order. Empty repetitions are skipped.
pub fn patient_identifiers(message: &Message<'_>) -> Vec<PatientIdentifier> {
    let mut out = Vec::new();
    for pid in message.segments_named("PID") {
        let Some(field) = pid.field(3) else { continue };
        for rep in field.repetitions().filter(|r| !r.is_empty()) {
            let text = |c: usize| rep.component(c).map(|v| v.text()).unwrap_or_default();
            out.push(PatientIdentifier {
                id: text(1),
                assigning_authority: HierarchicDesignator::from_component(rep.component(4)),
                identifier_type_code: text(5),
                segment_index: pid.index(),
            });
        }
    }
    out
}

impl<'a> Message<'a> {
    /// The typed header (see [`MessageHeader::from_message`]).
    pub fn header(&self) -> MessageHeader {
        MessageHeader::from_message(self)
    }

    /// PID-3 of every PID segment (see [`patient_identifiers`]).
    pub fn patient_identifiers(&self) -> Vec<PatientIdentifier> {
        patient_identifiers(self)
    }
}
