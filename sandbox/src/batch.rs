//! `POST /` with a `batch` or `transaction` Bundle.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use crate::outcome::{status_line, Fail};
use crate::store::{rewrite_refs, Store};
use crate::{classify, query, Access, Reply, Route, Sandbox};

/// One `Bundle.entry` request.
struct Entry {
    method: String,
    /// `request.url` relative to the base, without a leading `/`.
    url: String,
    full_url: Option<String>,
    resource: Option<Value>,
}

impl Entry {
    fn parse(sb: &Sandbox, i: usize, mut e: Value) -> Result<Entry, Fail> {
        let bad = |msg: &str| Fail::bad_request(format!("entry {i}: {msg}"));
        if !e.is_object() {
            return Err(bad("not a JSON object"));
        }
        let req = e.get("request").ok_or_else(|| bad("no request"))?;
        let method = req
            .get("method")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no request.method"))?
            .to_ascii_uppercase();
        let raw_url = req
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no request.url"))?;
        let url = raw_url
            .strip_prefix(sb.base_url())
            .unwrap_or(raw_url)
            .trim_start_matches('/')
            .to_string();
        let full_url = e.get("fullUrl").and_then(Value::as_str).map(str::to_string);
        let resource = e.get_mut("resource").map(Value::take);
        Ok(Entry {
            method,
            url,
            full_url,
            resource,
        })
    }

    fn path_and_query(&self) -> (&str, &str) {
        self.url.split_once('?').unwrap_or((&self.url, ""))
    }

    /// Transaction processing order: DELETE, POST, PUT, GET.
    fn priority(&self) -> u8 {
        match self.method.as_str() {
            "DELETE" => 0,
            "POST" => 1,
            "PUT" | "PATCH" => 2,
            "GET" | "HEAD" => 3,
            _ => 4,
        }
    }
}

/// Runs one entry against `store`.
fn exec(sb: &Sandbox, store: &mut Store, e: &Entry, assigned: Option<&str>) -> Result<Reply, Fail> {
    let (path, q) = e.path_and_query();
    let route = Route::parse(path)?;
    let method = if e.method == "HEAD" {
        "GET"
    } else {
        e.method.as_str()
    };
    match classify(method, &route)? {
        Access::Batch => Err(Fail::not_supported(
            "nested batch/transaction is not supported",
        )),
        Access::Read => {
            let params = query::parse_query(q).map_err(Fail::bad_request)?;
            sb.exec_read(store, &route, &params)
        }
        Access::Write => sb.exec_write(store, method, &route, e.resource.clone(), assigned),
    }
}

/// The response entry for one processed request entry.
fn response_entry(method: &str, result: Result<Reply, Fail>) -> Value {
    let mut entry = Map::new();
    let mut response = Map::new();
    match result {
        Ok(reply) => {
            response.insert("status".into(), status_line(reply.status).into());
            if let Some(l) = reply.location {
                response.insert("location".into(), l.into());
            }
            if let Some(t) = reply.etag {
                response.insert("etag".into(), t.into());
            }
            if let Some(t) = reply.last_modified {
                response.insert("lastModified".into(), t.into());
            }
            match (method, reply.body) {
                ("GET", Some(body)) => {
                    entry.insert("resource".into(), body);
                }
                ("DELETE", Some(body)) => {
                    response.insert("outcome".into(), body);
                }
                _ => {}
            }
        }
        Err(fail) => {
            response.insert("status".into(), status_line(fail.status).into());
            response.insert("outcome".into(), fail.outcome());
        }
    }
    entry.insert("response".into(), Value::Object(response));
    Value::Object(entry)
}

fn response_bundle(kind: &str, entries: Vec<Value>) -> Reply {
    let mut b = Map::new();
    b.insert("resourceType".into(), "Bundle".into());
    b.insert("type".into(), kind.into());
    if !entries.is_empty() {
        b.insert("entry".into(), Value::Array(entries));
    }
    Reply::ok(Value::Object(b))
}

/// Processes a batch (entries independent, in order) or a transaction
/// (all-or-nothing; `fullUrl`s of POSTed/PUT entries resolved in
/// references; processed DELETE, POST, PUT, GET).
pub(crate) fn process(sb: &Sandbox, store: &mut Store, mut bundle: Value) -> Result<Reply, Fail> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(Fail::bad_request(
            "POST to the base URL needs a batch or transaction Bundle",
        ));
    }
    let transaction = match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => true,
        Some("batch") => false,
        other => {
            return Err(Fail::bad_request(format!(
                "Bundle.type must be batch or transaction, not {}",
                other.map_or("(missing)".to_string(), |t| format!("'{t}'"))
            )))
        }
    };
    let raw = match bundle.get_mut("entry").map(Value::take) {
        None => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(Fail::bad_request("Bundle.entry must be an array")),
    };
    if transaction {
        transaction_process(sb, store, raw)
    } else {
        let entries = raw
            .into_iter()
            .enumerate()
            .map(|(i, e)| match Entry::parse(sb, i, e) {
                Ok(entry) => {
                    let r = exec(sb, store, &entry, None);
                    response_entry(&entry.method, r)
                }
                Err(fail) => response_entry("", Err(fail)),
            })
            .collect();
        Ok(response_bundle("batch-response", entries))
    }
}

fn transaction_process(sb: &Sandbox, store: &mut Store, raw: Vec<Value>) -> Result<Reply, Fail> {
    let mut entries = raw
        .into_iter()
        .enumerate()
        .map(|(i, e)| Entry::parse(sb, i, e))
        .collect::<Result<Vec<_>, _>>()?;
    let mut work = store.clone();

    // Reserve ids for creates and map fullUrls to their final references.
    let mut assigned: Vec<Option<String>> = vec![None; entries.len()];
    let mut urls: HashMap<String, String> = HashMap::new();
    let mut reserved: HashSet<String> = HashSet::new();
    for (i, e) in entries.iter().enumerate() {
        let (path, _) = e.path_and_query();
        match (e.method.as_str(), Route::parse(path)) {
            ("POST", Ok(Route::Type(t))) => {
                let id = sb.new_id(&work, t, &reserved);
                reserved.insert(id.clone());
                if let Some(fu) = &e.full_url {
                    urls.insert(fu.clone(), format!("{t}/{id}"));
                }
                if let Some(slot) = assigned.get_mut(i) {
                    *slot = Some(id);
                }
            }
            ("PUT", Ok(Route::Instance(t, id))) => {
                if let Some(fu) = &e.full_url {
                    urls.insert(fu.clone(), format!("{t}/{id}"));
                }
            }
            _ => {}
        }
    }
    for e in &mut entries {
        if let Some(r) = &mut e.resource {
            rewrite_refs(r, &urls);
        }
    }

    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| entries.get(i).map_or(9, Entry::priority));
    let mut results: Vec<Option<Reply>> = entries.iter().map(|_| None).collect();
    for i in order {
        let (Some(e), Some(slot)) = (entries.get(i), results.get_mut(i)) else {
            continue;
        };
        let id = assigned.get(i).and_then(|a| a.as_deref());
        match exec(sb, &mut work, e, id) {
            Ok(reply) => *slot = Some(reply),
            Err(fail) => {
                let status = if fail.status >= 500 { fail.status } else { 400 };
                return Err(Fail::new(
                    status,
                    fail.code,
                    format!(
                        "transaction failed, nothing was applied: entry {i} ({} {}) failed with {}: {}",
                        e.method,
                        e.url,
                        status_line(fail.status),
                        fail.msg
                    ),
                ));
            }
        }
    }
    *store = work;
    let out = entries
        .iter()
        .zip(results)
        .map(|(e, r)| {
            let r = r.ok_or_else(|| Fail::internal("entry was not processed"));
            response_entry(&e.method, r)
        })
        .collect();
    Ok(response_bundle("transaction-response", out))
}
