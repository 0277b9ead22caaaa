//! Property tests: nothing panics on arbitrary input, and percent-encoding round-trips.

use caregate_fhir::encoding::{
    escape, percent_decode, percent_encode, split_alternatives, unescape,
};
use caregate_fhir::{classify, classify_relative_url, Context, Scope, ScopeSet};
use proptest::prelude::*;

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GET".to_owned()),
        Just("HEAD".to_owned()),
        Just("POST".to_owned()),
        Just("PUT".to_owned()),
        Just("PATCH".to_owned()),
        Just("DELETE".to_owned()),
        any::<String>(),
    ]
}

/// Paths made of FHIR-ish pieces, so that deep branches are reached, plus arbitrary strings.
fn path() -> impl Strategy<Value = String> {
    let seg = prop_oneof![
        Just("Patient".to_owned()),
        Just("Observation".to_owned()),
        Just("_history".to_owned()),
        Just("_search".to_owned()),
        Just("metadata".to_owned()),
        Just("*".to_owned()),
        Just("$everything".to_owned()),
        Just("%24export".to_owned()),
        Just("..".to_owned()),
        Just("".to_owned()),
        "[A-Za-z0-9.%$_*-]{0,12}",
        any::<String>(),
    ];
    prop_oneof![
        prop::collection::vec(seg, 0..7).prop_map(|v| format!("/{}", v.join("/"))),
        any::<String>(),
    ]
}

fn query() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("_has:Observation:patient:code".to_owned()),
        Just("_has:Observation:patient:_has".to_owned()),
        Just("subject:Patient.name".to_owned()),
        Just("_type".to_owned()),
        Just("_include".to_owned()),
        "[A-Za-z_:.%$-]{0,16}",
        any::<String>(),
    ];
    let value = prop_oneof!["[A-Za-z0-9|,$\\\\%+:/.-]{0,20}", any::<String>()];
    prop_oneof![
        prop::collection::vec((key, value), 0..6).prop_map(|kv| {
            kv.into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        }),
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn classify_never_panics(
        m in method(),
        p in path(),
        q in query(),
        ct in prop::option::of(prop_oneof![
            Just("application/x-www-form-urlencoded".to_owned()),
            Just("application/fhir+json".to_owned()),
            any::<String>(),
        ]),
        body in prop::option::of(prop_oneof![
            query().prop_map(String::into_bytes),
            any::<Vec<u8>>(),
        ]),
        scopes in any::<String>(),
    ) {
        let result = classify(&m, &p, &q, ct.as_deref(), body.as_deref());
        let _ = classify_relative_url(&m, &format!("{p}?{q}"));
        // Whatever is classified can be judged by any scope set without panicking.
        let (set, _) = ScopeSet::parse_lenient(&scopes);
        let fixed = ScopeSet::parse("patient/*.rs user/Observation.rs?category=a|b system/Patient.cruds")
            .expect("fixed scopes parse");
        if let Ok(r) = result {
            for ctx in [Context::Patient, Context::User, Context::System] {
                let _ = set.permits(ctx, &r);
                let _ = fixed.permits(ctx, &r);
            }
            let _ = r.with_if_none_exist(&q);
        }
    }

    #[test]
    fn scope_parse_never_panics(s in any::<String>(), t in "[a-z]{0,8}/[A-Za-z*]{0,12}\\.[a-z*]{0,6}(\\?[a-z.:_]{0,8}=[a-z|:/%]{0,10})?") {
        let _ = Scope::parse(&s);
        let _ = Scope::parse(&t);
        let _ = ScopeSet::parse_form_encoded(&s);
        if let Ok(scope) = Scope::parse(&t) {
            // Display gives a string that parses back to the same scope.
            prop_assert_eq!(Scope::parse(&scope.to_string()), Ok(scope));
        }
    }

    #[test]
    fn percent_encoding_round_trips(s in any::<String>()) {
        let encoded = percent_encode(&s);
        prop_assert_eq!(percent_decode(&encoded, false), Ok(s.clone()));
        prop_assert_eq!(percent_decode(&encoded, true), Ok(s.clone()));
        prop_assert!(encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)));
    }

    #[test]
    fn fhir_escaping_round_trips(values in prop::collection::vec(any::<String>(), 1..5)) {
        let joined = values.iter().map(|v| escape(v)).collect::<Vec<_>>().join(",");
        let split = split_alternatives(&joined);
        let back: Vec<String> = split.iter().map(|v| unescape(v)).collect();
        if values.len() == 1 && values[0].is_empty() {
            prop_assert!(back.is_empty());
        } else {
            prop_assert_eq!(back, values);
        }
    }

    #[test]
    fn search_values_round_trip_through_classify(
        name in "[a-z][a-z0-9-]{0,10}",
        values in prop::collection::vec(".{1,12}", 1..4),
        encode_commas in any::<bool>(),
    ) {
        let sep = if encode_commas { "%2C" } else { "," };
        let raw = values.iter().map(|v| percent_encode(&escape(v))).collect::<Vec<_>>().join(sep);
        let r = classify("GET", "/Observation", &format!("{name}={raw}"), None, None);
        prop_assert!(r.is_ok(), "{:?}", r);
        let r = r.expect("checked");
        prop_assert_eq!(r.params.len(), 1);
        prop_assert_eq!(&r.params[0].name, &name);
        let got: Vec<String> = r.params[0].values.iter().map(|v| unescape(v)).collect();
        prop_assert_eq!(got, values);
    }
}
