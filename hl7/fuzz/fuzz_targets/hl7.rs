//! libFuzzer target: every parser and builder on arbitrary bytes, with the invariants of
//! `hl7/tests/fuzz.rs` (no panic; the CR form of a parsed message parses the same; its ACK
//! reads back with the original control id; MLLP frames round trip and stay within the limit).
#![no_main]

use caregate_hl7::{
    build_ack, build_ack_unreadable, encode_frame, parse_ack, parse_batch, parse_message, unescape,
    AckCode, AckParams, MllpDecoder,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_message(data) {
        Ok(msg) => {
            let header = msg.header();
            let _ = header.validate();
            let _ = msg.patient_identifiers();
            for seg in msg.segments() {
                for n in 0..=seg.field_count() + 1 {
                    if let Some(f) = seg.field(n) {
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
            let cr = msg.to_cr_bytes();
            let again = parse_message(&cr).expect("the CR form of a parsed message parses");
            assert_eq!(again.header(), header);
            let ack = build_ack(&header, &AckParams::new(AckCode::AA, "1", "2"));
            let back = parse_ack(&ack).expect("the ACK of a parsed message parses");
            assert_eq!(back.control_id, header.control_id);
        }
        Err(e) => {
            let _ = (e.to_string(), e.location());
            let ack = build_ack_unreadable(&AckParams::new(AckCode::AE, "1", "2"), "2.5");
            assert!(parse_ack(&ack).is_ok());
        }
    }
    if let Ok(b) = parse_batch(data) {
        for m in &b.messages {
            let _ = (m.header(), m.patient_identifiers());
        }
    }
    let _ = parse_ack(data);
    let mut d = MllpDecoder::new(1024);
    let (a, b) = data.split_at(data.len() / 2);
    for part in [a, b] {
        for frame in d.push(part).into_iter().flatten() {
            assert!(frame.len() <= 1024);
        }
        assert!(d.buffered() <= 1024);
    }
    let _ = d.finish();
    if let Ok(frame) = encode_frame(data) {
        let mut d = MllpDecoder::new(data.len());
        assert_eq!(d.push(&frame), vec![Ok(data.to_vec())]);
    }
});
