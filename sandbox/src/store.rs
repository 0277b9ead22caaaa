//! The in-memory resource store: resources indexed by type and id, with
//! every version kept (for vread and history).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::types::{looks_like_type, valid_id};

/// One version of a resource; `resource` is `None` for a deletion.
#[derive(Clone, Debug)]
pub(crate) struct Version {
    pub resource: Option<Arc<Value>>,
    pub last_updated: String,
}

/// All versions of one resource, plus the local references (`Type/id`)
/// found anywhere in its current version (used by `$everything` and
/// wildcard includes).
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub versions: Vec<Version>,
    pub refs: Arc<[String]>,
}

impl Record {
    /// The current version number (1-based).
    pub fn version(&self) -> usize {
        self.versions.len()
    }
    /// The current resource, `None` if deleted.
    pub fn current(&self) -> Option<&Arc<Value>> {
        self.versions.last().and_then(|v| v.resource.as_ref())
    }
    pub fn last_updated(&self) -> &str {
        self.versions.last().map_or("", |v| v.last_updated.as_str())
    }
}

/// Resources by type, then by id. Cloning is cheap-ish (resources are
/// shared `Arc`s), which is how transactions get all-or-nothing semantics.
#[derive(Clone, Debug, Default)]
pub(crate) struct Store {
    types: BTreeMap<String, BTreeMap<String, Record>>,
}

/// Outcome of [`Store::put`].
pub(crate) struct Put {
    pub version: usize,
    /// True when there was no live resource before (new or resurrected).
    pub created: bool,
    pub resource: Arc<Value>,
}

impl Store {
    pub fn record(&self, t: &str, id: &str) -> Option<&Record> {
        self.types.get(t).and_then(|m| m.get(id))
    }

    /// The live resource `t/id`.
    pub fn current(&self, t: &str, id: &str) -> Option<&Arc<Value>> {
        self.record(t, id).and_then(Record::current)
    }

    /// The live resource named by a local reference `Type/id`.
    pub fn resolve(&self, reference: &str) -> Option<&Arc<Value>> {
        let (t, id) = reference.split_once('/')?;
        self.current(t, id)
    }

    /// Whether any resource (even deleted) of type `t` was ever stored.
    pub fn has_type(&self, t: &str) -> bool {
        self.types.contains_key(t)
    }

    pub fn contains(&self, t: &str, id: &str) -> bool {
        self.record(t, id).is_some()
    }

    /// Types with at least one live resource, sorted.
    pub fn live_types(&self) -> Vec<&str> {
        self.types
            .iter()
            .filter(|(_, m)| m.values().any(|r| r.current().is_some()))
            .map(|(t, _)| t.as_str())
            .collect()
    }

    /// Live resources of type `t`, ordered by id.
    pub fn live_of_type<'a>(
        &'a self,
        t: &str,
    ) -> impl Iterator<Item = (&'a str, &'a Record, &'a Arc<Value>)> + 'a {
        self.types
            .get(t)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter_map(|(id, r)| r.current().map(|v| (id.as_str(), r, v)))
    }

    /// Every live resource, ordered by type then id.
    pub fn live_all(&self) -> impl Iterator<Item = (&str, &str, &Record, &Arc<Value>)> + '_ {
        self.types.iter().flat_map(|(t, m)| {
            m.iter()
                .filter_map(move |(id, r)| r.current().map(|v| (t.as_str(), id.as_str(), r, v)))
        })
    }

    /// Stores a new version of `t/id`. The resource's `id` and
    /// `meta.versionId`/`meta.lastUpdated` are set here (other `meta`
    /// elements such as tags are kept). `base` is stripped from absolute
    /// references when computing the reference index.
    pub fn put(&mut self, t: &str, id: &str, resource: Value, now: &str, base: &str) -> Put {
        let record = self
            .types
            .entry(t.to_string())
            .or_default()
            .entry(id.to_string())
            .or_insert_with(|| Record {
                versions: Vec::new(),
                refs: Arc::from(Vec::new()),
            });
        let created = record.current().is_none();
        let version = record.versions.len() + 1;
        let resource = Arc::new(with_meta(resource, t, id, version, now));
        let mut refs = Vec::new();
        collect_local_refs(&resource, base, &mut refs);
        refs.sort();
        refs.dedup();
        record.refs = Arc::from(refs);
        record.versions.push(Version {
            resource: Some(Arc::clone(&resource)),
            last_updated: now.to_string(),
        });
        Put {
            version,
            created,
            resource,
        }
    }

    /// Marks `t/id` deleted. Returns the new version number, or `None` if
    /// there was no live resource.
    pub fn delete(&mut self, t: &str, id: &str, now: &str) -> Option<usize> {
        let record = self.types.get_mut(t)?.get_mut(id)?;
        record.current()?;
        record.versions.push(Version {
            resource: None,
            last_updated: now.to_string(),
        });
        record.refs = Arc::from(Vec::new());
        Some(record.versions.len())
    }
}

/// Rebuilds the resource object as `resourceType, id, meta, ...rest` with
/// the server-maintained meta elements.
fn with_meta(resource: Value, t: &str, id: &str, version: usize, now: &str) -> Value {
    let Value::Object(map) = resource else {
        return resource;
    };
    let mut meta = Map::new();
    meta.insert("versionId".into(), Value::String(version.to_string()));
    meta.insert("lastUpdated".into(), Value::String(now.to_string()));
    let mut rest = Vec::with_capacity(map.len());
    for (k, v) in map {
        match k.as_str() {
            "resourceType" | "id" => {}
            "meta" => {
                if let Value::Object(m) = v {
                    for (mk, mv) in m {
                        if mk != "versionId" && mk != "lastUpdated" {
                            meta.insert(mk, mv);
                        }
                    }
                }
            }
            _ => rest.push((k, v)),
        }
    }
    let mut out = Map::new();
    out.insert("resourceType".into(), Value::String(t.to_string()));
    out.insert("id".into(), Value::String(id.to_string()));
    out.insert("meta".into(), Value::Object(meta));
    out.extend(rest);
    Value::Object(out)
}

/// Normalizes a reference string to a local `Type/id` when it is one:
/// strips `{base}/` and a trailing `/_history/N`. Returns `None` for
/// contained (`#x`), external, `urn:` and malformed references.
pub(crate) fn local_ref(reference: &str, base: &str) -> Option<String> {
    let r = reference
        .strip_prefix(base)
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or(reference);
    let mut parts = r.split('/');
    let t = parts.next()?;
    let id = parts.next()?;
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => {}
        (Some("_history"), Some(_), None) => {}
        _ => return None,
    }
    (looks_like_type(t) && valid_id(id)).then(|| format!("{t}/{id}"))
}

/// Every `reference` string anywhere in `v` that is a local reference.
pub(crate) fn collect_local_refs(v: &Value, base: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "reference" {
                    if let Some(r) = x.as_str().and_then(|s| local_ref(s, base)) {
                        out.push(r);
                    }
                } else {
                    collect_local_refs(x, base, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_local_refs(x, base, out)),
        _ => {}
    }
}

/// Rewrites every `reference` whose value is a key of `map` (e.g.
/// `urn:uuid:X` -> `Patient/X`).
pub(crate) fn rewrite_refs(v: &mut Value, map: &std::collections::HashMap<String, String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "reference" {
                    if let Some(new) = x.as_str().and_then(|s| map.get(s)) {
                        *x = Value::String(new.clone());
                    }
                } else {
                    rewrite_refs(x, map);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_refs(x, map)),
        _ => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn local_refs() {
        let b = "http://x/fhir";
        assert_eq!(local_ref("Patient/1", b).as_deref(), Some("Patient/1"));
        assert_eq!(
            local_ref("http://x/fhir/Patient/1/_history/3", b).as_deref(),
            Some("Patient/1")
        );
        assert_eq!(local_ref("http://other/Patient/1", b), None);
        assert_eq!(local_ref("#contained", b), None);
        assert_eq!(local_ref("urn:uuid:abc", b), None);
        assert_eq!(local_ref("Patient/1/2", b), None);
    }

    #[test]
    fn put_sets_meta_and_versions() {
        let mut s = Store::default();
        let r = json!({"name": [{"family": "X"}], "meta": {"versionId": "9", "tag": [{"code": "t"}]}, "resourceType": "Patient"});
        let p = s.put("Patient", "a", r, "2024-01-01T00:00:00.000Z", "http://x");
        assert!(p.created);
        assert_eq!(p.version, 1);
        let keys: Vec<_> = p.resource.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["resourceType", "id", "meta", "name"]);
        assert_eq!(p.resource["meta"]["versionId"], "1");
        assert_eq!(p.resource["meta"]["tag"][0]["code"], "t");
        let p2 = s.put("Patient", "a", json!({}), "t2", "http://x");
        assert!(!p2.created);
        assert_eq!(p2.version, 2);
        assert_eq!(s.delete("Patient", "a", "t3"), Some(3));
        assert_eq!(s.delete("Patient", "a", "t4"), None);
        assert!(s.current("Patient", "a").is_none());
        assert!(s.live_types().is_empty());
    }
}
