//! Behaviour tests over the demo data in `conf/demo/data` (4 Synthea
//! patients). Expected numbers are computed independently from the raw
//! bundle files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use caregate_sandbox::{Sandbox, SandboxRequest, SandboxResponse};
use serde_json::{json, Value};

const BASE: &str = "http://127.0.0.1:8100/fhir";

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../conf/demo/data")
}

fn sandbox() -> Sandbox {
    let sb = Sandbox::new(BASE);
    let n = sb.load_dir(&data_dir()).expect("demo data loads");
    assert_eq!(n, raw_resources().len());
    sb
}

/// Every resource of every raw bundle, with its fullUrl.
fn raw_resources() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let b: Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        for e in b["entry"].as_array().unwrap() {
            out.push((
                e["fullUrl"].as_str().unwrap().to_string(),
                e["resource"].clone(),
            ));
        }
    }
    out
}

fn raw_patient_ids() -> Vec<String> {
    raw_resources()
        .into_iter()
        .filter(|(_, r)| r["resourceType"] == "Patient")
        .map(|(_, r)| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// Whether any `reference` in `v` equals `target`.
fn references(v: &Value, target: &str) -> bool {
    match v {
        Value::Object(m) => m
            .iter()
            .any(|(k, x)| (k == "reference" && x == target) || references(x, target)),
        Value::Array(a) => a.iter().any(|x| references(x, target)),
        _ => false,
    }
}

fn req<'a>(method: &'a str, path: &'a str, query: &'a str, body: &'a [u8]) -> SandboxRequest<'a> {
    SandboxRequest {
        method,
        path,
        query,
        body,
        content_type: None,
        if_match: None,
    }
}

fn call(sb: &Sandbox, method: &str, path: &str, query: &str, body: &[u8]) -> (u16, Value) {
    let r = sb.handle(&req(method, path, query, body));
    check_response(&r);
    let v = if r.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&r.body).unwrap()
    };
    (r.status, v)
}

fn get(sb: &Sandbox, path: &str, query: &str) -> (u16, Value) {
    call(sb, "GET", path, query, b"")
}

/// Invariants of every response: JSON body, FHIR content type, errors are
/// OperationOutcomes, and every URL starts with the base.
fn check_response(r: &SandboxResponse) {
    assert_eq!(r.content_type, "application/fhir+json");
    if let Some(l) = &r.location {
        assert!(l.starts_with(&format!("{BASE}/")), "{l}");
    }
    if r.body.is_empty() {
        return;
    }
    let v: Value = serde_json::from_slice(&r.body).expect("body is JSON");
    if r.status >= 400 {
        assert_eq!(v["resourceType"], "OperationOutcome", "{v}");
        assert!(v["issue"][0]["diagnostics"].is_string());
    }
    check_urls(&v);
}

fn check_urls(v: &Value) {
    if v["resourceType"] == "Bundle" {
        for l in v["link"].as_array().into_iter().flatten() {
            let url = l["url"].as_str().unwrap();
            assert!(url.starts_with(&format!("{BASE}/")), "{url}");
        }
        for e in v["entry"].as_array().into_iter().flatten() {
            if let Some(fu) = e["fullUrl"].as_str() {
                assert!(fu.starts_with(&format!("{BASE}/")), "{fu}");
            }
            if let Some(l) = e["response"]["location"].as_str() {
                assert!(l.starts_with(&format!("{BASE}/")), "{l}");
            }
            check_urls(&e["resource"]);
        }
    }
}

fn entries(b: &Value) -> Vec<Value> {
    b["entry"].as_array().cloned().unwrap_or_default()
}

fn by_mode(b: &Value, mode: &str) -> Vec<Value> {
    entries(b)
        .into_iter()
        .filter(|e| e["search"]["mode"] == mode)
        .collect()
}

fn link(b: &Value, rel: &str) -> Option<String> {
    b["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == rel)
        .and_then(|l| l["url"].as_str())
        .map(str::to_string)
}

/// Splits an absolute link into (path, query) relative to the base.
fn split_link(url: &str) -> (String, String) {
    let rest = url.strip_prefix(BASE).expect("link starts with base");
    let (p, q) = rest.split_once('?').unwrap_or((rest, ""));
    (p.to_string(), q.to_string())
}

/// Follows `next` links from a first page; returns every entry and the
/// number of pages.
fn walk_pages(sb: &Sandbox, path: &str, query: &str) -> (Vec<Value>, usize, u64) {
    let (status, first) = get(sb, path, query);
    assert_eq!(status, 200, "{first}");
    let total = first["total"].as_u64().unwrap();
    let mut all = entries(&first);
    let mut pages = 1;
    let mut next = link(&first, "next");
    while let Some(url) = next {
        let (p, q) = split_link(&url);
        let (status, page) = get(sb, &p, &q);
        assert_eq!(status, 200);
        assert_eq!(page["total"].as_u64().unwrap(), total);
        assert!(link(&page, "previous").is_some());
        all.extend(entries(&page));
        pages += 1;
        next = link(&page, "next");
        assert!(pages < 1000);
    }
    (all, pages, total)
}

#[test]
fn loads_four_patients() {
    let sb = sandbox();
    let (status, b) = get(&sb, "/Patient", "");
    assert_eq!(status, 200);
    assert_eq!(b["resourceType"], "Bundle");
    assert_eq!(b["type"], "searchset");
    assert_eq!(b["total"], 4);
    let ids: HashSet<String> = entries(&b)
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, raw_patient_ids().into_iter().collect());
    for e in entries(&b) {
        let id = e["resource"]["id"].as_str().unwrap();
        assert_eq!(e["fullUrl"], format!("{BASE}/Patient/{id}"));
        assert_eq!(e["search"]["mode"], "match");
        assert_eq!(e["resource"]["meta"]["versionId"], "1");
        assert!(e["resource"]["meta"]["lastUpdated"].is_string());
    }
    // Per-type totals match the raw files.
    let mut raw_counts: BTreeMap<String, u64> = BTreeMap::new();
    for (_, r) in raw_resources() {
        *raw_counts
            .entry(r["resourceType"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for (t, n) in &raw_counts {
        let (status, b) = get(&sb, &format!("/{t}"), "_summary=count");
        assert_eq!(status, 200);
        assert_eq!(b["total"].as_u64().unwrap(), *n, "{t}");
        assert!(b.get("entry").is_none());
    }
}

#[test]
fn references_are_rewritten() {
    let sb = sandbox();
    let (_, b) = get(&sb, "/Observation", "_count=200");
    for e in entries(&b) {
        let r = e["resource"]["subject"]["reference"].as_str().unwrap();
        assert!(r.starts_with("Patient/"), "{r}");
        let (status, _) = get(&sb, &format!("/{r}"), "");
        assert_eq!(status, 200);
    }
    let raw = serde_json::to_string(&b).unwrap();
    assert!(!raw.contains("urn:uuid:"));
}

#[test]
fn observation_search_by_patient() {
    let sb = sandbox();
    let raw = raw_resources();
    for pid in raw_patient_ids() {
        let expected = raw
            .iter()
            .filter(|(_, r)| {
                r["resourceType"] == "Observation"
                    && r["subject"]["reference"] == format!("urn:uuid:{pid}")
            })
            .count() as u64;
        assert!(expected > 0);
        let forms = [
            format!("patient={pid}"),
            format!("patient=Patient/{pid}"),
            format!(
                "patient={}",
                format!("{BASE}/Patient/{pid}")
                    .replace(':', "%3A")
                    .replace('/', "%2F")
            ),
            format!("subject=Patient%2F{pid}"),
            format!("subject:Patient={pid}"),
        ];
        for q in forms {
            let (status, b) = get(&sb, "/Observation", &format!("{q}&_count=200"));
            assert_eq!(status, 200, "{q}: {b}");
            assert_eq!(b["total"].as_u64().unwrap(), expected, "{q}");
            assert_eq!(entries(&b).len() as u64, expected);
            for e in entries(&b) {
                assert_eq!(
                    e["resource"]["subject"]["reference"],
                    format!("Patient/{pid}")
                );
            }
        }
        // Compartment search gives the same set.
        let (status, b) = get(&sb, &format!("/Patient/{pid}/Observation"), "_count=200");
        assert_eq!(status, 200);
        assert_eq!(b["total"].as_u64().unwrap(), expected);
        assert!(link(&b, "self")
            .unwrap()
            .starts_with(&format!("{BASE}/Patient/{pid}/Observation?")));
    }
    // Unknown patient: empty searchset, no entries.
    let (status, b) = get(&sb, "/Observation", "patient=nobody");
    assert_eq!(status, 200);
    assert_eq!(b["total"], 0);
    assert!(b.get("entry").is_none());
    // patient on Patient means _id; _id takes a comma list.
    let ids = raw_patient_ids();
    let (_, b) = get(&sb, "/Patient", &format!("patient={}", ids[0]));
    assert_eq!(b["total"], 1);
    let (_, b) = get(&sb, "/Patient", &format!("_id={},{},nope", ids[0], ids[1]));
    assert_eq!(b["total"], 2);
    // Immunization has `patient` (and `subject` falls back to it).
    let expected = raw
        .iter()
        .filter(|(_, r)| {
            r["resourceType"] == "Immunization"
                && r["patient"]["reference"] == format!("urn:uuid:{}", ids[0])
        })
        .count() as u64;
    let (_, b) = get(&sb, "/Immunization", &format!("patient={}", ids[0]));
    assert_eq!(b["total"].as_u64().unwrap(), expected);
    let (_, b) = get(&sb, "/Immunization", &format!("subject=Patient/{}", ids[0]));
    assert_eq!(b["total"].as_u64().unwrap(), expected);
}

#[test]
fn paging_visits_every_match_once() {
    let sb = sandbox();
    let pid = &raw_patient_ids()[0];
    for count in [1usize, 7, 50] {
        let (all, pages, total) = walk_pages(
            &sb,
            "/Observation",
            &format!("patient={pid}&_count={count}"),
        );
        assert_eq!(all.len() as u64, total);
        assert_eq!(pages, (total as usize).div_ceil(count));
        let ids: HashSet<&str> = all
            .iter()
            .map(|e| e["resource"]["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), all.len(), "no duplicates");
    }
    // All Observations, default page size, capped _count.
    let (all, pages, total) = walk_pages(&sb, "/Observation", "");
    assert_eq!(all.len() as u64, total);
    assert_eq!(pages, (total as usize).div_ceil(50));
    let (_, b) = get(&sb, "/Observation", "_count=100000");
    assert_eq!(entries(&b).len(), 152);
    assert!(link(&b, "self").unwrap().contains("_count=200"), "capped");
    // Links carry the search parameters, re-encoded.
    let (_, b) = get(
        &sb,
        "/Observation",
        "code=http%3A%2F%2Floinc.org%7C8302-2&_count=2",
    );
    let next = link(&b, "next").unwrap();
    assert!(next.contains("code=http://loinc.org%7C8302-2"), "{next}");
    assert!(next.contains("_offset=2"));
    // Offset beyond the end: empty page, total still right.
    let (status, b) = get(&sb, "/Observation", "_offset=100000");
    assert_eq!(status, 200);
    assert_eq!(b["total"], 152);
    assert!(b.get("entry").is_none());
}

#[test]
fn include_and_revinclude() {
    let sb = sandbox();
    let pid = &raw_patient_ids()[1];
    for inc in [
        "Observation:patient",
        "Observation:subject",
        "Observation:subject:Patient",
    ] {
        let (status, b) = get(
            &sb,
            "/Observation",
            &format!("patient={pid}&_count=5&_include={inc}"),
        );
        assert_eq!(status, 200, "{b}");
        assert_eq!(by_mode(&b, "match").len(), 5);
        let inc = by_mode(&b, "include");
        assert_eq!(inc.len(), 1);
        assert_eq!(inc[0]["resource"]["resourceType"], "Patient");
        assert_eq!(inc[0]["resource"]["id"], pid.as_str());
        assert_eq!(inc[0]["fullUrl"], format!("{BASE}/Patient/{pid}"));
    }
    // Encounter:patient, plus the wildcard.
    let (_, b) = get(
        &sb,
        "/Encounter",
        &format!("patient={pid}&_include=Encounter:patient"),
    );
    assert_eq!(by_mode(&b, "include").len(), 1);
    let (_, b) = get(&sb, "/Encounter", &format!("patient={pid}&_include=*"));
    let types: HashSet<String> = by_mode(&b, "include")
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().unwrap().to_string())
        .collect();
    assert!(
        types.contains("Patient") && types.contains("Practitioner"),
        "{types:?}"
    );

    // _revinclude: Patient + all its Observations / Encounters.
    let raw = raw_resources();
    let count = |t: &str, field: &str| {
        raw.iter()
            .filter(|(_, r)| {
                r["resourceType"] == t && r[field]["reference"] == format!("urn:uuid:{pid}")
            })
            .count()
    };
    let (status, b) = get(
        &sb,
        "/Patient",
        &format!("_id={pid}&_revinclude=Observation:patient&_revinclude=Encounter:subject"),
    );
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["total"], 1);
    let inc = by_mode(&b, "include");
    let obs = inc
        .iter()
        .filter(|e| e["resource"]["resourceType"] == "Observation")
        .count();
    let enc = inc
        .iter()
        .filter(|e| e["resource"]["resourceType"] == "Encounter")
        .count();
    assert_eq!(obs, count("Observation", "subject"));
    assert_eq!(enc, count("Encounter", "subject"));
    assert_eq!(inc.len(), obs + enc);

    // Bad include parameters are rejected.
    for q in [
        "_include=Observation:nope",
        "_include=Observation",
        "_revinclude=*",
        "_include=Observation:code",
    ] {
        let (status, _) = get(&sb, "/Observation", q);
        assert_eq!(status, 400, "{q}");
    }
}

#[test]
fn everything() {
    let sb = sandbox();
    let raw = raw_resources();
    for pid in raw_patient_ids() {
        let target = format!("urn:uuid:{pid}");
        let expected = 1 + raw
            .iter()
            .filter(|(_, r)| r["id"] != pid.as_str() && references(r, &target))
            .count();
        let (all, pages, total) =
            walk_pages(&sb, &format!("/Patient/{pid}/$everything"), "_count=20");
        assert_eq!(total as usize, expected);
        assert_eq!(all.len(), expected);
        assert_eq!(pages, expected.div_ceil(20));
        assert_eq!(all[0]["resource"]["resourceType"], "Patient");
        assert_eq!(all[0]["resource"]["id"], pid.as_str());
        let ids: HashSet<String> = all
            .iter()
            .map(|e| e["fullUrl"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids.len(), expected);
    }
    let (status, _) = get(&sb, "/Patient/unknown-patient/$everything", "");
    assert_eq!(status, 404);
    let (status, b) = get(
        &sb,
        &format!("/Patient/{}/$everything", raw_patient_ids()[0]),
        "_type=Patient,Condition",
    );
    assert_eq!(status, 200);
    for e in entries(&b) {
        let t = e["resource"]["resourceType"].as_str().unwrap();
        assert!(t == "Patient" || t == "Condition");
    }
}

#[test]
fn token_searches() {
    let sb = sandbox();
    let raw = raw_resources();
    let with_category = |code: &str| {
        raw.iter()
            .filter(|(_, r)| {
                r["resourceType"] == "Observation"
                    && r["category"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|c| c["coding"].as_array().into_iter().flatten())
                        .any(|c| c["code"] == code)
            })
            .count() as u64
    };
    let mut sum = 0;
    for cat in ["laboratory", "vital-signs", "survey"] {
        let expected = with_category(cat);
        assert!(expected > 0);
        sum += expected;
        let (_, b) = get(&sb, "/Observation", &format!("category={cat}"));
        assert_eq!(b["total"].as_u64().unwrap(), expected, "{cat}");
        let sys = "http://terminology.hl7.org/CodeSystem/observation-category";
        let (_, b) = get(&sb, "/Observation", &format!("category={sys}|{cat}"));
        assert_eq!(b["total"].as_u64().unwrap(), expected, "{cat}");
        let (_, b) = get(&sb, "/Observation", &format!("category=http://wrong|{cat}"));
        assert_eq!(b["total"], 0);
    }
    let (_, all) = get(&sb, "/Observation", "_summary=count");
    assert_eq!(sum, all["total"].as_u64().unwrap());
    // OR within a parameter.
    let (_, b) = get(&sb, "/Observation", "category=laboratory,vital-signs");
    assert_eq!(
        b["total"].as_u64().unwrap(),
        with_category("laboratory") + with_category("vital-signs")
    );
    // AND across parameters: category + patient + code.
    let pid = &raw_patient_ids()[0];
    let expected = raw
        .iter()
        .filter(|(_, r)| {
            r["resourceType"] == "Observation"
                && r["subject"]["reference"] == format!("urn:uuid:{pid}")
                && r["code"]["coding"][0]["code"] == "8302-2"
        })
        .count() as u64;
    assert!(expected > 0);
    let (_, b) = get(
        &sb,
        "/Observation",
        &format!("patient={pid}&category=vital-signs&code=http%3A%2F%2Floinc.org%7C8302-2"),
    );
    assert_eq!(b["total"].as_u64().unwrap(), expected);
    // code:text, gender, name (with '+' as a space).
    let (_, b) = get(&sb, "/Observation", "code:text=body+height");
    assert!(b["total"].as_u64().unwrap() >= expected);
    let (_, b) = get(&sb, "/Patient", "gender=female");
    assert_eq!(b["total"], 1);
    let (_, b) = get(&sb, "/Patient", "gender=male");
    assert_eq!(b["total"], 3);
    let liz = raw
        .iter()
        .find(|(_, r)| r["resourceType"] == "Patient" && r["gender"] == "female")
        .unwrap();
    let given = liz.1["name"][0]["given"][0].as_str().unwrap();
    let family = liz.1["name"][0]["family"].as_str().unwrap();
    let (_, b) = get(&sb, "/Patient", &format!("name={}+{}", given, family));
    assert_eq!(b["total"], 1, "{given} {family}");
    let (_, b) = get(
        &sb,
        "/Patient",
        &format!("family={}", &family[..3].to_lowercase()),
    );
    assert_eq!(b["total"], 1);
    let birth = liz.1["birthDate"].as_str().unwrap();
    let (_, b) = get(&sb, "/Patient", &format!("birthdate={birth}"));
    assert_eq!(b["total"], 1);
    let (_, b) = get(&sb, "/Patient", "birthdate=lt1800");
    assert_eq!(b["total"], 0);
    let (_, b) = get(&sb, "/Patient", "_tag=synthea-5-2019");
    assert_eq!(b["total"], 4);
}

#[test]
fn post_search_with_form_body() {
    let sb = sandbox();
    let pid = &raw_patient_ids()[2];
    let (_, via_get) = get(
        &sb,
        "/Observation",
        &format!("patient={pid}&category=laboratory"),
    );
    let body = format!("patient=Patient%2F{pid}&category=laboratory");
    let r = sb.handle(&SandboxRequest {
        method: "POST",
        path: "/Observation/_search",
        query: "",
        body: body.as_bytes(),
        content_type: Some("application/x-www-form-urlencoded; charset=utf-8"),
        if_match: None,
    });
    check_response(&r);
    assert_eq!(r.status, 200);
    let via_post: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(via_post["total"], via_get["total"]);
    assert!(link(&via_post, "self")
        .unwrap()
        .starts_with(&format!("{BASE}/Observation?")));
    // '+' is a space in form bodies: an unknown name finds nothing.
    let r = sb.handle(&SandboxRequest {
        method: "POST",
        path: "/Patient/_search",
        query: "",
        body: b"name=No+Such+Person",
        content_type: Some("application/x-www-form-urlencoded"),
        if_match: None,
    });
    assert_eq!(r.status, 200);
    let b: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(b["total"], 0);
    // Wrong content type for a _search body.
    let r = sb.handle(&SandboxRequest {
        method: "POST",
        path: "/Patient/_search",
        query: "",
        body: b"{}",
        content_type: Some("application/json"),
        if_match: None,
    });
    assert_eq!(r.status, 415);
}

#[test]
fn crud_round_trip() {
    let sb = sandbox();
    let body =
        json!({"resourceType": "Patient", "id": "ignored", "name": [{"family": "Roundtrip"}]});
    let r = sb.handle(&SandboxRequest {
        method: "POST",
        path: "/Patient",
        query: "",
        body: body.to_string().as_bytes(),
        content_type: Some("application/fhir+json; charset=utf-8"),
        if_match: None,
    });
    check_response(&r);
    assert_eq!(r.status, 201);
    let created: Value = serde_json::from_slice(&r.body).unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_ne!(id, "ignored");
    assert_eq!(
        r.location.as_deref(),
        Some(format!("{BASE}/Patient/{id}/_history/1").as_str())
    );
    assert_eq!(r.etag.as_deref(), Some("W/\"1\""));

    let (status, got) = get(&sb, &format!("/Patient/{id}"), "");
    assert_eq!(status, 200);
    assert_eq!(got["name"][0]["family"], "Roundtrip");
    assert_eq!(got["meta"]["versionId"], "1");
    let (_, b) = get(&sb, "/Patient", "_summary=count");
    assert_eq!(b["total"], 5);

    let mut upd = got.clone();
    upd["name"][0]["family"] = json!("Updated");
    let (status, updated) = call(
        &sb,
        "PUT",
        &format!("/Patient/{id}"),
        "",
        upd.to_string().as_bytes(),
    );
    assert_eq!(status, 200);
    assert_eq!(updated["meta"]["versionId"], "2");
    let (_, v1) = get(&sb, &format!("/Patient/{id}/_history/1"), "");
    assert_eq!(v1["name"][0]["family"], "Roundtrip");
    let (_, v2) = get(&sb, &format!("/Patient/{id}/_history/2"), "");
    assert_eq!(v2["name"][0]["family"], "Updated");
    let (status, _) = get(&sb, &format!("/Patient/{id}/_history/3"), "");
    assert_eq!(status, 404);
    let (_, h) = get(&sb, &format!("/Patient/{id}/_history"), "");
    assert_eq!(h["type"], "history");
    assert_eq!(h["total"], 2);

    // Update-as-create with a client id.
    let (status, _) = call(
        &sb,
        "PUT",
        "/Patient/client-chosen-1",
        "",
        br#"{"resourceType":"Patient","id":"client-chosen-1"}"#,
    );
    assert_eq!(status, 201);
    // Mismatched id / type.
    let (status, _) = call(
        &sb,
        "PUT",
        "/Patient/abc",
        "",
        br#"{"resourceType":"Patient","id":"xyz"}"#,
    );
    assert_eq!(status, 400);
    let (status, _) = call(
        &sb,
        "PUT",
        "/Patient/abc",
        "",
        br#"{"resourceType":"Observation"}"#,
    );
    assert_eq!(status, 400);

    let (status, out) = call(&sb, "DELETE", &format!("/Patient/{id}"), "", b"");
    assert_eq!(status, 200);
    assert_eq!(out["resourceType"], "OperationOutcome");
    let (status, _) = get(&sb, &format!("/Patient/{id}"), "");
    assert_eq!(status, 410);
    let (_, b) = get(&sb, "/Patient", "_summary=count");
    assert_eq!(b["total"], 5); // 4 + client-chosen-1
    let (status, _) = call(&sb, "DELETE", "/Patient/never-existed", "", b"");
    assert_eq!(status, 404);
    // HEAD: same status, no body.
    let r = sb.handle(&req("HEAD", "/Patient/client-chosen-1", "", b""));
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
}

#[test]
fn batch() {
    let sb = sandbox();
    let pid = &raw_patient_ids()[0];
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": format!("/Patient/{pid}")}},
            {"request": {"method": "GET", "url": format!("Condition?patient={pid}")}},
            {"request": {"method": "GET", "url": "Patient/nope"}},
            {"resource": {"resourceType": "Patient", "name": [{"family": "Batch"}]},
             "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "PATCH", "url": format!("Patient/{pid}")}},
            {"request": {"method": "GET", "url": "Observation?not-a-param=1"}}
        ]
    });
    let (status, b) = call(&sb, "POST", "/", "", bundle.to_string().as_bytes());
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["type"], "batch-response");
    let e = entries(&b);
    assert_eq!(e.len(), 6);
    assert_eq!(e[0]["response"]["status"], "200 OK");
    assert_eq!(e[0]["resource"]["id"], pid.as_str());
    assert_eq!(e[1]["resource"]["type"], "searchset");
    assert_eq!(e[2]["response"]["status"], "404 Not Found");
    assert_eq!(
        e[2]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(e[3]["response"]["status"], "201 Created");
    let loc = e[3]["response"]["location"].as_str().unwrap();
    assert!(loc.starts_with(&format!("{BASE}/Patient/")));
    assert_eq!(e[4]["response"]["status"], "405 Method Not Allowed");
    assert_eq!(e[5]["response"]["status"], "400 Bad Request");
    // The batch's create was applied even though other entries failed.
    let (_, b) = get(&sb, "/Patient", "family=Batch");
    assert_eq!(b["total"], 1);
}

#[test]
fn transaction_resolves_urns() {
    let sb = sandbox();
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:11111111-2222-3333-4444-555555555555",
             "resource": {"resourceType": "Observation", "status": "final",
                          "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
                          "subject": {"reference": "urn:uuid:aaaaaaaa-2222-3333-4444-555555555555"}},
             "request": {"method": "POST", "url": "Observation"}},
            {"fullUrl": "urn:uuid:aaaaaaaa-2222-3333-4444-555555555555",
             "resource": {"resourceType": "Patient", "name": [{"family": "Txn"}]},
             "request": {"method": "POST", "url": "/Patient"}},
            {"resource": {"resourceType": "Patient", "id": "txn-put", "gender": "other"},
             "request": {"method": "PUT", "url": "Patient/txn-put"}},
            {"request": {"method": "GET", "url": "Patient?family=Txn"}}
        ]
    });
    let (status, b) = call(&sb, "POST", "", "", bundle.to_string().as_bytes());
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["type"], "transaction-response");
    let e = entries(&b);
    assert_eq!(e.len(), 4);
    assert_eq!(e[0]["response"]["status"], "201 Created");
    assert_eq!(e[1]["response"]["status"], "201 Created");
    assert_eq!(e[2]["response"]["status"], "201 Created");
    assert_eq!(e[3]["response"]["status"], "200 OK");
    assert_eq!(e[3]["resource"]["total"], 1, "GET runs after the POSTs");
    let obs_loc = e[0]["response"]["location"].as_str().unwrap();
    let pat_loc = e[1]["response"]["location"].as_str().unwrap();
    let (p, _) = split_link(obs_loc);
    let (status, obs) = get(&sb, &p, "");
    assert_eq!(status, 200);
    let pat_ref = obs["subject"]["reference"].as_str().unwrap();
    assert!(
        pat_loc.starts_with(&format!("{BASE}/{pat_ref}/_history/")),
        "{pat_ref} {pat_loc}"
    );
    let (status, _) = get(&sb, &format!("/{pat_ref}"), "");
    assert_eq!(status, 200);
    let (_, b) = get(&sb, "/Observation", &format!("patient={pat_ref}"));
    assert_eq!(b["total"], 1);
}

#[test]
fn transaction_rolls_back() {
    let sb = sandbox();
    let pid = raw_patient_ids()[0].clone();
    let (_, before_obs) = get(&sb, "/Observation", "_summary=count");
    let cases = [
        // A missing resource to delete.
        json!({"request": {"method": "DELETE", "url": "Patient/does-not-exist"}}),
        // Type mismatch.
        json!({"resource": {"resourceType": "Observation"}, "request": {"method": "PUT", "url": "Patient/x"}}),
        // A failing read.
        json!({"request": {"method": "GET", "url": "Patient/does-not-exist"}}),
        // Unsupported method.
        json!({"request": {"method": "PATCH", "url": format!("Patient/{pid}")}}),
    ];
    for bad in cases {
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": {"resourceType": "Patient", "name": [{"family": "Rollback"}]},
                 "request": {"method": "POST", "url": "Patient"}},
                {"request": {"method": "DELETE", "url": format!("Patient/{pid}")}},
                {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}},
                 "request": {"method": "POST", "url": "Observation"}},
                bad
            ]
        });
        let (status, out) = call(&sb, "POST", "/", "", bundle.to_string().as_bytes());
        assert_eq!(status, 400, "{out}");
        assert_eq!(out["resourceType"], "OperationOutcome");
        let (_, b) = get(&sb, "/Patient", "family=Rollback");
        assert_eq!(b["total"], 0);
        let (status, _) = get(&sb, &format!("/Patient/{pid}"), "");
        assert_eq!(status, 200, "the delete was rolled back");
        let (_, after_obs) = get(&sb, "/Observation", "_summary=count");
        assert_eq!(after_obs["total"], before_obs["total"]);
    }
}

#[test]
fn metadata() {
    let sb = sandbox();
    let (status, cs) = get(&sb, "/metadata", "");
    assert_eq!(status, 200);
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    assert_eq!(cs["kind"], "instance");
    assert_eq!(cs["rest"][0]["mode"], "server");
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    let types: HashSet<&str> = resources
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    let raw_types: HashSet<String> = raw_resources()
        .iter()
        .map(|(_, r)| r["resourceType"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types.len(), raw_types.len());
    for t in &raw_types {
        assert!(types.contains(t.as_str()), "{t}");
    }
    let obs = resources
        .iter()
        .find(|r| r["type"] == "Observation")
        .unwrap();
    let codes: HashSet<&str> = obs["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["code"].as_str().unwrap())
        .collect();
    for c in ["read", "search-type", "create", "update", "delete"] {
        assert!(codes.contains(c));
    }
    let params: HashSet<&str> = obs["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for p in ["_id", "patient", "subject", "category", "code"] {
        assert!(params.contains(p), "{p}");
    }
    assert_eq!(call(&sb, "POST", "/metadata", "", b"{}").0, 405);
}

#[test]
fn errors_are_operation_outcomes() {
    let sb = sandbox();
    let cases: &[(&str, &str, &str, &[u8], u16)] = &[
        ("GET", "/Observation", "not-a-param=1", b"", 400),
        ("GET", "/Observation", "code:bogus=1", b"", 400),
        ("GET", "/Patient", "code=1", b"", 400),
        ("GET", "/Observation", "_count=abc", b"", 400),
        ("GET", "/Observation", "_count=-1", b"", 400),
        ("GET", "/Observation", "code=%zz", b"", 400),
        ("GET", "/Patient", "birthdate=yesterday", b"", 400),
        ("GET", "/NotAType", "", b"", 400),
        ("GET", "/patient", "", b"", 400),
        ("GET", "/Patient/bad_id!", "", b"", 400),
        ("GET", "/Patient/does-not-exist", "", b"", 404),
        ("GET", "/Patient/x/_history/abc", "", b"", 404),
        ("GET", "/Observation/x/Patient", "", b"", 400),
        ("GET", "/Patient/x/Organization", "", b"", 400),
        ("GET", "/a/b/c/d/e", "", b"", 404),
        ("GET", "/", "", b"", 400),
        ("POST", "/Patient", "", b"{not json", 400),
        ("POST", "/Patient", "", b"", 400),
        ("POST", "/Patient", "", b"[1,2]", 400),
        (
            "POST",
            "/Patient",
            "",
            br#"{"resourceType":"Observation"}"#,
            400,
        ),
        (
            "POST",
            "/Patient",
            "",
            br#"{"resourceType":"Patient","id":5}"#,
            400,
        ),
        ("POST", "/", "", b"{not json", 400),
        ("POST", "/", "", br#"{"resourceType":"Patient"}"#, 400),
        (
            "POST",
            "/",
            "",
            br#"{"resourceType":"Bundle","type":"collection"}"#,
            400,
        ),
        (
            "POST",
            "/",
            "",
            br#"{"resourceType":"Bundle","type":"batch","entry":{}}"#,
            400,
        ),
        (
            "POST",
            "/",
            "",
            br#"{"resourceType":"Bundle","type":"transaction","entry":[{}]}"#,
            400,
        ),
        ("PATCH", "/Patient/x", "", b"{}", 415),
        ("DELETE", "/Patient", "", b"", 405),
        ("PUT", "/Patient", "", b"{}", 405),
        ("OPTIONS", "/metadata", "", b"", 405),
        ("GET", "/_history", "", b"", 400),
        ("GET", "/Patient/$everything", "", b"", 400),
    ];
    for (method, path, query, body, want) in cases {
        let (status, v) = call(&sb, method, path, query, body);
        assert_eq!(status, *want, "{method} {path}?{query}: {v}");
        assert_eq!(v["resourceType"], "OperationOutcome");
    }
    let r = sb.handle(&SandboxRequest {
        method: "POST",
        path: "/Patient",
        query: "",
        body: b"<Patient/>",
        content_type: Some("application/fhir+xml"),
        if_match: None,
    });
    assert_eq!(r.status, 415);
    // Empty batch is fine.
    let (status, b) = call(
        &sb,
        "POST",
        "/",
        "",
        br#"{"resourceType":"Bundle","type":"batch"}"#,
    );
    assert_eq!(status, 200);
    assert_eq!(b["type"], "batch-response");
}

/// A tiny deterministic PRNG for the garbage test.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() as usize) % xs.len()]
    }
}

#[test]
fn garbage_never_panics() {
    let sb = sandbox();
    let pid = raw_patient_ids()[0].clone();
    let methods = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "get", "", "\u{0}", "TRACE",
    ];
    let segs = [
        "Patient",
        "Observation",
        pid.as_str(),
        "_history",
        "1",
        "0",
        "99999999999999999999999",
        "$everything",
        "_search",
        "metadata",
        "",
        "..",
        "%2F",
        "é",
        "*",
        "Patient$",
        "_",
        "$",
        "\u{0}",
        "Bundle",
        "Encounter",
        "x.y-z",
    ];
    let keys = [
        "_count",
        "_offset",
        "patient",
        "subject",
        "code",
        "category",
        "_include",
        "_revinclude",
        "_id",
        "name",
        "birthdate",
        "code:text",
        "patient:missing",
        "subject:Patient",
        "",
        "%",
        "%%",
        "&",
        "=",
        "_type",
        "_summary",
        "gender:not",
        "name:exact",
        "_lastUpdated",
    ];
    let vals = [
        "",
        "1",
        "-1",
        "0",
        "x",
        "%zz",
        "%C3",
        "a|b",
        "|",
        "|x",
        "x|",
        ",",
        "\\",
        "\\,",
        "Observation:patient",
        "*",
        "Patient/",
        "/Patient/1",
        "http://127.0.0.1:8100/fhir/Patient/1",
        "true",
        "ge2020",
        "eq",
        "18446744073709551616",
        "+",
        "%00",
        "🙂",
    ];
    let bodies: [&[u8]; 10] = [
        b"",
        b"{",
        b"null",
        b"\xff\xfe",
        br#"{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"POST","url":"?"}}]}"#,
        br#"{"resourceType":"Bundle","type":"batch","entry":[1,{"request":{"method":5}},{"request":{"method":"GET","url":"/"}}]}"#,
        br#"{"resourceType":"Patient","meta":5,"id":"ok"}"#,
        br#"{"resourceType":"Bundle","type":"transaction","entry":[{"fullUrl":7,"resource":[],"request":{"method":"PUT","url":"Patient/a/b"}}]}"#,
        b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
        br#"{"resourceType":"Patient","name":[{"family":"Fuzz"}]}"#,
    ];
    let mut rng = Lcg(42);
    for _ in 0..3000 {
        let nseg = (rng.next() % 5) as usize;
        let path: String = (0..nseg).map(|_| format!("/{}", rng.pick(&segs))).collect();
        let nparams = (rng.next() % 4) as usize;
        let query = (0..nparams)
            .map(|_| format!("{}={}", rng.pick(&keys), rng.pick(&vals)))
            .collect::<Vec<_>>()
            .join("&");
        let method = rng.pick(&methods);
        let body = bodies[(rng.next() as usize) % bodies.len()];
        let ct = match rng.next() % 4 {
            0 => None,
            1 => Some("application/fhir+json"),
            2 => Some("application/x-www-form-urlencoded"),
            _ => Some("text/plain;;;"),
        };
        let r = sb.handle(&SandboxRequest {
            method,
            path: &path,
            query: &query,
            body,
            content_type: ct,
            if_match: None,
        });
        assert!(
            matches!(r.status, 200 | 201 | 400 | 404 | 405 | 410 | 415),
            "{method} {path}?{query} -> {}",
            r.status
        );
        check_response(&r);
    }
    // The store is still consistent afterwards.
    let (status, b) = get(&sb, "/metadata", "");
    assert_eq!(status, 200);
    assert!(b["rest"][0]["resource"].is_array());
}

#[test]
fn load_dir_errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("caregate-sandbox-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.json"),
        br#"{"resourceType":"Patient","id":"p1"}"#,
    )
    .unwrap();
    std::fs::write(dir.join("b.json"), b"{oops").unwrap();
    std::fs::write(dir.join("notes.txt"), b"ignored").unwrap();
    let sb = Sandbox::new("http://h/fhir/");
    let err = sb.load_dir(&dir).unwrap_err();
    assert!(err.contains("b.json"), "{err}");
    // Nothing was stored.
    let (status, _) = get(&sb, "/Patient/p1", "");
    assert_eq!(status, 404);
    std::fs::remove_file(dir.join("b.json")).unwrap();
    assert_eq!(sb.load_dir(&dir).unwrap(), 1);
    let r = sb.handle(&req("GET", "/Patient", "", b""));
    let b: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(b["entry"][0]["fullUrl"], "http://h/fhir/Patient/p1");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(Sandbox::new(BASE).load_dir(&dir).is_err());
    // insert()
    assert!(sb
        .insert(json!({"resourceType": "Patient", "id": "p2"}))
        .is_ok());
    assert!(sb
        .insert(json!({"resourceType": "patient", "id": "p3"}))
        .is_err());
    assert!(sb
        .insert(json!({"resourceType": "Patient", "id": "bad id"}))
        .is_err());
    assert!(sb.insert(json!([1])).is_err());
}
