//! The line format of the chain: building, parsing and authenticating lines and anchors.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// `,"mac":"` + 64 hex digits + `"}`.
const MAC_SUFFIX_LEN: usize = 8 + 64 + 2;
const MAC_PREFIX: &[u8] = b",\"mac\":\"";
/// Domain separation for the anchor's own MAC.
const ANCHOR_DOMAIN: &[u8] = b"caregate-audit-anchor\n";

/// A keyed HMAC-SHA256 of `prev` (ASCII hex, possibly empty) followed by `body`.
/// Computed with aws-lc (assembly SHA-256: this runs for every record the writer commits);
/// [`mac_matches`] checks with the portable `hmac` crate, so the two implementations check
/// each other in every test that writes and verifies a chain.
pub(crate) fn line_mac(key: &[u8], prev: &str, body: &[u8]) -> [u8; 32] {
    use aws_lc_rs::hmac;
    let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key));
    ctx.update(prev.as_bytes());
    ctx.update(body);
    let tag = ctx.sign();
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

fn mac_matches(key: &[u8], prev: &str, body: &[u8], expected: &[u8]) -> bool {
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
        return false;
    };
    mac.update(prev.as_bytes());
    mac.update(body);
    mac.verify_slice(expected).is_ok()
}

/// What a line carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LineKind {
    Record,
    /// `handover`: the checkpoint a process wrote when it handed the file over to its
    /// successor (`"handover":true`); a later file may continue the chain from it.
    Checkpoint {
        records: u64,
        time: String,
        handover: bool,
    },
}

/// Builds one line (with its trailing newline) and returns it with its MAC (hex).
///
/// The body is `{"seq":N,"prev":"<hex>","<member>":<payload>}` — exactly what serde_json
/// writes for that object — and the line is the body with `,"mac":"<hex>"` inserted before the
/// closing brace. `payload` must be compact JSON (as serde_json writes it).
pub fn build_line(
    key: &[u8],
    seq: u64,
    prev: &str,
    member: &str,
    payload: &[u8],
) -> (Vec<u8>, String) {
    let mut body = Vec::with_capacity(payload.len() + 120);
    body.extend_from_slice(b"{\"seq\":");
    body.extend_from_slice(seq.to_string().as_bytes());
    body.extend_from_slice(b",\"prev\":\"");
    body.extend_from_slice(prev.as_bytes());
    body.extend_from_slice(b"\",\"");
    body.extend_from_slice(member.as_bytes());
    body.extend_from_slice(b"\":");
    body.extend_from_slice(payload);
    body.push(b'}');
    let mac = hex::encode(line_mac(key, prev, &body));
    body.pop();
    body.extend_from_slice(MAC_PREFIX);
    body.extend_from_slice(mac.as_bytes());
    body.extend_from_slice(b"\"}\n");
    (body, mac)
}

/// The payload of a checkpoint line: `{"records":N,"time":"..."}`, with `,"handover":true`
/// appended for a hand-over checkpoint.
pub(crate) fn checkpoint_payload(records: u64, time: &str, handover: bool) -> Vec<u8> {
    let v = if handover {
        serde_json::json!({ "records": records, "time": time, "handover": true })
    } else {
        serde_json::json!({ "records": records, "time": time })
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// A line that passed [`parse_line`].
#[derive(Debug, Clone)]
pub(crate) struct ParsedLine {
    pub seq: u64,
    pub prev: String,
    pub mac: String,
    pub kind: LineKind,
}

/// Why a line was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LineError {
    /// Not a line of this format (the message says what is wrong).
    Malformed(String),
    /// Well-formed, but the MAC does not match (edited, or another key).
    MacMismatch,
}

/// Parses and authenticates one line (without its newline).
pub(crate) fn parse_line(key: &[u8], line: &[u8]) -> Result<ParsedLine, LineError> {
    let malformed = |m: &str| Err(LineError::Malformed(m.to_string()));
    if line.len() < MAC_SUFFIX_LEN + 2 || !line.ends_with(b"\"}") {
        return malformed("not an audit line (no trailing \"mac\")");
    }
    let split = line.len() - MAC_SUFFIX_LEN;
    if &line[split..split + MAC_PREFIX.len()] != MAC_PREFIX {
        return malformed("not an audit line (\"mac\" is not the last member)");
    }
    let mac_hex = &line[split + MAC_PREFIX.len()..line.len() - 2];
    if !mac_hex
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    {
        return malformed("\"mac\" is not 64 lower-case hex digits");
    }
    let Ok(mac_bytes) = hex::decode(mac_hex) else {
        return malformed("\"mac\" is not hex");
    };
    let mut body = Vec::with_capacity(split + 1);
    body.extend_from_slice(&line[..split]);
    body.push(b'}');
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return Err(LineError::Malformed(format!("not valid JSON: {e}"))),
    };
    let Value::Object(map) = value else {
        return malformed("not a JSON object");
    };
    let keys: Vec<&str> = map.keys().map(String::as_str).collect();
    let member = match keys.as_slice() {
        ["seq", "prev", m] if *m == "record" || *m == "checkpoint" => *m,
        _ => {
            return Err(LineError::Malformed(format!(
                "members must be seq, prev, record|checkpoint, mac in that order; found {keys:?}"
            )))
        }
    };
    let Some(seq) = map.get("seq").and_then(Value::as_u64) else {
        return malformed("\"seq\" is not an unsigned integer");
    };
    if seq == 0 {
        return malformed("\"seq\" starts at 1");
    }
    let Some(prev) = map.get("prev").and_then(Value::as_str) else {
        return malformed("\"prev\" is not a string");
    };
    if !(prev.is_empty() || is_mac_hex(prev)) {
        return malformed("\"prev\" is neither empty nor 64 lower-case hex digits");
    }
    // Authenticate before interpreting the payload.
    if !mac_matches(key, prev, &body, &mac_bytes) {
        return Err(LineError::MacMismatch);
    }
    let kind = if member == "checkpoint" {
        let cp = map.get("checkpoint");
        let records = cp.and_then(|c| c.get("records")).and_then(Value::as_u64);
        let time = cp.and_then(|c| c.get("time")).and_then(Value::as_str);
        let handover = match cp.and_then(|c| c.get("handover")) {
            None => Some(false),
            Some(h) => h.as_bool(),
        };
        match (records, time, handover) {
            (Some(records), Some(time), Some(handover)) => LineKind::Checkpoint {
                records,
                time: time.to_string(),
                handover,
            },
            _ => {
                return malformed(
                    "checkpoint must be {\"records\": N, \"time\": \"...\"} with an optional \"handover\": true",
                )
            }
        }
    } else {
        if !map.get("record").is_some_and(Value::is_object) {
            return malformed("\"record\" is not an object");
        }
        LineKind::Record
    };
    Ok(ParsedLine {
        seq,
        prev: prev.to_string(),
        // Checked above: 64 lower-case hex digits.
        mac: String::from_utf8_lossy(mac_hex).into_owned(),
        kind,
    })
}

pub(crate) fn is_mac_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `<path><suffix>`, e.g. `audit.jsonl` + `.anchor`.
pub(crate) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// The anchor file of `path`: `<path>.anchor`.
pub fn anchor_path(path: &Path) -> PathBuf {
    sibling(path, ".anchor")
}

/// The content of an anchor file: the last checkpoint written to a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The checkpoint's sequence number.
    pub seq: u64,
    /// The checkpoint line's MAC (hex).
    pub mac: String,
    /// The file the checkpoint was written to (as configured; informational).
    pub file: String,
    /// Records in the chain up to the checkpoint.
    pub records: u64,
    /// When the anchor was written.
    pub time: String,
}

impl Anchor {
    /// `{"seq":..,"mac":"..","file":"..","records":..,"time":"..","anchor_mac":".."}` with a
    /// trailing newline; `anchor_mac` = HMAC-SHA256(key, "caregate-audit-anchor\n" || the same
    /// object without `anchor_mac`).
    pub(crate) fn to_bytes(&self, key: &[u8]) -> Vec<u8> {
        let body = serde_json::json!({
            "seq": self.seq,
            "mac": self.mac,
            "file": self.file,
            "records": self.records,
            "time": self.time,
        });
        let mut body = serde_json::to_vec(&body).unwrap_or_default();
        let mac = hex::encode(line_mac(key, "", &[ANCHOR_DOMAIN, &body].concat()));
        body.pop();
        body.extend_from_slice(b",\"anchor_mac\":\"");
        body.extend_from_slice(mac.as_bytes());
        body.extend_from_slice(b"\"}\n");
        body
    }

    /// Parses and authenticates an anchor file's content.
    pub(crate) fn parse(key: &[u8], bytes: &[u8]) -> Result<Anchor, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
        let text = text.trim_end_matches('\n');
        let suffix_len = ",\"anchor_mac\":\"".len() + 64 + 2;
        if text.len() < suffix_len + 2 || !text.ends_with("\"}") {
            return Err("not an anchor (no trailing \"anchor_mac\")".into());
        }
        let split = text.len() - suffix_len;
        if !text.is_char_boundary(split) {
            return Err("not an anchor (\"anchor_mac\" is not the last member)".into());
        }
        let (head, tail) = text.split_at(split);
        let Some(mac_hex) = tail
            .strip_prefix(",\"anchor_mac\":\"")
            .and_then(|t| t.strip_suffix("\"}"))
        else {
            return Err("not an anchor (\"anchor_mac\" is not the last member)".into());
        };
        let Ok(mac_bytes) = hex::decode(mac_hex) else {
            return Err("\"anchor_mac\" is not hex".into());
        };
        let body = format!("{head}}}");
        let signed = [ANCHOR_DOMAIN, body.as_bytes()].concat();
        if !mac_matches(key, "", &signed, &mac_bytes) {
            return Err("anchor_mac does not match (edited anchor, or another key)".into());
        }
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("not valid JSON: {e}"))?;
        let seq = v.get("seq").and_then(Value::as_u64);
        let mac = v.get("mac").and_then(Value::as_str);
        let file = v.get("file").and_then(Value::as_str);
        let records = v.get("records").and_then(Value::as_u64);
        let time = v.get("time").and_then(Value::as_str);
        match (seq, mac, file, records, time) {
            (Some(seq), Some(mac), Some(file), Some(records), Some(time)) if is_mac_hex(mac) => {
                Ok(Anchor {
                    seq,
                    mac: mac.to_string(),
                    file: file.to_string(),
                    records,
                    time: time.to_string(),
                })
            }
            _ => Err("anchor must hold seq, mac (hex), file, records and time".into()),
        }
    }
}

/// Reads the anchor of `path`; `Ok(None)` when there is none.
pub(crate) fn read_anchor(key: &[u8], path: &Path) -> Result<Option<Anchor>, String> {
    let ap = anchor_path(path);
    match fs::read(&ap) {
        Ok(bytes) => Anchor::parse(key, &bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", ap.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", ap.display())),
    }
}

/// Writes the anchor of `path` atomically: temp file, (fsync), rename, (fsync the directory).
pub(crate) fn write_anchor(
    key: &[u8],
    path: &Path,
    anchor: &Anchor,
    sync: bool,
) -> std::io::Result<()> {
    let ap = anchor_path(path);
    let tmp = sibling(path, ".anchor.tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&anchor.to_bytes(key))?;
        if sync {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, &ap)?;
    if sync {
        sync_dir(path)?;
    }
    Ok(())
}

/// fsyncs the directory holding `path` (so a create or rename in it is durable).
pub(crate) fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn line_mac_is_hmac_sha256_and_agrees_with_the_checker() {
        // RFC 4231, test case 2 (the data split between `prev` and `body`).
        let mac = line_mac(b"Jefe", "what do ya want ", b"for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(mac_matches(
            b"Jefe",
            "what do ya want ",
            b"for nothing?",
            &mac
        ));
        assert!(!mac_matches(
            b"Jefe",
            "what do ya want",
            b" for nothing?!",
            &mac
        ));
    }

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn built_lines_parse_and_match_serde_json() {
        let payload = br#"{"a":"x\"y","b":[1,2]}"#;
        let (line, mac) = build_line(KEY, 7, "", "record", payload);
        assert!(line.ends_with(b"\"}\n"));
        let body: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(body["seq"], 7);
        assert_eq!(body["mac"], mac.as_str());
        // The MAC'd body is exactly serde_json's rendering of the object without "mac".
        let mut without = body.clone();
        without.as_object_mut().unwrap().remove("mac");
        let canonical = serde_json::to_vec(&without).unwrap();
        assert_eq!(hex::encode(line_mac(KEY, "", &canonical)), mac);
        let p = parse_line(KEY, &line[..line.len() - 1]).unwrap();
        assert_eq!((p.seq, p.kind), (7, LineKind::Record));
        assert_eq!(
            parse_line(b"another key, also 32 bytes long!", &line[..line.len() - 1]).unwrap_err(),
            LineError::MacMismatch
        );
    }

    #[test]
    fn anchors_round_trip_and_detect_edits() {
        let a = Anchor {
            seq: 12,
            mac: "ab".repeat(32),
            file: "/x/audit.jsonl".into(),
            records: 10,
            time: "2024-05-01T12:00:00.000Z".into(),
        };
        let bytes = a.to_bytes(KEY);
        assert_eq!(Anchor::parse(KEY, &bytes).unwrap(), a);
        let edited = String::from_utf8(bytes)
            .unwrap()
            .replace("\"seq\":12", "\"seq\":11");
        assert!(Anchor::parse(KEY, edited.as_bytes()).is_err());
        // Garbage never panics.
        for junk in [
            "",
            "{}",
            "é".repeat(60).as_str(),
            "\u{1F600}".repeat(30).as_str(),
        ] {
            assert!(Anchor::parse(KEY, junk.as_bytes()).is_err());
        }
        let mut near = "x".repeat(10);
        near.push_str(&"é".repeat(50));
        near.push_str("\"}");
        assert!(Anchor::parse(KEY, near.as_bytes()).is_err());
    }
}
