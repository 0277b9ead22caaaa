//! Table-driven tests over the FHIR R4 REST grammar of `classify`.

use caregate_fhir::{classify, classify_relative_url, FhirRequest, Interaction, SearchParam};

/// A compact, comparable rendering of a classification.
fn summary(r: &FhirRequest) -> String {
    let mut s = r.interaction.as_str().to_owned();
    if let Some(t) = &r.resource_type {
        s += &format!(" type={t}");
    }
    if let Some(i) = &r.id {
        s += &format!(" id={i}");
    }
    if let Some(v) = &r.version_id {
        s += &format!(" vid={v}");
    }
    if let Some((t, i)) = &r.compartment {
        s += &format!(" comp={t}/{i}");
    }
    if let Some(o) = &r.operation {
        s += &format!(" op={o}");
    }
    for p in &r.params {
        s += &format!(" {}", param(p));
    }
    s
}

fn param(p: &SearchParam) -> String {
    let mut s = p.name.clone();
    if let Some(m) = &p.modifier {
        s += &format!(":{m}");
    }
    for c in &p.chain {
        s += &format!(".{c}");
    }
    format!("{s}[{}]", p.values.join("¦"))
}

const FORM: Option<&str> = Some("application/x-www-form-urlencoded");
const JSON: Option<&str> = Some("application/fhir+json");

type Case = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    &'static str,
);

/// (method, path, query, content type, body, expected summary or `ERR reason`)
const CASES: &[Case] = &[
    // --- read / vread / update / patch / delete
    ("GET", "/Patient/123", "", None, None, "read type=Patient id=123"),
    ("HEAD", "/Patient/123", "", None, None, "read type=Patient id=123"),
    ("GET", "Patient/123", "", None, None, "read type=Patient id=123"),
    ("GET", "/Patient/example", "_format=application/fhir+json", None, None, "read type=Patient id=example _format[application/fhir json]"),
    ("GET", "/Patient/01a2225c-7329-7681-ab88-3d9494dc7bdf", "", None, None, "read type=Patient id=01a2225c-7329-7681-ab88-3d9494dc7bdf"),
    ("GET", "/Observation/a.b-c", "", None, None, "read type=Observation id=a.b-c"),
    ("GET", "/Patient/123/_history/2", "", None, None, "vread type=Patient id=123 vid=2"),
    ("PUT", "/Patient/123", "", JSON, None, "update type=Patient id=123"),
    ("PATCH", "/Patient/123", "", Some("application/json-patch+json"), None, "patch type=Patient id=123"),
    ("DELETE", "/Patient/123", "", None, None, "delete type=Patient id=123"),
    // --- create, conditional create/update/patch/delete
    ("POST", "/Patient", "", JSON, None, "create type=Patient"),
    ("POST", "/Observation", "_format=json", JSON, None, "create type=Observation _format[json]"),
    ("PUT", "/Patient", "identifier=http://acme.org/mrns|12345", JSON, None, "conditional-update type=Patient identifier[http://acme.org/mrns|12345]"),
    ("PATCH", "/Patient", "identifier=x", None, None, "conditional-patch type=Patient identifier[x]"),
    ("DELETE", "/Observation", "patient=123&code=1234-5", None, None, "conditional-delete type=Observation patient[123] code[1234-5]"),
    // --- history
    ("GET", "/Patient/123/_history", "", None, None, "history-instance type=Patient id=123"),
    ("GET", "/Patient/_history", "_since=2020-01-01", None, None, "history-type type=Patient _since[2020-01-01]"),
    ("GET", "/_history", "_count=3", None, None, "history-system _count[3]"),
    // --- search-type (GET and POST _search)
    ("GET", "/Patient", "", None, None, "search-type type=Patient"),
    ("GET", "/Patient", "_count=5", None, None, "search-type type=Patient _count[5]"),
    ("GET", "/Observation", "patient=123&category=laboratory&_count=10", None, None, "search-type type=Observation patient[123] category[laboratory] _count[10]"),
    ("GET", "/Observation", "category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs&_sort=-date", None, None, "search-type type=Observation category[http://terminology.hl7.org/CodeSystem/observation-category|vital-signs] _sort[-date]"),
    ("GET", "/Observation", "code=http://loinc.org|8302-2,http://loinc.org|8867-4", None, None, "search-type type=Observation code[http://loinc.org|8302-2¦http://loinc.org|8867-4]"),
    ("GET", "/Observation", "code=http%3A%2F%2Floinc.org%7C8302-2", None, None, "search-type type=Observation code[http://loinc.org|8302-2]"),
    ("GET", "/Observation", "date=ge2020-01-01&date=lt2021-01-01", None, None, "search-type type=Observation date[ge2020-01-01] date[lt2021-01-01]"),
    ("GET", "/Observation", "date=ge2020-01-01T00:00:00%2B10:00", None, None, "search-type type=Observation date[ge2020-01-01T00:00:00+10:00]"),
    ("GET", "/Patient", "name=peter+parker", None, None, "search-type type=Patient name[peter parker]"),
    ("GET", "/Patient", "name:exact=Peter", None, None, "search-type type=Patient name:exact[Peter]"),
    ("GET", "/Patient", "gender:missing=true", None, None, "search-type type=Patient gender:missing[true]"),
    ("GET", "/Condition", "code:not-in=http://x.org/vs", None, None, "search-type type=Condition code:not-in[http://x.org/vs]"),
    ("GET", "/Observation", "subject:Patient=123", None, None, "search-type type=Observation subject:Patient[123]"),
    ("GET", "/Observation", "subject:Patient.name=peter", None, None, "search-type type=Observation subject:Patient.name[peter]"),
    ("GET", "/Observation", "patient.organization.name=acme", None, None, "search-type type=Observation patient.organization.name[acme]"),
    ("GET", "/Patient", "_has:Observation:patient:code=1234-5", None, None, "search-type type=Patient _has.Observation.patient.code[1234-5]"),
    ("GET", "/Patient", "_has:Observation:patient:_has:AuditEvent:entity:agent=MyUserId", None, None, "search-type type=Patient _has.Observation.patient._has.AuditEvent.entity.agent[MyUserId]"),
    ("GET", "/Patient", "_has:Observation:patient:code:text=glucose", None, None, "search-type type=Patient _has:text.Observation.patient.code[glucose]"),
    ("GET", "/Encounter", "patient=1&_include=Encounter:participant", None, None, "search-type type=Encounter patient[1] _include[Encounter:participant]"),
    ("GET", "/MedicationRequest", "_include=MedicationRequest:medication:Medication&_revinclude:iterate=Provenance:target", None, None, "search-type type=MedicationRequest _include[MedicationRequest:medication:Medication] _revinclude:iterate[Provenance:target]"),
    ("GET", "/Patient", "_include=*", None, None, "search-type type=Patient _include[*]"),
    ("GET", "/Observation", r"value-string=a\,b,c", None, None, "search-type type=Observation value-string[a,b¦c]"),
    ("GET", "/Observation", "value-string=a%5C%2Cb%2Cc", None, None, "search-type type=Observation value-string[a,b¦c]"),
    ("GET", "/Observation", r"code=a\|b", None, None, r"search-type type=Observation code[a\|b]"),
    ("GET", "/Observation", r"code-value-quantity=code$loinc\$x", None, None, r"search-type type=Observation code-value-quantity[code$loinc\$x]"),
    ("GET", "/Patient", "name=", None, None, "search-type type=Patient name[]"),
    ("GET", "/Patient", "a=1&&b=2&", None, None, "search-type type=Patient a[1] b[2]"),
    ("GET", "/Patient", "?name=x", None, None, "search-type type=Patient name[x]"),
    ("POST", "/Observation/_search", "_count=5", FORM, Some("patient=123&code=http%3A%2F%2Floinc.org%7C1234-5"), "search-type type=Observation _count[5] patient[123] code[http://loinc.org|1234-5]"),
    ("POST", "/Observation/_search", "", Some("application/x-www-form-urlencoded; charset=UTF-8"), Some("category=laboratory"), "search-type type=Observation category[laboratory]"),
    ("POST", "/Observation/_search", "patient=1", None, None, "search-type type=Observation patient[1]"),
    // --- search-system
    ("GET", "/", "_type=Condition,Observation&_lastUpdated=gt2020", None, None, "search-system _type[Condition¦Observation] _lastUpdated[gt2020]"),
    ("GET", "", "_content=cancer", None, None, "search-system _content[cancer]"),
    ("POST", "/_search", "", FORM, Some("_type=Patient&name=x"), "search-system _type[Patient] name[x]"),
    // --- compartment search
    ("GET", "/Patient/123/Observation", "code=1234-5", None, None, "search-compartment type=Observation comp=Patient/123 code[1234-5]"),
    ("GET", "/Patient/123/*", "", None, None, "search-compartment comp=Patient/123"),
    ("GET", "/Encounter/e1/Observation", "", None, None, "search-compartment type=Observation comp=Encounter/e1"),
    ("GET", "/Practitioner/p1/Encounter", "", None, None, "search-compartment type=Encounter comp=Practitioner/p1"),
    ("POST", "/Patient/123/Observation/_search", "", FORM, Some("code=x"), "search-compartment type=Observation comp=Patient/123 code[x]"),
    // --- capabilities, batch/transaction
    ("GET", "/metadata", "", None, None, "capabilities"),
    ("GET", "/metadata", "mode=terminology", None, None, "capabilities mode[terminology]"),
    ("POST", "/", "", JSON, None, "batch-or-transaction"),
    ("POST", "", "", Some("application/fhir+json; fhirVersion=4.0"), None, "batch-or-transaction"),
    // --- operations
    ("GET", "/Patient/123/$everything", "_count=20", None, None, "operation-instance type=Patient id=123 op=$everything _count[20]"),
    ("POST", "/Patient/123/$everything", "", JSON, None, "operation-instance type=Patient id=123 op=$everything"),
    ("GET", "/Patient/%24everything", "", None, None, "operation-type type=Patient op=$everything"),
    ("GET", "/$export", "_type=Patient,Observation&_since=2020", None, None, "operation-system op=$export _type[Patient¦Observation] _since[2020]"),
    ("GET", "/Patient/$export", "", None, None, "operation-type type=Patient op=$export"),
    ("GET", "/Group/g1/$export", "", None, None, "operation-instance type=Group id=g1 op=$export"),
    ("POST", "/Patient/$validate", "", JSON, None, "operation-type type=Patient op=$validate"),
    ("POST", "/ValueSet/$expand", "", FORM, Some("url=http%3A%2F%2Fx.org%2Fvs"), "operation-type type=ValueSet op=$expand url[http://x.org/vs]"),
    ("POST", "/$process-message", "", JSON, None, "operation-system op=$process-message"),
    ("GET", "/Patient/123/_history/2/$meta", "", None, None, "operation-instance type=Patient id=123 vid=2 op=$meta"),
    ("GET", "/Observation/$lastn", "max=3&patient=1", None, None, "operation-type type=Observation op=$lastn max[3] patient[1]"),
    // --- errors: bad_request
    ("OPTIONS", "/Patient", "", None, None, "ERR bad_request"),
    ("get", "/Patient", "", None, None, "ERR bad_request"),
    ("TRACE", "/", "", None, None, "ERR bad_request"),
    ("POST", "/Patient/123", "", JSON, None, "ERR bad_request"),
    ("PUT", "/", "", JSON, None, "ERR bad_request"),
    ("DELETE", "/Patient", "", None, None, "ERR bad_request"),
    ("DELETE", "/Patient", "_format=json", None, None, "ERR bad_request"),
    ("PUT", "/Patient", "", JSON, None, "ERR bad_request"),
    ("GET", "/Patient/_search", "", None, None, "ERR bad_request"),
    ("POST", "/Patient/_history", "", None, None, "ERR bad_request"),
    ("POST", "/metadata", "", None, None, "ERR bad_request"),
    ("GET", "/_search", "", None, None, "ERR bad_request"),
    ("GET", "/Patient//123", "", None, None, "ERR bad_request"),
    ("GET", "/Patient/123/", "", None, None, "ERR bad_request"),
    ("GET", "//Patient", "", None, None, "ERR bad_request"),
    ("GET", "/Patient/123/_history/1/extra", "", None, None, "ERR bad_request"),
    ("GET", "/Patient/1/_history/1/$meta/x/y", "", None, None, "ERR bad_request"),
    ("GET", "/Observation/123/Patient", "", None, None, "ERR bad_request"),
    ("GET", "/Patient/%zz", "", None, None, "ERR bad_request"),
    ("GET", "/Patient/$", "", None, None, "ERR bad_request"),
    ("GET", "/Patient/$ever%20thing", "", None, None, "ERR bad_request"),
    ("DELETE", "/Patient/123/$everything", "", None, None, "ERR bad_request"),
    ("POST", "/Patient", "", FORM, Some("name=x"), "ERR bad_request"),
    ("POST", "/", "", FORM, Some("_type=Patient"), "ERR bad_request"),
    ("POST", "/Patient/_search", "", JSON, Some("{}"), "ERR bad_request"),
    ("GET", "/_foo", "", None, None, "ERR bad_request"),
    ("GET", "/Patient/_foo", "", None, None, "ERR bad_request"),
    ("POST", "/Patient/123/Observation", "", FORM, None, "ERR bad_request"),
    // --- errors: unknown_resource_type
    ("GET", "/NotAType", "", None, None, "ERR unknown_resource_type"),
    ("GET", "/patient/123", "", None, None, "ERR unknown_resource_type"),
    ("GET", "/Resource/1", "", None, None, "ERR unknown_resource_type"),
    ("GET", "/favicon.ico", "", None, None, "ERR unknown_resource_type"),
    ("GET", "/Patient/123/Foo", "", None, None, "ERR unknown_resource_type"),
    ("GET", "/NotAType/1/2/3/4", "", None, None, "ERR unknown_resource_type"),
    ("GET", "/", "_type=Patient,Bogus", None, None, "ERR unknown_resource_type"),
    ("GET", "/Patient", "_has:Bogus:patient:code=1", None, None, "ERR unknown_resource_type"),
    ("GET", "/Patient", "_include=Bogus:x", None, None, "ERR unknown_resource_type"),
    // --- errors: bad_id
    ("GET", "/Patient/12_3", "", None, None, "ERR bad_id"),
    ("GET", "/Patient/..", "", None, None, "ERR bad_id"),
    ("GET", "/Patient/%2E%2E", "", None, None, "ERR bad_id"),
    ("GET", "/Patient/.", "", None, None, "ERR bad_id"),
    ("GET", "/Patient/a%2Fb", "", None, None, "ERR bad_id"),
    ("GET", "/Patient/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "", None, None, "ERR bad_id"),
    ("GET", "/Patient/123/_history/v%201", "", None, None, "ERR bad_id"),
    ("GET", "/Patient/1 2/_history", "", None, None, "ERR bad_id"),
    ("GET", "/Patient/é", "", None, None, "ERR bad_id"),
    ("GET", "/Patient/x*y/Observation", "", None, None, "ERR bad_id"),
    // --- errors: bad_param
    ("GET", "/Patient", "name=%zz", None, None, "ERR bad_param"),
    ("GET", "/Patient", "na%me=x", None, None, "ERR bad_param"),
    ("GET", "/Patient", "name=%ff", None, None, "ERR bad_param"),
    ("GET", "/Patient", "=x", None, None, "ERR bad_param"),
    ("GET", "/Patient", "name:=x", None, None, "ERR bad_param"),
    ("GET", "/Patient", "name:foo=x", None, None, "ERR bad_param"),
    ("GET", "/Patient", "name:exact:text=x", None, None, "ERR bad_param"),
    ("GET", "/Patient", "na$me=x", None, None, "ERR bad_param"),
    ("GET", "/Observation", "subject..name=x", None, None, "ERR bad_param"),
    ("GET", "/Observation", "subject.=x", None, None, "ERR bad_param"),
    ("GET", "/Observation", "_id.name=x", None, None, "ERR bad_param"),
    ("GET", "/Patient", "_has=x", None, None, "ERR bad_param"),
    ("GET", "/Patient", "_has:Observation=x", None, None, "ERR bad_param"),
    ("GET", "/Patient", "_has:Observation:patient=x", None, None, "ERR bad_param"),
    ("GET", "/Patient", "_has:Observation:patient:=x", None, None, "ERR bad_param"),
    ("GET", "/Patient", "_has:Observation:patient:code:text:x=y", None, None, "ERR bad_param"),
    ("GET", "/Patient", "_has:Observation:patient:_has=x", None, None, "ERR bad_param"),
    ("GET", "/Patient", "_has::patient:code=x", None, None, "ERR bad_param"),
    ("GET", "/Patient", "_include=Patient", None, None, "ERR bad_param"),
    ("GET", "/Patient", "_include:exact=Patient:link", None, None, "ERR bad_param"),
    ("GET", "/", "_type=", None, None, "search-system _type[]"),
    ("GET", "/", "_type=Patient,", None, None, "ERR bad_param"),
    ("POST", "/Patient/_search", "", FORM, Some("name=%"), "ERR bad_param"),
];

#[test]
fn grammar_table() {
    assert!(CASES.len() >= 60, "{} cases", CASES.len());
    let mut failures = Vec::new();
    for (method, path, query, ct, body, want) in CASES {
        let got = match classify(method, path, query, *ct, body.map(str::as_bytes)) {
            Ok(r) => summary(&r),
            Err(e) => format!("ERR {}", e.reason()),
        };
        if got != *want {
            failures.push(format!(
                "{method} {path}?{query}\n   want {want}\n   got  {got}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_error_class_is_covered() {
    for reason in [
        "bad_request",
        "unknown_resource_type",
        "bad_id",
        "bad_param",
    ] {
        let want = format!("ERR {reason}");
        assert!(CASES.iter().any(|c| c.5 == want), "{reason}");
    }
}

#[test]
fn error_details_never_echo_request_data() {
    let secret = "Zq9SecretPhi";
    let probes: [(&str, String, String); 6] = [
        ("GET", format!("/Patient/{secret}_x"), String::new()),
        ("GET", format!("/{secret}"), String::new()),
        ("GET", "/Patient".into(), format!("name={secret}%zz")),
        ("GET", "/Patient".into(), format!("{secret}:bad=1")),
        ("GET", "/Patient".into(), format!("_has:{secret}:a:b=1")),
        (
            "GET",
            format!("/Patient/1/_history/{secret}%20"),
            String::new(),
        ),
    ];
    for (m, p, q) in &probes {
        let e = classify(m, p, q, None, None).expect_err("must fail");
        assert!(!e.to_string().contains(secret), "{e}");
        assert!(!e.detail().contains(secret));
        assert!(!format!("{e:?}").contains(secret));
    }
}

#[test]
fn conditional_create_from_if_none_exist() {
    let r = classify("POST", "/Patient", "", JSON, None)
        .and_then(|r| r.with_if_none_exist("identifier=http:/example.org/fhir/ids|234234"))
        .expect("conditional create");
    assert_eq!(r.interaction, Interaction::ConditionalCreate);
    assert_eq!(
        summary(&r),
        "conditional-create type=Patient identifier[http:/example.org/fhir/ids|234234]"
    );
    let r = classify("GET", "/Patient/1", "", None, None).expect("read");
    assert_eq!(
        r.with_if_none_exist("a=b").map_err(|e| e.reason()),
        Err("bad_request")
    );
    let r = classify("POST", "/Patient", "", None, None).expect("create");
    assert_eq!(
        r.clone().with_if_none_exist("").map_err(|e| e.reason()),
        Err("bad_request")
    );
    assert_eq!(
        r.with_if_none_exist("a=%").map_err(|e| e.reason()),
        Err("bad_param")
    );
}

#[test]
fn bundle_entry_urls() {
    // Entry URLs as found in the R4 examples and Synthea transactions.
    let cases = [
        ("GET", "/Patient/example", "read type=Patient id=example"),
        ("POST", "Patient", "create type=Patient"),
        (
            "PUT",
            "Patient?identifier=http:/example.org/fhir/ids|456456",
            "conditional-update type=Patient identifier[http:/example.org/fhir/ids|456456]",
        ),
        (
            "GET",
            "Patient?name=peter",
            "search-type type=Patient name[peter]",
        ),
        ("DELETE", "Patient/234", "delete type=Patient id=234"),
        (
            "GET",
            "Patient/12345/_history/1",
            "vread type=Patient id=12345 vid=1",
        ),
        (
            "POST",
            "Patient/$everything",
            "operation-type type=Patient op=$everything",
        ),
    ];
    for (m, url, want) in cases {
        let got = classify_relative_url(m, url).map(|r| summary(&r));
        assert_eq!(got.as_deref(), Ok(want), "{m} {url}");
    }
}

#[test]
fn accessors() {
    let r = classify("GET", "/Patient", "_has:Observation:patient:_has:AuditEvent:entity:agent=1&subject:Patient.organization:Organization.name=x", None, None)
        .expect("ok");
    assert_eq!(r.params[0].has_types(), ["Observation", "AuditEvent"]);
    assert_eq!(r.params[1].chain_types(), ["Patient", "Organization"]);
    assert!(r.params_named("_has").count() == 1);
    assert!(Interaction::ConditionalDelete.is_conditional());
    assert!(Interaction::SearchCompartment.is_search());
    assert!(Interaction::OperationType.is_operation());
}
