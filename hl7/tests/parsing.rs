//! Parser behaviour on hand-written messages: delimiters, field numbering, escapes, line
//! breaks, errors.

use caregate_hl7::{
    escape, parse_batch, parse_message, unescape, unescape_lenient, Delimiters, ParseError,
    SegmentId,
};

const MSG: &[u8] =
    b"MSH|^~\\&|APP|FAC|RAPP|RFAC|20250101120000||ORU^R01^ORU_R01|CTRL1|P|2.5.1|||AL|NE\r\
PID|1||A1^^^AUTH&1.2.3&ISO^MR~B2^^^OTHER^PI||DOE^JANE\r\
OBX|1|TX|CODE||a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\r";

fn id(s: &str) -> SegmentId {
    SegmentId::new(s).expect("segment id")
}

#[test]
fn msh_field_numbering_counts_the_field_separator_as_msh_1() {
    let msg = parse_message(MSG).expect("parses");
    let msh = msg.msh().expect("MSH");
    assert_eq!(msh.field(0).map(|f| f.raw()), None);
    assert_eq!(msh.field(1).expect("1").raw(), b"|");
    assert_eq!(msh.field(2).expect("2").raw(), b"^~\\&");
    // MSH-2 is never split or unescaped.
    assert_eq!(msh.field(2).expect("2").text(), "^~\\&");
    assert_eq!(msh.field(2).expect("2").repetitions().count(), 1);
    assert_eq!(msh.field(3).expect("3").text(), "APP");
    assert_eq!(msh.field(9).expect("9").raw(), b"ORU^R01^ORU_R01");
    assert_eq!(msh.field(10).expect("10").text(), "CTRL1");
    assert_eq!(msh.field(16).expect("16").text(), "NE");
    assert!(msh.field(17).is_none());
    assert_eq!(msh.field_count(), 16);
    let pid = msg.segment("PID").expect("PID");
    assert_eq!(pid.field(1).expect("1").text(), "1");
    assert_eq!(pid.field(2).expect("2").raw(), b"");
    assert_eq!(pid.field_count(), 5);
    let h = msg.header();
    assert_eq!(h.message_structure.as_deref(), Some("ORU_R01"));
    assert_eq!(
        (
            h.accept_ack_type.as_deref(),
            h.application_ack_type.as_deref()
        ),
        (Some("AL"), Some("NE"))
    );
    assert_eq!(h.receiving_application.namespace_id, "RAPP");
}

#[test]
fn repetitions_components_and_subcomponents() {
    let msg = parse_message(MSG).expect("parses");
    let pid3 = msg.segment("PID").and_then(|s| s.field(3)).expect("PID-3");
    assert_eq!(pid3.repetitions().count(), 2);
    assert_eq!(pid3.text(), "A1^^^AUTH&1.2.3&ISO^MR~B2^^^OTHER^PI");
    let rep1 = pid3.repetition(1).expect("rep 1");
    assert_eq!(rep1.component(1).expect("c1").text(), "A1");
    let cx4 = rep1.component(4).expect("c4");
    let subs: Vec<String> = cx4.subcomponents().map(|v| v.text()).collect();
    assert_eq!(subs, ["AUTH", "1.2.3", "ISO"]);
    assert_eq!(
        pid3.repetition(2)
            .and_then(|r| r.component(5))
            .map(|v| v.text())
            .as_deref(),
        Some("PI")
    );
    assert!(pid3.repetition(3).is_none());
    assert!(pid3.repetition(0).is_none());
    let ids = msg.patient_identifiers();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0].assigning_authority.universal_id, "1.2.3");
    assert_eq!(ids[0].assigning_authority.universal_id_type, "ISO");
}

#[test]
fn escape_sequences_decode_to_the_delimiters() {
    let msg = parse_message(MSG).expect("parses");
    let obx5 = msg.segment("OBX").and_then(|s| s.field(5)).expect("OBX-5");
    assert_eq!(obx5.text(), "a|b^c&d~e\\f");
    let d = Delimiters::default();
    assert_eq!(unescape(b"\\X0D0A\\x", &d).expect("hex"), b"\r\nx");
    assert_eq!(
        unescape(b"caf\\XC3A9\\", &d).expect("hex"),
        "café".as_bytes()
    );
    // Formatting sequences are kept verbatim.
    assert_eq!(
        unescape(b"a\\.br\\b\\H\\c\\N\\", &d).expect("kept"),
        b"a\\.br\\b\\H\\c\\N\\"
    );
    // Strict: errors with the offset; lenient: verbatim.
    assert_eq!(unescape(b"ab\\Q\\", &d).map_err(|e| e.offset), Err(2));
    assert_eq!(
        unescape(b"ab\\", &d).map_err(|e| e.reason),
        Err("no closing escape character")
    );
    assert!(unescape(b"\\X0\\", &d).is_err());
    assert!(unescape(b"\\XZZ\\", &d).is_err());
    assert!(unescape(b"\\\\", &d).is_err());
    assert_eq!(unescape_lenient(b"C:\\temp", &d), b"C:\\temp");
    assert_eq!(unescape_lenient(b"x\\Q\\y\\F\\", &d), b"x\\Q\\y|");
    // \P\ is the truncation character only when MSH-2 declares one.
    let d5 = Delimiters {
        truncation: Some(b'#'),
        ..d
    };
    assert_eq!(unescape(b"a\\P\\b", &d5).expect("P"), b"a#b");
    assert!(unescape(b"a\\P\\b", &d).is_err());
    // escape() is undone by unescape().
    let text = b"a|b^c~d\\e&f#g\r\nh\x0b\x1c";
    for delims in [d, d5] {
        let esc = escape(text, &delims);
        assert!(!esc.contains(&b'\r') && !esc.contains(&b'|') && !esc.contains(&b'^'));
        assert_eq!(unescape(&esc, &delims).expect("round trip"), text);
    }
}

#[test]
fn five_encoding_characters_declare_the_truncation_character() {
    let msg =
        parse_message(b"MSH|^~\\&#|A|B|C|D|20250101||ADT^A01^ADT_A01|X|P|2.8\rPID|1||9\\P\\9")
            .expect("parses");
    let d = msg.delimiters();
    assert_eq!(d.truncation, Some(b'#'));
    assert_eq!(d.encoding_characters(), b"^~\\&#");
    assert_eq!(
        msg.msh().and_then(|s| s.field(2)).expect("MSH-2").raw(),
        b"^~\\&#"
    );
    assert_eq!(msg.header().sending_application.namespace_id, "A");
    assert_eq!(
        msg.segment("PID")
            .and_then(|s| s.field(3))
            .expect("PID-3")
            .text(),
        "9#9"
    );
}

#[test]
fn cr_lf_crlf_blank_lines_and_bom_give_the_same_message() {
    let cr = b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\rEVN|A01\rPID|1||42^^^H^MR\r".to_vec();
    let lf: Vec<u8> = cr
        .iter()
        .map(|&b| if b == b'\r' { b'\n' } else { b })
        .collect();
    let crlf: Vec<u8> = cr
        .iter()
        .flat_map(|&b| {
            if b == b'\r' {
                vec![b'\r', b'\n']
            } else {
                vec![b]
            }
        })
        .collect();
    let mut bom = b"\xEF\xBB\xBF\r\n".to_vec();
    bom.extend_from_slice(&lf);
    bom.extend_from_slice(b"\n\n  \n");
    let reference = parse_message(&cr).expect("CR");
    for input in [&lf, &crlf, &bom] {
        let m = parse_message(input).expect("parses");
        assert_eq!(m.header(), reference.header());
        assert_eq!(m.segments().len(), 3);
        assert_eq!(m.to_cr_bytes(), cr);
        assert_eq!(m.patient_identifiers(), reference.patient_identifiers());
    }
}

#[test]
fn delimiters_are_read_never_assumed() {
    // `#` as field separator, `$%*@` as encoding characters.
    let msg = parse_message(b"MSH#$%*@#SEND#FAC#R#RF#1##ORM$O01#C9#P#2.3\rPID#1##7$$$AA@1$MR%8")
        .expect("parses");
    let h = msg.header();
    assert_eq!(
        (
            h.message_type.as_str(),
            h.trigger_event.as_str(),
            h.control_id.as_str()
        ),
        ("ORM", "O01", "C9")
    );
    let ids = msg.patient_identifiers();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0].assigning_authority.namespace_id, "AA");
    assert_eq!(ids[0].assigning_authority.universal_id, "1");
    assert_eq!(ids[0].identifier_type_code, "MR");
    assert_eq!(ids[1].id, "8");
}

#[test]
fn malformed_input_gets_a_precise_error() {
    let cases: &[(&[u8], ParseError)] = &[
        (b"", ParseError::Empty),
        (b"\xEF\xBB\xBF\r\n\n", ParseError::Empty),
        (
            b"PID|1",
            ParseError::MissingMsh {
                offset: 0,
                found: Some(id("PID")),
            },
        ),
        (
            b"\x0bMSH|^~\\&",
            ParseError::MissingMsh {
                offset: 0,
                found: None,
            },
        ),
        (
            b"MSH",
            ParseError::InvalidFieldSeparator {
                segment: id("MSH"),
                offset: 3,
            },
        ),
        (
            b"MSHA^~\\&",
            ParseError::InvalidFieldSeparator {
                segment: id("MSH"),
                offset: 3,
            },
        ),
        (
            b"MSH|^~|A",
            ParseError::InvalidEncodingCharacters {
                segment: id("MSH"),
                offset: 4,
                reason: "fewer than 4 encoding characters",
            },
        ),
        (
            b"MSH|^~\\&#!|A",
            ParseError::InvalidEncodingCharacters {
                segment: id("MSH"),
                offset: 4,
                reason: "more than 5 encoding characters",
            },
        ),
        (
            b"MSH|^~^&|A",
            ParseError::InvalidEncodingCharacters {
                segment: id("MSH"),
                offset: 4,
                reason: "an encoding character is repeated",
            },
        ),
        (
            b"MSH|^~a&|A",
            ParseError::InvalidEncodingCharacters {
                segment: id("MSH"),
                offset: 4,
                reason: "an encoding character is not ASCII punctuation",
            },
        ),
        (
            b"MSH|^~\\&|A\rP!D|1",
            ParseError::InvalidSegmentName {
                segment_index: 1,
                offset: 11,
            },
        ),
        (
            b"MSH|^~\\&|A\rPIDX1",
            ParseError::InvalidSegmentName {
                segment_index: 1,
                offset: 11,
            },
        ),
        (
            b"MSH|^~\\&|A\rPI",
            ParseError::InvalidSegmentName {
                segment_index: 1,
                offset: 11,
            },
        ),
        (
            b"MSH|^~\\&|A\nMSH|^~\\&|B",
            ParseError::MultipleMessages {
                segment_index: 1,
                offset: 11,
            },
        ),
        (
            b"MSH|^~\\&|A\rBTS|1",
            ParseError::UnexpectedEnvelope {
                segment_index: 1,
                segment: id("BTS"),
                offset: 11,
            },
        ),
    ];
    for (input, expected) in cases {
        assert_eq!(
            parse_message(input).as_ref().err(),
            Some(expected),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn batch_structure_errors() {
    let cases: &[(&[u8], ParseError)] = &[
        (b"BHS|^~\\&\rBTS|0", ParseError::NoMessage),
        (b"FHS|^~\\&\rFTS|0", ParseError::NoMessage),
        (
            b"MSH|^~\\&|A\rFHS|^~\\&",
            ParseError::EnvelopeOutOfOrder {
                segment_index: 1,
                segment: id("FHS"),
                offset: 11,
            },
        ),
        (
            b"BHS|^~\\&\rBHS|^~\\&",
            ParseError::EnvelopeOutOfOrder {
                segment_index: 1,
                segment: id("BHS"),
                offset: 9,
            },
        ),
        (
            b"MSH|^~\\&|A\rBTS|1",
            ParseError::EnvelopeOutOfOrder {
                segment_index: 1,
                segment: id("BTS"),
                offset: 11,
            },
        ),
        (
            b"MSH|^~\\&|A\rFTS|1",
            ParseError::EnvelopeOutOfOrder {
                segment_index: 1,
                segment: id("FTS"),
                offset: 11,
            },
        ),
        (
            b"FHS|^~\\&\rMSH|^~\\&|A\rFTS|1\rPID|1",
            ParseError::EnvelopeOutOfOrder {
                segment_index: 3,
                segment: id("PID"),
                offset: 26,
            },
        ),
        (
            b"BHS|^~\\&\rMSH|^~\\&|A\rBTS|1\rPID|1",
            ParseError::SegmentOutsideMessage {
                segment_index: 3,
                segment: id("PID"),
                offset: 26,
            },
        ),
        (
            b"EVN|1\rMSH|^~\\&|A",
            ParseError::MissingMsh {
                offset: 0,
                found: Some(id("EVN")),
            },
        ),
        (
            b"BHS|^~\\&\rPID|1\rMSH|^~\\&|A",
            ParseError::BatchWithoutMessageHeader {
                batch_segment_index: 0,
                segment_index: 1,
                segment: id("PID"),
                offset: 9,
            },
        ),
    ];
    for (input, expected) in cases {
        assert_eq!(
            parse_batch(input).as_ref().err(),
            Some(expected),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
    // Missing trailers at the end of input are tolerated; several batches in a file.
    let b = parse_batch(
        b"FHS|^~\\&\rBHS|^~\\&\rMSH|^~\\&|A\rBTS|1\rBHS|^~\\&\rMSH|^~\\&|B\rMSH|^~\\&|C",
    )
    .expect("parses");
    assert_eq!(
        (
            b.batch_headers.len(),
            b.batch_trailers.len(),
            b.messages.len()
        ),
        (2, 1, 3)
    );
    assert!(b.file_trailer.is_none());
    // Each message keeps its own delimiters.
    let b = parse_batch(b"MSH|^~\\&|A|F\rMSH#^~\\&#B#G").expect("parses");
    let facs: Vec<String> = b
        .messages
        .iter()
        .map(|m| m.header().sending_facility.namespace_id)
        .collect();
    assert_eq!(facs, ["F", "G"]);
}

#[test]
fn errors_never_carry_field_contents() {
    let secret = "SECRETNAME";
    let inputs: Vec<Vec<u8>> = vec![
        format!("MSH|^~\\&|{secret}\rP{secret}").into_bytes(),
        format!("BHS|^~\\&|{secret}\rPID|||{secret}").into_bytes(),
        format!("{secret}|^~\\&").into_bytes(),
        format!("MSH|^~{secret}|").into_bytes(),
    ];
    for input in inputs {
        let e1 = parse_message(&input).expect_err("broken");
        let e2 = parse_batch(&input).expect_err("broken");
        for text in [
            e1.to_string(),
            e2.to_string(),
            format!("{e1:?}"),
            format!("{e2:?}"),
        ] {
            assert!(!text.contains(secret) && !text.contains("SEC"), "{text}");
        }
    }
    // Debug of parsed data shows positions only.
    let m = parse_message(b"MSH|^~\\&|A\rPID|||SECRETNAME").expect("parses");
    assert!(!format!("{m:?}").contains("SECRET"));
}
