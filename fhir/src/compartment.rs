//! The FHIR R4 Patient compartment (<http://hl7.org/fhir/R4/compartmentdefinition-patient.html>).

use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

/// The R4 Patient CompartmentDefinition, embedded (CC0-1.0, see `data/README.md`).
pub const PATIENT_COMPARTMENT_JSON: &str =
    include_str!("../data/CompartmentDefinition-patient.json");

/// A `CompartmentDefinition` read from JSON: for each resource type, the search parameters whose
/// value links a resource to the compartment's focal resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompartmentDefinition {
    code: String,
    params: HashMap<String, Vec<String>>,
}

/// The JSON is not a CompartmentDefinition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompartmentError(&'static str);

impl fmt::Display for CompartmentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for CompartmentError {}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDefinition {
    resource_type: String,
    code: String,
    #[serde(default)]
    resource: Vec<RawResource>,
}

#[derive(Deserialize)]
struct RawResource {
    code: String,
    #[serde(default)]
    param: Vec<String>,
}

impl CompartmentDefinition {
    /// Read a FHIR `CompartmentDefinition` resource (JSON).
    pub fn from_json(json: &str) -> Result<Self, CompartmentError> {
        let raw: RawDefinition = serde_json::from_str(json)
            .map_err(|_| CompartmentError("not a CompartmentDefinition (JSON)"))?;
        if raw.resource_type != "CompartmentDefinition" {
            return Err(CompartmentError(
                "resourceType is not CompartmentDefinition",
            ));
        }
        let params = raw
            .resource
            .into_iter()
            .map(|r| (r.code, r.param))
            .collect();
        Ok(CompartmentDefinition {
            code: raw.code,
            params,
        })
    }

    /// The compartment type (`Patient`).
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The search parameters of `resource_type` that point at the compartment's focal resource;
    /// empty when the type is not in the compartment (or not listed at all).
    pub fn params_for(&self, resource_type: &str) -> &[String] {
        self.params
            .get(resource_type)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The types that are in the compartment (have at least one parameter), sorted.
    pub fn member_types(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .params
            .iter()
            .filter(|(_, p)| !p.is_empty())
            .map(|(t, _)| t.as_str())
            .collect();
        v.sort_unstable();
        v
    }
}

/// The R4 Patient compartment, loaded once from the embedded definition.
///
/// Used to scope `patient/` SMART access: a search on a member type can be limited to the launch
/// patient with one of [`params_for`](Self::params_for) (`Observation` → `subject`, `performer`), and a
/// returned resource is in the compartment when one of those parameters references the patient.
/// `Patient` itself is linked through `link`; the focal Patient resource (same id) is of course in
/// its own compartment. Types with no parameters (`Medication`, `Organization`, …) are not in it.
pub struct PatientCompartment;

impl PatientCompartment {
    /// The parsed definition.
    pub fn definition() -> &'static CompartmentDefinition {
        static DEF: OnceLock<CompartmentDefinition> = OnceLock::new();
        DEF.get_or_init(|| {
            CompartmentDefinition::from_json(PATIENT_COMPARTMENT_JSON).unwrap_or_else(|_| {
                // Unreachable with the embedded file (a unit test parses it); an empty definition
                // puts nothing in the compartment, which fails closed.
                CompartmentDefinition {
                    code: "Patient".to_owned(),
                    params: HashMap::new(),
                }
            })
        })
    }

    /// The search parameters that link `resource_type` to a Patient (`Observation` →
    /// `["subject", "performer"]`); empty = not in the Patient compartment.
    pub fn params_for(resource_type: &str) -> &'static [String] {
        Self::definition().params_for(resource_type)
    }

    /// Whether `resource_type` is in the Patient compartment.
    pub fn contains(resource_type: &str) -> bool {
        !Self::params_for(resource_type).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_definition_parses() {
        let def = CompartmentDefinition::from_json(PATIENT_COMPARTMENT_JSON).expect("parses");
        assert_eq!(def.code(), "Patient");
        assert_eq!(def.params.len(), 145);
        assert_eq!(
            PatientCompartment::params_for("Observation"),
            ["subject", "performer"]
        );
        assert_eq!(PatientCompartment::params_for("Patient"), ["link"]);
        assert_eq!(
            PatientCompartment::params_for("Coverage"),
            ["policy-holder", "subscriber", "beneficiary", "payor"]
        );
        assert!(PatientCompartment::params_for("Medication").is_empty());
        assert!(PatientCompartment::params_for("NotAType").is_empty());
        assert!(!PatientCompartment::contains("Organization"));
        assert_eq!(PatientCompartment::definition().member_types().len(), 66);
        assert!(CompartmentDefinition::from_json("{}").is_err());
        assert!(
            CompartmentDefinition::from_json(r#"{"resourceType":"Patient","code":"x"}"#).is_err()
        );
    }
}
