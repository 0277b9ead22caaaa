//! The search parameters the sandbox understands, per resource type.
//!
//! A small, hand-written subset of the R4 SearchParameter registry (paths
//! are simple dotted element paths; arrays are flattened at every step).

/// What kind of search parameter, and so how its values are matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Matches the resource id (`_id`, and `patient`/`subject` on Patient).
    Id,
    /// Reference elements, optionally restricted to one target type.
    Reference(Option<&'static str>),
    /// Codes, Codings, CodeableConcepts, Identifiers.
    Token,
    /// Strings and HumanNames (case-insensitive prefix by default).
    Str,
    /// Dates/instants (with `eq`/`ne`/`lt`/`le`/`gt`/`ge` prefixes).
    Date,
}

impl Kind {
    /// The FHIR `SearchParamType` name, for the CapabilityStatement.
    pub fn fhir_name(self) -> &'static str {
        match self {
            Kind::Id => "token",
            Kind::Reference(_) => "reference",
            Kind::Token => "token",
            Kind::Str => "string",
            Kind::Date => "date",
        }
    }
}

/// A supported search parameter on a given type.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ParamDef {
    pub kind: Kind,
    pub paths: &'static [&'static str],
}

/// Every parameter name [`param_def`] may know, for the CapabilityStatement.
pub(crate) const ALL_PARAMS: &[&str] = &[
    "_id",
    "_lastUpdated",
    "_tag",
    "identifier",
    "patient",
    "subject",
    "encounter",
    "code",
    "category",
    "status",
    "vaccine-code",
    "name",
    "family",
    "given",
    "gender",
    "birthdate",
    "performer",
    "requester",
    "participant",
    "service-provider",
    "organization",
    "general-practitioner",
    "result",
    "provider",
];

const SUBJECT: &[&str] = &["subject"];
const PATIENT: &[&str] = &["patient"];
const CODE: &[&str] = &["code"];
const CATEGORY: &[&str] = &["category"];
const STATUS: &[&str] = &["status"];
const ENCOUNTER: &[&str] = &["encounter"];
const MED_CODE: &[&str] = &["medicationCodeableConcept"];

/// Paths of the `patient` parameter (reference to a Patient).
fn patient_paths(t: &str) -> Option<&'static [&'static str]> {
    Some(match t {
        "Account"
        | "Basic"
        | "CarePlan"
        | "CareTeam"
        | "ChargeItem"
        | "ClinicalImpression"
        | "Communication"
        | "CommunicationRequest"
        | "Composition"
        | "Condition"
        | "Contract"
        | "DeviceRequest"
        | "DeviceUseStatement"
        | "DiagnosticReport"
        | "DocumentManifest"
        | "DocumentReference"
        | "Encounter"
        | "Flag"
        | "Goal"
        | "GuidanceResponse"
        | "ImagingStudy"
        | "Invoice"
        | "List"
        | "MeasureReport"
        | "Media"
        | "MedicationAdministration"
        | "MedicationDispense"
        | "MedicationRequest"
        | "MedicationStatement"
        | "Observation"
        | "Procedure"
        | "QuestionnaireResponse"
        | "RequestGroup"
        | "RiskAssessment"
        | "ServiceRequest"
        | "Specimen" => SUBJECT,
        "AllergyIntolerance"
        | "BodyStructure"
        | "Claim"
        | "ClaimResponse"
        | "Consent"
        | "CoverageEligibilityRequest"
        | "CoverageEligibilityResponse"
        | "DetectedIssue"
        | "Device"
        | "EpisodeOfCare"
        | "ExplanationOfBenefit"
        | "FamilyMemberHistory"
        | "Immunization"
        | "ImmunizationEvaluation"
        | "ImmunizationRecommendation"
        | "MolecularSequence"
        | "NutritionOrder"
        | "RelatedPerson"
        | "SupplyDelivery"
        | "VisionPrescription" => PATIENT,
        "Coverage" => &["beneficiary"],
        "ResearchSubject" => &["individual"],
        "EnrollmentRequest" => &["candidate"],
        "Appointment" => &["participant.actor"],
        "AppointmentResponse" => &["actor"],
        "AuditEvent" => &["agent.who", "entity.what"],
        "Person" => &["link.target"],
        "Provenance" => &["target"],
        "Task" => &["for"],
        _ => return None,
    })
}

/// Paths of the `subject` parameter (any target type).
fn subject_paths(t: &str) -> Option<&'static [&'static str]> {
    Some(match t {
        "Account"
        | "AdverseEvent"
        | "Basic"
        | "CarePlan"
        | "CareTeam"
        | "ChargeItem"
        | "ClinicalImpression"
        | "Communication"
        | "CommunicationRequest"
        | "Composition"
        | "Condition"
        | "Contract"
        | "DeviceRequest"
        | "DeviceUseStatement"
        | "DiagnosticReport"
        | "DocumentManifest"
        | "DocumentReference"
        | "Encounter"
        | "Flag"
        | "Goal"
        | "GuidanceResponse"
        | "ImagingStudy"
        | "Invoice"
        | "List"
        | "MeasureReport"
        | "Media"
        | "MedicationAdministration"
        | "MedicationDispense"
        | "MedicationRequest"
        | "MedicationStatement"
        | "Observation"
        | "Procedure"
        | "QuestionnaireResponse"
        | "RequestGroup"
        | "RiskAssessment"
        | "ServiceRequest"
        | "Specimen" => SUBJECT,
        "EnrollmentRequest" => &["candidate"],
        "Task" => &["for"],
        "SupplyRequest" => &["deliverTo"],
        _ => return None,
    })
}

fn encounter_paths(t: &str) -> Option<&'static [&'static str]> {
    Some(match t {
        "CarePlan"
        | "CareTeam"
        | "ClinicalImpression"
        | "Communication"
        | "CommunicationRequest"
        | "Composition"
        | "Condition"
        | "DeviceRequest"
        | "DiagnosticReport"
        | "Flag"
        | "ImagingStudy"
        | "List"
        | "Media"
        | "MedicationRequest"
        | "NutritionOrder"
        | "Observation"
        | "Procedure"
        | "QuestionnaireResponse"
        | "RequestGroup"
        | "RiskAssessment"
        | "ServiceRequest"
        | "Task"
        | "VisionPrescription" => ENCOUNTER,
        "DocumentReference" => &["context.encounter"],
        "Claim" | "ExplanationOfBenefit" => &["item.encounter"],
        _ => return None,
    })
}

fn code_paths(t: &str) -> Option<&'static [&'static str]> {
    Some(match t {
        "AllergyIntolerance" => &["code", "reaction.substance"],
        "Basic"
        | "ChargeItem"
        | "Condition"
        | "DetectedIssue"
        | "DiagnosticReport"
        | "Group"
        | "List"
        | "Medication"
        | "MedicationKnowledge"
        | "Observation"
        | "Procedure"
        | "RequestGroup"
        | "ServiceRequest"
        | "Substance"
        | "Task" => CODE,
        "DeviceRequest" => &["codeCodeableConcept"],
        "FamilyMemberHistory" => &["condition.code"],
        "MedicationAdministration"
        | "MedicationDispense"
        | "MedicationRequest"
        | "MedicationStatement" => MED_CODE,
        _ => return None,
    })
}

fn category_paths(t: &str) -> Option<&'static [&'static str]> {
    match t {
        "AdverseEvent"
        | "AllergyIntolerance"
        | "CarePlan"
        | "CareTeam"
        | "Communication"
        | "CommunicationRequest"
        | "Composition"
        | "Condition"
        | "Consent"
        | "DiagnosticReport"
        | "DocumentReference"
        | "Goal"
        | "MedicationRequest"
        | "MedicationStatement"
        | "Observation"
        | "Procedure"
        | "ResearchStudy"
        | "ServiceRequest"
        | "Substance"
        | "SupplyRequest" => Some(CATEGORY),
        _ => None,
    }
}

fn status_paths(t: &str) -> Option<&'static [&'static str]> {
    match t {
        "CarePlan"
        | "CareTeam"
        | "Claim"
        | "Communication"
        | "Composition"
        | "Coverage"
        | "DiagnosticReport"
        | "DocumentReference"
        | "Encounter"
        | "EpisodeOfCare"
        | "ExplanationOfBenefit"
        | "Immunization"
        | "MedicationAdministration"
        | "MedicationDispense"
        | "MedicationRequest"
        | "MedicationStatement"
        | "Observation"
        | "Procedure"
        | "ServiceRequest"
        | "Task" => Some(STATUS),
        _ => None,
    }
}

/// The definition of search parameter `name` on resource type `t`, if the
/// sandbox supports it. (Unknown types get only the generic parameters,
/// plus `patient`/`subject` on the usual elements.)
pub(crate) fn param_def(t: &str, name: &str) -> Option<ParamDef> {
    use Kind::*;
    let known = crate::types::is_r4_type(t);
    let (kind, paths): (Kind, &'static [&'static str]) = match name {
        "_id" => (Id, &[]),
        "_lastUpdated" => (Date, &["meta.lastUpdated"]),
        "_tag" => (Token, &["meta.tag"]),
        "identifier" => (Token, &["identifier"]),
        "patient" | "subject" if t == "Patient" => (Id, &[]),
        "patient" => (
            Reference(Some("Patient")),
            match patient_paths(t) {
                Some(p) => p,
                None if !known => &["patient", "subject", "beneficiary", "individual"],
                None => return None,
            },
        ),
        // Lenient: types without a `subject` element fall back to their
        // patient elements (e.g. Immunization.patient).
        "subject" => (
            Reference(None),
            match subject_paths(t).or_else(|| patient_paths(t)) {
                Some(p) => p,
                None if !known => &["subject", "patient"],
                None => return None,
            },
        ),
        "encounter" => (Reference(None), encounter_paths(t)?),
        "code" => (Token, code_paths(t)?),
        "category" => (Token, category_paths(t)?),
        "status" => (Token, status_paths(t)?),
        "vaccine-code" if t == "Immunization" => (Token, &["vaccineCode"]),
        "name" if t == "Patient" || t == "Practitioner" || t == "RelatedPerson" => (Str, &["name"]),
        "name" if t == "Organization" || t == "Location" => (Str, &["name", "alias"]),
        "family" if t == "Patient" || t == "Practitioner" => (Str, &["name.family"]),
        "given" if t == "Patient" || t == "Practitioner" => (Str, &["name.given"]),
        "gender" if t == "Patient" || t == "Practitioner" || t == "RelatedPerson" => {
            (Token, &["gender"])
        }
        "birthdate" if t == "Patient" || t == "RelatedPerson" => (Date, &["birthDate"]),
        "performer" => match t {
            "Observation" | "DiagnosticReport" | "ServiceRequest" | "CarePlan" => {
                (Reference(None), &["performer"])
            }
            "Procedure" | "Immunization" | "MedicationAdministration" => {
                (Reference(None), &["performer.actor"])
            }
            _ => return None,
        },
        "requester" if t == "MedicationRequest" || t == "ServiceRequest" => {
            (Reference(None), &["requester"])
        }
        "participant" if t == "Encounter" => (Reference(None), &["participant.individual"]),
        "service-provider" if t == "Encounter" => {
            (Reference(Some("Organization")), &["serviceProvider"])
        }
        "organization" if t == "Patient" => {
            (Reference(Some("Organization")), &["managingOrganization"])
        }
        "general-practitioner" if t == "Patient" => (Reference(None), &["generalPractitioner"]),
        "result" if t == "DiagnosticReport" => (Reference(Some("Observation")), &["result"]),
        "provider" if t == "Claim" || t == "ExplanationOfBenefit" => {
            (Reference(None), &["provider"])
        }
        _ => return None,
    };
    Some(ParamDef { kind, paths })
}

/// Paths through which a resource of type `t` belongs to a patient's
/// compartment (the `patient` parameter), if it can.
pub(crate) fn patient_compartment_paths(t: &str) -> Option<&'static [&'static str]> {
    param_def(t, "patient")
        .filter(|d| matches!(d.kind, Kind::Reference(_)))
        .map(|d| d.paths)
}
