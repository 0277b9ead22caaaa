//! Every message in tests/data (copied from the shared HL7 v2 test material) is parsed and
//! checked against INVENTORY.tsv.

mod common;

use caregate_hl7::{
    parse_batch, parse_message, Delimiters, HierarchicDesignator, ParseError, SegmentId,
};
use common::{all_message_files, inventory, origin_of_normalized, read};

#[test]
fn every_inventory_file_parses_with_the_listed_msh_9_10_12() {
    let rows = inventory();
    assert_eq!(rows.len(), 26, "INVENTORY rows");
    let mut checked = 0;
    for row in &rows {
        let bytes = read(&row.file);
        assert_eq!(
            bytes.len(),
            row.bytes,
            "{}: size (the copy must be unmodified)",
            row.file
        );
        assert_eq!(
            bytes.starts_with(b"\xEF\xBB\xBF"),
            row.bom,
            "{}: BOM",
            row.file
        );
        match row.seg_sep.as_str() {
            "LF" => assert!(!bytes.contains(&b'\r'), "{}", row.file),
            "CR" => assert!(!bytes.contains(&b'\n'), "{}", row.file),
            "CRLF" => assert!(bytes.windows(2).any(|w| w == b"\r\n"), "{}", row.file),
            other => panic!("unknown seg_sep {other}"),
        }
        if row.msgs == 0 {
            // The negative case: checked precisely in its own test.
            assert!(parse_batch(&bytes).is_err(), "{} must be refused", row.file);
            checked += 1;
            continue;
        }
        let batch = parse_batch(&bytes).unwrap_or_else(|e| panic!("{}: {e}", row.file));
        assert_eq!(batch.messages.len(), row.msgs, "{}: messages", row.file);
        let total: usize = batch
            .messages
            .iter()
            .map(|m| m.segments().len())
            .sum::<usize>()
            + batch.envelope_segment_count();
        assert_eq!(total, row.segments, "{}: segments", row.file);

        let first = &batch.messages[0];
        let msh = first.msh().expect("MSH");
        let h = first.header();
        if row.msh9.is_empty() {
            // Only the `^`-separator file leaves them empty; checked in its own test.
            assert_eq!(row.file, "nhapi/segmentfinder_a24.hl7");
        } else {
            assert_eq!(
                msh.field(9).expect("MSH-9").raw(),
                row.msh9.as_bytes(),
                "{}: MSH-9",
                row.file
            );
            assert_eq!(
                h.message_type_string(),
                row.msh9,
                "{}: MSH-9 typed",
                row.file
            );
            assert_eq!(h.control_id, row.msh10, "{}: MSH-10", row.file);
            assert_eq!(h.version, row.msh12, "{}: MSH-12", row.file);
            assert_eq!(first.delimiters(), Delimiters::default(), "{}", row.file);
        }
        for m in &batch.messages {
            assert!(m.msh().is_some_and(|s| s.id() == "MSH"));
            // Typed views never fail on real messages.
            let _ = m.patient_identifiers();
        }
        // A single plain message also parses as one.
        if row.msgs == 1 && batch.envelope_segment_count() == 0 {
            let single = parse_message(&bytes).unwrap_or_else(|e| panic!("{}: {e}", row.file));
            assert_eq!(single.header(), h, "{}", row.file);
            assert_eq!(single.segments().len(), row.segments, "{}", row.file);
        }
        checked += 1;
    }
    assert_eq!(checked, rows.len());
}

#[test]
fn every_data_file_is_in_the_inventory_or_a_normalized_copy() {
    let rows = inventory();
    let files = all_message_files();
    assert_eq!(files.len(), 26 + 18);
    for f in &files {
        if f.starts_with("normalized-cr/") {
            assert!(origin_of_normalized(f).is_some(), "{f}: no origin");
        } else {
            assert!(
                rows.iter().any(|r| &r.file == f),
                "{f}: not in INVENTORY.tsv"
            );
        }
    }
}

#[test]
fn normalized_cr_copies_parse_identically_to_their_originals() {
    let mut compared = 0;
    for f in all_message_files()
        .into_iter()
        .filter(|f| f.starts_with("normalized-cr/"))
    {
        let origin = origin_of_normalized(&f).expect("origin");
        let (a_bytes, b_bytes) = (read(&origin), read(&f));
        assert!(
            !b_bytes.contains(&b'\n') && !b_bytes.starts_with(b"\xEF\xBB\xBF"),
            "{f}"
        );
        let a = parse_message(&a_bytes).unwrap_or_else(|e| panic!("{origin}: {e}"));
        let b = parse_message(&b_bytes).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(a.header(), b.header(), "{f}");
        assert_eq!(a.patient_identifiers(), b.patient_identifiers(), "{f}");
        let raw = |m: &caregate_hl7::Message<'_>| {
            m.segments()
                .iter()
                .map(|s| s.raw().to_vec())
                .collect::<Vec<_>>()
        };
        assert_eq!(raw(&a), raw(&b), "{f}");
        // The normalized copy is exactly the CR form of the original.
        assert_eq!(a.to_cr_bytes(), b_bytes, "{f}");
        assert_eq!(b.raw(), &b_bytes[..b_bytes.len() - 1], "{f}");
        compared += 1;
    }
    assert_eq!(compared, 18);
}

#[test]
fn segmentfinder_a24_with_caret_as_field_separator() {
    let bytes = read("nhapi/segmentfinder_a24.hl7");
    let msg = parse_message(&bytes).expect("parses");
    let d = msg.delimiters();
    assert_eq!(
        d,
        Delimiters {
            field: b'^',
            component: b'~',
            repetition: b'|',
            escape: b'\\',
            subcomponent: b'&',
            truncation: None
        }
    );
    let msh = msg.msh().expect("MSH");
    assert_eq!(msh.field(1).expect("MSH-1").raw(), b"^");
    assert_eq!(msh.field(2).expect("MSH-2").raw(), b"~|\\&");
    assert_eq!(msh.field(9).expect("MSH-9").raw(), b"ADT~A24");
    let h = msg.header();
    assert_eq!(h.message_type, "ADT");
    assert_eq!(h.trigger_event, "A24");
    assert_eq!(h.message_structure, None);
    assert_eq!(h.message_type_string(), "ADT^A24");
    assert_eq!(h.control_id, "2003582144");
    assert_eq!(h.version, "2.4");
    assert_eq!(h.processing_id, "T");
    assert_eq!(h.sending_application.namespace_id, "SENDING");
    assert_eq!(h.sending_facility.namespace_id, "200M");
    assert_eq!(h.receiving_application.namespace_id, "RECEIVING");
    assert_eq!(h.receiving_facility.namespace_id, "200");
    assert_eq!(h.date_time, "20120918173931-0500");
    assert_eq!(h.accept_ack_type.as_deref(), Some("AL"));
    assert_eq!(h.application_ack_type.as_deref(), Some("AL"));
    assert_eq!(msg.segments().len(), 4);

    // PID-3 `11111~~~FOO&&0363~NI~FACILITY ID&200M&L` in both PID segments (A24 links two).
    let ids = msg.patient_identifiers();
    assert_eq!(ids.len(), 2);
    for ((id, seg), value) in ids.iter().zip([2, 3]).zip(["11111", "22222"]) {
        assert_eq!(id.id, value);
        assert_eq!(
            id.assigning_authority,
            HierarchicDesignator {
                namespace_id: "FOO".into(),
                universal_id: String::new(),
                universal_id_type: "0363".into()
            }
        );
        assert_eq!(id.identifier_type_code, "NI");
        assert_eq!(id.segment_index, seg);
    }
    // CX-6 is an HD in subcomponents.
    let pid = msg.segment("PID").expect("PID");
    let cx6 = pid.field(3).and_then(|f| f.component(6)).expect("PID-3.6");
    assert_eq!(
        cx6.subcomponent(1).map(|v| v.text()).as_deref(),
        Some("FACILITY ID")
    );
    assert_eq!(cx6.subcomponent(3).map(|v| v.text()).as_deref(), Some("L"));
    assert_eq!(
        pid.field(5)
            .and_then(|f| f.component(2))
            .map(|v| v.text())
            .as_deref(),
        Some("JOHN")
    );
}

#[test]
fn oml_o21_file_holds_seven_messages() {
    let bytes = read("nhapi/OML_O21_messages.txt");
    let batch = parse_batch(&bytes).expect("parses");
    assert_eq!(batch.messages.len(), 7);
    assert_eq!(batch.envelope_segment_count(), 0);
    let ids: Vec<String> = batch
        .messages
        .iter()
        .map(|m| m.header().control_id)
        .collect();
    assert_eq!(
        ids,
        ["msgOP123", "msgOF102", "msgOP124", "msgOF109", "", "msgOF101", ""]
    );
    let versions: Vec<String> = batch.messages.iter().map(|m| m.header().version).collect();
    assert_eq!(
        versions,
        ["2.5.1", "2.5.1", "2.5.1", "2.5.1", "2.5", "2.5", "2.5"]
    );
    for m in &batch.messages {
        let h = m.header();
        assert_eq!(
            (h.message_type.as_str(), h.trigger_event.as_str()),
            ("OML", "O21")
        );
    }
    // Messages 5 and 7 lack MSH-10: readable, but not valid.
    assert_eq!(
        batch.messages[4].header().validate(),
        Err(ParseError::MissingField {
            segment: SegmentId::new("MSH").expect("id"),
            field: 10,
            component: None
        })
    );
    assert_eq!(batch.messages[0].header().validate(), Ok(()));
    // Non-ASCII text (UTF-8) survives.
    let pid = batch.messages[4].segment("PID").expect("PID");
    assert!(pid.field(5).expect("PID-5").text().contains("SEBASTIÁN"));
    // As a single message it is refused at the second MSH.
    assert!(matches!(
        parse_message(&bytes),
        Err(ParseError::MultipleMessages {
            segment_index: 10,
            ..
        })
    ));
}

#[test]
fn sample_bad_batch_is_refused_with_a_precise_error() {
    let bytes = read("python-hl7/sample_bad_batch.hl7");
    let err = parse_batch(&bytes).expect_err("a batch without MSH");
    let evn_offset = bytes.windows(4).position(|w| w == b"\rEVN").expect("EVN") + 1;
    assert_eq!(
        err,
        ParseError::BatchWithoutMessageHeader {
            batch_segment_index: 0,
            segment_index: 1,
            segment: SegmentId::new("EVN").expect("id"),
            offset: evn_offset,
        }
    );
    let text = err.to_string();
    assert!(
        text.contains("EVN") && text.contains("BHS") && text.contains("segment 1"),
        "{text}"
    );
    assert!(
        !text.contains("RICHMOND") && !text.contains("0000112234"),
        "no content in errors: {text}"
    );
    assert!(matches!(
        parse_message(&bytes),
        Err(ParseError::UnexpectedEnvelope {
            segment_index: 0,
            ..
        })
    ));
}

#[test]
fn sample_file_and_batch_envelopes() {
    let bytes = read("python-hl7/sample_file.hl7");
    let b = parse_batch(&bytes).expect("parses");
    assert_eq!(
        b.file_header.map(|s| s.name().to_string()).as_deref(),
        Some("FHS")
    );
    assert_eq!(
        b.file_trailer.map(|s| s.name().to_string()).as_deref(),
        Some("FTS")
    );
    assert_eq!(
        (
            b.batch_headers.len(),
            b.batch_trailers.len(),
            b.messages.len()
        ),
        (1, 1, 1)
    );
    let fhs = b.file_header.expect("FHS");
    assert_eq!(fhs.field(1).expect("FHS-1").raw(), b"|");
    assert_eq!(fhs.field(2).expect("FHS-2").raw(), b"^~\\&");
    assert_eq!(fhs.field(4).expect("FHS-4").text(), "ABCHS");
    assert_eq!(b.batch_trailers[0].field(1).expect("BTS-1").text(), "1");
    let h = b.messages[0].header();
    assert_eq!(h.message_type_string(), "ADT^A04^ADT_A01");
    assert_eq!(h.sending_facility.namespace_id, "ABCHS");
    assert_eq!(b.messages[0].segments().len(), 6);
    assert!(matches!(
        parse_message(&bytes),
        Err(ParseError::UnexpectedEnvelope {
            segment_index: 0,
            ..
        })
    ));

    let batch = read("python-hl7/sample_batch.hl7");
    let b = parse_batch(&batch).expect("parses");
    assert!(b.file_header.is_none());
    assert_eq!(
        (
            b.batch_headers.len(),
            b.batch_trailers.len(),
            b.messages.len()
        ),
        (1, 1, 1)
    );
}

#[test]
fn pid_3_repetitions_and_bom_offsets() {
    let bytes = read("nhapi/adt_a03.txt");
    let msg = parse_message(&bytes).expect("parses");
    let ids: Vec<(String, String, String)> = msg
        .patient_identifiers()
        .into_iter()
        .map(|i| {
            (
                i.id,
                i.assigning_authority.namespace_id,
                i.identifier_type_code,
            )
        })
        .collect();
    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        ids,
        [
            s("5520255", "PK", "PK"),
            s("ZZZZZZ83M64Z148R", "CF", "CF"),
            s("ZZZZZZ83M64Z148R", "SSN", "SSN"),
            s("", "", "TEAM")
        ]
    );

    let bytes = read("microsoft-fhir-converter/ADT01-23.hl7");
    let msg = parse_message(&bytes).expect("parses");
    assert_eq!(
        msg.msh().map(|s| s.offset()),
        Some(3),
        "the BOM is skipped, offsets count it"
    );
    let ids = msg.patient_identifiers();
    assert_eq!(ids.len(), 1);
    assert_eq!(
        (ids[0].id.as_str(), ids[0].identifier_type_code.as_str()),
        ("10006579", "MR")
    );
    assert_eq!(ids[0].assigning_authority.namespace_id, "1");

    let bytes = read("python-hl7/sample_msh.hl7");
    let msg = parse_message(&bytes).expect("parses");
    let h = msg.header();
    assert_eq!(h.sending_application.namespace_id, "HNAM_PM");
    assert_eq!(h.sending_facility.namespace_id, "HNA500");
    assert_eq!(h.receiving_application.namespace_id, "AIG");
    assert!(h.receiving_facility.is_empty());
    let ids = msg.patient_identifiers();
    assert_eq!(ids.len(), 2);
    assert_eq!(
        (
            ids[0].id.as_str(),
            ids[0].assigning_authority.namespace_id.as_str()
        ),
        ("2148790", "MSH_MRN")
    );
    assert_eq!(
        (ids[1].id.as_str(), ids[1].identifier_type_code.as_str()),
        ("162840", "CM")
    );
    // PID-4 repeats: 3 repetitions.
    let pid = msg.segment("PID").expect("PID");
    assert_eq!(pid.field(4).expect("PID-4").repetitions().count(), 3);
}
