//! The three output formats: text for people, JSON, and SARIF 2.1.0 for code scanning.

use super::rules::RULES;
use super::{Level, Report};
use serde_json::{json, Value};

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// `FILE:LINE:COL: error[rule-id] message (place)`, one line per unwaived finding, then notes
/// and a summary.
pub fn text(report: &Report, file: &str) -> String {
    let mut out = String::new();
    for f in report.findings.iter().filter(|f| f.waived.is_none()) {
        let place = if f.place.is_empty() {
            String::new()
        } else {
            format!(" ({})", f.place)
        };
        out.push_str(&format!(
            "{file}:{}:{}: {}[{}] {}{place}\n",
            f.line,
            f.column,
            f.level.as_str(),
            f.rule,
            f.message
        ));
    }
    for n in &report.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    let (e, w, s) = (
        report.count(Level::Error),
        report.count(Level::Warning),
        report.waived(),
    );
    let verdict = if report.fails() { "fails" } else { "passes" };
    out.push_str(&format!(
        "{file}: {}, {}, {} waived: lint {verdict}\n",
        plural(e, "error"),
        plural(w, "warning"),
        s
    ));
    out
}

/// `{ file, findings: [...], counts: { error, warning, waived }, notes, passed }`.
pub fn json(report: &Report, file: &str) -> String {
    let findings: Vec<Value> = report
        .findings
        .iter()
        .map(|f| {
            let mut v = json!({
                "rule": f.rule,
                "level": f.level.as_str(),
                "message": f.message,
                "place": f.place,
                "line": f.line,
                "column": f.column,
                "suppressed": f.waived.is_some(),
            });
            if let (Some(reason), Some(m)) = (&f.waived, v.as_object_mut()) {
                m.insert("justification".into(), json!(reason));
            }
            v
        })
        .collect();
    let v = json!({
        "file": file,
        "findings": findings,
        "counts": {
            "error": report.count(Level::Error),
            "warning": report.count(Level::Warning),
            "suppressed": report.waived(),
        },
        "notes": report.notes,
        "passed": !report.fails(),
    });
    format!(
        "{}\n",
        serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into())
    )
}

/// The file's URI for SARIF: a relative path as given (forward slashes), an absolute one as a
/// `file://` URI; spaces and `%` escaped.
fn artifact_uri(file: &str) -> String {
    let p = file.replace('\\', "/");
    let p = p.strip_prefix("./").unwrap_or(&p).to_string();
    let mut enc = String::with_capacity(p.len());
    for c in p.chars() {
        match c {
            ' ' => enc.push_str("%20"),
            '%' => enc.push_str("%25"),
            '#' => enc.push_str("%23"),
            '?' => enc.push_str("%3F"),
            c => enc.push(c),
        }
    }
    if enc.starts_with('/') {
        format!("file://{enc}")
    } else {
        enc
    }
}

/// A SARIF 2.1.0 log with one run of `caregate-lint`.
pub fn sarif(report: &Report, file: &str) -> String {
    let uri = artifact_uri(file);
    let rules: Vec<Value> = RULES
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "name": r.id,
                "shortDescription": { "text": r.summary },
                "help": { "text": r.help },
                "defaultConfiguration": { "level": r.default.as_str() },
            })
        })
        .collect();
    let results: Vec<Value> = report
        .findings
        .iter()
        .map(|f| {
            let mut location = json!({
                "physicalLocation": {
                    "artifactLocation": { "uri": uri, "index": 0 },
                    "region": { "startLine": f.line, "startColumn": f.column },
                },
            });
            if !f.place.is_empty() {
                if let Some(m) = location.as_object_mut() {
                    m.insert(
                        "logicalLocations".into(),
                        json!([{ "fullyQualifiedName": f.place }]),
                    );
                }
            }
            let mut v = json!({
                "ruleId": f.rule,
                "ruleIndex": RULES.iter().position(|r| r.id == f.rule).unwrap_or(0),
                "level": f.level.as_str(),
                "message": { "text": f.message },
                "locations": [location],
            });
            if let (Some(reason), Some(m)) = (&f.waived, v.as_object_mut()) {
                m.insert(
                    "suppressions".into(),
                    json!([{ "kind": "inSource", "justification": reason }]),
                );
            }
            v
        })
        .collect();
    let notifications: Vec<Value> = report
        .notes
        .iter()
        .map(|n| json!({ "level": "note", "message": { "text": n } }))
        .collect();
    let v = json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {
                "driver": {
                    "name": "caregate-lint",
                    "version": env!("CARGO_PKG_VERSION"),
                    "rules": rules,
                }
            },
            "invocations": [{
                "executionSuccessful": true,
                "toolExecutionNotifications": notifications,
            }],
            "artifacts": [{ "location": { "uri": uri } }],
            "results": results,
        }]
    });
    format!(
        "{}\n",
        serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into())
    )
}
