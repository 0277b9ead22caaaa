//! MLLP framing: round trips over the real messages, split at every byte boundary, and the
//! framing errors.

mod common;

use caregate_hl7::mllp::DEFAULT_MAX_FRAME;
use caregate_hl7::{encode_frame, encode_frame_into, parse_message, MllpDecoder, MllpError};
use common::{all_message_files, read};

fn normalized_messages() -> Vec<Vec<u8>> {
    all_message_files()
        .into_iter()
        .filter(|f| f.starts_with("normalized-cr/"))
        .map(|f| read(&f))
        .collect()
}

fn frames_only(items: Vec<Result<Vec<u8>, MllpError>>) -> Vec<Vec<u8>> {
    items
        .into_iter()
        .map(|r| r.expect("no framing error"))
        .collect()
}

#[test]
fn every_normalized_message_round_trips_through_a_frame() {
    let msgs = normalized_messages();
    assert_eq!(msgs.len(), 18);
    for m in &msgs {
        let frame = encode_frame(m).expect("frames");
        assert_eq!(frame.first(), Some(&0x0B));
        assert_eq!(&frame[frame.len() - 2..], b"\x1c\r");
        let mut d = MllpDecoder::default();
        let got = frames_only(d.push(&frame));
        assert_eq!(got, vec![m.clone()]);
        assert!(d.is_idle());
        assert_eq!(d.finish(), Ok(()));
        let parsed = parse_message(&got[0]).expect("parses after deframing");
        assert_eq!(parsed.to_cr_bytes(), *m);
    }
}

#[test]
fn a_stream_split_at_every_byte_boundary_gives_the_same_frames() {
    // The three smallest messages (every cut of the stream is decoded).
    let mut msgs = normalized_messages();
    msgs.sort_by_key(Vec::len);
    msgs.truncate(3);
    let mut stream = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        encode_frame_into(m, &mut stream).expect("frames");
        if i == 0 {
            stream.extend_from_slice(b"\r\n"); // line breaks between frames are skipped
        }
    }
    for cut in 0..=stream.len() {
        let mut d = MllpDecoder::default();
        let mut got = frames_only(d.push(&stream[..cut]));
        got.extend(frames_only(d.push(&stream[cut..])));
        assert_eq!(got, msgs, "cut at {cut}");
        assert_eq!(d.finish(), Ok(()));
        assert_eq!(d.position(), stream.len());
    }
    // One byte at a time.
    let mut d = MllpDecoder::default();
    let got: Vec<Vec<u8>> = stream
        .iter()
        .flat_map(|b| frames_only(d.push(std::slice::from_ref(b))))
        .collect();
    assert_eq!(got, msgs);
}

#[test]
fn junk_between_frames_is_reported_once_and_skipped() {
    let mut stream = b"junk!".to_vec();
    stream.extend(encode_frame(b"MSH|^~\\&|A").expect("frame"));
    stream.extend_from_slice(b"xx");
    stream.extend(encode_frame(b"MSH|^~\\&|B").expect("frame"));
    let mut d = MllpDecoder::default();
    let items = d.push(&stream);
    assert_eq!(
        items,
        vec![
            Err(MllpError::JunkOutsideFrame { offset: 0 }),
            Ok(b"MSH|^~\\&|A".to_vec()),
            Err(MllpError::JunkOutsideFrame { offset: 18 }),
            Ok(b"MSH|^~\\&|B".to_vec()),
        ]
    );
}

#[test]
fn an_oversized_frame_is_refused_without_buffering_it() {
    let mut d = MllpDecoder::new(16);
    let mut items = d.push(b"\x0b0123456789");
    assert!(items.is_empty());
    assert_eq!(d.buffered(), 10);
    items.extend(d.push(b"0123456789"));
    assert_eq!(
        items,
        vec![Err(MllpError::FrameTooLarge { offset: 0, max: 16 })]
    );
    assert_eq!(d.buffered(), 0);
    // Megabytes more of the same frame are dropped, not buffered.
    for _ in 0..64 {
        assert!(d.push(&[b'x'; 65536]).is_empty());
        assert_eq!(d.buffered(), 0);
    }
    // Its end, then the next frame decodes normally; exactly max bytes is fine.
    let items = d.push(b"\x1c\r\x0b0123456789abcdef\x1c\r");
    assert_eq!(items, vec![Ok(b"0123456789abcdef".to_vec())]);
    assert_eq!(DEFAULT_MAX_FRAME, 1 << 20);
}

#[test]
fn framing_errors_are_precise() {
    // A start block inside a frame: the partial frame is dropped.
    let mut d = MllpDecoder::default();
    assert_eq!(
        d.push(b"\x0bMSH|partial\x0bMSH|whole\x1c\r"),
        vec![
            Err(MllpError::UnexpectedStartBlock {
                frame_offset: 0,
                offset: 12
            }),
            Ok(b"MSH|whole".to_vec())
        ]
    );
    // End block without CR: dropped; the byte after it is looked at again.
    let mut d = MllpDecoder::default();
    assert_eq!(
        d.push(b"\x0bA\x1c\x0bB\x1c\r"),
        vec![
            Err(MllpError::MissingCarriageReturn { offset: 2 }),
            Ok(b"B".to_vec())
        ]
    );
    // End of stream inside a frame.
    let mut d = MllpDecoder::default();
    assert!(d.push(b"\x0bMSH|").is_empty());
    assert!(!d.is_idle());
    assert_eq!(
        d.finish(),
        Err(MllpError::Truncated {
            frame_offset: 0,
            buffered: 4
        })
    );
    // An empty frame is a frame.
    let mut d = MllpDecoder::default();
    assert_eq!(d.push(b"\x0b\x1c\r"), vec![Ok(Vec::new())]);
    // The encoder refuses framing bytes in the content.
    assert_eq!(
        encode_frame(b"ab\x1c"),
        Err(MllpError::FramingByteInMessage { offset: 2 })
    );
    let mut out = b"keep".to_vec();
    assert_eq!(
        encode_frame_into(b"\x0b", &mut out),
        Err(MllpError::FramingByteInMessage { offset: 0 })
    );
    assert_eq!(out, b"keep");
    for e in [
        MllpError::FrameTooLarge { offset: 5, max: 9 },
        MllpError::JunkOutsideFrame { offset: 3 },
    ] {
        assert!(e.to_string().contains("byte"));
    }
}
