//! Every scope string in the SMART App Launch IG 2.2.0 pages (tests/data/scopes-from-spec.txt,
//! CC-BY-4.0, HL7 International / SMART App Launch IG) parses, or is rejected as the spec says.

use caregate_fhir::{Scope, ScopeSet, ScopeSyntax, ScopeTarget};

const SPEC_FILE: &str = include_str!("data/scopes-from-spec.txt");

/// A comparable rendering of a parsed scope.
fn describe(s: &Scope) -> String {
    match s {
        Scope::Resource(r) => {
            let target = match &r.target {
                ScopeTarget::AllTypes => "*".to_owned(),
                ScopeTarget::Type(t) => t.clone(),
            };
            let syntax = match r.syntax {
                ScopeSyntax::V2 => "v2",
                ScopeSyntax::V1Read | ScopeSyntax::V1Write | ScopeSyntax::V1All => "v1",
            };
            let mut d = format!("{} {} {} {}", r.context, target, r.permissions, syntax);
            for p in &r.query {
                d += &format!(" ?{}", p.name);
                if let Some(m) = &p.modifier {
                    d += &format!(":{m}");
                }
                for c in &p.chain {
                    d += &format!(".{c}");
                }
                d += &format!("={}", p.values.join(","));
            }
            if r.is_experimental() {
                d += " experimental";
            }
            d
        }
        Scope::OpenId => "openid".into(),
        Scope::FhirUser => "fhirUser".into(),
        Scope::Profile => "profile".into(),
        Scope::Launch => "launch".into(),
        Scope::LaunchContext {
            resource_type,
            role,
        } => match role {
            Some(r) => format!("launch-context {resource_type} role={r}"),
            None => format!("launch-context {resource_type}"),
        },
        Scope::OfflineAccess => "offline_access".into(),
        Scope::OnlineAccess => "online_access".into(),
        Scope::Extension(e) => format!("extension {e}"),
    }
}

/// (line of the spec file, what `Scope::parse` gives: a description or `ERR reason`)
const EXPECTED: &[(&str, &str)] = &[
    // SMART v2 resource scopes
    ("patient/*.cruds", "patient * cruds v2"),
    ("patient/*.rs", "patient * rs v2"),
    ("patient/*.r", "patient * r v2"),
    ("patient/AllergyIntolerance.cruds", "patient AllergyIntolerance cruds v2"),
    ("patient/AllergyIntolerance.cud", "patient AllergyIntolerance cud v2"),
    ("patient/AllergyIntolerance.rs", "patient AllergyIntolerance rs v2"),
    ("patient/Observation.c", "patient Observation c v2"),
    ("patient/Observation.cu", "patient Observation cu v2"),
    ("patient/Observation.rs", "patient Observation rs v2"),
    (
        "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
        "patient Observation rs v2 ?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
    ),
    (
        "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs",
        "patient Observation rs v2 ?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs",
    ),
    ("patient/Patient.r", "patient Patient r v2"),
    ("user/*.cruds", "user * cruds v2"),
    ("user/Appointment.cruds", "user Appointment cruds v2"),
    ("user/Appointment.rs", "user Appointment rs v2"),
    ("user/Observation.rs", "user Observation rs v2"),
    ("user/Patient.rs", "user Patient rs v2"),
    ("system/*.cruds", "system * cruds v2"),
    ("system/*.rs", "system * rs v2"),
    ("system/Encounter.cud", "system Encounter cud v2"),
    ("system/Observation.rs", "system Observation rs v2"),
    // SMART v1: .read => .rs
    ("patient/Observation.read", "patient Observation rs v1"),
    ("patient/Immunization.read", "patient Immunization rs v1"),
    // The experimental granular forms are written without their context in the spec's prose:
    // as bare strings they are not scopes (see `experimental_forms_with_a_context` below).
    ("Observation.rs?code:in=http://valueset.example.org/ValueSet/diabetes-codes", "ERR missing_context"),
    ("Observation.rs?patient.birthdate=1990", "ERR missing_context"),
    // launch / identity / refresh
    ("launch", "launch"),
    ("launch/patient", "launch-context Patient"),
    ("launch/encounter", "launch-context Encounter"),
    ("launch/imagingstudy", "launch-context ImagingStudy"),
    ("launch/diagnosticreport", "launch-context DiagnosticReport"),
    ("launch/list?role=https://example.org/med-list-at-home", "launch-context List role=https://example.org/med-list-at-home"),
    ("launch/list?role=https://example.org/med-list-at-hospital", "launch-context List role=https://example.org/med-list-at-hospital"),
    ("launch/relatedperson?role=friend", "launch-context RelatedPerson role=friend"),
    ("launch/relatedperson?role=neighbor", "launch-context RelatedPerson role=neighbor"),
    ("openid", "openid"),
    ("fhirUser", "fhirUser"),
    ("profile", "profile"),
    ("offline_access", "offline_access"),
    ("online_access", "online_access"),
    // extension scopes
    ("__profilePhoto.manage", "extension __profilePhoto.manage"),
    ("https://ehr.example.org/scopes/profilePhoto.manage", "extension https://ehr.example.org/scopes/profilePhoto.manage"),
    // URI representation
    ("http://smarthealthit.org/fhir/scopes/patient/*.r", "patient * r v2"),
    // "a request of .dus is not a defined scope request": out of order, rejected
    ("patient/Observation.dus", "ERR out_of_order_permissions"),
    // Whole form-encoded `scope` values: not one scope each (see `form_encoded_values`).
    ("launch+patient%2FObservation.rs+patient%2FPatient.rs+openid+fhirUser", "ERR unrecognized"),
    ("system%2F*.rs", "ERR unrecognized"),
];

fn spec_lines() -> Vec<&'static str> {
    SPEC_FILE
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

#[test]
fn table_covers_the_spec_file_exactly() {
    let lines = spec_lines();
    let table: Vec<&str> = EXPECTED.iter().map(|(l, _)| *l).collect();
    assert_eq!(
        lines, table,
        "the table must list every line of scopes-from-spec.txt, in order"
    );
}

#[test]
fn every_spec_scope_parses_or_is_rejected_as_the_spec_says() {
    let mut failures = Vec::new();
    for (line, want) in EXPECTED {
        let got = match Scope::parse(line) {
            Ok(s) => describe(&s),
            Err(e) => format!("ERR {}", e.reason()),
        };
        if got != *want {
            failures.push(format!("{line}\n   want {want}\n   got  {got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn experimental_forms_with_a_context() {
    let s = Scope::parse(
        "patient/Observation.rs?code:in=http://valueset.example.org/ValueSet/diabetes-codes",
    )
    .expect("parses");
    assert_eq!(
        describe(&s),
        "patient Observation rs v2 ?code:in=http://valueset.example.org/ValueSet/diabetes-codes experimental"
    );
    let s = Scope::parse("user/Observation.rs?patient.birthdate=1990").expect("parses");
    assert_eq!(
        describe(&s),
        "user Observation rs v2 ?patient.birthdate=1990 experimental"
    );
}

#[test]
fn form_encoded_values() {
    let set = ScopeSet::parse_form_encoded(
        "launch+patient%2FObservation.rs+patient%2FPatient.rs+openid+fhirUser",
    )
    .expect("parses");
    let got: Vec<String> = set.iter().map(describe).collect();
    assert_eq!(
        got,
        [
            "launch",
            "patient Observation rs v2",
            "patient Patient rs v2",
            "openid",
            "fhirUser"
        ]
    );
    let set = ScopeSet::parse_form_encoded("system%2F*.rs").expect("parses");
    assert_eq!(
        set.iter().map(describe).collect::<Vec<_>>(),
        ["system * rs v2"]
    );
    assert_eq!(
        ScopeSet::parse_form_encoded("a%zz").map_err(|e| e.reason()),
        Err("bad_encoding")
    );
}

#[test]
fn v1_forms_and_other_rejections() {
    let cases = [
        ("user/*.write", "user * cud v1"),
        ("patient/*.*", "patient * cruds v1"),
        ("user/Observation.write", "user Observation cud v1"),
        ("patient/*.read", "patient * rs v1"),
        ("patient/Observation.sr", "ERR out_of_order_permissions"),
        ("patient/Observation.rr", "ERR out_of_order_permissions"),
        ("patient/Observation.x", "ERR unknown_permission"),
        ("patient/Observation.Read", "ERR unknown_permission"),
        ("patient/Observation.", "ERR missing_permissions"),
        ("patient/Observation", "ERR missing_permissions"),
        ("patient/Foo.rs", "ERR unknown_resource_type"),
        ("patient/observation.rs", "ERR unknown_resource_type"),
        ("admin/Observation.rs", "ERR unrecognized"),
        ("Patient/Observation.rs", "ERR unrecognized"),
        (
            "patient/Observation.read?category=x",
            "ERR query_on_v1_scope",
        ),
        ("patient/Observation.rs?", "ERR bad_query"),
        ("patient/Observation.rs?category=", "ERR bad_query"),
        ("patient/Observation.rs?category=%zz", "ERR bad_query"),
        ("patient/Observation.rs?cat:bogus=x", "ERR bad_query"),
        ("launch/Patient", "ERR bad_launch_context"),
        ("launch/notatype", "ERR bad_launch_context"),
        ("launch/patient?foo=bar", "ERR bad_launch_context"),
        ("launch/", "ERR bad_launch_context"),
        ("", "ERR empty"),
        ("patient/*.rs patient/Patient.r", "ERR invalid_character"),
        ("patient/Observation.rs?code=a\\|b", "ERR invalid_character"),
        ("OPENID", "ERR unrecognized"),
        ("__", "ERR unrecognized"),
        (
            "http://smarthealthit.org/fhir/scopes/foo",
            "ERR unrecognized",
        ),
        ("http://smarthealthit.org/fhir/scopes/openid", "openid"),
        ("urn:example:scope", "extension urn:example:scope"),
    ];
    for (s, want) in cases {
        let got = match Scope::parse(s) {
            Ok(s) => describe(&s),
            Err(e) => format!("ERR {}", e.reason()),
        };
        assert_eq!(got, want, "{s:?}");
    }
}

#[test]
fn display_is_canonical() {
    for (s, want) in [
        ("patient/Observation.read", "patient/Observation.rs"),
        ("user/*.*", "user/*.cruds"),
        (
            "http://smarthealthit.org/fhir/scopes/patient/*.r",
            "patient/*.r",
        ),
        (
            "patient/Observation.rs?category=a|b",
            "patient/Observation.rs?category=a|b",
        ),
        ("launch/imagingstudy", "launch/imagingstudy"),
        (
            "launch/list?role=https://x.org/a",
            "launch/list?role=https%3A%2F%2Fx.org%2Fa",
        ),
    ] {
        assert_eq!(Scope::parse(s).map(|s| s.to_string()).as_deref(), Ok(want));
    }
}

#[test]
fn scope_sets() {
    let (set, errors) =
        ScopeSet::parse_lenient("openid  patient/Observation.dus patient/*.rs bogus");
    assert_eq!(set.len(), 2);
    assert_eq!(
        errors.iter().map(|e| e.reason()).collect::<Vec<_>>(),
        ["out_of_order_permissions", "unrecognized"]
    );
    assert!(ScopeSet::parse("openid patient/Observation.dus").is_err());
    assert!(ScopeSet::parse("").is_ok_and(|s| s.is_empty()));
    assert!(set.contains(&Scope::OpenId));
}
