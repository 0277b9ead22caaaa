//! Property tests run in every `cargo test`: random bytes and mutations of the real messages
//! (byte flips, truncations, insertions, deletions, delimiter and framing bytes) through the
//! MLLP decoder, the parsers, the typed views and the ACK builder: no panic, and round trips
//! where they must hold. `HL7_FUZZ_CASES=N` runs N cases per property (default 500); the
//! libFuzzer target in `hl7/fuzz/` runs the same checks for longer.

mod common;

use caregate_hl7::{
    build_ack, build_ack_unreadable, encode_frame, escape, parse_ack, parse_batch, parse_message,
    unescape, AckCode, AckError, AckParams, Delimiters, ErrorCode, MllpDecoder, MllpError,
};
use proptest::prelude::*;
use proptest::sample::select;
use std::sync::OnceLock;

fn cases() -> u32 {
    std::env::var("HL7_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    }
}

fn corpus() -> &'static Vec<Vec<u8>> {
    static CORPUS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        common::all_message_files()
            .iter()
            .map(|f| common::read(f))
            .collect()
    })
}

/// Runs everything that reads input; asserts the invariants that hold for any input.
fn exercise(bytes: &[u8]) {
    if let Ok(msg) = parse_message(bytes) {
        let header = msg.header();
        let _ = header.validate();
        let _ = header.message_type_string();
        let _ = msg.patient_identifiers();
        for seg in msg.segments() {
            for n in 0..=seg.field_count() + 1 {
                if let Some(f) = seg.field(n) {
                    let _ = f.text();
                    let _ = unescape(f.raw(), &seg.delimiters());
                    for rep in f.repetitions() {
                        for c in rep.components() {
                            for s in c.subcomponents() {
                                let _ = s.text();
                            }
                        }
                    }
                }
            }
        }
        // The CR form of a parsed message parses to the same message.
        let cr = msg.to_cr_bytes();
        let again = parse_message(&cr).expect("the CR form of a parsed message parses");
        assert_eq!(again.header(), header);
        assert_eq!(again.segments().len(), msg.segments().len());
        // Its ACK is readable and names the original control id.
        let err = AckError::new(ErrorCode::ApplicationInternalError, "x");
        let ack = build_ack(
            &header,
            &AckParams::new(AckCode::AE, "C1", "20250101").with_error(&err),
        );
        let back = parse_ack(&ack).expect("the ACK of a parsed message parses");
        assert_eq!(back.code, AckCode::AE);
        assert_eq!(back.control_id, header.control_id);
        assert_eq!(
            back.header.receiving_application,
            header.sending_application
        );
        assert_eq!(back.header.sending_facility, header.receiving_facility);
        assert_eq!(back.header.delimiters, header.delimiters);
        assert_eq!(back.error_codes, ["207"]);
    } else if let Err(e) = parse_message(bytes) {
        let ack = build_ack_unreadable(&AckParams::new(AckCode::AE, "C2", "1"), "2.5");
        assert!(parse_ack(&ack).is_ok());
        let _ = (e.to_string(), e.error_code(), e.location());
    }
    match parse_batch(bytes) {
        Ok(b) => {
            assert!(!b.messages.is_empty());
            for m in &b.messages {
                let _ = (m.header(), m.patient_identifiers());
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let _ = parse_ack(bytes);
    // MLLP: the decoder never holds more than its limit.
    let mut d = MllpDecoder::new(256);
    let (a, b) = bytes.split_at(bytes.len() / 2);
    for part in [a, b] {
        for frame in d.push(part).into_iter().flatten() {
            assert!(frame.len() <= 256);
        }
        assert!(d.buffered() <= 256);
    }
    let _ = d.finish();
    match encode_frame(bytes) {
        Ok(frame) => {
            let mut d = MllpDecoder::new(bytes.len());
            assert_eq!(d.push(&frame), vec![Ok(bytes.to_vec())]);
        }
        Err(MllpError::FramingByteInMessage { offset }) => {
            assert!(matches!(bytes.get(offset), Some(0x0B | 0x1C)))
        }
        Err(e) => panic!("unexpected {e}"),
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Delete(usize),
    Splice(usize, usize, usize),
}

const INTERESTING: &[u8] = b"|^~\\&#\r\n\x0b\x1cMSHPIDBTSFTS\xEF\xBB\xBF \x00\xFFX0";

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, m)| Mutation::Flip(p, m)),
        any::<usize>().prop_map(Mutation::Truncate),
        (
            any::<usize>(),
            prop_oneof![select(INTERESTING), any::<u8>()]
        )
            .prop_map(|(p, b)| Mutation::Insert(p, b)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(a, b, c)| Mutation::Splice(a, b, c)),
    ]
}

fn apply(mut data: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let len = data.len();
        match *m {
            Mutation::Flip(p, mask) if len > 0 => data[p % len] ^= mask.max(1),
            Mutation::Truncate(p) => data.truncate(p % (len + 1)),
            Mutation::Insert(p, b) => data.insert(p % (len + 1), b),
            Mutation::Delete(p) if len > 0 => {
                data.remove(p % len);
            }
            Mutation::Splice(from, n, to) if len > 0 => {
                // Copy a short range elsewhere (duplicates delimiters, segments, headers).
                let from = from % len;
                let end = (from + n % 64).min(len);
                let chunk = data[from..end].to_vec();
                let to = to % (len + 1);
                data.splice(to..to, chunk);
            }
            _ => {}
        }
    }
    data
}

fn delimiters() -> impl Strategy<Value = Delimiters> {
    let punct: Vec<u8> = (0x21u8..0x7F).filter(u8::is_ascii_punctuation).collect();
    proptest::sample::subsequence(punct, 6)
        .prop_shuffle()
        .prop_flat_map(|p| {
            any::<bool>().prop_map(move |t| Delimiters {
                field: p[0],
                component: p[1],
                repetition: p[2],
                escape: p[3],
                subcomponent: p[4],
                truncation: t.then_some(p[5]),
            })
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        exercise(&bytes);
    }

    #[test]
    fn hl7_shaped_random_bytes_never_panic(
        head in select(vec![&b"MSH|^~\\&|"[..], b"BHS|^~\\&|", b"FHS|^~\\&|", b"MSH^~|\\&^", b"\xEF\xBB\xBFMSH|^~\\&#|", b""]),
        body in proptest::collection::vec(prop_oneof![3 => select(INTERESTING), 1 => any::<u8>()], 0..400),
    ) {
        let mut bytes = head.to_vec();
        bytes.extend(body);
        exercise(&bytes);
    }

    #[test]
    fn mutated_real_messages_never_panic(
        which in any::<prop::sample::Index>(),
        muts in proptest::collection::vec(mutation(), 1..10),
    ) {
        let original = which.get(corpus()).clone();
        exercise(&apply(original, &muts));
    }

    #[test]
    fn mllp_stream_round_trips_at_any_split(
        msgs in proptest::collection::vec(
            proptest::collection::vec(any::<u8>().prop_filter("no framing byte", |b| *b != 0x0B && *b != 0x1C), 0..300),
            0..5,
        ),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            stream.extend(encode_frame(m).expect("frames"));
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.push(0);
        points.push(stream.len());
        points.sort_unstable();
        let mut d = MllpDecoder::new(300);
        let mut got = Vec::new();
        for w in points.windows(2) {
            for item in d.push(&stream[w[0]..w[1]]) {
                got.push(item.expect("no framing error"));
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert!(d.finish().is_ok());
    }

    #[test]
    fn escape_then_unescape_is_identity(
        text in proptest::collection::vec(any::<u8>(), 0..200),
        d in delimiters(),
    ) {
        let escaped = escape(&text, &d);
        prop_assert!(!escaped.iter().any(|&b| b == d.field || b == d.component || b == d.repetition
            || b == d.subcomponent || Some(b) == d.truncation || b == b'\r' || b == b'\n'));
        prop_assert_eq!(unescape(&escaped, &d).expect("strict unescape"), text);
    }

    #[test]
    fn messages_back_to_back_split_into_the_same_messages(
        picks in proptest::collection::vec(any::<prop::sample::Index>(), 1..6),
        lf in any::<bool>(),
    ) {
        let originals: Vec<&Vec<u8>> = picks.iter().map(|i| i.get(corpus())).collect();
        let singles: Vec<_> = originals
            .iter()
            .filter_map(|b| parse_message(b).ok())
            .collect();
        let mut file = Vec::new();
        for m in &singles {
            let mut cr = m.to_cr_bytes();
            if lf {
                cr.iter_mut().for_each(|b| if *b == b'\r' { *b = b'\n' });
            }
            file.extend(cr);
        }
        if singles.is_empty() {
            prop_assert!(parse_batch(&file).is_err());
        } else {
            let batch = parse_batch(&file).expect("parses");
            let got: Vec<_> = batch.messages.iter().map(|m| m.header()).collect();
            let want: Vec<_> = singles.iter().map(|m| m.header()).collect();
            prop_assert_eq!(got, want);
        }
    }
}
