//! FHIR R4 knowledge for caregate, in plain Rust (no Pingora types), so that it can be fuzzed and
//! benchmarked on its own.
//!
//! * [`classify`]: an HTTP method, path, query and (form) body → the FHIR R4 RESTful interaction
//!   ([`FhirRequest`]), or a [`ClassifyError`] with a stable reason code and no PHI in it.
//! * [`Scope`] / [`ScopeSet`]: SMART App Launch v2 scopes (and v1), and [`ScopeSet::permits`], which
//!   says whether the scopes of a context allow a classified request and under which conditions.
//! * [`PatientCompartment`]: the R4 Patient compartment (which search parameters link each type to a
//!   patient).
//! * [`encoding`]: strict percent-decoding and the FHIR search escapes.
//!
//! Nothing here panics on any input: all parsing is total and returns errors.
//!
//! ```
//! use caregate_fhir::{classify, Context, Interaction, Permit, ScopeSet};
//!
//! let req = classify("GET", "/Observation", "patient=123&category=laboratory", None, None).unwrap();
//! assert_eq!(req.interaction, Interaction::SearchType);
//!
//! let scopes = ScopeSet::parse("launch/patient openid patient/Observation.rs").unwrap();
//! match scopes.permits(Context::Patient, &req) {
//!     Permit::Allow(grant) => assert!(grant.patient_compartment && grant.conditions.is_empty()),
//!     other => panic!("{other:?}"),
//! }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod compartment;
pub mod encoding;
mod error;
mod params;
mod patients;
mod request;
mod resource_types;
mod scopes;

pub use compartment::{
    CompartmentDefinition, CompartmentError, PatientCompartment, PATIENT_COMPARTMENT_JSON,
};
pub use error::{ClassifyError, ErrorKind};
pub use params::{parse_params, SearchParam, INCLUDE_MODIFIERS, MAX_PARAMS, R4_MODIFIERS};
pub use patients::{named_patients, PatientScanner, MAX_NAMED_PATIENTS};
pub use request::{classify, classify_relative_url, FhirRequest, Interaction};
pub use resource_types::{
    is_compartment_type, is_resource_type, resource_type_ignore_case, R4_COMPARTMENTS,
    R4_RESOURCE_TYPES,
};
pub use scopes::{
    Condition, Context, Denial, Grant, OperationLevel, OperationRule, OperationTarget, Permission,
    Permissions, Permit, ResourceScope, Restriction, Scope, ScopeError, ScopeSet, ScopeSyntax,
    ScopeTarget, OPERATION_RULES, SMART_SCOPE_URI_PREFIX,
};
