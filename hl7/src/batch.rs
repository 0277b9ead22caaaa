//! Batches (`BHS` .. `BTS`), files (`FHS` .. `FTS`) and files of messages back to back.

use crate::error::ParseError;
use crate::message::{tokenize, Delimiters, Message, Segment};

/// The messages of a batch or file, with its envelope segments.
#[derive(Clone, Debug)]
pub struct Batch<'a> {
    /// `FHS`, when the input is an HL7 file.
    pub file_header: Option<Segment<'a>>,
    /// `FTS`, when present.
    pub file_trailer: Option<Segment<'a>>,
    /// Every `BHS`, in order.
    pub batch_headers: Vec<Segment<'a>>,
    /// Every `BTS`, in order.
    pub batch_trailers: Vec<Segment<'a>>,
    /// The messages, in order (each with its own delimiters from its own `MSH`).
    pub messages: Vec<Message<'a>>,
}

impl Batch<'_> {
    /// The number of envelope segments (`FHS`, `BHS`, `BTS`, `FTS`).
    pub fn envelope_segment_count(&self) -> usize {
        usize::from(self.file_header.is_some())
            + usize::from(self.file_trailer.is_some())
            + self.batch_headers.len()
            + self.batch_trailers.len()
    }
}

/// Parses a batch, a file, or messages back to back (each beginning with `MSH`; blank lines
/// between them are fine). A single message is a batch of one.
///
/// Structure accepted: `[FHS] { [BHS] { MSH ... } [BTS] } [FTS]`. Each header segment (`FHS`,
/// `BHS`, `MSH`) declares its own delimiters. A missing `BTS` or `FTS` at the end of the
/// input is tolerated (trailers only carry counts, which are not checked). Refused, with the
/// position: a segment inside a batch before any `MSH` (python-hl7's `sample_bad_batch`), a
/// segment before the first `MSH` outside a batch, envelope segments out of order, and input
/// without any message.
pub fn parse_batch<'a>(input: &'a [u8]) -> Result<Batch<'a>, ParseError> {
    let raw = tokenize(input)?;
    let mut batch = Batch {
        file_header: None,
        file_trailer: None,
        batch_headers: Vec::new(),
        batch_trailers: Vec::new(),
        messages: Vec::new(),
    };
    // The open batch: index of its BHS.
    let mut open_batch: Option<usize> = None;
    let mut current: Vec<Segment<'a>> = Vec::new();
    let mut delims: Option<Delimiters> = None;

    let close = |current: &mut Vec<Segment<'a>>, batch: &mut Batch<'a>| {
        if !current.is_empty() {
            let segments = std::mem::take(current);
            if let Some(m) = Message::from_segments(input, segments) {
                batch.messages.push(m);
            }
        }
    };

    for seg in raw {
        let out_of_order = ParseError::EnvelopeOutOfOrder {
            segment_index: seg.index,
            segment: seg.id,
            offset: seg.offset,
        };
        if batch.file_trailer.is_some() {
            return Err(out_of_order);
        }
        match &seg.id.0 {
            b"FHS" => {
                if seg.index != 0 {
                    return Err(out_of_order);
                }
                let header = seg.header()?;
                delims = Some(header.delimiters());
                batch.file_header = Some(header);
            }
            b"BHS" => {
                close(&mut current, &mut batch);
                if open_batch.is_some() {
                    return Err(out_of_order);
                }
                let header = seg.header()?;
                delims = Some(header.delimiters());
                open_batch = Some(seg.index);
                batch.batch_headers.push(header);
            }
            b"MSH" => {
                close(&mut current, &mut batch);
                let header = seg.header()?;
                delims = Some(header.delimiters());
                current.push(header);
            }
            b"BTS" => {
                close(&mut current, &mut batch);
                if open_batch.take().is_none() {
                    return Err(out_of_order);
                }
                let d = delims.unwrap_or_default();
                batch.batch_trailers.push(seg.body(d)?);
            }
            b"FTS" => {
                close(&mut current, &mut batch);
                if batch.file_header.is_none() || open_batch.is_some() {
                    return Err(out_of_order);
                }
                let d = delims.unwrap_or_default();
                batch.file_trailer = Some(seg.body(d)?);
            }
            _ => {
                if seg.index == 0 {
                    return Err(seg.missing_msh());
                }
                // Checked first, so that errors name only well-formed segment names.
                let body = seg.body(delims.unwrap_or_default())?;
                if !current.is_empty() {
                    current.push(body);
                } else if let Some(bhs) = open_batch {
                    return Err(ParseError::BatchWithoutMessageHeader {
                        batch_segment_index: bhs,
                        segment_index: seg.index,
                        segment: seg.id,
                        offset: seg.offset,
                    });
                } else {
                    return Err(ParseError::SegmentOutsideMessage {
                        segment_index: seg.index,
                        segment: seg.id,
                        offset: seg.offset,
                    });
                }
            }
        }
    }
    close(&mut current, &mut batch);
    if batch.messages.is_empty() {
        return Err(if batch.envelope_segment_count() == 0 {
            ParseError::Empty
        } else {
            ParseError::NoMessage
        });
    }
    Ok(batch)
}

/// The messages of a batch, file, or messages back to back (see [`parse_batch`]).
pub fn parse_messages(input: &[u8]) -> Result<Vec<Message<'_>>, ParseError> {
    parse_batch(input).map(|b| b.messages)
}
