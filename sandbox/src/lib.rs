//! `caregate-sandbox`: the request logic of a small in-memory FHIR R4
//! server, used as caregate's demo backend and in tests.
//!
//! There is no networking here: the gateway turns an HTTP request into a
//! [`SandboxRequest`], calls [`Sandbox::handle`] and writes the
//! [`SandboxResponse`] back. Like a FHIR server sitting behind a gateway,
//! the sandbox performs **no access control**.
//!
//! Supported (JSON only, FHIR R4 4.0.1):
//! - `GET /metadata` (CapabilityStatement);
//! - read, vread, instance history, create, update (also update-as-create),
//!   delete (reads of deleted resources give 410);
//! - `PATCH /Type/id` with an RFC 6902 JSON Patch body
//!   (`application/json-patch+json`; FHIRPath Patch is not supported);
//! - `If-Match` preconditions on update, patch and delete (412 when the
//!   resource's current ETag differs or the resource does not exist);
//! - search on a type (`GET /Type?...`, `POST /Type/_search` with a form
//!   body) with `_id`, `patient`, `subject`, `encounter`, `code`,
//!   `category`, `status`, `identifier`, `_tag`, `_lastUpdated`, a few
//!   Patient parameters (`name`, `family`, `given`, `gender`, `birthdate`),
//!   `_count`/`_offset` paging, `_include`, `_revinclude`, `_summary=count`;
//!   unknown parameters are rejected with 400;
//! - Patient compartment search `GET /Patient/{id}/{Type}`;
//! - `GET /Patient/{id}/$everything`;
//! - `POST /` with a `batch` or `transaction` Bundle (transactions are
//!   all-or-nothing and resolve `urn:uuid:` fullUrls).
//!
//! Every error is an `OperationOutcome`; no input makes the sandbox panic.

mod batch;
mod capability;
mod outcome;
mod params;
mod query;
mod search;
mod store;
mod types;

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde_json::{json, Value};

use crate::outcome::{outcome, Fail};
use crate::store::Store;
use crate::types::{is_r4_type, looks_like_type, now_instant, valid_id};

/// The content type of every sandbox response.
pub const FHIR_JSON: &str = "application/fhir+json";

/// One request, as seen after the gateway stripped the FHIR base path.
#[derive(Debug, Clone, Copy)]
pub struct SandboxRequest<'a> {
    /// HTTP method (`GET`, `POST`, `PUT`, `DELETE`, `HEAD`, ...).
    pub method: &'a str,
    /// What follows the base path: `"/Patient/123"`, `"/Observation"`,
    /// `"/"` or `""`.
    pub path: &'a str,
    /// Raw query string without `?` (possibly empty), still percent-encoded.
    pub query: &'a str,
    /// Raw request body.
    pub body: &'a [u8],
    /// The request's `Content-Type` header, if any.
    pub content_type: Option<&'a str>,
    /// The request's `If-Match` header, if any (e.g. `W/"3"`): a
    /// precondition for `PUT`, `PATCH` and `DELETE` on an instance, which
    /// only proceed when it names the resource's current ETag (`"3"` is
    /// accepted for `W/"3"`). Ignored elsewhere.
    pub if_match: Option<&'a str>,
}

/// The response to send back.
#[derive(Debug, Clone)]
pub struct SandboxResponse {
    /// HTTP status code.
    pub status: u16,
    /// Always [`FHIR_JSON`].
    pub content_type: &'static str,
    /// JSON body (a resource, a Bundle or an OperationOutcome); empty for
    /// `HEAD`.
    pub body: Vec<u8>,
    /// `Location` header (create/update): `{base}/Type/id/_history/N`.
    pub location: Option<String>,
    /// `ETag` header, e.g. `W/"3"`, on reads and writes of one resource.
    pub etag: Option<String>,
}

/// Internal result of one interaction, before serialization.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: u16,
    pub body: Option<Value>,
    pub location: Option<String>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

impl Reply {
    fn ok(body: Value) -> Reply {
        Reply {
            status: 200,
            body: Some(body),
            location: None,
            etag: None,
            last_modified: None,
        }
    }
}

/// A parsed request path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Route<'a> {
    /// `/` (batch/transaction).
    System,
    Metadata,
    Type(&'a str),
    TypeSearch(&'a str),
    Instance(&'a str, &'a str),
    InstanceHistory(&'a str, &'a str),
    Version(&'a str, &'a str, &'a str),
    Everything(&'a str),
    /// `/Patient/{id}/{Type}`.
    Compartment(&'a str, &'a str),
}

fn type_segment(t: &str) -> Result<&str, Fail> {
    if t.starts_with('_') || t.starts_with('$') {
        Err(Fail::not_supported(format!("'{t}' is not supported here")))
    } else if looks_like_type(t) {
        Ok(t)
    } else {
        Err(Fail::bad_request(format!(
            "'{t}' is not a valid resource type"
        )))
    }
}

fn id_segment(id: &str) -> Result<&str, Fail> {
    if valid_id(id) {
        Ok(id)
    } else {
        Err(Fail::bad_request(format!("'{id}' is not a valid FHIR id")))
    }
}

impl<'a> Route<'a> {
    /// Parses a path relative to the base (leading/trailing `/` optional).
    pub fn parse(path: &'a str) -> Result<Route<'a>, Fail> {
        let p = path.trim_start_matches('/');
        let p = p.strip_suffix('/').unwrap_or(p);
        if p.is_empty() {
            return Ok(Route::System);
        }
        let segs: Vec<&str> = p.split('/').collect();
        Ok(match segs.as_slice() {
            ["metadata"] => Route::Metadata,
            [t] => Route::Type(type_segment(t)?),
            [t, "_search"] => Route::TypeSearch(type_segment(t)?),
            [t, op] if op.starts_with('_') || op.starts_with('$') => {
                type_segment(t)?;
                return Err(Fail::not_supported(format!("'{t}/{op}' is not supported")));
            }
            [t, id] => Route::Instance(type_segment(t)?, id_segment(id)?),
            [t, id, "_history"] => Route::InstanceHistory(type_segment(t)?, id_segment(id)?),
            [t, id, "_history", v] => Route::Version(type_segment(t)?, id_segment(id)?, v),
            ["Patient", id, "$everything"] => Route::Everything(id_segment(id)?),
            ["Patient", id, t] if !t.starts_with('$') => {
                Route::Compartment(id_segment(id)?, type_segment(t)?)
            }
            [t, id, x] => {
                type_segment(t)?;
                id_segment(id)?;
                return Err(Fail::not_supported(format!(
                    "'{x}' on {t}/{id} is not supported (only the Patient compartment and Patient $everything are)"
                )));
            }
            _ => return Err(Fail::not_found(format!("unknown path '{path}'"))),
        })
    }
}

/// Whether an interaction reads or writes the store.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Access {
    Read,
    Write,
    Batch,
}

/// Which access `method` on `route` needs; 405 if the method is not
/// supported there.
pub(crate) fn classify(method: &str, route: &Route<'_>) -> Result<Access, Fail> {
    use Access::*;
    let access = match (route, method) {
        (Route::System, "POST") => Batch,
        (Route::System, "GET") => {
            return Err(Fail::not_supported(
                "system-level search is not supported; search a resource type",
            ))
        }
        (Route::Metadata, "GET") => Read,
        (Route::Type(_), "GET") => Read,
        (Route::Type(_), "POST") => Write,
        (Route::TypeSearch(_), "GET" | "POST") => Read,
        (Route::Instance(..), "GET") => Read,
        (Route::Instance(..), "PUT" | "PATCH" | "DELETE") => Write,
        (Route::InstanceHistory(..) | Route::Version(..), "GET") => Read,
        (Route::Everything(_) | Route::Compartment(..), "GET") => Read,
        _ => {
            let path = match route {
                Route::System => "/".to_string(),
                Route::Metadata => "/metadata".to_string(),
                Route::Type(t) => format!("/{t}"),
                Route::TypeSearch(t) => format!("/{t}/_search"),
                Route::Instance(t, id) => format!("/{t}/{id}"),
                Route::InstanceHistory(t, id) => format!("/{t}/{id}/_history"),
                Route::Version(t, id, v) => format!("/{t}/{id}/_history/{v}"),
                Route::Everything(id) => format!("/Patient/{id}/$everything"),
                Route::Compartment(id, t) => format!("/Patient/{id}/{t}"),
            };
            return Err(Fail::method_not_allowed(method, &path));
        }
    };
    Ok(access)
}

/// The media type part of a Content-Type header, lower-cased.
fn mime(ct: &str) -> String {
    ct.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Parses a JSON resource body (a JSON object).
fn json_body(req: &SandboxRequest<'_>) -> Result<Value, Fail> {
    if let Some(ct) = req.content_type {
        let m = mime(ct);
        let json_like = m.is_empty()
            || matches!(
                m.as_str(),
                "application/fhir+json"
                    | "application/json"
                    | "application/json+fhir"
                    | "text/json"
            );
        if !json_like {
            return Err(Fail::new(
                415,
                "not-supported",
                format!("unsupported content type '{ct}': only FHIR JSON is supported"),
            ));
        }
    }
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Err(Fail::bad_request("the request body is empty"));
    }
    let v: Value = serde_json::from_slice(req.body)
        .map_err(|e| Fail::new(400, "structure", format!("malformed JSON body: {e}")))?;
    if !v.is_object() {
        return Err(Fail::new(
            400,
            "structure",
            "the body must be a JSON object",
        ));
    }
    Ok(v)
}

/// Parameters of a `POST /Type/_search` form body.
fn form_params(req: &SandboxRequest<'_>) -> Result<Vec<(String, String)>, Fail> {
    if req.body.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(ct) = req.content_type {
        if mime(ct) != "application/x-www-form-urlencoded" {
            return Err(Fail::new(
                415,
                "not-supported",
                format!("_search bodies must be application/x-www-form-urlencoded, not '{ct}'"),
            ));
        }
    }
    let text = std::str::from_utf8(req.body)
        .map_err(|_| Fail::bad_request("the form body is not UTF-8"))?;
    query::parse_query(text.trim()).map_err(Fail::bad_request)
}

fn etag(version: usize) -> String {
    format!("W/\"{version}\"")
}

/// The media type of JSON Patch (RFC 6902).
const JSON_PATCH: &str = "application/json-patch+json";

/// Parses a `PATCH` body: a JSON Patch document (415 for any other media
/// type, 400 unless it is a JSON array of valid operations).
fn patch_body(req: &SandboxRequest<'_>) -> Result<json_patch::Patch, Fail> {
    match req.content_type {
        Some(ct) if mime(ct) == JSON_PATCH => {}
        Some(ct) => {
            return Err(Fail::unsupported_media_type(format!(
                "unsupported PATCH content type '{ct}': only JSON Patch is supported ({JSON_PATCH})"
            )))
        }
        None => {
            return Err(Fail::unsupported_media_type(format!(
                "PATCH without a Content-Type: only JSON Patch is supported ({JSON_PATCH})"
            )))
        }
    }
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Err(Fail::bad_request("the request body is empty"));
    }
    let v: Value = serde_json::from_slice(req.body)
        .map_err(|e| Fail::new(400, "structure", format!("malformed JSON body: {e}")))?;
    if !v.is_array() {
        return Err(Fail::new(
            400,
            "structure",
            "a JSON Patch body must be a JSON array of operations",
        ));
    }
    serde_json::from_value(v).map_err(|e| {
        Fail::new(
            400,
            "structure",
            format!("invalid JSON Patch operation: {e}"),
        )
    })
}

/// How much a JSON Patch may copy in total (JSON nodes plus string bytes),
/// so that repeated `copy` operations cannot blow up a resource.
const PATCH_COPY_BUDGET: usize = 1 << 20;

/// Takes the size of `v` (nodes plus string bytes) from `budget`; false
/// (and `budget` exhausted) when it does not fit.
fn spend(v: &Value, budget: &mut usize) -> bool {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        let cost = match v {
            Value::String(s) => 1 + s.len(),
            Value::Array(a) => {
                stack.extend(a);
                1
            }
            Value::Object(m) => {
                for (k, x) in m {
                    *budget = budget.saturating_sub(k.len());
                    stack.push(x);
                }
                1
            }
            _ => 1,
        };
        match budget.checked_sub(cost) {
            Some(left) if left > 0 => *budget = left,
            _ => {
                *budget = 0;
                return false;
            }
        }
    }
    true
}

/// Applies a JSON Patch to `doc`; 422 if an operation fails (unknown
/// path, failed `test`, ...). `doc` is left half-patched on failure, so
/// callers patch a copy.
fn apply_patch(doc: &mut Value, patch: &json_patch::Patch) -> Result<(), Fail> {
    let mut budget = PATCH_COPY_BUDGET;
    for (i, op) in patch.iter().enumerate() {
        if let json_patch::PatchOperation::Copy(c) = op {
            if let Some(from) = doc.pointer(c.from.as_str()) {
                if !spend(from, &mut budget) {
                    return Err(Fail::unprocessable(format!(
                        "JSON Patch operation {i} (copy to '{}'): the patch copies too much data",
                        op.path().as_str()
                    )));
                }
            }
        }
        json_patch::patch_unsafe(doc, std::slice::from_ref(op)).map_err(|e| {
            use json_patch::PatchOperation::*;
            let name = match op {
                Add(_) => "add",
                Remove(_) => "remove",
                Replace(_) => "replace",
                Move(_) => "move",
                Copy(_) => "copy",
                Test(_) => "test",
            };
            Fail::unprocessable(format!(
                "JSON Patch operation {i} ({name} at '{}') failed: {}",
                op.path().as_str(),
                e.kind
            ))
        })?;
    }
    Ok(())
}

/// Whether an `If-Match` header value names version `version`: `W/"N"`
/// or `"N"`, `*` (any current version), or a comma-separated list with
/// one of those.
fn if_match_matches(header: &str, version: usize) -> bool {
    let current = version.to_string();
    header.split(',').map(str::trim).any(|tag| {
        tag == "*"
            || tag
                .strip_prefix("W/")
                .unwrap_or(tag)
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .is_some_and(|v| v == current)
    })
}

/// Checks that a (syntactically valid) type is known: a built-in R4 type
/// or one present in the store.
fn check_type(store: &Store, t: &str) -> Result<(), Fail> {
    if is_r4_type(t) || store.has_type(t) {
        Ok(())
    } else {
        Err(Fail::bad_request(format!("unknown resource type '{t}'")))
    }
}

/// Validates a resource body against the URL type (and id, for updates).
fn check_resource(t: &str, url_id: Option<&str>, body: Option<Value>) -> Result<Value, Fail> {
    let Some(body) = body.filter(Value::is_object) else {
        return Err(Fail::bad_request("a resource body is required"));
    };
    match body.get("resourceType").and_then(Value::as_str) {
        Some(rt) if rt == t => {}
        Some(rt) => {
            return Err(Fail::bad_request(format!(
                "resourceType '{rt}' does not match the URL type '{t}'"
            )))
        }
        None => return Err(Fail::bad_request("the body has no resourceType")),
    }
    match body.get("id") {
        None => {}
        Some(Value::String(id)) if valid_id(id) && url_id.is_some_and(|u| u != id) => {
            return Err(Fail::bad_request(format!(
                "the body id '{id}' does not match the URL id"
            )));
        }
        Some(Value::String(id)) if valid_id(id) => {}
        Some(other) => return Err(Fail::bad_request(format!("invalid resource id {other}"))),
    }
    Ok(body)
}

/// Checks an `If-Match` precondition of a write on an instance: when
/// present, the resource must exist (not deleted) and its current ETag
/// must match; 412 otherwise. Other routes ignore `If-Match`.
fn check_if_match(store: &Store, route: &Route<'_>, if_match: Option<&str>) -> Result<(), Fail> {
    let (Some(tag), Route::Instance(t, id)) = (if_match, *route) else {
        return Ok(());
    };
    check_type(store, t)?;
    match store.record(t, id) {
        Some(r) if r.current().is_some() => {
            if if_match_matches(tag, r.version()) {
                Ok(())
            } else {
                Err(Fail::precondition_failed(format!(
                    "If-Match {tag} does not match the current version of {t}/{id} (ETag {})",
                    etag(r.version())
                )))
            }
        }
        Some(_) => Err(Fail::precondition_failed(format!(
            "If-Match {tag}: {t}/{id} has been deleted"
        ))),
        None => Err(Fail::precondition_failed(format!(
            "If-Match {tag}: {t}/{id} does not exist"
        ))),
    }
}

/// An in-memory FHIR R4 server. `Send + Sync`; share it behind an `Arc`.
pub struct Sandbox {
    store: RwLock<Store>,
    base: String,
    counter: AtomicU64,
    seed: RandomState,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("base", &self.base).finish()
    }
}

impl Sandbox {
    /// Creates an empty sandbox. `base_url` (e.g.
    /// `"http://127.0.0.1:8100/fhir"`, a trailing `/` is dropped) is used
    /// for every link, `fullUrl` and `Location` the sandbox emits.
    pub fn new(base_url: &str) -> Sandbox {
        Sandbox {
            store: RwLock::new(Store::default()),
            base: base_url.trim_end_matches('/').to_string(),
            counter: AtomicU64::new(0),
            seed: RandomState::new(),
        }
    }

    /// The base URL links are built from.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn read(&self) -> Result<RwLockReadGuard<'_, Store>, Fail> {
        self.store
            .read()
            .map_err(|_| Fail::internal("the resource store is unavailable (poisoned lock)"))
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, Store>, Fail> {
        self.store
            .write()
            .map_err(|_| Fail::internal("the resource store is unavailable (poisoned lock)"))
    }

    /// A fresh random UUID-shaped id, not used by `t` nor in `reserved`.
    pub(crate) fn new_id(&self, store: &Store, t: &str, reserved: &HashSet<String>) -> String {
        let rand = || {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let mut h = self.seed.build_hasher();
            h.write_u64(n);
            h.finish()
        };
        loop {
            let (a, b) = (rand(), rand());
            let id = format!(
                "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                a >> 32,
                (a >> 16) & 0xffff,
                a & 0xfff,
                ((b >> 48) & 0x3fff) | 0x8000,
                b & 0xffff_ffff_ffff
            );
            if !store.contains(t, &id) && !reserved.contains(&id) {
                return id;
            }
        }
    }

    /// Loads every `*.json` file of `dir`, in file-name order, and returns
    /// the number of resources stored.
    ///
    /// `transaction`, `batch`, `collection` and `searchset` Bundles are
    /// unpacked: their entries' resources are stored under their own ids,
    /// with `reference`s to any loaded entry `fullUrl` (e.g.
    /// `urn:uuid:X`) rewritten to `ResourceType/X`. Other files are stored
    /// as single resources. Nothing is stored if any file is bad; the error
    /// names the file.
    pub fn load_dir(&self, dir: &Path) -> Result<usize, String> {
        let rd = std::fs::read_dir(dir)
            .map_err(|e| format!("cannot read directory {}: {e}", dir.display()))?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        let mut items: Vec<(String, Value)> = Vec::new();
        let mut urls: HashMap<String, String> = HashMap::new();
        for f in &files {
            let name = f.display().to_string();
            let bytes = std::fs::read(f).map_err(|e| format!("{name}: cannot read: {e}"))?;
            let doc: Value =
                serde_json::from_slice(&bytes).map_err(|e| format!("{name}: invalid JSON: {e}"))?;
            self.collect_resources(&name, doc, &mut items, &mut urls)?;
        }
        let now = now_instant();
        let mut store = self.write().map_err(|f| f.msg)?;
        let n = items.len();
        for (_, mut res) in items {
            store::rewrite_refs(&mut res, &urls);
            let (t, id) = (res["resourceType"].clone(), res["id"].clone());
            if let (Some(t), Some(id)) = (t.as_str(), id.as_str()) {
                store.put(t, id, res, &now, &self.base);
            }
        }
        Ok(n)
    }

    /// Validates a resource from a file (assigning an id when missing) and
    /// queues it; records `fullUrl -> Type/id`.
    fn collect_resources(
        &self,
        name: &str,
        doc: Value,
        items: &mut Vec<(String, Value)>,
        urls: &mut HashMap<String, String>,
    ) -> Result<(), String> {
        let unpack = doc.get("resourceType").and_then(Value::as_str) == Some("Bundle")
            && matches!(
                doc.get("type").and_then(Value::as_str),
                Some("transaction" | "batch" | "collection" | "searchset")
            );
        if !unpack {
            let res = self
                .prepare(doc, None)
                .map_err(|e| format!("{name}: {e}"))?;
            items.push((name.to_string(), res));
            return Ok(());
        }
        let entries = match doc.get("entry") {
            None => return Ok(()),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err(format!("{name}: Bundle.entry is not an array")),
        };
        for (i, mut entry) in entries.into_iter().enumerate() {
            let Some(res) = entry.get_mut("resource").map(Value::take) else {
                continue;
            };
            let full_url = entry.get("fullUrl").and_then(Value::as_str);
            let res = self
                .prepare(res, full_url)
                .map_err(|e| format!("{name}: entry {i}: {e}"))?;
            if let (Some(fu), Some(t), Some(id)) =
                (full_url, res["resourceType"].as_str(), res["id"].as_str())
            {
                urls.insert(fu.to_string(), format!("{t}/{id}"));
            }
            items.push((name.to_string(), res));
        }
        Ok(())
    }

    /// Checks resourceType/id of a resource to be loaded; a missing id is
    /// taken from a `urn:uuid:` fullUrl or generated.
    fn prepare(&self, mut res: Value, full_url: Option<&str>) -> Result<Value, String> {
        let Some(obj) = res.as_object_mut() else {
            return Err("not a JSON object".into());
        };
        let t = match obj.get("resourceType").and_then(Value::as_str) {
            Some(t) if looks_like_type(t) => t.to_string(),
            Some(t) => return Err(format!("invalid resourceType '{t}'")),
            None => return Err("no resourceType".into()),
        };
        match obj.get("id") {
            Some(Value::String(id)) if valid_id(id) => {}
            Some(other) => return Err(format!("invalid id {other}")),
            None => {
                let from_url = full_url
                    .and_then(|u| u.strip_prefix("urn:uuid:"))
                    .filter(|id| valid_id(id))
                    .map(str::to_string);
                let id = match from_url {
                    Some(id) => id,
                    None => {
                        let store = self.read().map_err(|f| f.msg)?;
                        self.new_id(&store, &t, &HashSet::new())
                    }
                };
                obj.insert("id".into(), Value::String(id));
            }
        }
        Ok(res)
    }

    /// Stores one resource as is (a new version if it exists). It needs a
    /// valid `resourceType`; a missing `id` is generated.
    pub fn insert(&self, resource: Value) -> Result<(), String> {
        let res = self.prepare(resource, None)?;
        let (t, id) = (res["resourceType"].clone(), res["id"].clone());
        let (Some(t), Some(id)) = (t.as_str(), id.as_str()) else {
            return Err("resource without resourceType or id".into());
        };
        let mut store = self.write().map_err(|f| f.msg)?;
        store.put(t, id, res, &now_instant(), &self.base);
        Ok(())
    }

    /// Handles one request. Never panics: every failure is an
    /// `OperationOutcome` response (400, 404, 405, 410, 412, 415, 422 or
    /// 500).
    pub fn handle(&self, req: &SandboxRequest<'_>) -> SandboxResponse {
        let method = req.method.to_ascii_uppercase();
        let head = method == "HEAD";
        let pretty = query::parse_query(req.query)
            .map(|ps| ps.iter().any(|(k, v)| k == "_pretty" && v == "true"))
            .unwrap_or(false);
        let result = self.dispatch(if head { "GET" } else { &method }, req);
        let mut resp = match result {
            Ok(reply) => render(reply, pretty),
            Err(fail) => render(
                Reply {
                    status: fail.status,
                    body: Some(fail.outcome()),
                    location: None,
                    etag: None,
                    last_modified: None,
                },
                pretty,
            ),
        };
        if head {
            resp.body.clear();
        }
        resp
    }

    fn dispatch(&self, method: &str, req: &SandboxRequest<'_>) -> Result<Reply, Fail> {
        let route = Route::parse(req.path)?;
        match classify(method, &route)? {
            Access::Batch => {
                let body = json_body(req)?;
                let mut store = self.write()?;
                batch::process(self, &mut store, body)
            }
            Access::Read => {
                let mut params = query::parse_query(req.query).map_err(Fail::bad_request)?;
                if matches!(route, Route::TypeSearch(_)) && method == "POST" {
                    params.extend(form_params(req)?);
                }
                let store = self.read()?;
                self.exec_read(&store, &route, &params)
            }
            Access::Write if method == "PATCH" => {
                let patch = patch_body(req)?;
                let mut store = self.write()?;
                check_if_match(&store, &route, req.if_match)?;
                self.exec_patch(&mut store, &route, &patch)
            }
            Access::Write => {
                let body = if method == "DELETE" {
                    None
                } else {
                    Some(json_body(req)?)
                };
                let mut store = self.write()?;
                check_if_match(&store, &route, req.if_match)?;
                self.exec_write(&mut store, method, &route, body, None)
            }
        }
    }

    /// Executes a read-only interaction.
    pub(crate) fn exec_read(
        &self,
        store: &Store,
        route: &Route<'_>,
        params: &[(String, String)],
    ) -> Result<Reply, Fail> {
        let base = self.base.as_str();
        match *route {
            Route::Metadata => Ok(Reply::ok(capability::statement(store, base))),
            Route::Type(t) | Route::TypeSearch(t) => {
                check_type(store, t)?;
                search::search(store, base, t, params, None).map(Reply::ok)
            }
            Route::Instance(t, id) => {
                check_type(store, t)?;
                self.read_resource(store, t, id)
            }
            Route::InstanceHistory(t, id) => {
                check_type(store, t)?;
                self.history(store, t, id)
            }
            Route::Version(t, id, v) => {
                check_type(store, t)?;
                self.vread(store, t, id, v)
            }
            Route::Everything(id) => search::everything(store, base, id, params).map(Reply::ok),
            Route::Compartment(pid, t) => {
                check_type(store, t)?;
                let Some(paths) = params::patient_compartment_paths(t) else {
                    return Err(Fail::bad_request(format!(
                        "{t} is not in the Patient compartment"
                    )));
                };
                match store.record("Patient", pid) {
                    None => return Err(Fail::not_found(format!("Patient/{pid} is not known"))),
                    Some(r) if r.current().is_none() => {
                        return Err(Fail::gone(format!("Patient/{pid} has been deleted")))
                    }
                    Some(_) => {}
                }
                search::search(store, base, t, params, Some((pid, paths))).map(Reply::ok)
            }
            Route::System => Err(Fail::not_supported("system-level search is not supported")),
        }
    }

    /// Executes a create (`POST /Type`), update or delete. `assigned_id`
    /// is the id reserved for a create inside a transaction.
    pub(crate) fn exec_write(
        &self,
        store: &mut Store,
        method: &str,
        route: &Route<'_>,
        body: Option<Value>,
        assigned_id: Option<&str>,
    ) -> Result<Reply, Fail> {
        let now = now_instant();
        match (method, *route) {
            ("POST", Route::Type(t)) => {
                check_type(store, t)?;
                let res = check_resource(t, None, body)?;
                let id = match assigned_id {
                    Some(id) => id.to_string(),
                    None => self.new_id(store, t, &HashSet::new()),
                };
                let put = store.put(t, &id, res, &now, &self.base);
                Ok(Reply {
                    status: 201,
                    location: Some(format!("{}/{t}/{id}/_history/{}", self.base, put.version)),
                    etag: Some(etag(put.version)),
                    last_modified: Some(now),
                    body: Some(put.resource.as_ref().clone()),
                })
            }
            ("PUT", Route::Instance(t, id)) => {
                check_type(store, t)?;
                let res = check_resource(t, Some(id), body)?;
                let put = store.put(t, id, res, &now, &self.base);
                Ok(Reply {
                    status: if put.created { 201 } else { 200 },
                    location: Some(format!("{}/{t}/{id}/_history/{}", self.base, put.version)),
                    etag: Some(etag(put.version)),
                    last_modified: Some(now),
                    body: Some(put.resource.as_ref().clone()),
                })
            }
            ("DELETE", Route::Instance(t, id)) => {
                check_type(store, t)?;
                let Some(previous) = store.record(t, id).map(store::Record::version) else {
                    return Err(Fail::not_found(format!("{t}/{id} is not known")));
                };
                let (version, msg) = match store.delete(t, id, &now) {
                    Some(v) => (v, format!("deleted {t}/{id}")),
                    None => (previous, format!("{t}/{id} was already deleted")),
                };
                Ok(Reply {
                    status: 200,
                    body: Some(outcome("information", "informational", &msg)),
                    location: None,
                    etag: Some(etag(version)),
                    last_modified: Some(now),
                })
            }
            // Only reached from a batch or transaction entry: `dispatch`
            // sends PATCH requests to `exec_patch`.
            ("PATCH", _) => Err(Fail::new(
                405,
                "not-supported",
                "PATCH is not supported inside a batch or transaction",
            )),
            _ => Err(Fail::method_not_allowed(method, "this path")),
        }
    }

    /// Executes a JSON Patch on an instance (`PATCH /Type/id`): the patched
    /// resource is validated like an update body and stored as a new
    /// version.
    fn exec_patch(
        &self,
        store: &mut Store,
        route: &Route<'_>,
        patch: &json_patch::Patch,
    ) -> Result<Reply, Fail> {
        let Route::Instance(t, id) = *route else {
            return Err(Fail::method_not_allowed("PATCH", "this path"));
        };
        check_type(store, t)?;
        let Some(record) = store.record(t, id) else {
            return Err(Fail::not_found(format!("{t}/{id} is not known")));
        };
        let Some(current) = record.current() else {
            return Err(Fail::gone(format!("{t}/{id} has been deleted")));
        };
        let mut doc = current.as_ref().clone();
        apply_patch(&mut doc, patch)?;
        let res = check_resource(t, Some(id), Some(doc))?;
        let now = now_instant();
        let put = store.put(t, id, res, &now, &self.base);
        Ok(Reply {
            status: 200,
            location: Some(format!("{}/{t}/{id}/_history/{}", self.base, put.version)),
            etag: Some(etag(put.version)),
            last_modified: Some(now),
            body: Some(put.resource.as_ref().clone()),
        })
    }

    fn read_resource(&self, store: &Store, t: &str, id: &str) -> Result<Reply, Fail> {
        let Some(record) = store.record(t, id) else {
            return Err(Fail::not_found(format!("{t}/{id} is not known")));
        };
        let Some(res) = record.current() else {
            return Err(Fail::gone(format!("{t}/{id} has been deleted")));
        };
        Ok(Reply {
            status: 200,
            body: Some(res.as_ref().clone()),
            location: None,
            etag: Some(etag(record.version())),
            last_modified: Some(record.last_updated().to_string()),
        })
    }

    fn vread(&self, store: &Store, t: &str, id: &str, v: &str) -> Result<Reply, Fail> {
        let Some(record) = store.record(t, id) else {
            return Err(Fail::not_found(format!("{t}/{id} is not known")));
        };
        let version = v
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1 && *n <= record.versions.len());
        let Some(n) = version else {
            return Err(Fail::not_found(format!("{t}/{id} has no version '{v}'")));
        };
        let Some(ver) = record.versions.get(n - 1) else {
            return Err(Fail::not_found(format!("{t}/{id} has no version '{v}'")));
        };
        let Some(res) = &ver.resource else {
            return Err(Fail::gone(format!("version {n} of {t}/{id} is a deletion")));
        };
        Ok(Reply {
            status: 200,
            body: Some(res.as_ref().clone()),
            location: None,
            etag: Some(etag(n)),
            last_modified: Some(ver.last_updated.clone()),
        })
    }

    fn history(&self, store: &Store, t: &str, id: &str) -> Result<Reply, Fail> {
        let Some(record) = store.record(t, id) else {
            return Err(Fail::not_found(format!("{t}/{id} is not known")));
        };
        let base = &self.base;
        let entries: Vec<Value> = record
            .versions
            .iter()
            .enumerate()
            .rev()
            .map(|(i, ver)| {
                let n = i + 1;
                let (method, url, status) = match (&ver.resource, n) {
                    (None, _) => ("DELETE", format!("{t}/{id}"), "204 No Content"),
                    (Some(_), 1) => ("POST", t.to_string(), "201 Created"),
                    (Some(_), _) => ("PUT", format!("{t}/{id}"), "200 OK"),
                };
                let mut e = serde_json::Map::new();
                e.insert("fullUrl".into(), format!("{base}/{t}/{id}").into());
                if let Some(res) = &ver.resource {
                    e.insert("resource".into(), res.as_ref().clone());
                }
                e.insert("request".into(), json!({"method": method, "url": url}));
                e.insert(
                    "response".into(),
                    json!({"status": status, "etag": etag(n), "lastModified": ver.last_updated}),
                );
                Value::Object(e)
            })
            .collect();
        Ok(Reply::ok(json!({
            "resourceType": "Bundle",
            "type": "history",
            "total": entries.len(),
            "link": [{"relation": "self", "url": format!("{base}/{t}/{id}/_history")}],
            "entry": entries,
        })))
    }
}

/// Serializes a reply.
fn render(reply: Reply, pretty: bool) -> SandboxResponse {
    let body = match &reply.body {
        None => Ok(Vec::new()),
        Some(v) if pretty => serde_json::to_vec_pretty(v),
        Some(v) => serde_json::to_vec(v),
    };
    match body {
        Ok(body) => SandboxResponse {
            status: reply.status,
            content_type: FHIR_JSON,
            body,
            location: reply.location,
            etag: reply.etag,
        },
        Err(e) => SandboxResponse {
            status: 500,
            content_type: FHIR_JSON,
            body: outcome(
                "fatal",
                "exception",
                &format!("cannot serialize response: {e}"),
            )
            .to_string()
            .into_bytes(),
            location: None,
            etag: None,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn sandbox_is_send_sync() {
        assert_send_sync::<Sandbox>();
    }

    #[test]
    fn routes() {
        assert_eq!(Route::parse("").unwrap(), Route::System);
        assert_eq!(Route::parse("/").unwrap(), Route::System);
        assert_eq!(Route::parse("/metadata").unwrap(), Route::Metadata);
        assert_eq!(Route::parse("/Patient/").unwrap(), Route::Type("Patient"));
        assert_eq!(
            Route::parse("Patient/1/_history/2").unwrap(),
            Route::Version("Patient", "1", "2")
        );
        assert_eq!(
            Route::parse("/Patient/1/$everything").unwrap(),
            Route::Everything("1")
        );
        assert_eq!(
            Route::parse("/Patient/1/Observation").unwrap(),
            Route::Compartment("1", "Observation")
        );
        assert_eq!(Route::parse("/patient").unwrap_err().status, 400);
        assert_eq!(Route::parse("/Patient/a_b").unwrap_err().status, 400);
        assert_eq!(Route::parse("/a/b/c/d/e").unwrap_err().status, 404);
        assert_eq!(Route::parse("/Patient//x").unwrap_err().status, 400);
    }

    const BASE: &str = "http://sandbox.test/fhir";
    const PATCH_CT: Option<&str> = Some("application/json-patch+json");

    /// A sandbox holding `Patient/p1` (version 1, gender "female").
    fn sandbox_with_patient() -> Sandbox {
        let sb = Sandbox::new(BASE);
        sb.insert(json!({
            "resourceType": "Patient",
            "id": "p1",
            "gender": "female",
            "name": [{"family": "Before"}]
        }))
        .unwrap();
        sb
    }

    fn send(
        sb: &Sandbox,
        method: &str,
        path: &str,
        body: &[u8],
        content_type: Option<&str>,
        if_match: Option<&str>,
    ) -> (SandboxResponse, Value) {
        let r = sb.handle(&SandboxRequest {
            method,
            path,
            query: "",
            body,
            content_type,
            if_match,
        });
        assert_eq!(r.content_type, FHIR_JSON);
        let v = if r.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&r.body).unwrap()
        };
        if r.status >= 400 {
            assert_eq!(v["resourceType"], "OperationOutcome", "{v}");
        }
        (r, v)
    }

    fn patch(
        sb: &Sandbox,
        path: &str,
        ops: Value,
        if_match: Option<&str>,
    ) -> (SandboxResponse, Value) {
        send(
            sb,
            "PATCH",
            path,
            ops.to_string().as_bytes(),
            PATCH_CT,
            if_match,
        )
    }

    fn put(
        sb: &Sandbox,
        path: &str,
        res: Value,
        if_match: Option<&str>,
    ) -> (SandboxResponse, Value) {
        send(sb, "PUT", path, res.to_string().as_bytes(), None, if_match)
    }

    /// The current `Patient/p1` and its ETag.
    fn read_p1(sb: &Sandbox) -> (Value, String) {
        let (r, v) = send(sb, "GET", "/Patient/p1", b"", None, None);
        assert_eq!(r.status, 200, "{v}");
        (v, r.etag.unwrap())
    }

    fn code(v: &Value) -> &str {
        v["issue"][0]["code"].as_str().unwrap()
    }

    #[test]
    fn patch_replaces_a_field_and_bumps_the_version() {
        let sb = sandbox_with_patient();
        let (_, etag_before) = read_p1(&sb);
        assert_eq!(etag_before, "W/\"1\"");
        let ops = json!([
            {"op": "test", "path": "/gender", "value": "female"},
            {"op": "replace", "path": "/gender", "value": "male"},
            {"op": "add", "path": "/name/0/given", "value": ["Ann"]},
            {"op": "remove", "path": "/name/0/family"}
        ]);
        let (r, v) = patch(&sb, "/Patient/p1", ops, None);
        assert_eq!(r.status, 200, "{v}");
        assert_eq!(v["gender"], "male");
        assert_eq!(v["name"], json!([{"given": ["Ann"]}]));
        assert_eq!(v["id"], "p1");
        assert_eq!(v["meta"]["versionId"], "2");
        assert_eq!(r.etag.as_deref(), Some("W/\"2\""));
        assert_ne!(r.etag.as_deref(), Some(etag_before.as_str()));
        assert_eq!(
            r.location.as_deref(),
            Some("http://sandbox.test/fhir/Patient/p1/_history/2")
        );
        // The patched resource is what is stored; the old version is kept.
        let (stored, etag_after) = read_p1(&sb);
        assert_eq!(stored, v);
        assert_eq!(etag_after, "W/\"2\"");
        let (r, old) = send(&sb, "GET", "/Patient/p1/_history/1", b"", None, None);
        assert_eq!(r.status, 200);
        assert_eq!(old["gender"], "female");
        // A charset parameter on the media type is fine.
        let (r, v) = send(
            &sb,
            "PATCH",
            "/Patient/p1",
            br#"[{"op":"replace","path":"/gender","value":"other"}]"#,
            Some("Application/JSON-Patch+JSON; charset=utf-8"),
            None,
        );
        assert_eq!(r.status, 200, "{v}");
        assert_eq!(v["meta"]["versionId"], "3");
    }

    #[test]
    fn patch_that_does_not_apply_is_422_and_changes_nothing() {
        let sb = sandbox_with_patient();
        let (before, _) = read_p1(&sb);
        let cases = [
            // A failing test: the earlier replace must not be kept.
            json!([
                {"op": "replace", "path": "/gender", "value": "male"},
                {"op": "test", "path": "/gender", "value": "female"}
            ]),
            // Unknown paths.
            json!([{"op": "replace", "path": "/birthDate", "value": "2000-01-01"}]),
            json!([{"op": "remove", "path": "/name/5"}]),
            json!([{"op": "add", "path": "/no/such/parent", "value": 1}]),
            json!([{"op": "copy", "from": "/nope", "path": "/x"}]),
            json!([{"op": "move", "from": "/name", "path": "/name/0/x"}]),
        ];
        for ops in cases {
            let (r, v) = patch(&sb, "/Patient/p1", ops.clone(), None);
            assert_eq!(r.status, 422, "{ops}: {v}");
            assert_eq!(code(&v), "processing");
            assert!(r.etag.is_none() && r.location.is_none());
            let (after, etag) = read_p1(&sb);
            assert_eq!(after, before, "{ops}");
            assert_eq!(etag, "W/\"1\"");
        }
    }

    #[test]
    fn patch_copy_blow_up_is_422() {
        let sb = sandbox_with_patient();
        // Each copy doubles the resource: 64 of them would need 2^64 nodes.
        let ops: Vec<Value> = (0..64)
            .map(|_| json!({"op": "copy", "from": "/name", "path": "/name/-"}))
            .collect();
        let (r, v) = patch(&sb, "/Patient/p1", Value::Array(ops), None);
        assert_eq!(r.status, 422, "{v}");
        assert_eq!(read_p1(&sb).1, "W/\"1\"");
    }

    #[test]
    fn patch_cannot_change_id_or_resource_type() {
        let sb = sandbox_with_patient();
        let (before, _) = read_p1(&sb);
        for ops in [
            json!([{"op": "replace", "path": "/id", "value": "p2"}]),
            json!([{"op": "replace", "path": "/resourceType", "value": "Practitioner"}]),
            json!([{"op": "remove", "path": "/resourceType"}]),
            json!([{"op": "replace", "path": "/id", "value": 7}]),
            json!([{"op": "replace", "path": "", "value": []}]),
        ] {
            let (r, v) = patch(&sb, "/Patient/p1", ops.clone(), None);
            assert_eq!(r.status, 400, "{ops}: {v}");
            assert_eq!(read_p1(&sb).0, before, "{ops}");
        }
        assert!(!sb.read().unwrap().contains("Patient", "p2"));
    }

    #[test]
    fn patch_of_unknown_or_deleted_resource() {
        let sb = sandbox_with_patient();
        let ops = json!([{"op": "replace", "path": "/gender", "value": "male"}]);
        let (r, v) = patch(&sb, "/Patient/nope", ops.clone(), None);
        assert_eq!(r.status, 404, "{v}");
        assert_eq!(code(&v), "not-found");
        let (r, v) = patch(&sb, "/NotAType/p1", ops.clone(), None);
        assert_eq!(r.status, 400, "{v}");
        let (r, _) = send(&sb, "DELETE", "/Patient/p1", b"", None, None);
        assert_eq!(r.status, 200);
        let (r, v) = patch(&sb, "/Patient/p1", ops.clone(), None);
        assert_eq!(r.status, 410, "{v}");
        // PATCH is for instances only.
        let (r, _) = patch(&sb, "/Patient", ops, None);
        assert_eq!(r.status, 405);
    }

    #[test]
    fn patch_content_types_other_than_json_patch_are_415() {
        let sb = sandbox_with_patient();
        let fhirpath = json!({
            "resourceType": "Parameters",
            "parameter": [{"name": "operation", "part": [
                {"name": "type", "valueCode": "replace"},
                {"name": "path", "valueString": "Patient.gender"},
                {"name": "value", "valueCode": "male"}
            ]}]
        })
        .to_string();
        for ct in [
            Some("application/fhir+json"),
            Some("application/json"),
            Some("application/merge-patch+json"),
            None,
        ] {
            let (r, v) = send(&sb, "PATCH", "/Patient/p1", fhirpath.as_bytes(), ct, None);
            assert_eq!(r.status, 415, "{ct:?}: {v}");
            let msg = v["issue"][0]["diagnostics"].as_str().unwrap();
            assert!(msg.contains("only JSON Patch is supported"), "{msg}");
        }
        assert_eq!(read_p1(&sb).1, "W/\"1\"");
    }

    #[test]
    fn patch_body_must_be_an_array_of_operations() {
        let sb = sandbox_with_patient();
        for body in [
            &b""[..],
            b"  ",
            b"[",
            b"{\"op\":\"remove\",\"path\":\"/gender\"}",
            b"[{\"op\":\"frobnicate\",\"path\":\"/gender\"}]",
            b"[{\"op\":\"replace\",\"path\":\"/gender\"}]",
            b"[{\"op\":\"remove\",\"path\":\"gender\"}]",
            b"[1]",
        ] {
            let (r, v) = send(&sb, "PATCH", "/Patient/p1", body, PATCH_CT, None);
            assert_eq!(r.status, 400, "{}: {v}", String::from_utf8_lossy(body));
        }
        // An empty patch is a valid no-op (still a new version).
        let (r, v) = send(&sb, "PATCH", "/Patient/p1", b"[]", PATCH_CT, None);
        assert_eq!(r.status, 200, "{v}");
        assert_eq!(v["gender"], "female");
    }

    #[test]
    fn patch_in_a_batch_is_not_supported() {
        let sb = sandbox_with_patient();
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [{"request": {"method": "PATCH", "url": "Patient/p1"}}]
        });
        let (r, v) = send(&sb, "POST", "/", bundle.to_string().as_bytes(), None, None);
        assert_eq!(r.status, 200);
        assert_eq!(
            v["entry"][0]["response"]["status"],
            "405 Method Not Allowed"
        );
    }

    #[test]
    fn if_match_values() {
        assert!(if_match_matches("W/\"3\"", 3));
        assert!(if_match_matches("\"3\"", 3));
        assert!(if_match_matches(" W/\"3\" ", 3));
        assert!(if_match_matches("*", 3));
        assert!(if_match_matches("W/\"1\", W/\"3\"", 3));
        assert!(!if_match_matches("W/\"2\"", 3));
        assert!(!if_match_matches("3", 3));
        assert!(!if_match_matches("W/3", 3));
        assert!(!if_match_matches("W/\"03\"", 3));
        assert!(!if_match_matches("w/\"3\"", 3));
        assert!(!if_match_matches("", 3));
        assert!(!if_match_matches("\"", 3));
    }

    #[test]
    fn put_with_if_match() {
        let sb = sandbox_with_patient();
        let res = |g: &str| json!({"resourceType": "Patient", "id": "p1", "gender": g});
        // Mismatch: 412, nothing changes.
        let (r, v) = put(&sb, "/Patient/p1", res("male"), Some("W/\"2\""));
        assert_eq!(r.status, 412, "{v}");
        assert_eq!(code(&v), "conflict");
        assert!(r.etag.is_none());
        let (stored, etag) = read_p1(&sb);
        assert_eq!(
            (stored["gender"].as_str(), etag.as_str()),
            (Some("female"), "W/\"1\"")
        );
        // Match (weak, then strong form of the new ETag).
        let (r, v) = put(&sb, "/Patient/p1", res("male"), Some("W/\"1\""));
        assert_eq!(r.status, 200, "{v}");
        assert_eq!(r.etag.as_deref(), Some("W/\"2\""));
        let (r, v) = put(&sb, "/Patient/p1", res("other"), Some("\"2\""));
        assert_eq!(r.status, 200, "{v}");
        assert_eq!(read_p1(&sb).0["gender"], "other");
        // A stale ETag after those updates.
        let (r, _) = put(&sb, "/Patient/p1", res("unknown"), Some("W/\"1\""));
        assert_eq!(r.status, 412);
        assert_eq!(read_p1(&sb).1, "W/\"3\"");
        // Update-as-create with If-Match: the resource does not exist.
        let new = json!({"resourceType": "Patient", "id": "p9"});
        let (r, v) = put(&sb, "/Patient/p9", new.clone(), Some("W/\"1\""));
        assert_eq!(r.status, 412, "{v}");
        let (r, _) = put(&sb, "/Patient/p9", new.clone(), Some("*"));
        assert_eq!(r.status, 412);
        assert!(!sb.read().unwrap().contains("Patient", "p9"));
        // Without If-Match it is created as before.
        let (r, _) = put(&sb, "/Patient/p9", new, None);
        assert_eq!(r.status, 201);
    }

    #[test]
    fn patch_with_if_match() {
        let sb = sandbox_with_patient();
        let ops = json!([{"op": "replace", "path": "/gender", "value": "male"}]);
        let (r, v) = patch(&sb, "/Patient/p1", ops.clone(), Some("W/\"7\""));
        assert_eq!(r.status, 412, "{v}");
        let (stored, etag) = read_p1(&sb);
        assert_eq!(
            (stored["gender"].as_str(), etag.as_str()),
            (Some("female"), "W/\"1\"")
        );
        let (r, v) = patch(&sb, "/Patient/p1", ops.clone(), Some("W/\"1\""));
        assert_eq!(r.status, 200, "{v}");
        assert_eq!(r.etag.as_deref(), Some("W/\"2\""));
        let ops2 = json!([{"op": "replace", "path": "/gender", "value": "other"}]);
        let (r, v) = patch(&sb, "/Patient/p1", ops2, Some("\"2\""));
        assert_eq!(r.status, 200, "{v}");
        assert_eq!(v["gender"], "other");
        // Unknown resource with If-Match.
        let (r, _) = patch(&sb, "/Patient/nope", ops, Some("W/\"1\""));
        assert_eq!(r.status, 412);
    }

    #[test]
    fn delete_with_if_match() {
        let sb = sandbox_with_patient();
        let (r, v) = send(&sb, "DELETE", "/Patient/p1", b"", None, Some("W/\"2\""));
        assert_eq!(r.status, 412, "{v}");
        assert_eq!(read_p1(&sb).1, "W/\"1\"");
        let (r, v) = send(&sb, "DELETE", "/Patient/p1", b"", None, Some("\"1\""));
        assert_eq!(r.status, 200, "{v}");
        let (r, _) = send(&sb, "GET", "/Patient/p1", b"", None, None);
        assert_eq!(r.status, 410);
        // Deleted, then unknown: no current version to match.
        let (r, _) = send(&sb, "DELETE", "/Patient/p1", b"", None, Some("W/\"2\""));
        assert_eq!(r.status, 412);
        let (r, _) = send(&sb, "DELETE", "/Patient/nope", b"", None, Some("W/\"1\""));
        assert_eq!(r.status, 412);
        assert_eq!(
            sb.read()
                .unwrap()
                .record("Patient", "p1")
                .unwrap()
                .version(),
            2
        );
    }
}
