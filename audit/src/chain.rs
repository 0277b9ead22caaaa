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
/// appended for a hand-over checkpoint and `,"key":"<id>"` when the writer's key has an id
/// (`audit.key_id`): the key this checkpoint, and the records after it up to the next
/// checkpoint, are authenticated with.
pub(crate) fn checkpoint_payload(
    records: u64,
    time: &str,
    handover: bool,
    key_id: Option<&str>,
) -> Vec<u8> {
    let mut v = serde_json::json!({ "records": records, "time": time });
    if let Some(m) = v.as_object_mut() {
        if handover {
            m.insert("handover".into(), Value::Bool(true));
        }
        if let Some(id) = key_id {
            m.insert("key".into(), Value::String(id.to_string()));
        }
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The keys an audit trail may be authenticated with: the current one and earlier ones (key
/// rotation), each with its key id (`audit.key_id`, `audit.previous_keys[].id`) when known.
///
/// A checkpoint that names a key id (`"key":"<id>"`) is checked with the key of that id (or,
/// when no key given has that id, with every key given without an id); a checkpoint without
/// one, with the key in force, then with every other key; a record, only with the key in
/// force: the key of the checkpoint before it, or, before the first checkpoint of a file,
/// whichever key given authenticates the file's first line. So the key can change only at a
/// checkpoint, and a trail that spans two keys verifies only with both.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AuditKeys {
    entries: Vec<(Option<String>, Vec<u8>)>,
}

impl AuditKeys {
    /// No keys (add some with [`AuditKeys::add`]).
    pub fn new() -> AuditKeys {
        AuditKeys::default()
    }

    /// One key without an id: what [`crate::verify`] and [`crate::verify_files`] use.
    pub fn single(key: impl AsRef<[u8]>) -> AuditKeys {
        let mut k = AuditKeys::new();
        k.add(None, key);
        k
    }

    /// Adds a key, with its id when known.
    pub fn add(&mut self, id: Option<&str>, key: impl AsRef<[u8]>) {
        self.entries
            .push((id.map(str::to_string), key.as_ref().to_vec()));
    }

    /// Parses `ID=KEY` pairs separated by white space (spaces, tabs or new lines), as
    /// `CAREGATE_AUDIT_KEYS` holds them. The id ends at the first `=`; a key holding white space
    /// cannot be given this way (use `--key-env` once per key).
    pub fn parse_pairs(spec: &str) -> Result<AuditKeys, String> {
        let mut keys = AuditKeys::new();
        for (i, pair) in spec.split_whitespace().enumerate() {
            let Some((id, key)) = pair.split_once('=') else {
                return Err(format!("entry {}: not ID=KEY", i + 1));
            };
            if !valid_key_id(id) {
                return Err(format!(
                    "entry {}: key id {id:?} must be 1 to 64 letters, digits, '.', '_' or '-'",
                    i + 1
                ));
            }
            if key.is_empty() {
                return Err(format!("entry {} ({id}): the key is empty", i + 1));
            }
            if keys.entries.iter().any(|(x, _)| x.as_deref() == Some(id)) {
                return Err(format!("entry {} ({id}): key id given twice", i + 1));
            }
            keys.add(Some(id), key);
        }
        Ok(keys)
    }

    /// Adds every key of `other`, after these.
    pub fn extend(&mut self, other: AuditKeys) {
        self.entries.extend(other.entries);
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The ids given (keys without an id are left out).
    pub fn ids(&self) -> Vec<&str> {
        self.entries
            .iter()
            .filter_map(|(i, _)| i.as_deref())
            .collect()
    }

    pub(crate) fn key(&self, i: usize) -> &[u8] {
        &self.entries[i].1
    }
}

impl std::fmt::Debug for AuditKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKeys")
            .field(
                "ids",
                &self
                    .entries
                    .iter()
                    .map(|(i, _)| i.as_deref().unwrap_or("<unnamed>"))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A key id: 1 to 64 ASCII letters, digits, `.`, `_` or `-`.
pub(crate) fn valid_key_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A line that passed [`parse_line`].
#[derive(Debug, Clone)]
pub(crate) struct ParsedLine {
    pub seq: u64,
    pub prev: String,
    pub mac: String,
    pub kind: LineKind,
    /// The key id a checkpoint names (`"key"`), if any.
    pub key_id: Option<String>,
}

/// Why a line was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LineError {
    /// Not a line of this format (the message says what is wrong).
    Malformed(String),
    /// Well-formed, but the MAC does not match (edited, or another key).
    MacMismatch,
    /// A checkpoint names a key id that no key given has, and no key given without an id
    /// authenticates it.
    UnknownKey(String),
}

/// A line split and checked for its form, not authenticated yet.
struct Unchecked {
    body: Vec<u8>,
    mac_bytes: Vec<u8>,
    mac_hex: String,
    map: serde_json::Map<String, Value>,
    member: &'static str,
    seq: u64,
    prev: String,
}

fn split_line(line: &[u8]) -> Result<Unchecked, LineError> {
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
        ["seq", "prev", "record"] => "record",
        ["seq", "prev", "checkpoint"] => "checkpoint",
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
    let prev = prev.to_string();
    Ok(Unchecked {
        body,
        mac_bytes,
        // Checked above: 64 lower-case hex digits.
        mac_hex: String::from_utf8_lossy(mac_hex).into_owned(),
        map,
        member,
        seq,
        prev,
    })
}

impl Unchecked {
    fn authentic(&self, key: &[u8]) -> bool {
        mac_matches(key, &self.prev, &self.body, &self.mac_bytes)
    }

    /// The key id the line names (checkpoints only; unauthenticated until checked).
    fn named_key(&self) -> Option<&str> {
        if self.member != "checkpoint" {
            return None;
        }
        self.map
            .get("checkpoint")
            .and_then(|c| c.get("key"))
            .and_then(Value::as_str)
    }

    /// Interprets the payload of an authenticated line.
    fn interpret(self) -> Result<ParsedLine, LineError> {
        let malformed = |m: &str| Err(LineError::Malformed(m.to_string()));
        let mut key_id = None;
        let kind = if self.member == "checkpoint" {
            let cp = self.map.get("checkpoint");
            let records = cp.and_then(|c| c.get("records")).and_then(Value::as_u64);
            let time = cp.and_then(|c| c.get("time")).and_then(Value::as_str);
            let handover = match cp.and_then(|c| c.get("handover")) {
                None => Some(false),
                Some(h) => h.as_bool(),
            };
            match cp.and_then(|c| c.get("key")) {
                None => {}
                Some(Value::String(id)) if valid_key_id(id) => key_id = Some(id.clone()),
                Some(_) => return malformed("checkpoint \"key\" is not a key id"),
            }
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
            if !self.map.get("record").is_some_and(Value::is_object) {
                return malformed("\"record\" is not an object");
            }
            LineKind::Record
        };
        Ok(ParsedLine {
            seq: self.seq,
            prev: self.prev,
            mac: self.mac_hex,
            kind,
            key_id,
        })
    }
}

/// Parses and authenticates one line (without its newline) with one key.
#[cfg(test)]
pub(crate) fn parse_line(key: &[u8], line: &[u8]) -> Result<ParsedLine, LineError> {
    let u = split_line(line)?;
    // Authenticate before interpreting the payload.
    if !u.authentic(key) {
        return Err(LineError::MacMismatch);
    }
    u.interpret()
}

/// Parses and authenticates one line (without its newline) with the right key of `keys` (see
/// [`AuditKeys`]): `in_force` is the index of the key in force (that of the checkpoint before
/// it), `None` when not known yet. Returns the line and the index of the key that
/// authenticated it: the key in force after it.
pub(crate) fn parse_line_keys(
    keys: &AuditKeys,
    line: &[u8],
    in_force: Option<usize>,
) -> Result<(ParsedLine, usize), LineError> {
    let u = split_line(line)?;
    let n = keys.entries.len();
    let found = if let Some(id) = u.named_key() {
        let named = (0..n).find(|&i| keys.entries[i].0.as_deref() == Some(id));
        match named {
            Some(i) => u.authentic(keys.key(i)).then_some(i),
            None => {
                let unnamed = (0..n)
                    .filter(|&i| keys.entries[i].0.is_none())
                    .find(|&i| u.authentic(keys.key(i)));
                if unnamed.is_none() {
                    return Err(LineError::UnknownKey(id.to_string()));
                }
                unnamed
            }
        }
    } else if u.member == "record" && in_force.is_some() {
        in_force.filter(|&i| i < n && u.authentic(keys.key(i)))
    } else {
        let order = in_force
            .into_iter()
            .chain((0..n).filter(|&i| Some(i) != in_force));
        let mut found = None;
        for i in order {
            if i < n && u.authentic(keys.key(i)) {
                found = Some(i);
                break;
            }
        }
        found
    };
    let Some(i) = found else {
        return Err(LineError::MacMismatch);
    };
    Ok((u.interpret()?, i))
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

/// Reads the anchor of `path`, authenticated with any of `keys`; `Ok(None)` when there is none.
pub(crate) fn read_anchor(keys: &AuditKeys, path: &Path) -> Result<Option<Anchor>, String> {
    let ap = anchor_path(path);
    match fs::read(&ap) {
        Ok(bytes) => {
            let mut first_err = None;
            for i in 0..keys.len() {
                match Anchor::parse(keys.key(i), &bytes) {
                    Ok(a) => return Ok(Some(a)),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            Err(format!(
                "{}: {}",
                ap.display(),
                first_err.unwrap_or_else(|| "no key to check it with".into())
            ))
        }
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
