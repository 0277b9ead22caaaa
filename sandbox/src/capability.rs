//! The CapabilityStatement served at `GET /metadata`.

use serde_json::{json, Value};

use crate::params::{param_def, Kind, ALL_PARAMS};
use crate::store::Store;
use crate::types::now_instant;

const EVERYTHING: &str = "http://hl7.org/fhir/OperationDefinition/Patient-everything";

/// A CapabilityStatement listing each resource type present in `store`.
pub(crate) fn statement(store: &Store, base: &str) -> Value {
    let types = store.live_types();
    let resources: Vec<Value> = types
        .iter()
        .map(|t| {
            let params: Vec<(&str, Kind)> = ALL_PARAMS
                .iter()
                .filter_map(|p| param_def(t, p).map(|d| (*p, d.kind)))
                .collect();
            let search_param: Vec<Value> = params
                .iter()
                .map(|(name, kind)| json!({"name": name, "type": kind.fhir_name()}))
                .collect();
            let mut includes: Vec<String> = params
                .iter()
                .filter(|(_, k)| matches!(k, Kind::Reference(_)))
                .map(|(name, _)| format!("{t}:{name}"))
                .collect();
            includes.push("*".into());
            // Other present types with a reference parameter that may
            // point at `t`.
            let revincludes: Vec<String> = types
                .iter()
                .flat_map(|s| {
                    ALL_PARAMS
                        .iter()
                        .filter_map(move |p| match param_def(s, p) {
                            Some(d) => match d.kind {
                                Kind::Reference(target) if target.is_none_or(|x| x == *t) => {
                                    Some(format!("{s}:{p}"))
                                }
                                _ => None,
                            },
                            None => None,
                        })
                })
                .collect();
            let mut r = json!({
                "type": t,
                "interaction": [
                    {"code": "read"}, {"code": "vread"}, {"code": "update"},
                    {"code": "patch"}, {"code": "delete"}, {"code": "history-instance"},
                    {"code": "create"}, {"code": "search-type"}
                ],
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "searchInclude": includes,
                "searchRevInclude": revincludes,
                "searchParam": search_param,
            });
            if *t == "Patient" {
                r["operation"] = json!([{"name": "everything", "definition": EVERYTHING}]);
            }
            r
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": now_instant(),
        "publisher": "caregate",
        "kind": "instance",
        "software": {"name": "caregate-sandbox", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {
            "description": "caregate in-memory FHIR R4 sandbox (synthetic data, no access control)",
            "url": base
        },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "operation": [{"name": "everything", "definition": EVERYTHING}]
        }]
    })
}
