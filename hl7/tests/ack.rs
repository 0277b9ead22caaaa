//! Acknowledgements: built with the incoming message's delimiters, read back, and parsed from
//! a destination.

mod common;

use caregate_hl7::{
    build_ack, build_ack_unreadable, parse_ack, parse_message, AckCode, AckError, AckParams,
    ErrorCode, HierarchicDesignator, ParseError, SegmentId,
};
use common::read;

const TS: &str = "20250101120000+0000";

fn field_text(msg: &caregate_hl7::Message<'_>, seg: &str, n: usize) -> String {
    msg.segment(seg)
        .and_then(|s| s.field(n))
        .map(|f| f.text())
        .unwrap_or_default()
}

#[test]
fn aa_ack_swaps_sender_and_receiver_and_echoes_the_control_id() {
    let bytes = read("microsoft-fhir-converter/ADT-A01-01.hl7");
    let orig = parse_message(&bytes).expect("parses").header();
    let ack = build_ack(&orig, &AckParams::new(AckCode::AA, "GW-1", TS));
    assert!(ack.ends_with(b"\r") && !ack.contains(&b'\n'));
    let msg = parse_message(&ack).expect("the ACK parses");
    let h = msg.header();
    assert_eq!(h.sending_application, orig.receiving_application);
    assert_eq!(h.sending_facility, orig.receiving_facility);
    assert_eq!(h.receiving_application, orig.sending_application);
    assert_eq!(h.receiving_facility, orig.sending_facility);
    assert_eq!(h.message_type_string(), "ACK^A01^ACK");
    assert_eq!(h.control_id, "GW-1");
    assert_eq!(h.date_time, TS);
    assert_eq!(
        (h.processing_id.as_str(), h.version.as_str()),
        (orig.processing_id.as_str(), "2.8")
    );
    assert_eq!(h.delimiters, orig.delimiters);
    assert_eq!(field_text(&msg, "MSA", 1), "AA");
    assert_eq!(field_text(&msg, "MSA", 2), "MSG00001");
    assert!(msg.segment("ERR").is_none());
    assert_eq!(msg.segments().len(), 2);

    let received = parse_ack(&ack).expect("reads");
    assert_eq!(received.code, AckCode::AA);
    assert_eq!(received.control_id, "MSG00001");
    assert!(received.error_codes.is_empty());
}

#[test]
fn ae_ack_carries_an_err_segment_v2_5_layout() {
    let bytes = read("microsoft-fhir-converter/ORU-R01-01.hl7");
    let orig = parse_message(&bytes).expect("parses").header();
    assert_eq!(orig.version, "2.5.1");
    let mut err = AckError::new(ErrorCode::RequiredFieldMissing, "PID-3 is empty");
    err.location = Some(caregate_hl7::ErrorLocation {
        segment: SegmentId::new("PID").expect("id"),
        sequence: 1,
        field: Some(3),
    });
    let ack = build_ack(
        &orig,
        &AckParams::new(AckCode::AE, "GW-2", TS).with_error(&err),
    );
    let msg = parse_message(&ack).expect("parses");
    let errseg = msg.segment("ERR").expect("ERR");
    assert_eq!(errseg.field(1).map(|f| f.raw()), Some(&b""[..]));
    assert_eq!(errseg.field(2).expect("ERR-2").raw(), b"PID^1^3");
    assert_eq!(
        errseg.field(3).expect("ERR-3").raw(),
        b"101^Required field missing^HL70357"
    );
    assert_eq!(errseg.field(4).expect("ERR-4").text(), "E");
    assert_eq!(errseg.field(8).expect("ERR-8").text(), "PID-3 is empty");
    let received = parse_ack(&ack).expect("reads");
    assert_eq!(
        (received.code, received.control_id.as_str()),
        (AckCode::AE, orig.control_id.as_str())
    );
    assert_eq!(received.error_codes, ["101"]);
}

#[test]
fn ack_uses_the_incoming_delimiters_caret_field_separator_v2_4() {
    let bytes = read("nhapi/segmentfinder_a24.hl7");
    let orig = parse_message(&bytes).expect("parses").header();
    let err = AckError::new(
        ErrorCode::ApplicationInternalError,
        "destination down | retry",
    );
    let ack = build_ack(
        &orig,
        &AckParams::new(AckCode::AR, "GW-3", TS).with_error(&err),
    );
    let text = String::from_utf8(ack.clone()).expect("ASCII");
    assert!(
        text.starts_with(
            "MSH^~|\\&^RECEIVING^200^SENDING^200M^20250101120000+0000^^ACK~A24~ACK^GW-3^T^2.4\r"
        ),
        "{text}"
    );
    // v2.4: MSA-3 text and ERR-1 (ELD) with the code in subcomponents; the `|` in the text is
    // the repetition separator here, so it is escaped.
    assert!(
        text.contains("\rMSA^AR^2003582144^destination down \\R\\ retry\r"),
        "{text}"
    );
    assert!(
        text.ends_with("\rERR^~~~207&Application internal error&HL70357\r"),
        "{text}"
    );
    let msg = parse_message(&ack).expect("parses");
    assert_eq!(msg.delimiters(), orig.delimiters);
    assert_eq!(field_text(&msg, "MSA", 3), "destination down | retry");
    let received = parse_ack(&ack).expect("reads");
    assert_eq!(received.code, AckCode::AR);
    assert_eq!(received.control_id, "2003582144");
    assert_eq!(received.error_codes, ["207"]);
}

#[test]
fn ack_keeps_the_truncation_character_and_escapes_values() {
    let input = b"MSH|^~\\&#|APP\\S\\X|FAC|GW|GWF|1||ADT^A01^ADT_A01|C#1|P|2.8\r";
    let orig = parse_message(input).expect("parses").header();
    assert_eq!(orig.sending_application.namespace_id, "APP^X");
    let ack = build_ack(&orig, &AckParams::new(AckCode::AA, "A#1", TS));
    let text = String::from_utf8(ack.clone()).expect("ASCII");
    assert!(
        text.starts_with("MSH|^~\\&#|GW|GWF|APP\\S\\X|FAC|"),
        "{text}"
    );
    assert!(text.contains("|A\\P\\1|P|2.8\r"), "{text}");
    let back = parse_ack(&ack).expect("reads");
    assert_eq!(back.header.receiving_application.namespace_id, "APP^X");
    assert_eq!(back.header.control_id, "A#1");
    assert_eq!(back.control_id, "C#1");
}

#[test]
fn ack_for_an_unreadable_message_uses_default_delimiters() {
    let broken = b"MSH|^~|garbage";
    let parse_err = parse_message(broken).expect_err("broken");
    let err = AckError::from_parse_error(&parse_err);
    assert_eq!(err.code, ErrorCode::DataTypeError);
    let gw = HierarchicDesignator {
        namespace_id: "CAREGATE".into(),
        ..Default::default()
    };
    let mut params = AckParams::new(AckCode::AE, "GW-4", TS).with_error(&err);
    params.responder = Some((&gw, &gw));
    let ack = build_ack_unreadable(&params, "2.5");
    let text = String::from_utf8(ack.clone()).expect("ASCII");
    assert!(text.starts_with("MSH|^~\\&|CAREGATE|CAREGATE|||20250101120000+0000||ACK|GW-4|P|2.5\rMSA|AE|\rERR||MSH^1^2|102^Data type error^HL70357|E||||"), "{text}");
    assert!(!text.contains("garbage"));
    let back = parse_ack(&ack).expect("reads");
    assert_eq!((back.code, back.control_id.as_str()), (AckCode::AE, ""));
    assert_eq!(back.error_codes, ["102"]);
}

#[test]
fn parse_ack_refuses_what_is_not_an_ack() {
    let msa = SegmentId::new("MSA").expect("id");
    assert_eq!(
        parse_ack(b"MSH|^~\\&|A|B|C|D|1||ACK|1|P|2.5\r").err(),
        Some(ParseError::MissingSegment { segment: msa })
    );
    assert_eq!(
        parse_ack(b"MSH|^~\\&|A|B|C|D|1||ACK|1|P|2.5\rMSA||9\r").err(),
        Some(ParseError::MissingField {
            segment: msa,
            field: 1,
            component: None
        })
    );
    assert!(matches!(
        parse_ack(b"MSH|^~\\&|A|B|C|D|1||ACK|1|P|2.5\rMSA|OK|9\r"),
        Err(ParseError::InvalidField { field: 1, .. })
    ));
    // An hl7apy-style ACK with 5 encoding characters (v2.8) and enhanced-mode codes.
    let ack = parse_ack(b"MSH|^~\\&#|B|D|A|C|20250101||ACK^A01^ACK|9|P|2.8\rMSA|CA|MSG00001\r")
        .expect("reads");
    assert_eq!(
        (ack.code, ack.control_id.as_str()),
        (AckCode::CA, "MSG00001")
    );
    assert!(ack.code.is_accept());
    assert_eq!(ErrorCode::UnsupportedMessageType.code(), 200);
    assert_eq!(ErrorCode::SegmentSequenceError.code(), 100);
}

#[test]
fn every_test_message_gets_an_ack_in_its_own_delimiters() {
    let mut acked = 0;
    for f in common::all_message_files() {
        let bytes = read(&f);
        let Ok(batch) = caregate_hl7::parse_batch(&bytes) else {
            assert_eq!(f, "python-hl7/sample_bad_batch.hl7");
            continue;
        };
        for m in &batch.messages {
            let h = m.header();
            let err = AckError::new(ErrorCode::UnsupportedMessageType, "not routed");
            for (code, error) in [(AckCode::AA, None), (AckCode::AR, Some(&err))] {
                let mut params = AckParams::new(code, "GW", TS);
                params.error = error;
                let ack = build_ack(&h, &params);
                let back = parse_ack(&ack).unwrap_or_else(|e| panic!("{f}: {e}"));
                assert_eq!(back.code, code, "{f}");
                assert_eq!(back.control_id, h.control_id, "{f}");
                assert_eq!(back.header.delimiters, h.delimiters, "{f}");
                assert_eq!(
                    back.header.receiving_application, h.sending_application,
                    "{f}"
                );
                assert_eq!(back.header.receiving_facility, h.sending_facility, "{f}");
                assert_eq!(
                    back.header.sending_application, h.receiving_application,
                    "{f}"
                );
                assert_eq!(back.header.trigger_event, h.trigger_event, "{f}");
                assert_eq!(back.header.version, h.version, "{f}");
                let codes: Vec<String> = error
                    .map(|e| e.code.code().to_string())
                    .into_iter()
                    .collect();
                assert_eq!(back.error_codes, codes, "{f}");
            }
            acked += 1;
        }
    }
    // 24 single-message originals, the 7 of OML_O21_messages.txt, and 18 normalized copies.
    assert_eq!(acked, 24 + 7 + 18);
}
