//! What a request costs, by FHIR interaction (from the gateway's classification).
//!
//! | name          | interactions                                              | default |
//! |---------------|-----------------------------------------------------------|---------|
//! | `read`        | read                                                      | 1       |
//! | `vread`       | vread                                                     | 1       |
//! | `search`      | search-type, search-system, search-compartment            | 5       |
//! | `history`     | history-instance, history-type, history-system            | 5       |
//! | `create`      | create, conditional create                                | 2       |
//! | `update`      | update, conditional update                                | 2       |
//! | `patch`       | patch, conditional patch                                  | 2       |
//! | `delete`      | delete, conditional delete                                | 2       |
//! | `capabilities`| `GET metadata`                                            | 1       |
//! | `batch`       | batch / transaction Bundle                                | 10      |
//! | `$name`       | the operation `$name` (`$everything` 50, `$export` 100)   |         |
//! | `operation`   | any other operation                                       | 10      |
//! | `non_fhir`    | a request that is not a classified FHIR interaction       | 1       |

use caregate_fhir::{FhirRequest, Interaction};
use std::collections::{BTreeMap, HashMap};

/// Costs by interaction; see the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostTable {
    read: u64,
    vread: u64,
    search: u64,
    history: u64,
    create: u64,
    update: u64,
    patch: u64,
    delete: u64,
    capabilities: u64,
    batch: u64,
    operation: u64,
    non_fhir: u64,
    operations: HashMap<String, u64>,
}

/// The names [`CostTable::with_overrides`] accepts besides `$operation` names.
pub const NAMES: &[&str] = &[
    "read",
    "vread",
    "search",
    "history",
    "create",
    "update",
    "patch",
    "delete",
    "capabilities",
    "batch",
    "operation",
    "non_fhir",
];

impl Default for CostTable {
    fn default() -> Self {
        CostTable {
            read: 1,
            vread: 1,
            search: 5,
            history: 5,
            create: 2,
            update: 2,
            patch: 2,
            delete: 2,
            capabilities: 1,
            batch: 10,
            operation: 10,
            non_fhir: 1,
            operations: [
                ("$everything".to_string(), 50),
                ("$export".to_string(), 100),
            ]
            .into_iter()
            .collect(),
        }
    }
}

impl CostTable {
    /// The defaults with `overrides` applied. An unknown name is an error naming it.
    pub fn with_overrides(overrides: &BTreeMap<String, u64>) -> Result<CostTable, String> {
        let mut t = CostTable::default();
        for (name, &cost) in overrides {
            let slot = match name.as_str() {
                "read" => &mut t.read,
                "vread" => &mut t.vread,
                "search" => &mut t.search,
                "history" => &mut t.history,
                "create" => &mut t.create,
                "update" => &mut t.update,
                "patch" => &mut t.patch,
                "delete" => &mut t.delete,
                "capabilities" => &mut t.capabilities,
                "batch" => &mut t.batch,
                "operation" => &mut t.operation,
                "non_fhir" => &mut t.non_fhir,
                op if op.len() > 1
                    && op.starts_with('$')
                    && op[1..]
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
                {
                    t.operations.insert(op.to_string(), cost);
                    continue;
                }
                other => {
                    return Err(format!(
                        "unknown cost `{other}` (known: {}, or an operation as `$name`)",
                        NAMES.join(", ")
                    ))
                }
            };
            *slot = cost;
        }
        Ok(t)
    }

    /// The cost of a request: its classification, or `None` for a request that is not a
    /// classified FHIR interaction.
    pub fn cost(&self, class: Option<&FhirRequest>) -> u64 {
        let Some(c) = class else {
            return self.non_fhir;
        };
        match c.interaction {
            Interaction::Read => self.read,
            Interaction::Vread => self.vread,
            Interaction::SearchType
            | Interaction::SearchSystem
            | Interaction::SearchCompartment => self.search,
            Interaction::HistoryInstance
            | Interaction::HistoryType
            | Interaction::HistorySystem => self.history,
            Interaction::Create | Interaction::ConditionalCreate => self.create,
            Interaction::Update | Interaction::ConditionalUpdate => self.update,
            Interaction::Patch | Interaction::ConditionalPatch => self.patch,
            Interaction::Delete | Interaction::ConditionalDelete => self.delete,
            Interaction::Capabilities => self.capabilities,
            Interaction::BatchOrTransaction => self.batch,
            Interaction::OperationSystem
            | Interaction::OperationType
            | Interaction::OperationInstance => c
                .operation
                .as_deref()
                .and_then(|op| self.operations.get(op))
                .copied()
                .unwrap_or(self.operation),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn class(method: &str, path: &str, query: &str) -> FhirRequest {
        caregate_fhir::classify(method, path, query, None, None).unwrap()
    }

    #[test]
    fn defaults_by_interaction() {
        let t = CostTable::default();
        let cases = [
            ("GET", "/Patient/1", "", 1),
            ("GET", "/Patient/1/_history/2", "", 1),
            ("GET", "/Observation", "code=x", 5),
            ("GET", "/Patient/1/Observation", "", 5),
            ("GET", "/Patient/1/_history", "", 5),
            ("POST", "/Observation", "", 2),
            ("PUT", "/Observation/1", "", 2),
            ("DELETE", "/Observation/1", "", 2),
            ("GET", "/Patient/1/$everything", "", 50),
            ("GET", "/$export", "", 100),
            ("GET", "/Patient/$match", "", 10),
            ("GET", "/metadata", "", 1),
        ];
        for (m, p, q, want) in cases {
            assert_eq!(t.cost(Some(&class(m, p, q))), want, "{m} {p}?{q}");
        }
        assert_eq!(t.cost(None), 1);
    }

    #[test]
    fn overrides_and_unknown_names() {
        let o: BTreeMap<String, u64> = [
            ("search".to_string(), 7),
            ("$everything".to_string(), 20),
            ("$lookup".to_string(), 3),
            ("non_fhir".to_string(), 0),
        ]
        .into_iter()
        .collect();
        let t = CostTable::with_overrides(&o).unwrap();
        assert_eq!(t.cost(Some(&class("GET", "/Observation", ""))), 7);
        assert_eq!(
            t.cost(Some(&class("GET", "/Patient/1/$everything", ""))),
            20
        );
        assert_eq!(t.cost(Some(&class("GET", "/CodeSystem/$lookup", ""))), 3);
        assert_eq!(t.cost(Some(&class("GET", "/$export", ""))), 100);
        assert_eq!(t.cost(None), 0);
        let bad: BTreeMap<String, u64> = [("serch".to_string(), 1)].into_iter().collect();
        assert!(CostTable::with_overrides(&bad)
            .unwrap_err()
            .contains("unknown cost `serch`"));
    }
}
