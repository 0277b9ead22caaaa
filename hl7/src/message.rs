//! Delimiters, segments, fields, repetitions, components, subcomponents and escapes.

use std::fmt;

use crate::error::{ParseError, SegmentId};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The delimiters of a message, read from MSH-1 (field separator) and MSH-2 (encoding
/// characters: component, repetition, escape, subcomponent and, from v2.7, truncation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Delimiters {
    pub field: u8,
    pub component: u8,
    pub repetition: u8,
    pub escape: u8,
    pub subcomponent: u8,
    /// The v2.7+ truncation character (5th encoding character), when present.
    pub truncation: Option<u8>,
}

impl Default for Delimiters {
    /// `|^~\&`: the delimiters HL7 recommends (no truncation character).
    fn default() -> Self {
        Delimiters {
            field: b'|',
            component: b'^',
            repetition: b'~',
            escape: b'\\',
            subcomponent: b'&',
            truncation: None,
        }
    }
}

impl Delimiters {
    /// MSH-2 as written: component, repetition, escape, subcomponent (and truncation).
    pub fn encoding_characters(&self) -> Vec<u8> {
        let mut out = vec![
            self.component,
            self.repetition,
            self.escape,
            self.subcomponent,
        ];
        out.extend(self.truncation);
        out
    }

    /// Reads the delimiters from a header segment (`MSH`, `FHS` or `BHS`) that starts at
    /// `offset` of the input. Returns them with the length of the encoding characters.
    fn from_header(
        seg: &[u8],
        id: SegmentId,
        offset: usize,
    ) -> Result<(Delimiters, usize), ParseError> {
        let field = match seg.get(3) {
            Some(&b) if is_delimiter(b) => b,
            _ => {
                return Err(ParseError::InvalidFieldSeparator {
                    segment: id,
                    offset: offset + 3,
                })
            }
        };
        let rest = seg.get(4..).unwrap_or_default();
        let len = rest.iter().position(|&b| b == field).unwrap_or(rest.len());
        let enc = rest.get(..len).unwrap_or_default();
        let bad = |reason| ParseError::InvalidEncodingCharacters {
            segment: id,
            offset: offset + 4,
            reason,
        };
        if enc.len() < 4 {
            return Err(bad("fewer than 4 encoding characters"));
        }
        if enc.len() > 5 {
            return Err(bad("more than 5 encoding characters"));
        }
        if !enc.iter().all(|&b| is_delimiter(b)) {
            return Err(bad("an encoding character is not ASCII punctuation"));
        }
        for (i, b) in enc.iter().enumerate() {
            if enc.get(i + 1..).unwrap_or_default().contains(b) {
                return Err(bad("an encoding character is repeated"));
            }
        }
        let at = |i: usize| enc.get(i).copied().unwrap_or_default();
        let delims = Delimiters {
            field,
            component: at(0),
            repetition: at(1),
            escape: at(2),
            subcomponent: at(3),
            truncation: enc.get(4).copied(),
        };
        Ok((delims, len))
    }
}

fn is_delimiter(b: u8) -> bool {
    b.is_ascii_punctuation()
}

fn is_header_id(id: SegmentId) -> bool {
    matches!(&id.0, b"MSH" | b"FHS" | b"BHS")
}

/// One segment, borrowed from the input.
#[derive(Clone, Copy)]
pub struct Segment<'a> {
    raw: &'a [u8],
    id: SegmentId,
    offset: usize,
    index: usize,
    delims: Delimiters,
    /// Length of the encoding characters (header segments only).
    enc_len: usize,
}

impl fmt::Debug for Segment<'_> {
    /// Names the segment and its position, never its content.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment")
            .field("id", &self.id)
            .field("index", &self.index)
            .field("offset", &self.offset)
            .field("len", &self.raw.len())
            .finish()
    }
}

impl<'a> Segment<'a> {
    /// The segment name (`MSH`, `PID`, ...).
    pub fn id(&self) -> SegmentId {
        self.id
    }

    /// The segment name as text.
    pub fn name(&self) -> &str {
        self.id.as_str()
    }

    /// The segment's bytes, without the segment terminator.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Byte offset of the segment in the parser's input.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// 0-based index among the non-empty segments of the parser's input.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The delimiters in force for this segment.
    pub fn delimiters(&self) -> Delimiters {
        self.delims
    }

    /// Field `n` (1-based, as HL7 numbers them), or `None` when the segment has fewer fields.
    ///
    /// For `MSH`, `FHS` and `BHS`, field 1 is the field separator itself and field 2 the
    /// encoding characters: both are returned whole (never split on components or unescaped).
    pub fn field(&self, n: usize) -> Option<Field<'a>> {
        if n == 0 {
            return None;
        }
        let body = self.raw.get(4..)?;
        if is_header_id(self.id) {
            return match n {
                1 => Some(Field::opaque(self.raw.get(3..4)?, self.delims)),
                2 => Some(Field::opaque(body.get(..self.enc_len)?, self.delims)),
                _ => {
                    let rest = body.get(self.enc_len..)?;
                    let rest = rest.get(1..)?;
                    let raw = rest.split(|&b| b == self.delims.field).nth(n - 3)?;
                    Some(Field::new(raw, self.delims))
                }
            };
        }
        let raw = body.split(|&b| b == self.delims.field).nth(n - 1)?;
        Some(Field::new(raw, self.delims))
    }

    /// The number of the last field present (0 for a segment with only its name).
    pub fn field_count(&self) -> usize {
        match self.raw.get(4..) {
            None => 0,
            Some(body) => {
                let pieces = body.iter().filter(|&&b| b == self.delims.field).count() + 1;
                if is_header_id(self.id) {
                    pieces + 1
                } else {
                    pieces
                }
            }
        }
    }
}

/// A field: one or more repetitions.
#[derive(Clone, Copy)]
pub struct Field<'a> {
    raw: &'a [u8],
    delims: Delimiters,
    opaque: bool,
}

impl fmt::Debug for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Field({} bytes)", self.raw.len())
    }
}

impl<'a> Field<'a> {
    fn new(raw: &'a [u8], delims: Delimiters) -> Self {
        Field {
            raw,
            delims,
            opaque: false,
        }
    }

    fn opaque(raw: &'a [u8], delims: Delimiters) -> Self {
        Field {
            raw,
            delims,
            opaque: true,
        }
    }

    /// The field's bytes as written (escapes not decoded).
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// The whole field (all repetitions, separators kept as written), unescaped (lenient) and
    /// decoded as UTF-8 (lossy).
    pub fn text(&self) -> String {
        Value {
            raw: self.raw,
            delims: self.delims,
            opaque: self.opaque,
        }
        .text_whole()
    }

    /// The repetitions (a field without a repetition separator has one).
    pub fn repetitions(&self) -> impl Iterator<Item = Value<'a>> + 'a {
        let (delims, opaque) = (self.delims, self.opaque);
        let sep = if opaque {
            None
        } else {
            Some(delims.repetition)
        };
        split_opt(self.raw, sep).map(move |raw| Value {
            raw,
            delims,
            opaque,
        })
    }

    /// Repetition `n` (1-based).
    pub fn repetition(&self, n: usize) -> Option<Value<'a>> {
        self.repetitions().nth(n.checked_sub(1)?)
    }

    /// The first repetition (the whole field when it does not repeat).
    pub fn first(&self) -> Value<'a> {
        let sep = if self.opaque {
            None
        } else {
            Some(self.delims.repetition)
        };
        let raw = split_opt(self.raw, sep).next().unwrap_or_default();
        Value {
            raw,
            delims: self.delims,
            opaque: self.opaque,
        }
    }

    /// Component `n` (1-based) of the first repetition.
    pub fn component(&self, n: usize) -> Option<Value<'a>> {
        self.first().component(n)
    }
}

/// A repetition, component or subcomponent.
#[derive(Clone, Copy)]
pub struct Value<'a> {
    raw: &'a [u8],
    delims: Delimiters,
    opaque: bool,
}

impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Value({} bytes)", self.raw.len())
    }
}

impl<'a> Value<'a> {
    /// The bytes as written (escapes not decoded).
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// The value unescaped (lenient, see [`unescape`]) and decoded as UTF-8 (lossy). Meant for
    /// a component or subcomponent: on a value holding separators they are kept as written.
    pub fn text(&self) -> String {
        self.text_whole()
    }

    fn text_whole(&self) -> String {
        if self.opaque {
            return String::from_utf8_lossy(self.raw).into_owned();
        }
        let bytes = unescape_lenient(self.raw, &self.delims);
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// The components (split on the component separator).
    pub fn components(&self) -> impl Iterator<Item = Value<'a>> + 'a {
        let (delims, opaque) = (self.delims, self.opaque);
        let sep = if opaque { None } else { Some(delims.component) };
        split_opt(self.raw, sep).map(move |raw| Value {
            raw,
            delims,
            opaque,
        })
    }

    /// Component `n` (1-based).
    pub fn component(&self, n: usize) -> Option<Value<'a>> {
        self.components().nth(n.checked_sub(1)?)
    }

    /// The subcomponents (split on the subcomponent separator).
    pub fn subcomponents(&self) -> impl Iterator<Item = Value<'a>> + 'a {
        let (delims, opaque) = (self.delims, self.opaque);
        let sep = if opaque {
            None
        } else {
            Some(delims.subcomponent)
        };
        split_opt(self.raw, sep).map(move |raw| Value {
            raw,
            delims,
            opaque,
        })
    }

    /// Subcomponent `n` (1-based).
    pub fn subcomponent(&self, n: usize) -> Option<Value<'a>> {
        self.subcomponents().nth(n.checked_sub(1)?)
    }
}

fn split_opt(raw: &[u8], sep: Option<u8>) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(raw);
    std::iter::from_fn(move || {
        let cur = rest?;
        match sep.and_then(|s| cur.iter().position(|&b| b == s)) {
            Some(i) => {
                rest = cur.get(i + 1..);
                cur.get(..i)
            }
            None => {
                rest = None;
                Some(cur)
            }
        }
    })
}

/// A malformed escape sequence (strict [`unescape`] only). `offset` is relative to the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EscapeError {
    pub offset: usize,
    pub reason: &'static str,
}

impl fmt::Display for EscapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "escape sequence at byte {} of the value: {}",
            self.offset, self.reason
        )
    }
}

impl std::error::Error for EscapeError {}

/// Decodes escape sequences strictly.
///
/// `\F\ \S\ \T\ \R\ \E\` become the field, component, subcomponent, repetition and escape
/// characters, `\P\` the truncation character (when MSH-2 declares one), `\Xhhhh..\` the bytes
/// in hex. Formatting and character-set sequences (`\H\ \N\ \.br\ \.sp..\ \Cxxyy\ \Mxxyyzz\
/// \Zxx..\`) are kept verbatim, escape characters included. An escape with no closing escape
/// character, an empty sequence, odd or non-hex `\X` digits and any other sequence are errors.
pub fn unescape(raw: &[u8], delims: &Delimiters) -> Result<Vec<u8>, EscapeError> {
    unescape_impl(raw, delims, true)
}

/// Decodes escape sequences leniently: like [`unescape`], but anything it would reject is kept
/// verbatim (stray backslashes in free text are common).
pub fn unescape_lenient(raw: &[u8], delims: &Delimiters) -> Vec<u8> {
    unescape_impl(raw, delims, false).unwrap_or_else(|_| raw.to_vec())
}

fn unescape_impl(raw: &[u8], d: &Delimiters, strict: bool) -> Result<Vec<u8>, EscapeError> {
    let esc = d.escape;
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        if b != esc {
            out.push(b);
            i += 1;
            continue;
        }
        let tail = raw.get(i + 1..).unwrap_or_default();
        let Some(len) = tail.iter().position(|&c| c == esc) else {
            if strict {
                return Err(EscapeError {
                    offset: i,
                    reason: "no closing escape character",
                });
            }
            out.extend_from_slice(raw.get(i..).unwrap_or_default());
            break;
        };
        let seq = tail.get(..len).unwrap_or_default();
        let whole = raw.get(i..i + len + 2).unwrap_or_default();
        match seq {
            b"F" => out.push(d.field),
            b"S" => out.push(d.component),
            b"T" => out.push(d.subcomponent),
            b"R" => out.push(d.repetition),
            b"E" => out.push(esc),
            b"P" if d.truncation.is_some() => out.extend(d.truncation),
            [b'X', hex @ ..] => match decode_hex(hex) {
                Some(bytes) => out.extend_from_slice(&bytes),
                None if strict => {
                    return Err(EscapeError {
                        offset: i,
                        reason: "\\X needs an even number of hex digits",
                    })
                }
                None => out.extend_from_slice(whole),
            },
            b"H" | b"N" | [b'.', ..] | [b'C', ..] | [b'M', ..] | [b'Z', ..] => {
                out.extend_from_slice(whole)
            }
            [] if strict => {
                return Err(EscapeError {
                    offset: i,
                    reason: "empty escape sequence",
                })
            }
            _ if strict => {
                return Err(EscapeError {
                    offset: i,
                    reason: "unknown escape sequence",
                })
            }
            _ => out.extend_from_slice(whole),
        }
        i += len + 2;
    }
    Ok(out)
}

fn decode_hex(hex: &[u8]) -> Option<Vec<u8>> {
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return None;
    }
    hex.chunks(2)
        .map(|pair| {
            let s = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(s, 16).ok()
        })
        .collect()
}

/// Escapes a value for the given delimiters: every delimiter becomes its escape sequence and
/// CR, LF, 0x0B and 0x1C become `\Xhh\`, so [`unescape`] gives back the input.
pub fn escape(text: &[u8], d: &Delimiters) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let e = d.escape;
    for &b in text {
        let code: Option<&[u8]> = if b == d.field {
            Some(b"F")
        } else if b == d.component {
            Some(b"S")
        } else if b == d.subcomponent {
            Some(b"T")
        } else if b == d.repetition {
            Some(b"R")
        } else if b == e {
            Some(b"E")
        } else if Some(b) == d.truncation {
            Some(b"P")
        } else {
            None
        };
        match code {
            Some(c) => {
                out.push(e);
                out.extend_from_slice(c);
                out.push(e);
            }
            None if matches!(b, b'\r' | b'\n' | 0x0B | 0x1C) => {
                out.push(e);
                out.extend_from_slice(format!("X{b:02X}").as_bytes());
                out.push(e);
            }
            None => out.push(b),
        }
    }
    out
}

/// A segment as cut from the input, before the delimiters are applied.
#[derive(Clone, Copy)]
pub(crate) struct RawSegment<'a> {
    pub(crate) raw: &'a [u8],
    pub(crate) id: SegmentId,
    pub(crate) offset: usize,
    pub(crate) index: usize,
}

impl<'a> RawSegment<'a> {
    /// Reads the delimiters of a header segment and returns it as a segment.
    pub(crate) fn header(self) -> Result<Segment<'a>, ParseError> {
        let (delims, enc_len) = Delimiters::from_header(self.raw, self.id, self.offset)?;
        Ok(self.with(delims, enc_len))
    }

    /// A body segment under `delims`: its name must be followed by the field separator or end.
    pub(crate) fn body(self, delims: Delimiters) -> Result<Segment<'a>, ParseError> {
        match self.raw.get(3) {
            Some(&b) if b != delims.field => Err(ParseError::InvalidSegmentName {
                segment_index: self.index,
                offset: self.offset,
            }),
            _ => Ok(self.with(delims, 0)),
        }
    }

    /// The error for a first segment that is not a header: names it only when it looks like a
    /// segment (its name followed by punctuation or its end), so that no content leaks.
    pub(crate) fn missing_msh(&self) -> ParseError {
        let looks_like_segment = self.raw.get(3).is_none_or(|&b| is_delimiter(b));
        ParseError::MissingMsh {
            offset: self.offset,
            found: looks_like_segment.then_some(self.id),
        }
    }

    fn with(self, delims: Delimiters, enc_len: usize) -> Segment<'a> {
        Segment {
            raw: self.raw,
            id: self.id,
            offset: self.offset,
            index: self.index,
            delims,
            enc_len,
        }
    }
}

/// Cuts the input into segments: a leading UTF-8 BOM is skipped, segments end at CR, LF or
/// CRLF, empty and all-blank lines are skipped. Every segment name must be 3 ASCII letters or
/// digits.
pub(crate) fn tokenize(input: &[u8]) -> Result<Vec<RawSegment<'_>>, ParseError> {
    let start = if input.starts_with(BOM) { BOM.len() } else { 0 };
    let mut out = Vec::new();
    let mut offset = start;
    let body = input.get(start..).unwrap_or_default();
    for line in body.split(|&b| b == b'\r' || b == b'\n') {
        let here = offset;
        offset += line.len() + 1;
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let index = out.len();
        let id = line
            .get(..3)
            .and_then(SegmentId::from_bytes)
            .ok_or(if index == 0 {
                ParseError::MissingMsh {
                    offset: here,
                    found: None,
                }
            } else {
                ParseError::InvalidSegmentName {
                    segment_index: index,
                    offset: here,
                }
            })?;
        out.push(RawSegment {
            raw: line,
            id,
            offset: here,
            index,
        });
    }
    Ok(out)
}

/// One HL7 v2 message: its delimiters and segments, borrowed from the input.
#[derive(Clone)]
pub struct Message<'a> {
    raw: &'a [u8],
    delims: Delimiters,
    segments: Vec<Segment<'a>>,
}

impl fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("delimiters", &self.delims)
            .field("segments", &self.segments)
            .finish()
    }
}

impl<'a> Message<'a> {
    /// Builds a message from its segments; the first must be an `MSH` header.
    pub(crate) fn from_segments(input: &'a [u8], segments: Vec<Segment<'a>>) -> Option<Self> {
        let first = segments.first()?;
        let last = segments.last()?;
        let delims = first.delims;
        let end = last.offset + last.raw.len();
        let raw = input.get(first.offset..end)?;
        Some(Message {
            raw,
            delims,
            segments,
        })
    }

    /// The message's bytes from `MSH` to the end of its last segment, line breaks as written.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    pub fn delimiters(&self) -> Delimiters {
        self.delims
    }

    /// All segments, `MSH` first.
    pub fn segments(&self) -> &[Segment<'a>] {
        &self.segments
    }

    /// The `MSH` segment.
    pub fn msh(&self) -> Option<&Segment<'a>> {
        self.segments.first()
    }

    /// The first segment named `id`.
    pub fn segment(&self, id: &str) -> Option<&Segment<'a>> {
        self.segments.iter().find(|s| s.id == id)
    }

    /// All segments named `id`, in order.
    pub fn segments_named<'s>(&'s self, id: &'s str) -> impl Iterator<Item = &'s Segment<'a>> + 's {
        self.segments.iter().filter(move |s| s.id == id)
    }

    /// The message with every segment terminated by a single CR (the HL7 segment terminator),
    /// whatever line breaks the input used: the form to send over MLLP.
    pub fn to_cr_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.raw.len() + 1);
        for seg in &self.segments {
            out.extend_from_slice(seg.raw);
            out.push(b'\r');
        }
        out
    }
}

/// Parses exactly one message: an optional UTF-8 BOM and line breaks, then `MSH` and its
/// segments. A second `MSH` or a batch envelope segment is an error (see
/// [`parse_batch`](crate::parse_batch) for batches and files of several messages).
pub fn parse_message(input: &[u8]) -> Result<Message<'_>, ParseError> {
    let raw = tokenize(input)?;
    let mut iter = raw.into_iter();
    let first = iter.next().ok_or(ParseError::Empty)?;
    match &first.id.0 {
        b"MSH" => {}
        b"FHS" | b"BHS" => {
            return Err(ParseError::UnexpectedEnvelope {
                segment_index: first.index,
                segment: first.id,
                offset: first.offset,
            })
        }
        _ => return Err(first.missing_msh()),
    }
    let msh = first.header()?;
    let delims = msh.delims;
    let mut segments = vec![msh];
    for seg in iter {
        match &seg.id.0 {
            b"MSH" => {
                return Err(ParseError::MultipleMessages {
                    segment_index: seg.index,
                    offset: seg.offset,
                })
            }
            b"FHS" | b"BHS" | b"BTS" | b"FTS" => {
                return Err(ParseError::UnexpectedEnvelope {
                    segment_index: seg.index,
                    segment: seg.id,
                    offset: seg.offset,
                })
            }
            _ => segments.push(seg.body(delims)?),
        }
    }
    Message::from_segments(input, segments).ok_or(ParseError::Empty)
}
