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
        (Route::Instance(..), "PUT" | "DELETE") => Write,
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
    /// `OperationOutcome` response (400, 404, 405, 410, 415 or 500).
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
            Access::Write => {
                let body = if method == "DELETE" {
                    None
                } else {
                    Some(json_body(req)?)
                };
                let mut store = self.write()?;
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
            _ => Err(Fail::method_not_allowed(method, "this path")),
        }
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
}
