//! Helpers shared by the integration tests: the test messages and their inventory.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

pub fn read(rel: &str) -> Vec<u8> {
    let path = data_dir().join(rel);
    fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// One row of INVENTORY.tsv.
#[derive(Debug, Clone)]
pub struct Row {
    pub file: String,
    pub bytes: usize,
    pub bom: bool,
    pub seg_sep: String,
    pub msgs: usize,
    pub msh9: String,
    pub msh10: String,
    pub msh12: String,
    pub segments: usize,
}

pub fn inventory() -> Vec<Row> {
    let text = String::from_utf8(read("INVENTORY.tsv")).expect("INVENTORY.tsv is UTF-8");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header line").split('\t').collect();
    assert_eq!(
        header,
        [
            "file",
            "bytes",
            "BOM",
            "seg_sep",
            "msgs",
            "MSH-9",
            "MSH-10",
            "MSH-12",
            "segments",
            "python-hl7_parse"
        ]
    );
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let c: Vec<&str> = line.split('\t').collect();
            assert_eq!(c.len(), 10, "columns in {line:?}");
            Row {
                file: c[0].to_string(),
                bytes: c[1].parse().expect("bytes"),
                bom: c[2] == "True",
                seg_sep: c[3].to_string(),
                msgs: c[4].parse().expect("msgs"),
                msh9: c[5].to_string(),
                msh10: c[6].to_string(),
                msh12: c[7].to_string(),
                segments: c[8].parse().expect("segments"),
            }
        })
        .collect()
}

/// Every message file under tests/data (relative paths), originals and normalized copies.
pub fn all_message_files() -> Vec<String> {
    let mut out = Vec::new();
    for dir in [
        "microsoft-fhir-converter",
        "nhapi",
        "python-hl7",
        "normalized-cr",
    ] {
        let mut names: Vec<String> = fs::read_dir(data_dir().join(dir))
            .expect("data folder")
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|n| n.ends_with(".hl7") || n.ends_with(".txt"))
            .collect();
        names.sort();
        out.extend(names.into_iter().map(|n| format!("{dir}/{n}")));
    }
    out
}

/// The original (INVENTORY) file a normalized-cr copy was derived from.
pub fn origin_of_normalized(name: &str) -> Option<String> {
    let base = name.strip_prefix("normalized-cr/")?;
    let (folder, file) = base.split_once("__")?;
    let stem = file.rsplit_once('.').map_or(file, |(s, _)| s);
    inventory()
        .into_iter()
        .map(|r| r.file)
        .find(|f| f.starts_with(&format!("{folder}/{stem}.")))
}
