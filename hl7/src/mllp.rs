//! MLLP framing: `0x0B <message> 0x1C 0x0D`.
//!
//! [`MllpDecoder`] is an incremental state machine: feed it the bytes a socket read returned,
//! get back every frame completed by them (and framing errors, in stream order). It never
//! buffers more than the configured maximum frame size.
//!
//! Between frames, CR and LF are skipped silently (some senders end a frame with an extra line
//! break). Any other byte outside a frame is junk: reported once per run as
//! [`MllpError::JunkOutsideFrame`] at its first byte, then skipped up to the next start block.
//! The decoder keeps going after every error; the caller decides whether to answer (a NAK) or
//! close the connection.

use crate::error::MllpError;

/// Start block.
pub const START_BLOCK: u8 = 0x0B;
/// End block.
pub const END_BLOCK: u8 = 0x1C;
/// The carriage return after the end block.
pub const CARRIAGE_RETURN: u8 = 0x0D;

/// Default maximum frame size (content bytes): 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between frames.
    Idle,
    /// Skipping junk between frames (already reported).
    Junk,
    /// Inside a frame that started at the given stream offset.
    Frame(usize),
    /// Saw the end block of the frame that started at the given offset.
    End(usize),
    /// Dropping an oversized frame up to its end block.
    Discard,
    /// Saw the end block of a frame being dropped.
    DiscardEnd,
}

/// One item the decoder produces.
pub type Decoded = Result<Vec<u8>, MllpError>;

/// Incremental MLLP decoder.
#[derive(Debug)]
pub struct MllpDecoder {
    max_frame: usize,
    state: State,
    buf: Vec<u8>,
    /// Stream offset of the next byte to be pushed.
    position: usize,
}

impl Default for MllpDecoder {
    fn default() -> Self {
        MllpDecoder::new(DEFAULT_MAX_FRAME)
    }
}

impl MllpDecoder {
    /// A decoder that refuses frames whose content is larger than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        MllpDecoder {
            max_frame,
            state: State::Idle,
            buf: Vec::new(),
            position: 0,
        }
    }

    /// Feeds bytes; returns the frames they complete (content only, without the framing bytes)
    /// and errors, in stream order.
    pub fn push(&mut self, data: &[u8]) -> Vec<Decoded> {
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(&b) = data.get(i) {
            let at = self.position + i;
            match self.state {
                State::Idle => match b {
                    START_BLOCK => self.state = State::Frame(at),
                    b'\r' | b'\n' => {}
                    _ => {
                        out.push(Err(MllpError::JunkOutsideFrame { offset: at }));
                        self.state = State::Junk;
                    }
                },
                State::Junk => {
                    if b == START_BLOCK {
                        self.state = State::Frame(at);
                    }
                }
                State::Frame(start) => {
                    // Copy the run of content bytes up to the next framing byte at once.
                    let rest = data.get(i..).unwrap_or_default();
                    let run = rest
                        .iter()
                        .position(|&c| c == START_BLOCK || c == END_BLOCK)
                        .unwrap_or(rest.len());
                    if run > 0 {
                        if self.buf.len() + run > self.max_frame {
                            out.push(Err(MllpError::FrameTooLarge {
                                offset: start,
                                max: self.max_frame,
                            }));
                            self.buf = Vec::new();
                            self.state = State::Discard;
                        } else {
                            self.buf
                                .extend_from_slice(rest.get(..run).unwrap_or_default());
                        }
                        i += run;
                        continue;
                    }
                    if b == START_BLOCK {
                        out.push(Err(MllpError::UnexpectedStartBlock {
                            frame_offset: start,
                            offset: at,
                        }));
                        self.buf.clear();
                        self.state = State::Frame(at);
                    } else {
                        self.state = State::End(start);
                    }
                }
                State::End(_) => {
                    if b == CARRIAGE_RETURN {
                        out.push(Ok(std::mem::take(&mut self.buf)));
                        self.state = State::Idle;
                    } else {
                        out.push(Err(MllpError::MissingCarriageReturn {
                            offset: at.saturating_sub(1),
                        }));
                        self.buf.clear();
                        self.state = State::Idle;
                        // Look at this byte again as the first one after a frame.
                        continue;
                    }
                }
                State::Discard => {
                    let rest = data.get(i..).unwrap_or_default();
                    match rest.iter().position(|&c| c == END_BLOCK) {
                        Some(p) => {
                            i += p + 1;
                            self.state = State::DiscardEnd;
                        }
                        None => i += rest.len(),
                    }
                    continue;
                }
                State::DiscardEnd => {
                    self.state = if b == CARRIAGE_RETURN {
                        State::Idle
                    } else {
                        State::Discard
                    };
                    if b != CARRIAGE_RETURN {
                        continue;
                    }
                }
            }
            i += 1;
        }
        self.position += data.len();
        out
    }

    /// Bytes buffered for an incomplete frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// True between frames (nothing partial pending).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle | State::Junk)
    }

    /// Bytes pushed so far.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Call at end of stream: an error if the stream ended inside a frame.
    pub fn finish(&self) -> Result<(), MllpError> {
        match self.state {
            State::Frame(start) | State::End(start) => Err(MllpError::Truncated {
                frame_offset: start,
                buffered: self.buf.len(),
            }),
            _ => Ok(()),
        }
    }
}

/// Frames a message: `0x0B <message> 0x1C 0x0D`. A message holding 0x0B or 0x1C cannot be
/// framed (HL7 text never holds them; escape them as `\X0B\` / `\X1C\`).
pub fn encode_frame(message: &[u8]) -> Result<Vec<u8>, MllpError> {
    let mut out = Vec::with_capacity(message.len() + 3);
    encode_frame_into(message, &mut out)?;
    Ok(out)
}

/// Like [`encode_frame`], appending to `out` (left unchanged on error).
pub fn encode_frame_into(message: &[u8], out: &mut Vec<u8>) -> Result<(), MllpError> {
    if let Some(offset) = message
        .iter()
        .position(|&b| b == START_BLOCK || b == END_BLOCK)
    {
        return Err(MllpError::FramingByteInMessage { offset });
    }
    out.reserve(message.len() + 3);
    out.push(START_BLOCK);
    out.extend_from_slice(message);
    out.push(END_BLOCK);
    out.push(CARRIAGE_RETURN);
    Ok(())
}
